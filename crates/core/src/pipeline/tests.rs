//! The pipeline's edges, one event at a time, on a clock the test sets.

use super::*;
use crate::batch::Header;
use crate::config::BatchLimits;
use crate::config::WorkerConfig;
use crate::health::HealthScope;
use crate::telemetry::{StatsExporter, Telemetry};
use microbatch_kafka::KafkaConfig;

struct Rec(i32, i64);

impl ConsumedRecord for Rec {
    fn partition(&self) -> i32 {
        self.0
    }
    fn offset(&self) -> i64 {
        self.1
    }
    fn timestamp_ms(&self) -> Option<i64> {
        Some(1_000)
    }
    fn key(&self) -> Option<&[u8]> {
        Some(b"k")
    }
    fn payload(&self) -> Option<&[u8]> {
        Some(b"v")
    }
    fn headers(&self) -> Vec<Header> {
        Vec::new()
    }
}

fn pipeline(t0: Instant) -> Pipeline {
    pipeline_with(t0, |_| {})
}

/// [`pipeline`] with `change` made to its config first.
fn pipeline_with(t0: Instant, change: impl FnOnce(&mut WorkerConfig)) -> Pipeline {
    let mut c = WorkerConfig::new(KafkaConfig::plaintext("t:9092"), "t", "g");
    c.batch = BatchLimits::new(2, 1 << 20, Duration::from_millis(10)).unwrap();
    c.ordering = Ordering::Partition;
    c.drain_timeout = Duration::from_secs(10);
    c.retry.max_attempts = 1;
    change(&mut c);
    with_config(c, t0)
}

/// A pipeline with dead letters on and no partition assigned yet.
fn with_config(c: WorkerConfig, t0: Instant) -> Pipeline {
    let options = Options {
        dead_letters: true,
        audit: false,
        keep_headers: false,
        seed: 1,
        acknowledgement: Acknowledgement::Watermark,
        scope_successes: true,
    };
    Pipeline::new(c.pipeline(), options, "w".into(), t0, 0)
}

/// The pipeline's numbers as the worker exports them.
fn exported(p: &Pipeline) -> Telemetry {
    let telemetry = Telemetry::default();
    StatsExporter::default().export(&p.stats(), "t", &telemetry);
    telemetry
}

/// Partition 0 assigned, records 0 and 1 taken in, their batch started.
fn with_one_batch(t0: Instant) -> Pipeline {
    let mut p = pipeline(t0);
    p.handle_assign(&[0]);
    p.handle_record(&Rec(0, 0), t0);
    p.handle_record(&Rec(0, 1), t0);
    p.handle_tick(t0);
    p
}

/// The intents the pipeline has; a look at the dead-letter topic is
/// answered at once, with nothing found.
fn intents(p: &mut Pipeline) -> Vec<Intent> {
    let mut out = Vec::new();
    while let Some(intent) = p.poll_intent() {
        match intent {
            Intent::FindDeadLetters { partition, epoch } => {
                p.handle_earlier_dead_letters(partition, epoch, &[])
            }
            other => out.push(other),
        }
    }
    out
}

