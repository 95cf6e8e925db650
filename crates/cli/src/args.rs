//! Flags shared by every command, and the optional TOML file.
//!
//! Precedence: a flag beats its environment variable (clap does that), and
//! both beat the file, which beats the documented default. Flags are parsed
//! as `Option`s for that reason; the defaults are applied here, once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use microbatch_kafka::config::{
    parse_property, ConfigError, KafkaConfig, SaslMechanism, Secret, SecurityProtocol,
};
use microbatch_scaling::lag::LagReader;
use serde::Deserialize;

pub const DEFAULT_BOOTSTRAP: &str = "127.0.0.1:9092";

fn parse_protocol(s: &str) -> Result<SecurityProtocol, String> {
    s.parse()
}

fn parse_mechanism(s: &str) -> Result<SaslMechanism, String> {
    s.parse()
}

/// Where Kafka is and how to log in: the same flags on every command.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Kafka connection")]
pub struct KafkaArgs {
    /// Brokers, comma-separated host:port [default: 127.0.0.1:9092].
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: Option<String>,
    /// PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL [default: PLAINTEXT].
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL", value_parser = parse_protocol)]
    pub security_protocol: Option<SecurityProtocol>,
    /// PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or AWS_MSK_IAM [default with SASL:
    /// SCRAM-SHA-512]. AWS_MSK_IAM (Amazon MSK with IAM access control, port
    /// 9098) implies SASL_SSL and takes its identity from the standard AWS
    /// credential chain: environment, shared profile, web identity token
    /// (IRSA, EKS Pod Identity), container and instance metadata.
    #[arg(long, env = "KAFKA_SASL_MECHANISM", value_parser = parse_mechanism)]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name.
    #[arg(long, env = "KAFKA_USERNAME")]
    pub username: Option<String>,
    /// SASL password (prefer the environment variable to the flag: flags show in `ps`).
    #[arg(long, env = "KAFKA_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// AWS region of the MSK cluster, for AWS_MSK_IAM.
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,
    /// Lifetime of each MSK IAM token in seconds, 10..=900 [default: 900, as
    /// AWS's signers]. Tokens are refreshed half-way through.
    #[arg(long, env = "MSK_IAM_TOKEN_LIFETIME_S")]
    pub msk_iam_token_lifetime_s: Option<u64>,
    /// PEM file of the CA that signed the brokers' certificates (system CAs if unset).
    #[arg(long, env = "KAFKA_SSL_CA_LOCATION")]
    pub ssl_ca_location: Option<PathBuf>,
    /// Any librdkafka property, key=value; repeatable; wins over ours.
    /// `debug=cgrp` (or any librdkafka debug context) logs at debug level,
    /// target `kafka`: show it with `--log-level info,kafka=debug`.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE", value_parser = parse_property)]
    pub kafka_property: Vec<(String, String)>,
    /// TOML file with defaults for any flag (keys are flag names with `_`).
    #[arg(long = "config", env = "MICROBATCH_CONFIG", value_name = "FILE")]
    pub config_file: Option<PathBuf>,
}

/// The optional TOML file: one key per flag (`max_records = 100`), plus a
/// `[kafka_properties]` table. Unknown keys are errors, so typos surface.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub bootstrap_servers: Option<String>,
    pub security_protocol: Option<String>,
    pub sasl_mechanism: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ssl_ca_location: Option<PathBuf>,
    pub aws_region: Option<String>,
    pub msk_iam_token_lifetime_s: Option<u64>,
    #[serde(default)]
    pub kafka_properties: BTreeMap<String, String>,
    pub topic: Option<String>,
    pub group: Option<String>,
    pub max_records: Option<usize>,
    pub max_bytes: Option<usize>,
    pub max_wait_ms: Option<u64>,
    pub handler: Option<String>,
    pub process_time_ms: Option<u64>,
    pub failure_rate: Option<f64>,
    pub poison_marker: Option<String>,
    pub command: Option<String>,
    pub handler_env: Option<Vec<String>>,
    pub url: Option<String>,
    pub handler_timeout_ms: Option<u64>,
    pub handler_startup_ms: Option<u64>,
    pub ordering: Option<String>,
    pub concurrency: Option<usize>,
    pub commit_interval_ms: Option<u64>,
    pub max_uncommitted_ms: Option<u64>,
    pub max_uncommitted_records: Option<usize>,
    pub drain_timeout_ms: Option<u64>,
    pub retry_initial_ms: Option<u64>,
    pub retry_max_ms: Option<u64>,
    pub max_attempts: Option<u32>,
    pub max_record_age_ms: Option<u64>,
    pub dlq: Option<String>,
    pub dlq_topic: Option<String>,
    pub dlq_partitions: Option<i32>,
    pub dlq_replication_factor: Option<i32>,
    pub dlq_create: Option<String>,
    pub max_records_per_partition: Option<usize>,
    pub max_records_held: Option<usize>,
    pub max_held_bytes: Option<usize>,
    pub http_port: Option<u16>,
    pub http_host: Option<String>,
    pub offset_reset: Option<String>,
    pub group_protocol: Option<String>,
    pub audit_log: Option<PathBuf>,
}

