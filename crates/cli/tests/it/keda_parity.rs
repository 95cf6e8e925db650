//! The `keda` policy against KEDA itself: KEDA v2.21.0's own kafka scaler
//! (`keda-diff/`, a Go program importing `github.com/kedacore/keda/v2/pkg/scalers`)
//! and microbatch (`lag --policy keda --json` and `scaler`'s GetMetrics and
//! IsActive) read the same engineered lag states on a real broker, with the
//! same trigger metadata, and must give the same metric and activity.
//!
//! The states: commits placed with the admin API (AlterConsumerGroupOffsets,
//! one past the partition's end),
//! records deleted for retention (DeleteRecords) below a commit and on a
//! partition without one, partitions without commits (one empty), lag that
//! persists over two polls, and a commit that moves between polls; and
//! triggers without a topic, over the two topics the group committed on.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use crate::harness::admin::*;
use crate::harness::*;
use microbatch_scaling::scaler::proto::external_scaler_client::ExternalScalerClient;
use microbatch_scaling::scaler::proto::{GetMetricsRequest, ScaledObjectRef};
use tonic::transport::Channel;

/// Records produced per partition, and where each partition's state ends up.
const RECORDS: [i64; 7] = [20, 20, 20, 20, 0, 20, 0];
/// Committed offsets placed with the admin API (None: never committed);
/// partition 6's is past its end (the admin API allows it): lag −3.
const COMMITTED: [Option<i64>; 7] = [Some(5), Some(20), None, Some(2), None, Some(0), Some(3)];
/// Records deleted from the start of a partition (the new low watermark).
const DELETED_BEFORE: [(i32, i64); 2] = [(2, 8), (3, 10)];

/// Trigger metadata to compare (besides topic, consumerGroup, bootstrapServers).
const TRIGGERS: &[&[(&str, &str)]] = &[
    &[],
    &[("offsetResetPolicy", "earliest")],
    &[
        ("offsetResetPolicy", "earliest"),
        ("scaleToZeroOnInvalidOffset", "true"),
    ],
    &[("scaleToZeroOnInvalidOffset", "true")],
    &[("lagThreshold", "1"), ("activationLagThreshold", "100")],
    &[
        ("lagThreshold", "1"),
        ("offsetResetPolicy", "earliest"),
        ("activationLagThreshold", "65"),
    ],
    &[("lagThreshold", "1"), ("limitToPartitionsWithLag", "true")],
    &[("lagThreshold", "1"), ("allowIdleConsumers", "true")],
    &[
        ("lagThreshold", "7"),
        ("ensureEvenDistributionOfPartitions", "true"),
    ],
    &[
        ("lagThreshold", "4"),
        ("ensureEvenDistributionOfPartitions", "true"),
        ("allowIdleConsumers", "true"),
        ("offsetResetPolicy", "earliest"),
    ],
    &[("lagThreshold", "2"), ("partitionLimitation", "0,2-3")],
    // Spaces around values and range bounds.
    &[
        ("lagThreshold", " 3 "),
        ("partitionLimitation", " 0 , 2 - 3 "),
    ],
    // Only the partition committed past its end: a negative total.
    &[("lagThreshold", "2"), ("partitionLimitation", "6")],
    &[("lagThreshold", "3"), ("excludePersistentLag", "true")],
    &[
        ("lagThreshold", "1"),
        ("excludePersistentLag", "true"),
        ("limitToPartitionsWithLag", "true"),
        ("activationLagThreshold", "40"),
    ],
];

