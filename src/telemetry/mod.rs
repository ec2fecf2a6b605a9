//! The one tracing subscriber: logs filtered by `RUST_LOG` when set, otherwise `LOG__LEVEL`
//! (`LOG__FORMAT` picks human-readable or JSON lines); and, when `TRACES__OTLP_ENDPOINT` is set,
//! authd's spans exported as OpenTelemetry traces whatever the logs' filter ([`traces`]).
use std::io::IsTerminal;

use tracing::{Level, level_filters::LevelFilter};
use tracing_subscriber::{
    EnvFilter,
    filter::{FilterExt, Targets, filter_fn},
    fmt,
    layer::Filter,
    prelude::*,
};

use crate::config::{LogFormat, LogSettings, TracesSettings};

pub mod traces;

pub use traces::{Tier, Traces};

/// sqlx logs PostgreSQL's notices under this target.
const NOTICES: &str = "sqlx::postgres::notice";
/// fred's own logs: its warnings repeat, per connection and retry, what authd already says
/// once (the outage, its end, and why connections fail, naming the setting to check).
const FRED: &str = "fred";

/// Targets kept quieter than the filter asks, unless it names them: PostgreSQL's NOTICEs
/// (`relation "_sqlx_migrations" already exists, skipping` on every start) are not news, its
/// warnings are; fred's warnings are authd's own lines again, its errors are not. This only
/// removes lines: a filter that turns logs off keeps them off.
const QUIETER: [(&str, Level); 2] = [(NOTICES, Level::WARN), (FRED, Level::ERROR)];

/// Whether `target` is `module` or inside it.
fn within(target: &str, module: &str) -> bool {
    target
        .strip_prefix(module)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

/// Whether a directive of `filter` names `module` (or a module inside it).
fn names(filter: &str, module: &str) -> bool {
    filter.split(',').any(|directive| {
        let target = directive
            .split(['=', '['])
            .next()
            .unwrap_or_default()
            .trim();
        within(target, module)
    })
}

/// Whether a line of `target` at `level` is left out, given which of [`QUIETER`] the filter
/// names.
fn quieted(target: &str, level: Level, named: [bool; 2]) -> bool {
    QUIETER
        .iter()
        .zip(named)
        .any(|((module, loudest), named)| !named && within(target, module) && level > *loudest)
}

/// What the logs keep: what `filter` enables, less [`QUIETER`]'s lines (those of its targets
/// not `named` by the filter). As verbose as `filter` and no more: the subscriber's level, which
/// the `log` crate's callers (fred, sqlx) check before formatting anything, is the filter's.
fn logs<S>(filter: EnvFilter, named: [bool; 2]) -> impl Filter<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let quieter = filter_fn(move |meta| !quieted(meta.target(), *meta.level(), named))
        .with_max_level_hint(LevelFilter::TRACE);
    filter.and(quieter)
}

/// Installs the global subscriber; a second call (tests) keeps the first. With traces
/// configured, within the Tokio runtime: the exporter it starts runs there; keep what it
/// answers and shut it down as the process ends.
pub fn init(log: &LogSettings, traces: &TracesSettings) -> anyhow::Result<Option<Traces>> {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|given| Some((EnvFilter::try_new(&given).ok()?, given)));
    let (filter, given) = from_env
        .or_else(|| Some((EnvFilter::try_new(&log.level).ok()?, log.level.clone())))
        .unwrap_or_else(|| (EnvFilter::new("info"), "info".to_owned()));
    let logs = logs(filter, QUIETER.map(|(module, _)| names(&given, module)));
    let (exporter, tracer) = match traces.enabled() {
        true => traces::Traces::start(traces).map(|(t, tracer)| (Some(t), Some(tracer)))?,
        false => (None, None),
    };
    // authd's own spans and events, whatever the logs keep.
    let spans = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(Targets::new().with_target("authd", Level::INFO))
    });
    let registry = tracing_subscriber::registry().with(spans);
    let _ = match log.format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_filter(logs),
            )
            .try_init(),
        // Colours only for a terminal: not in files or log collectors.
        LogFormat::Pretty => registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stdout().is_terminal())
                    .with_filter(logs),
            )
            .try_init(),
    };
    Ok(exporter)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review found: the removing filter, which gave no level, made the subscriber's level
    /// TRACE whatever LOG__LEVEL said — every debug and trace line of fred and sqlx then went
    /// through the filter before being dropped.
    #[test]
    fn the_logs_are_no_more_verbose_than_their_filter() {
        use tracing_subscriber::Registry;
        for (given, level) in [
            ("info", LevelFilter::INFO),
            ("warn,authd=debug", LevelFilter::DEBUG),
            ("off", LevelFilter::OFF),
        ] {
            let filter = logs::<Registry>(EnvFilter::new(given), [false, false]);
            assert_eq!(filter.max_level_hint(), Some(level), "{given}");
        }
    }

    #[test]
    fn fred_and_notices_are_quieter_unless_the_filter_names_them() {
        let none = [false, false];
        assert!(quieted("fred::router::responses", Level::WARN, none));
        assert!(!quieted("fred::router::responses", Level::ERROR, none));
        assert!(quieted("sqlx::postgres::notice", Level::INFO, none));
        assert!(!quieted("sqlx::postgres::notice", Level::WARN, none));
        assert!(!quieted("authd::cache", Level::TRACE, none));
        assert!(!quieted("fredrik", Level::WARN, none), "another crate");
        let fred = [false, names("info,fred::router=warn", FRED)];
        assert!(!quieted("fred::router::responses", Level::WARN, fred));
        assert!(names("fred=debug", FRED));
        assert!(names(" fred[conn]=debug", FRED));
        assert!(!names("info,authd=debug", FRED));
        assert!(!names("frederic=debug", FRED));
        assert!(names("sqlx::postgres::notice=info", NOTICES));
        assert!(!names("sqlx=debug", NOTICES));
    }
}
