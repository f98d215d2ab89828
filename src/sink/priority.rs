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
//!
//! A pause rather than smaller backfill batches: a smaller batch costs the servers about
//! as much per row and more per batch, so it lowers throughput without leaving idle time;
//! a pause leaves whole stretches in which a live write runs alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
// tokio's clock, so that tests with paused time drive it.
use tokio::time::Instant;

/// Live rows count as flowing for this long after a live batch was acknowledged.
pub const LIVE_FLOWING: Duration = Duration::from_secs(1);
/// The longest pause after one backfill write (a write acknowledged just before the
/// attempt timeout, 60 s, would otherwise buy a minute of pause).
pub const MAX_PAUSE: Duration = Duration::from_secs(5);

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
}

impl Priority {
    /// `backfill_writes` 0 means no limit on writes in flight; `duty` 1 means no pause.
    pub fn new(backfill_writes: usize, duty: f64) -> Priority {
        Priority {
            permits: Semaphore::new(match backfill_writes {
                0 => Semaphore::MAX_PERMITS,
                n => n,
            }),
            duty: duty.clamp(f64::MIN_POSITIVE, 1.0),
            epoch: Instant::now(),
            live_acked: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// A live runner's batch with rows was acknowledged.
    pub fn live_acknowledged(&self) {
        self.live_acked.store(self.now_ms(), Ordering::Relaxed);
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
        pause_for(took, self.duty)
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
        let p = Priority::new(1, 0.25);
        let took = Duration::from_millis(100);
        assert_eq!(p.pause_after(took), Duration::ZERO, "no live row yet");
        p.live_acknowledged();
        assert_eq!(p.pause_after(took), Duration::from_millis(300));
        // Virtual time: the clock the priority reads is tokio's, paused here.
        tokio::time::advance(LIVE_FLOWING + Duration::from_millis(5)).await;
        assert_eq!(p.pause_after(took), Duration::ZERO, "live stopped flowing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_duty_of_one_never_pauses_and_a_pause_is_capped() {
        let full = Priority::new(1, 1.0);
        full.live_acknowledged();
        assert_eq!(full.pause_after(Duration::from_secs(1)), Duration::ZERO);
        let tight = Priority::new(1, 0.1);
        tight.live_acknowledged();
        assert_eq!(tight.pause_after(Duration::from_secs(60)), MAX_PAUSE);
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
        let p = Priority::new(0, 1.0);
        let held: Vec<_> = futures_util::future::join_all((0..100).map(|_| p.acquire())).await;
        assert_eq!(held.len(), 100);
        assert!(p.available_permits() > 1_000);
    }
}
