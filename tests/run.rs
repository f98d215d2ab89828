//! `tickvault run` and `tickvault demo` as a user runs them: real processes, real sockets.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tickvault::event::Event;
use tickvault_wal::{Lane, Wal};

mod common;

use common::{run_command, simulator, tickvault, Child};

#[test]
fn run_captures_live_and_backfill_and_stops_cleanly_on_sigterm() {
    let (_sim, addr) = simulator(&[
        "--api-key",
        "secret-key",
        "--always-open",
        "--quotes-per-minute",
        "1200",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        "[live.forex]\nsymbols = [\"EUR/USD\"]\nchannels = [\"C\"]\n[live.crypto]\nsymbols = [\"X:BTC-USD\"]\nchannels = [\"XQ\", \"XT\"]\n\
         [backfill]\ncrypto = [\"ETH-USD\"]\nlookback = \"3days\"\nchunk = \"1day\"\n",
    )
    .unwrap();
    let log = dir.path().join("log");
    let mut daemon = Child(
        run_command(&config, &log, &addr, "secret-key")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(4));
    let pid = daemon.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (status, _) = exits_within(&mut daemon, Duration::from_secs(15));
    let mut stderr = String::new();
    daemon.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("log synced"), "{stderr}");
    assert!(!stderr.contains("secret-key"), "the API key was logged");

    let wal = Wal::open_read_only(&log).unwrap();
    let live = wal.read(Lane::Live, 0, usize::MAX).unwrap();
    let backfill = wal.read(Lane::Backfill, 0, usize::MAX).unwrap();
    assert!(live.corrupt.is_empty() && backfill.corrupt.is_empty());
    let feeds: std::collections::BTreeSet<String> = live
        .records
        .iter()
        .map(|r| Event::from_payload(&r.payload).unwrap().capture.feed.to_string())
        .collect();
    assert_eq!(feeds.into_iter().collect::<Vec<_>>(), vec!["crypto", "forex"]);
    // Three days of crypto minute bars, every minute.
    assert!(backfill.records.len() >= 3 * 1440, "{} bars", backfill.records.len());
}

/// At `TICKVAULT_LOG=trace` the WebSocket library prints the auth frame it sends and the
/// HTTP client its requests: the key is in none of the lines, whoever wrote them.
#[test]
fn the_api_key_is_in_no_line_of_a_run_at_trace() {
    const KEY: &str = "pk-trace-7f3a9d1e";
    let (_sim, addr) = simulator(&["--api-key", KEY, "--always-open"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        "[live.crypto]\nsymbols = [\"BTC-USD\"]\nchannels = [\"XQ\"]\n\
         [backfill]\ncrypto = [\"ETH-USD\"]\nlookback = \"1day\"\nchunk = \"1day\"\n",
    )
    .unwrap();
    let log = dir.path().join("log");
    let mut daemon = Child(
        run_command(&config, &log, &addr, KEY)
            .env("TICKVAULT_LOG", "trace")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Read as it comes: at trace the pipe fills in moments.
    let mut pipe = daemon.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        pipe.read_to_end(&mut out).unwrap();
        String::from_utf8_lossy(&out).into_owned()
    });
    std::thread::sleep(Duration::from_secs(3));
    let pid = daemon.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (status, _) = exits_within(&mut daemon, Duration::from_secs(15));
    let stderr = reader.join().unwrap();
    assert!(status.success(), "{status}");
    // Trace was on, for the WebSocket and HTTP clients too, and the session authenticated.
    assert!(stderr.contains("TRACE"), "no trace lines");
    assert!(stderr.contains("tungstenite"), "no WebSocket trace lines");
    assert!(stderr.contains("live feed subscribed"), "never subscribed");
    let leaks: Vec<&str> = stderr.lines().filter(|l| l.contains(KEY)).take(3).collect();
    assert!(leaks.is_empty(), "the API key was logged: {leaks:#?}");
}

#[test]
fn demo_runs_for_its_duration_and_summarises_what_it_captured() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = demo("4", &dir.path().join("log"));
    for expected in [
        "live",
        "backfill",
        "summary after",
        "captured (in the log, durable)",
        "check:",
        "- clean",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
    assert!(stdout.contains("crypto  BTC-USD"), "{stdout}");
    // Through a pipe: a plain line a second, no terminal control sequences.
    assert!(
        stdout.lines().filter(|l| l.contains("s | live ")).count() >= 3,
        "{stdout}"
    );
    assert!(!stdout.contains('\x1b'), "{stdout}");
}

