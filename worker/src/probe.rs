//! The worker's own small HTTP port (`WORKER_METRICS_BIND`): `/metrics` (Prometheus text),
//! `/health` (alive) and `/ready` (Redis, Postgres and rules, each by name; 503 when one is down
//! or from the moment shutdown begins).

use std::{net::SocketAddr, sync::Arc};

use infra::health::{Readiness, ping_dependencies};
use poem::{
    EndpointExt, Response, Route, Server, get, handler, http::StatusCode, listener::TcpAcceptor,
    web::Data,
};
use sea_orm::DatabaseConnection;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use rules_engine::RulesHandle;

use crate::{Config, WorkerError, metrics::WorkerMetrics};

/// What the probes look at.
#[derive(Clone)]
pub struct Probe {
    pub config: Config,
    pub redis: infra::redis::RedisConn,
    pub db: DatabaseConnection,
    pub rules: Option<RulesHandle>,
    pub metrics: Arc<WorkerMetrics>,
    pub shutdown: CancellationToken,
}

/// Listens on `addr` (`WORKER_METRICS_BIND`). When the address is only the default and is taken
/// (another replica on this host), a free port of the same interface serves instead.
pub async fn bind(addr: SocketAddr, is_default: bool) -> Result<TcpListener, WorkerError> {
    let listener = match TcpListener::bind(addr).await {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && is_default => {
            let listener = TcpListener::bind((addr.ip(), 0)).await;
            if let Ok(l) = &listener {
                tracing::warn!(
                    taken = %addr,
                    serving = ?l.local_addr().ok(),
                    "the default WORKER_METRICS_BIND port is taken (another replica on this host?): \
                     serving health and metrics on a free port; set WORKER_METRICS_BIND to choose one"
                );
            }
            listener
        }
        other => other,
    };
    listener.map_err(|e| {
        WorkerError::Stopped(format!("WORKER_METRICS_BIND: cannot listen on {addr}: {e}"))
    })
}

/// Serves the probes on `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, probe: Probe) {
    let addr = listener.local_addr().ok();
    let acceptor = match TcpAcceptor::from_tokio(listener) {
        Ok(acceptor) => acceptor,
        Err(error) => {
            tracing::error!(%error, "cannot serve worker metrics");
            return;
        }
    };
    tracing::info!(addr = ?addr, "worker metrics and health listening");
    let app = Route::new()
        .at("/metrics", get(metrics))
        .at("/health", get(health))
        .at("/ready", get(ready))
        .data(probe);
    if let Err(error) = Server::new_with_acceptor(acceptor).run(app).await {
        tracing::error!(%error, "worker metrics server stopped");
    }
}

#[handler]
async fn metrics(probe: Data<&Probe>) -> Response {
    let m = &probe.metrics;
    m.queue
        .refresh(&probe.redis, &probe.config.shards(), &probe.config.dlq_name)
        .await;
    let (body, content_type) = infra::metrics::render(&m.registry);
    Response::builder().content_type(content_type).body(body)
}

#[handler]
fn health() -> Response {
    json_response(StatusCode::OK, json!({"status": "ok"}))
}

#[handler]
async fn ready(probe: Data<&Probe>) -> Response {
    let (redis, postgres) = ping_dependencies(&probe.redis, &probe.db).await;
    // As on the api: a field without a value is left out, never `null`.
    let check = |name: &str, result: Result<(), String>| match result {
        Ok(()) => json!({"name": name, "ok": true}),
        Err(error) => json!({"name": name, "ok": false, "error": error}),
    };
    let mut checks = vec![check("redis", redis), check("postgres", postgres)];
    if let Some(rules) = &probe.rules {
        // Rules are loaded once the worker runs; a failed reload keeps the previous set in force.
        let status = rules.status();
        let mut check = json!({"name": "rules", "ok": true, "version": status.version});
        if let Some(error) = status.error {
            check["last_reload_error"] = error.into();
        }
        checks.push(check);
    }
    let all_ok = checks.iter().all(|c| c["ok"] == Value::Bool(true));
    let status = Readiness::of(probe.shutdown.is_cancelled(), all_ok);
    let code = if status == Readiness::Ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(code, json!({"status": status.as_str(), "checks": checks}))
}

fn json_response(status: StatusCode, body: Value) -> Response {
    Response::builder()
        .status(status)
        .content_type("application/json")
        .body(body.to_string())
}
