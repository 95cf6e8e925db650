//! The worker's pipeline: a state machine without I/O.
//!
//! Events go in (records fetched, verdicts, dead letters acknowledged,
//! assignments, revocations, commit acknowledgements, shutdown, the clock);
//! intents come out (start a batch, write dead letters, commit, pause,
//! resume). The worker's adapter (see [`crate::worker`]) feeds it from
//! librdkafka and the handler tasks and carries the intents out; tests and
//! the seeded simulation drive it directly with a clock they set.
//!
//! Methods by kind, as in a sans-I/O protocol:
//! - getters: [`Pipeline::phase`], [`Pipeline::is_full`], [`Pipeline::report`], ...
//! - `handle_*`: events from the consumer, the handler and the clock;
//! - commands: [`Pipeline::begin_revoke`] / [`Pipeline::complete_revoke`],
//!   [`Pipeline::shutdown`], [`Pipeline::close`];
//! - `poll_*`: [`Pipeline::poll_intent`] hands out what to do,
//!   [`Pipeline::poll_timeout`] when to call [`Pipeline::handle_tick`] next.
//!
//! **Phases.** *Consuming*; then *draining* once shutdown is asked, with one
//! deadline (`drain_timeout` after the request): no new batches except those
//! that fill a hole below done records, so the final commit covers as much
//! finished work as possible; then *closed* after the final commit. A
//! revocation drains the revoked partitions the same way, within
//! `drain_timeout` or the shutdown deadline, whichever is sooner, while the
//! partitions the member keeps go on as before.
//!
//! The delivery guarantee this upholds is stated in [`crate::worker`]; the
//! commit rule in [`crate::offsets`], the failure rules in [`crate::failure`].
//!
//! # Layout
//! - this module: the public shape (intents, phases, getters, `handle_*`,
//!   commands, polls) and the events' bookkeeping;
//! - `partition`: one partition's lanes, holdings and ownership
//!   state (owned, or finishing with its holes and deadlines);
//! - `dispatch`: which batches start on free slots (lanes, the commit gate,
//!   the records cap) and which partitions pause;
//! - `ledger` and `commits`: per partition, the commits sent and
//!   acknowledged, and what to commit now;
//! - `dead_letters`: records failed for good, waiting for their write;
//! - `stats`: the numbers the worker exports ([`Stats`]);
//! - `sabotage`: planted defects for the simulation's self-test (empty
//!   outside tests); `inspect`, `sim` and `tests`: test-only.

mod commits;
mod dead_letters;
mod dispatch;
#[cfg(test)]
mod inspect;
mod ledger;
mod partition;
mod sabotage;
mod stats;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::batch::Batch;
use crate::capacity::{CapacityMeter, DEFAULT_WINDOW};
use crate::config::{Ordering, PipelineConfig};
use crate::failure::{self, Circuit, Plan, Signal, Transition};
use crate::fetch::ConsumedRecord;
use crate::handler::{BatchOutcome, Failure};
use crate::health::{self, ScopeHealth};
use microbatch_kafka::capacity_report::CapacityReport;
use microbatch_kafka::LogThrottle;

pub use commits::{CommitRefusal, FINAL_COMMIT_RETRY};
pub use dispatch::RECORDS_CAP_LAST_RESORT;
use partition::{Lane, PartitionState};
pub(crate) use sabotage::Sabotage;
pub use stats::{Counters, Stats};
/// How long a revoked partition still starts batches that fill holes below
/// done records, so that its last commit covers them; after that it waits
/// only for the batches in flight. The partition is stopped for the whole
/// revoke: a scale step's goal is that a moving partition resumes within
/// about a second. A shutdown fills its holes until the drain deadline:
/// it hands over nothing done twice, and the group waits for it anyway.
const HOLE_FILL_BUDGET: Duration = Duration::from_secs(1);

/// Names the slot a batch runs in; `epoch` tells a stale event (for a
/// partition revoked, and perhaps assigned again, meanwhile) from a current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub partition: i32,
    pub epoch: u64,
    pub lane: usize,
}

/// Names one dead-letter write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterSlot {
    pub partition: i32,
    pub epoch: u64,
    pub id: u64,
}

/// What the adapter is asked to do.
#[derive(Debug)]
pub enum Intent {
    /// Hand `batch` to the handler; answer with [`Pipeline::handle_verdict`].
    Start {
        slot: Slot,
        batch: Batch,
    },
    /// Write these records to the dead-letter topic; answer with
    /// [`Pipeline::handle_dead_lettered`].
    DeadLetter {
        slot: DeadLetterSlot,
        batch: Batch,
        failures: Vec<(i64, Failure)>,
        attempts: u32,
    },
    /// Commit these next offsets, each with `metadata` (the worker's
    /// capacity report, see [`crate::capacity`]); answer with
    /// [`Pipeline::handle_committed`].
    Commit {
        offsets: Vec<(i32, i64)>,
        sync: bool,
        metadata: String,
    },
    Pause(Vec<i32>),
    Resume(Vec<i32>),
    /// These records were processed (for the audit log, when it is on).
    Processed {
        partition: i32,
        offsets: Vec<i64>,
    },
    /// Read the consumer's position of these partitions, which have nothing
    /// outstanding; answer with [`Pipeline::handle_position`].
    ReadPositions(Vec<i32>),
    /// Look in the dead-letter topic for dead letters of this partition's
    /// records already written (by a member that owned it before and
    /// stopped before its commit passed them); answer with
    /// [`Pipeline::handle_earlier_dead_letters`] (offsets with their
    /// records' timestamps), an empty list when they cannot be looked for.
    /// Its dead letters wait until then.
    FindDeadLetters {
        partition: i32,
        epoch: u64,
    },
    /// Per-record acknowledgement (a share group): these records are done
    /// (processed, or their dead letter acknowledged); accept them.
    Accept {
        partition: i32,
        offsets: Vec<i64>,
    },
    /// A share group's worker: its capacity report for the window that
    /// just closed (see [`crate::capacity`]), which has no offset commit
    /// to ride on; send it where the scaler reads it.
    ReportCapacity(String),
}

