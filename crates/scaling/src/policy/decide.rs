//! The one interface every caller decides through: `supervise`, `scaler`,
//! `lag --policy` and the simulator hand a [`Policy`] the same
//! [`Observation`] and apply the [`Decision`] it returns.

use std::time::Instant;

use super::{Decision, KedaPolicy};
use crate::capacity::WorkerCapacity;
use crate::lag::{GroupLag, Rates};

/// What a policy sees at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub lag: &'a GroupLag,
    /// Time-weighted arrival and committed rates.
    pub rates: Rates,
    /// What the workers' commit metadata says, when any worker reports.
    pub capacity: Option<&'a WorkerCapacity>,
    /// Replicas running now: the supervisor's children, or the group's
    /// members (else the workers reporting); never the policy's last answer.
    pub current: u32,
}

/// A scaling policy: pure, fed observations and the time.
pub trait Policy: Send {
    /// `keda` or `rate`.
    fn name(&self) -> &'static str;
    /// How many replicas to run now.
    fn decide(&mut self, now: Instant, observation: &Observation<'_>) -> Decision;
    /// Records/s one replica is taken to handle, for policies that use it.
    fn rate_per_replica(&self) -> Option<f64> {
        None
    }
}

impl Policy for KedaPolicy {
    fn name(&self) -> &'static str {
        "keda"
    }

    fn decide(&mut self, now: Instant, observation: &Observation<'_>) -> Decision {
        self.evaluate(now, observation.lag, observation.current)
    }
}
