//! A deterministic scaling simulator: the real policies (through
//! [`Policy::decide`]), the real rate tracker and the real capacity reports,
//! against a model of a consumer group on a virtual clock, so hours of load
//! run in milliseconds and the figures are the same on every machine.
//!
//! The model, per step of [`SimConfig::step`]:
//! - records arrive on each partition at the [`Shape`]'s rate (bursts land
//!   all at once, spread over the partitions);
//! - a replica is billed from the moment it is asked for, and works once it
//!   has started ([`SimConfig::startup`]); partitions are spread round-robin
//!   over the working replicas, and a partition that changes owner pauses
//!   for [`SimConfig::rebalance_pause`] (cooperative rebalancing);
//! - a working replica finishes up to [`SimConfig::capacity_per_replica`]
//!   records/s across its partitions, any one partition taking all of it
//!   (key ordering); its handler-busy fraction reads as if it could do
//!   [`SimConfig::reported_capacity_factor`] times that (handler time leaves
//!   out poll and commit overhead, so the workers' own figure runs high);
//! - offsets and the workers' capacity reports are committed every
//!   [`SimConfig::commit_interval`]; lag is high − committed;
//! - every [`SimConfig::poll_interval`] (the HPA's sync period) the policy
//!   decides and the replica count is set to its answer at once.
//!
//! With [`SimConfig::share`] the group is a share group: every working
//! replica takes from every partition, joins pause nothing, the policies
//! see the backlog with no partition cap, and at most one capacity report
//! per partition is read (the workers overwrite each other's on the
//! companion consumer group's partitions).
//!
//! Crashes ([`Shape::crash`]): the Deployment replaces each crashed pod
//! (billed on, working after [`SimConfig::startup`]). In a share group the
//! records it held ([`SimConfig::held_per_replica`], spread over the
//! partitions) stay locked for [`SimConfig::lock_duration`]: the share-
//! partition start offset stays below them, others take newer records, and
//! after the lock they are done again first. In a consumer group the dead
//! member keeps its partitions until [`SimConfig::session_timeout`], then
//! they move (paused for the rebalance) and their uncommitted records are
//! done again. A scale-down's SIGTERM releases what a replica holds, so
//! only crashes lock.
//!
//! Figures per run: replica-seconds, the worst lag in seconds (age of the
//! oldest uncommitted record on any partition), the time to drain a burst,
//! and the replicas held after a warm-up.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use microbatch_kafka::capacity_report::CapacityReport;
use serde::Serialize;

use crate::capacity::WorkerCapacity;
use crate::lag::{GroupLag, InvalidOffsetPolicy, PartitionLag, RateTracker};
use crate::policy::{
    HpaAlgorithm, KedaParams, KedaPolicy, Observation, Policy, RateParams, RatePolicy, ThroughHpa,
};

/// The group and the platform being simulated.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub partitions: usize,
    /// Records/s one replica really finishes with all its slots busy.
    pub capacity_per_replica: f64,
    /// How far the workers' busy-fraction estimate overshoots that.
    pub reported_capacity_factor: f64,
    pub startup: Duration,
    pub rebalance_pause: Duration,
    pub commit_interval: Duration,
    pub report_window: Duration,
    pub poll_interval: Duration,
    pub step: Duration,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// A burst counts as drained once no partition's oldest uncommitted
    /// record is older than this.
    pub drained_below: Duration,
    /// A share group (KIP-932): every working replica takes records from
    /// every partition (no assignment, no rebalance pause), nothing caps
    /// replicas at the partitions, and at most one capacity report per
    /// partition reaches the policy.
    pub share: bool,
    /// Records a share-group worker holds unacknowledged (acquired, in its
    /// batches): what a crash locks.
    pub held_per_replica: f64,
    /// `share.record.lock.duration.ms`.
    pub lock_duration: Duration,
    /// `session.timeout.ms` of a consumer group: how long a dead member
    /// keeps its partitions.
    pub session_timeout: Duration,
}

