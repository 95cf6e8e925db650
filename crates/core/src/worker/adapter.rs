//! The adapter: carries out the pipeline's intents (handler tasks,
//! dead-letter writes, commits, pauses) and feeds it verdicts,
//! acknowledgements and rebalances.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;

use crate::batch::Batch;
use crate::commit::{CommitQueue, CommitResult, CommittedPartition};
use crate::dlq::DeadLetterWriter;
use crate::fetch::FetchQueue;
use crate::handler::{BatchOutcome, Failure, Handler};
use crate::pipeline::{CommitRefusal, DeadLetterSlot, Intent, Pipeline, Slot};
use crate::telemetry::{ResultLabel, StatsExporter, Telemetry};
use microbatch_kafka::LogThrottle;

use super::driver::{turn_until, Next};

// Handled, the large variant, is also the one sent for every batch:
// boxing it would add an allocation per batch to shrink the rare ones.
#[allow(clippy::large_enum_variant)]
pub(super) enum Event {
    Handled {
        slot: Slot,
        batch: Batch,
        outcome: BatchOutcome,
        elapsed: Duration,
    },
    DeadLettered {
        slot: DeadLetterSlot,
        written: Vec<i64>,
        error: Option<String>,
    },
    /// What the dead-letter topic holds of a partition's records already.
    EarlierDeadLetters {
        partition: i32,
        epoch: u64,
        /// (offset, the record's timestamp).
        found: Vec<(i64, Option<i64>)>,
    },
}

/// Sends a failure if dropped before a verdict (a cancelled handler task),
/// so a batch can never vanish and never be counted as done.
pub(super) struct Verdict<T: From<Event>> {
    pub(super) tx: Sender<T>,
    pub(super) slot: Slot,
    pub(super) batch: Option<Batch>,
    pub(super) started: Instant,
}

impl<T: From<Event>> Verdict<T> {
    pub(super) fn deliver(mut self, outcome: BatchOutcome) {
        let batch = self.batch.take().expect("a verdict is delivered once");
        let _ = self.tx.send(T::from(Event::Handled {
            slot: self.slot,
            batch,
            outcome,
            elapsed: self.started.elapsed(),
        }));
    }
}

impl<T: From<Event>> Drop for Verdict<T> {
    fn drop(&mut self) {
        if let Some(batch) = self.batch.take() {
            let _ = self.tx.send(T::from(Event::Handled {
                slot: self.slot,
                batch,
                outcome: BatchOutcome::Failed(Failure::retryable(
                    "handler task ended without a verdict",
                )),
                elapsed: self.started.elapsed(),
            }));
        }
    }
}

/// Runs one batch on the handler in a task of `runtime`; its verdict (a
/// timeout and a panic are retryable failures) arrives on `tx`.
pub(super) fn spawn_batch<T: From<Event> + Send + 'static>(
    runtime: &Handle,
    handler: Arc<dyn Handler>,
    handler_timeout: Duration,
    tx: Sender<T>,
    slot: Slot,
    batch: Batch,
) {
    let timeout = handler.max_time(handler_timeout);
    let mut verdict = Verdict {
        tx,
        slot,
        batch: None,
        started: Instant::now(),
    };
    runtime.spawn(async move {
        // A panicking handler fails its batch like any other error, in
        // `ready` as in `handle`.
        let handled = AssertUnwindSafe(async {
            // A handler's own back-off is not part of its time on the
            // batch; it too is bounded by the timeout.
            let _ = tokio::time::timeout(timeout, handler.ready()).await;
            let started = Instant::now();
            (
                started,
                tokio::time::timeout(timeout, handler.handle(&batch)).await,
            )
        })
        .catch_unwind()
        .await;
        let outcome = match handled {
            Ok((started, Ok(outcome))) => {
                verdict.started = started;
                outcome
            }
            Ok((started, Err(_))) => {
                verdict.started = started;
                BatchOutcome::Failed(Failure::retryable(format!(
                    "handler timed out after {} ms",
                    timeout.as_millis()
                )))
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                BatchOutcome::Failed(Failure::retryable(format!("handler panicked: {what}")))
            }
        };
        verdict.batch = Some(batch);
        verdict.deliver(outcome);
    });
}

