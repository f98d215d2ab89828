//! The aggregator's logic, without the log: one-minute bars in, in rounds; derived
//! bars out, with versions and indicators. Pure and deterministic: the same rounds of
//! the same inputs give the same output, bit for bit (the daemon's task journals its
//! rounds so that a restart or a rebuild feeds the same ones).
//!
//! - A minute's bar is the backfill's once it has one (the source of truth), else the
//!   live aggregate's, else one made from the minute's trades, else from its quotes'
//!   mid prices (volume 0); a later copy of a bar of the same rank replaces an earlier
//!   one, and ticks of the same rank add to their minute (open and close by timestamp,
//!   whatever order they came in).
//! - A window's bar is made once the window has closed: a minute at or after its end
//!   was seen for the symbol (data time, never the clock, so a rebuild agrees).
//! - A change to a minute of a closed window (late data: a backfilled or repaired
//!   minute) makes that window again and every later one of the series; each whose bar
//!   or indicators changed is emitted again with its version plus one.

use std::collections::{BTreeMap, BTreeSet};

use tickvault_core::indicators::{Hlc, Indicators, State};

pub use crate::config::DayStart;
use crate::event::{Bar, Derived, Feed, TimeUnit, Timeframe};

const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;

/// Which source a minute's bar came from; the higher wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank {
    Quotes,
    Trades,
    Live,
    Backfill,
}

/// The prices and volume of a bar.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ohlcv {
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    pub volume: f64,
}

impl Ohlcv {
    fn hlc(&self) -> Hlc {
        Hlc {
            high: self.high,
            low: self.low,
            close: self.close,
        }
    }
}

/// One captured one-minute bar.
#[derive(Clone, Debug)]
pub struct Minute {
    pub feed: Feed,
    pub symbol: String,
    pub start_ms: i64,
    pub rank: Rank,
    pub bar: Ohlcv,
}

/// One live quote (its mid price, size 0) or trade.
#[derive(Clone, Debug)]
pub struct Tick {
    pub feed: Feed,
    pub symbol: String,
    pub ts_ms: i64,
    pub price: f64,
    pub size: f64,
    /// [`Rank::Quotes`] or [`Rank::Trades`].
    pub rank: Rank,
}

/// What the engine takes in.
#[derive(Clone, Debug)]
pub enum Input {
    Minute(Minute),
    Tick(Tick),
}

/// A minute's bar and where it came from; for one made of ticks, the timestamps of
/// its open and close.
#[derive(Clone, Copy, Debug)]
struct Base {
    rank: Rank,
    bar: Ohlcv,
    first_ms: i64,
    last_ms: i64,
}

/// One derived bar out, with the feed it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct Out {
    pub feed: Feed,
    pub derived: Derived,
}

/// How the aggregator works.
#[derive(Clone, Debug)]
pub struct Spec {
    pub timeframes: Vec<Timeframe>,
    /// Where a forex day starts (other markets: UTC).
    pub forex_day: DayStart,
}

#[derive(Clone, Debug)]
struct Entry {
    start: i64,
    bar: Ohlcv,
    state: State,
    indicators: Indicators,
    version: u32,
}

#[derive(Debug, Default)]
struct Symbol {
    minutes: BTreeMap<i64, Base>,
    /// The end of the latest minute seen: windows ending by then are closed.
    watermark: i64,
    /// Per timeframe (in the spec's order), the bars of its closed windows.
    series: Vec<Vec<Entry>>,
    /// In the current round: whether touched, the earliest changed minute, and the
    /// watermark before it.
    touched: bool,
    changed_from: Option<i64>,
    old_watermark: i64,
}

impl Symbol {
    fn touch(&mut self) -> bool {
        let first = !self.touched;
        if first {
            self.touched = true;
            self.changed_from = None;
            self.old_watermark = self.watermark;
        }
        first
    }

    fn changed(&mut self, minute: i64) {
        self.changed_from = Some(self.changed_from.map_or(minute, |t| t.min(minute)));
    }

    /// Takes a captured minute bar; whether it changed the minute.
    fn minute(&mut self, m: &Minute) -> bool {
        let replaces = match self.minutes.get(&m.start_ms) {
            Some(b) => m.rank > b.rank || (m.rank == b.rank && b.bar != m.bar),
            None => true,
        };
        if replaces {
            self.minutes.insert(
                m.start_ms,
                Base {
                    rank: m.rank,
                    bar: m.bar,
                    first_ms: m.start_ms,
                    last_ms: m.start_ms,
                },
            );
        }
        self.watermark = self.watermark.max(m.start_ms + MINUTE_MS);
        replaces
    }

