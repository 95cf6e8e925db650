//! `http`: POST each batch as JSON to a URL.
//!
//! 2xx with `{"failed":[…]}` (whose `batch_id`, if given, must name the
//! batch, and whose entries must name its records) reports per-record
//! results; an empty 2xx body is a success only when its end is certain
//! (204, `Content-Length: 0`, or a chunked body that ended). A body that cannot be read in full, or is larger
//! than [`MAX_ANSWER_BYTES`], is a retryable failure, never a success.
//! 5xx, 408, 429, timeouts and connection errors are retryable, and so are
//! 401, 403, 404 and 407: they say the endpoint or its credentials are
//! wrong, which is an outage for the circuit breaker, not a bad record.
//! Other 4xx answers are permanent (the records are rejected).
//!
//! Redirects are never followed. A client that follows a 301, 302 or 303
//! turns the POST into a GET without its body, so the endpoint would never
//! see the batch while the redirect target's `200` marked it done. A 3xx is
//! a retryable failure that names its `Location`: the URL is wrong, which is
//! an outage until it is fixed, not a bad record.
//!
//! The URL is never shown whole: credentials in it (`user:pass@`), the
//! values of its query (`?token=…`), its fragment and long path segments
//! (a webhook's token) are masked in every log line and error, and so in
//! dead letters' `microbatch.error` header.

use std::time::Duration;

use async_trait::async_trait;

use super::{encode_batch, BatchOutcome, Failure, FailureReport, Handler};
use crate::batch::Batch;

/// The largest answer body read; a larger one fails the batch (retryable).
/// An answer names at most every record of its batch, a few hundred bytes
/// each, so this is far above any honest answer and far below memory.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

pub struct HttpHandler {
    url: reqwest::Url,
    /// `url` as logs and errors show it: see [`redact_url`].
    shown: String,
    client: reqwest::Client,
}

/// Why an http handler cannot be made; never shows the URL itself, which
/// may hold a secret.
#[derive(Debug, thiserror::Error)]
pub enum HttpHandlerError {
    #[error("not a valid http:// or https:// URL ({0})")]
    InvalidUrl(String),
    #[error("could not create the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl HttpHandler {
    pub fn new(url: &str, timeout: Duration) -> Result<Self, HttpHandlerError> {
        let url =
            reqwest::Url::parse(url).map_err(|e| HttpHandlerError::InvalidUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
            return Err(HttpHandlerError::InvalidUrl(format!(
                "scheme {:?}, host {:?}",
                url.scheme(),
                url.host_str().unwrap_or("")
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(64)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            shown: show_url(&url),
            url,
            client,
        })
    }

    /// Reads the body, at most [`MAX_ANSWER_BYTES`] of it.
    async fn read_answer(&self, mut response: reqwest::Response) -> Result<Vec<u8>, String> {
        let status = response.status();
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                        return Err(format!(
                            "POST {} answered {status} with a body over {MAX_ANSWER_BYTES} bytes",
                            self.shown
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(e) => {
                    return Err(format!(
                        "POST {} answered {status} but its body could not be read in full: {}",
                        self.shown,
                        e.without_url()
                    ))
                }
            }
        }
    }
}

/// Path segments at least this long are masked: webhook URLs carry their
/// token as one (`/services/T0/B0/<token>`).
const LONG_PATH_SEGMENT: usize = 16;

/// `url` with what may be a secret masked: the user and password, the value
/// of every query parameter, the fragment and long path segments. A text
/// that is not a URL is not shown at all.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(url) => show_url(&url),
        Err(_) => "<a URL that cannot be parsed, not shown>".into(),
    }
}

fn show_url(url: &reqwest::Url) -> String {
    let mut shown = format!("{}://", url.scheme());
    if !url.username().is_empty() || url.password().is_some() {
        shown.push_str("***@");
    }
    shown.push_str(url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    let path: Vec<&str> = url
        .path()
        .split('/')
        .map(|segment| {
            if segment.len() >= LONG_PATH_SEGMENT {
                "***"
            } else {
                segment
            }
        })
        .collect();
    shown.push_str(&path.join("/"));
    if let Some(query) = url.query() {
        let masked: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) => format!("{name}=***"),
                None => "***".to_string(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&masked.join("&"));
    }
    if url.fragment().is_some() {
        shown.push_str("#***");
    }
    shown
}

