//! `microbatch supervise`: the single-machine autoscaler.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::routing::get;
use microbatch_kafka::share::{security, ShareConsumerConfig};
use microbatch_kafka::{ConfigError, KafkaConfig};
use microbatch_scaling::defaults;
use microbatch_scaling::lag::LagReader;
use microbatch_scaling::observe::Observer;
use microbatch_scaling::share_lag::ShareLagReader;
use microbatch_scaling::supervisor::{Supervisor, SupervisorConfig};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::args::{properties_to_env, require, GroupArgs, KafkaArgs, KAFKA_PROPERTIES_ENV};
use serde::{Deserialize, Serialize};

use crate::config_file::FromFile;
use crate::policy_args::{make_policy, PolicyArgs, PolicyKind};

#[derive(Debug, clap::Args, Serialize, Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub workers: GroupArgs,
    /// Run the workers as members of this share group (KIP-932, Kafka 4.2+)
    /// and scale on its backlog instead of a consumer group's lag. Every
    /// worker takes records from every partition, so --max is not capped
    /// by the partition count. See docs/share-groups.md.
    #[arg(
        long,
        env = "SHARE_GROUP",
        value_name = "NAME",
        conflicts_with = "group"
    )]
    pub share_group: Option<String>,
    /// Scaling policy.
    #[arg(long, value_enum, default_value_t = PolicyKind::Rate)]
    pub policy: PolicyKind,
    #[command(flatten)]
    #[serde(flatten)]
    pub policy_args: PolicyArgs,
    /// How often to read lag and decide.
    #[arg(long, default_value_t = defaults::SUPERVISE_POLLING_INTERVAL_MS)]
    pub polling_interval_ms: u64,
    /// Workers' drain deadline; a stopped worker is killed 15 s after it (or
    /// after a longer one given to the workers after `--`).
    #[arg(long, default_value_t = microbatch_core::config::defaults::DRAIN_TIMEOUT_MS)]
    pub drain_timeout_ms: u64,
    /// Write one JSON line per poll: {"t_ms","total_lag","replicas","desired","rate_per_replica",…}.
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<PathBuf>,
    /// Directory for the workers' logs (worker-N.log), created if missing;
    /// inherited stderr if unset.
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Port for the supervisor's /healthz and /metrics; 0 picks one.
    #[arg(long, default_value_t = defaults::SUPERVISE_HTTP_PORT, env = "MICROBATCH_SUPERVISOR_HTTP_PORT")]
    pub http_port: u16,
    /// Arguments for each `microbatch run` child, after `--`; `{n}` becomes the
    /// child's number. --topic, --group, --http-port 0 and the connection
    /// settings are added for you.
    #[arg(last = true, value_name = "RUN ARGS")]
    pub run_args: Vec<String>,
}

impl FromFile for Args {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.kafka.config_file()
    }
}

/// Connection settings as environment variables for child workers, with
/// `properties` for [`KAFKA_PROPERTIES_ENV`] (set even when empty, so a
/// child never reads one it inherited).
pub fn kafka_env(kafka: &KafkaConfig, properties: &[(String, String)]) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "KAFKA_BOOTSTRAP_SERVERS".to_string(),
            kafka.bootstrap_servers.clone(),
        ),
        (
            "KAFKA_SECURITY_PROTOCOL".to_string(),
            kafka.security_protocol.to_string(),
        ),
    ];
    if let Some(m) = kafka.sasl_mechanism {
        env.push(("KAFKA_SASL_MECHANISM".into(), m.to_string()));
    }
    if let Some(u) = &kafka.username {
        env.push(("KAFKA_USERNAME".into(), u.clone()));
    }
    if let Some(p) = &kafka.password {
        env.push(("KAFKA_PASSWORD".into(), p.expose().to_string()));
    }
    if let Some(ca) = &kafka.ssl_ca_location {
        env.push(("KAFKA_SSL_CA_LOCATION".into(), ca.display().to_string()));
    }
    // Properties too (a CA or key given as a property, mTLS), as JSON in
    // one variable: flags would show them in `ps`.
    let handed_down = if properties.is_empty() {
        String::new()
    } else {
        properties_to_env(properties)
    };
    env.push((KAFKA_PROPERTIES_ENV.into(), handed_down));
    // MSK IAM: the region and token lifetime; the AWS credentials reach the
    // children through the environment (or files) they inherit, never here.
    if let Some(region) = &kafka.aws_region {
        env.push(("AWS_REGION".into(), region.clone()));
        env.push((
            "MSK_IAM_TOKEN_LIFETIME_S".into(),
            kafka.msk_iam_token_lifetime.as_secs().to_string(),
        ));
    }
    env
}

