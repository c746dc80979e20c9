//! PostHog capture protocol: `/capture`, `/batch`, `/e`, `/i/v0/e`, `/track` (trailing slash
//! optional), POST with any body encoding PostHog SDKs use, or GET `?data=` (legacy beacon).

use std::collections::HashMap;

use poem::web::Data;
use poem_openapi::{Object, OpenApi, Union, auth::ApiKey, param::Query, payload::Json};
use serde_json::Value;

use super::ApiTags;
use crate::{
    http::{
        auth::{API_KEY_HEADER, Access, ApiKeyHeader, CaptureAuth},
        body::{BodyDoc, RawBody},
        error::{ApiError, responses},
    },
    ingest::{
        decode::Compression,
        inflight::Held,
        intake::{self, BodyKey, Encoded},
    },
    state::AppState,
};

/// One event as PostHog SDKs send it.
#[derive(Object)]
#[oai(example)]
pub struct CaptureEvent {
    /// Event name (required, non-empty), e.g. `$pageview`, `$autocapture`, `signup_completed`.
    pub event: String,
    /// The user (required; `$distinct_id` or `properties.distinct_id` also work; numbers are
    /// turned into strings; at most 200 characters).
    pub distinct_id: Option<String>,
    /// Event properties: `$current_url`, `$pathname`, `$session_id`, `$elements_chain`, …
    pub properties: Option<HashMap<String, Value>>,
    /// When it happened (RFC 3339). Omitted: the time it was received.
    pub timestamp: Option<String>,
    /// Idempotency key. Omitted: a UUIDv7 is generated.
    pub uuid: Option<String>,
    /// Client send time: with `timestamp`, corrects the client's clock skew.
    pub sent_at: Option<String>,
    /// Milliseconds before sending that the event happened (instead of `timestamp`).
    pub offset: Option<i64>,
    /// Project key, when not sent in `X-API-Key`.
    pub api_key: Option<String>,
}

impl poem_openapi::types::Example for CaptureEvent {
    fn example() -> Self {
        Self {
            event: "$pageview".into(),
            distinct_id: Some("user_1".into()),
            properties: Some(HashMap::from([
                (
                    "$current_url".into(),
                    Value::from("https://shop.example/pricing"),
                ),
                ("$pathname".into(), Value::from("/pricing")),
                ("$session_id".into(), Value::from("0190b5d6-session")),
            ])),
            timestamp: Some("2026-11-28T10:15:00Z".into()),
            uuid: None,
            sent_at: None,
            offset: None,
            api_key: Some("phc_ingest_key".into()),
        }
    }
}

/// A batch as posthog-python, posthog-node and posthog-js send it.
#[derive(Object)]
pub struct CaptureBatch {
    /// Project key (`token` is accepted too), when not sent in `X-API-Key`.
    pub api_key: Option<String>,
    /// Same as `api_key`.
    pub token: Option<String>,
    /// Client send time, applied to every event for clock-skew correction.
    pub sent_at: Option<String>,
    /// The events; one invalid event rejects the whole batch.
    pub batch: Vec<CaptureEvent>,
}

/// Any body shape the PostHog SDKs send.
#[derive(Union)]
#[oai(one_of)]
pub enum CaptureRequest {
    Batch(CaptureBatch),
    Event(CaptureEvent),
    Events(Vec<CaptureEvent>),
}

/// Body documentation for the capture routes.
pub struct CaptureDoc;
impl BodyDoc for CaptureDoc {
    type Json = CaptureRequest;
    const DESCRIPTION: &'static str = "One event, `{\"api_key\", \"batch\": [...], \"sent_at\"}`, or an array of \
        events; as JSON, gzip (recognised by its bytes, whatever the Content-Type), base64, or form-urlencoded \
        `data=` with optional `compression=base64|gzip-js`. At most `MAX_BODY_BYTES`, decompressed too.";
    const POSTHOG_ENCODINGS: bool = true;
}

/// PostHog's success answer; SDKs treat anything else as a failure and retry.
#[derive(Object, serde::Deserialize)]
pub struct CaptureOk {
    /// Always `1`.
    pub status: i32,
}

responses! {
    pub enum CaptureResponse {
        /// Every event of the request is queued in Redis.
        Ok(Json<CaptureOk>),
        /// Malformed body (JSON, gzip, base64) or an invalid event; `attr` names the field. Nothing was queued.
        400 BadRequest,
        /// No API key in the header or the body.
        401 Unauthorized,
        /// Unknown API key.
        403 Forbidden,
        /// Body, or its decompressed form, over `MAX_BODY_BYTES`.
        413 PayloadTooLarge,
        /// Redis unreachable or slow, or the stream backlog over `STREAM_MAX_BACKLOG`: retry after the given seconds.
        503 Unavailable(u32),
    }
}

/// The PostHog capture routes.
pub struct CaptureApi;

type Body = RawBody<CaptureDoc>;

impl CaptureApi {
    async fn post(
        &self,
        state: &AppState,
        auth: CaptureAuth,
        body: Body,
        compression: Option<String>,
    ) -> CaptureResponse {
        let encoded = Encoded::Body {
            bytes: body.bytes,
            content_type: body.content_type,
        };
        respond(
            state,
            accept(state, auth, encoded, compression, None, body.held),
        )
        .await
    }

