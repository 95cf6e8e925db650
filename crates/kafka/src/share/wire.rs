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

/// Requests waiting for their answer. Once the reader has stopped, `closed`
/// says why and no request waits any more.
#[derive(Default)]
struct Waiting {
    by_id: HashMap<i32, oneshot::Sender<Result<Bytes, ShareError>>>,
    closed: Option<ShareError>,
}

type Pending = Arc<Mutex<Waiting>>;

pub struct Connection {
    addr: String,
    client_id: StrBytes,
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: Pending,
    next_id: AtomicI32,
    versions: HashMap<i16, (i16, i16)>,
    reader: tokio::task::JoinHandle<()>,
    request_timeout: Duration,
    /// Set while a request is being written: a write cut off (its future
    /// dropped) leaves half a frame behind, and the connection is done.
    writing: std::sync::atomic::AtomicBool,
    /// When the SASL session must be renewed (KIP-368); none without one.
    reauth_at: Mutex<Option<std::time::Instant>>,
    /// Held shared by every request from its write to its answer, and
    /// exclusively while authenticating again: KIP-368 wants no other
    /// request on the connection meanwhile.
    auth: tokio::sync::RwLock<()>,
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
            writing: std::sync::atomic::AtomicBool::new(false),
            reauth_at: Mutex::new(None),
            auth: tokio::sync::RwLock::new(()),
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
        let _shared = self.auth.read().await;
        self.send(request, version).await
    }

    /// [`Self::call`] for the SASL exchange itself, which runs while
    /// [`Self::reauth_turn`] holds the connection.
    pub async fn call_authenticating<R: Request>(
        &self,
        request: R,
    ) -> Result<R::Response, ShareError> {
        let version = self.version::<R>()?;
        self.send(request, version).await
    }

    async fn send<R: Request>(&self, request: R, version: i16) -> Result<R::Response, ShareError> {
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
        {
            let mut waiting = self.pending.lock().expect("pending");
            if let Some(e) = &waiting.closed {
                return Err(e.clone());
            }
            waiting.by_id.insert(id, tx);
        }
        let sent = async {
            let mut w = self.writer.lock().await;
            if self.writing.load(Ordering::Acquire) {
                return Err(std::io::Error::other(
                    "an earlier request was cut off mid-write",
                ));
            }
            self.writing.store(true, Ordering::Release);
            w.write_all(&frame).await?;
            w.flush().await?;
            self.writing.store(false, Ordering::Release);
            Ok(())
        };
        match tokio::time::timeout(self.request_timeout, sent).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.pending.lock().expect("pending").by_id.remove(&id);
                return Err(ShareError::io(&self.addr, e));
            }
            Err(_) => return Err(self.gave_up::<R>(id)),
        }
        let mut body = match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(ShareError::Disconnected(self.addr.clone())),
            Err(_) => return Err(self.gave_up::<R>(id)),
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

    pub fn set_reauth(&self, at: Option<std::time::Instant>) {
        *self.reauth_at.lock().expect("reauth") = at;
    }

    pub fn reauth_due(&self) -> bool {
        self.reauth_at
            .lock()
            .expect("reauth")
            .is_some_and(|at| std::time::Instant::now() >= at)
    }

    /// Held while authenticating again: one task does it, and no other
    /// request is on the connection meanwhile (those under way are
    /// answered first).
    pub async fn reauth_turn(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.auth.write().await
    }

    /// A request that had no answer in time: forgotten, and said so.
    fn gave_up<R: Request>(&self, id: i32) -> ShareError {
        self.pending.lock().expect("pending").by_id.remove(&id);
        ShareError::Timeout {
            api: api_name(R::KEY),
            broker: self.addr.clone(),
            after: self.request_timeout,
        }
    }

    /// False once the reader has seen the connection end, or a write was
    /// cut off.
    pub fn is_open(&self) -> bool {
        // `writing` with no one holding the writer: a write was cut off.
        let cut_off = self.writing.load(Ordering::Acquire) && self.writer.try_lock().is_ok();
        !self.reader.is_finished() && !cut_off
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
        Ok(ApiKey::ListOffsets) => "ListOffsets",
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
        let waiter = pending.lock().expect("pending").by_id.remove(&id);
        if let Some(tx) = waiter {
            let _ = tx.send(Ok(body));
        }
    };
    // Everyone still waiting learns why, and no one waits from now on.
    let waiters: Vec<_> = {
        let mut waiting = pending.lock().expect("pending");
        waiting.closed = Some(error.clone());
        waiting.by_id.drain().collect()
    };
    for (_, tx) in waiters {
        let _ = tx.send(Err(error.clone()));
    }
}
