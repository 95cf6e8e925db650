//! What a message encoded here by hand needs beside its encoding (the
//! versions `kafka-protocol` does not know): its versions, the flexible
//! headers (request v2, response v1), and the directions a client never
//! takes (decoding requests, encoding responses).

/// `client_message!(Request, Response, key, min..=max)`.
macro_rules! client_message {
    ($request:ty, $response:ty, $key:expr, $min:literal..=$max:literal) => {
        impl kafka_protocol::protocol::Message for $request {
            const VERSIONS: kafka_protocol::protocol::VersionRange =
                kafka_protocol::protocol::VersionRange {
                    min: $min,
                    max: $max,
                };
            const DEPRECATED_VERSIONS: Option<kafka_protocol::protocol::VersionRange> = None;
        }
        impl kafka_protocol::protocol::Message for $response {
            const VERSIONS: kafka_protocol::protocol::VersionRange =
                kafka_protocol::protocol::VersionRange {
                    min: $min,
                    max: $max,
                };
            const DEPRECATED_VERSIONS: Option<kafka_protocol::protocol::VersionRange> = None;
        }
        impl kafka_protocol::protocol::HeaderVersion for $request {
            fn header_version(_: i16) -> i16 {
                2
            }
        }
        impl kafka_protocol::protocol::HeaderVersion for $response {
            fn header_version(_: i16) -> i16 {
                1
            }
        }
        impl kafka_protocol::protocol::Decodable for $request {
            fn decode<B: kafka_protocol::protocol::buf::ByteBuf>(
                _: &mut B,
                _: i16,
            ) -> anyhow::Result<Self> {
                anyhow::bail!("a client never decodes requests")
            }
        }
        impl kafka_protocol::protocol::Encodable for $response {
            fn encode<B: kafka_protocol::protocol::buf::ByteBufMut>(
                &self,
                _: &mut B,
                _: i16,
            ) -> anyhow::Result<()> {
                anyhow::bail!("a client never encodes responses")
            }
            fn compute_size(&self, _: i16) -> anyhow::Result<usize> {
                anyhow::bail!("a client never encodes responses")
            }
        }
        impl kafka_protocol::protocol::Request for $request {
            const KEY: i16 = $key;
            type Response = $response;
        }
    };
}

pub(super) use client_message;