impl SimConfig {
    /// The seed's workers (8 slots, 0.1 s per record of batches of 10:
    /// 80 records/s each) on 8 partitions, up to `max_replicas`, in a share
    /// group or a consumer group.
    pub fn seed(share: bool, max_replicas: u32) -> Self {
        Self {
            capacity_per_replica: 80.0,
            max_replicas,
            share,
            // 8 slots of batches of 10.
            held_per_replica: 80.0,
            ..Self::default()
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            partitions: 8,
            capacity_per_replica: 1600.0,
            reported_capacity_factor: 1.1,
            startup: Duration::from_secs(5),
            rebalance_pause: Duration::from_secs(2),
            commit_interval: Duration::from_secs(1),
            report_window: Duration::from_secs(5),
            poll_interval: Duration::from_secs(15),
            step: Duration::from_millis(250),
            min_replicas: 1,
            max_replicas: 8,
            drained_below: Duration::from_secs(5),
            share: false,
            held_per_replica: 1600.0,
            lock_duration: Duration::from_secs(30),
            session_timeout: Duration::from_secs(45),
        }
    }
}

/// A load shape: arrival rate over time, and bursts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// 1,000/s for an hour: below one replica's 1,600/s.
    SteadyBelowOne,
    /// 5,600/s for an hour: 3.5 replicas' worth.
    SteadyAtThreeAndAHalf,
    /// A day: a sine from 200/s at night to 5,800/s at noon.
    Diurnal,
    /// 500/s rising to 9,000/s over an hour, then held for half an hour.
    Ramp,
    /// Idle, then 30,000 records at once at 5 min, then idle to 30 min.
    BurstOnIdle,
    /// 1,000/s, and 60,000 records at once at 10 min, to 40 min.
    BurstOnSteady,
    /// One partition at 1,200/s, the other seven at 50/s each, for an hour.
    HotPartition,
    /// 2,400/s for 30 min; from 10 min to 12 min the downstream is down:
    /// nothing finishes, nothing is committed, no worker reports.
    OutageOnSteady,
    /// [`Shape::BurstOnIdle`], and a third of the members crash 25 s after
    /// the burst (not in [`Shape::ALL`]: the share-group comparison's).
    CrashInBurst,
}

impl Shape {
    pub const ALL: [Shape; 8] = [
        Shape::SteadyBelowOne,
        Shape::SteadyAtThreeAndAHalf,
        Shape::Diurnal,
        Shape::Ramp,
        Shape::BurstOnIdle,
        Shape::BurstOnSteady,
        Shape::HotPartition,
        Shape::OutageOnSteady,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::SteadyBelowOne => "steady 1,000/s (0.6 replica)",
            Shape::SteadyAtThreeAndAHalf => "steady 5,600/s (3.5 replicas)",
            Shape::Diurnal => "diurnal sine 200..5,800/s, 24 h",
            Shape::Ramp => "ramp 500 -> 9,000/s over 1 h",
            Shape::BurstOnIdle => "burst of 30,000 on idle",
            Shape::BurstOnSteady => "burst of 60,000 on 1,000/s",
            Shape::HotPartition => "one hot partition (1,200/s + 7 x 50/s)",
            Shape::OutageOnSteady => "2 min downstream outage under 2,400/s",
            Shape::CrashInBurst => "burst of 30,000 on idle, a third crash 25 s in",
        }
    }

    pub fn duration(self) -> Duration {
        Duration::from_secs(match self {
            Shape::Diurnal => 24 * 3600,
            Shape::Ramp => 5400,
            Shape::BurstOnIdle | Shape::CrashInBurst => 1800,
            Shape::BurstOnSteady => 2400,
            Shape::OutageOnSteady => 1800,
            _ => 3600,
        })
    }

    /// Steady arrival rate, for shapes that have one.
    pub fn steady_rate(self) -> Option<f64> {
        match self {
            Shape::SteadyBelowOne => Some(1000.0),
            Shape::SteadyAtThreeAndAHalf => Some(5600.0),
            _ => None,
        }
    }

    /// Records/s arriving on `partition` of `partitions` at `t` seconds.
    fn rate(self, t: f64, partition: usize, partitions: usize) -> f64 {
        let even = |total: f64| total / partitions as f64;
        match self {
            Shape::SteadyBelowOne | Shape::BurstOnSteady => even(1000.0),
            Shape::SteadyAtThreeAndAHalf => even(5600.0),
            Shape::Diurnal => {
                let day = 24.0 * 3600.0;
                let phase = 2.0 * std::f64::consts::PI * t / day;
                even(3000.0 - 2800.0 * phase.cos())
            }
            Shape::Ramp => even(500.0 + 8500.0 * (t / 3600.0).min(1.0)),
            Shape::BurstOnIdle | Shape::CrashInBurst => 0.0,
            Shape::OutageOnSteady => even(2400.0),
            Shape::HotPartition => {
                if partition == 0 {
                    1200.0
                } else {
                    50.0
                }
            }
        }
    }

    /// A burst: when, and how many records.
    pub fn burst(self) -> Option<(f64, f64)> {
        match self {
            Shape::BurstOnIdle | Shape::CrashInBurst => Some((300.0, 30_000.0)),
            Shape::BurstOnSteady => Some((600.0, 60_000.0)),
            _ => None,
        }
    }

    /// A downstream outage: from when, until when (seconds).
    pub fn outage(self) -> Option<(f64, f64)> {
        match self {
            Shape::OutageOnSteady => Some((600.0, 720.0)),
            _ => None,
        }
    }

    /// A crash: when (seconds), and the fraction of the replicas (rounded
    /// up) that crash then.
    pub fn crash(self) -> Option<(f64, f64)> {
        match self {
            Shape::CrashInBurst => Some((325.0, 1.0 / 3.0)),
            _ => None,
        }
    }

    /// When a backlog starts to be drained: a burst lands, or an outage ends.
    fn drain_from(self) -> Option<f64> {
        self.burst()
            .map(|(at, _)| at)
            .or(self.outage().map(|(_, end)| end))
    }
}