/// How finished work is acknowledged to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acknowledgement {
    /// A consumer group: one committed offset per partition, below which
    /// everything is done ([`crate::offsets`]).
    #[default]
    Watermark,
    /// A share group: each record accepted as soon as it is done, in any
    /// order ([`Intent::Accept`]). Partitions come with their records (the
    /// broker hands records out, not partitions), offsets may arrive in any
    /// order and again (a redelivery), nothing is committed and no position
    /// is read. What is never accepted returns to the group when this
    /// member leaves or its locks run out.
    PerRecord,
}

/// Where the pipeline is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Consuming,
    Draining { deadline: Instant },
    Closed,
}

/// A record that failed for good while the dead-letter topic is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undeliverable {
    pub partition: i32,
    pub offset: i64,
    pub error: String,
}

/// What a pipeline did, for the worker's report.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub records_processed: u64,
    pub records_dead_lettered: u64,
    /// Batches still in flight when a drain deadline passed (not committed).
    pub abandoned_batches: usize,
}

/// How a pipeline is set up, beside its [`PipelineConfig`].
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Whether records that fail for good are dead-lettered (else the first
    /// one is fatal).
    pub dead_letters: bool,
    /// Whether to emit [`Intent::Processed`].
    pub audit: bool,
    /// Whether batches carry record headers.
    pub keep_headers: bool,
    /// Seeds the back-off jitter.
    pub seed: u64,
    pub acknowledgement: Acknowledgement,
    /// Whether a batch's done records are evidence for their keys' health:
    /// not when the handler may skip records (a filter).
    pub scope_successes: bool,
}

/// Whether a verdict's done records were done by the handler.
#[derive(Clone, Copy)]
enum OutcomeKind {
    Handled,
    /// None done by the handler, which was not given any.
    Untouched,
    /// None done by the handler, which failed all it was given.
    FailedByHandler,
}

/// The pipeline of one worker. See the module docs.
pub struct Pipeline {
    config: PipelineConfig,
    topic: Arc<str>,
    dlq_enabled: bool,
    acknowledgement: Acknowledgement,
    audit: bool,
    keep_headers: bool,
    rng: StdRng,
    /// The wall clock at `started`, for record ages.
    started: Instant,
    started_wall_ms: i64,
    partitions: BTreeMap<i32, PartitionState>,
    /// The keys of `partitions`, kept for [`Stats::partitions`].
    assigned: Vec<i32>,
    /// Handler batches still running for lanes of a partition revoked or
    /// reset meanwhile; the lane starts nothing until they end, so two
    /// batches of one key never run at once.
    zombies: HashMap<(i32, usize), u32>,
    intents: VecDeque<Intent>,
    next_epoch: u64,
    next_batch_id: u64,
    next_dead_letter_id: u64,
    /// The partition dispatch starts from next (round-robin).
    dispatch_cursor: i32,
    /// Scratch for [`Pipeline::pick_round`]: a partition's lanes with work
    /// waiting, by their oldest offset.
    lane_order: Vec<(i64, usize)>,
    in_flight: usize,
    /// Records in the batches in flight.
    in_flight_records: usize,
    /// Whether fresh batches wait for a commit's acknowledgement
    /// (`--max-uncommitted-records`).
    waiting_for_ack: bool,
    held: usize,
    /// Key and value bytes of the records held (`--max-held-bytes`).
    held_bytes: usize,
    last_success_id: u64,
    /// Rule 3's proof per key or tenant (see [`crate::health`]).
    health: ScopeHealth,
    /// See [`Options::scope_successes`].
    scope_successes_count: bool,
    circuit: Circuit,
    phase: Phase,
    /// After `close`: until when a final commit the broker refused is
    /// tried again (the drain deadline).
    final_commit_until: Option<Instant>,
    /// When a refused final commit is tried again.
    final_commit_retry_at: Option<Instant>,
    next_commit: Instant,
    fatal: Option<Undeliverable>,
    report: Report,
    counted: Counters,
    /// Why the last dead-letter write failed, while its records wait.
    dead_letter_error: Option<String>,
    /// See [`Stats::lag_seconds`].
    lag_seconds: Vec<(i32, f64)>,
    /// Handler failures are logged at most once per back-off step.
    failure_log: LogThrottle,
    /// How busy the slots are and how much gets done: sent with commits.
    capacity: CapacityMeter,
    /// A share group's last capacity report sent (its window's end).
    last_report_at: Option<u64>,
    /// The latest time an event brought.
    clock: Instant,
    /// Planted defects, for the simulation's self-test (empty outside tests).
    pub(crate) sabotage: Sabotage,
}

impl Pipeline {
    /// `wall_ms`: the wall clock at `now`, in milliseconds since the epoch.
    pub fn new(
        config: PipelineConfig,
        options: Options,
        worker_id: String,
        now: Instant,
        wall_ms: i64,
    ) -> Self {
        let Options {
            dead_letters: dlq_enabled,
            audit,
            keep_headers,
            seed,
            acknowledgement,
            scope_successes,
        } = options;
        let health = ScopeHealth::new(
            config.health_scope.clone(),
            health::window(config.retry.max, config.health_scope_hold),
        );
        Self {
            topic: Arc::from(config.topic.as_str()),
            next_commit: now + config.commit_interval,
            final_commit_until: None,
            final_commit_retry_at: None,
            config,
            dlq_enabled,
            acknowledgement,
            audit,
            keep_headers,
            rng: StdRng::seed_from_u64(seed),
            started: now,
            started_wall_ms: wall_ms,
            partitions: BTreeMap::new(),
            assigned: Vec::new(),
            zombies: HashMap::new(),
            intents: VecDeque::new(),
            next_epoch: 0,
            next_batch_id: 0,
            next_dead_letter_id: 0,
            dispatch_cursor: 0,
            lane_order: Vec::new(),
            in_flight: 0,
            in_flight_records: 0,
            waiting_for_ack: false,
            held: 0,
            held_bytes: 0,
            last_success_id: 0,
            health,
            scope_successes_count: scope_successes,
            circuit: Circuit::new(now),
            phase: Phase::Consuming,
            fatal: None,
            report: Report::default(),
            counted: Counters::default(),
            dead_letter_error: None,
            lag_seconds: Vec::new(),
            failure_log: LogThrottle::default(),
            capacity: CapacityMeter::new(worker_id, DEFAULT_WINDOW, now),
            last_report_at: None,
            clock: now,
            sabotage: Sabotage::default(),
        }
    }

