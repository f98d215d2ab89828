//! `[sinks]`: where the log is forwarded, and how.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{ConfigError, Secret};

/// `[sinks]`: retry pacing shared by every runner, and one table per sink.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SinksConfig {
    /// First retry delay after a failed write; it doubles per consecutive failure, with
    /// full jitter. Default `100ms`.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest retry delay (also the wait after a refused, non-retriable write). Default `30s`.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Consecutive failures that open a runner's circuit breaker. Default 3.
    pub breaker_threshold: u32,
    /// Backfill writes in flight at once, across all sinks (each attempt holds one while
    /// it runs, never while it waits to retry). Backfill saturates what it is given; a
    /// limit leaves the servers' CPU to live writes. 0 means no limit. Default 1.
    pub backfill_writes: usize,
    /// While live rows flow, the share of time backfill writes may take, across all
    /// sinks: after a backfill write that took `d`, no backfill write starts for
    /// `d * (1 - duty) / duty` (at most 5 s), so that live writes find the servers' CPU
    /// and disk free. With no live rows flowing, backfill goes at full speed. Between
    /// 0.05 and 1; 1 means no pause. Default 0.5.
    pub backfill_duty: f64,
    /// The live latency the backfill yields for: while more than 1% of the live batches
    /// acknowledged in half a second took longer than this from capture to commit (their
    /// oldest row), the backfill's share of `backfill_duty` and of `backfill.live_duty` is
    /// halved, down to a sixteenth; while they are within it, it grows back by a
    /// sixteenth each half second. So the duties are what the backfill may take at most,
    /// and it takes what the host leaves it once live is within its budget. `0ms`: no
    /// budget (the duties apply as they are). At most 10 s. Default `40ms`.
    #[serde(with = "humantime_serde")]
    pub live_latency_budget: Duration,
    /// At a graceful stop, once the sources have stopped, how long each live runner may
    /// go on forwarding what the live lane still holds, so that a stop leaves nothing
    /// captured live behind (what is left is sent at the next start). A runner whose
    /// sink is failing stops at once. `0s`: stop between batches. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub stop_drain: Duration,
    pub clickhouse: ClickHouseConfig,
    pub postgres: PostgresConfig,
    pub nats: NatsConfig,
}

/// The values `sinks.backfill_duty` may take.
pub const BACKFILL_DUTY: std::ops::RangeInclusive<f64> = 0.05..=1.0;
/// The longest `sinks.live_latency_budget`.
pub const LIVE_LATENCY_BUDGET_MAX: Duration = Duration::from_secs(10);

impl Default for SinksConfig {
    fn default() -> Self {
        SinksConfig {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            breaker_threshold: 3,
            backfill_writes: 1,
            backfill_duty: 0.5,
            live_latency_budget: Duration::from_millis(40),
            stop_drain: Duration::from_secs(5),
            clickhouse: ClickHouseConfig::default(),
            postgres: PostgresConfig::default(),
            nats: NatsConfig::default(),
        }
    }
}

/// How a sink's two runners cut batches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Batching {
    pub live_batch_rows: usize,
    pub live_flush_interval: Duration,
    pub backfill_batch_rows: usize,
    pub backfill_flush_interval: Duration,
}

/// The batching fields every sink table has (same names, own defaults).
macro_rules! batching_fields {
    ($name:ident) => {
        impl $name {
            pub fn batching(&self) -> Batching {
                Batching {
                    live_batch_rows: self.live_batch_rows,
                    live_flush_interval: self.live_flush_interval,
                    backfill_batch_rows: self.backfill_batch_rows,
                    backfill_flush_interval: self.backfill_flush_interval,
                }
            }
        }
    };
}

