//! Test harness: a broker per test run, a [`Scenario`] (directory, topic,
//! group, workers) per test, and the real `microbatch` binary run as child
//! processes.
//!
//! The broker is real Kafka when `MICROBATCH_TEST_BOOTSTRAP` names it (as
//! `scripts/test.sh` does). Outside CI, without it, tests fall back to
//! librdkafka's mock cluster, started in this process; with `CI=true` they
//! refuse to, so CI always proves behaviour against real Kafka.

pub mod admin;
mod scenario;

pub use scenario::Scenario;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;

pub const BIN: &str = env!("CARGO_BIN_EXE_microbatch");

/// `microbatch produce` of `count` records at `rate` a second into `topic`,
/// in the background (its stderr in `dir`); `extra` adds its flags.
pub fn produce_steadily(dir: &TestDir, topic: &str, count: u64, rate: u64, extra: &[&str]) -> Proc {
    let mut cmd = command();
    cmd.args(["produce", "--bootstrap-servers", broker().bootstrap()]);
    cmd.args(["--topic", topic, "--quiet"]);
    cmd.args(["--count", &count.to_string(), "--rate", &rate.to_string()]);
    cmd.args(extra);
    Proc::spawn(cmd, dir.path("produce.stderr"))
}

/// Where the tests' broker is.
pub enum Broker {
    Real { bootstrap: String },
    Mock { bootstrap: String },
}

struct MockHolder(MockCluster<'static, rdkafka::producer::DefaultProducerContext>);
// The mock cluster is only created once and then used through its own
// thread-safe C API (create_topic), never moved between threads mid-call.
unsafe impl Send for MockHolder {}
unsafe impl Sync for MockHolder {}

static MOCK: OnceLock<MockHolder> = OnceLock::new();
static BROKER: OnceLock<Broker> = OnceLock::new();

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

pub fn broker() -> &'static Broker {
    BROKER.get_or_init(|| match std::env::var("MICROBATCH_TEST_BOOTSTRAP") {
        Ok(b) if !b.is_empty() => Broker::Real { bootstrap: b },
        _ => {
            assert!(
                !in_ci(),
                "CI=true but MICROBATCH_TEST_BOOTSTRAP is not set: CI must test against real Kafka (run scripts/test.sh)"
            );
            eprintln!("note: no MICROBATCH_TEST_BOOTSTRAP; using librdkafka's mock cluster");
            let mock = MOCK.get_or_init(|| MockHolder(MockCluster::new(3).expect("starting the mock cluster")));
            Broker::Mock {
                bootstrap: mock.0.bootstrap_servers(),
            }
        }
    })
}

impl Broker {
    pub fn bootstrap(&self) -> &str {
        match self {
            Broker::Real { bootstrap } | Broker::Mock { bootstrap } => bootstrap,
        }
    }

    pub fn is_real(&self) -> bool {
        matches!(self, Broker::Real { .. })
    }
}

/// The SCRAM listener's settings from `.kafka-local/scram.env`, if known.
pub fn scram_env() -> Option<BTreeMap<String, String>> {
    let path = std::env::var("MICROBATCH_TEST_SCRAM_ENV").ok()?;
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// [`scram_env`] for a test that needs the SCRAM listener: outside CI a
/// missing listener skips the test (`None`, said on stderr); in CI it fails.
pub fn scram_listener() -> Option<BTreeMap<String, String>> {
    let env = scram_env();
    if env.is_none() {
        assert!(
            !in_ci(),
            "CI must test SCRAM: MICROBATCH_TEST_SCRAM_ENV not set"
        );
        eprintln!("skipped: no SCRAM listener (run scripts/test.sh)");
    }
    env
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique name for this test's topic or group.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            % 100_000
    )
}

pub fn create_topic(topic: &str, partitions: i32) {
    create_topic_with_configs(topic, partitions, &[]);
}

