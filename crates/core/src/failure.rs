//! What happens to records that failed: retry, bisect, dead-letter, and when
//! the downstream as a whole is out (the circuit breaker).
//!
//! Pure functions of the batch, the failure, the policy and the clock; the
//! pipeline carries out what they return.
//!
//! **The failure rules.**
//! 1. A record the handler names as failed is its own fault: a permanent
//!    failure goes to the dead-letter topic at once; a retryable one is tried
//!    again with back-off until `max_attempts`, then dead-lettered. One batch
//!    may hold both kinds; each record follows its own rule.
//! 2. A batch that fails as a whole is tried again whole while attempts are
//!    left. Then (or at once for a permanent failure) it is bisected: both
//!    halves are tried, and the half that fails is bisected again, so one bad
//!    record is isolated and its neighbours are processed.
//! 3. A single record that fails as a whole with its attempts spent is
//!    dead-lettered only when the downstream was seen to succeed on some other
//!    batch handed to it after the record's previous failure was reported (a
//!    batch already in flight when an outage began can still succeed after
//!    it: found when the demo's outage dead-lettered a record; and a success
//!    between a passing fault and a later outage proves nothing about the
//!    outage: found in review). Without that proof the failure is
//!    as likely an outage as a bad record: the record is held (retried with
//!    the longest back-off, never dead-lettered) and the circuit opens.
//!    The proof is asked of the record's own key or tenant first (the
//!    scope rule, [`crate::health`]): one tenant out while others succeed
//!    holds its records, with the circuit closed.
//! 4. The circuit opens when [`CIRCUIT_THRESHOLD`] batches in a row fail as a
//!    whole and they are of at least two different batches' records (several
//!    partitions or lanes failing, not one batch retried), or when rule 3
//!    holds a record. While it is open, one batch at a time probes the
//!    downstream (records other than held ones first), records the handler
//!    names as failed spend no attempts and `max_record_age` is not applied.
//!    Whole-batch failures still spend attempts and bisect, so a bad record
//!    is isolated whatever the circuit does, and rule 3 keeps an outage from
//!    dead-lettering anything. Any success closes it. (Readiness reports
//!    an open circuit only while records are held: see the pipeline.)
//! 5. A batch that could not be handed over because something the worker
//!    needs for it is out (the schema registry) is held whole: no attempt
//!    spent, no bisection, no dead letter, retried after the longest
//!    back-off, and the circuit opens as for rule 3.

use std::time::{Duration, Instant};

use rand::Rng;

use crate::batch::{Batch, ScopeHold};
use crate::config::RetryPolicy;
use crate::handler::Failure;
use crate::health::ScopeEvidence;

/// Whole-batch failures in a row (of at least two batches) that open the circuit.
pub const CIRCUIT_THRESHOLD: u32 = 5;

/// The longest wait between two probes while the circuit is open: one
/// batch every few seconds does not hurt a downstream that is down, and a
/// bad record being isolated by probes is not held up for long.
const MAX_PROBE_BACKOFF: Duration = Duration::from_secs(5);
const FIRST_PROBE_BACKOFF: Duration = Duration::from_secs(1);

/// What to do with (some of) the records of a failed batch.
#[derive(Debug)]
pub enum Plan {
    /// Hand these records to the handler again, not before `at`.
    Retry { batch: Batch, at: Instant },
    /// Try both halves now, the first first.
    Bisect(Batch, Batch),
    /// Write these records to the dead-letter topic, each with its failure.
    DeadLetter {
        batch: Batch,
        failures: Vec<(i64, Failure)>,
    },
}

/// What a batch's outcome tells the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Some record succeeded: the downstream works.
    Success,
    /// The batch failed as a whole; `root` names its records' first batch.
    Failure { root: u64 },
    /// Bisection found no healthy record (rule 3): likely an outage.
    Suspect,
    /// Nothing the circuit should count (a failure being isolated).
    Nothing,
}

