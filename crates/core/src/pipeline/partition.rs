//! One partition's state: its lanes, its offsets and commit ledger, what it
//! holds, its dead letters, and whether it is still ours or being given up.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use crate::batch::{Batch, Batcher};
use crate::config::{BatchLimits, Ordering};
use crate::offsets::PartitionOffsets;

use super::dead_letters::PendingDeadLetter;
use super::ledger::Ledger;

#[derive(Debug)]
pub(super) struct Lane {
    pub batcher: Batcher,
    /// Closed batches waiting for this lane's slot, oldest first.
    pub ready: VecDeque<Batch>,
    /// Failed records to try again, with when; they go before `ready`.
    pub retry: VecDeque<(Batch, Instant)>,
    /// When the batch in this lane's slot started, while one is in flight.
    pub in_flight_since: Option<Instant>,
    /// A record held for its key's proof is retried here no sooner than
    /// this: a tenant's held records, each retried on its own timer,
    /// took every slot from the other tenants (found in the pipeline test).
    pub scope_retry_at: Option<Instant>,
}

impl Lane {
    /// While fresh batches may go ahead of the retries waiting in this
    /// lane, when the next of them may start: when it is due, and no sooner
    /// than the lane's spacing, or when a hold ends, whichever comes first
    /// (the record is then judged as any other). They may while those
    /// retries are records held for their key's (tenant's) proof: the one
    /// at the front under `--ordering none`; every one where order is kept,
    /// or a healthy key's retried record would be overtaken by its own later
    /// records (found in review).
    pub fn scope_wait(&self, now: Instant, keep_order: bool) -> Option<Instant> {
        let (front, due) = self.retry.front()?;
        let hold_ends = |b: &Batch| {
            b.lineage
                .scope_hold
                .filter(|_| b.lineage.held_for_scope(now))
                .map(|h| h.until)
        };
        let first_end = if keep_order {
            let mut first: Option<Instant> = None;
            for (b, _) in &self.retry {
                let end = hold_ends(b)?;
                first = Some(first.map_or(end, |f| f.min(end)));
            }
            first?
        } else {
            hold_ends(front)?
        };
        let spaced = self.scope_retry_at.map_or(*due, |at| at.max(*due));
        Some(spaced.min(first_end))
    }

    /// A batch of this lane is in the handler.
    pub fn busy(&self) -> bool {
        self.in_flight_since.is_some()
    }

    /// The lowest offset waiting here to start, as a retry or a closed batch.
    pub fn oldest_waiting(&self) -> Option<i64> {
        let retry = self.retry.front().and_then(|(b, _)| b.first_offset());
        let ready = self.ready.front().and_then(Batch::first_offset);
        retry.into_iter().chain(ready).min()
    }
}

/// Whether the partition is still this member's to work on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ownership {
    /// Records are taken in and batches started.
    Owned,
    /// Being given up (shutdown, revoke, or assigned while draining): only
    /// batches that fill a hole below done records still start.
    Finishing {
        /// Holes lie below this offset, the highest one handed to the
        /// handler when finishing began (a bound that rose with every hole
        /// filled would take a backlog through, lane by lane, before the
        /// partition moves on). `None`: no hole is filled any more.
        holes_below: Option<i64>,
        /// Until when holes are still filled (`None`: until the deadline).
        fill_holes_until: Option<Instant>,
        /// Set when revoked: when the revocation stops waiting.
        revoke_deadline: Option<Instant>,
    },
}

