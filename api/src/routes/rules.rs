//! `GET /rules/unmatched`: the events no rule describes, most frequent first (every worker
//! replica contributes), so a rule author knows which translation to write next.

use poem::web::Data;
use poem_openapi::{Object, OpenApi, param::Query, payload::Json};
use serde_json::Value;

use super::ApiTags;
use crate::{
    http::{
        auth::{Access, ApiKeyHeader},
        error::{ApiError, responses},
    },
    state::AppState,
};

/// Most shapes one request returns.
const MAX_LIMIT: usize = 1000;

/// One kind of event no rule describes. Fields without a value are absent.
#[derive(Object, serde::Deserialize)]
#[oai(rename = "UnmatchedShape", skip_serializing_if_is_none)]
pub struct UnmatchedShapeView {
    /// Event name, e.g. `$autocapture` or `signup_completed`.
    pub event: String,
    /// Page path the events happened on, when they had one.
    pub path: Option<String>,
    /// For clicks: the clicked element's text.
    pub element_text: Option<String>,
    /// For clicks: the clicked element's CSS classes.
    pub element_classes: Option<String>,
    /// Events of this shape seen so far.
    pub count: u64,
    /// The first event of this shape (`event`, `distinct_id`, `properties`, `elements_chain`):
    /// save it to a file and run `worker rules explain <file>`.
    pub example: Option<Value>,
}

/// The report.
#[derive(Object, serde::Deserialize)]
#[oai(rename = "UnmatchedReport")]
pub struct UnmatchedReportView {
    /// How many distinct shapes are reported in all.
    pub total_shapes: u64,
    /// The most frequent shapes, most frequent first. A shape leaves the list once a
    /// (hot-reloaded) rule describes it.
    pub shapes: Vec<UnmatchedShapeView>,
}

impl From<rules_engine::UnmatchedShape> for UnmatchedShapeView {
    fn from(s: rules_engine::UnmatchedShape) -> Self {
        Self {
            event: s.event,
            path: s.path,
            element_text: s.element_text,
            element_classes: s.element_classes,
            count: s.count,
            example: s.example,
        }
    }
}

responses! {
    pub enum UnmatchedResponse {
        /// The most frequent unmatched shapes.
        Ok(Json<UnmatchedReportView>),
        /// A bad `limit`.
        400 BadRequest,
        /// No `X-API-Key` header.
        401 Unauthorized,
        /// Unknown key, or an ingest-only key.
        403 Forbidden,
        /// Redis is unavailable: retry after the given seconds.
        503 Unavailable(u32),
    }
}

pub struct RulesApi;

#[OpenApi(tag = "ApiTags::Rules")]
impl RulesApi {
    /// Events no rule describes
    ///
    /// The most frequent kinds of events (event name, page path, clicked element's text and
    /// classes) that got a fallback sentence, with counts and an example of each, across every
    /// worker replica. Secret key only.
    #[oai(path = "/rules/unmatched", method = "get")]
    async fn unmatched(
        &self,
        state: Data<&AppState>,
        auth: ApiKeyHeader,
        /// How many shapes to return (1–1000, default 20).
        limit: Query<Option<i64>>,
    ) -> UnmatchedResponse {
        let result = async {
            auth.authorize(&state.keys, Access::Read)?;
            let limit = match limit.0 {
                None => 20,
                Some(n) if (1..=MAX_LIMIT as i64).contains(&n) => n as usize,
                Some(n) => {
                    return Err(ApiError::invalid(
                        "out_of_range",
                        format!("limit must be between 1 and {MAX_LIMIT}, got {n}"),
                    )
                    .at("limit"));
                }
            };
            let (shapes, total_shapes) =
                tokio::time::timeout(state.config.redis_timeout, state.unmatched.top(limit))
                    .await
                    .map_err(|_| "timed out".to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map_err(|error| {
                        tracing::warn!(%error, "reading the unmatched-events report failed");
                        ApiError::unavailable(
                            "queue_unavailable",
                            "Redis is unavailable: retry later",
                            1,
                        )
                    })?;
            Ok(Json(UnmatchedReportView {
                total_shapes,
                shapes: shapes.into_iter().map(Into::into).collect(),
            }))
        };
        result.await.into()
    }
}
