//! The share consumer's acknowledgement ledger, without I/O: which records
//! this member holds (acquired, not yet acknowledged), which verdicts wait to
//! be sent, and how they are packed into the protocol's acknowledgement
//! batches. One ledger per share partition.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

/// What the member says about a record it acquired (KIP-932).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AckType {
    /// An offset the broker handed out with no record behind it (a control
    /// record or a compacted one). Only the client sends it, never a caller.
    Gap,
    /// Processed: the record is done.
    Accept,
    /// Give the record back: it is delivered again (its delivery count grows).
    Release,
    /// The record is unprocessable and archived without delivery.
    Reject,
    /// Still working on it: the lock is renewed and the record stays held
    /// (KIP-1222, ShareAcknowledge v2). Not a verdict.
    Renew,
}

impl AckType {
    /// The wire value of `AcknowledgeTypes`.
    pub fn code(self) -> i8 {
        match self {
            Self::Gap => 0,
            Self::Accept => 1,
            Self::Release => 2,
            Self::Reject => 3,
            Self::Renew => 4,
        }
    }
}

/// A contiguous run of offsets acknowledged the same way, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckBatch {
    pub first_offset: i64,
    pub last_offset: i64,
    pub ack: AckType,
}

/// An acknowledgement the ledger refuses: the caller named a record this
/// member does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AckError {
    #[error("offset {offset} is not held by this member (never acquired here, already acknowledged, or its lock was lost)")]
    NotHeld { offset: i64 },
    #[error("offset {offset} was delivered again (delivery {held}) since the delivery {named} this verdict is about")]
    StaleDelivery { offset: i64, named: i16, held: i16 },
}

/// One share partition's records held by this member and the verdicts that
/// wait to be sent.
#[derive(Debug, Default, Clone)]
pub struct PartitionAcks {
    /// Acquired and not yet acknowledged: offset -> delivery count.
    held: BTreeMap<i64, i16>,
    /// Acknowledged by the caller, not yet sent.
    pending: BTreeMap<i64, AckType>,
    /// Held records whose locks the caller asked to renew, not yet sent.
    renewals: BTreeSet<i64>,
}

impl PartitionAcks {
    /// Records the broker handed to this member: `first..=last`, each
    /// delivered `delivery_count` times so far. Offsets in the range
    /// without a record in the fetched batches are passed in `gaps` and
    /// acknowledged as such right away.
    pub fn acquired(
        &mut self,
        first: i64,
        last: i64,
        delivery_count: i16,
        gaps: &std::collections::BTreeSet<i64>,
    ) {
        for offset in first..=last {
            if gaps.contains(&offset) {
                self.pending.insert(offset, AckType::Gap);
                self.held.remove(&offset);
                self.renewals.remove(&offset);
            } else {
                self.held.insert(offset, delivery_count);
                // A record delivered again (after a lost lock) replaces any
                // verdict not yet sent for its earlier delivery.
                self.pending.remove(&offset);
                self.renewals.remove(&offset);
            }
        }
    }

    /// The caller's verdict on delivery `delivery_count` of a record it
    /// holds. A verdict about an earlier delivery of a record delivered
    /// again is refused: it is about work the broker already gave away.
    /// [`AckType::Renew`] keeps the record held and asks for its lock to be
    /// renewed ([`Self::take_renewals`]).
    pub fn acknowledge(
        &mut self,
        offset: i64,
        delivery_count: i16,
        ack: AckType,
    ) -> Result<(), AckError> {
        let held = match self.held.get(&offset) {
            Some(&held) if ack != AckType::Gap => held,
            _ => return Err(AckError::NotHeld { offset }),
        };
        if held != delivery_count {
            return Err(AckError::StaleDelivery {
                offset,
                named: delivery_count,
                held,
            });
        }
        if ack == AckType::Renew {
            self.renewals.insert(offset);
            return Ok(());
        }
        self.held.remove(&offset);
        self.renewals.remove(&offset);
        self.pending.insert(offset, ack);
        Ok(())
    }

