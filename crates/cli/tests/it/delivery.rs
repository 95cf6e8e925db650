//! Nothing lost: poison records, a downstream outage, ordering under skew.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::harness::*;

/// 1% of records fail for good: exactly those reach the dead-letter topic with
/// their context headers; every other record is processed; lag ends at 0.
#[test]
fn poison_records_go_to_the_dlq_with_context_and_nothing_else_does() {
    let sc = Scenario::new("poison", 8);
    let Scenario { dir, topic, group } = &sc;
    let dlq = sc.dead_letter_topic(1);
    sc.produce(5000, &["--poison-every", "100", "--keys", "300"]);
    let cmd = recording_handler(dir, HandlerBehaviour::default());
    let mut w = sc.exec_worker(
        "w",
        free_port(),
        &cmd,
        &["--max-records", "50", "--retry-initial-ms", "10"],
    );
    sc.wait_for_lag_zero(Duration::from_secs(120));
    w.terminate();

    let source = read_topic(topic, broker().bootstrap());
    let poison: BTreeSet<(i32, i64)> = source
        .iter()
        .filter(|r| r.3.contains("POISON"))
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(poison.len(), 50, "1% of 5000 records are poison");
    let dead = read_topic(&dlq, broker().bootstrap());
    let mut dead_offsets = BTreeSet::new();
    for (_, _, key, value, headers) in &dead {
        let p: i32 = headers["microbatch.original.partition"].parse().unwrap();
        let o: i64 = headers["microbatch.original.offset"].parse().unwrap();
        assert_eq!(headers["microbatch.original.topic"], *topic);
        assert_eq!(headers["microbatch.consumer.group"], *group);
        assert!(
            headers["microbatch.error"].contains("poison"),
            "{headers:?}"
        );
        assert_eq!(
            headers["microbatch.attempts"], "1",
            "permanent failures are not retried"
        );
        assert!(
            headers["microbatch.original.timestamp_ms"]
                .parse::<i64>()
                .unwrap()
                > 0
        );
        let original = source
            .iter()
            .find(|r| r.0 == p && r.1 == o)
            .expect("the original exists");
        assert_eq!(
            (&original.2, &original.3),
            (key, value),
            "key and value are the original's"
        );
        dead_offsets.insert((p, o));
    }
    assert_eq!(
        dead_offsets, poison,
        "exactly the poison records are dead-lettered"
    );
    let processed: BTreeSet<(i32, i64)> = audited(&handled_files(dir)).into_keys().collect();
    assert_recorded_or_dead(topic, group, &handled_files(dir), &poison);
    for r in &source {
        let id = (r.0, r.1);
        assert!(
            processed.contains(&id) != poison.contains(&id),
            "{id:?} processed xor dead-lettered"
        );
    }
}

/// A dead letter is written once per record, even when the worker that
/// wrote it is SIGKILLed before its commit passed the record: the next
/// owner of the partition finds it in the dead-letter topic and does not
/// write it again. Dead letters go to their source partition's partition
/// of the dead-letter topic (modulo its count), where that owner looks,
/// newest first, past records of others (here 150 written before).
#[test]
fn a_dead_letter_is_written_once_across_a_sigkill_before_the_commit() {
    /// (dead-letter partition, source partition, source offset) of each
    /// dead letter, records without the headers left out.
    fn letters(dlq: &str) -> Vec<(i32, i32, i64)> {
        read_topic(dlq, broker().bootstrap())
            .into_iter()
            .filter_map(|(dlq_partition, _, _, _, headers)| {
                let p = headers.get("microbatch.original.partition")?.parse().ok()?;
                let o = headers.get("microbatch.original.offset")?.parse().ok()?;
                Some((dlq_partition, p, o))
            })
            .collect()
    }
    let sc = Scenario::new("dl-once", 4);
    let Scenario { dir, topic, group } = &sc;
    let dlq = sc.dead_letter_topic(2);
    produce(&dlq, 150, &[]);
    sc.produce(400, &["--poison-every", "2", "--keys", "50"]);
    let poison = poison_offsets(topic);
    assert_eq!(poison.len(), 200);
    let cmd = recording_handler(dir, HandlerBehaviour::default());
    // A commit interval beyond the test: nothing is committed before the kill.
    let first_flags = [
        "--commit-interval-ms",
        "600000",
        "--max-records",
        "20",
        "--retry-initial-ms",
        "10",
    ];
    let mut first = sc.exec_worker("first", free_port(), &cmd, &first_flags);
    wait_until(
        Duration::from_secs(60),
        "every poison record dead-lettered",
        || letters(&dlq).len() == poison.len(),
    );
    first.signal(9);
    first
        .wait_for_exit(Duration::from_secs(30))
        .expect("killed");
    assert_eq!(sc.total_lag(), 400, "nothing was committed before the kill");
    let mut second = sc.exec_worker("second", free_port(), &cmd, &["--retry-initial-ms", "10"]);
    sc.wait_for_lag_zero(Duration::from_secs(120));
    second.terminate();
    let mut written: BTreeMap<(i32, i64), usize> = BTreeMap::new();
    for (dlq_partition, p, o) in letters(&dlq) {
        assert_eq!(dlq_partition, p % 2, "{p}/{o} in its source partition's");
        *written.entry((p, o)).or_default() += 1;
    }
    let twice: Vec<_> = written.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "dead-lettered twice: {twice:?}");
    assert_eq!(written.keys().copied().collect::<BTreeSet<_>>(), poison);
    assert!(
        second.stderr().contains("not written again"),
        "{}",
        second.stderr()
    );
    let (expected, _) = assert_recorded_or_dead(topic, group, &handled_files(dir), &poison);
    assert_eq!(expected, 400);
}

