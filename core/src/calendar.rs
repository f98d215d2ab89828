//! Market hours: when a market, or one symbol, is in session. One calendar serves the
//! simulator (when it sends), the metrics (when silence means staleness), the gap
//! detector (which minutes should have a bar) and the aggregator (a trading day's
//! bounds).
//!
//! - `forex`: Sunday 17:00 to Friday 17:00 in New York, daylight saving as New York
//!   keeps it (so the opening moves in UTC the weeks the US and Europe change apart).
//! - `crypto`: always.
//! - `us_stocks`: 09:30 to 16:00 in New York on weekdays, but `holidays`; an early
//!   close ends the session at its time instead.
//!
//! `[calendar]` in the config sets the hours of each market and of single symbols, and
//! the stock market's holidays and early closes (the defaults are NYSE's published
//! ones for 2025-2027: check them each year).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Deserialize;

use crate::event::Feed;

/// The session a market or symbol keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hours {
    /// Around the clock, every day.
    Always,
    /// Sunday 17:00 to Friday 17:00, New York time.
    Forex,
    /// 09:30 to 16:00 New York time on weekdays, less holidays and early closes.
    UsStocks,
}

impl fmt::Display for Hours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hours::Always => "always",
            Hours::Forex => "forex",
            Hours::UsStocks => "us_stocks",
        })
    }
}

/// A day the stock market closes early, and when: `"2025-11-28 13:00"` (New York time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct EarlyClose {
    pub date: Date,
    pub close: Time,
}

impl TryFrom<String> for EarlyClose {
    type Error = String;

    fn try_from(text: String) -> Result<EarlyClose, String> {
        let (date, time) = text
            .trim()
            .split_once(' ')
            .ok_or_else(|| format!("{text:?}: expected \"YYYY-MM-DD HH:MM\" (New York time)"))?;
        let date: Date = date.parse().map_err(|e| format!("{text:?}: {e}"))?;
        let close: Time = time.trim().parse().map_err(|e| format!("{text:?}: {e}"))?;
        if !(Time::constant(9, 31, 0, 0)..=Time::constant(16, 0, 0, 0)).contains(&close) {
            return Err(format!("{text:?}: an early close is between 09:31 and 16:00"));
        }
        Ok(EarlyClose { date, close })
    }
}

/// `[calendar]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalendarConfig {
    /// Default "forex".
    pub forex: Hours,
    /// Default "always".
    pub crypto: Hours,
    /// Default "us_stocks".
    pub stocks: Hours,
    /// Hours of single symbols (their canonical form: `EUR/USD`, `BTC-USD`, `AAPL`),
    /// over their market's.
    pub symbols: BTreeMap<String, Hours>,
    /// Days the stock market is closed.
    pub holidays: Vec<Date>,
    /// Days it closes early.
    pub early_closes: Vec<EarlyClose>,
}

/// NYSE's holidays, as published for 2025-2027.
const NYSE_HOLIDAYS: [&str; 30] = [
    "2025-01-01",
    "2025-01-20",
    "2025-02-17",
    "2025-04-18",
    "2025-05-26",
    "2025-06-19",
    "2025-07-04",
    "2025-09-01",
    "2025-11-27",
    "2025-12-25",
    "2026-01-01",
    "2026-01-19",
    "2026-02-16",
    "2026-04-03",
    "2026-05-25",
    "2026-06-19",
    "2026-07-03",
    "2026-09-07",
    "2026-11-26",
    "2026-12-25",
    "2027-01-01",
    "2027-01-18",
    "2027-02-15",
    "2027-03-26",
    "2027-05-31",
    "2027-06-18",
    "2027-07-05",
    "2027-09-06",
    "2027-11-25",
    "2027-12-24",
];

/// NYSE's early closes (13:00), as published for 2025-2027.
const NYSE_EARLY_CLOSES: [&str; 6] = [
    "2025-07-03 13:00",
    "2025-11-28 13:00",
    "2025-12-24 13:00",
    "2026-11-27 13:00",
    "2026-12-24 13:00",
    "2027-11-26 13:00",
];

