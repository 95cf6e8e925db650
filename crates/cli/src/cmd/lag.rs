//! `microbatch lag`: lag per partition, like `kafka-consumer-groups --describe`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use microbatch_scaling::defaults;
use microbatch_scaling::keda_trigger;
use microbatch_scaling::observe::Observer;
use microbatch_scaling::policy::Decision;
use microbatch_scaling::share_lag::{backlog_as_lag, ShareLagReader};

use serde::{Deserialize, Serialize};

use crate::args::LagTarget;
use crate::config_file::FromFile;
use crate::policy_args::{PolicyArgs, PolicyKind, ResetPolicy};

#[derive(Debug, clap::Args, Serialize, Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub target: LagTarget,
    /// Read a share group's backlog instead of a consumer group's lag: per
    /// partition the records not yet finished, in-flight ones included, as
    /// the broker counts them (Kafka 4.2+; older brokers: high watermark
    /// minus the share-partition start offset, which can overstate it), "-"
    /// before the group has state for a partition; the age of the oldest
    /// record not done (when the broker counts the backlog); and the records in
    /// flight, estimated from the workers' reports (the mean a reporting
    /// worker holds × members). JSON:
    /// {"share_group","topic","members","total_backlog","partitions_unknown","partitions_offline":[partition],"backlog_source":"broker_lag"|"high_watermark_minus_start_offset","lag_seconds","workers_reporting","in_flight","partitions":[{"partition","start_offset","high","backlog","lag_seconds","in_flight"}]}.
    /// A partition without a leader (its broker down) is left out of
    /// "partitions" and the total, named in "partitions_offline" and on
    /// stderr, and the exit is 1 (with --watch: said, and read again).
    /// Not with --group or --policy.
    #[arg(long, env = "SHARE_GROUP", conflicts_with = "policy")]
    #[serde(default)]
    pub share_group: Option<String>,
    /// Print JSON: {"group","topic","total_lag","lag_seconds","members","partitions":[{"partition","committed","low","high","lag","lag_seconds"}],"partitions_offline":[partition]};
    /// lag_seconds is the age of the oldest record not committed (null when
    /// unknown), the group's is the oldest partition's; members are the
    /// group's members subscribed to the topic (null when the broker cannot
    /// tell: mid-rebalance, a KIP-848 group). A partition without a leader
    /// (its broker down) is left out of "partitions" and the total, named
    /// in "partitions_offline" and on stderr, and the exit is 1. On a
    /// reading the scaler would fail (an offline partition within
    /// --partition-limitation, a committed offset that cannot be read) the
    /// exit is 1 and, with --policy, "policy" is null: no decision is made
    /// on it.
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
    /// With --policy: say which term bound the answer (arrivals, drain
    /// target, lag seconds, partition cap, hold, tolerance, scale-down
    /// window, ...) and each step of the reason on a line of its own.
    /// The JSON always carries it as policy.bound_by.
    #[arg(long, requires = "policy")]
    pub explain: bool,
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
    if let Some(share_group) = args.share_group.clone() {
        return share_backlog(&args, &share_group).await;
    }
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
        // With the group's members on this topic: one group id may serve
        // several topics (a Deployment per topic), each its own replicas.
        let reading = tokio::task::block_in_place(|| observer.read(true))?;
        let lag = &reading.lag;
        let keda = args.policy == Some(PolicyKind::Keda);
        // As the scaler: no decision on a reading it would fail (an offline
        // partition, a commit that cannot be read), and the policy is not
        // fed one.
        let only = keda
            .then_some(keda_params.partition_limitation.as_deref())
            .flatten();
        let unreadable = lag.unreadable_within(only);
        if keda && unreadable.is_none() {
            keda_trigger::check_partitions(&keda_params, lag)
                .map_err(|e| anyhow::anyhow!("--partition-limitation {}", e.rule))?;
        }
        let decision: Option<(&str, Decision)> = match policy.as_mut() {
            Some(p) if unreadable.is_none() => Some((
                p.name(),
                p.decide(reading.at, &reading.observation(replicas)),
            )),
            _ => None,
        };
        let mut out = std::io::stdout().lock();
        if json {
            let mut v = serde_json::to_value(lag)?;
            v["members"] = serde_json::json!(reading.members);
            if let Some((name, d)) = &decision {
                v["policy"] = serde_json::json!({"name": name, "desired_replicas": d.desired, "metric_value": d.metric_value, "active": d.active, "reason": d.reason, "scale_up_held": d.scale_up_held, "bound_by": d.bound_by});
            } else if policy.is_some() {
                v["policy"] = serde_json::Value::Null;
            }
            writeln!(out, "{}", serde_json::to_string(&v)?)?;
        } else {
            if watch {
                write!(out, "\x1b[2J\x1b[H")?;
            }
            match reading.members {
                Some(n) => writeln!(out, "GROUP {}  TOPIC {}  MEMBERS {n}", lag.group, lag.topic)?,
                None => writeln!(out, "GROUP {}  TOPIC {}", lag.group, lag.topic)?,
            }
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
            match &decision {
                Some((name, d)) if args.explain => {
                    writeln!(
                        out,
                        "policy {name}: {} replicas, bound by {}",
                        d.desired,
                        d.bound_by.as_str()
                    )?;
                    for step in d.reason.split("; ") {
                        writeln!(out, "  {step}")?;
                    }
                }
                Some((name, d)) => {
                    writeln!(out, "policy {name}: {} replicas ({})", d.desired, d.reason)?
                }
                None => {
                    if let (Some(p), Some(why)) = (&policy, &unreadable) {
                        writeln!(
                            out,
                            "policy {}: no decision on this reading ({why})",
                            p.name()
                        )?;
                    }
                }
            }
            if let Some((partition, error)) = lag.commit_error() {
                writeln!(
                    out,
                    "partition {partition}'s committed offset could not be read ({error}): \
                     KEDA's kafka trigger fails the whole reading on this (its fallback \
                     applies), and so does microbatch scaler"
                )?;
            }
        }
        out.flush()?;
        drop(out);
        let offline = !lag.partitions_offline.is_empty();
        if offline {
            eprintln!(
                "error: {}: their lag is not in the total{}",
                microbatch_kafka::share::ShareError::offline(&lag.topic, &lag.partitions_offline),
                if unreadable.is_some() {
                    "; microbatch scaler fails such a reading (KEDA's fallback applies)"
                } else {
                    " (outside --partition-limitation: the scaler still decides)"
                }
            );
        }
        if !watch {
            // A reading that is not whole, or that the scaler would fail.
            return Ok(if offline || unreadable.is_some() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = super::shutdown_signal() => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// `lag --share-group`: the share group's backlog, once or every interval.
async fn share_backlog(args: &Args, share_group: &str) -> anyhow::Result<ExitCode> {
    use microbatch_kafka::share::{backlog, security, ShareConsumerConfig};
    if args.target.group.is_some() {
        return Err(microbatch_kafka::ConfigError::new(
            "--share-group",
            "names a share group; --group (or CONSUMER_GROUP) names a consumer group: give one",
        )
        .into());
    }
    let kafka = args.target.kafka.resolve()?.start_msk_iam()?;
    let bootstrap = ShareConsumerConfig::from_kafka(&kafka, share_group, vec![])?.bootstrap;
    let connector = security::connector(&kafka)?;
    let interval = Duration::from_millis(args.interval_ms.max(100));
    // Ages and reports come through librdkafka clients, off the runtime.
    let extras = std::sync::Arc::new(
        ShareLagReader::new(
            connector.clone(),
            bootstrap.clone(),
            share_group,
            &args.target.topic,
            Duration::from_secs(10),
            tokio::runtime::Handle::current(),
        )
        .with_record_ages(&kafka)?
        .with_worker_reports(&kafka)?,
    );
    loop {
        let read = backlog::read(
            connector.clone(),
            bootstrap.clone(),
            share_group,
            &args.target.topic,
            Duration::from_secs(10),
        )
        .await;
        let reading = match read {
            Ok(reading) => reading,
            // Watching outlives a broker restart: said, and read again.
            Err(e) if args.watch => {
                eprintln!("reading the backlog failed (trying again): {e}");
                tokio::select! {
                    _ = tokio::time::sleep(interval) => continue,
                    _ = super::shutdown_signal() => return Ok(ExitCode::SUCCESS),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let (reading, extra) = {
            let extras = extras.clone();
            tokio::task::spawn_blocking(move || {
                let extra = share_extras(&extras, &reading);
                (reading, extra)
            })
            .await?
        };
        let mut out = std::io::stdout().lock();
        if args.json {
            let mut json = serde_json::to_value(&reading)?;
            json["lag_seconds"] = serde_json::json!(extra.ages.lag_ms.map(|ms| ms as f64 / 1000.0));
            json["workers_reporting"] = serde_json::json!(extra.workers_reporting);
            json["in_flight"] = serde_json::json!(extra.in_flight);
            if let Some(parts) = json["partitions"].as_array_mut() {
                for ((p, lag), in_flight) in parts
                    .iter_mut()
                    .zip(&extra.ages.partitions)
                    .zip(&extra.in_flight_by_partition)
                {
                    p["lag_seconds"] = serde_json::json!(lag.lag_ms.map(|ms| ms as f64 / 1000.0));
                    p["in_flight"] = serde_json::json!(in_flight);
                }
            }
            writeln!(out, "{json}")?;
        } else {
            if args.watch {
                write!(out, "\x1b[2J\x1b[H")?;
            }
            writeln!(
                out,
                "SHARE GROUP {}  TOPIC {}  MEMBERS {}",
                reading.share_group, reading.topic, reading.members
            )?;
            writeln!(
                out,
                "{:>9} {:>12} {:>12} {:>10} {:>9} {:>10}",
                "PARTITION", "START", "HIGH", "BACKLOG", "AGE(s)", "IN FLIGHT"
            )?;
            let dash = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
            let about = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| format!("~{v}"));
            for ((p, lag), in_flight) in reading
                .partitions
                .iter()
                .zip(&extra.ages.partitions)
                .zip(&extra.in_flight_by_partition)
            {
                writeln!(
                    out,
                    "{:>9} {:>12} {:>12} {:>10} {:>9} {:>10}",
                    p.partition,
                    dash(p.start_offset),
                    p.high,
                    dash(p.backlog),
                    seconds(lag.lag_ms),
                    about(*in_flight)
                )?;
            }
            writeln!(
                out,
                "{:>9} {:>12} {:>12} {:>10} {:>9} {:>10}",
                "TOTAL",
                "",
                "",
                reading.total_backlog,
                seconds(extra.ages.lag_ms),
                about(extra.in_flight)
            )?;
            match extra.in_flight {
                Some(n) => writeln!(
                    out,
                    "(in flight: about {n}, from {} workers' reports)",
                    extra.workers_reporting
                )?,
                None => writeln!(out, "(in flight: unknown, no worker reports)")?,
            }
            if reading.partitions_unknown > 0 {
                writeln!(
                    out,
                    "(backlog: {}; {} partitions unknown, not in the total)",
                    reading.backlog_source, reading.partitions_unknown
                )?;
            } else {
                writeln!(out, "(backlog: {})", reading.backlog_source)?;
            }
        }
        out.flush()?;
        drop(out);
        let offline = !reading.partitions_offline.is_empty();
        if offline {
            eprintln!(
                "error: {}: their backlog is not in the total",
                microbatch_kafka::share::ShareError::offline(
                    &reading.topic,
                    &reading.partitions_offline
                )
            );
        }
        if !args.watch {
            return Ok(if offline {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = super::shutdown_signal() => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// What a share-group reading adds beyond the broker's backlog.
pub(crate) struct ShareExtras {
    /// The backlog as lag, with record ages when they could be read.
    pub ages: microbatch_scaling::lag::GroupLag,
    pub workers_reporting: u32,
    /// Records taken and not yet acknowledged, estimated.
    pub in_flight: Option<u64>,
    /// The same per partition, in the reading's order.
    pub in_flight_by_partition: Vec<Option<u64>>,
}

/// Reads the ages and the workers' reports (blocking: librdkafka).
pub(crate) fn share_extras(
    reader: &ShareLagReader,
    reading: &microbatch_kafka::share::backlog::ShareBacklog,
) -> ShareExtras {
    use microbatch_scaling::capacity::WorkerCapacity;
    use microbatch_scaling::lag::InvalidOffsetPolicy;
    let mut ages = backlog_as_lag(reading, InvalidOffsetPolicy::Earliest);
    reader.set_ages(reading, &mut ages);
    let reports = reader.worker_reports();
    let capacity = WorkerCapacity::from_metadata(
        reports.iter().map(String::as_str),
        microbatch_kafka::capacity_report::unix_ms_now(),
    );
    let members = reading.members as u32;
    ShareExtras {
        ages,
        workers_reporting: capacity.as_ref().map_or(0, |c| c.workers),
        in_flight: capacity.as_ref().and_then(|c| c.in_flight(members)),
        in_flight_by_partition: reading
            .partitions
            .iter()
            .map(|p| {
                capacity
                    .as_ref()
                    .and_then(|c| c.in_flight_on(p.partition, members))
            })
            .collect(),
    }
}

/// Lag in seconds for the table: one decimal, `-` when unknown.
pub fn seconds(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".into(), |ms| format!("{:.1}", ms as f64 / 1000.0))
}
