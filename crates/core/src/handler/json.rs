//! The JSON shape of a batch and of a handler's answer, shared by the `exec`
//! and `http` handlers (see the README's protocol section).

use base64::Engine;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::{BatchOutcome, Failure};
use crate::batch::{Batch, DecodedFields, Header, Record};
use microbatch_schema::Decoded;

struct JsonRecord<'a>(Record<'a>);
struct JsonHeaders<'a>(&'a [Header], bool);

fn utf8(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

impl Serialize for JsonHeaders<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (headers, want_text) = (self.0, self.1);
        let mut map = s.serialize_map(None)?;
        for h in headers {
            let value = h.value.as_deref().unwrap_or(b"");
            match (utf8(value), want_text) {
                (Some(text), true) => map.serialize_entry(&h.name, text)?,
                (None, false) => map.serialize_entry(
                    &h.name,
                    &base64::engine::general_purpose::STANDARD.encode(value),
                )?,
                _ => {}
            }
        }
        map.end()
    }
}

impl Serialize for JsonRecord<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = &self.0;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("topic", r.topic)?;
        map.serialize_entry("partition", &r.partition)?;
        map.serialize_entry("offset", &r.offset)?;
        let decoded =
            |side: fn(&DecodedFields) -> &Option<Decoded>| r.decoded.and_then(|d| side(d).as_ref());
        for (name, bytes, decoded, schema_name) in [
            ("key", r.key, decoded(|d| &d.key), "key_schema"),
            ("value", r.value, decoded(|d| &d.value), "value_schema"),
        ] {
            if let Some(decoded) = decoded {
                map.serialize_entry(name, &decoded.json)?;
                if let Some(schema) = &decoded.schema {
                    map.serialize_entry(schema_name, &**schema)?;
                }
                continue;
            }
            match bytes {
                None => map.serialize_entry(name, &())?,
                Some(b) => match utf8(b) {
                    Some(text) => map.serialize_entry(name, text)?,
                    None => map.serialize_entry(
                        &format!("{name}_base64"),
                        &base64::engine::general_purpose::STANDARD.encode(b),
                    )?,
                },
            }
        }
        map.serialize_entry("headers", &JsonHeaders(r.headers, true))?;
        if r.headers
            .iter()
            .any(|h| utf8(h.value.as_deref().unwrap_or(b"")).is_none())
        {
            map.serialize_entry("headers_base64", &JsonHeaders(r.headers, false))?;
        }
        map.serialize_entry("timestamp_ms", &r.timestamp_ms)?;
        map.end()
    }
}

struct JsonBatch<'a>(&'a Batch);

impl Serialize for JsonBatch<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let b = self.0;
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry("batch_id", &batch_id(b))?;
        map.serialize_entry("attempt", &(b.attempt + 1))?;
        map.serialize_entry("records", &JsonRecords(b))?;
        map.end()
    }
}

struct JsonRecords<'a>(&'a Batch);

impl Serialize for JsonRecords<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.records().map(JsonRecord))
    }
}

/// The id a batch carries on the wire, and its answer must name.
pub fn batch_id(batch: &Batch) -> String {
    format!("{}-{}-{}", batch.topic(), batch.partition(), batch.id())
}

/// Writes a batch as one line of JSON (with the trailing newline) into `out`.
pub fn encode_batch(batch: &Batch, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, &JsonBatch(batch)).expect("writing JSON to a Vec cannot fail");
    out.push(b'\n');
}

#[derive(Debug, Deserialize)]
struct FailedRecord {
    #[serde(default)]
    partition: Option<i32>,
    offset: i64,
    #[serde(default)]
    error: Option<String>,
    #[serde(default = "default_true")]
    retryable: bool,
}

fn default_true() -> bool {
    true
}

/// A handler's answer: `{"batch_id":"…","failed":[{"partition","offset","error","retryable"}]}`,
/// or `{"batch_id":"…","error":"…","retryable":false}` to fail the whole batch.
/// An answer must say one or the other: an object with neither `failed` nor
/// `error` (the request echoed back, a GraphQL `{"data":…,"errors":…}`) is
/// not an answer. Other keys are allowed; a key given twice is refused.
#[derive(Debug, Deserialize)]
pub struct FailureReport {
    #[serde(default)]
    batch_id: Option<String>,
    #[serde(default)]
    failed: Option<Vec<FailedRecord>>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default = "default_true")]
    retryable: bool,
}

