//! Chaos: while records keep arriving, workers are killed with SIGKILL again
//! and again, the group scales up and down, the broker is restarted, and the
//! handler fails: 1% of records are poison (failed for good), 1% fail at
//! random (retryable), and the dead-letter topic does not exist beforehand.
//! At the end every record was recorded by the handler process itself or is
//! in the dead-letter topic, which holds exactly the poison records, and the
//! committed lag is 0. Half the workers run with the defaults, half with
//! a records cap; each SIGKILL's replay is checked against the bound its
//! worker ran under.
//!
//! A second run puts what real deployments add on top: records of mixed
//! sizes up to 1 MB, an HTTP downstream that redirects for a while and
//! recovers, and one tenant's keys failing (503) while the rest succeed.
//!
//! Both restart the broker, so they hold one lock and run one at a time;
//! test binaries run one after another.

// The harness of `tests/it`; this binary uses part of it.
#[allow(dead_code, unused_imports)]
#[path = "it/harness/mod.rs"]
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

use harness::*;

const RECORDS: u64 = 50_000;
const WORKERS: usize = 3;
const MAX_RECORDS: u64 = 20;
const CONCURRENCY: u64 = 4;
/// What `spawn_worker` sets.
const COMMIT_INTERVAL_MS: u64 = 200;
const RATE: u64 = 1_000;
/// One commit interval of a worker's share of the arrival rate: the most
/// finished records a SIGKILL of a capped worker may replay beside those in
/// flight (`--max-uncommitted-records`).
const REPLAY_CAP: u64 = RATE * COMMIT_INTERVAL_MS / 1000 / WORKERS as u64;

/// How a worker bounds what a SIGKILL replays: half run with the defaults
/// (the time limit, `--max-uncommitted-ms` unset: 1.5 commit intervals), half
/// with the records cap as well, so both bounds are tried in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    Default,
    RecordsCap,
}

impl Bound {
    /// Workers `w1`, `w3`, ... run with the defaults, `w2`, `w4`, ... capped;
    /// a replacement keeps its victim's kind.
    fn of_first(incarnation: usize) -> Self {
        if incarnation % 2 == 1 {
            Bound::Default
        } else {
            Bound::RecordsCap
        }
    }
}

/// The broker is restarted by each test: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A dead worker's partitions move on sooner: the client's setting under
/// the classic protocol; the broker's (scripts/kafka-local.sh) under KIP-848.
fn short_session() -> &'static [&'static str] {
    if classic_protocol() {
        &[
            "--kafka-property",
            "session.timeout.ms=6000",
            "--kafka-property",
            "heartbeat.interval.ms=1500",
        ]
    } else {
        &[]
    }
}

