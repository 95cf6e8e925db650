//! `microbatch topic create` and `topic delete` against a real broker.

use std::time::Duration;

use crate::harness::*;

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

/// `produce` right after `topic create` finds the topic (its metadata may
/// lag the controller for a moment), and on a topic that does not exist it
/// fails with a message that names the topic and the fix.
#[test]
fn produce_finds_a_new_topic_and_names_a_missing_one() {
    for _ in 0..3 {
        let topic = unique("topic-new");
        let (ok, _, err) = topic_cmd("create", &topic, &["--partitions", "8"]);
        assert!(ok, "{err}");
        produce(&topic, 10, &[]);
        assert_eq!(lag_json(&topic, "g-topic-test")["total_lag"], 10);
    }
    let missing = unique("topic-missing");
    let (status, _, err) = run_to_end(&[
        "produce",
        "--bootstrap-servers",
        broker().bootstrap(),
        "--topic",
        &missing,
        "--count",
        "1",
    ]);
    assert!(!status.success());
    assert!(
        err.contains(&format!("topic \"{missing}\" does not exist"))
            && err.contains("microbatch topic create"),
        "{err}"
    );
}
