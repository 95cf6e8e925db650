//! Typed, validated worker configuration.
//!
//! The binary collects raw values from flags, the environment and a TOML file;
//! this module turns them into the types below, once, and every error names the
//! field and the rule it broke. Nothing downstream re-checks these values.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use microbatch_kafka::{ConfigError, KafkaConfig};

use crate::health::HealthScope;

/// Every default of a worker, in one place: [`WorkerConfig::new`] and the
/// binary's flags (and so `--help`) read them from here.
pub mod defaults {
    use super::{GroupProtocol, OffsetReset, Ordering};

    pub const MAX_RECORDS: usize = 100;
    pub const MAX_BYTES: usize = 1 << 20;
    pub const MAX_WAIT_MS: u64 = 500;
    pub const ORDERING: Ordering = Ordering::Key;
    pub const CONCURRENCY: usize = 8;
    pub const COMMIT_INTERVAL_MS: u64 = 1_000;
    /// No cap on records a crash may replay (0).
    pub const MAX_UNCOMMITTED_RECORDS: usize = 0;
    pub const DRAIN_TIMEOUT_MS: u64 = 30_000;
    pub const HANDLER_TIMEOUT_MS: u64 = 60_000;
    /// Extra time an exec child's first batch gets for the child's start-up.
    pub const HANDLER_STARTUP_MS: u64 = 30_000;
    pub const RETRY_INITIAL_MS: u64 = 100;
    pub const RETRY_MAX_MS: u64 = 10_000;
    pub const MAX_ATTEMPTS: u32 = 5;
    /// How long a record is held for its key's (or tenant's) own proof of
    /// health before the worker's proof decides (see `crate::health`).
    pub const HEALTH_SCOPE_HOLD_MS: u64 = 300_000;
    /// Raised to one batch (`MAX_RECORDS` as set) when that is larger.
    pub const MAX_RECORDS_PER_PARTITION: usize = 10_000;
    pub const MAX_RECORDS_HELD: usize = 50_000;
    /// Key and value bytes a worker holds before it stops taking records in:
    /// with librdkafka's prefetch (16 MiB), the batches' JSON copies and the
    /// process itself, this fits the kit's 512 MiB memory limit with room.
    pub const MAX_HELD_BYTES: usize = 128 << 20;
    pub const OFFSET_RESET: OffsetReset = OffsetReset::Earliest;
    pub const GROUP_PROTOCOL: GroupProtocol = GroupProtocol::Classic;
}

/// Serde through the same spelling as the flag (`FromStr` and `Display`),
/// so a TOML file says `ordering = "key"` as the command line does.
macro_rules! serde_as_str {
    ($($ty:ty),+) => {$(
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    )+};
}

serde_as_str!(Ordering, OffsetReset, GroupProtocol, HealthScope);

/// How records of one partition may be spread over processing slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// One batch in flight per partition: partition order is kept.
    Partition,
    /// A partition's records spread over slots by key: per-key order is kept.
    Key,
    /// Any record on any free slot.
    None,
}

impl FromStr for Ordering {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "partition" => Ok(Self::Partition),
            "key" => Ok(Self::Key),
            "none" => Ok(Self::None),
            _ => Err("expected one of partition, key, none".into()),
        }
    }
}

impl fmt::Display for Ordering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Partition => "partition",
            Self::Key => "key",
            Self::None => "none",
        })
    }
}

/// When a batch is closed and handed to the handler. See [`crate::batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// At most this many records (>= 1).
    pub max_records: usize,
    /// At most this many key + value bytes; a single larger record still forms
    /// a batch of its own.
    pub max_bytes: usize,
    /// At most this long after the batch's first record arrived.
    pub max_wait: Duration,
}

impl BatchLimits {
    pub fn new(
        max_records: usize,
        max_bytes: usize,
        max_wait: Duration,
    ) -> Result<Self, ConfigError> {
        if max_records == 0 {
            return Err(ConfigError::new("--max-records", "must be at least 1"));
        }
        if max_bytes == 0 {
            return Err(ConfigError::new("--max-bytes", "must be at least 1"));
        }
        Ok(Self {
            max_records,
            max_bytes,
            max_wait,
        })
    }
}

