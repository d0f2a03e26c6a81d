//! Log output through `tracing-subscriber`: human-readable by default, one JSON object per line
//! with `LOG_FORMAT=json`, filtered by `RUST_LOG` (validated with the rest of the configuration).

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Calling it twice keeps the first one.
pub fn init(log: &LogConfig) {
    let filter = EnvFilter::try_new(&log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::health::control::TeeStderr);
    let _ = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}

/// An error and its sources as one line ("failed to bind ...: Address in use"), for logs and
/// status fields that have room for one line only.
///
/// Some errors (redis's among them) already print their source in their own message; a cause
/// that the line already ends with is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("failed to connect: {0}")]
    struct Echoing(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("failed to start")]
    struct Outer(#[source] Echoing);

    #[test]
    fn every_cause_once() {
        let e = Outer(Echoing(std::io::Error::other("refused")));
        assert_eq!(error_chain(&e), "failed to start: failed to connect: refused");
    }
}
