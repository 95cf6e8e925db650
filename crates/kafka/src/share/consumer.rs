//! [`ShareConsumer`]: fetches the records the broker hands this member,
//! carries the caller's verdicts back (piggy-backed on the next fetch, or on
//! their own with [`ShareConsumer::flush`]), and leaves cleanly.
//!
//! Share sessions: each partition leader keeps one session per member. The
//! first request opens it (epoch 0, which may not carry acknowledgements);
//! each later one carries the next epoch, the partitions wanted, and the
//! partitions no longer wanted; the last (epoch -1) closes it, releasing
//! whatever this member still holds there.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use kafka_protocol::messages::share_acknowledge_request::{
    AcknowledgePartition, AcknowledgeTopic, AcknowledgementBatch as AckBatchAck,
};
use kafka_protocol::messages::share_fetch_request::{
    AcknowledgementBatch as FetchAckBatch, FetchPartition, FetchTopic, ForgottenTopic,
};
use kafka_protocol::messages::{
    GroupId, ShareAcknowledgeRequest, ShareAcknowledgeResponse, ShareFetchRequest,
    ShareFetchResponse,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use uuid::Uuid;

use super::ack_v2;
use super::acks::{AckBatch, AckError, AckType, PartitionAcks};
use super::cluster::{Cluster, Connector, Lane, TopicMeta};
use super::fetch_v2::{self, AcquireMode};
use super::membership::{MemberState, Membership};
use super::records::{self, Acquired, ShareRecord};
use super::ShareError;

/// How the consumer reaches the brokers and how much it asks for.
#[derive(Clone)]
pub struct ShareConsumerConfig {
    pub bootstrap: Vec<String>,
    pub group: String,
    pub topics: Vec<String>,
    pub client_id: String,
    pub connector: Arc<dyn Connector>,
    /// How long a fetch waits at the broker for records.
    pub max_wait: Duration,
    /// The most records one fetch acquires (per leader): a strict limit in
    /// [`AcquireMode::RecordLimit`], a hint in batch-optimized mode.
    pub max_records: i32,
    /// How fetches acquire records; brokers older than 4.2 (ShareFetch v1)
    /// always acquire whole batches.
    pub acquire_mode: AcquireMode,
    pub max_bytes: i32,
    pub request_timeout: Duration,
    /// Records whose batch cannot be decoded are released (delivered again,
    /// their delivery count growing) until their delivery count passes
    /// this; then they are handed out without key or value
    /// ([`ShareRecord::undecodable`]) for the caller to dead-letter and
    /// accept, so that the broker does not archive them at its delivery
    /// limit unseen. `None`: always released.
    pub hand_undecodable_after: Option<i16>,
}

impl ShareConsumerConfig {
    /// A cluster client with this config's brokers, security and timeout.
    pub fn cluster(&self) -> Cluster {
        Cluster::new(
            self.connector.clone(),
            self.bootstrap.clone(),
            self.client_id.clone(),
            self.request_timeout,
        )
    }

    /// The brokers and security of `kafka` (its TLS and SASL settings; MSK
    /// IAM with the refresher it carries), with this client's defaults.
    pub fn from_kafka(
        kafka: &crate::KafkaConfig,
        group: impl Into<String>,
        topics: Vec<String>,
    ) -> Result<Self, ShareError> {
        let mut cfg = Self::new(kafka.bootstrap_list(), group, topics);
        cfg.connector = super::security::connector(kafka)?;
        Ok(cfg)
    }

    pub fn new(bootstrap: Vec<String>, group: impl Into<String>, topics: Vec<String>) -> Self {
        Self {
            bootstrap,
            group: group.into(),
            topics,
            client_id: "microbatch".into(),
            connector: Arc::new(super::cluster::PlainTcp),
            max_wait: Duration::from_millis(500),
            max_records: 500,
            acquire_mode: AcquireMode::default(),
            max_bytes: 50 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            hand_undecodable_after: None,
        }
    }
}

/// What one [`ShareConsumer::poll`] brought.
#[derive(Debug, Default)]
pub struct Fetched {
    pub records: Vec<ShareRecord>,
    /// Partitions whose bytes could not be decoded: their records were
    /// released (the broker archives them after its delivery limit).
    pub undecodable: Vec<String>,
    /// A leader said it no longer leads a partition asked for.
    pub leaders_moved: bool,
    /// When the locks on these records run out, as the broker said
    /// (`acquisition_lock_timeout_ms` from the moment the fetch was sent).
    pub lock_deadline: Option<Instant>,
}

/// How the broker took a batch of verdicts.
///
/// - No error: the broker refused nothing. That includes a late verdict on
///   records another member has already finished (nothing is left to change).
/// - An error: as far as this member can tell the verdicts did not count, and
///   the records return to the group (their locks ran out, or the session was
///   lost) to be delivered again. One exception: verdicts sent again after a
///   request timed out may already have been applied the first time, and the
///   second answer is then `INVALID_RECORD_STATE`. Either way no record is
///   lost; at worst it is handled twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckOutcome {
    pub topic: Arc<str>,
    pub partition: i32,
    pub batch: AckBatch,
    pub error: Option<ResponseError>,
}

impl AckOutcome {
    /// Refused because the record's lock is gone (INVALID_RECORD_STATE: it
    /// ran out, and the record may be another member's now), not for a
    /// reason of the partition or the request.
    pub fn lock_lost(&self) -> bool {
        self.error == Some(ResponseError::InvalidRecordState)
    }
}

/// Whether verdicts for records acquired from node `from` can no longer be
/// sent: its session is lost and another broker leads the partition now.
/// A partition without a leader waits (its broker may come back, and its
/// new session then answers them).
fn stranded(from: i32, session_open: bool, leader: i32) -> bool {
    !session_open && leader >= 0 && leader != from
}

