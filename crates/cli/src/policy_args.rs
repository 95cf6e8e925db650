//! The scaling policies' flags, shared by `lag`, `supervise` and `demo`,
//! and the policy they build.

use std::time::Duration;

use microbatch_kafka::ConfigError;
use microbatch_scaling::defaults;
use microbatch_scaling::keda_trigger::{self, TriggerError};
use microbatch_scaling::lag::InvalidOffsetPolicy;
use microbatch_scaling::policy::{
    HpaAlgorithm, HpaTolerance, KedaParams, KedaPolicy, KedaVersion, Policy, RateParams,
    RatePolicy, HPA_TOLERANCE,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyKind {
    Keda,
    Rate,
}

impl From<KedaVersion> for KedaRelease {
    fn from(v: KedaVersion) -> Self {
        match v {
            KedaVersion::V2_21 => KedaRelease::V2_21,
            KedaVersion::V2_20 => KedaRelease::V2_20,
        }
    }
}

impl From<KedaRelease> for KedaVersion {
    fn from(r: KedaRelease) -> Self {
        match r {
            KedaRelease::V2_21 => KedaVersion::V2_21,
            KedaRelease::V2_20 => KedaVersion::V2_20,
        }
    }
}

/// KEDA releases whose kafka scaler `keda` can reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KedaRelease {
    /// v2.21 (the newest).
    #[value(name = "2.21")]
    V2_21,
    /// v2.20: under earliest a partition without a commit counts its whole
    /// high watermark.
    #[value(name = "2.20")]
    V2_20,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResetPolicy {
    Earliest,
    Latest,
}

crate::serde_value_enum!(PolicyKind, KedaRelease, ResetPolicy);

/// Parameters of both scaling policies, shared by `lag`, `supervise` and `demo`.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[command(next_help_heading = "Scaling policy")]
pub struct PolicyArgs {
    /// keda: lag per replica (KEDA `lagThreshold`).
    #[arg(long, default_value_t = defaults::LAG_THRESHOLD)]
    pub lag_threshold: i64,
    /// keda: active above this lag (KEDA `activationLagThreshold`).
    #[arg(long, default_value_t = defaults::ACTIVATION_LAG_THRESHOLD)]
    pub activation_lag_threshold: i64,
    /// keda: allow more replicas than partitions.
    #[arg(long)]
    pub allow_idle_consumers: bool,
    /// keda: cap replicas at partitions that have lag.
    #[arg(long)]
    pub limit_to_partitions_with_lag: bool,
    /// keda: raise the metric to lagThreshold × a factor of the partition
    /// count, so every replica gets as many partitions.
    #[arg(long)]
    pub ensure_even_distribution_of_partitions: bool,
    /// keda: count only these partitions, e.g. `0,2,4-6` (KEDA `partitionLimitation`).
    #[arg(long, value_name = "IDS")]
    pub partition_limitation: Option<String>,
    /// keda: ignore lag of partitions whose offset did not move.
    #[arg(long)]
    pub exclude_persistent_lag: bool,
    /// keda: partitions without a commit count 0 (instead of 1 under
    /// `latest`, or their retained records under `earliest`).
    #[arg(long)]
    pub scale_to_zero_on_invalid_offset: bool,
    /// Partitions without a committed offset: latest (1 record of lag) or
    /// earliest (all retained records). Default: latest for `lag`, as KEDA;
    /// earliest for `supervise`, as the workers' own --offset-reset.
    #[arg(long, value_enum)]
    pub offset_reset_policy: Option<ResetPolicy>,
    /// rate: drain the lag within this many seconds.
    #[arg(long, default_value_t = defaults::TARGET_DRAIN_SECONDS)]
    pub target_drain_seconds: u64,
    /// rate: a partition whose oldest record not committed is older than
    /// this drains within it (not --target-drain-seconds), and at least one
    /// replica more is asked for (reads lag in seconds: one record per
    /// lagging partition per poll).
    #[arg(long, value_name = "SECONDS")]
    pub max_lag_seconds: Option<u64>,
    /// rate: records/s one replica is assumed to do until its workers report
    /// their capacity (busy fraction and processed rate, in commit metadata).
    #[arg(long, default_value_t = defaults::RATE_PER_REPLICA)]
    pub rate_per_replica: f64,
    /// rate: processing slots per partition in the workers (1 for
    /// `--ordering partition`, the concurrency for `key`/`none`); with
    /// --slots-per-replica it bounds only the cold-start guess.
    #[arg(long, default_value_t = defaults::SLOTS_PER_PARTITION)]
    pub slots_per_partition: u32,
    /// rate: processing slots per replica (the workers' concurrency).
    #[arg(long, default_value_t = defaults::SLOTS_PER_REPLICA)]
    pub slots_per_replica: u32,
    /// Fewest replicas.
    #[arg(long = "min", default_value_t = defaults::MIN_REPLICAS)]
    pub min_replicas: u32,
    /// Most replicas.
    #[arg(long = "max", default_value_t = defaults::MAX_REPLICAS)]
    pub max_replicas: u32,
    /// Scale-down stabilization window, seconds (the HPA's default is 300).
    #[arg(long, default_value_t = defaults::SCALE_DOWN_SECONDS)]
    pub scale_down_seconds: u64,
    /// keda: seconds without activity before scaling to zero with --min 0
    /// (KEDA `cooldownPeriod`).
    #[arg(long, default_value_t = defaults::COOLDOWN_SECONDS)]
    pub cooldown_seconds: u64,
    /// keda: the KEDA release to reproduce.
    #[arg(long, value_enum, default_value_t = KedaRelease::from(KedaVersion::default()))]
    pub keda_version: KedaRelease,
    /// keda: the ScaledObject spells out
    /// `advanced.horizontalPodAutoscalerConfig.behavior` (even restating
    /// the defaults), which switches the HPA to its other algorithm: at most
    /// max(+100%, +4) per 15 s period instead of max(2 x current, 4) at
    /// every sync.
    #[arg(long)]
    pub hpa_behavior: bool,
    /// keda: the HPA's tolerance for scaling up: no change while the usage
    /// ratio is at most 1 + this (Kubernetes 1.33+ reads it from the
    /// ScaledObject's `behavior.scaleUp.tolerance`; the cluster's default
    /// otherwise, 0.1).
    #[arg(long, default_value_t = HPA_TOLERANCE, value_name = "FRACTION")]
    pub hpa_scale_up_tolerance: f64,
    /// keda: the same for scaling down (`behavior.scaleDown.tolerance`): no
    /// change while the ratio is at least 1 − this.
    #[arg(long, default_value_t = HPA_TOLERANCE, value_name = "FRACTION")]
    pub hpa_scale_down_tolerance: f64,
}

/// A tolerance is a fraction: 0 up to (not including) 1.
fn tolerance(flag: &'static str, value: f64) -> Result<f64, ConfigError> {
    if (0.0..1.0).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::new(
            flag,
            format!("must be a fraction from 0 up to 1 (0.1 is Kubernetes' default), got {value}"),
        ))
    }
}

