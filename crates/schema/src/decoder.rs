//! Records' keys and values to JSON, by format: the schemas a topic's
//! records name are fetched once, compiled once and kept.
//!
//! **What a failure is** (docs/schemas.md). Bytes that cannot be decoded
//! (no wire-format prefix, a schema id the registry does not have, a schema
//! of another format, data that does not fit its schema, a schema that
//! cannot be compiled) are the record's fault: [`DecodeError::Record`],
//! dead-lettered with the reason, never retried. A registry without an
//! answer is [`DecodeError::Outage`]: the record waits. Wrong registry
//! settings are [`DecodeError::Misconfigured`]: the worker stops.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;

use crate::avro::AvroSchema;
use crate::json_schema::{parse_json, JsonSchema};
use crate::protobuf::{ProtobufSchema, Source};
use crate::registry::{RegisteredSchema, Registry, RegistryError};
use crate::wire::{self, SchemaId};

/// How long a schema the registry does not have (after
/// [`NOT_FOUND_GRACE`]), or one that does not compile, is remembered as
/// such: records naming it are dead-lettered without a request each, and
/// one registered later is found after this.
pub const MISSING_SCHEMA_TTL: Duration = Duration::from_secs(30);

/// How long a schema id the registry does not know is waited for before
/// records naming it are the records' fault.
pub const NOT_FOUND_GRACE: Duration = Duration::from_secs(10);

/// The most unknown schema ids remembered at once.
const MAX_MISSING: usize = 10_000;

/// The deepest chain of references followed, and the most schemas one
/// schema may pull in: more is a cycle or a mistake.
const MAX_REFERENCE_DEPTH: usize = 32;
const MAX_REFERENCES: usize = 256;

/// How a key or a value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Bytes as they are (text, or base64 when not UTF-8).
    #[default]
    Raw,
    /// JSON text, no registry.
    Json,
    /// The registry's wire format with an Avro schema.
    Avro,
    /// The registry's wire format with a Protobuf schema.
    Protobuf,
    /// The registry's wire format with a JSON Schema.
    JsonSchema,
}

impl Format {
    pub const NAMES: &'static str = "raw, json, avro, protobuf, json-schema";
    pub const ALL: [Format; 5] = [
        Format::Raw,
        Format::Json,
        Format::Avro,
        Format::Protobuf,
        Format::JsonSchema,
    ];

    /// Whether records of this format name a registered schema.
    pub fn uses_registry(self) -> bool {
        matches!(self, Format::Avro | Format::Protobuf | Format::JsonSchema)
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Json => "json",
            Format::Avro => "avro",
            Format::Protobuf => "protobuf",
            Format::JsonSchema => "json-schema",
        }
    }

    /// The registry's `schemaType` of this format.
    fn schema_type(self) -> &'static str {
        match self {
            Format::Protobuf => "PROTOBUF",
            Format::JsonSchema => "JSON",
            _ => "AVRO",
        }
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "raw" => Format::Raw,
            "json" => Format::Json,
            "avro" => Format::Avro,
            "protobuf" => Format::Protobuf,
            "json-schema" => Format::JsonSchema,
            other => return Err(format!("unknown format {other}: one of {}", Format::NAMES)),
        })
    }
}