/// Writes dead letters in a task of `runtime`; the broker's answer arrives
/// on `tx`.
pub(super) fn spawn_dead_letter<T: From<Event> + Send + 'static>(
    runtime: &Handle,
    writer: DeadLetterWriter,
    tx: Sender<T>,
    slot: DeadLetterSlot,
    batch: Batch,
    failures: Vec<(i64, Failure)>,
    attempts: u32,
) {
    runtime.spawn(async move {
        let (written, error) = writer.write(&batch, &failures, attempts).await;
        let _ = tx.send(T::from(Event::DeadLettered {
            slot,
            written,
            error,
        }));
    });
}

/// Reads what the dead-letter topic holds of `partition`'s records
/// already, off the poll thread; a failure is said and counts as nothing
/// found (a dead letter may then be written twice).
pub(super) fn find_dead_letters<T: From<Event> + Send + 'static>(
    runtime: &Handle,
    writer: DeadLetterWriter,
    topic: String,
    tx: Sender<T>,
    partition: i32,
    epoch: u64,
) {
    runtime.spawn_blocking(move || {
        let found = writer
            .earlier_dead_letters(&topic, partition, crate::dlq::EARLIER_DEAD_LETTERS_TIMEOUT)
            .unwrap_or_else(|e| {
                tracing::warn!(
                    partition,
                    dlq_topic = writer.topic(),
                    error = %e,
                    "could not read the dead-letter topic for this partition's dead letters \
                     already written; one written before a restart may be written again"
                );
                Vec::new()
            });
        let _ = tx.send(T::from(Event::EarlierDeadLetters {
            partition,
            epoch,
            found,
        }));
    });
}

pub(super) struct Adapter {
    pub(super) pipeline: Pipeline,
    pub(super) topic: Arc<str>,
    pub(super) handler: Arc<dyn Handler>,
    pub(super) handler_timeout: Duration,
    pub(super) telemetry: Arc<Telemetry>,
    pub(super) runtime: Handle,
    pub(super) events_tx: Sender<Event>,
    pub(super) events_rx: Receiver<Event>,
    pub(super) dlq: Option<DeadLetterWriter>,
    pub(super) audit: Option<BufWriter<File>>,
    pub(super) commits: CommitQueue,
    pub(super) fetch: FetchQueue,
    /// Failed commits are logged at most once per back-off step.
    pub(super) commit_log: LogThrottle,
    /// Writes the pipeline's numbers to the metrics.
    pub(super) stats: StatsExporter,
    /// When the assigned partitions' routes are next checked.
    pub(super) route_check_at: Instant,
}

