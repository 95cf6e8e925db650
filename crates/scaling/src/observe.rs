//! One way to look at a group, shared by `supervise`, `scaler` and `lag`:
//! lag, time-weighted rates, the workers' capacity reports and (where asked)
//! the group's member count, turned into a policy [`Observation`].

use std::time::Instant;

use microbatch_kafka::capacity_report::unix_ms_now;
use microbatch_kafka::ClientError;

use crate::capacity::WorkerCapacity;
use crate::lag::{GroupLag, InvalidOffsetPolicy, LagReader, RateTracker, Rates};
use crate::policy::Observation;

/// What one look at the group found.
#[derive(Debug, Clone)]
pub struct Reading {
    pub at: Instant,
    pub lag: GroupLag,
    pub rates: Rates,
    pub capacity: Option<WorkerCapacity>,
    /// The group's members, when asked for and the broker lists groups.
    pub members: Option<u32>,
}

impl Reading {
    /// The replicas running as far as the group tells: its members, else
    /// the workers that report.
    pub fn replicas_seen(&self) -> Option<u32> {
        self.members
            .or_else(|| self.capacity.as_ref().map(|c| c.workers))
    }

    /// The policy's view, with `current` replicas running.
    pub fn observation(&self, current: u32) -> Observation<'_> {
        Observation {
            lag: &self.lag,
            rates: self.rates,
            capacity: self.capacity.as_ref(),
            current,
        }
    }
}

/// Reads a group's lag and keeps what turns readings into rates.
pub struct Observer {
    reader: LagReader,
    rates: RateTracker,
    invalid_offset: InvalidOffsetPolicy,
}

impl Observer {
    pub fn new(reader: LagReader, invalid_offset: InvalidOffsetPolicy) -> Self {
        Self {
            reader,
            rates: RateTracker::default(),
            invalid_offset,
        }
    }

    /// The lag reader, for look-ups beyond one topic's reading.
    pub fn reader(&self) -> &LagReader {
        &self.reader
    }

    /// Reads now; `members` also asks the broker for the group's members.
    pub fn read(&mut self, members: bool) -> Result<Reading, ClientError> {
        let lag = self.reader.read(self.invalid_offset)?;
        let at = Instant::now();
        let rates = self.rates.observe(at, &lag);
        let capacity = WorkerCapacity::from_metadata(
            lag.commit_metadata.iter().map(String::as_str),
            unix_ms_now(),
        );
        let members = if members {
            self.reader.members().map(|n| n as u32)
        } else {
            None
        };
        Ok(Reading {
            at,
            lag,
            rates,
            capacity,
            members,
        })
    }
}
