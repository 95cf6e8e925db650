//! Metrics and readiness: every metric the worker exports is defined here,
//! with its stable name.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use microbatch_kafka::capacity_report::CapacityReport;

use crate::pipeline::{Counters, Stats};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub topic: String,
    pub partition: i32,
}

/// The worker's metrics (names in the Prometheus text start `microbatch_`).
pub struct Metrics {
    pub records_processed: Counter,
    pub records_failed: Counter,
    pub records_retried: Counter,
    pub records_dead_lettered: Counter,
    /// Records a --filter left out: done without the handler.
    pub records_filtered: Counter,
    pub batches_processed: Counter,
    pub batches_failed: Counter,
    pub batch_size: Histogram,
    pub batch_duration: Histogram,
    pub commits: Family<ResultLabel, Counter>,
    pub rebalances: Family<KindLabel, Counter>,
    /// Time spent in rebalance callbacks (a revoke drains its partitions there).
    pub rebalance_seconds: Family<KindLabel, Counter<f64, AtomicU64>>,
    pub client_errors: Family<KindLabel, Counter>,
    pub assigned_partitions: Gauge,
    pub partition_lag: Family<PartitionLabel, Gauge>,
    /// Age of the oldest record taken in and not yet committable, per partition.
    pub partition_lag_seconds: Family<PartitionLabel, Gauge<f64, AtomicU64>>,
    pub records_held: Gauge,
    pub held_bytes: Gauge,
    pub slots_busy: Gauge,
    pub paused_partitions: Gauge,
    pub partitions_waiting_for_commit: Gauge,
    pub commit_watermark_distance: Gauge,
    pub circuit_open: Gauge,
    pub ready: Gauge,
    pub dead_letter_backlog: Gauge,
    pub offset_resets: Counter,
    pub dead_letters_found: Counter,
    pub slots_busy_ratio: Gauge<f64, AtomicU64>,
    pub processed_per_second: Gauge<f64, AtomicU64>,
    pub capacity_per_second: Gauge<f64, AtomicU64>,
}

