//! The `tickvault` binary's subcommands.

mod aggregate;
mod args;
mod backfill;
mod bench;
mod bench_aggregate;
mod bench_capture;
mod bench_gaps;
mod bench_repair;
mod bench_sinks;
mod demo;
mod demo_outage;
mod demo_screen;
mod dispatch;
mod drill;
mod export;
mod gaps;
mod load;
mod replay;
mod run;
mod validate;
mod verify;
mod wal;

pub use args::{BenchCommand, Cli, Command, WalCommand};

/// A command line that cannot work (exit 2), as a config that cannot is a
/// `ConfigError`: the reason, for the user to mend.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);
pub use dispatch::main;
pub use load::{load, LoadFigures, LoadSpec, DRILL_CURSOR};
