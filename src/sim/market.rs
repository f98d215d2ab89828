//! The simulator's market: seeded, deterministic, and the same from every angle.
//!
//! Every minute of every symbol is a pure function of `(seed, symbol, minute)`: the REST
//! bar for a minute can be computed in constant time for any date, and the live quotes
//! of that minute are laid out inside that bar (the first quote's bid is the open, the
//! last's the close, one touches the high, one the low), so live quotes and REST bars
//! agree exactly for the same minute. Its hours are the default calendar's
//! (`tickvault_core::calendar`): forex closed from Friday 17:00 to Sunday 17:00 New York
//! time, stocks 09:30-16:00 New York on weekdays but NYSE's holidays, crypto never closed.

use tickvault_core::calendar::Calendar;

use crate::event::{Feed, MINUTE_MS};
use crate::synthetic::splitmix;

fn hash_str(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A uniform float in [0, 1) from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// One simulated quote (bid and ask).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimQuote {
    pub ts_ms: i64,
    pub bid: f64,
    pub ask: f64,
}

/// One simulated minute bar, built from the minute's quotes' bids.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimBar {
    pub start_ms: i64,
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    /// Number of quotes in the minute (Polygon's forex `v` and `n`).
    pub count: u64,
    pub vwap: f64,
}

/// The simulated market for one seed.
#[derive(Clone, Debug)]
pub struct Market {
    pub seed: u64,
    /// Average quotes per minute per symbol while the market is open.
    pub quotes_per_minute: u32,
    /// One minute in `hole_every` (on average) has no data at the source; 0 for none.
    pub hole_every: u32,
    /// Ignore market hours (forex weekends, stock sessions): for tests and demos that
    /// need every market live whatever the day. Default false.
    pub always_open: bool,
    calendar: Calendar,
}

impl Market {
    pub fn new(seed: u64, quotes_per_minute: u32, hole_every: u32) -> Market {
        Market {
            seed,
            quotes_per_minute: quotes_per_minute.clamp(1, 60_000),
            hole_every,
            always_open: false,
            calendar: Calendar::default(),
        }
    }

    fn h(&self, symbol: &str, a: i64, b: u64) -> u64 {
        splitmix(self.seed ^ splitmix(hash_str(symbol) ^ splitmix(a as u64 ^ splitmix(b))))
    }

    /// Whether the market of `feed` is open during the minute starting at `minute_ms`
    /// (by the default calendar: `tickvault_core::calendar`).
    pub fn is_open(&self, feed: Feed, minute_ms: i64) -> bool {
        self.always_open || self.calendar.market_is_open(feed, minute_ms)
    }

    /// Whether the source itself has no data for this minute (a "hole").
    pub fn is_hole(&self, symbol: &str, minute_ms: i64) -> bool {
        self.hole_every > 0
            && self
                .h(symbol, minute_ms, 0x401e)
                .is_multiple_of(u64::from(self.hole_every))
    }

    fn base_price(feed: Feed, symbol: &str) -> f64 {
        let u = unit(splitmix(hash_str(symbol)));
        match feed {
            Feed::Forex => 0.5 + 1.5 * u,
            Feed::Crypto => 10.0 + 50_000.0 * u * u,
            Feed::Stocks => 10.0 + 490.0 * u,
        }
    }

    /// A smooth price path: hourly anchors joined by cosine interpolation.
    fn mid(&self, feed: Feed, symbol: &str, ts_ms: i64) -> f64 {
        const HOUR: i64 = 3_600_000;
        let hour = ts_ms.div_euclid(HOUR);
        let frac = ts_ms.rem_euclid(HOUR) as f64 / HOUR as f64;
        let anchor = |h: i64| unit(self.h(symbol, h, 0xa7c4)) * 2.0 - 1.0;
        let w = (1.0 - (frac * std::f64::consts::PI).cos()) / 2.0;
        let noise = anchor(hour) * (1.0 - w) + anchor(hour + 1) * w;
        Self::base_price(feed, symbol) * (1.0 + 0.02 * noise)
    }

    fn round(feed: Feed, price: f64) -> f64 {
        let scale = match feed {
            Feed::Forex => 1e5,
            _ => 1e2,
        };
        (price * scale).round() / scale
    }

    /// How many quotes the minute holds (0 when closed or a hole).
    pub fn quote_count(&self, feed: Feed, symbol: &str, minute_ms: i64) -> u64 {
        if !self.is_open(feed, minute_ms) || self.is_hole(symbol, minute_ms) {
            return 0;
        }
        let q = u64::from(self.quotes_per_minute);
        // Between half and one and a half times the average.
        (q / 2 + self.h(symbol, minute_ms, 0xc0de) % (q + 1)).clamp(1, 60_000)
    }