#[derive(Debug)]
pub(super) struct PartitionState {
    pub epoch: u64,
    pub offsets: PartitionOffsets,
    pub ledger: Ledger,
    pub lanes: Vec<Lane>,
    pub ownership: Ownership,
    /// Records buffered, queued, in flight or waiting for their dead letter.
    pub held: usize,
    /// Their key and value bytes.
    pub held_bytes: usize,
    pub paused: bool,
    /// For `Ordering::None`: the lane being filled.
    pub fill_lane: usize,
    /// The highest offset of any batch started.
    pub max_started: Option<i64>,
    /// Probes start from a different lane of the partition each time:
    /// oldest first, a lane of one failing tenant took every probe and kept
    /// the circuit open while the other tenants' lanes waited (found in the
    /// pipeline test); counted per partition, as the dispatch alternates
    /// between partitions (found in review).
    pub probe_turn: usize,
    /// Dead letters waiting for their (next) write.
    pub dead_letters: VecDeque<PendingDeadLetter>,
    /// Dead-letter writes under way.
    pub dead_letters_in_flight: HashMap<u64, PendingDeadLetter>,
    /// Records of this partition whose dead letter is in the dead-letter
    /// topic already (a member before this one wrote it and stopped before
    /// its commit passed the record), by offset with the record's timestamp
    /// (an offset alone may name another record, in a topic made again), so
    /// it is not written twice; `None` until the topic was looked at, and
    /// dead letters wait meanwhile.
    pub earlier_dead_letters: Option<HashMap<i64, Option<i64>>>,
    /// (offset, timestamp) of the records taken in and not yet below the
    /// watermark, oldest first: the front is the age of the lag
    /// (`microbatch_partition_lag_seconds`).
    pub timestamps: VecDeque<(i64, i64)>,
}

/// Which fresh batches a partition may start while its finished work waits
/// for its commit (`--max-uncommitted-ms`); retries always may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gate {
    Open,
    /// Done records wait above the watermark: only the batch that holds the
    /// watermark's record, which lets the commit move.
    Watermark(i64),
    /// The broker has not acknowledged a commit for too long: nothing new,
    /// since moving the watermark cannot help.
    Closed,
}

impl Gate {
    pub fn allows(self, fresh: Option<&Batch>) -> bool {
        match self {
            Gate::Open => true,
            Gate::Watermark(wm) => fresh.and_then(Batch::first_offset) == Some(wm),
            Gate::Closed => false,
        }
    }
}

impl PartitionState {
    pub fn new(epoch: u64, lanes: usize, batch: BatchLimits) -> Self {
        let lanes = (0..lanes)
            .map(|_| Lane {
                batcher: Batcher::new(batch),
                ready: VecDeque::new(),
                retry: VecDeque::new(),
                in_flight_since: None,
                scope_retry_at: None,
            })
            .collect();
        Self {
            epoch,
            offsets: PartitionOffsets::new(),
            ledger: Ledger::default(),
            lanes,
            ownership: Ownership::Owned,
            held: 0,
            held_bytes: 0,
            paused: false,
            fill_lane: 0,
            max_started: None,
            probe_turn: 0,
            dead_letters: VecDeque::new(),
            dead_letters_in_flight: HashMap::new(),
            earlier_dead_letters: Some(HashMap::new()),
            timestamps: VecDeque::new(),
        }
    }

    // ------------------------------------------------------------ ownership

    /// Being given up: only holes are still filled.
    pub fn finishing(&self) -> bool {
        matches!(self.ownership, Ownership::Finishing { .. })
    }

    /// When a revocation of this partition stops waiting, while one is
    /// under way.
    pub fn revoke_deadline(&self) -> Option<Instant> {
        match self.ownership {
            Ownership::Finishing {
                revoke_deadline, ..
            } => revoke_deadline,
            Ownership::Owned => None,
        }
    }

    pub fn revoked(&self) -> bool {
        self.revoke_deadline().is_some()
    }

    /// Until when holes are still filled, while that is limited.
    pub fn fill_holes_until(&self) -> Option<Instant> {
        match self.ownership {
            Ownership::Finishing {
                fill_holes_until, ..
            } => fill_holes_until,
            Ownership::Owned => None,
        }
    }

    fn holes_below(&self) -> Option<i64> {
        match self.ownership {
            Ownership::Finishing { holes_below, .. } => holes_below,
            Ownership::Owned => None,
        }
    }

    /// Closes open batches and marks the partition finishing; holes are
    /// filled for `hole_budget` (None: until the deadline).
    pub fn start_finishing(&mut self, now: Instant, hole_budget: Option<Duration>) {
        // A look at the dead-letter topic not answered yet holds nothing
        // back while the partition is given up.
        self.earlier_dead_letters.get_or_insert_with(HashMap::new);
        if !self.finishing() {
            self.ownership = Ownership::Finishing {
                holes_below: self.offsets.max_done().max(self.max_started),
                fill_holes_until: hole_budget.map(|b| now + b),
                revoke_deadline: None,
            };
        }
        for lane in &mut self.lanes {
            if let Some(batch) = lane.batcher.take() {
                lane.ready.push_back(batch);
            }
        }
    }