/// [`create_topic`] with topic configs (`max.message.bytes`), which the
/// mock cluster ignores.
pub fn create_topic_with_configs(topic: &str, partitions: i32, configs: &[(&str, &str)]) {
    match broker() {
        Broker::Mock { .. } => {
            MOCK.get()
                .expect("mock started with the broker")
                .0
                .create_topic(topic, partitions, 1)
                .expect("creating a mock topic");
        }
        Broker::Real { bootstrap } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", bootstrap)
                    .create()
                    .unwrap();
                let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
                for (key, value) in configs {
                    new_topic = new_topic.set(key, value);
                }
                let res = admin
                    .create_topics(
                        &[new_topic],
                        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
                    )
                    .await
                    .expect("create_topics");
                for r in res {
                    r.expect("topic created");
                }
            });
        }
    }
}

/// A directory of this test's own, removed at the end unless the test failed.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("microbatch-test-{}", unique(name)));
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() && std::env::var_os("MICROBATCH_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("test files kept in {}", self.0.display());
        }
    }
}

/// Whether the tests run under the classic group protocol (the default;
/// MICROBATCH_TEST_GROUP_PROTOCOL=consumer runs them under KIP-848, where
/// session settings are the broker's and the client refuses them).
pub fn classic_protocol() -> bool {
    std::env::var("MICROBATCH_TEST_GROUP_PROTOCOL").as_deref() != Ok("consumer")
}

/// The binary with an environment cleared of our variables, so a developer's
/// shell cannot change what a test means.
pub fn command() -> Command {
    command_through(BIN, &[])
}

/// [`command`] started through `program` with `args` before the binary
/// (`unshare --pid --fork`, say).
pub fn command_through(program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if program != BIN {
        cmd.arg(BIN);
    }
    for (k, _) in std::env::vars() {
        if k.starts_with("KAFKA_")
            || k.starts_with("MICROBATCH_")
            || k.starts_with("SCHEMA_REGISTRY_")
            || ["BATCH_SIZE", "PROCESS_TIME_SECONDS", "CONSUMER_GROUP"].contains(&k.as_str())
        {
            cmd.env_remove(k);
        }
    }
    // MICROBATCH_TEST_LOG: a log filter for every process a test starts.
    let log = std::env::var("MICROBATCH_TEST_LOG").unwrap_or_else(|_| "info".into());
    cmd.env("MICROBATCH_LOG", log);
    // The group protocol the whole run tests (scripts/test.sh runs the
    // rebalance tests under both).
    if let Ok(protocol) = std::env::var("MICROBATCH_TEST_GROUP_PROTOCOL") {
        cmd.env("MICROBATCH_GROUP_PROTOCOL", protocol);
    }
    cmd
}

