//! A share group's backlog as the policies read lag.
//!
//! In a share group every member takes records from every partition, so
//! the backlog of a partition is no one member's: replicas are not capped
//! by the partition count ([`GroupLag::shared`]). What a policy calls the
//! committed offset is the high watermark less the backlog, which moves as
//! records are acknowledged, so progress (and an outage's lack of it) and
//! the processed rate read as they do for a consumer group.
//!
//! There is no commit metadata in a share group, so its workers commit
//! their capacity reports for a companion consumer group
//! ([`share_capacity_group`]), which [`ShareLagReader::with_worker_reports`]
//! reads back; without them `rate` learns capacity from progress while the
//! backlog grows.

use std::sync::Arc;
use std::time::Duration;

use microbatch_kafka::share::backlog::{self, ShareBacklog};
use microbatch_kafka::share::cluster::Connector;
use microbatch_kafka::share::ShareError;

use microbatch_kafka::capacity_report::share_capacity_group;
use microbatch_kafka::{ClientError, KafkaConfig};

use crate::lag::{GroupLag, InvalidOffsetPolicy, LagReader, PartitionLag};

/// `b` in a policy's terms. A partition the broker has no state for yet
/// (no member fetched from it) counts as `policy` says a partition without
/// a committed offset does (`earliest`: the records retained).
pub fn backlog_as_lag(b: &ShareBacklog, policy: InvalidOffsetPolicy) -> GroupLag {
    let partitions = b
        .partitions
        .iter()
        .map(|p| {
            // What is done lies between the high watermark read before the
            // backlog and the one read after, less the backlog: the upper
            // bound makes the lag the backlog itself, the slack keeps the
            // arrivals of the reading from passing for progress.
            let done = p.backlog.map(|backlog| p.high.saturating_sub(backlog));
            let mut lag = PartitionLag::compute(p.partition, done, p.low, p.high, policy);
            if done.is_some() {
                lag.committed_slack = p.high.saturating_sub(p.high_before).max(0);
            }
            // No record ages are read: none is known, not even 0 (a
            // partition with nothing waiting would make the oldest 0).
            lag.lag_ms = None;
            lag
        })
        .collect();
    let mut lag = GroupLag::new(&b.share_group, &b.topic, partitions);
    lag.shared = true;
    lag.partitions_offline = b.partitions_offline.clone();
    lag
}

/// How long a reading waits for the records whose ages it reads, and for
/// the workers' reports: both are help, and a scaler's evaluation has 12 s.
const HELP_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads one share group's backlog on one topic, from synchronous code.
pub struct ShareLagReader {
    connector: Arc<dyn Connector>,
    bootstrap: Vec<String>,
    group: String,
    topic: String,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
    /// Reads the oldest waiting record of each partition, when ages are
    /// measured.
    ages: Option<LagReader>,
    /// Reads the workers' capacity reports: the commit metadata of the
    /// share group's companion consumer group.
    reports: Option<LagReader>,
}