#[test]
fn sigkills_scaling_a_broker_restart_and_failures_lose_nothing() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TestDir::new("chaos");
    let topic = unique("chaos");
    let dlq = format!("{topic}.dlq");
    let group = unique("g");
    create_topic(&topic, 8);

    // Records arrive for the whole run, about 50 s.
    let mut producer = produce_steadily(
        &dir,
        &topic,
        RECORDS,
        RATE,
        &["--keys", "1000", "--poison-every", "100"],
    );

    let handler = recording_handler(
        &dir,
        HandlerBehaviour {
            failure_rate: 0.01,
            ms_per_record: 0,
        },
    );
    let replay_cap = REPLAY_CAP.to_string();
    let extra = [
        "--handler",
        "exec",
        "--command",
        &handler,
        "--max-records",
        &MAX_RECORDS.to_string(),
        "--concurrency",
        &CONCURRENCY.to_string(),
        "--retry-initial-ms",
        "20",
    ];
    let session = short_session();
    let extra: Vec<&str> = extra.iter().chain(session).copied().collect();
    let capped: Vec<&str> = extra
        .iter()
        .copied()
        .chain(["--max-uncommitted-records", replay_cap.as_str()])
        .collect();
    let mut incarnation = 0;
    let spawn = |incarnation: &mut usize, bound: Bound| {
        *incarnation += 1;
        let name = format!("w{incarnation}");
        let args = match bound {
            Bound::Default => &extra,
            Bound::RecordsCap => &capped,
        };
        let worker = spawn_worker(&dir, &name, &topic, &group, free_port(), args);
        (name, bound, worker)
    };
    let mut workers: Vec<(String, Bound, Proc)> = (1..=WORKERS)
        .map(|i| spawn(&mut incarnation, Bound::of_first(i)))
        .collect();
    // The bound each worker ran under, by name.
    let mut bounds: BTreeMap<String, Bound> =
        workers.iter().map(|(n, b, _)| (n.clone(), *b)).collect();

    let started = Instant::now();
    let mut kills = 0;
    let mut restarted_broker = false;
    let mut scaled_up = false;
    let mut scaled_down = false;
    let mut seed = std::process::id() as u64;
    // (when, what) of every disruption, to tell whose duplicates are whose.
    let mut events: Vec<(f64, String)> = Vec::new();
    // (when, whom) of every SIGKILL.
    let mut killed: Vec<(f64, String)> = Vec::new();
    while kills < 10 || !restarted_broker || !scaled_down {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "chaos phase took too long"
        );
        std::thread::sleep(Duration::from_millis(2500 + seed % 2000));
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if kills == 2 && !scaled_up {
            eprintln!("scaling up to {} at {:?}", WORKERS + 1, started.elapsed());
            events.push((unix_now(), "scale-up".into()));
            let added = spawn(&mut incarnation, Bound::RecordsCap);
            bounds.insert(added.0.clone(), added.1);
            workers.push(added);
            scaled_up = true;
            continue;
        }
        if kills == 5 && !restarted_broker {
            eprintln!("restarting the broker at {:?}", started.elapsed());
            events.push((unix_now(), "broker restart".into()));
            restart_broker(Duration::from_secs(2));
            restarted_broker = true;
            continue;
        }
        if kills == 8 && !scaled_down {
            eprintln!("scaling down to {WORKERS} at {:?}", started.elapsed());
            let (_, _, mut leaving) = workers.pop().expect("a worker to stop");
            events.push((unix_now(), "scale-down (SIGTERM)".into()));
            leaving.signal(15);
            let status = leaving
                .wait_for_exit(Duration::from_secs(60))
                .expect("SIGTERM ends a worker");
            assert!(status.success(), "{}", leaving.stderr());
            scaled_down = true;
            continue;
        }
        // Kills alternate between the two kinds of worker.
        let kind = if kills % 2 == 0 {
            Bound::Default
        } else {
            Bound::RecordsCap
        };
        let of_kind: Vec<usize> = (0..workers.len())
            .filter(|&i| workers[i].1 == kind)
            .collect();
        let victim = of_kind[(seed >> 33) as usize % of_kind.len()];
        let at = unix_now();
        events.push((at, format!("SIGKILL {}", kills + 1)));
        killed.push((at, workers[victim].0.clone()));
        workers[victim].2.signal(9);
        workers[victim]
            .2
            .wait_for_exit(Duration::from_secs(30))
            .expect("SIGKILL ends a worker");
        kills += 1;
        workers[victim] = spawn(&mut incarnation, kind);
        bounds.insert(workers[victim].0.clone(), kind);
    }
    eprintln!(
        "{kills} kills, a scale-up, a scale-down and a broker restart in {:?}",
        started.elapsed()
    );

    let status = producer
        .wait_for_exit(Duration::from_secs(180))
        .expect("the producer finishes");
    assert!(
        status.success(),
        "every record was produced: {}",
        producer.stderr()
    );
    wait_for_lag_zero(&topic, &group, Duration::from_secs(300));
    for (_, _, w) in &workers {
        w.signal(15);
    }
    for (_, _, w) in &mut workers {
        let status = w
            .wait_for_exit(Duration::from_secs(60))
            .expect("workers exit on SIGTERM");
        assert!(status.success(), "{}", w.stderr());
    }
    let poison = poison_offsets(&topic);
    assert_eq!(poison.len() as u64, RECORDS / 100);
    assert_eq!(
        dead_lettered(&dlq),
        poison,
        "exactly the poison records are dead-lettered"
    );
    let (expected, duplicates) =
        assert_recorded_or_dead(&topic, &group, &handled_files(&dir), &poison);
    assert_eq!(expected as u64, RECORDS);
    assert_eq!(total_lag(&topic, &group), 0);
    // What a SIGKILL may replay.
    // - A worker with the defaults: the time limit (--max-uncommitted-ms
    //   unset, 1.5 commit intervals). Once a partition's finished work has
    //   waited that long for its commit, the partition starts no new batch,
    //   so what the dead worker had finished of each partition and another
    //   did again lies in one window: the limit from the last acknowledged
    //   commit, and once more from when the watermark last moved while a
    //   record held it, plus 0.1 s for the batches in flight. Retries and
    //   the batch that holds the watermark may always start, so at most one
    //   set of slots in all may lie outside those windows. The limit bounds
    //   time, not records: how many lie inside depends on how fast the
    //   worker went (catching up after the broker restart, thousands a
    //   second).
    // - A capped worker: the batches in flight plus the cap, and one batch
    //   more when it logged the cap's last resort.
    let in_flight = CONCURRENCY * MAX_RECORDS;
    let per_kill = in_flight + REPLAY_CAP;
    let limit = COMMIT_INTERVAL_MS as f64 * 1.5 / 1000.0;
    let window = 2.0 * limit + 0.1;
    let last_resort = |whom: &str| {
        std::fs::read_to_string(dir.path(&format!("{whom}.stderr")))
            .unwrap_or_default()
            .contains(microbatch_core::pipeline::RECORDS_CAP_LAST_RESORT)
    };
    // Each duplicate belongs to the last disruption before it was handled again.
    let again = redelivery_times(&handled_files(&dir));
    let mut per_event = vec![0usize; events.len()];
    for t in &again {
        if let Some(i) = events.iter().rposition(|(at, _)| at <= t) {
            per_event[i] += 1;
        }
    }
    let t0 = events.first().map_or(0.0, |(at, _)| *at);
    for ((at, what), n) in events.iter().zip(&per_event) {
        eprintln!(
            "chaos: +{:.1} s {what}: {n} records handled twice after it",
            at - t0
        );
    }
    // What the dead worker itself had finished and another did again after
    // the SIGKILL. (Its records done again before it died were handed over
    // in a rebalance; they count to that, above.)
    let by_worker = first_handlers(&handled_files(&dir));
    let mut over = Vec::new();
    let mut kill_counts = Vec::new();
    for (at, whom) in &killed {
        let FirstHandled { replayed } = by_worker.get(whom).cloned().unwrap_or_default();
        let before = replayed.iter().filter(|(_, _, again)| again < at).count();
        // When each record done again after the kill was first finished,
        // by partition.
        let mut by_partition: BTreeMap<i32, Vec<f64>> = BTreeMap::new();
        for (partition, first, again) in replayed {
            if again >= *at {
                by_partition.entry(partition).or_default().push(first);
            }
        }
        let n: u64 = by_partition.values().map(|t| t.len() as u64).sum();
        let inside: u64 = by_partition
            .values_mut()
            .map(|times| {
                times.sort_by(f64::total_cmp);
                densest_window(times, window) as u64
            })
            .sum();
        let outside = n - inside;
        let (within, bound) = match bounds[whom] {
            Bound::Default => (
                outside <= in_flight,
                format!(
                    "default bound: all but at most {in_flight} within {window:.1} s per partition"
                ),
            ),
            Bound::RecordsCap => {
                let cap = per_kill + if last_resort(whom) { MAX_RECORDS } else { 0 };
                (
                    n <= cap,
                    format!("records cap: at most {cap} = in flight {in_flight} + {REPLAY_CAP}"),
                )
            }
        };
        if !within {
            over.push((whom.clone(), n, outside, bound.clone()));
        }
        kill_counts.push((bounds[whom], n));
        eprintln!(
            "chaos: SIGKILL of {whom} at +{:.1} s: {n} of its records handled again after it \
             ({inside} finished within {window:.1} s of each other per partition, {outside} outside; \
             {bound}; within: {within}; \
             {before} handed over and done again before it)",
            at - t0,
        );
    }
    eprintln!(
        "chaos: {expected} records, {kills} SIGKILLs, 1 scale-up, 1 scale-down, 1 broker restart, \
         {duplicates} duplicates ({:.2}%); per SIGKILL {kill_counts:?}",
        duplicates as f64 * 100.0 / expected as f64,
    );
    assert!(
        over.is_empty(),
        "SIGKILLs replayed more of the dead worker's finished records than its bound \
         ((worker, replayed, outside the window, bound)): {over:?}"
    );
}

