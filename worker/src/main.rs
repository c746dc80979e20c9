//! `worker`: wires configuration, telemetry and signals to the library.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use infra::{config::Vars, telemetry};
use tokio_util::sync::CancellationToken;
use worker::{
    Config,
    cli::{Cli, Command},
};

/// See [`infra::allocator`].
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<ExitCode> {
    infra::allocator::apply_options();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<ExitCode> {
    dotenvy::dotenv().ok();
    let cli = Cli::parse();
    if let Some(Command::Healthcheck) = cli.command {
        let bind = worker::config::metrics_bind_of(&Vars::from_env());
        return Ok(infra::health::healthcheck(bind).await);
    }
    // A bad or missing variable: one line naming it, exit status 2 (as the api).
    let config = Config::from_vars(&Vars::from_env()).unwrap_or_else(|e| e.exit());
    let _telemetry = telemetry::init(&config.telemetry)?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            worker::run(config, shutdown)
                .await
                .context("worker failed")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { action } => Ok(worker::cli::dlq(&config, &action).await?),
        Command::Rules { action } => Ok(worker::cli::rules(&config, &action).await),
        Command::Healthcheck => unreachable!("answered before the configuration is read"),
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
