//! One span per HTTP request while spans are exported, continuing the caller's trace when the
//! request carries a `traceparent` header. Nothing is created when export is off.

use infra::telemetry::{self, TRACEPARENT};
use poem::{Endpoint, IntoResponse, Middleware, PathPattern, Request, Response, Result};
use tracing::{Instrument, field::Empty};

/// Wraps an endpoint in a span named after the method and route (`POST /capture`), with the
/// path and response status.
pub struct RequestSpan;

impl<E: Endpoint> Middleware<E> for RequestSpan {
    type Output = RequestSpanEndpoint<E>;

    fn transform(&self, ep: E) -> Self::Output {
        RequestSpanEndpoint(ep)
    }
}

pub struct RequestSpanEndpoint<E>(E);

impl<E: Endpoint> Endpoint for RequestSpanEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Self::Output> {
        if !telemetry::is_exporting() {
            return self.0.call(req).await.map(IntoResponse::into_response);
        }
        let method = req.method().clone();
        let span = tracing::info_span!(
            "http.request",
            otel.name = %method,
            otel.kind = "server",
            http.request.method = %method,
            url.path = %req.uri().path(),
            http.route = Empty,
            http.response.status_code = Empty,
        );
        if let Some(traceparent) = req.headers().get(TRACEPARENT) {
            telemetry::continue_trace(&span, traceparent.as_bytes());
        }
        let result = self.0.call(req).instrument(span.clone()).await;
        let response = match result {
            Ok(output) => output.into_response(),
            Err(error) => error.into_response(),
        };
        if let Some(PathPattern(route)) = response.data::<PathPattern>() {
            span.record("http.route", &**route);
            telemetry::rename(&span, format!("{method} {route}"));
        }
        span.record("http.response.status_code", response.status().as_u16());
        Ok(response)
    }
}
