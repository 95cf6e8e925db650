//! Scaling policies: how many replicas the lag asks for.
//!
//! - [`KedaPolicy`] reproduces KEDA's kafka scaler and the HPA's arithmetic,
//!   quirks included, so a user can preview what KEDA will do.
//! - [`RatePolicy`] scales on time to drain: replicas =
//!   ceil((arrival + lag / target_drain) / capacity per replica).
//! - [`Policy`] is the one interface callers decide through.
//!
//! Both are pure: they take a lag reading and the time, and keep only the
//! history their windows need, so they are tested with made-up clocks.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::defaults;
use crate::lag::{GroupLag, PartitionLag};

mod decide;
pub mod outage;
mod rate;
pub use decide::{Observation, Policy};
pub use rate::{CapacitySource, RateParams, RatePolicy};

/// The HPA's default tolerance: no change while usage is within 10% of target.
pub const HPA_TOLERANCE: f64 = 0.1;
/// The HPA's scale-up period: at most double or +4 pods per 15 s.
pub const HPA_SCALE_UP_PERIOD: Duration = Duration::from_secs(15);

/// A policy's answer at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub desired: u32,
    /// What KEDA would report as the metric (the lag it scales on).
    pub metric_value: i64,
    /// Whether the scaler is active (KEDA's activation).
    pub active: bool,
    /// A short account of how `desired` came about.
    pub reason: String,
    /// Scale-ups held: replicas run and records wait, but no committed
    /// offset has moved for a while (see [`outage`]).
    pub scale_up_held: bool,
    /// The term that decided `desired` last (the reason tells the rest).
    pub bound_by: Bound,
}

/// Which term of a policy bound its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// `rate`: keeping up with the records arriving.
    Arrivals,
    /// `rate`: draining the lag within `--target-drain-seconds`.
    DrainTarget,
    /// `rate`: records older than `--max-lag-seconds`.
    MaxLagSeconds,
    /// `keda`: the lag over `lagThreshold`.
    LagThreshold,
    /// Nothing waits or arrives.
    Idle,
    /// KEDA's activation owns 0 ↔ 1 (activation threshold, cooldown).
    Activation,
    /// Replicas past the partition count would get no partition.
    PartitionCap,
    /// `rate` on its guess alone: the slots bound it.
    GuessSlots,
    /// `rate` on its guess alone: at most double per 15 s.
    GuessStep,
    MaxReplicas,
    MinReplicas,
    /// An outage: no committed offset moved while records wait.
    OutageHold,
    /// Perhaps an outage's first seconds: waits for the next commit.
    OutageWait,
    /// A change within the tolerance is not made.
    Tolerance,
    /// The scale-down window keeps a higher recent recommendation.
    ScaleDownWindow,
    /// The HPA's scale-up limit.
    HpaScaleUpLimit,
}

impl Bound {
    pub fn as_str(self) -> &'static str {
        match self {
            Bound::Arrivals => "arrivals",
            Bound::DrainTarget => "drain_target",
            Bound::MaxLagSeconds => "max_lag_seconds",
            Bound::LagThreshold => "lag_threshold",
            Bound::Idle => "idle",
            Bound::Activation => "activation",
            Bound::PartitionCap => "partition_cap",
            Bound::GuessSlots => "guess_slots",
            Bound::GuessStep => "guess_step",
            Bound::MaxReplicas => "max_replicas",
            Bound::MinReplicas => "min_replicas",
            Bound::OutageHold => "outage_hold",
            Bound::OutageWait => "outage_wait",
            Bound::Tolerance => "tolerance",
            Bound::ScaleDownWindow => "scale_down_window",
            Bound::HpaScaleUpLimit => "hpa_scale_up_limit",
        }
    }

    pub const ALL: [Bound; 16] = [
        Bound::Arrivals,
        Bound::DrainTarget,
        Bound::MaxLagSeconds,
        Bound::LagThreshold,
        Bound::Idle,
        Bound::Activation,
        Bound::PartitionCap,
        Bound::GuessSlots,
        Bound::GuessStep,
        Bound::MaxReplicas,
        Bound::MinReplicas,
        Bound::OutageHold,
        Bound::OutageWait,
        Bound::Tolerance,
        Bound::ScaleDownWindow,
        Bound::HpaScaleUpLimit,
    ];
}

/// The HPA's scale-down stabilization: a count below the current one is
/// applied only once every recommendation within the window agrees, so the
/// highest recommendation in the window wins.
#[derive(Debug, Default)]
struct ScaleDownWindow {
    recommendations: VecDeque<(Instant, u32)>,
}

impl ScaleDownWindow {
    /// Records `desired`; returns the count to apply and whether the window
    /// held it above `desired`.
    fn apply(&mut self, now: Instant, window: Duration, desired: u32, current: u32) -> (u32, bool) {
        self.recommendations.push_back((now, desired));
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= window)
        {
            self.recommendations.pop_front();
        }
        if desired >= current {
            return (desired, false);
        }
        let highest = self
            .recommendations
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(desired);
        if highest > desired {
            (highest.min(current), true)
        } else {
            (desired, false)
        }
    }

    fn clear(&mut self) {
        self.recommendations.clear();
    }
}

/// Which KEDA release's kafka scaler the `keda` policy reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KedaVersion {
    /// v2.20: a partition without a commit counts its whole high watermark
    /// under `earliest`, records retention deleted included.
    V2_20,
    /// v2.21: such a partition counts the records retained, high − low.
    #[default]
    V2_21,
}

