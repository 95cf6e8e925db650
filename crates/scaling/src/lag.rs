//! Consumer-group lag, measured the way KEDA measures it, minus its blind spot.
//!
//! **Lag** of a partition = high watermark − max(committed, low watermark), so
//! records that retention already deleted are not lag. A partition without a
//! committed offset follows the reset policy, as KEDA's kafka scaler does:
//! `earliest`: high − low; `latest`: 1, or 0 with `scale_to_zero_on_invalid`.
//!
//! **Lag in seconds** of a partition = now − the timestamp of the oldest
//! record not yet committed (the one at max(committed, low), or at low for a
//! partition without a commit under `earliest`); 0 without lag. It costs one
//! fetch, so [`LagReader`] measures it only when asked
//! ([`LagReader::with_record_ages`]) and only for partitions with lag, one
//! record each. The group's figure is the oldest partition's.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use microbatch_kafka::aws_iam::WithTokens;
use microbatch_kafka::client::{ClientError, QuietContext};
use microbatch_kafka::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

/// How long a lag reading waits before asking a moving coordinator again.
const COORDINATOR_RETRY: Duration = Duration::from_millis(200);

/// Whether the group's coordinator is moving or loading its offsets: an
/// answer to ask for again, not an error.
fn coordinator_moving(e: &rdkafka::error::KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::CoordinatorNotAvailable
        )
    )
}

/// What a partition without a committed offset counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum InvalidOffsetPolicy {
    /// Everything retained is lag (KEDA `offsetResetPolicy: earliest`).
    Earliest,
    /// One record of lag, or none with `scale_to_zero` (KEDA's `latest`).
    Latest { scale_to_zero: bool },
}

/// One partition's offsets and lag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    pub partition: i32,
    /// `None` when the group has no committed offset for the partition.
    pub committed: Option<i64>,
    pub low: i64,
    pub high: i64,
    pub lag: i64,
    /// Age of the oldest record not committed, in ms (shown in seconds): 0
    /// without lag; None when not measured, or under `latest` without a
    /// commit (the group would start at the end: no record waits).
    #[serde(rename = "lag_seconds", serialize_with = "as_seconds")]
    pub lag_ms: Option<i64>,
    /// How far below `committed` the position may really be: 0 for a
    /// consumer group; for a share group's backlog, the records that
    /// arrived while it was read (see `crate::share_lag`).
    #[serde(skip)]
    pub committed_slack: i64,
    /// The broker's error for this partition's entry in the committed
    /// offsets answer (the group's offset could not be read): read as no
    /// commit here, while KEDA's kafka trigger fails the whole reading on
    /// it, so the scaler does too (see [`GroupLag::commit_error`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_error: Option<String>,
}

fn as_seconds<S: serde::Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_f64(*ms as f64 / 1000.0),
        None => s.serialize_none(),
    }
}

impl PartitionLag {
    /// Where the oldest record not yet committed is, if one waits.
    pub fn oldest_waiting(&self, policy: InvalidOffsetPolicy) -> Option<i64> {
        if self.lag <= 0 {
            return None;
        }
        match (self.committed, policy) {
            (Some(c), _) => Some(c.max(self.low)),
            (None, InvalidOffsetPolicy::Earliest) => Some(self.low),
            (None, InvalidOffsetPolicy::Latest { .. }) => None,
        }
    }

    pub fn compute(
        partition: i32,
        committed: Option<i64>,
        low: i64,
        high: i64,
        policy: InvalidOffsetPolicy,
    ) -> Self {
        let lag = match (committed, policy) {
            (Some(c), _) => (high - c.max(low)).max(0),
            (None, InvalidOffsetPolicy::Earliest) => (high - low).max(0),
            (
                None,
                InvalidOffsetPolicy::Latest {
                    scale_to_zero: true,
                },
            ) => 0,
            (
                None,
                InvalidOffsetPolicy::Latest {
                    scale_to_zero: false,
                },
            ) => 1,
        };
        Self {
            partition,
            committed,
            low,
            high,
            lag,
            lag_ms: (lag == 0).then_some(0),
            committed_slack: 0,
            commit_error: None,
        }
    }
}

