//! Failure reporting through the exec and http handlers, bisecting, a
//! dead-letter topic that cannot be written, and exec children started
//! with the worker.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;

/// A handler that rejects whole batches holding a bad record: bisecting finds
/// the bad records, and only they are dead-lettered.
#[test]
fn whole_batch_failures_are_bisected_down_to_the_bad_record() {
    let sc = Scenario::new("bisect", 2);
    let Scenario { dir, topic, group } = &sc;
    let dlq = sc.dead_letter_topic(1);
    sc.produce(1000, &["--poison-every", "100"]);
    let log = dir.path("handled.txt");
    let cmd = python_handler(dir, "h.py", format!("import sys, json, os\nfd = os.open({log:?}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\nfor line in sys.stdin:\n    b = json.loads(line)\n    if any('POISON' in (r['value'] or '') for r in b['records']):\n        print(json.dumps({{'batch_id': b['batch_id'], 'error': 'batch rejected: bad record inside', 'retryable': False}}), flush=True)\n    else:\n        os.write(fd, ''.join('%d %d\\n' % (r['partition'], r['offset']) for r in b['records']).encode())\n        print(json.dumps({{'batch_id': b['batch_id'], 'failed': []}}), flush=True)\n"));
    let mut w = sc.exec_worker("w", free_port(), &cmd, &["--max-records", "64"]);
    sc.wait_for_lag_zero(Duration::from_secs(120));
    w.terminate();
    let poison = poison_offsets(topic);
    assert_eq!(poison.len(), 10);
    assert_eq!(
        dead_lettered(&dlq),
        poison,
        "only the bad records are dead-lettered"
    );
    assert!(w.stderr().contains("bisecting"), "the log says it bisected");
    let processed: BTreeSet<(i32, i64)> = audited(std::slice::from_ref(&log)).into_keys().collect();
    assert_eq!(processed.len(), 990, "every good neighbour was processed");
    assert_recorded_or_dead(topic, group, &[log], &poison);
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
    let sc = Scenario::new("http", 2);
    let Scenario { dir, topic, group } = &sc;
    let dlq = sc.dead_letter_topic(1);
    sc.produce(600, &["--poison-every", "60"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/batches", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    let log = dir.path("accepted.txt");
    let accepted = log.clone();
    std::thread::spawn(move || downstream(listener, counter, accepted));
    let mut w = sc.worker(
        "w",
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
    sc.wait_for_lag_zero(Duration::from_secs(120));
    w.terminate();
    assert!(requests.load(Ordering::SeqCst) > 3, "the 503s were retried");
    let poison = poison_offsets(topic);
    assert_eq!(poison.len(), 10);
    assert_eq!(dead_lettered(&dlq), poison);
    let (expected, _) = assert_recorded_or_dead(topic, group, &[log], &poison);
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
    let sc = Scenario::new("dlq-down", 1);
    let Scenario { topic, group, .. } = &sc;
    let dlq = format!("{topic}.dlq");
    let port = free_port();
    let mut w = sc.worker(
        "w",
        port,
        &["--poison-marker", "POISON", "--max-records", "10"],
    );
    wait_until(Duration::from_secs(60), "the worker is ready", || {
        http_get(port, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    let (ok, out, err) = topic_cmd("delete", &dlq, &[]);
    assert!(ok, "{out}{err}");
    sc.produce(300, &["--poison-every", "100"]);
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
    let poison = poison_offsets(topic);
    let first_poison = poison.iter().next().unwrap().1;
    let committed = lag_json(topic, group)["partitions"][0]["committed"]
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
        || sc.total_lag() == 0,
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
    let sc = Scenario::new("exec-prepare", 1);
    let Scenario { dir, .. } = &sc;
    let started = dir.path("started.txt");
    let log = dir.path("handled.txt");
    let cmd = python_handler(dir, "h.py", format!("import sys, json, os\nwith open({started:?}, 'a') as f:\n    f.write('%d\\n' % os.getpid())\nfd = os.open({log:?}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\nfor line in sys.stdin:\n    b = json.loads(line)\n    os.write(fd, ''.join('%d %d\\n' % (r['partition'], r['offset']) for r in b['records']).encode())\n    print(json.dumps({{'batch_id': b['batch_id'], 'failed': []}}), flush=True)\n"));
    let children = || {
        std::fs::read_to_string(&started)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let mut w = sc.exec_worker("w", free_port(), &cmd, &["--concurrency", "3"]);
    wait_until(
        Duration::from_secs(60),
        "a handler child per slot, with nothing to handle yet",
        || children() == 3,
    );
    assert!(
        audited(std::slice::from_ref(&log)).is_empty(),
        "no batch was sent yet"
    );
    sc.produce(300, &[]);
    sc.wait_for_lag_zero(Duration::from_secs(120));
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

/// A downstream that misbehaves for its first `bad` requests, then accepts
/// every batch and writes what it accepted to `log`: the evidence, outside
/// the worker. `misbehave(n, batch)` gives the status line, extra headers
/// and body of a bad answer.
fn flaky_downstream(
    listener: TcpListener,
    bad: usize,
    log: std::path::PathBuf,
    misbehave: impl Fn(usize, &serde_json::Value) -> (String, String, String) + Send + 'static,
) {
    std::thread::spawn(move || {
        let requests = AtomicUsize::new(0);
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Some(body) = read_http_body(&stream) else {
                continue;
            };
            let n = requests.fetch_add(1, Ordering::SeqCst);
            let (status, headers, answer) = if n < bad {
                let batch: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                misbehave(n, &batch)
            } else {
                accept_batch(&body, &log);
                ("200 OK".into(), String::new(), "{\"failed\":[]}".into())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
}

/// A worker with the http handler on `url`, quick retries, small batches.
fn http_worker(dir: &TestDir, topic: &str, group: &str, url: &str) -> Proc {
    spawn_worker(
        dir,
        "w",
        topic,
        group,
        free_port(),
        &[
            "--handler",
            "http",
            "--url",
            url,
            "--retry-initial-ms",
            "20",
            "--retry-max-ms",
            "200",
            "--max-records",
            "20",
        ],
    )
}

/// An endpoint that answers 301 (its target answering `200 {}` to the GET a
/// redirect-following client sends) loses nothing: the redirect is a
/// retryable failure, and every record reaches the endpoint once it answers
/// itself. Before the fix the POST was followed as a bodiless GET and all
/// 200 records were committed unseen.
#[test]
fn a_redirecting_endpoint_gets_every_record_once_it_answers_itself() {
    let sc = Scenario::new("http-redirect", 2);
    let Scenario { dir, topic, group } = &sc;
    sc.produce(200, &[]);
    // The target: 200 with an empty JSON object to anything, counting calls.
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let target_url = format!("http://{}/moved", target.local_addr().unwrap());
    let target_calls = Arc::new(AtomicUsize::new(0));
    let calls = target_calls.clone();
    std::thread::spawn(move || {
        for stream in target.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = read_http_body(&stream);
            calls.fetch_add(1, Ordering::SeqCst);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            );
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/batches", listener.local_addr().unwrap());
    let log = dir.path("accepted.txt");
    let location = target_url.clone();
    flaky_downstream(listener, 12, log.clone(), move |_, _| {
        (
            "301 Moved Permanently".into(),
            format!("Location: {location}\r\n"),
            String::new(),
        )
    });
    let mut w = http_worker(dir, topic, group, &url);
    sc.wait_for_lag_zero(Duration::from_secs(120));
    w.terminate();
    assert_eq!(
        target_calls.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
    let (expected, _) = assert_recorded_or_dead(topic, group, &[log], &BTreeSet::new());
    assert_eq!(expected, 200);
    assert!(
        w.stderr().contains("redirects are not followed") && w.stderr().contains(&target_url),
        "the log names the redirect and where it points"
    );
}

/// An endpoint that names records its batch does not hold (here: every
/// offset + 1,000,000, as a handler counting from the wrong base would)
/// gave a broken answer: the batch is tried again, nothing is committed
/// past it, and every record reaches the endpoint once it answers right.
/// Before the fix the unknown entries were dropped and the batch taken as
/// done: all 200 committed, none accepted.
#[test]
fn an_answer_naming_records_outside_the_batch_commits_nothing() {
    let sc = Scenario::new("http-outside", 2);
    let Scenario { dir, topic, group } = &sc;
    sc.produce(200, &[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/batches", listener.local_addr().unwrap());
    let log = dir.path("accepted.txt");
    flaky_downstream(listener, 12, log.clone(), |n, batch| {
        let failed: Vec<serde_json::Value> = batch["records"]
            .as_array()
            .map(|records| {
                records
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        // Half the bad answers count offsets from a wrong
                        // base, half count positions within the batch.
                        let offset = if n % 2 == 0 {
                            r["offset"].as_i64().unwrap_or(0) + 1_000_000
                        } else {
                            i as i64 + 10_000
                        };
                        serde_json::json!({"offset": offset, "error": "x", "retryable": false})
                    })
                    .collect()
            })
            .unwrap_or_default();
        (
            "200 OK".into(),
            String::new(),
            serde_json::json!({ "failed": failed }).to_string(),
        )
    });
    let mut w = http_worker(dir, topic, group, &url);
    sc.wait_for_lag_zero(Duration::from_secs(120));
    w.terminate();
    let (expected, _) = assert_recorded_or_dead(topic, group, &[log], &BTreeSet::new());
    assert_eq!(expected, 200);
    assert!(
        w.stderr().contains("which the batch does not hold"),
        "the log says why the answer was refused"
    );
}

/// The exec child gets none of the worker's own credentials (the SCRAM
/// password, AWS keys) unless `--handler-env` names one; the worker's log,
/// `/metrics` and `/readyz` show none of them either.
#[test]
fn exec_children_get_none_of_the_workers_credentials() {
    let Some(env) = scram_listener() else {
        return;
    };
    let sc = Scenario::new("exec-env", 1);
    let Scenario { dir, topic, group } = &sc;
    sc.produce(50, &[]);
    let seen = dir.path("env.txt");
    let log = dir.path("handled.txt");
    let handler = logging_handler_with(
        dir,
        &log,
        &format!("with open({seen:?}, 'w') as f:\n    json.dump(dict(os.environ), f)\n"),
        "",
    );
    let (secret_key, session_token) = ("aws-secret-7f3e", "aws-session-91ab");
    // As supervise hands properties down (a key's password, unused here).
    let property_secret = "key-pass-52c0";
    let mut cmd = run_over_scram(&env);
    cmd.env("AWS_ACCESS_KEY_ID", "AKIATESTPASSEDON")
        .env("AWS_SECRET_ACCESS_KEY", secret_key)
        .env("AWS_SESSION_TOKEN", session_token)
        .env(
            "MICROBATCH_KAFKA_PROPERTIES",
            format!("{{\"ssl.key.password\": \"{property_secret}\"}}"),
        );
    let port = free_port();
    let mut w = spawn_worker_with(
        cmd,
        dir,
        "w",
        topic,
        group,
        port,
        &[
            "--handler",
            "exec",
            "--command",
            &handler,
            "--handler-env",
            "AWS_ACCESS_KEY_ID",
        ],
    );
    sc.wait_for_lag_zero(Duration::from_secs(120));
    let (_, metrics) = http_get(port, "/metrics").expect("the worker serves /metrics");
    let (_, ready) = http_get(port, "/readyz").expect("the worker serves /readyz");
    w.terminate();
    let secrets = [
        env["KAFKA_PASSWORD"].as_str(),
        secret_key,
        session_token,
        property_secret,
    ];
    for secret in secrets {
        assert!(
            !metrics.contains(secret) && !ready.contains(secret),
            "a secret reached /metrics or /readyz"
        );
    }
    assert_eq!(audited(std::slice::from_ref(&log)).len(), 50);
    let child: serde_json::Value = serde_json::from_str(&read(&seen)).unwrap();
    let child = child.as_object().unwrap();
    for name in [
        "KAFKA_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "MICROBATCH_KAFKA_PROPERTIES",
    ] {
        assert!(!child.contains_key(name), "the child inherited {name}");
    }
    let text = read(&seen);
    for secret in secrets {
        assert!(!text.contains(secret), "a secret reached the child");
        assert!(!w.stderr().contains(secret), "a secret reached the log");
    }
    assert_eq!(
        child.get("AWS_ACCESS_KEY_ID").and_then(|v| v.as_str()),
        Some("AKIATESTPASSEDON"),
        "--handler-env passes a named variable on"
    );
    assert_eq!(
        child.get("KAFKA_USERNAME").and_then(|v| v.as_str()),
        Some(env["KAFKA_USERNAME"].as_str()),
        "what is not a secret is left alone"
    );
}

/// A handler command that cannot start for its first 20 s (it exits at
/// once, as one waiting for a dependency would) with a handler timeout of
/// 5 s: once it can start, every record is handled. Before the fix the
/// restart back-off (up to 10 s) was slept inside the 5 s timeout, every
/// start was cancelled, and the records waited for ever.
#[test]
fn a_handler_slow_to_start_is_started_once_it_can() {
    let sc = Scenario::new("exec-slow-start", 2);
    let Scenario { dir, topic, group } = &sc;
    sc.produce(400, &[]);
    let gate = dir.path("can-start");
    let log = dir.path("handled.txt");
    let handler = logging_handler(dir, &log, "");
    let command = format!("[ -e '{}' ] || exit 1; {handler}", gate.display());
    let mut w = sc.exec_worker(
        "w",
        free_port(),
        &command,
        &["--handler-timeout-ms", "5000", "--retry-initial-ms", "50"],
    );
    std::thread::sleep(Duration::from_secs(20));
    assert!(
        audited(std::slice::from_ref(&log)).is_empty(),
        "nothing could be handled yet"
    );
    std::fs::write(&gate, "").unwrap();
    sc.wait_for_lag_zero(Duration::from_secs(90));
    w.terminate();
    let (expected, _) = assert_recorded_or_dead(topic, group, &[log], &BTreeSet::new());
    assert_eq!(expected, 400);
}

/// Poison records of 2 MB on a topic that takes 3 MB records: the
/// dead-letter topic made at start takes them too (with room for the
/// context headers), and the producer sends them. Before the fix each dead
/// letter failed with "message size too large" for ever and the partition
/// stood still (lag 6 after 120 s in the report that found it).
#[test]
fn large_poison_records_are_dead_lettered() {
    if !broker().is_real() {
        eprintln!("skipped: the mock cluster has no topic configs");
        return;
    }
    let sc = Scenario::with_topic_configs("dlq-large", 1, &[("max.message.bytes", "3000000")]);
    let Scenario { topic, .. } = &sc;
    let dlq = format!("{topic}.dlq");
    sc.produce(
        6,
        &[
            "--size",
            "2000000",
            "--poison-every",
            "2",
            "--kafka-property",
            "message.max.bytes=3000000",
        ],
    );
    let mut w = sc.worker(
        "w",
        free_port(),
        &["--poison-marker", "POISON", "--max-records", "2"],
    );
    sc.wait_for_lag_zero(Duration::from_secs(120));
    w.terminate();
    let poison = poison_offsets(topic);
    assert_eq!(poison.len(), 3);
    assert_eq!(dead_lettered(&dlq), poison);
    assert!(
        w.stderr().contains("created the dead-letter topic") && w.stderr().contains("3016384"),
        "the dead-letter topic is made with room for the source's records"
    );
}

/// An exec command that answers every batch in the protocol before
/// `batch_id` is a configuration error: the worker says how to answer and
/// exits with status 1, committing nothing it did not see answered. Before,
/// it retried for ever with a warning, as if the downstream were out.
#[test]
fn a_handler_answering_in_the_old_shape_stops_the_worker() {
    let sc = Scenario::new("exec-old-shape", 1);
    let Scenario { dir, topic, group } = &sc;
    sc.produce(20, &[]);
    let old = python_handler(
        dir,
        "old.py",
        "import sys, json\nfor line in sys.stdin:\n    print(json.dumps({'failed': []}), flush=True)\n",
    );
    let mut w = sc.exec_worker("w", free_port(), &old, &[]);
    let status = w
        .wait_for_exit(Duration::from_secs(60))
        .expect("the worker stops by itself");
    assert_eq!(status.code(), Some(1), "{}", w.stderr());
    assert!(
        w.stderr().contains("without \"batch_id\"") && w.stderr().contains("misconfigured"),
        "{}",
        w.stderr()
    );
    let committed = lag_json(topic, group)["partitions"][0]["committed"].as_i64();
    assert!(
        committed.unwrap_or(0) == 0,
        "nothing was answered, nothing may be committed: {committed:?}"
    );
}

/// A handler whose start-up (3 s, an interpreter's imports or a JVM) is
/// longer than `--handler-timeout-ms` (1 s) gets its first batch through:
/// a child's first batch has `--handler-startup-ms` on top. Before, each
/// first batch timed out, the child was killed and started again, for ever.
#[test]
fn a_handler_slower_to_start_than_its_timeout_gets_its_first_batch_through() {
    let sc = Scenario::new("exec-startup", 1);
    let Scenario { dir, topic, group } = &sc;
    sc.produce(50, &[]);
    let log = dir.path("handled.txt");
    let handler = logging_handler_with(dir, &log, "import time\ntime.sleep(3)\n", "");
    let mut w = sc.exec_worker(
        "w",
        free_port(),
        &handler,
        &["--handler-timeout-ms", "1000", "--concurrency", "1"],
    );
    sc.wait_for_lag_zero(Duration::from_secs(60));
    w.terminate();
    let (expected, _) = assert_recorded_or_dead(topic, group, &[log], &BTreeSet::new());
    assert_eq!(expected, 50);
}

/// No secret reaches a dead letter: records an HTTP endpoint refuses (400)
/// are dead-lettered by a worker that reads Kafka with a SCRAM password and
/// calls a URL carrying a user, a password and a token in its query. The
/// dead letters, read with another client, carry why (the 400) and none of
/// the three secrets in any header, key or value; nor do the worker's log,
/// `/metrics` or `/readyz`.
#[test]
fn no_secret_reaches_a_dead_letter_a_log_or_a_metric() {
    let Some(env) = scram_listener() else {
        return;
    };
    let sc = Scenario::new("dlq-secrets", 1);
    let Scenario { dir, topic, group } = &sc;
    let dlq = sc.dead_letter_topic(1);
    sc.produce(100, &["--poison-every", "20"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (url_password, url_token) = ("urlpass-5c1d", "qtok-88e2");
    let url = format!(
        "http://svc:{url_password}@{}/batches?token={url_token}",
        listener.local_addr().unwrap()
    );
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Some(body) = read_http_body(&stream) else {
                continue;
            };
            let (status, answer) = if String::from_utf8_lossy(&body).contains("POISON") {
                ("400 Bad Request", "{\"error\":\"schema mismatch\"}")
            } else {
                ("200 OK", "{\"failed\":[]}")
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    let mut cmd = run_over_scram(&env);
    cmd
        // Set in every pod on AWS: ignored by a SCRAM login, not refused.
        .env("AWS_REGION", "eu-west-1");
    let port = free_port();
    let mut w = spawn_worker_with(
        cmd,
        dir,
        "w",
        topic,
        group,
        port,
        &[
            "--handler",
            "http",
            "--url",
            &url,
            "--max-records",
            "10",
            "--log-level",
            "debug",
        ],
    );
    sc.wait_for_lag_zero(Duration::from_secs(120));
    let (_, metrics) = http_get(port, "/metrics").expect("the worker serves /metrics");
    let (_, ready) = http_get(port, "/readyz").expect("the worker serves /readyz");
    w.terminate();
    let letters = read_topic(&dlq, broker().bootstrap());
    assert_eq!(
        letters.len(),
        poison_offsets(topic).len(),
        "every refused record was dead-lettered once"
    );
    let secrets = [env["KAFKA_PASSWORD"].as_str(), url_password, url_token];
    for (partition, offset, key, value, headers) in &letters {
        let error = headers.get("microbatch.error").map(String::as_str);
        assert!(
            error
                .is_some_and(|e| e.contains("400") && e.contains("***@") && e.contains("/batches")),
            "dead letter {partition}/{offset} says why, naming the endpoint masked: {headers:?}"
        );
        let text = format!("{key:?} {value} {headers:?}");
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "a secret reached dead letter {partition}/{offset}: {headers:?}"
            );
        }
    }
    let log = w.stderr();
    for secret in secrets {
        for (what, text) in [("log", &log), ("/metrics", &metrics), ("/readyz", &ready)] {
            assert!(!text.contains(secret), "a secret reached the {what}");
        }
    }
}

/// Run as PID 1 (a bare `docker run`; here a PID namespace of its own):
/// the orphans a handler leaves behind (`sh -c` backgrounding, a child
/// killed with its group) are reaped, not left as zombies for ever, and a
/// SIGTERM sent to PID 1 reaches the worker, which drains and exits 0.
#[test]
fn as_pid_1_the_worker_reaps_orphans_and_passes_sigterm_on() {
    let unshare = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !unshare {
        assert!(
            !in_ci(),
            "CI must run tests as root with unshare (util-linux)"
        );
        eprintln!("skipped: no PID namespace here (unshare needs root)");
        return;
    }
    let dir = TestDir::new("pid-1");
    let topic = unique("pid1");
    let group = unique("pid1-g");
    create_topic(&topic, 2);
    let log = dir.path("handled.log");
    // Each handler start leaves three orphans that exit at once.
    let command = format!(
        "for i in 1 2 3; do (sleep 0.1 &); done; exec {}",
        logging_handler(&dir, &log, "")
    );
    let mut cmd = command_through(
        "unshare",
        &["--pid", "--fork", "--mount-proc", "--kill-child"],
    );
    cmd.args(["run", "--bootstrap-servers", broker().bootstrap()]);
    let mut worker = spawn_worker_with(
        cmd,
        &dir,
        "w",
        &topic,
        &group,
        free_port(),
        &[
            "--handler",
            "exec",
            "--command",
            &command,
            "--concurrency",
            "2",
            "--dlq",
            "off",
        ],
    );
    produce(&topic, 20, &[]);
    wait_for_lag_zero(&topic, &group, Duration::from_secs(60));
    // The namespace's PID 1 is unshare's child.
    let init = children_of(worker.child.id())
        .first()
        .copied()
        .expect("unshare runs the binary");
    std::thread::sleep(Duration::from_secs(2));
    let zombies = zombie_children_of(init);
    // SAFETY: kill(2) on a process this test started.
    unsafe { libc::kill(init as i32, libc::SIGTERM) };
    let status = worker.wait_for_exit(Duration::from_secs(30));
    assert!(
        zombies.is_empty(),
        "PID 1 left {} orphans unreaped: {zombies:?}",
        zombies.len()
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM to PID 1 did not end the worker cleanly: {status:?}\n{}",
        worker.stderr()
    );
    assert_eq!(read(&log).lines().count(), 20, "every record handled");
}
