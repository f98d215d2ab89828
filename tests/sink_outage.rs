//! A sink server goes away and comes back, under load, once for each sink. NATS: this
//! binary runs its own nats-server (the shared ones stay up for the other tests), stopped
//! for a while and started again on the same port and store. PostgreSQL and ClickHouse:
//! the daemon reaches the shared server through a relay that is cut off (connections
//! broken half way, new ones refused, as by a stopped server or a lost network) and then
//! restored; stopping the shared servers would stop them for everything else using them.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tickvault_wal::{Lane, Wal};

mod common;

use common::sinks::{
    caught_up, drain, log_keys, nats_server, verify, wait_for, wait_for_showing, write_config_at, Daemon, Ports,
    Target, SINKS,
};
use common::{simulator, Child};
use tickvault::sim::relay::Relay as Proxy;

/// One outage at a time: each drives a daemon, and they share the simulator's CPU.
static SERIAL: Mutex<()> = Mutex::new(());

fn cursor(log: &Path, sink: &str, lane: Lane) -> u64 {
    Wal::open_read_only(log).unwrap().cursor(sink, lane).unwrap()
}

/// One look at the log: every sink's cursor on each lane, and the lanes' heads.
struct Positions {
    live: [u64; 3],
    backfill: [u64; 3],
    live_head: u64,
    backfill_head: u64,
}

