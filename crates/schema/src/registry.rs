//! A client of the Confluent schema-registry API (Confluent's registry,
//! Apicurio's `/apis/ccompat/v7`, Karapace, AWS-compatible proxies): the
//! few reads a decoder needs, each answer classified.
//!
//! **What an answer means** ([`RegistryError`]). A schema the registry
//! says it does not have (404 with error code 40403, 40401 or 40402):
//! [`RegistryError::NotFound`]. No answer, a timeout, 408, 429 or 5xx: an
//! outage, [`RegistryError::Unavailable`]. 401 and 403: the credentials,
//! [`RegistryError::Refused`]. A redirect, a 404 without a registry's
//! error code, a body that is not the API's JSON or one too large: not a
//! registry's answer, [`RegistryError::Unexpected`]. Another 4xx with a
//! registry's answer: [`RegistryError::Rejected`]. What each means for a
//! record is the decoder's decision; at start, all but an outage stop the
//! worker.

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use thiserror::Error;

use crate::wire::SchemaId;

/// The longest answer read from the registry: a schema larger than this
/// is not one a record was written with.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

/// How long one request may take before it counts as an outage.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the worker proves who it is to the registry.
#[derive(Clone)]
pub enum Auth {
    Basic { user: String, password: String },
    Bearer(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Basic { user, .. } => write!(f, "Basic({user}, ***)"),
            Auth::Bearer(_) => f.write_str("Bearer(***)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The API's base URL, e.g. `http://registry:8080/apis/ccompat/v7`.
    pub url: String,
    pub auth: Option<Auth>,
    /// PEM certificates to trust besides the system's.
    pub ca_pem: Option<Vec<u8>>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegistryError {
    /// The registry does not know the schema.
    #[error("the schema registry has no schema {0}")]
    NotFound(String),
    /// No answer now: an outage, to be retried.
    #[error("the schema registry is unavailable: {0}")]
    Unavailable(String),
    /// 401 or 403: the credentials.
    #[error("{0}")]
    Refused(String),
    /// Not a schema registry's answer (a redirect, a 404 without a
    /// registry error code, a body that is not the API's JSON).
    #[error("{0}")]
    Unexpected(String),
    /// Another 4xx, in a registry's words.
    #[error("{0}")]
    Rejected(String),
    /// The client's own settings (URL, CA file).
    #[error("{0}")]
    Misconfigured(String),
}

/// A schema as the registry stores it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct RegisteredSchema {
    pub schema: String,
    /// AVRO (also when absent), PROTOBUF or JSON.
    #[serde(rename = "schemaType", default)]
    pub schema_type: Option<String>,
    #[serde(default)]
    pub references: Vec<Reference>,
}

impl RegisteredSchema {
    pub fn kind(&self) -> &str {
        self.schema_type.as_deref().unwrap_or("AVRO")
    }
}

/// Another schema this one imports, by the name it imports it under.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Reference {
    pub name: String,
    pub subject: String,
    pub version: i64,
}

/// Where a schema is registered.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct SubjectVersion {
    pub subject: String,
    pub version: i64,
}

#[derive(Deserialize)]
struct ErrorBody {
    error_code: i64,
}

pub struct Registry {
    http: reqwest::Client,
    base: String,
    auth: Option<Auth>,
}

