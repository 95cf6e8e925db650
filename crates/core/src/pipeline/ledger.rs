//! The commit ledger of one partition: which commits are on their way, what
//! the broker acknowledged, and since when finished work has waited for a
//! commit (a crash now would replay it).
//!
//! A consumer group acknowledges by moving one watermark per partition:
//! everything below it is done. The pipeline asks the ledger three things:
//! what a crash would replay ([`Ledger::replayable`]), what to send now
//! ([`Ledger::send`]) and how long finished work has waited
//! ([`Ledger::waited_too_long`]). A share group acknowledges records one by
//! one (accept, release, reject) instead: its ledger keeps per-record
//! acknowledgements and answers the same three questions, beside this one.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::offsets::PartitionOffsets;

/// Commits remembered per partition while unacknowledged (async commits
/// overlap only when the broker is slow; older ones are superseded).
const MAX_COMMITS_REMEMBERED: usize = 16;

#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// The offset of the latest commit the broker acknowledged: what it holds.
    acked: Option<i64>,
    /// Commits sent and not acknowledged yet: (offset, when sent).
    sent: VecDeque<(i64, Instant)>,
    /// Since when records below the watermark wait for the broker to
    /// acknowledge their commit; a crash now would replay them.
    unacked_since: Option<Instant>,
    /// Since when done records wait above a watermark that has not moved,
    /// for an unfinished record (a retry, a dead letter being written); a
    /// crash would replay them.
    held_back_since: Option<Instant>,
}

/// How long each kind of finished work has waited past a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Overdue {
    /// Records below the watermark wait for an acknowledgement.
    pub unacked: bool,
    /// Done records wait above a watermark that does not move.
    pub held_back: bool,
}

impl Ledger {
    /// Whether the watermark lies past what the broker acknowledged.
    pub fn watermark_unacked(&self, offsets: &PartitionOffsets) -> bool {
        let Some(wm) = offsets.watermark() else {
            return false;
        };
        self.acked.or(offsets.first_seen()).is_some_and(|a| wm > a)
    }

    /// Finished records a crash now would replay: those done at or past
    /// the last commit the broker acknowledged.
    pub fn replayable(&self, offsets: &PartitionOffsets) -> usize {
        let Some(wm) = offsets.watermark() else {
            return 0;
        };
        let base = self.acked.or(offsets.first_seen()).unwrap_or(wm);
        usize::try_from(wm - base).unwrap_or(0) + offsets.done_above_watermark()
    }

    /// Whether a commit sent now would cover more than the broker has
    /// acknowledged, with none on its way: commits wait in line at the
    /// coordinator, so one that waits for the one before it would carry an
    /// older watermark than one sent when that is acknowledged.
    pub fn commit_due_early(&self, offsets: &PartitionOffsets) -> bool {
        self.sent.is_empty() && self.watermark_unacked(offsets)
    }

    /// Which waits have lasted longer than `limit` at `now`.
    pub fn waited_too_long(&self, now: Instant, limit: Duration) -> Overdue {
        let over = |since: Option<Instant>| {
            since.is_some_and(|at| now.saturating_duration_since(at) > limit)
        };
        Overdue {
            unacked: over(self.unacked_since),
            held_back: over(self.held_back_since),
        }
    }

    /// Records were marked done; `watermark_before` is the watermark before.
    pub fn done(
        &mut self,
        offsets: &PartitionOffsets,
        watermark_before: Option<i64>,
        now: Instant,
    ) {
        if self.watermark_unacked(offsets) {
            self.unacked_since.get_or_insert(now);
        }
        // Held back since the watermark last moved: under key order, lanes
        // finish out of order all the time, and only a watermark that stays
        // put means a record in front is stuck.
        if offsets.done_above_watermark() == 0 {
            self.held_back_since = None;
        } else if offsets.watermark() != watermark_before {
            self.held_back_since = Some(now);
        } else {
            self.held_back_since.get_or_insert(now);
        }
    }

    /// Whether `offset` would be taken as an acknowledgement that moved the
    /// committed offset back.
    pub fn goes_back(&self, offset: i64) -> bool {
        self.acked.is_some_and(|a| offset < a)
    }

    /// The broker acknowledged a commit of `offset`. The latest
    /// acknowledgement is what the broker holds: one older than an earlier
    /// one (a commit retried after a coordinator outage, applied after a
    /// newer one) moved the committed offset back, and the next commit
    /// sends the watermark again.
    pub fn acknowledged(&mut self, offsets: &PartitionOffsets, offset: i64, now: Instant) {
        let went_back = self.goes_back(offset);
        self.acked = Some(offset);
        if went_back {
            self.unacked_since.get_or_insert(now);
        }
        // What was done when the acknowledged commit was sent is safe; what
        // is unacknowledged now was done after it was sent.
        let mut sent_at = None;
        while self.sent.front().is_some_and(|(o, _)| *o <= offset) {
            sent_at = self.sent.pop_front().map(|(_, at)| at);
        }
        if !self.watermark_unacked(offsets) {
            self.unacked_since = None;
        } else if let Some(at) = sent_at {
            self.unacked_since = Some(at);
        }
    }

    /// The offset to commit now, `upto` (the watermark), unless the broker
    /// holds it already; recorded as sent.
    pub fn send(&mut self, upto: i64, now: Instant) -> Option<i64> {
        if self.acked.is_some_and(|a| a >= upto) {
            return None;
        }
        if self.sent.len() == MAX_COMMITS_REMEMBERED {
            self.sent.pop_front();
        }
        self.sent.push_back((upto, now));
        Some(upto)
    }
}
