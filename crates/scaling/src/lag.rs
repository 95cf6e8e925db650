//! Consumer-group lag, measured the way KEDA measures it, minus its blind spot.
//!
//! **Lag** of a partition = high watermark − max(committed, low watermark), so
//! records that retention already deleted are not lag. A partition without a
//! committed offset follows the reset policy, as KEDA's kafka scaler does:
//! `earliest`: high − low; `latest`: 1, or 0 with `scale_to_zero_on_invalid`.

use std::time::{Duration, Instant};

use microbatch_core::config::KafkaConfig;
use microbatch_core::kafka::{ClientError, QuietContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

/// What a partition without a committed offset counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum InvalidOffsetPolicy {
    /// Everything retained is lag (KEDA `offsetResetPolicy: earliest`).
    Earliest,
    /// One record of lag, or none with `scale_to_zero` (KEDA's `latest`).
    Latest { scale_to_zero: bool },
}

/// One partition's offsets and lag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    pub partition: i32,
    /// `None` when the group has no committed offset for the partition.
    pub committed: Option<i64>,
    pub low: i64,
    pub high: i64,
    pub lag: i64,
}

impl PartitionLag {
    pub fn compute(
        partition: i32,
        committed: Option<i64>,
        low: i64,
        high: i64,
        policy: InvalidOffsetPolicy,
    ) -> Self {
        let lag = match (committed, policy) {
            (Some(c), _) => (high - c.max(low)).max(0),
            (None, InvalidOffsetPolicy::Earliest) => (high - low).max(0),
            (
                None,
                InvalidOffsetPolicy::Latest {
                    scale_to_zero: true,
                },
            ) => 0,
            (
                None,
                InvalidOffsetPolicy::Latest {
                    scale_to_zero: false,
                },
            ) => 1,
        };
        Self {
            partition,
            committed,
            low,
            high,
            lag,
        }
    }
}

/// A group's lag on one topic at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupLag {
    pub group: String,
    pub topic: String,
    pub total_lag: i64,
    pub partitions: Vec<PartitionLag>,
    /// The committed offsets' metadata strings (workers' capacity reports).
    #[serde(skip)]
    pub commit_metadata: Vec<String>,
}

impl GroupLag {
    pub fn new(group: &str, topic: &str, partitions: Vec<PartitionLag>) -> Self {
        Self {
            group: group.to_string(),
            topic: topic.to_string(),
            total_lag: partitions.iter().map(|p| p.lag).sum(),
            partitions,
            commit_metadata: Vec::new(),
        }
    }

    pub fn partitions_with_lag(&self) -> usize {
        self.partitions.iter().filter(|p| p.lag > 0).count()
    }

    /// Records appended to the topic in all (sum of high watermarks).
    pub fn total_high(&self) -> i64 {
        self.partitions.iter().map(|p| p.high).sum()
    }

    /// Records the group has committed past, in all (what a consumed rate is
    /// measured from); partitions without a commit count from their low mark.
    pub fn total_consumed_position(&self) -> i64 {
        self.partitions
            .iter()
            .map(|p| p.committed.unwrap_or(p.low).max(p.low))
            .sum()
    }
}

/// Reads committed offsets and watermarks for a group; one client, reused.
pub struct LagReader {
    consumer: BaseConsumer<QuietContext>,
    servers: String,
    group: String,
    topic: String,
    timeout: Duration,
}

impl LagReader {
    pub fn new(
        kafka: &KafkaConfig,
        group: &str,
        topic: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let consumer: BaseConsumer<QuietContext> = kafka
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create_with_context(QuietContext::default())?;
        Ok(Self {
            consumer,
            servers: kafka.bootstrap_servers.clone(),
            group: group.to_string(),
            topic: topic.to_string(),
            timeout,
        })
    }

