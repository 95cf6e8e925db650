//! The single-machine autoscaler: runs `microbatch run` children and scales
//! them on lag.
//!
//! Each [`Supervisor::tick`] reaps children that died (restarting them with
//! back-off), reads the group's lag, asks the policy for a replica count and
//! starts or stops children to match. Stopping is SIGTERM (the worker drains
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

use serde::Serialize;
use thiserror::Error;

use crate::lag::{GroupLag, InvalidOffsetPolicy, LagReader, RateTracker, Rates};
use crate::policy::{Decision, KedaPolicy, RatePolicy};

#[derive(Debug, Error)]
pub enum SupervisorError {
    #[error("could not start a worker ({program}): {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("could not write the timeline {path}: {source}")]
    Timeline {
        path: String,
        source: std::io::Error,
    },
}

/// Which policy decides.
pub enum Policy {
    Keda(KedaPolicy),
    Rate(RatePolicy),
}

impl Policy {
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Keda(_) => "keda",
            Policy::Rate(_) => "rate",
        }
    }

    /// Evaluates the policy; `rates` feeds the rate policy's measurement.
    pub fn decide(
        &mut self,
        now: Instant,
        lag: &GroupLag,
        rates: Rates,
        current: u32,
    ) -> (Decision, f64) {
        match self {
            Policy::Keda(k) => (k.evaluate(now, lag, current), 0.0),
            Policy::Rate(r) => {
                r.observe(now, rates.processed_per_sec, current, lag.total_lag);
                let d = r.evaluate(now, lag, rates.arrival_per_sec, current);
                (d, r.rate_per_replica())
            }
        }
    }
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
    pub invalid_offset: InvalidOffsetPolicy,
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
    pub reason: String,
    pub restarts: u32,
}

struct Running {
    n: u32,
    child: Child,
}

struct Stopping {
    child: Child,
    kill_at: Instant,
}

pub struct Supervisor {
    config: SupervisorConfig,
    policy: Policy,
    reader: LagReader,
    rates: RateTracker,
    running: Vec<Running>,
    stopping: Vec<Stopping>,
    next_n: u32,
    started: Instant,
    restarts: u32,
    restart_backoff: Duration,
    restart_not_before: Instant,
    timeline: Option<std::io::BufWriter<std::fs::File>>,
    /// Replica-seconds so far (integral of running children over time).
    pub replica_seconds: f64,
    last_tick: Instant,
}

impl Supervisor {
    pub fn new(
        config: SupervisorConfig,
        policy: Policy,
        reader: LagReader,
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
            reader,
            rates: RateTracker::default(),
            running: Vec::new(),
            stopping: Vec::new(),
            next_n: 1,
            started: now,
            restarts: 0,
            restart_backoff: Duration::from_secs(1),
            restart_not_before: now,
            timeline,
            replica_seconds: 0.0,
            last_tick: now,
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
        match &self.config.log_dir {
            Some(dir) => {
                let file = std::fs::File::create(dir.join(format!("worker-{n}.log"))).map_err(
                    |source| SupervisorError::Spawn {
                        program: self.config.program.display().to_string(),
                        source,
                    },
                )?;
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
        self.running.push(Running { n, child });
        Ok(())
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

    fn reap(&mut self, now: Instant) -> Result<(), SupervisorError> {
        let mut crashed = 0;
        self.running.retain_mut(|r| match r.child.try_wait() {
            Ok(Some(status)) => {
                tracing::warn!(worker = r.n, %status, "worker exited unexpectedly; it will be restarted");
                crashed += 1;
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
        if crashed > 0 {
            self.restarts += crashed;
            if now >= self.restart_not_before {
                self.restart_backoff = Duration::from_secs(1);
            } else {
                self.restart_backoff = (self.restart_backoff * 2).min(Duration::from_secs(30));
            }
            self.restart_not_before = now + self.restart_backoff;
        }
        Ok(())
    }

    /// One round: reap, measure, decide, scale. Lag read errors are logged
    /// and the replica count is left as it is.
    pub fn tick(&mut self) -> Result<Option<TimelinePoint>, SupervisorError> {
        let now = Instant::now();
        self.replica_seconds +=
            self.running.len() as f64 * now.duration_since(self.last_tick).as_secs_f64();
        self.last_tick = now;
        self.reap(now)?;
        let lag = match self.reader.read(self.config.invalid_offset) {
            Ok(lag) => lag,
            Err(e) => {
                tracing::warn!(error = %e, "reading lag failed; keeping the replica count");
                while (self.running.len() as u32) < self.config.min_replicas {
                    self.spawn()?;
                }
                return Ok(None);
            }
        };
        let rates = self.rates.observe(now, &lag);
        let current = self.running.len() as u32;
        let (decision, rate_per_replica) = self.policy.decide(now, &lag, rates, current);
        let desired = decision.desired.clamp(
            self.config.min_replicas,
            self.config.max_replicas.max(self.config.min_replicas),
        );
        // Crashed children come back no sooner than their back-off allows;
        // scale-ups the policy asks for are not delayed.
        let crashed_gap = now < self.restart_not_before && self.restarts > 0;
        while (self.running.len() as u32) < desired {
            if crashed_gap && self.running.len() as u32 >= current {
                break;
            }
            self.spawn()?;
        }
        while self.running.len() as u32 > desired {
            self.stop_newest();
        }
        let point = TimelinePoint {
            t_ms: now.duration_since(self.started).as_millis() as u64,
            total_lag: lag.total_lag,
            replicas: self.running.len() as u32,
            desired: decision.desired,
            rate_per_replica,
            arrival_per_sec: rates.arrival_per_sec,
            processed_per_sec: rates.processed_per_sec,
            partition_lag: lag.partitions.iter().map(|p| p.lag).collect(),
            reason: decision.reason,
            restarts: self.restarts,
        };
        if let Some(out) = self.timeline.as_mut() {
            let line = serde_json::to_string(&point).expect("a timeline point always serializes");
            writeln!(out, "{line}")
                .and_then(|_| out.flush())
                .map_err(|source| SupervisorError::Timeline {
                    path: self
                        .config
                        .timeline
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    source,
                })?;
        }
        Ok(Some(point))
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
