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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;

use crate::avro::AvroSchema;
use crate::json_schema::{parse_json, JsonSchema};
use crate::protobuf::{ProtobufSchema, Source};
use crate::registry::{RegisteredSchema, Registry, RegistryError};
use crate::wire::{self, SchemaId};

/// How long a schema the registry does not have (or one that does not
/// compile) is remembered as such: records naming it are dead-lettered
/// without a request each, and one registered later is found after this.
pub const MISSING_SCHEMA_TTL: Duration = Duration::from_secs(30);

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

enum Entry {
    Ready(Arc<Compiled>),
    Missing { why: String, until: Instant },
}

/// The registry and the schemas fetched from it so far.
pub struct Schemas {
    registry: Registry,
    cache: Mutex<HashMap<SchemaId, Entry>>,
    /// One fetch at a time: batches that need the same new schema wait for
    /// the first one's fetch instead of each asking the registry.
    fetching: tokio::sync::Mutex<()>,
}

impl Schemas {
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            cache: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn cached(&self, id: &SchemaId, now: Instant) -> Option<Result<Arc<Compiled>, DecodeError>> {
        let cache = self.cache.lock().expect("schema cache lock");
        match cache.get(id)? {
            Entry::Ready(compiled) => Some(Ok(compiled.clone())),
            Entry::Missing { why, until } if *until > now => {
                Some(Err(DecodeError::Record(why.clone())))
            }
            Entry::Missing { .. } => None,
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
        let entry = match self.fetch(id).await {
            Ok(compiled) => Entry::Ready(Arc::new(compiled)),
            Err(DecodeError::Record(why)) => Entry::Missing {
                why,
                until: Instant::now() + MISSING_SCHEMA_TTL,
            },
            Err(other) => return Err(other),
        };
        let result = match &entry {
            Entry::Ready(compiled) => Ok(compiled.clone()),
            Entry::Missing { why, .. } => Err(DecodeError::Record(why.clone())),
        };
        self.cache
            .lock()
            .expect("schema cache lock")
            .insert(id.clone(), entry);
        result
    }

    async fn fetch(&self, id: &SchemaId) -> Result<Compiled, DecodeError> {
        let registered = self.registry.schema(id).await.map_err(registry_error)?;
        let references = self.references(&registered).await?;
        let mut info = serde_json::Map::new();
        match id {
            SchemaId::Id(n) => info.insert("id".into(), Value::from(*n)),
            SchemaId::Guid(g) => info.insert("guid".into(), Value::from(g.clone())),
        };
        match self.registry.subject_version(id).await {
            Ok(Some(found)) => {
                info.insert("subject".into(), Value::from(found.subject));
                info.insert("version".into(), Value::from(found.version));
            }
            Ok(None) | Err(RegistryError::NotFound(_)) => {}
            Err(e) => return Err(registry_error(e)),
        }
        let schema_type = registered.kind().to_string();
        let kind = compile(id, &registered, &references)
            .map_err(|e| DecodeError::Record(format!("schema {id} ({schema_type}): {e}")))?;
        tracing::info!(schema = %id, schema_type, "schema fetched from the registry");
        Ok(Compiled {
            kind,
            schema_type,
            info: Arc::new(Value::Object(info)),
        })
    }

    /// Every schema `root` references, directly or not, dependencies first,
    /// each with the name it is imported by.
    async fn references(
        &self,
        root: &RegisteredSchema,
    ) -> Result<Vec<(String, String)>, DecodeError> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        // Depth-first, post-order, without recursion in async code: a stack
        // of (reference, its schema once fetched, children pushed).
        let mut stack: Vec<(crate::registry::Reference, Option<RegisteredSchema>)> = root
            .references
            .iter()
            .rev()
            .map(|r| (r.clone(), None))
            .collect();
        while let Some((reference, fetched)) = stack.pop() {
            let key = (reference.subject.clone(), reference.version);
            match fetched {
                Some(schema) => {
                    if seen.insert(key) {
                        out.push((reference.name.clone(), schema.schema));
                    }
                }
                None => {
                    if seen.contains(&key) {
                        continue;
                    }
                    if stack.len() > MAX_REFERENCE_DEPTH || out.len() > MAX_REFERENCES {
                        return Err(DecodeError::Record(format!(
                            "schema references go deeper than {MAX_REFERENCE_DEPTH} or number \
                             more than {MAX_REFERENCES}"
                        )));
                    }
                    let schema = self
                        .registry
                        .version(&reference)
                        .await
                        .map_err(registry_error)?;
                    let children: Vec<_> = schema.references.clone();
                    stack.push((reference, Some(schema)));
                    for child in children.into_iter().rev() {
                        stack.push((child, None));
                    }
                }
            }
        }
        Ok(out)
    }
}

fn registry_error(e: RegistryError) -> DecodeError {
    match e {
        RegistryError::NotFound(what) => {
            DecodeError::Record(format!("the schema registry has no schema {what}"))
        }
        RegistryError::Unavailable(why) => {
            DecodeError::Outage(format!("the schema registry is unavailable: {why}"))
        }
        RegistryError::Misconfigured(why) => DecodeError::Misconfigured(why),
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
