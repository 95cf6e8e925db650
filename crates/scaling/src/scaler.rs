//! `microbatch scaler`: KEDA's external scaler (`externalscaler.ExternalScaler`)
//! serving our policies.
//!
//! The trigger's metadata names the group (`consumerGroup`, or
//! `shareGroup` for a share group's backlog), topic and policy with its
//! parameters, takes KEDA's kafka trigger options (checked as KEDA checks
//! them, [`crate::keda_trigger`]) and may name the cluster
//! (`bootstrapServers`, [`cluster_for`]); Kafka credentials come from the scaler's own
//! configuration, never from metadata (`sasl: none` and `tls: disable`,
//! which carry none, are accepted). Metric and target are chosen so that the HPA's
//! AverageValue arithmetic (desired = ceil(metric / target)) lands on the
//! policy's answer:
//!
//! - `keda`: metric = KEDA's capped total lag, target = `lagThreshold`, so the
//!   HPA does exactly what KEDA's own kafka trigger would make it do;
//! - `rate`: metric = the replicas the rate policy wants, target = 1.
//!
//! KEDA asks IsActive and GetMetrics for the same ScaledObject a few ms
//! apart (operator and metrics server), so one evaluation per trigger is
//! reused for the polling interval: every caller within it gets the same
//! answer, and the policies see readings at the pace they were built for.
//! State is kept per trigger (the object and the trigger's metadata: KEDA
//! sends each trigger of an object under the object's name) and dropped
//! once KEDA has not asked for it for a while, so edits and deletions leave
//! no Kafka client behind. A slow cluster holds up only its own triggers:
//! see [`Scaler::evaluate`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use microbatch_kafka::KafkaConfig;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tonic::{Request, Response, Status};

use crate::defaults;
use crate::lag::{InvalidOffsetPolicy, LagReader};
use crate::observe::Observer;
use crate::policy::{Bound, KedaParams, KedaPolicy, Policy, RateParams, RatePolicy};
use crate::share_lag::ShareLagReader;
use microbatch_kafka::ClientError;

/// Generated from `proto/externalscaler.proto`.
pub mod proto {
    tonic::include_proto!("externalscaler");

    /// The encoded descriptors, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/externalscaler_descriptor.bin"));
}

use proto::external_scaler_server::ExternalScaler;
use proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};

/// Which policy a trigger asks for, with its parameters.
#[derive(Debug, Clone, PartialEq)]
enum PolicySpec {
    Keda(KedaParams),
    Rate(RateParams),
}

/// A trigger's metadata, validated.
#[derive(Debug, Clone, PartialEq)]
struct TriggerSpec {
    /// `bootstrapServers` from the trigger (see [`cluster_for`]).
    bootstrap_servers: Option<String>,
    /// None: every topic the group has committed offsets for (as KEDA's
    /// kafka trigger without `topic`; `keda` policy only).
    topic: Option<String>,
    group: String,
    /// `shareGroup` (a share group's backlog, no partition cap) rather
    /// than `consumerGroup`.
    share: bool,
    policy: PolicySpec,
    activation_lag_threshold: i64,
    invalid_offset: InvalidOffsetPolicy,
}

fn get<'a>(meta: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    meta.get(key).map(|s| s.trim()).filter(|s| !s.is_empty())
}

fn parse<T: std::str::FromStr>(
    meta: &HashMap<String, String>,
    key: &str,
    default: T,
) -> Result<T, Status> {
    match get(meta, key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            Status::invalid_argument(format!("scalerMetadata.{key}: cannot parse {v:?}"))
        }),
    }
}

impl TriggerSpec {
    fn from_metadata(meta: &HashMap<String, String>) -> Result<Self, Status> {
        let topic = get(meta, "topic").map(str::to_string);
        if topic.is_none() && get(meta, "policy").is_some_and(|p| p != "keda") {
            return Err(Status::invalid_argument(
                "scalerMetadata.topic is required unless the policy is keda",
            ));
        }
        let (group, share) = match (get(meta, "consumerGroup"), get(meta, "shareGroup")) {
            (Some(group), None) => {
                if let Some(why) = microbatch_kafka::capacity_report::reserved_group_name(group) {
                    return Err(Status::invalid_argument(format!(
                        "scalerMetadata.consumerGroup: {why}"
                    )));
                }
                (group.to_string(), false)
            }
            (None, Some(group)) if topic.is_some() => (group.to_string(), true),
            (None, Some(_)) => {
                return Err(Status::invalid_argument(
                    "scalerMetadata.topic is required with shareGroup",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(Status::invalid_argument(
                    "scalerMetadata.shareGroup: give consumerGroup or shareGroup, not both",
                ))
            }
            (None, None) => {
                return Err(Status::invalid_argument(
                    "scalerMetadata.consumerGroup (or shareGroup) is required",
                ))
            }
        };
        // `sasl: none` and `tls: disable`, as copied from a kafka trigger,
        // hand over nothing and are fine.
        for (secret, harmless) in [
            ("password", None),
            ("username", None),
            ("sasl", Some("none")),
            ("tls", Some("disable")),
        ] {
            let Some(value) = meta.get(secret) else {
                continue;
            };
            if harmless != Some(value.trim()) {
                return Err(Status::invalid_argument(format!(
                    "scalerMetadata.{secret}: credentials belong in the scaler's own environment, not in trigger metadata"
                )));
            }
        }
        let min_replicas = parse(meta, "minReplicas", defaults::MIN_REPLICAS)?;
        let max_replicas = parse(meta, "maxReplicas", defaults::MAX_REPLICAS)?;
        // KEDA's options, checked as KEDA checks them, whichever the policy:
        // the reset policy and activation mean the same to both.
        let keda = crate::keda_trigger::params_from_metadata(
            meta,
            KedaParams {
                min_replicas,
                max_replicas,
                ..KedaParams::default()
            },
        )
        .map_err(|e| Status::invalid_argument(format!("scalerMetadata.{e}")))?;
        let invalid_offset = if keda.offset_reset_latest {
            InvalidOffsetPolicy::Latest {
                scale_to_zero: keda.scale_to_zero_on_invalid_offset,
            }
        } else {
            InvalidOffsetPolicy::Earliest
        };
        let activation_lag_threshold = keda.activation_lag_threshold;
        let policy = match get(meta, "policy").unwrap_or("keda") {
            "keda" => PolicySpec::Keda(keda),
            "rate" => {
                let target = parse(meta, "targetDrainSeconds", defaults::TARGET_DRAIN_SECONDS)?;
                if target == 0 {
                    return Err(Status::invalid_argument(
                        "scalerMetadata.targetDrainSeconds must be at least 1",
                    ));
                }
                PolicySpec::Rate(
                    RateParams {
                        target_drain: Duration::from_secs(target),
                        min_replicas,
                        max_replicas,
                        slots_per_partition: parse(
                            meta,
                            "slotsPerPartition",
                            defaults::SLOTS_PER_PARTITION,
                        )?
                        .max(1),
                        slots_per_replica: parse(
                            meta,
                            "slotsPerReplica",
                            defaults::SLOTS_PER_REPLICA,
                        )?
                        .max(1),
                        initial_rate_per_replica: parse(
                            meta,
                            "ratePerReplica",
                            defaults::RATE_PER_REPLICA,
                        )?,
                        max_lag: None,
                        ..RateParams::default()
                    }
                    .served_through_hpa(),
                )
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "scalerMetadata.policy: expected keda or rate, got {other:?}"
                )))
            }
        };
        Ok(Self {
            bootstrap_servers: get(meta, "bootstrapServers").map(str::to_string),
            topic,
            group,
            share,
            policy,
            activation_lag_threshold,
            invalid_offset,
        })
    }

    fn metric_name(&self) -> String {
        let policy = match self.policy {
            PolicySpec::Keda(_) => "keda",
            PolicySpec::Rate(_) => "rate",
        };
        let topics = self.topic.as_deref().unwrap_or("topics");
        // `share` stands where a consumer group's policy does, so no two
        // triggers' names can meet.
        let raw = if self.share {
            format!("microbatch-share-{policy}-{topics}-{}", self.group)
        } else {
            format!("microbatch-{policy}-{topics}-{}", self.group)
        };
        raw.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect()
    }

    fn target(&self) -> i64 {
        match &self.policy {
            PolicySpec::Keda(k) => k.lag_threshold,
            PolicySpec::Rate(_) => 1,
        }
    }
}