/// A dead-letter topic made again with fewer partitions while the worker
/// runs: a dead letter for a partition it no longer has is refused as
/// unknown; the worker says so, lets the producer pick from then on, and
/// every poison record still reaches the topic, nothing lost.
#[test]
fn a_dead_letter_topic_made_again_smaller_still_takes_every_dead_letter() {
    let sc = Scenario::new("dl-smaller", 4);
    let Scenario { dir, topic, group } = &sc;
    let dlq = sc.dead_letter_topic(4);
    let cmd = recording_handler(dir, HandlerBehaviour::default());
    let port = free_port();
    let mut w = sc.exec_worker("w", port, &cmd, &["--retry-initial-ms", "10"]);
    wait_until(Duration::from_secs(60), "the worker is ready", || {
        http_get(port, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    let (ok, out, err) = topic_cmd("delete", &dlq, &[]);
    assert!(ok, "{out}{err}");
    wait_until(Duration::from_secs(30), "the topic is made again", || {
        // Until the old one is gone, "create" finds it: one partition says
        // the new one is there.
        let partitions = |json: &str| {
            serde_json::from_str::<serde_json::Value>(json.trim())
                .ok()
                .and_then(|d| d["partitions"].as_array().map(Vec::len))
        };
        topic_cmd("create", &dlq, &["--partitions", "1"]).0
            && partitions(&topic_cmd("describe", &dlq, &["--json"]).1) == Some(1)
    });
    sc.produce(200, &["--poison-every", "10", "--keys", "40"]);
    let poison = poison_offsets(topic);
    assert!(
        poison.iter().any(|(p, _)| *p > 0),
        "poison records on partitions the topic no longer has"
    );
    sc.wait_for_lag_zero(Duration::from_secs(120));
    w.terminate();
    assert_eq!(dead_lettered(&dlq), poison);
    assert!(
        w.stderr().contains("fewer partitions than at start"),
        "{}",
        w.stderr()
    );
    assert_recorded_or_dead(topic, group, &handled_files(dir), &poison);
}

/// The handler fails everything for 30 s: no record is dead-lettered, the
/// circuit opens (consumption pauses, /readyz 503), then it closes and every
/// record is processed.
#[test]
fn a_downstream_outage_opens_the_circuit_and_dead_letters_nothing() {
    let sc = Scenario::new("outage", 4);
    let Scenario { dir, topic, group } = &sc;
    let dlq = sc.dead_letter_topic(1);
    sc.produce(2000, &[]);
    let down_flag = dir.path("down");
    std::fs::write(&down_flag, "").unwrap();
    let outage_started = Instant::now();
    let port = free_port();
    let cmd = python_handler(dir, "handler.py", format!(
        "import sys, os, json\nfd = os.open({log:?}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\nfor line in sys.stdin:\n    b = json.loads(line)\n    if os.path.exists({flag:?}):\n        print(json.dumps({{'batch_id': b['batch_id'], 'error': 'downstream unavailable'}}), flush=True)\n    else:\n        os.write(fd, ''.join('%d %d\\n' % (r['partition'], r['offset']) for r in b['records']).encode())\n        print(json.dumps({{'batch_id': b['batch_id'], 'failed': []}}), flush=True)\n",
        flag = down_flag.display().to_string(),
        log = dir.path("handled.txt").display().to_string()
    ));
    let mut w = sc.exec_worker(
        "w",
        port,
        &cmd,
        &[
            "--max-attempts",
            "3",
            "--retry-initial-ms",
            "50",
            "--retry-max-ms",
            "200",
        ],
    );
    wait_until(Duration::from_secs(60), "the circuit to open", || {
        worker_metric(port, "microbatch_circuit_open") == Some(1.0)
    });
    let (status, body) = http_get(port, "/readyz").unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("circuit"), "{body}");
    // The outage lasts 30 s, far past max-attempts × back-off: had attempts
    // been spent, records would be in the DLQ by now.
    let outage = Duration::from_secs(30);
    std::thread::sleep(
        outage
            .saturating_sub(outage_started.elapsed())
            .max(Duration::from_secs(5)),
    );
    assert_eq!(audited(&[dir.path("handled.txt")]).len(), 0);
    assert_eq!(
        worker_metric(port, "microbatch_records_dead_lettered_total"),
        Some(0.0)
    );
    assert!(
        worker_metric(port, "microbatch_records_held").unwrap_or(0.0) <= 2000.0,
        "what is held stays within the caps"
    );
    assert_eq!(
        worker_metric(port, "microbatch_circuit_open"),
        Some(1.0),
        "still open while down"
    );
    std::fs::remove_file(&down_flag).unwrap();
    wait_until(Duration::from_secs(120), "lag 0 after recovery", || {
        sc.total_lag() == 0
    });
    w.terminate();
    let (expected, _) = assert_recorded_or_dead(
        topic,
        group,
        &[dir.path("handled.txt")],
        &Default::default(),
    );
    assert_eq!(expected, 2000);
    assert!(
        read_topic(&dlq, broker().bootstrap()).is_empty(),
        "an outage dead-letters nothing"
    );
    assert!(w.stderr().contains("circuit closed"), "{}", w.stderr());
}

/// Checks the exec handler's record of "key seq" lines: per key, sequence
/// numbers only ever rise (Kafka keeps a key's records in one partition).
fn assert_key_order(log: &str) -> usize {
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let mut n = 0;
    for line in log.lines() {
        let (key, seq) = line.split_once(' ').expect("key seq");
        let seq: u64 = seq.parse().unwrap();
        if let Some(prev) = last.insert(key.to_string(), seq) {
            assert!(seq > prev, "key {key}: {seq} handled after {prev}");
        }
        n += 1;
    }
    n
}

fn order_checking_handler(dir: &TestDir) -> String {
    let log = dir.path("order.log");
    python_handler(
        dir,
        "order.py",
        format!(
            "import sys, json, os\nfd = os.open({log:?}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\nrfd = os.open({records:?}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\nfor line in sys.stdin:\n    b = json.loads(line)\n    out = ''.join('%s %s\\n' % (r['key'], r['value'].split(' ')[0]) for r in b['records'])\n    os.write(fd, out.encode())\n    os.write(rfd, ''.join('%d %d\\n' % (r['partition'], r['offset']) for r in b['records']).encode())\n    print(json.dumps({{'batch_id': b['batch_id'], 'failed': []}}), flush=True)\n",
            log = log.display().to_string(),
            records = dir.path("handled.txt").display().to_string()
        ),
    )
}

/// A skewed burst (all records on 2 of 8 partitions, 200 keys) in `key` mode:
/// per-key order holds, nothing is lost, lag ends at 0.
#[test]
fn key_ordering_under_a_skewed_burst_keeps_per_key_order() {
    let sc = Scenario::new("skew", 8);
    let Scenario { dir, topic, group } = &sc;
    sc.produce(6000, &["--keys", "200", "--partitions", "0,5"]);
    let cmd = order_checking_handler(dir);
    let mut w = sc.exec_worker(
        "w",
        free_port(),
        &cmd,
        &[
            "--ordering",
            "key",
            "--concurrency",
            "12",
            "--max-records",
            "10",
        ],
    );
    sc.wait_for_lag_zero(Duration::from_secs(120));
    w.terminate();
    let handled = assert_key_order(&read(&dir.path("order.log")));
    assert_eq!(handled, 6000);
    let (expected, _) = assert_recorded_or_dead(
        topic,
        group,
        &[dir.path("handled.txt")],
        &Default::default(),
    );
    assert_eq!(expected, 6000);
}

/// SIGKILL of a `key`-mode worker mid-burst (a skewed burst), then a
/// restart: nothing lost.
#[test]
fn sigkill_in_key_mode_then_restart_loses_nothing() {
    let sc = Scenario::new("keykill", 8);
    let Scenario { dir, topic, group } = &sc;
    sc.produce(6000, &["--keys", "200", "--partitions", "0,5"]);
    let cmd = recording_handler(
        dir,
        HandlerBehaviour {
            ms_per_record: 2,
            ..HandlerBehaviour::default()
        },
    );
    let extra = [
        "--ordering",
        "key",
        "--concurrency",
        "12",
        "--max-records",
        "10",
    ];
    let mut first = sc.exec_worker("first", free_port(), &cmd, &extra);
    wait_until(Duration::from_secs(60), "progress", || {
        audited(&handled_files(dir)).len() >= 1000
    });
    first.signal(9);
    first
        .wait_for_exit(Duration::from_secs(30))
        .expect("killed");
    let mut second = sc.exec_worker("second", free_port(), &cmd, &extra);
    sc.wait_for_lag_zero(Duration::from_secs(180));
    second.terminate();
    let (expected, duplicates) =
        assert_recorded_or_dead(topic, group, &handled_files(dir), &Default::default());
    assert_eq!(expected, 6000);
    eprintln!("duplicates after SIGKILL: {duplicates}");
}

/// One key keeps failing (retryable) for a while: its retries never stall
/// other partitions, nor other keys of its own partition; once it recovers,
/// everything completes and nothing was dead-lettered.
#[test]
fn retries_of_one_key_do_not_stall_other_keys_or_partitions() {
    let sc = Scenario::new("nostall", 4);
    let Scenario { dir, topic, group } = &sc;
    let dlq = sc.dead_letter_topic(1);
    sc.produce(4000, &["--keys", "100"]);
    let flag = dir.path("failing");
    std::fs::write(&flag, "").unwrap();
    let seen = dir.path("seen.log");
    let cmd = python_handler(dir, "h.py", format!(
        "import sys, os, json\nfd = os.open({seen:?}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\nrfd = os.open({records:?}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\nfor line in sys.stdin:\n    b = json.loads(line)\n    bad = os.path.exists({flag:?})\n    failed = [dict(partition=r['partition'], offset=r['offset'], error='key-7 unavailable') for r in b['records'] if bad and r['key'] == 'key-7']\n    done = ''.join('%d %s\\n' % (r['partition'], r['key']) for r in b['records'] if not (bad and r['key'] == 'key-7'))\n    os.write(fd, done.encode())\n    os.write(rfd, ''.join('%d %d\\n' % (r['partition'], r['offset']) for r in b['records'] if not (bad and r['key'] == 'key-7')).encode())\n    print(json.dumps(dict(batch_id=b['batch_id'], failed=failed)), flush=True)\n",
        seen = seen.display().to_string(),
        flag = flag.display().to_string(),
        records = dir.path("handled.txt").display().to_string()
    ));
    let mut w = sc.exec_worker(
        "w",
        free_port(),
        &cmd,
        &[
            "--ordering",
            "key",
            "--concurrency",
            "8",
            "--max-records",
            "20",
            "--max-attempts",
            "1000",
            "--retry-initial-ms",
            "200",
            "--retry-max-ms",
            "1000",
        ],
    );
    let source = read_topic(topic, broker().bootstrap());
    let key7_partition = source
        .iter()
        .find(|r| r.2.as_deref() == Some("key-7"))
        .unwrap()
        .0;
    let key7 = source
        .iter()
        .filter(|r| r.2.as_deref() == Some("key-7"))
        .count();
    let same_partition_others = source
        .iter()
        .filter(|r| r.0 == key7_partition && r.2.as_deref() != Some("key-7"))
        .count();
    // While key-7 keeps failing, every other partition drains completely and
    // other keys of key-7's partition make progress.
    wait_until(
        Duration::from_secs(120),
        "other partitions to drain while key-7 fails",
        || {
            let lag = lag_json(topic, group);
            lag["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["partition"].as_i64().unwrap() as i32 != key7_partition)
                .all(|p| p["lag"] == 0)
        },
    );
    let handled_same_partition = read(&seen)
        .lines()
        .filter(|l| l.starts_with(&format!("{key7_partition} ")))
        .count();
    assert!(
        handled_same_partition >= same_partition_others / 2,
        "other keys of partition {key7_partition} progressed ({handled_same_partition} of {same_partition_others})"
    );
    assert!(
        !read(&seen).contains(" key-7\n"),
        "key-7 has not succeeded yet"
    );
    assert!(
        sc.total_lag() > 0,
        "key-7's records hold their partition's commit"
    );
    std::fs::remove_file(&flag).unwrap();
    wait_until(
        Duration::from_secs(120),
        "lag 0 after key-7 recovers",
        || sc.total_lag() == 0,
    );
    w.terminate();
    assert_eq!(
        read(&seen)
            .lines()
            .filter(|l| l.ends_with(" key-7"))
            .count(),
        key7,
        "every key-7 record done once it recovered"
    );
    assert!(
        read_topic(&dlq, broker().bootstrap()).is_empty(),
        "retryable failures within max-attempts dead-letter nothing"
    );
    let (expected, _) = assert_recorded_or_dead(
        topic,
        group,
        &[dir.path("handled.txt")],
        &Default::default(),
    );
    assert_eq!(expected, 4000);
}
