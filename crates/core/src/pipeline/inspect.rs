//! Test-only views of the pipeline's state, for the simulation.

use std::time::Instant;

use super::partition::PartitionState;
use super::Pipeline;

impl Pipeline {
    /// (replayable finished records, records in flight), for the simulation.
    pub(crate) fn exposure(&self) -> (usize, usize) {
        (
            self.partitions
                .values()
                .map(PartitionState::replayable)
                .sum(),
            self.in_flight_records,
        )
    }

    /// A one-line picture of the state, for the simulation's failure reports.
    pub(crate) fn debug_state(&self, now: Instant) -> String {
        let mut out = format!(
            "phase {:?} in_flight {} held {} circuit_open {} probe in {:?} ms, zombies {:?};",
            self.phase,
            self.in_flight,
            self.held,
            self.circuit.is_open(),
            self.circuit
                .probe_after()
                .saturating_duration_since(now)
                .as_millis(),
            self.zombies
        );
        for (p, ps) in &self.partitions {
            out += &format!(
                " p{p}[epoch {} wm {:?} held {} paused {} finishing {} dlq {}+{} lanes:",
                ps.epoch,
                ps.offsets.watermark(),
                ps.held,
                ps.paused,
                ps.finishing(),
                ps.dead_letters.len(),
                ps.dead_letters_in_flight.len()
            );
            for lane in &ps.lanes {
                out += &format!(
                    " (busy {} open {} ready {:?} retry {:?})",
                    lane.busy(),
                    lane.batcher.len(),
                    lane.ready
                        .iter()
                        .map(|b| b.offsets().collect::<Vec<_>>())
                        .collect::<Vec<_>>(),
                    lane.retry
                        .iter()
                        .map(|(b, due)| (
                            b.offsets().collect::<Vec<_>>(),
                            b.attempt,
                            b.lineage.suspect,
                            due.saturating_duration_since(now).as_millis()
                        ))
                        .collect::<Vec<_>>()
                );
            }
            out += "]";
        }
        out
    }
}
