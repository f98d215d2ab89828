//! Gaps: minutes in market hours the log has no bar for. The live collector records
//! every disconnect as a suspected gap; [`scan`] reads the coverage index
//! (`crate::coverage`) with the calendar and finds every minute in market hours with
//! neither a bar nor a source-hole mark, naming the disconnect a gap falls in.

use serde::{Deserialize, Serialize};
use tickvault_wal::{Space, Wal, WriteError};

use crate::event::{Feed, DAY_MS, MINUTE_MS};

/// A suspected gap: events of `symbols` with timestamps in `from_ms..=to_ms` may be
/// missing, because the feed was disconnected in between.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspectedGap {
    pub feed: Feed,
    pub symbols: Vec<String>,
    /// Timestamp of the last event received before the disconnect (or the connect
    /// time, when none had arrived).
    pub from_ms: i64,
    /// Timestamp of the first event received after the reconnect (or the time capture
    /// stopped, when none arrived).
    pub to_ms: i64,
    /// Why the connection ended.
    pub cause: String,
}

const PREFIX: &str = "gap/suspected/";

/// Sorted by start; the end and the time it was recorded keep two gaps with one start
/// (no event between two disconnects) two records.
fn key(gap: &SuspectedGap) -> Vec<u8> {
    let mut key = format!("{PREFIX}{}/", gap.feed).into_bytes();
    key.extend_from_slice(&gap.from_ms.to_be_bytes());
    key.extend_from_slice(&gap.to_ms.to_be_bytes());
    let recorded_ns = jiff::Timestamp::now().as_nanosecond();
    key.extend_from_slice(&i64::try_from(recorded_ns).unwrap_or(i64::MAX).to_be_bytes());
    key
}

/// Stores a suspected gap durably.
pub async fn record(wal: &Wal, gap: &SuspectedGap) -> Result<(), WriteError> {
    let value = serde_json::to_vec(gap).map_err(|e| WriteError::Failed { cause: e.to_string() })?;
    wal.put_state(Space::State, key(gap), Some(value)).await
}

/// Every suspected gap in the log, oldest first per feed.
pub fn suspected(reader: &tickvault_wal::LogReader) -> Result<Vec<SuspectedGap>, tickvault_wal::ReadError> {
    Ok(reader
        .scan_state(Space::State, PREFIX.as_bytes())?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect())
}

/// Minutes this recent are not checked: a minute's aggregate comes when the minute
/// closes (a second or so after).
pub const SETTLE_MS: i64 = 65_000;

/// The minutes looked at now: `lookback` back from now, up to [`SETTLE_MS`] ago.
pub fn window(lookback: std::time::Duration) -> (i64, i64) {
    let now_ms = crate::event::now_ms();
    let lookback = i64::try_from(lookback.as_millis()).unwrap_or(i64::MAX);
    (now_ms.saturating_sub(lookback), now_ms - SETTLE_MS)
}

/// A symbol whose one-minute bars the config captures, and from when its minutes are
/// checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    pub feed: Feed,
    pub symbol: String,
    /// A backfill symbol: every minute of the lookback. Live only: from its first bar.
    pub backfilled: bool,
    /// Its minute aggregates are captured live too. A backfill symbol that is not is
    /// checked up to where its backfill has downloaded: the minutes after are the
    /// backfill's next pass's, not gaps.
    pub live: bool,
}

/// The live channels that carry one-minute aggregates.
const MINUTE_CHANNELS: [&str; 3] = ["CA", "XA", "AM"];

/// Every symbol whose minute bars `config` captures, once, in market then symbol order.
pub fn watched(config: &crate::config::Config) -> Vec<Watched> {
    let mut out: Vec<Watched> = Vec::new();
    let b = &config.backfill;
    let live = &config.live;
    for (feed, backfill, market) in [
        (Feed::Forex, &b.forex, &live.forex),
        (Feed::Crypto, &b.crypto, &live.crypto),
        (Feed::Stocks, &b.stocks, &live.stocks),
    ] {
        if b.enabled {
            for s in backfill {
                if let Some(symbol) = crate::polygon::symbol::canonical(feed, s) {
                    out.push(Watched {
                        feed,
                        symbol,
                        backfilled: true,
                        live: false,
                    });
                }
            }
        }
        let Some(market) = market.as_ref().filter(|_| live.enabled) else {
            continue;
        };
        if !market.channels.iter().any(|c| MINUTE_CHANNELS.contains(&c.as_str())) {
            continue;
        }
        for s in &market.symbols {
            let Some(symbol) = crate::polygon::symbol::canonical(feed, s) else {
                continue;
            };
            match out.iter_mut().find(|w| w.feed == feed && w.symbol == symbol) {
                Some(w) => w.live = true,
                None => out.push(Watched {
                    feed,
                    symbol,
                    backfilled: false,
                    live: true,
                }),
            }
        }
    }
    out
}

