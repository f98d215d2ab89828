//! The keys `verify` compares, sorted on disk rather than held in memory.
//!
//! Every event in the log and every row or message a sink holds becomes one entry in a
//! temporary RocksDB (in `$TMPDIR`, deleted when the index is dropped), under a key that
//! sorts by group, day, natural key and then where the entry came from. Read back in
//! order, the log's and every sink's entries of one natural key lie side by side and the
//! keys of one group and day run together, so verification walks them once, comparing
//! keys, not counts, with memory for one key at a time. Measured (log and one sink) on
//! 3.3 and 6.6 million keys: 106-109 and 132-138 MB peak, against 271-275 and 489 MB
//! when the keys were held in hash maps; most of what is left of the growth is the
//! log's own reader (`wal check` alone: 61 and 79 MB). Scratch disk: 17-22 bytes per
//! entry (lz4) while it runs (BENCHMARKS.md).
//!
//! Groups (feed, symbol, kind, timeframe) are numbered as first seen, so a key is fixed
//! width: `group (4) | day (8) | ts_ms (8) | uid (8) | source (1) | lane (1) | suffix (8)`,
//! with signed numbers stored so that their bytes sort as the numbers do.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context as _;
use rocksdb::{DBRawIterator, Options, WriteBatch, WriteOptions, DB};

use super::DAY_MS;

/// Sinks an index can hold entries of (the log's are apart from them).
pub const MAX_SINKS: usize = 3;

/// The log's lanes an index tells apart (`FORWARDED_LANES`).
pub const LANES: usize = crate::daemon::FORWARDED_LANES.len();

/// Where an entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    /// The log: the lane's index (in `FORWARDED_LANES`) and the event's sequence there.
    Log { lane: u8, seq: u64 },
    /// A row or message of sink number `n` (below [`MAX_SINKS`]).
    Sink(u8),
}

/// A group's four names: feed, symbol, kind, timeframe.
pub type GroupNames = (String, String, String, String);

/// The bytes of a key that name a natural key: group, day, ts_ms, uid.
const NATURAL_KEY_LEN: usize = 4 + 8 + 8 + 8;
const KEY_LEN: usize = NATURAL_KEY_LEN + 10;
/// Entries buffered before a write to the index.
const BATCH: usize = 65_536;

pub struct KeyIndex {
    db: DB,
    groups: HashMap<GroupNames, u32>,
    names: Vec<GroupNames>,
    /// The group of the last entry added.
    last_group: Option<u32>,
    batch: WriteBatch,
    /// Entries added so far; also what keeps two rows of one key in a sink apart.
    entries: u64,
    /// The first failed write: later adds do nothing, and `walk` returns it.
    failed: Option<anyhow::Error>,
    // Dropped after `db`: RocksDB closes before its directory goes.
    _dir: tempfile::TempDir,
}

impl KeyIndex {
    /// A new, empty index in a temporary directory under `$TMPDIR`.
    pub fn new() -> anyhow::Result<Self> {
        Self::new_in(&std::env::temp_dir())
    }

    pub fn new_in(parent: &Path) -> anyhow::Result<Self> {
        let scratch = || format!("verify's scratch index in {} ($TMPDIR)", parent.display());
        let dir = tempfile::Builder::new()
            .prefix("tickvault-verify-")
            .tempdir_in(parent)
            .with_context(scratch)?;
        let mut options = Options::default();
        options.create_if_missing(true);
        // Compaction stays on (it costs about a third more CPU than none here): it keeps
        // the number of files, and so of open descriptors, small at any size.
        options.set_write_buffer_size(16 << 20);
        options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let db = DB::open(&options, dir.path()).with_context(scratch)?;
        Ok(Self {
            db,
            groups: HashMap::new(),
            names: Vec::new(),
            last_group: None,
            batch: WriteBatch::default(),
            entries: 0,
            failed: None,
            _dir: dir,
        })
    }

    /// The number of `names`, numbering it if it is new.
    fn group_id(&mut self, feed: &str, symbol: &str, kind: &str, timeframe: &str) -> u32 {
        // Entries mostly come in runs of one group (a backfill's chunk, a symbol's
        // burst): the last one is checked first, without building an owned key.
        if let Some(last) = self.last_group {
            let (f, s, k, t) = &self.names[last as usize];
            if (f.as_str(), s.as_str(), k.as_str(), t.as_str()) == (feed, symbol, kind, timeframe) {
                return last;
            }
        }
        let names = (
            feed.to_owned(),
            symbol.to_owned(),
            kind.to_owned(),
            timeframe.to_owned(),
        );
        let id = match self.groups.get(&names) {
            Some(id) => *id,
            None => {
                let id = self.names.len() as u32;
                self.names.push(names.clone());
                self.groups.insert(names, id);
                id
            }
        };
        self.last_group = Some(id);
        id
    }

    /// Every group seen so far, by number.
    pub fn groups(&self) -> &[GroupNames] {
        &self.names
    }

