//! PostHog capture protocol: `/capture`, `/batch`, `/e`, `/i/v0/e`, `/track` (trailing slash
//! optional), POST with any body encoding PostHog SDKs use, or GET `?data=` (legacy beacon).

use std::collections::HashMap;

use poem::web::Data;
use poem_openapi::{
    ApiResponse, Object, OpenApi, Union, auth::ApiKey, param::Query, payload::Json,
};
use serde_json::Value;

use super::ApiTags;
use crate::{
    http::{
        auth::{API_KEY_HEADER, Access, ApiKeyHeader, CaptureAuth},
        body::{BodyDoc, Held, RawBody},
        error::{ApiError, ErrorBody, error_responses},
    },
    ingest::{
        decode::Compression,
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

#[derive(ApiResponse)]
pub enum CaptureResponse {
    /// Every event of the request is queued in Redis.
    #[oai(status = 200)]
    Ok(Json<CaptureOk>),
    /// Malformed body (JSON, gzip, base64) or an invalid event; `attr` names the field. Nothing was queued.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No API key in the header or the body.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// Unknown API key.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// Body, or its decompressed form, over `MAX_BODY_BYTES`.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// Redis unreachable or slow, or the stream backlog over `STREAM_MAX_BACKLOG`: retry after the given seconds.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
    /// Unexpected server error.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
}
error_responses!(CaptureResponse { 400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 413 => PayloadTooLarge }, retry = Unavailable);

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
        data: Option<String>,
        compression: Option<String>,
    ) -> CaptureResponse {
        let result = async {
            let data = data.ok_or_else(|| {
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

/// A `POST` to a capture path, answered without the OpenAPI router: the request every SDK sends
/// all day. The documented operations below run the same [`CaptureApi::post`] with the same
/// extractors' results; this only skips the routing layers between (a quarter to a third of
/// the api's CPU per single-event request). Query parameters other than `compression` are
/// ignored, as there.
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

async fn respond(
    state: &AppState,
    result: impl Future<Output = Result<(CaptureOk, usize), ApiError>>,
) -> CaptureResponse {
    let result = result.await;
    state.metrics.ingest("capture", &result);
    result.map_or_else(CaptureResponse::from, |(ok, _)| {
        CaptureResponse::Ok(Json(ok))
    })
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
) -> Result<(CaptureOk, usize), ApiError> {
    let body_key = match auth.header_key() {
        Some(key) => {
            state.keys.authorize(Some(key), Access::Ingest)?;
            BodyKey::Ignored
        }
        None => BodyKey::MustBeIngestKey,
    };
    let compression = Compression::parse(compression.as_deref())?;
    let (events, _held) =
        intake::events(state, encoded, compression, source, body_key, held).await?;
    state.publisher.publish(&events).await?;
    tracing::debug!(events = events.len(), "queued");
    Ok((CaptureOk { status: 1 }, events.len()))
}

#[OpenApi(tag = "ApiTags::Capture")]
impl CaptureApi {
    /// Capture events (PostHog `/capture`)
    ///
    /// The PostHog capture endpoint: point an SDK's `host`/`api_host` here. The key may come in
    /// `X-API-Key` or as `api_key`/`token` in the body (`properties.token` for posthog-js).
    #[oai(path = "/capture", method = "post")]
    async fn capture(
        &self,
        state: Data<&AppState>,
        auth: CaptureAuth,
        body: Body,
        compression: Query<Option<String>>,
    ) -> CaptureResponse {
        self.post(&state, auth, body, compression.0).await
    }

    /// Capture a batch (PostHog `/batch`)
    #[oai(path = "/batch", method = "post")]
    async fn batch(
        &self,
        state: Data<&AppState>,
        auth: CaptureAuth,
        body: Body,
        compression: Query<Option<String>>,
    ) -> CaptureResponse {
        self.post(&state, auth, body, compression.0).await
    }

    /// Capture events (posthog-js `/e`)
    #[oai(path = "/e", method = "post")]
    async fn e(
        &self,
        state: Data<&AppState>,
        auth: CaptureAuth,
        body: Body,
        compression: Query<Option<String>>,
    ) -> CaptureResponse {
        self.post(&state, auth, body, compression.0).await
    }

    /// Capture events (posthog-js `/i/v0/e`)
    #[oai(path = "/i/v0/e", method = "post")]
    async fn i_v0_e(
        &self,
        state: Data<&AppState>,
        auth: CaptureAuth,
        body: Body,
        compression: Query<Option<String>>,
    ) -> CaptureResponse {
        self.post(&state, auth, body, compression.0).await
    }

    /// Capture events (legacy `/track`)
    #[oai(path = "/track", method = "post")]
    async fn track(
        &self,
        state: Data<&AppState>,
        auth: CaptureAuth,
        body: Body,
        compression: Query<Option<String>>,
    ) -> CaptureResponse {
        self.post(&state, auth, body, compression.0).await
    }

    /// Capture via query string (legacy beacon, `/capture?data=`)
    ///
    /// `data` holds the body base64-encoded (or URL-encoded JSON).
    #[oai(path = "/capture", method = "get")]
    async fn capture_get(
        &self,
        state: Data<&AppState>,
        auth: CaptureAuth,
        data: Query<Option<String>>,
        compression: Query<Option<String>>,
    ) -> CaptureResponse {
        self.get(&state, auth, data.0, compression.0).await
    }

    /// Capture via query string (`/batch?data=`)
    #[oai(path = "/batch", method = "get")]
    async fn batch_get(
        &self,
        state: Data<&AppState>,
        auth: CaptureAuth,
        data: Query<Option<String>>,
        compression: Query<Option<String>>,
    ) -> CaptureResponse {
        self.get(&state, auth, data.0, compression.0).await
    }

    /// Capture via query string (`/e?data=`)
    #[oai(path = "/e", method = "get")]
    async fn e_get(
        &self,
        state: Data<&AppState>,
        auth: CaptureAuth,
        data: Query<Option<String>>,
        compression: Query<Option<String>>,
    ) -> CaptureResponse {
        self.get(&state, auth, data.0, compression.0).await
    }

    /// Capture via query string (`/i/v0/e?data=`)
    #[oai(path = "/i/v0/e", method = "get")]
    async fn i_v0_e_get(
        &self,
        state: Data<&AppState>,
        auth: CaptureAuth,
        data: Query<Option<String>>,
        compression: Query<Option<String>>,
    ) -> CaptureResponse {
        self.get(&state, auth, data.0, compression.0).await
    }

    /// Capture via query string (`/track?data=`)
    #[oai(path = "/track", method = "get")]
    async fn track_get(
        &self,
        state: Data<&AppState>,
        auth: CaptureAuth,
        data: Query<Option<String>>,
        compression: Query<Option<String>>,
    ) -> CaptureResponse {
        self.get(&state, auth, data.0, compression.0).await
    }
}
