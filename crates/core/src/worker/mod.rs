//! The worker: one consumer-group member that turns records into microbatches,
//! hands them to a [`Handler`] and commits what is done.
//!
//! **The delivery guarantee: at least once, nothing lost.** An offset is
//! committed only when its record and every earlier record of the partition
//! are done: processed by the handler, or written to the dead-letter topic and
//! acknowledged (see [`crate::offsets`]). A crash or an unclean revoke can
//! replay records in flight or done above the watermark; nothing else can.
//! docs/delivery.md lists the edges and what the worker does at each.
//!
//! Every decision is the [`Pipeline`]'s, a state machine without I/O; this
//! module is its adapter. A dedicated thread owns the consumer and runs the
//! poll loop; it never blocks on the handler, so the member stays in the
//! group however slow the handler is:
//!
//! ```text
//! librdkafka -> records -> Pipeline -> intents -> handler tasks, dead-letter
//!      ^                     ^                     writes, commits, pauses
//!      |                     +---- verdicts, acknowledgements <---+
//! ```
//!
//! A revocation is served inside librdkafka's rebalance callback: the
//! revoked partitions drain (see [`crate::pipeline`]) while the others go
//! on, so nothing is ever committed for a partition this member no longer owns.
//!
//! # Layout
//! - this module: [`Worker`], its start (topic checks, the dead-letter
//!   writer, the consumer) and the poll loop;
//! - `adapter`: carries out the pipeline's intents (handler tasks,
//!   dead-letter writes, commits, pauses) and feeds back verdicts and
//!   acknowledgements; drains a revocation;
//! - `context`: librdkafka's callbacks (logs, errors, statistics,
//!   rebalances), which reach the adapter;
//! - `driver`: the one loop (turn the pipeline until a condition holds,
//!   waiting between turns) that the poll loop, a revocation's drain and
//!   the final commit's retries share.

mod adapter;
mod context;
mod driver;
mod share;

pub use share::ACCEPT_FLUSH;

use std::fs::{File, OpenOptions};
use std::io::BufWriter;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::mpsc::{self};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use thiserror::Error;
use tokio::runtime::Handle;

use crate::capacity::CapacityMeter;
use crate::commit::CommitQueue;
use crate::config::{DeadLetterConfig, GroupProtocol, WorkerConfig};
use crate::dlq::{DeadLetterWriter, DlqError};
use crate::fetch::{ConsumedRecord, FetchQueue, FetchedMessage};
use crate::handler::Handler;
use crate::health::HealthScope;
use crate::pipeline::{Acknowledgement, Options, Phase, Pipeline};
use crate::telemetry::{StatsExporter, Telemetry};
use microbatch_kafka::admin::{TopicLookup, TopicState};
use microbatch_kafka::aws_iam::WithTokens;
use microbatch_kafka::LogThrottle;

use adapter::Adapter;
use context::WorkerContext;
use driver::{turn_until, Next};

/// Records taken from the client per poll-loop round.
const MAX_BURST: usize = 2048;

/// librdkafka's prefetch, in records, for all partitions together.
const PREFETCH_RECORDS: usize = 20_000;

/// How long the worker waits for the Kafka client to close after the final
/// commit (a supervisor's SIGKILL comes later than this past the deadline).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Consumer-queue events (rebalances, errors, statistics) served per round.
const MAX_EVENTS_PER_ROUND: usize = 16;

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
    #[error(transparent)]
    DeadLetterTopic(#[from] DlqError),
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
    #[error("the handler is misconfigured: {0}")]
    HandlerMisconfigured(String),
    #[error("share group: {0}")]
    Share(String),
}

