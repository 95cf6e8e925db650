//! `microbatch demo`.
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn execute(_args: Args, _rt: &tokio::runtime::Runtime) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