/// Runs the binary to completion; returns (status, stdout, stderr).
/// `microbatch topic ACTION --topic TOPIC` on the test broker: (success,
/// stdout, stderr).
pub fn topic_cmd(action: &str, topic: &str, extra: &[&str]) -> (bool, String, String) {
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

pub fn run_to_end(args: &[&str]) -> (ExitStatus, String, String) {
    let out = command()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running microbatch");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn produce(topic: &str, count: u64, extra: &[&str]) {
    produce_on(broker().bootstrap(), topic, count, extra)
}

/// `produce` to the brokers at `bootstrap` (a mock cluster of the test's own).
pub fn produce_on(bootstrap: &str, topic: &str, count: u64, extra: &[&str]) {
    let count = count.to_string();
    let mut args = vec![
        "produce",
        "--bootstrap-servers",
        bootstrap,
        "--topic",
        topic,
        "--count",
        &count,
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let (status, out, err) = run_to_end(&args);
    assert!(status.success(), "produce failed: {out}\n{err}");
}

/// A child process killed (SIGKILL) if the test ends while it runs.
pub struct Proc {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, stderr_path: PathBuf) -> Self {
        let err = std::fs::File::create(&stderr_path).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawning microbatch");
        Proc { child, stderr_path }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then asserts a clean exit within a minute.
    pub fn terminate(&mut self) {
        self.signal(15);
        let status = self
            .wait_for_exit(Duration::from_secs(60))
            .expect("exits within a minute of SIGTERM");
        assert!(status.success(), "{status:?}\n{}", self.stderr());
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `microbatch run` against the test broker with an audit log.
pub fn spawn_worker(
    dir: &TestDir,
    name: &str,
    topic: &str,
    group: &str,
    port: u16,
    extra: &[&str],
) -> Proc {
    let mut cmd = command();
    cmd.args(["run", "--bootstrap-servers", broker().bootstrap()]);
    spawn_worker_with(cmd, dir, name, topic, group, port, extra)
}

/// `spawn_worker` from a prepared command (`run` and its connection flags
/// or environment already set).
pub fn spawn_worker_with(
    cmd: Command,
    dir: &TestDir,
    name: &str,
    topic: &str,
    group: &str,
    port: u16,
    extra: &[&str],
) -> Proc {
    spawn_member_with(cmd, dir, name, topic, ("--group", group), port, extra)
}

/// `microbatch run` over the SCRAM/TLS listener of [`scram_listener`]'s
/// environment, whose user the broker's authorizer may deny things.
pub fn run_over_scram(env: &BTreeMap<String, String>) -> Command {
    over_scram(env, &["run"])
}

/// `microbatch <subcommand>` connecting to the SCRAM listener through the
/// environment, as the kit's pods do.
pub fn over_scram(env: &BTreeMap<String, String>, subcommand: &[&str]) -> Command {
    let mut cmd = command();
    cmd.args(subcommand)
        .env("KAFKA_BOOTSTRAP_SERVERS", &env["KAFKA_BOOTSTRAP_SERVERS"])
        .env("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
        .env("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
        .env("KAFKA_USERNAME", &env["KAFKA_USERNAME"])
        .env("KAFKA_PASSWORD", &env["KAFKA_PASSWORD"])
        .env("KAFKA_SSL_CA_LOCATION", &env["KAFKA_SSL_CA_LOCATION"]);
    cmd
}

/// An ACL added with Kafka's `kafka-acls` (`--force` implied) and removed
/// when dropped, however the test ends. The broker allows everyone what no
/// ACL names, so an ALLOW for one operation on a resource denies the
/// others there.
pub struct Acl(Vec<String>);

impl Acl {
    pub fn add(spec: &[&str]) -> Self {
        let acl = Acl(spec.iter().map(|s| s.to_string()).collect());
        let added = acl.run("--add");
        assert!(
            added.status.success(),
            "kafka-acls --add: {}",
            String::from_utf8_lossy(&added.stderr)
        );
        // The controller has it; the broker's authorizer applies it a moment
        // later: until the broker lists it, a request could still pass.
        let resource: Vec<&str> = spec
            .windows(2)
            .filter(|w| matches!(w[0], "--topic" | "--group"))
            .flat_map(|w| w.iter().copied())
            .collect();
        wait_until(
            Duration::from_secs(30),
            "the broker to list the ACL",
            || {
                let listed = Command::new(scripts_dir().join("kafka-local.sh"))
                    .args([
                        "tool",
                        "acls",
                        "--bootstrap-server",
                        broker().bootstrap(),
                        "--list",
                    ])
                    .args(&resource)
                    .output()
                    .expect("running kafka-acls");
                String::from_utf8_lossy(&listed.stdout).contains("principal=User:")
            },
        );
        acl
    }

    fn run(&self, action: &str) -> std::process::Output {
        Command::new(scripts_dir().join("kafka-local.sh"))
            .args([
                "tool",
                "acls",
                "--bootstrap-server",
                broker().bootstrap(),
                action,
                "--force",
            ])
            .args(&self.0)
            .output()
            .expect("running kafka-acls")
    }
}

impl Drop for Acl {
    fn drop(&mut self) {
        let _ = self.run("--remove");
    }
}

/// Asserts that `worker`, refused something by `acl` at start, stopped by
/// itself (exit 1) within 60 s, saying each of `says`, before its handler
/// (which appends to `log`) saw a record. The ACL goes first, so that a
/// failed assertion leaves none behind.
pub fn assert_stopped_at_start(worker: &mut Proc, acl: Acl, says: &[&str], log: &Path) {
    let status = worker.wait_for_exit(Duration::from_secs(60));
    let err = worker.stderr();
    drop(acl);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "the worker stops by itself: {err}"
    );
    for said in says {
        assert!(err.contains(said), "says {said:?}: {err}");
    }
    assert!(!log.exists(), "the handler never saw a record");
}

/// `spawn_worker` in a share group (`--share-group`). `port` 0: any free
/// one (a port picked ahead can be taken by an outgoing connection first).
pub fn spawn_share_worker(
    dir: &TestDir,
    name: &str,
    topic: &str,
    share_group: &str,
    port: u16,
    extra: &[&str],
) -> Proc {
    let mut cmd = command();
    cmd.args(["run", "--bootstrap-servers", broker().bootstrap()]);
    spawn_member_with(
        cmd,
        dir,
        name,
        topic,
        ("--share-group", share_group),
        port,
        extra,
    )
}

/// A worker from a prepared command (`run` and its connection flags or
/// environment set) in a consumer group (`("--group", name)`) or a share
/// group (`("--share-group", name)`).
pub fn spawn_member_with(
    mut cmd: Command,
    dir: &TestDir,
    name: &str,
    topic: &str,
    (group_flag, group): (&str, &str),
    port: u16,
    extra: &[&str],
) -> Proc {
    // The recording handler names its files after the worker that runs it.
    cmd.env("MICROBATCH_TEST_WORKER", name);
    cmd.args([
        "--topic",
        topic,
        group_flag,
        group,
        "--http-host",
        "127.0.0.1",
        "--http-port",
        &port.to_string(),
        "--audit-log",
        dir.path(&format!("{name}.audit")).to_str().unwrap(),
        "--max-wait-ms",
        "100",
    ]);
    // A test may set its own interval; otherwise commits come quickly.
    if !extra.contains(&"--commit-interval-ms") {
        cmd.args(["--commit-interval-ms", "200"]);
    }
    cmd.args(extra);
    Proc::spawn(cmd, dir.path(&format!("{name}.stderr")))
}

/// `spawn_worker` with the `exec` handler running `command`.
pub fn spawn_exec_worker(
    dir: &TestDir,
    name: &str,
    topic: &str,
    group: &str,
    port: u16,
    command: &str,
    extra: &[&str],
) -> Proc {
    let mut args = vec!["--handler", "exec", "--command", command];
    args.extend_from_slice(extra);
    spawn_worker(dir, name, topic, group, port, &args)
}

/// A plain HTTP/1.1 GET over TCP: (status code, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Polls `check` until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The group's lag as `microbatch lag --json` reports it.
/// Runs `microbatch lag` for the group with `extra` flags, counting
/// partitions without a commit from their start, as the workers read them.
pub fn run_lag(topic: &str, group: &str, extra: &[&str]) -> (ExitStatus, String, String) {
    run_lag_on(broker().bootstrap(), topic, group, extra)
}

/// [`run_lag`] on the cluster at `bootstrap`.
pub fn run_lag_on(
    bootstrap: &str,
    topic: &str,
    group: &str,
    extra: &[&str],
) -> (ExitStatus, String, String) {
    let mut args = vec![
        "lag",
        "--bootstrap-servers",
        bootstrap,
        "--topic",
        topic,
        "--group",
        group,
        "--offset-reset-policy",
        "earliest",
    ];
    args.extend_from_slice(extra);
    run_to_end(&args)
}

/// The first `readings` JSON lines of `microbatch lag --watch --json` with
/// `extra` flags, read from one process (whose state carries over).
pub fn lag_watch_json(
    topic: &str,
    group: &str,
    extra: &[String],
    readings: usize,
) -> Vec<serde_json::Value> {
    let mut child = command()
        .args(["lag", "--bootstrap-servers", broker().bootstrap()])
        .args(["--topic", topic, "--group", group, "--json"])
        .args(["--watch", "--interval-ms", "100"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting microbatch lag");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout is piped"));
    let lines = (0..readings)
        .map(|_| {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut out, &mut line).expect("reading lag");
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("lag printed {line:?}: {e}"))
        })
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    lines
}

pub fn lag_json(topic: &str, group: &str) -> serde_json::Value {
    lag_json_on(broker().bootstrap(), topic, group)
}

/// [`lag_json`] on the cluster at `bootstrap` (a test's own mock cluster).
pub fn lag_json_on(bootstrap: &str, topic: &str, group: &str) -> serde_json::Value {
    let (status, out, err) = run_lag_on(bootstrap, topic, group, &["--json"]);
    assert!(status.success(), "lag failed: {err}");
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("lag --json is not JSON ({e}): {out}"))
}

pub fn total_lag(topic: &str, group: &str) -> i64 {
    lag_json(topic, group)["total_lag"]
        .as_i64()
        .expect("total_lag is a number")
}

/// (partition, offset) pairs from audit logs, with how often each was seen.
pub fn audited(paths: &[PathBuf]) -> BTreeMap<(i32, i64), u32> {
    let mut seen = BTreeMap::new();
    for p in paths {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(p), Some(o)) = (it.next(), it.next()) else {
                continue;
            };
            *seen
                .entry((p.parse().unwrap(), o.parse().unwrap()))
                .or_insert(0) += 1;
        }
    }
    seen
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Every record of a topic (partition 0..n), read from the beginning:
/// (partition, offset, key, value, headers).
pub type Consumed = (i32, i64, Option<String>, String, BTreeMap<String, String>);

pub fn read_topic(topic: &str, bootstrap: &str) -> Vec<Consumed> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let parts: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    let mut highs = BTreeMap::new();
    for p in &parts {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, Duration::from_secs(10))
            .unwrap();
        tpl.add_partition_offset(topic, *p, Offset::Offset(low))
            .unwrap();
        remaining += high - low;
        highs.insert(*p, high);
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while remaining > 0 && Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        if m.offset() >= highs[&m.partition()] {
            continue;
        }
        remaining -= 1;
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or(b"")).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            m.partition(),
            m.offset(),
            m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            String::from_utf8_lossy(m.payload().unwrap_or(b"")).into_owned(),
            headers,
        ));
    }
    assert_eq!(remaining, 0, "read the whole topic {topic}");
    out
}

