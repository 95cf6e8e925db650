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
}

/// The header naming why a [`ShareRecord::undecodable`] has no key or value.
pub const UNDECODABLE_HEADER: &str = "microbatch.undecodable";

impl ShareRecord {
    /// A record whose batch could not be decoded, handed out without key or
    /// value (see `ShareConsumerConfig::hand_undecodable_after`), `reason`
    /// in its [`UNDECODABLE_HEADER`].
    pub fn undecodable(
        topic: &std::sync::Arc<str>,
        partition: i32,
        offset: i64,
        delivery_count: i16,
        reason: &str,
    ) -> Self {
        Self {
            topic: topic.clone(),
            partition,
            offset,
            delivery_count,
            timestamp: -1,
            key: None,
            value: None,
            headers: vec![(
                UNDECODABLE_HEADER.to_string(),
                Some(Bytes::copy_from_slice(reason.as_bytes())),
            )],
        }
    }

    /// Why this record has no key or value, if it is [`Self::undecodable`].
    pub fn undecodable_reason(&self) -> Option<String> {
        let (_, value) = self
            .headers
            .first()
            .filter(|(k, _)| k == UNDECODABLE_HEADER)?;
        Some(String::from_utf8_lossy(value.as_deref().unwrap_or_default()).into_owned())
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

/// The records in `acquired`, in offset order; the acquired offsets that a
/// complete batch covers without a record (gaps: control or compacted
/// records); and the acquired offsets past the last complete batch
/// (`missing`: a batch cut short by the size limit), which must be released,
/// never called gaps, or their records would be lost.
#[derive(Debug)]
pub struct Decoded {
    pub records: Vec<ShareRecord>,
    pub gaps: BTreeSet<i64>,
    pub missing: BTreeSet<i64>,
}

/// The widest acquired range believed: a broker hands out at most a fetch's
/// worth of batches, and a compacted stretch wider than this would cost a
/// loop over every offset. A wider range is answered as undecodable (its
/// records are released), not looped over.
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

pub fn decode(
    topic: &std::sync::Arc<str>,
    partition: i32,
    bytes: Option<Bytes>,
    acquired: &[Acquired],
) -> Result<Decoded, DecodeError> {
    if let Some(bad) = acquired.iter().find(|a| !span_ok(a)) {
        return Err(DecodeError {
            partition,
            position: 0,
            reason: format!(
                "acquired range {}..={} is empty, negative or wider than {MAX_ACQUIRED_SPAN} offsets",
                bad.first_offset, bad.last_offset
            ),
        });
    }
    let mut records = Vec::new();
    let mut present = BTreeSet::new();
    // The last offset a complete batch covers (records or not).
    let mut covered_to = i64::MIN;
    if let Some(mut buf) = bytes {
        let total = buf.len();
        // Batch header: base offset (8), length (4), then `length` bytes.
        while buf.remaining() >= 12 {
            let length = i32::from_be_bytes(buf[8..12].try_into().expect("4 bytes"));
            let size = 12
                + usize::try_from(length).map_err(|_| DecodeError {
                    partition,
                    position: total - buf.remaining(),
                    reason: format!("negative batch length {length}"),
                })?;
            if buf.remaining() < size {
                break; // cut short by the size limit; the broker resends it
            }
            if size < 27 {
                return Err(DecodeError {
                    partition,
                    position: total - buf.remaining(),
                    reason: format!("batch length {length} is shorter than a batch header"),
                });
            }
            let base = i64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
            let last_delta = i32::from_be_bytes(buf[23..27].try_into().expect("4 bytes"));
            let mut one = buf.split_to(size);
            let position = total - buf.remaining() - size;
            let set = RecordBatchDecoder::decode(&mut one).map_err(|e| DecodeError {
                partition,
                position,
                reason: e.to_string(),
            })?;
            covered_to = covered_to.max(base.saturating_add(i64::from(last_delta)));
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
                });
            }
        }
    }
    records.sort_by_key(|r| r.offset);
    let (gaps, missing): (BTreeSet<i64>, BTreeSet<i64>) = acquired
        .iter()
        .flat_map(|a| a.first_offset..=a.last_offset)
        .filter(|o| !present.contains(o))
        .partition(|&o| o <= covered_to);
    Ok(Decoded {
        records,
        gaps,
        missing,
    })
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
        assert!(decode(&topic, 0, None, &[range(i64::MIN, i64::MAX)]).is_err());
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
        let d = decode(&topic, 0, Some(bytes.freeze()), &acquired).unwrap();
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
        let d = decode(&topic, 0, Some(bytes.freeze()), &acquired).unwrap();
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
        let d = decode(&topic, 0, Some(bytes.freeze()), &acquired).unwrap();
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
        let err = decode(&topic, 3, Some(bytes.freeze()), &acquired)
            .err()
            .unwrap();
        assert_eq!(err.partition, 3);
        assert_eq!(err.position, 0);
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
            assert!(
                decode(&topic, 0, None, &acquired).is_err(),
                "{first}..={last}"
            );
        }
    }

    proptest::proptest! {
        /// Any bytes: decoding never panics, and whatever it returns lies
        /// inside the acquired ranges.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let topic: std::sync::Arc<str> = "t".into();
            let acquired = [Acquired { first_offset: 0, last_offset: 9, delivery_count: 1 }];
            if let Ok(d) = decode(&topic, 0, Some(Bytes::from(data)), &acquired) {
                for r in &d.records {
                    proptest::prop_assert!((0..=9).contains(&r.offset));
                }
            }
        }
    }
}
