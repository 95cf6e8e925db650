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

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::batch::{Batch, Batcher};
use crate::capacity::{CapacityMeter, DEFAULT_WINDOW};
use crate::config::{Ordering, WorkerConfig};
use crate::failure::{self, Circuit, Plan, Signal, Transition};
use crate::fetch::ConsumedRecord;
use crate::handler::{BatchOutcome, Failure};
use crate::offsets::PartitionOffsets;
use crate::telemetry::Telemetry;
use microbatch_kafka::LogThrottle;

/// Commits remembered per partition while unacknowledged (async commits
/// overlap only when the broker is slow; older ones are superseded).
const MAX_COMMITS_REMEMBERED: usize = 16;
/// How long a revoked partition still starts batches that fill holes below
/// done records, so that its last commit covers them; after that it waits
/// only for the batches in flight. The partition is stopped for the whole
/// revoke: a scale step's goal is that a moving partition resumes within
/// about a second. A shutdown fills its holes until the drain deadline:
/// it hands over nothing done twice, and the group waits for it anyway.
const HOLE_FILL_BUDGET: Duration = Duration::from_secs(1);
const FIRST_DEAD_LETTER_BACKOFF: Duration = Duration::from_millis(200);
const MAX_DEAD_LETTER_BACKOFF: Duration = Duration::from_secs(30);

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

#[derive(Debug)]
struct Lane {
    batcher: Batcher,
    /// Closed batches waiting for this lane's slot, oldest first.
    ready: VecDeque<Batch>,
    /// Failed records to try again, with when; they go before `ready`.
    retry: VecDeque<(Batch, Instant)>,
    /// When the batch in this lane's slot started, while one is in flight.
    in_flight_since: Option<Instant>,
}

impl Lane {
    /// A batch of this lane is in the handler.
    fn busy(&self) -> bool {
        self.in_flight_since.is_some()
    }

    /// The lowest offset waiting here to start, as a retry or a closed batch.
    fn oldest_waiting(&self) -> Option<i64> {
        let retry = self.retry.front().and_then(|(b, _)| b.first_offset());
        let ready = self.ready.front().and_then(Batch::first_offset);
        retry.into_iter().chain(ready).min()
    }
}

#[derive(Debug)]
struct PendingDeadLetter {
    batch: Batch,
    failures: Vec<(i64, Failure)>,
    attempts: u32,
    at: Instant,
    backoff: Duration,
}

#[derive(Debug)]
struct PartitionState {
    epoch: u64,
    offsets: PartitionOffsets,
    lanes: Vec<Lane>,
    /// Records buffered, queued, in flight or waiting for their dead letter.
    held: usize,
    /// Their key and value bytes.
    held_bytes: usize,
    paused: bool,
    /// For `Ordering::None`: the lane being filled.
    fill_lane: usize,
    /// Being given up (shutdown or revoke): only batches that fill a hole
    /// below done records are still started.
    finishing: bool,
    /// While finishing: holes lie below this offset, the highest one handed
    /// to the handler when finishing began. A bound that rose with every hole
    /// filled would take a backlog through, lane by lane, before the
    /// partition moves on.
    holes_below: i64,
    /// The highest offset of any batch started.
    max_started: Option<i64>,
    /// While finishing: until when holes are still filled.
    fill_holes_until: Option<Instant>,
    /// Set while revoked: when the revocation stops waiting.
    revoke_deadline: Option<Instant>,
    /// Dead letters waiting for their (next) write.
    dead_letters: VecDeque<PendingDeadLetter>,
    /// Dead-letter writes under way.
    dead_letters_in_flight: HashMap<u64, PendingDeadLetter>,
    /// The highest offset the broker acknowledged as committed.
    acked: Option<i64>,
    /// (offset, timestamp) of the records taken in and not yet below the
    /// watermark, oldest first: the front is the age of the lag
    /// (`microbatch_partition_lag_seconds`).
    timestamps: VecDeque<(i64, i64)>,
    /// Since when records below the watermark wait for the broker to
    /// acknowledge their commit; a crash now would replay them.
    unacked_since: Option<Instant>,
    /// Since when done records wait above a watermark that has not moved,
    /// for an unfinished record (a retry, a dead letter being written); a
    /// crash would replay them.
    held_back_since: Option<Instant>,
    /// Commits sent and not acknowledged yet: (offset, when sent).
    commits_sent: VecDeque<(i64, Instant)>,
}

impl PartitionState {
    fn new(epoch: u64, config: &WorkerConfig) -> Self {
        let lanes = (0..config.slots_per_partition())
            .map(|_| Lane {
                batcher: Batcher::new(config.batch),
                ready: VecDeque::new(),
                retry: VecDeque::new(),
                in_flight_since: None,
            })
            .collect();
        Self {
            epoch,
            offsets: PartitionOffsets::new(),
            lanes,
            held: 0,
            held_bytes: 0,
            paused: false,
            fill_lane: 0,
            finishing: false,
            holes_below: i64::MIN,
            max_started: None,
            fill_holes_until: None,
            revoke_deadline: None,
            dead_letters: VecDeque::new(),
            dead_letters_in_flight: HashMap::new(),
            acked: None,
            timestamps: VecDeque::new(),
            unacked_since: None,
            held_back_since: None,
            commits_sent: VecDeque::new(),
        }
    }

    /// Whether the watermark lies past what the broker acknowledged.
    fn watermark_unacked(&self) -> bool {
        let Some(wm) = self.offsets.watermark() else {
            return false;
        };
        self.acked
            .or(self.offsets.first_seen())
            .is_some_and(|a| wm > a)
    }

    /// What the partition may start while finished work a crash would
    /// replay has waited longer than `limit` for its commit. Open while a
    /// record waits for a success to prove it bad.
    fn gate(&self, now: Instant, limit: Option<Duration>, successes: u64) -> Gate {
        let Some(max) = limit else {
            return Gate::Open;
        };
        let over = |since: Option<Instant>| {
            since.is_some_and(|at| now.saturating_duration_since(at) > max)
        };
        if !over(self.unacked_since) && !over(self.held_back_since) || self.awaits_proof(successes)
        {
            return Gate::Open;
        }
        match self.offsets.watermark() {
            Some(wm) if !over(self.unacked_since) => Gate::Watermark(wm),
            _ => Gate::Closed,
        }
    }

    /// Finished records a crash now would replay: those done at or past
    /// the last commit the broker acknowledged.
    fn replayable(&self) -> usize {
        let Some(wm) = self.offsets.watermark() else {
            return 0;
        };
        let base = self.acked.or(self.offsets.first_seen()).unwrap_or(wm);
        usize::try_from(wm - base).unwrap_or(0) + self.offsets.done_above_watermark()
    }

    /// Whether a commit sent now would cover more than the broker has
    /// acknowledged, with none on its way: commits wait in line at the
    /// coordinator, so one that waits for the one before it would carry an
    /// older watermark than one sent when that is acknowledged.
    fn commit_due_early(&self) -> bool {
        self.commits_sent.is_empty() && self.watermark_unacked()
    }

    /// Whether a record held as a suspected outage waits for a batch to
    /// succeed after it first failed (the proof it is the record, not the
    /// downstream): then fresh batches must start, exposed or not.
    fn awaits_proof(&self, successes: u64) -> bool {
        self.lanes
            .iter()
            .flat_map(|l| &l.retry)
            .any(|(b, _)| Self::batch_awaits_proof(b, successes))
    }

    fn batch_awaits_proof(batch: &Batch, successes: u64) -> bool {
        batch.lineage.suspect
            && batch
                .lineage
                .successes_at_first_failure
                .is_some_and(|at| successes <= at)
    }