/// Triggers without a topic: every topic the group has committed offsets
/// for (compared with the scaler; `lag` always names one topic).
const GROUP_WIDE: &[&[(&str, &str)]] = &[
    &[],
    &[("offsetResetPolicy", "earliest"), ("lagThreshold", "3")],
    &[("lagThreshold", "1"), ("activationLagThreshold", "70")],
    &[("excludePersistentLag", "true"), ("lagThreshold", "2")],
    // Go's spellings of true.
    &[("allowIdleConsumers", "True"), ("lagThreshold", "1")],
    &[("excludePersistentLag", "1"), ("lagThreshold", "4")],
    // Ignored without a topic, by KEDA and by us.
    &[("partitionLimitation", "0"), ("lagThreshold", "5")],
];

/// A second topic of the group: records per partition, and its commits.
const OTHER_RECORDS: [i64; 2] = [7, 7];
const OTHER_COMMITTED: [(i32, i64); 1] = [(0, 3)];

/// Metadata spellings KEDA refuses (a flag of `lag` is not metadata).
const REFUSED_SPELLINGS: &[&[(&str, &str)]] = &[
    &[("lagThreshold", "+5")],
    &[("lagThreshold", "05")],
    &[("allowIdleConsumers", "yes")],
    &[("offsetResetPolicy", "Earliest")],
];

/// Triggers KEDA accepts but whose every reading fails.
const FAILING: &[&[(&str, &str)]] = &[&[("partitionLimitation", "40-41")]];

/// Triggers KEDA refuses; microbatch must refuse them too.
const REFUSED: &[&[(&str, &str)]] = &[
    &[
        ("allowIdleConsumers", "true"),
        ("limitToPartitionsWithLag", "true"),
    ],
    &[("activationLagThreshold", "-1")],
    &[("lagThreshold", "0")],
    &[
        ("limitToPartitionsWithLag", "true"),
        ("ensureEvenDistributionOfPartitions", "true"),
    ],
    &[("partitionLimitation", "1,two")],
    &[("offsetResetPolicy", "smallest")],
];

/// One answer: the metric (whole records) and whether the trigger is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer {
    metric: i64,
    active: bool,
}

/// Builds `keda-diff` with Go (module and build caches are Go's own, outside
/// the repository, so later runs only link).
fn keda_diff_binary() -> Option<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keda-diff");
    let binary = Path::new(env!("CARGO_TARGET_TMPDIR")).join("keda-diff");
    if Command::new("go").arg("version").output().is_err() {
        assert!(
            !in_ci(),
            "CI=true but Go is not installed: the KEDA comparison needs it"
        );
        eprintln!("skipped: Go is not installed (the KEDA comparison builds KEDA's scaler)");
        return None;
    }
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(&source)
        .output()
        .expect("running go build");
    assert!(
        out.status.success(),
        "go build of keda-diff failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(binary)
}

