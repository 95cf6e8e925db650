//! What a worker can do, measured while it works: how busy its processing
//! slots are and how many records it finishes, so whoever scales can learn
//! capacity instead of mistaking throughput for it.
//!
//! **Capacity** of a worker = processed rate ÷ busy fraction, where the busy
//! fraction is slot time spent in the handler ÷ slot time available (wall
//! time × the slots the worker could use). A worker that processes 800
//! records/s with its slots busy 40% of the time could do about 2,000/s.
//! Below [`MIN_BUSY_FOR_CAPACITY`](microbatch_kafka::capacity_report::MIN_BUSY_FOR_CAPACITY) the extrapolation is too long to trust and
//! no capacity is claimed.
//!
//! [`CapacityMeter`] is pure: the caller feeds it "this many slots busy
//! now", "n records done" and the clock, and it answers one
//! [`CapacityReport`] per completed window. A window that follows no claim
//! of capacity (the worker's first, or one after an idle window) closes as
//! soon as it has run [`EARLY_WINDOW`] and every slot has finished a batch:
//! a burst on an idle worker is measured within about a second, not a whole
//! window. Its busy time is that of the batches it finished: nothing was in
//! flight when it began, and the batches still in flight when it closes
//! would otherwise count their time without their records, and read low.
//!
//! The worker sends the report as the metadata string of its offset commits
//! (Kafka keeps it per partition beside the committed offset, and any admin
//! client reads it back), so the scaling side needs no extra infrastructure;
//! `microbatch_kafka::capacity_report` holds that format.

use std::time::{Duration, Instant};

use microbatch_kafka::capacity_report::CapacityReport;

/// How long one measurement window lasts by default.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(5);

/// The shortest window that may close early (see the module docs).
pub const EARLY_WINDOW: Duration = Duration::from_secs(1);

/// Measures busy slot time and finished records over fixed windows.
#[derive(Debug)]
pub struct CapacityMeter {
    worker: String,
    window: Duration,
    window_start: Instant,
    last_change: Instant,
    busy_slots: u32,
    slots: u32,
    /// Slot-seconds in the handler within the current window.
    busy_slot_secs: f64,
    /// Slot-seconds available within the current window.
    available_slot_secs: f64,
    processed: u64,
    /// Batches finished within the current window, and their slot time in
    /// the handler.
    batches: u64,
    finished_slot_secs: f64,
    last: Option<CapacityReport>,
}

impl CapacityMeter {
    pub fn new(worker: impl Into<String>, window: Duration, now: Instant) -> Self {
        Self {
            worker: worker.into(),
            window: window.max(Duration::from_millis(100)),
            window_start: now,
            last_change: now,
            busy_slots: 0,
            slots: 0,
            busy_slot_secs: 0.0,
            available_slot_secs: 0.0,
            processed: 0,
            batches: 0,
            finished_slot_secs: 0.0,
            last: None,
        }
    }

    /// A name for this process that no other worker shares: its host (the
    /// pod's name under Kubernetes), its pid and a random part. In
    /// containers every worker is PID 1 and many start in the same
    /// millisecond, so pid and start time alone named different workers
    /// alike and the scaler counted them as one.
    pub fn process_worker_id() -> String {
        let host = ["POD_NAME", "HOSTNAME"]
            .iter()
            .find_map(|name| std::env::var(name).ok())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .unwrap_or_default();
        worker_id(&host, std::process::id(), random_u32())
    }

    /// Slots the worker could use: busy slots it was not told about still
    /// count.
    fn known_slots(&self) -> u32 {
        self.slots.max(self.busy_slots)
    }

    fn advance(&mut self, now: Instant) {
        let dt = now
            .saturating_duration_since(self.last_change)
            .as_secs_f64();
        self.busy_slot_secs += f64::from(self.busy_slots) * dt;
        self.available_slot_secs += f64::from(self.known_slots()) * dt;
        self.last_change = self.last_change.max(now);
    }

    /// Slots in the handler now (batches in flight).
    pub fn set_busy(&mut self, now: Instant, busy_slots: usize) {
        self.advance(now);
        self.busy_slots = busy_slots as u32;
    }

    /// Slots the worker could use now: its concurrency, or fewer when its
    /// partitions cannot feed that many (one lane each under partition order).
    pub fn set_slots(&mut self, now: Instant, slots: usize) {
        self.advance(now);
        self.slots = slots as u32;
    }

    /// One of the handler's batches finished, with this many records done,
    /// after this long in the handler.
    pub fn processed(&mut self, records: usize, handler_time: Duration) {
        self.processed += records as u64;
        self.batches += 1;
        self.finished_slot_secs += handler_time.as_secs_f64();
    }

    /// Whether the current window may close before its length: nothing
    /// claimed capacity before it, it has run [`EARLY_WINDOW`], and each
    /// slot has finished a batch.
    fn closes_early(&self, elapsed: Duration) -> bool {
        let claimed = self
            .last
            .as_ref()
            .is_some_and(|r| r.capacity_per_sec().is_some());
        !claimed && elapsed >= EARLY_WINDOW && self.batches >= u64::from(self.known_slots().max(1))
    }

