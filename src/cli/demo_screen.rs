//! The demo's screen on a terminal: a few rows redrawn in place each second instead of
//! a line a second. indicatif's `MultiProgress` (already a dependency) draws them; each
//! row is cut to one column less than the terminal's width (read at every draw), so a
//! narrow terminal shows less of a row and never a wrapped line (a row of the full
//! width makes terminals wrap). A table library (ratatui) would take the whole screen
//! and a dependency for what six to ten rows do as well.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tickvault_wal::Lane;

use crate::daemon::Running;
use crate::sim::Market;
use crate::sink::breaker::State;

/// Whether the demo draws the screen: on a terminal that can redraw, unless `--plain`.
pub fn wanted(plain: bool) -> bool {
    !plain && std::io::stdout().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

pub struct Screen {
    multi: MultiProgress,
    header: ProgressBar,
    feeds: Vec<ProgressBar>,
    backfill: Option<ProgressBar>,
    sinks: Vec<ProgressBar>,
    live_first: ProgressBar,
    outage: ProgressBar,
    last_live: Vec<u64>,
    last_bars: u64,
    last_rows: Vec<u64>,
}

fn row(multi: &MultiProgress, template: &str) -> ProgressBar {
    let bar = multi.add(ProgressBar::new(0));
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar
}

const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const RESET: &str = "\x1b[0m";

impl Screen {
    pub fn new(running: &Running) -> Screen {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout_with_hz(4));
        let header = row(&multi, "{msg}");
        let feeds = running.live.iter().map(|_| row(&multi, "{msg}")).collect();
        let backfill = running.backfill.as_ref().map(|_| row(&multi, "{msg}"));
        let sinks = running.sinks.iter().map(|_| row(&multi, "{msg}")).collect();
        let live_first = row(&multi, "{msg}");
        let outage = row(&multi, "{msg}");
        Screen {
            multi,
            header,
            last_live: vec![0; running.live.len()],
            feeds,
            backfill,
            last_rows: vec![0; running.sinks.len()],
            sinks,
            live_first,
            outage,
            last_bars: 0,
        }
    }

    /// Redraws every row from the daemon's counters (called once a second).
    pub fn draw(
        &mut self,
        running: &Running,
        market: &Market,
        elapsed: Duration,
        duration: Option<u64>,
        log_dir: &std::path::Path,
        outage: &super::demo_outage::Stage,
    ) {
        let width = usize::from(console::Term::stdout().size().1).saturating_sub(1).max(20);
        let fit = |line: String| console::truncate_str(&line, width, "…").into_owned();
        let now_ms = crate::event::now_ms();
        let of = duration.map_or(String::new(), |d| format!(" / {d}s"));
        let log_mb = crate::metrics::dir_bytes(log_dir) as f64 / 1e6;
        self.header.set_message(fit(format!(
            "  {}s{of} | log {} {log_mb:.1} MB | Ctrl-C stops",
            elapsed.as_secs(),
            log_dir.display()
        )));
        for (i, (feed, s)) in running.live.iter().enumerate() {
            let captured = s.captured();
            let rate = captured - self.last_live[i];
            self.last_live[i] = captured;
            let state = if s.connected.load(Ordering::Relaxed) {
                if market.is_open(*feed, now_ms) {
                    "up".to_owned()
                } else {
                    "up, market closed".to_owned()
                }
            } else {
                format!("{YELLOW}reconnecting{RESET}")
            };
            self.feeds[i].set_message(fit(format!(
                "  {:<9} {state} | {} events/s | durable p50 {:.1} / p99 {:.1} ms | {} reconnects | {} events",
                feed.name(),
                super::demo::thousands(rate),
                s.latency_ms(0.5),
                s.latency_ms(0.99),
                s.disconnects.load(Ordering::Relaxed),
                super::demo::thousands(captured)
            )));
        }
        if let (Some(bar), Some(b)) = (&self.backfill, &running.backfill) {
            let bars = b.bars();
            let rate = bars - self.last_bars;
            self.last_bars = bars;
            let total = b.periods_total.load(Ordering::Relaxed);
            let done = b.periods_done.load(Ordering::Relaxed) + b.periods_skipped.load(Ordering::Relaxed);
            const CELLS: u64 = 24;
            let filled = (done * CELLS).checked_div(total).unwrap_or(0).min(CELLS) as usize;
            let cells = format!("{}{}", "█".repeat(filled), "░".repeat(CELLS as usize - filled));
            // At the pace so far: the periods left, as long as the ones done took each.
            let eta = if done > 0 && done < total {
                format!(" | ETA {}s", elapsed.as_secs() * (total - done) / done)
            } else {
                String::new()
            };
            let waiting = if b.waiting_for_disk.load(Ordering::Relaxed) {
                format!(" | {YELLOW}paused: disk under reserve{RESET}")
            } else if b.waiting_for_backlog.load(Ordering::Relaxed) {
                " | waiting for the sinks".to_owned()
            } else {
                String::new()
            };
            bar.set_message(fit(format!(
                "  backfill  {cells} {done}/{total} periods{eta} | {} bars, {}/s | paused {:.1} s for live{waiting}",
                super::demo::thousands(bars),
                super::demo::thousands(rate),
                b.paused_ms.load(Ordering::Relaxed) as f64 / 1000.0
            )));
        }
        for (i, s) in running.sinks.iter().enumerate() {
            let rows = s.rows.load(Ordering::Relaxed);
            let rate = rows - self.last_rows[i];
            self.last_rows[i] = rows;
            let lag = running
                .wal
                .head(s.lane)
                .saturating_sub(s.acked_seq.load(Ordering::Relaxed));
            let state = match s.state() {
                State::Closed => "ok".to_owned(),
                other => format!("{RED}breaker {}{RESET}", other.name()),
            };
            let p99 = if s.latency_measured() {
                format!("{:.1} ms", s.latency_ms(0.99))
            } else {
                "-".to_owned()
            };
            self.sinks[i].set_message(fit(format!(
                "  {:<10} {:<8} {state} | {} rows/s | lag {} | capture-to-commit p99 {p99} | {} rows",
                s.sink,
                s.lane.name(),
                super::demo::thousands(rate),
                super::demo::thousands(lag),
                super::demo::thousands(rows)
            )));
        }
        let seen = running.priority.budget();
        let heads = format!(
            "heads: live {}, backfill {}, derived {}",
            super::demo::thousands(running.wal.head(Lane::Live)),
            super::demo::thousands(running.wal.head(Lane::Backfill)),
            super::demo::thousands(running.wal.head(Lane::Derived))
        );
        self.live_first.set_message(fit(if running.sinks.is_empty() {
            format!("  live first: backfill appends yield to live | {heads}")
        } else {
            format!(
                "  live first: budget {} ms, over it in {} of {} half-seconds | backfill at {:.0}% of its duties | {heads}",
                seen.budget.as_millis(),
                seen.cuts,
                seen.periods,
                seen.share * 100.0
            )
        }));
        let line = outage.line();
        self.outage.set_message(fit(match outage {
            super::demo_outage::Stage::Cut { .. } => format!("  {YELLOW}outage    {line}{RESET}"),
            _ => format!("  outage    {line}"),
        }));
    }

    /// Leaves the last state on the screen as plain lines, for the summary to follow
    /// below it: the rows are cleared and printed once more, so that a Ctrl-C (whose
    /// echo moves the cursor under the redrawn region) cannot leave a row twice.
    pub fn finish(self, interrupted: bool) {
        let rows: Vec<&ProgressBar> = [&self.header]
            .into_iter()
            .chain(&self.feeds)
            .chain(self.backfill.as_ref())
            .chain(&self.sinks)
            .chain([&self.live_first, &self.outage])
            .collect();
        let last: Vec<String> = rows.iter().map(|bar| bar.message()).collect();
        let _ = self.multi.clear();
        for bar in rows {
            bar.finish_and_clear();
        }
        if interrupted {
            // The terminal's echo of ^C moved the cursor a line down the region.
            let _ = console::Term::stdout().clear_last_lines(1);
        }
        for line in last {
            println!("{line}");
        }
    }
}