/// Which of the HPA's two scaling algorithms KEDA's HPA runs: the
/// Kubernetes controller picks by whether the HPA has a `behavior`, which
/// KEDA copies from the ScaledObject's
/// `advanced.horizontalPodAutoscalerConfig.behavior`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HpaAlgorithm {
    /// No `behavior` (what most ScaledObjects have): a scale-up goes to at
    /// most max(2 × current, 4), from the count now, with no memory of
    /// earlier steps.
    #[default]
    WithoutBehavior,
    /// A `behavior` spelled out, even one restating the defaults: at most
    /// max(+100%, +4 pods) per 15 s period, counted from the replicas at the
    /// period's start (scale-ups within it taken off, scale-downs added back).
    WithBehavior,
}

/// KEDA kafka trigger metadata and the ScaledObject's replica bounds.
///
/// The rules for which combinations KEDA accepts are in
/// [`crate::keda_trigger`], which also reads them from trigger metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct KedaParams {
    pub lag_threshold: i64,
    pub activation_lag_threshold: i64,
    pub allow_idle_consumers: bool,
    pub limit_to_partitions_with_lag: bool,
    /// `ensureEvenDistributionOfPartitions`: the metric is raised to
    /// lagThreshold × the next factor of the partition count, so each
    /// replica gets as many partitions as the others.
    pub ensure_even_distribution_of_partitions: bool,
    /// `partitionLimitation`: only these partitions count (None: all).
    pub partition_limitation: Option<Vec<i32>>,
    pub exclude_persistent_lag: bool,
    /// `offsetResetPolicy: latest` (else earliest).
    pub offset_reset_latest: bool,
    pub scale_to_zero_on_invalid_offset: bool,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// HPA `behavior.scaleDown.stabilizationWindowSeconds` (default 300 s).
    pub scale_down_stabilization: Duration,
    /// KEDA `cooldownPeriod`: only for going to zero (default 300 s).
    pub cooldown: Duration,
    pub version: KedaVersion,
    pub hpa: HpaAlgorithm,
    /// The HPA's tolerance (Kubernetes 1.33+ takes one per direction from
    /// the behavior).
    pub tolerance: HpaTolerance,
}

impl Default for KedaParams {
    fn default() -> Self {
        Self {
            lag_threshold: defaults::LAG_THRESHOLD,
            activation_lag_threshold: defaults::ACTIVATION_LAG_THRESHOLD,
            allow_idle_consumers: false,
            limit_to_partitions_with_lag: false,
            ensure_even_distribution_of_partitions: false,
            partition_limitation: None,
            exclude_persistent_lag: false,
            offset_reset_latest: true,
            scale_to_zero_on_invalid_offset: false,
            min_replicas: defaults::MIN_REPLICAS,
            max_replicas: defaults::MAX_REPLICAS,
            scale_down_stabilization: defaults::secs(defaults::SCALE_DOWN_SECONDS),
            cooldown: defaults::secs(defaults::COOLDOWN_SECONDS),
            version: KedaVersion::default(),
            hpa: HpaAlgorithm::default(),
            tolerance: HpaTolerance::default(),
        }
    }
}

/// KEDA's kafka scaler plus the HPA controller, step by step.
#[derive(Debug)]
pub struct KedaPolicy {
    pub params: KedaParams,
    /// Previous committed offset per topic and partition (for
    /// `excludePersistentLag`).
    previous_offsets: HashMap<(String, i32), i64>,
    hpa: Hpa,
    last_active: Option<Instant>,
    /// Whether the last total was changed by the partition rules (the cap
    /// of `allowIdleConsumers: false`, or `ensureEvenDistribution…`).
    partition_rule_applied: bool,
}

/// The HPA controller between a scaler's metric and the Deployment, as
/// Kubernetes runs it: the tolerance, the replica bounds, the scale-down
/// stabilization window and the scale-up limit of its algorithm. KEDA's
/// kafka trigger reaches the Deployment through it, and so does any
/// policy `microbatch scaler` serves ([`ThroughHpa`]).
#[derive(Debug, Default)]
pub struct Hpa {
    scale_down: ScaleDownWindow,
    /// Replicas added (positive) or removed (negative) within the last
    /// period, as observed in the current count (what was applied, not
    /// what was asked for).
    scale_events: VecDeque<(Instant, i64)>,
    last_current: Option<u32>,
    /// When the last sync decided: a change seen at the next one was made
    /// then, and Kubernetes stamps its scale event then.
    last_step_at: Option<Instant>,
}

/// What a ScaledObject sets for its HPA.
#[derive(Debug, Clone, Copy)]
pub struct HpaSettings {
    pub algorithm: HpaAlgorithm,
    pub min: u32,
    pub max: u32,
    /// `behavior.scaleDown.stabilizationWindowSeconds`.
    pub stabilization: Duration,
    pub tolerance: HpaTolerance,
}

/// What one HPA sync made of a metric.
#[derive(Debug, Clone, PartialEq)]
pub struct HpaStep {
    /// ceil(metric ÷ target), or the count now within the tolerance.
    pub raw: u32,
    pub usage_ratio: f64,
    pub desired: u32,
    /// What bound `desired` besides `raw` and the bounds, for a reason:
    /// "; held at … by the scale-down window", "; limited to … by …".
    pub notes: String,
    /// The HPA's own term that decided `desired`, if one did.
    pub bound: Option<Bound>,
}

