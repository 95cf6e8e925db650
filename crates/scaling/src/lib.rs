//! microbatch-scaling: consumer-group lag and what to do about it.
//!
//! # Layout
//! - [`lag`]: lag per partition (high − max(committed, low)), totals, rates.
//! - [`policy`]: the `keda` policy (KEDA's kafka scaler and HPA arithmetic)
//!   and the `rate` policy (time to drain).
//! - [`scaler`]: KEDA's external scaler gRPC service serving those policies.
//! - [`supervisor`]: the single-machine autoscaler that runs `microbatch run`
//!   children and scales them on lag.

pub mod capacity;
pub mod lag;
pub mod observe;
pub mod policy;
pub mod scaler;
pub mod sim;
pub mod supervisor;
pub mod watermarks;
