//! The demo's report: the numbers that prove the run (JSON) and a
//! self-contained HTML page with inline SVG charts (no network to view it).

use std::fmt::Write as _;

use serde::Serialize;

/// One timeline sample, tagged with the scenario running at the time.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_ms: u64,
    pub scenario: String,
    pub total_lag: i64,
    pub replicas: u32,
    pub desired: u32,
    pub processed_per_sec: f64,
    /// Records done so far over the topic's partitions (each partition's
    /// high watermark less its lag): its steps are the throughput.
    pub done: i64,
    pub dead_lettered: i64,
    pub partition_lag: Vec<i64>,
    /// The outage scenario had the handler's downstream down.
    pub downstream_down: bool,
}

/// What one scenario did.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub produced: u64,
    /// Seconds from the burst's first record to lag 0 (None: no burst, or not drained).
    pub drain_seconds: Option<f64>,
    /// The longest plateau: time a partition's lag stayed above 0 without
    /// moving (nothing of it committed), between samples.
    pub longest_stall_seconds: f64,
    /// Why that plateau lasted, when the scenario explains it.
    pub stall_cause: String,
    pub peak_replicas: u32,
    pub replicas_at_end: u32,
    pub workers_killed: u32,
    pub passed: bool,
    pub note: String,
}

/// One policy's whole run.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRun {
    pub policy: String,
    /// "consumer" or "share": the kind of group the workers joined.
    pub group_kind: String,
    pub topic: String,
    pub group: String,
    /// Records each worker handled, most first: with a share group, more
    /// workers than partitions each doing a share.
    pub records_per_worker: Vec<u64>,
    pub produced: u64,
    /// Distinct records finished: handled successfully or dead-lettered.
    pub processed: u64,
    pub succeeded: u64,
    pub dead_lettered: u64,
    /// Records handled more than once (at-least-once redeliveries).
    pub duplicates: u64,
    /// Records neither processed nor dead-lettered. Must be 0.
    pub lost: u64,
    pub peak_replicas: u32,
    pub replica_seconds: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub replicas_rose_during_burst: bool,
    pub replicas_fell_back_when_idle: bool,
    pub scenarios: Vec<ScenarioResult>,
    pub timeline: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub broker: String,
    /// The consumer groups' protocol (`classic` or `consumer`).
    pub group_protocol: String,
    pub quick: bool,
    pub lost: u64,
    pub runs: Vec<PolicyRun>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A named, coloured series of (seconds, value) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// A line chart: one or more series over time, phase boundaries marked.
/// The y axis's ticks for values up to `max`: 0 and four more at round
/// steps (1, 2 or 5 × a power of ten), whole numbers when the values are
/// counts (replicas: 1, 2, 3, never 1.1, 2.2, 3.3). The last tick is the
/// axis's top, at or above `max`.
fn y_ticks(max: f64, whole: bool) -> Vec<f64> {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let rough = max / 4.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    let mut step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * magnitude);
    if whole {
        step = step.ceil().max(1.0);
    }
    if !step.is_normal() {
        return vec![0.0, max];
    }
    let n = ((max / step).ceil().max(1.0) as usize).min(10);
    // Rounded to the step's precision: 0.6, not 0.6000000000000001.
    let digits = (-step.log10().floor()).max(0.0) as i32;
    let scale = 10f64.powi(digits);
    (0..=n)
        .map(|i| (i as f64 * step * scale).round() / scale)
        .collect()
}

/// A tick's label: no decimals on whole numbers.
fn tick_label(y: f64) -> String {
    if (y - y.round()).abs() < 1e-9 {
        format!("{y:.0}")
    } else {
        format!("{y}")
    }
}

/// What every chart of a run marks: where each scenario began, and the
/// spans (seconds) the downstream was down.
#[derive(Default)]
struct Marks {
    phases: Vec<(f64, String)>,
    outages: Vec<(f64, f64)>,
}

