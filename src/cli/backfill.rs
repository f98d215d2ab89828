//! `tickvault backfill`: one symbol's backfill from the command line, with a progress bar.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tickvault_wal::Wal;

use super::run::{load_config, stop_signal};
use crate::daemon;
use crate::event::Feed;
use crate::polygon::symbol;
use crate::source::backfill::{BackfillStats, Downloader, Job};

/// A symbol in any accepted form, with its market.
pub fn parse_symbol(s: &str) -> Option<(Feed, String)> {
    if s.starts_with("C:") || s.starts_with("X:") {
        return symbol::parse_rest_ticker(s);
    }
    let feed = if s.contains('/') {
        Feed::Forex
    } else if s.contains('-') {
        Feed::Crypto
    } else {
        Feed::Stocks
    };
    Some((feed, symbol::canonical(feed, s)?))
}

fn day_ms(date: jiff::civil::Date) -> anyhow::Result<i64> {
    Ok(date
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)?
        .timestamp()
        .as_millisecond())
}

/// The process's peak resident memory, from /proc (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub async fn run(
    config_path: &Path,
    symbols: &str,
    from: jiff::civil::Date,
    to: jiff::civil::Date,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let config = load_config(config_path, data_dir)?;
    config.check_api_key(&config_path.display().to_string())?;
    if from > to {
        return Err(super::BadInput(format!("--from {from} is after --to {to}")).into());
    }
    let (from_ms, to_ms) = (day_ms(from)?, day_ms(to)? + 86_400_000);
    let mut jobs = Vec::new();
    for s in symbols.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (feed, symbol) =
            parse_symbol(s).ok_or_else(|| super::BadInput(format!("--symbol {s:?} is not a symbol")))?;
        jobs.push(Job {
            feed,
            symbol,
            from_ms,
            to_ms,
        });
    }
    anyhow::ensure!(!jobs.is_empty(), "--symbol {symbols:?} names no symbol");
    let what = match &jobs[..] {
        [one] => format!("{} {}", one.feed, one.symbol),
        many => format!("{} symbols", many.len()),
    };
    let wal = Wal::open_with(&config.log.data_dir, crate::daemon::wal_options(&config))?;
    let stats = Arc::new(BackfillStats::default());
    let downloader = Downloader::new(daemon::backfill_spec(&config)?, wal.clone(), stats.clone())?;
    let (stop, shutdown) = tokio::sync::watch::channel(false);

    let total_ms = (to_ms - from_ms) as u64 * jobs.len() as u64;
    let bar = indicatif::ProgressBar::new(total_ms);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:40}] {percent:>3}% {msg} (eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{what} {from}..{to}"));
    let started = Instant::now();
    let run = downloader.run(&jobs, shutdown);
    tokio::pin!(run);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut interrupted = false;
    let signal = stop_signal();
    tokio::pin!(signal);
    let result = loop {
        tokio::select! {
            r = &mut run => break r,
            _ = tick.tick() => {
                bar.set_position(stats.covered_ms.load(Ordering::Relaxed).min(total_ms));
                let bars = stats.bars();
                let waiting = if stats.waiting_for_backlog.load(Ordering::Relaxed) { " waiting for sinks" } else { "" };
                bar.set_message(format!(
                    "{bars} bars, {:.0} bars/s, {} requests, {} retries{waiting}",
                    bars as f64 / started.elapsed().as_secs_f64().max(1e-3),
                    stats.requests.load(Ordering::Relaxed),
                    stats.retries.load(Ordering::Relaxed),
                ));
            }
            _ = &mut signal, if !interrupted => {
                interrupted = true;
                let _ = stop.send(true);
            }
        }
    };
    bar.finish_and_clear();
    wal.shutdown().await?;
    result?;
    let secs = started.elapsed().as_secs_f64();
    let bars = stats.bars();
    println!(
        "backfilled {what} {from}..{to}: {bars} bars in {secs:.2} s ({:.0} bars/s), {} pages, {} requests, {} retries ({} rate-limited), periods {}/{} done ({} already done, {} as far as the source has them), peak RSS {} MB",
        bars as f64 / secs.max(1e-9),
        stats.pages.load(Ordering::Relaxed),
        stats.requests.load(Ordering::Relaxed),
        stats.retries.load(Ordering::Relaxed),
        stats.rate_limited.load(Ordering::Relaxed),
        stats.periods_done.load(Ordering::Relaxed),
        stats.periods_total.load(Ordering::Relaxed),
        stats.periods_skipped.load(Ordering::Relaxed),
        stats.periods_ahead.load(Ordering::Relaxed),
        peak_rss_bytes().map_or(0, |b| b / 1_000_000),
    );
    let failed = stats.periods_failed.load(Ordering::Relaxed);
    if interrupted || failed > 0 {
        eprintln!(
            "incomplete: {failed} periods failed{}; run again to resume",
            if interrupted { ", interrupted" } else { "" }
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
