//! A share group's member (KIP-932): the same pipeline as a consumer
//! group's, acknowledging each record as it is done instead of committing
//! a watermark ([`Acknowledgement::PerRecord`]).
//!
//! ```text
//! fetcher task: ShareConsumer --records--> poll thread: Pipeline --intents-->
//!      ^                                        ^        handler tasks, dead letters
//!      +----------- accepts, poll, close -------+---- verdicts <-----+
//! ```
//!
//! The poll thread owns the pipeline, as for a consumer group; the fetcher
//! task owns the [`ShareConsumer`] (its calls are async and not
//! cancel-safe: records acquired in a fetch that was dropped would wait for
//! their lock). A fetch acquires about one round of slots (`--concurrency`
//! × `--max-records`); the thread asks for the next while the last runs,
//! never holding three (see `Member::fetch_if_room`).
//!
//! What the worker tells the broker:
//! - ACCEPT: the handler succeeded on the record, or its dead letter was
//!   acknowledged by the broker (sent with the next fetch, or within
//!   [`ACCEPT_FLUSH`] while no fetch goes out).
//! - RENEW (KIP-1222, Kafka 4.2+): every record it holds, every third of
//!   the lock's duration, so that a slow handler, a retry's back-off or a
//!   wait for a slot never loses a record to another member ([`Locks`]).
//! - Nothing else: records not done when the worker stops are released by
//!   the broker when the member's share sessions close; a crashed worker's
//!   return when the broker sees its connections go, or their locks run
//!   out.
//! - A record delivered more often than `--max-attempts` is dead-lettered
//!   before any handler sees it again; the group's
//!   `share.delivery.count.limit` is 10 and `--max-attempts` at most 8, so
//!   the broker never archives a record the worker has not tried to
//!   dead-letter, with a delivery to spare; a limit lowered by hand is set
//!   back ([`keep_delivery_limit`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use microbatch_kafka::aws_iam::WithTokens;
use microbatch_kafka::capacity_report::share_capacity_group;
use microbatch_kafka::client::CommitLoggingContext;
use microbatch_kafka::share::cluster::GroupConfig;
use microbatch_kafka::share::{
    AckOutcome, AckType, Fetched, ShareConsumer, ShareConsumerConfig, ShareError, ShareRecord,
};
use microbatch_kafka::LogThrottle;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::sync::mpsc as async_mpsc;

use crate::batch::Header;
use crate::capacity::CapacityMeter;
use crate::dlq::DeadLetterWriter;
use crate::fetch::ConsumedRecord;
use crate::health::HealthScope;
use crate::pipeline::{Acknowledgement, Intent, Options, Phase, Pipeline};
use crate::telemetry::StatsExporter;

use super::adapter::{spawn_batch, spawn_dead_letter, write_audit, Event};
use super::driver::{turn_until, Next};
use super::{open_audit, wall_ms, Worker, WorkerError, WorkerReport, CLOSE_TIMEOUT};

/// Accepts wait at most this long for a fetch to carry them.
pub const ACCEPT_FLUSH: Duration = Duration::from_millis(50);

/// How long a fetch waits at the broker while the worker holds nothing.
const IDLE_FETCH_WAIT: Duration = Duration::from_millis(500);

/// The first wait of a fetch while the worker holds records (see
/// `Member::fetch_wait`).
const BUSY_FETCH_WAIT: Duration = Duration::from_millis(10);

/// A fetch that failed on a retriable error is tried again after this.
const FETCH_RETRY: Duration = Duration::from_millis(500);

/// What reaches the poll thread.
// Handled, the large variant, is also the one sent for every batch:
// boxing it would add an allocation per batch to shrink the rare ones.
#[allow(clippy::large_enum_variant)]
pub(super) enum Input {
    Task(Event),
    Fetched(Fetched),
    /// Verdicts the broker refused: their records return to the group.
    Refused(Vec<AckOutcome>),
    /// Both halves of a refused renewal were refused again: their locks
    /// ran out together (records acquired in one fetch share a deadline).
    LocksLost(Vec<Held>),
    /// The consumer failed for good (membership lost, not authorised).
    Failed(ShareError),
    /// The consumer closed (the member left the group).
    Closed,
    /// The brokers cannot renew locks (before Kafka 4.2): why.
    CannotRenew(String),
    /// The fetcher task ended abnormally (a panic): the consumer is gone.
    FetcherDied(String),
    /// Verdicts or renewals wait for a share session to be opened again,
    /// which only a fetch does.
    NeedSession,
}

impl From<Event> for Input {
    fn from(event: Event) -> Self {
        Self::Task(event)
    }
}

/// What the fetcher task is asked to do.
enum Command {
    Accept(Vec<Held>),
    Renew(Vec<Held>),
    /// Each group in a request of its own: a renewal of several was
    /// refused, and the broker applies a partition's renewals all or none
    /// (see [`after_refused_renewal`]).
    RenewApart(Vec<Vec<Held>>),
    /// Waiting at most `wait` at the broker for about `records` records.
    Fetch {
        wait: Duration,
        records: usize,
    },
    Close,
}

/// A record the worker holds, as the broker knows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Held {
    partition: i32,
    offset: i64,
    delivery_count: i16,
}

/// The locks on the records the worker holds, and when to renew them:
/// pure, on the caller's clock. A lock is renewed every third of its
/// duration, so that one renewal lost or late (a connection reset, a long
/// poll ahead of it) leaves another before the lock runs out.
#[derive(Debug, Default)]
struct Locks {
    records: HashMap<(i32, i64), HeldLock>,
    /// The lock's duration, as the broker last said.
    duration: Option<Duration>,
    /// A broker said it cannot renew (before Kafka 4.2): not asked again
    /// until then (brokers may be part-way through an upgrade).
    unsupported_until: Option<Instant>,
    /// Held records delivered more than once.
    redelivered: usize,
    /// No renewal is due before this (`None`: none held): [`Locks::due`]
    /// runs every turn of the poll thread, and looks at each record only
    /// when one may be due.
    next_due: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct HeldLock {
    delivery_count: i16,
    /// `None`: at once, once the lock's duration is known.
    renew_at: Option<Instant>,
    /// The broker refused to renew it alone: another member has it.
    lost: bool,
}

/// How long a broker that cannot renew is left alone.
const RENEW_UNSUPPORTED_RETRY: Duration = Duration::from_secs(60);

impl Locks {
    /// Whether an earlier delivery of this record is still held.
    fn holds(&self, partition: i32, offset: i64) -> bool {
        self.records.contains_key(&(partition, offset))
    }

