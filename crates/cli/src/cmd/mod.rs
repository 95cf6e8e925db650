//! One module per subcommand, each with its `Args` and `execute`.

pub mod auth;
pub mod demo;
pub mod lag;
pub mod produce;
pub mod run;
pub mod scaler;
pub mod supervise;
pub mod top;
pub mod topic;

use std::process::ExitCode;

use clap::{ArgMatches, CommandFactory, Parser, Subcommand};

use crate::config_file;

use crate::logging::LogArgs;

/// Kafka microbatch processing that autoscales on consumer-group lag.
///
/// Start with `microbatch demo`: it runs the whole system on an embedded
/// broker. Every flag can also come from its environment variable (shown in
/// brackets) or from a TOML file given with --config.
#[derive(Debug, Parser)]
#[command(
    name = "microbatch",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run one worker: a consumer-group member that processes microbatches.
    Run(run::Args),
    /// Produce test load: a count or a rate, sized and keyed, aimed at partitions.
    Produce(produce::Args),
    /// Show the group's lag per partition, and what each scaling policy would do.
    Lag(lag::Args),
    /// Manage topics.
    #[command(subcommand)]
    Topic(topic::Command),
    /// Serve KEDA's external scaler gRPC API with our scaling policies.
    Scaler(scaler::Args),
    /// Run 1..N workers on this machine and scale them on lag.
    Supervise(supervise::Args),
    /// Live dashboard for any group: lag per partition, lag over time, rates, members.
    Top(top::Args),
    /// Run the whole system end to end, on an embedded broker unless one is named.
    Demo(demo::Args),
    /// Authentication helpers (an Amazon MSK IAM token, for debugging access).
    #[command(subcommand)]
    Auth(auth::Command),
}

/// Runs the command `cli` holds; `matches` is the parse it came from,
/// which tells the `--config` file which flags were left unset.
pub fn execute(cli: Cli, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("microbatch")
        .build()?;
    let parser = Cli::command();
    let (name, sub) = matches.subcommand().expect("clap requires a subcommand");
    let command = parser
        .find_subcommand(name)
        .expect("the subcommand just parsed");
    match cli.command {
        Command::Run(args) => runtime.block_on(run::execute(config_file::apply(
            args, &parser, command, sub,
        )?)),
        Command::Produce(args) => runtime.block_on(produce::execute(config_file::apply(
            args, &parser, command, sub,
        )?)),
        Command::Lag(args) => runtime.block_on(lag::execute(config_file::apply(
            args, &parser, command, sub,
        )?)),
        Command::Topic(cmd) => {
            let (name, sub) = sub.subcommand().expect("clap requires a subcommand");
            let command = command
                .find_subcommand(name)
                .expect("the subcommand just parsed");
            let cmd = match cmd {
                topic::Command::Create(args) => {
                    topic::Command::Create(config_file::apply(args, &parser, command, sub)?)
                }
                topic::Command::Delete(args) => {
                    topic::Command::Delete(config_file::apply(args, &parser, command, sub)?)
                }
                topic::Command::Describe(args) => {
                    topic::Command::Describe(config_file::apply(args, &parser, command, sub)?)
                }
            };
            runtime.block_on(topic::execute(cmd))
        }
        Command::Scaler(args) => runtime.block_on(scaler::execute(config_file::apply(
            args, &parser, command, sub,
        )?)),
        Command::Supervise(args) => runtime.block_on(supervise::execute(config_file::apply(
            args, &parser, command, sub,
        )?)),
        Command::Demo(args) => {
            demo::execute(config_file::apply(args, &parser, command, sub)?, &runtime)
        }
        Command::Top(args) => {
            top::execute(config_file::apply(args, &parser, command, sub)?, &runtime)
        }
        Command::Auth(cmd) => auth::execute(cmd),
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler cannot fail");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
    }
}
