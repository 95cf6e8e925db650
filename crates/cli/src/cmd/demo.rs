//! `microbatch demo`: the whole system end to end.
//!
//! With no broker named it starts librdkafka's mock cluster in this process
//! (three brokers on 127.0.0.1 ports), so worker processes connect to it like
//! to any Kafka. A supervisor scales `microbatch run` children on lag through
//! four scenarios; every processed offset is audited, and the dead-letter
//! topic is read back, so the closing "lost" figure is checked, not assumed.
//!
//! With `--share-group` (a real Kafka 4.2+ broker only: the mock cluster has
//! no share groups) the workers join a share group and the supervisor scales
//! them on its backlog past the partition count; the same load then runs on
//! a consumer group, so the report compares the two.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::ProgressBar;
use microbatch_core::config::GroupProtocol;
use microbatch_core::dlq::headers;
use microbatch_kafka::aws_iam::WithTokens;
use microbatch_kafka::client::QuietContext;
use microbatch_kafka::share::{security, ShareConsumerConfig};
use microbatch_kafka::{ConfigError, KafkaConfig};
use microbatch_scaling::lag::{InvalidOffsetPolicy, LagReader};
use microbatch_scaling::observe::Observer;
use microbatch_scaling::policy::{
    HpaAlgorithm, KedaParams, KedaPolicy, Policy, RateParams, RatePolicy, HPA_TOLERANCE,
};
use microbatch_scaling::share_lag::ShareLagReader;
use microbatch_scaling::supervisor::{Supervisor, SupervisorConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::Producer as _;
use rdkafka::{Offset, TopicPartitionList};

use super::produce::{self, produce_blocking};
use super::supervise::kafka_env;
use serde::{Deserialize, Serialize};

use crate::args::KafkaArgs;
use crate::config_file::FromFile;
use crate::policy_args::PolicyKind;
use crate::report::{self, longest_plateau, PolicyRun, Report, Sample, ScenarioResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Every scenario in turn.
    All,
    /// A burst spread over 8 partitions, more slots than partitions.
    Fanout,
    /// A burst aimed at two partitions.
    Hot,
    /// No traffic: replicas fall back to the minimum.
    Idle,
    /// Steady load while the handler's downstream is down for a while:
    /// `rate` adds no replica during the outage and drains once it is back.
    Outage,
    /// A worker killed mid-burst; poison records go to the dead-letter topic.
    Failure,
}

crate::serde_value_enum!(Scenario);

#[derive(Debug, clap::Args, Serialize, Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub kafka: KafkaArgs,
    /// Which scenario to run.
    #[arg(long, value_enum, default_value = "all")]
    pub scenario: Scenario,
    /// Run the workers in a share group (KIP-932): every worker takes from
    /// every partition, so the supervisor scales past the 8 partitions up
    /// to --max-replicas (try 24); then the same load runs on a consumer
    /// group, capped at 8, and the report compares them. Needs a Kafka
    /// 4.2+ broker named with --bootstrap-servers.
    #[arg(long)]
    pub share_group: bool,
    /// Scaling policy.
    #[arg(long, value_enum, default_value = "rate")]
    pub policy: PolicyKind,
    /// Run the same load under both policies and compare them.
    #[arg(long)]
    pub compare: bool,
    /// A short run (smaller bursts, shorter windows), as CI uses.
    #[arg(long)]
    pub quick: bool,
    /// Most workers.
    #[arg(long, default_value_t = 6)]
    pub max_replicas: u32,
    /// Records per burst [default: 16000, --quick: 4000].
    #[arg(long)]
    pub burst: Option<u64>,
    /// Simulated processing time per record, milliseconds.
    #[arg(long, default_value_t = 5)]
    pub process_time_ms: u64,
    /// Processing slots per worker (`--concurrency`, key-ordered).
    #[arg(long, default_value_t = 4)]
    pub concurrency: u32,
    /// keda policy: lag per replica (the replaced system used 3).
    #[arg(long, default_value_t = 3)]
    pub lag_threshold: i64,
    /// Write the HTML report here [default: microbatch-demo/report.html].
    #[arg(long, value_name = "FILE")]
    pub report_html: Option<PathBuf>,
    /// Write the JSON report here [default: microbatch-demo/report.json].
    #[arg(long, value_name = "FILE")]
    pub report_json: Option<PathBuf>,
    /// The workers' consumer group protocol: classic or consumer (KIP-848,
    /// Kafka 4.0+) [default: consumer on the embedded broker, where a scale
    /// step moves partitions within a second; the workers' own default,
    /// classic, on a broker named with --bootstrap-servers].
    #[arg(long, env = "MICROBATCH_GROUP_PROTOCOL", value_parser = parse_group_protocol)]
    pub group_protocol: Option<GroupProtocol>,
    /// Leave the demo's topics and groups on the broker named with
    /// --bootstrap-servers (by default they are deleted when it ends).
    #[arg(long)]
    pub keep: bool,
}

fn parse_group_protocol(s: &str) -> Result<GroupProtocol, String> {
    s.parse()
}

impl Args {
    /// The workers' group protocol: as asked, or KIP-848 on the embedded
    /// broker (it serves it, with a short heartbeat: no classic rebalance
    /// round of seconds in every scale step) and the workers' default on
    /// a broker of the user's, which may predate Kafka 4.0.
    fn group_protocol(&self, embedded: bool) -> GroupProtocol {
        self.group_protocol.unwrap_or(if embedded {
            GroupProtocol::Consumer
        } else {
            microbatch_core::config::defaults::GROUP_PROTOCOL
        })
    }
}