    /// A record acquired now (again, if held: the newest delivery is the
    /// one a verdict answers for); `lock_deadline` is when the broker said
    /// the fetch's locks run out.
    fn acquired(
        &mut self,
        partition: i32,
        offset: i64,
        delivery_count: i16,
        now: Instant,
        lock_deadline: Option<Instant>,
    ) {
        if let Some(deadline) = lock_deadline {
            let left = deadline.saturating_duration_since(now);
            if !left.is_zero() {
                self.duration = Some(left);
            }
        }
        let renew_at = lock_deadline.map(|d| now + d.saturating_duration_since(now) / 3);
        let at = renew_at.unwrap_or(now);
        self.next_due = Some(self.next_due.map_or(at, |next| next.min(at)));
        let before = self.records.insert(
            (partition, offset),
            HeldLock {
                delivery_count,
                renew_at,
                lost: false,
            },
        );
        self.count_redelivered(before.map(|h| h.delivery_count), Some(delivery_count));
    }

    fn count_redelivered(&mut self, gone: Option<i16>, come: Option<i16>) {
        if gone.is_some_and(|d| d > 1) {
            self.redelivered = self.redelivered.saturating_sub(1);
        }
        if come.is_some_and(|d| d > 1) {
            self.redelivered += 1;
        }
    }

    /// Whether any record held was delivered before.
    fn holds_redelivered(&self) -> bool {
        self.redelivered > 0
    }

    /// A record done (or given up): its delivery count, if it was held.
    fn done(&mut self, partition: i32, offset: i64) -> Option<i16> {
        let gone = self
            .records
            .remove(&(partition, offset))
            .map(|h| h.delivery_count);
        self.count_redelivered(gone, None);
        gone
    }

    /// The broker refused to renew this record alone: it is another
    /// member's now, and renewing it again would fail the renewals it is
    /// sent with.
    fn lost(&mut self, partition: i32, offset: i64) {
        if let Some(lock) = self.records.get_mut(&(partition, offset)) {
            lock.lost = true;
        }
    }

    /// Of `first..=last` in a partition, the records held and not lost.
    fn held_in(&self, partition: i32, first: i64, last: i64) -> Vec<Held> {
        let mut held: Vec<Held> = self
            .records
            .iter()
            .filter(|(&(p, o), lock)| p == partition && (first..=last).contains(&o) && !lock.lost)
            .map(|(&(partition, offset), lock)| Held {
                partition,
                offset,
                delivery_count: lock.delivery_count,
            })
            .collect();
        held.sort_unstable_by_key(|h| h.offset);
        held
    }

    fn cannot_renew(&mut self, now: Instant) {
        self.unsupported_until = Some(now + RENEW_UNSUPPORTED_RETRY);
    }

    /// The records whose renewal is due now; each is due again a third of
    /// a lock later.
    fn due(&mut self, now: Instant) -> Vec<Held> {
        let Some(duration) = self.duration else {
            return Vec::new();
        };
        if self.unsupported_until.is_some_and(|until| now < until)
            || self.next_due.is_none_or(|next| now < next)
        {
            return Vec::new();
        }
        let mut due = Vec::new();
        let mut next_due: Option<Instant> = None;
        for (&(partition, offset), lock) in &mut self.records {
            if lock.lost {
                continue;
            }
            if lock.renew_at.is_none_or(|at| at <= now) {
                lock.renew_at = Some(now + duration / 3);
                due.push(Held {
                    partition,
                    offset,
                    delivery_count: lock.delivery_count,
                });
            }
            let at = lock.renew_at.unwrap_or(now);
            next_due = Some(next_due.map_or(at, |next| next.min(at)));
        }
        self.next_due = next_due;
        due.sort_unstable_by_key(|h| (h.partition, h.offset));
        due
    }
}

/// A share record as the pipeline reads it.
struct Record<'a>(&'a ShareRecord);

impl ConsumedRecord for Record<'_> {
    fn partition(&self) -> i32 {
        self.0.partition
    }

    fn offset(&self) -> i64 {
        self.0.offset
    }

    fn timestamp_ms(&self) -> Option<i64> {
        (self.0.timestamp >= 0).then_some(self.0.timestamp)
    }

    fn key(&self) -> Option<&[u8]> {
        self.0.key.as_deref()
    }

    fn payload(&self) -> Option<&[u8]> {
        self.0.value.as_deref()
    }

    fn headers(&self) -> Vec<Header> {
        self.0
            .headers
            .iter()
            .map(|(k, v)| Header {
                name: k.clone(),
                value: v.as_ref().map(|b| b.to_vec()),
            })
            .collect()
    }
}

/// The share group's settings the worker owns: where a new group starts,
/// and the delivery limit that leaves a record's end to the worker.
pub(super) async fn configure_group(
    worker: &Worker,
    share: &ShareConsumerConfig,
) -> Result<(), WorkerError> {
    let cfg = &worker.config;
    let reset = cfg.offset_reset.as_str();
    let limit = cfg.share_delivery_limit().to_string();
    ShareConsumer::configure_group(
        share,
        &[("share.auto.offset.reset", reset), (DELIVERY_LIMIT, &limit)],
    )
    .await
    .map_err(|e| {
        WorkerError::Share(format!(
            "could not set share group {:?}'s configs (share.auto.offset.reset={reset}, \
             {DELIVERY_LIMIT}={limit}): {e}{}",
            cfg.group,
            alter_hint(&e)
        ))
    })
}

/// How often a running worker checks the group's delivery limit: one
/// lowered by hand (`kafka-configs`) lets the broker archive records the
/// worker never tried to dead-letter. Each worker adds up to 5 s of its own
/// so that many do not ask at once.
pub(super) const GROUP_CONFIG_CHECK: Duration = Duration::from_secs(30);

const DELIVERY_LIMIT: &str = "share.delivery.count.limit";