/// Whether the verdicts of a request answered with `error` for the whole
/// request are answered as refused rather than sent again, and the member
/// goes on: only for UNKNOWN_SERVER_ERROR on a request that carried
/// verdicts (Kafka 4.3.2's answer when they name records a restarted
/// broker no longer tracks; sent again, they would fail every request
/// after it). The session's errors send them again on a new session; every
/// other error (an ACL's, an invalid or unsupported request, an unknown
/// member) stops the member, as before.
fn refuses_verdicts(error: &ShareError, carried_verdicts: bool) -> bool {
    carried_verdicts
        && matches!(
            error,
            ShareError::Broker {
                error: ResponseError::UnknownServerError,
                ..
            }
        )
}

/// The verdicts a request carried, per partition: restored if it fails.
type SentAcks = Vec<((Uuid, i32), Vec<AckBatch>)>;

/// Whether the fall-back to whole-batch acquisition was logged (once per
/// process: every poll would say it again).
static WHOLE_BATCHES_SAID: AtomicBool = AtomicBool::new(false);

/// What a ShareAcknowledge carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sending {
    Verdicts,
    /// Verdicts, and the session closes.
    Last,
    /// Renewals only (`IsRenewAck`).
    Renewals,
}

#[derive(Default)]
struct Session {
    /// The epoch the next request carries: 0 opens a session.
    epoch: i32,
    /// Partitions the session holds, to name the forgotten ones.
    partitions: BTreeSet<(Uuid, i32)>,
}

impl Session {
    fn advance(&mut self) {
        self.epoch = if self.epoch == i32::MAX {
            1
        } else {
            self.epoch + 1
        };
    }
}

pub struct ShareConsumer {
    cfg: ShareConsumerConfig,
    member_id: String,
    cluster: Arc<Cluster>,
    membership: Membership,
    member: tokio::sync::watch::Receiver<MemberState>,
    topics: HashMap<Uuid, TopicMeta>,
    /// Per leader node.
    sessions: HashMap<i32, Session>,
    acks: BTreeMap<(Uuid, i32), PartitionAcks>,
    /// The leader whose share session handed out each partition's records:
    /// verdicts go back there, wherever the leadership has moved since.
    acquired_from: HashMap<(Uuid, i32), i32>,
    outcomes: Vec<AckOutcome>,
    closed: bool,
    /// When metadata was last asked for a partition without a leader.
    leaders_asked: Option<Instant>,
    /// The assigned partitions without a leader last said, as
    /// `topic-partition`.
    offline_said: Vec<String>,
    /// Leaders whose fetches fail on the connection: since when, and when
    /// that was last said.
    unreachable: HashMap<i32, (Instant, Option<Instant>)>,
}

/// A leader's fetches failing on the connection this long is said (a
/// broker cut off from this worker while the controller still sees it
/// keeps its partitions, and the metadata names it again and again).
const UNREACHABLE_SAID_AFTER: Duration = Duration::from_secs(5);
/// ... and said again at most this often while it lasts.
const UNREACHABLE_SAID_EVERY: Duration = Duration::from_secs(60);

/// How often a poll asks for metadata while an assigned partition has no
/// leader (its broker down): a busy member polls many times a second, and
/// a lookup per poll would load the brokers left (librdkafka's
/// `topic.metadata.refresh.fast.interval.ms` is 100 ms too).
const LEADER_LOOKUP_INTERVAL: Duration = Duration::from_millis(100);

impl ShareConsumer {
    /// Joins the share group. Returns once the coordinator has accepted the
    /// member (or membership failed for good); partitions may come later.
    pub async fn join(cfg: ShareConsumerConfig) -> Result<Self, ShareError> {
        if cfg.max_wait >= cfg.request_timeout {
            return Err(ShareError::Config(format!(
                "max_wait ({:?}) must be shorter than request_timeout ({:?}): every idle fetch would time out",
                cfg.max_wait, cfg.request_timeout
            )));
        }
        let member_id = random_member_id();
        let cluster = Arc::new(cfg.cluster());
        // Fail fast on a broker without share groups or an unknown topic.
        let metas = cluster.metadata(&cfg.topics).await?;
        let membership = Membership::start(
            cluster.clone(),
            cfg.group.clone(),
            member_id.clone(),
            cfg.topics.clone(),
        );
        let mut member = membership.state();
        let accepted = tokio::time::timeout(
            cfg.request_timeout,
            member.wait_for(|s| s.epoch > 0 || s.fatal.is_some()),
        )
        .await
        .map_err(|_| ShareError::Timeout {
            api: "ShareGroupHeartbeat",
            broker: format!("the coordinator of {}", cfg.group),
            after: cfg.request_timeout,
        })?
        .map_err(|_| ShareError::Closed)?
        .clone();
        if let Some(e) = accepted.fatal {
            return Err(e);
        }
        Ok(Self {
            cfg,
            member_id,
            cluster,
            membership,
            member,
            topics: metas.into_iter().map(|m| (m.id, m)).collect(),
            sessions: HashMap::new(),
            acks: BTreeMap::new(),
            acquired_from: HashMap::new(),
            outcomes: Vec::new(),
            closed: false,
            leaders_asked: None,
            offline_said: Vec::new(),
            unreachable: HashMap::new(),
        })
    }

    /// Sets the share group's configs before (or while) members run, e.g.
    /// `share.auto.offset.reset=earliest`: a new share group starts at the
    /// log end otherwise.
    pub async fn configure_group(
        cfg: &ShareConsumerConfig,
        configs: &[(&str, &str)],
    ) -> Result<(), ShareError> {
        cfg.cluster().set_group_configs(&cfg.group, configs).await
    }

    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// The partitions the broker assigned, by topic name.
    pub fn assignment(&self) -> Vec<(Arc<str>, i32)> {
        let state = self.member.borrow();
        let mut out = Vec::new();
        for (id, parts) in &state.assignment {
            let name = self.topic_name(id);
            out.extend(parts.iter().map(|&p| (name.clone(), p)));
        }
        out
    }