/// The workers' classic session timeout on a real broker: the broker's
/// minimum, so that a killed worker is noticed soon.
const DEMO_SESSION_TIMEOUT_MS: u64 = 6_000;

/// The same on the embedded broker, which has no minimum: it waits this
/// less 1 s for members to rejoin in each classic rebalance round, so a
/// shorter session shortens every scale step. Its KIP-848 groups (set on
/// the broker, where Kafka's default is 45 s) fence a killed worker after
/// as long.
const EMBEDDED_SESSION_TIMEOUT_MS: u64 = 3_000;

/// The embedded broker's heartbeat interval for KIP-848 groups (its own
/// default is 3 s): a member learns of a new assignment at its next
/// heartbeat, so a scale step's partitions move within about a second.
const EMBEDDED_HEARTBEAT_MS: i32 = 500;

/// librdkafka's mock cluster, owned by the client it was made with (the
/// only way to reach the settings `MockCluster` does not wrap).
struct EmbeddedBroker {
    owner: rdkafka::producer::BaseProducer,
}

impl EmbeddedBroker {
    fn start() -> anyhow::Result<Self> {
        let owner: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
            .set("test.mock.num.brokers", "3")
            .create()?;
        // SAFETY: the client made the cluster and outlives this call; the
        // setters only store defaults for groups made after them.
        unsafe {
            let mock = rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr());
            anyhow::ensure!(!mock.is_null(), "librdkafka made no mock cluster");
            rdkafka::bindings::rd_kafka_mock_set_group_consumer_heartbeat_interval_ms(
                mock,
                EMBEDDED_HEARTBEAT_MS,
            );
            rdkafka::bindings::rd_kafka_mock_set_group_consumer_session_timeout_ms(
                mock,
                EMBEDDED_SESSION_TIMEOUT_MS as i32,
            );
        }
        Ok(Self { owner })
    }

    fn mock(&self) -> MockCluster<'_, rdkafka::producer::DefaultProducerContext> {
        self.owner
            .client()
            .mock_cluster()
            .expect("the client was made with test.mock.num.brokers")
    }
}

/// The broker the demo runs on.
enum DemoBroker {
    Embedded(EmbeddedBroker),
    External(KafkaConfig),
}

impl DemoBroker {
    fn kafka(&self) -> KafkaConfig {
        match self {
            DemoBroker::Embedded(b) => KafkaConfig::plaintext(b.mock().bootstrap_servers()),
            DemoBroker::External(k) => k.clone(),
        }
    }

    fn describe(&self) -> String {
        match self {
            DemoBroker::Embedded(b) => format!(
                "embedded (librdkafka mock cluster, 3 brokers at {})",
                b.mock().bootstrap_servers()
            ),
            DemoBroker::External(k) => k.bootstrap_servers.clone(),
        }
    }

    /// Creates a topic of the demo's own: on a broker it was given, a topic
    /// that already exists is someone else's (it would be read, counted and
    /// deleted as the demo's), so it is an error.
    fn create_topic(
        &self,
        runtime: &tokio::runtime::Runtime,
        topic: &str,
        partitions: i32,
    ) -> anyhow::Result<()> {
        match self {
            DemoBroker::Embedded(b) => b
                .mock()
                .create_topic(topic, partitions, 1)
                .with_context(|| format!("creating {topic} on the embedded broker")),
            DemoBroker::External(k) => {
                let created = runtime
                    .block_on(microbatch_kafka::admin::create_topic(
                        k,
                        topic,
                        partitions,
                        1,
                        Duration::from_secs(30),
                    ))
                    .with_context(|| format!("creating {topic}"))?;
                anyhow::ensure!(
                    created,
                    "topic {topic} already exists on {}: not the demo's to use",
                    k.bootstrap_servers
                );
                Ok(())
            }
        }
    }
}

/// The groups a run on `topic` uses: the workers' group first, then (for a
/// share group) the companion group of its capacity reports.
fn demo_groups(topic: &str, share: bool) -> Vec<String> {
    if share {
        let group = format!("{topic}-share");
        let reports = microbatch_kafka::capacity_report::share_capacity_group(&group);
        vec![group, reports]
    } else {
        vec![format!("{topic}-group")]
    }
}

/// What the demo made on a broker it was given, removed when it ends (on
/// success, error or Ctrl-C) unless `--keep`: its topics, then its groups,
/// whose members have left by then (a SIGKILLed worker's session can take
/// a little longer: waited for, then said).
struct Leftovers<'a> {
    runtime: &'a tokio::runtime::Runtime,
    /// `None`: nothing to remove (the embedded broker, or `--keep`).
    kafka: Option<KafkaConfig>,
    topics: Vec<String>,
    groups: Vec<String>,
}

