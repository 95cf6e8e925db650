//! microbatch-core: Kafka microbatch processing with at-least-once delivery.
//!
//! # Layout
//! - [`config`]: typed, validated worker configuration (batching, ordering,
//!   retries, dead letters); every error names its flag. The connection
//!   (brokers, security, MSK IAM, clients) is the `microbatch-kafka`
//!   crate's, re-exported here as [`kafka`].
//! - [`batch`]: the [`batch::Batch`] type and the batch rule.
//! - [`capacity`]: how busy the slots are and what that says the worker
//!   could do; carried to the scaling side in commit metadata.
//! - [`offsets`]: the offset rule: what may be committed per partition.
//! - [`handler`]: the [`handler::Handler`] trait and the `simulate`, `exec`
//!   and `http` handlers.
//! - [`fetch`]: fetched records, taken from librdkafka a burst at a time.
//! - [`commit`]: asynchronous commits whose results come back.
//! - [`dlq`]: the dead-letter topic writer and its context headers.
//! - [`pipeline`]: the worker's decisions as a state machine without I/O:
//!   lanes, dispatch, commits, rebalance and shutdown phases.
//! - [`failure`]: retry, bisection, dead-lettering and the circuit breaker,
//!   as pure functions.
//! - [`worker`]: the consumer-group member: the adapter that feeds the
//!   pipeline from librdkafka and the handler and carries out its intents.
//! - [`telemetry`]: metrics (stable names) and readiness.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`.
//!
//! A library user implements [`handler::Handler`] and runs a
//! [`worker::Worker`]; the `microbatch` binary does the same from flags.

pub mod batch;
pub mod capacity;
pub mod commit;
pub mod config;
pub mod dlq;
pub mod failure;
pub mod fetch;
pub mod handler;
pub mod health;
pub mod http;
pub mod offsets;
pub mod pipeline;
pub mod telemetry;
pub mod worker;

pub use batch::{Batch, Record};
pub use config::WorkerConfig;
pub use handler::{BatchOutcome, Failure, Handler};
pub use microbatch_kafka as kafka;
pub use microbatch_kafka::KafkaConfig;
pub use telemetry::Telemetry;
pub use worker::{Worker, WorkerError, WorkerReport};
