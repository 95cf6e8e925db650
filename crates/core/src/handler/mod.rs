//! Handlers: what is done with a batch.
//!
//! A [`Handler`] receives a [`Batch`] and answers with a [`BatchOutcome`]: all
//! done, some records failed, or the whole batch failed. Each failure says
//! whether trying again may help. The worker owns retries, timeouts and dead
//! letters; a handler only reports.

mod decode;
mod exec;
mod http;
mod json;
mod simulate;

use async_trait::async_trait;

pub use decode::DecodingHandler;
pub use exec::{kill_children, ExecHandler, SCRUBBED_ENV};
pub use http::{redact_url, HttpHandler, HttpHandlerError, MAX_ANSWER_BYTES};
pub use json::{batch_id, encode_batch, FailureReport, Line};
pub use simulate::SimulateHandler;

use crate::batch::Batch;

/// Why a record or batch failed, and whether a retry may succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub error: String,
    /// False for permanent failures (bad input): no retry, straight to the DLQ.
    pub retryable: bool,
}

impl Failure {
    pub fn retryable(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            retryable: true,
        }
    }

    pub fn permanent(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            retryable: false,
        }
    }
}

/// The handler's verdict on a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every record is done.
    Success,
    /// The named records failed; all others are done.
    Partial(Vec<(i64, Failure)>),
    /// As `Partial`, but the handler succeeded on none of the records: the
    /// others are done without it (a filter left them out). It proves
    /// nothing about the downstream (failure rule 3 waits for such proof);
    /// `tried`: the handler was given records and failed them all, which
    /// counts against the downstream as a batch failed as a whole would.
    Unhandled {
        failed: Vec<(i64, Failure)>,
        tried: bool,
    },
    /// No record is done.
    Failed(Failure),
    /// No record was tried: something the worker itself needs to hand the
    /// batch over (the schema registry) gave no answer. Not the records'
    /// fault nor the handler's: the batch waits whole, spends no attempt,
    /// is never bisected nor dead-lettered, and the circuit opens.
    Unavailable(String),
}

/// Processes microbatches. Implement this to plug native Rust code into the
/// worker; `handle` may be called for several batches at once (up to the
/// worker's concurrency), never twice at once for records whose order matters.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, batch: &Batch) -> BatchOutcome;

    /// Whether the handler reads record headers. Copying them costs the poll
    /// thread an allocation per record, so a handler that never looks may
    /// say no (headers are still kept when a dead-letter topic is set).
    fn reads_headers(&self) -> bool {
        true
    }

    /// Whether a batch's `Success` may include records done without the
    /// handler (a filter left them out): then no record of it is evidence
    /// for its key's health (see [`crate::health`]).
    fn skips_records(&self) -> bool {
        false
    }

    /// Called once when the worker starts, before it joins its group, with
    /// the number of batches it may run at once. A handler whose start-up
    /// is slow (a child process) begins it here: the partitions a scale
    /// step hands to a new worker should not wait for it.
    async fn prepare(&self, _slots: usize) {}

    /// The longest a batch may take, given the configured handler timeout.
    /// A handler that allows some batches more (an exec child's first
    /// batch, which waits for the child's own start-up) enforces the
    /// configured timeout itself for the others.
    fn max_time(&self, timeout: std::time::Duration) -> std::time::Duration {
        timeout
    }

    /// Waits until the handler can take a batch without a wait of its own
    /// (an exec child's restart back-off). The worker awaits it before the
    /// handler timeout starts, so such a wait never eats the timeout.
    async fn ready(&self) {}

    /// A configuration error the handler found in its own answers (an exec
    /// command that answers in a shape the worker cannot use, batch after
    /// batch, with fresh children): the worker stops taking work, commits
    /// what is done and exits with this error, rather than retrying for
    /// ever as if the downstream were out.
    fn misconfigured(&self) -> Option<String> {
        None
    }

    /// Called once when the worker stops, after the last batch.
    async fn shutdown(&self) {}
}
