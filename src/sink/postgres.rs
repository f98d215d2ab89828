//! TimescaleDB / PostgreSQL: each batch is one transaction that puts the rows into the
//! events table and records the sink's cursor for this log. The rows go in by binary
//! COPY, straight into the events table while none of their keys is there (the usual
//! case), else into a session-local staging table and from it with
//! `INSERT ... ON CONFLICT (natural key) DO NOTHING` (see `write_batch`). The runner
//! starts from that cursor row: past the log's cursor after a crash between the commit
//! and the log's own cursor move, behind it when the database lost what it was sent
//! (restored from a backup, emptied, or a new one), so the log sends it again.
//!
//! Derived bars (the derived lane) go to a table of their own, `<table>_derived`, one
//! row per natural key: always through a staging table, whose rows replace those of the
//! table only when their version is higher (`ON CONFLICT ... DO UPDATE ... WHERE`), so
//! that a replayed older version never overwrites a newer one.
//!
//! With the timescaledb extension available the events table becomes a hypertable on
//! `ts` (and gets a retention policy when one is configured); without it, it is a plain
//! table whose primary key is the natural key. Gap detection never reads this table, so
//! its retention can be as short as its users like.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};

use super::config::{PostgresConfig, TrustedCa};
use super::runner::WentTo;
use super::{Batch, Holds, Sink, SinkError, SinkKey};
use tickvault_wal::Lane;

const NAME: &str = "postgres";

/// Staging columns, in COPY order (the events table adds `ts`, computed from `ts_ms`).
const STAGING_COLUMNS: &str = "feed, symbol, kind, timeframe, ts_ms, uid, seq, lane, captured_at_ns, \
     bid, ask, bid_size, ask_size, price, size, open, high, low, close, volume, vwap, \
     trades, exchange, trade_id, conditions";

/// The COPY types of the events table's columns: the staging table's (the first
/// `STAGING_TYPES`), then `ts`.
const EVENT_TYPES: [Type; 26] = [
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::INT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::INT8,
    Type::INT4,
    Type::TEXT,
    Type::INT4_ARRAY,
    Type::TIMESTAMPTZ,
];
const STAGING_TYPES: usize = 25;

/// The derived table's columns, in COPY order (the table adds `ts`, computed from `ts_ms`).
const DERIVED_COLUMNS: &str = "feed, symbol, timeframe, ts_ms, version, seq, lane, captured_at_ns, \
     open, high, low, close, volume, vwap, trades, \
     sma20, ema20, rsi14, macd, macd_signal, macd_hist, bb_upper, bb_middle, bb_lower, atr14";

const DERIVED_TYPES: [Type; 25] = [
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT4,
    Type::INT8,
    Type::TEXT,
    Type::INT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::INT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
];

/// The derived table's unique key: the natural key of a bar (its kind and uid are
/// always `derived` and 0), and `ts`.
const DERIVED_KEY: &str = "feed, symbol, timeframe, ts_ms, ts";

pub struct PostgresSink {
    config: PostgresConfig,
    /// The log's identity: this sink's cursor rows are keyed by it, so appliances sharing
    /// one database keep separate cursors.
    log_id: String,
    /// Whether a write records the batch's position in the cursors table (a replay's
    /// does not: what it sends is a range, not everything up to a position).
    record_position: bool,
    session: Option<Session>,
    /// Set while a write is in flight: if the runner gave up on it (timeout), the
    /// connection is in an unknown state and is replaced.
    in_flight: bool,
    /// Batches still to merge before trying the direct way again (see `write_batch`).
    merge_next: u32,
    /// Batches written each way, for the tests.
    written: Written,
    /// Sessions (connections) opened so far.
    sessions: u64,
    /// The table the cursor's rows went to (the events table, or the derived table for
    /// the derived lane): `<database>.<table> oid <oid>`. A table dropped and made again
    /// has another oid.
    table_id: WentTo,
}

/// Batches a PostgreSQL sink wrote each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// COPYed into the events table.
    pub direct: u64,
    /// Through the staging table and `INSERT ... ON CONFLICT DO NOTHING`.
    pub merged: u64,
}

