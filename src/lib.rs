//! tickvault: a market-data ingestion appliance. Polygon.io data is captured into a
//! durable RocksDB log (the `tickvault-wal` crate) and forwarded from it.
//!
//! Modules follow the data flow: `source` (live and backfill capture) -> the log ->
//! `sink` (runners forwarding to ClickHouse, PostgreSQL and NATS JetStream) and `verify`
//! (the log against the sinks); `event` is what is carried, `daemon` starts the parts,
//! `sim` stands in for Polygon, `cli` holds the binary's subcommands; `config` reads the
//! configuration, each part's section beside it, on `settings`.

pub mod aggregate;
pub mod backoff;
pub mod cli;
pub mod coverage;
pub mod daemon;
pub mod disk;
pub mod gaps;
pub mod metrics;
pub mod settings;
pub mod sim;
pub mod sink;
pub mod source;
pub mod synthetic;
pub mod verify;

pub use tickvault_core::{calendar, config, event, indicators, polygon};
