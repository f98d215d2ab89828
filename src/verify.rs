//! `tickvault verify`: what the local log holds against what each enabled sink holds, per
//! (feed, symbol, kind, timeframe, day), in distinct natural keys. 100%, never a
//! threshold, and never a sleep-and-count: the log says what must be there.
//!
//! For a sink, the log's events split in two: those its cursor has passed (they must be
//! in the sink) and the rest (they may already be: a batch is written before its cursor
//! moves). A group and day matches when
//! `passed <= sink keys <= passed + not yet passed` and the sink holds no duplicate.
//! To stay exact while the daemon runs, the cursors are read first, the sinks second and
//! the log's events last: the sinks can then hold nothing the log's snapshot lacks, and
//! everything the cursors passed was in the sinks when they were asked.
//!
//! Only groups and days the log still holds are compared: what retention truncated from
//! the log cannot be checked against it (it is counted, not flagged). Memory grows with
//! the number of distinct keys in the log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::Serialize;
use tickvault_wal::{Lane, Wal};

use crate::config::Config;
use crate::daemon::FORWARDED_LANES;
use crate::event::{Event, EVENT_KIND};
use crate::sink::clickhouse::ClickHouseSink;
use crate::sink::nats::NatsSink;
use crate::sink::postgres::PostgresSink;
use crate::sink::GroupCount;

const DAY_MS: i64 = 86_400_000;

/// One group and day.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct GroupDay {
    pub feed: String,
    pub symbol: String,
    pub kind: String,
    pub timeframe: String,
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
}

impl GroupDay {
    /// The day as `YYYY-MM-DD`.
    pub fn date(&self) -> String {
        jiff::Timestamp::from_millisecond(self.day * DAY_MS)
            .map(|t| t.strftime("%Y-%m-%d").to_string())
            .unwrap_or_else(|_| self.day.to_string())
    }
}

/// A group and day where a sink does not match the log.
#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    #[serde(flatten)]
    pub group: GroupDay,
    pub date: String,
    /// Distinct keys the sink's cursor has passed: all must be in the sink.
    pub passed: u64,
    /// Distinct keys in the log the cursor has not passed yet: may be in the sink.
    pub pending: u64,
    /// Distinct keys in the sink.
    pub in_sink: u64,
    /// Passed keys missing from the sink (at least this many).
    pub missing: u64,
    /// Keys in the sink the log does not hold (at least this many).
    pub extra: u64,
    /// Rows beyond one per key.
    pub duplicates: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SinkReport {
    pub sink: &'static str,
    /// The sink's cursor per lane when verification began.
    pub cursors: BTreeMap<String, u64>,
    pub groups_checked: u64,
    /// Distinct keys the cursors have passed, summed over the groups.
    pub passed: u64,
    pub in_sink: u64,
    /// Groups and days the sink holds that the log no longer has (retention).
    pub groups_not_in_log: u64,
    pub differences: Vec<Difference>,
    /// Set when the sink could not be read; the sink then does not match.
    pub error: Option<String>,
}

