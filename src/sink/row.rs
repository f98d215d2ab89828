//! The flat row every sink stores: the natural key, where the log holds the event, and
//! the event's fields (absent ones are null).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use tickvault_wal::{Lane, Record};

use crate::event::{Bar, Body, Event, Timeframe, EVENT_KIND};
use crate::indicators::Indicators;

/// One event as the sinks store it: PostgreSQL's columns, in order (ClickHouse keeps a
/// table per kind, with that kind's columns). The names a row shares with every other
/// of its feed, kind or lane are borrowed, not allocated per row: a backfill batch
/// makes 100,000 of these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    // The natural key.
    pub feed: Cow<'static, str>,
    pub symbol: String,
    pub kind: Cow<'static, str>,
    pub timeframe: Cow<'static, str>,
    pub ts_ms: i64,
    pub uid: u64,
    // Where it came from: the capture sequence is ClickHouse's version column.
    pub seq: u64,
    pub lane: Cow<'static, str>,
    pub captured_at_ns: i64,
    // The event.
    pub bid: Option<f64>,
    pub ask: Option<f64>,
    pub bid_size: Option<f64>,
    pub ask_size: Option<f64>,
    pub price: Option<f64>,
    pub size: Option<f64>,
    pub open: Option<f64>,
    pub high: Option<f64>,
    pub low: Option<f64>,
    pub close: Option<f64>,
    pub volume: Option<f64>,
    pub vwap: Option<f64>,
    pub trades: Option<u64>,
    pub exchange: Option<i32>,
    pub trade_id: Option<String>,
    /// Absent in a JetStream message when empty.
    #[serde(default)]
    pub conditions: Vec<i32>,
    /// A derived bar's version: of the rows of one natural key, sinks keep the highest.
    pub version: Option<u32>,
    /// A derived bar's indicators (boxed: most rows have none).
    pub indicators: Option<Box<Indicators>>,
}

/// The natural key of one row (or message) a sink holds, for `verify`.
#[derive(Debug, Deserialize, clickhouse::Row)]
pub struct SinkKey {
    pub feed: String,
    pub symbol: String,
    pub kind: String,
    pub timeframe: String,
    pub ts_ms: i64,
    pub uid: u64,
}

impl SinkKey {
    /// As [`Row::key_string`].
    pub fn key_string(&self) -> String {
        format!(
            "{}:{}:{}:{}:{}:{}",
            self.feed, self.symbol, self.kind, self.timeframe, self.ts_ms, self.uid
        )
    }
}

impl Row {
    /// The row of the event at log position `seq`.
    pub fn from_event(seq: u64, event: Event) -> Row {
        let kind = event.kind();
        let mut row = Row {
            feed: Cow::Borrowed(event.capture.feed.name()),
            symbol: String::new(),
            kind: Cow::Borrowed(kind.name()),
            timeframe: Cow::Borrowed("tick"),
            ts_ms: event.ts_ms(),
            uid: 0,
            seq,
            lane: Cow::Borrowed(event.capture.lane.name()),
            captured_at_ns: event.capture.captured_at_ns,
            bid: None,
            ask: None,
            bid_size: None,
            ask_size: None,
            price: None,
            size: None,
            open: None,
            high: None,
            low: None,
            close: None,
            volume: None,
            vwap: None,
            trades: None,
            exchange: None,
            trade_id: None,
            conditions: Vec::new(),
            version: None,
            indicators: None,
        };
        // The same fields as `Event::natural_key`, moved out of the event.
        match event.body {
            Body::Quote(q) => {
                row.symbol = q.symbol;
                row.uid = q.uid;
                row.bid = Some(q.bid);
                row.ask = Some(q.ask);
                row.bid_size = q.bid_size;
                row.ask_size = q.ask_size;
                row.exchange = q.exchange;
            }
            Body::Trade(t) => {
                row.symbol = t.symbol;
                row.uid = t.uid;
                row.price = Some(t.price);
                row.size = Some(t.size);
                row.exchange = t.exchange;
                row.trade_id = t.trade_id;
                row.conditions = t.conditions;
            }
            Body::Bar(b) => row.set_bar(b),
            Body::Derived(d) => {
                let d = *d;
                row.set_bar(d.bar);
                row.version = Some(d.version);
                row.indicators = Some(Box::new(d.indicators));
            }
        }
        row
    }

    fn set_bar(&mut self, b: Bar) {
        self.symbol = b.symbol;
        self.timeframe = timeframe_name(b.timeframe);
        self.open = Some(b.open);
        self.high = Some(b.high);
        self.low = Some(b.low);
        self.close = Some(b.close);
        self.volume = Some(b.volume);
        self.vwap = b.vwap;
        self.trades = b.trades;
    }

