//! Share groups on a cluster of two brokers, each leading half of a topic's
//! partitions: the workers fetch from both leaders; while one broker is
//! down (killed) they go on with the other's partitions, and `topic describe` lists
//! the offline ones without a leader; when it is back, its records are
//! handled too. The evidence is the handler's own records and the backlog
//! Kafka's share-groups tool reads. The test runs a cluster of its own
//! (the shared test broker has one node), so it is the only test in its
//! binary: test binaries run one after another.

// The harness of `tests/it`; this binary uses part of it.
#[allow(dead_code, unused_imports)]
#[path = "it/harness/mod.rs"]
mod harness;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use harness::*;

/// Two PLAINTEXT brokers: node 1 is also the controller and holds every
/// coordinator; node 2 is a broker only, stopped and started by the test.
struct TwoBrokers {
    // Dropped first (killed) so their files are closed when `dir` goes.
    nodes: [Option<Proc>; 2],
    ports: [u16; 2],
    dir: TestDir,
}

impl TwoBrokers {
    fn start() -> Self {
        let dir = TestDir::new("two-brokers");
        let controller = free_port();
        let ports = [free_port(), free_port()];
        for (i, port) in ports.iter().enumerate() {
            let node = i + 1;
            let roles = if node == 1 {
                "broker,controller"
            } else {
                "broker"
            };
            let listeners = if node == 1 {
                format!("PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}")
            } else {
                format!("PLAINTEXT://127.0.0.1:{port}")
            };
            let props = format!(
                "process.roles={roles}\n\
                 node.id={node}\n\
                 controller.quorum.voters=1@127.0.0.1:{controller}\n\
                 controller.listener.names=CONTROLLER\n\
                 listeners={listeners}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
                 listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
                 inter.broker.listener.name=PLAINTEXT\n\
                 log.dirs={data}\n\
                 num.partitions=1\n\
                 default.replication.factor=1\n\
                 min.insync.replicas=1\n\
                 offsets.topic.replication.factor=1\n\
                 offsets.topic.num.partitions=1\n\
                 transaction.state.log.replication.factor=1\n\
                 transaction.state.log.min.isr=1\n\
                 share.coordinator.state.topic.replication.factor=1\n\
                 share.coordinator.state.topic.min.isr=1\n\
                 share.coordinator.state.topic.num.partitions=1\n\
                 group.initial.rebalance.delay.ms=0\n\
                 group.share.session.timeout.ms=10000\n\
                 group.share.min.session.timeout.ms=10000\n\
                 group.share.heartbeat.interval.ms=1000\n\
                 group.share.min.heartbeat.interval.ms=1000\n\
                 group.share.min.record.lock.duration.ms=1000\n\
                 broker.session.timeout.ms=4000\n\
                 broker.heartbeat.interval.ms=1000\n\
                 num.network.threads=2\n\
                 num.io.threads=2\n",
                data = dir.path(&format!("data-{node}")).display(),
            );
            std::fs::write(dir.path(&format!("node-{node}.properties")), props).unwrap();
            let out = kafka_tool(&[
                "storage",
                "format",
                "--config",
                dir.path(&format!("node-{node}.properties"))
                    .to_str()
                    .unwrap(),
                // Any cluster id will do: the data directories are the test's.
                "--cluster-id",
                "MkU3OEVBNTcwNTJENDM2Qk",
            ]);
            assert!(out.0, "formatting node {node}: {}", out.1);
        }
        TwoBrokers {
            nodes: [None, None],
            ports,
            dir,
        }
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.ports[0])
    }

    fn run_node(&mut self, node: usize) {
        let mut cmd = Command::new(scripts_dir().join("kafka-local.sh"));
        cmd.args(["tool", "kafka.Kafka"])
            .arg(self.dir.path(&format!("node-{node}.properties")));
        let log = self.dir.path(&format!("node-{node}.log"));
        self.nodes[node - 1] = Some(Proc::spawn(cmd, log));
    }

    /// Kills a node (SIGKILL: a crash, no controlled shutdown). Its fetches
    /// get no answer rather than NotLeader, and its partitions lose their
    /// leader once the controller fences it (`broker.session.timeout.ms`).
    fn kill_node(&mut self, node: usize) {
        let mut proc = self.nodes[node - 1].take().expect("the node runs");
        proc.signal(9);
        proc.wait_for_exit(Duration::from_secs(60))
            .expect("the broker dies on SIGKILL");
    }

    /// `kafka-topics --create` retried until the named brokers take it.
    fn create_topic(&self, topic: &str, replica_assignment: &str) {
        let bootstrap = self.bootstrap();
        wait_until(
            Duration::from_secs(90),
            &format!("topic {topic} created on brokers {replica_assignment}"),
            || {
                let (ok, _) = kafka_tool(&[
                    "topics",
                    "--bootstrap-server",
                    &bootstrap,
                    "--create",
                    "--topic",
                    topic,
                    "--replica-assignment",
                    replica_assignment,
                ]);
                if !ok {
                    std::thread::sleep(Duration::from_millis(500));
                }
                ok
            },
        );
    }
}

