//! `microbatch topic create`, `delete` and `describe`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use microbatch_kafka::admin::{create_topic, delete_topic};

use serde::{Deserialize, Serialize};

use crate::args::KafkaArgs;
use crate::config_file::FromFile;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a topic (an existing one is left as it is).
    Create(CreateArgs),
    /// Delete a topic and all its records (a missing one is not an error).
    Delete(DeleteArgs),
    /// Show a topic's partitions (leader, log start, high watermark) and,
    /// with --share-group, where that share group stands on each.
    Describe(DescribeArgs),
}

#[derive(Debug, clap::Args, Serialize, Deserialize)]
pub struct DescribeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub kafka: KafkaArgs,
    /// Topic name.
    #[arg(long, env = "KAFKA_TOPIC")]
    pub topic: String,
    /// Also show this share group on the topic: per partition its start
    /// offset and backlog as the broker counts them (in-flight records
    /// included; "-" before the group has state for the partition), its
    /// members reading the topic, the records in flight estimated from
    /// the workers' reports, and the group's `share.*` configs, each marked
    /// `(group)` when set for the group or `(default)` when the brokers'
    /// `group.share.*` default applies. A group first read with
    /// `share.auto.offset.reset=latest` (Kafka's default) skips the records
    /// already in the topic; `microbatch run --share-group` sets it from
    /// --offset-reset before it joins.
    #[arg(long, env = "SHARE_GROUP")]
    #[serde(default)]
    pub share_group: Option<String>,
    /// Print JSON: {"topic","partitions":[{"partition","leader","low","high"}]};
    /// with --share-group also "share_group":{"name","members","total_backlog",
    /// "partitions_unknown","backlog_source","in_flight","workers_reporting",
    /// "configs":[{"name","value","set_for_group"}]} and per partition
    /// "start_offset","backlog","in_flight".
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args, Serialize, Deserialize)]
pub struct DeleteArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub kafka: KafkaArgs,
    /// Topic name.
    #[arg(long, env = "KAFKA_TOPIC")]
    pub topic: String,
}

#[derive(Debug, clap::Args, Serialize, Deserialize)]
pub struct CreateArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub kafka: KafkaArgs,
    /// Topic name.
    #[arg(long, env = "KAFKA_TOPIC")]
    pub topic: String,
    /// Number of partitions.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(i32).range(1..))]
    pub partitions: i32,
    /// Replication factor.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub replication_factor: i32,
}

