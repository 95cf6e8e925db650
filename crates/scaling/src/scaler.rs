//! `microbatch scaler`: KEDA's external scaler (`externalscaler.ExternalScaler`)
//! serving our policies.
//!
//! The trigger's metadata names the group, topic and policy with its
//! parameters; Kafka credentials come from the scaler's own configuration,
//! never from metadata. Metric and target are chosen so that the HPA's
//! AverageValue arithmetic (desired = ceil(metric / target)) lands on the
//! policy's answer:
//!
//! - `keda`: metric = KEDA's capped total lag, target = `lagThreshold`, so the
//!   HPA does exactly what KEDA's own kafka trigger would make it do;
//! - `rate`: metric = the replicas the rate policy wants, target = 1.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use microbatch_core::config::KafkaConfig;
use tonic::{Request, Response, Status};

use crate::lag::{GroupLag, InvalidOffsetPolicy, LagReader, RateTracker};
use crate::policy::{KedaParams, KedaPolicy, RateParams, RatePolicy};

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
    topic: String,
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
        let topic = get(meta, "topic")
            .ok_or_else(|| Status::invalid_argument("scalerMetadata.topic is required"))?
            .to_string();
        let group = get(meta, "consumerGroup")
            .ok_or_else(|| Status::invalid_argument("scalerMetadata.consumerGroup is required"))?
            .to_string();
        for secret in ["password", "sasl", "username", "tls"] {
            if meta.contains_key(secret) {
                return Err(Status::invalid_argument(format!(
                    "scalerMetadata.{secret}: credentials belong in the scaler's own environment, not in trigger metadata"
                )));
            }
        }
        let latest = match get(meta, "offsetResetPolicy").unwrap_or("latest") {
            "latest" => true,
            "earliest" => false,
            other => {
                return Err(Status::invalid_argument(format!(
                    "scalerMetadata.offsetResetPolicy: expected latest or earliest, got {other:?}"
                )))
            }
        };
        let scale_to_zero = parse(meta, "scaleToZeroOnInvalidOffset", false)?;
        let invalid_offset = if latest {
            InvalidOffsetPolicy::Latest { scale_to_zero }
        } else {
            InvalidOffsetPolicy::Earliest
        };
        let activation_lag_threshold = parse(meta, "activationLagThreshold", 0i64)?;
        let min_replicas = parse(meta, "minReplicas", 1u32)?;
        let max_replicas = parse(meta, "maxReplicas", 100u32)?;
        let policy = match get(meta, "policy").unwrap_or("keda") {
            "keda" => {
                let lag_threshold = parse(meta, "lagThreshold", 10i64)?;
                if lag_threshold < 1 {
                    return Err(Status::invalid_argument(
                        "scalerMetadata.lagThreshold must be at least 1",
                    ));
                }
                PolicySpec::Keda(KedaParams {
                    lag_threshold,
                    activation_lag_threshold,
                    allow_idle_consumers: parse(meta, "allowIdleConsumers", false)?,
                    limit_to_partitions_with_lag: parse(meta, "limitToPartitionsWithLag", false)?,
                    exclude_persistent_lag: parse(meta, "excludePersistentLag", false)?,
                    offset_reset_latest: latest,
                    scale_to_zero_on_invalid_offset: scale_to_zero,
                    min_replicas,
                    max_replicas,
                    ..KedaParams::default()
                })
            }
            "rate" => {
                let target = parse(meta, "targetDrainSeconds", 30u64)?;
                if target == 0 {
                    return Err(Status::invalid_argument(
                        "scalerMetadata.targetDrainSeconds must be at least 1",
                    ));
                }
                PolicySpec::Rate(RateParams {
                    target_drain: Duration::from_secs(target),
                    min_replicas,
                    max_replicas,
                    slots_per_partition: parse(meta, "slotsPerPartition", 1u32)?.max(1),
                    slots_per_replica: parse(meta, "slotsPerReplica", 1u32)?.max(1),
                    initial_rate_per_replica: parse(meta, "ratePerReplica", 100.0f64)?,
                    // The HPA keeps its own scale-down window.
                    scale_down_stabilization: Duration::ZERO,
                    tolerance: 0.0,
                })
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "scalerMetadata.policy: expected keda or rate, got {other:?}"
                )))
            }
        };
        Ok(Self {
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
        let raw = format!("microbatch-{policy}-{}-{}", self.topic, self.group);
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

enum PolicyState {
    Keda(KedaPolicy),
    Rate(RatePolicy, RateTracker, u32),
}

/// What the scaler keeps per ScaledObject between calls.
struct TriggerState {
    spec: TriggerSpec,
    reader: LagReader,
    policy: PolicyState,
}

/// One evaluation for a trigger.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub metric_name: String,
    pub metric_value: i64,
    pub target: i64,
    pub active: bool,
    pub total_lag: i64,
}

impl TriggerState {
    fn evaluate(&mut self) -> Result<Evaluation, Status> {
        let lag: GroupLag = self
            .reader
            .read(self.spec.invalid_offset)
            .map_err(|e| Status::unavailable(format!("reading lag of {}: {e}", self.spec.group)))?;
        let (metric_value, active) = match &mut self.policy {
            PolicyState::Keda(k) => {
                let (metric, with_persistent) = k.total_lag(&lag);
                (metric, with_persistent > self.spec.activation_lag_threshold)
            }
            PolicyState::Rate(r, rates, last_desired) => {
                let now = Instant::now();
                let measured = rates.observe(now, &lag);
                let current = self.reader.members().unwrap_or(*last_desired as usize) as u32;
                r.observe(now, measured.processed_per_sec, current, lag.total_lag);
                let decision = r.evaluate(now, &lag, measured.arrival_per_sec, current);
                *last_desired = decision.desired;
                (
                    i64::from(decision.desired),
                    lag.total_lag > self.spec.activation_lag_threshold,
                )
            }
        };
        Ok(Evaluation {
            metric_name: self.spec.metric_name(),
            metric_value,
            target: self.spec.target(),
            active,
            total_lag: lag.total_lag,
        })
    }
}

/// The gRPC service: a plain struct, one state per ScaledObject.
pub struct Scaler {
    kafka: KafkaConfig,
    states: Mutex<HashMap<String, Arc<Mutex<TriggerState>>>>,
    stream_interval: Duration,
}

impl Scaler {
    pub fn new(kafka: KafkaConfig, stream_interval: Duration) -> Self {
        Self {
            kafka,
            states: Mutex::new(HashMap::new()),
            stream_interval,
        }
    }

    fn state(&self, r: &ScaledObjectRef) -> Result<Arc<Mutex<TriggerState>>, Status> {
        let spec = TriggerSpec::from_metadata(&r.scaler_metadata)?;
        let sorted: BTreeMap<_, _> = r.scaler_metadata.iter().collect();
        let key = format!("{}/{}/{sorted:?}", r.namespace, r.name);
        let mut states = self.states.lock().expect("scaler state lock poisoned");
        if let Some(s) = states.get(&key) {
            return Ok(s.clone());
        }
        let reader = LagReader::new(
            &self.kafka,
            &spec.group,
            &spec.topic,
            Duration::from_secs(10),
        )
        .map_err(|e| Status::unavailable(format!("kafka: {e}")))?;
        let policy = match &spec.policy {
            PolicySpec::Keda(p) => PolicyState::Keda(KedaPolicy::new(p.clone())),
            PolicySpec::Rate(p) => PolicyState::Rate(
                RatePolicy::new(p.clone()),
                RateTracker::default(),
                p.min_replicas,
            ),
        };
        let state = Arc::new(Mutex::new(TriggerState {
            spec,
            reader,
            policy,
        }));
        states.insert(key, state.clone());
        Ok(state)
    }

    async fn evaluate(&self, r: &ScaledObjectRef) -> Result<Evaluation, Status> {
        let state = self.state(r)?;
        tokio::task::spawn_blocking(move || {
            state
                .lock()
                .expect("trigger state lock poisoned")
                .evaluate()
        })
        .await
        .map_err(|e| Status::internal(format!("evaluation task failed: {e}")))?
    }
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
                    _ = tokio::time::sleep(scaler.stream_interval) => {}
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

    #[test]
    fn metadata_is_validated_and_names_the_key() {
        let err = TriggerSpec::from_metadata(&meta(&[("consumerGroup", "g")])).unwrap_err();
        assert!(err.message().contains("topic"));
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
}
