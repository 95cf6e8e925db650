//! Amazon MSK IAM access control: SASL/OAUTHBEARER tokens that are
//! SigV4-presigned URLs, made as AWS's own signers make them.
//!
//! A token is `GET https://kafka.<region>.amazonaws.com/?Action=kafka-cluster:Connect`
//! presigned for the service `kafka-cluster` (query-string signature,
//! `X-Amz-Expires` 900 s unless told otherwise), with a `User-Agent`
//! parameter added after signing, base64url-encoded without padding. The
//! broker recomputes the signature, checks expiry and action, and authorises
//! the caller's IAM identity.
//!
//! librdkafka asks for a token through a synchronous callback on the thread
//! that polls the client, so nothing here may wait on the network there: a
//! background thread keeps a fresh token in a shared cell, and the callback
//! only reads that cell.
//!
//! The callback runs only when the client's main queue is polled, which a
//! busy poll loop may do late, and librdkafka re-authenticates each
//! connection (KIP-368) with whatever token it holds. A broker keeps a
//! connection authenticated no longer than its token is valid, so with an
//! old token each re-authentication is due sooner than the last, until one
//! comes less than 1 s after the previous one and the broker refuses it
//! ("Request not valid in current SASL state"): librdkafka drops the
//! connection and a consumer may lose its group. So the background thread
//! also hands every new token at once to each client made with
//! [`KafkaConfig::create_client`](crate::config::KafkaConfig::create_client),
//! and librdkafka always holds one with about half its lifetime left or
//! more.
//!
//! # Layout
//! - [`sign_token`]: one token from credentials, a region and a signing time
//!   (no I/O; the differential test drives it against AWS's Go signer).
//! - [`TokenState`]: when to refresh, how to back off, what to hand out and
//!   what readiness says (no I/O; a clock the caller passes in).
//! - [`MskIamTokens`]: the refresher thread, driving [`TokenState`] with the
//!   standard AWS credential chain.
//! - [`OauthHook`]: what every rdkafka client context delegates
//!   `generate_oauth_token` to.
//! - [`WithTokens`]: a client the refresher hands every new token to.

use std::borrow::Cow;
use std::ffi::{c_char, CStr, CString};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
/// What librdkafka takes from a token callback (re-exported for
/// [`delegate_oauth_token!`]).
pub use rdkafka::client::OAuthToken;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::types::{RDKafka, RDKafkaRespErr};
use thiserror::Error;

use crate::log_throttle::LogThrottle;
use crate::secret::Secret;

/// The SigV4 service name MSK's IAM tokens are signed for.
pub const SIGNING_NAME: &str = "kafka-cluster";
/// The action a token asks for.
pub const ACTION: &str = "kafka-cluster:Connect";
/// How long a token is valid: what AWS's signers use, and MSK's maximum.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// The shortest token lifetime accepted (tests use short ones).
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(10);
/// The `User-Agent` parameter, added after signing as AWS's signers do.
pub const USER_AGENT: &str = concat!("microbatch/", env!("CARGO_PKG_VERSION"));
/// The principal librdkafka keeps for the token; it is never sent, and the
/// access key id is not used for it so that it cannot reach a log line.
const PRINCIPAL: &str = "aws-msk-iam";

/// The bytes Go's `url.QueryEscape` leaves as they are (AWS's Go and Java
/// signers encode the final URL this way); everything else is `%XX`.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Why a token could not be made. Messages never contain a credential.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MskIamError {
    #[error("no AWS credentials: {0}")]
    Credentials(String),
    #[error("signing the MSK IAM token failed: {0}")]
    Signing(String),
    #[error("no valid MSK IAM token: {0}")]
    NoToken(String),
    #[error("starting the MSK IAM token refresher: {0}")]
    Start(String),
}

