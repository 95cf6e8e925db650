//! Dispatch: which batches start on free slots, round-robin over the
//! partitions and oldest lane first, within the records cap and each
//! partition's commit gate; and which partitions pause.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::{Duration, Instant};

use crate::batch::Batch;

use super::partition::{Gate, Lane, PartitionState};
use super::{Intent, Phase, Pipeline, Slot};
use crate::config::Ordering;

/// Logged when one batch passes `--max-uncommitted-records` plus one set
/// of slots, the only way on.
pub const RECORDS_CAP_LAST_RESORT: &str =
    "a batch passes the records cap as the last resort: nothing else could lift it";

/// `--max-uncommitted-records` while one dispatch round runs. What a crash
/// would replay is the finished records waiting for their commit and the
/// records in flight; counted with them are the records that failed and
/// wait to finish (retries, held records, dead letters), which become one
/// or the other. A fresh batch starts only while all of that and the batch
/// stay within the cap. A retry moves records from waiting to in flight,
/// so it always may. Some fresh batches are let past the cap, by at most
/// one set of slots (`--concurrency` x `--max-records`): the batch that
/// holds a partition's watermark while done records wait above it and none
/// below (moving it is what lets the commit shrink the replay), a
/// partition's holes while it is given up, and one batch when a held record
/// waits for proof of an outage and nothing in flight could give it. So a
/// crash replays at most cap + one set of slots; past that only as the last
/// resort, when nothing else could move (see `Pipeline::pick_starts`).
pub(super) struct RecordsCap {
    cap: usize,
    /// How far past the cap the exempt batches may go.
    slack: usize,
    replayable: usize,
    /// Records in flight, including what this round started.
    in_flight: usize,
    waiting: usize,
    /// A record held as a suspected outage, or an open circuit, waits for
    /// some batch to succeed.
    proof_wanted: bool,
    /// Nothing in flight, nothing acknowledged to wait for and nothing
    /// waiting that moves by itself: one exempt batch goes whatever the cap.
    last_resort: bool,
    refused: bool,
    /// An exempt batch was refused: the last resort would start it.
    refused_exempt: bool,
}

impl RecordsCap {
    fn new(
        cap: usize,
        slack: usize,
        partitions: &BTreeMap<i32, PartitionState>,
        in_flight: usize,
        proof_wanted: bool,
    ) -> Self {
        let (replayable, waiting) = if cap == 0 {
            (0, 0)
        } else {
            partitions.values().fold((0, 0), |(r, w), ps| {
                (r + ps.replayable(), w + ps.waiting_to_finish())
            })
        };
        Self {
            cap,
            slack,
            replayable,
            in_flight,
            waiting,
            proof_wanted,
            last_resort: false,
            refused: false,
            refused_exempt: false,
        }
    }

    fn exposed(&self) -> usize {
        self.replayable + self.in_flight + self.waiting
    }

    fn admits(&mut self, ps: &PartitionState, fresh: Option<&Batch>) -> bool {
        let Some(batch) = fresh else {
            return true;
        };
        let exposed = self.exposed();
        if self.cap == 0
            || exposed + batch.len() <= self.cap
            // One batch larger than the cap still goes alone.
            || exposed == 0
        {
            return true;
        }
        // Only while nothing below the watermark waits for an
        // acknowledgement: else moving it helps nothing, and batch after
        // batch at the watermark would pass the cap.
        let done_above = ps.offsets.done_above_watermark();
        let moves_watermark = done_above > 0
            && ps.replayable() == done_above
            && batch.first_offset().is_some()
            && batch.first_offset() == ps.offsets.watermark();
        // The proof a held record waits for, or the probe an open circuit
        // waits for: one batch, when nothing in flight could give it.
        let gives_proof = self.proof_wanted && self.in_flight == 0;
        // Being given up: only holes below done records start (see
        // `pick_round`).
        let exempt = ps.finishing() || moves_watermark || gives_proof;
        if exempt && exposed + batch.len() <= self.cap + self.slack {
            return true;
        }
        // A partition given up is left to its next owner, not forced.
        if exempt && !ps.finishing() {
            if self.last_resort {
                self.last_resort = false;
                return true;
            }
            self.refused_exempt = true;
        }
        self.refused = true;
        false
    }

