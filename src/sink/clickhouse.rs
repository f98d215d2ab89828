//! ClickHouse: one ReplacingMergeTree table per kind of event (`<table>_quotes`,
//! `<table>_trades`, `<table>_bars`, `<table>_derived`), each ordered by the natural key
//! with the capture sequence as its version (a derived bar's own version in
//! `<table>_derived`, so its highest stands), so a replayed or redundant row collapses
//! into one at merge time (and at once for readers who query with `FINAL`). Inserts are RowBinary over
//! HTTP (the `clickhouse` crate), one insert per kind present in a batch, so a retry
//! resends identical blocks.
//!
//! A table per kind rather than one wide table: every column of a MergeTree part is two
//! files (and a `Nullable` column two more), so a wide table with the other kinds'
//! columns null wrote 90 files per insert where these write 38 to 40, and a backfill of
//! bars carried 11 null columns per row. Measured on 100,000 bars: 150-190 ms per insert
//! into the wide table, 77-88 ms into the bars table.
//!
//! Works with ClickHouse 18.16 (Debian's) and current releases: the DDL sticks to what
//! both understand (no `DateTime64`, no `LowCardinality`, partitions by an expression of
//! `ts_ms`), nothing relies on settings newer servers added, and HTTP compression is off
//! (18.16 returns nothing for a compressed RowBinary query).

use super::config::ClickHouseConfig;
use super::runner::WentTo;
use super::{Batch, Holds, Row, Sink, SinkError, SinkKey};
use serde::{Deserialize, Serialize};
use tickvault_wal::Lane;

use crate::event::EventKind as Kind;

const NAME: &str = "clickhouse";

pub struct ClickHouseSink {
    client: clickhouse::Client,
    database: String,
    table: String,
    /// Whether the database and table are known to exist (checked after any error).
    prepared: bool,
    /// The tables the cursor's rows went to (see [`Tables`]).
    tables: WentTo,
    /// Each table's identity as last found, in [`KINDS`]' order.
    found: Option<Vec<String>>,
    /// Whether the server's `system.tables` has a `uuid` column (asked once).
    has_uuid: Option<bool>,
}

impl ClickHouseSink {
    pub fn new(config: &ClickHouseConfig) -> ClickHouseSink {
        // No HTTP-level LZ4: ClickHouse 18.16 answers `compress=1` queries with an empty
        // body, and on loopback or a LAN the CPU it costs matters more than the bytes.
        // The crate's default HTTP client, but with TCP_NODELAY: an insert's last chunk
        // is a few bytes sent after the body, and under Nagle's algorithm it waits for
        // the server's delayed ACK (40 ms on Linux). Measured here on live inserts: 71 ms
        // p50 without it, against 20 ms for the same insert by `curl`.
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_keepalive(Some(std::time::Duration::from_secs(60)));
        // `https://` urls over TLS (native-tls: the system's CAs and `ca_file`), and
        // `http://` as before.
        connector.enforce_http(false);
        let tls = super::config::TrustedCa::connector(config.ca.as_ref());
        let connector = hyper_tls::HttpsConnector::from((connector, tls.into()));
        let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            // Below ClickHouse's 3 s keep-alive, so the pool never reuses a closing socket.
            .pool_idle_timeout(std::time::Duration::from_secs(2))
            .build(connector);
        let mut client = clickhouse::Client::with_http_client(http)
            .with_url(&config.url)
            .with_user(&config.user)
            .with_compression(clickhouse::Compression::None);
        if let Some(password) = &config.password {
            client = client.with_password(password.expose());
        }
        ClickHouseSink {
            client,
            database: config.database.clone(),
            table: config.table.clone(),
            prepared: false,
            tables: WentTo::default(),
            found: None,
            has_uuid: None,
        }
    }

    fn qualified(&self, kind: Kind) -> String {
        format!("{}.{}_{}", self.database, self.table, table(kind))
    }

