//! The dead-letter topic: where records go that the handler rejected for good.
//!
//! A dead letter carries the original key, value and headers, plus context
//! headers (`microbatch.original.topic`, `.partition`, `.offset`,
//! `.timestamp_ms`, `microbatch.error`, `microbatch.attempts`,
//! `microbatch.consumer.group`). It is produced idempotently with `acks=all`,
//! and the source record counts as done only once the broker acknowledged it.
//! A write that fails is retried by the pipeline with back-off, loudly, for
//! as long as it takes: nothing is committed past a record whose dead letter
//! is not stored, and `/readyz` and `/metrics` show the backlog.
//!
//! **Somewhere to go before the first record is taken.** At start
//! [`DeadLetterWriter::prepare`] looks the topic up; when it is missing it is
//! created (as Kafka Connect does for its DLQ: the source topic's partition
//! count unless `--dlq-partitions`, the broker's default replication factor
//! unless `--dlq-replication-factor`). When it cannot be created, or may not
//! be read, the worker stops before consuming, naming the topic and the fix.

use std::time::Duration;

use futures::future::join_all;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use thiserror::Error;

use crate::aws_iam::WithTokens;
use crate::batch::Batch;
use crate::config::{DeadLetterConfig, KafkaConfig};
use crate::handler::Failure;
use crate::kafka::{create_topic, ClientError, QuietContext, TopicLookup, TopicState};

/// Why the dead-letter topic is not ready; each names the topic and the fix.
#[derive(Debug, Error)]
pub enum DlqError {
    #[error(
        "the dead-letter topic {topic:?} does not exist and --dlq-create is off: create it \
         (microbatch topic create --topic {topic}), or allow --dlq-create on, or set --dlq off"
    )]
    Missing { topic: String },
    #[error(
        "the dead-letter topic {topic:?} does not exist and could not be created: {reason}. \
         Create it yourself (microbatch topic create --topic {topic}), or grant this principal \
         CREATE on it, or fix --dlq-partitions / --dlq-replication-factor"
    )]
    CannotCreate { topic: String, reason: String },
    #[error(
        "not allowed to use the dead-letter topic {topic:?} ({reason}): grant this principal \
         DESCRIBE and WRITE on it, or name another with --dlq-topic"
    )]
    NotAuthorized { topic: String, reason: String },
    #[error("could not look up the dead-letter topic {topic:?}: {reason}")]
    Lookup { topic: String, reason: String },
    #[error("could not create the dead-letter producer: {0}")]
    Producer(#[from] rdkafka::error::KafkaError),
}

impl DlqError {
    /// Whether waiting may help (the brokers are not reachable yet).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Lookup { .. })
    }
}

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
    producer: std::sync::Arc<WithTokens<FutureProducer<QuietContext>>>,
    topic: String,
    group: String,
}

impl DeadLetterWriter {
    /// Makes sure the dead-letter topic exists (see the module docs), then
    /// returns its writer. `source_topic` lends its partition count.
    pub async fn prepare(
        kafka: &KafkaConfig,
        lookup: &TopicLookup,
        dlq: &DeadLetterConfig,
        source_topic: &str,
        group: &str,
    ) -> Result<Self, DlqError> {
        match lookup
            .state(&dlq.topic)
            .await
            .map_err(|reason| DlqError::Lookup {
                topic: dlq.topic.clone(),
                reason,
            })? {
            (TopicState::Exists, _) => {}
            (TopicState::Denied(reason), _) => {
                return Err(DlqError::NotAuthorized {
                    topic: dlq.topic.clone(),
                    reason,
                })
            }
            (TopicState::Missing, _) if !dlq.create => {
                return Err(DlqError::Missing {
                    topic: dlq.topic.clone(),
                })
            }
            (TopicState::Missing, _) => {
                let partitions = match dlq.partitions {
                    Some(p) => p,
                    None => match lookup.state(source_topic).await {
                        Ok((TopicState::Exists, n)) => n as i32,
                        _ => 1,
                    },
                };
                let replication = dlq.replication_factor.unwrap_or(-1);
                let create_timeout = Duration::from_secs(30);
                match create_topic(kafka, &dlq.topic, partitions, replication, create_timeout).await
                {
                    Ok(_) => tracing::info!(
                        dlq_topic = %dlq.topic,
                        partitions,
                        replication_factor = replication,
                        "created the dead-letter topic"
                    ),
                    Err(e @ ClientError::Unreachable { .. }) => {
                        return Err(DlqError::Lookup {
                            topic: dlq.topic.clone(),
                            reason: e.to_string(),
                        })
                    }
                    Err(e) => {
                        return Err(DlqError::CannotCreate {
                            topic: dlq.topic.clone(),
                            reason: e.to_string(),
                        })
                    }
                }
            }
        }
        Ok(Self::new(kafka, &dlq.topic, group)?)
    }

    pub fn new(
        kafka: &KafkaConfig,
        topic: &str,
        group: &str,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let producer = kafka.create_client(
            kafka
                .client_config()
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("linger.ms", "5")
                // Fail (and say so) within 10 s when the topic is missing or
                // the broker down; the write is retried until it succeeds.
                .set("message.timeout.ms", "10000")
                .set("topic.metadata.propagation.max.ms", "10000"),
            QuietContext::new(kafka),
        )?;
        Ok(Self {
            producer: std::sync::Arc::new(producer),
            topic: topic.to_string(),
            group: group.to_string(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes one dead letter per record of `batch`, each with its failure.
    /// Returns the offsets the broker acknowledged and, if some were not,
    /// why (the pipeline tries those again).
    pub async fn write(
        &self,
        batch: &Batch,
        failures: &[(i64, Failure)],
        attempts: u32,
    ) -> (Vec<i64>, Option<String>) {
        let attempts = attempts.to_string();
        let sends = batch.records().map(|record| {
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
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers);
            if let Some(k) = record.key {
                rec = rec.key(k);
            }
            if let Some(v) = record.value {
                rec = rec.payload(v);
            }
            if let Some(ts) = record.timestamp_ms {
                rec = rec.timestamp(ts);
            }
            let offset = record.offset;
            let send = self
                .producer
                .send(rec, Timeout::After(Duration::from_secs(10)));
            async move { (offset, send.await.map_err(|(e, _)| e.to_string())) }
        });
        let mut written = Vec::with_capacity(batch.len());
        let mut error = None;
        for (offset, result) in join_all(sends).await {
            match result {
                Ok(_) => written.push(offset),
                Err(e) => {
                    error.get_or_insert(format!("dead-letter topic {}: {e}", self.topic));
                }
            }
        }
        (written, error)
    }
}
