//! Flags shared by every command.
//!
//! Precedence: a flag beats its environment variable (clap does that), both
//! beat the `--config` file (see [`crate::config_file`]), which beats the
//! library's default, shown by `--help`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use microbatch_kafka::config::{
    parse_property, ConfigError, KafkaConfig, SaslMechanism, Secret, SecurityProtocol,
    DEFAULT_BOOTSTRAP_SERVERS,
};
use microbatch_scaling::lag::LagReader;
use serde::{Deserialize, Serialize};

fn parse_protocol(s: &str) -> Result<SecurityProtocol, String> {
    s.parse()
}

fn parse_mechanism(s: &str) -> Result<SaslMechanism, String> {
    s.parse()
}

/// Where Kafka is and how to log in: the same flags on every command.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(next_help_heading = "Kafka connection")]
pub struct KafkaArgs {
    /// Brokers, comma-separated host:port [default: 127.0.0.1:9092]. (`demo`
    /// runs its own broker unless one is named.)
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: Option<String>,
    /// PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL [default: PLAINTEXT;
    /// SASL_SSL with AWS_MSK_IAM].
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
    /// SASL password (prefer the environment variable to the flag: flags
    /// show in `ps`); a value starting with `-` is the value, not a flag.
    #[arg(
        long,
        env = "KAFKA_PASSWORD",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    pub password: Option<String>,
    /// AWS region of the MSK cluster, for AWS_MSK_IAM.
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,
    /// Lifetime of each MSK IAM token in seconds, 10..=900 (900 as AWS's
    /// signers). Tokens are refreshed half-way through.
    #[arg(long, env = "MSK_IAM_TOKEN_LIFETIME_S", default_value_t = microbatch_kafka::aws_iam::DEFAULT_TOKEN_LIFETIME.as_secs())]
    pub msk_iam_token_lifetime_s: u64,
    /// PEM file of the CA that signed the brokers' certificates (system CAs if unset).
    #[arg(long, env = "KAFKA_SSL_CA_LOCATION")]
    pub ssl_ca_location: Option<PathBuf>,
    /// Any librdkafka property, key=value; repeatable; wins over ours and
    /// over MICROBATCH_KAFKA_PROPERTIES (a JSON object of them, which
    /// `supervise` hands its workers).
    /// `debug=cgrp` (or any librdkafka debug context) logs at debug level,
    /// target `kafka`: show it with `--log-level info,kafka=debug`.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE", value_parser = parse_property, allow_hyphen_values = true)]
    pub kafka_property: Vec<(String, String)>,
    /// The file's `[kafka_properties]` table; `--kafka-property` wins.
    #[arg(skip)]
    #[serde(default)]
    pub kafka_properties: BTreeMap<String, String>,
    /// TOML file with values for any flag: keys are flag names with `_` for
    /// `-` (`max_records = 500`), plus a `[kafka_properties]` table. Flags
    /// and environment variables win over it.
    #[arg(long = "config", env = "MICROBATCH_CONFIG", value_name = "FILE")]
    pub config_file: Option<PathBuf>,
}

impl KafkaArgs {
    /// The connection these flags describe, validated.
    pub fn resolve(&self) -> Result<KafkaConfig, ConfigError> {
        // MSK IAM only exists over SASL_SSL, so naming it is enough.
        let default_protocol = if self.sasl_mechanism == Some(SaslMechanism::AwsMskIam) {
            SecurityProtocol::SaslSsl
        } else {
            SecurityProtocol::Plaintext
        };
        // The file's table, then the environment's, then the flags: the
        // later one wins.
        let mut properties: Vec<(String, String)> =
            self.kafka_properties.clone().into_iter().collect();
        properties.extend(self.properties_to_hand_down()?);
        let properties = last_of_each(properties);
        let cfg = KafkaConfig {
            bootstrap_servers: self
                .bootstrap_servers
                .clone()
                .unwrap_or_else(|| DEFAULT_BOOTSTRAP_SERVERS.to_string()),
            security_protocol: self.security_protocol.unwrap_or(default_protocol),
            sasl_mechanism: self.sasl_mechanism,
            username: self.username.clone().filter(|u| !u.is_empty()),
            password: self
                .password
                .clone()
                .filter(|p| !p.is_empty())
                .map(Secret::new),
            ssl_ca_location: self.ssl_ca_location.clone(),
            properties,
            aws_region: region_for(
                self.sasl_mechanism,
                self.aws_region.as_deref(),
                std::env::var("AWS_REGION").ok().as_deref(),
            ),
            msk_iam_token_lifetime: std::time::Duration::from_secs(self.msk_iam_token_lifetime_s),
            msk_iam: None,
        };
        cfg.validate()
    }

