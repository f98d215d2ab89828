//! The market events tickvault carries, their natural keys, and how they are stored.
//!
//! An event is stored as one log record of kind [`EVENT_KIND`] whose payload is the
//! postcard encoding of [`Event`] (format frozen: see `tickvault_wal::payload`).

use std::fmt;
use std::str::FromStr;

use crate::indicators::Indicators;
use crate::{payload, Lane, RecordKind};
use serde::{Deserialize, Serialize};

pub mod identity;

/// Record kind of a market event (payload: postcard [`Event`]).
pub const EVENT_KIND: RecordKind = RecordKind(1);
/// Record kind of the synthetic records `wal load` writes (payload: see `cli::load`).
pub const SYNTHETIC_KIND: RecordKind = RecordKind(200);

/// The market timestamps an event may have: 2000-01-01 to 2100-01-01 (Unix ms). Far
/// wider than any market data, far narrower than what overflows a sink's timestamp.
pub const SANE_TS_MS: std::ops::Range<i64> = 946_684_800_000..4_102_444_800_000;

/// A minute and a day in ms: the steps of bars, of the coverage index and of days.
pub const MINUTE_MS: i64 = 60_000;
pub const DAY_MS: i64 = 86_400_000;

/// Now, in ms since the epoch: the clock market timestamps are compared with.
pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Now, in nanoseconds since the epoch, as [`Capture::captured_at_ns`] records it.
pub fn now_ns() -> i64 {
    i64::try_from(jiff::Timestamp::now().as_nanosecond()).unwrap_or(i64::MAX)
}

/// The market a feed serves (Polygon's WebSocket cluster).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Feed {
    Forex,
    Crypto,
    Stocks,
}

impl Feed {
    pub const ALL: [Feed; 3] = [Feed::Forex, Feed::Crypto, Feed::Stocks];

    /// Its place in [`Feed::ALL`], for per-feed counters.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Feed::Forex => "forex",
            Feed::Crypto => "crypto",
            Feed::Stocks => "stocks",
        }
    }
}

impl fmt::Display for Feed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The unit of a bar's timeframe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    Second,
    Minute,
    Hour,
    Day,
}

impl TimeUnit {
    pub fn millis(self) -> i64 {
        match self {
            TimeUnit::Second => 1_000,
            TimeUnit::Minute => 60_000,
            TimeUnit::Hour => 3_600_000,
            TimeUnit::Day => 86_400_000,
        }
    }
}

/// A bar's timeframe: `multiplier` units, written `1m`, `5m`, `1h`, `1d`, `1s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timeframe {
    pub multiplier: u32,
    pub unit: TimeUnit,
}

impl Timeframe {
    pub const SECOND: Timeframe = Timeframe {
        multiplier: 1,
        unit: TimeUnit::Second,
    };
    pub const MINUTE: Timeframe = Timeframe {
        multiplier: 1,
        unit: TimeUnit::Minute,
    };

    pub fn millis(self) -> i64 {
        i64::from(self.multiplier) * self.unit.millis()
    }
}

impl fmt::Display for Timeframe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.unit {
            TimeUnit::Second => "s",
            TimeUnit::Minute => "m",
            TimeUnit::Hour => "h",
            TimeUnit::Day => "d",
        };
        write!(f, "{}{}", self.multiplier, unit)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("bad timeframe {0:?}: expected a count and a unit, like 1s, 1m, 5m, 1h, 1d")]
pub struct BadTimeframe(String);

impl FromStr for Timeframe {
    type Err = BadTimeframe;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadTimeframe(s.to_owned());
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let multiplier: u32 = s[..split].parse().map_err(|_| bad())?;
        let unit = match &s[split..] {
            "s" => TimeUnit::Second,
            "m" => TimeUnit::Minute,
            "h" => TimeUnit::Hour,
            "d" => TimeUnit::Day,
            _ => return Err(bad()),
        };
        if multiplier == 0 {
            return Err(bad());
        }
        Ok(Timeframe { multiplier, unit })
    }
}

