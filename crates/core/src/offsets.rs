//! Which offset of a partition may be committed.
//!
//! **The offset rule.** The committed offset of a partition is the offset of
//! its first record that is not done, or one past the last record seen when all
//! are done. A record is done when the handler succeeded on it, or its dead
//! letter was acknowledged by the broker. So a commit never passes an
//! unfinished record, whatever order batches finish in.
//!
//! Records are tracked in the order they are consumed (rising offsets, with
//! gaps where compaction or transaction markers left them). Marking done is
//! O(1) when offsets are dense and O(log n) otherwise; advancing the watermark
//! pops finished records from the front, O(1) amortised per record.

use std::collections::VecDeque;

/// Done-tracking for one partition.
#[derive(Debug, Default, Clone)]
pub struct PartitionOffsets {
    /// Tracked records in offset order, with their done flag; the front is the
    /// first record not yet known to be done.
    pending: VecDeque<(i64, bool)>,
    /// One past the highest offset seen.
    next: Option<i64>,
    done_ahead: usize,
    /// The highest offset marked done.
    max_done: Option<i64>,
    /// The first offset tracked.
    first: Option<i64>,
}

impl PartitionOffsets {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts tracking a consumed record. Returns false for an offset at or
    /// below one already seen (a replay the caller must not process twice).
    pub fn track(&mut self, offset: i64) -> bool {
        if self.next.is_some_and(|next| offset < next) {
            return false;
        }
        self.pending.push_back((offset, false));
        self.next = Some(offset + 1);
        self.first.get_or_insert(offset);
        true
    }

    fn index_of(&self, offset: i64) -> Option<usize> {
        let (front, _) = *self.pending.front()?;
        let guess = usize::try_from(offset - front).ok()?;
        if self.pending.get(guess).is_some_and(|(o, _)| *o == offset) {
            return Some(guess);
        }
        self.pending.binary_search_by_key(&offset, |(o, _)| *o).ok()
    }

    /// Marks a tracked record done. Unknown offsets (already below the
    /// watermark, or never tracked) are ignored.
    pub fn mark_done(&mut self, offset: i64) {
        let Some(i) = self.index_of(offset) else {
            return;
        };
        if !self.pending[i].1 {
            self.pending[i].1 = true;
            self.done_ahead += 1;
            self.max_done = Some(self.max_done.map_or(offset, |m| m.max(offset)));
        }
        while let Some((_, true)) = self.pending.front() {
            self.pending.pop_front();
            self.done_ahead -= 1;
        }
    }

    /// The offset to commit, if any record was seen.
    pub fn watermark(&self) -> Option<i64> {
        match self.pending.front() {
            Some((offset, _)) => Some(*offset),
            None => self.next,
        }
    }

    /// Records tracked and not yet below the watermark.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Records done but held above the watermark by an unfinished one.
    pub fn done_above_watermark(&self) -> usize {
        self.done_ahead
    }

    /// Whether finishing the record at `offset` would move the watermark
    /// towards records already done: a "hole" below a done record.
    pub fn is_hole(&self, offset: i64) -> bool {
        self.done_ahead > 0 && self.max_done.is_some_and(|m| offset < m)
    }

    /// The highest offset marked done, if any.
    pub fn max_done(&self) -> Option<i64> {
        self.max_done
    }

    /// The consumer's position moved past offsets it never handed out (a
    /// transaction's control record): when every tracked record is done,
    /// the watermark may follow it. Returns whether it moved.
    pub fn skip_to(&mut self, position: i64) -> bool {
        if !self.pending.is_empty() || self.next.is_some_and(|n| n >= position) {
            return false;
        }
        self.next = Some(position);
        true
    }

    /// The first offset tracked, if any.
    pub fn first_seen(&self) -> Option<i64> {
        self.first
    }

    /// The highest offset seen, if any.
    pub fn last_seen(&self) -> Option<i64> {
        self.next.map(|n| n - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn watermark_waits_for_the_first_unfinished_record() {
        let mut p = PartitionOffsets::new();
        assert_eq!(p.watermark(), None);
        for o in 5..10 {
            assert!(p.track(o));
        }
        p.mark_done(7);
        p.mark_done(6);
        assert_eq!(p.watermark(), Some(5));
        assert!(p.is_hole(5), "5 holds back the done 6 and 7");
        assert!(!p.is_hole(8), "nothing done above 8");
        p.mark_done(5);
        assert_eq!(p.watermark(), Some(8));
        p.mark_done(9);
        p.mark_done(8);
        assert_eq!(p.watermark(), Some(10));
        assert_eq!(p.outstanding(), 0);
    }

    #[test]
    fn gaps_and_replays() {
        let mut p = PartitionOffsets::new();
        assert!(p.track(10));
        assert!(p.track(13));
        assert!(!p.track(12), "a lower offset is a replay");
        p.mark_done(13);
        assert_eq!(p.watermark(), Some(10));
        p.mark_done(10);
        assert_eq!(p.watermark(), Some(14));
        p.mark_done(999);
        assert_eq!(p.watermark(), Some(14));
    }

    #[test]
    fn the_watermark_follows_the_position_past_control_records_once_all_is_done() {
        let mut p = PartitionOffsets::new();
        p.track(0);
        p.track(1);
        p.mark_done(0);
        assert!(!p.skip_to(3), "record 1 is not done");
        p.mark_done(1);
        assert_eq!(p.watermark(), Some(2));
        assert!(p.skip_to(3));
        assert_eq!(p.watermark(), Some(3));
        assert!(!p.skip_to(2), "never backwards");
        assert!(p.track(3), "the next record follows");
    }

    proptest! {
        /// For any completion order the watermark never passes an unfinished
        /// record, and reaches one past the end once all are done.
        #[test]
        fn never_passes_unfinished_and_reaches_the_end(
            start in 0i64..1_000_000,
            gaps in proptest::collection::vec(1i64..4, 1..200),
            order_seed in proptest::collection::vec(any::<usize>(), 200),
        ) {
            let mut offsets = Vec::new();
            let mut o = start;
            for g in &gaps {
                offsets.push(o);
                o += g;
            }
            let mut p = PartitionOffsets::new();
            for &o in &offsets {
                prop_assert!(p.track(o));
            }
            let mut remaining = offsets.clone();
            let mut done = std::collections::BTreeSet::new();
            let mut i = 0;
            while !remaining.is_empty() {
                let pick = order_seed[i % order_seed.len()] % remaining.len();
                i += 1;
                let offset = remaining.swap_remove(pick);
                p.mark_done(offset);
                done.insert(offset);
                let wm = p.watermark().unwrap();
                for &o in &offsets {
                    if o < wm {
                        prop_assert!(done.contains(&o), "watermark {} passed unfinished {}", wm, o);
                    }
                }
            }
            prop_assert_eq!(p.watermark(), Some(offsets.last().unwrap() + 1));
            prop_assert_eq!(p.done_above_watermark(), 0);
        }
    }
}