/// What an evaluation needs and changes: the Kafka reader and the
/// policies' memory. Only evaluations take it, in a blocking thread.
struct TriggerState {
    spec: TriggerSpec,
    observer: Observer,
    policy: Box<dyn Policy>,
    /// For a `keda` trigger without a topic: the policy over all the
    /// group's topics.
    group_topics: Option<KedaPolicy>,
    /// The policy's last answer: the replica count taken as running when
    /// the group tells none (no member list, no worker reports).
    last_desired: u32,
}

/// One evaluation for a trigger.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub metric_name: String,
    pub metric_value: i64,
    pub target: i64,
    pub active: bool,
    pub total_lag: i64,
    /// The oldest partition's lag in seconds, when measured.
    pub lag_seconds: Option<f64>,
    /// Replicas the policy asked for, and the replicas it saw running.
    pub desired: u32,
    pub current: u32,
    pub capacity_per_replica: Option<f64>,
    /// Scale-ups held while the workers get nowhere (`rate` only).
    pub scale_up_held: bool,
    /// The term that bound `desired`; `None` for a `keda` trigger without
    /// a topic, which serves KEDA's lag alone.
    pub bound_by: Option<Bound>,
    /// The policy's reason, as `lag --policy` prints it.
    pub reason: String,
}

impl TriggerState {
    /// A `keda` trigger without a topic: KEDA's lag over every topic the
    /// group has committed offsets for.
    fn evaluate_group_topics(&mut self) -> Result<Evaluation, Status> {
        let unavailable = |e: ClientError| {
            Status::unavailable(format!("reading lag of {}: {e}", self.spec.group))
        };
        let Some(reader) = self.observer.reader() else {
            return Err(Status::invalid_argument(
                "a trigger without a topic needs a consumer group",
            ));
        };
        let topics = reader.committed_topics().map_err(unavailable)?;
        let lags = topics
            .iter()
            .map(|t| reader.read_topic(t, self.spec.invalid_offset))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)?;
        if let Some(failed) = lags.iter().find_map(|l| unreadable_reading(l, None)) {
            return Err(failed);
        }
        let Some(k) = self.group_topics.as_mut() else {
            return Err(Status::invalid_argument("scalerMetadata.topic is required"));
        };
        let (metric_value, with_persistent) = k.total_lag_of(&lags);
        Ok(Evaluation {
            metric_name: self.spec.metric_name(),
            metric_value,
            target: self.spec.target(),
            active: with_persistent > self.spec.activation_lag_threshold,
            total_lag: lags.iter().map(|l| l.total_lag).sum(),
            lag_seconds: None,
            desired: 0,
            current: 0,
            capacity_per_replica: None,
            scale_up_held: false,
            bound_by: None,
            reason: "KEDA's lag over every topic the group commits".into(),
        })
    }

    fn new(spec: TriggerSpec, observer: Observer) -> Self {
        let policy: Box<dyn Policy> = match &spec.policy {
            PolicySpec::Keda(p) => Box::new(KedaPolicy::new(p.clone())),
            PolicySpec::Rate(p) => Box::new(RatePolicy::new(p.clone())),
        };
        let group_topics = match (&spec.policy, &spec.topic) {
            (PolicySpec::Keda(p), None) => Some(KedaPolicy::new(p.clone())),
            _ => None,
        };
        Self {
            observer,
            spec,
            policy,
            group_topics,
            last_desired: 0,
        }
    }

    /// Reads the lag and asks the policy.
    fn evaluate(&mut self) -> Result<Evaluation, Status> {
        if self.spec.topic.is_none() {
            return self.evaluate_group_topics();
        }
        let rate = matches!(self.spec.policy, PolicySpec::Rate(_));
        let reading = self
            .observer
            .read(rate)
            .map_err(|e| Status::unavailable(format!("reading lag of {}: {e}", self.spec.group)))?;
        let only = match &self.spec.policy {
            PolicySpec::Keda(p) => p.partition_limitation.as_deref(),
            _ => None,
        };
        if let Some(failed) = unreadable_reading(&reading.lag, only) {
            return Err(failed);
        }
        if let PolicySpec::Keda(p) = &self.spec.policy {
            crate::keda_trigger::check_partitions(p, &reading.lag)
                .map_err(|e| Status::failed_precondition(format!("scalerMetadata.{e}")))?;
        }
        // The replicas running, as the group tells: the policy's own last
        // answer (which the HPA may not have applied) only when it tells
        // none. Taken as 0, the guess's doubling from 0 pinned the answer
        // at 1 for ever.
        let current = reading.replicas_seen().unwrap_or(self.last_desired);
        let decision = self
            .policy
            .decide(reading.at, &reading.observation(current));
        self.last_desired = decision.desired;
        let (metric_value, active) = if rate {
            // Active while records wait or arrive: idle, KEDA takes it to
            // zero after its cooldown (when minReplicaCount is 0).
            (
                i64::from(decision.desired),
                reading.lag.total_lag > self.spec.activation_lag_threshold
                    || reading.rates.arrival_per_sec > 0.0,
            )
        } else {
            (decision.metric_value, decision.active)
        };
        let e = Evaluation {
            metric_name: self.spec.metric_name(),
            metric_value,
            target: self.spec.target(),
            active,
            total_lag: reading.lag.total_lag,
            lag_seconds: reading.lag.lag_ms.map(|ms| ms as f64 / 1000.0),
            desired: decision.desired,
            current,
            capacity_per_replica: self.policy.rate_per_replica(),
            scale_up_held: decision.scale_up_held,
            bound_by: Some(decision.bound_by),
            reason: decision.reason,
        };
        Ok(e)
    }
}

