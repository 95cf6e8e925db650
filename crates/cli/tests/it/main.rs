//! The integration tests of the `microbatch` binary, one test binary (as
//! ripgrep keeps its own): the real binary run as child processes against a
//! real broker.
//!
//! # Layout
//! - [`harness`]: the broker, a [`harness::Scenario`] per test (directory,
//!   topic, group, workers), handlers that record what they processed, and
//!   the evidence read from outside the worker (handler records, committed
//!   offsets, topics read by another client).
//! - one module per surface: [`worker`] (delivery, shutdown, security),
//!   [`delivery`] (poison, outages, ordering), [`edges`], [`handlers`],
//!   [`fetch`], [`faults`] (librdkafka's mock cluster), [`msk_iam`], [`lag`],
//!   [`supervise`], [`scaler`], [`keda_parity`] (KEDA's own scaler),
//!   [`demo`], [`top`], [`topic`], [`share`] (the share-group client),
//!   [`share_faults`] (the share client with faults injected between it and
//!   the broker).
//!
//! `tests/chaos.rs` is the one test outside: it restarts the broker, so it
//! runs in its own binary, which cargo runs after this one, never beside it.

mod harness;

mod delivery;
mod demo;
mod edges;
mod faults;
mod fetch;
mod handlers;
mod keda_parity;
mod lag;
mod msk_iam;
mod scaler;
mod schemas;
mod share;
mod share_faults;
mod share_worker;
mod supervise;
mod top;
mod topic;
mod worker;
