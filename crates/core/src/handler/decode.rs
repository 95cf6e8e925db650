//! The decoding handler: decodes each record's key and value by their
//! formats (a schema registry's Avro, Protobuf or JSON Schema, or JSON),
//! drops what no `--filter` pattern matches, and hands the rest, decoded,
//! to the handler it wraps.
//!
//! **What becomes of each record** (docs/schemas.md):
//! - decoded and matched: handed on; the wrapped handler's verdict stands;
//! - decoded, matched by no filter: done, committed, counted in
//!   `microbatch_records_filtered_total`, never handed on;
//! - undecodable (the record's fault): failed for good, so it is
//!   dead-lettered with the reason and never retried;
//! - the registry without an answer: the whole batch is
//!   [`BatchOutcome::Unavailable`] and waits, nothing dead-lettered;
//! - the registry refusing the worker's settings: the same, and the worker
//!   stops (see [`Handler::misconfigured`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use microbatch_schema::{DecodeError, Decoder, Filter, Side};
use prometheus_client::metrics::counter::Counter;
use serde_json::{Map, Value};

use super::{BatchOutcome, Failure, Handler};
use crate::batch::{Batch, DecodedFields, Record};

/// The longest the decoding of one batch may wait for the schema registry
/// (a new schema: the schema, where it is registered, its references):
/// then the batch is unavailable, not failed.
pub const DECODE_BUDGET: Duration = Duration::from_secs(30);

/// Records decoded between two yields to the runtime.
const YIELD_EVERY: usize = 64;

/// The prefix of the reason an undecodable record is dead-lettered with.
pub const UNDECODABLE: &str = "undecodable";

pub struct DecodingHandler {
    inner: Arc<dyn Handler>,
    decoder: Decoder,
    filter: Option<Filter>,
    filtered: Counter,
    handler_timeout: Duration,
    misconfigured: Mutex<Option<String>>,
}

impl DecodingHandler {
    /// `handler_timeout` is the configured one: the wrapped handler is held
    /// to it, and the decoding gets [`DECODE_BUDGET`] on top.
    pub fn new(
        inner: Arc<dyn Handler>,
        decoder: Decoder,
        filter: Option<Filter>,
        filtered: Counter,
        handler_timeout: Duration,
    ) -> Self {
        Self {
            inner,
            decoder,
            filter,
            filtered,
            handler_timeout,
            misconfigured: Mutex::new(None),
        }
    }

    async fn decode(&self, record: &Record<'_>) -> Result<DecodedFields, DecodeError> {
        let header = |side: Side| {
            let name = side.schema_id_header();
            record
                .headers
                .iter()
                .rev()
                .find(|h| h.name == name)
                .and_then(|h| h.value.as_deref())
        };
        Ok(DecodedFields {
            key: self
                .decoder
                .decode(Side::Key, record.key, header(Side::Key))
                .await?,
            value: self
                .decoder
                .decode(Side::Value, record.value, header(Side::Value))
                .await?,
        })
    }

    /// Decodes every record: the records to hand on (offset and decoded
    /// fields), the ones that failed for good, and how many were filtered.
    async fn decode_batch(
        &self,
        batch: &Batch,
    ) -> Result<(Vec<(i64, DecodedFields)>, Vec<(i64, Failure)>, u64), DecodeError> {
        let mut keep = Vec::with_capacity(batch.len());
        let mut failures = Vec::new();
        let mut filtered = 0;
        // A schema the registry does not know yet holds the batch, but the
        // rest is decoded: schemas it knows prove it is the right registry,
        // and other unknown ids start their wait now, not one per attempt.
        let mut waiting = None;
        for (i, record) in batch.records().enumerate() {
            if i % YIELD_EVERY == YIELD_EVERY - 1 {
                // Decoding with known schemas never waits: let the timers
                // (the decode budget among them) and other batches run.
                tokio::task::yield_now().await;
            }
            let fields = match self.decode(&record).await {
                Ok(fields) => fields,
                Err(DecodeError::Record(why)) => {
                    failures.push((
                        record.offset,
                        Failure::permanent(format!("{UNDECODABLE}: {why}")),
                    ));
                    continue;
                }
                Err(DecodeError::Unknown(why)) => {
                    waiting.get_or_insert(why);
                    continue;
                }
                Err(other) => return Err(other),
            };
            if let Some(filter) = &self.filter {
                if !filter.matches(&filter_view(&record, &fields)) {
                    filtered += 1;
                    continue;
                }
            }
            keep.push((record.offset, fields));
        }
        match waiting {
            Some(why) => Err(DecodeError::Outage(why)),
            None => Ok((keep, failures, filtered)),
        }
    }
}

