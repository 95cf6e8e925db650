//! The worker: one consumer-group member that turns records into microbatches,
//! hands them to a [`Handler`] and commits what is done.
//!
//! **The delivery guarantee: at least once, nothing lost.** An offset is
//! committed only when its record and every earlier record of the partition
//! are done: processed by the handler, or written to the dead-letter topic and
//! acknowledged (see [`crate::offsets`]). A crash or an unclean revoke can
//! replay records in flight or done above the watermark; nothing else can.
//!
//! Data flows one way. A dedicated thread owns the consumer and runs the poll
//! loop; it never blocks on the handler, so the member stays in the group
//! however slow the handler is:
//!
//! ```text
//! poll -> partition lanes (batcher) -> dispatch (ordering, concurrency)
//!      -> handler task on the runtime -> event back to the poll loop
//!      -> retry / bisect / dead letter -> offsets -> commit
//! ```
//!
//! States: *consuming*, then *draining* once shutdown is asked (no new
//! batches; in-flight ones get `drain_timeout`), then a synchronous commit and
//! close. On revoke the same happens for the revoked partitions only, inside
//! the rebalance callback, so nothing is ever committed for a partition this
//! member no longer owns.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{BufWriter, Write};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;
use tokio::runtime::Handle;

use crate::batch::{Batch, Batcher};
use crate::capacity::{unix_ms_now, CapacityMeter, DEFAULT_WINDOW};
use crate::commit::{CommitQueue, CommitResult, CommittedPartition};
use crate::config::{Ordering, WorkerConfig};
use crate::dlq::DeadLetterWriter;
use crate::fetch::{ConsumedRecord, FetchQueue, FetchedMessage};
use crate::handler::{BatchOutcome, Failure, Handler};
use crate::offsets::PartitionOffsets;
use crate::telemetry::{KindLabel, LogThrottle, PartitionLabel, ResultLabel, Telemetry};

/// Records taken from the client per poll-loop round.
const MAX_BURST: usize = 2048;

/// librdkafka's prefetch, in records, for all partitions together.
const PREFETCH_RECORDS: usize = 20_000;

/// Consumer-queue events (rebalances, errors, statistics) served per round.
const MAX_EVENTS_PER_ROUND: usize = 16;

/// Consecutive failed batches that open the circuit breaker.
const CIRCUIT_THRESHOLD: u32 = 5;

/// Why a worker stopped other than by a requested shutdown.
#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("could not create the Kafka consumer: {0}")]
    Client(#[from] KafkaError),
    #[error("could not open the audit log {path}: {source}")]
    AuditLog {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "record {partition}/{offset} failed for good and the dead-letter topic is off: {error}"
    )]
    Undeliverable {
        partition: i32,
        offset: i64,
        error: String,
    },
    #[error("the poll loop panicked")]
    Panicked,
}

/// What a worker did, returned when it stops.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkerReport {
    pub records_processed: u64,
    pub records_dead_lettered: u64,
    /// Batches still in flight when the drain deadline passed (not committed).
    pub abandoned_batches: usize,
}

/// One consumer-group member. See the module docs for the guarantee.
pub struct Worker {
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
    telemetry: Arc<Telemetry>,
}

impl Worker {
    pub fn new(config: WorkerConfig, handler: Arc<dyn Handler>, telemetry: Arc<Telemetry>) -> Self {
        Self {
            config,
            handler,
            telemetry,
        }
    }

    /// Consumes until `shutdown` resolves, then drains, commits and leaves the
    /// group. Must be called within a multi-threaded tokio runtime.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<WorkerReport, WorkerError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_on_signal = stop.clone();
        let signal_task = tokio::spawn(async move {
            shutdown.await;
            stop_on_signal.store(true, AtomicOrdering::SeqCst);
        });
        let handler = self.handler.clone();
        let runtime = Handle::current();
        let result = tokio::task::spawn_blocking(move || poll_loop(self, runtime, stop))
            .await
            .unwrap_or(Err(WorkerError::Panicked));
        signal_task.abort();
        handler.shutdown().await;
        result
    }
}

/// Identifies the slot a batch runs in; `epoch` tells a stale event (for a
/// partition revoked and perhaps reassigned meanwhile) from a current one.
#[derive(Debug, Clone, Copy)]
struct SlotKey {
    partition: i32,
    epoch: u64,
    lane: usize,
}

enum Event {
    Handled {
        slot: SlotKey,
        batch: Batch,
        outcome: BatchOutcome,
        elapsed: Duration,
    },
    DeadLettered {
        slot: SlotKey,
        offsets: Vec<i64>,
    },
}

/// Sends a failure if dropped before a verdict (a panicking or cancelled
/// handler), so a batch can never vanish and never be counted as done.
struct Verdict {
    tx: Sender<Event>,
    slot: SlotKey,
    batch: Option<Batch>,
    started: Instant,
}

impl Verdict {
    fn deliver(mut self, outcome: BatchOutcome) {
        let batch = self.batch.take().expect("a verdict is delivered once");
        let _ = self.tx.send(Event::Handled {
            slot: self.slot,
            batch,
            outcome,
            elapsed: self.started.elapsed(),
        });
    }
}

impl Drop for Verdict {
    fn drop(&mut self) {
        if let Some(batch) = self.batch.take() {
            let _ = self.tx.send(Event::Handled {
                slot: self.slot,
                batch,
                outcome: BatchOutcome::Failed(Failure::retryable(
                    "handler task ended without a verdict",
                )),
                elapsed: self.started.elapsed(),
            });
        }
    }
}

