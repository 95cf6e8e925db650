//! Where a downstream's health is judged: per key, key prefix or tenant
//! header, so one failing tenant is not mistaken for bad records because
//! other tenants succeed (failure rule 3, see [`crate::failure`]).
//!
//! **The scope rule.** A single record that failed as a whole with its
//! attempts spent, for a retryable reason, is a bad record (dead-lettered)
//! only with proof that the downstream works *for its scope*:
//! - a batch holding a record of the same scope, handed over after this
//!   record's previous failure, succeeded; or
//! - the record has been held for its scope one longest back-off at least,
//!   no *other* record of its scope is held, the circuit is closed, and the
//!   downstream as a whole was proven (rule 3) now, or when the hold began
//!   with no failure counted since the last success: a scope with one
//!   failing record cannot tell a bad record from its own outage, and a
//!   record must not wait for ever; or
//! - its hold (`--health-scope-hold-ms`) is over and the downstream as a
//!   whole was proven now, or worked during the hold with no failure
//!   counted since the last success.
//!
//! Otherwise the record is held. While it waits for its retry, fresh
//! batches of its lane go ahead of it (see the pipeline's dispatch), so the
//! rest works; a success of its scope releases it. Under a full
//! `--max-uncommitted-records` the worker's rule judges the record that
//! holds its partition's commit back.
//!
//! Only scopes with a record held are tracked, by a 64-bit hash of the
//! scope (keyed per process): memory follows the held records, and a
//! healthy worker hashes nothing. An entry goes with its last record when
//! it holds no proof (dead-lettered, revoked), or, as a safety net, once not
//! touched for a [`window`], which outlasts a hold.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use crate::batch::Record;

/// What a record's health is judged by (`--health-scope`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HealthScope {
    /// The record's key; a record without a key is judged by the worker.
    #[default]
    Key,
    /// The key up to the first occurrence of this separator (a tenant in
    /// keys like `tenant-7/order-42`); the whole key without it.
    KeyPrefix(String),
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
            _ => {
                if let Some(name) = s.strip_prefix("header:").filter(|n| !n.is_empty()) {
                    Ok(Self::Header(name.to_owned()))
                } else if let Some(sep) = s.strip_prefix("key-prefix:").filter(|n| !n.is_empty()) {
                    Ok(Self::KeyPrefix(sep.to_owned()))
                } else {
                    Err(format!(
                        "expected key, key-prefix:SEPARATOR, header:NAME or worker, not {s:?}"
                    ))
                }
            }
        }
    }
}

impl std::fmt::Display for HealthScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key => f.write_str("key"),
            Self::Worker => f.write_str("worker"),
            Self::KeyPrefix(sep) => write!(f, "key-prefix:{sep}"),
            Self::Header(name) => write!(f, "header:{name}"),
        }
    }
}

/// How long evidence lasts: a held record is retried at least every
/// `4 x longest_backoff` while its hold lasts, so a scope untouched for that
/// plus the hold has no record held any more. The hold counts too: while
/// the circuit is open, held records are not retried (probes take fresh
/// batches first), and their key's evidence must outlast that, or its
/// records were judged alone, and dead-lettered, once it closed (found in
/// review).
pub fn window(longest_backoff: Duration, hold: Duration) -> Duration {
    (longest_backoff * 4).max(Duration::from_secs(30)) + hold
}

/// A record's identity within the worker.
type RecordId = (i32, i64);

/// A held record of a scope: who, when it was last held, and the highest
/// batch id handed out then (a success of a later batch clears it).
#[derive(Debug, Clone, Copy)]
struct Held {
    record: RecordId,
    at: Instant,
    dispatched: u64,
}

#[derive(Debug, Clone, Copy)]
struct Scope {
    /// The highest id of a batch holding a record of this scope that
    /// succeeded since the scope was first tracked.
    last_success: u64,
    /// The two records of this scope held most recently: two are enough
    /// to tell "another record fails too".
    held: [Option<Held>; 2],
    touched: Instant,
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
    scopes: std::collections::HashMap<u64, Scope>,
    /// When expired entries are dropped next.
    next_prune: Option<Instant>,
    hasher: std::hash::RandomState,
}