/// The workers' environment on top of the supervisor's: the connection,
/// the properties of the environment and flags, and the `--config` file
/// (the workers read their own keys and its properties from it).
fn child_env(
    kafka: &KafkaConfig,
    properties: &[(String, String)],
    config_file: Option<&std::path::Path>,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut env = kafka_env(kafka, properties);
    // Linux takes no longer `NAME=value` (MAX_ARG_STRLEN): every start of
    // a worker would fail.
    let size = env
        .iter()
        .find(|(k, _)| k == KAFKA_PROPERTIES_ENV)
        .map_or(0, |(k, v)| k.len() + 1 + v.len());
    if size >= MAX_VARIABLE {
        return Err(ConfigError::new(
            "--kafka-property",
            format!(
                "the properties for the workers take {size} bytes, more than one environment \
                 variable holds ({MAX_VARIABLE}); put the large ones (PEM) in the --config \
                 file's [kafka_properties], or name files (ssl.ca.location)"
            ),
        )
        .into());
    }
    if let Some(file) = config_file {
        let file = std::path::absolute(file)
            .with_context(|| format!("locating --config {}", file.display()))?;
        env.push(("MICROBATCH_CONFIG".into(), file.display().to_string()));
    }
    Ok(env)
}

/// The longest `NAME=value` Linux passes to a program (MAX_ARG_STRLEN).
const MAX_VARIABLE: usize = 128 * 1024;

/// How long after its drain deadline a stopped worker is killed: its final
/// commit is over by the deadline, and closing its client takes at most
/// the worker's own bound, then some.
const KILL_MARGIN: Duration =
    Duration::from_secs(microbatch_core::worker::CLOSE_TIMEOUT.as_secs() + 5);

/// Flags that belong to supervise itself, which hands them to every worker.
const SUPERVISE_ONLY_FLAGS: [&str; 9] = [
    "--bootstrap-servers",
    "--security-protocol",
    "--sasl-mechanism",
    "--username",
    "--password",
    "--ssl-ca-location",
    "--topic",
    "--group",
    "--share-group",
];

/// Refuses a connection, topic or group flag given after `--`, where it
/// would reach the workers twice (or never reach supervise).
fn reject_misplaced_flags(run_args: &[String]) -> Result<(), ConfigError> {
    for arg in run_args {
        let name = arg.split_once('=').map_or(arg.as_str(), |(name, _)| name);
        if let Some(flag) = SUPERVISE_ONLY_FLAGS.iter().find(|f| **f == name) {
            return Err(ConfigError::new(
                flag,
                "given after `--`; put it before `--` (supervise passes it on to every worker)",
            ));
        }
    }
    Ok(())
}

/// Whether `flag` (`--name`) is among `args`, as `--name V` or `--name=V`.
fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| {
        a == flag
            || a.strip_prefix(flag)
                .is_some_and(|rest| rest.starts_with('='))
    })
}

/// The longest drain deadline a worker can have: the supervisor's own
/// (which it hands them), or a longer one given after `--`.
fn workers_drain_timeout_ms(user: &[String], own: u64) -> u64 {
    let mut given: Option<u64> = None;
    let mut args = user.iter();
    while let Some(arg) = args.next() {
        if arg == "--drain-timeout-ms" {
            given = args.next().and_then(|v| v.parse().ok());
        } else if let Some(v) = arg.strip_prefix("--drain-timeout-ms=") {
            given = v.parse().ok();
        }
    }
    given.map_or(own, |given| given.max(own))
}

/// Which kind of group the workers join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupKind {
    Consumer,
    Share,
}

/// The arguments after `run` for every child: the user's, then the group,
/// and what the supervisor needs unless the user chose it: a port of its
/// own per child, and the supervisor's drain deadline (so a stopped child
/// drains within what the supervisor waits before SIGKILL).
fn child_args(
    user: &[String],
    topic: &str,
    group: &str,
    kind: GroupKind,
    drain_timeout_ms: u64,
) -> Vec<String> {
    let mut run_args = user.to_vec();
    let group_flag = match kind {
        GroupKind::Consumer => "--group",
        GroupKind::Share => "--share-group",
    };
    run_args.extend([
        "--topic".into(),
        topic.to_string(),
        group_flag.into(),
        group.to_string(),
    ]);
    if !has_flag(user, "--http-port") {
        run_args.extend([
            "--http-port".into(),
            "0".into(),
            "--http-host".into(),
            "127.0.0.1".into(),
        ]);
    }
    if !has_flag(user, "--drain-timeout-ms") {
        run_args.extend(["--drain-timeout-ms".into(), drain_timeout_ms.to_string()]);
    }
    run_args
}