/// How long the whole clean-up may take: a group whose members are still
/// leaving is waited for within it, and a broker that does not answer
/// holds the demo's exit no longer.
const CLEANUP_PATIENCE: Duration = Duration::from_secs(20);

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        let Some(kafka) = self.kafka.take() else {
            return;
        };
        if self.topics.is_empty() && self.groups.is_empty() {
            return;
        }
        let deadline = Instant::now() + CLEANUP_PATIENCE;
        let left_time = || deadline.saturating_duration_since(Instant::now());
        let mut left = Vec::new();
        for topic in &self.topics {
            if left_time().is_zero() {
                left.push(format!("topic {topic} (no time left)"));
                continue;
            }
            let deleted = self.runtime.block_on(microbatch_kafka::admin::delete_topic(
                &kafka,
                topic,
                left_time(),
            ));
            if let Err(e) = deleted {
                left.push(format!("topic {topic} ({e})"));
            }
        }
        let mut groups: Vec<&str> = self.groups.iter().map(String::as_str).collect();
        if left_time().is_zero() {
            left.extend(
                groups
                    .drain(..)
                    .map(|g| format!("group {g} (no time left)")),
            );
        }
        while !groups.is_empty() {
            let answers = self
                .runtime
                .block_on(microbatch_kafka::admin::delete_groups(
                    &kafka,
                    &groups,
                    left_time(),
                ));
            let failed: Vec<(String, Option<RDKafkaErrorCode>, String)> = match answers {
                Ok(answers) => answers
                    .into_iter()
                    .filter_map(|(group, r)| {
                        let code = r.err()?;
                        Some((group, Some(code), format!("{code:?}")))
                    })
                    .collect(),
                Err(e) => groups
                    .iter()
                    .map(|g| (g.to_string(), None, e.to_string()))
                    .collect(),
            };
            groups.retain(|g| failed.iter().any(|(f, _, _)| f == g));
            // Only members still leaving are worth waiting for.
            let waiting = failed
                .iter()
                .all(|(_, code, _)| *code == Some(RDKafkaErrorCode::NonEmptyGroup));
            if groups.is_empty() || !waiting || left_time() < Duration::from_secs(1) {
                left.extend(
                    failed
                        .into_iter()
                        .map(|(g, _, why)| format!("group {g} ({why})")),
                );
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        if left.is_empty() {
            eprintln!(
                "removed the demo's topics and groups from {} (--keep leaves them)",
                kafka.bootstrap_servers
            );
        } else {
            eprintln!(
                "could not remove from {}: {}; delete them with Kafka's kafka-topics.sh, \
                 kafka-consumer-groups.sh and kafka-share-groups.sh --delete",
                kafka.bootstrap_servers,
                left.join(", ")
            );
        }
    }
}

/// Timings that --quick shortens.
struct Plan {
    burst: u64,
    window: Duration,
    tick: Duration,
    phase_timeout: Duration,
    outage: OutagePlan,
}

/// The outage scenario: `rate` records/s for `load`, the downstream down
/// from `down_from` for `down_for` (times from the scenario's start).
struct OutagePlan {
    rate: u64,
    load: Duration,
    down_from: Duration,
    down_for: Duration,
}

impl OutagePlan {
    fn down_at(&self, elapsed: Duration) -> bool {
        elapsed >= self.down_from && elapsed < self.down_from + self.down_for
    }

    fn over_at(&self, elapsed: Duration) -> bool {
        elapsed >= self.down_from + self.down_for
    }
}

