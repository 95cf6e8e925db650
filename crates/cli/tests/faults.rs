//! Broker faults injected with librdkafka's mock cluster: failed commits, a
//! broker going down, added latency. Nothing is lost, the log says what
//! happened and the metrics count it. (Fault injection exists only in the mock
//! cluster, so this test uses it in CI too; the chaos test does the same
//! against real Kafka.)

mod common;

use std::time::Duration;

use common::*;
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
    let (status, out, err) = run_to_end(&[
        "produce",
        "--bootstrap-servers",
        &bootstrap,
        "--topic",
        &topic,
        "--count",
        "3000",
        "--quiet",
    ]);
    assert!(status.success(), "{out}{err}");

    let port = free_port();
    let mut cmd = command();
    cmd.args([
        "run",
        "--bootstrap-servers",
        &bootstrap,
        "--topic",
        &topic,
        "--group",
        &group,
    ]);
    cmd.args(["--http-host", "127.0.0.1", "--http-port", &port.to_string()]);
    cmd.args([
        "--audit-log",
        dir.path("w.audit").to_str().unwrap(),
        "--process-time-ms",
        "3",
    ]);
    cmd.args(["--max-records", "20", "--commit-interval-ms", "200"]);
    let mut w = Proc::spawn(cmd, dir.path("w.stderr"));

    wait_until(Duration::from_secs(60), "some records processed", || {
        audited(&[dir.path("w.audit")]).len() >= 300
    });
    assert!(
        audited(&[dir.path("w.audit")]).len() < 3000,
        "faults start mid-run"
    );
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

    let lag = |mock_bootstrap: &str| -> i64 {
        let (status, out, err) = run_to_end(&[
            "lag",
            "--bootstrap-servers",
            mock_bootstrap,
            "--topic",
            &topic,
            "--group",
            &group,
            "--json",
        ]);
        assert!(status.success(), "{err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["total_lag"]
            .as_i64()
            .unwrap()
    };
    wait_until(Duration::from_secs(120), "lag 0 despite the faults", || {
        lag(&bootstrap) == 0
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
    let seen = audited(&[dir.path("w.audit")]);
    for p in 0..4 {
        let n = seen.keys().filter(|(part, _)| *part == p).count();
        assert!(n > 0, "partition {p} was processed");
    }
    assert_eq!(seen.len(), 3000, "every record was processed");
}
