//! A deterministic simulation of the pipeline: seeded random schedules of
//! fetches, verdicts (success, retryable, permanent, panic, timeout, a
//! record that kills the handler), dead-letter writes that fail, outages,
//! commits that land late and out of order (as librdkafka's retries do
//! after a coordinator outage), assignments and revocations (the
//! partition coming back to this member or after another member worked on
//! it, also while it drains), pauses and shutdown, on a clock the
//! simulation sets. After every step it checks the invariants:
//!
//! 1. no committed offset passes a record that is not done (processed, or
//!    its dead letter acknowledged);
//! 2. with a handler that eventually succeeds, every partition reaches its
//!    end (no stall), and once calm the broker comes to hold each
//!    watermark the pipeline reached within 500 ms while the coordinator
//!    answers (an older commit landing last leaves no idle partition
//!    behind);
//! 3. never two batches of one key (of one partition, under `partition`
//!    ordering) in flight at once;
//! 4. nothing is dead-lettered that did not fail for good or fail at least
//!    `max_attempts` times;
//! 5. the records held stay within the caps (plus one fetched burst);
//! 6. under `--max-uncommitted-records`, what a crash would replay (the
//!    finished records at or past the last acknowledged commit and the
//!    records in flight) stays within the cap plus one set of slots
//!    (`--concurrency` x `--max-records`), or passes that by at most one
//!    batch (`--max-records`);
//! 7. no record is dead-lettered again once the dead-letter topic was found
//!    to hold its dead letter (a takeover's look at the topic, answered
//!    at once or a step later).
//!
//! `MICROBATCH_SIM_SCHEDULES` sets how many schedules the test runs
//! (10,000 by default); a failing seed is printed and belongs in
//! [`REGRESSION_SEEDS`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Acknowledgement, DeadLetterSlot, Intent, Options, Pipeline, Sabotage, Slot};
use crate::batch::{Batch, Header};
use crate::config::{BatchLimits, Ordering, RetryPolicy, WorkerConfig};
use crate::fetch::ConsumedRecord;
use crate::handler::{BatchOutcome, Failure};
use crate::health::HealthScope;
use microbatch_kafka::KafkaConfig;

/// Seeds that once failed; each runs on every test run.
/// 4490: a killer record waited for a success that the commit limit
/// (`--max-uncommitted-ms`) kept any fresh batch from giving.
/// 28: a partition given to the member while it drained was committed at
/// the consumer's position, past the records the drain had dropped.
/// 62709, 64196, 75394: with the records cap counting held records, an
/// open circuit's probe refused by the cap let the held record go again
/// instead, for ever.
/// 46080: the last resort past the records cap, then the held record's
/// retry on top of it.
/// 87525: a record held for its key's proof kept the records cap full, and
/// a second last resort went past the cap on top of the first.
const REGRESSION_SEEDS: &[u64] = &[4490, 28, 62709, 64196, 75394, 46080, 87525];

/// Records fetched per partition in one fetch step.
const BURST: usize = 4;

/// While calm, how long the broker may hold less than a watermark the
/// pipeline reached (10 commit intervals) with the coordinator answering.
const CATCH_UP: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Normal,
    /// The handler names it as failed for good.
    Poison,
    /// Fails (retryable, named) this many times, then succeeds.
    Flaky(u32),
    /// The whole batch fails whenever it holds this record (the handler dies).
    Killer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Me,
    Other,
    Nobody,
}

struct PartitionModel {
    keys: Vec<u8>,
    kinds: Vec<Kind>,
    committed: i64,
    /// The last commit whose acknowledgement reached the pipeline (or where
    /// this member took the partition).
    acked: i64,
    /// Where this member took the partition.
    taken_at: i64,
    owner: Owner,
    /// The consumer's next fetch offset while this member owns it.
    position: i64,
    /// librdkafka's application pause flag: it outlives a revocation.
    paused: bool,
}

struct SimRecord<'a> {
    partition: i32,
    offset: i64,
    key: &'a [u8],
}

impl ConsumedRecord for SimRecord<'_> {
    fn partition(&self) -> i32 {
        self.partition
    }
    fn offset(&self) -> i64 {
        self.offset
    }
    fn timestamp_ms(&self) -> Option<i64> {
        Some(1_000 + self.offset)
    }
    fn key(&self) -> Option<&[u8]> {
        Some(self.key)
    }
    fn payload(&self) -> Option<&[u8]> {
        Some(b"v")
    }
    fn headers(&self) -> Vec<Header> {
        Vec::new()
    }
}

/// Which invariant a schedule broke, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    pub invariant: u8,
    pub detail: String,
}

