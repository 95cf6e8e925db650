//! `microbatch demo --quick`: the main job, on the embedded broker and on real
//! Kafka, with its report checked and its HTML rendered in headless Chromium.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

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
    let out = command()
        .current_dir(&dir.0)
        .args([
            "demo",
            "--quick",
            "--report-json",
            json.to_str().unwrap(),
            "--report-html",
            html.to_str().unwrap(),
        ])
        .output()
        .expect("running the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("lost = 0"), "{stdout}");
    assert!(
        stdout.contains(html.to_str().unwrap()),
        "the report path is printed"
    );
    let report = check_report(&json);
    assert!(report["broker"].as_str().unwrap().starts_with("embedded"));
    check_html_renders(&dir, &html);
}

#[test]
fn demo_quick_on_real_kafka() {
    if !broker().is_real() {
        eprintln!("skipped: the demo's external-broker path needs a real broker");
        return;
    }
    let dir = TestDir::new("demo-real");
    let json = dir.path("report.json");
    let out = command()
        .current_dir(&dir.0)
        .args([
            "demo",
            "--quick",
            "--bootstrap-servers",
            broker().bootstrap(),
            "--report-json",
            json.to_str().unwrap(),
        ])
        .args(["--report-html", dir.path("report.html").to_str().unwrap()])
        .output()
        .expect("running the demo");
    assert!(
        out.status.success(),
        "demo failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
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

/// Ctrl-C (SIGINT) during the demo leaves no worker process behind.
#[test]
fn ctrl_c_leaves_no_child_behind() {
    let dir = TestDir::new("demo-ctrl-c");
    let mut cmd = command();
    cmd.current_dir(&dir.0)
        .args(["demo", "--quick", "--scenario", "fanout"]);
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