impl ScopeHealth {
    pub fn new(scope: HealthScope, window: Duration) -> Self {
        Self {
            scope,
            window,
            scopes: std::collections::HashMap::new(),
            next_prune: None,
            hasher: std::hash::RandomState::new(),
        }
    }

    /// Whether records are judged by a scope at all.
    pub fn scoped(&self) -> bool {
        self.scope != HealthScope::Worker
    }

    /// The hash of a record's scope; `None`: judged by the worker.
    pub fn scope_of(&self, record: &Record<'_>) -> Option<u64> {
        let bytes = match &self.scope {
            HealthScope::Worker => return None,
            HealthScope::Key => record.key?,
            HealthScope::KeyPrefix(sep) => {
                let key = record.key?;
                let sep = sep.as_bytes();
                let end = (!sep.is_empty())
                    .then(|| key.windows(sep.len()).position(|w| w == sep))
                    .flatten();
                &key[..end.unwrap_or(key.len())]
            }
            HealthScope::Header(name) => record
                .headers
                .iter()
                .find(|h| h.name == *name)?
                .value
                .as_deref()?,
        };
        let mut h = self.hasher.build_hasher();
        h.write(bytes);
        Some(h.finish())
    }

    /// Whether [`Self::note_success`] wants the records of a success: only
    /// while some scope has a record held.
    pub fn recording(&self) -> bool {
        !self.scopes.is_empty()
    }

    /// A batch with id `batch_id` succeeded for a record of `scope`: the
    /// scope's proof, and its records held before that batch was handed
    /// over no longer count as failing. Returns whether the scope had
    /// records held: it is back, and they may go again at once.
    pub fn note_success(&mut self, scope: u64, batch_id: u64, now: Instant) -> bool {
        // Pruned here too: entries whose records were released stay until
        // their window ends, and successes are hashed until then only
        // (found in review: they stayed for good).
        self.prune(now);
        let Some(s) = self.scopes.get_mut(&scope) else {
            return false;
        };
        s.last_success = s.last_success.max(batch_id);
        let mut cleared = false;
        for h in &mut s.held {
            if h.is_some_and(|h| h.dispatched < batch_id) {
                *h = None;
                cleared = true;
            }
        }
        cleared
    }

    /// What is known of `scope` for record `record` at `now`.
    pub fn evidence(&self, scope: u64, record: RecordId, now: Instant) -> ScopeEvidence {
        let Some(s) = self.scopes.get(&scope) else {
            return ScopeEvidence {
                last_success: 0,
                others_failing: false,
            };
        };
        let others_failing = s
            .held
            .iter()
            .flatten()
            .any(|h| h.record != record && now.saturating_duration_since(h.at) < self.window);
        ScopeEvidence {
            last_success: s.last_success,
            others_failing,
        }
    }

    /// Whether some record of `batch` is of a scope with a record held: its
    /// failure as a whole is explained by that scope's outage and says
    /// nothing of the downstream as a whole (the circuit does not count it).
    pub fn explains(&self, batch: &crate::batch::Batch, now: Instant) -> bool {
        !self.scopes.is_empty()
            && batch.records().any(|r| {
                self.scope_of(&r)
                    .and_then(|s| self.scopes.get(&s))
                    .is_some_and(|s| {
                        s.held
                            .iter()
                            .flatten()
                            .any(|h| now.saturating_duration_since(h.at) < self.window)
                    })
            })
    }

