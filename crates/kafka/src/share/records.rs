//! Turning a share partition's fetched bytes into the records this member
//! acquired, without I/O. The broker returns whole record batches; only the
//! offsets in its `AcquiredRecords` ranges belong to this member, and
//! acquired offsets with no record behind them (control records, compacted
//! records) must be acknowledged as gaps or they come back after the lock.

use std::collections::BTreeSet;

use bytes::{Buf, Bytes};
use kafka_protocol::records::RecordBatchDecoder;
use thiserror::Error;

/// One record this member acquired.
#[derive(Debug, Clone)]
pub struct ShareRecord {
    pub topic: std::sync::Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// How many times the broker has delivered it, this time included.
    pub delivery_count: i16,
    /// Milliseconds since the epoch, as the producer or the log set it.
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// In order, duplicates kept as far as the decoder keeps them.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Set when the record's batch could not be decoded: why. Such a record
    /// has no key, value or headers ([`Self::undecodable`]).
    pub undecodable: Option<std::sync::Arc<str>>,
}

impl ShareRecord {
    /// A record whose batch could not be decoded, handed out without key or
    /// value (see `ShareConsumerConfig::hand_undecodable_after`).
    pub fn undecodable(
        topic: &std::sync::Arc<str>,
        partition: i32,
        offset: i64,
        delivery_count: i16,
        reason: std::sync::Arc<str>,
    ) -> Self {
        Self {
            topic: topic.clone(),
            partition,
            offset,
            delivery_count,
            timestamp: -1,
            key: None,
            value: None,
            headers: Vec::new(),
            undecodable: Some(reason),
        }
    }
}

/// A range the broker says this member acquired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    pub first_offset: i64,
    pub last_offset: i64,
    pub delivery_count: i16,
}

#[derive(Debug, Error)]
#[error("undecodable record batch at byte {position} of a share fetch for partition {partition}: {reason}")]
pub struct DecodeError {
    pub partition: i32,
    pub position: usize,
    pub reason: String,
}

/// The records in `acquired`, in offset order; the acquired offsets that
/// decoded batches cover without a record (gaps: control or compacted
/// records); the acquired offsets outside them (`missing`: past a batch cut
/// short by the size limit, or before a base offset garbled on the wire),
/// which must be released, never called gaps, or their records would be
/// lost; and those of batches that could not be decoded.
#[derive(Debug)]
pub struct Decoded {
    pub records: Vec<ShareRecord>,
    pub gaps: BTreeSet<i64>,
    pub missing: BTreeSet<i64>,
    /// Acquired offsets in batches that could not be decoded, with their
    /// delivery counts: neither records nor gaps.
    pub undecodable: Vec<(i64, i16)>,
    /// Why: one per batch (or acquired range) that could not be read.
    pub errors: Vec<DecodeError>,
}

/// The widest acquired range believed: a broker hands out at most a fetch's
/// worth of batches, and a compacted stretch wider than this would cost a
/// loop over every offset. A wider range is left out and named, never
/// looped over: its records come back when their lock runs out.
pub const MAX_ACQUIRED_SPAN: i64 = 1 << 20;

/// Whether an acquired range is one to loop over: not empty, not negative,
/// and at most [`MAX_ACQUIRED_SPAN`] wide (its width computed without
/// overflow, whatever the broker sent).
pub fn span_ok(a: &Acquired) -> bool {
    a.first_offset >= 0
        && a.last_offset >= a.first_offset
        && a.last_offset
            .checked_sub(a.first_offset)
            .is_some_and(|span| span < MAX_ACQUIRED_SPAN)
}

