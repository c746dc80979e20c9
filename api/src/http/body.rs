//! Raw request bodies for the ingest routes: read with the `MAX_BODY_BYTES` limit, whatever the
//! `Content-Type` (PostHog SDKs label gzip as `text/plain`), then decoded by [`crate::ingest::decode`].

use std::{marker::PhantomData, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use poem::{Request, RequestBody, http::header};
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ExtractParamOptions,
    registry::{MetaMediaType, MetaRequest, MetaSchema, MetaSchemaRef, Registry},
    types::Type,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use super::error::ApiError;
use crate::state::AppState;

/// Documents what a route's body may look like.
pub trait BodyDoc: Send {
    /// Type documented for `application/json`.
    type Json: Type;
    const DESCRIPTION: &'static str;
    /// Whether form-urlencoded `data=` and gzip/base64 bodies are documented too.
    const POSTHOG_ENCODINGS: bool;
}

/// The body of an ingest request, undecoded.
pub struct RawBody<D> {
    pub bytes: Bytes,
    pub content_type: Option<String>,
    /// The body's bytes in the in-flight budget; the request holds more as it decodes.
    pub held: Held,
    _doc: PhantomData<D>,
}

fn string_schema(format: &'static str) -> MetaSchemaRef {
    MetaSchemaRef::Inline(Box::new(MetaSchema {
        format: Some(format),
        ..MetaSchema::new("string")
    }))
}

impl<'a, D: BodyDoc> ApiExtractor<'a> for RawBody<D> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        D::Json::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        let mut content = vec![MetaMediaType {
            content_type: "application/json",
            schema: D::Json::schema_ref(),
        }];
        if D::POSTHOG_ENCODINGS {
            content.push(MetaMediaType {
                content_type: "text/plain",
                schema: string_schema("gzip | base64 | json"),
            });
            content.push(MetaMediaType {
                content_type: "application/x-www-form-urlencoded",
                schema: MetaSchemaRef::Inline(Box::new(MetaSchema {
                    description: Some(
                        "`data` = base64 (or URL-encoded JSON) of the body; `compression` = `base64` or `gzip-js`",
                    ),
                    ..MetaSchema::new("object")
                })),
            });
        }
        content.push(MetaMediaType {
            content_type: "application/octet-stream",
            schema: string_schema("binary"),
        });
        Some(MetaRequest {
            description: Some(D::DESCRIPTION),
            content,
            required: true,
        })
    }

    async fn from_request(
        req: &'a Request,
        body: &mut RequestBody,
        _opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        let state = req
            .data::<AppState>()
            .expect("the ingest routes run with the app state");
        Ok(Self::read(
            req,
            body.take()?,
            state.config.max_body_bytes,
            &state.inflight,
        )
        .await?)
    }
}

impl<D> RawBody<D> {
    /// Reads the body of `req`, refusing more than `limit` bytes (declared or sent), holding its
    /// bytes in `inflight` as they arrive. A body refused part way is drained (a bounded
    /// amount) before the answer, so a client still writing it reads the answer instead of a
    /// broken connection.
    pub async fn read(
        req: &Request,
        body: poem::Body,
        limit: usize,
        inflight: &InFlight,
    ) -> Result<Self, ApiError> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let mut reader = body.into_async_read();
        let refused = |reader, err| refuse(req, reader, limit, err);
        if declared.is_some_and(|len| len > limit) {
            return Err(refused(reader, ApiError::too_large(limit, "request body")).await);
        }
        let mut held = match inflight.hold(declared.unwrap_or(0)) {
            Ok(held) => held,
            Err(err) => return Err(refused(reader, err).await),
        };
        let mut bytes = BytesMut::with_capacity(declared.unwrap_or(READ_CHUNK).min(limit));
        loop {
            if bytes.len() == bytes.capacity() {
                bytes.reserve(READ_CHUNK);
            }
            match reader.read_buf(&mut bytes).await {
                Ok(0) => break,
                Ok(_) if bytes.len() > limit => {
                    let err = ApiError::too_large(limit, "request body");
                    return Err(refused(reader, err).await);
                }
                Ok(_) => {
                    if let Err(err) = held.grow_to(bytes.len()) {
                        return Err(refused(reader, err).await);
                    }
                }
                Err(e) => {
                    return Err(ApiError::invalid(
                        "unreadable_body",
                        format!("request body could not be read: {e}"),
                    ));
                }
            }
        }
        Ok(Self {
            bytes: bytes.freeze(),
            content_type: req.content_type().map(str::to_string),
            held,
            _doc: PhantomData,
        })
    }
}

/// Bytes read at a time while a body arrives.
const READ_CHUNK: usize = 64 * 1024;
/// The most of a refused body read (and dropped) before answering, and the longest it may take.
const DRAIN_BYTES: u64 = 64 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// `err` for a body read no further, after draining what the client is still sending (up to
/// [`DRAIN_BYTES`] within [`DRAIN_TIME`]): clients such as Python's `requests` write the whole
/// body before they read, and a connection closed under them reports a broken pipe, not the
/// answer. A client waiting for `100 Continue` has sent nothing, and is answered at once.
async fn refuse(
    req: &Request,
    mut reader: impl AsyncRead + Unpin,
    limit: usize,
    err: ApiError,
) -> ApiError {
    let expects_continue = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects_continue {
        let mut rest = (&mut reader).take(DRAIN_BYTES.max(2 * limit as u64));
        let mut sink = tokio::io::sink();
        let _ = tokio::time::timeout(DRAIN_TIME, tokio::io::copy(&mut rest, &mut sink)).await;
    }
    err
}

/// The bytes that ingest requests hold at once, across all of them (`INGEST_MAX_INFLIGHT_BYTES`):
/// bodies as they are read, their decoded text and their envelopes. A request that would pass
/// the bound is answered 503 with `Retry-After` (SDKs retry) instead of growing memory.
#[derive(Clone)]
pub struct InFlight(Arc<Semaphore>);

impl InFlight {
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))))
    }

    /// Holds `bytes` more, or answers 503 at once.
    pub fn hold(&self, bytes: usize) -> Result<Held, ApiError> {
        let mut held = Held {
            budget: self.0.clone(),
            permit: None,
            bytes: 0,
        };
        held.grow_to(bytes)?;
        Ok(held)
    }
}

/// Bytes one request holds in [`InFlight`], given back when it is dropped.
pub struct Held {
    budget: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Held {
    /// Holds `more` bytes beside those held already.
    pub fn grow(&mut self, more: usize) -> Result<(), ApiError> {
        self.grow_to(self.bytes + more)
    }

    /// Holds at least `bytes` in all.
    pub fn grow_to(&mut self, bytes: usize) -> Result<(), ApiError> {
        let Some(more) = bytes.checked_sub(self.bytes).filter(|&n| n > 0) else {
            return Ok(());
        };
        let busy = || {
            ApiError::unavailable(
                "ingest_busy",
                "the api is holding as many request bytes as it may (INGEST_MAX_INFLIGHT_BYTES): send again shortly",
                1,
            )
        };
        let more_u32 = u32::try_from(more).map_err(|_| busy())?;
        let permit = self
            .budget
            .clone()
            .try_acquire_many_owned(more_u32)
            .map_err(|_| busy())?;
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
        self.bytes = bytes;
        Ok(())
    }
}