impl Default for CalendarConfig {
    fn default() -> Self {
        CalendarConfig {
            forex: Hours::Forex,
            crypto: Hours::Always,
            stocks: Hours::UsStocks,
            symbols: BTreeMap::new(),
            holidays: NYSE_HOLIDAYS.iter().map(|d| d.parse().expect("a date")).collect(),
            early_closes: NYSE_EARLY_CLOSES
                .iter()
                .map(|d| EarlyClose::try_from(d.to_string()).expect("an early close"))
                .collect(),
        }
    }
}

/// Market hours, ready to ask.
#[derive(Clone, Debug)]
pub struct Calendar {
    markets: [Hours; 3],
    symbols: BTreeMap<(Feed, String), Hours>,
    holidays: BTreeSet<Date>,
    early_closes: BTreeMap<Date, Time>,
    new_york: TimeZone,
}

/// New York's time zone: from the system's tz database, or the copy jiff bundles
/// (a box without tzdata would otherwise put forex's weekend at the wrong hour).
pub fn new_york() -> TimeZone {
    TimeZone::get("America/New_York").expect("America/New_York in the system's or jiff's bundled tz database")
}

impl Default for Calendar {
    fn default() -> Self {
        Calendar::new(&CalendarConfig::default())
    }
}

impl Calendar {
    pub fn new(config: &CalendarConfig) -> Calendar {
        let mut symbols = BTreeMap::new();
        for (symbol, hours) in &config.symbols {
            // A symbol's market is told by its form, as everywhere else.
            for feed in Feed::ALL {
                if let Some(canonical) = crate::polygon::symbol::canonical(feed, symbol) {
                    if canonical == *symbol {
                        symbols.insert((feed, canonical), *hours);
                    }
                }
            }
        }
        Calendar {
            markets: [config.forex, config.crypto, config.stocks],
            symbols,
            holidays: config.holidays.iter().copied().collect(),
            early_closes: config.early_closes.iter().map(|e| (e.date, e.close)).collect(),
            new_york: new_york(),
        }
    }

    /// Every market and symbol in session around the clock (the demo's and tests'
    /// simulator).
    pub fn always_open() -> Calendar {
        Calendar {
            markets: [Hours::Always; 3],
            symbols: BTreeMap::new(),
            holidays: BTreeSet::new(),
            early_closes: BTreeMap::new(),
            new_york: new_york(),
        }
    }

    /// The hours `symbol` of `feed` keeps.
    pub fn hours(&self, feed: Feed, symbol: &str) -> Hours {
        self.symbols
            .get(&(feed, symbol.to_owned()))
            .copied()
            .unwrap_or(self.markets[feed.index()])
    }

    /// Whether `feed`'s market is in session at `ms` (Unix milliseconds).
    pub fn market_is_open(&self, feed: Feed, ms: i64) -> bool {
        self.in_session(self.markets[feed.index()], ms)
    }

    /// Whether `symbol` of `feed` is in session at `ms`.
    pub fn is_open(&self, feed: Feed, symbol: &str, ms: i64) -> bool {
        self.in_session(self.hours(feed, symbol), ms)
    }

    /// Whether hours `hours` are in session at `ms`.
    pub fn in_session(&self, hours: Hours, ms: i64) -> bool {
        if hours == Hours::Always {
            return true;
        }
        let Ok(ts) = Timestamp::from_millisecond(ms) else {
            return false;
        };
        let local = ts.to_zoned_datetime(self.new_york.clone());
        let time = local.time();
        let weekday = local.weekday();
        let five_pm = Time::constant(17, 0, 0, 0);
        match hours {
            Hours::Always => true,
            Hours::Forex => match weekday {
                Weekday::Saturday => false,
                Weekday::Friday => time < five_pm,
                Weekday::Sunday => time >= five_pm,
                _ => true,
            },
            Hours::UsStocks => {
                let date = local.date();
                if matches!(weekday, Weekday::Saturday | Weekday::Sunday) || self.holidays.contains(&date) {
                    return false;
                }
                let close = self
                    .early_closes
                    .get(&date)
                    .copied()
                    .unwrap_or(Time::constant(16, 0, 0, 0));
                (Time::constant(9, 30, 0, 0)..close).contains(&time)
            }
        }
    }

