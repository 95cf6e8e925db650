//! Avro: a registered schema (with the schemas it references) compiled
//! once, and records decoded with it to JSON.
//!
//! **The JSON mapping** (docs/schemas.md): records, maps and arrays as
//! objects and arrays; a union as the value of its branch (not Avro's
//! `{"type": value}` wrapping); enums as their symbol; bytes and fixed as
//! base64; NaN and infinities as the strings "NaN", "Infinity",
//! "-Infinity" (the protobuf JSON mapping's choice); decimal as a string
//! with exactly its scale's digits ("12.30"), never a float; uuid as its
//! string; date as "YYYY-MM-DD"; time-millis/micros as "HH:MM:SS.fff[fff]";
//! timestamp-millis/micros/nanos as RFC 3339 in UTC with the unit's digits
//! ("2024-05-01T12:00:00.000Z"), local-timestamp the same without the Z;
//! duration as {"months","days","millis"}.

use apache_avro::schema::{Name, Schema};
use apache_avro::types::Value;
use base64::Engine;
use serde_json::Value as Json;

use crate::time::{format_date, format_time_of_day, format_timestamp};

/// A compiled Avro schema and the named types of the schemas it references.
#[derive(Debug)]
pub struct AvroSchema {
    schema: Schema,
    references: Vec<Schema>,
    /// Every named type, resolved once (a record's fields name them).
    names: std::collections::HashMap<Name, Schema>,
}

impl AvroSchema {
    /// `references` are the referenced schemas' texts, dependencies first.
    pub fn compile(text: &str, references: &[String]) -> Result<Self, String> {
        let (schema, references) = if references.is_empty() {
            (
                Schema::parse_str(text).map_err(|e| e.to_string())?,
                Vec::new(),
            )
        } else {
            Schema::parse_str_with_list(text, references).map_err(|e| e.to_string())?
        };
        let names = {
            let all: Vec<&Schema> = references.iter().chain(std::iter::once(&schema)).collect();
            apache_avro::schema::ResolvedSchema::try_from(all)
                .map_err(|e| e.to_string())?
                .get_names()
                .iter()
                .map(|(name, schema)| (name.clone(), (*schema).clone()))
                .collect()
        };
        Ok(Self {
            schema,
            references,
            names,
        })
    }

    /// Decodes one datum; every byte must belong to it.
    pub fn decode(&self, data: &[u8]) -> Result<Json, String> {
        let mut reader = data;
        let schemata: Vec<&Schema> = self
            .references
            .iter()
            .chain(std::iter::once(&self.schema))
            .collect();
        let value =
            apache_avro::from_avro_datum_schemata(&self.schema, schemata, &mut reader, None)
                .map_err(|e| e.to_string())?;
        if !reader.is_empty() {
            return Err(format!(
                "{} of {} bytes left after the datum: not written with this schema",
                reader.len(),
                data.len()
            ));
        }
        to_json(value, &self.schema, &self.names)
    }
}

type Names = std::collections::HashMap<Name, Schema>;

fn base64(bytes: &[u8]) -> Json {
    Json::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn float(v: f64) -> Json {
    if v.is_nan() {
        Json::String("NaN".into())
    } else if v.is_infinite() {
        Json::String(if v > 0.0 { "Infinity" } else { "-Infinity" }.into())
    } else {
        serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number)
    }
}

fn resolve<'a>(schema: &'a Schema, names: &'a Names) -> Result<&'a Schema, String> {
    match schema {
        Schema::Ref { name } => names
            .get(name)
            .ok_or_else(|| format!("unresolved reference {}", name.fullname(None))),
        other => Ok(other),
    }
}

