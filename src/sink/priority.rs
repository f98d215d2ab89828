//! How backfill writes give way to live ones, across every sink of one daemon.
//!
//! Backfill saturates whatever it is given: a write of 100,000 rows keeps a server's
//! cores and disk busy for as long as it runs, and a live write that arrives meanwhile
//! waits for the CPU and for its fsync behind it. Two limits, on backfill writes only
//! (a live write never waits for either):
//!
//! - **Permits**: at most `sinks.backfill_writes` backfill writes are in flight at once,
//!   across all sinks. An attempt holds a permit while it runs, never while a failing
//!   sink waits to retry.
//! - **Duty**: while live rows flow (a live runner had a batch acknowledged within the
//!   last [`LIVE_FLOWING`]), backfill writes take at most `sinks.backfill_duty` of the
//!   time. After an acknowledged attempt that took `d`, the permit is held, idle, for
//!   `d * (1 - duty) / duty` (at most [`MAX_PAUSE`]), so no backfill write of any sink runs
//!   then and the servers are left to the live writes. With no live rows flowing (a
//!   closed market, a backfill-only run) backfill goes at full speed.
//! - **Budget**: with `sinks.live_latency_budget` set, the duty above (and the capture's,
//!   `backfill.live_duty`) is what the backfill may use at most; how much of it it uses
//!   follows what live rows see. Live runners report each acknowledged batch's oldest
//!   row's time from capture to commit; every [`PERIOD`], if more than 1% of the period's
//!   live batches took longer than the budget, the backfill's share of its duties is
//!   halved (down to [`MIN_SHARE`]), and otherwise it grows back by [`SHARE_STEP`] (up to
//!   all of them). Additive increase, multiplicative decrease: the backfill takes what the
//!   host leaves once live is within its budget, whatever the host's speed that day.
//!
//! A pause rather than smaller backfill batches: a smaller batch costs the servers about
//! as much per row and more per batch, so it lowers throughput without leaving idle time;
//! a pause leaves whole stretches in which a live write runs alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
// tokio's clock, so that tests with paused time drive it.
use tokio::time::Instant;

/// Live rows count as flowing for this long after a live batch was acknowledged.
pub const LIVE_FLOWING: Duration = Duration::from_secs(1);
/// The longest pause after one backfill write (a write acknowledged just before the
/// attempt timeout, 60 s, would otherwise buy a minute of pause).
pub const MAX_PAUSE: Duration = Duration::from_secs(5);
/// How often the backfill's share is set again from the live batches' latencies.
pub const PERIOD: Duration = Duration::from_millis(500);
/// The least share of its duties the budget leaves the backfill: at the default duties
/// (0.5) about 3% of the time, so a backfill still moves while a slow host keeps live
/// over its budget.
pub const MIN_SHARE: f64 = 1.0 / 16.0;
/// What a period with live within its budget gives back.
pub const SHARE_STEP: f64 = 1.0 / 16.0;

/// Shared by every runner of a daemon: live runners say when they forwarded rows,
/// backfill runners take a permit per attempt and pause after it.
#[derive(Debug)]
pub struct Priority {
    permits: Semaphore,
    /// The share of time backfill writes may take while live rows flow, in (0, 1].
    duty: f64,
    epoch: Instant,
    /// When a live batch was last acknowledged: milliseconds since `epoch`, plus one
    /// (zero: never).
    live_acked: AtomicU64,
    /// `sinks.live_latency_budget`; zero: none (the duties apply as they are).
    budget: Duration,
    control: Mutex<Control>,
}

/// The live latency budget and what it has seen ([`Priority::budget`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetSeen {
    /// `sinks.live_latency_budget`; zero: none.
    pub budget: Duration,
    /// Periods that had live batches to judge.
    pub periods: u64,
    /// Periods that found live over the budget (each halved the share, down to
    /// [`MIN_SHARE`]).
    pub cuts: u64,
    /// The backfill's share of its duties now.
    pub share: f64,
}

/// The budget's state: the current period's live batches, and the share they set.
#[derive(Debug)]
struct Control {
    period_start: Instant,
    batches: u32,
    over: u32,
    /// The share of its duties the backfill may use, in [`MIN_SHARE`, 1].
    share: f64,
    /// How many periods found live over its budget.
    cuts: u64,
    /// How many periods had live batches to judge.
    periods: u64,
}