pub fn execute(args: Args, runtime: &tokio::runtime::Runtime) -> anyhow::Result<ExitCode> {
    let named = args.kafka.bootstrap_servers.is_some();
    if args.max_replicas == 0 {
        return Err(ConfigError::new("--max-replicas", "must be at least 1").into());
    }
    if args.concurrency == 0 {
        return Err(ConfigError::new("--concurrency", "must be at least 1").into());
    }
    if args.share_group && !named {
        return Err(ConfigError::new(
            "--share-group",
            "the embedded broker (librdkafka's mock cluster) has no share groups; start a \
             Kafka 4.2+ broker (scripts/kafka-local.sh start runs one) and name it with \
             --bootstrap-servers 127.0.0.1:9092",
        )
        .into());
    }
    let broker = if named {
        DemoBroker::External(args.kafka.resolve()?.start_msk_iam()?)
    } else {
        DemoBroker::Embedded(EmbeddedBroker::start().context("starting the embedded broker")?)
    };
    let plan = Plan {
        burst: args.burst.unwrap_or(if args.quick { 4000 } else { 16_000 }),
        window: Duration::from_secs(if args.quick { 4 } else { 10 }),
        tick: Duration::from_millis(500),
        phase_timeout: Duration::from_secs(if args.quick { 60 } else { 90 }),
        // About half a replica's work (4 slots at 5 ms a record do 800/s),
        // so one replica suffices before and after, and any added during
        // the outage is the policy's mistake.
        outage: OutagePlan {
            rate: 400,
            load: Duration::from_secs(if args.quick { 16 } else { 30 }),
            down_from: Duration::from_secs(if args.quick { 3 } else { 5 }),
            down_for: Duration::from_secs(if args.quick { 8 } else { 15 }),
        },
    };
    let out_dir = PathBuf::from("microbatch-demo");
    let html_path = args
        .report_html
        .clone()
        .unwrap_or_else(|| out_dir.join("report.html"));
    let json_path = args
        .report_json
        .clone()
        .unwrap_or_else(|| out_dir.join("report.json"));
    for p in [&html_path, &json_path] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let run_id: u32 = rand::random();
    // A random part too: in a container restarted with its files kept the
    // pid comes back, with a run's leftovers (an outage file) beside it.
    let work = std::env::temp_dir().join(format!(
        "microbatch-demo-{}-{run_id:08x}",
        std::process::id()
    ));
    std::fs::create_dir_all(&work)?;

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        runtime.spawn(async move {
            super::shutdown_signal().await;
            flag.store(true, Ordering::SeqCst);
        });
    }

    eprintln!(
        "microbatch demo on {}, group protocol {}",
        broker.describe(),
        args.group_protocol(!named)
    );
    let policies: Vec<PolicyKind> = if args.compare {
        vec![PolicyKind::Keda, PolicyKind::Rate]
    } else {
        vec![args.policy]
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // With --share-group each policy runs on a share group, then on a
    // consumer group for comparison.
    let kinds: &[bool] = if args.share_group {
        &[true, false]
    } else {
        &[false]
    };
    let mut leftovers = Leftovers {
        runtime,
        kafka: match &broker {
            DemoBroker::External(k) if !args.keep => Some(k.clone()),
            _ => None,
        },
        topics: Vec::new(),
        groups: Vec::new(),
    };
    let mut runs = Vec::new();
    for (kind, share) in policies
        .iter()
        .flat_map(|k| kinds.iter().map(move |share| (*k, *share)))
    {
        let name = match (kind, share) {
            (PolicyKind::Keda, false) => "keda",
            (PolicyKind::Rate, false) => "rate",
            (PolicyKind::Keda, true) => "keda-share",
            (PolicyKind::Rate, true) => "rate-share",
        };
        // A random part too: two demos started within a second (in
        // containers, both PID 1) share no topic and no group.
        let topic = format!("microbatch-demo-{stamp}-{run_id:08x}-{name}");
        let dlq = format!("{topic}.dlq");
        // Each as soon as it exists: whatever happens next, it goes; what
        // was never made (or was someone else's) is never deleted.
        broker.create_topic(runtime, &topic, 8)?;
        leftovers.topics.push(topic.clone());
        broker.create_topic(runtime, &dlq, 1)?;
        leftovers.topics.push(dlq.clone());
        leftovers.groups.extend(demo_groups(&topic, share));
        let run_dir = work.join(name);
        std::fs::create_dir_all(&run_dir)?;
        let group = Group { share };
        let run = run_policy(
            &args,
            &plan,
            &broker,
            (kind, group),
            &topic,
            &run_dir,
            &interrupted,
            runtime.handle(),
        )?;
        runs.push(run);
        if interrupted.load(Ordering::SeqCst) {
            break;
        }
    }
    let lost = runs.iter().map(|r| r.lost).sum();
    let report = Report {
        broker: broker.describe(),
        group_protocol: args.group_protocol(!named).to_string(),
        quick: args.quick,
        lost,
        runs,
    };
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&html_path, report::html(&report))
        .with_context(|| format!("writing {}", html_path.display()))?;
    print_summary(&report);
    drop(leftovers);
    println!(
        "report: {} (JSON: {})",
        html_path.display(),
        json_path.display()
    );
    let _ = std::fs::remove_dir_all(&work);
    if interrupted.load(Ordering::SeqCst) {
        eprintln!("interrupted; every worker was stopped");
        return Ok(ExitCode::from(130));
    }
    Ok(if lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The demo's own settings for each policy: a short drain target and a
/// cold-start guess from the simulated handler's time per record.
fn demo_policy(kind: PolicyKind, args: &Args, plan: &Plan) -> Box<dyn Policy> {
    match kind {
        PolicyKind::Keda => Box::new(KedaPolicy::new(KedaParams {
            lag_threshold: args.lag_threshold.max(1),
            activation_lag_threshold: 1,
            min_replicas: 1,
            max_replicas: args.max_replicas,
            scale_down_stabilization: plan.window,
            cooldown: plan.window,
            offset_reset_latest: false,
            // As the kit's ScaledObject, which spells out a behavior.
            hpa: HpaAlgorithm::WithBehavior,
            ..KedaParams::default()
        })),
        PolicyKind::Rate => {
            // A slot finishes a record every process_time: the cold-start guess.
            let per_slot = 1000.0 / args.process_time_ms.max(1) as f64;
            Box::new(RatePolicy::new(RateParams {
                target_drain: Duration::from_secs(if args.quick { 5 } else { 10 }),
                min_replicas: 1,
                max_replicas: args.max_replicas,
                slots_per_partition: args.concurrency,
                slots_per_replica: args.concurrency,
                initial_rate_per_replica: per_slot * f64::from(args.concurrency),
                scale_down_stabilization: plan.window,
                tolerance: HPA_TOLERANCE,
                max_lag: None,
            }))
        }
    }
}

/// Produces `count` records in the background, at `rate` records/s (0:
/// at once).
fn start_load(
    kafka: &KafkaConfig,
    topic: &str,
    (count, rate): (u64, u64),
    partitions: Vec<i32>,
    poison_every: u64,
    start_seq: u64,
) -> JoinHandle<u64> {
    let kafka = kafka.clone();
    let load = produce::Load {
        topic: topic.to_string(),
        count,
        rate,
        size: 100,
        keys: 1000,
        partitions,
        poison_every,
        start_seq,
    };
    std::thread::spawn(move || {
        match produce_blocking(
            &kafka,
            &load,
            &produce::Values::Padded,
            &ProgressBar::hidden(),
        ) {
            Ok(s) => s.delivered,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "producing the burst failed");
                0
            }
        }
    })
}

/// What the outage scenario saw while the downstream was down.
#[derive(Debug, Default, Clone, Copy)]
struct OutageSeen {
    at_start: u32,
    most_running: u32,
    most_desired: u32,
    /// Ticks since it went down.
    ticks: u32,
}

/// Which kind of group a run's workers join.
#[derive(Debug, Clone, Copy)]
struct Group {
    share: bool,
}

