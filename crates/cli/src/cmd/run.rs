//! `microbatch run`: one worker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use microbatch_core::config::{
    defaults, BatchLimits, DeadLetterConfig, GroupProtocol, OffsetReset, Ordering, RetryPolicy,
    WorkerConfig,
};
use microbatch_core::handler::{
    DecodingHandler, ExecHandler, Handler, HttpHandler, HttpHandlerError, SimulateHandler,
};
use microbatch_core::health::HealthScope;
use microbatch_core::{Telemetry, Worker};
use microbatch_kafka::ConfigError;
use microbatch_schema::{Decoder, Filter, Format, RegistryError, Schemas};

use serde::{Deserialize, Serialize};

use crate::args::{require, GroupArgs, KafkaArgs};
use crate::config_file::FromFile;
use crate::schema_args::{registry_from_env, RegistryArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HandlerKind {
    /// Sleep --process-time-ms per record (the replaced system's handler).
    Simulate,
    /// A long-lived child process: one JSON line per batch in, one line out.
    Exec,
    /// POST each batch as JSON to --url.
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DlqMode {
    On,
    Off,
}

crate::serde_value_enum!(HandlerKind, DlqMode);

/// Where the HTTP server listens by default.
pub const DEFAULT_HTTP_PORT: u16 = 8080;
pub const DEFAULT_HTTP_HOST: &str = "0.0.0.0";

fn parse_ordering(s: &str) -> Result<Ordering, String> {
    s.parse()
}

fn parse_reset(s: &str) -> Result<OffsetReset, String> {
    s.parse()
}

fn parse_group_protocol(s: &str) -> Result<GroupProtocol, String> {
    s.parse()
}

fn format_parser() -> impl clap::builder::TypedValueParser<Value = Format> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Format::ALL.map(Format::name))
        .map(|name| name.parse::<Format>().expect("one of the possible values"))
}