impl SinkReport {
    pub fn matches(&self) -> bool {
        self.error.is_none() && self.differences.is_empty()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub log_events: u64,
    pub log_keys: u64,
    pub sinks: Vec<SinkReport>,
}

impl Report {
    pub fn matches(&self) -> bool {
        self.sinks.iter().all(SinkReport::matches)
    }
}

/// What a sink holds per group and day: distinct keys and rows.
#[derive(Default, Clone, Copy)]
struct Held {
    keys: u64,
    rows: u64,
}

/// What one sink holds per group and day, or why it could not be read.
type Holdings = Result<HashMap<GroupDay, Held>, String>;

/// Per key, the first sequence it has in each forwarded lane (`u64::MAX`: not there).
type LogKeys = HashMap<GroupDay, HashMap<(i64, u32), [u64; 2]>>;

fn lane_index(lane: Lane) -> usize {
    FORWARDED_LANES.iter().position(|l| *l == lane).unwrap_or(0)
}

pub async fn verify(config: &Config, data_dir: &Path) -> anyhow::Result<Report> {
    let sinks = config.sinks.enabled();

    // 1. Cursors.
    let (cursors, log_id) = {
        let reader = Wal::open_read_only(data_dir)?;
        let mut cursors = HashMap::new();
        for sink in &sinks {
            let mut per_lane = [0u64; 2];
            for lane in FORWARDED_LANES {
                per_lane[lane_index(lane)] = reader.cursor(sink, lane)?;
            }
            cursors.insert(*sink, per_lane);
        }
        (cursors, reader.log_id()?)
    };

    // 2. The sinks.
    let mut held: Vec<(&'static str, Holdings)> = Vec::new();
    for sink in &sinks {
        let result = match *sink {
            "clickhouse" => clickhouse_counts(config).await,
            "postgres" => postgres_counts(config, &log_id).await,
            _ => nats_counts(config).await,
        };
        held.push((sink, result));
    }

    // 3. The log, as it is now (a superset of what the sinks were asked for).
    let reader = Wal::open_read_only(data_dir)?;
    let mut keys: LogKeys = HashMap::new();
    let mut log_events = 0u64;
    for lane in FORWARDED_LANES {
        let index = lane_index(lane);
        let last = reader.last_seq(lane)?.unwrap_or(0);
        reader.scan(lane, 1, last, |seq, record| {
            // Corrupt records are `wal check`'s to report; drill records are not events.
            let Ok(record) = record else { return true };
            if record.kind != EVENT_KIND {
                return true;
            }
            let Ok(event) = Event::from_payload(record.payload) else {
                return true;
            };
            log_events += 1;
            let key = event.natural_key();
            let group = GroupDay {
                feed: key.feed.name().to_owned(),
                symbol: key.symbol,
                kind: key.kind.name().to_owned(),
                timeframe: key.timeframe,
                day: key.ts_ms / DAY_MS,
            };
            let first = keys
                .entry(group)
                .or_default()
                .entry((key.ts_ms, key.ordinal))
                .or_insert([u64::MAX; 2]);
            first[index] = first[index].min(seq);
            true
        })?;
    }
    let log_keys = keys.values().map(|k| k.len() as u64).sum();

    let mut reports = Vec::new();
    for (sink, result) in held {
        let c = cursors[sink];
        let mut report = SinkReport {
            sink,
            cursors: FORWARDED_LANES
                .iter()
                .map(|l| (l.name().to_owned(), c[lane_index(*l)]))
                .collect(),
            groups_checked: 0,
            passed: 0,
            in_sink: 0,
            groups_not_in_log: 0,
            differences: Vec::new(),
            error: None,
        };
        match result {
            Err(e) => report.error = Some(e),
            Ok(held) => {
                report.groups_not_in_log = held.keys().filter(|g| !keys.contains_key(*g)).count() as u64;
                let mut groups: Vec<&GroupDay> = keys.keys().collect();
                groups.sort();
                for group in groups {
                    let (mut passed, mut pending) = (0u64, 0u64);
                    for first in keys[group].values() {
                        if first[0] <= c[0] || first[1] <= c[1] {
                            passed += 1;
                        } else {
                            pending += 1;
                        }
                    }
                    let h = held.get(group).copied().unwrap_or_default();
                    report.groups_checked += 1;
                    report.passed += passed;
                    report.in_sink += h.keys;
                    let duplicates = h.rows.saturating_sub(h.keys);
                    let missing = passed.saturating_sub(h.keys);
                    let extra = h.keys.saturating_sub(passed + pending);
                    if missing > 0 || extra > 0 || duplicates > 0 {
                        report.differences.push(Difference {
                            date: group.date(),
                            group: group.clone(),
                            passed,
                            pending,
                            in_sink: h.keys,
                            missing,
                            extra,
                            duplicates,
                        });
                    }
                }
            }
        }
        reports.push(report);
    }
    Ok(Report {
        log_events,
        log_keys,
        sinks: reports,
    })
}

fn holdings(counts: Vec<GroupCount>) -> HashMap<GroupDay, Held> {
    counts
        .into_iter()
        .map(|c| {
            let held = Held {
                keys: c.keys,
                rows: c.rows,
            };
            let group = GroupDay {
                feed: c.feed,
                symbol: c.symbol,
                kind: c.kind,
                timeframe: c.timeframe,
                day: c.day,
            };
            (group, held)
        })
        .collect()
}

async fn clickhouse_counts(config: &Config) -> Holdings {
    let sink = ClickHouseSink::new(&config.sinks.clickhouse);
    Ok(holdings(sink.group_counts().await.map_err(|e| e.to_string())?))
}

async fn postgres_counts(config: &Config, log_id: &str) -> Holdings {
    let mut sink = PostgresSink::new(&config.sinks.postgres, log_id);
    Ok(holdings(sink.group_counts().await.map_err(|e| e.to_string())?))
}

async fn nats_counts(config: &Config) -> Holdings {
    let mut sink = NatsSink::new(&config.sinks.nats);
    let mut seen: HashMap<GroupDay, (HashSet<(i64, u32)>, u64)> = HashMap::new();
    sink.scan(|row| {
        let group = GroupDay {
            day: row.ts_ms / DAY_MS,
            feed: row.feed,
            symbol: row.symbol,
            kind: row.kind,
            timeframe: row.timeframe,
        };
        let entry = seen.entry(group).or_default();
        entry.0.insert((row.ts_ms, row.ordinal));
        entry.1 += 1;
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(seen
        .into_iter()
        .map(|(g, (keys, rows))| {
            (
                g,
                Held {
                    keys: keys.len() as u64,
                    rows,
                },
            )
        })
        .collect())
}