/// A group's lag on one topic at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupLag {
    pub group: String,
    pub topic: String,
    pub total_lag: i64,
    /// The oldest partition's lag in seconds (ms here), None if unmeasured.
    #[serde(rename = "lag_seconds", serialize_with = "as_seconds")]
    pub lag_ms: Option<i64>,
    pub partitions: Vec<PartitionLag>,
    /// The committed offsets' metadata strings (workers' capacity reports).
    #[serde(skip)]
    pub commit_metadata: Vec<String>,
    /// A share group's backlog: every member takes from every partition,
    /// so replicas are not capped by the partition count.
    #[serde(skip)]
    pub shared: bool,
    /// Partitions without a leader (their broker down, no replica in its
    /// place): not in `partitions` nor in the total. Like a commit that
    /// cannot be read, no scaling decision is made on such a reading
    /// ([`GroupLag::unreadable`]).
    pub partitions_offline: Vec<i32>,
}

impl GroupLag {
    pub fn new(group: &str, topic: &str, partitions: Vec<PartitionLag>) -> Self {
        let mut lag = Self {
            group: group.to_string(),
            topic: topic.to_string(),
            total_lag: partitions.iter().map(|p| p.lag).sum(),
            lag_ms: None,
            partitions,
            commit_metadata: Vec::new(),
            shared: false,
            partitions_offline: Vec::new(),
        };
        lag.lag_ms = lag.oldest_ms();
        lag
    }

    fn oldest_ms(&self) -> Option<i64> {
        self.partitions.iter().filter_map(|p| p.lag_ms).max()
    }

    /// Sets each partition's age from the timestamp (ms since the epoch) of
    /// its oldest waiting record, as of `now_ms`.
    pub fn set_ages(&mut self, now_ms: i64, timestamps: &HashMap<i32, i64>) {
        for p in &mut self.partitions {
            if let Some(ts) = timestamps.get(&p.partition) {
                p.lag_ms = Some((now_ms - ts).max(0));
            }
        }
        self.lag_ms = self.oldest_ms();
    }

    /// The first partition whose committed offset the broker answered
    /// with an error, and that error.
    pub fn commit_error(&self) -> Option<(i32, &str)> {
        self.partitions
            .iter()
            .find_map(|p| Some((p.partition, p.commit_error.as_deref()?)))
    }

    /// Why no scaling decision can be made on this reading, if one cannot:
    /// a partition whose committed offset could not be read, or offline
    /// partitions. KEDA's kafka trigger fails its whole reading on either.
    pub fn unreadable(&self) -> Option<String> {
        self.unreadable_within(None)
    }

    /// [`Self::unreadable`] counting only the partitions in `only` (a KEDA
    /// trigger's `partitionLimitation`: KEDA reads no other partition).
    pub fn unreadable_within(&self, only: Option<&[i32]>) -> Option<String> {
        let counted = |p: &i32| only.is_none_or(|only| only.contains(p));
        if let Some((partition, error)) = self
            .partitions
            .iter()
            .filter(|p| counted(&p.partition))
            .find_map(|p| Some((p.partition, p.commit_error.as_deref()?)))
        {
            return Some(format!(
                "the committed offset of {} partition {partition} for group {} could not be read ({error})",
                self.topic, self.group
            ));
        }
        let offline: Vec<i32> = self
            .partitions_offline
            .iter()
            .copied()
            .filter(counted)
            .collect();
        if !offline.is_empty() {
            return Some(format!(
                "{}: their lag cannot be read",
                microbatch_kafka::share::ShareError::offline(&self.topic, &offline)
            ));
        }
        None
    }

    pub fn partitions_with_lag(&self) -> usize {
        self.partitions.iter().filter(|p| p.lag > 0).count()
    }

    /// Records appended to the topic in all (sum of high watermarks).
    pub fn total_high(&self) -> i64 {
        self.partitions.iter().map(|p| p.high).sum()
    }

    /// Records the group has committed past, in all (what a consumed rate is
    /// measured from); partitions without a commit count from their low mark.
    pub fn total_consumed_position(&self) -> i64 {
        self.partitions
            .iter()
            .map(|p| p.committed.unwrap_or(p.low).max(p.low))
            .sum()
    }
}