#[derive(Debug, clap::Args, Serialize, Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub workers: GroupArgs,

    /// Records per batch at most.
    #[arg(long, env = "BATCH_SIZE", default_value_t = defaults::MAX_RECORDS as u64, value_parser = clap::value_parser!(u64).range(1..), help_heading = "Batching")]
    pub max_records: u64,
    /// Key + value bytes per batch at most.
    #[arg(long, env = "MICROBATCH_MAX_BYTES", default_value_t = defaults::MAX_BYTES as u64, value_parser = clap::value_parser!(u64).range(1..), help_heading = "Batching")]
    pub max_bytes: u64,
    /// Close a batch this long after its first record.
    #[arg(long, env = "MICROBATCH_MAX_WAIT_MS", default_value_t = defaults::MAX_WAIT_MS, help_heading = "Batching")]
    pub max_wait_ms: u64,

    /// What processes a batch.
    #[arg(long, env = "MICROBATCH_HANDLER", value_enum, default_value_t = HandlerKind::Simulate, help_heading = "Handler")]
    pub handler: HandlerKind,
    /// simulate: milliseconds per record [default: 0].
    #[arg(long, env = "MICROBATCH_PROCESS_TIME_MS", help_heading = "Handler")]
    pub process_time_ms: Option<u64>,
    /// simulate: seconds per record, as the replaced system's variable.
    #[arg(long, env = "PROCESS_TIME_SECONDS", hide = true)]
    pub process_time_seconds: Option<f64>,
    /// simulate: probability that a record fails (retryable), 0..1.
    #[arg(
        long,
        env = "MICROBATCH_FAILURE_RATE",
        default_value_t = 0.0,
        help_heading = "Handler"
    )]
    pub failure_rate: f64,
    /// simulate: records whose value contains this text fail for good (poison).
    #[arg(long, env = "MICROBATCH_POISON_MARKER", help_heading = "Handler")]
    pub poison_marker: Option<String>,
    /// simulate: while this file exists, every batch fails whole
    /// (retryable), as with a downstream refusing connections: the
    /// worker's circuit opens, nothing is dead-lettered, and scaling holds
    /// (`demo`'s outage scenario creates and removes it).
    #[arg(
        long,
        env = "MICROBATCH_SIMULATE_OUTAGE_FILE",
        value_name = "FILE",
        help_heading = "Handler"
    )]
    pub simulate_outage_file: Option<PathBuf>,
    /// exec: shell command to start once per slot (`sh -c`), when the worker
    /// starts.
    #[arg(long, env = "MICROBATCH_COMMAND", help_heading = "Handler")]
    pub command: Option<String>,
    /// exec: a variable of the worker's environment that the handler may
    /// see although it is one of the worker's own credentials
    /// (KAFKA_PASSWORD, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_SESSION_TOKEN, ...), which children do not inherit otherwise.
    /// Repeat for several.
    #[arg(long, value_name = "NAME", help_heading = "Handler")]
    pub handler_env: Vec<String>,
    /// http: URL to POST batches to. Redirects are not followed; user,
    /// password and query values are masked in logs and errors.
    #[arg(
        long,
        env = "MICROBATCH_URL",
        hide_env_values = true,
        allow_hyphen_values = true,
        help_heading = "Handler"
    )]
    pub url: Option<String>,
    /// A batch not answered within this fails (retryable).
    #[arg(long, env = "MICROBATCH_HANDLER_TIMEOUT_MS", default_value_t = defaults::HANDLER_TIMEOUT_MS, help_heading = "Handler")]
    pub handler_timeout_ms: u64,
    /// exec: extra time a child's first batch gets on top of
    /// --handler-timeout-ms, for the child's own start-up (an interpreter's
    /// imports, a JVM).
    #[arg(long, env = "MICROBATCH_HANDLER_STARTUP_MS", default_value_t = defaults::HANDLER_STARTUP_MS, help_heading = "Handler")]
    pub handler_startup_ms: u64,

    /// partition: one batch in flight per partition; key: per-key order, many
    /// slots per partition; none: any record on any slot. A share group
    /// keeps no order (the broker hands any record to any member), so with
    /// --share-group only none is accepted. [default: key; none with
    /// --share-group]
    #[arg(long, env = "MICROBATCH_ORDERING", value_parser = parse_ordering, help_heading = "Parallelism")]
    pub ordering: Option<Ordering>,
    /// Batches in flight at once in this worker.
    #[arg(long, env = "MICROBATCH_CONCURRENCY", default_value_t = defaults::CONCURRENCY as u64, value_parser = clap::value_parser!(u64).range(1..), help_heading = "Parallelism")]
    pub concurrency: u64,
    /// Records held per partition before it is paused; at least
    /// --max-records [default: 10000, or --max-records if larger].
    #[arg(
        long,
        env = "MICROBATCH_MAX_RECORDS_PER_PARTITION",
        help_heading = "Parallelism"
    )]
    pub max_records_per_partition: Option<usize>,
    /// Records held by the worker before it stops taking more in.
    #[arg(
        long,
        env = "MICROBATCH_MAX_RECORDS_HELD",
        default_value_t = defaults::MAX_RECORDS_HELD,
        help_heading = "Parallelism"
    )]
    pub max_records_held: usize,
    /// Key and value bytes held by the worker before it stops taking more
    /// in, as --max-records-held does (128 MiB).
    #[arg(long, env = "MICROBATCH_MAX_HELD_BYTES", default_value_t = defaults::MAX_HELD_BYTES, help_heading = "Parallelism")]
    pub max_held_bytes: usize,

    /// Commit done offsets this often.
    #[arg(long, env = "MICROBATCH_COMMIT_INTERVAL_MS", default_value_t = defaults::COMMIT_INTERVAL_MS, help_heading = "Delivery")]
    pub commit_interval_ms: u64,
    /// Finished records may wait this long for their commit; then their
    /// partition starts no new batches (only retries and records that let
    /// the commit move) until the broker acknowledges it. Bounds what a
    /// crash replays; 0: no limit [default: 1.5 x --commit-interval-ms].
    #[arg(long, env = "MICROBATCH_MAX_UNCOMMITTED_MS", help_heading = "Delivery")]
    pub max_uncommitted_ms: Option<u64>,
    /// At most this many records, in all partitions together, finished and
    /// waiting for the broker to acknowledge their commit, in flight, or
    /// waiting for a retry: past it a commit goes out at once and no new
    /// batch starts (only retries and batches that let the commit move)
    /// until it is acknowledged. A crash then replays at most this +
    /// --concurrency x --max-records; the cost is a commit per that many
    /// records. 0: no cap.
    #[arg(
        long,
        env = "MICROBATCH_MAX_UNCOMMITTED_RECORDS",
        default_value_t = defaults::MAX_UNCOMMITTED_RECORDS,
        help_heading = "Delivery"
    )]
    pub max_uncommitted_records: usize,
    /// On SIGTERM or revoke, wait this long for in-flight batches.
    #[arg(long, env = "MICROBATCH_DRAIN_TIMEOUT_MS", default_value_t = defaults::DRAIN_TIMEOUT_MS, help_heading = "Delivery")]
    pub drain_timeout_ms: u64,
    /// First retry back-off ceiling; doubles per attempt, full jitter.
    #[arg(long, env = "MICROBATCH_RETRY_INITIAL_MS", default_value_t = defaults::RETRY_INITIAL_MS, help_heading = "Delivery")]
    pub retry_initial_ms: u64,
    /// Largest retry back-off ceiling.
    #[arg(long, env = "MICROBATCH_RETRY_MAX_MS", default_value_t = defaults::RETRY_MAX_MS, help_heading = "Delivery")]
    pub retry_max_ms: u64,
    /// Attempts per record before it is dead-lettered.
    #[arg(long, env = "MICROBATCH_MAX_ATTEMPTS", default_value_t = defaults::MAX_ATTEMPTS, help_heading = "Delivery")]
    pub max_attempts: u32,
    /// Dead-letter a failing record older than this instead of retrying.
    #[arg(long, env = "MICROBATCH_MAX_RECORD_AGE_MS", help_heading = "Delivery")]
    pub max_record_age_ms: Option<u64>,
    /// What proves the downstream works for a record that fails alone:
    /// key (a success of a record with the same key), key-prefix:SEP (of
    /// a key with the same prefix up to SEP: a tenant in keys like
    /// tenant-7/order-42), header:NAME (of a record with the same header
    /// value), or worker (any success). One tenant's outage then holds its
    /// records instead of dead-lettering them while other tenants succeed
    /// (for whole-batch failures: 5xx, timeouts; records the handler names
    /// as failed are dead-lettered after --max-attempts). A record alone in
    /// its key, with the rest working, is dead-lettered after one
    /// --retry-max-ms: keys per entity tell a tenant's outage apart only
    /// when its keys have several records waiting; prefer key-prefix or
    /// header for tenants. Fresh batches go ahead of held records. Records
    /// without a key (header) are judged by the worker. A full
    /// --max-uncommitted-records hands the judgement back to the worker.
    #[arg(
        long,
        env = "MICROBATCH_HEALTH_SCOPE",
        default_value_t = HealthScope::default(),
        help_heading = "Delivery"
    )]
    pub health_scope: HealthScope,
    /// The longest a record is held for its key's (tenant's) own proof;
    /// past it, a success of any key since its last failure, or since the
    /// hold began with nothing failing since, dead-letters it.
    #[arg(
        long,
        env = "MICROBATCH_HEALTH_SCOPE_HOLD_MS",
        default_value_t = defaults::HEALTH_SCOPE_HOLD_MS,
        help_heading = "Delivery"
    )]
    pub health_scope_hold_ms: u64,
    /// on: failed records go to --dlq-topic; off: the worker stops instead.
    #[arg(long, env = "MICROBATCH_DLQ", value_enum, default_value_t = DlqMode::On, help_heading = "Delivery")]
    pub dlq: DlqMode,
    /// Dead-letter topic [default: <topic>.dlq]. It is looked up at start
    /// and created when missing (see --dlq-create). Source partition p's
    /// dead letters go to its partition p modulo its count; a worker taking
    /// a partition reads the newest of them first (at most 1,000), so those
    /// are not written twice after a crash (docs/delivery.md).
    #[arg(long, env = "MICROBATCH_DLQ_TOPIC", help_heading = "Delivery")]
    pub dlq_topic: Option<String>,
    /// on: create a missing dead-letter topic at start; off: stop instead,
    /// naming it.
    #[arg(
        long,
        env = "MICROBATCH_DLQ_CREATE",
        value_enum,
        default_value_t = DlqMode::On,
        help_heading = "Delivery"
    )]
    pub dlq_create: DlqMode,
    /// Partitions of a dead-letter topic created at start [default: the topic's].
    #[arg(long, env = "MICROBATCH_DLQ_PARTITIONS", value_parser = clap::value_parser!(i32).range(1..), help_heading = "Delivery")]
    pub dlq_partitions: Option<i32>,
    /// Replication factor of a dead-letter topic created at start [default: the broker's].
    #[arg(long, env = "MICROBATCH_DLQ_REPLICATION_FACTOR", value_parser = clap::value_parser!(i32).range(1..), help_heading = "Delivery")]
    pub dlq_replication_factor: Option<i32>,
    /// Consumer group protocol: classic (client-side cooperative-sticky
    /// assignor; any broker) or consumer (KIP-848: the broker assigns and
    /// moves only the partitions that change owner; Kafka 4.0+).
    #[arg(long, env = "MICROBATCH_GROUP_PROTOCOL", default_value_t = defaults::GROUP_PROTOCOL, value_parser = parse_group_protocol, help_heading = "Delivery")]
    pub group_protocol: GroupProtocol,
    /// Join this share group (KIP-932, Kafka 4.2+) instead of a consumer
    /// group: any number of workers take records of the same partitions,
    /// each record acquired under a lock and accepted once done, in no
    /// order. Locks are renewed while records are held; a record delivered
    /// more than --max-attempts (at most 8) times is dead-lettered unhandled;
    /// --dlq must stay on. The worker sets the group's
    /// share.auto.offset.reset (--offset-reset) and
    /// share.delivery.count.limit (10). See docs/share-groups.md.
    #[arg(
        long,
        env = "SHARE_GROUP",
        value_name = "NAME",
        conflicts_with = "group",
        help_heading = "Delivery"
    )]
    pub share_group: Option<String>,
    /// Where to start without a committed offset: earliest or latest. With
    /// --share-group: where a new share group starts (set as the group's
    /// share.auto.offset.reset).
    #[arg(long, env = "MICROBATCH_OFFSET_RESET", default_value_t = defaults::OFFSET_RESET, value_parser = parse_reset, help_heading = "Delivery")]
    pub offset_reset: OffsetReset,
    /// Append `partition offset` per processed record to FILE (for verification).
    #[arg(
        long,
        env = "MICROBATCH_AUDIT_LOG",
        value_name = "FILE",
        help_heading = "Delivery"
    )]
    pub audit_log: Option<PathBuf>,

    /// How record keys are written: raw (handed on as text, or base64),
    /// json, or avro, protobuf, json-schema (a schema registry's wire
    /// format; needs --schema-registry-url). Decoded keys reach the
    /// handler as JSON. See docs/schemas.md.
    #[arg(long, env = "MICROBATCH_KEY_FORMAT", value_parser = format_parser(), default_value = "raw", help_heading = "Schemas")]
    pub key_format: Format,
    /// How record values are written (as --key-format). A value that
    /// cannot be decoded is dead-lettered with the reason; a registry
    /// without an answer holds its batch, nothing dead-lettered.
    #[arg(long, env = "MICROBATCH_VALUE_FORMAT", value_parser = format_parser(), default_value = "raw", help_heading = "Schemas")]
    pub value_format: Format,
    #[command(flatten)]
    #[serde(flatten)]
    pub registry: RegistryArgs,
    /// Hand on only records this pattern matches (AWS Lambda's filter
    /// syntax, on the decoded `key` and `value`, `headers`, `topic`,
    /// `partition`, `offset`, `timestamp_ms`), e.g.
    /// '{"value":{"kind":["order"],"total":[{"numeric":[">",100]}]}}'.
    /// Repeat: a record passes when any pattern matches. Others are done
    /// and committed without the handler
    /// (microbatch_records_filtered_total).
    #[arg(long, value_name = "PATTERN", help_heading = "Schemas")]
    pub filter: Vec<String>,

    /// Port for /healthz, /readyz and /metrics; 0 picks a free one.
    #[arg(long, env = "MICROBATCH_HTTP_PORT", default_value_t = DEFAULT_HTTP_PORT, help_heading = "Operations")]
    pub http_port: u16,
    /// Address to bind the HTTP port on.
    #[arg(long, env = "MICROBATCH_HTTP_HOST", default_value = DEFAULT_HTTP_HOST, help_heading = "Operations")]
    pub http_host: String,
}

