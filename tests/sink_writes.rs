//! Each sink's writes on their own, against the real servers (`scripts/services.sh up`):
//! a batch sent again (a retry after a lost acknowledgement) and a batch overlapping
//! what a sink holds (a redundant appliance, a key on both lanes) leave each key once.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use tickvault::config::Config;
use tickvault::sink::clickhouse::ClickHouseSink;
use tickvault::sink::nats::NatsSink;
use tickvault::sink::postgres::{PostgresSink, Written, MERGE_AFTER_CONFLICT};
use tickvault::sink::{Batch, Holds, Row, Sink};
use tickvault_wal::Lane;

mod common;

use common::sinks::{clickhouse, postgres, rt, Target, PG_PASSWORD};
use tickvault::sim::relay::Relay as Proxy;

/// The natural keys a sink holds, a row each (what `verify` reads).
macro_rules! keys {
    ($sink:expr) => {{
        let mut keys = Vec::new();
        $sink.scan_keys(|k| keys.push(k)).await.unwrap();
        keys
    }};
}

/// Events of BTC-USD at log positions `from..to`, a quote, a trade and a minute bar in
/// turn (ClickHouse keeps a table per kind).
fn events(from: u64, to: u64) -> Batch {
    let rows: Vec<Row> = (from..to)
        .map(|i| {
            let kind = ["quote", "trade", "bar"][i as usize % 3];
            let some_if = |k: &str, v: f64| (kind == k).then_some(v);
            Row {
                feed: "crypto".into(),
                symbol: "BTC-USD".into(),
                kind: kind.into(),
                timeframe: if kind == "bar" { "1m" } else { "tick" }.into(),
                ts_ms: 1_700_000_000_000 + i as i64 * 60_000,
                uid: 0,
                seq: i,
                lane: "backfill".into(),
                captured_at_ns: 1,
                bid: some_if("quote", 1.0),
                ask: some_if("quote", 1.1),
                bid_size: None,
                ask_size: some_if("quote", 3.0),
                price: some_if("trade", 1.05),
                size: some_if("trade", 0.5),
                open: some_if("bar", 1.0),
                high: some_if("bar", 2.0),
                low: some_if("bar", 0.5),
                close: some_if("bar", 1.5),
                volume: some_if("bar", i as f64),
                vwap: None,
                trades: (kind == "bar").then_some(3),
                exchange: (kind != "bar").then_some(4),
                trade_id: (kind == "trade").then(|| format!("t{i}")),
                conditions: if kind == "trade" { vec![1, 2] } else { vec![] },
                version: None,
                indicators: None,
            }
        })
        .collect();
    Batch {
        lane: Lane::Backfill,
        last_seq: to - 1,
        rows,
    }
}

/// Sends batches to `sink` in order, each acknowledged before the next.
async fn send(sink: &mut impl Sink, batches: &[Batch]) {
    for (i, batch) in batches.iter().enumerate() {
        sink.write(batch)
            .await
            .unwrap_or_else(|e| panic!("{} refused batch {i}: {e}", sink.name()));
    }
}

fn config(target: &Target) -> Config {
    let mut config = Config::parse("(test)", &target.sinks_toml(4222)).unwrap();
    config.sinks.postgres.password = Some(tickvault::config::Secret::new(PG_PASSWORD));
    config
}

/// The same batch twice, a batch half over the first, the first again, then new rows:
/// 0..2,500 once each in every sink.
fn overlapping() -> Vec<Batch> {
    vec![
        events(0, 1_000),
        events(0, 1_000),
        events(500, 1_500),
        events(0, 1_000),
        events(1_500, 2_000),
        events(1_000, 2_500),
    ]
}

fn assert_each_key_once(target: &Target) {
    let expected: Vec<String> = events(0, 2_500).rows.iter().map(Row::key_string).collect();
    for (sink, keys) in target.keys(4222) {
        let mut counts: HashMap<&str, u32> = HashMap::new();
        for k in &keys {
            *counts.entry(k).or_default() += 1;
        }
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(twice.is_empty(), "{sink} holds keys more than once: {twice:?}");
        let missing: Vec<_> = expected
            .iter()
            .filter(|k| !counts.contains_key(k.as_str()))
            .take(5)
            .collect();
        assert!(missing.is_empty(), "{sink} is missing keys: {missing:?}");
        assert_eq!(keys.len(), expected.len(), "{sink}");
    }
}