/// A record as a filter sees it: decoded key and value where decoded,
/// text otherwise.
fn filter_view(record: &Record<'_>, fields: &DecodedFields) -> Value {
    let side =
        |decoded: &Option<microbatch_schema::Decoded>, bytes: Option<&[u8]>| match (decoded, bytes)
        {
            (Some(d), _) => d.json.clone(),
            (None, Some(b)) => Value::String(String::from_utf8_lossy(b).into_owned()),
            (None, None) => Value::Null,
        };
    let mut map = Map::new();
    map.insert("topic".into(), record.topic.into());
    map.insert("partition".into(), record.partition.into());
    map.insert("offset".into(), record.offset.into());
    map.insert("timestamp_ms".into(), record.timestamp_ms.into());
    map.insert("key".into(), side(&fields.key, record.key));
    map.insert("value".into(), side(&fields.value, record.value));
    let headers: Map<String, Value> = record
        .headers
        .iter()
        .map(|h| {
            let text = h.value.as_deref().map(String::from_utf8_lossy);
            (
                h.name.clone(),
                text.map_or(Value::Null, |t| t.into_owned().into()),
            )
        })
        .collect();
    map.insert("headers".into(), Value::Object(headers));
    Value::Object(map)
}

#[async_trait]
impl Handler for DecodingHandler {
    async fn handle(&self, batch: &Batch) -> BatchOutcome {
        let decoded = match tokio::time::timeout(DECODE_BUDGET, self.decode_batch(batch)).await {
            Ok(Ok(decoded)) => decoded,
            Ok(Err(DecodeError::Outage(why))) => return BatchOutcome::Unavailable(why),
            Ok(Err(DecodeError::Misconfigured(why))) => {
                self.misconfigured
                    .lock()
                    .expect("misconfigured lock")
                    .get_or_insert_with(|| why.clone());
                return BatchOutcome::Unavailable(why);
            }
            Ok(Err(DecodeError::Record(_) | DecodeError::Unknown(_))) => {
                unreachable!("record errors are failures; unknown schemas an outage")
            }
            Err(_) => {
                return BatchOutcome::Unavailable(format!(
                    "the schema registry did not answer within {} s",
                    DECODE_BUDGET.as_secs()
                ))
            }
        };
        let (keep, mut failures, filtered) = decoded;
        // Whether the handler finished any record: filtered records alone
        // prove nothing about the downstream.
        let mut handled = false;
        let tried = !keep.is_empty();
        if !keep.is_empty() {
            let offsets: Vec<i64> = keep.iter().map(|(o, _)| *o).collect();
            let fields = keep.into_iter().map(|(_, f)| f).collect();
            let handed = batch
                .select(batch.id(), |o| offsets.binary_search(&o).is_ok())
                .with_decoded(fields);
            let limit = self.inner.max_time(self.handler_timeout);
            match tokio::time::timeout(limit, self.inner.handle(&handed)).await {
                Ok(BatchOutcome::Success) => handled = true,
                Ok(outcome @ (BatchOutcome::Partial(_) | BatchOutcome::Unhandled { .. })) => {
                    // An inner `Unhandled` succeeded on nothing (its records
                    // were filtered out, or all failed): no proof of health
                    // to pass on (found in review).
                    let (failed, any_handled) = match outcome {
                        BatchOutcome::Partial(failed) => (failed, true),
                        BatchOutcome::Unhandled { failed, .. } => (failed, false),
                        _ => unreachable!("matched above"),
                    };
                    let mut failed: Vec<_> = failed
                        .into_iter()
                        .filter(|(o, _)| offsets.binary_search(o).is_ok())
                        .collect();
                    failed.sort_by_key(|(o, _)| *o);
                    failed.dedup_by_key(|(o, _)| *o);
                    handled = any_handled && failed.len() < offsets.len();
                    failures.extend(failed);
                }
                // Undecodable records in it are isolated by bisection, and
                // failed for good once they stand alone.
                Ok(whole @ (BatchOutcome::Failed(_) | BatchOutcome::Unavailable(_))) => {
                    return whole
                }
                Err(_) => {
                    return BatchOutcome::Failed(Failure::retryable(format!(
                        "handler timed out after {} ms",
                        limit.as_millis()
                    )))
                }
            }
        }
        self.filtered.inc_by(filtered);
        match (handled, failures.is_empty()) {
            (true, true) => BatchOutcome::Success,
            (true, false) => BatchOutcome::Partial(failures),
            (false, _) => BatchOutcome::Unhandled {
                failed: failures,
                tried,
            },
        }
    }

