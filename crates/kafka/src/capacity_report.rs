//! The capacity report: what a worker measured of itself over one window,
//! in the form it travels in, the metadata string of its offset commits
//! (Kafka keeps it per partition beside the committed offset, and any admin
//! client reads it back), so the scaling side needs no extra infrastructure.
//! The worker's measuring lives with the worker; this is only the format.

use std::fmt::Write as _;
use std::time::Duration;

/// Below this busy fraction the measured rate says little about what the
/// worker could do (the extrapolation would be more than 20-fold).
pub const MIN_BUSY_FOR_CAPACITY: f64 = 0.05;

/// The prefix that marks commit metadata written by a microbatch worker.
const PREFIX: &str = "microbatch-capacity/1";

/// One worker's measurement over one window.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityReport {
    /// Identifies the worker process (stable for its life).
    pub worker: String,
    /// Wall clock at the end of the window, Unix milliseconds.
    pub at_unix_ms: u64,
    pub window: Duration,
    /// Slot time in the handler ÷ slot time available, 0..=1.
    pub busy_fraction: f64,
    /// Records the handler finished per second (dead letters not counted).
    pub processed_per_sec: f64,
    /// Slots the worker could use at the end of the window.
    pub slots: u32,
    /// Records the worker held at the end of the window, taken but not
    /// yet acknowledged (a share-group worker's in-flight records); `None`
    /// when not reported.
    pub held: Option<u64>,
    /// [`Self::held`] per partition (partitions holding none left out),
    /// ascending; `None` when not reported, or too many to fit the
    /// metadata (see [`MAX_HELD_BY_LEN`]).
    pub held_by: Option<Vec<(i32, u64)>>,
}

/// The longest `held_by` value encoded (about 100 partitions): a broker
/// refuses a commit whose metadata passes `offset.metadata.max.bytes`
/// (4096 by default, sometimes set lower), and the report would go with
/// it, so a worker holding records of very many partitions says only its
/// total.
pub const MAX_HELD_BY_LEN: usize = 1024;

impl CapacityReport {
    /// Records/s this worker could do with every slot busy, when the window
    /// was busy enough to tell.
    pub fn capacity_per_sec(&self) -> Option<f64> {
        if self.busy_fraction < MIN_BUSY_FOR_CAPACITY || self.processed_per_sec <= 0.0 {
            return None;
        }
        Some(self.processed_per_sec / self.busy_fraction.min(1.0))
    }

    /// The commit-metadata form: `microbatch-capacity/1 worker=… at=… …`.
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(96);
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            "{PREFIX} worker={} at={} window_ms={} busy={:.4} rate={:.2} slots={}",
            self.worker,
            self.at_unix_ms,
            self.window.as_millis(),
            self.busy_fraction,
            self.processed_per_sec,
            self.slots
        );
        if let Some(held) = self.held {
            let _ = write!(s, " held={held}");
        }
        if let Some(by) = &self.held_by {
            let mut value = String::new();
            for (i, (partition, n)) in by.iter().enumerate() {
                let _ = write!(value, "{}{partition}:{n}", if i > 0 { "," } else { "" });
            }
            if value.len() <= MAX_HELD_BY_LEN {
                let _ = write!(s, " held_by={value}");
            }
        }
        s
    }

    /// Reads [`Self::encode`]'s form; anything else (other clients' metadata,
    /// a newer version, damage) is `None`.
    pub fn decode(s: &str) -> Option<Self> {
        let mut fields = s.split_ascii_whitespace();
        if fields.next()? != PREFIX {
            return None;
        }
        let (mut worker, mut at, mut window, mut busy, mut rate, mut slots) =
            (None, None, None, None, None, None);
        let (mut held, mut held_by) = (None, None);
        for field in fields {
            let (key, value) = field.split_once('=')?;
            match key {
                "worker" => worker = Some(value.to_string()),
                "at" => at = Some(value.parse().ok()?),
                "window_ms" => window = Some(Duration::from_millis(value.parse().ok()?)),
                "busy" => busy = Some(value.parse::<f64>().ok()?),
                "rate" => rate = Some(value.parse::<f64>().ok()?),
                "slots" => slots = Some(value.parse().ok()?),
                "held" => held = Some(value.parse().ok()?),
                // Optional detail: damaged, the rest of the report stands.
                "held_by" => held_by = decode_held_by(value),
                _ => {} // fields a later version adds
            }
        }
        let busy = busy.filter(|b| b.is_finite() && (0.0..=1.0).contains(b))?;
        let rate = rate.filter(|r| r.is_finite() && *r >= 0.0)?;
        Some(Self {
            worker: worker.filter(|w| !w.is_empty())?,
            at_unix_ms: at?,
            window: window?,
            busy_fraction: busy,
            processed_per_sec: rate,
            slots: slots?,
            held,
            held_by,
        })
    }
}