#[test]
fn batches_sent_again_or_overlapping_leave_each_key_once_in_every_sink() {
    let target = Target::new("sink_writes");
    let config = config(&target);
    rt().block_on(async {
        send(&mut ClickHouseSink::new(&config.sinks.clickhouse), &overlapping()).await;
        let mut pg = PostgresSink::new(&config.sinks.postgres, "test-log");
        send(&mut pg, &overlapping()).await;
        // The cursor row moved with the data, to the furthest batch.
        assert_eq!(pg.holds(Lane::Backfill).await.unwrap(), Holds::UpTo(2_499));
        assert_eq!(pg.sessions(), 1);
        send(&mut NatsSink::new(&config.sinks.nats), &overlapping()).await;
    });
    assert_each_key_once(&target);
}

/// Derived bars of ETH-USD 5m at log positions `seqs`, bar `i` of them at `version`:
/// its close and RSI tell the versions apart.
fn derived(seqs: std::ops::Range<u64>, bars: std::ops::Range<i64>, version: u32) -> Batch {
    let rows = seqs
        .zip(bars)
        .map(|(seq, i)| Row {
            feed: "crypto".into(),
            symbol: "ETH-USD".into(),
            kind: "derived".into(),
            timeframe: "5m".into(),
            ts_ms: 1_700_000_100_000 + i * 300_000,
            uid: 0,
            seq,
            lane: "derived".into(),
            captured_at_ns: 1,
            bid: None,
            ask: None,
            bid_size: None,
            ask_size: None,
            price: None,
            size: None,
            open: Some(10.0),
            high: Some(12.0),
            low: Some(9.0),
            close: Some(f64::from(version)),
            volume: Some(5.0),
            vwap: None,
            trades: Some(7),
            exchange: None,
            trade_id: None,
            conditions: vec![],
            version: Some(version),
            indicators: Some(Box::new(tickvault::indicators::Indicators {
                rsi14: Some(50.0 + f64::from(version)),
                sma20: (version > 1).then_some(11.0),
                ..Default::default()
            })),
        })
        .collect();
    Batch {
        lane: Lane::Derived,
        last_seq: 0,
        rows,
    }
}

/// Versions of derived bars sent in any order, again, and several in one batch: every
/// ClickHouse and PostgreSQL row is the highest version sent (an older one sent after it
/// changes nothing), with that version's values; JetStream keeps each version once.
#[test]
fn derived_bars_keep_their_highest_version_in_every_sink() {
    let target = Target::new("sink_writes_derived");
    let config = config(&target);
    let mut batches = vec![
        derived(1..101, 0..100, 1),
        derived(101..151, 0..50, 2),
        // The first batch again (a replay, or a retry after a lost acknowledgement).
        derived(1..101, 0..100, 1),
    ];
    // Versions 3 and 4 of bars 0..10 in one batch, the older after the newer.
    let mut both = derived(151..161, 0..10, 4);
    both.rows.extend(derived(161..171, 0..10, 3).rows);
    batches.push(both);
    for batch in &mut batches {
        batch.last_seq = batch.rows.iter().map(|r| r.seq).max().unwrap();
    }
    let version_of = |i: i64| match i {
        0..10 => 4,
        10..50 => 2,
        _ => 1,
    };
    rt().block_on(async {
        let mut ch = ClickHouseSink::new(&config.sinks.clickhouse);
        send(&mut ch, &batches).await;
        let mut pg = PostgresSink::new(&config.sinks.postgres, "test-log");
        send(&mut pg, &batches).await;
        assert_eq!(pg.holds(Lane::Derived).await.unwrap(), Holds::UpTo(170));
        // What verify reads: one key per bar, its version in the uid's place.
        for (sink, keys) in [("clickhouse", keys!(ch)), ("postgres", keys!(pg))] {
            let mut held: Vec<(i64, u64)> = keys.iter().map(|k| (k.ts_ms, k.uid)).collect();
            held.sort_unstable();
            let expected: Vec<(i64, u64)> = (0..100)
                .map(|i| (1_700_000_100_000 + i * 300_000, version_of(i)))
                .collect();
            assert_eq!(held, expected, "{sink}");
        }
        send(&mut NatsSink::new(&config.sinks.nats), &batches).await;
        // The values stand with their version.
        #[derive(serde::Deserialize, clickhouse::Row)]
        struct Values {
            version: u32,
            close: f64,
            rsi14: Option<f64>,
            sma20: Option<f64>,
        }
        let rows: Vec<_> = clickhouse()
            .query(&format!(
                "SELECT version, close, rsi14, sma20 FROM {}.events_derived FINAL ORDER BY ts_ms",
                target.name
            ))
            .fetch_all::<Values>()
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.version, r.close, r.rsi14, r.sma20))
            .collect();
        let pg_rows: Vec<(i32, f64, Option<f64>, Option<f64>)> = postgres(&target.name)
            .await
            .query(
                "SELECT version, close, rsi14, sma20 FROM events_derived ORDER BY ts_ms",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        assert_eq!(rows.len(), 100);
        for (i, (ch_row, pg_row)) in rows.iter().zip(&pg_rows).enumerate() {
            let v = version_of(i as i64) as u32;
            let want = (v, f64::from(v), Some(50.0 + f64::from(v)), (v > 1).then_some(11.0));
            assert_eq!(*ch_row, want, "clickhouse bar {i}");
            assert_eq!(
                (pg_row.0 as u32, pg_row.1, pg_row.2, pg_row.3),
                want,
                "postgres bar {i}"
            );
        }
    });
    // JetStream: every version once (100 + 50 + 10 + 10 messages).
    let mut nats = target.nats_derived_keys(4222);
    assert_eq!(nats.len(), 170);
    nats.sort();
    nats.dedup();
    assert_eq!(nats.len(), 170, "each version once");
    assert!(nats.contains(&"crypto:ETH-USD:derived:5m:1700000100000:0:v4".to_owned()));
}