/// What one run cost and how it served.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub replica_seconds: f64,
    pub worst_lag_seconds: f64,
    /// From the burst (or the outage's end) until no partition lags more
    /// than `drained_below`.
    pub drain_seconds: Option<f64>,
    pub peak_replicas: u32,
    /// The most replicas held after [`WARMUP`].
    pub max_replicas_after_warmup: u32,
    /// The worst lag in seconds after [`WARMUP`].
    pub worst_lag_seconds_after_warmup: f64,
    /// Replicas asked for during the outage beyond those running when it
    /// began (shapes with an outage).
    pub added_during_outage: Option<u32>,
    /// Records done a second time after a crash (locked records of a share
    /// group, uncommitted records of a consumer group).
    pub redone_records: f64,
}

struct Replica {
    id: u32,
    works_from: f64,
    /// Records finished in the current report window.
    done_in_window: f64,
    report: Option<CapacityReport>,
}

struct PartitionState {
    high: f64,
    done: f64,
    committed: i64,
    owner: Option<u32>,
    paused_until: f64,
    /// (time, cumulative high) after each step's arrivals, oldest first.
    arrivals: VecDeque<(f64, f64)>,
    /// Records a crashed share-group member held: to be done again, from
    /// `redo_from` on; until then nothing at or above `redo_floor` counts
    /// as acknowledged.
    redo: f64,
    redo_from: f64,
    redo_floor: f64,
}

impl PartitionState {
    /// Locked records that are available again at `now`.
    fn redoable(&self, now: f64) -> f64 {
        if now >= self.redo_from {
            self.redo
        } else {
            0.0
        }
    }

    /// Age of the oldest record not committed.
    fn lag_seconds(&self, now: f64) -> f64 {
        if self.committed as f64 >= self.high.floor() {
            return 0.0;
        }
        let c = self.committed as f64;
        self.arrivals
            .iter()
            .find(|(_, cumulative)| *cumulative > c)
            .map_or(0.0, |(t, _)| now - t)
    }
}

/// Learning plus one scale-down window: what a count "holds" is judged after it.
pub const WARMUP: f64 = 600.0;

