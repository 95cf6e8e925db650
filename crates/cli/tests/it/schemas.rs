//! Schemas: records written by confluent-kafka's own serializers (Python's
//! AvroSerializer, ProtobufSerializer and JSONSerializer) against a real
//! schema registry (Apicurio, scripts/registry-local.sh) reach an exec
//! handler decoded; undecodable records are dead-lettered with the reason;
//! a registry stopped mid-run holds records without a dead letter; filters
//! select exactly the records they name.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::RwLock;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

/// Tests that only read the registry share it; the one that stops it
/// runs alone.
static REGISTRY: RwLock<()> = RwLock::new(());

/// The registry's API URL (`MICROBATCH_TEST_SCHEMA_REGISTRY`, set by
/// scripts/test.sh) and a Python with confluent-kafka's serializers
/// (`MICROBATCH_TEST_PYTHON`): outside CI, a test without them skips.
fn setting(name: &str) -> Option<String> {
    let value = std::env::var(name).ok().filter(|v| !v.is_empty());
    if value.is_none() {
        assert!(
            !in_ci(),
            "CI must test schemas: {name} is not set (run scripts/test.sh)"
        );
        eprintln!("skipped: {name} is not set (run scripts/test.sh)");
    }
    value
}

struct Setup {
    registry: String,
    python: String,
}

fn setup() -> Option<Setup> {
    Some(Setup {
        registry: setting("MICROBATCH_TEST_SCHEMA_REGISTRY")?,
        python: setting("MICROBATCH_TEST_PYTHON")?,
    })
}

