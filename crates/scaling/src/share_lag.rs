//! A share group's backlog as the policies read lag.
//!
//! In a share group every member takes records from every partition, so
//! the backlog of a partition is no one member's: replicas are not capped
//! by the partition count ([`GroupLag::shared`]). What a policy calls the
//! committed offset is the high watermark less the backlog, which moves as
//! records are acknowledged, so progress (and an outage's lack of it) and
//! the processed rate read as they do for a consumer group.
//!
//! There is no commit metadata in a share group, so the workers' capacity
//! reports do not reach the policy: `rate` learns capacity from progress
//! while the backlog grows.

use std::sync::Arc;
use std::time::Duration;

use microbatch_kafka::share::backlog::{self, ShareBacklog};
use microbatch_kafka::share::cluster::Connector;
use microbatch_kafka::share::ShareError;

use crate::lag::{GroupLag, InvalidOffsetPolicy, PartitionLag};

/// `b` in a policy's terms. A partition the broker has no state for yet
/// (no member fetched from it) counts as `policy` says a partition without
/// a committed offset does; its low watermark is not read, so `earliest`
/// counts every record below the high watermark.
pub fn backlog_as_lag(b: &ShareBacklog, policy: InvalidOffsetPolicy) -> GroupLag {
    let partitions = b
        .partitions
        .iter()
        .map(|p| {
            let done = p.backlog.map(|backlog| p.high.saturating_sub(backlog));
            PartitionLag::compute(p.partition, done, 0, p.high, policy)
        })
        .collect();
    let mut lag = GroupLag::new(&b.share_group, &b.topic, partitions);
    lag.shared = true;
    lag
}

/// Reads one share group's backlog on one topic, from synchronous code.
pub struct ShareLagReader {
    connector: Arc<dyn Connector>,
    bootstrap: Vec<String>,
    group: String,
    topic: String,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
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
    use microbatch_kafka::share::backlog::partition_backlog;

    #[test]
    fn backlog_reads_as_lag_and_unknown_partitions_follow_the_reset_policy() {
        let b = ShareBacklog {
            share_group: "s".into(),
            topic: "t".into(),
            members: 3,
            total_backlog: 40,
            partitions_unknown: 1,
            backlog_source: backlog::SOURCE_BROKER_LAG,
            partitions: vec![
                partition_backlog(0, 100, Some(40), 500),
                partition_backlog(1, -1, None, 70),
            ],
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
    }
}