/// Decodes a share partition's fetched bytes batch by batch: a batch that
/// cannot be decoded costs only its own offsets ([`Decoded::undecodable`]),
/// the others are read, and bytes whose batch boundaries cannot be found
/// any more make every acquired offset after them undecodable. An acquired
/// range that is not [`span_ok`] is left out (never looped over) and named
/// in [`Decoded::errors`].
pub fn decode(
    topic: &std::sync::Arc<str>,
    partition: i32,
    bytes: Option<Bytes>,
    acquired: &[Acquired],
) -> Decoded {
    let mut errors = Vec::new();
    for bad in acquired.iter().filter(|a| !span_ok(a)) {
        errors.push(DecodeError {
            partition,
            position: 0,
            reason: format!(
                "acquired range {}..={} is empty, negative or wider than {MAX_ACQUIRED_SPAN} offsets",
                bad.first_offset, bad.last_offset
            ),
        });
    }
    let acquired: Vec<Acquired> = acquired.iter().copied().filter(span_ok).collect();
    let mut records = Vec::new();
    let mut present = BTreeSet::new();
    // Offsets of batches that could not be decoded, and from where the
    // batch boundaries were lost: (first, last).
    let mut bad_spans: Vec<(i64, i64)> = Vec::new();
    // The first and last offsets decoded batches cover (records or not):
    // an acquired offset between them without a record is a gap (control
    // or compacted); one before them or after is released, never a gap (a
    // base offset garbled on the wire, which the CRC does not cover, must
    // not turn records into gaps).
    let mut first_base = i64::MAX;
    let mut covered_to = i64::MIN;
    if let Some(mut buf) = bytes {
        let total = buf.len();
        // Batch header: base offset (8), length (4), then `length` bytes.
        while buf.remaining() >= 12 {
            let position = total - buf.remaining();
            let length = i32::from_be_bytes(buf[8..12].try_into().expect("4 bytes"));
            let size = match usize::try_from(length) {
                Ok(n) if n >= 15 => 12 + n,
                _ => {
                    // No way to the next batch: the rest is unreadable.
                    errors.push(DecodeError {
                        partition,
                        position,
                        reason: format!("batch length {length} is shorter than a batch header"),
                    });
                    bad_spans.push((covered_to.saturating_add(1), i64::MAX));
                    break;
                }
            };
            if buf.remaining() < size {
                break; // cut short by the size limit; the broker resends it
            }
            let base = i64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
            let last_delta = i32::from_be_bytes(buf[23..27].try_into().expect("4 bytes"));
            let last = base.saturating_add(i64::from(last_delta.max(0)));
            let mut one = buf.split_to(size);
            let set = match RecordBatchDecoder::decode(&mut one) {
                Ok(set) => set,
                Err(e) => {
                    errors.push(DecodeError {
                        partition,
                        position,
                        reason: e.to_string(),
                    });
                    bad_spans.push((base, last));
                    continue;
                }
            };
            first_base = first_base.min(base);
            covered_to = covered_to.max(last);
            for r in set.records {
                if r.control {
                    continue;
                }
                let Some(range) = acquired
                    .iter()
                    .find(|a| a.first_offset <= r.offset && r.offset <= a.last_offset)
                else {
                    continue;
                };
                if !present.insert(r.offset) {
                    continue;
                }
                records.push(ShareRecord {
                    topic: topic.clone(),
                    partition,
                    offset: r.offset,
                    delivery_count: range.delivery_count,
                    timestamp: r.timestamp,
                    key: r.key,
                    value: r.value,
                    headers: r
                        .headers
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                    undecodable: None,
                });
            }
        }
    }
    records.sort_by_key(|r| r.offset);
    let mut gaps = BTreeSet::new();
    let mut missing = BTreeSet::new();
    let mut undecodable = Vec::new();
    for a in &acquired {
        for o in a.first_offset..=a.last_offset {
            if present.contains(&o) {
                continue;
            }
            if bad_spans
                .iter()
                .any(|&(first, last)| first <= o && o <= last)
            {
                undecodable.push((o, a.delivery_count));
            } else if first_base <= o && o <= covered_to {
                gaps.insert(o);
            } else {
                missing.insert(o);
            }
        }
    }
    Decoded {
        records,
        gaps,
        missing,
        undecodable,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::indexmap::IndexMap;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };

    /// Ranges a hostile broker could send are refused before any loop or
    /// subtraction overflows.
    #[test]
    fn hostile_acquired_ranges_are_refused_without_overflow() {
        let range = |first, last| Acquired {
            first_offset: first,
            last_offset: last,
            delivery_count: 1,
        };
        assert!(span_ok(&range(0, 0)));
        assert!(span_ok(&range(10, 10 + MAX_ACQUIRED_SPAN - 1)));
        for bad in [
            range(10, 9),
            range(0, MAX_ACQUIRED_SPAN),
            range(i64::MIN, 0),
            range(i64::MIN, i64::MAX),
            range(-1, 5),
            range(0, i64::MAX),
        ] {
            assert!(!span_ok(&bad), "{bad:?}");
        }
        let topic: std::sync::Arc<str> = "t".into();
        assert!(!decode(&topic, 0, None, &[range(i64::MIN, i64::MAX)])
            .errors
            .is_empty());
    }

    fn record(offset: i64, control: bool) -> Record {
        Record {
            transactional: false,
            control,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset,
            sequence: -1,
            timestamp: 1_000 + offset,
            key: None,
            value: Some(Bytes::from(format!("v{offset}"))),
            headers: IndexMap::new(),
        }
    }

    fn batch(records: &[Record]) -> BytesMut {
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            records,
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .unwrap();
        buf
    }

    #[test]
    fn keeps_only_acquired_records_and_names_the_gaps() {
        let topic: std::sync::Arc<str> = "t".into();
        let mut bytes = batch(&[record(0, false), record(1, false), record(2, false)]);
        bytes.extend_from_slice(&batch(&[record(3, true)]));
        bytes.extend_from_slice(&batch(&[record(5, false), record(6, false)]));
        let acquired = [
            Acquired {
                first_offset: 1,
                last_offset: 4,
                delivery_count: 2,
            },
            Acquired {
                first_offset: 6,
                last_offset: 6,
                delivery_count: 1,
            },
        ];
        let d = decode(&topic, 0, Some(bytes.freeze()), &acquired);
        let got: Vec<(i64, i16)> = d
            .records
            .iter()
            .map(|r| (r.offset, r.delivery_count))
            .collect();
        assert_eq!(got, vec![(1, 2), (2, 2), (6, 1)]);
        // 3 is a control record, 4 was compacted away: both gaps.
        assert_eq!(d.gaps, [3, 4].into());
        assert!(d.missing.is_empty());
        // Offsets past every complete batch are missing, not gaps.
        let acquired = [Acquired {
            first_offset: 6,
            last_offset: 8,
            delivery_count: 1,
        }];
        let bytes = batch(&[record(5, false), record(6, false)]);
        let d = decode(&topic, 0, Some(bytes.freeze()), &acquired);
        assert!(d.gaps.is_empty());
        assert_eq!(d.missing, [7, 8].into());
    }

    #[test]
    fn a_batch_cut_short_is_left_out_not_an_error() {
        let topic: std::sync::Arc<str> = "t".into();
        let mut bytes = batch(&[record(0, false)]);
        let second = batch(&[record(1, false)]);
        bytes.extend_from_slice(&second[..second.len() - 3]);
        let acquired = [Acquired {
            first_offset: 0,
            last_offset: 1,
            delivery_count: 1,
        }];
        let d = decode(&topic, 0, Some(bytes.freeze()), &acquired);
        assert_eq!(d.records.len(), 1);
        assert!(
            d.gaps.is_empty(),
            "a record cut short is not a gap: {:?}",
            d.gaps
        );
        assert_eq!(d.missing, [1].into());
    }

    #[test]
    fn garbage_is_an_error_naming_where() {
        let topic: std::sync::Arc<str> = "t".into();
        let mut bytes = BytesMut::from(&[0u8; 12][..]);
        bytes[11] = 20;
        bytes.extend_from_slice(&[0xff; 20]);
        let acquired = [Acquired {
            first_offset: 0,
            last_offset: 0,
            delivery_count: 1,
        }];
        let d = decode(&topic, 3, Some(bytes.freeze()), &acquired);
        assert_eq!(d.errors[0].partition, 3);
        assert_eq!(d.errors[0].position, 0);
        assert_eq!(d.undecodable, [(0, 1)], "neither a record nor a gap");
        assert!(d.gaps.is_empty() && d.missing.is_empty());
    }

    #[test]
    fn an_absurd_acquired_range_is_refused_not_looped_over() {
        let topic: std::sync::Arc<str> = "t".into();
        for (first, last) in [(0, i64::MAX), (10, 9)] {
            let acquired = [Acquired {
                first_offset: first,
                last_offset: last,
                delivery_count: 1,
            }];
            let d = decode(&topic, 0, None, &acquired);
            assert!(!d.errors.is_empty(), "{first}..={last}");
            assert!(d.gaps.is_empty() && d.missing.is_empty() && d.undecodable.is_empty());
        }
    }

    /// Runs `f` on every batch header in `bytes` (the encoder may split
    /// records into several batches).
    fn each_batch(bytes: &mut BytesMut, f: impl Fn(&mut [u8])) {
        let mut at = 0;
        while at + 27 <= bytes.len() {
            let len = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
            f(&mut bytes[at..at + 27]);
            at += 12 + len;
        }
    }

    /// One batch that cannot be decoded costs only its own offsets: the
    /// batches before and after it are read, and its offsets are neither
    /// records nor gaps.
    #[test]
    fn a_bad_batch_costs_only_its_own_records() {
        let topic: std::sync::Arc<str> = "t".into();
        let mut bytes = batch(&[record(0, false), record(1, false)]);
        let mut bad = batch(&[record(2, false), record(3, false)]);
        each_batch(&mut bad, |b| b[16] = 9); // the magic byte
        bytes.extend_from_slice(&bad);
        bytes.extend_from_slice(&batch(&[record(4, false)]));
        let acquired = [Acquired {
            first_offset: 0,
            last_offset: 4,
            delivery_count: 3,
        }];
        let d = decode(&topic, 0, Some(bytes.freeze()), &acquired);
        let got: Vec<i64> = d.records.iter().map(|r| r.offset).collect();
        assert_eq!(got, [0, 1, 4]);
        assert_eq!(d.undecodable, [(2, 3), (3, 3)]);
        assert!(d.gaps.is_empty() && d.missing.is_empty());
        // One error per bad batch, the first where the bad bytes begin.
        assert!(!d.errors.is_empty());
        assert_eq!(
            d.errors[0].position,
            batch(&[record(0, false), record(1, false)]).len()
        );
    }

    /// A batch whose base offset was garbled on the wire (the CRC does not
    /// cover it) decodes with offsets nobody acquired: the acquired offsets
    /// before it are released, never acknowledged as gaps (which would lose
    /// their records).
    #[test]
    fn acquired_offsets_before_every_batch_are_released_not_gaps() {
        let topic: std::sync::Arc<str> = "t".into();
        let mut bytes = batch(&[record(0, false), record(1, false)]);
        each_batch(&mut bytes, |b| {
            let base = i64::from_be_bytes(b[0..8].try_into().unwrap());
            b[0..8].copy_from_slice(&(base + 1000).to_be_bytes());
        });
        let acquired = [Acquired {
            first_offset: 0,
            last_offset: 1,
            delivery_count: 1,
        }];
        let d = decode(&topic, 0, Some(bytes.freeze()), &acquired);
        assert!(d.records.is_empty());
        assert!(d.gaps.is_empty(), "{:?}", d.gaps);
        assert_eq!(d.missing, [0, 1].into());
    }

    proptest::proptest! {
        /// Any bytes: decoding never panics, and whatever it returns lies
        /// inside the acquired ranges.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let topic: std::sync::Arc<str> = "t".into();
            let acquired = [Acquired { first_offset: 0, last_offset: 9, delivery_count: 1 }];
            let d = decode(&topic, 0, Some(Bytes::from(data)), &acquired);
            for r in &d.records {
                proptest::prop_assert!((0..=9).contains(&r.offset));
            }
            // Every acquired offset is exactly one of: a record, a gap,
            // missing or undecodable.
            let mut seen: Vec<i64> = d.records.iter().map(|r| r.offset).collect();
            seen.extend(d.gaps.iter().copied());
            seen.extend(d.missing.iter().copied());
            seen.extend(d.undecodable.iter().map(|u| u.0));
            seen.sort_unstable();
            proptest::prop_assert_eq!(seen, (0..=9).collect::<Vec<i64>>());
        }
    }
}
