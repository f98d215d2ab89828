//! What a sink write can fail with, and whether trying again can help.

/// A failed sink operation. `code` is stable and short, for logs and metric labels.
#[derive(Debug, thiserror::Error)]
#[error("{sink} {code}: {message}")]
pub struct SinkError {
    pub sink: &'static str,
    pub code: &'static str,
    /// Whether the same request may succeed later (server down, timeout, overload).
    /// Not retriable: the request itself is refused (schema, permissions); the runner
    /// still holds its cursor and retries at its slowest pace, so nothing is skipped,
    /// but it logs an error an operator must act on.
    pub retriable: bool,
    pub message: String,
}

impl SinkError {
    pub fn retriable(sink: &'static str, code: &'static str, message: impl std::fmt::Display) -> Self {
        SinkError {
            sink,
            code,
            retriable: true,
            message: message.to_string(),
        }
    }

    pub fn fatal(sink: &'static str, code: &'static str, message: impl std::fmt::Display) -> Self {
        SinkError {
            sink,
            code,
            retriable: false,
            message: message.to_string(),
        }
    }
}
