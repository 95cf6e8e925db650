//! The schema registry's settings, shared by `run` and `produce`.

use std::path::{Path, PathBuf};

use microbatch_kafka::ConfigError;
use microbatch_schema::{Auth, Registry, RegistryConfig};
use serde::{Deserialize, Serialize};

/// Where the schema registry is.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct RegistryArgs {
    /// The schema registry's API (Confluent's, or Apicurio's
    /// http://HOST:PORT/apis/ccompat/v7). Credentials come from
    /// SCHEMA_REGISTRY_USER and SCHEMA_REGISTRY_PASSWORD (basic) or
    /// SCHEMA_REGISTRY_TOKEN (bearer), never from the URL. Redirects are
    /// not followed.
    #[arg(long, env = "SCHEMA_REGISTRY_URL", help_heading = "Schemas")]
    pub schema_registry_url: Option<String>,
    /// PEM certificates to trust for the schema registry, besides the
    /// system's.
    #[arg(
        long,
        env = "SCHEMA_REGISTRY_CA",
        value_name = "FILE",
        help_heading = "Schemas"
    )]
    pub schema_registry_ca: Option<PathBuf>,
}

/// The registry client, with credentials from the environment only.
pub fn registry_from_env(url: &str, ca: Option<&Path>) -> Result<Registry, ConfigError> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let auth = match (
        var("SCHEMA_REGISTRY_USER"),
        var("SCHEMA_REGISTRY_PASSWORD"),
        var("SCHEMA_REGISTRY_TOKEN"),
    ) {
        (Some(_), _, Some(_)) => {
            return Err(ConfigError::new(
                "SCHEMA_REGISTRY_TOKEN",
                "set it or SCHEMA_REGISTRY_USER, not both",
            ))
        }
        (Some(user), password, None) => Some(Auth::Basic {
            user,
            password: password.unwrap_or_default(),
        }),
        (None, Some(_), _) => {
            return Err(ConfigError::new(
                "SCHEMA_REGISTRY_PASSWORD",
                "set without SCHEMA_REGISTRY_USER",
            ))
        }
        (None, None, token) => token.map(Auth::Bearer),
    };
    let ca_pem = match ca {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            ConfigError::new(
                "--schema-registry-ca",
                format!("cannot read {}: {e}", path.display()),
            )
        })?),
        None => None,
    };
    let config = RegistryConfig {
        url: url.to_string(),
        auth,
        ca_pem,
        timeout: microbatch_schema::registry::DEFAULT_TIMEOUT,
    };
    Registry::new(&config).map_err(|e| {
        let why = e.to_string();
        let flag = if why.starts_with("--schema-registry-ca") {
            "--schema-registry-ca"
        } else {
            "--schema-registry-url"
        };
        ConfigError::new(flag, why.trim_start_matches(flag).trim_start_matches(": "))
    })
}
