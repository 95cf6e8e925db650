//! `microbatch top`: a live dashboard for any group — lag per partition, lag
//! over time, rates and members — what `watch kubectl …` scripts used to do.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::sync::Arc;

use microbatch_kafka::share::backlog::{self, ShareBacklog};
use microbatch_kafka::share::cluster::Connector;
use microbatch_kafka::share::{security, ShareConsumerConfig};
use microbatch_scaling::lag::{GroupLag, InvalidOffsetPolicy, LagReader, RateTracker, Rates};
use microbatch_scaling::share_lag::backlog_as_lag;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Style};
use ratatui::text::Line;
use ratatui::widgets::{Bar, BarChart, BarGroup, Block, Paragraph, Sparkline};
use ratatui::Frame;

use super::lag::seconds;
use serde::{Deserialize, Serialize};

use crate::args::LagTarget;
use crate::config_file::FromFile;

#[derive(Debug, clap::Args, Serialize, Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub target: LagTarget,
    /// Watch a share group's backlog instead of a consumer group's lag
    /// (what `lag --share-group` reads): records not yet acknowledged,
    /// in flight included; "processed" is records acknowledged.
    #[arg(
        long,
        env = "SHARE_GROUP",
        value_name = "NAME",
        conflicts_with = "group"
    )]
    pub share_group: Option<String>,
    /// Refresh interval.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Plain lines instead of the full-screen view (the default when stdout
    /// is not a terminal).
    #[arg(long)]
    pub plain: bool,
}

/// What the dashboard shows at one moment.
struct Snapshot {
    lag: Option<GroupLag>,
    error: Option<String>,
    rates: Rates,
    members: Option<usize>,
    /// Share groups: partitions whose backlog the broker cannot say yet.
    unknown: usize,
}

/// Where the numbers come from.
enum Source {
    Group(Box<LagReader>),
    Share {
        connector: Arc<dyn Connector>,
        bootstrap: Vec<String>,
        group: String,
        topic: String,
        runtime: tokio::runtime::Handle,
    },
}

struct Dashboard {
    source: Source,
    rates: RateTracker,
    history: VecDeque<u64>,
}

/// A share group's backlog in the dashboard's terms: a partition's "lag"
/// is its backlog (0 while the broker has no state for it: those are
/// counted apart).
fn share_as_lag(b: &ShareBacklog) -> GroupLag {
    let unknown_counts_none = InvalidOffsetPolicy::Latest {
        scale_to_zero: true,
    };
    backlog_as_lag(b, unknown_counts_none)
}

impl Dashboard {
    fn refresh(&mut self) -> Snapshot {
        let read = match &mut self.source {
            Source::Group(reader) => reader
                .read(InvalidOffsetPolicy::Earliest)
                .map(|lag| (lag, reader.members(), 0))
                .map_err(|e| e.to_string()),
            Source::Share {
                connector,
                bootstrap,
                group,
                topic,
                runtime,
            } => {
                let read = backlog::read(
                    connector.clone(),
                    bootstrap.clone(),
                    group,
                    topic,
                    Duration::from_secs(5),
                );
                // Called outside the runtime, or inside block_in_place.
                runtime
                    .block_on(read)
                    .map(|b| (share_as_lag(&b), Some(b.members), b.partitions_unknown))
                    .map_err(|e| e.to_string())
            }
        };
        match read {
            Ok((lag, members, unknown)) => {
                // Offline partitions drop out of the sums, and would come
                // back as a burst: such a reading leaves the rates as they were.
                let rates = if lag.unreadable().is_none() {
                    self.rates.observe(Instant::now(), &lag)
                } else {
                    self.rates.rates()
                };
                // A total without the offline partitions is not the lag.
                if lag.partitions_offline.is_empty() {
                    self.history.push_back(lag.total_lag.max(0) as u64);
                }
                while self.history.len() > 240 {
                    self.history.pop_front();
                }
                Snapshot {
                    members,
                    lag: Some(lag),
                    error: None,
                    rates,
                    unknown,
                }
            }
            Err(e) => Snapshot {
                lag: None,
                error: Some(e),
                rates: Rates::default(),
                members: None,
                unknown: 0,
            },
        }
    }
}

fn members_text(m: Option<usize>) -> String {
    m.map(|n| n.to_string()).unwrap_or_else(|| "n/a".into())
}

