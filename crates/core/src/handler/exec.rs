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
//! a broken command does not spin. The back-off ends at a fixed instant
//! after the last death and is waited out in [`Handler::ready`], before the
//! worker starts the handler timeout: a timeout shorter than the back-off
//! can neither cancel every start nor push the next one further away.
//!
//! An answer line longer than [`MAX_ANSWER_BYTES`] is a broken answer.
//!
//! Children do not inherit the worker's own credentials
//! ([`SCRUBBED_ENV`]); `--handler-env NAME` passes one on purpose.
//!
//! Each child leads a process group of its own, and a child dropped while
//! it runs is killed with its whole group: `sh -c` forks the command, so
//! killing `sh` alone would leave the handler itself running, orphaned,
//! after every timeout and at every exit with batches in flight.

use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::{encode_batch, BatchOutcome, Failure, FailureReport, Handler, Line, MAX_ANSWER_BYTES};
use crate::batch::Batch;
use microbatch_kafka::LogThrottle;

struct ExecChild {
    child: Child,
    /// The process group the child leads (its pid at spawn).
    group: Option<u32>,
    /// Whether it has answered a batch: its start-up is over.
    answered: bool,
    /// When it was started: its start-up allowance counts from here.
    spawned_at: Instant,
    /// `None` once closed, to ask the child to finish.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

/// The process groups of the children alive in this process, so that a
/// worker told to stop at once can end them ([`kill_children`]).
static LIVE_GROUPS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn live_groups() -> std::sync::MutexGuard<'static, Vec<u32>> {
    // A panic while the list was held leaves it whole: plain pushes and removes.
    LIVE_GROUPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kills every exec child this process started, with its process group:
/// for an exit that cannot wait for the children to finish (a second
/// SIGTERM), which would otherwise leave them running, orphaned.
pub fn kill_children() {
    for &group in live_groups().iter() {
        // SAFETY: signals a group one of our children leads; no memory involved.
        unsafe {
            libc::kill(-(group as libc::pid_t), libc::SIGKILL);
        }
    }
}

impl Drop for ExecChild {
    fn drop(&mut self) {
        if let Some(group) = self.group {
            live_groups().retain(|&g| g != group);
        }
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

/// The worker's own credentials, which a child does not inherit unless
/// `--handler-env` names them: the Kafka password and the AWS keys that
/// sign MSK IAM tokens. A handler that needs AWS for its own work passes
/// them on purpose (or uses its pod's role, which this list leaves alone).
pub const SCRUBBED_ENV: &[&str] = &[
    "KAFKA_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "SCHEMA_REGISTRY_PASSWORD",
    "SCHEMA_REGISTRY_TOKEN",
    // Kafka properties handed down by `supervise` (passwords, keys).
    "MICROBATCH_KAFKA_PROPERTIES",
];

/// Answers in the protocol before `batch_id` in a row, each from a fresh
/// child, that make the command a configuration error.
pub const OLD_PROTOCOL_ANSWERS_TO_STOP: u32 = 3;

/// The longest wait before a child is started again after deaths in a row.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(10);

/// Children that died in a row, and when the next may start.
#[derive(Debug, Default)]
struct Restarts {
    deaths: u32,
    not_before: Option<Instant>,
}

impl Restarts {
    fn died(&mut self, now: Instant) {
        self.deaths += 1;
        let backoff = Duration::from_millis(100u64 << self.deaths.min(7)).min(MAX_RESTART_BACKOFF);
        self.not_before = Some(now + backoff);
    }
}

/// Runs `sh -c <command>` children and feeds them batches.
pub struct ExecHandler {
    command: String,
    /// Variables of the worker's environment removed from the children's.
    scrubbed: Vec<String>,
    idle: Mutex<Vec<ExecChild>>,
    restarts: Mutex<Restarts>,
    /// Answers without `batch_id` in a row (see [`Handler::misconfigured`]).
    old_protocol_answers: AtomicU32,
    /// Set once the answers above reach [`OLD_PROTOCOL_ANSWERS_TO_STOP`];
    /// never cleared, so a batch answered right during the drain cannot
    /// turn the stop into a clean exit.
    misconfigured: std::sync::OnceLock<String>,
    /// The configured handler timeout, enforced here for children that
    /// have answered before; `None`: the worker's timeout alone.
    timeout: Option<Duration>,
    /// Extra time a child's first batch gets, for its start-up.
    startup: Duration,
    noise: LogThrottle,
}

impl ExecHandler {
    /// A handler whose children get none of [`SCRUBBED_ENV`].
    pub fn new(command: impl Into<String>) -> Self {
        Self::with_env(command, &[])
    }

    /// A handler whose children get none of [`SCRUBBED_ENV`] but those
    /// named in `passed`.
    pub fn with_env(command: impl Into<String>, passed: &[String]) -> Self {
        Self {
            command: command.into(),
            scrubbed: SCRUBBED_ENV
                .iter()
                .filter(|name| !passed.iter().any(|p| p == *name))
                .map(|name| name.to_string())
                .collect(),
            idle: Mutex::new(Vec::new()),
            restarts: Mutex::new(Restarts::default()),
            old_protocol_answers: AtomicU32::new(0),
            misconfigured: std::sync::OnceLock::new(),
            timeout: None,
            startup: Duration::ZERO,
            noise: LogThrottle::default(),
        }
    }

    /// Gives each new child's first batch what is left of `startup`,
    /// counted from the child's start, on top of `timeout`: an interpreter
    /// or a JVM that takes longer to start than a batch takes would
    /// otherwise be killed and started again for ever. Later batches of the
    /// same child get `timeout` alone. `timeout` must be the worker's.
    pub fn with_startup(mut self, timeout: Duration, startup: Duration) -> Self {
        self.timeout = Some(timeout);
        self.startup = startup;
        self
    }

    fn restarts(&self) -> std::sync::MutexGuard<'_, Restarts> {
        self.restarts.lock().expect("exec restarts lock poisoned")
    }

    /// When the next child may start, if that is still to come and no idle
    /// child is waiting.
    fn start_not_before(&self) -> Option<Instant> {
        if !self
            .idle
            .lock()
            .expect("exec pool lock poisoned")
            .is_empty()
        {
            return None;
        }
        self.restarts().not_before.filter(|&at| at > Instant::now())
    }

    async fn checkout(&self) -> std::io::Result<ExecChild> {
        if let Some(child) = self.idle.lock().expect("exec pool lock poisoned").pop() {
            return Ok(child);
        }
        // Normally waited out in `ready` already; a fixed instant, so a
        // cancelled wait does not move it.
        if let Some(at) = self.start_not_before() {
            tokio::time::sleep_until(at.into()).await;
        }
        self.spawn()
    }

    fn spawn(&self) -> std::io::Result<ExecChild> {
        let mut command = Command::new("sh");
        for name in &self.scrubbed {
            command.env_remove(name);
        }
        let mut child = command
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let group = child.id();
        if let Some(group) = group {
            live_groups().push(group);
        }
        let stdin = child.stdin.take().expect("stdin was piped");
        let stdout = BufReader::new(child.stdout.take().expect("stdout was piped"));
        Ok(ExecChild {
            child,
            group,
            answered: false,
            spawned_at: Instant::now(),
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
            let limit = MAX_ANSWER_BYTES as u64 + 1;
            if (&mut child.stdout)
                .take(limit)
                .read_until(b'\n', &mut line)
                .await
                .map_err(io)?
                == 0
            {
                return Err("handler process closed its stdout (did it exit?)".into());
            }
            if line.len() > MAX_ANSWER_BYTES {
                return Err(format!(
                    "the handler printed a line over {MAX_ANSWER_BYTES} bytes on stdout"
                ));
            }
            match FailureReport::classify(&line, batch) {
                Line::Answer(outcome) => {
                    self.old_protocol_answers.store(0, Ordering::Relaxed);
                    return Ok(outcome);
                }
                Line::Broken(error) => return Err(error),
                Line::OldProtocol(error) => {
                    let n = self.old_protocol_answers.fetch_add(1, Ordering::Relaxed) + 1;
                    if n >= OLD_PROTOCOL_ANSWERS_TO_STOP {
                        let _ = self.misconfigured.set(format!(
                            "the exec handler answered {n} batches in a row without \"batch_id\" \
                             (the protocol before it), each from a fresh child: answer \
                             {{\"batch_id\":\"<the batch's>\",\"failed\":[…]}} (see the README's exec protocol)"
                        ));
                    }
                    return Err(error);
                }
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
                self.restarts().died(Instant::now());
                return BatchOutcome::Failed(Failure::retryable(format!(
                    "could not start handler command: {e}"
                )));
            }
        };
        let mut request = Vec::with_capacity(64 + batch.payload_bytes() * 2 + batch.len() * 96);
        encode_batch(batch, &mut request);
        // The worker allows every batch the start-up on top of the timeout;
        // the handler holds each to its own share of it: the timeout, plus
        // what is left of the start-up allowance for a child that has not
        // answered yet (counted from its start, so a child started with the
        // worker long ago gets none).
        let limit = self.timeout.map(|timeout| {
            if child.answered {
                timeout
            } else {
                timeout.saturating_add(self.startup.saturating_sub(child.spawned_at.elapsed()))
            }
        });
        let exchanged = match limit {
            Some(limit) => {
                match tokio::time::timeout(limit, self.exchange(&mut child, &request, batch)).await
                {
                    Ok(exchanged) => exchanged,
                    // A timeout is not a death: no restart back-off, as
                    // when the worker's own timeout cancels a batch.
                    Err(_) => {
                        return BatchOutcome::Failed(Failure::retryable(format!(
                            "handler timed out after {} ms",
                            limit.as_millis()
                        )))
                    }
                }
            }
            None => self.exchange(&mut child, &request, batch).await,
        };
        match exchanged {
            Ok(outcome) => {
                child.answered = true;
                *self.restarts() = Restarts::default();
                self.idle
                    .lock()
                    .expect("exec pool lock poisoned")
                    .push(child);
                outcome
            }
            // The child is dropped here, and killed.
            Err(e) => {
                self.restarts().died(Instant::now());
                BatchOutcome::Failed(Failure::retryable(e))
            }
        }
    }

    fn misconfigured(&self) -> Option<String> {
        self.misconfigured.get().cloned()
    }

    fn max_time(&self, timeout: Duration) -> Duration {
        timeout.saturating_add(self.startup)
    }

    async fn ready(&self) {
        if let Some(at) = self.start_not_before() {
            tokio::time::sleep_until(at.into()).await;
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
        // Closing stdin asks each child to finish; all are given the same
        // 2 s together, and one that lingers is killed, with its group.
        let waits = children.into_iter().map(|mut child| async move {
            child.stdin = None;
            let _ = tokio::time::timeout(Duration::from_secs(2), child.child.wait()).await;
        });
        futures::future::join_all(waits).await;
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
    async fn a_line_over_the_answer_limit_is_broken_and_replaces_the_child() {
        let h = ExecHandler::new(format!(
            "while read -r line; do head -c {} /dev/zero | tr '\\0' x; echo; done",
            MAX_ANSWER_BYTES + 1
        ));
        assert!(
            matches!(h.handle(&batch()).await, BatchOutcome::Failed(f) if f.retryable && f.error.contains("over")),
            "an endless line must not be read into memory, nor taken as noise"
        );
        assert_eq!(h.idle.lock().unwrap().len(), 0, "the child is not reused");
    }

    #[tokio::test]
    async fn a_childs_first_batch_gets_its_start_up_and_later_ones_the_timeout() {
        // Slow to start (1 s, a JVM's part), then quick once, then hangs.
        let h = ExecHandler::new(
            r#"sleep 1; read -r line; echo '{"batch_id":"t-0-1","failed":[]}'; read -r line; sleep 300"#,
        )
        .with_startup(Duration::from_millis(300), Duration::from_secs(30));
        assert_eq!(
            h.max_time(Duration::from_millis(300)),
            Duration::from_millis(30_300)
        );
        // The worker's limit: the timeout plus the start-up.
        let first =
            tokio::time::timeout(h.max_time(Duration::from_millis(300)), h.handle(&batch()))
                .await
                .expect("the first batch waits for the start-up");
        assert_eq!(first, BatchOutcome::Success);
        // The same child, past its start-up: the timeout alone, enforced by
        // the handler well before the worker's longer limit.
        let second = tokio::time::timeout(Duration::from_secs(10), h.handle(&batch()))
            .await
            .expect("the handler's own timeout, not the start-up allowance");
        assert!(
            matches!(second, BatchOutcome::Failed(f) if f.retryable && f.error.contains("timed out"))
        );
        assert_eq!(
            h.idle.lock().unwrap().len(),
            0,
            "the hung child is not reused"
        );
        assert_eq!(h.restarts().deaths, 0, "a timeout is not a death");
    }

    #[tokio::test]
    async fn a_child_started_long_before_its_first_batch_has_used_its_allowance() {
        let h = ExecHandler::new("while read -r line; do sleep 300; done")
            .with_startup(Duration::from_millis(300), Duration::from_secs(1));
        h.prepare(1).await;
        // The allowance counts from the child's start, not the batch's.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let outcome = tokio::time::timeout(Duration::from_secs(10), h.handle(&batch()))
            .await
            .expect("the handler's own timeout");
        assert!(
            matches!(&outcome, BatchOutcome::Failed(f) if f.error.contains("timed out after 300 ms")),
            "no allowance was left: {outcome:?}"
        );
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
