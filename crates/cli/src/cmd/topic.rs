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
    /// Print JSON: {"topic","partitions":[{"partition","leader","low","high"}]}
    /// (null where unknown: an offline partition has no leader to ask, and
    /// one whose leader does not answer has no offsets; either is said on
    /// stderr and the exit is 1);
    /// with --share-group each partition also has "share":{"start_offset",
    /// "backlog","in_flight"}, and "share_group":{"name","exists","members",
    /// "total_backlog","partitions_unknown","partitions_offline","backlog_source","in_flight",
    /// "workers_reporting","configs":[{"name","value","set_for_group"}]}.
    /// A part of the share group that cannot be read is said on stderr and
    /// the exit is 1, the rest printed.
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

/// One row of `topic describe`.
#[derive(Debug, Default, Serialize)]
struct Row {
    partition: i32,
    leader: Option<i32>,
    low: Option<i64>,
    high: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    share: Option<ShareRow>,
}

/// A share group on one partition, each figure `None` when unknown.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct ShareRow {
    start_offset: Option<i64>,
    backlog: Option<i64>,
    in_flight: Option<u64>,
}

/// `topic describe`. The topic's part fails the command only when the
/// topic cannot be read at all (missing, unreachable); each of the share
/// group's parts that fails is said and makes the exit 1, with the rest
/// still printed.
async fn describe(args: DescribeArgs) -> anyhow::Result<ExitCode> {
    use microbatch_kafka::share::{backlog, security};
    let kafka = args.kafka.resolve()?.start_msk_iam()?;
    let connector = security::connector(&kafka)?;
    let bootstrap = kafka.bootstrap_list();
    let timeout = Duration::from_secs(30);
    let (offsets, not_read) =
        backlog::topic_offsets(connector.clone(), bootstrap.clone(), &args.topic, timeout).await?;
    let mut rows: Vec<Row> = offsets
        .iter()
        .map(|p| Row {
            partition: p.partition,
            leader: p.leader,
            low: p.low,
            high: p.high,
            share: None,
        })
        .collect();
    let mut problems = Vec::new();
    if !not_read.is_empty() {
        problems.push(format!(
            "{}: their offsets are not read",
            microbatch_kafka::share::ShareError::offline(&args.topic, &not_read)
        ));
    }
    let mut share_json = serde_json::Value::Null;
    let mut share_lines = Vec::new();
    if let Some(group) = &args.share_group {
        match backlog::read(
            connector.clone(),
            bootstrap.clone(),
            group,
            &args.topic,
            timeout,
        )
        .await
        {
            Ok(reading) => {
                let reader = microbatch_scaling::share_lag::ShareLagReader::new(
                    connector.clone(),
                    bootstrap.clone(),
                    group,
                    &args.topic,
                    timeout,
                    tokio::runtime::Handle::current(),
                )
                .with_worker_reports(&kafka);
                let extra = match reader {
                    // The workers' reports come through librdkafka: blocking.
                    Ok(reader) => {
                        let reading = reading.clone();
                        Some(
                            tokio::task::spawn_blocking(move || {
                                super::lag::share_extras(&reader, &reading)
                            })
                            .await?,
                        )
                    }
                    Err(e) => {
                        problems.push(format!("records in flight: {e}"));
                        None
                    }
                };
                // Each row's figures from the one reading, so they agree.
                for (i, b) in reading.partitions.iter().enumerate() {
                    let share = ShareRow {
                        start_offset: b.start_offset,
                        backlog: b.backlog,
                        in_flight: extra
                            .as_ref()
                            .and_then(|x| x.in_flight_by_partition.get(i).copied().flatten()),
                    };
                    match rows.iter_mut().find(|r| r.partition == b.partition) {
                        Some(row) => {
                            row.low = Some(b.low);
                            row.high = Some(b.high);
                            row.share = Some(share);
                        }
                        None => rows.push(Row {
                            partition: b.partition,
                            low: Some(b.low),
                            high: Some(b.high),
                            share: Some(share),
                            ..Row::default()
                        }),
                    }
                }
                rows.sort_by_key(|r| r.partition);
                if !reading.partitions_offline.is_empty() {
                    problems.push(format!(
                        "share group {group}: {}: their backlog is not read",
                        microbatch_kafka::share::ShareError::offline(
                            &reading.topic,
                            &reading.partitions_offline
                        )
                    ));
                }
                let configs: Vec<_> =
                    match backlog::group_configs(connector, bootstrap, group, timeout).await {
                        Ok(configs) => configs
                            .into_iter()
                            .filter(|c| c.name.starts_with("share."))
                            .collect(),
                        Err(e) => {
                            problems.push(format!("share group {group}'s configs: {e}"));
                            Vec::new()
                        }
                    };
                let mut unknown = String::new();
                if reading.partitions_unknown > 0 {
                    unknown += &format!(
                        " and {} partitions without state yet",
                        reading.partitions_unknown
                    );
                }
                if !reading.partitions_offline.is_empty() {
                    unknown += &format!(
                        " and {} partitions offline",
                        reading.partitions_offline.len()
                    );
                }
                share_lines.push(format!(
                    "SHARE GROUP {}  MEMBERS {}  BACKLOG {}{unknown} (source: {})",
                    reading.share_group,
                    reading.members,
                    reading.total_backlog,
                    reading.backlog_source
                ));
                if !reading.exists {
                    share_lines.push(format!(
                        "  the brokers know no share group {group:?} yet (a new name, or a typo): \
                         the configs below are those it would start with"
                    ));
                }
                for c in &configs {
                    share_lines.push(format!(
                        "  {}={} ({})",
                        c.name,
                        c.value.as_deref().unwrap_or("(hidden)"),
                        if c.set_for_group { "group" } else { "default" }
                    ));
                }
                share_json = serde_json::json!({
                    "name": reading.share_group,
                    "exists": reading.exists,
                    "members": reading.members,
                    "total_backlog": reading.total_backlog,
                    "partitions_unknown": reading.partitions_unknown,
                    "partitions_offline": reading.partitions_offline,
                    "backlog_source": reading.backlog_source,
                    "in_flight": extra.as_ref().and_then(|x| x.in_flight),
                    "workers_reporting": extra.as_ref().map(|x| x.workers_reporting),
                    "configs": configs,
                });
            }
            Err(e) => problems.push(format!("share group {group}: {e}")),
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut json = serde_json::json!({ "topic": args.topic, "partitions": rows });
        if args.share_group.is_some() {
            json["share_group"] = share_json;
        }
        writeln!(out, "{json}")?;
    } else {
        print_rows(&mut out, &args.topic, &rows)?;
        for line in &share_lines {
            writeln!(out, "{line}")?;
        }
    }
    drop(out);
    for p in &problems {
        eprintln!("error: {p}");
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The table of `topic describe`; share columns when a row has them.
fn print_rows(out: &mut impl Write, topic: &str, rows: &[Row]) -> std::io::Result<()> {
    writeln!(out, "TOPIC {topic}  PARTITIONS {}", rows.len())?;
    let dash = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let shared = rows.iter().any(|r| r.share.is_some());
    let mut header = format!(
        "{:>9} {:>7} {:>12} {:>12}",
        "PARTITION", "LEADER", "LOW", "HIGH"
    );
    if shared {
        header += &format!(
            " {:>12} {:>10} {:>10}",
            "SHARE START", "BACKLOG", "IN FLIGHT"
        );
    }
    writeln!(out, "{header}")?;
    for r in rows {
        let mut line = format!(
            "{:>9} {:>7} {:>12} {:>12}",
            r.partition,
            dash(r.leader.map(i64::from)),
            dash(r.low),
            dash(r.high)
        );
        if let Some(sh) = r.share {
            let in_flight = sh
                .in_flight
                .map_or_else(|| "-".to_string(), |v| format!("~{v}"));
            line += &format!(
                " {:>12} {:>10} {in_flight:>10}",
                dash(sh.start_offset),
                dash(sh.backlog)
            );
        } else if shared {
            line += &format!(" {:>12} {:>10} {:>10}", "-", "-", "-");
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
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
