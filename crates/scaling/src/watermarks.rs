//! Low and high watermarks of many partitions in two requests (ListOffsets
//! for "earliest" and "latest", one per partition leader), instead of two
//! round trips per partition.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

/// (low, high) per partition of `topic`.
pub fn fetch<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> KafkaResult<HashMap<i32, (i64, i64)>> {
    // As timestamps, `End` (-1) and `Beginning` (-2) ask ListOffsets for the
    // latest and the earliest offset.
    let query = |timestamp: Offset| -> KafkaResult<HashMap<i32, i64>> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition_offset(topic, *p, timestamp)?;
        }
        let answer = consumer.offsets_for_times(tpl, timeout)?;
        let mut out = HashMap::with_capacity(partitions.len());
        for elem in answer.elements_for_topic(topic) {
            if let Some(e) = elem.error().err() {
                return Err(e);
            }
            let offset = match elem.offset() {
                Offset::Offset(o) => o,
                // An empty partition answers "end" for both.
                _ => 0,
            };
            out.insert(elem.partition(), offset);
        }
        Ok(out)
    };
    let low = query(Offset::Beginning)?;
    let high = query(Offset::End)?;
    Ok(partitions
        .iter()
        .map(|p| {
            let l = low.get(p).copied().unwrap_or(0);
            let h = high.get(p).copied().unwrap_or(l);
            (*p, (l, h.max(l)))
        })
        .collect())
}
