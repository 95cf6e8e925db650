//! `http`: POST each batch as JSON to a URL.
//!
//! 2xx with an empty body or `{"failed":[…]}` (whose `batch_id`, if given,
//! must name the batch, and whose entries must name its records) reports
//! per-record results. A body that cannot be read in full, or is larger
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
//! The URL is never shown whole: credentials in it (`user:pass@`) and the
//! values of its query (`?token=…`) are masked in every log line and error,
//! and so in dead letters' `microbatch.error` header.

use std::time::Duration;

use async_trait::async_trait;

use super::{encode_batch, BatchOutcome, Failure, FailureReport, Handler};
use crate::batch::Batch;

/// The largest answer body read; a larger one fails the batch (retryable).
/// An answer names at most every record of its batch, a few hundred bytes
/// each, so this is far above any honest answer and far below memory.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

pub struct HttpHandler {
    url: String,
    /// `url` as logs and errors show it: see [`redact_url`].
    shown: String,
    client: reqwest::Client,
}

impl HttpHandler {
    pub fn new(url: impl Into<String>, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(64)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let url = url.into();
        Ok(Self {
            shown: redact_url(&url),
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

/// `url` with what may be a secret masked: the user and password before
/// `@`, and the value of every query parameter (a token is often one).
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_string(),
    };
    let (path, fragment) = match tail.split_once('#') {
        Some((path, _)) => (path, "#***"),
        None => (tail, ""),
    };
    let path = match path.split_once('?') {
        Some((path, query)) => {
            let masked: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) => format!("{name}=***"),
                    None => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", masked.join("&"))
        }
        None => path.to_string(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{host}{path}{fragment}"),
        None => format!("{host}{path}{fragment}"),
    }
}

#[async_trait]
impl Handler for HttpHandler {
    async fn handle(&self, batch: &Batch) -> BatchOutcome {
        let mut body = Vec::with_capacity(64 + batch.payload_bytes() * 2 + batch.len() * 96);
        encode_batch(batch, &mut body);
        let response = self
            .client
            .post(&self.url)
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
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|l| redact_url(&String::from_utf8_lossy(l.as_bytes())))
                .unwrap_or_else(|| "nowhere (no Location header)".into());
            return BatchOutcome::Failed(Failure::retryable(format!(
                "POST {} answered {status}, a redirect to {location}; redirects are not \
                 followed (a redirected POST loses its body): set --url to where it points",
                self.shown
            )));
        }
        let text = match self.read_answer(response).await {
            Ok(text) => text,
            Err(e) => return BatchOutcome::Failed(Failure::retryable(e)),
        };
        if status.is_success() {
            return FailureReport::parse(&text, batch);
        }
        let error = format!(
            "POST {} answered {status}: {}",
            self.shown,
            String::from_utf8_lossy(&text[..text.len().min(200)])
        );
        if status.is_server_error() || matches!(status.as_u16(), 401 | 403 | 404 | 407 | 408 | 429)
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0; 64 * 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
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
            let h = HttpHandler::new(answering(status).await, Duration::from_secs(5)).unwrap();
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
                answering_with(status, headers).await,
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
            ("http://h:80/p", "http://h:80/p"),
            (
                "https://user:pw@h/p?token=abc&x",
                "https://***@h/p?token=***&x",
            ),
            ("http://h/p?a=1&b=2#frag", "http://h/p?a=***&b=***#***"),
            ("http://u@h", "http://***@h"),
            ("h/p?k=v", "h/p?k=***"),
            ("http://a@b@h/x", "http://***@h/x"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0; 64 * 1024];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    MAX_ANSWER_BYTES + 1
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&vec![b' '; MAX_ANSWER_BYTES + 1]).await;
            }
        });
        let h = HttpHandler::new(url, Duration::from_secs(10)).unwrap();
        assert!(
            matches!(h.handle(&batch()).await, BatchOutcome::Failed(f) if f.retryable && f.error.contains("over")),
            "a body of blanks would otherwise be an empty answer: success"
        );
    }
}
