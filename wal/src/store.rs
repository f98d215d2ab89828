//! The RocksDB layout: column families, keys, and opening a directory as a log.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, DBCompressionType, Options, DB};

use crate::error::OpenError;
use crate::record::FORMAT_VERSION;
use crate::Lane;

pub(crate) const CF_CURSORS: &str = "cursors";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_TIME_INDEX: &str = "time_index";
pub(crate) const CF_QUARANTINE: &str = "quarantine";

/// Key-value spaces the daemon keeps beside the lanes, written through the same
/// group commit (so a state change is as durable as the records it describes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    /// Per symbol and timeframe, which minutes are captured.
    Coverage,
    /// Small daemon state: the backfill period tracker, suspected gaps, source holes.
    State,
}

impl Space {
    pub(crate) const fn cf(self) -> &'static str {
        match self {
            Space::Coverage => "coverage",
            Space::State => "state",
        }
    }
}

pub(crate) const ALL_CFS: [&str; 9] = [
    "live",
    "backfill",
    "derived",
    CF_CURSORS,
    CF_META,
    CF_TIME_INDEX,
    CF_QUARANTINE,
    "coverage",
    "state",
];

/// The handle of a column family. Every one is created (or checked) by [`open`], so a
/// missing one would mean the open itself was wrong.
pub(crate) fn handle<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    match db.cf_handle(name) {
        Some(cf) => cf,
        None => unreachable!("column family {name} is created at open"),
    }
}

pub(crate) const META_MAGIC: &[u8] = b"magic";
pub(crate) const MAGIC: &[u8] = b"tickvault-wal";
pub(crate) const META_FORMAT: &[u8] = b"format_version";
/// A random identity given to a log when it is first opened for writing: sinks that keep
/// their own cursors (PostgreSQL) key them by it, so two appliances never share one.
pub(crate) const META_LOG_ID: &[u8] = b"log_id";

fn new_log_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    // Two independently seeded SipHash keys over the time and pid: 128 random bits,
    // without a dependency for it.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut halves = [0u64; 2];
    for half in &mut halves {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        *half = h.finish();
    }
    format!("{:016x}{:016x}", halves[0], halves[1])
}

pub(crate) fn meta_low_key(lane: Lane) -> Vec<u8> {
    format!("low/{}", lane.name()).into_bytes()
}

/// A cursor's note (see [`crate::Wal::move_cursor_noted`]).
pub(crate) fn meta_note_key(lane: Lane, sink: &str) -> Vec<u8> {
    format!("note/{}/{sink}", lane.name()).into_bytes()
}

pub(crate) fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(crate) fn parse_seq_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

pub(crate) fn cursor_key(lane: Lane, sink: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + sink.len());
    key.push(lane.tag());
    key.extend_from_slice(sink.as_bytes());
    key
}

pub(crate) fn parse_cursor_key(key: &[u8]) -> Option<(Lane, String)> {
    let (tag, sink) = key.split_first()?;
    Some((Lane::from_tag(*tag)?, String::from_utf8(sink.to_vec()).ok()?))
}

/// Time index key: lane, then the second (big-endian) in which records were committed.
/// The value is the highest sequence committed in that second, so "every record up to
/// V was written before the end of second S".
pub(crate) fn time_key(lane: Lane, second: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = lane.tag();
    key[1..].copy_from_slice(&second.to_be_bytes());
    key
}

pub(crate) fn parse_time_key(key: &[u8]) -> Option<(Lane, u64)> {
    let (tag, second) = key.split_first()?;
    Some((Lane::from_tag(*tag)?, u64::from_be_bytes(second.try_into().ok()?)))
}

pub(crate) fn parse_lane_seq_key(key: &[u8]) -> Option<(Lane, u64)> {
    parse_time_key(key)
}