    /// Creates the database and tables if missing.
    pub async fn prepare(&mut self) -> Result<(), SinkError> {
        if self.prepared {
            return Ok(());
        }
        let key = "feed String, symbol String, timeframe String, ts_ms Int64, uid UInt64, \
                   seq UInt64, lane String, captured_at_ns Int64";
        let order = SORTING_KEY.join(", ");
        let mut ddl = vec![format!("CREATE DATABASE IF NOT EXISTS {}", self.database)];
        let indicators: Vec<String> = crate::indicators::Indicators::default()
            .fields()
            .iter()
            .map(|(name, _)| format!("{name} Nullable(Float64)"))
            .collect();
        let derived = format!(
            "version UInt32, open Float64, high Float64, low Float64, close Float64, volume Float64, \
             vwap Nullable(Float64), trades Nullable(UInt64), {}",
            indicators.join(", ")
        );
        for (kind, columns) in [
            (
                Kind::Quote,
                "bid Float64, ask Float64, bid_size Nullable(Float64), ask_size Nullable(Float64), \
                 exchange Nullable(Int32)",
            ),
            (
                Kind::Trade,
                "price Float64, size Float64, exchange Nullable(Int32), trade_id Nullable(String), \
                 conditions Array(Int32)",
            ),
            (
                Kind::Bar,
                "open Float64, high Float64, low Float64, close Float64, volume Float64, \
                 vwap Nullable(Float64), trades Nullable(UInt64)",
            ),
            (Kind::Derived, derived.as_str()),
        ] {
            ddl.push(format!(
                "CREATE TABLE IF NOT EXISTS {} ({key}, {columns})
                 ENGINE = ReplacingMergeTree({})
                 PARTITION BY toYYYYMM(toDate(toDateTime(intDiv(ts_ms, 1000))))
                 ORDER BY ({order})",
                self.qualified(kind),
                version_column(kind)
            ));
        }
        for sql in ddl {
            self.client.query(&sql).execute().await.map_err(classify)?;
        }
        self.check_tables().await?;
        self.prepared = true;
        Ok(())
    }

    /// Refuses tables of our names that were there before and would not keep each event
    /// once (`CREATE TABLE IF NOT EXISTS` leaves them as they are): made by someone
    /// else, or by hand, as a plain MergeTree (every replayed copy kept) or ordered by
    /// other columns (copies kept, or distinct events folded into one). Notes the
    /// tables found (see [`Tables`]).
    async fn check_tables(&mut self) -> Result<(), SinkError> {
        let has_uuid = match self.has_uuid {
            Some(has) => has,
            None => {
                let has = self
                    .client
                    .query(
                        "SELECT count() FROM system.columns
                         WHERE database = 'system' AND table = 'tables' AND name = 'uuid'",
                    )
                    .fetch_one::<u64>()
                    .await
                    .map_err(classify)?
                    > 0;
                *self.has_uuid.insert(has)
            }
        };
        // 18.16 has no `uuid` column: naming it there fails the query.
        let uuid = if has_uuid { "toString(uuid)" } else { "''" };
        let tables = self
            .client
            .query(&format!(
                "SELECT name, engine, sorting_key, toUInt32(metadata_modification_time) AS made, {uuid} AS uuid
                 FROM system.tables WHERE database = ?"
            ))
            .bind(&self.database)
            .fetch_all::<TableShape>()
            .await
            .map_err(classify)?;
        let mut made = Vec::new();
        for kind in KINDS {
            let name = format!("{}_{}", self.table, table(kind));
            let Some(shape) = tables.iter().find(|t| t.name == name) else {
                // Dropped under us since the DDL: the next attempt makes it again.
                return Err(SinkError::retriable(
                    NAME,
                    "table",
                    format!("{}.{name} is gone", self.database),
                ));
            };
            if let Some(problem) = shape.problem() {
                return Err(SinkError::fatal(
                    NAME,
                    "table",
                    format!(
                        "{}.{name} was there already and {problem}: each event would not be kept once; \
                         tickvault makes a ReplacingMergeTree({}) ordered by ({}). Rename or drop that table, \
                         or set sinks.clickhouse.table to another prefix",
                        self.database,
                        version_column(kind),
                        SORTING_KEY.join(", ")
                    ),
                ));
            }
            made.push(shape.identity());
        }
        self.found = Some(made);
        Ok(())
    }

