//! OpenTelemetry traces over OTLP/gRPC (`TRACES__OTLP_ENDPOINT`; off when empty). Every RPC's
//! span (`grpc::observe`) becomes a server span named after its method, a child of the caller's
//! trace when the call carries a W3C `traceparent`; what answered a lookup (`authd.tier`) and how
//! a revoking call's wait ended (`authd.revocation.wait`) are attributes of the span running
//! when it is known.
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::{
    Key, KeyValue, Value,
    propagation::TextMapPropagator,
    trace::{Link, SpanKind, TraceContextExt, TraceId, TracerProvider as _},
};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{
        Sampler, SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider, ShouldSample,
    },
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::TracesSettings;

/// How long a stopping process waits for its last spans to be taken: a collector that does not
/// answer must not hold the exit past Kubernetes' grace period.
pub const FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether spans are exported (set once, when the exporter is built).
static ON: AtomicBool = AtomicBool::new(false);

/// The attribute naming what answered a lookup.
pub const TIER: &str = "authd.tier";
/// The attribute saying how a revoking call's wait for the other instances ended.
/// `none` (no instance held a copy), `acked`, `caught_up`, `lease_ended` (the last holder
/// acknowledged, read the logs past the change, or saw its lease end), or `deadline` (the call
/// answers UNAVAILABLE): the label values of `authd_local_cache_wait_seconds`.
pub const REVOCATION_WAIT: &str = "authd.revocation.wait";
/// How long that wait took.
pub const REVOCATION_WAIT_SECONDS: &str = "authd.revocation.wait_seconds";

/// What answered a lookup: this instance's memory, Redis, or PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Redis,
    Postgres,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Redis => "redis",
            Tier::Postgres => "postgresql",
        }
    }
}

/// The exporter of a running process: [`Traces::shutdown`] sends what is still buffered.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Builds the exporter (within the Tokio runtime: its channel runs there) and the tracer.
    pub(super) fn start(settings: &TracesSettings) -> anyhow::Result<(Self, SdkTracer)> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.otlp_endpoint.trim());
        if settings.otlp_endpoint.trim().starts_with("https://") {
            exporter = exporter
                .with_tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots());
        }
        let exporter = exporter.build()?;
        let sampler = Sampling {
            // The caller's decision for its trace; the ratio for traces that begin here.
            calls: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))),
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(resource())
            .build();
        let tracer = provider.tracer("authd");
        ON.store(true, Ordering::Relaxed);
        Ok((Self { provider }, tracer))
    }

    /// Exports the spans still buffered (called as the process ends), waiting at most
    /// [`FLUSH`] for the collector.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown_with_timeout(FLUSH) {
            tracing::warn!(%error, "could not export the last spans");
        }
    }
}

/// Which spans are recorded: none of the health checks (probes every few seconds, from every
/// kubelet and balancer, would be most of the traces and tell nothing); the others as `calls`
/// decides.
#[derive(Debug, Clone)]
struct Sampling {
    calls: Sampler,
}

/// The span names of health checks (`grpc.health.v1.Health/Check`, `/Watch`).
const PROBES: &str = "grpc.health.v1.Health/";

impl ShouldSample for Sampling {
    fn should_sample(
        &self,
        parent: Option<&opentelemetry::Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if name.starts_with(PROBES) {
            return SamplingResult {
                decision: SamplingDecision::Drop,
                attributes: Vec::new(),
                trace_state: parent
                    .map(|cx| cx.span().span_context().trace_state().clone())
                    .unwrap_or_default(),
            };
        }
        self.calls
            .should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

/// `service.name` is `authd` unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` says
/// otherwise; `service.version` is this build's.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&Key::new("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let builder = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if named {
        builder.build()
    } else {
        builder.with_service_name("authd").build()
    }
}

/// Whether spans are exported.
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Reads a W3C `traceparent` (and `tracestate`) from gRPC metadata.
struct Metadata<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Makes `span` (declared with empty `otel.name` and `otel.kind`) the server span of the call
/// to `path`, a child of the caller's trace when `headers` carry one.
pub fn serve(span: &tracing::Span, path: &str, headers: &http::HeaderMap) {
    if !on() {
        return;
    }
    let method = path.trim_start_matches('/');
    span.record("otel.name", method);
    span.record("otel.kind", "server");
    span.set_attribute("rpc.system", "grpc");
    let caller = TraceContextPropagator::new().extract(&Metadata(headers));
    if caller.span().span_context().is_valid() {
        // The span is not started yet (nothing entered it), so the parent takes.
        let _ = span.set_parent(caller);
    }
}

/// Records the call's answer on its span: the gRPC code, and an error status for the codes that
/// are the server's fault (OpenTelemetry's convention for gRPC servers). A path nothing serves
/// (UNIMPLEMENTED) is named `unknown`, as in the metrics' labels: callers choose paths, and
/// tracing backends index span names.
pub fn answered(span: &tracing::Span, path: &str, code: tonic::Code) {
    if !on() {
        return;
    }
    let method = path.trim_start_matches('/').split_once('/');
    match method {
        Some((service, name)) if code != tonic::Code::Unimplemented => {
            span.set_attribute("rpc.service", service.to_owned());
            span.set_attribute("rpc.method", name.to_owned());
        }
        _ => span.context().span().update_name("unknown"),
    }
    span.set_attribute("rpc.grpc.status_code", i64::from(code as i32));
    use tonic::Code::*;
    if matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    ) {
        span.record("otel.status_code", "error");
    }
}

/// The trace id of `span`, when it is recorded and exported (for the RPC's log line: a trace
/// nobody records is not worth naming).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    if !on() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_sampled()
        .then(|| span_context.trace_id().to_string())
}

/// Sets `key` on the span running now, when spans are exported.
pub fn note(key: &'static str, value: impl Into<Value>) {
    if on() {
        tracing::Span::current().set_attribute(key, value);
    }
}

/// Notes what answered the running call's lookup.
pub fn tier(tier: Tier) {
    note(TIER, tier.as_str());
}
