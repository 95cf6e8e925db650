//! Failure reporting through the exec and http handlers, bisecting, a
//! dead-letter topic that cannot be written, and exec children started
//! with the worker.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// A handler that rejects whole batches holding a bad record: bisecting finds
/// the bad records, and only they are dead-lettered.
#[test]
fn whole_batch_failures_are_bisected_down_to_the_bad_record() {
    let dir = TestDir::new("bisect");
    let topic = unique("bisect");
    let dlq = format!("{topic}.dlq");
    let group = unique("g");
    create_topic(&topic, 2);
    create_topic(&dlq, 1);
    produce(&topic, 1000, &["--poison-every", "100"]);
    let log = dir.path("handled.txt");
    let cmd = python_handler(&dir, "h.py", format!("import sys, json, os\nfd = os.open({log:?}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\nfor line in sys.stdin:\n    b = json.loads(line)\n    if any('POISON' in (r['value'] or '') for r in b['records']):\n        print(json.dumps({{'batch_id': b['batch_id'], 'error': 'batch rejected: bad record inside', 'retryable': False}}), flush=True)\n    else:\n        os.write(fd, ''.join('%d %d\\n' % (r['partition'], r['offset']) for r in b['records']).encode())\n        print(json.dumps({{'batch_id': b['batch_id'], 'failed': []}}), flush=True)\n"));
    let mut w = spawn_exec_worker(
        &dir,
        "w",
        &topic,
        &group,
        free_port(),
        &cmd,
        &["--max-records", "64"],
    );
    wait_for_lag_zero(&topic, &group, Duration::from_secs(120));
    w.terminate();
    let poison = poison_offsets(&topic);
    assert_eq!(poison.len(), 10);
    assert_eq!(
        dead_lettered(&dlq),
        poison,
        "only the bad records are dead-lettered"
    );
    assert!(w.stderr().contains("bisecting"), "the log says it bisected");
    let processed: BTreeSet<(i32, i64)> = audited(std::slice::from_ref(&log)).into_keys().collect();
    assert_eq!(processed.len(), 990, "every good neighbour was processed");
    assert_recorded_or_dead(&topic, &group, &[log], &poison);
    assert!(processed.is_disjoint(&poison));
}

/// A small HTTP downstream: 503 for the first requests, then 200 naming the
/// poison records as failed for good.
fn downstream(listener: TcpListener, requests: Arc<AtomicUsize>, log: std::path::PathBuf) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let n = requests.fetch_add(1, Ordering::SeqCst);
        let Some(body) = read_http_body(&stream) else {
            continue;
        };
        let (status, answer) = if n < 3 {
            (
                "503 Service Unavailable",
                "{\"error\":\"warming up\"}".to_string(),
            )
        } else {
            let batch: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let failed: Vec<serde_json::Value> = batch["records"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["value"].as_str().unwrap_or("").contains("POISON"))
                .map(|r| serde_json::json!({"partition": r["partition"], "offset": r["offset"], "error": "rejected", "retryable": false}))
                .collect();
            // What this downstream accepted: the evidence, outside the worker.
            let accepted: String = batch["records"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| !r["value"].as_str().unwrap_or("").contains("POISON"))
                .map(|r| format!("{} {}\n", r["partition"], r["offset"]))
                .collect();
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap();
            out.write_all(accepted.as_bytes()).unwrap();
            (
                "200 OK",
                serde_json::json!({ "failed": failed }).to_string(),
            )
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
            answer.len()
        );
    }
}