    /// Takes a tick into its minute's bar; whether it changed the minute.
    fn tick(&mut self, t: &Tick) -> bool {
        let minute = t.ts_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        // A tick says the minutes before its own have ended.
        self.watermark = self.watermark.max(minute);
        let fresh = Base {
            rank: t.rank,
            bar: Ohlcv {
                open: t.price,
                high: t.price,
                low: t.price,
                close: t.price,
                volume: 0.0 + t.size,
            },
            first_ms: t.ts_ms,
            last_ms: t.ts_ms,
        };
        let Some(base) = self.minutes.get_mut(&minute) else {
            self.minutes.insert(minute, fresh);
            return true;
        };
        if t.rank < base.rank {
            return false;
        }
        if t.rank > base.rank {
            *base = fresh;
            return true;
        }
        let before = base.bar;
        let b = &mut base.bar;
        b.high = b.high.max(t.price);
        b.low = b.low.min(t.price);
        b.volume += t.size;
        if t.ts_ms < base.first_ms {
            base.first_ms = t.ts_ms;
            b.open = t.price;
        }
        if t.ts_ms >= base.last_ms {
            base.last_ms = t.ts_ms;
            b.close = t.price;
        }
        *b != before
    }
}

/// The aggregator's state: every symbol's minutes and series.
pub struct Engine {
    spec: Spec,
    symbols: BTreeMap<Feed, BTreeMap<String, Symbol>>,
    new_york: jiff::tz::TimeZone,
}

impl Engine {
    pub fn new(spec: Spec) -> Engine {
        Engine {
            spec,
            symbols: BTreeMap::new(),
            new_york: jiff::tz::TimeZone::get("America/New_York").expect("bundled tz database"),
        }
    }

    /// Takes one round of inputs (in log order: the backfill lane's, then the live
    /// lane's) and returns the bars it made or changed, in (feed, symbol, timeframe,
    /// start) order.
    pub fn round(&mut self, inputs: impl IntoIterator<Item = Input>) -> Vec<Out> {
        let mut touched: BTreeSet<(Feed, String)> = BTreeSet::new();
        for input in inputs {
            let (feed, symbol) = match &input {
                Input::Minute(m) => (m.feed, &m.symbol),
                Input::Tick(t) => (t.feed, &t.symbol),
            };
            let of_feed = self.symbols.entry(feed).or_default();
            if !of_feed.contains_key(symbol.as_str()) {
                of_feed.insert(symbol.clone(), Symbol::default());
            }
            let entry = of_feed.get_mut(symbol.as_str()).expect("inserted above");
            if entry.touch() {
                touched.insert((feed, symbol.clone()));
            }
            let (changed, minute) = match &input {
                Input::Minute(m) => (entry.minute(m), m.start_ms),
                Input::Tick(t) => (entry.tick(t), t.ts_ms.div_euclid(MINUTE_MS) * MINUTE_MS),
            };
            if changed {
                entry.changed(minute);
            }
        }
        let mut out = Vec::new();
        for (feed, name) in touched {
            let symbol = self
                .symbols
                .get_mut(&feed)
                .and_then(|f| f.get_mut(&name))
                .expect("touched symbols exist");
            symbol.touched = false;
            let (changed_from, old_watermark) = (symbol.changed_from, symbol.old_watermark);
            if symbol.series.len() != self.spec.timeframes.len() {
                symbol.series = vec![Vec::new(); self.spec.timeframes.len()];
            }
            for (i, &timeframe) in self.spec.timeframes.iter().enumerate() {
                let day = if feed == Feed::Forex {
                    self.spec.forex_day
                } else {
                    DayStart::Utc
                };
                let window = Window {
                    timeframe,
                    day,
                    new_york: &self.new_york,
                };
                let from = match changed_from {
                    Some(t) => window.start(t).min(window.start(old_watermark)),
                    None => window.start(old_watermark),
                };
                let until = window.start(symbol.watermark);
                if from >= until {
                    continue;
                }
                let series = &mut symbol.series[i];
                remake(series, &symbol.minutes, &window, from, until, |entry| {
                    out.push(Out {
                        feed,
                        derived: Derived {
                            bar: Bar {
                                symbol: name.clone(),
                                timeframe,
                                start_ms: entry.start,
                                open: entry.bar.open,
                                high: entry.bar.high,
                                low: entry.bar.low,
                                close: entry.bar.close,
                                volume: entry.bar.volume,
                                vwap: None,
                                trades: None,
                            },
                            version: entry.version,
                            indicators: entry.indicators,
                        },
                    })
                });
            }
        }
        out
    }