impl Hpa {
    /// The replicas running at `now`; a change from the last count (away
    /// from or to zero excepted) is a scale event of the period.
    pub fn saw(&mut self, now: Instant, current: u32) {
        if let Some(previous) = self.last_current.replace(current) {
            // From or to zero the replicas are KEDA's (activation, or
            // the Deployment's own start), not a scale event the HPA
            // recorded: its scale-up limit counts from the replicas it found.
            if previous > 0 && current > 0 && current != previous {
                // Stamped when the sync that made it decided (Kubernetes'
                // storeScaleEvent), not when it is seen: a 15 s period
                // counted from the sighting would halve the scale-up rate.
                let at = self.last_step_at.unwrap_or(now);
                self.scale_events
                    .push_back((at, i64::from(current) - i64::from(previous)));
            }
        }
    }

    /// KEDA took over (to or at zero): the window's recommendations go.
    pub fn forget_recommendations(&mut self) {
        self.scale_down.clear();
    }

    /// One sync: `metric` against `target` per replica (AverageValue) with
    /// `current` running, within `min..=max`.
    pub fn step(
        &mut self,
        now: Instant,
        (metric, target): (i64, i64),
        current: u32,
        settings: HpaSettings,
    ) -> HpaStep {
        let HpaSettings {
            algorithm,
            min,
            max,
            stabilization,
            tolerance,
        } = settings;
        self.last_step_at = Some(now);
        let target = target.max(1) as f64;
        let usage_ratio = metric as f64 / (target * f64::from(current.max(1)));
        let wanted = (metric as f64 / target).ceil().max(0.0) as u32;
        let mut bound = None;
        let raw = if tolerance.within(usage_ratio) {
            if wanted != current {
                bound = Some(Bound::Tolerance);
            }
            current
        } else {
            wanted
        };
        let mut desired = raw.clamp(min, max.max(min));
        if desired > raw {
            bound = Some(Bound::MinReplicas);
        } else if desired < raw {
            bound = Some(Bound::MaxReplicas);
        }
        let mut notes = String::new();
        let (held, stabilized) = self.scale_down.apply(now, stabilization, desired, current);
        if stabilized {
            notes.push_str(&format!("; held at {held} by the scale-down window"));
            bound = Some(Bound::ScaleDownWindow);
        }
        desired = held;
        while self
            .scale_events
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= HPA_SCALE_UP_PERIOD)
        {
            self.scale_events.pop_front();
        }
        if desired > current {
            let limit = match algorithm {
                // calculateScaleUpLimit: from the count now.
                HpaAlgorithm::WithoutBehavior => (current * 2).max(4),
                // calculateScaleUpLimitWithScalingRules: from the count at
                // the period's start, scale-ups taken off and scale-downs
                // added back (10 -> 4 within the period: 20 allowed, not 8).
                HpaAlgorithm::WithBehavior => {
                    let changed: i64 = self.scale_events.iter().map(|(_, n)| *n).sum();
                    let base = (i64::from(current) - changed).max(0) as u32;
                    (base * 2).max(base + 4)
                }
            };
            if desired > limit {
                notes.push_str(&format!(
                    "; limited to {limit} by the HPA scale-up policy ({})",
                    match algorithm {
                        HpaAlgorithm::WithoutBehavior => "no behavior: max(2 x current, 4)",
                        HpaAlgorithm::WithBehavior => "behavior: max(+100%, +4) per 15 s",
                    }
                ));
                desired = limit;
                bound = Some(Bound::HpaScaleUpLimit);
            }
        }
        HpaStep {
            raw,
            usage_ratio,
            desired,
            notes,
            bound,
        }
    }
}

impl KedaPolicy {
    pub fn new(params: KedaParams) -> Self {
        Self {
            params,
            previous_offsets: HashMap::new(),
            hpa: Hpa::default(),
            last_active: None,
            partition_rule_applied: false,
        }
    }

    /// Lag as KEDA v2.21 computes it: high − committed, with no regard for
    /// the low watermark (a quirk: retention-deleted records count). A
    /// partition with no commit counts 0 with `scaleToZeroOnInvalidOffset`
    /// (under both reset policies, as KEDA has since v2.15), else 1 under `latest` and
    /// the retained records, high − low, under `earliest`.
    fn partition_lag(&mut self, topic: &str, p: &PartitionLag) -> (i64, i64) {
        let params = &self.params;
        let Some(c) = p.committed else {
            if params.scale_to_zero_on_invalid_offset {
                return (0, 0);
            }
            let v = if params.offset_reset_latest {
                1
            } else if params.version == KedaVersion::V2_20 {
                p.high
            } else {
                (p.high - p.low).max(0)
            };
            return (v, v);
        };
        let lag = p.high - c;
        if params.exclude_persistent_lag {
            let previous = self
                .previous_offsets
                .insert((topic.to_string(), p.partition), c);
            // KEDA leaves an offset that did not move out whatever its lag,
            // a negative one (a commit past the end) included.
            if previous == Some(c) {
                return (0, lag);
            }
        }
        (lag, lag)
    }

    /// KEDA's `getTotalLag`: (lag used for the metric, lag with persistent).
    pub fn total_lag(&mut self, lag: &GroupLag) -> (i64, i64) {
        self.total_lag_of(std::slice::from_ref(lag))
    }