/// Retry schedule for failed records: exponential back-off with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// Attempts in all (the first included) before a record is dead-lettered.
    pub max_attempts: u32,
    /// A record older than this (by its timestamp) is dead-lettered instead of
    /// retried again. `None`: no limit.
    pub max_record_age: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(defaults::RETRY_INITIAL_MS),
            max: Duration::from_millis(defaults::RETRY_MAX_MS),
            max_attempts: defaults::MAX_ATTEMPTS,
            max_record_age: None,
        }
    }
}

impl RetryPolicy {
    /// The upper bound of the back-off before attempt `attempt + 1`; the actual
    /// wait is drawn uniformly from zero to this ("full jitter").
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1).min(20))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Client properties of the classic group protocol that librdkafka refuses
/// under KIP-848, where the broker owns them.
const CLASSIC_ONLY_PROPERTIES: &[&str] = &[
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "partition.assignment.strategy",
];

/// The most `share.delivery.count.limit` Kafka accepts for a share group
/// (`group.share.max.delivery.count.limit`'s default and upper bound).
pub const SHARE_DELIVERY_LIMIT_MAX: u32 = 10;

/// Everything one worker needs, validated.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub kafka: KafkaConfig,
    pub topic: String,
    pub group: String,
    pub batch: BatchLimits,
    pub ordering: Ordering,
    /// Batches in flight at once in this worker (>= 1).
    pub concurrency: usize,
    pub commit_interval: Duration,
    /// How long finished records may wait for their commit before their
    /// partition starts no new batches (what a crash may replay); `None`:
    /// [`WorkerConfig::uncommitted_limit`]'s default; zero: no limit.
    pub max_uncommitted: Option<Duration>,
    /// Finished records a crash may replay, in all partitions together: at
    /// this many a commit goes out at once, and no new batch starts until
    /// the broker acknowledges it (`--max-uncommitted-records`); 0: no cap.
    pub max_uncommitted_records: usize,
    /// How long shutdown and revocation wait for in-flight batches.
    pub drain_timeout: Duration,
    pub handler_timeout: Duration,
    pub retry: RetryPolicy,
    /// What a record's downstream health is judged by (see [`crate::health`]).
    pub health_scope: HealthScope,
    /// How long a record waits for its scope's proof at most.
    pub health_scope_hold: Duration,
    /// Dead-letter topic; `None` stops the worker on a record that fails for good.
    pub dlq: Option<DeadLetterConfig>,
    /// Records held per partition (queued and in flight) before it is paused.
    pub max_records_per_partition: usize,
    /// Records held by the whole worker before it stops taking records from
    /// the fetch queue (nothing is paused; librdkafka stops fetching).
    pub max_records_held: usize,
    /// Key and value bytes held by the whole worker before it stops taking
    /// records in, as `max_records_held` does: large records reach the
    /// memory limit long before the records cap.
    pub max_held_bytes: usize,
    /// Appends `partition offset` for every processed record (verification).
    pub audit_log: Option<PathBuf>,
    /// `auto.offset.reset` for partitions without a committed offset.
    pub offset_reset: OffsetReset,
    /// The group protocol; a `group.protocol` pass-through property wins.
    pub group_protocol: GroupProtocol,
    /// `group` names a share group (KIP-932): any number of members take
    /// records of the same partitions, each acquired under a lock and
    /// accepted one by one, in no order (docs/share-groups.md).
    pub share_group: bool,
}

/// What the pipeline needs: batching, ordering, slots, caps and deadlines
/// (see [`WorkerConfig`] for each field); no connection settings.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub topic: String,
    pub batch: BatchLimits,
    pub ordering: Ordering,
    pub concurrency: usize,
    pub commit_interval: Duration,
    pub max_uncommitted: Option<Duration>,
    pub max_uncommitted_records: usize,
    pub drain_timeout: Duration,
    pub retry: RetryPolicy,
    pub health_scope: HealthScope,
    pub health_scope_hold: Duration,
    pub max_records_per_partition: usize,
    pub max_records_held: usize,
    pub max_held_bytes: usize,
}

