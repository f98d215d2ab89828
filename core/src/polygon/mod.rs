//! Polygon's protocol as both sides speak it: symbol forms and wire messages.

pub mod rest;
pub mod symbol;
pub mod wire;

use crate::event::Feed;

/// The channel prefixes tickvault captures, per market.
pub fn channels(feed: Feed) -> &'static [&'static str] {
    match feed {
        Feed::Forex => &["C", "CA", "CAS"],
        Feed::Crypto => &["XQ", "XT", "XA", "XAS"],
        Feed::Stocks => &["Q", "T", "AM", "A"],
    }
}

/// The WebSocket path of a market.
pub fn market_path(feed: Feed) -> &'static str {
    match feed {
        Feed::Forex => "/forex",
        Feed::Crypto => "/crypto",
        Feed::Stocks => "/stocks",
    }
}
