//! `microbatch scaler` through a gRPC client generated from the same proto,
//! with real lag on a real broker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::harness::*;
use microbatch_scaling::scaler::proto::external_scaler_client::ExternalScalerClient;
use microbatch_scaling::scaler::proto::{GetMetricsRequest, ScaledObjectRef};
use tonic::transport::Channel;

pub(crate) fn object(topic: &str, group: &str, extra: &[(&str, &str)]) -> ScaledObjectRef {
    let mut scaler_metadata: HashMap<String, String> = [("topic", topic), ("consumerGroup", group)]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    scaler_metadata
        .entry("offsetResetPolicy".into())
        .or_insert_with(|| "earliest".into());
    ScaledObjectRef {
        name: "orders".into(),
        namespace: "microbatch".into(),
        scaler_metadata,
    }
}

/// `microbatch scaler` on 127.0.0.1 against the test broker.
fn spawn_scaler(dir: &TestDir, grpc: u16, http: u16, extra: &[&str]) -> Proc {
    let mut cmd = command();
    cmd.args([
        "scaler",
        "--bootstrap-servers",
        broker().bootstrap(),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        &grpc.to_string(),
        "--http-port",
        &http.to_string(),
    ]);
    cmd.args(extra);
    Proc::spawn(cmd, dir.path("scaler.stderr"))
}