/// `[sinks.clickhouse]`: a ReplacingMergeTree table over HTTP.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// Default false.
    pub enabled: bool,
    /// HTTP endpoint. Default `http://127.0.0.1:8123`.
    pub url: String,
    /// Created if missing. Default `tickvault`.
    pub database: String,
    /// The tables' prefix: `<table>_quotes`, `<table>_trades` and `<table>_bars`, created
    /// if missing. Default `events`.
    pub table: String,
    /// Default `default`.
    pub user: String,
    /// A file holding the password (first line). Default: none (no password). The
    /// environment variable `TICKVAULT_CLICKHOUSE_PASSWORD` takes precedence.
    pub password_file: Option<PathBuf>,
    /// With an `https://` url: a PEM file of CA certificates trusted besides the
    /// system's (a private CA). Default: none.
    pub ca_file: Option<PathBuf>,
    /// Live rows per insert at most. Default 10000.
    pub live_batch_rows: usize,
    /// How long a live batch waits to fill once it has a row. Default `0ms`: send what
    /// is there; rows arriving meanwhile make the next batch.
    #[serde(with = "humantime_serde")]
    pub live_flush_interval: Duration,
    /// Backfill rows per insert at most. Default 100000.
    pub backfill_batch_rows: usize,
    /// How long a backfill batch waits to fill. Default `200ms`.
    #[serde(with = "humantime_serde")]
    pub backfill_flush_interval: Duration,
    #[serde(skip)]
    pub password: Option<Secret>,
    /// `ca_file`'s certificates, read when the config is loaded.
    #[serde(skip)]
    pub ca: Option<TrustedCa>,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            enabled: false,
            url: "http://127.0.0.1:8123".into(),
            database: "tickvault".into(),
            table: "events".into(),
            user: "default".into(),
            password_file: None,
            ca_file: None,
            live_batch_rows: 10_000,
            live_flush_interval: Duration::ZERO,
            backfill_batch_rows: 100_000,
            backfill_flush_interval: Duration::from_millis(200),
            password: None,
            ca: None,
        }
    }
}
batching_fields!(ClickHouseConfig);

/// The CA certificates of a sink's `ca_file` (PEM, one or more), read and checked when
/// the config is loaded, so a sink's TLS connector is made without a fallible step.
#[derive(Clone, Debug, PartialEq)]
pub struct TrustedCa {
    pub path: PathBuf,
    pem: Vec<u8>,
}

impl TrustedCa {
    /// Reads `path`; `Err` says why it is not a PEM file of certificates.
    pub fn read(path: &std::path::Path) -> Result<TrustedCa, String> {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        match native_tls::Certificate::stack_from_pem(&pem) {
            Ok(certificates) if !certificates.is_empty() => Ok(TrustedCa {
                path: path.to_owned(),
                pem,
            }),
            Ok(_) => Err(format!("{} holds no PEM certificate", path.display())),
            Err(e) => Err(format!("{} is not a PEM file of certificates: {e}", path.display())),
        }
    }

    /// A TLS connector trusting the system's CAs and these.
    pub fn connector(ca: Option<&TrustedCa>) -> native_tls::TlsConnector {
        let mut builder = native_tls::TlsConnector::builder();
        for certificate in ca
            .map(|ca| native_tls::Certificate::stack_from_pem(&ca.pem).expect("checked when read"))
            .unwrap_or_default()
        {
            builder.add_root_certificate(certificate);
        }
        builder.build().expect("a TLS connector with the system's defaults")
    }
}

/// `[sinks.postgres]`: TimescaleDB or plain PostgreSQL.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Default false.
    pub enabled: bool,
    /// Default `127.0.0.1`.
    pub host: String,
    /// Default 5432.
    pub port: u16,
    /// Created if missing (the user needs CREATEDB for that). Default `tickvault`.
    pub database: String,
    /// Created if missing, with the cursor table `<table>_cursors`. Default `events`.
    pub table: String,
    /// Default `tickvault`.
    pub user: String,
    /// A file holding the password (first line). Default: none. The environment
    /// variable `TICKVAULT_POSTGRES_PASSWORD` takes precedence.
    pub password_file: Option<PathBuf>,
    /// Connect over TLS, required, the server's certificate and host name verified
    /// against the system's CAs and `ca_file`. Default false (no TLS: loopback).
    pub tls: bool,
    /// With `tls`: a PEM file of CA certificates trusted besides the system's.
    /// Default: none.
    pub ca_file: Option<PathBuf>,
    /// With the timescaledb extension: drop chunks older than this (a retention policy).
    /// Independent of gap detection, which reads the local log. Default: none (keep all).
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// Live rows per transaction at most. Default 5000.
    pub live_batch_rows: usize,
    /// Default `0ms` (see `sinks.clickhouse.live_flush_interval`).
    #[serde(with = "humantime_serde")]
    pub live_flush_interval: Duration,
    /// Backfill rows per transaction at most. Default 50000.
    pub backfill_batch_rows: usize,
    /// Default `200ms`.
    #[serde(with = "humantime_serde")]
    pub backfill_flush_interval: Duration,
    #[serde(skip)]
    pub password: Option<Secret>,
    /// `ca_file`'s certificates, read when the config is loaded.
    #[serde(skip)]
    pub ca: Option<TrustedCa>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 5432,
            database: "tickvault".into(),
            table: "events".into(),
            user: "tickvault".into(),
            password_file: None,
            tls: false,
            ca_file: None,
            retention: None,
            live_batch_rows: 5_000,
            live_flush_interval: Duration::ZERO,
            backfill_batch_rows: 50_000,
            backfill_flush_interval: Duration::from_millis(200),
            password: None,
            ca: None,
        }
    }
}
batching_fields!(PostgresConfig);