impl serde::Serialize for Format {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Format {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A key or value that is not the record itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Key,
    Value,
}

impl Side {
    /// The header that may carry this side's schema id.
    pub fn schema_id_header(self) -> &'static str {
        match self {
            Side::Key => wire::KEY_SCHEMA_ID_HEADER,
            Side::Value => wire::VALUE_SCHEMA_ID_HEADER,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Side::Key => "key",
            Side::Value => "value",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The record's own fault: dead-letter it with this reason.
    #[error("{0}")]
    Record(String),
    /// The registry gave no answer: try again later.
    #[error("{0}")]
    Outage(String),
    /// The registry does not know the schema yet (see [`NOT_FOUND_GRACE`]):
    /// the record waits, as in an outage, but the registry answers, so the
    /// rest of its batch may be decoded meanwhile.
    #[error("{0}")]
    Unknown(String),
    /// The worker's registry settings are wrong: stop.
    #[error("{0}")]
    Misconfigured(String),
}

/// A decoded key or value.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub json: Value,
    /// `{"id":…,"subject":…,"version":…}` of the schema that wrote it
    /// (subject and version when the registry names them).
    pub schema: Option<Arc<Value>>,
}

enum Kind {
    Avro(AvroSchema),
    Protobuf(ProtobufSchema),
    Json(JsonSchema),
}

struct Compiled {
    kind: Kind,
    schema_type: String,
    info: Arc<Value>,
}

/// The registry and the schemas fetched from it so far.
pub struct Schemas {
    registry: Registry,
    ready: Mutex<HashMap<SchemaId, Arc<Compiled>>>,
    missing: Mutex<HashMap<SchemaId, Missing>>,
    /// Referenced schemas fetched, by (subject, version): kept across
    /// attempts, so a schema with many references fetched by a slow
    /// registry gets there over several.
    referenced: Mutex<HashMap<(String, i64), RegisteredSchema>>,
    /// The topic's own subjects, named first where a schema is registered
    /// under several.
    subjects: Vec<String>,
    /// Whether any schema has been found: until one is, a registry that
    /// knows none of the ids may be the wrong registry, and nothing is
    /// dead-lettered for it.
    found_any: AtomicBool,
    /// One fetch at a time: batches that need the same new schema wait for
    /// the first one's fetch instead of each asking the registry.
    fetching: tokio::sync::Mutex<()>,
}

/// A schema id the registry did not know.
struct Missing {
    /// When it was first missed: it is an outage, not the record's fault,
    /// until [`NOT_FOUND_GRACE`] has passed (a schema registered a moment
    /// ago may not have reached the registry's node the worker asks).
    first: Instant,
    /// Once the record's fault: why, and until when that answer stands
    /// without asking again.
    settled: Option<(String, Instant)>,
}

impl Schemas {
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            ready: Mutex::new(HashMap::new()),
            missing: Mutex::new(HashMap::new()),
            referenced: Mutex::new(HashMap::new()),
            subjects: Vec::new(),
            found_any: AtomicBool::new(false),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The topic's subjects (`<topic>-value`, `<topic>-key`): named in
    /// `value_schema` where a schema is registered under several.
    pub fn with_subjects(mut self, subjects: Vec<String>) -> Self {
        self.subjects = subjects;
        self
    }

    pub fn subjects(&self) -> &[String] {
        &self.subjects
    }

    /// Takes a subject the registry knows (the topic's `<topic>-value`,
    /// checked at start) as proof that it is the producers' registry, so
    /// that unknown ids are the records' fault from the start.
    pub fn confirm_registry(&self) {
        self.found_any.store(true, Ordering::Relaxed);
    }

    fn cached(&self, id: &SchemaId, now: Instant) -> Option<Result<Arc<Compiled>, DecodeError>> {
        if let Some(ready) = self.ready.lock().expect("schema cache lock").get(id) {
            return Some(Ok(ready.clone()));
        }
        let missing = self.missing.lock().expect("schema cache lock");
        match missing.get(id)?.settled.as_ref() {
            Some((why, until)) if *until > now => Some(Err(DecodeError::Record(why.clone()))),
            _ => None,
        }
    }

    async fn get(&self, id: &SchemaId) -> Result<Arc<Compiled>, DecodeError> {
        if let Some(found) = self.cached(id, Instant::now()) {
            return found;
        }
        let _one_at_a_time = self.fetching.lock().await;
        if let Some(found) = self.cached(id, Instant::now()) {
            return found;
        }
        match self.fetch(id).await {
            Ok(compiled) => {
                let compiled = Arc::new(compiled);
                self.found_any.store(true, Ordering::Relaxed);
                self.missing.lock().expect("schema cache lock").remove(id);
                self.ready
                    .lock()
                    .expect("schema cache lock")
                    .insert(id.clone(), compiled.clone());
                Ok(compiled)
            }
            Err(Fetch::NotFound(why)) => Err(self.not_found(id, why, Instant::now())),
            Err(Fetch::Unusable(why)) => {
                self.settle(id, why.clone(), Instant::now());
                Err(DecodeError::Record(why))
            }
            Err(Fetch::Refused(why)) => Err(self.refused(id, why).await),
            Err(Fetch::Failed(e)) => Err(e),
        }
    }

    /// 401 or 403 for one schema: the worker's credentials, if the
    /// registry refuses them for everything; otherwise this schema is
    /// not for these credentials (a registry with per-subject access
    /// rules), which is the record's fault.
    async fn refused(&self, id: &SchemaId, why: String) -> DecodeError {
        match self.registry.check().await {
            Ok(()) => {
                let why =
                    format!("the schema registry refuses schema {id} to these credentials: {why}");
                self.settle(id, why.clone(), Instant::now());
                DecodeError::Record(why)
            }
            Err(RegistryError::Refused(why)) => DecodeError::Misconfigured(why),
            Err(e) => DecodeError::Outage(e.to_string()),
        }
    }