struct Sim {
    rng: StdRng,
    base: Instant,
    now: Instant,
    config: WorkerConfig,
    pipeline: Pipeline,
    parts: Vec<PartitionModel>,
    in_flight: Vec<(Slot, Batch)>,
    /// Records done since this member last took each partition.
    done_here: HashSet<(i32, i64)>,
    /// (partition, epoch) of the batches and dead letters under way when
    /// this member took a partition again: the pipeline ignores their results.
    stale: HashSet<(i32, u64)>,
    /// Partitions being given up: revoked, or all while draining.
    giving_up: HashSet<i32>,
    draining: bool,
    dead_letters: Vec<(DeadLetterSlot, Batch)>,
    done: HashSet<(i32, i64)>,
    failures: HashMap<(i32, i64), u32>,
    permanent: HashSet<(i32, i64)>,
    flaky_left: HashMap<(i32, i64), u32>,
    outage: bool,
    /// In some schedules asynchronous commits land late and in any order;
    /// their own random stream, so the other schedules stay as they were.
    late: Option<StdRng>,
    /// Answers the pipeline's looks at the dead-letter topic: at once or a
    /// tick later (its own stream, so older schedules stay as they were).
    finds_rng: StdRng,
    /// Looks at the dead-letter topic not answered yet.
    finds: Vec<(i32, u64)>,
    /// Records whose dead letter the topic holds, with their timestamps.
    stored: HashMap<(i32, i64), Option<i64>>,
    /// What each look at the topic found, by (partition, epoch).
    found: HashMap<(i32, u64), HashSet<i64>>,
    /// Commits sent and not landed yet, while `late` is on.
    outbox: Vec<(i32, i64)>,
    /// While `late` is on: the group coordinator is away, and the commits
    /// sent meanwhile land together, in any order, when it is back.
    coordinator_away: bool,
    calm: bool,
    steps: u64,
    trace: bool,
}

fn config(rng: &mut StdRng) -> WorkerConfig {
    let mut c = WorkerConfig::new(KafkaConfig::plaintext("sim:9092"), "sim", "sim");
    let max_records = rng.random_range(1..=6);
    c.batch =
        BatchLimits::new(max_records, 1 << 20, Duration::from_millis(20)).expect("valid limits");
    c.ordering = [Ordering::Partition, Ordering::Key, Ordering::None][rng.random_range(0..3)];
    c.concurrency = rng.random_range(1..=4);
    c.commit_interval = Duration::from_millis(50);
    c.drain_timeout = Duration::from_millis(rng.random_range(100..=600));
    c.retry = RetryPolicy {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(80),
        max_attempts: rng.random_range(1..=4),
        max_record_age: None,
    };
    c.max_records_per_partition = (max_records * c.slots_per_partition()).max(8);
    c.max_records_held = c.max_records_per_partition * 2;
    // Drawn from a copy, so the main stream (and every regression seed's
    // schedule) stays as it was.
    let mut side = rng.clone();
    c.health_scope = if side.random_bool(0.75) {
        HealthScope::Key
    } else {
        HealthScope::Worker
    };
    c.health_scope_hold = Duration::from_millis(side.random_range(50..=2_000));
    c
}