/// `[sinks.nats]`: a JetStream stream, one message per event.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Default false.
    pub enabled: bool,
    /// Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// A file holding an auth token (first line). Default: none. The environment
    /// variable `TICKVAULT_NATS_TOKEN` takes precedence.
    pub token_file: Option<PathBuf>,
    /// A PEM file of CA certificates trusted besides the system's, for TLS (a `tls://`
    /// url, or a server that requires TLS). Default: none.
    pub ca_file: Option<PathBuf>,
    /// Created if missing (file storage). Default `MARKET`.
    pub stream: String,
    /// Subjects are `<prefix>.<lane>.<symbol>.<timeframe>`; the stream takes `<prefix>.>`.
    /// Default `market`.
    pub subject_prefix: String,
    /// JetStream drops a message whose `Nats-Msg-Id` (the natural key) it saw within this
    /// window. A crash and restart, and an outage of this sink, are covered beyond it too
    /// (the sink finds in the stream what it published without the cursor moving), but
    /// copies from another appliance's log (redundancy) are dropped only within it, and
    /// so is a key the log holds twice (captured live and again by the backfill). Longer
    /// windows cost server memory per message id. Default `2h`.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Live messages per acknowledged batch at most. Default 2000.
    pub live_batch_rows: usize,
    /// Default `0ms` (see `sinks.clickhouse.live_flush_interval`).
    #[serde(with = "humantime_serde")]
    pub live_flush_interval: Duration,
    /// Backfill messages per acknowledged batch at most. Default 20000.
    pub backfill_batch_rows: usize,
    /// Default `200ms`.
    #[serde(with = "humantime_serde")]
    pub backfill_flush_interval: Duration,
    #[serde(skip)]
    pub token: Option<Secret>,
    /// `ca_file`'s certificates, read (and checked) when the config is loaded.
    #[serde(skip)]
    pub ca: Option<TrustedCa>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            enabled: false,
            url: "nats://127.0.0.1:4222".into(),
            token_file: None,
            ca_file: None,
            stream: "MARKET".into(),
            subject_prefix: "market".into(),
            duplicate_window: Duration::from_secs(2 * 3600),
            live_batch_rows: 2_000,
            live_flush_interval: Duration::ZERO,
            backfill_batch_rows: 20_000,
            backfill_flush_interval: Duration::from_millis(200),
            token: None,
            ca: None,
        }
    }
}
batching_fields!(NatsConfig);