/// Reads committed offsets and watermarks for a group; one client, reused.
pub struct LagReader {
    consumer: WithTokens<BaseConsumer<QuietContext>>,
    servers: String,
    group: String,
    topic: String,
    timeout: Duration,
    /// Whether [`Self::read`] also measures lag in seconds.
    record_ages: bool,
    /// When ages are read (see [`AgesBackoff`]).
    ages_backoff: std::sync::Mutex<AgesBackoff>,
}

/// When record ages are read. A read that fails (refused: an identity
/// with Describe but not Read on the topic; or not one record back within
/// the reader's timeout) skips ages for a while, doubling from
/// [`AGES_BACKOFF_FIRST`] to [`AGES_BACKOFF_MAX`], with a warning each
/// time: a reader that cannot read them does not spend its timeout on every
/// reading finding that out, and the lag itself is still read.
#[derive(Debug, Default)]
pub struct AgesBackoff {
    failures: u32,
    skip_until: Option<Instant>,
}

pub const AGES_BACKOFF_FIRST: Duration = Duration::from_secs(30);
/// The longest an age read waits for its records.
pub const AGES_TIMEOUT: Duration = Duration::from_secs(2);
/// Short enough that ages come back soon after what kept them away.
pub const AGES_BACKOFF_MAX: Duration = Duration::from_secs(240);

impl AgesBackoff {
    /// Whether ages are read at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.skip_until.is_none_or(|until| now >= until)
    }

    /// A failed read at `now`: how long ages are skipped.
    pub fn failed(&mut self, now: Instant) -> Duration {
        let pause = AGES_BACKOFF_FIRST
            .saturating_mul(1 << self.failures.min(5))
            .min(AGES_BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        self.skip_until = Some(now + pause);
        pause
    }

    pub fn succeeded(&mut self) {
        *self = Self::default();
    }
}

impl LagReader {
    pub fn new(
        kafka: &KafkaConfig,
        group: &str,
        topic: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        Self::new_with(kafka, group, topic, timeout, &[])
    }

    /// [`Self::new`] with client properties of its own (`isolation.level`).
    pub fn new_with(
        kafka: &KafkaConfig,
        group: &str,
        topic: &str,
        timeout: Duration,
        properties: &[(&str, &str)],
    ) -> Result<Self, ClientError> {
        let mut config = kafka.client_config();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            // Ages need one record per partition: fetch one batch, not 1 MiB.
            .set("max.partition.fetch.bytes", "1024")
            // A record deleted meanwhile: take the next one still there.
            .set("auto.offset.reset", "earliest");
        for (key, value) in properties {
            config.set(*key, *value);
        }
        let consumer = kafka.create_client(&config, QuietContext::new(kafka))?;
        Ok(Self {
            consumer,
            servers: kafka.bootstrap_servers.clone(),
            group: group.to_string(),
            topic: topic.to_string(),
            timeout,
            record_ages: false,
            ages_backoff: Default::default(),
        })
    }

    /// Makes [`Self::read`] measure lag in seconds too (one fetch per read).
    pub fn with_record_ages(mut self) -> Self {
        self.record_ages = true;
        self
    }

    /// Timestamps of the oldest waiting record of each partition asked for,
    /// fetching only those partitions, one record each (each is paused once
    /// its record is in). Partitions whose record does not come within the
    /// timeout, or has no timestamp, are left out.
    ///
    /// Best effort: a refusal or nothing back at all is said (a warning)
    /// and answers no timestamps, and ages are then skipped for a while
    /// ([`AgesBackoff`]); errors of the client itself are errors.
    pub fn oldest_timestamps(
        &self,
        topic: &str,
        wanted: &[(i32, i64)],
    ) -> Result<HashMap<i32, i64>, ClientError> {
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        let mut backoff = self
            .ages_backoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if !backoff.due(now) {
            return Ok(HashMap::new());
        }
        let why = match self.fetch_oldest(topic, wanted)? {
            Ok(found) if !found.is_empty() => {
                backoff.succeeded();
                return Ok(found);
            }
            Ok(_) => format!(
                "not one record came back within {:?} (records deleted meanwhile, or a \
                 transaction left open past a read_committed reader)",
                self.timeout
            ),
            Err(e) => format!("the fetch was refused ({e}): the reader needs Read on the topic"),
        };
        let pause = backoff.failed(now);
        tracing::warn!(
            topic,
            group = %self.group,
            "record ages could not be read: {why}; lag is read without them for the next {} s",
            pause.as_secs()
        );
        Ok(HashMap::new())
    }