    /// The entry of an id the registry does not know, made if new.
    fn missing_entry<R>(
        &self,
        id: &SchemaId,
        now: Instant,
        f: impl FnOnce(&mut Missing) -> R,
    ) -> R {
        let mut missing = self.missing.lock().expect("schema cache lock");
        if missing.len() >= MAX_MISSING && !missing.contains_key(id) {
            // Ids made up by a broken producer must not grow this for ever.
            missing.clear();
        }
        f(missing.entry(id.clone()).or_insert(Missing {
            first: now,
            settled: None,
        }))
    }

    /// What a schema the registry does not know means now (see [`Missing`]).
    fn not_found(&self, id: &SchemaId, why: String, now: Instant) -> DecodeError {
        let first = self.missing_entry(id, now, |m| m.first);
        if !self.found_any.load(Ordering::Relaxed) {
            return DecodeError::Unknown(format!(
                "{why}, and no schema was found there yet: is --schema-registry-url the \
                 registry the producers use? Waiting"
            ));
        }
        if now.saturating_duration_since(first) < NOT_FOUND_GRACE {
            return DecodeError::Unknown(format!(
                "{why} (yet): waiting up to {} s for it to be known",
                NOT_FOUND_GRACE.as_secs()
            ));
        }
        self.settle(id, why.clone(), now);
        DecodeError::Record(why)
    }

    fn settle(&self, id: &SchemaId, why: String, now: Instant) {
        self.missing_entry(id, now, |m| {
            m.settled = Some((why, now + MISSING_SCHEMA_TTL))
        });
    }

    async fn fetch(&self, id: &SchemaId) -> Result<Compiled, Fetch> {
        let registered = self.registry.schema(id).await.map_err(Fetch::from)?;
        let references = self.references(&registered).await?;
        let mut info = serde_json::Map::new();
        match id {
            SchemaId::Id(n) => info.insert("id".into(), Value::from(*n)),
            SchemaId::Guid(g) => info.insert("guid".into(), Value::from(g.clone())),
        };
        // Where it is registered is for the handler's information only:
        // any trouble asking leaves it out.
        match self.registry.subject_version(id, &self.subjects).await {
            Ok(Some(found)) => {
                info.insert("subject".into(), Value::from(found.subject));
                info.insert("version".into(), Value::from(found.version));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(schema = %id, error = %e, "where the schema is registered is unknown")
            }
        }
        let schema_type = registered.kind().to_string();
        let kind = compile(id, &registered, &references)
            .map_err(|e| Fetch::Unusable(format!("schema {id} ({schema_type}): {e}")))?;
        tracing::info!(schema = %id, schema_type, "schema fetched from the registry");
        Ok(Compiled {
            kind,
            schema_type,
            info: Arc::new(Value::Object(info)),
        })
    }

    /// Every schema `root` references, directly or not, dependencies first,
    /// each with the name it is imported by.
    async fn references(&self, root: &RegisteredSchema) -> Result<Vec<(String, String)>, Fetch> {
        type Pending = (crate::registry::Reference, Option<RegisteredSchema>, usize);
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut fetched = 0usize;
        // Depth-first, post-order, without recursion in async code: a stack
        // of (reference, its schema once fetched, its depth).
        let mut stack: Vec<Pending> = root
            .references
            .iter()
            .rev()
            .map(|r| (r.clone(), None, 1))
            .collect();
        while let Some((reference, schema, depth)) = stack.pop() {
            let key = (reference.subject.clone(), reference.version);
            if let Some(schema) = schema {
                if seen.insert(key) {
                    out.push((reference.name.clone(), schema.schema));
                }
                continue;
            }
            if seen.contains(&key) {
                continue;
            }
            if depth > MAX_REFERENCE_DEPTH || fetched >= MAX_REFERENCES {
                return Err(Fetch::Unusable(format!(
                    "schema references go deeper than {MAX_REFERENCE_DEPTH} or number more \
                     than {MAX_REFERENCES} (a cycle?)"
                )));
            }
            let known = self
                .referenced
                .lock()
                .expect("schema cache lock")
                .get(&key)
                .cloned();
            let schema = match known {
                Some(schema) => schema,
                None => {
                    let schema = self
                        .registry
                        .version(&reference)
                        .await
                        .map_err(Fetch::from)?;
                    self.referenced
                        .lock()
                        .expect("schema cache lock")
                        .insert(key.clone(), schema.clone());
                    schema
                }
            };
            fetched += 1;
            let children = schema.references.clone();
            stack.push((reference, Some(schema), depth));
            for child in children.into_iter().rev() {
                stack.push((child, None, depth + 1));
            }
        }
        Ok(out)
    }
}

/// Why a schema could not be had.
enum Fetch {
    /// The registry does not know it (or a schema it references).
    NotFound(String),
    /// Fetched, but it cannot be used: the record's fault.
    Unusable(String),
    /// 401 or 403 (see `Schemas::refused`).
    Refused(String),
    /// An outage or the worker's settings.
    Failed(DecodeError),
}

impl From<RegistryError> for Fetch {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(what) => {
                Fetch::NotFound(format!("the schema registry has no schema {what}"))
            }
            // The registry's own refusal of this lookup (400, 422): the id.
            RegistryError::Rejected(why) => Fetch::Unusable(why),
            RegistryError::Unavailable(why) => Fetch::Failed(DecodeError::Outage(format!(
                "the schema registry is unavailable: {why}"
            ))),
            // After a good start, an answer that is not a registry's (a
            // proxy's page, a redirect) says nothing about the record: wait.
            RegistryError::Unexpected(why) => Fetch::Failed(DecodeError::Outage(why)),
            RegistryError::Refused(why) => Fetch::Refused(why),
            RegistryError::Misconfigured(why) => Fetch::Failed(DecodeError::Misconfigured(why)),
        }
    }
}

