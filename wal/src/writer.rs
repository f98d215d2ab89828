//! The one writer: a thread that owns every write to the database and commits in groups.
//!
//! Producers send commands over a bounded channel and wait on a one-shot reply. The
//! thread takes the first command, drains whatever else is already queued (up to a
//! limit), applies all of it to one `WriteBatch`, writes that batch with `sync = true`,
//! and only then replies. So a reply of `Ok` means "on disk", and one fsync serves every
//! producer in the group. If the write fails, every command in the group gets the error
//! and the log is poisoned: later writes are refused, because after a failed fsync the
//! kernel may have dropped dirty pages and nothing can say what reached the disk.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::WriteError;
use crate::store::{self, handle as cf, Space, CF_CURSORS, CF_META, CF_QUARANTINE, CF_TIME_INDEX};
use crate::{Clock, Lane};

/// Records encoded by the producer (so CRCs are computed on the producers' threads),
/// stored back to back in one buffer; and the coverage marks that say what they cover,
/// written in the same durable write (see [`Batch::cover`]).
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub(crate) buf: Vec<u8>,
    pub(crate) ends: Vec<usize>,
    pub(crate) coverage: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(records: usize, bytes: usize) -> Self {
        Batch {
            buf: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(records),
            coverage: Vec::new(),
        }
    }

    /// Sets bits in the coverage space's bitmap at `key`, in the same durable write as
    /// the batch's records: the bits are OR-ed into what the key holds (a RocksDB merge,
    /// so no read comes before the write), and a crash leaves the records and their
    /// marks together or neither. What the bits mean is the caller's (the daemon's
    /// minute bitmaps, `tickvault::coverage`).
    pub fn cover(&mut self, key: Vec<u8>, bits: Vec<u8>) {
        self.coverage.push((key, bits));
    }

    /// Encodes one record into the batch.
    pub fn push(&mut self, kind: crate::RecordKind, payload: &[u8]) -> Result<(), crate::EncodeError> {
        crate::record::encode_into(kind, payload, &mut self.buf)?;
        self.ends.push(self.buf.len());
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    fn records(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter().copied()).map(|(s, e)| &self.buf[s..e])
    }

    /// Test hook: pushes bytes as they are, valid envelope or not.
    #[cfg(feature = "failpoints")]
    pub fn push_raw_for_test(&mut self, raw: &[u8]) {
        self.buf.extend_from_slice(raw);
        self.ends.push(self.buf.len());
    }
}

/// What an append achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    pub lane: Lane,
    /// Sequences given to this append's records, `first..=last` (both 0 for an empty batch).
    pub first_seq: u64,
    pub last_seq: u64,
    /// The lane's durable head after the group commit that carried this append: every
    /// sequence up to it is on disk.
    pub durable_head: u64,
    /// Records committed by the whole group (this and other producers' appends).
    pub group_records: usize,
}

/// What a truncation removed from one lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LaneTruncation {
    pub lane: Lane,
    pub removed: u64,
    /// The first sequence still retained.
    pub first_retained: u64,
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, WriteError>>;

pub(crate) enum Command {
    Append {
        lane: Lane,
        batch: Batch,
        /// One key of a state space written in the same batch as the records (see
        /// [`crate::Wal::append_with_state`]).
        state: Option<(Space, Vec<u8>, Vec<u8>)>,
        reply: Reply<AppendOutcome>,
    },
    MoveCursor {
        sink: String,
        lane: Lane,
        seq: u64,
        /// Written in the same batch as the move (see [`crate::Wal::move_cursor_noted`]).
        note: Option<Vec<u8>>,
        reply: Reply<()>,
    },
    DeleteCursor {
        sink: String,
        lane: Lane,
        reply: Reply<()>,
    },
    Truncate {
        retention: Duration,
        /// Cursors that hold nothing back.
        ignored: Vec<String>,
        reply: Reply<Vec<LaneTruncation>>,
    },
    PutState {
        space: Space,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        reply: Reply<()>,
    },
    /// Corrupt records were added to [`Shared::to_quarantine`]: copy them. Only a
    /// nudge: the writer takes that set at every group, so a nudge lost to a full
    /// channel loses nothing.
    Quarantine,
    Shutdown {
        reply: Reply<()>,
    },
}

