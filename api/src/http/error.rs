//! One JSON error shape for every failure: `{"type", "code", "detail", "attr"}`.

use poem::{IntoResponse, Response, http::StatusCode};
use poem_openapi::{Object, error::ParseParamError, payload::Json};

/// Error body returned by every route on every failure.
// Fields without a value are left out, never `null`: the document is OpenAPI 3.0, where an
// unmarked field is not nullable, and clients generated from it reject a `null`.
#[derive(Object, Debug, Clone, PartialEq, serde::Deserialize)]
#[oai(example, skip_serializing_if_is_none)]
pub struct ErrorBody {
    /// Error family: `validation_error`, `authentication_error`, `not_found`, `unavailable` or `server_error`.
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub kind: String,
    /// Machine-readable reason, e.g. `required`, `invalid_json`, `payload_too_large`.
    pub code: String,
    /// Human-readable explanation.
    pub detail: String,
    /// The field at fault, as a path into the request (`batch[3].distinct_id`); absent when none is.
    pub attr: Option<String>,
}

impl poem_openapi::types::Example for ErrorBody {
    fn example() -> Self {
        Self {
            kind: "validation_error".into(),
            code: "required".into(),
            detail: "distinct_id is required".into(),
            attr: Some("batch[3].distinct_id".into()),
        }
    }
}

/// A failure on its way to becoming an HTTP response.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {} ({})", body.detail, body.code)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// Seconds for `Retry-After` on 503 answers.
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &str, code: &str, detail: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                kind: kind.into(),
                code: code.into(),
                detail: detail.into(),
                attr: None,
            },
            retry_after: None,
        }
    }

    /// 400 for a value that failed validation.
    pub fn invalid(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "validation_error", code, detail)
    }

    /// 401: no credentials at all.
    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "not_authenticated",
            "API key missing: send it in the X-API-Key header (PostHog routes also accept `api_key` or `token` in the body)",
        )
    }

    /// 403: credentials given but not good for this route.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "authentication_error",
            "permission_denied",
            detail,
        )
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "not_found", detail)
    }

    /// 413: body (or its decompressed form) over `MAX_BODY_BYTES`.
    pub fn too_large(limit: usize, what: &str) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "validation_error",
            "payload_too_large",
            format!("{what} is larger than the {limit} bytes allowed (MAX_BODY_BYTES)"),
        )
    }

    /// 413: one event's envelope over `MAX_EVENT_BYTES`.
    pub fn event_too_large(limit: usize, size: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "validation_error",
            "event_too_large",
            format!(
                "the event is {size} bytes once queued, more than the {limit} bytes allowed for one event (MAX_EVENT_BYTES)"
            ),
        )
    }

    /// 503 with `Retry-After`: the caller should send the same request again later.
    pub fn unavailable(code: &str, detail: impl Into<String>, retry_after: u32) -> Self {
        let mut err = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", code, detail);
        err.retry_after = Some(retry_after);
        err
    }

    /// 500: our fault; the detail is logged, not leaked.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal",
            "internal server error",
        )
    }

    /// Names the request field at fault.
    pub fn at(mut self, attr: impl Into<String>) -> Self {
        self.body.attr = Some(attr.into());
        self
    }

    /// Prefixes the field path, e.g. `distinct_id` inside batch item 3 becomes `batch[3].distinct_id`.
    pub fn within(mut self, prefix: &str) -> Self {
        self.body.attr = Some(match self.body.attr.take() {
            Some(attr) if attr.starts_with('[') => format!("{prefix}{attr}"),
            Some(attr) => format!("{prefix}.{attr}"),
            None => prefix.to_string(),
        });
        self
    }

    /// Maps any error poem or poem-openapi produced (bad query parameter, missing auth header,
    /// unknown route, …) onto the one error shape.
    pub fn from_poem(err: poem::Error) -> Self {
        if let Some(api) = err.downcast_ref::<ApiError>() {
            return api.clone();
        }
        let status = err.status();
        let detail = err.to_string();
        match status {
            StatusCode::UNAUTHORIZED => Self::unauthenticated(),
            StatusCode::NOT_FOUND => Self::not_found(format!("no such route: {detail}")),
            StatusCode::METHOD_NOT_ALLOWED => Self::new(
                status,
                "validation_error",
                "method_not_allowed",
                "method not allowed on this route",
            ),
            StatusCode::PAYLOAD_TOO_LARGE => {
                Self::new(status, "validation_error", "payload_too_large", detail)
            }
            s if s.is_client_error() => {
                let mut e = Self::new(s, "validation_error", "invalid_request", detail);
                e.body.attr = err
                    .downcast_ref::<ParseParamError>()
                    .map(|param| param.name.to_string());
                e
            }
            _ => Self::internal(detail),
        }
    }
}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        self.status
    }

    fn as_response(&self) -> Response {
        let mut resp = Json(self.body.clone()).into_response();
        resp.set_status(self.status);
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert("Retry-After", secs.into());
        }
        resp
    }
}

