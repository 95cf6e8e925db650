//! One way to look at a group, shared by `supervise`, `scaler` and `lag`:
//! lag, time-weighted rates, the workers' capacity reports and (where asked)
//! the group's member count, turned into a policy [`Observation`]. A
//! consumer group's lag, or a share group's backlog ([`crate::share_lag`]).

use std::time::Instant;

use microbatch_kafka::capacity_report::unix_ms_now;
use microbatch_kafka::share::backlog::SOURCE_START_OFFSET;
use microbatch_kafka::share::ShareError;
use microbatch_kafka::ClientError;

use crate::capacity::WorkerCapacity;
use crate::lag::{GroupLag, InvalidOffsetPolicy, LagReader, RateTracker, Rates};
use crate::policy::Observation;
use crate::share_lag::{backlog_as_lag, ShareLagReader};

/// Why a reading failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Group(#[from] ClientError),
    #[error("reading the share group's backlog: {0}")]
    Share(#[from] ShareError),
}

/// Where the lag comes from.
enum Source {
    Group(LagReader),
    Share(Box<ShareLagReader>),
}

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
    source: Source,
    rates: RateTracker,
    /// The rates of the last reading, kept through one that cannot count.
    last_rates: Rates,
    invalid_offset: InvalidOffsetPolicy,
    /// A share group's backlog came from the fallback (said once).
    fallback_said: bool,
}

impl Observer {
    pub fn new(reader: LagReader, invalid_offset: InvalidOffsetPolicy) -> Self {
        Self::with_source(Source::Group(reader), invalid_offset)
    }

    /// A share group's backlog; `invalid_offset` is what a partition the
    /// broker has no state for yet counts as.
    pub fn share(reader: ShareLagReader, invalid_offset: InvalidOffsetPolicy) -> Self {
        Self::with_source(Source::Share(Box::new(reader)), invalid_offset)
    }

    fn with_source(source: Source, invalid_offset: InvalidOffsetPolicy) -> Self {
        Self {
            source,
            rates: RateTracker::default(),
            last_rates: Rates::default(),
            invalid_offset,
            fallback_said: false,
        }
    }

    /// A consumer group's lag reader, for look-ups beyond one topic's
    /// reading; `None` for a share group.
    pub fn reader(&self) -> Option<&LagReader> {
        match &self.source {
            Source::Group(reader) => Some(reader),
            Source::Share(_) => None,
        }
    }

    /// Reads now; `members` also asks the broker for the group's members
    /// (a share group's come with every reading).
    pub fn read(&mut self, members: bool) -> Result<Reading, ReadError> {
        let (lag, members) = match &self.source {
            Source::Group(reader) => {
                let lag = reader.read(self.invalid_offset)?;
                let members = if members {
                    reader.members().map(|n| n as u32)
                } else {
                    None
                };
                (lag, members)
            }
            Source::Share(reader) => {
                let backlog = reader.read()?;
                if backlog.backlog_source == SOURCE_START_OFFSET && !self.fallback_said {
                    self.fallback_said = true;
                    tracing::warn!(
                        "the broker reports no share-group lag (DescribeShareGroupOffsets v1, Kafka 4.2+): \
                         the backlog is read as the high watermark less the start offset, which can stay \
                         above 0 after every record is done, so the count may not fall to the minimum"
                    );
                }
                let members = u32::try_from(backlog.members).ok();
                let mut lag = backlog_as_lag(&backlog, self.invalid_offset);
                reader.set_ages(&backlog, &mut lag);
                lag.commit_metadata = reader.worker_reports();
                (lag, members)
            }
        };
        let at = Instant::now();
        // A partition whose committed offset could not be read would count
        // from the start of its log, and an offline one drops out of the
        // sums, so the next good reading would look like a burst of
        // progress or arrivals: such a reading leaves the rates as they
        // were (its users fail it: `GroupLag::unreadable`).
        let rates = if lag.unreadable().is_some() {
            self.last_rates
        } else {
            self.rates.observe(at, &lag)
        };
        self.last_rates = rates;
        let capacity = WorkerCapacity::from_metadata(
            lag.commit_metadata.iter().map(String::as_str),
            unix_ms_now(),
        );
        Ok(Reading {
            at,
            lag,
            rates,
            capacity,
            members,
        })
    }
}
