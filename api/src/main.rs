//! `api` binary: reads config, starts telemetry, binds, runs until SIGTERM/SIGINT.

use anyhow::Context;
use api::Config;
use entity::settings::Vars;
use tokio_util::sync::CancellationToken;
use worker::telemetry::{self, TelemetryConfig};

/// mimalloc: the ingest path allocates many small JSON values; glibc malloc cost a quarter of the CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = dotenvy::dotenv();
    let vars = Vars::from_env();
    let telemetry_config = match TelemetryConfig::from_vars(&vars, "api") {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let _telemetry = telemetry::init(&telemetry_config)?;
    let config = match Config::from_vars(&vars) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("API_BIND: cannot listen on {}", config.bind))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    api::run(config, listener, shutdown).await
}

async fn shutdown_on_signal(token: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
    token.cancel();
}
