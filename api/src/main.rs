//! `api` binary: reads config, starts telemetry, binds, runs until SIGTERM/SIGINT.

use anyhow::Context;
use api::Config;
use clap::{Parser, Subcommand};
use infra::config::Vars;
use infra::telemetry;
use tokio_util::sync::CancellationToken;

/// mimalloc: the ingest path allocates many small JSON values (docs/tuning.md, "Allocator").
/// Started with lazy arena commit (see [`infra::allocator`]).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Serves the HTTP api: PostHog-compatible ingest, webhooks and the user context read path.
/// Configuration comes from the environment (and `.env`); see `.env.example`.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Also run a worker replica in this process (configured by the same environment):
    /// the whole pipeline in one process, for local work and small deployments.
    #[arg(long)]
    with_worker: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Exit 0 when this api's `GET /health` on `API_BIND` answers 200, 1 otherwise, with a
    /// one-line reason: the container health check, without curl.
    Healthcheck,
    /// Serve the MCP tools (the same as `/mcp`) to one local client over stdin/stdout, for
    /// desktop MCP clients that start the server themselves. Logs go to stderr.
    Mcp {
        /// Speak MCP on stdin/stdout (the only transport of this command; `/mcp` is HTTP).
        #[arg(long, required = true)]
        stdio: bool,
    },
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    infra::allocator::apply_options();
    let cli = Cli::parse();
    let _ = dotenvy::dotenv();
    let vars = Vars::from_env();
    if let Some(Command::Healthcheck) = cli.command {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return Ok(runtime.block_on(infra::health::healthcheck(api::config::bind(&vars))));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(Command::Mcp { .. }) = cli.command {
        runtime.block_on(mcp_stdio(vars))?;
    } else {
        runtime.block_on(serve(cli, vars))?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn serve(cli: Cli, vars: Vars) -> anyhow::Result<()> {
    let config = Config::from_vars(&vars).unwrap_or_else(|e| e.exit());
    let _telemetry = telemetry::init(&config.telemetry)?;
    config.warn_if_development_key();
    let worker_config = cli
        .with_worker
        .then(|| worker::Config::from_vars(&vars).unwrap_or_else(|e| e.exit()));
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("API_BIND: cannot listen on {}", config.bind))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    match worker_config {
        Some(worker_config) => {
            api::run_with_worker(config, worker_config, listener, shutdown).await
        }
        None => api::run(config, listener, shutdown).await,
    }
}

async fn mcp_stdio(vars: Vars) -> anyhow::Result<()> {
    let config = Config::from_vars(&vars).unwrap_or_else(|e| e.exit());
    let _telemetry = telemetry::init(&config.telemetry)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    api::mcp::stdio::run(config, shutdown).await
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
