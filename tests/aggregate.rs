//! The aggregator's bars and indicators against TA-Lib's (fixtures made by Python's
//! `ta-lib` with tests/fixtures/talib/make.py), fed in the ways the daemon feeds it:
//! all at once, minute by minute, with late minutes, and live bars replaced by the
//! backfill's.

use std::collections::BTreeMap;

use serde_json::Value;
use tickvault::aggregate::{Engine, Input, Minute, Ohlcv, Out, Rank, Spec, Tick};
use tickvault::config::DayStart;
use tickvault::event::{Feed, Timeframe};

const TIMEFRAMES: [&str; 7] = ["1m", "5m", "15m", "30m", "1h", "4h", "1d"];

struct Series {
    symbol: String,
    minutes: Vec<(i64, Ohlcv)>,
    /// Per timeframe: start -> [o, h, l, c, v, 10 indicators (NaN: none)].
    expected: BTreeMap<String, BTreeMap<i64, Vec<f64>>>,
}

fn fixtures() -> Vec<Series> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/talib/series.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    all["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Series {
            symbol: s["symbol"].as_str().unwrap().to_owned(),
            minutes: s["minutes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m[0].as_i64().unwrap(),
                        Ohlcv {
                            open: num(&m[1]),
                            high: num(&m[2]),
                            low: num(&m[3]),
                            close: num(&m[4]),
                            volume: num(&m[5]),
                        },
                    )
                })
                .collect(),
            expected: TIMEFRAMES
                .iter()
                .map(|tf| {
                    let rows = s["timeframes"][tf].as_array().unwrap();
                    let rows = rows
                        .iter()
                        .map(|r| {
                            let r = r.as_array().unwrap();
                            (r[0].as_i64().unwrap(), r[1..].iter().map(num).collect())
                        })
                        .collect();
                    (tf.to_string(), rows)
                })
                .collect(),
        })
        .collect()
}

fn engine() -> Engine {
    Engine::new(Spec {
        timeframes: TIMEFRAMES.iter().map(|t| t.parse().unwrap()).collect(),
        forex_day: DayStart::Utc,
    })
}

fn minute(symbol: &str, (t, bar): (i64, Ohlcv), rank: Rank) -> Input {
    Input::Minute(Minute {
        feed: Feed::Crypto,
        symbol: symbol.to_owned(),
        start_ms: t,
        rank,
        bar,
    })
}

/// Every minute of a series, at one rank.
fn all(series: &Series, rank: Rank) -> impl Iterator<Item = Input> + '_ {
    series.minutes.iter().map(move |m| minute(&series.symbol, *m, rank))
}

fn tick(ts_ms: i64, price: f64, size: f64, rank: Rank) -> Input {
    Input::Tick(Tick {
        feed: Feed::Crypto,
        symbol: "BTC-USD".into(),
        ts_ms,
        price,
        size,
        rank,
    })
}

/// The latest version of every bar emitted, per (timeframe, start).
#[derive(Default)]
struct Latest(BTreeMap<(String, i64), Out>);

impl Latest {
    fn take(&mut self, out: Vec<Out>) {
        for o in out {
            let key = (o.derived.bar.timeframe.to_string(), o.derived.bar.start_ms);
            if let Some(before) = self.0.get(&key) {
                assert!(o.derived.version > before.derived.version, "{key:?}: versions go up");
            }
            self.0.insert(key, o);
        }
    }
}

fn close_enough(ours: f64, talib: f64) -> bool {
    if talib.is_nan() {
        return ours.is_nan();
    }
    ours == talib || (ours - talib).abs() <= 1e-9 * talib.abs().max(1e-300)
}

/// Every bar of the fixture whose window has closed was emitted, with TA-Lib's values;
/// no other bar was. Returns the count compared.
fn check(series: &Series, latest: &Latest) -> usize {
    let watermark = series.minutes.last().unwrap().0 + 60_000;
    let mut compared = 0;
    for (tf, rows) in &series.expected {
        let width = tf.parse::<Timeframe>().unwrap().millis();
        for (start, want) in rows {
            let got = latest.0.get(&(tf.clone(), *start));
            if start + width > watermark {
                assert!(
                    got.is_none(),
                    "{} {tf} {start}: its window is still open",
                    series.symbol
                );
                continue;
            }
            let got = got.unwrap_or_else(|| panic!("{} {tf} {start}: not emitted", series.symbol));
            let b = &got.derived.bar;
            let mut ours = vec![b.open, b.high, b.low, b.close, b.volume];
            ours.extend(got.derived.indicators.fields().map(|(_, v)| v.unwrap_or(f64::NAN)));
            for (i, (o, t)) in ours.iter().zip(want).enumerate() {
                assert!(
                    close_enough(*o, *t),
                    "{} {tf} bar {start} field {i}: ours {o:e}, TA-Lib {t:e}",
                    series.symbol
                );
            }
            compared += 1;
        }
        let emitted = latest.0.keys().filter(|(t, _)| t == tf).count();
        let closed = rows.keys().filter(|s| *s + width <= watermark).count();
        assert_eq!(emitted, closed, "{} {tf}: bars emitted", series.symbol);
    }
    compared
}

#[test]
fn bars_and_indicators_equal_talibs_fed_at_once() {
    for series in fixtures() {
        let mut engine = engine();
        let mut latest = Latest::default();
        latest.take(engine.round(all(&series, Rank::Backfill)));
        let n = check(&series, &latest);
        assert!(n > 500, "{n} bars compared");
        assert!(latest.0.values().all(|o| o.derived.version == 1));
    }
}

