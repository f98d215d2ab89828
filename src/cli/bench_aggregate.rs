//! `tickvault bench aggregate`: one-minute bars of 14 symbols into all the configured
//! timeframes (the default 7) with the 6 indicators, on one core: the engine alone, fed
//! rounds of 100,000 bars as the daemon's aggregator takes them; and the daemon's whole
//! round (the bars read from a log's backfill lane and decoded, the derived records
//! encoded).

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use tickvault_wal::{Batch, Lane, Wal};

use crate::aggregate::{self, Engine, Input, Minute, Ohlcv, Rank, Round, Spec};
use crate::config::AggregateConfig;
use crate::event::{Bar, Body, Capture, Event, Feed, Timeframe, EVENT_KIND};

const SYMBOLS: usize = 14;
const ROUND: usize = 100_000;

fn minutes(per_symbol: usize) -> Vec<Minute> {
    let start = 1_735_689_600_000; // 2025-01-01
    let mut price = [1.1f64; SYMBOLS];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(per_symbol * SYMBOLS);
    for i in 0..per_symbol {
        for (s, p) in price.iter_mut().enumerate() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let step = ((seed % 2001) as f64 - 1000.0) * 1e-7;
            let open = *p;
            *p += step;
            out.push(Minute {
                feed: Feed::Forex,
                symbol: format!("SYM{s:02}/USD"),
                start_ms: start + i as i64 * 60_000,
                rank: Rank::Backfill,
                bar: Ohlcv {
                    open,
                    high: open.max(*p) + 2e-5,
                    low: open.min(*p) - 2e-5,
                    close: *p,
                    volume: (seed % 100) as f64,
                },
            });
        }
    }
    out
}

pub fn run(dir: &Path, per_symbol: usize) -> anyhow::Result<ExitCode> {
    let config = AggregateConfig::default();
    let spec = Spec::from_config(&config);
    let bars = minutes(per_symbol);
    let n = bars.len();

    // The engine alone: from nothing (its memory grows as it goes), then the last
    // 30% again on an engine that already holds the rest (its memory in place).
    let mut engine = Engine::new(spec.clone());
    let mut derived = 0usize;
    let started = Instant::now();
    for round in bars.chunks(ROUND) {
        derived += engine.round(round.iter().cloned().map(Input::Minute)).len();
    }
    let engine_s = started.elapsed().as_secs_f64();
    let tenth = n * 3 / 10 / SYMBOLS * SYMBOLS;
    let (history, last) = bars.split_at(n - tenth);
    let mut warm = Engine::new(spec.clone());
    for round in history.chunks(ROUND) {
        warm.round(round.iter().cloned().map(Input::Minute));
    }
    let started = Instant::now();
    let mut warm_derived = 0usize;
    for round in last.chunks(ROUND) {
        warm_derived += warm.round(round.iter().cloned().map(Input::Minute)).len();
    }
    let warm_s = started.elapsed().as_secs_f64();
    drop(warm);

    // The daemon's round: from a log, decoded, and the output encoded.
    std::fs::create_dir_all(dir)?;
    let work = tempfile::tempdir_in(dir)?;
    let log = work.path().join("log");
    let wal = Wal::open(&log)?;
    for chunk in bars.chunks(ROUND) {
        let mut batch = Batch::with_capacity(chunk.len(), chunk.len() * 80);
        for m in chunk {
            let event = Event {
                capture: Capture {
                    feed: m.feed,
                    lane: Lane::Backfill,
                    captured_at_ns: 1,
                },
                body: Body::Bar(Bar {
                    symbol: m.symbol.clone(),
                    timeframe: Timeframe::MINUTE,
                    start_ms: m.start_ms,
                    open: m.bar.open,
                    high: m.bar.high,
                    low: m.bar.low,
                    close: m.bar.close,
                    volume: m.bar.volume,
                    vwap: None,
                    trades: None,
                }),
            };
            batch.push(EVENT_KIND, &event.to_payload()?)?;
        }
        wal.append_blocking(Lane::Backfill, batch)?;
    }
    let reader = wal.reader().clone();
    let mut engine = Engine::new(spec);
    let mut before = Round::default();
    let mut bytes = 0usize;
    let started = Instant::now();
    for i in 1..=n.div_ceil(ROUND) {
        let round = Round {
            number: i as u64,
            live_to: 0,
            backfill_to: (i * ROUND).min(n) as u64,
        };
        let (inputs, captured) = aggregate::inputs(&reader, &before, &round)?;
        for event in aggregate::events(engine.round(inputs), captured) {
            bytes += event.to_payload()?.len();
        }
        before = round;
    }
    let full_s = started.elapsed().as_secs_f64();
    drop(reader);
    drop(wal);

    println!(
        "aggregation: {n} one-minute bars ({SYMBOLS} symbols x {per_symbol} minutes) into {} timeframes with SMA20, EMA20, RSI14, MACD, BB and ATR14; one core",
        config.timeframes.len()
    );
    println!("| path | seconds | 1m bars/s | derived bars |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| engine alone (rounds of {ROUND}) | {engine_s:.3} | {:.0} | {derived} |",
        n as f64 / engine_s
    );
    println!(
        "| engine alone, the last {tenth} bars on an engine holding the rest | {warm_s:.3} | {:.0} | {warm_derived} |",
        tenth as f64 / warm_s
    );
    println!(
        "| daemon round: read + decode from the log, engine, encode ({:.0} MB out) | {full_s:.3} | {:.0} | {derived} |",
        bytes as f64 / 1e6,
        n as f64 / full_s
    );
    Ok(ExitCode::SUCCESS)
}
