//! What the workers say they can do, read back from their offset commits.
//!
//! Each worker writes a [`CapacityReport`] as the metadata of the offsets it
//! commits (see `microbatch_kafka::capacity_report`); Kafka keeps it per partition
//! beside the committed offset, so the committed-offsets request that lag
//! needs anyway brings it back. [`WorkerCapacity`] keeps the newest report
//! of each worker, drops stale ones (a worker that stopped, or that idles and
//! so commits nothing), and sums them up.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use microbatch_kafka::capacity_report::{CapacityReport, MIN_BUSY_FOR_CAPACITY};
use rdkafka::TopicPartitionList;
use serde::Serialize;

/// A report older than this says nothing about now.
pub const REPORT_MAX_AGE: Duration = Duration::from_secs(30);

/// A report dated further ahead than this comes from a clock that is wrong
/// (or a writer that lies): it would never grow stale, so it is dropped.
pub const REPORT_MAX_AHEAD: Duration = Duration::from_secs(5);

/// The workers' fresh reports, taken together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerCapacity {
    /// Workers with a fresh report.
    pub workers: u32,
    /// Their processed rates, summed.
    pub processed_per_sec: f64,
    /// Their busy fractions, summed (2.0 = two workers' worth of busy slots).
    pub busy_workers: f64,
    /// Records/s one fully busy worker does: Σ processed ÷ Σ busy fraction;
    /// `None` while the workers are too idle to tell.
    pub capacity_per_replica: Option<f64>,
    /// Records a worker holds taken but not acknowledged, the mean of the
    /// reports that say (share-group workers'); `None` when none does.
    pub held_per_worker: Option<f64>,
    /// [`Self::held_per_worker`] per partition, from the reports that say
    /// (a partition none of them holds is 0); `None` when none does.
    pub held_per_worker_by_partition: Option<BTreeMap<i32, f64>>,
}

impl WorkerCapacity {
    /// From the group's commit metadata (one string per partition); `None`
    /// when no partition carries a fresh report.
    pub fn from_metadata<'a>(
        metadata: impl IntoIterator<Item = &'a str>,
        now_unix_ms: u64,
    ) -> Option<Self> {
        let mut newest: HashMap<String, CapacityReport> = HashMap::new();
        for report in metadata.into_iter().filter_map(CapacityReport::decode) {
            let age = now_unix_ms.saturating_sub(report.at_unix_ms);
            let ahead = report.at_unix_ms.saturating_sub(now_unix_ms);
            if age > REPORT_MAX_AGE.as_millis() as u64
                || ahead > REPORT_MAX_AHEAD.as_millis() as u64
            {
                continue;
            }
            match newest.get(&report.worker) {
                Some(held) if held.at_unix_ms >= report.at_unix_ms => {}
                _ => {
                    newest.insert(report.worker.clone(), report);
                }
            }
        }
        if newest.is_empty() {
            return None;
        }
        let processed: f64 = newest.values().map(|r| r.processed_per_sec).sum();
        let busy: f64 = newest.values().map(|r| r.busy_fraction).sum();
        let held: Vec<f64> = newest
            .values()
            .filter_map(|r| r.held)
            .map(|h| h as f64)
            .collect();
        // Over the same reports as the total, or not at all: a report that
        // says what it holds but not where (too many partitions, an older
        // worker) would make the partitions not add up to the group.
        let by: Vec<&Vec<(i32, u64)>> =
            newest.values().filter_map(|r| r.held_by.as_ref()).collect();
        let every_holder_says_where = newest
            .values()
            .all(|r| r.held.is_none() || r.held_by.is_some());
        let held_per_worker_by_partition = (!by.is_empty() && every_holder_says_where).then(|| {
            let mut sums: BTreeMap<i32, f64> = BTreeMap::new();
            for (partition, n) in by.iter().flat_map(|b| b.iter()) {
                *sums.entry(*partition).or_default() += *n as f64;
            }
            sums.values_mut().for_each(|v| *v /= by.len() as f64);
            sums
        });
        Some(Self {
            held_per_worker: (!held.is_empty())
                .then(|| held.iter().sum::<f64>() / held.len() as f64),
            held_per_worker_by_partition,
            ..Self::from_sums(newest.len() as u32, processed, busy)
        })
    }

    /// Records in flight on `partition` in a group of `members` workers,
    /// estimated as [`Self::in_flight`] is: 0 when the reports that say
    /// hold none of it, `None` when no report says.
    pub fn in_flight_on(&self, partition: i32, members: u32) -> Option<u64> {
        self.held_per_worker_by_partition.as_ref().map(|by| {
            let held = by.get(&partition).copied().unwrap_or(0.0);
            (held * f64::from(members)).round() as u64
        })
    }

    /// Records in flight in a group of `members` workers: the mean held
    /// by a reporting worker times the members (the reports are a sample:
    /// a share group's workers overwrite each other's).
    pub fn in_flight(&self, members: u32) -> Option<u64> {
        self.held_per_worker
            .map(|held| (held * f64::from(members)).round() as u64)
    }

    /// From totals: `workers` workers doing `processed_per_sec` together,
    /// each busy `busy_each` of the time.
    pub fn from_parts(workers: u32, processed_per_sec: f64, busy_each: f64) -> Self {
        Self::from_sums(workers, processed_per_sec, busy_each * f64::from(workers))
    }

    fn from_sums(workers: u32, processed_per_sec: f64, busy_workers: f64) -> Self {
        // The floor is on the mean: a tiny busy fraction extrapolates too far.
        let capacity_per_replica = (workers > 0
            && busy_workers / f64::from(workers) >= MIN_BUSY_FOR_CAPACITY
            && processed_per_sec > 0.0)
            .then(|| processed_per_sec / busy_workers);
        Self {
            workers,
            processed_per_sec,
            busy_workers,
            capacity_per_replica,
            held_per_worker: None,
            held_per_worker_by_partition: None,
        }
    }
}