/// A batch whose write broke off half way is resent from its first unacknowledged
/// message, without the messages the stream stored although their PubAcks were lost:
/// after an outage longer than the stream's duplicate window, nothing is stored twice.
#[test]
fn nats_resends_a_failed_batch_from_its_first_unacknowledged_message_and_skips_those_stored() {
    let target = Target::new("nats_resume");
    let relay = Proxy::start(4222).unwrap();
    let mut nats = config(&target).sinks.nats;
    nats.url = format!("nats://127.0.0.1:{}", relay.port);
    nats.duplicate_window = Duration::from_secs(2);
    let batch = events(0, 50_000);
    rt().block_on(async {
        let direct = async_nats::jetstream::new(async_nats::connect("127.0.0.1:4222").await.unwrap());
        let stored = || async {
            match direct.get_stream(&target.stream).await {
                Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
                Err(_) => 0,
            }
        };
        let mut sink = NatsSink::new(&nats);
        let write = {
            let batch = batch.clone();
            tokio::spawn(async move {
                let result = sink.write(&batch).await;
                (sink, result)
            })
        };
        let started = Instant::now();
        while stored().await < 5_000 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the batch is not being stored"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The server goes on storing what the sink publishes, but its PubAcks are lost:
        // the sink keeps a window of publishes outstanding until the first one times out.
        relay.mute_replies();
        let (mut sink, result) = write.await.unwrap();
        assert!(result.is_err(), "the write went through the cut");
        relay.cut();
        let acked = sink
            .acknowledged_of_failed_batch()
            .expect("the failed batch is remembered");
        let before = stored().await;
        assert!(
            acked >= 4_000 && before > acked as u64,
            "acknowledged {acked}, stored {before}: none stored without its PubAck"
        );

        // Past the duplicate window, the sink comes back and the runner would resend.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        relay.restore();
        let started = Instant::now();
        while let Err(e) = sink.write(&batch).await {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the retry keeps failing: {e}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(sink.acknowledged_of_failed_batch(), None);

        let (mut keys, mut total) = (HashSet::new(), 0);
        NatsSink::new(&config(&target).sinks.nats)
            .scan(|row| {
                total += 1;
                keys.insert(row.key_string());
            })
            .await
            .unwrap();
        assert_eq!(keys.len(), batch.rows.len(), "every message is in the stream");
        let twice = total - keys.len();
        let found = sink.found_unacknowledged();
        eprintln!(
            "acknowledged {acked} of {before} stored at the break; the retry found {found} stored unacknowledged; {twice} stored twice"
        );
        assert_eq!(found, before - acked as u64, "the retry did not find every message stored unacknowledged");
        assert_eq!(twice, 0, "{twice} stored twice: {acked} were acknowledged of {before} stored at the break");
    });
}

/// What a killed run published past its cursor is found after a restart, from the
/// stream sequence noted with the cursor, and is not published again, though the
/// restart comes past the stream's duplicate window. A restart killed while that look
/// goes on keeps the last run's sequence in its note (the stream's own last is past
/// what is still to find), so the next restart finds the rest.
#[test]
fn nats_restarted_past_the_duplicate_window_publishes_nothing_the_stream_holds_past_the_cursor() {
    let target = Target::new("nats_restart");
    let mut nats = config(&target).sinks.nats;
    nats.duplicate_window = Duration::from_secs(1);
    let past_window = || tokio::time::sleep(Duration::from_millis(1_500));
    rt().block_on(async {
        // Run 1: 0..1,000 acknowledged and its cursor moved, with the note; 1,000..4,000
        // published too, and the run killed before that cursor move.
        let mut first = NatsSink::new(&nats);
        send(&mut first, &[events(0, 1_000)]).await;
        let note = first.note().expect("a note once the stream was seen");
        send(&mut first, &[events(1_000, 4_000)]).await;
        drop(first);
        past_window().await;

        // Run 2: its first batch is all in the stream; killed after its cursor move.
        let mut second = NatsSink::new(&nats);
        second.restore(&note);
        send(&mut second, &[events(1_000, 2_500)]).await;
        assert_eq!(second.found_after_restart(), 1_500);
        let note = second.note().unwrap();
        drop(second);
        past_window().await;

        // Run 3: finds the rest, then publishes what is new.
        let mut third = NatsSink::new(&nats);
        third.restore(&note);
        send(&mut third, &[events(2_500, 4_000), events(4_000, 5_000)]).await;
        assert_eq!(third.found_after_restart(), 1_500);

        // A note of another stream is not followed (the sink publishes everything).
        let mut other = NatsSink::new(&nats);
        let mut elsewhere = nats.clone();
        elsewhere.stream = format!("{}_OTHER", nats.stream);
        let mut noted = NatsSink::new(&elsewhere);
        noted.restore(&note);
        assert_eq!(noted.note(), None, "a note of another stream is not carried on");
        other.restore(&note);
        assert!(
            other.note().is_some(),
            "a note of this stream is carried on until the first write"
        );
    });
    assert_stream_holds_each_key_once(&target, 5_000);
}

/// The target's stream holds `n` distinct keys, none twice.
fn assert_stream_holds_each_key_once(target: &Target, n: usize) {
    let stored = target.nats_keys(4222);
    let total = stored.len();
    let keys: HashSet<String> = stored.into_iter().collect();
    assert_eq!(keys.len(), n, "every message is in the stream");
    assert_eq!(total, n, "{} stored twice", total - n);
}

/// A log's first run has no note yet: the sink's note once it has seen the stream (an
/// empty one here: sequence 0) is what the runner keeps before the first write, so a
/// run killed after its first PubAcks and before its first cursor move is followed by a
/// restart that finds those rows, past the duplicate window too.
#[test]
fn nats_killed_before_its_first_cursor_move_publishes_nothing_twice_after_a_restart_past_the_window() {
    let target = Target::new("nats_first_run");
    let mut nats = config(&target).sinks.nats;
    nats.duplicate_window = Duration::from_secs(1);
    rt().block_on(async {
        let mut first = NatsSink::new(&nats);
        assert_eq!(first.note(), None, "no note before the stream was seen");
        first.holds(Lane::Backfill).await.expect("connected");
        let note = first
            .note()
            .expect("a note once the stream was seen, though it is empty");
        send(&mut first, &[events(0, 2_000)]).await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(1_500)).await;

        let mut second = NatsSink::new(&nats);
        second.restore(&note);
        send(&mut second, &[events(0, 2_000), events(2_000, 3_000)]).await;
        assert_eq!(second.found_after_restart(), 2_000);
    });
    assert_stream_holds_each_key_once(&target, 3_000);
}