impl Metrics {
    fn new(registry: &mut Registry) -> Self {
        let m = Self {
            records_processed: Counter::default(),
            records_failed: Counter::default(),
            records_retried: Counter::default(),
            records_dead_lettered: Counter::default(),
            records_filtered: Counter::default(),
            batches_processed: Counter::default(),
            batches_failed: Counter::default(),
            batch_size: Histogram::new([
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
            ]),
            batch_duration: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]),
            commits: Family::default(),
            rebalances: Family::default(),
            rebalance_seconds: Family::default(),
            client_errors: Family::default(),
            assigned_partitions: Gauge::default(),
            partition_lag: Family::default(),
            partition_lag_seconds: Family::default(),
            records_held: Gauge::default(),
            held_bytes: Gauge::default(),
            slots_busy: Gauge::default(),
            paused_partitions: Gauge::default(),
            partitions_waiting_for_commit: Gauge::default(),
            commit_watermark_distance: Gauge::default(),
            circuit_open: Gauge::default(),
            ready: Gauge::default(),
            dead_letter_backlog: Gauge::default(),
            offset_resets: Counter::default(),
            dead_letters_found: Counter::default(),
            slots_busy_ratio: Gauge::default(),
            processed_per_second: Gauge::default(),
            capacity_per_second: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("microbatch");
        r.register(
            "records_processed",
            "Records the handler finished",
            m.records_processed.clone(),
        );
        r.register(
            "records_failed",
            "Record failures reported by the handler (each attempt)",
            m.records_failed.clone(),
        );
        r.register(
            "records_retried",
            "Records scheduled for another attempt",
            m.records_retried.clone(),
        );
        r.register(
            "records_dead_lettered",
            "Records written to the dead-letter topic",
            m.records_dead_lettered.clone(),
        );
        r.register(
            "records_filtered",
            "Records no --filter pattern matched: done (and committed) without the handler",
            m.records_filtered.clone(),
        );
        r.register(
            "batches_processed",
            "Batches the handler finished without failure",
            m.batches_processed.clone(),
        );
        r.register(
            "batches_failed",
            "Batches with at least one failed record",
            m.batches_failed.clone(),
        );
        r.register(
            "batch_size_records",
            "Records per batch handed to the handler",
            m.batch_size.clone(),
        );
        r.register(
            "batch_duration_seconds",
            "Time the handler took per batch",
            m.batch_duration.clone(),
        );
        r.register("commits", "Offset commits by result", m.commits.clone());
        r.register(
            "rebalances",
            "Rebalance events by kind (assign, revoke)",
            m.rebalances.clone(),
        );
        r.register(
            "rebalance_seconds",
            "Time spent in rebalance callbacks by kind (a revoke drains its partitions there)",
            m.rebalance_seconds.clone(),
        );
        r.register(
            "client_errors",
            "Kafka client errors by kind",
            m.client_errors.clone(),
        );
        r.register(
            "assigned_partitions",
            "Partitions assigned to this worker",
            m.assigned_partitions.clone(),
        );
        r.register(
            "partition_lag_seconds",
            "Age (now - record timestamp) of the oldest record this worker holds that is not done, per partition; 0 when it holds none",
            m.partition_lag_seconds.clone(),
        );
        r.register(
            "partition_lag",
            "Consumer lag per assigned partition (from the client)",
            m.partition_lag.clone(),
        );
        r.register(
            "records_held",
            "Records held: buffered, queued or in flight",
            m.records_held.clone(),
        );
        r.register(
            "held_bytes",
            "Key and value bytes of the records held (--max-held-bytes)",
            m.held_bytes.clone(),
        );
        r.register(
            "slots_busy",
            "Batches in flight at the handler",
            m.slots_busy.clone(),
        );
        r.register(
            "paused_partitions",
            "Partitions paused by back-pressure or the circuit breaker",
            m.paused_partitions.clone(),
        );
        r.register(
            "partitions_waiting_for_commit",
            "Partitions starting no new batches until their finished work is committed (--max-uncommitted-ms)",
            m.partitions_waiting_for_commit.clone(),
        );
        r.register(
            "commit_watermark_distance",
            "Records done but above the commit watermark, summed over partitions",
            m.commit_watermark_distance.clone(),
        );
        r.register(
            "circuit_open",
            "Whether the downstream circuit breaker is open (1) or closed (0)",
            m.circuit_open.clone(),
        );
        r.register(
            "dead_letter_backlog_records",
            "Records waiting for their dead letter to be acknowledged (they hold their partition's commit)",
            m.dead_letter_backlog.clone(),
        );
        r.register(
            "dead_letters_found",
            "Records not dead-lettered again because the dead-letter topic held theirs already (written before a restart or rebalance, above the last commit)",
            m.dead_letters_found.clone(),
        );
        r.register(
            "offset_resets",
            "Times a partition's offsets went backwards (a reset after truncation) and tracking restarted",
            m.offset_resets.clone(),
        );
        r.register(
            "ready",
            "Whether the worker has joined its group and reaches the brokers (1) or not (0)",
            m.ready.clone(),
        );
        r.register(
            "slots_busy_ratio",
            "Slot time in the handler over slot time available, last capacity window",
            m.slots_busy_ratio.clone(),
        );
        r.register(
            "processed_per_second",
            "Records the handler finished per second (dead letters not counted), last capacity window",
            m.processed_per_second.clone(),
        );
        r.register(
            "capacity_per_second",
            "Records per second this worker could do with every slot busy (processed rate over busy ratio; 0 while too idle to tell)",
            m.capacity_per_second.clone(),
        );
        m
    }

    /// Shows a capacity window's figures.
    pub fn observe_capacity(&self, report: &CapacityReport) {
        self.slots_busy_ratio.set(report.busy_fraction);
        self.processed_per_second.set(report.processed_per_sec);
        self.capacity_per_second
            .set(report.capacity_per_sec().unwrap_or(0.0));
    }
}

/// A readiness condition kept outside the Kafka client (the MSK IAM token
/// refresher): `Err` says why the worker is not ready.
pub type ReadinessCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Why the worker is not ready, if it is not.
#[derive(Default)]
pub struct Readiness {
    joined: AtomicBool,
    brokers_up: AtomicBool,
    circuit_open: AtomicBool,
    last_error: Mutex<Option<String>>,
    dead_letter_error: Mutex<Option<String>>,
    checks: Mutex<Vec<ReadinessCheck>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("check", &self.check())
            .finish()
    }
}

impl Readiness {
    /// Adds a condition that must also hold for the worker to be ready.
    pub fn add_check(&self, check: ReadinessCheck) {
        self.checks
            .lock()
            .expect("readiness lock poisoned")
            .push(check);
    }