    /// The last window's report, without closing one.
    pub fn last(&self) -> Option<&CapacityReport> {
        self.last.as_ref()
    }

    /// The latest completed window's report (closing the current window
    /// first if it has run its length, or may close early); `None` before
    /// the first one.
    pub fn report(&mut self, now: Instant, now_unix_ms: u64) -> Option<&CapacityReport> {
        let elapsed = now.saturating_duration_since(self.window_start);
        let early = elapsed < self.window && self.closes_early(elapsed);
        if elapsed >= self.window || early {
            self.advance(now);
            let secs = elapsed.as_secs_f64();
            let busy_slot_secs = if early {
                self.finished_slot_secs
            } else {
                self.busy_slot_secs
            };
            let busy = if self.available_slot_secs > 0.0 {
                (busy_slot_secs / self.available_slot_secs).clamp(0.0, 1.0)
            } else {
                0.0
            };
            self.last = Some(CapacityReport {
                worker: self.worker.clone(),
                at_unix_ms: now_unix_ms,
                window: elapsed,
                busy_fraction: busy,
                processed_per_sec: self.processed as f64 / secs,
                slots: self.slots,
                held: None,
                held_by: None,
            });
            self.window_start = now;
            self.busy_slot_secs = 0.0;
            self.available_slot_secs = 0.0;
            self.processed = 0;
            self.batches = 0;
            self.finished_slot_secs = 0.0;
        }
        self.last.as_ref()
    }
}

/// `host-pid-random`, the host cut to what commit metadata and logs take
/// well (letters, digits, `-` and `.`, at most 63 of them).
fn worker_id(host: &str, pid: u32, random: u32) -> String {
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(63)
        .collect();
    if host.is_empty() {
        format!("{pid}-{random:08x}")
    } else {
        format!("{host}-{pid}-{random:08x}")
    }
}