/// The state a failure decision reads.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub now: Instant,
    /// Milliseconds since the Unix epoch at `now`, for record ages.
    pub wall_ms: i64,
    pub circuit_open: bool,
    /// Whether the circuit counted a failure since the last success.
    pub rest_failing: bool,
    /// The highest id of a batch that succeeded (rule 3's proof of health).
    /// Batches are numbered as they are handed to the handler.
    pub last_success_id: u64,
    /// The highest id handed out so far: a batch that succeeds with a
    /// higher one was handed over after this moment.
    pub dispatched: u64,
    /// For a single record: what is known of its health scope (its key or
    /// tenant, see [`crate::health`]); `None`: judged by the worker alone.
    pub scope: Option<ScopeEvidence>,
    /// How long a record is held for its scope's proof at most.
    pub scope_hold: Duration,
    /// Whether the batch holds a record of a scope known to be out (one
    /// with records held): its failure is that scope's, and it is split at
    /// once, without back-off retries, so the rest of it goes on.
    pub scope_out: bool,
}

/// Decides for a batch that failed as a whole (rules 2 and 3).
pub fn whole_batch_failed(
    mut batch: Batch,
    failure: &Failure,
    policy: &RetryPolicy,
    ctx: Context,
    rng: &mut impl Rng,
) -> (Plan, Signal) {
    let lineage = &mut batch.lineage;
    // Stamped again at every whole failure: a success between a passing
    // fault and a later outage proves nothing about the outage (found in
    // review).
    let previous_failure = lineage.dispatched_at_last_failure.replace(ctx.dispatched);
    let isolating = lineage.isolating;
    let signal = if isolating {
        Signal::Nothing
    } else {
        Signal::Failure { root: lineage.root }
    };
    batch.attempt += 1;
    let exhausted = !failure.retryable
        || batch.attempt >= policy.max_attempts
        || (ctx.scope_out && batch.len() > 1)
        || (!ctx.circuit_open && too_old(&batch, policy, ctx.wall_ms));
    if !exhausted {
        let at = ctx.now + backoff(policy, batch.attempt, rng);
        return (Plan::Retry { batch, at }, signal);
    }
    if batch.len() > 1 {
        batch.lineage.isolating = true;
        let (a, b) = batch.halves();
        return (Plan::Bisect(a, b), signal);
    }
    let proven_since = |success: u64| previous_failure.is_some_and(|at| success > at);
    let worker_proven = proven_since(ctx.last_success_id);
    let hold = batch.lineage.scope_hold;
    // Held for its scope for a longest back-off at least: time for the
    // scope's other records to fail too, if it is out. Alone in its scope,
    // with the circuit closed, the worker's proof from when its hold began
    // is enough: on an idle topic no later success comes, and the record
    // waited out its whole hold (found by the killer-record test).
    let waited = hold.is_some_and(|h| ctx.now >= h.since + policy.max);
    let hold_over = hold.is_some_and(|h| ctx.now >= h.until);
    // Proof older than this failure counts only while nothing else fails:
    // the circuit closed and no failure counted since the last success.
    // Else a whole outage that began after it would dead-letter the record
    // (found in review).
    let rest_calm = !ctx.circuit_open && !ctx.rest_failing;
    // Its hold over, the rest having worked during it is enough: on an idle
    // topic, or under a full records cap, no later success may come, and
    // asking for one again and again let fresh batches past the cap (both
    // found by the simulation).
    let worked_during_hold = hold.is_some_and(|h| ctx.last_success_id > h.dispatched);
    let proven = match ctx.scope {
        None => worker_proven,
        // The scope rule (see crate::health).
        Some(scope) => {
            proven_since(scope.last_success)
                || (waited
                    && !scope.others_failing
                    && !ctx.circuit_open
                    && (worker_proven || rest_calm && hold.is_some_and(|h| h.proven)))
                || (hold_over && (worker_proven || rest_calm && worked_during_hold))
        }
    };
    if !failure.retryable || proven {
        let failures = batch.offsets().map(|o| (o, failure.clone())).collect();
        return (Plan::DeadLetter { batch, failures }, Signal::Nothing);
    }
    // Rule 3: no proof that the downstream works for anything else. When
    // it works for others, only this record's scope may be out: the
    // circuit stays closed.
    batch.attempt = policy.max_attempts.saturating_sub(1);
    batch.lineage.suspect = true;
    // Its scope's outage explains it when the rest was seen to work, or
    // when other records of its scope are already held for it.
    let scope_explains = ctx.scope.is_some_and(|s| worker_proven || s.others_failing);
    if scope_explains && batch.lineage.scope_hold.is_none() {
        batch.lineage.scope_hold = Some(ScopeHold {
            since: ctx.now,
            until: ctx.now + ctx.scope_hold,
            dispatched: ctx.dispatched,
            proven: worker_proven,
        });
    }
    let at = ctx.now + backoff(policy, policy.max_attempts, rng);
    // The circuit opens unless the rest of the downstream was seen to work:
    // since this failure, or when its hold for its scope began (it is
    // retried again and again while its tenant is out, often with no
    // success in between: opening then starved every tenant, found in the
    // pipeline test). A whole outage that begins later still opens it,
    // through the other tenants' batches failing and their records held.
    // Once its hold is over it is a held record like any other: the circuit
    // opens and its probes bring the worker's proof (found by the
    // simulation: a lane retried it for ever).
    let rest_works = worker_proven || batch.lineage.held_for_scope(ctx.now);
    let signal = if rest_works {
        Signal::Nothing
    } else {
        Signal::Suspect
    };
    (Plan::Retry { batch, at }, signal)
}

