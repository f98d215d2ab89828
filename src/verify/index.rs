//! The keys `verify` compares, sorted on disk rather than held in memory.
//!
//! Every event in the log and every message in the JetStream stream becomes one entry
//! in a temporary RocksDB (in `$TMPDIR`, deleted when the index is dropped), under a key
//! that sorts by group, day, natural key and then where the entry came from. Read back
//! in order, the entries of one natural key lie side by side and the keys of one group
//! and day run together, so verification walks them once with memory for one group and
//! day at a time (and one small record per group and day a sink holds). Measured on
//! 3.3 and 6.6 million keys: 106-109 and 132-138 MB peak, against 271-275 and 489 MB
//! when the keys were held in hash maps; most of what is left of the growth is the
//! log's own reader (`wal check` alone: 61 and 79 MB). Scratch disk: 17-22 bytes per
//! entry (lz4) while it runs (BENCHMARKS.md).
//!
//! Groups (feed, symbol, kind, timeframe) are numbered as first seen, so a key is fixed
//! width: `source (1) | group (4) | day (8) | ts_ms (8) | uid (8) | suffix (9)`, with
//! signed numbers stored so that their bytes sort as the numbers do.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context as _;
use rocksdb::{DBRawIterator, Options, WriteBatch, WriteOptions, DB};

use super::DAY_MS;

/// Which entries to walk: the log's, or the JetStream stream's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Log = 0,
    Stream = 1,
}

/// Where an entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    /// The log: the lane's index (in `FORWARDED_LANES`) and the event's sequence there.
    Log {
        lane: u8,
        seq: u64,
    },
    Stream,
}

/// A group's four names: feed, symbol, kind, timeframe.
pub type GroupNames = (String, String, String, String);

/// The bytes of a key that name a natural key: source, group, day, ts_ms, uid.
const NATURAL_KEY_LEN: usize = 1 + 4 + 8 + 8 + 8;
const KEY_LEN: usize = NATURAL_KEY_LEN + 9;
/// Entries buffered before a write to the index.
const BATCH: usize = 65_536;

pub struct KeyIndex {
    db: DB,
    groups: HashMap<GroupNames, u32>,
    names: Vec<GroupNames>,
    /// The group of the last entry added.
    last_group: Option<u32>,
    batch: WriteBatch,
    /// Entries added so far; also what keeps two stream entries of one key apart.
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
    /// `ts_ms / DAY_MS`, as the sinks' queries count it). Returns false once a write to
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
        key[1..5].copy_from_slice(&group.to_be_bytes());
        key[5..13].copy_from_slice(&sortable(ts_ms / DAY_MS));
        key[13..21].copy_from_slice(&sortable(ts_ms));
        key[21..29].copy_from_slice(&uid.to_be_bytes());
        let (source, tag, suffix) = match from {
            From::Log { lane, seq } => (Source::Log, lane, seq),
            // Nothing names a stream entry but its key: the count keeps copies apart.
            From::Stream => (Source::Stream, 0, self.entries),
        };
        key[0] = source as u8;
        key[29] = tag;
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

    /// Walks `source`'s entries in key order, one natural key at a time: `visit` gets
    /// the group and day, and per log lane the lowest sequence the key has there
    /// (`u64::MAX`: none) and the number of entries. Groups and days come in key order
    /// (a group's days together), keys within them in order.
    pub fn walk(&mut self, source: Source, mut visit: impl FnMut(GroupDayId, NaturalKeyEntries)) -> anyhow::Result<()> {
        if !self.batch.is_empty() {
            self.flush();
        }
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let mut iter: DBRawIterator = self.db.raw_iterator();
        iter.seek([source as u8]);
        let mut current: Option<([u8; NATURAL_KEY_LEN], NaturalKeyEntries)> = None;
        while iter.valid() {
            let Some(key) = iter.key() else { break };
            if key.len() != KEY_LEN || key[0] != source as u8 {
                break;
            }
            let natural: [u8; NATURAL_KEY_LEN] = key[..NATURAL_KEY_LEN].try_into().expect("fixed width");
            let (tag, seq) = (
                key[29],
                u64::from_be_bytes(key[30..38].try_into().expect("fixed width")),
            );
            match &mut current {
                Some((k, entries)) if *k == natural => entries.add(tag, seq),
                _ => {
                    if let Some((k, entries)) = current.take() {
                        visit(GroupDayId::of(&k), entries);
                    }
                    let mut entries = NaturalKeyEntries::default();
                    entries.add(tag, seq);
                    current = Some((natural, entries));
                }
            }
            iter.next();
        }
        iter.status()?;
        if let Some((k, entries)) = current {
            visit(GroupDayId::of(&k), entries);
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
            group: u32::from_be_bytes(key[1..5].try_into().expect("fixed width")),
            day: unsortable(key[5..13].try_into().expect("fixed width")),
        }
    }
}