    /// [`Self::total_lag`] over several topics, as a trigger without a topic
    /// counts every topic the group has committed offsets for.
    pub fn total_lag_of(&mut self, topics: &[GroupLag]) -> (i64, i64) {
        let mut total = 0;
        let mut with_persistent = 0;
        let mut partitions_with_lag = 0i64;
        let mut partitions = 0i64;
        let all = topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(move |p| (&t.topic, p)));
        for (topic, p) in all {
            if let Some(only) = &self.params.partition_limitation {
                if !only.contains(&p.partition) {
                    continue;
                }
            }
            let (l, lp) = self.partition_lag(topic, p);
            total += l;
            with_persistent += lp;
            partitions += 1;
            if l > 0 {
                partitions_with_lag += 1;
            }
        }
        let params = &self.params;
        let uncapped = total;
        // A share group's members all take from every partition: nothing
        // idles past the partition count, so there is nothing to cap.
        let shared = topics.iter().any(|t| t.shared);
        if !shared
            && (!params.allow_idle_consumers
                || params.limit_to_partitions_with_lag
                || params.ensure_even_distribution_of_partitions)
        {
            if params.ensure_even_distribution_of_partitions {
                total = next_factor_at_or_above(partitions, total, params.lag_threshold)
                    * params.lag_threshold;
            }
            let upper = if params.limit_to_partitions_with_lag {
                partitions_with_lag
            } else {
                partitions
            };
            // Integer division, as in KEDA: the cap bites only when the
            // quotient is strictly above the bound.
            if total / params.lag_threshold > upper {
                total = upper * params.lag_threshold;
            }
        }
        self.partition_rule_applied = total != uncapped;
        // Commits past the end make lag negative; KEDA reports the metric
        // as 0 then (activation still sees the sum).
        (total.max(0), with_persistent)
    }

    /// One evaluation: what KEDA and the HPA would set replicas to, given
    /// the current replica count.
    pub fn evaluate(&mut self, now: Instant, lag: &GroupLag, current: u32) -> Decision {
        self.hpa.saw(now, current);
        let (metric, with_persistent) = self.total_lag(lag);
        let p = self.params.clone();
        let active = with_persistent > p.activation_lag_threshold;
        if active {
            self.last_active = Some(now);
        }
        let hpa_min = p.min_replicas.max(1);
        // KEDA owns 0 <-> 1; the HPA owns 1..max.
        if !active && p.min_replicas == 0 {
            let cooled = self
                .last_active
                .is_none_or(|t| now.duration_since(t) >= p.cooldown);
            if current == 0 || cooled {
                self.hpa.forget_recommendations();
                return Decision {
                    desired: 0,
                    metric_value: metric,
                    active,
                    reason: "inactive: KEDA scales to zero after its cooldown".into(),
                    scale_up_held: false,
                    bound_by: Bound::Activation,
                };
            }
        }
        if current == 0 {
            let desired = if active { hpa_min } else { 0 };
            return Decision {
                desired,
                metric_value: metric,
                active,
                reason: "KEDA activates from zero".into(),
                scale_up_held: false,
                bound_by: Bound::Activation,
            };
        }
        let step = self.hpa.step(
            now,
            (metric, p.lag_threshold),
            current,
            HpaSettings {
                algorithm: p.hpa,
                min: hpa_min,
                max: p.max_replicas,
                stabilization: p.scale_down_stabilization,
                tolerance: p.tolerance,
            },
        );
        let reason = format!(
            "ceil(lag {metric} / lagThreshold {}) = {}, usage ratio {:.2}{}",
            p.lag_threshold, step.raw, step.usage_ratio, step.notes
        );
        Decision {
            desired: step.desired,
            metric_value: metric,
            active,
            reason,
            scale_up_held: false,
            bound_by: step.bound.unwrap_or(if self.partition_rule_applied {
                Bound::PartitionCap
            } else {
                Bound::LagThreshold
            }),
        }
    }
}

/// A policy whose answer reaches the Deployment as `microbatch scaler`'s
/// does: as a metric (its desired count, target 1 per replica) that KEDA
/// hands the HPA, which applies its tolerance, bounds, scale-down window
/// and scale-up limit before anything runs. `supervise` applies answers
/// as they are; the simulator runs both.
pub struct ThroughHpa {
    pub inner: Box<dyn Policy>,
    pub algorithm: HpaAlgorithm,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// The HPA's `behavior.scaleDown.stabilizationWindowSeconds`.
    pub scale_down_stabilization: Duration,
    pub tolerance: HpaTolerance,
    hpa: Hpa,
}

impl ThroughHpa {
    pub fn new(inner: Box<dyn Policy>, algorithm: HpaAlgorithm, bounds: (u32, u32)) -> Self {
        Self {
            inner,
            algorithm,
            min_replicas: bounds.0,
            max_replicas: bounds.1,
            scale_down_stabilization: defaults::secs(defaults::SCALE_DOWN_SECONDS),
            tolerance: HpaTolerance::default(),
            hpa: Hpa::default(),
        }
    }
}

impl Policy for ThroughHpa {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn decide(&mut self, now: Instant, observation: &Observation<'_>) -> Decision {
        let current = observation.current;
        self.hpa.saw(now, current);
        let mut d = self.inner.decide(now, observation);
        if current == 0 || (d.desired == 0 && self.min_replicas == 0) {
            // KEDA's activation owns 0 <-> 1: from zero it starts the
            // HPA's minimum, and to zero it goes when the policy asks none.
            self.hpa.forget_recommendations();
            if d.desired > 0 {
                d.desired = self.min_replicas.max(1);
                d.bound_by = Bound::Activation;
            }
            return d;
        }
        let step = self.hpa.step(
            now,
            (i64::from(d.desired), 1),
            current,
            HpaSettings {
                algorithm: self.algorithm,
                min: self.min_replicas.max(1),
                max: self.max_replicas,
                stabilization: self.scale_down_stabilization,
                tolerance: self.tolerance,
            },
        );
        if step.desired != d.desired {
            d.reason.push_str(&format!(
                "; the HPA sets {} (usage ratio {:.2}{}{})",
                step.desired,
                step.usage_ratio,
                if step.raw == current && d.desired != current {
                    ", within its tolerance"
                } else {
                    ""
                },
                step.notes
            ));
        }
        if step.desired != d.desired {
            if let Some(bound) = step.bound {
                d.bound_by = bound;
            }
        }
        d.desired = step.desired;
        d
    }