    async fn get(
        &self,
        state: &AppState,
        auth: CaptureAuth,
        data: Query<Option<String>>,
        compression: Option<String>,
    ) -> CaptureResponse {
        let result = async {
            let data = data.0.ok_or_else(|| {
                ApiError::invalid("required", "query parameter `data` is required").at("data")
            })?;
            if data.len() > state.config.max_body_bytes {
                let err =
                    ApiError::too_large(state.config.max_body_bytes, "query parameter `data`");
                return Err(err.at("data"));
            }
            let held = state.inflight.hold(data.len())?;
            accept(
                state,
                auth,
                Encoded::Query(data),
                compression,
                Some("data"),
                held,
            )
            .await
        };
        respond(state, result).await
    }
}

/// A `POST` to a capture path, answered without the OpenAPI router's layers, which are costly on
/// the request every SDK sends all day. It runs the same [`CaptureApi::post`] as the documented
/// operations, with the same extractors' results (and likewise ignores query parameters other
/// than `compression`).
pub async fn post_direct(state: &AppState, mut req: poem::Request) -> poem::Response {
    use poem::{IntoResponse, error::ResponseError};
    let auth = match req
        .headers()
        .get(API_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some(key) => CaptureAuth::Header(ApiKeyHeader(ApiKey {
            key: key.to_string(),
        })),
        None => CaptureAuth::InBody,
    };
    let compression = match req.uri().query() {
        None => None,
        Some(_) => req
            .params::<Vec<(String, String)>>()
            .unwrap_or_default()
            .into_iter()
            .find(|(name, _)| name == "compression")
            .map(|(_, value)| value),
    };
    let body = req.take_body();
    let read = Body::read(&req, body, state.config.max_body_bytes, &state.inflight).await;
    let mut response = match read {
        Ok(body) => CaptureApi
            .post(state, auth, body, compression)
            .await
            .into_response(),
        Err(err) => err.as_response(),
    };
    // The route label of metrics and spans, as the router would set it.
    response.set_data(poem::PathPattern(req.uri().path().into()));
    response
}

/// Counts the outcome of a capture request and answers it.
async fn respond(
    state: &AppState,
    result: impl Future<Output = Result<usize, ApiError>>,
) -> CaptureResponse {
    let result = result.await;
    state.metrics.ingest("capture", result.as_ref().copied());
    result.map(|_| Json(CaptureOk { status: 1 })).into()
}

/// Authorises, decodes, validates and queues a capture request. A key in the header is checked
/// before the body is looked at; otherwise the key the body carries is checked as soon as the
/// body is tokenised, before any event is validated or built. `source` names the parameter the
/// JSON came from, if not the body.
async fn accept(
    state: &AppState,
    auth: CaptureAuth,
    encoded: Encoded,
    compression: Option<String>,
    source: Option<&'static str>,
    held: Held,
) -> Result<usize, ApiError> {
    let body_key = match auth.header_key() {
        Some(key) => {
            state.keys.authorize(Some(key), Access::Ingest)?;
            BodyKey::Ignored
        }
        None => BodyKey::MustBeIngestKey,
    };
    let compression = Compression::parse(compression.as_deref())?;
    let events = intake::queue(state, encoded, compression, source, body_key, held).await?;
    tracing::debug!(events = events.len(), "queued");
    Ok(events.len())
}

/// The documented capture operations, each a line `"method" "path" => name(input: Type) runner;`
/// that runs [`CaptureApi::post`] or [`CaptureApi::get`] with the input.
macro_rules! capture_operations {
    ($(
        $(#[doc = $doc:literal])*
        $method:literal $path:literal => $name:ident($input:ident: $ty:ty) $run:ident;
    )*) => {
        #[OpenApi(tag = "ApiTags::Capture")]
        impl CaptureApi {
            $(
                $(#[doc = $doc])*
                #[oai(path = $path, method = $method)]
                async fn $name(
                    &self,
                    state: Data<&AppState>,
                    auth: CaptureAuth,
                    $input: $ty,
                    compression: Query<Option<String>>,
                ) -> CaptureResponse {
                    self.$run(&state, auth, $input, compression.0).await
                }
            )*
        }
    };
}

capture_operations! {
    /// Capture events (PostHog `/capture`)
    ///
    /// The PostHog capture endpoint: point an SDK's `host`/`api_host` here. The key may come in
    /// `X-API-Key` or as `api_key`/`token` in the body (`properties.token` for posthog-js).
    "post" "/capture" => capture(body: Body) post;
    /// Capture a batch (PostHog `/batch`)
    "post" "/batch" => batch(body: Body) post;
    /// Capture events (posthog-js `/e`)
    "post" "/e" => e(body: Body) post;
    /// Capture events (posthog-js `/i/v0/e`)
    "post" "/i/v0/e" => i_v0_e(body: Body) post;
    /// Capture events (legacy `/track`)
    "post" "/track" => track(body: Body) post;
    /// Capture via query string (legacy beacon, `/capture?data=`)
    ///
    /// `data` holds the body base64-encoded (or URL-encoded JSON).
    "get" "/capture" => capture_get(data: Query<Option<String>>) get;
    /// Capture via query string (`/batch?data=`)
    "get" "/batch" => batch_get(data: Query<Option<String>>) get;
    /// Capture via query string (`/e?data=`)
    "get" "/e" => e_get(data: Query<Option<String>>) get;
    /// Capture via query string (`/i/v0/e?data=`)
    "get" "/i/v0/e" => i_v0_e_get(data: Query<Option<String>>) get;
    /// Capture via query string (`/track?data=`)
    "get" "/track" => track_get(data: Query<Option<String>>) get;
}
