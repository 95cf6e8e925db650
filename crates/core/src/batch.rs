//! Microbatches and the rule that closes them.
//!
//! **The batch rule.** A lane's open batch is closed and handed on as soon as
//! any of these holds: it has `max_records` records; its key + value bytes
//! reached `max_bytes` (a single larger record still forms a batch of its own);
//! or `max_wait` has passed since its *first* record arrived. An empty lane has
//! no timer running.
//!
//! A [`Batch`] keeps every key and value in one buffer, so forming a batch costs
//! a few allocations, not several per record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::BatchLimits;

/// One record header: name and optional value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    len: u32,
}

#[derive(Debug, Clone)]
struct Meta {
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<Span>,
    value: Option<Span>,
    /// Range into `Batch::headers`.
    headers: (u32, u32),
}

/// A microbatch: records of one partition, in offset order.
#[derive(Debug, Clone)]
pub struct Batch {
    id: u64,
    topic: Arc<str>,
    partition: i32,
    metas: Vec<Meta>,
    data: Vec<u8>,
    headers: Vec<Header>,
    /// How many times these records were handed to the handler before.
    pub attempt: u32,
    /// Where these records were first batched, for failure decisions.
    pub lineage: Lineage,
    /// Each record's key and value decoded by their formats, when the
    /// decoding handler made this batch for the handler it wraps; empty
    /// otherwise (and in batches made from this one).
    decoded: Vec<DecodedFields>,
}

/// A record's key and value as JSON, decoded by their formats (see
/// [`crate::handler::DecodingHandler`]); `None` where the side is raw or null.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DecodedFields {
    pub key: Option<microbatch_schema::Decoded>,
    pub value: Option<microbatch_schema::Decoded>,
}

/// The history of a batch's records that failure handling needs (see
/// [`crate::failure`]). Copied into retries and bisection pieces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lineage {
    /// The id of the batch the records were first handed out in.
    pub root: u64,
    /// A piece made by bisection: a failure is being narrowed down to the
    /// record that causes it.
    pub isolating: bool,
    /// The highest batch id the pipeline had handed out when these records
    /// last failed as a whole: a batch with a higher id that succeeds was
    /// handed over after that failure was reported, and proves the
    /// downstream works for other records.
    pub dispatched_at_last_failure: Option<u64>,
    /// Held back as a suspected outage rather than a bad record.
    pub suspect: bool,
    /// Held for its scope's own proof of health (see [`crate::health`]);
    /// meanwhile it asks for no proof of the worker's.
    pub scope_hold: Option<ScopeHold>,
}

impl Lineage {
    /// Whether these records are held for their scope's proof at `now`:
    /// held, and the hold not over.
    pub fn held_for_scope(&self, now: Instant) -> bool {
        self.scope_hold.is_some_and(|h| now < h.until)
    }
}

/// When a record's hold for its scope began and ends (see [`Lineage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeHold {
    pub since: Instant,
    pub until: Instant,
    /// The highest batch id handed out when it began: a success of a later
    /// one shows the rest of the downstream worked during the hold.
    pub dispatched: u64,
    /// Whether the rest of the downstream was seen to work since the
    /// record's failure before its hold began.
    pub proven: bool,
}

/// A view of one record of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [Header],
    pub decoded: Option<&'a DecodedFields>,
}

impl Batch {
    pub fn new(id: u64, topic: Arc<str>, partition: i32) -> Self {
        Self {
            id,
            topic,
            partition,
            metas: Vec::new(),
            data: Vec::new(),
            headers: Vec::new(),
            attempt: 0,
            lineage: Lineage {
                root: id,
                ..Lineage::default()
            },
            decoded: Vec::new(),
        }
    }

    /// Attaches each record's decoded key and value, in record order.
    pub fn with_decoded(mut self, decoded: Vec<DecodedFields>) -> Self {
        assert_eq!(decoded.len(), self.len(), "one decoded entry per record");
        self.decoded = decoded;
        self
    }

    fn push_bytes(&mut self, bytes: Option<&[u8]>) -> Option<Span> {
        bytes.map(|b| {
            let start = self.data.len() as u32;
            self.data.extend_from_slice(b);
            Span {
                start,
                len: b.len() as u32,
            }
        })
    }