/// The delivery limit the brokers apply for the group when it is below
/// `floor` (`--max-attempts` + 2), as found: not listed, or not a number,
/// counts as below. A higher one, or the worker's, is left alone.
pub(super) fn delivery_limit_too_low(applied: &[GroupConfig], floor: u32) -> Option<String> {
    let value = applied
        .iter()
        .find(|c| c.name == DELIVERY_LIMIT)
        .and_then(|c| c.value.clone());
    match value.as_deref().map(str::parse::<u32>) {
        Some(Ok(limit)) if limit >= floor => None,
        _ => Some(value.unwrap_or_else(|| "(not listed)".into())),
    }
}

/// Why setting the group's configs failed, and what to do.
fn alter_hint(e: &ShareError) -> &'static str {
    if e.is_authorization() {
        "; the principal needs ALTER_CONFIGS on the group"
    } else if e.is_invalid_config() {
        "; the brokers may bound share.delivery.count.limit lower \
         (group.share.max.delivery.count.limit)"
    } else {
        ""
    }
}

/// Every [`GROUP_CONFIG_CHECK`], sets the delivery limit back to `limit`
/// when it is below `floor`, saying what it found; runs until aborted, on
/// one connection. A check that fails, or a limit that cannot be set back,
/// is said at most once per back-off step.
pub(super) async fn keep_delivery_limit(share: ShareConsumerConfig, limit: u32, floor: u32) {
    let cluster = share.cluster();
    // The worker's id, not its pid: in a container every worker is pid 1.
    let spread = Duration::from_millis(
        CapacityMeter::process_worker_id()
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
            % 5_000,
    );
    let mut ticks = tokio::time::interval_at(
        tokio::time::Instant::now() + GROUP_CONFIG_CHECK + spread,
        GROUP_CONFIG_CHECK,
    );
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let failures = LogThrottle::default();
    // Against something that keeps lowering it, a warning now and then.
    let set_backs = LogThrottle::default();
    let group = &share.group;
    loop {
        ticks.tick().await;
        let found = match cluster.group_configs(group).await {
            Ok(applied) => match delivery_limit_too_low(&applied, floor) {
                Some(found) => found,
                None => continue,
            },
            Err(e) => {
                if let Some(suppressed) = failures.allow(Instant::now()) {
                    tracing::warn!(%group, error = %e, suppressed, "could not read the share group's configs: a delivery limit lowered by hand goes unseen meanwhile");
                }
                continue;
            }
        };
        let value = limit.to_string();
        match cluster
            .set_group_configs(group, &[(DELIVERY_LIMIT, &value)])
            .await
        {
            Ok(()) => {
                if let Some(suppressed) = set_backs.allow(Instant::now()) {
                    tracing::warn!(
                        %group,
                        suppressed,
                        "{DELIVERY_LIMIT} was {found}, below --max-attempts + 2 ({floor}), so \
                         the broker would archive records before they are dead-lettered: set \
                         back to {limit}"
                    );
                }
            }
            Err(e) => {
                if let Some(suppressed) = failures.allow(Instant::now()) {
                    tracing::error!(
                        %group,
                        error = %e,
                        suppressed,
                        "{DELIVERY_LIMIT} is {found}, below --max-attempts + 2 ({floor}), and \
                         could not be set back to {limit}{}: records delivered that often are \
                         archived by the broker without a dead letter",
                        alter_hint(&e)
                    );
                }
            }
        }
    }
}

/// The consumer's settings: the brokers and security of `--bootstrap-servers`
/// and friends, fetches of at most one round of slots.
pub(super) fn consumer_config(worker: &Worker) -> Result<ShareConsumerConfig, WorkerError> {
    let cfg = &worker.config;
    let mut share =
        ShareConsumerConfig::from_kafka(&cfg.kafka, cfg.group.clone(), vec![cfg.topic.clone()])
            .map_err(|e| WorkerError::Share(e.to_string()))?;
    share.max_records = i32::try_from(round_of_slots(worker)).unwrap_or(i32::MAX);
    share.max_wait = IDLE_FETCH_WAIT;
    // Undecodable records come to the worker once past --max-attempts, to
    // be dead-lettered as any record delivered too often.
    share.hand_undecodable_after = Some(i16::try_from(cfg.retry.max_attempts).unwrap_or(i16::MAX));
    Ok(share)
}

/// Records the worker can start at once: what it fetches at most.
fn round_of_slots(worker: &Worker) -> usize {
    let cfg = &worker.config;
    (cfg.concurrency * cfg.batch.max_records).min(cfg.max_records_held)
}

/// Renews `records`' locks in one ShareAcknowledge per leader.
async fn renew(consumer: &mut ShareConsumer, topic: &str, records: &[Held], out: &Sender<Input>) {
    for r in records {
        // Not held any more: done, or delivered again.
        let _ = consumer.acknowledge_at(
            topic,
            r.partition,
            r.offset,
            r.delivery_count,
            AckType::Renew,
        );
    }
    match consumer.renew().await {
        Ok(()) => {}
        Err(ShareError::Unsupported { detail, .. }) => {
            let _ = out.send(Input::CannotRenew(detail));
        }
        Err(ShareError::Unsent { .. }) => {
            let _ = out.send(Input::NeedSession);
        }
        Err(e) => {
            tracing::debug!(error = %e, "renewing locks failed; tried again at the next renewal");
        }
    }
}

/// What follows a refused renewal of records the worker holds.
#[derive(Debug, PartialEq)]
enum AfterRefusal {
    /// Refused alone: its lock ran out and another member has it.
    Lost(Held),
    /// Several, renewed all or none: one lost lock may hide among good
    /// ones, so each half is renewed again in a request of its own. One
    /// lost lock among n costs about two renewals per halving (2 log2 n);
    /// both halves refused means their locks ran out together, and they
    /// are all lost ([`Input::LocksLost`]), which keeps locks that ran out
    /// together (one fetch's records share a deadline) from costing a
    /// renewal per record, as renewing each alone did before.
    Halves(Vec<Held>, Vec<Held>),
    /// None held any more.
    Nothing,
}

/// Whether the halves of a refused renewal, renewed again apart, lost
/// their locks together: every one of several refused.
fn lost_together(refused_again: &[bool]) -> bool {
    refused_again.len() > 1 && refused_again.iter().all(|r| *r)
}

fn after_refused_renewal(mut held: Vec<Held>) -> AfterRefusal {
    match held.len() {
        0 => AfterRefusal::Nothing,
        1 => AfterRefusal::Lost(held[0]),
        n => {
            let second = held.split_off(n / 2);
            AfterRefusal::Halves(held, second)
        }
    }
}