    /// The tables `lane`'s rows go to, described (see [`Tables`]): a derived bar's table
    /// for the derived lane, the captured kinds' for the others.
    fn found_for(&self, lane: Lane) -> Option<String> {
        let found = self.found.as_ref()?;
        let of_lane: Vec<String> = KINDS
            .iter()
            .zip(found)
            .filter(|(kind, _)| (**kind == Kind::Derived) == (lane == Lane::Derived))
            .map(|(_, identity)| identity.clone())
            .collect();
        Some(Tables::describe(&self.database, &self.table, &of_lane))
    }

    /// Drops the database and everything in it (benchmarks and tests start from nothing).
    pub async fn drop_database(&self) -> Result<(), SinkError> {
        let sql = format!("DROP DATABASE IF EXISTS {}", self.database);
        self.client.query(&sql).execute().await.map_err(classify)
    }

    /// Merges running on the server now (any database), for the benchmark to wait out.
    pub async fn merges_running(&self) -> Result<u64, SinkError> {
        self.client
            .query("SELECT count() FROM system.merges")
            .fetch_one::<u64>()
            .await
            .map_err(classify)
    }

    /// Calls `visit` with the natural key of every row a reader sees (with `FINAL`:
    /// replaced versions collapsed), streamed; returns how many (for `verify`).
    pub async fn scan_keys(&mut self, mut visit: impl FnMut(SinkKey)) -> Result<u64, SinkError> {
        // As a write would: tables made if missing (none held yet), and refused if they
        // cannot keep each event once.
        self.prepare().await?;
        let mut seen = 0;
        for kind in KINDS {
            // A derived bar's version stands in its uid's place (see `Row::verify_uid`).
            let uid = match kind {
                Kind::Derived => "toUInt64(version)",
                _ => "uid",
            };
            let sql = format!(
                "SELECT feed, symbol, '{}' AS kind, timeframe, ts_ms, {uid} AS uid FROM {} FINAL",
                kind.name(),
                self.qualified(kind)
            );
            let mut cursor = self.client.query(&sql).fetch::<SinkKey>().map_err(classify)?;
            while let Some(key) = cursor.next().await.map_err(classify)? {
                visit(key);
                seen += 1;
            }
        }
        Ok(seen)
    }