/// `tickvault demo --duration SECS --data-dir LOG` from the repository's root (where its
/// config/ is): what it printed, once it has exited 0.
fn demo(secs: &str, log: &std::path::Path) -> String {
    let out = tickvault()
        .args(["demo", "--duration", secs, "--data-dir", log.to_str().unwrap()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The demo cuts its live feeds across a minute's close (a relay between the daemon and
/// its simulator), and the daemon finds and fetches the minute it missed by itself: at
/// the end `tickvault gaps` finds no open gap.
#[test]
fn the_demo_stages_an_outage_and_the_daemon_repairs_what_it_missed() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    // 71 s: the shortest run that holds a minute's close to cut across, whatever the start.
    let stdout = demo("71", &log);
    for said in [
        "outage: ahead: the feeds are cut at ",
        "outage: NOW: the feeds are cut until ",
        "missed; repaired by the daemon ",
    ] {
        assert!(stdout.contains(said), "no {said:?} in:\n{stdout}");
    }
    let fetched: u64 = stdout
        .lines()
        .find_map(|l| l.split_once("gaps fetched by the daemon (after disconnects and every `gaps.interval`): "))
        .and_then(|(_, n)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count of gaps fetched in:\n{stdout}"));
    assert!(fetched >= 1, "{stdout}");
    assert!(stdout.contains(" 0 open gaps (0 minutes)"), "{stdout}");
    let gaps = tickvault()
        .args([
            "gaps",
            "--config",
            "config/demo.toml",
            "--data-dir",
            log.to_str().unwrap(),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(gaps.status.code(), Some(0), "{}", String::from_utf8_lossy(&gaps.stdout));
}

/// The demo under tmux at `width` columns: (the screen mid-run, row by row as shown,
/// the whole pane at the end with wrapped lines joined, the exit code).
fn demo_on_a_terminal(width: u16, ctrl_c: bool) -> (String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let session = format!("tickvault-demo-{}-{width}", std::process::id());
    let exit = dir.path().join("exit");
    let command = format!(
        "TICKVAULT_METRICS_LISTEN=127.0.0.1:0 {} demo {} --data-dir {}; echo $? > {}; sleep 120",
        env!("CARGO_BIN_EXE_tickvault"),
        if ctrl_c { "" } else { "--duration 6" },
        dir.path().join("log").display(),
        exit.display()
    );
    let tmux = |args: &[&str]| {
        let out = std::process::Command::new("tmux").args(args).output().expect("tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let size = (width.to_string(), "60".to_owned());
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        &size.0,
        "-y",
        &size.1,
        &command,
    ]);
    std::thread::sleep(Duration::from_secs(4));
    let mid = tmux(&["capture-pane", "-p", "-t", &session]);
    if ctrl_c {
        tmux(&["send-keys", "-t", &session, "C-c"]);
    }
    let started = Instant::now();
    while !exit.exists() && started.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(300));
    let end = tmux(&["capture-pane", "-p", "-J", "-S", "-500", "-t", &session]);
    tmux(&["kill-session", "-t", &session]);
    let code = std::fs::read_to_string(&exit).unwrap_or_default().trim().to_owned();
    (mid, end, code)
}

#[test]
fn the_demo_on_a_terminal_redraws_its_rows_in_place_within_80_and_120_columns() {
    for width in [80u16, 120] {
        let (mid, end, code) = demo_on_a_terminal(width, false);
        for row in [
            "/ 6s | log ",
            "  forex     ",
            "  crypto    ",
            "  backfill  █",
            "  live first: ",
        ] {
            assert!(mid.contains(row), "{width} columns: no {row:?} mid-run:\n{mid}");
        }
        // Nothing wrapped: every row shown starts as the demo starts its lines (a
        // wrapped line's second row would start mid-text), and none fills the width.
        for line in mid.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                line.starts_with("  ") || line.starts_with("tickvault demo"),
                "{width} columns: a wrapped line:\n{mid}"
            );
            let shown = line.trim_end().chars().count();
            assert!(shown < usize::from(width), "{width} columns: a row of {shown}:\n{mid}");
        }
        // Redrawn in place: one header row, not one per second.
        assert_eq!(mid.matches("/ 6s | log ").count(), 1, "{mid}");
        assert!(end.contains("summary after") && end.contains("- clean"), "{end}");
        assert_eq!(code, "0", "{width} columns: exit code\n{end}");
    }
    // Ctrl-C stops it early: the last state once (no row left twice), the summary, exit 0.
    let (_, end, code) = demo_on_a_terminal(100, true);
    assert_eq!(end.matches("| Ctrl-C stops").count(), 1, "{end}");
    assert!(end.contains("summary after") && end.contains("- clean"), "{end}");
    assert_eq!(code, "0", "{end}");
}

#[test]
fn a_bad_config_stops_run_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[live.forex]\nsymbols = [\"EUR/USD\"]\nchannels = [\"Z\"]\n").unwrap();
    let out = tickvault()
        .args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            dir.path().join("log").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("live.forex.channels[0]"));
    assert!(
        !dir.path().join("log").exists(),
        "a log was created for a config that failed"
    );
}

