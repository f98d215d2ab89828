//! The coverage index: per feed, symbol and day, which minutes the log holds a
//! one-minute bar for, and which minutes the source confirmed it has no data for (a
//! period downloaded in full that returned no bar for a minute in market hours: a
//! "source hole"). It lives in the log's `coverage` space, one bitmap of 1,440 bits
//! (180 bytes) per (mark, feed, symbol, day), and each mark is written in the same
//! durable write as the records it speaks for (`tickvault_wal::Batch::cover`): a crash
//! cannot leave a bar without its mark or a mark without its bar.
//!
//! Marked: a minute bar from the backfill, a live minute aggregate (`CA`, `XA`, `AM`).
//! The gap detector (`tickvault gaps`) reads it with the calendar: a minute in market
//! hours with neither mark is a gap. [`rebuild`] makes it again from the log.

use std::collections::BTreeMap;

use tickvault_wal::{Batch, LogReader, ReadError, Space};

use crate::event::{Body, Event, Feed, Timeframe, DAY_MS, MINUTE_MS};

/// Bytes of one day's bitmap.
pub const DAY_BYTES: usize = 1440 / 8;

/// What a minute's bit says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mark {
    /// The log holds a one-minute bar for it.
    Bar,
    /// The source has no data for it (a full download returned none).
    Hole,
}

impl Mark {
    fn tag(self) -> &'static str {
        match self {
            Mark::Bar => "bar",
            Mark::Hole => "hole",
        }
    }
}

/// The key of one day's bitmap: `c/<mark>/<feed>/<symbol>\0<day, big-endian i64>`, so a
/// symbol's days sort in order and a prefix scan finds them.
pub fn key(mark: Mark, feed: Feed, symbol: &str, day: i64) -> Vec<u8> {
    let mut key = prefix(mark, feed, symbol);
    key.extend_from_slice(&day.to_be_bytes());
    key
}

fn prefix(mark: Mark, feed: Feed, symbol: &str) -> Vec<u8> {
    format!("c/{}/{}/{symbol}\0", mark.tag(), feed.name()).into_bytes()
}

/// The day (since the epoch) and minute of that day of `minute_ms`.
pub fn day_and_minute(minute_ms: i64) -> (i64, usize) {
    (
        minute_ms.div_euclid(DAY_MS),
        (minute_ms.rem_euclid(DAY_MS) / MINUTE_MS) as usize,
    )
}

/// Marks gathered for one write, a bitmap per key.
#[derive(Debug, Default)]
pub struct Marks {
    days: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Marks {
    pub fn add(&mut self, mark: Mark, feed: Feed, symbol: &str, minute_ms: i64) {
        let (day, minute) = day_and_minute(minute_ms);
        let bits = self
            .days
            .entry(key(mark, feed, symbol, day))
            .or_insert_with(|| vec![0; DAY_BYTES]);
        bits[minute / 8] |= 1 << (minute % 8);
    }

    /// Marks a one-minute bar's minute; other events mark nothing.
    pub fn add_event(&mut self, event: &Event) {
        if let Body::Bar(bar) = &event.body {
            if bar.timeframe == Timeframe::MINUTE {
                self.add(Mark::Bar, event.capture.feed, &bar.symbol, bar.start_ms);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.days.is_empty()
    }

    /// Puts the marks in `batch`, written with its records.
    pub fn into_batch(self, batch: &mut Batch) {
        for (key, bits) in self.days {
            batch.cover(key, bits);
        }
    }
}

/// The source holes of a range downloaded in full: its minutes in `symbol`'s session
/// with no bar in the log and none in `also` (the page about to be appended with them).
/// With how many.
pub fn source_holes(
    reader: &LogReader,
    calendar: &crate::calendar::Calendar,
    feed: Feed,
    symbol: &str,
    (from_ms, to_ms): (i64, i64),
    also: impl Fn(i64) -> bool,
) -> Result<(Marks, u64), ReadError> {
    let mut holes = Marks::default();
    let mut count = 0;
    if from_ms >= to_ms {
        return Ok((holes, count));
    }
    let days = (from_ms.div_euclid(DAY_MS), (to_ms - 1).div_euclid(DAY_MS));
    let bars = Coverage::read(reader, Mark::Bar, feed, symbol, days.0, days.1)?;
    for minute in calendar.open_minutes(feed, symbol, from_ms, to_ms) {
        if !bars.has(minute) && !also(minute) {
            holes.add(Mark::Hole, feed, symbol, minute);
            count += 1;
        }
    }
    Ok((holes, count))
}

/// One symbol's marks of one kind, read from the log: a bitmap per day.
#[derive(Debug, Default, Clone)]
pub struct Coverage {
    days: BTreeMap<i64, Vec<u8>>,
}

impl Coverage {
    /// The marks `mark` of `symbol` on the days `from_day..=to_day`.
    pub fn read(
        reader: &LogReader,
        mark: Mark,
        feed: Feed,
        symbol: &str,
        from_day: i64,
        to_day: i64,
    ) -> Result<Coverage, ReadError> {
        let prefix = prefix(mark, feed, symbol);
        let mut days = BTreeMap::new();
        for (key, bits) in reader.scan_state_from(Space::Coverage, &prefix, &key(mark, feed, symbol, from_day))? {
            let Some(day) = key
                .get(prefix.len()..)
                .and_then(|b| b.try_into().ok())
                .map(i64::from_be_bytes)
            else {
                continue;
            };
            if day > to_day {
                break;
            }
            days.insert(day, bits);
        }
        Ok(Coverage { days })
    }

    /// One day's bitmap, if any minute of it is marked.
    pub fn day(&self, day: i64) -> Option<&[u8]> {
        self.days.get(&day).map(Vec::as_slice)
    }

    pub fn has(&self, minute_ms: i64) -> bool {
        let (day, minute) = day_and_minute(minute_ms);
        self.days
            .get(&day)
            .and_then(|bits| bits.get(minute / 8))
            .is_some_and(|b| b & (1 << (minute % 8)) != 0)
    }

    /// The first marked minute, if any.
    pub fn first(&self) -> Option<i64> {
        self.days.iter().find_map(|(day, bits)| {
            let i = bits.iter().position(|b| *b != 0)?;
            let bit = bits[i].trailing_zeros() as i64;
            Some(day * DAY_MS + (i as i64 * 8 + bit) * MINUTE_MS)
        })
    }

    /// Marked minutes in all.
    pub fn count(&self) -> u64 {
        self.days.values().flatten().map(|b| u64::from(b.count_ones())).sum()
    }
}