    fn rate_per_replica(&self) -> Option<f64> {
        self.inner.rate_per_replica()
    }
}

/// The smallest factor f of `partitions` with f × threshold ≥ lag (all of
/// them when none is): how many replicas share the partitions evenly.
fn next_factor_at_or_above(partitions: i64, lag: i64, threshold: i64) -> i64 {
    (1..=partitions)
        .filter(|f| partitions % f == 0)
        .find(|f| f * threshold >= lag)
        .unwrap_or(partitions)
}

/// The HPA keeps the count while the usage ratio is within the tolerance,
/// bounds included: Kubernetes 1.33 compares the ratio with 1 ± tolerance,
/// so a ratio of exactly 1.1 holds (before, |1 − ratio| ≤ 0.1 in floating
/// point scaled at 1.1).
///
/// Kubernetes 1.33+ (`HPAConfigurableTolerance`) takes a tolerance per
/// direction from the HPA's `behavior.scaleUp.tolerance` and
/// `behavior.scaleDown.tolerance`; the cluster's default (0.1) otherwise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HpaTolerance {
    pub scale_up: f64,
    pub scale_down: f64,
}

impl Default for HpaTolerance {
    fn default() -> Self {
        Self {
            scale_up: HPA_TOLERANCE,
            scale_down: HPA_TOLERANCE,
        }
    }
}