/// The statements of a write go to the server pipelined (BEGIN with the COPY, then the
/// COPY's end, the cursor row and COMMIT): a cursor row the server refuses must take the
/// batch's rows with it, both ways (direct COPY, and merged after a conflict).
#[test]
fn postgres_commits_a_batchs_rows_only_with_its_cursor_row() {
    let target = Target::new("pg_rows_with_cursor");
    let config = config(&target);
    rt().block_on(async {
        let mut pg = PostgresSink::new(&config.sinks.postgres, "test-log");
        send(&mut pg, &[events(0, 1_000)]).await;
        let admin = postgres(&target.name).await;
        admin
            .batch_execute("ALTER TABLE events_cursors ADD CONSTRAINT test_below CHECK (seq < 1500)")
            .await
            .unwrap();
        // Direct: the COPY succeeds, the cursor row does not.
        let refused = pg.write(&events(1_000, 2_000)).await;
        assert!(refused.is_err(), "a cursor row past the constraint was taken");
        assert_eq!(
            target.postgres_keys().await.len(),
            1_000,
            "rows committed without their cursor row"
        );
        // Merged: half of it is there, so the direct COPY fails on a key, and the merge
        // fails at the cursor row.
        let refused = pg.write(&events(500, 1_600)).await;
        assert!(
            refused.is_err(),
            "a merged batch's cursor row past the constraint was taken"
        );
        assert_eq!(
            target.postgres_keys().await.len(),
            1_000,
            "merged rows committed without their cursor row"
        );
        assert_eq!(pg.holds(Lane::Backfill).await.unwrap(), Holds::UpTo(999));
        // The same batch again once the server takes it: all of it, once.
        admin
            .batch_execute("ALTER TABLE events_cursors DROP CONSTRAINT test_below")
            .await
            .unwrap();
        send(&mut pg, &[events(500, 1_600), events(1_600, 2_000)]).await;
        assert_eq!(target.postgres_keys().await.len(), 2_000);
        assert_eq!(pg.holds(Lane::Backfill).await.unwrap(), Holds::UpTo(1_999));
    });
}