#[test]
fn minute_by_minute_gives_the_same_bars_each_once() {
    for series in fixtures() {
        let mut engine = engine();
        let mut latest = Latest::default();
        for m in &series.minutes {
            latest.take(engine.round([minute(&series.symbol, *m, Rank::Live)]));
        }
        check(&series, &latest);
        assert!(
            latest.0.values().all(|o| o.derived.version == 1),
            "no bar emitted twice"
        );
    }
}

#[test]
fn late_minutes_re_emit_their_bars_and_the_indicators_after_them() {
    for series in fixtures() {
        let late: Vec<usize> = vec![0, 1, 40, 41, 42, series.minutes.len() / 2, series.minutes.len() - 30];
        let mut engine = engine();
        let mut latest = Latest::default();
        for chunk in series.minutes.chunks(97).enumerate().map(|(i, c)| (i * 97, c)) {
            let (offset, minutes) = chunk;
            let on_time = minutes
                .iter()
                .enumerate()
                .filter(|(i, _)| !late.contains(&(offset + i)))
                .map(|(_, m)| minute(&series.symbol, *m, Rank::Live));
            latest.take(engine.round(on_time));
        }
        let before = latest.0.len();
        // The missed minutes arrive from the backfill, after their windows closed.
        latest.take(
            engine.round(
                late.iter()
                    .map(|&i| minute(&series.symbol, series.minutes[i], Rank::Backfill)),
            ),
        );
        check(&series, &latest);
        assert!(latest.0.len() > before, "a missed first minute made new 1m bars");
        assert!(latest.0.values().any(|o| o.derived.version > 1), "bars were revised");
    }
}

#[test]
fn the_backfills_minute_replaces_the_live_one() {
    let series = &fixtures()[0];
    let mut engine = engine();
    let mut latest = Latest::default();
    // Live bars a little off; the backfill's true ones come after.
    latest.take(engine.round(series.minutes.iter().map(|&(t, b)| {
        let off = Ohlcv {
            close: b.close + 1.0,
            high: b.high + 1.0,
            ..b
        };
        minute(&series.symbol, (t, off), Rank::Live)
    })));
    latest.take(engine.round(all(series, Rank::Backfill)));
    check(series, &latest);
    // A live copy after the backfill's changes nothing.
    let again = engine.round(series.minutes.iter().take(100).map(|&(t, b)| {
        let off = Ohlcv {
            close: b.close + 2.0,
            ..b
        };
        minute(&series.symbol, (t, off), Rank::Live)
    }));
    assert!(again.is_empty(), "{} bars changed by a live copy", again.len());
}

#[test]
fn the_same_rounds_give_the_same_bars() {
    let series = &fixtures()[1];
    let run = || {
        let mut engine = engine();
        let mut all = Vec::new();
        for (i, chunk) in series.minutes.chunks(13).enumerate() {
            let rank = if i % 3 == 0 { Rank::Backfill } else { Rank::Live };
            all.extend(engine.round(chunk.iter().map(|m| minute(&series.symbol, *m, rank))));
        }
        all
    };
    assert_eq!(run(), run());
}

#[test]
fn minutes_without_a_bar_are_made_from_trades_else_quotes() {
    const M: i64 = 1_741_305_600_000;
    let mut engine = engine();
    // Minute 0: trades out of order, the same timestamp twice, and a quote (ignored
    // beside trades). Minute 1: quotes only. Minute 2: trades, then the live bar.
    let out = engine.round([
        tick(M + 30_000, 10.0, 1.0, Rank::Trades),
        tick(M + 5_000, 9.0, 2.0, Rank::Trades),
        tick(M + 50_000, 12.0, 0.5, Rank::Trades),
        tick(M + 50_000, 11.0, 0.5, Rank::Trades),
        tick(M + 40_000, 99.0, 0.0, Rank::Quotes),
        tick(M + 60_000, 20.0, 0.0, Rank::Quotes),
        tick(M + 70_000, 21.0, 0.0, Rank::Quotes),
        tick(M + 120_000, 30.0, 1.0, Rank::Trades),
        minute(
            "BTC-USD",
            (
                M + 120_000,
                Ohlcv {
                    open: 31.0,
                    high: 32.0,
                    low: 30.5,
                    close: 31.5,
                    volume: 7.0,
                },
            ),
            Rank::Live,
        ),
        // A trade in minute 3 closes minute 2.
        tick(M + 180_000, 40.0, 1.0, Rank::Trades),
    ]);
    let ones: Vec<_> = out
        .iter()
        .filter(|o| o.derived.bar.timeframe == Timeframe::MINUTE)
        .collect();
    let ohlcv = |i: usize| {
        let b = &ones[i].derived.bar;
        (b.start_ms - M, b.open, b.high, b.low, b.close, b.volume)
    };
    assert_eq!(ones.len(), 3, "{out:?}");
    assert_eq!(
        ohlcv(0),
        (0, 9.0, 12.0, 9.0, 11.0, 4.0),
        "open/close by timestamp, the later copy closes"
    );
    assert_eq!(ohlcv(1), (60_000, 20.0, 21.0, 20.0, 21.0, 0.0), "quotes' mids");
    assert_eq!(
        ohlcv(2),
        (120_000, 31.0, 32.0, 30.5, 31.5, 7.0),
        "the live bar over trades"
    );
    // A late trade in minute 0 revises it (and the 5m window is still open).
    let out = engine.round([tick(M + 1_000, 8.0, 1.0, Rank::Trades)]);
    let revised: Vec<_> = out
        .iter()
        .map(|o| (o.derived.bar.start_ms - M, o.derived.version))
        .collect();
    assert_eq!(revised[0], (0, 2));
    assert_eq!(out[0].derived.bar.open, 8.0);
}
