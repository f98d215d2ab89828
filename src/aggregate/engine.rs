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
use crate::event::{Bar, Derived, Feed, TimeUnit, Timeframe, DAY_MS, MINUTE_MS};

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

/// The bars of one timeframe's closed windows, a column each (a year of one-minute
/// bars is half a million of them): enough to make any of them again, and to tell
/// whether a bar made again differs from the one emitted.
#[derive(Clone, Debug, Default)]
struct Series {
    starts: Vec<i64>,
    hlc: Vec<Hlc>,
    versions: Vec<u32>,
    /// A hash of each emitted bar's prices, volume and indicators.
    sums: Vec<u64>,
    /// The indicators' state after every [`CHECKPOINT`]th bar: a series is made again
    /// from the checkpoint before the first changed bar, bit for bit as the first time.
    checkpoints: Vec<State>,
}

const CHECKPOINT: usize = 32;

fn sum(bar: &Ohlcv, indicators: &Indicators) -> u64 {
    let mut bytes = [0u8; 8 * 15];
    let values = [bar.open, bar.high, bar.low, bar.close, bar.volume]
        .into_iter()
        .chain(indicators.fields().map(|(_, v)| v.unwrap_or(f64::NAN)));
    for (chunk, v) in bytes.chunks_exact_mut(8).zip(values) {
        chunk.copy_from_slice(&v.to_bits().to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

impl Series {
    fn len(&self) -> usize {
        self.starts.len()
    }

    /// Keeps the first `n` bars; returns the rest's starts, versions and sums.
    fn cut(&mut self, n: usize) -> (Vec<i64>, Vec<u32>, Vec<u64>) {
        self.hlc.truncate(n);
        self.checkpoints.truncate(n / CHECKPOINT);
        (
            self.starts.split_off(n),
            self.versions.split_off(n),
            self.sums.split_off(n),
        )
    }

    /// The indicators' state after the first `len()` bars.
    fn state(&self) -> State {
        let c = self.len() / CHECKPOINT;
        let mut state = match c {
            0 => State::default(),
            c => self.checkpoints[c - 1].clone(),
        };
        for i in c * CHECKPOINT..self.len() {
            state = state.step(&self.hlc[..i], self.hlc[i]).0;
        }
        state
    }

    fn push(&mut self, start: i64, hlc: Hlc, version: u32, sum: u64, after: &State) {
        self.starts.push(start);
        self.hlc.push(hlc);
        self.versions.push(version);
        self.sums.push(sum);
        if self.len().is_multiple_of(CHECKPOINT) {
            self.checkpoints.push(after.clone());
        }
    }
}

#[derive(Debug, Default)]
struct Symbol {
    minutes: BTreeMap<i64, Base>,
    /// The end of the latest minute seen: windows ending by then are closed.
    watermark: i64,
    /// Per timeframe (in the spec's order), the bars of its closed windows.
    series: Vec<Series>,
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
            new_york: tickvault_core::calendar::new_york(),
        }
    }

    /// Takes one round of inputs (in log order: the backfill lane's, then the live
    /// lane's) and returns the bars it made or changed, in (feed, symbol, timeframe,
    /// start) order.
    pub fn round(&mut self, inputs: impl IntoIterator<Item = Input>) -> Vec<Out> {
        let mut touched: BTreeSet<(Feed, String)> = BTreeSet::new();
        let mut taken = 0;
        for input in inputs {
            taken += 1;
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
        // About as many bars out as minutes in, plus the higher timeframes': reserved at
        // once (growing a vector of 100,000 bars by doubling cost more than making them).
        let mut out = Vec::with_capacity(taken + taken / 2);
        for (feed, name) in touched {
            let symbol = self
                .symbols
                .get_mut(&feed)
                .and_then(|f| f.get_mut(&name))
                .expect("touched symbols exist");
            symbol.touched = false;
            let (changed_from, old_watermark) = (symbol.changed_from, symbol.old_watermark);
            if symbol.series.len() != self.spec.timeframes.len() {
                symbol.series = vec![Series::default(); self.spec.timeframes.len()];
            }
            let day = if feed == Feed::Forex {
                self.spec.forex_day
            } else {
                DayStart::Utc
            };
            for (i, &timeframe) in self.spec.timeframes.iter().enumerate() {
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
                remake(
                    series,
                    &symbol.minutes,
                    &window,
                    from,
                    until,
                    |start, bar, indicators, version| {
                        out.push(Out {
                            feed,
                            derived: Derived {
                                bar: Bar {
                                    symbol: name.clone(),
                                    timeframe,
                                    start_ms: start,
                                    open: bar.open,
                                    high: bar.high,
                                    low: bar.low,
                                    close: bar.close,
                                    volume: bar.volume,
                                    vwap: None,
                                    trades: None,
                                },
                                version,
                                indicators: *indicators,
                            },
                        })
                    },
                );
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
/// first open window) again from the minutes, keeping the bars before; calls `emit`
/// for each new or changed one.
fn remake(
    series: &mut Series,
    minutes: &BTreeMap<i64, Base>,
    window: &Window<'_>,
    from: i64,
    until: i64,
    mut emit: impl FnMut(i64, &Ohlcv, &Indicators, u32),
) {
    let keep = series.starts.partition_point(|s| *s < from);
    let (old_starts, old_versions, old_sums) = series.cut(keep);
    let mut old = 0;
    let mut state = series.state();
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
        let (next, indicators) = state.step(&series.hlc, bar.hlc());
        while old < old_starts.len() && old_starts[old] < start {
            old += 1;
        }
        let sum = sum(&bar, &indicators);
        let version = match old_starts.get(old) {
            Some(s) if *s == start && old_sums[old] == sum => old_versions[old],
            Some(s) if *s == start => old_versions[old] + 1,
            _ => 1,
        };
        if old_starts.get(old) != Some(&start) || old_versions[old] != version {
            emit(start, &bar, &indicators, version);
        }
        series.push(start, bar.hlc(), version, sum, &next);
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
        let width = self.timeframe.millis();
        t.div_euclid(width) * width
    }

    fn end(&self, start: i64) -> i64 {
        if self.is_day() && self.day == DayStart::NewYork17 {
            // The next 17:00 in New York: 23, 24 or 25 hours later.
            return self.new_york_day(start + 26 * 3_600_000);
        }
        start + self.timeframe.millis()
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