/// Backfill records one group commit takes at most (a single larger append still goes
/// whole). About 2-5 ms of memtable inserts on the appliance's hardware.
pub(crate) const BACKFILL_PER_GROUP: usize = 8_192;

/// Backfill records a group that carries a live append takes at most (beyond its first
/// backfill append, which always goes, so that backfill never stalls): the group's write
/// and fsync then carry little more than the live records.
pub const BACKFILL_WITH_LIVE: usize = 2_048;

fn is_live(cmd: &Command) -> bool {
    matches!(cmd, Command::Append { lane: Lane::Live, .. })
}

fn is_backfill(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::Append {
            lane: Lane::Backfill,
            ..
        }
    )
}

fn backfill_records(cmd: &Command) -> usize {
    match cmd {
        Command::Append {
            lane: Lane::Backfill,
            batch,
            ..
        } => batch.len(),
        _ => 0,
    }
}

impl Command {
    fn weight(&self) -> usize {
        match self {
            Command::Append { batch, .. } => batch.len().max(1),
            _ => 1,
        }
    }
}

/// A group that carries a live append keeps backfill appends only up to
/// [`BACKFILL_WITH_LIVE`] records (and always its first one); the rest go back to the head
/// of the deferred queue, in order, for the next group. Once one is sent back, every later
/// one is too, so the backfill lane keeps its order. A group with a shutdown is left as it
/// is: the shutdown must stay behind every deferred append.
fn make_room_for_live(group: &mut Vec<Command>, deferred: &mut VecDeque<Command>) {
    if !group.iter().any(is_live) || group.iter().any(|c| matches!(c, Command::Shutdown { .. })) {
        return;
    }
    let (mut kept, mut first, mut sending_back) = (0usize, true, false);
    let mut back = Vec::new();
    let mut rest = Vec::with_capacity(group.len());
    for cmd in group.drain(..) {
        if !is_backfill(&cmd) {
            rest.push(cmd);
            continue;
        }
        let n = backfill_records(&cmd);
        if !sending_back && (first || kept + n <= BACKFILL_WITH_LIVE) {
            kept += n;
            first = false;
            rest.push(cmd);
        } else {
            sending_back = true;
            back.push(cmd);
        }
    }
    *group = rest;
    for cmd in back.into_iter().rev() {
        deferred.push_front(cmd);
    }
}

/// State shared with the handles: heads for readers, the poison flag, counters.
pub(crate) struct Shared {
    pub(crate) poisoned: Mutex<Option<WriteError>>,
    pub(crate) is_poisoned: AtomicBool,
    pub(crate) quarantined: AtomicU64,
    /// Corrupt records a reader found that are not copied to quarantine yet. Taken by
    /// the writer at the start of every group, before that group's truncation, so no
    /// truncation can remove a record found corrupt before it without its copy. It
    /// holds one entry per corrupt record found, and is emptied at every group.
    pub(crate) to_quarantine: Arc<Mutex<BTreeSet<(Lane, u64)>>>,
    pub(crate) group_commits: AtomicU64,
    /// Bytes of the group commits (records, cursors, state; before compression).
    pub(crate) committed_bytes: AtomicU64,
    /// Space reclaims started and finished since the log was opened (see [`Writer::reclaim`]).
    pub(crate) reclaims_started: AtomicU64,
    pub(crate) reclaims_finished: AtomicU64,
    pub(crate) heads: [watch::Sender<u64>; 3],
}

/// The writer's view of the log, kept in memory and changed only after a commit.
#[derive(Clone)]
struct State {
    head: [u64; 3],
    /// First retained sequence per lane (everything below was truncated).
    low: [u64; 3],
    cursors: BTreeMap<(Lane, String), u64>,
}