    /// A revocation of this finishing partition stops waiting at `deadline`
    /// (at the latest: an earlier one stands).
    pub fn revoke_by(&mut self, deadline: Instant) {
        if let Ownership::Finishing {
            revoke_deadline, ..
        } = &mut self.ownership
        {
            *revoke_deadline = Some(revoke_deadline.map_or(deadline, |d| d.min(deadline)));
        }
    }

    /// Sets the revocation's deadline, whatever it was.
    pub fn set_revoke_deadline(&mut self, deadline: Instant) {
        if let Ownership::Finishing {
            revoke_deadline, ..
        } = &mut self.ownership
        {
            *revoke_deadline = Some(deadline);
        }
    }

    /// Once the time for filling holes has passed, no hole is filled any more.
    pub fn stop_filling_holes_after(&mut self, now: Instant) {
        if let Ownership::Finishing {
            holes_below,
            fill_holes_until,
            ..
        } = &mut self.ownership
        {
            if fill_holes_until.is_some_and(|t| now >= t) {
                *fill_holes_until = None;
                *holes_below = None;
            }
        }
    }

    /// A batch a finishing lane starts, cut to the records below
    /// the holes' bound; the rest goes back to the front of the lane.
    /// Records of a lane lie far apart, so a whole batch would finish
    /// records above the bound, whose holes are not filled, and a commit
    /// stopped at those holes would hand them to the next owner to do again.
    pub fn trim_to_holes(&mut self, lane: usize, batch: Batch) -> Batch {
        let bound = self.holes_below().unwrap_or(i64::MIN);
        if !self.finishing() || batch.last_offset().is_none_or(|o| o < bound) {
            return batch;
        }
        let rest = batch.select(batch.id(), |o| o >= bound);
        self.lanes[lane].ready.push_front(rest);
        batch.select(batch.id(), |o| o < bound)
    }

    /// In no order, a closed batch waits in whichever lane was being filled,
    /// which may be busy with a slow batch while others are idle: each idle
    /// lane takes the waiting batch of the lane with most of them, so no
    /// batch waits behind another (for a share group, past its lock).
    /// `blocked`: lanes that cannot start anything (a zombie runs there).
    pub fn spread_ready(&mut self, blocked: impl Fn(usize) -> bool) {
        for idle in 0..self.lanes.len() {
            let lane = &self.lanes[idle];
            if lane.busy() || !lane.ready.is_empty() || !lane.retry.is_empty() || blocked(idle) {
                continue;
            }
            let Some(from) = (0..self.lanes.len())
                .filter(|&i| {
                    i != idle
                        && self.lanes[i].ready.len()
                            > usize::from(!self.lanes[i].busy() && !blocked(i))
                })
                .max_by_key(|&i| self.lanes[i].ready.len())
            else {
                return;
            };
            // The oldest from a lane that cannot start it; a free lane keeps
            // its front batch for itself.
            let source = &mut self.lanes[from];
            let batch = if source.busy() || blocked(from) {
                source.ready.pop_front()
            } else {
                source.ready.pop_back()
            }
            .expect("checked non-empty");
            self.lanes[idle].ready.push_back(batch);
        }
    }

    /// Whether a lane's next batch still fills a hole.
    pub fn next_is_hole(&self, lane: &Lane) -> bool {
        let next = lane.retry.front().map(|(b, _)| b).or(lane.ready.front());
        let below = self.holes_below();
        next.and_then(Batch::first_offset)
            .is_some_and(|o| self.offsets.is_hole(o) && below.is_some_and(|b| o < b))
    }

    /// Whether any work is left that finishing would still do.
    pub fn has_finishing_work(&self) -> bool {
        !self.dead_letters_in_flight.is_empty()
            || !self.dead_letters.is_empty()
            || self.lanes.iter().any(|l| l.busy() || self.next_is_hole(l))
    }

    // ------------------------------------------------------------ commits

    /// Whether the watermark lies past what the broker acknowledged.
    pub fn watermark_unacked(&self) -> bool {
        self.ledger.watermark_unacked(&self.offsets)
    }