/// Cooperative-sticky in miniature: partitions keep a live owner while it
/// holds no more than its share (⌈P/n⌉ for the first P mod n owners, else
/// ⌊P/n⌋); the rest go to the owners with the fewest.
fn sticky_assignment(current: &[Option<u32>], members: &[u32]) -> Vec<Option<u32>> {
    if members.is_empty() {
        return vec![None; current.len()];
    }
    let n = members.len();
    let base = current.len() / n;
    let extra = current.len() % n;
    let quota = |rank: usize| base + usize::from(rank < extra);
    let mut held: HashMap<u32, usize> = HashMap::new();
    let mut out = vec![None; current.len()];
    // Members that keep the most go first to the larger quotas.
    let mut keep_order: Vec<u32> = members.to_vec();
    keep_order
        .sort_by_key(|m| std::cmp::Reverse(current.iter().filter(|o| **o == Some(*m)).count()));
    let quotas: HashMap<u32, usize> = keep_order
        .iter()
        .enumerate()
        .map(|(rank, m)| (*m, quota(rank)))
        .collect();
    for (i, owner) in current.iter().enumerate() {
        if let Some(o) = owner {
            if let Some(q) = quotas.get(o) {
                let h = held.entry(*o).or_default();
                if *h < *q {
                    *h += 1;
                    out[i] = Some(*o);
                }
            }
        }
    }
    for slot in out.iter_mut().filter(|o| o.is_none()) {
        let m = *keep_order
            .iter()
            .min_by_key(|m| {
                let h = held.get(m).copied().unwrap_or(0);
                (h >= quotas[m], h)
            })
            .expect("members is not empty");
        *held.entry(m).or_default() += 1;
        *slot = Some(m);
    }
    out
}