/// Decides for a batch that could not be handed over (rule 5).
pub fn batch_unavailable(
    mut batch: Batch,
    policy: &RetryPolicy,
    ctx: Context,
    rng: &mut impl Rng,
) -> (Plan, Signal) {
    batch.lineage.suspect = true;
    let at = ctx.now + backoff(policy, policy.max_attempts, rng);
    (Plan::Retry { batch, at }, Signal::Suspect)
}

/// Decides for the records a handler named as failed (rule 1). `batch`
/// holds exactly those records; `failures` says why, per offset.
pub fn records_failed(
    mut batch: Batch,
    failures: Vec<(i64, Failure)>,
    policy: &RetryPolicy,
    ctx: Context,
    rng: &mut impl Rng,
) -> Vec<Plan> {
    if !ctx.circuit_open || batch.lineage.isolating {
        batch.attempt += 1;
    }
    let exhausted = batch.attempt >= policy.max_attempts
        || (!ctx.circuit_open && too_old(&batch, policy, ctx.wall_ms));
    let (dead, retry): (Vec<_>, Vec<_>) = failures
        .into_iter()
        .partition(|(_, f)| !f.retryable || exhausted);
    let mut plans = Vec::with_capacity(2);
    if !dead.is_empty() {
        let dead_batch = batch.select(batch.id(), |o| dead.iter().any(|(d, _)| *d == o));
        plans.push(Plan::DeadLetter {
            batch: dead_batch,
            failures: dead,
        });
    }
    if !retry.is_empty() {
        let retry_batch = if plans.is_empty() {
            batch
        } else {
            batch.select(batch.id(), |o| retry.iter().any(|(r, _)| *r == o))
        };
        let at = ctx.now + backoff(policy, retry_batch.attempt, rng);
        plans.push(Plan::Retry {
            batch: retry_batch,
            at,
        });
    }
    plans
}

fn backoff(policy: &RetryPolicy, attempt: u32, rng: &mut impl Rng) -> Duration {
    let ceiling = policy.backoff_ceiling(attempt);
    rng.random_range(Duration::ZERO..=ceiling)
}

fn too_old(batch: &Batch, policy: &RetryPolicy, wall_ms: i64) -> bool {
    policy.max_record_age.is_some_and(|age| {
        batch
            .records()
            .filter_map(|r| r.timestamp_ms)
            .any(|ts| wall_ms - ts > age.as_millis() as i64)
    })
}

/// The circuit breaker (rule 4).
#[derive(Debug, Clone)]
pub struct Circuit {
    open: bool,
    /// Whole-batch failures since the last success.
    streak: u32,
    /// Distinct roots in the streak, up to two (all the rule needs).
    roots: [Option<u64>; 2],
    probe_after: Instant,
    probe_backoff: Duration,
}

/// A change of the circuit's state, for logs and readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