    fn reads_headers(&self) -> bool {
        // Schema ids may come in headers; filters may look at them.
        self.inner.reads_headers() || !self.decoder.is_raw() || self.filter.is_some()
    }

    fn skips_records(&self) -> bool {
        self.filter.is_some() || self.inner.skips_records()
    }

    async fn prepare(&self, slots: usize) {
        self.inner.prepare(slots).await
    }

    fn max_time(&self, timeout: Duration) -> Duration {
        self.inner.max_time(timeout) + DECODE_BUDGET
    }

    async fn ready(&self) {
        self.inner.ready().await
    }

    fn misconfigured(&self) -> Option<String> {
        self.misconfigured
            .lock()
            .expect("misconfigured lock")
            .clone()
            .or_else(|| self.inner.misconfigured())
    }

    async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use microbatch_schema::Format;
    use std::sync::Arc;

    /// Records what it was handed; fails the offsets it is told to.
    struct Recorder {
        seen: Mutex<Vec<(i64, Option<Value>)>>,
        fail: Vec<i64>,
    }

    #[async_trait]
    impl Handler for Recorder {
        async fn handle(&self, batch: &Batch) -> BatchOutcome {
            let mut seen = self.seen.lock().unwrap();
            for r in batch.records() {
                let value = r
                    .decoded
                    .and_then(|d| d.value.as_ref())
                    .map(|d| d.json.clone());
                seen.push((r.offset, value));
            }
            let failed: Vec<_> = batch
                .offsets()
                .filter(|o| self.fail.contains(o))
                .map(|o| (o, Failure::retryable("busy")))
                .collect();
            if failed.is_empty() {
                BatchOutcome::Success
            } else {
                BatchOutcome::Partial(failed)
            }
        }
    }

    fn batch(values: &[&str]) -> Batch {
        let mut b = Batch::new(1, Arc::from("t"), 0);
        for (i, v) in values.iter().enumerate() {
            b.push(i as i64, Some(1), None, Some(v.as_bytes()), []);
        }
        b
    }

