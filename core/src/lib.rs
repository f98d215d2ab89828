//! tickvault's types and decoders, with no storage and no network: the log's record
//! envelope and lanes, the events captured and derived (with the indicators), Polygon's WebSocket frames and REST pages,
//! and the configuration. Everything that reads bytes from outside is here, so that
//! the fuzz targets (`fuzz/`) exercise it without building RocksDB; the log
//! (`tickvault-wal`) and the daemon (`tickvault`) re-export it.

pub mod calendar;
pub mod config;
pub mod event;
pub mod indicators;
pub mod lane;
pub mod payload;
pub mod polygon;
pub mod record;
pub mod settings;

pub use lane::{Lane, UnknownLane};
pub use record::{DecodeError, EncodeError, RecordKind, FORMAT_VERSION};
