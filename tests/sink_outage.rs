//! A sink server goes away and comes back, under load. This binary runs its own NATS
//! server (the shared ones stay up for the other tests): it is stopped for a while and
//! started again on the same port and store.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tickvault_wal::{Lane, Wal};

mod common;

use common::sinks::{caught_up, drain, log_keys, verify, wait_for, write_config, Daemon, Target};
use common::{simulator, Child};

fn nats_server(port: u16, store: &Path) -> Child {
    let child = Child(
        Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/services.sh up installs it)"),
    );
    wait_for("nats-server to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    child
}

fn cursor(log: &Path, sink: &str, lane: Lane) -> u64 {
    Wal::open_read_only(log).unwrap().cursor(sink, lane).unwrap()
}

#[test]
fn a_sink_that_goes_down_holds_its_cursor_while_the_others_go_on_and_catches_up_when_back() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("nats");
    let mut nats = Some(nats_server(port, &store));
    let target = Target::new("outage");
    let (_sim, addr) = simulator(&["--always-open", "--quotes-per-minute", "1200"]);
    let log = dir.path().join("log");
    let sources = "[live.crypto]\nsymbols = [\"BTC-USD\", \"ETH-USD\"]\nchannels = [\"XQ\", \"XT\"]\n\
        [backfill]\ncrypto = [\"BTC-USD\"]\nlookback = \"1day\"\nchunk = \"1day\"\n";
    let config = write_config(&dir.path().join("run.toml"), sources, &target, port);
    let daemon = Daemon::start(&config, &log, &addr, &dir.path().join("run.stderr"));
    wait_for("the sinks to catch up", Duration::from_secs(60), || caught_up(&log));

    // The outage.
    drop(nats.take());
    std::thread::sleep(Duration::from_millis(500));
    let before = [
        cursor(&log, "nats", Lane::Live),
        cursor(&log, "postgres", Lane::Live),
        cursor(&log, "clickhouse", Lane::Live),
    ];
    std::thread::sleep(Duration::from_secs(6));
    let during = [
        cursor(&log, "nats", Lane::Live),
        cursor(&log, "postgres", Lane::Live),
        cursor(&log, "clickhouse", Lane::Live),
    ];
    let head = Wal::open_read_only(&log)
        .unwrap()
        .last_seq(Lane::Live)
        .unwrap()
        .unwrap_or(0);
    assert_eq!(during[0], before[0], "the NATS cursor moved while NATS was down");
    assert!(
        during[1] > before[1] && during[2] > before[2],
        "PostgreSQL and ClickHouse were held up: cursors {before:?} -> {during:?}"
    );
    assert!(head > during[0], "live capture went on during the outage");

    nats = Some(nats_server(port, &store));
    wait_for("NATS to catch up after its return", Duration::from_secs(90), || {
        caught_up(&log)
    });
    let stderr = daemon.stop();

    // The breaker went open, then half-open (a trial), then closed.
    let transitions: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("sink breaker") && l.contains("sink=\"nats\"") && l.contains("lane=live"))
        .map(|l| l.rsplit("to=").next().unwrap_or(""))
        .collect();
    let joined = transitions.join(" ");
    let open = joined.find("\"open\"").expect(&joined);
    let half = joined[open..].find("\"half-open\"").map(|i| i + open).expect(&joined);
    assert!(joined[half..].contains("\"closed\""), "{joined}");
    assert!(
        !stderr.contains("sink=\"postgres\" lane=live from"),
        "PostgreSQL's breaker moved: {stderr}"
    );

    // Nothing lost, nothing twice, in any sink (once what was captured after the
    // runners' last batches is forwarded too).
    drain(dir.path(), &log, &target, &addr, port);
    let keys = log_keys(&log);
    target.assert_exactly(port, &keys);
    let (code, report) = verify(&config, &log);
    assert_eq!(code, 0, "{report:#}");
    drop(nats);
}