pub(crate) struct Writer {
    db: Arc<DB>,
    shared: Arc<Shared>,
    state: State,
    clock: Clock,
    max_group: usize,
    max_deferred: usize,
    /// The thread dropping the files of the last truncation (see [`Writer::reclaim`]).
    reclaimer: Option<std::thread::JoinHandle<()>>,
    /// Records truncated per lane since its space was last reclaimed.
    unreclaimed: [u64; 3],
    /// Per lane, the last removed sequence of a reclaim that is due and not started
    /// (another was running): started at a later group, once that one finished.
    due: [Option<u64>; 3],
}

/// Records a lane's truncations remove before their disk space is reclaimed at once (a
/// lane that keeps receiving writes gets it back from RocksDB's own compactions anyway;
/// this bounds how often the reclaiming compaction runs beside live appends).
const RECLAIM_AFTER: u64 = 100_000;

fn rocks_cause(e: &rocksdb::Error) -> String {
    e.to_string()
}

fn classify(cause: String) -> WriteError {
    let lower = cause.to_ascii_lowercase();
    if lower.contains("no space left") || lower.contains("enospc") || lower.contains("disk quota") {
        WriteError::DiskFull { cause }
    } else {
        WriteError::Failed { cause }
    }
}

/// Why the writer's state could not be read at open.
#[derive(Debug)]
pub(crate) enum LoadError {
    Rocks(rocksdb::Error),
    /// The lane's last key is not a sequence key: the log is damaged.
    BadLastKey(Lane),
}

impl From<rocksdb::Error> for LoadError {
    fn from(e: rocksdb::Error) -> Self {
        LoadError::Rocks(e)
    }
}

impl Writer {
    pub(crate) fn load(db: Arc<DB>, clock: Clock, max_group: usize) -> Result<(Self, Arc<Shared>), LoadError> {
        let (state, quarantined) = Self::load_state(&db)?;
        let shared = Arc::new(Shared {
            poisoned: Mutex::new(None),
            is_poisoned: AtomicBool::new(false),
            quarantined: AtomicU64::new(quarantined),
            to_quarantine: Arc::new(Mutex::new(BTreeSet::new())),
            group_commits: AtomicU64::new(0),
            committed_bytes: AtomicU64::new(0),
            reclaims_started: AtomicU64::new(0),
            reclaims_finished: AtomicU64::new(0),
            heads: Lane::ALL.map(|lane| watch::Sender::new(state.head[lane.index()])),
        });
        Ok((
            Writer {
                db,
                shared: shared.clone(),
                state,
                clock,
                max_group: max_group.max(1),
                max_deferred: 1024,
                reclaimer: None,
                unreclaimed: [0; 3],
                due: [None; 3],
            },
            shared,
        ))
    }

    fn load_state(db: &DB) -> Result<(State, u64), LoadError> {
        let meta = cf(db, CF_META);
        let mut state = State {
            head: [0; 3],
            low: [1; 3],
            cursors: BTreeMap::new(),
        };
        for lane in Lane::ALL {
            let i = lane.index();
            if let Some(low) = db.get_cf(meta, store::meta_low_key(lane))? {
                state.low[i] = store::u64_value(&low).unwrap_or(1).max(1);
            }
            let lane_cf = cf(db, lane.name());
            let mut iter = db.raw_iterator_cf(lane_cf);
            iter.seek_to_last();
            // A last key that is not a sequence would read as an empty lane, and the
            // next appends would reuse sequences the lane already holds.
            let last = match iter.key() {
                None => 0,
                Some(key) => store::parse_seq_key(key).ok_or(LoadError::BadLastKey(lane))?,
            };
            iter.status()?;
            state.head[i] = last.max(state.low[i] - 1);
        }
        let cursors_cf = cf(db, CF_CURSORS);
        for item in db.iterator_cf(cursors_cf, IteratorMode::Start) {
            let (key, value) = item?;
            if let (Some(k), Some(v)) = (store::parse_cursor_key(&key), store::u64_value(&value)) {
                state.cursors.insert(k, v);
            }
        }
        let quarantined = db.iterator_cf(cf(db, CF_QUARANTINE), IteratorMode::Start).count() as u64;
        Ok((state, quarantined))
    }

