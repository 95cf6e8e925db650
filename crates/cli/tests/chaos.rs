//! Chaos: workers killed with SIGKILL again and again and the broker restarted
//! while records keep arriving; at the end every offset was processed at least
//! once and committed lag is 0. The only test in its binary, because it
//! restarts the shared broker (test binaries run one after another).

mod common;

use std::time::{Duration, Instant};

use common::*;

const RECORDS: u64 = 50_000;
const WORKERS: usize = 3;

#[test]
fn sigkill_storm_and_a_broker_restart_lose_nothing() {
    let dir = TestDir::new("chaos");
    let topic = unique("chaos");
    let group = unique("g");
    create_topic(&topic, 8);
    create_topic(&format!("{topic}.dlq"), 1);

    // Records arrive for the whole run, about 50 s.
    let mut producer_cmd = command();
    producer_cmd.args([
        "produce",
        "--bootstrap-servers",
        broker().bootstrap(),
        "--topic",
        &topic,
    ]);
    producer_cmd.args([
        "--count",
        &RECORDS.to_string(),
        "--rate",
        "1000",
        "--keys",
        "1000",
        "--quiet",
    ]);
    let mut producer = Proc::spawn(producer_cmd, dir.path("producer.stderr"));

    let extra = [
        "--process-time-ms",
        "1",
        "--max-records",
        "20",
        "--concurrency",
        "4",
        "--kafka-property",
        "session.timeout.ms=6000",
        "--kafka-property",
        "heartbeat.interval.ms=1500",
    ];
    let mut incarnation = 0;
    let mut audits = Vec::new();
    let spawn = |incarnation: &mut usize, audits: &mut Vec<std::path::PathBuf>| {
        *incarnation += 1;
        let name = format!("w{incarnation}");
        audits.push(dir.path(&format!("{name}.audit")));
        spawn_worker(&dir, &name, &topic, &group, free_port(), &extra)
    };
    let mut workers: Vec<Proc> = (0..WORKERS)
        .map(|_| spawn(&mut incarnation, &mut audits))
        .collect();

    let started = Instant::now();
    let mut kills = 0;
    let mut restarted_broker = false;
    let mut seed = std::process::id() as u64;
    while kills < 10 || !restarted_broker {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "chaos phase took too long"
        );
        std::thread::sleep(Duration::from_millis(2500 + seed % 2000));
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if kills == 5 && !restarted_broker {
            eprintln!("restarting the broker at {:?}", started.elapsed());
            restart_broker(Duration::from_secs(2));
            restarted_broker = true;
            continue;
        }
        let victim = (seed >> 33) as usize % workers.len();
        workers[victim].signal(9);
        workers[victim]
            .wait_for_exit(Duration::from_secs(30))
            .expect("SIGKILL ends a worker");
        kills += 1;
        workers[victim] = spawn(&mut incarnation, &mut audits);
    }
    eprintln!(
        "{kills} kills and a broker restart in {:?}",
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
    for w in &workers {
        w.signal(15);
    }
    for w in &mut workers {
        let status = w
            .wait_for_exit(Duration::from_secs(60))
            .expect("workers exit on SIGTERM");
        assert!(status.success(), "{}", w.stderr());
    }
    let (expected, duplicates) = assert_all_processed(&topic, &group, &audits);
    assert_eq!(expected as u64, RECORDS);
    assert_eq!(total_lag(&topic, &group), 0);
    eprintln!(
        "chaos: {expected} records, {kills} SIGKILLs, 1 broker restart, {duplicates} duplicates ({:.2}%)",
        duplicates as f64 * 100.0 / expected as f64
    );
}