/// The offsets of the commits asked for, in order.
fn commits(p: &mut Pipeline) -> Vec<(i32, i64)> {
    intents(p)
        .into_iter()
        .filter_map(|i| match i {
            Intent::Commit { offsets, .. } => Some(offsets),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The dead letter the pipeline asks to write now.
fn dead_letter_slot(p: &mut Pipeline) -> DeadLetterSlot {
    intents(p)
        .into_iter()
        .find_map(|i| match i {
            Intent::DeadLetter { slot, .. } => Some(slot),
            _ => None,
        })
        .expect("a dead letter to write")
}

fn starts(p: &mut Pipeline) -> Vec<(Slot, Batch)> {
    intents(p)
        .into_iter()
        .filter_map(|i| match i {
            Intent::Start { slot, batch } => Some((slot, batch)),
            _ => None,
        })
        .collect()
}

/// A final commit the broker refused (the group rebalancing as another
/// worker stops) is asked for again until it is acknowledged, and not
/// past the drain deadline; any other refusal ends the pipeline's life.
#[test]
fn a_refused_final_commit_is_retried_until_acknowledged_or_the_deadline() {
    let closed = |t0| {
        let mut p = with_one_batch(t0);
        let (slot, batch) = starts(&mut p).pop().unwrap();
        p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
        p.shutdown(t0);
        assert!(p.drained(t0));
        p.close();
        assert_eq!(commits(&mut p), vec![(0, 2)]);
        p
    };
    let t0 = Instant::now();
    let mut p = closed(t0);
    assert!(
        p.finished(t0),
        "no refusal yet: the sync commit was answered"
    );
    p.handle_commit_refused(CommitRefusal::GroupBusy, true, t0);
    assert!(!p.finished(t0), "a retry waits");
    p.handle_commit_refused(CommitRefusal::Other, false, t0);
    assert!(
        !p.finished(t0),
        "a late answer to an interval's commit does not cancel the retry"
    );
    assert_eq!(p.poll_timeout(), t0 + FINAL_COMMIT_RETRY);
    p.handle_tick(t0 + FINAL_COMMIT_RETRY / 2);
    assert_eq!(commits(&mut p), vec![], "not before its time");
    let t1 = t0 + FINAL_COMMIT_RETRY;
    p.handle_tick(t1);
    assert_eq!(commits(&mut p), vec![(0, 2)], "asked for again");
    p.handle_commit_refused(CommitRefusal::GroupBusy, true, t1);
    p.handle_tick(t1 + FINAL_COMMIT_RETRY);
    assert_eq!(commits(&mut p), vec![(0, 2)], "and again");
    p.handle_committed(0, 2);
    assert!(p.finished(t1 + FINAL_COMMIT_RETRY), "acknowledged: done");
    p.handle_tick(t1 + FINAL_COMMIT_RETRY * 3);
    assert_eq!(commits(&mut p), vec![], "nothing left to commit");

    let mut p = closed(t0);
    p.handle_commit_refused(CommitRefusal::Other, true, t0);
    assert!(p.finished(t0), "only a busy group is waited out");

    let mut p = closed(t0);
    let late = t0 + Duration::from_millis(9_950);
    p.handle_commit_refused(CommitRefusal::GroupBusy, true, late);
    assert!(!p.finished(late));
    let deadline = t0 + Duration::from_secs(10);
    assert!(p.finished(deadline), "the drain deadline ends the tries");
    p.handle_tick(late + FINAL_COMMIT_RETRY);
    assert_eq!(commits(&mut p), vec![], "no commit past the deadline");
}

#[test]
fn readiness_forgets_an_open_circuit_when_nothing_waits_on_it() {
    let t0 = Instant::now();
    let mut p = pipeline(t0);
    p.handle_assign(&[0, 1]);
    // Whole batches rejected for good on two partitions: the circuit
    // opens, bisection dead-letters every record, and then nothing is
    // held. An open circuit would keep /readyz at 503 until the next
    // success, which an idle topic never brings.
    for o in 0..6 {
        p.handle_record(&Rec(0, o), t0);
        p.handle_record(&Rec(1, o), t0);
    }
    let mut now = t0;
    let mut opened = false;
    for _ in 0..200 {
        now += Duration::from_millis(50);
        p.handle_tick(now);
        opened |= p.circuit_open();
        let pending = intents(&mut p);
        if pending.is_empty() && p.in_flight() == 0 && p.held() == 0 {
            break;
        }
        for intent in pending {
            match intent {
                Intent::Start { slot, batch } => p.handle_verdict(
                    slot,
                    batch,
                    BatchOutcome::Failed(Failure::permanent("rejected")),
                    now,
                ),
                Intent::DeadLetter { slot, batch, .. } => {
                    let written: Vec<i64> = batch.offsets().collect();
                    p.handle_dead_lettered(slot, &written, None, now);
                }
                _ => {}
            }
        }
    }
    assert!(
        opened,
        "five whole failures of two partitions open the circuit"
    );
    assert_eq!(p.held(), 0, "every record dead-lettered");
    p.handle_tick(now + Duration::from_millis(50));
    assert!(
        p.circuit_open(),
        "open until a success: an outage outlives an empty pipeline"
    );
    let circuit_shown = |p: &Pipeline| {
        exported(p)
            .readiness
            .check()
            .is_err_and(|e| e.contains("circuit"))
    };
    assert!(!circuit_shown(&p), "nothing waits on the downstream");
    // A new record that waits on the open circuit makes it show again.
    p.handle_record(&Rec(0, 6), now);
    p.handle_tick(now + Duration::from_millis(100));
    assert!(circuit_shown(&p), "a record waits on the open circuit");
}

#[test]
fn the_bytes_cap_stops_taking_records_and_one_is_always_taken() {
    let t0 = Instant::now();
    // Each test record is two bytes (key "k", value "v").
    let mut p = pipeline_with(t0, |c| c.max_held_bytes = 3);
    p.handle_assign(&[0]);
    assert!(!p.is_full(), "one record is always taken");
    p.handle_record(&Rec(0, 0), t0);
    assert!(!p.is_full());
    p.handle_record(&Rec(0, 1), t0);
    assert_eq!(p.held_bytes(), 4);
    assert!(p.is_full(), "4 bytes held, the cap is 3");
    p.handle_tick(t0);
    let (slot, batch) = starts(&mut p).pop().expect("the batch starts");
    p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
    assert_eq!(p.held_bytes(), 0);
    assert!(!p.is_full());
}

#[test]
fn a_partition_of_large_records_is_paused_before_it_fills_the_worker() {
    let t0 = Instant::now();
    let mut p = pipeline_with(t0, |c| c.max_held_bytes = 8);
    p.handle_assign(&[0, 1]);
    // Partition 0's records (2 bytes each) wait, say for a proof of
    // health that only another partition's success can bring.
    p.handle_record(&Rec(0, 0), t0);
    p.handle_record(&Rec(0, 1), t0);
    p.handle_tick(t0);
    assert!(
        intents(&mut p)
            .iter()
            .any(|i| matches!(i, Intent::Pause(ps) if ps == &vec![0])),
        "partition 0 holds half the worker's bytes: paused"
    );
    assert!(!p.is_full(), "the other partitions still come in");
    p.handle_record(&Rec(1, 0), t0);
    assert_eq!(p.held_by(1), 1);
}

#[test]
fn a_lost_partition_is_dropped_at_once_and_never_committed() {
    let t0 = Instant::now();
    let mut p = with_one_batch(t0);
    let (slot, batch) = starts(&mut p).pop().expect("a batch started");
    p.handle_lost(&[0]);
    assert_eq!(p.assigned().count(), 0, "forgotten at once, not drained");
    assert_eq!(p.held(), 0);
    // Its batch finishes after the loss, and records fetched before the
    // loss arrive late: none of it may start work or commit.
    p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
    p.handle_record(&Rec(0, 2), t0);
    let later = t0 + Duration::from_secs(5);
    p.handle_tick(later);
    let after = intents(&mut p);
    assert!(
        !after
            .iter()
            .any(|i| matches!(i, Intent::Commit { .. } | Intent::Start { .. })),
        "{after:?}"
    );
    assert!(p.revoke_settled(later), "nothing left to wait for");
}

#[test]
fn sigterm_during_a_revoke_takes_one_drain_deadline() {
    let t0 = Instant::now();
    let mut p = with_one_batch(t0);
    assert_eq!(starts(&mut p).len(), 1);
    assert!(p.begin_revoke(&[0], t0));
    // SIGTERM 8 s into the revoke: the deadline stays 10 s after it at
    // most, not 10 s for the revoke and 10 more for the shutdown.
    let signal = t0 + Duration::from_secs(8);
    p.shutdown(signal);
    assert!(!p.revoke_settled(t0 + Duration::from_secs(9)));
    assert!(p.revoke_settled(t0 + Duration::from_secs(10)));
    let Phase::Draining { deadline } = p.phase() else {
        panic!("draining");
    };
    assert_eq!(deadline, signal + Duration::from_secs(10));
}

#[test]
fn a_revoke_waits_for_dead_letters_being_written() {
    let t0 = Instant::now();
    let mut p = with_one_batch(t0);
    let (slot, batch) = starts(&mut p).pop().unwrap();
    p.handle_verdict(
        slot,
        batch,
        BatchOutcome::Partial(vec![(0, Failure::permanent("bad"))]),
        t0,
    );
    let dead = dead_letter_slot(&mut p);
    assert!(p.begin_revoke(&[0], t0));
    assert!(
        !p.revoke_settled(t0),
        "the dead letter is still being written"
    );
    p.handle_dead_lettered(dead, &[0], None, t0);
    assert!(p.revoke_settled(t0));
    p.complete_revoke();
    let committed: Vec<(i32, i64)> = intents(&mut p)
        .into_iter()
        .filter_map(|i| match i {
            Intent::Commit {
                offsets,
                sync: true,
                ..
            } => Some(offsets),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(
        committed,
        [(0, 2)],
        "both records done, the commit passes them"
    );
}

#[test]
fn a_batch_abandoned_at_the_revoke_deadline_blocks_its_lane_when_the_partition_returns() {
    let t0 = Instant::now();
    let mut p = with_one_batch(t0);
    let (old_slot, old_batch) = starts(&mut p).pop().unwrap();
    assert!(p.begin_revoke(&[0], t0));
    let late = t0 + Duration::from_secs(11);
    assert!(p.revoke_settled(late), "the deadline passed");
    p.complete_revoke();
    p.handle_assign(&[0]);
    p.handle_record(&Rec(0, 0), late);
    p.handle_record(&Rec(0, 1), late);
    p.handle_tick(late);
    assert!(starts(&mut p).is_empty(), "the abandoned batch still runs");
    p.handle_verdict(old_slot, old_batch, BatchOutcome::Success, late);
    p.handle_tick(late);
    assert_eq!(starts(&mut p).len(), 1, "its lane is free again");
}

#[test]
fn lag_in_seconds_is_the_age_of_the_oldest_record_not_done() {
    let t0 = Instant::now();
    let mut c = WorkerConfig::new(KafkaConfig::plaintext("t:9092"), "t", "g");
    c.batch = BatchLimits::new(1, 1 << 20, Duration::from_millis(10)).unwrap();
    c.commit_interval = Duration::from_secs(1);
    let options = Options {
        dead_letters: true,
        audit: false,
        keep_headers: false,
        seed: 1,
        acknowledgement: Acknowledgement::Watermark,
        scope_successes: true,
    };
    // The wall clock reads 31 s when the record stamped 1 s arrives.
    let mut p = Pipeline::new(c.pipeline(), options, "w".into(), t0, 31_000);
    p.handle_assign(&[0]);
    p.handle_record(&Rec(0, 0), t0);
    p.handle_tick(t0 + Duration::from_secs(1));
    let age = |p: &Pipeline| {
        exported(p)
            .metrics
            .partition_lag_seconds
            .get_or_create(&crate::telemetry::PartitionLabel {
                topic: "t".into(),
                partition: 0,
            })
            .get()
    };
    assert_eq!(age(&p), 31.0, "32 s on the wall clock minus 1 s");
    let (slot, batch) = starts(&mut p).pop().unwrap();
    p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
    p.handle_tick(t0 + Duration::from_secs(2));
    assert_eq!(age(&p), 0.0, "nothing held");
}

#[test]
fn offsets_that_go_backwards_restart_the_partition() {
    let t0 = Instant::now();
    let mut p = pipeline(t0);
    p.handle_assign(&[0]);
    for o in [10, 11] {
        p.handle_record(&Rec(0, o), t0);
    }
    p.handle_tick(t0);
    let (old_slot, old_batch) = starts(&mut p).pop().unwrap();
    // A reset to earliest after truncation: offset 3 comes next.
    p.handle_record(&Rec(0, 3), t0);
    p.handle_record(&Rec(0, 4), t0);
    assert_eq!(p.watermark(0), Some(3), "tracked again from the new offset");
    // The batch of the old offsets ends: it counts for nothing now, and
    // frees its lane.
    p.handle_verdict(old_slot, old_batch, BatchOutcome::Success, t0);
    assert_eq!(p.watermark(0), Some(3));
    p.handle_tick(t0);
    let (slot, batch) = starts(&mut p).pop().expect("the new records start");
    assert_eq!(batch.offsets().collect::<Vec<_>>(), [3, 4]);
    p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
    assert_eq!(p.watermark(0), Some(5));
}

/// A record whose key the test chooses.
struct Keyed(i64, &'static [u8]);

impl ConsumedRecord for Keyed {
    fn partition(&self) -> i32 {
        0
    }
    fn offset(&self) -> i64 {
        self.0
    }
    fn timestamp_ms(&self) -> Option<i64> {
        Some(1_000)
    }
    fn key(&self) -> Option<&[u8]> {
        Some(self.1)
    }
    fn payload(&self) -> Option<&[u8]> {
        Some(b"v")
    }
    fn headers(&self) -> Vec<Header> {
        Vec::new()
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Key order, two lanes, one record a batch; partition 0 assigned.
/// Returns it with two keys that land in different lanes.
fn two_lanes(
    t0: Instant,
    tweak: impl FnOnce(&mut WorkerConfig),
) -> (Pipeline, &'static [u8], &'static [u8]) {
    let mut c = WorkerConfig::new(KafkaConfig::plaintext("t:9092"), "t", "g");
    c.batch = BatchLimits::new(1, 1 << 20, Duration::from_millis(10)).unwrap();
    c.ordering = Ordering::Key;
    c.concurrency = 2;
    tweak(&mut c);
    let mut p = with_config(c, t0);
    p.handle_assign(&[0]);
    let a: &'static [u8] = b"a";
    let lane = |k: &[u8]| p.partitions[&0].lane_for(Ordering::Key, Some(k), 0);
    let b: &'static [u8] = [b"b", b"c", b"d", b"e"]
        .into_iter()
        .find(|k| lane(&k[..]) != lane(a))
        .expect("a key in the other lane");
    (p, a, b)
}

#[test]
fn a_free_slot_takes_the_lane_holding_the_oldest_record() {
    let t0 = Instant::now();
    let (mut p, a, b) = two_lanes(t0, |_| {});
    // Name the keys by lane: `first` lands in lane 0, `second` in lane 1.
    let lane_of_a = p.partitions[&0].lane_for(Ordering::Key, Some(a), 0);
    let (first, second) = if lane_of_a == 0 { (a, b) } else { (b, a) };
    p.handle_assign(&[1]);
    // Partition 1 holds one of the two slots.
    p.handle_record(&Rec(1, 0), t0);
    p.handle_tick(t0);
    assert_eq!(starts(&mut p).len(), 1);
    // Partition 0: its oldest record waits in lane 1, a newer one in lane 0.
    p.handle_record(&Keyed(0, second), t0);
    p.handle_record(&Keyed(1, first), t0);
    p.handle_tick(t0);
    let started = starts(&mut p);
    assert_eq!(started.len(), 1, "one slot was free");
    assert_eq!(
        started[0].1.offsets().collect::<Vec<_>>(),
        [0],
        "the lane whose record holds the commit back goes first"
    );
}

#[test]
fn finished_work_the_broker_has_not_acknowledged_stops_new_batches_until_it_has() {
    let t0 = Instant::now();
    let mut p = with_one_batch(t0);
    let limit = p.config.uncommitted_limit().expect("a limit by default");
    assert_eq!(limit, p.config.commit_interval * 3 / 2);
    let (slot, batch) = starts(&mut p).pop().unwrap();
    p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
    // The commit goes out after one interval; the broker never answers
    // (a rebalance that waits for a dead member, a broker restart).
    p.handle_tick(t0 + p.config.commit_interval);
    assert!(intents(&mut p)
        .iter()
        .any(|i| matches!(i, Intent::Commit { .. })));
    let late = t0 + limit + secs(0.01);
    p.handle_record(&Rec(0, 2), late);
    p.handle_record(&Rec(0, 3), late);
    p.handle_tick(late);
    assert!(
        starts(&mut p).is_empty(),
        "no new work while a crash would replay more than the limit"
    );
    assert_eq!(exported(&p).metrics.partitions_waiting_for_commit.get(), 1);
    p.handle_committed(0, 2);
    p.handle_tick(late);
    let (_, batch) = starts(&mut p).pop().expect("acknowledged: work goes on");
    assert_eq!(batch.offsets().collect::<Vec<_>>(), [2, 3]);
    assert_eq!(exported(&p).metrics.partitions_waiting_for_commit.get(), 0);
}

#[test]
fn an_older_commit_acknowledged_after_a_newer_one_is_committed_again() {
    // After the coordinator was down, librdkafka can send a retried older
    // commit after a newer one: the broker then holds the older offset,
    // and a worker that kept the highest acknowledgement never commits
    // again while idle, so the partition's lag never reaches 0.
    let t0 = Instant::now();
    let mut p = pipeline(t0);
    p.handle_assign(&[0]);
    let mut now = t0;
    let mut committed = Vec::new();
    for o in [0, 2] {
        p.handle_record(&Rec(0, o), now);
        p.handle_record(&Rec(0, o + 1), now);
        p.handle_tick(now);
        for (slot, batch) in starts(&mut p) {
            p.handle_verdict(slot, batch, BatchOutcome::Success, now);
        }
        now += p.config.commit_interval;
        p.handle_tick(now);
        committed.extend(commits(&mut p));
    }
    assert_eq!(committed.last(), Some(&(0, 4)), "{committed:?}");
    p.handle_committed(0, 4);
    p.handle_committed(0, 2);
    now += p.config.commit_interval;
    p.handle_tick(now);
    let again = commits(&mut p);
    assert_eq!(again, [(0, 4)], "the broker holds 2: commit 4 again");
    p.handle_committed(0, 4);
    now += p.config.commit_interval;
    p.handle_tick(now);
    assert!(
        commits(&mut p).is_empty(),
        "acknowledged in order: nothing more to commit"
    );
}

#[test]
fn commits_acknowledged_every_interval_never_stop_work() {
    let t0 = Instant::now();
    let mut p = pipeline(t0);
    p.handle_assign(&[0]);
    let step = secs(0.05);
    let mut now = t0;
    let mut offset = 0;
    let mut pending_ack = None;
    for _ in 0..200 {
        p.handle_record(&Rec(0, offset), now);
        p.handle_record(&Rec(0, offset + 1), now);
        offset += 2;
        p.handle_tick(now);
        let mut started = false;
        for intent in intents(&mut p) {
            match intent {
                Intent::Start { slot, batch } => {
                    started = true;
                    p.handle_verdict(slot, batch, BatchOutcome::Success, now);
                }
                Intent::Commit { offsets, .. } => pending_ack = Some(offsets),
                _ => {}
            }
        }
        assert!(started, "a batch starts at every step");
        now += step;
        // Each commit is acknowledged one step after it was sent.
        if let Some(offsets) = pending_ack.take() {
            for (partition, o) in offsets {
                p.handle_committed(partition, o);
            }
        }
    }
}

#[test]
fn records_held_back_by_a_retry_stop_new_batches_of_other_keys_but_not_the_retry() {
    let t0 = Instant::now();
    let (mut p, a, b) = two_lanes(t0, |c| {
        c.retry.initial = secs(5.0);
        c.retry.max = secs(5.0);
    });
    p.handle_record(&Keyed(0, a), t0);
    p.handle_record(&Keyed(1, b), t0);
    p.handle_tick(t0);
    let mut started = starts(&mut p);
    assert_eq!(started.len(), 2);
    started.sort_by_key(|(_, b)| b.first_offset());
    let (slot_b, batch_b) = started.pop().unwrap();
    let (slot_a, batch_a) = started.pop().unwrap();
    p.handle_verdict(
        slot_a,
        batch_a,
        BatchOutcome::Failed(Failure::retryable("busy")),
        t0,
    );
    p.handle_verdict(slot_b, batch_b, BatchOutcome::Success, t0);
    // Key b goes on while offset 1 has waited less than the limit.
    let soon = t0 + secs(0.5);
    p.handle_record(&Keyed(2, b), soon);
    p.handle_tick(soon);
    let (slot, batch) = starts(&mut p).pop().expect("key b goes on");
    p.handle_verdict(slot, batch, BatchOutcome::Success, soon);
    // Past the limit, key b waits for the retry of offset 0.
    let late = t0 + p.config.uncommitted_limit().unwrap() + secs(0.01);
    p.handle_record(&Keyed(3, b), late);
    p.handle_tick(late);
    assert!(
        starts(&mut p).is_empty(),
        "offsets 1 and 2 wait uncommitted"
    );
    let due = t0 + secs(5.0);
    p.handle_tick(due);
    let (slot, batch) = starts(&mut p).pop().expect("the retry still starts");
    assert_eq!(batch.offsets().collect::<Vec<_>>(), [0]);
    p.handle_verdict(slot, batch, BatchOutcome::Success, due);
    assert_eq!(p.watermark(0), Some(3));
    p.handle_tick(due);
    let (_, batch) = starts(&mut p)
        .pop()
        .expect("the commit may move: key b goes on");
    assert_eq!(batch.offsets().collect::<Vec<_>>(), [3]);
}

#[test]
fn a_revoke_fills_holes_while_the_broker_refuses_commits() {
    // A rebalance refuses commits (IllegalGeneration) past the limit,
    // and the revoked partition has a hole below done records: the
    // revoke must fill it rather than wait for its deadline and replay.
    let t0 = Instant::now();
    let mut c = WorkerConfig::new(KafkaConfig::plaintext("t:9092"), "t", "g");
    c.batch = BatchLimits::new(1, 1 << 20, Duration::from_millis(10)).unwrap();
    c.ordering = Ordering::None;
    c.concurrency = 2;
    let mut p = with_config(c, t0);
    p.handle_assign(&[0]);
    for o in 0..5 {
        p.handle_record(&Rec(0, o), t0);
    }
    p.handle_tick(t0);
    // Offsets 1 and 4 run long, one per slot: 3 waits for a free slot.
    let mut slow = None;
    let mut slow_too = None;
    let mut pending: VecDeque<(Slot, Batch)> = starts(&mut p).into();
    while let Some((slot, batch)) = pending.pop_front() {
        match batch.first_offset() {
            Some(1) => slow = Some((slot, batch)),
            Some(4) => slow_too = Some((slot, batch)),
            _ => {
                p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
                p.handle_tick(t0);
                pending.extend(starts(&mut p));
            }
        }
    }
    assert_eq!(p.watermark(0), Some(1), "offset 1 runs");
    let late = t0 + p.config.uncommitted_limit().unwrap() + secs(0.01);
    p.handle_tick(late);
    assert!(intents(&mut p)
        .iter()
        .any(|i| matches!(i, Intent::Commit { .. })));
    // 4 ends; the commit is overdue, so 3 does not start in the free slot.
    let (slot4, batch4) = slow_too.expect("offset 4 in flight");
    p.handle_verdict(slot4, batch4, BatchOutcome::Success, late);
    p.handle_tick(late);
    assert!(starts(&mut p).is_empty(), "{}", p.debug_state(late));
    // The commit is never acknowledged; the revoke begins.
    assert!(p.begin_revoke(&[0], late));
    let (slot, batch) = slow.expect("offset 1 in flight");
    p.handle_verdict(slot, batch, BatchOutcome::Success, late);
    let hole = p.watermark(0).expect("a watermark");
    assert!(
        p.partitions[&0].offsets.is_hole(hole),
        "{hole} below done records"
    );
    p.handle_tick(late);
    let (slot3, batch3) = starts(&mut p)
        .pop()
        .expect("the revoke fills the hole at once");
    assert_eq!(batch3.first_offset(), Some(hole));
    p.handle_verdict(slot3, batch3, BatchOutcome::Success, late);
    assert!(p.revoke_settled(late), "settled long before its deadline");
}

/// Takes `records` in and returns the two batches that start first
/// (one record each, two lanes), in offset order.
fn first_two(
    p: &mut Pipeline,
    t0: Instant,
    records: &[(i64, &'static [u8])],
) -> [(Slot, Batch); 2] {
    for &(o, k) in records {
        p.handle_record(&Keyed(o, k), t0);
    }
    p.handle_tick(t0);
    let mut started = starts(p);
    started.sort_by_key(|(_, b)| b.first_offset());
    started.try_into().expect("two batches start")
}

/// While a revoke waits for a batch still running, a retry in another lane
/// that fills no hole is not started, so it is not a reason to wake either:
/// the poll loop would spin until the revoke ends (found in review).
#[test]
fn a_retry_a_revoke_will_not_start_does_not_wake_the_loop() {
    let t0 = Instant::now();
    let (mut p, a, b) = two_lanes(t0, |c| {
        c.retry.max_attempts = 5;
        c.retry.initial = Duration::from_millis(100);
        c.retry.max = Duration::from_secs(1);
        c.commit_interval = Duration::from_secs(60);
    });
    let [(slot0, batch0), _running] = first_two(&mut p, t0, &[(0, a), (1, b)]);
    p.handle_verdict(
        slot0,
        batch0,
        BatchOutcome::Failed(Failure::retryable("busy")),
        t0,
    );
    assert!(p.begin_revoke(&[0], t0));
    let later = t0 + Duration::from_secs(3);
    p.handle_tick(later);
    assert!(
        starts(&mut p).is_empty(),
        "0 fills no hole: it goes to the next owner"
    );
    assert!(!p.revoke_settled(later), "1 still runs");
    assert!(
        p.poll_timeout() > later,
        "nothing to do before the revoke deadline, yet the loop is woken at once"
    );
}

#[test]
fn a_revoke_fills_the_holes_below_what_was_started_and_no_more() {
    let t0 = Instant::now();
    let (mut p, a, b) = two_lanes(t0, |_| {});
    // Lane a: 0, 2, 4; lane b: 1, 3, 5.
    let [(slot0, batch0), (slot1, batch1)] = first_two(
        &mut p,
        t0,
        &[(0, a), (1, b), (2, a), (3, b), (4, a), (5, b)],
    );
    p.handle_verdict(slot1, batch1, BatchOutcome::Success, t0);
    p.handle_tick(t0);
    let (slot3, batch3) = starts(&mut p).pop().expect("key b goes on");
    assert_eq!(batch3.first_offset(), Some(3));
    // The revoke begins with 0 and 3 in flight: 3 is the highest started.
    assert!(p.begin_revoke(&[0], t0));
    p.handle_verdict(slot3, batch3, BatchOutcome::Success, t0);
    p.handle_verdict(slot0, batch0, BatchOutcome::Success, t0);
    p.handle_tick(t0);
    let (slot2, batch2) = starts(&mut p).pop().expect("2 lies below 3: it is filled");
    assert_eq!(batch2.offsets().collect::<Vec<_>>(), [2]);
    p.handle_verdict(slot2, batch2, BatchOutcome::Success, t0);
    p.handle_tick(t0);
    assert!(
        starts(&mut p).is_empty(),
        "4 and 5 were never started: they go to the next owner"
    );
    assert!(p.revoke_settled(t0));
    assert_eq!(p.watermark(0), Some(4));
}

#[test]
fn a_hole_filled_at_a_revoke_finishes_no_record_above_the_bound() {
    let t0 = Instant::now();
    let (mut p, a, b) = two_lanes(t0, |c| {
        c.batch = BatchLimits::new(2, 1 << 20, Duration::from_millis(10)).unwrap();
    });
    // Lane a: [0, 2], [4, 8]; lane b: [1, 3], [5, 6], [7].
    let [(slot0, batch0), (slot1, batch1)] = first_two(
        &mut p,
        t0,
        &[
            (0, a),
            (1, b),
            (2, a),
            (3, b),
            (4, a),
            (5, b),
            (6, b),
            (7, b),
            (8, a),
        ],
    );
    p.handle_verdict(slot1, batch1, BatchOutcome::Success, t0);
    p.handle_tick(t0);
    let (slot, batch) = starts(&mut p).pop().expect("lane b goes on");
    assert_eq!(batch.offsets().collect::<Vec<_>>(), [5, 6]);
    p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
    // Holes lie below 6, the highest started.
    assert!(p.begin_revoke(&[0], t0));
    p.handle_verdict(slot0, batch0, BatchOutcome::Success, t0);
    p.handle_tick(t0);
    let (slot, batch) = starts(&mut p).pop().expect("4 fills a hole");
    assert_eq!(
        batch.offsets().collect::<Vec<_>>(),
        [4],
        "8 would finish a record above 7, a hole the revoke leaves"
    );
    p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
    p.handle_tick(t0);
    assert!(starts(&mut p).is_empty());
    assert!(p.revoke_settled(t0));
    assert_eq!(p.watermark(0), Some(7));
    assert_eq!(
        p.partitions[&0].offsets.done_above_watermark(),
        0,
        "nothing done is left for the next owner to do again"
    );
}

#[test]
fn a_revoke_fills_holes_for_a_second_at_most() {
    let t0 = Instant::now();
    let (mut p, a, b) = two_lanes(t0, |_| {});
    let [(slot0, batch0), (slot1, batch1)] = first_two(&mut p, t0, &[(0, a), (1, b), (2, a)]);
    p.handle_verdict(slot1, batch1, BatchOutcome::Success, t0);
    assert!(p.begin_revoke(&[0], t0));
    // Offset 0 fails: its retry fills a hole below 1, for a while.
    p.handle_verdict(
        slot0,
        batch0,
        BatchOutcome::Failed(Failure::retryable("busy")),
        t0,
    );
    assert!(
        !p.revoke_settled(t0 + secs(0.5)),
        "the hole is still filled"
    );
    let later = t0 + HOLE_FILL_BUDGET;
    p.handle_tick(later);
    assert!(
        p.revoke_settled(later),
        "past the budget the revoke waits for nothing more"
    );
}

#[test]
fn lanes_finishing_out_of_order_all_the_time_never_stop_work() {
    // Under key order a done record nearly always waits above the
    // watermark; only a watermark that stays put means work is stuck.
    let t0 = Instant::now();
    let (mut p, a, b) = two_lanes(t0, |_| {});
    let mut now = t0;
    let mut slow: Option<(Slot, Batch)> = None;
    for k in 0..40i64 {
        // Key b's record finishes at once, key a's one step later: a done
        // record of b always waits above a's unfinished one.
        p.handle_record(&Keyed(2 * k, a), now);
        p.handle_record(&Keyed(2 * k + 1, b), now);
        p.handle_tick(now);
        let mut fast = None;
        let mut commits = Vec::new();
        for intent in intents(&mut p) {
            match intent {
                Intent::Start { slot, batch } if batch.first_offset() == Some(2 * k + 1) => {
                    fast = Some((slot, batch))
                }
                Intent::Start { slot, batch } => slow = Some((slot, batch)),
                Intent::Commit { offsets, .. } => commits.extend(offsets),
                _ => {}
            }
        }
        let (slot, batch) = fast.unwrap_or_else(|| panic!("step {k}: key b's batch did not start"));
        p.handle_verdict(slot, batch, BatchOutcome::Success, now);
        if k > 0 {
            let (slot, batch) = slow.take().expect("key a's batch in flight");
            p.handle_verdict(slot, batch, BatchOutcome::Success, now);
        }
        p.handle_tick(now);
        for intent in intents(&mut p) {
            match intent {
                Intent::Start { slot, batch } => slow = Some((slot, batch)),
                Intent::Commit { offsets, .. } => commits.extend(offsets),
                _ => {}
            }
        }
        for (partition, offset) in commits {
            p.handle_committed(partition, offset);
        }
        now += secs(0.2);
    }
}

#[test]
fn a_partition_assigned_while_draining_is_not_committed_past_records_it_dropped() {
    let t0 = Instant::now();
    let mut p = with_one_batch(t0);
    let (slot, batch) = starts(&mut p).pop().unwrap();
    p.shutdown(t0);
    // The group gives this member a partition while it drains: the
    // consumer hands out its records, which a draining pipeline drops.
    p.handle_assign(&[1]);
    for o in 0..5 {
        p.handle_record(&Rec(1, o), t0);
    }
    let later = t0 + p.config.commit_interval;
    p.handle_tick(later);
    for intent in intents(&mut p) {
        if let Intent::ReadPositions(partitions) = intent {
            for partition in partitions {
                // The consumer's position: past the records dropped.
                p.handle_position(partition, 5);
            }
        }
    }
    p.handle_verdict(slot, batch, BatchOutcome::Success, later);
    p.handle_tick(later);
    p.begin_revoke(&[1], later);
    p.complete_revoke();
    p.close();
    let committed = commits(&mut p);
    assert!(committed.contains(&(0, 2)), "{committed:?}");
    assert!(
        committed.iter().all(|(partition, _)| *partition != 1),
        "nothing of partition 1 was handled: {committed:?}"
    );
}

/// Ordering none, batches of two, four slots, a cap of four finished
/// records; partition 0 assigned with records 0..10 taken in.
fn capped(t0: Instant) -> Pipeline {
    let mut c = WorkerConfig::new(KafkaConfig::plaintext("t:9092"), "t", "g");
    c.batch = BatchLimits::new(2, 1 << 20, Duration::from_millis(10)).unwrap();
    c.ordering = Ordering::None;
    c.concurrency = 4;
    c.max_uncommitted_records = 4;
    let mut p = with_config(c, t0);
    p.handle_assign(&[0]);
    for o in 0..10 {
        p.handle_record(&Rec(0, o), t0);
    }
    p
}

/// `capped` after its first two batches: the `failing`th (by offset)
/// failed, retryable, and the other succeeded.
fn capped_with_a_failure(t0: Instant, failing: usize) -> Pipeline {
    let mut p = capped(t0);
    p.handle_tick(t0);
    let mut started = starts(&mut p);
    started.sort_by_key(|(_, b)| b.first_offset());
    assert_eq!(started.len(), 2);
    for (i, (slot, batch)) in started.into_iter().enumerate() {
        let outcome = if i == failing {
            BatchOutcome::Failed(Failure::retryable("busy"))
        } else {
            BatchOutcome::Success
        };
        p.handle_verdict(slot, batch, outcome, t0);
    }
    p
}

#[test]
fn the_records_cap_stops_fresh_batches_until_the_commit_is_acknowledged() {
    let t0 = Instant::now();
    let mut p = capped(t0);
    p.handle_tick(t0);
    let started = starts(&mut p);
    assert_eq!(
        started.len(),
        2,
        "four records in flight fill a cap of four: {started:?}"
    );
    for (slot, batch) in started {
        p.handle_verdict(slot, batch, BatchOutcome::Success, t0);
    }
    // Long before the commit interval: the commit goes out at once.
    let soon = t0 + secs(0.001);
    p.handle_tick(soon);
    let sent = intents(&mut p);
    assert!(
        sent.iter()
            .any(|i| matches!(i, Intent::Commit { offsets, .. } if offsets == &[(0, 4)])),
        "{sent:?}"
    );
    assert!(!sent.iter().any(|i| matches!(i, Intent::Start { .. })));
    assert!(p.waiting_for_ack());
    assert_eq!(exported(&p).metrics.partitions_waiting_for_commit.get(), 1);
    // Still unacknowledged: nothing new, and the same commit is not sent again.
    p.handle_tick(soon);
    assert!(intents(&mut p).is_empty());
    p.handle_committed(0, 4);
    p.handle_tick(soon);
    let started = starts(&mut p);
    let offsets: Vec<i64> = started.iter().flat_map(|(_, b)| b.offsets()).collect();
    assert_eq!(offsets.len(), 4, "acknowledged: the cap is free again");
    assert!(offsets.iter().all(|o| *o >= 4), "{offsets:?}");
    assert!(!p.waiting_for_ack());
}

#[test]
fn the_records_cap_lets_the_batch_that_moves_the_watermark_start() {
    // Records 2..4 finish while 0..2 failed: they wait above the
    // watermark, the cap is full, and only the retry and the batch at
    // the watermark may run, or the cap would never empty.
    let t0 = Instant::now();
    let mut p = capped_with_a_failure(t0, 0);
    let later = t0 + secs(1.0);
    p.handle_tick(later);
    let started = starts(&mut p);
    let offsets: Vec<i64> = started.iter().flat_map(|(_, b)| b.offsets()).collect();
    assert_eq!(
        offsets,
        [0, 1],
        "only the retry: 2 + 2 in flight fill the cap"
    );
    for (slot, batch) in started {
        p.handle_verdict(slot, batch, BatchOutcome::Success, later);
    }
    assert_eq!(p.watermark(0), Some(4));
}

#[test]
fn records_waiting_for_a_retry_count_against_the_records_cap() {
    // 2..4 fail and wait for their retry: a crash replays them once they
    // are done, so they hold their place in the cap.
    let t0 = Instant::now();
    let mut p = capped_with_a_failure(t0, 1);
    p.handle_committed(0, 2);
    p.handle_tick(t0);
    let fresh: Vec<i64> = starts(&mut p)
        .iter()
        .flat_map(|(_, b)| b.offsets())
        .filter(|o| *o >= 4)
        .collect();
    assert_eq!(
        fresh.len(),
        2,
        "2 waiting + 2 fresh fill a cap of four: {fresh:?}"
    );
}

#[test]
fn no_records_cap_by_default() {
    let t0 = Instant::now();
    let mut p = capped(t0);
    p.config.max_uncommitted_records = 0;
    p.handle_tick(t0);
    assert_eq!(starts(&mut p).len(), 4);
}

#[test]
fn no_limit_when_max_uncommitted_is_zero() {
    let mut c = WorkerConfig::new(KafkaConfig::plaintext("t:9092"), "t", "g");
    c.max_uncommitted = Some(Duration::ZERO);
    assert_eq!(c.uncommitted_limit(), None);
    c.max_uncommitted = Some(Duration::from_millis(10));
    let err = c.validate().unwrap_err();
    assert!(err.to_string().contains("--max-uncommitted-ms"), "{err}");
}

/// The dead-letter error in /readyz speaks of records still held: a
/// partition lost while its dead letter could not be written takes the
/// error with it, and a later dead letter does not show it again.
#[test]
fn a_dead_letter_error_leaves_with_the_records_it_was_about() {
    let t0 = Instant::now();
    let mut p = with_one_batch(t0);
    let (slot, batch) = starts(&mut p).pop().unwrap();
    let permanent = |o| BatchOutcome::Partial(vec![(o, Failure::permanent("bad"))]);
    p.handle_verdict(slot, batch, permanent(0), t0);
    let dead = dead_letter_slot(&mut p);
    p.handle_dead_lettered(dead, &[], Some("TOPIC_AUTHORIZATION_FAILED".into()), t0);
    assert!(
        p.stats().dead_letter_error.is_some(),
        "the failed write shows"
    );
    p.handle_lost(&[0]);
    assert_eq!(
        p.stats().dead_letter_error,
        None,
        "nothing held, nothing said"
    );

    p.handle_assign(&[0]);
    p.handle_record(&Rec(0, 2), t0);
    p.handle_record(&Rec(0, 3), t0);
    p.handle_tick(t0);
    let (slot, batch) = starts(&mut p).pop().unwrap();
    p.handle_verdict(slot, batch, permanent(2), t0);
    let _being_written = dead_letter_slot(&mut p);
    assert_eq!(
        p.stats().dead_letter_error,
        None,
        "a new dead letter, not yet refused, brings back no old error"
    );
}

/// Records dead-lettered are not the handler's work: a worker that only
/// dead-letters reports none processed, so the scaler does not take the
/// speed of writing dead letters for what a replica can handle.
#[test]
fn dead_letters_are_not_reported_as_processed() {
    let t0 = Instant::now();
    let mut p = with_one_batch(t0);
    let (slot, batch) = starts(&mut p).pop().unwrap();
    let both = vec![
        (0, Failure::permanent("bad")),
        (1, Failure::permanent("bad")),
    ];
    p.handle_verdict(slot, batch, BatchOutcome::Partial(both), t0);
    let dead = dead_letter_slot(&mut p);
    p.handle_dead_lettered(dead, &[0, 1], None, t0);
    let later = t0 + crate::capacity::DEFAULT_WINDOW + Duration::from_secs(1);
    p.handle_tick(later);
    assert_eq!(commits(&mut p), vec![(0, 2)], "both done and committed");
    let report = p.stats().capacity.cloned().expect("the window closed");
    assert_eq!(report.processed_per_sec, 0.0, "{report:?}");
}

// ------------------------------------------------------------ share groups

/// A share group's pipeline: per-record acknowledgement, no ordering.
fn share_pipeline(t0: Instant, max_attempts: u32) -> Pipeline {
    let mut c = WorkerConfig::new(KafkaConfig::plaintext("t:9092"), "t", "g");
    c.batch = BatchLimits::new(2, 1 << 20, Duration::from_millis(10)).unwrap();
    c.ordering = Ordering::None;
    c.concurrency = 4;
    c.retry.max_attempts = max_attempts;
    c.retry.initial = Duration::from_millis(10);
    c.retry.max = Duration::from_millis(10);
    let options = Options {
        dead_letters: true,
        audit: false,
        keep_headers: false,
        seed: 1,
        acknowledgement: Acknowledgement::PerRecord,
        scope_successes: true,
    };
    Pipeline::new(c.pipeline(), options, "w".into(), t0, 0)
}

/// Every record accepted, by partition, in the order asked.
fn accepts(all: &[Intent]) -> Vec<(i32, i64)> {
    all.iter()
        .filter_map(|i| match i {
            Intent::Accept { partition, offsets } => {
                Some(offsets.iter().map(|o| (*partition, *o)).collect::<Vec<_>>())
            }
            _ => None,
        })
        .flatten()
        .collect()
}

/// Records come without an assignment, in any order and again (a record
/// released elsewhere comes back below what was seen); each is accepted
/// once its batch succeeds, and nothing is committed or read back.
#[test]
fn a_share_group_accepts_each_record_when_done_in_any_order() {
    let t0 = Instant::now();
    let mut p = share_pipeline(t0, 3);
    for (partition, offset) in [(0, 7), (0, 3), (1, 5), (0, 1)] {
        p.handle_record(&Rec(partition, offset), t0);
    }
    let t1 = t0 + Duration::from_millis(20);
    p.handle_tick(t1);
    let started = starts(&mut p);
    let mut held: Vec<(i32, i64)> = started
        .iter()
        .flat_map(|(s, b)| b.offsets().map(move |o| (s.partition, o)))
        .collect();
    held.sort();
    assert_eq!(
        held,
        [(0, 1), (0, 3), (0, 7), (1, 5)],
        "every record started, none reset away"
    );
    let mut accepted = Vec::new();
    for (slot, batch) in started {
        p.handle_verdict(slot, batch, BatchOutcome::Success, t1);
        accepted.extend(accepts(&intents(&mut p)));
    }
    accepted.sort();
    assert_eq!(accepted, held);
    p.handle_tick(t1 + Duration::from_secs(5));
    let later = intents(&mut p);
    assert!(
        later.iter().all(|i| !matches!(
            i,
            Intent::Commit { .. } | Intent::ReadPositions(_) | Intent::Accept { .. }
        )),
        "nothing to commit, read or accept again: {later:?}"
    );
    assert_eq!(p.held(), 0);
}

/// A share group's worker has no offset commit for its capacity report to
/// ride on: the report comes out on its own, at the commit interval, once
/// a window closes, and says what was done.
#[test]
fn a_share_groups_capacity_report_comes_out_on_its_own() {
    let t0 = Instant::now();
    let mut p = share_pipeline(t0, 3);
    let mut now = t0;
    let mut reports = Vec::new();
    // Busy enough (a 300 ms batch of every 4 slots' 420 ms) for whole
    // 5 s windows, so commit intervals (1 s) come between reports.
    for round in 0..60i64 {
        for i in 0..2 {
            p.handle_record(&Rec(0, round * 2 + i), now);
        }
        now += Duration::from_millis(20);
        p.handle_tick(now);
        for (slot, batch) in starts(&mut p) {
            now += Duration::from_millis(300);
            p.handle_verdict(slot, batch, BatchOutcome::Success, now);
        }
        now += Duration::from_millis(100);
        p.handle_tick(now);
        for i in intents(&mut p) {
            match i {
                Intent::ReportCapacity(text) => reports.push(text),
                Intent::Commit { metadata, .. } => {
                    assert!(metadata.is_empty(), "a report on a commit: {metadata}")
                }
                _ => {}
            }
        }
    }
    let report = reports
        .iter()
        .find_map(|r| microbatch_kafka::capacity_report::CapacityReport::decode(r))
        .unwrap_or_else(|| panic!("a capacity report in {reports:?}"));
    // The meter answers the last window's report until the next closes:
    // each is sent once, not at every commit interval.
    let distinct: std::collections::BTreeSet<&String> = reports.iter().collect();
    assert_eq!(
        distinct.len(),
        reports.len(),
        "a report sent twice: {reports:?}"
    );
    assert!(report.processed_per_sec > 0.0, "{report:?}");
    assert!(report.busy_fraction > 0.0, "{report:?}");
    // Records taken and not finished are reported as held: the group's
    // in-flight count, sampled by the scaling side.
    for i in 0..5 {
        p.handle_record(&Rec(1, i), now);
    }
    let mut last = None;
    for _ in 0..100 {
        now += Duration::from_millis(100);
        p.handle_tick(now);
        for i in intents(&mut p) {
            if let Intent::ReportCapacity(text) = i {
                last = microbatch_kafka::capacity_report::CapacityReport::decode(&text);
            }
        }
    }
    let last = last.expect("a report while the records are held");
    assert_eq!(p.held(), 5);
    assert_eq!(last.held, Some(5), "{last:?}");
    // Per partition: all five on partition 1, none left on 0.
    assert_eq!(last.held_by, Some(vec![(1, 5)]), "{last:?}");
}

/// In a partly failed batch the good records are accepted at once; the
/// failed one only when its dead letter is acknowledged, never before.
#[test]
fn a_share_group_accepts_a_failed_record_only_after_its_dead_letter() {
    let t0 = Instant::now();
    let mut p = share_pipeline(t0, 1);
    p.handle_record(&Rec(2, 10), t0);
    p.handle_record(&Rec(2, 11), t0);
    p.handle_tick(t0);
    let (slot, batch) = starts(&mut p).pop().expect("a batch");
    p.handle_verdict(
        slot,
        batch,
        BatchOutcome::Partial(vec![(11, Failure::permanent("bad"))]),
        t0,
    );
    let now = intents(&mut p);
    assert_eq!(accepts(&now), [(2, 10)]);
    let dead = now
        .iter()
        .find_map(|i| match i {
            Intent::DeadLetter { slot, batch, .. } => {
                Some((*slot, batch.offsets().collect::<Vec<_>>()))
            }
            _ => None,
        })
        .or_else(|| {
            p.handle_tick(t0);
            Some((dead_letter_slot(&mut p), vec![11]))
        })
        .unwrap();
    assert_eq!(dead.1, [11]);
    // A failed write accepts nothing.
    p.handle_dead_lettered(dead.0, &[], Some("broker down".into()), t0);
    assert!(accepts(&intents(&mut p)).is_empty());
    p.handle_tick(t0 + Duration::from_secs(1));
    let again = dead_letter_slot(&mut p);
    p.handle_dead_lettered(again, &[11], None, t0 + Duration::from_secs(1));
    assert_eq!(accepts(&intents(&mut p)), [(2, 11)]);
    assert_eq!(p.held(), 0);
}

/// A record the broker delivered more often than --max-attempts goes to the
/// dead-letter topic without a handler seeing it, then is accepted.
#[test]
fn a_share_record_delivered_too_often_is_dead_lettered_unhandled() {
    let t0 = Instant::now();
    let mut p = share_pipeline(t0, 3);
    p.handle_delivered_too_often(&Rec(4, 99), 4, None, t0);
    p.handle_tick(t0);
    let all = intents(&mut p);
    assert!(
        !all.iter().any(|i| matches!(i, Intent::Start { .. })),
        "not handled again: {all:?}"
    );
    let (slot, attempts) = all
        .iter()
        .find_map(|i| match i {
            Intent::DeadLetter {
                slot,
                attempts,
                batch,
                ..
            } => {
                assert_eq!(batch.offsets().collect::<Vec<_>>(), [99]);
                Some((*slot, *attempts))
            }
            _ => None,
        })
        .expect("a dead letter");
    assert_eq!(
        attempts, 4,
        "the dead letter says how often it was delivered"
    );
    p.handle_dead_lettered(slot, &[99], None, t0);
    assert_eq!(accepts(&intents(&mut p)), [(4, 99)]);
    assert_eq!(p.report().records_dead_lettered, 1);
}

/// A record whose batch cannot be decoded, delivered too often, is
/// dead-lettered saying why, not that earlier deliveries went unanswered.
#[test]
fn a_share_record_that_cannot_be_decoded_is_dead_lettered_saying_why() {
    let t0 = Instant::now();
    let mut p = share_pipeline(t0, 3);
    let why = "its record batch cannot be decoded: unknown magic 9";
    p.handle_delivered_too_often(&Rec(4, 99), 4, Some(why), t0);
    p.handle_tick(t0);
    let error = intents(&mut p)
        .into_iter()
        .find_map(|i| match i {
            Intent::DeadLetter { failures, .. } => Some(failures[0].1.error.clone()),
            _ => None,
        })
        .expect("a dead letter");
    assert!(
        error.contains("delivered 4 times") && error.contains(why),
        "{error}"
    );
    assert!(!error.contains("without a verdict"), "{error}");
}

/// Draining, a share group's pipeline starts nothing more: what it has not
/// started is left unaccepted, for the broker to release when it leaves.
#[test]
fn a_draining_share_group_starts_nothing_and_accepts_only_what_finished() {
    let t0 = Instant::now();
    let mut p = share_pipeline(t0, 3);
    for o in 0..20 {
        p.handle_record(&Rec(0, o), t0);
    }
    p.handle_tick(t0 + Duration::from_millis(20));
    let started = starts(&mut p);
    assert_eq!(started.len(), 4, "one batch per slot");
    p.shutdown(t0 + Duration::from_millis(20));
    let (slot, batch) = started.into_iter().next().unwrap();
    let done: Vec<i64> = batch.offsets().collect();
    p.handle_verdict(
        slot,
        batch,
        BatchOutcome::Success,
        t0 + Duration::from_millis(30),
    );
    p.handle_tick(t0 + Duration::from_millis(40));
    let all = intents(&mut p);
    assert!(
        !all.iter().any(|i| matches!(i, Intent::Start { .. })),
        "{all:?}"
    );
    assert_eq!(
        accepts(&all)
            .into_iter()
            .map(|(_, o)| o)
            .collect::<Vec<_>>(),
        done
    );
}

/// A record past --max-attempts that arrives while the worker drains (its
/// fetch was under way) is still dead-lettered, on a partition new to the
/// worker too, and the drain waits for the dead letter: dropped, it would
/// return to the broker one delivery nearer to being archived unseen.
#[test]
fn a_record_delivered_too_often_while_draining_is_still_dead_lettered() {
    let t0 = Instant::now();
    let mut p = share_pipeline(t0, 3);
    p.shutdown(t0);
    p.handle_delivered_too_often(&Rec(7, 40), 4, None, t0);
    let slot = dead_letter_slot(&mut p);
    assert!(!p.drained(t0), "the drain waits for the dead letter");
    p.handle_dead_lettered(slot, &[40], None, t0);
    assert_eq!(accepts(&intents(&mut p)), [(7, 40)]);
    assert!(p.drained(t0));
}

/// In no order, a batch never waits behind a slow one while a slot is free:
/// every batch closed starts at once, whichever lane it was filled in (for
/// a share group, a batch left waiting outlives its records' locks).
#[test]
fn in_no_order_no_batch_waits_behind_a_slow_one_while_a_slot_is_free() {
    let t0 = Instant::now();
    let mut p = share_pipeline(t0, 3);
    // Four slots; batches of two close as they fill, one lane after another.
    for offset in 0..2 {
        p.handle_record(&Rec(0, offset), t0);
    }
    p.handle_tick(t0);
    let slow = starts(&mut p);
    assert_eq!(slow.len(), 1, "the first batch starts");
    let mut now = t0;
    let mut finished = 0;
    // The first batch hangs; sixteen more batches come, one after another,
    // each done before the next closes: three slots stay free throughout.
    for round in 1..=16 {
        now += Duration::from_millis(1);
        p.handle_record(&Rec(0, 2 * round), now);
        p.handle_record(&Rec(0, 2 * round + 1), now);
        p.handle_tick(now);
        let started = starts(&mut p);
        assert_eq!(
            started.len(),
            1,
            "batch {round} starts at once beside the slow one: {}",
            p.debug_state(now)
        );
        for (slot, batch) in started {
            p.handle_verdict(slot, batch, BatchOutcome::Success, now);
            finished += 1;
        }
    }
    assert_eq!(finished, 16);
    assert_eq!(p.held(), 2, "only the slow batch's records are held");
}

/// A batch whose records a filter left out (`Unhandled`, done without the
/// handler) is no proof that the downstream works: a record that fails as
/// a whole beside it is held, not dead-lettered (failure rule 3). Counted
/// as a success, it dead-lettered the record.
#[test]
fn records_done_without_the_handler_prove_nothing_to_rule_3() {
    let t0 = Instant::now();
    let mut p = with_one_batch(t0);
    let mut now = t0;
    let mut dead = Vec::new();
    for _ in 0..400 {
        now += Duration::from_millis(50);
        p.handle_tick(now);
        for intent in intents(&mut p) {
            match intent {
                Intent::Start { slot, batch } => {
                    let outcome = if batch.offsets().eq([0]) {
                        BatchOutcome::Unhandled {
                            failed: vec![],
                            tried: false,
                        }
                    } else {
                        BatchOutcome::Failed(Failure::retryable("downstream down"))
                    };
                    p.handle_verdict(slot, batch, outcome, now);
                }
                Intent::DeadLetter { slot, batch, .. } => {
                    let written: Vec<i64> = batch.offsets().collect();
                    dead.extend(written.iter().copied());
                    p.handle_dead_lettered(slot, &written, None, now);
                }
                _ => {}
            }
        }
    }
    assert_eq!(
        dead,
        Vec::<i64>::new(),
        "nothing proved the downstream works"
    );
    assert_eq!(p.held(), 1, "record 1 waits");
    assert!(p.circuit_open());
}

/// A handler that failed every record it was given, beside records a
/// filter left out, counts against the downstream as a whole failure
/// does: the circuit opens, and records wait instead of spending their
/// attempts one by one (counted as nothing, every record was dead-lettered
/// after its attempts).
#[test]
fn a_handler_failing_all_it_was_given_opens_the_circuit() {
    let t0 = Instant::now();
    let mut p = pipeline_with(t0, |c| c.retry.max_attempts = 3);
    p.handle_assign(&[0, 1]);
    for o in 0..40 {
        p.handle_record(&Rec(0, o), t0);
        p.handle_record(&Rec(1, o), t0);
    }
    let mut now = t0;
    let mut opened = false;
    for _ in 0..200 {
        now += Duration::from_millis(50);
        p.handle_tick(now);
        opened |= p.circuit_open();
        for intent in intents(&mut p) {
            if let Intent::Start { slot, batch } = intent {
                let failed = batch
                    .offsets()
                    .map(|o| (o, Failure::retryable("down")))
                    .collect();
                p.handle_verdict(
                    slot,
                    batch,
                    BatchOutcome::Unhandled {
                        failed,
                        tried: true,
                    },
                    now,
                );
            }
        }
    }
    assert!(
        opened,
        "the downstream failing everything opens the circuit"
    );
}

/// Rule 3's proof of health is a success of a batch handed over after the
/// record first failed. Found when the demo's outage dead-lettered a
/// record: a batch already in the handler when the downstream went down
/// finished well after another's first failure, and counted as proof.
#[test]
fn a_batch_in_flight_before_a_failure_is_no_proof_of_health() {
    let t0 = Instant::now();
    let mut p = pipeline_with(t0, |c| {
        c.retry.initial = Duration::from_millis(10);
        c.retry.max = Duration::from_millis(100);
    });
    p.handle_assign(&[0, 1]);
    // Partition 1's batch goes to the handler first and stays there.
    p.handle_record(&Rec(1, 0), t0);
    p.handle_record(&Rec(1, 1), t0);
    p.handle_tick(t0);
    let mut early = starts(&mut p);
    assert_eq!(early.len(), 1);
    let (early_slot, early_batch) = early.pop().unwrap();
    // Then the downstream goes down for everything handed over after.
    p.handle_record(&Rec(0, 0), t0);
    p.handle_record(&Rec(0, 1), t0);
    let mut now = t0;
    let mut dead: Vec<(i32, i64)> = Vec::new();
    let mut early = Some((early_slot, early_batch));
    let mut fresh_sent = false;
    for step in 0..600 {
        now += Duration::from_millis(20);
        p.handle_tick(now);
        for intent in intents(&mut p) {
            match intent {
                Intent::Start { slot, batch } => {
                    let outcome = if fresh_sent {
                        // A batch handed over once the downstream is back.
                        BatchOutcome::Success
                    } else {
                        BatchOutcome::Failed(Failure::retryable("connection refused"))
                    };
                    p.handle_verdict(slot, batch, outcome, now);
                }
                Intent::DeadLetter { slot, batch, .. } => {
                    let written: Vec<i64> = batch.offsets().collect();
                    dead.extend(written.iter().map(|o| (batch.partition(), *o)));
                    p.handle_dead_lettered(slot, &written, None, now);
                }
                Intent::Commit { offsets, .. } => {
                    for (partition, offset) in offsets {
                        p.handle_committed(partition, offset);
                    }
                }
                _ => {}
            }
        }
        // Partition 1's early batch finishes well after the failures.
        if step == 50 {
            let (slot, batch) = early.take().unwrap();
            p.handle_verdict(slot, batch, BatchOutcome::Success, now);
        }
        if step == 150 {
            assert!(
                dead.is_empty(),
                "dead-lettered on the proof of a batch handed over before the failure: {dead:?}"
            );
            assert_eq!(p.held(), 2, "partition 0's records are held");
            // A fresh batch succeeds: real proof that the rest works.
            fresh_sent = true;
            p.handle_record(&Rec(1, 2), now);
            p.handle_record(&Rec(1, 3), now);
        }
    }
    assert!(fresh_sent);
    assert_eq!(
        p.held(),
        0,
        "once the downstream answers, everything is done"
    );
}

/// One tenant's downstream is out while the others work: judged per key,
/// its records are held until it is back and none is dead-lettered, while
/// the other tenant's records keep flowing; judged per worker (the old
/// rule), the others' successes prove them bad and they are dead-lettered
/// within seconds. A record bad in a healthy tenant is dead-lettered
/// meanwhile either way. Under every ordering.
#[test]
fn a_tenant_outage_holds_its_records_while_other_tenants_succeed() {
    struct Run {
        dead: Vec<i64>,
        /// Tenant b's records done while tenant a was out.
        b_done_during_outage: usize,
        /// Tenant b's records in the order they succeeded.
        b_done: Vec<i64>,
        left: usize,
    }
    fn run(scope: HealthScope, ordering: Ordering) -> Run {
        let t0 = Instant::now();
        let mut p = pipeline_with(t0, |c| {
            c.batch = BatchLimits::new(4, 1 << 20, Duration::from_millis(5)).unwrap();
            c.ordering = ordering;
            c.concurrency = 2;
            c.retry.initial = Duration::from_millis(10);
            c.retry.max = Duration::from_millis(200);
            c.retry.max_attempts = 2;
            c.health_scope = scope;
        });
        p.handle_assign(&[0]);
        // Tenant a every third record; record 10 (tenant b) is bad.
        let key = |o: i64| -> &'static [u8] {
            if o % 3 == 0 {
                b"tenant-a"
            } else {
                b"tenant-b"
            }
        };
        let mut next = 0;
        let mut now = t0;
        let mut dead = Vec::new();
        let mut b_done_during_outage = 0;
        let mut b_done = Vec::new();
        let outage_ends = t0 + Duration::from_secs(20);
        for _ in 0..4_000 {
            now += Duration::from_millis(10);
            // Records keep arriving, 1 per 10 ms for the first 10 s.
            if next < 1_000 {
                p.handle_record(&Keyed(next, key(next)), now);
                next += 1;
            }
            p.handle_tick(now);
            for intent in intents(&mut p) {
                match intent {
                    Intent::Start { slot, batch } => {
                        let tenant_a = batch.records().any(|r| r.key == Some(b"tenant-a"));
                        let outcome = if batch.offsets().any(|o| o == 10) {
                            BatchOutcome::Failed(Failure::retryable("500: cannot parse"))
                        } else if tenant_a && now < outage_ends {
                            BatchOutcome::Failed(Failure::retryable("503 from tenant a's shard"))
                        } else {
                            if now < outage_ends {
                                b_done_during_outage += batch.len();
                            }
                            b_done.extend(
                                batch
                                    .records()
                                    .filter(|r| r.key == Some(b"tenant-b"))
                                    .map(|r| r.offset),
                            );
                            BatchOutcome::Success
                        };
                        p.handle_verdict(slot, batch, outcome, now);
                    }
                    Intent::DeadLetter { slot, batch, .. } => {
                        let written: Vec<i64> = batch.offsets().collect();
                        dead.extend(written.iter().copied());
                        p.handle_dead_lettered(slot, &written, None, now);
                    }
                    Intent::Commit { offsets, .. } => {
                        for (partition, offset) in offsets {
                            p.handle_committed(partition, offset);
                        }
                    }
                    _ => {}
                }
            }
        }
        dead.sort();
        Run {
            dead,
            b_done_during_outage,
            b_done,
            left: p.held(),
        }
    }
    for ordering in [Ordering::None, Ordering::Key, Ordering::Partition] {
        let r = run(HealthScope::Key, ordering);
        assert_eq!(
            r.dead,
            vec![10],
            "{ordering}: only the bad record of the healthy tenant"
        );
        // Tenant b: two thirds of the 1,000 records, nearly all of which
        // arrive during the outage; ten of them bad or behind the bad one.
        assert!(
            r.b_done_during_outage >= 600,
            "{ordering}: tenant b kept flowing while tenant a was out: {} done (found in review: 0)",
            r.b_done_during_outage
        );
        assert_eq!(r.left, 0, "{ordering}: all done once tenant a is back");
        // Where order is kept, tenant b's records are done in order (but
        // for its bad record, held): tenant a's held records let fresh
        // batches overtake them, not tenant b's retries (found in review).
        if ordering != Ordering::None {
            let b: Vec<i64> = r.b_done.iter().copied().filter(|o| *o != 10).collect();
            let out_of_order = b.windows(2).filter(|w| w[0] > w[1]).count();
            assert_eq!(out_of_order, 0, "{ordering}: tenant b in order");
        }
    }
    let r = run(HealthScope::Worker, Ordering::None);
    assert!(
        r.dead.iter().filter(|o| *o % 3 == 0).count() >= 5,
        "judged per worker, tenant a's records are dead-lettered: {:?}",
        r.dead
    );
}

/// A record held for its key's proof is looked at again when its hold ends,
/// not up to a quarter of `--retry-max-ms` later, when the lane's spacing
/// would next let it start (found in review).
#[test]
fn a_held_record_is_retried_when_its_hold_ends() {
    let t0 = Instant::now();
    let mut p = pipeline_with(t0, |c| {
        c.batch = BatchLimits::new(1, 1 << 20, Duration::from_millis(1)).unwrap();
        c.ordering = Ordering::None;
        c.concurrency = 1;
        c.retry.initial = Duration::from_millis(10);
        c.retry.max = Duration::from_secs(40);
        c.retry.max_attempts = 2;
        c.health_scope_hold = Duration::from_secs(1);
        c.commit_interval = Duration::from_secs(600);
    });
    p.handle_assign(&[0]);
    p.handle_record(&Keyed(0, b"tenant-a"), t0);
    let mut now = t0;
    let mut hold_until = None;
    let mut other = 1;
    for _ in 0..2_000 {
        now += Duration::from_millis(5);
        // A record of another tenant now and then, which succeeds.
        if other < 50 {
            p.handle_record(&Keyed(other, b"tenant-b"), now);
            other += 1;
        }
        p.handle_tick(now);
        for intent in intents(&mut p) {
            if let Intent::Start { slot, batch } = intent {
                let outcome = if batch.offsets().any(|o| o == 0) {
                    BatchOutcome::Failed(Failure::retryable("503 from tenant a's shard"))
                } else {
                    BatchOutcome::Success
                };
                p.handle_verdict(slot, batch, outcome, now);
            }
        }
        hold_until = p.partitions[&0]
            .lanes
            .iter()
            .flat_map(|l| &l.retry)
            .find_map(|(b, _)| {
                b.lineage
                    .scope_hold
                    .filter(|_| b.lineage.held_for_scope(now))
            })
            .map(|h| h.until);
        if hold_until.is_some() && other >= 50 && p.in_flight() == 0 {
            break;
        }
    }
    let until = hold_until.expect("tenant a's record is held for its key");
    assert!(
        p.poll_timeout() <= until,
        "woken {:?} after the hold ends",
        p.poll_timeout().saturating_duration_since(until)
    );
}

/// A partition taken over asks what the dead-letter topic holds of its
/// records already; its dead letters wait for the answer (without waking
/// the loop), and a record whose dead letter is there is done without a
/// second one while the others are written.
#[test]
fn dead_letters_written_before_a_takeover_are_not_written_again() {
    let t0 = Instant::now();
    let mut p = pipeline_with(t0, |c| {
        c.batch = BatchLimits::new(4, 1 << 20, Duration::from_millis(1)).unwrap();
        c.commit_interval = Duration::from_secs(600);
    });
    p.handle_assign(&[0]);
    let asked = std::iter::from_fn(|| p.poll_intent())
        .find_map(|i| match i {
            Intent::FindDeadLetters { partition, epoch } => Some((partition, epoch)),
            _ => None,
        })
        .expect("the dead-letter topic is looked at");
    assert_eq!(asked.0, 0);
    for o in 0..4 {
        p.handle_record(&Rec(0, o), t0);
    }
    p.handle_tick(t0);
    let (slot, batch) = starts(&mut p).pop().expect("the batch starts at once");
    let failed = |o: i64| (o, Failure::permanent("poison"));
    p.handle_verdict(
        slot,
        batch,
        BatchOutcome::Partial(vec![failed(1), failed(2)]),
        t0,
    );
    let later = t0 + Duration::from_secs(1);
    p.handle_tick(later);
    assert!(
        !intents(&mut p)
            .iter()
            .any(|i| matches!(i, Intent::DeadLetter { .. })),
        "no dead letter before the answer"
    );
    assert!(
        p.poll_timeout() > later,
        "waiting for the answer is no reason to wake"
    );
    assert_eq!(p.watermark(0), Some(1), "1 and 2 hold the commit");
    // A stale answer (an earlier assignment's) changes nothing.
    p.handle_earlier_dead_letters(0, asked.1 + 100, &[(1, Some(1_000)), (2, Some(1_000))]);
    assert!(intents(&mut p).is_empty());
    // 1's entry names another record at its offset (another timestamp: the
    // topic made again); 2's is its own.
    p.handle_earlier_dead_letters(
        0,
        asked.1,
        &[(1, Some(999)), (2, Some(1_000)), (77, Some(1_000))],
    );
    let written: Vec<Vec<i64>> = intents(&mut p)
        .into_iter()
        .filter_map(|i| match i {
            Intent::DeadLetter { batch, .. } => Some(batch.offsets().collect()),
            _ => None,
        })
        .collect();
    assert_eq!(written, [vec![1]], "2's dead letter is there already");
    assert_eq!(p.stats().counted.dead_letters_found, 1);
    assert_eq!(p.watermark(0), Some(1), "1 still waits for its write");
}