/// A reading with a partition whose committed offset the broker answered
/// with an error, or with an offline partition, is an error, as KEDA's
/// kafka trigger makes it (it fails the whole reading and KEDA applies its
/// `fallback`): counted as "no commit" it could read as lag 0
/// (`scaleToZeroOnInvalidOffset`) or as all the retained records, and
/// without the offline partitions as a backlog gone.
/// `only`: a `keda` trigger's `partitionLimitation`, outside which KEDA
/// reads nothing.
fn unreadable_reading(lag: &crate::lag::GroupLag, only: Option<&[i32]>) -> Option<Status> {
    let why = lag.unreadable_within(only)?;
    Some(Status::unavailable(format!(
        "{why}; as KEDA's kafka trigger does, the reading fails and KEDA applies its fallback"
    )))
}

/// A failed evaluation is answered from memory for this long after the
/// first failure, doubling with each one after it up to
/// [`ERROR_BACKOFF_MAX`]: a cluster that does not answer costs one
/// reading per back-off, not one per call.
const ERROR_BACKOFF_MIN: Duration = Duration::from_secs(5);
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A call waits at most this long for its answer; past it KEDA gets an
/// error (and its fallback) while the evaluation goes on for later calls.
pub const EVALUATION_TIMEOUT: Duration = Duration::from_secs(12);

/// The last answer for a trigger and until when it stands.
struct Answer {
    result: Result<Evaluation, Status>,
    until: Instant,
}

/// One trigger of one ScaledObject (or ScaledJob): KEDA sends each
/// trigger's metadata under its object's name, so the metadata is part of
/// its identity: an edit is a new trigger. The last answer is read
/// without waiting for an evaluation in progress.
struct Trigger {
    labels: ObjectLabel,
    /// When KEDA last asked, in ms since the scaler started.
    used_ms: AtomicU64,
    answer: Mutex<Option<Answer>>,
    /// An evaluation is running: later callers wait for its answer without
    /// a thread of their own.
    in_flight: std::sync::atomic::AtomicBool,
    /// Consecutive failed evaluations.
    failures: Mutex<u32>,
    work: Mutex<TriggerState>,
}

impl Trigger {
    /// The last answer, while it stands.
    fn standing(&self, now: Instant) -> Option<Result<Evaluation, Status>> {
        let answer = self.answer.lock().expect("trigger answer lock poisoned");
        answer
            .as_ref()
            .filter(|a| now < a.until)
            .map(|a| a.result.clone())
    }

    /// Keeps `result` for the polling interval, an error for its back-off.
    /// The interval counts from when an evaluation ended: reading lag takes
    /// a while, and a call KEDA makes right after another must get the
    /// same answer.
    fn keep(&self, result: &Result<Evaluation, Status>, interval: Duration) {
        let mut failures = self
            .failures
            .lock()
            .expect("trigger failures lock poisoned");
        let stands = match result {
            Ok(_) => {
                *failures = 0;
                interval
            }
            Err(_) => {
                *failures = failures.saturating_add(1);
                let doubled = ERROR_BACKOFF_MIN.saturating_mul(1 << (*failures - 1).min(6));
                doubled.min(ERROR_BACKOFF_MAX)
            }
        };
        *self.answer.lock().expect("trigger answer lock poisoned") = Some(Answer {
            result: result.clone(),
            until: Instant::now() + stands,
        });
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObjectLabel {
    /// namespace/name
    scaled_object: String,
    /// The trigger's metric name (policy, topic and group).
    metric: String,
    /// Tells apart triggers whose metric names read alike (a hash of the
    /// object and its metadata): each trigger has its own series, and
    /// dropping one never removes another's.
    trigger: String,
}

/// Eight hex digits of a hash of `text`, stable within the process.
fn short_hash(text: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:08x}", h.finish() as u32)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The scaler's metrics (names start `microbatch_scaler_`).
#[derive(Default)]
struct ScalerMetrics {
    evaluations: Family<OutcomeLabel, Counter>,
    scaled_objects: Gauge,
    total_lag: Family<ObjectLabel, Gauge>,
    lag_seconds: Family<ObjectLabel, Gauge<f64, AtomicU64>>,
    metric_value: Family<ObjectLabel, Gauge>,
    active: Family<ObjectLabel, Gauge>,
    desired: Family<ObjectLabel, Gauge>,
    current: Family<ObjectLabel, Gauge>,
    scale_up_held: Family<ObjectLabel, Gauge>,
    bound_by: Family<BoundLabel, Gauge>,
}

/// A trigger's series of `microbatch_scaler_bound_by`: one per term, 1 for
/// the term that bound the last answer (a state set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BoundLabel {
    scaled_object: String,
    metric: String,
    trigger: String,
    term: &'static str,
}

impl BoundLabel {
    fn each(l: &ObjectLabel) -> impl Iterator<Item = (Bound, BoundLabel)> + '_ {
        Bound::ALL.into_iter().map(move |b| {
            (
                b,
                BoundLabel {
                    scaled_object: l.scaled_object.clone(),
                    metric: l.metric.clone(),
                    trigger: l.trigger.clone(),
                    term: b.as_str(),
                },
            )
        })
    }
}

