//! `microbatch run` against a real broker: delivery, shutdown, security, bad input.

use std::time::{Duration, Instant};

use crate::harness::*;

const SIGTERM: i32 = 15;

/// 20,000 keyed records on 8 partitions, two `exec` workers: every offset
/// reaches a handler (as the handler processes recorded), committed lag ends
/// at 0, and both exit 0 on SIGTERM.
#[test]
fn two_workers_process_every_offset_and_exit_cleanly() {
    let sc = Scenario::new("two-workers", 8);
    let Scenario { dir, .. } = &sc;

    let (pa, pb) = (free_port(), free_port());
    // The handler processes record what they handled: the evidence.
    let cmd = recording_handler(dir, HandlerBehaviour::default());
    let mut a = sc.exec_worker("a", pa, &cmd, &[]);
    let mut b = sc.exec_worker("b", pb, &cmd, &[]);
    // Both members own partitions before the records arrive, so both work.
    wait_until(Duration::from_secs(60), "both workers ready", || {
        [pa, pb]
            .iter()
            .all(|p| http_get(*p, "/readyz").is_some_and(|(s, _)| s == 200))
            && [pa, pb]
                .iter()
                .all(|p| worker_metric(*p, "microbatch_assigned_partitions") == Some(4.0))
    });
    sc.produce(20_000, &["--keys", "500"]);
    sc.wait_for_lag_zero(Duration::from_secs(120));
    let (s, metrics) = http_get(pa, "/metrics").expect("metrics answer");
    assert_eq!(s, 200);
    assert!(
        metric(&metrics, "microbatch_records_processed_total").unwrap() > 0.0,
        "{metrics}"
    );
    let commits_ok = labelled_metric(&metrics, "microbatch_commits_total{result=\"ok\"}");
    assert!(commits_ok.unwrap_or(0.0) >= 1.0, "{metrics}");
    assert_eq!(metric(&metrics, "microbatch_ready"), Some(1.0));
    assert_eq!(http_get(pa, "/healthz").map(|(s, _)| s), Some(200));

    a.signal(SIGTERM);
    b.signal(SIGTERM);
    let sa = a
        .wait_for_exit(Duration::from_secs(60))
        .expect("worker a exits after SIGTERM");
    let sb = b
        .wait_for_exit(Duration::from_secs(60))
        .expect("worker b exits after SIGTERM");
    assert!(sa.success(), "worker a: {sa:?}\n{}", a.stderr());
    assert!(sb.success(), "worker b: {sb:?}\n{}", b.stderr());

    let (expected, duplicates) = sc.assert_all_handled();
    assert_eq!(expected, 20_000);
    eprintln!("duplicates: {duplicates}");
    assert_eq!(sc.total_lag(), 0);
    for w in ["a", "b"] {
        assert!(
            handled_files(dir)
                .iter()
                .any(|f| handled_by(f) == w && !read(f).is_empty()),
            "worker {w}'s handler processed records too"
        );
    }
}

/// Records flowing at a steady rate while a second worker joins and later
/// leaves on SIGTERM: both handovers finish what they started, so no record
/// is handled twice (as the handler processes recorded) and none is lost.
#[test]
fn a_worker_that_joins_and_one_that_leaves_on_sigterm_hand_over_nothing_twice() {
    let sc = Scenario::new("handover", 8);
    let Scenario { dir, topic, .. } = &sc;
    let mut producer = {
        let mut cmd = command();
        cmd.args(["produce", "--bootstrap-servers", broker().bootstrap()]);
        cmd.args(["--topic", topic, "--count", "24000", "--rate", "2000"]);
        cmd.args(["--keys", "10000", "--quiet"]);
        Proc::spawn(cmd, dir.path("produce.stderr"))
    };
    let cmd = recording_handler(dir, HandlerBehaviour::default());
    // Several lanes per partition finish out of order: a handover must fill
    // the holes below what its lanes finished.
    let extra = ["--max-records", "50", "--concurrency", "2"];
    let (pa, pb) = (free_port(), free_port());
    let mut a = sc.exec_worker("a", pa, &cmd, &extra);
    wait_until(Duration::from_secs(60), "a handles records", || {
        handled(dir).len() >= 2000
    });
    let mut b = sc.exec_worker("b", pb, &cmd, &extra);
    let b_handled = |dir: &TestDir| {
        handled_files(dir)
            .iter()
            .filter(|f| handled_by(f) == "b")
            .map(|f| read(f).lines().count())
            .sum::<usize>()
    };
    wait_until(Duration::from_secs(60), "b handles records", || {
        b_handled(dir) >= 2000
    });
    b.signal(SIGTERM);
    let status = b.wait_for_exit(Duration::from_secs(60)).expect("b exits");
    assert!(status.success(), "{}", b.stderr());
    let status = producer
        .wait_for_exit(Duration::from_secs(120))
        .expect("the producer finishes");
    assert!(status.success(), "{}", producer.stderr());
    sc.wait_for_lag_zero(Duration::from_secs(120));
    a.terminate();
    let (expected, duplicates) = sc.assert_all_handled();
    assert_eq!(expected, 24_000);
    assert_eq!(
        duplicates, 0,
        "records handled twice across the join and the SIGTERM"
    );
}