/// Runs `shape` under `policy`.
pub fn run(shape: Shape, policy: &mut dyn Policy, cfg: &SimConfig) -> Outcome {
    let origin = Instant::now();
    let dt = cfg.step.as_secs_f64();
    let end = shape.duration().as_secs_f64();
    let mut parts: Vec<PartitionState> = (0..cfg.partitions)
        .map(|_| PartitionState {
            high: 0.0,
            done: 0.0,
            committed: 0,
            owner: None,
            paused_until: 0.0,
            arrivals: VecDeque::new(),
            redo: 0.0,
            redo_from: 0.0,
            redo_floor: 0.0,
        })
        .collect();
    let mut replicas: Vec<Replica> = Vec::new();
    let mut next_id = 0;
    let add = |replicas: &mut Vec<Replica>, next_id: &mut u32, t: f64, n: u32| {
        for _ in 0..n {
            replicas.push(Replica {
                id: *next_id,
                works_from: t + cfg.startup.as_secs_f64(),
                done_in_window: 0.0,
                report: None,
            });
            *next_id += 1;
        }
    };
    add(
        &mut replicas,
        &mut next_id,
        -cfg.startup.as_secs_f64(),
        cfg.min_replicas.max(1),
    );
    let mut tracker = RateTracker::default();
    let mut out = Outcome {
        replica_seconds: 0.0,
        worst_lag_seconds: 0.0,
        drain_seconds: None,
        peak_replicas: replicas.len() as u32,
        max_replicas_after_warmup: 0,
        worst_lag_seconds_after_warmup: 0.0,
        added_during_outage: None,
        redone_records: 0.0,
    };
    // Crashed consumer-group members and when their session expires.
    let mut dead: Vec<(u32, f64)> = Vec::new();
    let mut crashed = false;
    let burst = shape.burst();
    let outage = shape.outage();
    let in_outage = |t: f64| outage.is_some_and(|(from, to)| t >= from && t < to);
    let mut at_outage_start: Option<u32> = None;
    let drain_from = shape.drain_from();
    let mut burst_done = false;
    // Each partition's high watermark just after the burst.
    let mut burst_mark: Vec<i64> = Vec::new();
    let mut working_ids: Vec<u32> = Vec::new();
    let mut owned: HashMap<u32, Vec<usize>> = HashMap::new();
    // Polls fall between commits, as they do on a real clock.
    let (mut next_commit, mut next_report, mut next_poll) =
        (0.0, 0.0, cfg.commit_interval.as_secs_f64() / 2.0);
    let mut t = 0.0;
    while t < end {
        if let Some((at, fraction)) = shape.crash() {
            if !crashed && t >= at {
                crashed = true;
                // Of the members (replicas that have started).
                let members: Vec<u32> = replicas
                    .iter()
                    .filter(|r| r.works_from <= t)
                    .map(|r| r.id)
                    .collect();
                let n = (members.len() as f64 * fraction).ceil() as usize;
                let gone: Vec<u32> = members.iter().rev().take(n).copied().collect();
                replicas.retain(|r| !gone.contains(&r.id));
                for id in &gone {
                    if cfg.share {
                        let held = cfg.held_per_replica / parts.len() as f64;
                        for p in parts.iter_mut() {
                            p.redo_floor = if p.redo > 0.0 {
                                p.redo_floor
                            } else {
                                (p.done - held).max(p.committed as f64)
                            };
                            p.redo += held;
                            p.redo_from = t + cfg.lock_duration.as_secs_f64();
                        }
                    } else {
                        // What it did since its last commit is lost: the
                        // next owner starts at the committed offset.
                        for p in parts.iter_mut().filter(|p| p.owner == Some(*id)) {
                            out.redone_records += p.done - p.committed as f64;
                            p.done = p.committed as f64;
                        }
                        dead.push((*id, t + cfg.session_timeout.as_secs_f64()));
                    }
                }
                // The Deployment replaces each crashed pod.
                add(&mut replicas, &mut next_id, t, n as u32);
            }
        }
        dead.retain(|(_, until)| *until > t);
        // Membership and assignment: a dead member of a consumer group
        // holds its partitions until its session expires.
        let mut working: Vec<u32> = replicas
            .iter()
            .filter(|r| r.works_from <= t)
            .map(|r| r.id)
            .chain(dead.iter().map(|(id, _)| *id))
            .collect();
        working.sort_unstable();
        if cfg.share {
            // Every member takes from every partition; joining pauses no one.
            if working != working_ids {
                working_ids = working.clone();
                owned = working
                    .iter()
                    .map(|id| (*id, (0..parts.len()).collect()))
                    .collect();
            }
        } else if working != working_ids {
            working_ids = working.clone();
            let owners =
                sticky_assignment(&parts.iter().map(|p| p.owner).collect::<Vec<_>>(), &working);
            owned.clear();
            for (i, (p, owner)) in parts.iter_mut().zip(owners).enumerate() {
                if owner != p.owner {
                    p.owner = owner;
                    p.paused_until = t + cfg.rebalance_pause.as_secs_f64();
                }
                if let Some(o) = owner {
                    owned.entry(o).or_default().push(i);
                }
            }
        }
        // Processing: each working replica shares its capacity over its
        // partitions with backlog, handing what one cannot use to the others.
        for r in replicas
            .iter_mut()
            .filter(|r| r.works_from <= t && !in_outage(t))
        {
            let mut budget = cfg.capacity_per_replica * dt;
            let mine = owned.get(&r.id).map(Vec::as_slice).unwrap_or_default();
            for _ in 0..mine.len() {
                let open: Vec<usize> = mine
                    .iter()
                    .copied()
                    .filter(|i| {
                        let p = &parts[*i];
                        p.paused_until <= t && (p.redoable(t) > 1e-9 || p.high - p.done > 1e-9)
                    })
                    .collect();
                if open.is_empty() || budget <= 1e-9 {
                    break;
                }
                let share = budget / open.len() as f64;
                for i in open {
                    let p = &mut parts[i];
                    // Records back from a lock are delivered first.
                    let again = share.min(p.redoable(t));
                    p.redo -= again;
                    out.redone_records += again;
                    let take = (share - again).min(p.high - p.done);
                    p.done += take;
                    budget -= again + take;
                    r.done_in_window += again + take;
                }
            }
        }
        // Arrivals (processed from the next step on).
        for (i, p) in parts.iter_mut().enumerate() {
            p.high += shape.rate(t, i, cfg.partitions) * dt;
        }
        if let Some(at) = drain_from {
            if !burst_done && t >= at {
                burst_done = true;
                if let Some((_, records)) = burst {
                    for p in parts.iter_mut() {
                        p.high += records / cfg.partitions as f64;
                    }
                }
                burst_mark = parts.iter().map(|p| p.high.floor() as i64).collect();
            }
        }
        for p in parts.iter_mut() {
            p.arrivals.push_back((t, p.high));
        }
        // Capacity reports close every window; a worker that finishes
        // nothing commits nothing, so no report reaches the group.
        if t >= next_report {
            next_report += cfg.report_window.as_secs_f64();
            let window = cfg.report_window.as_secs_f64();
            let reported = cfg.capacity_per_replica * cfg.reported_capacity_factor;
            if in_outage(t) {
                // The window's work so far is never reported.
                replicas.iter_mut().for_each(|r| r.done_in_window = 0.0);
            }
            let reporting = replicas
                .iter_mut()
                .filter(|r| r.works_from <= t && !in_outage(t));
            for r in reporting {
                let rate = r.done_in_window / window;
                r.report = Some(CapacityReport {
                    worker: format!("sim-{}", r.id),
                    at_unix_ms: (t * 1000.0) as u64,
                    window: cfg.report_window,
                    busy_fraction: (rate / reported).min(1.0),
                    processed_per_sec: rate,
                    slots: 4,
                    held: None,
                    held_by: None,
                });
                r.done_in_window = 0.0;
            }
        }
        if t >= next_commit {
            next_commit += cfg.commit_interval.as_secs_f64();
            for p in parts.iter_mut() {
                if p.redo <= 1e-9 {
                    p.redo = 0.0;
                }
                let acked = if p.redo > 0.0 {
                    p.done.min(p.redo_floor)
                } else {
                    p.done
                };
                p.committed = acked.floor() as i64;
                let c = p.committed as f64;
                while p.arrivals.len() > 1 && p.arrivals[1].1 <= c {
                    p.arrivals.pop_front();
                }
            }
        }
        // Figures.
        let worst = parts.iter().map(|p| p.lag_seconds(t)).fold(0.0, f64::max);
        out.worst_lag_seconds = out.worst_lag_seconds.max(worst);
        if t >= WARMUP {
            out.worst_lag_seconds_after_warmup = out.worst_lag_seconds_after_warmup.max(worst);
            out.max_replicas_after_warmup =
                out.max_replicas_after_warmup.max(replicas.len() as u32);
        }
        if let Some(at) = drain_from {
            let past_burst = burst_done
                && parts
                    .iter()
                    .zip(&burst_mark)
                    .all(|(p, mark)| p.committed >= *mark);
            if past_burst && out.drain_seconds.is_none() && worst <= cfg.drained_below.as_secs_f64()
            {
                out.drain_seconds = Some(t - at);
            }
        }
        if in_outage(t) {
            let start = *at_outage_start.get_or_insert(replicas.len() as u32);
            let added = (replicas.len() as u32).saturating_sub(start);
            out.added_during_outage = Some(out.added_during_outage.unwrap_or(0).max(added));
        }
        out.replica_seconds += replicas.len() as f64 * dt;
        out.peak_replicas = out.peak_replicas.max(replicas.len() as u32);
        // The policy's turn.
        if t >= next_poll {
            next_poll += cfg.poll_interval.as_secs_f64();
            let now = origin + Duration::from_secs_f64(t);
            let mut lag = GroupLag::new(
                "sim",
                "sim",
                parts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        PartitionLag::compute(
                            i as i32,
                            Some(p.committed),
                            0,
                            p.high.floor() as i64,
                            InvalidOffsetPolicy::Earliest,
                        )
                    })
                    .collect(),
            );
            lag.shared = cfg.share;
            let rates = tracker.observe(now, &lag);
            // A share group's workers overwrite each other's reports on the
            // companion group's partitions: at most one per partition.
            let visible = if cfg.share {
                cfg.partitions
            } else {
                usize::MAX
            };
            let metadata: Vec<String> = replicas
                .iter()
                .filter_map(|r| r.report.as_ref().map(CapacityReport::encode))
                .take(visible)
                .collect();
            let capacity = WorkerCapacity::from_metadata(
                metadata.iter().map(String::as_str),
                (t * 1000.0) as u64,
            );
            let decision = policy.decide(
                now,
                &Observation {
                    lag: &lag,
                    rates,
                    capacity: capacity.as_ref(),
                    current: replicas.len() as u32,
                },
            );
            let desired = decision
                .desired
                .clamp(cfg.min_replicas, cfg.max_replicas.max(cfg.min_replicas));
            let n = replicas.len() as u32;
            if desired > n {
                add(&mut replicas, &mut next_id, t, desired - n);
            } else {
                replicas.truncate(desired as usize);
            }
        }
        t += dt;
    }
    out
}