#[derive(Debug)]
struct Lane {
    batcher: Batcher,
    /// Closed batches waiting for this lane's slot, oldest first.
    ready: VecDeque<Batch>,
    /// Failed records to try again, with when; they go before `ready`.
    retry: VecDeque<(Batch, Instant)>,
    in_flight: bool,
}

#[derive(Debug)]
struct PartitionState {
    epoch: u64,
    offsets: PartitionOffsets,
    lanes: Vec<Lane>,
    /// Records buffered, queued or in flight.
    held: usize,
    paused: bool,
    /// For `Ordering::None`: the lane being filled.
    fill_lane: usize,
    /// Being given up (shutdown or revoke): only batches that fill a hole
    /// below done records are still started, so the final commit covers
    /// as much finished work as possible and little is redelivered.
    finishing: bool,
}

impl PartitionState {
    /// Closes open batches and marks the partition finishing.
    fn start_finishing(&mut self) {
        self.finishing = true;
        for lane in &mut self.lanes {
            if let Some(batch) = lane.batcher.take() {
                lane.ready.push_back(batch);
            }
        }
    }

    /// Whether a lane's next batch still fills a hole.
    fn next_is_hole(&self, lane: &Lane) -> bool {
        let next = lane.retry.front().map(|(b, _)| b).or(lane.ready.front());
        next.and_then(Batch::first_offset)
            .is_some_and(|o| self.offsets.is_hole(o))
    }

    /// Whether any work is left that finishing would still do.
    fn has_finishing_work(&self) -> bool {
        self.lanes
            .iter()
            .any(|l| l.in_flight || self.next_is_hole(l))
    }
}

