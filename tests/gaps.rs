//! `tickvault gaps` against logs the daemon wrote from the simulator: source holes told
//! from gaps, a range the backfill never fetched named as open gaps, and the coverage
//! index made again from the log by `--rebuild`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::sinks::Daemon;

/// The simulator's `holes=N`: about one minute in N of a symbol has no bar at the source.
const HOLE_EVERY: u32 = 97;

fn config(dir: &Path, lookback: &str) -> std::path::PathBuf {
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[live]\nenabled = false\n[backfill]\nforex = [\"EUR/USD\"]\ncrypto = [\"BTC-USD\"]\nlookback = \"{lookback}\"\nchunk = \"1day\"\n\
             [gaps]\nlookback = \"{lookback}\"\n[calendar]\nforex = \"always\"\n"
        ),
    )
    .unwrap();
    path
}

fn gaps(config: &Path, log: &Path, more: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    common::json_output(
        common::tickvault()
            .args([
                "gaps",
                "--json",
                "--config",
                config.to_str().unwrap(),
                "--data-dir",
                log.to_str().unwrap(),
            ])
            .args(more),
    )
}

/// The part of `gaps --json`'s report about symbol `name`.
fn symbol<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    common::sinks::entry(report, "symbols", "symbol", name)
}

/// A log with two days of EUR/USD and BTC-USD bars from a simulator with holes.
fn captured(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (_sim, addr) = common::simulator(&["--always-open", "--faults", &format!("holes={HOLE_EVERY}")]);
    let log = dir.join("log");
    let config = config(dir, "2days");
    let daemon = Daemon::start(&config, &log, &addr, &dir.join("daemon.stderr"));
    daemon.wait_for_backfill(Duration::from_secs(60));
    daemon.stop();
    (config, log)
}

#[test]
fn source_holes_are_marked_as_such_and_a_complete_download_has_no_open_gap() {
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = captured(dir.path());
    let (code, report, stderr) = gaps(&config, &log, &[]);
    assert_eq!(code, Some(0), "{report:#} {stderr}");
    assert_eq!(report["open_gaps"], 0);
    for name in ["EUR/USD", "BTC-USD"] {
        let s = symbol(&report, name);
        let (market, covered, holes) = (
            s["market_minutes"].as_u64().unwrap(),
            s["covered"].as_u64().unwrap(),
            s["source_holes"].as_u64().unwrap(),
        );
        assert_eq!(covered + holes, market, "{s:#}");
        // Exactly the minutes the simulator's market leaves out.
        let sim = tickvault::sim::Market::new(1, 120, HOLE_EVERY);
        let (from, to) = (s["from_ms"].as_i64().unwrap(), s["to_ms"].as_i64().unwrap());
        let expected = (from..to).step_by(60_000).filter(|m| sim.is_hole(name, *m)).count() as u64;
        assert_eq!(holes, expected, "{s:#}");
        assert!(holes > 10, "{s:#}");
    }
}

#[test]
fn minutes_the_backfill_never_fetched_are_open_gaps_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = captured(dir.path());
    // Four days back, where the two-day backfill never went.
    let since = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(96)).to_string();
    let (code, report, _) = gaps(&config, &log, &["--since", &since, "--symbol", "C:EURUSD"]);
    assert_eq!(code, Some(1), "{report:#}");
    let s = symbol(&report, "EUR/USD");
    assert_eq!(report["symbols"].as_array().unwrap().len(), 1);
    let open = s["gaps"].as_array().unwrap();
    assert_eq!(open.len(), 1, "{s:#}");
    let minutes = open[0]["minutes"].as_u64().unwrap();
    assert!((2 * 1440 - 5..=2 * 1440 + 5).contains(&minutes), "{s:#}");
    assert_eq!(open[0]["why"], "no bar");
    // No backfill period covers it: the daemon's next repair fetches it.
    assert_eq!(open[0]["state"], "waiting", "{s:#}");
    // The text form says so too.
    let out = common::tickvault()
        .args([
            "gaps",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            log.to_str().unwrap(),
        ])
        .args(["--since", &since])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains("forex   EUR/USD    1m:")
            && text.contains("1 open gaps")
            && text.contains("no bar; waiting for the next repair")
            && text.contains("open gaps: exit 1"),
        "{text}"
    );

    // With `gaps.lookback` four days, the daemon fetches the two days before the
    // backfill's first period by itself.
    let (_sim, addr) = common::simulator(&["--always-open", "--faults", &format!("holes={HOLE_EVERY}")]);
    let longer = dir.path().join("longer.toml");
    std::fs::write(
        &longer,
        std::fs::read_to_string(&config).unwrap().replace(
            "[gaps]\nlookback = \"2days\"",
            "[gaps]\nlookback = \"4days\"\ninterval = \"1s\"",
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&longer, &log, &addr, &dir.path().join("daemon.stderr"));
    common::sinks::wait_for("the older days repaired", Duration::from_secs(120), || {
        gaps(&longer, &log, &[]).0 == Some(0)
    });
    daemon.stop();
    let (_, report, _) = gaps(&longer, &log, &[]);
    for name in ["EUR/USD", "BTC-USD"] {
        let s = symbol(&report, name);
        let market = s["market_minutes"].as_u64().unwrap();
        assert!(market > 4 * 1440 - 10, "{s:#}");
        assert_eq!(
            s["covered"].as_u64().unwrap() + s["source_holes"].as_u64().unwrap(),
            market,
            "{s:#}"
        );
    }
}