/// What a worker did, returned when it stops.
pub type WorkerReport = crate::pipeline::Report;

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

    /// Makes sure the dead-letter topic exists (creating it when allowed),
    /// then consumes until `shutdown` resolves, drains, commits and leaves
    /// the group. Must be called within a multi-threaded tokio runtime.
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
        let lookup = TopicLookup::new(&self.config.kafka)?;
        if !self.wait_for_topic(&lookup, &stop).await {
            signal_task.abort();
            return Ok(WorkerReport::default());
        }
        // Dead letters need somewhere to go before the first record is taken.
        let dlq = match &self.config.dlq {
            Some(dlq) => match self.prepare_dead_letters(&lookup, dlq, &stop).await {
                Ok(Some(writer)) => Some(writer),
                Ok(None) => {
                    signal_task.abort();
                    return Ok(WorkerReport::default());
                }
                Err(e) => {
                    signal_task.abort();
                    return Err(e.into());
                }
            },
            None => None,
        };
        let handler = self.handler.clone();
        // A share group's member joins before the handler starts: a group
        // that cannot be set up fails the worker at once.
        let (share_consumer, config_keeper) = if self.config.share_group {
            match self.join_share_group().await {
                Ok((consumer, keeper)) => (Some(consumer), Some(keeper)),
                Err(e) => {
                    signal_task.abort();
                    return Err(e);
                }
            }
        } else {
            (None, None)
        };
        handler.prepare(self.config.concurrency).await;
        let runtime = Handle::current();
        let result = tokio::task::spawn_blocking(move || match share_consumer {
            Some(consumer) => share::poll_loop(self, consumer, dlq, runtime, stop),
            None => poll_loop(self, dlq, runtime, stop),
        })
        .await
        .unwrap_or(Err(WorkerError::Panicked));
        signal_task.abort();
        if let Some(keeper) = config_keeper {
            keeper.abort();
        }
        handler.shutdown().await;
        result
    }

    /// Sets the share group's configs the worker owns and joins it; the
    /// task that keeps those configs while the worker runs.
    async fn join_share_group(
        &self,
    ) -> Result<
        (
            microbatch_kafka::share::ShareConsumer,
            tokio::task::JoinHandle<()>,
        ),
        WorkerError,
    > {
        let share = share::consumer_config(self)?;
        share::configure_group(self, &share).await?;
        let keeper = tokio::spawn(share::keep_delivery_limit(
            share.clone(),
            self.config.share_delivery_limit(),
            self.config.share_delivery_limit_floor(),
        ));
        match microbatch_kafka::share::ShareConsumer::join(share).await {
            Ok(consumer) => Ok((consumer, keeper)),
            Err(e) => {
                keeper.abort();
                Err(WorkerError::Share(format!(
                    "could not join share group {:?}: {e}",
                    self.config.group
                )))
            }
        }
    }

    /// The dead-letter writer, once its topic is ready; `None` if shutdown
    /// came first. While the brokers cannot be reached it keeps trying,
    /// with `/readyz` saying why.
    async fn prepare_dead_letters(
        &self,
        lookup: &TopicLookup,
        dlq: &DeadLetterConfig,
        stop: &AtomicBool,
    ) -> Result<Option<DeadLetterWriter>, DlqError> {
        let cfg = &self.config;
        let mut backoff = Duration::from_millis(500);
        loop {
            match DeadLetterWriter::prepare(&cfg.kafka, lookup, dlq, &cfg.topic, &cfg.group).await {
                Ok(writer) => return Ok(Some(writer)),
                Err(e) if e.is_transient() => {
                    tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "dead-letter topic not checked yet");
                    self.telemetry.readiness.set_error(e.to_string());
                }
                Err(e) => return Err(e),
            }
            if !sleep_unless_stopped(backoff, stop).await {
                return Ok(None);
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Waits while the topic does not exist, so that a topic created later
    /// (or a typo in `--topic`) gets neither a member that looks healthy nor
    /// a dead-letter topic of its own. `false` if shutdown came first. A
    /// lookup that fails otherwise is left to the steps after, which report
    /// it.
    async fn wait_for_topic(&self, lookup: &TopicLookup, stop: &AtomicBool) -> bool {
        let topic = &self.config.topic;
        let throttle = LogThrottle::default();
        let mut waited = false;
        loop {
            match lookup.state(topic).await {
                Ok((TopicState::Missing, _)) => {
                    let reason = format!(
                        "topic {topic:?} does not exist: waiting for it (create it with \
                         microbatch topic create --topic {topic}, or fix --topic)"
                    );
                    if let Some(suppressed) = throttle.allow(Instant::now()) {
                        tracing::warn!(suppressed, "{reason}");
                    }
                    self.telemetry.readiness.set_error(reason);
                    waited = true;
                }
                _ => {
                    if waited {
                        tracing::info!(topic = %topic, "topic exists now");
                    }
                    return true;
                }
            }
            if !sleep_unless_stopped(TOPIC_RECHECK, stop).await {
                return false;
            }
        }
    }
}

/// How often a worker looks again for a topic that does not exist.
const TOPIC_RECHECK: Duration = Duration::from_secs(2);

/// Sleeps for `duration`; `false` as soon as `stop` is set.
async fn sleep_unless_stopped(duration: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        if stop.load(AtomicOrdering::SeqCst) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    !stop.load(AtomicOrdering::SeqCst)
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The pipeline with what carries out its intents; owned by the poll thread
/// and reached by the rebalance callbacks through the consumer context.
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

fn create_consumer(
    worker: &Worker,
    stop: Arc<AtomicBool>,
) -> Result<WithTokens<BaseConsumer<WorkerContext>>, WorkerError> {
    let cfg = &worker.config;
    let context = WorkerContext {
        adapter: Mutex::new(None),
        telemetry: worker.telemetry.clone(),
        topic: cfg.topic.clone(),
        stop,
        error_throttle: LogThrottle::default(),
        oauth: cfg.kafka.oauth_hook(),
    };
    let queued_min = (4 * cfg.batch.max_records).max(PREFETCH_RECORDS);
    let mut client = cfg.kafka.client_config();
    client
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", cfg.offset_reset.as_str())
        // Also the classic protocol's clock: librdkafka sends its heartbeats
        // only when its main loop wakes, at least once a second, or on this
        // timer (docs/performance.md, "Classic heartbeats twice a second").
        .set("statistics.interval.ms", "500")
        // librdkafka's prefetch. Both limits count the queue a partition's
        // records are forwarded to, here the one fetch queue of all
        // partitions: 20,000 records (or four batches) and 16 MiB of
        // payload in all. Its defaults (100,000 and 64 MiB) cost memory for
        // nothing; our own caps bound what is held after that.
        .set("queued.min.messages", queued_min.to_string())
        .set("queued.max.messages.kbytes", "16384")
        // When that queue is full librdkafka looks again after this long; its
        // default of 1 s starves a fast handler, and even 10 ms leaves the
        // poll thread idle (docs/performance.md, findings 1 and 10).
        .set("fetch.queue.backoff.ms", "1")
        // Smaller fetch responses than the 1 MiB default: each stays in
        // memory until its last record is copied, and smaller ones keep the
        // queue topped up more evenly.
        .set("max.partition.fetch.bytes", "262144")
        .set("fetch.wait.max.ms", "100");
    match cfg.group_protocol {
        GroupProtocol::Classic => {
            client
                .set("partition.assignment.strategy", "cooperative-sticky")
                // A crashed worker's partitions move on after 10 s instead of
                // Kafka's 45 s default: an autoscaled group changes often.
                .set("session.timeout.ms", "10000")
                // Frequent heartbeats let the others notice a worker that
                // joins or leaves sooner: a SIGTERM hands over in 0.5 s, not 1 s.
                .set("heartbeat.interval.ms", "500");
        }
        // The broker assigns partitions and owns the session and heartbeat
        // settings (group.consumer.*); librdkafka refuses the classic ones.
        GroupProtocol::Consumer => {
            client.set("group.protocol", "consumer");
        }
    }
    // Users' pass-through properties win over our defaults.
    for (k, v) in &cfg.kafka.properties {
        client.set(k, v);
    }
    Ok(cfg.kafka.create_client(&client, context)?)
}

/// `wait` rounded up to whole milliseconds: librdkafka waits in
/// milliseconds and the client library spins through any remainder.
fn whole_ms(wait: Duration) -> Duration {
    Duration::from_millis(wait.as_micros().div_ceil(1000) as u64)
}

/// The poll loop's wait: rebalances, errors and statistics first (their
/// callbacks take the adapter lock), then a burst of records, waiting up to
/// `left` for them (or, with the pipeline full, for a verdict instead).
fn take_records(
    consumer: &BaseConsumer<WorkerContext>,
    left: Duration,
    burst: &mut Vec<FetchedMessage>,
) {
    let ctx = consumer.context();
    let timeout = whole_ms(left);
    // A bounded number of events, so records keep flowing.
    let events_waiting = || {
        ctx.with_adapter(|a| a.fetch.consumer_events_waiting())
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
                ctx.with_adapter(|a| a.pipeline.handle_record(&msg, Instant::now()));
            }
            Some(Err(e)) => tracing::debug!(error = %e, "poll error"),
            None => {}
        }
        waiting = events_waiting();
    }
    // Events left for the next round: take what records there are now.
    let timeout = if waiting { Duration::ZERO } else { timeout };
    // The clock is read once for the whole burst. No rebalance can run
    // between taking records and `handle_record`, and librdkafka drops
    // those fetched before a revoke or pause.
    ctx.with_adapter(|a| {
        if a.pipeline.is_full() {
            // Wait for a batch to finish instead: that is what frees room.
            if let Ok(event) = a.events_rx.recv_timeout(timeout) {
                a.on_event(event);
            }
            return;
        }
        a.fetch.consume(timeout, burst);
        let now = Instant::now();
        for msg in burst.drain(..) {
            if let Some(code) = msg.error() {
                tracing::debug!(error = %code, detail = %msg.error_text(), partition = msg.partition(), "fetch error");
            } else {
                a.pipeline.handle_record(&msg, now);
            }
        }
    });
}

