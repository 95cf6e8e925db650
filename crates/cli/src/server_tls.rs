//! The scaler's gRPC TLS: a rustls server configuration built from PEM
//! files, and built again when they change.
//!
//! Certificates are rotated under a running scaler (cert-manager renews a
//! Secret, and Kubernetes swaps the files of its volume in place), so the
//! files are read every [`RELOAD_CHECK`] and compared with those in force.
//! A rotation that does not make a configuration (a key that does not
//! match its certificate, a file caught half-written, a client CA with a
//! key in it) keeps the last good one and is logged; the next check tries
//! again. Each connection's handshake runs apart from the others, bounded
//! by [`HANDSHAKE_TIMEOUT`] and [`MAX_HANDSHAKES`], so silent clients hold
//! up nobody; when the server shuts down, the port closes at once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How often the files are read for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(10);

/// A handshake never finished must not hold a connection for ever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes under way at once; a connection past it is closed (KEDA's
/// operator holds a few).
pub const MAX_HANDSHAKES: usize = 1024;

/// More client CAs than this is likely a trust store, not a CA of one's own.
const CLIENT_CA_BUNDLE_WARNING: usize = 10;

/// The files a TLS configuration is made of.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, only clients with a certificate it signed are served.
    pub client_ca: Option<PathBuf>,
}

/// What is wrong with the files, naming the flag each came from.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        why: String,
    },
}

impl TlsError {
    /// The flag whose file is at fault.
    pub fn flag(&self) -> &'static str {
        match self {
            Self::Read { flag, .. } | Self::Invalid { flag, .. } => flag,
        }
    }
}

fn invalid(flag: &'static str, path: &Path, why: impl ToString) -> TlsError {
    TlsError::Invalid {
        flag,
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// The files' bytes: what a configuration is built from, and what a
/// check compares (a rotation can keep a file's size and time).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

fn read(files: &TlsFiles) -> Result<Contents, TlsError> {
    let one = |flag: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            flag,
            path: path.to_path_buf(),
            source,
        })
    };
    Ok(Contents {
        cert: one("--tls-cert", &files.cert)?,
        key: one("--tls-key", &files.key)?,
        client_ca: files
            .client_ca
            .as_deref()
            .map(|ca| one("--tls-client-ca", ca))
            .transpose()?,
    })
}

/// How many PEM certificates a client-CA file holds; a file with none (or a
/// private key in it) is refused.
fn client_ca_certificates(pem: &[u8]) -> Result<usize, &'static str> {
    let text = std::str::from_utf8(pem).map_err(|_| "not PEM text")?;
    if text.contains("PRIVATE KEY-----") {
        return Err("holds a private key: give only the CA's certificate");
    }
    match text.matches("-----BEGIN CERTIFICATE-----").count() {
        0 => Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
        n => Ok(n),
    }
}