    /// Appends a record; offsets must rise.
    pub fn push(
        &mut self,
        offset: i64,
        timestamp_ms: Option<i64>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: impl IntoIterator<Item = Header>,
    ) {
        debug_assert!(self.metas.last().map(|m| m.offset < offset).unwrap_or(true));
        let key = self.push_bytes(key);
        let value = self.push_bytes(value);
        let first = self.headers.len() as u32;
        self.headers.extend(headers);
        let last = self.headers.len() as u32;
        self.metas.push(Meta {
            offset,
            timestamp_ms,
            key,
            value,
            headers: (first, last),
        });
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn topic_arc(&self) -> &Arc<str> {
        &self.topic
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn len(&self) -> usize {
        self.metas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.metas.is_empty()
    }

    /// Key and value bytes held.
    pub fn payload_bytes(&self) -> usize {
        self.data.len()
    }

    /// Key and value bytes of the records whose offset `keep` takes.
    pub fn payload_bytes_where(&self, mut keep: impl FnMut(i64) -> bool) -> usize {
        self.records()
            .filter(|r| keep(r.offset))
            .map(|r| r.key.map_or(0, <[u8]>::len) + r.value.map_or(0, <[u8]>::len))
            .sum()
    }

    fn slice(&self, span: Option<Span>) -> Option<&[u8]> {
        span.map(|s| &self.data[s.start as usize..(s.start + s.len) as usize])
    }

    fn view(&self, index: usize, meta: &Meta) -> Record<'_> {
        Record {
            topic: &self.topic,
            partition: self.partition,
            offset: meta.offset,
            timestamp_ms: meta.timestamp_ms,
            key: self.slice(meta.key),
            value: self.slice(meta.value),
            headers: &self.headers[meta.headers.0 as usize..meta.headers.1 as usize],
            decoded: self.decoded.get(index),
        }
    }

    pub fn records(&self) -> impl ExactSizeIterator<Item = Record<'_>> + '_ {
        self.metas.iter().enumerate().map(|(i, m)| self.view(i, m))
    }

    pub fn offsets(&self) -> impl ExactSizeIterator<Item = i64> + '_ {
        self.metas.iter().map(|m| m.offset)
    }

    pub fn first_offset(&self) -> Option<i64> {
        self.metas.first().map(|m| m.offset)
    }

    pub fn last_offset(&self) -> Option<i64> {
        self.metas.last().map(|m| m.offset)
    }

    /// A new batch with the records `keep` accepts, in the same order.
    pub fn select(&self, id: u64, mut keep: impl FnMut(i64) -> bool) -> Batch {
        let mut out = Batch::new(id, self.topic.clone(), self.partition);
        out.attempt = self.attempt;
        out.lineage = self.lineage;
        for (i, meta) in self
            .metas
            .iter()
            .enumerate()
            .filter(|(_, m)| keep(m.offset))
        {
            let r = self.view(i, meta);
            out.push(
                r.offset,
                r.timestamp_ms,
                r.key,
                r.value,
                r.headers.iter().cloned(),
            );
        }
        out
    }

    /// The two halves of a batch of two or more records, with this batch's
    /// id (the pipeline gives every batch it hands out a fresh one).
    pub fn halves(&self) -> (Batch, Batch) {
        self.split(self.id)
            .expect("halves of a batch of two or more records")
    }

    /// Gives the batch a new id, as each hand-out to the handler does.
    pub fn set_id(&mut self, id: u64) {
        self.id = id;
    }

    /// Splits in two halves (for bisecting a failed batch); `None` for one record.
    pub fn split(&self, first_id: u64) -> Option<(Batch, Batch)> {
        if self.len() < 2 {
            return None;
        }
        let mid = self.metas[self.len() / 2].offset;
        Some((
            self.select(first_id, |o| o < mid),
            self.select(first_id + 1, |o| o >= mid),
        ))
    }
}

/// Builds the batches of one lane under the batch rule.
#[derive(Debug)]
pub struct Batcher {
    limits: BatchLimits,
    open: Option<(Batch, Instant)>,
}

impl Batcher {
    pub fn new(limits: BatchLimits) -> Self {
        Self { limits, open: None }
    }

