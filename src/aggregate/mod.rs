//! The aggregator: bars of the configured timeframes, with their indicators, made from
//! the captured one-minute bars (live aggregates and backfill) and, for minutes without
//! one, from live trades and quotes; written to the
//! `derived` lane, which the sinks, `export` and `wal dump` read like the others.
//!
//! It works in rounds: each takes what the live and backfill lanes received since the
//! last (up to their heads then), runs it through the [`engine`], and appends the bars
//! it made together with the round's entry in the journal (the state space, key
//! `derived/round/<n>`: how far into each lane the round read) in one durable write.
//! The journal is the order in which the inputs were taken: at a start, the rounds are
//! fed again to rebuild the engine, and `tickvault aggregate --check` rebuilds the lane
//! from them and compares it record for record. So a crash at any moment loses no
//! round and changes no record: the lane is the same as an uninterrupted run's.
//!
//! The rebuild needs the rounds' inputs: while the live and backfill lanes keep
//! everything since the first round (the aggregator's own cursor, [`CURSOR`], holds
//! truncation until it has taken a record, no longer) it is exact; after retention has
//! removed older inputs, a start rebuilds the engine from what is left, and the
//! indicators' warm-up restarts there.

pub mod engine;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tickvault_wal::{Batch, Lane, LogReader, ReadError, Space, Wal};
use tokio::sync::watch;

pub use engine::{Engine, Input, Minute, Ohlcv, Out, Rank, Spec, Tick};

use crate::config::AggregateConfig;
use crate::event::{Body, Capture, Event, Timeframe, EVENT_KIND};

/// The aggregator's cursor on the live and backfill lanes.
pub const CURSOR: &str = "aggregator";
const ROUND_PREFIX: &[u8] = b"derived/round/";
/// The most records one round takes from a lane (a large backlog is taken in several).
const ROUND_RECORDS: usize = 100_000;

impl Spec {
    pub fn from_config(config: &AggregateConfig) -> Spec {
        Spec {
            timeframes: config.timeframes(),
            forex_day: config.forex_day,
        }
    }
}

/// One round of the journal: it took the live lane up to `live_to` and the backfill
/// lane up to `backfill_to`, after the round before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub number: u64,
    pub live_to: u64,
    pub backfill_to: u64,
}

impl Round {
    fn key(&self) -> Vec<u8> {
        let mut key = ROUND_PREFIX.to_vec();
        key.extend_from_slice(&self.number.to_be_bytes());
        key
    }

    fn value(&self) -> Vec<u8> {
        let mut value = self.live_to.to_le_bytes().to_vec();
        value.extend_from_slice(&self.backfill_to.to_le_bytes());
        value
    }

    fn decode(key: &[u8], value: &[u8]) -> Option<Round> {
        let number = u64::from_be_bytes(key.strip_prefix(ROUND_PREFIX)?.try_into().ok()?);
        let live_to = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
        let backfill_to = u64::from_le_bytes(value.get(8..16)?.try_into().ok()?);
        Some(Round {
            number,
            live_to,
            backfill_to,
        })
    }
}

/// The journal, oldest round first.
pub fn journal(reader: &LogReader) -> Result<Vec<Round>, ReadError> {
    Ok(reader
        .scan_state(Space::State, ROUND_PREFIX)?
        .iter()
        .filter_map(|(k, v)| Round::decode(k, v))
        .collect())
}

/// How far ahead of its capture an event's market time may be and still count: a
/// far-future timestamp (a source's bad clock) would otherwise close every window.
const AHEAD_MS: i64 = 5 * 60_000;

/// What a round takes, in the order the engine gets it (the backfill lane's, then the
/// live lane's, each in log order): one-minute bars, trades and quotes' mid prices; and
/// the latest capture time among them (the derived records' capture time: when the
/// data they were made of arrived).
pub fn inputs(reader: &LogReader, before: &Round, round: &Round) -> Result<(Vec<Input>, i64), ReadError> {
    let mut inputs = Vec::new();
    let mut captured = 0;
    for (lane, after, to, rank) in [
        (Lane::Backfill, before.backfill_to, round.backfill_to, Rank::Backfill),
        (Lane::Live, before.live_to, round.live_to, Rank::Live),
    ] {
        if to <= after {
            continue;
        }
        reader.scan(lane, after + 1, to, |_, record| {
            // Corrupt records are the log's to report; drill records are not events.
            let Ok(record) = record else { return true };
            if record.kind != EVENT_KIND {
                return true;
            }
            let Ok(event) = Event::from_payload(record.payload) else {
                return true;
            };
            let (feed, at) = (event.capture.feed, event.capture.captured_at_ns);
            if lane == Lane::Live && event.ts_ms() > at / 1_000_000 + AHEAD_MS {
                return true;
            }
            let tick = |symbol, ts_ms, price, size, rank| {
                Input::Tick(Tick {
                    feed,
                    symbol,
                    ts_ms,
                    price,
                    size,
                    rank,
                })
            };
            let input = match event.body {
                Body::Bar(bar) if bar.timeframe == Timeframe::MINUTE => Input::Minute(Minute {
                    feed,
                    symbol: bar.symbol,
                    start_ms: bar.start_ms,
                    rank,
                    bar: Ohlcv {
                        open: bar.open,
                        high: bar.high,
                        low: bar.low,
                        close: bar.close,
                        volume: bar.volume,
                    },
                }),
                Body::Trade(t) => tick(t.symbol, t.ts_ms, t.price, t.size, Rank::Trades),
                Body::Quote(q) if q.bid > 0.0 && q.ask >= q.bid => {
                    tick(q.symbol, q.ts_ms, (q.bid + q.ask) / 2.0, 0.0, Rank::Quotes)
                }
                _ => return true,
            };
            captured = captured.max(at);
            inputs.push(input);
            true
        })?;
    }
    Ok((inputs, captured))
}

