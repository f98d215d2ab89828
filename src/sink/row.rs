//! The flat row every sink stores: the natural key, where the log holds the event, and
//! the event's fields (absent ones are null).

use serde::{Deserialize, Serialize};
use tickvault_wal::{Lane, Record};

use crate::event::{Body, Event, EVENT_KIND};

/// One event as the sinks store it: PostgreSQL's columns, in order (ClickHouse keeps a
/// table per kind, with that kind's columns).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    // The natural key.
    pub feed: String,
    pub symbol: String,
    pub kind: String,
    pub timeframe: String,
    pub ts_ms: i64,
    pub ordinal: u32,
    // Where it came from: the capture sequence is ClickHouse's version column.
    pub seq: u64,
    pub lane: String,
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
}

/// What a sink holds per (feed, symbol, kind, timeframe, UTC day), for `verify`.
#[derive(Debug, Deserialize, clickhouse::Row)]
pub struct GroupCount {
    pub feed: String,
    pub symbol: String,
    pub kind: String,
    pub timeframe: String,
    /// Days since 1970-01-01.
    pub day: i64,
    /// Distinct natural keys.
    pub keys: u64,
    /// Rows a reader sees (for ClickHouse with `FINAL`, replaced versions collapsed).
    pub rows: u64,
}

impl Row {
    pub fn from_event(seq: u64, event: &Event) -> Row {
        let key = event.natural_key();
        let mut row = Row {
            feed: key.feed.name().to_owned(),
            symbol: key.symbol,
            kind: key.kind.name().to_owned(),
            timeframe: key.timeframe,
            ts_ms: key.ts_ms,
            ordinal: key.ordinal,
            seq,
            lane: event.capture.lane.name().to_owned(),
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
        };
        match &event.body {
            Body::Quote(q) => {
                row.bid = Some(q.bid);
                row.ask = Some(q.ask);
                row.bid_size = q.bid_size;
                row.ask_size = q.ask_size;
                row.exchange = q.exchange;
            }
            Body::Trade(t) => {
                row.price = Some(t.price);
                row.size = Some(t.size);
                row.exchange = t.exchange;
                row.trade_id = t.trade_id.clone();
                row.conditions = t.conditions.clone();
            }
            Body::Bar(b) => {
                row.open = Some(b.open);
                row.high = Some(b.high);
                row.low = Some(b.low);
                row.close = Some(b.close);
                row.volume = Some(b.volume);
                row.vwap = b.vwap;
                row.trades = b.trades;
            }
        }
        row
    }

    /// The natural key as one string (`forex:EUR/USD:bar:1m:1700000000000:0`), the same
    /// as [`crate::event::NaturalKey`]'s: JetStream's `Nats-Msg-Id`.
    pub fn key_string(&self) -> String {
        format!(
            "{}:{}:{}:{}:{}:{}",
            self.feed, self.symbol, self.kind, self.timeframe, self.ts_ms, self.ordinal
        )
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
                self.rows.push(Row::from_event(record.seq, &event));
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
    use crate::event::{Capture, Feed, Quote};

    #[test]
    fn a_rows_key_string_is_the_natural_keys() {
        let event = Event {
            capture: Capture {
                feed: Feed::Forex,
                lane: Lane::Live,
                captured_at_ns: 5,
            },
            body: Body::Quote(Quote {
                symbol: "EUR/USD".into(),
                ts_ms: 1_700_000_000_123,
                ordinal: 2,
                bid: 1.0,
                ask: 1.1,
                bid_size: None,
                ask_size: Some(3.0),
                exchange: None,
            }),
        };
        let row = Row::from_event(9, &event);
        assert_eq!(row.key_string(), event.natural_key().to_string());
        assert_eq!(
            (row.seq, row.bid, row.ask_size, row.price),
            (9, Some(1.0), Some(3.0), None)
        );
    }
}
