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
//! count unless `--dlq-partitions`). When it cannot be created, or may not
//! be read, the worker stops before consuming, naming the topic and the fix.
//! So it does when the broker says the worker's principal may not WRITE to
//! it (KIP-430: the authorized operations Metadata returns): a missing ACL
//! would otherwise show only at the first poison record, as a partition
//! that stops. A broker that does not say (before Kafka 2.3, librdkafka's
//! mock), or no answer within [`ACL_CHECK_TIMEOUT`], is logged and the
//! start goes on.
//!
//! **As durable as the source, and room for every record it accepts.** An
//! acknowledged dead letter lets the source offset be committed, so the
//! dead-letter topic is created with the source topic's replication factor
//! (at most the broker count) unless `--dlq-replication-factor`, its
//! `min.insync.replicas`, and a `max.message.bytes` of the source's plus
//! [`DEAD_LETTER_HEADROOM`] for the context headers. The producer
//! compresses (zstd) and lets records of up to 256 MiB through to the broker,
//! which checks the topic's limit on the compressed batch as it did for the
//! source: a record near the source's limit, or one the source took
//! compressed, is not refused before it is sent. A cluster that refuses the
//! topic's configs (a provider's cap) gets the topic without its
//! `max.message.bytes`, with a warning. An existing dead-letter topic that is
//! smaller than the source is named in a warning at start with the fix;
//! its dead letters that do not fit stay in the backlog (below), visibly.
//! The error text a dead letter carries is cut to [`MAX_ERROR_HEADER_BYTES`].

use std::time::Duration;

use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use thiserror::Error;

use crate::batch::Batch;
use crate::config::DeadLetterConfig;
use crate::handler::Failure;
use microbatch_kafka::admin::{
    create_topic_with, topic_settings, TopicLookup, TopicSettings, TopicState,
    KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
};
use microbatch_kafka::aws_iam::WithTokens;
use microbatch_kafka::client::{ClientError, QuietContext};
use microbatch_kafka::KafkaConfig;

/// Room on top of the source topic's `max.message.bytes` for the headers a
/// dead letter adds (seven names, numbers, the group and the error text).
pub const DEAD_LETTER_HEADROOM: i64 = 16 << 10;

/// The longest error text a dead letter's `microbatch.error` carries.
pub const MAX_ERROR_HEADER_BYTES: usize = 4 << 10;

/// The producer's `message.max.bytes`: librdkafka checks it against a
/// record before compression, the broker checks the topic's limit after,
/// so a record the source took compressed may be far larger than the
/// topic's limit. The producer lets such a record through to the broker,
/// compressed (`compression.type` zstd), which decides; librdkafka allows
/// at most 1,000,000,000.
const PRODUCER_MESSAGE_MAX_BYTES: i64 = 256 << 20;
const LIBRDKAFKA_MAX_MESSAGE_MAX_BYTES: i64 = 1_000_000_000;

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

/// How long the settings of a source topic may take to read before its
/// dead-letter topic is made with the broker's defaults.
const SETTINGS_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the start waits for the broker to say what the worker may do
/// with the dead-letter topic.
pub const ACL_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Refuses a dead-letter topic this principal may not WRITE to, as the
/// broker reports (see the module docs).
async fn may_write(kafka: &KafkaConfig, topic: &str) -> Result<(), DlqError> {
    match microbatch_kafka::admin::topic_operations(kafka, topic, ACL_CHECK_TIMEOUT).await {
        Ok(Some(ops)) if !ops.allows_write() => Err(DlqError::NotAuthorized {
            topic: topic.to_string(),
            reason: format!(
                "the broker says this principal may not WRITE to it, only {}",
                if ops.names().is_empty() {
                    "nothing".to_string()
                } else {
                    ops.names().join(", ")
                }
            ),
        }),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(
                dlq_topic = topic,
                error = %e,
                "could not ask the broker whether this principal may write the dead-letter topic \
                 (KIP-430); a missing WRITE would show only at the first dead letter"
            );
            Ok(())
        }
    }
}

