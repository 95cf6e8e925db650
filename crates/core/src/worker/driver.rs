//! The worker's one loop: turn the pipeline (events in, clock, intents
//! out), stop when the turn says its condition holds, else wait for what
//! can move it. The poll loop, a revocation's drain and the final commit's
//! retries are this loop with different conditions and ways to wait.

use std::time::{Duration, Instant};

/// What a turn found.
pub(super) enum Next {
    /// The condition holds: the loop ends.
    Done,
    /// Turn again at this time at the latest (earlier if `wait` returns
    /// sooner: an event, a record).
    TurnBy(Instant),
}

/// Runs `turn` on `state` until it says [`Next::Done`], calling `wait` with
/// the time left until the next turn is due in between.
pub(super) fn turn_until<S>(
    state: &mut S,
    mut turn: impl FnMut(&mut S, Instant) -> Next,
    mut wait: impl FnMut(&mut S, Duration),
) {
    loop {
        let Next::TurnBy(due) = turn(state, Instant::now()) else {
            return;
        };
        // From after the turn: a turn can take long (a synchronous commit).
        wait(state, due.saturating_duration_since(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_until_the_condition_and_waits_between() {
        let mut log = Vec::new();
        turn_until(
            &mut log,
            |log, now| {
                log.push("turn");
                if log.len() >= 5 {
                    Next::Done
                } else {
                    Next::TurnBy(now + Duration::from_millis(1))
                }
            },
            |log, left| {
                assert!(left <= Duration::from_millis(1));
                log.push("wait");
            },
        );
        assert_eq!(log, ["turn", "wait", "turn", "wait", "turn"]);
    }
}
