//! Commits, the pipeline's side: what to commit of which partitions, and the
//! broker's acknowledgements, kept in each partition's [`Ledger`].
//!
//! [`Ledger`]: super::ledger::Ledger

use std::time::{Duration, Instant};

use super::partition::PartitionState;
use super::{Acknowledgement, Intent, Phase, Pipeline};

/// How long after a refusal a final commit is tried again.
pub const FINAL_COMMIT_RETRY: Duration = Duration::from_millis(100);

/// Why the broker refused a commit, as far as the pipeline cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitRefusal {
    /// The group is between generations or its coordinator is moving
    /// (rebalance in progress, stale epoch, coordinator not available):
    /// the same commit succeeds once the group settles.
    GroupBusy,
    /// Anything else.
    Other,
}

impl Pipeline {
    /// The broker acknowledged a commit of `offset` (the next offset) for
    /// `partition`. The latest acknowledgement is what the broker holds: one
    /// older than an earlier one (a commit retried after a coordinator
    /// outage, applied after a newer one) moved the committed offset back,
    /// and the next interval commits the watermark again.
    pub fn handle_committed(&mut self, partition: i32, offset: i64) {
        let Some(ps) = self.partitions.get_mut(&partition) else {
            return;
        };
        let went_back = ps.ledger.goes_back(offset);
        if went_back && self.sabotage.keep_highest_ack() {
            return;
        }
        if went_back {
            tracing::debug!(
                partition,
                offset,
                "an older commit was acknowledged last; committing again"
            );
        }
        ps.ledger.acknowledged(&ps.offsets, offset, self.clock);
    }

    /// The broker refused a commit (`sync`: one of the synchronous commits
    /// asked for at the end). While consuming, the next interval commits
    /// again. After [`Self::close`], a final commit refused because the
    /// group is busy (under the classic protocol the broker refuses commits
    /// while the group rebalances, as when another worker stops at the
    /// same moment) is tried again [`FINAL_COMMIT_RETRY`] later until it is
    /// acknowledged or the drain deadline passes: leaving then would hand
    /// records that are done to the next owner as not done. The worker
    /// keeps serving the group meanwhile, so the rebalance can end. A late
    /// answer to an interval's asynchronous commit says nothing about the
    /// final one and changes nothing.
    pub fn handle_commit_refused(&mut self, refusal: CommitRefusal, sync: bool, now: Instant) {
        self.clock = self.clock.max(now);
        if !sync {
            return;
        }
        if self.phase != Phase::Closed
            || refusal != CommitRefusal::GroupBusy
            || !self.final_commit_unacked(now)
        {
            self.final_commit_retry_at = None;
            return;
        }
        if self.final_commit_retry_at.is_none() {
            tracing::info!("the final commit was refused; trying again while the group rebalances");
        }
        self.final_commit_retry_at = Some(now + FINAL_COMMIT_RETRY);
    }

    /// Whether, after `close`, done work is still unacknowledged while the
    /// drain deadline allows another try.
    pub(super) fn final_commit_unacked(&self, now: Instant) -> bool {
        self.phase == Phase::Closed
            && self.final_commit_until.is_some_and(|until| now < until)
            && self
                .partitions
                .values()
                .any(PartitionState::watermark_unacked)
    }

    /// After `close`: commits again, synchronously, what the broker has not
    /// acknowledged, once a refused final commit's retry is due.
    pub(super) fn retry_final_commit_when_due(&mut self, now: Instant) {
        let Some(at) = self.final_commit_retry_at else {
            return;
        };
        if now < at {
            return;
        }
        self.final_commit_retry_at = None;
        if self.final_commit_unacked(now) {
            self.commit(true, |_| true);
        }
    }

    /// Emits a commit of every chosen partition whose watermark moved past
    /// what the broker acknowledged.
    pub(super) fn commit(&mut self, sync: bool, choose: impl Fn(&PartitionState) -> bool) {
        let extra = i64::from(self.sabotage.commit_one_past());
        let now = self.clock;
        let offsets: Vec<(i32, i64)> = self
            .partitions
            .iter_mut()
            .filter(|(_, ps)| choose(ps))
            .filter_map(|(p, ps)| {
                let wm = ps.offsets.watermark()? + extra;
                ps.ledger.send(wm, now).map(|wm| (*p, wm))
            })
            .collect();
        if !offsets.is_empty() {
            // A share group's reports go out on their own (ReportCapacity).
            let metadata = if self.acknowledgement == Acknowledgement::PerRecord {
                String::new()
            } else {
                self.capacity
                    .report(now, self.wall_ms(now) as u64)
                    .map(|r| r.encode())
                    .unwrap_or_default()
            };
            self.intents.push_back(Intent::Commit {
                offsets,
                sync,
                metadata,
            });
        }
    }
}