/// The policies the simulator compares, as the README names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PolicyCase {
    /// `rate` applied as it answers (`supervise`).
    Rate,
    /// `rate` through KEDA and the HPA (`microbatch scaler`): its answer is
    /// a metric the HPA applies with its tolerance, scale-down window and
    /// scale-up limit, as the kit's ScaledObject selects them.
    RateThroughHpa,
    /// KEDA with the replaced system's lagThreshold 3.
    KedaThreshold3,
    /// KEDA with lagThreshold = [`TUNED_LAG_THRESHOLD`].
    KedaTuned,
}

/// A tuned lagThreshold: the lag one replica clears in about a second.
pub const TUNED_LAG_THRESHOLD: i64 = 1600;

impl PolicyCase {
    pub const ALL: [PolicyCase; 4] = [
        PolicyCase::Rate,
        PolicyCase::RateThroughHpa,
        PolicyCase::KedaThreshold3,
        PolicyCase::KedaTuned,
    ];

    pub fn name(self) -> String {
        match self {
            PolicyCase::Rate => "rate".into(),
            PolicyCase::RateThroughHpa => "rate via the HPA".into(),
            PolicyCase::KedaThreshold3 => "keda lagThreshold 3".into(),
            PolicyCase::KedaTuned => format!("keda lagThreshold {TUNED_LAG_THRESHOLD}"),
        }
    }