    // ------------------------------------------------------------ getters

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the worker holds all it may (`--max-records-held`, or
    /// `--max-held-bytes` of keys and values): the adapter then stops taking
    /// records, and librdkafka, its prefetch full, stops fetching. Nothing
    /// is paused, so nothing fetched is lost. One record is always taken
    /// when none is held, however large.
    pub fn is_full(&self) -> bool {
        self.held >= self.config.max_records_held || self.held_bytes >= self.config.max_held_bytes
    }

    /// Key and value bytes of the records held.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Handler batches running (stale ones included).
    /// Whether fresh batches wait for a commit's acknowledgement
    /// (`--max-uncommitted-records`): the caller should look for it soon.
    pub fn waiting_for_ack(&self) -> bool {
        self.waiting_for_ack
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Records held that are not in a handler: waiting for a slot, a
    /// retry, or their dead letter.
    pub fn waiting(&self) -> usize {
        self.held.saturating_sub(self.in_flight_records)
    }

    pub fn report(&self) -> &Report {
        &self.report
    }

    /// A record failed for good with the dead-letter topic off: the worker
    /// must stop (it drains first).
    pub fn fatal(&self) -> Option<&Undeliverable> {
        self.fatal.as_ref()
    }

    pub fn circuit_open(&self) -> bool {
        self.circuit.is_open()
    }

    /// Records waiting for their dead letter to be acknowledged.
    pub fn dead_letter_backlog(&self) -> usize {
        self.partitions
            .values()
            .map(PartitionState::dead_letter_backlog)
            .sum()
    }

    /// Records held: buffered, queued, in flight or waiting for a dead letter.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Records held by one partition.
    pub fn held_by(&self, partition: i32) -> usize {
        self.partitions.get(&partition).map_or(0, |p| p.held)
    }

    pub fn assigned(&self) -> impl Iterator<Item = i32> + '_ {
        self.partitions.keys().copied()
    }

    /// The offset the pipeline would commit for a partition now.
    pub fn watermark(&self, partition: i32) -> Option<i64> {
        self.partitions
            .get(&partition)
            .and_then(|p| p.offsets.watermark())
    }

    pub fn is_paused(&self, partition: i32) -> bool {
        self.partitions.get(&partition).is_some_and(|p| p.paused)
    }

    /// Whether a revocation is under way and still has work to wait for.
    pub fn revoke_settled(&self, now: Instant) -> bool {
        self.partitions.values().all(|p| match p.revoke_deadline() {
            None => true,
            Some(deadline) => now >= deadline || !p.has_finishing_work(),
        })
    }

    /// Whether draining is over: nothing left to wait for, or the deadline passed.
    pub fn drained(&self, now: Instant) -> bool {
        match self.phase {
            Phase::Consuming => false,
            Phase::Closed => true,
            Phase::Draining { deadline } => {
                now >= deadline
                    || (self.in_flight == 0
                        && !self
                            .partitions
                            .values()
                            .any(PartitionState::has_finishing_work))
            }
        }
    }

    fn wall_ms(&self, now: Instant) -> i64 {
        self.started_wall_ms + now.saturating_duration_since(self.started).as_millis() as i64
    }

    /// Whether a record held as a suspected outage waits for a fresh batch
    /// to succeed.
    pub(crate) fn awaits_proof(&self) -> bool {
        self.partitions
            .values()
            .any(|ps| ps.awaits_proof(self.last_success_id, self.clock))
    }

    // ------------------------------------------------------------ events

    /// Partitions assigned to this member. Each new one starts afresh and is
    /// resumed, since librdkafka keeps a pause the application set before
    /// the partition was revoked, and this state starts unpaused. One this
    /// member owns already goes on as it is.
    pub fn handle_assign(&mut self, partitions: &[i32]) {
        let mut resumed = Vec::with_capacity(partitions.len());
        for &p in partitions {
            if self.partitions.get(&p).is_some_and(|ps| !ps.revoked()) {
                // Ours already (an assignment can name it again): starting
                // afresh would forget what is in flight and commit past it.
                continue;
            }
            let mut state = self.new_partition();
            if self.phase == Phase::Consuming {
                resumed.push(p);
                self.look_for_earlier_dead_letters(p, &mut state);
            } else {
                // Given while draining (the group rebalances as this member
                // leaves): it takes nothing in, so nothing of it is
                // committed, and its records go to the next owner.
                state.start_finishing(self.clock, None);
            }
            if let Some(old) = self.partitions.insert(p, state) {
                self.forget(p, old);
            }
        }
        if !resumed.is_empty() {
            self.intents.push_back(Intent::Resume(resumed));
        }
        self.capacity.set_slots(self.clock, self.usable_slots());
        self.assigned.clear();
        self.assigned.extend(self.partitions.keys());
    }

    /// Asks what the dead-letter topic holds of a fresh partition state's
    /// records already; its dead letters wait for the answer. Only where
    /// records come back from a committed offset (not a share group's).
    fn look_for_earlier_dead_letters(&mut self, partition: i32, state: &mut PartitionState) {
        if self.dlq_enabled && self.acknowledgement == Acknowledgement::Watermark {
            state.earlier_dead_letters = None;
            self.intents.push_back(Intent::FindDeadLetters {
                partition,
                epoch: state.epoch,
            });
        }
    }

    /// A fresh state for a partition assigned (or reset), under a new epoch.
    fn new_partition(&mut self) -> PartitionState {
        self.next_epoch += 1;
        PartitionState::new(
            self.next_epoch,
            self.config.slots_per_partition(),
            self.config.batch,
        )
    }

    /// A share group's partition seen for the first time: records are
    /// handed out per record, so a partition is ours while we hold any of
    /// it, with no assignment or revoke to wait for.
    fn adopt(&mut self, partition: i32) {
        let state = self.new_partition();
        self.partitions.insert(partition, state);
        self.capacity.set_slots(self.clock, self.usable_slots());
        self.assigned.clear();
        self.assigned.extend(self.partitions.keys());
    }

    /// A record the broker has delivered more often than `--max-attempts`
    /// (every earlier delivery ended without a verdict: its holder crashed,
    /// left, or ran past its lock): dead-lettered without handling it again,
    /// never left for the broker to archive. A share group's only.
    pub fn handle_delivered_too_often(
        &mut self,
        msg: &impl ConsumedRecord,
        deliveries: u32,
        why: Option<&str>,
        now: Instant,
    ) {
        // Also while draining: dropped, the record would go back to the
        // broker one delivery nearer to being archived unseen.
        if self.phase == Phase::Closed || self.acknowledgement != Acknowledgement::PerRecord {
            return;
        }
        let partition = msg.partition();
        if !self.partitions.contains_key(&partition) {
            self.adopt(partition);
            if self.phase != Phase::Consuming {
                if let Some(ps) = self.partitions.get_mut(&partition) {
                    ps.start_finishing(now, None);
                }
            }
        }
        let Some(ps) = self.partitions.get_mut(&partition) else {
            return;
        };
        let epoch = ps.epoch;
        let bytes = msg.key().map_or(0, <[u8]>::len) + msg.payload().map_or(0, <[u8]>::len);
        ps.held += 1;
        ps.held_bytes += bytes;
        self.held += 1;
        self.held_bytes += bytes;
        self.next_batch_id += 1;
        let mut batch = Batch::new(self.next_batch_id, self.topic.clone(), partition);
        batch.push(
            msg.offset(),
            msg.timestamp_ms(),
            msg.key(),
            msg.payload(),
            msg.headers(),
        );
        batch.attempt = deliveries;
        let why = why.unwrap_or(
            "earlier deliveries ended without a verdict (a crashed or stopped member, \
             or a handler slower than the acquisition lock)",
        );
        let failure = Failure::permanent(format!(
            "delivered {deliveries} times, more than --max-attempts {}: {why}",
            self.config.retry.max_attempts
        ));
        if !self.dlq_enabled {
            tracing::error!(partition, offset = msg.offset(), error = %failure.error, "record failed for good and --dlq is off; stopping");
            self.fatal.get_or_insert(Undeliverable {
                partition,
                offset: msg.offset(),
                error: failure.error,
            });
            return;
        }
        let slot = Slot {
            partition,
            epoch,
            lane: 0,
        };
        self.queue_dead_letter(slot, batch, vec![(msg.offset(), failure)], now);
    }

    /// Slots this member can fill: its concurrency, or fewer when its
    /// partitions have fewer lanes.
    fn usable_slots(&self) -> usize {
        (self.partitions.len() * self.config.slots_per_partition()).min(self.config.concurrency)
    }

    /// Takes one consumed record into its partition's lane.
    pub fn handle_record(&mut self, msg: &impl ConsumedRecord, now: Instant) {
        if self.phase != Phase::Consuming {
            return;
        }
        let partition = msg.partition();
        let offset = msg.offset();
        let per_record = self.acknowledgement == Acknowledgement::PerRecord;
        if per_record && !self.partitions.contains_key(&partition) {
            self.adopt(partition);
        }
        let Some(ps) = self.partitions.get_mut(&partition) else {
            return;
        };
        if ps.finishing() {
            return;
        }
        if !per_record && ps.offsets.last_seen().is_some_and(|last| offset <= last) {
            // The consumer's position moved back (an offset reset after the
            // log was truncated, or a seek): what was tracked is void.
            tracing::warn!(
                partition,
                offset,
                last_seen = ps.offsets.last_seen(),
                "offsets went backwards; the partition restarts from the new offset"
            );
            self.counted.offset_resets += 1;
            let mut state = self.new_partition();
            // Offsets moved: the old answer may name other records.
            self.look_for_earlier_dead_letters(partition, &mut state);
            let old = self
                .partitions
                .insert(partition, state)
                .expect("partition present");
            self.forget(partition, old);
        }
        let ordering = self.config.ordering;
        let keep_headers = self.keep_headers;
        let batch_id = self.next_batch_id + 1;
        let topic = self.topic.clone();
        let ps = self
            .partitions
            .get_mut(&partition)
            .expect("partition present");
        if !per_record {
            ps.offsets.track(offset);
            if let Some(ts) = msg.timestamp_ms() {
                ps.timestamps.push_back((offset, ts));
            }
        }
        let mut lane_idx = ps.lane_for(ordering, msg.key(), offset);
        if per_record {
            // A share group hands out records in any order, and one again
            // after its lock ran out: a batch's offsets rise and are unique,
            // so one that does not fit closes the open batch first, and
            // (in no order) fills the next lane.
            let lane = &mut ps.lanes[lane_idx];
            if lane
                .batcher
                .open_last_offset()
                .is_some_and(|last| offset <= last)
            {
                if let Some(batch) = lane.batcher.take() {
                    lane.ready.push_back(batch);
                }
                if ordering == Ordering::None {
                    ps.fill_lane = (ps.fill_lane + 1) % ps.lanes.len();
                    lane_idx = ps.lane_for(ordering, msg.key(), offset);
                }
            }
        }
        let mut opened = false;
        let closed = ps.lanes[lane_idx].batcher.push(
            now,
            || {
                opened = true;
                Batch::new(batch_id, topic, partition)
            },
            |batch| {
                let headers = if keep_headers {
                    msg.headers()
                } else {
                    Vec::new()
                };
                batch.push(
                    offset,
                    msg.timestamp_ms(),
                    msg.key(),
                    msg.payload(),
                    headers,
                );
            },
        );
        if opened {
            self.next_batch_id += 1;
        }
        let bytes = msg.key().map_or(0, <[u8]>::len) + msg.payload().map_or(0, <[u8]>::len);
        ps.held += 1;
        ps.held_bytes += bytes;
        self.held += 1;
        self.held_bytes += bytes;
        if let Some(batch) = closed {
            ps.lanes[lane_idx].ready.push_back(batch);
            if ordering == Ordering::None {
                ps.fill_lane = (ps.fill_lane + 1) % ps.lanes.len();
            }
        }
    }

    /// The handler's verdict on a batch started with [`Intent::Start`].
    /// (`Unhandled` is `Partial` whose done records prove nothing.)
    pub fn handle_verdict(
        &mut self,
        slot: Slot,
        batch: Batch,
        outcome: BatchOutcome,
        now: Instant,
    ) {
        self.clock = self.clock.max(now);
        self.in_flight -= 1;
        self.in_flight_records = self.in_flight_records.saturating_sub(batch.len());
        self.capacity.set_busy(now, self.in_flight);
        if !self.is_current(slot.partition, slot.epoch) {
            let key = (slot.partition, slot.lane);
            if let Some(n) = self.zombies.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.zombies.remove(&key);
                }
            }
            return;
        }
        let handler_time = self
            .lane_mut(slot)
            .in_flight_since
            .take()
            .map(|started| now.saturating_duration_since(started))
            .unwrap_or_default();
        let batch_id = batch.id();
        let ctx = failure::Context {
            now,
            wall_ms: self.wall_ms(now),
            circuit_open: self.circuit.is_open(),
            rest_failing: self.circuit.streak() > 0,
            last_success_id: self.last_success_id,
            dispatched: self.next_batch_id,
            scope: None,
            scope_hold: self.config.health_scope_hold,
            scope_out: false,
        };
        let outcome_kind = match outcome {
            BatchOutcome::Unhandled { tried: false, .. } => OutcomeKind::Untouched,
            BatchOutcome::Unhandled { tried: true, .. } => OutcomeKind::FailedByHandler,
            _ => OutcomeKind::Handled,
        };
        match outcome {
            BatchOutcome::Success => {
                self.counted.records_processed += batch.len() as u64;
                self.counted.batches_processed += 1;
                self.report.records_processed += batch.len() as u64;
                self.observe(Signal::Success, batch_id, now);
                self.scope_succeeded(&batch, batch_id, now, |_| true);
                self.processed(
                    slot.partition,
                    batch.offsets().collect(),
                    batch.payload_bytes(),
                    handler_time,
                );
            }
            BatchOutcome::Partial(failed) | BatchOutcome::Unhandled { failed, .. } => {
                let failed: HashMap<i64, Failure> = failed
                    .into_iter()
                    .filter(|(o, _)| batch.offsets().any(|b| b == *o))
                    .collect();
                // A batch a filter left wholly out did not fail.
                if !failed.is_empty() || matches!(outcome_kind, OutcomeKind::Handled) {
                    self.counted.batches_failed += 1;
                }
                self.counted.records_failed += failed.len() as u64;
                let done: Vec<i64> = batch
                    .offsets()
                    .filter(|o| !failed.contains_key(o))
                    .collect();
                self.counted.records_processed += done.len() as u64;
                self.report.records_processed += done.len() as u64;
                let failure = Signal::Failure {
                    root: batch.lineage.root,
                };
                let signal = match outcome_kind {
                    OutcomeKind::Untouched => Signal::Nothing,
                    OutcomeKind::FailedByHandler => failure,
                    OutcomeKind::Handled if done.is_empty() => failure,
                    OutcomeKind::Handled => Signal::Success,
                };
                self.observe(signal, batch_id, now);
                if signal == Signal::Success {
                    self.scope_succeeded(&batch, batch_id, now, |o| !failed.contains_key(&o));
                }
                let bytes = batch.payload_bytes_where(|o| !failed.contains_key(&o));
                self.processed(slot.partition, done, bytes, handler_time);
                let Some((offset, first)) = failed.iter().next() else {
                    return;
                };
                if let Some(suppressed) = self.failure_log.allow(now) {
                    tracing::warn!(partition = slot.partition, offset, records = failed.len(), error = %first.error, retryable = first.retryable, suppressed, "the handler failed records");
                }
                let rest = batch.select(batch.id(), |o| failed.contains_key(&o));
                let failures: Vec<(i64, Failure)> = failed.into_iter().collect();
                let plans =
                    failure::records_failed(rest, failures, &self.config.retry, ctx, &mut self.rng);
                for plan in plans {
                    self.carry_out(slot, plan, now);
                }
            }
            BatchOutcome::Failed(f) => {
                self.counted.batches_failed += 1;
                self.counted.records_failed += batch.len() as u64;
                if let Some(suppressed) = self.failure_log.allow(now) {
                    tracing::warn!(partition = slot.partition, records = batch.len(), error = %f.error, retryable = f.retryable, suppressed, "the batch failed as a whole");
                }
                // Under a full records cap a key's (tenant's) hold yields
                // for the record that holds its partition's commit back:
                // the worker's rule judges it and it waits for the worker's
                // proof, which the cap lets through, or it would keep the
                // cap full, fresh batches refused, until its hold ends
                // (found by the simulation and in review). A record above
                // the watermark does not keep the cap full: it stays held
                // (found in review: a cap filled by the other tenants
                // dead-lettered it).
                let mut batch = batch;
                let scope = self.scope_of_single(&batch);
                let cap_full = scope.is_some_and(|(_, (partition, offset))| {
                    self.watermark(partition) == Some(offset) && self.records_cap_full()
                });
                if cap_full {
                    batch.lineage.scope_hold = None;
                }
                let explained = self.health.explains(&batch, now);
                let ctx = failure::Context {
                    scope: scope
                        .filter(|_| !cap_full)
                        .map(|(scope, record)| self.health.evidence(scope, record, now)),
                    scope_out: explained && !cap_full,
                    ..ctx
                };
                let (plan, signal) =
                    failure::whole_batch_failed(batch, &f, &self.config.retry, ctx, &mut self.rng);
                // A batch holding a record of a tenant known to be out fails
                // for that tenant: the circuit does not count it, or one
                // tenant's outage would stop every tenant (found in review).
                let signal = match signal {
                    Signal::Failure { .. } if explained => Signal::Nothing,
                    other => other,
                };
                if let Some((scope, record)) = scope {
                    match &plan {
                        Plan::Retry { batch, .. } if batch.lineage.scope_hold.is_some() => {
                            self.health
                                .note_held(scope, record, now, self.next_batch_id);
                            // Spaced from its verdict, not its start: a slow
                            // failure (a hanging shard) let the next held
                            // record go at once (found in review).
                            self.space_scope_retries(slot, now);
                        }
                        _ => self.health.note_gone(scope, record),
                    }
                }
                if let Plan::Bisect(ref a, _) = plan {
                    tracing::info!(
                        partition = slot.partition,
                        records = a.len() * 2,
                        error = %f.error,
                        "batch failed as a whole; bisecting to isolate the failing record"
                    );
                }
                self.observe(signal, batch_id, now);
                self.carry_out(slot, plan, now);
            }
            BatchOutcome::Unavailable(why) => {
                if let Some(suppressed) = self.failure_log.allow(now) {
                    tracing::warn!(partition = slot.partition, records = batch.len(), error = %why, suppressed, "the batch could not be handed over; it waits");
                }
                let (plan, signal) =
                    failure::batch_unavailable(batch, &self.config.retry, ctx, &mut self.rng);
                self.observe(signal, batch_id, now);
                self.carry_out(slot, plan, now);
            }
        }
    }

    /// The consumer's position (the next offset it will hand out) of an
    /// idle partition. On a transactional topic it lies past the commit
    /// markers, which are never handed out; without this the commit would
    /// stay one short of the end.
    pub fn handle_position(&mut self, partition: i32, position: i64) {
        // Draining, records handed out are dropped: the position says nothing.
        if self.phase != Phase::Consuming {
            return;
        }
        if let Some(ps) = self.partitions.get_mut(&partition) {
            if !ps.finishing() {
                ps.offsets.skip_to(position);
            }
        }
    }

    /// The clock: closes batches whose wait is over, starts batches and
    /// dead-letter writes, applies back-pressure, commits when due.
    pub fn handle_tick(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        if self.phase == Phase::Closed {
            self.retry_final_commit_when_due(now);
            return;
        }
        self.close_expired(now);
        for ps in self.partitions.values_mut() {
            ps.stop_filling_holes_after(now);
        }
        self.dispatch(now);
        self.dispatch_dead_letters(now);
        self.apply_backpressure();
        if now >= self.next_commit {
            self.next_commit = now + self.config.commit_interval;
            self.commit(false, |ps| !ps.revoked());
            self.update_lag_ages();
            if self.acknowledgement == Acknowledgement::PerRecord {
                // Each window's report once: the meter answers the last
                // one again until the next closes.
                let wall = self.wall_ms(now) as u64;
                if let Some(report) = self.capacity.report(now, wall) {
                    if self.last_report_at != Some(report.at_unix_ms) {
                        self.last_report_at = Some(report.at_unix_ms);
                        // With the records held now: the group's in-flight
                        // count, sampled.
                        let report = CapacityReport {
                            held: Some(self.held as u64),
                            held_by: Some(
                                self.partitions
                                    .iter()
                                    .filter(|(_, ps)| ps.held > 0)
                                    .map(|(p, ps)| (*p, ps.held as u64))
                                    .collect(),
                            ),
                            ..report.clone()
                        };
                        self.intents
                            .push_back(Intent::ReportCapacity(report.encode()));
                    }
                }
                return;
            }
            let idle: Vec<i32> = self
                .partitions
                .iter()
                .filter(|(_, ps)| ps.offsets.outstanding() == 0 && !ps.finishing())
                .map(|(p, _)| *p)
                .collect();
            if !idle.is_empty() {
                self.intents.push_back(Intent::ReadPositions(idle));
            }
        }
    }

    // ------------------------------------------------------------ commands

    /// Shutdown asked: drain until `drain_timeout` from now (or from the
    /// first request, if asked again).
    pub fn shutdown(&mut self, now: Instant) {
        let Phase::Consuming = self.phase else {
            return;
        };
        let deadline = now + self.config.drain_timeout;
        self.phase = Phase::Draining { deadline };
        for ps in self.partitions.values_mut() {
            ps.start_finishing(now, None);
            if ps.revoked() {
                ps.revoke_by(deadline);
            }
        }
        tracing::info!(
            in_flight = self.in_flight,
            "draining: no new batches; waiting for those in flight"
        );
    }

    /// Revocation starts: the partitions finish what fills holes, until
    /// `drain_timeout` (or the shutdown deadline). Returns whether any of
    /// them was ours.
    pub fn begin_revoke(&mut self, partitions: &[i32], now: Instant) -> bool {
        let deadline = match self.phase {
            Phase::Consuming => now + self.config.drain_timeout,
            Phase::Draining { deadline } => deadline.min(now + self.config.drain_timeout),
            // The final commit is made: nothing is waited for any more.
            Phase::Closed => now,
        };
        let mut any = false;
        for p in partitions {
            if let Some(ps) = self.partitions.get_mut(p) {
                ps.start_finishing(now, Some(HOLE_FILL_BUDGET));
                ps.set_revoke_deadline(deadline);
                any = true;
            }
        }
        any
    }

    /// The group took these partitions away without a revoke (the session
    /// timed out, or the member was fenced): another member may own them
    /// already, so nothing of theirs is drained, started or committed; they
    /// are forgotten at once. Their batches still running are abandoned, as
    /// at a revoke deadline, and their records are redelivered to the owner.
    pub fn handle_lost(&mut self, partitions: &[i32]) {
        for p in partitions {
            let Some(ps) = self.partitions.remove(p) else {
                continue;
            };
            tracing::warn!(
                partition = p,
                "partition lost (session timed out or fenced): dropped without a commit; \
                 its unfinished records go to its new owner"
            );
            self.forget(*p, ps);
        }
        self.capacity.set_slots(self.clock, self.usable_slots());
        self.assigned.clear();
        self.assigned.extend(self.partitions.keys());
    }

    /// Revocation ends: commits what is done of the revoked partitions
    /// (synchronously) and forgets them. Their batches still running are
    /// abandoned; their records will be redelivered to the new owner.
    pub fn complete_revoke(&mut self) {
        self.commit(true, PartitionState::revoked);
        let revoked: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, ps)| ps.revoked())
            .map(|(p, _)| *p)
            .collect();
        for p in revoked {
            let ps = self.partitions.remove(&p).expect("listed above");
            if ps.has_finishing_work() {
                tracing::warn!(
                    partition = p,
                    "revoke deadline passed with work unfinished; it will be redelivered"
                );
            }
            self.forget(p, ps);
        }
        self.capacity.set_slots(self.clock, self.usable_slots());
        self.assigned.clear();
        self.assigned.extend(self.partitions.keys());
    }

    /// The end: the final synchronous commit of everything done.
    pub fn close(&mut self) {
        if self.in_flight > 0 {
            tracing::warn!(
                in_flight = self.in_flight,
                "drain deadline passed; unfinished batches are not committed and will be redelivered"
            );
        }
        self.report.abandoned_batches = self.in_flight;
        self.commit(true, |_| true);
        self.final_commit_until = match self.phase {
            Phase::Draining { deadline } => Some(deadline),
            _ => None,
        };
        self.phase = Phase::Closed;
    }

    /// Whether the pipeline's life is over: closed, and no refused final
    /// commit waits to be tried again ([`Self::handle_commit_refused`]).
    pub fn finished(&self, now: Instant) -> bool {
        self.phase == Phase::Closed
            && !(self.final_commit_retry_at.is_some() && self.final_commit_unacked(now))
    }

    // ------------------------------------------------------------ polls

    pub fn poll_intent(&mut self) -> Option<Intent> {
        self.intents.pop_front()
    }

    /// When [`Self::handle_tick`] has something to do next, at the latest.
    /// Work that waits for a verdict (a busy lane, full slots, a probe
    /// under way) is not counted: the verdict's arrival wakes the loop.
    pub fn poll_timeout(&self) -> Instant {
        if self.phase == Phase::Closed {
            // Only a refused final commit's retry is left to do.
            return self
                .final_commit_retry_at
                .unwrap_or(self.clock + FINAL_COMMIT_RETRY);
        }
        let mut next = self.next_commit;
        let mut consider = |t: Instant| next = next.min(t);
        if let Phase::Draining { deadline } = self.phase {
            consider(deadline);
        }
        let slots_free = self.in_flight < self.config.concurrency;
        if self.circuit.is_open() && self.in_flight == 0 {
            consider(self.circuit.probe_after());
        }
        let retries_can_start = slots_free && !self.circuit.is_open();
        for (p, ps) in &self.partitions {
            if let Some(d) = ps.revoke_deadline() {
                consider(d);
            }
            if let Some(t) = ps.fill_holes_until() {
                consider(t);
            }
            // Dead letters waiting for the topic to be looked at wait for
            // an answer, not a time.
            if ps.earlier_dead_letters.is_some() {
                for d in &ps.dead_letters {
                    consider(d.at);
                }
            }
            for (i, lane) in ps.lanes.iter().enumerate() {
                if let Some(d) = lane.batcher.deadline() {
                    consider(d);
                }
                let blocked = lane.busy() || self.zombies.contains_key(&(*p, i));
                // A partition being given up starts only what fills a hole.
                let given_up = ps.finishing() && !ps.next_is_hole(lane);
                if retries_can_start && !blocked && !given_up {
                    let keep_order = self.config.ordering != Ordering::None;
                    let next_retry = lane.scope_wait(self.clock, keep_order);
                    if let Some(at) = next_retry.or(lane.retry.front().map(|(_, due)| *due)) {
                        consider(at);
                    }
                }
            }
        }
        next
    }

    // ------------------------------------------------------------ inside

    fn is_current(&self, partition: i32, epoch: u64) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|ps| ps.epoch == epoch)
    }

    fn lane_mut(&mut self, slot: Slot) -> &mut Lane {
        let ps = self
            .partitions
            .get_mut(&slot.partition)
            .expect("slot checked current");
        &mut ps.lanes[slot.lane]
    }

    /// Drops a partition's state: its records no longer count as held, and
    /// its lanes still running become zombies.
    fn forget(&mut self, partition: i32, ps: PartitionState) {
        self.lag_seconds.retain(|(p, _)| *p != partition);
        // Its held records no longer count as their scopes failing.
        for (batch, _) in ps.lanes.iter().flat_map(|l| &l.retry) {
            if let Some((scope, record)) = self.scope_of_single(batch) {
                self.health.note_gone(scope, record);
            }
        }
        self.held -= ps.held;
        self.held_bytes = self.held_bytes.saturating_sub(ps.held_bytes);
        for (i, lane) in ps.lanes.iter().enumerate() {
            if lane.busy() {
                *self.zombies.entry((partition, i)).or_insert(0) += 1;
            }
        }
    }

    /// A batch's records in `done` succeeded: evidence for their scopes,
    /// while any is wanted.
    fn scope_succeeded(
        &mut self,
        batch: &Batch,
        batch_id: u64,
        now: Instant,
        done: impl Fn(i64) -> bool,
    ) {
        if !self.health.recording() || !self.scope_successes_count {
            return;
        }
        let mut back = Vec::new();
        for record in batch.records().filter(|r| done(r.offset)) {
            if let Some(scope) = self.health.scope_of(&record) {
                if self.health.note_success(scope, batch_id, now) {
                    back.push(scope);
                }
            }
        }
        if !back.is_empty() {
            self.release_held_for(&back, now);
        }
    }

    /// Scopes that are back: their records held for them are retried now,
    /// as plain held records (a bad one among them is then proven bad by
    /// the success), not one per lane per spacing.
    fn release_held_for(&mut self, scopes: &[u64], now: Instant) {
        let health = &self.health;
        for ps in self.partitions.values_mut() {
            for lane in &mut ps.lanes {
                for (batch, due) in &mut lane.retry {
                    if batch.lineage.scope_hold.is_none() || batch.len() != 1 {
                        continue;
                    }
                    let scope = batch.records().next().and_then(|r| health.scope_of(&r));
                    if scope.is_some_and(|s| scopes.contains(&s)) {
                        batch.lineage.scope_hold = None;
                        *due = now;
                    }
                }
            }
        }
    }

    /// A single record's scope bucket and identity, for the scope rule.
    fn scope_of_single(&self, batch: &Batch) -> Option<(u64, (i32, i64))> {
        if batch.len() != 1 {
            return None;
        }
        let record = batch.records().next()?;
        let scope = self.health.scope_of(&record)?;
        Some((scope, (record.partition, record.offset)))
    }

    /// What a batch's outcome tells the circuit; a success also moves the
    /// proof of health to its batch's id.
    fn observe(&mut self, signal: Signal, batch_id: u64, now: Instant) {
        if signal == Signal::Success {
            self.last_success_id = self.last_success_id.max(batch_id);
        }
        match self.circuit.observe(signal, now) {
            Some(Transition::Opened) => {
                tracing::warn!(
                    consecutive_failures = self.circuit.streak(),
                    "downstream failing; circuit open: probing with one batch at a time"
                );
            }
            Some(Transition::Closed) => {
                tracing::info!("downstream recovered; circuit closed");
            }
            None => {}
        }
    }

    fn processed(
        &mut self,
        partition: i32,
        offsets: Vec<i64>,
        bytes: usize,
        handler_time: Duration,
    ) {
        self.mark_done(partition, offsets.iter().copied(), bytes);
        self.capacity.processed(offsets.len(), handler_time);
        if self.audit && !offsets.is_empty() {
            self.intents
                .push_back(Intent::Processed { partition, offsets });
        }
    }

    fn mark_done(&mut self, partition: i32, offsets: impl Iterator<Item = i64>, bytes: usize) {
        let Some(ps) = self.partitions.get_mut(&partition) else {
            return;
        };
        let per_record = self.acknowledgement == Acknowledgement::PerRecord;
        let watermark_before = ps.offsets.watermark();
        let mut n = 0;
        let mut accepted = Vec::new();
        for o in offsets {
            if per_record {
                accepted.push(o);
            } else {
                ps.offsets.mark_done(o);
            }
            n += 1;
        }
        if !accepted.is_empty() {
            self.intents.push_back(Intent::Accept {
                partition,
                offsets: accepted,
            });
        }
        if let Some(wm) = ps.offsets.watermark() {
            while ps.timestamps.front().is_some_and(|(o, _)| *o < wm) {
                ps.timestamps.pop_front();
            }
        }
        ps.ledger.done(&ps.offsets, watermark_before, self.clock);
        ps.held -= n;
        self.held -= n;
        debug_assert!(ps.held_bytes >= bytes, "released more bytes than were held");
        // A miscount must never leave the worker full for good.
        ps.held_bytes = ps.held_bytes.saturating_sub(bytes);
        self.held_bytes = self.held_bytes.saturating_sub(bytes);
    }

    fn carry_out(&mut self, slot: Slot, plan: Plan, now: Instant) {
        let Some(plan) = self.sabotage.plan(plan) else {
            return;
        };
        match plan {
            Plan::Retry { batch, at } => {
                self.counted.records_retried += batch.len() as u64;
                self.lane_mut(slot).retry.push_back((batch, at));
            }
            Plan::Bisect(a, b) => {
                let lane = self.lane_mut(slot);
                lane.retry.push_front((b, now));
                lane.retry.push_front((a, now));
            }
            Plan::DeadLetter { batch, failures } => {
                if !self.dlq_enabled {
                    let (offset, failure) = failures
                        .into_iter()
                        .next()
                        .expect("a dead letter names its failure");
                    tracing::error!(partition = slot.partition, offset, error = %failure.error, "record failed for good and --dlq is off; stopping");
                    self.fatal.get_or_insert(Undeliverable {
                        partition: slot.partition,
                        offset,
                        error: failure.error,
                    });
                    return;
                }
                self.queue_dead_letter(slot, batch, failures, now);
            }
        }
    }

    /// Closes batches whose wait is over.
    fn close_expired(&mut self, now: Instant) {
        let none_mode = self.config.ordering == Ordering::None;
        for ps in self.partitions.values_mut() {
            let lanes = ps.lanes.len();
            for (i, lane) in ps.lanes.iter_mut().enumerate() {
                if let Some(batch) = lane.batcher.poll_expired(now) {
                    lane.ready.push_back(batch);
                    if none_mode && i == ps.fill_lane {
                        ps.fill_lane = (ps.fill_lane + 1) % lanes;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod sim;

#[cfg(test)]
mod tests;