impl FileConfig {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::parse(&text, path)
    }

    /// Reads the file's text; every error names `--config` and the file.
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|e| {
            ConfigError::new("--config", format!("{}: {}", path.display(), e.message())).into()
        })
    }
}

/// Parses a file value with the same parser as its flag, naming the flag on error.
pub fn parse_file_value<T: std::str::FromStr<Err = String>>(
    field: &'static str,
    value: Option<&str>,
) -> Result<Option<T>, ConfigError> {
    value
        .map(|v| v.parse::<T>().map_err(|rule| ConfigError::new(field, rule)))
        .transpose()
}

impl KafkaArgs {
    /// Flags and environment first, then the file, then defaults; validated.
    pub fn resolve(&self, file: &FileConfig) -> anyhow::Result<KafkaConfig> {
        let sasl_mechanism = match self.sasl_mechanism {
            Some(m) => Some(m),
            None => parse_file_value("--sasl-mechanism", file.sasl_mechanism.as_deref())?,
        };
        // MSK IAM only exists over SASL_SSL, so naming it is enough.
        let default_protocol = if sasl_mechanism == Some(SaslMechanism::AwsMskIam) {
            SecurityProtocol::SaslSsl
        } else {
            SecurityProtocol::Plaintext
        };
        let security_protocol = match self.security_protocol {
            Some(p) => p,
            None => parse_file_value("--security-protocol", file.security_protocol.as_deref())?
                .unwrap_or(default_protocol),
        };
        let mut properties: Vec<(String, String)> =
            file.kafka_properties.clone().into_iter().collect();
        properties.extend(self.kafka_property.iter().cloned());
        let cfg = KafkaConfig {
            bootstrap_servers: self
                .bootstrap_servers
                .clone()
                .or_else(|| file.bootstrap_servers.clone())
                .unwrap_or_else(|| DEFAULT_BOOTSTRAP.to_string()),
            security_protocol,
            sasl_mechanism,
            username: self
                .username
                .clone()
                .or_else(|| file.username.clone())
                .filter(|u| !u.is_empty()),
            password: self
                .password
                .clone()
                .or_else(|| file.password.clone())
                .filter(|p| !p.is_empty())
                .map(Secret::new),
            ssl_ca_location: self
                .ssl_ca_location
                .clone()
                .or_else(|| file.ssl_ca_location.clone()),
            properties,
            aws_region: self
                .aws_region
                .clone()
                .or_else(|| file.aws_region.clone())
                .filter(|r| !r.is_empty()),
            msk_iam_token_lifetime: std::time::Duration::from_secs(pick(
                self.msk_iam_token_lifetime_s,
                file.msk_iam_token_lifetime_s,
                microbatch_kafka::aws_iam::DEFAULT_TOKEN_LIFETIME.as_secs(),
            )),
            msk_iam: None,
        };
        Ok(cfg.validate()?)
    }

    pub fn load_file(&self) -> anyhow::Result<FileConfig> {
        FileConfig::load(self.config_file.as_deref()).context("reading the configuration file")
    }
}

/// Picks flag, then file, then default; `field` names the flag in errors.
pub fn pick<T>(flag: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(file).unwrap_or(default)
}

/// Whose lag to read: a consumer group on a topic (`lag`, `top`).
#[derive(Debug, Args)]
pub struct LagTarget {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Topic.
    #[arg(long, env = "KAFKA_TOPIC")]
    pub topic: String,
    /// Consumer group.
    #[arg(long, env = "CONSUMER_GROUP")]
    pub group: String,
}

impl LagTarget {
    /// A lag reader for the group, its broker calls bounded by `timeout`.
    pub fn reader(&self, timeout: std::time::Duration) -> anyhow::Result<LagReader> {
        let file = self.kafka.load_file()?;
        let kafka = self.kafka.resolve(&file)?.start_msk_iam()?;
        Ok(LagReader::new(&kafka, &self.group, &self.topic, timeout)?)
    }
}