#[allow(dead_code)] // tests/chaos.rs
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts")
}

/// The value of a metric sample (`name value` line, no labels) in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Reads one metric from a worker's /metrics.
pub fn worker_metric(port: u16, name: &str) -> Option<f64> {
    http_get(port, "/metrics").and_then(|(_, m)| metric(&m, name))
}

/// Stops the broker and starts it again (real Kafka through
/// scripts/kafka-local.sh; the mock cluster by taking its brokers down).
#[allow(dead_code)] // tests/chaos.rs
pub fn restart_broker(down_for: Duration) {
    match broker() {
        Broker::Real { .. } => {
            let script = scripts_dir().join("kafka-local.sh");
            let status = Command::new(&script)
                .arg("stop")
                .status()
                .expect("kafka-local.sh stop");
            assert!(status.success(), "stopping the broker");
            std::thread::sleep(down_for);
            let status = Command::new(&script)
                .arg("start")
                .status()
                .expect("kafka-local.sh start");
            assert!(status.success(), "starting the broker again");
        }
        Broker::Mock { .. } => {
            let mock = &MOCK.get().expect("mock started with the broker").0;
            for id in 1..=3 {
                mock.broker_down(id).expect("mock broker down");
            }
            std::thread::sleep(down_for);
            for id in 1..=3 {
                mock.broker_up(id).expect("mock broker up");
            }
        }
    }
}

