//! How the share consumer reaches brokers under the project's security
//! settings ([`KafkaConfig`]): TCP or TLS (the CA file, or the system's
//! roots), then SASL PLAIN, SCRAM-SHA-256/512 or AWS_MSK_IAM (OAUTHBEARER
//! with the token the MSK IAM refresher keeps fresh).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kafka_protocol::messages::{
    SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};

use super::cluster::{Connector, PlainTcp};
use super::scram::{Scram, ScramHash};
use super::wire::{Connection, Stream};
use super::ShareError;
use crate::aws_iam::MskIamTokens;
use crate::config::SaslMechanism;
use crate::KafkaConfig;

/// Where OAUTHBEARER tokens for AWS_MSK_IAM come from: the current token,
/// or why there is none.
pub type TokenSource = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// The connector `config` asks for. MSK IAM needs the refresher's tokens
/// (`config.msk_iam`), started by the caller as for librdkafka clients.
pub fn connector(config: &KafkaConfig) -> Result<Arc<dyn Connector>, ShareError> {
    let tokens = config
        .msk_iam
        .clone()
        .map(|tokens: MskIamTokens| -> TokenSource {
            Arc::new(move || {
                tokens
                    .oauth_token()
                    .map(|t| t.token)
                    .map_err(|e| e.to_string())
            })
        });
    connector_with_tokens(config, tokens)
}

/// [`connector`] with MSK IAM tokens from `tokens` instead of the refresher.
pub fn connector_with_tokens(
    config: &KafkaConfig,
    tokens: Option<TokenSource>,
) -> Result<Arc<dyn Connector>, ShareError> {
    // librdkafka would take these; this client has its own flags for them,
    // and silently connecting another way than the rest of the worker is
    // worse than refusing.
    if let Some((key, _)) = config.properties.iter().find(|(k, _)| {
        let k = k.to_ascii_lowercase();
        k.starts_with("ssl.") || k.starts_with("sasl.") || k == "security.protocol"
    }) {
        return Err(ShareError::Config(format!(
            "--kafka-property {key}: the share-group client takes TLS and SASL settings \
             only from their own flags (--security-protocol, --sasl-mechanism, \
             --ssl-ca-location, ...)"
        )));
    }
    let tls = if config.security_protocol.uses_tls() {
        Some(Arc::new(tls_config(config)?))
    } else {
        None
    };
    let sasl = if config.security_protocol.uses_sasl() {
        let mechanism = config
            .effective_mechanism()
            .ok_or_else(|| ShareError::Config("SASL needs --sasl-mechanism".into()))?;
        Some(match mechanism {
            SaslMechanism::AwsMskIam => Sasl::MskIam(tokens.ok_or_else(|| {
                ShareError::Config("AWS_MSK_IAM needs the token refresher started".into())
            })?),
            other => {
                let user = config.username.clone().unwrap_or_default();
                let password = config
                    .password
                    .as_ref()
                    .map(|p| p.expose().to_string())
                    .unwrap_or_default();
                match other {
                    SaslMechanism::Plain => Sasl::Plain { user, password },
                    SaslMechanism::ScramSha256 => Sasl::Scram {
                        hash: ScramHash::Sha256,
                        user,
                        password,
                    },
                    _ => Sasl::Scram {
                        hash: ScramHash::Sha512,
                        user,
                        password,
                    },
                }
            }
        })
    } else {
        None
    };
    Ok(Arc::new(Secured { tls, sasl }))
}