impl ScalerMetrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("microbatch_scaler");
        r.register(
            "evaluations",
            "Evaluations by outcome: evaluated, cached (reused within the polling interval), error (failed, or a failure answered from memory), timeout",
            self.evaluations.clone(),
        );
        r.register(
            "scaled_objects",
            "Triggers (ScaledObject or ScaledJob, and metadata) the scaler holds state for",
            self.scaled_objects.clone(),
        );
        r.register("total_lag", "Total lag per trigger", self.total_lag.clone());
        r.register(
            "lag_seconds",
            "Age of the oldest record not committed, in seconds, per trigger (the oldest partition's)",
            self.lag_seconds.clone(),
        );
        r.register(
            "metric_value",
            "The metric value served to KEDA per trigger",
            self.metric_value.clone(),
        );
        r.register(
            "active",
            "Whether the ScaledObject is active (1) or not (0)",
            self.active.clone(),
        );
        r.register(
            "desired_replicas",
            "Replicas the policy asks for per trigger",
            self.desired.clone(),
        );
        r.register(
            "current_replicas",
            "Replicas the scaler saw running (group members or reporting workers)",
            self.current.clone(),
        );
        r.register(
            "scale_up_held",
            "1 while scale-ups are held: records wait and no committed offset moves (a downstream outage)",
            self.scale_up_held.clone(),
        );
        r.register(
            "bound_by",
            "1 for the term that bound the policy's last answer per trigger (arrivals, drain_target, max_lag_seconds, lag_threshold, partition_cap, tolerance, scale_down_window, outage_hold, ...), 0 for the others",
            self.bound_by.clone(),
        );
    }

    fn observe(&self, l: &ObjectLabel, e: &Evaluation) {
        self.total_lag.get_or_create(l).set(e.total_lag);
        if let Some(seconds) = e.lag_seconds {
            self.lag_seconds.get_or_create(l).set(seconds);
        }
        self.metric_value.get_or_create(l).set(e.metric_value);
        self.active.get_or_create(l).set(i64::from(e.active));
        self.desired.get_or_create(l).set(i64::from(e.desired));
        self.current.get_or_create(l).set(i64::from(e.current));
        self.scale_up_held
            .get_or_create(l)
            .set(i64::from(e.scale_up_held));
        if let Some(bound) = e.bound_by {
            for (b, label) in BoundLabel::each(l) {
                self.bound_by
                    .get_or_create(&label)
                    .set(i64::from(b == bound));
            }
        }
    }

    fn forget(&self, l: &ObjectLabel) {
        self.total_lag.remove(l);
        self.lag_seconds.remove(l);
        self.metric_value.remove(l);
        self.active.remove(l);
        self.desired.remove(l);
        self.current.remove(l);
        self.scale_up_held.remove(l);
        for (_, label) in BoundLabel::each(l) {
            self.bound_by.remove(&label);
        }
    }
}

/// How the scaler paces and keeps its state.
#[derive(Debug, Clone)]
pub struct ScalerConfig {
    /// StreamIsActive re-checks this often.
    pub stream_interval: Duration,
    /// An evaluation is reused for this long.
    pub polling_interval: Duration,
    /// State of a ScaledObject nobody asked about for this long is dropped.
    pub state_ttl: Duration,
    /// At most this many triggers are held; a new one past it is refused
    /// (each holds a Kafka client).
    pub max_triggers: usize,
    /// Namespaces whose ScaledObjects are served; empty: all.
    pub allowed_namespaces: Vec<String>,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        Self {
            stream_interval: Duration::from_millis(defaults::SCALER_STREAM_INTERVAL_MS),
            polling_interval: Duration::from_millis(defaults::SCALER_POLLING_INTERVAL_MS),
            state_ttl: defaults::secs(defaults::SCALER_STATE_TTL_SECONDS),
            max_triggers: defaults::SCALER_MAX_TRIGGERS,
            allowed_namespaces: Vec::new(),
        }
    }
}

/// The gRPC service: a plain struct, one state per trigger.
pub struct Scaler {
    kafka: KafkaConfig,
    config: ScalerConfig,
    /// Held only to look up, add or drop a trigger: never across a lock of
    /// one, nor across I/O.
    triggers: Mutex<HashMap<String, Arc<Trigger>>>,
    started: Instant,
    metrics: ScalerMetrics,
    registry: Registry,
}

impl Scaler {
    pub fn new(kafka: KafkaConfig, config: ScalerConfig) -> Self {
        let metrics = ScalerMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        Self {
            kafka,
            config,
            triggers: Mutex::new(HashMap::new()),
            started: Instant::now(),
            metrics,
            registry,
        }
    }

