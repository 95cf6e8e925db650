//! `microbatch top` in a real terminal (tmux), and its plain-line mode.

use std::process::Command;
use std::time::Duration;

use crate::harness::*;

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("running tmux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn top_draws_lag_per_partition_in_a_terminal_and_quits_on_q() {
    if Command::new("tmux").arg("-V").output().is_err() {
        assert!(!in_ci(), "CI must have tmux");
        eprintln!("skipped: no tmux");
        return;
    }
    let sc = Scenario::new("top", 4);
    let Scenario { topic, group, .. } = &sc;
    sc.produce(300, &["--partitions", "0,1,2"]);
    let session = unique("mbtop");
    let cmdline = format!(
        "{BIN} top --bootstrap-servers {} --topic {topic} --group {group} --interval-ms 300",
        broker().bootstrap()
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "100",
        "-y",
        "32",
        &cmdline,
    ]);
    let mut screen = String::new();
    wait_until(Duration::from_secs(30), "the dashboard to draw", || {
        screen = tmux(&["capture-pane", "-p", "-t", &session]);
        screen.contains("total lag 300")
    });
    assert!(screen.contains(&format!("topic {topic}")), "{screen}");
    assert!(screen.contains("lag per partition"), "{screen}");
    for p in ["p0", "p1", "p2", "p3"] {
        assert!(screen.contains(p), "{p} is drawn: {screen}");
    }
    assert!(
        screen.contains("100"),
        "per-partition values are shown: {screen}"
    );
    tmux(&["send-keys", "-t", &session, "q"]);
    wait_until(Duration::from_secs(10), "top to quit on q", || {
        !Command::new("tmux")
            .args(["has-session", "-t", &session])
            .status()
            .unwrap()
            .success()
    });
}

#[test]
fn top_prints_plain_lines_when_not_a_terminal() {
    let sc = Scenario::new("top-plain", 2);
    let Scenario { dir, topic, group } = &sc;
    sc.produce(50, &["--partitions", "1"]);
    let mut cmd = command();
    cmd.args([
        "top",
        "--bootstrap-servers",
        broker().bootstrap(),
        "--topic",
        topic,
        "--group",
        group,
    ]);
    cmd.args(["--interval-ms", "200"]);
    let out_path = dir.path("out.txt");
    cmd.stdout(std::fs::File::create(&out_path).unwrap());
    let mut child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    wait_until(Duration::from_secs(30), "two lines", || {
        read(&out_path).lines().count() >= 2
    });
    unsafe {
        libc::kill(child.id() as i32, 2);
    }
    let status = child.wait().unwrap();
    assert!(status.success());
    let first = read(&out_path).lines().next().unwrap().to_string();
    assert!(first.starts_with("total_lag=50 "), "{first}");
    assert!(first.contains("p0=0/0.0s p1=50/"), "{first}");
    // Lag in seconds: the 50 records were produced moments ago.
    let age: f64 = first
        .split("p1=50/")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("p1's lag seconds in {first}"));
    assert!((0.0..60.0).contains(&age), "{first}");
}