pub(crate) fn quarantine_key(lane: Lane, seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = lane.tag();
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub(crate) fn u64_value(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

fn cf_options(name: &str, cache: &rocksdb::Cache) -> Options {
    let mut opts = Options::default();
    opts.set_compression_type(DBCompressionType::Lz4);
    // Index and filter blocks live in the one shared cache rather than beside each
    // table file, so memory does not grow with the number of files.
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    opts.set_block_based_table_factory(&table);
    if Lane::ALL.iter().any(|lane| lane.name() == name) {
        // Lanes take appends at up to millions of records a second: 32 MiB memtables
        // keep flushes infrequent while the whole log's memtable budget (below) keeps
        // memory flat however much is written.
        opts.set_write_buffer_size(32 << 20);
        opts.set_max_write_buffer_number(3);
        opts.set_target_file_size_base(64 << 20);
    }
    if name == Space::Coverage.cf() {
        opts.set_merge_operator_associative("bitwise_or", bitwise_or);
    }
    opts
}

/// The coverage space's merge: bitmaps OR-ed byte by byte, the longer one's length kept.
fn bitwise_or(_key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    let mut out = existing.map(<[u8]>::to_vec).unwrap_or_default();
    for operand in operands {
        if operand.len() > out.len() {
            out.resize(operand.len(), 0);
        }
        for (o, b) in out.iter_mut().zip(operand) {
            *o |= b;
        }
    }
    Some(out)
}

fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.increase_parallelism(2);
    opts.set_max_background_jobs(2);
    opts.set_bytes_per_sync(1 << 20);
    // All memtables of all column families together: the log's memory does not grow
    // with a backfill's range or a sink's outage.
    opts.set_db_write_buffer_size(96 << 20);
    // RocksDB keeps a write-ahead file until every column family with writes in it has
    // flushed them, and the small ones written with every group (cursors, time index,
    // meta) rarely fill a memtable: unbounded, their files pinned gigabytes of the lanes'
    // writes, all replayed at every open. Past this, the column families holding the
    // oldest file are flushed.
    opts.set_max_total_wal_size(MAX_WAL_BYTES);
    opts
}

/// The most RocksDB's write-ahead files hold before the oldest is released by a flush:
/// two and a half times the memtable budget (96 MiB), so lanes flush on their own.
pub const MAX_WAL_BYTES: u64 = 256 << 20;

/// The block cache all column families share.
const BLOCK_CACHE_BYTES: usize = 32 << 20;

fn descriptors() -> Vec<ColumnFamilyDescriptor> {
    let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    ALL_CFS
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, cf_options(name, &cache)))
        .collect()
}

/// Whether an error at open says the database itself is damaged (a corruption, a
/// MANIFEST that `CURRENT` names and that is missing or unreadable): bad input, the
/// directory and not the program, so [`OpenError::Damaged`].
fn is_damage(e: &rocksdb::Error) -> bool {
    e.kind() == rocksdb::ErrorKind::Corruption || e.to_string().contains("MANIFEST")
}

/// Times a read-only open is tried when the writer removed a file it was reading.
const READ_ONLY_TRIES: u32 = 10;

