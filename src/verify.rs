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
//! the log cannot be checked against it (it is counted, not flagged). A group and day the
//! log holds only in part (truncation took its first records) is checked for missing
//! keys and duplicates, but keys the sink holds beyond the log's are not flagged there:
//! they are counted as beyond the log's retention. Which days those are:
//! - the live lane, once truncated: the days that begin before the first retained live
//!   event was captured (plus an hour for clocks): a live event is captured after it
//!   happens, so a truncated one cannot belong to a later day;
//! - the backfill lane, once truncated: every day of bars (history has no such order).
//!
//! The keys themselves are sorted on disk (`index`), so memory grows with the number of
//! groups and days, not with the keys: scratch disk in `$TMPDIR` takes about 20 bytes
//! per event in the log and message in the stream while it runs.

mod index;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;
use tickvault_wal::{Lane, Wal};

use crate::config::Config;
use crate::daemon::FORWARDED_LANES;
use crate::event::{Event, EventKind, EVENT_KIND};
use crate::sink::clickhouse::ClickHouseSink;
use crate::sink::nats::NatsSink;
use crate::sink::postgres::PostgresSink;
use crate::sink::GroupCount;
use index::{From, GroupDayId, GroupNames, KeyIndex, Source};

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
    /// The group and day `id` of `index`'s `groups`.
    fn of(groups: &[GroupNames], id: GroupDayId) -> Self {
        let (feed, symbol, kind, timeframe) = groups[id.group as usize].clone();
        GroupDay {
            feed,
            symbol,
            kind,
            timeframe,
            day: id.day,
        }
    }

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
    /// Keys the sink holds beyond the log's in groups and days the log holds only in part
    /// (its first records were truncated): not compared, so not differences.
    pub beyond_retention: u64,
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
    /// Per forwarded lane, the lowest sequence truncation kept (1: never truncated).
    pub first_retained: BTreeMap<String, u64>,
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

/// A sink's report as it is built: the report, the sink's cursors per lane, and what the
/// sink holds that the log's groups and days have not been compared with yet.
type Building = (SinkReport, [u64; 2], Option<HashMap<GroupDay, Held>>);

fn lane_index(lane: Lane) -> usize {
    FORWARDED_LANES.iter().position(|l| *l == lane).unwrap_or(0)
}

pub async fn verify(config: &Config, data_dir: &Path) -> anyhow::Result<Report> {
    let sinks = config.sinks.enabled();
    // The keys go to disk, sorted there: memory stays with the groups and days.
    let mut index = KeyIndex::new()?;

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
            _ => nats_counts(config, &mut index).await?,
        };
        held.push((sink, result));
    }

    // 3. The log, as it is now (a superset of what the sinks were asked for).
    let reader = Wal::open_read_only(data_dir)?;
    let mut log_events = 0u64;
    let mut first_live_capture_ns = i64::MAX;
    for lane in FORWARDED_LANES {
        let index_of_lane = lane_index(lane) as u8;
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
            if lane == Lane::Live {
                first_live_capture_ns = first_live_capture_ns.min(event.capture.captured_at_ns);
            }
            let key = event.natural_key();
            let names = (
                key.feed.name(),
                key.symbol.as_str(),
                key.kind.name(),
                key.timeframe.as_str(),
            );
            index.add(
                names,
                key.ts_ms,
                key.uid,
                From::Log {
                    lane: index_of_lane,
                    seq,
                },
            )
        })?;
    }
    let mut first_retained = BTreeMap::new();
    for lane in FORWARDED_LANES {
        first_retained.insert(lane.name().to_owned(), reader.first_retained(lane)?);
    }
    drop(reader);
    let partial = Partial {
        live_from_ms: (first_retained[Lane::Live.name()] > 1).then_some(first_live_capture_ns / 1_000_000),
        backfill: first_retained[Lane::Backfill.name()] > 1,
    };

    // 4. Group by group and day, in the index's order.
    let mut reports: Vec<Building> = held
        .into_iter()
        .map(|(sink, result)| {
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
                beyond_retention: 0,
                differences: Vec::new(),
                error: None,
            };
            let held = result.map_err(|e| report.error = Some(e)).ok();
            (report, c, held)
        })
        .collect();
    let names = index.groups().to_vec();
    let group_day = |id: GroupDayId| GroupDay::of(&names, id);
    let sink_cursors: Vec<[u64; 2]> = reports.iter().map(|(_, c, _)| *c).collect();
    let mut finish = |id: GroupDayId, counts: &[(u64, u64)]| {
        let group = group_day(id);
        for ((report, _, held), &(passed, pending)) in reports.iter_mut().zip(counts) {
            let Some(held) = held else { continue };
            let h = held.remove(&group).unwrap_or_default();
            compare(report, &group, &partial, passed, pending, h);
        }
    };
    let mut log_keys = 0u64;
    // The group and day being counted, and per sink its keys passed and pending.
    let mut current: Option<(GroupDayId, Vec<(u64, u64)>)> = None;
    index.walk(Source::Log, |id, entries| {
        log_keys += 1;
        if current.as_ref().is_some_and(|(at, _)| *at != id) {
            if let Some((at, counts)) = current.take() {
                finish(at, &counts);
            }
        }
        let (_, counts) = current.get_or_insert_with(|| (id, vec![(0, 0); sink_cursors.len()]));
        for (c, (passed, pending)) in sink_cursors.iter().zip(counts.iter_mut()) {
            let first = entries.first;
            if first[0] <= c[0] || first[1] <= c[1] {
                *passed += 1;
            } else {
                *pending += 1;
            }
        }
    })?;
    if let Some((at, counts)) = current.take() {
        finish(at, &counts);
    }

    let sinks = reports
        .into_iter()
        .map(|(mut report, _, held)| {
            // What is left was not in the log.
            report.groups_not_in_log = held.map_or(0, |h| h.len() as u64);
            report.differences.sort_by(|a, b| a.group.cmp(&b.group));
            report
        })
        .collect();
    Ok(Report {
        log_events,
        log_keys,
        first_retained,
        sinks,
    })
}

