//! `microbatch supervise`.
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn execute(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
