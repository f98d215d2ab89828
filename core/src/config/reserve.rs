//! `log.disk_reserve`: free space kept for what must go on when capture cannot (the
//! daemon's `disk` module watches it).

use serde::Deserialize;

/// The least reserve: RocksDB's own writes go on under it (a flush of the memtables,
/// up to 96 MiB; a compaction writes its output before it deletes its inputs), and a
/// backfill appends tens of megabytes a second between two looks at the disk. Found on
/// a small tmpfs: with 16 MiB, a flush ran the disk out of space and poisoned the log.
pub const MIN_RESERVE: u64 = 256 << 20;

/// The reserve: a size, or a share of the filesystem (never under [`MIN_RESERVE`]).
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub enum Reserve {
    Bytes(u64),
    /// A share in (0, 0.5].
    Share(f64),
}

impl TryFrom<String> for Reserve {
    type Error = String;

    fn try_from(text: String) -> Result<Reserve, String> {
        let text = text.trim();
        if let Some(percent) = text.strip_suffix('%') {
            let share: f64 = percent
                .trim()
                .parse()
                .map_err(|_| format!("{text:?} is not a share (\"5%\") or a size (\"2GiB\")"))?;
            if !(share > 0.0 && share <= 50.0) {
                return Err(format!("{text}: a share must be above 0% and at most 50%"));
            }
            return Ok(Reserve::Share(share / 100.0));
        }
        let size: bytesize::ByteSize = text
            .parse()
            .map_err(|_| format!("{text:?} is not a size (\"2GiB\", \"500MB\") or a share (\"5%\")"))?;
        if size.as_u64() > 1 << 50 {
            return Err(format!("{text}: at most 1 PiB"));
        }
        if size.as_u64() < MIN_RESERVE {
            return Err(format!(
                "{text}: at least 256MiB (RocksDB's flushes and compactions need room)"
            ));
        }
        Ok(Reserve::Bytes(size.as_u64()))
    }
}

impl Reserve {
    /// The reserve in bytes on a filesystem of `size` bytes.
    pub fn bytes(self, size: u64) -> u64 {
        match self {
            Reserve::Bytes(n) => n,
            Reserve::Share(share) => ((size as f64 * share) as u64).max(MIN_RESERVE),
        }
    }
}

impl std::fmt::Display for Reserve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reserve::Bytes(n) => write!(f, "{}", bytesize::ByteSize(*n).display().iec()),
            Reserve::Share(s) => write!(f, "{}%", s * 100.0),
        }
    }
}