/// The topic and consumer group of the workers (flag, environment or file).
#[derive(Debug, Clone, Args)]
pub struct GroupArgs {
    /// Topic the workers consume.
    #[arg(long, env = "KAFKA_TOPIC")]
    pub topic: Option<String>,
    /// The workers' consumer group.
    #[arg(long, env = "CONSUMER_GROUP")]
    pub group: Option<String>,
}

impl GroupArgs {
    /// Both are required; the file fills in what flags and environment lack.
    pub fn resolve(&self, file: &FileConfig) -> Result<(String, String), ConfigError> {
        Ok((
            require(
                self.topic.clone(),
                file.topic.clone(),
                "--topic",
                "KAFKA_TOPIC",
            )?,
            require(
                self.group.clone(),
                file.group.clone(),
                "--group",
                "CONSUMER_GROUP",
            )?,
        ))
    }
}

/// Like [`pick`] for a value that must be given somewhere.
pub fn require<T>(
    flag: Option<T>,
    file: Option<T>,
    field: &'static str,
    env: &str,
) -> Result<T, ConfigError> {
    flag.or(file).ok_or_else(|| {
        ConfigError::new(
            field,
            format!("is required (flag, {env}, or the config file)"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `microbatch run`'s flags that have no key in the file, and why.
    const RUN_FLAGS_NOT_IN_FILE: &[&str] = &[
        "config",               // names the file itself
        "kafka-property",       // the file's [kafka_properties] table
        "process-time-seconds", // the replaced system's variable, hidden
        "help",
    ];

    #[test]
    fn every_run_flag_has_a_key_in_the_config_file() {
        use clap::CommandFactory;
        let cli = crate::cmd::Cli::command();
        let run = cli.find_subcommand("run").expect("run exists");
        let mut checked = 0;
        for arg in run.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if RUN_FLAGS_NOT_IN_FILE.contains(&long) {
                continue;
            }
            let key = long.replace('-', "_");
            // A wrong type is refused too, but for its type, not the name.
            if let Err(e) = FileConfig::parse(&format!("{key} = 0\n"), Path::new("f.toml")) {
                assert!(
                    !format!("{e:#}").contains("unknown field"),
                    "--{long} has no key `{key}` in the --config file: {e:#}"
                );
            }
            checked += 1;
        }
        assert!(checked > 30, "only {checked} flags found: has run moved?");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("MICROBATCH_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000)
        ))]

        /// Any text, and any line made of our keys with values of any
        /// type, is read or refused with an error that names the flag:
        /// never a panic.
        #[test]
        fn any_config_file_is_read_or_refused_naming_the_flag(
            text in prop_oneof![
                "[ -~\\n]{0,200}",
                (
                    prop_oneof![
                        proptest::sample::select(["max_records", "handler_env", "dlq", "url", "kafka_properties"].map(String::from).to_vec()),
                        "[a-z_]{1,12}",
                    ],
                    prop_oneof![
                        proptest::sample::select(["3", "-1", "\"x\"", "[\"A\"]", "{}", "1e400", "true"].map(String::from).to_vec()),
                        "[ -~]{0,12}",
                    ],
                ).prop_map(|(k, v)| format!("{k} = {v}\n")),
            ]
        ) {
            if let Err(e) = FileConfig::parse(&text, Path::new("f.toml")) {
                prop_assert!(e.to_string().contains("--config"), "{e:#}");
            }
        }
    }

    #[test]
    fn file_rejects_unknown_keys_and_names_the_flag() {
        let dir = std::env::temp_dir().join(format!("mb-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "max_recordz = 3\n").unwrap();
        let err = FileConfig::load(Some(&path)).unwrap_err();
        assert!(err.to_string().contains("--config"), "{err:#}");
        std::fs::write(
            &path,
            "max_records = 3\n[kafka_properties]\n\"fetch.min.bytes\" = \"1\"\n",
        )
        .unwrap();
        let f = FileConfig::load(Some(&path)).unwrap();
        assert_eq!(f.max_records, Some(3));
        assert_eq!(f.kafka_properties["fetch.min.bytes"], "1");
    }

    #[test]
    fn flag_beats_file_beats_default() {
        assert_eq!(pick(Some(1), Some(2), 3), 1);
        assert_eq!(pick(None, Some(2), 3), 2);
        assert_eq!(pick(None, None, 3), 3);
    }
}