#[test]
fn postgres_copies_directly_merges_after_a_conflict_and_then_copies_directly_again() {
    let target = Target::new("pg_direct_again");
    let config = config(&target);
    let merges = u64::from(MERGE_AFTER_CONFLICT);
    rt().block_on(async {
        let mut pg = PostgresSink::new(&config.sinks.postgres, "test-log");
        send(&mut pg, &[events(0, 1_000)]).await;
        assert_eq!(pg.written(), Written { direct: 1, merged: 0 });
        // Half of it is there: the direct COPY fails and the batch is merged, over the
        // same connection.
        send(&mut pg, &[events(500, 1_500)]).await;
        assert_eq!(pg.written(), Written { direct: 1, merged: 1 });
        // The next batches are merged, then the direct way is tried again.
        let next: Vec<Batch> = (0..merges + 2)
            .map(|i| events(1_500 + i * 10, 1_510 + i * 10))
            .collect();
        send(&mut pg, &next).await;
        assert_eq!(
            pg.written(),
            Written {
                direct: 3,
                merged: 1 + merges
            }
        );
        assert_eq!(
            pg.holds(Lane::Backfill).await.unwrap(),
            Holds::UpTo(1_509 + (merges + 1) * 10)
        );
        assert_eq!(target.postgres_keys().await.len(), 1_520 + merges as usize * 10);
        assert_eq!(pg.sessions(), 1, "every batch, the conflict too, over one connection");
    });
}

#[test]
fn postgres_replaces_the_connection_of_a_write_given_up_half_way() {
    let target = Target::new("pg_given_up");
    let config = config(&target);
    rt().block_on(async {
        let mut pg = PostgresSink::new(&config.sinks.postgres, "test-log");
        send(&mut pg, &[events(0, 10)]).await;
        // The runner's attempt timeout drops a write in the middle of its transaction.
        let big = events(10, 200_010);
        let given_up = tokio::time::timeout(std::time::Duration::from_millis(20), pg.write(&big)).await;
        assert!(given_up.is_err(), "a 200,000-row write finished within 20 ms");
        // Sent again, the batch goes over a new connection, once.
        send(&mut pg, &[big]).await;
        assert_eq!(pg.sessions(), 2);
        assert_eq!(pg.holds(Lane::Backfill).await.unwrap(), Holds::UpTo(200_009));
        assert_eq!(target.postgres_keys().await.len(), 200_010);
    });
}

/// A database dropped with its sessions (as a restore or a failover ends them) is found
/// at the next write, not at the runner's next recheck: the write on the new session
/// says, once, that the events table is not the one the rows went to (so the runner
/// asks what the destination holds right after its retry), and the sink then holds
/// nothing of what it was sent before.
#[test]
fn postgres_finds_at_its_next_write_a_database_made_anew_under_it() {
    let target = Target::new("pg_made_anew");
    let config = config(&target);
    rt().block_on(async {
        let mut pg = PostgresSink::new(&config.sinks.postgres, "test-log");
        send(&mut pg, &[events(0, 10)]).await;
        assert_eq!(pg.holds(Lane::Backfill).await.unwrap(), Holds::UpTo(9));
        postgres("postgres")
            .await
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", target.name))
            .await
            .unwrap();
        let e = pg.write(&events(10, 20)).await.expect_err("a table made anew");
        assert!(e.retriable && e.code == "table", "{e}");
        assert!(e.to_string().contains("not the one this log's rows went to"), "{e}");
        pg.write(&events(10, 20)).await.expect("the retry writes");
        assert!(matches!(pg.holds(Lane::Backfill).await.unwrap(), Holds::Nothing(_)));
        assert_eq!(target.postgres_keys().await.len(), 10);
    });
}

