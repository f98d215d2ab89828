//! The whole pipeline against the real servers (`scripts/services.sh up`): simulator ->
//! daemon -> ClickHouse, PostgreSQL and NATS JetStream. Each test has its own database,
//! table and stream; they run one at a time (each drives a CPU-hungry daemon).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;

mod common;

use common::sinks::{
    caught_up_in, drain, log_keys, rt, sink_report, verify, verify_with, wait_for, write_config, Daemon, Target,
    PG_PASSWORD,
};
use common::{simulator, tickvault};
use tickvault_wal::{Lane, Wal};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const NATS: u16 = 4222;

/// Live quotes, trades and bars from two markets, and two days of backfill.
const SOURCES: &str = "[live.forex]\nsymbols = [\"EUR/USD\", \"GBP/USD\"]\nchannels = [\"C\", \"CA\"]\n\
    [live.crypto]\nsymbols = [\"BTC-USD\"]\nchannels = [\"XQ\", \"XT\", \"XA\"]\n\
    [backfill]\ncrypto = [\"ETH-USD\"]\nforex = [\"EUR/USD\"]\nlookback = \"2days\"\nchunk = \"1day\"\n";

fn assert_verify_matches(config: &Path, log: &Path) {
    let (code, report) = verify(config, log);
    assert_eq!(code, 0, "verify found differences: {report:#}");
    let sinks = report["sinks"].as_array().unwrap();
    assert_eq!(sinks.len(), 3, "{report:#}");
    for s in sinks {
        assert!(s["differences"].as_array().unwrap().is_empty(), "{s:#}");
        assert_eq!(s["passed"], s["in_sink"], "{s:#}");
    }
}

