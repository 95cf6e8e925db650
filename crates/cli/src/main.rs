//! `microbatch`: Kafka microbatch processing that autoscales on lag.
//!
//! Exit status: 0 success (and a closed pipe), 1 a runtime failure, 2 bad
//! usage or invalid configuration (reported before any connection is made).

mod args;
mod cmd;
mod logging;
mod report;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc for Rust and, through `override`, for librdkafka's C code too:
/// librdkafka allocates every fetched record on its broker thread and the
/// poll thread frees it, which glibc's arenas serve under a contended lock.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (the enum keeps deprecated entries
/// so that positions stay stable).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc gives freed memory back to the system after `purge_delay` ms (10
/// by default). 5 ms cut the benchmark's peak RSS from about 55 MiB (up to 69)
/// to 34 MiB for about 12% of its throughput (bench/README.md, finding 12).
/// `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads it when it purges.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 5) };
    }
}

fn main() -> ExitCode {
    tune_allocator();
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
                .downcast_ref::<microbatch_core::config::ConfigError>()
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