    pub fn config_file(&self) -> Option<&Path> {
        self.config_file.as_deref()
    }

    /// The properties of the environment and the flags, the later winning:
    /// what `supervise` hands its workers in [`KAFKA_PROPERTIES_ENV`]. The
    /// file's table is not among them: the workers read the file itself,
    /// as it is when each starts, below these.
    pub fn properties_to_hand_down(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let mut properties =
            properties_from_env(std::env::var(KAFKA_PROPERTIES_ENV).ok().as_deref())?;
        properties.extend(self.kafka_property.iter().cloned());
        Ok(last_of_each(properties))
    }
}

/// Each key once, with its last value, where it first appeared: librdkafka
/// applies the last, and a reader that takes the first (group.protocol)
/// then agrees with it.
fn last_of_each(properties: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut kept: Vec<(String, String)> = Vec::with_capacity(properties.len());
    for (key, value) in properties {
        match kept.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => kept.push((key, value)),
        }
    }
    kept
}

/// librdkafka properties as a JSON object of strings
/// (`{"ssl.key.pem": "-----BEGIN…"}`): how `supervise` hands its properties
/// to the workers it starts without showing them in `ps`, and a way to set
/// them in a pod spec. Below `--kafka-property`, above the file's table.
pub const KAFKA_PROPERTIES_ENV: &str = "MICROBATCH_KAFKA_PROPERTIES";

/// The properties in [`KAFKA_PROPERTIES_ENV`]'s value, if set. An error
/// names the variable, never the value (it may hold a password).
fn properties_from_env(value: Option<&str>) -> Result<Vec<(String, String)>, ConfigError> {
    let Some(text) = value.filter(|t| !t.trim().is_empty()) else {
        return Ok(Vec::new());
    };
    let refused = || {
        ConfigError::new(
            KAFKA_PROPERTIES_ENV,
            "expected a JSON object of strings, {\"key\": \"value\"} (the value is not shown: it may \
             hold a secret)",
        )
    };
    let map: BTreeMap<String, String> = serde_json::from_str(text).map_err(|_| refused())?;
    if map
        .keys()
        .any(|k| k.is_empty() || k.contains(char::is_whitespace))
    {
        return Err(refused());
    }
    Ok(map.into_iter().collect())
}

/// The properties for [`KAFKA_PROPERTIES_ENV`].
pub fn properties_to_env(properties: &[(String, String)]) -> String {
    let map: BTreeMap<&str, &str> = properties
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    serde_json::to_string(&map).expect("a map of strings serializes")
}

/// The region the client signs MSK IAM tokens for. `AWS_REGION` is set in
/// every pod on AWS, whatever the cluster's login: a region that is only
/// that ambient variable is dropped for other mechanisms, while one named
/// for this client (flag or file) with another mechanism stays, so
/// validation refuses the mistake.
fn region_for(
    mechanism: Option<SaslMechanism>,
    region: Option<&str>,
    ambient: Option<&str>,
) -> Option<String> {
    let region = region.filter(|r| !r.is_empty())?;
    if mechanism != Some(SaslMechanism::AwsMskIam) && Some(region) == ambient {
        return None;
    }
    Some(region.to_string())
}

