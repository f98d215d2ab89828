//! # tickvault-wal: the durable log
//!
//! Everything tickvault captures is written here first; nothing downstream of a
//! successful append may lose it. This page is the log's design document.
//!
//! ## Invariants
//!
//! 1. **Acknowledged means on disk.** [`Wal::append`] returns only after the RocksDB
//!    write that carries the records was made with `sync = true` (group commit: one
//!    fsync serves every producer whose records were queued together).
//! 2. **Sequences are dense.** Each [`Lane`] has its own `u64` sequence, starting at 1,
//!    with no holes: truncation removes only a prefix, and a corrupt record is
//!    quarantined but keeps its place.
//! 3. **Cursors are durable and never pass the head.** A cursor `(sink, lane) = n`
//!    means the sink acknowledged every record up to `n`. Cursor moves are synced
//!    writes through the same group commit, and can never pass the lane's head. A
//!    cursor moves forward as acknowledgements come, and back only when its sink's
//!    destination lost what it was sent (the runner then sends that part again).
//! 4. **Truncation keeps what someone still needs.** A record is removed only when every
//!    cursor on its lane has passed it *and* it is older than the replay retention (so
//!    offline replay has a window even when every sink is current). The disk space comes
//!    back too: once a lane's truncations removed 100,000 records, a helper thread drops
//!    the files they emptied and compacts the rest of the range, after the truncation
//!    is committed (a lane that gets no more writes would otherwise keep them).
//! 5. **One writer.** A single thread owns every write; producers reach it over a
//!    bounded channel (backpressure, not unbounded memory) and wait on one-shot replies.
//!    Readers share the database handle and never write.
//! 6. **Live before backfill.** A group commit takes at most a few thousand backfill
//!    records; the rest wait, in order, for the next group, while live appends queued
//!    behind them join the current one. A live append never waits behind a deep
//!    backfill queue, only behind one bounded group. A group that carries a live append
//!    takes still fewer: its first backfill append and others up to 2,048 records in
//!    all, the rest sent back, in order, to the next group; so a live record's fsync
//!    carries little besides it.
//! 7. **A failed write poisons the log.** After a failed fsync the kernel may have
//!    dropped dirty pages; the log cannot know what reached the disk, so it refuses all
//!    further writes (and says why) until the process restarts and RocksDB recovers
//!    from its own write-ahead log. A full disk is reported as such.
//!
//! ## Layout
//!
//! RocksDB column families: `live`, `backfill`, `derived` (records, keyed by the
//! big-endian sequence, so key order is log order), `cursors` (lane tag + sink name →
//! `u64` LE), `meta` (magic, format version, per-lane first retained sequence, cursors'
//! notes),
//! `time_index` (lane tag + second → highest sequence committed in that second; drives
//! retention), `quarantine` (lane tag + sequence → the raw bytes of a corrupt record),
//! and `coverage` and `state` for the daemon's own bookkeeping ([`Space`]), written
//! through the same group commit.
//!
//! Each record's value is the envelope described in [`record`]: version, kind, length,
//! CRC32 over header and payload, payload. Payloads are postcard ([`payload`] says why).
//!
//! ## Corruption
//!
//! A reader that meets a record failing its envelope check does not stop and does not
//! panic: it reports a [`Corruption`] `{ lane, seq }`, copies the raw bytes to the
//! quarantine column family (counted in [`Wal::quarantined`]), and reads on past it.
//! [`LogReader::check`] lists every bad record and any hole in a lane's sequence.
//!
//! ## Opening
//!
//! [`Wal::open`] creates a log in a missing or empty directory and refuses a directory
//! that holds anything else ([`OpenError::NotALog`]) or a log stamped with a newer
//! format ([`OpenError::NewerFormat`]). [`Wal::open_read_only`] inspects a log while the
//! daemon runs (RocksDB read-only mode takes no lock) and sees it as of that moment.
//!
//! ## Non-goals
//!
//! - No replication: redundancy comes from two appliances writing idempotent sinks.
//! - No random updates: records are immutable once acknowledged.
//! - No compression or encryption of its own: RocksDB compresses blocks with LZ4.
//! - No transactions across lanes: each append is atomic within one lane.

pub mod error;
pub mod reader;
mod store;
mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use error::{Corruption, OpenError, ReadError, WriteError};
pub use reader::{CheckReport, CursorInfo, LaneSummary, LogReader, ReadBatch, Record, Summary, Tail};
pub use store::{Space, MAX_WAL_BYTES};
pub use tickvault_core::lane::{Lane, UnknownLane};
pub use tickvault_core::record::{DecodeError, EncodeError, RecordKind, FORMAT_VERSION};
pub use tickvault_core::{payload, record};
pub use writer::{AppendOutcome, Batch, LaneTruncation, BACKFILL_WITH_LIVE};

#[cfg(feature = "failpoints")]
pub use store::{clear_space_for_test, delete_record_for_test, stamp_format_version_for_test};

use store::Mode;
use writer::{Command, Shared, Writer};