/// The fetcher task: serves the poll thread's commands on the consumer.
async fn fetcher(
    mut consumer: ShareConsumer,
    topic: String,
    mut commands: async_mpsc::UnboundedReceiver<Command>,
    out: Sender<Input>,
) {
    // When the oldest accept not yet sent must go: set once, not pushed back
    // by every command that comes in meanwhile.
    let mut flush_at: Option<tokio::time::Instant> = None;
    let due = |consumer: &ShareConsumer| {
        consumer
            .has_unsent()
            .then(|| tokio::time::Instant::now() + ACCEPT_FLUSH)
    };
    let failure_log = LogThrottle::default();
    let refused = |consumer: &mut ShareConsumer, out: &Sender<Input>| {
        let refused: Vec<AckOutcome> = consumer
            .take_outcomes()
            .into_iter()
            .filter(|o| o.error.is_some())
            .collect();
        if !refused.is_empty() {
            let _ = out.send(Input::Refused(refused));
        }
    };
    loop {
        let command = match flush_at {
            Some(at) => match tokio::time::timeout_at(at, commands.recv()).await {
                Ok(c) => c,
                Err(_) => {
                    if let Err(ShareError::Unsent { .. }) = consumer.flush().await {
                        let _ = out.send(Input::NeedSession);
                    }
                    flush_at = due(&consumer);
                    refused(&mut consumer, &out);
                    continue;
                }
            },
            None => commands.recv().await,
        };
        match command {
            Some(Command::Accept(records)) => {
                for r in records {
                    if let Err(e) = consumer.acknowledge_at(
                        &topic,
                        r.partition,
                        r.offset,
                        r.delivery_count,
                        AckType::Accept,
                    ) {
                        // Its lock ran out and the record went to another
                        // member (or came back to this one, newer).
                        tracing::debug!(partition = r.partition, offset = r.offset, error = %e, "accept not taken: the record is no longer held");
                    }
                }
                if flush_at.is_none() {
                    flush_at = due(&consumer);
                }
            }
            Some(Command::Renew(records)) => {
                renew(&mut consumer, &topic, &records, &out).await;
                refused(&mut consumer, &out);
            }
            Some(Command::RenewApart(groups)) => {
                // The halves of one refused renewal: if every one is
                // refused again, their locks ran out together; else the
                // refused ones are halved again (see after_refused_renewal).
                let mut outcomes = Vec::new();
                let mut lost = Vec::with_capacity(groups.len());
                for group in &groups {
                    renew(&mut consumer, &topic, group, &out).await;
                    let refused: Vec<AckOutcome> = consumer
                        .take_outcomes()
                        .into_iter()
                        .filter(|o| o.error.is_some())
                        .collect();
                    lost.push(refused.iter().any(AckOutcome::lock_lost));
                    outcomes.extend(refused);
                }
                if lost_together(&lost) {
                    let _ = out.send(Input::LocksLost(groups.concat()));
                    outcomes.retain(|o| !o.lock_lost());
                }
                if !outcomes.is_empty() {
                    let _ = out.send(Input::Refused(outcomes));
                }
            }
            Some(Command::Fetch { wait, records }) => {
                let records = i32::try_from(records).unwrap_or(i32::MAX);
                let fetched = consumer.poll_for(wait, records).await;
                // What the fetch could not carry (a session being opened
                // again) waits for the next flush.
                flush_at = due(&consumer);
                refused(&mut consumer, &out);
                match fetched {
                    Ok(f) => {
                        let _ = out.send(Input::Fetched(f));
                    }
                    Err(e) if e.is_retriable() => {
                        if let Some(suppressed) = failure_log.allow(Instant::now()) {
                            tracing::warn!(error = %e, suppressed, "share fetch failed; trying again");
                        }
                        tokio::time::sleep(FETCH_RETRY).await;
                        let _ = out.send(Input::Fetched(Fetched::default()));
                    }
                    Err(e) => {
                        let _ = out.send(Input::Failed(e));
                    }
                }
            }
            Some(Command::Close) | None => break,
        }
    }
    match consumer.close().await {
        Ok(outcomes) => {
            let refused: Vec<AckOutcome> =
                outcomes.into_iter().filter(|o| o.error.is_some()).collect();
            if !refused.is_empty() {
                let _ = out.send(Input::Refused(refused));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "leaving the share group failed; the broker releases this member's records when its session times out")
        }
    }
    let _ = out.send(Input::Closed);
}

/// Sends a share group's capacity reports as commit metadata of its
/// companion consumer group
/// ([`microbatch_kafka::capacity_report::share_capacity_group`]), where
/// `supervise` and `scaler` read them. Best effort: a failed commit (an ACL
/// that does not cover the companion group) is logged, now and then, and
/// costs nothing else.
struct CapacityChannel {
    /// Taken by `drop`, which closes it on another thread.
    consumer: Option<Arc<WithTokens<BaseConsumer<CommitLoggingContext>>>>,
    /// A report's commit is under way on its own thread.
    sending: Arc<AtomicBool>,
    topic: String,
    /// The offset after the last record accepted, per partition.
    accepted: std::collections::BTreeMap<i32, i64>,
    /// This worker's partition among those it accepted from.
    pick: usize,
}

impl CapacityChannel {
    fn new(worker: &Worker) -> Option<Self> {
        let cfg = &worker.config;
        let group = share_capacity_group(&cfg.group);
        let consumer = cfg
            .kafka
            .create_client(
                cfg.kafka
                    .client_config()
                    .set("group.id", &group)
                    .set("enable.auto.commit", "false")
                    // Its queue is served a few events per report.
                    .set("statistics.interval.ms", "0"),
                CommitLoggingContext::new(
                    &cfg.kafka,
                    "a capacity report was refused (grant the worker Read on the group \
                     microbatch-capacity.<share group>; the scaler meanwhile learns \
                     capacity from progress)",
                ),
            )
            .map_err(
                |e| tracing::warn!(error = %e, "no capacity reports: creating their client failed"),
            )
            .ok()?;
        let pick = CapacityMeter::process_worker_id()
            .bytes()
            .fold(0usize, |h, b| {
                h.wrapping_mul(31).wrapping_add(usize::from(b))
            });
        Some(Self {
            consumer: Some(Arc::new(consumer)),
            sending: Arc::new(AtomicBool::new(false)),
            topic: cfg.topic.clone(),
            accepted: Default::default(),
            pick,
        })
    }

