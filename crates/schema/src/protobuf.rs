//! Protobuf: a registered schema (with its imports) compiled once, and
//! messages decoded with it to JSON by the protobuf JSON mapping
//! (lowerCamelCase names, 64-bit integers as strings, enums by name, bytes
//! as base64, fields at their default left out, well-known types as their
//! JSON forms: a Timestamp as RFC 3339 text, a Duration as "1.5s", ...).
//!
//! A registry hands a schema out as `.proto` text (Confluent's) or as a
//! base64 `FileDescriptorProto` (Apicurio's ccompat API): both are taken.

use std::collections::HashMap;

use base64::Engine;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, FileDescriptor, MessageDescriptor};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};

/// A compiled Protobuf schema: the registered file and what it imports.
#[derive(Debug)]
pub struct ProtobufSchema {
    file: FileDescriptor,
}

/// One schema text, as the registry gave it, under the name it is imported by.
pub struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

struct Files(HashMap<String, File>);

impl FileResolver for Files {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| protox::Error::file_not_found(name))
    }
}

/// A registry's text as a file: a base64 `FileDescriptorProto`, or source.
fn to_file(name: &str, text: &str) -> Result<File, String> {
    let trimmed = text.trim();
    let looks_base64 = !trimmed.is_empty()
        && trimmed
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if looks_base64 {
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(trimmed) {
            if let Ok(mut proto) = prost_types::FileDescriptorProto::decode(bytes.as_slice()) {
                proto.name = Some(name.to_string());
                return Ok(File::from_file_descriptor_proto(proto));
            }
        }
    }
    File::from_source(name, text).map_err(|e| e.to_string())
}

impl ProtobufSchema {
    /// `main` is the registered schema, `imports` every schema it
    /// references (directly or not), each under its import name.
    pub fn compile(main: Source, imports: &[Source]) -> Result<Self, String> {
        let mut files = HashMap::new();
        for source in imports.iter().chain(std::iter::once(&main)) {
            files.insert(source.name.to_string(), to_file(source.name, source.text)?);
        }
        let mut resolver = ChainFileResolver::new();
        resolver.add(Files(files));
        resolver.add(GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(resolver);
        compiler
            .include_imports(true)
            .open_file(main.name)
            .map_err(|e| e.to_string())?;
        let pool: DescriptorPool = compiler.descriptor_pool();
        let file = pool
            .get_file_by_name(main.name)
            .ok_or_else(|| format!("{} is not in the compiled schema", main.name))?;
        Ok(Self { file })
    }

    /// The message the indexes name: the first index picks a top-level
    /// message of the file, each further one a message nested in it.
    pub fn message(&self, indexes: &[i32]) -> Result<MessageDescriptor, String> {
        let (first, nested) = indexes
            .split_first()
            .ok_or_else(|| "no message index".to_string())?;
        let mut message = self
            .file
            .messages()
            .nth(*first as usize)
            .ok_or_else(|| format!("message index {first}: the schema has no such message"))?;
        for index in nested {
            let child = message.child_messages().nth(*index as usize);
            message = child.ok_or_else(|| {
                format!(
                    "message index {index}: {} has no such nested message",
                    message.full_name()
                )
            })?;
        }
        Ok(message)
    }

    /// Decodes a message of the type the indexes name.
    pub fn decode(&self, indexes: &[i32], data: &[u8]) -> Result<serde_json::Value, String> {
        let descriptor = self.message(indexes)?;
        let message = DynamicMessage::decode(descriptor.clone(), data)
            .map_err(|e| format!("not a {}: {e}", descriptor.full_name()))?;
        serde_json::to_value(&message).map_err(|e| format!("{}: {e}", descriptor.full_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: &str = r#"
        syntax = "proto3";
        package shop;
        import "google/protobuf/timestamp.proto";
        import "money.proto";
        message Order {
          int64 order_id = 1;
          google.protobuf.Timestamp placed_at = 2;
          Money total = 3;
          message Line { string sku = 1; }
          repeated Line lines = 4;
        }
        message Other { string x = 1; }
    "#;
    const MONEY: &str = "syntax = \"proto3\"; package shop; message Money { int64 cents = 1; }";

    fn order() -> ProtobufSchema {
        ProtobufSchema::compile(
            Source {
                name: "order.proto",
                text: ORDER,
            },
            &[Source {
                name: "money.proto",
                text: MONEY,
            }],
        )
        .unwrap()
    }

    #[test]
    fn text_schemas_with_imports_and_well_known_types_decode_by_the_json_mapping() {
        let schema = order();
        let descriptor = schema.message(&[0]).unwrap();
        let mut message = DynamicMessage::new(descriptor.clone());
        message
            .try_set_field_by_name("order_id", prost_reflect::Value::I64(7))
            .unwrap();
        let placed = prost_types::Timestamp {
            seconds: 1_714_564_800,
            nanos: 0,
        };
        let placed_desc = descriptor.get_field_by_name("placed_at").unwrap();
        let placed_msg = DynamicMessage::decode(
            placed_desc.kind().as_message().unwrap().clone(),
            placed.encode_to_vec().as_slice(),
        )
        .unwrap();
        message.set_field(&placed_desc, prost_reflect::Value::Message(placed_msg));
        let bytes = message.encode_to_vec();
        assert_eq!(
            schema.decode(&[0], &bytes).unwrap(),
            serde_json::json!({"orderId": "7", "placedAt": "2024-05-01T12:00:00Z"})
        );
        assert_eq!(
            schema.message(&[0, 0]).unwrap().full_name(),
            "shop.Order.Line"
        );
        assert_eq!(schema.message(&[1]).unwrap().full_name(), "shop.Other");
        assert!(schema.message(&[2]).is_err());
        assert!(schema.message(&[0, 1]).is_err());
        assert!(schema.decode(&[0], &[0xff, 0xff]).is_err());
    }

    #[test]
    fn a_base64_file_descriptor_is_taken_as_apicurio_serves_it() {
        let compiled = order();
        let proto = compiled.file.file_descriptor_proto().clone();
        let text = base64::engine::general_purpose::STANDARD.encode(proto.encode_to_vec());
        let money = prost_types::FileDescriptorProto::decode(
            compiled
                .file
                .parent_pool()
                .get_file_by_name("money.proto")
                .unwrap()
                .encode_to_vec()
                .as_slice(),
        )
        .unwrap();
        let money_text = base64::engine::general_purpose::STANDARD.encode(money.encode_to_vec());
        let schema = ProtobufSchema::compile(
            Source {
                name: "order.proto",
                text: &text,
            },
            &[Source {
                name: "money.proto",
                text: &money_text,
            }],
        )
        .unwrap();
        assert_eq!(schema.message(&[0]).unwrap().full_name(), "shop.Order");
        assert!(ProtobufSchema::compile(
            Source {
                name: "x.proto",
                text: "not a schema"
            },
            &[]
        )
        .is_err());
    }
}
