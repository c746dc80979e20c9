//! Logs and traces of both binaries: `tracing` events as readable text or JSON lines on stderr,
//! and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported over OTLP (HTTP/protobuf).
//!
//! A trace crosses the Redis Stream in the entry's `traceparent` field (W3C Trace Context): the
//! api writes the context of the span that queued the event, the worker continues it.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer, Registry, filter::LevelFilter, layer::SubscriberExt, util::SubscriberInitExt,
};

/// Name of the W3C Trace Context field, in HTTP headers and in stream entries.
pub const TRACEPARENT: &str = "traceparent";

/// How long shutting down may wait for the last spans to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Set once spans are exported: everything trace-only (request spans, `traceparent` fields) is
/// skipped while it is false, so it costs nothing when tracing is off.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// How log lines are written (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Readable lines for a terminal (`text`, the default).
    Text,
    /// One JSON object per line, for log collectors (`json`).
    Json,
}

impl LogFormat {
    /// `text` or `json`, in any case.
    fn parse(raw: &str) -> Result<Self, String> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!("invalid value {raw:?}: expected text or json")),
        }
    }
}

/// Logging and tracing settings, part of [`crate::config::Shared`].
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct TelemetryConfig {
    /// Which log events are written (tracing `EnvFilter` syntax, e.g. `info,worker=debug`).
    #[arg(long = "rust-log", env = "RUST_LOG", default_value = "info", value_parser = log_filter)]
    pub filter: String,
    /// Log lines on stderr: `text` (readable) or `json` (one object per line).
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = LogFormat::parse)]
    pub log_format: LogFormat,
    /// `http://` base URL of an OTLP/HTTP receiver (spans go to `<endpoint>/v1/traces`); unset,
    /// nothing is exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_parser = otlp_endpoint)]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of exported spans (default: the binary's name, filled in by
    /// [`crate::config::Shared::for_service`]).
    #[arg(
        long,
        env = "OTEL_SERVICE_NAME",
        default_value = "",
        hide_default_value = true
    )]
    pub service_name: String,
}

impl TelemetryConfig {
    /// Text logs at `info`, no export: for tools and tests.
    pub fn local(service_name: &str) -> Self {
        Self {
            filter: "info".into(),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            service_name: service_name.into(),
        }
    }
}

/// A valid `RUST_LOG` filter.
fn log_filter(raw: &str) -> Result<String, String> {
    EnvFilter::builder()
        .parse(raw)
        .map_err(|e| format!("invalid value {raw:?}: {e}"))?;
    Ok(raw.to_string())
}

/// An `http://` URL: the exporter is built without TLS, since a collector next to the process is
/// the usual receiver, and it forwards over TLS itself.
fn otlp_endpoint(raw: &str) -> Result<String, String> {
    let url = raw.trim();
    if !url.starts_with("http://") {
        return Err(format!(
            "invalid value {raw:?}: expected an http:// URL (https is not supported: \
             send to a local OpenTelemetry Collector)"
        ));
    }
    Ok(url.to_string())
}

/// Why telemetry could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the span exporter: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Keeps the span exporter running; flushes the last spans and stops it when dropped.
#[must_use = "dropping the guard stops span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports every finished span now (blocks until the receiver answered or timed out).
    /// Returns false when export failed or is not configured.
    pub fn force_flush(&self) -> bool {
        self.provider
            .as_ref()
            .is_some_and(|p| p.force_flush().is_ok())
    }

    /// Flushes and stops the exporter.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            EXPORTING.store(false, Ordering::Relaxed);
            if let Err(error) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
                eprintln!("span export did not shut down cleanly: {error}");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs the process-wide subscriber: log lines filtered by `RUST_LOG`, and span export when
/// an OTLP endpoint is configured. Call once per process (a second call fails).
///
/// Export never slows the caller: finished spans go to a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`,
/// default 2048) that a background thread sends in batches; when the queue is full (receiver
/// down or slow), spans are dropped.
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::builder()
        .parse(&config.filter)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> =
        vec![logs.with_filter(filter).boxed()];

    let provider = match &config.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(traces_url(endpoint))
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            let provider = SdkTracerProvider::builder()
                .with_resource(
                    Resource::builder()
                        .with_service_name(config.service_name.clone())
                        .build(),
                )
                .with_batch_exporter(exporter)
                .build();
            let tracer = provider.tracer(config.service_name.clone());
            // Spans are exported at `info` whatever `RUST_LOG` says about log lines.
            layers.push(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(LevelFilter::INFO)
                    .boxed(),
            );
            Some(provider)
        }
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let telemetry = Telemetry { provider };
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    if telemetry.provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Ok(telemetry)
}

