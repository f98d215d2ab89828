//! The outage `tickvault demo` stages: its live feeds reach the simulator through a
//! relay, cut from a few seconds before a minute closes to a few seconds after, so that
//! the minute's aggregates are never received. The daemon must then do what it does
//! after a real network cut: reconnect, find the minutes it missed in its coverage
//! index and fetch them from the REST API, with nobody's help.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::event::{now_ms, MINUTE_MS};
use crate::sim::relay::{until_ms, Relay};

/// The cut begins this long before the minute's close and ends as long after it.
const AROUND_MS: i64 = 3_000;
/// The daemon is connected and subscribed this long after its start (loopback).
const SETTLE_MS: i64 = 3_000;
/// Left after the restore for the repair, before the run's end (the summary waits too).
const REPAIR_MS: i64 = 2_000;
/// The shortest run that always holds a cut: any start leaves a minute's close in it.
const DURATION_FOR_A_CUT: u64 = ((SETTLE_MS + 2 * AROUND_MS + REPAIR_MS + MINUTE_MS) / 1000) as u64;

/// The minute close the run from `start_ms` to `end_ms` cuts its feeds across: the
/// first one the daemon is settled before and whose repair the run still shows.
fn close_to_cut(start_ms: i64, end_ms: i64) -> Option<i64> {
    let earliest = start_ms + SETTLE_MS + AROUND_MS;
    let close = (earliest + MINUTE_MS - 1).div_euclid(MINUTE_MS) * MINUTE_MS;
    (close + AROUND_MS + REPAIR_MS <= end_ms).then_some(close)
}

pub struct Outage {
    relay: Arc<Relay>,
    /// The minute close the feeds are cut across (`None`: the run is too short).
    close_ms: Option<i64>,
    times: Arc<Times>,
}

/// When the cut began and ended, and when the daemon's repairs first grew after it
/// began: ms since the epoch (0: not yet).
#[derive(Default)]
struct Times {
    cut_ms: AtomicI64,
    restored_ms: AtomicI64,
    repaired_ms: AtomicI64,
}

/// Where the outage stands, for the screen and the summary.
pub enum Stage {
    /// The run is too short to cut across a minute's close.
    None,
    Planned {
        close_ms: i64,
    },
    Cut {
        close_ms: i64,
        until_ms: i64,
    },
    Restored {
        close_ms: i64,
        cut_ms: i64,
        restored_ms: i64,
        repaired_ms: Option<i64>,
    },
}

/// How long after the restore the task watches for the repair.
const WATCH_MS: i64 = 60_000;

impl Outage {
    /// A relay to the simulator's port, up; the daemon's feeds go through it.
    pub fn relay_to(sim_port: u16) -> std::io::Result<Outage> {
        Ok(Outage {
            relay: Arc::new(Relay::start(sim_port)?),
            close_ms: None,
            times: Arc::default(),
        })
    }

    pub fn port(&self) -> u16 {
        self.relay.port
    }

