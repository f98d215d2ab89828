//! What tells one tick from another with the same symbol, kind and timestamp: the
//! `uid` of its natural key.
//!
//! Many ticks share a millisecond, and their timestamps do not arrive in order (a
//! crypto pair's trades come from several exchanges, each with its own clock), so a
//! position among equal timestamps is no identity: timestamps 100, 101, 100 would give
//! both ticks at 100 the same one, and a restart would start counting again. The uid
//! is made from the tick itself, so the same tick gets the same uid whatever came
//! before it, after a restart, and on a second appliance that receives the same feed:
//!
//! - **A trade with a trade id** is that id on its exchange: `(exchange, trade id)`.
//!   The same id again at the same timestamp is the same trade sent twice.
//! - **A quote** (and a trade without an id) has no id at the source: it is its
//!   content, `(exchange, bid, ask, bid size, ask size)` (or price, size and
//!   conditions), and which copy of that content it is among the ticks of this
//!   timestamp received so far. Two identical quotes in one millisecond are kept as two
//!   (the source sent two updates, which may differ in fields Polygon leaves out),
//!   whichever order their timestamps arrive in.
//!
//! The uid is the XXH3-64 of a fixed byte layout of those fields and the copy number,
//! shifted to 63 bits so that PostgreSQL's `bigint` holds it as it is. Two distinct
//! ticks of one symbol and millisecond collide with a probability of 2^-63.
//!
//! Limits, by design: the copy number of identical quotes is counted per connection
//! for the last [`COPY_WINDOW_MS`] of timestamps, so an identical quote in the same
//! millisecond on both sides of a restart, or seen by an appliance that connected
//! between the two, reads as the same quote. Identical content in one millisecond
//! across a reconnect (seconds) is not a real feed's pattern.

use std::collections::HashMap;

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::{Body, EventKind, Quote, Trade};

/// How far behind the newest timestamp seen a copy of identical content is still
/// counted as a further copy (and not as copy 0 again).
pub const COPY_WINDOW_MS: i64 = 60_000;