    /// Finished records a crash now would replay.
    pub fn replayable(&self) -> usize {
        self.ledger.replayable(&self.offsets)
    }

    /// Whether a commit should go out now rather than at the interval.
    pub fn commit_due_early(&self) -> bool {
        self.ledger.commit_due_early(&self.offsets)
    }

    /// What the partition may start while finished work a crash would
    /// replay has waited longer than `limit` for its commit. Open while a
    /// record waits for a success to prove it bad, the worker's or its
    /// key's (tenant's): closed, one tenant's outage would stop its
    /// partitions for every tenant (found in the pipeline test), at the
    /// cost of more to replay while it lasts.
    pub fn gate(&self, now: Instant, limit: Option<Duration>, last_success_id: u64) -> Gate {
        let Some(max) = limit else {
            return Gate::Open;
        };
        let overdue = self.ledger.waited_too_long(now, max);
        if !overdue.unacked && !overdue.held_back
            || self.awaits_proof(last_success_id, now)
            || !overdue.unacked && self.holds_for_scope(now)
        {
            return Gate::Open;
        }
        match self.offsets.watermark() {
            Some(wm) if !overdue.unacked => Gate::Watermark(wm),
            _ => Gate::Closed,
        }
    }

    // ------------------------------------------------------------ waits

    /// Whether a record held as a suspected outage waits for a batch to
    /// succeed after it first failed (the proof it is the record, not the
    /// downstream): then fresh batches must start, exposed or not.
    pub fn awaits_proof(&self, last_success_id: u64, now: Instant) -> bool {
        self.lanes
            .iter()
            .flat_map(|l| &l.retry)
            .any(|(b, _)| Self::batch_awaits_proof(b, last_success_id, now))
    }

    /// Whether a record is held for its key's (tenant's) proof of health.
    fn holds_for_scope(&self, now: Instant) -> bool {
        self.lanes
            .iter()
            .flat_map(|l| &l.retry)
            .any(|(b, _)| b.lineage.held_for_scope(now))
    }

    /// A record held for its scope's own proof asks for none of the
    /// worker's until its hold is over: only a success of its scope (or the
    /// hold's end) lets it go, and asking would let fresh batches past the
    /// records cap again and again (found by the simulation).
    fn batch_awaits_proof(batch: &Batch, last_success_id: u64, now: Instant) -> bool {
        batch.lineage.suspect
            && batch
                .lineage
                .dispatched_at_last_failure
                .is_some_and(|at| last_success_id <= at)
            && !batch.lineage.held_for_scope(now)
    }

    /// Records taken to the handler that are neither in flight nor done:
    /// failed ones waiting for their retry, held ones, dead letters not yet
    /// acknowledged. Each is on its way to being done, and a crash replays
    /// it then: the records cap counts them from the first start.
    pub fn waiting_to_finish(&self) -> usize {
        self.lanes
            .iter()
            .flat_map(|l| &l.retry)
            .map(|(b, _)| b.len())
            .sum::<usize>()
            + self.dead_letter_backlog()
    }

    /// Whether a waiting record moves on by itself (a retry after its
    /// backoff, a dead letter being written), not only after a fresh batch
    /// succeeds.
    pub fn has_waits_that_move(&self, last_success_id: u64, now: Instant) -> bool {
        self.dead_letter_backlog() > 0
            || self
                .lanes
                .iter()
                .flat_map(|l| &l.retry)
                .any(|(b, _)| !Self::batch_awaits_proof(b, last_success_id, now))
    }

    pub fn dead_letter_backlog(&self) -> usize {
        self.dead_letters
            .iter()
            .chain(self.dead_letters_in_flight.values())
            .map(|d| d.batch.len())
            .sum()
    }

    pub fn lane_for(&self, ordering: Ordering, key: Option<&[u8]>, offset: i64) -> usize {
        let lanes = self.lanes.len();
        if lanes == 1 {
            return 0;
        }
        match (ordering, key) {
            (Ordering::Partition, _) => 0,
            (Ordering::Key, Some(key)) => {
                let mut h = DefaultHasher::new();
                key.hash(&mut h);
                (h.finish() % lanes as u64) as usize
            }
            (Ordering::Key, None) => (offset.unsigned_abs() % lanes as u64) as usize,
            (Ordering::None, _) => self.fill_lane,
        }
    }
}
