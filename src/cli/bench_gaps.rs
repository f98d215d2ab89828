//! `tickvault bench gaps`: the gap scan over a coverage index of 14 forex symbols and
//! `years` of minutes, every market minute covered but one gap (five minutes) and one
//! source hole a day, against the naive scan (one calendar look and one bitmap look
//! per minute) of the same index, in one run.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use tickvault_wal::{Batch, Lane, Wal};

use crate::calendar::{Calendar, Hours};
use crate::coverage::{Coverage, Mark, Marks};
use crate::event::{Feed, DAY_MS, MINUTE_MS};
use crate::gaps::{self, Watched};

const SYMBOLS: [&str; 14] = [
    "EUR/USD", "GBP/USD", "USD/JPY", "AUD/USD", "USD/CAD", "USD/CHF", "NZD/USD", "EUR/GBP", "EUR/JPY", "GBP/JPY",
    "EUR/CHF", "AUD/JPY", "EUR/AUD", "CHF/JPY",
];

pub async fn run(dir: &Path, years: u32) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir)?;
    let work = tempfile::tempdir_in(dir)?;
    let log = work.path().join("log");
    let calendar = Calendar::default();
    let days = i64::from(years) * 365;
    let last_day = crate::event::now_ms().div_euclid(DAY_MS) - 1;
    let first_day = last_day - days + 1;
    let (from_ms, to_ms) = (first_day * DAY_MS, (last_day + 1) * DAY_MS);

    let made = Instant::now();
    let wal = Wal::open(&log)?;
    let mut expected_gaps = 0u64;
    for symbol in SYMBOLS {
        let mut marks = Marks::default();
        for day in first_day..=last_day {
            let mask = calendar.open_mask(Hours::Forex, day);
            let open: Vec<usize> = (0..1440).filter(|m| mask[m / 8] & (1 << (m % 8)) != 0).collect();
            let Some(&first) = open.first() else { continue };
            // A gap of five minutes at the first open minute, a hole at the last.
            let last = *open.last().expect("not empty");
            for &m in &open {
                let at = day * DAY_MS + m as i64 * MINUTE_MS;
                if m >= first + 5 && m != last {
                    marks.add(Mark::Bar, Feed::Forex, symbol, at);
                } else if m == last {
                    marks.add(Mark::Hole, Feed::Forex, symbol, at);
                }
            }
            expected_gaps += 1;
        }
        let mut batch = Batch::new();
        marks.into_batch(&mut batch);
        wal.append(Lane::Backfill, batch).await?;
    }
    wal.shutdown().await?;
    drop(wal);
    let made_s = made.elapsed().as_secs_f64();

    let reader = Wal::open_read_only(&log)?;
    let watched: Vec<Watched> = SYMBOLS
        .iter()
        .map(|s| Watched {
            feed: Feed::Forex,
            symbol: s.to_string(),
            backfilled: true,
            // Checked to the end of the range, as a symbol captured live too: the index
            // is made without a backfill tracker.
            live: true,
        })
        .collect();
    let started = Instant::now();
    let found = gaps::scan(&reader, &calendar, &watched, from_ms, to_ms)?;
    let scan_s = started.elapsed().as_secs_f64();
    let gaps_found: u64 = found.iter().map(|s| s.gaps.len() as u64).sum();
    let minutes: u64 = found.iter().map(|s| s.market_minutes).sum();
    anyhow::ensure!(
        gaps_found == expected_gaps,
        "found {gaps_found} gaps, {expected_gaps} made"
    );

    // The naive scan: every minute looked up on its own.
    let started = Instant::now();
    let mut naive_gaps = 0u64;
    for w in &watched {
        let bars = Coverage::read(&reader, Mark::Bar, w.feed, &w.symbol, first_day, last_day)?;
        let holes = Coverage::read(&reader, Mark::Hole, w.feed, &w.symbol, first_day, last_day)?;
        let mut in_gap = false;
        let mut minute = from_ms;
        while minute < to_ms {
            let missing = calendar.is_open(w.feed, &w.symbol, minute) && !bars.has(minute) && !holes.has(minute);
            naive_gaps += u64::from(missing && !in_gap);
            in_gap = missing;
            minute += MINUTE_MS;
        }
    }
    let naive_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(naive_gaps == expected_gaps, "the naive scan found {naive_gaps} gaps");

    println!(
        "gap scan: {} symbols x {years} years of minutes ({minutes} in market hours; index made in {made_s:.1} s)",
        SYMBOLS.len()
    );
    println!("| scan | seconds | minutes/s | gaps found |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| tickvault gaps (a byte of minutes at a time, a day's market mask shared) | {scan_s:.3} | {:.0} | {gaps_found} |",
        minutes as f64 / scan_s
    );
    println!(
        "| naive (the calendar and the bitmap per minute) | {naive_s:.3} | {:.0} | {naive_gaps} |",
        minutes as f64 / naive_s
    );
    println!("ratio: {:.1}x", naive_s / scan_s.max(1e-9));
    Ok(ExitCode::SUCCESS)
}
