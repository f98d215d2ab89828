//! The `tickvault` binary's subcommands.

mod args;
mod bench;
mod dispatch;
mod load;
mod validate;
mod wal;

pub use args::{BenchCommand, Cli, Command, WalCommand};
pub use dispatch::main;
pub use load::{load, LoadFigures, LoadSpec};
