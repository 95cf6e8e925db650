//! Amazon MSK IAM against the local broker's MSK_IAM listener
//! (`scripts/kafka-local.sh`), which checks each token's SigV4 signature
//! against test credentials, its action and expiry, as MSK does, and honours
//! a token for a short time only. Credentials come from the environment,
//! or from a web identity token file exchanged at a local STS stand-in.
//! Every output of these tests is searched for the secrets.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;

/// The MSK_IAM listener's client settings (`.kafka-local/msk-iam.env`).
pub(crate) fn iam_env() -> Option<BTreeMap<String, String>> {
    let env = std::env::var("MICROBATCH_TEST_MSK_IAM_ENV")
        .ok()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .map(|text| {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        });
    if env.is_none() {
        assert!(
            !in_ci(),
            "CI=true but MICROBATCH_TEST_MSK_IAM_ENV names no msk-iam.env (run scripts/test.sh)"
        );
        eprintln!("note: no MSK_IAM listener (MICROBATCH_TEST_MSK_IAM_ENV); skipping");
    }
    env
}

/// `microbatch` for the MSK_IAM listener. The AWS SDK sees only what the
/// test gives it: no shared files of this machine, no instance metadata.
fn iam_command(dir: &TestDir, env: &BTreeMap<String, String>) -> Command {
    let mut cmd = command();
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") || k.starts_with("MSK_IAM_") {
            cmd.env_remove(k);
        }
    }
    let config = dir.path("aws-config");
    let credentials = dir.path("aws-credentials");
    std::fs::write(&config, "").unwrap();
    std::fs::write(&credentials, "").unwrap();
    cmd.env("AWS_CONFIG_FILE", &config)
        .env("AWS_SHARED_CREDENTIALS_FILE", &credentials)
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for key in [
        "KAFKA_BOOTSTRAP_SERVERS",
        "KAFKA_SECURITY_PROTOCOL",
        "KAFKA_SASL_MECHANISM",
        "KAFKA_SSL_CA_LOCATION",
        "AWS_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MSK_IAM_TOKEN_LIFETIME_S",
    ] {
        cmd.env(key, &env[key]);
    }
    cmd
}

fn output(mut cmd: Command, args: &[&str]) -> (bool, String) {
    let out = cmd
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running microbatch");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn spawn_iam_worker(
    dir: &TestDir,
    mut cmd: Command,
    name: &str,
    topic: &str,
    group: &str,
    port: u16,
) -> Proc {
    cmd.arg("run");
    let handler = recording_handler(dir, HandlerBehaviour::default());
    spawn_worker_with(
        cmd,
        dir,
        name,
        topic,
        group,
        port,
        &["--handler", "exec", "--command", &handler],
    )
}

/// Every signed token starts so: base64url of `https://kafka` (the 18
/// characters that do not depend on what follows).
const TOKEN_PREFIX: &str = "aHR0cHM6Ly9rYWZrYS";

/// Fails when any output holds a secret: the secret key, the session token
/// or a signed token (the access key id too, which names the identity).
fn assert_no_secrets(outputs: &[&str], secrets: &[&str]) {
    for text in outputs {
        for (n, secret) in secrets.iter().chain([&TOKEN_PREFIX]).enumerate() {
            assert!(!secret.is_empty(), "secret {n} is empty");
            if let Some(line) = text.lines().find(|l| l.contains(secret)) {
                // Shown masked: test credentials, but still not for CI logs.
                panic!(
                    "secret {n} leaked into this output line: {}",
                    line.replace(secret, "<SECRET>")
                );
            }
        }
    }
}

fn iam_secrets(env: &BTreeMap<String, String>) -> Vec<&str> {
    vec![&env["AWS_SECRET_ACCESS_KEY"], &env["AWS_ACCESS_KEY_ID"]]
}

