//! `simulate`: the replaced system's handler, a fixed time per record.

use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;

use super::{BatchOutcome, Failure, Handler};
use crate::batch::Batch;

/// Sleeps `process_time` per record, and fails a record with probability
/// `failure_rate` (retryable, so a retry usually succeeds).
#[derive(Debug, Clone)]
pub struct SimulateHandler {
    pub process_time: Duration,
    pub failure_rate: f64,
}

#[async_trait]
impl Handler for SimulateHandler {
    async fn handle(&self, batch: &Batch) -> BatchOutcome {
        let total = self.process_time.saturating_mul(batch.len() as u32);
        if !total.is_zero() {
            tokio::time::sleep(total).await;
        }
        if self.failure_rate <= 0.0 {
            return BatchOutcome::Success;
        }
        let mut rng = rand::rng();
        let failed: Vec<_> = batch
            .offsets()
            .filter(|_| rng.random_bool(self.failure_rate.min(1.0)))
            .map(|o| (o, Failure::retryable("simulated failure")))
            .collect();
        if failed.is_empty() {
            BatchOutcome::Success
        } else {
            BatchOutcome::Partial(failed)
        }
    }
}