/// `tickvault run` on a fresh log with `config`, against the simulator at `addr`.
fn run_daemon(config: &std::path::Path, log: &std::path::Path, addr: &str, key: &str) -> Child {
    Child(run_command(config, log, addr, key).spawn().unwrap())
}

#[test]
fn an_enabled_sink_that_never_answered_holds_back_truncation_from_its_first_start() {
    let (_sim, addr) = simulator(&["--always-open", "--quotes-per-minute", "3000"]);
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: the sink is never reached.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let capture = "[log]\nretention = \"1s\"\ntruncate_every = \"1s\"\n\
                   [live.forex]\nsymbols = [\"EUR/USD\"]\nchannels = [\"C\"]\n";
    let with_sink = dir.path().join("with-sink.toml");
    std::fs::write(
        &with_sink,
        format!("{capture}[sinks.clickhouse]\nenabled = true\nurl = \"http://{dead}\"\n"),
    )
    .unwrap();
    // The same capture with no sink: retention alone governs its log, and truncates it.
    let without = dir.path().join("without.toml");
    std::fs::write(&without, capture).unwrap();
    let (log_sink, log_none) = (dir.path().join("log-sink"), dir.path().join("log-none"));
    let a = run_daemon(&with_sink, &log_sink, &addr, "key-a");
    let b = run_daemon(&without, &log_none, &addr, "key-b");
    std::thread::sleep(Duration::from_secs(6));
    drop((a, b));

    let none = Wal::open_read_only(&log_none).unwrap();
    assert!(
        none.first_retained(Lane::Live).unwrap() > 1,
        "the log without sinks was not truncated: the test cannot tell"
    );
    let held = Wal::open_read_only(&log_sink).unwrap();
    assert!(
        held.last_seq(Lane::Live).unwrap().unwrap_or(0) > 20,
        "too little captured"
    );
    assert_eq!(
        held.first_retained(Lane::Live).unwrap(),
        1,
        "truncation removed records a sink was never sent"
    );
    let cursors: Vec<(String, Lane, u64)> = held
        .cursors()
        .unwrap()
        .into_iter()
        .map(|c| (c.sink, c.lane, c.seq))
        .collect();
    assert!(cursors.contains(&("clickhouse".into(), Lane::Live, 0)), "{cursors:?}");
    assert!(
        cursors.contains(&("clickhouse".into(), Lane::Backfill, 0)),
        "{cursors:?}"
    );
}

#[test]
fn sighup_leaves_the_daemon_running_and_sigterm_then_stops_it() {
    let (_sim, addr) = simulator(&["--always-open"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(&config, "[live.forex]\nsymbols = [\"EUR/USD\"]\nchannels = [\"C\"]\n").unwrap();
    let mut daemon = run_daemon(&config, &dir.path().join("log"), &addr, "key");
    std::thread::sleep(Duration::from_secs(2));
    let pid = daemon.0.id().to_string();
    for _ in 0..2 {
        assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
        std::thread::sleep(Duration::from_millis(500));
        assert!(daemon.0.try_wait().unwrap().is_none(), "SIGHUP ended the daemon");
    }
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (status, _) = exits_within(&mut daemon, Duration::from_secs(15));
    assert!(status.success(), "{status}");
}

#[test]
fn run_raises_its_open_file_limit_for_the_logs_files() {
    use std::os::unix::process::CommandExt;
    let (_sim, addr) = simulator(&["--always-open"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(&config, "[live.forex]\nsymbols = [\"EUR/USD\"]\nchannels = [\"C\"]\n").unwrap();
    let mut command = run_command(&config, &dir.path().join("log"), &addr, "key");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            limit.rlim_cur = 256.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            Ok(())
        });
    }
    let daemon = Child(command.spawn().unwrap());
    std::thread::sleep(Duration::from_secs(2));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.0.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "soft limit not raised to the hard one: {line}");
}

