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

use crate::lag::GroupLag;

mod decide;
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
            .is_some_and(|(t, _)| now.duration_since(*t) > window)
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

/// KEDA kafka trigger metadata and the ScaledObject's replica bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct KedaParams {
    pub lag_threshold: i64,
    pub activation_lag_threshold: i64,
    pub allow_idle_consumers: bool,
    pub limit_to_partitions_with_lag: bool,
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
}

impl Default for KedaParams {
    fn default() -> Self {
        Self {
            lag_threshold: 10,
            activation_lag_threshold: 0,
            allow_idle_consumers: false,
            limit_to_partitions_with_lag: false,
            exclude_persistent_lag: false,
            offset_reset_latest: true,
            scale_to_zero_on_invalid_offset: false,
            min_replicas: 0,
            max_replicas: 100,
            scale_down_stabilization: Duration::from_secs(300),
            cooldown: Duration::from_secs(300),
        }
    }
}

/// KEDA's kafka scaler plus the HPA controller, step by step.
#[derive(Debug)]
pub struct KedaPolicy {
    pub params: KedaParams,
    /// Previous committed offset per partition (for `excludePersistentLag`).
    previous_offsets: HashMap<i32, i64>,
    scale_down: ScaleDownWindow,
    /// Replicas added by scale-ups within the last period, as observed in
    /// the current count (what was applied, not what was asked for).
    scale_events: VecDeque<(Instant, u32)>,
    last_current: Option<u32>,
    last_active: Option<Instant>,
}

impl KedaPolicy {
    pub fn new(params: KedaParams) -> Self {
        Self {
            params,
            previous_offsets: HashMap::new(),
            scale_down: ScaleDownWindow::default(),
            scale_events: VecDeque::new(),
            last_current: None,
            last_active: None,
        }
    }

    /// Lag as KEDA computes it: high − committed, with no regard for the low
    /// watermark (a quirk: retention-deleted records count); a partition with
    /// no commit counts 1 or 0 under `latest`, and the whole high watermark
    /// (not high − low) under `earliest`.
    fn partition_lag(&mut self, partition: i32, committed: Option<i64>, high: i64) -> (i64, i64) {
        let p = &self.params;
        let Some(c) = committed else {
            if p.offset_reset_latest {
                let v = i64::from(!p.scale_to_zero_on_invalid_offset);
                return (v, v);
            }
            return (high, high);
        };
        let lag = high - c;
        if p.exclude_persistent_lag {
            let previous = self.previous_offsets.insert(partition, c);
            if previous == Some(c) && lag > 0 {
                return (0, lag);
            }
        }
        (lag, lag)
    }

    /// KEDA's `getTotalLag`: (lag used for the metric, lag with persistent).
    pub fn total_lag(&mut self, lag: &GroupLag) -> (i64, i64) {
        let mut total = 0;
        let mut with_persistent = 0;
        let mut partitions_with_lag = 0i64;
        for p in &lag.partitions {
            let (l, lp) = self.partition_lag(p.partition, p.committed, p.high);
            total += l;
            with_persistent += lp;
            if l > 0 {
                partitions_with_lag += 1;
            }
        }
        let params = &self.params;
        if !params.allow_idle_consumers || params.limit_to_partitions_with_lag {
            let upper = if params.limit_to_partitions_with_lag {
                partitions_with_lag
            } else {
                lag.partitions.len() as i64
            };
            // Integer division, as in KEDA: the cap bites only when the
            // quotient is strictly above the bound.
            if total / params.lag_threshold > upper {
                total = upper * params.lag_threshold;
            }
        }
        (total, with_persistent)
    }

    /// One evaluation: what KEDA and the HPA would set replicas to, given
    /// the current replica count.
    pub fn evaluate(&mut self, now: Instant, lag: &GroupLag, current: u32) -> Decision {
        if let Some(previous) = self.last_current.replace(current) {
            if current > previous {
                self.scale_events.push_back((now, current - previous));
            }
        }
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
                self.scale_down.clear();
                return Decision {
                    desired: 0,
                    metric_value: metric,
                    active,
                    reason: "inactive: KEDA scales to zero after its cooldown".into(),
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
            };
        }
        let target = p.lag_threshold as f64;
        let usage_ratio = metric as f64 / (target * f64::from(current));
        let raw = if (usage_ratio - 1.0).abs() <= HPA_TOLERANCE {
            current
        } else {
            (metric as f64 / target).ceil().max(0.0) as u32
        };
        let mut desired = raw.clamp(hpa_min, p.max_replicas.max(hpa_min));
        let mut reason = format!(
            "ceil(lag {metric} / lagThreshold {}) = {raw}, usage ratio {usage_ratio:.2}",
            p.lag_threshold
        );
        let (held, stabilized) =
            self.scale_down
                .apply(now, p.scale_down_stabilization, desired, current);
        if stabilized {
            reason.push_str(&format!("; held at {held} by the scale-down window"));
        }
        desired = held;
        // Scale-up limit: max(double, +4) per 15 s period.
        if desired > current {
            while self
                .scale_events
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) >= HPA_SCALE_UP_PERIOD)
            {
                self.scale_events.pop_front();
            }
            // As the HPA: the count at the period's start is the current
            // count less what was added within the period.
            let added: u32 = self.scale_events.iter().map(|(_, n)| *n).sum();
            let base = current.saturating_sub(added);
            let limit = (base * 2).max(base + 4);
            if desired > limit {
                reason.push_str(&format!("; limited to {limit} by the HPA scale-up policy"));
                desired = limit;
            }
        }
        Decision {
            desired,
            metric_value: metric,
            active,
            reason,
        }
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
    fn keda_earliest_invalid_offset_uses_the_high_watermark() {
        let mut k = keda(1);
        k.params.offset_reset_latest = false;
        k.params.allow_idle_consumers = true;
        let mut lag = lag_of(&[(None, 50)]);
        lag.partitions[0].low = 40;
        assert_eq!(k.total_lag(&lag).0, 50, "KEDA ignores the low watermark");
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
    fn keda_scale_up_limited_to_double_or_plus_four() {
        let mut k = keda(1);
        k.params.allow_idle_consumers = true;
        k.params.max_replicas = 100;
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
}
