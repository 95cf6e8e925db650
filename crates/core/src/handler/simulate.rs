//! `simulate`: the replaced system's handler, a fixed time per record.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;

use super::{BatchOutcome, Failure, Handler};
use crate::batch::Batch;

/// Sleeps `process_time` per record; fails a record with probability
/// `failure_rate` (retryable, so a retry usually succeeds), and fails for good
/// every record whose value contains `poison_marker` (bad input). While
/// `outage_file` exists, every batch fails at once as a whole, retryable,
/// as a downstream refusing connections does (the demo's outage).
#[derive(Debug, Clone, Default)]
pub struct SimulateHandler {
    pub process_time: Duration,
    pub failure_rate: f64,
    pub poison_marker: Option<String>,
    pub outage_file: Option<PathBuf>,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[async_trait]
impl Handler for SimulateHandler {
    async fn handle(&self, batch: &Batch) -> BatchOutcome {
        if self.outage_file.as_ref().is_some_and(|f| f.exists()) {
            return BatchOutcome::Failed(Failure::retryable(
                "simulated outage: the downstream refuses connections",
            ));
        }
        let total = self.process_time.saturating_mul(batch.len() as u32);
        if !total.is_zero() {
            tokio::time::sleep(total).await;
        }
        if self.failure_rate <= 0.0 && self.poison_marker.is_none() {
            return BatchOutcome::Success;
        }
        let marker = self.poison_marker.as_deref().unwrap_or("").as_bytes();
        let mut rng = rand::rng();
        let failed: Vec<_> = batch
            .records()
            .filter_map(|r| {
                if contains(r.value.unwrap_or(b""), marker) {
                    Some((
                        r.offset,
                        Failure::permanent("poison record (simulated bad input)"),
                    ))
                } else if self.failure_rate > 0.0 && rng.random_bool(self.failure_rate.min(1.0)) {
                    Some((r.offset, Failure::retryable("simulated failure")))
                } else {
                    None
                }
            })
            .collect();
        if failed.is_empty() {
            BatchOutcome::Success
        } else {
            BatchOutcome::Partial(failed)
        }
    }

    fn reads_headers(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn every_batch_fails_whole_while_the_outage_file_exists() {
        let file = std::env::temp_dir().join(format!("simulate-outage-{}", std::process::id()));
        let h = SimulateHandler {
            outage_file: Some(file.clone()),
            ..SimulateHandler::default()
        };
        let mut b = Batch::new(1, Arc::from("t"), 0);
        b.push(1, None, None, Some(b"ok"), []);
        assert!(matches!(h.handle(&b).await, BatchOutcome::Success));
        std::fs::write(&file, b"").unwrap();
        let down = h.handle(&b).await;
        std::fs::remove_file(&file).unwrap();
        match down {
            BatchOutcome::Failed(f) => assert!(f.retryable, "{f:?}"),
            other => panic!("expected the whole batch to fail: {other:?}"),
        }
        assert!(matches!(h.handle(&b).await, BatchOutcome::Success));
    }

    #[tokio::test]
    async fn poison_records_fail_for_good_and_others_pass() {
        let h = SimulateHandler {
            poison_marker: Some("POISON".into()),
            ..SimulateHandler::default()
        };
        let mut b = Batch::new(1, Arc::from("t"), 0);
        b.push(1, None, None, Some(b"ok"), []);
        b.push(2, None, None, Some(b"x POISON y"), []);
        match h.handle(&b).await {
            BatchOutcome::Partial(f) => {
                assert_eq!(f.len(), 1);
                assert_eq!(f[0].0, 2);
                assert!(!f[0].1.retryable);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