/// The fields that make a tick what it is, in a fixed layout (little-endian; an absent
/// value is a 0 byte, a present one a 1 byte and the value). Changing this changes
/// every tick's key: it is part of the sinks' schema.
fn content(body: &Body) -> Option<(EventKind, &str, i64, Vec<u8>, bool)> {
    let mut bytes = Vec::with_capacity(48);
    let opt_f64 = |bytes: &mut Vec<u8>, v: Option<f64>| match v {
        Some(v) => {
            bytes.push(1);
            bytes.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        None => bytes.push(0),
    };
    let opt_i32 = |bytes: &mut Vec<u8>, v: Option<i32>| match v {
        Some(v) => {
            bytes.push(1);
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        None => bytes.push(0),
    };
    match body {
        Body::Quote(Quote {
            symbol,
            ts_ms,
            bid,
            ask,
            bid_size,
            ask_size,
            exchange,
            ..
        }) => {
            bytes.push(b'q');
            opt_i32(&mut bytes, *exchange);
            opt_f64(&mut bytes, Some(*bid));
            opt_f64(&mut bytes, Some(*ask));
            opt_f64(&mut bytes, *bid_size);
            opt_f64(&mut bytes, *ask_size);
            Some((EventKind::Quote, symbol, *ts_ms, bytes, true))
        }
        Body::Trade(Trade {
            symbol,
            ts_ms,
            price,
            size,
            exchange,
            trade_id,
            conditions,
            ..
        }) => {
            opt_i32(&mut bytes, *exchange);
            match trade_id {
                Some(id) => {
                    bytes.push(b'i');
                    bytes.extend_from_slice(&(id.len() as u64).to_le_bytes());
                    bytes.extend_from_slice(id.as_bytes());
                }
                None => {
                    bytes.push(b't');
                    opt_f64(&mut bytes, Some(*price));
                    opt_f64(&mut bytes, Some(*size));
                    bytes.extend_from_slice(&(conditions.len() as u64).to_le_bytes());
                    for c in conditions {
                        bytes.extend_from_slice(&c.to_le_bytes());
                    }
                }
            }
            // A trade id names one trade: a second copy of it is the same trade.
            Some((EventKind::Trade, symbol, *ts_ms, bytes, trade_id.is_none()))
        }
        Body::Bar(_) | Body::Derived(_) => None,
    }
}

/// The uid of a tick with this content, and this copy number among identical ones: the
/// hash of the content followed by the copy number (streamed, as one buffer would be).
fn uid_of(content: &[u8], copy: u32) -> u64 {
    let mut hasher = Xxh3::new();
    hasher.update(content);
    hasher.update(&copy.to_le_bytes());
    hasher.digest() >> 1
}

/// Gives each live tick its uid; one per connection's stream of ticks (see the module
/// docs for what it remembers and for how long).
#[derive(Debug, Default)]
pub struct Uids {
    /// Copies seen per (kind, symbol, timestamp, content hash).
    copies: HashMap<(EventKind, String, i64, u64), u32>,
    newest_ms: i64,
    pruned_below_ms: i64,
}

impl Uids {
    /// Sets the uid of a quote or trade; bars keep 0.
    pub fn assign(&mut self, body: &mut Body) {
        let Some((kind, symbol, ts, bytes, counted)) = content(body) else {
            return;
        };
        let copy = if counted {
            let key = (kind, symbol.to_owned(), ts, xxh3_64(&bytes));
            let seen = self.copies.entry(key).or_insert(0);
            *seen += 1;
            *seen - 1
        } else {
            0
        };
        let uid = uid_of(&bytes, copy);
        match body {
            Body::Quote(q) => q.uid = uid,
            Body::Trade(t) => t.uid = uid,
            Body::Bar(_) | Body::Derived(_) => {}
        }
        self.newest_ms = self.newest_ms.max(ts);
        // Forget what is far behind, at most once per window: memory stays bounded by
        // the ticks of about two windows.
        if self.newest_ms.saturating_sub(self.pruned_below_ms) > 2 * COPY_WINDOW_MS {
            let below = self.newest_ms.saturating_sub(COPY_WINDOW_MS);
            self.copies.retain(|(_, _, ts, _), _| *ts >= below);
            self.pruned_below_ms = below;
        }
    }

    /// How many (content, timestamp) entries are remembered.
    pub fn remembered(&self) -> usize {
        self.copies.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Quote;

    fn trade(ts_ms: i64, exchange: i32, id: Option<&str>, price: f64) -> Body {
        Body::Trade(Trade {
            symbol: "BTC-USD".into(),
            ts_ms,
            uid: 0,
            price,
            size: 0.5,
            exchange: Some(exchange),
            trade_id: id.map(str::to_owned),
            conditions: vec![1],
        })
    }

    fn quote(ts_ms: i64, bid: f64) -> Body {
        Body::Quote(Quote {
            symbol: "EUR/USD".into(),
            ts_ms,
            uid: 0,
            bid,
            ask: bid + 0.0001,
            bid_size: None,
            ask_size: None,
            exchange: Some(48),
        })
    }

    fn uids(uids: &mut Uids, bodies: &[Body]) -> Vec<(i64, u64)> {
        bodies
            .iter()
            .cloned()
            .map(|mut b| {
                uids.assign(&mut b);
                match b {
                    Body::Quote(q) => (q.ts_ms, q.uid),
                    Body::Trade(t) => (t.ts_ms, t.uid),
                    Body::Bar(_) | Body::Derived(_) => unreachable!(),
                }
            })
            .collect()
    }

    fn distinct(keys: &[(i64, u64)]) -> usize {
        keys.iter().collect::<std::collections::HashSet<_>>().len()
    }

    #[test]
    fn ticks_whose_timestamps_go_back_and_forth_keep_distinct_keys() {
        // Trades from three exchanges interleave: 100, 101, 100, 99, 100.
        let feed = [
            trade(100, 1, Some("a1"), 64000.0),
            trade(101, 2, Some("b1"), 64001.0),
            trade(100, 3, Some("c1"), 64000.5),
            trade(99, 2, Some("b0"), 63999.0),
            trade(100, 1, Some("a2"), 64000.0),
        ];
        assert_eq!(distinct(&uids(&mut Uids::default(), &feed)), feed.len());
        let quotes = [
            quote(100, 1.0842),
            quote(101, 1.0843),
            quote(100, 1.0844),
            quote(100, 1.0842),
        ];
        // The last quote repeats the first's content in the same millisecond: a second copy.
        assert_eq!(distinct(&uids(&mut Uids::default(), &quotes)), quotes.len());
    }

    #[test]
    fn equal_timestamps_on_both_sides_of_a_restart_keep_distinct_keys() {
        let before = uids(
            &mut Uids::default(),
            &[trade(100, 1, Some("a1"), 1.0), quote(100, 1.0842)],
        );
        // A new collector remembers nothing of the one before.
        let after = uids(
            &mut Uids::default(),
            &[trade(100, 1, Some("a2"), 1.0), quote(100, 1.0843)],
        );
        let all: Vec<_> = before.iter().chain(&after).copied().collect();
        assert_eq!(distinct(&all), 4);
    }

    #[test]
    fn two_appliances_on_one_feed_give_each_tick_the_same_key() {
        let feed: Vec<Body> = (0..200)
            .map(|i| match i % 3 {
                0 => trade(1_000 + (i % 7), (i % 4) as i32, Some(&format!("t{i}")), 1.0),
                1 => quote(1_000 + (i % 5), 1.08 + (i % 3) as f64 * 0.0001),
                _ => trade(1_000 + (i % 7), 1, None, 2.0),
            })
            .collect();
        let a = uids(&mut Uids::default(), &feed);
        let b = uids(&mut Uids::default(), &feed);
        assert_eq!(a, b);
        // Trades with ids keep their key whatever came before them on the other box.
        let late = uids(&mut Uids::default(), &feed[150..]);
        for (i, key) in late.iter().enumerate() {
            if let Body::Trade(Trade { trade_id: Some(_), .. }) = feed[150 + i] {
                assert_eq!(*key, a[150 + i]);
            }
        }
    }

    #[test]
    fn the_same_trade_id_twice_is_one_trade_and_uids_fit_a_bigint() {
        let keys = uids(
            &mut Uids::default(),
            &[
                trade(100, 1, Some("a1"), 1.0),
                trade(100, 1, Some("a1"), 1.0),
                trade(100, 2, Some("a1"), 1.0),
            ],
        );
        assert_eq!(keys[0], keys[1]);
        assert_ne!(keys[0], keys[2], "the same id on another exchange is another trade");
        assert!(keys.iter().all(|(_, uid)| i64::try_from(*uid).is_ok()));
    }

    #[test]
    fn a_uid_is_the_hash_of_the_content_and_copy_number_as_one_buffer() {
        // The uid is part of every sink's key: how it is computed must not change it.
        let content = b"q\x01\x30\x00\x00\x00";
        let mut whole = content.to_vec();
        whole.extend_from_slice(&3u32.to_le_bytes());
        assert_eq!(uid_of(content, 3), xxh3_64(&whole) >> 1);
    }

    #[test]
    fn what_is_remembered_stays_bounded() {
        let mut u = Uids::default();
        for ts in 0..100_000 {
            let mut q = quote(ts * 10, 1.0);
            u.assign(&mut q);
        }
        // A hundred ticks per second: at most two windows of them.
        assert!(
            u.remembered() <= 2 * 100 * (COPY_WINDOW_MS as usize / 1000),
            "{}",
            u.remembered()
        );
    }
}
