//! `tickvault gaps --config C [--data-dir DIR] [--symbol S] [--since DATE] [--json]`:
//! per symbol, the minutes in market hours the log holds no bar for and the source has
//! not said it lacks, read from the log's coverage index (read-only, beside a running
//! daemon). Exit 0 when there is none, 1 otherwise, 2 on bad input. `--rebuild` makes
//! the index again from the log (the daemon stopped).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::json;
use tickvault_wal::{Batch, Lane, Wal};

use crate::calendar::Calendar;
use crate::coverage::Marks;
use crate::event::{Event, EVENT_KIND};
use crate::gaps;

#[derive(Clone, Debug, clap::Args)]
pub struct GapsSpec {
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides the config's `log.data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// One symbol, in any accepted form.
    #[arg(long)]
    pub symbol: Option<String>,
    /// Check from this day (UTC) or instant (RFC 3339) on, instead of `gaps.lookback`.
    #[arg(long, value_parser = super::export::parse_instant)]
    pub since: Option<i64>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Make the coverage index again from the log's bars and the backfill's finished
    /// periods (the daemon must be stopped), then report.
    #[arg(long)]
    pub rebuild: bool,
}

pub fn run(spec: &GapsSpec) -> anyhow::Result<ExitCode> {
    let config = super::run::load_config(&spec.config, spec.data_dir.clone())?;
    let mut watched = gaps::watched(&config);
    if let Some(s) = &spec.symbol {
        let (feed, symbol) = super::backfill::parse_symbol(s).ok_or_else(|| {
            super::BadInput(format!(
                "--symbol {s:?}: not a symbol (EUR/USD, C:EURUSD, BTC-USD, AAPL)"
            ))
        })?;
        watched.retain(|w| w.feed == feed && w.symbol == symbol);
        if watched.is_empty() {
            return Err(super::BadInput(format!(
                "--symbol {s}: the config captures no minute bars of it (a backfill symbol, or a live CA/XA/AM subscription)"
            ))
            .into());
        }
    }
    let calendar = Calendar::new(&config.calendar);
    let data_dir = &config.log.data_dir;
    if spec.rebuild {
        rebuild(data_dir, &calendar)?;
    }
    let (lookback_from, to_ms) = gaps::window(config.gaps.lookback);
    let from_ms = spec.since.unwrap_or(lookback_from);
    let reader = Wal::open_read_only(data_dir)?;
    let started = std::time::Instant::now();
    let mut found = gaps::scan(&reader, &calendar, &watched, from_ms, to_ms)?;
    gaps::set_states(&reader, &mut found)?;
    let scan_ms = started.elapsed().as_secs_f64() * 1000.0;
    let open: u64 = found.iter().map(|s| s.gaps.len() as u64).sum();
    let mut periods = gaps::PeriodCounts::default();
    for s in &found {
        periods.merge(&s.periods);
    }

    let mut out = std::io::stdout().lock();
    if spec.json {
        let value = json!({
            "from_ms": from_ms,
            "to_ms": to_ms,
            "open_gaps": open,
            "periods": periods,
            "symbols": found,
        });
        writeln!(out, "{value}")?;
    } else {
        writeln!(
            out,
            "minutes in market hours from {} to {} UTC (the coverage index of {}, read in {scan_ms:.0} ms)",
            gaps::minute_text(from_ms),
            gaps::minute_text(to_ms),
            data_dir.display()
        )?;
        for s in &found {
            writeln!(
                out,
                "{:<7} {:<10} {}: {} minutes in market hours, {} with a bar, {} source holes, {} open gaps ({} minutes)",
                s.feed.name(),
                s.symbol,
                s.timeframe,
                s.market_minutes,
                s.covered,
                s.source_holes,
                s.gaps.len(),
                s.gap_minutes()
            )?;
            const SHOWN: usize = 10;
            for g in s.gaps.iter().take(SHOWN) {
                writeln!(
                    out,
                    "          gap {} .. {} ({} minutes): {}; {}",
                    gaps::minute_text(g.from_ms),
                    gaps::minute_text(g.to_ms),
                    g.minutes,
                    g.why,
                    g.state.says()
                )?;
            }
            if s.gaps.len() > SHOWN {
                writeln!(
                    out,
                    "          and {} more (all of them with --json)",
                    s.gaps.len() - SHOWN
                )?;
            }
        }
        if found.is_empty() {
            writeln!(
                out,
                "the config captures no minute bars (no backfill symbol, no CA/XA/AM subscription)"
            )?;
        }
        if periods.total() > 0 {
            let sinks = config.sinks.enabled();
            writeln!(
                out,
                "backfill periods: {} verified (every enabled sink held every key), {} downloaded, {} pending{}",
                periods.verified,
                periods.downloaded,
                periods.pending,
                if sinks.is_empty() {
                    "; no sink is enabled, so none is verified"
                } else {
                    ""
                }
            )?;
        }
        writeln!(out, "{}", if open == 0 { "no open gap" } else { "open gaps: exit 1" })?;
    }
    Ok(if open == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Makes the coverage index again from the log: a mark for every one-minute bar in the
/// live and backfill lanes, and the source holes of every period the backfill finished
/// (its minutes in market hours with no bar). Marks are OR-ed into what is there. Bars
/// that truncation removed cannot be marked again.
fn rebuild(data_dir: &Path, calendar: &Calendar) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let wal = Wal::open(data_dir)?;
        let mut marked = 0u64;
        for lane in [Lane::Live, Lane::Backfill] {
            let last = wal.reader().last_seq(lane)?.unwrap_or(0);
            let mut marks = Marks::default();
            let mut pending = 0;
            let mut batches = Vec::new();
            wal.reader().scan(lane, 0, last, |_, record| {
                if let Ok(record) = record {
                    if record.kind == EVENT_KIND {
                        if let Ok(event) = Event::from_payload(record.payload) {
                            marks.add_event(&event);
                            pending += 1;
                        }
                    }
                }
                if pending >= 200_000 {
                    batches.push(std::mem::take(&mut marks));
                    marked += pending;
                    pending = 0;
                }
                true
            })?;
            marked += pending;
            batches.push(marks);
            for marks in batches {
                let mut batch = Batch::new();
                marks.into_batch(&mut batch);
                wal.append(lane, batch).await?;
            }
        }
        let mut holes = 0u64;
        for period in crate::source::backfill::periods(wal.reader())? {
            if period.state != crate::source::backfill::PeriodState::Downloaded {
                continue;
            }
            let range = (period.from_ms(), period.resume_from_ms);
            let (marks, count) =
                crate::coverage::source_holes(wal.reader(), calendar, period.feed, &period.symbol, range, |_| false)?;
            holes += count;
            let mut batch = Batch::new();
            marks.into_batch(&mut batch);
            wal.append(Lane::Backfill, batch).await?;
        }
        wal.shutdown().await?;
        eprintln!("coverage index rebuilt: {marked} events read, {holes} source-hole minutes marked");
        anyhow::Ok(())
    })
}
