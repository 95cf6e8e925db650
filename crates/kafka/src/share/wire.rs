//! One connection to one broker: framing, correlation ids, API version
//! negotiation. Requests may overlap; a reader task hands each response to
//! the request it answers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use super::ShareError;

/// Anything a connection can run over: TCP, or TLS around it.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// The largest response accepted: a guard against a peer that is not Kafka.
const MAX_FRAME: usize = 256 * 1024 * 1024;

type Pending = Arc<Mutex<HashMap<i32, oneshot::Sender<Result<Bytes, ShareError>>>>>;

pub struct Connection {
    addr: String,
    client_id: StrBytes,
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: Pending,
    next_id: AtomicI32,
    versions: HashMap<i16, (i16, i16)>,
    reader: tokio::task::JoinHandle<()>,
    request_timeout: Duration,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Connection {
    /// Opens a connection over `stream` and learns the broker's API versions.
    pub async fn open(
        addr: String,
        stream: Box<dyn Stream>,
        client_id: &str,
        request_timeout: Duration,
    ) -> Result<Self, ShareError> {
        let (read, write) = tokio::io::split(stream);
        let pending: Pending = Arc::default();
        let reader = tokio::spawn(read_loop(read, pending.clone(), addr.clone()));
        let mut conn = Self {
            addr,
            client_id: StrBytes::from_string(client_id.to_string()),
            writer: tokio::sync::Mutex::new(Box::new(write)),
            pending,
            next_id: AtomicI32::new(1),
            versions: HashMap::new(),
            reader,
            request_timeout,
        };
        let response: ApiVersionsResponse = conn
            .call_version(
                ApiVersionsRequest::default()
                    .with_client_software_name(StrBytes::from_static_str("microbatch"))
                    .with_client_software_version(StrBytes::from_static_str(env!(
                        "CARGO_PKG_VERSION"
                    ))),
                3,
            )
            .await?;
        if response.error_code != 0 {
            return Err(ShareError::broker("ApiVersions", response.error_code, None));
        }
        conn.versions = response
            .api_keys
            .iter()
            .map(|k| (k.api_key, (k.min_version, k.max_version)))
            .collect();
        Ok(conn)
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The highest version of `R` both sides speak.
    pub fn version<R: Request>(&self) -> Result<i16, ShareError> {
        let name = api_name(R::KEY);
        let (broker_min, broker_max) =
            *self
                .versions
                .get(&R::KEY)
                .ok_or_else(|| ShareError::Unsupported {
                    api: name,
                    broker: self.addr.clone(),
                    detail: "the broker does not offer it (share groups need Kafka 4.2 or later with share.version=1)".into(),
                })?;
        let version = broker_max.min(R::VERSIONS.max);
        if version < broker_min.max(R::VERSIONS.min) {
            return Err(ShareError::Unsupported {
                api: name,
                broker: self.addr.clone(),
                detail: format!(
                    "the broker speaks versions {broker_min}..={broker_max}, this client {}..={}",
                    R::VERSIONS.min,
                    R::VERSIONS.max
                ),
            });
        }
        Ok(version)
    }

    /// Sends `request` at the highest common version and waits for its answer.
    pub async fn call<R: Request>(&self, request: R) -> Result<R::Response, ShareError> {
        let version = self.version::<R>()?;
        self.call_version(request, version).await
    }

    pub async fn call_version<R: Request>(
        &self,
        request: R,
        version: i16,
    ) -> Result<R::Response, ShareError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(id)
            .with_client_id(Some(self.client_id.clone()));
        let mut frame = BytesMut::new();
        frame.put_i32(0);
        header
            .encode(&mut frame, R::header_version(version))
            .and_then(|_| request.encode(&mut frame, version))
            .map_err(|e| ShareError::Encode(format!("{}: {e}", api_name(R::KEY))))?;
        let len = i32::try_from(frame.len() - 4).expect("request under 2 GiB");
        frame[0..4].copy_from_slice(&len.to_be_bytes());

        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert(id, tx);
        let sent = async {
            let mut w = self.writer.lock().await;
            w.write_all(&frame).await?;
            w.flush().await
        };
        if let Err(e) = sent.await {
            self.pending.lock().expect("pending").remove(&id);
            return Err(ShareError::io(&self.addr, e));
        }
        let mut body = match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(ShareError::Disconnected(self.addr.clone())),
            Err(_) => {
                self.pending.lock().expect("pending").remove(&id);
                return Err(ShareError::Timeout {
                    api: api_name(R::KEY),
                    broker: self.addr.clone(),
                    after: self.request_timeout,
                });
            }
        };
        let decode_err = |e: anyhow::Error| {
            ShareError::Decode(format!(
                "{} v{version} from {}: {e}",
                api_name(R::KEY),
                self.addr
            ))
        };
        ResponseHeader::decode(&mut body, R::Response::header_version(version))
            .map_err(decode_err)?;
        R::Response::decode(&mut body, version).map_err(decode_err)
    }

    /// False once the reader has seen the connection end.
    pub fn is_open(&self) -> bool {
        !self.reader.is_finished()
    }
}

fn api_name(key: i16) -> &'static str {
    match ApiKey::try_from(key) {
        Ok(ApiKey::ApiVersions) => "ApiVersions",
        Ok(ApiKey::Metadata) => "Metadata",
        Ok(ApiKey::FindCoordinator) => "FindCoordinator",
        Ok(ApiKey::SaslHandshake) => "SaslHandshake",
        Ok(ApiKey::SaslAuthenticate) => "SaslAuthenticate",
        Ok(ApiKey::ShareGroupHeartbeat) => "ShareGroupHeartbeat",
        Ok(ApiKey::ShareGroupDescribe) => "ShareGroupDescribe",
        Ok(ApiKey::ShareFetch) => "ShareFetch",
        Ok(ApiKey::ShareAcknowledge) => "ShareAcknowledge",
        Ok(ApiKey::DescribeShareGroupOffsets) => "DescribeShareGroupOffsets",
        Ok(ApiKey::IncrementalAlterConfigs) => "IncrementalAlterConfigs",
        _ => "request",
    }
}

async fn read_loop(mut read: impl AsyncRead + Unpin, pending: Pending, addr: String) {
    let error = loop {
        let len = match read.read_i32().await {
            Ok(n) => n,
            Err(e) => break ShareError::io(&addr, e),
        };
        let Ok(len) = usize::try_from(len) else {
            break ShareError::Decode(format!("negative frame length {len} from {addr}"));
        };
        if !(4..=MAX_FRAME).contains(&len) {
            break ShareError::Decode(format!("frame of {len} bytes from {addr}"));
        }
        let mut buf = vec![0u8; len];
        if let Err(e) = read.read_exact(&mut buf).await {
            break ShareError::io(&addr, e);
        }
        let body = Bytes::from(buf);
        let id = (&body[..4]).get_i32();
        let waiter = pending.lock().expect("pending").remove(&id);
        if let Some(tx) = waiter {
            let _ = tx.send(Ok(body));
        }
    };
    // Everyone still waiting learns why.
    let waiters: Vec<_> = pending.lock().expect("pending").drain().collect();
    for (_, tx) in waiters {
        let _ = tx.send(Err(error.clone()));
    }
}
