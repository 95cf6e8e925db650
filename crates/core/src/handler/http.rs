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