/// `0:3,5:2` (or empty: nothing held): partitions ascending, each once,
/// none negative.
fn decode_held_by(value: &str) -> Option<Vec<(i32, u64)>> {
    if value.len() > MAX_HELD_BY_LEN {
        return None;
    }
    let mut by: Vec<(i32, u64)> = Vec::new();
    for entry in value.split(',').filter(|e| !e.is_empty()) {
        let (partition, n) = entry.split_once(':')?;
        let partition: i32 = partition.parse().ok().filter(|p| *p >= 0)?;
        if by.last().is_some_and(|(last, _)| *last >= partition) {
            return None;
        }
        by.push((partition, n.parse().ok()?));
    }
    Some(by)
}

/// The consumer group whose commit metadata carries a share group's
/// capacity reports. A share group has no commit metadata of its own, so
/// each of its workers commits its report for this companion group (on a
/// partition it takes records from, at the offset after the last it
/// accepted there); it never has members. Workers beyond the partition
/// count share partitions and overwrite each other's report: the reports
/// read back are a sample of the workers, which is what a capacity per
/// replica needs.
pub fn share_capacity_group(share_group: &str) -> String {
    format!("{CAPACITY_GROUP_PREFIX}{share_group}")
}

/// Names of consumer groups reserved for [`share_capacity_group`]: a worker
/// group by such a name would have its offsets moved by share workers'
/// reports, and its own reports read as a share group's.
pub const CAPACITY_GROUP_PREFIX: &str = "microbatch-capacity.";

/// Why a consumer group may not be named `group`, if it may not.
pub fn reserved_group_name(group: &str) -> Option<String> {
    group.starts_with(CAPACITY_GROUP_PREFIX).then(|| {
        format!(
            "names starting {CAPACITY_GROUP_PREFIX:?} are reserved for share groups' capacity \
             reports; choose another name"
        )
    })
}