    fn accepted(&mut self, partition: i32, offsets: &[i64]) {
        if let Some(last) = offsets.iter().max() {
            let next = self.accepted.entry(partition).or_insert(0);
            *next = (*next).max(last + 1);
        }
    }

    /// Commits `report` on one partition this worker accepted from (none
    /// yet: nothing to say), on a thread of its own: a coordinator that does
    /// not answer holds up nothing, and the answer is the commit's result
    /// (an asynchronous commit's answer never reached the context here,
    /// measured on Kafka 4.3.2: refusals went unsaid). While one report is
    /// under way the next is skipped.
    fn send(&self, report: String) {
        let Some(consumer) = &self.consumer else {
            return;
        };
        // Events served at each report, also while one hangs: a refused
        // coordinator lookup (an ACL) is said here, and its report's commit
        // waits for a coordinator without answering.
        let _ = consumer.poll(Duration::ZERO);
        if self.accepted.is_empty() || self.sending.swap(true, AtomicOrdering::AcqRel) {
            return;
        }
        let sending = self.sending.clone();
        let done = move || sending.store(false, AtomicOrdering::Release);
        let (partition, offset) = self
            .accepted
            .iter()
            .nth(self.pick % self.accepted.len())
            .map(|(p, o)| (*p, *o))
            .expect("not empty");
        let mut tpl = TopicPartitionList::new();
        {
            let mut elem = tpl.add_partition(&self.topic, partition);
            if elem.set_offset(Offset::Offset(offset)).is_err() {
                done();
                return;
            }
            elem.set_metadata(report);
        }
        let consumer = consumer.clone();
        let spawned = std::thread::Builder::new()
            .name("capacity-report".into())
            .spawn(move || {
                // Served, so events (errors) do not pile up.
                let _ = consumer.poll(Duration::ZERO);
                if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                    consumer.context().commit_callback(Err(e), &tpl);
                }
                done();
            });
        if spawned.is_err() {
            self.sending.store(false, AtomicOrdering::Release);
        }
    }
}

impl Drop for CapacityChannel {
    /// Closing the client may wait for commits still queued: elsewhere, so
    /// the worker's exit does not.
    fn drop(&mut self) {
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        let handover = Arc::new(std::sync::Mutex::new(Some(consumer)));
        let theirs = handover.clone();
        let spawned = std::thread::Builder::new()
            .name("capacity-close".into())
            .spawn(move || drop(theirs.lock().map(|mut c| c.take())));
        if spawned.is_err() {
            // No thread: leak it rather than wait here.
            if let Ok(mut c) = handover.lock() {
                std::mem::forget(c.take());
            }
        }
    }
}

/// The poll thread's state.
struct Member {
    pipeline: Pipeline,
    worker: Worker,
    runtime: Handle,
    inputs_tx: Sender<Input>,
    commands: async_mpsc::UnboundedSender<Command>,
    dlq: Option<DeadLetterWriter>,
    audit: Option<std::io::BufWriter<std::fs::File>>,
    /// The records the pipeline holds, with their locks.
    locks: Locks,
    fetching: bool,
    round: usize,
    failed: Option<ShareError>,
    fetcher_died: Option<String>,
    /// A fetch is due whatever the room: only it opens a share session
    /// again, which verdicts and renewals wait for.
    need_session: bool,
    /// Fetches in a row that brought nothing.
    empty_fetches: u32,
    closed: bool,
    refused_log: LogThrottle,
    cannot_renew_log: LogThrottle,
    stats: StatsExporter,
    capacity: Option<CapacityChannel>,
}