    /// Whether any finished record waits for its commit.
    fn has_replayable(&self) -> bool {
        self.replayable > 0
    }

    /// Whether the finished records waiting for their commit fill half the cap.
    fn half_full(&self) -> bool {
        self.cap > 0 && self.replayable * 2 >= self.cap
    }

    fn started(&mut self, records: usize, retry: bool) {
        self.in_flight += records;
        if retry {
            self.waiting = self.waiting.saturating_sub(records);
        }
    }
}

/// Which batch a lane would start next, if any.
#[derive(PartialEq, Eq, Debug)]
enum Next {
    Retry,
    Ready,
    /// A retry is waiting for its time.
    Wait,
    Nothing,
}

/// Which batches a probe takes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefer {
    /// Only batches that have not failed yet.
    Fresh,
    /// Anything but a held record.
    NotHeld,
    Any,
}

impl Pipeline {
    /// Starts batches on free slots, round-robin over partitions.
    pub(super) fn dispatch(&mut self, now: Instant) {
        self.waiting_for_ack = false;
        let probing = self.circuit.is_open();
        let limit = if probing {
            if now < self.circuit.probe_after() || self.in_flight > 0 {
                return;
            }
            1
        } else {
            self.config.concurrency
        };
        // While probing, batches that have not failed yet go first, then
        // retries, then held records: the record that keeps failing must not
        // keep the circuit open for ever.
        let rounds: &[Prefer] = if probing {
            &[Prefer::Fresh, Prefer::NotHeld, Prefer::Any]
        } else {
            &[Prefer::Any]
        };
        let cap = if self.sabotage.ignore_records_cap() {
            0
        } else {
            self.config.max_uncommitted_records
        };
        let slack = if self.sabotage.unbounded_exemptions() {
            usize::MAX / 2
        } else {
            self.config.max_records_in_flight()
        };
        let mut records_cap = RecordsCap::new(
            cap,
            slack,
            &self.partitions,
            self.in_flight_records,
            cap > 0 && (probing || self.awaits_proof()),
        );
        if self.sabotage.uncounted_retries() {
            records_cap.waiting = 0;
        }
        let starts = self.pick_starts(now, rounds, limit, &mut records_cap);
        if let Some((last, _)) = starts.last() {
            self.dispatch_cursor = last.partition + 1;
        }
        // Held back by the cap: the commit that lifts it goes out now, not
        // at the next interval.
        self.waiting_for_ack = records_cap.refused && records_cap.has_replayable();
        // From half the cap on, the commit goes out at once: it is on its
        // way (the broker takes a few milliseconds) before the cap is full.
        if self.waiting_for_ack || records_cap.half_full() {
            self.commit(false, |ps| !ps.revoked() && ps.commit_due_early());
        }
        for (slot, batch) in starts {
            self.in_flight += 1;
            self.in_flight_records += batch.len();
            self.capacity.set_busy(now, self.in_flight);
            self.intents.push_back(Intent::Start { slot, batch });
        }
    }

    /// The batches free slots start now: the first round of preference
    /// that starts any. When the records cap refused the only batch that
    /// could move things on and nothing else will free it, that batch goes
    /// past the cap (in the same round: a later one might start a held
    /// record again instead, which is what keeps it waiting), or the
    /// partition would stall for good.
    fn pick_starts(
        &mut self,
        now: Instant,
        rounds: &[Prefer],
        limit: usize,
        records_cap: &mut RecordsCap,
    ) -> Vec<(Slot, Batch)> {
        let mut starts = Vec::new();
        for &prefer in rounds {
            self.pick_round(now, prefer, limit, records_cap, &mut starts);
            if starts.is_empty() && records_cap.refused_exempt && self.nothing_else_moves() {
                records_cap.last_resort = true;
                self.pick_round(now, prefer, limit, records_cap, &mut starts);
                records_cap.last_resort = false;
                if let Some((slot, batch)) = starts.first() {
                    tracing::info!(
                        partition = slot.partition,
                        records = batch.len(),
                        "{RECORDS_CAP_LAST_RESORT}"
                    );
                }
            }
            if !starts.is_empty() {
                break;
            }
        }
        starts
    }

