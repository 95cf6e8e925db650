//! No scale-up into an outage.
//!
//! When the handler's downstream is down, the workers commit nothing: their
//! circuit is open, their capacity reports go stale, and the lag grows by
//! every arrival. A policy that reads only the lag asks for more replicas,
//! each of which probes the recovering downstream and none of which helps.
//! [`ProgressWatch`] tells that moment from a real shortage: replicas run,
//! records wait, and no partition's committed offset has moved for
//! [`NO_PROGRESS_HOLD_AFTER`]. While that holds, the policy may keep or
//! lower the count (down to what ran when the hold began), never raise it.
//! One partition moving is progress: a stuck partition beside healthy ones
//! is not an outage.
//!
//! Before the hold, in an outage's first seconds, a scale-up waits for a
//! committed offset to move: when the last reading already found records
//! waiting and no offset has moved since, the lag grew by arrivals alone,
//! which says nothing of what another replica would add
//! ([`ProgressWatch::quiet`]). A burst on an idle group is not delayed (the
//! reading before it found nothing waiting); a healthy group's scale-ups
//! wait at most until its next commit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::lag::GroupLag;

/// Replicas run, records wait, and no committed offset moved for this
/// long: the workers are held up by something more replicas cannot fix.
/// A worker commits once a second while it finishes anything (the default
/// `--commit-interval-ms`), so five missed commits are no accident; short,
/// because every second of an outage grows the lag a policy scales on.
/// A handler whose every batch takes longer sees its scale-ups delayed to
/// the readings just after its commits, never refused.
pub const NO_PROGRESS_HOLD_AFTER: Duration = Duration::from_secs(5);

/// A partition with records waiting whose committed offset has not moved
/// for this long, while others' did, is stuck (a record retried, a lane
/// blocked): replicas cannot speed it up, so its backlog asks for none (as
/// KEDA's `excludePersistentLag`).
pub const STUCK_AFTER: Duration = Duration::from_secs(10);

/// A hold on scale-ups in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    /// How long readings have found records waiting and no committed
    /// offset moving.
    pub stalled_for: Duration,
    /// Replicas running when the hold began: the count while it lasts. Not
    /// more (each would only probe the failing downstream), not fewer
    /// (they drain the backlog once it answers).
    pub floor: u32,
}

/// Watches the group's committed offsets for progress.
#[derive(Debug, Default)]
pub struct ProgressWatch {
    committed: HashMap<i32, i64>,
    /// Per partition with records waiting: since which reading its
    /// committed offset has not moved.
    partition_stalled_since: HashMap<i32, Instant>,
    /// Since when nothing can have moved: the last reading that saw a
    /// committed offset move, or the first that found records waiting
    /// after an idle one. `None` while idle or with no replica.
    stalled_since: Option<Instant>,
    hold_floor: Option<u32>,
    /// The last reading found records waiting.
    waiting: bool,
    /// See [`Self::quiet`].
    quiet: bool,
}

