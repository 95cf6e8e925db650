//! Commits, the pipeline's side: what to commit of which partitions, and the
//! broker's acknowledgements, kept in each partition's [`Ledger`].
//!
//! [`Ledger`]: super::ledger::Ledger

use super::partition::PartitionState;
use super::{Intent, Pipeline};

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
            let metadata = self
                .capacity
                .report(now, self.wall_ms(now) as u64)
                .map(|r| r.encode())
                .unwrap_or_default();
            self.intents.push_back(Intent::Commit {
                offsets,
                sync,
                metadata,
            });
        }
    }
}