    /// The thread's body: runs until every sender is dropped or `Shutdown` arrives.
    ///
    /// Live before backfill: a group takes backfill records only up to
    /// [`BACKFILL_PER_GROUP`]; further backfill appends wait, in order, for the next
    /// group, while live appends and everything else drained behind them still join
    /// this one. A live append therefore never waits behind more than one group's worth
    /// of backfill inserts, however deep the backfill queue. Order within each lane is
    /// kept: once one backfill append is deferred, every later one is too.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut group: Vec<Command> = Vec::new();
        let mut deferred: VecDeque<Command> = VecDeque::new();
        let mut closed = false;
        loop {
            let mut weight = 0usize;
            let mut backfill = 0usize;
            // Deferred backfill (and a shutdown queued behind it) goes first, in order.
            while let Some(cmd) = deferred.front() {
                if !group.is_empty()
                    && (weight >= self.max_group || (is_backfill(cmd) && backfill >= BACKFILL_PER_GROUP))
                {
                    break;
                }
                let Some(cmd) = deferred.pop_front() else { break };
                weight += cmd.weight();
                backfill += backfill_records(&cmd);
                group.push(cmd);
            }
            if group.is_empty() {
                if closed {
                    break;
                }
                match rx.blocking_recv() {
                    Some(cmd) => {
                        weight += cmd.weight();
                        backfill += backfill_records(&cmd);
                        group.push(cmd);
                    }
                    None => {
                        closed = true;
                        continue;
                    }
                }
            }
            // Bounded: while the deferred queue is full, the channel stays full too and
            // producers wait (backpressure, not memory).
            while weight < self.max_group && deferred.len() < self.max_deferred {
                let cmd = match rx.try_recv() {
                    Ok(cmd) => cmd,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                };
                let must_wait = match &cmd {
                    Command::Append { .. } if is_backfill(&cmd) => {
                        !deferred.is_empty() || backfill >= BACKFILL_PER_GROUP
                    }
                    Command::Shutdown { .. } => !deferred.is_empty(),
                    _ => false,
                };
                if must_wait {
                    deferred.push_back(cmd);
                } else {
                    weight += cmd.weight();
                    backfill += backfill_records(&cmd);
                    group.push(cmd);
                }
            }
            make_room_for_live(&mut group, &mut deferred);
            if self.commit_group(&mut group) {
                break;
            }
        }
        if let Some(reclaimer) = self.reclaimer.take() {
            let _ = reclaimer.join();
        }
        // Senders gone or shutdown asked: make sure the RocksDB WAL is on disk.
        if let Err(e) = self.db.flush_wal(true) {
            tracing::error!(error = %e, "final log sync failed");
        }
        tracing::debug!("log writer stopped");
    }

    fn poison(&self, error: &WriteError) {
        let mut slot = self.shared.poisoned.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::error!(%error, "log poisoned: refusing further writes");
            *slot = Some(WriteError::Poisoned {
                cause: error.to_string(),
            });
            self.shared.is_poisoned.store(true, Ordering::SeqCst);
        }
    }

    fn poisoned(&self) -> Option<WriteError> {
        if !self.shared.is_poisoned.load(Ordering::SeqCst) {
            return None;
        }
        self.shared.poisoned.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Commits one group; returns true when the writer should stop.
    fn commit_group(&mut self, group: &mut Vec<Command>) -> bool {
        let mut stop = false;
        if let Some(err) = self.poisoned() {
            for cmd in group.drain(..) {
                stop |= matches!(cmd, Command::Shutdown { .. });
                reply_err(cmd, err.clone());
            }
            return stop;
        }
        let mut next = self.state.clone();
        let mut batch = WriteBatch::default();
        let mut done: Vec<Done> = Vec::with_capacity(group.len());
        let mut appended = [false; 3];
        let mut group_records = 0usize;
        let mut touches_cursor = false;
        let quarantined = self.copy_to_quarantine(&mut batch);

        for cmd in group.drain(..) {
            match cmd {
                Command::Append {
                    lane,
                    batch: records,
                    state,
                    reply,
                } => {
                    let i = lane.index();
                    let first = next.head[i] + 1;
                    let lane_cf = cf(&self.db, lane.name());
                    for record in records.records() {
                        next.head[i] += 1;
                        batch.put_cf(lane_cf, store::seq_key(next.head[i]), record);
                    }
                    if let Some((space, key, value)) = state {
                        batch.put_cf(cf(&self.db, space.cf()), key, value);
                    }
                    let coverage_cf = cf(&self.db, Space::Coverage.cf());
                    for (key, bits) in &records.coverage {
                        batch.merge_cf(coverage_cf, key, bits);
                    }
                    let n = records.len();
                    group_records += n;
                    appended[i] |= n > 0;
                    let (first_seq, last_seq) = if n == 0 { (0, 0) } else { (first, next.head[i]) };
                    done.push(Done::Append {
                        reply,
                        lane,
                        first_seq,
                        last_seq,
                    });
                }
                Command::MoveCursor {
                    sink,
                    lane,
                    seq,
                    note,
                    reply,
                } => {
                    if let Err(e) = check_sink(&sink) {
                        let _ = reply.send(Err(e));
                        continue;
                    }
                    let head = next.head[lane.index()];
                    if seq > head {
                        let _ = reply.send(Err(WriteError::CursorBeyondHead { sink, lane, seq, head }));
                        continue;
                    }
                    touches_cursor = true;
                    batch.put_cf(
                        cf(&self.db, CF_CURSORS),
                        store::cursor_key(lane, &sink),
                        seq.to_le_bytes(),
                    );
                    if let Some(note) = note {
                        batch.put_cf(cf(&self.db, CF_META), store::meta_note_key(lane, &sink), note);
                    }
                    next.cursors.insert((lane, sink), seq);
                    done.push(Done::Unit(reply));
                }
                Command::DeleteCursor { sink, lane, reply } => {
                    touches_cursor = true;
                    batch.delete_cf(cf(&self.db, CF_CURSORS), store::cursor_key(lane, &sink));
                    batch.delete_cf(cf(&self.db, CF_META), store::meta_note_key(lane, &sink));
                    next.cursors.remove(&(lane, sink));
                    done.push(Done::Unit(reply));
                }
                Command::Truncate {
                    retention,
                    ignored,
                    reply,
                } => match self.plan_truncation(&mut next, &mut batch, retention, &ignored) {
                    Ok(outcome) => done.push(Done::Truncate(reply, outcome)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                Command::PutState {
                    space,
                    key,
                    value,
                    reply,
                } => {
                    let space_cf = cf(&self.db, space.cf());
                    match value {
                        Some(value) => batch.put_cf(space_cf, key, value),
                        None => batch.delete_cf(space_cf, key),
                    }
                    done.push(Done::Unit(reply));
                }
                Command::Quarantine => {}
                Command::Shutdown { reply } => {
                    stop = true;
                    done.push(Done::Unit(reply));
                }
            }
        }

        // Time index: per lane appended to, the highest sequence written in this second.
        let second = self.clock.now_ms() / 1000;
        let time_cf = cf(&self.db, CF_TIME_INDEX);
        for lane in Lane::ALL {
            let i = lane.index();
            if appended[i] {
                batch.put_cf(time_cf, store::time_key(lane, second), next.head[i].to_le_bytes());
            }
        }

        let bytes = batch.size_in_bytes() as u64;
        let result = self.write(batch, touches_cursor);
        match result {
            Ok(()) => {
                self.shared.committed_bytes.fetch_add(bytes, Ordering::Relaxed);
                let truncated: Vec<(Lane, u64, u64)> = done
                    .iter()
                    .filter_map(|d| match d {
                        Done::Truncate(_, outcome) => Some(outcome),
                        _ => None,
                    })
                    .flatten()
                    .filter(|t| t.removed > 0)
                    .map(|t| (t.lane, t.first_retained - 1, t.removed))
                    .collect();
                self.state = next;
                self.shared.group_commits.fetch_add(1, Ordering::Relaxed);
                for (lane, seq) in &quarantined {
                    tracing::error!(%lane, seq, "corrupt record: copied to quarantine");
                }
                self.shared
                    .quarantined
                    .fetch_add(quarantined.len() as u64, Ordering::Relaxed);
                for lane in Lane::ALL {
                    let head = self.state.head[lane.index()];
                    self.shared.heads[lane.index()].send_if_modified(|h| {
                        let changed = *h != head;
                        *h = head;
                        changed
                    });
                }
                // Before the replies: a truncation that makes a reclaim due has started it
                // (or left it due behind a running one) by the time its caller hears back.
                self.reclaim(truncated);
                for d in done {
                    d.succeed(&self.state, group_records);
                }
            }
            Err(err) => {
                self.poison(&err);
                self.lock_to_quarantine().extend(quarantined);
                for d in done {
                    d.fail(err.clone());
                }
            }
        }
        stop
    }

    fn lock_to_quarantine(&self) -> std::sync::MutexGuard<'_, BTreeSet<(Lane, u64)>> {
        self.shared.to_quarantine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds to `batch` a copy of each corrupt record readers found since the last group
    /// and the quarantine lacks; returns them, to be counted once committed. A record
    /// found twice is one entry of the set, and one already there is not copied again.
    fn copy_to_quarantine(&self, batch: &mut WriteBatch) -> Vec<(Lane, u64)> {
        let found = std::mem::take(&mut *self.lock_to_quarantine());
        let q_cf = cf(&self.db, CF_QUARANTINE);
        let mut copied = Vec::new();
        let mut again = Vec::new();
        for (lane, seq) in found {
            let key = store::quarantine_key(lane, seq);
            match self.db.get_pinned_cf(q_cf, key) {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%lane, seq, error = %e, "reading the quarantine failed; copying at the next group");
                    again.push((lane, seq));
                    continue;
                }
            }
            match self.db.get_cf(cf(&self.db, lane.name()), store::seq_key(seq)) {
                Ok(Some(raw)) => {
                    batch.put_cf(q_cf, key, raw);
                    copied.push((lane, seq));
                }
                // Gone: a truncation committed before the reader's report reached us
                // (only a record found before a truncation is sure to be copied).
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%lane, seq, error = %e, "reading a corrupt record failed; copying at the next group");
                    again.push((lane, seq));
                }
            }
        }
        self.lock_to_quarantine().extend(again);
        copied
    }

    /// Gives the disk space of truncated records back, once a lane's truncations have
    /// removed [`RECLAIM_AFTER`] records: `truncated` is (lane, last removed sequence,
    /// records removed) of a committed truncation. Drops the lane's SST files that hold
    /// nothing above the last removed sequence, then compacts the rest of that range.
    /// The range deletion alone frees space only when compaction next runs over those
    /// files, which in a lane that no longer receives writes (a finished backfill) may be
    /// never. Off the writer thread, so appends do not wait for it; one that falls due
    /// while the last still runs starts at the first group after that one finished.
    fn reclaim(&mut self, truncated: Vec<(Lane, u64, u64)>) {
        for (lane, upto, removed) in truncated {
            let i = lane.index();
            self.unreclaimed[i] += removed;
            if self.unreclaimed[i] >= RECLAIM_AFTER {
                self.due[i] = Some(self.due[i].map_or(upto, |u| u.max(upto)));
                self.unreclaimed[i] = 0;
            }
        }
        // One that is due stays due while another runs: the next group starts it (every
        // truncation is a group, and truncation runs on a timer, removing or not).
        if self.due.iter().all(Option::is_none) || self.reclaimer.as_ref().is_some_and(|r| !r.is_finished()) {
            return;
        }
        let due: Vec<(Lane, u64)> = Lane::ALL
            .into_iter()
            .filter_map(|lane| self.due[lane.index()].take().map(|upto| (lane, upto)))
            .collect();
        if let Some(done) = self.reclaimer.take() {
            let _ = done.join();
        }
        let db = self.db.clone();
        let shared = self.shared.clone();
        self.shared.reclaims_started.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new().name("wal-reclaim".into()).spawn(move || {
            fail::fail_point!("wal::reclaim");
            for (lane, upto) in due {
                let lane_cf = cf(&db, lane.name());
                let size = || {
                    db.property_int_value_cf(lane_cf, "rocksdb.total-sst-files-size")
                        .ok()
                        .flatten()
                        .unwrap_or(0)
                };
                let before = size();
                // Both ends inclusive: `upto` is the last removed sequence. RocksDB
                // drops whole files this way only below level 0.
                if let Err(e) = db.delete_file_in_range_cf(lane_cf, store::seq_key(0), store::seq_key(upto)) {
                    tracing::warn!(lane = %lane, error = %e, "dropping truncated log files failed");
                }
                // What is left of the range (level 0, files reaching past it) goes
                // through a compaction of the range, which the deletion empties.
                // Not exclusive: automatic compactions (which keep writes from
                // stalling) go on beside it.
                let mut opts = rocksdb::CompactOptions::default();
                opts.set_exclusive_manual_compaction(false);
                db.compact_range_cf_opt(lane_cf, Some(store::seq_key(0)), Some(store::seq_key(upto + 1)), &opts);
                let after = size();
                if after < before {
                    tracing::info!(lane = %lane, freed_bytes = before - after, "log space reclaimed");
                }
            }
            shared.reclaims_finished.fetch_add(1, Ordering::Relaxed);
        });
        match spawned {
            Ok(handle) => self.reclaimer = Some(handle),
            Err(e) => {
                self.shared.reclaims_finished.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "could not start the thread dropping truncated log files");
            }
        }
    }

    fn write(&self, batch: WriteBatch, touches_cursor: bool) -> Result<(), WriteError> {
        fail::fail_point!("wal::sync", |_| Err(classify(
            "injected fsync failure (wal::sync)".into()
        )));
        fail::fail_point!("wal::disk_full", |_| Err(classify(
            "IO error: No space left on device (injected)".into()
        )));
        if touches_cursor {
            fail::fail_point!("wal::cursor_write", |_| Err(classify(
                "injected cursor write failure".into()
            )));
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        // No `set_low_pri` for backfill: RocksDB slows such a write by sleeping inside
        // the call, on this one thread, and every live append queued behind it would
        // wait. The backfill yields to live above the log (its duties), not here.
        self.db.write_opt(batch, &opts).map_err(|e| classify(rocks_cause(&e)))
    }

    /// Adds the deletes of a truncation to the batch and updates `next`.
    ///
    /// Removes, per lane, the records that every cursor on the lane has passed *and* that
    /// were written more than `retention` ago. A lane with no cursor is governed by the
    /// retention alone. All or nothing: every lane is read before any delete is added,
    /// so a read that fails leaves the batch and `next` as they were.
    fn plan_truncation(
        &self,
        next: &mut State,
        batch: &mut WriteBatch,
        retention: Duration,
        ignored: &[String],
    ) -> Result<Vec<LaneTruncation>, WriteError> {
        fail::fail_point!("wal::truncate", |_| Ok(Vec::new()));
        let now_ms = self.clock.now_ms();
        let cutoff_ms = now_ms.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let time_cf = cf(&self.db, CF_TIME_INDEX);
        let meta = cf(&self.db, CF_META);
        // Per lane: the last sequence to remove, and the time index's entries read.
        let mut plans = Vec::new();
        for lane in Lane::ALL {
            fail::fail_point!("wal::truncate_read", lane == Lane::Backfill, |_| Err(classify(
                "injected read failure (wal::truncate_read)".into()
            )));
            let i = lane.index();
            let passed = next
                .cursors
                .iter()
                .filter(|((l, sink), _)| *l == lane && !ignored.contains(sink))
                .map(|(_, seq)| *seq)
                .min()
                .unwrap_or(next.head[i]);
            // The newest second that ended at or before the cutoff tells the highest
            // sequence that is certainly older than the retention.
            let mut old_enough = 0u64;
            let mut index_keys = Vec::new();
            let start = store::time_key(lane, 0);
            for item in self
                .db
                .iterator_cf(time_cf, IteratorMode::From(&start, Direction::Forward))
            {
                let (key, value) = item.map_err(|e| classify(rocks_cause(&e)))?;
                let Some((l, second)) = store::parse_time_key(&key) else {
                    break;
                };
                if l != lane || (second + 1) * 1000 > cutoff_ms {
                    break;
                }
                old_enough = store::u64_value(&value).unwrap_or(0);
                index_keys.push((key, old_enough));
            }
            let upto = passed.min(old_enough).min(next.head[i]); // last sequence to remove
            plans.push((lane, upto, index_keys));
        }
        let mut out = Vec::new();
        for (lane, upto, index_keys) in plans {
            let i = lane.index();
            let low = next.low[i];
            if upto < low {
                out.push(LaneTruncation {
                    lane,
                    removed: 0,
                    first_retained: low,
                });
                continue;
            }
            let lane_cf = cf(&self.db, lane.name());
            // From 0, not from `low`: the tombstone covers everything below the new low,
            // so no record of an older file can reappear whatever was dropped before.
            batch.delete_range_cf(lane_cf, store::seq_key(0), store::seq_key(upto + 1));
            // Index entries entirely below the new low are no longer needed.
            for (key, highest) in index_keys {
                if highest <= upto {
                    batch.delete_cf(time_cf, &key);
                }
            }
            batch.put_cf(meta, store::meta_low_key(lane), (upto + 1).to_le_bytes());
            next.low[i] = upto + 1;
            out.push(LaneTruncation {
                lane,
                removed: upto + 1 - low,
                first_retained: upto + 1,
            });
        }
        Ok(out)
    }
}