impl Control {
    /// Closes the period if it is over: more than 1% of its live batches over the budget
    /// (its p99 over it) halves the share, otherwise it grows by a step; a period with
    /// no live batch leaves it.
    fn roll(&mut self) {
        if self.period_start.elapsed() < PERIOD {
            return;
        }
        if self.batches > 0 {
            self.periods += 1;
            if self.over * 100 > self.batches {
                self.share = (self.share / 2.0).max(MIN_SHARE);
                self.cuts += 1;
            } else {
                self.share = (self.share + SHARE_STEP).min(1.0);
            }
        }
        (self.period_start, self.batches, self.over) = (Instant::now(), 0, 0);
    }
}

impl Priority {
    /// `backfill_writes` 0 means no limit on writes in flight; `duty` 1 means no pause;
    /// `budget` zero means none.
    pub fn new(backfill_writes: usize, duty: f64, budget: Duration) -> Priority {
        Priority {
            permits: Semaphore::new(match backfill_writes {
                0 => Semaphore::MAX_PERMITS,
                n => n,
            }),
            duty: duty.clamp(f64::MIN_POSITIVE, 1.0),
            epoch: Instant::now(),
            live_acked: AtomicU64::new(0),
            budget,
            control: Mutex::new(Control {
                period_start: Instant::now(),
                batches: 0,
                over: 0,
                share: 1.0,
                cuts: 0,
                periods: 0,
            }),
        }
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// A live runner's batch with rows was acknowledged; `oldest` is its oldest row's
    /// time from capture to the acknowledgement (`None`: rows sent again, whose time since
    /// capture is not the pipeline's).
    pub fn live_acknowledged(&self, oldest: Option<Duration>) {
        self.live_acked.store(self.now_ms(), Ordering::Relaxed);
        let Some(oldest) = oldest.filter(|_| !self.budget.is_zero()) else {
            return;
        };
        let mut c = self.control();
        c.roll();
        c.batches += 1;
        c.over += u32::from(oldest > self.budget);
    }

    /// The share of its duties the backfill may use now: 1 with no budget, or while live
    /// rows are within it.
    pub fn backfill_share(&self) -> f64 {
        let mut c = self.control();
        c.roll();
        c.share
    }

    /// What the budget has seen so far, taken at one moment.
    pub fn budget(&self) -> BudgetSeen {
        let mut c = self.control();
        c.roll();
        BudgetSeen {
            budget: self.budget,
            periods: c.periods,
            cuts: c.cuts,
            share: c.share,
        }
    }

    /// The duty `configured` scaled by the budget's share (for the backfill's capture,
    /// `backfill.live_duty`, as for its writes).
    pub fn scaled(&self, configured: f64) -> f64 {
        configured * self.backfill_share()
    }

    /// Whether a live batch was acknowledged within the last [`LIVE_FLOWING`].
    pub fn live_flowing(&self) -> bool {
        match self.live_acked.load(Ordering::Relaxed) {
            0 => false,
            at => self.now_ms().saturating_sub(at) <= LIVE_FLOWING.as_millis() as u64,
        }
    }

    /// A permit for one backfill attempt.
    pub async fn acquire(&self) -> SemaphorePermit<'_> {
        self.permits.acquire().await.expect("the semaphore is never closed")
    }

    #[cfg(test)]
    fn available_permits(&self) -> usize {
        self.permits.available_permits()
    }

    /// How long to hold the permit idle after a backfill attempt that took `took`.
    pub fn pause_after(&self, took: Duration) -> Duration {
        if !self.live_flowing() {
            return Duration::ZERO;
        }
        pause_for(took, self.scaled(self.duty))
    }
}

