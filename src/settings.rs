//! What every part's configuration shares, below both the daemon's configuration
//! (`config`) and the sinks' sections (`sink::config`): the error that names a field,
//! and secrets.

/// A configuration that could not be used. Always names the field (or the file).
#[derive(Debug, thiserror::Error)]
#[error("config {file}: {location}: {message}")]
pub struct ConfigError {
    pub file: String,
    /// `field `a.b`` or `line N` (syntax errors) or `file` (unreadable).
    pub location: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn field(file: &str, field: &str, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_owned(),
            location: format!("field `{field}`"),
            message: message.into(),
        }
    }
}

/// A secret that never shows in logs or debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}