/// Records of the second run, and their rate: about 40 s of them.
const MIXED_RECORDS: u64 = 3_000;
const MIXED_RATE: u64 = 75;
const TENANTS: u64 = 10;
/// Keys are `tenant-N/kM`: this tenant's keys fail while its shard is out.
const FAILING_TENANT: &str = "tenant-3/";
/// While the downstream redirects, and while the tenant's shard is out,
/// from the first record produced.
const REDIRECTING: (f64, f64) = (6.0, 12.0);
const TENANT_OUT: (f64, f64) = (15.0, 33.0);
/// The fewest answers of each phase.
const PHASE_ANSWERS: u64 = 10;

/// Record `i`: its key and value. Every 100th is poison (its value holds
/// POISON, which the downstream refuses for good); sizes are mixed: most
/// 300 bytes, every 13th 100 kB, every 97th and every third poison record
/// 1 MB.
fn mixed_record(i: u64) -> (String, Vec<u8>) {
    let poison = i % 100 == 42;
    let size = if i % 97 == 5 || i % 300 == 42 {
        1_000_000
    } else if i.is_multiple_of(13) {
        100_000
    } else {
        300
    };
    let mut value = format!("{i} {}", if poison { "POISON " } else { "" }).into_bytes();
    value.resize(size, b'x');
    (format!("tenant-{}/k{}", i % TENANTS, i % 500), value)
}

