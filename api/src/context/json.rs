//! `SerdeJson<T>`: the context's JSON response body, written straight from `T`'s
//! `serde::Serialize` with the schema documented from `T`'s poem-openapi `Type`, skipping the
//! `serde_json::Value` tree of the whole body that poem-openapi's own `Json` builds first.

use poem::{IntoResponse, Response};
use poem_openapi::{
    payload::Payload,
    registry::{MetaSchemaRef, Registry},
    types::Type,
};

const CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// A JSON body serialized with serde. `T`'s serde field names must match its `Object` fields.
pub struct SerdeJson<T>(pub T);

impl<T: Type> Payload for SerdeJson<T> {
    const CONTENT_TYPE: &'static str = CONTENT_TYPE;

    fn check_content_type(content_type: &str) -> bool {
        content_type.starts_with("application/json")
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: serde::Serialize + Send> IntoResponse for SerdeJson<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => Response::builder().content_type(CONTENT_TYPE).body(body),
            Err(error) => poem::error::ResponseError::as_response(
                &crate::http::error::ApiError::internal(error),
            ),
        }
    }
}

/// Serializes a time as poem-openapi does (`2026-11-28T10:00:00.123456+00:00`), so every route
/// writes times alike.
pub fn rfc3339<S: serde::Serializer>(
    time: &chrono::DateTime<chrono::Utc>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&time.to_rfc3339())
}