/// SIGTERM mid-run, then a restart: nothing is lost across the two runs.
#[test]
fn sigterm_mid_run_then_restart_loses_nothing() {
    let sc = Scenario::new("restart", 4);
    let Scenario { dir, .. } = &sc;
    sc.produce(4000, &[]);
    let port = free_port();
    // Small caps on records held, so the stop comes well before the end.
    let cmd = recording_handler(
        dir,
        HandlerBehaviour {
            ms_per_record: 1,
            ..HandlerBehaviour::default()
        },
    );
    let extra = [
        "--max-records",
        "20",
        "--max-records-per-partition",
        "100",
        "--max-records-held",
        "400",
    ];
    let mut first = sc.exec_worker("first", port, &cmd, &extra);
    wait_until(Duration::from_secs(60), "some progress", || {
        handled(dir).len() >= 400
    });
    first.signal(SIGTERM);
    let status = first
        .wait_for_exit(Duration::from_secs(60))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{}", first.stderr());
    let done_first = handled(dir).len();
    assert!(
        done_first < 4000,
        "the first run was stopped before the end ({done_first})"
    );

    let mut second = sc.exec_worker("second", port, &cmd, &extra);
    sc.wait_for_lag_zero(Duration::from_secs(120));
    second.terminate();
    let (expected, duplicates) = sc.assert_all_handled();
    assert_eq!(expected, 4000);
    // Only records held at the stop (at most 400) may be seen twice.
    assert!(duplicates <= 400, "too many duplicates: {duplicates}");
}

/// A batch far longer than --drain-timeout-ms does not hold up shutdown, and
/// its records are not committed (they are redelivered).
#[test]
fn drain_deadline_is_honoured() {
    let sc = Scenario::new("drain", 1);
    let Scenario { dir, .. } = &sc;
    sc.produce(10, &[]);
    let port = free_port();
    let mut w = sc.worker(
        "w",
        port,
        &[
            "--process-time-ms",
            "6000",
            "--max-records",
            "10",
            "--drain-timeout-ms",
            "1000",
            "--ordering",
            "partition",
        ],
    );
    wait_until(Duration::from_secs(60), "the batch to be in flight", || {
        worker_metric(port, "microbatch_slots_busy") == Some(1.0)
    });
    let started = Instant::now();
    w.signal(SIGTERM);
    let status = w.wait_for_exit(Duration::from_secs(50)).expect("exits");
    let took = started.elapsed();
    assert!(status.success(), "{}", w.stderr());
    assert!(
        took < Duration::from_secs(40),
        "shutdown waited for the 60 s batch: {took:?}"
    );
    assert!(
        audited(&[dir.path("w.audit")]).is_empty(),
        "the unfinished batch was not recorded as done"
    );
    assert_eq!(
        sc.total_lag(),
        10,
        "nothing was committed past the unfinished batch"
    );
}