/// The metadata string of every partition in a committed-offsets answer.
/// Read from the raw list: another client's metadata need not be UTF-8, and
/// the safe accessor would panic on it.
pub fn commit_metadata(tpl: &TopicPartitionList) -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: `tpl` owns a valid list for the borrow; each element's
    // metadata pointer is valid for metadata_size bytes, or null.
    unsafe {
        let list = &*tpl.ptr();
        for i in 0..list.cnt.max(0) as usize {
            let elem = &*list.elems.add(i);
            if elem.metadata.is_null() || elem.metadata_size == 0 {
                continue;
            }
            let bytes = std::slice::from_raw_parts(elem.metadata as *const u8, elem.metadata_size);
            if let Ok(s) = std::str::from_utf8(bytes) {
                out.push(s.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(worker: &str, at: u64, busy: f64, rate: f64) -> String {
        CapacityReport {
            worker: worker.into(),
            at_unix_ms: at,
            window: Duration::from_secs(5),
            busy_fraction: busy,
            processed_per_sec: rate,
            slots: 4,
            held: None,
            held_by: None,
        }
        .encode()
    }

    #[test]
    fn newest_report_per_worker_and_stale_ones_dropped() {
        let now = 100_000;
        let meta = [
            report("a", now - 1000, 0.5, 800.0),
            report("a", now - 6000, 0.9, 100.0), // older report of a: ignored
            report("b", now - 2000, 0.3, 600.0),
            report("gone", now - 31_000, 1.0, 5000.0), // stale
            report("ahead", now + 3_600_000, 1.0, 9000.0), // never stale: dropped
            report("skewed", now + 4_000, 0.0, 0.0),   // within the skew: kept
            "someone else's metadata".to_string(),
            String::new(),
        ];
        let c = WorkerCapacity::from_metadata(meta.iter().map(String::as_str), now).unwrap();
        assert_eq!(c.workers, 3, "a, b and skewed");
        assert!((c.processed_per_sec - 1400.0).abs() < 1e-9);
        // (800 + 600) / (0.5 + 0.3) = 1,750/s per fully busy worker.
        assert!((c.capacity_per_replica.unwrap() - 1750.0).abs() < 1e-6);
        assert_eq!(WorkerCapacity::from_metadata(["x"], now), None);
    }

    /// A share group's reports say what each worker holds; the group's
    /// in-flight count is their mean times the members, unknown without one.
    #[test]
    fn held_records_scale_to_the_members() {
        let now = 1_700_000_000_000;
        let with = |worker: &str, held: Option<u64>, held_by: Option<Vec<(i32, u64)>>| {
            CapacityReport {
                worker: worker.into(),
                at_unix_ms: now,
                window: Duration::from_secs(5),
                busy_fraction: 0.5,
                processed_per_sec: 10.0,
                slots: 1,
                held,
                held_by,
            }
            .encode()
        };
        let meta = [
            with("a", Some(10), Some(vec![(0, 4), (3, 6)])),
            with("b", Some(30), Some(vec![(0, 30)])),
            with("c", None, None),
        ];
        let c = WorkerCapacity::from_metadata(meta.iter().map(String::as_str), now).unwrap();
        assert_eq!(c.held_per_worker, Some(20.0));
        assert_eq!(c.in_flight(24), Some(480));
        // Per partition, the same estimate: (4 + 30) / 2 and 6 / 2 per
        // worker, times 24; what no report holds is 0; they sum to the total.
        assert_eq!(c.in_flight_on(0, 24), Some(408));
        assert_eq!(c.in_flight_on(3, 24), Some(72));
        assert_eq!(c.in_flight_on(5, 24), Some(0));
        // One that says what it holds but not where: no breakdown, rather
        // than one that does not add up to the total.
        let mixed = [
            with("a", Some(10), Some(vec![(0, 10)])),
            with("b", Some(1000), None),
        ];
        let c = WorkerCapacity::from_metadata(mixed.iter().map(String::as_str), now).unwrap();
        assert_eq!(c.in_flight(2), Some(1010));
        assert_eq!(c.in_flight_on(0, 2), None);
        let old = [with("a", None, None)];
        let c = WorkerCapacity::from_metadata(old.iter().map(String::as_str), now).unwrap();
        assert_eq!(c.in_flight(24), None, "no report says: unknown, not 0");
        assert_eq!(c.in_flight_on(0, 24), None);
    }

    #[test]
    fn idle_workers_claim_no_capacity() {
        let c = WorkerCapacity::from_parts(3, 30.0, 0.01);
        assert_eq!(c.capacity_per_replica, None);
        assert_eq!(
            WorkerCapacity::from_parts(1, 0.0, 0.5).capacity_per_replica,
            None
        );
    }

    #[test]
    fn metadata_is_read_from_a_partition_list_even_when_not_utf8() {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("t", 0).set_metadata("plain");
        tpl.add_partition("t", 1);
        // SAFETY: malloc'd bytes handed to the list, which frees them.
        unsafe {
            let list = &mut *tpl.ptr();
            let elem = &mut *list.elems.add(1);
            let buf = libc::malloc(2) as *mut u8;
            *buf = 0xff;
            *buf.add(1) = 0xfe;
            elem.metadata = buf as *mut libc::c_void;
            elem.metadata_size = 2;
        }
        assert_eq!(commit_metadata(&tpl), vec!["plain".to_string()]);
    }
}
