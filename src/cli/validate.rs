use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

/// `tickvault validate --config PATH`.
pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let sinks: Vec<&str> = [
        (config.sinks.clickhouse.enabled, "clickhouse"),
        (config.sinks.postgres.enabled, "postgres"),
        (config.sinks.nats.enabled, "nats"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
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