    /// The natural key as one string (`forex:EUR/USD:bar:1m:1700000000000:0`), the same
    /// as [`crate::event::NaturalKey`]'s, and for a derived bar its version after it
    /// (`...:0:v2`): JetStream's `Nats-Msg-Id`, so that each version is stored once.
    pub fn key_string(&self) -> String {
        let key = format!(
            "{}:{}:{}:{}:{}:{}",
            self.feed, self.symbol, self.kind, self.timeframe, self.ts_ms, self.uid
        );
        match self.version {
            Some(version) => format!("{key}:v{version}"),
            None => key,
        }
    }

    /// The `uid` `verify` compares: a derived bar's version (each version is a key of
    /// its own there), else the natural key's.
    pub fn verify_uid(&self) -> u64 {
        self.version.map_or(self.uid, u64::from)
    }
}

/// A timeframe as the sinks name it (`1m`), borrowed for the common ones.
fn timeframe_name(timeframe: Timeframe) -> Cow<'static, str> {
    match timeframe {
        Timeframe::SECOND => Cow::Borrowed("1s"),
        Timeframe::MINUTE => Cow::Borrowed("1m"),
        other => Cow::Owned(other.to_string()),
    }
}

/// A run of the log, cut at log positions: one lane's records up to `last_seq`, after
/// the cursor. Retries send this same batch again, row for row.
#[derive(Clone, Debug)]
pub struct Batch {
    pub lane: Lane,
    /// The last log position it covers; the cursor moves here once the sink acknowledged.
    pub last_seq: u64,
    pub rows: Vec<Row>,
}

/// What became of one record added to a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    Row,
    /// Not an event (a drill record): covered, not sent.
    Skipped,
    /// An event record whose payload did not decode: counted and logged, never sent.
    Undecodable,
}

impl Batch {
    /// An empty batch of `lane` starting after the cursor `after`.
    pub fn new(lane: Lane, after: u64) -> Batch {
        Batch {
            lane,
            last_seq: after,
            rows: Vec::new(),
        }
    }

    /// Adds one record read from the log.
    pub fn push(&mut self, record: &Record) -> Pushed {
        self.last_seq = self.last_seq.max(record.seq);
        if record.kind != EVENT_KIND {
            return Pushed::Skipped;
        }
        match Event::from_payload(&record.payload) {
            Ok(event) => {
                self.rows.push(Row::from_event(record.seq, event));
                Pushed::Row
            }
            Err(e) => {
                tracing::error!(lane = %record.lane, seq = record.seq, error = %e, "event record does not decode; not forwarded");
                Pushed::Undecodable
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Bar, Capture, Feed, Quote, TimeUnit, Trade};

    fn event(body: Body) -> Event {
        Event {
            capture: Capture {
                feed: Feed::Forex,
                lane: Lane::Live,
                captured_at_ns: 5,
            },
            body,
        }
    }

    fn bar(timeframe: Timeframe) -> Event {
        event(Body::Bar(Bar {
            symbol: "EUR/USD".into(),
            timeframe,
            start_ms: 1_700_000_040_000,
            open: 1.0,
            high: 2.0,
            low: 0.5,
            close: 1.5,
            volume: 10.0,
            vwap: None,
            trades: Some(4),
        }))
    }

    #[test]
    fn a_rows_key_string_is_the_natural_keys() {
        let quote = event(Body::Quote(Quote {
            symbol: "EUR/USD".into(),
            ts_ms: 1_700_000_000_123,
            uid: 2,
            bid: 1.0,
            ask: 1.1,
            bid_size: None,
            ask_size: Some(3.0),
            exchange: None,
        }));
        let row = Row::from_event(9, quote.clone());
        assert_eq!(row.key_string(), quote.natural_key().to_string());
        assert_eq!(
            (row.seq, row.bid, row.ask_size, row.price),
            (9, Some(1.0), Some(3.0), None)
        );
        let trade = event(Body::Trade(Trade {
            symbol: "BTC-USD".into(),
            ts_ms: 1_700_000_000_456,
            uid: 3,
            price: 5.0,
            size: 0.25,
            exchange: Some(1),
            trade_id: Some("t1".into()),
            conditions: vec![2, 7],
        }));
        let row = Row::from_event(10, trade.clone());
        assert_eq!(row.key_string(), trade.natural_key().to_string());
        assert_eq!(
            (row.price, row.trade_id.as_deref(), row.conditions.as_slice(), row.bid),
            (Some(5.0), Some("t1"), &[2, 7][..], None)
        );
        let five = Timeframe {
            multiplier: 5,
            unit: TimeUnit::Minute,
        };
        for timeframe in [Timeframe::MINUTE, Timeframe::SECOND, five] {
            let bar = bar(timeframe);
            let row = Row::from_event(11, bar.clone());
            assert_eq!(row.key_string(), bar.natural_key().to_string());
            assert_eq!(
                (row.timeframe.as_ref(), row.trades),
                (timeframe.to_string().as_str(), Some(4))
            );
        }
    }
}