/// An unscaled two's-complement big-endian integer with `scale` digits
/// after the point, as text.
fn decimal(unscaled: &[u8], scale: usize) -> String {
    use num_bigint::BigInt;
    let n = BigInt::from_signed_bytes_be(unscaled);
    let digits = n.magnitude().to_string();
    let sign = if n.sign() == num_bigint::Sign::Minus {
        "-"
    } else {
        ""
    };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

fn to_json(value: Value, schema: &Schema, names: &Names) -> Result<Json, String> {
    let schema = resolve(schema, names)?;
    Ok(match (value, schema) {
        (Value::Null, _) => Json::Null,
        (Value::Boolean(b), _) => Json::Bool(b),
        (Value::Int(i), _) => Json::from(i),
        (Value::Long(i), _) => Json::from(i),
        (Value::Float(f), _) => float(f64::from(f)),
        (Value::Double(f), _) => float(f),
        (Value::Bytes(b), _) | (Value::Fixed(_, b), _) => base64(&b),
        (Value::String(s), _) | (Value::Enum(_, s), _) => Json::String(s),
        (Value::Union(index, inner), Schema::Union(union)) => {
            let branch = union
                .variants()
                .get(index as usize)
                .ok_or_else(|| format!("union branch {index} out of range"))?;
            to_json(*inner, branch, names)?
        }
        (Value::Array(items), Schema::Array(array)) => Json::Array(
            items
                .into_iter()
                .map(|v| to_json(v, &array.items, names))
                .collect::<Result<_, _>>()?,
        ),
        (Value::Map(entries), Schema::Map(map)) => {
            let mut entries: Vec<_> = entries.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = serde_json::Map::with_capacity(entries.len());
            for (k, v) in entries {
                out.insert(k, to_json(v, &map.types, names)?);
            }
            Json::Object(out)
        }
        (Value::Record(fields), Schema::Record(record)) => {
            let mut out = serde_json::Map::with_capacity(fields.len());
            for (name, v) in fields {
                let field = record
                    .lookup
                    .get(&name)
                    .and_then(|&i| record.fields.get(i))
                    .ok_or_else(|| format!("field {name} is not in the schema"))?;
                out.insert(name, to_json(v, &field.schema, names)?);
            }
            Json::Object(out)
        }
        (Value::Decimal(d), Schema::Decimal(s)) => {
            let unscaled: Vec<u8> = (&d).try_into().map_err(|e| format!("decimal: {e}"))?;
            Json::String(decimal(&unscaled, s.scale))
        }
        (Value::BigDecimal(d), _) => Json::String(d.to_string()),
        (Value::Uuid(u), _) => Json::String(u.to_string()),
        (Value::Date(days), _) => Json::String(format_date(i64::from(days))),
        (Value::TimeMillis(ms), _) => {
            Json::String(format_time_of_day(i64::from(ms) * 1_000_000, 3))
        }
        (Value::TimeMicros(us), _) => Json::String(format_time_of_day(us * 1_000, 6)),
        (Value::TimestampMillis(v), _) => Json::String(format_timestamp(v, 3, true)),
        (Value::TimestampMicros(v), _) => Json::String(format_timestamp(v, 6, true)),
        (Value::TimestampNanos(v), _) => Json::String(format_timestamp(v, 9, true)),
        (Value::LocalTimestampMillis(v), _) => Json::String(format_timestamp(v, 3, false)),
        (Value::LocalTimestampMicros(v), _) => Json::String(format_timestamp(v, 6, false)),
        (Value::LocalTimestampNanos(v), _) => Json::String(format_timestamp(v, 9, false)),
        (Value::Duration(d), _) => serde_json::json!({
            "months": u32::from(d.months()),
            "days": u32::from(d.days()),
            "millis": u32::from(d.millis()),
        }),
        (value, schema) => {
            return Err(format!(
                "a decoded {value:?} does not fit the schema's {schema:?}"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Record;

    fn encode(schema: &str, build: impl FnOnce(&mut Record)) -> Vec<u8> {
        let schema = Schema::parse_str(schema).unwrap();
        let mut record = Record::new(&schema).unwrap();
        build(&mut record);
        apache_avro::to_avro_datum(&schema, record).unwrap()
    }

    const ORDER: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
        {"name":"id","type":"long"},
        {"name":"note","type":["null","string"],"default":null},
        {"name":"price","type":{"type":"bytes","logicalType":"decimal","precision":9,"scale":2}},
        {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"day","type":{"type":"int","logicalType":"date"}},
        {"name":"ref","type":{"type":"string","logicalType":"uuid"}},
        {"name":"kind","type":{"type":"enum","name":"Kind","symbols":["A","B"]}},
        {"name":"tags","type":{"type":"map","values":"double"}},
        {"name":"raw","type":"bytes"}
    ]}"#;

    #[test]
    fn a_record_decodes_to_the_documented_json() {
        let bytes = encode(ORDER, |r| {
            r.put("id", 7i64);
            r.put(
                "note",
                Value::Union(1, Box::new(Value::String("hi".into()))),
            );
            r.put(
                "price",
                Value::Decimal(apache_avro::Decimal::from(vec![0xfbu8, 0x2e])),
            );
            r.put("at", Value::TimestampMillis(1_714_564_800_123));
            r.put("day", Value::Date(19_844));
            r.put(
                "ref",
                Value::Uuid("6f1c4d3a-0000-4000-8000-000000000001".parse().unwrap()),
            );
            r.put("kind", Value::Enum(1, "B".into()));
            r.put(
                "tags",
                Value::Map([("x".to_string(), Value::Double(f64::NAN))].into()),
            );
            r.put("raw", Value::Bytes(vec![0, 255]));
        });
        let schema = AvroSchema::compile(ORDER, &[]).unwrap();
        let json = schema.decode(&bytes).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": 7, "note": "hi", "price": "-12.34",
                "at": "2024-05-01T12:00:00.123Z", "day": "2024-05-01",
                "ref": "6f1c4d3a-0000-4000-8000-000000000001", "kind": "B",
                "tags": {"x": "NaN"}, "raw": "AP8="
            })
        );
    }

    #[test]
    fn bytes_that_do_not_fit_are_refused() {
        let schema = AvroSchema::compile(ORDER, &[]).unwrap();
        assert!(schema.decode(&[]).is_err());
        assert!(schema.decode(b"\x0e").is_err(), "truncated");
        let long = AvroSchema::compile(r#""long""#, &[]).unwrap();
        assert_eq!(long.decode(&[0x0e]).unwrap(), serde_json::json!(7));
        assert!(long.decode(&[0x0e, 0]).is_err(), "a byte left over");
    }

    #[test]
    fn references_resolve_named_types() {
        let money = r#"{"type":"record","name":"Money","namespace":"shop","fields":[{"name":"cents","type":"long"}]}"#;
        let order = r#"{"type":"record","name":"Order","namespace":"shop","fields":[{"name":"total","type":"Money"}]}"#;
        let schema = AvroSchema::compile(order, &[money.to_string()]).unwrap();
        assert_eq!(
            schema.decode(&[0x0e]).unwrap(),
            serde_json::json!({"total": {"cents": 7}})
        );
    }

    #[test]
    fn decimals_keep_their_digits() {
        assert_eq!(decimal(&[0x04, 0xd2], 2), "12.34");
        assert_eq!(decimal(&[0x05], 3), "0.005");
        assert_eq!(decimal(&[0xff], 1), "-0.1");
        assert_eq!(decimal(&[0x7b], 0), "123");
        assert_eq!(decimal(&[], 2), "0.00");
    }
}
