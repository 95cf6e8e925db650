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
        // apache-avro sizes some buffers from lengths inside a value (a
        // big-decimal's digits) before reading them: no more than this.
        apache_avro::util::max_allocation_bytes(MAX_ALLOCATION_BYTES);
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
        // The record's bytes are outside input: walk them first, bounded,
        // so that the decoder below never meets a nesting that overflows
        // the stack or a block count that allocates gigabytes.
        Walk {
            data,
            pos: 0,
            items_left: data.len().saturating_mul(BUDGET_PER_BYTE) + MAX_EMPTY_ITEMS,
            names: &self.names,
        }
        .walk(&self.schema, 0)?;
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

impl AvroSchema {
    /// A datum for record number `seq`, for `produce`: every field gets a
    /// value that varies with `seq` (numbers count, strings carry it, enums
    /// and unions take turns over their first choices), encoded with the
    /// schema. Not for `big-decimal`.
    pub fn sample(&self, seq: u64) -> Result<Vec<u8>, String> {
        let value = sample(&self.schema, &self.names, seq, 0)?;
        let schemata: Vec<&Schema> = self
            .references
            .iter()
            .chain(std::iter::once(&self.schema))
            .collect();
        apache_avro::to_avro_datum_schemata(&self.schema, schemata, value)
            .map_err(|e| e.to_string())
    }
}

/// How deep a sample goes into a recursive schema before it takes a
/// union's null branch (or an empty array or map).
const SAMPLE_DEPTH: usize = 8;

fn sample(schema: &Schema, names: &Names, seq: u64, depth: usize) -> Result<Value, String> {
    let schema = resolve(schema, names)?;
    let n = seq as i64;
    Ok(match schema {
        Schema::Null => Value::Null,
        Schema::Boolean => Value::Boolean(seq.is_multiple_of(2)),
        Schema::Int => Value::Int((seq % i32::MAX as u64) as i32),
        Schema::Long => Value::Long(n),
        Schema::Float => Value::Float(seq as f32 / 4.0),
        Schema::Double => Value::Double(seq as f64 / 4.0),
        Schema::Bytes => Value::Bytes(seq.to_string().into_bytes()),
        Schema::String => Value::String(format!("s{seq}")),
        Schema::Array(a) if depth < SAMPLE_DEPTH => {
            Value::Array(vec![sample(&a.items, names, seq, depth + 1)?])
        }
        Schema::Array(_) => Value::Array(Vec::new()),
        Schema::Map(m) if depth < SAMPLE_DEPTH => {
            Value::Map([("k".to_string(), sample(&m.types, names, seq, depth + 1)?)].into())
        }
        Schema::Map(_) => Value::Map(Default::default()),
        Schema::Union(u) => {
            let variants = u.variants();
            if variants.is_empty() {
                return Err("an empty union has no value".into());
            }
            let non_null: Vec<usize> = (0..variants.len())
                .filter(|&i| variants[i] != Schema::Null)
                .collect();
            let null = variants.iter().position(|v| *v == Schema::Null);
            // Deep enough: a branch that cannot nest further, if any.
            let flat = (0..variants.len()).find(|&i| {
                !matches!(
                    resolve(&variants[i], names),
                    Ok(Schema::Record(_) | Schema::Array(_) | Schema::Map(_) | Schema::Union(_))
                )
            });
            let index = match (non_null.is_empty(), null, flat) {
                (false, Some(null), _) if depth >= SAMPLE_DEPTH || seq % 4 == 3 => null,
                (_, _, Some(flat)) if depth >= SAMPLE_DEPTH => flat,
                (_, _, None) if depth >= 4 * SAMPLE_DEPTH => {
                    return Err(
                        "the schema has no finite value (a union that only recurses)".into(),
                    )
                }
                (false, _, _) => non_null[(seq as usize) % non_null.len()],
                (true, _, _) => 0,
            };
            Value::Union(
                index as u32,
                Box::new(sample(&variants[index], names, seq, depth + 1)?),
            )
        }
        Schema::Record(r) => Value::Record(
            r.fields
                .iter()
                .map(|f| Ok((f.name.clone(), sample(&f.schema, names, seq, depth + 1)?)))
                .collect::<Result<_, String>>()?,
        ),
        Schema::Enum(e) => {
            let i = (seq as usize) % e.symbols.len().max(1);
            Value::Enum(i as u32, e.symbols.get(i).cloned().unwrap_or_default())
        }
        Schema::Fixed(f) => {
            let digits = seq.to_be_bytes();
            let mut bytes = vec![0u8; f.size];
            for (i, b) in digits.iter().rev().enumerate().take(f.size) {
                bytes[f.size - 1 - i] = *b;
            }
            Value::Fixed(f.size, bytes)
        }
        Schema::Decimal(d) => {
            let digits = d.precision.min(18) as u32;
            let unscaled = (seq % 10u64.pow(digits)) as i64;
            let size = match &*d.inner {
                Schema::Fixed(f) => f.size,
                _ => decimal_bytes(d.precision).min(8),
            };
            let mut bytes = vec![0u8; size];
            let be = unscaled.to_be_bytes();
            for (i, b) in be.iter().rev().enumerate().take(size) {
                bytes[size - 1 - i] = *b;
            }
            Value::Decimal(apache_avro::Decimal::from(bytes))
        }
        Schema::Uuid => Value::Uuid(uuid_of(seq)),
        Schema::Date => Value::Date(19_000 + (seq % 1_000) as i32),
        Schema::TimeMillis => Value::TimeMillis((seq % 86_400_000) as i32),
        Schema::TimeMicros => Value::TimeMicros(n % 86_400_000_000),
        Schema::TimestampMillis => Value::TimestampMillis(1_700_000_000_000 + n),
        Schema::TimestampMicros => Value::TimestampMicros(1_700_000_000_000_000 + n),
        Schema::TimestampNanos => Value::TimestampNanos(1_700_000_000_000_000_000 + n),
        Schema::LocalTimestampMillis => Value::LocalTimestampMillis(1_700_000_000_000 + n),
        Schema::LocalTimestampMicros => Value::LocalTimestampMicros(1_700_000_000_000_000 + n),
        Schema::LocalTimestampNanos => Value::LocalTimestampNanos(1_700_000_000_000_000_000 + n),
        Schema::Duration => Value::Duration(apache_avro::Duration::new(
            apache_avro::Months::new(1),
            apache_avro::Days::new((seq % 28) as u32),
            apache_avro::Millis::new((seq % 1000) as u32),
        )),
        other => return Err(format!("produce cannot make a sample of {other:?}")),
    })
}

