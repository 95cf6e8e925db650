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
    #[error(transparent)]
    Refused(#[from] Refusal),
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
            | Some(RDKafkaErrorCode::SaslAuthenticationFailed) => {
                Self::Refused(Refusal::Authentication(text))
            }
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

/// Why the brokers would not let a client in. The clients' contexts keep
/// it from librdkafka's error events, because the request that then fails
/// reports only a transport failure.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("authentication failed: {0} (check the credentials and --sasl-mechanism)")]
    Authentication(String),
    #[error(
        "the TLS handshake with the brokers failed: {0} (--ssl-ca-location must hold the CA \
         that signed the brokers' certificates, and the names in --bootstrap-servers must be \
         the certificates' names)"
    )]
    Tls(String),
}

impl Refusal {
    /// The refusal a client error event reports, if it is one. A TLS error
    /// counts only when the brokers' certificate did not verify: a
    /// handshake cut short (a broker restarting) or a session cut later is
    /// no refusal.
    pub fn of(error: &KafkaError, reason: &str) -> Option<Self> {
        match error.rdkafka_error_code()? {
            RDKafkaErrorCode::Authentication => Some(Self::Authentication(reason.to_string())),
            RDKafkaErrorCode::SSL if reason.contains("certificate verify failed") => {
                Some(Self::Tls(reason.to_string()))
            }
            _ => None,
        }
    }
}

/// The last refusal a client's error events reported, for as long as it is
/// recent: a refusal that lasts is reported again as the client reconnects
/// (librdkafka holds back an identical error for 30 s, so about every
/// 30–45 s), and one that passed must not name a later, different failure.
/// Recent counts from when the event was served: clients that keep one
/// (the lag reader) serve their events at every reading.
#[derive(Debug, Default)]
pub struct RefusalSlot(std::sync::Mutex<Option<(std::time::Instant, Refusal)>>);

impl RefusalSlot {
    /// How long a refusal names the failures that follow it.
    pub const RECENT: std::time::Duration = std::time::Duration::from_secs(60);

    /// Keeps the refusal `error` reports, if it is one.
    pub fn note(&self, error: &KafkaError, reason: &str) {
        if let Some(refusal) = Refusal::of(error, reason) {
            *self.0.lock().expect("refusal lock poisoned") =
                Some((std::time::Instant::now(), refusal));
        }
    }

    /// The refusal noted within [`Self::RECENT`] before `now`.
    pub fn recent_at(&self, now: std::time::Instant) -> Option<Refusal> {
        self.0
            .lock()
            .expect("refusal lock poisoned")
            .as_ref()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= Self::RECENT)
            .map(|(_, refusal)| refusal.clone())
    }

    pub fn recent(&self) -> Option<Refusal> {
        self.recent_at(std::time::Instant::now())
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
/// callers report the failures that matter, with context. A refusal
/// (authentication, a TLS handshake) is kept, since the client itself only
/// ever reports "transport failure". OAUTHBEARER tokens come from the
/// config's [`OauthHook`].
#[derive(Debug, Default)]
pub struct QuietContext {
    refusal: RefusalSlot,
    oauth: OauthHook,
}

impl QuietContext {
    /// A context for clients made from `kafka`.
    pub fn new(kafka: &KafkaConfig) -> Self {
        Self {
            refusal: Default::default(),
            oauth: kafka.oauth_hook(),
        }
    }

    /// The recent refusal, if one happened ([`RefusalSlot`]).
    pub fn refusal(&self) -> Option<Refusal> {
        self.refusal.recent()
    }
}

impl rdkafka::ClientContext for QuietContext {
    crate::delegate_oauth_token!(oauth);

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.refusal.note(&error, reason);
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
        // A group the principal may not use fails the coordinator lookup,
        // before any commit is sent: the commit waits for a coordinator and
        // never answers, so the refusal is said here.
        if is_authorization_failure(&error) {
            if let Some(suppressed) = self.log.allow(std::time::Instant::now()) {
                tracing::warn!(error = %error, suppressed, "{}", self.what);
            }
            return;
        }
        tracing::debug!(target: "kafka", error = %error, "{reason}");
    }
}

/// Whether the broker's authorizer refused: no retry mends it until an ACL
/// changes.
pub fn is_authorization_failure(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
        )
    )
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
    fn only_a_certificate_or_authentication_failure_is_a_refusal() {
        let event = |code| KafkaError::Global(code);
        let auth = Refusal::of(&event(RDKafkaErrorCode::Authentication), "bad password");
        assert!(auth.unwrap().to_string().contains("check the credentials"));
        // librdkafka's words with OpenSSL 3.
        let tls = Refusal::of(
            &event(RDKafkaErrorCode::SSL),
            "sasl_ssl://127.0.0.1:9096/bootstrap: SSL handshake failed: error:0A000086:SSL \
             routines::certificate verify failed: broker certificate could not be verified",
        );
        assert!(tls.unwrap().to_string().contains("--ssl-ca-location"));
        // A handshake cut short, a session cut later, a transport failure:
        // no refusal.
        for other in [
            "ssl://b-1:9096/1: SSL handshake failed: error:0A000126:SSL routines::unexpected \
             eof while reading",
            "ssl://b-1:9096/1: SSL transport error: Connection timed out",
        ] {
            assert_eq!(Refusal::of(&event(RDKafkaErrorCode::SSL), other), None);
        }
        let transport = event(RDKafkaErrorCode::BrokerTransportFailure);
        assert_eq!(Refusal::of(&transport, "certificate verify failed"), None);
        // A refusal names the failures that follow it for a while only.
        let slot = RefusalSlot::default();
        slot.note(&event(RDKafkaErrorCode::Authentication), "bad password");
        let now = std::time::Instant::now();
        assert!(slot.recent_at(now).is_some());
        let later = now + RefusalSlot::RECENT + std::time::Duration::from_secs(1);
        assert!(slot.recent_at(later).is_none());
    }

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
