//! The api: PostHog-compatible ingest into a Redis Stream, webhooks, and (later) the user
//! context read path, documented with OpenAPI at `/docs`.

pub mod auth;
pub mod config;
pub mod context;
pub mod decode;
pub mod error;
pub mod fast;
pub mod intake;
pub mod limits;
pub mod metrics;
pub mod normalize;
pub mod payload;
pub mod publisher;
pub mod routes;
pub mod state;
pub mod trace;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use poem::{
    Endpoint, EndpointExt, Response, Route, Server,
    error::ResponseError,
    listener::TcpAcceptor,
    middleware::{CatchPanic, Cors},
};
use poem_openapi::OpenApiService;
use tokio_util::sync::CancellationToken;

pub use crate::{config::Config, state::AppState};
use crate::{
    error::ApiError,
    routes::{
        CAPTURE_PATHS, capture::CaptureApi, context::ContextApi, health::HealthApi,
        ingest::IngestApi, rules::RulesApi,
    },
};

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
    layered(app, metrics)
}

/// What every request goes through around `app`: trailing slashes trimmed, every error in the
/// one JSON shape, a panic answered 500 (logged and counted), then counted and traced.
fn layered(
    app: impl Endpoint + 'static,
    metrics: crate::metrics::ApiMetrics,
) -> impl Endpoint<Output = Response> {
    let app = app
        .with(TrimSlashes)
        .catch_all_error(|err| async move { ApiError::from_poem(err).as_response() })
        .with(catch_panic(metrics.clone()))
        .map_to_response();
    crate::metrics::CountRequests {
        inner: app,
        metrics,
    }
    .with(trace::RequestSpan)
}

/// Answers a request whose handler panicked with the standard 500 body, logged and counted
/// (`http_panics_total`), instead of dropping the connection with no answer.
fn catch_panic(
    metrics: crate::metrics::ApiMetrics,
) -> CatchPanic<impl poem::middleware::PanicHandler> {
    CatchPanic::new().with_handler(move |panic: Box<dyn std::any::Any + Send>| {
        metrics.panicked(panic.as_ref()).as_response()
    })
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
    tracing::info!(%addr, stream = %state.publisher.stream(), "api listening");
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

/// Makes trailing slashes optional on every route (`/batch/` is `/batch`) and merges repeated
/// slashes, touching only paths that need it (poem's `NormalizePath` runs a regex on every request).
struct TrimSlashes;

impl<E: Endpoint> poem::Middleware<E> for TrimSlashes {
    type Output = TrimSlashesEndpoint<E>;

    fn transform(&self, ep: E) -> Self::Output {
        TrimSlashesEndpoint(ep)
    }
}

struct TrimSlashesEndpoint<E>(E);

impl<E: Endpoint> Endpoint for TrimSlashesEndpoint<E> {
    type Output = E::Output;

    async fn call(&self, mut req: poem::Request) -> poem::Result<Self::Output> {
        if let Some(path) = normalized_path(req.uri().path()) {
            let (mut parts, body) = req.into_parts();
            let mut uri = parts.uri.into_parts();
            let path_and_query = match uri.path_and_query.as_ref().and_then(|pq| pq.query()) {
                Some(query) => format!("{path}?{query}"),
                None => path,
            };
            uri.path_and_query = path_and_query.parse().ok();
            parts.uri = poem::http::Uri::from_parts(uri).map_err(poem::error::BadRequest)?;
            req = poem::Request::from_parts(parts, body);
        }
        self.0.call(req).await
    }
}

/// `path` without trailing slashes and with runs of slashes merged, if that changes it.
fn normalized_path(path: &str) -> Option<String> {
    let trailing = path.len() > 1 && path.ends_with('/');
    if !trailing && !path.contains("//") {
        return None;
    }
    let mut out = String::with_capacity(path.len());
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    (out != path).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::{layered, normalized_path};

    #[tokio::test]
    async fn a_panicking_handler_answers_500_in_the_one_error_shape_and_is_counted() {
        let metrics = crate::metrics::ApiMetrics::new();
        let app = layered(
            poem::endpoint::make(|_req: poem::Request| async move {
                let offset: i64 = "9000000000000000".parse().unwrap();
                let _ = chrono::Utc::now() - chrono::Duration::milliseconds(offset);
                Ok::<_, poem::Error>(poem::Response::default())
            }),
            metrics.clone(),
        );
        let resp = poem::test::TestClient::new(app)
            .post("/capture")
            .send()
            .await;
        resp.assert_status(poem::http::StatusCode::INTERNAL_SERVER_ERROR);
        let body: serde_json::Value =
            serde_json::from_str(&resp.0.into_body().into_string().await.unwrap()).unwrap();
        assert_eq!(body["type"], "server_error");
        assert_eq!(body["code"], "internal");
        assert_eq!(body["detail"], "internal server error");
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&metrics.registry.gather())
            .unwrap();
        assert!(text.contains("http_panics_total 1"), "{text}");
        assert!(
            text.contains(r#"http_requests_total{method="POST",route="other",status="500"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn trailing_and_repeated_slashes_are_normalized() {
        assert_eq!(normalized_path("/batch"), None);
        assert_eq!(normalized_path("/"), None);
        assert_eq!(normalized_path("/batch/").as_deref(), Some("/batch"));
        assert_eq!(normalized_path("/i/v0/e//").as_deref(), Some("/i/v0/e"));
        assert_eq!(
            normalized_path("//context//user/u1").as_deref(),
            Some("/context/user/u1")
        );
        assert_eq!(normalized_path("///").as_deref(), Some("/"));
    }
}