    /// Records held (acquired, no verdict yet).
    pub fn held(&self) -> usize {
        self.acks.values().map(|a| a.held_count()).sum()
    }

    /// Whether verdicts wait to be sent.
    pub fn has_unsent(&self) -> bool {
        self.acks.values().any(|a| a.has_pending())
    }

    /// The verdict on a record this member holds, sent with the next poll
    /// or flush. Naming a record not held is refused.
    pub fn acknowledge(&mut self, record: &ShareRecord, ack: AckType) -> Result<(), AckError> {
        self.acknowledge_at(
            &record.topic,
            record.partition,
            record.offset,
            record.delivery_count,
            ack,
        )
    }

    /// [`Self::acknowledge`], by the record's topic, partition, offset and
    /// delivery count.
    pub fn acknowledge_at(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        delivery_count: i16,
        ack: AckType,
    ) -> Result<(), AckError> {
        let id = self
            .topics
            .values()
            .find(|t| &*t.name == topic)
            .map(|t| t.id)
            .ok_or(AckError::NotHeld { offset })?;
        self.acks
            .get_mut(&(id, partition))
            .ok_or(AckError::NotHeld { offset })?
            .acknowledge(offset, delivery_count, ack)
    }

    /// How the broker took the verdicts sent so far (drained).
    pub fn take_outcomes(&mut self) -> Vec<AckOutcome> {
        std::mem::take(&mut self.outcomes)
    }

    /// One fetch from every leader of an assigned partition, carrying the
    /// verdicts waiting for those partitions. Waits at most `max_wait` at the
    /// brokers (longer if a broker is slow to answer).
    pub async fn poll(&mut self) -> Result<Fetched, ShareError> {
        self.poll_waiting(self.cfg.max_wait).await
    }

    /// [`Self::poll`] waiting at most `max_wait` at the brokers for records:
    /// short while verdicts are about to come (they can only ride on the
    /// next request, and a partition at its limit of records in flight
    /// hands out nothing until they do).
    pub async fn poll_waiting(&mut self, max_wait: Duration) -> Result<Fetched, ShareError> {
        self.poll_for(max_wait, self.cfg.max_records).await
    }

