//! Every scaling default, once. The policies' `Default` impls, the flags of
//! `lag`, `supervise` and `scaler` (clap shows these values in `--help`) and
//! the external scaler's trigger metadata all read them; nothing repeats a
//! value.

use std::time::Duration;

/// keda: lag per replica (KEDA `lagThreshold`, KEDA's default).
pub const LAG_THRESHOLD: i64 = 10;
/// keda: active above this lag (KEDA `activationLagThreshold`).
pub const ACTIVATION_LAG_THRESHOLD: i64 = 0;
/// rate: drain the lag within this many seconds.
pub const TARGET_DRAIN_SECONDS: u64 = 30;
/// rate: records/s one replica is assumed to do until one is measured.
pub const RATE_PER_REPLICA: f64 = 100.0;
/// rate: processing slots per partition and per replica (`--ordering
/// partition`, one slot).
pub const SLOTS_PER_PARTITION: u32 = 1;
pub const SLOTS_PER_REPLICA: u32 = 1;
/// Fewest and most replicas, for both policies and for the external scaler
/// when the trigger metadata does not say (the kit's ScaledObjects say 1–24).
pub const MIN_REPLICAS: u32 = 1;
pub const MAX_REPLICAS: u32 = 24;
/// Scale-down stabilization window (the HPA's default).
pub const SCALE_DOWN_SECONDS: u64 = 300;
/// keda: seconds without activity before scaling to zero with min 0 (KEDA
/// `cooldownPeriod`'s default).
pub const COOLDOWN_SECONDS: u64 = 300;

/// `supervise`: how often to read lag and decide.
pub const SUPERVISE_POLLING_INTERVAL_MS: u64 = 1000;
/// `supervise`: port of its /healthz and /metrics.
pub const SUPERVISE_HTTP_PORT: u16 = 9100;
/// `lag --watch`: refresh interval.
pub const LAG_WATCH_INTERVAL_MS: u64 = 2000;

/// `scaler`: the gRPC port KEDA connects to (the kit's Service).
pub const SCALER_GRPC_PORT: u16 = 9090;
/// `scaler`: /healthz and /metrics.
pub const SCALER_HTTP_PORT: u16 = 8080;
pub const SCALER_HOST: &str = "0.0.0.0";
/// `scaler`: StreamIsActive re-checks this often.
pub const SCALER_STREAM_INTERVAL_MS: u64 = 5000;
/// `scaler`: an evaluation is reused for this long (KEDA asks IsActive and
/// GetMetrics a few ms apart).
pub const SCALER_POLLING_INTERVAL_MS: u64 = 5000;
/// `scaler`: state of a ScaledObject nobody asked about for this long is dropped.
pub const SCALER_STATE_TTL_SECONDS: u64 = 600;
/// `scaler`: at most this many triggers (each with a Kafka client) held.
pub const SCALER_MAX_TRIGGERS: usize = 256;

pub(crate) const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