/// The value of the first sample of `name` whose labels include `label`
/// (`key="value"`).
pub fn metric_labelled_with(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (labels, value) = rest.split_once("} ")?;
        labels
            .split(',')
            .any(|l| l == label)
            .then(|| value.trim().parse().ok())?
    })
}

/// A labelled metric sample, e.g. `microbatch_commits_total{result="error"}`.
pub fn labelled_metric(text: &str, name_with_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(name_with_labels)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Waits until the group's committed lag on the topic is 0.
pub fn wait_for_lag_zero(topic: &str, group: &str, limit: Duration) {
    wait_until(limit, "lag 0", || total_lag(topic, group) == 0);
}

/// Live (not zombie) children of a process, from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    children_where(pid, |state| state != "Z")
}

/// Zombie children of a process (exited, never reaped), from /proc.
pub fn zombie_children_of(pid: u32) -> Vec<u32> {
    children_where(pid, |state| state == "Z")
}

fn children_where(pid: u32, keep: impl Fn(&str) -> bool) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // After the command name: state, ppid, ...
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid: u32 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid == pid && keep(state) {
            out.push(p);
        }
    }
    out
}

/// Writes a Python exec handler into the test's directory and returns the
/// `--command` that runs it.
pub fn python_handler(dir: &TestDir, name: &str, source: impl AsRef<str>) -> String {
    let path = dir.path(name);
    std::fs::write(&path, source.as_ref()).expect("writing the handler script");
    format!("python3 {}", path.display())
}