fn draw(frame: &mut Frame<'_>, args: &Args, snap: &Snapshot, history: &VecDeque<u64>) {
    let [header, spark, bars, footer] = Layout::vertical([
        Constraint::Length(5),
        Constraint::Length(8),
        Constraint::Min(6),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let total = snap.lag.as_ref().map(|l| l.total_lag).unwrap_or(0);
    let share = args.share_group.is_some();
    let (kind, lag_word, done_word) = if share {
        ("share group", "backlog", "acknowledged")
    } else {
        ("group", "lag", "committed")
    };
    let mut lines = vec![Line::from(format!(
        "{kind} {}   topic {}   members {}",
        args.share_group
            .as_deref()
            .or(args.target.group.as_deref())
            .unwrap_or_default(),
        args.target.topic,
        members_text(snap.members)
    ))];
    if share {
        let unknown = match snap.unknown {
            0 => String::new(),
            n => format!(" (+ {n} partitions unknown)"),
        };
        lines.push(Line::from(format!(
            "total backlog {total}{unknown}   arriving {:.0}/s   {done_word} {:.0}/s",
            snap.rates.arrival_per_sec, snap.rates.processed_per_sec
        )));
    } else {
        let oldest = seconds(snap.lag.as_ref().and_then(|l| l.lag_ms));
        lines.push(Line::from(format!(
            "total lag {total}   oldest waiting {oldest} s   arriving {:.0}/s   {done_word} {:.0}/s",
            snap.rates.arrival_per_sec, snap.rates.processed_per_sec
        )));
    }
    if let Some(lag) = snap
        .lag
        .as_ref()
        .filter(|l| !l.partitions_offline.is_empty())
    {
        lines.push(Line::from(format!(
            "partitions {:?} have no leader (offline): not in the total",
            lag.partitions_offline
        )));
    }
    if let Some(lag) = snap.lag.as_ref().filter(|_| !share) {
        let ages: Vec<String> = lag
            .partitions
            .iter()
            .map(|p| format!("p{} {}", p.partition, seconds(p.lag_ms)))
            .collect();
        lines.push(Line::from(format!("lag seconds   {}", ages.join("  "))));
    }
    if let Some(e) = &snap.error {
        lines.push(Line::styled(
            format!("error: {e}"),
            Style::default().fg(Color::Red),
        ));
    }
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" microbatch top ")),
        header,
    );
    let data: Vec<u64> = history.iter().copied().collect();
    frame.render_widget(
        Sparkline::default()
            .block(Block::bordered().title(format!(" total {lag_word} over time ")))
            .data(&data)
            .style(Style::default().fg(Color::Red)),
        spark,
    );
    if let Some(lag) = &snap.lag {
        let group: Vec<Bar<'_>> = lag
            .partitions
            .iter()
            .map(|p| {
                Bar::default()
                    .value(p.lag.max(0) as u64)
                    .label(Line::from(format!("p{}", p.partition)))
                    .text_value(p.lag.to_string())
            })
            .collect();
        frame.render_widget(
            BarChart::default()
                .block(Block::bordered().title(format!(" {lag_word} per partition ")))
                .data(BarGroup::default().bars(&group))
                .bar_width(6)
                .bar_gap(1)
                .bar_style(Style::default().fg(Color::Yellow)),
            bars,
        );
    }
    frame.render_widget(Paragraph::new("q or Esc quits"), footer);
}

/// `pN=offline` for each partition without a leader.
fn offline_parts(lag: &GroupLag) -> impl Iterator<Item = String> + '_ {
    lag.partitions_offline
        .iter()
        .map(|p| format!("p{p}=offline"))
}

fn plain_line(snap: &Snapshot, share: bool) -> String {
    match &snap.lag {
        Some(lag) if share => {
            let parts: Vec<String> = lag
                .partitions
                .iter()
                .map(|p| match p.committed {
                    Some(_) => format!("p{}={}", p.partition, p.lag),
                    None => format!("p{}=-", p.partition),
                })
                .chain(offline_parts(lag))
                .collect();
            format!(
                "total_backlog={} partitions_unknown={} arriving/s={:.0} acknowledged/s={:.0} members={} {}",
                lag.total_lag,
                snap.unknown,
                snap.rates.arrival_per_sec,
                snap.rates.processed_per_sec,
                members_text(snap.members),
                parts.join(" ")
            )
        }
        Some(lag) => {
            let parts: Vec<String> = lag
                .partitions
                .iter()
                .map(|p| format!("p{}={}/{}s", p.partition, p.lag, seconds(p.lag_ms)))
                .chain(offline_parts(lag))
                .collect();
            format!(
                "total_lag={} lag_seconds={} arriving/s={:.0} committed/s={:.0} members={} {}",
                lag.total_lag,
                seconds(lag.lag_ms),
                snap.rates.arrival_per_sec,
                snap.rates.processed_per_sec,
                members_text(snap.members),
                parts.join(" ")
            )
        }
        None => format!("error: {}", snap.error.as_deref().unwrap_or("unknown")),
    }
}

pub fn execute(args: Args, runtime: &tokio::runtime::Runtime) -> anyhow::Result<ExitCode> {
    let share = args.share_group.is_some();
    let source = match &args.share_group {
        Some(group) => {
            let kafka = args.target.kafka.resolve()?.start_msk_iam()?;
            Source::Share {
                connector: security::connector(&kafka)?,
                bootstrap: ShareConsumerConfig::from_kafka(&kafka, group.as_str(), vec![])?
                    .bootstrap,
                group: group.clone(),
                topic: args.target.topic.clone(),
                runtime: runtime.handle().clone(),
            }
        }
        None => Source::Group(Box::new(
            args.target
                .reader(Duration::from_secs(5))?
                .with_record_ages(),
        )),
    };
    let mut dash = Dashboard {
        source,
        rates: RateTracker::default(),
        history: VecDeque::new(),
    };
    let interval = Duration::from_millis(args.interval_ms.max(100));
    if args.plain || !std::io::stdout().is_terminal() {
        runtime.block_on(async {
            let mut stop = std::pin::pin!(super::shutdown_signal());
            loop {
                let snap = tokio::task::block_in_place(|| dash.refresh());
                println!("{}", plain_line(&snap, share));
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = &mut stop => break,
                }
            }
        });
        return Ok(ExitCode::SUCCESS);
    }
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        loop {
            let snap = dash.refresh();
            terminal.draw(|f| draw(f, &args, &snap, &dash.history))?;
            let until = Instant::now() + interval;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                if event::poll(left)? {
                    if let Event::Key(k) = event::read()? {
                        let ctrl_c = k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL);
                        if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                            return Ok(());
                        }
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result.map(|()| ExitCode::SUCCESS)
}

impl FromFile for Args {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.target.kafka.config_file()
    }
}