    pub fn set_joined(&self, joined: bool) {
        self.joined.store(joined, Ordering::Relaxed);
        if joined {
            // Joining proves the connection and the credentials.
            self.brokers_up.store(true, Ordering::Relaxed);
            *self.last_error.lock().expect("readiness lock poisoned") = None;
        }
    }

    /// A broker connection is up. It clears connection errors, but not an
    /// authentication failure: that stands until the group is joined.
    pub fn set_brokers_up(&self, up: bool) {
        self.brokers_up.store(up, Ordering::Relaxed);
        if up {
            let mut last = self.last_error.lock().expect("readiness lock poisoned");
            if last
                .as_deref()
                .is_some_and(|e| !e.starts_with("authentication"))
            {
                *last = None;
            }
        }
    }

    pub fn set_circuit_open(&self, open: bool) {
        self.circuit_open.store(open, Ordering::Relaxed);
    }

    /// Dead letters that could not be written (they hold their partitions'
    /// commits), or `None` once none wait.
    pub fn set_dead_letter_error(&self, error: Option<String>) {
        let mut current = self
            .dead_letter_error
            .lock()
            .expect("readiness lock poisoned");
        if current.is_some() || error.is_some() {
            *current = error;
        }
    }

    pub fn set_error(&self, error: String) {
        self.brokers_up.store(false, Ordering::Relaxed);
        *self.last_error.lock().expect("readiness lock poisoned") = Some(error);
    }

    /// Records an error unless one is already known (an authentication
    /// failure also shows as "all brokers down" afterwards).
    pub fn set_error_unless_known(&self, error: String) {
        self.brokers_up.store(false, Ordering::Relaxed);
        let mut last = self.last_error.lock().expect("readiness lock poisoned");
        if last.is_none() {
            *last = Some(error);
        }
    }