impl Adapter {
    /// Carries out every intent the pipeline has.
    pub(super) fn execute<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        self.carry_out(consumer);
        self.stats
            .export(&self.pipeline.stats(), &self.topic, &self.telemetry);
    }

    pub(super) fn carry_out<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        while let Some(intent) = self.pipeline.poll_intent() {
            match intent {
                Intent::Start { slot, batch } => self.start(slot, batch),
                Intent::DeadLetter {
                    slot,
                    batch,
                    failures,
                    attempts,
                } => {
                    let writer = self.dlq.clone().expect("dead letters only with a writer");
                    spawn_dead_letter(
                        &self.runtime,
                        writer,
                        self.events_tx.clone(),
                        slot,
                        batch,
                        failures,
                        attempts,
                    );
                }
                Intent::Commit {
                    offsets,
                    sync,
                    metadata,
                } => self.commit(consumer, &offsets, sync, &metadata),
                Intent::Pause(partitions) => {
                    if let Err(e) = consumer.pause(&self.list(&partitions)) {
                        tracing::warn!(error = %e, "pausing partitions failed");
                    }
                }
                Intent::Resume(partitions) => {
                    if let Err(e) = consumer.resume(&self.list(&partitions)) {
                        tracing::warn!(error = %e, "resuming partitions failed");
                    }
                }
                Intent::Processed { partition, offsets } => self.audit(partition, &offsets),
                Intent::FindDeadLetters { partition, epoch } => match self.dlq.clone() {
                    Some(writer) if writer.finds_earlier() => {
                        find_dead_letters(
                            &self.runtime,
                            writer,
                            self.topic.to_string(),
                            self.events_tx.clone(),
                            partition,
                            epoch,
                        );
                    }
                    _ => self
                        .pipeline
                        .handle_earlier_dead_letters(partition, epoch, &[]),
                },
                // A consumer group's reports ride on its commits.
                Intent::ReportCapacity(_) => {}
                Intent::Accept { partition, .. } => {
                    // Only a share group's pipeline acknowledges per record.
                    tracing::error!(
                        partition,
                        "per-record acknowledgement asked of a consumer group; ignored"
                    );
                }
                Intent::ReadPositions(partitions) => {
                    if let Ok(positions) = consumer.position() {
                        for e in positions.elements_for_topic(&self.topic) {
                            if let (Offset::Offset(o), true) =
                                (e.offset(), partitions.contains(&e.partition()))
                            {
                                self.pipeline.handle_position(e.partition(), o);
                            }
                        }
                    }
                }
            }
        }
    }

    pub(super) fn list(&self, partitions: &[i32]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::with_capacity(partitions.len());
        for p in partitions {
            tpl.add_partition(&self.topic, *p);
        }
        tpl
    }

    pub(super) fn start(&mut self, slot: Slot, batch: Batch) {
        self.telemetry
            .metrics
            .batch_size
            .observe(batch.len() as f64);
        spawn_batch(
            &self.runtime,
            self.handler.clone(),
            self.handler_timeout,
            self.events_tx.clone(),
            slot,
            batch,
        );
    }

    pub(super) fn on_event(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Handled {
                slot,
                batch,
                outcome,
                elapsed,
            } => {
                self.telemetry
                    .metrics
                    .batch_duration
                    .observe(elapsed.as_secs_f64());
                self.pipeline.handle_verdict(slot, batch, outcome, now);
            }
            Event::DeadLettered {
                slot,
                written,
                error,
            } => self
                .pipeline
                .handle_dead_lettered(slot, &written, error, now),
            Event::EarlierDeadLetters {
                partition,
                epoch,
                found,
            } => self
                .pipeline
                .handle_earlier_dead_letters(partition, epoch, &found),
        }
    }

    /// Serves every verdict and acknowledgement that has arrived.
    pub(super) fn drain_events(&mut self) {
        while let Ok(event) = self.events_rx.try_recv() {
            self.on_event(event);
        }
    }

    pub(super) fn audit(&mut self, partition: i32, offsets: &[i64]) {
        if let Some(out) = self.audit.as_mut() {
            write_audit(out, partition, offsets);
        }
    }

    pub(super) fn commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        offsets: &[(i32, i64)],
        sync: bool,
        metadata: &str,
    ) {
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for (p, o) in offsets {
            let mut elem = tpl.add_partition(&self.topic, *p);
            elem.set_offset(Offset::Offset(*o))
                .expect("a fresh offset is always valid");
            elem.set_metadata(metadata);
        }
        if sync {
            let result = match consumer.commit(&tpl, CommitMode::Sync) {
                Ok(()) => CommitResult {
                    error: None,
                    partitions: committed(&tpl),
                },
                Err(e) => failed_commit(&tpl, e),
            };
            self.on_commit(result, true);
        } else if let Err(e) = self.commits.commit(consumer, &tpl) {
            self.on_commit(failed_commit(&tpl, e), false);
        }
    }

    /// Reads the results of asynchronous commits that have arrived.
    pub(super) fn collect_commit_results(&mut self) {
        while let Some(result) = self.commits.poll() {
            self.on_commit(result, false);
        }
    }

    /// `sync`: the result of a synchronous commit (the final ones).
    pub(super) fn on_commit(&mut self, result: CommitResult, sync: bool) {
        let m = &self.telemetry.metrics;
        if result.error == Some(RDKafkaErrorCode::NoOffset) {
            return;
        }
        // A commit can succeed as a request and still fail per partition.
        let mut failed = Vec::new();
        let mut refused = None;
        for p in result.partitions.iter().filter(|p| *p.topic == *self.topic) {
            let error = p.error.or(result.error);
            if let Some(code) = error {
                // One partition in a busy group makes the whole commit worth
                // trying again.
                if refused != Some(CommitRefusal::GroupBusy) {
                    refused = Some(refusal(code));
                }
            }
            match error {
                None if p.offset >= 0 => {
                    tracing::debug!(
                        partition = p.partition,
                        offset = p.offset,
                        "commit acknowledged"
                    );
                    self.pipeline.handle_committed(p.partition, p.offset)
                }
                None => {}
                Some(code) => failed.push(format!("{}@{}: {code}", p.partition, p.offset)),
            }
        }
        if failed.is_empty() {
            m.commits.get_or_create(&ResultLabel { result: "ok" }).inc();
            self.commit_log.reset();
        } else {
            m.commits
                .get_or_create(&ResultLabel { result: "error" })
                .inc();
            if let Some(suppressed) = self.commit_log.allow(Instant::now()) {
                tracing::warn!(partitions = %failed.join(", "), suppressed, "offset commit failed; it is retried at the next interval");
            }
        }
        if let Some(refusal) = refused {
            self.pipeline
                .handle_commit_refused(refusal, sync, Instant::now());
        }
    }

    /// One round of the pipeline: verdicts in, clock, intents out.
    pub(super) fn turn<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, now: Instant) {
        self.drain_events();
        self.collect_commit_results();
        self.pipeline.handle_tick(now);
        self.execute(consumer);
        if now >= self.route_check_at {
            self.route_check_at = now + ROUTE_CHECK;
            self.check_routes(consumer);
        }
    }

    /// Routes every assigned partition to the fetch queue again, saying so
    /// when one's records were stranded (see [`FetchQueue::reroute`]).
    pub(super) fn check_routes<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        for partition in self.pipeline.assigned() {
            if self.fetch.reroute(consumer, &self.topic, partition) {
                tracing::warn!(
                    partition,
                    "records of this partition were waiting outside the worker's fetch queue \
                     (librdkafka dropped its route); routed again"
                );
            }
        }
    }

    /// Lost partitions: forgotten at once, neither drained nor committed.
    pub(super) fn lose(&mut self, tpl: &TopicPartitionList) {
        let lost: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        self.pipeline.handle_lost(&lost);
    }

    /// Revocation: drains the revoked partitions while the others go on,
    /// until they are done or the deadline passes, then commits them and
    /// forgets them. Runs inside librdkafka's rebalance callback.
    pub(super) fn revoke<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tpl: &TopicPartitionList,
        stop: &AtomicBool,
    ) {
        let revoked: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        if !self.pipeline.begin_revoke(&revoked, Instant::now()) {
            return;
        }
        // Inside the callback the consumer cannot be polled: verdicts and
        // dead-letter acknowledgements are what move a revocation on.
        turn_until(
            self,
            |a, now| {
                if stop.load(AtomicOrdering::SeqCst) {
                    // One drain deadline from the signal, revoke included.
                    a.pipeline.shutdown(now);
                }
                a.turn(consumer, now);
                if a.pipeline.revoke_settled(now) {
                    Next::Done
                } else {
                    Next::TurnBy(a.pipeline.poll_timeout().min(now + REVOKE_TURN))
                }
            },
            |a, left| {
                // The adapter holds a sender: the channel cannot close.
                if let Ok(event) = a.events_rx.recv_timeout(left.max(Duration::from_millis(1))) {
                    a.on_event(event);
                }
            },
        );
        self.pipeline.complete_revoke();
        self.execute(consumer);
    }
}