impl ShareLagReader {
    /// `runtime` runs the reads; call [`Self::read`] from outside it.
    pub fn new(
        connector: Arc<dyn Connector>,
        bootstrap: Vec<String>,
        group: &str,
        topic: &str,
        timeout: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            connector,
            bootstrap,
            group: group.to_string(),
            topic: topic.to_string(),
            timeout,
            runtime,
            ages: None,
            reports: None,
        }
    }

    /// Also reads the workers' capacity reports, which they commit as
    /// metadata for the share group's companion consumer group
    /// ([`share_capacity_group`]).
    pub fn with_worker_reports(mut self, kafka: &KafkaConfig) -> Result<Self, ClientError> {
        let group = share_capacity_group(&self.group);
        self.reports = Some(LagReader::new(kafka, &group, &self.topic, HELP_TIMEOUT)?);
        Ok(self)
    }

    /// The workers' capacity reports as commit metadata strings; none when
    /// they are not read or cannot be (a report is help, not a need: the
    /// policy then learns capacity from progress).
    pub fn worker_reports(&self) -> Vec<String> {
        let Some(reader) = &self.reports else {
            return Vec::new();
        };
        match reader.read(InvalidOffsetPolicy::Earliest) {
            Ok(lag) => lag.commit_metadata,
            Err(e) => {
                tracing::debug!(error = %e, "reading the workers' capacity reports failed");
                Vec::new()
            }
        }
    }

    /// Also measures the age of each partition's oldest record not done
    /// (the record at the share-partition start offset): one fetch of one
    /// record per partition with a backlog, per reading. Its reader never
    /// joins or commits; its id is the group's with `-ages` (a consumer
    /// group may not share a share group's id).
    pub fn with_record_ages(mut self, kafka: &KafkaConfig) -> Result<Self, ClientError> {
        let id = format!("{}-ages", self.group);
        // Best effort and short: a reading waits at most this for ages. A
        // share group reads uncommitted records (share.isolation.level's
        // default), so its oldest may lie past an open transaction.
        self.ages = Some(LagReader::new_with(
            kafka,
            &id,
            &self.topic,
            HELP_TIMEOUT,
            &[("isolation.level", "read_uncommitted")],
        )?);
        Ok(self)
    }

    /// Sets `lag`'s ages from `b` when ages are measured, best effort: a
    /// partition with nothing waiting is 0 old; one with a backlog gets the
    /// age of the record at `max(start offset, high − backlog)`. The start
    /// offset the broker keeps can stay behind records already done
    /// (measured on 4.3.2), and the record at `high − backlog` is never
    /// older than the oldest waiting, so the age can read low, never high.
    /// When a partition with a backlog gets no age (its fetch timed out),
    /// the group's age is unknown, not the others' maximum.
    /// Only when the broker counts the backlog: with the fallback (high
    /// watermark − start offset) `high − backlog` is the start offset, and
    /// the start offset can stay behind records long done, so the age
    /// would grow without bound while nothing waits.
    pub fn set_ages(&self, b: &ShareBacklog, lag: &mut GroupLag) {
        let Some(reader) = &self.ages else {
            return;
        };
        if b.backlog_source != backlog::SOURCE_BROKER_LAG {
            return;
        }
        let wanted: Vec<(i32, i64)> = b
            .partitions
            .iter()
            .filter_map(|p| {
                let backlog = p.backlog.filter(|n| *n > 0)?;
                let done = p.high.saturating_sub(backlog);
                let start = p.start_offset.unwrap_or(done).max(done).max(p.low);
                Some((p.partition, start))
            })
            .collect();
        for p in &mut lag.partitions {
            if p.lag == 0 {
                p.lag_ms = Some(0);
            }
        }
        let timestamps = match reader.oldest_timestamps(&self.topic, &wanted) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "reading the share group's record ages failed");
                Default::default()
            }
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        lag.set_ages(now_ms, &timestamps);
        if lag
            .partitions
            .iter()
            .any(|p| p.lag > 0 && p.lag_ms.is_none())
        {
            lag.lag_ms = None;
        }
    }

    pub fn read(&self) -> Result<ShareBacklog, ShareError> {
        self.runtime.block_on(backlog::read(
            self.connector.clone(),
            self.bootstrap.clone(),
            &self.group,
            &self.topic,
            self.timeout,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lag::RateTracker;
    use crate::policy::{Observation, Policy, RateParams, RatePolicy};
    use microbatch_kafka::share::backlog::{partition_backlog, partition_backlog_between};
    use std::time::Instant;

    /// One reading of 8 partitions: `done` records finished on each, the
    /// high watermark `high` when the reading began, and `noise` the
    /// records arriving during it (before and after the group's offsets).
    fn reading(done: i64, high: i64, noise: &mut impl FnMut() -> i64) -> ShareBacklog {
        let partitions: Vec<_> = (0..8)
            .map(|p| {
                let (before, after) = (noise(), noise());
                let at_describe = high + before;
                partition_backlog_between(
                    p,
                    done,
                    Some(at_describe - done),
                    0,
                    high,
                    at_describe + after,
                )
            })
            .collect();
        ShareBacklog {
            share_group: "s".into(),
            topic: "t".into(),
            members: 1,
            total_backlog: partitions.iter().filter_map(|p| p.backlog).sum(),
            partitions_unknown: 0,
            partitions_offline: Vec::new(),
            backlog_source: backlog::SOURCE_BROKER_LAG,
            partitions,
            exists: true,
        }
    }

    /// Found in review: the high watermark, read after the backlog, made
    /// the arrivals of each reading look like records done, so a share
    /// group in a downstream outage was never held, and learned a capacity
    /// of a few records a second per replica from that noise: it asked for
    /// --max. Now the position counts only what even its lowest bound
    /// shows.
    #[test]
    fn the_arrivals_of_a_reading_are_not_progress() {
        let mut seed = 7u64;
        let mut noise = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) % 3) as i64
        };
        let mut policy = RatePolicy::new(RateParams {
            max_replicas: 24,
            target_drain: Duration::from_secs(30),
            initial_rate_per_replica: 100.0,
            ..RateParams::default()
        });
        let mut rates = RateTracker::default();
        let t0 = Instant::now();
        let (mut done, mut high) = (0i64, 0i64);
        let mut held = false;
        for s in 0..120u64 {
            // 60/s arrive; for 20 s one replica keeps up, then its
            // downstream is gone and nothing is acknowledged.
            high += 60 / 8;
            if s < 20 {
                done = high;
            }
            let b = reading(done, high, &mut noise);
            let lag = backlog_as_lag(&b, InvalidOffsetPolicy::Earliest);
            let at = t0 + Duration::from_secs(s);
            let observed = rates.observe(at, &lag);
            let d = policy.decide(
                at,
                &Observation {
                    lag: &lag,
                    rates: observed,
                    capacity: None,
                    current: 1,
                },
            );
            // Decayed from the healthy 60/s (5 s time constant): no noise
            // keeps it up.
            if s >= 60 {
                assert!(observed.processed_per_sec < 1.0, "second {s}: {observed:?}");
            }
            assert_eq!(d.desired, 1, "second {s}: {}", d.reason);
            held |= d.scale_up_held;
        }
        assert!(held, "the outage is held");
    }

    #[test]
    fn backlog_reads_as_lag_and_unknown_partitions_follow_the_reset_policy() {
        let mut b = ShareBacklog {
            share_group: "s".into(),
            topic: "t".into(),
            members: 3,
            total_backlog: 40,
            partitions_unknown: 1,
            partitions_offline: Vec::new(),
            backlog_source: backlog::SOURCE_BROKER_LAG,
            partitions: vec![
                partition_backlog(0, 100, Some(40), 500),
                partition_backlog(1, -1, None, 70),
            ],
            exists: true,
        };
        let lag = backlog_as_lag(&b, InvalidOffsetPolicy::Earliest);
        assert!(lag.shared);
        assert_eq!(lag.partitions[0].committed, Some(460));
        assert_eq!(lag.partitions[0].lag, 40);
        assert_eq!(
            lag.partitions[1].lag, 70,
            "no state yet: all of it, under earliest"
        );
        assert_eq!(lag.total_lag, 110);
        let latest = InvalidOffsetPolicy::Latest {
            scale_to_zero: true,
        };
        assert_eq!(backlog_as_lag(&b, latest).total_lag, 40);
        // Records arriving while it was read: the position is known within
        // them; a low watermark bounds a new partition's records.
        b.partitions = vec![
            partition_backlog_between(0, 100, Some(40), 0, 495, 500),
            partition_backlog_between(1, -1, None, 50, 70, 70),
        ];
        let lag = backlog_as_lag(&b, InvalidOffsetPolicy::Earliest);
        assert_eq!(lag.partitions[0].committed_slack, 5);
        assert_eq!(lag.partitions[0].lag, 40);
        assert_eq!(lag.partitions[1].lag, 20, "retention took the first 50");
    }
}