/// One connection and the statements of every batch, prepared on it: the two COPYs
/// (into the events table, into the staging table), staging -> events, the derived
/// bars' COPY and upsert, and the cursor upsert.
struct Session {
    client: Client,
    copy_direct: Statement,
    copy_staging: Statement,
    insert: Statement,
    copy_derived: Statement,
    upsert_derived: Statement,
    cursor: Statement,
}

impl PostgresSink {
    pub fn new(config: &PostgresConfig, log_id: &str) -> PostgresSink {
        PostgresSink {
            config: config.clone(),
            log_id: log_id.to_owned(),
            record_position: true,
            session: None,
            in_flight: false,
            merge_next: 0,
            written: Written::default(),
            sessions: 0,
            table_id: WentTo::default(),
        }
    }

    /// A sink for `tickvault replay`: its writes leave the cursors table as it is.
    pub fn for_replay(mut self) -> PostgresSink {
        self.record_position = false;
        self
    }

    fn pg_config(&self, database: &str) -> tokio_postgres::Config {
        let mut pg = tokio_postgres::Config::new();
        pg.host(&self.config.host)
            .port(self.config.port)
            .user(&self.config.user)
            .dbname(database)
            .application_name("tickvault")
            .connect_timeout(Duration::from_secs(5));
        if let Some(password) = &self.config.password {
            pg.password(password.expose());
        }
        if self.config.tls {
            pg.ssl_mode(SslMode::Require);
        }
        pg
    }

    async fn open(&self, database: &str) -> Result<Client, tokio_postgres::Error> {
        let config = self.pg_config(database);
        if !self.config.tls {
            let (client, connection) = config.connect(NoTls).await?;
            tokio::spawn(drive(connection));
            return Ok(client);
        }
        let tls = MakeTlsConnector::new(TrustedCa::connector(self.config.ca.as_ref()));
        let (client, connection) = config.connect(tls).await?;
        tokio::spawn(drive(connection));
        Ok(client)
    }

    /// The table `lane`'s rows go to: the derived lane's own, or the events table.
    fn table_of(&self, lane: Lane) -> String {
        match lane {
            Lane::Derived => format!("{}_derived", self.config.table),
            _ => self.config.table.clone(),
        }
    }

    /// The oid of `lane`'s table (`None` if it is gone) and this log's cursor row for
    /// `lane`, in one query.
    async fn look(&mut self, lane: Lane) -> Result<(Option<u32>, Option<i64>), SinkError> {
        let (table, log_id) = (self.table_of(lane), self.log_id.clone());
        let cursors = format!("{}_cursors", self.config.table);
        let client = &self.session().await?.client;
        let row = client
            .query_one(
                &format!(
                    "SELECT to_regclass($1)::oid,
                            (SELECT seq FROM {cursors} WHERE log_id = $2 AND lane = $3
                               AND (events_oid IS NULL OR events_oid = to_regclass($1)::oid))"
                ),
                &[&table, &log_id, &lane.name()],
            )
            .await
            .map_err(classify)?;
        Ok((row.get(0), row.get(1)))
    }