fn tls_config(config: &KafkaConfig) -> Result<rustls::ClientConfig, ShareError> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.ssl_ca_location {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| {
                    ShareError::Config(format!("--ssl-ca-location {}: {e}", path.display()))
                })?;
            if certs.is_empty() {
                return Err(ShareError::Config(format!(
                    "--ssl-ca-location {}: no certificate in it",
                    path.display()
                )));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    ShareError::Config(format!("--ssl-ca-location {}: {e}", path.display()))
                })?;
            }
        }
        None => {
            // As librdkafka does: the system's trust store (MSK's
            // certificates chain to public roots).
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(ShareError::Config(
                    "no CA certificates in the system trust store; set --ssl-ca-location".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ShareError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

enum Sasl {
    Plain {
        user: String,
        password: String,
    },
    Scram {
        hash: ScramHash,
        user: String,
        password: String,
    },
    MskIam(TokenSource),
}

impl Sasl {
    fn mechanism(&self) -> &'static str {
        match self {
            Self::Plain { .. } => "PLAIN",
            Self::Scram {
                hash: ScramHash::Sha256,
                ..
            } => "SCRAM-SHA-256",
            Self::Scram {
                hash: ScramHash::Sha512,
                ..
            } => "SCRAM-SHA-512",
            Self::MskIam(_) => "OAUTHBEARER",
        }
    }
}

/// A failed TLS handshake, said with the fix when the brokers' certificate
/// was what failed.
fn tls_failure(addr: &str, e: &std::io::Error) -> ShareError {
    let certificate = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|inner| matches!(inner, rustls::Error::InvalidCertificate(_)));
    if certificate {
        ShareError::Certificate {
            broker: addr.to_string(),
            reason: format!(
                "TLS: {e} (--ssl-ca-location must hold the CA that signed the brokers' certificates, \
                 and the names in --bootstrap-servers must be the certificates' names)"
            ),
        }
    } else {
        ShareError::Io {
            broker: addr.to_string(),
            reason: format!("TLS: {e}"),
        }
    }
}

struct Secured {
    tls: Option<Arc<rustls::ClientConfig>>,
    sasl: Option<Sasl>,
}

#[async_trait]
impl Connector for Secured {
    async fn connect(&self, addr: &str) -> Result<Box<dyn Stream>, ShareError> {
        let tcp = PlainTcp.connect_tcp(addr).await?;
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| ShareError::Config(format!("broker address {addr}: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| tls_failure(addr, &e))?;
        Ok(Box::new(stream))
    }

    async fn authenticate(&self, conn: &Connection) -> Result<Option<Duration>, ShareError> {
        let Some(sasl) = &self.sasl else {
            return Ok(None);
        };
        let handshake: SaslHandshakeResponse = conn
            .call_authenticating(
                SaslHandshakeRequest::default()
                    .with_mechanism(StrBytes::from_static_str(sasl.mechanism())),
            )
            .await?;
        if handshake.error_code != 0 {
            let offered: Vec<String> = handshake.mechanisms.iter().map(|m| m.to_string()).collect();
            return Err(ShareError::broker(
                "SaslHandshake",
                handshake.error_code,
                Some(format!("{} not among {offered:?}", sasl.mechanism())),
            ));
        }
        let lifetime = match sasl {
            Sasl::Plain { user, password } => {
                step(conn, format!("\0{user}\0{password}").into_bytes())
                    .await?
                    .1
            }
            Sasl::MskIam(tokens) => {
                let token =
                    tokens().map_err(|e| ShareError::Auth(format!("no MSK IAM token: {e}")))?;
                let (challenge, lifetime) = step(
                    conn,
                    format!("n,,\x01auth=Bearer {token}\x01\x01").into_bytes(),
                )
                .await?;
                // RFC 7628: a refused token comes back as an error challenge
                // with no error code; the client answers %x01 and the server
                // then fails the exchange. Never a success.
                if !challenge.is_empty() {
                    let detail = String::from_utf8_lossy(&challenge).into_owned();
                    let _ = step(conn, vec![0x01]).await;
                    return Err(ShareError::Auth(format!(
                        "the broker refused the MSK IAM token: {detail}"
                    )));
                }
                lifetime
            }
            Sasl::Scram {
                hash,
                user,
                password,
            } => {
                let mut scram = Scram::new(*hash, user, password, Scram::random_nonce());
                let (server_first, _) = step(conn, scram.client_first().into_bytes()).await?;
                let server_first = String::from_utf8_lossy(&server_first).into_owned();
                let client_final = scram.client_final(&server_first).map_err(scram_error)?;
                let (server_final, lifetime) = step(conn, client_final.into_bytes()).await?;
                scram
                    .verify_server_final(&String::from_utf8_lossy(&server_final))
                    .map_err(scram_error)?;
                lifetime
            }
        };
        Ok(lifetime)
    }
}

fn scram_error(e: super::scram::ScramError) -> ShareError {
    ShareError::Auth(format!("SCRAM: {e}"))
}

/// One SaslAuthenticate round: the server's bytes, and how long the
/// session may live before it must authenticate again (KIP-368).
async fn step(conn: &Connection, bytes: Vec<u8>) -> Result<(Bytes, Option<Duration>), ShareError> {
    let response: SaslAuthenticateResponse = conn
        .call_authenticating(SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(bytes)))
        .await?;
    if response.error_code != 0 {
        return Err(ShareError::Auth(format!(
            "{}{}",
            kafka_protocol::ResponseError::try_from_code(response.error_code)
                .map(|e| e.to_string())
                .unwrap_or_default(),
            response
                .error_message
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        )));
    }
    let lifetime = (response.session_lifetime_ms > 0)
        .then(|| Duration::from_millis(response.session_lifetime_ms as u64));
    Ok((response.auth_bytes, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS or SASL setting given as a librdkafka property would reach the
    /// dead-letter producer but not this client: refused, naming the flag
    /// and the key, never quoting its value.
    #[test]
    fn tls_and_sasl_properties_are_refused_naming_the_key() {
        for key in ["ssl.key.location", "SASL.jaas.config", "security.protocol"] {
            let mut config = KafkaConfig::plaintext("127.0.0.1:9092");
            config
                .properties
                .push((key.to_string(), "s3cr3t-value".to_string()));
            let err = connector(&config).err().expect("refused").to_string();
            assert!(
                err.contains("--kafka-property") && err.contains(key),
                "{err}"
            );
            assert!(!err.contains("s3cr3t-value"), "{err}");
        }
        let mut config = KafkaConfig::plaintext("127.0.0.1:9092");
        config
            .properties
            .push(("fetch.max.bytes".to_string(), "1".to_string()));
        assert!(
            connector(&config).is_ok(),
            "other properties are not TLS or SASL"
        );
    }
}
