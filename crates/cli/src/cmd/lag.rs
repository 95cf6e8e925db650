//! `microbatch lag`: lag per partition, like `kafka-consumer-groups --describe`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use microbatch_scaling::defaults;
use microbatch_scaling::keda_trigger;
use microbatch_scaling::observe::Observer;
use microbatch_scaling::policy::Decision;

use serde::{Deserialize, Serialize};

use crate::args::LagTarget;
use crate::config_file::FromFile;
use crate::policy_args::{PolicyArgs, PolicyKind, ResetPolicy};

#[derive(Debug, clap::Args, Serialize, Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub target: LagTarget,
    /// Print JSON: {"group","topic","total_lag","lag_seconds","partitions":[{"partition","committed","low","high","lag","lag_seconds"}]};
    /// lag_seconds is the age of the oldest record not committed (null when
    /// unknown), the group's is the oldest partition's.
    #[arg(long)]
    pub json: bool,
    /// Refresh every --interval-ms until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Refresh interval for --watch.
    #[arg(long, default_value_t = defaults::LAG_WATCH_INTERVAL_MS)]
    pub interval_ms: u64,
    /// Also print the replicas this policy would ask for now (current replicas: --replicas).
    #[arg(long, value_enum)]
    pub policy: Option<PolicyKind>,
    /// Current replicas, for --policy.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    #[command(flatten)]
    #[serde(flatten)]
    pub policy_args: PolicyArgs,
}

impl FromFile for Args {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.target.kafka.config_file()
    }
}

pub async fn execute(mut args: Args) -> anyhow::Result<ExitCode> {
    // KEDA's default, so `lag --policy keda` previews KEDA with no flags.
    args.policy_args
        .offset_reset_policy
        .get_or_insert(ResetPolicy::Latest);
    let keda_params = args.policy_args.keda_params()?;
    let reader = args
        .target
        .reader(Duration::from_secs(10))?
        .with_record_ages();
    let mut policy = args
        .policy
        .map(|kind| crate::policy_args::make_policy(kind, &args.policy_args));
    let json = args.json;
    let mut observer = Observer::new(reader, args.policy_args.invalid_offset());
    let replicas = args.replicas;
    let watch = args.watch;
    let interval = Duration::from_millis(args.interval_ms.max(100));
    loop {
        let reading = tokio::task::block_in_place(|| observer.read(false))?;
        let lag = &reading.lag;
        if args.policy == Some(PolicyKind::Keda) {
            keda_trigger::check_partitions(&keda_params, lag)
                .map_err(|e| anyhow::anyhow!("--partition-limitation {}", e.rule))?;
        }
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
                v["policy"] = serde_json::json!({"name": name, "desired_replicas": d.desired, "metric_value": d.metric_value, "active": d.active, "reason": d.reason, "scale_up_held": d.scale_up_held});
            }
            writeln!(out, "{}", serde_json::to_string(&v)?)?;
        } else {
            if watch {
                write!(out, "\x1b[2J\x1b[H")?;
            }
            writeln!(out, "GROUP {}  TOPIC {}", lag.group, lag.topic)?;
            writeln!(
                out,
                "{:>9} {:>12} {:>12} {:>12} {:>10} {:>11}",
                "PARTITION", "COMMITTED", "LOW", "HIGH", "LAG", "LAG SECONDS"
            )?;
            for p in &lag.partitions {
                let committed = p
                    .committed
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into());
                writeln!(
                    out,
                    "{:>9} {:>12} {:>12} {:>12} {:>10} {:>11}",
                    p.partition,
                    committed,
                    p.low,
                    p.high,
                    p.lag,
                    seconds(p.lag_ms)
                )?;
            }
            writeln!(
                out,
                "{:>9} {:>12} {:>12} {:>12} {:>10} {:>11}",
                "TOTAL",
                "",
                "",
                "",
                lag.total_lag,
                seconds(lag.lag_ms)
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

/// Lag in seconds for the table: one decimal, `-` when unknown.
pub fn seconds(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".into(), |ms| format!("{:.1}", ms as f64 / 1000.0))
}