#[test]
fn a_lost_coverage_index_is_rebuilt_from_the_log_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = captured(dir.path());
    let (_, before, _) = gaps(&config, &log, &[]);
    tickvault_wal::clear_space_for_test(&log, tickvault_wal::Space::Coverage).unwrap();
    let (code, lost, _) = gaps(&config, &log, &[]);
    assert_eq!(code, Some(1), "an empty index: every minute is a gap");
    assert_eq!(symbol(&lost, "EUR/USD")["covered"], 0);
    let (code, rebuilt, stderr) = gaps(&config, &log, &["--rebuild"]);
    assert_eq!(code, Some(0), "{rebuilt:#} {stderr}");
    assert!(stderr.contains("coverage index rebuilt"), "{stderr}");
    for name in ["EUR/USD", "BTC-USD"] {
        let (a, b) = (symbol(&before, name), symbol(&rebuilt, name));
        for field in ["covered", "source_holes"] {
            assert_eq!(a[field], b[field], "{name} {field}");
        }
    }
}

#[test]
fn bad_arguments_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "2days");
    for (args, says) in [
        (vec!["--symbol", "GBP/USD"], "captures no minute bars of it"),
        (vec!["--symbol", "not a symbol"], "not a symbol"),
        (vec!["--since", "last week"], "neither a date"),
    ] {
        let out = common::tickvault()
            .args(["gaps", "--config", config.to_str().unwrap()])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// Repair without a person: a live-only symbol's feed cut for over a minute (a relay that
/// breaks the connection and refuses new ones), so the minute aggregates of the cut are
/// never received; after the reconnect the daemon finds the gap in its coverage index and
/// fetches those minutes' bars from the REST API (not through the relay), and `gaps`
/// exits 0 while the daemon still runs.
#[test]
fn a_live_feed_cut_for_over_a_minute_is_repaired_by_the_daemon_itself() {
    use tickvault::sim::relay::Relay as Proxy;
    let dir = tempfile::tempdir().unwrap();
    let (_sim, addr) = common::simulator(&["--always-open"]);
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let relay = Proxy::start(port).unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[live]\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nstale_after = \"5s\"\n\
         [live.crypto]\nsymbols = [\"BTC-USD\"]\nchannels = [\"XA\"]\n[backfill]\nenabled = false\n\
         [gaps]\ninterval = \"2s\"\n",
    )
    .unwrap();
    let log = dir.path().join("log");
    let stderr = dir.path().join("daemon.stderr");
    let mut command = common::run_command(&config, &log, &addr, "k");
    command
        .env("TICKVAULT_POLYGON_WS_URL", format!("ws://127.0.0.1:{}", relay.port))
        .stderr(std::fs::File::create(&stderr).unwrap());
    let _daemon = common::Child(command.spawn().unwrap());
    let report = || gaps(&config, &log, &[]);
    // The first minute aggregate marks where the symbol's minutes begin.
    wait_for_first_bar(&log, &stderr);
    let cut_ms = tickvault::event::now_ms();
    relay.cut();
    std::thread::sleep(Duration::from_secs(75));
    relay.restore();
    let restored = std::time::Instant::now();
    let restored_ms = tickvault::event::now_ms();
    // Every minute that closed while the feed was down is fetched right after the
    // reconnect, the last one too (not once it is older than the 65 s `gaps` leaves).
    let missed = (cut_ms / 60_000 * 60_000..restored_ms / 60_000 * 60_000).step_by(60_000);
    let all_in = || {
        let Ok(reader) = tickvault_wal::Wal::open_read_only(&log) else {
            return false;
        };
        let (first, last) = (cut_ms / 86_400_000, restored_ms / 86_400_000);
        let bars = tickvault::coverage::Coverage::read(
            &reader,
            tickvault::coverage::Mark::Bar,
            tickvault::event::Feed::Crypto,
            "BTC-USD",
            first,
            last,
        );
        bars.is_ok_and(|bars| missed.clone().all(|m| bars.has(m)))
    };
    common::sinks::wait_for("the missed minutes in the log", Duration::from_secs(30), all_in);
    eprintln!(
        "figure: the cut's {} minutes in the log {:.2} s after the relay was restored (the reconnect included)",
        missed.clone().count(),
        restored.elapsed().as_secs_f64()
    );
    // Repaired within the interval once the cut's minutes have closed (`gaps` and the
    // repair both leave the last 65 s alone).
    common::sinks::wait_for("no open gap over the cut", Duration::from_secs(180), || {
        let (code, r, _) = report();
        code == Some(0) && symbol(&r, "BTC-USD")["to_ms"].as_i64().unwrap_or(0) >= restored_ms
    });
    let (_, after, _) = report();
    let s = symbol(&after, "BTC-USD");
    assert!(s["covered"].as_u64().unwrap() >= 2, "{s:#}");
    let said = std::fs::read_to_string(&stderr).unwrap();
    assert!(said.contains("fetching a gap"), "the daemon fetched it: {said}");
    // The repaired bars are in the backfill lane.
    let reader = tickvault_wal::Wal::open_read_only(&log).unwrap();
    assert!(reader.last_seq(tickvault_wal::Lane::Backfill).unwrap().unwrap_or(0) >= 1);
}

