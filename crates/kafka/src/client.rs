//! Kafka client set-up: one place turns a [`KafkaConfig`] into librdkafka
//! properties, so security settings mean the same for every command.

use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext};
use thiserror::Error;

use crate::aws_iam::{NativeHandle, OauthHook, WithTokens};
use crate::config::{KafkaConfig, SecurityProtocol};

/// Errors from talking to the brokers, sorted by what the caller can do.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("authentication failed: {0} (check the credentials and --sasl-mechanism)")]
    Authentication(String),
    #[error("brokers unreachable at {servers}: {reason}")]
    Unreachable { servers: String, reason: String },
    #[error("topic {topic:?} does not exist")]
    UnknownTopic { topic: String },
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

impl ClientError {
    /// Sorts a raw client error into the cases above.
    pub fn classify(err: KafkaError, servers: &str) -> Self {
        let text = err.to_string();
        let code = match &err {
            KafkaError::AdminOp(code) => Some(*code),
            _ => err.rdkafka_error_code(),
        };
        match code {
            Some(RDKafkaErrorCode::Authentication)
            | Some(RDKafkaErrorCode::SaslAuthenticationFailed) => Self::Authentication(text),
            Some(RDKafkaErrorCode::AllBrokersDown)
            | Some(RDKafkaErrorCode::BrokerTransportFailure)
            | Some(RDKafkaErrorCode::OperationTimedOut)
            | Some(RDKafkaErrorCode::RequestTimedOut) => Self::Unreachable {
                servers: servers.to_string(),
                reason: text,
            },
            Some(RDKafkaErrorCode::UnknownTopicOrPartition)
            | Some(RDKafkaErrorCode::UnknownTopic) => Self::UnknownTopic {
                topic: String::new(),
            },
            _ => Self::Kafka(err),
        }
    }
}

impl KafkaConfig {
    /// librdkafka properties for any client of ours.
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.bootstrap_servers)
            .set(
                "security.protocol",
                self.security_protocol.as_str().to_ascii_lowercase(),
            )
            // Connection failures are reported through our error callback,
            // throttled; librdkafka's own copies would repeat every attempt.
            .set("log.connection.close", "false")
            .set_log_level(RDKafkaLogLevel::Warning);
        if let Some(mechanism) = self.effective_mechanism() {
            cfg.set("sasl.mechanisms", mechanism.librdkafka_name());
        }
        if let Some(user) = &self.username {
            cfg.set("sasl.username", user);
        }
        if let Some(password) = &self.password {
            cfg.set("sasl.password", password.expose());
        }
        if self.security_protocol.uses_tls() {
            if let Some(ca) = &self.ssl_ca_location {
                cfg.set("ssl.ca.location", ca.to_string_lossy());
            }
        }
        for (key, value) in &self.properties {
            cfg.set(key, value);
        }
        // librdkafka's `debug` contexts log at debug level, which the level
        // above would drop; they reach `tracing` as target `kafka`.
        if self.properties.iter().any(|(key, _)| key == "debug") {
            cfg.set_log_level(RDKafkaLogLevel::Debug);
        }
        cfg
    }

    /// Every client of ours is made here, from `config` (usually
    /// [`Self::client_config`] with the caller's additions) and `context`:
    /// with MSK IAM on, the token refresher hands it the current token at
    /// once and every new one after, whether or not its main queue (where
    /// librdkafka asks for tokens) is polled.
    pub fn create_client<T, C>(
        &self,
        config: &ClientConfig,
        context: C,
    ) -> KafkaResult<WithTokens<T>>
    where
        C: ClientContext,
        T: FromClientConfigAndContext<C> + NativeHandle,
    {
        let client = config
            .create_with_context(context)
            .map_err(without_secret_values)?;
        Ok(WithTokens::new(self.msk_iam.as_ref(), client))
    }

    /// Whether this config speaks TLS (for messages that explain failures).
    pub fn is_tls(&self) -> bool {
        self.security_protocol != SecurityProtocol::Plaintext
            && self.security_protocol != SecurityProtocol::SaslPlaintext
    }
}

/// A client error with the value of a secret property left out: librdkafka
/// refuses a property naming key and value (`sasl.oauthbearer.client.secret`
/// where the build has no OIDC), and rust-rdkafka prints both.
fn without_secret_values(e: KafkaError) -> KafkaError {
    match e {
        KafkaError::ClientConfig(code, description, key, value)
            if crate::secret::is_secret_property(&key) =>
        {
            let description = if value.is_empty() {
                description
            } else {
                description.replace(&value, "***")
            };
            KafkaError::ClientConfig(code, description, key, "(value not shown)".into())
        }
        other => other,
    }
}

/// Sends a librdkafka log line to `tracing` (target `kafka`). Connection and
/// authentication failures also reach the clients' error callbacks, which
/// report them once per back-off step, so librdkafka's own copies of those
/// (facilities FAIL, ERROR) go to debug.
pub fn forward_log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
            tracing::error!(target: "kafka", facility, "{message}")
        }
        RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning
            if matches!(facility, "FAIL" | "ERROR") =>
        {
            tracing::debug!(target: "kafka", facility, "{message}")
        }
        RDKafkaLogLevel::Error => tracing::error!(target: "kafka", facility, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "kafka", facility, "{message}"),
        _ => tracing::debug!(target: "kafka", facility, "{message}"),
    }
}