impl Registry {
    pub fn new(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let url = reqwest::Url::parse(&config.url).map_err(|e| {
            RegistryError::Misconfigured(format!("--schema-registry-url: not a URL ({e})"))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(RegistryError::Misconfigured(format!(
                "--schema-registry-url: scheme {} (http or https)",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(RegistryError::Misconfigured(
                "--schema-registry-url: put credentials in SCHEMA_REGISTRY_USER and \
                 SCHEMA_REGISTRY_PASSWORD (or SCHEMA_REGISTRY_TOKEN), not in the URL"
                    .into(),
            ));
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .connect_timeout(config.timeout);
        if let Some(pem) = &config.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| RegistryError::Misconfigured(format!("--schema-registry-ca: {e}")))?;
            if certs.is_empty() {
                return Err(RegistryError::Misconfigured(
                    "--schema-registry-ca: no PEM certificate in the file".into(),
                ));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| RegistryError::Misconfigured(format!("schema registry client: {e}")))?;
        Ok(Self {
            http,
            base: config.url.trim_end_matches('/').to_string(),
            auth: config.auth.clone(),
        })
    }

    /// The URL with nothing secret in it, for logs.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Checks that the URL is a registry's API and the credentials are
    /// accepted (`GET /schemas/types`).
    pub async fn check(&self) -> Result<(), RegistryError> {
        self.get::<Vec<String>>("/schemas/types").await.map(|_| ())
    }

    /// The schema with this id (or GUID).
    pub async fn schema(&self, id: &SchemaId) -> Result<RegisteredSchema, RegistryError> {
        match id {
            SchemaId::Id(id) => self.get(&format!("/schemas/ids/{id}")).await,
            SchemaId::Guid(guid) => self.get(&format!("/schemas/guids/{}", encode(guid))).await,
        }
    }

    /// Where the schema with this id is registered: one of `preferred`
    /// subjects if it is under one, else the first the registry names (the
    /// same schema text registered under several subjects has one id).
    pub async fn subject_version(
        &self,
        id: &SchemaId,
        preferred: &[String],
    ) -> Result<Option<SubjectVersion>, RegistryError> {
        let SchemaId::Id(id) = id else {
            return Ok(None);
        };
        let found: Vec<SubjectVersion> = self.get(&format!("/schemas/ids/{id}/versions")).await?;
        let chosen = found
            .iter()
            .position(|sv| preferred.contains(&sv.subject))
            .unwrap_or(0);
        Ok(found.into_iter().nth(chosen))
    }

    /// Whether `subject` has a schema registered.
    pub async fn has_subject(&self, subject: &str) -> Result<bool, RegistryError> {
        let path = format!("/subjects/{}/versions/latest", encode(subject));
        match self.get::<serde_json::Value>(&path).await {
            Ok(_) => Ok(true),
            Err(RegistryError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A referenced schema.
    pub async fn version(&self, reference: &Reference) -> Result<RegisteredSchema, RegistryError> {
        self.get(&format!(
            "/subjects/{}/versions/{}",
            encode(&reference.subject),
            reference.version
        ))
        .await
    }

    /// Registers a schema under `subject` (or finds it registered): its id.
    /// `schema_type` is AVRO, PROTOBUF or JSON.
    pub async fn register(
        &self,
        subject: &str,
        schema_type: &str,
        schema: &str,
    ) -> Result<u32, RegistryError> {
        #[derive(Deserialize)]
        struct Registered {
            id: u32,
        }
        let mut body = serde_json::json!({ "schema": schema });
        if schema_type != "AVRO" {
            body["schemaType"] = schema_type.into();
        }
        let path = format!("/subjects/{}/versions", encode(subject));
        let registered: Registered = self.request(&path, Some(body)).await?;
        Ok(registered.id)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, RegistryError> {
        self.request(path, None).await
    }

    /// GET `path`, or POST `body` to it.
    async fn request<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, RegistryError> {
        let url = format!("{}{path}", self.base);
        let mut request = match body {
            None => self.http.get(url),
            Some(body) => self
                .http
                .post(url)
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(body.to_string()),
        }
        .header(
            "accept",
            "application/vnd.schemaregistry.v1+json, application/json",
        );
        request = match &self.auth {
            Some(Auth::Basic { user, password }) => request.basic_auth(user, Some(password)),
            Some(Auth::Bearer(token)) => request.bearer_auth(token),
            None => request,
        };
        let mut response = request
            .send()
            .await
            .map_err(|e| RegistryError::Unavailable(without_url(&e)))?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| RegistryError::Unavailable(without_url(&e)))?
        {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(RegistryError::Unexpected(format!(
                    "the schema registry's answer to {path} is over {MAX_ANSWER_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        classify(path, status.as_u16(), &body)
    }
}

fn encode(segment: &str) -> String {
    utf8_percent_encode(segment, NON_ALPHANUMERIC).to_string()
}

/// reqwest's errors name the URL; ours is logged once at start instead.
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut cause = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(c) = cause {
        detail = c.to_string();
        cause = c.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

/// What an answer means (see the module's rules).
pub fn classify<T: DeserializeOwned>(
    path: &str,
    status: u16,
    body: &[u8],
) -> Result<T, RegistryError> {
    match status {
        200 => serde_json::from_slice(body).map_err(|e| {
            RegistryError::Unexpected(format!(
                "the answer to {path} is not the schema-registry API's JSON ({e}): \
                 is --schema-registry-url the API's base URL?"
            ))
        }),
        404 => match serde_json::from_slice::<ErrorBody>(body) {
            Ok(ErrorBody {
                error_code: 40401..=40403,
            }) => Err(RegistryError::NotFound(
                path.rsplit_once("/schemas/").map_or_else(
                    || path.to_string(),
                    |(_, id)| {
                        id.trim_start_matches("ids/")
                            .trim_start_matches("guids/")
                            .to_string()
                    },
                ),
            )),
            _ => Err(RegistryError::Unexpected(format!(
                "{path} answered 404 without a registry error code: is \
                 --schema-registry-url the API's base URL (for Apicurio \
                 http://HOST:PORT/apis/ccompat/v7)?"
            ))),
        },
        401 | 403 => Err(RegistryError::Refused(format!(
            "the schema registry refused the credentials ({status} on {path}): set \
             SCHEMA_REGISTRY_USER and SCHEMA_REGISTRY_PASSWORD, or SCHEMA_REGISTRY_TOKEN"
        ))),
        300..=399 => Err(RegistryError::Unexpected(format!(
            "{path} answered {status} (a redirect, not followed): give the registry's \
             final URL as --schema-registry-url"
        ))),
        408 | 429 | 500..=599 => Err(RegistryError::Unavailable(format!(
            "{path} answered {status}"
        ))),
        _ => Err(RegistryError::Rejected(format!(
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(status: u16, body: &str) -> Result<RegisteredSchema, RegistryError> {
        classify("/schemas/ids/7", status, body.as_bytes())
    }

    #[test]
    fn each_answer_is_the_records_fault_an_outage_or_a_configuration_error() {
        let ok = schema(200, r#"{"schema":"\"string\""}"#).unwrap();
        assert_eq!(ok.kind(), "AVRO");
        let proto = schema(
            200,
            r#"{"schema":"x","schemaType":"PROTOBUF","references":[{"name":"a.proto","subject":"a","version":2}]}"#,
        )
        .unwrap();
        assert_eq!(proto.kind(), "PROTOBUF");
        assert_eq!(proto.references[0].version, 2);
        assert_eq!(
            schema(404, r#"{"error_code":40403,"message":"Schema not found"}"#),
            Err(RegistryError::NotFound("7".into()))
        );
        for status in [401, 403] {
            assert!(matches!(schema(status, ""), Err(RegistryError::Refused(_))));
        }
        for status in [404, 302] {
            assert!(
                matches!(schema(status, "<html>"), Err(RegistryError::Unexpected(_))),
                "{status}"
            );
        }
        assert!(matches!(
            schema(422, r#"{"error_code":42201}"#),
            Err(RegistryError::Rejected(_))
        ));
        for status in [408, 429, 500, 502, 503] {
            assert!(
                matches!(schema(status, ""), Err(RegistryError::Unavailable(_))),
                "{status}"
            );
        }
        assert!(matches!(
            schema(200, "<html>login</html>"),
            Err(RegistryError::Unexpected(_))
        ));
    }

    #[test]
    fn credentials_never_go_in_the_url_or_the_logs() {
        let config = |url: &str| RegistryConfig {
            url: url.into(),
            auth: Some(Auth::Basic {
                user: "u".into(),
                password: "secret".into(),
            }),
            ca_pem: None,
            timeout: DEFAULT_TIMEOUT,
        };
        assert!(Registry::new(&config("http://u:p@localhost:8081")).is_err());
        assert!(Registry::new(&config("ftp://localhost")).is_err());
        assert!(Registry::new(&config("localhost:8081")).is_err());
        let ok = config("http://127.0.0.1:8081/apis/ccompat/v7/");
        assert!(!format!("{ok:?}").contains("secret"));
        assert_eq!(
            Registry::new(&ok).unwrap().url(),
            "http://127.0.0.1:8081/apis/ccompat/v7"
        );
    }
}
