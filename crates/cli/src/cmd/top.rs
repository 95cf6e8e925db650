//! `microbatch top`: a live dashboard for any group — lag per partition, lag
//! over time, rates and members — what `watch kubectl …` scripts used to do.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use microbatch_scaling::lag::{GroupLag, InvalidOffsetPolicy, LagReader, RateTracker, Rates};
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
}

struct Dashboard {
    reader: LagReader,
    rates: RateTracker,
    history: VecDeque<u64>,
}

impl Dashboard {
    fn refresh(&mut self) -> Snapshot {
        match self.reader.read(InvalidOffsetPolicy::Earliest) {
            Ok(lag) => {
                let rates = self.rates.observe(Instant::now(), &lag);
                self.history.push_back(lag.total_lag.max(0) as u64);
                while self.history.len() > 240 {
                    self.history.pop_front();
                }
                Snapshot {
                    members: self.reader.members(),
                    lag: Some(lag),
                    error: None,
                    rates,
                }
            }
            Err(e) => Snapshot {
                lag: None,
                error: Some(e.to_string()),
                rates: Rates::default(),
                members: None,
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
    let mut lines = vec![Line::from(format!(
        "group {}   topic {}   members {}",
        args.target.group.as_deref().unwrap_or_default(),
        args.target.topic,
        members_text(snap.members)
    ))];
    let oldest = seconds(snap.lag.as_ref().and_then(|l| l.lag_ms));
    lines.push(Line::from(format!(
        "total lag {total}   oldest waiting {oldest} s   arriving {:.0}/s   committed {:.0}/s",
        snap.rates.arrival_per_sec, snap.rates.processed_per_sec
    )));
    if let Some(lag) = &snap.lag {
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
            .block(Block::bordered().title(" total lag over time "))
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
                .block(Block::bordered().title(" lag per partition "))
                .data(BarGroup::default().bars(&group))
                .bar_width(6)
                .bar_gap(1)
                .bar_style(Style::default().fg(Color::Yellow)),
            bars,
        );
    }
    frame.render_widget(Paragraph::new("q or Esc quits"), footer);
}

fn plain_line(snap: &Snapshot) -> String {
    match &snap.lag {
        Some(lag) => {
            let parts: Vec<String> = lag
                .partitions
                .iter()
                .map(|p| format!("p{}={}/{}s", p.partition, p.lag, seconds(p.lag_ms)))
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
    let reader = args
        .target
        .reader(Duration::from_secs(5))?
        .with_record_ages();
    let mut dash = Dashboard {
        reader,
        rates: RateTracker::default(),
        history: VecDeque::new(),
    };
    let interval = Duration::from_millis(args.interval_ms.max(100));
    if args.plain || !std::io::stdout().is_terminal() {
        runtime.block_on(async {
            let mut stop = std::pin::pin!(super::shutdown_signal());
            loop {
                let snap = tokio::task::block_in_place(|| dash.refresh());
                println!("{}", plain_line(&snap));
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