    /// The minute bar starting at `minute_ms` (which must be a minute boundary), or
    /// `None` when the minute has no quotes. Constant time.
    pub fn bar(&self, feed: Feed, symbol: &str, minute_ms: i64) -> Option<SimBar> {
        let count = self.quote_count(feed, symbol, minute_ms);
        if count == 0 {
            return None;
        }
        let open = Self::round(feed, self.mid(feed, symbol, minute_ms));
        let close = if count == 1 {
            open
        } else {
            Self::round(feed, self.mid(feed, symbol, minute_ms + MINUTE_MS - 1))
        };
        let tick = if feed == Feed::Forex { 1e-5 } else { 1e-2 };
        let (mut high, mut low) = (open.max(close), open.min(close));
        // Quote 1 touches the high (when there are at least 3), quote 2 the low (at least 4).
        if count >= 3 {
            let up = (self.h(symbol, minute_ms, 0x41) % 6) as f64 * tick;
            high = Self::round(feed, high + up);
        }
        if count >= 4 {
            let down = (self.h(symbol, minute_ms, 0x10) % 6) as f64 * tick;
            low = Self::round(feed, low - down);
        }
        Some(SimBar {
            start_ms: minute_ms,
            open,
            high,
            low,
            close,
            count,
            vwap: Self::round(feed, (open + high + low + close) / 4.0),
        })
    }

    /// The quotes of one minute, in time order, laid out inside [`Market::bar`].
    pub fn quotes(&self, feed: Feed, symbol: &str, minute_ms: i64) -> Vec<SimQuote> {
        self.quotes_between(feed, symbol, minute_ms, minute_ms - 1, minute_ms + MINUTE_MS - 1)
    }