    /// Gives back a record the client could not hand to the caller.
    pub fn release(&mut self, offset: i64) {
        if self.held.remove(&offset).is_some() {
            self.renewals.remove(&offset);
            self.pending.insert(offset, AckType::Release);
        }
    }

    /// Offsets held and not yet acknowledged.
    pub fn held(&self) -> impl Iterator<Item = (i64, i16)> + '_ {
        self.held.iter().map(|(&o, &d)| (o, d))
    }

    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes the verdicts waiting to be sent, packed into batches.
    pub fn take_pending(&mut self) -> Vec<AckBatch> {
        let pending = std::mem::take(&mut self.pending);
        pack(pending.into_iter())
    }

    pub fn has_renewals(&self) -> bool {
        !self.renewals.is_empty()
    }

    /// Takes the renewals waiting to be sent, packed into batches.
    pub fn take_renewals(&mut self) -> Vec<AckBatch> {
        let renewals = std::mem::take(&mut self.renewals);
        pack(renewals.into_iter().map(|o| (o, AckType::Renew)))
    }

    /// Puts back what could not be sent (the request failed before the
    /// broker saw it): verdicts unless the record was delivered again
    /// since, renewals while the record is still held.
    pub fn restore(&mut self, batches: &[AckBatch]) {
        for batch in batches {
            for offset in batch.first_offset..=batch.last_offset {
                let held = self.held.contains_key(&offset);
                if batch.ack == AckType::Renew {
                    if held {
                        self.renewals.insert(offset);
                    }
                } else if !held {
                    self.pending.entry(offset).or_insert(batch.ack);
                }
            }
        }
    }
}

