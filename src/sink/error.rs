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

/// A failure of the TLS handshake among `e`'s sources (a certificate not trusted, a
/// host name it is not for, a server without TLS): no retry mends it. `Some` with the
/// whole chain as one line, each cause once, since the outer errors ("client error
/// (Connect)", "error performing TLS handshake") leave the why to their sources.
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut text = e.to_string();
    let mut tls = false;
    let mut source = e.source();
    while let Some(error) = source {
        // native-tls (ClickHouse, PostgreSQL); rustls (NATS), inside an io::Error.
        tls |= error.is::<native_tls::Error>()
            || error.is::<rustls::Error>()
            || error
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<rustls::Error>());
        let cause = error.to_string();
        if !text.contains(&cause) {
            text.push_str(&format!(": {cause}"));
        }
        source = error.source();
    }
    tls.then_some(text)
}