/// Bad input exits 2 before connecting, naming the flag; secrets never show.
#[test]
fn bad_input_exits_2_and_names_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--topic", "t", "--group", "g", "--max-records", "0"],
            "--max-records",
        ),
        (
            &["run", "--topic", "t", "--group", "g", "--handler", "bogus"],
            "--handler",
        ),
        (
            &[
                "run",
                "--topic",
                "t",
                "--group",
                "g",
                "--kafka-property",
                "novalue",
            ],
            "--kafka-property",
        ),
        (&["run", "--group", "g"], "--topic"),
        // A supervise flag after `--` is named, not reported missing.
        (
            &["supervise", "--group", "g", "--", "--topic", "t"],
            "--topic: given after `--`; put it before `--`",
        ),
        (
            &[
                "lag",
                "--topic",
                "t",
                "--group",
                "g",
                "--allow-idle-consumers",
                "--limit-to-partitions-with-lag",
            ],
            "--limit-to-partitions-with-lag",
        ),
        (
            &["run", "--topic", "t", "--group", "g", "--handler", "exec"],
            "--command",
        ),
        (
            &[
                "run",
                "--topic",
                "t",
                "--group",
                "g",
                "--security-protocol",
                "SASL_SSL",
                "--username",
                "u",
            ],
            "--password",
        ),
        (
            &[
                "lag",
                "--topic",
                "t",
                "--group",
                "g",
                "--bootstrap-servers",
                "nohostport",
            ],
            "--bootstrap-servers",
        ),
        // A share group orders nothing, needs its dead letters, and leaves
        // deliveries to spare below Kafka's limit of 10.
        (
            &[
                "run",
                "--topic",
                "t",
                "--share-group",
                "s",
                "--ordering",
                "key",
            ],
            "--ordering",
        ),
        (
            &[
                "run",
                "--topic",
                "t",
                "--share-group",
                "s",
                "--max-attempts",
                "9",
            ],
            "--max-attempts",
        ),
        (
            &["run", "--topic", "t", "--share-group", "s", "--dlq", "off"],
            "--dlq",
        ),
        (
            &["run", "--topic", "t", "--share-group", "s", "--group", "g"],
            "--group",
        ),
        (&["run", "--share-group", "s"], "--topic"),
        (
            &[
                "supervise",
                "--topic",
                "t",
                "--share-group",
                "s",
                "--group",
                "g",
            ],
            "--group",
        ),
        (&["supervise", "--share-group", "s"], "--topic"),
        (
            &["supervise", "--group", "g", "--", "--share-group", "s"],
            "--share-group",
        ),
        // Reserved for share groups' capacity reports.
        (
            &["run", "--topic", "t", "--group", "microbatch-capacity.s"],
            "--group",
        ),
        (
            &[
                "supervise",
                "--topic",
                "t",
                "--group",
                "microbatch-capacity.s",
            ],
            "--group",
        ),
    ];
    for (args, flag) in cases {
        let started = Instant::now();
        let (status, _, err) = run_to_end(args);
        assert_eq!(status.code(), Some(2), "{args:?} should exit 2: {err}");
        assert!(
            err.contains(flag),
            "{args:?}: message should name {flag}: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{args:?} did not fail fast"
        );
    }
    let secret = "s3cr3t-Pa55word";
    // A password is never printed, also one that starts with `-`: that is
    // the password, not a flag quoted back in an error, nor `-h` printing
    // help and exiting 0.
    for password in [
        secret.to_string(),
        format!("-{secret}"),
        format!("--{secret}"),
    ] {
        let (status, out, err) = run_to_end(&[
            "run",
            "--topic",
            "t",
            "--group",
            "g",
            "--username",
            "u",
            "--password",
            &password,
        ]);
        assert_eq!(status.code(), Some(2), "{out}{err}");
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "password printed: {out}{err}"
        );
    }
    // A property typed without `=` (or with a space in its key) is refused
    // naming the flag, not quoting the text, which holds the password.
    for typo in [
        format!("sasl.password {secret}"),
        format!("sasl password={secret}"),
    ] {
        let (status, out, err) = run_to_end(&["run", "--kafka-property", &typo]);
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(err.contains("--kafka-property"), "{err}");
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "property text printed: {err}"
        );
    }
    let out = command()
        .args(["run", "--help"])
        .env("KAFKA_PASSWORD", secret)
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--password") && !help.contains(secret),
        "help shows the password"
    );
}

