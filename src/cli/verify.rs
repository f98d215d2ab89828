//! `tickvault verify --config C [--data-dir DIR] [--json] [--max-lag DUR]`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::verify;

pub async fn run(
    config_path: &std::path::Path,
    data_dir: Option<PathBuf>,
    json: bool,
    max_lag: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let config = super::run::load_config(config_path, data_dir)?;
    let report = verify::verify(&config, &config.log.data_dir, max_lag).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "log: {} events, {} distinct natural keys",
            report.log_events, report.log_keys
        );
        if report.sinks.is_empty() {
            println!("no sink is enabled in {}", config_path.display());
        }
        for s in &report.sinks {
            let cursors: Vec<String> = s.cursors.iter().map(|(l, c)| format!("{l} {c}")).collect();
            let verdict = if s.matches() { "MATCH" } else { "DIFFERS" };
            println!(
                "{:<10} {verdict}: {} groups x days checked, {} keys passed by its cursors ({}), {} keys held",
                s.sink,
                s.groups_checked,
                s.passed,
                cursors.join(", "),
                s.in_sink
            );
            for b in &s.backlog {
                let oldest = b.oldest_unsent_age_ms.map_or(String::new(), |ms| {
                    let age = Duration::from_secs(ms / 1000);
                    format!(", the oldest captured {} ago", humantime::format_duration(age))
                });
                println!(
                    "           {:<8} cursor {} of {}: {} records not sent yet{oldest}",
                    b.lane, b.cursor, b.head, b.records
                );
            }
            if s.refused > 0 {
                println!(
                    "           refused {} records for their content; set aside in the log, not in the sink:",
                    s.refused
                );
                for r in s.refused_records.iter().take(5) {
                    println!("             {} {}: {} {}", r.lane, r.seq, r.code, r.reason);
                }
            }
            if let Some(why) = &s.lag_exceeded {
                println!("           lags: {why}");
            }
            if s.groups_not_in_log > 0 {
                println!(
                    "           {} groups x days are in the sink but no longer in the log (retention): not compared",
                    s.groups_not_in_log
                );
            }
            if s.beyond_retention > 0 {
                println!(
                    "           {} keys held in groups x days the log holds only in part (retention truncated their first records): not compared",
                    s.beyond_retention
                );
            }
            if let Some(e) = &s.error {
                println!("           cannot read the sink: {e}");
            }
            for p in &s.verified_periods_short {
                println!(
                    "           the verified backfill period {} {} {} .. {} lacks {} of its minute bars here: {}",
                    p.feed,
                    p.symbol,
                    crate::gaps::minute_text(p.from_ms),
                    crate::gaps::minute_text(p.to_ms),
                    p.missing,
                    if p.unverified {
                        "verified no more"
                    } else {
                        "the daemon verifies it no more when it checks it again (within gaps.recheck)"
                    }
                );
            }
            const SHOWN: usize = 20;
            if s.differences.len() > SHOWN {
                println!(
                    "           {} groups x days differ; the first {SHOWN} (all of them with --json):",
                    s.differences.len()
                );
            }
            for d in s.differences.iter().take(SHOWN) {
                println!(
                    "           {} {} {} {} {}: passed {}, pending {}, in sink {} -> missing {}, refused {}, extra {}, duplicates {}",
                    d.group.feed,
                    d.group.symbol,
                    d.group.kind,
                    d.group.timeframe,
                    d.date,
                    d.passed,
                    d.pending,
                    d.in_sink,
                    d.missing,
                    d.refused,
                    d.extra,
                    d.duplicates
                );
                for e in &d.examples {
                    println!("             {} ts_ms {} uid {}", e.problem, e.ts_ms, e.uid);
                }
            }
        }
    }
    Ok(if report.matches() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
