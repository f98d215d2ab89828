use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

/// `tickvault validate --config PATH`.
pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    // `run` will need it: a valid file on a machine without the key is not runnable.
    config.check_api_key(&path.display().to_string())?;
    config.warn_of_clear_text();
    let sinks = config.sinks.enabled();
    println!(
        "{}: valid (log at {}, retention {}, sinks: {})",
        path.display(),
        config.log.data_dir.display(),
        humantime::format_duration(config.log.retention),
        if sinks.is_empty() {
            "none".to_owned()
        } else {
            sinks.join(", ")
        }
    );
    Ok(ExitCode::SUCCESS)
}