    #[tokio::test]
    async fn undecodable_records_fail_for_good_filtered_ones_are_done_the_rest_go_on_decoded() {
        let inner = Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            fail: vec![3],
        });
        let filtered = Counter::default();
        let handler = DecodingHandler::new(
            inner.clone(),
            Decoder::new(Format::Raw, Format::Json, None),
            Some(Filter::parse(&[r#"{"value":{"n":[{"numeric":[">",1]}]}}"#]).unwrap()),
            filtered.clone(),
            Duration::from_secs(5),
        );
        let b = batch(&[r#"{"n":1}"#, "not json", r#"{"n":2}"#, r#"{"n":3}"#]);
        let outcome = handler.handle(&b).await;
        let BatchOutcome::Partial(failed) = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(failed.len(), 2);
        assert_eq!(failed[0].0, 1);
        assert!(!failed[0].1.retryable);
        assert!(failed[0]
            .1
            .error
            .starts_with("undecodable: value (json): not JSON"));
        assert_eq!(failed[1], (3, Failure::retryable("busy")));
        assert_eq!(
            *inner.seen.lock().unwrap(),
            [
                (2, Some(serde_json::json!({"n": 2}))),
                (3, Some(serde_json::json!({"n": 3})))
            ]
        );
        assert_eq!(filtered.get(), 1, "offset 0");
        assert!(handler.reads_headers());
    }

    /// Found in review: an inner handler that succeeded on nothing
    /// (`Unhandled`, its records filtered out by a layer of its own) made
    /// the whole batch a success, a proof of health for rule 3.
    #[tokio::test]
    async fn an_inner_handler_that_handled_nothing_proves_nothing() {
        struct Nothing;
        #[async_trait]
        impl Handler for Nothing {
            async fn handle(&self, _: &Batch) -> BatchOutcome {
                BatchOutcome::Unhandled {
                    failed: Vec::new(),
                    tried: false,
                }
            }
        }
        let handler = DecodingHandler::new(
            Arc::new(Nothing),
            Decoder::new(Format::Raw, Format::Raw, None),
            None,
            Counter::default(),
            Duration::from_secs(5),
        );
        let outcome = handler.handle(&batch(&["a", "b"])).await;
        assert!(
            matches!(outcome, BatchOutcome::Unhandled { .. }),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn filtered_records_alone_prove_nothing_about_the_downstream() {
        let inner = Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            fail: vec![1],
        });
        let handler = DecodingHandler::new(
            inner.clone(),
            Decoder::new(Format::Raw, Format::Json, None),
            Some(Filter::parse(&[r#"{"value":{"n":[1]}}"#]).unwrap()),
            Counter::default(),
            Duration::from_secs(5),
        );
        // Only offset 1 is handed on, and it fails: the filtered 0 is done
        // but nothing was handled.
        let outcome = handler.handle(&batch(&[r#"{"n":0}"#, r#"{"n":1}"#])).await;
        assert_eq!(
            outcome,
            BatchOutcome::Unhandled {
                failed: vec![(1, Failure::retryable("busy"))],
                tried: true
            }
        );
        // Nothing handed on at all.
        let outcome = handler.handle(&batch(&[r#"{"n":0}"#, "{"])).await;
        assert!(
            matches!(&outcome, BatchOutcome::Unhandled { failed: f, tried: false } if f.len() == 1 && f[0].0 == 1),
            "{outcome:?}"
        );
        assert_eq!(
            handler.handle(&batch(&[r#"{"n":5}"#])).await,
            BatchOutcome::Unhandled {
                failed: vec![],
                tried: false
            }
        );
    }

    #[tokio::test]
    async fn a_registry_without_an_answer_holds_the_whole_batch() {
        let registry = microbatch_schema::Registry::new(&microbatch_schema::RegistryConfig {
            // A port nothing listens on: connection refused at once.
            url: "http://127.0.0.1:9/apis/ccompat/v7".into(),
            auth: None,
            ca_pem: None,
            timeout: Duration::from_secs(2),
        })
        .unwrap();
        let inner = Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            fail: vec![],
        });
        let handler = DecodingHandler::new(
            inner.clone(),
            Decoder::new(
                Format::Raw,
                Format::Avro,
                Some(Arc::new(microbatch_schema::Schemas::new(registry))),
            ),
            None,
            Counter::default(),
            Duration::from_secs(5),
        );
        let mut b = Batch::new(1, Arc::from("t"), 0);
        b.push(0, None, None, Some(&[0, 0, 0, 0, 1, 2]), []);
        b.push(1, None, None, Some(b"no magic"), []);
        let outcome = handler.handle(&b).await;
        assert!(
            matches!(&outcome, BatchOutcome::Unavailable(why) if why.contains("unavailable")),
            "{outcome:?}"
        );
        assert!(inner.seen.lock().unwrap().is_empty());
        assert_eq!(handler.misconfigured(), None);
    }
}
