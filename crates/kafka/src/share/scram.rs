//! The client side of SCRAM (RFC 5802, RFC 7677) over SHA-256 or SHA-512,
//! without I/O: the messages to send and the checks on the server's. The
//! crypto is ring's; only the message flow is written here (the `scram`
//! crate knows SHA-256 alone, and MSK's port 9096 speaks SHA-512).

use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::{digest, hmac, pbkdf2};
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScramHash {
    Sha256,
    Sha512,
}

impl ScramHash {
    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            Self::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            Self::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }
    fn hmac(self) -> hmac::Algorithm {
        match self {
            Self::Sha256 => hmac::HMAC_SHA256,
            Self::Sha512 => hmac::HMAC_SHA512,
        }
    }
    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Self::Sha256 => &digest::SHA256,
            Self::Sha512 => &digest::SHA512,
        }
    }
    fn len(self) -> usize {
        self.digest().output_len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ScramError {
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("the server's message is malformed: {0}")]
    Malformed(&'static str),
    #[error("the server's nonce does not extend ours")]
    Nonce,
    #[error("the server's iteration count {0} is outside 4096..=16384, Kafka's own bounds (too weak, or a stall)")]
    Iterations(u32),
    #[error("the server asks for a mandatory extension (m=) this client does not know")]
    MandatoryExtension,
    #[error("the server could not prove it knows the password")]
    ServerSignature,
}

/// Kafka's own bounds on a SCRAM credential's iterations: below is weak,
/// above a broker (or an impostor) could make each connection cost seconds
/// of CPU.
const MIN_ITERATIONS: u32 = 4096;
const MAX_ITERATIONS: u32 = 16384;

/// A SCRAM exchange in progress.
pub struct Scram {
    hash: ScramHash,
    password: String,
    client_nonce: String,
    client_first_bare: String,
    server_signature: Option<Vec<u8>>,
}

/// `=` and `,` are escaped in a SCRAM user name.
fn saslname(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

impl Scram {
    /// Starts an exchange; `nonce` is printable ASCII without a comma.
    pub fn new(hash: ScramHash, user: &str, password: &str, nonce: String) -> Self {
        Self {
            hash,
            password: password.to_string(),
            client_first_bare: format!("n={},r={nonce}", saslname(user)),
            client_nonce: nonce,
            server_signature: None,
        }
    }

    /// A random nonce for [`Scram::new`].
    pub fn random_nonce() -> String {
        let bytes: [u8; 24] = rand::random();
        B64.encode(bytes)
    }

    /// The first message: no channel binding, no authzid.
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Answers the server's first message with the client's proof.
    pub fn client_final(&mut self, server_first: &str) -> Result<String, ScramError> {
        if let Some(e) = server_first.strip_prefix("e=") {
            return Err(ScramError::Refused(e.to_string()));
        }
        // RFC 5802: a client that does not know a mandatory extension must
        // fail the exchange.
        if server_first.starts_with("m=") {
            return Err(ScramError::MandatoryExtension);
        }
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for part in server_first.split(',') {
            match part.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v),
                Some(("s=", v)) => salt = Some(v),
                Some(("i=", v)) => iterations = Some(v),
                _ => {}
            }
        }
        let nonce = nonce.ok_or(ScramError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() <= self.client_nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt = B64
            .decode(salt.ok_or(ScramError::Malformed("no salt"))?)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        let iterations: u32 = iterations
            .ok_or(ScramError::Malformed("no iteration count"))?
            .parse()
            .map_err(|_| ScramError::Malformed("iteration count is not a number"))?;
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(ScramError::Iterations(iterations));
        }

        let mut salted = vec![0u8; self.hash.len()];
        pbkdf2::derive(
            self.hash.pbkdf2(),
            NonZeroU32::new(iterations).expect("at least 4096"),
            &salt,
            self.password.as_bytes(),
            &mut salted,
        );
        let salted = hmac::Key::new(self.hash.hmac(), &salted);
        let client_key = hmac::sign(&salted, b"Client Key");
        let stored_key = digest::digest(self.hash.digest(), client_key.as_ref());
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = hmac::sign(
            &hmac::Key::new(self.hash.hmac(), stored_key.as_ref()),
            auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(client_signature.as_ref())
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac::sign(&salted, b"Server Key");
        self.server_signature = Some(
            hmac::sign(
                &hmac::Key::new(self.hash.hmac(), server_key.as_ref()),
                auth_message.as_bytes(),
            )
            .as_ref()
            .to_vec(),
        );
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server's last message: it proves the server knows the
    /// password, so a man in the middle cannot pose as the broker.
    pub fn verify_server_final(&self, server_final: &str) -> Result<(), ScramError> {
        if let Some(e) = server_final.strip_prefix("e=") {
            return Err(ScramError::Refused(e.to_string()));
        }
        let v = server_final
            .split(',')
            .find_map(|p| p.strip_prefix("v="))
            .ok_or(ScramError::Malformed("no server signature"))?;
        let got = B64
            .decode(v)
            .map_err(|_| ScramError::Malformed("server signature is not base64"))?;
        match &self.server_signature {
            Some(expected) if same_in_constant_time(expected, &got) => Ok(()),
            _ => Err(ScramError::ServerSignature),
        }
    }
}

/// Compares without stopping at the first difference.
fn same_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example exchange, byte for byte.
    #[test]
    fn rfc7677_sha256_exchange() {
        let mut s = Scram::new(
            ScramHash::Sha256,
            "user",
            "pencil",
            "rOprNGfwEbeRWgbNEkqO".into(),
        );
        assert_eq!(s.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        assert_eq!(
            s.client_final(server_first).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.verify_server_final("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert_eq!(
            s.verify_server_final("v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Err(ScramError::ServerSignature)
        );
    }

    #[test]
    fn a_server_that_does_not_extend_the_nonce_or_weakens_it_is_refused() {
        let mut s = Scram::new(ScramHash::Sha512, "u,=", "p", "abc".into());
        assert_eq!(s.client_first(), "n,,n=u=2C=3D,r=abc");
        assert_eq!(
            s.client_final("r=xyz,s=AAAA,i=4096"),
            Err(ScramError::Nonce)
        );
        assert_eq!(
            s.client_final("r=abc,s=AAAA,i=4096"),
            Err(ScramError::Nonce)
        );
        assert_eq!(
            s.client_final("r=abcd,s=AAAA,i=1"),
            Err(ScramError::Iterations(1))
        );
        assert_eq!(
            s.client_final("r=abcd,s=AAAA,i=4000000000"),
            Err(ScramError::Iterations(4_000_000_000))
        );
        assert_eq!(
            s.client_final("r=abcd,s=AAAA,i=16385"),
            Err(ScramError::Iterations(16_385))
        );
        assert_eq!(
            s.client_final("m=ext,r=abcd,s=AAAA,i=4096"),
            Err(ScramError::MandatoryExtension)
        );
        assert_eq!(
            s.client_final("e=invalid-proof"),
            Err(ScramError::Refused("invalid-proof".into()))
        );
        // No proof computed yet: any server signature is refused.
        assert_eq!(
            s.verify_server_final("v=AAAA"),
            Err(ScramError::ServerSignature)
        );
    }

    proptest::proptest! {
        /// Whatever the server sends, the client never panics.
        #[test]
        fn arbitrary_server_messages_never_panic(first in ".{0,200}", last in ".{0,200}") {
            let mut s = Scram::new(ScramHash::Sha512, "u", "p", "n".into());
            let _ = s.client_final(&first);
            let _ = s.verify_server_final(&last);
        }
    }
}