pub(crate) async fn connect(port: u16) -> Channel {
    let endpoint = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if let Ok(ch) = Channel::from_shared(endpoint.clone())
            .unwrap()
            .connect()
            .await
        {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the scaler did not come up on {endpoint}");
}

fn lag_policy_json(topic: &str, group: &str, threshold: &str) -> serde_json::Value {
    let (status, out, err) = run_lag(
        topic,
        group,
        &["--json", "--policy", "keda", "--lag-threshold", threshold],
    );
    assert!(status.success(), "{err}");
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn scaler_serves_keda_metrics_that_agree_with_lag() {
    if !broker().is_real() {
        eprintln!("skipped: the scaler test needs a real broker (group listing)");
        return;
    }
    let sc = Scenario::new("scaler", 4);
    let Scenario { dir, topic, group } = &sc;
    let before_produce = Instant::now();
    sc.produce(400, &[]);
    let grpc = free_port();
    let http = free_port();
    let _scaler = spawn_scaler(dir, grpc, http, &["--stream-interval-ms", "300"]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(exercise(dir, topic, group, grpc, (http, before_produce)));
}

/// The first value GetMetrics answers for `object`.
async fn metric_value(
    client: &mut ExternalScalerClient<Channel>,
    object: ScaledObjectRef,
    metric_name: &str,
) -> i64 {
    client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object),
            metric_name: metric_name.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .metric_values[0]
        .metric_value
}

async fn exercise(
    dir: &TestDir,
    topic: &str,
    group: &str,
    grpc: u16,
    (http, before_produce): (u16, Instant),
) {
    let (topic, group) = (topic.to_string(), group.to_string());
    let channel = connect(grpc).await;
    let mut client = ExternalScalerClient::new(channel.clone());

    // Health service answers SERVING for the scaler.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "externalscaler.ExternalScaler".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Uncapped: the metric is the lag `microbatch lag` reports.
    let uncapped = object(
        &topic,
        &group,
        &[("lagThreshold", "50"), ("allowIdleConsumers", "true")],
    );
    let spec = client
        .get_metric_spec(uncapped.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs[0].target_size, 50);
    let value = metric_value(
        &mut client,
        uncapped.clone(),
        &spec.metric_specs[0].metric_name,
    )
    .await;
    let lag = lag_policy_json(&topic, &group, "50");
    assert_eq!(value, lag["total_lag"].as_i64().unwrap());
    assert_eq!(value, 400);
    // Beside the count, the age of the oldest waiting record.
    let text = http_get(http, "/metrics")
        .expect("the scaler serves /metrics")
        .1;
    let seconds = metric_labelled_with(
        &text,
        "microbatch_scaler_lag_seconds",
        "scaled_object=\"microbatch/orders\"",
    )
    .unwrap_or_else(|| panic!("no lag seconds:\n{text}"));
    let most = before_produce.elapsed().as_secs_f64();
    assert!(
        seconds > 0.0 && seconds <= most,
        "lag {seconds} s: the records were produced within the last {most} s"
    );

    // Capped at partitions × lagThreshold, as KEDA does; `lag --policy keda` agrees.
    let capped = object(&topic, &group, &[("lagThreshold", "50")]);
    let value = metric_value(&mut client, capped, "").await;
    assert_eq!(value, 4 * 50);
    assert_eq!(lag["policy"]["metric_value"].as_i64().unwrap(), value);
    // Which term bound the answer: the partition cap (the 400 waiting
    // capped at 4 partitions x 50; 200 / 50 = 4, within the HPA's limit
    // from 1); --explain prints it with each step.
    assert_eq!(lag["policy"]["bound_by"], "partition_cap", "{lag}");
    let (status, out, err) = run_lag(
        &topic,
        &group,
        &["--policy", "keda", "--lag-threshold", "50", "--explain"],
    );
    assert!(status.success(), "{err}");
    assert!(
        out.contains("policy keda: 4 replicas, bound by partition_cap")
            && out.contains("\n  ceil(lag 200 / lagThreshold 50) = 4"),
        "{out}"
    );
    let (status, _, err) = run_lag(&topic, &group, &["--explain"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--policy"), "{err}");

    // IsActive flips with activationLagThreshold.
    let high = object(&topic, &group, &[("activationLagThreshold", "1000")]);
    let low = object(&topic, &group, &[("activationLagThreshold", "10")]);
    assert!(!client.is_active(high).await.unwrap().into_inner().result);
    assert!(
        client
            .is_active(low.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );

    // Bad metadata is an error naming the key.
    let err = client
        .is_active(object(&topic, &group, &[("lagThreshold", "lots")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("lagThreshold"), "{}", err.message());

    // StreamIsActive pushes a change: drain the lag and the stream says false.
    let mut stream = client.stream_is_active(low).await.unwrap().into_inner();
    assert!(
        stream.message().await.unwrap().unwrap().result,
        "active while lag is 400"
    );
    let mut worker = spawn_worker(dir, "w", &topic, &group, free_port(), &[]);
    let next = tokio::time::timeout(Duration::from_secs(120), stream.message())
        .await
        .expect("a change was pushed")
        .unwrap()
        .unwrap();
    assert!(!next.result, "inactive once the lag is drained");
    assert_eq!(total_lag(&topic, &group), 0);
    worker.signal(15);
    worker.wait_for_exit(Duration::from_secs(60));

    // The rate policy targets 1 and its metric is a replica count.
    let rate = object(
        &topic,
        &group,
        &[("policy", "rate"), ("targetDrainSeconds", "10")],
    );
    let spec = client
        .get_metric_spec(rate.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs[0].target_size, 1);
    let replicas = metric_value(&mut client, rate, "").await;
    assert!(
        replicas >= 1,
        "the rate policy asks for at least its minimum: {replicas}"
    );

    // Anything newer than the four methods is Unimplemented.
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/externalscaler.ExternalScaler/GetMetricsAndActivity",
    );
    let codec: tonic_prost::ProstCodec<
        GetMetricsRequest,
        microbatch_scaling::scaler::proto::GetMetricsResponse,
    > = tonic_prost::ProstCodec::default();
    let err = grpc
        .unary(
            tonic::Request::new(GetMetricsRequest::default()),
            path,
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
}

fn named(name: &str, topic: &str, group: &str, extra: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: name.into(),
        ..object(topic, group, extra)
    }
}

/// KEDA's operator and metrics server ask IsActive and GetMetrics for the
/// same ScaledObject a few ms apart. A ScaledObject asked that way gets the
/// same replica count as one asked once per round, on steady load: the rate
/// policy holds one replica (one worker does about 2,000/s; 1,000/s arrive).
#[test]
fn paired_calls_get_the_decisions_single_calls_get_and_metrics_are_real() {
    if !broker().is_real() {
        eprintln!("skipped: the scaler test needs a real broker (group listing)");
        return;
    }
    let sc = Scenario::new("scaler-paired", 8);
    let Scenario { dir, topic, group } = &sc;
    let mut worker = sc.worker(
        "w",
        free_port(),
        &["--process-time-ms", "2", "--concurrency", "4"],
    );
    let mut producer = sc.produce_steadily(40_000, 1000, &[]);
    let (grpc, http) = (free_port(), free_port());
    let mut scaler = spawn_scaler(dir, grpc, http, &["--polling-interval-ms", "1000"]);
    let meta = [
        ("policy", "rate"),
        ("minReplicas", "1"),
        ("maxReplicas", "8"),
        ("targetDrainSeconds", "30"),
    ];
    let single = named("single", topic, group, &meta);
    let paired = named("paired", topic, group, &meta);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rounds: Vec<(i64, i64, bool)> = rt.block_on(async {
        let mut client = ExternalScalerClient::new(connect(grpc).await);
        let metrics = |o: &ScaledObjectRef| GetMetricsRequest {
            scaled_object_ref: Some(o.clone()),
            metric_name: String::new(),
        };
        let mut rounds = Vec::new();
        for _ in 0..24 {
            let s = client.get_metrics(metrics(&single)).await.unwrap();
            let p = client.get_metrics(metrics(&paired)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(4)).await;
            let active = client.is_active(paired.clone()).await.unwrap();
            rounds.push((
                s.into_inner().metric_values[0].metric_value,
                p.into_inner().metric_values[0].metric_value,
                active.into_inner().result,
            ));
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        rounds
    });
    let text = http_get(http, "/metrics")
        .expect("the scaler serves /metrics")
        .1;
    producer.signal(9);
    producer.wait_for_exit(Duration::from_secs(10));
    scaler.terminate();
    worker.signal(15);
    worker.wait_for_exit(Duration::from_secs(60));
    eprintln!("rounds (single, paired, paired active): {rounds:?}");
    // Past the first ~10 s (the worker's first capacity reports), both hold one.
    for (i, (s, p, active)) in rounds.iter().enumerate().skip(8) {
        assert_eq!(
            s, p,
            "round {i}: single and paired calls disagree: {rounds:?}"
        );
        assert_eq!(
            *s, 1,
            "round {i}: steady 1,000/s needs one replica: {rounds:?}"
        );
        assert!(active, "round {i}: records arrive, so active");
    }
    assert!(
        rounds.iter().all(|(s, p, _)| *s <= 2 && *p <= 2),
        "2 at most while learning: {rounds:?}"
    );
    // Each paired IsActive came within the polling interval: served cached.
    let cached = labelled_metric(
        &text,
        "microbatch_scaler_evaluations_total{outcome=\"cached\"}",
    )
    .unwrap_or(0.0);
    assert!(cached >= 24.0, "cached evaluations {cached}:\n{text}");
    assert_eq!(
        metric(&text, "microbatch_scaler_scaled_objects"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric_labelled_with(
            &text,
            "microbatch_scaler_desired_replicas",
            "scaled_object=\"microbatch/paired\""
        ),
        Some(1.0),
        "{text}"
    );
    // The term that bound the answer, as a state set: one series per
    // term, exactly one of them 1.
    let bound: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("microbatch_scaler_bound_by{")
                && l.contains("scaled_object=\"microbatch/paired\"")
        })
        .collect();
    let set: Vec<&&str> = bound.iter().filter(|l| l.ends_with(" 1")).collect();
    assert!(bound.len() >= 16 && set.len() == 1, "{bound:#?}");
}

/// Two triggers on one ScaledObject (KEDA sends both under its name) keep
/// their own state and their own metric series; 50 calls at once for a
/// ScaledObject whose cluster never answers each get an error (never a 0),
/// while another ScaledObject is served and `/healthz` answers. Before,
/// the two triggers replaced each other's state on every call (one series,
/// "starting afresh" each time), and a slow reading held the lock of every
/// ScaledObject, so the other one and `/healthz` waited for all 50.
#[test]
fn triggers_keep_their_own_state_and_a_dead_cluster_holds_up_only_its_own() {
    if !broker().is_real() {
        eprintln!("skipped: the scaler test needs a real broker (group listing)");
        return;
    }
    let sc = Scenario::new("scaler-triggers", 2);
    let Scenario { dir, topic, group } = &sc;
    let second = unique("scaler-triggers-b");
    create_topic(&second, 2);
    sc.produce(300, &[]);
    produce(&second, 40, &[]);
    // A listener that takes connections and never answers: a cluster that
    // is unreachable in the slowest way.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming() {
            held.push(stream);
        }
    });
    let (grpc, http) = (free_port(), free_port());
    let mut scaler = spawn_scaler(dir, grpc, http, &["--polling-interval-ms", "1000"]);
    // lagThreshold past the lag: the metric is the lag, not KEDA's cap.
    let uncapped = [("lagThreshold", "1000")];
    let first_trigger = named("orders", topic, group, &uncapped);
    let second_trigger = named("orders", &second, group, &uncapped);
    let dead = named("dead", topic, group, &[("bootstrapServers", &silent_addr)]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (lags, dead_answers, healthy_while_dead, health_while_dead) = rt.block_on(async {
        let channel = connect(grpc).await;
        let value = |o: &ScaledObjectRef| {
            let mut client = ExternalScalerClient::new(channel.clone());
            let request = GetMetricsRequest {
                scaled_object_ref: Some(o.clone()),
                metric_name: String::new(),
            };
            async move {
                client
                    .get_metrics(request)
                    .await
                    .map(|r| r.into_inner().metric_values[0].metric_value)
            }
        };
        let mut lags = Vec::new();
        for _ in 0..3 {
            lags.push((
                value(&first_trigger).await.unwrap(),
                value(&second_trigger).await.unwrap(),
            ));
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let calls: Vec<_> = (0..50).map(|_| tokio::spawn(value(&dead))).collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // While the 50 wait on the silent cluster: the other object and
        // /healthz answer (within a bound far past a reading, so only a
        // stall fails it).
        let healthy = tokio::time::timeout(Duration::from_secs(8), value(&first_trigger)).await;
        let health = tokio::task::spawn_blocking(move || http_get(http, "/healthz"))
            .await
            .unwrap();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap());
        }
        // StreamIsActive on the dead cluster stays open: an error would end
        // the stream, and KEDA reconnects only after its back-off (found in
        // review). Nothing comes within 20 s (each evaluation fails within
        // 12 s), and the stream is still there.
        let mut client = ExternalScalerClient::new(channel.clone());
        let mut stream = client
            .stream_is_active(dead.clone())
            .await
            .unwrap()
            .into_inner();
        let next = tokio::time::timeout(Duration::from_secs(20), stream.message()).await;
        assert!(
            next.is_err(),
            "the dead cluster's stream gave {next:?} instead of staying open"
        );
        (lags, answers, healthy, health)
    });
    let text = http_get(http, "/metrics").expect("/metrics").1;
    scaler.terminate();
    eprintln!("lags (first, second trigger): {lags:?}");
    for (a, b) in &lags {
        assert_eq!((*a, *b), (300, 40), "each trigger reads its own topic");
    }
    let codes: Vec<tonic::Code> = dead_answers
        .iter()
        .map(|a| match a {
            Ok(v) => panic!("an unreachable cluster answered {v}"),
            Err(status) => status.code(),
        })
        .collect();
    eprintln!(
        "dead cluster: {codes:?}; meanwhile the other object: {:?}, /healthz: {:?}",
        healthy_while_dead
            .as_ref()
            .map(|r| r.as_ref().map_err(|s| s.code())),
        health_while_dead.as_ref().map(|(status, _)| status)
    );
    assert_eq!(codes.len(), 50);
    let healthy = healthy_while_dead.expect("the other ScaledObject waited on the dead one");
    assert_eq!(
        healthy.map_err(|s| s.message().to_string()),
        Ok(300),
        "the other ScaledObject is served"
    );
    assert_eq!(
        health_while_dead.map(|(status, _)| status),
        Some(200),
        "/healthz answers"
    );
    let series = |t: &str| {
        metric_labelled_with(
            &text,
            "microbatch_scaler_total_lag",
            &format!(
                "metric=\"microbatch-keda-{}-{}\"",
                t.to_lowercase(),
                group.to_lowercase()
            )
            .replace('_', "-"),
        )
    };
    assert_eq!(series(topic), Some(300.0), "{text}");
    assert_eq!(series(&second), Some(40.0), "{text}");
    assert!(
        !scaler.stderr().contains("starting afresh"),
        "the triggers replaced each other's state"
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made
/// with the `openssl` command in `dir`.
fn certificates(dir: &TestDir) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir.0)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
        ],
    ]
    .concat());
    std::fs::write(
        dir.path("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.path("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        let (key, csr, pem, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={who}"),
            ],
        ]
        .concat());
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "1",
            "-extfile",
            &ext,
        ]);
    }
}