/// Waits for the live lane's first minute bar, which marks where a live-only symbol's
/// minutes begin. Up to three minute closes: one may bring none (a source hole, or a
/// disconnect across the close), and CI saw a 90 s wait run out that way.
fn wait_for_first_bar(log: &Path, stderr: &Path) {
    common::sinks::wait_for_showing(
        "the first minute aggregate",
        Duration::from_secs(200),
        || first_bar_seen(log),
        || {
            format!(
                "the daemon said:\n{}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            )
        },
    );
}

/// Whether the live lane holds a minute bar yet.
fn first_bar_seen(log: &Path) -> bool {
    let Ok(reader) = tickvault_wal::Wal::open_read_only(log) else {
        return false;
    };
    let mut seen = false;
    let _ = reader.scan(tickvault_wal::Lane::Live, 0, u64::MAX, |_, r| {
        if let Ok(r) = r {
            if let Ok(e) = tickvault::event::Event::from_payload(r.payload) {
                seen |= matches!(e.body, tickvault::event::Body::Bar(_));
            }
        }
        !seen
    });
    seen
}

/// The repair drill: the simulator with source holes and disconnects, a live
/// feed cut for 150 s behind a relay while the daemon runs, then the daemon SIGKILLed
/// for 70 s; BTC-USD captured live and backfilled. At the end `gaps` exits 0, every hole of the source is marked as one and
/// none was fetched twice, the derived lane equals its rebuild, and `verify` finds
/// every sink holding every event of the log.
#[test]
fn holes_disconnects_a_cut_and_a_long_sigkill_are_all_repaired() {
    use common::sinks::{caught_up, verify, write_config, Target};
    use tickvault::sim::relay::Relay as Proxy;
    const NATS: u16 = 4222;
    let target = Target::new("repair_drill");
    let dir = tempfile::tempdir().unwrap();
    let (_sim, addr) = common::simulator(&["--always-open", "--faults", "holes=13,disconnect=45s"]);
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let relay = Proxy::start(port).unwrap();
    let config = write_config(
        &dir.path().join("c.toml"),
        "[live]\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nstale_after = \"5s\"\n\
         [live.crypto]\nsymbols = [\"BTC-USD\"]\nchannels = [\"XT\", \"XA\"]\n\
         [backfill]\nforex = [\"EUR/USD\"]\ncrypto = [\"BTC-USD\"]\nlookback = \"1day\"\nchunk = \"1day\"\n\
         [calendar]\nforex = \"always\"\n[gaps]\ninterval = \"2s\"\nlookback = \"1day\"\n[aggregate]\ninterval = \"500ms\"\n",
        &target,
        NATS,
    );
    let log = dir.path().join("log");
    let stderr = dir.path().join("daemon.stderr");
    let start = || {
        let mut command = common::run_command(&config, &log, &addr, "k");
        command
            .env("TICKVAULT_POLYGON_WS_URL", format!("ws://127.0.0.1:{}", relay.port))
            .env("TICKVAULT_POSTGRES_PASSWORD", common::sinks::PG_PASSWORD)
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&stderr)
                    .unwrap(),
            );
        common::Child(command.spawn().unwrap())
    };
    let mut daemon = start();
    wait_for_first_bar(&log, &stderr);
    relay.cut();
    std::thread::sleep(Duration::from_secs(150));
    relay.restore();
    std::thread::sleep(Duration::from_secs(10));
    // SIGKILL, and nothing runs for 70 s: the minutes of that time are missed too.
    let pid = daemon.0.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap()
        .success());
    let _ = daemon.0.wait();
    std::thread::sleep(Duration::from_secs(70));
    let restarted_ms = tickvault::event::now_ms();
    daemon = start();
    let mut last = serde_json::Value::Null;
    let repaired = common::sinks::waited_for(Duration::from_secs(240), || {
        let (code, r, _) = gaps(&config, &log, &[]);
        let done = code == Some(0) && symbol(&r, "BTC-USD")["to_ms"].as_i64().unwrap_or(0) >= restarted_ms;
        last = r;
        done
    });
    assert!(
        repaired,
        "gaps still open 240 s after the restart: {last:#}\n{}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    common::sinks::wait_for("the sinks to catch up", Duration::from_secs(120), || caught_up(&log));
    daemon.0.kill().unwrap();
    let _ = daemon.0.wait();

    let (_, report, _) = gaps(&config, &log, &[]);
    let sim = tickvault::sim::Market::new(1, 120, 13);
    for name in ["EUR/USD", "BTC-USD"] {
        let s = symbol(&report, name);
        let (from, to) = (s["from_ms"].as_i64().unwrap(), s["to_ms"].as_i64().unwrap());
        let expected = (from..to).step_by(60_000).filter(|m| sim.is_hole(name, *m)).count() as u64;
        assert_eq!(s["source_holes"].as_u64().unwrap(), expected, "{name}: {s:#}");
        assert_eq!(
            s["covered"].as_u64().unwrap() + expected,
            s["market_minutes"].as_u64().unwrap(),
            "{s:#}"
        );
    }
    // No minute fetched twice: the daemon's repairs never overlap.
    let said = std::fs::read_to_string(&stderr).unwrap();
    let mut fetched: Vec<(String, i64, i64)> = said
        .lines()
        .filter(|l| l.contains("fetching a gap"))
        .map(|l| {
            let field = |name: &str| -> String {
                let at = l.find(&format!("{name}=")).unwrap_or_else(|| panic!("{name} in {l}")) + name.len() + 1;
                l[at..].split_whitespace().next().unwrap().trim_matches('"').to_owned()
            };
            (
                field("symbol"),
                field("from_ms").parse().unwrap(),
                field("to_ms").parse().unwrap(),
            )
        })
        .collect();
    assert!(!fetched.is_empty(), "the daemon fetched the cut: {said}");
    fetched.sort();
    for pair in fetched.windows(2) {
        let ((a, _, a_to), (b, b_from, _)) = (&pair[0], &pair[1]);
        assert!(a != b || a_to <= b_from, "fetched twice: {pair:?}");
    }
    // BTC-USD is backfilled too: the cut's minutes past the backfill's frontier were
    // fetched by a repair, and the restart's backfill pass left them out: each bar of
    // the backfill lane is there once.
    let reader = tickvault_wal::Wal::open_read_only(&log).unwrap();
    let mut seen = std::collections::HashSet::new();
    reader
        .scan(tickvault_wal::Lane::Backfill, 0, u64::MAX, |_, r| {
            if let Ok(e) = tickvault::event::Event::from_payload(r.unwrap().payload) {
                let key = e.natural_key();
                assert!(seen.insert(key.clone()), "{key} twice in the backfill lane");
            }
            true
        })
        .unwrap();
    drop(reader);
    // The derived lane is its journal's, and every sink holds every event of the log.
    let out = common::tickvault()
        .args(["aggregate", "--check", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let (code, verified) = verify(&config, &log);
    assert_eq!(code, 0, "{verified:#}");
    // The derived lane among them (tests/derived.rs holds the sinks to its versions).
    for sink in verified["sinks"].as_array().unwrap() {
        assert!(sink["cursors"]["derived"].as_u64().unwrap() > 0, "{sink:#}");
    }
}

/// A backfill period becomes verified once every sink holds every key of it; a row lost
/// by one sink later un-verifies it (a warning names the sink), and the row sent again
/// by `tickvault replay` makes it verified again.
#[test]
fn periods_are_verified_only_while_every_sink_holds_every_key_of_them() {
    use common::sinks::{postgres, rt, write_config, Target, PG_PASSWORD};
    let target = Target::new("verified_periods");
    let dir = tempfile::tempdir().unwrap();
    let (_sim, addr) = common::simulator(&["--always-open", "--faults", "holes=13"]);
    let config = write_config(
        &dir.path().join("c.toml"),
        "[live]\nenabled = false\n[backfill]\ncrypto = [\"BTC-USD\"]\nlookback = \"2days\"\nchunk = \"1day\"\n\
         [gaps]\nlookback = \"2days\"\ninterval = \"1s\"\nrecheck = \"2s\"\n",
        &target,
        4222,
    );
    let log = dir.path().join("log");
    let daemon = Daemon::start(&config, &log, &addr, &dir.path().join("daemon.stderr"));
    let periods = || {
        let (code, report, stderr) = gaps(&config, &log, &[]);
        assert_eq!(code, Some(0), "{report:#} {stderr}");
        let p = &report["periods"];
        [&p["pending"], &p["downloaded"], &p["verified"]].map(|n| n.as_u64().unwrap())
    };
    common::sinks::wait_for("every period verified", Duration::from_secs(120), || {
        let [pending, downloaded, verified] = periods();
        daemon.backfill_finished() && pending + downloaded == 0 && verified >= 2
    });
    let [_, _, total] = periods();

    // PostgreSQL loses one bar of the backfill (the first or the last).
    let lose_one = |order: &str| {
        let sql = format!(
            "DELETE FROM events WHERE ctid = (SELECT ctid FROM events WHERE kind = 'bar' ORDER BY ts_ms {order} LIMIT 1)"
        );
        let lost = rt().block_on(async { postgres(&target.name).await.execute(&sql, &[]).await.unwrap() });
        assert_eq!(lost, 1);
    };
    lose_one("ASC");
    common::sinks::wait_for("the period un-verified", Duration::from_secs(30), || {
        periods() == [0, 1, total - 1]
    });
    let said = daemon.log();
    assert!(
        said.lines()
            .any(|l| l.contains("a verified backfill period is short in a sink") && l.contains("postgres")),
        "{said}"
    );

    // Sent again from the log: verified again.
    let out = common::tickvault()
        .args(["replay", "--sink", "postgres", "--lane", "backfill", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&log)
        .env("TICKVAULT_POSTGRES_PASSWORD", PG_PASSWORD)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    common::sinks::wait_for("the period verified again", Duration::from_secs(30), || {
        periods() == [0, 0, total]
    });
    daemon.stop();

    // With the daemon stopped, `verify` finds the next loss itself and un-verifies.
    lose_one("DESC");
    let (code, report) = common::sinks::verify(&config, &log);
    assert_eq!(code, 1, "{report:#}");
    let postgres_report = common::sinks::sink_report(&report, "postgres");
    let short = postgres_report["verified_periods_short"].as_array().unwrap();
    assert_eq!(short.len(), 1, "{postgres_report:#}");
    assert_eq!(
        (&short[0]["missing"], &short[0]["unverified"]),
        (&1.into(), &true.into())
    );
    assert_eq!(periods(), [0, 1, total - 1]);
}