impl Sim {
    fn new(seed: u64, sabotage: Sabotage) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut config = config(&mut rng);
        // Its own stream, so that adding it left every older schedule as it was.
        let mut cap_rng = StdRng::seed_from_u64(seed ^ 0x5eed_ca95);
        if cap_rng.random_bool(0.5) {
            config.max_uncommitted_records = cap_rng.random_range(1..=12);
        }
        let mut late_rng = StdRng::seed_from_u64(seed ^ 0x1a7e_c0de);
        let late = late_rng.random_bool(0.3).then_some(late_rng);
        let partitions = rng.random_range(1..=3);
        let parts = (0..partitions)
            .map(|_| {
                let n = rng.random_range(3..=30);
                let keys = (0..n).map(|_| rng.random_range(0..4u8)).collect();
                let kinds = (0..n)
                    .map(|_| match rng.random_range(0..100) {
                        0..=3 => Kind::Poison,
                        4..=9 => Kind::Flaky(rng.random_range(1..=5)),
                        10..=11 => Kind::Killer,
                        _ => Kind::Normal,
                    })
                    .collect();
                PartitionModel {
                    keys,
                    kinds,
                    committed: -1,
                    acked: 0,
                    taken_at: 0,
                    owner: Owner::Nobody,
                    position: 0,
                    paused: false,
                }
            })
            .collect();
        let base = Instant::now();
        let options = Options {
            dead_letters: true,
            audit: false,
            keep_headers: false,
            seed,
            acknowledgement: Acknowledgement::Watermark,
            scope_successes: true,
        };
        let mut pipeline = Pipeline::new(config.pipeline(), options, "sim".into(), base, 10_000);
        pipeline.sabotage = sabotage;
        let mut sim = Self {
            rng,
            base,
            now: base,
            config,
            pipeline,
            parts,
            in_flight: Vec::new(),
            done_here: HashSet::new(),
            stale: HashSet::new(),
            giving_up: HashSet::new(),
            draining: false,
            dead_letters: Vec::new(),
            done: HashSet::new(),
            failures: HashMap::new(),
            permanent: HashSet::new(),
            flaky_left: HashMap::new(),
            outage: false,
            late,
            finds_rng: StdRng::seed_from_u64(seed ^ 0xd1e7_7e55),
            finds: Vec::new(),
            stored: HashMap::new(),
            found: HashMap::new(),
            outbox: Vec::new(),
            coordinator_away: false,
            calm: false,
            steps: 0,
            trace: std::env::var_os("MICROBATCH_SIM_TRACE").is_some(),
        };
        for (p, part) in sim.parts.iter().enumerate() {
            for (o, kind) in part.kinds.iter().enumerate() {
                if let Kind::Flaky(n) = kind {
                    sim.flaky_left.insert((p as i32, o as i64), *n);
                }
            }
        }
        sim
    }

    fn violation(&self, invariant: u8, detail: String) -> Violation {
        Violation {
            invariant,
            detail: format!(
                "{detail} (step {}, t={} ms)",
                self.steps,
                (self.now - self.base).as_millis()
            ),
        }
    }

    /// Carries out the pipeline's intents, checking what they ask for.
    fn execute(&mut self) -> Result<(), Violation> {
        while let Some(intent) = self.pipeline.poll_intent() {
            match intent {
                Intent::Start { slot, batch } => {
                    if self.trace {
                        eprintln!(
                            "t={} start p{} {:?} circuit_open {} calm {} exposure {:?}",
                            (self.now - self.base).as_millis(),
                            slot.partition,
                            batch.offsets().collect::<Vec<_>>(),
                            self.pipeline.circuit_open(),
                            self.calm,
                            self.pipeline.exposure()
                        );
                    }
                    self.check_key_order(slot, &batch)?;
                    self.check_records_cap(slot, &batch)?;
                    self.in_flight.push((slot, batch));
                }
                Intent::DeadLetter { slot, batch, .. } => {
                    if let Some(found) = self.found.get(&(slot.partition, slot.epoch)) {
                        if let Some(o) = batch.offsets().find(|o| found.contains(o)) {
                            return Err(self.violation(
                                7,
                                format!(
                                    "{}/{o} dead-lettered again, though the topic holds it",
                                    slot.partition
                                ),
                            ));
                        }
                    }
                    self.dead_letters.push((slot, batch));
                }
                Intent::Commit { offsets, sync, .. } => {
                    for (p, offset) in offsets {
                        let part = &self.parts[p as usize];
                        if part.owner != Owner::Me {
                            continue;
                        }
                        for o in 0..offset.min(part.kinds.len() as i64 + 8) {
                            if !self.done.contains(&(p, o)) {
                                return Err(self.violation(
                                    1,
                                    format!("commit of {p}@{offset} passes {p}/{o}, not done"),
                                ));
                            }
                        }
                        if self.late.is_none() {
                            self.parts[p as usize].committed = offset;
                            // Sometimes the acknowledgement is lost.
                            if self.rng.random_bool(0.9) {
                                self.pipeline.handle_committed(p, offset);
                                let part = &mut self.parts[p as usize];
                                part.acked = part.acked.max(offset);
                            }
                        } else if !sync {
                            self.outbox.push((p, offset));
                        } else {
                            // A synchronous commit waits for those before it.
                            self.coordinator_away = false;
                            self.land_commits(usize::MAX);
                            self.land(p, offset);
                        }
                    }
                }
                Intent::Pause(ps) => ps
                    .iter()
                    .for_each(|p| self.parts[*p as usize].paused = true),
                Intent::Resume(ps) => ps
                    .iter()
                    .for_each(|p| self.parts[*p as usize].paused = false),
                Intent::Processed { .. } => {}
                Intent::FindDeadLetters { partition, epoch } => {
                    self.finds.push((partition, epoch));
                    if self.finds_rng.random_bool(0.5) {
                        self.answer_finds();
                    }
                }
                Intent::Accept { .. } => panic!("a consumer group's pipeline accepted per record"),
                Intent::ReportCapacity(_) => {
                    panic!("a consumer group's report rides on its commits")
                }
                Intent::ReadPositions(ps) => {
                    for p in ps {
                        let part = &self.parts[p as usize];
                        if part.owner == Owner::Me {
                            self.pipeline.handle_position(p, part.position);
                        }
                    }
                }
            }
        }
        self.check_caps()
    }

    fn check_key_order(&self, slot: Slot, batch: &Batch) -> Result<(), Violation> {
        let part = &self.parts[slot.partition as usize];
        let keys: HashSet<u8> = batch.offsets().map(|o| part.keys[o as usize]).collect();
        for (other, b) in &self.in_flight {
            if other.partition != slot.partition {
                continue;
            }
            let clash = match self.config.ordering {
                Ordering::Partition => true,
                Ordering::Key => b.offsets().any(|o| keys.contains(&part.keys[o as usize])),
                Ordering::None => false,
            };
            if clash {
                return Err(self.violation(
                    3,
                    format!(
                        "batch {:?} of partition {} started beside {:?} of the same key",
                        batch.offsets().collect::<Vec<_>>(),
                        slot.partition,
                        b.offsets().collect::<Vec<_>>()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_records_cap(&self, slot: Slot, batch: &Batch) -> Result<(), Violation> {
        let cap = self.config.max_uncommitted_records;
        if cap == 0 {
            return Ok(());
        }
        // What a crash now would replay, from the simulation's own record:
        // finished records at or past the last acknowledged commit, and
        // every record in flight, this batch included.
        let replayable = self
            .done_here
            .iter()
            .filter(|(q, o)| {
                let part = &self.parts[*q as usize];
                part.owner == Owner::Me && *o >= part.acked
            })
            .count();
        let in_flight: usize = self.in_flight.iter().map(|(_, b)| b.len()).sum();
        let exposed = replayable + in_flight + batch.len();
        // Batches that move a held watermark, fill a hole or give a held
        // record its proof may pass the cap by one set of slots; past that
        // only one batch, the last resort when nothing else could move.
        let bound = cap + self.config.max_records_in_flight() + self.config.batch.max_records;
        if exposed <= bound {
            return Ok(());
        }
        Err(self.violation(
            6,
            format!(
                "batch {:?} of partition {} started with {replayable} finished records \
                 unacknowledged and {in_flight} in flight (cap {cap}, bound {bound}); \
                 done here {:?}, acked {:?}",
                batch.offsets().collect::<Vec<_>>(),
                slot.partition,
                self.done_here,
                self.parts.iter().map(|p| p.acked).collect::<Vec<_>>()
            ),
        ))
    }

    fn check_caps(&self) -> Result<(), Violation> {
        let held = self.pipeline.held();
        if held > self.config.max_records_held + BURST * self.parts.len() {
            return Err(self.violation(5, format!("{held} records held in all")));
        }
        // Every simulated record has a one-byte key and a one-byte value.
        if self.pipeline.held_bytes() != 2 * held {
            return Err(self.violation(
                5,
                format!(
                    "{} bytes held for {held} records",
                    self.pipeline.held_bytes()
                ),
            ));
        }
        for p in 0..self.parts.len() as i32 {
            let by = self.pipeline.held_by(p);
            if by > self.config.max_records_per_partition + BURST {
                return Err(self.violation(5, format!("{by} records held by partition {p}")));
            }
        }
        Ok(())
    }

    /// Answers every look at the dead-letter topic asked for: the records
    /// of the partition whose dead letter it holds.
    fn answer_finds(&mut self) {
        for (partition, epoch) in std::mem::take(&mut self.finds) {
            let held: Vec<(i64, Option<i64>)> = self
                .stored
                .iter()
                .filter(|((p, _), _)| *p == partition)
                .map(|((_, o), ts)| (*o, *ts))
                .collect();
            self.found
                .insert((partition, epoch), held.iter().map(|(o, _)| *o).collect());
            self.pipeline
                .handle_earlier_dead_letters(partition, epoch, &held);
        }
    }

    fn tick(&mut self) -> Result<(), Violation> {
        if !self.finds.is_empty() {
            self.answer_finds();
        }
        self.pipeline.handle_tick(self.now);
        self.execute()?;
        let Some(late) = self.late.as_mut() else {
            return Ok(());
        };
        let waiting = self.outbox.len();
        let due = if late.random_bool(0.02) {
            self.coordinator_away = !self.coordinator_away;
            if self.coordinator_away {
                0
            } else {
                waiting
            }
        } else if self.coordinator_away || waiting == 0 || !late.random_bool(0.4) {
            0
        } else {
            late.random_range(1..=waiting)
        };
        self.land_commits(due);
        Ok(())
    }

    /// Lands up to `count` commits of the outbox, picked in any order.
    fn land_commits(&mut self, count: usize) {
        for _ in 0..count.min(self.outbox.len()) {
            let late = self.late.as_mut().expect("an outbox only while late");
            let pick = late.random_range(0..self.outbox.len());
            let (p, offset) = self.outbox.swap_remove(pick);
            self.land(p, offset);
        }
    }

    /// A commit reaches the broker, which holds what landed last, and its
    /// acknowledgement reaches the pipeline; or it fails, and the pipeline
    /// hears nothing of it. (One that the broker took and whose answer was
    /// lost, older than one before it, would leave the broker behind with
    /// no way for any client to know.)
    fn land(&mut self, p: i32, offset: i64) {
        let part = &mut self.parts[p as usize];
        // A commit from a member that no longer owns the partition fails.
        if part.owner != Owner::Me {
            return;
        }
        let late = self.late.as_mut().expect("landing only while late");
        if late.random_bool(0.9) {
            part.committed = offset;
            self.pipeline.handle_committed(p, offset);
            // What a crash replays is counted from the highest acknowledged:
            // an older one landing last is the broker's doing, not the
            // pipeline's (invariant 6).
            part.acked = part.acked.max(offset);
        }
    }

    fn advance(&mut self, max_ms: u64) {
        let next = self.pipeline.poll_timeout();
        let limit = self.now + Duration::from_millis(max_ms);
        self.now = next.clamp(self.now + Duration::from_millis(1), limit);
    }

    fn fetch(&mut self) {
        for p in 0..self.parts.len() {
            let part = &self.parts[p];
            if part.owner != Owner::Me || part.paused {
                continue;
            }
            for _ in 0..BURST {
                let part = &self.parts[p];
                if self.pipeline.is_full() || part.position >= part.kinds.len() as i64 {
                    break;
                }
                let offset = part.position;
                let record = SimRecord {
                    partition: p as i32,
                    offset,
                    key: std::slice::from_ref(&part.keys[offset as usize]),
                };
                self.pipeline.handle_record(&record, self.now);
                self.parts[p].position += 1;
            }
        }
    }

    fn outcome(&mut self, partition: i32, batch: &Batch) -> BatchOutcome {
        if !self.calm {
            if self.outage {
                return BatchOutcome::Failed(Failure::retryable("downstream unavailable"));
            }
            match self.rng.random_range(0..100) {
                0..=2 => return BatchOutcome::Failed(Failure::retryable("handler timed out")),
                3..=4 => return BatchOutcome::Failed(Failure::retryable("handler panicked")),
                // The schema registry out: no record tried, none failed.
                5..=6 => return BatchOutcome::Unavailable("schema registry unavailable".into()),
                _ => {}
            }
        }
        let kinds = &self.parts[partition as usize].kinds;
        if batch.offsets().any(|o| kinds[o as usize] == Kind::Killer) {
            return BatchOutcome::Failed(Failure::retryable("handler process exited"));
        }
        let mut failed = Vec::new();
        for o in batch.offsets() {
            match kinds[o as usize] {
                Kind::Poison => failed.push((o, Failure::permanent("bad record"))),
                Kind::Flaky(_) => {
                    let left = self.flaky_left.get_mut(&(partition, o)).expect("flaky");
                    if *left > 0 {
                        *left -= 1;
                        failed.push((o, Failure::retryable("busy")));
                    }
                }
                _ => {}
            }
        }
        if !self.calm && self.rng.random_range(0..100) < 3 {
            // The records not named were left out by a filter: done
            // without the handler.
            let tried = !failed.is_empty() && failed.len() < batch.len();
            return BatchOutcome::Unhandled { failed, tried };
        }
        if failed.is_empty() {
            BatchOutcome::Success
        } else {
            BatchOutcome::Partial(failed)
        }
    }

    fn complete_batch(&mut self) -> Result<(), Violation> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        let i = self.rng.random_range(0..self.in_flight.len());
        let (slot, batch) = self.in_flight.swap_remove(i);
        let outcome = self.outcome(slot.partition, &batch);
        let p = slot.partition;
        let current = !self.stale.contains(&(p, slot.epoch));
        match &outcome {
            BatchOutcome::Success => {
                self.done.extend(batch.offsets().map(|o| (p, o)));
                if current {
                    self.done_here.extend(batch.offsets().map(|o| (p, o)));
                }
            }
            BatchOutcome::Partial(failed) | BatchOutcome::Unhandled { failed, .. } => {
                for o in batch.offsets() {
                    match failed.iter().find(|(f, _)| *f == o) {
                        None => {
                            self.done.insert((p, o));
                            if current {
                                self.done_here.insert((p, o));
                            }
                        }
                        Some((_, f)) => {
                            *self.failures.entry((p, o)).or_insert(0) += 1;
                            if !f.retryable {
                                self.permanent.insert((p, o));
                            }
                        }
                    }
                }
            }
            BatchOutcome::Failed(_) => {
                for o in batch.offsets() {
                    *self.failures.entry((p, o)).or_insert(0) += 1;
                }
            }
            BatchOutcome::Unavailable(_) => {}
        }
        self.pipeline.handle_verdict(slot, batch, outcome, self.now);
        self.execute()
    }

    fn complete_dead_letter(&mut self) -> Result<(), Violation> {
        if self.dead_letters.is_empty() {
            return Ok(());
        }
        let i = self.rng.random_range(0..self.dead_letters.len());
        let (slot, batch) = self.dead_letters.swap_remove(i);
        let offsets: Vec<i64> = batch.offsets().collect();
        let written: Vec<i64> = if self.calm || self.rng.random_bool(0.7) {
            offsets.clone()
        } else {
            offsets
                .iter()
                .copied()
                .filter(|_| self.rng.random_bool(0.3))
                .collect()
        };
        let p = slot.partition;
        for o in &written {
            let failures = self.failures.get(&(p, *o)).copied().unwrap_or(0);
            if !self.permanent.contains(&(p, *o)) && failures < self.config.retry.max_attempts {
                return Err(self.violation(
                    4,
                    format!("{p}/{o} dead-lettered after {failures} failures, none permanent"),
                ));
            }
            self.done.insert((p, *o));
            let ts = batch
                .records()
                .find(|r| r.offset == *o)
                .and_then(|r| r.timestamp_ms);
            self.stored.insert((p, *o), ts);
            if !self.stale.contains(&(p, slot.epoch)) {
                self.done_here.insert((p, *o));
            }
        }
        let error = (written.len() < offsets.len()).then(|| "broker unavailable".to_string());
        self.pipeline
            .handle_dead_lettered(slot, &written, error, self.now);
        self.execute()
    }

    fn assign(&mut self, partitions: Vec<i32>) -> Result<(), Violation> {
        for &p in &partitions {
            let part = &mut self.parts[p as usize];
            if part.owner == Owner::Me {
                continue;
            }
            if part.owner == Owner::Other {
                // The other member worked on it meanwhile.
                let end = part.kinds.len() as i64;
                let from = part.committed.max(0);
                let upto = self.rng.random_range(from..=end);
                for o in from..upto {
                    self.done.insert((p, o));
                }
                part.committed = upto;
            }
            part.owner = Owner::Me;
            part.position = part.committed.max(0);
            part.acked = part.position;
            part.taken_at = part.position;
            self.done_here.retain(|(q, _)| *q != p);
            let under_way = self.in_flight.iter().map(|(s, _)| (s.partition, s.epoch));
            let writing = self
                .dead_letters
                .iter()
                .map(|(s, _)| (s.partition, s.epoch));
            self.stale
                .extend(under_way.chain(writing).filter(|(q, _)| *q == p));
        }
        self.pipeline.handle_assign(&partitions);
        self.execute()
    }

    fn revoke(&mut self, partitions: Vec<i32>) -> Result<(), Violation> {
        if !self.pipeline.begin_revoke(&partitions, self.now) {
            return Ok(());
        }
        self.giving_up.extend(partitions.iter().copied());
        for _ in 0..500 {
            self.tick()?;
            if self.pipeline.revoke_settled(self.now) {
                break;
            }
            match self.rng.random_range(0..3) {
                0 => self.complete_batch()?,
                1 => self.complete_dead_letter()?,
                _ => self.advance(30),
            }
        }
        self.pipeline.complete_revoke();
        self.execute()?;
        for p in &partitions {
            self.giving_up.remove(p);
        }
        for p in partitions {
            self.parts[p as usize].owner = if self.rng.random_bool(0.5) {
                Owner::Other
            } else {
                Owner::Nobody
            };
        }
        Ok(())
    }

    fn owned(&self, owner: Owner) -> Vec<i32> {
        (0..self.parts.len() as i32)
            .filter(|p| self.parts[*p as usize].owner == owner)
            .collect()
    }

    fn step(&mut self) -> Result<(), Violation> {
        self.steps += 1;
        match self.rng.random_range(0..100) {
            0..=29 => self.fetch(),
            30..=59 => self.complete_batch()?,
            60..=69 => self.complete_dead_letter()?,
            70..=89 => self.advance(40),
            90..=92 if !self.calm => {
                let mine = self.owned(Owner::Me);
                if !mine.is_empty() {
                    let pick: Vec<i32> = mine
                        .into_iter()
                        .filter(|_| self.rng.random_bool(0.5))
                        .collect();
                    self.revoke(pick)?;
                }
            }
            93..=96 => {
                // Sometimes the assignment names partitions this member owns
                // already (KIP-848 consumers see that): they must go on as they are.
                let again = self.rng.random_bool(0.3);
                let free: Vec<i32> = (0..self.parts.len() as i32)
                    .filter(|p| again || self.parts[*p as usize].owner != Owner::Me)
                    .collect();
                if !free.is_empty() {
                    self.assign(free)?;
                }
            }
            _ if !self.calm => self.outage = !self.outage,
            _ => {}
        }
        self.tick()
    }

    /// Invariant 2 for commits: once the coordinator answers, the broker
    /// comes to hold each watermark the pipeline reached. An older commit
    /// landing last must not leave an idle partition behind for good.
    /// `behind` holds, per partition, a watermark the broker lacks and
    /// since when.
    fn check_commits_catch_up(
        &self,
        behind: &mut [Option<(i64, Instant)>],
    ) -> Result<(), Violation> {
        for (p, part) in self.parts.iter().enumerate() {
            let watermark = self.pipeline.watermark(p as i32);
            let tracked = match (behind[p], watermark) {
                _ if part.owner != Owner::Me || self.coordinator_away => None,
                (Some((w, since)), _) if part.committed < w => Some((w, since)),
                (_, Some(w)) if part.committed < w => Some((w, self.now)),
                _ => None,
            };
            behind[p] = tracked;
            if let Some((w, since)) = tracked {
                if self.now - since > CATCH_UP {
                    return Err(self.violation(
                        2,
                        format!(
                            "partition {p}: the broker holds {} for {} ms after the pipeline reached {w}; \
                             late {}, outbox {:?}; pipeline {}",
                            part.committed,
                            (self.now - since).as_millis(),
                            self.late.is_some(),
                            self.outbox,
                            self.pipeline.debug_state(self.now)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn finished(&self) -> bool {
        self.parts
            .iter()
            .all(|p| p.committed == p.kinds.len() as i64)
    }

    fn run(&mut self, steps: u64) -> Result<(), Violation> {
        self.assign((0..self.parts.len() as i32).collect())?;
        for _ in 0..steps {
            self.step()?;
        }
        // Calm: the handler eventually succeeds, the member owns every
        // partition, and records keep arriving.
        self.calm = true;
        self.outage = false;
        for part in &mut self.parts {
            for _ in 0..2 {
                part.keys.push(0);
                part.kinds.push(Kind::Normal);
            }
        }
        let others = self.owned(Owner::Other);
        let nobody = self.owned(Owner::Nobody);
        self.assign([others, nobody].concat())?;
        let mut calm_steps = 0;
        let mut behind = vec![None; self.parts.len()];
        while !self.finished() {
            calm_steps += 1;
            if calm_steps > 20_000 {
                let stuck: Vec<String> = self
                    .parts
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.committed != p.kinds.len() as i64)
                    .map(|(i, p)| format!("{i}: committed {} of {}", p.committed, p.kinds.len()))
                    .collect();
                let model: Vec<String> = self
                    .parts
                    .iter()
                    .map(|p| {
                        let special: Vec<String> = p
                            .kinds
                            .iter()
                            .enumerate()
                            .filter(|(_, k)| **k != Kind::Normal)
                            .map(|(o, k)| format!("{o}:{k:?}"))
                            .collect();
                        format!(
                            "{:?} pos {} paused {} {special:?}",
                            p.owner, p.position, p.paused
                        )
                    })
                    .collect();
                return Err(self.violation(
                    2,
                    format!(
                        "stalled: {}; model {model:?}; in flight {}; pipeline {}",
                        stuck.join(", "),
                        self.in_flight.len(),
                        self.pipeline.debug_state(self.now)
                    ),
                ));
            }
            // Records keep arriving, as they do: the proof that the
            // downstream works, which a held record waits for.
            if calm_steps % 100 == 0 && calm_steps <= 5_000 {
                for part in &mut self.parts {
                    if part.committed != part.kinds.len() as i64 {
                        part.keys.push(0);
                        part.kinds.push(Kind::Normal);
                    }
                }
            }
            self.step()?;
            self.check_commits_catch_up(&mut behind)?;
        }
        // Work in flight when the drain starts, and sometimes a partition
        // elsewhere, to be given back while the drain lasts.
        for part in &mut self.parts {
            for _ in 0..4 {
                part.keys.push(0);
                part.kinds.push(Kind::Normal);
            }
        }
        self.fetch();
        self.tick()?;
        let mine = self.owned(Owner::Me);
        if mine.len() > 1 && self.rng.random_bool(0.5) {
            self.revoke(vec![mine[0]])?;
        }
        self.pipeline.shutdown(self.now);
        self.draining = true;
        // The handler is slow for a while: the drain outlasts a commit interval.
        let mut slow = self.rng.random_range(0..30);
        for step in 0..2_000 {
            if self.pipeline.drained(self.now) {
                break;
            }
            // The group goes on while this member drains: partitions are
            // taken from it and given to it, and the consumer keeps handing
            // out records of those not paused yet.
            match self.rng.random_range(0..8) {
                0..=1 if step < slow => self.advance(10),
                0..=1 => self.complete_batch()?,
                2 => self.complete_dead_letter()?,
                3 => self.fetch(),
                4 => {
                    let mine = self.owned(Owner::Me);
                    if let Some(&p) = mine.get(self.rng.random_range(0..mine.len().max(1))) {
                        self.revoke(vec![p])?;
                    }
                }
                5 => {
                    let free = [self.owned(Owner::Other), self.owned(Owner::Nobody)].concat();
                    if !free.is_empty() {
                        self.assign(free)?;
                        // Records the consumer fetched before the next pause.
                        if self.rng.random_bool(0.5) {
                            self.fetch();
                        }
                        slow = slow.max(step + self.rng.random_range(0..20));
                    }
                }
                _ => self.advance(30),
            }
            self.tick()?;
        }
        self.pipeline.close();
        self.execute()?;
        // The broker refuses the final commit while the group rebalances:
        // the pipeline asks again until acknowledged or the drain deadline,
        // and those commits too pass nothing not done (invariant 1).
        use super::CommitRefusal::{GroupBusy, Other};
        for _ in 0..self.rng.random_range(0..4) {
            self.pipeline
                .handle_commit_refused(GroupBusy, true, self.now);
            // A late answer to an earlier interval's commit.
            if self.rng.random_bool(0.3) {
                self.pipeline.handle_commit_refused(Other, false, self.now);
            }
            self.advance(200);
            self.tick()?;
        }
        for _ in 0..1_000 {
            if self.pipeline.finished(self.now) {
                return Ok(());
            }
            self.advance(200);
            self.tick()?;
        }
        Err(self.violation(1, "the pipeline never finished after close".into()))
    }
}

/// Runs one schedule.
pub(crate) fn run_schedule(seed: u64, sabotage: Sabotage) -> Result<(), Violation> {
    let mut sim = Sim::new(seed, sabotage);
    let steps = sim.rng.random_range(50..=400);
    sim.run(steps)
}

fn schedules() -> u64 {
    std::env::var("MICROBATCH_SIM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

#[test]
fn one_seed() {
    if let Ok(seed) = std::env::var("MICROBATCH_SIM_SEED") {
        let seed: u64 = seed.parse().expect("a seed");
        if let Err(v) = run_schedule(seed, Sabotage::default()) {
            panic!("seed {seed}: invariant {}: {}", v.invariant, v.detail);
        }
    }
}

#[test]
fn seeded_schedules_keep_every_invariant() {
    let mut failures = BTreeMap::new();
    for seed in REGRESSION_SEEDS.iter().copied().chain(0..schedules()) {
        if let Err(v) = run_schedule(seed, Sabotage::default()) {
            eprintln!(
                "simulation seed {seed} broke invariant {}: {}",
                v.invariant, v.detail
            );
            failures.insert(seed, v);
            if failures.len() >= 5 {
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing seeds (add them to REGRESSION_SEEDS): {failures:?}",
        failures.len()
    );
}

/// Each invariant catches a pipeline broken on purpose.
fn caught(sabotage: Sabotage, invariant: u8) {
    caught_in(sabotage, invariant, 0..2_000);
}

/// For a defect only some schedules reach: the seeds to try.
fn caught_in(sabotage: Sabotage, invariant: u8, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        if let Err(v) = run_schedule(seed, sabotage) {
            assert_eq!(v.invariant, invariant, "seed {seed}: {}", v.detail);
            return;
        }
    }
    panic!("no schedule caught {sabotage:?}");
}

#[test]
fn committing_past_an_unfinished_record_is_caught() {
    caught(
        Sabotage {
            commit_one_past: true,
            ..Sabotage::default()
        },
        1,
    );
}

#[test]
fn a_stall_is_caught() {
    caught(
        Sabotage {
            drop_retries: true,
            ..Sabotage::default()
        },
        2,
    );
}

#[test]
fn two_batches_of_one_key_are_caught() {
    caught(
        Sabotage {
            ignore_lane_busy: true,
            ..Sabotage::default()
        },
        3,
    );
}

#[test]
fn dead_lettering_too_soon_is_caught() {
    caught(
        Sabotage {
            dead_letter_first_failure: true,
            ..Sabotage::default()
        },
        4,
    );
}

#[test]
fn writing_a_dead_letter_the_topic_holds_is_caught() {
    caught(
        Sabotage {
            ignore_earlier_dead_letters: true,
            ..Sabotage::default()
        },
        7,
    );
}

#[test]
fn ignoring_the_records_cap_is_caught() {
    caught(
        Sabotage {
            ignore_records_cap: true,
            ..Sabotage::default()
        },
        6,
    );
}

/// Seed 19,457 is the first to catch it (10,360 before the lanes were
/// taken oldest first and commits could land late): a record retried
/// after the cap filled behind its failure.
#[test]
fn a_records_cap_that_leaves_out_retries_is_caught() {
    caught_in(
        Sabotage {
            uncounted_retries: true,
            ..Sabotage::default()
        },
        6,
        19_000..21_000,
    );
}

/// Seed 87,623 is the first to catch it (8,555 before the lanes were
/// taken oldest first and commits could land late).
#[test]
fn a_records_cap_whose_exemptions_are_unbounded_is_caught() {
    caught_in(
        Sabotage {
            unbounded_exemptions: true,
            ..Sabotage::default()
        },
        6,
        87_000..89_000,
    );
}

/// An older commit landing after a newer one leaves the broker behind;
/// a pipeline that keeps the highest acknowledgement never commits again
/// while the partition is idle.
#[test]
fn an_older_commit_landing_last_is_caught() {
    caught(
        Sabotage {
            keep_highest_ack: true,
            ..Sabotage::default()
        },
        2,
    );
}

#[test]
fn exceeding_the_caps_is_caught() {
    caught(
        Sabotage {
            never_pause: true,
            ..Sabotage::default()
        },
        5,
    );
}
