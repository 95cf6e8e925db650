//! `microbatch scaler`: KEDA's external scaler (`externalscaler.ExternalScaler`)
//! serving our policies.
//!
//! The trigger's metadata names the group, topic and policy with its
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
//! apart (operator and metrics server), so one evaluation per ScaledObject
//! is reused for the polling interval: every caller within it gets the same
//! answer, and the policies see readings at the pace they were built for.
//! State per ScaledObject is replaced when its metadata changes and dropped
//! once KEDA has not asked for it for a while, so edits and deletions leave
//! no Kafka client behind.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
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
use crate::policy::{KedaParams, KedaPolicy, Policy, RateParams, RatePolicy};
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
        let group = get(meta, "consumerGroup")
            .ok_or_else(|| Status::invalid_argument("scalerMetadata.consumerGroup is required"))?
            .to_string();
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
                PolicySpec::Rate(RateParams {
                    target_drain: Duration::from_secs(target),
                    min_replicas,
                    max_replicas,
                    slots_per_partition: parse(
                        meta,
                        "slotsPerPartition",
                        defaults::SLOTS_PER_PARTITION,
                    )?
                    .max(1),
                    slots_per_replica: parse(meta, "slotsPerReplica", defaults::SLOTS_PER_REPLICA)?
                        .max(1),
                    initial_rate_per_replica: parse(
                        meta,
                        "ratePerReplica",
                        defaults::RATE_PER_REPLICA,
                    )?,
                    // The HPA keeps its own scale-down window.
                    scale_down_stabilization: Duration::ZERO,
                    tolerance: 0.0,
                    max_lag: None,
                })
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
        let raw = format!("microbatch-{policy}-{topics}-{}", self.group);
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

/// What the scaler keeps per ScaledObject between calls.
struct TriggerState {
    spec: TriggerSpec,
    observer: Observer,
    policy: Box<dyn Policy>,
    /// For a `keda` trigger without a topic: the policy over all the
    /// group's topics.
    group_topics: Option<KedaPolicy>,
    /// The last evaluation and when it was made.
    last: Option<(Instant, Evaluation)>,
    /// When KEDA last asked about this ScaledObject.
    used: Instant,
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
}

impl TriggerState {
    /// A `keda` trigger without a topic: KEDA's lag over every topic the
    /// group has committed offsets for.
    fn evaluate_group_topics(&mut self) -> Result<Evaluation, Status> {
        let unavailable = |e: ClientError| {
            Status::unavailable(format!("reading lag of {}: {e}", self.spec.group))
        };
        let reader = self.observer.reader();
        let topics = reader.committed_topics().map_err(unavailable)?;
        let lags = topics
            .iter()
            .map(|t| reader.read_topic(t, self.spec.invalid_offset))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)?;
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
        })
    }

    fn new(spec: TriggerSpec, reader: LagReader, now: Instant) -> Self {
        let policy: Box<dyn Policy> = match &spec.policy {
            PolicySpec::Keda(p) => Box::new(KedaPolicy::new(p.clone())),
            PolicySpec::Rate(p) => Box::new(RatePolicy::new(p.clone())),
        };
        let group_topics = match (&spec.policy, &spec.topic) {
            (PolicySpec::Keda(p), None) => Some(KedaPolicy::new(p.clone())),
            _ => None,
        };
        Self {
            observer: Observer::new(reader, spec.invalid_offset),
            spec,
            policy,
            group_topics,
            last: None,
            used: now,
        }
    }

    /// The evaluation of the last `interval`, or a new one. The interval
    /// counts from when an evaluation ended: reading lag (and the oldest
    /// records' ages) takes a while, and a call KEDA makes right after
    /// another must get the same answer.
    fn evaluate(&mut self, interval: Duration) -> Result<(Evaluation, bool), Status> {
        let now = Instant::now();
        self.used = now;
        if let Some((at, e)) = &self.last {
            if now.saturating_duration_since(*at) < interval {
                return Ok((e.clone(), true));
            }
        }
        if self.spec.topic.is_none() {
            let e = self.evaluate_group_topics()?;
            self.last = Some((Instant::now(), e.clone()));
            return Ok((e, false));
        }
        let rate = matches!(self.spec.policy, PolicySpec::Rate(_));
        let reading = self
            .observer
            .read(rate)
            .map_err(|e| Status::unavailable(format!("reading lag of {}: {e}", self.spec.group)))?;
        if let PolicySpec::Keda(p) = &self.spec.policy {
            crate::keda_trigger::check_partitions(p, &reading.lag)
                .map_err(|e| Status::failed_precondition(format!("scalerMetadata.{e}")))?;
        }
        // The replicas running, as the group tells: never the policy's own
        // last answer, which the HPA may not have applied.
        let current = reading.replicas_seen().unwrap_or(0);
        let decision = self
            .policy
            .decide(reading.at, &reading.observation(current));
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
        };
        self.last = Some((Instant::now(), e.clone()));
        Ok((e, false))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObjectLabel {
    scaled_object: String,
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
}

