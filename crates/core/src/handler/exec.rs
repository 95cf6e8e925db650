//! `exec`: a long-lived child process per slot, speaking NDJSON.
//!
//! Each batch is one JSON line on the child's stdin; the child answers with one
//! line on stdout (see [`super::FailureReport`]). A child that dies, answers
//! garbage or is timed out by the worker is dropped (and killed); the next
//! batch starts a fresh one, after a back-off that grows while children keep
//! dying, so a broken command does not spin.

use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::{encode_batch, BatchOutcome, Failure, FailureReport, Handler};
use crate::batch::Batch;

struct ExecChild {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// Runs `sh -c <command>` children and feeds them batches.
pub struct ExecHandler {
    command: String,
    idle: Mutex<Vec<ExecChild>>,
    consecutive_deaths: AtomicU32,
}

impl ExecHandler {
    pub fn new(command: impl Into<String>) -> Self {
        Self {
            command: command.into(),
            idle: Mutex::new(Vec::new()),
            consecutive_deaths: AtomicU32::new(0),
        }
    }

    async fn checkout(&self) -> std::io::Result<ExecChild> {
        if let Some(child) = self.idle.lock().expect("exec pool lock poisoned").pop() {
            return Ok(child);
        }
        let deaths = self.consecutive_deaths.load(Ordering::Relaxed);
        if deaths > 0 {
            let backoff =
                Duration::from_millis(100u64 << deaths.min(7)).min(Duration::from_secs(10));
            tokio::time::sleep(backoff).await;
        }
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("stdin was piped");
        let stdout = BufReader::new(child.stdout.take().expect("stdout was piped"));
        Ok(ExecChild {
            _child: child,
            stdin,
            stdout,
        })
    }

    async fn exchange(child: &mut ExecChild, request: &[u8]) -> std::io::Result<Vec<u8>> {
        child.stdin.write_all(request).await?;
        child.stdin.flush().await?;
        let mut line = Vec::new();
        if child.stdout.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "handler process closed its stdout (did it exit?)",
            ));
        }
        Ok(line)
    }
}

#[async_trait]
impl Handler for ExecHandler {
    async fn handle(&self, batch: &Batch) -> BatchOutcome {
        let mut child = match self.checkout().await {
            Ok(child) => child,
            Err(e) => {
                self.consecutive_deaths.fetch_add(1, Ordering::Relaxed);
                return BatchOutcome::Failed(Failure::retryable(format!(
                    "could not start handler command: {e}"
                )));
            }
        };
        let mut request = Vec::with_capacity(64 + batch.payload_bytes() * 2 + batch.len() * 96);
        encode_batch(batch, &mut request);
        match Self::exchange(&mut child, &request).await {
            Ok(line) => {
                self.consecutive_deaths.store(0, Ordering::Relaxed);
                self.idle
                    .lock()
                    .expect("exec pool lock poisoned")
                    .push(child);
                FailureReport::parse(&line, batch)
            }
            Err(e) => {
                self.consecutive_deaths.fetch_add(1, Ordering::Relaxed);
                BatchOutcome::Failed(Failure::retryable(format!("handler process failed: {e}")))
            }
        }
    }

    async fn shutdown(&self) {
        let children: Vec<ExecChild> =
            std::mem::take(&mut *self.idle.lock().expect("exec pool lock poisoned"));
        for mut child in children {
            // Closing stdin asks the child to finish; it is killed if it lingers.
            drop(child.stdin);
            let _ = tokio::time::timeout(Duration::from_secs(2), child._child.wait()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn batch() -> Batch {
        let mut b = Batch::new(1, Arc::from("t"), 0);
        b.push(1, None, None, Some(b"a"), []);
        b.push(2, None, None, Some(b"b"), []);
        b
    }

    #[tokio::test]
    async fn a_child_answers_and_is_reused() {
        let h = ExecHandler::new(
            r#"while read -r line; do echo '{"failed":[{"offset":2,"error":"x"}]}'; done"#,
        );
        for _ in 0..2 {
            match h.handle(&batch()).await {
                BatchOutcome::Partial(f) => assert_eq!(f[0].0, 2),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(h.idle.lock().unwrap().len(), 1);
        h.shutdown().await;
    }

    #[tokio::test]
    async fn a_dead_child_fails_the_batch() {
        let h = ExecHandler::new("exit 3");
        assert!(matches!(h.handle(&batch()).await, BatchOutcome::Failed(f) if f.retryable));
    }
}