    /// One age read: `Ok(Err)` when the broker refused the fetch.
    fn fetch_oldest(
        &self,
        topic: &str,
        wanted: &[(i32, i64)],
    ) -> Result<Result<HashMap<i32, i64>, rdkafka::error::KafkaError>, ClientError> {
        let mut found = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in wanted {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                .map_err(|e| self.classify(e))?;
        }
        self.consumer.assign(&tpl).map_err(|e| self.classify(e))?;
        // A partition paused by the previous read stays paused when assigned
        // again: resume them all.
        if let Err(e) = self.consumer.resume(&tpl) {
            let _ = self.consumer.unassign();
            return Err(self.classify(e));
        }
        // Ages are help: a partition whose record does not come (only a
        // transaction marker left, records deleted) costs at most this.
        let deadline = Instant::now() + self.timeout.min(AGES_TIMEOUT);
        let mut seen = 0;
        while seen < wanted.len() && Instant::now() < deadline {
            let message = match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => message,
                // Refused (Describe without Read): no answer will come, so
                // none is waited for.
                Some(Err(e)) if microbatch_kafka::client::is_authorization_failure(&e) => {
                    self.consumer.unassign().map_err(|e| self.classify(e))?;
                    return Ok(Err(e));
                }
                _ => continue,
            };
            let partition = message.partition();
            if found.contains_key(&partition) {
                continue;
            }
            seen += 1;
            if let Some(ts) = message.timestamp().to_millis() {
                found.insert(partition, ts);
            }
            let mut one = TopicPartitionList::new();
            one.add_partition(topic, partition);
            let _ = self.consumer.pause(&one);
        }
        self.consumer.unassign().map_err(|e| self.classify(e))?;
        Ok(Ok(found))
    }

    fn classify(&self, e: rdkafka::error::KafkaError) -> ClientError {
        // Client errors arrive as events; serve them so an authentication
        // failure is told as such, not as a transport failure.
        for _ in 0..20 {
            let _ = self.consumer.poll(Duration::from_millis(5));
            if self.consumer.context().refusal().is_some() {
                break;
            }
        }
        if let Some(refusal) = self.consumer.context().refusal() {
            return ClientError::Refused(refusal);
        }
        match ClientError::classify(e, &self.servers) {
            ClientError::UnknownTopic { .. } => ClientError::UnknownTopic {
                topic: self.topic.clone(),
            },
            other => other,
        }
    }

    /// The group's committed offsets for `tpl`. Asked again, within the
    /// timeout, while the group's coordinator moves or loads (a broker
    /// restarted): librdkafka reports that once, and a lag reading failed
    /// for it in the chaos run.
    fn committed(&self, tpl: TopicPartitionList) -> Result<TopicPartitionList, ClientError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.consumer.committed_offsets(tpl.clone(), left) {
                Err(e)
                    if coordinator_moving(&e) && Instant::now() + COORDINATOR_RETRY < deadline =>
                {
                    std::thread::sleep(COORDINATOR_RETRY);
                }
                other => return other.map_err(|e| self.classify(e)),
            }
        }
    }

    /// The topic's partition ids.
    pub fn partitions(&self) -> Result<Vec<i32>, ClientError> {
        self.partitions_of(&self.topic)
    }

    fn partitions_of(&self, name: &str) -> Result<Vec<i32>, ClientError> {
        self.partitions_and_offline(name).map(|(ids, _)| ids)
    }

    /// Every partition of `name`, and those of them without a leader.
    fn partitions_and_offline(&self, name: &str) -> Result<(Vec<i32>, Vec<i32>), ClientError> {
        // Serves queued client events: librdkafka asks for a fresh
        // OAUTHBEARER token there (MSK IAM) before the old one expires, and
        // a refusal is kept when it comes, not when a later failure looks
        // for it. A poll serves one error at most: a few, cheaply.
        for _ in 0..32 {
            let _ = self.consumer.poll(Duration::ZERO);
        }
        let unknown = || ClientError::UnknownTopic {
            topic: name.to_string(),
        };
        let md = self
            .consumer
            .fetch_metadata(Some(name), self.timeout)
            .map_err(|e| self.classify(e))?;
        let topic = md
            .topics()
            .iter()
            .find(|t| t.name() == name)
            .ok_or_else(unknown)?;
        if topic.error().is_some() || topic.partitions().is_empty() {
            return Err(unknown());
        }
        let mut ids: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
        ids.sort_unstable();
        let mut offline: Vec<i32> = topic
            .partitions()
            .iter()
            .filter(|p| p.leader() < 0)
            .map(|p| p.id())
            .collect();
        offline.sort_unstable();
        Ok((ids, offline))
    }

    /// Members of the group on this reader's topic now; `None` when that
    /// cannot be told:
    /// - the broker cannot list groups (librdkafka's mock cluster);
    /// - a KIP-848 group: the classic DescribeGroups librdkafka sends
    ///   answers it as "Dead" with no members, which read as 0 replicas
    ///   running while its workers worked;
    /// - a rebalance: the broker leaves out every member's metadata until
    ///   the group is stable again.
    ///
    /// Callers then count the workers that report. One group may serve
    /// several topics (a Deployment per topic, one group id): a member
    /// subscribed only to other topics is not one of this topic's
    /// replicas; one whose subscription cannot be read is counted.
    pub fn members(&self) -> Option<usize> {
        let list = self
            .consumer
            .fetch_group_list(Some(&self.group), self.timeout)
            .ok()?;
        let group = list.groups().iter().find(|g| g.name() == self.group)?;
        match group.state() {
            "Empty" => Some(0),
            "Stable" if group.protocol_type() == "consumer" => Some(
                group
                    .members()
                    .iter()
                    .filter(|m| member_on_topic(m.metadata(), &self.topic))
                    .count(),
            ),
            _ => None,
        }
    }

    /// Measures lag now.
    pub fn read(&self, policy: InvalidOffsetPolicy) -> Result<GroupLag, ClientError> {
        self.read_topic(&self.topic, policy)
    }

    /// The topics the group has committed offsets for (what a KEDA trigger
    /// without a topic scales on), sorted.
    pub fn committed_topics(&self) -> Result<Vec<String>, ClientError> {
        let md = self
            .consumer
            .fetch_metadata(None, self.timeout)
            .map_err(|e| self.classify(e))?;
        let mut tpl = TopicPartitionList::new();
        for topic in md.topics() {
            for p in topic.partitions() {
                tpl.add_partition(topic.name(), p.id());
            }
        }
        let committed = self.committed(tpl)?;
        let mut topics: Vec<String> = committed
            .elements()
            .iter()
            .filter(|e| matches!(e.offset(), Offset::Offset(o) if o >= 0))
            .map(|e| e.topic().to_string())
            .collect();
        topics.sort_unstable();
        topics.dedup();
        Ok(topics)
    }

    /// Measures the group's lag on `topic` now.
    pub fn read_topic(
        &self,
        topic: &str,
        policy: InvalidOffsetPolicy,
    ) -> Result<GroupLag, ClientError> {
        // A partition without a leader has no watermarks to read: it is
        // left out and named (`partitions_offline`), the rest are read.
        let (mut ids, offline) = self.partitions_and_offline(topic)?;
        ids.retain(|p| !offline.contains(p));
        let mut tpl = TopicPartitionList::new();
        for p in &ids {
            tpl.add_partition(topic, *p);
        }
        let committed = self.committed(tpl)?;
        let watermarks = crate::watermarks::fetch(&self.consumer, topic, &ids, self.timeout)
            .map_err(|e| self.classify(e))?;
        let mut partitions = Vec::with_capacity(ids.len());
        for p in ids {
            let (low, high) = watermarks[&p];
            let entry = committed.find_partition(topic, p);
            let c = entry.as_ref().and_then(|e| match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            });
            let mut lag = PartitionLag::compute(p, c, low, high, policy);
            lag.commit_error = entry.and_then(|e| e.error().err()).map(|e| e.to_string());
            partitions.push(lag);
        }
        let mut lag = GroupLag::new(&self.group, topic, partitions);
        lag.partitions_offline = offline;
        lag.commit_metadata = crate::capacity::commit_metadata(&committed);
        if self.record_ages {
            let wanted: Vec<(i32, i64)> = lag
                .partitions
                .iter()
                .filter_map(|p| p.oldest_waiting(policy).map(|o| (p.partition, o)))
                .collect();
            let timestamps = self.oldest_timestamps(topic, &wanted)?;
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            lag.set_ages(now_ms, &timestamps);
        }
        Ok(lag)
    }
}