    /// Adds one entry for the natural key `names`, `ts_ms`, `uid` (its day is
    /// `ts_ms` in whole days, floored). Returns false once a write to
    /// the index has failed: what is added after that is dropped, and `walk` returns the
    /// error.
    pub fn add(
        &mut self,
        (feed, symbol, kind, timeframe): (&str, &str, &str, &str),
        ts_ms: i64,
        uid: u64,
        from: From,
    ) -> bool {
        if self.failed.is_some() {
            return false;
        }
        let group = self.group_id(feed, symbol, kind, timeframe);
        let mut key = [0u8; KEY_LEN];
        key[0..4].copy_from_slice(&group.to_be_bytes());
        key[4..12].copy_from_slice(&sortable(ts_ms.div_euclid(DAY_MS)));
        key[12..20].copy_from_slice(&sortable(ts_ms));
        key[20..28].copy_from_slice(&uid.to_be_bytes());
        let (source, lane, suffix) = match from {
            From::Log { lane, seq } => (0, lane, seq),
            // Nothing names a sink's row but its key: the count keeps copies apart.
            From::Sink(n) => {
                debug_assert!(usize::from(n) < MAX_SINKS);
                (1 + n, 0, self.entries)
            }
        };
        key[28] = source;
        key[29] = lane;
        key[30..38].copy_from_slice(&suffix.to_be_bytes());
        self.batch.put(key, []);
        self.entries += 1;
        if self.batch.len() >= BATCH {
            self.flush();
        }
        self.failed.is_none()
    }

    fn flush(&mut self) {
        let mut options = WriteOptions::default();
        // Scratch: nothing here needs to outlive the process.
        options.disable_wal(true);
        if let Err(e) = self.db.write_opt(std::mem::take(&mut self.batch), &options) {
            self.failed = Some(anyhow::Error::new(e).context("writing verify's scratch index"));
        }
    }

    /// Walks the entries in key order, one natural key at a time: `visit` gets the group
    /// and day and what the log and each sink hold of the key. Groups and days come in
    /// key order (a group's days together), keys within them in order.
    pub fn walk(&mut self, mut visit: impl FnMut(GroupDayId, &NaturalKeyEntries)) -> anyhow::Result<()> {
        if !self.batch.is_empty() {
            self.flush();
        }
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let mut iter: DBRawIterator = self.db.raw_iterator();
        iter.seek_to_first();
        let mut current: Option<([u8; NATURAL_KEY_LEN], NaturalKeyEntries)> = None;
        while iter.valid() {
            let Some(key) = iter.key() else { break };
            if key.len() != KEY_LEN {
                anyhow::bail!("verify's scratch index holds a key of {} bytes", key.len());
            }
            let natural: [u8; NATURAL_KEY_LEN] = key[..NATURAL_KEY_LEN].try_into().expect("fixed width");
            let (source, lane, seq) = (
                key[28],
                key[29],
                u64::from_be_bytes(key[30..38].try_into().expect("fixed width")),
            );
            match &mut current {
                Some((k, entries)) if *k == natural => entries.add(source, lane, seq),
                _ => {
                    if let Some((k, entries)) = current.take() {
                        visit(GroupDayId::of(&k), &entries);
                    }
                    let mut entries = NaturalKeyEntries {
                        ts_ms: unsortable(natural[12..20].try_into().expect("fixed width")),
                        uid: u64::from_be_bytes(natural[20..28].try_into().expect("fixed width")),
                        ..NaturalKeyEntries::default()
                    };
                    entries.add(source, lane, seq);
                    current = Some((natural, entries));
                }
            }
            iter.next();
        }
        iter.status()?;
        if let Some((k, entries)) = current {
            visit(GroupDayId::of(&k), &entries);
        }
        Ok(())
    }
}

/// A group, by number, and a day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupDayId {
    pub group: u32,
    pub day: i64,
}

impl GroupDayId {
    fn of(key: &[u8; NATURAL_KEY_LEN]) -> Self {
        GroupDayId {
            group: u32::from_be_bytes(key[0..4].try_into().expect("fixed width")),
            day: unsortable(key[4..12].try_into().expect("fixed width")),
        }
    }
}

/// What the index holds for one natural key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NaturalKeyEntries {
    pub ts_ms: i64,
    pub uid: u64,
    /// Per log lane (by index), the key's lowest sequence there; `u64::MAX`: none.
    pub first: [u64; LANES],
    /// The log's entries of this key.
    pub in_log: u64,
    /// Per sink (by number), its rows or messages with this key.
    pub rows: [u64; MAX_SINKS],
}

impl Default for NaturalKeyEntries {
    fn default() -> Self {
        NaturalKeyEntries {
            ts_ms: 0,
            uid: 0,
            first: [u64::MAX; LANES],
            in_log: 0,
            rows: [0; MAX_SINKS],
        }
    }
}

impl NaturalKeyEntries {
    fn add(&mut self, source: u8, lane: u8, seq: u64) {
        match source {
            0 => {
                if let Some(first) = self.first.get_mut(usize::from(lane)) {
                    // Entries of a lane come in sequence order: the first is the lowest.
                    *first = (*first).min(seq);
                }
                self.in_log += 1;
            }
            n => {
                if let Some(rows) = self.rows.get_mut(usize::from(n - 1)) {
                    *rows += 1;
                }
            }
        }
    }
}

