//! `microbatch`: Kafka microbatch processing that autoscales on lag.
//!
//! Exit status: 0 success (and a closed pipe), 1 a runtime failure, 2 bad
//! usage or invalid configuration (reported before any connection is made).
//!
//! # Layout
//! - `cmd`: one module per subcommand, each with its `Args` (both the clap
//!   parser and the serde shape of its `--config` file) and `execute`.
//! - `args`: the connection and group flags every command shares.
//! - `config_file`: the `--config` TOML layer under flags and environment.
//! - `policy_args`: the scaling policies' flags (`lag`, `supervise`, `demo`).
//! - `report`: the demo's HTML and JSON report.
//! - `logging`: `--log-format` and `--log-level`.
//! - `init`: PID 1's duties (reaping orphans) when the binary is PID 1.
//! - `server_tls`: the scaler's gRPC TLS, reloaded when its files change.

mod args;
mod cmd;
mod config_file;
mod init;
mod logging;
mod policy_args;
mod report;
mod schema_args;
mod server_tls;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

/// mimalloc for Rust and, through `override`, for librdkafka's C code too:
/// librdkafka allocates every fetched record on its broker thread and the
/// poll thread frees it, which glibc's arenas serve under a contended lock.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // First, before any thread: as PID 1 the work runs in a child and this
    // process reaps the orphans the kernel gives it.
    if init::wanted() {
        if let Err(e) = init::become_init() {
            eprintln!(
                "warning: cannot stand as init (PID 1): {e}; orphaned processes will not be reaped"
            );
        }
    }
    let matches = match cmd::Cli::command().try_get_matches() {
        Ok(matches) => matches,
        Err(e) => exit_quietly(e),
    };
    let cli = match cmd::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    logging::init(&cli.log);
    match cmd::execute(cli, &matches) {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            if err
                .downcast_ref::<microbatch_kafka::ConfigError>()
                .is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Flags whose values may hold credentials: clap quotes an invalid value
/// back, so their errors are told without it.
const SECRET_FLAGS: &[&str] = &["--kafka-property", "--password", "--url"];

/// Exits as clap does for `e` (usage errors 2, `--help` 0), except that an
/// invalid value of a [`SECRET_FLAGS`] flag is not shown.
fn exit_quietly(e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() == ErrorKind::ValueValidation {
        if let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) {
            if SECRET_FLAGS
                .iter()
                .any(|f| arg.split(' ').next() == Some(*f))
            {
                let why = std::error::Error::source(&e)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                eprintln!("error: invalid value for '{arg}'{why}");
                std::process::exit(2);
            }
        }
    }
    e.exit()
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
