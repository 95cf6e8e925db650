//! Where a downstream's health is judged: per key (or tenant header), so one
//! failing tenant is not mistaken for bad records because other tenants
//! succeed (failure rule 3, see [`crate::failure`]).
//!
//! **The scope rule.** A single record that failed as a whole with its
//! attempts spent, for a retryable reason, is a bad record (dead-lettered)
//! only with proof that the downstream works *for its scope*:
//! - a batch holding a record of the same scope, handed over after this
//!   record's previous failure, succeeded; or
//! - the downstream as a whole was proven (rule 3), the record was already
//!   held once (one longest back-off) and no *other* record of its scope has
//!   failed the same way since the scope last succeeded: a scope with one
//!   failing record cannot tell a bad record from its own outage, and a
//!   record must not wait for ever.
//!
//! Otherwise the record is held (retried with the longest back-off), as for
//! an outage of the whole downstream, but the circuit stays closed: the rest
//! works.
//!
//! Scopes are hashed into a fixed table ([`BUCKETS`]): memory is bounded
//! whatever the key space. Two scopes that share a bucket share their
//! evidence (a success of one proves the other; a failure of one holds the
//! other's lone record until either succeeds). Successes are recorded only
//! while some batch failed whole in the last [`window`], so a healthy
//! worker hashes nothing.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use crate::batch::Record;

/// Buckets of the scope table.
pub const BUCKETS: usize = 4096;

/// What a record's health is judged by (`--health-scope`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HealthScope {
    /// The record's key; a record without a key is judged by the worker.
    #[default]
    Key,
    /// The value of this header (a tenant id); without it, the worker.
    Header(String),
    /// The whole worker: any success proves every record bad.
    Worker,
}

impl std::str::FromStr for HealthScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "key" => Ok(Self::Key),
            "worker" => Ok(Self::Worker),
            _ => match s.strip_prefix("header:") {
                Some(name) if !name.is_empty() => Ok(Self::Header(name.to_owned())),
                _ => Err(format!("expected key, worker or header:NAME, not {s:?}")),
            },
        }
    }
}

impl std::fmt::Display for HealthScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key => f.write_str("key"),
            Self::Worker => f.write_str("worker"),
            Self::Header(name) => write!(f, "header:{name}"),
        }
    }
}

/// How long evidence lasts: a scope's failures older than this are
/// forgotten (its records were revoked or dead-lettered meanwhile), and
/// successes are recorded for this long after a whole failure.
pub fn window(longest_backoff: Duration) -> Duration {
    (longest_backoff * 4).max(Duration::from_secs(30))
}

/// A record's identity within the worker.
type RecordId = (i32, i64);

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// The highest id of a batch holding a record of this scope that
    /// succeeded.
    last_success: u64,
    /// The two records of this scope held most recently since it last
    /// succeeded, each with when it was last held: two are enough to tell
    /// "another record fails too".
    held: [Option<(RecordId, Instant)>; 2],
}

/// What the scope table knows of one record's scope, for
/// [`crate::failure::whole_batch_failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeEvidence {
    /// The highest id of a batch of this scope that succeeded.
    pub last_success: u64,
    /// Another record of this scope is held (within the window).
    pub others_failing: bool,
}

/// The scope table of one worker.
#[derive(Debug)]
pub struct ScopeHealth {
    scope: HealthScope,
    window: Duration,
    /// Allocated at the first whole failure.
    buckets: Vec<Bucket>,
    /// Successes are recorded until then.
    recording_until: Option<Instant>,
    hasher: std::hash::RandomState,
}

impl ScopeHealth {
    pub fn new(scope: HealthScope, window: Duration) -> Self {
        Self {
            scope,
            window,
            buckets: Vec::new(),
            recording_until: None,
            hasher: std::hash::RandomState::new(),
        }
    }

    /// The bucket of a record's scope; `None`: judged by the worker.
    pub fn bucket_of(&self, record: &Record<'_>) -> Option<usize> {
        let bytes = match &self.scope {
            HealthScope::Worker => return None,
            HealthScope::Key => record.key?,
            HealthScope::Header(name) => record
                .headers
                .iter()
                .find(|h| h.name == *name)?
                .value
                .as_deref()?,
        };
        let mut h = self.hasher.build_hasher();
        h.write(bytes);
        Some((h.finish() % BUCKETS as u64) as usize)
    }

    /// A batch failed as a whole: successes count as evidence from now on.
    pub fn note_whole_failure(&mut self, now: Instant) {
        if self.scope == HealthScope::Worker {
            return;
        }
        if self.buckets.is_empty() {
            self.buckets = vec![Bucket::default(); BUCKETS];
        }
        self.recording_until = Some(now + self.window);
    }

    /// Whether [`Self::note_success`] wants the records of a success.
    pub fn recording(&self, now: Instant) -> bool {
        self.recording_until.is_some_and(|until| now < until)
    }

    /// A batch with id `batch_id` succeeded for a record in `bucket`.
    pub fn note_success(&mut self, bucket: usize, batch_id: u64) {
        if let Some(b) = self.buckets.get_mut(bucket) {
            b.last_success = b.last_success.max(batch_id);
            b.held = [None, None];
        }
    }