/// What the test's HTTP downstream did.
#[derive(Default)]
struct DownstreamCounts {
    redirected: AtomicU64,
    refused_for_the_tenant: AtomicU64,
    accepted: AtomicU64,
}

/// An HTTP downstream on a free port that answers 301 to everything while
/// `REDIRECTING`, 503 to any batch holding a record of `FAILING_TENANT`
/// while `TENANT_OUT`, refuses poison records for good, and writes every
/// record it accepts to `log` (its own record, outside the worker). Each
/// phase lasts until its end and [`PHASE_ANSWERS`] answers at least: a
/// rebalance after a SIGKILL can leave no batch in a window (a run saw no
/// request during the 6 s of redirects).
fn mixed_downstream(t0: Instant, log: PathBuf) -> (u16, Arc<DownstreamCounts>) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let counts = Arc::new(DownstreamCounts::default());
    let shared = counts.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let counts = shared.clone();
            let log = log.clone();
            std::thread::spawn(move || {
                let Some(body) = read_http_body(&stream) else {
                    return;
                };
                let now = t0.elapsed().as_secs_f64();
                let within = |(from, to): (f64, f64), answered: &AtomicU64| {
                    now >= from && (now < to || answered.load(Ordering::SeqCst) < PHASE_ANSWERS)
                };
                let batch: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let records = batch["records"].as_array().cloned().unwrap_or_default();
                let (status, extra, answer) = if within(REDIRECTING, &counts.redirected) {
                    counts.redirected.fetch_add(1, Ordering::SeqCst);
                    let to = format!("Location: http://127.0.0.1:{port}/moved\r\n");
                    ("301 Moved Permanently", to, String::new())
                } else if within(TENANT_OUT, &counts.refused_for_the_tenant)
                    && records.iter().any(|r| {
                        r["key"]
                            .as_str()
                            .is_some_and(|k| k.starts_with(FAILING_TENANT))
                    })
                {
                    counts.refused_for_the_tenant.fetch_add(1, Ordering::SeqCst);
                    ("503 Service Unavailable", String::new(), String::new())
                } else {
                    let poison = |r: &serde_json::Value| {
                        r["value"].as_str().is_some_and(|v| v.contains("POISON"))
                    };
                    let failed: Vec<serde_json::Value> = records
                        .iter()
                        .filter(|r| poison(r))
                        .map(|r| {
                            serde_json::json!({"partition": r["partition"], "offset": r["offset"],
                                "error": "poison", "retryable": false})
                        })
                        .collect();
                    let accepted: String = records
                        .iter()
                        .filter(|r| !poison(r))
                        .map(|r| format!("{} {}\n", r["partition"], r["offset"]))
                        .collect();
                    let mut file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)
                        .unwrap();
                    file.write_all(accepted.as_bytes()).unwrap();
                    counts.accepted.fetch_add(1, Ordering::SeqCst);
                    let answer = serde_json::json!({ "failed": failed }).to_string();
                    ("200 OK", String::new(), answer)
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            });
        }
    });
    (port, counts)
}

