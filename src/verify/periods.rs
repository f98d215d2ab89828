//! Verified periods: the daemon's check that every enabled sink holds every key of a
//! period the backfill downloaded. Every `gaps.interval` it takes the periods marked
//! downloaded and not yet verified, and a share of the verified ones, those found whole
//! longest ago first, so that each is checked again about every `gaps.recheck` (spread
//! over the rounds: a ten-year backfill's thousands of periods are not all asked of the
//! sinks at once). For each it asks every enabled sink for the minute bars it holds of
//! the period's symbol in the period's downloaded range, and compares them with the minutes the log's
//! coverage index marks there (the bars the log holds, from either lane): each one
//! must be in each sink, 100%, never a ratio. A period all sinks hold whole gets a
//! [`Verification`]; a verified one found short in a sink loses it, with a warning
//! naming the sink and how many keys it lacks.
//!
//! A sink is asked once per run of neighbouring periods of a symbol in a round (one
//! ranged query; JetStream: one read of the symbol's minute-bar subjects per round).
//! A period whose rows a sink has not been sent yet is simply not verified yet. Minutes
//! a sink's own retention has removed (`sinks.postgres.retention`) are not asked of it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tickvault_wal::{Space, Wal};
use tokio::sync::watch;

use crate::config::Config;
use crate::coverage::{Coverage, Mark};
use crate::event::{Feed, DAY_MS, MINUTE_MS};
use crate::sink::clickhouse::ClickHouseSink;
use crate::sink::nats::NatsSink;
use crate::sink::postgres::PostgresSink;
use crate::sink::SinkError;
use crate::source::backfill::{self, Period, PeriodState, Verification};

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

    /// Whether it answers for a range at the cost of that range (JetStream reads the
    /// symbol's subjects whole, whatever the range).
    fn ranged(&self) -> bool {
        !matches!(self, Asked::Nats(_))
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

    /// Rounds every `every` until shutdown, each rechecking its share of the verified
    /// periods so that each is checked again about every `recheck`.
    pub async fn run(mut self, every: Duration, recheck: Duration, mut shutdown: watch::Receiver<bool>) {
        let share = recheck_share(every, recheck);
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
            match self.round(share).await {
                Ok(round) => {
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

    /// One round: the downloaded periods not verified yet, and `recheck` (a share, 1.0:
    /// all) of the verified ones, those found whole longest ago first. A recheck that
    /// finds a period whole again records when, so the next rounds take others.
    pub async fn round(&mut self, recheck: f64) -> anyhow::Result<Round> {
        let reader = self.wal.reader();
        let checked = backfill::verifications(reader)?;
        let mut tracked = backfill::periods(reader)?;
        tracked.sort_by(|a, b| (a.feed, &a.symbol, a.start_ms).cmp(&(b.feed, &b.symbol, b.start_ms)));
        let due = due(&tracked, &checked, recheck);
        let mut round = Round::default();
        let now_ms = crate::event::now_ms();
        let mut start = 0;
        while start < due.len() {
            // One symbol's periods at a time: each sink is asked once per run of
            // neighbouring periods (JetStream, which reads the symbol's subjects whole,
            // once for all of them).
            let first = &tracked[due[start].0];
            let (feed, symbol) = (first.feed, first.symbol.clone());
            let end = start
                + due[start..]
                    .iter()
                    .take_while(|&&(place, _)| tracked[place].feed == feed && tracked[place].symbol == symbol)
                    .count();
            let group = &due[start..end];
            start = end;
            let runs = runs(&tracked, group);
            let from = runs.iter().map(|r| r.0).min().unwrap_or(0);
            let to = runs.iter().map(|r| r.1).max().unwrap_or(0);
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
                let asked = if sink.ranged() { runs.clone() } else { vec![(from, to)] };
                let mut minutes = HashSet::new();
                for range in asked {
                    minutes.extend(
                        sink.bar_minutes(feed, &symbol, range)
                            .await
                            .map_err(|e| anyhow::anyhow!("{}: {e}", sink.name()))?,
                    );
                }
                held.push(minutes);
            }
            let periods = group.iter().map(|&(place, verified)| (&tracked[place], verified));
            let mut writes = Vec::new();
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
                if short.is_empty() {
                    let v = Verification {
                        from_ms: period.from_ms(),
                        resume_from_ms: period.resume_from_ms,
                        at_ms: now_ms,
                    };
                    writes.push((key, Some(serde_json::to_vec(&v)?)));
                    if !verified {
                        round.verified += 1;
                        self.stats.verified.fetch_add(1, Ordering::Relaxed);
                    }
                } else if verified {
                    writes.push((key, None));
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
            }
            // Written side by side: the log's writer commits them together.
            let wal = &self.wal;
            futures_util::future::try_join_all(
                writes
                    .into_iter()
                    .map(|(key, value)| wal.put_state(Space::State, key, value)),
            )
            .await?;
        }
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        Ok(round)
    }
}

/// The periods a round checks, by their place in `tracked` (sorted by feed, symbol and
/// start), each with whether it is verified: every downloaded one not verified, and
/// `recheck` (a share) of the verified ones, those found whole longest ago first.
fn due(tracked: &[Period], checked: &HashMap<Vec<u8>, Verification>, recheck: f64) -> Vec<(usize, bool)> {
    let mut due = Vec::new();
    // The verified ones, by when last found whole.
    let mut verified: Vec<(i64, usize)> = Vec::new();
    for (place, p) in tracked.iter().enumerate() {
        if p.state != PeriodState::Downloaded || p.resume_from_ms <= p.from_ms() {
            continue;
        }
        match checked.get(&backfill::verification_key(p)) {
            Some(v) if backfill::verifies(Some(v), p) => verified.push((v.at_ms, place)),
            _ => due.push((place, false)),
        }
    }
    let take = (verified.len() as f64 * recheck.clamp(0.0, 1.0)).ceil() as usize;
    verified.sort_unstable();
    due.extend(verified.into_iter().take(take).map(|(_, place)| (place, true)));
    due.sort_unstable();
    due
}

/// The ranges of one symbol's due periods (`group`, from [`due`]), neighbours in
/// `tracked` joined into one.
fn runs(tracked: &[Period], group: &[(usize, bool)]) -> Vec<(i64, i64)> {
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for (n, &(place, _)) in group.iter().enumerate() {
        let p = &tracked[place];
        match runs.last_mut() {
            Some(run) if n > 0 && group[n - 1].0 + 1 == place => {
                run.0 = run.0.min(p.from_ms());
                run.1 = run.1.max(p.resume_from_ms);
            }
            _ => runs.push((p.from_ms(), p.resume_from_ms)),
        }
    }
    runs
}

/// The share of the verified periods a round checks again: rounds every `every`, each
/// period again every `recheck`.
fn recheck_share(every: Duration, recheck: Duration) -> f64 {
    (every.as_secs_f64() / recheck.as_secs_f64().max(f64::MIN_POSITIVE)).min(1.0)
}

/// The minutes of a period's downloaded range.
fn minutes(period: &Period) -> impl Iterator<Item = i64> {
    let from = period.from_ms().div_euclid(MINUTE_MS) * MINUTE_MS;
    (from..period.resume_from_ms).step_by(MINUTE_MS as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: i64 = DAY_MS;

    fn period(symbol: &str, day: i64, state: PeriodState) -> Period {
        Period {
            feed: Feed::Crypto,
            symbol: symbol.into(),
            start_ms: day * CHUNK,
            end_ms: (day + 1) * CHUNK,
            state,
            from_ms: None,
            resume_from_ms: (day + 1) * CHUNK,
            bars: 1,
            repair: false,
        }
    }

    fn found_whole(checked: &mut HashMap<Vec<u8>, Verification>, p: &Period, at_ms: i64) {
        let v = Verification {
            from_ms: p.from_ms(),
            resume_from_ms: p.resume_from_ms,
            at_ms,
        };
        checked.insert(backfill::verification_key(p), v);
    }

    #[test]
    fn a_round_takes_every_unverified_period_and_the_longest_unchecked_share_of_the_verified() {
        // A: days 0-9 verified (day 7 longest ago, then the rest at 100), day 10 pending,
        // day 11 downloaded; B: days 0-1 verified at 50.
        let mut tracked: Vec<Period> = (0..10).map(|d| period("A", d, PeriodState::Downloaded)).collect();
        tracked.push(period("A", 10, PeriodState::Pending));
        tracked.push(period("A", 11, PeriodState::Downloaded));
        tracked.extend((0..2).map(|d| period("B", d, PeriodState::Downloaded)));
        let mut checked = HashMap::new();
        for (n, p) in tracked.iter().enumerate() {
            match (p.symbol.as_str(), n) {
                ("A", 7) => found_whole(&mut checked, p, 10),
                ("A", 0..=9) => found_whole(&mut checked, p, 100),
                ("B", _) => found_whole(&mut checked, p, 50),
                _ => {}
            }
        }
        // 12 verified: a quarter is 3, the oldest: A day 7, then B's two.
        assert_eq!(
            due(&tracked, &checked, 0.25),
            [(7, true), (11, false), (12, true), (13, true)]
        );
        // None of them: the unverified still; all of them: every downloaded one.
        assert_eq!(due(&tracked, &checked, 0.0), [(11, false)]);
        assert_eq!(due(&tracked, &checked, 1.0).len(), 13);
        // A period downloaded further since its check is not verified.
        tracked[3].resume_from_ms += 60_000;
        assert!(due(&tracked, &checked, 0.0).contains(&(3, false)));

        // Neighbours are asked of the sinks as one range; the pending day 10 parts them.
        let a: Vec<(usize, bool)> = [5, 6, 7, 9, 11].map(|place| (place, true)).to_vec();
        assert_eq!(
            runs(&tracked, &a),
            [
                (5 * CHUNK, 8 * CHUNK),
                (9 * CHUNK, 10 * CHUNK),
                (11 * CHUNK, 12 * CHUNK)
            ]
        );
    }

    #[test]
    fn each_verified_period_is_checked_again_about_every_recheck() {
        let share = recheck_share(Duration::from_secs(60), Duration::from_secs(3600));
        assert!((share - 1.0 / 60.0).abs() < 1e-12);
        assert_eq!(recheck_share(Duration::from_secs(60), Duration::from_secs(1)), 1.0);
    }
}