impl PipelineConfig {
    /// How long finished records may wait uncommitted before their partition
    /// starts no new batches: `--max-uncommitted-ms`, by default one and a
    /// half commit intervals (a commit is sent every interval; the half
    /// leaves room for its acknowledgement). `None`: no limit.
    pub fn uncommitted_limit(&self) -> Option<Duration> {
        match self.max_uncommitted {
            None => Some(self.commit_interval * 3 / 2),
            Some(limit) if limit.is_zero() => None,
            Some(limit) => Some(limit),
        }
    }

    /// Processing slots one partition may use at once under the ordering mode.
    pub fn slots_per_partition(&self) -> usize {
        match self.ordering {
            Ordering::Partition => 1,
            Ordering::Key | Ordering::None => self.concurrency,
        }
    }

    /// The most records the slots hold at once: `--concurrency` full batches.
    pub fn max_records_in_flight(&self) -> usize {
        self.concurrency * self.batch.max_records
    }
}

/// The dead-letter topic and how to create it when it is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterConfig {
    pub topic: String,
    /// Partitions of a topic created at start; `None`: the source topic's count.
    pub partitions: Option<i32>,
    /// Replication factor of a topic created at start; `None`: the broker's default.
    pub replication_factor: Option<i32>,
    /// Whether a missing topic is created at start (else the worker stops).
    pub create: bool,
}

impl DeadLetterConfig {
    /// `<topic>.dlq`, created when missing with the defaults above.
    pub fn for_topic(topic: &str) -> Self {
        Self {
            topic: format!("{topic}.dlq"),
            partitions: None,
            replication_factor: None,
            create: true,
        }
    }
}

/// The consumer group protocol: `classic` (the client-side assignor,
/// cooperative-sticky here, with JoinGroup/SyncGroup rounds) or `consumer`
/// (KIP-848: the broker assigns partitions and revokes only those that move;
/// Kafka 4.0+ brokers, MSK 4.x).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupProtocol {
    Classic,
    Consumer,
}

impl GroupProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Consumer => "consumer",
        }
    }
}

impl FromStr for GroupProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "classic" => Ok(Self::Classic),
            "consumer" => Ok(Self::Consumer),
            _ => Err("expected classic or consumer".into()),
        }
    }
}

impl fmt::Display for GroupProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a partition without a committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    Earliest,
    Latest,
}

impl FromStr for OffsetReset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "earliest" => Ok(Self::Earliest),
            "latest" => Ok(Self::Latest),
            _ => Err("expected earliest or latest".into()),
        }
    }
}

impl OffsetReset {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Earliest => "earliest",
            Self::Latest => "latest",
        }
    }
}

impl fmt::Display for OffsetReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl WorkerConfig {
    /// A config with the documented defaults, for library users and tests.
    pub fn new(kafka: KafkaConfig, topic: impl Into<String>, group: impl Into<String>) -> Self {
        Self {
            kafka,
            topic: topic.into(),
            group: group.into(),
            batch: BatchLimits {
                max_records: defaults::MAX_RECORDS,
                max_bytes: defaults::MAX_BYTES,
                max_wait: Duration::from_millis(defaults::MAX_WAIT_MS),
            },
            ordering: defaults::ORDERING,
            concurrency: defaults::CONCURRENCY,
            commit_interval: Duration::from_millis(defaults::COMMIT_INTERVAL_MS),
            max_uncommitted: None,
            max_uncommitted_records: defaults::MAX_UNCOMMITTED_RECORDS,
            drain_timeout: Duration::from_millis(defaults::DRAIN_TIMEOUT_MS),
            handler_timeout: Duration::from_millis(defaults::HANDLER_TIMEOUT_MS),
            retry: RetryPolicy::default(),
            health_scope: HealthScope::default(),
            health_scope_hold: Duration::from_millis(defaults::HEALTH_SCOPE_HOLD_MS),
            dlq: None,
            max_records_per_partition: defaults::MAX_RECORDS_PER_PARTITION,
            max_records_held: defaults::MAX_RECORDS_HELD,
            max_held_bytes: defaults::MAX_HELD_BYTES,
            audit_log: None,
            offset_reset: defaults::OFFSET_RESET,
            group_protocol: defaults::GROUP_PROTOCOL,
            share_group: false,
        }
    }