/// A run of minutes in market hours with no bar and no source-hole mark.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OpenGap {
    pub from_ms: i64,
    /// Exclusive.
    pub to_ms: i64,
    pub minutes: u64,
    /// Why it is suspected: the disconnect it falls in, or none known.
    pub why: String,
    /// What is being done about it (see [`GapState`]).
    pub state: GapState,
}

/// What is being done about an open gap, from the downloader's records in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GapState {
    /// A repair of the daemon is fetching minutes of it now (or was, when it stopped).
    BeingFetched,
    /// It lies in a backfill period not downloaded yet: the backfill will fetch it.
    WaitingForBackfill,
    /// The daemon's next repair (every `gaps.interval`, and after a reconnect) will.
    Waiting,
}

impl GapState {
    pub fn says(self) -> &'static str {
        match self {
            GapState::BeingFetched => "being fetched",
            GapState::WaitingForBackfill => "waiting for the backfill",
            GapState::Waiting => "waiting for the next repair",
        }
    }
}

/// A minute as `YYYY-MM-DD HH:MM` (UTC).
pub fn minute_text(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// Sets each open gap's state from the backfill's periods and the daemon's repairs, and
/// counts each symbol's periods per state.
pub fn set_states(reader: &tickvault_wal::LogReader, found: &mut [SymbolGaps]) -> anyhow::Result<()> {
    use crate::source::backfill::{periods_as_they_stand, repairs, PeriodState};
    let (tracked, repairing) = (periods_as_they_stand(reader)?, repairs(reader)?);
    for s in found {
        for p in tracked.iter().filter(|p| p.feed == s.feed && p.symbol == s.symbol) {
            s.periods.add(p.state);
        }
        for gap in &mut s.gaps {
            let overlaps = |p: &&crate::source::backfill::Period| {
                p.feed == s.feed
                    && p.symbol == s.symbol
                    && p.state == PeriodState::Pending
                    && p.resume_from_ms < gap.to_ms
                    && p.end_ms > gap.from_ms
            };
            gap.state = if repairing.iter().any(|p| overlaps(&p)) {
                GapState::BeingFetched
            } else if tracked.iter().any(|p| overlaps(&p)) {
                GapState::WaitingForBackfill
            } else {
                GapState::Waiting
            };
        }
    }
    Ok(())
}

/// One symbol's minutes over the range checked.
#[derive(Clone, Debug, Serialize)]
pub struct SymbolGaps {
    pub feed: Feed,
    pub symbol: String,
    pub timeframe: &'static str,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Minutes in market hours in the range.
    pub market_minutes: u64,
    /// Of those, with a bar in the log.
    pub covered: u64,
    /// Of those, marked as having no data at the source.
    pub source_holes: u64,
    pub gaps: Vec<OpenGap>,
    /// The backfill's periods of the symbol (all of them, not only those in the range).
    pub periods: PeriodCounts,
}

/// Periods of the backfill's tracker per state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeriodCounts {
    /// Being downloaded (cut short, resumed by the next pass).
    pub pending: u64,
    /// In the log, not yet found whole in every enabled sink.
    pub downloaded: u64,
    /// In the log, and every enabled sink held every key of it when last checked.
    pub verified: u64,
}

impl PeriodCounts {
    pub fn add(&mut self, state: crate::source::backfill::PeriodState) {
        use crate::source::backfill::PeriodState;
        *match state {
            PeriodState::Pending => &mut self.pending,
            PeriodState::Downloaded => &mut self.downloaded,
            PeriodState::Verified => &mut self.verified,
        } += 1;
    }

    pub fn total(&self) -> u64 {
        self.pending + self.downloaded + self.verified
    }

    pub fn get(&self, state: crate::source::backfill::PeriodState) -> u64 {
        use crate::source::backfill::PeriodState;
        match state {
            PeriodState::Pending => self.pending,
            PeriodState::Downloaded => self.downloaded,
            PeriodState::Verified => self.verified,
        }
    }

    /// Those of `other` added.
    pub fn merge(&mut self, other: &PeriodCounts) {
        self.pending += other.pending;
        self.downloaded += other.downloaded;
        self.verified += other.verified;
    }

    /// The tracker's periods, as they stand (see `backfill::periods_as_they_stand`).
    pub fn read(reader: &tickvault_wal::LogReader) -> Result<PeriodCounts, tickvault_wal::ReadError> {
        let mut counts = PeriodCounts::default();
        for p in crate::source::backfill::periods_as_they_stand(reader)? {
            counts.add(p.state);
        }
        Ok(counts)
    }
}

impl SymbolGaps {
    pub fn gap_minutes(&self) -> u64 {
        self.gaps.iter().map(|g| g.minutes).sum()
    }
}

