//! The backfill downloader against the simulator's REST endpoint, over real sockets.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tickvault::config::Secret;
use tickvault::event::MINUTE_MS;
use tickvault::event::{Body, Event, Feed};
use tickvault::sim::{self, Faults, Market, SimOptions};
use tickvault::source::backfill::{self, BackfillSpec, BackfillStats, Downloader, Job, PeriodState};
use tickvault::source::live::{self, LiveSpec, LiveStats};
use tickvault_wal::{Lane, Wal};

mod common;

const DAY: i64 = 86_400_000;
// 2024-03-04T00:00:00Z, a Monday.
const MONDAY: i64 = 1_709_510_400_000;

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn spec(sim: &sim::SimHandle, page_limit: u32) -> BackfillSpec {
    BackfillSpec {
        rest_url: sim.rest_url(),
        api_key: Secret::new("k"),
        chunk: Duration::from_secs(3 * 86_400),
        page_limit,
        max_attempts: 8,
        concurrency: 2,
        requests_per_minute: 0,
        high_water: 5_000_000,
        live_duty: 1.0,
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        calendar: tickvault::calendar::Calendar::default(),
    }
}

fn job(feed: Feed, symbol: &str, days: i64) -> Job {
    Job {
        feed,
        symbol: symbol.into(),
        from_ms: MONDAY,
        to_ms: MONDAY + days * DAY,
    }
}

/// Every bar in the backfill lane, by (symbol, start), with how often it occurs.
fn bars(wal: &Wal) -> HashMap<(String, i64), (u32, tickvault::event::Bar)> {
    let mut out = HashMap::new();
    for r in wal.reader().read(Lane::Backfill, 0, usize::MAX).unwrap().records {
        let event = Event::from_payload(&r.payload).unwrap();
        assert_eq!(event.capture.lane, Lane::Backfill);
        let Body::Bar(bar) = event.body else {
            panic!("not a bar")
        };
        let entry = out
            .entry((bar.symbol.clone(), bar.start_ms))
            .or_insert((0, bar.clone()));
        entry.0 += 1;
    }
    out
}

fn assert_exactly_the_markets_bars(wal: &Wal, options: &SimOptions, jobs: &[Job]) {
    let market = Market::new(options.seed, options.quotes_per_minute, options.faults.hole_every);
    let got = bars(wal);
    let mut expected = 0;
    for job in jobs {
        let mut m = job.from_ms;
        while m < job.to_ms {
            if let Some(b) = market.bar(job.feed, &job.symbol, m) {
                expected += 1;
                let (count, bar) = got
                    .get(&(job.symbol.clone(), m))
                    .unwrap_or_else(|| panic!("missing {} {m}", job.symbol));
                assert_eq!(*count, 1, "duplicate {} {m}", job.symbol);
                assert_eq!(
                    (bar.open, bar.high, bar.low, bar.close, bar.trades),
                    (b.open, b.high, b.low, b.close, Some(b.count))
                );
            }
            m += MINUTE_MS;
        }
    }
    assert_eq!(got.len(), expected, "bars outside the requested ranges");
}

async fn download(wal: &Wal, spec: BackfillSpec, jobs: &[Job]) -> Arc<BackfillStats> {
    let stats = Arc::new(BackfillStats::default());
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    Downloader::new(spec, wal.clone(), stats.clone())
        .unwrap()
        .run(jobs, shutdown)
        .await
        .unwrap();
    stats
}

