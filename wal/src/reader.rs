//! Reading the log: point-in-time scans, summaries, and the tail-following reader.

use std::sync::Arc;

use rocksdb::{Direction, IteratorMode, DB};
use tokio::sync::{mpsc, watch};

use crate::error::{Corruption, ReadError};
use crate::record::{self, DecodeError, RecordKind, RecordRef};
use crate::store::{self, Space, CF_CURSORS, CF_META, CF_QUARANTINE};
use crate::writer::Command;
use crate::Lane;

/// A record read from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub lane: Lane,
    pub seq: u64,
    pub kind: RecordKind,
    pub payload: Vec<u8>,
}

/// What one read returned: the good records in order, the corrupt ones it skipped, and
/// the position (highest sequence looked at) to read after next time.
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub records: Vec<Record>,
    pub corrupt: Vec<Corruption>,
    /// The highest sequence this read covered (good or corrupt); the caller's next read
    /// starts after it. Equal to the `after` it was called with when nothing was read.
    pub last_seq: u64,
}

/// A key and its value, from a state space.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// One cursor: how far a sink has acknowledged a lane.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CursorInfo {
    pub sink: String,
    pub lane: Lane,
    /// The highest sequence the sink acknowledged; 0 when it has acknowledged nothing.
    pub seq: u64,
}

/// Per-lane figures for `wal summary`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LaneSummary {
    pub lane: Lane,
    /// First retained sequence, `None` when the lane holds no records.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub records: u64,
    /// RocksDB's estimate of the lane's live bytes on disk plus its memtables.
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub format_version: u8,
    pub lanes: Vec<LaneSummary>,
    pub cursors: Vec<CursorInfo>,
    pub quarantined: u64,
}

/// Where a reader of a writable log reports corrupt records: the writer's set of them,
/// and its channel, weak so that readers do not keep the writer alive after the last
/// `Wal` is gone.
#[derive(Clone)]
pub(crate) struct QuarantineReports {
    pub(crate) found: Arc<std::sync::Mutex<std::collections::BTreeSet<(Lane, u64)>>>,
    pub(crate) wake: mpsc::WeakSender<Command>,
}

/// Read access to a log. Cheap to clone; many readers run beside the one writer.
#[derive(Clone)]
pub struct LogReader {
    pub(crate) db: Arc<DB>,
    /// Where corrupt records are reported to be quarantined; `None` for a read-only open.
    pub(crate) quarantine: Option<QuarantineReports>,
}

