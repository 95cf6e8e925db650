//! `microbatch scaler`: KEDA external scaler (gRPC), with gRPC health and
//! reflection, plus /healthz and /metrics over HTTP.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use microbatch_scaling::defaults;
use microbatch_scaling::scaler::proto::external_scaler_server::ExternalScalerServer;
use microbatch_scaling::scaler::{proto, Scaler, ScalerConfig};

use serde::{Deserialize, Serialize};

use crate::args::KafkaArgs;
use crate::config_file::FromFile;

#[derive(Debug, clap::Args, Serialize, Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub kafka: KafkaArgs,
    /// gRPC port KEDA connects to (the trigger's scalerAddress).
    #[arg(long, env = "MICROBATCH_GRPC_PORT", default_value_t = defaults::SCALER_GRPC_PORT)]
    pub grpc_port: u16,
    /// HTTP port for /healthz and /metrics; 0 picks one.
    #[arg(long, env = "MICROBATCH_HTTP_PORT", default_value_t = defaults::SCALER_HTTP_PORT)]
    pub http_port: u16,
    /// Address to bind both ports on.
    #[arg(long, env = "MICROBATCH_HTTP_HOST", default_value = defaults::SCALER_HOST)]
    pub host: String,
    /// How often StreamIsActive re-checks lag (it pushes only changes).
    #[arg(long, env = "MICROBATCH_STREAM_INTERVAL_MS", default_value_t = defaults::SCALER_STREAM_INTERVAL_MS)]
    pub stream_interval_ms: u64,
    /// Reuse a ScaledObject's evaluation for this long: KEDA asks IsActive
    /// and GetMetrics a few ms apart, and every caller within the interval
    /// gets the same answer.
    #[arg(long, env = "MICROBATCH_POLLING_INTERVAL_MS", default_value_t = defaults::SCALER_POLLING_INTERVAL_MS)]
    pub polling_interval_ms: u64,
    /// Drop the state (and Kafka client) of a ScaledObject KEDA has not
    /// asked about for this long.
    #[arg(long, env = "MICROBATCH_STATE_TTL_SECONDS", default_value_t = defaults::SCALER_STATE_TTL_SECONDS)]
    pub state_ttl_seconds: u64,
}

pub async fn execute(args: Args) -> anyhow::Result<ExitCode> {
    let kafka = args.kafka.resolve()?;
    let host: std::net::IpAddr = args.host.parse().map_err(|_| {
        microbatch_kafka::ConfigError::new("--host", format!("not an IP address: {}", args.host))
    })?;
    let kafka = kafka.start_msk_iam()?;
    let scaler = Arc::new(Scaler::new(
        kafka,
        ScalerConfig {
            stream_interval: Duration::from_millis(args.stream_interval_ms.max(100)),
            polling_interval: Duration::from_millis(args.polling_interval_ms),
            state_ttl: Duration::from_secs(args.state_ttl_seconds.max(1)),
        },
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ExternalScalerServer<Arc<Scaler>>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;

    let http_listener = tokio::net::TcpListener::bind(SocketAddr::new(host, args.http_port))
        .await
        .with_context(|| format!("binding the HTTP port {}", args.http_port))?;
    let grpc_listener = tokio::net::TcpListener::bind(SocketAddr::new(host, args.grpc_port))
        .await
        .with_context(|| format!("binding the gRPC port {}", args.grpc_port))?;
    tracing::info!(
        grpc = %grpc_listener.local_addr()?,
        http = %http_listener.local_addr()?,
        "KEDA external scaler serving externalscaler.ExternalScaler, grpc.health.v1 and reflection"
    );
    let app = axum::Router::new()
        .route(microbatch_core::http::HEALTHZ, get(|| async { "ok\n" }))
        .route(
            microbatch_core::http::METRICS,
            get({
                let scaler = scaler.clone();
                move || async move { scaler.encode_metrics() }
            }),
        );
    let http = tokio::spawn(async move {
        let _ = axum::serve(http_listener, app)
            .with_graceful_shutdown(super::shutdown_signal())
            .await;
    });
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(ExternalScalerServer::new(scaler))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
            super::shutdown_signal(),
        )
        .await
        .context("serving gRPC")?;
    let _ = http.await;
    Ok(ExitCode::SUCCESS)
}

impl FromFile for Args {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.kafka.config_file()
    }
}
