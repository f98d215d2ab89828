//! `tickvault verify`: what the local log holds against what each enabled sink holds,
//! key by key: every natural key the log holds and every row or message each sink holds
//! go through one on-disk index (`index`), sorted, and are compared side by side. 100%,
//! never a threshold, never a comparison of counts (where k keys missing and k others
//! extra would cancel out), and never a sleep-and-count: the log says what must be there.
//!
//! For a sink, the log's events split in two: those its cursor has passed (they must be
//! in the sink) and the rest (they may already be: a batch is written before its cursor
//! moves). A sink matches when it lacks no passed key, holds no key the log lacks and
//! holds each key once. To stay exact while the daemon runs, the cursors are read
//! first, the sinks second and the log's events last: the sinks can then hold nothing
//! the log's snapshot lacks, and everything the cursors passed was in the sinks when
//! they were asked. Beside the match, each sink's backlog: the records its cursors have
//! not passed and how long ago the oldest of them was captured; `--max-lag` makes an
//! older one a failure (a sink stuck for hours matches on what it passed).
//!
//! Only what the log still holds is compared: keys of groups and days that retention
//! truncated from the log cannot be checked against it (they are counted, not flagged).
//! In a group and day the log holds only in part (truncation took its first records),
//! missing keys and duplicates are flagged, but keys the sink holds beyond the log's are
//! counted as beyond the log's retention. Which days those are:
//! - the live lane, once truncated: the days that begin before the first retained live
//!   event was captured (plus an hour for clocks): a live event is captured after it
//!   happens, so a truncated one cannot belong to a later day;
//! - the backfill lane, once truncated: every day of bars (history has no such order);
//! - the derived lane, once truncated: every day of derived bars (late data revises old
//!   ones).
//!
//! Derived bars have versions: a key of the derived lane is its natural key and
//! version (the `uid` the reports show is the version). JetStream keeps every version
//! (a message each), and must hold each the cursor passed; ClickHouse and PostgreSQL
//! keep one row per natural key, and must hold the highest version the log has, once
//! the cursor passed it (an older one in its place is that version missing).
//!
//! Memory stays with one key and one group and day at a time; scratch disk in `$TMPDIR`
//! takes about 20 bytes per event in the log and row in the sinks while it runs.

mod index;
pub mod periods;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tickvault_wal::{Lane, Wal};

use crate::config::Config;
use crate::daemon::FORWARDED_LANES;
use crate::event::{Body, Event, EventKind, DAY_MS, EVENT_KIND};
use crate::sink::clickhouse::ClickHouseSink;
use crate::sink::nats::NatsSink;
use crate::sink::postgres::PostgresSink;
use crate::sink::SinkKey;
use index::{From, GroupDayId, GroupNames, KeyIndex, NaturalKeyEntries, LANES, MAX_SINKS};

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

/// A key of a [`Difference`], as the log and the sinks name it.
#[derive(Clone, Debug, Serialize)]
pub struct KeyExample {
    pub ts_ms: i64,
    /// A derived bar's version.
    pub uid: u64,
    /// `missing` (passed by the cursor, not in the sink), `refused` (not in the sink,
    /// which refused it for its content: set aside), `extra` (in the sink, not in the
    /// log) or `duplicate` (in the sink more than once).
    pub problem: &'static str,
}

/// A group and day where a sink does not match the log.
#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    #[serde(flatten)]
    pub group: GroupDay,
    pub date: String,
    /// Keys the sink's cursor has passed: all must be in the sink.
    pub passed: u64,
    /// Keys in the log the cursor has not passed yet: may be in the sink.
    pub pending: u64,
    /// Distinct keys in the sink.
    pub in_sink: u64,
    /// Passed keys missing from the sink.
    pub missing: u64,
    /// Passed keys not in the sink because it refused them for their content.
    pub refused: u64,
    /// Keys in the sink the log does not hold.
    pub extra: u64,
    /// Rows beyond one per key.
    pub duplicates: u64,
    /// The first few keys at fault, in key order.
    pub examples: Vec<KeyExample>,
}

