//! `exec`: a long-lived child process per slot, speaking NDJSON.
//!
//! Each batch is one JSON line on the child's stdin; the child answers with one
//! line on stdout that names the batch (`batch_id`, see [`super::Line`]).
//! Other lines on stdout (logs, blank lines) are skipped and logged, at most
//! once per back-off step, never taken for an answer. A child that dies,
//! answers for another batch, answers something unreadable or is timed out
//! by the worker is dropped (and killed), and the batch fails (retryable):
//! its later answers could belong to the wrong batch. The next batch starts
//! a fresh child, after a back-off that grows while children keep dying, so
//! a broken command does not spin.
//!
//! Each child leads a process group of its own, and a child dropped while
//! it runs is killed with its whole group: `sh -c` forks the command, so
//! killing `sh` alone would leave the handler itself running, orphaned,
//! after every timeout and at every exit with batches in flight.

use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::{encode_batch, BatchOutcome, Failure, FailureReport, Handler, Line};
use crate::batch::Batch;
use crate::telemetry::LogThrottle;

struct ExecChild {
    child: Child,
    /// `None` once closed, to ask the child to finish.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Drop for ExecChild {
    fn drop(&mut self) {
        // Only while `sh` has not been reaped: its pid, and so the group's
        // id, cannot have been given to another process yet.
        if let (Ok(None), Some(pid)) = (self.child.try_wait(), self.child.id()) {
            let group = pid as libc::pid_t;
            // SAFETY: signals the group this child leads; no memory involved.
            unsafe {
                libc::kill(-group, libc::SIGKILL);
            }
        }
    }
}

/// Runs `sh -c <command>` children and feeds them batches.
pub struct ExecHandler {
    command: String,
    idle: Mutex<Vec<ExecChild>>,
    consecutive_deaths: AtomicU32,
    noise: LogThrottle,
}

impl ExecHandler {
    pub fn new(command: impl Into<String>) -> Self {
        Self {
            command: command.into(),
            idle: Mutex::new(Vec::new()),
            consecutive_deaths: AtomicU32::new(0),
            noise: LogThrottle::default(),
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
        self.spawn()
    }

    fn spawn(&self) -> std::io::Result<ExecChild> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("stdin was piped");
        let stdout = BufReader::new(child.stdout.take().expect("stdout was piped"));
        Ok(ExecChild {
            child,
            stdin: Some(stdin),
            stdout,
        })
    }

    /// Sends the batch and reads lines until the one that answers it.
    async fn exchange(
        &self,
        child: &mut ExecChild,
        request: &[u8],
        batch: &Batch,
    ) -> Result<BatchOutcome, String> {
        let io = |e: std::io::Error| format!("handler process failed: {e}");
        let stdin = child.stdin.as_mut().expect("open until shutdown");
        stdin.write_all(request).await.map_err(io)?;
        stdin.flush().await.map_err(io)?;
        let mut line = Vec::new();
        loop {
            line.clear();
            if child
                .stdout
                .read_until(b'\n', &mut line)
                .await
                .map_err(io)?
                == 0
            {
                return Err("handler process closed its stdout (did it exit?)".into());
            }
            match FailureReport::classify(&line, batch) {
                Line::Answer(outcome) => return Ok(outcome),
                Line::Broken(error) => return Err(error),
                Line::Noise => {
                    if let Some(suppressed) = self.noise.allow(std::time::Instant::now()) {
                        let text = String::from_utf8_lossy(&line[..line.len().min(200)]);
                        tracing::warn!(
                            suppressed,
                            line = %text.trim_end(),
                            "the handler printed a line on stdout that is not an answer; \
                             skipped (log to stderr instead)"
                        );
                    }
                }
            }
        }
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
        match self.exchange(&mut child, &request, batch).await {
            Ok(outcome) => {
                self.consecutive_deaths.store(0, Ordering::Relaxed);
                self.idle
                    .lock()
                    .expect("exec pool lock poisoned")
                    .push(child);
                outcome
            }
            // The child is dropped here, and killed.
            Err(e) => {
                self.consecutive_deaths.fetch_add(1, Ordering::Relaxed);
                BatchOutcome::Failed(Failure::retryable(e))
            }
        }
    }