/// An exec handler that records every record it finishes, one `partition
/// offset` line each, in `log`, and names records whose value holds POISON
/// as failed for good. `before` is Python run before each answer.
pub fn logging_handler(dir: &TestDir, log: &Path, before: &str) -> String {
    logging_handler_with(dir, log, "", before)
}

/// [`logging_handler`] that first runs `prelude` (Python, once at start).
pub fn logging_handler_with(dir: &TestDir, log: &Path, prelude: &str, before: &str) -> String {
    python_handler(
        dir,
        "recording.py",
        format!(
            "import sys, json, os\n\
             {prelude}\
             fd = os.open({log:?}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n\
             for line in sys.stdin:\n\
             \x20   b = json.loads(line)\n\
             \x20   bad = [r for r in b['records'] if 'POISON' in (r['value'] or '')]\n\
             \x20   ok = [r for r in b['records'] if 'POISON' not in (r['value'] or '')]\n\
             \x20   os.write(fd, ''.join('%d %d\\n' % (r['partition'], r['offset']) for r in ok).encode())\n\
             {before}\
             \x20   failed = [{{'partition': r['partition'], 'offset': r['offset'], 'error': 'poison', 'retryable': False}} for r in bad]\n\
             \x20   print(json.dumps({{'batch_id': b['batch_id'], 'failed': failed}}), flush=True)\n"
        ),
    )
}

/// The records of a topic whose value holds `POISON` (`produce --poison-every`).
pub fn poison_offsets(topic: &str) -> BTreeSet<(i32, i64)> {
    read_topic(topic, broker().bootstrap())
        .into_iter()
        .filter(|r| r.3.contains("POISON"))
        .map(|r| (r.0, r.1))
        .collect()
}

