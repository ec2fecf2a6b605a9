//! The `authd` binary: `serve` (default), `migrate`, `healthcheck`.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use authd::{app::Application, config::Settings, store::Db, telemetry};
use clap::{Parser, Subcommand};

/// glibc's malloc serialises on arena locks under many small concurrent allocations (HTTP/2
/// frames, protobuf messages); mimalloc keeps per-thread heaps.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "gRPC service for authentication sessions and user profiles"
)]
struct Cli {
    /// TOML settings file (environment variables SECTION__KEY override it).
    #[arg(long, global = true, env = "AUTHD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server (the default).
    Serve,
    /// Create the database if needed, apply migrations, exit.
    Migrate,
    /// Exit 0 when the server's gRPC health service reports SERVING.
    Healthcheck {
        /// Address to check, `host:port` (default: HEALTH__ADDR when set, else GRPC__ADDR; an
        /// unspecified host such as 0.0.0.0 is read as 127.0.0.1).
        #[arg(long)]
        addr: Option<String>,
        /// Health service name ("" is the whole server).
        #[arg(long, default_value = "")]
        service: String,
        /// Speak TLS (implied by the other TLS options).
        #[arg(long)]
        tls: bool,
        /// PEM roots to verify the server with (default: the system's).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// PEM client certificate, for a server that asks for one (with --key-file).
        #[arg(long)]
        cert_file: Option<PathBuf>,
        /// PEM private key of --cert-file.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Name the server's certificate must carry (default: the address' host).
        #[arg(long)]
        server_name: Option<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("authd: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Healthcheck {
        addr,
        service,
        tls,
        ca_file,
        cert_file,
        key_file,
        server_name,
    }) = &cli.command
    {
        let target = addr.clone().unwrap_or_else(|| {
            let mut own: SocketAddr = settings.health.addr.unwrap_or(settings.grpc.addr);
            if own.ip().is_unspecified() {
                own.set_ip([127, 0, 0, 1].into());
            }
            own.to_string()
        });
        let tls_wanted = *tls
            || ca_file.is_some()
            || cert_file.is_some()
            || key_file.is_some()
            || server_name.is_some();
        let tls = tls_wanted.then(|| authd::healthcheck::Tls {
            ca_file: ca_file.clone(),
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            server_name: server_name.clone(),
        });
        let timeout = Duration::from_secs(3);
        return match authd::healthcheck::check(&target, service, tls.as_ref(), timeout).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(reason) => {
                eprintln!("authd healthcheck: {reason}");
                ExitCode::FAILURE
            }
        };
    }
    let traces = match telemetry::init(&settings.log, &settings.traces) {
        Ok(traces) => traces,
        Err(error) => {
            eprintln!("authd: cannot export traces to TRACES__OTLP_ENDPOINT: {error:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Some(Command::Migrate) => migrate(&settings).await,
        _ => serve(settings).await,
    };
    if let Some(traces) = traces {
        // The provider's shutdown waits for its last export: off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("authd: {error:#}");
            // A setting found unusable once the pieces are built (against what the fleet
            // agreed on, say) is a configuration error like the ones found on loading.
            if error.downcast_ref::<authd::config::ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    Application::build(settings)
        .await?
        .run_until_stopped(shutdown_signal())
        .await
}

async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    Db::check(&settings.database)?;
    let db = Db::connect(&settings.database, authd::metrics::Metrics::new())
        .await
        .context("cannot reach PostgreSQL at DATABASE__URL")?;
    db.migrate().await.context("database migrations failed")?;
    db.close().await;
    tracing::info!("migrations applied");
    Ok(())
}

/// SIGTERM (Kubernetes, docker stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
