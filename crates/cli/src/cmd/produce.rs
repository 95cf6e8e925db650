//! `microbatch produce`: load for tests and demos.
//!
//! Record `i` has key `key-{i % keys}` (none with `--keys 0`) and a value that
//! starts with `{i}` and is padded to `--size` bytes, so consumers can check
//! order and completeness.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use microbatch_kafka::aws_iam::{OauthHook, WithTokens};
use microbatch_kafka::{ConfigError, KafkaConfig};
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use serde::{Deserialize, Serialize};

use crate::args::KafkaArgs;
use crate::config_file::FromFile;
use crate::schema_args::{registry_from_env, RegistryArgs};

/// How long `produce` looks for a topic that its metadata does not show yet.
const NEW_TOPIC_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args, Serialize, Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub load: Load,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// raw: values padded to --size; json: `{"seq":N,"pad":"…"}` padded to
    /// --size; avro: a record of --schema per value, with values that
    /// vary with the sequence number, in the schema registry's wire format
    /// (the schema registered under `<topic>-value` at
    /// --schema-registry-url; --size is ignored).
    #[arg(long, default_value = "raw", value_parser = ["raw", "json", "avro"], help_heading = "Schemas")]
    pub value_format: String,
    /// avro: the Avro schema (JSON) of the values.
    #[arg(long, value_name = "FILE", help_heading = "Schemas")]
    pub schema: Option<std::path::PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub registry: RegistryArgs,
}

/// What the values of produced records are.
pub enum Values {
    /// `{seq} xxxxxx…`, padded to --size (and POISON when asked).
    Padded,
    /// `{"seq":N,"pad":"…"}`, padded to --size.
    Json,
    /// A sample record of the schema, framed with its registry id.
    Avro {
        id: u32,
        schema: Box<microbatch_schema::avro::AvroSchema>,
    },
}

impl Values {
    /// The value of record `seq` into `out` (Padded keeps its buffer).
    fn write(&self, seq: u64, size: usize, out: &mut Vec<u8>) -> anyhow::Result<()> {
        match self {
            Values::Padded => unreachable!("written in place"),
            Values::Json => {
                out.clear();
                out.extend_from_slice(format!("{{\"seq\":{seq},\"pad\":\"").as_bytes());
                let pad = size.saturating_sub(out.len() + 2);
                out.resize(out.len() + pad, b'x');
                out.extend_from_slice(b"\"}");
            }
            Values::Avro { id, schema } => {
                out.clear();
                out.push(0);
                out.extend_from_slice(&id.to_be_bytes());
                let datum = schema
                    .sample(seq)
                    .map_err(|e| anyhow::anyhow!("--schema: record {seq}: {e}"))?;
                out.extend_from_slice(&datum);
            }
        }
        Ok(())
    }
}

/// What to produce: shared by `produce` and the demo's bursts.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct Load {
    /// Topic to produce to.
    #[arg(long, env = "KAFKA_TOPIC")]
    pub topic: String,
    /// Records to produce.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Records per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Distinct keys (key-0 …); 0 = no keys.
    #[arg(long, default_value_t = 100)]
    pub keys: u64,
    /// Aim every record at these partitions, round-robin (e.g. `0,3`).
    #[arg(long, value_delimiter = ',')]
    pub partitions: Vec<i32>,
    /// Mark every Nth record as poison (its value contains `POISON`), for
    /// trying failure handling with `run --poison-marker POISON`; 0 = none.
    #[arg(long, default_value_t = 0)]
    pub poison_every: u64,
    /// First sequence number (to continue an earlier run's numbering).
    #[arg(long, default_value_t = 0)]
    pub start_seq: u64,
}

/// The text `--poison-every` puts in a record's value.
pub const POISON: &[u8] = b"POISON";

/// Counts delivery reports.
#[derive(Default)]
pub struct Deliveries {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
    refusal: microbatch_kafka::client::RefusalSlot,
    oauth: OauthHook,
}