/// One signed token. Its `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct MskIamToken {
    /// The base64url text sent to the broker.
    pub token: Secret,
    /// The signing time, to the second (`X-Amz-Date`).
    pub signed_at: SystemTime,
    /// When the broker stops accepting it: the signature's expiry, or the
    /// credentials' expiry when that comes first.
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for MskIamToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MskIamToken")
            .field("token", &self.token)
            .field("signed_at", &self.signed_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl MskIamToken {
    /// Milliseconds since the epoch at which the token expires.
    pub fn expires_at_ms(&self) -> i64 {
        millis_since_epoch(self.expires_at)
    }
}

fn millis_since_epoch(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `t` truncated to whole seconds, as SigV4's `X-Amz-Date` keeps it.
fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// The endpoint host a token for `region` is signed for.
pub fn endpoint_host(region: &str) -> String {
    format!("kafka.{region}.amazonaws.com")
}

/// Signs one token for `region` at `at`, valid for `lifetime`.
pub fn sign_token(
    region: &str,
    credentials: &Credentials,
    at: SystemTime,
    lifetime: Duration,
) -> Result<MskIamToken, MskIamError> {
    let signed_at = whole_seconds(at);
    let identity: Identity = credentials.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(lifetime);
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SIGNING_NAME)
        .time(signed_at)
        .settings(settings)
        .build()
        .map_err(|e| MskIamError::Signing(e.to_string()))?
        .into();
    let host = endpoint_host(region);
    let action = utf8_percent_encode(ACTION, QUERY_VALUE).to_string();
    let unsigned = format!("https://{host}/?Action={action}");
    let request = SignableRequest::new(
        "GET",
        &unsigned,
        std::iter::empty(),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| MskIamError::Signing(e.to_string()))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|e| MskIamError::Signing(e.to_string()))?
        .into_parts();
    let (_headers, signed_params) = instructions.into_parts();

    // The final URL lists every parameter sorted by name, as the Go and
    // Java signers write it; the broker ignores `User-Agent` when it checks
    // the signature.
    let mut query: Vec<(&str, Cow<'_, str>)> = signed_params;
    query.push(("Action", Cow::Borrowed(ACTION)));
    query.push(("User-Agent", Cow::Borrowed(USER_AGENT)));
    query.sort_by(|a, b| a.0.cmp(b.0));
    let query: Vec<String> = query
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(k, QUERY_VALUE),
                utf8_percent_encode(v, QUERY_VALUE)
            )
        })
        .collect();
    let url = format!("https://{host}/?{}", query.join("&"));
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url.as_bytes());

    let mut expires_at = signed_at + lifetime;
    if let Some(credentials_expiry) = credentials.expiry() {
        expires_at = expires_at.min(credentials_expiry);
    }
    Ok(MskIamToken {
        token: Secret::new(token),
        signed_at,
        expires_at,
    })
}

/// How often to refresh and how to back off; the one place these live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// `X-Amz-Expires` of each token.
    pub lifetime: Duration,
    /// First wait after a failed refresh; doubles per failure.
    pub initial_backoff: Duration,
    /// Longest wait between attempts while refreshes fail.
    pub max_backoff: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self::with_lifetime(DEFAULT_TOKEN_LIFETIME)
    }
}

impl RefreshPolicy {
    pub fn with_lifetime(lifetime: Duration) -> Self {
        Self {
            lifetime,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }

    /// When a token made now should be replaced: half-way through its
    /// validity, which leaves the other half for retries if refreshing
    /// fails (librdkafka itself asks again at 80%).
    fn refresh_at(&self, token: &MskIamToken) -> SystemTime {
        let valid = token
            .expires_at
            .duration_since(token.signed_at)
            .unwrap_or_default();
        token.signed_at + (valid / 2).max(Duration::from_secs(1))
    }
}

/// The refresher's state: the last good token, failures since, and when to
/// try next. Pure: every method takes the time from the caller.
#[derive(Debug, Clone)]
pub struct TokenState {
    policy: RefreshPolicy,
    current: Option<MskIamToken>,
    failures: u32,
    last_error: Option<String>,
    next_attempt: SystemTime,
}

impl TokenState {
    /// No token yet; the first attempt is due at once.
    pub fn new(policy: RefreshPolicy, now: SystemTime) -> Self {
        Self {
            policy,
            current: None,
            failures: 0,
            last_error: None,
            next_attempt: now,
        }
    }

    pub fn policy(&self) -> RefreshPolicy {
        self.policy
    }

    /// When the next refresh attempt is due.
    pub fn next_attempt(&self) -> SystemTime {
        self.next_attempt
    }

    pub fn refresh_due(&self, now: SystemTime) -> bool {
        now >= self.next_attempt
    }

    /// Failed attempts since the last good one.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A new token was made: it replaces the old one.
    pub fn on_refreshed(&mut self, token: MskIamToken) {
        self.next_attempt = self.policy.refresh_at(&token);
        self.current = Some(token);
        self.failures = 0;
        self.last_error = None;
    }