    /// The scaler's metrics in the Prometheus text format.
    pub fn encode_metrics(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Triggers held now.
    pub fn scaled_objects(&self) -> usize {
        self.triggers
            .lock()
            .expect("scaler trigger map lock poisoned")
            .len()
    }

    /// A trigger's identity: its object and its metadata, in key order, as
    /// JSON (escaped, so no two different maps read alike).
    fn key(r: &ScaledObjectRef) -> String {
        let metadata: std::collections::BTreeMap<&String, &String> =
            r.scaler_metadata.iter().collect();
        serde_json::json!([r.namespace, r.name, metadata]).to_string()
    }

    fn millis_since_start(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_millis() as u64
    }

    fn trigger(&self, r: &ScaledObjectRef) -> Result<Arc<Trigger>, Status> {
        let allowed = &self.config.allowed_namespaces;
        if !allowed.is_empty() && !allowed.contains(&r.namespace) {
            return Err(Status::permission_denied(format!(
                "namespace {:?} is not among the scaler's --allowed-namespaces",
                r.namespace
            )));
        }
        let key = Self::key(r);
        let now = Instant::now();
        let now_ms = self.millis_since_start(now);
        let mut triggers = self
            .triggers
            .lock()
            .expect("scaler trigger map lock poisoned");
        // Drop what KEDA stopped asking about (deleted or edited triggers).
        let ttl = self.config.state_ttl.as_millis() as u64;
        let expired: Vec<String> = triggers
            .iter()
            .filter(|(k, t)| {
                **k != key && now_ms.saturating_sub(t.used_ms.load(Ordering::Relaxed)) >= ttl
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut dropped = Vec::with_capacity(expired.len());
        for k in expired {
            if let Some(t) = triggers.remove(&k) {
                tracing::info!(scaled_object = %t.labels.scaled_object, metric = %t.labels.metric, "dropping the state of a trigger not asked about");
                self.metrics.forget(&t.labels);
                dropped.push(t);
            }
        }
        self.metrics.scaled_objects.set(triggers.len() as i64);
        let found = triggers.get(&key).cloned();
        let held = triggers.len();
        drop(triggers);
        if !dropped.is_empty() {
            // Closing a Kafka client waits for its threads: never under the
            // map's lock, nor on the runtime's threads.
            std::thread::spawn(move || drop(dropped));
        }
        if let Some(t) = found {
            t.used_ms.store(now_ms, Ordering::Relaxed);
            return Ok(t);
        }
        if held >= self.config.max_triggers {
            return Err(Status::resource_exhausted(format!(
                "the scaler holds {held} triggers, its --max-triggers; a new one waits until one is dropped"
            )));
        }
        // A new trigger: checked and given its client outside the map's lock.
        let spec = TriggerSpec::from_metadata(&r.scaler_metadata)?;
        let kafka = cluster_for(&self.kafka, spec.bootstrap_servers.as_deref())?;
        let topic = spec.topic.as_deref().unwrap_or_default();
        let observer = if spec.share {
            share_observer(&kafka, &spec.group, topic, spec.invalid_offset)?
        } else {
            let mut reader = LagReader::new(&kafka, &spec.group, topic, Duration::from_secs(10))
                .map_err(|e| Status::unavailable(format!("kafka: {e}")))?;
            if spec.topic.is_some() {
                // One record per partition with lag, for microbatch_scaler_lag_seconds.
                reader = reader.with_record_ages();
            }
            Observer::new(reader, spec.invalid_offset)
        };
        let trigger = Arc::new(Trigger {
            labels: ObjectLabel {
                scaled_object: format!("{}/{}", r.namespace, r.name),
                metric: spec.metric_name(),
                trigger: short_hash(&key),
            },
            used_ms: AtomicU64::new(now_ms),
            answer: Mutex::new(None),
            in_flight: std::sync::atomic::AtomicBool::new(false),
            failures: Mutex::new(0),
            work: Mutex::new(TriggerState::new(spec, observer)),
        });
        let mut triggers = self
            .triggers
            .lock()
            .expect("scaler trigger map lock poisoned");
        // Two first calls at once: the one in the map wins.
        let trigger = triggers.entry(key).or_insert(trigger).clone();
        self.metrics.scaled_objects.set(triggers.len() as i64);
        Ok(trigger)
    }

    /// Evaluates a trigger, or answers from its last evaluation while that
    /// stands (the polling interval; an error's back-off). Waits at most
    /// [`EVALUATION_TIMEOUT`]; the evaluation itself runs in a blocking
    /// thread, so a slow cluster holds up only the calls for its triggers.
    pub async fn evaluate(self: &Arc<Self>, r: &ScaledObjectRef) -> Result<Evaluation, Status> {
        let trigger = self.trigger(r)?;
        if let Some(answer) = trigger.standing(Instant::now()) {
            self.count(if answer.is_ok() { "cached" } else { "error" });
            return answer;
        }
        let interval = self.config.polling_interval;
        let deadline = tokio::time::Instant::now() + EVALUATION_TIMEOUT;
        if trigger.in_flight.swap(true, Ordering::AcqRel) {
            // Another call is reading: wait for its answer, threadless.
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(answer) = trigger.standing(Instant::now()) {
                    self.count(if answer.is_ok() { "cached" } else { "error" });
                    return answer;
                }
                if !trigger.in_flight.load(Ordering::Acquire) {
                    // It finished without an answer that still stands.
                    return Box::pin(self.evaluate(r)).await;
                }
                if tokio::time::Instant::now() >= deadline {
                    self.count("timeout");
                    return Err(timed_out(r));
                }
            }
        }
        let this = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut work = trigger.work.lock().expect("trigger state lock poisoned");
            let result = work.evaluate();
            drop(work);
            trigger.keep(&result, interval);
            trigger.in_flight.store(false, Ordering::Release);
            match &result {
                Ok(e) => {
                    this.metrics.observe(&trigger.labels, e);
                    this.count("evaluated");
                }
                Err(_) => this.count("error"),
            }
            result
        });
        match tokio::time::timeout(EVALUATION_TIMEOUT, task).await {
            Ok(joined) => {
                joined.map_err(|e| Status::internal(format!("evaluation task failed: {e}")))?
            }
            Err(_) => {
                self.count("timeout");
                Err(timed_out(r))
            }
        }
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .evaluations
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }
}