/// KEDA's metadata keys and the flags that set them, for error messages.
const KEDA_FLAGS: [(&str, &str); 6] = [
    ("lagThreshold", "--lag-threshold"),
    ("activationLagThreshold", "--activation-lag-threshold"),
    ("limitToPartitionsWithLag", "--limit-to-partitions-with-lag"),
    (
        "ensureEvenDistributionOfPartitions",
        "--ensure-even-distribution-of-partitions",
    ),
    ("partitionLimitation", "--partition-limitation"),
    ("allowIdleConsumers", "--allow-idle-consumers"),
];

impl PolicyArgs {
    fn reset_policy(&self) -> ResetPolicy {
        // `supervise` and `demo` start workers, whose own default is earliest;
        // `lag` sets KEDA's latest before it gets here.
        self.offset_reset_policy.unwrap_or(ResetPolicy::Earliest)
    }

    pub fn invalid_offset(&self) -> InvalidOffsetPolicy {
        match self.reset_policy() {
            ResetPolicy::Earliest => InvalidOffsetPolicy::Earliest,
            ResetPolicy::Latest => InvalidOffsetPolicy::Latest {
                scale_to_zero: self.scale_to_zero_on_invalid_offset,
            },
        }
    }

    /// The keda options, refused where KEDA refuses them (naming the flag).
    pub fn keda_params(&self) -> Result<KedaParams, ConfigError> {
        let flag_of = |key: &'static str| {
            KEDA_FLAGS
                .iter()
                .find(|(k, _)| *k == key)
                .map_or(key, |(_, flag)| flag)
        };
        let to_config_error = |e: TriggerError| {
            let rule = KEDA_FLAGS
                .iter()
                .fold(e.rule, |rule, (key, flag)| rule.replace(key, flag));
            ConfigError::new(flag_of(e.key), rule)
        };
        let partition_limitation = self
            .partition_limitation
            .as_deref()
            .map(keda_trigger::parse_partition_limitation)
            .transpose()
            .map_err(to_config_error)?;
        let params = KedaParams {
            lag_threshold: self.lag_threshold,
            activation_lag_threshold: self.activation_lag_threshold,
            allow_idle_consumers: self.allow_idle_consumers,
            limit_to_partitions_with_lag: self.limit_to_partitions_with_lag,
            ensure_even_distribution_of_partitions: self.ensure_even_distribution_of_partitions,
            partition_limitation,
            exclude_persistent_lag: self.exclude_persistent_lag,
            offset_reset_latest: self.reset_policy() == ResetPolicy::Latest,
            scale_to_zero_on_invalid_offset: self.scale_to_zero_on_invalid_offset,
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            scale_down_stabilization: Duration::from_secs(self.scale_down_seconds),
            cooldown: Duration::from_secs(self.cooldown_seconds),
            version: self.keda_version.into(),
            hpa: if self.hpa_behavior {
                HpaAlgorithm::WithBehavior
            } else {
                HpaAlgorithm::WithoutBehavior
            },
            tolerance: HpaTolerance {
                scale_up: tolerance("--hpa-scale-up-tolerance", self.hpa_scale_up_tolerance)?,
                scale_down: tolerance("--hpa-scale-down-tolerance", self.hpa_scale_down_tolerance)?,
            },
        };
        keda_trigger::validate(&params, true).map_err(to_config_error)?;
        Ok(params)
    }

    /// The keda policy; commands check [`Self::keda_params`] at start.
    pub fn keda(&self) -> KedaPolicy {
        KedaPolicy::new(
            self.keda_params()
                .expect("the keda options were checked when the command started"),
        )
    }

    pub fn rate(&self) -> RatePolicy {
        RatePolicy::new(RateParams {
            target_drain: Duration::from_secs(self.target_drain_seconds.max(1)),
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            slots_per_partition: self.slots_per_partition.max(1),
            slots_per_replica: self.slots_per_replica.max(1),
            initial_rate_per_replica: self.rate_per_replica,
            scale_down_stabilization: Duration::from_secs(self.scale_down_seconds),
            tolerance: HPA_TOLERANCE,
            max_lag: self.max_lag_seconds.map(Duration::from_secs),
        })
    }
}