/// A best bid and offer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quote {
    pub symbol: String,
    /// Exchange timestamp, Unix milliseconds.
    pub ts_ms: i64,
    /// Tells this quote from others of its symbol with the same timestamp (see
    /// [`identity`]); set by the live collector.
    pub uid: u64,
    pub bid: f64,
    pub ask: f64,
    pub bid_size: Option<f64>,
    pub ask_size: Option<f64>,
    pub exchange: Option<i32>,
}

/// A trade print.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trade {
    pub symbol: String,
    pub ts_ms: i64,
    /// Tells this trade from others of its symbol with the same timestamp (see
    /// [`identity`]); set by the live collector.
    pub uid: u64,
    pub price: f64,
    pub size: f64,
    pub exchange: Option<i32>,
    pub trade_id: Option<String>,
    pub conditions: Vec<i32>,
}

/// An OHLCV bar, identified by the start of its window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bar {
    pub symbol: String,
    pub timeframe: Timeframe,
    /// Window start, Unix milliseconds.
    pub start_ms: i64,
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    pub volume: f64,
    pub vwap: Option<f64>,
    pub trades: Option<u64>,
}

/// A bar the aggregator made from captured one-minute bars (the `derived` lane): the
/// same [`Bar`], its version (higher when late data changed it or the bars before it)
/// and its indicators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Derived {
    pub bar: Bar,
    /// 1 when first made; each change of the bar or its indicators adds one. Sinks keep
    /// the highest.
    pub version: u32,
    pub indicators: Indicators,
}

// Variants are added at the end only: postcard writes the variant's index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Body {
    Quote(Quote),
    Trade(Trade),
    Bar(Bar),
    // Boxed: a derived bar is three times the size of the others (postcard writes it alike).
    Derived(Box<Derived>),
}

/// Where and when an event was captured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Capture {
    pub feed: Feed,
    pub lane: Lane,
    /// When the appliance received it, Unix nanoseconds.
    pub captured_at_ns: i64,
}

/// One captured market event: what the log stores and the sinks receive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub capture: Capture,
    pub body: Body,
}

fn bar_finite(b: &Bar) -> bool {
    [b.open, b.high, b.low, b.close, b.volume]
        .iter()
        .chain(b.vwap.iter())
        .all(|v| v.is_finite())
}

/// The kind of an event, as it appears in natural keys and table names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Quote,
    Trade,
    Bar,
    Derived,
}

impl EventKind {
    pub const ALL: [EventKind; 4] = [EventKind::Quote, EventKind::Trade, EventKind::Bar, EventKind::Derived];
    /// The kinds captured from the source (the live and backfill lanes).
    pub const CAPTURED: [EventKind; 3] = [EventKind::Quote, EventKind::Trade, EventKind::Bar];

    /// Its place in [`EventKind::ALL`], for per-kind counters.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Quote => "quote",
            EventKind::Trade => "trade",
            EventKind::Bar => "bar",
            EventKind::Derived => "derived",
        }
    }
}

/// The identity of an event: the same market fact always has the same key, whichever
/// appliance captured it and however often it was replayed. Sinks deduplicate on it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NaturalKey {
    pub feed: Feed,
    pub symbol: String,
    pub kind: EventKind,
    /// `tick` for quotes and trades; the bar's timeframe otherwise.
    pub timeframe: String,
    pub ts_ms: i64,
    /// 0 for bars (one per symbol, timeframe and window); see [`identity`] for ticks.
    pub uid: u64,
}

