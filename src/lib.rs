//! tickvault: a market-data ingestion appliance. Polygon.io data is captured into a
//! durable RocksDB log (the `tickvault-wal` crate) and forwarded from it.
//!
//! Modules follow the data flow: `event` (what is carried), `config`, `synthetic`
//! (drill and benchmark records), `cli` (the binary's subcommands).

pub mod cli;
pub mod config;
pub mod daemon;
pub mod event;
pub mod gaps;
pub mod polygon;
pub mod sim;
pub mod source;
pub mod synthetic;