/// `--tls-cert`/`--tls-key`/`--tls-client-ca`: what KEDA sends with
/// `enableTLS`, `caCert`, `tlsClientCert` and `tlsClientKey` is served; a
/// caller without a client certificate, or without TLS, is not.
#[test]
fn the_scaler_serves_grpc_over_tls_only_to_callers_with_a_client_certificate() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let sc = Scenario::new("scaler-tls", 1);
    let Scenario { dir, topic, group } = &sc;
    sc.produce(7, &[]);
    certificates(dir);
    let pem = |f: &str| std::fs::read(dir.path(f)).unwrap();
    let (grpc, http) = (free_port(), free_port());
    let path = |f: &str| dir.path(f).to_str().unwrap().to_string();
    let mut scaler = spawn_scaler(
        dir,
        grpc,
        http,
        &[
            "--tls-cert",
            &path("server.pem"),
            "--tls-key",
            &path("server.key"),
            "--tls-client-ca",
            &path("ca.pem"),
        ],
    );
    wait_until(Duration::from_secs(30), "the scaler's /healthz", || {
        http_get(http, "/healthz").is_some()
    });
    let trigger = object(topic, group, &[("lagThreshold", "1000")]);
    let request = GetMetricsRequest {
        scaled_object_ref: Some(trigger),
        metric_name: String::new(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ask = |tls: Option<ClientTlsConfig>| {
        let request = request.clone();
        rt.block_on(async move {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut endpoint =
                Channel::from_shared(format!("{scheme}://127.0.0.1:{grpc}")).unwrap();
            if let Some(tls) = tls {
                endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
            }
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            ExternalScalerClient::new(channel)
                .get_metrics(request)
                .await
                .map(|r| r.into_inner().metric_values[0].metric_value)
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        })
    };
    let server_only = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem("ca.pem")))
        .domain_name("localhost");
    let mutual = server_only
        .clone()
        .identity(Identity::from_pem(pem("client.pem"), pem("client.key")));
    let with_certificate = ask(Some(mutual.clone()));
    let without_certificate = ask(Some(server_only));
    let plaintext = ask(None);
    eprintln!("mutual: {with_certificate:?}; no client certificate: {without_certificate:?}; plaintext: {plaintext:?}");
    assert_eq!(with_certificate, Ok(7), "{}", scaler.stderr());
    assert!(
        without_certificate.is_err(),
        "served without a client certificate"
    );
    assert!(plaintext.is_err(), "served without TLS");
    assert!(scaler
        .stderr()
        .contains("mutual (client certificates required)"));

    // A rotation under the running scaler (cert-manager renewing the
    // Secret): a new CA, server and client certificates, swapped in place.
    // First a key that does not fit the certificate: the last good files
    // keep serving. Then the whole set: taken up without a restart, and
    // the old client certificate (from the old CA) is no longer served.
    let rotated = TestDir::new("scaler-tls-rotated");
    certificates(&rotated);
    let swap = |file: &str, from: &std::path::Path| {
        let staged = dir.path(&format!("{file}.new"));
        std::fs::copy(from, &staged).unwrap();
        std::fs::rename(&staged, dir.path(file)).unwrap();
    };
    swap("server.key", &rotated.path("server.key"));
    wait_until(
        Duration::from_secs(30),
        "the broken rotation logged",
        || {
            scaler
                .stderr()
                .contains("cannot be used; serving the last good ones")
        },
    );
    assert_eq!(
        ask(Some(mutual.clone())),
        Ok(7),
        "a key that does not fit its certificate replaced the good files"
    );
    swap("server.pem", &rotated.path("server.pem"));
    swap("ca.pem", &rotated.path("ca.pem"));
    let new_pem = |f: &str| std::fs::read(rotated.path(f)).unwrap();
    let renewed = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(new_pem("ca.pem")))
        .domain_name("localhost")
        .identity(Identity::from_pem(
            new_pem("client.pem"),
            new_pem("client.key"),
        ));
    let mut after = Err(String::new());
    wait_until(
        Duration::from_secs(30),
        "the rotated certificates served",
        || {
            after = ask(Some(renewed.clone()));
            after == Ok(7)
        },
    );
    // The server's new certificate trusted, the old CA's client
    // certificate offered: the client CA was rotated too.
    let old_client = ask(Some(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(new_pem("ca.pem")))
            .domain_name("localhost")
            .identity(Identity::from_pem(pem("client.pem"), pem("client.key"))),
    ));
    drop(mutual);
    scaler.terminate();
    eprintln!("the old CA's client certificate after the rotation: {old_client:?}");
    assert!(
        old_client.is_err(),
        "the old CA's client certificate is still served after the rotation"
    );
    assert!(scaler
        .stderr()
        .contains("TLS certificate files changed: new connections use them"));
}