    /// Records in the open batch.
    pub fn len(&self) -> usize {
        self.open.as_ref().map(|(b, _)| b.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_none()
    }

    /// Adds a record, opening a batch with `new_batch` when none is open.
    /// Returns the batch if this record closed it.
    pub fn push(
        &mut self,
        now: Instant,
        new_batch: impl FnOnce() -> Batch,
        fill: impl FnOnce(&mut Batch),
    ) -> Option<Batch> {
        let (batch, _) = self.open.get_or_insert_with(|| (new_batch(), now));
        fill(batch);
        if batch.len() >= self.limits.max_records || batch.payload_bytes() >= self.limits.max_bytes
        {
            return self.open.take().map(|(b, _)| b);
        }
        None
    }

    /// When the open batch must close, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.open
            .as_ref()
            .map(|(_, started)| *started + self.limits.max_wait)
    }

    /// Closes the open batch if its wait is over.
    pub fn poll_expired(&mut self, now: Instant) -> Option<Batch> {
        match self.deadline() {
            Some(deadline) if now >= deadline => self.open.take().map(|(b, _)| b),
            _ => None,
        }
    }

    /// The highest offset in the open batch, if one is open.
    pub fn open_last_offset(&self) -> Option<i64> {
        self.open.as_ref().and_then(|(b, _)| b.last_offset())
    }

    /// Closes the open batch whatever its age.
    pub fn take(&mut self) -> Option<Batch> {
        self.open.take().map(|(b, _)| b)
    }

    pub fn max_wait(&self) -> Duration {
        self.limits.max_wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(records: usize, bytes: usize, wait_ms: u64) -> BatchLimits {
        BatchLimits::new(records, bytes, Duration::from_millis(wait_ms)).unwrap()
    }

    fn push(b: &mut Batcher, now: Instant, offset: i64, value: &[u8]) -> Option<Batch> {
        b.push(
            now,
            || Batch::new(offset as u64, Arc::from("t"), 0),
            |batch| batch.push(offset, None, None, Some(value), []),
        )
    }

    #[test]
    fn closes_at_max_records() {
        let mut b = Batcher::new(limits(3, 1 << 20, 500));
        let t = Instant::now();
        assert!(push(&mut b, t, 0, b"a").is_none());
        assert!(push(&mut b, t, 1, b"b").is_none());
        let batch = push(&mut b, t, 2, b"c").expect("third record closes the batch");
        assert_eq!(batch.offsets().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(b.is_empty());
    }

    #[test]
    fn closes_at_max_bytes_and_oversized_record_goes_alone() {
        let mut b = Batcher::new(limits(100, 10, 500));
        let t = Instant::now();
        assert!(push(&mut b, t, 0, b"12345").is_none());
        assert_eq!(push(&mut b, t, 1, b"12345").unwrap().len(), 2);
        assert_eq!(push(&mut b, t, 2, &[0u8; 50]).unwrap().len(), 1);
    }

    #[test]
    fn timer_starts_at_first_record() {
        let mut b = Batcher::new(limits(100, 1 << 20, 500));
        let t0 = Instant::now();
        assert_eq!(b.deadline(), None, "an empty lane has no timer");
        push(&mut b, t0, 0, b"a");
        push(&mut b, t0 + Duration::from_millis(400), 1, b"b");
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(500)));
        assert!(b.poll_expired(t0 + Duration::from_millis(499)).is_none());
        assert_eq!(
            b.poll_expired(t0 + Duration::from_millis(500))
                .unwrap()
                .len(),
            2
        );
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn records_keep_keys_values_and_headers() {
        let mut batch = Batch::new(1, Arc::from("t"), 3);
        batch.push(
            10,
            Some(5),
            Some(b"k"),
            Some(b"v"),
            [Header {
                name: "h".into(),
                value: Some(b"x".to_vec()),
            }],
        );
        batch.push(11, None, None, None, []);
        let recs: Vec<_> = batch.records().collect();
        assert_eq!(recs[0].key, Some(&b"k"[..]));
        assert_eq!(recs[0].value, Some(&b"v"[..]));
        assert_eq!(recs[0].headers.len(), 1);
        assert_eq!(recs[1].key, None);
        assert!(recs[1].headers.is_empty());
        let (a, b) = batch.split(7).unwrap();
        assert_eq!((a.len(), b.len()), (1, 1));
        assert_eq!(b.records().next().unwrap().offset, 11);
    }
}