    /// `Ok` when ready, else every reason it is not, on one line.
    pub fn check(&self) -> Result<(), String> {
        let mut reasons = Vec::new();
        if let Some(e) = self
            .last_error
            .lock()
            .expect("readiness lock poisoned")
            .as_ref()
        {
            reasons.push(format!("kafka error: {e}"));
        } else if !self.brokers_up.load(Ordering::Relaxed) {
            reasons.push("no broker connection yet".to_string());
        }
        if !self.joined.load(Ordering::Relaxed) {
            reasons.push("not joined to the consumer group yet".into());
        }
        if self.circuit_open.load(Ordering::Relaxed) {
            reasons.push(
                "downstream circuit breaker open: probing it with one batch at a time".into(),
            );
        }
        if let Some(e) = self
            .dead_letter_error
            .lock()
            .expect("readiness lock poisoned")
            .as_ref()
        {
            reasons.push(format!("dead-letter backlog: {e}"));
        }
        for check in self.checks.lock().expect("readiness lock poisoned").iter() {
            if let Err(reason) = check() {
                reasons.push(reason);
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
    }
}

/// Writes the pipeline's [`Stats`] to the metrics and readiness: counters
/// grow by what was counted since the last export, gauges take the values,
/// and partitions no longer held lose their per-partition series.
#[derive(Debug, Default)]
pub struct StatsExporter {
    last: Counters,
    dead_letter_error: Option<String>,
    /// Partitions with per-partition series.
    partitions: Vec<i32>,
    lag_seconds: Vec<(i32, f64)>,
    capacity: Option<CapacityReport>,
}

impl StatsExporter {
    pub fn export(&mut self, stats: &Stats<'_>, topic: &str, telemetry: &Telemetry) {
        let m = &telemetry.metrics;
        let (now, last) = (stats.counted, self.last);
        if now != last {
            let add = |counter: &Counter, now: u64, last: u64| {
                if now > last {
                    counter.inc_by(now - last);
                }
            };
            add(
                &m.records_processed,
                now.records_processed,
                last.records_processed,
            );
            add(
                &m.batches_processed,
                now.batches_processed,
                last.batches_processed,
            );
            add(&m.records_failed, now.records_failed, last.records_failed);
            add(&m.batches_failed, now.batches_failed, last.batches_failed);
            add(
                &m.records_retried,
                now.records_retried,
                last.records_retried,
            );
            add(
                &m.records_dead_lettered,
                now.records_dead_lettered,
                last.records_dead_lettered,
            );
            add(&m.offset_resets, now.offset_resets, last.offset_resets);
            add(
                &m.dead_letters_found,
                now.dead_letters_found,
                last.dead_letters_found,
            );
            self.last = now;
        }

        m.assigned_partitions.set(stats.partitions.len() as i64);
        m.slots_busy.set(stats.slots_busy as i64);
        m.paused_partitions.set(stats.paused_partitions as i64);
        m.partitions_waiting_for_commit
            .set(stats.partitions_waiting_for_commit as i64);
        m.records_held.set(stats.records_held as i64);
        m.held_bytes.set(stats.held_bytes as i64);
        m.commit_watermark_distance
            .set(stats.commit_watermark_distance as i64);
        m.dead_letter_backlog.set(stats.dead_letter_backlog as i64);
        m.circuit_open.set(i64::from(stats.circuit_open));
        telemetry.readiness.set_circuit_open(stats.circuit_waiting);
        if stats.dead_letter_error != self.dead_letter_error.as_deref() {
            self.dead_letter_error = stats.dead_letter_error.map(str::to_string);
            telemetry
                .readiness
                .set_dead_letter_error(self.dead_letter_error.clone());
        }

        if stats.capacity != self.capacity.as_ref() {
            if let Some(report) = stats.capacity {
                m.observe_capacity(report);
            }
            self.capacity = stats.capacity.cloned();
        }
        if stats.lag_seconds != self.lag_seconds {
            let label = |partition: i32| PartitionLabel {
                topic: topic.to_string(),
                partition,
            };
            for (p, age) in stats.lag_seconds {
                m.partition_lag_seconds.get_or_create(&label(*p)).set(*age);
            }
            self.lag_seconds = stats.lag_seconds.to_vec();
        }
        // Series of partitions given up go with them.
        if stats.partitions != self.partitions.as_slice() {
            for gone in self
                .partitions
                .iter()
                .filter(|p| !stats.partitions.contains(p))
            {
                let label = PartitionLabel {
                    topic: topic.to_string(),
                    partition: *gone,
                };
                m.partition_lag.remove(&label);
                m.partition_lag_seconds.remove(&label);
            }
            self.partitions = stats.partitions.to_vec();
        }
    }
}

/// Metrics registry plus readiness, shared by the worker and its HTTP server.
pub struct Telemetry {
    pub registry: Registry,
    pub metrics: Metrics,
    pub readiness: Readiness,
}

impl Default for Telemetry {
    fn default() -> Self {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        Self {
            registry,
            metrics,
            readiness: Readiness::default(),
        }
    }
}

impl Telemetry {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        self.metrics
            .ready
            .set(i64::from(self.readiness.check().is_ok()));
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing metrics to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reports_the_reason() {
        let r = Readiness::default();
        assert!(r.check().unwrap_err().contains("broker"));
        r.set_brokers_up(true);
        assert!(r.check().unwrap_err().contains("group"));
        r.set_joined(true);
        assert!(r.check().is_ok());
        r.set_error("authentication: SASL authentication error".into());
        assert!(r.check().unwrap_err().contains("SASL"));
        r.set_brokers_up(true);
        assert!(
            r.check().unwrap_err().contains("authentication"),
            "stands until joined"
        );
        r.set_error_unless_known("all_brokers_down: x".into());
        assert!(r.check().unwrap_err().contains("authentication"));
        r.set_joined(true);
        assert!(r.check().is_ok());
    }

    #[test]
    fn an_added_check_holds_readiness_back_with_its_reason() {
        let r = Readiness::default();
        r.set_joined(true);
        let failing = std::sync::Arc::new(AtomicBool::new(true));
        let flag = failing.clone();
        r.add_check(Box::new(move || {
            if flag.load(Ordering::Relaxed) {
                Err("MSK IAM token refresh failing".into())
            } else {
                Ok(())
            }
        }));
        assert!(r.check().unwrap_err().contains("MSK IAM"));
        failing.store(false, Ordering::Relaxed);
        assert!(r.check().is_ok());
    }

    #[test]
    fn metrics_have_stable_names() {
        let t = Telemetry::default();
        t.metrics.records_processed.inc_by(3);
        let text = t.encode();
        assert!(text.contains("microbatch_records_processed_total 3"));
        assert!(text.contains("microbatch_batch_duration_seconds_bucket"));
        assert!(text.contains("microbatch_ready 0"));
    }
}
