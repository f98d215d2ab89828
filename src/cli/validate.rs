use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

/// `tickvault validate --config PATH`.
pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    println!(
        "{}: valid (log at {}, retention {})",
        path.display(),
        config.log.data_dir.display(),
        humantime::format_duration(config.log.retention)
    );
    Ok(ExitCode::SUCCESS)
}