/// A Kafka tool from the test broker's jars: (success, stdout and stderr).
fn kafka_tool(args: &[&str]) -> (bool, String) {
    let out = Command::new(scripts_dir().join("kafka-local.sh"))
        .arg("tool")
        .args(args)
        .output()
        .expect("running kafka-local.sh tool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn share_worker(cluster: &TwoBrokers, dir: &TestDir, name: &str, topic: &str, group: &str) -> Proc {
    let handler = recording_handler(
        dir,
        HandlerBehaviour {
            failure_rate: 0.0,
            ms_per_record: 10,
        },
    );
    let mut cmd = command();
    cmd.args(["run", "--bootstrap-servers", &cluster.bootstrap()]);
    spawn_member_with(
        cmd,
        dir,
        name,
        topic,
        ("--share-group", group),
        0,
        &[
            "--handler",
            "exec",
            "--command",
            &handler,
            "--concurrency",
            "2",
            "--max-records",
            "20",
        ],
    )
}

fn produce_to(cluster: &TwoBrokers, topic: &str, count: u64, partitions: &str, start: u64) {
    produce_on(
        &cluster.bootstrap(),
        topic,
        count,
        &[
            "--partitions",
            partitions,
            "--start-seq",
            &start.to_string(),
        ],
    );
}

fn wait_handled(dir: &TestDir, expected: &BTreeSet<(i32, i64)>, what: &str) {
    wait_until(Duration::from_secs(90), what, || {
        let seen = handled(dir);
        expected.iter().all(|r| seen.contains_key(r))
    });
}

/// (partition, offset) of `count` records per partition from `from`.
fn offsets(partitions: &[i32], from: i64, count: i64) -> BTreeSet<(i32, i64)> {
    partitions
        .iter()
        .flat_map(|p| (from..from + count).map(move |o| (*p, o)))
        .collect()
}

fn describe_json(
    cluster: &TwoBrokers,
    topic: &str,
    group: &str,
) -> (bool, serde_json::Value, String) {
    let bootstrap = cluster.bootstrap();
    let (status, out, err) = run_to_end(&[
        "topic",
        "describe",
        "--bootstrap-servers",
        &bootstrap,
        "--topic",
        topic,
        "--share-group",
        group,
        "--json",
    ]);
    let json = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("topic describe printed no JSON ({e}): {out}\n{err}"));
    (status.success(), json, err)
}