/// Produces [`mixed_record`]s at `MIXED_RATE` from another thread, with
/// Kafka's own client settings for 1 MB records; returns when the first
/// is sent.
fn produce_mixed(topic: &str) -> std::thread::JoinHandle<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker().bootstrap())
        .set("message.max.bytes", "2000000")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let topic = topic.to_owned();
    std::thread::spawn(move || {
        let started = Instant::now();
        for i in 0..MIXED_RECORDS {
            let due = started + Duration::from_secs_f64(i as f64 / MIXED_RATE as f64);
            while Instant::now() < due {
                producer.poll(due.saturating_duration_since(Instant::now()));
            }
            let (key, value) = mixed_record(i);
            let mut record = BaseRecord::<String, Vec<u8>>::to(&topic)
                .key(&key)
                .payload(&value);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        producer.poll(Duration::from_millis(50));
                    }
                }
            }
        }
        producer
            .flush(Duration::from_secs(180))
            .expect("every record produced");
    })
}

/// Mixed sizes up to 1 MB, a downstream that redirects for 6 s, one
/// tenant's shard out for 18 s while the other nine succeed, SIGKILLs and a
/// broker restart: lag 0, every record accepted by the downstream or
/// dead-lettered, and the dead-letter topic holds exactly the poison
/// records: nothing dead-lettered for the redirect or the tenant's outage.
#[test]
fn mixed_sizes_a_redirecting_downstream_and_a_failing_tenant_lose_nothing() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TestDir::new("chaos-mixed");
    let topic = unique("chaos-mixed");
    let dlq = format!("{topic}.dlq");
    let group = unique("g");
    create_topic_with_configs(&topic, 8, &[("max.message.bytes", "2097152")]);
    let log = dir.path("downstream.txt");
    let t0 = Instant::now();
    let (port, counts) = mixed_downstream(t0, log.clone());
    let url = format!("http://127.0.0.1:{port}/batch");
    let producer = produce_mixed(&topic);
    let session = short_session();
    let mut extra = vec![
        "--handler",
        "http",
        "--url",
        &url,
        "--health-scope",
        "key-prefix:/",
        "--max-records",
        "20",
        "--concurrency",
        "4",
        "--retry-initial-ms",
        "20",
    ];
    extra.extend_from_slice(session);
    let mut incarnation = 0;
    let mut spawn = || {
        incarnation += 1;
        let name = format!("w{incarnation}");
        spawn_worker(&dir, &name, &topic, &group, free_port(), &extra)
    };
    let mut workers: Vec<Proc> = (0..3).map(|_| spawn()).collect();
    let at = |secs: f64| {
        let due = t0 + Duration::from_secs_f64(secs);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    };
    // SIGKILLs before, inside the redirect and inside the tenant's outage,
    // and the broker restarted inside the tenant's outage.
    for (when, victim) in [(4.0, 0), (9.0, 1), (18.0, 2)] {
        at(when);
        eprintln!(
            "chaos-mixed: SIGKILL at +{:.1} s",
            t0.elapsed().as_secs_f64()
        );
        workers[victim].signal(9);
        workers[victim]
            .wait_for_exit(Duration::from_secs(30))
            .expect("SIGKILL ends a worker");
        workers[victim] = spawn();
    }
    at(22.0);
    eprintln!(
        "chaos-mixed: broker restart at +{:.1} s",
        t0.elapsed().as_secs_f64()
    );
    restart_broker(Duration::from_secs(2));
    at(27.0);
    workers[0].signal(9);
    workers[0]
        .wait_for_exit(Duration::from_secs(30))
        .expect("SIGKILL ends a worker");
    workers[0] = spawn();
    producer.join().expect("the producer finishes");
    wait_for_lag_zero(&topic, &group, Duration::from_secs(300));
    for w in &workers {
        w.signal(15);
    }
    for w in &mut workers {
        let status = w
            .wait_for_exit(Duration::from_secs(60))
            .expect("workers exit on SIGTERM");
        assert!(status.success(), "{}", w.stderr());
    }
    let redirected = counts.redirected.load(Ordering::SeqCst);
    let refused = counts.refused_for_the_tenant.load(Ordering::SeqCst);
    eprintln!(
        "chaos-mixed: {redirected} batches redirected, {refused} refused for {FAILING_TENANT}, {} accepted",
        counts.accepted.load(Ordering::SeqCst)
    );
    assert!(
        redirected > 0,
        "the downstream redirected while the run went on"
    );
    assert!(
        refused > 0,
        "the tenant's shard refused batches while the run went on"
    );
    let poison = poison_offsets(&topic);
    assert_eq!(poison.len() as u64, MIXED_RECORDS / 100);
    assert_eq!(
        dead_lettered(&dlq),
        poison,
        "exactly the poison records are dead-lettered: none for the redirect or the tenant's outage"
    );
    let (expected, duplicates) = assert_recorded_or_dead(&topic, &group, &[log], &poison);
    assert_eq!(
        expected as u64, MIXED_RECORDS,
        "every record was produced once"
    );
    eprintln!(
        "chaos-mixed: {expected} records, {} poison dead-lettered, {duplicates} duplicates ({:.2}%), lag 0",
        poison.len(),
        duplicates as f64 * 100.0 / expected as f64
    );
}