    /// The minutes in `from_ms..to_ms` the bars table holds a one-minute bar of `symbol`
    /// for (a minute twice while a merge is due).
    pub async fn bar_minutes(
        &mut self,
        feed: &str,
        symbol: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<i64>, SinkError> {
        self.prepare().await?;
        let sql = format!(
            "SELECT ts_ms FROM {} WHERE feed = ? AND symbol = ? AND timeframe = '1m' AND ts_ms >= ? AND ts_ms < ?",
            self.qualified(Kind::Bar)
        );
        self.client
            .query(&sql)
            .bind(feed)
            .bind(symbol)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all::<i64>()
            .await
            .map_err(classify)
    }

    /// Inserts the rows of one kind, each made as it is sent (a batch of 100,000 rows is
    /// not copied into a vector of its kind first).
    async fn insert<'r, T: KindRow<'r>>(&self, rows: &'r [Row]) -> Result<(), SinkError> {
        let mut insert = None;
        for row in rows.iter().filter(|row| row.kind == T::KIND.name()) {
            let insert = match &mut insert {
                Some(insert) => insert,
                None => insert.insert(self.client.insert::<T>(&self.qualified(T::KIND)).map_err(classify)?),
            };
            insert.write(&T::from_row(row)).await.map_err(classify)?;
        }
        match insert {
            Some(insert) => insert.end().await.map_err(classify),
            None => Ok(()),
        }
    }

    /// A batch: an insert per kind in it, at the same time.
    async fn write_rows(&self, rows: &[Row]) -> Result<(), SinkError> {
        let (quotes, trades, bars, derived) = tokio::join!(
            self.insert::<QuoteRow>(rows),
            self.insert::<TradeRow>(rows),
            self.insert::<BarRow>(rows),
            self.insert::<DerivedRow>(rows),
        );
        quotes.and(trades).and(bars).and(derived)
    }
}

/// The natural key, the order of every table: a ReplacingMergeTree keeps one row per
/// value of it.
const SORTING_KEY: [&str; 5] = ["feed", "symbol", "timeframe", "ts_ms", "uid"];

/// A table as `system.tables` describes it (columns both 18.16 and current releases have).
#[derive(Debug, Deserialize, clickhouse::Row)]
struct TableShape {
    name: String,
    engine: String,
    sorting_key: String,
    /// When the table was made (or last altered), Unix seconds.
    made: u32,
    /// Its UUID, where the server has them (not 18.16; all zeros in an `Ordinary`
    /// database), else empty.
    uuid: String,
}

/// The tables a sink writes to, as one string kept in the cursor's note: the database,
/// the prefix, and each table's [`TableShape::identity`]. Another database or prefix,
/// or tables dropped and made again, describe differently.
struct Tables;

impl Tables {
    fn describe(database: &str, prefix: &str, tables: &[String]) -> String {
        format!("{database}.{prefix} made {}", tables.join(" "))
    }
}

impl TableShape {
    /// Which table of its name this is: its UUID where the server gives one (current
    /// releases, `Atomic` and `Replicated` databases: kept through `ALTER`s and
    /// restarts, and a table dropped and made again within the same second has another,
    /// as seen in ClickHouse 26.9); else when it was made (`metadata_modification_time`,
    /// seconds: 18.16, and `Ordinary` databases; an `ALTER` changes it too).
    fn identity(&self) -> String {
        if !self.uuid.is_empty() && self.uuid.chars().any(|c| c != '0' && c != '-') {
            self.uuid.clone()
        } else {
            self.made.to_string()
        }
    }
}

impl TableShape {
    /// What keeps this table from holding each natural key once, if anything. Any
    /// ReplacingMergeTree will do (`Replicated...`, `Shared...` in ClickHouse Cloud).
    fn problem(&self) -> Option<String> {
        let columns: Vec<&str> = self.sorting_key.split(',').map(str::trim).collect();
        if !self.engine.ends_with("ReplacingMergeTree") {
            Some(format!("is a {}, not a ReplacingMergeTree", self.engine))
        } else if columns != SORTING_KEY {
            Some(format!("is ordered by ({})", self.sorting_key))
        } else {
            None
        }
    }
}

/// The kinds of event, a table each.
const KINDS: [Kind; 4] = [Kind::Quote, Kind::Trade, Kind::Bar, Kind::Derived];

/// The column that decides which row of a natural key stands.
fn version_column(kind: Kind) -> &'static str {
    match kind {
        Kind::Derived => "version",
        _ => "seq",
    }
}

/// A kind's table, after the prefix.
fn table(kind: Kind) -> &'static str {
    match kind {
        Kind::Quote => "quotes",
        Kind::Trade => "trades",
        Kind::Bar => "bars",
        Kind::Derived => "derived",
    }
}

/// A row of one kind's table, made from the flat row of an event of that kind.
trait KindRow<'a>: clickhouse::Row + Serialize {
    const KIND: Kind;
    fn from_row(r: &'a Row) -> Self;
}