/// Builds the chosen policy from its flags.
pub fn make_policy(kind: PolicyKind, args: &PolicyArgs) -> Box<dyn Policy> {
    match kind {
        PolicyKind::Keda => Box::new(args.keda()),
        PolicyKind::Rate => Box::new(args.rate()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        policy: PolicyArgs,
    }

    fn keda_params(flags: &[&str]) -> Result<KedaParams, ConfigError> {
        let flags = Flags::try_parse_from(std::iter::once("lag").chain(flags.iter().copied()))
            .expect("flags parse");
        flags.policy.keda_params()
    }

    /// The flags' defaults are the library's: the policies built from no
    /// flags are the policies' own defaults (but the reset policy, which
    /// follows the workers' earliest).
    #[test]
    fn no_flags_give_the_policies_defaults() {
        let flags = Flags::try_parse_from(["supervise"]).unwrap();
        assert_eq!(flags.policy.rate().params, RateParams::default());
        assert_eq!(
            flags.policy.keda_params().unwrap(),
            KedaParams {
                offset_reset_latest: false,
                ..KedaParams::default()
            }
        );
    }

    #[test]
    fn the_cooldown_is_its_own_setting() {
        let p = keda_params(&["--scale-down-seconds", "60"]).unwrap();
        assert_eq!(p.scale_down_stabilization, Duration::from_secs(60));
        assert_eq!(p.cooldown, Duration::from_secs(300), "KEDA's default");
        assert_eq!(p.version, KedaVersion::V2_21, "the newest KEDA by default");
        let p = keda_params(&["--keda-version", "2.20"]).unwrap();
        assert_eq!(p.version, KedaVersion::V2_20);
        let p = keda_params(&["--cooldown-seconds", "30"]).unwrap();
        assert_eq!(p.cooldown, Duration::from_secs(30));
        assert_eq!(p.scale_down_stabilization, Duration::from_secs(300));
    }

    #[test]
    fn keda_refusals_name_the_flags() {
        let err =
            keda_params(&["--allow-idle-consumers", "--limit-to-partitions-with-lag"]).unwrap_err();
        assert_eq!(err.field, "--limit-to-partitions-with-lag");
        assert!(err.rule.contains("--allow-idle-consumers"), "{err}");
        let err = keda_params(&["--activation-lag-threshold=-1"]).unwrap_err();
        assert_eq!(err.field, "--activation-lag-threshold");
        let err = keda_params(&["--partition-limitation", "0,x"]).unwrap_err();
        assert_eq!(err.field, "--partition-limitation");
        let p = keda_params(&["--partition-limitation", "0,3-4"]).unwrap();
        assert_eq!(p.partition_limitation, Some(vec![0, 3, 4]));
        for flag in ["--hpa-scale-up-tolerance", "--hpa-scale-down-tolerance"] {
            let err = keda_params(&[flag, "1.5"]).unwrap_err();
            assert_eq!(err.field, flag);
            let err = keda_params(&[&format!("{flag}=-0.1")]).unwrap_err();
            assert_eq!(err.field, flag);
        }
        let p = keda_params(&["--hpa-scale-up-tolerance", "0.5"]).unwrap();
        assert_eq!((p.tolerance.scale_up, p.tolerance.scale_down), (0.5, 0.1));
    }
}