fn uuid_of(seq: u64) -> apache_avro::Uuid {
    // Version 4, variant 1 bits set; the rest counts.
    apache_avro::Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0000 | u128::from(seq))
}

type Names = std::collections::HashMap<Name, Schema>;

/// The largest buffer apache-avro may make for one value.
const MAX_ALLOCATION_BYTES: usize = 64 << 20;

/// The deepest nesting a record may have, each record, array, map and
/// union a level (a recursive schema nests one level per byte).
pub const MAX_DEPTH: usize = 128;

/// What a datum may build, in units: every value costs one, every record
/// and map [`OBJECT_COST`] more (a JSON object allocates a tree node); a
/// datum may spend [`BUDGET_PER_BYTE`] per byte of it, plus this.
const MAX_EMPTY_ITEMS: usize = 4096;
const OBJECT_COST: usize = 16;
const BUDGET_PER_BYTE: usize = 2;

/// A bounded pass over a datum's bytes that checks their shape against
/// the schema without building anything: nesting at most [`MAX_DEPTH`],
/// array and map items at most one per byte (plus [`MAX_EMPTY_ITEMS`]),
/// each length within the bytes left, union branches and enum symbols
/// that exist, decimals within their precision.
struct Walk<'a> {
    data: &'a [u8],
    pos: usize,
    items_left: usize,
    names: &'a Names,
}