/// SCRAM-SHA-512 over TLS (MSK's port 9096): records flow (every one
/// recorded by the handler, committed offsets at the end); a wrong password
/// gives a clear authentication error, /readyz stays non-200, and the
/// password never appears in the logs.
#[test]
fn scram_over_tls_works_and_a_wrong_password_is_clear() {
    let Some(env) = scram_listener() else {
        return;
    };
    let sc = Scenario::new("scram", 8);
    let Scenario { dir, topic, group } = &sc;
    let scram_args = |password: &str| -> Vec<String> {
        vec![
            "--bootstrap-servers".into(),
            env["KAFKA_BOOTSTRAP_SERVERS"].clone(),
            "--security-protocol".into(),
            "SASL_SSL".into(),
            "--sasl-mechanism".into(),
            "SCRAM-SHA-512".into(),
            "--username".into(),
            env["KAFKA_USERNAME"].clone(),
            "--ssl-ca-location".into(),
            env["KAFKA_SSL_CA_LOCATION"].clone(),
            "--password".into(),
            password.into(),
        ]
    };
    let good = scram_args(&env["KAFKA_PASSWORD"]);
    let mut produce_args = vec![
        "produce".to_string(),
        "--topic".into(),
        topic.clone(),
        "--count".into(),
        "2000".into(),
        "--quiet".into(),
    ];
    produce_args.extend(good.iter().cloned());
    let out = command().args(&produce_args).output().unwrap();
    assert!(
        out.status.success(),
        "produce over SCRAM: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let port = free_port();
    let handler = recording_handler(dir, HandlerBehaviour::default());
    let mut cmd = command();
    cmd.arg("run").args(&good);
    cmd.args(["--handler", "exec", "--command", &handler]);
    let mut w = spawn_worker_with(cmd, dir, "w", topic, group, port, &[]);
    wait_until(Duration::from_secs(120), "lag 0 over SCRAM", || {
        sc.total_lag() == 0
    });
    wait_until(Duration::from_secs(30), "ready", || {
        http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    w.terminate();
    // Read back over the plain listener of the same cluster.
    let (expected, _) = sc.assert_all_handled();
    assert_eq!(expected, 2000);
    assert!(!w.stderr().contains(&env["KAFKA_PASSWORD"]));

    let wrong = "definitely-Wrong-pa55";
    let port = free_port();
    let mut cmd = command();
    cmd.args([
        "run",
        "--topic",
        topic,
        "--group",
        &unique("g"),
        "--http-host",
        "127.0.0.1",
        "--http-port",
        &port.to_string(),
    ]);
    cmd.args(scram_args(wrong));
    let mut bad = Proc::spawn(cmd, dir.path("bad.stderr"));
    wait_until(
        Duration::from_secs(60),
        "an authentication error in the log",
        || bad.stderr().to_lowercase().contains("authentication"),
    );
    // /readyz is never 200, and names the authentication failure.
    wait_until(
        Duration::from_secs(30),
        "/readyz to name the authentication failure",
        || {
            let (status, body) = http_get(port, "/readyz").expect("readyz answers");
            assert_eq!(status, 503, "{body}");
            body.contains("authentication")
        },
    );
    bad.signal(SIGTERM);
    assert!(bad.wait_for_exit(Duration::from_secs(60)).is_some());
    // Short-lived commands say so too, and exit instead of hanging.
    let mut lag_cmd = command();
    lag_cmd
        .args(["lag", "--topic", topic, "--group", group])
        .args(scram_args(wrong));
    let started = Instant::now();
    let out = lag_cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("authentication failed"), "{err}");
    assert!(!err.contains(wrong));
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "lag failed fast enough"
    );
    let log = bad.stderr();
    assert!(!log.contains(wrong), "the password appeared in the log");
}

/// A CA that did not sign the brokers' certificate (`--ssl-ca-location`
/// pointing at the wrong file): the worker says it is the TLS handshake and
/// names the flag, in its log and on /readyz, instead of "broker transport
/// failure", with dead letters (their topic is looked up first) and
/// without; `lag` exits 1 saying the same, through librdkafka (a consumer
/// group) and through the share client (`--share-group`).
#[test]
fn a_ca_that_did_not_sign_the_brokers_certificate_is_named() {
    let Some(env) = scram_listener() else {
        return;
    };
    let sc = Scenario::new("bad-ca", 1);
    let wrong_ca = sc.dir.path("wrong-ca.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=not the brokers' CA", "-keyout"])
        .arg(sc.dir.path("wrong-ca.key"))
        .arg("-out")
        .arg(&wrong_ca)
        .output()
        .expect("running openssl");
    assert!(made.status.success(), "{made:?}");
    let mut env = env;
    env.insert(
        "KAFKA_SSL_CA_LOCATION".into(),
        wrong_ca.to_string_lossy().into_owned(),
    );
    let port = free_port();
    let handler = recording_handler(&sc.dir, HandlerBehaviour::default());
    let mut w = spawn_worker_with(
        run_over_scram(&env),
        &sc.dir,
        "w",
        &sc.topic,
        &sc.group,
        port,
        &["--handler", "exec", "--command", &handler],
    );
    let says = |text: &str| {
        text.contains("TLS handshake") && text.contains("--ssl-ca-location must hold the CA")
    };
    wait_until(Duration::from_secs(60), "the log to name the CA", || {
        says(&w.stderr())
    });
    let (status, body) = http_get(port, "/readyz").expect("readyz answers");
    assert!(status == 503 && says(&body), "{status} {body}");
    // Without dead letters the consumer's own client meets the brokers
    // first: it says the same.
    let bare_port = free_port();
    let mut bare = spawn_worker_with(
        run_over_scram(&env),
        &sc.dir,
        "bare",
        &sc.topic,
        &sc.group,
        bare_port,
        &["--handler", "exec", "--command", &handler, "--dlq", "off"],
    );
    wait_until(Duration::from_secs(60), "/readyz to name the CA", || {
        http_get(bare_port, "/readyz").is_some_and(|(status, body)| status == 503 && says(&body))
    });
    assert!(says(&bare.stderr()), "{}", bare.stderr());
    for w in [&mut w, &mut bare] {
        w.signal(SIGTERM);
        assert!(w.wait_for_exit(Duration::from_secs(60)).is_some());
        assert!(!w.stderr().contains(&env["KAFKA_PASSWORD"]));
    }
    for group in [["--group", &sc.group], ["--share-group", &sc.group]] {
        let out = over_scram(&env, &["lag", "--topic", &sc.topic])
            .args(group)
            .output()
            .expect("running lag");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{group:?}: {err}");
        assert!(
            err.contains("--ssl-ca-location must hold the CA"),
            "{group:?}: {err}"
        );
    }
}