/// One group and day of one sink: `passed` keys must be in it, `pending` may be.
fn compare(report: &mut SinkReport, group: &GroupDay, partial: &Partial, passed: u64, pending: u64, h: Held) {
    report.groups_checked += 1;
    report.passed += passed;
    report.in_sink += h.keys;
    let duplicates = h.rows.saturating_sub(h.keys);
    let missing = passed.saturating_sub(h.keys);
    let mut extra = h.keys.saturating_sub(passed + pending);
    if extra > 0 && partial.holds_in_part(group) {
        report.beyond_retention += extra;
        extra = 0;
    }
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

/// Which groups and days the log may hold only in part, because truncation took records
/// of them.
struct Partial {
    /// The live lane was truncated, and its first retained event was captured then
    /// (`i64::MAX / 1e6` when no live event is left).
    live_from_ms: Option<i64>,
    /// The backfill lane was truncated.
    backfill: bool,
}

impl Partial {
    /// How far an event's own time may run ahead of our capture clock.
    const CLOCKS_MS: i64 = 3_600_000;

    fn holds_in_part(&self, group: &GroupDay) -> bool {
        let live = self
            .live_from_ms
            .is_some_and(|from| group.day * DAY_MS < from.saturating_add(Self::CLOCKS_MS));
        live || (self.backfill && group.kind == EventKind::Bar.name())
    }
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
    let mut sink = ClickHouseSink::new(&config.sinks.clickhouse);
    Ok(holdings(sink.group_counts().await.map_err(|e| e.to_string())?))
}

async fn postgres_counts(config: &Config, log_id: &str) -> Holdings {
    let mut sink = PostgresSink::new(&config.sinks.postgres, log_id);
    Ok(holdings(sink.group_counts().await.map_err(|e| e.to_string())?))
}

/// The stream's messages go through `index` (a message's key may be anywhere in the
/// stream): `Err` only when the index itself failed (its walk says so).
async fn nats_counts(config: &Config, index: &mut KeyIndex) -> anyhow::Result<Holdings> {
    let mut sink = NatsSink::new(&config.sinks.nats);
    let scanned = sink
        .scan(|row| {
            let names = (&*row.feed, row.symbol.as_str(), &*row.kind, &*row.timeframe);
            index.add(names, row.ts_ms, row.uid, From::Stream);
        })
        .await;
    if let Err(e) = scanned {
        return Ok(Err(e.to_string()));
    }
    let names = index.groups().to_vec();
    let mut held: HashMap<GroupDay, Held> = HashMap::new();
    index.walk(Source::Stream, |id, entries| {
        let h = held.entry(GroupDay::of(&names, id)).or_default();
        h.keys += 1;
        h.rows += entries.count;
    })?;
    Ok(Ok(held))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(kind: &str, day: i64) -> GroupDay {
        GroupDay {
            feed: "crypto".into(),
            symbol: "BTC-USD".into(),
            kind: kind.into(),
            timeframe: "tick".into(),
            day,
        }
    }

    #[test]
    fn a_log_never_truncated_holds_every_day_whole() {
        let p = Partial {
            live_from_ms: None,
            backfill: false,
        };
        assert!(!p.holds_in_part(&group("quote", 0)));
        assert!(!p.holds_in_part(&group("bar", 20_000)));
    }

    #[test]
    fn a_truncated_live_lane_holds_in_part_only_the_days_before_its_first_capture() {
        // The first retained live event was captured at 10:00 on day 20,000.
        let from = 20_000 * DAY_MS + 10 * 3_600_000;
        let p = Partial {
            live_from_ms: Some(from),
            backfill: false,
        };
        assert!(p.holds_in_part(&group("quote", 19_000)));
        assert!(p.holds_in_part(&group("trade", 20_000)));
        assert!(!p.holds_in_part(&group("quote", 20_001)));
        // Within the hour allowed for clocks, the next day counts as partial too.
        let late = Partial {
            live_from_ms: Some(20_001 * DAY_MS - 60_000),
            backfill: false,
        };
        assert!(late.holds_in_part(&group("quote", 20_001)));
        assert!(!late.holds_in_part(&group("quote", 20_002)));
        // Bars are not affected by the live lane's truncation beyond those days.
        assert!(!p.holds_in_part(&group("bar", 20_001)));
    }

    #[test]
    fn a_truncated_backfill_lane_holds_every_day_of_bars_in_part() {
        let p = Partial {
            live_from_ms: None,
            backfill: true,
        };
        assert!(p.holds_in_part(&group("bar", 1)));
        assert!(p.holds_in_part(&group("bar", 30_000)));
        assert!(!p.holds_in_part(&group("quote", 1)));
    }
}
