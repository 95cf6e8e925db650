//! The Confluent wire format: which schema a record's bytes were written
//! with, and where the encoded data starts.
//!
//! A framed payload is magic byte 0, the schema id (4 bytes, big-endian),
//! then for Protobuf the message indexes (which message of the schema's
//! file: a zig-zag varint count, then that many zig-zag varint indexes; a
//! single 0 byte stands for `[0]`), then the encoded data. A record may
//! instead carry its schema id in a `__value_schema_id` / `__key_schema_id`
//! header (magic byte 0 and the 4-byte id, or magic byte 1 and a 16-byte
//! schema GUID); then the payload is the encoded data alone (Protobuf still
//! starts with its message indexes).

use thiserror::Error;

/// The header that carries a value's schema id instead of its payload.
pub const VALUE_SCHEMA_ID_HEADER: &str = "__value_schema_id";
/// The header that carries a key's schema id instead of its payload.
pub const KEY_SCHEMA_ID_HEADER: &str = "__key_schema_id";

/// The most message indexes a payload may name: deeper nesting than this
/// is a corrupt count, not a schema.
const MAX_MESSAGE_INDEXES: u64 = 64;

/// Which registered schema wrote the data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SchemaId {
    /// The registry's numeric id (Confluent's schema id, Apicurio's content id).
    Id(u32),
    /// A schema GUID (Confluent's header form), as lowercase hex with dashes.
    Guid(String),
}

impl std::fmt::Display for SchemaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SchemaId::Id(id) => write!(f, "{id}"),
            SchemaId::Guid(guid) => f.write_str(guid),
        }
    }
}

/// Why bytes are not in the wire format: always the record's own fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("{0} bytes: too short for the schema-registry wire format (magic byte 0 and a 4-byte schema id)")]
    TooShort(usize),
    #[error("magic byte {0}: not the schema-registry wire format (0)")]
    BadMagic(u8),
    #[error("schema id header: {0}")]
    BadHeader(String),
    #[error("protobuf message indexes: {0}")]
    BadIndexes(String),
}

/// Splits a framed payload into its schema id and the rest.
pub fn split_framed(payload: &[u8]) -> Result<(SchemaId, &[u8]), WireError> {
    match payload {
        [0, a, b, c, d, rest @ ..] => {
            Ok((SchemaId::Id(u32::from_be_bytes([*a, *b, *c, *d])), rest))
        }
        [] | [0, ..] => Err(WireError::TooShort(payload.len())),
        [magic, ..] => Err(WireError::BadMagic(*magic)),
    }
}

/// Reads a `__value_schema_id` / `__key_schema_id` header's value.
pub fn header_schema_id(value: &[u8]) -> Result<SchemaId, WireError> {
    match value {
        [0, a, b, c, d] => Ok(SchemaId::Id(u32::from_be_bytes([*a, *b, *c, *d]))),
        [1, guid @ ..] if guid.len() == 16 => Ok(SchemaId::Guid(format_guid(guid))),
        [magic, ..] if *magic > 1 => Err(WireError::BadHeader(format!(
            "version byte {magic}: neither 0 (schema id) nor 1 (schema GUID)"
        ))),
        _ => Err(WireError::BadHeader(format!(
            "{} bytes: a schema id header is 5 bytes (0 and the id) or 17 (1 and a GUID)",
            value.len()
        ))),
    }
}

fn format_guid(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Splits Protobuf message indexes off the front of `data`.
pub fn split_message_indexes(data: &[u8]) -> Result<(Vec<i32>, &[u8]), WireError> {
    let (count, mut rest) = zigzag(data)?;
    if count == 0 {
        // The common case, first message of the file, is written as one 0 byte.
        return Ok((vec![0], rest));
    }
    if count < 0 || count as u64 > MAX_MESSAGE_INDEXES {
        return Err(WireError::BadIndexes(format!("count {count}")));
    }
    let mut indexes = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (index, after) = zigzag(rest)?;
        if index < 0 || index > i32::MAX as i64 {
            return Err(WireError::BadIndexes(format!("index {index}")));
        }
        indexes.push(index as i32);
        rest = after;
    }
    Ok((indexes, rest))
}