fn compile(
    id: &SchemaId,
    registered: &RegisteredSchema,
    references: &[(String, String)],
) -> Result<Kind, String> {
    match registered.kind() {
        "AVRO" => {
            let texts: Vec<String> = references.iter().map(|(_, t)| t.clone()).collect();
            AvroSchema::compile(&registered.schema, &texts).map(Kind::Avro)
        }
        "PROTOBUF" => {
            let name = format!("registered-schema-{id}.proto");
            let imports: Vec<Source> = references
                .iter()
                .map(|(name, text)| Source { name, text })
                .collect();
            ProtobufSchema::compile(
                Source {
                    name: &name,
                    text: &registered.schema,
                },
                &imports,
            )
            .map(Kind::Protobuf)
        }
        "JSON" => JsonSchema::compile(&registered.schema, references).map(Kind::Json),
        other => Err(format!("schema type {other} is not supported")),
    }
}

/// Decodes keys and values by their formats.
pub struct Decoder {
    pub key: Format,
    pub value: Format,
    schemas: Option<Arc<Schemas>>,
}

impl Decoder {
    /// `schemas` is required when a format uses the registry.
    pub fn new(key: Format, value: Format, schemas: Option<Arc<Schemas>>) -> Self {
        debug_assert!(schemas.is_some() || !(key.uses_registry() || value.uses_registry()));
        Self {
            key,
            value,
            schemas,
        }
    }

    /// Whether anything is decoded at all.
    pub fn is_raw(&self) -> bool {
        self.key == Format::Raw && self.value == Format::Raw
    }

    pub fn format(&self, side: Side) -> Format {
        match side {
            Side::Key => self.key,
            Side::Value => self.value,
        }
    }