/// The server configuration the files make: HTTP/2 only (gRPC), and
/// client certificates required when there is a client CA.
fn server_config(files: &TlsFiles, contents: &Contents) -> Result<ServerConfig, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&contents.cert)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            invalid(
                "--tls-cert",
                &files.cert,
                format!("not PEM certificates: {e}"),
            )
        })?;
    if chain.is_empty() {
        return Err(invalid(
            "--tls-cert",
            &files.cert,
            "holds no PEM certificate",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&contents.key)
        .map_err(|e| invalid("--tls-key", &files.key, format!("no PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("--tls-cert", &files.cert, e))?;
    let builder = match (&files.client_ca, &contents.client_ca) {
        (Some(ca), Some(pem)) => {
            let certificates =
                client_ca_certificates(pem).map_err(|why| invalid("--tls-client-ca", ca, why))?;
            if certificates > CLIENT_CA_BUNDLE_WARNING {
                tracing::warn!(
                    certificates,
                    "--tls-client-ca holds {certificates} certificates: a client with a certificate \
                     from any of them is let in (a system trust store admits anyone with a public \
                     certificate); give the one CA that signs KEDA's client certificate"
                );
            }
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| invalid("--tls-client-ca", ca, e))?;
                roots
                    .add(cert)
                    .map_err(|e| invalid("--tls-client-ca", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid("--tls-client-ca", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        invalid(
            "--tls-key",
            &files.key,
            format!("does not fit --tls-cert: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The TLS configuration in force, replaced when its files change.
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<(Arc<ServerConfig>, Contents)>,
}

/// What a check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Reloaded,
    /// The files changed but do not make a configuration: the last good
    /// one stays.
    Kept(String),
}

impl ReloadingTls {
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let contents = read(&files)?;
        let config = Arc::new(server_config(&files, &contents)?);
        Ok(Self {
            files,
            current: RwLock::new((config, contents)),
        })
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().expect("not poisoned").0.clone()
    }

    /// Builds the configuration again if a file's bytes changed since the
    /// one in force was built. Blocking (file reads).
    pub fn check(&self) -> Reload {
        let contents = match read(&self.files) {
            Ok(c) => c,
            Err(e) => return Reload::Kept(format!("{e} ({})", e.flag())),
        };
        if self.current.read().expect("not poisoned").1 == contents {
            return Reload::Unchanged;
        }
        match server_config(&self.files, &contents) {
            Ok(config) => {
                *self.current.write().expect("not poisoned") = (Arc::new(config), contents);
                Reload::Reloaded
            }
            // The next check tries again: a file caught half-written is
            // whole by then.
            Err(e) => Reload::Kept(format!("{e} ({})", e.flag())),
        }
    }

    /// Checks the files every [`RELOAD_CHECK`], for ever; the reads run
    /// off the runtime's threads (a hung volume holds up only the check).
    pub async fn watch(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(RELOAD_CHECK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        let mut kept_said: Option<String> = None;
        loop {
            ticks.tick().await;
            let this = self.clone();
            let Ok(found) = tokio::task::spawn_blocking(move || this.check()).await else {
                continue;
            };
            match found {
                Reload::Unchanged => kept_said = None,
                Reload::Reloaded => {
                    kept_said = None;
                    tracing::info!(
                        cert = %self.files.cert.display(),
                        "TLS certificate files changed: new connections use them"
                    );
                }
                // Once per distinct problem, not every check.
                Reload::Kept(why) => {
                    if kept_said.as_ref() != Some(&why) {
                        tracing::warn!(
                            problem = %why,
                            "TLS certificate files changed but cannot be used; serving the last \
                             good ones"
                        );
                        kept_said = Some(why);
                    }
                }
            }
        }
    }

    /// TLS connections accepted on `listener`, each handshake with the
    /// configuration in force when it began, apart from the others. When
    /// the stream is dropped (the server shuts down), the listener closes
    /// and handshakes under way are cancelled.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut handshakes = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
                    accepted = listener.accept() => {
                        let (tcp, peer) = match accepted {
                            Ok(accepted) => accepted,
                            Err(e) => {
                                // Out of file descriptors and the like: pause.
                                tracing::warn!(error = %e, "accepting a gRPC connection");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        };
                        if handshakes.len() >= MAX_HANDSHAKES {
                            tracing::debug!(%peer, "too many TLS handshakes under way: closed");
                            continue;
                        }
                        let acceptor = TlsAcceptor::from(self.config());
                        let tx = tx.clone();
                        handshakes.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                Ok(Ok(tls)) => {
                                    let _ = tx.send(Ok(tls)).await;
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake refused")
                                }
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found in review: any file was taken as the client CA.
    #[test]
    fn a_client_ca_file_must_hold_certificates_and_no_key() {
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(client_ca_certificates(cert.as_bytes()), Ok(1));
        assert_eq!(client_ca_certificates(cert.repeat(3).as_bytes()), Ok(3));
        assert!(client_ca_certificates(b"").is_err());
        assert!(client_ca_certificates(b"not a certificate").is_err());
        assert!(client_ca_certificates(&[0xff, 0xfe]).is_err());
        let with_key =
            format!("{cert}-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        assert!(client_ca_certificates(with_key.as_bytes()).is_err());
    }

    /// Each file's fault names its flag, so the scaler exits 2 naming it
    /// (at start) or logs it (at a rotation).
    #[test]
    fn faults_name_the_flag_of_their_file() {
        let dir = std::env::temp_dir().join(format!("server-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let missing = dir.join("missing.pem");
        let flag = |cert: &Path, key: &Path| {
            let files = TlsFiles {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                client_ca: None,
            };
            ReloadingTls::new(files).map(|_| ()).unwrap_err().flag()
        };
        assert_eq!(flag(&missing, &garbage), "--tls-cert");
        assert_eq!(flag(&garbage, &missing), "--tls-key");
        assert_eq!(flag(&garbage, &garbage), "--tls-cert");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
