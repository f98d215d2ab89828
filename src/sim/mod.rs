//! A Polygon-compatible simulator (WebSocket and REST on one address), seeded and
//! deterministic, with fault modes. The demo, tests, drills and benchmarks run on it.

mod market;
mod options;
pub mod relay;
mod rest;
mod server;
mod ws;

pub use market::{Market, SimBar, SimQuote};
pub use options::{Faults, SimOptions};
pub use rest::MAX_LIMIT;
pub use server::{spawn, SentFrame, SimHandle};
pub use ws::WILDCARD_SYMBOLS;