#[test]
fn worker_drains_a_topic_through_msk_iam() {
    let Some(env) = iam_env() else { return };
    let dir = TestDir::new("iam-drain");
    let topic = unique("15-iam-drain");
    let group = unique("15-iam-drain-g");
    let (ok, created) = output(
        iam_command(&dir, &env),
        &["topic", "create", "--topic", &topic, "--partitions", "4"],
    );
    assert!(ok, "{created}");
    let (ok, produced) = output(
        iam_command(&dir, &env),
        &["produce", "--topic", &topic, "--count", "3000", "--quiet"],
    );
    assert!(ok, "{produced}");
    let port = free_port();
    let mut worker = spawn_iam_worker(&dir, iam_command(&dir, &env), "w", &topic, &group, port);
    wait_until(Duration::from_secs(60), "the worker is ready", || {
        http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    wait_for_lag_zero(&topic, &group, Duration::from_secs(60));
    let (expected, _) = assert_all_handled(&dir, &topic, &group);
    assert_eq!(expected, 3000);
    let (ok, lag) = output(
        iam_command(&dir, &env),
        &["lag", "--topic", &topic, "--group", &group, "--json"],
    );
    assert!(ok && lag.contains("\"total_lag\":0"), "{lag}");
    worker.terminate();
    assert_no_secrets(
        &[&created, &produced, &lag, &worker.stderr()],
        &iam_secrets(&env),
    );
}

#[test]
fn wrong_secret_is_refused_with_a_clear_error_and_readyz_not_200() {
    let Some(env) = iam_env() else { return };
    let dir = TestDir::new("iam-wrong");
    let topic = unique("15-iam-wrong");
    create_topic(&topic, 1);
    let wrong = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYWRONGKEY";
    let mut cmd = iam_command(&dir, &env);
    cmd.env("AWS_SECRET_ACCESS_KEY", wrong);
    let (ok, lag) = output(cmd, &["lag", "--topic", &topic, "--group", "g"]);
    assert!(!ok, "{lag}");
    assert!(lag.contains("authentication failed"), "{lag}");

    let port = free_port();
    let mut cmd = iam_command(&dir, &env);
    cmd.env("AWS_SECRET_ACCESS_KEY", wrong);
    let mut worker = spawn_iam_worker(&dir, cmd, "w", &topic, &unique("15-g"), port);
    let mut last = None;
    wait_until(
        Duration::from_secs(60),
        "/readyz to report the authentication failure",
        || {
            last = http_get(port, "/readyz");
            last.as_ref()
                .is_some_and(|(s, body)| *s != 200 && body.contains("authentication"))
        },
    );
    wait_until(Duration::from_secs(30), "the error in the log", || {
        worker.stderr().contains("authentication failed")
    });
    worker.terminate();
    let body = last.map(|(_, b)| b).unwrap_or_default();
    let mut secrets = iam_secrets(&env);
    secrets.push(wrong);
    assert_no_secrets(&[&lag, &worker.stderr(), &body], &secrets);
}

#[test]
fn token_is_refreshed_during_a_run_longer_than_its_lifetime() {
    let Some(env) = iam_env() else { return };
    let dir = TestDir::new("iam-refresh");
    let topic = unique("15-iam-refresh");
    let group = unique("15-iam-refresh-g");
    create_topic(&topic, 2);
    let port = free_port();
    let mut cmd = iam_command(&dir, &env);
    // Tokens live 10 s: the run below lasts several lifetimes.
    cmd.env("MSK_IAM_TOKEN_LIFETIME_S", "10")
        .env("MICROBATCH_LOG", "info,microbatch_kafka::aws_iam=debug");
    let mut worker = spawn_iam_worker(&dir, cmd, "w", &topic, &group, port);
    wait_until(Duration::from_secs(60), "the worker is ready", || {
        http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    // 35 s of steady load at 100 records/s, through the plaintext listener.
    let mut producer = produce_steadily(&dir, &topic, 3500, 100, &[]);
    // Progress and readiness are sampled all along: consumption must not
    // stop, and the worker must stay ready, across every re-authentication.
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut last_processed = 0.0;
    let mut longest_stall = Duration::ZERO;
    let (mut samples, mut not_ready) = (0, Vec::new());
    while producer.child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "producer hangs"
        );
        let ready = http_get(port, "/readyz");
        samples += 1;
        if ready.as_ref().is_none_or(|(s, _)| *s != 200) {
            not_ready.push(format!("{:?}: {ready:?}", started.elapsed()));
        }
        let processed = worker_metric(port, "microbatch_records_processed_total").unwrap_or(0.0);
        if processed > last_processed {
            last_processed = processed;
            last_progress = Instant::now();
        }
        // From the first record on (starting the producer takes a while).
        if last_processed > 0.0 {
            longest_stall = longest_stall.max(last_progress.elapsed());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        producer.child.wait().unwrap().success(),
        "{}",
        producer.stderr()
    );
    wait_for_lag_zero(&topic, &group, Duration::from_secs(60));
    let (expected, _) = assert_all_handled(&dir, &topic, &group);
    assert_eq!(expected, 3500);
    wait_until(Duration::from_secs(30), "ready at the end", || {
        http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    let elapsed = started.elapsed();
    // Shutting down revokes the partitions: the run is what comes before.
    let run_log = worker.stderr();
    worker.terminate();
    let log = worker.stderr();
    assert_no_secrets(&[&log], &iam_secrets(&env));
    // 100 records/s in batches of at most 100 ms: progress shows in every
    // sample or two.
    assert!(
        longest_stall < Duration::from_secs(3),
        "consumption stalled for {longest_stall:?}:\n{log}"
    );
    assert!(
        not_ready.is_empty(),
        "not ready in {} of {samples} samples: {not_ready:#?}\n{log}",
        not_ready.len()
    );
    let refreshes = log.matches("MSK IAM token refreshed").count();
    assert!(
        refreshes >= 6,
        "{refreshes} refreshes in {elapsed:?} of 10 s tokens:\n{log}"
    );
    // Every new token reached librdkafka, and every re-authentication
    // succeeded: none was refused (invalid_token) and none came too soon
    // after the last (the broker's ILLEGAL_SASL_STATE, after which
    // librdkafka drops the connection).
    for refused in [
        "handing the MSK IAM token to a Kafka client failed",
        "invalid_token",
        "Request not valid in current SASL state",
        "authentication failed",
    ] {
        assert!(!log.contains(refused), "{refused:?} in the log:\n{log}");
    }
    // And the group kept its one assignment throughout.
    assert!(
        !run_log.contains("partitions revoked"),
        "partitions revoked during the run:\n{run_log}"
    );
    let assignments = run_log.matches("partitions assigned").count();
    assert_eq!(assignments, 1, "the group rebalanced:\n{run_log}");
}

/// A local stand-in for STS's AssumeRoleWithWebIdentity: it answers with the
/// listener's test credentials when the request carries `expected_token`.
struct StsStandIn {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl StsStandIn {
    fn start(expected_token: String, access: String, secret: String, session: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let body = String::from_utf8_lossy(&body).into_owned();
                seen.lock().unwrap().push(body.clone());
                let (status, xml) = if body.contains("Action=AssumeRoleWithWebIdentity")
                    && body.contains(&format!("WebIdentityToken={expected_token}"))
                {
                    ("200 OK", format!(
                        "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
                         <AssumeRoleWithWebIdentityResult><Credentials>\
                         <AccessKeyId>{access}</AccessKeyId><SecretAccessKey>{secret}</SecretAccessKey>\
                         <SessionToken>{session}</SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration>\
                         </Credentials><SubjectFromWebIdentityToken>system:serviceaccount:ns:worker</SubjectFromWebIdentityToken>\
                         <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/worker/s</Arn>\
                         <AssumedRoleId>AROAEXAMPLE:s</AssumedRoleId></AssumedRoleUser>\
                         </AssumeRoleWithWebIdentityResult><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata>\
                         </AssumeRoleWithWebIdentityResponse>"
                    ))
                } else {
                    ("400 Bad Request", "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code>\
                         <Message>unexpected request</Message></Error><RequestId>1</RequestId></ErrorResponse>".to_string())
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                    xml.len()
                );
            }
        });
        Self { port, requests }
    }
}

#[test]
fn web_identity_token_file_is_exchanged_at_sts_for_credentials() {
    let Some(env) = iam_env() else { return };
    let dir = TestDir::new("iam-irsa");
    let topic = unique("15-iam-irsa");
    create_topic(&topic, 1);
    let web_token = "eyJhbGciOiJSUzI1NiJ9.test-service-account-token.sig";
    std::fs::write(dir.path("token"), web_token).unwrap();
    let session = "IQoJb3JpZ2luX2VjEXAMPLE/session+token=";
    let sts = StsStandIn::start(
        web_token.to_string(),
        env["AWS_ACCESS_KEY_ID"].clone(),
        env["AWS_SECRET_ACCESS_KEY"].clone(),
        session.to_string(),
    );
    let irsa = |dir: &TestDir| {
        let mut cmd = iam_command(dir, &env);
        cmd.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_WEB_IDENTITY_TOKEN_FILE", dir.path("token"))
            .env("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/worker")
            .env("AWS_ROLE_SESSION_NAME", "microbatch-test")
            .env(
                "AWS_ENDPOINT_URL_STS",
                format!("http://127.0.0.1:{}", sts.port),
            );
        cmd
    };
    let (ok, produced) = output(
        irsa(&dir),
        &["produce", "--topic", &topic, "--count", "200", "--quiet"],
    );
    assert!(ok, "{produced}");
    let (ok, lag) = output(irsa(&dir), &["lag", "--topic", &topic, "--group", "g"]);
    assert!(ok && lag.contains("200"), "{lag}");
    let requests = sts.requests.lock().unwrap().clone();
    assert!(
        requests.len() >= 2
            && requests
                .iter()
                .all(|r| r.contains("Action=AssumeRoleWithWebIdentity")
                    && r.contains("RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fworker")),
        "{requests:?}"
    );
    // A token file STS does not accept: a clear error, no secrets.
    std::fs::write(dir.path("token"), "not-the-token").unwrap();
    let (ok, refused) = output(irsa(&dir), &["lag", "--topic", &topic, "--group", "g"]);
    assert!(!ok && refused.contains("no AWS credentials"), "{refused}");
    let mut secrets = iam_secrets(&env);
    secrets.push(session);
    secrets.push(web_token);
    assert_no_secrets(&[&produced, &lag, &refused], &secrets);
}

#[test]
fn auth_msk_iam_token_prints_one_token_and_its_expiry() {
    let Some(env) = iam_env() else { return };
    let dir = TestDir::new("iam-auth");
    let (ok, out) = output(
        iam_command(&dir, &env),
        &[
            "auth",
            "msk-iam-token",
            "--aws-region",
            "eu-west-1",
            "--json",
        ],
    );
    assert!(ok, "{out}");
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let token = json["token"].as_str().unwrap();
    assert!(token.starts_with(TOKEN_PREFIX), "{token}");
    assert_eq!(json["region"], "eu-west-1");
    let expires = json["expires_at_ms"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let lifetime: i64 = env["MSK_IAM_TOKEN_LIFETIME_S"].parse().unwrap();
    assert!(
        (expires - now - lifetime * 1000).abs() < 5000,
        "{expires} vs {now}"
    );
    // Without a region: bad usage, naming the flag.
    let mut cmd = iam_command(&dir, &env);
    cmd.env_remove("AWS_REGION");
    let out = cmd
        .args(["auth", "msk-iam-token"])
        .output()
        .expect("running microbatch");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--aws-region"));
    // --help never shows a secret from the environment.
    let (_, help) = output(iam_command(&dir, &env), &["run", "--help"]);
    assert!(help.contains("AWS_MSK_IAM"), "{help}");
    assert_no_secrets(&[&help], &iam_secrets(&env));
}

#[test]
fn supervise_children_inherit_msk_iam_without_credentials_on_their_command_line() {
    let Some(env) = iam_env() else { return };
    let dir = TestDir::new("iam-supervise");
    let topic = unique("15-iam-sup");
    let group = unique("15-iam-sup-g");
    create_topic(&topic, 2);
    produce(&topic, 1000, &[]);
    let mut cmd = iam_command(&dir, &env);
    cmd.args([
        "supervise",
        "--topic",
        &topic,
        "--group",
        &group,
        "--min",
        "1",
        "--max",
        "2",
        "--polling-interval-ms",
        "500",
        "--http-port",
        "0",
        "--drain-timeout-ms",
        "5000",
        "--log-dir",
        dir.0.to_str().unwrap(),
        "--",
        "--handler",
        "exec",
        "--command",
        &recording_handler(&dir, HandlerBehaviour::default()),
    ]);
    let mut sup = Proc::spawn(cmd, dir.path("supervise.stderr"));
    wait_for_lag_zero(&topic, &group, Duration::from_secs(90));
    let children = children_of(sup.child.id());
    assert!(!children.is_empty(), "no workers: {}", sup.stderr());
    let mut outputs = vec![sup.stderr()];
    for pid in &children {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        outputs.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
    }
    let (expected, _) = assert_all_handled(&dir, &topic, &group);
    assert_eq!(expected, 1000);
    sup.terminate();
    for entry in std::fs::read_dir(&dir.0).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            outputs.push(read(&entry.path()));
        }
    }
    let texts: Vec<&str> = outputs.iter().map(String::as_str).collect();
    assert_no_secrets(&texts, &iam_secrets(&env));
}

#[test]
fn scaler_reads_lag_through_msk_iam() {
    use microbatch_scaling::scaler::proto::external_scaler_client::ExternalScalerClient;
    use microbatch_scaling::scaler::proto::{GetMetricsRequest, ScaledObjectRef};

    let Some(env) = iam_env() else { return };
    let dir = TestDir::new("iam-scaler");
    let topic = unique("15-iam-scaler");
    create_topic(&topic, 2);
    produce(&topic, 300, &[]);
    let grpc = free_port();
    let mut cmd = iam_command(&dir, &env);
    cmd.args([
        "scaler",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        &grpc.to_string(),
    ]);
    cmd.args(["--http-port", "0"]);
    let mut scaler = Proc::spawn(cmd, dir.path("scaler.stderr"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let lag = runtime.block_on(async {
        let endpoint = format!("http://127.0.0.1:{grpc}");
        let mut channel = None;
        for _ in 0..100 {
            if let Ok(ch) = tonic::transport::Channel::from_shared(endpoint.clone())
                .unwrap()
                .connect()
                .await
            {
                channel = Some(ch);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut client = ExternalScalerClient::new(channel.expect("the scaler listens"));
        let object = ScaledObjectRef {
            name: "orders".into(),
            namespace: "microbatch".into(),
            scaler_metadata: [
                ("topic", topic.as_str()),
                ("consumerGroup", "15-iam-scaler-g"),
                ("offsetResetPolicy", "earliest"),
                ("lagThreshold", "10"),
                ("allowIdleConsumers", "true"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        };
        let spec = client
            .get_metric_spec(object.clone())
            .await
            .unwrap()
            .into_inner();
        client
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(object),
                metric_name: spec.metric_specs[0].metric_name.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .metric_values[0]
            .metric_value
    });
    assert_eq!(lag, 300, "{}", scaler.stderr());
    // Closes the gRPC connection, which a graceful shutdown waits for.
    drop(runtime);
    scaler.terminate();
    assert_no_secrets(&[&scaler.stderr()], &iam_secrets(&env));
}

#[test]
fn failed_refresh_keeps_the_last_token_shows_in_readyz_and_recovers() {
    let Some(env) = iam_env() else { return };
    let dir = TestDir::new("iam-refresh-fails");
    let topic = unique("15-iam-refail");
    create_topic(&topic, 1);
    let web_token = "eyJhbGciOiJSUzI1NiJ9.refresh-test-token.sig";
    std::fs::write(dir.path("token"), web_token).unwrap();
    let session = "IQoJb3JpZ2luX2VjREFRESH/session+token=";
    let sts = StsStandIn::start(
        web_token.to_string(),
        env["AWS_ACCESS_KEY_ID"].clone(),
        env["AWS_SECRET_ACCESS_KEY"].clone(),
        session.to_string(),
    );
    let mut cmd = iam_command(&dir, &env);
    cmd.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_WEB_IDENTITY_TOKEN_FILE", dir.path("token"))
        .env("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/worker")
        .env(
            "AWS_ENDPOINT_URL_STS",
            format!("http://127.0.0.1:{}", sts.port),
        )
        // Refreshed every 10 s; a token outlives a failed refresh by 10 s.
        .env("MSK_IAM_TOKEN_LIFETIME_S", "20");
    let port = free_port();
    let mut worker = spawn_iam_worker(&dir, cmd, "w", &topic, &unique("15-g"), port);
    wait_until(Duration::from_secs(60), "the worker is ready", || {
        http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    // STS now refuses the pod's token: the next refresh fails.
    std::fs::write(dir.path("token"), "a-token-sts-refuses").unwrap();
    let mut body = String::new();
    wait_until(
        Duration::from_secs(30),
        "/readyz to show the failing refresh",
        || match http_get(port, "/readyz") {
            Some((503, b)) if b.contains("MSK IAM token refresh failing") => {
                body = b;
                true
            }
            _ => false,
        },
    );
    assert!(body.contains("the last good token expires in"), "{body}");
    assert!(worker.stderr().contains("MSK IAM token refresh failed"));
    // STS accepts it again: the next attempt succeeds and the worker is ready.
    std::fs::write(dir.path("token"), web_token).unwrap();
    wait_until(Duration::from_secs(45), "/readyz 200 again", || {
        http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    worker.terminate();
    let log = worker.stderr();
    let failures = log.matches("MSK IAM token refresh failed").count();
    assert!(
        (1..=6).contains(&failures),
        "once per back-off step, not per poll: {failures}\n{log}"
    );
    let mut secrets = iam_secrets(&env);
    secrets.push(session);
    secrets.push(web_token);
    assert_no_secrets(&[&log, &body], &secrets);
}

#[test]
fn demo_runs_end_to_end_through_msk_iam() {
    let Some(env) = iam_env() else { return };
    let dir = TestDir::new("iam-demo");
    let json = dir.path("report.json");
    let mut cmd = iam_command(&dir, &env);
    cmd.current_dir(&dir.0).args([
        "demo",
        "--quick",
        "--report-json",
        json.to_str().unwrap(),
        "--report-html",
        dir.path("report.html").to_str().unwrap(),
    ]);
    let (ok, out) = output(cmd, &[]);
    assert!(ok, "demo failed: {out}");
    let report: serde_json::Value = serde_json::from_str(&read(&json)).expect("the JSON report");
    assert_eq!(report["lost"], 0, "{report}");
    assert!(
        report["runs"][0]["produced"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_no_secrets(&[&out], &iam_secrets(&env));
}

/// A ScaledObject whose trigger names other `bootstrapServers` gets an
/// error from a scaler that proves who it is (AWS_MSK_IAM, SCRAM), and no
/// connection is made to those servers: a listener there records none.
/// Before, the check looked only for a password, so a scaler under
/// AWS_MSK_IAM sent signed tokens to any listener a ScaledObject named.
#[test]
fn a_scaler_with_credentials_never_connects_to_servers_a_trigger_names() {
    use microbatch_scaling::scaler::proto::external_scaler_client::ExternalScalerClient;
    use microbatch_scaling::scaler::proto::GetMetricsRequest;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let Some(iam) = iam_env() else {
        return;
    };
    let Some(scram) = scram_listener() else {
        return;
    };
    let dir = TestDir::new("scaler-foreign");
    let topic = unique("scaler-foreign");
    create_topic(&topic, 1);
    let recorder = TcpListener::bind("127.0.0.1:0").unwrap();
    let foreign = recorder.local_addr().unwrap().to_string();
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = attempts.clone();
    std::thread::spawn(move || {
        for stream in recorder.incoming() {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    let mut with_scram = command();
    for key in [
        "KAFKA_BOOTSTRAP_SERVERS",
        "KAFKA_USERNAME",
        "KAFKA_PASSWORD",
        "KAFKA_SSL_CA_LOCATION",
    ] {
        with_scram.env(key, &scram[key]);
    }
    with_scram
        .env("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
        .env("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512");
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (mechanism, mut cmd) in [
        ("AWS_MSK_IAM", iam_command(&dir, &iam)),
        ("SCRAM", with_scram),
    ] {
        let (grpc, http) = (free_port(), free_port());
        cmd.args(["scaler", "--host", "127.0.0.1"]);
        cmd.args([
            "--grpc-port",
            &grpc.to_string(),
            "--http-port",
            &http.to_string(),
        ]);
        let mut scaler = Proc::spawn(cmd, dir.path(&format!("scaler-{mechanism}.stderr")));
        let own = crate::scaler::object(&topic, "g", &[]);
        let elsewhere = crate::scaler::object(&topic, "g", &[("bootstrapServers", &foreign)]);
        let (own_answer, foreign_answer) = rt.block_on(async {
            let mut client = ExternalScalerClient::new(crate::scaler::connect(grpc).await);
            let request =
                |o: &microbatch_scaling::scaler::proto::ScaledObjectRef| GetMetricsRequest {
                    scaled_object_ref: Some(o.clone()),
                    metric_name: String::new(),
                };
            (
                client.get_metrics(request(&own)).await,
                client.get_metrics(request(&elsewhere)).await,
            )
        });
        std::thread::sleep(Duration::from_secs(2));
        scaler.terminate();
        assert!(
            own_answer.is_ok(),
            "{mechanism}: the scaler reads its own cluster: {own_answer:?}\n{}",
            scaler.stderr()
        );
        let refused = foreign_answer.expect_err("the foreign servers were read");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{mechanism}");
        assert!(
            refused.message().contains("bootstrapServers"),
            "{refused:?}"
        );
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            0,
            "{mechanism}: a connection reached the servers a trigger named"
        );
    }
}
