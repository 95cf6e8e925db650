//! `microbatch lag`: lag per partition, like `kafka-consumer-groups --describe`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use microbatch_scaling::lag::InvalidOffsetPolicy;
use microbatch_scaling::observe::Observer;
use microbatch_scaling::policy::{Decision, KedaParams, KedaPolicy, RateParams, RatePolicy};

use crate::args::LagTarget;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyKind {
    Keda,
    Rate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResetPolicy {
    Earliest,
    Latest,
}

/// Parameters of both scaling policies, shared by `lag`, `supervise` and `demo`.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Scaling policy")]
pub struct PolicyArgs {
    /// keda: lag per replica (KEDA `lagThreshold`).
    #[arg(long, default_value_t = 10)]
    pub lag_threshold: i64,
    /// keda: active above this lag (KEDA `activationLagThreshold`).
    #[arg(long, default_value_t = 0)]
    pub activation_lag_threshold: i64,
    /// keda: allow more replicas than partitions.
    #[arg(long)]
    pub allow_idle_consumers: bool,
    /// keda: cap replicas at partitions that have lag.
    #[arg(long)]
    pub limit_to_partitions_with_lag: bool,
    /// keda: ignore lag of partitions whose offset did not move.
    #[arg(long)]
    pub exclude_persistent_lag: bool,
    /// keda: partitions without a commit count 0 instead of 1 under `latest`.
    #[arg(long)]
    pub scale_to_zero_on_invalid_offset: bool,
    /// Partitions without a committed offset: earliest (all retained records
    /// are lag) or latest (KEDA's default).
    #[arg(long, value_enum, default_value = "earliest")]
    pub offset_reset_policy: ResetPolicy,
    /// rate: drain the lag within this many seconds.
    #[arg(long, default_value_t = 30)]
    pub target_drain_seconds: u64,
    /// rate: records/s one replica is assumed to do until its workers report
    /// their capacity (busy fraction and processed rate, in commit metadata).
    #[arg(long, default_value_t = 100.0)]
    pub rate_per_replica: f64,
    /// rate: processing slots per partition in the workers (1 for
    /// `--ordering partition`, the concurrency for `key`/`none`); with
    /// --slots-per-replica it bounds only the cold-start guess.
    #[arg(long, default_value_t = 1)]
    pub slots_per_partition: u32,
    /// rate: processing slots per replica (the workers' concurrency).
    #[arg(long, default_value_t = 1)]
    pub slots_per_replica: u32,
    /// Fewest replicas.
    #[arg(long = "min", default_value_t = 1)]
    pub min_replicas: u32,
    /// Most replicas.
    #[arg(long = "max", default_value_t = 24)]
    pub max_replicas: u32,
    /// Scale-down stabilization window, seconds (the HPA's default is 300).
    #[arg(long, default_value_t = 300)]
    pub scale_down_seconds: u64,
}

impl PolicyArgs {
    pub fn invalid_offset(&self) -> InvalidOffsetPolicy {
        match self.offset_reset_policy {
            ResetPolicy::Earliest => InvalidOffsetPolicy::Earliest,
            ResetPolicy::Latest => InvalidOffsetPolicy::Latest {
                scale_to_zero: self.scale_to_zero_on_invalid_offset,
            },
        }
    }

    pub fn keda(&self) -> KedaPolicy {
        KedaPolicy::new(KedaParams {
            lag_threshold: self.lag_threshold.max(1),
            activation_lag_threshold: self.activation_lag_threshold,
            allow_idle_consumers: self.allow_idle_consumers,
            limit_to_partitions_with_lag: self.limit_to_partitions_with_lag,
            exclude_persistent_lag: self.exclude_persistent_lag,
            offset_reset_latest: self.offset_reset_policy == ResetPolicy::Latest,
            scale_to_zero_on_invalid_offset: self.scale_to_zero_on_invalid_offset,
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            scale_down_stabilization: Duration::from_secs(self.scale_down_seconds),
            cooldown: Duration::from_secs(self.scale_down_seconds),
        })
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
            tolerance: 0.1,
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub target: LagTarget,
    /// Print JSON: {"group","topic","total_lag","partitions":[{"partition","committed","low","high","lag"}]}.
    #[arg(long)]
    pub json: bool,
    /// Refresh every --interval-ms until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Refresh interval for --watch.
    #[arg(long, default_value_t = 2000)]
    pub interval_ms: u64,
    /// Also print the replicas this policy would ask for now (current replicas: --replicas).
    #[arg(long, value_enum)]
    pub policy: Option<PolicyKind>,
    /// Current replicas, for --policy.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    #[command(flatten)]
    pub policy_args: PolicyArgs,
}

pub async fn execute(args: Args) -> anyhow::Result<ExitCode> {
    let reader = args.target.reader(Duration::from_secs(10))?;
    let mut policy = args
        .policy
        .map(|kind| super::supervise::make_policy(kind, &args.policy_args));
    let json = args.json;
    let mut observer = Observer::new(reader, args.policy_args.invalid_offset());
    let replicas = args.replicas;
    let watch = args.watch;
    let interval = Duration::from_millis(args.interval_ms.max(100));
    loop {
        let reading = tokio::task::block_in_place(|| observer.read(false))?;
        let lag = &reading.lag;
        let decision: Option<(&str, Decision)> = policy.as_mut().map(|p| {
            (
                p.name(),
                p.decide(reading.at, &reading.observation(replicas)),
            )
        });
        let mut out = std::io::stdout().lock();
        if json {
            let mut v = serde_json::to_value(lag)?;
            if let Some((name, d)) = &decision {
                v["policy"] = serde_json::json!({"name": name, "desired_replicas": d.desired, "metric_value": d.metric_value, "active": d.active, "reason": d.reason});
            }
            writeln!(out, "{}", serde_json::to_string(&v)?)?;
        } else {
            if watch {
                write!(out, "\x1b[2J\x1b[H")?;
            }
            writeln!(out, "GROUP {}  TOPIC {}", lag.group, lag.topic)?;
            writeln!(
                out,
                "{:>9} {:>12} {:>12} {:>12} {:>10}",
                "PARTITION", "COMMITTED", "LOW", "HIGH", "LAG"
            )?;
            for p in &lag.partitions {
                let committed = p
                    .committed
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into());
                writeln!(
                    out,
                    "{:>9} {:>12} {:>12} {:>12} {:>10}",
                    p.partition, committed, p.low, p.high, p.lag
                )?;
            }
            writeln!(
                out,
                "{:>9} {:>12} {:>12} {:>12} {:>10}",
                "TOTAL", "", "", "", lag.total_lag
            )?;
            if let Some((name, d)) = &decision {
                writeln!(out, "policy {name}: {} replicas ({})", d.desired, d.reason)?;
            }
        }
        out.flush()?;
        drop(out);
        if !watch {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = super::shutdown_signal() => return Ok(ExitCode::SUCCESS),
        }
    }
}
