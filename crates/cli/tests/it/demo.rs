//! `microbatch demo --quick`: the main job, on the embedded broker and on real
//! Kafka, with its report checked and its HTML rendered in headless Chromium.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

/// Runs `microbatch demo` in `dir` with `args`, asserts it succeeded and
/// returns its standard output.
fn run_demo(dir: &TestDir, args: &[&str]) -> String {
    let out = command()
        .current_dir(&dir.0)
        .arg("demo")
        .args(args)
        .output()
        .expect("running the demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn check_report(json: &Path) -> serde_json::Value {
    let report: serde_json::Value =
        serde_json::from_str(&read(json)).expect("the JSON report parses");
    assert_eq!(report["lost"], 0, "lost must be 0");
    for run in report["runs"].as_array().expect("runs") {
        let produced = run["produced"].as_u64().unwrap();
        assert!(produced > 0, "the demo produced records");
        assert!(
            run["processed"].as_u64().unwrap() >= produced,
            "processed >= produced: {run}"
        );
        assert_eq!(run["lost"], 0);
        assert_eq!(
            run["replicas_rose_during_burst"], true,
            "replicas rose during the burst"
        );
        assert_eq!(
            run["replicas_fell_back_when_idle"], true,
            "replicas fell back when idle"
        );
        assert!(
            run["dead_lettered"].as_u64().unwrap() > 0,
            "poison records reached the DLQ"
        );
        let timeline = run["timeline"].as_array().unwrap();
        let peak = timeline
            .iter()
            .map(|s| s["replicas"].as_u64().unwrap())
            .max()
            .unwrap();
        assert!(peak > 1, "replicas went above the minimum");
        for s in run["scenarios"].as_array().unwrap() {
            assert_eq!(s["passed"], true, "scenario failed: {s}");
        }
    }
    report
}

fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// Renders the report in headless Chromium: the screenshot is written and the
/// rendered DOM holds charts with data points.
fn check_html_renders(dir: &TestDir, html: &Path) {
    let Some(chrome) = chromium() else {
        assert!(
            !in_ci(),
            "CI must have Chromium (Debian package chromium) to render the report"
        );
        eprintln!("skipped rendering: no chromium installed");
        return;
    };
    let url = format!("file://{}", html.display());
    let flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ];
    let profile = format!("--user-data-dir={}", dir.path("chrome-profile").display());
    let shot = dir.path("report.png");
    let out = Command::new(chrome)
        .args(flags)
        .arg(&profile)
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=900,2400")
        .arg(&url)
        .output()
        .expect("running chromium");
    assert!(
        out.status.success(),
        "chromium screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot ({} bytes)",
        png.len()
    );
    let out = Command::new(chrome)
        .args(flags)
        .arg(&profile)
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("running chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    let charts = dom.matches("<svg class=\"chart\"").count();
    assert!(charts >= 3, "the rendered page has the charts ({charts})");
    let most_points = dom
        .split("points=\"")
        .skip(1)
        .map(|s| {
            s.split('"')
                .next()
                .unwrap_or("")
                .split(' ')
                .filter(|p| p.contains(','))
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        most_points >= 10,
        "a chart line has data points ({most_points})"
    );
}

#[test]
fn demo_quick_on_the_embedded_broker() {
    let dir = TestDir::new("demo-embedded");
    let (json, html) = (dir.path("report.json"), dir.path("report.html"));
    let stdout = run_demo(
        &dir,
        &[
            "--quick",
            "--report-json",
            json.to_str().unwrap(),
            "--report-html",
            html.to_str().unwrap(),
        ],
    );
    assert!(stdout.contains("lost = 0"), "{stdout}");
    assert!(
        stdout.contains(html.to_str().unwrap()),
        "the report path is printed"
    );
    let report = check_report(&json);
    assert!(report["broker"].as_str().unwrap().starts_with("embedded"));
    // KIP-848 on the embedded broker: a scale step moves partitions at
    // the next heartbeat, with no classic rebalance round of seconds.
    assert_eq!(report["group_protocol"], "consumer");
    check_outage(&report);
    check_html_renders(&dir, &html);
    assert!(
        read(&html).contains("class=\"outage\""),
        "the outage is shaded on the charts"
    );
}

/// The outage scenario, from the report's samples: the downstream was down
/// for a while, `rate` added no replica meanwhile, and the backlog it left
/// drained (the scenario passed, which `check_report` asserts).
fn check_outage(report: &serde_json::Value) {
    for run in report["runs"].as_array().unwrap() {
        let down: Vec<&serde_json::Value> = run["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["scenario"] == "outage" && s["downstream_down"] == true)
            .collect();
        assert!(
            down.len() >= 4,
            "the downstream was down for several samples: {}",
            down.len()
        );
        let at_start = down[0]["replicas"].as_u64().unwrap();
        let most = down
            .iter()
            .map(|s| s["replicas"].as_u64().unwrap())
            .max()
            .unwrap();
        assert!(
            run["policy"] != "rate" || most <= at_start,
            "rate added replicas during the outage: {at_start} -> {most}"
        );
        let lag = |s: &serde_json::Value| s["total_lag"].as_i64().unwrap();
        assert!(
            lag(down[down.len() - 1]) > lag(down[0]),
            "records waited while the downstream was down"
        );
    }
}

#[test]
fn demo_quick_on_real_kafka() {
    if !broker().is_real() {
        eprintln!("skipped: the demo's external-broker path needs a real broker");
        return;
    }
    let dir = TestDir::new("demo-real");
    let json = dir.path("report.json");
    run_demo(
        &dir,
        &[
            "--quick",
            "--bootstrap-servers",
            broker().bootstrap(),
            "--report-json",
            json.to_str().unwrap(),
            "--report-html",
            dir.path("report.html").to_str().unwrap(),
        ],
    );
    check_report(&json);
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// Ctrl-C (SIGINT) during the demo leaves no worker process behind. The
/// burst is five times `--quick`'s: since the embedded broker's groups run
/// KIP-848, one worker could drain the quick one before a second started.
#[test]
fn ctrl_c_leaves_no_child_behind() {
    let dir = TestDir::new("demo-ctrl-c");
    let mut cmd = command();
    cmd.current_dir(&dir.0).args([
        "demo",
        "--quick",
        "--scenario",
        "fanout",
        "--burst",
        "20000",
    ]);
    let mut demo = Proc::spawn(cmd, dir.path("demo.stderr"));
    let mut workers = Vec::new();
    wait_until(Duration::from_secs(60), "workers to start", || {
        workers = children_of(demo.pid() as u32);
        workers.len() >= 2
    });
    demo.signal(2);
    let status = demo
        .wait_for_exit(Duration::from_secs(60))
        .expect("the demo exits after Ctrl-C");
    assert_eq!(status.code(), Some(130), "{}", demo.stderr());
    wait_until(Duration::from_secs(30), "every worker to be gone", || {
        workers.iter().all(|p| !alive(*p))
    });
}

/// The seed's story in the demo: a burst on 8 partitions with workers of
/// about 80 records/s. In a share group the supervisor takes them past the
/// 8 partitions and every worker does a share; the same burst on a
/// consumer group stops at 8. Nothing is lost in either.
#[test]
fn demo_share_group_scales_past_the_partitions() {
    if crate::share::real_broker().is_none() {
        return;
    }
    let dir = TestDir::new("demo-share");
    let json = dir.path("report.json");
    let html = dir.path("report.html");
    let stdout = run_demo(
        &dir,
        &[
            "--quick",
            "--share-group",
            "--scenario",
            "fanout",
            "--bootstrap-servers",
            broker().bootstrap(),
            "--burst",
            "12000",
            "--process-time-ms",
            "50",
            "--max-replicas",
            "24",
            "--report-json",
            json.to_str().unwrap(),
            "--report-html",
            html.to_str().unwrap(),
        ],
    );
    eprintln!("{stdout}");
    let report: serde_json::Value = serde_json::from_str(&read(&json)).unwrap();
    assert_eq!(report["lost"], 0);
    let runs = report["runs"].as_array().unwrap();
    let kinds: Vec<&str> = runs
        .iter()
        .map(|r| r["group_kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["share", "consumer"]);
    let (share, consumer) = (&runs[0], &runs[1]);
    let peak = |r: &serde_json::Value| r["peak_replicas"].as_u64().unwrap();
    assert!(peak(share) > 8, "the share group passed 8: {}", peak(share));
    assert!(
        peak(consumer) <= 8,
        "the consumer group stops at its partitions"
    );
    let working = share["records_per_worker"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n.as_u64().unwrap() > 0)
        .count();
    assert!(
        working > 8,
        "more workers than partitions did work: {share}"
    );
    for r in runs {
        assert_eq!(r["lost"], 0, "{r}");
        assert_eq!(r["scenarios"][0]["passed"], true, "{}", r["scenarios"][0]);
    }
    // It leaves nothing behind on the broker it was given, as Kafka's own
    // tools list it: its topics, both groups, the reports' companion group.
    let stamp = runs[0]["topic"]
        .as_str()
        .unwrap()
        .rsplit_once('-')
        .unwrap()
        .0;
    for (tool, what) in [
        ("topics", "topic"),
        ("share-groups", "share group"),
        ("consumer-groups", "consumer group"),
    ] {
        let listed = kafka_tool_list(tool);
        let left: Vec<&str> = listed.lines().filter(|l| l.contains(stamp)).collect();
        assert!(left.is_empty(), "the demo left a {what} behind: {left:?}");
    }
}

/// What `kafka-<tool>.sh --list` lists on the test broker.
fn kafka_tool_list(tool: &str) -> String {
    let out = Command::new(scripts_dir().join("kafka-local.sh"))
        .args([
            "tool",
            tool,
            "--bootstrap-server",
            broker().bootstrap(),
            "--list",
        ])
        .output()
        .expect("running Kafka's tool");
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The embedded broker has no share groups: said, with how to get one.
#[test]
fn demo_share_group_on_the_embedded_broker_says_what_to_start() {
    let dir = TestDir::new("demo-share-embedded");
    let out = command()
        .current_dir(&dir.0)
        .args(["demo", "--quick", "--share-group"])
        .output()
        .expect("running the demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--share-group") && stderr.contains("scripts/kafka-local.sh start"),
        "{stderr}"
    );
}
