//! Broker faults injected with librdkafka's mock cluster: failed commits, a
//! broker going down, added latency, a final commit refused. Nothing is lost, the log says what
//! happened and the metrics count it. (Fault injection exists only in the mock
//! cluster, so this test uses it in CI too; the chaos test does the same
//! against real Kafka.) The evidence comes from outside the worker, as on
//! real Kafka: what the recording exec handler's processes finished, and the
//! group's committed offsets read from the mock cluster with `microbatch lag`.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::harness::*;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

#[test]
fn injected_broker_faults_lose_nothing_and_are_counted() {
    let mock = MockCluster::new(3).expect("mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let dir = TestDir::new("faults");
    let topic = unique("faults");
    let group = unique("g");
    mock.create_topic(&topic, 4, 1).unwrap();
    // The mock cluster cannot create topics through the admin API.
    mock.create_topic(&format!("{topic}.dlq"), 1, 1).unwrap();
    produce_on(&bootstrap, &topic, 3000, &[]);

    let port = free_port();
    let handler = recording_handler(
        &dir,
        HandlerBehaviour {
            ms_per_record: 3,
            ..HandlerBehaviour::default()
        },
    );
    let mut cmd = command();
    cmd.args(["run", "--bootstrap-servers", &bootstrap]);
    cmd.args(["--handler", "exec", "--command", &handler]);
    let extra = ["--max-records", "20"];
    let mut w = spawn_worker_with(cmd, &dir, "w", &topic, &group, port, &extra);

    wait_until(Duration::from_secs(60), "some records processed", || {
        handled(&dir).len() >= 300
    });
    assert!(handled(&dir).len() < 3000, "faults start mid-run");
    // Commits fail a few times (an error the client does not retry itself).
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_COMMIT_OFFSET_SIZE; 4],
    );
    // Latency on every broker, then one broker down for a while.
    for id in 1..=3 {
        mock.broker_round_trip_time(id, Duration::from_millis(300))
            .unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    mock.broker_down(2).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    mock.broker_up(2).unwrap();
    for id in 1..=3 {
        mock.broker_round_trip_time(id, Duration::ZERO).unwrap();
    }

    wait_until(Duration::from_secs(120), "lag 0 despite the faults", || {
        lag_json_on(&bootstrap, &topic, &group)["total_lag"] == 0
    });
    let (_, metrics) = http_get(port, "/metrics").expect("metrics");
    let failed_commits =
        labelled_metric(&metrics, "microbatch_commits_total{result=\"error\"}").unwrap_or(0.0);
    assert!(
        failed_commits >= 1.0,
        "failed commits are counted: {metrics}"
    );
    assert!(
        labelled_metric(&metrics, "microbatch_commits_total{result=\"ok\"}").unwrap_or(0.0) >= 1.0
    );
    w.signal(15);
    assert!(
        w.wait_for_exit(Duration::from_secs(60)).unwrap().success(),
        "{}",
        w.stderr()
    );
    let log = w.stderr();
    assert!(
        log.contains("offset commit failed"),
        "the log says commits failed: {log}"
    );
    let seen = handled(&dir);
    for p in 0..4 {
        let n = seen.keys().filter(|(part, _)| *part == p).count();
        assert!(n > 0, "partition {p} was processed");
    }
    let (expected, _) = assert_recorded_or_dead_on(
        &bootstrap,
        &topic,
        &group,
        &handled_files(&dir),
        &BTreeSet::new(),
    );
    assert_eq!(expected, 3000, "every record was handled");
}

/// A final commit the group coordinator refuses (REBALANCE_IN_PROGRESS, as
/// when other workers stop at the same moment and the group rebalances) is
/// tried again before the worker leaves, so the next owner does not run
/// finished records again. A refusal no rebalance ends is not.
#[test]
fn a_refused_final_commit_is_tried_again_before_the_worker_leaves() {
    let mock = MockCluster::new(1).expect("mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let topic = unique("final-commit");
    mock.create_topic(&topic, 2, 1).unwrap();
    produce_on(&bootstrap, &topic, 300, &[]);
    // A worker of `group` handles all 300 records and commits nothing
    // before its final commit, which meets `refusals`; returns the worker's
    // log and its handler's files.
    let stop_with_refused_commits = |group: &str, refusals: &[RDKafkaRespErr]| {
        let dir = TestDir::new("final-commit");
        let handler = recording_handler(&dir, HandlerBehaviour::default());
        let mut cmd = command();
        cmd.args(["run", "--bootstrap-servers", &bootstrap, "--topic", &topic])
            .args(["--group", group, "--group-protocol", "classic"])
            .args(["--handler", "exec", "--command", &handler, "--dlq", "off"])
            .args(["--http-host", "127.0.0.1", "--http-port", "0"])
            .args(["--commit-interval-ms", "600000"]);
        let mut w = Proc::spawn(cmd, dir.path(&format!("{group}.stderr")));
        wait_until(Duration::from_secs(60), "300 records handled", || {
            handled(&dir).len() == 300
        });
        mock.request_errors(RDKafkaApiKey::OffsetCommit, refusals);
        w.terminate();
        (w.stderr(), dir)
    };

    let group = unique("g");
    let (log, dir) = stop_with_refused_commits(
        &group,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; 3],
    );
    let (n, twice) = assert_recorded_or_dead_on(
        &bootstrap,
        &topic,
        &group,
        &handled_files(&dir),
        &BTreeSet::new(),
    );
    assert_eq!((n, twice), (300, 0));
    assert!(log.contains("the final commit was refused"), "{log}");

    // A refusal that stays: the worker leaves without trying again.
    let group = unique("g");
    let (log, _) = stop_with_refused_commits(
        &group,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 50],
    );
    assert!(!log.contains("the final commit was refused"), "{log}");
    mock.clear_request_errors(RDKafkaApiKey::OffsetCommit);
    let lag = lag_json_on(&bootstrap, &topic, &group);
    assert_eq!(lag["total_lag"], 300, "nothing committed: {lag}");
}

/// A group coordinator that moves (a broker restarted: NOT_COORDINATOR,
/// then COORDINATOR_LOAD_IN_PROGRESS while it loads the offsets) is asked
/// again within `lag`'s timeout, not reported as an error: `lag`, and the
/// scaler reading the same way, failed in the chaos run after a restart.
#[test]
fn lag_asks_again_while_the_group_coordinator_moves() {
    let mock = MockCluster::new(1).expect("mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let topic = unique("coordinator");
    let group = unique("g");
    mock.create_topic(&topic, 2, 1).unwrap();
    produce_on(&bootstrap, &topic, 40, &[]);
    mock.request_errors(
        RDKafkaApiKey::OffsetFetch,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
        ],
    );
    let lag = lag_json_on(&bootstrap, &topic, &group);
    assert_eq!(lag["total_lag"], 40, "{lag}");
}