/// How often the assigned partitions' fetch routes are checked.
const ROUTE_CHECK: Duration = Duration::from_secs(2);

/// A revocation's drain turns at least this often (the stop flag).
const REVOKE_TURN: Duration = Duration::from_millis(50);

/// Appends `partition offset` per processed record to the audit log.
pub(super) fn write_audit(out: &mut BufWriter<File>, partition: i32, offsets: &[i64]) {
    for o in offsets {
        let _ = writeln!(out, "{partition} {o}");
    }
    if let Err(e) = out.flush() {
        tracing::error!(error = %e, "audit log write failed");
    }
}

/// How the pipeline sees a commit error: a group between generations (or a
/// coordinator moving) accepts the same commit once it settles.
fn refusal(code: RDKafkaErrorCode) -> CommitRefusal {
    use RDKafkaErrorCode::*;
    match code {
        RebalanceInProgress
        | IllegalGeneration
        | StaleMemberEpoch
        | NotCoordinator
        | CoordinatorNotAvailable
        | CoordinatorLoadInProgress
        | RequestTimedOut
        | WaitingForCoordinator => CommitRefusal::GroupBusy,
        _ => CommitRefusal::Other,
    }
}

/// The partitions of a commit, with the error librdkafka set on each (a
/// synchronous commit writes per-partition results into the list it sent).
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
            error: e
                .error()
                .err()
                .map(|err| err.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail)),
        })
        .collect()
}

fn failed_commit(tpl: &TopicPartitionList, e: KafkaError) -> CommitResult {
    CommitResult {
        error: Some(e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail)),
        partitions: committed(tpl),
    }
}