/// KEDA's kafka scaler, created once for a trigger and polled on demand.
struct Keda {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Keda {
    fn start(binary: &Path, metadata: &[(String, String)]) -> Self {
        let mut child = Command::new(binary)
            .args(metadata.iter().map(|(k, v)| format!("{k}={v}")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting keda-diff");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        Keda {
            child,
            stdin,
            stdout,
        }
    }

    /// One GetMetricsAndActivity; Err is KEDA's error (a refused trigger).
    fn poll(&mut self) -> Result<Answer, String> {
        if let Some(stdin) = &mut self.stdin {
            // A refused trigger has exited already: its answer is waiting.
            let _ = writeln!(stdin, "poll").and_then(|_| stdin.flush());
        }
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading keda-diff");
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("keda-diff printed {line:?}: {e}"));
        if let Some(error) = v["error"].as_str() {
            return Err(error.to_string());
        }
        let milli = v["metric_milli"].as_i64().expect("metric_milli");
        assert_eq!(milli % 1000, 0, "a lag metric is whole records");
        Ok(Answer {
            metric: milli / 1000,
            active: v["active"].as_bool().expect("active"),
        })
    }
}

impl Drop for Keda {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `lag` flags that say what a trigger's metadata says.
fn lag_flags(trigger: &[(&str, &str)]) -> Vec<String> {
    let mut flags = vec!["--offset-reset-policy".to_string(), "latest".to_string()];
    for (key, value) in trigger {
        let flag = match *key {
            "lagThreshold" => "--lag-threshold",
            "activationLagThreshold" => "--activation-lag-threshold",
            "partitionLimitation" => "--partition-limitation",
            "offsetResetPolicy" => {
                flags[1] = value.trim().to_string();
                continue;
            }
            "allowIdleConsumers" => "--allow-idle-consumers",
            "limitToPartitionsWithLag" => "--limit-to-partitions-with-lag",
            "excludePersistentLag" => "--exclude-persistent-lag",
            "scaleToZeroOnInvalidOffset" => "--scale-to-zero-on-invalid-offset",
            "ensureEvenDistributionOfPartitions" => "--ensure-even-distribution-of-partitions",
            other => panic!("no lag flag for {other}"),
        };
        // `--flag=value`, so a negative number is not read as a flag.
        flags.push(match value.trim() {
            "true" => flag.to_string(),
            value => format!("{flag}={value}"),
        });
    }
    flags
}

/// `lag --policy keda --json --watch`: the first `polls` readings.
fn lag_polls(topic: &str, group: &str, trigger: &[(&str, &str)], polls: usize) -> Vec<Answer> {
    let mut flags = vec!["--policy".to_string(), "keda".to_string()];
    flags.extend(lag_flags(trigger));
    lag_watch_json(topic, group, &flags, polls)
        .iter()
        .map(|v| Answer {
            metric: v["policy"]["metric_value"].as_i64().expect("metric_value"),
            active: v["policy"]["active"].as_bool().expect("active"),
        })
        .collect()
}

/// One `lag --policy keda` for the trigger: its exit status and stderr.
fn lag_once(
    topic: &str,
    group: &str,
    trigger: &[(&str, &str)],
) -> (std::process::ExitStatus, String) {
    let mut args = vec!["lag", "--bootstrap-servers", broker().bootstrap()];
    args.extend(["--topic", topic, "--group", group, "--policy", "keda"]);
    let flags = lag_flags(trigger);
    args.extend(flags.iter().map(String::as_str));
    let (status, _, err) = run_to_end(&args);
    (status, err)
}

/// The trigger's metadata as KEDA and our scaler get it (no topic: the
/// group's topics).
fn metadata(topic: Option<&str>, group: &str, trigger: &[(&str, &str)]) -> Vec<(String, String)> {
    let topic = topic.map(|t| ("topic", t));
    [
        ("consumerGroup", group),
        ("bootstrapServers", broker().bootstrap()),
    ]
    .into_iter()
    .chain(topic)
    .chain(trigger.iter().copied())
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn scaled_object(name: String, metadata: &[(String, String)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name,
        namespace: "keda-parity".into(),
        scaler_metadata: metadata.iter().cloned().collect::<HashMap<_, _>>(),
    }
}

/// One poll of `microbatch scaler`, as KEDA makes it: GetMetrics, then IsActive.
async fn scaler_poll(
    client: &mut ExternalScalerClient<Channel>,
    object: &ScaledObjectRef,
) -> Result<Answer, tonic::Status> {
    let metrics = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object.clone()),
            metric_name: String::new(),
        })
        .await?
        .into_inner();
    let active = client.is_active(object.clone()).await?.into_inner().result;
    Ok(Answer {
        metric: metrics.metric_values[0].metric_value,
        active,
    })
}

/// One poll of KEDA's scaler and of ours on the same trigger.
fn poll_both(
    runtime: &tokio::runtime::Runtime,
    client: &mut ExternalScalerClient<Channel>,
    keda: &mut Keda,
    object: &ScaledObjectRef,
) -> (Answer, Answer) {
    let name = &object.name;
    let k = keda
        .poll()
        .unwrap_or_else(|e| panic!("KEDA refused {name}: {e}"));
    let s = runtime
        .block_on(scaler_poll(client, object))
        .unwrap_or_else(|e| panic!("the scaler refused {name}: {e}"));
    (k, s)
}