    fn pick_round(
        &mut self,
        now: Instant,
        prefer: Prefer,
        limit: usize,
        records_cap: &mut RecordsCap,
        starts: &mut Vec<(Slot, Batch)>,
    ) {
        let uncommitted_limit = self.config.uncommitted_limit();
        let scope_retry_spacing = self.scope_retry_spacing();
        let keep_order = self.config.ordering != Ordering::None;
        let cursor = self.dispatch_cursor;
        let passes = [
            (Bound::Included(cursor), Bound::Unbounded),
            (Bound::Unbounded, Bound::Excluded(cursor)),
        ];
        'outer: for range in passes {
            for (p, ps) in self.partitions.range_mut(range) {
                // A partition being given up starts only batches that
                // fill holes below done records, so that its last
                // commit covers them: holding those back for a commit
                // the rebalance refuses would keep the revoke waiting
                // until its deadline, and replay them.
                let gate = if ps.finishing() {
                    Gate::Open
                } else {
                    ps.gate(now, uncommitted_limit, self.last_success_id)
                };
                // Oldest first: the lane holding the partition's lowest
                // waiting offset holds its commit back. Taken in index
                // order, the first lanes ran dry early and the last ones
                // ran alone at the end of a backlog (a tenth of a drain
                // with 4 slots on 2 partitions).
                if self.config.ordering == Ordering::None {
                    ps.spread_ready(|lane| {
                        !self.zombies.is_empty() && self.zombies.contains_key(&(*p, lane))
                    });
                }
                self.lane_order.clear();
                self.lane_order.extend(
                    ps.lanes
                        .iter()
                        .enumerate()
                        .filter_map(|(i, lane)| Some((lane.oldest_waiting()?, i))),
                );
                self.lane_order.sort_unstable();
                if prefer != Prefer::Any && !self.lane_order.is_empty() {
                    let turn = ps.probe_turn % self.lane_order.len();
                    self.lane_order.rotate_left(turn);
                }
                for k in 0..self.lane_order.len() {
                    let i = self.lane_order[k].1;
                    if self.in_flight + starts.len() >= limit {
                        break 'outer;
                    }
                    let busy = ps.lanes[i].busy() && !self.sabotage.ignore_lane_busy();
                    if busy || (!self.zombies.is_empty() && self.zombies.contains_key(&(*p, i))) {
                        continue;
                    }
                    let next = Self::next_for(ps, &ps.lanes[i], now, prefer, gate, keep_order);
                    let batch = match next {
                        Next::Retry => ps.lanes[i].retry.pop_front().map(|(b, _)| b),
                        Next::Ready if records_cap.admits(ps, ps.lanes[i].ready.front()) => ps
                            .lanes[i]
                            .ready
                            .pop_front()
                            .map(|b| ps.trim_to_holes(i, b)),
                        Next::Ready | Next::Wait | Next::Nothing => None,
                    };
                    if let Some(mut batch) = batch {
                        if prefer != Prefer::Any {
                            ps.probe_turn = ps.probe_turn.wrapping_add(1);
                        }
                        if batch.lineage.held_for_scope(now) {
                            ps.lanes[i].scope_retry_at = Some(now + scope_retry_spacing);
                        }
                        records_cap.started(batch.len(), next == Next::Retry);
                        ps.max_started = ps.max_started.max(batch.last_offset());
                        ps.lanes[i].in_flight_since = Some(now);
                        self.next_batch_id += 1;
                        batch.set_id(self.next_batch_id);
                        starts.push((
                            Slot {
                                partition: *p,
                                epoch: ps.epoch,
                                lane: i,
                            },
                            batch,
                        ));
                    }
                }
            }
        }
    }

    /// What a lane would start next, under a probe's preference (or `Any`
    /// while the circuit is closed).
    /// `gate`: which fresh batch may start while the partition's finished
    /// work waits for its commit (so a crash replays no more than
    /// `--max-uncommitted-ms` of it).
    fn next_for(
        ps: &PartitionState,
        lane: &Lane,
        now: Instant,
        prefer: Prefer,
        gate: Gate,
        keep_order: bool,
    ) -> Next {
        if ps.finishing() && !ps.next_is_hole(lane) {
            return Next::Nothing;
        }
        let next = Self::next_ungated(lane, now, prefer, keep_order);
        if next == Next::Ready && !gate.allows(lane.ready.front()) {
            return Next::Nothing;
        }
        next
    }

    /// How far apart a lane retries records held for their key's proof: a
    /// tenant's held records never take every slot from the others.
    pub(super) fn scope_retry_spacing(&self) -> Duration {
        self.config.retry.max / 4
    }

    /// Spaces the next scope-held retry of `slot`'s lane from now.
    pub(super) fn space_scope_retries(&mut self, slot: Slot, now: Instant) {
        let spacing = self.scope_retry_spacing();
        if let Some(ps) = self.partitions.get_mut(&slot.partition) {
            if ps.epoch == slot.epoch {
                ps.lanes[slot.lane].scope_retry_at = Some(now + spacing);
            }
        }
    }

    /// Whether what a crash would replay fills `--max-uncommitted-records`.
    pub(super) fn records_cap_full(&self) -> bool {
        let cap = self.config.max_uncommitted_records;
        cap > 0
            && RecordsCap::new(cap, 0, &self.partitions, self.in_flight_records, false).exposed()
                >= cap
    }

    fn next_ungated(lane: &Lane, now: Instant, prefer: Prefer, keep_order: bool) -> Next {
        let suspect = lane.retry.front().is_some_and(|(b, _)| b.lineage.suspect);
        // Held for their key's (tenant's) proof while the rest works: until
        // a retry may start, fresh batches go ahead of them, as a probe's
        // do, or one tenant's outage would stop every lane it reaches
        // (found in review).
        let scope_wait = lane.scope_wait(now, keep_order);
        match (lane.retry.front(), prefer) {
            (Some(_), Prefer::Any) if scope_wait.is_some_and(|at| at > now) => {
                if lane.ready.is_empty() {
                    Next::Wait
                } else {
                    Next::Ready
                }
            }
            (_, Prefer::Fresh) if lane.ready.is_empty() => Next::Nothing,
            // A fresh batch overtakes a held record, never a plain retry,
            // which keeps its lane's order.
            (None, Prefer::Fresh) => Next::Ready,
            (Some(_), Prefer::Fresh) if suspect => Next::Ready,
            (Some(_), Prefer::Fresh) => Next::Nothing,
            (Some(_), Prefer::NotHeld) if suspect => Next::Nothing,
            (Some((_, due)), _) if *due > now => Next::Wait,
            (Some(_), _) => Next::Retry,
            (None, _) if lane.ready.is_empty() => Next::Nothing,
            (None, _) => Next::Ready,
        }
    }

    /// Whether nothing in flight, no commit to acknowledge and no waiting
    /// record that moves by itself could lift the records cap.
    fn nothing_else_moves(&self) -> bool {
        self.in_flight == 0
            && self.partitions.values().all(|ps| {
                !ps.watermark_unacked() && !ps.has_waits_that_move(self.last_success_id, self.clock)
            })
    }

    /// Pauses partitions that hold too much (or all, while draining);
    /// resumes them once they hold half their cap. An open circuit pauses
    /// nothing: the caps bound what is held, and newly fetched records are
    /// what lets a probe tell an outage from one bad record.
    pub(super) fn apply_backpressure(&mut self) {
        let per_partition = self.config.max_records_per_partition;
        let bytes_per_partition = self.config.max_held_bytes / 2;
        let stop_all = self.phase != Phase::Consuming;
        let never = self.sabotage.never_pause();
        let mut pause = Vec::new();
        let mut resume = Vec::new();
        for (p, ps) in self.partitions.iter_mut() {
            if ps.revoked() || never {
                continue;
            }
            // Bytes too, at half the worker's cap: one partition of large
            // records must not fill the worker, or the others could bring
            // no success, the proof its held records wait for.
            if !ps.paused
                && (stop_all || ps.held >= per_partition || ps.held_bytes >= bytes_per_partition)
            {
                ps.paused = true;
                pause.push(*p);
            } else if ps.paused
                && !stop_all
                && ps.held <= per_partition / 2
                && ps.held_bytes <= bytes_per_partition / 2
            {
                ps.paused = false;
                resume.push(*p);
            }
        }
        if !pause.is_empty() {
            self.intents.push_back(Intent::Pause(pause));
        }
        if !resume.is_empty() {
            self.intents.push_back(Intent::Resume(resume));
        }
    }
}