/// Whose lag to read: a consumer group on a topic (`lag`, `top`).
#[derive(Debug, Args, Serialize, Deserialize)]
pub struct LagTarget {
    #[command(flatten)]
    #[serde(flatten)]
    pub kafka: KafkaArgs,
    /// Topic.
    #[arg(long, env = "KAFKA_TOPIC")]
    pub topic: String,
    /// Consumer group (`lag` takes --share-group instead for a share group).
    #[arg(long, env = "CONSUMER_GROUP")]
    pub group: Option<String>,
}

impl LagTarget {
    /// The consumer group, which every reader but a share group's needs.
    pub fn group(&self) -> Result<&str, ConfigError> {
        self.group.as_deref().ok_or_else(|| {
            ConfigError::new(
                "--group",
                "is required (flag, CONSUMER_GROUP, or the config file)",
            )
        })
    }

    /// A lag reader for the group, its broker calls bounded by `timeout`.
    pub fn reader(&self, timeout: std::time::Duration) -> anyhow::Result<LagReader> {
        let group = self.group()?;
        let kafka = self.kafka.resolve()?.start_msk_iam()?;
        Ok(LagReader::new(&kafka, group, &self.topic, timeout)?)
    }
}

/// The topic and consumer group of the workers (flag, environment or file).
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct GroupArgs {
    /// Topic the workers consume.
    #[arg(long, env = "KAFKA_TOPIC")]
    pub topic: Option<String>,
    /// The workers' consumer group.
    #[arg(long, env = "CONSUMER_GROUP")]
    pub group: Option<String>,
}

impl GroupArgs {
    /// Both are required, from a flag, the environment or the file.
    pub fn resolve(&self) -> Result<(String, String), ConfigError> {
        Ok((
            require(self.topic.clone(), "--topic", "KAFKA_TOPIC")?,
            require(self.group.clone(), "--group", "CONSUMER_GROUP")?,
        ))
    }
}

/// A value that must be given somewhere.
pub fn require<T>(value: Option<T>, field: &'static str, env: &str) -> Result<T, ConfigError> {
    value.ok_or_else(|| {
        ConfigError::new(
            field,
            format!("is required (flag, {env}, or the config file)"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_travel_through_the_environment_and_errors_do_not_show_them() {
        let pem = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n";
        let sent = vec![
            (
                "sasl.password".to_string(),
                "hunter2, with = and \"".to_string(),
            ),
            ("ssl.key.pem".to_string(), pem.to_string()),
        ];
        let text = properties_to_env(&sent);
        assert_eq!(properties_from_env(Some(&text)).unwrap(), sent);
        assert_eq!(properties_from_env(None).unwrap(), vec![]);
        assert_eq!(properties_from_env(Some(" ")).unwrap(), vec![]);
        for bad in [
            "sasl.password=hunter2",
            "{\"sasl.password\": 7}",
            "{\"a b\": \"hunter2\"}",
        ] {
            let e = properties_from_env(Some(bad)).unwrap_err();
            assert_eq!(e.field, KAFKA_PROPERTIES_ENV);
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn a_property_given_twice_keeps_its_last_value() {
        let p = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            last_of_each(vec![
                p("group.protocol", "classic"),
                p("a", "1"),
                p("group.protocol", "consumer"),
            ]),
            vec![p("group.protocol", "consumer"), p("a", "1")]
        );
    }

    #[test]
    fn the_ambient_aws_region_does_not_break_other_logins() {
        use SaslMechanism::*;
        let iam = Some(AwsMskIam);
        let scram = Some(ScramSha512);
        assert_eq!(
            region_for(scram, Some("eu-west-1"), Some("eu-west-1")),
            None
        );
        assert_eq!(region_for(None, Some("eu-west-1"), Some("eu-west-1")), None);
        assert_eq!(
            region_for(scram, Some("eu-west-1"), None).as_deref(),
            Some("eu-west-1"),
            "named for this client: validation refuses it"
        );
        assert_eq!(
            region_for(iam, Some("eu-west-1"), Some("eu-west-1")).as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(region_for(iam, Some(""), None), None);
    }
}
