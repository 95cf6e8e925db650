//! Share groups through a broker restart: while records keep arriving,
//! `microbatch run --share-group` workers lose their broker for a few
//! seconds; at the end every record was recorded by the handler process
//! itself, and Kafka's own share-groups tool says the group has nothing
//! left. The only test in its binary, because it restarts the broker (test
//! binaries run one after another).

// The harness of `tests/it`; this binary uses part of it.
#[allow(dead_code, unused_imports)]
#[path = "it/harness/mod.rs"]
mod harness;

use std::time::Duration;

use harness::*;

const RECORDS: u64 = 4_000;

#[test]
fn share_workers_lose_nothing_through_a_broker_restart() {
    let b = broker();
    if !b.is_real() {
        assert!(!in_ci(), "share groups need the real broker under CI");
        eprintln!("skipped: share groups need a real broker (run scripts/test.sh)");
        return;
    }
    let bootstrap = b.bootstrap().to_string();
    let s = Scenario::new("share-restart", 4);
    let group = unique("share-restart-group");
    let handler = recording_handler(
        &s.dir,
        HandlerBehaviour {
            failure_rate: 0.0,
            ms_per_record: 2,
        },
    );
    let mut workers: Vec<Proc> = (0..3)
        .map(|i| {
            spawn_share_worker(
                &s.dir,
                &format!("w{i}"),
                &s.topic,
                &group,
                0,
                &[
                    "--handler",
                    "exec",
                    "--command",
                    &handler,
                    "--concurrency",
                    "2",
                    "--max-records",
                    "10",
                ],
            )
        })
        .collect();
    let mut producer = s.produce_steadily(RECORDS, 200, &[]);
    // Mid-run: some records handled, most still to come.
    wait_until(Duration::from_secs(60), "the first records handled", || {
        handled(&s.dir).len() >= 500
    });
    restart_broker(Duration::from_secs(3));
    producer
        .wait_for_exit(Duration::from_secs(120))
        .expect("the producer finished");
    wait_until(
        Duration::from_secs(120),
        "the share group's backlog to reach 0",
        || {
            let lag = share_group_lag(&bootstrap, &group);
            lag.len() == 4 && lag.values().all(|l| *l == 0)
        },
    );
    for w in &mut workers {
        w.terminate();
        assert!(
            !w.stderr().contains("panicked"),
            "a worker panicked:\n{}",
            w.stderr()
        );
    }
    let seen = handled(&s.dir);
    let all: Vec<(i32, i64)> = read_topic(&s.topic, &bootstrap)
        .into_iter()
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(all.len() as u64, RECORDS, "the producer wrote every record");
    for r in &all {
        assert!(
            seen.contains_key(r),
            "{}/{} lost through the restart",
            r.0,
            r.1
        );
    }
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "broker restart: {} records handled, {duplicates} twice",
        all.len()
    );
}