/// Rates from two lag readings: records/s appended and committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    pub arrival_per_sec: f64,
    pub processed_per_sec: f64,
}

/// Turns watermark and commit progress into rates that do not depend on how
/// often they are asked for: a reading closer than [`RATE_MIN_INTERVAL`] to
/// the previous one returns the rates already known (KEDA asks GetMetrics and
/// IsActive a few ms apart, and a 4 ms interval with no commit in it would
/// read 0), and each interval weighs by its length in an exponential average
/// with time constant [`RATE_SMOOTHING`].
#[derive(Debug, Default)]
pub struct RateTracker {
    /// The reading the current interval started from: time, Σ high, Σ committed.
    base: Option<(Instant, i64, i64)>,
    smoothed: Option<Rates>,
    /// Share groups: per partition, the most records known done (the lower
    /// bound of each reading), and their sum's increments so far.
    shared_done: HashMap<i32, i64>,
    shared_total: i64,
}

/// Readings closer together than this add no interval.
pub const RATE_MIN_INTERVAL: Duration = Duration::from_millis(900);
/// Time constant of the rates' exponential average.
pub const RATE_SMOOTHING: Duration = Duration::from_secs(5);

/// Below this many records a second, with nothing moved in the last
/// interval, a smoothed rate is taken as 0.
const IDLE_RATE: f64 = 0.5;

