//! `microbatch supervise` on real Kafka: replicas rise on a burst, lag drains,
//! replicas fall back to the minimum after the (shortened) window, and a
//! child killed mid-run loses nothing.

mod common;

use std::time::Duration;

use common::*;

fn timeline(path: &std::path::Path) -> Vec<serde_json::Value> {
    read(path)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn supervise(dir: &TestDir, topic: &str, group: &str, policy: &[&str]) -> Proc {
    let mut cmd = command();
    cmd.args([
        "supervise",
        "--bootstrap-servers",
        broker().bootstrap(),
        "--topic",
        topic,
        "--group",
        group,
    ]);
    cmd.args([
        "--min",
        "1",
        "--max",
        "6",
        "--scale-down-seconds",
        "4",
        "--polling-interval-ms",
        "500",
    ]);
    cmd.args(["--http-port", "0", "--drain-timeout-ms", "5000"]);
    cmd.args(["--timeline", dir.path("timeline.jsonl").to_str().unwrap()]);
    cmd.args(["--log-dir", dir.0.to_str().unwrap()]);
    cmd.args(policy);
    cmd.arg("--");
    cmd.args([
        "--process-time-ms",
        "2",
        "--max-records",
        "10",
        "--concurrency",
        "4",
        "--max-wait-ms",
        "50",
    ]);
    cmd.args([
        "--commit-interval-ms",
        "200",
        "--kafka-property",
        "session.timeout.ms=6000",
    ]);
    cmd.args(["--audit-log", dir.path("w{n}.audit").to_str().unwrap()]);
    Proc::spawn(cmd, dir.path("supervise.stderr"))
}

fn audits(dir: &TestDir) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(&dir.0)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "audit"))
        .collect()
}

#[test]
fn rate_policy_scales_up_drains_and_scales_back_and_a_killed_child_loses_nothing() {
    let dir = TestDir::new("supervise-rate");
    let topic = unique("supervise");
    let group = unique("g");
    create_topic(&topic, 8);
    produce(&topic, 20_000, &["--keys", "1000"]);
    let mut sup = supervise(
        &dir,
        &topic,
        &group,
        &[
            "--policy",
            "rate",
            "--target-drain-seconds",
            "5",
            "--rate-per-replica",
            "500",
            "--slots-per-partition",
            "4",
            "--slots-per-replica",
            "4",
        ],
    );
    let tl = dir.path("timeline.jsonl");
    wait_until(Duration::from_secs(60), "replicas to rise above 1", || {
        timeline(&tl)
            .iter()
            .any(|p| p["replicas"].as_u64().unwrap() > 1)
    });
    wait_until(Duration::from_secs(60), "progress", || {
        total_lag(&topic, &group) < 18_000
    });
    let children = children_of(sup.pid() as u32);
    assert!(children.len() >= 2, "several workers run: {children:?}");
    unsafe {
        libc::kill(children[0] as i32, 9);
    }
    wait_for_lag_zero(&topic, &group, Duration::from_secs(180));
    wait_until(
        Duration::from_secs(60),
        "replicas back to the minimum",
        || {
            timeline(&tl)
                .last()
                .is_some_and(|p| p["replicas"] == 1 && p["total_lag"] == 0)
        },
    );
    let points = timeline(&tl);
    for key in [
        "t_ms",
        "total_lag",
        "replicas",
        "desired",
        "rate_per_replica",
    ] {
        assert!(points[0].get(key).is_some(), "timeline lines carry {key}");
    }
    assert!(
        read(&dir.path("supervise.stderr")).contains("restarted")
            || points.iter().any(|p| p["restarts"].as_u64() > Some(0))
    );
    sup.signal(15);
    let status = sup
        .wait_for_exit(Duration::from_secs(60))
        .expect("supervise exits on SIGTERM");
    assert!(status.success(), "{}", sup.stderr());
    assert!(children_of(sup.pid() as u32).is_empty());
    let (expected, duplicates) = assert_all_processed(&topic, &group, &audits(&dir));
    assert_eq!(expected, 20_000);
    eprintln!(
        "supervise: {} timeline points, {duplicates} duplicates",
        points.len()
    );
}

#[test]
fn keda_policy_caps_at_partitions_and_scales_back() {
    let dir = TestDir::new("supervise-keda");
    let topic = unique("supervise-keda");
    let group = unique("g");
    create_topic(&topic, 4);
    produce(&topic, 8000, &["--keys", "1000"]);
    let mut sup = supervise(
        &dir,
        &topic,
        &group,
        &["--policy", "keda", "--lag-threshold", "3"],
    );
    let tl = dir.path("timeline.jsonl");
    wait_for_lag_zero(&topic, &group, Duration::from_secs(180));
    wait_until(
        Duration::from_secs(60),
        "replicas back to the minimum",
        || {
            timeline(&tl)
                .last()
                .is_some_and(|p| p["replicas"] == 1 && p["total_lag"] == 0)
        },
    );
    let points = timeline(&tl);
    let peak = points
        .iter()
        .map(|p| p["replicas"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(
        peak, 4,
        "KEDA's policy caps replicas at the 4 partitions (max was 6)"
    );
    sup.signal(15);
    assert!(sup
        .wait_for_exit(Duration::from_secs(60))
        .unwrap()
        .success());
    let (expected, _) = assert_all_processed(&topic, &group, &audits(&dir));
    assert_eq!(expected, 8000);
}