/// A share group's backlog reader; its reads run on the scaler's runtime
/// from the evaluation's blocking thread.
fn share_observer(
    kafka: &KafkaConfig,
    group: &str,
    topic: &str,
    invalid_offset: InvalidOffsetPolicy,
) -> Result<Observer, Status> {
    use microbatch_kafka::share::{security, ShareConsumerConfig};
    let config = ShareConsumerConfig::from_kafka(kafka, group, vec![])
        .map_err(|e| Status::invalid_argument(format!("kafka: {e}")))?;
    let connector =
        security::connector(kafka).map_err(|e| Status::unavailable(format!("kafka: {e}")))?;
    // One record per partition with a backlog, for microbatch_scaler_lag_seconds.
    let reader = ShareLagReader::new(
        connector,
        config.bootstrap,
        group,
        topic,
        Duration::from_secs(10),
        tokio::runtime::Handle::current(),
    )
    .with_record_ages(kafka)
    .and_then(|r| r.with_worker_reports(kafka))
    .map_err(|e| Status::unavailable(format!("kafka: {e}")))?;
    Ok(Observer::share(reader, invalid_offset))
}

fn timed_out(r: &ScaledObjectRef) -> Status {
    Status::deadline_exceeded(format!(
        "reading lag of {} took over {} s; the reading goes on for later calls",
        r.name,
        EVALUATION_TIMEOUT.as_secs()
    ))
}

