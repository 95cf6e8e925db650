//! Failure reporting through the exec and http handlers, bisecting, and a
//! dead-letter topic that cannot be written.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

fn poison_offsets(topic: &str) -> BTreeSet<(i32, i64)> {
    read_topic(topic, broker().bootstrap())
        .into_iter()
        .filter(|r| r.3.contains("POISON"))
        .map(|r| (r.0, r.1))
        .collect()
}

fn dead_lettered(dlq: &str) -> BTreeSet<(i32, i64)> {
    read_topic(dlq, broker().bootstrap())
        .into_iter()
        .map(|r| {
            (
                r.4["microbatch.original.partition"].parse().unwrap(),
                r.4["microbatch.original.offset"].parse().unwrap(),
            )
        })
        .collect()
}

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
    let cmd = python_handler(&dir, "h.py", "import sys, json\nfor line in sys.stdin:\n    b = json.loads(line)\n    if any('POISON' in (r['value'] or '') for r in b['records']):\n        print(json.dumps({'error': 'batch rejected: bad record inside', 'retryable': False}), flush=True)\n    else:\n        print('{\"failed\":[]}', flush=True)\n");
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
    let processed: BTreeSet<(i32, i64)> = audited(&[dir.path("w.audit")]).into_keys().collect();
    assert_eq!(processed.len(), 990, "every good neighbour was processed");
    assert!(processed.is_disjoint(&poison));
}

/// A small HTTP downstream: 503 for the first requests, then 200 naming the
/// poison records as failed for good.
fn downstream(listener: TcpListener, requests: Arc<AtomicUsize>) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let n = requests.fetch_add(1, Ordering::SeqCst);
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            continue;
        }
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
    std::thread::spawn(move || downstream(listener, counter));
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
    let (expected, _) = assert_all_processed_or_dead(&topic, &group, &dir, &poison);
    assert_eq!(expected, 600);
}

fn assert_all_processed_or_dead(
    topic: &str,
    group: &str,
    dir: &TestDir,
    dead: &BTreeSet<(i32, i64)>,
) -> (usize, usize) {
    let seen = audited(&[dir.path("w.audit")]);
    let lag = lag_json(topic, group);
    let mut n = 0;
    for p in lag["partitions"].as_array().unwrap() {
        let partition = p["partition"].as_i64().unwrap() as i32;
        for o in p["low"].as_i64().unwrap()..p["high"].as_i64().unwrap() {
            n += 1;
            assert!(
                seen.contains_key(&(partition, o)) || dead.contains(&(partition, o)),
                "{partition}/{o} lost"
            );
        }
    }
    (n, seen.values().map(|c| *c as usize - 1).sum())
}

/// The dead-letter topic cannot be written (it does not exist and the broker
/// does not create topics): the worker says so loudly, commits nothing past
/// the failed record, and completes once the topic exists.
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
    produce(&topic, 300, &["--poison-every", "100"]);
    let mut w = spawn_worker(
        &dir,
        "w",
        &topic,
        &group,
        free_port(),
        &["--poison-marker", "POISON", "--max-records", "10"],
    );
    wait_until(
        Duration::from_secs(90),
        "a loud dead-letter failure",
        || w.stderr().contains("dead letter not written"),
    );
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
    w.terminate();
    assert_eq!(dead_lettered(&dlq), poison);
}