/// A client context for helper clients (dead-letter producer, lag reader,
/// admin): logs go through [`forward_log`]; errors at debug, because their
/// callers report the failures that matter, with context. An authentication
/// failure is kept, since the client itself only ever reports "transport
/// failure". OAUTHBEARER tokens come from the config's [`OauthHook`].
#[derive(Debug, Default)]
pub struct QuietContext {
    auth_error: std::sync::Mutex<Option<String>>,
    oauth: OauthHook,
}

impl QuietContext {
    /// A context for clients made from `kafka`.
    pub fn new(kafka: &KafkaConfig) -> Self {
        Self {
            auth_error: Default::default(),
            oauth: kafka.oauth_hook(),
        }
    }

    /// The last authentication failure, if one happened.
    pub fn auth_error(&self) -> Option<String> {
        self.auth_error
            .lock()
            .expect("auth error lock poisoned")
            .clone()
    }
}

/// Keeps an authentication failure's reason in `slot`.
pub fn note_auth_error(slot: &std::sync::Mutex<Option<String>>, error: &KafkaError, reason: &str) {
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication) {
        *slot.lock().expect("auth error lock poisoned") = Some(reason.to_string());
    }
}

impl rdkafka::ClientContext for QuietContext {
    crate::delegate_oauth_token!(oauth);

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        note_auth_error(&self.auth_error, &error, reason);
        tracing::debug!(target: "kafka", error = %error, "{reason}");
    }
}

impl rdkafka::consumer::ConsumerContext for QuietContext {}

impl rdkafka::producer::ProducerContext for QuietContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

/// A context for a helper client whose commits are its only output (the
/// share workers' capacity reports): as [`QuietContext`], and a commit the
/// broker refuses (an ACL, a group in use by others, metadata too large)
/// is logged, now and then, with `what` saying what is lost. librdkafka
/// reports an asynchronous commit's fate only here.
#[derive(Debug)]
pub struct CommitLoggingContext {
    oauth: OauthHook,
    what: &'static str,
    log: crate::log_throttle::LogThrottle,
}

impl CommitLoggingContext {
    pub fn new(kafka: &KafkaConfig, what: &'static str) -> Self {
        Self {
            oauth: kafka.oauth_hook(),
            what,
            log: Default::default(),
        }
    }

    /// The first error of a commit's answer: the request's, else a
    /// partition's.
    pub fn refusal(
        result: &KafkaResult<()>,
        offsets: &rdkafka::TopicPartitionList,
    ) -> Option<KafkaError> {
        match result {
            Err(e) => Some(e.clone()),
            Ok(()) => offsets.elements().iter().find_map(|e| e.error().err()),
        }
    }
}

impl rdkafka::ClientContext for CommitLoggingContext {
    crate::delegate_oauth_token!(oauth);

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "kafka", error = %error, "{reason}");
    }
}

impl rdkafka::consumer::ConsumerContext for CommitLoggingContext {
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &rdkafka::TopicPartitionList) {
        if let Some(error) = Self::refusal(&result, offsets) {
            if let Some(suppressed) = self.log.allow(std::time::Instant::now()) {
                tracing::warn!(error = %error, suppressed, "{}", self.what);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_secret_property_is_not_shown() {
        use rdkafka::types::RDKafkaConfRes;
        let refused = |key: &str| {
            without_secret_values(KafkaError::ClientConfig(
                RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
                "Invalid value \"hunter2\" for configuration property".into(),
                key.into(),
                "hunter2".into(),
            ))
            .to_string()
        };
        let shown = refused("sasl.oauthbearer.client.secret");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("sasl.oauthbearer.client.secret"), "{shown}");
        assert!(
            refused("fetch.min.bytes").contains("hunter2"),
            "a value that is not a secret still helps"
        );
    }
    use crate::config::{SaslMechanism, Secret};

    #[test]
    fn sasl_ssl_sets_every_security_property() {
        let mut k = KafkaConfig::plaintext("b:9096");
        k.security_protocol = SecurityProtocol::SaslSsl;
        k.username = Some("user".into());
        k.password = Some(Secret::new("pw"));
        k.sasl_mechanism = Some(SaslMechanism::ScramSha256);
        k.properties.push(("fetch.max.bytes".into(), "1000".into()));
        let cfg = k.client_config();
        assert_eq!(cfg.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(cfg.get("sasl.mechanisms"), Some("SCRAM-SHA-256"));
        assert_eq!(cfg.get("sasl.username"), Some("user"));
        assert_eq!(cfg.get("sasl.password"), Some("pw"));
        assert_eq!(cfg.get("fetch.max.bytes"), Some("1000"));
    }

    #[test]
    fn msk_iam_is_oauthbearer_over_tls_without_a_password() {
        let mut k = KafkaConfig::plaintext("b-1.msk:9098");
        k.security_protocol = SecurityProtocol::SaslSsl;
        k.sasl_mechanism = Some(SaslMechanism::AwsMskIam);
        k.aws_region = Some("eu-west-1".into());
        let k = k.validate().unwrap();
        let cfg = k.client_config();
        assert_eq!(cfg.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(cfg.get("sasl.mechanisms"), Some("OAUTHBEARER"));
        assert_eq!(cfg.get("sasl.username"), None);
        assert_eq!(cfg.get("sasl.password"), None);
    }

    #[test]
    fn plaintext_sets_no_sasl() {
        let cfg = KafkaConfig::plaintext("b:9092").client_config();
        assert_eq!(cfg.get("sasl.mechanisms"), None);
        assert_eq!(cfg.get("security.protocol"), Some("plaintext"));
    }
}
