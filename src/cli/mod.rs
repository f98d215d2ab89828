//! The `tickvault` binary's subcommands.

mod args;
mod backfill;
mod bench;
mod bench_capture;
mod bench_sinks;
mod demo;
mod dispatch;
mod load;
mod run;
mod validate;
mod verify;
mod wal;

pub use args::{BenchCommand, Cli, Command, WalCommand};
pub use dispatch::main;
pub use load::{load, LoadFigures, LoadSpec, DRILL_CURSOR};