/// Packs verdicts, in offset order, into runs of contiguous offsets with the
/// same verdict.
pub fn pack(verdicts: impl Iterator<Item = (i64, AckType)>) -> Vec<AckBatch> {
    let mut out: Vec<AckBatch> = Vec::new();
    for (offset, ack) in verdicts {
        match out.last_mut() {
            Some(b) if b.ack == ack && b.last_offset + 1 == offset => b.last_offset = offset,
            _ => out.push(AckBatch {
                first_offset: offset,
                last_offset: offset,
                ack,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ack_type() -> impl Strategy<Value = AckType> {
        prop_oneof![
            Just(AckType::Gap),
            Just(AckType::Accept),
            Just(AckType::Release),
            Just(AckType::Reject)
        ]
    }

    proptest! {
        /// Packing loses nothing and adds nothing: expanding the batches
        /// gives back exactly the verdicts, and neighbouring batches never
        /// could have been one.
        #[test]
        fn pack_round_trips(verdicts in proptest::collection::btree_map(0i64..200, ack_type(), 0..100)) {
            let batches = pack(verdicts.clone().into_iter());
            let mut expanded = BTreeMap::new();
            for b in &batches {
                prop_assert!(b.first_offset <= b.last_offset);
                for o in b.first_offset..=b.last_offset {
                    prop_assert!(expanded.insert(o, b.ack).is_none());
                }
            }
            prop_assert_eq!(&expanded, &verdicts);
            for pair in batches.windows(2) {
                prop_assert!(pair[0].last_offset < pair[1].first_offset);
                prop_assert!(pair[0].ack != pair[1].ack || pair[0].last_offset + 1 != pair[1].first_offset);
            }
        }
    }

    #[test]
    fn only_held_records_are_acknowledged_and_each_once() {
        let mut p = PartitionAcks::default();
        p.acquired(10, 14, 1, &[12].into());
        assert_eq!(p.held_count(), 4);
        p.acknowledge(10, 1, AckType::Accept).unwrap();
        p.acknowledge(11, 1, AckType::Accept).unwrap();
        assert_eq!(
            p.acknowledge(11, 1, AckType::Accept),
            Err(AckError::NotHeld { offset: 11 })
        );
        assert_eq!(
            p.acknowledge(12, 1, AckType::Accept),
            Err(AckError::NotHeld { offset: 12 })
        );
        assert_eq!(
            p.acknowledge(99, 1, AckType::Release),
            Err(AckError::NotHeld { offset: 99 })
        );
        assert_eq!(
            p.acknowledge(13, 1, AckType::Gap),
            Err(AckError::NotHeld { offset: 13 })
        );
        p.acknowledge(13, 1, AckType::Release).unwrap();
        assert_eq!(
            p.take_pending(),
            vec![
                AckBatch {
                    first_offset: 10,
                    last_offset: 11,
                    ack: AckType::Accept
                },
                AckBatch {
                    first_offset: 12,
                    last_offset: 12,
                    ack: AckType::Gap
                },
                AckBatch {
                    first_offset: 13,
                    last_offset: 13,
                    ack: AckType::Release
                },
            ]
        );
        assert!(!p.has_pending());
        assert_eq!(p.held().collect::<Vec<_>>(), vec![(14, 1)]);
    }

    #[test]
    fn a_redelivered_record_drops_its_unsent_verdict_and_restore_keeps_it_dropped() {
        let mut p = PartitionAcks::default();
        p.acquired(0, 1, 1, &Default::default());
        p.acknowledge(0, 1, AckType::Accept).unwrap();
        p.acknowledge(1, 1, AckType::Accept).unwrap();
        let sent = p.take_pending();
        // Offset 1's lock ran out meanwhile and it came back.
        p.acquired(1, 1, 2, &Default::default());
        p.restore(&sent);
        assert_eq!(
            p.take_pending(),
            vec![AckBatch {
                first_offset: 0,
                last_offset: 0,
                ack: AckType::Accept
            }]
        );
        assert_eq!(p.held().collect::<Vec<_>>(), vec![(1, 2)]);
    }

    #[test]
    fn a_verdict_about_an_earlier_delivery_is_refused() {
        let mut p = PartitionAcks::default();
        p.acquired(5, 5, 1, &Default::default());
        // Its lock ran out before any verdict; it came back to this member.
        p.acquired(5, 5, 2, &Default::default());
        assert_eq!(
            p.acknowledge(5, 1, AckType::Accept),
            Err(AckError::StaleDelivery {
                offset: 5,
                named: 1,
                held: 2
            })
        );
        p.acknowledge(5, 2, AckType::Accept).unwrap();
        assert_eq!(p.take_pending().len(), 1);
    }

    /// RENEW keeps the record held and is sent apart from verdicts; a
    /// verdict or a redelivery drops a renewal not yet sent; a renewal that
    /// could not be sent comes back only while the record is held.
    #[test]
    fn a_renewal_keeps_the_record_held_and_never_rides_with_verdicts() {
        let mut p = PartitionAcks::default();
        p.acquired(0, 3, 1, &Default::default());
        for o in 0..4 {
            p.acknowledge(o, 1, AckType::Renew).unwrap();
        }
        assert_eq!(p.held_count(), 4, "renewing is not a verdict");
        assert!(!p.has_pending(), "nothing for a fetch to carry");
        p.acknowledge(1, 1, AckType::Accept).unwrap();
        p.acquired(2, 2, 2, &Default::default());
        assert_eq!(
            p.acknowledge(2, 1, AckType::Renew),
            Err(AckError::StaleDelivery {
                offset: 2,
                named: 1,
                held: 2
            })
        );
        let renewals = p.take_renewals();
        assert_eq!(
            renewals,
            vec![
                AckBatch {
                    first_offset: 0,
                    last_offset: 0,
                    ack: AckType::Renew
                },
                AckBatch {
                    first_offset: 3,
                    last_offset: 3,
                    ack: AckType::Renew
                },
            ]
        );
        assert_eq!(
            p.take_pending(),
            vec![AckBatch {
                first_offset: 1,
                last_offset: 1,
                ack: AckType::Accept
            }]
        );
        // The renewal request failed; record 3 was accepted meanwhile.
        p.acknowledge(3, 1, AckType::Accept).unwrap();
        p.restore(&renewals);
        assert_eq!(
            p.take_renewals(),
            vec![AckBatch {
                first_offset: 0,
                last_offset: 0,
                ack: AckType::Renew
            }]
        );
        assert_eq!(
            p.take_pending(),
            vec![AckBatch {
                first_offset: 3,
                last_offset: 3,
                ack: AckType::Accept
            }],
            "a failed renewal never turns into a verdict"
        );
    }
}