/// Warns when the existing dead-letter topic takes smaller records than
/// its source topic, with the command that fixes it.
async fn warn_if_smaller(kafka: KafkaConfig, source_topic: String, dlq_topic: String) {
    let max = |topic: String| {
        let kafka = kafka.clone();
        async move {
            topic_settings(&kafka, &topic, SETTINGS_TIMEOUT)
                .await
                .ok()
                .and_then(|s| s.max_message_bytes)
        }
    };
    let (Some(source_max), Some(dlq_max)) = (max(source_topic).await, max(dlq_topic.clone()).await)
    else {
        return;
    };
    let needed_max = source_max + DEAD_LETTER_HEADROOM;
    if dlq_max < needed_max {
        tracing::warn!(
            dlq_topic = %dlq_topic,
            dlq_max_message_bytes = dlq_max,
            source_max_message_bytes = source_max,
            "the dead-letter topic takes smaller records than the source topic: a rejected \
             record near the source's limit cannot be dead-lettered and holds its partition. \
             Fix: kafka-configs.sh --alter --entity-type topics --entity-name {dlq_topic} \
             --add-config max.message.bytes={needed_max}"
        );
    }
}

/// The replication factor and topic configs of a dead-letter topic made for
/// a source topic with `source`'s settings (see the module docs).
pub fn creation_settings(
    dlq: &DeadLetterConfig,
    source: &TopicSettings,
) -> (i32, Vec<(&'static str, String)>) {
    let replication = dlq.replication_factor.unwrap_or_else(|| {
        match (source.replication_factor, source.brokers) {
            (Some(r), Some(b)) => r.min(b).max(1),
            (Some(r), None) => r.max(1),
            // The broker's default.
            _ => -1,
        }
    });
    let mut configs = vec![(
        "max.message.bytes",
        (source
            .max_message_bytes
            .unwrap_or(KAFKA_DEFAULT_MAX_MESSAGE_BYTES)
            + DEAD_LETTER_HEADROOM)
            .to_string(),
    )];
    match (source.min_insync_replicas, replication) {
        // More in-sync replicas than replicas would refuse every write.
        (Some(min_isr), r) if r > 0 => {
            configs.push(("min.insync.replicas", min_isr.min(r).max(1).to_string()))
        }
        (Some(min_isr), _) => configs.push(("min.insync.replicas", min_isr.to_string())),
        // Unknown: the broker's default, which may exceed a small factor
        // given by --dlq-replication-factor; 1 is the only safe value then.
        (None, 1) => configs.push(("min.insync.replicas", "1".into())),
        (None, _) => {}
    }
    (replication, configs)
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// How many of a dead-letter partition's last records a new owner of a
/// source partition reads at most for dead letters its records already
/// have (newest first), and how many bytes of them: a crash leaves at most
/// what it wrote since its last commit, the newest records of that
/// partition, and a takeover must not read a large topic's history.
pub const EARLIER_DEAD_LETTERS_SCAN: i64 = 1_000;
pub const EARLIER_DEAD_LETTERS_BYTES: usize = 16 << 20;

/// Records read per step backwards from the end of the partition.
const SCAN_CHUNK: i64 = 100;

/// The reader of earlier dead letters: one client, made at first use, for
/// every look (they take turns).
type Reader = std::sync::Arc<std::sync::Mutex<ReaderState>>;

#[derive(Default)]
struct ReaderState {
    client: Option<WithTokens<BaseConsumer<QuietContext>>>,
    /// After a look that failed, the next ones skip until then, so a
    /// takeover of many partitions does not wait a timeout for each.
    failed_until: Option<std::time::Instant>,
}

/// How long looks skip after one ran out of time.
const LOOK_FAILED_PAUSE: Duration = Duration::from_secs(30);

/// Why a look at earlier dead letters gave up.
enum LookFailed {
    TimedOut(String),
    Other(String),
}

/// Errors no retry mends: a look stops at once.
fn fatal(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::UnknownTopicOrPartition
        )
    )
}

