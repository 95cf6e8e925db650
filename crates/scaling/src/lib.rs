//! microbatch-scaling: consumer-group lag and what to do about it.
//!
//! # Layout
//! - [`lag`]: lag per partition (high − max(committed, low)), totals, rates.
//! - [`keda_trigger`]: the kafka trigger options KEDA accepts, and their
//!   combinations, read from metadata or flags.
//! - [`policy`]: the `keda` policy (KEDA's kafka scaler and HPA arithmetic)
//!   and the `rate` policy (time to drain).
//! - [`scaler`]: KEDA's external scaler gRPC service serving those policies.
//! - [`supervisor`]: the single-machine autoscaler that runs `microbatch run`
//!   children and scales them on lag.

pub mod keda_trigger;
pub mod lag;
pub mod policy;
pub mod scaler;
pub mod supervisor;
