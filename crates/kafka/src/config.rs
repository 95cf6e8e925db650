//! Where the brokers are and how to authenticate: [`KafkaConfig`], validated
//! once, every error naming the flag it came from.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;

use crate::aws_iam;
pub use crate::secret::{is_secret_property, Secret};

/// A configuration value that was missing or broke a rule.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid {field}: {rule}")]
pub struct ConfigError {
    /// The flag (or key) the value came from, e.g. `--max-records`.
    pub field: &'static str,
    /// What was wrong, in a few words.
    pub rule: String,
}

impl ConfigError {
    pub fn new(field: &'static str, rule: impl Into<String>) -> Self {
        Self {
            field,
            rule: rule.into(),
        }
    }
}

macro_rules! kafka_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [&'static str] = &[$($text),+];

            /// The spelling Kafka and librdkafka use.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                let upper = s.trim().to_ascii_uppercase().replace('_', "-");
                $(if upper == $text.replace('_', "-") { return Ok(Self::$variant); })+
                Err(format!("expected one of {}", Self::ALL.join(", ")))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

kafka_enum!(
    /// How the client talks to the brokers.
    SecurityProtocol {
        Plaintext => "PLAINTEXT",
        Ssl => "SSL",
        SaslPlaintext => "SASL_PLAINTEXT",
        SaslSsl => "SASL_SSL",
    }
);

kafka_enum!(
    /// SASL mechanism for the SASL_* protocols.
    SaslMechanism {
        Plain => "PLAIN",
        ScramSha256 => "SCRAM-SHA-256",
        ScramSha512 => "SCRAM-SHA-512",
        AwsMskIam => "AWS_MSK_IAM",
    }
);

impl SaslMechanism {
    /// The name librdkafka knows: MSK IAM is OAUTHBEARER with our token.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            Self::AwsMskIam => "OAUTHBEARER",
            other => other.as_str(),
        }
    }
}

impl SecurityProtocol {
    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }
}

/// The brokers when none are named: a local broker.
pub const DEFAULT_BOOTSTRAP_SERVERS: &str = "127.0.0.1:9092";

/// Parses one `--kafka-property key=value`.
pub fn parse_property(raw: &str) -> Result<(String, String), String> {
    // The text is not quoted back: `sasl.password hunter2` is a typo that
    // holds a secret.
    let (key, value) = raw
        .split_once('=')
        .ok_or("expected key=value, got no `=` (the text is not shown: it may hold a secret)")?;
    let key = key.trim();
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(
            "expected key=value with a non-empty key without spaces (the text is not shown: \
             it may hold a secret)"
                .into(),
        );
    }
    Ok((key.to_string(), value.to_string()))
}