/// A `shareGroup` trigger scales on the share group's backlog with no
/// partition cap: 24,000 records waiting on 8 partitions at lagThreshold
/// 100 give KEDA a metric of 24,000 (240 replicas' worth, which
/// maxReplicaCount bounds), where the same records under `consumerGroup`
/// are capped at 8 replicas' worth (800). Metadata mistakes are refused.
#[test]
fn a_share_group_trigger_is_not_capped_by_partitions() {
    if crate::share::real_broker().is_none() {
        return;
    }
    let sc = Scenario::new("scaler-share", 8);
    let Scenario { dir, topic, group } = &sc;
    let produced_at = Instant::now();
    sc.produce(24_000, &[]);
    let (grpc, http) = (free_port(), free_port());
    let _scaler = spawn_scaler(dir, grpc, http, &[]);
    let share_group = unique("scaler-share-group");
    let dlq = sc.dead_letter_topic(1);
    let keda = [("policy", "keda"), ("lagThreshold", "100")];
    let share_meta = |extra: &[(&str, &str)]| {
        let mut o = object(topic, group, extra);
        o.scaler_metadata.remove("consumerGroup");
        o.scaler_metadata
            .insert("shareGroup".into(), share_group.clone());
        o
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = ExternalScalerClient::new(connect(grpc).await);
        let share = ScaledObjectRef {
            name: "share".into(),
            ..share_meta(&keda)
        };
        let spec = client
            .get_metric_spec(share.clone())
            .await
            .unwrap()
            .into_inner();
        let name = spec.metric_specs[0].metric_name.clone();
        assert!(name.contains("share"), "{name}");
        let shared = metric_value(&mut client, share.clone(), &name).await;
        assert_eq!(shared, 24_000, "the whole backlog, no partition cap");
        assert!(client.is_active(share).await.unwrap().into_inner().result);
        let consumer = named("consumer", topic, group, &keda);
        let spec = client
            .get_metric_spec(consumer.clone())
            .await
            .unwrap()
            .into_inner();
        let capped = metric_value(&mut client, consumer, &spec.metric_specs[0].metric_name).await;
        assert_eq!(capped, 800, "a consumer group is capped at its partitions");
        // Once the group has state for every partition (a worker fetched
        // from each and acknowledged some), the metric is the backlog as
        // Kafka's own admin client reads it, still uncapped.
        let mut worker = spawn_share_worker(
            dir,
            "w",
            topic,
            &share_group,
            0,
            &["--process-time-ms", "20", "--dlq-topic", &dlq],
        );
        let bootstrap = broker().bootstrap().to_string();
        // Kafka's tool shows a partition without state as "-".
        let unknown = || {
            let out = command()
                .args(["lag", "--bootstrap-servers", &bootstrap, "--topic", topic])
                .args(["--share-group", &share_group, "--json"])
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["partitions_unknown"].as_u64().unwrap()
        };
        let started = Instant::now();
        while unknown() > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the group has no state for some partitions after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        worker.signal(9);
        let _ = worker.wait_for_exit(Duration::from_secs(10));
        let backlog: i64 = share_group_lag(&bootstrap, &share_group).values().sum();
        let later = ScaledObjectRef {
            name: "share-later".into(),
            ..share_meta(&keda)
        };
        let value = metric_value(&mut client, later, &name).await;
        assert_eq!(value, backlog, "the backlog Kafka's tool reads");
        assert!(backlog > 800, "more than 8 replicas' worth: {backlog}");
        // The oldest record not done is as old as the burst: its age is
        // read at the share-partition start offset.
        let (_, text) = http_get(http, "/metrics").expect("the scaler's /metrics");
        let age = metric_labelled_with(
            &text,
            "microbatch_scaler_lag_seconds",
            &format!("metric=\"{name}\""),
        )
        .expect("a lag_seconds series for the share trigger");
        let since_produce = produced_at.elapsed().as_secs_f64();
        assert!(
            age > 1.0 && age <= since_produce + 1.0,
            "the oldest record waits {age} s; produced {since_produce:.1} s ago"
        );
        // The topic is required, and one group only.
        let mut no_topic = share_meta(&keda);
        no_topic.name = "no-topic".into();
        no_topic.scaler_metadata.remove("topic");
        let mut both = share_meta(&keda);
        both.name = "both".into();
        both.scaler_metadata
            .insert("consumerGroup".into(), group.to_string());
        // A consumer group may not take the companion group's name.
        let mut reserved = share_meta(&keda);
        reserved.name = "reserved".into();
        reserved.scaler_metadata.remove("shareGroup");
        reserved.scaler_metadata.insert(
            "consumerGroup".into(),
            format!("microbatch-capacity.{share_group}"),
        );
        for (o, says) in [
            (no_topic, "topic"),
            (both, "not both"),
            (reserved, "reserved"),
        ] {
            let err = client.get_metric_spec(o).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
            assert!(err.message().contains(says), "{err}");
        }
    });
}
