//! `GET /health` (the process is alive) and `GET /ready` (what ingest needs answers: Redis;
//! Postgres is reported beside it, and only the context routes need it).

use poem::web::Data;
use poem_openapi::{
    ApiResponse, Object, OpenApi,
    payload::{Json, PlainText},
};

use super::ApiTags;
use crate::state::AppState;

#[derive(Object, serde::Deserialize)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// `ENVIRONMENT`.
    pub environment: String,
    /// Build version.
    pub version: String,
}

/// One dependency's state.
#[derive(Object, serde::Deserialize)]
#[oai(skip_serializing_if_is_none)]
pub struct Check {
    /// `redis` or `postgres`.
    pub name: String,
    /// Whether it answered in time.
    pub ok: bool,
    /// Whether the api is ready only while it answers: `true` for Redis (every ingest route
    /// needs it), `false` for Postgres (only the context routes do; they answer 503
    /// `database_unavailable` while it is down, and ingest goes on).
    pub required: bool,
    /// The routes that answer 503 while it is down: `ingest` (`/capture`, `/batch`, `/e`,
    /// `/i/v0/e`, `/track`, `/ingest`), `context` (`GET` and `DELETE /context/user/{user_id}`),
    /// `erasure` (`DELETE /context/user/{user_id}` alone), `rules` (`/rules/unmatched`).
    pub affects: Vec<String>,
    /// When it did not: the dependency and the kind of failure, e.g. `redis: connection refused`,
    /// `postgres: timeout`, `redis: authentication failed`.
    pub error: Option<String>,
}

#[derive(Object, serde::Deserialize)]
pub struct Readiness {
    /// `ready`, `not_ready` or `shutting_down`.
    pub status: String,
    pub checks: Vec<Check>,
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// Every required dependency (Redis) answers; Postgres may be down (its check says so).
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// Redis is down, or shutdown has begun.
    #[oai(status = 503)]
    NotReady(Json<Readiness>),
}

pub struct HealthApi;

#[OpenApi(tag = "ApiTags::Health")]
impl HealthApi {
    /// Liveness
    #[oai(path = "/health", method = "get")]
    async fn health(&self, state: Data<&AppState>) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
            environment: state.config.environment.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
        })
    }

    /// Prometheus metrics
    ///
    /// Text exposition format: requests by route and status with latency histograms, events
    /// accepted and requests rejected by reason, XADD latency, and the queue: stream length,
    /// consumer-group lag and pending entries, DLQ length (read from Redis at each scrape).
    #[oai(path = "/metrics", method = "get")]
    async fn metrics(&self, state: Data<&AppState>) -> PlainText<String> {
        state
            .metrics
            .queue
            .refresh(
                &state.publisher.connection(),
                state.publisher.shards(),
                &state.config.dlq_name,
            )
            .await;
        PlainText(infra::metrics::render(&state.metrics.registry).0)
    }

    /// Readiness: Redis answers
    ///
    /// Ingest needs only Redis, so only Redis decides: with Postgres down the api stays ready
    /// (the stream absorbs the outage) and the context routes answer 503 until it is back. Both
    /// checks are listed, each with `required` and the routes it `affects`.
    #[oai(path = "/ready", method = "get")]
    async fn ready(&self, state: Data<&AppState>) -> ReadyResponse {
        let (redis, postgres) =
            infra::health::ping_dependencies(&state.publisher.connection(), &state.db).await;
        let checks = vec![
            Check {
                name: "redis".into(),
                ok: redis.is_ok(),
                required: true,
                affects: vec!["ingest".into(), "erasure".into(), "rules".into()],
                error: redis.err(),
            },
            Check {
                name: "postgres".into(),
                ok: postgres.is_ok(),
                required: false,
                affects: vec!["context".into()],
                error: postgres.err(),
            },
        ];
        let status = infra::health::Readiness::of(
            state.shutdown.is_cancelled(),
            checks.iter().all(|c| c.ok || !c.required),
        );
        let body = Json(Readiness {
            status: status.as_str().into(),
            checks,
        });
        if status == infra::health::Readiness::Ready {
            ReadyResponse::Ready(body)
        } else {
            ReadyResponse::NotReady(body)
        }
    }
}