    /// An attempt failed: the last good token stays; the next attempt waits
    /// one more back-off step. Returns that wait.
    pub fn on_failed(&mut self, error: String, now: SystemTime) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(16);
        let wait = self
            .policy
            .initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.policy.max_backoff);
        self.next_attempt = now + wait;
        self.last_error = Some(error);
        wait
    }

    /// The token to hand librdkafka now: the last good one while it is valid.
    pub fn token(&self, now: SystemTime) -> Result<&MskIamToken, MskIamError> {
        match &self.current {
            Some(t) if t.expires_at > now => Ok(t),
            Some(_) => Err(MskIamError::NoToken(format!(
                "the last token expired and refreshing failed {} times: {}",
                self.failures,
                self.last_error.as_deref().unwrap_or("no attempt yet")
            ))),
            None => Err(MskIamError::NoToken(match &self.last_error {
                Some(e) => format!("{} attempts failed: {e}", self.failures),
                None => "the first token is still being made".into(),
            })),
        }
    }

    /// Readiness: `Err` while the last refresh failed or no token is valid.
    pub fn health(&self, now: SystemTime) -> Result<(), String> {
        let token = self.token(now).map_err(|e| e.to_string())?;
        match &self.last_error {
            None => Ok(()),
            Some(e) => {
                let left = token.expires_at.duration_since(now).unwrap_or_default();
                Err(format!(
                    "MSK IAM token refresh failing ({} attempts): {e}; the last good token expires in {} s",
                    self.failures,
                    left.as_secs()
                ))
            }
        }
    }
}

/// What the refresher needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MskIamSettings {
    pub region: String,
    pub policy: RefreshPolicy,
}

/// Loads the standard AWS credential chain (environment, shared profile,
/// web identity token, container and instance metadata) for `region`.
pub async fn credential_chain(region: &str) -> Result<impl ProvideCredentials, MskIamError> {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .http_client(http)
        .load()
        .await;
    config
        .credentials_provider()
        .ok_or_else(|| MskIamError::Credentials("no credential provider configured".into()))
}

/// Fetches credentials from `provider` and signs one token now.
pub async fn fetch_and_sign(
    provider: &impl ProvideCredentials,
    settings: &MskIamSettings,
) -> Result<MskIamToken, MskIamError> {
    let credentials = provider
        .provide_credentials()
        .await
        .map_err(|e| MskIamError::Credentials(error_chain(&e)))?;
    sign_token(
        &settings.region,
        &credentials,
        SystemTime::now(),
        settings.policy.lifetime,
    )
}

/// The whole chain of an error's sources on one line (the SDK's errors keep
/// their useful part in the sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Makes one token now with the standard chain (`auth msk-iam-token`).
pub fn token_once(settings: &MskIamSettings) -> Result<MskIamToken, MskIamError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| MskIamError::Start(e.to_string()))?;
    runtime.block_on(async {
        let provider = credential_chain(&settings.region).await?;
        fetch_and_sign(&provider, settings).await
    })
}

struct Shared {
    state: Mutex<TokenState>,
    /// The clients each new token is handed to. Whoever needs both locks
    /// takes this one first.
    clients: Mutex<Clients>,
    /// Failures to hand a token over: logged once per back-off step.
    push_errors: LogThrottle,
    /// Set when the last handle is dropped, so the refresher ends.
    stopped: Mutex<bool>,
    wake: Condvar,
}

/// One registered client's librdkafka handle.
struct ClientHandle(*mut RDKafka);

// SAFETY: librdkafka's handles may be used from any thread, and the one
// call made with this pointer, `rd_kafka_oauthbearer_set_token`, takes the
// handle's own lock. The pointer is only used while its `Registration`
// lives, under the `clients` lock, and a `WithTokens` drops its
// registration (which takes that lock) before the client destroys the
// handle.
unsafe impl Send for ClientHandle {}

#[derive(Default)]
struct Clients {
    next_id: u64,
    handles: Vec<(u64, ClientHandle)>,
}

impl Shared {
    fn new(state: TokenState) -> Self {
        Self {
            state: Mutex::new(state),
            clients: Mutex::default(),
            push_errors: LogThrottle::default(),
            stopped: Mutex::new(false),
            wake: Condvar::new(),
        }
    }