#[tokio::test]
async fn pages_are_followed_to_the_end_and_every_bar_lands_once() {
    let options = SimOptions::default();
    let sim = sim::spawn(any_port(), options.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    // Includes a forex weekend (no bars) and crypto every minute.
    let jobs = [job(Feed::Forex, "EUR/USD", 7), job(Feed::Crypto, "BTC-USD", 4)];
    let stats = download(&wal, spec(&sim, 700), &jobs).await;
    assert!(stats.pages.load(Ordering::Relaxed) >= 20, "{stats:?}");
    assert_exactly_the_markets_bars(&wal, &options, &jobs);
    let periods = backfill::periods(wal.reader()).unwrap();
    assert_eq!(periods.len(), 3 + 2);
    assert!(periods.iter().all(|p| p.state == PeriodState::Downloaded));
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn a_429_storm_is_ridden_out_honouring_retry_after_and_5xx_are_retried() {
    let faults = Faults {
        burst_429: 4,
        error_5xx_every: 3,
        ..Faults::default()
    };
    let options = SimOptions {
        faults,
        ..SimOptions::default()
    };
    let sim = sim::spawn(any_port(), options.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let jobs = [job(Feed::Crypto, "ETH-USD", 2)];
    let started = std::time::Instant::now();
    // The simulator answers the first four requests of every clock minute with 429: a run
    // that crosses a minute boundary meets eight in a row, so allow more than eight tries.
    let mut spec = spec(&sim, 1000);
    spec.max_attempts = 16;
    let stats = download(&wal, spec, &jobs).await;
    assert!(stats.rate_limited.load(Ordering::Relaxed) >= 4, "{stats:?}");
    assert!(stats.server_errors.load(Ordering::Relaxed) >= 1, "{stats:?}");
    // The simulator's Retry-After is 1-2 s: four 429s in a row cannot pass in under 1 s.
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    assert_exactly_the_markets_bars(&wal, &options, &jobs);
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn a_restart_mid_chunk_resumes_from_the_tracker_without_refetching_finished_periods() {
    let options = SimOptions {
        faults: Faults {
            slow: Some(Duration::from_millis(30)),
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let sim = sim::spawn(any_port(), options.clone()).await.unwrap();
    let jobs = [job(Feed::Crypto, "SOL-USD", 9)];
    let mut one_spec = spec(&sim, 500);
    one_spec.concurrency = 1;

    // Reference: the same download, uninterrupted.
    let reference_dir = tempfile::tempdir().unwrap();
    let reference = Wal::open(reference_dir.path()).unwrap();
    let full = download(&reference, one_spec.clone(), &jobs).await;
    let full_pages = full.pages.load(Ordering::Relaxed);
    reference.shutdown().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let first = Arc::new(BackfillStats::default());
    {
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let downloader = Downloader::new(one_spec.clone(), wal.clone(), first.clone()).unwrap();
        let run = downloader.run(&jobs, shutdown);
        tokio::pin!(run);
        // Stop in the middle of the second period.
        let per_period = full_pages / 3;
        loop {
            tokio::select! {
                r = &mut run => { r.unwrap(); panic!("finished before it could be interrupted"); }
                _ = tokio::time::sleep(Duration::from_millis(5)) => {
                    if first.pages.load(Ordering::Relaxed) >= per_period + per_period / 2 {
                        stop.send(true).unwrap();
                        break;
                    }
                }
            }
        }
        run.await.unwrap();
    }
    let periods = backfill::periods(wal.reader()).unwrap();
    assert_eq!(
        periods.iter().filter(|p| p.state == PeriodState::Downloaded).count(),
        1,
        "{periods:?}"
    );
    let partial = periods.iter().find(|p| p.state == PeriodState::Pending).unwrap();
    assert!(partial.resume_from_ms > partial.start_ms, "{partial:?}");
    wal.shutdown().await.unwrap();
    drop(wal);

    // The restart: a new process would open the same log.
    let wal = Wal::open(dir.path()).unwrap();
    let second = download(&wal, one_spec, &jobs).await;
    assert_eq!(second.periods_skipped.load(Ordering::Relaxed), 1);
    assert_eq!(
        first.pages.load(Ordering::Relaxed) + second.pages.load(Ordering::Relaxed),
        full_pages,
        "pages were fetched twice"
    );
    assert_exactly_the_markets_bars(&wal, &options, &jobs);
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn a_later_run_with_the_same_lookback_fetches_only_the_minutes_that_are_new() {
    let options = SimOptions::default();
    let sim = sim::spawn(any_port(), options.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    const HOUR: i64 = 3_600_000;
    // A lookback of two days, cut in mid-chunk at both ends (chunks are three days),
    // then the same lookback two hours later, as a restart of the daemon would ask.
    let first = Job {
        feed: Feed::Crypto,
        symbol: "BTC-USD".into(),
        from_ms: MONDAY + 7 * HOUR,
        to_ms: MONDAY + 2 * DAY + 7 * HOUR,
    };
    let second = Job {
        from_ms: first.from_ms + 2 * HOUR,
        to_ms: first.to_ms + 2 * HOUR,
        ..first.clone()
    };
    let one = download(&wal, spec(&sim, 1000), std::slice::from_ref(&first)).await;
    let two = download(&wal, spec(&sim, 1000), std::slice::from_ref(&second)).await;

    let market = Market::new(options.seed, options.quotes_per_minute, options.faults.hole_every);
    let bars_in = |from: i64, to: i64| {
        (from / MINUTE_MS..to / MINUTE_MS)
            .filter(|m| market.bar(Feed::Crypto, "BTC-USD", m * MINUTE_MS).is_some())
            .count() as u64
    };
    assert_eq!(one.bars(), bars_in(first.from_ms, first.to_ms));
    // Only the two new hours: the chunks already downloaded are skipped or extended.
    assert_eq!(two.bars(), bars_in(first.to_ms, second.to_ms), "{two:?}");
    assert!(two.periods_skipped.load(Ordering::Relaxed) >= 1, "{two:?}");
    let union = Job {
        from_ms: first.from_ms,
        ..second.clone()
    };
    assert_exactly_the_markets_bars(&wal, &options, &[union]);
    let periods = backfill::periods(wal.reader()).unwrap();
    assert!(
        periods.iter().all(|p| p.state == PeriodState::Downloaded),
        "{periods:?}"
    );
    assert_eq!(periods.iter().map(|p| p.resume_from_ms).max(), Some(second.to_ms));
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn with_no_sink_draining_backfill_stops_at_the_high_water_mark_while_live_goes_on() {
    let options = SimOptions {
        quotes_per_minute: 1200,
        always_open: true,
        ..SimOptions::default()
    };
    let sim = sim::spawn(any_port(), options.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    // A sink that never acknowledges anything on the backfill lane.
    wal.move_cursor("stuck-sink", Lane::Backfill, 0).await.unwrap();
    let mut backfill_spec = spec(&sim, 1000);
    backfill_spec.high_water = 5_000;
    let stats = Arc::new(BackfillStats::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let downloader = Downloader::new(backfill_spec, wal.clone(), stats.clone()).unwrap();
    let jobs = [job(Feed::Crypto, "BTC-USD", 30)];
    let backfill_task = {
        let shutdown = shutdown.clone();
        async move { downloader.run(&jobs, shutdown).await }
    };
    let live_stats = Arc::new(LiveStats::default());
    let live_spec = LiveSpec {
        feed: Feed::Forex,
        ws_url: sim.ws_url(),
        api_key: Secret::new("k"),
        symbols: vec!["EUR/USD".into()],
        channels: vec!["C".into()],
        stale_after: Duration::from_secs(5),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
    };
    let live_task = tokio::spawn(live::run(live_spec, wal.clone(), live_stats.clone(), shutdown.clone()));
    let checker = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let head_at_3s = wal.head(Lane::Backfill);
        let live_at_3s = live_stats.captured();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let waiting = stats.waiting_for_backlog.load(Ordering::Relaxed);
        (
            head_at_3s,
            live_at_3s,
            wal.head(Lane::Backfill),
            live_stats.captured(),
            waiting,
        )
    };
    let (result, (head_3s, live_3s, head_5s, live_5s, waiting)) = tokio::join!(backfill_task, async {
        let out = checker.await;
        stop.send(true).unwrap();
        out
    });
    result.unwrap();
    live_task.await.unwrap().unwrap();
    // Stopped at the mark: at most one page per concurrent request beyond it, then still.
    assert!(head_3s >= 5_000, "backfill did not reach the mark: {head_3s}");
    assert!(head_3s <= 5_000 + 2 * 1_000, "backfill ran past the mark: {head_3s}");
    assert_eq!(head_3s, head_5s, "backfill kept going while above the mark");
    assert!(waiting, "the downloader did not say it was waiting for sinks");
    assert!(live_5s > live_3s, "live capture stalled: {live_3s} then {live_5s}");
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

/// Downloads `jobs` while, if `live`, another task appends to the live lane every 20 ms;
/// the stats and the live records appended.
async fn download_beside_live(wal: &Wal, spec: BackfillSpec, jobs: &[Job], live: bool) -> (Arc<BackfillStats>, u64) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let producer = {
        let wal = wal.clone();
        tokio::spawn(async move {
            let mut appended = 0;
            while live && !*stopped.borrow() {
                let mut batch = tickvault_wal::Batch::with_capacity(1, 16);
                batch.push(tickvault::event::EVENT_KIND, b"a live event").unwrap();
                wal.append(Lane::Live, batch).await.unwrap();
                appended += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = stopped.changed() => {}
                }
            }
            appended
        })
    };
    if live {
        // Live is flowing before the first page comes.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = download(wal, spec, jobs).await;
    // With no live, the producer has already gone, and its receiver with it.
    let _ = stop.send(true);
    (stats, producer.await.unwrap())
}

#[tokio::test]
async fn while_live_flows_the_backfill_capture_pauses_to_its_duty_and_still_lands_every_bar() {
    let options = SimOptions::default();
    let sim = sim::spawn(any_port(), options.clone()).await.unwrap();
    let jobs = [job(Feed::Crypto, "BTC-USD", 10)];
    for (live, duty, pauses) in [(true, 0.25, true), (false, 0.25, false), (true, 1.0, false)] {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        let mut paced = spec(&sim, 2_000);
        paced.live_duty = duty;
        let started = std::time::Instant::now();
        let (stats, live_records) = download_beside_live(&wal, paced, &jobs, live).await;
        let took = started.elapsed();
        let paused = Duration::from_millis(stats.paused_ms.load(Ordering::Relaxed));
        let case = format!("live {live}, duty {duty}: paused {paused:?} of {took:?}, {live_records} live records");
        assert_eq!(!paused.is_zero(), pauses, "{case}");
        // Pauses are taken one after the other (one page's appends at a time), inside
        // the download.
        assert!(paused < took, "{case}");
        assert_eq!(wal.head(Lane::Live), live_records, "{case}");
        assert_exactly_the_markets_bars(&wal, &options, &jobs);
        wal.shutdown().await.unwrap();
    }
    sim.stop().await.unwrap();
}

fn peak_rss_mb(output: &str) -> u64 {
    let at = output.find("peak RSS ").unwrap_or_else(|| panic!("{output}"));
    output[at + 9..].split_whitespace().next().unwrap().parse().unwrap()
}

/// `tickvault backfill` of EUR/USD over `from..=to` into `data_dir`.
fn backfill_command(config: &Path, data_dir: &Path, from: &str, to: &str) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tickvault"));
    command
        .args(["backfill", "--config", config.to_str().unwrap(), "--symbol", "C:EURUSD"])
        .args(["--from", from, "--to", to, "--data-dir", data_dir.to_str().unwrap()])
        .env("TICKVAULT_POLYGON_API_KEY", "k");
    command
}

/// A config for the simulator at `addr`, with `backfill` settings.
fn backfill_config(dir: &Path, addr: &str, backfill: &str) -> std::path::PathBuf {
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!("[polygon]\nrest_url = \"http://{addr}\"\n[backfill]\n{backfill}"),
    )
    .unwrap();
    config
}

fn backfill_cli(config: &Path, data_dir: &Path, from: &str, to: &str) -> String {
    let out = backfill_command(config, data_dir, from, to).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[test]
fn sigkills_mid_page_leave_every_bar_in_the_log_exactly_once() {
    use rand::Rng;
    let (_simulator, addr) = common::simulator(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = backfill_config(dir.path(), &addr, "chunk = \"30days\"\nconcurrency = 1\n");
    let data = dir.path().join("log");
    let (from, to) = ("2018-01-01", "2023-12-31");
    let mut rng = rand::rng();
    let mut kills = 0;
    for _ in 0..8 {
        let mut child = common::Child(
            backfill_command(&config, &data, from, to)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1_200)));
        if child.0.try_wait().unwrap().is_none() {
            child.0.kill().unwrap();
            kills += 1;
        }
        let _ = child.0.wait();
    }
    let last = backfill_cli(&config, &data, from, to);
    assert!(kills >= 4, "only {kills} runs were killed before they finished: {last}");

    let wal = Wal::open(&data).unwrap();
    let options = SimOptions::default();
    let job = Job {
        feed: Feed::Forex,
        symbol: "EUR/USD".into(),
        // 2018-01-01T00:00Z up to the end of 2023-12-31.
        from_ms: 1_514_764_800_000,
        to_ms: 1_514_764_800_000 + 2_191 * DAY,
    };
    eprintln!("{kills} kills; the last run: {last}");
    assert_exactly_the_markets_bars(&wal, &options, &[job]);
}

#[test]
fn memory_stays_flat_as_the_range_grows_from_one_month_to_ten_years() {
    let (_simulator, addr) = common::simulator(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = backfill_config(dir.path(), &addr, "chunk = \"90days\"\n");
    let month = backfill_cli(&config, &dir.path().join("m"), "2024-01-01", "2024-01-31");
    let five_years = backfill_cli(&config, &dir.path().join("y"), "2019-01-01", "2023-12-31");
    let decade = backfill_cli(&config, &dir.path().join("d"), "2014-01-01", "2023-12-31");
    eprintln!("{month}{five_years}{decade}");
    assert!(decade.contains("3755520 bars"), "{decade}");
    let (m, y, d) = (peak_rss_mb(&month), peak_rss_mb(&five_years), peak_rss_mb(&decade));
    // One month does not fill the log's fixed budgets (96 MiB of memtables, a 32 MiB
    // block cache); a few years do. From there on memory must not grow with the range:
    // twice the bars may cost only what flush timing varies by (measured: +/- 15 MB).
    assert!(
        d * 4 <= y * 5,
        "peak RSS grew from {y} MB (5 years) to {d} MB (10 years); 1 month: {m} MB"
    );
    // The log's budgets (128 MiB) and the process around them: 163-195 MB alone, 203
    // once with the whole suite and two daemons beside it (2026-12-05).
    assert!(d < 224, "peak RSS {d} MB for 10 years");
}

#[tokio::test]
async fn the_simulators_rest_answers_match_polygons_shapes() {
    let options = SimOptions {
        api_key: Some("right".into()),
        ..SimOptions::default()
    };
    let sim = sim::spawn(any_port(), options).await.unwrap();
    let http = reqwest::Client::new();
    let base = sim.rest_url();
    let get = |path: &str, key: Option<&str>| {
        let mut request = http.get(format!("{base}{path}"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    let r = get("/v2/aggs/ticker/C:EURUSD/range/1/minute/2024-03-04/2024-03-04", None)
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (body["status"].as_str(), body["error"].as_str()),
        (Some("ERROR"), Some("API Key was not provided"))
    );
    let r = get(
        "/v2/aggs/ticker/C:EURUSD/range/1/minute/2024-03-04/2024-03-04",
        Some("wrong"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "Unknown API Key");
    let r = get(
        "/v2/aggs/ticker/O:AMC210827C00037000/range/1/day/2024-03-04/2024-03-08",
        Some("right"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "NOT_AUTHORIZED");
    assert!(body["message"].as_str().unwrap().contains("not entitled"));
    // A forex Saturday: no `results` key at all.
    let r = get(
        "/v2/aggs/ticker/C:EURUSD/range/1/minute/2024-03-09/2024-03-09",
        Some("right"),
    )
    .await
    .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["resultsCount"], 0);
    assert!(body.get("results").is_none(), "{body}");
    // Key order and fields as Polygon sends them; next_url without the key; the key
    // sent as a query parameter works too.
    let r = get(
        "/v2/aggs/ticker/X:BTCUSD/range/1/minute/2024-03-04/2024-03-04?limit=10&apiKey=right",
        None,
    )
    .await
    .unwrap();
    let text = r.text().await.unwrap();
    assert!(
        text.starts_with(
            "{\"ticker\":\"X:BTCUSD\",\"queryCount\":10,\"resultsCount\":10,\"adjusted\":true,\"results\":[{\"v\":"
        ),
        "{text}"
    );
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    let next = body["next_url"].as_str().unwrap();
    assert!(!next.contains("right") && !next.contains("apiKey"), "{next}");
    // Ten bars read: the next page starts at the eleventh minute.
    assert!(next.contains("/minute/1709511000000/2024-03-04?cursor="), "{next}");
    assert_eq!(body["results"][0]["t"], 1_709_510_400_000i64);
    // Descending order walks backwards.
    let r = get(
        "/v2/aggs/ticker/X:BTCUSD/range/1/minute/2024-03-04/2024-03-04?limit=3&sort=desc",
        Some("right"),
    )
    .await
    .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    let ts: Vec<i64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["t"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ts,
        vec![
            1_709_510_400_000 + 1439 * 60_000,
            1_709_510_400_000 + 1438 * 60_000,
            1_709_510_400_000 + 1437 * 60_000
        ]
    );
    sim.stop().await.unwrap();
}

/// A job over the last `hours` up to `ahead_ms` past the present.
fn recent_job(hours: i64, ahead_ms: i64) -> Job {
    let now = tickvault::event::now_ms();
    Job {
        feed: Feed::Crypto,
        symbol: "BTC-USD".into(),
        from_ms: now - hours * 3_600_000,
        to_ms: now + ahead_ms,
    }
}

#[tokio::test]
async fn a_range_into_the_future_is_downloaded_up_to_the_present_and_later_minutes_are_fetched_later() {
    let sim = sim::spawn(any_port(), SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    // Three days ahead in 2-day chunks: at least one chunk lies wholly in the future,
    // whatever the day.
    let job = recent_job(2, 3 * DAY);
    let mut s = spec(&sim, 50_000);
    s.chunk = Duration::from_secs(2 * 86_400);
    let asked_at = tickvault::event::now_ms();
    let stats = download(&wal, s.clone(), std::slice::from_ref(&job)).await;
    let now = tickvault::event::now_ms();
    let periods = backfill::periods(wal.reader()).unwrap();
    // No period claims a minute past the present, and a chunk wholly ahead of it is not
    // in the tracker at all.
    for p in &periods {
        assert!(p.resume_from_ms <= now, "claimed past the present {now}: {p:?}");
        assert!(p.start_ms <= now, "a period of the future: {p:?}");
    }
    // The period holding the present is not done: only up to the present minute was
    // there to download.
    let period = periods
        .iter()
        .find(|p| p.start_ms <= asked_at && asked_at < p.end_ms)
        .unwrap_or_else(|| panic!("no period holds the present {asked_at}: {periods:?}"));
    assert_ne!(period.state, PeriodState::Downloaded, "{period:?}");
    assert!(stats.periods_ahead.load(Ordering::Relaxed) >= 1, "{stats:?}");
    // A later pass asks again from there (and finds the minutes that ended meanwhile).
    let before = stats.requests.load(Ordering::Relaxed);
    let again = download(&wal, s, std::slice::from_ref(&job)).await;
    assert!(
        again.requests.load(Ordering::Relaxed) >= 1,
        "the rest was never asked for"
    );
    assert!(before >= 1);
    let got = bars(&wal);
    assert!(got.values().all(|(n, _)| *n == 1), "a bar was appended twice");
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn a_delayed_answer_marks_downloaded_only_up_to_its_last_bar() {
    let options = SimOptions {
        faults: Faults {
            delayed: Some(Duration::from_secs(15 * 60)),
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let sim = sim::spawn(any_port(), options).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    // Up to the present minute: the plan serves all but its last 15 minutes.
    let now = tickvault::event::now_ms();
    let job = Job {
        to_ms: now.div_euclid(MINUTE_MS) * MINUTE_MS,
        ..recent_job(2, 0)
    };
    let stats = download(&wal, spec(&sim, 50_000), std::slice::from_ref(&job)).await;
    let last_bar = bars(&wal).keys().map(|(_, t)| *t).max().unwrap();
    assert!(last_bar <= now - 15 * MINUTE_MS, "a bar inside the delay");
    // A period with minutes after the last bar is not done (one that ends with it is:
    // the 15 minutes after a chunk's end).
    for p in backfill::periods(wal.reader()).unwrap() {
        if p.end_ms > last_bar + MINUTE_MS {
            assert_ne!(p.state, PeriodState::Downloaded, "{p:?}");
            assert_eq!(
                p.resume_from_ms,
                last_bar + MINUTE_MS,
                "claimed past the last bar: {p:?}"
            );
        }
    }
    assert_eq!(stats.periods_failed.load(Ordering::Relaxed), 0);
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn an_http_200_with_an_error_body_is_retried_and_never_marks_a_period_done() {
    // Every answer is an error in a 200: nothing is ever data.
    let options = SimOptions {
        faults: Faults {
            error_200_every: 1,
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let sim = sim::spawn(any_port(), options).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let mut s = spec(&sim, 50_000);
    s.max_attempts = 3;
    let stats = download(&wal, s, &[job(Feed::Crypto, "BTC-USD", 1)]).await;
    assert_eq!(stats.requests.load(Ordering::Relaxed), 3, "{stats:?}");
    assert_eq!(stats.periods_failed.load(Ordering::Relaxed), 1, "{stats:?}");
    assert_eq!(stats.periods_done.load(Ordering::Relaxed), 0, "{stats:?}");
    assert!(backfill::periods(wal.reader())
        .unwrap()
        .iter()
        .all(|p| p.state != PeriodState::Downloaded));
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn a_next_url_that_does_not_parse_leaves_its_period_pending_and_the_downloader_goes_on() {
    let options = SimOptions {
        faults: Faults {
            bad_next_every: 1,
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let sim = sim::spawn(any_port(), options).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    // Pages of 700 bars: every first page's next_url is bad.
    let jobs = [job(Feed::Crypto, "BTC-USD", 4)];
    let stats = download(&wal, spec(&sim, 700), &jobs).await;
    assert_eq!(stats.periods_failed.load(Ordering::Relaxed), 2, "{stats:?}");
    // What the first pages held is in the log, and the tracker says so.
    assert_eq!(bars(&wal).len(), 2 * 700);
    for p in backfill::periods(wal.reader()).unwrap() {
        assert_ne!(p.state, PeriodState::Downloaded);
        assert_eq!(p.bars, 700);
    }
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn a_retry_after_given_as_an_http_date_is_honoured() {
    let options = SimOptions {
        faults: Faults {
            burst_429: 1,
            retry_after_date: true,
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let sim = sim::spawn(any_port(), options.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let jobs = [job(Feed::Crypto, "ETH-USD", 1)];
    let started = std::time::Instant::now();
    let stats = download(&wal, spec(&sim, 50_000), &jobs).await;
    assert!(stats.rate_limited.load(Ordering::Relaxed) >= 1, "{stats:?}");
    // The date is 1-2 s ahead; read as no Retry-After at all, a 429 waits 60 s.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited {:?}: the date was not read",
        started.elapsed()
    );
    assert_exactly_the_markets_bars(&wal, &options, &jobs);
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn a_period_that_gave_up_is_fetched_by_the_next_pass_while_the_daemon_runs() {
    // Every second answer is an error: with one attempt per request, one of the two
    // periods gives up in the first pass.
    let options = SimOptions {
        faults: Faults {
            error_200_every: 2,
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let sim = sim::spawn(any_port(), options.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let mut s = spec(&sim, 50_000);
    s.max_attempts = 1;
    let jobs = [job(Feed::Crypto, "BTC-USD", 4)];
    let stats = Arc::new(BackfillStats::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let downloader = Downloader::new(s, wal.clone(), stats.clone()).unwrap();
    let each_pass = jobs.to_vec();
    let passes = tokio::spawn(async move {
        downloader
            .run_every(|| each_pass.clone(), Duration::from_millis(200), shutdown)
            .await
    });
    let started = std::time::Instant::now();
    while stats.passes.load(Ordering::Relaxed) < 2 {
        assert!(started.elapsed() < Duration::from_secs(30), "{stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    passes.await.unwrap().unwrap();
    assert!(backfill::periods(wal.reader())
        .unwrap()
        .iter()
        .all(|p| p.state == PeriodState::Downloaded));
    assert_exactly_the_markets_bars(&wal, &options, &jobs);
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}
