//! A share-group consumer (KIP-932) on the `kafka-protocol` crate: any
//! number of members read the same partitions, each record acquired by one
//! member under a time-limited lock and acknowledged on its own.
//!
//! - [`acks`]: the acknowledgement ledger, pure.
//! - [`records`]: decoding fetched batches into acquired records, pure.
//! - [`wire`]: one connection to one broker.
//! - [`membership`]: ShareGroupHeartbeat with the group coordinator, in a
//!   task of its own; the broker assigns.
//! - [`consumer`]: [`ShareConsumer`], fetching from partition leaders with
//!   acknowledgements piggy-backed, and closing cleanly.
//! - [`backlog`]: a share group's backlog per partition, for `lag`.
//! - [`security`]: TLS and SASL (PLAIN, SCRAM, MSK IAM) from a
//!   [`crate::KafkaConfig`]; [`scram`]: the SCRAM exchange, pure.

pub mod ack_v2;
pub mod acks;
pub mod backlog;
pub mod cluster;
pub mod consumer;
pub mod fetch_v2;
mod hand_encoded;
pub mod membership;
pub mod records;
pub mod scram;
pub mod security;
pub mod wire;

use std::time::Duration;

use kafka_protocol::ResponseError;
use thiserror::Error;

pub use acks::{AckBatch, AckType};
pub use consumer::{AckOutcome, Fetched, ShareConsumer, ShareConsumerConfig};
pub use fetch_v2::AcquireMode;
pub use records::ShareRecord;

/// What went wrong talking to the brokers about a share group.
#[derive(Debug, Clone, Error)]
pub enum ShareError {
    #[error("cannot reach {broker}: {reason}")]
    Io { broker: String, reason: String },
    /// The broker's TLS certificate did not verify: a setting to fix, not
    /// a broker that is down (retried all the same, as librdkafka does).
    #[error("cannot reach {broker}: {reason}")]
    Certificate { broker: String, reason: String },
    #[error("{0} closed the connection")]
    Disconnected(String),
    #[error("{api} to {broker} had no answer within {after:?}")]
    Timeout {
        api: &'static str,
        broker: String,
        after: Duration,
    },
    #[error("{api} is not usable with {broker}: {detail}")]
    Unsupported {
        api: &'static str,
        broker: String,
        detail: String,
    },
    #[error("{api} failed: {error}{}", message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Broker {
        api: &'static str,
        error: ResponseError,
        message: Option<String>,
    },
    #[error("cannot encode {0}")]
    Encode(String),
    #[error("cannot decode {0}")]
    Decode(String),
    #[error("none of the bootstrap servers answered: {0}")]
    NoBroker(String),
    /// Partitions whose leader is unknown, not in the metadata or not
    /// answering: their broker is down or cut off and no replica has taken
    /// over.
    #[error("{topic} partitions {partitions:?} have no leader (offline)")]
    Offline { topic: String, partitions: Vec<i32> },
    #[error("the consumer is closed")]
    Closed,
    #[error("invalid share consumer setting: {0}")]
    Config(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    /// A request carrying verdicts the broker failed with
    /// UNKNOWN_SERVER_ERROR: the poll goes on, and the verdicts were
    /// answered as refused rather than sent again (Kafka 4.3.2 fails a
    /// whole ShareFetch so when its verdicts name records a restarted
    /// broker no longer tracks, and sending them again fails every request
    /// after it).
    #[error("{0} (the broker's own failure; trying again)")]
    Transient(Box<ShareError>),
    /// Verdicts kept for the next poll: the share session they belong to is
    /// being opened again (a session's first request may not carry them).
    #[error("{count} verdicts wait for their share session to reopen; they go with the next poll")]
    Unsent { count: usize },
}

impl ShareError {
    pub fn io(broker: &str, e: std::io::Error) -> Self {
        Self::Io {
            broker: broker.to_string(),
            reason: e.to_string(),
        }
    }

    pub fn broker(api: &'static str, code: i16, message: Option<String>) -> Self {
        Self::Broker {
            api,
            error: ResponseError::try_from_code(code).unwrap_or(ResponseError::Unknown(code)),
            message,
        }
    }

    /// Whether trying again (after a reconnect or a metadata refresh) can
    /// succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Io { .. }
            | Self::Certificate { .. }
            | Self::Disconnected(_)
            | Self::Timeout { .. }
            | Self::NoBroker(_)
            | Self::Offline { .. }
            | Self::Transient(_)
            | Self::Unsent { .. } => true,
            Self::Broker { error, .. } => error.is_retriable(),
            _ => false,
        }
    }

    /// [`Self::Offline`], the one wording of partitions without a leader.
    pub fn offline(topic: &str, partitions: &[i32]) -> Self {
        Self::Offline {
            topic: topic.to_string(),
            partitions: partitions.to_vec(),
        }
    }

    /// The broker could not be reached or did not answer: nothing says
    /// whether it still leads what was asked of it.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Self::Io { .. } | Self::Disconnected(_) | Self::Timeout { .. } | Self::NoBroker(_)
        )
    }

    /// The broker refused for want of an ACL.
    pub fn is_authorization(&self) -> bool {
        matches!(
            self,
            Self::Broker {
                error: ResponseError::GroupAuthorizationFailed
                    | ResponseError::ClusterAuthorizationFailed
                    | ResponseError::TopicAuthorizationFailed,
                ..
            }
        )
    }

    /// The broker refused a config value.
    pub fn is_invalid_config(&self) -> bool {
        matches!(
            self,
            Self::Broker {
                error: ResponseError::InvalidConfig | ResponseError::InvalidRequest,
                ..
            }
        )
    }
}
