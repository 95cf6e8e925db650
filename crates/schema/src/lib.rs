//! Schemas for microbatch: records written in a schema registry's wire
//! format (Avro, Protobuf, JSON Schema) or as JSON, decoded to JSON before
//! the handler sees them. See docs/schemas.md.

pub mod avro;
pub mod decoder;
pub mod filter;
pub mod json_schema;
pub mod protobuf;
pub mod registry;
mod time;
pub mod wire;

pub use decoder::{DecodeError, Decoded, Decoder, Format, Schemas, Side};
pub use filter::{Filter, FilterError};
pub use registry::{Auth, Registry, RegistryConfig, RegistryError};