impl SinksConfig {
    /// The names of the enabled sinks (their cursors' names in the log).
    pub fn enabled(&self) -> Vec<&'static str> {
        [
            (self.clickhouse.enabled, "clickhouse"),
            (self.postgres.enabled, "postgres"),
            (self.nats.enabled, "nats"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }

    /// Checks what types alone cannot; `file` names the source in errors.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |field: &str, message: &str| Err(ConfigError::field(file, field, message));
        if self.retry_min.is_zero() || self.retry_max < self.retry_min {
            return err("sinks.retry_max", "retry_min must be above 0 and not above retry_max");
        }
        if self.retry_max > Duration::from_secs(3_600) {
            return err("sinks.retry_max", "must be at most 1h");
        }
        if !(1..=1_000).contains(&self.breaker_threshold) {
            return err("sinks.breaker_threshold", "must be between 1 and 1000");
        }
        if self.backfill_writes > 1_024 {
            return err("sinks.backfill_writes", "must be at most 1024 (0: no limit)");
        }
        if !BACKFILL_DUTY.contains(&self.backfill_duty) {
            return err(
                "sinks.backfill_duty",
                "must be between 0.05 and 1 (1: backfill never pauses)",
            );
        }
        if self.live_latency_budget > LIVE_LATENCY_BUDGET_MAX {
            return err(
                "sinks.live_latency_budget",
                "must be at most 10s (0ms: no budget, the duties apply as they are)",
            );
        }
        if self.stop_drain > Duration::from_secs(60) {
            return err("sinks.stop_drain", "must be at most 60s (a stop waits for it)");
        }
        let batchings = [
            ("clickhouse", self.clickhouse.batching()),
            ("postgres", self.postgres.batching()),
            ("nats", self.nats.batching()),
        ];
        for (sink, b) in batchings {
            for (field, rows) in [
                ("live_batch_rows", b.live_batch_rows),
                ("backfill_batch_rows", b.backfill_batch_rows),
            ] {
                if !(1..=1_000_000).contains(&rows) {
                    return err(&format!("sinks.{sink}.{field}"), "must be between 1 and 1000000");
                }
            }
            if b.live_flush_interval > Duration::from_secs(1) {
                return err(
                    &format!("sinks.{sink}.live_flush_interval"),
                    "must be at most 1s (live rows wait for it)",
                );
            }
            if b.backfill_flush_interval > Duration::from_secs(60) {
                return err(&format!("sinks.{sink}.backfill_flush_interval"), "must be at most 60s");
            }
        }
        let ch = &self.clickhouse;
        if !(ch.url.starts_with("http://") || ch.url.starts_with("https://")) {
            return err("sinks.clickhouse.url", "must start with http:// or https://");
        }
        if ch.ca_file.is_some() && !ch.url.starts_with("https://") {
            return err(
                "sinks.clickhouse.ca_file",
                "is for TLS: the url must start with https://",
            );
        }
        if self.postgres.ca_file.is_some() && !self.postgres.tls {
            return err("sinks.postgres.ca_file", "is for TLS: set sinks.postgres.tls = true");
        }
        for (field, name) in [
            ("sinks.clickhouse.database", &ch.database),
            ("sinks.clickhouse.table", &ch.table),
            ("sinks.postgres.database", &self.postgres.database),
            ("sinks.postgres.table", &self.postgres.table),
        ] {
            if !is_identifier(name) {
                return err(
                    field,
                    "must be letters, digits and underscores, not starting with a digit",
                );
            }
        }
        let pg = &self.postgres;
        if pg.host.is_empty() {
            return err("sinks.postgres.host", "must not be empty");
        }
        if pg.port == 0 {
            return err("sinks.postgres.port", "must not be 0");
        }
        if pg.user.is_empty() {
            return err("sinks.postgres.user", "must not be empty");
        }
        for (field, name, longest) in [
            ("sinks.postgres.database", &pg.database, POSTGRES_NAME_MAX),
            // `<table>_cursors` must fit too.
            ("sinks.postgres.table", &pg.table, POSTGRES_NAME_MAX - "_cursors".len()),
        ] {
            // The sink does not quote names, and PostgreSQL folds unquoted ones to lower
            // case: `TvMixed` would be made as `tvmixed` and then asked for by its name.
            if name.chars().any(|c| c.is_ascii_uppercase()) {
                return err(
                    field,
                    "must be lower case (PostgreSQL folds unquoted names to lower case)",
                );
            }
            if name.len() > longest {
                return Err(ConfigError::field(
                    file,
                    field,
                    format!("must be at most {longest} characters (PostgreSQL cuts longer names)"),
                ));
            }
            if POSTGRES_RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
                return err(
                    field,
                    "is a reserved word in PostgreSQL's SQL (the sink does not quote names): choose another",
                );
            }
        }
        let nats = &self.nats;
        if !nats.url.starts_with("nats://") && !nats.url.starts_with("tls://") {
            return err("sinks.nats.url", "must start with nats:// or tls://");
        }
        if nats.stream.is_empty()
            || !nats
                .stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return err("sinks.nats.stream", "must be letters, digits, `_` and `-`");
        }
        if nats.subject_prefix.is_empty()
            || nats
                .subject_prefix
                .split('.')
                .any(|t| t.is_empty() || t.contains(['*', '>', ' ']))
        {
            return err(
                "sinks.nats.subject_prefix",
                "must be dot-separated tokens without `*`, `>` or spaces",
            );
        }
        if nats.duplicate_window < Duration::from_secs(1) || nats.duplicate_window > Duration::from_secs(30 * 86_400) {
            return err(
                "sinks.nats.duplicate_window",
                "must be between 1s and 30 days (the server keeps every id of the window)",
            );
        }
        if let Some(retention) = pg.retention {
            if retention < Duration::from_secs(3_600) || retention > Duration::from_secs(100 * 365 * 86_400) {
                return err("sinks.postgres.retention", "must be between 1h and 100 years");
            }
        }
        Ok(())
    }
}

/// PostgreSQL's longest name (NAMEDATALEN - 1); a longer one is cut, not refused.
const POSTGRES_NAME_MAX: usize = 63;

/// PostgreSQL 15's reserved key words and those that may name only a function or a type
/// (`pg_get_keywords()`, categories R and T): not a table's or a database's name unless
/// quoted.
const POSTGRES_RESERVED: [&str; 100] = [
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

/// A bare SQL identifier: safe to splice into statements without quoting.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 63
}