/// A quote as `<table>_quotes` stores it.
#[derive(Serialize, clickhouse::Row)]
struct QuoteRow<'a> {
    feed: &'a str,
    symbol: &'a str,
    timeframe: &'a str,
    ts_ms: i64,
    uid: u64,
    seq: u64,
    lane: &'a str,
    captured_at_ns: i64,
    bid: f64,
    ask: f64,
    bid_size: Option<f64>,
    ask_size: Option<f64>,
    exchange: Option<i32>,
}

impl<'a> KindRow<'a> for QuoteRow<'a> {
    const KIND: Kind = Kind::Quote;
    fn from_row(r: &'a Row) -> QuoteRow<'a> {
        QuoteRow {
            feed: &r.feed,
            symbol: &r.symbol,
            timeframe: &r.timeframe,
            ts_ms: r.ts_ms,
            uid: r.uid,
            seq: r.seq,
            lane: &r.lane,
            captured_at_ns: r.captured_at_ns,
            bid: r.bid.unwrap_or(f64::NAN),
            ask: r.ask.unwrap_or(f64::NAN),
            bid_size: r.bid_size,
            ask_size: r.ask_size,
            exchange: r.exchange,
        }
    }
}

/// A trade as `<table>_trades` stores it.
#[derive(Serialize, clickhouse::Row)]
struct TradeRow<'a> {
    feed: &'a str,
    symbol: &'a str,
    timeframe: &'a str,
    ts_ms: i64,
    uid: u64,
    seq: u64,
    lane: &'a str,
    captured_at_ns: i64,
    price: f64,
    size: f64,
    exchange: Option<i32>,
    trade_id: Option<&'a str>,
    conditions: &'a [i32],
}

impl<'a> KindRow<'a> for TradeRow<'a> {
    const KIND: Kind = Kind::Trade;
    fn from_row(r: &'a Row) -> TradeRow<'a> {
        TradeRow {
            feed: &r.feed,
            symbol: &r.symbol,
            timeframe: &r.timeframe,
            ts_ms: r.ts_ms,
            uid: r.uid,
            seq: r.seq,
            lane: &r.lane,
            captured_at_ns: r.captured_at_ns,
            price: r.price.unwrap_or(f64::NAN),
            size: r.size.unwrap_or(f64::NAN),
            exchange: r.exchange,
            trade_id: r.trade_id.as_deref(),
            conditions: &r.conditions,
        }
    }
}

/// A bar as `<table>_bars` stores it.
#[derive(Serialize, clickhouse::Row)]
struct BarRow<'a> {
    feed: &'a str,
    symbol: &'a str,
    timeframe: &'a str,
    ts_ms: i64,
    uid: u64,
    seq: u64,
    lane: &'a str,
    captured_at_ns: i64,
    open: f64,
    high: f64,
    low: f64,
    close: f64,
    volume: f64,
    vwap: Option<f64>,
    trades: Option<u64>,
}

impl<'a> KindRow<'a> for BarRow<'a> {
    const KIND: Kind = Kind::Bar;
    fn from_row(r: &'a Row) -> BarRow<'a> {
        BarRow {
            feed: &r.feed,
            symbol: &r.symbol,
            timeframe: &r.timeframe,
            ts_ms: r.ts_ms,
            uid: r.uid,
            seq: r.seq,
            lane: &r.lane,
            captured_at_ns: r.captured_at_ns,
            open: r.open.unwrap_or(f64::NAN),
            high: r.high.unwrap_or(f64::NAN),
            low: r.low.unwrap_or(f64::NAN),
            close: r.close.unwrap_or(f64::NAN),
            volume: r.volume.unwrap_or(f64::NAN),
            vwap: r.vwap,
            trades: r.trades,
        }
    }
}