    /// Hands the current token to `handles`, if one is valid (else
    /// librdkafka keeps what it has and asks through its callback, which
    /// answers with the reason). The caller holds the `clients` lock.
    /// Returns how many clients refused it.
    fn push(&self, handles: &[(u64, ClientHandle)]) -> usize {
        let token = {
            let state = self.state.lock().expect("token lock poisoned");
            match state.token(SystemTime::now()) {
                Ok(token) => token.clone(),
                Err(_) => return 0,
            }
        };
        // A base64url token and a fixed principal hold no NUL.
        let (Ok(value), Ok(principal)) =
            (CString::new(token.token.expose()), CString::new(PRINCIPAL))
        else {
            return 0;
        };
        let mut failed = 0;
        let mut first_error = None;
        for (_, handle) in handles {
            if let Err(e) = set_token(handle, &value, token.expires_at_ms(), &principal) {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            None => self.push_errors.reset(),
            Some(e) => {
                if let Some(suppressed) = self.push_errors.allow(Instant::now()) {
                    tracing::warn!(
                        clients = failed,
                        suppressed,
                        "handing the MSK IAM token to a Kafka client failed: {e}"
                    );
                }
            }
        }
        failed
    }
}

/// `rd_kafka_oauthbearer_set_token` for one client. The error never holds
/// the token.
fn set_token(
    handle: &ClientHandle,
    value: &CStr,
    expires_at_ms: i64,
    principal: &CStr,
) -> Result<(), String> {
    let mut err = [0 as c_char; 512];
    // SAFETY: the handle is a live client (see `ClientHandle`); the strings
    // are NUL-terminated and outlive the call, which copies what it keeps;
    // the error buffer's size is passed with it.
    let code: RDKafkaRespErr = unsafe {
        rdkafka::bindings::rd_kafka_oauthbearer_set_token(
            handle.0,
            value.as_ptr(),
            expires_at_ms,
            principal.as_ptr(),
            std::ptr::null_mut(),
            0,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if code == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Ok(());
    }
    let bytes: Vec<u8> = err.iter().map(|&c| c as u8).collect();
    let text = CStr::from_bytes_until_nul(&bytes)
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_default();
    let token = value.to_str().unwrap_or_default();
    Err(format!(
        "{}: {}",
        RDKafkaErrorCode::from(code),
        without_token(&text, token)
    ))
}

/// `text` cut where `token` starts in it: librdkafka quotes a token value
/// it refuses.
fn without_token(text: &str, token: &str) -> String {
    let head = &token[..token.len().min(16)];
    match text.find(head) {
        Some(at) if !head.is_empty() => format!("{}<token>", &text[..at]),
        _ => text.to_string(),
    }
}

/// A token kept fresh by a background thread, shared by every client of the
/// process. Cloning shares it; the thread ends with the last clone.
#[derive(Clone)]
pub struct MskIamTokens {
    shared: Arc<Shared>,
    _stop: Arc<StopOnDrop>,
}

impl std::fmt::Debug for MskIamTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MskIamTokens")
    }
}

struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        *self.0.stopped.lock().expect("stop lock poisoned") = true;
        self.0.wake.notify_all();
    }
}

/// How long start-up waits for the first token before it gives up.
const FIRST_TOKEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one refresh attempt (credentials and signing) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);