impl FromFile for Args {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.kafka.config_file()
    }
}

/// The validated outcome of `Args`: worker config, handler and HTTP address.
pub struct Resolved {
    pub config: WorkerConfig,
    pub handler: Arc<dyn Handler>,
    pub http: SocketAddr,
    /// Decoding and filtering before the handler, when asked for.
    pub decoding: Option<Decoding>,
}

/// What the decoding handler wraps the handler with.
pub struct Decoding {
    pub key: Format,
    pub value: Format,
    pub schemas: Option<Arc<Schemas>>,
    pub filter: Option<Filter>,
}

impl Decoding {
    fn resolve(args: &Args) -> Result<Option<Self>, ConfigError> {
        let uses_registry = args.key_format.uses_registry() || args.value_format.uses_registry();
        if !uses_registry
            && args.key_format == Format::Raw
            && args.value_format == Format::Raw
            && args.filter.is_empty()
        {
            return Ok(None);
        }
        let filter = if args.filter.is_empty() {
            None
        } else {
            Some(Filter::parse(&args.filter).map_err(|e| {
                ConfigError::new("--filter", e.to_string().trim_start_matches("--filter: "))
            })?)
        };
        let schemas = match (&args.registry.schema_registry_url, uses_registry) {
            (None, true) => {
                let flag = if args.value_format.uses_registry() {
                    "--value-format"
                } else {
                    "--key-format"
                };
                return Err(ConfigError::new(
                    flag,
                    "avro, protobuf and json-schema need --schema-registry-url (SCHEMA_REGISTRY_URL)",
                ));
            }
            (Some(url), true) => {
                let registry = registry_from_env(url, args.registry.schema_registry_ca.as_deref())?;
                let topic = args.workers.topic.clone().unwrap_or_default();
                let subjects = [(args.value_format, "value"), (args.key_format, "key")]
                    .into_iter()
                    .filter(|(format, _)| format.uses_registry())
                    .map(|(_, side)| format!("{topic}-{side}"))
                    .collect();
                Some(Arc::new(Schemas::new(registry).with_subjects(subjects)))
            }
            (_, false) => None,
        };
        Ok(Some(Self {
            key: args.key_format,
            value: args.value_format,
            schemas,
            filter,
        }))
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Args {
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        let kafka = self.kafka.resolve()?;
        if self.share_group.is_some() && self.workers.group.is_some() {
            // Both from the config file (clap sees only flags and the
            // environment): which group is meant cannot be guessed.
            return Err(ConfigError::new(
                "--share-group",
                "cannot be used with --group: a worker is a member of one group",
            )
            .into());
        }
        let (topic, group) = match &self.share_group {
            Some(share_group) => (
                require(self.workers.topic.clone(), "--topic", "KAFKA_TOPIC")?,
                share_group.clone(),
            ),
            None => self.workers.resolve()?,
        };
        let mut config = WorkerConfig::new(kafka, topic.clone(), group);
        config.share_group = self.share_group.is_some();
        config.batch = BatchLimits::new(
            self.max_records as usize,
            self.max_bytes as usize,
            ms(self.max_wait_ms),
        )?;
        config.ordering = self.ordering.unwrap_or(if config.share_group {
            Ordering::None
        } else {
            defaults::ORDERING
        });
        config.concurrency = self.concurrency as usize;
        config.commit_interval = ms(self.commit_interval_ms);
        config.max_uncommitted = self.max_uncommitted_ms.map(ms);
        config.max_uncommitted_records = self.max_uncommitted_records;
        config.drain_timeout = ms(self.drain_timeout_ms);
        config.handler_timeout = ms(self.handler_timeout_ms);
        config.retry = RetryPolicy {
            initial: ms(self.retry_initial_ms),
            max: ms(self.retry_max_ms),
            max_attempts: self.max_attempts,
            max_record_age: self.max_record_age_ms.map(ms),
        };
        config.health_scope = self.health_scope.clone();
        config.health_scope_hold = ms(self.health_scope_hold_ms);
        config.dlq = match self.dlq {
            DlqMode::On => {
                let mut dlq = DeadLetterConfig::for_topic(&topic);
                if let Some(t) = self.dlq_topic.clone() {
                    dlq.topic = t;
                }
                dlq.partitions = self.dlq_partitions;
                dlq.replication_factor = self.dlq_replication_factor;
                dlq.create = self.dlq_create == DlqMode::On;
                Some(dlq)
            }
            DlqMode::Off => None,
        };
        // A value given below --max-records is refused (by the config's
        // rule, naming the flag); only the default grows to one batch.
        config.max_records_per_partition = self
            .max_records_per_partition
            .unwrap_or_else(|| defaults::MAX_RECORDS_PER_PARTITION.max(config.batch.max_records));
        config.max_records_held = self.max_records_held;
        config.max_held_bytes = self.max_held_bytes;
        config.offset_reset = self.offset_reset;
        config.audit_log = self.audit_log.clone();
        config.group_protocol = self.group_protocol;
        let config = config.validate()?;

        let handler: Arc<dyn Handler> = match self.handler {
            HandlerKind::Simulate => {
                let per_record = match (self.process_time_ms, self.process_time_seconds) {
                    (Some(v), _) => ms(v),
                    (None, Some(secs)) if secs.is_finite() && secs >= 0.0 => {
                        Duration::from_secs_f64(secs)
                    }
                    (None, Some(_)) => {
                        return Err(ConfigError::new(
                            "PROCESS_TIME_SECONDS",
                            "must be a non-negative number",
                        )
                        .into())
                    }
                    (None, None) => Duration::ZERO,
                };
                if !(0.0..=1.0).contains(&self.failure_rate) {
                    return Err(
                        ConfigError::new("--failure-rate", "must be between 0 and 1").into(),
                    );
                }
                Arc::new(SimulateHandler {
                    process_time: per_record,
                    failure_rate: self.failure_rate,
                    poison_marker: self.poison_marker.clone().filter(|m| !m.is_empty()),
                    outage_file: self.simulate_outage_file.clone(),
                })
            }
            HandlerKind::Exec => {
                let command = require(self.command.clone(), "--command", "MICROBATCH_COMMAND")?;
                Arc::new(
                    ExecHandler::with_env(command, &self.handler_env)
                        .with_startup(config.handler_timeout, ms(self.handler_startup_ms)),
                )
            }
            HandlerKind::Http => {
                let url = require(self.url.clone(), "--url", "MICROBATCH_URL")?;
                match HttpHandler::new(&url, config.handler_timeout) {
                    Ok(handler) => Arc::new(handler),
                    Err(HttpHandlerError::InvalidUrl(why)) => {
                        return Err(ConfigError::new("--url", why).into())
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let host = &self.http_host;
        let http: SocketAddr = format!("{host}:{}", self.http_port)
            .parse()
            .map_err(|_| ConfigError::new("--http-host", format!("not an IP address: {host}")))?;
        let decoding = Decoding::resolve(self)?;
        Ok(Resolved {
            config,
            handler,
            http,
            decoding,
        })
    }
}

pub async fn execute(args: Args) -> anyhow::Result<ExitCode> {
    // Processes of our user (an exec handler's children, another container
    // of the pod, which shares its process namespace) could otherwise read
    // our environment and command line, credentials among them, from
    // /proc/<our pid>. Root still can.
    // SAFETY: a plain prctl on this process; no memory involved.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0);
    }
    let Resolved {
        config,
        handler,
        http,
        decoding,
    } = args.resolve()?;
    let mut config = config;
    config.kafka = config.kafka.start_msk_iam()?;
    let telemetry = Arc::new(Telemetry::default());
    let handler = match decoding {
        None => handler,
        Some(decoding) => {
            if let Some(schemas) = &decoding.schemas {
                check_registry(schemas).await?;
            }
            Arc::new(DecodingHandler::new(
                handler,
                Decoder::new(decoding.key, decoding.value, decoding.schemas),
                decoding.filter,
                telemetry.metrics.records_filtered.clone(),
                config.handler_timeout,
            ))
        }
    };
    if let Some(tokens) = config.kafka.msk_iam.clone() {
        telemetry
            .readiness
            .add_check(Box::new(move || tokens.health()));
    }
    let listener = tokio::net::TcpListener::bind(http)
        .await
        .with_context(|| format!("binding the HTTP port {http}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(microbatch_core::http::serve(
        listener,
        telemetry.clone(),
        async move {
            let _ = http_stop_rx.await;
        },
    ));
    let worker = Worker::new(config, handler, telemetry);
    let result = worker.run(shutdown_then_force()).await;
    let _ = http_stop_tx.send(());
    let _ = server.await;
    let report = result?;
    if report.abandoned_batches > 0 {
        tracing::warn!(
            batches = report.abandoned_batches,
            "stopped with unfinished batches; they will be redelivered"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses to start on a registry that refuses the worker (credentials, a
/// URL that is not the API); one that does not answer yet is only logged:
/// batches wait for it like for any outage. A subject of the topic's
/// (`<topic>-value`, `<topic>-key`) found there proves it is the
/// producers' registry.
async fn check_registry(schemas: &Schemas) -> anyhow::Result<()> {
    let registry = schemas.registry();
    let subjects = schemas.subjects();
    match registry.check().await {
        Ok(()) => tracing::info!(url = registry.url(), "schema registry reachable"),
        Err(RegistryError::Unavailable(why)) => {
            tracing::warn!(url = registry.url(), error = %why, "schema registry unavailable at start; batches that need it wait");
            return Ok(());
        }
        Err(e) => return Err(anyhow::anyhow!("schema registry {}: {e}", registry.url())),
    }
    for subject in subjects {
        match registry.has_subject(subject).await {
            Ok(true) => {
                schemas.confirm_registry();
                return Ok(());
            }
            Ok(false) => {}
            Err(RegistryError::Refused(why)) => {
                return Err(anyhow::anyhow!("schema registry {}: {why}", registry.url()))
            }
            Err(e) => tracing::debug!(subject, error = %e, "subject lookup"),
        }
    }
    tracing::info!(
        url = registry.url(),
        ?subjects,
        "no subject of the topic in the registry (another naming strategy?): records naming unknown schemas wait until some schema is found"
    );
    Ok(())
}

/// A repeat of the first signal sooner than this after it is not a request
/// to stop at once: systemd's `KillMode=control-group` signals every process
/// of a `supervise` unit, and the supervisor then sends its own SIGTERM.
const FORCE_AFTER: Duration = Duration::from_secs(1);

/// Resolves at the first SIGTERM or SIGINT, which starts the orderly drain;
/// a second signal of the same kind, at least [`FORCE_AFTER`] later, stops
/// the process at once (exit 143 for SIGTERM, 130 for SIGINT): its
/// in-flight records are not committed and their next owner handles them
/// again. Only the same kind counts: a SIGINT from a terminal and a
/// SIGTERM from a supervisor are one request to stop.
async fn shutdown_then_force() {
    use tokio::signal::unix::{signal, SignalKind};
    // Both handlers stay installed from the start, so a second signal that
    // comes at once is not missed.
    let mut term =
        signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler cannot fail");
    let first = tokio::select! {
        _ = term.recv() => libc::SIGTERM,
        _ = int.recv() => libc::SIGINT,
    };
    let at = tokio::time::Instant::now();
    let name = if first == libc::SIGTERM {
        "SIGTERM"
    } else {
        "SIGINT"
    };
    tracing::info!("{name} received; shutting down (a second {name} stops at once)");
    tokio::spawn(async move {
        loop {
            if first == libc::SIGTERM {
                term.recv().await;
            } else {
                int.recv().await;
            }
            if at.elapsed() >= FORCE_AFTER {
                break;
            }
            tracing::info!("{name} again within {FORCE_AFTER:?}: still draining");
        }
        tracing::error!(
            "second {name}: stopping now without finishing in-flight batches; \
             their records are not committed and will be handled again"
        );
        microbatch_core::handler::kill_children();
        std::process::exit(128 + first);
    });
}