impl LogReader {
    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        store::handle(&self.db, name)
    }

    /// The log's identity: random, given when the log was first opened for writing.
    pub fn log_id(&self) -> Result<String, ReadError> {
        let id = self
            .db
            .get_cf(self.cf(CF_META), store::META_LOG_ID)
            .map_err(|source| ReadError::Rocks {
                lane: Lane::Live,
                source,
            })?;
        Ok(id.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default())
    }

    /// Calls `visit` for every record of `lane` with `from <= seq <= to`, in order,
    /// decoded and verified, without copying payloads. Stops early when `visit` returns
    /// false. Returns how many records were visited.
    pub fn scan<F>(&self, lane: Lane, from: u64, to: u64, mut visit: F) -> Result<u64, ReadError>
    where
        F: FnMut(u64, Result<RecordRef<'_>, DecodeError>) -> bool,
    {
        let cf = self.cf(lane.name());
        let mut iter = self.db.raw_iterator_cf(cf);
        iter.seek(store::seq_key(from));
        let mut visited = 0;
        while iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let seq = store::parse_seq_key(key).ok_or(ReadError::BadKey { lane, len: key.len() })?;
            if seq > to {
                break;
            }
            visited += 1;
            if !visit(seq, record::decode(value)) {
                break;
            }
            iter.next();
        }
        iter.status().map_err(|source| ReadError::Rocks { lane, source })?;
        Ok(visited)
    }

    /// Reads up to `max` records after sequence `after`. Corrupt records are reported,
    /// skipped and (on a writable log) sent to quarantine; reading goes on past them.
    pub fn read(&self, lane: Lane, after: u64, max: usize) -> Result<ReadBatch, ReadError> {
        let mut batch = ReadBatch {
            last_seq: after,
            ..ReadBatch::default()
        };
        if max == 0 {
            return Ok(batch);
        }
        let mut raw_corrupt = Vec::new();
        self.scan(lane, after.saturating_add(1), u64::MAX, |seq, decoded| {
            batch.last_seq = seq;
            match decoded {
                Ok(rec) => batch.records.push(Record {
                    lane,
                    seq,
                    kind: rec.kind,
                    payload: rec.payload.to_vec(),
                }),
                Err(error) => {
                    batch.corrupt.push(Corruption { lane, seq, error });
                    raw_corrupt.push(seq);
                }
            }
            batch.records.len() + batch.corrupt.len() < max
        })?;
        if !raw_corrupt.is_empty() {
            self.send_to_quarantine(lane, &raw_corrupt);
        }
        Ok(batch)
    }

    fn send_to_quarantine(&self, lane: Lane, seqs: &[u64]) {
        let Some(reports) = &self.quarantine else {
            return;
        };
        {
            let mut found = reports.found.lock().unwrap_or_else(|p| p.into_inner());
            for &seq in seqs {
                if found.insert((lane, seq)) {
                    tracing::error!(%lane, seq, "corrupt record: skipped, to be copied to quarantine");
                }
            }
        }
        // Wakes an idle writer. A full channel means a busy writer, which takes the set
        // at its next group anyway; a gone one copies nothing, and the record stays in
        // its lane for the next open.
        if let Some(tx) = reports.wake.upgrade() {
            let _ = tx.try_send(Command::Quarantine);
        }
    }

    /// The highest sequence in the lane (0 when it never held a record).
    pub fn last_seq(&self, lane: Lane) -> Result<Option<u64>, ReadError> {
        let cf = self.cf(lane.name());
        let mut iter = self.db.raw_iterator_cf(cf);
        iter.seek_to_last();
        let last = match iter.key() {
            Some(key) => Some(store::parse_seq_key(key).ok_or(ReadError::BadKey { lane, len: key.len() })?),
            None => None,
        };
        iter.status().map_err(|source| ReadError::Rocks { lane, source })?;
        Ok(last)
    }

    /// The lowest sequence truncation has kept (1 when nothing was ever truncated), even
    /// when the lane is now empty: a lane truncated at least once has it above 1.
    pub fn first_retained(&self, lane: Lane) -> Result<u64, ReadError> {
        let low = self
            .db
            .get_cf(self.cf(CF_META), store::meta_low_key(lane))
            .map_err(|source| ReadError::Rocks { lane, source })?;
        Ok(low.and_then(|v| store::u64_value(&v)).unwrap_or(1).max(1))
    }

    pub fn first_seq(&self, lane: Lane) -> Result<Option<u64>, ReadError> {
        let cf = self.cf(lane.name());
        let mut iter = self.db.raw_iterator_cf(cf);
        iter.seek_to_first();
        let first = match iter.key() {
            Some(key) => Some(store::parse_seq_key(key).ok_or(ReadError::BadKey { lane, len: key.len() })?),
            None => None,
        };
        iter.status().map_err(|source| ReadError::Rocks { lane, source })?;
        Ok(first)
    }

    /// Every cursor, ordered by lane then sink.
    pub fn cursors(&self) -> Result<Vec<CursorInfo>, ReadError> {
        let cf = self.cf(CF_CURSORS);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (key, value) = item.map_err(|source| ReadError::Rocks {
                lane: Lane::Live,
                source,
            })?;
            if let (Some((lane, sink)), Some(seq)) = (store::parse_cursor_key(&key), store::u64_value(&value)) {
                out.push(CursorInfo { sink, lane, seq });
            }
        }
        Ok(out)
    }

    /// The cursor of one sink on one lane; 0 when the sink has acknowledged nothing.
    pub fn cursor(&self, sink: &str, lane: Lane) -> Result<u64, ReadError> {
        let cf = self.cf(CF_CURSORS);
        let value = self
            .db
            .get_cf(cf, store::cursor_key(lane, sink))
            .map_err(|source| ReadError::Rocks { lane, source })?;
        Ok(value.as_deref().and_then(store::u64_value).unwrap_or(0))
    }

    /// The note kept with a sink's cursor on a lane by its last
    /// [`crate::Wal::move_cursor_noted`], if any.
    pub fn cursor_note(&self, sink: &str, lane: Lane) -> Result<Option<Vec<u8>>, ReadError> {
        self.db
            .get_cf(self.cf(CF_META), store::meta_note_key(lane, sink))
            .map_err(|source| ReadError::Rocks { lane, source })
    }

    /// Quarantined records: lane, sequence and the raw stored bytes.
    pub fn quarantined(&self) -> Result<Vec<(Lane, u64, Vec<u8>)>, ReadError> {
        let cf = self.cf(CF_QUARANTINE);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (key, value) = item.map_err(|source| ReadError::Rocks {
                lane: Lane::Live,
                source,
            })?;
            if let Some((lane, seq)) = store::parse_lane_seq_key(&key) {
                out.push((lane, seq, value.to_vec()));
            }
        }
        Ok(out)
    }

    /// One value of a state space.
    pub fn get_state(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
        let cf = self.cf(space.cf());
        self.db.get_cf(cf, key).map_err(|source| ReadError::Rocks {
            lane: Lane::Live,
            source,
        })
    }

    /// As [`LogReader::scan_state`], from `start` (a key under `prefix`) on.
    pub fn scan_state_from(&self, space: Space, prefix: &[u8], start: &[u8]) -> Result<Vec<KeyValue>, ReadError> {
        let cf = self.cf(space.cf());
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::From(start, Direction::Forward)) {
            let (key, value) = item.map_err(|source| ReadError::Rocks {
                lane: Lane::Live,
                source,
            })?;
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// Every key and value of a state space whose key starts with `prefix`, in key order.
    pub fn scan_state(&self, space: Space, prefix: &[u8]) -> Result<Vec<KeyValue>, ReadError> {
        self.scan_state_from(space, prefix, prefix)
    }

    /// Figures for every lane, every cursor and the quarantine.
    pub fn summary(&self) -> Result<Summary, ReadError> {
        let mut lanes = Vec::new();
        for lane in Lane::ALL {
            let first = self.first_seq(lane)?;
            let last = self.last_seq(lane)?;
            let cf = self.cf(lane.name());
            let property = |name: &str| self.db.property_int_value_cf(cf, name).ok().flatten().unwrap_or(0);
            let bytes = property("rocksdb.estimate-live-data-size") + property("rocksdb.cur-size-all-mem-tables");
            lanes.push(LaneSummary {
                lane,
                first_seq: first,
                last_seq: last,
                // Sequences are contiguous from the first retained one: truncation only
                // removes a prefix, and quarantined records stay in place.
                records: match (first, last) {
                    (Some(first), Some(last)) => last - first + 1,
                    _ => 0,
                },
                bytes,
            });
        }
        let meta = self.cf(CF_META);
        let format_version = self
            .db
            .get_cf(meta, store::META_FORMAT)
            .ok()
            .flatten()
            .and_then(|v| v.first().copied())
            .unwrap_or(0);
        Ok(Summary {
            format_version,
            lanes,
            cursors: self.cursors()?,
            quarantined: self.quarantined()?.len() as u64,
        })
    }

    /// Verifies every record of every lane; returns each corrupt one.
    pub fn check(&self) -> Result<CheckReport, ReadError> {
        let mut report = CheckReport::default();
        for lane in Lane::ALL {
            let mut expected_next: Option<u64> = None;
            self.scan(lane, 0, u64::MAX, |seq, decoded| {
                if let Some(next) = expected_next {
                    if seq != next {
                        report.missing.push((lane, next, seq - 1));
                    }
                }
                expected_next = Some(seq + 1);
                match decoded {
                    Ok(_) => report.good += 1,
                    Err(error) => report.corrupt.push(Corruption { lane, seq, error }),
                }
                true
            })?;
        }
        Ok(report)
    }
}

