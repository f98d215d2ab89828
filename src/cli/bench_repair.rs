//! `tickvault bench repair`: the time from a live feed's reconnect to the minutes it
//! missed being in the log. The daemon captures BTC-USD's minute aggregates from the
//! simulator through a relay; each run cuts the relay 5 s before a minute closes and
//! restores it 3 s after, so that minute's aggregate is never received, and times the
//! restore to that minute's bar in the log: the reconnect, the gap found, the bar
//! fetched from the REST API (no quota limit), appended. A run a minute.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::config::{Config, Secret};
use crate::coverage::{Coverage, Mark};
use crate::event::{Feed, DAY_MS, MINUTE_MS};
use crate::sim::relay::{until_ms, Relay};
use crate::sim::SimOptions;

/// Whether the log holds BTC-USD's bar for `minute_ms`.
fn in_log(running: &crate::daemon::Running, minute_ms: i64) -> bool {
    let day = minute_ms.div_euclid(DAY_MS);
    Coverage::read(running.wal.reader(), Mark::Bar, Feed::Crypto, "BTC-USD", day, day)
        .is_ok_and(|bars| bars.has(minute_ms))
}

async fn wait(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let until = Instant::now() + timeout;
    while !done() {
        anyhow::ensure!(Instant::now() < until, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

pub async fn run(dir: &std::path::Path, runs: u32) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir)?;
    let work = tempfile::tempdir_in(dir)?;
    let options = SimOptions {
        always_open: true,
        ..SimOptions::default()
    };
    let sim = crate::sim::spawn("127.0.0.1:0".parse()?, options).await?;
    let relay = Relay::start(sim.addr.port())?;
    let text = format!(
        "[log]\ndata_dir = {:?}\n[polygon]\nws_url = \"ws://127.0.0.1:{}\"\nrest_url = \"{}\"\n\
         [live]\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nstale_after = \"5s\"\n\
         [live.crypto]\nsymbols = [\"BTC-USD\"]\nchannels = [\"XA\"]\n[backfill]\nenabled = false\n\
         [aggregate]\nenabled = false\n[metrics]\nenabled = false\n",
        work.path().join("log"),
        relay.port,
        sim.rest_url()
    );
    let mut config = Config::parse("(bench repair)", &text)?;
    config.polygon.api_key = Some(Secret::new("bench"));
    let running = crate::daemon::start(&config).await?;
    let repairs = || {
        running
            .backfill
            .as_ref()
            .map_or(0, |b| b.repairs.load(Ordering::Relaxed))
    };

    println!("# bench repair: {runs} runs, a minute each, against the simulator (no quota limit)\n");
    println!("| run | minute missed (UTC) | restore to its bar in the log | repaired, not received |");
    println!("|---:|---|---:|---|");
    // The symbol's first minute aggregate: its minutes are watched from there on.
    let first = crate::event::now_ms().div_euclid(MINUTE_MS) * MINUTE_MS;
    wait("the first minute aggregate", Duration::from_secs(130), || {
        in_log(&running, first) || in_log(&running, first + MINUTE_MS)
    })
    .await?;
    let mut seconds = Vec::new();
    for run in 1..=runs {
        let now = crate::event::now_ms();
        let mut boundary = (now.div_euclid(MINUTE_MS) + 1) * MINUTE_MS;
        if boundary - now < 6_000 {
            boundary += MINUTE_MS;
        }
        let missed = boundary - MINUTE_MS;
        until_ms(boundary - 5_000).await;
        let before = repairs();
        relay.cut();
        until_ms(boundary + 3_000).await;
        relay.restore();
        let restored = Instant::now();
        wait("the missed minute in the log", Duration::from_secs(60), || {
            in_log(&running, missed)
        })
        .await?;
        let took = restored.elapsed().as_secs_f64();
        seconds.push(took);
        // A repair is counted once its whole fetch is done, a moment after its append.
        let repaired = wait("", Duration::from_secs(5), || repairs() > before).await.is_ok();
        println!(
            "| {run} | {} | {took:.2} s | {} |",
            crate::gaps::minute_text(missed),
            if repaired {
                "yes"
            } else {
                "no (received live: not a repair)"
            }
        );
    }
    seconds.sort_by(f64::total_cmp);
    if let (Some(min), Some(max)) = (seconds.first(), seconds.last()) {
        println!(
            "\nrestore to the missed minute in the log: min {min:.2} s, median {:.2} s, max {max:.2} s (target < 2 s)",
            seconds[seconds.len() / 2]
        );
    }
    running.shutdown().await?;
    sim.stop().await?;
    Ok(ExitCode::SUCCESS)
}