    /// Plans the cut for a run from `start_ms` to `end_ms` (`None`: until Ctrl-C, cut
    /// across the first close it can) and starts the task that makes it and watches
    /// the daemon's count of gap repairs (`repairs`) for the repair.
    pub fn plan(&mut self, start_ms: i64, end_ms: Option<i64>, repairs: impl Fn() -> u64 + Send + 'static) {
        self.close_ms = close_to_cut(start_ms, end_ms.unwrap_or(i64::MAX));
        let Some(close) = self.close_ms else { return };
        let (relay, times) = (self.relay.clone(), self.times.clone());
        tokio::spawn(async move {
            until_ms(close - AROUND_MS).await;
            let before = repairs();
            times.cut_ms.store(now_ms(), Ordering::SeqCst);
            // `cut` waits for the relay's listener to close: not on the runtime's threads.
            let cutting = relay.clone();
            let _ = tokio::task::spawn_blocking(move || cutting.cut()).await;
            until_ms(close + AROUND_MS).await;
            relay.restore();
            let restored = now_ms();
            times.restored_ms.store(restored, Ordering::SeqCst);
            while now_ms() < restored + WATCH_MS {
                if repairs() > before {
                    times.repaired_ms.store(now_ms(), Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }

    /// Where it stands.
    pub fn stage(&self) -> Stage {
        let Some(close_ms) = self.close_ms else {
            return Stage::None;
        };
        let t = &self.times;
        let [cut_ms, restored_ms, repaired_ms] =
            [&t.cut_ms, &t.restored_ms, &t.repaired_ms].map(|at| at.load(Ordering::SeqCst));
        match (cut_ms, restored_ms) {
            (0, _) => Stage::Planned { close_ms },
            (_, 0) => Stage::Cut {
                close_ms,
                until_ms: close_ms + AROUND_MS,
            },
            _ => Stage::Restored {
                close_ms,
                cut_ms,
                restored_ms,
                repaired_ms: (repaired_ms > 0).then_some(repaired_ms),
            },
        }
    }

    /// Waits, up to `timeout`, for the daemon's repair of what a cut missed; whether
    /// it came.
    pub async fn wait_for_repair(&self, timeout: Duration) -> bool {
        let until = std::time::Instant::now() + timeout;
        loop {
            match self.stage() {
                Stage::None | Stage::Planned { .. } => return false,
                Stage::Restored {
                    repaired_ms: Some(_), ..
                } => return true,
                _ if std::time::Instant::now() >= until => return false,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

impl Stage {
    /// The outage as it stands, in a line.
    pub fn line(&self) -> String {
        let clock = |ms: i64, format: &str| {
            jiff::Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.strftime(format).to_string())
        };
        let minute = |close_ms: i64| clock(close_ms - MINUTE_MS, "%H:%M");
        match *self {
            Stage::None => format!(
                "none: the run is too short to cut the feeds across a minute's close ({DURATION_FOR_A_CUT} s always is)"
            ),
            Stage::Planned { close_ms } => format!(
                "ahead: the feeds are cut at {} UTC, across the close of minute {}",
                clock(close_ms - AROUND_MS, "%H:%M:%S"),
                minute(close_ms)
            ),
            Stage::Cut { close_ms, until_ms } => format!(
                "NOW: the feeds are cut until {} UTC; minute {} closes unseen",
                clock(until_ms, "%H:%M:%S"),
                minute(close_ms)
            ),
            Stage::Restored {
                close_ms,
                cut_ms,
                restored_ms,
                repaired_ms,
            } => format!(
                "feeds cut {}-{} UTC, minute {} missed; {}",
                clock(cut_ms, "%H:%M:%S"),
                clock(restored_ms, "%H:%M:%S"),
                minute(close_ms),
                match repaired_ms {
                    Some(at) => format!(
                        "repaired by the daemon {:.1} s after",
                        (at - restored_ms) as f64 / 1000.0
                    ),
                    None => "the daemon is repairing it".to_owned(),
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cut_is_across_the_first_close_the_run_has_room_for() {
        let m = 1_800_000_000_000 / MINUTE_MS * MINUTE_MS;
        // 10 s into a minute: its close, 50 s on.
        assert_eq!(close_to_cut(m + 10_000, m + 75_000), Some(m + MINUTE_MS));
        // 58 s into a minute: too soon to settle and cut before its close; the next.
        assert_eq!(close_to_cut(m + 58_000, m + 58_000 + 75_000), Some(m + 2 * MINUTE_MS));
        // A short run has room for none.
        assert_eq!(close_to_cut(m + 10_000, m + 40_000), None);
        // The shortest run that always has one, whatever second it starts at.
        for second in 0..60 {
            let start = m + second * 1_000 + 999;
            assert!(
                close_to_cut(start, start + DURATION_FOR_A_CUT as i64 * 1_000).is_some(),
                "{second}"
            );
        }
    }
}
