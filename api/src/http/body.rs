//! Raw request bodies for the ingest routes: read with the `MAX_BODY_BYTES` limit, whatever the
//! `Content-Type` (PostHog SDKs label gzip as `text/plain`), then decoded by [`crate::ingest::decode`].

use std::{marker::PhantomData, time::Duration};

use bytes::{Bytes, BytesMut};
use poem::{Request, RequestBody, http::header};
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ExtractParamOptions,
    registry::{MetaMediaType, MetaRequest, MetaSchema, MetaSchemaRef, Registry},
    types::Type,
};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::error::ApiError;
use crate::{
    ingest::inflight::{Held, InFlight},
    state::AppState,
};

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
