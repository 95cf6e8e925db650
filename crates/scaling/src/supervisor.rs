//! The single-machine autoscaler: runs `microbatch run` children and scales
//! them on lag.
//!
//! Each [`Supervisor::tick`] reaps children that died (restarting them with
//! a back-off that grows while they keep dying young, see
//! [`RestartBackoff`]), reads the group's lag, asks the policy for a replica
//! count and starts or stops children to match. A child that cannot be
//! started, or a timeline line that cannot be written, is logged and tried
//! again; it never stops the children that run. Stopping is SIGTERM (the worker drains
//! and commits); SIGKILL only once the drain deadline has passed. Children are
//! started with a parent-death signal, so they never outlive the supervisor.
//!
//! The supervisor is synchronous and must be driven from one long-lived
//! thread: the parent-death signal follows the thread that spawned a child.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use microbatch_kafka::LogThrottle;
use serde::Serialize;
use thiserror::Error;

use crate::observe::Observer;
use crate::policy::Policy;

#[derive(Debug, Error)]
pub enum SupervisorError {
    #[error("could not start a worker ({program}): {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("could not create the worker log {path}: {source}")]
    WorkerLog {
        path: String,
        source: std::io::Error,
    },
    #[error("could not write the timeline {path}: {source}")]
    Timeline {
        path: String,
        source: std::io::Error,
    },
}

/// How soon a crashed child is started again. The delay doubles (1 s, 2 s,
/// 4 s, … up to 60 s) while children die within [`RestartBackoff::STABLE`]
/// of their start, and falls back to 1 s once one has run that long: a
/// crash-looping worker costs a rebalance a minute, not one a second.
#[derive(Debug, Clone)]
pub struct RestartBackoff {
    next: Duration,
    /// The delay of the last failure, and when it ends.
    not_before: Option<(Duration, Instant)>,
}

impl Default for RestartBackoff {
    fn default() -> Self {
        Self {
            next: Self::INITIAL,
            not_before: None,
        }
    }
}

impl RestartBackoff {
    pub const INITIAL: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(60);
    /// A child that ran this long counts as healthy.
    pub const STABLE: Duration = Duration::from_secs(30);

    /// A child died (or could not be started) after running `ran_for`;
    /// returns the delay before the next start.
    pub fn on_failure(&mut self, now: Instant, ran_for: Duration) -> Duration {
        if ran_for >= Self::STABLE {
            self.next = Self::INITIAL;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        self.not_before = Some((delay, now + delay));
        delay
    }

    /// Whether a child may be started now.
    pub fn allows(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|(_, t)| now >= t)
    }

    /// The delay the last failure imposed, while it lasts.
    pub fn current_delay(&self, now: Instant) -> Duration {
        match self.not_before {
            Some((delay, t)) if now < t => delay,
            _ => Duration::ZERO,
        }
    }
}

/// How many children to start now, toward `target` with `running` running
/// and `to_restart` crashed and not yet replaced: the replacements wait for
/// the restart back-off (`restart_allowed`), while children beyond what ran
/// before the crash start at once. A crash of every child during an outage
/// then does not hold back the scale-up the backlog behind it asks for;
/// and since each new child that crashes becomes one to restart, a
/// crash-looping worker still starts at most `--max` children at once and
/// then waits out the back-off.
/// Returns (replacements, fresh).
pub fn children_to_start(
    running: u32,
    to_restart: u32,
    target: u32,
    restart_allowed: bool,
) -> (u32, u32) {
    let missing = target.saturating_sub(running);
    let replacements = missing.min(to_restart);
    let fresh = missing - replacements;
    (if restart_allowed { replacements } else { 0 }, fresh)
}

/// How to run and bound the children.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The `microbatch` binary.
    pub program: PathBuf,
    /// Arguments after `run`; `{n}` in any of them becomes the child's number
    /// (1, 2, …; never reused), e.g. `--audit-log w{n}.audit`.
    pub run_args: Vec<String>,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// SIGKILL a stopping child after this long (its drain deadline + margin).
    pub kill_after: Duration,
    /// Where each child's stderr goes (`worker-{n}.log`); inherited if unset.
    pub log_dir: Option<PathBuf>,
    /// JSON lines, one per tick.
    pub timeline: Option<PathBuf>,
    /// Environment for the children (connection settings, so secrets stay
    /// out of command lines).
    pub env: Vec<(String, String)>,
}

