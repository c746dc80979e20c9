//! From an ingest request's bytes to events in the stream, as cheaply as a hostile sender
//! allows: decoded and tokenised, the key a body carries checked before any event is validated
//! or built, every step's bytes held in the in-flight budget, and large bodies worked on off the
//! async threads, where their CPU time holds up no other request.

use std::borrow::Cow;

use bytes::Bytes;
use chrono::Utc;

use super::{
    decode::{Compression, decode_body_bytes, decode_query_data},
    parse::{self, Queued},
};
use crate::{
    http::{
        auth::{Access, KeySource},
        error::ApiError,
    },
    ingest::inflight::Held,
    state::AppState,
};

/// Request bytes that are worked on off the async threads: anything larger than this, or
/// anything encoded (gzip, base64, form) larger than [`OFF_THREAD_ENCODED`].
const OFF_THREAD_PLAIN: usize = 64 * 1024;
const OFF_THREAD_ENCODED: usize = 4 * 1024;

/// What an ingest request sent.
pub enum Encoded {
    /// A body, undecoded.
    Body {
        bytes: Bytes,
        content_type: Option<String>,
    },
    /// The legacy `?data=` parameter.
    Query(String),
}

impl Encoded {
    fn bytes(&self) -> &[u8] {
        match self {
            Encoded::Body { bytes, .. } => bytes,
            Encoded::Query(data) => data.as_bytes(),
        }
    }

    fn decode(&self, compression: Compression, limit: usize) -> Result<Cow<'_, [u8]>, ApiError> {
        match self {
            Encoded::Body {
                bytes,
                content_type,
            } => decode_body_bytes(bytes, content_type.as_deref(), compression, limit),
            Encoded::Query(data) => decode_query_data(data, compression, limit).map(Cow::Owned),
        }
    }

    /// Whether decoding it may take long enough to hold up other requests on its thread.
    fn is_heavy(&self) -> bool {
        let bytes = self.bytes();
        let plain_json = matches!(
            bytes.iter().find(|b| !b.is_ascii_whitespace()),
            Some(b'{' | b'[')
        );
        bytes.len() > OFF_THREAD_PLAIN || (!plain_json && bytes.len() > OFF_THREAD_ENCODED)
    }
}

/// Whose key a body carries must be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKey {
    /// The request's header key was checked already: a key in the body is not looked at.
    Ignored,
    /// The body's key must be an ingest key (the secret key is refused there).
    MustBeIngestKey,
}

/// Queues the events of `encoded` in the stream, all of them or none, holding their bytes in the
/// in-flight budget until then; `source` names the parameter the JSON came from, when not the body.
pub async fn queue(
    state: &AppState,
    encoded: Encoded,
    compression: Compression,
    source: Option<&'static str>,
    body_key: BodyKey,
    held: Held,
) -> Result<Vec<Queued>, ApiError> {
    let (events, _held) = if encoded.is_heavy() {
        let worker = state.clone();
        tokio::task::spawn_blocking(move || {
            work(&worker, &encoded, compression, source, body_key, held)
        })
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(panic) => state.metrics.panicked(panic.as_ref()),
            Err(e) => ApiError::internal(e),
        })??
    } else {
        work(state, &encoded, compression, source, body_key, held)?
    };
    state.publisher.publish(&events).await?;
    Ok(events)
}

/// The events of `encoded`, and the bytes held for them.
fn work(
    state: &AppState,
    encoded: &Encoded,
    compression: Compression,
    source: Option<&str>,
    body_key: BodyKey,
    mut held: Held,
) -> Result<(Vec<Queued>, Held), ApiError> {
    let config = &state.config;
    let json = encoded.decode(compression, config.max_body_bytes)?;
    if let Cow::Owned(decoded) = &json {
        held.grow(decoded.len())?;
    }
    let events =
        parse::queue(
            &json,
            Utc::now(),
            source,
            config.max_event_bytes,
            |key| match body_key {
                BodyKey::Ignored => Ok(()),
                BodyKey::MustBeIngestKey => state
                    .keys
                    .authorize_from(key, Access::Ingest, KeySource::Body)
                    .map(drop),
            },
        )?;
    held.grow(events.iter().map(|e| e.json.len()).sum())?;
    Ok((events, held))
}