/// `lag --json` for a group (`("--group", name)` or `("--share-group",
/// name)`) while partitions 1 and 3 are offline: asserts the led ones are
/// printed, the offline ones named on stdout and stderr, and the exit 1.
fn lag_while_offline(cluster: &TwoBrokers, topic: &str, group: (&str, &str)) -> serde_json::Value {
    let bootstrap = cluster.bootstrap();
    let (status, out, err) = run_to_end(&[
        "lag",
        "--bootstrap-servers",
        &bootstrap,
        "--topic",
        topic,
        group.0,
        group.1,
        "--json",
    ]);
    let lag: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("lag {group:?} printed no JSON ({e}): {out}\n{err}"));
    assert_eq!(status.code(), Some(1), "{out}\n{err}");
    assert_eq!(
        lag["partitions_offline"],
        serde_json::json!([1, 3]),
        "{lag}"
    );
    let listed: Vec<i64> = lag["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["partition"].as_i64().unwrap())
        .collect();
    assert_eq!(listed, [0, 2], "{lag}");
    assert!(
        err.contains(&format!(
            "{topic} partitions [1, 3] have no leader (offline)"
        )),
        "the offline partitions said: {err}"
    );
    lag
}

/// Waits until Kafka's share-groups tool reads backlog 0 on all four
/// partitions.
fn wait_for_no_backlog(cluster: &TwoBrokers, group: &str, what: &str) {
    wait_until(Duration::from_secs(90), what, || {
        let lag = share_group_lag(&cluster.bootstrap(), group);
        lag.len() == 4 && lag.values().all(|l| *l == 0)
    });
}

/// Whether any of `workers` logged `what` past the first `since[i]`
/// bytes of its log.
fn said_since(workers: &[Proc], since: &[usize], what: &str) -> bool {
    workers
        .iter()
        .zip(since)
        .any(|(w, &from)| w.stderr().get(from..).is_some_and(|new| new.contains(what)))
}

fn assert_no_panic(workers: &[Proc]) {
    for w in workers {
        assert!(
            !w.stderr().contains("panicked"),
            "a worker panicked:\n{}",
            w.stderr()
        );
    }
}

/// One cluster at a time: each test starts three JVMs of its own.
static ONE_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Both nodes running, every coordinator on node 1: node 1 alone first,
/// and a share group read on it, so that the group's and the share
/// state's coordinators live there and the group survives node 2's death.
/// `None` (said) when the test must skip.
fn cluster_with_coordinators_on_node_1() -> Option<TwoBrokers> {
    if !broker().is_real() {
        assert!(!in_ci(), "the two-broker test needs Kafka's jars under CI");
        eprintln!("skipped: the two-broker test needs Kafka's jars (run scripts/test.sh)");
        return None;
    }
    let mut cluster = TwoBrokers::start();
    cluster.run_node(1);
    let warm = TestDir::new("two-brokers-warm");
    cluster.create_topic("warm", "1");
    produce_to(&cluster, "warm", 1, "0", 0);
    let mut warmer = share_worker(&cluster, &warm, "warm", "warm", "warm-group");
    wait_handled(&warm, &offsets(&[0], 0, 1), "the warm-up record handled");
    warmer.terminate();
    cluster.run_node(2);
    Some(cluster)
}

/// `topic` made with `replica_assignment` (four partitions), two share
/// workers, 800 records; once records of every partition are handled,
/// with most still to come, node 2 is killed while records acquired from
/// it are held and verdicts are on their way. Returns the workers, the
/// length of each one's log before the kill, and the records handled then.
fn kill_node_2_mid_run(
    cluster: &mut TwoBrokers,
    dir: &TestDir,
    topic: &str,
    group: &str,
    replica_assignment: &str,
) -> (Vec<Proc>, Vec<usize>, usize) {
    cluster.create_topic(topic, replica_assignment);
    let workers: Vec<Proc> = (0..2)
        .map(|i| share_worker(cluster, dir, &format!("w{i}"), topic, group))
        .collect();
    produce_to(cluster, topic, 800, "0,1,2,3", 0);
    wait_until(
        Duration::from_secs(90),
        "records handled from both leaders",
        || {
            let seen = handled(dir);
            (0..4).all(|p| seen.keys().any(|(sp, _)| *sp == p)) && seen.len() >= 100
        },
    );
    let logged_before_kill: Vec<usize> = workers.iter().map(|w| w.stderr().len()).collect();
    cluster.kill_node(2);
    let handled_at_kill = handled(dir).len();
    assert!(
        handled_at_kill < 700,
        "{handled_at_kill} of 800 handled before the kill: nothing was in flight"
    );
    (workers, logged_before_kill, handled_at_kill)
}