/// The gaps of `watched` in `from_ms..to_ms` (whole minutes), from the coverage index
/// and the calendar; a day's market mask is computed once for all symbols keeping the
/// same hours.
pub fn scan(
    reader: &tickvault_wal::LogReader,
    calendar: &crate::calendar::Calendar,
    watched: &[Watched],
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<SymbolGaps>, tickvault_wal::ReadError> {
    use crate::coverage::{Coverage, Mark};
    let suspected = suspected(reader)?;
    let mut masks: std::collections::HashMap<(crate::calendar::Hours, i64), [u8; 180]> = Default::default();
    let mut out = Vec::new();
    let from_ms = from_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
    let to_ms = to_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
    let tracked = crate::source::backfill::periods(reader)?;
    for w in watched {
        // A backfill-only symbol: up to where its backfill has downloaded.
        let to_ms = match w.backfilled && !w.live {
            false => to_ms,
            true => {
                let frontier = crate::source::backfill::frontier(&tracked, w.feed, &w.symbol)
                    .map_or(from_ms, |f| f.div_euclid(MINUTE_MS) * MINUTE_MS);
                to_ms.min(frontier).max(from_ms)
            }
        };
        let (first_day, last_day) = (from_ms.div_euclid(DAY_MS), (to_ms - 1).div_euclid(DAY_MS));
        let bars = Coverage::read(reader, Mark::Bar, w.feed, &w.symbol, first_day, last_day)?;
        let holes = Coverage::read(reader, Mark::Hole, w.feed, &w.symbol, first_day, last_day)?;
        let start = match w.backfilled {
            true => from_ms,
            // Live only: from its first bar (none yet: nothing to check).
            false => match bars.first() {
                Some(first) => first.max(from_ms),
                None => to_ms,
            },
        };
        let hours = calendar.hours(w.feed, &w.symbol);
        let mut report = SymbolGaps {
            feed: w.feed,
            symbol: w.symbol.clone(),
            timeframe: "1m",
            from_ms: start,
            to_ms,
            market_minutes: 0,
            covered: 0,
            source_holes: 0,
            gaps: Vec::new(),
            periods: PeriodCounts::default(),
        };
        let mut open: Option<i64> = None;
        let close = |open: &mut Option<i64>, end: i64, report: &mut SymbolGaps| {
            if let Some(from) = open.take() {
                let why = suspected
                    .iter()
                    .find(|g| {
                        g.feed == w.feed
                            && (g.symbols.is_empty() || g.symbols.contains(&w.symbol))
                            && g.from_ms < end
                            && g.to_ms >= from
                    })
                    .map_or_else(|| "no bar".to_owned(), |g| format!("a disconnect: {}", g.cause));
                report.gaps.push(OpenGap {
                    from_ms: from,
                    to_ms: end,
                    minutes: ((end - from) / MINUTE_MS) as u64,
                    why,
                    state: GapState::Waiting,
                });
            }
        };
        // A byte (8 minutes) at a time: the common bytes (all closed, all covered, all
        // missing) cost a few instructions; only a mixed one is looked at minute by minute.
        let mut day = start.div_euclid(DAY_MS);
        while day * DAY_MS < to_ms {
            let mut mask = *masks
                .entry((hours, day))
                .or_insert_with(|| calendar.open_mask(hours, day));
            // Minutes outside start..to_ms count as closed.
            for m in 0..1440usize {
                let at = day * DAY_MS + m as i64 * MINUTE_MS;
                if at >= start {
                    break;
                }
                mask[m / 8] &= !(1 << (m % 8));
            }
            if (day + 1) * DAY_MS > to_ms {
                for m in ((to_ms - day * DAY_MS) / MINUTE_MS) as usize..1440 {
                    mask[m / 8] &= !(1 << (m % 8));
                }
            }
            let none = [0u8; crate::coverage::DAY_BYTES];
            let bar_bits = bars.day(day).unwrap_or(&none);
            let hole_bits = holes.day(day).unwrap_or(&none);
            for (b, &market) in mask.iter().enumerate() {
                let minute0 = day * DAY_MS + (b * 8) as i64 * MINUTE_MS;
                if market == 0 {
                    close(&mut open, minute0, &mut report);
                    continue;
                }
                let (bar, hole) = (
                    bar_bits.get(b).copied().unwrap_or(0),
                    hole_bits.get(b).copied().unwrap_or(0),
                );
                report.market_minutes += u64::from(market.count_ones());
                report.covered += u64::from((market & bar).count_ones());
                report.source_holes += u64::from((market & hole & !bar).count_ones());
                let missing = market & !bar & !hole;
                if missing == 0 {
                    close(&mut open, minute0, &mut report);
                } else if missing == 0xff {
                    open.get_or_insert(minute0);
                } else {
                    for bit in 0..8 {
                        let at = minute0 + bit * MINUTE_MS;
                        if missing & (1 << bit) != 0 {
                            open.get_or_insert(at);
                        } else {
                            close(&mut open, at, &mut report);
                        }
                    }
                }
            }
            day += 1;
        }
        close(&mut open, to_ms, &mut report);
        out.push(report);
    }
    Ok(out)
}