fn zigzag(data: &[u8]) -> Result<(i64, &[u8]), WireError> {
    let mut value: u64 = 0;
    for (i, byte) in data.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let decoded = ((value >> 1) as i64) ^ -((value & 1) as i64);
            return Ok((decoded, &data[i + 1..]));
        }
    }
    Err(WireError::BadIndexes("truncated varint".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_framed_payload_names_its_schema() {
        assert_eq!(
            split_framed(&[0, 0, 0, 1, 2, 9, 9]),
            Ok((SchemaId::Id(258), &[9u8, 9][..]))
        );
        assert_eq!(
            split_framed(&[0, 0, 0, 0, 7]),
            Ok((SchemaId::Id(7), &[][..]))
        );
        assert_eq!(split_framed(&[0, 0, 0]), Err(WireError::TooShort(3)));
        assert_eq!(split_framed(&[]), Err(WireError::TooShort(0)));
        assert_eq!(split_framed(b"{\"a\":1}"), Err(WireError::BadMagic(b'{')));
    }

    #[test]
    fn headers_carry_an_id_or_a_guid() {
        assert_eq!(header_schema_id(&[0, 0, 0, 0, 42]), Ok(SchemaId::Id(42)));
        let mut guid = vec![1u8];
        guid.extend(0u8..16);
        assert_eq!(
            header_schema_id(&guid),
            Ok(SchemaId::Guid(
                "00010203-0405-0607-0809-0a0b0c0d0e0f".into()
            ))
        );
        assert!(header_schema_id(b"42").is_err());
        assert!(header_schema_id(&[2, 0, 0, 0, 1]).is_err());
        assert!(header_schema_id(&[]).is_err());
    }

    #[test]
    fn message_indexes_as_confluent_writes_them() {
        assert_eq!(split_message_indexes(&[0, 8]), Ok((vec![0], &[8u8][..])));
        // [1]: count 1 (zig-zag 2), index 1 (zig-zag 2).
        assert_eq!(split_message_indexes(&[2, 2, 8]), Ok((vec![1], &[8u8][..])));
        // [0, 3]: count 2 (4), 0 (0), 3 (6).
        assert_eq!(split_message_indexes(&[4, 0, 6]), Ok((vec![0, 3], &[][..])));
        assert!(split_message_indexes(&[]).is_err());
        assert!(split_message_indexes(&[1]).is_err(), "count -1");
        assert!(split_message_indexes(&[0xff; 12]).is_err());
        assert!(split_message_indexes(&[200, 1]).is_err(), "count 100");
    }

    proptest! {
        #[test]
        fn no_input_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = split_framed(&bytes);
            let _ = header_schema_id(&bytes);
            if let Ok((indexes, rest)) = split_message_indexes(&bytes) {
                prop_assert!(rest.len() < bytes.len());
                prop_assert!(!indexes.is_empty());
            }
        }

        #[test]
        fn indexes_round_trip(indexes in proptest::collection::vec(0i32..1000, 1..8), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = Vec::new();
            let zz = |v: i64, out: &mut Vec<u8>| {
                let mut u = ((v << 1) ^ (v >> 63)) as u64;
                loop {
                    let b = (u & 0x7f) as u8;
                    u >>= 7;
                    if u == 0 { out.push(b); break; }
                    out.push(b | 0x80);
                }
            };
            zz(indexes.len() as i64, &mut bytes);
            for i in &indexes { zz(*i as i64, &mut bytes); }
            bytes.extend(&tail);
            let (got, rest) = split_message_indexes(&bytes).unwrap();
            prop_assert_eq!(got, indexes);
            prop_assert_eq!(rest, &tail[..]);
        }
    }
}