impl Member {
    fn on_input(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Task(Event::Handled {
                slot,
                batch,
                outcome,
                elapsed,
            }) => {
                self.worker
                    .telemetry
                    .metrics
                    .batch_duration
                    .observe(elapsed.as_secs_f64());
                self.pipeline.handle_verdict(slot, batch, outcome, now);
            }
            Input::Task(Event::DeadLettered {
                slot,
                written,
                error,
            }) => self
                .pipeline
                .handle_dead_lettered(slot, &written, error, now),
            Input::Task(Event::EarlierDeadLetters {
                partition,
                epoch,
                found,
            }) => self
                .pipeline
                .handle_earlier_dead_letters(partition, epoch, &found),
            Input::Fetched(fetched) => {
                self.fetching = false;
                self.empty_fetches = if fetched.records.is_empty() {
                    self.empty_fetches.saturating_add(1)
                } else {
                    0
                };
                for error in &fetched.undecodable {
                    tracing::warn!(error = %error, "records that cannot be decoded: released to the group, or dead-lettered once delivered more than --max-attempts times");
                }
                let max_attempts = self.worker.config.retry.max_attempts;
                let consuming = self.pipeline.phase() == Phase::Consuming;
                for record in &fetched.records {
                    let (partition, offset) = (record.partition, record.offset);
                    let deliveries = u32::try_from(record.delivery_count).unwrap_or(0);
                    let held_already = self.locks.holds(partition, offset);
                    if !held_already && !consuming && deliveries <= max_attempts {
                        // Draining: left to the broker when the session
                        // closes, neither handled nor renewed.
                        continue;
                    }
                    self.locks.acquired(
                        partition,
                        offset,
                        record.delivery_count,
                        now,
                        fetched.lock_deadline,
                    );
                    if held_already {
                        // Still in the pipeline (a renewal came too late):
                        // that copy's verdict answers for this delivery;
                        // handling it again here would be our own duplicate.
                        continue;
                    }
                    if deliveries > max_attempts {
                        let why = record
                            .undecodable
                            .as_ref()
                            .map(|reason| format!("its record batch cannot be decoded: {reason}"));
                        self.pipeline.handle_delivered_too_often(
                            &Record(record),
                            deliveries,
                            why.as_deref(),
                            now,
                        );
                    } else {
                        self.pipeline.handle_record(&Record(record), now);
                    }
                }
            }
            Input::Refused(outcomes) => {
                let mut apart = Vec::new();
                // Only a lost lock is looked for; a renewal refused for
                // another reason (a leader that moved, an error for the
                // whole partition) is left to the next regular renewal.
                for o in outcomes
                    .iter()
                    .filter(|o| o.batch.ack == AckType::Renew && o.lock_lost())
                {
                    let held =
                        self.locks
                            .held_in(o.partition, o.batch.first_offset, o.batch.last_offset);
                    match after_refused_renewal(held) {
                        AfterRefusal::Lost(one) => self.locks.lost(one.partition, one.offset),
                        AfterRefusal::Halves(a, b) => apart.extend([a, b]),
                        AfterRefusal::Nothing => {}
                    }
                }
                if !apart.is_empty() {
                    let _ = self.commands.send(Command::RenewApart(apart));
                }
                let records: i64 = outcomes
                    .iter()
                    .map(|o| o.batch.last_offset - o.batch.first_offset + 1)
                    .sum();
                if let Some(suppressed) = self.refused_log.allow(now) {
                    let first = outcomes.first().and_then(|o| o.error);
                    let what = if outcomes.iter().all(|o| o.batch.ack == AckType::Renew) {
                        "renewals"
                    } else {
                        "accepts"
                    };
                    tracing::warn!(records, error = ?first, suppressed, "the broker refused {what} (locks ran out, or the session was lost): those records are delivered again");
                }
            }
            Input::LocksLost(records) => {
                if let Some(suppressed) = self.refused_log.allow(now) {
                    tracing::warn!(records = records.len(), suppressed, "locks ran out together (renewals came too late): those records are delivered again, to this member or another");
                }
                for r in records {
                    self.locks.lost(r.partition, r.offset);
                }
            }
            Input::CannotRenew(why) => {
                if let Some(suppressed) = self.cannot_renew_log.allow(now) {
                    tracing::warn!(reason = %why, suppressed, "a broker cannot renew locks: a record held longer than share.record.lock.duration.ms goes to another member and is handled twice");
                }
                self.locks.cannot_renew(now);
            }
            Input::NeedSession => self.need_session = true,
            Input::Failed(e) => {
                tracing::error!(error = %e, "the share consumer failed; stopping");
                self.fetching = false;
                self.failed.get_or_insert(e);
            }
            Input::Closed => self.closed = true,
            Input::FetcherDied(why) => {
                tracing::error!(error = %why, "the share consumer's task died; stopping");
                self.fetching = false;
                self.closed = true;
                self.fetcher_died.get_or_insert(why);
            }
        }
    }

    /// Carries out the pipeline's intents.
    fn carry_out(&mut self) {
        while let Some(intent) = self.pipeline.poll_intent() {
            match intent {
                Intent::Start { slot, batch } => {
                    self.worker
                        .telemetry
                        .metrics
                        .batch_size
                        .observe(batch.len() as f64);
                    spawn_batch(
                        &self.runtime,
                        self.worker.handler.clone(),
                        self.worker.config.handler_timeout,
                        self.inputs_tx.clone(),
                        slot,
                        batch,
                    );
                }
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
                        self.inputs_tx.clone(),
                        slot,
                        batch,
                        failures,
                        attempts,
                    );
                }
                Intent::Accept { partition, offsets } => {
                    if let Some(c) = self.capacity.as_mut() {
                        c.accepted(partition, &offsets);
                    }
                    // What these free may be handed out at once.
                    self.empty_fetches = 0;
                    let records: Vec<Held> = offsets
                        .iter()
                        .filter_map(|&offset| {
                            let delivery_count = self.locks.done(partition, offset)?;
                            Some(Held {
                                partition,
                                offset,
                                delivery_count,
                            })
                        })
                        .collect();
                    if !records.is_empty() {
                        let _ = self.commands.send(Command::Accept(records));
                    }
                }
                Intent::Processed { partition, offsets } => {
                    if let Some(out) = self.audit.as_mut() {
                        write_audit(out, partition, &offsets);
                    }
                }
                Intent::ReportCapacity(report) => {
                    if let Some(c) = &self.capacity {
                        c.send(report);
                    }
                }
                // Nothing to commit, pause or read: the broker hands out
                // records, and the fetcher asks only while there is room.
                Intent::Commit { .. }
                | Intent::Pause(_)
                | Intent::Resume(_)
                | Intent::ReadPositions(_) => {}
                // A share group's records come back by delivery count, not
                // from a committed offset: nothing to look for.
                Intent::FindDeadLetters { partition, epoch } => self
                    .pipeline
                    .handle_earlier_dead_letters(partition, epoch, &[]),
            }
        }
        self.stats.export(
            &self.pipeline.stats(),
            &self.worker.config.topic,
            &self.worker.telemetry,
        );
    }

    fn renew_due(&mut self, now: Instant) {
        let due = self.locks.due(now);
        if !due.is_empty() {
            let _ = self.commands.send(Command::Renew(due));
        }
    }

    /// How long a fetch may wait at the broker. Long when the worker holds
    /// nothing (the broker answers as soon as records come). Short while it
    /// holds records: their accepts can only ride on the next request, and
    /// a partition at its limit of records in flight hands out nothing
    /// until they do (a long wait there stalled a drain for 500 ms a
    /// time); doubled after each empty answer, so that a slow handler does
    /// not make the worker poll fast for nothing.
    fn fetch_wait(&self) -> Duration {
        let long = IDLE_FETCH_WAIT;
        if self.pipeline.held() == 0 {
            return long;
        }
        BUSY_FETCH_WAIT
            .saturating_mul(1 << self.empty_fetches.min(8))
            .min(long)
    }

    /// Fetches the next round while the last one runs, once less than a
    /// round waits for a slot, so that the handlers need not wait for the
    /// broker (measured 0.70x Java's share consumer without, about 0.9x
    /// with), never holding three rounds. Not while the worker holds a
    /// record delivered before (a suspect: its last holder may have died of
    /// it): records delivered alongside one that kills its worker share its
    /// delivery count, and fetching ahead would double them. Then it
    /// fetches only while it holds less than a round. Fetches of more than
    /// a round were tried (docs/share-groups.md, "Taking") and given up for
    /// that reason. While draining, or without room (only to open a share
    /// session again), it asks for one record.
    fn fetch_if_room(&mut self) {
        let held = self.pipeline.held();
        let consuming = self.pipeline.phase() == Phase::Consuming;
        let ahead = if self.locks.holds_redelivered() {
            held < self.round
        } else {
            self.pipeline.waiting() < self.round && held < 2 * self.round
        };
        let room = consuming && ahead && !self.pipeline.is_full();
        // A fetch without room (draining, or full) only opens a share
        // session again: one record, not past any cap (a redelivered
        // record's neighbours, the bytes cap); what it acquires while
        // draining is left to the broker.
        let records = if room { self.round } else { 1 };
        if !self.fetching
            && self.failed.is_none()
            && self.fetcher_died.is_none()
            && !self.closed
            && (room || self.need_session)
        {
            let wait = self.fetch_wait();
            self.fetching = self.commands.send(Command::Fetch { wait, records }).is_ok();
            self.need_session &= !self.fetching;
        }
    }
}