/// The handled records' duplicates, said with `what`; asserts every record
/// was handled, none that was never produced, and nothing dead-lettered.
fn assert_nothing_lost(
    cluster: &TwoBrokers,
    dir: &TestDir,
    topic: &str,
    expected: &BTreeSet<(i32, i64)>,
    what: &str,
) -> u32 {
    let seen = handled(dir);
    let missing: Vec<_> = expected.iter().filter(|r| !seen.contains_key(r)).collect();
    assert!(missing.is_empty(), "records never handled: {missing:?}");
    assert_eq!(
        seen.len(),
        expected.len(),
        "records handled that were never produced"
    );
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    let by_worker: BTreeSet<String> = handled_files(dir)
        .iter()
        .filter(|f| !read(f).is_empty())
        .map(|f| handled_by(f))
        .collect();
    eprintln!(
        "two brokers, {what}: {} records handled, {duplicates} twice, by {by_worker:?}",
        seen.len()
    );
    let dlq = read_topic(&format!("{topic}.dlq"), &cluster.bootstrap());
    assert!(dlq.is_empty(), "{} dead letters", dlq.len());
    duplicates
}

#[test]
fn share_workers_fetch_from_both_leaders_and_go_on_while_one_is_down() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut cluster) = cluster_with_coordinators_on_node_1() else {
        return;
    };
    let s = TestDir::new("two-brokers-split");
    let topic = "split";
    let group = "split-group";
    // Partitions 0 and 2 led by node 1, 1 and 3 by node 2.
    let (mut workers, logged_before_kill, handled_at_kill) =
        kill_node_2_mid_run(&mut cluster, &s, topic, group, "1,2,1,2");
    // Once the controller fences it, its partitions are offline.
    wait_until(
        Duration::from_secs(60),
        "node 2's partitions offline",
        || {
            let (_, json, _) = describe_json(&cluster, topic, group);
            json["partitions"]
                .as_array()
                .is_some_and(|ps| ps.iter().filter(|p| p["leader"].is_null()).count() == 2)
        },
    );
    let (ok, json, err) = describe_json(&cluster, topic, group);
    let partitions = json["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), 4, "every partition listed: {json}");
    for p in partitions {
        let id = p["partition"].as_i64().unwrap();
        if id % 2 == 1 {
            assert!(
                p["leader"].is_null() && p["high"].is_null() && p["share"].is_null(),
                "offline partition {id} shown without leader or offsets: {json}\n{err}"
            );
        } else {
            assert_eq!(p["leader"], 1, "partition {id}: {json}\n{err}");
            assert_eq!(p["high"], 200, "partition {id}: {json}");
            assert!(
                p["share"]["backlog"].is_i64(),
                "partition {id}: {json}\n{err}"
            );
        }
    }
    assert!(!ok, "partitions not read make the exit 1: {json}");
    assert_eq!(
        json["share_group"]["partitions_offline"],
        serde_json::json!([1, 3]),
        "{json}"
    );
    assert!(
        err.contains("partitions [1, 3] have no leader (offline)"),
        "the offline partitions said: {err}"
    );
    // `lag` and the scaler read the same way: the rest is printed, the
    // offline partitions named, the exit 1.
    lag_while_offline(&cluster, topic, ("--share-group", group));
    lag_while_offline(&cluster, topic, ("--group", "a-consumer-group"));

    // Node 1's partitions go on: every record on them is handled, old and
    // new, while node 2 is down.
    produce_to(&cluster, topic, 200, "0,2", 800);
    wait_handled(
        &s,
        &offsets(&[0, 2], 0, 300),
        "every record of node 1's partitions handled while node 2 is down",
    );
    assert!(
        said_since(
            &workers,
            &logged_before_kill,
            "assigned partitions have no leader known"
        ),
        "no worker said its partitions lost their leader"
    );
    assert!(
        !said_since(&workers, &logged_before_kill, "has a leader again"),
        "a worker said the leaders came back while node 2 is down"
    );

    // Node 2 back: its partitions' records, held at the kill and new, are
    // handled too.
    let logged_before_restart: Vec<usize> = workers.iter().map(|w| w.stderr().len()).collect();
    cluster.run_node(2);
    wait_until(
        Duration::from_secs(90),
        "node 2 to lead its partitions again",
        || {
            let (_, json, _) = describe_json(&cluster, topic, group);
            json["partitions"]
                .as_array()
                .is_some_and(|ps| ps.iter().all(|p| !p["leader"].is_null()))
        },
    );
    produce_to(&cluster, topic, 200, "1,3", 1000);
    let expected = offsets(&[0, 1, 2, 3], 0, 300);
    wait_handled(
        &s,
        &expected,
        "all 1,200 records handled after node 2's restart",
    );
    assert!(
        said_since(
            &workers,
            &logged_before_restart,
            "every assigned partition has a leader again"
        ),
        "no worker said the leaders came back"
    );
    wait_for_no_backlog(
        &cluster,
        group,
        "the share group's backlog to reach 0 after node 2's restart",
    );
    assert_no_panic(&workers);
    for w in &mut workers {
        w.terminate();
    }

    // Nothing lost, nothing dead-lettered; duplicates only from the
    // records node 2 held at its death (its locks were in its memory): at
    // most what the workers had acquired, 2 rounds of 2 slots × 20 each.
    let duplicates = assert_nothing_lost(
        &cluster,
        &s,
        topic,
        &expected,
        &format!("one killed ({handled_at_kill} handled before) and restarted"),
    );
    assert!(
        duplicates <= 160,
        "{duplicates} duplicates: more than the workers could hold"
    );
}