/// What the index holds for one natural key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NaturalKeyEntries {
    /// Per log lane (by index), the key's lowest sequence there; `u64::MAX`: none.
    pub first: [u64; 2],
    /// Entries with this key (rows, for the stream).
    pub count: u64,
}

impl Default for NaturalKeyEntries {
    fn default() -> Self {
        NaturalKeyEntries {
            first: [u64::MAX; 2],
            count: 0,
        }
    }
}

impl NaturalKeyEntries {
    fn add(&mut self, tag: u8, seq: u64) {
        if let Some(first) = self.first.get_mut(tag as usize) {
            // Entries of a lane come in sequence order: the first is the lowest.
            *first = (*first).min(seq);
        }
        self.count += 1;
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
    fn the_walk_gives_each_key_once_with_its_first_sequence_per_lane() -> anyhow::Result<()> {
        let mut index = KeyIndex::new()?;
        // Added out of order, as a log's lanes and a backfill's chunks do.
        let log = |lane, seq| From::Log { lane, seq };
        assert!(index.add(EUR, 1_641_600_060_000, 0, log(1, 40)));
        assert!(index.add(BTC, 1_728_000_000_500, 1, log(0, 7)));
        assert!(index.add(BTC, 1_728_000_000_500, 0, log(0, 9)));
        assert!(index.add(BTC, 1_728_000_000_500, 0, log(0, 3)));
        assert!(index.add(BTC, 1_728_000_000_500, 0, log(1, 12)));
        assert!(index.add(EUR, 1_641_600_000_000, 0, log(1, 41)));
        assert!(index.add(BTC, -3 * DAY_MS, 0, log(0, 1)));
        // The stream's entries never mix with the log's.
        assert!(index.add(BTC, 1_728_000_000_500, 0, From::Stream));
        assert!(index.add(BTC, 1_728_000_000_500, 0, From::Stream));

        let mut seen = Vec::new();
        index.walk(Source::Log, |g, e| seen.push((g, e)))?;
        // Groups are numbered as first seen: EUR/USD first.
        let (eur, btc) = (0, 1);
        let gd = |group, day| GroupDayId { group, day };
        let e = |first, count| NaturalKeyEntries { first, count };
        assert_eq!(
            seen,
            vec![
                (gd(eur, 19_000), e([u64::MAX, 41], 1)),
                (gd(eur, 19_000), e([u64::MAX, 40], 1)),
                (gd(btc, -3), e([1, u64::MAX], 1)),
                (gd(btc, 20_000), e([3, 12], 3)),
                (gd(btc, 20_000), e([7, u64::MAX], 1)),
            ]
        );
        assert_eq!(index.groups()[btc as usize].1, "BTC-USD");
        assert_eq!(index.groups()[eur as usize].3, "1m");

        let mut stream = Vec::new();
        index.walk(Source::Stream, |g, e| stream.push((g, e.count)))?;
        assert_eq!(stream, vec![(gd(btc, 20_000), 2)]);
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
        index.walk(Source::Log, |_, e| {
            keys += 1;
            assert_eq!(e.count, 2);
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