/// The source records a dead-letter topic holds, read with another client
/// (a record written twice counts once).
pub fn dead_lettered(dlq: &str) -> BTreeSet<(i32, i64)> {
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

/// Asserts that every record below each partition's high watermark was
/// recorded in `records` (files of `partition offset` lines, written by the
/// handler itself or an audit log) or is in `dead`, and that the group's
/// committed offsets reach the end. Returns (records, duplicates).
pub fn assert_recorded_or_dead(
    topic: &str,
    group: &str,
    records: &[PathBuf],
    dead: &BTreeSet<(i32, i64)>,
) -> (usize, usize) {
    assert_recorded_or_dead_on(broker().bootstrap(), topic, group, records, dead)
}

/// [`assert_recorded_or_dead`] on the cluster at `bootstrap`.
pub fn assert_recorded_or_dead_on(
    bootstrap: &str,
    topic: &str,
    group: &str,
    records: &[PathBuf],
    dead: &BTreeSet<(i32, i64)>,
) -> (usize, usize) {
    let seen = audited(records);
    let lag = lag_json_on(bootstrap, topic, group);
    let mut n = 0;
    for p in lag["partitions"].as_array().unwrap() {
        let partition = p["partition"].as_i64().unwrap() as i32;
        let (low, high) = (p["low"].as_i64().unwrap(), p["high"].as_i64().unwrap());
        if high > low {
            assert_eq!(
                p["committed"].as_i64(),
                Some(high),
                "partition {partition}: committed offset is not the end"
            );
        }
        for o in low..high {
            n += 1;
            assert!(
                seen.contains_key(&(partition, o)) || dead.contains(&(partition, o)),
                "{partition}/{o} lost: neither recorded nor dead-lettered"
            );
        }
    }
    (n, seen.values().map(|c| *c as usize - 1).sum())
}

/// Reads one HTTP/1.1 request from `stream` and returns its body (the
/// request line and headers are skipped; the length is Content-Length).
pub fn read_http_body(stream: &TcpStream) -> Option<Vec<u8>> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(stream.try_clone().ok()?);
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(body)
}

/// Writes each record of an HTTP batch as "partition offset" to `log`: the
/// downstream's own record of what it accepted, outside the worker.
pub fn accept_batch(body: &[u8], log: &Path) {
    let batch: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let accepted: String = batch["records"]
        .as_array()
        .map(|records| {
            records
                .iter()
                .map(|r| format!("{} {}\n", r["partition"], r["offset"]))
                .collect()
        })
        .unwrap_or_default();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap()
        .write_all(accepted.as_bytes())
        .unwrap();
}

/// An HTTP downstream on 127.0.0.1:`port` that accepts every batch into
/// `log` (see [`accept_batch`]), each request taking `delay`, until the
/// returned flag is set; then it closes its socket, so connections to the
/// port are refused.
pub fn downstream_on(
    port: u16,
    delay: Duration,
    log: PathBuf,
) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        while !flag.load(Ordering::SeqCst) {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            let log = log.clone();
            std::thread::spawn(move || {
                let _ = stream.set_nonblocking(false);
                let Some(body) = read_http_body(&stream) else {
                    return;
                };
                std::thread::sleep(delay);
                accept_batch(&body, &log);
                let answer = "{\"failed\":[]}";
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            });
        }
    });
    stop
}

/// How the test's own exec handler behaves (see [`recording_handler`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct HandlerBehaviour {
    /// Per record and attempt: the chance of a retryable failure.
    pub failure_rate: f64,
    /// Milliseconds of work per record.
    pub ms_per_record: u64,
}

/// Writes an exec handler that records every record it finishes, one
/// `partition offset unix-seconds` line each, in a file of its own process
/// (`handled-<pid>.txt` in the test's directory): the evidence of what was
/// processed, from outside the worker. Records whose value holds POISON are
/// answered as failed for good; others fail (retryable) at random as
/// `behaviour` says. Returns the `--command`.
pub fn recording_handler(dir: &TestDir, behaviour: HandlerBehaviour) -> String {
    let out = dir.0.display().to_string();
    python_handler(
        dir,
        "recording_handler.py",
        format!(
            "import sys, json, os, random, time\n\
             worker = os.environ.get('MICROBATCH_TEST_WORKER', 'worker')\n\
             fd = os.open(os.path.join({out:?}, 'handled-%s-%d.txt' % (worker, os.getpid())), os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n\
             for line in sys.stdin:\n\
             \x20   b = json.loads(line)\n\
             \x20   time.sleep({ms} * len(b['records']) / 1000.0)\n\
             \x20   failed, done = [], []\n\
             \x20   for r in b['records']:\n\
             \x20       if 'POISON' in (r['value'] or ''):\n\
             \x20           failed.append({{'partition': r['partition'], 'offset': r['offset'], 'error': 'poison', 'retryable': False}})\n\
             \x20       elif random.random() < {rate}:\n\
             \x20           failed.append({{'partition': r['partition'], 'offset': r['offset'], 'error': 'busy'}})\n\
             \x20       else:\n\
             \x20           done.append('%d %d %.3f\\n' % (r['partition'], r['offset'], time.time()))\n\
             \x20   os.write(fd, ''.join(done).encode())\n\
             \x20   print(json.dumps({{'batch_id': b['batch_id'], 'failed': failed}}), flush=True)\n",
            ms = behaviour.ms_per_record,
            rate = behaviour.failure_rate,
        ),
    )
}