impl ProgressWatch {
    /// Partitions stuck at the last reading (see [`STUCK_AFTER`]), in
    /// order; none while the whole group is held (that is an outage, not
    /// a stuck partition).
    pub fn stuck(&self, now: Instant) -> Vec<i32> {
        if self.hold_floor.is_some() {
            return Vec::new();
        }
        let mut stuck: Vec<i32> = self
            .partition_stalled_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= STUCK_AFTER)
            .map(|(p, _)| *p)
            .collect();
        stuck.sort_unstable();
        stuck
    }

    /// At the last reading: replicas ran, records waited at it and at the
    /// one before, and no committed offset moved in between. A scale-up
    /// then waits (see the module docs).
    pub fn quiet(&self) -> bool {
        self.quiet
    }

    /// Takes one reading; `Some` while scale-ups are held.
    pub fn observe(&mut self, now: Instant, lag: &GroupLag, current: u32) -> Option<Hold> {
        let waited_before = std::mem::replace(&mut self.waiting, lag.total_lag > 0);
        let mut moved = false;
        for p in &lag.partitions {
            let mut this_moved = false;
            if let Some(c) = p.committed {
                let seen = self.committed.insert(p.partition, c);
                // A first commit is progress; a reset backwards is not. A
                // share group's position is known within a slack: it moved
                // only if even its lowest reading passes the last one.
                let lowest = c.saturating_sub(p.committed_slack);
                this_moved = seen.is_none_or(|before| lowest > before);
            }
            moved |= this_moved;
            if this_moved || p.lag <= 0 {
                self.partition_stalled_since.remove(&p.partition);
            } else {
                self.partition_stalled_since
                    .entry(p.partition)
                    .or_insert(now);
            }
        }
        self.quiet = waited_before && lag.total_lag > 0 && !moved && current > 0;
        let present: std::collections::HashSet<i32> =
            lag.partitions.iter().map(|p| p.partition).collect();
        self.partition_stalled_since
            .retain(|p, _| present.contains(p));
        // Nothing waiting, or nobody to make progress: no outage to see.
        // After an idle reading the clock starts at the next one that finds
        // records waiting: a burst that lands between two readings has had
        // no time to be worked on. No replica seen during a hold is no news
        // (every worker crashed, or the count could not be read): the hold
        // stays, and with it the count to return to.
        let holding = self.hold_floor.is_some();
        if lag.total_lag <= 0 || (current == 0 && !holding) {
            self.stalled_since = None;
            self.hold_floor = None;
            return None;
        }
        if moved {
            self.stalled_since = Some(now);
            self.hold_floor = None;
            return None;
        }
        let stalled_for = now.saturating_duration_since(*self.stalled_since.get_or_insert(now));
        if stalled_for < NO_PROGRESS_HOLD_AFTER {
            return None;
        }
        let floor = *self.hold_floor.get_or_insert(current);
        Some(Hold { stalled_for, floor })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lag::{InvalidOffsetPolicy, PartitionLag};

    fn lag(parts: &[(Option<i64>, i64)]) -> GroupLag {
        GroupLag::new(
            "g",
            "t",
            parts
                .iter()
                .enumerate()
                .map(|(i, (c, h))| {
                    PartitionLag::compute(i as i32, *c, 0, *h, InvalidOffsetPolicy::Earliest)
                })
                .collect(),
        )
    }

    #[test]
    fn no_committed_offset_moving_for_the_hold_time_holds_scale_ups() {
        let mut w = ProgressWatch::default();
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        // The first reading finds a first commit: progress.
        assert_eq!(w.observe(at(1), &lag(&[(Some(10), 100)]), 3), None);
        assert_eq!(w.observe(at(5), &lag(&[(Some(10), 900)]), 3), None);
        let hold = w.observe(at(6), &lag(&[(Some(10), 1000)]), 3).unwrap();
        assert_eq!(hold.floor, 3);
        assert_eq!(hold.stalled_for, Duration::from_secs(5));
        // The floor is what ran when the hold began, whatever runs since:
        // a crashed replica, more members than pods, none seen at all.
        for (s, seen) in [(20, 2), (25, 4), (30, 0), (35, 1)] {
            let hold = w.observe(at(s), &lag(&[(Some(10), 1500)]), seen);
            assert_eq!(hold.map(|h| h.floor), Some(3), "{seen} seen");
        }
        // One commit ends it.
        assert_eq!(w.observe(at(26), &lag(&[(Some(11), 1500)]), 3), None);
    }

    #[test]
    fn one_partition_moving_is_progress_and_idle_or_empty_groups_are_no_outage() {
        let mut w = ProgressWatch::default();
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        w.observe(at(0), &lag(&[(Some(0), 100), (Some(0), 100)]), 2);
        for s in 1..60u64 {
            // Partition 0 stuck, partition 1 moving.
            let high = 100 + s as i64;
            let l = lag(&[(Some(0), high), (Some(s as i64), high)]);
            assert_eq!(w.observe(at(s), &l, 2), None, "second {s}");
        }
        // Nothing waiting: no hold however long nothing moves.
        for s in 60..120 {
            assert_eq!(w.observe(at(s), &lag(&[(Some(59), 59)]), 2), None);
        }
        // No replica running: the first one must be started.
        for s in 120..180 {
            assert_eq!(w.observe(at(s), &lag(&[(Some(59), 500)]), 0), None);
        }
        // A first commit on a partition is progress; a reset backwards is not.
        let mut w = ProgressWatch::default();
        w.observe(at(0), &lag(&[(None, 100)]), 1);
        assert_eq!(w.observe(at(20), &lag(&[(Some(5), 100)]), 1), None);
        assert_eq!(w.observe(at(24), &lag(&[(Some(0), 100)]), 1), None);
        assert!(w.observe(at(25), &lag(&[(Some(0), 100)]), 1).is_some());
        // Records landing after an idle reading had no time to be worked on.
        let mut w = ProgressWatch::default();
        w.observe(at(0), &lag(&[(Some(0), 0)]), 1);
        assert_eq!(w.observe(at(15), &lag(&[(Some(0), 30_000)]), 1), None);
        assert_eq!(w.observe(at(19), &lag(&[(Some(0), 30_000)]), 1), None);
        assert!(w.observe(at(20), &lag(&[(Some(0), 30_000)]), 1).is_some());
    }

    #[test]
    fn a_partition_that_stops_while_others_move_is_stuck() {
        let mut w = ProgressWatch::default();
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        for s in 0..=25u64 {
            let moving = 100 + s as i64;
            // Partition 0 stuck with lag from the start; partition 1 moves;
            // partition 2 has nothing waiting.
            let l = lag(&[(Some(5), 900), (Some(moving), moving + 10), (Some(50), 50)]);
            assert_eq!(w.observe(at(s), &l, 2), None);
            // Its first reading is its first commit (progress): 10 s from the next.
            let expected: Vec<i32> = if s >= 11 { vec![0] } else { vec![] };
            assert_eq!(w.stuck(at(s)), expected, "second {s}");
        }
        // It moves: no longer stuck.
        let l = lag(&[(Some(6), 900), (Some(200), 210), (Some(50), 50)]);
        w.observe(at(26), &l, 2);
        assert!(w.stuck(at(26)).is_empty());
    }
}