    /// Record `record` of `scope` is held for want of proof; `dispatched`:
    /// the highest batch id handed out now.
    pub fn note_held(&mut self, scope: u64, record: RecordId, now: Instant, dispatched: u64) {
        self.prune(now);
        let entry = self.scopes.entry(scope).or_insert(Scope {
            last_success: 0,
            held: [None, None],
            touched: now,
        });
        entry.touched = now;
        let held = &mut entry.held;
        let slot = match held
            .iter()
            .position(|h| h.is_some_and(|h| h.record == record))
        {
            Some(i) => i,
            // Else the empty or the older slot.
            None => match held {
                [None, _] => 0,
                [_, None] => 1,
                [Some(a), Some(c)] => usize::from(c.at < a.at),
            },
        };
        held[slot] = Some(Held {
            record,
            at: now,
            dispatched,
        });
    }

    /// Record `record` of `scope` left without a success of its scope
    /// (dead-lettered, or its partition gone): it no longer counts as
    /// failing.
    pub fn note_gone(&mut self, scope: u64, record: RecordId) {
        if let Some(s) = self.scopes.get_mut(&scope) {
            for h in &mut s.held {
                if h.is_some_and(|h| h.record == record) {
                    *h = None;
                }
            }
            // Its proof (a success of the scope) stays until pruned.
            if s.held.iter().all(Option::is_none) && s.last_success == 0 {
                self.scopes.remove(&scope);
            }
        }
    }

    /// Drops the entries untouched for a window, once a window.
    fn prune(&mut self, now: Instant) {
        if self.next_prune.is_some_and(|at| now < at) {
            return;
        }
        let window = self.window;
        self.scopes
            .retain(|_, s| now.saturating_duration_since(s.touched) < window);
        self.next_prune = Some(now + window);
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
        for s in ["key", "worker", "header:tenant", "key-prefix:/"] {
            assert_eq!(s.parse::<HealthScope>().unwrap().to_string(), s);
        }
        assert!("header:".parse::<HealthScope>().is_err());
        assert!("partition".parse::<HealthScope>().is_err());
    }

    #[test]
    fn the_scope_is_the_key_its_prefix_or_the_header_and_none_without_it() {
        let key = ScopeHealth::new(HealthScope::Key, Duration::from_secs(30));
        let a = key.scope_of(&record(Some(b"tenant-a"), &[])).unwrap();
        assert_eq!(key.scope_of(&record(Some(b"tenant-a"), &[])), Some(a));
        assert_ne!(key.scope_of(&record(Some(b"tenant-b"), &[])), Some(a));
        assert_eq!(key.scope_of(&record(None, &[])), None);
        let headers = [Header {
            name: "tenant".into(),
            value: Some(b"a".to_vec()),
        }];
        let header = ScopeHealth::new(
            HealthScope::Header("tenant".into()),
            Duration::from_secs(30),
        );
        let h = header.scope_of(&record(Some(b"x"), &headers)).unwrap();
        assert_eq!(header.scope_of(&record(Some(b"y"), &headers)), Some(h));
        assert_eq!(header.scope_of(&record(Some(b"x"), &[])), None);
        let prefix = ScopeHealth::new(HealthScope::KeyPrefix("/".into()), Duration::from_secs(30));
        let t7 = prefix.scope_of(&record(Some(b"tenant-7/order-1"), &[]));
        assert!(t7.is_some());
        assert_eq!(prefix.scope_of(&record(Some(b"tenant-7/order-2"), &[])), t7);
        assert_eq!(prefix.scope_of(&record(Some(b"tenant-7"), &[])), t7);
        assert_ne!(prefix.scope_of(&record(Some(b"tenant-8/order-1"), &[])), t7);
        // An empty separator (only through the library) is the whole key.
        let empty = ScopeHealth::new(
            HealthScope::KeyPrefix(String::new()),
            Duration::from_secs(30),
        );
        assert!(empty.scope_of(&record(Some(b"k"), &[])).is_some());
        let worker = ScopeHealth::new(HealthScope::Worker, Duration::from_secs(30));
        assert_eq!(worker.scope_of(&record(Some(b"x"), &headers)), None);
        assert!(!worker.scoped());
    }