fn poll_loop(
    worker: Worker,
    dlq: Option<DeadLetterWriter>,
    runtime: Handle,
    stop: Arc<AtomicBool>,
) -> Result<WorkerReport, WorkerError> {
    let consumer = create_consumer(&worker, stop.clone())?;
    let cfg = worker.config.clone();
    let audit = cfg.audit_log.as_deref().map(open_audit).transpose()?;
    let (events_tx, events_rx) = mpsc::channel();
    let keep_headers = worker.handler.reads_headers()
        || dlq.is_some()
        || matches!(cfg.health_scope, HealthScope::Header(_));
    let seed = wall_ms() as u64 ^ u64::from(std::process::id());
    let options = Options {
        dead_letters: dlq.is_some(),
        audit: audit.is_some(),
        keep_headers,
        seed,
        acknowledgement: Acknowledgement::Watermark,
        scope_successes: !worker.handler.skips_records(),
    };
    let pipeline = Pipeline::new(
        cfg.pipeline(),
        options,
        CapacityMeter::process_worker_id(),
        Instant::now(),
        wall_ms(),
    );
    let adapter = Adapter {
        pipeline,
        topic: Arc::from(cfg.topic.as_str()),
        handler: worker.handler.clone(),
        handler_timeout: cfg.handler_timeout,
        telemetry: worker.telemetry.clone(),
        runtime,
        events_tx,
        events_rx,
        dlq,
        audit,
        commits: CommitQueue::new(&consumer),
        fetch: FetchQueue::new(&consumer, MAX_BURST),
        commit_log: LogThrottle::default(),
        stats: StatsExporter::default(),
        route_check_at: Instant::now(),
    };
    *consumer
        .context()
        .adapter
        .lock()
        .expect("adapter lock poisoned") = Some(adapter);
    consumer.subscribe(&[&cfg.topic])?;
    tracing::info!(topic = %cfg.topic, group = %cfg.group, group_protocol = %cfg.group_protocol, ordering = %cfg.ordering, concurrency = cfg.concurrency, "worker started");
    for warning in [cfg.backpressure_warning(), cfg.records_cap_warning()]
        .into_iter()
        .flatten()
    {
        tracing::warn!("{warning}");
    }

    let ctx = consumer.context();
    let mut burst: Vec<FetchedMessage> = Vec::with_capacity(MAX_BURST);
    turn_until(
        &mut burst,
        |_, now| {
            ctx.with_adapter(|a| {
                let p = &mut a.pipeline;
                if p.phase() == Phase::Consuming
                    && (stop.load(AtomicOrdering::SeqCst)
                        || p.fatal().is_some()
                        || a.handler.misconfigured().is_some())
                {
                    p.shutdown(now);
                }
                a.turn(&consumer, now);
                let p = &a.pipeline;
                if p.drained(now) {
                    return Next::Done;
                }
                // While batches run (or wait for a commit's acknowledgement),
                // wait briefly so a finished one frees its slot quickly.
                let cap = if p.in_flight() > 0 || p.waiting_for_ack() {
                    Duration::from_millis(1)
                } else {
                    Duration::from_millis(100)
                };
                Next::TurnBy(p.poll_timeout().min(now + cap))
            })
            .expect("adapter installed before polling")
        },
        |burst, left| take_records(&consumer, left, burst),
    );

    let (report, fatal) = ctx
        .with_adapter(|a| {
            a.drain_events();
            a.collect_commit_results();
            a.pipeline.close();
            a.execute(&consumer);
            let fatal = a
                .pipeline
                .fatal()
                .map(|u| WorkerError::Undeliverable {
                    partition: u.partition,
                    offset: u.offset,
                    error: u.error.clone(),
                })
                .or_else(|| {
                    a.handler
                        .misconfigured()
                        .map(WorkerError::HandlerMisconfigured)
                });
            (a.pipeline.report().clone(), fatal)
        })
        .expect("adapter installed before polling");
    // A final commit refused while the group rebalances is the pipeline's
    // to try again; polling serves the rebalance meanwhile, so it can end.
    turn_until(
        &mut (),
        |_, now| {
            ctx.with_adapter(|a| {
                a.turn(&consumer, now);
                if a.pipeline.finished(now) {
                    Next::Done
                } else {
                    Next::TurnBy(a.pipeline.poll_timeout())
                }
            })
            .unwrap_or(Next::Done)
        },
        |_, left| {
            let _ = consumer.poll(whole_ms(left));
        },
    );
    consumer.unsubscribe();
    // Serve the final revoke so the group sees us leave promptly.
    let _ = consumer.poll(Duration::from_millis(100));
    // Closing the client waits for the group coordinator, which may be gone
    // (a broker restart): the worker does not wait for it past a bound.
    let (closed_tx, closed_rx) = mpsc::channel();
    let adapter = ctx.adapter.lock().expect("adapter lock poisoned").take();
    std::thread::spawn(move || {
        // The commit queue must go before the client it belongs to.
        drop(adapter);
        drop(consumer);
        let _ = closed_tx.send(());
    });
    if closed_rx.recv_timeout(CLOSE_TIMEOUT).is_err() {
        tracing::warn!(
            timeout_ms = CLOSE_TIMEOUT.as_millis() as u64,
            "the Kafka client did not close in time (group coordinator unreachable?); leaving without it"
        );
    }
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