/// A server that takes connections and never answers.
fn silent_server() -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (listener, addr)
}

/// Waits for `child` to exit, at most `limit`; how long it took.
fn exits_within(child: &mut Child, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return (status, started.elapsed());
        }
        assert!(started.elapsed() < limit, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_stop_with_a_sink_that_never_answers_ends_in_seconds_and_a_second_signal_at_once() {
    let (_sim, addr) = simulator(&["--always-open", "--quotes-per-minute", "3000"]);
    // Accepts (the kernel's backlog does) and never answers: every write hangs.
    let (_silent, silent) = silent_server();
    let dir = tempfile::tempdir().unwrap();
    for (name, drain, signals, limit) in [
        // Before, the write in flight held the stop for its whole timeout (60 s); now
        // for the live runner's drain time (5 s by default) at most.
        ("one", "5s", 1, Duration::from_secs(20)),
        // A drain time of a minute, cut short by a second signal.
        ("two", "60s", 2, Duration::from_secs(10)),
    ] {
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[live.forex]\nsymbols = [\"EUR/USD\"]\nchannels = [\"C\"]\n\
                 [sinks]\nstop_drain = \"{drain}\"\n[sinks.clickhouse]\nenabled = true\nurl = \"http://{silent}\"\n"
            ),
        )
        .unwrap();
        let log = dir.path().join(name);
        let mut daemon = run_daemon(&config, &log, &addr, name);
        std::thread::sleep(Duration::from_secs(3));
        let pid = daemon.0.id().to_string();
        for _ in 0..signals {
            assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
            std::thread::sleep(Duration::from_millis(300));
        }
        let (status, took) = exits_within(&mut daemon, limit);
        assert_eq!(status.success(), signals == 1, "{name}: {status} after {took:?}");
        // The log was synced: everything captured is there on reopen.
        let wal = Wal::open_read_only(&log).unwrap();
        assert!(
            wal.last_seq(Lane::Live).unwrap().unwrap_or(0) > 10,
            "{name}: too little in the log"
        );
        assert_eq!(
            wal.cursor("clickhouse", Lane::Live).unwrap(),
            0,
            "{name}: the silent sink acknowledged nothing"
        );
    }
}

#[test]
fn a_stop_does_not_wait_for_a_slow_rest_answer_and_is_not_called_a_failure() {
    let (_sim, addr) = simulator(&["--faults", "slow=60s"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(&config, "[backfill]\ncrypto = [\"BTC-USD\"]\nlookback = \"2days\"\n").unwrap();
    // Before, the stop waited for the answer (60 s).
    let (status, took, stderr) = run_then_stop(&config, &addr, Duration::from_secs(20));
    assert!(status.success(), "{status} after {took:?}: {stderr}");
    assert!(!stderr.contains("gave up"), "a stop was called a failure: {stderr}");
}

/// Eight periods at once under a quota of 2 requests a minute: all but the first wait
/// their turn in the quota, the last for minutes. A stop ends those waits.
#[test]
fn a_stop_does_not_wait_for_the_rest_quotas_turn() {
    let (_sim, addr) = simulator(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        "[polygon]\nrequests_per_minute = 2\n[backfill]\ncrypto = [\"BTC-USD\"]\nlookback = \"8days\"\nchunk = \"1day\"\nconcurrency = 8\n",
    )
    .unwrap();
    // Before, the stop waited for every period's turn: 30 s apart.
    let (status, took, stderr) = run_then_stop(&config, &addr, Duration::from_secs(10));
    assert!(status.success(), "{status} after {took:?}: {stderr}");
}

/// Runs the daemon on `config` for 2 s, sends SIGTERM and waits up to `within` for it to
/// exit: its status, how long the stop took, and its stderr.
fn run_then_stop(
    config: &std::path::Path,
    addr: &str,
    within: Duration,
) -> (std::process::ExitStatus, Duration, String) {
    let dir = config.parent().unwrap();
    let mut daemon = Child(
        run_command(config, &dir.join("log"), addr, "key")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(2));
    let pid = daemon.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (status, took) = exits_within(&mut daemon, within);
    let mut stderr = String::new();
    daemon.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status, took, stderr)
}
