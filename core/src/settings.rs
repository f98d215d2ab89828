//! What every part's configuration shares, below both the daemon's configuration
//! (`config`) and the sinks' sections (`config::sinks`): the error that names a field,
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
    pub fn field(file: &str, field: &str, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_owned(),
            location: format!("field `{field}`"),
            message: message.into(),
        }
    }
}

/// A secret that never shows in logs or debug output: its `Debug` hides it, and every
/// secret made is noted so that the log's writer ([`redact`]) blanks it wherever a
/// line holds it, whatever wrote the line (a dependency at `trace` prints the frames and
/// headers it sends).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// Every secret made so far, for [`redact`].
static KNOWN: std::sync::RwLock<Vec<String>> = std::sync::RwLock::new(Vec::new());

/// Shorter values are not blanked in logs: they would blank ordinary words.
const REDACT_MIN_LEN: usize = 4;

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        let value = value.into();
        if value.len() >= REDACT_MIN_LEN {
            let mut known = KNOWN.write().unwrap_or_else(|p| p.into_inner());
            if !known.contains(&value) {
                known.push(value.clone());
            }
        }
        Secret(value)
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

/// `text` with every secret made so far replaced by `***`.
pub fn redact(text: &str) -> std::borrow::Cow<'_, str> {
    let known = KNOWN.read().unwrap_or_else(|p| p.into_inner());
    let mut out = std::borrow::Cow::Borrowed(text);
    for secret in known.iter() {
        if out.contains(secret.as_str()) {
            out = std::borrow::Cow::Owned(out.replace(secret.as_str(), "***"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_made_is_blanked_in_any_text_and_a_short_one_is_left() {
        let _key = Secret::new("pk-9c1e7a-redact-me");
        let _short = Secret::new("ab");
        assert_eq!(
            redact(r#"send [{"action":"auth","params":"pk-9c1e7a-redact-me"}] ab"#),
            r#"send [{"action":"auth","params":"***"}] ab"#
        );
        assert_eq!(redact("nothing here"), "nothing here");
    }
}