    /// A share group's rules: no order to keep, dead letters on, and
    /// --max-attempts far enough below Kafka's delivery limit.
    fn validate_share_group(&self) -> Result<(), ConfigError> {
        if self.ordering != Ordering::None {
            return Err(ConfigError::new(
                "--ordering",
                format!(
                    "{} cannot be kept with a share group: the broker hands any record \
                     to any member, in no order; use --ordering none, or a consumer \
                     group (--group) for partition or key order",
                    self.ordering
                ),
            ));
        }
        // At least one delivery past the dead letter's: a worker stopped or
        // killed while writing it leaves the record to the next delivery,
        // not to the broker's archive.
        if self.share_delivery_limit_floor() > SHARE_DELIVERY_LIMIT_MAX {
            return Err(ConfigError::new(
                "--max-attempts",
                format!(
                    "must be at most {} with a share group: a record delivered more often \
                     is dead-lettered, and Kafka archives it unseen after {} deliveries",
                    SHARE_DELIVERY_LIMIT_MAX - 2,
                    SHARE_DELIVERY_LIMIT_MAX
                ),
            ));
        }
        if self.dlq.is_none() {
            return Err(ConfigError::new(
                "--dlq",
                "off cannot be used with a share group: a record that fails for good \
                 would stop worker after worker until the broker archives it unseen; \
                 keep --dlq on, or use a consumer group (--group)",
            ));
        }
        Ok(())
    }

    /// The share group's `share.delivery.count.limit`: Kafka's most, so that
    /// the worker, not the broker, decides a record's end: a record
    /// delivered more than --max-attempts times is dead-lettered
    /// ([`crate::pipeline::Pipeline::handle_delivered_too_often`]) with
    /// deliveries to spare, never archived silently. The same for every
    /// worker, whatever its --max-attempts.
    pub fn share_delivery_limit(&self) -> u32 {
        SHARE_DELIVERY_LIMIT_MAX
    }

    /// The lowest `share.delivery.count.limit` that leaves this worker a
    /// delivery past the one it dead-letters on (`--max-attempts` + 2).
    pub fn share_delivery_limit_floor(&self) -> u32 {
        self.retry.max_attempts.saturating_add(2)
    }

    pub fn validate(mut self) -> Result<Self, ConfigError> {
        self.kafka = self.kafka.validate()?;
        if let Some((_, v)) = self
            .kafka
            .properties
            .iter()
            // librdkafka applies the last of a key given twice.
            .rfind(|(k, _)| k == "group.protocol")
        {
            self.group_protocol = v.parse().map_err(|e: String| {
                ConfigError::new("--kafka-property", format!("group.protocol: {e}"))
            })?;
        }
        if self.group_protocol == GroupProtocol::Consumer {
            if let Some((k, _)) = self
                .kafka
                .properties
                .iter()
                .find(|(k, _)| CLASSIC_ONLY_PROPERTIES.contains(&k.as_str()))
            {
                return Err(ConfigError::new(
                    "--kafka-property",
                    format!(
                        "{k} is the broker's under --group-protocol consumer \
                         (group.consumer.* settings); drop it, or use --group-protocol classic"
                    ),
                ));
            }
        }
        if self.topic.trim().is_empty() {
            return Err(ConfigError::new("--topic", "must not be empty"));
        }
        if let Err(why) = one_topic(&self.topic) {
            return Err(ConfigError::new("--topic", why));
        }
        let group_flag = if self.share_group {
            "--share-group"
        } else {
            "--group"
        };
        if self.group.trim().is_empty() {
            return Err(ConfigError::new(group_flag, "must not be empty"));
        }
        if !self.share_group {
            if let Some(why) = microbatch_kafka::capacity_report::reserved_group_name(&self.group) {
                return Err(ConfigError::new("--group", why));
            }
        }
        if self.share_group {
            self.validate_share_group()?;
        }
        if self.concurrency == 0 {
            return Err(ConfigError::new("--concurrency", "must be at least 1"));
        }
        if self.max_records_per_partition < self.batch.max_records {
            return Err(ConfigError::new(
                "--max-records-per-partition",
                format!(
                    "must be at least --max-records ({})",
                    self.batch.max_records
                ),
            ));
        }
        if self.max_records_held < self.max_records_per_partition {
            return Err(ConfigError::new(
                "--max-records-held",
                "must be at least --max-records-per-partition",
            ));
        }
        if self.max_held_bytes == 0 {
            return Err(ConfigError::new("--max-held-bytes", "must be at least 1"));
        }
        if self.retry.max_attempts == 0 {
            return Err(ConfigError::new("--max-attempts", "must be at least 1"));
        }
        if self.retry.initial > self.retry.max {
            return Err(ConfigError::new(
                "--retry-initial-ms",
                "must not exceed --retry-max-ms",
            ));
        }
        if self.commit_interval.is_zero() {
            return Err(ConfigError::new(
                "--commit-interval-ms",
                "must be at least 1",
            ));
        }
        if self
            .max_uncommitted
            .is_some_and(|m| !m.is_zero() && m < self.commit_interval)
        {
            return Err(ConfigError::new(
                "--max-uncommitted-ms",
                "must be 0 (no limit) or at least --commit-interval-ms",
            ));
        }
        if let Some(dlq) = &self.dlq {
            if dlq.partitions.is_some_and(|p| p < 1) {
                return Err(ConfigError::new("--dlq-partitions", "must be at least 1"));
            }
            if dlq.replication_factor.is_some_and(|r| r < 1) {
                return Err(ConfigError::new(
                    "--dlq-replication-factor",
                    "must be at least 1",
                ));
            }
            if dlq.topic.trim().is_empty() {
                return Err(ConfigError::new("--dlq-topic", "must not be empty"));
            }
        }
        if self.dlq.as_ref().is_some_and(|d| d.topic == self.topic) {
            return Err(ConfigError::new(
                "--dlq-topic",
                "must differ from --topic, or failures would loop",
            ));
        }
        Ok(self)
    }

