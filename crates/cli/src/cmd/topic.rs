//! `microbatch topic create` and `microbatch topic delete`.

use std::process::ExitCode;
use std::time::Duration;

use microbatch_kafka::admin::{create_topic, delete_topic};

use serde::{Deserialize, Serialize};

use crate::args::KafkaArgs;
use crate::config_file::FromFile;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a topic (an existing one is left as it is).
    Create(CreateArgs),
    /// Delete a topic and all its records (a missing one is not an error).
    Delete(DeleteArgs),
}

#[derive(Debug, clap::Args, Serialize, Deserialize)]
pub struct DeleteArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub kafka: KafkaArgs,
    /// Topic name.
    #[arg(long, env = "KAFKA_TOPIC")]
    pub topic: String,
}

#[derive(Debug, clap::Args, Serialize, Deserialize)]
pub struct CreateArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub kafka: KafkaArgs,
    /// Topic name.
    #[arg(long, env = "KAFKA_TOPIC")]
    pub topic: String,
    /// Number of partitions.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(i32).range(1..))]
    pub partitions: i32,
    /// Replication factor.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub replication_factor: i32,
}

pub async fn execute(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Create(args) => {
            let kafka = args.kafka.resolve()?.start_msk_iam()?;
            let created = create_topic(
                &kafka,
                &args.topic,
                args.partitions,
                args.replication_factor,
                Duration::from_secs(30),
            )
            .await?;
            if created {
                println!(
                    "created topic {} with {} partitions",
                    args.topic, args.partitions
                );
            } else {
                println!("topic {} already exists", args.topic);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete(args) => {
            let kafka = args.kafka.resolve()?.start_msk_iam()?;
            if delete_topic(&kafka, &args.topic, Duration::from_secs(30)).await? {
                println!("deleted topic {}", args.topic);
            } else {
                println!("topic {} does not exist", args.topic);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

impl FromFile for CreateArgs {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.kafka.config_file()
    }
}

impl FromFile for DeleteArgs {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.kafka.config_file()
    }
}