/// The topic, the group and its kind: `--share-group` or `--group`, never
/// both (the config file can hold both; clap sees only flags and the
/// environment).
fn resolve_group(args: &Args) -> Result<(String, String, GroupKind), ConfigError> {
    match &args.share_group {
        Some(_) if args.workers.group.is_some() => Err(ConfigError::new(
            "--share-group",
            "cannot be used with --group: the workers join one group",
        )),
        Some(share_group) => Ok((
            require(args.workers.topic.clone(), "--topic", "KAFKA_TOPIC")?,
            share_group.clone(),
            GroupKind::Share,
        )),
        None => {
            let (topic, group) = args.workers.resolve()?;
            if let Some(why) = microbatch_kafka::capacity_report::reserved_group_name(&group) {
                return Err(ConfigError::new("--group", why));
            }
            Ok((topic, group, GroupKind::Consumer))
        }
    }
}

pub async fn execute(args: Args) -> anyhow::Result<ExitCode> {
    reject_misplaced_flags(&args.run_args)?;
    args.policy_args.keda_params()?;
    let kafka = args.kafka.resolve()?;
    let (topic, group, kind) = resolve_group(&args)?;
    if args.policy_args.min_replicas > args.policy_args.max_replicas {
        return Err(ConfigError::new("--min", "must not exceed --max").into());
    }
    let kafka = kafka.start_msk_iam()?;
    let run_args = child_args(&args.run_args, &topic, &group, kind, args.drain_timeout_ms);
    if let Some(dir) = &args.log_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating --log-dir {}", dir.display()))?;
    }
    let config = SupervisorConfig {
        program: std::env::current_exe().context("locating the microbatch binary")?,
        run_args,
        min_replicas: args.policy_args.min_replicas,
        max_replicas: args.policy_args.max_replicas,
        // A worker given a longer drain deadline after `--` gets it in full,
        // and after it the time to close its client.
        kill_after: Duration::from_millis(workers_drain_timeout_ms(
            &args.run_args,
            args.drain_timeout_ms,
        )) + KILL_MARGIN,
        log_dir: args.log_dir.clone(),
        timeline: args.timeline.clone(),
        env: child_env(
            &kafka,
            &args.kafka.properties_to_hand_down()?,
            args.kafka.config_file(),
        )?,
    };
    let observer = match kind {
        GroupKind::Consumer => {
            let mut reader = LagReader::new(&kafka, &group, &topic, Duration::from_secs(10))?;
            if args.policy_args.max_lag_seconds.is_some() {
                reader = reader.with_record_ages();
            }
            Observer::new(reader, args.policy_args.invalid_offset())
        }
        GroupKind::Share => {
            let bootstrap = ShareConsumerConfig::from_kafka(&kafka, &group, vec![])?.bootstrap;
            let mut reader = ShareLagReader::new(
                security::connector(&kafka)?,
                bootstrap,
                &group,
                &topic,
                Duration::from_secs(10),
                tokio::runtime::Handle::current(),
            );
            reader = reader.with_worker_reports(&kafka)?;
            if args.policy_args.max_lag_seconds.is_some() {
                reader = reader.with_record_ages(&kafka)?;
            }
            Observer::share(reader, args.policy_args.invalid_offset())
        }
    };
    let policy = make_policy(args.policy, &args.policy_args);

    let mut registry = Registry::default();
    let replicas = Gauge::<i64>::default();
    let desired = Gauge::<i64>::default();
    let total_lag = Gauge::<i64>::default();
    let scale_up_held = Gauge::<i64>::default();
    let sub = registry.sub_registry_with_prefix("microbatch_supervisor");
    sub.register("replicas", "Workers running", replicas.clone());
    sub.register(
        "desired_replicas",
        "Workers the policy asks for",
        desired.clone(),
    );
    sub.register("total_lag", "The group's total lag", total_lag.clone());
    sub.register(
        "scale_up_held",
        "1 while scale-ups are held: records wait and no committed offset moves (a downstream outage)",
        scale_up_held.clone(),
    );
    let registry = Arc::new(registry);
    let addr: SocketAddr = ([0, 0, 0, 0], args.http_port).into();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /healthz and /metrics");
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut out = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
                    out
                }
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let stop = Arc::new(AtomicBool::new(false));
    let stop_flag = stop.clone();
    tokio::spawn(async move {
        super::shutdown_signal().await;
        stop_flag.store(true, Ordering::SeqCst);
    });
    let interval = Duration::from_millis(args.polling_interval_ms.max(100));
    // One long-lived thread spawns every child (their parent-death signal
    // follows it) and runs the loop.
    let handle = std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || -> anyhow::Result<()> {
            let mut sup = Supervisor::new(config, policy, observer)?;
            tracing::info!(policy = sup.policy_name(), "supervisor started");
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                if let Some(p) = sup.tick() {
                    replicas.set(i64::from(p.replicas));
                    desired.set(i64::from(p.desired));
                    total_lag.set(p.total_lag);
                    scale_up_held.set(i64::from(p.scale_up_held));
                    tracing::info!(
                        lag = p.total_lag,
                        replicas = p.replicas,
                        desired = p.desired,
                        "{}",
                        p.reason
                    );
                }
                while started.elapsed() < interval && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            tracing::info!("stopping all workers");
            sup.shutdown();
            Ok(())
        })?;
    tokio::task::spawn_blocking(move || handle.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the supervisor thread panicked"))??;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supervise_flags_after_the_separator_are_named() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let err =
            reject_misplaced_flags(&args(&["--concurrency", "4", "--topic", "t"])).unwrap_err();
        assert_eq!(err.field, "--topic");
        assert!(err.to_string().contains("before `--`"), "{err}");
        let err = reject_misplaced_flags(&args(&["--password=s3cr3t"])).unwrap_err();
        assert_eq!(err.field, "--password");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        assert!(reject_misplaced_flags(&args(&["--kafka-property", "a=b"])).is_ok());
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn children_get_the_drain_deadline_and_a_port_unless_given() {
        let args = child_args(
            &strings(&["--process-time-ms", "2"]),
            "t",
            "g",
            GroupKind::Consumer,
            7000,
        );
        assert_eq!(
            args,
            strings(&[
                "--process-time-ms",
                "2",
                "--topic",
                "t",
                "--group",
                "g",
                "--http-port",
                "0",
                "--http-host",
                "127.0.0.1",
                "--drain-timeout-ms",
                "7000"
            ])
        );
    }

    #[test]
    fn flags_after_the_separator_count_in_both_spellings() {
        for user in [
            strings(&["--http-port=9200", "--drain-timeout-ms=100"]),
            strings(&["--http-port", "9200", "--drain-timeout-ms", "100"]),
        ] {
            let args = child_args(&user, "t", "g", GroupKind::Share, 7000);
            assert!(args.contains(&"--share-group".to_string()), "{args:?}");
            assert_eq!(
                args.iter().filter(|a| a.starts_with("--http-port")).count(),
                1,
                "{args:?}"
            );
            assert!(!args.contains(&"7000".to_string()), "{args:?}");
        }
        assert!(!has_flag(&strings(&["--http-portal=1"]), "--http-port"));
    }

    /// A worker given a longer drain deadline after `--` is not killed
    /// 5 s after the supervisor's own (shorter) one.
    #[test]
    fn the_kill_waits_for_the_workers_drain_deadline() {
        assert_eq!(
            workers_drain_timeout_ms(&strings(&["--x", "1"]), 30_000),
            30_000
        );
        for user in [
            strings(&["--drain-timeout-ms", "90000"]),
            strings(&["--drain-timeout-ms=90000"]),
        ] {
            assert_eq!(workers_drain_timeout_ms(&user, 30_000), 90_000);
        }
        let shorter = strings(&["--drain-timeout-ms", "1000"]);
        assert_eq!(
            workers_drain_timeout_ms(&shorter, 30_000),
            30_000,
            "a shorter one does not bring the kill forward"
        );
    }

    /// The workers get the supervisor's properties (in one variable, not
    /// in `ps`) and its `--config` file, by an absolute path.
    #[test]
    fn children_get_the_properties_and_the_config_file() {
        let kafka = KafkaConfig::plaintext("b:9092");
        let properties = vec![("ssl.ca.location".to_string(), "/ca.pem".to_string())];
        let env = child_env(
            &kafka,
            &properties,
            Some(std::path::Path::new("conf/f.toml")),
        )
        .unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(
            get(KAFKA_PROPERTIES_ENV).as_deref(),
            Some(r#"{"ssl.ca.location":"/ca.pem"}"#)
        );
        let file = get("MICROBATCH_CONFIG").unwrap();
        assert!(
            file.starts_with('/') && file.ends_with("conf/f.toml"),
            "{file}"
        );
        let env = child_env(&kafka, &[], None).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(
            get(KAFKA_PROPERTIES_ENV).as_deref(),
            Some(""),
            "set empty, so a child does not read one it inherited"
        );
        assert_eq!(get("MICROBATCH_CONFIG"), None);
        let pem = vec![("ssl.ca.pem".to_string(), "A".repeat(MAX_VARIABLE))];
        let e = child_env(&kafka, &pem, None).unwrap_err();
        let e = e.downcast_ref::<ConfigError>().expect("a usage error");
        assert!(
            e.field == "--kafka-property" && e.rule.contains("--config"),
            "{e}"
        );
    }
}