/// The events table alone dropped and made again (or restored alone) while its cursor
/// rows stay: the runner goes back and sends everything again, and a restart in the
/// middle of that must start where the new table's rows end, not where the old
/// table's cursor row was.
#[test]
fn postgres_a_cursor_row_speaks_only_for_the_events_table_it_was_written_with() {
    let target = Target::new("pg_cursor_table");
    let config = config(&target);
    rt().block_on(async {
        let mut pg = PostgresSink::new(&config.sinks.postgres, "test-log");
        send(&mut pg, &[events(0, 1_000)]).await;
        assert_eq!(pg.holds(Lane::Backfill).await.unwrap(), Holds::UpTo(999));
        let note = pg.note().unwrap();
        drop(pg);
        postgres(&target.name)
            .await
            .batch_execute("DROP TABLE events")
            .await
            .unwrap();
        // The next run finds another table and sends from the start: a first batch.
        let mut resend = PostgresSink::new(&config.sinks.postgres, "test-log");
        resend.restore(&note);
        assert!(matches!(resend.holds(Lane::Backfill).await.unwrap(), Holds::Nothing(_)));
        send(&mut resend, &[events(0, 100)]).await;
        let note = resend.note().unwrap();
        drop(resend);
        // Killed there; the run after it must start at 100.
        let mut restarted = PostgresSink::new(&config.sinks.postgres, "test-log");
        restarted.restore(&note);
        assert_eq!(
            restarted.holds(Lane::Backfill).await.unwrap(),
            Holds::UpTo(99),
            "the old table's cursor row would skip 100..1000"
        );
        assert_eq!(target.postgres_keys().await.len(), 100);
    });
}

/// A second stream asked for subjects another stream takes: refused, not retriable (no
/// retry mends it), and the error says what to change; with its own prefix it goes.
#[test]
fn nats_refuses_a_stream_whose_subjects_another_stream_takes_and_names_the_setting() {
    let target = Target::new("nats_overlap");
    let nats = config(&target).sinks.nats;
    rt().block_on(async {
        NatsSink::new(&nats).context().await.expect("the first stream");
        let mut second = nats.clone();
        second.stream = "TV_NATS_OVERLAP_SECOND".into();
        let e = NatsSink::new(&second).context().await.expect_err("subjects overlap");
        assert!(!e.retriable, "{e}");
        let text = e.to_string();
        for part in ["overlap", "TV_NATS_OVERLAP_SECOND", "sinks.nats.subject_prefix"] {
            assert!(text.contains(part), "{part} not in: {text}");
        }

        second.subject_prefix = "tv_nats_overlap_second".into();
        let mut own = NatsSink::new(&second);
        send(&mut own, &[events(0, 10)]).await;
        let js = own.context().await.unwrap().clone();
        js.delete_stream(&second.stream).await.unwrap();
    });
}

/// The refusal of a table or stream that was there already: not retriable (the runner
/// holds its cursor and logs an error), and the error names what to change.
fn assert_refused(e: &tickvault::sink::SinkError, parts: &[&str]) {
    assert!(!e.retriable, "{e}");
    let text = e.to_string();
    for part in parts {
        assert!(text.contains(part), "{part} not in: {text}");
    }
}

/// A table of ours made before as a plain MergeTree would keep every replayed copy:
/// refused, naming the engine and the setting; once it is dropped, the same sink makes
/// its own and writes.
#[test]
fn clickhouse_refuses_a_table_of_its_name_that_would_keep_copies() {
    let target = Target::new("ch_foreign_table");
    let config = config(&target).sinks.clickhouse;
    rt().block_on(async {
        let ch = clickhouse();
        let db = &target.name;
        for sql in [
            format!("CREATE DATABASE {db}"),
            format!(
                "CREATE TABLE {db}.events_trades (feed String, symbol String, timeframe String, ts_ms Int64, \
                 uid UInt64, seq UInt64, lane String, captured_at_ns Int64, price Float64, size Float64, \
                 exchange Nullable(Int32), trade_id Nullable(String), conditions Array(Int32)) \
                 ENGINE = MergeTree ORDER BY (feed, symbol, timeframe, ts_ms, uid)"
            ),
        ] {
            ch.query(&sql).execute().await.unwrap();
        }
        let mut sink = ClickHouseSink::new(&config);
        let e = sink.write(&events(0, 30)).await.expect_err("a MergeTree of our name");
        assert_refused(&e, &["events_trades", "is a MergeTree", "sinks.clickhouse.table"]);
        let e = sink
            .scan_keys(|_| {})
            .await
            .expect_err("verify reads it no more than a write");
        assert_refused(&e, &["events_trades", "is a MergeTree"]);

        ch.query(&format!("DROP TABLE {db}.events_trades"))
            .execute()
            .await
            .unwrap();
        send(&mut sink, &[events(0, 30), events(0, 30)]).await;
        assert_eq!(held(keys!(sink)), (30, 30));
    });
}