/// Wall clock now in Unix milliseconds (0 if the clock is before 1970).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn metadata_round_trips_and_foreign_metadata_is_ignored() {
        let r = CapacityReport {
            worker: "123-abc".into(),
            at_unix_ms: 1_700_000_000_123,
            window: ms(5000),
            busy_fraction: 0.4213,
            processed_per_sec: 812.5,
            slots: 4,
            held: None,
            held_by: None,
        };
        let s = r.encode();
        assert!(
            s.len() < 256,
            "fits any broker's offset.metadata.max.bytes: {s}"
        );
        assert_eq!(CapacityReport::decode(&s), Some(r.clone()));
        let share = CapacityReport {
            held: Some(u64::MAX),
            ..r
        };
        let s = share.encode();
        assert!(s.ends_with(&format!(" held={}", u64::MAX)) && s.len() < 256);
        assert_eq!(CapacityReport::decode(&s), Some(share.clone()));
        let by_partition = CapacityReport {
            held: Some(5),
            held_by: Some(vec![(0, 3), (7, 2)]),
            ..share.clone()
        };
        let s = by_partition.encode();
        assert!(s.ends_with(" held=5 held_by=0:3,7:2"), "{s}");
        assert_eq!(CapacityReport::decode(&s), Some(by_partition));
        let nothing_held = CapacityReport {
            held: Some(0),
            held_by: Some(vec![]),
            ..share.clone()
        };
        assert_eq!(
            CapacityReport::decode(&nothing_held.encode()),
            Some(nothing_held)
        );
        // Too many partitions for the broker's metadata limit: the total only.
        let wide = CapacityReport {
            held_by: Some((0..1000).map(|p| (p, 1_000_000)).collect()),
            ..share.clone()
        };
        let s = wide.encode();
        assert!(!s.contains("held_by") && s.len() < 256, "{s}");
        // The longest that is kept stays well inside 4096 bytes.
        let widest = CapacityReport {
            held_by: Some((0..100).map(|p| (p, 999)).collect()),
            ..share
        };
        let s = widest.encode();
        assert!(s.contains("held_by") && s.len() < 1400, "{}", s.len());
        for foreign in [
            "",
            "checkpoint 17",
            "microbatch-capacity/2 worker=a",
            "microbatch-capacity/1 worker=a at=1 window_ms=5 busy=2.5 rate=1 slots=1",
            "microbatch-capacity/1 worker=a at=1 window_ms=5 busy=0.5 rate=-1 slots=1",
            "microbatch-capacity/1 worker=a at=x window_ms=5 busy=0.5 rate=1 slots=1",
            "microbatch-capacity/1 at=1 window_ms=5 busy=0.5 rate=1 slots=1",
            "microbatch-capacity/1 worker=a at=1 window_ms=5 busy=0.5 rate=1 slots=1 held=-3",
        ] {
            assert_eq!(CapacityReport::decode(foreign), None, "{foreign:?}");
        }
        // A damaged breakdown costs the breakdown, not the report.
        for bad in ["3:1,1:1", "1:1,1:1", "-1:1", "1:-1", "1", "x:y"] {
            let text = format!(
                "microbatch-capacity/1 worker=a at=1 window_ms=5 busy=0.5 rate=1 slots=1 held=2 held_by={bad}"
            );
            let r = CapacityReport::decode(&text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!((r.held, r.held_by), (Some(2), None), "{text}");
        }
        let newer = format!("{s} queue=7");
        assert!(
            CapacityReport::decode(&newer).is_some(),
            "unknown fields are skipped"
        );
    }

    /// Commit metadata is written by other workers (and other clients):
    /// any text decodes to a well-formed report or to nothing, never a
    /// panic, a busy fraction outside 0..=1 or a negative rate.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn field() -> impl Strategy<Value = String> {
            let value = prop_oneof![
                "[0-9]{0,22}",
                "-?[0-9]{1,3}\\.[0-9]{0,6}",
                Just("NaN".to_string()),
                Just("inf".to_string()),
                Just("-1".to_string()),
                "[a-z=]{0,6}",
                "([0-9]{1,2}:[0-9]{1,3},?){0,4}",
            ];
            (
                prop_oneof![
                    Just("worker"),
                    Just("at"),
                    Just("window_ms"),
                    Just("busy"),
                    Just("rate"),
                    Just("slots"),
                    Just("held"),
                    Just("held_by"),
                    Just("x"),
                ],
                value,
            )
                .prop_map(|(k, v)| format!("{k}={v}"))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(
                std::env::var("MICROBATCH_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
            ))]

            #[test]
            fn any_metadata_decodes_to_a_sane_report_or_nothing(
                prefix in prop_oneof![Just(PREFIX.to_string()), "[ -~]{0,24}"],
                fields in proptest::collection::vec(field(), 0..9),
                noise in "[ -~]{0,16}",
            ) {
                let text = format!("{prefix} {} {noise}", fields.join(" "));
                if let Some(r) = CapacityReport::decode(&text) {
                    prop_assert!((0.0..=1.0).contains(&r.busy_fraction));
                    prop_assert!(r.processed_per_sec.is_finite() && r.processed_per_sec >= 0.0);
                    prop_assert!(!r.worker.is_empty());
                    if let Some(by) = &r.held_by {
                        prop_assert!(by.windows(2).all(|w| w[0].0 < w[1].0));
                        prop_assert!(by.iter().all(|(p, _)| *p >= 0));
                    }
                }
            }
        }
    }
}