/// `v`'s bytes, big-endian with the sign bit flipped, so that they sort as the numbers.
fn sortable(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn unsortable(b: [u8; 8]) -> i64 {
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    const BTC: (&str, &str, &str, &str) = ("crypto", "BTC-USD", "quote", "tick");
    const EUR: (&str, &str, &str, &str) = ("forex", "EUR/USD", "bar", "1m");

    #[test]
    fn signed_numbers_sort_as_their_bytes() {
        let values = [i64::MIN, -86_400_000, -1, 0, 1, 1_700_000_000_000, i64::MAX];
        for pair in values.windows(2) {
            assert!(sortable(pair[0]) < sortable(pair[1]), "{pair:?}");
        }
        for v in values {
            assert_eq!(unsortable(sortable(v)), v);
        }
    }

    #[test]
    fn the_walk_gives_each_key_once_with_the_logs_and_each_sinks_entries() -> anyhow::Result<()> {
        let mut index = KeyIndex::new()?;
        // Added out of order, as a log's lanes and a backfill's chunks do.
        let log = |lane, seq| From::Log { lane, seq };
        assert!(index.add(EUR, 1_641_600_060_000, 0, log(1, 40)));
        assert!(index.add(BTC, 1_728_000_000_500, 1, log(0, 7)));
        assert!(index.add(BTC, 1_728_000_000_500, 0, From::Sink(2)));
        assert!(index.add(BTC, 1_728_000_000_500, 0, log(0, 9)));
        assert!(index.add(BTC, 1_728_000_000_500, 0, log(0, 3)));
        assert!(index.add(BTC, 1_728_000_000_500, 0, log(1, 12)));
        assert!(index.add(EUR, 1_641_600_000_000, 0, log(1, 41)));
        assert!(index.add(BTC, -3 * DAY_MS, 0, log(0, 1)));
        assert!(index.add(BTC, 1_728_000_000_500, 0, From::Sink(0)));
        assert!(index.add(BTC, 1_728_000_000_500, 0, From::Sink(2)));
        // A key only a sink holds.
        assert!(index.add(BTC, 1_728_000_000_600, 0, From::Sink(1)));

        let mut seen = Vec::new();
        index.walk(|g, e| seen.push((g, *e)))?;
        // Groups are numbered as first seen: EUR/USD first.
        let (eur, btc) = (0, 1);
        let gd = |group, day| GroupDayId { group, day };
        let e = |ts_ms, first, in_log, rows| NaturalKeyEntries {
            ts_ms,
            uid: 0,
            first,
            in_log,
            rows,
        };
        let none = u64::MAX;
        assert_eq!(
            seen,
            vec![
                (gd(eur, 19_000), e(1_641_600_000_000, [none, 41, none], 1, [0, 0, 0])),
                (gd(eur, 19_000), e(1_641_600_060_000, [none, 40, none], 1, [0, 0, 0])),
                (gd(btc, -3), e(-3 * DAY_MS, [1, none, none], 1, [0, 0, 0])),
                (gd(btc, 20_000), e(1_728_000_000_500, [3, 12, none], 3, [1, 0, 2])),
                (
                    gd(btc, 20_000),
                    NaturalKeyEntries {
                        uid: 1,
                        ..e(1_728_000_000_500, [7, none, none], 1, [0, 0, 0])
                    }
                ),
                (gd(btc, 20_000), e(1_728_000_000_600, [none, none, none], 0, [0, 1, 0])),
            ]
        );
        assert_eq!(index.groups()[btc as usize].1, "BTC-USD");
        assert_eq!(index.groups()[eur as usize].3, "1m");
        Ok(())
    }

    #[test]
    fn the_walk_crosses_many_writes_and_the_directory_goes_with_the_index() -> anyhow::Result<()> {
        let parent = tempfile::tempdir()?;
        let mut index = KeyIndex::new_in(parent.path())?;
        let n = 3 * BATCH as u64 + 17;
        // Every key twice, in two lanes, written in reverse.
        for i in (0..n).rev() {
            let ts = i as i64 * 1_000;
            assert!(index.add(BTC, ts, 0, From::Log { lane: 0, seq: i + 1 }));
            assert!(index.add(
                BTC,
                ts,
                0,
                From::Log {
                    lane: 1,
                    seq: n + i + 1
                }
            ));
        }
        let (mut keys, mut last_ts_seq) = (0u64, 0u64);
        index.walk(|_, e| {
            keys += 1;
            assert_eq!(e.in_log, 2);
            assert!(e.first[0] > last_ts_seq || keys == 1, "in order");
            assert_eq!(e.first[1], n + e.first[0]);
            last_ts_seq = e.first[0];
        })?;
        assert_eq!(keys, n);
        drop(index);
        assert_eq!(
            std::fs::read_dir(parent.path())?.count(),
            0,
            "the scratch directory is removed"
        );
        Ok(())
    }
}