/// Distinct keys and rows among `keys`.
fn held(keys: Vec<tickvault::sink::SinkKey>) -> (u64, u64) {
    let rows = keys.len() as u64;
    let distinct: std::collections::HashSet<_> = keys
        .into_iter()
        .map(|k| (k.feed, k.symbol, k.kind, k.timeframe, k.ts_ms, k.uid))
        .collect();
    (distinct.len() as u64, rows)
}

/// An events table made before without the unique key would let the direct COPY keep
/// every replayed copy: refused, naming the key and the setting; once the key is added,
/// the same sink writes, and a batch sent again leaves each key once.
#[test]
fn postgres_refuses_an_events_table_without_the_natural_key_as_unique_key() {
    let target = Target::new("pg_foreign_table");
    let config = config(&target).sinks.postgres;
    rt().block_on(async {
        postgres("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {}", target.name))
            .await
            .unwrap();
        let db = postgres(&target.name).await;
        db.batch_execute(
            "CREATE TABLE events (
                feed text NOT NULL, symbol text NOT NULL, kind text NOT NULL, timeframe text NOT NULL,
                ts_ms bigint NOT NULL, uid bigint NOT NULL, ts timestamptz NOT NULL,
                seq bigint NOT NULL, lane text NOT NULL, captured_at_ns bigint NOT NULL,
                bid double precision, ask double precision, bid_size double precision,
                ask_size double precision, price double precision, size double precision,
                open double precision, high double precision, low double precision,
                close double precision, volume double precision, vwap double precision,
                trades bigint, exchange integer, trade_id text, conditions integer[] NOT NULL)",
        )
        .await
        .unwrap();
        let mut sink = PostgresSink::new(&config, "test-log");
        let e = sink.write(&events(0, 30)).await.expect_err("no unique key");
        assert_refused(&e, &["table events", "unique key", "sinks.postgres.table"]);

        db.batch_execute("ALTER TABLE events ADD PRIMARY KEY (symbol, feed, kind, timeframe, ts_ms, uid, ts)")
            .await
            .unwrap();
        send(&mut sink, &[events(0, 30), events(0, 30)]).await;
        assert_eq!(held(keys!(sink)), (30, 30));
    });
}

/// A stream of our name made before for other subjects would answer every publish
/// with "no stream found": refused, naming its subjects and the setting; once our
/// subjects are added to it, the same sink publishes.
#[test]
fn nats_refuses_a_stream_of_its_name_that_does_not_take_its_subjects() {
    let target = Target::new("nats_foreign_stream");
    let nats = config(&target).sinks.nats;
    rt().block_on(async {
        let client = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = async_nats::jetstream::stream::Config {
            name: target.stream.clone(),
            subjects: vec!["tv_other.>".into()],
            ..Default::default()
        };
        js.create_stream(stream.clone()).await.unwrap();
        let mut sink = NatsSink::new(&nats);
        let e = sink.write(&events(0, 30)).await.expect_err("not our subjects");
        assert_refused(&e, &["[tv_other.>]", "tv_nats_foreign_stream.>", "sinks.nats.stream"]);

        stream.subjects.push(format!("{}.>", target.name));
        js.update_stream(stream).await.unwrap();
        send(&mut sink, &[events(0, 30)]).await;
    });
    assert_stream_holds_each_key_once(&target, 30);
}

/// A CA made here and a certificate it signed for 127.0.0.1: (the CA's PEM, the
/// certificate's PEM, its key's PEM).
fn certificate_for_loopback() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "tickvault test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// A TLS terminator in front of a server's port on loopback (as a load balancer in front
/// of ClickHouse would be), its certificate for 127.0.0.1 signed by a CA made here:
/// the terminator's port and the CA's certificate (PEM).
fn tls_terminator(rt: &tokio::runtime::Runtime, upstream: u16) -> (u16, String) {
    let (ca, cert, key) = certificate_for_loopback();
    let identity = native_tls::Identity::from_pkcs8(cert.as_bytes(), key.as_bytes()).unwrap();
    let acceptor = tokio_native_tls::TlsAcceptor::from(native_tls::TlsAcceptor::new(identity).unwrap());
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that does not trust the certificate ends its handshake here.
                let Ok(mut client) = acceptor.accept(stream).await else {
                    return;
                };
                let mut server = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    (port, ca)
}

