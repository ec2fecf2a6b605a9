//! The one tracing subscriber: `RUST_LOG` when set, otherwise `LOG__LEVEL`; `LOG__FORMAT` picks
//! human-readable or JSON lines.
use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogFormat, LogSettings};

/// sqlx logs PostgreSQL's notices under this target.
const NOTICES: &str = "sqlx::postgres::notice";
/// fred's own logs: its warnings repeat, per connection and retry, what authd already says
/// once (the outage, its end, and why connections fail, naming the setting to check).
const FRED: &str = "fred";

/// Installs the global subscriber; a second call (tests) keeps the first.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // PostgreSQL's NOTICEs (`relation "_sqlx_migrations" already exists, skipping` on every
    // start) are not news; its warnings still show. fred's warnings are authd's own lines
    // again; its errors still show. A filter (`RUST_LOG` or `LOG__LEVEL`) naming the target
    // wins.
    let given = std::env::var("RUST_LOG").unwrap_or_else(|_| settings.level.clone());
    let filter = [(NOTICES, "warn"), (FRED, "error")]
        .into_iter()
        .filter(|(target, _)| !given.contains(target))
        .fold(filter, |filter, (target, level)| {
            filter.add_directive(
                format!("{target}={level}")
                    .parse()
                    .expect("a valid directive"),
            )
        });
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match settings.format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init(),
        // Colours only for a terminal: not in files or log collectors.
        LogFormat::Pretty => registry
            .with(fmt::layer().with_ansi(std::io::stdout().is_terminal()))
            .try_init(),
    };
}
