//! Secrets: values that are never shown, and the librdkafka properties
//! whose values are secrets.

use std::fmt;

/// A secret string: its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is handed to the Kafka client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Whether a librdkafka property holds a secret, so its value is never
/// shown: passwords and passphrases, private keys given inline
/// (`ssl.key.pem`, `ssl_key`, `sasl.oauthbearer.assertion.private.key.*`),
/// client secrets and OAUTHBEARER configurations.
pub fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "passphrase",
        "secret",
        "sasl.oauthbearer.config",
        "private.key",
        "token",
    ]
    .iter()
    .any(|word| key.contains(word))
        || key == "ssl.key.pem"
        || key == "ssl_key"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_properties_are_recognised() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "SSL.KEY.PEM",
            "ssl_key",
            "ssl.key.passphrase",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.assertion.private.key.pem",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "sasl.oauthbearer.assertion.private.key.file",
        ] {
            assert!(is_secret_property(key), "{key}");
        }
        for key in [
            "bootstrap.servers",
            "ssl.ca.location",
            "client.id",
            "sasl.username",
        ] {
            assert!(!is_secret_property(key), "{key}");
        }
    }

    #[test]
    fn secret_is_never_formatted() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
    }
}