/// What one line from an `exec` child is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// Not an answer (a log line, a blank line): skipped.
    Noise,
    /// The answer for this batch.
    Answer(BatchOutcome),
    /// An answer that cannot be trusted (another batch's, unreadable, or
    /// naming records outside the batch): the batch fails and the child is
    /// replaced, since its next answers may be off by one.
    Broken(String),
    /// An answer in the protocol before `batch_id`: broken as above, and a
    /// sign the command was written for another version of the protocol.
    OldProtocol(String),
}

/// The keys of an answer; an object with only these and no `batch_id` is an
/// answer in the protocol before `batch_id`.
const ANSWER_KEYS: [&str; 4] = ["batch_id", "failed", "error", "retryable"];

impl FailureReport {
    /// Reads one line of an `exec` child's stdout while `batch` waits for
    /// its answer. See [`Line`].
    pub fn classify(line: &[u8], batch: &Batch) -> Line {
        let Ok(serde_json::Value::Object(object)) = serde_json::from_slice(line) else {
            return Line::Noise;
        };
        let expected = batch_id(batch);
        match object.get("batch_id") {
            None if !object.is_empty() && object.keys().any(|k| !ANSWER_KEYS.contains(&k.as_str())) => {
                Line::Noise
            }
            // Only the old protocol's answer shape counts as one: a bare
            // `{"error":"…"}` may as well be a log line of the handler's.
            None if !object.contains_key("failed") => Line::Broken(format!(
                "the handler printed {{\"error\":…}} without \"batch_id\" while batch {expected} \
                 was waiting: answer {{\"batch_id\":\"{expected}\",\"error\":…}}, and log to stderr"
            )),
            None => Line::OldProtocol(format!(
                "the handler answered without \"batch_id\" (the protocol before it): \
                 answer {{\"batch_id\":\"{expected}\",\"failed\":[…]}} (see the README's exec protocol)"
            )),
            Some(serde_json::Value::String(id)) if *id == expected => {
                // Read again from the text, not the map: the map keeps the
                // last of a key given twice, the struct refuses it.
                match serde_json::from_slice::<FailureReport>(line) {
                    Ok(report) => match report.into_outcome(batch) {
                        Ok(outcome) => Line::Answer(outcome),
                        Err(broken) => Line::Broken(broken),
                    },
                    Err(e) => Line::Broken(format!("the answer for {expected} cannot be read: {e}")),
                }
            }
            Some(other) => Line::Broken(format!(
                "the handler answered batch {other} while batch {expected} was waiting"
            )),
        }
    }

    /// Reads an HTTP response body that is not empty (the caller decides
    /// what an empty one means): an answer object whose `batch_id`, if
    /// given, names this batch and whose `failed` entries name only its
    /// records. Anything else fails the batch (retryable).
    pub fn parse(text: &[u8], batch: &Batch) -> BatchOutcome {
        if !text.trim_ascii_start().starts_with(b"{") {
            return BatchOutcome::Failed(Failure::retryable(format!(
                "handler answer is not a JSON object: {}",
                String::from_utf8_lossy(&text[..text.len().min(200)])
            )));
        }
        match serde_json::from_slice::<FailureReport>(text) {
            Ok(report) => match &report.batch_id {
                Some(id) if *id != batch_id(batch) => BatchOutcome::Failed(Failure::retryable(
                    format!("the answer names batch {id}, not {}", batch_id(batch)),
                )),
                _ => report
                    .into_outcome(batch)
                    .unwrap_or_else(|broken| BatchOutcome::Failed(Failure::retryable(broken))),
            },
            Err(e) => BatchOutcome::Failed(Failure::retryable(format!(
                "handler answer is not valid JSON ({e}): {}",
                String::from_utf8_lossy(&text[..text.len().min(200)])
            ))),
        }
    }

