//! The dead-letter topic: where records go that the handler rejected for good.
//!
//! A dead letter carries the original key, value and headers, plus context
//! headers (`microbatch.original.topic`, `.partition`, `.offset`,
//! `.timestamp_ms`, `microbatch.error`, `microbatch.attempts`,
//! `microbatch.consumer.group`). It is produced idempotently with `acks=all`,
//! and the source record counts as done only once the broker acknowledged it.
//! A write that fails is retried with back-off, loudly, for as long as it
//! takes: nothing is committed past a record whose dead letter is not stored.

use std::time::Duration;

use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::batch::Batch;
use crate::config::KafkaConfig;
use crate::handler::Failure;
use crate::kafka::QuietContext;

/// Header names added to every dead letter.
pub mod headers {
    pub const ORIGINAL_TOPIC: &str = "microbatch.original.topic";
    pub const ORIGINAL_PARTITION: &str = "microbatch.original.partition";
    pub const ORIGINAL_OFFSET: &str = "microbatch.original.offset";
    pub const ORIGINAL_TIMESTAMP_MS: &str = "microbatch.original.timestamp_ms";
    pub const ERROR: &str = "microbatch.error";
    pub const ATTEMPTS: &str = "microbatch.attempts";
    pub const CONSUMER_GROUP: &str = "microbatch.consumer.group";
}

/// Writes dead letters to one topic.
#[derive(Clone)]
pub struct DeadLetterWriter {
    producer: FutureProducer<QuietContext>,
    topic: String,
    group: String,
}

impl DeadLetterWriter {
    pub fn new(
        kafka: &KafkaConfig,
        topic: &str,
        group: &str,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let producer: FutureProducer<QuietContext> = kafka
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            // Fail (and say so) within 10 s when the topic is missing or the
            // broker down; the write is retried until it succeeds.
            .set("message.timeout.ms", "10000")
            .set("topic.metadata.propagation.max.ms", "10000")
            .create_with_context(QuietContext::new(kafka))?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
            group: group.to_string(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes one dead letter per record of `batch`, each with its failure,
    /// retrying until every one is acknowledged. Returns the offsets written.
    pub async fn write(
        &self,
        batch: &Batch,
        failures: &[(i64, Failure)],
        attempts: u32,
    ) -> Vec<i64> {
        let mut written = Vec::with_capacity(batch.len());
        for record in batch.records() {
            let error = failures
                .iter()
                .find(|(o, _)| *o == record.offset)
                .map(|(_, f)| f.error.as_str())
                .unwrap_or("failed");
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 7);
            for h in record.headers {
                headers = headers.insert(KafkaHeader {
                    key: &h.name,
                    value: h.value.as_deref(),
                });
            }
            let partition = record.partition.to_string();
            let offset = record.offset.to_string();
            let timestamp = record
                .timestamp_ms
                .map(|t| t.to_string())
                .unwrap_or_default();
            let attempts = attempts.to_string();
            for (key, value) in [
                (headers::ORIGINAL_TOPIC, record.topic),
                (headers::ORIGINAL_PARTITION, partition.as_str()),
                (headers::ORIGINAL_OFFSET, offset.as_str()),
                (headers::ORIGINAL_TIMESTAMP_MS, timestamp.as_str()),
                (headers::ERROR, error),
                (headers::ATTEMPTS, attempts.as_str()),
                (headers::CONSUMER_GROUP, self.group.as_str()),
            ] {
                headers = headers.insert(KafkaHeader {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let mut backoff = Duration::from_millis(200);
            loop {
                let mut rec: FutureRecord<'_, [u8], [u8]> =
                    FutureRecord::to(&self.topic).headers(headers.clone());
                if let Some(k) = record.key {
                    rec = rec.key(k);
                }
                if let Some(v) = record.value {
                    rec = rec.payload(v);
                }
                if let Some(ts) = record.timestamp_ms {
                    rec = rec.timestamp(ts);
                }
                match self
                    .producer
                    .send(rec, Timeout::After(Duration::from_secs(10)))
                    .await
                {
                    Ok(_) => break,
                    Err((e, _)) => {
                        tracing::error!(
                            dlq_topic = %self.topic,
                            partition = record.partition,
                            offset = record.offset,
                            error = %e,
                            retry_in_ms = backoff.as_millis() as u64,
                            "dead letter not written; nothing past this record is committed until it is"
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
            written.push(record.offset);
        }
        written
    }
}