#[test]
fn every_captured_event_reaches_each_sink_exactly_once() {
    let _serial = serial();
    let target = Target::new("end_to_end");
    let (_sim, addr) = simulator(&["--always-open", "--quotes-per-minute", "1200"]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let config = write_config(&dir.path().join("run.toml"), SOURCES, &target, NATS);
    let daemon = Daemon::start(&config, &log, &addr, &dir.path().join("run.stderr"));
    daemon.wait_for_backfill(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    let stderr = daemon.stop();
    assert!(!stderr.contains("ERROR"), "{stderr}");
    // A graceful stop forwards everything captured live before the process exits.
    assert!(
        caught_up_in(&log, &[Lane::Live]),
        "a live cursor is behind the live lane after the stop: {stderr}"
    );
    drain(dir.path(), &log, &target, &addr, NATS);

    let keys = log_keys(&log);
    let live = keys.iter().filter(|k| k.contains(":tick:")).count();
    assert!(live > 50 && keys.len() > 2_000, "{} keys, {live} ticks", keys.len());
    target.assert_exactly(NATS, &keys);
    assert_verify_matches(&config, &log);

    // And verify does see a loss (one row gone from PostgreSQL) and a copy (one message
    // twice in JetStream), each in its own sink and nowhere else.
    target.delete_one_postgres_row();
    target.duplicate_one_nats_message(NATS);
    let (code, report) = verify(&config, &log);
    assert_eq!(code, 1, "{report:#}");
    for s in report["sinks"].as_array().unwrap() {
        let differences = s["differences"].as_array().unwrap();
        let (missing, duplicates) = match s["sink"].as_str().unwrap() {
            "postgres" => (1, 0),
            "nats" => (0, 1),
            _ => {
                assert!(differences.is_empty(), "{s:#}");
                continue;
            }
        };
        assert_eq!(differences.len(), 1, "{s:#}");
        assert_eq!(differences[0]["missing"], missing, "{s:#}");
        assert_eq!(differences[0]["duplicates"], duplicates, "{s:#}");
        assert_eq!(differences[0]["extra"], 0, "{s:#}");
    }

    // Keys swapped between days leave every count as it was: verify compares keys.
    let moved = target.swap_two_postgres_rows_between_days();
    let (code, report) = verify(&config, &log);
    assert_eq!(code, 1, "{report:#}");
    let pg = sink_report(&report, "postgres");
    let sum = |field: &str| -> u64 {
        pg["differences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d[field].as_u64().unwrap())
            .sum()
    };
    assert_eq!((sum("missing"), sum("extra")), (3, 2), "{pg:#}");
    let extras: Vec<i64> = pg["differences"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["examples"].as_array().unwrap().iter())
        .filter(|e| e["problem"] == "extra")
        .map(|e| e["ts_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(extras.len(), 2, "{pg:#}");
    assert!(
        extras.contains(&moved.0) && extras.contains(&moved.1),
        "{extras:?} {moved:?}"
    );

    // A stuck sink matches on what it passed, shows its backlog, and fails --max-lag.
    rt().block_on(async {
        let wal = Wal::open(&log).unwrap();
        let head = wal.head(Lane::Live);
        wal.move_cursor("clickhouse", Lane::Live, head / 2).await.unwrap();
        wal.shutdown().await.unwrap();
    });
    let ch = |report: &serde_json::Value| -> serde_json::Value { sink_report(report, "clickhouse").clone() };
    let (_, report) = verify(&config, &log);
    let stuck = ch(&report);
    assert!(stuck["differences"].as_array().unwrap().is_empty(), "{stuck:#}");
    let live = stuck["backlog"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["lane"] == "live")
        .unwrap()
        .clone();
    assert!(live["records"].as_u64().unwrap() > 0, "{stuck:#}");
    assert!(live["oldest_unsent_age_ms"].as_u64().is_some(), "{stuck:#}");
    assert!(stuck["lag_exceeded"].is_null(), "{stuck:#}");
    let (code, report) = verify_with(&config, &log, &["--max-lag", "1ms"]);
    assert_eq!(code, 1, "{report:#}");
    let stuck = ch(&report);
    assert!(
        stuck["lag_exceeded"].as_str().unwrap().contains("--max-lag"),
        "{stuck:#}"
    );
    // A sink with nothing unsent never lags.
    let nats = sink_report(&report, "nats");
    assert!(nats["lag_exceeded"].is_null(), "{nats:#}");
}

/// `tickvault demo --duration 3` with `config` on the log `log`: its exit code, and its
/// stdout and stderr.
fn demo(config: &Path, log: &Path) -> (Option<i32>, String) {
    let out = tickvault()
        .args(["demo", "--duration", "3", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(log)
        .env("TICKVAULT_POSTGRES_PASSWORD", PG_PASSWORD)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// The demo with all three sinks (README's `tickvault demo --config
/// config/local-sinks.toml`, on servers of its own here): its verification matches on a
/// first log; on a second, new log the sinks hold the first one's live events, which it
/// reports, naming the reset, and it exits 1.
#[test]
fn the_sinks_demo_matches_and_exits_1_when_the_sinks_hold_another_logs_events() {
    let _serial = serial();
    let target = Target::new("demo");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir.path().join("demo.toml"), SOURCES, &target, NATS);
    let demo = |log: &str| demo(&config, &dir.path().join(log));
    let (code, out) = demo("first");
    assert_eq!(code, Some(0), "{out}");
    for sink in ["clickhouse", "postgres  ", "nats      "] {
        assert!(out.contains(&format!("verify {sink} MATCH")), "{sink}: {out}");
    }
    let (code, out) = demo("second");
    assert_eq!(code, Some(1), "{out}");
    for sink in ["clickhouse", "postgres  ", "nats      "] {
        assert!(out.contains(&format!("verify {sink} DIFFERS")), "{sink}: {out}");
    }
    assert!(
        out.contains("0 missing") && out.contains("scripts/services.sh reset"),
        "{out}"
    );
    assert!(out.contains("the verification found differences (exit 1)"), "{out}");
}

/// A sink that refuses every write (here a stream of the configured name, made before
/// for other subjects) matches too, over the nothing its cursors passed: the demo names
/// it as failing, with the error, and exits 1, while the other sinks take everything.
#[test]
fn the_sinks_demo_exits_1_naming_a_sink_that_refused_every_write() {
    let _serial = serial();
    let target = Target::new("demo_refused");
    rt().block_on(async {
        let client = async_nats::connect(format!("nats://127.0.0.1:{NATS}")).await.unwrap();
        async_nats::jetstream::new(client)
            .create_stream(async_nats::jetstream::stream::Config {
                name: target.stream.clone(),
                subjects: vec!["tv_demo_refused_other.>".into()],
                ..Default::default()
            })
            .await
            .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir.path().join("demo.toml"), SOURCES, &target, NATS);
    let (code, out) = demo(&config, &dir.path().join("log"));
    assert_eq!(code, Some(1), "{out}");
    for sink in ["clickhouse", "postgres  "] {
        assert!(out.contains(&format!("verify {sink} MATCH")), "{sink}: {out}");
    }
    // Open, or half-open when the demo ends during a trial write: failing either way.
    for lane in ["live", "backfill", "derived"] {
        assert!(
            ["open", "half-open"].iter().any(|state| out.contains(&format!(
                "nats {lane} was failing when the demo ended (breaker {state})"
            ))),
            "{lane}: {out}"
        );
    }
    assert!(
        out.contains("[tv_demo_refused_other.>]") && out.contains("sinks.nats.stream"),
        "{out}"
    );
    assert!(out.contains("a sink was failing (exit 1)"), "{out}");
}

#[test]
fn after_repeated_sigkills_during_capture_each_sink_holds_every_captured_event_once() {
    let _serial = serial();
    let target = Target::new("crash");
    let (_sim, addr) = simulator(&["--always-open", "--quotes-per-minute", "3000"]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    // Sixty days of bars in small pages at 10 requests/s: the backfill runs through
    // several of the kills, beside live capture and forwarding.
    let sources = "[polygon]\nrequests_per_minute = 600\n\
        [live.forex]\nsymbols = [\"EUR/USD\", \"USD/JPY\"]\nchannels = [\"C\", \"CA\"]\n\
        [live.crypto]\nsymbols = [\"BTC-USD\", \"ETH-USD\"]\nchannels = [\"XQ\", \"XT\"]\n\
        [backfill]\ncrypto = [\"BTC-USD\", \"ETH-USD\"]\nforex = [\"EUR/USD\"]\nlookback = \"60days\"\nchunk = \"5days\"\n\
        page_limit = 2000\nconcurrency = 1\n";
    let config = write_config(&dir.path().join("run.toml"), sources, &target, NATS);
    let stderr = dir.path().join("run.stderr");
    // PostgreSQL's backfill cursor and the backfill lane's head.
    let pg_backfill = || {
        let reader = tickvault_wal::Wal::open_read_only(&log).unwrap();
        let head = reader.last_seq(Lane::Backfill).unwrap().unwrap_or(0);
        (reader.cursor("postgres", Lane::Backfill).unwrap(), head)
    };
    let mut rng = rand::rng();
    let mut forwarded_at_kill = Vec::new();
    for life in 0..12 {
        let before = if log.exists() { pg_backfill().0 } else { 0 };
        let daemon = Daemon::start(&config, &log, &addr, &stderr);
        if life % 3 == 2 {
            // Every third life ends soon after one of its own backfill writes to
            // PostgreSQL (or once PostgreSQL has all the backfill there is): with the
            // backfill permit shared by three sinks, a life of a second or two can pass
            // before PostgreSQL's turn comes.
            let started = std::time::Instant::now();
            loop {
                let (cursor, head) = pg_backfill();
                if cursor > before || (cursor == head && daemon.backfill_finished()) {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "life {life}: PostgreSQL's backfill cursor stayed at {cursor} for 60 s \
                     (the lane's head {head}): {}",
                    daemon.this_run()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_millis(rng.random_range(0..1_000)));
        } else {
            std::thread::sleep(Duration::from_millis(rng.random_range(800..3_000)));
        }
        daemon.kill();
        forwarded_at_kill.push(pg_backfill().0);
    }
    // Let the last run finish the backfill, then forward everything.
    let daemon = Daemon::start(&config, &log, &addr, &stderr);
    daemon.wait_for_backfill(Duration::from_secs(120));
    daemon.stop();
    drain(dir.path(), &log, &target, &addr, NATS);

    // Some kill landed after forwarding began and before the backfill was through.
    let backfill_head = pg_backfill().1;
    eprintln!("PostgreSQL's backfill cursor at each kill: {forwarded_at_kill:?} of {backfill_head}");
    assert!(
        forwarded_at_kill.iter().any(|c| *c > 0 && *c < backfill_head),
        "no kill landed while the backfill was being forwarded: {forwarded_at_kill:?} of {backfill_head}"
    );
    let keys = log_keys(&log);
    assert!(keys.len() > 2 * 60 * 1440, "{} keys", keys.len());
    target.assert_exactly(NATS, &keys);
    assert_verify_matches(&config, &log);
    let cursors = target.postgres_cursors();
    assert_eq!(
        cursors.len(),
        3,
        "one cursor row per forwarded lane for this log: {cursors:?}"
    );
}

/// The last sequence of a JetStream stream on the shared server (0 when there is none).
fn stream_last(stream: &str) -> u64 {
    common::sinks::rt().block_on(async {
        let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
        match async_nats::jetstream::new(client).get_stream(stream).await {
            Ok(mut s) => s.info().await.map_or(0, |i| i.state.last_sequence),
            Err(_) => 0,
        }
    })
}

/// A restart long after a SIGKILL, past the stream's duplicate window (here 1 s), stores
/// nothing twice in JetStream: what the killed run had published past its cursor is
/// found in the stream from the sequence noted with the cursor, and not published again.
/// Each kill is aimed at a moment the stream is growing, so a write is in flight; the
/// first, when the timing allows, inside the log's first backfill write, before the
/// backfill cursor ever moved (the code before that case was covered failed it 2 of 2,
/// 5,109 and 11,797 messages stored twice).
#[test]
fn restarts_past_jetstreams_duplicate_window_after_sigkills_store_nothing_twice() {
    let _serial = serial();
    let target = Target::new("restart_late");
    let (_sim, addr) = simulator(&["--always-open", "--quotes-per-minute", "3000"]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let sinks = format!(
        "[sinks]\nretry_min = \"50ms\"\nretry_max = \"1s\"\n\
         [sinks.nats]\nenabled = true\nstream = \"{}\"\nsubject_prefix = \"{}\"\nduplicate_window = \"1s\"\n",
        target.stream, target.name
    );
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[polygon]\nrequests_per_minute = 600\n\
             [live.crypto]\nsymbols = [\"BTC-USD\", \"ETH-USD\"]\nchannels = [\"XQ\", \"XT\"]\n\
             [backfill]\ncrypto = [\"BTC-USD\", \"ETH-USD\"]\nlookback = \"75days\"\nchunk = \"5days\"\n\
             page_limit = 2000\nconcurrency = 1\n{sinks}"
        ),
    )
    .unwrap();
    let stderr = dir.path().join("run.stderr");
    let window = Duration::from_secs(1);
    let nats_cursors = || {
        let reader = tickvault_wal::Wal::open_read_only(&log).unwrap();
        [Lane::Live, Lane::Backfill].map(|lane| reader.cursor("nats", lane).unwrap())
    };
    let heads = || {
        let reader = tickvault_wal::Wal::open_read_only(&log).unwrap();
        [Lane::Live, Lane::Backfill].map(|lane| reader.last_seq(lane).unwrap().unwrap_or(0))
    };
    let mut rng = rand::rng();
    let mut kills = Vec::new();
    for life in 0..8 {
        let at_start = stream_last(&target.stream);
        let daemon = Daemon::start(&config, &log, &addr, &stderr);
        let more = rng.random_range(2_000..25_000);
        let started = std::time::Instant::now();
        let mut last = at_start;
        loop {
            let now = stream_last(&target.stream);
            // The first life, when the timing allows, inside the log's first backfill
            // write: the stream holds backfill messages (more than the live lane has) and
            // the backfill cursor has not moved yet, so only the note kept at the start
            // tells the restart where to look.
            if life == 0 && now > last && now > heads()[0] && nats_cursors()[1] == 0 {
                break;
            }
            // Growing since the last look: a write is in flight.
            if now >= at_start + more && now > last {
                break;
            }
            // Once the backfill is through, only live is left to kill in.
            if daemon.backfill_finished() && now > last {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "life {life}: the stream grew from {at_start} to {now} in 60 s: {}",
                daemon.this_run()
            );
            last = now;
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon.kill();
        kills.push((nats_cursors(), heads(), stream_last(&target.stream)));
        // Past the window: the stream no longer drops a copy of what the killed run stored.
        std::thread::sleep(window + Duration::from_millis(500));
    }
    let daemon = Daemon::start(&config, &log, &addr, &stderr);
    daemon.wait_for_backfill(Duration::from_secs(120));
    daemon.stop();
    std::thread::sleep(window + Duration::from_millis(500));
    // Forward what the lanes still hold, capturing nothing new.
    let drain = dir.path().join("drain.toml");
    std::fs::write(
        &drain,
        format!("[live]\nenabled = false\n[backfill]\nenabled = false\n{sinks}"),
    )
    .unwrap();
    let daemon = Daemon::start(&drain, &log, &addr, &stderr);
    wait_for("the NATS cursors to reach the heads", Duration::from_secs(60), || {
        nats_cursors() == heads()
    });
    let output = daemon.stop();

    let found: Vec<u64> = output
        .lines()
        .filter(|l| l.contains("were not published again"))
        .filter_map(|l| l.split("rows=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    eprintln!("at each kill, NATS cursors and the heads (live, backfill), the stream's last sequence: {kills:?}");
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split(&format!("{name}="))
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let looks: Vec<(u64, u64)> = output
        .lines()
        .filter(|l| l.contains("read what the stream stored past the cursor"))
        .filter_map(|l| Some((field(l, "messages")?, field(l, "elapsed_ms")?)))
        .collect();
    eprintln!("rows found in the stream past the cursor after a restart, per runner: {found:?}");
    eprintln!("the restarts' looks (message ids read, ms): {looks:?}");
    let stored = target.nats_keys(NATS);
    let total = stored.len() as u64;
    let keys: HashSet<String> = stored.into_iter().collect();
    let expected = log_keys(&log);
    assert!(expected.len() > 50_000, "{} keys", expected.len());
    let missing = expected.difference(&keys).count();
    assert_eq!(missing, 0, "{missing} of {} keys are not in the stream", expected.len());
    assert_eq!(
        total,
        keys.len() as u64,
        "{} messages stored twice",
        total - keys.len() as u64
    );
    // And the case was reached: some kill left rows published past a cursor.
    assert!(
        found.iter().sum::<u64>() > 0,
        "no restart found a row published past the cursor: the kills missed every write"
    );
}

#[test]
fn verify_still_matches_once_truncation_took_the_first_records_of_a_day() {
    let _serial = serial();
    let target = Target::new("truncated");
    let (_sim, addr) = simulator(&["--always-open", "--quotes-per-minute", "1200"]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let sources = "[live.crypto]\nsymbols = [\"BTC-USD\"]\nchannels = [\"XQ\", \"XT\", \"XA\"]\n\
        [backfill]\ncrypto = [\"BTC-USD\"]\nlookback = \"1day\"\nchunk = \"1day\"\n";
    // 1. Capture and forward, nothing truncated yet.
    let config = write_config(&dir.path().join("run.toml"), sources, &target, NATS);
    let daemon = Daemon::start(&config, &log, &addr, &dir.path().join("run.stderr"));
    daemon.wait_for_backfill(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    daemon.stop();
    drain(dir.path(), &log, &target, &addr, NATS);
    assert_verify_matches(&config, &log);

    // 2. Again with a retention of one second: truncation takes the first records of
    // today's groups (the sinks keep them), the last second's stay in the log.
    let short = write_config(
        &dir.path().join("short.toml"),
        &format!("[log]\nretention = \"1s\"\ntruncate_every = \"1s\"\n{sources}"),
        &target,
        NATS,
    );
    let daemon = Daemon::start(&short, &log, &addr, &dir.path().join("short.stderr"));
    wait_for("a truncation", Duration::from_secs(30), || {
        daemon.this_run().contains("log truncated")
    });
    std::thread::sleep(Duration::from_secs(2));
    let stderr = daemon.stop();
    assert!(!stderr.contains("ERROR"), "{stderr}");
    let (code, report) = verify(&short, &log);
    assert_eq!(code, 0, "verify found differences: {report:#}");
    for lane in ["live", "backfill"] {
        assert!(report["first_retained"][lane].as_u64().unwrap() > 1, "{report:#}");
    }
    for s in report["sinks"].as_array().unwrap() {
        assert!(s["differences"].as_array().unwrap().is_empty(), "{s:#}");
        // What the sinks hold from before the retention is counted, not compared.
        assert!(s["beyond_retention"].as_u64().unwrap() > 0, "{s:#}");
    }
}

/// What the runners say when they find a destination lacking what the cursor passed.
const SENT_AGAIN: &str = "the destination lacks what the cursor passed";

/// A daemon on a log of its own, sending everything to `target`, once its backfill is
/// captured; with the simulator it runs against (kept alive with it) and its directory.
struct Capturing {
    _sim: common::Child,
    addr: String,
    dir: tempfile::TempDir,
    log: std::path::PathBuf,
    config: std::path::PathBuf,
    daemon: Daemon,
}

impl Capturing {
    fn start(target: &Target) -> Capturing {
        let (_sim, addr) = simulator(&["--always-open", "--quotes-per-minute", "1200"]);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let config = write_config(&dir.path().join("run.toml"), SOURCES, target, NATS);
        let daemon = Daemon::start(&config, &log, &addr, &dir.path().join("run.stderr"));
        daemon.wait_for_backfill(Duration::from_secs(90));
        Capturing {
            _sim,
            addr,
            dir,
            log,
            config,
            daemon,
        }
    }
}

/// Drops the target's ClickHouse database and deletes its JetStream stream, as
/// `scripts/services.sh reset` does.
async fn drop_clickhouse_database_and_stream(target: &Target) {
    common::sinks::clickhouse()
        .query(&format!("DROP DATABASE {}", target.name))
        .execute()
        .await
        .unwrap();
    let nats = async_nats::connect(format!("nats://127.0.0.1:{NATS}")).await.unwrap();
    async_nats::jetstream::new(nats)
        .delete_stream(&target.stream)
        .await
        .unwrap();
}

/// Waits (up to `within`) until the daemon has said six times that a destination lacked
/// what its cursor passed, then asserts it said so once for each sink and lane, naming
/// the runner that did not (with the daemon's output) when one did not. Reads all its
/// output (live runners start before the daemon says it is running).
fn assert_every_runner_sends_again(daemon: &Daemon, within: Duration) {
    let started = std::time::Instant::now();
    // Not `wait_for`: on a timeout the assertions below name the runner that did not.
    let said_by = |said: &str, sink: &str, lane: &str| {
        said.lines()
            .filter(|l| l.contains(SENT_AGAIN) && l.contains(&format!("sink=\"{sink}\" lane={lane} ")))
            .count()
    };
    common::sinks::waited_for(within, || {
        let said = daemon.log();
        ["clickhouse", "postgres", "nats"]
            .iter()
            .all(|sink| ["live", "backfill"].iter().all(|lane| said_by(&said, sink, lane) > 0))
    });
    eprintln!("waited {:.1?} for the runners to send again", started.elapsed());
    let said = daemon.log();
    for sink in ["clickhouse", "postgres", "nats"] {
        for lane in ["live", "backfill"] {
            let times = said_by(&said, sink, lane);
            assert_eq!(times, 1, "{sink} {lane}, after {:?}: {said}", started.elapsed());
        }
    }
}

#[test]
fn what_a_sink_lost_after_it_was_sent_is_sent_again_from_the_log_at_the_next_start() {
    let _serial = serial();
    let target = Target::new("lost");
    let c = Capturing::start(&target);
    let (dir, log, config) = (c.dir.path(), &c.log, &c.config);
    std::thread::sleep(Duration::from_secs(2));
    c.daemon.stop();
    drain(dir, log, &target, &c.addr, NATS);
    let keys = log_keys(log);
    target.assert_exactly(NATS, &keys);

    // ClickHouse's database dropped and JetStream's stream deleted; PostgreSQL back to
    // where it was halfway through each lane (as a restore from a backup would leave
    // it: the rows and the cursor rows committed with them).
    rt().block_on(async {
        drop_clickhouse_database_and_stream(&target).await;
        let pg = common::sinks::postgres(&target.name).await;
        let cursors = pg.query("SELECT lane, seq FROM events_cursors", &[]).await.unwrap();
        // Live and backfill, and derived once the aggregator's bars were forwarded.
        assert!(cursors.len() >= 2, "{cursors:?}");
        for row in cursors {
            let (lane, seq): (String, i64) = (row.get(0), row.get(1));
            let table = if lane == "derived" { "events_derived" } else { "events" };
            let deleted = pg
                .execute(
                    &format!("DELETE FROM {table} WHERE lane = $1 AND seq > $2"),
                    &[&lane, &(seq / 2)],
                )
                .await
                .unwrap();
            assert!(deleted > 0, "{lane}: nothing past {}", seq / 2);
            pg.execute(
                "UPDATE events_cursors SET seq = $2 WHERE lane = $1",
                &[&lane, &(seq / 2)],
            )
            .await
            .unwrap();
        }
    });
    let (code, report) = verify(config, log);
    assert_eq!(code, 1, "verify should find what the sinks lost: {report:#}");

    // The next start sends it again, and each sink holds every event once.
    let forward = write_config(
        &dir.join("forward.toml"),
        "[live]\nenabled = false\n[backfill]\nenabled = false\n[aggregate]\nenabled = false\n",
        &target,
        NATS,
    );
    let daemon = Daemon::start(&forward, log, &c.addr, &dir.join("forward.stderr"));
    assert_every_runner_sends_again(&daemon, Duration::from_secs(60));
    wait_for("the sinks to catch up with the log", Duration::from_secs(120), || {
        caught_up_in(log, &[Lane::Live, Lane::Backfill, Lane::Derived])
    });
    daemon.stop();
    target.assert_exactly(NATS, &keys);
    assert_verify_matches(config, log);
}

#[test]
fn sinks_made_anew_while_the_daemon_runs_get_what_they_lost_without_a_restart() {
    let _serial = serial();
    let target = Target::new("lost_running");
    let c = Capturing::start(&target);
    let (dir, log, config) = (c.dir.path(), &c.log, &c.config);
    wait_for("the backfill to be forwarded", Duration::from_secs(60), || {
        caught_up_in(log, &[Lane::Backfill])
    });

    // Every destination goes while live events flow: ClickHouse's database, PostgreSQL's
    // (its sessions ended), JetStream's stream.
    rt().block_on(async {
        drop_clickhouse_database_and_stream(&target).await;
        common::sinks::postgres("postgres")
            .await
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", target.name))
            .await
            .unwrap();
    });
    // The live runners find out at their next write, which fails (PostgreSQL's on the
    // session the server ended: it finds the events table made anew) and makes the
    // destination again; the backfill runners, with nothing to write, at their recheck
    // (every 30 s).
    assert_every_runner_sends_again(&c.daemon, Duration::from_secs(90));
    std::thread::sleep(Duration::from_secs(2));
    c.daemon.stop();
    drain(dir, log, &target, &c.addr, NATS);
    target.assert_exactly(NATS, &log_keys(log));
    assert_verify_matches(config, log);
}

#[test]
fn two_appliances_with_separate_logs_show_each_event_once() {
    let _serial = serial();
    let target = Target::new("redundancy");
    let (_sim, addr) = simulator(&["--always-open", "--quotes-per-minute", "1200"]);
    let dir = tempfile::tempdir().unwrap();
    let (log_a, log_b) = (dir.path().join("a"), dir.path().join("b"));
    let config = write_config(&dir.path().join("run.toml"), SOURCES, &target, NATS);
    let a = Daemon::start_with_key(&config, &log_a, &addr, &dir.path().join("a.stderr"), "key-a");
    let b = Daemon::start_with_key(&config, &log_b, &addr, &dir.path().join("b.stderr"), "key-b");
    wait_for("both backfills", Duration::from_secs(90), || {
        a.backfill_finished() && b.backfill_finished()
    });
    std::thread::sleep(Duration::from_secs(3));
    a.stop();
    b.stop();
    drain(dir.path(), &log_a, &target, &addr, NATS);
    drain(dir.path(), &log_b, &target, &addr, NATS);

    let (keys_a, keys_b) = (log_keys(&log_a), log_keys(&log_b));
    let both: HashSet<String> = keys_a.intersection(&keys_b).cloned().collect();
    let live_in_both = both.iter().filter(|k| k.contains(":tick:")).count();
    assert!(
        live_in_both > 20 && both.len() > 2_000,
        "the appliances should have captured the same events: {live_in_both} ticks and {} keys in common",
        both.len()
    );
    let union: HashSet<String> = keys_a.union(&keys_b).cloned().collect();
    target.assert_exactly(NATS, &union);
    let logs: HashSet<String> = target.postgres_cursors().into_iter().map(|c| c.0).collect();
    assert_eq!(logs.len(), 2, "each appliance keeps its own PostgreSQL cursor");
}

/// Live capture-to-commit latency per sink (p50, p99 in ms), from the runners' last words.
fn live_latency(stderr: &str) -> Vec<(String, f64, f64)> {
    let field = |line: &str, name: &str| -> String {
        let start = line
            .find(&format!("{name}="))
            .map(|i| i + name.len() + 1)
            .unwrap_or(line.len());
        line[start..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_matches('"')
            .to_owned()
    };
    stderr
        .lines()
        .filter(|l| l.contains("sink runner stopped") && l.contains("lane=live"))
        .map(|l| {
            (
                field(l, "sink"),
                field(l, "latency_p50_ms").parse().unwrap_or(f64::NAN),
                field(l, "latency_p99_ms").parse().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

/// The live path never queues behind the backfill: during a full-speed backfill (no live
/// latency budget) whose backlog runs into millions of rows, every sink's live cursor
/// stays at the live head and live latency stays within a bound that queueing behind the
/// backlog would break by orders of magnitude (the figures themselves, and their ratio to
/// idle, are the benchmark's: `tickvault bench sinks`).
#[test]
fn live_events_keep_reaching_every_sink_while_a_full_speed_backfill_is_forwarded() {
    let _serial = serial();
    let (_sim, addr) = common::simulator_niced(&["--always-open", "--quotes-per-minute", "6000"]);
    let live = "[live.crypto]\nsymbols = [\"BTC-USD\", \"ETH-USD\"]\nchannels = [\"XQ\", \"XT\"]\n";
    let mut figures = Vec::new();
    for (name, backfill) in [
        ("priority_idle", "[backfill]\nenabled = false\n"),
        (
            "priority_busy",
            // About 2.6 million bars: the backfill runners stay busy the whole window.
            "[backfill]\ncrypto = [\"BTC-USD\", \"ETH-USD\", \"SOL-USD\"]\nforex = [\"EUR/USD\", \"GBP/USD\"]\nlookback = \"365days\"\nchunk = \"90days\"\n",
        ),
    ] {
        let target = Target::new(name);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let config = write_config(&dir.path().join("run.toml"), &format!("{live}{backfill}"), &target, NATS);
        // No live latency budget: the backfill keeps all of its duties whatever live's
        // latency, the heaviest load the live path can meet (a budget only takes load
        // off it), and the backlog stays deep on a slow host too.
        let toml = std::fs::read_to_string(&config).unwrap();
        let toml = toml.replacen("[sinks]\n", "[sinks]\nlive_latency_budget = \"0ms\"\n", 1);
        std::fs::write(&config, toml).unwrap();
        let daemon = Daemon::start(&config, &log, &addr, &dir.path().join("run.stderr"));
        std::thread::sleep(Duration::from_secs(12));
        let (backlog, live_lag) = {
            let reader = tickvault_wal::Wal::open_read_only(&log).unwrap();
            let head = |lane| reader.last_seq(lane).unwrap().unwrap_or(0);
            let cursor = |sink, lane| reader.cursor(sink, lane).unwrap();
            let backlog = head(tickvault_wal::Lane::Backfill) - cursor("postgres", tickvault_wal::Lane::Backfill);
            let live_lag: Vec<u64> = common::sinks::SINKS
                .iter()
                .map(|s| head(tickvault_wal::Lane::Live) - cursor(s, tickvault_wal::Lane::Live))
                .collect();
            (backlog, live_lag)
        };
        let stderr = daemon.stop();
        let latency = live_latency(&stderr);
        assert_eq!(latency.len(), 3, "{stderr}");
        eprintln!("{name}: backfill backlog {backlog}, live lag {live_lag:?}, live latency {latency:?}");
        figures.push((latency, backlog, live_lag));
    }
    let (idle, busy) = (&figures[0].0, &figures[1].0);
    assert!(
        figures[1].1 > 500_000,
        "the backfill was not still being forwarded at the end"
    );
    // ~400 live events/s: a lag of 800 is two seconds' worth, against a backlog of millions.
    assert!(
        figures[1].2.iter().all(|lag| *lag < 800),
        "live lagged: {:?}",
        figures[1].2
    );
    for (sink, _, idle_p99) in idle {
        let busy_p99 = busy.iter().find(|b| &b.0 == sink).map_or(f64::NAN, |b| b.2);
        eprintln!("{sink}: live p99 {idle_p99:.1} ms idle, {busy_p99:.1} ms during the backfill");
        assert!(
            busy_p99 <= (8.0 * idle_p99).max(1_500.0),
            "{sink}: live p99 {busy_p99:.1} ms during the backfill against {idle_p99:.1} ms idle"
        );
    }
}

/// A log written before capture refused such values (or by another tool) holds a trade
/// whose id has a NUL and a quote from the year 2500: PostgreSQL cannot store either.
/// Its runner sets both aside and forwards the rest; ClickHouse and JetStream store
/// all; the daemon stays up; `verify` lists them for PostgreSQL alone and exits 1.
#[test]
fn records_a_sink_refuses_for_their_content_are_set_aside_for_that_sink_alone() {
    use tickvault::event::{Body, Capture, Event, Feed, Quote, Trade, EVENT_KIND};
    let _serial = serial();
    let target = Target::new("refused");
    let (_sim, addr) = simulator(&[]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let event = |i: i64| {
        let ts_ms = 1_700_000_000_000 + i * 1_000;
        let body = if i % 2 == 0 {
            Body::Trade(Trade {
                symbol: "BTC-USD".into(),
                ts_ms,
                uid: i as u64,
                price: 1.0,
                size: 1.0,
                exchange: Some(1),
                trade_id: Some(if i == 40 { "bad\0id".into() } else { format!("t{i}") }),
                conditions: vec![],
            })
        } else {
            Body::Quote(Quote {
                symbol: "BTC-USD".into(),
                ts_ms: if i == 77 { 16_725_225_600_000 } else { ts_ms },
                uid: i as u64,
                bid: 1.0,
                ask: 2.0,
                bid_size: None,
                ask_size: None,
                exchange: None,
            })
        };
        Event {
            capture: Capture {
                feed: Feed::Crypto,
                lane: Lane::Live,
                captured_at_ns: 1_700_000_000_000_000_000,
            },
            body,
        }
    };
    rt().block_on(async {
        let wal = Wal::open(&log).unwrap();
        let mut batch = tickvault_wal::Batch::new();
        for i in 0..200 {
            batch.push(EVENT_KIND, &event(i).to_payload().unwrap()).unwrap();
        }
        wal.append(Lane::Live, batch).await.unwrap();
        wal.shutdown().await.unwrap();
    });
    drain(dir.path(), &log, &target, &addr, NATS);
    let stderr = std::fs::read_to_string(dir.path().join("drain.stderr")).unwrap();
    assert_eq!(
        stderr.matches("the sink refused a record for its content").count(),
        2,
        "{stderr}"
    );

    let (code, report) = verify(&config_of(dir.path()), &log);
    assert_eq!(code, 1, "{report:#}");
    for s in report["sinks"].as_array().unwrap() {
        if s["sink"] != "postgres" {
            assert_eq!(s["refused"], 0, "{s:#}");
            assert!(s["differences"].as_array().unwrap().is_empty(), "{s:#}");
            assert_eq!(s["in_sink"], 200, "{s:#}");
            continue;
        }
        assert_eq!(s["refused"], 2, "{s:#}");
        assert_eq!(s["in_sink"], 198, "{s:#}");
        let seqs: Vec<u64> = s["refused_records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![41, 78], "{s:#}");
        let differences = s["differences"].as_array().unwrap();
        let sum = |f: &str| -> u64 { differences.iter().map(|d| d[f].as_u64().unwrap()).sum() };
        assert_eq!((sum("missing"), sum("refused")), (0, 2), "{s:#}");
    }
}

/// The config `drain` wrote in `dir`.
fn config_of(dir: &Path) -> std::path::PathBuf {
    dir.join("drain.toml")
}