impl ScalerMetrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("microbatch_scaler");
        r.register(
            "evaluations",
            "Evaluations by outcome: evaluated, cached (reused within the polling interval), error",
            self.evaluations.clone(),
        );
        r.register(
            "scaled_objects",
            "ScaledObjects the scaler holds state for",
            self.scaled_objects.clone(),
        );
        r.register(
            "total_lag",
            "Total lag per ScaledObject",
            self.total_lag.clone(),
        );
        r.register(
            "lag_seconds",
            "Age of the oldest record not committed, in seconds, per ScaledObject (the oldest partition's)",
            self.lag_seconds.clone(),
        );
        r.register(
            "metric_value",
            "The metric value served to KEDA per ScaledObject",
            self.metric_value.clone(),
        );
        r.register(
            "active",
            "Whether the ScaledObject is active (1) or not (0)",
            self.active.clone(),
        );
        r.register(
            "desired_replicas",
            "Replicas the policy asks for per ScaledObject",
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
    }

    fn observe(&self, object: &str, e: &Evaluation) {
        let l = ObjectLabel {
            scaled_object: object.to_string(),
        };
        self.total_lag.get_or_create(&l).set(e.total_lag);
        if let Some(seconds) = e.lag_seconds {
            self.lag_seconds.get_or_create(&l).set(seconds);
        }
        self.metric_value.get_or_create(&l).set(e.metric_value);
        self.active.get_or_create(&l).set(i64::from(e.active));
        self.desired.get_or_create(&l).set(i64::from(e.desired));
        self.current.get_or_create(&l).set(i64::from(e.current));
        self.scale_up_held
            .get_or_create(&l)
            .set(i64::from(e.scale_up_held));
    }

    fn forget(&self, object: &str) {
        let l = ObjectLabel {
            scaled_object: object.to_string(),
        };
        self.total_lag.remove(&l);
        self.lag_seconds.remove(&l);
        self.metric_value.remove(&l);
        self.active.remove(&l);
        self.desired.remove(&l);
        self.current.remove(&l);
        self.scale_up_held.remove(&l);
    }
}

/// How the scaler paces and keeps its state.
#[derive(Debug, Clone, Copy)]
pub struct ScalerConfig {
    /// StreamIsActive re-checks this often.
    pub stream_interval: Duration,
    /// An evaluation is reused for this long.
    pub polling_interval: Duration,
    /// State of a ScaledObject nobody asked about for this long is dropped.
    pub state_ttl: Duration,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        Self {
            stream_interval: Duration::from_millis(defaults::SCALER_STREAM_INTERVAL_MS),
            polling_interval: Duration::from_millis(defaults::SCALER_POLLING_INTERVAL_MS),
            state_ttl: defaults::secs(defaults::SCALER_STATE_TTL_SECONDS),
        }
    }
}

/// The gRPC service: a plain struct, one state per ScaledObject.
pub struct Scaler {
    kafka: KafkaConfig,
    config: ScalerConfig,
    states: Mutex<HashMap<String, Arc<Mutex<TriggerState>>>>,
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
            states: Mutex::new(HashMap::new()),
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

    /// ScaledObjects held now.
    pub fn scaled_objects(&self) -> usize {
        self.states
            .lock()
            .expect("scaler state lock poisoned")
            .len()
    }

    fn key(r: &ScaledObjectRef) -> String {
        format!("{}/{}", r.namespace, r.name)
    }

