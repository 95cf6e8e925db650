//! `microbatch`: Kafka microbatch processing that autoscales on lag.
//!
//! Exit status: 0 success (and a closed pipe), 1 a runtime failure, 2 bad
//! usage or invalid configuration (reported before any connection is made).

mod args;
mod cmd;
mod logging;
mod policy_args;
mod report;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc for Rust and, through `override`, for librdkafka's C code too:
/// librdkafka allocates every fetched record on its broker thread and the
/// poll thread frees it, which glibc's arenas serve under a contended lock.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cmd::Cli::parse();
    logging::init(&cli.log);
    match cmd::execute(cli) {
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

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