impl RateTracker {
    /// Where the group is, in records done. A share group's position is
    /// known only within the arrivals during its reading: it counts a
    /// partition's progress only once the lower bound passes the most seen
    /// (the noise of the bounds never reads as records processed), and a
    /// partition the broker starts keeping state for is a base, not
    /// progress (a new group's start at the high watermark).
    fn consumed_position(&mut self, lag: &GroupLag) -> i64 {
        if !lag.shared {
            return lag.total_consumed_position();
        }
        for p in &lag.partitions {
            let Some(c) = p.committed else { continue };
            let lower = c.saturating_sub(p.committed_slack);
            match self.shared_done.get_mut(&p.partition) {
                Some(seen) if lower > *seen => {
                    self.shared_total = self.shared_total.saturating_add(lower - *seen);
                    *seen = lower;
                }
                Some(_) => {}
                None => {
                    self.shared_done.insert(p.partition, lower);
                }
            }
        }
        self.shared_total
    }

    /// The rates known, without a new reading (one that cannot be
    /// counted: [`GroupLag::unreadable`]).
    pub fn rates(&self) -> Rates {
        self.smoothed.unwrap_or_default()
    }

    pub fn observe(&mut self, at: Instant, lag: &GroupLag) -> Rates {
        let high = lag.total_high();
        let consumed = self.consumed_position(lag);
        let Some((t0, h0, c0)) = self.base else {
            self.base = Some((at, high, consumed));
            return Rates::default();
        };
        let elapsed = at.saturating_duration_since(t0);
        if elapsed < RATE_MIN_INTERVAL {
            return self.smoothed.unwrap_or_default();
        }
        self.base = Some((at, high, consumed));
        let secs = elapsed.as_secs_f64();
        let rates = Rates {
            arrival_per_sec: ((high - h0).max(0)) as f64 / secs,
            processed_per_sec: ((consumed - c0).max(0)) as f64 / secs,
        };
        let alpha = 1.0 - (-secs / RATE_SMOOTHING.as_secs_f64()).exp();
        // An average that only decays never reads 0: once nothing moved in
        // an interval and it is below half a record a second, it is 0 (so an
        // idle group reads as idle and can scale to zero).
        let settle = |smoothed: f64, raw: f64| {
            if raw == 0.0 && smoothed < IDLE_RATE {
                0.0
            } else {
                smoothed
            }
        };
        let smoothed = match self.smoothed {
            Some(s) => Rates {
                arrival_per_sec: settle(
                    s.arrival_per_sec + alpha * (rates.arrival_per_sec - s.arrival_per_sec),
                    rates.arrival_per_sec,
                ),
                processed_per_sec: settle(
                    s.processed_per_sec + alpha * (rates.processed_per_sec - s.processed_per_sec),
                    rates.processed_per_sec,
                ),
            },
            None => rates,
        };
        self.smoothed = Some(smoothed);
        smoothed
    }
}

