//! Logs go to stderr, as text or JSON lines; stdout is kept for results.

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "MICROBATCH_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `debug,librdkafka=info` (RUST_LOG syntax).
    #[arg(long, global = true, env = "MICROBATCH_LOG", default_value = "info")]
    pub log_level: String,
}

pub fn init(args: &LogArgs) {
    // The rdkafka crate repeats every client error through `log`; the
    // worker reports them itself, throttled, so the crate's copies
    // (target `librdkafka`) are off unless asked for.
    let directives = if args.log_level.contains("rdkafka") {
        args.log_level.clone()
    } else {
        format!("{},rdkafka=off,librdkafka=off", args.log_level)
    };
    let filter = EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=off,librdkafka=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format {
        LogFormat::Text => builder.with_target(false).init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}