    fn classify(&self, e: rdkafka::error::KafkaError) -> ClientError {
        // Client errors arrive as events; serve them so an authentication
        // failure is told as such, not as a transport failure.
        for _ in 0..20 {
            let _ = self.consumer.poll(Duration::from_millis(5));
            if self.consumer.context().auth_error().is_some() {
                break;
            }
        }
        if let Some(reason) = self.consumer.context().auth_error() {
            return ClientError::Authentication(reason);
        }
        match ClientError::classify(e, &self.servers) {
            ClientError::UnknownTopic { .. } => ClientError::UnknownTopic {
                topic: self.topic.clone(),
            },
            other => other,
        }
    }

    /// The topic's partition ids.
    pub fn partitions(&self) -> Result<Vec<i32>, ClientError> {
        let md = self
            .consumer
            .fetch_metadata(Some(&self.topic), self.timeout)
            .map_err(|e| self.classify(e))?;
        let topic = md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .ok_or_else(|| ClientError::UnknownTopic {
                topic: self.topic.clone(),
            })?;
        if topic.error().is_some() || topic.partitions().is_empty() {
            return Err(ClientError::UnknownTopic {
                topic: self.topic.clone(),
            });
        }
        let mut ids: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Members of the group now (None when the broker cannot list groups,
    /// as librdkafka's mock cluster cannot).
    pub fn members(&self) -> Option<usize> {
        let list = self
            .consumer
            .fetch_group_list(Some(&self.group), self.timeout)
            .ok()?;
        let group = list.groups().iter().find(|g| g.name() == self.group)?;
        Some(group.members().len())
    }

    /// Measures lag now.
    pub fn read(&self, policy: InvalidOffsetPolicy) -> Result<GroupLag, ClientError> {
        let ids = self.partitions()?;
        let mut tpl = TopicPartitionList::new();
        for p in &ids {
            tpl.add_partition(&self.topic, *p);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, self.timeout)
            .map_err(|e| self.classify(e))?;
        let watermarks = crate::watermarks::fetch(&self.consumer, &self.topic, &ids, self.timeout)
            .map_err(|e| self.classify(e))?;
        let mut partitions = Vec::with_capacity(ids.len());
        for p in ids {
            let (low, high) = watermarks[&p];
            let c = committed
                .find_partition(&self.topic, p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) if o >= 0 => Some(o),
                    _ => None,
                });
            partitions.push(PartitionLag::compute(p, c, low, high, policy));
        }
        let mut lag = GroupLag::new(&self.group, &self.topic, partitions);
        lag.commit_metadata = crate::capacity::commit_metadata(&committed);
        Ok(lag)
    }
}

/// Rates from two lag readings: records/s appended and committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    pub arrival_per_sec: f64,
    pub processed_per_sec: f64,
}

/// Turns watermark and commit progress into rates that do not depend on how
/// often they are asked for: a reading closer than [`RATE_MIN_INTERVAL`] to
/// the previous one returns the rates already known (KEDA asks GetMetrics and
/// IsActive a few ms apart, and a 4 ms interval with no commit in it would
/// read 0), and each interval weighs by its length in an exponential average
/// with time constant [`RATE_SMOOTHING`].
#[derive(Debug, Default)]
pub struct RateTracker {
    /// The reading the current interval started from: time, Σ high, Σ committed.
    base: Option<(Instant, i64, i64)>,
    smoothed: Option<Rates>,
}

/// Readings closer together than this add no interval.
pub const RATE_MIN_INTERVAL: Duration = Duration::from_millis(900);
/// Time constant of the rates' exponential average.
pub const RATE_SMOOTHING: Duration = Duration::from_secs(5);

