//! `microbatch supervise` on real Kafka: replicas rise on a burst, lag drains,
//! replicas fall back to the minimum after the (shortened) window, and a
//! child killed mid-run loses nothing (as the handler processes the children
//! run recorded, and the group's committed offsets, show).

use std::time::Duration;

use crate::harness::*;

fn timeline(path: &std::path::Path) -> Vec<serde_json::Value> {
    read(path)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The lag drains, then the timeline's last point has one replica and no lag.
fn drained_and_back_to_one(sc: &Scenario, tl: &std::path::Path) {
    sc.wait_for_lag_zero(Duration::from_secs(180));
    wait_until(
        Duration::from_secs(60),
        "replicas back to the minimum",
        || {
            timeline(tl)
                .last()
                .is_some_and(|p| p["replicas"] == 1 && p["total_lag"] == 0)
        },
    );
}

/// `supervise` against the test broker, its timeline and logs in `dir`.
fn supervise_command(dir: &TestDir, topic: &str, group: &str) -> std::process::Command {
    supervise_command_logging_to(dir, topic, group, &dir.0)
}

/// The same with the workers' logs in `log_dir`.
fn supervise_command_logging_to(
    dir: &TestDir,
    topic: &str,
    group: &str,
    log_dir: &std::path::Path,
) -> std::process::Command {
    let mut cmd = command();
    cmd.args([
        "supervise",
        "--bootstrap-servers",
        broker().bootstrap(),
        "--topic",
        topic,
        "--group",
        group,
    ]);
    cmd.args(["--timeline", dir.path("timeline.jsonl").to_str().unwrap()]);
    cmd.args(["--log-dir", log_dir.to_str().unwrap()]);
    cmd
}

fn supervise(dir: &TestDir, topic: &str, group: &str, policy: &[&str]) -> Proc {
    let mut cmd = supervise_command(dir, topic, group);
    cmd.args([
        "--min",
        "1",
        "--max",
        "6",
        "--scale-down-seconds",
        "4",
        "--polling-interval-ms",
        "500",
    ]);
    cmd.args(["--http-port", "0", "--drain-timeout-ms", "5000"]);
    cmd.args(policy);
    // The children inherit the environment: their handlers name their
    // record files after it.
    cmd.env("MICROBATCH_TEST_WORKER", "supervised");
    let handler = recording_handler(
        dir,
        HandlerBehaviour {
            ms_per_record: 2,
            ..HandlerBehaviour::default()
        },
    );
    cmd.arg("--");
    cmd.args(["--handler", "exec", "--command", &handler]);
    cmd.args([
        "--max-records",
        "10",
        "--concurrency",
        "4",
        "--max-wait-ms",
        "50",
    ]);
    cmd.args(["--commit-interval-ms", "200"]);
    // A killed child's partitions move on sooner: the client's setting under
    // the classic protocol; the broker's (scripts/kafka-local.sh) under KIP-848.
    if classic_protocol() {
        cmd.args(["--kafka-property", "session.timeout.ms=6000"]);
    }
    Proc::spawn(cmd, dir.path("supervise.stderr"))
}

#[test]
fn rate_policy_scales_up_drains_and_scales_back_and_a_killed_child_loses_nothing() {
    let sc = Scenario::new("supervise-rate", 8);
    let Scenario { dir, topic, group } = &sc;
    sc.produce(20_000, &["--keys", "1000"]);
    let mut sup = supervise(
        dir,
        topic,
        group,
        &[
            "--policy",
            "rate",
            "--target-drain-seconds",
            "5",
            "--rate-per-replica",
            "500",
            "--slots-per-partition",
            "4",
            "--slots-per-replica",
            "4",
        ],
    );
    let tl = dir.path("timeline.jsonl");
    wait_until(Duration::from_secs(60), "replicas to rise above 1", || {
        timeline(&tl)
            .iter()
            .any(|p| p["replicas"].as_u64().unwrap() > 1)
    });
    wait_until(Duration::from_secs(60), "progress", || {
        sc.total_lag() < 18_000
    });
    let children = children_of(sup.pid() as u32);
    assert!(children.len() >= 2, "several workers run: {children:?}");
    unsafe {
        libc::kill(children[0] as i32, 9);
    }
    drained_and_back_to_one(&sc, &tl);
    let points = timeline(&tl);
    for key in [
        "t_ms",
        "total_lag",
        "replicas",
        "desired",
        "rate_per_replica",
    ] {
        assert!(points[0].get(key).is_some(), "timeline lines carry {key}");
    }
    assert!(
        read(&dir.path("supervise.stderr")).contains("restarted")
            || points.iter().any(|p| p["restarts"].as_u64() > Some(0))
    );
    sup.signal(15);
    let status = sup
        .wait_for_exit(Duration::from_secs(60))
        .expect("supervise exits on SIGTERM");
    assert!(status.success(), "{}", sup.stderr());
    assert!(children_of(sup.pid() as u32).is_empty());
    let (expected, duplicates) = sc.assert_all_handled();
    assert_eq!(expected, 20_000);
    eprintln!(
        "supervise: {} timeline points, {duplicates} duplicates",
        points.len()
    );
}

/// `rate` does not scale up into a downstream outage: under steady load,
/// with the HTTP downstream refusing connections for 50 s, the supervisor
/// keeps the replicas it ran when the outage began, says why (timeline,
/// `/metrics`), and once the downstream is back every record reaches it.
/// Before the hold, the lag growing by every arrival raised the need past
/// the replicas' capacity and more replicas were started to probe the
/// refusing downstream.
#[test]
fn rate_policy_adds_no_replica_while_the_downstream_is_down() {
    downstream_outage_holds_scale_ups(false);
}

/// The same on a share group: its progress is the backlog acknowledged
/// (the high watermark less the backlog), which an outage stops while the
/// records it holds stay in the backlog; the hold reads it as it reads a
/// consumer group's commits. Nothing lost is read from the downstream's log
/// against every record of the topic (another client) and the backlog by
/// Kafka's own tool.
#[test]
fn rate_policy_adds_no_replica_to_a_share_group_while_the_downstream_is_down() {
    if crate::share::real_broker().is_none() {
        return;
    }
    downstream_outage_holds_scale_ups(true);
}

fn downstream_outage_holds_scale_ups(share: bool) {
    let sc = Scenario::new(
        if share {
            "supervise-share-outage"
        } else {
            "supervise-outage"
        },
        8,
    );
    let Scenario { dir, topic, group } = &sc;
    let downstream_port = free_port();
    let accepted = dir.path("accepted.txt");
    // What one replica can do is what its workers measure, and on a
    // loaded machine that ranges widely; a slow downstream (20 ms per batch
    // of 10, at most 500/s) keeps it between about 200/s and 500/s. 60/s
    // arrive. The lag of the outage's first seconds, before the hold (5 s
    // of readings without a commit; the first reading interval is not
    // guarded), is about 400, which asks 60 + 400/5 = 140/s: one replica.
    // 50 s of it (3,000) asks 660/s, more than one replica can do, so
    // without the hold the supervisor would add replicas. (At 100/s, a 2 ms
    // downstream and a 10 s drain target, a replica measured at 143/s on a
    // loaded machine was asked for in the outage's first seconds.)
    let delay = Duration::from_millis(20);
    let up = downstream_on(downstream_port, delay, accepted.clone());
    let mut producer = sc.produce_steadily(6_000, 60, &["--keys", "100"]);
    let metrics_port = free_port();
    let mut cmd = if share {
        let mut cmd = command();
        cmd.args(["supervise", "--bootstrap-servers", broker().bootstrap()]);
        cmd.args(["--topic", topic, "--share-group", group]);
        cmd.args(["--timeline", dir.path("timeline.jsonl").to_str().unwrap()]);
        cmd.args(["--log-dir", dir.0.to_str().unwrap()]);
        cmd
    } else {
        supervise_command(dir, topic, group)
    };
    cmd.args([
        "--policy",
        "rate",
        "--min",
        "1",
        "--max",
        "4",
        "--target-drain-seconds",
        "5",
        "--rate-per-replica",
        "400",
        "--scale-down-seconds",
        "300",
        "--polling-interval-ms",
        "500",
        "--drain-timeout-ms",
        "5000",
        "--http-port",
        &metrics_port.to_string(),
    ]);
    let url = format!("http://127.0.0.1:{downstream_port}/batches");
    cmd.args(["--", "--handler", "http", "--url", &url]);
    cmd.args([
        "--max-records",
        "10",
        "--concurrency",
        "1",
        "--max-wait-ms",
        "200",
    ]);
    cmd.args(["--retry-initial-ms", "50", "--retry-max-ms", "500"]);
    cmd.args(["--commit-interval-ms", "200"]);
    let mut sup = Proc::spawn(cmd, dir.path("supervise.stderr"));
    let tl = dir.path("timeline.jsonl");
    // Healthy first: the workers report what they can do.
    wait_until(Duration::from_secs(60), "the workers' first report", || {
        timeline(&tl)
            .last()
            .is_some_and(|p| p["workers_reporting"].as_u64() >= Some(1))
    });
    std::thread::sleep(Duration::from_secs(15));
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    let outage_from = timeline(&tl).len();
    let running_at_outage = timeline(&tl)[outage_from - 1]["replicas"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(50));
    let held_metric = http_get(metrics_port, "/metrics")
        .and_then(|(_, text)| metric(&text, "microbatch_supervisor_scale_up_held"));
    let during: Vec<serde_json::Value> = timeline(&tl)[outage_from..].to_vec();
    let _up_again = downstream_on(downstream_port, delay, accepted.clone());
    let most = during
        .iter()
        .filter_map(|p| p["replicas"].as_u64())
        .max()
        .unwrap();
    let lag_then = during.last().unwrap()["total_lag"].as_i64().unwrap();
    eprintln!(
        "outage: {running_at_outage} replicas when it began, at most {most} during it, lag {lag_then} at its end"
    );
    assert!(lag_then > 2_000, "the outage held records back: {lag_then}");
    assert!(
        most <= running_at_outage,
        "a replica was added while the downstream refused connections: {running_at_outage} -> {most}; {}",
        during.last().unwrap()["reason"]
    );
    let held = during.iter().find(|p| p["scale_up_held"] == true);
    let held = held.expect("the timeline shows the hold");
    assert!(
        held["reason"].as_str().unwrap().contains("scale-up held"),
        "{}",
        held["reason"]
    );
    assert_eq!(held_metric, Some(1.0), "/metrics shows the hold");
    // The timeline names the hold as what bound the answer.
    assert!(
        during.iter().any(|p| p["bound_by"] == "outage_hold"),
        "no point bound by the hold: {}",
        during.last().unwrap()
    );
    // The hold mattered: by the outage's end the need asked for more.
    let last_reason = during.last().unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_string();
    let asked_kept: Vec<u64> = last_reason
        .rsplit_once("): ")
        .map(|(_, tail)| {
            tail.split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        matches!(asked_kept[..], [asked, kept] if asked > kept),
        "the hold kept fewer than the need asked: {last_reason}"
    );
    // Back: everything produced reaches the downstream; nothing was
    // dead-lettered because of the outage.
    producer
        .wait_for_exit(Duration::from_secs(120))
        .expect("the producer finishes");
    if share {
        wait_until(
            Duration::from_secs(180),
            "the share group's backlog to reach 0",
            || {
                let lag = share_group_lag(broker().bootstrap(), group);
                lag.len() == 8 && lag.values().all(|l| *l == 0)
            },
        );
    } else {
        sc.wait_for_lag_zero(Duration::from_secs(180));
    }
    sup.signal(15);
    sup.wait_for_exit(Duration::from_secs(60))
        .expect("supervise exits on SIGTERM");
    let expected = if share {
        let seen = audited(std::slice::from_ref(&accepted));
        let all = read_topic(topic, broker().bootstrap());
        let lost: Vec<(i32, i64)> = all
            .iter()
            .map(|r| (r.0, r.1))
            .filter(|r| !seen.contains_key(r))
            .collect();
        assert!(lost.is_empty(), "never reached the downstream: {lost:?}");
        all.len()
    } else {
        assert_recorded_or_dead(topic, group, &[accepted], &Default::default()).0
    };
    assert_eq!(expected, 6_000);
    assert!(
        timeline(&tl).last().unwrap()["scale_up_held"] == false,
        "the hold ends with the outage"
    );
}

#[test]
fn keda_policy_caps_at_partitions_and_scales_back() {
    let sc = Scenario::new("supervise-keda", 4);
    let Scenario { dir, topic, group } = &sc;
    sc.produce(8000, &["--keys", "1000"]);
    let mut sup = supervise(
        dir,
        topic,
        group,
        &["--policy", "keda", "--lag-threshold", "3"],
    );
    let tl = dir.path("timeline.jsonl");
    drained_and_back_to_one(&sc, &tl);
    let points = timeline(&tl);
    let peak = points
        .iter()
        .map(|p| p["replicas"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(
        peak, 4,
        "KEDA's policy caps replicas at the 4 partitions (max was 6)"
    );
    sup.signal(15);
    assert!(sup
        .wait_for_exit(Duration::from_secs(60))
        .unwrap()
        .success());
    let (expected, _) = sc.assert_all_handled();
    assert_eq!(expected, 8000);
}

/// `supervise --min N --max N` on an empty topic, with `run_args` after `--`.
fn supervise_fixed(dir: &TestDir, topic: &str, replicas: &str, run_args: &[&str]) -> Proc {
    let mut cmd = supervise_command(dir, topic, &unique("16-g"));
    cmd.args([
        "--policy",
        "keda",
        "--min",
        replicas,
        "--max",
        replicas,
        "--polling-interval-ms",
        "200",
        "--http-port",
        "0",
        "--drain-timeout-ms",
        "2000",
    ]);
    cmd.arg("--");
    cmd.args(run_args);
    Proc::spawn(cmd, dir.path("supervise.stderr"))
}

#[test]
fn a_child_that_exits_at_once_is_restarted_with_growing_back_off() {
    let dir = TestDir::new("supervise-backoff");
    let topic = unique("16-backoff");
    create_topic(&topic, 2);
    // A worker refusing its arguments exits with status 2 at once.
    let mut sup = supervise_fixed(&dir, &topic, "1", &["--concurrency", "0"]);
    let tl = dir.path("timeline.jsonl");
    wait_until(Duration::from_secs(30), "three restarts", || {
        timeline(&tl)
            .iter()
            .any(|p| p["restarts"].as_u64() >= Some(3))
    });
    let backoffs: Vec<u64> = timeline(&tl)
        .iter()
        .filter_map(|p| p["restart_backoff_ms"].as_u64())
        .filter(|b| *b > 0)
        .fold(Vec::new(), |mut seen, b| {
            if seen.last() != Some(&b) {
                seen.push(b);
            }
            seen
        });
    assert!(
        backoffs.starts_with(&[1000, 2000, 4000]),
        "the back-off doubles while the child dies young: {backoffs:?}"
    );
    // And the restarts themselves spread out: the second gap is about twice the first.
    let mut restarted_at = Vec::new();
    let mut seen = 0;
    for p in timeline(&tl) {
        let restarts = p["restarts"].as_u64().unwrap_or(0);
        if restarts > seen {
            seen = restarts;
            restarted_at.push(p["t_ms"].as_u64().unwrap());
        }
    }
    let gaps: Vec<u64> = restarted_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.len() >= 2 && gaps[1] >= gaps[0] + 700,
        "gaps between restarts (ms): {gaps:?}"
    );
    assert!(
        sup.wait_for_exit(Duration::from_millis(10)).is_none(),
        "supervise keeps going"
    );
    sup.signal(15);
    assert!(sup.wait_for_exit(Duration::from_secs(30)).is_some());
}

#[test]
fn a_failed_spawn_leaves_the_other_children_running() {
    let dir = TestDir::new("supervise-spawn-fails");
    let topic = unique("16-spawn");
    create_topic(&topic, 2);
    // The second child's log file cannot be created: a directory is in the way.
    std::fs::create_dir_all(dir.path("worker-2.log")).unwrap();
    let mut sup = supervise_fixed(&dir, &topic, "2", &["--process-time-ms", "1"]);
    let tl = dir.path("timeline.jsonl");
    wait_until(Duration::from_secs(30), "a first child", || {
        !children_of(sup.pid() as u32).is_empty()
    });
    let first = children_of(sup.pid() as u32)[0];
    wait_until(
        Duration::from_secs(30),
        "two children after the failure",
        || {
            timeline(&tl)
                .last()
                .is_some_and(|p| p["replicas"] == 2 && p["restarts"].as_u64() >= Some(1))
        },
    );
    assert!(
        children_of(sup.pid() as u32).contains(&first),
        "the first child kept running through the failed start"
    );
    let stderr = read(&dir.path("supervise.stderr"));
    assert!(
        stderr.contains("could not create the worker log") && stderr.contains("worker-2.log"),
        "the error names the log file, not the program: {stderr}"
    );
    assert!(dir.path("worker-3.log").exists(), "the next child started");
    sup.signal(15);
    let status = sup.wait_for_exit(Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "{}", sup.stderr());
}

#[test]
fn a_log_dir_that_does_not_exist_yet_is_created() {
    let dir = TestDir::new("supervise-log-dir");
    let topic = unique("16-log-dir");
    create_topic(&topic, 1);
    let logs = dir.path("not/there/yet");
    let mut cmd = supervise_command_logging_to(&dir, &topic, &unique("16-g"), &logs);
    cmd.args(["--policy", "keda", "--min", "1", "--max", "1"]);
    cmd.args(["--polling-interval-ms", "200", "--http-port", "0"]);
    cmd.args(["--", "--process-time-ms", "1"]);
    let mut sup = Proc::spawn(cmd, dir.path("supervise.stderr"));
    wait_until(Duration::from_secs(30), "the first worker's log", || {
        logs.join("worker-1.log").exists()
    });
    assert!(
        !read(&dir.path("supervise.stderr")).contains("could not start a worker"),
        "{}",
        sup.stderr()
    );
    sup.signal(15);
    let status = sup.wait_for_exit(Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "{}", sup.stderr());
}

/// The workers get what the supervisor was given as Kafka properties (here
/// the brokers' CA, and no `--ssl-ca-location`) and its `--config` file.
/// Before, only a fixed set of variables reached them: they could not
/// verify the brokers and the topic never drained while the supervisor
/// itself read lag without trouble.
#[test]
fn workers_get_the_supervisors_kafka_properties_and_config_file() {
    let Some(env) = scram_listener() else {
        return;
    };
    let sc = Scenario::new("sup-props", 2);
    let Scenario { dir, topic, group } = &sc;
    sc.produce(200, &[]);
    // A run key in supervise's file: the workers read it from there.
    let file = dir.path("microbatch.toml");
    std::fs::write(&file, "concurrency = 3\n").unwrap();
    let mut cmd = command();
    cmd.args([
        "supervise",
        "--config",
        file.to_str().unwrap(),
        "--security-protocol",
        "SASL_SSL",
        "--sasl-mechanism",
        "SCRAM-SHA-512",
        "--topic",
        topic,
        "--group",
        group,
        "--kafka-property",
        &format!("ssl.ca.location={}", env["KAFKA_SSL_CA_LOCATION"]),
        "--policy",
        "keda",
        "--min",
        "1",
        "--max",
        "1",
        "--polling-interval-ms",
        "200",
        "--http-port",
        "0",
        "--drain-timeout-ms",
        "2000",
        "--log-dir",
        dir.0.to_str().unwrap(),
    ])
    .env("KAFKA_BOOTSTRAP_SERVERS", &env["KAFKA_BOOTSTRAP_SERVERS"])
    .env("KAFKA_USERNAME", &env["KAFKA_USERNAME"])
    .env("KAFKA_PASSWORD", &env["KAFKA_PASSWORD"]);
    let mut sup = Proc::spawn(cmd, dir.path("supervise.stderr"));
    sc.wait_for_lag_zero(Duration::from_secs(90));
    sup.signal(15);
    assert!(sup.wait_for_exit(Duration::from_secs(30)).is_some());
    let log = std::fs::read_to_string(dir.path("worker-1.log")).unwrap_or_default();
    assert!(
        log.contains("worker started") && log.contains("concurrency=3"),
        "the worker read its key from supervise's file: {log}"
    );
    assert!(
        !log.contains(env["KAFKA_PASSWORD"].as_str()),
        "the password reached the worker's log"
    );
}