impl HpaTolerance {
    pub fn within(&self, usage_ratio: f64) -> bool {
        ((1.0 - self.scale_down)..=(1.0 + self.scale_up)).contains(&usage_ratio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lag::{InvalidOffsetPolicy, PartitionLag};

    fn lag_of(parts: &[(Option<i64>, i64)]) -> GroupLag {
        let ps = parts
            .iter()
            .enumerate()
            .map(|(i, (c, h))| {
                PartitionLag::compute(i as i32, *c, 0, *h, InvalidOffsetPolicy::Earliest)
            })
            .collect();
        GroupLag::new("g", "t", ps)
    }

    fn keda(threshold: i64) -> KedaPolicy {
        KedaPolicy::new(KedaParams {
            lag_threshold: threshold,
            activation_lag_threshold: 1,
            min_replicas: 1,
            max_replicas: 24,
            ..KedaParams::default()
        })
    }

    #[test]
    fn keda_on_a_share_groups_backlog_is_not_capped_by_partitions() {
        // 8 partitions of 3,000 at lagThreshold 100: 240 asked, 24 allowed.
        // A consumer group stops at 8 (allowIdleConsumers false).
        let mut lag = lag_of(&[(Some(0), 3000); 8]);
        let t0 = Instant::now();
        assert_eq!(keda(100).evaluate(t0, &lag, 12).desired, 8);
        lag.shared = true;
        let d = keda(100).evaluate(t0, &lag, 12);
        assert_eq!((d.desired, d.metric_value), (24, 24_000), "{}", d.reason);
    }

    #[test]
    fn keda_table() {
        // (committed/high per partition, current replicas, expected desired)
        struct Case {
            name: &'static str,
            parts: Vec<(Option<i64>, i64)>,
            threshold: i64,
            current: u32,
            want: u32,
            want_metric: i64,
        }
        let cases = vec![
            Case {
                name: "no lag stays at min",
                parts: vec![(Some(10), 10); 8],
                threshold: 3,
                current: 1,
                want: 1,
                want_metric: 0,
            },
            Case {
                name: "ceil of lag over threshold",
                parts: vec![(Some(0), 2), (Some(0), 2), (Some(0), 0)],
                threshold: 3,
                current: 1,
                want: 2,
                want_metric: 4,
            },
            Case {
                name: "capped at partitions",
                parts: vec![(Some(0), 1000); 8],
                threshold: 3,
                current: 8,
                want: 8,
                want_metric: 24,
            },
            // 26 / 3 == 8 in integers: not above 8 partitions, so no cap: 9 replicas.
            Case {
                name: "integer-division quirk passes the cap",
                parts: vec![(Some(0), 13), (Some(0), 13)],
                threshold: 13,
                current: 1,
                want: 2,
                want_metric: 26,
            },
            // 31 / (10 x 3) = 1.03: inside the 10% band, no change.
            Case {
                name: "tolerance band holds",
                parts: vec![(Some(0), 8), (Some(0), 8), (Some(0), 8), (Some(0), 7)],
                threshold: 10,
                current: 3,
                want: 3,
                want_metric: 31,
            },
            Case {
                name: "invalid offset latest counts 1",
                parts: vec![(None, 500), (None, 500)],
                threshold: 1,
                current: 1,
                want: 2,
                want_metric: 2,
            },
        ];
        for c in cases {
            let mut k = keda(c.threshold);
            let d = k.evaluate(Instant::now(), &lag_of(&c.parts), c.current);
            assert_eq!(
                (d.desired, d.metric_value),
                (c.want, c.want_metric),
                "{}: {}",
                c.name,
                d.reason
            );
        }
    }

    #[test]
    fn keda_quirk_9_replicas_on_8_partitions() {
        let mut k = keda(3);
        // total lag 26: 26/3 = 8 (integer), not > 8, so uncapped: ceil(26/3) = 9.
        let mut parts = vec![(Some(0), 3); 8];
        parts[0] = (Some(0), 5);
        let d = k.evaluate(Instant::now(), &lag_of(&parts), 9);
        assert_eq!(d.metric_value, 26);
        assert_eq!(d.desired, 9);
    }

    #[test]
    fn keda_stuck_one_short_of_the_cap() {
        // 20 partitions, threshold 3: metric capped at 60; at 19 replicas the
        // usage ratio 60/57 = 1.05 is inside the tolerance, so it stays at 19.
        let mut k = keda(3);
        k.params.max_replicas = 50;
        let d = k.evaluate(Instant::now(), &lag_of(&vec![(Some(0), 100); 20]), 19);
        assert_eq!(d.desired, 19, "{}", d.reason);
    }

    #[test]
    fn keda_earliest_invalid_offset_counts_retained_records() {
        // KEDA v2.21: high − low, so records retention deleted are no lag.
        let mut k = keda(1);
        k.params.offset_reset_latest = false;
        k.params.allow_idle_consumers = true;
        let mut lag = lag_of(&[(None, 50)]);
        lag.partitions[0].low = 40;
        assert_eq!(k.total_lag(&lag), (10, 10));
        // KEDA v2.20 and before counted the whole high watermark.
        k.params.version = KedaVersion::V2_20;
        assert_eq!(k.total_lag(&lag), (50, 50));
        // scaleToZeroOnInvalidOffset counts 0 under earliest too (KEDA #5689).
        k.params.scale_to_zero_on_invalid_offset = true;
        assert_eq!(k.total_lag(&lag), (0, 0));
    }

    #[test]
    fn keda_commits_past_the_end_report_zero_and_persist_like_any_other() {
        let mut k = keda(1);
        k.params.exclude_persistent_lag = true;
        k.params.allow_idle_consumers = true;
        let lag = lag_of(&[(Some(13), 10), (Some(0), 2)]);
        assert_eq!(k.total_lag(&lag), (0, -1), "-3 + 2: the metric is 0");
        // Second poll, nothing moved: both are left out of the metric.
        assert_eq!(k.total_lag(&lag), (0, -1));
        let lag = lag_of(&[(Some(13), 10), (Some(1), 2)]);
        assert_eq!(k.total_lag(&lag), (1, -2), "the moved partition counts");
    }

    #[test]
    fn keda_committed_partitions_ignore_the_low_watermark() {
        let mut k = keda(1);
        k.params.allow_idle_consumers = true;
        let mut lag = lag_of(&[(Some(10), 50)]);
        lag.partitions[0].low = 40;
        assert_eq!(k.total_lag(&lag).0, 40, "KEDA counts high − committed");
    }

    #[test]
    fn keda_even_distribution_rounds_up_to_a_factor_of_the_partitions() {
        // 12 partitions: factors 1, 2, 3, 4, 6, 12; threshold 10.
        let mut k = keda(10);
        k.params.ensure_even_distribution_of_partitions = true;
        let mut parts = vec![(Some(0), 0); 12];
        parts[0] = (Some(0), 41);
        // 41 needs 5 replicas; 5 does not divide 12, so 6: metric 60.
        assert_eq!(k.total_lag(&lag_of(&parts)).0, 60);
        parts[0] = (Some(0), 0);
        // No lag at all still asks for the first factor, 1 (a KEDA quirk).
        assert_eq!(k.total_lag(&lag_of(&parts)).0, 10);
        parts[0] = (Some(0), 1000);
        assert_eq!(k.total_lag(&lag_of(&parts)).0, 120, "capped at 12");
        // It applies even with allowIdleConsumers.
        k.params.allow_idle_consumers = true;
        assert_eq!(k.total_lag(&lag_of(&parts)).0, 120);
    }

    #[test]
    fn keda_partition_limitation_counts_only_the_listed_partitions() {
        let mut k = keda(1);
        k.params.partition_limitation = Some(vec![1, 2]);
        let lag = lag_of(&[(Some(0), 100), (Some(0), 5), (Some(0), 7), (None, 9)]);
        // Lag 12 from partitions 1 and 2, capped at their count: 2.
        assert_eq!(k.total_lag(&lag), (2, 12));
    }

    #[test]
    fn keda_holds_at_a_usage_ratio_of_exactly_1_1() {
        // Kubernetes >= 1.33 holds within [0.9, 1.1], bounds included:
        // lag 11, threshold 10, 1 replica is a ratio of exactly 1.1.
        let mut k = keda(10);
        let d = k.evaluate(Instant::now(), &lag_of(&[(Some(0), 11), (Some(0), 0)]), 1);
        assert_eq!(d.desired, 1, "{}", d.reason);
        let d = k.evaluate(Instant::now(), &lag_of(&[(Some(0), 12), (Some(0), 0)]), 1);
        assert_eq!(d.desired, 2, "{}", d.reason);
    }

    #[test]
    fn keda_limit_to_partitions_with_lag_and_scale_to_zero_on_invalid() {
        let mut k = keda(1);
        k.params.limit_to_partitions_with_lag = true;
        let lag = lag_of(&[(Some(0), 100), (Some(5), 5), (Some(5), 5)]);
        assert_eq!(k.total_lag(&lag).0, 1);
        k.params.scale_to_zero_on_invalid_offset = true;
        assert_eq!(k.total_lag(&lag_of(&[(None, 100)])).0, 0);
    }

    #[test]
    fn keda_exclude_persistent_lag_and_activation() {
        let mut k = keda(1);
        k.params.exclude_persistent_lag = true;
        k.params.allow_idle_consumers = true;
        let lag = lag_of(&[(Some(5), 10)]);
        assert_eq!(k.total_lag(&lag), (5, 5));
        assert_eq!(
            k.total_lag(&lag),
            (0, 5),
            "unchanged offset: persistent lag excluded"
        );
        let d = k.evaluate(Instant::now(), &lag, 1);
        assert!(d.active, "activation counts persistent lag");
    }

    #[test]
    fn keda_scale_down_waits_for_the_window_and_zero_for_cooldown() {
        let mut k = keda(10);
        k.params.min_replicas = 0;
        k.params.allow_idle_consumers = true;
        k.params.scale_down_stabilization = Duration::from_secs(300);
        k.params.cooldown = Duration::from_secs(60);
        k.params.hpa = HpaAlgorithm::WithBehavior;
        let t0 = Instant::now();
        assert_eq!(k.evaluate(t0, &lag_of(&[(Some(0), 50)]), 1).desired, 5);
        let idle = lag_of(&[(Some(50), 50)]);
        assert_eq!(
            k.evaluate(t0 + Duration::from_secs(30), &idle, 5).desired,
            5,
            "inside window and cooldown"
        );
        assert_eq!(
            k.evaluate(t0 + Duration::from_secs(61), &idle, 5).desired,
            0,
            "inactive past cooldown"
        );
    }

    #[test]
    fn keda_scale_up_limit_counts_applied_changes_not_answers() {
        // `lag --watch --policy keda --replicas 8`: the count stays 8, so the
        // period's base is 8 on every reading, never 8 less the answers given.
        let mut k = keda(1);
        k.params.allow_idle_consumers = true;
        k.params.max_replicas = 100;
        let t0 = Instant::now();
        let lag = lag_of(&[(Some(0), 100)]);
        assert_eq!(k.evaluate(t0, &lag, 8).desired, 16);
        let second = k.evaluate(t0 + Duration::from_secs(2), &lag, 8);
        assert_eq!(second.desired, 16, "{}", second.reason);
    }

    #[test]
    fn keda_activation_from_zero_is_not_an_hpa_scale_event() {
        // A supervisor starting its first replica, or KEDA activating from
        // zero, then a burst: the HPA found 1 replica, so it may go to 5.
        let mut k = keda(3);
        k.params.max_replicas = 6;
        k.params.hpa = HpaAlgorithm::WithBehavior;
        let t0 = Instant::now();
        let idle = lag_of(&[(Some(0), 0); 8]);
        k.evaluate(t0, &idle, 0);
        k.evaluate(t0 + Duration::from_secs(1), &idle, 1);
        let burst = lag_of(&[(Some(0), 3750); 8]);
        let d = k.evaluate(t0 + Duration::from_secs(2), &burst, 1);
        assert_eq!(d.desired, 5, "max(1 x 2, 1 + 4): {}", d.reason);
    }

    #[test]
    fn keda_scale_up_limited_to_double_or_plus_four() {
        let mut k = keda(1);
        k.params.allow_idle_consumers = true;
        k.params.max_replicas = 100;
        k.params.hpa = HpaAlgorithm::WithBehavior;
        let t0 = Instant::now();
        let lag = lag_of(&[(Some(0), 100)]);
        let d = k.evaluate(t0, &lag, 2);
        assert_eq!(d.desired, 6, "doubling gives 4, +4 gives 6: {}", d.reason);
        // Within the same period the base is still 2 (6 - the 4 added): 6.
        assert_eq!(k.evaluate(t0 + Duration::from_secs(5), &lag, 6).desired, 6);
        // A new period: from 6, doubling (12) beats +4 (10).
        assert_eq!(
            k.evaluate(t0 + Duration::from_secs(21), &lag, 6).desired,
            12
        );
    }

    #[test]
    fn keda_runs_the_hpa_algorithm_the_scaled_object_selects() {
        let lag = lag_of(&[(Some(0), 1000)]);
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut without = keda(1);
        without.params.allow_idle_consumers = true;
        without.params.max_replicas = 100;
        // No behavior: max(2 x current, 4) from the count now: 1 -> 4,
        // 2 -> 4, 3 -> 6; and again at once, with no period memory.
        assert_eq!(without.evaluate(at(0), &lag, 1).desired, 4);
        assert_eq!(without.evaluate(at(1), &lag, 2).desired, 4);
        assert_eq!(without.evaluate(at(2), &lag, 3).desired, 6);
        assert_eq!(without.evaluate(at(3), &lag, 6).desired, 12);
        // A behavior spelled out: max(+100%, +4) per 15 s from the
        // period's start: 1 -> 5 and 2 -> 6.
        let mut with = keda(1);
        with.params.allow_idle_consumers = true;
        with.params.max_replicas = 100;
        with.params.hpa = HpaAlgorithm::WithBehavior;
        assert_eq!(with.evaluate(at(0), &lag, 1).desired, 5);
        let mut with2 = keda(1);
        with2.params = with.params.clone();
        assert_eq!(with2.evaluate(at(0), &lag, 2).desired, 6);
        // 10 -> 4 within the period, then a burst: the period started at
        // 10, so 20 are allowed (not 8, as the base without scale-downs).
        let mut down = keda(1);
        down.params = with.params.clone();
        let idle = lag_of(&[(Some(1000), 1000)]);
        down.evaluate(at(100), &idle, 10);
        down.evaluate(at(105), &idle, 4);
        let d = down.evaluate(at(110), &lag, 4);
        assert_eq!(d.desired, 20, "{}", d.reason);
        // Past the period the base is the count now again.
        let d = down.evaluate(at(125), &lag, 4);
        assert_eq!(d.desired, 8);
        assert_eq!(d.bound_by, Bound::HpaScaleUpLimit, "{}", d.reason);
    }

    /// Found in review: the scale event was stamped when the next sync saw
    /// the new count, so with 15 s syncs each step's event still counted
    /// at the next one and the model grew every 30 s. Kubernetes stamps it
    /// when it scales: 1 -> 5 at 0 s, 5 -> 10 at 15 s.
    #[test]
    fn the_hpa_counts_a_scale_event_from_the_sync_that_made_it() {
        let lag = lag_of(&[(Some(0), 1000)]);
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut k = keda(1);
        k.params.allow_idle_consumers = true;
        k.params.max_replicas = 100;
        k.params.hpa = HpaAlgorithm::WithBehavior;
        let mut current = 1;
        let mut steps = Vec::new();
        for s in [0, 15, 30, 45] {
            current = k.evaluate(at(s), &lag, current).desired;
            steps.push(current);
        }
        assert_eq!(steps, [5, 10, 20, 40]);
    }

    /// Kubernetes 1.33+: a tolerance per direction from the behavior.
    #[test]
    fn the_hpa_tolerance_can_differ_up_and_down() {
        let t0 = Instant::now();
        // 14 records over lagThreshold 1 with 10 running: a ratio of 1.4.
        let lag = lag_of(&[(Some(0), 14)]);
        let mut k = keda(1);
        k.params.allow_idle_consumers = true;
        k.params.max_replicas = 100;
        assert_eq!(k.evaluate(t0, &lag, 10).desired, 14, "0.1 by default");
        let mut wide = keda(1);
        wide.params = k.params.clone();
        wide.params.tolerance.scale_up = 0.5;
        let d = wide.evaluate(t0, &lag, 10);
        assert_eq!(
            (d.desired, d.bound_by),
            (10, Bound::Tolerance),
            "{}",
            d.reason
        );
        // 9 of 10: within 0.1 down; with no scale-down tolerance, 9.
        let nine = lag_of(&[(Some(0), 9)]);
        let mut k = keda(1);
        k.params.allow_idle_consumers = true;
        k.params.scale_down_stabilization = Duration::ZERO;
        assert_eq!(k.evaluate(t0, &nine, 10).desired, 10);
        let mut strict = keda(1);
        strict.params = k.params.clone();
        strict.params.tolerance.scale_down = 0.0;
        assert_eq!(strict.evaluate(t0, &nine, 10).desired, 9);
    }

    /// `allowIdleConsumers: false` caps the metric at partitions ×
    /// lagThreshold: the answer names the cap.
    #[test]
    fn keda_names_the_partition_cap() {
        let lag = lag_of(&[(Some(0), 3000); 8]);
        let mut k = keda(3);
        k.params.max_replicas = 24;
        let d = k.evaluate(Instant::now(), &lag, 8);
        assert_eq!(
            (d.desired, d.bound_by),
            (8, Bound::PartitionCap),
            "{}",
            d.reason
        );
        let mut open = keda(3);
        open.params.allow_idle_consumers = true;
        open.params.max_replicas = 24;
        let d = open.evaluate(Instant::now(), &lag, 8);
        assert_eq!(
            (d.desired, d.bound_by),
            (16, Bound::HpaScaleUpLimit),
            "{}",
            d.reason
        );
    }

    /// A policy that asks for a fixed count, to see what the HPA makes of it.
    struct Asks(u32);

    impl Policy for Asks {
        fn name(&self) -> &'static str {
            "asks"
        }

        fn decide(&mut self, _: Instant, _: &Observation<'_>) -> Decision {
            Decision {
                desired: self.0,
                metric_value: 0,
                active: true,
                reason: format!("asks {}", self.0),
                scale_up_held: false,
                bound_by: Bound::DrainTarget,
            }
        }
    }

    /// `rate` as the scaler serves it reaches the Deployment through the
    /// HPA: a change within its tolerance is not made, a jump is limited,
    /// a fall waits out the window; each says so.
    #[test]
    fn through_the_hpa_an_answer_meets_its_tolerance_window_and_limit() {
        let lag = lag_of(&[(Some(0), 10)]);
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let hpa =
            |asks| ThroughHpa::new(Box::new(Asks(asks)), HpaAlgorithm::WithBehavior, (1, 100));
        let observe = |current| Observation {
            lag: &lag,
            rates: crate::lag::Rates::default(),
            capacity: None,
            current,
        };
        // 11 asked of 10 running: a usage ratio of 1.1, within tolerance.
        let d = hpa(11).decide(at(0), &observe(10));
        assert_eq!(
            (d.desired, d.bound_by),
            (10, Bound::Tolerance),
            "{}",
            d.reason
        );
        // 30 asked of 2: at most max(+100%, +4) = 6.
        let d = hpa(30).decide(at(0), &observe(2));
        assert_eq!(
            (d.desired, d.bound_by),
            (6, Bound::HpaScaleUpLimit),
            "{}",
            d.reason
        );
        // Asked to fall from 8 to 2 right after asking 8: the window keeps 8.
        let mut p = hpa(8);
        p.decide(at(0), &observe(8));
        p.inner = Box::new(Asks(2));
        let d = p.decide(at(15), &observe(8));
        assert_eq!(
            (d.desired, d.bound_by),
            (8, Bound::ScaleDownWindow),
            "{}",
            d.reason
        );
        // Within all of them: the policy's own answer and bound.
        let d = hpa(4).decide(at(0), &observe(2));
        assert_eq!(
            (d.desired, d.bound_by),
            (4, Bound::DrainTarget),
            "{}",
            d.reason
        );
    }
}
