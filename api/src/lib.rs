//! The api: PostHog-compatible ingest into a Redis Stream, webhooks, and the user context read
//! path, documented with OpenAPI at `/docs`.
//!
//! [`ingest`] turns requests into envelopes on the stream, [`context`] reads a user's context
//! back from Postgres, [`routes`] holds the thin handlers of both, [`mcp`] serves the context as
//! MCP tools, and [`http`] the plumbing every route shares.

pub mod config;
pub mod context;
pub mod http;
pub mod ingest;
pub mod mcp;
pub mod routes;
pub mod state;

/// The fixed "now" of unit tests.
#[cfg(test)]
fn test_now() -> chrono::DateTime<chrono::Utc> {
    "2026-11-28T12:00:00Z".parse().unwrap()
}

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use poem::{
    Endpoint, EndpointExt, Response, Route, Server, listener::TcpAcceptor, middleware::Cors,
};
use poem_openapi::OpenApiService;
use tokio_util::sync::CancellationToken;

use crate::routes::{
    CAPTURE_PATHS, capture::CaptureApi, context::ContextApi, health::HealthApi, ingest::IngestApi,
    rules::RulesApi,
};
pub use crate::{config::Config, state::AppState};

/// How long in-flight requests may take to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The OpenAPI service: every route, documented.
pub fn openapi(
    config: &Config,
) -> OpenApiService<(CaptureApi, IngestApi, ContextApi, RulesApi, HealthApi), ()> {
    OpenApiService::new(
        (CaptureApi, IngestApi, ContextApi, RulesApi, HealthApi),
        &config.project_name,
        env!("CARGO_PKG_VERSION"),
    )
        .description(
            "Turns product clickstreams into context an AI assistant can use. Send events with a PostHog SDK \
             (point its host here) or a webhook; they are queued in a Redis Stream, enriched by workers and \
             stored; read a user's context back for your assistant's prompt.\n\n\
             Every failure answers with one JSON shape: `{\"type\", \"code\", \"detail\", \"attr\"}`, where \
             `attr` names the field at fault (e.g. `batch[3].distinct_id`). Trailing slashes are optional on every route.",
        )
}

/// The whole HTTP application for `state`.
pub fn app(state: AppState) -> impl Endpoint<Output = Response> {
    let metrics = state.metrics.clone();
    let api = openapi(&state.config);
    let docs = api.swagger_ui();
    let spec = api.spec_endpoint();
    let routes = Arc::new(
        Route::new()
            .nest("/docs", docs)
            .at("/openapi.json", spec)
            .at(mcp::MCP_PATH, mcp::endpoint(&state))
            .nest("/", api)
            .data(state.clone())
            .map_to_response(),
    );
    // Browsers post to the capture routes from any origin; nothing else is cross-origin.
    let with_cors = Arc::new(
        routes
            .clone()
            .with(Cors::new().allow_credentials(false))
            .map_to_response(),
    );
    let app = poem::endpoint::make(move |req: poem::Request| {
        let routes = routes.clone();
        let with_cors = with_cors.clone();
        let state = state.clone();
        async move {
            if !CAPTURE_PATHS.contains(&req.uri().path()) {
                routes.call(req).await
            } else if req.method() == poem::http::Method::POST
                && !req.headers().contains_key(poem::http::header::ORIGIN)
            {
                // An SDK posting events (no browser, so no CORS): straight to the handler.
                Ok(routes::capture::post_direct(&state, req).await)
            } else {
                with_cors.call(req).await
            }
        }
    });
    http::layered(app, metrics)
}

/// Serves the api on `listener` until `shutdown` fires, then lets in-flight requests finish.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = AppState::new(config, shutdown.clone()).await?;
    let monitor = state.publisher.spawn_backlog_monitor(shutdown.clone());
    if state.config.migrate_on_start {
        tokio::spawn(migrate_until_done(state.db.clone(), shutdown.clone()));
    }
    let addr = listener.local_addr()?;
    tracing::info!(%addr, stream = %state.publisher.shards().queue_name(), shards = state.publisher.shards().count(), "api listening");
    let server = Server::new_with_acceptor(TcpAcceptor::from_tokio(listener)?)
        .idle_timeout(Duration::from_secs(60));
    server
        .run_with_graceful_shutdown(
            app(state),
            shutdown.clone().cancelled_owned(),
            Some(SHUTDOWN_GRACE),
        )
        .await?;
    shutdown.cancel();
    let _ = monitor.await;
    tracing::info!("api stopped");
    Ok(())
}

/// Serves the api and runs a worker replica in the same process (`api --with-worker`): one
/// process for a laptop or a small single-container deployment. Both stop on `shutdown`; when
/// either half stops on its own (an error, or a panic) the other is stopped too and the error
/// returned, so the process exits instead of serving half a pipeline.
pub async fn run_with_worker(
    config: Config,
    worker_config: worker::Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut api = tokio::spawn(run(config, listener, shutdown.clone()));
    let mut worker = tokio::spawn(worker::run(worker_config, shutdown.clone()));
    let flatten_api =
        |r: Result<anyhow::Result<()>, tokio::task::JoinError>| -> anyhow::Result<()> {
            r.map_err(|e| anyhow::anyhow!("api task failed: {e}"))?
                .context("api failed")
        };
    let flatten_worker = |r: Result<Result<(), worker::WorkerError>, tokio::task::JoinError>| {
        r.map_err(|e| anyhow::anyhow!("worker task failed: {e}"))?
            .context("worker failed")
    };
    let (first, second) = tokio::select! {
        r = &mut api => {
            let first = stopped_early("api", flatten_api(r), &shutdown);
            shutdown.cancel();
            (first, flatten_worker(worker.await))
        }
        r = &mut worker => {
            let first = stopped_early("worker", flatten_worker(r), &shutdown);
            shutdown.cancel();
            (first, flatten_api(api.await))
        }
    };
    first.and(second)
}

/// A half that returned before shutdown was requested stopped unexpectedly: an error even if it
/// returned `Ok`.
fn stopped_early(
    half: &str,
    result: anyhow::Result<()>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    match result {
        Ok(()) if !shutdown.is_cancelled() => {
            anyhow::bail!("{half} stopped before shutdown was requested")
        }
        other => other,
    }
}

/// Applies pending migrations, retrying while Postgres is unreachable: ingest never waits on
/// the database, so the api serves while this runs.
async fn migrate_until_done(db: sea_orm::DatabaseConnection, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(500);
    loop {
        match migration::apply(&db).await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "database migrations not applied yet")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