/// A derived bar as `<table>_derived` stores it.
#[derive(Serialize, clickhouse::Row)]
struct DerivedRow<'a> {
    feed: &'a str,
    symbol: &'a str,
    timeframe: &'a str,
    ts_ms: i64,
    uid: u64,
    seq: u64,
    lane: &'a str,
    captured_at_ns: i64,
    version: u32,
    open: f64,
    high: f64,
    low: f64,
    close: f64,
    volume: f64,
    vwap: Option<f64>,
    trades: Option<u64>,
    sma20: Option<f64>,
    ema20: Option<f64>,
    rsi14: Option<f64>,
    macd: Option<f64>,
    macd_signal: Option<f64>,
    macd_hist: Option<f64>,
    bb_upper: Option<f64>,
    bb_middle: Option<f64>,
    bb_lower: Option<f64>,
    atr14: Option<f64>,
}

impl<'a> KindRow<'a> for DerivedRow<'a> {
    const KIND: Kind = Kind::Derived;
    fn from_row(r: &'a Row) -> DerivedRow<'a> {
        let i = r.indicators.as_deref().copied().unwrap_or_default();
        DerivedRow {
            feed: &r.feed,
            symbol: &r.symbol,
            timeframe: &r.timeframe,
            ts_ms: r.ts_ms,
            uid: r.uid,
            seq: r.seq,
            lane: &r.lane,
            captured_at_ns: r.captured_at_ns,
            version: r.version.unwrap_or(0),
            open: r.open.unwrap_or(f64::NAN),
            high: r.high.unwrap_or(f64::NAN),
            low: r.low.unwrap_or(f64::NAN),
            close: r.close.unwrap_or(f64::NAN),
            volume: r.volume.unwrap_or(f64::NAN),
            vwap: r.vwap,
            trades: r.trades,
            sma20: i.sma20,
            ema20: i.ema20,
            rsi14: i.rsi14,
            macd: i.macd,
            macd_signal: i.macd_signal,
            macd_hist: i.macd_hist,
            bb_upper: i.bb_upper,
            bb_middle: i.bb_middle,
            bb_lower: i.bb_lower,
            atr14: i.atr14,
        }
    }
}

impl Sink for ClickHouseSink {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Whether the tables are those the cursor's rows went to: if they were made since
    /// (dropped with their database, say, and made again by this sink), or are others
    /// (another database or prefix), they hold none of them, and from now on the
    /// tables found are the cursor's. Without a note (a log's first start, or one from
    /// before notes were kept) the tables found are taken as the cursor's.
    async fn holds(&mut self, lane: Lane) -> Result<Holds, SinkError> {
        // A recheck while running looks at the tables; if one is gone, they are made
        // again (as a write would), so that a runner with nothing to write finds out too.
        if self.prepared && self.check_tables().await.is_err() {
            self.prepared = false;
        }
        self.prepare().await?;
        Ok(match self.found_for(lane) {
            Some(found) => self.tables.found(&found),
            None => Holds::Unknown,
        })
    }

    async fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        self.prepare().await?;
        let result = self.write_rows(&batch.rows).await;
        if result.is_err() {
            // The table may be gone, or the server restarted empty: check again next time.
            self.prepared = false;
        }
        result
    }

    fn note(&self) -> Option<Vec<u8>> {
        self.tables.get().map(|t| t.as_bytes().to_vec())
    }

    fn restore(&mut self, note: &[u8]) {
        self.tables = WentTo::noted(String::from_utf8(note.to_vec()).ok());
    }
}

/// Server exception codes worth retrying: overload, memory, timeouts, a table or database
/// dropped under us (recreated on the next attempt), too many parts, replicas not ready.
const RETRIABLE_CODES: [u32; 14] = [60, 81, 159, 164, 202, 203, 209, 210, 241, 242, 252, 285, 319, 999];

pub(crate) fn classify(e: clickhouse::error::Error) -> SinkError {
    use clickhouse::error::Error;
    match &e {
        Error::Network(_) => match super::error::explain(&e) {
            (text, true) => SinkError::fatal(NAME, "tls", text),
            (text, false) => SinkError::retriable(NAME, "network", text),
        },
        Error::TimedOut => SinkError::retriable(NAME, "network", e),
        Error::BadResponse(text) => {
            let code = exception_code(text);
            if code.is_some_and(|c| RETRIABLE_CODES.contains(&c)) || code.is_none() {
                SinkError::retriable(NAME, "server", e)
            } else if code.is_some_and(|c| CONTENT_CODES.contains(&c)) {
                SinkError::content(NAME, "value", e)
            } else {
                SinkError::fatal(NAME, "refused", e)
            }
        }
        _ => SinkError::fatal(NAME, "client", e),
    }
}