    fn state(&self, r: &ScaledObjectRef) -> Result<Arc<Mutex<TriggerState>>, Status> {
        let spec = TriggerSpec::from_metadata(&r.scaler_metadata)?;
        let key = Self::key(r);
        let now = Instant::now();
        let mut states = self.states.lock().expect("scaler state lock poisoned");
        // Drop what KEDA stopped asking about (deleted ScaledObjects).
        let ttl = self.config.state_ttl;
        states.retain(|k, s| {
            let keep = *k == key
                || s.try_lock()
                    .map_or(true, |s| now.saturating_duration_since(s.used) < ttl);
            if !keep {
                tracing::info!(scaled_object = %k, "dropping the state of a ScaledObject not asked about");
                self.metrics.forget(k);
            }
            keep
        });
        self.metrics.scaled_objects.set(states.len() as i64);
        if let Some(s) = states.get(&key) {
            let same = s.lock().expect("trigger state lock poisoned").spec == spec;
            if same {
                return Ok(s.clone());
            }
            // An edited ScaledObject starts afresh; its old client goes.
            tracing::info!(scaled_object = %key, "trigger metadata changed; starting afresh");
            states.remove(&key);
        }
        let kafka = cluster_for(&self.kafka, spec.bootstrap_servers.as_deref())?;
        let topic = spec.topic.as_deref().unwrap_or_default();
        let mut reader = LagReader::new(&kafka, &spec.group, topic, Duration::from_secs(10))
            .map_err(|e| Status::unavailable(format!("kafka: {e}")))?;
        if spec.topic.is_some() {
            // One record per partition with lag, for microbatch_scaler_lag_seconds.
            reader = reader.with_record_ages();
        }
        let state = Arc::new(Mutex::new(TriggerState::new(spec, reader, now)));
        states.insert(key, state.clone());
        self.metrics.scaled_objects.set(states.len() as i64);
        Ok(state)
    }

    /// Evaluates a ScaledObject (or reuses its evaluation of the polling
    /// interval).
    pub async fn evaluate(self: &Arc<Self>, r: &ScaledObjectRef) -> Result<Evaluation, Status> {
        let state = self.state(r)?;
        let interval = self.config.polling_interval;
        let this = self.clone();
        let key = Self::key(r);
        tokio::task::spawn_blocking(move || {
            let result = state
                .lock()
                .expect("trigger state lock poisoned")
                .evaluate(interval);
            let outcome = match &result {
                Ok((e, cached)) => {
                    this.metrics.observe(&key, e);
                    if *cached {
                        "cached"
                    } else {
                        "evaluated"
                    }
                }
                Err(_) => "error",
            };
            this.metrics
                .evaluations
                .get_or_create(&OutcomeLabel { outcome })
                .inc();
            result.map(|(e, _)| e)
        })
        .await
        .map_err(|e| Status::internal(format!("evaluation task failed: {e}")))?
    }
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
    let has_credentials = own.password.is_some()
        || own
            .properties
            .iter()
            .any(|(k, _)| microbatch_kafka::config::is_secret_property(k));
    if has_credentials {
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
        self.state(&object)?;
        tracing::debug!(scaled_object = %object.name, namespace = %object.namespace, "StreamIsActive");
        let scaler = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<bool> = None;
            loop {
                let item = scaler.evaluate(&object).await.map(|e| e.active);
                let changed = match &item {
                    Ok(active) => last != Some(*active),
                    Err(_) => true,
                };
                if changed {
                    if let Ok(active) = &item {
                        tracing::debug!(scaled_object = %object.name, active = *active, "StreamIsActive: pushed");
                        last = Some(*active);
                    }
                    let message = item.map(|result| IsActiveResponse { result });
                    if tx.send(message).await.is_err() {
                        return; // the client went away
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
        let spec = TriggerSpec::from_metadata(&request.get_ref().scaler_metadata)?;
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
        tracing::debug!(metric = %e.metric_name, value = e.metric_value, lag = e.total_lag, "GetMetrics");
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
    fn state_is_replaced_on_edit_and_dropped_once_not_asked_about() {
        // No broker is needed: a lag reader connects only when it reads.
        let scaler = Scaler::new(
            KafkaConfig::plaintext("127.0.0.1:1"),
            ScalerConfig {
                state_ttl: Duration::from_millis(200),
                ..ScalerConfig::default()
            },
        );
        let a = object("a", &[("topic", "t"), ("consumerGroup", "g")]);
        let first = scaler.state(&a).unwrap();
        assert!(
            Arc::ptr_eq(&first, &scaler.state(&a).unwrap()),
            "kept while unchanged"
        );
        let edited = object(
            "a",
            &[
                ("topic", "t"),
                ("consumerGroup", "g"),
                ("lagThreshold", "5"),
            ],
        );
        let second = scaler.state(&edited).unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "an edit starts afresh");
        assert_eq!(
            scaler.scaled_objects(),
            1,
            "the edited object's old state is gone"
        );
        assert_eq!(
            Arc::strong_count(&first),
            1,
            "and nothing but this test holds it"
        );
        drop(second);
        std::thread::sleep(Duration::from_millis(250));
        scaler
            .state(&object("b", &[("topic", "t"), ("consumerGroup", "g")]))
            .unwrap();
        assert_eq!(
            scaler.scaled_objects(),
            1,
            "a, not asked about for the TTL, is dropped"
        );
        assert!(scaler
            .encode_metrics()
            .contains("microbatch_scaler_scaled_objects 1"));
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