impl Marks {
    fn of(timeline: &[Sample]) -> Self {
        let secs = |t: u64| t as f64 / 1000.0;
        let mut marks = Self::default();
        let mut last = "";
        let mut down_since = None;
        for s in timeline {
            if s.scenario != last {
                marks.phases.push((secs(s.t_ms), s.scenario.clone()));
                last = &s.scenario;
            }
            match (down_since, s.downstream_down) {
                (None, true) => down_since = Some(secs(s.t_ms)),
                (Some(from), false) => {
                    marks.outages.push((from, secs(s.t_ms)));
                    down_since = None;
                }
                _ => {}
            }
        }
        if let (Some(from), Some(end)) = (down_since, timeline.last()) {
            marks.outages.push((from, secs(end.t_ms)));
        }
        marks
    }
}

#[cfg(test)]
fn chart(title: &str, unit: &str, series: &[Series<'_>], phases: &[(f64, String)]) -> String {
    let marks = Marks {
        phases: phases.to_vec(),
        outages: Vec::new(),
    };
    chart_with(title, unit, series, &marks, false)
}

fn chart_with(
    title: &str,
    unit: &str,
    series: &[Series<'_>],
    marks: &Marks,
    whole: bool,
) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 220.0, 60.0, 20.0, 28.0, 30.0);
    let max_x = series
        .iter()
        .flat_map(|(_, _, pts)| pts.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let ticks = y_ticks(
        series
            .iter()
            .flat_map(|(_, _, pts)| pts.iter().map(|p| p.1))
            .fold(0.0f64, f64::max),
        whole,
    );
    let max_y = *ticks.last().expect("at least two ticks");
    let sx = |x: f64| left + x / max_x * (w - left - right);
    let sy = |y: f64| h - bottom - y / max_y * (h - top - bottom);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{t}">"#,
        t = esc(title)
    );
    let _ = write!(
        svg,
        r##"<text x="{left}" y="18" font-size="14" font-weight="bold">{} <tspan font-weight="normal" font-size="11">({})</tspan></text>"##,
        esc(title),
        esc(unit)
    );
    for &y in &ticks {
        let _ = write!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
            w - right,
            left - 4.0,
            sy(y) + 3.0,
            tick_label(y),
            py = sy(y)
        );
    }
    for (from, to) in &marks.outages {
        let _ = write!(
            svg,
            r##"<rect class="outage" x="{:.1}" y="{top}" width="{:.1}" height="{}" fill="#c0392b" fill-opacity="0.12"/><text x="{:.1}" y="{}" font-size="10" fill="#c0392b">downstream down</text>"##,
            sx(*from),
            (sx(*to) - sx(*from)).max(1.0),
            h - top - bottom,
            sx(*from) + 3.0,
            top + 22.0,
        );
    }
    for (x, name) in &marks.phases {
        let _ = write!(
            svg,
            r##"<line x1="{px:.1}" x2="{px:.1}" y1="{top}" y2="{}" stroke="#999" stroke-dasharray="3,3"/><text x="{:.1}" y="{}" font-size="10" fill="#555">{}</text>"##,
            h - bottom,
            sx(*x) + 3.0,
            top + 10.0,
            esc(name),
            px = sx(*x)
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" font-size="10" text-anchor="end">{max_x:.0} s</text>"##,
        w - right,
        h - 8.0,
    );
    for (i, (name, color, pts)) in series.iter().enumerate() {
        let points: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = write!(
            svg,
            r##"<polyline class="series" data-name="{}" fill="none" stroke="{color}" stroke-width="2" points="{}"/>"##,
            esc(name),
            points.join(" ")
        );
        let lx = left + 10.0 + 140.0 * i as f64;
        let _ = write!(
            svg,
            r##"<rect x="{lx}" y="{}" width="10" height="3" fill="{color}"/><text x="{}" y="{}" font-size="10">{}</text>"##,
            h - 12.0,
            lx + 14.0,
            h - 8.0,
            esc(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn run_section(run: &PolicyRun) -> String {
    let secs = |t: u64| t as f64 / 1000.0;
    let lag: Vec<(f64, f64)> = run
        .timeline
        .iter()
        .map(|s| (secs(s.t_ms), s.total_lag as f64))
        .collect();
    let replicas: Vec<(f64, f64)> = run
        .timeline
        .iter()
        .map(|s| (secs(s.t_ms), f64::from(s.replicas)))
        .collect();
    let desired: Vec<(f64, f64)> = run
        .timeline
        .iter()
        .map(|s| (secs(s.t_ms), f64::from(s.desired)))
        .collect();
    let rate = per_interval_throughput(&run.timeline);
    let marks = Marks::of(&run.timeline);
    let mut html = String::new();
    let _ = write!(
        html,
        "<section><h2>policy <code>{}</code>, {} group</h2><table><tr><th>produced</th><th>processed</th><th>dead-lettered</th><th>duplicates</th><th>lost</th><th>peak replicas</th><th>replica-seconds</th></tr><tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{:.0}</td></tr></table>",
        esc(&run.policy),
        esc(&run.group_kind),
        run.produced,
        run.processed,
        run.dead_lettered,
        run.duplicates,
        if run.lost == 0 { "ok" } else { "bad" },
        run.lost,
        run.peak_replicas,
        run.replica_seconds
    );
    let _ = write!(
        html,
        "<p>Records per worker ({} workers): {}</p>",
        run.records_per_worker.len(),
        run.records_per_worker
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    html.push_str("<table><tr><th>scenario</th><th>produced</th><th>time to drain</th><th>longest stall</th><th>peak replicas</th><th>replicas at end</th><th>result</th></tr>");
    for s in &run.scenarios {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1} s{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
            esc(&s.name),
            s.produced,
            s.drain_seconds.map(|d| format!("{d:.1} s")).unwrap_or_else(|| "-".into()),
            s.longest_stall_seconds,
            if s.stall_cause.is_empty() {
                String::new()
            } else {
                format!(" ({})", esc(&s.stall_cause))
            },
            s.peak_replicas,
            s.replicas_at_end,
            if s.passed { "ok" } else { "bad" },
            esc(&s.note)
        );
    }
    html.push_str("</table>");
    html.push_str(&chart_with(
        "Total lag",
        "records",
        &[("lag", "#c0392b", lag)],
        &marks,
        false,
    ));
    html.push_str(&chart_with(
        "Replicas",
        "workers",
        &[
            ("running", "#2471a3", replicas),
            ("desired", "#f39c12", desired),
        ],
        &marks,
        true,
    ));
    html.push_str(&chart_with(
        "Throughput",
        "records/s",
        &[("done/s in each interval", "#27ae60", rate)],
        &marks,
        false,
    ));
    html.push_str("</section>");
    html
}

/// Records done per second within each sample interval (the records done
/// between two samples over the time between them), so the line falls to
/// 0 the moment the work stops, where a smoothed rate trails off.
fn per_interval_throughput(timeline: &[Sample]) -> Vec<(f64, f64)> {
    // Against the most done so far: a dip (records released back to a
    // share group, a partition missing from one answer) is not counted
    // again when it comes back.
    let mut most = timeline.first().map_or(0, |s| s.done);
    let mut previous_t = timeline.first().map_or(0, |s| s.t_ms);
    let mut out = Vec::new();
    for s in timeline.iter().skip(1) {
        let dt = s.t_ms.saturating_sub(previous_t) as f64 / 1000.0;
        if dt <= 0.0 {
            continue;
        }
        let done = (s.done - most).max(0) as f64;
        most = most.max(s.done);
        previous_t = s.t_ms;
        out.push((s.t_ms as f64 / 1000.0, done / dt));
    }
    out
}

/// The whole report as one HTML file.
pub fn html(report: &Report) -> String {
    let mut body = String::new();
    for run in &report.runs {
        body.push_str(&run_section(run));
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>microbatch demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 820px; }}
table {{ border-collapse: collapse; margin: 0.8em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f4f4f4; }}
.ok {{ color: #1e8449; font-weight: bold; }} .bad {{ color: #c0392b; font-weight: bold; }}
svg.chart {{ display: block; margin: 0.8em 0; border: 1px solid #eee; }}
</style></head>
<body>
<h1>microbatch demo</h1>
<p>Broker: {broker}; consumer groups on the {protocol} protocol. Lost records across all runs: <span class="{lost_class}">{lost}</span>.</p>
{body}
</body></html>
"#,
        broker = esc(&report.broker),
        protocol = esc(&report.group_protocol),
        lost_class = if report.lost == 0 { "ok" } else { "bad" },
        lost = report.lost,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_have_points_and_escape_text() {
        let svg = chart(
            "a<b",
            "x",
            &[("s", "#000", vec![(0.0, 1.0), (1.0, 2.0), (2.0, 0.0)])],
            &[(0.0, "fanout".into())],
        );
        assert!(svg.contains("a&lt;b"));
        let points = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(points.split(' ').count(), 3);
    }

    /// Found in use: the replicas axis read 1.1, 2.2, 3.3.
    #[test]
    fn count_axes_tick_at_whole_numbers() {
        assert_eq!(y_ticks(3.0, true), [0.0, 1.0, 2.0, 3.0]);
        assert_eq!(y_ticks(6.0, true), [0.0, 2.0, 4.0, 6.0]);
        assert_eq!(y_ticks(24.0, true), [0.0, 10.0, 20.0, 30.0]);
        assert_eq!(y_ticks(0.0, true), [0.0, 1.0]);
        for max in [1.0, 2.0, 7.0, 13.0, 99.0, 1234.0] {
            let t = y_ticks(max, true);
            assert!(t.iter().all(|y| y.fract() == 0.0), "{max}: {t:?}");
            assert!(*t.last().unwrap() >= max && t.len() <= 7, "{max}: {t:?}");
        }
        let t = y_ticks(0.3, false);
        assert!(*t.last().unwrap() >= 0.3 && t.len() <= 7, "{t:?}");
        assert_eq!(y_ticks(0.7, false), [0.0, 0.2, 0.4, 0.6, 0.8]);
        assert_eq!(tick_label(0.6), "0.6");
        assert!(y_ticks(1e-320, false).len() <= 11);
        assert!(y_ticks(f64::MAX, true).len() <= 11);
        let svg = chart_with(
            "r",
            "workers",
            &[("s", "#000", vec![(0.0, 1.0), (1.0, 3.0)])],
            &Marks::default(),
            true,
        );
        assert!(!svg.contains(">1.1<") && svg.contains(">3<"), "{svg}");
    }

    /// Found in use: a smoothed rate kept falling through the idle
    /// scenario long after the lag reached 0.
    #[test]
    fn throughput_is_per_interval_and_stops_with_the_work() {
        let at = |t_ms, done| Sample {
            t_ms,
            scenario: "s".into(),
            total_lag: 0,
            replicas: 1,
            desired: 1,
            processed_per_sec: 0.0,
            done,
            dead_lettered: 0,
            partition_lag: vec![0],
            downstream_down: false,
        };
        let t = per_interval_throughput(&[at(0, 0), at(500, 400), at(1000, 1000), at(1500, 1000)]);
        assert_eq!(t, [(0.5, 800.0), (1.0, 1200.0), (1.5, 0.0)]);
        // A dip and its return are not work done twice.
        let t = per_interval_throughput(&[at(0, 100), at(1000, 50), at(2000, 100), at(3000, 300)]);
        assert_eq!(t, [(1.0, 0.0), (2.0, 0.0), (3.0, 200.0)]);
    }

    /// The outage scenario's down time is shaded on every chart, from the
    /// first sample that saw it down to the first that saw it back (or the
    /// end), and a plateau within it is put down to it.
    #[test]
    fn outages_are_shaded_and_explain_their_plateau() {
        let at = |t_ms, scenario: &str, down, lag| Sample {
            t_ms,
            scenario: scenario.into(),
            total_lag: lag,
            replicas: 1,
            desired: 1,
            processed_per_sec: 0.0,
            done: 0,
            dead_lettered: 0,
            partition_lag: vec![lag],
            downstream_down: down,
        };
        let timeline = [
            at(0, "idle", false, 0),
            at(1000, "outage", false, 5),
            at(2000, "outage", true, 40),
            at(3000, "outage", true, 40),
            at(8000, "outage", true, 40),
            at(9000, "outage", false, 10),
            at(10_000, "failure", true, 7),
        ];
        let marks = Marks::of(&timeline);
        assert_eq!(marks.outages, [(2.0, 9.0), (10.0, 10.0)]);
        assert_eq!(marks.phases.len(), 3);
        let svg = chart_with("lag", "records", &[], &marks, false);
        assert_eq!(svg.matches("class=\"outage\"").count(), 2, "{svg}");
        let p = longest_plateau(&timeline[..6]).unwrap();
        assert!(
            matches!(stall_cause(&timeline, p, 0), StallCause::Outage(t) if t.contains("downstream was down")),
            "{p:?}"
        );
    }
}

/// A plateau in the lag chart: a partition whose lag stayed above 0 and
/// unchanged across consecutive samples (nothing of it committed, nothing
/// arrived).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plateau {
    pub partition: usize,
    pub from_ms: u64,
    pub to_ms: u64,
}

impl Plateau {
    pub fn seconds(&self) -> f64 {
        (self.to_ms - self.from_ms) as f64 / 1000.0
    }
}

/// The longest plateau of any partition, if any partition had lag.
pub fn longest_plateau(samples: &[Sample]) -> Option<Plateau> {
    let partitions = samples
        .iter()
        .map(|s| s.partition_lag.len())
        .max()
        .unwrap_or(0);
    let mut longest: Option<Plateau> = None;
    for p in 0..partitions {
        let mut since: Option<(u64, i64)> = None;
        for s in samples {
            let lag = s.partition_lag.get(p).copied().unwrap_or(0);
            match since {
                Some((t0, l)) if l == lag && lag > 0 => {
                    if longest.is_none_or(|b| s.t_ms - t0 > b.to_ms - b.from_ms) {
                        longest = Some(Plateau {
                            partition: p,
                            from_ms: t0,
                            to_ms: s.t_ms,
                        });
                    }
                }
                _ => since = (lag > 0).then_some((s.t_ms, lag)),
            }
        }
    }
    longest
}

/// Plateaus longer than this get a cause in the report.
pub const STALL_EXPLAINED_S: f64 = 2.0;

/// How long before a plateau a scale step counts as its cause: two rounds
/// of a classic rebalance (a cooperative one revokes, then assigns), each
/// waiting up to the demo's workers' session timeout (6 s) for members.
const STEP_BEFORE_MS: u64 = 12_000;

/// Why a plateau lasted, from the samples themselves.
#[derive(Debug, Clone, PartialEq)]
pub enum StallCause {
    /// Short enough to need none.
    None,
    /// A worker was killed in the scenario.
    Killed(String),
    /// A scale step's rebalance: replicas changed meanwhile, or just before.
    Rebalance(String),
    /// No scale step near it: its records waited for a batch or a commit.
    Waiting(String),
    /// The handler's downstream was down meanwhile (the outage scenario).
    Outage(String),
}

impl StallCause {
    /// The sentence for the report ("" when none is needed).
    pub fn text(&self) -> &str {
        match self {
            Self::None => "",
            Self::Killed(t) | Self::Rebalance(t) | Self::Waiting(t) | Self::Outage(t) => t,
        }
    }
}

pub fn stall_cause(samples: &[Sample], p: Plateau, killed: u32) -> StallCause {
    if p.seconds() <= STALL_EXPLAINED_S {
        return StallCause::None;
    }
    let partition = p.partition;
    if killed > 0 {
        return StallCause::Killed(format!(
            "partition {partition}: a worker was killed in this scenario; its partitions wait for its session to time out"
        ));
    }
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| (p.from_ms..=p.to_ms).contains(&s.t_ms))
        .collect();
    if during.iter().any(|s| s.downstream_down) {
        return StallCause::Outage(format!(
            "partition {partition}: the downstream was down; the workers' circuit held its records \
             and probed until it answered"
        ));
    }
    let lo = during.iter().map(|s| s.replicas).min().unwrap_or(0);
    let hi = during.iter().map(|s| s.replicas).max().unwrap_or(0);
    if lo != hi {
        return StallCause::Rebalance(format!(
            "partition {partition}: replicas changed between {lo} and {hi} meanwhile (a rebalance)"
        ));
    }
    // The last scale step before it began: its rebalance can stop a
    // partition a moment later (when it is revoked) and for a while.
    let step = samples
        .windows(2)
        .rev()
        .find(|w| w[1].t_ms <= p.from_ms && w[0].replicas != w[1].replicas)
        .filter(|w| p.from_ms - w[1].t_ms <= STEP_BEFORE_MS);
    match step {
        Some(w) => StallCause::Rebalance(format!(
            "partition {partition}: began {:.1} s after the scale step from {} to {} replicas; \
             nothing of it is committed while the rebalance moves it",
            (p.from_ms - w[1].t_ms) as f64 / 1000.0,
            w[0].replicas,
            w[1].replicas
        )),
        None => StallCause::Waiting(format!(
            "partition {partition}: no scale step during it or in the {} s before ({lo} replicas): \
             its records waited for a batch or a commit",
            STEP_BEFORE_MS / 1000
        )),
    }
}

#[cfg(test)]
mod plateau_tests {
    use super::*;

    fn with_replicas(t_ms: u64, replicas: u32, lags: &[i64]) -> Sample {
        Sample {
            replicas,
            desired: replicas,
            ..sample(t_ms, lags)
        }
    }

    #[test]
    fn a_plateau_soon_after_a_scale_step_is_put_down_to_its_rebalance() {
        // A scale step from 1 to 4 at 0.5 s, then lag 7 stands from
        // `from` for `lasting` ms.
        let run = |from: u64, lasting: u64| {
            [
                with_replicas(0, 1, &[9]),
                with_replicas(500, 4, &[8]),
                with_replicas(from, 4, &[7]),
                with_replicas(from + lasting, 4, &[7]),
                with_replicas(from + lasting + 500, 4, &[3]),
            ]
        };
        let samples = run(1500, 2500);
        let p = longest_plateau(&samples).unwrap();
        let cause = stall_cause(&samples, p, 0);
        assert!(
            matches!(&cause, StallCause::Rebalance(t) if t.contains("began 1.0 s after the scale step from 1 to 4 replicas")),
            "{cause:?}"
        );
        assert!(
            matches!(stall_cause(&samples, p, 1), StallCause::Killed(t) if t.contains("killed"))
        );
        // Long after the step: not its doing.
        let late = run(14_000, 3_000);
        let p = longest_plateau(&late).unwrap();
        assert!(
            matches!(stall_cause(&late, p, 0), StallCause::Waiting(t) if t.contains("no scale step"))
        );
        let short = Plateau {
            to_ms: p.from_ms + 2_000,
            ..p
        };
        assert_eq!(stall_cause(&late, short, 0), StallCause::None);
    }

    fn sample(t_ms: u64, lags: &[i64]) -> Sample {
        Sample {
            t_ms,
            scenario: "s".into(),
            total_lag: lags.iter().sum(),
            replicas: 1,
            desired: 1,
            processed_per_sec: 0.0,
            done: 0,
            dead_lettered: 0,
            partition_lag: lags.to_vec(),
            downstream_down: false,
        }
    }

    #[test]
    fn a_plateau_is_lag_above_zero_that_does_not_move() {
        let samples = [
            sample(0, &[5, 0]),
            sample(500, &[5, 0]),
            sample(1000, &[5, 3]),
            sample(1500, &[4, 3]),
            sample(2000, &[4, 3]),
            sample(2500, &[0, 3]),
            sample(3000, &[0, 0]),
        ];
        // Partition 1 stays at 3 from 1000 to 2500 ms.
        assert_eq!(
            longest_plateau(&samples),
            Some(Plateau {
                partition: 1,
                from_ms: 1000,
                to_ms: 2500
            })
        );
        assert_eq!(
            longest_plateau(&samples[..2]).map(|p| p.seconds()),
            Some(0.5)
        );
        assert_eq!(longest_plateau(&[sample(0, &[0]), sample(900, &[0])]), None);
    }
}