/// How far a sink is behind the log in one lane.
#[derive(Clone, Debug, Serialize)]
pub struct Backlog {
    pub lane: String,
    /// The sink's cursor when verification began.
    pub cursor: u64,
    /// The lane's last sequence when the log was read.
    pub head: u64,
    /// Records past the cursor.
    pub records: u64,
    /// How long before verification the oldest event past the cursor was captured.
    pub oldest_unsent_age_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SinkReport {
    pub sink: &'static str,
    /// The sink's cursor per lane when verification began.
    pub cursors: BTreeMap<String, u64>,
    /// Per lane, what the cursor has not passed yet.
    pub backlog: Vec<Backlog>,
    pub groups_checked: u64,
    /// Keys the cursors have passed, summed over the groups.
    pub passed: u64,
    pub in_sink: u64,
    /// Groups and days the sink holds that the log no longer has (retention).
    pub groups_not_in_log: u64,
    /// Keys the sink holds beyond the log's in groups and days the log holds only in part
    /// (its first records were truncated): not compared, so not differences.
    pub beyond_retention: u64,
    pub differences: Vec<Difference>,
    /// Records this sink refused for their content, set aside in the log's state (the
    /// first 100; `refused` counts them all). The sink lacks them: it does not match.
    pub refused_records: Vec<RefusedRecord>,
    pub refused: u64,
    /// Set when the oldest unsent event is older than `--max-lag`: the sink then does
    /// not match, whatever it holds.
    pub lag_exceeded: Option<String>,
    /// Set when the sink could not be read; the sink then does not match.
    pub error: Option<String>,
    /// Backfill periods verified before that this sink now lacks keys of (each is a
    /// difference too).
    pub verified_periods_short: Vec<ShortPeriod>,
    /// Per (feed, symbol), the minutes of one-minute bars passed and missing here.
    #[serde(skip)]
    missing_minutes: BTreeMap<(String, String), Vec<i64>>,
}

/// A verified backfill period a sink lacks keys of.
#[derive(Clone, Debug, Serialize)]
pub struct ShortPeriod {
    pub feed: String,
    pub symbol: String,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Its minute bars the log holds and the sink lacks.
    pub missing: u64,
    /// Whether `verify` took its verification away (it can when no daemon holds the
    /// log; else the daemon does when it checks it again, within `gaps.recheck`).
    pub unverified: bool,
}

impl SinkReport {
    pub fn matches(&self) -> bool {
        self.error.is_none() && self.differences.is_empty() && self.lag_exceeded.is_none() && self.refused == 0
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub log_events: u64,
    pub log_keys: u64,
    /// Per forwarded lane, the lowest sequence truncation kept (1: never truncated).
    pub first_retained: BTreeMap<String, u64>,
    /// The backfill's periods per state, as they stood when the log was read.
    pub periods: crate::gaps::PeriodCounts,
    pub sinks: Vec<SinkReport>,
}

impl Report {
    pub fn matches(&self) -> bool {
        self.sinks.iter().all(SinkReport::matches)
    }
}

/// A record a sink refused, as `verify` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct RefusedRecord {
    pub lane: String,
    pub seq: u64,
    pub code: String,
    pub reason: String,
    /// When it was set aside, ms since the epoch.
    pub at_ms: i64,
}

/// Refused records listed per sink.
const REFUSED_LISTED: usize = 100;

/// Keys shown per difference.
const EXAMPLES: usize = 3;

/// One sink's tally of one group and day, as the walk goes.
#[derive(Default)]
struct Tally {
    log_keys: u64,
    passed: u64,
    pending: u64,
    in_sink: u64,
    missing: u64,
    refused: u64,
    extra: u64,
    duplicates: u64,
    examples: Vec<KeyExample>,
    /// Of a one-minute bar group, the minutes passed and missing.
    missing_minutes: Vec<i64>,
}

impl Tally {
    fn example(&mut self, ts_ms: i64, uid: u64, problem: &'static str) {
        if self.examples.len() < EXAMPLES {
            self.examples.push(KeyExample { ts_ms, uid, problem });
        }
    }
}

fn lane_index(lane: Lane) -> usize {
    FORWARDED_LANES.iter().position(|l| *l == lane).unwrap_or(0)
}

/// Calls `visit` with the natural key of every row or message `sink` of `config` holds;
/// returns how many.
pub async fn scan_sink(
    config: &Config,
    sink: &str,
    log_id: &str,
    mut visit: impl FnMut(SinkKey),
) -> Result<u64, crate::sink::SinkError> {
    match sink {
        "clickhouse" => ClickHouseSink::new(&config.sinks.clickhouse).scan_keys(visit).await,
        "postgres" => PostgresSink::new(&config.sinks.postgres, log_id).scan_keys(visit).await,
        _ => {
            NatsSink::new(&config.sinks.nats)
                .scan(|row| {
                    let uid = row.verify_uid();
                    visit(SinkKey {
                        feed: row.feed.into_owned(),
                        symbol: row.symbol,
                        kind: row.kind.into_owned(),
                        timeframe: row.timeframe.into_owned(),
                        ts_ms: row.ts_ms,
                        uid,
                    })
                })
                .await
        }
    }
}

/// What a `replay` sent, for [`verify_replay`]: one sink, every event of `lanes` up to
/// `sent_up_to` (per forwarded lane) whose market time is in `from_ms..to_ms`.
#[derive(Clone, Debug)]
pub struct Replayed {
    pub sink: &'static str,
    pub sent_up_to: [u64; LANES],
    pub from_ms: i64,
    pub to_ms: i64,
}

/// Compares the log in `data_dir` with every enabled sink of `config`; with `max_lag`, a
/// sink whose oldest unsent event was captured longer ago than that does not match.
pub async fn verify(config: &Config, data_dir: &Path, max_lag: Option<Duration>) -> anyhow::Result<Report> {
    compare_with_sinks(config, data_dir, max_lag, None).await
}

/// [`verify`] of what a replay sent: its sink alone, the keys in its time range alone
/// (the log's and the sink's), and its events taken as passed (every one of them must be
/// in the sink) whatever the log's cursors say; the log's other events in the range may
/// be in the sink or not (a daemon's forwarding of another lane).
pub async fn verify_replay(config: &Config, data_dir: &Path, replayed: &Replayed) -> anyhow::Result<SinkReport> {
    let mut report = compare_with_sinks(config, data_dir, None, Some(replayed)).await?;
    report.sinks.pop().context("the replayed sink's report")
}

async fn compare_with_sinks(
    config: &Config,
    data_dir: &Path,
    max_lag: Option<Duration>,
    replayed: Option<&Replayed>,
) -> anyhow::Result<Report> {
    let mut sinks = config.sinks.enabled();
    if let Some(r) = replayed {
        sinks.retain(|s| *s == r.sink);
    }
    let in_range = |ts_ms: i64| replayed.is_none_or(|r| (r.from_ms..r.to_ms).contains(&ts_ms));
    anyhow::ensure!(sinks.len() <= MAX_SINKS, "verify compares at most {MAX_SINKS} sinks");
    let started_ns = crate::event::now_ns();
    // The keys go to disk, sorted there: memory stays with one group and day.
    let mut index = KeyIndex::new()?;

    // 1. Cursors.
    let (cursors, log_id, refused) = {
        let reader = Wal::open_read_only(data_dir)?;
        let mut cursors = Vec::new();
        for sink in &sinks {
            let mut per_lane = [0u64; LANES];
            for lane in FORWARDED_LANES {
                per_lane[lane_index(lane)] = reader.cursor(sink, lane)?;
            }
            cursors.push(replayed.map_or(per_lane, |r| r.sent_up_to));
        }
        let mut refused: Vec<Vec<RefusedRecord>> = vec![Vec::new(); sinks.len()];
        for r in crate::sink::refused::list(&reader)? {
            if let Some(n) = sinks.iter().position(|s| *s == r.sink) {
                refused[n].push(RefusedRecord {
                    lane: r.lane,
                    seq: r.seq,
                    code: r.code,
                    reason: r.reason,
                    at_ms: r.at_ms,
                });
            }
        }
        (cursors, reader.log_id()?, refused)
    };
    // Per sink, the (lane index, sequence) of each record it refused.
    let refused_at: Vec<std::collections::HashSet<(usize, u64)>> = refused
        .iter()
        .map(|list| {
            list.iter()
                .filter_map(|r| Some((FORWARDED_LANES.iter().position(|l| l.name() == r.lane)?, r.seq)))
                .collect()
        })
        .collect();

    // 2. The sinks: every key each holds, into the index.
    let mut errors: Vec<Option<String>> = Vec::new();
    for (n, sink) in sinks.iter().enumerate() {
        let from = From::Sink(n as u8);
        let mut add = |key: SinkKey| {
            if !in_range(key.ts_ms) {
                return;
            }
            let names = (
                key.feed.as_str(),
                key.symbol.as_str(),
                key.kind.as_str(),
                key.timeframe.as_str(),
            );
            index.add(names, key.ts_ms, key.uid, from);
        };
        let scanned = scan_sink(config, sink, &log_id, &mut add).await;
        errors.push(scanned.err().map(|e| e.to_string()));
    }

    // 3. The log, as it is now (a superset of what the sinks were asked for).
    let reader = Wal::open_read_only(data_dir)?;
    let mut log_events = 0u64;
    let mut first_live_capture_ns = i64::MAX;
    // Per sink and lane, when the first event past the cursor was captured.
    let mut first_unsent_ns: Vec<[Option<i64>; LANES]> = vec![[None; LANES]; sinks.len()];
    let mut heads = [0u64; LANES];
    for lane in FORWARDED_LANES {
        let l = lane_index(lane);
        let last = reader.last_seq(lane)?.unwrap_or(0);
        heads[l] = last;
        reader.scan(lane, 1, last, |seq, record| {
            // Corrupt records are `wal check`'s to report; drill records are not events.
            let Ok(record) = record else { return true };
            if record.kind != EVENT_KIND {
                return true;
            }
            let Ok(event) = Event::from_payload(record.payload) else {
                return true;
            };
            if !in_range(event.ts_ms()) {
                return true;
            }
            log_events += 1;
            let captured = event.capture.captured_at_ns;
            if lane == Lane::Live {
                first_live_capture_ns = first_live_capture_ns.min(captured);
            }
            for (c, first) in cursors.iter().zip(first_unsent_ns.iter_mut()) {
                if seq > c[l] && first[l].is_none() {
                    first[l] = Some(captured);
                }
            }
            let key = event.natural_key();
            let names = (
                key.feed.name(),
                key.symbol.as_str(),
                key.kind.name(),
                key.timeframe.as_str(),
            );
            let uid = match &event.body {
                Body::Derived(d) => u64::from(d.version),
                _ => key.uid,
            };
            index.add(names, key.ts_ms, uid, From::Log { lane: l as u8, seq })
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
        derived: first_retained[Lane::Derived.name()] > 1,
    };

    let mut reports: Vec<SinkReport> = sinks
        .iter()
        .zip(&cursors)
        .zip(errors)
        .zip(&first_unsent_ns)
        .zip(refused)
        .map(|((((sink, c), error), first_unsent), refused)| {
            let backlog: Vec<Backlog> = FORWARDED_LANES
                .iter()
                .map(|lane| {
                    let l = lane_index(*lane);
                    Backlog {
                        lane: lane.name().to_owned(),
                        cursor: c[l],
                        head: heads[l],
                        records: heads[l].saturating_sub(c[l]),
                        oldest_unsent_age_ms: first_unsent[l]
                            .map(|ns| (started_ns.saturating_sub(ns).max(0) / 1_000_000) as u64),
                    }
                })
                .collect();
            let lag_exceeded = max_lag.and_then(|max| {
                let oldest = backlog.iter().max_by_key(|b| b.oldest_unsent_age_ms)?;
                let age = Duration::from_millis(oldest.oldest_unsent_age_ms?);
                (age > max).then(|| {
                    format!(
                        "its oldest unsent {} event was captured {} ago, more than --max-lag {}",
                        oldest.lane,
                        humantime::format_duration(Duration::from_secs(age.as_secs())),
                        humantime::format_duration(max)
                    )
                })
            });
            SinkReport {
                sink,
                cursors: backlog.iter().map(|b| (b.lane.clone(), b.cursor)).collect(),
                backlog,
                groups_checked: 0,
                passed: 0,
                in_sink: 0,
                groups_not_in_log: 0,
                beyond_retention: 0,
                differences: Vec::new(),
                refused: refused.len() as u64,
                refused_records: refused.into_iter().take(REFUSED_LISTED).collect(),
                lag_exceeded,
                error,
                verified_periods_short: Vec::new(),
                missing_minutes: BTreeMap::new(),
            }
        })
        .collect();

    // 4. Key by key, group by group and day, in the index's order.
    let names = index.groups().to_vec();
    let mut finish = |id: GroupDayId, tallies: Vec<Tally>| {
        let group = GroupDay::of(&names, id);
        for (report, tally) in reports.iter_mut().zip(tallies) {
            if report.error.is_none() {
                compare(report, &group, &partial, tally);
            }
        }
    };
    // Sinks that keep one row per natural key: of a derived bar's versions, the highest.
    let latest_only: Vec<bool> = sinks.iter().map(|s| *s != "nats").collect();
    let derived_groups: Vec<bool> = names.iter().map(|g| g.2 == EventKind::Derived.name()).collect();
    let minute_bars: Vec<bool> = names
        .iter()
        .map(|g| g.2 == EventKind::Bar.name() && g.3 == "1m")
        .collect();
    let mut log_keys = 0u64;
    let mut current: Option<(GroupDayId, Vec<Tally>)> = None;
    // `superseded`: a derived bar's version below the highest the log holds.
    let mut count = |id: GroupDayId, entries: &NaturalKeyEntries, superseded: bool| {
        if current.as_ref().is_some_and(|(at, _)| *at != id) {
            if let Some((at, tallies)) = current.take() {
                finish(at, tallies);
            }
        }
        let (_, tallies) = current.get_or_insert_with(|| (id, (0..cursors.len()).map(|_| Tally::default()).collect()));
        let in_log = entries.in_log > 0;
        log_keys += u64::from(in_log && !superseded);
        let (ts_ms, uid) = (entries.ts_ms, entries.uid);
        for (n, (c, t)) in cursors.iter().zip(tallies.iter_mut()).enumerate() {
            let rows = entries.rows[n];
            if superseded && latest_only[n] {
                // Its row may stand until the newer one comes; never missing, never extra.
                t.in_sink += u64::from(rows > 0);
                continue;
            }
            if in_log {
                t.log_keys += 1;
                if (0..LANES).any(|l| entries.first[l] <= c[l]) {
                    t.passed += 1;
                    let set_aside =
                        |l: usize| entries.first[l] != u64::MAX && refused_at[n].contains(&(l, entries.first[l]));
                    if rows == 0 && (0..LANES).any(set_aside) {
                        t.refused += 1;
                        t.example(ts_ms, uid, "refused");
                    } else if rows == 0 {
                        t.missing += 1;
                        t.example(ts_ms, uid, "missing");
                    }
                    if rows == 0 && minute_bars[id.group as usize] {
                        t.missing_minutes.push(ts_ms);
                    }
                } else {
                    t.pending += 1;
                }
            } else if rows > 0 {
                t.extra += 1;
                t.example(ts_ms, uid, "extra");
            }
            if rows > 0 {
                t.in_sink += 1;
            }
            if rows > 1 {
                t.duplicates += rows - 1;
                t.example(ts_ms, uid, "duplicate");
            }
        }
    };
    // A derived bar's versions (one key each, in version order) are held until the
    // next key, to know which is the highest the log holds.
    let mut versions: Vec<NaturalKeyEntries> = Vec::new();
    let mut versions_of: Option<GroupDayId> = None;
    fn flush(
        id: GroupDayId,
        versions: &mut Vec<NaturalKeyEntries>,
        count: &mut impl FnMut(GroupDayId, &NaturalKeyEntries, bool),
    ) {
        let highest = versions.iter().rev().find(|e| e.in_log > 0).map(|e| e.uid);
        for e in versions.drain(..) {
            count(id, &e, e.in_log > 0 && highest.is_some_and(|h| e.uid < h));
        }
    }
    index.walk(|id, entries| {
        if let Some(at) = versions_of {
            if at != id || versions.first().is_some_and(|v| v.ts_ms != entries.ts_ms) {
                flush(at, &mut versions, &mut count);
                versions_of = None;
            }
        }
        if derived_groups[id.group as usize] {
            versions_of = Some(id);
            versions.push(*entries);
        } else {
            count(id, entries, false);
        }
    })?;
    if let Some(at) = versions_of {
        flush(at, &mut versions, &mut count);
    }
    if let Some((at, tallies)) = current.take() {
        finish(at, tallies);
    }
    for report in &mut reports {
        report.differences.sort_by(|a, b| a.group.cmp(&b.group));
    }
    let periods = short_periods(data_dir, &mut reports).await?;
    Ok(Report {
        log_events,
        log_keys,
        first_retained,
        periods,
        sinks: reports,
    })
}

/// The verified periods each sink lacks keys of (from the minutes the walk found
/// missing), un-verified here when no daemon holds the log; the periods per state.
async fn short_periods(data_dir: &Path, reports: &mut [SinkReport]) -> anyhow::Result<crate::gaps::PeriodCounts> {
    use crate::source::backfill::{periods_as_they_stand, verification_key, PeriodState};
    let tracked = periods_as_they_stand(&Wal::open_read_only(data_dir)?)?;
    let mut counts = crate::gaps::PeriodCounts::default();
    let mut short = Vec::new();
    for p in &tracked {
        counts.add(p.state);
        if p.state != PeriodState::Verified {
            continue;
        }
        for report in reports.iter_mut() {
            let Some(minutes) = report
                .missing_minutes
                .get(&(p.feed.name().to_owned(), p.symbol.clone()))
            else {
                continue;
            };
            let missing = minutes
                .iter()
                .filter(|m| (p.from_ms()..p.resume_from_ms).contains(m))
                .count() as u64;
            if missing > 0 {
                report.verified_periods_short.push(ShortPeriod {
                    feed: p.feed.name().to_owned(),
                    symbol: p.symbol.clone(),
                    from_ms: p.from_ms(),
                    to_ms: p.resume_from_ms,
                    missing,
                    unverified: false,
                });
                short.push(verification_key(p));
            }
        }
    }
    // Writable only when no daemon runs on it (it holds the log's lock).
    if !short.is_empty() {
        if let Ok(wal) = Wal::open(data_dir) {
            for key in short {
                wal.put_state(tickvault_wal::Space::State, key, None).await?;
            }
            wal.shutdown().await?;
            for r in reports.iter_mut() {
                for s in &mut r.verified_periods_short {
                    s.unverified = true;
                }
            }
        }
    }
    Ok(counts)
}

/// One group and day of one sink.
fn compare(report: &mut SinkReport, group: &GroupDay, partial: &Partial, mut t: Tally) {
    let in_part = partial.holds_in_part(group);
    if t.log_keys == 0 && in_part {
        // A day retention took from the log whole: nothing to compare it with.
        report.groups_not_in_log += u64::from(t.in_sink > 0);
        return;
    }
    report.groups_checked += 1;
    report.passed += t.passed;
    report.in_sink += t.in_sink;
    if !t.missing_minutes.is_empty() {
        report
            .missing_minutes
            .entry((group.feed.clone(), group.symbol.clone()))
            .or_default()
            .append(&mut t.missing_minutes);
    }
    if t.extra > 0 && in_part {
        report.beyond_retention += t.extra;
        t.extra = 0;
        t.examples.retain(|e| e.problem != "extra");
    }
    if t.missing > 0 || t.refused > 0 || t.extra > 0 || t.duplicates > 0 {
        report.differences.push(Difference {
            date: group.date(),
            group: group.clone(),
            passed: t.passed,
            pending: t.pending,
            in_sink: t.in_sink,
            missing: t.missing,
            refused: t.refused,
            extra: t.extra,
            duplicates: t.duplicates,
            examples: t.examples,
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
    /// The derived lane was truncated.
    derived: bool,
}

impl Partial {
    /// How far an event's own time may run ahead of our capture clock.
    const CLOCKS_MS: i64 = 3_600_000;

    fn holds_in_part(&self, group: &GroupDay) -> bool {
        let live = self
            .live_from_ms
            .is_some_and(|from| group.day * DAY_MS < from.saturating_add(Self::CLOCKS_MS));
        live || (self.backfill && group.kind == EventKind::Bar.name())
            || (self.derived && group.kind == EventKind::Derived.name())
    }
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
            derived: false,
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
            derived: false,
        };
        assert!(p.holds_in_part(&group("quote", 19_000)));
        assert!(p.holds_in_part(&group("trade", 20_000)));
        assert!(!p.holds_in_part(&group("quote", 20_001)));
        // Within the hour allowed for clocks, the next day counts as partial too.
        let late = Partial {
            live_from_ms: Some(20_001 * DAY_MS - 60_000),
            backfill: false,
            derived: false,
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
            derived: false,
        };
        assert!(p.holds_in_part(&group("bar", 1)));
        assert!(p.holds_in_part(&group("bar", 30_000)));
        assert!(!p.holds_in_part(&group("quote", 1)));
    }
}