/// The longest that reading takes before the partition goes on without it.
pub const EARLIER_DEAD_LETTERS_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes dead letters to one topic.
#[derive(Clone)]
pub struct DeadLetterWriter {
    producer: std::sync::Arc<WithTokens<FutureProducer<QuietContext>>>,
    topic: String,
    group: String,
    kafka: KafkaConfig,
    reader: Reader,
    /// The topic's partition count when known (0 otherwise): the dead
    /// letters of source partition `p` go to partition `p mod` it, so a new
    /// owner of `p` finds those already written in one partition's tail.
    /// Set to 0 for good when the broker says a partition is unknown (the
    /// topic made again, smaller): then the producer picks, and nothing is
    /// looked for.
    partitions: std::sync::Arc<std::sync::atomic::AtomicI32>,
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
        let timeout = Duration::from_secs(30);
        let mut partitions: i32;
        match lookup
            .state(&dlq.topic)
            .await
            .map_err(|reason| DlqError::Lookup {
                topic: dlq.topic.clone(),
                reason,
            })? {
            (TopicState::Exists, n) => {
                partitions = i32::try_from(n).unwrap_or(0);
                // Only a warning hangs on it, so it does not hold up the
                // start (a cluster that does not answer DescribeConfigs,
                // as librdkafka's mock does not, would for the timeout).
                tokio::spawn(warn_if_smaller(
                    kafka.clone(),
                    source_topic.to_string(),
                    dlq.topic.clone(),
                ));
            }
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
                let source = match topic_settings(kafka, source_topic, SETTINGS_TIMEOUT).await {
                    Ok(settings) => settings,
                    Err(e) => {
                        tracing::warn!(source_topic, error = %e, "could not read the source topic's settings; the dead-letter topic gets the broker's defaults");
                        TopicSettings::default()
                    }
                };
                partitions = match dlq.partitions {
                    Some(p) => p,
                    None => match lookup.state(source_topic).await {
                        Ok((TopicState::Exists, n)) => n as i32,
                        _ => 1,
                    },
                };
                let (replication, mut configs) = creation_settings(dlq, &source);
                let mut created;
                loop {
                    created = create_topic_with(
                        kafka,
                        &dlq.topic,
                        partitions,
                        replication,
                        &configs,
                        timeout,
                    )
                    .await;
                    let Err(ClientError::Kafka(KafkaError::AdminOp(
                        code
                        @ (RDKafkaErrorCode::InvalidConfig | RDKafkaErrorCode::PolicyViolation),
                    ))) = &created
                    else {
                        break;
                    };
                    if configs.is_empty() {
                        break;
                    }
                    // A provider's cap on max.message.bytes (or a refused
                    // min.insync.replicas): the broker's defaults then,
                    // max.message.bytes first, and the smaller topic named.
                    tracing::warn!(
                        dlq_topic = %dlq.topic,
                        error = %code,
                        configs = ?configs,
                        "the cluster refused the dead-letter topic's configs; creating it with the \
                         broker's defaults: a rejected record larger than the broker's \
                         max.message.bytes cannot be dead-lettered and holds its partition"
                    );
                    if configs.iter().any(|(k, _)| *k == "max.message.bytes") {
                        configs.retain(|(k, _)| *k != "max.message.bytes");
                    } else {
                        configs.clear();
                    }
                }
                match created {
                    Ok(_) => tracing::info!(
                        dlq_topic = %dlq.topic,
                        partitions,
                        replication_factor = replication,
                        configs = ?configs,
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
        may_write(kafka, &dlq.topic).await?;
        // The count the topic has, not the one asked for: a worker beside
        // this one may have made it first, with another.
        if let Ok((TopicState::Exists, n)) = lookup.state(&dlq.topic).await {
            partitions = i32::try_from(n).unwrap_or(0);
        }
        let writer = Self::new(kafka, &dlq.topic, group, 0)?;
        writer
            .partitions
            .store(partitions, std::sync::atomic::Ordering::Relaxed);
        Ok(writer)
    }

    /// The dead-letter partition of source partition `partition`'s records,
    /// when the topic's partition count is known.
    fn partition_for(&self, partition: i32) -> Option<i32> {
        let n = self.partitions.load(std::sync::atomic::Ordering::Relaxed);
        (n > 0).then(|| partition.rem_euclid(n))
    }

    /// Whether [`Self::earlier_dead_letters`] can find anything.
    pub fn finds_earlier(&self) -> bool {
        self.partition_for(0).is_some()
    }

    /// The records of `source_topic`'s `partition` whose dead letter this
    /// group already wrote, as (offset, the record's timestamp), among the
    /// newest records of the dead-letter partition they go to (at most
    /// [`EARLIER_DEAD_LETTERS_SCAN`] records and
    /// [`EARLIER_DEAD_LETTERS_BYTES`], read backwards a chunk at a time):
    /// what a member that owned the partition before wrote and did not live
    /// to commit past. Blocking; looks take turns, and for
    /// [`LOOK_FAILED_PAUSE`] after one failed the others skip.
    pub fn earlier_dead_letters(
        &self,
        source_topic: &str,
        partition: i32,
        timeout: Duration,
    ) -> Result<Vec<(i64, Option<i64>)>, String> {
        let Some(dlq_partition) = self.partition_for(partition) else {
            return Ok(Vec::new());
        };
        let mut state = self.reader.lock().map_err(|_| "reader lock poisoned")?;
        let now = std::time::Instant::now();
        if state.failed_until.is_some_and(|until| now < until) {
            return Err("skipped: a look moments ago failed".into());
        }
        let deadline = now + timeout;
        if state.client.is_none() {
            // The worker's own group, which its ACLs cover: librdkafka
            // assigns only with one. The reader joins nothing (it assigns)
            // and commits nothing.
            let mut config = self.kafka.client_config();
            config
                .set("group.id", &self.group)
                .set("group.protocol", "classic")
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("enable.partition.eof", "false")
                // A chunk at a time, not the topic's history ahead of it.
                .set("queued.max.messages.kbytes", "2048")
                .set("fetch.max.bytes", "1048576");
            state.client = Some(
                self.kafka
                    .create_client(&config, QuietContext::new(&self.kafka))
                    .map_err(|e| e.to_string())?,
            );
        }
        let consumer = state.client.as_ref().expect("made above");
        let result = self.read_back(consumer, source_topic, partition, dlq_partition, deadline);
        let _ = consumer.unassign();
        // Only a look that ran out of time makes the next ones skip: a
        // quick error costs only this partition its look.
        if let Err(LookFailed::TimedOut(_)) = &result {
            state.failed_until = Some(std::time::Instant::now() + LOOK_FAILED_PAUSE);
        }
        result.map_err(|e| match e {
            LookFailed::TimedOut(e) | LookFailed::Other(e) => e,
        })
    }

    /// [`Self::earlier_dead_letters`]'s reading, chunk by chunk from the end.
    fn read_back(
        &self,
        consumer: &BaseConsumer<QuietContext>,
        source_topic: &str,
        partition: i32,
        dlq_partition: i32,
        deadline: std::time::Instant,
    ) -> Result<Vec<(i64, Option<i64>)>, LookFailed> {
        use rdkafka::message::{Headers, Message};
        use rdkafka::{Offset, TopicPartitionList};
        let left = || deadline.saturating_duration_since(std::time::Instant::now());
        // A leader moving answers at once with a retriable error: asked
        // again until the time is up.
        let (low, high) = loop {
            match consumer.fetch_watermarks(&self.topic, dlq_partition, left()) {
                Ok(marks) => break marks,
                Err(e) if fatal(&e) || left() < Duration::from_millis(200) => {
                    return Err(LookFailed::Other(e.to_string()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        let want_partition = partition.to_string();
        let mut found = Vec::new();
        let (mut end, mut bytes) = (high, 0usize);
        let floor = (high - EARLIER_DEAD_LETTERS_SCAN).max(low);
        while end > floor && bytes < EARLIER_DEAD_LETTERS_BYTES {
            let start = (end - SCAN_CHUNK).max(floor);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&self.topic, dlq_partition, Offset::Offset(start))
                .and_then(|()| consumer.assign(&tpl))
                .map_err(|e| LookFailed::Other(e.to_string()))?;
            let mut next = start;
            while next < end {
                if left().is_zero() {
                    return Err(LookFailed::TimedOut(format!(
                        "read {} of {} records of {}-{dlq_partition} in time",
                        high - end + (next - start),
                        high - floor,
                        self.topic
                    )));
                }
                let m = match consumer.poll(left().min(Duration::from_millis(200))) {
                    Some(Ok(m)) => m,
                    // A passing error (a broker reconnecting): the time
                    // limit ends a look that cannot go on.
                    Some(Err(e)) if !fatal(&e) => {
                        tracing::debug!(error = %e, "reading the dead-letter topic");
                        continue;
                    }
                    Some(Err(e)) => return Err(LookFailed::Other(e.to_string())),
                    None => {
                        // Offsets need not be contiguous (compaction,
                        // control records): the position says the chunk ended.
                        let past = consumer.position().ok().and_then(|tpl| {
                            tpl.find_partition(&self.topic, dlq_partition)
                                .and_then(|e| match e.offset() {
                                    Offset::Offset(o) => Some(o),
                                    _ => None,
                                })
                        });
                        if past.is_some_and(|o| o >= end) {
                            break;
                        }
                        continue;
                    }
                };
                if m.offset() < next {
                    continue;
                }
                next = m.offset() + 1;
                bytes += m.payload_len() + m.key().map_or(0, <[u8]>::len);
                let Some(h) = m.headers() else {
                    continue;
                };
                // The last of each name: ours come after the record's own,
                // which may carry an earlier dead letter's (a redrive).
                let header = |name: &str| {
                    h.iter()
                        .filter(|x| x.key == name)
                        .last()
                        .and_then(|x| x.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                };
                if header(headers::ORIGINAL_TOPIC) == Some(source_topic)
                    && header(headers::ORIGINAL_PARTITION) == Some(want_partition.as_str())
                    && header(headers::CONSUMER_GROUP) == Some(self.group.as_str())
                {
                    let offset = header(headers::ORIGINAL_OFFSET).and_then(|o| o.parse().ok());
                    let timestamp = header(headers::ORIGINAL_TIMESTAMP_MS)
                        .filter(|t| !t.is_empty())
                        .map(str::parse::<i64>);
                    match (offset, timestamp) {
                        (Some(o), None) => found.push((o, None)),
                        (Some(o), Some(Ok(t))) => found.push((o, Some(t))),
                        _ => {}
                    }
                }
            }
            end = start;
        }
        Ok(found)
    }

    /// A writer whose producer takes records up to `max_message_bytes`, or
    /// 256 MiB when that is more (see the module docs).
    pub fn new(
        kafka: &KafkaConfig,
        topic: &str,
        group: &str,
        max_message_bytes: i64,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let max_message_bytes =
            max_message_bytes.clamp(PRODUCER_MESSAGE_MAX_BYTES, LIBRDKAFKA_MAX_MESSAGE_MAX_BYTES);
        let producer = kafka.create_client(
            kafka
                .client_config()
                .set("message.max.bytes", max_message_bytes.to_string())
                .set("compression.type", "zstd")
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
            kafka: kafka.clone(),
            reader: Reader::default(),
            partitions: Default::default(),
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
                .map(|(_, f)| cut(&f.error, MAX_ERROR_HEADER_BYTES))
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
            if let Some(p) = self.partition_for(record.partition) {
                rec = rec.partition(p);
            }
            if let Some(k) = record.key {
                rec = rec.key(k);
            }
            if let Some(v) = record.value {
                rec = rec.payload(v);
            }
            // The dead letter's own timestamp is when it was written (the
            // record's is in its header): a dead-letter topic's retention
            // counts from then, not from when the source record was made.
            let offset = record.offset;
            let send = self
                .producer
                .send(rec, Timeout::After(Duration::from_secs(10)));
            async move { (offset, send.await.map_err(|(e, _)| e)) }
        });
        let mut written = Vec::with_capacity(batch.len());
        let mut error = None;
        for (offset, result) in join_all(sends).await {
            match result {
                Ok(_) => written.push(offset),
                Err(e) => {
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownPartition)
                        && self
                            .partitions
                            .swap(0, std::sync::atomic::Ordering::Relaxed)
                            > 0
                    {
                        // The retry goes where the producer picks.
                        tracing::warn!(
                            dlq_topic = %self.topic,
                            "the dead-letter topic has fewer partitions than at start (made \
                             again?): dead letters go where the producer picks from now on, \
                             and a new owner of a partition no longer looks for those \
                             already written"
                        );
                    }
                    error.get_or_insert(format!("dead-letter topic {}: {e}", self.topic));
                }
            }
        }
        (written, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_topic_is_as_durable_as_its_source_and_takes_its_records() {
        let dlq = DeadLetterConfig::for_topic("orders");
        let source = TopicSettings {
            replication_factor: Some(3),
            brokers: Some(6),
            max_message_bytes: Some(8 << 20),
            min_insync_replicas: Some(2),
        };
        let (replication, configs) = creation_settings(&dlq, &source);
        assert_eq!(replication, 3);
        assert!(configs.contains(&(
            "max.message.bytes",
            ((8 << 20) + DEAD_LETTER_HEADROOM).to_string()
        )));
        assert!(configs.contains(&("min.insync.replicas", "2".into())));
        // Never more replicas than brokers; never more in-sync replicas than replicas.
        let small = TopicSettings {
            brokers: Some(1),
            ..source.clone()
        };
        let (replication, configs) = creation_settings(&dlq, &small);
        assert_eq!(replication, 1);
        assert!(configs.contains(&("min.insync.replicas", "1".into())));
        // An explicit factor wins; unknown settings fall back to the broker's.
        let explicit = DeadLetterConfig {
            replication_factor: Some(2),
            ..dlq.clone()
        };
        let (replication, configs) = creation_settings(&explicit, &source);
        assert_eq!(replication, 2);
        assert!(configs.contains(&("min.insync.replicas", "2".into())));
        let one = DeadLetterConfig {
            replication_factor: Some(1),
            ..dlq.clone()
        };
        let (_, configs) = creation_settings(&one, &source);
        assert!(
            configs.contains(&("min.insync.replicas", "1".into())),
            "min.insync.replicas 2 on 1 replica refuses every write"
        );
        let (_, configs) = creation_settings(&one, &TopicSettings::default());
        assert!(configs.contains(&("min.insync.replicas", "1".into())));
        let (replication, configs) = creation_settings(&dlq, &TopicSettings::default());
        assert_eq!(replication, -1);
        assert_eq!(
            configs,
            vec![(
                "max.message.bytes",
                (KAFKA_DEFAULT_MAX_MESSAGE_BYTES + DEAD_LETTER_HEADROOM).to_string()
            )]
        );
    }

    #[test]
    fn error_headers_are_cut_on_a_character_boundary() {
        assert_eq!(cut("abc", 10), "abc");
        assert_eq!(cut("aé", 2), "a");
        assert_eq!(
            cut(&"x".repeat(10_000), MAX_ERROR_HEADER_BYTES).len(),
            MAX_ERROR_HEADER_BYTES
        );
    }
}