    /// Decodes one key or value. `bytes` None (a null key, a tombstone)
    /// stays null; `header` is the side's schema id header when present.
    pub async fn decode(
        &self,
        side: Side,
        bytes: Option<&[u8]>,
        header: Option<&[u8]>,
    ) -> Result<Option<Decoded>, DecodeError> {
        let format = self.format(side);
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let record =
            |why: String| DecodeError::Record(format!("{} ({format}): {why}", side.name()));
        match format {
            Format::Raw => Ok(None),
            Format::Json => parse_json(bytes)
                .map(|json| Some(Decoded { json, schema: None }))
                .map_err(record),
            Format::Avro | Format::Protobuf | Format::JsonSchema => {
                let (id, data) = match header {
                    Some(h) => (
                        wire::header_schema_id(h).map_err(|e| record(e.to_string()))?,
                        bytes,
                    ),
                    None => wire::split_framed(bytes).map_err(|e| record(e.to_string()))?,
                };
                if matches!(id, SchemaId::Id(n) if n > i32::MAX as u32) {
                    return Err(record(format!(
                        "schema id {id} is out of range (registries number schemas below 2^31)"
                    )));
                }
                let schemas = self.schemas.as_ref().ok_or_else(|| {
                    DecodeError::Misconfigured(format!(
                        "--{}-format {format} needs --schema-registry-url",
                        side.name()
                    ))
                })?;
                let compiled = schemas.get(&id).await.map_err(|e| match e {
                    DecodeError::Record(why) => record(why),
                    other => other,
                })?;
                if compiled.schema_type != format.schema_type() {
                    return Err(record(format!(
                        "written with schema {id}, a {} schema",
                        compiled.schema_type
                    )));
                }
                let json = match &compiled.kind {
                    Kind::Avro(schema) => schema.decode(data),
                    Kind::Json(schema) => schema.decode(data),
                    Kind::Protobuf(schema) => wire::split_message_indexes(data)
                        .map_err(|e| e.to_string())
                        .and_then(|(indexes, data)| schema.decode(&indexes, data)),
                }
                .map_err(|e| record(format!("schema {id}: {e}")))?;
                Ok(Some(Decoded {
                    json,
                    schema: Some(compiled.info.clone()),
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn raw_and_json_need_no_registry() {
        let decoder = Decoder::new(Format::Raw, Format::Json, None);
        assert_eq!(
            decoder.decode(Side::Value, Some(br#"{"a":1}"#), None).await,
            Ok(Some(Decoded {
                json: serde_json::json!({"a": 1}),
                schema: None
            }))
        );
        assert_eq!(decoder.decode(Side::Value, None, None).await, Ok(None));
        assert_eq!(decoder.decode(Side::Key, Some(b"k"), None).await, Ok(None));
        let err = decoder
            .decode(Side::Value, Some(b"{"), None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DecodeError::Record(why) if why.starts_with("value (json): not JSON")),
            "{err:?}"
        );
    }

    fn schemas() -> Schemas {
        Schemas::new(
            Registry::new(&crate::RegistryConfig {
                url: "http://127.0.0.1:9".into(),
                auth: None,
                ca_pem: None,
                timeout: Duration::from_secs(1),
            })
            .unwrap(),
        )
    }

    #[test]
    fn an_unknown_schema_waits_until_the_registry_is_proven_and_the_grace_is_over() {
        let s = schemas();
        let id = SchemaId::Id(42);
        let t0 = Instant::now();
        let why = || "the schema registry has no schema 42".to_string();
        // No schema ever found there: perhaps the wrong registry.
        assert!(
            matches!(s.not_found(&id, why(), t0 + NOT_FOUND_GRACE * 2), DecodeError::Unknown(w) if w.contains("no schema was found there yet"))
        );
        s.confirm_registry();
        let other = SchemaId::Id(43);
        assert!(
            matches!(s.not_found(&other, why(), t0), DecodeError::Unknown(w) if w.contains("waiting up to"))
        );
        assert!(matches!(
            s.not_found(&other, why(), t0 + NOT_FOUND_GRACE / 2),
            DecodeError::Unknown(_)
        ));
        assert_eq!(
            s.not_found(&other, why(), t0 + NOT_FOUND_GRACE),
            DecodeError::Record(why())
        );
        // Settled: answered from the cache until the TTL is over.
        assert!(matches!(
            s.cached(&other, t0 + NOT_FOUND_GRACE),
            Some(Err(DecodeError::Record(_)))
        ));
        assert!(s
            .cached(&other, t0 + NOT_FOUND_GRACE + MISSING_SCHEMA_TTL)
            .is_none());
        // The first miss of 42 counts from when it was first seen.
        assert!(matches!(
            s.not_found(&id, why(), t0 + NOT_FOUND_GRACE * 3),
            DecodeError::Record(_)
        ));
    }

    #[test]
    fn unknown_ids_are_remembered_up_to_a_bound() {
        let s = schemas();
        let t0 = Instant::now();
        for n in 0..(MAX_MISSING as u32 + 10) {
            s.settle(&SchemaId::Id(n), "x".into(), t0);
        }
        assert!(s.missing.lock().unwrap().len() <= MAX_MISSING);
    }

    #[tokio::test]
    async fn ids_out_of_a_registrys_range_are_refused_without_asking() {
        let decoder = Decoder::new(Format::Raw, Format::Avro, Some(Arc::new(schemas())));
        let err = decoder
            .decode(Side::Value, Some(&[0, 0xff, 0xff, 0xff, 0xff, 1]), None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DecodeError::Record(w) if w.contains("out of range")),
            "{err:?}"
        );
    }

    #[test]
    fn formats_parse_by_their_names() {
        for f in [
            Format::Raw,
            Format::Json,
            Format::Avro,
            Format::Protobuf,
            Format::JsonSchema,
        ] {
            assert_eq!(f.name().parse::<Format>(), Ok(f));
        }
        assert!("xml".parse::<Format>().unwrap_err().contains("json-schema"));
    }
}