    /// What is known of `bucket` for record `record` at `now`.
    pub fn evidence(&self, bucket: usize, record: RecordId, now: Instant) -> ScopeEvidence {
        let b = self.buckets.get(bucket).copied().unwrap_or_default();
        let others_failing = b
            .held
            .iter()
            .flatten()
            .any(|(id, at)| *id != record && now.saturating_duration_since(*at) < self.window);
        ScopeEvidence {
            last_success: b.last_success,
            others_failing,
        }
    }

    /// Record `record` of `bucket` is held for want of proof.
    pub fn note_held(&mut self, bucket: usize, record: RecordId, now: Instant) {
        let Some(b) = self.buckets.get_mut(bucket) else {
            return;
        };
        let slot = match b
            .held
            .iter()
            .position(|h| h.is_some_and(|(id, _)| id == record))
        {
            Some(i) => i,
            // Else the empty or the older slot.
            None => match b.held {
                [None, _] => 0,
                [_, None] => 1,
                [Some((_, a)), Some((_, c))] => usize::from(c < a),
            },
        };
        b.held[slot] = Some((record, now));
    }

    /// Record `record` of `bucket` left without a success of its scope
    /// (dead-lettered): it no longer counts as failing.
    pub fn note_gone(&mut self, bucket: usize, record: RecordId) {
        if let Some(b) = self.buckets.get_mut(bucket) {
            for h in &mut b.held {
                if h.is_some_and(|(id, _)| id == record) {
                    *h = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Header;

    fn record<'a>(key: Option<&'a [u8]>, headers: &'a [Header]) -> Record<'a> {
        Record {
            topic: "t",
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key,
            value: None,
            headers,
            decoded: None,
        }
    }

    #[test]
    fn scopes_parse_and_print_back() {
        for s in ["key", "worker", "header:tenant"] {
            assert_eq!(s.parse::<HealthScope>().unwrap().to_string(), s);
        }
        assert!("header:".parse::<HealthScope>().is_err());
        assert!("partition".parse::<HealthScope>().is_err());
    }

    #[test]
    fn the_scope_is_the_key_or_the_header_and_none_without_it() {
        let key = ScopeHealth::new(HealthScope::Key, Duration::from_secs(30));
        let a = key.bucket_of(&record(Some(b"tenant-a"), &[])).unwrap();
        assert_eq!(key.bucket_of(&record(Some(b"tenant-a"), &[])), Some(a));
        assert_eq!(key.bucket_of(&record(None, &[])), None);
        let headers = [Header {
            name: "tenant".into(),
            value: Some(b"a".to_vec()),
        }];
        let header = ScopeHealth::new(
            HealthScope::Header("tenant".into()),
            Duration::from_secs(30),
        );
        let h = header.bucket_of(&record(Some(b"x"), &headers)).unwrap();
        assert_eq!(header.bucket_of(&record(Some(b"y"), &headers)), Some(h));
        assert_eq!(header.bucket_of(&record(Some(b"x"), &[])), None);
        let worker = ScopeHealth::new(HealthScope::Worker, Duration::from_secs(30));
        assert_eq!(worker.bucket_of(&record(Some(b"x"), &headers)), None);
    }

    #[test]
    fn a_second_held_record_marks_its_scope_failing_until_it_succeeds() {
        let t0 = Instant::now();
        let mut s = ScopeHealth::new(HealthScope::Key, Duration::from_secs(30));
        s.note_whole_failure(t0);
        assert!(s.recording(t0));
        s.note_held(7, (0, 1), t0);
        assert!(
            !s.evidence(7, (0, 1), t0).others_failing,
            "alone in its scope"
        );
        assert!(s.evidence(7, (0, 2), t0).others_failing);
        s.note_held(7, (0, 2), t0);
        assert!(s.evidence(7, (0, 1), t0).others_failing);
        // Forgotten after the window.
        let later = t0 + Duration::from_secs(31);
        assert!(!s.evidence(7, (0, 1), later).others_failing);
        assert!(!s.recording(later));
        // A success clears it and is the scope's proof.
        s.note_held(7, (0, 2), t0);
        s.note_held(7, (0, 3), t0);
        s.note_success(7, 12);
        let e = s.evidence(7, (0, 2), t0);
        assert_eq!(e.last_success, 12);
        assert!(!e.others_failing);
    }

    #[test]
    fn a_lone_record_dead_lettered_leaves_its_scope_clear() {
        let t0 = Instant::now();
        let mut s = ScopeHealth::new(HealthScope::Key, Duration::from_secs(30));
        s.note_whole_failure(t0);
        s.note_held(3, (1, 5), t0);
        s.note_held(3, (1, 6), t0);
        s.note_gone(3, (1, 5));
        assert!(
            !s.evidence(3, (1, 6), t0).others_failing,
            "found in the simulation"
        );
        // A third record takes the older slot.
        s.note_held(3, (1, 7), t0 + Duration::from_secs(1));
        s.note_held(3, (1, 8), t0 + Duration::from_secs(2));
        assert!(s.evidence(3, (1, 6), t0).others_failing);
    }

    #[test]
    fn the_worker_scope_records_nothing() {
        let t0 = Instant::now();
        let mut s = ScopeHealth::new(HealthScope::Worker, Duration::from_secs(30));
        s.note_whole_failure(t0);
        assert!(!s.recording(t0));
    }
}
