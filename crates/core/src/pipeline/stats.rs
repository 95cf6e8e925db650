//! The pipeline's numbers: what it counted and what it holds, as plain
//! values. The pipeline writes no metric; the worker exports these (see
//! `crate::telemetry::StatsExporter`).

use microbatch_kafka::capacity_report::CapacityReport;

use super::partition::Gate;
use super::Pipeline;

/// Totals since the pipeline began.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub records_processed: u64,
    pub batches_processed: u64,
    pub records_failed: u64,
    pub batches_failed: u64,
    pub records_retried: u64,
    pub records_dead_lettered: u64,
    /// Partitions restarted because their offsets went backwards.
    pub offset_resets: u64,
    /// Records done without a dead letter because the dead-letter topic
    /// held theirs already (written before a restart or rebalance).
    pub dead_letters_found: u64,
}

/// What the pipeline counted and holds now.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats<'a> {
    pub counted: Counters,
    /// The partitions assigned, in order.
    pub partitions: &'a [i32],
    /// Handler batches running.
    pub slots_busy: usize,
    pub paused_partitions: usize,
    /// Partitions whose fresh batches wait for a commit (its time or the
    /// records cap).
    pub partitions_waiting_for_commit: usize,
    pub records_held: usize,
    pub held_bytes: usize,
    /// Done records above the watermarks, waiting for a record below.
    pub commit_watermark_distance: usize,
    /// Records waiting for their dead letter to be acknowledged.
    pub dead_letter_backlog: usize,
    pub circuit_open: bool,
    /// The circuit is open and records wait on the downstream: not ready.
    pub circuit_waiting: bool,
    /// Why dead letters wait, while they wait for a failed write's retry.
    pub dead_letter_error: Option<&'a str>,
    /// Per partition, seconds since the oldest record not done was
    /// written (refreshed once per commit interval).
    pub lag_seconds: &'a [(i32, f64)],
    /// The last capacity window's measurement.
    pub capacity: Option<&'a CapacityReport>,
}

impl Pipeline {
    /// The numbers as they are now.
    pub fn stats(&self) -> Stats<'_> {
        let limit = self.config.uncommitted_limit();
        let dead_letter_backlog = self.dead_letter_backlog();
        Stats {
            counted: self.counted,
            partitions: &self.assigned,
            slots_busy: self.in_flight,
            paused_partitions: self.partitions.values().filter(|p| p.paused).count(),
            partitions_waiting_for_commit: self
                .partitions
                .values()
                .filter(|p| {
                    p.gate(self.clock, limit, self.last_success_id) != Gate::Open
                        || self.waiting_for_ack && p.replayable() > 0
                })
                .count(),
            records_held: self.held,
            held_bytes: self.held_bytes,
            commit_watermark_distance: self
                .partitions
                .values()
                .map(|p| p.offsets.done_above_watermark())
                .sum(),
            dead_letter_backlog,
            circuit_open: self.circuit.is_open(),
            // The circuit stays open until a success (an outage outlives a
            // rebalance that empties the pipeline), but it counts against
            // readiness only while records wait on the downstream:
            // permanent failures that drained an idle topic leave nothing
            // waiting, and a 503 then would only say "no success since"
            // about a downstream nobody needs.
            circuit_waiting: self.circuit.is_open() && (self.held > 0 || self.in_flight > 0),
            dead_letter_error: if dead_letter_backlog == 0 {
                None
            } else {
                self.dead_letter_error.as_deref()
            },
            lag_seconds: &self.lag_seconds,
            capacity: self.capacity.last(),
        }
    }

    /// Per partition, the age of the oldest record held that is not done
    /// (once per commit interval: exporting it allocates a label each).
    pub(super) fn update_lag_ages(&mut self) {
        let now_ms = self.wall_ms(self.clock);
        self.lag_seconds.clear();
        for (p, ps) in &self.partitions {
            let age_ms = match (ps.offsets.watermark(), ps.timestamps.front()) {
                (Some(wm), Some((offset, ts))) if *offset >= wm => (now_ms - ts).max(0),
                _ => 0,
            };
            self.lag_seconds.push((*p, age_ms as f64 / 1000.0));
        }
    }
}