pub async fn execute(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Create(args) => {
            let kafka = args.kafka.resolve()?.start_msk_iam()?;
            let created = create_topic(
                &kafka,
                &args.topic,
                args.partitions,
                args.replication_factor,
                Duration::from_secs(30),
            )
            .await?;
            if created {
                println!(
                    "created topic {} with {} partitions",
                    args.topic, args.partitions
                );
            } else {
                println!("topic {} already exists", args.topic);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete(args) => {
            let kafka = args.kafka.resolve()?.start_msk_iam()?;
            if delete_topic(&kafka, &args.topic, Duration::from_secs(30)).await? {
                println!("deleted topic {}", args.topic);
            } else {
                println!("topic {} does not exist", args.topic);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe(args) => describe(args).await,
    }
}

/// `topic describe`.
async fn describe(args: DescribeArgs) -> anyhow::Result<ExitCode> {
    use microbatch_kafka::share::{backlog, security};
    let kafka = args.kafka.resolve()?.start_msk_iam()?;
    let connector = security::connector(&kafka)?;
    let bootstrap = kafka.bootstrap_list();
    let timeout = Duration::from_secs(30);
    let offsets =
        backlog::topic_offsets(connector.clone(), bootstrap.clone(), &args.topic, timeout).await?;
    let mut json = serde_json::json!({ "topic": args.topic, "partitions": offsets });
    let mut share = None;
    if let Some(group) = &args.share_group {
        let reading = backlog::read(
            connector.clone(),
            bootstrap.clone(),
            group,
            &args.topic,
            timeout,
        )
        .await?;
        let configs: Vec<_> =
            backlog::group_configs(connector.clone(), bootstrap.clone(), group, timeout)
                .await?
                .into_iter()
                .filter(|c| c.name.starts_with("share."))
                .collect();
        // Records in flight come from the workers' reports (librdkafka:
        // blocking).
        let reader = microbatch_scaling::share_lag::ShareLagReader::new(
            connector,
            bootstrap,
            group,
            &args.topic,
            timeout,
            tokio::runtime::Handle::current(),
        )
        .with_worker_reports(&kafka)?;
        let (reading, extra) = tokio::task::spawn_blocking(move || {
            let extra = super::lag::share_extras(&reader, &reading);
            (reading, extra)
        })
        .await?;
        json["share_group"] = serde_json::json!({
            "name": reading.share_group,
            "members": reading.members,
            "total_backlog": reading.total_backlog,
            "partitions_unknown": reading.partitions_unknown,
            "backlog_source": reading.backlog_source,
            "in_flight": extra.in_flight,
            "workers_reporting": extra.workers_reporting,
            "configs": configs,
        });
        let by_partition = share_by_partition(&reading, &extra);
        if let Some(parts) = json["partitions"].as_array_mut() {
            for p in parts {
                let partition = p["partition"].as_i64().unwrap_or(-1) as i32;
                let (start, backlog, in_flight) =
                    by_partition.get(&partition).copied().unwrap_or_default();
                p["start_offset"] = serde_json::json!(start);
                p["backlog"] = serde_json::json!(backlog);
                p["in_flight"] = serde_json::json!(in_flight);
            }
        }
        share = Some((reading, configs, extra));
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{json}")?;
        return Ok(ExitCode::SUCCESS);
    }
    let records: i64 = offsets.iter().map(|p| p.high - p.low).sum();
    writeln!(
        out,
        "TOPIC {}  PARTITIONS {}  RECORDS {records}",
        args.topic,
        offsets.len()
    )?;
    let dash = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    match &share {
        None => {
            writeln!(
                out,
                "{:>9} {:>7} {:>12} {:>12}",
                "PARTITION", "LEADER", "LOW", "HIGH"
            )?;
            for p in &offsets {
                writeln!(
                    out,
                    "{:>9} {:>7} {:>12} {:>12}",
                    p.partition, p.leader, p.low, p.high
                )?;
            }
        }
        Some((reading, configs, extra)) => {
            writeln!(
                out,
                "{:>9} {:>7} {:>12} {:>12} {:>12} {:>10} {:>10}",
                "PARTITION", "LEADER", "LOW", "HIGH", "SHARE START", "BACKLOG", "IN FLIGHT"
            )?;
            let by_partition = share_by_partition(reading, extra);
            for p in &offsets {
                let (start, backlog, in_flight) =
                    by_partition.get(&p.partition).copied().unwrap_or_default();
                writeln!(
                    out,
                    "{:>9} {:>7} {:>12} {:>12} {:>12} {:>10} {:>10}",
                    p.partition,
                    p.leader,
                    p.low,
                    p.high,
                    dash(start),
                    dash(backlog),
                    in_flight.map_or_else(|| "-".to_string(), |v| format!("~{v}"))
                )?;
            }
            writeln!(
                out,
                "SHARE GROUP {}  MEMBERS {}  BACKLOG {}{} (source: {})",
                reading.share_group,
                reading.members,
                reading.total_backlog,
                if reading.partitions_unknown > 0 {
                    format!(
                        " and {} partitions without state yet",
                        reading.partitions_unknown
                    )
                } else {
                    String::new()
                },
                reading.backlog_source
            )?;
            for c in configs {
                writeln!(
                    out,
                    "  {}={} ({})",
                    c.name,
                    c.value.as_deref().unwrap_or("(hidden)"),
                    if c.set_for_group { "group" } else { "default" }
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A share group on one partition: start offset, backlog, records in
/// flight (each `None` when unknown).
type ShareOnPartition = (Option<i64>, Option<i64>, Option<u64>);

/// Per partition: the share group's start offset, backlog and records in
/// flight.
fn share_by_partition(
    reading: &microbatch_kafka::share::backlog::ShareBacklog,
    extra: &super::lag::ShareExtras,
) -> std::collections::HashMap<i32, ShareOnPartition> {
    reading
        .partitions
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let in_flight = extra.in_flight_by_partition.get(i).copied().flatten();
            (b.partition, (b.start_offset, b.backlog, in_flight))
        })
        .collect()
}

impl FromFile for DescribeArgs {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.kafka.config_file()
    }
}

impl FromFile for CreateArgs {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.kafka.config_file()
    }
}

impl FromFile for DeleteArgs {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.kafka.config_file()
    }
}