/// What `check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub good: u64,
    pub corrupt: Vec<Corruption>,
    /// Sequence ranges (lane, first, last) missing from the middle of a lane.
    pub missing: Vec<(Lane, u64, u64)>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty()
    }
}

/// Follows one lane from a position, waking on every append. One per consumer.
pub struct Tail {
    pub(crate) reader: LogReader,
    pub(crate) lane: Lane,
    pub(crate) position: u64,
    pub(crate) head: watch::Receiver<u64>,
}

impl Tail {
    /// The highest sequence already handed out (the next batch starts after it).
    pub fn position(&self) -> u64 {
        self.position
    }

    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// The next records after the position, at most `max` (and at least one: 0 reads
    /// one); waits until there is at least one. Returns `None` when the log has shut
    /// down and everything was read.
    pub async fn next_batch(&mut self, max: usize) -> Result<Option<ReadBatch>, ReadError> {
        // A read of 0 records ends where it began, which would read below as records
        // truncated under us and skip to the head.
        let max = max.max(1);
        loop {
            let head = *self.head.borrow_and_update();
            if head > self.position {
                let batch = self.reader.read(self.lane, self.position, max)?;
                if batch.last_seq > self.position {
                    self.position = batch.last_seq;
                    return Ok(Some(batch));
                }
                // The head moved but the records are gone (truncated under us): skip to it.
                self.position = head;
                continue;
            }
            if self.head.changed().await.is_err() {
                // Writer gone: hand out what is left, then end.
                let batch = self.reader.read(self.lane, self.position, max)?;
                if batch.last_seq > self.position {
                    self.position = batch.last_seq;
                    return Ok(Some(batch));
                }
                return Ok(None);
            }
        }
    }

    /// Like [`Tail::next_batch`], but returns whatever is there (possibly nothing) at once.
    pub fn try_next_batch(&mut self, max: usize) -> Result<ReadBatch, ReadError> {
        let batch = self.reader.read(self.lane, self.position, max)?;
        self.position = batch.last_seq;
        Ok(batch)
    }
}