impl Circuit {
    pub fn new(now: Instant) -> Self {
        Self {
            open: false,
            streak: 0,
            roots: [None; 2],
            probe_after: now,
            probe_backoff: FIRST_PROBE_BACKOFF,
        }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Failures in a row since the last success.
    pub fn streak(&self) -> u32 {
        self.streak
    }

    /// While open: when the next probe may start.
    pub fn probe_after(&self) -> Instant {
        self.probe_after
    }

    pub fn observe(&mut self, signal: Signal, now: Instant) -> Option<Transition> {
        match signal {
            Signal::Nothing => None,
            Signal::Success => {
                self.streak = 0;
                self.roots = [None; 2];
                self.probe_backoff = FIRST_PROBE_BACKOFF;
                std::mem::take(&mut self.open).then_some(Transition::Closed)
            }
            Signal::Failure { root } => {
                self.streak += 1;
                if self.roots[0].is_none() {
                    self.roots[0] = Some(root);
                } else if self.roots[0] != Some(root) {
                    self.roots[1] = Some(root);
                }
                let spread = self.roots[1].is_some();
                if self.open {
                    self.back_off(now);
                    None
                } else if self.streak >= CIRCUIT_THRESHOLD && spread {
                    self.open_now(now)
                } else {
                    None
                }
            }
            Signal::Suspect => {
                if self.open {
                    self.back_off(now);
                    None
                } else {
                    self.open_now(now)
                }
            }
        }
    }

    fn open_now(&mut self, now: Instant) -> Option<Transition> {
        self.open = true;
        self.probe_after = now + self.probe_backoff;
        Some(Transition::Opened)
    }

    fn back_off(&mut self, now: Instant) {
        self.probe_backoff = (self.probe_backoff * 2).min(MAX_PROBE_BACKOFF);
        self.probe_after = now + self.probe_backoff;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::sync::Arc;

    fn batch(id: u64, offsets: std::ops::Range<i64>) -> Batch {
        let mut b = Batch::new(id, Arc::from("t"), 0);
        for o in offsets {
            b.push(o, Some(1_000), None, Some(b"v"), []);
        }
        b
    }

    fn ctx(last_success_id: u64, circuit_open: bool) -> Context {
        Context {
            now: Instant::now(),
            wall_ms: 2_000,
            circuit_open,
            rest_failing: false,
            last_success_id,
            dispatched: last_success_id,
            scope: None,
            scope_hold: Duration::from_secs(300),
            scope_out: false,
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::default()
    }

    #[test]
    fn a_whole_failure_is_retried_then_bisected() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = batch(1, 0..8);
        let retry = Failure::retryable("down");
        for attempt in 1..5 {
            match whole_batch_failed(b, &retry, &policy(), ctx(0, false), &mut rng) {
                (Plan::Retry { batch, .. }, Signal::Failure { root: 1 }) => {
                    assert_eq!(batch.attempt, attempt);
                    b = batch;
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        match whole_batch_failed(b, &retry, &policy(), ctx(0, false), &mut rng) {
            (Plan::Bisect(a, b), Signal::Failure { root: 1 }) => {
                assert_eq!(a.offsets().collect::<Vec<_>>(), [0, 1, 2, 3]);
                assert_eq!(b.offsets().collect::<Vec<_>>(), [4, 5, 6, 7]);
                assert!(a.lineage.isolating && b.lineage.isolating);
                assert_eq!(a.lineage.root, 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_permanent_whole_failure_bisects_at_once_and_never_dead_letters_a_group() {
        let mut rng = StdRng::seed_from_u64(1);
        let bad = Failure::permanent("bad");
        let (plan, _) = whole_batch_failed(batch(1, 0..4), &bad, &policy(), ctx(0, true), &mut rng);
        assert!(
            matches!(plan, Plan::Bisect(..)),
            "even with the circuit open"
        );
        let (plan, _) = whole_batch_failed(batch(1, 0..1), &bad, &policy(), ctx(0, true), &mut rng);
        assert!(matches!(plan, Plan::DeadLetter { .. }));
    }

    #[test]
    fn an_isolated_record_waits_for_proof_that_the_downstream_works() {
        let mut rng = StdRng::seed_from_u64(1);
        let retry = Failure::retryable("child exited");
        let mut single = batch(1, 0..1);
        single.attempt = 4;
        single.lineage.isolating = true;
        single.lineage.dispatched_at_last_failure = Some(10);
        let (plan, signal) =
            whole_batch_failed(single.clone(), &retry, &policy(), ctx(10, false), &mut rng);
        match plan {
            Plan::Retry { batch, .. } => {
                assert!(batch.lineage.suspect);
                assert_eq!(batch.attempt, 4, "held at the last attempt");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(signal, Signal::Suspect);
        let (plan, signal) =
            whole_batch_failed(single, &retry, &policy(), ctx(11, false), &mut rng);
        assert!(matches!(plan, Plan::DeadLetter { .. }), "{plan:?}");
        assert_eq!(signal, Signal::Nothing);
    }

    /// Found in review: the proof was measured from the record's first
    /// failure, so a success between a passing fault and a later outage
    /// let the outage dead-letter it.
    #[test]
    fn only_a_success_since_the_last_failure_is_proof() {
        let mut rng = StdRng::seed_from_u64(1);
        let retry = Failure::retryable("down");
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        let at = |last_success_id, dispatched| Context {
            dispatched,
            ..ctx(last_success_id, false)
        };
        let single = batch(1, 0..1);
        // A passing fault when 5 batches were out; batch 7 then succeeds.
        let (plan, _) = whole_batch_failed(single, &retry, &policy, at(4, 5), &mut rng);
        let Plan::Retry { batch: single, .. } = plan else {
            panic!("{plan:?}")
        };
        // The outage: two more failures, nothing handed over since succeeds.
        let (plan, _) = whole_batch_failed(single, &retry, &policy, at(7, 8), &mut rng);
        let Plan::Retry { batch: single, .. } = plan else {
            panic!("{plan:?}")
        };
        let (plan, signal) = whole_batch_failed(single, &retry, &policy, at(7, 9), &mut rng);
        assert!(
            matches!(plan, Plan::Retry { ref batch, .. } if batch.lineage.suspect),
            "held, not dead-lettered: {plan:?}"
        );
        assert_eq!(signal, Signal::Suspect);
    }

    #[test]
    fn an_open_circuit_spends_no_attempts_on_named_failures_but_isolation_goes_on() {
        let mut rng = StdRng::seed_from_u64(1);
        let retry = Failure::retryable("down");
        let failures = vec![(0, retry.clone())];
        let plans = records_failed(batch(1, 0..1), failures, &policy(), ctx(0, true), &mut rng);
        assert!(matches!(plans[..], [Plan::Retry { ref batch, .. }] if batch.attempt == 0));
        let mut piece = batch(1, 0..4);
        piece.lineage.isolating = true;
        let (plan, signal) = whole_batch_failed(piece, &retry, &policy(), ctx(0, true), &mut rng);
        assert!(matches!(plan, Plan::Retry { ref batch, .. } if batch.attempt == 1));
        assert_eq!(signal, Signal::Nothing);
    }

    #[test]
    fn named_failures_follow_their_own_rule() {
        let mut rng = StdRng::seed_from_u64(1);
        let failures = vec![
            (0, Failure::permanent("bad")),
            (1, Failure::retryable("busy")),
            (2, Failure::retryable("busy")),
        ];
        let plans = records_failed(batch(1, 0..3), failures, &policy(), ctx(0, false), &mut rng);
        assert_eq!(plans.len(), 2);
        match &plans[0] {
            Plan::DeadLetter { batch, failures } => {
                assert_eq!(batch.offsets().collect::<Vec<_>>(), [0]);
                assert_eq!(failures.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        match &plans[1] {
            Plan::Retry { batch, .. } => {
                assert_eq!(batch.offsets().collect::<Vec<_>>(), [1, 2]);
                assert_eq!(batch.attempt, 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn old_records_are_not_dead_lettered_while_the_circuit_is_open() {
        let mut rng = StdRng::seed_from_u64(1);
        let p = RetryPolicy {
            max_record_age: Some(Duration::from_millis(500)),
            ..policy()
        };
        let failures = vec![(0, Failure::retryable("busy"))];
        let plans = records_failed(batch(1, 0..1), failures.clone(), &p, ctx(0, true), &mut rng);
        assert!(matches!(plans[..], [Plan::Retry { .. }]));
        let plans = records_failed(batch(1, 0..1), failures, &p, ctx(0, false), &mut rng);
        assert!(matches!(plans[..], [Plan::DeadLetter { .. }]));
    }

    #[test]
    fn an_unavailable_batch_is_held_whole_however_long_it_waits() {
        let mut rng = StdRng::seed_from_u64(1);
        let p = RetryPolicy {
            max_record_age: Some(Duration::from_millis(1)),
            ..policy()
        };
        let mut b = batch(1, 0..4);
        for _ in 0..3 * p.max_attempts {
            let (plan, signal) = batch_unavailable(b, &p, ctx(1_000, false), &mut rng);
            assert_eq!(signal, Signal::Suspect);
            match plan {
                Plan::Retry { batch, .. } => {
                    assert_eq!(batch.attempt, 0, "no attempt spent");
                    assert_eq!(batch.len(), 4, "not bisected");
                    assert!(batch.lineage.suspect);
                    b = batch;
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn the_circuit_needs_two_batches_to_open() {
        let now = Instant::now();
        let mut c = Circuit::new(now);
        for _ in 0..10 {
            assert_eq!(c.observe(Signal::Failure { root: 1 }, now), None);
        }
        assert!(!c.is_open(), "one batch retried is not an outage");
        for root in 2..6 {
            let t = c.observe(Signal::Failure { root }, now);
            assert_eq!(t.is_some(), root == 2, "opens once, at the second batch");
        }
        assert!(c.is_open());
        assert!(c.probe_after() > now);
        assert_eq!(c.observe(Signal::Success, now), Some(Transition::Closed));
        assert_eq!(c.streak(), 0);
        assert_eq!(c.observe(Signal::Suspect, now), Some(Transition::Opened));
    }

    /// The scope rule (crate::health): with other tenants succeeding, a
    /// record whose own scope has not succeeded since its failure is held,
    /// without opening the circuit, while its scope has other failing
    /// records; a lone one is dead-lettered after one hold.
    #[test]
    fn a_record_is_judged_by_its_scope() {
        let mut rng = StdRng::seed_from_u64(3);
        let retry = Failure::retryable("503 for tenant a");
        let policy = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        let scoped = |last_success_id, scope_success, others_failing| Context {
            dispatched: 10,
            scope: Some(ScopeEvidence {
                last_success: scope_success,
                others_failing,
            }),
            ..ctx(last_success_id, false)
        };
        let fail = |b, c, rng: &mut StdRng| whole_batch_failed(b, &retry, &policy, c, rng);
        // Its batch fails (stamped 10) and is bisected; the worker is then
        // proven (batch 20), its scope is not: held, circuit untouched.
        let (plan, _) = fail(batch(1, 0..2), scoped(0, 0, false), &mut rng);
        let Plan::Bisect(b, _) = plan else {
            panic!("{plan:?}")
        };
        let (plan, signal) = fail(b, scoped(20, 0, false), &mut rng);
        let Plan::Retry { batch: b, .. } = plan else {
            panic!("{plan:?}")
        };
        assert!(b.lineage.suspect);
        assert_eq!(signal, Signal::Nothing, "the rest works: no circuit");
        // Held once; others of its scope fail too: held again.
        let (plan, _) = fail(b, scoped(20, 0, true), &mut rng);
        let Plan::Retry { batch: b, .. } = plan else {
            panic!("{plan:?}")
        };
        // Alone in its scope but not held a longest back-off yet: held.
        let (plan, _) = fail(b.clone(), scoped(20, 0, false), &mut rng);
        assert!(matches!(plan, Plan::Retry { .. }), "{plan:?}");
        // Held that long and alone in its scope: dead-lettered.
        let ScopeHold { since, until, .. } = b.lineage.scope_hold.expect("held for its scope");
        let waited = Context {
            now: since + policy.max,
            ..scoped(20, 0, false)
        };
        let (plan, _) = fail(b.clone(), waited, &mut rng);
        assert!(matches!(plan, Plan::DeadLetter { .. }), "{plan:?}");
        // On an idle topic no success follows its last failure (stamped 30
        // here): the proof from its hold's start is enough once it waited
        // alone, but not while the circuit is open.
        let (plan, _) = fail(
            b.clone(),
            Context {
                dispatched: 30,
                ..scoped(20, 0, true)
            },
            &mut rng,
        );
        let Plan::Retry { batch: idle, .. } = plan else {
            panic!("{plan:?}")
        };
        // What a failure of `idle` in `c` comes to.
        let plan_for = |c: Context, rng: &mut StdRng| match fail(idle.clone(), c, rng).0 {
            Plan::DeadLetter { .. } => "dead letter",
            Plan::Retry { .. } => "retry",
            plan => panic!("{plan:?}"),
        };
        let idle_ctx = Context {
            now: since + policy.max,
            dispatched: 30,
            ..scoped(20, 0, false)
        };
        assert_eq!(plan_for(idle_ctx, &mut rng), "dead letter");
        let open = Context {
            circuit_open: true,
            ..idle_ctx
        };
        assert_eq!(plan_for(open, &mut rng), "retry");
        // Nor once something else failed since the last success: a whole
        // outage that began after the hold's proof.
        let failing = Context {
            rest_failing: true,
            ..idle_ctx
        };
        assert_eq!(plan_for(failing, &mut rng), "retry");
        // Its hold over, the rest having worked during it decides, but only
        // while nothing else fails.
        let worked = Context {
            now: until,
            ..idle_ctx
        };
        assert_eq!(plan_for(worked, &mut rng), "dead letter");
        let others_failing = Context {
            rest_failing: true,
            scope: Some(ScopeEvidence {
                last_success: 0,
                others_failing: true,
            }),
            ..worked
        };
        assert_eq!(plan_for(others_failing, &mut rng), "retry");
        // Its scope succeeded after the failure: dead-lettered at once, even
        // with others failing.
        let (plan, _) = fail(b.clone(), scoped(20, 15, true), &mut rng);
        assert!(matches!(plan, Plan::DeadLetter { .. }), "{plan:?}");
        // Its hold over, the worker's proof decides, others failing or not.
        let over = Context {
            now: until,
            ..scoped(20, 0, true)
        };
        let unproven = Context {
            now: until,
            circuit_open: true,
            ..scoped(0, 0, false)
        };
        let (plan, signal) = fail(b.clone(), unproven, &mut rng);
        assert!(
            matches!(plan, Plan::Retry { .. }),
            "never dead-lettered without the worker's proof: {plan:?}"
        );
        assert_eq!(
            signal,
            Signal::Suspect,
            "its hold over, the circuit opens for the worker's proof"
        );
        let (plan, _) = fail(b, over, &mut rng);
        assert!(matches!(plan, Plan::DeadLetter { .. }), "{plan:?}");
        // Without the worker's proof it is rule 3: held, and suspect.
        let (plan, _) = fail(batch(2, 0..2), scoped(0, 0, false), &mut rng);
        let Plan::Bisect(b, _) = plan else {
            panic!("{plan:?}")
        };
        let (plan, signal) = fail(b, scoped(0, 0, false), &mut rng);
        let Plan::Retry { batch: b, .. } = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(signal, Signal::Suspect);
        assert_eq!(b.lineage.scope_hold, None, "an outage, not its scope");
        // A batch holding a record of a scope known to be out is split at
        // once, attempts left or not: the rest of it goes on.
        let many = RetryPolicy {
            max_attempts: 5,
            ..policy
        };
        let out = Context {
            scope_out: true,
            ..ctx(0, false)
        };
        let (plan, _) = whole_batch_failed(batch(3, 0..4), &retry, &many, out, &mut rng);
        assert!(matches!(plan, Plan::Bisect(..)), "{plan:?}");
        let (plan, _) = whole_batch_failed(batch(3, 0..4), &retry, &many, ctx(0, false), &mut rng);
        assert!(matches!(plan, Plan::Retry { .. }), "{plan:?}");
    }
}