/// A round's bars as derived-lane events.
pub fn events(out: Vec<Out>, captured_at_ns: i64) -> Vec<Event> {
    out.into_iter()
        .map(|o| Event {
            capture: Capture {
                feed: o.feed,
                lane: Lane::Derived,
                captured_at_ns,
            },
            body: Body::Derived(Box::new(o.derived)),
        })
        .collect()
}

/// The engine rebuilt by feeding it the journal's rounds again, and the last round;
/// `each` sees every round's events.
pub fn replay(
    reader: &LogReader,
    spec: Spec,
    mut each: impl FnMut(Vec<Event>) -> anyhow::Result<()>,
) -> anyhow::Result<(Engine, Round)> {
    let mut engine = Engine::new(spec);
    let mut last = Round::default();
    for round in journal(reader)? {
        let (minutes, captured) = inputs(reader, &last, &round)?;
        each(events(engine.round(minutes), captured))?;
        last = round;
    }
    Ok((engine, last))
}

/// What the aggregator has done, for metrics and the demo.
#[derive(Debug, Default)]
pub struct AggregateStats {
    pub rounds: AtomicU64,
    pub minutes_in: AtomicU64,
    /// Bars emitted for the first time, and again (a higher version).
    pub bars_new: AtomicU64,
    pub bars_revised: AtomicU64,
}

/// Runs the aggregator until `shutdown`.
pub async fn run(
    wal: Wal,
    config: AggregateConfig,
    stats: Arc<AggregateStats>,
    room: watch::Receiver<crate::disk::Room>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let reader = wal.reader().clone();
    let spec = Spec::from_config(&config);
    let started = std::time::Instant::now();
    let (mut engine, mut last) = tokio::task::spawn_blocking(move || replay(&reader, spec, |_| Ok(()))).await??;
    tracing::info!(
        rounds = last.number,
        minutes = engine.minutes(),
        took_ms = started.elapsed().as_millis() as u64,
        "aggregator resumed from its journal"
    );
    // Hold truncation from the first start: a cursor at the last round's positions.
    hold(&wal, &last).await?;
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return Ok(()),
        }
        if *shutdown.borrow() {
            return Ok(());
        }
        // Short of disk the derived lane waits with the backfill (it is made again from
        // the other lanes; a later round takes what it left).
        if room.borrow().backfill_paused {
            continue;
        }
        let round = Round {
            number: last.number + 1,
            live_to: wal.head(Lane::Live).min(last.live_to + ROUND_RECORDS as u64),
            backfill_to: wal.head(Lane::Backfill).min(last.backfill_to + ROUND_RECORDS as u64),
        };
        if round.live_to == last.live_to && round.backfill_to == last.backfill_to {
            continue;
        }
        let reader = wal.reader().clone();
        let before = last;
        // Reading, the engine and the encoding off the runtime's threads.
        let (back, batch, n, made, revised) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let (minutes, captured) = inputs(&reader, &before, &round)?;
            let n = minutes.len() as u64;
            let events = events(engine.round(minutes), captured);
            let revised = events.iter().filter(|e| is_revision(e)).count() as u64;
            let mut batch = Batch::with_capacity(events.len(), events.len() * 160);
            for event in &events {
                batch.push(EVENT_KIND, &event.to_payload()?)?;
            }
            Ok((engine, batch, n, events.len() as u64, revised))
        })
        .await??;
        engine = back;
        wal.append_with_state(Lane::Derived, batch, Space::State, round.key(), round.value())
            .await?;
        hold(&wal, &round).await?;
        stats.rounds.fetch_add(1, Ordering::Relaxed);
        stats.minutes_in.fetch_add(n, Ordering::Relaxed);
        stats.bars_revised.fetch_add(revised, Ordering::Relaxed);
        stats.bars_new.fetch_add(made - revised, Ordering::Relaxed);
        last = round;
    }
}

/// Whether a derived event is a bar emitted again (a version after the first).
pub fn is_revision(event: &Event) -> bool {
    matches!(&event.body, Body::Derived(d) if d.version > 1)
}

/// Moves the aggregator's cursors to what `round` took, both in one group commit.
async fn hold(wal: &Wal, round: &Round) -> Result<(), tickvault_wal::WriteError> {
    let (live, backfill) = tokio::join!(
        wal.move_cursor(CURSOR, Lane::Live, round.live_to),
        wal.move_cursor(CURSOR, Lane::Backfill, round.backfill_to)
    );
    live.and(backfill)
}