/// Writes a scenario's records with confluent-kafka's serializers; its
/// standard output.
fn write_records(setup: &Setup, topic: &str, scenario: &str, extra: &[&str]) -> String {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/schemas/write_records.py");
    let out = Command::new(&setup.python)
        .arg(script)
        .args([broker().bootstrap(), &setup.registry, topic, scenario])
        .args(extra)
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .expect("running write_records.py");
    assert!(
        out.status.success(),
        "write_records.py {scenario}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A test directory, a fresh one-partition topic and a group name.
fn one_partition_topic(name: &str) -> (TestDir, String, String) {
    let topic = unique(name);
    create_topic(&topic, 1);
    (TestDir::new(name), topic, unique("schemas"))
}

/// An exec handler that appends each record it is handed, as JSON, to
/// `records.jsonl`.
fn json_recorder(dir: &TestDir) -> String {
    let log = dir.path("records.jsonl");
    python_handler(
        dir,
        "json_recorder.py",
        format!(
            "import sys, json\n\
             out = open({log:?}, 'a')\n\
             for line in sys.stdin:\n\
             \x20   b = json.loads(line)\n\
             \x20   out.write(''.join(json.dumps(r) + '\\n' for r in b['records']))\n\
             \x20   out.flush()\n\
             \x20   print(json.dumps({{'batch_id': b['batch_id'], 'failed': []}}), flush=True)\n"
        ),
    )
}

/// A worker whose handler records each record it is handed (see
/// [`json_recorder`]), with `flags`.
fn spawn_recorded_worker(
    dir: &TestDir,
    topic: &str,
    group: &str,
    port: u16,
    flags: &[&str],
) -> Proc {
    let handler = json_recorder(dir);
    spawn_exec_worker(dir, "w", topic, group, port, &handler, flags)
}

/// The records the handler was handed, by offset (each once).
fn handed(dir: &TestDir) -> BTreeMap<i64, Value> {
    let text = std::fs::read_to_string(dir.path("records.jsonl")).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let record: Value = serde_json::from_str(line).unwrap();
        let offset = record["offset"].as_i64().unwrap();
        assert!(
            out.insert(offset, record).is_none(),
            "offset {offset} handed twice"
        );
    }
    out
}

/// The dead letters of `topic`: original offset -> `microbatch.error`.
fn dead_letters(topic: &str) -> BTreeMap<i64, String> {
    read_topic(&format!("{topic}.dlq"), broker().bootstrap())
        .into_iter()
        .map(|r| {
            (
                r.4["microbatch.original.offset"].parse().unwrap(),
                r.4["microbatch.error"].clone(),
            )
        })
        .collect()
}

/// Runs one worker over a one-partition topic written by `scenario` until
/// everything is committed; returns (handed records, dead letters).
/// What a scenario's run left: the records handed (by offset), the dead
/// letters (by original offset, with their error), and the files.
type Outcome = (BTreeMap<i64, Value>, BTreeMap<i64, String>, TestDir);

/// `None`: skipped (no registry outside CI).
fn decode_scenario(scenario: &str, format: &str, extra: &[&str]) -> Option<Outcome> {
    let setup = &setup()?;
    let _shared = REGISTRY.read().unwrap_or_else(|e| e.into_inner());
    let (dir, topic, group) = one_partition_topic(&format!("schemas-{scenario}"));
    write_records(setup, &topic, scenario, &[]);
    let mut worker = spawn_recorded_worker(
        &dir,
        &topic,
        &group,
        0,
        &[
            &[
                "--value-format",
                format,
                "--schema-registry-url",
                &setup.registry,
            ],
            extra,
        ]
        .concat(),
    );
    wait_for_lag_zero(&topic, &group, Duration::from_secs(60));
    worker.terminate();
    Some((handed(&dir), dead_letters(&topic), dir))
}

fn value(record: &Value) -> &Value {
    &record["value"]
}

#[test]
fn avro_records_of_two_schema_versions_reach_the_handler_as_json() {
    let Some((records, dead, _dir)) = decode_scenario("avro", "avro", &["--key-format", "avro"])
    else {
        return;
    };
    let order = |i: i64, note: Value| {
        json!({
            "id": i, "customer": format!("c{i}"), "price": format!("{i}.5{i}"),
            "placed_at": format!("2024-05-01T12:00:0{i}.123Z"), "day": "2024-05-01",
            "ref": format!("00000000-0000-4000-8000-{i:012}"),
            "status": if i % 2 == 1 { "PAID" } else { "NEW" }, "note": note,
        })
    };
    // Offsets 0-2: version 1; 3-5: undecodable; 6: version 1 with its id
    // in a header; 7-8: version 2 (a field added with a default).
    assert_eq!(
        records.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 6, 7, 8]
    );
    assert_eq!(value(&records[&0]), &order(1, Value::Null));
    assert_eq!(value(&records[&1]), &order(2, json!("note 2")));
    assert_eq!(value(&records[&6]), &order(4, json!("note 4")));
    let mut v2 = order(5, Value::Null);
    v2["channel"] = json!("app");
    assert_eq!(value(&records[&7]), &v2);
    let schema = |r: &Value| r["value_schema"].clone();
    assert_eq!(schema(&records[&0])["version"], 1);
    assert_eq!(schema(&records[&7])["version"], 2);
    assert_ne!(schema(&records[&0])["id"], schema(&records[&7])["id"]);
    // Keys decoded with their own schema; null keys stay null.
    assert_eq!(records[&0]["key"], json!({"customer": "c1"}));
    assert!(records[&0]["key_schema"]["subject"]
        .as_str()
        .unwrap()
        .ends_with("-key"));
    assert_eq!(records[&7]["key"], Value::Null);
    assert!(schema(&records[&0])["subject"]
        .as_str()
        .unwrap()
        .ends_with("-value"));
    assert_eq!(dead.keys().copied().collect::<Vec<_>>(), [3, 4, 5]);
    assert!(
        dead[&3].contains("undecodable") && dead[&3].contains("magic byte"),
        "{}",
        dead[&3]
    );
    assert!(
        dead[&4].contains("has no schema 2147483632"),
        "{}",
        dead[&4]
    );
    assert!(dead[&5].contains("schema "), "{}", dead[&5]);
}