/// Exceptions about a value sent rather than the request: CANNOT_PARSE_TEXT (6),
/// TYPE_MISMATCH (53), ARGUMENT_OUT_OF_BOUND (69), CANNOT_CONVERT_TYPE (70),
/// TOO_LARGE_STRING_SIZE (131), VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE (321). Not those of a
/// body cut short (CANNOT_READ_ALL_DATA), which a dropped connection causes too.
const CONTENT_CODES: [u32; 6] = [6, 53, 69, 70, 131, 321];

/// `Code: 60, e.displayText() = ...` (18.x) or `Code: 60. DB::Exception: ...` (current).
fn exception_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_told_by_its_uuid_where_the_server_has_one_else_by_when_it_was_made() {
        let shape = |uuid: &str| TableShape {
            name: "events_bars".into(),
            engine: "ReplacingMergeTree".into(),
            sorting_key: SORTING_KEY.join(", "),
            made: 1_796_264_857,
            uuid: uuid.into(),
        };
        assert_eq!(shape("").identity(), "1796264857", "18.16");
        assert_eq!(
            shape("00000000-0000-0000-0000-000000000000").identity(),
            "1796264857",
            "Ordinary"
        );
        assert_eq!(
            shape("7c63db0b-915c-4853-a039-b6ea3daf94c8").identity(),
            "7c63db0b-915c-4853-a039-b6ea3daf94c8"
        );
    }

    #[test]
    fn a_table_keeps_each_event_once_only_as_a_replacing_merge_tree_on_the_natural_key() {
        let shape = |engine: &str, sorting_key: &str| TableShape {
            name: "events_bars".into(),
            engine: engine.into(),
            sorting_key: sorting_key.into(),
            made: 0,
            uuid: String::new(),
        };
        let key = "feed, symbol, timeframe, ts_ms, uid";
        assert_eq!(shape("ReplacingMergeTree", key).problem(), None);
        assert_eq!(shape("ReplicatedReplacingMergeTree", key).problem(), None);
        assert_eq!(
            shape("ReplacingMergeTree", "feed,symbol,timeframe,ts_ms,uid").problem(),
            None
        );
        assert_eq!(
            shape("MergeTree", key).problem().as_deref(),
            Some("is a MergeTree, not a ReplacingMergeTree")
        );
        assert_eq!(
            shape("ReplacingMergeTree", "feed, symbol, ts_ms").problem().as_deref(),
            Some("is ordered by (feed, symbol, ts_ms)")
        );
        assert!(shape("ReplacingMergeTree", "feed, symbol, timeframe, ts_ms, uid, seq")
            .problem()
            .is_some());
        assert!(shape("Distributed", "").problem().is_some());
    }

    #[test]
    fn exception_codes_are_read_from_old_and_new_servers() {
        assert_eq!(
            exception_code(
                "Code: 60, e.displayText() = DB::Exception: Table x.y doesn't exist., e.what() = DB::Exception"
            ),
            Some(60)
        );
        assert_eq!(
            exception_code("Code: 241. DB::Exception: Memory limit (total) exceeded"),
            Some(241)
        );
        assert_eq!(exception_code("bad gateway"), None);
    }

    #[test]
    fn overload_is_retried_and_a_bad_query_is_not() {
        let retriable = classify(clickhouse::error::Error::BadResponse(
            "Code: 252. Too many parts".into(),
        ));
        assert!(retriable.retriable);
        let refused = classify(clickhouse::error::Error::BadResponse("Code: 62. Syntax error".into()));
        assert!(!refused.retriable);
    }
}
