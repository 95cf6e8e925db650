//! JSON Schema: a registered schema compiled once into a validator; a
//! record's JSON must parse and validate against it.

use std::collections::HashMap;

use jsonschema::{Retrieve, Uri, Validator};
use serde_json::Value;

pub struct JsonSchema {
    validator: Validator,
}

impl std::fmt::Debug for JsonSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonSchema")
    }
}

/// Referenced schemas, found by the name they are referenced by (the
/// reference's name, a relative URI, resolves against the schema's base).
struct References(HashMap<String, Value>);

impl Retrieve for References {
    fn retrieve(
        &self,
        uri: &Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let full = uri.as_str();
        let path = uri.path().as_str().trim_start_matches('/');
        self.0
            .get(full)
            .or_else(|| self.0.get(path))
            .cloned()
            .ok_or_else(|| format!("{full} is not among the schema's references").into())
    }
}

impl JsonSchema {
    /// `references` are (name, schema text) of the schemas it references.
    pub fn compile(text: &str, references: &[(String, String)]) -> Result<Self, String> {
        let schema: Value =
            serde_json::from_str(text).map_err(|e| format!("the schema is not JSON: {e}"))?;
        let mut found = HashMap::new();
        for (name, text) in references {
            let value: Value = serde_json::from_str(text)
                .map_err(|e| format!("reference {name} is not JSON: {e}"))?;
            found.insert(name.clone(), value);
        }
        let validator = jsonschema::options()
            .with_retriever(References(found))
            .build(&schema)
            .map_err(|e| format!("not a usable JSON Schema: {e}"))?;
        Ok(Self { validator })
    }

    /// Parses and validates one record's JSON.
    pub fn decode(&self, data: &[u8]) -> Result<Value, String> {
        let value = parse_json(data)?;
        if let Err(e) = self.validator.validate(&value) {
            return Err(format!(
                "does not match the schema: {e} at {}",
                e.instance_path()
            ));
        }
        Ok(value)
    }
}

/// A record's bytes as JSON (the `json` format, and JSON Schema's data).
pub fn parse_json(data: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(data).map_err(|e| format!("not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_must_match_the_schema_and_its_references() {
        let address =
            r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#;
        let person = r#"{"type":"object","properties":{"name":{"type":"string"},"home":{"$ref":"address.json"}},"required":["name"]}"#;
        let schema =
            JsonSchema::compile(person, &[("address.json".into(), address.into())]).unwrap();
        assert_eq!(
            schema
                .decode(br#"{"name":"a","home":{"city":"b"}}"#)
                .unwrap(),
            serde_json::json!({"name":"a","home":{"city":"b"}})
        );
        let err = schema.decode(br#"{"name":"a","home":{}}"#).unwrap_err();
        assert!(err.contains("city"), "{err}");
        assert!(schema.decode(br#"{"name":1}"#).is_err());
        assert!(schema.decode(b"{").is_err());
        assert!(JsonSchema::compile("{", &[]).is_err());
    }
}