/// Of the records each worker ([`harness::handled_by`]) finished first,
/// those another handling did again later.
#[derive(Debug, Default, Clone)]
struct FirstHandled {
    /// (partition, first finished, handled again) of each.
    pub replayed: Vec<(i32, f64, f64)>,
}

fn first_handlers(paths: &[PathBuf]) -> BTreeMap<String, FirstHandled> {
    let lines = handled_lines(paths);
    // (who, when, counted as replayed yet) of each record's first handling.
    let mut first: BTreeMap<(i32, i64), (String, f64, bool)> = BTreeMap::new();
    let mut out: BTreeMap<String, FirstHandled> = BTreeMap::new();
    for (t, key, worker) in lines {
        match first.get_mut(&key) {
            Some((by, at, counted)) => {
                if !*counted {
                    *counted = true;
                    out.entry(by.clone())
                        .or_default()
                        .replayed
                        .push((key.0, *at, t));
                }
            }
            None => {
                first.insert(key, (worker, t, false));
            }
        }
    }
    out
}

/// The most of `times` (sorted) inside any window of `width` seconds.
fn densest_window(times: &[f64], width: f64) -> usize {
    let mut best = 0;
    let mut start = 0;
    for (end, t) in times.iter().enumerate() {
        while times[start] < t - width {
            start += 1;
        }
        best = best.max(end + 1 - start);
    }
    best
}

/// When each record was handled again after its first time, from the
/// `partition offset unix-seconds` lines of [`harness::recording_handler`]'s files.
fn redelivery_times(paths: &[PathBuf]) -> Vec<f64> {
    let mut first: BTreeSet<(i32, i64)> = BTreeSet::new();
    handled_lines(paths)
        .into_iter()
        .filter(|(_, key, _)| !first.insert(*key))
        .map(|(t, _, _)| t)
        .collect()
}

/// Every `partition offset unix-seconds` line of [`harness::recording_handler`]'s
/// files, with the worker that wrote it ([`harness::handled_by`]), oldest first.
fn handled_lines(paths: &[PathBuf]) -> Vec<(f64, (i32, i64), String)> {
    let mut lines: Vec<(f64, (i32, i64), String)> = Vec::new();
    for p in paths {
        let worker = handled_by(p);
        for line in std::fs::read_to_string(p).unwrap_or_default().lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let [p, o, t] = f[..] {
                let key = (p.parse().unwrap(), o.parse().unwrap());
                lines.push((t.parse().unwrap(), key, worker.clone()));
            }
        }
    }
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    lines
}

/// Seconds since the Unix epoch, as the handler's records have them.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
