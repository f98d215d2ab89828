//! Verified periods: the daemon's check that every enabled sink holds every key of a
//! period the backfill downloaded. Every `gaps.interval` it takes the periods marked
//! downloaded and not yet verified, and every `gaps.recheck` the verified ones too; for
//! each it asks every enabled sink for the minute bars it holds of the period's symbol
//! in the period's downloaded range, and compares them with the minutes the log's
//! coverage index marks there (the bars the log holds, from either lane): each one
//! must be in each sink, 100%, never a ratio. A period all sinks hold whole gets a
//! [`Verification`]; a verified one found short in a sink loses it, with a warning
//! naming the sink and how many keys it lacks.
//!
//! A sink's answer is read once per symbol and round (one ranged query, or one read of
//! the symbol's minute-bar subjects in JetStream), whatever the number of periods.
//! A period whose rows a sink has not been sent yet is simply not verified yet. Minutes
//! a sink's own retention has removed (`sinks.postgres.retention`) are not asked of it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tickvault_wal::{Space, Wal};
use tokio::sync::watch;

use crate::config::Config;
use crate::coverage::{Coverage, Mark};
use crate::event::Feed;
use crate::sink::clickhouse::ClickHouseSink;
use crate::sink::nats::NatsSink;
use crate::sink::postgres::PostgresSink;
use crate::sink::SinkError;
use crate::source::backfill::{self, Period, PeriodState, Verification};

const DAY_MS: i64 = 86_400_000;

/// What the verifier did, for the metrics and the demo.
#[derive(Debug, Default)]
pub struct VerifierStats {
    pub rounds: AtomicU64,
    /// Periods that became verified.
    pub verified: AtomicU64,
    /// Verified periods found short in a sink, and so verified no more.
    pub unverified: AtomicU64,
    /// Rounds a sink could not be asked (it is tried again next round).
    pub failed: AtomicU64,
}

/// One enabled sink, asked for the minute bars it holds.
enum Asked {
    ClickHouse(ClickHouseSink),
    Postgres(PostgresSink),
    Nats(NatsSink),
}

impl Asked {
    fn name(&self) -> &'static str {
        match self {
            Asked::ClickHouse(_) => "clickhouse",
            Asked::Postgres(_) => "postgres",
            Asked::Nats(_) => "nats",
        }
    }

    async fn bar_minutes(&mut self, feed: Feed, symbol: &str, range: (i64, i64)) -> Result<Vec<i64>, SinkError> {
        let (feed, (from, to)) = (feed.name(), range);
        match self {
            Asked::ClickHouse(s) => s.bar_minutes(feed, symbol, from, to).await,
            Asked::Postgres(s) => s.bar_minutes(feed, symbol, from, to).await,
            Asked::Nats(s) => s.bar_minutes(feed, symbol, from, to).await,
        }
    }
}

pub struct Verifier {
    wal: Wal,
    sinks: Vec<Asked>,
    /// Per sink, how far back its own retention keeps rows (`None`: for ever).
    retention: Vec<Option<Duration>>,
    stats: Arc<VerifierStats>,
}

/// What one round found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub checked: u64,
    pub verified: u64,
    pub unverified: u64,
}

impl Verifier {
    /// A verifier of the sinks `config` enables; `None` when it enables none (a period
    /// is verified only against sinks).
    pub fn new(config: &Config, wal: Wal, log_id: &str, stats: Arc<VerifierStats>) -> Option<Verifier> {
        let s = &config.sinks;
        let mut sinks = Vec::new();
        let mut retention = Vec::new();
        if s.clickhouse.enabled {
            sinks.push(Asked::ClickHouse(ClickHouseSink::new(&s.clickhouse)));
            retention.push(None);
        }
        if s.postgres.enabled {
            sinks.push(Asked::Postgres(PostgresSink::new(&s.postgres, log_id)));
            retention.push(s.postgres.retention);
        }
        if s.nats.enabled {
            sinks.push(Asked::Nats(NatsSink::new(&s.nats)));
            retention.push(None);
        }
        (!sinks.is_empty()).then_some(Verifier {
            wal,
            sinks,
            retention,
            stats,
        })
    }