    /// The symbols the engine holds, and their minutes.
    pub fn minutes(&self) -> usize {
        self.symbols
            .values()
            .flat_map(|f| f.values())
            .map(|s| s.minutes.len())
            .sum()
    }
}

/// Makes the windows of `series` from `from` (a window start) up to `until` (the
/// first open window) again from the minutes, keeping the entries before; calls `emit`
/// for each new or changed one.
fn remake(
    series: &mut Vec<Entry>,
    minutes: &BTreeMap<i64, Base>,
    window: &Window<'_>,
    from: i64,
    until: i64,
    mut emit: impl FnMut(&Entry),
) {
    let keep = series.partition_point(|e| e.start < from);
    let old: Vec<Entry> = series.split_off(keep);
    let mut old = old.into_iter().peekable();
    let mut history: Vec<Hlc> = series[keep.saturating_sub(20)..].iter().map(|e| e.bar.hlc()).collect();
    let mut state = series.last().map(|e| e.state.clone()).unwrap_or_default();
    let mut minutes = minutes.range(from..until).peekable();
    while let Some((&first, _)) = minutes.peek() {
        let start = window.start(first);
        let end = window.end(start);
        let mut bar: Option<Ohlcv> = None;
        while let Some((_, Base { bar: m, .. })) = minutes.next_if(|(t, _)| **t < end) {
            bar = Some(match bar {
                None => Ohlcv {
                    volume: 0.0 + m.volume,
                    ..*m
                },
                Some(b) => Ohlcv {
                    open: b.open,
                    high: b.high.max(m.high),
                    low: b.low.min(m.low),
                    close: m.close,
                    volume: b.volume + m.volume,
                },
            });
        }
        let bar = bar.expect("a window with a minute");
        let (next, indicators) = state.step(&history, bar.hlc());
        while old.next_if(|e| e.start < start).is_some() {}
        let before = old.next_if(|e| e.start == start);
        let version = match &before {
            Some(e) if e.bar == bar && e.indicators == indicators => e.version,
            Some(e) => e.version + 1,
            None => 1,
        };
        let entry = Entry {
            start,
            bar,
            state: next.clone(),
            indicators,
            version,
        };
        if before.is_none_or(|e| e.version != version) {
            emit(&entry);
        }
        series.push(entry);
        history.push(bar.hlc());
        if history.len() > 20 {
            history.remove(0);
        }
        state = next;
    }
}

/// How a timeframe cuts time into windows.
struct Window<'a> {
    timeframe: Timeframe,
    day: DayStart,
    new_york: &'a jiff::tz::TimeZone,
}

impl Window<'_> {
    fn is_day(&self) -> bool {
        self.timeframe.unit == TimeUnit::Day
    }

    /// The start of the window holding `t`.
    fn start(&self, t: i64) -> i64 {
        if self.is_day() && self.day == DayStart::NewYork17 {
            return self.new_york_day(t);
        }
        let width = if self.is_day() { DAY_MS } else { self.timeframe.millis() };
        t.div_euclid(width) * width
    }

    fn end(&self, start: i64) -> i64 {
        if self.is_day() && self.day == DayStart::NewYork17 {
            // The next 17:00 in New York: 23, 24 or 25 hours later.
            return self.new_york_day(start + 26 * 3_600_000);
        }
        start + if self.is_day() { DAY_MS } else { self.timeframe.millis() }
    }

    /// The last 17:00 New York time at or before `t`.
    fn new_york_day(&self, t: i64) -> i64 {
        let Ok(ts) = jiff::Timestamp::from_millisecond(t) else {
            return t.div_euclid(DAY_MS) * DAY_MS;
        };
        let local = ts.to_zoned_datetime(self.new_york.clone());
        let mut date = local.date();
        if local.hour() < 17 {
            date = date.yesterday().unwrap_or(date);
        }
        date.at(17, 0, 0, 0)
            .to_zoned_datetime(self.new_york.clone())
            .map(|z| z.timestamp().as_millisecond())
            .unwrap_or(t)
    }
}

/// The symbols with minutes, sorted (for reports).
pub fn symbols(engine: &Engine) -> BTreeSet<(Feed, String)> {
    engine
        .symbols
        .iter()
        .flat_map(|(feed, f)| f.keys().map(|s| (*feed, s.clone())))
        .collect()
}
