//! `http`: POST each batch as JSON to a URL.
//!
//! 2xx with an empty body or `{"failed":[…]}` (whose `batch_id`, if given,
//! must name the batch) reports per-record results. A body that cannot be
//! read in full is a retryable failure, never a success. 5xx, 408, 429,
//! timeouts and connection errors are retryable, and so are 401, 403, 404
//! and 407: they say the endpoint or its credentials are wrong, which is an
//! outage for the circuit breaker, not a bad record. Other 4xx answers are
//! permanent (the records are rejected).

use std::time::Duration;

use async_trait::async_trait;

use super::{encode_batch, BatchOutcome, Failure, FailureReport, Handler};
use crate::batch::Batch;

pub struct HttpHandler {
    url: String,
    client: reqwest::Client,
}

impl HttpHandler {
    pub fn new(url: impl Into<String>, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Self {
            url: url.into(),
            client,
        })
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
                return BatchOutcome::Failed(Failure::retryable(format!("POST {}: {e}", self.url)))
            }
        };
        let status = response.status();
        let text = match response.bytes().await {
            Ok(text) => text,
            Err(e) => {
                return BatchOutcome::Failed(Failure::retryable(format!(
                    "POST {} answered {status} but its body could not be read in full: {e}",
                    self.url
                )))
            }
        };
        if status.is_success() {
            return FailureReport::parse(&text, batch);
        }
        let error = format!(
            "POST {} answered {status}: {}",
            self.url,
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0; 64 * 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
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
}