impl PartitionState {
    fn lane_for(&mut self, ordering: Ordering, key: Option<&[u8]>, offset: i64) -> usize {
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

struct Circuit {
    consecutive_failures: u32,
    open: bool,
    probe_after: Instant,
    probe_backoff: Duration,
}

/// All mutable state of the worker, owned by the poll thread and reached by
/// the rebalance callbacks through the consumer context.
struct Pipeline {
    config: WorkerConfig,
    topic: Arc<str>,
    handler: Arc<dyn Handler>,
    telemetry: Arc<Telemetry>,
    runtime: Handle,
    events_tx: Sender<Event>,
    events_rx: Receiver<Event>,
    dlq: Option<DeadLetterWriter>,
    audit: Option<BufWriter<File>>,
    commits: CommitQueue,
    fetch: FetchQueue,
    /// Whether the handler or the dead-letter writer reads record headers.
    keep_headers: bool,
    partitions: BTreeMap<i32, PartitionState>,
    next_epoch: u64,
    next_batch_id: u64,
    /// The partition dispatch starts from next (round-robin).
    dispatch_cursor: i32,
    in_flight: usize,
    held: usize,
    draining: bool,
    circuit: Circuit,
    fatal: Option<WorkerError>,
    report: WorkerReport,
    capacity: CapacityMeter,
}

impl Pipeline {
    fn assign(&mut self, tpl: &TopicPartitionList) {
        for elem in tpl.elements_for_topic(&self.topic) {
            self.next_epoch += 1;
            let lanes = (0..self.config.slots_per_partition())
                .map(|_| Lane {
                    batcher: Batcher::new(self.config.batch),
                    ready: VecDeque::new(),
                    retry: VecDeque::new(),
                    in_flight: false,
                })
                .collect();
            self.partitions.insert(
                elem.partition(),
                PartitionState {
                    epoch: self.next_epoch,
                    offsets: PartitionOffsets::new(),
                    lanes,
                    held: 0,
                    paused: false,
                    fill_lane: 0,
                    finishing: false,
                },
            );
        }
        self.telemetry
            .metrics
            .assigned_partitions
            .set(self.partitions.len() as i64);
        self.capacity.set_slots(Instant::now(), self.usable_slots());
    }

    /// Slots the assigned partitions can keep busy at once.
    fn usable_slots(&self) -> usize {
        (self.partitions.len() * self.config.slots_per_partition()).min(self.config.concurrency)
    }

    /// Revocation: stop dispatching the partitions, let their in-flight
    /// batches finish until `deadline`, commit what is done, forget the rest.
    fn revoke(
        &mut self,
        consumer: &BaseConsumer<WorkerContext>,
        tpl: &TopicPartitionList,
        deadline: Instant,
    ) {
        let revoked: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .filter(|p| self.partitions.contains_key(p))
            .collect();
        if revoked.is_empty() {
            return;
        }
        for p in &revoked {
            if let Some(ps) = self.partitions.get_mut(p) {
                ps.start_finishing();
            }
        }
        let busy = |pipeline: &Pipeline| {
            revoked.iter().any(|p| {
                pipeline
                    .partitions
                    .get(p)
                    .is_some_and(PartitionState::has_finishing_work)
            })
        };
        while busy(self) {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(partitions = ?revoked, "revoke deadline passed with work unfinished; it will be redelivered");
                break;
            }
            let retry_at = self.dispatch(now);
            let wait = retry_at
                .unwrap_or(deadline)
                .min(deadline)
                .saturating_duration_since(now);
            match self
                .events_rx
                .recv_timeout(wait.max(Duration::from_millis(1)))
            {
                Ok(event) => self.on_event(event, true),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.commit(consumer, CommitMode::Sync, Some(&revoked));
        for p in &revoked {
            if let Some(ps) = self.partitions.remove(p) {
                self.held -= ps.held;
            }
            self.telemetry
                .metrics
                .partition_lag
                .remove(&PartitionLabel {
                    topic: self.topic.to_string(),
                    partition: *p,
                });
        }
        self.telemetry
            .metrics
            .assigned_partitions
            .set(self.partitions.len() as i64);
        self.capacity.set_slots(Instant::now(), self.usable_slots());
        self.telemetry.metrics.records_held.set(self.held as i64);
    }

    /// Routes the partitions about to be assigned to the fetch queue.
    fn route(&self, consumer: &BaseConsumer<WorkerContext>, tpl: &TopicPartitionList) {
        for elem in tpl.elements_for_topic(&self.topic) {
            self.fetch.route(consumer, &self.topic, elem.partition());
        }
    }

    /// Takes one consumed record into its partition's lane.
    fn ingest(&mut self, msg: &impl ConsumedRecord, now: Instant) {
        let partition = msg.partition();
        let ordering = self.config.ordering;
        let batch_id = self.next_batch_id + 1;
        let topic = self.topic.clone();
        let Some(ps) = self.partitions.get_mut(&partition) else {
            return;
        };
        let offset = msg.offset();
        if !ps.offsets.track(offset) {
            return;
        }
        let lane_idx = ps.lane_for(ordering, msg.key(), offset);
        let keep_headers = self.keep_headers;
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
        ps.held += 1;
        self.held += 1;
        if let Some(batch) = closed {
            ps.lanes[lane_idx].ready.push_back(batch);
            if ordering == Ordering::None {
                ps.fill_lane = (ps.fill_lane + 1) % ps.lanes.len();
            }
        }
    }

    /// Closes batches whose wait is over; returns the nearest open deadline.
    fn close_expired(&mut self, now: Instant) -> Option<Instant> {
        let mut nearest: Option<Instant> = None;
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
                if let Some(d) = lane.batcher.deadline() {
                    nearest = Some(nearest.map_or(d, |n| n.min(d)));
                }
            }
        }
        nearest
    }

    /// Starts batches on free slots. Returns the nearest retry time, if any.
    fn dispatch(&mut self, now: Instant) -> Option<Instant> {
        let mut nearest_retry: Option<Instant> = None;
        let limit = if self.circuit.open {
            if now < self.circuit.probe_after || self.in_flight > 0 {
                return Some(self.circuit.probe_after);
            }
            1
        } else {
            self.config.concurrency
        };
        let mut starts = Vec::new();
        // Start where the last round stopped, so partitions share the slots
        // instead of draining one after another.
        let cursor = self.dispatch_cursor;
        let passes = [
            (Bound::Included(cursor), Bound::Unbounded),
            (Bound::Unbounded, Bound::Excluded(cursor)),
        ];
        'outer: for range in passes {
            for (p, ps) in self.partitions.range_mut(range) {
                for i in 0..ps.lanes.len() {
                    if self.in_flight + starts.len() >= limit {
                        break 'outer;
                    }
                    if ps.lanes[i].in_flight || (ps.finishing && !ps.next_is_hole(&ps.lanes[i])) {
                        continue;
                    }
                    let lane = &mut ps.lanes[i];
                    let batch = match lane.retry.front() {
                        Some((_, due)) if *due > now => {
                            nearest_retry =
                                Some(nearest_retry.map_or(*due, |n: Instant| n.min(*due)));
                            continue;
                        }
                        Some(_) => lane.retry.pop_front().map(|(b, _)| b),
                        None => lane.ready.pop_front(),
                    };
                    if let Some(batch) = batch {
                        lane.in_flight = true;
                        starts.push((
                            SlotKey {
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
        if let Some((last, _)) = starts.last() {
            self.dispatch_cursor = last.partition + 1;
        }
        for (slot, batch) in starts {
            self.start(slot, batch);
        }
        nearest_retry
    }

    fn start(&mut self, slot: SlotKey, batch: Batch) {
        self.in_flight += 1;
        self.telemetry.metrics.slots_busy.set(self.in_flight as i64);
        self.capacity.set_busy(Instant::now(), self.in_flight);
        self.telemetry
            .metrics
            .batch_size
            .observe(batch.len() as f64);
        let handler = self.handler.clone();
        let timeout = self.config.handler_timeout;
        let verdict = Verdict {
            tx: self.events_tx.clone(),
            slot,
            batch: None,
            started: Instant::now(),
        };
        self.runtime.spawn(async move {
            let mut verdict = verdict;
            let outcome = match tokio::time::timeout(timeout, handler.handle(&batch)).await {
                Ok(outcome) => outcome,
                Err(_) => BatchOutcome::Failed(Failure::retryable(format!(
                    "handler timed out after {} ms",
                    timeout.as_millis()
                ))),
            };
            verdict.batch = Some(batch);
            verdict.deliver(outcome);
        });
    }

    fn on_event(&mut self, event: Event, revoking: bool) {
        match event {
            Event::Handled {
                slot,
                batch,
                outcome,
                elapsed,
            } => {
                self.in_flight -= 1;
                self.telemetry.metrics.slots_busy.set(self.in_flight as i64);
                self.capacity.set_busy(Instant::now(), self.in_flight);
                self.telemetry
                    .metrics
                    .batch_duration
                    .observe(elapsed.as_secs_f64());
                if !self.is_current(slot) {
                    return;
                }
                self.lane_mut(slot).in_flight = false;
                self.on_outcome(slot, batch, outcome, revoking);
            }
            Event::DeadLettered { slot, offsets } => {
                self.in_flight -= 1;
                self.telemetry.metrics.slots_busy.set(self.in_flight as i64);
                self.capacity.set_busy(Instant::now(), self.in_flight);
                self.telemetry
                    .metrics
                    .records_dead_lettered
                    .inc_by(offsets.len() as u64);
                self.report.records_dead_lettered += offsets.len() as u64;
                if self.is_current(slot) {
                    self.mark_done(slot.partition, offsets.iter().copied());
                }
            }
        }
    }

    fn is_current(&self, slot: SlotKey) -> bool {
        self.partitions
            .get(&slot.partition)
            .is_some_and(|ps| ps.epoch == slot.epoch)
    }

    fn lane_mut(&mut self, slot: SlotKey) -> &mut Lane {
        let ps = self
            .partitions
            .get_mut(&slot.partition)
            .expect("slot checked current");
        &mut ps.lanes[slot.lane]
    }

    fn mark_done(&mut self, partition: i32, offsets: impl Iterator<Item = i64>) {
        let Some(ps) = self.partitions.get_mut(&partition) else {
            return;
        };
        let mut n = 0;
        for o in offsets {
            ps.offsets.mark_done(o);
            n += 1;
        }
        ps.held -= n;
        self.held -= n;
        self.capacity.processed(n);
    }

    fn audit(&mut self, partition: i32, offsets: impl Iterator<Item = i64>) {
        if let Some(out) = self.audit.as_mut() {
            for o in offsets {
                let _ = writeln!(out, "{partition} {o}");
            }
            if let Err(e) = out.flush() {
                tracing::error!(error = %e, "audit log write failed");
            }
        }
    }

    fn on_outcome(&mut self, slot: SlotKey, batch: Batch, outcome: BatchOutcome, revoking: bool) {
        let m = &self.telemetry.metrics;
        match outcome {
            BatchOutcome::Success => {
                m.records_processed.inc_by(batch.len() as u64);
                m.batches_processed.inc();
                self.report.records_processed += batch.len() as u64;
                self.circuit_success();
                self.audit(slot.partition, batch.offsets());
                self.mark_done(slot.partition, batch.offsets());
            }
            BatchOutcome::Partial(failed) => {
                m.batches_failed.inc();
                m.records_failed.inc_by(failed.len() as u64);
                let ok = batch.len() - failed.len().min(batch.len());
                m.records_processed.inc_by(ok as u64);
                self.report.records_processed += ok as u64;
                let failed_set: HashMap<i64, Failure> = failed.into_iter().collect();
                let done = batch.offsets().filter(|o| !failed_set.contains_key(o));
                let done: Vec<i64> = done.collect();
                self.audit(slot.partition, done.iter().copied());
                self.mark_done(slot.partition, done.into_iter());
                if ok > 0 {
                    self.circuit_success();
                } else {
                    self.circuit_failure();
                }
                if revoking {
                    return;
                }
                let id = self.next_batch_id + 1;
                self.next_batch_id += 1;
                let rest = batch.select(id, |o| failed_set.contains_key(&o));
                let failures: Vec<(i64, Failure)> = failed_set.into_iter().collect();
                self.retry_or_dead_letter(slot, rest, failures);
            }
            BatchOutcome::Failed(failure) => {
                m.batches_failed.inc();
                m.records_failed.inc_by(batch.len() as u64);
                self.circuit_failure();
                if revoking {
                    return;
                }
                let failures = batch.offsets().map(|o| (o, failure.clone())).collect();
                let bisect = batch.len() > 1
                    && (!failure.retryable || batch.attempt + 1 >= self.config.retry.max_attempts);
                if bisect && !self.circuit.open {
                    // Find the poison record instead of failing its neighbours.
                    let id = self.next_batch_id + 1;
                    self.next_batch_id += 2;
                    let (a, b) = batch.split(id).expect("len > 1");
                    tracing::info!(
                        partition = slot.partition,
                        records = batch.len(),
                        error = %failure.error,
                        "batch failed as a whole; bisecting to isolate the failing record"
                    );
                    let now = Instant::now();
                    let lane = self.lane_mut(slot);
                    lane.retry.push_front((b, now));
                    lane.retry.push_front((a, now));
                    return;
                }
                self.retry_or_dead_letter(slot, batch, failures);
            }
        }
    }

    fn retry_or_dead_letter(
        &mut self,
        slot: SlotKey,
        mut batch: Batch,
        failures: Vec<(i64, Failure)>,
    ) {
        let retry = self.config.retry;
        let all_retryable = failures.iter().all(|(_, f)| f.retryable);
        // While the downstream is out, attempts are not spent: an outage
        // alone never sends a record to the dead-letter topic.
        if !self.circuit.open {
            batch.attempt += 1;
        }
        let too_old = retry.max_record_age.is_some_and(|age| {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            batch
                .records()
                .filter_map(|r| r.timestamp_ms)
                .any(|ts| now_ms - ts > age.as_millis() as i64)
        });
        if all_retryable && batch.attempt < retry.max_attempts && !too_old {
            self.telemetry
                .metrics
                .records_retried
                .inc_by(batch.len() as u64);
            let ceiling = retry.backoff_ceiling(batch.attempt);
            let wait = rand::rng().random_range(Duration::ZERO..=ceiling);
            let lane = self.lane_mut(slot);
            lane.retry.push_back((batch, Instant::now() + wait));
            return;
        }
        let attempts = batch.attempt;
        let Some(writer) = self.dlq.clone() else {
            let (offset, failure) = failures
                .into_iter()
                .next()
                .expect("a failed batch names a failure");
            tracing::error!(partition = slot.partition, offset, error = %failure.error, "record failed for good and --dlq is off; stopping");
            self.fatal.get_or_insert(WorkerError::Undeliverable {
                partition: slot.partition,
                offset,
                error: failure.error,
            });
            return;
        };
        for (offset, failure) in &failures {
            tracing::warn!(
                partition = slot.partition,
                offset,
                attempts,
                error = %failure.error,
                dlq_topic = writer.topic(),
                "record failed for good; writing it to the dead-letter topic"
            );
        }
        self.in_flight += 1;
        let tx = self.events_tx.clone();
        self.runtime.spawn(async move {
            let offsets = writer.write(&batch, &failures, attempts).await;
            let _ = tx.send(Event::DeadLettered { slot, offsets });
        });
    }

    fn circuit_success(&mut self) {
        self.circuit.consecutive_failures = 0;
        if self.circuit.open {
            self.circuit.open = false;
            self.circuit.probe_backoff = Duration::from_secs(1);
            self.telemetry.metrics.circuit_open.set(0);
            self.telemetry.readiness.set_circuit_open(false);
            tracing::info!("downstream recovered; circuit closed, consumption resumes");
        }
    }

    fn circuit_failure(&mut self) {
        self.circuit.consecutive_failures += 1;
        let now = Instant::now();
        if self.circuit.open {
            self.circuit.probe_backoff =
                (self.circuit.probe_backoff * 2).min(Duration::from_secs(30));
            self.circuit.probe_after = now + self.circuit.probe_backoff;
        } else if self.circuit.consecutive_failures >= CIRCUIT_THRESHOLD {
            self.circuit.open = true;
            self.circuit.probe_after = now + self.circuit.probe_backoff;
            self.telemetry.metrics.circuit_open.set(1);
            self.telemetry.readiness.set_circuit_open(true);
            tracing::warn!(
                consecutive_failures = self.circuit.consecutive_failures,
                "downstream failing; circuit open: partitions paused, probing with one batch at a time"
            );
        }
    }

    /// Whether the worker holds all it may (`--max-records-held`). The poll
    /// loop then stops taking records from the fetch queue, and librdkafka,
    /// its prefetch full, stops fetching; nothing is paused, so nothing
    /// already fetched is thrown away (pausing drops a partition's prefetch).
    fn is_full(&self) -> bool {
        self.held >= self.config.max_records_held
    }

    /// Pauses partitions that hold too much (or all, while draining or while
    /// the circuit is open); resumes them once they hold half their cap.
    fn apply_backpressure(&mut self, consumer: &BaseConsumer<WorkerContext>) {
        let per_partition = self.config.max_records_per_partition;
        let stop_all = self.draining || self.circuit.open;
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        for (p, ps) in self.partitions.iter_mut() {
            if !ps.paused && (stop_all || ps.held >= per_partition) {
                ps.paused = true;
                pause.add_partition(&self.topic, *p);
            } else if ps.paused && !stop_all && ps.held <= per_partition / 2 {
                ps.paused = false;
                resume.add_partition(&self.topic, *p);
            }
        }
        if pause.count() > 0 {
            if let Err(e) = consumer.pause(&pause) {
                tracing::warn!(error = %e, "pausing partitions failed");
            }
        }
        if resume.count() > 0 {
            if let Err(e) = consumer.resume(&resume) {
                tracing::warn!(error = %e, "resuming partitions failed");
            }
        }
        let m = &self.telemetry.metrics;
        m.paused_partitions
            .set(self.partitions.values().filter(|p| p.paused).count() as i64);
        m.records_held.set(self.held as i64);
        m.commit_watermark_distance.set(
            self.partitions
                .values()
                .map(|p| p.offsets.done_above_watermark() as i64)
                .sum(),
        );
    }

    /// Commits each partition's watermark that moved past what was acknowledged.
    fn commit(
        &mut self,
        consumer: &BaseConsumer<WorkerContext>,
        mode: CommitMode,
        only: Option<&[i32]>,
    ) {
        let acked = consumer
            .context()
            .acked
            .lock()
            .expect("acked lock poisoned")
            .clone();
        let report = self.capacity.report(Instant::now(), unix_ms_now()).cloned();
        if let Some(r) = &report {
            self.telemetry.metrics.observe_capacity(r);
        }
        let metadata = report.map(|r| r.encode()).unwrap_or_default();
        let mut tpl = TopicPartitionList::new();
        for (p, ps) in &self.partitions {
            if only.is_some_and(|o| !o.contains(p)) {
                continue;
            }
            let Some(wm) = ps.offsets.watermark() else {
                continue;
            };
            if acked.get(p).is_some_and(|a| *a >= wm) {
                continue;
            }
            let mut elem = tpl.add_partition(&self.topic, *p);
            elem.set_offset(Offset::Offset(wm))
                .expect("a fresh offset is always valid");
            elem.set_metadata(&metadata);
        }
        if tpl.count() == 0 {
            return;
        }
        let ctx = consumer.context();
        match mode {
            CommitMode::Async => {
                if let Err(e) = self.commits.commit(consumer, &tpl) {
                    ctx.on_commit(failed_commit(&tpl, e));
                }
            }
            CommitMode::Sync => {
                let result = match consumer.commit(&tpl, CommitMode::Sync) {
                    Ok(()) => CommitResult {
                        error: None,
                        partitions: committed(&tpl),
                    },
                    Err(e) => failed_commit(&tpl, e),
                };
                ctx.on_commit(result);
            }
        }
    }

    /// Reads the results of asynchronous commits that have arrived.
    fn collect_commit_results(&mut self, ctx: &WorkerContext) {
        while let Some(result) = self.commits.poll() {
            ctx.on_commit(result);
        }
    }
}

fn committed(tpl: &TopicPartitionList) -> Vec<CommittedPartition> {
    tpl.elements()
        .iter()
        .map(|e| CommittedPartition {
            topic: e.topic().to_string(),
            partition: e.partition(),
            offset: match e.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            },
            error: None,
        })
        .collect()
}

fn failed_commit(tpl: &TopicPartitionList, e: KafkaError) -> CommitResult {
    CommitResult {
        error: Some(
            e.rdkafka_error_code()
                .unwrap_or(rdkafka::error::RDKafkaErrorCode::Fail),
        ),
        partitions: committed(tpl),
    }
}

/// Consumer callbacks: rebalances reach the pipeline here; errors and
/// statistics feed readiness and metrics.
pub struct WorkerContext {
    pipeline: Mutex<Option<Pipeline>>,
    telemetry: Arc<Telemetry>,
    topic: String,
    drain_timeout: Duration,
    closing: AtomicBool,
    acked: Mutex<HashMap<i32, i64>>,
    error_throttle: LogThrottle,
}

impl WorkerContext {
    fn with_pipeline<R>(&self, f: impl FnOnce(&mut Pipeline) -> R) -> Option<R> {
        let mut guard = self.pipeline.lock().expect("pipeline lock poisoned");
        guard.as_mut().map(f)
    }

    fn on_commit(&self, result: CommitResult) {
        let m = &self.telemetry.metrics;
        if result.error == Some(rdkafka::error::RDKafkaErrorCode::NoOffset) {
            return;
        }
        // A commit can succeed as a request and still fail per partition.
        let mut failed = Vec::new();
        {
            let mut acked = self.acked.lock().expect("acked lock poisoned");
            for p in result.partitions.iter().filter(|p| p.topic == self.topic) {
                match p.error.or(result.error) {
                    None if p.offset >= 0 => {
                        let slot = acked.entry(p.partition).or_insert(p.offset);
                        *slot = (*slot).max(p.offset);
                    }
                    None => {}
                    Some(code) => failed.push(format!("{}@{}: {code}", p.partition, p.offset)),
                }
            }
        }
        if failed.is_empty() {
            m.commits.get_or_create(&ResultLabel { result: "ok" }).inc();
        } else {
            m.commits
                .get_or_create(&ResultLabel { result: "error" })
                .inc();
            tracing::warn!(partitions = %failed.join(", "), "offset commit failed; it is retried at the next interval");
        }
    }
}

impl ClientContext for WorkerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        crate::kafka::forward_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let kind = match error.rdkafka_error_code() {
            Some(rdkafka::error::RDKafkaErrorCode::Authentication) => "authentication",
            Some(rdkafka::error::RDKafkaErrorCode::AllBrokersDown) => "all_brokers_down",
            Some(rdkafka::error::RDKafkaErrorCode::BrokerTransportFailure) => "transport",
            Some(rdkafka::error::RDKafkaErrorCode::SSL) => "tls",
            _ => "other",
        };
        self.telemetry
            .metrics
            .client_errors
            .get_or_create(&KindLabel { kind })
            .inc();
        match kind {
            "authentication" | "tls" => self
                .telemetry
                .readiness
                .set_error(format!("{kind}: {reason}")),
            "all_brokers_down" => self
                .telemetry
                .readiness
                .set_error_unless_known(format!("{kind}: {reason}")),
            _ => {}
        }
        if let Some(suppressed) = self.error_throttle.allow(Instant::now()) {
            if kind == "authentication" {
                tracing::error!(kind, suppressed, "authentication failed: {reason} (check --username, --password and --sasl-mechanism)");
            } else {
                tracing::error!(kind, suppressed, "kafka client error: {reason}");
            }
        }
    }

    fn stats(&self, stats: Statistics) {
        let brokers_up = stats
            .brokers
            .values()
            .any(|b| b.state == "UP" && b.nodeid >= 0);
        if brokers_up {
            self.telemetry.readiness.set_brokers_up(true);
            self.error_throttle.reset();
        }
        if let Some(cgrp) = &stats.cgrp {
            // A member stays joined through a rebalance (join states other
            // than `init`), so readiness does not flap while partitions move.
            self.telemetry
                .readiness
                .set_joined(cgrp.state == "up" && cgrp.join_state != "init");
        }
        if let Some(topic) = stats.topics.get(&self.topic) {
            for (p, part) in &topic.partitions {
                if *p < 0 || part.consumer_lag < 0 {
                    continue;
                }
                self.telemetry
                    .metrics
                    .partition_lag
                    .get_or_create(&PartitionLabel {
                        topic: self.topic.clone(),
                        partition: *p,
                    })
                    .set(part.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Before librdkafka starts fetching them; see `fetch`.
        if let Rebalance::Assign(tpl) = rebalance {
            self.with_pipeline(|p| p.route(consumer, tpl));
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            self.telemetry
                .metrics
                .rebalances
                .get_or_create(&KindLabel { kind: "revoke" })
                .inc();
            let wait = if self.closing.load(AtomicOrdering::SeqCst) {
                Duration::ZERO
            } else {
                self.drain_timeout
            };
            tracing::info!(
                partitions = tpl.count(),
                "partitions revoked; finishing their in-flight batches"
            );
            self.with_pipeline(|p| p.revoke(consumer, tpl, Instant::now() + wait));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.telemetry
                    .metrics
                    .rebalances
                    .get_or_create(&KindLabel { kind: "assign" })
                    .inc();
                let list: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(partitions = ?list, "partitions assigned");
                // An assignment proves the group is joined; statistics
                // (every second) keep readiness current after that.
                self.telemetry.readiness.set_joined(true);
                self.with_pipeline(|p| p.assign(tpl));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

fn open_audit(path: &Path) -> Result<BufWriter<File>, WorkerError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(|f| BufWriter::with_capacity(64 * 1024, f))
        .map_err(|source| WorkerError::AuditLog {
            path: path.display().to_string(),
            source,
        })
}

fn create_consumer(worker: &Worker) -> Result<BaseConsumer<WorkerContext>, WorkerError> {
    let cfg = &worker.config;
    let context = WorkerContext {
        pipeline: Mutex::new(None),
        telemetry: worker.telemetry.clone(),
        topic: cfg.topic.clone(),
        drain_timeout: cfg.drain_timeout,
        closing: AtomicBool::new(false),
        acked: Mutex::new(HashMap::new()),
        error_throttle: LogThrottle::default(),
    };
    let queued_min = (4 * cfg.batch.max_records).max(PREFETCH_RECORDS);
    let mut client = cfg.kafka.client_config();
    client
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("auto.offset.reset", cfg.offset_reset.as_str())
        .set("statistics.interval.ms", "1000")
        // A crashed worker's partitions move on after 10 s instead of Kafka's
        // 45 s default: an autoscaled group changes often.
        .set("session.timeout.ms", "10000")
        // Frequent heartbeats let a joining worker get its partitions sooner.
        .set("heartbeat.interval.ms", "1000")
        // librdkafka's prefetch. Both limits count the queue a partition's
        // records are forwarded to, here the one fetch queue of all
        // partitions: 20,000 records (or four batches) and 16 MiB of
        // payload in all. Its defaults (100,000 and 64 MiB) cost memory for
        // nothing; our own caps bound what is held after that.
        .set("queued.min.messages", queued_min.to_string())
        .set("queued.max.messages.kbytes", "16384")
        // When that queue is full librdkafka looks again after this long; its
        // default of 1 s starves a fast handler, and even 10 ms leaves the
        // poll thread idle (bench/README.md, findings 1 and 10).
        .set("fetch.queue.backoff.ms", "1")
        // Smaller fetch responses than the 1 MiB default: each stays in
        // memory until its last record is copied, and smaller ones keep the
        // queue topped up more evenly.
        .set("max.partition.fetch.bytes", "262144")
        .set("fetch.wait.max.ms", "100");
    // Users' pass-through properties win over our defaults.
    for (k, v) in &cfg.kafka.properties {
        client.set(k, v);
    }
    Ok(client.create_with_context(context)?)
}

fn poll_loop(
    worker: Worker,
    runtime: Handle,
    stop: Arc<AtomicBool>,
) -> Result<WorkerReport, WorkerError> {
    let consumer = create_consumer(&worker)?;
    let cfg = worker.config.clone();
    let audit = cfg.audit_log.as_deref().map(open_audit).transpose()?;
    let dlq = match &cfg.dlq_topic {
        Some(topic) => Some(DeadLetterWriter::new(&cfg.kafka, topic, &cfg.group)?),
        None => None,
    };
    let (events_tx, events_rx) = mpsc::channel();
    let commits = CommitQueue::new(&consumer);
    let fetch = FetchQueue::new(&consumer, MAX_BURST);
    let keep_headers = worker.handler.reads_headers() || dlq.is_some();
    let pipeline = Pipeline {
        topic: Arc::from(cfg.topic.as_str()),
        config: cfg.clone(),
        handler: worker.handler.clone(),
        telemetry: worker.telemetry.clone(),
        runtime,
        events_tx,
        events_rx,
        dlq,
        audit,
        commits,
        fetch,
        keep_headers,
        partitions: BTreeMap::new(),
        next_epoch: 0,
        next_batch_id: 0,
        dispatch_cursor: 0,
        in_flight: 0,
        held: 0,
        draining: false,
        circuit: Circuit {
            consecutive_failures: 0,
            open: false,
            probe_after: Instant::now(),
            probe_backoff: Duration::from_secs(1),
        },
        fatal: None,
        report: WorkerReport::default(),
        capacity: CapacityMeter::new(
            CapacityMeter::process_worker_id(),
            DEFAULT_WINDOW,
            Instant::now(),
        ),
    };
    *consumer
        .context()
        .pipeline
        .lock()
        .expect("pipeline lock poisoned") = Some(pipeline);
    consumer.subscribe(&[&cfg.topic])?;
    tracing::info!(topic = %cfg.topic, group = %cfg.group, ordering = %cfg.ordering, concurrency = cfg.concurrency, "worker started");
    if let Some(warning) = cfg.backpressure_warning() {
        tracing::warn!("{warning}");
    }

    let ctx = consumer.context();
    let mut next_commit = Instant::now() + cfg.commit_interval;
    let mut drain_deadline: Option<Instant> = None;
    let mut wake_at = Instant::now();
    let mut burst: Vec<FetchedMessage> = Vec::with_capacity(MAX_BURST);
    loop {
        let now = Instant::now();
        if drain_deadline.is_none()
            && (stop.load(AtomicOrdering::SeqCst)
                || ctx.with_pipeline(|p| p.fatal.is_some()).unwrap_or(false))
        {
            drain_deadline = Some(now + cfg.drain_timeout);
            ctx.with_pipeline(|p| {
                p.draining = true;
                for ps in p.partitions.values_mut() {
                    ps.start_finishing();
                }
                tracing::info!(
                    in_flight = p.in_flight,
                    "draining: no new batches; waiting for those in flight"
                );
            });
        }
        // While batches run, poll briefly so a finished one frees its slot quickly.
        let busy = ctx.with_pipeline(|p| p.in_flight > 0).unwrap_or(false);
        let cap = if busy {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(100)
        };
        // Whole milliseconds: librdkafka waits in milliseconds and the client
        // library spins through any remainder.
        let timeout = wake_at.saturating_duration_since(now).min(cap);
        let timeout = Duration::from_millis(timeout.as_micros().div_ceil(1000) as u64);
        // Rebalances, errors and statistics first: their callbacks take the
        // pipeline lock. A bounded number, so records keep flowing.
        let events_waiting = || {
            ctx.with_pipeline(|p| p.fetch.consumer_events_waiting())
                .unwrap_or(false)
        };
        let mut waiting = events_waiting();
        for _ in 0..MAX_EVENTS_PER_ROUND {
            if !waiting {
                break;
            }
            match consumer.poll(Duration::ZERO) {
                // Only a record of a partition not routed to the fetch queue.
                Some(Ok(msg)) => {
                    ctx.with_pipeline(|p| {
                        if !p.draining {
                            p.ingest(&msg, Instant::now());
                        }
                    });
                }
                Some(Err(e)) => tracing::debug!(error = %e, "poll error"),
                None => {}
            }
            waiting = events_waiting();
        }
        // Events left for the next round: take what records there are now.
        let timeout = if waiting { Duration::ZERO } else { timeout };
        // Then a burst of records, with the clock read once for all of them.
        // No rebalance can run between taking them and `ingest`, and
        // librdkafka drops those fetched before a revoke or pause.
        ctx.with_pipeline(|p| {
            if p.is_full() {
                // Wait for a batch to finish instead: that is what frees room.
                if let Ok(event) = p.events_rx.recv_timeout(timeout) {
                    p.on_event(event, false);
                }
                return;
            }
            p.fetch.consume(timeout, &mut burst);
            let now = Instant::now();
            for msg in burst.drain(..) {
                if let Some(code) = msg.error() {
                    tracing::debug!(error = %code, detail = %msg.error_text(), partition = msg.partition(), "fetch error");
                } else if !p.draining {
                    p.ingest(&msg, now);
                }
            }
        });
        let now = Instant::now();
        let (done, next_deadline) = ctx
            .with_pipeline(|p| {
                while let Ok(event) = p.events_rx.try_recv() {
                    p.on_event(event, false);
                }
                p.collect_commit_results(ctx);
                let batch_deadline = p.close_expired(now);
                let retry_at = p.dispatch(now);
                p.apply_backpressure(&consumer);
                if now >= next_commit {
                    p.commit(&consumer, CommitMode::Async, None);
                }
                let finished = p.in_flight == 0
                    && !p
                        .partitions
                        .values()
                        .any(PartitionState::has_finishing_work);
                let done = drain_deadline.is_some_and(|d| finished || now >= d);
                let next = [batch_deadline, retry_at].into_iter().flatten().min();
                (done, next)
            })
            .expect("pipeline installed before polling");
        if now >= next_commit {
            next_commit = now + cfg.commit_interval;
        }
        wake_at = next_deadline
            .unwrap_or(now + Duration::from_millis(100))
            .min(next_commit);
        if done {
            break;
        }
    }

    ctx.closing.store(true, AtomicOrdering::SeqCst);
    let (report, fatal) = ctx
        .with_pipeline(|p| {
            while let Ok(event) = p.events_rx.try_recv() {
                p.on_event(event, true);
            }
            if p.in_flight > 0 {
                tracing::warn!(in_flight = p.in_flight, "drain deadline passed; unfinished batches are not committed and will be redelivered");
            }
            p.report.abandoned_batches = p.in_flight;
            p.commit(&consumer, CommitMode::Sync, None);
            (p.report.clone(), p.fatal.take())
        })
        .expect("pipeline installed before polling");
    consumer.unsubscribe();
    // Serve the final revoke so the group sees us leave promptly.
    let _ = consumer.poll(Duration::from_millis(100));
    // The commit queue must go before the client it belongs to.
    drop(ctx.pipeline.lock().expect("pipeline lock poisoned").take());
    drop(consumer);
    tracing::info!(
        processed = report.records_processed,
        dead_lettered = report.records_dead_lettered,
        "worker stopped"
    );
    match fatal {
        Some(e) => Err(e),
        None => Ok(report),
    }
}