    /// The minutes of UTC day `day` (days since 1970-01-01) in session under `hours`, a
    /// bit per minute (bit `m % 8` of byte `m / 8`). Sessions begin and end on whole
    /// hours and half hours in UTC but for an early close at another minute, so a
    /// half-hour slot whose first and last minutes agree is taken whole: two looks at the
    /// clock per slot, not one per minute.
    pub fn open_mask(&self, hours: Hours, day: i64) -> [u8; 180] {
        let mut mask = [0u8; 180];
        let set = |mask: &mut [u8; 180], minute: usize| mask[minute / 8] |= 1 << (minute % 8);
        if hours == Hours::Always {
            return [0xff; 180];
        }
        let day_ms = day * 86_400_000;
        for slot in 0..48 {
            let first = slot * 30;
            let at = |m: usize| self.in_session(hours, day_ms + m as i64 * 60_000);
            let (a, b) = (at(first), at(first + 29));
            for m in first..first + 30 {
                if (a && b) || (a != b && at(m)) {
                    set(&mut mask, m);
                }
            }
        }
        mask
    }

    /// The minutes in `from_ms..to_ms` (whole minutes from the first at or after
    /// `from_ms`) in which `symbol` is in session.
    pub fn open_minutes(&self, feed: Feed, symbol: &str, from_ms: i64, to_ms: i64) -> impl Iterator<Item = i64> + '_ {
        let hours = self.hours(feed, symbol);
        let first = from_ms.div_euclid(60_000) * 60_000 + if from_ms.rem_euclid(60_000) > 0 { 60_000 } else { 0 };
        (first..to_ms)
            .step_by(60_000)
            .filter(move |m| self.in_session(hours, *m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        text.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn open(c: &Calendar, feed: Feed, at: &str) -> bool {
        c.market_is_open(feed, ms(at))
    }

    #[test]
    fn forex_opens_sunday_at_five_in_new_york_and_closes_friday_at_five_across_both_2025_changes() {
        let c = Calendar::default();
        // Winter (EST, UTC-5): Sunday 2025-01-05 17:00 New York is 22:00 UTC.
        assert!(!open(&c, Feed::Forex, "2025-01-05T21:59:00Z"));
        assert!(open(&c, Feed::Forex, "2025-01-05T22:00:00Z"));
        assert!(open(&c, Feed::Forex, "2025-01-10T21:59:00Z"));
        assert!(!open(&c, Feed::Forex, "2025-01-10T22:00:00Z"));
        assert!(!open(&c, Feed::Forex, "2025-01-11T12:00:00Z"));
        // The US changes on 2025-03-09 and Europe on 03-30: in between, New York is on
        // EDT (UTC-4), so the week opens at 21:00 UTC.
        assert!(!open(&c, Feed::Forex, "2025-03-09T20:59:00Z"));
        assert!(open(&c, Feed::Forex, "2025-03-09T21:00:00Z"));
        assert!(open(&c, Feed::Forex, "2025-03-14T20:59:00Z"));
        assert!(!open(&c, Feed::Forex, "2025-03-14T21:00:00Z"));
        // The week the US goes back (2025-11-02, a week after Europe's 10-26): EDT
        // until Sunday 02:00, so that Sunday's open is at 17:00 EST = 22:00 UTC.
        assert!(!open(&c, Feed::Forex, "2025-10-31T21:00:00Z"));
        assert!(open(&c, Feed::Forex, "2025-10-31T20:59:00Z"));
        assert!(!open(&c, Feed::Forex, "2025-11-02T21:30:00Z"));
        assert!(open(&c, Feed::Forex, "2025-11-02T22:00:00Z"));
        // Every minute of a week: 5 days x 24 h open.
        let week: Vec<i64> = c
            .open_minutes(
                Feed::Forex,
                "EUR/USD",
                ms("2025-03-16T00:00:00Z"),
                ms("2025-03-23T00:00:00Z"),
            )
            .collect();
        assert_eq!(week.len(), 5 * 24 * 60);
    }

    #[test]
    fn crypto_is_open_across_a_weekend() {
        let c = Calendar::default();
        for at in ["2025-01-11T00:00:00Z", "2025-01-11T12:34:00Z", "2025-01-12T23:59:00Z"] {
            assert!(open(&c, Feed::Crypto, at));
        }
        let minutes = c
            .open_minutes(
                Feed::Crypto,
                "BTC-USD",
                ms("2025-01-11T00:00:00Z"),
                ms("2025-01-13T00:00:00Z"),
            )
            .count();
        assert_eq!(minutes, 2 * 1440);
    }

    #[test]
    fn stocks_keep_the_session_and_skip_a_holiday_and_close_early_when_told() {
        let c = Calendar::default();
        // A Tuesday in EDT: 09:30-16:00 New York is 13:30-20:00 UTC.
        assert!(!open(&c, Feed::Stocks, "2025-06-03T13:29:00Z"));
        assert!(open(&c, Feed::Stocks, "2025-06-03T13:30:00Z"));
        assert!(open(&c, Feed::Stocks, "2025-06-03T19:59:00Z"));
        assert!(!open(&c, Feed::Stocks, "2025-06-03T20:00:00Z"));
        // Independence Day 2025, a Friday: closed.
        assert!(!open(&c, Feed::Stocks, "2025-07-04T15:00:00Z"));
        // The day after Thanksgiving 2025 (EST): closes at 13:00 = 18:00 UTC.
        assert!(open(&c, Feed::Stocks, "2025-11-28T17:59:00Z"));
        assert!(!open(&c, Feed::Stocks, "2025-11-28T18:00:00Z"));
        let day = |d: &str| {
            c.open_minutes(
                Feed::Stocks,
                "AAPL",
                ms(&format!("{d}T00:00:00Z")),
                ms(&format!("{d}T23:59:59Z")),
            )
            .count()
        };
        assert_eq!(day("2025-06-03"), 390);
        assert_eq!(day("2025-07-04"), 0);
        assert_eq!(day("2025-11-28"), 210);
        assert_eq!(day("2025-06-07"), 0);
    }

    #[test]
    fn a_days_mask_agrees_with_every_minute() {
        let config = CalendarConfig {
            early_closes: vec![EarlyClose::try_from("2025-11-28 12:47".to_owned()).unwrap()],
            ..Default::default()
        };
        let c = Calendar::new(&config);
        // Both 2025 DST changes, a weekend, a holiday, an odd early close.
        for date in [
            "2025-03-09",
            "2025-03-10",
            "2025-11-02",
            "2025-01-11",
            "2025-07-04",
            "2025-11-28",
            "2025-03-14",
        ] {
            let day = ms(&format!("{date}T00:00:00Z")) / 86_400_000;
            for hours in [Hours::Forex, Hours::UsStocks, Hours::Always] {
                let mask = c.open_mask(hours, day);
                for m in 0..1440usize {
                    let open = c.in_session(hours, day * 86_400_000 + m as i64 * 60_000);
                    assert_eq!(mask[m / 8] & (1 << (m % 8)) != 0, open, "{date} {hours} minute {m}");
                }
            }
        }
    }

    #[test]
    fn a_symbol_can_keep_other_hours_than_its_market() {
        let config = CalendarConfig {
            symbols: BTreeMap::from([
                ("EUR/USD".to_owned(), Hours::Always),
                ("AAPL".to_owned(), Hours::Always),
            ]),
            holidays: vec![],
            ..Default::default()
        };
        let c = Calendar::new(&config);
        let saturday = ms("2025-01-11T12:00:00Z");
        assert!(c.is_open(Feed::Forex, "EUR/USD", saturday));
        assert!(!c.is_open(Feed::Forex, "GBP/USD", saturday));
        assert!(c.is_open(Feed::Stocks, "AAPL", saturday));
        assert_eq!(c.hours(Feed::Forex, "GBP/USD"), Hours::Forex);
    }

    #[test]
    fn an_early_close_names_its_fault() {
        for (text, says) in [
            ("2025-11-28", "expected"),
            ("2025-13-01 13:00", "2025-13-01"),
            ("2025-11-28 17:00", "between 09:31 and 16:00"),
        ] {
            let err = EarlyClose::try_from(text.to_owned()).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