/// Declares an operation's response enum: its 200 variant and the error statuses it documents,
/// each answered with an [`ErrorBody`] (a variant written `Name(u32)` also sends `Retry-After`),
/// then `Internal` (500), which any operation may answer. `From<ApiError>` picks the variant of
/// the error's status, `Internal` for a status not listed; `From<Result<_, ApiError>>` answers
/// a handler's result.
macro_rules! responses {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $(#[doc = $ok_doc:literal])*
            Ok($ok:ty),
            $(
                $(#[doc = $doc:literal])*
                $status:literal $variant:ident $(($retry_after:ty))?,
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(poem_openapi::ApiResponse)]
        $vis enum $name {
            $(#[doc = $ok_doc])*
            #[oai(status = 200)]
            Ok($ok),
            $(
                $(#[doc = $doc])*
                #[oai(status = $status)]
                $variant(
                    poem_openapi::payload::Json<$crate::http::error::ErrorBody>
                    $(, #[oai(header = "Retry-After")] $retry_after)?
                ),
            )*
            /// Unexpected server error.
            #[oai(status = 500)]
            Internal(poem_openapi::payload::Json<$crate::http::error::ErrorBody>),
        }

        impl From<$crate::http::error::ApiError> for $name {
            fn from(err: $crate::http::error::ApiError) -> Self {
                let body = poem_openapi::payload::Json(err.body);
                match err.status.as_u16() {
                    $($status => $name::$variant(
                        body $(, <$retry_after>::from(err.retry_after.unwrap_or(1)))?
                    ),)*
                    _ => $name::Internal(body),
                }
            }
        }

        impl From<Result<$ok, $crate::http::error::ApiError>> for $name {
            fn from(result: Result<$ok, $crate::http::error::ApiError>) -> Self {
                result.map_or_else(Self::from, $name::Ok)
            }
        }
    };
}
pub(crate) use responses;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_paths_nest() {
        let e = ApiError::invalid("required", "x")
            .at("distinct_id")
            .within("batch[3]");
        assert_eq!(e.body.attr.as_deref(), Some("batch[3].distinct_id"));
        let e = ApiError::invalid("required", "x").at("[2]").within("batch");
        assert_eq!(e.body.attr.as_deref(), Some("batch[2]"));
    }

    #[test]
    fn a_bad_parameter_is_named() {
        let err = ApiError::from_poem(
            ParseParamError {
                name: "limit",
                reason: "oops".into(),
            }
            .into(),
        );
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.body.code, "invalid_request");
        assert_eq!(err.body.detail, "failed to parse parameter `limit`: oops");
        assert_eq!(err.body.attr.as_deref(), Some("limit"));
        let err = ApiError::from_poem(poem::Error::from_status(StatusCode::BAD_REQUEST));
        assert_eq!(err.body.attr, None);
    }
}