impl ClientContext for Deliveries {
    microbatch_kafka::delegate_oauth_token!(oauth);

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        microbatch_kafka::client::forward_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.refusal.note(&error, reason);
        tracing::debug!(error = %error, "{reason}");
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.first_error
                    .lock()
                    .expect("lock poisoned")
                    .get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// What a produce run did.
pub struct ProduceSummary {
    pub delivered: u64,
    /// Value bytes handed to the producer.
    pub value_bytes: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

/// Produces `count` records; blocking (run it off the async runtime).
pub fn produce_blocking(
    kafka: &KafkaConfig,
    args: &Load,
    values: &Values,
    bar: &ProgressBar,
) -> anyhow::Result<ProduceSummary> {
    let producer: WithTokens<ThreadedProducer<Deliveries>> = kafka
        .create_client(
            kafka
                .client_config()
                .set("enable.idempotence", "true")
                .set("linger.ms", "5")
                .set("partitioner", "murmur2_random")
                .set("message.timeout.ms", "60000"),
            Deliveries {
                oauth: kafka.oauth_hook(),
                ..Deliveries::default()
            },
        )
        .context("creating the producer")?;
    // A topic created a moment ago (`topic create` then `produce`, the
    // demo) is known to the controller before every broker's metadata
    // shows it: look again for a while before calling it missing.
    let looking_since = Instant::now();
    loop {
        let metadata = producer
            .client()
            .fetch_metadata(Some(&args.topic), Duration::from_secs(15))
            .map_err(|e| match producer.context().refusal.recent() {
                Some(refusal) => microbatch_kafka::ClientError::Refused(refusal),
                None => microbatch_kafka::ClientError::classify(e, &kafka.bootstrap_servers),
            })?;
        let exists = metadata.topics().iter().any(|t| {
            t.name() == args.topic
                && t.error().is_none()
                && !t.partitions().is_empty()
                && t.partitions()
                    .iter()
                    // Only the partitions aimed at need a leader: load can go
                    // to half a topic while the other half's broker is down.
                    .filter(|p| args.partitions.is_empty() || args.partitions.contains(&p.id()))
                    .all(|p| p.leader() >= 0)
        });
        if exists {
            break;
        }
        if looking_since.elapsed() >= NEW_TOPIC_WAIT {
            anyhow::bail!(
                "topic {:?} does not exist, or has partitions without a leader, after {} s \
                 (create it with `microbatch topic create --topic {}`)",
                args.topic,
                NEW_TOPIC_WAIT.as_secs(),
                args.topic
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let context = producer.context().clone();
    let started = Instant::now();
    let mut value = vec![b'x'; args.size.max(20)];
    value.truncate(args.size.max(1));
    let mut key = String::new();
    let mut encoded = Vec::new();
    let mut value_bytes = 0u64;
    for i in 0..args.count {
        let seq = args.start_seq + i;
        if args.rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / args.rate as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let digits = seq.to_string();
        let n = digits.len().min(value.len());
        value[..n].copy_from_slice(&digits.as_bytes()[..n]);
        if n < value.len() {
            value[n] = b' ';
        }
        let poison = args.poison_every > 0 && seq % args.poison_every == args.poison_every - 1;
        let marker_at = n + 1;
        if marker_at + POISON.len() <= value.len() {
            let filler: &[u8] = if poison { POISON } else { b"xxxxxx" };
            value[marker_at..marker_at + POISON.len()].copy_from_slice(filler);
        }
        let payload = match values {
            Values::Padded => &value[..],
            other => {
                other.write(seq, args.size, &mut encoded)?;
                &encoded[..]
            }
        };
        value_bytes += payload.len() as u64;
        let mut record: BaseRecord<'_, str, [u8], ()> =
            BaseRecord::to(&args.topic).payload(payload);
        if args.keys > 0 {
            key.clear();
            use std::fmt::Write;
            let _ = write!(key, "key-{}", seq % args.keys);
            record = record.key(key.as_str());
        }
        if !args.partitions.is_empty() {
            record = record.partition(args.partitions[(i % args.partitions.len() as u64) as usize]);
        }
        let mut pending = record;
        loop {
            match producer.send(pending) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    pending = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e).context("producing"),
            }
        }
        if i % 1024 == 0 {
            bar.set_position(context.ok.load(Ordering::Relaxed));
        }
    }
    while producer.in_flight_count() > 0 {
        bar.set_position(context.ok.load(Ordering::Relaxed));
        let _ = producer.flush(Duration::from_millis(200));
        if started.elapsed()
            > Duration::from_secs(60)
                + Duration::from_secs_f64(args.count as f64 / args.rate.max(1) as f64)
        {
            break;
        }
    }
    bar.set_position(context.ok.load(Ordering::Relaxed));
    let failed = context.failed.load(Ordering::Relaxed);
    if failed > 0 {
        if let Some(e) = context.first_error.lock().expect("lock poisoned").as_ref() {
            tracing::error!(failed, first_error = %e, "some records were not delivered");
        }
    }
    Ok(ProduceSummary {
        delivered: context.ok.load(Ordering::Relaxed),
        value_bytes,
        failed: failed + producer.in_flight_count() as u64,
        elapsed: started.elapsed(),
    })
}

pub async fn execute(args: Args) -> anyhow::Result<ExitCode> {
    let kafka = args.kafka.resolve()?;
    if args.load.poison_every > 0 && args.value_format != "raw" {
        return Err(ConfigError::new(
            "--poison-every",
            "marks raw values only (--value-format raw)",
        )
        .into());
    }
    let values = values(&args, &args.load.topic).await?;
    let load = args.load;
    if load.size == 0 {
        return Err(ConfigError::new("--size", "must be at least 1").into());
    }
    if load.poison_every > 0 && load.size < 28 {
        return Err(
            ConfigError::new("--size", "must be at least 28 bytes with --poison-every").into(),
        );
    }
    // Credentials are fetched only once the flags are known to be valid.
    let kafka = kafka.start_msk_iam()?;
    let bar = ProgressBar::new(load.count);
    if args.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {bar:40} {pos}/{len} records  {per_sec}  eta {eta}",
        )
        .expect("the template is valid"),
    );
    let task_bar = bar.clone();
    let task_load = load.clone();
    let s = tokio::task::spawn_blocking(move || {
        produce_blocking(&kafka, &task_load, &values, &task_bar)
    })
    .await
    .context("producer thread")??;
    bar.finish_and_clear();
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    let mb = s.value_bytes as f64 / 1e6;
    println!(
        "produced {} records ({mb:.1} MB) to {} in {secs:.2}s: {:.0} records/s, {:.1} MB/s; {} failed",
        s.delivered,
        load.topic,
        s.delivered as f64 / secs,
        mb / secs,
        s.failed
    );
    Ok(if s.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The values `--value-format` asks for: with avro, the schema compiled
/// and registered under `<topic>-value`.
async fn values(args: &Args, topic: &str) -> anyhow::Result<Values> {
    match args.value_format.as_str() {
        "json" => Ok(Values::Json),
        "avro" => {
            let path = args.schema.as_deref().ok_or_else(|| {
                ConfigError::new("--schema", "--value-format avro needs a schema file")
            })?;
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new("--schema", format!("cannot read {}: {e}", path.display()))
            })?;
            let schema = microbatch_schema::avro::AvroSchema::compile(&text, &[])
                .map_err(|e| ConfigError::new("--schema", format!("not an Avro schema: {e}")))?;
            schema
                .sample(0)
                .map_err(|e| ConfigError::new("--schema", e))?;
            let url = args
                .registry
                .schema_registry_url
                .as_deref()
                .ok_or_else(|| {
                    ConfigError::new(
                        "--schema-registry-url",
                        "--value-format avro needs the registry",
                    )
                })?;
            let registry = registry_from_env(url, args.registry.schema_registry_ca.as_deref())?;
            let subject = format!("{topic}-value");
            let id = registry
                .register(&subject, "AVRO", &text)
                .await
                .with_context(|| {
                    format!(
                        "registering the schema under {subject} at {}",
                        registry.url()
                    )
                })?;
            Ok(Values::Avro {
                id,
                schema: Box::new(schema),
            })
        }
        _ => Ok(Values::Padded),
    }
}

impl FromFile for Args {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.kafka.config_file()
    }
}
