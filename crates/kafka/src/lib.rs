//! microbatch-kafka: the connection to Kafka, shared by the worker
//! (`microbatch-core`), the scaling side (`microbatch-scaling`) and the
//! binary.
//!
//! # Layout
//! - [`config`]: [`KafkaConfig`] (brokers, security protocol, SASL, TLS,
//!   pass-through properties) and [`ConfigError`]; validated once, every
//!   error names its flag.
//! - [`secret`]: [`Secret`], a value never shown, and which librdkafka
//!   properties hold one.
//! - [`client`]: one place turns a [`KafkaConfig`] into librdkafka
//!   properties and clients; [`ClientError`] sorts what went wrong.
//! - [`admin`]: topic lookup, creation with settings, deletion.
//! - [`aws_iam`]: Amazon MSK IAM tokens (SigV4-signed OAUTHBEARER): the
//!   pure refresh schedule, signing, and the background refresher.
//! - [`capacity_report`]: the capacity report a worker writes into its
//!   commit metadata and the scaling side reads back.
//! - [`group_member`]: whether a classic consumer-group member subscribed
//!   to a topic, from DescribeGroups' member metadata.
//! - [`log_throttle`]: one line per back-off step for a repeating problem.
//! - [`share`]: the share-group (KIP-932) consumer, on `kafka-protocol`.

pub mod admin;
pub mod aws_iam;
pub mod capacity_report;
pub mod client;
pub mod config;
pub mod group_member;
pub mod log_throttle;
pub mod secret;
pub mod share;

pub use client::ClientError;
pub use config::{ConfigError, KafkaConfig};
pub use log_throttle::LogThrottle;
pub use secret::Secret;
