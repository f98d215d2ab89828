//! Errors, one enum per operation, each carrying the ids it concerns.

use std::path::PathBuf;

use thiserror::Error;

use crate::record::{DecodeError, EncodeError};
use crate::Lane;

/// Opening a log.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("{path}: no tickvault log here")]
    NotFound { path: PathBuf },
    #[error("{path}: not a tickvault log ({reason})")]
    NotALog { path: PathBuf, reason: String },
    #[error("{path}: written by a newer tickvault (log format {found}, this build reads up to {supported}); upgrade tickvault to read it")]
    NewerFormat { path: PathBuf, found: u8, supported: u8 },
    /// RocksDB found the database damaged (a corrupt `CURRENT` or MANIFEST): nothing
    /// was changed; the operator restores the directory or points elsewhere.
    #[error("{path}: the log is damaged ({source}); restore it from a copy, or give another directory")]
    Damaged { path: PathBuf, source: rocksdb::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: rocksdb: {source}")]
    Rocks { path: PathBuf, source: rocksdb::Error },
}

/// Why a write to the log failed. `Poisoned` and `DiskFull` are permanent for this
/// process: the log refuses further writes rather than guess what reached the disk.
#[derive(Clone, Debug, Error)]
pub enum WriteError {
    #[error("log is poisoned by an earlier failed write ({cause}); it refuses writes until restarted")]
    Poisoned { cause: String },
    #[error("disk full while writing the log ({cause}); nothing in this batch was acknowledged, the log refuses writes until restarted")]
    DiskFull { cause: String },
    #[error("write failed: {cause}")]
    Failed { cause: String },
    #[error("the log's writer has stopped")]
    Closed,
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("cursor {sink}/{lane} cannot move to {seq}: the lane's head is {head}")]
    CursorBeyondHead {
        sink: String,
        lane: Lane,
        seq: u64,
        head: u64,
    },
    #[error("sink name {0:?} is not valid (1 to 128 bytes, no NUL)")]
    BadSinkName(String),
}

impl WriteError {
    /// A stable code for metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            WriteError::Poisoned { .. } => "poisoned",
            WriteError::DiskFull { .. } => "disk_full",
            WriteError::Failed { .. } => "failed",
            WriteError::Closed => "closed",
            WriteError::Encode(_) => "encode",
            WriteError::CursorBeyondHead { .. } => "cursor_beyond_head",
            WriteError::BadSinkName(_) => "bad_sink_name",
        }
    }
}

/// Reading the log.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("rocksdb read of {lane}: {source}")]
    Rocks { lane: Lane, source: rocksdb::Error },
    #[error("corrupt key in {lane}: {len} bytes (expected 8)")]
    BadKey { lane: Lane, len: usize },
}

/// One corrupt record, as found by a reader or `check`.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("corrupt record {lane}/{seq}: {error}")]
pub struct Corruption {
    pub lane: Lane,
    pub seq: u64,
    pub error: DecodeError,
}
