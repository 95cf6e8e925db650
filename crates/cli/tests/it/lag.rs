//! `microbatch lag`: lag in records and in seconds, checked against records
//! produced with known timestamps on a real broker.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::admin::*;
use crate::harness::*;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

fn lag(topic: &str, group: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["lag", "--bootstrap-servers", broker().bootstrap()];
    args.extend(["--topic", topic, "--group", group, "--json"]);
    args.extend(extra);
    let (status, out, err) = run_to_end(&args);
    assert!(status.success(), "lag failed: {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn lag_seconds_is_the_age_of_the_oldest_record_not_committed() {
    if !broker().is_real() {
        eprintln!("skipped: placing commits needs a real broker's admin API");
        return;
    }
    let topic = unique("13-lag-seconds");
    let group = unique("13-lag-seconds-g");
    create_topic(&topic, 4);
    let produced_at = now_ms();
    let started = Instant::now();
    // Partition 0: 5 records two minutes old, then 5 one minute old; the
    // group committed the first 5, so the oldest waiting is a minute old.
    // Partition 1: 3 records 30 s old, never committed. Partition 2: all
    // committed. Partition 3: 6 records 45 s old, the first 4 deleted as
    // retention would, committed at 1: the oldest waiting is offset 4.
    produce_records(
        &topic,
        &[
            (0, 5, Some(produced_at - 120_000)),
            (0, 5, Some(produced_at - 60_000)),
            (1, 3, Some(produced_at - 30_000)),
            (2, 4, Some(produced_at - 90_000)),
            (3, 6, Some(produced_at - 45_000)),
        ],
    );
    delete_records_before(&topic, &[(3, 4)]);
    alter_group_offsets(&group, &topic, &[(0, 5), (2, 4), (3, 1)]);

    let earliest = lag(&topic, &group, &["--offset-reset-policy", "earliest"]);
    // The ages can only have grown since the records were produced.
    let slack = started.elapsed().as_secs_f64() + 1.0;
    let age = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("a number: {v}"));
    let within = |v: &serde_json::Value, expected: f64| {
        let got = age(v);
        assert!(
            (expected..expected + slack).contains(&got),
            "lag_seconds {got} not within [{expected}, {}): {earliest}",
            expected + slack
        );
    };
    let parts = &earliest["partitions"];
    assert_eq!(parts[0]["lag"], 5);
    within(&parts[0]["lag_seconds"], 60.0);
    assert_eq!(parts[1]["lag"], 3);
    within(&parts[1]["lag_seconds"], 30.0);
    assert_eq!(parts[2]["lag"], 0);
    assert_eq!(parts[2]["lag_seconds"], 0.0);
    assert_eq!(parts[3]["lag"], 2);
    within(&parts[3]["lag_seconds"], 45.0);
    within(&earliest["lag_seconds"], 60.0);

    // KEDA's default, latest: a partition without a commit counts 1 record
    // and has no waiting record (the group would start at the end).
    let latest = lag(&topic, &group, &[]);
    assert_eq!(latest["partitions"][1]["lag"], 1, "{latest}");
    assert!(latest["partitions"][1]["lag_seconds"].is_null(), "{latest}");
    within(&latest["lag_seconds"], 60.0);

    // Every reading of a --watch measures them, not only the first.
    let readings = lag_watch_json(
        &topic,
        &group,
        &["--offset-reset-policy=earliest".into()],
        2,
    );
    let slack = started.elapsed().as_secs_f64() + 1.0;
    for reading in &readings {
        let got = age(&reading["partitions"][0]["lag_seconds"]);
        assert!((60.0..60.0 + slack).contains(&got), "{reading}");
    }

    // The table shows them too.
    let (status, table, err) = run_lag(&topic, &group, &[]);
    assert!(status.success(), "{err}");
    assert!(table.contains("LAG SECONDS"), "{table}");
    let p2 = table
        .lines()
        .find(|l| l.trim_start().starts_with("2 "))
        .unwrap_or_else(|| panic!("partition 2's row: {table}"));
    assert!(p2.trim_end().ends_with(" 0.0"), "{p2}");
}

/// One group id serving two topics (a Deployment per topic, as teams do):
/// each topic's replicas are the members assigned it, not every member of
/// the group, so a policy on topic a does not take b's workers for its
/// own. JSON: "members" beside the lag.
#[test]
fn members_are_counted_per_topic_when_a_group_serves_two() {
    if !broker().is_real() {
        eprintln!("skipped: the embedded broker lists no group members");
        return;
    }
    let dir = TestDir::new("lag-members-per-topic");
    let (a, b) = (unique("members-a"), unique("members-b"));
    let group = unique("members-g");
    create_topic(&a, 2);
    create_topic(&b, 2);
    let mut workers = vec![spawn_worker(&dir, "a1", &a, &group, 0, &["--dlq", "off"])];
    for name in ["b1", "b2"] {
        workers.push(spawn_worker(&dir, name, &b, &group, 0, &["--dlq", "off"]));
    }
    let members = |topic: &str| lag(topic, &group, &[])["members"].clone();
    if classic_protocol() {
        wait_until(
            Duration::from_secs(60),
            "a stable group of 3 on two topics",
            || members(&a) == 1 && members(&b) == 2,
        );
    } else {
        // A KIP-848 group is "Dead" to the classic DescribeGroups: its
        // members are unknown (null, and the scaler counts the workers
        // that report), never 0 while its workers work.
        produce(&a, 20, &[]);
        wait_for_lag_zero(&a, &group, Duration::from_secs(60));
        assert_eq!(members(&a), serde_json::Value::Null);
        assert_eq!(members(&b), serde_json::Value::Null);
    }
    for w in &mut workers {
        w.terminate();
    }
}