    /// One child per slot, started while the worker joins its group: a
    /// child's own start-up (an interpreter, its imports) then overlaps the
    /// join instead of stopping the first batches of the partitions it gets.
    async fn prepare(&self, slots: usize) {
        let mut started = Vec::with_capacity(slots);
        for _ in 0..slots {
            match self.spawn() {
                Ok(child) => started.push(child),
                Err(e) => {
                    tracing::warn!(error = %e, "could not start the handler command; the first batch tries again");
                    break;
                }
            }
        }
        self.idle
            .lock()
            .expect("exec pool lock poisoned")
            .extend(started);
    }

    async fn shutdown(&self) {
        let children: Vec<ExecChild> =
            std::mem::take(&mut *self.idle.lock().expect("exec pool lock poisoned"));
        for mut child in children {
            // Closing stdin asks the child to finish; it is killed, with its
            // group, if it lingers.
            child.stdin = None;
            let _ = tokio::time::timeout(Duration::from_secs(2), child.child.wait()).await;
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
            r#"while read -r line; do echo '{"log":"hi"}'; echo; echo '{"batch_id":"t-0-1","failed":[{"offset":2,"error":"x"}]}'; done"#,
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
    async fn prepare_starts_a_child_per_slot_that_batches_then_use() {
        let dir = std::env::temp_dir().join(format!("exec-prepare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let started = dir.join("started");
        let h = ExecHandler::new(format!(
            r#"echo $$ >> '{}'; while read -r line; do echo '{{"batch_id":"t-0-1","failed":[]}}'; done"#,
            started.display()
        ));
        h.prepare(2).await;
        assert_eq!(
            h.idle.lock().unwrap().len(),
            2,
            "a child per slot, before any batch"
        );
        let (one, two) = (batch(), batch());
        let (a, b) = tokio::join!(h.handle(&one), h.handle(&two));
        assert_eq!((a, b), (BatchOutcome::Success, BatchOutcome::Success));
        let lines = std::fs::read_to_string(&started).unwrap();
        assert_eq!(
            lines.lines().count(),
            2,
            "the batches used the children started: {lines}"
        );
        h.shutdown().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_answer_for_another_batch_fails_it_and_replaces_the_child() {
        let h = ExecHandler::new(
            r#"while read -r line; do echo '{"batch_id":"t-0-9","failed":[]}'; done"#,
        );
        assert!(
            matches!(h.handle(&batch()).await, BatchOutcome::Failed(f) if f.retryable && f.error.contains("t-0-9"))
        );
        assert_eq!(h.idle.lock().unwrap().len(), 0, "the child is not reused");
    }

    #[tokio::test]
    async fn a_dead_child_fails_the_batch() {
        let h = ExecHandler::new("exit 3");
        assert!(matches!(h.handle(&batch()).await, BatchOutcome::Failed(f) if f.retryable));
    }

    fn alive(pid: i32) -> bool {
        // A zombie has exited; only its parent has not reaped it yet.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    }

    #[tokio::test]
    async fn a_child_timed_out_is_killed_with_what_it_started() {
        // `sh -c` forks the command: the handler proper is sh's child.
        let pid_file = std::env::temp_dir().join(format!("exec-orphan-{}", std::process::id()));
        let h = ExecHandler::new(format!(
            "sleep 300 & echo $! > {}; wait",
            pid_file.display()
        ));
        let timed_out = tokio::time::timeout(Duration::from_millis(500), h.handle(&batch())).await;
        assert!(timed_out.is_err(), "the batch never ends");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .expect("the command wrote its child's pid")
            .trim()
            .parse()
            .expect("a pid");
        let _ = std::fs::remove_file(&pid_file);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(pid) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !alive(pid),
            "the command's own child {pid} outlived the timeout"
        );
    }
}