    /// What the pipeline needs of this configuration (no credentials).
    pub fn pipeline(&self) -> PipelineConfig {
        PipelineConfig {
            topic: self.topic.clone(),
            batch: self.batch,
            ordering: self.ordering,
            concurrency: self.concurrency,
            commit_interval: self.commit_interval,
            max_uncommitted: self.max_uncommitted,
            max_uncommitted_records: self.max_uncommitted_records,
            drain_timeout: self.drain_timeout,
            retry: self.retry,
            health_scope: self.health_scope.clone(),
            health_scope_hold: self.health_scope_hold,
            max_records_per_partition: self.max_records_per_partition,
            max_records_held: self.max_records_held,
            max_held_bytes: self.max_held_bytes,
        }
    }

    /// See [`PipelineConfig::uncommitted_limit`].
    pub fn uncommitted_limit(&self) -> Option<Duration> {
        self.pipeline().uncommitted_limit()
    }

    /// See [`PipelineConfig::slots_per_partition`].
    pub fn slots_per_partition(&self) -> usize {
        self.pipeline().slots_per_partition()
    }

    /// A warning for caps that make a paused partition wait: below
    /// lanes × `--max-records` a partition can be paused with every record
    /// in a batch still open, and those close only after `--max-wait-ms`.
    pub fn backpressure_warning(&self) -> Option<String> {
        let enough = self.slots_per_partition() * self.batch.max_records;
        (self.max_records_per_partition < enough).then(|| {
            format!(
                "--max-records-per-partition {} is below {} lanes x --max-records {} = {enough}: \
                 a paused partition's open batches then wait --max-wait-ms ({} ms) to close",
                self.max_records_per_partition,
                self.slots_per_partition(),
                self.batch.max_records,
                self.batch.max_wait.as_millis()
            )
        })
    }

    /// See [`PipelineConfig::max_records_in_flight`].
    pub fn max_records_in_flight(&self) -> usize {
        self.pipeline().max_records_in_flight()
    }

    /// A `--max-uncommitted-records` below what the slots hold at once
    /// keeps some of them idle.
    pub fn records_cap_warning(&self) -> Option<String> {
        let in_flight = self.max_records_in_flight();
        let cap = self.max_uncommitted_records;
        (cap > 0 && cap < in_flight).then(|| {
            format!(
                "--max-uncommitted-records {cap} is below --concurrency {} x --max-records {} = \
                 {in_flight}: not every slot can be busy at once",
                self.concurrency, self.batch.max_records
            )
        })
    }
}