fn check_sink(sink: &str) -> Result<(), WriteError> {
    if sink.is_empty() || sink.len() > 128 || sink.contains('\0') {
        return Err(WriteError::BadSinkName(sink.to_owned()));
    }
    Ok(())
}

enum Done {
    Append {
        reply: Reply<AppendOutcome>,
        lane: Lane,
        first_seq: u64,
        last_seq: u64,
    },
    Unit(Reply<()>),
    Truncate(Reply<Vec<LaneTruncation>>, Vec<LaneTruncation>),
}

impl Done {
    fn succeed(self, state: &State, group_records: usize) {
        match self {
            Done::Append {
                reply,
                lane,
                first_seq,
                last_seq,
            } => {
                let _ = reply.send(Ok(AppendOutcome {
                    lane,
                    first_seq,
                    last_seq,
                    durable_head: state.head[lane.index()],
                    group_records,
                }));
            }
            Done::Unit(reply) => {
                let _ = reply.send(Ok(()));
            }
            Done::Truncate(reply, outcome) => {
                let _ = reply.send(Ok(outcome));
            }
        }
    }

    fn fail(self, err: WriteError) {
        match self {
            Done::Append { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Done::Unit(reply) => {
                let _ = reply.send(Err(err));
            }
            Done::Truncate(reply, _) => {
                let _ = reply.send(Err(err));
            }
        }
    }
}

fn reply_err(cmd: Command, err: WriteError) {
    match cmd {
        Command::Append { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Command::MoveCursor { reply, .. } | Command::DeleteCursor { reply, .. } | Command::PutState { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Command::Truncate { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Command::Shutdown { reply } => {
            let _ = reply.send(Ok(()));
        }
        Command::Quarantine => {}
    }
}