/// A fetcher that panics would leave the poll thread waiting for a fetch
/// forever, and still ready: its death reaches the thread as
/// [`Input::FetcherDied`], which stops the worker.
fn report_death(runtime: &Handle, task: tokio::task::JoinHandle<()>, to: Sender<Input>) {
    runtime.spawn(async move {
        if let Err(e) = task.await {
            let _ = to.send(Input::FetcherDied(e.to_string()));
        }
    });
}

/// Runs a share group's member until `stop`; see the module docs.
pub(super) fn poll_loop(
    worker: Worker,
    consumer: ShareConsumer,
    dlq: Option<DeadLetterWriter>,
    runtime: Handle,
    stop: Arc<AtomicBool>,
) -> Result<WorkerReport, WorkerError> {
    let cfg = worker.config.clone();
    let audit = cfg.audit_log.as_deref().map(open_audit).transpose()?;
    let (inputs_tx, inputs_rx): (Sender<Input>, Receiver<Input>) = mpsc::channel();
    let (commands, commands_rx) = async_mpsc::unbounded_channel();
    let fetcher_task = runtime.spawn(fetcher(
        consumer,
        cfg.topic.clone(),
        commands_rx,
        inputs_tx.clone(),
    ));
    report_death(&runtime, fetcher_task, inputs_tx.clone());
    let options = Options {
        dead_letters: dlq.is_some(),
        audit: audit.is_some(),
        keep_headers: worker.handler.reads_headers()
            || dlq.is_some()
            || matches!(cfg.health_scope, HealthScope::Header(_)),
        seed: wall_ms() as u64 ^ u64::from(std::process::id()),
        acknowledgement: Acknowledgement::PerRecord,
        scope_successes: !worker.handler.skips_records(),
    };
    let pipeline = Pipeline::new(
        cfg.pipeline(),
        options,
        CapacityMeter::process_worker_id(),
        Instant::now(),
        wall_ms(),
    );
    let round = round_of_slots(&worker).max(1);
    let capacity = CapacityChannel::new(&worker);
    worker.telemetry.readiness.set_brokers_up(true);
    worker.telemetry.readiness.set_joined(true);
    tracing::info!(topic = %cfg.topic, share_group = %cfg.group, concurrency = cfg.concurrency, max_attempts = cfg.retry.max_attempts, "worker started (share group)");
    let mut member = Member {
        pipeline,
        worker,
        runtime,
        inputs_tx,
        commands,
        dlq,
        audit,
        locks: Locks::default(),
        fetching: false,
        round,
        failed: None,
        fetcher_died: None,
        need_session: false,
        empty_fetches: 0,
        closed: false,
        refused_log: LogThrottle::default(),
        cannot_renew_log: LogThrottle::default(),
        stats: StatsExporter::default(),
        capacity,
    };
    turn_until(
        &mut member,
        |m, now| {
            while let Ok(input) = inputs_rx.try_recv() {
                m.on_input(input);
            }
            let p = &mut m.pipeline;
            if p.phase() == Phase::Consuming
                && (stop.load(AtomicOrdering::SeqCst)
                    || p.fatal().is_some()
                    || m.failed.is_some()
                    || m.fetcher_died.is_some()
                    || m.worker.handler.misconfigured().is_some())
            {
                p.shutdown(now);
            }
            p.handle_tick(now);
            m.carry_out();
            if m.pipeline.drained(now) {
                return Next::Done;
            }
            m.renew_due(now);
            m.fetch_if_room();
            let cap = if m.pipeline.in_flight() > 0 {
                Duration::from_millis(5)
            } else {
                Duration::from_millis(100)
            };
            Next::TurnBy(m.pipeline.poll_timeout().min(now + cap))
        },
        |m, left| {
            if let Ok(input) = inputs_rx.recv_timeout(left) {
                m.on_input(input);
            }
        },
    );
    member.pipeline.close();
    member.carry_out();
    let _ = member.commands.send(Command::Close);
    // The fetcher sends the last accepts, closes its share sessions (the
    // broker releases what is still held) and leaves the group.
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    while !member.closed {
        let left = deadline.saturating_duration_since(Instant::now());
        match inputs_rx.recv_timeout(left) {
            Ok(Input::Task(_)) => {} // a batch abandoned at the drain deadline
            Ok(input) => member.on_input(input),
            Err(_) => {
                tracing::warn!(
                    timeout_ms = CLOSE_TIMEOUT.as_millis() as u64,
                    "the share consumer did not close in time; leaving without it"
                );
                break;
            }
        }
    }
    let report = member.pipeline.report().clone();
    tracing::info!(
        processed = report.records_processed,
        dead_lettered = report.records_dead_lettered,
        "worker stopped"
    );
    if let Some(u) = member.pipeline.fatal() {
        return Err(WorkerError::Undeliverable {
            partition: u.partition,
            offset: u.offset,
            error: u.error.clone(),
        });
    }
    if let Some(e) = member.worker.handler.misconfigured() {
        return Err(WorkerError::HandlerMisconfigured(e));
    }
    if let Some(e) = member.failed {
        return Err(WorkerError::Share(e.to_string()));
    }
    if let Some(why) = member.fetcher_died {
        return Err(WorkerError::Share(format!(
            "the share consumer's task died: {why}"
        )));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A task that panics is reported dead with its panic's message; one
    /// that ends is not.
    #[test]
    fn a_fetcher_that_panics_is_reported_dead() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let panics = runtime.spawn(async { panic!("decoding went wrong") });
        report_death(runtime.handle(), panics, tx.clone());
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Input::FetcherDied(why)) => assert!(why.contains("panicked"), "{why}"),
            Ok(_) => panic!("another input"),
            Err(e) => panic!("no input: {e}"),
        }
        report_death(runtime.handle(), runtime.spawn(async {}), tx);
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    }

    /// A limit below the floor, not listed or not a number is too low; the
    /// floor or above, set for the group or the brokers' default, is not.
    #[test]
    fn a_delivery_limit_below_the_floor_is_too_low() {
        let applied = |limit: Option<&str>| {
            let mut configs = vec![GroupConfig {
                name: "share.auto.offset.reset".into(),
                value: Some("latest".into()),
                set_for_group: false,
            }];
            if let Some(limit) = limit {
                configs.push(GroupConfig {
                    name: "share.delivery.count.limit".into(),
                    value: Some(limit.into()),
                    set_for_group: true,
                });
            }
            configs
        };
        assert_eq!(delivery_limit_too_low(&applied(Some("10")), 7), None);
        assert_eq!(delivery_limit_too_low(&applied(Some("7")), 7), None);
        assert_eq!(delivery_limit_too_low(&applied(Some("20")), 7), None);
        assert_eq!(
            delivery_limit_too_low(&applied(Some("6")), 7),
            Some("6".into())
        );
        assert_eq!(
            delivery_limit_too_low(&applied(Some("ten")), 7),
            Some("ten".into())
        );
        assert_eq!(
            delivery_limit_too_low(&applied(None), 7),
            Some("(not listed)".into())
        );
    }

    /// A refused renewal of one record marks it lost; of several, renews
    /// each half apart, so one lost lock among 4,096 is found in 24
    /// renewals, not 4,096, and locks that ran out together in 2.
    #[test]
    fn a_refused_renewal_is_halved_until_the_lost_lock_is_found() {
        let held = |offsets: std::ops::Range<i64>| -> Vec<Held> {
            offsets
                .map(|offset| Held {
                    partition: 0,
                    offset,
                    delivery_count: 1,
                })
                .collect()
        };
        assert_eq!(after_refused_renewal(Vec::new()), AfterRefusal::Nothing);
        assert_eq!(
            after_refused_renewal(held(7..8)),
            AfterRefusal::Lost(held(7..8)[0])
        );
        assert_eq!(
            after_refused_renewal(held(0..5)),
            AfterRefusal::Halves(held(0..2), held(2..5))
        );
        // Renewals of 4,096 held records, `lost` among them, as the
        // fetcher does them: (requests, records found lost).
        let renew_all = |lost: &dyn Fn(i64) -> bool| {
            let mut requests = 0;
            let mut found = Vec::new();
            let mut refused = vec![held(0..4096)];
            while let Some(group) = refused.pop() {
                match after_refused_renewal(group) {
                    AfterRefusal::Lost(one) => found.push(one.offset),
                    AfterRefusal::Halves(a, b) => {
                        requests += 2;
                        let again: Vec<bool> = [&a, &b]
                            .iter()
                            .map(|half| half.iter().any(|h| lost(h.offset)))
                            .collect();
                        if lost_together(&again) {
                            found.extend(a.iter().chain(&b).map(|h| h.offset));
                            continue;
                        }
                        for (half, refused_again) in [a, b].into_iter().zip(again) {
                            if refused_again {
                                refused.push(half);
                            }
                        }
                    }
                    AfterRefusal::Nothing => {}
                }
            }
            found.sort_unstable();
            (requests, found)
        };
        // One lost lock (offset 1234): every group holding it is refused.
        assert_eq!(renew_all(&|o| o == 1234), (24, vec![1234]));
        // Every lock ran out together (one fetch's deadline): two requests.
        assert_eq!(renew_all(&|_| true), (2, (0..4096).collect()));
        // The older fetch's half ran out: found in four.
        assert_eq!(renew_all(&|o| o < 2048), (4, (0..2048).collect()));
    }

    /// Each held record is renewed at a third of the lock, again every
    /// third after, until it is done; a record acquired before the lock's
    /// duration was known is renewed once it is; a record lost to another
    /// member is not renewed again; nothing is renewed for a while after a
    /// broker said it cannot.
    #[test]
    fn held_records_are_renewed_every_third_of_a_lock_until_done() {
        let t0 = Instant::now();
        let mut locks = Locks::default();
        locks.acquired(0, 5, 1, t0, None);
        assert!(locks.due(t0 + ms(60_000)).is_empty(), "lock unknown");
        assert!(!locks.holds(0, 6));
        locks.acquired(0, 6, 1, t0, Some(t0 + ms(900)));
        assert!(locks.holds(0, 6));
        assert!(!locks.holds_redelivered());
        locks.acquired(0, 6, 2, t0, Some(t0 + ms(900)));
        assert!(locks.holds_redelivered(), "0/6 delivered a second time");
        locks.acquired(1, 7, 1, t0 + ms(300), Some(t0 + ms(1_200)));
        let due: Vec<_> = locks
            .due(t0 + ms(300))
            .iter()
            .map(|h| (h.partition, h.offset, h.delivery_count))
            .collect();
        assert_eq!(
            due,
            [(0, 5, 1), (0, 6, 2)],
            "the lock now known; a third into 0/6's lock, the newest delivery"
        );
        assert!(locks.due(t0 + ms(599)).is_empty(), "renewed: not due");
        let due: Vec<_> = locks.due(t0 + ms(600)).iter().map(|h| h.offset).collect();
        assert_eq!(due, [5, 6, 7], "a third later; 1/7 a third into its own");
        assert_eq!(locks.done(0, 6), Some(2));
        assert_eq!(locks.done(0, 6), None);
        assert!(!locks.holds_redelivered(), "done");
        locks.lost(1, 7);
        assert_eq!(
            locks
                .held_in(0, 0, 10)
                .iter()
                .map(|h| h.offset)
                .collect::<Vec<_>>(),
            [5]
        );
        assert!(locks.held_in(1, 0, 10).is_empty(), "lost: not held");
        let due: Vec<_> = locks.due(t0 + ms(900)).iter().map(|h| h.offset).collect();
        assert_eq!(due, [5], "done and lost records are never renewed");
        locks.cannot_renew(t0 + ms(900));
        assert!(locks.due(t0 + ms(30_000)).is_empty());
        assert_eq!(locks.due(t0 + ms(61_000)).len(), 1, "asked again later");
    }
}