/// One tick's state, also written as a timeline line.
#[derive(Debug, Clone, Serialize)]
pub struct TimelinePoint {
    pub t_ms: u64,
    pub total_lag: i64,
    /// Children running (not counting those draining after a stop).
    pub replicas: u32,
    pub desired: u32,
    pub rate_per_replica: f64,
    pub arrival_per_sec: f64,
    pub processed_per_sec: f64,
    pub partition_lag: Vec<i64>,
    /// Records done so far: each partition's high watermark less its lag
    /// (the committed offset, or a share group's acknowledged position).
    pub done: i64,
    pub reason: String,
    /// Children that died or could not be started, so far.
    pub restarts: u32,
    /// The back-off before the next start, 0 when none is pending.
    pub restart_backoff_ms: u64,
    /// Workers whose capacity report is fresh, and what they say one fully
    /// busy replica does.
    pub workers_reporting: u32,
    pub capacity_per_replica: Option<f64>,
    /// Scale-ups held: replicas run and records wait, but no committed
    /// offset moves (a downstream outage); the reason says for how long.
    pub scale_up_held: bool,
    /// The term that bound `desired` (see [`crate::policy::Bound`]).
    pub bound_by: crate::policy::Bound,
}

struct Running {
    n: u32,
    child: Child,
    started: Instant,
}

struct Stopping {
    child: Child,
    kill_at: Instant,
}

pub struct Supervisor {
    config: SupervisorConfig,
    policy: Box<dyn Policy>,
    observer: Observer,
    running: Vec<Running>,
    stopping: Vec<Stopping>,
    next_n: u32,
    started: Instant,
    restarts: u32,
    backoff: RestartBackoff,
    /// Children that crashed (or could not be started) and are not yet
    /// replaced: they wait for the back-off.
    to_restart: u32,
    timeline: Option<std::io::BufWriter<std::fs::File>>,
    /// Whether the last timeline write failed (logged once per run of failures).
    timeline_failing: bool,
    /// Replica-seconds so far (integral of running children over time).
    pub replica_seconds: f64,
    last_tick: Instant,
    /// Lag read errors repeat every tick while they last (a missing topic).
    lag_error_log: LogThrottle,
}