    #[test]
    fn a_second_held_record_marks_its_scope_failing_until_a_later_batch_succeeds() {
        let t0 = Instant::now();
        let mut s = ScopeHealth::new(HealthScope::Key, Duration::from_secs(30));
        assert!(!s.recording(), "nothing held: nothing hashed");
        s.note_held(7, (0, 1), t0, 10);
        assert!(s.recording());
        assert!(
            !s.evidence(7, (0, 1), t0).others_failing,
            "alone in its scope"
        );
        assert!(s.evidence(7, (0, 2), t0).others_failing);
        s.note_held(7, (0, 2), t0, 11);
        assert!(s.evidence(7, (0, 1), t0).others_failing);
        // A success of a batch handed over before the holds proves nothing
        // and clears nothing (found in review).
        s.note_success(7, 9, t0);
        assert!(s.evidence(7, (0, 1), t0).others_failing);
        // Forgotten after the window.
        let later = t0 + Duration::from_secs(31);
        assert!(!s.evidence(7, (0, 1), later).others_failing);
        // A later success clears them and is the scope's proof.
        s.note_success(7, 12, t0);
        let e = s.evidence(7, (0, 2), t0);
        assert_eq!(e.last_success, 12);
        assert!(!e.others_failing);
        // Another scope knows nothing of it.
        assert_eq!(s.evidence(8, (0, 2), t0).last_success, 0);
    }

    #[test]
    fn a_lone_record_dead_lettered_leaves_its_scope_clear() {
        let t0 = Instant::now();
        let mut s = ScopeHealth::new(HealthScope::Key, Duration::from_secs(30));
        s.note_held(3, (1, 5), t0, 1);
        s.note_held(3, (1, 6), t0, 1);
        s.note_gone(3, (1, 5));
        assert!(
            !s.evidence(3, (1, 6), t0).others_failing,
            "found in the simulation"
        );
        // A third record takes the older slot: (1, 6) at t0 goes, (1, 7)
        // stays.
        s.note_held(3, (1, 7), t0 + Duration::from_secs(1), 1);
        s.note_held(3, (1, 8), t0 + Duration::from_secs(2), 1);
        let now = t0 + Duration::from_secs(2);
        assert!(
            s.evidence(3, (1, 8), now).others_failing,
            "(1, 7) is still held"
        );
        assert!(s.evidence(3, (1, 7), now).others_failing, "(1, 8) is held");
        s.note_gone(3, (1, 7));
        assert!(
            !s.evidence(3, (1, 8), now).others_failing,
            "(1, 6) was replaced"
        );
    }

    #[test]
    fn entries_untouched_for_a_window_are_dropped() {
        let t0 = Instant::now();
        let mut s = ScopeHealth::new(HealthScope::Key, Duration::from_secs(30));
        s.note_held(1, (0, 1), t0, 1);
        s.note_held(2, (0, 2), t0 + Duration::from_secs(31), 1);
        assert_eq!(s.scopes.len(), 1, "the first one expired");
        // Released by a success, then untouched: dropped at a later
        // success, and successes are no longer hashed.
        assert!(s.note_success(2, 5, t0 + Duration::from_secs(32)));
        assert!(s.recording());
        s.note_success(2, 6, t0 + Duration::from_secs(70));
        assert!(!s.recording(), "a healthy worker hashes nothing");
        // A record gone (dead-lettered) leaves no entry behind.
        s.note_held(4, (0, 4), t0, 1);
        s.note_gone(4, (0, 4));
        assert!(!s.recording());
        // Unless its scope's proof is in it: the next bad record of the
        // scope is judged by it at once (found in review: it waited again).
        s.note_held(5, (0, 5), t0, 1);
        s.note_held(5, (0, 6), t0, 1);
        assert!(s.note_success(5, 50, t0));
        s.note_gone(5, (0, 5));
        assert_eq!(s.evidence(5, (0, 6), t0).last_success, 50);
    }
}
