//! HTTP plumbing shared by every route: API keys, the one error shape, request bodies and the
//! in-flight budget, metrics and spans, and the middleware stack around the routes.

pub mod auth;
pub mod body;
pub mod error;
pub mod metrics;
pub mod trace;

use poem::{Endpoint, EndpointExt, Response, error::ResponseError, middleware::CatchPanic};

use self::{error::ApiError, metrics::ApiMetrics};

/// What every request goes through around `app`: trailing slashes trimmed, every error in the
/// one JSON shape, a panic answered 500 (logged and counted), then counted and traced.
pub fn layered(
    app: impl Endpoint + 'static,
    metrics: ApiMetrics,
) -> impl Endpoint<Output = Response> {
    let app = app
        .with(TrimSlashes)
        .catch_all_error(|err| async move { ApiError::from_poem(err).as_response() })
        .with(catch_panic(metrics.clone()))
        .map_to_response();
    metrics::CountRequests {
        inner: app,
        metrics,
    }
    .with(trace::RequestSpan)
}

/// Answers a request whose handler panicked with the standard 500 body, logged and counted
/// (`clickstream_http_panics_total`), instead of dropping the connection with no answer.
fn catch_panic(metrics: ApiMetrics) -> CatchPanic<impl poem::middleware::PanicHandler> {
    CatchPanic::new().with_handler(move |panic: Box<dyn std::any::Any + Send>| {
        metrics.panicked(panic.as_ref()).as_response()
    })
}

/// Makes trailing slashes optional on every route (`/batch/` is `/batch`) and merges repeated
/// slashes, touching only paths that need it (poem's `NormalizePath` runs a regex on every request).
struct TrimSlashes;

impl<E: Endpoint> poem::Middleware<E> for TrimSlashes {
    type Output = TrimSlashesEndpoint<E>;

    fn transform(&self, ep: E) -> Self::Output {
        TrimSlashesEndpoint(ep)
    }
}

struct TrimSlashesEndpoint<E>(E);

impl<E: Endpoint> Endpoint for TrimSlashesEndpoint<E> {
    type Output = E::Output;

    async fn call(&self, mut req: poem::Request) -> poem::Result<Self::Output> {
        if let Some(path) = normalized_path(req.uri().path()) {
            let (mut parts, body) = req.into_parts();
            let mut uri = parts.uri.into_parts();
            let path_and_query = match uri.path_and_query.as_ref().and_then(|pq| pq.query()) {
                Some(query) => format!("{path}?{query}"),
                None => path,
            };
            uri.path_and_query = path_and_query.parse().ok();
            parts.uri = poem::http::Uri::from_parts(uri).map_err(poem::error::BadRequest)?;
            req = poem::Request::from_parts(parts, body);
        }
        self.0.call(req).await
    }
}

/// `path` without trailing slashes and with runs of slashes merged, if that changes it.
fn normalized_path(path: &str) -> Option<String> {
    let trailing = path.len() > 1 && path.ends_with('/');
    if !trailing && !path.contains("//") {
        return None;
    }
    let mut out = String::with_capacity(path.len());
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    (out != path).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::{ApiMetrics, layered, normalized_path};

    #[tokio::test]
    async fn a_panicking_handler_answers_500_in_the_one_error_shape_and_is_counted() {
        let metrics = ApiMetrics::default();
        let app = layered(
            poem::endpoint::make(|_req: poem::Request| async move {
                let offset: i64 = "9000000000000000".parse().unwrap();
                let _ = chrono::Utc::now() - chrono::Duration::milliseconds(offset);
                Ok::<_, poem::Error>(poem::Response::default())
            }),
            metrics.clone(),
        );
        let resp = poem::test::TestClient::new(app)
            .post("/capture")
            .send()
            .await;
        resp.assert_status(poem::http::StatusCode::INTERNAL_SERVER_ERROR);
        let body: serde_json::Value =
            serde_json::from_str(&resp.0.into_body().into_string().await.unwrap()).unwrap();
        assert_eq!(body["type"], "server_error");
        assert_eq!(body["code"], "internal");
        assert_eq!(body["detail"], "internal server error");
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&metrics.registry.gather())
            .unwrap();
        assert!(text.contains("clickstream_http_panics_total 1"), "{text}");
        assert!(
            text.contains(
                r#"clickstream_http_requests_total{method="POST",route="other",status="500"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn trailing_and_repeated_slashes_are_normalized() {
        assert_eq!(normalized_path("/batch"), None);
        assert_eq!(normalized_path("/"), None);
        assert_eq!(normalized_path("/batch/").as_deref(), Some("/batch"));
        assert_eq!(normalized_path("/i/v0/e//").as_deref(), Some("/i/v0/e"));
        assert_eq!(
            normalized_path("//context//user/u1").as_deref(),
            Some("/context/user/u1")
        );
        assert_eq!(normalized_path("///").as_deref(), Some("/"));
    }
}
