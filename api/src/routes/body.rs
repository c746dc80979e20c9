//! Raw request bodies for the ingest routes: read with the `MAX_BODY_BYTES` limit, whatever the
//! `Content-Type` (PostHog SDKs label gzip as `text/plain`), then decoded by [`crate::decode`].

use std::marker::PhantomData;

use bytes::Bytes;
use poem::{Request, RequestBody, error::ReadBodyError, http::header};
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ExtractParamOptions,
    registry::{MetaMediaType, MetaRequest, MetaSchema, MetaSchemaRef, Registry},
    types::Type,
};

use crate::{error::ApiError, state::AppState};

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
        let limit = req
            .data::<AppState>()
            .map(|s| s.config.max_body_bytes)
            .unwrap_or(usize::MAX);
        Ok(Self::read(req, body.take()?, limit).await?)
    }
}

impl<D> RawBody<D> {
    /// Reads the body of `req`, refusing more than `limit` bytes (declared or sent).
    pub async fn read(req: &Request, body: poem::Body, limit: usize) -> Result<Self, ApiError> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|len| len > limit) {
            return Err(ApiError::too_large(limit, "request body"));
        }
        let bytes = body.into_bytes_limit(limit).await.map_err(|e| match e {
            ReadBodyError::PayloadTooLarge => ApiError::too_large(limit, "request body"),
            other => ApiError::invalid(
                "unreadable_body",
                format!("request body could not be read: {other}"),
            ),
        })?;
        Ok(Self {
            bytes,
            content_type: req.content_type().map(str::to_string),
            _doc: PhantomData,
        })
    }
}
