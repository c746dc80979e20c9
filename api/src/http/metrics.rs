//! Prometheus metrics of the api, served at `GET /metrics`: requests by route and status with
//! latency histograms, events accepted and requests rejected by reason, XADD latency, and the
//! queue gauges (stream length, consumer-group lag and pending, DLQ length) read at scrape time.

use std::{any::Any, time::Instant};

use infra::metrics::{
    QueueGauges, counter, counter_vec, latency_buckets, register, seconds_histogram,
};
use poem::{Endpoint, IntoResponse, PathPattern, Request, Response, http::Method};
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Registry};

use crate::http::error::ApiError;

/// What the api counts. Each instance owns its registry.
#[derive(Clone)]
pub struct ApiMetrics {
    pub registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    events_accepted: IntCounterVec,
    rejected: IntCounterVec,
    panics: IntCounter,
    /// One request's XADD pipeline round trip.
    pub xadd_seconds: Histogram,
    pub queue: QueueGauges,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        let registry = infra::metrics::registry();
        let r = &registry;
        ApiMetrics {
            requests: counter_vec(
                r,
                "clickstream_http_requests_total",
                "HTTP requests by route, method and status",
                &["route", "method", "status"],
            ),
            request_seconds: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "clickstream_http_request_duration_seconds",
                        "HTTP request latency by route and method",
                    )
                    .buckets(latency_buckets()),
                    &["route", "method"],
                )
                .expect("valid histogram"),
            ),
            events_accepted: counter_vec(
                r,
                "clickstream_events_accepted_total",
                "Events queued in the Redis Stream, by ingest route family (capture, ingest)",
                &["source"],
            ),
            rejected: counter_vec(
                r,
                "clickstream_ingest_rejected_total",
                "Ingest requests rejected whole (nothing of them queued), by error code",
                &["source", "reason"],
            ),
            panics: counter(
                r,
                "clickstream_http_panics_total",
                "Requests whose handling panicked (answered 500)",
            ),
            xadd_seconds: seconds_histogram(
                r,
                "clickstream_xadd_duration_seconds",
                "Time to append one request's events to the stream (one pipeline)",
            ),
            queue: QueueGauges::new(r),
            registry,
        }
    }
}

impl ApiMetrics {
    /// Counts the outcome of one ingest request: its events accepted, or the request rejected.
    pub fn ingest(&self, source: &str, result: Result<usize, &ApiError>) {
        match result {
            Ok(events) => self
                .events_accepted
                .with_label_values(&[source])
                .inc_by(events as u64),
            Err(e) => self
                .rejected
                .with_label_values(&[source, &e.body.code])
                .inc(),
        }
    }

    /// Logs and counts a panic while handling a request; the 500 to answer with.
    pub fn panicked(&self, panic: &(dyn Any + Send)) -> ApiError {
        self.panics.inc();
        let message = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        tracing::error!(panic = message, "request handler panicked");
        ApiError::internal("request handler panicked")
    }

    /// Counts a finished request.
    fn request(&self, route: &str, method: &str, status: &str, started: Instant) {
        self.requests
            .with_label_values(&[route, method, status])
            .inc();
        self.request_seconds
            .with_label_values(&[route, method])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Counts every request of the endpoint it wraps by route, method and status, with its latency.
pub struct CountRequests<E> {
    pub inner: E,
    pub metrics: ApiMetrics,
}

impl<E: Endpoint> Endpoint for CountRequests<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        let started = Instant::now();
        let method = req.method().clone();
        let response = match self.inner.call(req).await {
            Ok(output) => output.into_response(),
            Err(error) => error.into_response(),
        };
        // The router's own pattern (`/context/user/:user_id`): a label set bounded by the routes.
        let route = response
            .data::<PathPattern>()
            .map_or("other", |PathPattern(route)| &**route);
        self.metrics.request(
            route,
            method_label(&method),
            response.status().as_str(),
            started,
        );
        Ok(response)
    }
}

/// The `method` label: one of the standard methods, else `other` (a client may send any token
/// as a method; each would be a series of its own).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        for raw in ["FOO", "BREW", "get"] {
            assert_eq!(
                method_label(&Method::from_bytes(raw.as_bytes()).unwrap()),
                "other"
            );
        }
    }
}
