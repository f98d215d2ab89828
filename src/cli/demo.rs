//! `tickvault demo`: the daemon against an in-process simulator, with progress while it
//! runs and a summary of what was captured and where it went.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tickvault_wal::{Lane, Wal};

use super::run::stop_signal;
use super::wal::human_bytes;
use crate::config::{Config, Secret};
use crate::daemon;
use crate::event::{Event, Feed, EVENT_KIND};
use crate::gaps;
use crate::sim::{self, Market, SimOptions};
use crate::sink::breaker::State;
use crate::source::backfill;

const EMBEDDED_DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

fn load(config: Option<PathBuf>, data_dir: Option<PathBuf>) -> anyhow::Result<Config> {
    let mut config = match config {
        Some(path) => Config::load(&path)?,
        None if std::path::Path::new("config/demo.toml").exists() => {
            Config::load(std::path::Path::new("config/demo.toml"))?
        }
        None => {
            let mut c = Config::parse("(built-in demo config)", EMBEDDED_DEMO_CONFIG)?;
            c.apply_env("(built-in demo config)", |n| std::env::var(n).ok())?;
            c
        }
    };
    if let Some(dir) = data_dir {
        config.log.data_dir = dir;
    }
    Ok(config)
}

pub(super) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub async fn run(
    config: Option<PathBuf>,
    duration: Option<u64>,
    data_dir: Option<PathBuf>,
    plain: bool,
) -> anyhow::Result<ExitCode> {
    let mut config = load(config, data_dir)?;
    let sim_options = SimOptions {
        seed: 1,
        quotes_per_minute: 600,
        ..SimOptions::default()
    };
    let simulator = sim::spawn("127.0.0.1:0".parse()?, sim_options.clone()).await?;
    // The live feeds go through a relay the demo cuts once (see `demo_outage`).
    let mut outage = super::demo_outage::Outage::relay_to(simulator.addr.port())?;
    config.polygon.ws_url = format!("ws://127.0.0.1:{}", outage.port());
    config.polygon.rest_url = simulator.rest_url();
    config.polygon.api_key = Some(Secret::new("demo"));
    config.validate("demo")?;
    let market = Market::new(sim_options.seed, sim_options.quotes_per_minute, 0);

    // On a terminal the banner's lines are cut to its width, like the screen's rows.
    let width = super::demo_screen::wanted(plain).then(|| usize::from(console::Term::stdout().size().1));
    macro_rules! say {
        ($($arg:tt)*) => {{
            let line = format!($($arg)*);
            match width {
                Some(w) => println!("{}", console::truncate_str(&line, w.saturating_sub(1), "…")),
                None => println!("{line}"),
            }
        }};
    }
    say!("tickvault demo");
    say!(
        "  simulator   Polygon-compatible, on {} (seed {})",
        simulator.addr,
        sim_options.seed
    );
    say!("  log         {}", config.log.data_dir.display());
    for spec in daemon::live_specs(&config)? {
        say!(
            "  live        {} {} [{}]",
            spec.feed,
            spec.symbols.join(" "),
            spec.channels.join(",")
        );
    }
    let jobs = daemon::backfill_jobs(&config, crate::event::now_ms());
    if !jobs.is_empty() {
        let symbols: Vec<String> = jobs.iter().map(|j| format!("{} {}", j.feed, j.symbol)).collect();
        say!(
            "  backfill    1-minute bars, last {} days: {}",
            config.backfill.lookback.as_secs() / 86_400,
            symbols.join(", ")
        );
    }

    let mut running = daemon::start(&config).await?;
    match running.metrics_addr {
        Some(addr) => say!("  metrics     http://{addr}/metrics (health: /healthz, /readyz)"),
        None if config.metrics.enabled => {
            say!("  metrics     not served: {} could not be bound", config.metrics.listen)
        }
        None => {}
    }
    say!("  outage      the demo cuts the live feeds once, across a minute's close");
    match duration {
        Some(secs) => say!("  running for {secs} s (Ctrl-C stops early)\n"),
        None => say!("  running until Ctrl-C\n"),
    }
    let mut screen = super::demo_screen::wanted(plain).then(|| super::demo_screen::Screen::new(&running));
    let started = Instant::now();
    let deadline = duration.map(|s| started + Duration::from_secs(s));
    let start_ms = crate::event::now_ms();
    let backfill = running.backfill.clone();
    outage.plan(start_ms, duration.map(|s| start_ms + s as i64 * 1000), move || {
        backfill.as_ref().map_or(0, |b| b.repairs.load(Ordering::Relaxed))
    });
    let mut outage_said = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let signal = stop_signal();
    tokio::pin!(signal);
    let mut last_live = 0u64;
    let mut last_bars = 0u64;
    let mut last_sink_rows = Vec::new();
    let mut failure = None;
    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut signal => {
                interrupted = true;
                break;
            }
            ended = running.join_next() => match ended {
                Some(Err(e)) => { failure = Some(e); break; }
                _ => continue,
            },
        }
        let elapsed = started.elapsed();
        if let Some(screen) = &mut screen {
            screen.draw(
                &running,
                &market,
                elapsed,
                duration,
                &config.log.data_dir,
                &outage.stage(),
            );
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            continue;
        }
        let now_ms = crate::event::now_ms();
        let mut line = format!("{:>4}s", elapsed.as_secs());
        let captured: u64 = running.live.iter().map(|(_, s)| s.captured()).sum();
        let (mut p50, mut p99, mut reconnects, mut up, mut evicted) = (0.0f64, 0.0f64, 0, 0, 0);
        let mut closed = Vec::new();
        for (feed, s) in &running.live {
            p50 = p50.max(s.latency_ms(0.5));
            p99 = p99.max(s.latency_ms(0.99));
            reconnects += s.disconnects.load(Ordering::Relaxed);
            evicted += s.evictions.load(Ordering::Relaxed);
            up += u64::from(s.connected.load(Ordering::Relaxed));
            if !market.is_open(*feed, now_ms) {
                closed.push(feed.name());
            }
        }
        line.push_str(&format!(
            " | live {} events ({}/s), {}/{} feeds up, {} reconnects, durable in {:.1} ms p50 / {:.1} ms p99",
            thousands(captured),
            thousands(captured - last_live),
            up,
            running.live.len(),
            reconnects,
            p50,
            p99
        ));
        if !closed.is_empty() {
            line.push_str(&format!(" ({} closed now)", closed.join(", ")));
        }
        if evicted > 0 {
            line.push_str(&format!(
                " | EVICTED {evicted}x: another client uses this API key, backing off"
            ));
        }
        last_live = captured;
        if let Some(b) = &running.backfill {
            let bars = b.bars();
            line.push_str(&format!(
                " | backfill {}/{} periods, {} bars ({}/s){}",
                b.periods_done.load(Ordering::Relaxed),
                b.periods_total.load(Ordering::Relaxed),
                thousands(bars),
                thousands(bars - last_bars),
                if b.waiting_for_backlog.load(Ordering::Relaxed) {
                    ", waiting for sinks"
                } else {
                    ""
                }
            ));
            last_bars = bars;
        }
        if let Some(a) = &running.aggregate {
            let (new, revised) = (
                a.bars_new.load(Ordering::Relaxed),
                a.bars_revised.load(Ordering::Relaxed),
            );
            line.push_str(&format!(
                " | derived {} bars ({} revised)",
                thousands(new + revised),
                thousands(revised)
            ));
        }
        if let Some(b) = &running.backfill {
            let repairs = b.repairs.load(Ordering::Relaxed);
            if repairs > 0 {
                line.push_str(&format!(" | {repairs} gaps repaired"));
            }
        }
        println!("{line}");
        // The outage's news, on a line of its own when it changes.
        let stage = outage.stage();
        let said = (!matches!(stage, super::demo_outage::Stage::None)).then(|| stage.line());
        if said != outage_said {
            if let Some(said) = &said {
                println!("      outage: {said}");
            }
            outage_said = said;
        }
        if !running.sinks.is_empty() {
            println!("{}", sink_line(&running, &mut last_sink_rows));
        }
        let _ = std::io::stdout().flush();
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    if let Some(screen) = screen.take() {
        screen.finish(interrupted);
    }
    if failure.is_none() && !interrupted {
        // The repair of what the cut missed, for the summary.
        outage.wait_for_repair(Duration::from_secs(15)).await;
    }
    if failure.is_none() && !running.sinks.is_empty() {
        // Give the sinks a moment to forward what was captured, so the summary and the
        // verification below see them caught up.
        let until = Instant::now() + Duration::from_secs(15);
        while Instant::now() < until && !caught_up(&running) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The backfill's periods checked against the sinks now, not at the daemon's next
        // round (every `gaps.interval`), for the summary.
        let log_id = running.wal.reader().log_id()?;
        let stats = Default::default();
        if let Some(mut verifier) = crate::verify::periods::Verifier::new(&config, running.wal.clone(), &log_id, stats)
        {
            if let Err(e) = verifier.round(1.0).await {
                eprintln!("could not check the backfill's periods against the sinks: {e:#}");
            }
        }
    }
    let elapsed = started.elapsed();
    let data_dir = config.log.data_dir.clone();
    let backfill_stats = running.backfill.clone();
    let sink_stats = running.sinks.clone();
    let priority = running.priority.clone();
    let heads = crate::daemon::FORWARDED_LANES.map(|lane| (lane, running.wal.head(lane)));
    let result = running.shutdown().await;
    simulator.stop().await?;
    if let Some(e) = failure {
        return Err(e);
    }
    result?;
    summary(&config, elapsed, backfill_stats.as_deref(), &outage.stage().line())?;
    if sink_stats.is_empty() {
        println!(
            "  forwarded to: nowhere (no sinks enabled; `scripts/services.sh up` and \
             `tickvault demo --config config/local-sinks.toml` show the whole pipeline)"
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("  forwarded (rows acknowledged by each sink; cursor against the log's head):");
    for s in &sink_stats {
        let head = heads
            .iter()
            .find(|(lane, _)| *lane == s.lane)
            .map_or(0, |(_, head)| *head);
        let acked = s.acked_seq.load(Ordering::Relaxed);
        println!(
            "    {:<10} {:<9} {:>10} rows in {:>6} batches  {}  capture-to-commit {}  breaker {}, {} failed attempts{}{}",
            s.sink,
            s.lane.name(),
            thousands(s.rows.load(Ordering::Relaxed)),
            thousands(s.batches.load(Ordering::Relaxed)),
            if acked >= head {
                "caught up".to_owned()
            } else {
                format!("{} behind", thousands(head - acked))
            },
            if s.latency_measured() {
                format!("p50 {:.1} ms / p99 {:.1} ms", s.latency_ms(0.5), s.latency_ms(0.99))
            } else if s.rewound.load(Ordering::Relaxed) > 0 {
                // Rows sent again carry an old capture time: they are not measured.
                "not measured (only rows sent again)".to_owned()
            } else {
                "not measured (no rows)".to_owned()
            },
            s.state().name(),
            s.failures.load(Ordering::Relaxed),
            match s.rewound.load(Ordering::Relaxed) {
                0 => String::new(),
                n => format!(", {} records sent again (the sink lacked them)", thousands(n)),
            },
            match s.refused.load(Ordering::Relaxed) {
                0 => String::new(),
                n => format!(", {} records refused for their content (set aside)", thousands(n)),
            }
        );
    }
    let seen = priority.budget();
    if !seen.budget.is_zero() && seen.periods > 0 {
        println!(
            "  live first: in {} of {} half seconds live batches were over the {} ms latency budget, each time \
             halving the backfill's share of its duties (down to a sixteenth); it ended at {}",
            seen.cuts,
            seen.periods,
            seen.budget.as_millis(),
            match seen.share {
                1.0 => "all of them".to_owned(),
                share => format!("{:.0}% of them", share * 100.0),
            }
        );
    }
    let report = crate::verify::verify(&config, &data_dir, None).await?;
    for s in &report.sinks {
        let sum = |f: fn(&crate::verify::Difference) -> u64| s.differences.iter().map(f).sum::<u64>();
        let (missing, extra, duplicates) = (sum(|d| d.missing), sum(|d| d.extra), sum(|d| d.duplicates));
        println!(
            "  verify {:<10} {}: {} keys its cursors passed, {} held; {} missing, {} duplicated, {} held that this log does not have{}{}{}",
            s.sink,
            if s.matches() { "MATCH" } else { "DIFFERS" },
            thousands(s.passed),
            thousands(s.in_sink),
            thousands(missing),
            thousands(duplicates),
            thousands(extra),
            if s.beyond_retention > 0 {
                format!(
                    " (and {} from before the log's retention, not compared)",
                    thousands(s.beyond_retention)
                )
            } else {
                String::new()
            },
            match s.refused {
                0 => String::new(),
                n => format!("; {} records it refused for their content, set aside", thousands(n)),
            },
            match (&s.error, extra > 0, missing > 0) {
                (Some(e), _, _) => format!(" (cannot read it: {e})"),
                (None, true, _) => " (from another log: an earlier demo whose log was deleted, or another appliance; \
                                     `scripts/services.sh reset` empties the local servers' demo database and stream)"
                    .to_owned(),
                // A real loss reads the same; in a demo, the likelier cause is the sinks
                // emptied under a log whose cursors had passed those rows.
                (None, false, true) => format!(
                    " (rows its cursors passed are not in it: lost, or the sink was emptied under this log; \
                     a demo afresh needs a new log as well: `rm -rf {}`)",
                    data_dir.display()
                ),
                (None, false, false) => String::new(),
            }
        );
    }
    // A sink refusing every write matches too, over the nothing its cursors passed:
    // one whose breaker is not closed at the end fails the demo as well.
    let failing: Vec<_> = sink_stats.iter().filter(|s| s.state() != State::Closed).collect();
    for s in &failing {
        println!(
            "  {} {} was failing when the demo ended (breaker {}): {}",
            s.sink,
            s.lane.name(),
            s.state().name(),
            s.last_error().unwrap_or_default()
        );
    }
    let matched = report.sinks.iter().all(|s| s.matches());
    if !matched {
        println!(
            "  the verification found differences (exit 1); `tickvault verify --config C` lists each group and day"
        );
    }
    if !failing.is_empty() {
        println!("  a sink was failing (exit 1): its cursor holds what it has not taken, for when it is mended");
    }
    Ok(if matched && failing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Whether every sink runner has acknowledged its lane up to the log's head.
/// A runner whose breaker is open is not waited for: it takes nothing until it is mended.
fn caught_up(running: &daemon::Running) -> bool {
    running
        .sinks
        .iter()
        .all(|s| s.acked_seq.load(Ordering::Relaxed) >= running.wal.head(s.lane) || s.state() == State::Open)
}

/// One line per second: per sink, rows forwarded per lane, the rate, lag and latency.
fn sink_line(running: &daemon::Running, last: &mut Vec<u64>) -> String {
    last.resize(running.sinks.len(), 0);
    let mut parts = Vec::new();
    for (i, s) in running.sinks.iter().enumerate() {
        let rows = s.rows.load(Ordering::Relaxed);
        let lag = running
            .wal
            .head(s.lane)
            .saturating_sub(s.acked_seq.load(Ordering::Relaxed));
        let mut part = format!(
            "{} {} {} ({}/s, lag {})",
            s.sink,
            s.lane.name(),
            thousands(rows),
            thousands(rows - last[i]),
            thousands(lag)
        );
        if s.lane == Lane::Live && s.latency_measured() {
            part.push_str(&format!(" p99 {:.1} ms", s.latency_ms(0.99)));
        }
        if s.state() != crate::sink::breaker::State::Closed {
            part.push_str(&format!(" BREAKER {}", s.state().name()));
        }
        last[i] = rows;
        parts.push(part);
    }
    let share = running.priority.backfill_share();
    if share < 1.0 {
        // Live over its latency budget: the backfill yields more than its duties.
        parts.push(format!("backfill at {:.0}% of its duties for live", share * 100.0));
    }
    format!("      | sinks: {}", parts.join(" | "))
}

fn summary(
    config: &crate::config::Config,
    elapsed: Duration,
    backfill: Option<&backfill::BackfillStats>,
    outage: &str,
) -> anyhow::Result<()> {
    let data_dir = &config.log.data_dir;
    let reader = Wal::open_read_only(data_dir)?;
    println!("\nsummary after {:.1} s", elapsed.as_secs_f64());
    let mut by_stream: BTreeMap<(Lane, Feed, String, String), u64> = BTreeMap::new();
    for lane in [Lane::Live, Lane::Backfill] {
        reader.scan(lane, 0, u64::MAX, |_, decoded| {
            if let Ok(record) = decoded {
                if record.kind == EVENT_KIND {
                    if let Ok(event) = Event::from_payload(record.payload) {
                        let key = event.natural_key();
                        *by_stream
                            .entry((
                                lane,
                                key.feed,
                                key.symbol,
                                format!("{} {}", key.kind.name(), key.timeframe),
                            ))
                            .or_default() += 1;
                    }
                }
            }
            true
        })?;
    }
    println!("  captured (in the log, durable):");
    for ((lane, feed, symbol, what), n) in &by_stream {
        println!(
            "    {:<9} {:<7} {:<9} {:<10} {:>12}",
            lane.name(),
            feed.name(),
            symbol,
            what,
            thousands(*n)
        );
    }
    let s = reader.summary()?;
    println!("  log {}:", data_dir.display());
    for lane in &s.lanes {
        if lane.records > 0 {
            println!(
                "    {:<9} seq {}..{}  {} records  {}",
                lane.lane.name(),
                lane.first_seq.unwrap_or(0),
                lane.last_seq.unwrap_or(0),
                thousands(lane.records),
                human_bytes(lane.bytes)
            );
        }
    }
    if let Some(b) = backfill {
        println!(
            "  backfill: {} of {} periods done, {} bars in {} requests ({} retries, {} rate-limited); \
             its capture paused {:.1} s for live",
            b.periods_done.load(Ordering::Relaxed),
            b.periods_total.load(Ordering::Relaxed),
            thousands(b.bars()),
            b.requests.load(Ordering::Relaxed),
            b.retries.load(Ordering::Relaxed),
            b.rate_limited.load(Ordering::Relaxed),
            b.paused_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let periods = gaps::PeriodCounts::read(&reader)?;
        if config.sinks.enabled().is_empty() {
            println!(
                "  period tracker: {} periods: {} downloaded, {} pending (none verified: no sink enabled)",
                periods.total(),
                periods.downloaded,
                periods.pending
            );
        } else {
            println!(
                "  period tracker: {} periods: {} verified in every sink, {} downloaded, {} pending",
                periods.total(),
                periods.verified,
                periods.downloaded,
                periods.pending
            );
        }
    }
    let suspected = gaps::suspected(&reader)?;
    println!("  outage: {outage}");
    println!("  suspected gaps (live disconnects): {}", suspected.len());
    // As `tickvault gaps` reports them, from the coverage index.
    let (from_ms, to_ms) = gaps::window(config.gaps.lookback);
    let calendar = crate::calendar::Calendar::new(&config.calendar);
    let found = gaps::scan(&reader, &calendar, &gaps::watched(config), from_ms, to_ms)?;
    let sum = |f: &dyn Fn(&gaps::SymbolGaps) -> u64| found.iter().map(f).sum::<u64>();
    println!(
        "  minute coverage (`tickvault gaps`), last {}: {} symbols, {} minutes in market hours, {} with a bar, {} source holes, {} open gaps ({} minutes)",
        humantime::format_duration(config.gaps.lookback),
        found.len(),
        thousands(sum(&|s| s.market_minutes)),
        thousands(sum(&|s| s.covered)),
        thousands(sum(&|s| s.source_holes)),
        sum(&|s| s.gaps.len() as u64),
        thousands(sum(&|s| s.gap_minutes()))
    );
    if let Some(b) = backfill {
        println!(
            "  gaps fetched by the daemon (after disconnects and every `gaps.interval`): {}",
            b.repairs.load(Ordering::Relaxed)
        );
    }
    if config.aggregate.enabled {
        let checked = super::aggregate::check(&reader, &config.aggregate)?;
        println!(
            "  derived lane: {} bars in {} timeframes with their indicators ({} revised by late data), {} rounds; \
             made again from its journal (`tickvault aggregate --check`): {}",
            thousands(checked.records),
            config.aggregate.timeframes.len(),
            thousands(checked.revised),
            thousands(checked.rounds),
            if checked.identical() { "identical" } else { "DIFFERS" }
        );
    }
    let check = reader.check()?;
    println!(
        "  check: {} records verified, {} corrupt, {} quarantined{}",
        thousands(check.good),
        check.corrupt.len(),
        s.quarantined,
        if check.is_clean() { " - clean" } else { "" }
    );
    Ok(())
}
