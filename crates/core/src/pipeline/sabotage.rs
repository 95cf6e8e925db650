//! Deliberate defects for the simulation's self-test: each breaks one
//! invariant, to prove the simulation would catch it.
//!
//! The pipeline asks [`Sabotage`] at the few places a defect is planted.
//! Outside tests it is empty and every answer is "no", so the production
//! paths carry no test code: the questions compile away.

use crate::failure::Plan;

macro_rules! sabotage {
    ($($(#[$doc:meta])* $name:ident),+ $(,)?) => {
        #[cfg(test)]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub(crate) struct Sabotage {
            $($(#[$doc])* pub $name: bool,)+
        }

        #[cfg(not(test))]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub(crate) struct Sabotage {}

        impl Sabotage {
            $(
                #[inline(always)]
                pub(crate) fn $name(self) -> bool {
                    #[cfg(test)]
                    return self.$name;
                    #[cfg(not(test))]
                    return false;
                }
            )+
        }
    };
}

sabotage!(
    /// Commits one offset past the watermark.
    commit_one_past,
    /// Forgets records planned for a retry.
    drop_retries,
    /// Starts a batch in a lane that has one in flight.
    ignore_lane_busy,
    /// Dead-letters records at their first failure.
    dead_letter_first_failure,
    /// Pauses nothing.
    never_pause,
    /// Starts batches whatever the records cap.
    ignore_records_cap,
    /// The records cap leaves out records waiting for a retry.
    uncounted_retries,
    /// Batches exempt from the records cap pass it by any amount.
    unbounded_exemptions,
    /// An acknowledgement older than one before it is taken for a stale
    /// answer, not for what the broker holds.
    keep_highest_ack,
    /// Writes dead letters the dead-letter topic holds already.
    ignore_earlier_dead_letters,
);

impl Sabotage {
    /// The failure plan, as a planted defect changes it (`None`: dropped).
    #[inline(always)]
    pub(crate) fn plan(self, plan: Plan) -> Option<Plan> {
        match plan {
            // Forget the records: nothing will ever finish them.
            Plan::Retry { .. } if self.drop_retries() => None,
            Plan::Retry { batch, .. } if self.dead_letter_first_failure() => {
                let failures = batch
                    .offsets()
                    .map(|o| (o, crate::handler::Failure::retryable("sabotage")))
                    .collect();
                Some(Plan::DeadLetter { batch, failures })
            }
            plan => Some(plan),
        }
    }
}