/// The record files [`recording_handler`] processes wrote in `dir`.
pub fn handled_files(dir: &TestDir) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir.0)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("handled-") && n.ends_with(".txt"))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The records [`recording_handler`] processes in `dir` finished, with how
/// often each was finished.
pub fn handled(dir: &TestDir) -> BTreeMap<(i32, i64), u32> {
    audited(&handled_files(dir))
}

/// Asserts, from what [`recording_handler`] processes in `dir` recorded and
/// the group's committed offsets, that every record of the topic was
/// handled; returns (records, duplicates).
pub fn assert_all_handled(dir: &TestDir, topic: &str, group: &str) -> (usize, usize) {
    assert_recorded_or_dead(topic, group, &handled_files(dir), &BTreeSet::new())
}

/// The worker whose handler wrote a [`recording_handler`] file.
pub fn handled_by(path: &Path) -> String {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let rest = name.strip_prefix("handled-").unwrap_or(name);
    rest.rsplit_once('-').map_or(rest, |(w, _)| w).to_string()
}

/// Waits until Kafka's tool says the group has nothing left on any partition.
pub fn wait_for_share_backlog_zero(
    bootstrap: &str,
    group: &str,
    partitions: usize,
    limit: Duration,
) {
    wait_until(limit, "the share group's backlog to reach 0", || {
        let lag = share_group_lag(bootstrap, group);
        lag.len() == partitions && lag.values().all(|l| *l == 0)
    });
}

/// Every record of the topic, from another client: (partition, offset).
pub fn all_records(topic: &str) -> BTreeSet<(i32, i64)> {
    read_topic(topic, broker().bootstrap())
        .into_iter()
        .map(|r| (r.0, r.1))
        .collect()
}

/// `kafka-share-groups --describe <what>` (`--offsets`, `--members`): its
/// table as printed, or the tool's complaint (a group not created yet).
pub fn share_groups_describe(bootstrap: &str, group: &str, what: &str) -> Result<String, String> {
    let out = Command::new(scripts_dir().join("kafka-local.sh"))
        .args([
            "tool",
            "share-groups",
            "--bootstrap-server",
            bootstrap,
            "--describe",
            what,
            "--group",
            group,
        ])
        .output()
        .expect("running kafka-share-groups");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{text}\n{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// `kafka-share-groups --describe --offsets`: partition -> lag, as Kafka's
/// own admin client reads the group (-1: unknown, no state yet).
pub fn share_group_lag(bootstrap: &str, group: &str) -> BTreeMap<i32, i64> {
    share_group_offsets_column(bootstrap, group, "LAG")
}

/// One column of `kafka-share-groups --describe --offsets` (`LAG`,
/// `START-OFFSET`): partition -> its value, -1 where the tool prints none.
pub fn share_group_offsets_column(
    bootstrap: &str,
    group: &str,
    column: &str,
) -> BTreeMap<i32, i64> {
    let text = share_groups_describe(bootstrap, group, "--offsets")
        .unwrap_or_else(|e| panic!("kafka-share-groups failed: {e}"));
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no {name} in {header:?}"))
    };
    let (partition, value) = (col("PARTITION"), col(column));
    lines
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .map(|f| {
            (
                f[partition].parse().unwrap(),
                f[value].parse().unwrap_or(-1),
            )
        })
        .collect()
}