/// Where the log's notion of "now" comes from (the time index and retention).
#[derive(Clone, Debug, Default)]
pub enum Clock {
    #[default]
    System,
    /// Milliseconds since the Unix epoch, set by the test.
    Manual(Arc<AtomicU64>),
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            Clock::Manual(ms) => ms.load(Ordering::SeqCst),
        }
    }
}

/// Tuning of a writable log. Every field has a default that suits the appliance.
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// Commands that may wait for the writer before producers block. Default 1024.
    pub channel_capacity: usize,
    /// Records one group commit takes at most. Default 131072.
    pub max_group_records: usize,
    pub clock: Clock,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            channel_capacity: 1024,
            max_group_records: 131_072,
            clock: Clock::System,
        }
    }
}

/// The writable log: cheap to clone, one writer thread behind all clones.
///
/// When the last clone is dropped the channel closes, the writer commits what is
/// queued, syncs, and the drop waits for it: a process that returns early on an error
/// never exits with the writer still running.
#[derive(Clone)]
pub struct Wal {
    // Field order matters: the sender must drop before the writer thread is joined.
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    reader: LogReader,
    writer: Arc<WriterThread>,
}

struct WriterThread(std::sync::Mutex<Option<std::thread::JoinHandle<()>>>);

impl WriterThread {
    fn take(&self) -> Option<std::thread::JoinHandle<()>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        if let Some(handle) = self.take() {
            // Every sender is gone (this is the last handle), so the thread is ending.
            let _ = handle.join();
        }
    }
}

