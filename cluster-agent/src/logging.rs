//! The agent's log: `tracing` events on stderr, as text or as JSON lines
//! (`log_format`), filtered by `RUST_LOG` (default `info,openraft=warn`).
//!
//! Colours (ANSI escape codes) only when stderr is a terminal: a file, a pipe or
//! journald gets plain text, and JSON never carries escape codes. VM workers
//! (`cluster-agent vm-worker`, stderr to `worker.log`) log the same way, in the format
//! their agent was started with.

use std::io::IsTerminal;

/// The filter used when `RUST_LOG` is unset or invalid.
pub const DEFAULT_FILTER: &str = "info,openraft=warn";

/// How log lines are written (`log_format` in the config, `--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the
    /// event's other fields at the top level, and the span it happened in (`span`).
    Json,
}

impl LogFormat {
    /// The values `log_format` accepts.
    pub const NAMES: &'static str = "\"text\" or \"json\"";

    /// The name `log_format` spells this format with.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }

    /// Parse a `log_format` value (`None` for anything but "text" or "json").
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// Install the process-wide subscriber writing to stderr. A second call (a subscriber
/// is already set) changes nothing.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    // Colours only for a person at a terminal: files and journald get plain text.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        // The JSON formatter escapes control characters inside strings itself; `ansi` off
        // keeps the fields' own formatting free of escape codes too.
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