    /// The quotes of the minute starting at `minute_ms` with `after < ts <= upto`,
    /// computed without generating the rest of the minute (a live feed asks for a few
    /// milliseconds of a minute that may hold 60,000 quotes).
    pub fn quotes_between(&self, feed: Feed, symbol: &str, minute_ms: i64, after: i64, upto: i64) -> Vec<SimQuote> {
        if upto < minute_ms || after >= minute_ms + MINUTE_MS - 1 {
            return Vec::new();
        }
        let Some(bar) = self.bar(feed, symbol, minute_ms) else {
            return Vec::new();
        };
        let k = bar.count;
        let spread_ticks = 1 + self.h(symbol, minute_ms, 0x5d) % 3;
        let tick = if feed == Feed::Forex { 1e-5 } else { 1e-2 };
        // Quote i lies in its slot [i*M/k, (i+1)*M/k) of the minute (M its milliseconds):
        // the slots cover the whole minute whatever k (a width rounded down for all would
        // leave the minute's end empty: 21,234 quotes in 2 ms slots end 17.5 s early).
        let minute = MINUTE_MS as u64;
        let slot_start = |i: u64| i * minute / k;
        let offset = |t: i64| u64::try_from((t - minute_ms).max(0)).unwrap_or(0);
        // The slots holding `after` and `upto` (the division may name the one before):
        // a quote of an earlier or a later one cannot lie in (after, upto].
        let first = (offset(after) * k / minute).min(k - 1);
        let last = (offset(upto) * k / minute + 1).min(k - 1);
        (first..=last)
            .filter_map(|i| {
                let width = (slot_start(i + 1) - slot_start(i)).max(1);
                let ts_ms = minute_ms + (slot_start(i) + self.h(symbol, minute_ms, i) % width) as i64;
                if ts_ms <= after || ts_ms > upto {
                    return None;
                }
                let bid = match i {
                    0 => bar.open,
                    _ if i == k - 1 => bar.close,
                    1 => bar.high,
                    2 => bar.low,
                    _ => {
                        let u = unit(self.h(symbol, minute_ms, i ^ 0xb1d));
                        Self::round(feed, bar.low + (bar.high - bar.low) * u)
                    }
                };
                Some(SimQuote {
                    ts_ms,
                    bid,
                    ask: Self::round(feed, bid + spread_ticks as f64 * tick),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    fn minute(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn the_same_seed_gives_the_same_market_and_another_seed_another() {
        let a = Market::new(7, 60, 0);
        let b = Market::new(7, 60, 0);
        let c = Market::new(8, 60, 0);
        let m = minute("2024-03-05T14:31:00Z");
        assert_eq!(a.quotes(Feed::Forex, "EUR/USD", m), b.quotes(Feed::Forex, "EUR/USD", m));
        assert_ne!(a.bar(Feed::Forex, "EUR/USD", m), c.bar(Feed::Forex, "EUR/USD", m));
    }

    #[test]
    fn a_minutes_quotes_agree_with_its_bar() {
        let market = Market::new(42, 30, 0);
        for (feed, symbol) in [(Feed::Forex, "EUR/USD"), (Feed::Crypto, "BTC-USD")] {
            for i in 0..500 {
                let m = minute("2024-03-05T00:00:00Z") + i * MINUTE_MS;
                let bar = market.bar(feed, symbol, m).unwrap();
                let quotes = market.quotes(feed, symbol, m);
                assert_eq!(quotes.len() as u64, bar.count);
                assert_eq!(quotes.first().unwrap().bid, bar.open);
                assert_eq!(quotes.last().unwrap().bid, bar.close);
                let high = quotes.iter().map(|q| q.bid).fold(f64::MIN, f64::max);
                let low = quotes.iter().map(|q| q.bid).fold(f64::MAX, f64::min);
                assert_eq!((high, low), (bar.high, bar.low), "{symbol} minute {i}");
                assert!(quotes.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms));
                assert!(quotes.iter().all(|q| q.ts_ms >= m && q.ts_ms < m + MINUTE_MS));
                assert!(quotes.iter().all(|q| q.ask > q.bid));
            }
        }
    }

    #[test]
    fn a_busy_minutes_quotes_run_to_its_end_and_20_ms_windows_add_up_to_it() {
        let market = Market::new(5, 30_000, 0);
        for i in 0..20 {
            let m = minute("2026-12-05T00:00:00Z") + i * MINUTE_MS;
            let all = market.quotes(Feed::Crypto, "BTC-USD", m);
            // The last quote lies in the minute's last slot: no silent end.
            let slot = MINUTE_MS / all.len() as i64 + 1;
            assert!(
                all.last().unwrap().ts_ms >= m + MINUTE_MS - slot,
                "minute {i} ends early"
            );
            let mut windows = Vec::new();
            let mut after = m - 1;
            while after < m + MINUTE_MS - 1 {
                let upto = (after + 20).min(m + MINUTE_MS - 1);
                windows.extend(market.quotes_between(Feed::Crypto, "BTC-USD", m, after, upto));
                after = upto;
            }
            assert_eq!(windows, all, "minute {i}");
        }
    }

    #[test]
    fn small_minutes_agree_with_their_bars_too_and_windows_add_up_to_the_minute() {
        for qpm in 1..12 {
            let market = Market::new(5, qpm, 0);
            for i in 0..300 {
                let m = minute("2024-03-05T00:00:00Z") + i * MINUTE_MS;
                let bar = market.bar(Feed::Crypto, "SOL-USD", m).unwrap();
                let quotes = market.quotes(Feed::Crypto, "SOL-USD", m);
                let high = quotes.iter().map(|q| q.bid).fold(f64::MIN, f64::max);
                let low = quotes.iter().map(|q| q.bid).fold(f64::MAX, f64::min);
                assert_eq!(
                    (high, low, quotes.len() as u64),
                    (bar.high, bar.low, bar.count),
                    "k={}",
                    bar.count
                );
                let mut pieces = Vec::new();
                let mut at = m - 1;
                while at < m + MINUTE_MS {
                    pieces.extend(market.quotes_between(Feed::Crypto, "SOL-USD", m, at, at + 777));
                    at += 777;
                }
                assert_eq!(pieces, quotes);
            }
        }
    }

    #[test]
    fn forex_is_closed_from_friday_evening_to_sunday_evening_new_york_time() {
        let market = Market::new(1, 60, 0);
        // 2024-03-08 is a Friday; New York is on EST (UTC-5) that day.
        assert!(market
            .bar(Feed::Forex, "EUR/USD", minute("2024-03-08T21:59:00Z"))
            .is_some());
        assert!(market
            .bar(Feed::Forex, "EUR/USD", minute("2024-03-08T22:00:00Z"))
            .is_none());
        assert!(market
            .bar(Feed::Forex, "EUR/USD", minute("2024-03-09T12:00:00Z"))
            .is_none());
        // Sunday 2024-03-10 is the DST change: 17:00 EDT is 21:00 UTC.
        assert!(market
            .bar(Feed::Forex, "EUR/USD", minute("2024-03-10T20:59:00Z"))
            .is_none());
        assert!(market
            .bar(Feed::Forex, "EUR/USD", minute("2024-03-10T21:00:00Z"))
            .is_some());
        assert!(market
            .bar(Feed::Crypto, "BTC-USD", minute("2024-03-09T12:00:00Z"))
            .is_some());
    }

    #[test]
    fn holes_are_minutes_without_data_and_stay_put() {
        let market = Market::new(3, 60, 10);
        let start = minute("2024-03-05T00:00:00Z");
        let holes: Vec<i64> = (0..1000)
            .map(|i| start + i * MINUTE_MS)
            .filter(|m| market.bar(Feed::Crypto, "ETH-USD", *m).is_none())
            .collect();
        assert!((50..150).contains(&holes.len()), "{} holes", holes.len());
        assert!(holes.iter().all(|m| market.is_hole("ETH-USD", *m)));
    }
}
