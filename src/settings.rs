//! Where the daemon's log lines go. The configuration's error and its secrets are in
//! `tickvault_core::settings`, re-exported here.

pub use tickvault_core::settings::{redact, ConfigError, Secret};

/// Standard error, with [`redact`] applied to each write (the log's formatter writes a
/// line in one write).
pub struct RedactedStderr;

impl std::io::Write for RedactedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Where log lines go: standard error, with the lines of other crates (a WebSocket or
/// HTTP library at `trace` prints the frames and headers it sends) passed through
/// [`redact`]. Ours never format a secret (a [`Secret`] shows as `***`), and are left
/// as they are: a weak password such as `tickvault` would blank our own words.
pub struct LogWriter;

/// One line's writer (see [`LogWriter`]).
pub enum LineWriter {
    Plain(std::io::Stderr),
    Redacted(RedactedStderr),
}

impl std::io::Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            LineWriter::Plain(w) => w.write(buf),
            LineWriter::Redacted(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            LineWriter::Plain(w) => w.flush(),
            LineWriter::Redacted(w) => w.flush(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter::Redacted(RedactedStderr)
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LineWriter {
        let krate = meta.target().split("::").next().unwrap_or_default();
        if krate == "tickvault" || krate == "tickvault_wal" || krate == "tickvault_core" {
            LineWriter::Plain(std::io::stderr())
        } else {
            LineWriter::Redacted(RedactedStderr)
        }
    }
}