    /// Records taken to the handler that are neither in flight nor done:
    /// failed ones waiting for their retry, held ones, dead letters not yet
    /// acknowledged. Each is on its way to being done, and a crash replays
    /// it then: the records cap counts them from the first start.
    fn waiting_to_finish(&self) -> usize {
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
    fn has_waits_that_move(&self, successes: u64) -> bool {
        self.dead_letter_backlog() > 0
            || self
                .lanes
                .iter()
                .flat_map(|l| &l.retry)
                .any(|(b, _)| !Self::batch_awaits_proof(b, successes))
    }

    /// Closes open batches and marks the partition finishing; holes are
    /// filled for `hole_budget` (None: until the deadline).
    fn start_finishing(&mut self, now: Instant, hole_budget: Option<Duration>) {
        if !self.finishing {
            self.fill_holes_until = hole_budget.map(|b| now + b);
            self.holes_below = self
                .offsets
                .max_done()
                .max(self.max_started)
                .unwrap_or(i64::MIN);
        }
        self.finishing = true;
        for lane in &mut self.lanes {
            if let Some(batch) = lane.batcher.take() {
                lane.ready.push_back(batch);
            }
        }
    }

    /// A batch a finishing lane starts, cut to the records below
    /// `holes_below`; the rest goes back to the front of the lane. Records
    /// of a lane lie far apart, so a whole batch would finish records above
    /// the bound, whose holes are not filled, and a commit stopped at those
    /// holes would hand them to the next owner to do again.
    fn trim_to_holes(&mut self, lane: usize, batch: Batch) -> Batch {
        if !self.finishing || batch.last_offset().is_none_or(|o| o < self.holes_below) {
            return batch;
        }
        let bound = self.holes_below;
        let rest = batch.select(batch.id(), |o| o >= bound);
        self.lanes[lane].ready.push_front(rest);
        batch.select(batch.id(), |o| o < bound)
    }

    /// Whether a lane's next batch still fills a hole.
    fn next_is_hole(&self, lane: &Lane) -> bool {
        let next = lane.retry.front().map(|(b, _)| b).or(lane.ready.front());
        next.and_then(Batch::first_offset)
            .is_some_and(|o| self.offsets.is_hole(o) && o < self.holes_below)
    }

    /// Whether any work is left that finishing would still do.
    fn has_finishing_work(&self) -> bool {
        !self.dead_letters_in_flight.is_empty()
            || !self.dead_letters.is_empty()
            || self.lanes.iter().any(|l| l.busy() || self.next_is_hole(l))
    }

    fn dead_letter_backlog(&self) -> usize {
        self.dead_letters
            .iter()
            .chain(self.dead_letters_in_flight.values())
            .map(|d| d.batch.len())
            .sum()
    }

    fn lane_for(&self, ordering: Ordering, key: Option<&[u8]>, offset: i64) -> usize {
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

/// Which fresh batches a partition may start while its finished work waits
/// for its commit (`--max-uncommitted-ms`); retries always may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Open,
    /// Done records wait above the watermark: only the batch that holds the
    /// watermark's record, which lets the commit move.
    Watermark(i64),
    /// The broker has not acknowledged a commit for too long: nothing new,
    /// since moving the watermark cannot help.
    Closed,
}

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
struct RecordsCap {
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
        config: &WorkerConfig,
        cap: usize,
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
            slack: config.max_records_in_flight(),
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
        let exempt = ps.finishing || moves_watermark || gives_proof;
        if exempt && exposed + batch.len() <= self.cap + self.slack {
            return true;
        }
        // A partition given up is left to its next owner, not forced.
        if exempt && !ps.finishing {
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

impl Gate {
    fn allows(self, fresh: Option<&Batch>) -> bool {
        match self {
            Gate::Open => true,
            Gate::Watermark(wm) => fresh.and_then(Batch::first_offset) == Some(wm),
            Gate::Closed => false,
        }
    }
}

/// Which batch a lane would start next, if any.
#[derive(PartialEq, Eq)]
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

/// Deliberate defects for the simulation's self-test: each breaks one
/// invariant, to prove the simulation would catch it.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sabotage {
    pub commit_one_past: bool,
    pub drop_retries: bool,
    pub ignore_lane_busy: bool,
    pub dead_letter_first_failure: bool,
    pub never_pause: bool,
    pub ignore_records_cap: bool,
    /// The records cap leaves out records waiting for a retry.
    pub uncounted_retries: bool,
    /// Batches exempt from the records cap pass it by any amount.
    pub unbounded_exemptions: bool,
    /// An acknowledgement older than one before it is taken for a stale
    /// answer, not for what the broker holds.
    pub keep_highest_ack: bool,
}

/// How a pipeline is set up, beside its [`WorkerConfig`].
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
}

/// The pipeline of one worker. See the module docs.
pub struct Pipeline {
    config: WorkerConfig,
    topic: Arc<str>,
    telemetry: Arc<Telemetry>,
    dlq_enabled: bool,
    audit: bool,
    keep_headers: bool,
    rng: StdRng,
    /// The wall clock at `started`, for record ages.
    started: Instant,
    started_wall_ms: i64,
    partitions: BTreeMap<i32, PartitionState>,
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
    successes: u64,
    circuit: Circuit,
    phase: Phase,
    /// After `close`: until when a final commit the broker refused is
    /// tried again (the drain deadline).
    final_commit_until: Option<Instant>,
    next_commit: Instant,
    fatal: Option<Undeliverable>,
    report: Report,
    /// Handler failures are logged at most once per back-off step.
    failure_log: LogThrottle,
    /// How busy the slots are and how much gets done: sent with commits.
    capacity: CapacityMeter,
    /// The latest time an event brought.
    clock: Instant,
    #[cfg(test)]
    pub(crate) sabotage: Sabotage,
}

impl Pipeline {
    /// `wall_ms`: the wall clock at `now`, in milliseconds since the epoch.
    pub fn new(
        config: WorkerConfig,
        options: Options,
        telemetry: Arc<Telemetry>,
        now: Instant,
        wall_ms: i64,
    ) -> Self {
        let Options {
            dead_letters: dlq_enabled,
            audit,
            keep_headers,
            seed,
        } = options;
        Self {
            topic: Arc::from(config.topic.as_str()),
            next_commit: now + config.commit_interval,
            final_commit_until: None,
            config,
            telemetry,
            dlq_enabled,
            audit,
            keep_headers,
            rng: StdRng::seed_from_u64(seed),
            started: now,
            started_wall_ms: wall_ms,
            partitions: BTreeMap::new(),
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
            successes: 0,
            circuit: Circuit::new(now),
            phase: Phase::Consuming,
            fatal: None,
            report: Report::default(),
            failure_log: LogThrottle::default(),
            capacity: CapacityMeter::new(CapacityMeter::process_worker_id(), DEFAULT_WINDOW, now),
            clock: now,
            #[cfg(test)]
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
        self.partitions.values().all(|p| match p.revoke_deadline {
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
            .any(|ps| ps.awaits_proof(self.successes))
    }

    /// (replayable finished records, records in flight), for the simulation.
    #[cfg(test)]
    pub(crate) fn exposure(&self) -> (usize, usize) {
        (
            self.partitions
                .values()
                .map(PartitionState::replayable)
                .sum(),
            self.in_flight_records,
        )
    }

    /// A one-line picture of the state, for the simulation's failure reports.
    #[cfg(test)]
    pub(crate) fn debug_state(&self, now: Instant) -> String {
        let mut out = format!(
            "phase {:?} in_flight {} held {} circuit_open {} probe in {:?} ms, zombies {:?};",
            self.phase,
            self.in_flight,
            self.held,
            self.circuit.is_open(),
            self.circuit
                .probe_after()
                .saturating_duration_since(now)
                .as_millis(),
            self.zombies
        );
        for (p, ps) in &self.partitions {
            out += &format!(
                " p{p}[epoch {} wm {:?} held {} paused {} finishing {} dlq {}+{} lanes:",
                ps.epoch,
                ps.offsets.watermark(),
                ps.held,
                ps.paused,
                ps.finishing,
                ps.dead_letters.len(),
                ps.dead_letters_in_flight.len()
            );
            for lane in &ps.lanes {
                out += &format!(
                    " (busy {} open {} ready {:?} retry {:?})",
                    lane.busy(),
                    lane.batcher.len(),
                    lane.ready
                        .iter()
                        .map(|b| b.offsets().collect::<Vec<_>>())
                        .collect::<Vec<_>>(),
                    lane.retry
                        .iter()
                        .map(|(b, due)| (
                            b.offsets().collect::<Vec<_>>(),
                            b.attempt,
                            b.lineage.suspect,
                            due.saturating_duration_since(now).as_millis()
                        ))
                        .collect::<Vec<_>>()
                );
            }
            out += "]";
        }
        out
    }

    // ------------------------------------------------------------ events

    /// Partitions assigned to this member. Each new one starts afresh and is
    /// resumed, since librdkafka keeps a pause the application set before
    /// the partition was revoked, and this state starts unpaused. One this
    /// member owns already goes on as it is.
    pub fn handle_assign(&mut self, partitions: &[i32]) {
        let mut resumed = Vec::with_capacity(partitions.len());
        for &p in partitions {
            if self
                .partitions
                .get(&p)
                .is_some_and(|ps| ps.revoke_deadline.is_none())
            {
                // Ours already (an assignment can name it again): starting
                // afresh would forget what is in flight and commit past it.
                continue;
            }
            self.next_epoch += 1;
            let mut state = PartitionState::new(self.next_epoch, &self.config);
            if self.phase == Phase::Consuming {
                resumed.push(p);
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
        self.telemetry
            .metrics
            .assigned_partitions
            .set(self.partitions.len() as i64);
        self.capacity.set_slots(self.clock, self.usable_slots());
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
        let Some(ps) = self.partitions.get_mut(&partition) else {
            return;
        };
        if ps.finishing {
            return;
        }
        if ps.offsets.last_seen().is_some_and(|last| offset <= last) {
            // The consumer's position moved back (an offset reset after the
            // log was truncated, or a seek): what was tracked is void.
            tracing::warn!(
                partition,
                offset,
                last_seen = ps.offsets.last_seen(),
                "offsets went backwards; the partition restarts from the new offset"
            );
            self.telemetry.metrics.offset_resets.inc();
            self.next_epoch += 1;
            let state = PartitionState::new(self.next_epoch, &self.config);
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
        ps.offsets.track(offset);
        if let Some(ts) = msg.timestamp_ms() {
            ps.timestamps.push_back((offset, ts));
        }
        let lane_idx = ps.lane_for(ordering, msg.key(), offset);
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
        let m = &self.telemetry.metrics;
        let ctx = failure::Context {
            now,
            wall_ms: self.wall_ms(now),
            circuit_open: self.circuit.is_open(),
            successes: self.successes,
        };
        match outcome {
            BatchOutcome::Success => {
                m.records_processed.inc_by(batch.len() as u64);
                m.batches_processed.inc();
                self.report.records_processed += batch.len() as u64;
                self.observe(Signal::Success, now);
                self.processed(
                    slot.partition,
                    batch.offsets().collect(),
                    batch.payload_bytes(),
                    handler_time,
                );
            }
            BatchOutcome::Partial(failed) => {
                let failed: HashMap<i64, Failure> = failed
                    .into_iter()
                    .filter(|(o, _)| batch.offsets().any(|b| b == *o))
                    .collect();
                m.batches_failed.inc();
                m.records_failed.inc_by(failed.len() as u64);
                let done: Vec<i64> = batch
                    .offsets()
                    .filter(|o| !failed.contains_key(o))
                    .collect();
                m.records_processed.inc_by(done.len() as u64);
                self.report.records_processed += done.len() as u64;
                let signal = if done.is_empty() {
                    Signal::Failure {
                        root: batch.lineage.root,
                    }
                } else {
                    Signal::Success
                };
                self.observe(signal, now);
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
                m.batches_failed.inc();
                m.records_failed.inc_by(batch.len() as u64);
                if let Some(suppressed) = self.failure_log.allow(now) {
                    tracing::warn!(partition = slot.partition, records = batch.len(), error = %f.error, retryable = f.retryable, suppressed, "the batch failed as a whole");
                }
                let (plan, signal) =
                    failure::whole_batch_failed(batch, &f, &self.config.retry, ctx, &mut self.rng);
                if let Plan::Bisect(ref a, _) = plan {
                    tracing::info!(
                        partition = slot.partition,
                        records = a.len() * 2,
                        error = %f.error,
                        "batch failed as a whole; bisecting to isolate the failing record"
                    );
                }
                self.observe(signal, now);
                self.carry_out(slot, plan, now);
            }
        }
    }

    /// A dead-letter write ended: `written` are acknowledged by the broker;
    /// `error` says why the rest were not.
    pub fn handle_dead_lettered(
        &mut self,
        slot: DeadLetterSlot,
        written: &[i64],
        error: Option<String>,
        now: Instant,
    ) {
        if !self.is_current(slot.partition, slot.epoch) {
            return;
        }
        let ps = self
            .partitions
            .get_mut(&slot.partition)
            .expect("checked current");
        let Some(mut pending) = ps.dead_letters_in_flight.remove(&slot.id) else {
            return;
        };
        self.telemetry
            .metrics
            .records_dead_lettered
            .inc_by(written.len() as u64);
        self.report.records_dead_lettered += written.len() as u64;
        let written_set: std::collections::HashSet<i64> = written.iter().copied().collect();
        let bytes = pending
            .batch
            .payload_bytes_where(|o| written_set.contains(&o));
        self.mark_done(slot.partition, written.iter().copied(), bytes);
        self.capacity.dead_lettered(written.len());
        let Some(error) = error else {
            return;
        };
        let rest = pending
            .batch
            .select(pending.batch.id(), |o| !written.contains(&o));
        if rest.is_empty() {
            return;
        }
        tracing::error!(
            partition = slot.partition,
            records = rest.len(),
            retry_in_ms = pending.backoff.as_millis() as u64,
            error = %error,
            "dead letters not written; nothing past them is committed until they are"
        );
        self.telemetry
            .readiness
            .set_dead_letter_error(Some(format!("{} records waiting: {error}", rest.len())));
        pending.batch = rest;
        pending.at = now + pending.backoff;
        pending.backoff = (pending.backoff * 2).min(MAX_DEAD_LETTER_BACKOFF);
        let ps = self
            .partitions
            .get_mut(&slot.partition)
            .expect("checked current");
        ps.dead_letters.push_back(pending);
    }

    /// The broker acknowledged a commit of `offset` (the next offset) for
    /// `partition`. The latest acknowledgement is what the broker holds: one
    /// older than an earlier one (a commit retried after a coordinator
    /// outage, applied after a newer one) moved the committed offset back,
    /// and the next interval commits the watermark again.
    pub fn handle_committed(&mut self, partition: i32, offset: i64) {
        let Some(ps) = self.partitions.get_mut(&partition) else {
            return;
        };
        let went_back = ps.acked.is_some_and(|a| offset < a);
        #[cfg(test)]
        if went_back && self.sabotage.keep_highest_ack {
            return;
        }
        ps.acked = Some(offset);
        if went_back {
            tracing::debug!(
                partition,
                offset,
                "an older commit was acknowledged last; committing again"
            );
            ps.unacked_since.get_or_insert(self.clock);
        }
        // What was done when the acknowledged commit was sent is safe; what
        // is unacknowledged now was done after it was sent.
        let mut sent_at = None;
        while ps.commits_sent.front().is_some_and(|(o, _)| *o <= offset) {
            sent_at = ps.commits_sent.pop_front().map(|(_, at)| at);
        }
        if !ps.watermark_unacked() {
            ps.unacked_since = None;
        } else if let Some(at) = sent_at {
            ps.unacked_since = Some(at);
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
            if !ps.finishing {
                ps.offsets.skip_to(position);
            }
        }
    }

    /// The clock: closes batches whose wait is over, starts batches and
    /// dead-letter writes, applies back-pressure, commits when due.
    pub fn handle_tick(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        if self.phase == Phase::Closed {
            return;
        }
        self.close_expired(now);
        for ps in self.partitions.values_mut() {
            if ps.fill_holes_until.is_some_and(|t| now >= t) {
                ps.fill_holes_until = None;
                ps.holes_below = i64::MIN;
            }
        }
        self.dispatch(now);
        self.dispatch_dead_letters(now);
        // The circuit stays open until a success (an outage outlives a
        // rebalance that empties the pipeline), but readiness reports it
        // only while records wait on the downstream: permanent failures
        // that drained an idle topic leave nothing waiting, and a 503 then
        // would only say "no success since" about a downstream nobody needs.
        let waiting = self.circuit.is_open() && (self.held > 0 || self.in_flight > 0);
        self.telemetry.readiness.set_circuit_open(waiting);
        self.apply_backpressure();
        if now >= self.next_commit {
            self.next_commit = now + self.config.commit_interval;
            self.commit(false, |ps| ps.revoke_deadline.is_none());
            self.update_lag_ages();
            let idle: Vec<i32> = self
                .partitions
                .iter()
                .filter(|(_, ps)| ps.offsets.outstanding() == 0 && !ps.finishing)
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
            if let Some(d) = ps.revoke_deadline.as_mut() {
                *d = (*d).min(deadline);
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
                ps.revoke_deadline = Some(deadline);
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
            let label = crate::telemetry::PartitionLabel {
                topic: self.topic.to_string(),
                partition: *p,
            };
            self.telemetry.metrics.partition_lag.remove(&label);
            self.telemetry.metrics.partition_lag_seconds.remove(&label);
        }
        self.telemetry
            .metrics
            .assigned_partitions
            .set(self.partitions.len() as i64);
        self.capacity.set_slots(self.clock, self.usable_slots());
        self.update_gauges();
    }

    /// Revocation ends: commits what is done of the revoked partitions
    /// (synchronously) and forgets them. Their batches still running are
    /// abandoned; their records will be redelivered to the new owner.
    pub fn complete_revoke(&mut self) {
        self.commit(true, |ps| ps.revoke_deadline.is_some());
        let revoked: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, ps)| ps.revoke_deadline.is_some())
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
            let label = crate::telemetry::PartitionLabel {
                topic: self.topic.to_string(),
                partition: p,
            };
            self.telemetry.metrics.partition_lag.remove(&label);
            self.telemetry.metrics.partition_lag_seconds.remove(&label);
        }
        self.telemetry
            .metrics
            .assigned_partitions
            .set(self.partitions.len() as i64);
        self.capacity.set_slots(self.clock, self.usable_slots());
        self.update_gauges();
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

    /// Whether, after `close`, done work is still unacknowledged while the
    /// drain deadline allows another try. Under the classic protocol the
    /// broker refuses commits while the group rebalances (another worker
    /// stopping at the same moment): leaving then would hand records that
    /// are done to the next owner as not done. The worker goes on serving
    /// the group, so the rebalance can end, and calls
    /// [`Self::retry_final_commit`].
    pub fn final_commit_pending(&self, now: Instant) -> bool {
        self.phase == Phase::Closed
            && self.final_commit_until.is_some_and(|until| now < until)
            && self
                .partitions
                .values()
                .any(PartitionState::watermark_unacked)
    }

    /// Commits again, synchronously, what the broker has not acknowledged.
    pub fn retry_final_commit(&mut self) {
        self.commit(true, |_| true);
    }

    // ------------------------------------------------------------ polls

    pub fn poll_intent(&mut self) -> Option<Intent> {
        self.intents.pop_front()
    }

    /// When [`Self::handle_tick`] has something to do next, at the latest.
    /// Work that waits for a verdict (a busy lane, full slots, a probe
    /// under way) is not counted: the verdict's arrival wakes the loop.
    pub fn poll_timeout(&self) -> Instant {
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
            if let Some(d) = ps.revoke_deadline {
                consider(d);
            }
            if let Some(t) = ps.fill_holes_until {
                consider(t);
            }
            for d in &ps.dead_letters {
                consider(d.at);
            }
            for (i, lane) in ps.lanes.iter().enumerate() {
                if let Some(d) = lane.batcher.deadline() {
                    consider(d);
                }
                let blocked = lane.busy() || self.zombies.contains_key(&(*p, i));
                if let (Some((_, due)), true) = (lane.retry.front(), retries_can_start && !blocked)
                {
                    consider(*due);
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
        self.held -= ps.held;
        self.held_bytes = self.held_bytes.saturating_sub(ps.held_bytes);
        for (i, lane) in ps.lanes.iter().enumerate() {
            if lane.busy() {
                *self.zombies.entry((partition, i)).or_insert(0) += 1;
            }
        }
    }

    fn observe(&mut self, signal: Signal, now: Instant) {
        if signal == Signal::Success {
            self.successes += 1;
        }
        match self.circuit.observe(signal, now) {
            Some(Transition::Opened) => {
                self.telemetry.metrics.circuit_open.set(1);
                // At once, not at the next tick: the failure that opened it
                // is a record waiting on it.
                self.telemetry.readiness.set_circuit_open(true);
                tracing::warn!(
                    consecutive_failures = self.circuit.streak(),
                    "downstream failing; circuit open: probing with one batch at a time"
                );
            }
            Some(Transition::Closed) => {
                self.telemetry.metrics.circuit_open.set(0);
                self.telemetry.readiness.set_circuit_open(false);
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
        let watermark_before = ps.offsets.watermark();
        let mut n = 0;
        for o in offsets {
            ps.offsets.mark_done(o);
            n += 1;
        }
        if let Some(wm) = ps.offsets.watermark() {
            while ps.timestamps.front().is_some_and(|(o, _)| *o < wm) {
                ps.timestamps.pop_front();
            }
        }
        let now = self.clock;
        if ps.watermark_unacked() {
            ps.unacked_since.get_or_insert(now);
        }
        // Held back since the watermark last moved: under key order, lanes
        // finish out of order all the time, and only a watermark that stays
        // put means a record in front is stuck.
        if ps.offsets.done_above_watermark() == 0 {
            ps.held_back_since = None;
        } else if ps.offsets.watermark() != watermark_before {
            ps.held_back_since = Some(now);
        } else {
            ps.held_back_since.get_or_insert(now);
        }
        ps.held -= n;
        self.held -= n;
        debug_assert!(ps.held_bytes >= bytes, "released more bytes than were held");
        // A miscount must never leave the worker full for good.
        ps.held_bytes = ps.held_bytes.saturating_sub(bytes);
        self.held_bytes = self.held_bytes.saturating_sub(bytes);
    }

    fn carry_out(&mut self, slot: Slot, plan: Plan, now: Instant) {
        #[cfg(test)]
        let Some(plan) = self.sabotaged(plan) else {
            return;
        };
        match plan {
            Plan::Retry { batch, at } => {
                self.telemetry
                    .metrics
                    .records_retried
                    .inc_by(batch.len() as u64);
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
                for (offset, failure) in &failures {
                    tracing::warn!(
                        partition = slot.partition,
                        offset,
                        attempts = batch.attempt,
                        error = %failure.error,
                        "record failed for good; writing it to the dead-letter topic"
                    );
                }
                let attempts = batch.attempt;
                let ps = self
                    .partitions
                    .get_mut(&slot.partition)
                    .expect("slot checked current");
                ps.dead_letters.push_back(PendingDeadLetter {
                    batch,
                    failures,
                    attempts,
                    at: now,
                    backoff: FIRST_DEAD_LETTER_BACKOFF,
                });
                self.dispatch_dead_letters(now);
            }
        }
    }

    #[cfg(test)]
    fn sabotaged(&mut self, plan: Plan) -> Option<Plan> {
        match plan {
            // Forget the records: nothing will ever finish them.
            Plan::Retry { .. } if self.sabotage.drop_retries => None,
            Plan::Retry { batch, .. } if self.sabotage.dead_letter_first_failure => {
                let failures = batch
                    .offsets()
                    .map(|o| (o, Failure::retryable("sabotage")))
                    .collect();
                Some(Plan::DeadLetter { batch, failures })
            }
            plan => Some(plan),
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
    ) -> Next {
        if ps.finishing && !ps.next_is_hole(lane) {
            return Next::Nothing;
        }
        let next = Self::next_ungated(lane, now, prefer);
        if next == Next::Ready && !gate.allows(lane.ready.front()) {
            return Next::Nothing;
        }
        next
    }

    fn next_ungated(lane: &Lane, now: Instant, prefer: Prefer) -> Next {
        let suspect = lane.retry.front().is_some_and(|(b, _)| b.lineage.suspect);
        match (lane.retry.front(), prefer) {
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

    /// Starts batches on free slots, round-robin over partitions.
    fn dispatch(&mut self, now: Instant) {
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
        #[cfg(test)]
        let cap = if self.sabotage.ignore_records_cap {
            0
        } else {
            self.config.max_uncommitted_records
        };
        #[cfg(not(test))]
        let cap = self.config.max_uncommitted_records;
        let mut records_cap = RecordsCap::new(
            &self.config,
            cap,
            &self.partitions,
            self.in_flight_records,
            cap > 0 && (probing || self.awaits_proof()),
        );
        #[cfg(test)]
        {
            if self.sabotage.uncounted_retries {
                records_cap.waiting = 0;
            }
            if self.sabotage.unbounded_exemptions {
                records_cap.slack = usize::MAX / 2;
            }
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
            self.commit(false, |ps| {
                ps.revoke_deadline.is_none() && ps.commit_due_early()
            });
        }
        for (slot, batch) in starts {
            self.in_flight += 1;
            self.in_flight_records += batch.len();
            self.capacity.set_busy(now, self.in_flight);
            self.telemetry
                .metrics
                .batch_size
                .observe(batch.len() as f64);
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
                let gate = if ps.finishing {
                    Gate::Open
                } else {
                    ps.gate(now, uncommitted_limit, self.successes)
                };
                // Oldest first: the lane holding the partition's lowest
                // waiting offset holds its commit back. Taken in index
                // order, the first lanes ran dry early and the last ones
                // ran alone at the end of a backlog (a tenth of a drain
                // with 4 slots on 2 partitions).
                self.lane_order.clear();
                self.lane_order.extend(
                    ps.lanes
                        .iter()
                        .enumerate()
                        .filter_map(|(i, lane)| Some((lane.oldest_waiting()?, i))),
                );
                self.lane_order.sort_unstable();
                for k in 0..self.lane_order.len() {
                    let i = self.lane_order[k].1;
                    if self.in_flight + starts.len() >= limit {
                        break 'outer;
                    }
                    #[cfg(test)]
                    let busy = ps.lanes[i].busy() && !self.sabotage.ignore_lane_busy;
                    #[cfg(not(test))]
                    let busy = ps.lanes[i].busy();
                    if busy || (!self.zombies.is_empty() && self.zombies.contains_key(&(*p, i))) {
                        continue;
                    }
                    let next = Self::next_for(ps, &ps.lanes[i], now, prefer, gate);
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

    /// Whether nothing in flight, no commit to acknowledge and no waiting
    /// record that moves by itself could lift the records cap.
    fn nothing_else_moves(&self) -> bool {
        self.in_flight == 0
            && self
                .partitions
                .values()
                .all(|ps| !ps.watermark_unacked() && !ps.has_waits_that_move(self.successes))
    }

    /// Hands out dead-letter writes that are due.
    fn dispatch_dead_letters(&mut self, now: Instant) {
        for (p, ps) in self.partitions.iter_mut() {
            while ps.dead_letters.front().is_some_and(|d| d.at <= now) {
                let pending = ps.dead_letters.pop_front().expect("checked above");
                self.next_dead_letter_id += 1;
                let slot = DeadLetterSlot {
                    partition: *p,
                    epoch: ps.epoch,
                    id: self.next_dead_letter_id,
                };
                self.intents.push_back(Intent::DeadLetter {
                    slot,
                    batch: pending.batch.clone(),
                    failures: pending.failures.clone(),
                    attempts: pending.attempts,
                });
                ps.dead_letters_in_flight.insert(slot.id, pending);
            }
        }
    }

    /// Pauses partitions that hold too much (or all, while draining);
    /// resumes them once they hold half their cap. An open circuit pauses
    /// nothing: the caps bound what is held, and newly fetched records are
    /// what lets a probe tell an outage from one bad record.
    fn apply_backpressure(&mut self) {
        let per_partition = self.config.max_records_per_partition;
        let bytes_per_partition = self.config.max_held_bytes / 2;
        let stop_all = self.phase != Phase::Consuming;
        #[cfg(test)]
        let never = self.sabotage.never_pause;
        #[cfg(not(test))]
        let never = false;
        let mut pause = Vec::new();
        let mut resume = Vec::new();
        for (p, ps) in self.partitions.iter_mut() {
            if ps.revoke_deadline.is_some() || never {
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
        self.update_gauges();
    }

    /// Per partition, the age of the oldest record held that is not done
    /// (updated once per commit interval: it allocates a label each).
    fn update_lag_ages(&self) {
        let now_ms = self.wall_ms(self.clock);
        for (p, ps) in &self.partitions {
            let age_ms = match (ps.offsets.watermark(), ps.timestamps.front()) {
                (Some(wm), Some((offset, ts))) if *offset >= wm => (now_ms - ts).max(0),
                _ => 0,
            };
            self.telemetry
                .metrics
                .partition_lag_seconds
                .get_or_create(&crate::telemetry::PartitionLabel {
                    topic: self.topic.to_string(),
                    partition: *p,
                })
                .set(age_ms as f64 / 1000.0);
        }
    }

    fn update_gauges(&self) {
        let m = &self.telemetry.metrics;
        m.slots_busy.set(self.in_flight as i64);
        m.paused_partitions
            .set(self.partitions.values().filter(|p| p.paused).count() as i64);
        let limit = self.config.uncommitted_limit();
        m.partitions_waiting_for_commit.set(
            self.partitions
                .values()
                .filter(|p| {
                    p.gate(self.clock, limit, self.successes) != Gate::Open
                        || self.waiting_for_ack && p.replayable() > 0
                })
                .count() as i64,
        );
        m.records_held.set(self.held as i64);
        m.held_bytes.set(self.held_bytes as i64);
        m.commit_watermark_distance.set(
            self.partitions
                .values()
                .map(|p| p.offsets.done_above_watermark() as i64)
                .sum(),
        );
        let backlog = self.dead_letter_backlog();
        m.dead_letter_backlog.set(backlog as i64);

        if backlog == 0 {
            self.telemetry.readiness.set_dead_letter_error(None);
        }
    }

    /// Emits a commit of every chosen partition whose watermark moved past
    /// what the broker acknowledged.
    fn commit(&mut self, sync: bool, choose: impl Fn(&PartitionState) -> bool) {
        #[cfg(test)]
        let extra = i64::from(self.sabotage.commit_one_past);
        #[cfg(not(test))]
        let extra = 0;
        let now = self.clock;
        let offsets: Vec<(i32, i64)> = self
            .partitions
            .iter_mut()
            .filter(|(_, ps)| choose(ps))
            .filter_map(|(p, ps)| {
                let wm = ps.offsets.watermark()? + extra;
                if ps.acked.is_some_and(|a| a >= wm) {
                    return None;
                }
                if ps.commits_sent.len() == MAX_COMMITS_REMEMBERED {
                    ps.commits_sent.pop_front();
                }
                ps.commits_sent.push_back((wm, now));
                Some((*p, wm))
            })
            .collect();
        if !offsets.is_empty() {
            let report = self.capacity.report(now, self.wall_ms(now) as u64).cloned();
            if let Some(r) = &report {
                self.telemetry.metrics.observe_capacity(r);
            }
            let metadata = report.map(|r| r.encode()).unwrap_or_default();
            self.intents.push_back(Intent::Commit {
                offsets,
                sync,
                metadata,
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod sim;

#[cfg(test)]
mod tests {
    //! The edges, one event at a time, on a clock the test sets.
    use super::*;
    use crate::batch::Header;
    use crate::config::BatchLimits;
    use microbatch_kafka::KafkaConfig;

    struct Rec(i32, i64);

    impl ConsumedRecord for Rec {
        fn partition(&self) -> i32 {
            self.0
        }
        fn offset(&self) -> i64 {
            self.1
        }
        fn timestamp_ms(&self) -> Option<i64> {
            Some(1_000)
        }
        fn key(&self) -> Option<&[u8]> {
            Some(b"k")
        }
        fn payload(&self) -> Option<&[u8]> {
            Some(b"v")
        }
        fn headers(&self) -> Vec<Header> {
            Vec::new()
        }
    }

    fn pipeline(t0: Instant) -> Pipeline {
        pipeline_with(t0, |_| {})
    }

    /// [`pipeline`] with `change` made to its config first.
    fn pipeline_with(t0: Instant, change: impl FnOnce(&mut WorkerConfig)) -> Pipeline {
        let mut c = WorkerConfig::new(KafkaConfig::plaintext("t:9092"), "t", "g");
        c.batch = BatchLimits::new(2, 1 << 20, Duration::from_millis(10)).unwrap();
        c.ordering = Ordering::Partition;
        c.drain_timeout = Duration::from_secs(10);
        c.retry.max_attempts = 1;
        change(&mut c);
        with_config(c, t0)
    }

    /// A pipeline with dead letters on and no partition assigned yet.
    fn with_config(c: WorkerConfig, t0: Instant) -> Pipeline {
        let options = Options {
            dead_letters: true,
            audit: false,
            keep_headers: false,
            seed: 1,
        };
        Pipeline::new(c, options, Arc::new(Telemetry::default()), t0, 0)
    }

    /// Partition 0 assigned, records 0 and 1 taken in, their batch started.
    fn with_one_batch(t0: Instant) -> Pipeline {
        let mut p = pipeline(t0);
        p.handle_assign(&[0]);
        p.handle_record(&Rec(0, 0), t0);
        p.handle_record(&Rec(0, 1), t0);
        p.handle_tick(t0);
        p
    }

    fn intents(p: &mut Pipeline) -> Vec<Intent> {
        std::iter::from_fn(|| p.poll_intent()).collect()
    }

    /// The offsets of the commits asked for, in order.
    fn commits(p: &mut Pipeline) -> Vec<(i32, i64)> {
        intents(p)
            .into_iter()
            .filter_map(|i| match i {
                Intent::Commit { offsets, .. } => Some(offsets),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn starts(p: &mut Pipeline) -> Vec<(Slot, Batch)> {
        intents(p)
            .into_iter()
            .filter_map(|i| match i {
                Intent::Start { slot, batch } => Some((slot, batch)),
                _ => None,
            })
            .collect()
    }

    /// A final commit the broker refused (the group rebalancing as another
    /// worker stops) is asked for again until it is acknowledged, and not
    /// past the drain deadline.
    #[test]
    fn a_refused_final_commit_is_retried_until_acknowledged_or_the_deadline() {
        let t0 = Instant::now();
        let mut p = with_one_batch(t0);
        let (slot, batch) = starts(&mut p).pop().unwrap();
        p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
        p.shutdown(t0);
        assert!(p.drained(t0));
        p.close();
        assert_eq!(commits(&mut p), vec![(0, 2)]);
        // No acknowledgement: the broker refused it.
        let t1 = t0 + Duration::from_secs(1);
        assert!(p.final_commit_pending(t1));
        p.retry_final_commit();
        assert_eq!(commits(&mut p), vec![(0, 2)]);
        p.handle_committed(0, 2);
        assert!(!p.final_commit_pending(t1));
        p.retry_final_commit();
        assert_eq!(commits(&mut p), vec![], "nothing left to commit");

        let mut p = with_one_batch(t0);
        let (slot, batch) = starts(&mut p).pop().unwrap();
        p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
        p.shutdown(t0);
        p.close();
        assert!(p.final_commit_pending(t0 + Duration::from_millis(9_999)));
        assert!(
            !p.final_commit_pending(t0 + Duration::from_secs(10)),
            "the drain deadline ends the tries"
        );
    }

    #[test]
    fn readiness_forgets_an_open_circuit_when_nothing_waits_on_it() {
        let t0 = Instant::now();
        let mut p = pipeline(t0);
        p.handle_assign(&[0, 1]);
        // Whole batches rejected for good on two partitions: the circuit
        // opens, bisection dead-letters every record, and then nothing is
        // held. An open circuit would keep /readyz at 503 until the next
        // success, which an idle topic never brings.
        for o in 0..6 {
            p.handle_record(&Rec(0, o), t0);
            p.handle_record(&Rec(1, o), t0);
        }
        let mut now = t0;
        let mut opened = false;
        for _ in 0..200 {
            now += Duration::from_millis(50);
            p.handle_tick(now);
            opened |= p.circuit_open();
            let pending = intents(&mut p);
            if pending.is_empty() && p.in_flight() == 0 && p.held() == 0 {
                break;
            }
            for intent in pending {
                match intent {
                    Intent::Start { slot, batch } => p.handle_verdict(
                        slot,
                        batch,
                        BatchOutcome::Failed(Failure::permanent("rejected")),
                        now,
                    ),
                    Intent::DeadLetter { slot, batch, .. } => {
                        let written: Vec<i64> = batch.offsets().collect();
                        p.handle_dead_lettered(slot, &written, None, now);
                    }
                    _ => {}
                }
            }
        }
        assert!(
            opened,
            "five whole failures of two partitions open the circuit"
        );
        assert_eq!(p.held(), 0, "every record dead-lettered");
        p.handle_tick(now + Duration::from_millis(50));
        assert!(
            p.circuit_open(),
            "open until a success: an outage outlives an empty pipeline"
        );
        let circuit_shown = |p: &Pipeline| {
            p.telemetry
                .readiness
                .check()
                .is_err_and(|e| e.contains("circuit"))
        };
        assert!(!circuit_shown(&p), "nothing waits on the downstream");
        // A new record that waits on the open circuit makes it show again.
        p.handle_record(&Rec(0, 6), now);
        p.handle_tick(now + Duration::from_millis(100));
        assert!(circuit_shown(&p), "a record waits on the open circuit");
    }

    #[test]
    fn the_bytes_cap_stops_taking_records_and_one_is_always_taken() {
        let t0 = Instant::now();
        // Each test record is two bytes (key "k", value "v").
        let mut p = pipeline_with(t0, |c| c.max_held_bytes = 3);
        p.handle_assign(&[0]);
        assert!(!p.is_full(), "one record is always taken");
        p.handle_record(&Rec(0, 0), t0);
        assert!(!p.is_full());
        p.handle_record(&Rec(0, 1), t0);
        assert_eq!(p.held_bytes(), 4);
        assert!(p.is_full(), "4 bytes held, the cap is 3");
        p.handle_tick(t0);
        let (slot, batch) = starts(&mut p).pop().expect("the batch starts");
        p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
        assert_eq!(p.held_bytes(), 0);
        assert!(!p.is_full());
    }

    #[test]
    fn a_partition_of_large_records_is_paused_before_it_fills_the_worker() {
        let t0 = Instant::now();
        let mut p = pipeline_with(t0, |c| c.max_held_bytes = 8);
        p.handle_assign(&[0, 1]);
        // Partition 0's records (2 bytes each) wait, say for a proof of
        // health that only another partition's success can bring.
        p.handle_record(&Rec(0, 0), t0);
        p.handle_record(&Rec(0, 1), t0);
        p.handle_tick(t0);
        assert!(
            intents(&mut p)
                .iter()
                .any(|i| matches!(i, Intent::Pause(ps) if ps == &vec![0])),
            "partition 0 holds half the worker's bytes: paused"
        );
        assert!(!p.is_full(), "the other partitions still come in");
        p.handle_record(&Rec(1, 0), t0);
        assert_eq!(p.held_by(1), 1);
    }

    #[test]
    fn a_lost_partition_is_dropped_at_once_and_never_committed() {
        let t0 = Instant::now();
        let mut p = with_one_batch(t0);
        let (slot, batch) = starts(&mut p).pop().expect("a batch started");
        p.handle_lost(&[0]);
        assert_eq!(p.assigned().count(), 0, "forgotten at once, not drained");
        assert_eq!(p.held(), 0);
        // Its batch finishes after the loss, and records fetched before the
        // loss arrive late: none of it may start work or commit.
        p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
        p.handle_record(&Rec(0, 2), t0);
        let later = t0 + Duration::from_secs(5);
        p.handle_tick(later);
        let after = intents(&mut p);
        assert!(
            !after
                .iter()
                .any(|i| matches!(i, Intent::Commit { .. } | Intent::Start { .. })),
            "{after:?}"
        );
        assert!(p.revoke_settled(later), "nothing left to wait for");
    }

    #[test]
    fn sigterm_during_a_revoke_takes_one_drain_deadline() {
        let t0 = Instant::now();
        let mut p = with_one_batch(t0);
        assert_eq!(starts(&mut p).len(), 1);
        assert!(p.begin_revoke(&[0], t0));
        // SIGTERM 8 s into the revoke: the deadline stays 10 s after it at
        // most, not 10 s for the revoke and 10 more for the shutdown.
        let signal = t0 + Duration::from_secs(8);
        p.shutdown(signal);
        assert!(!p.revoke_settled(t0 + Duration::from_secs(9)));
        assert!(p.revoke_settled(t0 + Duration::from_secs(10)));
        let Phase::Draining { deadline } = p.phase() else {
            panic!("draining");
        };
        assert_eq!(deadline, signal + Duration::from_secs(10));
    }

    #[test]
    fn a_revoke_waits_for_dead_letters_being_written() {
        let t0 = Instant::now();
        let mut p = with_one_batch(t0);
        let (slot, batch) = starts(&mut p).pop().unwrap();
        p.handle_verdict(
            slot,
            batch,
            BatchOutcome::Partial(vec![(0, Failure::permanent("bad"))]),
            t0,
        );
        let dead = intents(&mut p)
            .into_iter()
            .find_map(|i| match i {
                Intent::DeadLetter { slot, .. } => Some(slot),
                _ => None,
            })
            .expect("a dead letter to write");
        assert!(p.begin_revoke(&[0], t0));
        assert!(
            !p.revoke_settled(t0),
            "the dead letter is still being written"
        );
        p.handle_dead_lettered(dead, &[0], None, t0);
        assert!(p.revoke_settled(t0));
        p.complete_revoke();
        let committed: Vec<(i32, i64)> = intents(&mut p)
            .into_iter()
            .filter_map(|i| match i {
                Intent::Commit {
                    offsets,
                    sync: true,
                    ..
                } => Some(offsets),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(
            committed,
            [(0, 2)],
            "both records done, the commit passes them"
        );
    }

    #[test]
    fn a_batch_abandoned_at_the_revoke_deadline_blocks_its_lane_when_the_partition_returns() {
        let t0 = Instant::now();
        let mut p = with_one_batch(t0);
        let (old_slot, old_batch) = starts(&mut p).pop().unwrap();
        assert!(p.begin_revoke(&[0], t0));
        let late = t0 + Duration::from_secs(11);
        assert!(p.revoke_settled(late), "the deadline passed");
        p.complete_revoke();
        p.handle_assign(&[0]);
        p.handle_record(&Rec(0, 0), late);
        p.handle_record(&Rec(0, 1), late);
        p.handle_tick(late);
        assert!(starts(&mut p).is_empty(), "the abandoned batch still runs");
        p.handle_verdict(old_slot, old_batch, BatchOutcome::Success, late);
        p.handle_tick(late);
        assert_eq!(starts(&mut p).len(), 1, "its lane is free again");
    }

    #[test]
    fn lag_in_seconds_is_the_age_of_the_oldest_record_not_done() {
        let t0 = Instant::now();
        let telemetry = Arc::new(Telemetry::default());
        let mut c = WorkerConfig::new(KafkaConfig::plaintext("t:9092"), "t", "g");
        c.batch = BatchLimits::new(1, 1 << 20, Duration::from_millis(10)).unwrap();
        c.commit_interval = Duration::from_secs(1);
        let options = Options {
            dead_letters: true,
            audit: false,
            keep_headers: false,
            seed: 1,
        };
        // The wall clock reads 31 s when the record stamped 1 s arrives.
        let mut p = Pipeline::new(c, options, telemetry.clone(), t0, 31_000);
        p.handle_assign(&[0]);
        p.handle_record(&Rec(0, 0), t0);
        p.handle_tick(t0 + Duration::from_secs(1));
        let age = |t: &Telemetry| {
            t.metrics
                .partition_lag_seconds
                .get_or_create(&crate::telemetry::PartitionLabel {
                    topic: "t".into(),
                    partition: 0,
                })
                .get()
        };
        assert_eq!(age(&telemetry), 31.0, "32 s on the wall clock minus 1 s");
        let (slot, batch) = starts(&mut p).pop().unwrap();
        p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
        p.handle_tick(t0 + Duration::from_secs(2));
        assert_eq!(age(&telemetry), 0.0, "nothing held");
    }

    #[test]
    fn offsets_that_go_backwards_restart_the_partition() {
        let t0 = Instant::now();
        let mut p = pipeline(t0);
        p.handle_assign(&[0]);
        for o in [10, 11] {
            p.handle_record(&Rec(0, o), t0);
        }
        p.handle_tick(t0);
        let (old_slot, old_batch) = starts(&mut p).pop().unwrap();
        // A reset to earliest after truncation: offset 3 comes next.
        p.handle_record(&Rec(0, 3), t0);
        p.handle_record(&Rec(0, 4), t0);
        assert_eq!(p.watermark(0), Some(3), "tracked again from the new offset");
        // The batch of the old offsets ends: it counts for nothing now, and
        // frees its lane.
        p.handle_verdict(old_slot, old_batch, BatchOutcome::Success, t0);
        assert_eq!(p.watermark(0), Some(3));
        p.handle_tick(t0);
        let (slot, batch) = starts(&mut p).pop().expect("the new records start");
        assert_eq!(batch.offsets().collect::<Vec<_>>(), [3, 4]);
        p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
        assert_eq!(p.watermark(0), Some(5));
    }

    /// A record whose key the test chooses.
    struct Keyed(i64, &'static [u8]);

    impl ConsumedRecord for Keyed {
        fn partition(&self) -> i32 {
            0
        }
        fn offset(&self) -> i64 {
            self.0
        }
        fn timestamp_ms(&self) -> Option<i64> {
            Some(1_000)
        }
        fn key(&self) -> Option<&[u8]> {
            Some(self.1)
        }
        fn payload(&self) -> Option<&[u8]> {
            Some(b"v")
        }
        fn headers(&self) -> Vec<Header> {
            Vec::new()
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Key order, two lanes, one record a batch; partition 0 assigned.
    /// Returns it with two keys that land in different lanes.
    fn two_lanes(
        t0: Instant,
        tweak: impl FnOnce(&mut WorkerConfig),
    ) -> (Pipeline, &'static [u8], &'static [u8]) {
        let mut c = WorkerConfig::new(KafkaConfig::plaintext("t:9092"), "t", "g");
        c.batch = BatchLimits::new(1, 1 << 20, Duration::from_millis(10)).unwrap();
        c.ordering = Ordering::Key;
        c.concurrency = 2;
        tweak(&mut c);
        let mut p = with_config(c, t0);
        p.handle_assign(&[0]);
        let a: &'static [u8] = b"a";
        let lane = |k: &[u8]| p.partitions[&0].lane_for(Ordering::Key, Some(k), 0);
        let b: &'static [u8] = [b"b", b"c", b"d", b"e"]
            .into_iter()
            .find(|k| lane(&k[..]) != lane(a))
            .expect("a key in the other lane");
        (p, a, b)
    }

    #[test]
    fn a_free_slot_takes_the_lane_holding_the_oldest_record() {
        let t0 = Instant::now();
        let (mut p, a, b) = two_lanes(t0, |_| {});
        // Name the keys by lane: `first` lands in lane 0, `second` in lane 1.
        let lane_of_a = p.partitions[&0].lane_for(Ordering::Key, Some(a), 0);
        let (first, second) = if lane_of_a == 0 { (a, b) } else { (b, a) };
        p.handle_assign(&[1]);
        // Partition 1 holds one of the two slots.
        p.handle_record(&Rec(1, 0), t0);
        p.handle_tick(t0);
        assert_eq!(starts(&mut p).len(), 1);
        // Partition 0: its oldest record waits in lane 1, a newer one in lane 0.
        p.handle_record(&Keyed(0, second), t0);
        p.handle_record(&Keyed(1, first), t0);
        p.handle_tick(t0);
        let started = starts(&mut p);
        assert_eq!(started.len(), 1, "one slot was free");
        assert_eq!(
            started[0].1.offsets().collect::<Vec<_>>(),
            [0],
            "the lane whose record holds the commit back goes first"
        );
    }

    #[test]
    fn finished_work_the_broker_has_not_acknowledged_stops_new_batches_until_it_has() {
        let t0 = Instant::now();
        let mut p = with_one_batch(t0);
        let limit = p.config.uncommitted_limit().expect("a limit by default");
        assert_eq!(limit, p.config.commit_interval * 3 / 2);
        let (slot, batch) = starts(&mut p).pop().unwrap();
        p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
        // The commit goes out after one interval; the broker never answers
        // (a rebalance that waits for a dead member, a broker restart).
        p.handle_tick(t0 + p.config.commit_interval);
        assert!(intents(&mut p)
            .iter()
            .any(|i| matches!(i, Intent::Commit { .. })));
        let late = t0 + limit + secs(0.01);
        p.handle_record(&Rec(0, 2), late);
        p.handle_record(&Rec(0, 3), late);
        p.handle_tick(late);
        assert!(
            starts(&mut p).is_empty(),
            "no new work while a crash would replay more than the limit"
        );
        assert_eq!(p.telemetry.metrics.partitions_waiting_for_commit.get(), 1);
        p.handle_committed(0, 2);
        p.handle_tick(late);
        let (_, batch) = starts(&mut p).pop().expect("acknowledged: work goes on");
        assert_eq!(batch.offsets().collect::<Vec<_>>(), [2, 3]);
        assert_eq!(p.telemetry.metrics.partitions_waiting_for_commit.get(), 0);
    }

    #[test]
    fn an_older_commit_acknowledged_after_a_newer_one_is_committed_again() {
        // After the coordinator was down, librdkafka can send a retried older
        // commit after a newer one: the broker then holds the older offset,
        // and a worker that kept the highest acknowledgement never commits
        // again while idle, so the partition's lag never reaches 0.
        let t0 = Instant::now();
        let mut p = pipeline(t0);
        p.handle_assign(&[0]);
        let mut now = t0;
        let mut committed = Vec::new();
        for o in [0, 2] {
            p.handle_record(&Rec(0, o), now);
            p.handle_record(&Rec(0, o + 1), now);
            p.handle_tick(now);
            for (slot, batch) in starts(&mut p) {
                p.handle_verdict(slot, batch, BatchOutcome::Success, now);
            }
            now += p.config.commit_interval;
            p.handle_tick(now);
            committed.extend(commits(&mut p));
        }
        assert_eq!(committed.last(), Some(&(0, 4)), "{committed:?}");
        p.handle_committed(0, 4);
        p.handle_committed(0, 2);
        now += p.config.commit_interval;
        p.handle_tick(now);
        let again = commits(&mut p);
        assert_eq!(again, [(0, 4)], "the broker holds 2: commit 4 again");
        p.handle_committed(0, 4);
        now += p.config.commit_interval;
        p.handle_tick(now);
        assert!(
            commits(&mut p).is_empty(),
            "acknowledged in order: nothing more to commit"
        );
    }

    #[test]
    fn commits_acknowledged_every_interval_never_stop_work() {
        let t0 = Instant::now();
        let mut p = pipeline(t0);
        p.handle_assign(&[0]);
        let step = secs(0.05);
        let mut now = t0;
        let mut offset = 0;
        let mut pending_ack = None;
        for _ in 0..200 {
            p.handle_record(&Rec(0, offset), now);
            p.handle_record(&Rec(0, offset + 1), now);
            offset += 2;
            p.handle_tick(now);
            let mut started = false;
            for intent in intents(&mut p) {
                match intent {
                    Intent::Start { slot, batch } => {
                        started = true;
                        p.handle_verdict(slot, batch, BatchOutcome::Success, now);
                    }
                    Intent::Commit { offsets, .. } => pending_ack = Some(offsets),
                    _ => {}
                }
            }
            assert!(started, "a batch starts at every step");
            now += step;
            // Each commit is acknowledged one step after it was sent.
            if let Some(offsets) = pending_ack.take() {
                for (partition, o) in offsets {
                    p.handle_committed(partition, o);
                }
            }
        }
    }

    #[test]
    fn records_held_back_by_a_retry_stop_new_batches_of_other_keys_but_not_the_retry() {
        let t0 = Instant::now();
        let (mut p, a, b) = two_lanes(t0, |c| {
            c.retry.initial = secs(5.0);
            c.retry.max = secs(5.0);
        });
        p.handle_record(&Keyed(0, a), t0);
        p.handle_record(&Keyed(1, b), t0);
        p.handle_tick(t0);
        let mut started = starts(&mut p);
        assert_eq!(started.len(), 2);
        started.sort_by_key(|(_, b)| b.first_offset());
        let (slot_b, batch_b) = started.pop().unwrap();
        let (slot_a, batch_a) = started.pop().unwrap();
        p.handle_verdict(
            slot_a,
            batch_a,
            BatchOutcome::Failed(Failure::retryable("busy")),
            t0,
        );
        p.handle_verdict(slot_b, batch_b, BatchOutcome::Success, t0);
        // Key b goes on while offset 1 has waited less than the limit.
        let soon = t0 + secs(0.5);
        p.handle_record(&Keyed(2, b), soon);
        p.handle_tick(soon);
        let (slot, batch) = starts(&mut p).pop().expect("key b goes on");
        p.handle_verdict(slot, batch, BatchOutcome::Success, soon);
        // Past the limit, key b waits for the retry of offset 0.
        let late = t0 + p.config.uncommitted_limit().unwrap() + secs(0.01);
        p.handle_record(&Keyed(3, b), late);
        p.handle_tick(late);
        assert!(
            starts(&mut p).is_empty(),
            "offsets 1 and 2 wait uncommitted"
        );
        let due = t0 + secs(5.0);
        p.handle_tick(due);
        let (slot, batch) = starts(&mut p).pop().expect("the retry still starts");
        assert_eq!(batch.offsets().collect::<Vec<_>>(), [0]);
        p.handle_verdict(slot, batch, BatchOutcome::Success, due);
        assert_eq!(p.watermark(0), Some(3));
        p.handle_tick(due);
        let (_, batch) = starts(&mut p)
            .pop()
            .expect("the commit may move: key b goes on");
        assert_eq!(batch.offsets().collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn a_revoke_fills_holes_while_the_broker_refuses_commits() {
        // A rebalance refuses commits (IllegalGeneration) past the limit,
        // and the revoked partition has a hole below done records: the
        // revoke must fill it rather than wait for its deadline and replay.
        let t0 = Instant::now();
        let mut c = WorkerConfig::new(KafkaConfig::plaintext("t:9092"), "t", "g");
        c.batch = BatchLimits::new(1, 1 << 20, Duration::from_millis(10)).unwrap();
        c.ordering = Ordering::None;
        c.concurrency = 2;
        let mut p = with_config(c, t0);
        p.handle_assign(&[0]);
        for o in 0..5 {
            p.handle_record(&Rec(0, o), t0);
        }
        p.handle_tick(t0);
        let mut slow = None;
        let mut pending: VecDeque<(Slot, Batch)> = starts(&mut p).into();
        while let Some((slot, batch)) = pending.pop_front() {
            if batch.first_offset() == Some(1) {
                slow = Some((slot, batch));
                continue;
            }
            p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
            p.handle_tick(t0);
            pending.extend(starts(&mut p));
        }
        assert_eq!(
            p.watermark(0),
            Some(1),
            "offset 1 runs; others wait behind it"
        );
        let late = t0 + p.config.uncommitted_limit().unwrap() + secs(0.01);
        p.handle_tick(late);
        assert!(intents(&mut p)
            .iter()
            .any(|i| matches!(i, Intent::Commit { .. })));
        // The commit is never acknowledged; the revoke begins.
        assert!(p.begin_revoke(&[0], late));
        let (slot, batch) = slow.expect("offset 1 in flight");
        p.handle_verdict(slot, batch, BatchOutcome::Success, late);
        let hole = p.watermark(0).expect("a watermark");
        assert!(
            p.partitions[&0].offsets.is_hole(hole),
            "{hole} below done records"
        );
        p.handle_tick(late);
        let (slot3, batch3) = starts(&mut p)
            .pop()
            .expect("the revoke fills the hole at once");
        assert_eq!(batch3.first_offset(), Some(hole));
        p.handle_verdict(slot3, batch3, BatchOutcome::Success, late);
        assert!(p.revoke_settled(late), "settled long before its deadline");
    }

    /// Takes `records` in and returns the two batches that start first
    /// (one record each, two lanes), in offset order.
    fn first_two(
        p: &mut Pipeline,
        t0: Instant,
        records: &[(i64, &'static [u8])],
    ) -> [(Slot, Batch); 2] {
        for &(o, k) in records {
            p.handle_record(&Keyed(o, k), t0);
        }
        p.handle_tick(t0);
        let mut started = starts(p);
        started.sort_by_key(|(_, b)| b.first_offset());
        started.try_into().expect("two batches start")
    }

    #[test]
    fn a_revoke_fills_the_holes_below_what_was_started_and_no_more() {
        let t0 = Instant::now();
        let (mut p, a, b) = two_lanes(t0, |_| {});
        // Lane a: 0, 2, 4; lane b: 1, 3, 5.
        let [(slot0, batch0), (slot1, batch1)] = first_two(
            &mut p,
            t0,
            &[(0, a), (1, b), (2, a), (3, b), (4, a), (5, b)],
        );
        p.handle_verdict(slot1, batch1, BatchOutcome::Success, t0);
        p.handle_tick(t0);
        let (slot3, batch3) = starts(&mut p).pop().expect("key b goes on");
        assert_eq!(batch3.first_offset(), Some(3));
        // The revoke begins with 0 and 3 in flight: 3 is the highest started.
        assert!(p.begin_revoke(&[0], t0));
        p.handle_verdict(slot3, batch3, BatchOutcome::Success, t0);
        p.handle_verdict(slot0, batch0, BatchOutcome::Success, t0);
        p.handle_tick(t0);
        let (slot2, batch2) = starts(&mut p).pop().expect("2 lies below 3: it is filled");
        assert_eq!(batch2.offsets().collect::<Vec<_>>(), [2]);
        p.handle_verdict(slot2, batch2, BatchOutcome::Success, t0);
        p.handle_tick(t0);
        assert!(
            starts(&mut p).is_empty(),
            "4 and 5 were never started: they go to the next owner"
        );
        assert!(p.revoke_settled(t0));
        assert_eq!(p.watermark(0), Some(4));
    }

    #[test]
    fn a_hole_filled_at_a_revoke_finishes_no_record_above_the_bound() {
        let t0 = Instant::now();
        let (mut p, a, b) = two_lanes(t0, |c| {
            c.batch = BatchLimits::new(2, 1 << 20, Duration::from_millis(10)).unwrap();
        });
        // Lane a: [0, 2], [4, 8]; lane b: [1, 3], [5, 6], [7].
        let [(slot0, batch0), (slot1, batch1)] = first_two(
            &mut p,
            t0,
            &[
                (0, a),
                (1, b),
                (2, a),
                (3, b),
                (4, a),
                (5, b),
                (6, b),
                (7, b),
                (8, a),
            ],
        );
        p.handle_verdict(slot1, batch1, BatchOutcome::Success, t0);
        p.handle_tick(t0);
        let (slot, batch) = starts(&mut p).pop().expect("lane b goes on");
        assert_eq!(batch.offsets().collect::<Vec<_>>(), [5, 6]);
        p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
        // Holes lie below 6, the highest started.
        assert!(p.begin_revoke(&[0], t0));
        p.handle_verdict(slot0, batch0, BatchOutcome::Success, t0);
        p.handle_tick(t0);
        let (slot, batch) = starts(&mut p).pop().expect("4 fills a hole");
        assert_eq!(
            batch.offsets().collect::<Vec<_>>(),
            [4],
            "8 would finish a record above 7, a hole the revoke leaves"
        );
        p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
        p.handle_tick(t0);
        assert!(starts(&mut p).is_empty());
        assert!(p.revoke_settled(t0));
        assert_eq!(p.watermark(0), Some(7));
        assert_eq!(
            p.partitions[&0].offsets.done_above_watermark(),
            0,
            "nothing done is left for the next owner to do again"
        );
    }

    #[test]
    fn a_revoke_fills_holes_for_a_second_at_most() {
        let t0 = Instant::now();
        let (mut p, a, b) = two_lanes(t0, |_| {});
        let [(slot0, batch0), (slot1, batch1)] = first_two(&mut p, t0, &[(0, a), (1, b), (2, a)]);
        p.handle_verdict(slot1, batch1, BatchOutcome::Success, t0);
        assert!(p.begin_revoke(&[0], t0));
        // Offset 0 fails: its retry fills a hole below 1, for a while.
        p.handle_verdict(
            slot0,
            batch0,
            BatchOutcome::Failed(Failure::retryable("busy")),
            t0,
        );
        assert!(
            !p.revoke_settled(t0 + secs(0.5)),
            "the hole is still filled"
        );
        let later = t0 + HOLE_FILL_BUDGET;
        p.handle_tick(later);
        assert!(
            p.revoke_settled(later),
            "past the budget the revoke waits for nothing more"
        );
    }

    #[test]
    fn lanes_finishing_out_of_order_all_the_time_never_stop_work() {
        // Under key order a done record nearly always waits above the
        // watermark; only a watermark that stays put means work is stuck.
        let t0 = Instant::now();
        let (mut p, a, b) = two_lanes(t0, |_| {});
        let mut now = t0;
        let mut slow: Option<(Slot, Batch)> = None;
        for k in 0..40i64 {
            // Key b's record finishes at once, key a's one step later: a done
            // record of b always waits above a's unfinished one.
            p.handle_record(&Keyed(2 * k, a), now);
            p.handle_record(&Keyed(2 * k + 1, b), now);
            p.handle_tick(now);
            let mut fast = None;
            let mut commits = Vec::new();
            for intent in intents(&mut p) {
                match intent {
                    Intent::Start { slot, batch } if batch.first_offset() == Some(2 * k + 1) => {
                        fast = Some((slot, batch))
                    }
                    Intent::Start { slot, batch } => slow = Some((slot, batch)),
                    Intent::Commit { offsets, .. } => commits.extend(offsets),
                    _ => {}
                }
            }
            let (slot, batch) =
                fast.unwrap_or_else(|| panic!("step {k}: key b's batch did not start"));
            p.handle_verdict(slot, batch, BatchOutcome::Success, now);
            if k > 0 {
                let (slot, batch) = slow.take().expect("key a's batch in flight");
                p.handle_verdict(slot, batch, BatchOutcome::Success, now);
            }
            p.handle_tick(now);
            for intent in intents(&mut p) {
                match intent {
                    Intent::Start { slot, batch } => slow = Some((slot, batch)),
                    Intent::Commit { offsets, .. } => commits.extend(offsets),
                    _ => {}
                }
            }
            for (partition, offset) in commits {
                p.handle_committed(partition, offset);
            }
            now += secs(0.2);
        }
    }

    #[test]
    fn a_partition_assigned_while_draining_is_not_committed_past_records_it_dropped() {
        let t0 = Instant::now();
        let mut p = with_one_batch(t0);
        let (slot, batch) = starts(&mut p).pop().unwrap();
        p.shutdown(t0);
        // The group gives this member a partition while it drains: the
        // consumer hands out its records, which a draining pipeline drops.
        p.handle_assign(&[1]);
        for o in 0..5 {
            p.handle_record(&Rec(1, o), t0);
        }
        let later = t0 + p.config.commit_interval;
        p.handle_tick(later);
        for intent in intents(&mut p) {
            if let Intent::ReadPositions(partitions) = intent {
                for partition in partitions {
                    // The consumer's position: past the records dropped.
                    p.handle_position(partition, 5);
                }
            }
        }
        p.handle_verdict(slot, batch, BatchOutcome::Success, later);
        p.handle_tick(later);
        p.begin_revoke(&[1], later);
        p.complete_revoke();
        p.close();
        let committed = commits(&mut p);
        assert!(committed.contains(&(0, 2)), "{committed:?}");
        assert!(
            committed.iter().all(|(partition, _)| *partition != 1),
            "nothing of partition 1 was handled: {committed:?}"
        );
    }

    /// Ordering none, batches of two, four slots, a cap of four finished
    /// records; partition 0 assigned with records 0..10 taken in.
    fn capped(t0: Instant) -> Pipeline {
        let mut c = WorkerConfig::new(KafkaConfig::plaintext("t:9092"), "t", "g");
        c.batch = BatchLimits::new(2, 1 << 20, Duration::from_millis(10)).unwrap();
        c.ordering = Ordering::None;
        c.concurrency = 4;
        c.max_uncommitted_records = 4;
        let mut p = with_config(c, t0);
        p.handle_assign(&[0]);
        for o in 0..10 {
            p.handle_record(&Rec(0, o), t0);
        }
        p
    }

    /// `capped` after its first two batches: the `failing`th (by offset)
    /// failed, retryable, and the other succeeded.
    fn capped_with_a_failure(t0: Instant, failing: usize) -> Pipeline {
        let mut p = capped(t0);
        p.handle_tick(t0);
        let mut started = starts(&mut p);
        started.sort_by_key(|(_, b)| b.first_offset());
        assert_eq!(started.len(), 2);
        for (i, (slot, batch)) in started.into_iter().enumerate() {
            let outcome = if i == failing {
                BatchOutcome::Failed(Failure::retryable("busy"))
            } else {
                BatchOutcome::Success
            };
            p.handle_verdict(slot, batch, outcome, t0);
        }
        p
    }

    #[test]
    fn the_records_cap_stops_fresh_batches_until_the_commit_is_acknowledged() {
        let t0 = Instant::now();
        let mut p = capped(t0);
        p.handle_tick(t0);
        let started = starts(&mut p);
        assert_eq!(
            started.len(),
            2,
            "four records in flight fill a cap of four: {started:?}"
        );
        for (slot, batch) in started {
            p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
        }
        // Long before the commit interval: the commit goes out at once.
        let soon = t0 + secs(0.001);
        p.handle_tick(soon);
        let sent = intents(&mut p);
        assert!(
            sent.iter()
                .any(|i| matches!(i, Intent::Commit { offsets, .. } if offsets == &[(0, 4)])),
            "{sent:?}"
        );
        assert!(!sent.iter().any(|i| matches!(i, Intent::Start { .. })));
        assert!(p.waiting_for_ack());
        assert_eq!(p.telemetry.metrics.partitions_waiting_for_commit.get(), 1);
        // Still unacknowledged: nothing new, and the same commit is not sent again.
        p.handle_tick(soon);
        assert!(intents(&mut p).is_empty());
        p.handle_committed(0, 4);
        p.handle_tick(soon);
        let started = starts(&mut p);
        let offsets: Vec<i64> = started.iter().flat_map(|(_, b)| b.offsets()).collect();
        assert_eq!(offsets.len(), 4, "acknowledged: the cap is free again");
        assert!(offsets.iter().all(|o| *o >= 4), "{offsets:?}");
        assert!(!p.waiting_for_ack());
    }

    #[test]
    fn the_records_cap_lets_the_batch_that_moves_the_watermark_start() {
        // Records 2..4 finish while 0..2 failed: they wait above the
        // watermark, the cap is full, and only the retry and the batch at
        // the watermark may run, or the cap would never empty.
        let t0 = Instant::now();
        let mut p = capped_with_a_failure(t0, 0);
        let later = t0 + secs(1.0);
        p.handle_tick(later);
        let started = starts(&mut p);
        let offsets: Vec<i64> = started.iter().flat_map(|(_, b)| b.offsets()).collect();
        assert_eq!(
            offsets,
            [0, 1],
            "only the retry: 2 + 2 in flight fill the cap"
        );
        for (slot, batch) in started {
            p.handle_verdict(slot, batch, BatchOutcome::Success, later);
        }
        assert_eq!(p.watermark(0), Some(4));
    }

    #[test]
    fn records_waiting_for_a_retry_count_against_the_records_cap() {
        // 2..4 fail and wait for their retry: a crash replays them once they
        // are done, so they hold their place in the cap.
        let t0 = Instant::now();
        let mut p = capped_with_a_failure(t0, 1);
        p.handle_committed(0, 2);
        p.handle_tick(t0);
        let fresh: Vec<i64> = starts(&mut p)
            .iter()
            .flat_map(|(_, b)| b.offsets())
            .filter(|o| *o >= 4)
            .collect();
        assert_eq!(
            fresh.len(),
            2,
            "2 waiting + 2 fresh fill a cap of four: {fresh:?}"
        );
    }

    #[test]
    fn no_records_cap_by_default() {
        let t0 = Instant::now();
        let mut p = capped(t0);
        p.config.max_uncommitted_records = 0;
        p.handle_tick(t0);
        assert_eq!(starts(&mut p).len(), 4);
    }

    #[test]
    fn no_limit_when_max_uncommitted_is_zero() {
        let mut c = WorkerConfig::new(KafkaConfig::plaintext("t:9092"), "t", "g");
        c.max_uncommitted = Some(Duration::ZERO);
        assert_eq!(c.uncommitted_limit(), None);
        c.max_uncommitted = Some(Duration::from_millis(10));
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("--max-uncommitted-ms"), "{err}");
    }
}