/// Runs the scenarios under one policy and checks the outcome.
#[allow(clippy::too_many_arguments)]
fn run_policy(
    args: &Args,
    plan: &Plan,
    broker: &DemoBroker,
    (kind, group_kind): (PolicyKind, Group),
    topic: &str,
    dir: &Path,
    interrupted: &AtomicBool,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<PolicyRun> {
    let kafka = &broker.kafka();
    let embedded = matches!(broker, DemoBroker::Embedded(_));
    let share = group_kind.share;
    let group = demo_groups(topic, share).swap_remove(0);
    let dlq = format!("{topic}.dlq");
    let audit = dir.join("w{n}.audit");
    // The workers' handler fails every batch while it exists (the outage
    // scenario).
    let outage_file = dir.join("downstream-down");
    let run_args: Vec<String> = [
        "--topic",
        topic,
        if share { "--share-group" } else { "--group" },
        &group,
        "--handler",
        "simulate",
        "--process-time-ms",
        &args.process_time_ms.to_string(),
        "--poison-marker",
        "POISON",
        "--simulate-outage-file",
        outage_file
            .to_str()
            .context("the work directory is not UTF-8")?,
        "--max-records",
        "10",
        "--max-wait-ms",
        "50",
        "--ordering",
        // A share group orders nothing.
        if share { "none" } else { "key" },
        "--concurrency",
        &args.concurrency.to_string(),
        "--commit-interval-ms",
        "250",
        "--drain-timeout-ms",
        "5000",
        "--retry-initial-ms",
        "20",
        "--retry-max-ms",
        "200",
        "--max-attempts",
        "3",
        "--dlq-topic",
        &dlq,
        "--audit-log",
        audit.to_str().context("the work directory is not UTF-8")?,
        "--http-port",
        "0",
        "--http-host",
        "127.0.0.1",
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let session_ms = if embedded {
        EMBEDDED_SESSION_TIMEOUT_MS
    } else {
        DEMO_SESSION_TIMEOUT_MS
    };
    let session_timeout = format!("session.timeout.ms={session_ms}");
    let mut run_args = run_args;
    match args.group_protocol(embedded) {
        // No consumer-group protocol in a share group.
        _ if share => {}
        // Notice the killed worker sooner (see the constants); the worker's
        // own heartbeat (500 ms) fits either session.
        GroupProtocol::Classic => {
            run_args.extend(["--kafka-property", &session_timeout].map(String::from))
        }
        // The broker's group.consumer.* settings decide.
        GroupProtocol::Consumer => {
            run_args.extend(["--group-protocol", "consumer"].map(String::from))
        }
    }
    let min_replicas = 1;
    let config = SupervisorConfig {
        program: std::env::current_exe().context("locating the microbatch binary")?,
        run_args,
        min_replicas,
        max_replicas: args.max_replicas,
        kill_after: Duration::from_secs(10),
        log_dir: Some(dir.to_path_buf()),
        timeline: None,
        env: kafka_env(kafka, &kafka.properties),
    };
    let dlq_watch = watermark_reader(kafka)?;
    let observer = if share {
        let bootstrap = ShareConsumerConfig::from_kafka(kafka, &group, vec![])?.bootstrap;
        // A broker without share groups (or without their lag, Kafka
        // 4.2+) would leave workers restarting and every reading failing
        // until the scenarios time out: asked once, before any worker.
        let probe = runtime.block_on(microbatch_kafka::share::backlog::read(
            security::connector(kafka)?,
            bootstrap.clone(),
            &group,
            topic,
            Duration::from_secs(10),
        ));
        let refused = match probe {
            Err(e) => Some(e.to_string()),
            Ok(b) if b.backlog_source != microbatch_kafka::share::backlog::SOURCE_BROKER_LAG => {
                Some("it reports no share-group lag".to_string())
            }
            Ok(_) => None,
        };
        if let Some(why) = refused {
            return Err(ConfigError::new(
                "--share-group",
                format!(
                    "the broker at {} cannot serve the demo's share group ({why}); it needs \
                     Kafka 4.2+ with share groups enabled (scripts/kafka-local.sh start runs one)",
                    kafka.bootstrap_servers
                ),
            )
            .into());
        }
        let reader = ShareLagReader::new(
            security::connector(kafka)?,
            bootstrap,
            &group,
            topic,
            Duration::from_secs(10),
            runtime.clone(),
        )
        .with_worker_reports(kafka)?;
        Observer::share(reader, InvalidOffsetPolicy::Earliest)
    } else {
        let reader = LagReader::new(kafka, &group, topic, Duration::from_secs(10))?;
        Observer::new(reader, InvalidOffsetPolicy::Earliest)
    };
    let mut sup = Supervisor::new(config, demo_policy(kind, args, plan), observer)?;
    let scenarios: Vec<Scenario> = match args.scenario {
        Scenario::All => vec![
            Scenario::Fanout,
            Scenario::Hot,
            Scenario::Idle,
            Scenario::Outage,
            Scenario::Failure,
        ],
        s => vec![s],
    };
    let classic = !share && args.group_protocol(embedded) == GroupProtocol::Classic;
    if classic {
        wait_for_first_assignment(&mut sup, &dlq_watch, &group, interrupted);
    }
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut timeline: Vec<Sample> = Vec::new();
    let mut results = Vec::new();
    let mut produced_total = 0u64;
    let mut seq = 0u64;
    let mut view = LiveView::new(tty, sup.policy_name());

    for scenario in scenarios {
        if interrupted.load(Ordering::SeqCst) {
            break;
        }
        let name = format!("{scenario:?}").to_lowercase();
        let phase_start = Instant::now();
        let (partitions, poison_every, count) = match scenario {
            Scenario::Fanout => (Vec::new(), 0, (plan.burst, 0)),
            Scenario::Hot => (vec![0, 1], 0, (plan.burst / 2, 0)),
            Scenario::Failure => (Vec::new(), 200, (plan.burst, 0)),
            Scenario::Outage => (
                Vec::new(),
                0,
                (
                    plan.outage.rate * plan.outage.load.as_secs(),
                    plan.outage.rate,
                ),
            ),
            Scenario::Idle | Scenario::All => (Vec::new(), 0, (0, 0)),
        };
        let outage = (scenario == Scenario::Outage).then_some(&plan.outage);
        let mut producer =
            (count.0 > 0).then(|| start_load(kafka, topic, count, partitions, poison_every, seq));
        let count = count.0;
        seq += count;
        let mut produced = 0;
        let mut peak = sup.replicas();
        let mut killed = 0;
        let mut drained_at = None;
        let mut saw_lag = false;
        // While the downstream is down: the replicas when it went down,
        // the most running and the most the policy asked for after that
        // (the tick it went down decided on readings from before), and
        // when it came back.
        let mut outage_seen: Option<OutageSeen> = None;
        let mut back_at = None;
        let dead_at_start = dlq_total(&dlq_watch, &dlq);
        let mut dead_at_end = dead_at_start;
        loop {
            if interrupted.load(Ordering::SeqCst) {
                break;
            }
            let tick_start = Instant::now();
            let down = outage.is_some_and(|o| o.down_at(phase_start.elapsed()));
            if down != outage_file.exists() {
                if down {
                    std::fs::write(&outage_file, b"")
                        .with_context(|| format!("writing {}", outage_file.display()))?;
                    outage_seen = Some(OutageSeen {
                        at_start: sup.replicas(),
                        most_running: sup.replicas(),
                        most_desired: 0,
                        ticks: 0,
                    });
                } else {
                    let _ = std::fs::remove_file(&outage_file);
                    back_at = Some(phase_start.elapsed());
                }
            }
            let point = sup.tick();
            if let Some(h) = producer.take_if(|h| h.is_finished()) {
                produced = h.join().unwrap_or(0);
            }
            let dead = dlq_total(&dlq_watch, &dlq);
            if let Some(p) = &point {
                peak = peak.max(p.replicas);
                saw_lag |= p.total_lag > 0;
                timeline.push(Sample {
                    t_ms: started.elapsed().as_millis() as u64,
                    scenario: name.clone(),
                    total_lag: p.total_lag,
                    replicas: p.replicas,
                    desired: p.desired,
                    processed_per_sec: p.processed_per_sec,
                    done: p.done,
                    dead_lettered: dead,
                    partition_lag: p.partition_lag.clone(),
                    downstream_down: down,
                });
                if let Some(o) = outage_seen.as_mut().filter(|_| down) {
                    if o.ticks > 0 {
                        o.most_running = o.most_running.max(p.replicas);
                        o.most_desired = o.most_desired.max(p.desired);
                    }
                    o.ticks += 1;
                }
                // The most seen: a failed read counts 0.
                dead_at_end = dead_at_end.max(dead);
                view.draw(&name, phase_start.elapsed(), p, dead);
                // Kill a worker once the burst is being worked on by several
                // (or, failing that, a few seconds in, whatever runs).
                let working = p.processed_per_sec > 0.0 && p.replicas >= 2;
                if scenario == Scenario::Failure
                    && killed == 0
                    && p.total_lag > 0
                    && (working || phase_start.elapsed() > Duration::from_secs(3))
                    && sup.kill_one(0).is_some()
                {
                    killed += 1;
                }
                let burst_done = producer.is_none() && count > 0;
                let outage_over = outage.is_none_or(|o| o.over_at(phase_start.elapsed()));
                if burst_done && outage_over && p.total_lag == 0 && saw_lag {
                    drained_at = Some(phase_start.elapsed());
                    break;
                }
                if scenario == Scenario::Idle
                    && p.replicas == min_replicas
                    && phase_start.elapsed() >= plan.window
                {
                    break;
                }
            }
            if phase_start.elapsed() > plan.phase_timeout {
                break;
            }
            let spent = tick_start.elapsed();
            if spent < plan.tick {
                std::thread::sleep(plan.tick - spent);
            }
        }
        // Whatever ended the scenario (a timeout, Ctrl-C), the downstream
        // is back for the next.
        let _ = std::fs::remove_file(&outage_file);
        if let Some(h) = producer.take() {
            produced = h.join().unwrap_or(0);
        }
        produced_total += produced;
        let replicas_at_end = sup.replicas();
        let (passed, note) = match scenario {
            Scenario::Idle => (
                replicas_at_end == min_replicas,
                format!("replicas back to {replicas_at_end} (min {min_replicas})"),
            ),
            Scenario::Failure => (
                drained_at.is_some() && killed > 0,
                format!("{killed} worker killed with SIGKILL; drained"),
            ),
            Scenario::Outage => {
                let OutageSeen {
                    at_start,
                    most_running,
                    most_desired,
                    ..
                } = outage_seen.unwrap_or_default();
                let most = most_running.max(most_desired);
                let dead = (dead_at_end - dead_at_start).max(0);
                let recovered = match (drained_at, back_at) {
                    (Some(d), Some(b)) => {
                        format!(
                            "drained {:.1} s after it",
                            d.saturating_sub(b).as_secs_f64()
                        )
                    }
                    _ => "not drained".to_string(),
                };
                let note = format!(
                    "downstream down {} s: replicas {at_start} when it went down, at most \
                     {most_running} running and {most_desired} asked for during it; {recovered}; \
                     {dead} dead-lettered",
                    plan.outage.down_for.as_secs()
                );
                // The hold is `rate`'s promise; keda's own trigger scales
                // on the growing lag, and the report shows it doing so.
                let held = kind != PolicyKind::Rate || most <= at_start;
                // No record of it is bad: an outage dead-letters nothing.
                (
                    drained_at.is_some() && outage_seen.is_some() && held && dead == 0,
                    note,
                )
            }
            _ => (drained_at.is_some(), "drained".to_string()),
        };
        let own: Vec<Sample> = timeline
            .iter()
            .filter(|s| s.scenario == name)
            .cloned()
            .collect();
        let plateau = longest_plateau(&own);
        let longest_stall_seconds = plateau.map_or(0.0, |p| p.seconds());
        let cause = plateau.map(|p| crate::report::stall_cause(&own, p, killed));
        let mut stall_cause = cause
            .as_ref()
            .map(|c| c.text().to_string())
            .unwrap_or_default();
        let rebalance = matches!(cause, Some(crate::report::StallCause::Rebalance(_)));
        if embedded && classic && rebalance {
            // librdkafka's mock cluster, not the worker: it gives members
            // that long to rejoin in every classic rebalance round.
            stall_cause.push_str(&format!(
                "; the embedded broker waits session.timeout.ms - 1 s ({} s) for members \
                 to rejoin in each classic rebalance round, and a scale step takes two",
                EMBEDDED_SESSION_TIMEOUT_MS / 1000 - 1
            ));
        }
        results.push(ScenarioResult {
            name,
            produced,
            drain_seconds: drained_at.map(|d| d.as_secs_f64()),
            longest_stall_seconds,
            stall_cause,
            peak_replicas: peak,
            replicas_at_end,
            workers_killed: killed,
            passed,
            note,
        });
    }
    view.finish();
    let replica_seconds = sup.replica_seconds;
    let policy = sup.policy_name().to_string();
    drop(sup); // stops every worker: SIGTERM, drain, SIGKILL only past the deadline

    let verification = verify(kafka, topic, dir, &dlq)?;
    let peak_replicas = timeline.iter().map(|s| s.replicas).max().unwrap_or(0);
    let rose = results
        .iter()
        .filter(|r| r.name != "idle")
        .any(|r| r.peak_replicas > min_replicas);
    let fell = results
        .iter()
        .find(|r| r.name == "idle")
        .map(|r| r.replicas_at_end == min_replicas)
        .unwrap_or(true);
    Ok(PolicyRun {
        policy,
        group_kind: if share { "share" } else { "consumer" }.to_string(),
        topic: topic.to_string(),
        group,
        records_per_worker: verification.per_worker,
        produced: produced_total,
        processed: verification.succeeded + verification.dead_lettered,
        succeeded: verification.succeeded,
        dead_lettered: verification.dead_lettered,
        duplicates: verification.duplicates,
        lost: verification.lost,
        peak_replicas,
        replica_seconds,
        min_replicas,
        max_replicas: args.max_replicas,
        replicas_rose_during_burst: rose,
        replicas_fell_back_when_idle: fell,
        scenarios: results,
        timeline,
    })
}

struct Verification {
    succeeded: u64,
    dead_lettered: u64,
    duplicates: u64,
    lost: u64,
    /// Records each worker handled (its audit log), most first.
    per_worker: Vec<u64>,
}

/// Brokers hold a new classic group's first join for
/// group.initial.rebalance.delay.ms (3 s by default, and on the embedded
/// broker, which offers no way to change it): the scenarios start once the
/// first worker has its partitions, so that wait does not read as a stall.
fn wait_for_first_assignment(
    sup: &mut Supervisor,
    consumer: &BaseConsumer<QuietContext>,
    group: &str,
    interrupted: &AtomicBool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !interrupted.load(Ordering::SeqCst) {
        sup.tick();
        let stable = consumer
            .fetch_group_list(Some(group), Duration::from_secs(2))
            .is_ok_and(|list| {
                list.groups()
                    .iter()
                    .any(|g| g.state() == "Stable" && !g.members().is_empty())
            });
        if stable {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn watermark_reader(kafka: &KafkaConfig) -> anyhow::Result<WithTokens<BaseConsumer<QuietContext>>> {
    kafka
        .create_client(&kafka.client_config(), QuietContext::new(kafka))
        .context("creating a watermark reader")
}

fn dlq_total(consumer: &BaseConsumer<QuietContext>, dlq: &str) -> i64 {
    consumer
        .fetch_watermarks(dlq, 0, Duration::from_secs(5))
        .map(|(low, high)| high - low)
        .unwrap_or(0)
}

/// Checks every offset of the topic was processed or dead-lettered.
fn verify(kafka: &KafkaConfig, topic: &str, dir: &Path, dlq: &str) -> anyhow::Result<Verification> {
    let mut seen: BTreeMap<(i32, i64), u64> = BTreeMap::new();
    let mut per_worker = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "audit") {
            let text = std::fs::read_to_string(&path)?;
            per_worker.push(text.lines().count() as u64);
            for line in text.lines() {
                let mut it = line.split_whitespace();
                if let (Some(p), Some(o)) = (it.next(), it.next()) {
                    if let (Ok(p), Ok(o)) = (p.parse(), o.parse()) {
                        *seen.entry((p, o)).or_insert(0) += 1;
                    }
                }
            }
        }
    }
    per_worker.sort_unstable_by(|a, b| b.cmp(a));
    let dead = read_dead_letters(kafka, dlq)?;
    // Only the watermarks are read (every offset in them must be
    // accounted for), whatever group the workers were in.
    let reader = LagReader::new(
        kafka,
        &format!("{topic}-verify"),
        topic,
        Duration::from_secs(10),
    )?;
    let lag = reader.read(InvalidOffsetPolicy::Earliest)?;
    // An offline partition's offsets cannot be checked: no verdict.
    if !lag.partitions_offline.is_empty() {
        anyhow::bail!(
            "cannot verify: {}",
            microbatch_kafka::share::ShareError::offline(topic, &lag.partitions_offline)
        );
    }
    let mut lost = 0;
    for p in &lag.partitions {
        for o in p.low..p.high {
            if !seen.contains_key(&(p.partition, o)) && !dead.contains(&(p.partition, o)) {
                lost += 1;
            }
        }
    }
    Ok(Verification {
        succeeded: seen.len() as u64,
        dead_lettered: dead.len() as u64,
        duplicates: seen.values().map(|n| n - 1).sum(),
        lost,
        per_worker,
    })
}

/// (partition, offset) of every dead letter, from their context headers.
fn read_dead_letters(kafka: &KafkaConfig, dlq: &str) -> anyhow::Result<BTreeSet<(i32, i64)>> {
    // assign() needs a group id; this reader never commits.
    let consumer: WithTokens<BaseConsumer<QuietContext>> = kafka.create_client(
        kafka
            .client_config()
            .set("group.id", format!("{dlq}-reader"))
            .set("enable.auto.commit", "false"),
        QuietContext::new(kafka),
    )?;
    let (low, high) = consumer.fetch_watermarks(dlq, 0, Duration::from_secs(10))?;
    let mut out = BTreeSet::new();
    if high <= low {
        return Ok(out);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(dlq, 0, Offset::Offset(low))?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next = low;
    while next < high && Instant::now() < deadline {
        let Some(Ok(msg)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        next = msg.offset() + 1;
        let header = |name: &str| -> Option<i64> {
            msg.headers()?
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
        };
        if let (Some(p), Some(o)) = (
            header(headers::ORIGINAL_PARTITION),
            header(headers::ORIGINAL_OFFSET),
        ) {
            out.insert((p as i32, o));
        }
    }
    Ok(out)
}

/// The live view: a redrawn block on a terminal, plain lines otherwise.
struct LiveView {
    tty: bool,
    policy: &'static str,
    lines_drawn: usize,
    last_plain: Option<Instant>,
}

impl LiveView {
    fn new(tty: bool, policy: &'static str) -> Self {
        Self {
            tty,
            policy,
            lines_drawn: 0,
            last_plain: None,
        }
    }

    fn draw(
        &mut self,
        scenario: &str,
        elapsed: Duration,
        p: &microbatch_scaling::supervisor::TimelinePoint,
        dead: i64,
    ) {
        let mut err = std::io::stderr().lock();
        if !self.tty {
            if self
                .last_plain
                .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
            {
                return;
            }
            self.last_plain = Some(Instant::now());
            let _ = writeln!(
                err,
                "[{}] {scenario:<8} t={:>5.1}s lag={:<7} replicas={}/{} committed/s={:<6.0} dlq={}",
                self.policy,
                elapsed.as_secs_f64(),
                p.total_lag,
                p.replicas,
                p.desired,
                p.processed_per_sec,
                dead
            );
            return;
        }
        if self.lines_drawn > 0 {
            let _ = write!(err, "\x1b[{}A", self.lines_drawn);
        }
        let max = p.partition_lag.iter().copied().max().unwrap_or(0).max(1);
        let mut lines = vec![
            format!(
                "\x1b[2Kpolicy {}  scenario {scenario}  {:.1}s",
                self.policy,
                elapsed.as_secs_f64()
            ),
            format!(
                "\x1b[2Klag {:<8} replicas {} (desired {})  committed {:.0}/s  dead letters {}",
                p.total_lag, p.replicas, p.desired, p.processed_per_sec, dead
            ),
        ];
        for (i, lag) in p.partition_lag.iter().enumerate() {
            let width = (*lag as f64 / max as f64 * 40.0).round() as usize;
            lines.push(format!("\x1b[2K  p{i:<2} {:<40} {lag}", "█".repeat(width)));
        }
        for l in &lines {
            let _ = writeln!(err, "{l}");
        }
        self.lines_drawn = lines.len();
    }

    fn finish(&mut self) {
        self.lines_drawn = 0;
    }
}

fn print_summary(report: &Report) {
    println!();
    for run in &report.runs {
        println!(
            "policy {:<5} {:<8} group  produced {:>7}  processed {:>7}  dead-lettered {:>4}  duplicates {:>5}  lost {}  peak replicas {}  replica-seconds {:.0}",
            run.policy,
            run.group_kind,
            run.produced,
            run.processed,
            run.dead_lettered,
            run.duplicates,
            run.lost,
            run.peak_replicas,
            run.replica_seconds
        );
        println!(
            "  records per worker ({} workers): {:?}",
            run.records_per_worker.len(),
            run.records_per_worker
        );
        for s in &run.scenarios {
            println!(
                "  {:<8} produced {:>6}  drain {:>7}  longest stall {:>5.1}s  peak replicas {:>2}  end replicas {:>2}  {} {}{}",
                s.name,
                s.produced,
                s.drain_seconds.map(|d| format!("{d:.1}s")).unwrap_or_else(|| "-".into()),
                s.longest_stall_seconds,
                s.peak_replicas,
                s.replicas_at_end,
                if s.passed { "ok" } else { "FAILED" },
                s.note,
                if s.stall_cause.is_empty() {
                    String::new()
                } else {
                    format!("; stall: {}", s.stall_cause)
                }
            );
        }
    }
    println!("lost = {}", report.lost);
}

impl FromFile for Args {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.kafka.config_file()
    }
}