    /// The policy with the defaults `supervise` and the HPA use.
    pub fn policy(self, cfg: &SimConfig) -> Box<dyn Policy> {
        let keda = |lag_threshold| {
            Box::new(KedaPolicy::new(KedaParams {
                lag_threshold,
                activation_lag_threshold: 0,
                min_replicas: cfg.min_replicas,
                max_replicas: cfg.max_replicas,
                offset_reset_latest: false,
                // As the kit's ScaledObject, which spells out a behavior.
                hpa: HpaAlgorithm::WithBehavior,
                ..KedaParams::default()
            })) as Box<dyn Policy>
        };
        let rate = RateParams {
            target_drain: TARGET_DRAIN,
            min_replicas: cfg.min_replicas,
            max_replicas: cfg.max_replicas,
            scale_down_stabilization: Duration::from_secs(300),
            ..RateParams::default()
        };
        match self {
            PolicyCase::Rate => Box::new(RatePolicy::new(rate)),
            PolicyCase::RateThroughHpa => Box::new(ThroughHpa::new(
                // As `microbatch scaler` serves it.
                Box::new(RatePolicy::new(rate.served_through_hpa())),
                // As the kit's ScaledObject, which spells out a behavior.
                HpaAlgorithm::WithBehavior,
                (cfg.min_replicas, cfg.max_replicas),
            )),
            PolicyCase::KedaThreshold3 => keda(3),
            PolicyCase::KedaTuned => keda(TUNED_LAG_THRESHOLD),
        }
    }
}

/// The rate policy's `--target-drain-seconds` in the simulation.
pub const TARGET_DRAIN: Duration = Duration::from_secs(30);

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub shape: Shape,
    pub policy: PolicyCase,
    pub outcome: Outcome,
}

/// Every shape under every policy.
pub fn table(cfg: &SimConfig) -> Vec<Row> {
    let mut rows = Vec::new();
    for shape in Shape::ALL {
        for policy in PolicyCase::ALL {
            let mut p = policy.policy(cfg);
            let outcome = run(shape, p.as_mut(), cfg);
            rows.push(Row {
                shape,
                policy,
                outcome,
            });
        }
    }
    rows
}

/// The table as Markdown.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| load shape | policy | replica-seconds | peak replicas | most after 10 min | worst lag (s) | time to drain (s) |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let o = &r.outcome;
        s.push_str(&format!(
            "| {} | {} | {:.0} | {} | {} | {:.1} | {} |\n",
            r.shape.name(),
            r.policy.name(),
            o.replica_seconds,
            o.peak_replicas,
            o.max_replicas_after_warmup,
            o.worst_lag_seconds,
            o.drain_seconds
                .map_or_else(|| "-".to_string(), |d| format!("{d:.0}")),
        ));
    }
    s
}