/// 32 random bits from the standard library's per-process random keys,
/// mixed with the time.
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use microbatch_kafka::capacity_report::MIN_BUSY_FOR_CAPACITY;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn busy_fraction_is_slot_time_in_the_handler_over_slot_time_available() {
        let t0 = Instant::now();
        let mut m = CapacityMeter::new("w", ms(1000), t0);
        m.set_slots(t0, 4);
        // Two slots busy for the first half, one for the second half.
        m.set_busy(t0, 2);
        m.set_busy(t0 + ms(500), 1);
        m.processed(300, ms(0));
        let r = m
            .report(t0 + ms(1000), 42)
            .cloned()
            .expect("a window closed");
        // (2 x 0.5 + 1 x 0.5) / (4 x 1) = 0.375
        assert!((r.busy_fraction - 0.375).abs() < 1e-9, "{r:?}");
        assert!((r.processed_per_sec - 300.0).abs() < 1e-9);
        assert_eq!((r.slots, r.at_unix_ms), (4, 42));
        assert!((r.capacity_per_sec().unwrap() - 800.0).abs() < 1e-6);
    }

    #[test]
    fn no_report_before_a_window_completes_and_the_last_one_holds_between() {
        let t0 = Instant::now();
        let mut m = CapacityMeter::new("w", ms(1000), t0);
        m.set_slots(t0, 1);
        m.set_busy(t0, 1);
        m.processed(10, ms(0));
        assert!(m.report(t0 + ms(999), 1).is_none());
        let first = m.report(t0 + ms(1000), 2).cloned().unwrap();
        m.processed(1000, ms(0));
        let held = m.report(t0 + ms(1500), 3).cloned().unwrap();
        assert_eq!(first, held, "the window in progress does not leak out");
        let next = m.report(t0 + ms(2000), 4).cloned().unwrap();
        assert!((next.processed_per_sec - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn slot_changes_within_a_window_are_time_weighted() {
        let t0 = Instant::now();
        let mut m = CapacityMeter::new("w", ms(1000), t0);
        // 8 slots for 0.25 s, then a revoke leaves 2 for 0.75 s, busy 2 throughout.
        m.set_slots(t0, 8);
        m.set_busy(t0, 2);
        m.set_slots(t0 + ms(250), 2);
        m.processed(100, ms(0));
        let r = m.report(t0 + ms(1000), 0).cloned().unwrap();
        // busy 2 x 1 = 2 slot-s; available 8 x 0.25 + 2 x 0.75 = 3.5 slot-s.
        assert!((r.busy_fraction - 2.0 / 3.5).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn more_busy_slots_than_known_slots_never_exceed_one() {
        let t0 = Instant::now();
        let mut m = CapacityMeter::new("w", ms(1000), t0);
        m.set_busy(t0, 3); // slots not told yet
        m.processed(30, ms(0));
        let r = m.report(t0 + ms(1000), 0).cloned().unwrap();
        assert!((r.busy_fraction - 1.0).abs() < 1e-9);
    }

    #[test]
    fn an_idle_window_claims_no_capacity() {
        let t0 = Instant::now();
        let mut m = CapacityMeter::new("w", ms(1000), t0);
        m.set_slots(t0, 4);
        m.set_busy(t0, 1);
        m.set_busy(t0 + ms(100), 0);
        m.processed(5, ms(0));
        let r = m.report(t0 + ms(1000), 0).cloned().unwrap();
        // busy 0.1 / 4 = 0.025: below the floor.
        assert!(r.busy_fraction < MIN_BUSY_FOR_CAPACITY);
        assert_eq!(r.capacity_per_sec(), None);
    }

    #[test]
    fn a_burst_on_an_idle_worker_is_reported_once_every_slot_finished_a_batch() {
        let t0 = Instant::now();
        let mut m = CapacityMeter::new("w", ms(5000), t0);
        m.set_slots(t0, 4);
        // Idle for 0.5 s, then all four slots busy with 20-record batches.
        m.set_busy(t0 + ms(500), 4);
        for _ in 0..3 {
            m.processed(20, ms(600));
        }
        assert!(
            m.report(t0 + ms(1100), 0).is_none(),
            "one slot has not finished a batch yet"
        );
        m.processed(20, ms(700));
        let r = m.report(t0 + ms(1200), 0).cloned().expect("closed early");
        assert_eq!(r.window, ms(1200));
        // 80 records in 2.5 slot-s of finished batches, on 4 slots.
        let capacity = r.capacity_per_sec().unwrap();
        assert!((capacity - 80.0 / 2.5 * 4.0).abs() < 1e-6, "{r:?}");
        // Capacity claimed: the next window runs its whole length.
        for _ in 0..40 {
            m.processed(20, ms(600));
        }
        assert_eq!(m.report(t0 + ms(3000), 0), Some(&r));
        let next = m.report(t0 + ms(6200), 0).cloned().unwrap();
        assert_eq!(next.window, ms(5000));
    }

    #[test]
    fn batches_in_flight_when_an_early_window_closes_do_not_lower_it() {
        let t0 = Instant::now();
        let mut m = CapacityMeter::new("w", ms(5000), t0);
        m.set_slots(t0, 4);
        m.set_busy(t0, 4);
        // Each slot does 10 records per 0.4 s (100/s on 4 slots), the slots
        // 0.1 s apart: by 1 s seven batches are done and three are half way.
        for _ in 0..7 {
            m.processed(10, ms(400));
        }
        let r = m.report(t0 + ms(1000), 0).cloned().unwrap();
        // Slot time busy would read 70/s: 4 slot-s for 70 records.
        assert!(
            (r.capacity_per_sec().unwrap() - 100.0).abs() < 1e-6,
            "{r:?}"
        );
    }

    #[test]
    fn slow_batches_keep_an_early_window_open_until_each_slot_finished_one() {
        let t0 = Instant::now();
        let mut m = CapacityMeter::new("w", ms(5000), t0);
        m.set_slots(t0, 4);
        m.set_busy(t0, 4);
        assert!(m.report(t0 + ms(2000), 0).is_none(), "no batch finished");
        // Each slot's 500-record batch took 3 s: 4 x 500 / 3 s = 667/s.
        for _ in 0..4 {
            m.processed(500, ms(3000));
        }
        let r = m.report(t0 + ms(3000), 0).cloned().unwrap();
        assert!((r.capacity_per_sec().unwrap() - 2000.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn a_window_after_an_idle_one_closes_early_again() {
        let t0 = Instant::now();
        let mut m = CapacityMeter::new("w", ms(5000), t0);
        m.set_slots(t0, 2);
        let idle = m.report(t0 + ms(5000), 0).cloned().unwrap();
        assert_eq!(idle.capacity_per_sec(), None);
        m.set_busy(t0 + ms(5000), 2);
        m.processed(10, ms(1000));
        m.processed(10, ms(1000));
        let r = m.report(t0 + ms(6000), 0).cloned().unwrap();
        assert_eq!(r.window, ms(1000));
        assert!((r.capacity_per_sec().unwrap() - 20.0).abs() < 1e-6);
    }

    #[test]
    fn worker_ids_differ_for_workers_that_are_all_pid_1() {
        // Two pods, both PID 1, both started in the same millisecond.
        assert_eq!(
            worker_id("orders-7d9f-abcde", 1, 0xab),
            "orders-7d9f-abcde-1-000000ab"
        );
        assert_eq!(worker_id(" a b=c\n", 1, 1), "abc-1-00000001");
        assert_eq!(worker_id("", 7, 2), "7-00000002");
        assert_eq!(worker_id(&"x".repeat(100), 1, 1).len(), 63 + 11);
        let ids: std::collections::HashSet<String> = (0..100)
            .map(|_| CapacityMeter::process_worker_id())
            .collect();
        assert_eq!(ids.len(), 100, "one process, 100 different ids");
        assert!(!CapacityMeter::process_worker_id().contains(' '));
    }
}
