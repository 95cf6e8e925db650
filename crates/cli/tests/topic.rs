//! `microbatch topic create` and `topic delete` against a real broker.

mod common;

use std::time::Duration;

use common::*;

fn topic_cmd(action: &str, topic: &str, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "topic",
        action,
        "--bootstrap-servers",
        broker().bootstrap(),
        "--topic",
        topic,
    ];
    args.extend_from_slice(extra);
    let (status, out, err) = run_to_end(&args);
    (status.success(), out, err)
}

fn lag_says(topic: &str) -> String {
    let (_, out, err) = run_lag(topic, "g-topic-test", &[]);
    out + &err
}

/// Create, fill, delete: the records go with the topic, and both commands
/// can be repeated without failing (scripts may run them twice).
#[test]
fn topics_are_created_and_deleted_idempotently() {
    if matches!(broker(), Broker::Mock { .. }) {
        eprintln!("the mock cluster cannot delete topics; this test needs real Kafka");
        return;
    }
    let topic = unique("topic-cmd");
    let (ok, out, err) = topic_cmd("create", &topic, &["--partitions", "3"]);
    assert!(ok, "{err}");
    assert!(out.contains("created topic"), "{out}");
    let (ok, out, _) = topic_cmd("create", &topic, &["--partitions", "3"]);
    assert!(ok && out.contains("already exists"), "{out}");
    produce(&topic, 100, &[]);
    assert_eq!(lag_json(&topic, "g-topic-test")["total_lag"], 100);

    let (ok, out, err) = topic_cmd("delete", &topic, &[]);
    assert!(ok, "{err}");
    assert!(out.contains("deleted topic"), "{out}");
    wait_until(Duration::from_secs(60), "the topic to be gone", || {
        lag_says(&topic).contains("does not exist")
    });
    let (ok, out, err) = topic_cmd("delete", &topic, &[]);
    assert!(ok, "{err}");
    assert!(out.contains("does not exist"), "{out}");
}