    /// The session, made (and the database, tables and staging table created) if needed.
    async fn session(&mut self) -> Result<&mut Session, SinkError> {
        if self.session.as_ref().is_some_and(|s| s.client.is_closed()) {
            self.session = None;
        }
        if self.session.is_none() {
            let client = match self.open(&self.config.database).await {
                Err(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {
                    let admin = self.open("postgres").await.map_err(classify)?;
                    let create = format!("CREATE DATABASE {}", self.config.database);
                    match admin.batch_execute(&create).await {
                        Ok(()) => {}
                        // Another runner created it first (PostgreSQL reports the race
                        // as a unique violation on its catalog).
                        Err(e)
                            if e.code() == Some(&SqlState::DUPLICATE_DATABASE)
                                || e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
                        Err(e) => return Err(classify(e)),
                    }
                    self.open(&self.config.database).await.map_err(classify)?
                }
                other => other.map_err(classify)?,
            };
            prepare(&client, &self.config).await?;
            let table = &self.config.table;
            let insert = client
                .prepare(&format!(
                    "INSERT INTO {table} ({STAGING_COLUMNS}, ts)
                     SELECT {STAGING_COLUMNS}, to_timestamp(ts_ms / 1000.0) FROM tickvault_staging
                     ON CONFLICT ({UNIQUE_KEY}) DO NOTHING"
                ))
                .await
                .map_err(classify)?;
            let derived_update: Vec<String> = DERIVED_COLUMNS
                .split(", ")
                .map(str::trim)
                .filter(|c| !DERIVED_KEY.split(", ").any(|k| k == *c))
                .map(|c| format!("{c} = EXCLUDED.{c}"))
                .collect();
            // One row per key from the batch (its highest version), and it replaces the
            // table's only when newer: a replay of older versions changes nothing.
            let upsert_derived = client
                .prepare(&format!(
                    "INSERT INTO {table}_derived ({DERIVED_COLUMNS}, ts)
                     SELECT DISTINCT ON (feed, symbol, timeframe, ts_ms)
                            {DERIVED_COLUMNS}, to_timestamp(ts_ms / 1000.0)
                     FROM tickvault_staging_derived
                     ORDER BY feed, symbol, timeframe, ts_ms, version DESC
                     ON CONFLICT ({DERIVED_KEY}) DO UPDATE SET {}
                     WHERE {table}_derived.version < EXCLUDED.version",
                    derived_update.join(", ")
                ))
                .await
                .map_err(classify)?;
            let copy_derived = client
                .prepare(&format!(
                    "COPY tickvault_staging_derived ({DERIVED_COLUMNS}) FROM STDIN BINARY"
                ))
                .await
                .map_err(classify)?;
            let cursor = client
                .prepare(&format!(
                    "INSERT INTO {table}_cursors (log_id, lane, seq, updated_at, events_oid)
                     VALUES ($1, $2, $3, now(), to_regclass($4)::oid)
                     ON CONFLICT (log_id, lane) DO UPDATE
                     SET seq = CASE
                             WHEN {table}_cursors.events_oid IS NULL
                               OR {table}_cursors.events_oid = EXCLUDED.events_oid
                             THEN GREATEST({table}_cursors.seq, EXCLUDED.seq)
                             ELSE EXCLUDED.seq END,
                         events_oid = EXCLUDED.events_oid, updated_at = now()"
                ))
                .await
                .map_err(classify)?;
            let copy_direct = client
                .prepare(&format!("COPY {table} ({STAGING_COLUMNS}, ts) FROM STDIN BINARY"))
                .await
                .map_err(classify)?;
            let copy_staging = client
                .prepare(&format!("COPY tickvault_staging ({STAGING_COLUMNS}) FROM STDIN BINARY"))
                .await
                .map_err(classify)?;
            self.session = Some(Session {
                client,
                copy_direct,
                copy_staging,
                insert,
                copy_derived,
                upsert_derived,
                cursor,
            });
            self.sessions += 1;
        }
        Ok(self.session.as_mut().expect("connected above"))
    }

    /// Drops the database and everything in it (benchmarks and tests start from nothing),
    /// retrying while a just-closed session still holds it.
    ///
    /// `WITH (FORCE)` ends our own sessions, but fails as a whole (42501) while an
    /// autovacuum worker, which only a superuser may end, is in the database: after a
    /// large COPY that worker can run for longer than the retries last. A plain `DROP`
    /// then goes through, since PostgreSQL itself tells autovacuum workers in the
    /// database to exit.
    pub async fn drop_database(&self) -> Result<(), SinkError> {
        let admin = self.open("postgres").await.map_err(classify)?;
        let name = &self.config.database;
        let (force, plain) = (
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("DROP DATABASE IF EXISTS {name}"),
        );
        let mut sql = &force;
        let mut tries = 0;
        loop {
            match admin.batch_execute(sql).await {
                Ok(()) => return Ok(()),
                Err(e) if tries < 200 => {
                    tries += 1;
                    if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
                        sql = &plain;
                    } else {
                        sql = &force;
                    }
                    tracing::debug!(error = %e, "database still in use; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(classify(e)),
            }
        }
    }

    /// Calls `visit` with the natural key of every row of the events table, streamed;
    /// returns how many (for `verify`).
    pub async fn scan_keys(&mut self, mut visit: impl FnMut(SinkKey)) -> Result<u64, SinkError> {
        use futures_util::TryStreamExt as _;
        let table = self.config.table.clone();
        let client = &self.session().await?.client;
        // A derived bar's version stands in its uid's place (see `Row::verify_uid`).
        let sql = format!(
            "SELECT feed, symbol, kind, timeframe, ts_ms, uid FROM {table}
             UNION ALL
             SELECT feed, symbol, 'derived', timeframe, ts_ms, version::bigint FROM {table}_derived"
        );
        let rows = client
            .query_raw(sql.as_str(), std::iter::empty::<&(dyn ToSql + Sync)>())
            .await
            .map_err(classify)?;
        let mut rows = std::pin::pin!(rows);
        let mut seen = 0;
        while let Some(r) = rows.try_next().await.map_err(classify)? {
            visit(SinkKey {
                feed: r.get(0),
                symbol: r.get(1),
                kind: r.get(2),
                timeframe: r.get(3),
                ts_ms: r.get(4),
                // Stored as bigint: the same 64 bits.
                uid: r.get::<_, i64>(5) as u64,
            });
            seen += 1;
        }
        Ok(seen)
    }

    /// The minutes in `from_ms..to_ms` the events table holds a one-minute bar of
    /// `symbol` for.
    pub async fn bar_minutes(
        &mut self,
        feed: &str,
        symbol: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<i64>, SinkError> {
        let table = self.config.table.clone();
        let client = &self.session().await?.client;
        let rows = client
            .query(
                &format!(
                    "SELECT ts_ms FROM {table} WHERE feed = $1 AND symbol = $2 AND kind = 'bar' \
                     AND timeframe = '1m' AND ts_ms >= $3 AND ts_ms < $4"
                ),
                &[&feed, &symbol, &from_ms, &to_ms],
            )
            .await
            .map_err(classify)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// One batch, one transaction. The direct way COPYs the rows into the events table
    /// itself: when none of their keys is there yet (the usual case) that is all the
    /// merge does, at about half its cost. A key already there (a redundant appliance, or
    /// the same bar captured on both lanes) fails that COPY, and so the whole transaction,
    /// with a unique violation: nothing of it was written, and the batch is merged instead,
    /// as are the next few, before the direct way is tried again.
    async fn write_batch(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if batch.lane == Lane::Derived {
            self.write_rows(batch, Way::Derived).await.map_err(Failed::into_sink)?;
            self.written.merged += 1;
            return Ok(());
        }
        if self.merge_next > 0 {
            self.merge_next -= 1;
        } else {
            match self.write_rows(batch, Way::Direct).await {
                Err(Failed::Db(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    tracing::debug!(lane = %batch.lane, last_seq = batch.last_seq, "rows already there; merging");
                    self.merge_next = MERGE_AFTER_CONFLICT;
                    // The COMMIT sent with the COPY ended the failed transaction; this
                    // makes sure of it whatever the COPY's error stopped (a warning, not
                    // an error, when there is none).
                    let session = self.session().await?;
                    session.client.batch_execute("ROLLBACK").await.map_err(classify)?;
                }
                Ok(()) => {
                    self.written.direct += 1;
                    return Ok(());
                }
                Err(e) => return Err(e.into_sink()),
            }
        }
        self.write_rows(batch, Way::Merge).await.map_err(Failed::into_sink)?;
        self.written.merged += 1;
        Ok(())
    }

    /// Which of `lane`'s tables this is: its database, name and oid.
    fn identity(&self, lane: Lane, oid: u32) -> String {
        format!("{}.{} oid {oid}", self.config.database, self.table_of(lane))
    }

    /// Before a write on a new session (the server ended the last one: a restart, a
    /// failover, the database dropped with its sessions): an error if the events table
    /// is not the one this log's rows went to, so that the runner asks what the
    /// destination holds right after this write, rather than at its next recheck.
    /// Reconnecting is silent otherwise (the session is opened again within the write),
    /// and a database made anew under a live runner went unnoticed for up to 30 s.
    async fn made_anew(&mut self, lane: Lane) -> Result<(), SinkError> {
        let reopens = self.session.as_ref().is_none_or(|s| s.client.is_closed());
        let Some(went_to) = self.table_id.get().filter(|_| reopens).map(str::to_owned) else {
            return Ok(());
        };
        let now = match self.look(lane).await? {
            (Some(oid), _) => self.identity(lane, oid),
            (None, _) => "gone".to_owned(),
        };
        if now == went_to {
            return Ok(());
        }
        Err(SinkError::retriable(
            NAME,
            "table",
            format!(
                "the session was ended and the events table is not the one this log's rows went to ({went_to}; now {now})"
            ),
        ))
    }

    /// Sessions (connections) opened so far: one, while nothing fails.
    pub fn sessions(&self) -> u64 {
        self.sessions
    }

    /// Batches written each way so far.
    pub fn written(&self) -> Written {
        self.written
    }

    async fn write_rows(&mut self, batch: &Batch, way: Way) -> Result<(), Failed> {
        let log_id = self.log_id.clone();
        let lane_table = self.table_of(batch.lane);
        let lane = batch.lane.name();
        let record_position = self.record_position;
        let session = self.session().await.map_err(Failed::Sink)?;
        let client = &session.client;
        let (copy, types) = match way {
            Way::Direct => (&session.copy_direct, &EVENT_TYPES[..]),
            Way::Merge => (&session.copy_staging, &EVENT_TYPES[..STAGING_TYPES]),
            Way::Derived => (&session.copy_derived, &DERIVED_TYPES[..]),
        };
        // Pipelined: BEGIN and the COPY's start go together, one round trip (a write on
        // a busy host pays a wake-up of the server's backend and of this task for each).
        // Should BEGIN fail, the COPY does not go on outside a transaction: the error
        // drops the COPY's sink, and a sink dropped unfinished ends the COPY with
        // CopyFail.
        let ((), copy) = tokio::try_join!(client.batch_execute("BEGIN"), client.copy_in(copy))?;
        let writer = BinaryCopyInWriter::new(copy, types);
        tokio::pin!(writer);
        for r in &batch.rows {
            // A uid has 63 bits (event::identity): it fits a bigint as it is.
            let (uid, seq) = (
                i64::try_from(r.uid).unwrap_or(i64::MAX),
                i64::try_from(r.seq).unwrap_or(i64::MAX),
            );
            let trades = r.trades.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
            if let Way::Derived = way {
                let version = r.version.map_or(0, |v| i32::try_from(v).unwrap_or(i32::MAX));
                let i = r.indicators.as_deref().copied().unwrap_or_default();
                let values: [&(dyn ToSql + Sync); 25] = [
                    &r.feed,
                    &r.symbol,
                    &r.timeframe,
                    &r.ts_ms,
                    &version,
                    &seq,
                    &r.lane,
                    &r.captured_at_ns,
                    &r.open,
                    &r.high,
                    &r.low,
                    &r.close,
                    &r.volume,
                    &r.vwap,
                    &trades,
                    &i.sma20,
                    &i.ema20,
                    &i.rsi14,
                    &i.macd,
                    &i.macd_signal,
                    &i.macd_hist,
                    &i.bb_upper,
                    &i.bb_middle,
                    &i.bb_lower,
                    &i.atr14,
                ];
                writer.as_mut().write(&values).await?;
                continue;
            }
            let ts = timestamp(r.ts_ms);
            let values: [&(dyn ToSql + Sync); 26] = [
                &r.feed,
                &r.symbol,
                &r.kind,
                &r.timeframe,
                &r.ts_ms,
                &uid,
                &seq,
                &r.lane,
                &r.captured_at_ns,
                &r.bid,
                &r.ask,
                &r.bid_size,
                &r.ask_size,
                &r.price,
                &r.size,
                &r.open,
                &r.high,
                &r.low,
                &r.close,
                &r.volume,
                &r.vwap,
                &trades,
                &r.exchange,
                &r.trade_id,
                &r.conditions,
                &ts,
            ];
            writer.as_mut().write(&values[..types.len()]).await?;
        }
        // Pipelined too: the COPY's end, the merge, the cursor row and COMMIT, one round
        // trip. The server runs them in order; after an error in one, the rest fail
        // and COMMIT ends the transaction as a ROLLBACK, and the first error is what
        // this returns.
        let seq = i64::try_from(batch.last_seq).unwrap_or(i64::MAX);
        let position: [&(dyn ToSql + Sync); 4] = [&log_id, &lane, &seq, &lane_table];
        let cursor = async {
            match record_position {
                true => client.execute(&session.cursor, &position).await,
                false => Ok(0),
            }
        };
        match way {
            Way::Direct => {
                tokio::try_join!(writer.as_mut().finish(), cursor, client.batch_execute("COMMIT"))?;
            }
            Way::Merge | Way::Derived => {
                let merge = match way {
                    Way::Derived => &session.upsert_derived,
                    _ => &session.insert,
                };
                tokio::try_join!(
                    writer.as_mut().finish(),
                    client.execute(merge, &[]),
                    cursor,
                    client.batch_execute("COMMIT")
                )?;
            }
        }
        Ok(())
    }
}

/// How a batch goes into the events table (see `write_batch`).
#[derive(Clone, Copy)]
enum Way {
    Direct,
    Merge,
    /// Derived bars: staged, then upserted by version.
    Derived,
}

/// Batches merged after the direct way met a key already there, before trying it again.
pub const MERGE_AFTER_CONFLICT: u32 = 16;

/// A write's failure: from the server (to be looked at), or already classified.
enum Failed {
    Db(tokio_postgres::Error),
    Sink(SinkError),
}

impl From<tokio_postgres::Error> for Failed {
    fn from(e: tokio_postgres::Error) -> Failed {
        Failed::Db(e)
    }
}

impl Failed {
    fn into_sink(self) -> SinkError {
        match self {
            Failed::Db(e) => classify(e),
            Failed::Sink(e) => e,
        }
    }
}

/// `ts_ms` as a `timestamptz` (the events table's time column).
fn timestamp(ts_ms: i64) -> SystemTime {
    let magnitude = Duration::from_millis(ts_ms.unsigned_abs());
    if ts_ms >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

/// Runs a connection until it ends (the client drops it, or the server goes).
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "postgres connection ended");
    }
}

/// Creates what is missing: with timescaledb, the events table as a hypertable.
async fn prepare(client: &Client, config: &PostgresConfig) -> Result<(), SinkError> {
    let table = &config.table;
    let available = client
        .query_opt("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'", &[])
        .await
        .map_err(classify)?
        .is_some();
    let timescale = available
        && match client.batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb").await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "timescaledb is available but could not be enabled; using a plain table");
                false
            }
        };
    // `ts` is in the primary key only because a hypertable's unique keys must hold its
    // time column; it is a function of `ts_ms`, so uniqueness is the natural key's.
    // Runners (and appliances) start together: `CREATE TABLE IF NOT EXISTS` is not safe
    // against itself in PostgreSQL, so the DDL runs under a transaction-scoped advisory lock.
    client
        .batch_execute(&format!(
            "BEGIN;
            SELECT pg_advisory_xact_lock(hashtext('tickvault-ddl'));
            CREATE TABLE IF NOT EXISTS {table} (
                feed text NOT NULL, symbol text NOT NULL, kind text NOT NULL, timeframe text NOT NULL,
                ts_ms bigint NOT NULL, uid bigint NOT NULL, ts timestamptz NOT NULL,
                seq bigint NOT NULL, lane text NOT NULL, captured_at_ns bigint NOT NULL,
                bid double precision, ask double precision,
                bid_size double precision, ask_size double precision,
                price double precision, size double precision,
                open double precision, high double precision, low double precision,
                close double precision, volume double precision, vwap double precision,
                trades bigint, exchange integer, trade_id text, conditions integer[] NOT NULL,
                PRIMARY KEY ({UNIQUE_KEY})
            );
            CREATE TABLE IF NOT EXISTS {table}_cursors (
                log_id text NOT NULL, lane text NOT NULL, seq bigint NOT NULL,
                updated_at timestamptz NOT NULL, events_oid oid, PRIMARY KEY (log_id, lane)
            );
            CREATE TABLE IF NOT EXISTS {table}_derived (
                feed text NOT NULL, symbol text NOT NULL, timeframe text NOT NULL,
                ts_ms bigint NOT NULL, ts timestamptz NOT NULL, version integer NOT NULL,
                seq bigint NOT NULL, lane text NOT NULL, captured_at_ns bigint NOT NULL,
                open double precision NOT NULL, high double precision NOT NULL,
                low double precision NOT NULL, close double precision NOT NULL,
                volume double precision NOT NULL, vwap double precision, trades bigint,
                sma20 double precision, ema20 double precision, rsi14 double precision,
                macd double precision, macd_signal double precision, macd_hist double precision,
                bb_upper double precision, bb_middle double precision, bb_lower double precision,
                atr14 double precision,
                PRIMARY KEY ({DERIVED_KEY})
            );
            -- The events table a cursor row speaks for: one dropped and made again (or
            -- restored alone) has another oid, and the row then says nothing of it.
            -- Rows written before this column: NULL, taken as the table there now.
            ALTER TABLE {table}_cursors ADD COLUMN IF NOT EXISTS events_oid oid;
            COMMIT;
            CREATE TEMP TABLE IF NOT EXISTS tickvault_staging (
                feed text, symbol text, kind text, timeframe text, ts_ms bigint, uid bigint,
                seq bigint, lane text, captured_at_ns bigint,
                bid double precision, ask double precision,
                bid_size double precision, ask_size double precision,
                price double precision, size double precision,
                open double precision, high double precision, low double precision,
                close double precision, volume double precision, vwap double precision,
                trades bigint, exchange integer, trade_id text, conditions integer[]
            ) ON COMMIT DELETE ROWS;
            CREATE TEMP TABLE IF NOT EXISTS tickvault_staging_derived
                (LIKE {table}_derived INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
            ALTER TABLE tickvault_staging_derived ALTER COLUMN ts DROP NOT NULL;"
        ))
        .await
        .map_err(classify)?;
    check_unique_key(client, table, UNIQUE_KEY).await?;
    let derived = format!("{table}_derived");
    check_unique_key(client, &derived, DERIVED_KEY).await?;
    if timescale {
        for table in [table, &derived] {
            client
                .batch_execute(&format!(
                    "BEGIN;
                    SELECT pg_advisory_xact_lock(hashtext('tickvault-ddl'));
                    SELECT create_hypertable('{table}', 'ts', if_not_exists => TRUE, migrate_data => TRUE);
                    COMMIT;"
                ))
                .await
                .map_err(classify)?;
            if let Some(retention) = config.retention {
                client
                    .batch_execute(&format!(
                        "SELECT add_retention_policy('{table}', INTERVAL '{} seconds', if_not_exists => TRUE)",
                        retention.as_secs()
                    ))
                    .await
                    .map_err(classify)?;
            }
        }
    }
    Ok(())
}

/// The events table's unique key: the natural key, and `ts` (see [`prepare`]); its
/// primary key, the merge's `ON CONFLICT` target, and what [`check_unique_key`] looks for.
const UNIQUE_KEY: &str = "feed, symbol, kind, timeframe, ts_ms, uid, ts";

/// Refuses a table that was there before without a unique index on exactly `unique`, the
/// natural key (`CREATE TABLE IF NOT EXISTS` leaves it as it is): the direct COPY
/// relies on it to fail on a key that is there, and the merges name it in their
/// `ON CONFLICT`, so without it every replayed copy would be kept.
async fn check_unique_key(client: &Client, table: &str, unique: &str) -> Result<(), SinkError> {
    // Sorted, as the query sorts the index's columns.
    let mut key: Vec<&str> = unique.split(", ").collect();
    key.sort_unstable();
    let found: bool = client
        .query_one(
            "SELECT EXISTS (
                SELECT 1 FROM pg_index i
                WHERE i.indrelid = to_regclass($1) AND i.indisunique
                  AND i.indpred IS NULL AND i.indexprs IS NULL
                  AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text) FROM pg_attribute a
                       WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)) = $2::text[])",
            &[&table, &key],
        )
        .await
        .map_err(classify)?
        .get(0);
    if found {
        return Ok(());
    }
    Err(SinkError::fatal(
        NAME,
        "table",
        format!(
            "table {table} was there already without a unique key on ({unique}): each event would \
             not be kept once; tickvault makes it with that primary key. Add it, rename or drop that \
             table, or set sinks.postgres.table to another name"
        ),
    ))
}

impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        NAME
    }

    /// The cursor row, committed with the rows: what this database holds of the log's
    /// lane, whichever way it differs from the log's cursor. No row: nothing (a new
    /// database or table, or one emptied or restored from before this log's first
    /// write to it). An events table other than the one the cursor's rows went to
    /// (dropped and made again) holds nothing of them either, whatever its cursor row.
    async fn holds(&mut self, lane: Lane) -> Result<Holds, SinkError> {
        let looked = self.look(lane).await;
        if looked.is_err() {
            self.session = None;
        }
        let (oid, seq) = match looked? {
            (Some(oid), seq) => (oid, seq),
            // The table is gone under a session that made it: make it again.
            (None, _) => {
                self.session = None;
                match self.look(lane).await? {
                    (Some(oid), seq) => (oid, seq),
                    (None, _) => return Err(SinkError::retriable(NAME, "table", "the events table is gone")),
                }
            }
        };
        let found = self.identity(lane, oid);
        if let nothing @ Holds::Nothing(_) = self.table_id.found(&found) {
            return Ok(nothing);
        }
        Ok(Holds::UpTo(seq.map_or(0, |s| u64::try_from(s).unwrap_or(0))))
    }

    async fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if self.in_flight {
            // The runner gave up on the last write half way (a timeout): its transaction
            // may still be open on that connection.
            self.session = None;
        }
        // Said before any row is sent, keeping the session just opened: the retry writes
        // on it, and the runner's look that follows adopts the table.
        self.made_anew(batch.lane).await?;
        // The driver's timestamp conversion overflows (a panic, with overflow checks) far
        // before PostgreSQL's own limit: a row past it is refused here, as the server
        // refuses a value it cannot store. Capture refuses such events; a log written
        // before it did may hold some.
        if let Some(r) = batch.rows.iter().find(|r| !crate::event::SANE_TS_MS.contains(&r.ts_ms)) {
            return Err(SinkError::content(
                NAME,
                "value",
                format!("ts_ms {} is outside 2000-01-01..2100-01-01", r.ts_ms),
            ));
        }
        self.in_flight = true;
        let result = self.write_batch(batch).await;
        self.in_flight = false;
        if result.is_err() {
            // Start from a fresh session: the staging table and any half transaction go.
            self.session = None;
        }
        result
    }

    fn note(&self) -> Option<Vec<u8>> {
        self.table_id.get().map(|t| t.as_bytes().to_vec())
    }

    fn restore(&mut self, note: &[u8]) {
        self.table_id = WentTo::noted(String::from_utf8(note.to_vec()).ok());
    }
}