    /// Rounds every `every` (the verified periods again every `recheck`) until shutdown.
    pub async fn run(mut self, every: Duration, recheck: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut last_full: Option<Instant> = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            let full = last_full.is_none_or(|at| at.elapsed() >= recheck);
            match self.round(full).await {
                Ok(round) => {
                    if full {
                        last_full = Some(Instant::now());
                    }
                    if round.verified + round.unverified > 0 {
                        tracing::info!(
                            checked = round.checked,
                            verified = round.verified,
                            unverified = round.unverified,
                            "backfill periods checked against every sink"
                        );
                    }
                }
                Err(e) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %format!("{e:#}"), "could not check backfill periods against the sinks; trying again next round");
                }
            }
        }
    }

    /// One round: the downloaded periods not verified yet, and with `full` the verified
    /// ones too.
    pub async fn round(&mut self, full: bool) -> anyhow::Result<Round> {
        let reader = self.wal.reader();
        let checked = backfill::verifications(reader)?;
        let mut due: Vec<(Period, bool)> = backfill::periods(reader)?
            .into_iter()
            .filter(|p| p.state == PeriodState::Downloaded && p.resume_from_ms > p.from_ms())
            .map(|p| {
                let verified = backfill::verifies(checked.get(&backfill::verification_key(&p)), &p);
                (p, verified)
            })
            .filter(|(_, verified)| full || !verified)
            .collect();
        due.sort_by(|a, b| (a.0.feed, &a.0.symbol, a.0.start_ms).cmp(&(b.0.feed, &b.0.symbol, b.0.start_ms)));
        let mut round = Round::default();
        let now_ms = jiff::Timestamp::now().as_millisecond();
        let mut start = 0;
        while start < due.len() {
            // One symbol's periods at a time: each sink is asked once for all of them.
            let (feed, symbol) = (due[start].0.feed, due[start].0.symbol.clone());
            let end = start
                + due[start..]
                    .iter()
                    .take_while(|(p, _)| p.feed == feed && p.symbol == symbol)
                    .count();
            let periods = &due[start..end];
            start = end;
            let from = periods.iter().map(|(p, _)| p.from_ms()).min().unwrap_or(0);
            let to = periods.iter().map(|(p, _)| p.resume_from_ms).max().unwrap_or(0);
            let marked = Coverage::read(
                reader,
                Mark::Bar,
                feed,
                &symbol,
                from.div_euclid(DAY_MS),
                (to - 1).div_euclid(DAY_MS),
            )?;
            let mut held: Vec<HashSet<i64>> = Vec::new();
            for sink in &mut self.sinks {
                let minutes = sink
                    .bar_minutes(feed, &symbol, (from, to))
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {e}", sink.name()))?;
                held.push(minutes.into_iter().collect());
            }
            for (period, verified) in periods {
                round.checked += 1;
                // Per sink, the period's keys it lacks (minutes its retention removed aside).
                let mut short: Vec<(&'static str, u64)> = Vec::new();
                for ((sink, held), retention) in self.sinks.iter().zip(&held).zip(&self.retention) {
                    let kept_from = retention.map_or(i64::MIN, |r| now_ms - r.as_millis() as i64);
                    let lacks = minutes(period)
                        .filter(|m| *m >= kept_from && marked.has(*m) && !held.contains(m))
                        .count() as u64;
                    if lacks > 0 {
                        short.push((sink.name(), lacks));
                    }
                }
                let key = backfill::verification_key(period);
                match (short.is_empty(), *verified) {
                    (true, false) => {
                        let v = Verification {
                            from_ms: period.from_ms(),
                            resume_from_ms: period.resume_from_ms,
                            at_ms: now_ms,
                        };
                        self.wal
                            .put_state(Space::State, key, Some(serde_json::to_vec(&v)?))
                            .await?;
                        round.verified += 1;
                        self.stats.verified.fetch_add(1, Ordering::Relaxed);
                    }
                    (false, true) => {
                        self.wal.put_state(Space::State, key, None).await?;
                        round.unverified += 1;
                        self.stats.unverified.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            feed = %period.feed,
                            symbol = %period.symbol,
                            from = %crate::gaps::minute_text(period.from_ms()),
                            to = %crate::gaps::minute_text(period.resume_from_ms),
                            short = ?short,
                            "a verified backfill period is short in a sink (keys the log holds are missing there); no longer verified"
                        );
                    }
                    _ => {}
                }
            }
        }
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        Ok(round)
    }
}

/// The minutes of a period's downloaded range.
fn minutes(period: &Period) -> impl Iterator<Item = i64> {
    let from = period.from_ms().div_euclid(60_000) * 60_000;
    (from..period.resume_from_ms).step_by(60_000)
}