/// The idle time after work that took `took` which keeps that work to `duty` of the
/// time (at most [`MAX_PAUSE`]); zero for a duty of 1. Also paces the backfill's
/// capture (`backfill.live_duty`).
pub fn pause_for(took: Duration, duty: f64) -> Duration {
    if duty >= 1.0 {
        return Duration::ZERO;
    }
    took.mul_f64((1.0 - duty) / duty.max(f64::MIN_POSITIVE)).min(MAX_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn backfill_pauses_only_while_live_rows_flow() {
        let p = Priority::new(1, 0.25, Duration::ZERO);
        let took = Duration::from_millis(100);
        assert_eq!(p.pause_after(took), Duration::ZERO, "no live row yet");
        p.live_acknowledged(None);
        assert_eq!(p.pause_after(took), Duration::from_millis(300));
        // Virtual time: the clock the priority reads is tokio's, paused here.
        tokio::time::advance(LIVE_FLOWING + Duration::from_millis(5)).await;
        assert_eq!(p.pause_after(took), Duration::ZERO, "live stopped flowing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_duty_of_one_never_pauses_and_a_pause_is_capped() {
        let full = Priority::new(1, 1.0, Duration::ZERO);
        full.live_acknowledged(None);
        assert_eq!(full.pause_after(Duration::from_secs(1)), Duration::ZERO);
        let tight = Priority::new(1, 0.1, Duration::ZERO);
        tight.live_acknowledged(None);
        assert_eq!(tight.pause_after(Duration::from_secs(60)), MAX_PAUSE);
    }

    /// `n` live batches acknowledged within one period, `over` of them past the budget
    /// (40 ms), then the next period begins.
    async fn period(p: &Priority, n: u32, over: u32) {
        for i in 0..n {
            let took = if i < over { 41 } else { 12 };
            p.live_acknowledged(Some(Duration::from_millis(took)));
        }
        tokio::time::advance(PERIOD).await;
    }

    #[tokio::test(start_paused = true)]
    async fn live_over_its_budget_halves_the_backfills_share_and_within_it_the_share_grows_back() {
        let p = Priority::new(1, 0.5, Duration::from_millis(40));
        let took = Duration::from_millis(100);
        tokio::time::advance(PERIOD).await;
        // One batch in a hundred over the budget is the p99 at it, not over it.
        period(&p, 100, 1).await;
        assert_eq!(p.backfill_share(), 1.0);
        assert_eq!(p.pause_after(took), took, "the configured duty, 0.5");
        // A period's first batch closes the one before: 2 in 100 over.
        period(&p, 100, 2).await;
        assert_eq!(p.backfill_share(), 0.5);
        assert_eq!(p.scaled(0.5), 0.25);
        assert_eq!(p.pause_after(took), Duration::from_millis(300));
        for _ in 0..6 {
            period(&p, 50, 50).await;
        }
        assert_eq!(p.backfill_share(), MIN_SHARE, "halved down to the floor, never below");
        let seen = p.budget();
        assert_eq!(seen.cuts, 7);
        assert_eq!(
            (seen.budget, seen.periods),
            (Duration::from_millis(40), 8),
            "every period with batches"
        );
        // Duty 0.5 / 16: the pause is 31 times the write.
        assert_eq!(p.pause_after(took), Duration::from_millis(3_100));
        for _ in 0..20 {
            period(&p, 50, 0).await;
        }
        assert_eq!(p.backfill_share(), 1.0, "grown back by steps, never above");
        assert_eq!(p.budget().cuts, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_budget_or_a_latency_the_share_stays_whole() {
        let none = Priority::new(1, 0.5, Duration::ZERO);
        let rows_sent_again = Priority::new(1, 0.5, Duration::from_millis(40));
        for _ in 0..10 {
            for _ in 0..10 {
                none.live_acknowledged(Some(Duration::from_secs(1)));
                rows_sent_again.live_acknowledged(None);
            }
            tokio::time::advance(PERIOD).await;
        }
        assert_eq!((none.backfill_share(), none.budget().cuts), (1.0, 0));
        assert_eq!(rows_sent_again.backfill_share(), 1.0);
    }

    #[test]
    fn a_pause_keeps_the_work_to_its_duty() {
        let took = Duration::from_millis(100);
        assert_eq!(pause_for(took, 1.0), Duration::ZERO);
        assert_eq!(pause_for(took, 0.5), took);
        assert_eq!(pause_for(took, 0.25), Duration::from_millis(300));
        assert_eq!(pause_for(Duration::from_secs(10), 0.5), MAX_PAUSE);
    }

    #[tokio::test]
    async fn zero_backfill_writes_means_no_limit_on_permits() {
        let p = Priority::new(0, 1.0, Duration::ZERO);
        let held: Vec<_> = futures_util::future::join_all((0..100).map(|_| p.acquire())).await;
        assert_eq!(held.len(), 100);
        assert!(p.available_permits() > 1_000);
    }
}