/// With replication factor 2, the killed broker's partitions move to the
/// other: the workers follow the new leader without the dead one coming
/// back, and the verdicts they held for records from the dead leader are
/// answered as refused rather than waiting for it.
#[test]
fn share_workers_follow_a_partition_leader_that_moves() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut cluster) = cluster_with_coordinators_on_node_1() else {
        return;
    };
    let s = TestDir::new("two-brokers-moving");
    let topic = "moving";
    let group = "moving-group";
    // Every partition on both nodes: 0 and 2 led by node 1, 1 and 3 by node 2.
    let (mut workers, _, handled_at_kill) =
        kill_node_2_mid_run(&mut cluster, &s, topic, group, "1:2,2:1,1:2,2:1");
    // Node 2 stays dead: node 1 takes over its partitions once it is fenced.
    wait_handled(
        &s,
        &offsets(&[0, 1, 2, 3], 0, 200),
        "all 800 records handled with node 2 dead",
    );
    produce_to(&cluster, topic, 200, "0,1,2,3", 800);
    let expected = offsets(&[0, 1, 2, 3], 0, 250);
    wait_handled(&s, &expected, "200 more handled from the new leader");
    wait_for_no_backlog(&cluster, group, "the share group's backlog to reach 0");
    assert_no_panic(&workers);
    for w in &mut workers {
        w.terminate();
    }
    let duplicates = assert_nothing_lost(
        &cluster,
        &s,
        topic,
        &expected,
        &format!("a leader moved ({handled_at_kill} handled before)"),
    );
    assert!(
        duplicates <= 160,
        "{duplicates} duplicates: more than the workers could hold"
    );
}
