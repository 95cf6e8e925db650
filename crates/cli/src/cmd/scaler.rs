//! `microbatch scaler`: KEDA external scaler (gRPC), with gRPC health and
//! reflection, plus /healthz and /metrics over HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;
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
use crate::server_tls::{ReloadingTls, TlsFiles};

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
    /// Reuse a trigger's evaluation for this long: KEDA asks IsActive and
    /// GetMetrics a few ms apart, and every caller within the interval gets
    /// the same answer.
    #[arg(long, env = "MICROBATCH_POLLING_INTERVAL_MS", default_value_t = defaults::SCALER_POLLING_INTERVAL_MS)]
    pub polling_interval_ms: u64,
    /// Drop the state (and Kafka client) of a trigger KEDA has not asked
    /// about for this long (an edited trigger is a new one).
    #[arg(long, env = "MICROBATCH_STATE_TTL_SECONDS", default_value_t = defaults::SCALER_STATE_TTL_SECONDS)]
    pub state_ttl_seconds: u64,
    /// Hold at most this many triggers (each with a Kafka client); a new
    /// trigger past it gets RESOURCE_EXHAUSTED until one is dropped.
    #[arg(long, env = "MICROBATCH_MAX_TRIGGERS", default_value_t = defaults::SCALER_MAX_TRIGGERS)]
    pub max_triggers: usize,
    /// Serve only ScaledObjects in these namespaces (comma-separated); all
    /// when empty. KEDA calls the scaler for any namespace's ScaledObject,
    /// so on a shared cluster this keeps other tenants from reading groups
    /// with the scaler's credentials.
    #[arg(
        long,
        env = "MICROBATCH_ALLOWED_NAMESPACES",
        value_delimiter = ',',
        value_name = "NS,..."
    )]
    pub allowed_namespaces: Vec<String>,
    /// Serve gRPC over TLS with this certificate (PEM, the chain after it);
    /// needs --tls-key. KEDA's trigger then sets `enableTLS: "true"` and
    /// `caCert` (the CA that signed it).
    #[arg(long, env = "MICROBATCH_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "MICROBATCH_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Require a client certificate signed by this CA (PEM): only callers
    /// holding one (KEDA's `tlsClientCert`/`tlsClientKey`) are served.
    /// Needs --tls-cert.
    #[arg(long, env = "MICROBATCH_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
}

/// The gRPC server's TLS files, from the flags: none, server-only, or
/// mutual. Their contents are checked when the configuration is built
/// (`server_tls`), where a mistake names its flag.
fn tls_files(args: &Args) -> Result<Option<TlsFiles>, microbatch_kafka::ConfigError> {
    use microbatch_kafka::ConfigError;
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (None, None) => {
            if args.tls_client_ca.is_some() {
                return Err(ConfigError::new(
                    "--tls-client-ca",
                    "needs --tls-cert and --tls-key: client certificates are checked over TLS",
                ));
            }
            return Ok(None);
        }
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        (Some(_), None) => return Err(ConfigError::new("--tls-key", "is needed with --tls-cert")),
        (None, Some(_)) => return Err(ConfigError::new("--tls-cert", "is needed with --tls-key")),
    };
    Ok(Some(TlsFiles {
        cert,
        key,
        client_ca: args.tls_client_ca.clone(),
    }))
}

pub async fn execute(args: Args) -> anyhow::Result<ExitCode> {
    let kafka = args.kafka.resolve()?;
    let host: std::net::IpAddr = args.host.parse().map_err(|_| {
        microbatch_kafka::ConfigError::new("--host", format!("not an IP address: {}", args.host))
    })?;
    let tls = tls_files(&args)?
        .map(ReloadingTls::new)
        .transpose()
        .map_err(|e| microbatch_kafka::ConfigError::new(e.flag(), e.to_string()))?
        .map(Arc::new);
    let kafka = kafka.start_msk_iam()?;
    let scaler = Arc::new(Scaler::new(
        kafka,
        ScalerConfig {
            stream_interval: Duration::from_millis(args.stream_interval_ms.max(100)),
            polling_interval: Duration::from_millis(args.polling_interval_ms),
            state_ttl: Duration::from_secs(args.state_ttl_seconds.max(1)),
            max_triggers: args.max_triggers.max(1),
            allowed_namespaces: args
                .allowed_namespaces
                .iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect(),
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
        tls = match (&tls, &args.tls_client_ca) {
            (None, _) => "off",
            (Some(_), None) => "server certificate",
            (Some(_), Some(_)) => "mutual (client certificates required)",
        },
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
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(ExternalScalerServer::new(scaler));
    match tls {
        Some(tls) => {
            // Rotated certificates are taken up without a restart.
            tokio::spawn(tls.clone().watch());
            router
                .serve_with_incoming_shutdown(tls.incoming(grpc_listener), super::shutdown_signal())
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                    super::shutdown_signal(),
                )
                .await
        }
    }
    .context("serving gRPC")?;
    let _ = http.await;
    Ok(ExitCode::SUCCESS)
}

impl FromFile for Args {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.kafka.config_file()
    }
}
