//! `microbatch auth msk-iam-token`: one fresh MSK IAM token, for debugging
//! access as AWS's signer tools do. The only place a token is ever printed,
//! and only on request.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use microbatch_kafka::aws_iam::{
    token_once, MskIamSettings, RefreshPolicy, DEFAULT_TOKEN_LIFETIME,
};
use microbatch_kafka::config::{ConfigError, KafkaConfig, SaslMechanism, SecurityProtocol};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print one fresh Amazon MSK IAM token (SASL/OAUTHBEARER) and its expiry.
    ///
    /// Credentials come from the standard AWS chain (environment, shared
    /// profile, web identity token, container and instance metadata). The
    /// token is a bearer credential for the cluster until it expires: do not
    /// paste it anywhere you would not paste a password.
    MskIamToken(MskIamTokenArgs),
}

#[derive(Debug, clap::Args)]
pub struct MskIamTokenArgs {
    /// AWS region of the MSK cluster.
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,
    /// Token lifetime in seconds, 10..=900.
    #[arg(long, env = "MSK_IAM_TOKEN_LIFETIME_S", default_value_t = DEFAULT_TOKEN_LIFETIME.as_secs())]
    pub msk_iam_token_lifetime_s: u64,
    /// Print {"token", "expires_at_ms", "region"} as JSON instead.
    #[arg(long)]
    pub json: bool,
}

pub fn execute(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::MskIamToken(args) => msk_iam_token(args),
    }
}

fn msk_iam_token(args: MskIamTokenArgs) -> anyhow::Result<ExitCode> {
    // The same validation as a client connection, so the rules live once.
    let mut kafka = KafkaConfig::plaintext("unused:9098");
    kafka.security_protocol = SecurityProtocol::SaslSsl;
    kafka.sasl_mechanism = Some(SaslMechanism::AwsMskIam);
    kafka.aws_region = args.aws_region.filter(|r| !r.is_empty());
    kafka.msk_iam_token_lifetime = Duration::from_secs(args.msk_iam_token_lifetime_s);
    let kafka = kafka.validate().map_err(|mut e: ConfigError| {
        if e.field == "--bootstrap-servers" {
            e.field = "--aws-region";
        }
        e
    })?;
    let settings = MskIamSettings {
        region: kafka.aws_region.clone().unwrap_or_default(),
        policy: RefreshPolicy::with_lifetime(kafka.msk_iam_token_lifetime),
    };
    let token = token_once(&settings).context("making an MSK IAM token")?;
    let left = token
        .expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .as_secs();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "token": token.token.expose(),
                "expires_at_ms": token.expires_at_ms(),
                "region": settings.region,
            })
        );
    } else {
        println!("{}", token.token.expose());
        println!(
            "expires_at_ms={} (in {left} s, region {})",
            token.expires_at_ms(),
            settings.region
        );
    }
    Ok(ExitCode::SUCCESS)
}