/// The cluster a trigger is read from: its `bootstrapServers` if it names
/// them, else the scaler's own. Credentials are only ever sent to the
/// scaler's own brokers, so a scaler that has some refuses other servers
/// (whoever writes a ScaledObject could otherwise collect them).
fn cluster_for(own: &KafkaConfig, servers: Option<&str>) -> Result<KafkaConfig, Status> {
    let set = |s: &str| {
        let mut v: Vec<String> = s.split(',').map(|h| h.trim().to_string()).collect();
        v.sort_unstable();
        v
    };
    let mut kafka = own.clone();
    let Some(servers) = servers.filter(|s| set(s) != set(&own.bootstrap_servers)) else {
        return Ok(kafka);
    };
    if own.presents_credentials() {
        return Err(Status::invalid_argument(format!(
            "scalerMetadata.bootstrapServers: {servers} is not the scaler's own cluster ({}), and the scaler sends its credentials only there",
            own.bootstrap_servers
        )));
    }
    kafka.bootstrap_servers = servers.to_string();
    Ok(kafka)
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for Arc<Scaler> {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let e = self.evaluate(request.get_ref()).await?;
        tracing::debug!(metric = %e.metric_name, lag = e.total_lag, active = e.active, "IsActive");
        Ok(Response::new(IsActiveResponse { result: e.active }))
    }

    type StreamIsActiveStream = ActiveStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let object = request.into_inner();
        // Validate up front so a bad trigger fails the call, not the stream.
        self.trigger(&object)?;
        tracing::debug!(scaled_object = %object.name, namespace = %object.namespace, "StreamIsActive");
        let scaler = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<bool> = None;
            loop {
                // A failed evaluation is not sent: an error item would end
                // the stream, and KEDA would reconnect only after its
                // back-off (up to minutes after the cluster is back). The
                // last state stands; GetMetrics reports the error (KEDA's
                // fallback).
                match scaler.evaluate(&object).await {
                    Ok(e) if last != Some(e.active) => {
                        tracing::debug!(scaled_object = %object.name, active = e.active, "StreamIsActive: pushed");
                        last = Some(e.active);
                        if tx
                            .send(Ok(IsActiveResponse { result: e.active }))
                            .await
                            .is_err()
                        {
                            return; // the client went away
                        }
                    }
                    Ok(_) => {}
                    Err(status) => {
                        tracing::debug!(scaled_object = %object.name, error = %status.message(), "StreamIsActive: evaluation failed; the stream stays open");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(scaler.config.stream_interval) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let allowed = &self.config.allowed_namespaces;
        let namespace = &request.get_ref().namespace;
        if !allowed.is_empty() && !allowed.contains(namespace) {
            return Err(Status::permission_denied(format!(
                "namespace {namespace:?} is not among the scaler's --allowed-namespaces"
            )));
        }
        let spec = TriggerSpec::from_metadata(&request.get_ref().scaler_metadata)?;
        // Refused here too: KEDA would otherwise make an HPA metric that
        // fails on every read.
        cluster_for(&self.kafka, spec.bootstrap_servers.as_deref())?;
        tracing::debug!(metric = %spec.metric_name(), target = spec.target(), "GetMetricSpec");
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: spec.metric_name(),
                target_size: spec.target(),
                target_size_float: spec.target() as f64,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let req = request.into_inner();
        let object = req
            .scaled_object_ref
            .ok_or_else(|| Status::invalid_argument("scaledObjectRef is required"))?;
        let e = self.evaluate(&object).await?;
        tracing::debug!(metric = %e.metric_name, value = e.metric_value, lag = e.total_lag, bound_by = e.bound_by.map_or("lag", Bound::as_str), reason = %e.reason, "GetMetrics");
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: if req.metric_name.is_empty() {
                    e.metric_name
                } else {
                    req.metric_name
                },
                metric_value: e.metric_value,
                metric_value_float: e.metric_value as f64,
            }],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found in review: a partition whose committed-offset entry carries
    /// an error was read as "no commit" (lag 0 under
    /// scaleToZeroOnInvalidOffset) where KEDA fails the reading.
    #[test]
    fn a_partition_whose_commit_cannot_be_read_fails_the_reading() {
        use crate::lag::{GroupLag, InvalidOffsetPolicy, PartitionLag};
        let part = |p, error: Option<&str>| {
            let mut l = PartitionLag::compute(p, None, 0, 10, InvalidOffsetPolicy::Earliest);
            l.commit_error = error.map(String::from);
            l
        };
        let fine = GroupLag::new("g", "t", vec![part(0, None), part(1, None)]);
        assert!(unreadable_reading(&fine, None).is_none());
        let broken = GroupLag::new(
            "g",
            "t",
            vec![
                part(0, None),
                part(1, Some("Broker: Unknown topic or partition")),
            ],
        );
        let status = unreadable_reading(&broken, None).expect("an error");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("partition 1") && status.message().contains("fallback"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn a_reading_with_offline_partitions_fails() {
        use crate::lag::{GroupLag, InvalidOffsetPolicy, PartitionLag};
        use microbatch_kafka::share::backlog::{partition_backlog, ShareBacklog};
        let part = |p| PartitionLag::compute(p, Some(10), 0, 10, InvalidOffsetPolicy::Earliest);
        let mut lag = GroupLag::new("g", "t", vec![part(0), part(2)]);
        lag.partitions_offline = vec![1, 3];
        // A KEDA trigger limited to partitions still led reads them.
        assert!(unreadable_reading(&lag, Some(&[0, 2])).is_none());
        let status = unreadable_reading(&lag, Some(&[0, 1])).expect("an error");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status
                .message()
                .contains("t partitions [1] have no leader (offline)")
                && status.message().contains("fallback"),
            "{}",
            status.message()
        );
        // A share group's backlog reads the same way.
        let backlog = ShareBacklog {
            share_group: "s".into(),
            topic: "t".into(),
            members: 1,
            total_backlog: 0,
            partitions_unknown: 0,
            partitions_offline: vec![1],
            backlog_source: microbatch_kafka::share::backlog::SOURCE_BROKER_LAG,
            partitions: vec![partition_backlog(0, 10, Some(0), 10)],
            exists: true,
        };
        let lag = crate::share_lag::backlog_as_lag(&backlog, InvalidOffsetPolicy::Earliest);
        assert!(unreadable_reading(&lag, None).is_some());
    }

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn object(name: &str, pairs: &[(&str, &str)]) -> ScaledObjectRef {
        ScaledObjectRef {
            name: name.into(),
            namespace: "ns".into(),
            scaler_metadata: meta(pairs),
        }
    }

    #[test]
    fn each_trigger_has_its_own_state_and_what_is_not_asked_about_is_dropped() {
        // No broker is needed: a lag reader connects only when it reads.
        let scaler = Scaler::new(
            KafkaConfig::plaintext("127.0.0.1:1"),
            ScalerConfig {
                state_ttl: Duration::from_millis(200),
                ..ScalerConfig::default()
            },
        );
        let a = object("a", &[("topic", "t"), ("consumerGroup", "g")]);
        let first = scaler.trigger(&a).unwrap();
        assert!(
            Arc::ptr_eq(&first, &scaler.trigger(&a).unwrap()),
            "kept while unchanged"
        );
        // KEDA sends a second trigger of the same object under the same
        // name: it has a state of its own, and so does an edited one.
        let second_topic = object("a", &[("topic", "u"), ("consumerGroup", "g")]);
        let other = scaler.trigger(&second_topic).unwrap();
        assert!(!Arc::ptr_eq(&first, &other), "two triggers, two states");
        assert_ne!(first.labels, other.labels, "and their own metric series");
        assert!(Arc::ptr_eq(&first, &scaler.trigger(&a).unwrap()));
        assert_eq!(scaler.scaled_objects(), 2);
        drop((first, other));
        std::thread::sleep(Duration::from_millis(250));
        scaler
            .trigger(&object("b", &[("topic", "t"), ("consumerGroup", "g")]))
            .unwrap();
        assert_eq!(
            scaler.scaled_objects(),
            1,
            "a's triggers, not asked about for the TTL, are dropped"
        );
        assert!(scaler
            .encode_metrics()
            .contains("microbatch_scaler_scaled_objects 1"));
    }

    #[test]
    fn keys_cannot_collide_and_only_allowed_triggers_are_held() {
        // Found in review: joined as "\nkey=value", a value holding a
        // newline read like two keys, so one caller's trigger could take
        // another's place.
        let real = object("a", &[("consumerGroup", "g"), ("topic", "t")]);
        let forged = object("a", &[("consumerGroup", "g\ntopic=t")]);
        assert_ne!(Scaler::key(&real), Scaler::key(&forged));
        let scaler = Scaler::new(
            KafkaConfig::plaintext("127.0.0.1:1"),
            ScalerConfig {
                max_triggers: 2,
                allowed_namespaces: vec!["ns".into()],
                ..ScalerConfig::default()
            },
        );
        let first = scaler.trigger(&real).unwrap();
        let second = scaler.trigger(&forged).unwrap();
        assert_ne!(first.labels, second.labels, "each its own series");
        let third = object("c", &[("consumerGroup", "g"), ("topic", "t")]);
        let err = scaler.trigger(&third).err().expect("past --max-triggers");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(scaler.trigger(&real).is_ok(), "held ones are still served");
        let elsewhere = ScaledObjectRef {
            namespace: "tenant".into(),
            ..real.clone()
        };
        let err = scaler
            .trigger(&elsewhere)
            .err()
            .expect("not an allowed namespace");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(scaler.scaled_objects(), 2);
    }

    #[test]
    fn a_failed_evaluation_is_answered_from_memory_for_a_growing_back_off() {
        let scaler = Scaler::new(
            KafkaConfig::plaintext("127.0.0.1:1"),
            ScalerConfig::default(),
        );
        let t = scaler
            .trigger(&object("a", &[("topic", "t"), ("consumerGroup", "g")]))
            .unwrap();
        let failed: Result<Evaluation, Status> = Err(Status::unavailable("no cluster"));
        let interval = Duration::from_secs(5);
        let mut stands = Vec::new();
        for _ in 0..8 {
            let before = Instant::now();
            t.keep(&failed, interval);
            let until = t.answer.lock().unwrap().as_ref().unwrap().until;
            stands.push(until.duration_since(before).as_secs());
        }
        assert_eq!(stands, [5, 10, 20, 40, 60, 60, 60, 60]);
        let answer = t.standing(Instant::now()).expect("the error stands");
        assert_eq!(answer.unwrap_err().code(), tonic::Code::Unavailable);
        // A success resets the back-off and stands for the interval.
        let ok = Ok(Evaluation {
            metric_name: "m".into(),
            metric_value: 1,
            target: 1,
            active: true,
            total_lag: 1,
            lag_seconds: None,
            desired: 1,
            current: 1,
            capacity_per_replica: None,
            scale_up_held: false,
            bound_by: None,
            reason: String::new(),
        });
        t.keep(&ok, interval);
        t.keep(&failed, interval);
        let until = t.answer.lock().unwrap().as_ref().unwrap().until;
        assert!(until.duration_since(Instant::now()) <= Duration::from_secs(5));
        assert!(t
            .standing(Instant::now() + Duration::from_secs(6))
            .is_none());
    }

    #[test]
    fn metadata_is_validated_and_names_the_key() {
        let err = TriggerSpec::from_metadata(&meta(&[("consumerGroup", "g"), ("policy", "rate")]))
            .unwrap_err();
        assert!(err.message().contains("topic"));
        let all = TriggerSpec::from_metadata(&meta(&[("consumerGroup", "g")])).unwrap();
        assert_eq!(
            all.topic, None,
            "keda without a topic: all the group's topics"
        );
        assert_eq!(all.metric_name(), "microbatch-keda-topics-g");
        let err = TriggerSpec::from_metadata(&meta(&[
            ("topic", "t"),
            ("consumerGroup", "g"),
            ("lagThreshold", "x"),
        ]))
        .unwrap_err();
        assert!(err.message().contains("lagThreshold"));
        let err = TriggerSpec::from_metadata(&meta(&[
            ("topic", "t"),
            ("consumerGroup", "g"),
            ("password", "p"),
        ]))
        .unwrap_err();
        assert!(err.message().contains("environment"));
        let spec = TriggerSpec::from_metadata(&meta(&[
            ("topic", "Orders.v1"),
            ("consumerGroup", "g"),
            ("lagThreshold", "3"),
        ]))
        .unwrap();
        assert_eq!(spec.target(), 3);
        assert_eq!(spec.metric_name(), "microbatch-keda-orders-v1-g");
        let rate = TriggerSpec::from_metadata(&meta(&[
            ("topic", "t"),
            ("consumerGroup", "g"),
            ("policy", "rate"),
        ]))
        .unwrap();
        assert_eq!(rate.target(), 1);
    }

    /// Keys left out take the library's defaults, as `supervise` and `lag`
    /// do; only the HPA's own window and tolerance are left to the HPA.
    #[test]
    fn metadata_left_out_takes_the_policies_defaults() {
        let keda =
            TriggerSpec::from_metadata(&meta(&[("topic", "t"), ("consumerGroup", "g")])).unwrap();
        assert_eq!(keda.policy, PolicySpec::Keda(KedaParams::default()));
        let rate = TriggerSpec::from_metadata(&meta(&[
            ("topic", "t"),
            ("consumerGroup", "g"),
            ("policy", "rate"),
        ]))
        .unwrap();
        assert_eq!(
            rate.policy,
            PolicySpec::Rate(RateParams {
                scale_down_stabilization: Duration::ZERO,
                tolerance: 0.0,
                ..RateParams::default()
            })
        );
    }

    #[test]
    fn trigger_servers_never_receive_the_scalers_credentials() {
        let own = KafkaConfig::plaintext("b1:9092,b2:9092");
        let same = cluster_for(&own, Some(" b2:9092, b1:9092")).unwrap();
        assert_eq!(same.bootstrap_servers, "b1:9092,b2:9092");
        let other = cluster_for(&own, Some("other:9092")).unwrap();
        assert_eq!(other.bootstrap_servers, "other:9092");
        let mut secure = own.clone();
        secure.username = Some("u".into());
        secure.password = Some(microbatch_kafka::Secret::new("s3cr3t"));
        assert!(cluster_for(&secure, Some("b2:9092,b1:9092")).is_ok());
        let err = cluster_for(&secure, Some("evil:9092")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("bootstrapServers"),
            "{}",
            err.message()
        );
        assert!(!err.message().contains("s3cr3t"));
        // Every way the scaler proves who it is stays home: MSK IAM has no
        // password, OAUTHBEARER lives in properties, mTLS has no SASL.
        use microbatch_kafka::config::{SaslMechanism, SecurityProtocol};
        for mechanism in [SaslMechanism::AwsMskIam, SaslMechanism::Plain] {
            let mut tokens = own.clone();
            tokens.security_protocol = SecurityProtocol::SaslSsl;
            tokens.sasl_mechanism = Some(mechanism);
            assert!(
                cluster_for(&tokens, Some("evil:9092")).is_err(),
                "{mechanism:?}"
            );
        }
        for property in [
            "ssl.key.location",
            "ssl.certificate.location",
            "ssl.keystore.location",
            "sasl.mechanism",
            "sasl.oauthbearer.client.id",
        ] {
            let mut mtls = own.clone();
            mtls.properties.push((property.into(), "x".into()));
            assert!(cluster_for(&mtls, Some("evil:9092")).is_err(), "{property}");
        }
        let mut ca_only = own.clone();
        ca_only.security_protocol = SecurityProtocol::Ssl;
        ca_only.ssl_ca_location = Some("/ca.pem".into());
        assert!(
            cluster_for(&ca_only, Some("other:9093")).is_ok(),
            "a CA proves the brokers, not the scaler"
        );
    }

    #[test]
    fn a_copied_kafka_trigger_is_read_as_keda_reads_it() {
        let base = [
            ("topic", "t"),
            ("consumerGroup", "g"),
            ("bootstrapServers", "kafka-1:9092,kafka-2:9092"),
        ];
        let spec = TriggerSpec::from_metadata(&meta(
            &[&base[..], &[("sasl", "none"), ("tls", "disable")]].concat(),
        ))
        .expect("sasl: none and tls: disable carry no credentials");
        assert_eq!(
            spec.bootstrap_servers.as_deref(),
            Some("kafka-1:9092,kafka-2:9092")
        );
        for refused in [("sasl", "scram_sha512"), ("tls", "enable")] {
            let err =
                TriggerSpec::from_metadata(&meta(&[&base[..], &[refused]].concat())).unwrap_err();
            assert!(err.message().contains(refused.0), "{}", err.message());
        }
        for (key, value) in [
            ("activationLagThreshold", "-1"),
            ("allowIdleConsumers", "true"),
        ] {
            let mut pairs = base.to_vec();
            pairs.push((key, value));
            pairs.push(("limitToPartitionsWithLag", "true"));
            let err = TriggerSpec::from_metadata(&meta(&pairs)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{key}");
        }
    }
}