/// `<endpoint>/v1/traces`, as the OTLP specification derives it from `OTEL_EXPORTER_OTLP_ENDPOINT`.
fn traces_url(endpoint: &str) -> String {
    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
}

/// Whether spans are being exported.
#[inline]
pub fn is_exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The W3C `traceparent` of `span`, when spans are exported and `span` is sampled; `None` (at
/// no cost) otherwise.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !is_exporting() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_sampled() {
        return None;
    }
    let mut slot = TraceparentSlot(None);
    TraceContextPropagator::new().inject_context(&cx, &mut slot);
    slot.0
}

/// Makes `span` (not yet entered) continue the trace of `traceparent`. Returns false, leaving
/// the span as it was, when the value is not a valid `traceparent`.
pub fn continue_trace(span: &tracing::Span, traceparent: &[u8]) -> bool {
    match remote_context(traceparent) {
        Some(cx) => span.set_parent(cx).is_ok(),
        None => false,
    }
}

/// Renames the exported span of `span`, also once it has started (`otel.name` recorded late is
/// ignored by the exporter).
pub fn rename(span: &tracing::Span, name: String) {
    if is_exporting() {
        span.context().span().update_name(name);
    }
}

/// Adds a link from `span` to the span of `traceparent`, when valid.
pub fn link(span: &tracing::Span, traceparent: &[u8]) {
    if let Some(cx) = remote_context(traceparent) {
        span.add_link(cx.span().span_context().clone());
    }
}

/// The remote span context a `traceparent` value names, when valid. The stream contract is W3C
/// Trace Context whatever propagator the process uses for other carriers.
fn remote_context(traceparent: &[u8]) -> Option<Context> {
    let value = std::str::from_utf8(traceparent).ok()?;
    let cx = TraceContextPropagator::new().extract(&TraceparentValue(value.trim()));
    cx.span().span_context().is_valid().then_some(cx)
}

/// A carrier holding one `traceparent` value.
struct TraceparentValue<'a>(&'a str);

impl Extractor for TraceparentValue<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        key.eq_ignore_ascii_case(TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// A carrier that keeps only the `traceparent` a propagator writes.
struct TraceparentSlot(Option<String>);

impl Injector for TraceparentSlot {
    fn set(&mut self, key: &str, value: String) {
        if key.eq_ignore_ascii_case(TRACEPARENT) {
            self.0 = Some(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_defaults_and_names_bad_variables() {
        use crate::config::{Vars, read};

        let config: TelemetryConfig = read(&Vars::from_map::<&str, &str>([])).unwrap();
        assert_eq!(config, TelemetryConfig::local(""));

        let config: TelemetryConfig = read(&Vars::from_map([
            ("LOG_FORMAT", "JSON"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_SERVICE_NAME", "events-api"),
            ("RUST_LOG", "warn,api=debug"),
        ]))
        .unwrap();
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.service_name, "events-api");
        assert_eq!(config.filter, "warn,api=debug");
        assert_eq!(
            traces_url(config.otlp_endpoint.as_deref().unwrap()),
            "http://collector:4318/v1/traces"
        );

        for (var, value) in [
            ("LOG_FORMAT", "pretty"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318"),
            ("RUST_LOG", "api=loud"),
        ] {
            let err = read::<TelemetryConfig>(&Vars::from_map([(var, value)])).unwrap_err();
            assert_eq!(err.var, var, "{err}");
        }
    }

    #[test]
    fn reads_traceparents() {
        let cx =
            remote_context(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let span = cx.span();
        let remote = span.span_context();
        assert_eq!(
            remote.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(remote.span_id().to_string(), "00f067aa0ba902b7");
        assert!(remote.is_remote() && remote.is_sampled());
        assert!(remote_context(b"not a traceparent").is_none());
        assert!(
            remote_context(b"00-00000000000000000000000000000000-0000000000000000-01").is_none()
        );
    }
}