/// A new topic with `records` per partition, records deleted before the
/// offsets in `deleted`, and the group's commits placed at `committed`.
fn engineer(
    prefix: &str,
    group: &str,
    records: &[i64],
    deleted: &[(i32, i64)],
    committed: &[(i32, i64)],
) -> String {
    let topic = unique(prefix);
    create_topic(&topic, records.len() as i32);
    let records: Vec<(i32, i64, Option<i64>)> = records
        .iter()
        .enumerate()
        .map(|(p, n)| (p as i32, *n, None))
        .collect();
    produce_records(&topic, &records);
    if !deleted.is_empty() {
        delete_records_before(&topic, deleted);
    }
    alter_group_offsets(group, &topic, committed);
    topic
}

#[test]
fn keda_policy_matches_kedas_own_kafka_scaler() {
    if !broker().is_real() {
        eprintln!("skipped: the KEDA comparison needs a real broker (admin APIs)");
        return;
    }
    let Some(keda_diff) = keda_diff_binary() else {
        return;
    };
    let dir = TestDir::new("keda-parity");
    let group = unique("13-keda-g");
    let committed: Vec<(i32, i64)> = COMMITTED
        .iter()
        .enumerate()
        .filter_map(|(p, c)| c.map(|c| (p as i32, c)))
        .collect();
    let topic = engineer("13-keda", &group, &RECORDS, &DELETED_BEFORE, &committed);
    engineer(
        "13-keda-other",
        &group,
        &OTHER_RECORDS,
        &[],
        &OTHER_COMMITTED,
    );

    // The scaler's own bootstrap servers lead nowhere: the triggers'
    // bootstrapServers must be what it reads.
    let grpc = free_port();
    let mut cmd = command();
    cmd.args(["scaler", "--bootstrap-servers", "127.0.0.1:9"])
        .args(["--host", "127.0.0.1", "--http-port", "0"])
        .args(["--grpc-port", &grpc.to_string()])
        // Every poll of this test is a reading of its own, as KEDA's
        // kafka scaler makes one per call (no evaluation reused).
        .args(["--polling-interval-ms", "0"]);
    let _scaler = Proc::spawn(cmd, dir.path("scaler.stderr"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut client = runtime.block_on(async {
        let endpoint = format!("http://127.0.0.1:{grpc}");
        for _ in 0..100 {
            if let Ok(client) = ExternalScalerClient::connect(endpoint.clone()).await {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the scaler did not come up on {endpoint}");
    });

    let mut report = Vec::new();
    let mut mismatches = Vec::new();
    let mut check = |what: String, keda: Answer, ours: Answer| {
        let line = format!("{what}: KEDA {keda:?}, microbatch {ours:?}");
        if keda != ours {
            mismatches.push(line.clone());
        }
        report.push(line);
    };

    // Two polls of the same state (lag that persists), then one after
    // partition 0's commit moved on.
    let mut kedas = Vec::new();
    let mut objects = Vec::new();
    for (i, trigger) in TRIGGERS.iter().enumerate() {
        let meta = metadata(Some(&topic), &group, trigger);
        let mut keda = Keda::start(&keda_diff, &meta);
        let object = scaled_object(format!("trigger-{i}"), &meta);
        let lag = lag_polls(&topic, &group, trigger, 2);
        for (poll, lag) in lag.into_iter().enumerate() {
            let (k, s) = poll_both(&runtime, &mut client, &mut keda, &object);
            check(format!("{trigger:?} poll {} lag", poll + 1), k, lag);
            check(format!("{trigger:?} poll {} scaler", poll + 1), k, s);
        }
        kedas.push(keda);
        objects.push(object);
    }
    let mut group_wide = Vec::new();
    for (i, trigger) in GROUP_WIDE.iter().enumerate() {
        let meta = metadata(None, &group, trigger);
        let mut keda = Keda::start(&keda_diff, &meta);
        let object = scaled_object(format!("group-wide-{i}"), &meta);
        for poll in 1..=2 {
            let (k, s) = poll_both(&runtime, &mut client, &mut keda, &object);
            check(format!("no topic {trigger:?} poll {poll} scaler"), k, s);
        }
        group_wide.push((trigger, keda, object));
    }
    alter_group_offsets(&group, &topic, &[(0, 10)]);
    for (trigger, keda, object) in &mut group_wide {
        let (k, s) = poll_both(&runtime, &mut client, keda, object);
        check(
            format!("no topic {trigger:?} poll 3 (commit moved) scaler"),
            k,
            s,
        );
    }
    for ((trigger, keda), object) in TRIGGERS.iter().zip(&mut kedas).zip(&objects) {
        let (k, s) = poll_both(&runtime, &mut client, keda, object);
        check(format!("{trigger:?} poll 3 (commit moved) scaler"), k, s);
        // A fresh reader on the new state: no history on either side.
        let mut fresh = Keda::start(&keda_diff, &metadata(Some(&topic), &group, trigger));
        let k = fresh.poll().expect("KEDA answers");
        let lag = lag_polls(&topic, &group, trigger, 1)[0];
        check(format!("{trigger:?} after the move, fresh lag"), k, lag);
    }

    for (i, trigger) in FAILING.iter().enumerate() {
        let meta = metadata(Some(&topic), &group, trigger);
        let keda = Keda::start(&keda_diff, &meta).poll();
        assert!(keda.is_err(), "KEDA reads {trigger:?}: {keda:?}");
        let (status, err) = lag_once(&topic, &group, trigger);
        assert_eq!(status.code(), Some(1), "lag reads {trigger:?}: {err}");
        let object = scaled_object(format!("failing-{i}"), &meta);
        let status = runtime
            .block_on(scaler_poll(&mut client, &object))
            .err()
            .unwrap_or_else(|| panic!("the scaler reads {trigger:?}"));
        report.push(format!(
            "{trigger:?}: fails in KEDA ({}), lag ({}) and the scaler ({})",
            keda.unwrap_err(),
            err.trim(),
            status.message()
        ));
    }
    for (i, trigger) in REFUSED_SPELLINGS.iter().enumerate() {
        let meta = metadata(Some(&topic), &group, trigger);
        let keda = Keda::start(&keda_diff, &meta).poll();
        assert!(keda.is_err(), "KEDA accepts {trigger:?}: {keda:?}");
        let object = scaled_object(format!("refused-spelling-{i}"), &meta);
        let status = runtime
            .block_on(scaler_poll(&mut client, &object))
            .err()
            .unwrap_or_else(|| panic!("the scaler accepts {trigger:?}"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{trigger:?}");
    }
    for (i, trigger) in REFUSED.iter().enumerate() {
        let meta = metadata(Some(&topic), &group, trigger);
        let keda = Keda::start(&keda_diff, &meta).poll();
        assert!(keda.is_err(), "KEDA accepts {trigger:?}: {keda:?}");
        let (status, err) = lag_once(&topic, &group, trigger);
        assert_eq!(status.code(), Some(2), "lag accepts {trigger:?}: {err}");
        let object = scaled_object(format!("refused-{i}"), &meta);
        let status = runtime
            .block_on(scaler_poll(&mut client, &object))
            .expect_err("the scaler refuses it");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{trigger:?}");
        report.push(format!(
            "{trigger:?}: refused by KEDA ({}), lag ({}) and the scaler ({})",
            keda.unwrap_err(),
            err.trim(),
            status.message()
        ));
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        mismatches.is_empty(),
        "microbatch differs from KEDA v2.21.0:\n{}",
        mismatches.join("\n")
    );
}
