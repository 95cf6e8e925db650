//! Differential test: our MSK IAM token against the one AWS's own Go signer
//! (`github.com/aws/aws-msk-iam-sasl-signer-go`, from the Go module proxy)
//! makes for the same credentials, region and signing time. They must be
//! identical apart from the `User-Agent` parameter.
//!
//! The Go signer reads the clock itself, so the signing time is taken from
//! its token's `X-Amz-Date` and ours is signed at that time.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use base64::Engine;
use microbatch_kafka::aws_iam::{sign_token, DEFAULT_TOKEN_LIFETIME};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Builds the Go program once per test run; `None` (outside CI) without Go.
fn go_signer() -> Option<PathBuf> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/msk-iam-go-signer");
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("msk-iam-go-signer");
        let status = Command::new("go")
            .args(["build", "-mod=readonly", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(&src)
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=readonly")
            .status();
        match status {
            Ok(s) if s.success() => Some(out),
            other => {
                assert!(
                    !in_ci(),
                    "CI=true but the Go signer did not build: {other:?}"
                );
                eprintln!("note: cannot build the Go signer ({other:?}); skipping");
                None
            }
        }
    })
    .clone()
}

/// Go's token and expiry (ms) for these inputs.
fn go_token(region: &str, access: &str, secret: &str, session: &str) -> (String, i64) {
    let bin = go_signer().expect("checked by the caller");
    let out = Command::new(bin)
        .args([region, access, secret, session])
        // The Go SDK must not look at this machine's AWS setup.
        .env_clear()
        .output()
        .expect("running the Go signer");
    assert!(
        out.status.success(),
        "Go signer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 output");
    let (token, expiry) = text.trim().split_once(' ').expect("token and expiry");
    (token.to_string(), expiry.parse().expect("expiry in ms"))
}

fn decode(token: &str) -> String {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .expect("base64url without padding");
    String::from_utf8(bytes).expect("a URL")
}

/// The URL without its `User-Agent` parameter (which names the signer).
fn without_user_agent(url: &str) -> String {
    let (base, query) = url.split_once('?').expect("a query");
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.starts_with("User-Agent="))
        .collect();
    format!("{base}?{}", kept.join("&"))
}

/// `X-Amz-Date` (`20231114T221320Z`) as a time.
fn amz_date(url: &str) -> SystemTime {
    let value = url
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("X-Amz-Date="))
        .expect("an X-Amz-Date");
    let n = |r: std::ops::Range<usize>| -> i64 { value[r].parse().expect("digits") };
    let (y, m, d) = (n(0..4), n(4..6), n(6..8));
    let (hh, mm, ss) = (n(9..11), n(11..13), n(13..15));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).expect("after 1970"))
}

fn compare(region: &str, access: &str, secret: &str, session: &str) {
    let (go, go_expiry_ms) = go_token(region, access, secret, session);
    let go_url = decode(&go);
    assert!(
        go_url.contains("User-Agent=aws-msk-iam-sasl-signer-go"),
        "{go_url}"
    );
    let signed_at = amz_date(&go_url);
    let credentials = Credentials::new(
        access,
        secret,
        (!session.is_empty()).then(|| session.to_string()),
        None,
        "test",
    );
    let ours = sign_token(region, &credentials, signed_at, DEFAULT_TOKEN_LIFETIME).unwrap();
    let our_url = decode(ours.token.expose());
    assert!(our_url.contains("User-Agent=microbatch%2F"), "{our_url}");
    assert_eq!(
        without_user_agent(&our_url),
        without_user_agent(&go_url),
        "our token differs from AWS's Go signer's"
    );
    assert_eq!(ours.expires_at_ms(), go_expiry_ms);
}

#[test]
fn token_matches_aws_go_signer_with_a_session_token() {
    if go_signer().is_none() {
        return;
    }
    compare(
        "eu-central-1",
        "ASIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQD+example/session~token==",
    );
}

#[test]
fn token_matches_aws_go_signer_with_long_term_keys() {
    if go_signer().is_none() {
        return;
    }
    compare(
        "us-east-1",
        "AKIAIOSFODNN7EXAMPLE",
        "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY",
        "",
    );
}