impl Walk<'_> {
    fn long(&mut self) -> Result<i64, String> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let byte = *self
                .data
                .get(self.pos)
                .ok_or("the datum ends inside a number")?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        Err("a number longer than 10 bytes".into())
    }

    fn skip(&mut self, n: usize) -> Result<(), String> {
        if self.data.len() - self.pos < n {
            return Err(format!(
                "the datum ends {} bytes short",
                n - (self.data.len() - self.pos)
            ));
        }
        self.pos += n;
        Ok(())
    }

    fn length(&mut self) -> Result<usize, String> {
        let n = self.long()?;
        usize::try_from(n).map_err(|_| format!("a negative length {n}"))
    }

    /// Spends `units` of the datum's budget.
    fn spend(&mut self, units: usize) -> Result<(), String> {
        self.items_left = self.items_left.checked_sub(units).ok_or_else(|| {
            format!(
                "more values than {} bytes can hold (at most {BUDGET_PER_BYTE} units a byte, \
                 a record or map {OBJECT_COST})",
                self.data.len()
            )
        })?;
        Ok(())
    }

    fn walk(&mut self, schema: &Schema, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH}"));
        }
        let schema = resolve(schema, self.names)?;
        let cost = match schema {
            Schema::Record(_) | Schema::Map(_) => 1 + OBJECT_COST,
            _ => 1,
        };
        self.spend(cost)?;
        match schema {
            Schema::Null => Ok(()),
            Schema::Boolean => self.skip(1),
            Schema::Int
            | Schema::Long
            | Schema::Date
            | Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => self.long().map(drop),
            Schema::Float => self.skip(4),
            Schema::Double => self.skip(8),
            Schema::Duration => self.skip(12),
            Schema::Bytes | Schema::String | Schema::Uuid | Schema::BigDecimal => {
                let n = self.length()?;
                self.skip(n)
            }
            Schema::Fixed(f) => self.skip(f.size),
            // A fixed decimal's size is the schema's (it may be larger than
            // the precision needs); a bytes decimal's is the record's.
            Schema::Decimal(d) => match &*d.inner {
                Schema::Fixed(f) => self.skip(f.size),
                _ => {
                    let n = self.length()?;
                    let start = self.pos;
                    self.skip(n)?;
                    let digits = significant(&self.data[start..start + n]);
                    if digits > decimal_bytes(d.precision) {
                        return Err(format!(
                            "a decimal of {digits} bytes: more than precision {} allows",
                            d.precision
                        ));
                    }
                    Ok(())
                }
            },
            Schema::Enum(e) => {
                let i = self.long()?;
                if i < 0 || i as usize >= e.symbols.len() {
                    return Err(format!("enum {} has no symbol {i}", e.name.name));
                }
                Ok(())
            }
            Schema::Union(u) => {
                let i = self.long()?;
                let branch = usize::try_from(i)
                    .ok()
                    .and_then(|i| u.variants().get(i))
                    .ok_or_else(|| format!("the union has no branch {i}"))?;
                self.walk(branch, depth + 1)
            }
            Schema::Record(r) => r
                .fields
                .iter()
                .try_for_each(|f| self.walk(&f.schema, depth + 1)),
            Schema::Array(a) => self.blocks(depth, |w, depth| w.walk(&a.items, depth + 1)),
            Schema::Map(m) => self.blocks(depth, |w, depth| {
                let n = w.length()?;
                w.skip(n)?;
                w.walk(&m.types, depth + 1)
            }),
            Schema::Ref { name } => Err(format!("unresolved reference {}", name.fullname(None))),
        }
    }

    /// Array and map blocks: a count (negative: followed by the block's
    /// size in bytes), that many items, until a count of 0.
    fn blocks(
        &mut self,
        depth: usize,
        mut item: impl FnMut(&mut Self, usize) -> Result<(), String>,
    ) -> Result<(), String> {
        loop {
            let count = self.long()?;
            if count == 0 {
                return Ok(());
            }
            if count < 0 {
                self.long()?;
            }
            let count = count.unsigned_abs();
            if count > self.items_left as u64 {
                return Err(format!(
                    "a block of {count} items: more than the datum's {} bytes can hold",
                    self.data.len()
                ));
            }
            for _ in 0..count {
                item(self, depth)?;
            }
        }
    }
}

/// The bytes of a two's-complement number without its redundant sign
/// extension (leading 0x00 before a clear top bit, 0xFF before a set one).
fn significant(bytes: &[u8]) -> usize {
    let mut b = bytes;
    while b.len() > 1 && ((b[0] == 0x00 && b[1] & 0x80 == 0) || (b[0] == 0xff && b[1] & 0x80 != 0))
    {
        b = &b[1..];
    }
    b.len()
}