/// The http handler: 5xx is retried, named records failed for good are
/// dead-lettered, everything else is processed.
#[test]
fn http_handler_retries_5xx_and_dead_letters_named_records() {
    let dir = TestDir::new("http");
    let topic = unique("http");
    let dlq = format!("{topic}.dlq");
    let group = unique("g");
    create_topic(&topic, 2);
    create_topic(&dlq, 1);
    produce(&topic, 600, &["--poison-every", "60"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/batches", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    let log = dir.path("accepted.txt");
    let accepted = log.clone();
    std::thread::spawn(move || downstream(listener, counter, accepted));
    let mut w = spawn_worker(
        &dir,
        "w",
        &topic,
        &group,
        free_port(),
        &[
            "--handler",
            "http",
            "--url",
            &url,
            "--retry-initial-ms",
            "20",
            "--max-records",
            "50",
        ],
    );
    wait_for_lag_zero(&topic, &group, Duration::from_secs(120));
    w.terminate();
    assert!(requests.load(Ordering::SeqCst) > 3, "the 503s were retried");
    let poison = poison_offsets(&topic);
    assert_eq!(poison.len(), 10);
    assert_eq!(dead_lettered(&dlq), poison);
    let (expected, _) = assert_recorded_or_dead(&topic, &group, &[log], &poison);
    assert_eq!(expected, 600);
}

/// The dead-letter topic cannot be written (deleted after the worker
/// checked it): the worker says so loudly, `/readyz` and `/metrics` show the
/// backlog, nothing is committed past the failed record, and all completes
/// once the topic exists again.
#[test]
fn an_unwritable_dlq_holds_the_commit_until_it_can_be_written() {
    if !broker().is_real() {
        eprintln!("skipped: the mock cluster creates topics on demand");
        return;
    }
    let dir = TestDir::new("dlq-down");
    let topic = unique("dlq-down");
    let dlq = format!("{topic}.dlq");
    let group = unique("g");
    create_topic(&topic, 1);
    let port = free_port();
    let mut w = spawn_worker(
        &dir,
        "w",
        &topic,
        &group,
        port,
        &["--poison-marker", "POISON", "--max-records", "10"],
    );
    wait_until(Duration::from_secs(60), "the worker is ready", || {
        http_get(port, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    let (status, out, err) = run_to_end(&[
        "topic",
        "delete",
        "--bootstrap-servers",
        broker().bootstrap(),
        "--topic",
        &dlq,
    ]);
    assert!(status.success(), "{out}{err}");
    produce(&topic, 300, &["--poison-every", "100"]);
    wait_until(
        Duration::from_secs(90),
        "a loud dead-letter failure",
        || w.stderr().contains("dead letters not written"),
    );
    wait_until(Duration::from_secs(30), "/readyz names the backlog", || {
        http_get(port, "/readyz")
            .is_some_and(|(code, body)| code == 503 && body.contains("dead-letter backlog"))
    });
    assert!(worker_metric(port, "microbatch_dead_letter_backlog_records").unwrap_or(0.0) >= 1.0);
    let poison = poison_offsets(&topic);
    let first_poison = poison.iter().next().unwrap().1;
    let committed = lag_json(&topic, &group)["partitions"][0]["committed"]
        .as_i64()
        .unwrap_or(0);
    assert!(
        committed <= first_poison,
        "committed {committed} passed the undelivered dead letter at {first_poison}"
    );
    create_topic(&dlq, 1);
    wait_until(
        Duration::from_secs(120),
        "lag 0 once the DLQ exists",
        || total_lag(&topic, &group) == 0,
    );
    wait_until(Duration::from_secs(30), "ready again", || {
        http_get(port, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    assert_eq!(
        worker_metric(port, "microbatch_dead_letter_backlog_records"),
        Some(0.0)
    );
    w.terminate();
    assert_eq!(dead_lettered(&dlq), poison);
}

/// A worker starts its exec children when it starts, before it has a
/// partition: the partitions a scale step hands it wait for the group's
/// join, not for an interpreter's start-up after it.
#[test]
fn exec_children_start_with_the_worker_before_any_batch() {
    let dir = TestDir::new("exec-prepare");
    let topic = unique("exec-prepare");
    let group = unique("g");
    create_topic(&topic, 1);
    let started = dir.path("started.txt");
    let log = dir.path("handled.txt");
    let cmd = python_handler(&dir, "h.py", format!("import sys, json, os\nwith open({started:?}, 'a') as f:\n    f.write('%d\\n' % os.getpid())\nfd = os.open({log:?}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\nfor line in sys.stdin:\n    b = json.loads(line)\n    os.write(fd, ''.join('%d %d\\n' % (r['partition'], r['offset']) for r in b['records']).encode())\n    print(json.dumps({{'batch_id': b['batch_id'], 'failed': []}}), flush=True)\n"));
    let children = || {
        std::fs::read_to_string(&started)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let mut w = spawn_exec_worker(
        &dir,
        "w",
        &topic,
        &group,
        free_port(),
        &cmd,
        &["--concurrency", "3"],
    );
    wait_until(
        Duration::from_secs(60),
        "a handler child per slot, with nothing to handle yet",
        || children() == 3,
    );
    assert!(
        audited(std::slice::from_ref(&log)).is_empty(),
        "no batch was sent yet"
    );
    produce(&topic, 300, &[]);
    wait_for_lag_zero(&topic, &group, Duration::from_secs(120));
    w.terminate();
    assert_eq!(
        audited(std::slice::from_ref(&log)).len(),
        300,
        "every record reached a child"
    );
    assert_eq!(
        children(),
        3,
        "the batches went to the children started first"
    );
}