    /// [`Self::poll_waiting`] acquiring about `max_records` in all instead
    /// of the configured `max_records`: a member that finishes records
    /// faster than a fetch's round trip asks for more at a time.
    pub async fn poll_for(
        &mut self,
        max_wait: Duration,
        max_records: i32,
    ) -> Result<Fetched, ShareError> {
        if self.closed {
            return Err(ShareError::Closed);
        }
        // Marked seen, so that waiting for a change below waits for one.
        let state = self.member.borrow_and_update().clone();
        if let Some(e) = state.fatal {
            return Err(e);
        }
        let topic_unknown = state
            .assignment
            .keys()
            .any(|id| !self.topics.contains_key(id));
        let leaders_due = self
            .leaders_asked
            .is_none_or(|at| at.elapsed() >= LEADER_LOOKUP_INTERVAL);
        let looked_up = topic_unknown || (self.needs_leaders(&state) && leaders_due);
        if looked_up {
            self.leaders_asked = Some(Instant::now());
            self.refresh_metadata().await?;
        }
        let mut by_leader: BTreeMap<i32, Vec<(Uuid, i32)>> = BTreeMap::new();
        let mut offline = Vec::new();
        for (id, parts) in &state.assignment {
            for &p in parts {
                let leader = self
                    .topics
                    .get(id)
                    .and_then(|t| t.leaders.get(&p))
                    .copied()
                    .unwrap_or(-1);
                if !self.cluster.knows_leader(leader) {
                    offline.push((*id, p));
                } else {
                    by_leader.entry(leader).or_default().push((*id, p));
                }
            }
        }
        // Said from the brokers' metadata, not from a leader forgotten
        // after a failed fetch (the metadata may still name it).
        if looked_up || offline.is_empty() {
            self.say_offline(&offline);
        }
        self.answer_stranded();
        // Leaders that lost every partition close their session's wanted set.
        for (&node, session) in &self.sessions {
            if !session.partitions.is_empty() && !by_leader.contains_key(&node) {
                by_leader.entry(node).or_default();
            }
        }
        // Verdicts that will not ride a fetch to the session that handed
        // their records out go on their own.
        let riding: BTreeSet<(Uuid, i32)> = by_leader
            .iter()
            .flat_map(|(node, parts)| {
                parts
                    .iter()
                    .filter(|k| self.acquired_from.get(k) == Some(node))
                    .copied()
            })
            .collect();
        for (node, parts) in self.route_pending(|k| !riding.contains(k)) {
            if let Err(e) = self.acknowledge_on(node, &parts, Sending::Verdicts).await {
                tracing::debug!(error = %e, "share acknowledge: verdicts kept for the next poll");
            }
        }
        if by_leader.is_empty() {
            // Nothing assigned yet: wait for the coordinator, not a busy loop.
            let _ = tokio::time::timeout(self.cfg.max_wait, self.member.changed()).await;
            return Ok(Fetched::default());
        }

        let sent_at = Instant::now();
        // max_records is per request: split among the leaders asked, so
        // that one poll acquires about it in all (rounded up per leader).
        let leaders = u32::try_from(by_leader.len()).unwrap_or(u32::MAX).max(1);
        let max_records = u32::try_from(max_records.max(1)).unwrap_or(1);
        let per_leader = i32::try_from(max_records.div_ceil(leaders)).unwrap_or(i32::MAX);
        let mut requests = Vec::new();
        for (node, wanted) in by_leader {
            let (request, sent_acks) = self.fetch_request(node, &wanted, per_leader, max_wait);
            requests.push((node, wanted, request, sent_acks));
        }
        let cluster = self.cluster.clone();
        let mode = self.cfg.acquire_mode;
        let calls = requests
            .into_iter()
            .map(|(node, wanted, request, sent_acks)| {
                let cluster = cluster.clone();
                async move {
                    let result = match cluster.node(node) {
                        Some(addr) => match cluster.conn(&addr, Lane::Fetch).await {
                            Ok(conn) => {
                                if mode == AcquireMode::RecordLimit
                                    && conn.version::<fetch_v2::Request>().is_ok_and(|v| v < 2)
                                    && !WHOLE_BATCHES_SAID.swap(true, AtomicOrdering::Relaxed)
                                {
                                    tracing::warn!(broker = %addr, "this broker has no record-limit share fetch (ShareFetch v2, Kafka 4.2+): fetches acquire whole producer batches, which may hold more records than the worker starts within their lock");
                                }
                                let r = conn
                                    .call(fetch_v2::Request {
                                        fetch: request,
                                        mode,
                                    })
                                    .await
                                    .map(|answer| answer.0);
                                if r.is_err() {
                                    cluster.forget(&conn, Lane::Fetch).await;
                                }
                                r
                            }
                            Err(e) => Err(e),
                        },
                        None => Err(ShareError::NoBroker(format!(
                            "node {node} is not in metadata"
                        ))),
                    };
                    (node, wanted, sent_acks, result)
                }
            });
        let results = futures::future::join_all(calls).await;
        tracing::trace!(
            asked = max_records,
            round_trip_ms = sent_at.elapsed().as_secs_f64() * 1e3,
            "share fetch answered"
        );

        let mut fetched = Fetched::default();
        let mut first_error = None;
        for (node, wanted, sent_acks, result) in results {
            match result {
                Ok(response) => {
                    if let Some((_, Some(_))) = self.unreachable.remove(&node) {
                        tracing::info!(node, "a partition leader answers again");
                    }
                    if let Err(e) =
                        self.absorb_fetch(node, &wanted, sent_acks, response, sent_at, &mut fetched)
                    {
                        first_error.get_or_insert(e);
                    }
                }
                Err(e) => {
                    self.session_lost(node, sent_acks);
                    if e.is_transport() {
                        self.say_unreachable(node, &wanted, &e);
                        // A broker killed or cut off answers nothing, not
                        // NotLeader: look its partitions' leaders up again
                        // (a replica may lead them now, or none).
                        self.forget_leaders(&wanted);
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if fetched.records.is_empty() && !e.is_retriable() => Err(e),
            Some(e) => {
                tracing::debug!(error = %e, "share fetch: a leader failed; retrying next poll");
                if fetched.records.is_empty() {
                    // Do not spin on a broker that is down.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(fetched)
            }
            None => {
                tracing::trace!(records = fetched.records.len(), "share fetch acquired");
                if fetched.records.is_empty() && fetched.leaders_moved {
                    // Metadata may still name the old leader for a moment.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(fetched)
            }
        }
    }

    /// Sends every verdict waiting, without fetching more records. Verdicts
    /// whose share session is being reopened stay for the next poll, and
    /// the answer says how many ([`ShareError::Unsent`]).
    pub async fn flush(&mut self) -> Result<(), ShareError> {
        let mut first_error = None;
        for (node, parts) in self.route_pending(|_| true) {
            if let Err(e) = self.acknowledge_on(node, &parts, Sending::Verdicts).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Sends the renewals waiting ([`AckType::Renew`]) with ShareAcknowledge
    /// v2, apart from verdicts as KIP-1222 wants. Each comes back as an
    /// [`AckOutcome`]: refused means the lock was already lost. A broker
    /// without v2 (before Kafka 4.2) cannot renew: the answer is
    /// [`ShareError::Unsupported`] and the renewals are dropped.
    pub async fn renew(&mut self) -> Result<(), ShareError> {
        let mut routes: BTreeMap<i32, Vec<(Uuid, i32)>> = BTreeMap::new();
        for (key, acks) in &self.acks {
            if acks.has_renewals() {
                let node = self.acquired_from.get(key).copied().unwrap_or(-1);
                routes.entry(node).or_default().push(*key);
            }
        }
        let mut first_error = None;
        for (node, parts) in routes {
            if let Err(e) = self.acknowledge_on(node, &parts, Sending::Renewals).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Sends the verdicts waiting, closes every share session (the broker
    /// releases what this member still holds) and leaves the group.
    /// Verdicts that cannot be sent (their session is gone) come back as
    /// refused outcomes in the answer's error, never silently.
    pub async fn close(mut self) -> Result<Vec<AckOutcome>, ShareError> {
        self.closed = true;
        let mut routes = self.route_pending(|_| true);
        for &node in self.sessions.keys() {
            routes.entry(node).or_default();
        }
        let mut first_error = None;
        for (node, parts) in routes {
            if let Err(e) = self.acknowledge_on(node, &parts, Sending::Last).await {
                first_error.get_or_insert(e);
            }
        }
        // Whatever is still pending had no session to go to.
        let keys: Vec<(Uuid, i32)> = self.acks.keys().copied().collect();
        for key in keys {
            let batches = self
                .acks
                .get_mut(&key)
                .map(|a| a.take_pending())
                .unwrap_or_default();
            let topic = self.topic_name(&key.0);
            self.outcomes
                .extend(batches.into_iter().map(|batch| AckOutcome {
                    topic: topic.clone(),
                    partition: key.1,
                    batch,
                    error: Some(ResponseError::ShareSessionNotFound),
                }));
        }
        self.membership.leave(self.cfg.request_timeout).await;
        let outcomes = std::mem::take(&mut self.outcomes);
        match first_error {
            Some(e) => Err(e),
            None => Ok(outcomes),
        }
    }

    /// Partitions with verdicts waiting that `include` picks, by the leader
    /// whose session handed their records out.
    fn route_pending(
        &self,
        include: impl Fn(&(Uuid, i32)) -> bool,
    ) -> BTreeMap<i32, Vec<(Uuid, i32)>> {
        let mut routes: BTreeMap<i32, Vec<(Uuid, i32)>> = BTreeMap::new();
        for (key, acks) in &self.acks {
            if acks.has_pending() && include(key) {
                let node = self.acquired_from.get(key).copied().unwrap_or(-1);
                routes.entry(node).or_default().push(*key);
            }
        }
        routes
    }

    /// `parts` as `topic-partition`, sorted.
    fn partition_names(&self, parts: &[(Uuid, i32)]) -> Vec<String> {
        let mut names: Vec<String> = parts
            .iter()
            .map(|(id, p)| format!("{}-{p}", self.topic_name(id)))
            .collect();
        names.sort_unstable();
        names
    }

    /// Says, throttled, that `node`'s fetches keep failing on the
    /// connection, and which partitions wait for it.
    fn say_unreachable(&mut self, node: i32, parts: &[(Uuid, i32)], e: &ShareError) {
        let now = Instant::now();
        let (since, said) = *self.unreachable.entry(node).or_insert((now, None));
        let due = said.is_none_or(|at| now.duration_since(at) >= UNREACHABLE_SAID_EVERY);
        if now.duration_since(since) < UNREACHABLE_SAID_AFTER || !due {
            return;
        }
        self.unreachable.insert(node, (since, Some(now)));
        tracing::warn!(
            node,
            error = %e,
            for_s = now.duration_since(since).as_secs(),
            partitions = ?self.partition_names(parts),
            "a partition leader cannot be reached: its partitions' records wait for it \
             (or for a new leader); the others are fetched meanwhile"
        );
    }

    /// Says when assigned partitions lose their leader (their broker down,
    /// or an election: the others are fetched meanwhile, their records
    /// wait) and when every one has a leader again; once per change, not
    /// per poll.
    fn say_offline(&mut self, offline: &[(Uuid, i32)]) {
        let names = self.partition_names(offline);
        if names == self.offline_said {
            return;
        }
        if names.is_empty() {
            tracing::info!("every assigned partition has a leader again");
        } else {
            tracing::warn!(
                partitions = ?names,
                "assigned partitions have no leader known (their broker down or unreachable, or \
                 an election under way): the others are fetched meanwhile, and these partitions' \
                 records wait for a leader"
            );
        }
        self.offline_said = names;
    }

    fn needs_leaders(&self, state: &MemberState) -> bool {
        state.assignment.iter().any(|(id, parts)| {
            self.topics.get(id).is_none_or(|t| {
                parts.iter().any(|p| {
                    t.leaders
                        .get(p)
                        .is_none_or(|&l| !self.cluster.knows_leader(l))
                })
            })
        })
    }

    async fn refresh_metadata(&mut self) -> Result<(), ShareError> {
        let metas = self.cluster.metadata(&self.cfg.topics).await?;
        for m in metas {
            self.topics.insert(m.id, m);
        }
        Ok(())
    }

    /// Builds a leader's fetch request, taking the verdicts it carries
    /// (none on a session's first request: epoch 0 may not carry them).
    fn fetch_request(
        &mut self,
        node: i32,
        wanted: &[(Uuid, i32)],
        max_records: i32,
        max_wait: Duration,
    ) -> (ShareFetchRequest, SentAcks) {
        let session = self.sessions.entry(node).or_default();
        let epoch = session.epoch;
        let wanted_set: BTreeSet<(Uuid, i32)> = wanted.iter().copied().collect();
        let forgotten: BTreeMap<Uuid, Vec<i32>> = if epoch == 0 {
            BTreeMap::new()
        } else {
            session
                .partitions
                .difference(&wanted_set)
                .fold(BTreeMap::new(), |mut m, (id, p)| {
                    m.entry(*id).or_insert_with(Vec::new).push(*p);
                    m
                })
        };
        let mut sent = Vec::new();
        let mut topics: BTreeMap<Uuid, Vec<FetchPartition>> = BTreeMap::new();
        for &(id, p) in wanted {
            let batches = if epoch == 0 || self.acquired_from.get(&(id, p)) != Some(&node) {
                Vec::new()
            } else {
                self.acks
                    .get_mut(&(id, p))
                    .map(|a| a.take_pending())
                    .unwrap_or_default()
            };
            let partition = FetchPartition::default()
                .with_partition_index(p)
                .with_partition_max_bytes(self.cfg.max_bytes)
                .with_acknowledgement_batches(batches.iter().map(to_fetch_batch).collect());
            if !batches.is_empty() {
                sent.push(((id, p), batches));
            }
            topics.entry(id).or_default().push(partition);
        }
        let request = ShareFetchRequest::default()
            .with_group_id(Some(GroupId(StrBytes::from_string(self.cfg.group.clone()))))
            .with_member_id(Some(StrBytes::from_string(self.member_id.clone())))
            .with_share_session_epoch(epoch)
            .with_max_wait_ms(duration_ms(max_wait))
            .with_min_bytes(1)
            .with_max_bytes(self.cfg.max_bytes)
            .with_max_records(max_records)
            .with_batch_size(max_records)
            .with_topics(
                topics
                    .into_iter()
                    .map(|(id, partitions)| {
                        FetchTopic::default()
                            .with_topic_id(id)
                            .with_partitions(partitions)
                    })
                    .collect(),
            )
            .with_forgotten_topics_data(
                forgotten
                    .into_iter()
                    .map(|(id, partitions)| {
                        ForgottenTopic::default()
                            .with_topic_id(id)
                            .with_partitions(partitions)
                    })
                    .collect(),
            );
        (request, sent)
    }

    fn absorb_fetch(
        &mut self,
        node: i32,
        wanted: &[(Uuid, i32)],
        sent_acks: SentAcks,
        response: ShareFetchResponse,
        sent_at: Instant,
        fetched: &mut Fetched,
    ) -> Result<(), ShareError> {
        if response.error_code != 0 {
            let error = ShareError::broker(
                "ShareFetch",
                response.error_code,
                response.error_message.map(|m| m.to_string()),
            );
            return Err(self.request_failed(node, sent_acks, error));
        }
        let session = self.sessions.entry(node).or_default();
        session.advance();
        session.partitions = wanted.iter().copied().collect();
        if response.acquisition_lock_timeout_ms > 0 {
            let deadline =
                sent_at + Duration::from_millis(response.acquisition_lock_timeout_ms as u64);
            fetched.lock_deadline =
                Some(fetched.lock_deadline.map_or(deadline, |d| d.min(deadline)));
        }
        let mut acked: HashMap<(Uuid, i32), Vec<AckBatch>> = sent_acks.into_iter().collect();
        let hand_undecodable_after = self.cfg.hand_undecodable_after;
        // Partitions this leader no longer leads: partition -> the leader it
        // names (-1: unknown, ask metadata).
        let mut moved: Vec<((Uuid, i32), i32)> = Vec::new();
        let mut first_error = None;
        self.cluster.learn_nodes(
            response
                .node_endpoints
                .iter()
                .map(|n| (n.node_id.0, format!("{}:{}", n.host, n.port))),
        );
        for topic in response.responses {
            let id = topic.topic_id;
            let name = self.topic_name(&id);
            for part in topic.partitions {
                let key = (id, part.partition_index);
                if let Some(batches) = acked.remove(&key) {
                    let error = ResponseError::try_from_code(part.acknowledge_error_code);
                    for batch in batches {
                        tracing::trace!(
                            partition = key.1,
                            first = batch.first_offset,
                            last = batch.last_offset,
                            ?error,
                            "verdicts answered (with a fetch)"
                        );
                        self.outcomes.push(AckOutcome {
                            topic: name.clone(),
                            partition: key.1,
                            batch,
                            error,
                        });
                    }
                }
                if let Some(error) = ResponseError::try_from_code(part.error_code) {
                    if matches!(
                        error,
                        ResponseError::NotLeaderOrFollower
                            | ResponseError::UnknownTopicOrPartition
                            | ResponseError::UnknownTopicId
                            | ResponseError::FencedLeaderEpoch
                    ) {
                        moved.push((key, part.current_leader.leader_id));
                    } else {
                        first_error.get_or_insert(ShareError::broker(
                            "ShareFetch",
                            part.error_code,
                            part.error_message.map(|m| format!("{name}-{}: {m}", key.1)),
                        ));
                    }
                    continue;
                }
                if part.acquired_records.is_empty() {
                    continue;
                }
                let acquired: Vec<Acquired> = part
                    .acquired_records
                    .iter()
                    .map(|a| Acquired {
                        first_offset: a.first_offset,
                        last_offset: a.last_offset,
                        delivery_count: a.delivery_count,
                    })
                    .collect();
                self.acquired_from.insert(key, node);
                let ledger = self.acks.entry(key).or_default();
                let decoded = records::decode(&name, key.1, part.records, &acquired);
                // A range not span_ok is never looped over: left to its lock.
                for a in acquired.iter().filter(|a| records::span_ok(a)) {
                    ledger.acquired(
                        a.first_offset,
                        a.last_offset,
                        a.delivery_count,
                        &decoded.gaps,
                    );
                }
                for offset in decoded.missing {
                    // Not delivered in this response: give it back now.
                    ledger.release(offset);
                }
                fetched.records.extend(decoded.records);
                if decoded.errors.is_empty() {
                    continue;
                }
                // Records of batches that cannot be decoded are released,
                // never dropped, while another delivery may decode them;
                // delivered too often, they are handed out bare for the
                // caller to dead-letter rather than left for the broker to
                // archive unseen at its limit. The partition's other
                // batches are read as usual.
                let reason: Arc<str> = decoded
                    .errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
                    .into();
                let mut handed = 0usize;
                for (offset, delivery_count) in decoded.undecodable {
                    if hand_undecodable_after.is_some_and(|after| delivery_count > after) {
                        fetched.records.push(ShareRecord::undecodable(
                            &name,
                            key.1,
                            offset,
                            delivery_count,
                            reason.clone(),
                        ));
                        handed += 1;
                    } else {
                        ledger.release(offset);
                    }
                }
                if handed > 0 {
                    tracing::warn!(error = %reason, handed, "share fetch: records delivered too often whose batch cannot be decoded, handed out without key or value to be dead-lettered");
                } else {
                    tracing::warn!(error = %reason, "share fetch: records whose batch cannot be decoded released");
                }
                fetched.undecodable.push(reason.to_string());
            }
        }
        // Verdicts the response did not mention were not applied.
        self.unanswered(acked);
        for ((id, p), leader) in moved {
            if let Some(t) = self.topics.get_mut(&id) {
                t.leaders.insert(p, leader.max(-1));
            }
            fetched.leaders_moved = true;
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Verdicts a response did not mention were not applied: the records
    /// come back, and the caller learns it.
    fn unanswered(&mut self, acked: HashMap<(Uuid, i32), Vec<AckBatch>>) {
        for ((id, p), batches) in acked {
            let topic = self.topic_name(&id);
            self.outcomes
                .extend(batches.into_iter().map(|batch| AckOutcome {
                    topic: topic.clone(),
                    partition: p,
                    batch,
                    error: Some(ResponseError::UnknownServerError),
                }));
        }
    }

    fn topic_name(&self, id: &Uuid) -> Arc<str> {
        self.topics
            .get(id)
            .map(|t| t.name.clone())
            .unwrap_or_else(|| id.to_string().into())
    }

    /// Verdicts and renewals for records acquired from a leader whose
    /// session is lost and which no longer leads their partition (a replica
    /// took over) can never be sent: the records' locks went with that
    /// session, and the new leader hands them out again. They are answered
    /// as refused, so the caller stops waiting on them (before, they waited
    /// for a session there that never reopened, and the caller asked for
    /// it every 50 ms).
    fn answer_stranded(&mut self) {
        let stranded: Vec<(Uuid, i32)> = self
            .acks
            .iter()
            .filter(|(_, a)| a.has_pending() || a.has_renewals())
            .filter_map(|(key, _)| {
                let from = *self.acquired_from.get(key)?;
                let session_open = self.sessions.get(&from).is_some_and(|s| s.epoch > 0);
                let leader = self
                    .topics
                    .get(&key.0)
                    .and_then(|t| t.leaders.get(&key.1))
                    .copied()
                    .unwrap_or(-1);
                stranded(from, session_open, leader).then_some(*key)
            })
            .collect();
        for key in stranded {
            let topic = self.topic_name(&key.0);
            let Some(acks) = self.acks.get_mut(&key) else {
                continue;
            };
            let verdicts = acks.take_pending().into_iter().map(|batch| AckOutcome {
                topic: topic.clone(),
                partition: key.1,
                batch,
                error: Some(ResponseError::NotLeaderOrFollower),
            });
            // A renewal's lock is gone: lost, as one refused for its state,
            // one record each, so that none is looked for in halves (each
            // half would wait for the same lost session).
            let renewals = acks
                .take_renewals()
                .into_iter()
                .flat_map(|batch| {
                    (batch.first_offset..=batch.last_offset).map(move |offset| AckBatch {
                        first_offset: offset,
                        last_offset: offset,
                        ack: batch.ack,
                    })
                })
                .map(|batch| AckOutcome {
                    topic: topic.clone(),
                    partition: key.1,
                    batch,
                    error: Some(ResponseError::InvalidRecordState),
                });
            let outcomes: Vec<AckOutcome> = verdicts.chain(renewals).collect();
            tracing::debug!(
                partition = key.1,
                batches = outcomes.len(),
                "verdicts for records from a leader that lost them answered as refused"
            );
            self.outcomes.extend(outcomes);
        }
    }

    /// Marks `parts`' leaders unknown, so that the next poll looks them up
    /// (at most every [`LEADER_LOOKUP_INTERVAL`]).
    fn forget_leaders(&mut self, parts: &[(Uuid, i32)]) {
        for (id, p) in parts {
            if let Some(t) = self.topics.get_mut(id) {
                t.leaders.insert(*p, -1);
            }
        }
    }

    /// `node` answered a request carrying `sent` with `error` for the whole
    /// request. UNKNOWN_SERVER_ERROR with verdicts carried (see
    /// [`refuses_verdicts`]): they are answered as refused, never sent again
    /// (they would fail every request after it), their records come back,
    /// and the poll goes on. Any other error loses the session and the
    /// verdicts go again on a new one; the error itself decides whether the
    /// member goes on (the session's) or stops (an ACL's, and the rest).
    fn request_failed(&mut self, node: i32, sent: SentAcks, error: ShareError) -> ShareError {
        if !refuses_verdicts(&error, !sent.is_empty()) {
            self.session_lost(node, sent);
            return error;
        }
        tracing::warn!(
            node,
            error = %error,
            "a broker failed a request carrying verdicts (Kafka 4.3.2 does when they name \
             records it no longer tracks, after a restart): those verdicts are answered as \
             refused, their records come back, and fetching goes on"
        );
        self.session_lost(node, Vec::new());
        // Always an error: an outcome without one reads as applied.
        let code = Some(match &error {
            ShareError::Broker { error, .. } => *error,
            _ => ResponseError::UnknownServerError,
        });
        let refused: Vec<AckOutcome> = sent
            .into_iter()
            .flat_map(|((id, p), batches)| {
                let topic = self.topic_name(&id);
                batches.into_iter().map(move |batch| AckOutcome {
                    topic: topic.clone(),
                    partition: p,
                    batch,
                    error: code,
                })
            })
            .collect();
        self.outcomes.extend(refused);
        ShareError::Transient(Box::new(error))
    }

    /// A request to `node` failed before its answer: the session there is
    /// gone or unknown. The verdicts it carried go again on a new session;
    /// the broker rejects them if the records' locks were lost, and the
    /// records come back.
    fn session_lost(&mut self, node: i32, sent_acks: SentAcks) {
        if let Some(s) = self.sessions.get_mut(&node) {
            s.epoch = 0;
            s.partitions.clear();
        }
        for (key, batches) in sent_acks {
            self.acks.entry(key).or_default().restore(&batches);
        }
    }

    /// ShareAcknowledge for `parts` on `node`'s session: their verdicts
    /// (and closing the session, when `Last`), or their renewals.
    async fn acknowledge_on(
        &mut self,
        node: i32,
        parts: &[(Uuid, i32)],
        sending: Sending,
    ) -> Result<(), ShareError> {
        let last = sending == Sending::Last;
        let renew = sending == Sending::Renewals;
        let waiting = |acks: &BTreeMap<(Uuid, i32), PartitionAcks>| {
            parts
                .iter()
                .filter(|k| {
                    acks.get(k).is_some_and(|a| {
                        if renew {
                            a.has_renewals()
                        } else {
                            a.has_pending()
                        }
                    })
                })
                .count()
        };
        let epoch = match self.sessions.get(&node) {
            Some(s) if s.epoch > 0 => {
                if last {
                    -1
                } else {
                    s.epoch
                }
            }
            // The session is being opened again (its first request may not
            // carry verdicts), or never was: the verdicts stay.
            _ => {
                return match waiting(&self.acks) {
                    0 => Ok(()),
                    count => Err(ShareError::Unsent { count }),
                }
            }
        };
        // Known before any verdict is taken, so a missing address loses none.
        let addr = self
            .cluster
            .node(node)
            .ok_or_else(|| ShareError::NoBroker(format!("node {node} is not in metadata")))?;
        let mut sent = Vec::new();
        let mut topics: BTreeMap<Uuid, Vec<AcknowledgePartition>> = BTreeMap::new();
        for &(id, p) in parts {
            let batches = self
                .acks
                .get_mut(&(id, p))
                .map(|a| {
                    if renew {
                        a.take_renewals()
                    } else {
                        a.take_pending()
                    }
                })
                .unwrap_or_default();
            if batches.is_empty() {
                continue;
            }
            topics.entry(id).or_default().push(
                AcknowledgePartition::default()
                    .with_partition_index(p)
                    .with_acknowledgement_batches(batches.iter().map(to_ack_batch).collect()),
            );
            sent.push(((id, p), batches));
        }
        if topics.is_empty() && !last {
            return Ok(());
        }
        let request = ShareAcknowledgeRequest::default()
            .with_group_id(Some(GroupId(StrBytes::from_string(self.cfg.group.clone()))))
            .with_member_id(Some(StrBytes::from_string(self.member_id.clone())))
            .with_share_session_epoch(epoch)
            .with_topics(
                topics
                    .into_iter()
                    .map(|(id, partitions)| {
                        AcknowledgeTopic::default()
                            .with_topic_id(id)
                            .with_partitions(partitions)
                    })
                    .collect(),
            );
        let request = ack_v2::Request {
            ack: request,
            renew,
        };
        let result: Result<ShareAcknowledgeResponse, ShareError> =
            match self.cluster.conn(&addr, Lane::Fetch).await {
                Ok(conn) if renew && conn.version::<ack_v2::Request>()? < 2 => {
                    // Nothing was sent: the session stays as it was.
                    return Err(ShareError::Unsupported {
                        api: "ShareAcknowledge",
                        broker: addr,
                        detail: "renewing locks needs v2 (Kafka 4.2 or later)".into(),
                    });
                }
                Ok(conn) => {
                    let answer = conn.call(request).await.map(|answer| answer.ack);
                    if answer.is_err() {
                        self.cluster.forget(&conn, Lane::Fetch).await;
                    }
                    answer
                }
                Err(e) => Err(e),
            };
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                self.session_lost(node, sent);
                return Err(e);
            }
        };
        if response.error_code != 0 {
            let error = ShareError::broker(
                "ShareAcknowledge",
                response.error_code,
                response.error_message.map(|m| m.to_string()),
            );
            return Err(self.request_failed(node, sent, error));
        }
        if last {
            self.sessions.remove(&node);
        } else if let Some(s) = self.sessions.get_mut(&node) {
            s.advance();
        }
        let mut acked: HashMap<(Uuid, i32), Vec<AckBatch>> = sent.into_iter().collect();
        for topic in response.responses {
            let name = self.topic_name(&topic.topic_id);
            for part in topic.partitions {
                if let Some(batches) = acked.remove(&(topic.topic_id, part.partition_index)) {
                    let error = ResponseError::try_from_code(part.error_code);
                    for batch in batches {
                        tracing::trace!(
                            partition = part.partition_index,
                            first = batch.first_offset,
                            last = batch.last_offset,
                            ?error,
                            "verdicts answered"
                        );
                        self.outcomes.push(AckOutcome {
                            topic: name.clone(),
                            partition: part.partition_index,
                            batch,
                            error,
                        });
                    }
                }
            }
        }
        self.unanswered(acked);
        Ok(())
    }
}

fn to_fetch_batch(b: &AckBatch) -> FetchAckBatch {
    FetchAckBatch::default()
        .with_first_offset(b.first_offset)
        .with_last_offset(b.last_offset)
        .with_acknowledge_types(vec![b.ack.code()])
}

fn to_ack_batch(b: &AckBatch) -> AckBatchAck {
    AckBatchAck::default()
        .with_first_offset(b.first_offset)
        .with_last_offset(b.last_offset)
        .with_acknowledge_types(vec![b.ack.code()])
}

fn duration_ms(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

/// Share-group members name themselves (KIP-1082): 16 random bytes, as
/// Kafka's own clients print a Uuid.
fn random_member_id() -> String {
    let bytes: [u8; 16] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::{refuses_verdicts, stranded};
    use crate::share::ShareError;

    #[test]
    fn only_the_brokers_own_failure_refuses_the_verdicts_a_request_carried() {
        let answered = |code: i16| ShareError::broker("ShareFetch", code, None);
        // UNKNOWN_SERVER_ERROR: Kafka 4.3.2's answer when the verdicts name
        // records a restarted broker no longer tracks; sent again, they
        // would fail every request after it.
        assert!(refuses_verdicts(&answered(-1), true));
        // ... but a request without verdicts has none to blame: it stops.
        assert!(!refuses_verdicts(&answered(-1), false));
        // SHARE_SESSION_NOT_FOUND, INVALID_SHARE_SESSION_EPOCH: sent again
        // on a new session.
        assert!(!refuses_verdicts(&answered(122), true));
        assert!(!refuses_verdicts(&answered(123), true));
        // GROUP_AUTHORIZATION_FAILED, INVALID_REQUEST, UNSUPPORTED_VERSION,
        // UNKNOWN_MEMBER_ID: the member stops.
        for code in [30, 42, 35, 25] {
            assert!(!refuses_verdicts(&answered(code), true), "{code}");
        }
        assert!(ShareError::Transient(Box::new(answered(-1))).is_retriable());
    }

    #[test]
    fn verdicts_are_stranded_only_when_another_broker_leads_and_the_session_is_lost() {
        assert!(stranded(2, false, 1), "a replica took over: never sendable");
        assert!(
            !stranded(2, true, 1),
            "the session is open: sent, and answered there"
        );
        assert!(
            !stranded(2, false, 2),
            "the same broker back: its new session answers"
        );
        assert!(!stranded(2, false, -1), "no leader yet: wait for one");
    }
}
