//! ShareFetch v2 (KIP-1206, Kafka 4.2+), which `kafka-protocol` does not
//! encode: v1's request with `ShareAcquireMode` (int8) and `IsRenewAck`
//! (bool) after `BatchSize`; the answer is v1's. Checked byte for byte
//! against Kafka 4.3.2's own `ShareFetchRequestData` (see the tests).

use bytes::BytesMut;
use kafka_protocol::messages::{ShareFetchRequest, ShareFetchResponse};
use kafka_protocol::protocol::buf::{ByteBuf, ByteBufMut};
use kafka_protocol::protocol::{Decodable, Encodable};

/// How a fetch acquires records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AcquireMode {
    /// Whole producer batches: `max_records` is a soft limit, so one fetch
    /// may take far more than it asked for (Kafka's default).
    BatchOptimized,
    /// At most `max_records` per fetch, a batch split if need be: a member
    /// takes no more than it can start, and the rest stays for the others.
    #[default]
    RecordLimit,
}

impl AcquireMode {
    fn wire(self) -> u8 {
        match self {
            Self::BatchOptimized => 0,
            Self::RecordLimit => 1,
        }
    }
}

super::hand_encoded::client_message!(Request, Response, 78, 1..=2);

/// A ShareFetch at v1 or v2, whichever the connection picks.
pub struct Request {
    pub fetch: ShareFetchRequest,
    pub mode: AcquireMode,
}

/// The answer: v1's and v2's are the same.
pub struct Response(pub ShareFetchResponse);

/// Bytes of a compact nullable string: its length + 1 as a varint, then it.
pub(super) fn compact_string_len(s: Option<&str>) -> usize {
    let n = s.map_or(0, str::len);
    let mut prefix = n + 1;
    let mut bytes = 1;
    while prefix >= 0x80 {
        prefix >>= 7;
        bytes += 1;
    }
    bytes + n
}

impl Request {
    /// Where v2's fields go in v1's bytes: after the group and member ids
    /// and six int32s (epoch, max wait, min bytes, max bytes, max records,
    /// batch size).
    fn v2_fields_at(&self) -> usize {
        compact_string_len(self.fetch.group_id.as_deref().map(|g| g.as_str()))
            + compact_string_len(self.fetch.member_id.as_deref())
            + 6 * 4
    }
}

impl Encodable for Request {
    fn encode<B: ByteBufMut>(&self, buf: &mut B, version: i16) -> anyhow::Result<()> {
        if version < 2 {
            return self.fetch.encode(buf, 1);
        }
        let mut v1 = BytesMut::new();
        self.fetch.encode(&mut v1, 1)?;
        let at = self.v2_fields_at();
        anyhow::ensure!(
            at <= v1.len(),
            "ShareFetch v1 shorter than its header fields"
        );
        buf.put_slice(&v1[..at]);
        buf.put_u8(self.mode.wire());
        buf.put_u8(0); // IsRenewAck: this fetch also acquires.
        buf.put_slice(&v1[at..]);
        Ok(())
    }
    fn compute_size(&self, version: i16) -> anyhow::Result<usize> {
        Ok(self.fetch.compute_size(1)? + if version < 2 { 0 } else { 2 })
    }
}
impl Decodable for Response {
    fn decode<B: ByteBuf>(buf: &mut B, _: i16) -> anyhow::Result<Self> {
        Ok(Self(ShareFetchResponse::decode(buf, 1)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::GroupId;
    use kafka_protocol::protocol::StrBytes;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn request(group: &str, mode: AcquireMode) -> Request {
        Request {
            fetch: ShareFetchRequest::default()
                .with_group_id(Some(GroupId(StrBytes::from_string(group.into()))))
                .with_member_id(Some(StrBytes::from_static_str("m")))
                .with_max_bytes(i32::MAX)
                .with_max_records(7)
                .with_batch_size(7),
            mode,
        }
    }

    /// The bytes Kafka 4.3.2's `ShareFetchRequestData` writes for group "g",
    /// member "m", max records and batch size 7, record-limit mode.
    #[test]
    fn encodes_v2_as_kafka_does() {
        let r = request("g", AcquireMode::RecordLimit);
        let mut v2 = BytesMut::new();
        r.encode(&mut v2, 2).unwrap();
        assert_eq!(
            hex(&v2),
            "0267026d0000000000000000000000007fffffff00000007000000070100010100"
        );
        assert_eq!(r.compute_size(2).unwrap(), v2.len());
        let mut v1 = BytesMut::new();
        r.encode(&mut v1, 1).unwrap();
        assert_eq!(
            hex(&v1),
            "0267026d0000000000000000000000007fffffff0000000700000007010100"
        );
        assert_eq!(r.compute_size(1).unwrap(), v1.len());
    }

    /// A group id long enough for a two-byte length still puts the mode
    /// right after the batch size.
    #[test]
    fn a_long_group_id_moves_the_v2_fields_with_it() {
        let group = "g".repeat(200);
        let r = request(&group, AcquireMode::BatchOptimized);
        let mut v2 = BytesMut::new();
        r.encode(&mut v2, 2).unwrap();
        let at = 2 + 200 + 2 + 24;
        assert_eq!(&v2[at - 4..at], &7i32.to_be_bytes(), "batch size");
        assert_eq!(&v2[at..at + 2], &[0, 0], "batch-optimized, not a renew");
    }
}