#[test]
fn protobuf_records_reach_the_handler_by_the_protobuf_json_mapping() {
    let Some((records, dead, _dir)) = decode_scenario("protobuf", "protobuf", &[]) else {
        return;
    };
    assert_eq!(records.keys().copied().collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(
        value(&records[&0]),
        &json!({"orderId": "10000000001", "customer": "c1", "placedAt": "2024-05-01T12:00:01.500Z",
                "status": "PAID", "lines": [{"sku": "s1", "qty": 1}]})
    );
    // NEW is the enum's default: left out, as the mapping does.
    assert_eq!(
        value(&records[&1]),
        &json!({"orderId": "10000000002", "customer": "c2", "placedAt": "2024-05-01T12:00:02.500Z",
                "lines": [{"sku": "s2", "qty": 2}]})
    );
    // The file's second message (message indexes [1]).
    assert_eq!(value(&records[&2]), &json!({"reason": "late"}));
    assert_eq!(dead.keys().copied().collect::<Vec<_>>(), [3, 4, 5]);
    assert!(dead[&5].contains("message indexes"), "{}", dead[&5]);
}

#[test]
fn json_schema_records_are_validated_against_their_schema() {
    let Some((records, dead, _dir)) = decode_scenario("json-schema", "json-schema", &[]) else {
        return;
    };
    assert_eq!(value(&records[&0]), &json!({"id": 1, "name": "p1"}));
    assert_eq!(value(&records[&1]), &json!({"id": 2, "name": "p2"}));
    assert_eq!(records.len(), 2);
    assert_eq!(dead.keys().copied().collect::<Vec<_>>(), [2, 3, 4]);
    assert!(
        dead[&4].contains("does not match the schema"),
        "{}",
        dead[&4]
    );
}

/// A registry stopped while records that need a schema the worker has not
/// fetched yet arrive: the worker holds them, dead-letters none, and goes
/// on when the registry is back.
#[test]
fn a_registry_stopped_mid_run_holds_records_and_nothing_is_dead_lettered() {
    let Some(setup) = setup() else { return };
    let _alone = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    let (dir, topic, group) = one_partition_topic("schemas-outage");
    write_records(&setup, &topic, "avro-v2", &["0", "40"]);
    let port = free_port();
    let mut worker = spawn_recorded_worker(
        &dir,
        &topic,
        &group,
        port,
        &[
            "--value-format",
            "avro",
            "--schema-registry-url",
            &setup.registry,
        ],
    );
    wait_for_lag_zero(&topic, &group, Duration::from_secs(60));
    assert_eq!(handed(&dir).len(), 40);

    // A new schema, registered while the worker is stopped, then the
    // registry goes away before the worker can fetch it.
    worker.signal(libc::SIGSTOP);
    write_records(&setup, &topic, "avro-v3", &["40", "80"]);
    let stopped = StoppedRegistry::new();
    worker.signal(libc::SIGCONT);
    wait_until(Duration::from_secs(60), "the circuit to open", || {
        worker_metric(port, "microbatch_circuit_open") == Some(1.0)
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(handed(&dir).len(), 40, "nothing handed without its schema");
    assert!(total_lag(&topic, &group) > 0);
    drop(stopped);
    wait_for_lag_zero(&topic, &group, Duration::from_secs(120));
    worker.terminate();
    let records = handed(&dir);
    assert_eq!(records.len(), 80, "every record handed once");
    assert!(records
        .values()
        .skip(40)
        .all(|r| r["value"]["channel"] == "app"));
    assert_eq!(dead_letters(&topic), BTreeMap::new(), "no dead letter");
}

/// The registry stopped until this is dropped, also when the test fails:
/// the tests after it need the registry.
struct StoppedRegistry;

impl StoppedRegistry {
    fn new() -> Self {
        registry_script("stop");
        StoppedRegistry
    }
}

impl Drop for StoppedRegistry {
    fn drop(&mut self) {
        // No assertion here: a panic while the test unwinds would abort.
        if !registry_script_ok("start") && !std::thread::panicking() {
            panic!("registry-local.sh start failed");
        }
    }
}

fn registry_script(action: &str) {
    assert!(registry_script_ok(action), "registry-local.sh {action}");
}

fn registry_script_ok(action: &str) -> bool {
    Command::new(scripts_dir().join("registry-local.sh"))
        .arg(action)
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `produce --value-format avro` writes records that confluent-kafka's
/// AvroDeserializer reads, and that the worker decodes.
#[test]
fn produce_writes_avro_that_both_readers_decode() {
    let Some(setup) = setup() else { return };
    let _shared = REGISTRY.read().unwrap_or_else(|e| e.into_inner());
    let (dir, topic, group) = one_partition_topic("schemas-produce");
    let schema =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/lib/order.avsc");
    let (status, out, err) = run_to_end(&[
        "produce",
        "--bootstrap-servers",
        broker().bootstrap(),
        "--topic",
        &topic,
        "--count",
        "300",
        "--value-format",
        "avro",
        "--schema",
        schema.to_str().unwrap(),
        "--schema-registry-url",
        &setup.registry,
        "--quiet",
    ]);
    assert!(status.success(), "{out}{err}");
    let ids: Vec<u64> = write_records(&setup, &topic, "read-avro", &["300"])
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(
        ids,
        (0..300).collect::<Vec<_>>(),
        "confluent-kafka reads them in order"
    );
    let mut worker = spawn_recorded_worker(
        &dir,
        &topic,
        &group,
        0,
        &[
            "--value-format",
            "avro",
            "--schema-registry-url",
            &setup.registry,
        ],
    );
    wait_for_lag_zero(&topic, &group, Duration::from_secs(60));
    worker.terminate();
    let records = handed(&dir);
    assert_eq!(records.len(), 300);
    for (offset, record) in &records {
        assert_eq!(record["value"]["id"], *offset);
        assert_eq!(record["value_schema"]["subject"], format!("{topic}-value"));
    }
}

/// Filters on decoded JSON pass exactly the records their patterns name;
/// the others are committed without the handler and counted.
#[test]
fn filters_select_exactly_the_records_the_pattern_names() {
    let (dir, topic, group) = one_partition_topic("schemas-filter");
    let kinds = ["order", "refund", "ping"];
    let mut lines = String::new();
    let mut expected = std::collections::BTreeSet::new();
    for i in 0..120u32 {
        let kind = kinds[(i % 3) as usize];
        let total = (i * 7) % 250;
        let key = if i % 10 == 0 {
            format!("vip-{i}")
        } else {
            format!("k{i}")
        };
        let value = json!({"kind": kind, "total": total, "id": i});
        if (kind == "order" && total > 100) || key.starts_with("vip-") {
            expected.insert(i);
        }
        lines.push_str(&format!("{key}\t{value}\n"));
    }
    let input = dir.path("input.txt");
    std::fs::write(&input, &lines).unwrap();
    produce_lines(&topic, &input);
    let port = free_port();
    let mut worker = spawn_recorded_worker(
        &dir,
        &topic,
        &group,
        port,
        &[
            "--value-format",
            "json",
            "--filter",
            r#"{"value":{"kind":["order"],"total":[{"numeric":[">",100]}]}}"#,
            "--filter",
            r#"{"key":[{"prefix":"vip-"}]}"#,
        ],
    );
    wait_for_lag_zero(&topic, &group, Duration::from_secs(60));
    let filtered = worker_metric(port, "microbatch_records_filtered_total");
    worker.terminate();
    let got: std::collections::BTreeSet<u32> = handed(&dir)
        .values()
        .map(|r| r["value"]["id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(got, expected);
    assert_eq!(filtered, Some((120 - expected.len()) as f64));
}

/// Writes `key<TAB>value` lines to `topic`, one record each.
fn produce_lines(topic: &str, path: &std::path::Path) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker().bootstrap())
        .create()
        .unwrap();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let (key, value) = line.split_once('\t').unwrap();
        producer
            .send(BaseRecord::to(topic).key(key).payload(value))
            .map_err(|(e, _)| e)
            .unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// A registry that refuses the worker's credentials, or redirects, or is
/// not a registry at all stops the worker at start, naming the cause;
/// flags that cannot work exit 2 naming the flag.
#[test]
fn bad_registry_settings_stop_the_worker_at_start() {
    for (status, says) in [
        ("401 Unauthorized", "refused the credentials"),
        ("403 Forbidden", "refused the credentials"),
        ("302 Found\r\nLocation: http://127.0.0.1:1/", "redirect"),
        ("404 Not Found", "base URL"),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/apis/ccompat/v7", listener.local_addr().unwrap());
        let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            stream.write_all(answer.as_bytes()).unwrap();
        });
        let topic = unique("schemas-bad");
        let (code, _, err) = run_to_end(&[
            "run",
            "--bootstrap-servers",
            broker().bootstrap(),
            "--topic",
            &topic,
            "--group",
            "g",
            "--http-port",
            "0",
            "--value-format",
            "avro",
            "--schema-registry-url",
            &url,
        ]);
        server.join().unwrap();
        assert_eq!(code.code(), Some(1), "{status}: {err}");
        assert!(err.contains(says), "{status}: {err}");
    }
    for (args, flag) in [
        (vec!["--value-format", "avro"], "--value-format"),
        (vec!["--key-format", "protobuf"], "--key-format"),
        (vec!["--value-format", "xml"], "--value-format"),
        (vec!["--filter", r#"{"value":{"a":"b"}}"#], "--filter"),
        (
            vec![
                "--value-format",
                "avro",
                "--schema-registry-url",
                "http://u:p@127.0.0.1:1",
            ],
            "--schema-registry-url",
        ),
    ] {
        let (code, err) = run_refused(&args);
        assert_eq!(code.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: {err}");
        assert!(!err.contains("u:p@"), "credentials quoted: {err}");
    }
}

/// A registry that answers anything after reading a request: the
/// requests it read, one string each.
fn recording_registry(answers: Vec<String>) -> (String, std::thread::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/apis/ccompat/v7", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for answer in answers {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut buf = vec![0u8; 8192];
            let n = stream.read(&mut buf).unwrap_or(0);
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = stream.write_all(answer.as_bytes());
        }
        seen
    });
    (url, server)
}

fn answer(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Credentials reach the registry from the environment only, as basic
/// auth or a bearer token, and never the worker's log.
#[test]
fn registry_credentials_come_from_the_environment() {
    for (env, expected) in [
        (
            vec![
                ("SCHEMA_REGISTRY_USER", "reader"),
                ("SCHEMA_REGISTRY_PASSWORD", "s3cret-pw"),
            ],
            "authorization: Basic cmVhZGVyOnMzY3JldC1wdw==",
        ),
        (
            vec![("SCHEMA_REGISTRY_TOKEN", "s3cret-token")],
            "authorization: Bearer s3cret-token",
        ),
    ] {
        let (url, server) = recording_registry(vec![
            answer("200 OK", r#"["AVRO"]"#),
            answer(
                "404 Not Found",
                r#"{"error_code":40401,"message":"Subject not found"}"#,
            ),
        ]);
        let dir = TestDir::new("schemas-auth");
        let topic = unique("schemas-auth");
        create_topic(&topic, 1);
        let mut cmd = command();
        cmd.args(["run", "--bootstrap-servers", broker().bootstrap()]);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let port = free_port();
        let mut worker = spawn_worker_with(
            cmd,
            &dir,
            "w",
            &topic,
            &unique("schemas"),
            port,
            &["--value-format", "avro", "--schema-registry-url", &url],
        );
        let seen = server.join().unwrap();
        wait_until(Duration::from_secs(30), "the worker to be ready", || {
            http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)
        });
        worker.terminate();
        assert_eq!(seen.len(), 2);
        for request in &seen {
            assert!(
                request.to_lowercase().contains(&expected.to_lowercase()),
                "{request}"
            );
        }
        assert!(
            seen[0].starts_with("GET /apis/ccompat/v7/schemas/types "),
            "{}",
            seen[0]
        );
        let log = worker.stderr();
        assert!(!log.contains("s3cret"), "a credential in the log: {log}");
    }
}

/// `--schema-registry-ca` makes a registry whose certificate a private CA
/// signed trusted; without it the worker does not reach the registry (it
/// starts, batches would wait); a CA file it cannot read exits 2 naming
/// the flag.
#[test]
fn a_private_ca_makes_an_https_registry_trusted() {
    let Some(scram) = scram_listener() else {
        return;
    };
    // The local broker's certificate (127.0.0.1, signed by its CA).
    let tls = std::path::Path::new(&scram["KAFKA_SSL_CA_LOCATION"])
        .parent()
        .unwrap()
        .to_path_buf();
    let dir = TestDir::new("schemas-tls");
    let requests = dir.path("requests.log");
    let server = dir.path("https_registry.py");
    std::fs::write(
        &server,
        format!(
            "import http.server, ssl, sys\n\
             class H(http.server.BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       open({requests:?}, 'a').write(self.path + '\\n')\n\
             \x20       ok = self.path.endswith('/schemas/types')\n\
             \x20       body = b'[\"AVRO\"]' if ok else b'{{\"error_code\":40401}}'\n\
             \x20       self.send_response(200 if ok else 404)\n\
             \x20       self.send_header('Content-Length', str(len(body)))\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(body)\n\
             \x20   def log_message(self, *a):\n\
             \x20       pass\n\
             srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), H)\n\
             ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
             ctx.load_cert_chain({cert:?}, {key:?})\n\
             srv.socket = ctx.wrap_socket(srv.socket, server_side=True)\n\
             print(srv.server_address[1], flush=True)\n\
             srv.serve_forever()\n",
            cert = tls.join("broker.pem"),
            key = tls.join("broker.key"),
        ),
    )
    .unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new("python3")
            .arg(&server)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = format!("https://127.0.0.1:{}/apis/ccompat/v7", line.trim());
    let topic = unique("schemas-tls");
    create_topic(&topic, 1);
    let ca = tls.join("ca.pem");
    let run = |extra: &[&str]| {
        let port = free_port();
        let mut worker = spawn_worker(
            &dir,
            &format!("w{port}"),
            &topic,
            &unique("schemas"),
            port,
            &[
                &["--value-format", "avro", "--schema-registry-url", &url],
                extra,
            ]
            .concat(),
        );
        wait_until(Duration::from_secs(30), "the worker to be ready", || {
            http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)
        });
        worker.terminate();
        worker.stderr()
    };
    let log = run(&["--schema-registry-ca", ca.to_str().unwrap()]);
    let seen = std::fs::read_to_string(&requests).unwrap_or_default();
    assert!(
        seen.contains("/apis/ccompat/v7/schemas/types"),
        "{seen}\n{log}"
    );
    assert!(log.contains("schema registry reachable"), "{log}");
    std::fs::remove_file(&requests).unwrap();
    let log = run(&[]);
    assert!(!requests.exists(), "no request without trusting the CA");
    assert!(log.contains("unavailable at start"), "{log}");
    let missing = dir.path("missing.pem");
    let (code, err) = run_refused(&[
        "--value-format",
        "avro",
        "--schema-registry-url",
        &url,
        "--schema-registry-ca",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code.code(), Some(2), "{err}");
    assert!(err.contains("--schema-registry-ca"), "{err}");
}

/// `run` against no broker with `args` added: for settings refused before
/// any connection (its exit status and standard error).
fn run_refused(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut all = vec![
        "run",
        "--bootstrap-servers",
        "127.0.0.1:1",
        "--topic",
        "t",
        "--group",
        "g",
    ];
    all.extend(args.iter().copied());
    let (code, _, err) = run_to_end(&all);
    (code, err)
}

/// A child process killed when the test ends, also when it fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
