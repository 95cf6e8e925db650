//! Dead letters: records that failed for good wait here for their write to
//! the dead-letter topic, and are tried again with a growing back-off until
//! the broker acknowledges them; nothing past them is committed until then.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::batch::Batch;
use crate::handler::Failure;

use super::{DeadLetterSlot, Intent, Pipeline, Slot};

pub(super) const FIRST_DEAD_LETTER_BACKOFF: Duration = Duration::from_millis(200);
const MAX_DEAD_LETTER_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(super) struct PendingDeadLetter {
    pub batch: Batch,
    pub failures: Vec<(i64, Failure)>,
    pub attempts: u32,
    pub at: Instant,
    pub backoff: Duration,
}

impl Pipeline {
    /// A dead-letter write ended: `written` are acknowledged by the broker;
    /// `error` says why the rest were not.
    pub fn handle_dead_lettered(
        &mut self,
        slot: DeadLetterSlot,
        written: &[i64],
        error: Option<String>,
        now: Instant,
    ) {
        if !self.is_current(slot.partition, slot.epoch) {
            return;
        }
        let ps = self
            .partitions
            .get_mut(&slot.partition)
            .expect("checked current");
        let Some(mut pending) = ps.dead_letters_in_flight.remove(&slot.id) else {
            return;
        };
        self.counted.records_dead_lettered += written.len() as u64;
        self.report.records_dead_lettered += written.len() as u64;
        let written_set: HashSet<i64> = written.iter().copied().collect();
        let bytes = pending
            .batch
            .payload_bytes_where(|o| written_set.contains(&o));
        self.mark_done(slot.partition, written.iter().copied(), bytes);
        // Not counted as processed: the capacity report measures the handler.
        let Some(error) = error else {
            if self.dead_letter_backlog() == 0 {
                self.dead_letter_error = None;
            }
            return;
        };
        let rest = pending
            .batch
            .select(pending.batch.id(), |o| !written.contains(&o));
        if rest.is_empty() {
            return;
        }
        tracing::error!(
            partition = slot.partition,
            records = rest.len(),
            retry_in_ms = pending.backoff.as_millis() as u64,
            error = %error,
            "dead letters not written; nothing past them is committed until they are"
        );
        self.dead_letter_error = Some(format!("{} records waiting: {error}", rest.len()));
        pending.batch = rest;
        pending.at = now + pending.backoff;
        pending.backoff = (pending.backoff * 2).min(MAX_DEAD_LETTER_BACKOFF);
        let ps = self
            .partitions
            .get_mut(&slot.partition)
            .expect("checked current");
        ps.dead_letters.push_back(pending);
    }

    /// What the dead-letter topic already holds of a partition's records
    /// (see [`Intent::FindDeadLetters`]): they are not written again, and
    /// the dead letters waiting for the answer go out.
    pub fn handle_earlier_dead_letters(
        &mut self,
        partition: i32,
        epoch: u64,
        found: &[(i64, Option<i64>)],
    ) {
        // After the final commit nothing more is written.
        if !self.is_current(partition, epoch) || self.phase == super::Phase::Closed {
            return;
        }
        let ps = self
            .partitions
            .get_mut(&partition)
            .expect("checked current");
        ps.earlier_dead_letters = Some(found.iter().copied().collect());
        let offsets = found;
        if !offsets.is_empty() {
            tracing::info!(
                partition,
                records = offsets.len(),
                "dead letters of this partition's uncommitted records found in the dead-letter \
                 topic (written before a restart or rebalance); they are not written again"
            );
        }
        self.dispatch_dead_letters(self.clock);
    }

    /// Hands out dead-letter writes that are due; records whose dead
    /// letter the topic holds already are done without one.
    pub(super) fn dispatch_dead_letters(&mut self, now: Instant) {
        let mut found: Vec<(i32, Vec<i64>, usize)> = Vec::new();
        let look = !self.sabotage.ignore_earlier_dead_letters();
        for (p, ps) in self.partitions.iter_mut() {
            let Some(earlier) = &ps.earlier_dead_letters else {
                continue;
            };
            while ps.dead_letters.front().is_some_and(|d| d.at <= now) {
                let mut pending = ps.dead_letters.pop_front().expect("checked above");
                if look && !earlier.is_empty() {
                    // The same record: its offset and its timestamp.
                    let already: Vec<i64> = pending
                        .batch
                        .records()
                        // A record without one is not matched: a second
                        // dead letter rather than a record without any.
                        .filter(|r| {
                            r.timestamp_ms.is_some()
                                && earlier.get(&r.offset) == Some(&r.timestamp_ms)
                        })
                        .map(|r| r.offset)
                        .collect();
                    if !already.is_empty() {
                        let bytes = pending.batch.payload_bytes_where(|o| already.contains(&o));
                        pending.batch = pending
                            .batch
                            .select(pending.batch.id(), |o| !already.contains(&o));
                        found.push((*p, already, bytes));
                        if pending.batch.is_empty() {
                            continue;
                        }
                    }
                }
                self.next_dead_letter_id += 1;
                let slot = DeadLetterSlot {
                    partition: *p,
                    epoch: ps.epoch,
                    id: self.next_dead_letter_id,
                };
                self.intents.push_back(Intent::DeadLetter {
                    slot,
                    batch: pending.batch.clone(),
                    failures: pending.failures.clone(),
                    attempts: pending.attempts,
                });
                ps.dead_letters_in_flight.insert(slot.id, pending);
            }
        }
        for (partition, offsets, bytes) in found {
            tracing::info!(
                partition,
                offsets = ?offsets,
                "already in the dead-letter topic; not written again"
            );
            self.counted.dead_letters_found += offsets.len() as u64;
            self.mark_done(partition, offsets.into_iter(), bytes);
        }
    }

    /// Queues records that failed for good for their dead letter.
    pub(super) fn queue_dead_letter(
        &mut self,
        slot: Slot,
        batch: Batch,
        failures: Vec<(i64, Failure)>,
        now: Instant,
    ) {
        for (offset, failure) in &failures {
            tracing::warn!(
                partition = slot.partition,
                offset,
                attempts = batch.attempt,
                error = %failure.error,
                "record failed for good; writing it to the dead-letter topic"
            );
        }
        let attempts = batch.attempt;
        // An error about records no longer held (their partition revoked
        // or lost) is not this dead letter's.
        if self.dead_letter_backlog() == 0 {
            self.dead_letter_error = None;
        }
        let ps = self
            .partitions
            .get_mut(&slot.partition)
            .expect("slot checked current");
        ps.dead_letters.push_back(PendingDeadLetter {
            batch,
            failures,
            attempts,
            at: now,
            backoff: FIRST_DEAD_LETTER_BACKOFF,
        });
        self.dispatch_dead_letters(now);
    }
}