/// ClickHouse at an `https://` url: refused, as TLS and not retriable, while the
/// server's CA is not trusted; with it as `ca_file`, the sink writes over TLS and each
/// key is kept once.
#[test]
fn clickhouse_over_tls_trusts_its_ca_file_and_refuses_a_certificate_it_cannot_verify() {
    let target = Target::new("ch_tls");
    let rt = rt();
    let (port, ca_pem) = tls_terminator(&rt, 8123);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let mut config = config(&target).sinks.clickhouse;
    config.url = format!("https://127.0.0.1:{port}");
    rt.block_on(async {
        let e = ClickHouseSink::new(&config)
            .write(&events(0, 30))
            .await
            .expect_err("a certificate of a CA not trusted");
        assert_refused(&e, &["clickhouse tls", "certificate verify failed"]);

        config.ca = Some(tickvault::sink::config::TrustedCa::read(&ca_file).unwrap());
        let mut sink = ClickHouseSink::new(&config);
        send(&mut sink, &[events(0, 30), events(0, 30)]).await;
        assert_eq!(held(keys!(sink)), (30, 30));
    });
}

/// PostgreSQL with `tls = true`: Debian's server has TLS on with its "snakeoil"
/// certificate for `localhost` (the package's default, which `scripts/services.sh`
/// keeps): trusted as `ca_file`, the sink writes over TLS (the server's
/// `pg_stat_ssl` says so); at 127.0.0.1, an address that certificate is not for, it is
/// refused as TLS, not retriable.
#[test]
fn postgres_over_tls_verifies_the_servers_certificate_and_its_host_name() {
    let target = Target::new("pg_tls");
    let mut config = config(&target).sinks.postgres;
    config.tls = true;
    config.ca =
        Some(tickvault::sink::config::TrustedCa::read(Path::new("/etc/ssl/certs/ssl-cert-snakeoil.pem")).unwrap());
    rt().block_on(async {
        let e = PostgresSink::new(&config, "test-log")
            .write(&events(0, 30))
            .await
            .expect_err("a certificate for localhost, at 127.0.0.1");
        assert_refused(&e, &["postgres tls", "certificate verify failed"]);

        config.host = "localhost".into();
        let mut sink = PostgresSink::new(&config, "test-log");
        send(&mut sink, &[events(0, 30), events(0, 30)]).await;
        assert_eq!(held(keys!(sink)), (30, 30));
        // The sink keeps its connection: seen from another one, it is over TLS.
        let over_tls: i64 = postgres(&target.name)
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                 WHERE a.application_name = 'tickvault' AND a.datname = $1 AND s.ssl",
                &[&target.name],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(over_tls, 1, "the sink's connection is over TLS");
    });
}

/// JetStream over TLS: a nats-server of this test's own with TLS required and a
/// certificate of a CA made here. Refused, as TLS and not retriable, while the CA is not
/// trusted; with it as `ca_file`, the sink publishes and the stream holds each key once.
#[test]
fn nats_over_tls_trusts_its_ca_file_and_refuses_a_certificate_it_cannot_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificate_for_loopback();
    let file = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let (ca_file, cert_file, key_file) = (file("ca.pem", &ca), file("cert.pem", &cert), file("key.pem", &key));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = common::sinks::nats_server(port, &dir.path().join("js"), Some((&cert_file, &key_file)));
    let mut nats = tickvault::sink::config::NatsConfig {
        url: format!("tls://127.0.0.1:{port}"),
        stream: "TV_NATS_TLS".into(),
        subject_prefix: "tv_nats_tls".into(),
        ..Default::default()
    };
    rt().block_on(async {
        let e = NatsSink::new(&nats)
            .write(&events(0, 30))
            .await
            .expect_err("a certificate of a CA not trusted");
        assert_refused(&e, &["nats tls"]);

        nats.ca = Some(tickvault::sink::config::TrustedCa::read(&ca_file).unwrap());
        let mut sink = NatsSink::new(&nats);
        send(&mut sink, &[events(0, 30), events(0, 30)]).await;
        let mut keys = Vec::new();
        sink.scan(|row| keys.push(row.key_string())).await.unwrap();
        let distinct: HashSet<&String> = keys.iter().collect();
        assert_eq!((keys.len(), distinct.len()), (30, 30));
    });
}