impl Wal {
    /// Opens (or creates) the log in `path` for writing, with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Wal, OpenError> {
        Self::open_with(path, WalOptions::default())
    }

    pub fn open_with(path: impl AsRef<Path>, options: WalOptions) -> Result<Wal, OpenError> {
        let path = path.as_ref();
        let db = store::open(path, Mode::Write)?;
        let (writer, shared) =
            Writer::load(db.clone(), options.clock, options.max_group_records).map_err(|e| match e {
                writer::LoadError::Rocks(source) => OpenError::Rocks {
                    path: path.to_owned(),
                    source,
                },
                writer::LoadError::BadLastKey(lane) => OpenError::NotALog {
                    path: path.to_owned(),
                    reason: format!("the {lane} lane's last key is not a sequence number: the log is damaged"),
                },
            })?;
        let (tx, rx) = mpsc::channel(options.channel_capacity.max(1));
        let handle = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| OpenError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(Wal {
            reader: LogReader {
                db,
                quarantine: Some(reader::QuarantineReports {
                    found: shared.to_quarantine.clone(),
                    wake: tx.downgrade(),
                }),
            },
            tx,
            shared,
            writer: Arc::new(WriterThread(std::sync::Mutex::new(Some(handle)))),
        })
    }

    /// Opens an existing log for inspection only; safe while a daemon writes to it.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<LogReader, OpenError> {
        let db = store::open(path.as_ref(), Mode::ReadOnly)?;
        Ok(LogReader { db, quarantine: None })
    }

    /// Read access to this log.
    pub fn reader(&self) -> &LogReader {
        &self.reader
    }

    async fn call<T>(&self, make: impl FnOnce(writer::Reply<T>) -> Command) -> Result<T, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| WriteError::Closed)?;
        rx.await.map_err(|_| WriteError::Closed)?
    }

    fn call_blocking<T>(&self, make: impl FnOnce(writer::Reply<T>) -> Command) -> Result<T, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx.blocking_send(make(reply)).map_err(|_| WriteError::Closed)?;
        rx.blocking_recv().map_err(|_| WriteError::Closed)?
    }

    /// Appends a batch of records to a lane; returns once they are on disk.
    pub async fn append(&self, lane: Lane, batch: Batch) -> Result<AppendOutcome, WriteError> {
        self.append_and(lane, batch, None).await
    }

    /// As [`Wal::append`], and writes `key` = `value` in `space` in the same durable
    /// write: the records and the state that says they are there (the backfill's
    /// progress through a period) are on disk together or not at all.
    pub async fn append_with_state(
        &self,
        lane: Lane,
        batch: Batch,
        space: Space,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<AppendOutcome, WriteError> {
        self.append_and(lane, batch, Some((space, key, value))).await
    }

    async fn append_and(
        &self,
        lane: Lane,
        batch: Batch,
        state: Option<(Space, Vec<u8>, Vec<u8>)>,
    ) -> Result<AppendOutcome, WriteError> {
        self.call(|reply| Command::Append {
            lane,
            batch,
            state,
            reply,
        })
        .await
    }

    /// [`Wal::append`] for code outside an async runtime.
    pub fn append_blocking(&self, lane: Lane, batch: Batch) -> Result<AppendOutcome, WriteError> {
        self.call_blocking(|reply| Command::Append {
            lane,
            batch,
            state: None,
            reply,
        })
    }

    /// Moves a sink's cursor on a lane to `seq` (the highest sequence it acknowledged).
    pub async fn move_cursor(&self, sink: &str, lane: Lane, seq: u64) -> Result<(), WriteError> {
        self.move_cursor_noted(sink, lane, seq, None).await
    }

    /// As [`Wal::move_cursor`], and keeps `note` for the cursor in the same durable
    /// write: what a sink needs at its next start to know what it did past the cursor
    /// (JetStream: the stream's sequence once the batch up to `seq` was acknowledged).
    /// A move without a note (`None`) leaves the last note in place; read it back with
    /// [`LogReader::cursor_note`].
    pub async fn move_cursor_noted(
        &self,
        sink: &str,
        lane: Lane,
        seq: u64,
        note: Option<Vec<u8>>,
    ) -> Result<(), WriteError> {
        let sink = sink.to_owned();
        self.call(|reply| Command::MoveCursor {
            sink,
            lane,
            seq,
            note,
            reply,
        })
        .await
    }

    /// Forgets a sink's cursor (a sink removed from service no longer holds truncation).
    pub async fn delete_cursor(&self, sink: &str, lane: Lane) -> Result<(), WriteError> {
        let sink = sink.to_owned();
        self.call(|reply| Command::DeleteCursor { sink, lane, reply }).await
    }

    /// Removes what every cursor passed and what is older than `retention` (its disk
    /// space is reclaimed behind the writer, see invariant 4).
    pub async fn truncate(&self, retention: Duration) -> Result<Vec<LaneTruncation>, WriteError> {
        self.truncate_ignoring(retention, &[]).await
    }

    /// As [`Wal::truncate`], but the cursors named in `ignored` hold nothing back (a
    /// consumer whose input matters less than the log's room, such as the aggregator's
    /// while capture is stopped for a full disk).
    pub async fn truncate_ignoring(
        &self,
        retention: Duration,
        ignored: &[&str],
    ) -> Result<Vec<LaneTruncation>, WriteError> {
        let ignored: Vec<String> = ignored.iter().map(|s| (*s).to_owned()).collect();
        self.call(|reply| Command::Truncate {
            retention,
            ignored,
            reply,
        })
        .await
    }

    /// Writes (or with `None` deletes) one key of a state space, durably.
    pub async fn put_state(&self, space: Space, key: Vec<u8>, value: Option<Vec<u8>>) -> Result<(), WriteError> {
        self.call(|reply| Command::PutState {
            space,
            key,
            value,
            reply,
        })
        .await
    }

    /// A reader following `lane` from just after `after`, woken by every append.
    pub fn tail(&self, lane: Lane, after: u64) -> Tail {
        Tail {
            reader: self.reader.clone(),
            lane,
            position: after,
            head: self.shared.heads[lane.index()].subscribe(),
        }
    }

    /// The lane's durable head (0 when empty).
    pub fn head(&self, lane: Lane) -> u64 {
        *self.shared.heads[lane.index()].borrow()
    }

    /// Records quarantined since the log was created.
    pub fn quarantined(&self) -> u64 {
        self.shared.quarantined.load(Ordering::Relaxed)
    }

    /// Group commits since this process opened the log.
    pub fn group_commits(&self) -> u64 {
        self.shared.group_commits.load(Ordering::Relaxed)
    }

    /// Flushes every column family's memtables to files. RocksDB keeps a write-ahead
    /// file until every column family written in it has flushed, and on a quiet log
    /// (capture paused for want of disk space) nothing else would: this lets the files
    /// of what truncation removed go. Runs beside the writer; blocks until done.
    pub fn flush_memtables(&self) -> Result<(), String> {
        let db = &self.reader.db;
        let cfs: Vec<_> = store::ALL_CFS.iter().filter_map(|name| db.cf_handle(name)).collect();
        let mut opts = rocksdb::FlushOptions::default();
        opts.set_wait(true);
        db.flush_cfs_opt(&cfs, &opts).map_err(|e| e.to_string())
    }

    /// Bytes committed since this process opened the log (records, cursors, state,
    /// before compression): how fast the log grows before truncation.
    pub fn committed_bytes(&self) -> u64 {
        self.shared.committed_bytes.load(Ordering::Relaxed)
    }

    /// Space reclaims (the dropping of truncated records' files, behind the writer)
    /// started and finished since this process opened the log: started > finished while
    /// one runs.
    pub fn reclaims(&self) -> (u64, u64) {
        (
            self.shared.reclaims_started.load(Ordering::Relaxed),
            self.shared.reclaims_finished.load(Ordering::Relaxed),
        )
    }

    /// The error that poisoned the log, if one did.
    pub fn poisoned(&self) -> Option<WriteError> {
        self.shared.poisoned.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the writer after everything queued before this call is committed, syncs
    /// RocksDB's WAL, and waits for the thread. Other clones get [`WriteError::Closed`].
    pub async fn shutdown(&self) -> Result<(), WriteError> {
        let result = self.call(|reply| Command::Shutdown { reply }).await;
        if let Some(handle) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        match result {
            Err(WriteError::Closed) => Ok(()),
            other => other,
        }
    }

    /// Test hook: appends bytes exactly as given (a corrupt record, say).
    #[cfg(feature = "failpoints")]
    pub async fn append_raw_for_test(&self, lane: Lane, raw: &[u8]) -> Result<AppendOutcome, WriteError> {
        let mut batch = Batch::new();
        batch.push_raw_for_test(raw);
        self.append(lane, batch).await
    }
}