/// The most bytes a two's-complement decimal of `precision` digits takes.
fn decimal_bytes(precision: usize) -> usize {
    // 10^p < 2^(8n - 1)  <=>  n > (p * log2(10) + 1) / 8
    ((precision as f64 * std::f64::consts::LOG2_10 + 1.0) / 8.0).floor() as usize + 1
}

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
        // A time of day outside the day (the schema allows it) stays a number.
        (Value::TimeMillis(ms), _) if !(0..86_400_000).contains(&ms) => Json::from(ms),
        (Value::TimeMicros(us), _) if !(0..86_400_000_000).contains(&us) => Json::from(us),
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
    fn samples_round_trip_through_the_decoder() {
        let schema = AvroSchema::compile(ORDER, &[]).unwrap();
        for seq in [0, 1, 3, 12_345] {
            let json = schema.decode(&schema.sample(seq).unwrap()).unwrap();
            assert_eq!(json["id"], seq);
        }
        let recursive =
            r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}"#;
        let schema = AvroSchema::compile(recursive, &[]).unwrap();
        assert!(
            schema.decode(&schema.sample(5).unwrap()).is_ok(),
            "stops at its depth"
        );
    }

    #[test]
    fn hostile_bytes_are_refused_before_anything_is_built() {
        // A map claiming 2^29 entries in 5 bytes.
        let map = AvroSchema::compile(
            r#"{"type":"record","name":"R","fields":[{"name":"tags","type":{"type":"map","values":"string"}}]}"#,
            &[],
        )
        .unwrap();
        let err = map.decode(&[0x80, 0x80, 0x80, 0x80, 0x04]).unwrap_err();
        assert!(err.contains("more than the datum"), "{err}");
        // 2^29 nulls.
        let nulls = AvroSchema::compile(r#"{"type":"array","items":"null"}"#, &[]).unwrap();
        assert!(nulls.decode(&[0x80, 0x80, 0x80, 0x80, 0x04, 0]).is_err());
        assert_eq!(
            nulls.decode(&[0x06, 0]).unwrap(),
            serde_json::json!([null, null, null])
        );
        // A recursive schema nested one level per byte.
        let node = AvroSchema::compile(
            r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}"#,
            &[],
        )
        .unwrap();
        let mut deep = vec![0x02; 10_000];
        deep.push(0);
        let err = node.decode(&deep).unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
        let mut fine = vec![0x02; 20];
        fine.push(0);
        assert!(node.decode(&fine).is_ok());
        // A decimal far longer than its precision.
        let dec = AvroSchema::compile(
            r#"{"type":"bytes","logicalType":"decimal","precision":4,"scale":2}"#,
            &[],
        )
        .unwrap();
        let mut long = vec![0x80, 0x10];
        long.extend(vec![1u8; 1024]);
        assert!(dec.decode(&long).unwrap_err().contains("precision"));
        assert_eq!(
            dec.decode(&[0x04, 0x04, 0xd2]).unwrap(),
            serde_json::json!("12.34")
        );
        // Enum and union indexes out of range.
        let e = AvroSchema::compile(r#"{"type":"enum","name":"E","symbols":["A"]}"#, &[]).unwrap();
        assert!(e.decode(&[0x02]).is_err());
        let u = AvroSchema::compile(r#"["null","long"]"#, &[]).unwrap();
        assert!(u.decode(&[0x04]).is_err());
        let t = AvroSchema::compile(r#"{"type":"long","logicalType":"time-micros"}"#, &[]).unwrap();
        assert_eq!(
            t.decode(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01])
                .unwrap(),
            serde_json::json!(i64::MAX)
        );
    }

    proptest::proptest! {
        #[test]
        fn no_bytes_make_the_decoder_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            for schema in [ORDER, r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]},{"name":"m","type":{"type":"map","values":{"type":"array","items":"null"}}}]}"#] {
                let schema = AvroSchema::compile(schema, &[]).unwrap();
                let _ = schema.decode(&bytes);
            }
        }
    }

    #[test]
    fn decimals_keep_their_digits() {
        assert_eq!(decimal_bytes(4), 2);
        assert_eq!(decimal_bytes(9), 4);
        assert_eq!(decimal_bytes(18), 8);
        assert_eq!(decimal_bytes(38), 16);
        assert_eq!(decimal(&[0x04, 0xd2], 2), "12.34");
        assert_eq!(decimal(&[0x05], 3), "0.005");
        assert_eq!(decimal(&[0xff], 1), "-0.1");
        assert_eq!(decimal(&[0x7b], 0), "123");
        assert_eq!(decimal(&[], 2), "0.00");
    }
}