impl fmt::Display for NaturalKey {
    /// The key as one string, e.g. `forex:EUR/USD:bar:1m:1700000000000:0`: used as
    /// JetStream's `Nats-Msg-Id`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}:{}:{}",
            self.feed,
            self.symbol,
            self.kind.name(),
            self.timeframe,
            self.ts_ms,
            self.uid
        )
    }
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self.body {
            Body::Quote(_) => EventKind::Quote,
            Body::Trade(_) => EventKind::Trade,
            Body::Bar(_) => EventKind::Bar,
            Body::Derived(_) => EventKind::Derived,
        }
    }

    pub fn symbol(&self) -> &str {
        match &self.body {
            Body::Quote(q) => &q.symbol,
            Body::Trade(t) => &t.symbol,
            Body::Bar(b) => &b.symbol,
            Body::Derived(d) => &d.bar.symbol,
        }
    }

    /// The event's market timestamp (a bar's window start), Unix milliseconds.
    pub fn ts_ms(&self) -> i64 {
        match &self.body {
            Body::Quote(q) => q.ts_ms,
            Body::Trade(t) => t.ts_ms,
            Body::Bar(b) => b.start_ms,
            Body::Derived(d) => d.bar.start_ms,
        }
    }

    pub fn natural_key(&self) -> NaturalKey {
        let (timeframe, uid) = match &self.body {
            Body::Quote(q) => ("tick".to_owned(), q.uid),
            Body::Trade(t) => ("tick".to_owned(), t.uid),
            // One bar per symbol, timeframe and window: the uid is always 0.
            Body::Bar(b) => (b.timeframe.to_string(), 0),
            // One per symbol, timeframe and window too; its versions share the key.
            Body::Derived(d) => (d.bar.timeframe.to_string(), 0),
        };
        NaturalKey {
            feed: self.capture.feed,
            symbol: self.symbol().to_owned(),
            kind: self.kind(),
            timeframe,
            ts_ms: self.ts_ms(),
            uid,
        }
    }

    /// Why this event cannot be stored as it is, if it cannot: a timestamp outside
    /// [`SANE_TS_MS`], a price or size that is not a finite number, a NUL in a string.
    /// Every sink refuses such values (PostgreSQL's timestamp overflows, text with NUL
    /// is an error), so they are refused at capture, counted and logged as malformed,
    /// and never reach the log.
    pub fn problem(&self) -> Option<&'static str> {
        let (ts, symbol) = (self.ts_ms(), self.symbol());
        if !SANE_TS_MS.contains(&ts) {
            return Some("timestamp outside 2000-01-01..2100-01-01");
        }
        if symbol.is_empty() || symbol.contains('\0') {
            return Some("symbol empty or with a NUL");
        }
        let finite = |values: &[Option<f64>]| values.iter().flatten().all(|v| v.is_finite());
        let ok = match &self.body {
            Body::Quote(q) => finite(&[Some(q.bid), Some(q.ask), q.bid_size, q.ask_size]),
            Body::Trade(t) => {
                if t.trade_id.as_deref().is_some_and(|id| id.contains('\0')) {
                    return Some("trade id with a NUL");
                }
                finite(&[Some(t.price), Some(t.size)])
            }
            Body::Bar(b) => bar_finite(b),
            Body::Derived(d) => bar_finite(&d.bar) && finite(&d.indicators.fields().map(|(_, v)| v)),
        };
        (!ok).then_some("a price, size or volume that is not a finite number")
    }

    /// The bar of a captured or derived bar event.
    pub fn bar(&self) -> Option<&Bar> {
        match &self.body {
            Body::Bar(b) => Some(b),
            Body::Derived(d) => Some(&d.bar),
            _ => None,
        }
    }

    pub fn to_payload(&self) -> Result<Vec<u8>, payload::PayloadError> {
        payload::to_bytes(self)
    }

    pub fn from_payload(bytes: &[u8]) -> Result<Event, payload::PayloadError> {
        payload::from_bytes(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Event {
        Event {
            capture: Capture {
                feed: Feed::Forex,
                lane: Lane::Live,
                captured_at_ns: 1_700_000_000_123_456_789,
            },
            body: Body::Quote(Quote {
                symbol: "EUR/USD".into(),
                ts_ms: 1_700_000_000_123,
                uid: 2,
                bid: 1.0842,
                ask: 1.0843,
                bid_size: None,
                ask_size: None,
                exchange: Some(48),
            }),
        }
    }

    /// The fuzz target's seed (fuzz/seeds/decode_event/quote.bin) is this sample's
    /// payload: a fuzzer starts from a valid one. TICKVAULT_WRITE_SEEDS=1 writes it.
    #[test]
    fn the_fuzz_seed_is_a_valid_payload() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/decode_event/quote.bin");
        if std::env::var_os("TICKVAULT_WRITE_SEEDS").is_some() {
            std::fs::write(&path, sample().to_payload().unwrap()).unwrap();
        }
        assert_eq!(Event::from_payload(&std::fs::read(&path).unwrap()).unwrap(), sample());
    }

    #[test]
    fn an_event_round_trips_through_its_payload() {
        let event = sample();
        assert_eq!(Event::from_payload(&event.to_payload().unwrap()).unwrap(), event);
    }

    #[test]
    fn the_natural_key_ignores_capture_time_and_lane() {
        let a = sample();
        let mut b = sample();
        b.capture.captured_at_ns += 5_000_000_000;
        b.capture.lane = Lane::Backfill;
        assert_eq!(a.natural_key(), b.natural_key());
        assert_eq!(a.natural_key().to_string(), "forex:EUR/USD:quote:tick:1700000000123:2");
    }

    #[test]
    fn an_event_written_when_the_key_held_a_u32_ordinal_reads_with_it_as_its_uid() {
        // The shape of a quote before the uid (postcard: field names are not written).
        #[derive(Serialize)]
        struct OldQuote<'a> {
            symbol: &'a str,
            ts_ms: i64,
            ordinal: u32,
            bid: f64,
            ask: f64,
            bid_size: Option<f64>,
            ask_size: Option<f64>,
            exchange: Option<i32>,
        }
        #[derive(Serialize)]
        enum OldBody<'a> {
            Quote(OldQuote<'a>),
        }
        #[derive(Serialize)]
        struct OldEvent<'a> {
            capture: Capture,
            body: OldBody<'a>,
        }
        let event = sample();
        let old = OldEvent {
            capture: event.capture.clone(),
            body: OldBody::Quote(OldQuote {
                symbol: "EUR/USD",
                ts_ms: 1_700_000_000_123,
                ordinal: 2,
                bid: 1.0842,
                ask: 1.0843,
                bid_size: None,
                ask_size: None,
                exchange: Some(48),
            }),
        };
        assert_eq!(Event::from_payload(&payload::to_bytes(&old).unwrap()).unwrap(), event);
    }

    #[test]
    fn events_a_sink_would_refuse_have_a_problem() {
        assert_eq!(sample().problem(), None);
        let mut far = sample();
        if let Body::Quote(q) = &mut far.body {
            q.ts_ms = 18_500_000_000_000_000;
        }
        assert!(far.problem().unwrap().contains("timestamp"));
        let mut nan = sample();
        if let Body::Quote(q) = &mut nan.body {
            q.bid = f64::NAN;
        }
        assert!(nan.problem().unwrap().contains("finite"));
        let trade = Event {
            capture: sample().capture,
            body: Body::Trade(Trade {
                symbol: "BTC-USD".into(),
                ts_ms: 1_700_000_000_000,
                uid: 0,
                price: 1.0,
                size: f64::INFINITY,
                exchange: None,
                trade_id: Some("a\0b".into()),
                conditions: vec![],
            }),
        };
        assert!(trade.problem().unwrap().contains("NUL"));
    }

    #[test]
    fn timeframes_parse_and_print_alike() {
        for s in ["1s", "1m", "5m", "15m", "1h", "1d"] {
            assert_eq!(s.parse::<Timeframe>().unwrap().to_string(), s);
        }
        for bad in ["", "m", "0m", "1w", "1.5m", "-1m"] {
            assert!(bad.parse::<Timeframe>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn decoding_any_payload_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Event::from_payload(&bytes);
        }

        #[test]
        fn bars_round_trip(symbol in "[A-Z]{3}/[A-Z]{3}", start in any::<i64>(), o in any::<f64>(), v in any::<f64>(), n in any::<Option<u64>>()) {
            let event = Event {
                capture: Capture { feed: Feed::Forex, lane: Lane::Backfill, captured_at_ns: 1 },
                body: Body::Bar(Bar { symbol, timeframe: Timeframe::MINUTE, start_ms: start, open: o, high: o, low: o, close: o, volume: v, vwap: None, trades: n }),
            };
            let back = Event::from_payload(&event.to_payload().unwrap()).unwrap();
            // Compare bit patterns: NaN != NaN.
            prop_assert_eq!(format!("{back:?}"), format!("{event:?}"));
        }
    }
}