impl Supervisor {
    pub fn new(
        config: SupervisorConfig,
        policy: Box<dyn Policy>,
        observer: Observer,
    ) -> Result<Self, SupervisorError> {
        let timeline = match &config.timeline {
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::File::create(path).map_err(|source| SupervisorError::Timeline {
                    path: path.display().to_string(),
                    source,
                })?,
            )),
            None => None,
        };
        let now = Instant::now();
        Ok(Self {
            config,
            policy,
            observer,
            running: Vec::new(),
            stopping: Vec::new(),
            next_n: 1,
            started: now,
            restarts: 0,
            backoff: RestartBackoff::default(),
            to_restart: 0,
            timeline,
            timeline_failing: false,
            replica_seconds: 0.0,
            last_tick: now,
            lag_error_log: LogThrottle::default(),
        })
    }

    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    pub fn replicas(&self) -> u32 {
        self.running.len() as u32
    }

    /// Process ids of the running children.
    pub fn pids(&self) -> Vec<u32> {
        self.running.iter().map(|r| r.child.id()).collect()
    }

    fn spawn(&mut self) -> Result<(), SupervisorError> {
        let n = self.next_n;
        self.next_n += 1;
        let mut cmd = Command::new(&self.config.program);
        cmd.arg("run");
        cmd.args(
            self.config
                .run_args
                .iter()
                .map(|a| a.replace("{n}", &n.to_string())),
        );
        cmd.envs(self.config.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        // A group of its own: Ctrl-C in the terminal reaches the supervisor
        // alone, which sends each worker one SIGTERM. A worker that also got
        // the terminal's SIGINT would be signalled twice.
        cmd.process_group(0);
        match &self.config.log_dir {
            Some(dir) => {
                let path = dir.join(format!("worker-{n}.log"));
                let file =
                    std::fs::File::create(&path).map_err(|source| SupervisorError::WorkerLog {
                        path: path.display().to_string(),
                        source,
                    })?;
                cmd.stderr(file);
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        // SAFETY: prctl is async-signal-safe; it only sets a flag on the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| SupervisorError::Spawn {
            program: self.config.program.display().to_string(),
            source,
        })?;
        tracing::info!(worker = n, pid = child.id(), "started worker");
        self.running.push(Running {
            n,
            child,
            started: Instant::now(),
        });
        Ok(())
    }

    /// Starts children up to `target` ([`children_to_start`]); a child that
    /// cannot be started counts as a failure and waits its turn.
    fn spawn_up_to(&mut self, now: Instant, target: u32) {
        // Crashed children no longer wanted are not restarted.
        self.to_restart = self
            .to_restart
            .min(target.saturating_sub(self.running.len() as u32));
        let (replacements, fresh) = children_to_start(
            self.running.len() as u32,
            self.to_restart,
            target,
            self.backoff.allows(now),
        );
        for i in 0..replacements + fresh {
            if i < replacements {
                self.to_restart -= 1;
            }
            if let Err(e) = self.spawn() {
                self.restarts += 1;
                self.to_restart += 1;
                let delay = self.backoff.on_failure(now, Duration::ZERO);
                tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "could not start a worker; the others keep running");
                // The same error awaits every other start: wait as well.
                break;
            }
        }
    }

    fn stop_newest(&mut self) {
        if let Some(mut r) = self.running.pop() {
            tracing::info!(
                worker = r.n,
                pid = r.child.id(),
                "stopping worker (SIGTERM)"
            );
            signal(&r.child, libc::SIGTERM);
            match r.child.try_wait() {
                Ok(Some(_)) => {}
                _ => self.stopping.push(Stopping {
                    child: r.child,
                    kill_at: Instant::now() + self.config.kill_after,
                }),
            }
        }
    }

    /// Kills one running child with SIGKILL (for failure demos and tests);
    /// it is restarted like any crashed child. Returns its pid.
    pub fn kill_one(&mut self, index: usize) -> Option<u32> {
        let len = self.running.len().max(1);
        let r = self.running.get_mut(index % len)?;
        let pid = r.child.id();
        tracing::warn!(worker = r.n, pid, "killing worker with SIGKILL");
        let _ = r.child.kill();
        Some(pid)
    }

    fn reap(&mut self, now: Instant) {
        let mut crashed = Vec::new();
        self.running.retain_mut(|r| match r.child.try_wait() {
            Ok(Some(status)) => {
                tracing::warn!(worker = r.n, %status, "worker exited unexpectedly; it will be restarted");
                crashed.push(now.saturating_duration_since(r.started));
                false
            }
            _ => true,
        });
        self.stopping.retain_mut(|s| match s.child.try_wait() {
            Ok(Some(_)) => false,
            _ => {
                if now >= s.kill_at {
                    tracing::warn!(
                        pid = s.child.id(),
                        "worker did not stop within its drain deadline; SIGKILL"
                    );
                    let _ = s.child.kill();
                    let _ = s.child.wait();
                    false
                } else {
                    true
                }
            }
        });
        for ran_for in crashed {
            self.restarts += 1;
            self.to_restart += 1;
            let delay = self.backoff.on_failure(now, ran_for);
            tracing::info!(
                ran_for_ms = ran_for.as_millis() as u64,
                restart_in_ms = delay.as_millis() as u64,
                "restart back-off"
            );
        }
    }

    /// One round: reap, measure, decide, scale. Lag read errors are logged
    /// and the replica count is left as it is (at least `--min`).
    pub fn tick(&mut self) -> Option<TimelinePoint> {
        let now = Instant::now();
        self.replica_seconds +=
            self.running.len() as f64 * now.duration_since(self.last_tick).as_secs_f64();
        self.last_tick = now;
        self.reap(now);
        let reading = match self.observer.read(false) {
            Ok(reading) => reading,
            Err(e) => {
                if let Some(suppressed) = self.lag_error_log.allow(now) {
                    tracing::warn!(error = %e, suppressed, "reading lag failed; keeping the replica count");
                }
                self.spawn_up_to(now, self.config.min_replicas);
                return None;
            }
        };
        if let Some(why) = reading.lag.unreadable() {
            // As KEDA's trigger would: no decision on a reading that cannot
            // tell where a partition is.
            if let Some(suppressed) = self.lag_error_log.allow(now) {
                tracing::warn!(suppressed, "{why}; keeping the replica count");
            }
            self.spawn_up_to(now, self.config.min_replicas);
            return None;
        }
        self.lag_error_log.reset();
        let current = self.running.len() as u32;
        let decision = self.policy.decide(now, &reading.observation(current));
        let desired = decision.desired.clamp(
            self.config.min_replicas,
            self.config.max_replicas.max(self.config.min_replicas),
        );
        self.spawn_up_to(now, desired);
        while self.running.len() as u32 > desired {
            self.stop_newest();
        }
        let point = TimelinePoint {
            t_ms: now.duration_since(self.started).as_millis() as u64,
            total_lag: reading.lag.total_lag,
            replicas: self.running.len() as u32,
            desired: decision.desired,
            rate_per_replica: self.policy.rate_per_replica().unwrap_or(0.0),
            arrival_per_sec: reading.rates.arrival_per_sec,
            processed_per_sec: reading.rates.processed_per_sec,
            partition_lag: reading.lag.partitions.iter().map(|p| p.lag).collect(),
            done: reading.lag.partitions.iter().map(|p| p.high - p.lag).sum(),
            reason: decision.reason,
            scale_up_held: decision.scale_up_held,
            bound_by: decision.bound_by,
            restarts: self.restarts,
            restart_backoff_ms: self.backoff.current_delay(now).as_millis() as u64,
            workers_reporting: reading.capacity.as_ref().map_or(0, |c| c.workers),
            capacity_per_replica: reading
                .capacity
                .as_ref()
                .and_then(|c| c.capacity_per_replica),
        };
        self.write_timeline(&point);
        Some(point)
    }

    /// Appends a timeline line; a failure is logged (once until a write
    /// succeeds again) and never stops the children.
    fn write_timeline(&mut self, point: &TimelinePoint) {
        let Some(out) = self.timeline.as_mut() else {
            return;
        };
        let line = serde_json::to_string(point).expect("a timeline point always serializes");
        match writeln!(out, "{line}").and_then(|_| out.flush()) {
            Ok(()) => self.timeline_failing = false,
            Err(source) if !self.timeline_failing => {
                self.timeline_failing = true;
                let e = SupervisorError::Timeline {
                    path: self
                        .config
                        .timeline
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    source,
                };
                tracing::error!(error = %e, "the workers keep running");
            }
            Err(_) => {}
        }
    }

    /// Stops every child: SIGTERM, then SIGKILL after the drain deadline.
    /// Returns once none is left.
    pub fn shutdown(&mut self) {
        while !self.running.is_empty() {
            self.stop_newest();
        }
        let deadline = Instant::now() + self.config.kill_after;
        while !self.stopping.is_empty() {
            let now = Instant::now();
            self.stopping.retain_mut(|s| match s.child.try_wait() {
                Ok(Some(_)) => false,
                _ if now >= deadline => {
                    let _ = s.child.kill();
                    let _ = s.child.wait();
                    false
                }
                _ => true,
            });
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we own and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replacements of crashed children wait for the back-off; a scale-up
    /// beyond what ran before does not.
    #[test]
    fn only_replacements_wait_for_the_back_off() {
        // 4 ran, all crashed, the policy now wants 8: 4 new at once, the 4
        // replacements after the back-off.
        assert_eq!(children_to_start(0, 4, 8, false), (0, 4));
        assert_eq!(children_to_start(0, 4, 8, true), (4, 4));
        // Next round, the 4 new ones running: the replacements still wait.
        assert_eq!(children_to_start(4, 4, 8, false), (0, 0));
        // Nothing crashed: a scale-up is never held.
        assert_eq!(children_to_start(2, 0, 5, false), (0, 3));
        // Fewer wanted than crashed: only replacements, all waiting.
        assert_eq!(children_to_start(1, 2, 3, false), (0, 0));
        assert_eq!(children_to_start(1, 2, 3, true), (2, 0));
        assert_eq!(children_to_start(5, 0, 3, true), (0, 0));
    }

    #[test]
    fn back_off_grows_while_children_die_young_and_resets_after_a_stable_run() {
        let mut b = RestartBackoff::default();
        let t0 = Instant::now();
        let young = Duration::from_millis(200);
        let delays: Vec<u64> = (0..8)
            .map(|i| b.on_failure(t0 + Duration::from_secs(i), young).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        // The last failure, at 7 s, holds starts until 67 s.
        let at = |s| t0 + Duration::from_secs(s);
        assert!(!b.allows(at(30)) && b.allows(at(67)));
        assert_eq!(b.current_delay(at(30)), Duration::from_secs(60));
        assert_eq!(b.current_delay(at(67)), Duration::ZERO);
        assert_eq!(b.on_failure(at(70), RestartBackoff::STABLE).as_secs(), 1);
        assert_eq!(b.on_failure(at(71), young).as_secs(), 2);
    }
}