impl MskIamTokens {
    /// Starts the refresher and waits for its first token: a process
    /// without credentials fails here, at start, with the chain's reason.
    /// Later failures keep the last good token and show in [`Self::health`].
    pub fn start(settings: MskIamSettings) -> Result<Self, MskIamError> {
        let shared = Arc::new(Shared::new(TokenState::new(
            settings.policy,
            SystemTime::now(),
        )));
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("msk-iam-token".into())
            .spawn(move || refresh_loop(thread_shared, settings, first_tx))
            .map_err(|e| MskIamError::Start(e.to_string()))?;
        match first_rx.recv_timeout(FIRST_TOKEN_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                *shared.stopped.lock().expect("stop lock poisoned") = true;
                shared.wake.notify_all();
                return Err(e);
            }
            Err(_) => {
                return Err(MskIamError::Credentials(format!(
                    "no token within {} s",
                    FIRST_TOKEN_TIMEOUT.as_secs()
                )))
            }
        }
        Ok(Self {
            _stop: Arc::new(StopOnDrop(shared.clone())),
            shared,
        })
    }

    /// The current token for librdkafka; never waits on the network.
    pub fn oauth_token(&self) -> Result<OAuthToken, MskIamError> {
        let state = self.shared.state.lock().expect("token lock poisoned");
        let token = state.token(SystemTime::now())?;
        Ok(OAuthToken {
            token: token.token.expose().to_string(),
            principal_name: PRINCIPAL.to_string(),
            lifetime_ms: token.expires_at_ms(),
        })
    }

    /// `Err` with the reason while refreshing fails or no token is valid.
    pub fn health(&self) -> Result<(), String> {
        self.shared
            .state
            .lock()
            .expect("token lock poisoned")
            .health(SystemTime::now())
    }

    /// Hands the current token, and from now on every new one, to the
    /// client whose handle `client` is, until the registration is dropped.
    fn register(&self, client: ClientHandle) -> Registration {
        let mut clients = self.shared.clients.lock().expect("clients lock poisoned");
        let id = clients.next_id;
        clients.next_id += 1;
        let new = [(id, client)];
        self.shared.push(&new);
        clients.handles.extend(new);
        Registration {
            shared: self.shared.clone(),
            id,
        }
    }
}

/// While it lives, the refresher hands every new token to one client.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Once the lock is ours no token is being handed to this client,
        // and none will be.
        self.shared
            .clients
            .lock()
            .expect("clients lock poisoned")
            .handles
            .retain(|(id, _)| *id != self.id);
    }
}

/// A client type whose librdkafka handle tokens can be handed to.
///
/// # Safety
/// `native_handle` returns the client's own handle, which stays valid until
/// the client is dropped.
pub unsafe trait NativeHandle {
    fn native_handle(&self) -> *mut RDKafka;
}

// SAFETY: each client owns its handle (rdkafka's `NativeClient`) and
// destroys it only when dropped.
unsafe impl<C: rdkafka::consumer::ConsumerContext> NativeHandle
    for rdkafka::consumer::BaseConsumer<C>
{
    fn native_handle(&self) -> *mut RDKafka {
        rdkafka::consumer::Consumer::client(self).native_ptr()
    }
}

// SAFETY: as for `BaseConsumer`.
unsafe impl<C, P> NativeHandle for rdkafka::producer::ThreadedProducer<C, P>
where
    C: rdkafka::producer::ProducerContext<P> + 'static,
    P: rdkafka::producer::Partitioner + Send + Sync + 'static,
{
    fn native_handle(&self) -> *mut RDKafka {
        rdkafka::producer::Producer::client(self).native_ptr()
    }
}

// SAFETY: as for `BaseConsumer`.
unsafe impl<C, R> NativeHandle for rdkafka::producer::FutureProducer<C, R>
where
    C: rdkafka::ClientContext + 'static,
    R: rdkafka::util::AsyncRuntime,
{
    fn native_handle(&self) -> *mut RDKafka {
        rdkafka::producer::Producer::client(self).native_ptr()
    }
}

// SAFETY: as for `BaseConsumer`.
unsafe impl<C: rdkafka::ClientContext> NativeHandle for rdkafka::admin::AdminClient<C> {
    fn native_handle(&self) -> *mut RDKafka {
        self.inner().native_ptr()
    }
}

/// A client the MSK IAM refresher hands every new token to, so librdkafka
/// always holds a fresh one however late its main queue is polled. Made by
/// [`KafkaConfig::create_client`](crate::config::KafkaConfig::create_client);
/// derefs to the client. There is no `DerefMut` and no way to take the
/// client out: the registration must end before this very client goes.
pub struct WithTokens<T> {
    // Declared first, so dropped first: the refresher is done with the
    // handle before the client destroys it.
    _registration: Option<Registration>,
    client: T,
}

impl<T: NativeHandle> WithTokens<T> {
    /// Registers `client` with `tokens` (nothing to do without MSK IAM).
    pub(crate) fn new(tokens: Option<&MskIamTokens>, client: T) -> Self {
        let registration = tokens.map(|t| t.register(ClientHandle(client.native_handle())));
        Self {
            _registration: registration,
            client,
        }
    }
}

impl<T> std::ops::Deref for WithTokens<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.client
    }
}