#[async_trait]
impl Handler for HttpHandler {
    async fn handle(&self, batch: &Batch) -> BatchOutcome {
        let mut body = Vec::with_capacity(64 + batch.payload_bytes() * 2 + batch.len() * 96);
        encode_batch(batch, &mut body);
        let response = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                return BatchOutcome::Failed(Failure::retryable(format!(
                    "POST {}: {}",
                    self.shown,
                    e.without_url()
                )))
            }
        };
        let status = response.status();
        if status.is_redirection() {
            // A Location may be relative (`/v2`, `//host/v2`): shown resolved.
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .map(
                    |l| match self.url.join(&String::from_utf8_lossy(l.as_bytes())) {
                        Ok(target) => show_url(&target),
                        Err(_) => "<a Location that cannot be parsed, not shown>".into(),
                    },
                )
                .unwrap_or_else(|| "nowhere (no Location header)".into());
            return BatchOutcome::Failed(Failure::retryable(format!(
                "POST {} answered {status}, a redirect to {location}; redirects are not \
                 followed (a redirected POST loses its body): set --url to where it points",
                self.shown
            )));
        }
        // An empty body is a success only when it says it is complete: a
        // body ended by closing the connection cannot tell a handler that
        // answered nothing from one that died after the status line.
        let delimited = status == reqwest::StatusCode::NO_CONTENT
            || response.content_length() == Some(0)
            || response
                .headers()
                .get(reqwest::header::TRANSFER_ENCODING)
                .is_some_and(|te| te.as_bytes().ends_with(b"chunked"));
        let text = match self.read_answer(response).await {
            Ok(text) => text,
            Err(e) => return BatchOutcome::Failed(Failure::retryable(e)),
        };
        if status.is_success() {
            if text.iter().all(u8::is_ascii_whitespace) {
                if delimited && text.is_empty() {
                    return BatchOutcome::Success;
                }
                return BatchOutcome::Failed(Failure::retryable(format!(
                    "POST {} answered {status} with an empty body of no stated length, which a \
                     handler that died after the status line also sends: answer 204, or \
                     Content-Length: 0, or {{\"failed\":[]}}",
                    self.shown
                )));
            }
            return FailureReport::parse(&text, batch);
        }
        let error = format!(
            "POST {} answered {status}: {}",
            self.shown,
            String::from_utf8_lossy(&text[..text.len().min(200)])
        );
        if status.is_server_error()
            || status.is_informational()
            || matches!(status.as_u16(), 401 | 403 | 404 | 407 | 408 | 429)
        {
            BatchOutcome::Failed(Failure::retryable(error))
        } else {
            BatchOutcome::Failed(Failure::permanent(error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server on 127.0.0.1 that answers every request with `status`.
    async fn answering(status: &'static str) -> String {
        answering_with(status, "").await
    }

    /// The same, with extra header lines (each ending in `\r\n`).
    async fn answering_with(status: &'static str, headers: &'static str) -> String {
        serving(
            format!("HTTP/1.1 {status}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n")
                .into_bytes(),
        )
        .await
    }

    /// A server on 127.0.0.1 that reads each request and answers it with
    /// `response`, byte for byte, then closes the connection.
    async fn serving(response: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0; 64 * 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&response).await;
            }
        });
        url
    }

    fn batch() -> Batch {
        let mut b = Batch::new(1, Arc::from("t"), 0);
        b.push(1, None, None, Some(b"a"), []);
        b
    }

    #[tokio::test]
    async fn a_wrong_endpoint_or_credentials_is_an_outage_not_a_bad_record() {
        for (status, retryable) in [
            ("401 Unauthorized", true),
            ("403 Forbidden", true),
            ("404 Not Found", true),
            ("503 Service Unavailable", true),
            ("400 Bad Request", false),
            ("422 Unprocessable Entity", false),
        ] {
            let h = HttpHandler::new(&answering(status).await, Duration::from_secs(5)).unwrap();
            match h.handle(&batch()).await {
                BatchOutcome::Failed(f) => assert_eq!(f.retryable, retryable, "{status}"),
                other => panic!("{status}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_redirect_is_a_retryable_failure_naming_where_it_points() {
        // The target would answer 200 with an empty body: success, had the
        // client followed the redirect with a bodiless GET.
        let target = answering("200 OK").await;
        for status in [
            "301 Moved Permanently",
            "302 Found",
            "303 See Other",
            "307 Temporary Redirect",
            "308 Permanent Redirect",
        ] {
            let headers: &'static str =
                Box::leak(format!("Location: {target}?token=hunter2\r\n").into_boxed_str());
            let h = HttpHandler::new(
                &answering_with(status, headers).await,
                Duration::from_secs(5),
            )
            .unwrap();
            match h.handle(&batch()).await {
                BatchOutcome::Failed(f) => {
                    assert!(f.retryable, "{status}");
                    assert!(f.error.contains(&target), "{status}: {}", f.error);
                    assert!(!f.error.contains("hunter2"), "{status}: {}", f.error);
                }
                other => panic!("{status}: {other:?}"),
            }
        }
    }

    #[test]
    fn urls_are_shown_without_their_secrets() {
        for (url, shown) in [
            ("http://h:81/p", "http://h:81/p"),
            (
                "https://user:pw@h/p?token=abc&x",
                "https://***@h/p?token=***&***",
            ),
            ("http://h/p?a=1&b=2#frag", "http://h/p?a=***&b=***#***"),
            ("http://u@h", "http://***@h/"),
            ("http://a@b@h/x", "http://***@h/x"),
            (
                "https://hooks.example.com/services/T0/B0/XyZ0123456789abcdef",
                "https://hooks.example.com/services/T0/B0/***",
            ),
            // Not URLs a client would take: nothing of them is shown.
            (
                "http://u:p/ss@h/x",
                "<a URL that cannot be parsed, not shown>",
            ),
            ("h/p?k=v", "<a URL that cannot be parsed, not shown>"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        for bad in ["http://u:p/ss@h/x", "ftp://h/x", "not a url"] {
            assert!(
                matches!(HttpHandler::new(bad, Duration::from_secs(1)), Err(HttpHandlerError::InvalidUrl(e)) if !e.contains("ss@")),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn an_empty_answer_is_a_success_only_when_its_end_is_certain() {
        for (status, headers, success) in [
            ("204 No Content", "", true),
            ("200 OK", "Content-Length: 0\r\n", true),
            // Ended by closing the connection: maybe a handler that died.
            ("200 OK", "", false),
        ] {
            let url = serving(format!("HTTP/1.0 {status}\r\n{headers}\r\n").into_bytes()).await;
            let h = HttpHandler::new(&url, Duration::from_secs(5)).unwrap();
            let outcome = h.handle(&batch()).await;
            assert_eq!(
                outcome == BatchOutcome::Success,
                success,
                "{status} {headers:?}: {outcome:?}"
            );
        }
    }

    #[tokio::test]
    async fn errors_never_show_the_url_credentials() {
        // Nothing listens on port 9 of 127.0.0.1 here: connection refused.
        let h = HttpHandler::new(
            "http://me:pw-123@127.0.0.1:9/x?token=t-456",
            Duration::from_secs(5),
        )
        .unwrap();
        match h.handle(&batch()).await {
            BatchOutcome::Failed(f) => {
                assert!(f.retryable);
                assert!(
                    !f.error.contains("pw-123") && !f.error.contains("t-456"),
                    "{}",
                    f.error
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_answer_over_the_size_limit_fails_the_batch() {
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            MAX_ANSWER_BYTES + 1
        )
        .into_bytes();
        response.resize(response.len() + MAX_ANSWER_BYTES + 1, b' ');
        let url = serving(response).await;
        let h = HttpHandler::new(&url, Duration::from_secs(10)).unwrap();
        assert!(
            matches!(h.handle(&batch()).await, BatchOutcome::Failed(f) if f.retryable && f.error.contains("over")),
            "a body of blanks would otherwise be an empty answer: success"
        );
    }
}