fn positions(log: &Path) -> Positions {
    let reader = Wal::open_read_only(log).unwrap();
    let cursors = |lane| SINKS.map(|s| reader.cursor(s, lane).unwrap());
    let head = |lane| reader.last_seq(lane).unwrap().unwrap_or(0);
    Positions {
        live: cursors(Lane::Live),
        backfill: cursors(Lane::Backfill),
        live_head: head(Lane::Live),
        backfill_head: head(Lane::Backfill),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How the sink under test goes away and comes back.
enum Outage {
    /// A nats-server of this test's own, stopped and started again.
    Nats {
        port: u16,
        store: PathBuf,
        server: Option<Child>,
    },
    /// A relay in front of the shared server, cut and restored.
    Relay(Proxy),
}

impl Outage {
    fn new(sink: &str, dir: &Path) -> Outage {
        match sink {
            "nats" => {
                let (port, store) = (free_port(), dir.join("nats"));
                let server = Some(nats_server(port, &store, None));
                Outage::Nats { port, store, server }
            }
            "postgres" => Outage::Relay(Proxy::start(Ports::SHARED.postgres).unwrap()),
            "clickhouse" => Outage::Relay(Proxy::start(Ports::SHARED.clickhouse).unwrap()),
            other => panic!("no sink {other}"),
        }
    }

    /// Where the daemon reaches each sink.
    fn ports(&self, sink: &str) -> Ports {
        let mut ports = Ports::SHARED;
        match (self, sink) {
            (Outage::Nats { port, .. }, _) => ports.nats = *port,
            (Outage::Relay(p), "postgres") => ports.postgres = p.port,
            (Outage::Relay(p), _) => ports.clickhouse = p.port,
        }
        ports
    }

    fn down(&mut self) {
        match self {
            Outage::Nats { server, .. } => drop(server.take()),
            Outage::Relay(p) => p.cut(),
        }
    }

    fn up(&mut self) {
        match self {
            Outage::Nats { port, store, server } => *server = Some(nats_server(*port, store, None)),
            Outage::Relay(p) => p.restore(),
        }
    }
}

#[test]
fn nats_going_down_holds_its_cursor_while_the_others_go_on_and_it_catches_up_when_back() {
    outage("nats");
}

#[test]
fn postgres_cut_off_holds_its_cursor_while_the_others_go_on_and_it_catches_up_when_back() {
    outage("postgres");
}

#[test]
fn clickhouse_cut_off_holds_its_cursor_while_the_others_go_on_and_it_catches_up_when_back() {
    outage("clickhouse");
}

fn outage(sink: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut outage = Outage::new(sink, dir.path());
    let ports = outage.ports(sink);
    let target = Target::new(&format!("outage_{sink}"));
    let (_sim, addr) = simulator(&["--always-open", "--quotes-per-minute", "1200"]);
    let log = dir.path().join("log");
    // 120 days of bars (172,800): the outage comes while the backfill is being
    // forwarded, beside the live writes.
    let sources = "[live.crypto]\nsymbols = [\"BTC-USD\", \"ETH-USD\"]\nchannels = [\"XQ\", \"XT\"]\n\
        [backfill]\ncrypto = [\"BTC-USD\"]\nlookback = \"120days\"\nchunk = \"60days\"\n";
    let config = write_config_at(&dir.path().join("run.toml"), sources, &target, ports);
    let daemon = Daemon::start(&config, &log, &addr, &dir.path().join("run.stderr"));
    wait_for(
        &format!("{sink}'s first backfill write"),
        Duration::from_secs(60),
        || cursor(&log, sink, Lane::Backfill) > 0,
    );

    // The outage.
    outage.down();
    std::thread::sleep(Duration::from_millis(500));
    let before = positions(&log);
    // Down for at least 6 s, and until every other sink has moved both its cursors (a
    // loaded machine can take longer to get a backfill write through; 60 s at most).
    let down_since = Instant::now();
    let during = loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = positions(&log);
        let others_moved = SINKS.iter().enumerate().filter(|(_, s)| **s != sink).all(|(i, _)| {
            now.live[i] > before.live[i]
                && (now.backfill[i] > before.backfill[i] || now.backfill[i] == now.backfill_head)
        });
        let long = down_since.elapsed();
        if (others_moved && long >= Duration::from_secs(6)) || long >= Duration::from_secs(60) {
            eprintln!(
                "{sink} down for {long:?}: cursors of {SINKS:?}, live {:?} -> {:?}, backfill {:?} -> {:?} (head {})",
                before.live, now.live, before.backfill, now.backfill, now.backfill_head
            );
            break now;
        }
    };
    for (i, s) in SINKS.iter().enumerate() {
        if *s == sink {
            assert_eq!(
                during.live[i], before.live[i],
                "the {sink} live cursor moved while {sink} was down"
            );
            assert!(
                during.live_head > during.live[i],
                "live capture went on during the outage"
            );
            assert_eq!(
                during.backfill[i], before.backfill[i],
                "the {sink} backfill cursor moved while {sink} was down"
            );
            assert!(
                during.backfill_head > during.backfill[i],
                "{sink}'s backfill was through before the outage began: nothing was held"
            );
        } else {
            assert!(
                during.live[i] > before.live[i],
                "{s}'s live lane was held up by {sink}'s outage: cursors of {SINKS:?} {:?} -> {:?}",
                before.live,
                during.live
            );
            assert!(
                during.backfill[i] > before.backfill[i] || during.backfill[i] == during.backfill_head,
                "{s}'s backfill was held up by {sink}'s outage: cursors of {SINKS:?} {:?} -> {:?}",
                before.backfill,
                during.backfill
            );
        }
    }

    outage.up();
    // Live rows flow all along, so the backfill's writes get at most half the time, and
    // as little as a 32nd while live batches are over their latency budget (a loaded
    // host): 60 s on an idle machine here, over 90 s once in a full test run.
    wait_for_showing(
        &format!("{sink} to catch up after its return"),
        Duration::from_secs(300),
        || caught_up(&log),
        || {
            let now = positions(&log);
            format!(
                "cursors of {SINKS:?}: live {:?} (head {}), backfill {:?} (head {})\n{}",
                now.live,
                now.live_head,
                now.backfill,
                now.backfill_head,
                daemon.this_run()
            )
        },
    );
    let stderr = daemon.stop();

    // An outage is a retriable failure, never a refused write.
    assert!(!stderr.contains("ERROR"), "{stderr}");

    // The breaker went open, then half-open (a trial), then closed.
    let transitions: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("sink breaker") && l.contains(&format!("sink=\"{sink}\"")) && l.contains("lane=live"))
        .map(|l| l.rsplit("to=").next().unwrap_or(""))
        .collect();
    let joined = transitions.join(" ");
    let open = joined.find("\"open\"").expect(&joined);
    let half = joined[open..].find("\"half-open\"").map(|i| i + open).expect(&joined);
    assert!(joined[half..].contains("\"closed\""), "{joined}");
    for other in SINKS.iter().filter(|s| **s != sink) {
        assert!(
            !stderr.contains(&format!("sink=\"{other}\" lane=live from")),
            "{other}'s breaker moved during {sink}'s outage: {stderr}"
        );
    }

    // Nothing lost, nothing twice, in any sink (once what was captured after the
    // runners' last batches is forwarded too).
    drain(dir.path(), &log, &target, &addr, ports.nats);
    let keys = log_keys(&log);
    target.assert_exactly(ports.nats, &keys);
    let (code, report) = verify(&config, &log);
    assert_eq!(code, 0, "{report:#}");
}
