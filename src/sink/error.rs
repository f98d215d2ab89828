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
    /// Refused for what some row holds (a value the destination cannot store), not for
    /// the request: the runner finds the row by halving the batch and sets it aside
    /// for this sink alone (see `runner`), so the lane moves on.
    pub content: bool,
    pub message: String,
}

impl SinkError {
    pub fn retriable(sink: &'static str, code: &'static str, message: impl std::fmt::Display) -> Self {
        SinkError {
            sink,
            code,
            retriable: true,
            content: false,
            message: message.to_string(),
        }
    }

    pub fn fatal(sink: &'static str, code: &'static str, message: impl std::fmt::Display) -> Self {
        SinkError {
            sink,
            code,
            retriable: false,
            content: false,
            message: message.to_string(),
        }
    }

    /// Refused for the content of a row (see [`SinkError::content`]).
    pub fn content(sink: &'static str, code: &'static str, message: impl std::fmt::Display) -> Self {
        SinkError {
            content: true,
            ..SinkError::fatal(sink, code, message)
        }
    }
}

/// `e` and its sources as one line, each cause once (the outer errors, "client error
/// (Connect)", "error connecting to server", "error performing TLS handshake", leave
/// the why to their sources: "Connection refused", OpenSSL's reason); and whether a
/// TLS handshake failed among them (a certificate not trusted, a host name it is not
/// for, a server without TLS), which no retry mends.
pub fn explain(e: &(dyn std::error::Error + 'static)) -> (String, bool) {
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
    (text, tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outer error whose why is in its source, as hyper's and tokio-postgres's are.
    #[derive(Debug, thiserror::Error)]
    #[error("error connecting to server")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_error_is_explained_by_its_sources_and_a_rustls_failure_inside_an_io_error_is_tls() {
        let refused = Outer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(
            explain(&refused),
            ("error connecting to server: connection refused".to_owned(), false)
        );
        let untrusted = Outer(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        let (text, tls) = explain(&untrusted);
        assert!(tls, "{text}");
        assert_eq!(
            text,
            "error connecting to server: invalid peer certificate: UnknownIssuer"
        );
    }
}
