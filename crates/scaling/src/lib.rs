//! microbatch-scaling: consumer-group lag and what to do about it.
//!
//! # Layout
//! - [`defaults`]: every scaling default, once.
//! - [`lag`]: lag per partition (high − max(committed, low)), totals, rates.
//! - [`keda_trigger`]: the kafka trigger options KEDA accepts, and their
//!   combinations, read from metadata or flags.
//! - [`capacity`]: the workers' capacity reports, read from commit metadata.
//! - [`observe`]: one look at a group (lag, rates, capacity, members) for
//!   every policy user.
//! - [`share_lag`]: a share group's backlog read as lag, with no partition
//!   cap.
//! - [`watermarks`]: every partition's watermarks in one request each.
//! - [`policy`]: the `keda` policy (KEDA's kafka scaler and HPA arithmetic)
//!   and the `rate` policy (time to drain, capacity from the workers), behind
//!   one `Policy::decide`.
//! - [`sim`]: the scaling simulator: policies, workers and the HPA on a
//!   virtual clock.
//! - [`scaler`]: KEDA's external scaler gRPC service serving those policies.
//! - [`supervisor`]: the single-machine autoscaler that runs `microbatch run`
//!   children and scales them on lag.

pub mod capacity;
pub mod defaults;
pub mod keda_trigger;
pub mod lag;
pub mod observe;
pub mod policy;
pub mod scaler;
pub mod share_lag;
pub mod sim;
pub mod supervisor;
pub mod watermarks;