    /// The verdict this answer gives `batch`, or why it cannot be one.
    ///
    /// Every record an answer names must be in the batch: an entry for
    /// another partition or an offset the batch does not hold (a handler
    /// that counts positions within the batch, or answers from a stale
    /// request) is a broken answer, never skipped. Skipping it would take
    /// the records it meant as done, as Lambda refuses an unknown item
    /// identifier for the same reason. An offset named twice counts once,
    /// with its first entry.
    fn into_outcome(self, batch: &Batch) -> Result<BatchOutcome, String> {
        if let Some(error) = self.error {
            return Ok(BatchOutcome::Failed(Failure {
                error,
                retryable: self.retryable,
            }));
        }
        let Some(entries) = self.failed else {
            return Err(format!(
                "the answer for {} has neither \"failed\" nor \"error\": answer \
                 {{\"failed\":[]}} when every record succeeded",
                batch_id(batch)
            ));
        };
        if entries.is_empty() {
            return Ok(BatchOutcome::Success);
        }
        let mut held: Vec<i64> = batch.offsets().collect();
        held.sort_unstable();
        let mut named = std::collections::HashSet::with_capacity(entries.len());
        let mut failed = Vec::with_capacity(entries.len());
        for f in entries {
            if let Some(p) = f.partition.filter(|&p| p != batch.partition()) {
                return Err(format!(
                    "the answer for {} names partition {p}, but the batch holds partition {} only",
                    batch_id(batch),
                    batch.partition()
                ));
            }
            if held.binary_search(&f.offset).is_err() {
                return Err(format!(
                    "the answer for {} names offset {}, which the batch does not hold \
                     (it holds {} records, offsets {}..={}); name records by their Kafka \
                     offset, not their position in the batch",
                    batch_id(batch),
                    f.offset,
                    held.len(),
                    held.first().copied().unwrap_or_default(),
                    held.last().copied().unwrap_or_default(),
                ));
            }
            if !named.insert(f.offset) {
                continue;
            }
            let error = f.error.unwrap_or_else(|| "failed by handler".into());
            failed.push((
                f.offset,
                Failure {
                    error,
                    retryable: f.retryable,
                },
            ));
        }
        Ok(BatchOutcome::Partial(failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn batch() -> Batch {
        let mut b = Batch::new(7, Arc::from("orders"), 2);
        b.push(
            40,
            Some(1000),
            Some(b"k1"),
            Some(b"hello"),
            [Header {
                name: "h".into(),
                value: Some(b"v".to_vec()),
            }],
        );
        b.push(41, None, None, Some(&[0xff, 0xfe]), []);
        b
    }

    #[test]
    fn encodes_the_documented_shape() {
        let mut out = Vec::new();
        encode_batch(&batch(), &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["batch_id"], "orders-2-7");
        let r0 = &v["records"][0];
        assert_eq!(r0["topic"], "orders");
        assert_eq!(r0["partition"], 2);
        assert_eq!(r0["offset"], 40);
        assert_eq!(r0["key"], "k1");
        assert_eq!(r0["value"], "hello");
        assert_eq!(r0["headers"]["h"], "v");
        assert_eq!(r0["timestamp_ms"], 1000);
        let r1 = &v["records"][1];
        assert!(r1["key"].is_null());
        assert_eq!(r1["value_base64"], "//4=");
    }

    #[test]
    fn classifies_exec_lines() {
        let b = batch();
        let id = batch_id(&b);
        assert_eq!(id, "orders-2-7");
        for noise in [
            &b""[..],
            b"\n",
            b"starting up",
            br#"{"level":"info","msg":"connected"}"#,
            br#"{"level":"error","error":"db slow"}"#,
            b"[1,2]",
        ] {
            assert_eq!(FailureReport::classify(noise, &b), Line::Noise, "{noise:?}");
        }
        assert_eq!(
            FailureReport::classify(br#"{"batch_id":"orders-2-7","failed":[]}"#, &b),
            Line::Answer(BatchOutcome::Success)
        );
        assert!(matches!(
            FailureReport::classify(br#"{"batch_id":"orders-2-6","failed":[]}"#, &b),
            Line::Broken(e) if e.contains("orders-2-6")
        ));
        assert!(matches!(
            FailureReport::classify(br#"{"failed":[]}"#, &b),
            Line::OldProtocol(e) if e.contains("batch_id")
        ));
        assert!(matches!(
            FailureReport::classify(br#"{}"#, &b),
            Line::Broken(_)
        ));
        assert!(
            matches!(
                FailureReport::classify(br#"{"error":"db down"}"#, &b),
                Line::Broken(_)
            ),
            "a bare error line is broken, not a sign of the old protocol"
        );
        assert!(matches!(
            FailureReport::classify(br#"{"batch_id":"orders-2-7","failed":7}"#, &b),
            Line::Broken(_)
        ));
    }

    #[test]
    fn an_answer_naming_records_outside_the_batch_is_broken() {
        let b = batch();
        for answer in [
            // Positions within the batch instead of offsets.
            &br#"{"batch_id":"orders-2-7","failed":[{"offset":0}]}"#[..],
            br#"{"batch_id":"orders-2-7","failed":[{"offset":1000041}]}"#,
            br#"{"batch_id":"orders-2-7","failed":[{"partition":3,"offset":41}]}"#,
            // One good entry does not make the bad one acceptable.
            br#"{"batch_id":"orders-2-7","failed":[{"offset":41},{"offset":42}]}"#,
        ] {
            assert!(
                matches!(FailureReport::classify(answer, &b), Line::Broken(e) if e.contains("does not hold") || e.contains("partition 3")),
                "exec: {}",
                String::from_utf8_lossy(answer)
            );
            assert!(
                matches!(
                    FailureReport::parse(answer, &b),
                    BatchOutcome::Failed(Failure {
                        retryable: true,
                        ..
                    })
                ),
                "http: {}",
                String::from_utf8_lossy(answer)
            );
        }
        // An offset named twice is one failure, with its first entry.
        assert_eq!(
            FailureReport::parse(
                br#"{"failed":[{"offset":41,"error":"a"},{"offset":41,"error":"b"}]}"#,
                &b
            ),
            BatchOutcome::Partial(vec![(41, Failure::retryable("a"))])
        );
    }

    #[test]
    fn an_object_that_says_neither_failed_nor_error_is_no_answer() {
        let b = batch();
        // The request echoed back (`--command cat`, a debugging print).
        let mut echo = Vec::new();
        encode_batch(&b, &mut echo);
        assert!(matches!(
            FailureReport::classify(&echo, &b),
            Line::Broken(_)
        ));
        // A key given twice: the last would win in a map.
        assert!(matches!(
            FailureReport::classify(
                br#"{"batch_id":"orders-2-7","failed":[{"offset":41}],"failed":[]}"#,
                &b
            ),
            Line::Broken(_)
        ));
        for body in [
            &br#"{"batch_id":"orders-2-7"}"#[..],
            b"{}",
            b"[]",
            br#"{"data":null,"errors":[{"message":"boom"}]}"#,
            br#"{"failed":[{"offset":41}],"failed":[]}"#,
            b"   ",
        ] {
            assert!(
                matches!(
                    FailureReport::parse(body, &b),
                    BatchOutcome::Failed(Failure {
                        retryable: true,
                        ..
                    })
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn parses_answers() {
        let b = batch();
        assert_eq!(
            FailureReport::parse(br#"{"failed":[]}"#, &b),
            BatchOutcome::Success
        );
        match FailureReport::parse(
            br#"{"failed":[{"partition":2,"offset":41,"error":"bad","retryable":false}]}"#,
            &b,
        ) {
            BatchOutcome::Partial(f) => {
                assert_eq!(f.len(), 1);
                assert_eq!(f[0].0, 41);
                assert!(!f[0].1.retryable);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            FailureReport::parse(br#"{"error":"down"}"#, &b),
            BatchOutcome::Failed(Failure {
                retryable: true,
                ..
            })
        ));
        assert!(matches!(
            FailureReport::parse(b"nope", &b),
            BatchOutcome::Failed(_)
        ));
        assert!(matches!(
            FailureReport::parse(br#"{"batch_id":"x-1-1","failed":[]}"#, &b),
            BatchOutcome::Failed(Failure {
                retryable: true,
                ..
            })
        ));
    }

    /// Outside input, fuzzed: any bytes and any JSON a handler may print
    /// or answer. Nothing panics, and nothing is a success by accident: an
    /// answer is a success only if it names the batch (exec; http when it
    /// names one at all) and fails no record and not the batch; a partial
    /// answer names only the batch's records. `MICROBATCH_FUZZ_CASES` runs
    /// more cases than the default.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;
        use serde_json::{json, Value};

        fn cases() -> u32 {
            std::env::var("MICROBATCH_FUZZ_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2_000)
        }

        /// Offsets near and in the batch (40, 41), positions, huge and negative.
        fn offset() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(json!(40)),
                Just(json!(41)),
                (-3i64..50).prop_map(|o| json!(o)),
                any::<i64>().prop_map(|o| json!(o)),
                Just(json!(41.0)),
                Just(json!("41")),
                Just(Value::Null),
            ]
        }

        fn scalar() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                "[a-z0-9 -]{0,12}".prop_map(Value::String),
                Just(json!("orders-2-7")),
                Just(json!("orders-2-6")),
            ]
        }

        fn entry() -> impl Strategy<Value = Value> {
            (
                proptest::option::of(prop_oneof![Just(json!(2)), Just(json!(3)), scalar()]),
                proptest::option::of(offset()),
                proptest::option::of(scalar()),
                proptest::option::of(prop_oneof![any::<bool>().prop_map(Value::Bool), scalar()]),
            )
                .prop_map(|(partition, offset, error, retryable)| {
                    let mut m = serde_json::Map::new();
                    for (k, v) in [
                        ("partition", partition),
                        ("offset", offset),
                        ("error", error),
                        ("retryable", retryable),
                    ] {
                        if let Some(v) = v {
                            m.insert(k.into(), v);
                        }
                    }
                    Value::Object(m)
                })
        }

        /// Objects built from the answer's keys and others, with values of
        /// the right and the wrong types.
        fn answer() -> impl Strategy<Value = Value> {
            (
                proptest::option::of(scalar()),
                proptest::option::of(prop_oneof![
                    proptest::collection::vec(entry(), 0..4).prop_map(Value::Array),
                    scalar(),
                ]),
                proptest::option::of(scalar()),
                proptest::option::of(scalar()),
                proptest::option::of(("[a-z]{1,6}", scalar())),
            )
                .prop_map(|(batch_id, failed, error, retryable, other)| {
                    let mut m = serde_json::Map::new();
                    for (k, v) in [
                        ("batch_id", batch_id),
                        ("failed", failed),
                        ("error", error),
                        ("retryable", retryable),
                    ] {
                        if let Some(v) = v {
                            m.insert(k.into(), v);
                        }
                    }
                    if let Some((k, v)) = other {
                        m.insert(k, v);
                    }
                    Value::Object(m)
                })
        }

        /// Whether `v` may be read as a success for the batch "orders-2-7":
        /// no record failed and not the batch.
        fn fails_nothing(v: &Value) -> bool {
            let failed_none = match v.get("failed") {
                None => true,
                Some(Value::Array(a)) => a.is_empty(),
                Some(_) => false,
            };
            let error_none = matches!(v.get("error"), None | Some(Value::Null));
            failed_none && error_none
        }

        fn check_partial(outcome: &BatchOutcome) -> Result<(), TestCaseError> {
            if let BatchOutcome::Partial(failed) = outcome {
                prop_assert!(!failed.is_empty());
                for (offset, _) in failed {
                    prop_assert!(
                        *offset == 40 || *offset == 41,
                        "offset {offset} is not in the batch"
                    );
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(cases()))]

            #[test]
            fn any_bytes_are_classified_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let b = batch();
                let _ = FailureReport::classify(&bytes, &b);
                let outcome = FailureReport::parse(&bytes, &b);
                if outcome == BatchOutcome::Success {
                    let text = std::str::from_utf8(&bytes).unwrap_or("x");
                    prop_assert!(
                        text.trim().is_empty() || serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object() && fails_nothing(&v)),
                        "success from {bytes:?}"
                    );
                }
                check_partial(&outcome)?;
            }

            #[test]
            fn any_answer_is_a_success_only_when_it_says_so(v in answer()) {
                let b = batch();
                let line = serde_json::to_vec(&v).expect("a JSON value serialises");
                match FailureReport::classify(&line, &b) {
                    Line::Answer(outcome) => {
                        prop_assert_eq!(v.get("batch_id"), Some(&json!("orders-2-7")), "an answer must name its batch");
                        if outcome == BatchOutcome::Success {
                            prop_assert!(fails_nothing(&v), "success from {}", v);
                        }
                        check_partial(&outcome)?;
                    }
                    Line::Broken(_) | Line::OldProtocol(_) | Line::Noise => {}
                }
                let outcome = FailureReport::parse(&line, &b);
                if outcome == BatchOutcome::Success {
                    prop_assert!(fails_nothing(&v), "success from {}", v);
                    prop_assert!(
                        matches!(v.get("batch_id"), None | Some(Value::Null)) || v.get("batch_id") == Some(&json!("orders-2-7")),
                        "success for another batch: {}", v
                    );
                }
                check_partial(&outcome)?;
            }
        }
    }
}
