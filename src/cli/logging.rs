//! Log output on stderr: human-readable text (coloured only on a terminal) or one JSON object
//! per line, filtered by `RUST_LOG` (default `info`).

use std::io::IsTerminal;

/// The `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event; ANSI colours only when stderr is a terminal.
    Text,
    /// One JSON object per line: timestamp, level, target and the event's fields.
    Json,
}

/// Installs the global subscriber.
pub fn init(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,hnsw_rs=warn".into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => fmt.json().with_ansi(false).flatten_event(true).with_current_span(false).init(),
    }
}
