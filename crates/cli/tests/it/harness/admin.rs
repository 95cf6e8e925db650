//! Broker states made with the admin API: committed offsets placed for a
//! group (AlterConsumerGroupOffsets), records deleted as retention would
//! (DeleteRecords), and records produced to chosen partitions with chosen
//! timestamps.

use std::ffi::{CStr, CString};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::bindings as rd;
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::broker;

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", broker().bootstrap())
        .create()
        .expect("admin client")
}

/// Places committed offsets for a group with the admin API
/// (AlterConsumerGroupOffsets, which rust-rdkafka does not wrap).
pub fn alter_group_offsets(group: &str, topic: &str, offsets: &[(i32, i64)]) {
    let admin = admin();
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in offsets {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .expect("a valid offset");
    }
    let group = CString::new(group).expect("no NUL in a group name");
    // SAFETY: every pointer comes from librdkafka or from values that outlive
    // the calls; the request and the event are destroyed once, here.
    unsafe {
        let rk = admin.inner().native_ptr();
        let queue = rd::rd_kafka_queue_new(rk);
        let mut request = rd::rd_kafka_AlterConsumerGroupOffsets_new(group.as_ptr(), tpl.ptr());
        rd::rd_kafka_AlterConsumerGroupOffsets(rk, &mut request, 1, std::ptr::null(), queue);
        rd::rd_kafka_AlterConsumerGroupOffsets_destroy(request);
        let event = rd::rd_kafka_queue_poll(queue, 30_000);
        assert!(!event.is_null(), "AlterConsumerGroupOffsets timed out");
        let error = rd::rd_kafka_event_error(event);
        assert_eq!(
            error,
            rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
            "AlterConsumerGroupOffsets: {}",
            CStr::from_ptr(rd::rd_kafka_event_error_string(event)).to_string_lossy()
        );
        let result = rd::rd_kafka_event_AlterConsumerGroupOffsets_result(event);
        let mut count = 0;
        let groups = rd::rd_kafka_AlterConsumerGroupOffsets_result_groups(result, &mut count);
        assert_eq!(count, 1);
        let group_result = *groups;
        assert!(
            rd::rd_kafka_group_result_error(group_result).is_null(),
            "AlterConsumerGroupOffsets refused for the group"
        );
        let partitions = &*rd::rd_kafka_group_result_partitions(group_result);
        for i in 0..partitions.cnt as usize {
            let p = &*partitions.elems.add(i);
            assert_eq!(
                p.err,
                rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
                "offset of partition {} refused",
                p.partition
            );
        }
        rd::rd_kafka_event_destroy(event);
        rd::rd_kafka_queue_destroy(queue);
    }
}

/// Deletes records before `offset` (what retention does), with DeleteRecords.
pub fn delete_records_before(topic: &str, partitions: &[(i32, i64)]) {
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in partitions {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .expect("a valid offset");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let done = runtime
        .block_on(admin().delete_records(&tpl, &AdminOptions::new()))
        .expect("DeleteRecords");
    for element in done.elements() {
        element.error().expect("records deleted");
    }
}

/// Produces, per (partition, count, timestamp in ms since the epoch), that
/// many records; None stamps them with the producer's clock.
pub fn produce_records(topic: &str, records: &[(i32, i64, Option<i64>)]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker().bootstrap())
        .create()
        .expect("producer");
    for (partition, count, timestamp) in records {
        for i in 0..*count {
            let payload = format!("record {i}");
            let mut record = BaseRecord::<(), _>::to(topic)
                .partition(*partition)
                .payload(&payload);
            if let Some(ms) = timestamp {
                record = record.timestamp(*ms);
            }
            producer.send(record).expect("queued");
        }
    }
    producer.flush(Duration::from_secs(30)).expect("flushed");
}