impl RateTracker {
    pub fn observe(&mut self, at: Instant, lag: &GroupLag) -> Rates {
        let high = lag.total_high();
        let consumed = lag.total_consumed_position();
        let Some((t0, h0, c0)) = self.base else {
            self.base = Some((at, high, consumed));
            return Rates::default();
        };
        let elapsed = at.saturating_duration_since(t0);
        if elapsed < RATE_MIN_INTERVAL {
            return self.smoothed.unwrap_or_default();
        }
        self.base = Some((at, high, consumed));
        let secs = elapsed.as_secs_f64();
        let rates = Rates {
            arrival_per_sec: ((high - h0).max(0)) as f64 / secs,
            processed_per_sec: ((consumed - c0).max(0)) as f64 / secs,
        };
        let alpha = 1.0 - (-secs / RATE_SMOOTHING.as_secs_f64()).exp();
        let smoothed = match self.smoothed {
            Some(s) => Rates {
                arrival_per_sec: s.arrival_per_sec
                    + alpha * (rates.arrival_per_sec - s.arrival_per_sec),
                processed_per_sec: s.processed_per_sec
                    + alpha * (rates.processed_per_sec - s.processed_per_sec),
            },
            None => rates,
        };
        self.smoothed = Some(smoothed);
        smoothed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_deleted_records_are_not_lag() {
        let p = PartitionLag::compute(0, Some(10), 50, 80, InvalidOffsetPolicy::Earliest);
        assert_eq!(p.lag, 30);
    }

    #[test]
    fn invalid_offsets_follow_the_reset_policy() {
        assert_eq!(
            PartitionLag::compute(0, None, 5, 80, InvalidOffsetPolicy::Earliest).lag,
            75
        );
        assert_eq!(
            PartitionLag::compute(
                0,
                None,
                5,
                80,
                InvalidOffsetPolicy::Latest {
                    scale_to_zero: false
                }
            )
            .lag,
            1
        );
        assert_eq!(
            PartitionLag::compute(
                0,
                None,
                5,
                80,
                InvalidOffsetPolicy::Latest {
                    scale_to_zero: true
                }
            )
            .lag,
            0
        );
    }

    #[test]
    fn rates_come_from_progress() {
        let mut r = RateTracker::default();
        let t0 = Instant::now();
        let g = |c, h| {
            GroupLag::new(
                "g",
                "t",
                vec![PartitionLag::compute(
                    0,
                    Some(c),
                    0,
                    h,
                    InvalidOffsetPolicy::Earliest,
                )],
            )
        };
        r.observe(t0, &g(0, 100));
        let rates = r.observe(t0 + Duration::from_secs(2), &g(40, 300));
        assert!((rates.arrival_per_sec - 100.0).abs() < 1e-9, "{rates:?}");
        assert!((rates.processed_per_sec - 20.0).abs() < 1e-9);
    }

    #[test]
    fn paired_readings_a_few_ms_apart_do_not_skew_the_rates() {
        // KEDA's pattern: GetMetrics and IsActive 4 ms apart, every 15 s,
        // against one reading every 15 s; commits land between the pairs.
        let g = |c, h| {
            GroupLag::new(
                "g",
                "t",
                vec![PartitionLag::compute(
                    0,
                    Some(c),
                    0,
                    h,
                    InvalidOffsetPolicy::Earliest,
                )],
            )
        };
        let t0 = Instant::now();
        let mut single = RateTracker::default();
        let mut paired = RateTracker::default();
        let (mut last_single, mut last_paired) = (Rates::default(), Rates::default());
        for i in 0..40u64 {
            let at = t0 + Duration::from_secs(15 * i);
            let (c, h) = (i as i64 * 15_000, i as i64 * 15_000 + 500);
            last_single = single.observe(at, &g(c, h));
            paired.observe(at, &g(c, h));
            // The second call of the pair sees one more commit of 10 records.
            last_paired = paired.observe(at + Duration::from_millis(4), &g(c + 10, h + 10));
        }
        assert!(
            (last_single.processed_per_sec - 1000.0).abs() < 1.0,
            "{last_single:?}"
        );
        assert!(
            (last_paired.processed_per_sec - last_single.processed_per_sec).abs() < 1.0,
            "paired {last_paired:?} vs single {last_single:?}"
        );
        assert!((last_paired.arrival_per_sec - 1000.0).abs() < 1.0);
    }
}