pub(crate) fn classify(e: tokio_postgres::Error) -> SinkError {
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection itself failed (refused, reset, closed), or its TLS.
        return match super::error::explain(&e) {
            (text, true) => SinkError::fatal(NAME, "tls", text),
            (text, false) => SinkError::retriable(NAME, "connection", text),
        };
    };
    let state = code.code();
    let retriable = state.starts_with("08") // connection exceptions
        || state.starts_with("53") // insufficient resources
        || state.starts_with("57") // operator intervention: shutdown, cannot connect now
        || state == "40001" // serialization failure
        || state == "40P01" // deadlock
        || state == "42P01" // undefined table: dropped under us, recreated on reconnect
        || state == "3D000"; // database dropped under us
    let message = match e.as_db_error() {
        Some(db) => format!("{state}: {}", db.message()),
        None => format!("{state}: {e}"),
    };
    // A value the table cannot hold: data exceptions (a NUL in text, a timestamp out of
    // range, a number too large), a NOT NULL or CHECK constraint, a row too large.
    let content = state.starts_with("22") || state == "23502" || state == "23514" || state == "54000";
    if retriable {
        SinkError::retriable(NAME, "server", message)
    } else if content {
        SinkError::content(NAME, "value", message)
    } else {
        SinkError::fatal(NAME, "refused", message)
    }
}