/// Whether a member with this metadata counts as one of `topic`'s:
/// unless its subscription names other topics only.
fn member_on_topic(metadata: Option<&[u8]>, topic: &str) -> bool {
    use microbatch_kafka::group_member::{subscription_to, Subscribed};
    metadata.and_then(|m| subscription_to(m, topic)) != Some(Subscribed::Elsewhere)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One group id serving two topics: a member subscribed only to the
    /// other topic is not one of this topic's replicas; one whose
    /// subscription cannot be read still is.
    #[test]
    fn members_count_on_their_own_topic() {
        // Kafka's ConsumerProtocolSubscription v0: one topic, no user data.
        let to = |topic: &str| {
            let mut b = vec![0, 0, 0, 0, 0, 1];
            b.extend((topic.len() as i16).to_be_bytes());
            b.extend(topic.as_bytes());
            b.extend((-1i32).to_be_bytes());
            b
        };
        assert!(member_on_topic(Some(&to("a")), "a"));
        assert!(!member_on_topic(Some(&to("b")), "a"));
        assert!(member_on_topic(None, "a"));
        assert!(member_on_topic(Some(&[]), "a"));
        assert!(
            member_on_topic(Some(&[0, 0, 0, 0, 0, 0]), "a"),
            "no topic named"
        );
        assert!(member_on_topic(Some(b"garbage"), "a"));
    }

    /// Found in review: a share-group reader allowed Describe but not Read
    /// spent the whole 2 s on every reading finding the ages unreadable. A failure
    /// now skips them, for longer each time up to a cap; a success starts
    /// over.
    #[test]
    fn unreadable_ages_are_skipped_for_longer_each_time() {
        let t0 = Instant::now();
        let mut b = AgesBackoff::default();
        assert!(b.due(t0));
        let mut at = t0;
        let mut pauses = Vec::new();
        for _ in 0..7 {
            let pause = b.failed(at);
            assert!(!b.due(at + pause - Duration::from_millis(1)));
            assert!(b.due(at + pause));
            pauses.push(pause.as_secs());
            at += pause;
        }
        assert_eq!(pauses, [30, 60, 120, 240, 240, 240, 240]);
        b.succeeded();
        assert!(b.due(at));
        assert_eq!(b.failed(at), AGES_BACKOFF_FIRST);
    }

    #[test]
    fn an_idle_group_reads_zero_arrivals_soon() {
        let mut t = RateTracker::default();
        let at = Instant::now();
        let lag = |high: i64| {
            GroupLag::new(
                "g",
                "t",
                vec![PartitionLag::compute(
                    0,
                    Some(high),
                    0,
                    high,
                    InvalidOffsetPolicy::Earliest,
                )],
            )
        };
        t.observe(at, &lag(0));
        let busy = t.observe(at + Duration::from_secs(5), &lag(3_000));
        assert!(busy.arrival_per_sec > 0.0);
        let mut zero_after = None;
        for i in 2..60u64 {
            let r = t.observe(at + Duration::from_secs(5 * i), &lag(3_000));
            if r.arrival_per_sec == 0.0 {
                zero_after = Some(5 * i);
                break;
            }
        }
        let zero_after = zero_after.expect("the decaying average reaches 0");
        assert!(zero_after <= 60, "idle read after {zero_after} s");
    }

    #[test]
    fn retention_deleted_records_are_not_lag() {
        let p = PartitionLag::compute(0, Some(10), 50, 80, InvalidOffsetPolicy::Earliest);
        assert_eq!(p.lag, 30);
    }

    #[test]
    fn invalid_offsets_follow_the_reset_policy() {
        assert_eq!(
            PartitionLag::compute(0, None, 5, 80, InvalidOffsetPolicy::Earliest).lag,
            75
        );
        assert_eq!(
            PartitionLag::compute(
                0,
                None,
                5,
                80,
                InvalidOffsetPolicy::Latest {
                    scale_to_zero: false
                }
            )
            .lag,
            1
        );
        assert_eq!(
            PartitionLag::compute(
                0,
                None,
                5,
                80,
                InvalidOffsetPolicy::Latest {
                    scale_to_zero: true
                }
            )
            .lag,
            0
        );
    }

    #[test]
    fn lag_seconds_are_the_oldest_waiting_record_age() {
        let earliest = InvalidOffsetPolicy::Earliest;
        let latest = InvalidOffsetPolicy::Latest {
            scale_to_zero: false,
        };
        let committed = PartitionLag::compute(0, Some(10), 20, 80, earliest);
        assert_eq!(
            committed.oldest_waiting(earliest),
            Some(20),
            "past the deleted"
        );
        let fresh = PartitionLag::compute(1, None, 5, 9, latest);
        assert_eq!(
            fresh.oldest_waiting(latest),
            None,
            "latest starts at the end"
        );
        assert_eq!(fresh.oldest_waiting(earliest), Some(5));
        let done = PartitionLag::compute(2, Some(7), 0, 7, earliest);
        assert_eq!(
            (done.oldest_waiting(earliest), done.lag_ms),
            (None, Some(0))
        );
        let mut lag = GroupLag::new("g", "t", vec![committed, fresh, done]);
        assert_eq!(
            lag.lag_ms,
            Some(0),
            "only the partition without lag is known"
        );
        lag.set_ages(100_000, &HashMap::from([(0, 40_000), (1, 99_500)]));
        assert_eq!(lag.partitions[0].lag_ms, Some(60_000));
        assert_eq!(lag.partitions[1].lag_ms, Some(500));
        assert_eq!(lag.lag_ms, Some(60_000), "the oldest partition's");
        let json = serde_json::to_value(&lag).unwrap();
        assert_eq!(json["lag_seconds"], 60.0);
        assert_eq!(json["partitions"][2]["lag_seconds"], 0.0);
    }

    #[test]
    fn rates_come_from_progress() {
        let mut r = RateTracker::default();
        let t0 = Instant::now();
        let g = |c, h| {
            GroupLag::new(
                "g",
                "t",
                vec![PartitionLag::compute(
                    0,
                    Some(c),
                    0,
                    h,
                    InvalidOffsetPolicy::Earliest,
                )],
            )
        };
        r.observe(t0, &g(0, 100));
        let rates = r.observe(t0 + Duration::from_secs(2), &g(40, 300));
        assert!((rates.arrival_per_sec - 100.0).abs() < 1e-9, "{rates:?}");
        assert!((rates.processed_per_sec - 20.0).abs() < 1e-9);
    }

    #[test]
    fn paired_readings_a_few_ms_apart_do_not_skew_the_rates() {
        // KEDA's pattern: GetMetrics and IsActive 4 ms apart, every 15 s,
        // against one reading every 15 s; commits land between the pairs.
        let g = |c, h| {
            GroupLag::new(
                "g",
                "t",
                vec![PartitionLag::compute(
                    0,
                    Some(c),
                    0,
                    h,
                    InvalidOffsetPolicy::Earliest,
                )],
            )
        };
        let t0 = Instant::now();
        let mut single = RateTracker::default();
        let mut paired = RateTracker::default();
        let (mut last_single, mut last_paired) = (Rates::default(), Rates::default());
        for i in 0..40u64 {
            let at = t0 + Duration::from_secs(15 * i);
            let (c, h) = (i as i64 * 15_000, i as i64 * 15_000 + 500);
            last_single = single.observe(at, &g(c, h));
            paired.observe(at, &g(c, h));
            // The second call of the pair sees one more commit of 10 records.
            last_paired = paired.observe(at + Duration::from_millis(4), &g(c + 10, h + 10));
        }
        assert!(
            (last_single.processed_per_sec - 1000.0).abs() < 1.0,
            "{last_single:?}"
        );
        assert!(
            (last_paired.processed_per_sec - last_single.processed_per_sec).abs() < 1.0,
            "paired {last_paired:?} vs single {last_single:?}"
        );
        assert!((last_paired.arrival_per_sec - 1000.0).abs() < 1.0);
    }
}