/// A read-only open reads the files its MANIFEST names and replays the write-ahead files
/// it finds, and the writer beside it may delete one in the meantime (a memtable flushed,
/// a compaction done, the MANIFEST rolled over): RocksDB then fails with "No such file
/// or directory", as an I/O error or as a corruption of the MANIFEST it read. The next
/// try finds the files as they are now; a file that stays missing is real damage.
fn beside_the_writer<T>(mut open: impl FnMut() -> Result<T, rocksdb::Error>) -> Result<T, rocksdb::Error> {
    let mut tries = 1;
    loop {
        match open() {
            Err(e) if tries < READ_ONLY_TRIES && a_file_vanished(e.as_ref()) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn a_file_vanished(message: &str) -> bool {
    (message.starts_with("IO error") || message.starts_with("Corruption"))
        && message.contains("No such file or directory")
}

/// How to open a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The one writer: creates the log if the directory is missing or empty.
    Write,
    /// Inspection beside a running daemon: RocksDB's read-only mode takes no lock and
    /// sees the log as of the moment it was opened.
    ReadOnly,
}

pub(crate) fn open(path: &Path, mode: Mode) -> Result<Arc<DB>, OpenError> {
    let io = |source| OpenError::Io {
        path: path.to_owned(),
        source,
    };
    let rocks = |source| OpenError::Rocks {
        path: path.to_owned(),
        source,
    };
    let opening = |source: rocksdb::Error| match is_damage(&source) {
        true => OpenError::Damaged {
            path: path.to_owned(),
            source,
        },
        false => rocks(source),
    };
    let not_a_log = |reason: &str| OpenError::NotALog {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let exists = path.try_exists().map_err(io)?;
    // A link whose target is missing reads as nothing there: creating the log would
    // fail, or create it where the link did not mean.
    if !exists && path.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(not_a_log("a symbolic link to a missing target"));
    }
    if exists && !path.is_dir() {
        return Err(not_a_log("it is a file, not a directory"));
    }
    let creating = path.join(CREATING);
    let cut_short = exists && creating.try_exists().map_err(io)?;
    let empty = !exists || std::fs::read_dir(path).map_err(io)?.next().is_none();
    if empty || cut_short {
        if mode == Mode::ReadOnly {
            return Err(OpenError::NotFound { path: path.to_owned() });
        }
        create(path, cut_short).map_err(io)?;
    } else {
        if !path.join("CURRENT").exists() {
            if path.join("lost+found").is_dir() {
                // As PostgreSQL's initdb says of such a directory.
                return Err(not_a_log(
                    "it holds lost+found, so it is probably a mount point: make a directory under it for the log",
                ));
            }
            return Err(not_a_log("the directory holds other files and no RocksDB database"));
        }
        let existing = match mode {
            Mode::Write => DB::list_cf(&Options::default(), path),
            Mode::ReadOnly => beside_the_writer(|| DB::list_cf(&Options::default(), path)),
        }
        .map_err(opening)?;
        if !existing.iter().any(|cf| cf == CF_META) {
            return Err(not_a_log("a RocksDB database without tickvault's metadata"));
        }
    }

    let db = match mode {
        Mode::Write => DB::open_cf_descriptors(&db_options(), path, descriptors()),
        Mode::ReadOnly => {
            beside_the_writer(|| DB::open_cf_descriptors_read_only(&db_options(), path, descriptors(), false))
        }
    }
    .map_err(opening)?;

    let meta = db
        .cf_handle(CF_META)
        .ok_or_else(|| not_a_log("meta column family missing"))?;
    match db.get_cf(&meta, META_MAGIC).map_err(rocks)? {
        Some(magic) if magic == MAGIC => {}
        Some(_) => return Err(not_a_log("wrong magic in metadata")),
        None if empty || cut_short => {
            // A new log: stamp it, synced, before anything else is written; only then
            // is the creation done.
            let mut batch = rocksdb::WriteBatch::default();
            batch.put_cf(&meta, META_MAGIC, MAGIC);
            batch.put_cf(&meta, META_FORMAT, [FORMAT_VERSION]);
            batch.put_cf(&meta, META_LOG_ID, new_log_id());
            let mut wo = rocksdb::WriteOptions::default();
            wo.set_sync(true);
            db.write_opt(batch, &wo).map_err(rocks)?;
            created(path).map_err(io)?;
        }
        None => return Err(not_a_log("metadata has no tickvault magic")),
    }
    match db.get_cf(&meta, META_FORMAT).map_err(rocks)?.as_deref() {
        // A log an older build wrote: this build writes records of its own format from
        // now on, so the log says so, and an older build refuses it instead of failing
        // on them record by record.
        Some([version]) if *version < FORMAT_VERSION && mode == Mode::Write => {
            let mut wo = rocksdb::WriteOptions::default();
            wo.set_sync(true);
            db.put_cf_opt(&meta, META_FORMAT, [FORMAT_VERSION], &wo)
                .map_err(rocks)?;
        }
        Some([version]) if *version <= FORMAT_VERSION => {}
        Some([version]) => {
            return Err(OpenError::NewerFormat {
                path: path.to_owned(),
                found: *version,
                supported: FORMAT_VERSION,
            })
        }
        _ => return Err(not_a_log("metadata has no valid format version")),
    }
    if mode == Mode::Write && db.get_cf(&meta, META_LOG_ID).map_err(rocks)?.is_none() {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        db.put_cf_opt(&meta, META_LOG_ID, new_log_id(), &wo).map_err(rocks)?;
    }
    Ok(Arc::new(db))
}

/// Present in a log's directory from before its first file until its metadata is
/// stamped: RocksDB makes a new database's files and column families one after another,
/// and a crash among them left a directory that every later open refused ("a RocksDB
/// database without tickvault's metadata"). With this file there, the directory holds
/// only a creation that was cut short (nothing was appended to it: appends come after
/// the open), and the next open for writing clears it and creates the log again.
const CREATING: &str = "TICKVAULT-CREATING";

/// Starts a log's creation in `path` (missing, empty, or a creation cut short): the
/// marker, durable in the directory, before anything else.
fn create(path: &Path, cut_short: bool) -> std::io::Result<()> {
    if cut_short {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_name() == CREATING {
                continue;
            }
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
    } else {
        std::fs::create_dir_all(path)?;
        // The directory's own entry, durable before anything in it is acknowledged.
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        sync_dir(parent.unwrap_or(Path::new(".")))?;
        std::fs::File::create(path.join(CREATING))?.sync_all()?;
    }
    sync_dir(path)
}

/// Ends a log's creation: the marker goes, durably, once the metadata is stamped.
fn created(path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path.join(CREATING))?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Deletes one record, as a build that lost an acknowledged record would leave the log:
/// for the negative control of `tickvault drill --sabotage` and of tests. Never called
/// by the daemon.
#[cfg(feature = "failpoints")]
pub fn delete_record_for_test(path: &Path, lane: crate::Lane, seq: u64) -> Result<(), OpenError> {
    let db = open(path, Mode::Write)?;
    let rocks = |source| OpenError::Rocks {
        path: path.to_owned(),
        source,
    };
    let cf = db.cf_handle(lane.name()).ok_or_else(|| OpenError::NotALog {
        path: path.to_owned(),
        reason: format!("no column family for lane {lane}"),
    })?;
    db.delete_cf(&cf, seq_key(seq)).map_err(rocks)?;
    db.flush_wal(true).map_err(rocks)
}

/// Empties a state space, as a log from a version that did not keep it: for tests of
/// what rebuilds it. Never called by the daemon.
#[cfg(feature = "failpoints")]
pub fn clear_space_for_test(path: &Path, space: Space) -> Result<(), OpenError> {
    let db = open(path, Mode::Write)?;
    let rocks = |source| OpenError::Rocks {
        path: path.to_owned(),
        source,
    };
    let cf = handle(&db, space.cf());
    let keys: Vec<Box<[u8]>> = db
        .iterator_cf(cf, rocksdb::IteratorMode::Start)
        .map(|item| item.map(|(k, _)| k))
        .collect::<Result<_, _>>()
        .map_err(rocks)?;
    for key in keys {
        db.delete_cf(cf, key).map_err(rocks)?;
    }
    db.flush_wal(true).map_err(rocks)
}

/// Sets the stored format version; for tests of the newer-format refusal.
#[cfg(feature = "failpoints")]
pub fn stamp_format_version_for_test(path: &Path, version: u8) -> Result<(), OpenError> {
    let db = open(path, Mode::Write)?;
    let meta = db.cf_handle(CF_META).ok_or_else(|| OpenError::NotALog {
        path: path.to_owned(),
        reason: "meta column family missing".into(),
    })?;
    db.put_cf(&meta, META_FORMAT, [version])
        .map_err(|source| OpenError::Rocks {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::a_file_vanished;

    #[test]
    fn a_file_deleted_under_a_read_only_open_is_told_from_damage() {
        // Both as RocksDB 10 words them when the writer removes a file mid-open.
        assert!(a_file_vanished(
            "Corruption: IO error: No such file or directory: While open a file for random read: \
             /tmp/log/000016.sst: No such file or directory  The file /tmp/log/MANIFEST-000005 may be corrupted."
        ));
        assert!(a_file_vanished(
            "IO error: No such file or directory: While opening a file for sequentially reading: \
             /tmp/log/MANIFEST-000009: No such file or directory"
        ));
        assert!(!a_file_vanished(
            "Corruption: block checksum mismatch: stored = 1, computed = 2"
        ));
        assert!(!a_file_vanished("IO error: No space left on device"));
    }
}