fn refresh_loop(
    shared: Arc<Shared>,
    settings: MskIamSettings,
    first: std::sync::mpsc::Sender<Result<(), MskIamError>>,
) {
    let mut first = Some(first);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            if let Some(tx) = first.take() {
                let _ = tx.send(Err(MskIamError::Start(e.to_string())));
            }
            return;
        }
    };
    let provider = match runtime.block_on(credential_chain(&settings.region)) {
        Ok(p) => p,
        Err(e) => {
            if let Some(tx) = first.take() {
                let _ = tx.send(Err(e));
            }
            return;
        }
    };
    loop {
        let due = shared
            .state
            .lock()
            .expect("token lock poisoned")
            .refresh_due(SystemTime::now());
        if due {
            let result = runtime.block_on(async {
                tokio::time::timeout(ATTEMPT_TIMEOUT, fetch_and_sign(&provider, &settings))
                    .await
                    .unwrap_or_else(|_| {
                        Err(MskIamError::Credentials(format!(
                            "no credentials within {} s",
                            ATTEMPT_TIMEOUT.as_secs()
                        )))
                    })
            });
            let mut state = shared.state.lock().expect("token lock poisoned");
            match result {
                Ok(token) => {
                    let valid = token
                        .expires_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    if state.failures() > 0 {
                        tracing::info!(
                            after_failures = state.failures(),
                            "MSK IAM token refreshed again"
                        );
                    }
                    tracing::debug!(valid_s = valid.as_secs(), "MSK IAM token refreshed");
                    state.on_refreshed(token);
                    drop(state);
                    let clients = shared.clients.lock().expect("clients lock poisoned");
                    shared.push(&clients.handles);
                    drop(clients);
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
                Err(e) => {
                    let wait = state.on_failed(e.to_string(), SystemTime::now());
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    // Once per back-off step: each failure waits longer.
                    let left = match state.token(SystemTime::now()) {
                        Ok(t) => format!(
                            "the last good token expires in {} s",
                            t.expires_at
                                .duration_since(SystemTime::now())
                                .unwrap_or_default()
                                .as_secs()
                        ),
                        Err(_) => "no valid token is left".into(),
                    };
                    tracing::warn!(
                        attempt = state.failures(),
                        retry_in_s = wait.as_secs(),
                        "MSK IAM token refresh failed: {e}; {left}"
                    );
                }
            }
        }
        let next = shared
            .state
            .lock()
            .expect("token lock poisoned")
            .next_attempt();
        let wait = next
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            // Wall-clock jumps (suspend, NTP) are noticed within a minute.
            .min(Duration::from_secs(60));
        let stopped = shared.stopped.lock().expect("stop lock poisoned");
        let (stopped, _) = shared
            .wake
            .wait_timeout_while(stopped, wait, |s| !*s)
            .expect("stop lock poisoned");
        if *stopped {
            return;
        }
    }
}

/// The two items of `rdkafka::ClientContext` that hand token requests to an
/// [`OauthHook`] field: `impl ClientContext for C { delegate_oauth_token!(oauth); ... }`.
#[macro_export]
macro_rules! delegate_oauth_token {
    ($field:ident) => {
        const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

        fn generate_oauth_token(
            &self,
            _config: Option<&str>,
        ) -> Result<$crate::aws_iam::OAuthToken, Box<dyn std::error::Error>> {
            self.$field.generate()
        }
    };
}

/// What a client context hands librdkafka when it asks for an OAUTHBEARER
/// token: the shared token when MSK IAM is on, else an error that says so.
/// Every context sets `ENABLE_REFRESH_OAUTH_TOKEN` and delegates here.
#[derive(Clone, Debug, Default)]
pub struct OauthHook(Option<MskIamTokens>);

impl OauthHook {
    pub fn new(tokens: Option<MskIamTokens>) -> Self {
        Self(tokens)
    }

    /// For `ClientContext::generate_oauth_token`.
    pub fn generate(&self) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        match &self.0 {
            Some(tokens) => Ok(tokens.oauth_token()?),
            None => Err("OAUTHBEARER is only supported with --sasl-mechanism AWS_MSK_IAM".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(session: Option<&str>) -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            session.map(str::to_string),
            None,
            "test",
        )
    }

