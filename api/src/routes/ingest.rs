//! `POST /ingest`: plain JSON webhooks — the prototype's event (one or an array) and PostHog's
//! "HTTP Webhook" destination body `{"event": {...}, "person": {...}}`.

use std::collections::HashMap;

use poem::web::Data;
use poem_openapi::{Object, OpenApi, Union, payload::Json};
use serde_json::Value;

use super::{ApiTags, capture::CaptureEvent};
use crate::{
    http::{
        auth::{Access, ApiKeyHeader},
        body::{BodyDoc, RawBody},
        error::responses,
    },
    ingest::{
        decode::Compression,
        intake::{self, BodyKey, Encoded},
    },
    state::AppState,
};

/// The event part of PostHog's HTTP Webhook destination body.
#[derive(Object)]
pub struct WebhookEvent {
    pub uuid: Option<String>,
    pub event: String,
    pub distinct_id: String,
    pub properties: Option<HashMap<String, Value>>,
    /// PostHog's description of the clicked element and its ancestors (`$autocapture`).
    pub elements_chain: Option<String>,
    pub timestamp: Option<String>,
    /// Link to the event in PostHog (not stored).
    pub url: Option<String>,
}

/// The person part of PostHog's HTTP Webhook destination body.
#[derive(Object)]
pub struct WebhookPerson {
    pub id: Option<String>,
    /// Person properties (kept with the event: enrichment and context use them).
    pub properties: Option<HashMap<String, Value>>,
}

/// PostHog "HTTP Webhook" destination body (its default template).
#[derive(Object)]
pub struct PostHogWebhook {
    pub event: WebhookEvent,
    pub person: Option<WebhookPerson>,
}

/// Any body `/ingest` takes.
#[derive(Union)]
#[oai(one_of)]
pub enum IngestRequest {
    PostHogWebhook(PostHogWebhook),
    Event(CaptureEvent),
    Events(Vec<CaptureEvent>),
}

pub struct IngestDoc;
impl BodyDoc for IngestDoc {
    type Json = IngestRequest;
    const DESCRIPTION: &'static str = "One event, an array of events, or PostHog's HTTP Webhook destination body \
        `{\"event\": {...}, \"person\": {...}}`. JSON (gzip accepted too); at most `MAX_BODY_BYTES`.";
    const POSTHOG_ENCODINGS: bool = false;
}

/// What was queued.
#[derive(Object, serde::Deserialize)]
pub struct IngestOk {
    /// Always `1`, as on the PostHog routes.
    pub status: i32,
    /// How many events were queued.
    pub queued: u32,
    /// The events' ids (client-sent or generated here), in request order.
    pub uuids: Vec<String>,
}

responses! {
    pub enum IngestResponse {
        /// Every event is queued in Redis.
        Ok(Json<IngestOk>),
        /// Malformed JSON or an invalid event; `attr` names the field. Nothing was queued.
        400 BadRequest,
        /// No `X-API-Key` header.
        401 Unauthorized,
        /// Unknown API key.
        403 Forbidden,
        /// Body over `MAX_BODY_BYTES`.
        413 PayloadTooLarge,
        /// Redis unreachable or slow, or the backlog over `STREAM_MAX_BACKLOG`: retry after the given seconds.
        503 Unavailable(u32),
    }
}

pub struct IngestApi;

#[OpenApi(tag = "ApiTags::Webhooks")]
impl IngestApi {
    /// Ingest a webhook
    ///
    /// For servers and integrations: the key goes in `X-API-Key` (the secret key or an ingest key).
    #[oai(path = "/ingest", method = "post")]
    async fn ingest(
        &self,
        state: Data<&AppState>,
        auth: ApiKeyHeader,
        body: RawBody<IngestDoc>,
    ) -> IngestResponse {
        let result = async {
            auth.authorize(&state.keys, Access::Ingest)?;
            let encoded = Encoded::Body {
                bytes: body.bytes,
                content_type: None,
            };
            let held = body.held;
            intake::queue(
                &state,
                encoded,
                Compression::Auto,
                None,
                BodyKey::Ignored,
                held,
            )
            .await
        }
        .await;
        state
            .metrics
            .ingest("ingest", result.as_ref().map(Vec::len));
        result
            .map(|events| {
                Json(IngestOk {
                    status: 1,
                    queued: events.len() as u32,
                    uuids: events.iter().map(|e| e.uuid.to_string()).collect(),
                })
            })
            .into()
    }
}