/// Where the brokers are and how to authenticate: shared by every command.
#[derive(Clone)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    pub security_protocol: SecurityProtocol,
    pub sasl_mechanism: Option<SaslMechanism>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ssl_ca_location: Option<PathBuf>,
    /// librdkafka properties passed through as given; applied last, so they win.
    pub properties: Vec<(String, String)>,
    /// The AWS region of the MSK cluster, for `AWS_MSK_IAM`.
    pub aws_region: Option<String>,
    /// Lifetime of each MSK IAM token (`X-Amz-Expires`).
    pub msk_iam_token_lifetime: Duration,
    /// The running token refresher, once [`KafkaConfig::start_msk_iam`]
    /// started it; every client made from this config shares it.
    pub msk_iam: Option<aws_iam::MskIamTokens>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: Vec<String> = self
            .properties
            .iter()
            .map(|(k, v)| {
                if is_secret_property(k) {
                    format!("{k}=***")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("properties", &properties)
            .field("aws_region", &self.aws_region)
            .field("msk_iam_token_lifetime", &self.msk_iam_token_lifetime)
            .finish()
    }
}

impl KafkaConfig {
    /// Checks that the parts fit together: SASL needs a user and a password,
    /// credentials need a SASL protocol to be sent at all.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(ConfigError::new(
                "--bootstrap-servers",
                "must name at least one host:port",
            ));
        }
        for server in self.bootstrap_servers.split(',') {
            let server = server.trim();
            let port_ok = server
                .rsplit_once(':')
                .map(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
                .unwrap_or(false);
            if !port_ok {
                return Err(ConfigError::new(
                    "--bootstrap-servers",
                    format!("expected host:port, got {server:?}"),
                ));
            }
        }
        if self.sasl_mechanism == Some(SaslMechanism::AwsMskIam) {
            self.check_msk_iam()?;
        } else if self.aws_region.is_some() && self.security_protocol.uses_sasl() {
            return Err(ConfigError::new(
                "--aws-region",
                "is only used with --sasl-mechanism AWS_MSK_IAM",
            ));
        } else if self.security_protocol.uses_sasl() {
            if self.username.as_deref().unwrap_or("").is_empty() {
                return Err(ConfigError::new(
                    "--username",
                    format!(
                        "required with --security-protocol {}",
                        self.security_protocol
                    ),
                ));
            }
            if self
                .password
                .as_ref()
                .map(|p| p.expose().is_empty())
                .unwrap_or(true)
            {
                return Err(ConfigError::new(
                    "--password",
                    format!(
                        "required with --security-protocol {}",
                        self.security_protocol
                    ),
                ));
            }
        } else if self.username.is_some() || self.password.is_some() {
            return Err(ConfigError::new(
                "--security-protocol",
                format!(
                    "{} sends no credentials, but --username/--password are set; \
                     use SASL_SSL or SASL_PLAINTEXT",
                    self.security_protocol
                ),
            ));
        }
        if let Some(ca) = &self.ssl_ca_location {
            if !ca.exists() {
                return Err(ConfigError::new(
                    "--ssl-ca-location",
                    format!("file {} does not exist", ca.display()),
                ));
            }
        }
        Ok(self)
    }

    /// MSK IAM: SASL_SSL, a region, no user or password (the AWS credential
    /// chain gives the identity), a token lifetime AWS accepts.
    fn check_msk_iam(&self) -> Result<(), ConfigError> {
        if self.security_protocol != SecurityProtocol::SaslSsl {
            return Err(ConfigError::new(
                "--security-protocol",
                format!("AWS_MSK_IAM needs SASL_SSL, got {}", self.security_protocol),
            ));
        }
        match self.aws_region.as_deref() {
            None | Some("") => {
                return Err(ConfigError::new(
                    "--aws-region",
                    "required with --sasl-mechanism AWS_MSK_IAM (or set AWS_REGION)",
                ))
            }
            Some(r)
                if !r
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
            {
                return Err(ConfigError::new(
                    "--aws-region",
                    format!("expected a region name like us-east-1, got {r:?}"),
                ))
            }
            Some(_) => {}
        }
        if self.username.is_some() || self.password.is_some() {
            return Err(ConfigError::new(
                "--username",
                "AWS_MSK_IAM takes its identity from the AWS credential chain; \
                 unset --username/--password",
            ));
        }
        let lifetime = self.msk_iam_token_lifetime;
        if lifetime < aws_iam::MIN_TOKEN_LIFETIME || lifetime > aws_iam::DEFAULT_TOKEN_LIFETIME {
            return Err(ConfigError::new(
                "--msk-iam-token-lifetime-s",
                format!(
                    "must be {}..={} seconds, got {}",
                    aws_iam::MIN_TOKEN_LIFETIME.as_secs(),
                    aws_iam::DEFAULT_TOKEN_LIFETIME.as_secs(),
                    lifetime.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// Starts the MSK IAM token refresher when the mechanism asks for it
    /// (once; clones share it). Fails when no credentials can be found.
    pub fn start_msk_iam(mut self) -> Result<Self, aws_iam::MskIamError> {
        if self.sasl_mechanism == Some(SaslMechanism::AwsMskIam) && self.msk_iam.is_none() {
            self.msk_iam = Some(aws_iam::MskIamTokens::start(self.msk_iam_settings())?);
        }
        Ok(self)
    }

    /// The refresher's settings from this config.
    pub fn msk_iam_settings(&self) -> aws_iam::MskIamSettings {
        aws_iam::MskIamSettings {
            region: self.aws_region.clone().unwrap_or_default(),
            policy: aws_iam::RefreshPolicy::with_lifetime(self.msk_iam_token_lifetime),
        }
    }

    /// What this config's client contexts answer librdkafka's token requests with.
    pub fn oauth_hook(&self) -> aws_iam::OauthHook {
        aws_iam::OauthHook::new(self.msk_iam.clone())
    }

    /// The SASL mechanism in force: SCRAM-SHA-512 unless named (MSK's choice).
    pub fn effective_mechanism(&self) -> Option<SaslMechanism> {
        self.security_protocol
            .uses_sasl()
            .then(|| self.sasl_mechanism.unwrap_or(SaslMechanism::ScramSha512))
    }

    /// Whether clients made from this config prove who they are to the
    /// brokers they reach: any SASL mechanism (a password, an MSK IAM or
    /// OAUTHBEARER token), a client certificate or key, or any property that
    /// holds a secret. Such a config must only ever be used against its own
    /// brokers: whoever names others would collect what it sends.
    pub fn presents_credentials(&self) -> bool {
        self.password.is_some()
            || self.sasl_mechanism.is_some()
            || self.msk_iam.is_some()
            || self.properties.iter().any(|(k, _)| {
                let k = k.to_ascii_lowercase();
                is_secret_property(&k)
                    || k.starts_with("sasl.")
                    || k.starts_with("ssl.key")
                    || k.starts_with("ssl.certificate")
                    || k.starts_with("ssl.keystore")
                    || k.starts_with("ssl.engine")
                    || k == "ssl.providers"
            })
    }

    /// The bootstrap brokers, one `host:port` each (for the project's own
    /// protocol client; librdkafka takes the list as it is).
    pub fn bootstrap_list(&self) -> Vec<String> {
        self.bootstrap_servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    /// A local plaintext broker, for tests and examples.
    pub fn plaintext(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            security_protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            username: None,
            password: None,
            ssl_ca_location: None,
            properties: Vec::new(),
            aws_region: None,
            msk_iam_token_lifetime: aws_iam::DEFAULT_TOKEN_LIFETIME,
            msk_iam: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_needs_key_and_equals() {
        assert_eq!(
            parse_property("a.b=c=d").unwrap(),
            ("a.b".into(), "c=d".into())
        );
        assert!(parse_property("novalue").is_err());
        for typo in ["sasl.password hunter2", "sasl.password hunter2=x"] {
            let e = parse_property(typo).unwrap_err();
            assert!(!e.contains("hunter2"), "{e}");
        }
        assert!(parse_property("=x").is_err());
    }

    #[test]
    fn enums_parse_loosely_and_print_strictly() {
        assert_eq!(
            "sasl_ssl".parse::<SecurityProtocol>().unwrap(),
            SecurityProtocol::SaslSsl
        );
        assert_eq!(
            "scram-sha-512".parse::<SaslMechanism>().unwrap().as_str(),
            "SCRAM-SHA-512"
        );
        assert_eq!(
            "SCRAM_SHA_256".parse::<SaslMechanism>().unwrap(),
            SaslMechanism::ScramSha256
        );
        assert!("kerberos".parse::<SaslMechanism>().is_err());
    }

    #[test]
    fn msk_iam_needs_sasl_ssl_a_region_and_no_password() {
        let iam = || {
            let mut k = KafkaConfig::plaintext("b:9098");
            k.security_protocol = SecurityProtocol::SaslSsl;
            k.sasl_mechanism = Some("aws_msk_iam".parse().unwrap());
            k.aws_region = Some("us-east-1".into());
            k
        };
        assert!(iam().validate().is_ok());
        let field = |k: KafkaConfig| k.validate().unwrap_err().field;
        let mut k = iam();
        k.aws_region = None;
        assert_eq!(field(k), "--aws-region");
        let mut k = iam();
        k.aws_region = Some("US East".into());
        assert_eq!(field(k), "--aws-region");
        let mut k = iam();
        k.security_protocol = SecurityProtocol::SaslPlaintext;
        assert_eq!(field(k), "--security-protocol");
        let mut k = iam();
        k.password = Some(Secret::new("pw"));
        assert_eq!(field(k), "--username");
        let mut k = iam();
        k.msk_iam_token_lifetime = Duration::from_secs(901);
        assert_eq!(field(k), "--msk-iam-token-lifetime-s");
        let mut k = iam();
        k.sasl_mechanism = Some(SaslMechanism::ScramSha512);
        k.username = Some("u".into());
        k.password = Some(Secret::new("p"));
        assert_eq!(field(k), "--aws-region");
    }

    #[test]
    fn sasl_requires_credentials_and_credentials_require_sasl() {
        let mut k = KafkaConfig::plaintext("localhost:9092");
        k.username = Some("u".into());
        assert_eq!(
            k.clone().validate().unwrap_err().field,
            "--security-protocol"
        );
        k.security_protocol = SecurityProtocol::SaslSsl;
        assert_eq!(k.clone().validate().unwrap_err().field, "--password");
        k.password = Some(Secret::new("p"));
        let k = k.validate().unwrap();
        assert_eq!(k.effective_mechanism(), Some(SaslMechanism::ScramSha512));
    }

    #[test]
    fn bootstrap_servers_need_ports() {
        assert!(KafkaConfig::plaintext("a:1,b:2").validate().is_ok());
        assert_eq!(
            KafkaConfig::plaintext("a").validate().unwrap_err().field,
            "--bootstrap-servers"
        );
    }
}