    fn decode(token: &MskIamToken) -> String {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.token.expose())
            .expect("a token is base64url without padding");
        String::from_utf8(bytes).expect("a token is a URL")
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn token_is_a_presigned_connect_url_for_the_region() {
        let t = sign_token(
            "eu-west-1",
            &creds(Some("session/token+=")),
            at(1_700_000_000) + Duration::from_millis(700),
            DEFAULT_TOKEN_LIFETIME,
        )
        .unwrap();
        let url = decode(&t);
        assert!(url.starts_with("https://kafka.eu-west-1.amazonaws.com/?Action=kafka-cluster%3AConnect&User-Agent=microbatch%2F"), "{url}");
        for part in [
            "X-Amz-Algorithm=AWS4-HMAC-SHA256",
            "X-Amz-Credential=AKIDEXAMPLE%2F20231114%2Feu-west-1%2Fkafka-cluster%2Faws4_request",
            "X-Amz-Date=20231114T221320Z",
            "X-Amz-Expires=900",
            "X-Amz-Security-Token=session%2Ftoken%2B%3D",
            "X-Amz-SignedHeaders=host",
            "X-Amz-Signature=",
        ] {
            assert!(url.contains(part), "{part} missing from {url}");
        }
        assert_eq!(t.signed_at, at(1_700_000_000));
        assert_eq!(t.expires_at, at(1_700_000_900));
        assert!(!t.token.expose().contains('='), "no padding");
        assert!(!format!("{t:?}").contains(t.token.expose()));
    }

    #[test]
    fn expiring_credentials_shorten_the_token() {
        let c = Credentials::new("AK", "SK", Some("ST".into()), Some(at(1_000_100)), "test");
        let t = sign_token("us-east-1", &c, at(1_000_000), DEFAULT_TOKEN_LIFETIME).unwrap();
        assert_eq!(t.expires_at, at(1_000_100));
    }

    #[test]
    fn a_different_secret_gives_a_different_signature() {
        let a = sign_token(
            "us-east-1",
            &creds(None),
            at(1_000_000),
            DEFAULT_TOKEN_LIFETIME,
        )
        .unwrap();
        let other = Credentials::new("AKIDEXAMPLE", "another", None, None, "test");
        let b = sign_token("us-east-1", &other, at(1_000_000), DEFAULT_TOKEN_LIFETIME).unwrap();
        assert_ne!(a.token, b.token);
    }

    fn token(signed: u64, lifetime: u64) -> MskIamToken {
        MskIamToken {
            token: Secret::new(format!("t{signed}")),
            signed_at: at(signed),
            expires_at: at(signed + lifetime),
        }
    }

    #[test]
    fn refresh_is_due_half_way_through_a_token() {
        let mut s = TokenState::new(RefreshPolicy::default(), at(0));
        assert!(s.refresh_due(at(0)));
        assert!(s.token(at(0)).is_err());
        s.on_refreshed(token(0, 900));
        assert_eq!(s.next_attempt(), at(450));
        assert!(!s.refresh_due(at(449)));
        assert!(s.refresh_due(at(450)));
        assert!(s.health(at(10)).is_ok());
    }