/// A worker consumes one topic, named exactly: its capacity reports, its
/// dead-letter topic and the scaler's triggers are all per topic. A list,
/// or a pattern (librdkafka subscribes to every topic matching a name that
/// starts with `^`), would mix topics under one of each.
fn one_topic(topic: &str) -> Result<(), String> {
    if topic.contains(',') || topic.starts_with('^') {
        return Err(format!(
            "one topic per worker, got {topic:?}: a list or a pattern would put several topics' \
             work under one capacity report and one dead-letter topic; run a worker per topic"
        ));
    }
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if topic.len() > 249 || topic == "." || topic == ".." || !topic.chars().all(legal) {
        return Err(format!(
            "{topic:?} is not a Kafka topic name (letters, digits, '.', '_' and '-', at most 249)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's capacity reports and dead-letter topic are per topic:
    /// a list or a pattern in --topic is refused, naming the flag.
    #[test]
    fn one_topic_per_worker() {
        for bad in [
            "a,b",
            "^events-.*",
            "has space",
            "x/y",
            "..",
            &"t".repeat(250),
        ] {
            let c = WorkerConfig::new(KafkaConfig::plaintext("localhost:9092"), bad, "g");
            let e = c.validate().expect_err(bad);
            assert_eq!(e.field, "--topic", "{bad}: {e}");
        }
        let fine = WorkerConfig::new(
            KafkaConfig::plaintext("localhost:9092"),
            "orders.v2_eu-1",
            "g",
        );
        assert!(fine.validate().is_ok());
    }

    #[test]
    fn a_records_cap_below_the_slots_is_warned_about() {
        let mut c = WorkerConfig::new(KafkaConfig::plaintext("localhost:9092"), "t", "g");
        c.batch.max_records = 500;
        c.concurrency = 8;
        assert_eq!(c.records_cap_warning(), None, "off by default");
        c.max_uncommitted_records = 3_999;
        let w = c.records_cap_warning().expect("3,999 < 8 x 500");
        assert!(w.contains("4000"), "{w}");
        c.max_uncommitted_records = 4_000;
        assert_eq!(c.records_cap_warning(), None);
    }

    #[test]
    fn small_per_partition_caps_are_warned_about() {
        let mut c = WorkerConfig::new(KafkaConfig::plaintext("localhost:9092"), "t", "g");
        c.batch.max_records = 500;
        c.concurrency = 8;
        c.max_records_per_partition = 2_500;
        let w = c.backpressure_warning().expect("2,500 < 8 x 500");
        assert!(w.contains("4000"), "{w}");
        c.max_records_per_partition = 4_000;
        assert_eq!(c.backpressure_warning(), None);
        c.ordering = Ordering::Partition;
        c.max_records_per_partition = 500;
        assert_eq!(c.backpressure_warning(), None);
    }

    #[test]
    fn classic_session_settings_are_refused_under_the_consumer_protocol() {
        let mut c = WorkerConfig::new(KafkaConfig::plaintext("localhost:9092"), "t", "g");
        c.kafka
            .properties
            .push(("session.timeout.ms".into(), "6000".into()));
        assert!(c.clone().validate().is_ok(), "classic takes it");
        c.group_protocol = GroupProtocol::Consumer;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("--kafka-property") && err.contains("session.timeout.ms"),
            "{err}"
        );
    }

    #[test]
    fn batch_limits_reject_zero() {
        assert_eq!(
            BatchLimits::new(0, 1, Duration::ZERO).unwrap_err().field,
            "--max-records"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            ..RetryPolicy::default()
        };
        assert_eq!(p.backoff_ceiling(1), Duration::from_millis(100));
        assert_eq!(p.backoff_ceiling(2), Duration::from_millis(200));
        assert_eq!(p.backoff_ceiling(4), Duration::from_millis(800));
        assert_eq!(p.backoff_ceiling(5), Duration::from_millis(1000));
        assert_eq!(p.backoff_ceiling(60), Duration::from_millis(1000));
    }
}