    #[test]
    fn failures_back_off_keep_the_last_token_and_show_in_health() {
        let mut s = TokenState::new(RefreshPolicy::default(), at(0));
        s.on_refreshed(token(0, 900));
        let waits: Vec<u64> = (0..7)
            .map(|i| s.on_failed("sts down".into(), at(450 + i)).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(s.token(at(500)).unwrap().token.expose(), "t0");
        let health = s.health(at(500)).unwrap_err();
        assert!(
            health.contains("sts down") && health.contains("expires in 400 s"),
            "{health}"
        );
        // Past its expiry the old token is refused, with the reason.
        let err = s.token(at(900)).unwrap_err().to_string();
        assert!(err.contains("expired") && err.contains("sts down"), "{err}");
        // A success clears it all.
        s.on_refreshed(token(901, 900));
        assert!(s.health(at(902)).is_ok());
        assert_eq!(s.failures(), 0);
    }

    #[test]
    fn first_failures_say_no_token_yet() {
        let mut s = TokenState::new(RefreshPolicy::default(), at(0));
        s.on_failed("no credentials in the chain".into(), at(0));
        let err = s.token(at(1)).unwrap_err().to_string();
        assert!(err.contains("no credentials in the chain"), "{err}");
    }

    /// Tokens that stay as made: no refresher thread, no credentials.
    fn fixed_tokens(token: MskIamToken) -> MskIamTokens {
        let mut state = TokenState::new(RefreshPolicy::default(), SystemTime::now());
        state.on_refreshed(token);
        let shared = Arc::new(Shared::new(state));
        MskIamTokens {
            _stop: Arc::new(StopOnDrop(shared.clone())),
            shared,
        }
    }

    fn valid_token() -> MskIamToken {
        let now = SystemTime::now();
        MskIamToken {
            token: Secret::new("aHR0cHM6Ly9rYWZrYS5leGFtcGxl"),
            signed_at: now,
            expires_at: now + Duration::from_secs(60),
        }
    }

    /// A consumer that never reaches a broker (nothing listens on port 1).
    fn consumer(
        mechanism: Option<&str>,
    ) -> rdkafka::consumer::BaseConsumer<crate::client::QuietContext> {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", "127.0.0.1:1");
        if let Some(mechanism) = mechanism {
            config
                .set("security.protocol", "sasl_plaintext")
                .set("sasl.mechanisms", mechanism);
        }
        config
            .create_with_context(crate::client::QuietContext::default())
            .expect("a client")
    }

    fn registered(tokens: &MskIamTokens) -> usize {
        tokens.shared.clients.lock().unwrap().handles.len()
    }

    #[test]
    fn registered_clients_take_each_new_token_until_dropped() {
        let tokens = fixed_tokens(valid_token());
        let first = WithTokens::new(Some(&tokens), consumer(Some("OAUTHBEARER")));
        let second = WithTokens::new(Some(&tokens), consumer(Some("OAUTHBEARER")));
        assert_eq!(registered(&tokens), 2);
        let refused = tokens
            .shared
            .push(&tokens.shared.clients.lock().unwrap().handles);
        assert_eq!(refused, 0, "librdkafka takes the token");
        drop(first);
        assert_eq!(registered(&tokens), 1);
        drop(second);
        assert_eq!(registered(&tokens), 0);
        // Without MSK IAM nothing is registered.
        assert!(WithTokens::new(None, consumer(None))
            ._registration
            .is_none());
    }

    #[test]
    fn a_client_that_refuses_tokens_is_counted() {
        let tokens = fixed_tokens(valid_token());
        let _plain = WithTokens::new(Some(&tokens), consumer(None));
        let refused = tokens
            .shared
            .push(&tokens.shared.clients.lock().unwrap().handles);
        assert_eq!(refused, 1);
    }

    #[test]
    fn set_token_errors_never_show_the_token() {
        let client = consumer(Some("OAUTHBEARER"));
        let handle = ClientHandle(rdkafka::consumer::Consumer::client(&client).native_ptr());
        let principal = CString::new(PRINCIPAL).unwrap();
        let later = millis_since_epoch(SystemTime::now() + Duration::from_secs(60));
        // librdkafka quotes a value it refuses.
        let bad = CString::new("aHR0cHM6Ly9rYWZrYS\x01secret-part").unwrap();
        let err = set_token(&handle, &bad, later, &principal).unwrap_err();
        assert!(err.contains("<token>"), "{err}");
        assert!(
            !err.contains("aHR0cHM6") && !err.contains("secret-part"),
            "{err}"
        );
        let good = CString::new("aHR0cHM6Ly9rYWZrYS5leGFtcGxl").unwrap();
        let err = set_token(&handle, &good, 1_000, &principal).unwrap_err();
        assert!(err.contains("unexpired"), "{err}");
        set_token(&handle, &good, later, &principal).unwrap();
    }

    #[test]
    fn without_token_cuts_where_the_token_starts() {
        let token = "aHR0cHM6Ly9rYWZrYS5leGFtcGxlLmNvbS8_QWN0aW9u";
        assert_eq!(
            without_token(&format!("bad value: {} (x)", &token[..30]), token),
            "bad value: <token>"
        );
        assert_eq!(without_token("no token here", token), "no token here");
        assert_eq!(without_token("text", ""), "text");
    }

    #[test]
    fn hook_without_tokens_refuses_with_a_reason() {
        let Err(err) = OauthHook::default().generate() else {
            panic!("a hook without tokens must refuse");
        };
        let err = err.to_string();
        assert!(err.contains("AWS_MSK_IAM"), "{err}");
    }
}
