//! The daemon's configuration: TOML, unknown fields refused, every field documented with
//! its default, environment overrides for paths and secrets, and errors that name the
//! offending field.

pub mod reserve;
pub mod sinks;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::event::{Feed, TimeUnit, Timeframe};
pub use crate::settings::{ConfigError, Secret};
use sinks::TrustedCa;

/// The whole configuration (`config/tickvault.toml` is the documented production file).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub polygon: PolygonConfig,
    #[serde(default)]
    pub live: LiveConfig,
    #[serde(default)]
    pub backfill: BackfillConfig,
    #[serde(default)]
    pub sinks: sinks::SinksConfig,
    #[serde(default)]
    pub security: SecurityConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub calendar: crate::calendar::CalendarConfig,
    #[serde(default)]
    pub gaps: GapsConfig,
    #[serde(default)]
    pub aggregate: AggregateConfig,
}

/// `[aggregate]`: the derived lane's bars and indicators.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AggregateConfig {
    /// Default true.
    pub enabled: bool,
    /// Default `["1m", "5m", "15m", "30m", "1h", "4h", "1d"]`: whole minutes or hours
    /// up to a day, or `1d`.
    pub timeframes: Vec<String>,
    /// Where a forex day (its `1d` bar) starts: `utc` (default) or `new-york-17`.
    pub forex_day: DayStart,
    /// How often the aggregator takes what the log received since its last round.
    /// Default 1s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        AggregateConfig {
            enabled: true,
            timeframes: ["1m", "5m", "15m", "30m", "1h", "4h", "1d"].map(String::from).to_vec(),
            forex_day: DayStart::Utc,
            interval: Duration::from_secs(1),
        }
    }
}

impl AggregateConfig {
    /// The timeframes, parsed (a validated config's parse).
    pub fn timeframes(&self) -> Vec<Timeframe> {
        self.timeframes.iter().filter_map(|t| t.parse().ok()).collect()
    }

    fn problem(&self) -> Option<(&'static str, String)> {
        let mut seen = Vec::new();
        for text in &self.timeframes {
            let timeframe: Timeframe = match text.parse() {
                Ok(t) => t,
                Err(e) => return Some(("aggregate.timeframes", e.to_string())),
            };
            let bad = match timeframe.unit {
                TimeUnit::Second => Some("at least 1m (bars are made from one-minute bars)"),
                TimeUnit::Day if timeframe.multiplier != 1 => Some("a daily timeframe is 1d"),
                _ if timeframe.millis() > 86_400_000 => Some("at most a day"),
                _ if seen.contains(&timeframe.millis()) => Some("listed twice"),
                _ => None,
            };
            if let Some(bad) = bad {
                return Some(("aggregate.timeframes", format!("{text:?}: {bad}")));
            }
            seen.push(timeframe.millis());
        }
        if self.interval < Duration::from_millis(100) || self.interval > Duration::from_secs(3_600) {
            return Some(("aggregate.interval", "must be from 100ms to 1h".into()));
        }
        None
    }
}

/// Where a daily bar starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DayStart {
    /// Midnight UTC.
    Utc,
    /// 17:00 in New York, daylight saving included (forex's trading day).
    NewYork17,
}

/// `[gaps]`: which minutes `tickvault gaps` looks at.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GapsConfig {
    /// How far back from now minutes are checked. Default 30 days; any length: the
    /// coverage index is local, never bounded by a sink's retention.
    #[serde(with = "humantime_serde")]
    pub lookback: Duration,
    /// How often the daemon looks for gaps and fetches them (also at start-up and right
    /// after a live feed reconnects), and checks the backfill's downloaded periods
    /// against every enabled sink. Default 60s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How often each verified period is checked against the sinks again, spread over
    /// the rounds (one found short is verified no more). Default 1h.
    #[serde(with = "humantime_serde")]
    pub recheck: Duration,
}

impl Default for GapsConfig {
    fn default() -> Self {
        GapsConfig {
            lookback: Duration::from_secs(30 * 86_400),
            interval: Duration::from_secs(60),
            recheck: Duration::from_secs(3_600),
        }
    }
}

/// `[metrics]`: Prometheus metrics and health checks over HTTP (`/metrics`, `/healthz`,
/// `/readyz`; docs/operations.md lists every series).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Default true.
    pub enabled: bool,
    /// Address to serve on. Default `127.0.0.1:9187` (loopback: the series name the
    /// sinks and symbols). Port 0 picks a free port, logged at start.
    pub listen: std::net::SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9187)),
        }
    }
}

/// `[security]`: what the daemon refuses beyond what it warns about.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Refuse a connection in clear text to a host that is not loopback (Polygon over
    /// `ws://` or `http://`, ClickHouse over `http://`, whose password then travels in
    /// a header, NATS without `tls://`, PostgreSQL without `tls`). Off, each is logged
    /// as a warning at start. Default false.
    pub forbid_clear_text: bool,
}

/// Whether `host` (a name or an address, IPv6 with or without brackets) is this machine.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// What a run that needs the Polygon API key and has none is told.
pub const NO_API_KEY: &str = "no Polygon API key: set TICKVAULT_POLYGON_API_KEY or polygon.api_key_file";

/// The most periods `backfill.lookback` may be cut into by `backfill.chunk`.
pub const MAX_BACKFILL_PERIODS: u64 = 100_000;

/// `[polygon]`: where Polygon is and how to authenticate.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolygonConfig {
    /// WebSocket base URL; the market path (`/forex`, `/crypto`, `/stocks`) is appended.
    /// Default `wss://socket.polygon.io`. Environment: `TICKVAULT_POLYGON_WS_URL`.
    pub ws_url: String,
    /// REST base URL. Default `https://api.polygon.io`. Environment: `TICKVAULT_POLYGON_REST_URL`.
    pub rest_url: String,
    /// A file holding the API key (first line). Default: none. The environment variable
    /// `TICKVAULT_POLYGON_API_KEY` takes precedence. The key is never logged.
    pub api_key_file: Option<PathBuf>,
    /// The plan's REST quota in requests per minute; the downloader paces itself to it.
    /// 0 means no quota (the downloader then stays under 100 requests/s). Default 0.
    pub requests_per_minute: u32,
    /// The API key, from the environment or `api_key_file`; never in the config file.
    #[serde(skip)]
    pub api_key: Option<Secret>,
}

impl Default for PolygonConfig {
    fn default() -> Self {
        PolygonConfig {
            ws_url: "wss://socket.polygon.io".into(),
            rest_url: "https://api.polygon.io".into(),
            api_key_file: None,
            requests_per_minute: 0,
            api_key: None,
        }
    }
}

/// `[live]`: the WebSocket collector.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LiveConfig {
    /// Default true.
    pub enabled: bool,
    /// A connection that delivers nothing (not even a status) for this long is stale and
    /// is reconnected. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    /// First reconnect delay; it doubles per failed attempt, with full jitter. Default `500ms`.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// `[live.forex]`, `[live.crypto]`, `[live.stocks]`: what to subscribe to. Default: none.
    pub forex: Option<LiveMarket>,
    pub crypto: Option<LiveMarket>,
    pub stocks: Option<LiveMarket>,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            enabled: true,
            stale_after: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            forex: None,
            crypto: None,
            stocks: None,
        }
    }
}

/// The subscriptions of one market: every channel for every symbol.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LiveMarket {
    /// Symbols in any of Polygon's forms (`EUR/USD`, `C:EUR-USD`, `BTC-USD`, `AAPL`).
    pub symbols: Vec<String>,
    /// Channel prefixes: forex `C`, `CA`, `CAS`; crypto `XQ`, `XT`, `XA`, `XAS`; stocks
    /// `Q`, `T`, `AM`, `A`.
    pub channels: Vec<String>,
}

/// `[backfill]`: the historical downloader (minute bars from the aggregates endpoint).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackfillConfig {
    /// Default true.
    pub enabled: bool,
    /// Symbols per market, in any of Polygon's forms. Default: none.
    pub forex: Vec<String>,
    pub crypto: Vec<String>,
    pub stocks: Vec<String>,
    /// How far back to fetch, from now. Default `90d`.
    #[serde(with = "humantime_serde")]
    pub lookback: Duration,
    /// The span one period of the tracker covers (and one request chain fetches).
    /// Default `90d` (about three months).
    #[serde(with = "humantime_serde")]
    pub chunk: Duration,
    /// `limit` per request (Polygon's maximum is 50000). Default 50000.
    pub page_limit: u32,
    /// Attempts per request before the period is left for the next pass. Default 8.
    pub max_attempts: u32,
    /// Requests to Polygon running at once. Default 2.
    pub concurrency: usize,
    /// While live events are being captured, the share of the time the backfill's
    /// appends to the log may take, in [0.05, 1]: after a page's appends took `d`, the
    /// next page waits `d * (1 - duty) / duty` (at most 5 s), so that live appends find the
    /// disk and the cores free. With no live event in the last second (a closed market,
    /// a backfill-only run) backfill goes at full speed. 1 never pauses. Default 0.5.
    pub live_duty: f64,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            enabled: true,
            forex: Vec::new(),
            crypto: Vec::new(),
            stocks: Vec::new(),
            lookback: Duration::from_secs(90 * 86_400),
            chunk: Duration::from_secs(90 * 86_400),
            page_limit: 50_000,
            max_attempts: 8,
            concurrency: 2,
            live_duty: 0.5,
        }
    }
}

/// `[log]`: the durable write-ahead log.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Directory of the log. Default `/var/lib/tickvault/log`.
    /// Overridden by the environment variable `TICKVAULT_DATA_DIR` and by `--data-dir`.
    pub data_dir: PathBuf,
    /// How long a record is kept after it was written, even once every sink has passed
    /// it, so that the log can be replayed offline. Default `7d`.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often truncation runs. Default `1m`.
    #[serde(with = "humantime_serde")]
    pub truncate_every: Duration,
    /// Append requests that may queue for the writer before producers wait. Default 1024.
    pub channel_capacity: usize,
    /// Records one group commit (one fsync) takes at most. Default 131072.
    pub max_group_records: usize,
    /// The backfill downloader waits while the backfill lane's backlog (head minus the
    /// slowest cursor) is above this many records. Live capture never waits. Default 5000000.
    pub backfill_high_water: u64,
    /// Free space kept on the log's filesystem for forwarding, truncation and reopening:
    /// a size (`"2GiB"`, at least 256 MiB) or a share of the filesystem (`"5%"`, at
    /// most 50%, never under 256 MiB). Under twice
    /// it the backfill's capture pauses; under it live capture stops too; both resume
    /// once truncation gives space back. Default `"1GiB"`.
    pub disk_reserve: reserve::Reserve,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            data_dir: PathBuf::from("/var/lib/tickvault/log"),
            retention: Duration::from_secs(7 * 86_400),
            truncate_every: Duration::from_secs(60),
            channel_capacity: 1024,
            max_group_records: 131_072,
            backfill_high_water: 5_000_000,
            disk_reserve: reserve::Reserve::Bytes(1 << 30),
        }
    }
}

impl Config {
    /// Reads, parses, applies environment overrides and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            location: "file".into(),
            message: format!("cannot read: {e}"),
        })?;
        let mut config = Self::parse(&file, &text)?;
        config.apply_env(&file, |name| std::env::var(name).ok())?;
        config.validate(&file)?;
        Ok(config)
    }

    /// Parses TOML text; `file` only names the source in errors.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| syntax_error(file, text, &e))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            // serde_path_to_error's path already ends in an unknown field's own name.
            let field = e.path().to_string();
            let message = e.into_inner().message().to_owned();
            ConfigError::field(file, &field, message)
        })
    }

    /// Environment overrides, applied after the file and before validation.
    pub fn apply_env(&mut self, file: &str, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let non_empty = |name: &str, field: &str| -> Result<Option<String>, ConfigError> {
            match var(name) {
                Some(v) if v.trim().is_empty() => {
                    Err(ConfigError::field(file, field, format!("{name} is set but empty")))
                }
                other => Ok(other.map(|v| v.trim().to_owned())),
            }
        };
        if let Some(dir) = non_empty("TICKVAULT_DATA_DIR", "log.data_dir")? {
            self.log.data_dir = PathBuf::from(dir);
        }
        if let Some(listen) = non_empty("TICKVAULT_METRICS_LISTEN", "metrics.listen")? {
            self.metrics.listen = listen
                .parse()
                .map_err(|e| ConfigError::field(file, "metrics.listen", format!("TICKVAULT_METRICS_LISTEN: {e}")))?;
        }
        if let Some(url) = non_empty("TICKVAULT_POLYGON_WS_URL", "polygon.ws_url")? {
            self.polygon.ws_url = url;
        }
        if let Some(url) = non_empty("TICKVAULT_POLYGON_REST_URL", "polygon.rest_url")? {
            self.polygon.rest_url = url;
        }
        if let Some(key) = non_empty("TICKVAULT_POLYGON_API_KEY", "polygon.api_key_file")? {
            self.polygon.api_key = Some(Secret::new(key));
        } else if let Some(path) = &self.polygon.api_key_file {
            self.polygon.api_key = Some(Secret::new(read_secret_file(file, "polygon.api_key_file", path)?));
        }
        let sinks = &mut self.sinks;
        for (env, field, path, secret) in [
            (
                "TICKVAULT_CLICKHOUSE_PASSWORD",
                "sinks.clickhouse.password_file",
                &sinks.clickhouse.password_file,
                &mut sinks.clickhouse.password,
            ),
            (
                "TICKVAULT_POSTGRES_PASSWORD",
                "sinks.postgres.password_file",
                &sinks.postgres.password_file,
                &mut sinks.postgres.password,
            ),
            (
                "TICKVAULT_NATS_TOKEN",
                "sinks.nats.token_file",
                &sinks.nats.token_file,
                &mut sinks.nats.token,
            ),
        ] {
            // Set but empty is refused, as above: unset is how to say "no secret", and an
            // empty value silently replacing the file's is a mistake to name.
            *secret = match non_empty(env, field)? {
                Some(v) => Some(Secret::new(v)),
                None => match path {
                    Some(path) => Some(Secret::new(read_secret_file(file, field, path)?)),
                    None => None,
                },
            };
        }
        for (field, path, ca) in [
            (
                "sinks.clickhouse.ca_file",
                &sinks.clickhouse.ca_file,
                &mut sinks.clickhouse.ca,
            ),
            (
                "sinks.postgres.ca_file",
                &sinks.postgres.ca_file,
                &mut sinks.postgres.ca,
            ),
            ("sinks.nats.ca_file", &sinks.nats.ca_file, &mut sinks.nats.ca),
        ] {
            *ca = match path {
                Some(path) => Some(TrustedCa::read(path).map_err(|why| ConfigError::field(file, field, why))?),
                None => None,
            };
        }
        Ok(())
    }

    /// Checks what types alone cannot.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        for symbol in self.calendar.symbols.keys() {
            let canonical = Feed::ALL
                .iter()
                .any(|&feed| crate::polygon::symbol::canonical(feed, symbol).as_deref() == Some(symbol.as_str()));
            if !canonical {
                return Err(ConfigError::field(
                    file,
                    &format!("calendar.symbols.\"{symbol}\""),
                    "not a symbol in its canonical form (EUR/USD, BTC-USD, AAPL)",
                ));
            }
        }
        let log = &self.log;
        if log.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::field(file, "log.data_dir", "must not be empty"));
        }
        if log.channel_capacity == 0 {
            return Err(ConfigError::field(file, "log.channel_capacity", "must be at least 1"));
        }
        if log.max_group_records == 0 {
            return Err(ConfigError::field(file, "log.max_group_records", "must be at least 1"));
        }
        if let Some((field, problem)) = self.aggregate.problem() {
            return Err(ConfigError::field(file, field, problem));
        }
        if self.gaps.interval < Duration::from_secs(1) {
            return Err(ConfigError::field(file, "gaps.interval", "must be at least 1s"));
        }
        if self.gaps.recheck < Duration::from_secs(1) {
            return Err(ConfigError::field(file, "gaps.recheck", "must be at least 1s"));
        }
        if log.truncate_every < Duration::from_secs(1) {
            return Err(ConfigError::field(file, "log.truncate_every", "must be at least 1s"));
        }
        if log.backfill_high_water < 1_000 {
            return Err(ConfigError::field(
                file,
                "log.backfill_high_water",
                "must be at least 1000 records (smaller stalls backfill on every batch)",
            ));
        }
        // Upper bounds: each a value the daemon honours (timers, channel sizes and
        // period counts that fit), far above what any deployment asks for.
        let days = |n: u64| Duration::from_secs(n * 86_400);
        let hours = |n: u64| Duration::from_secs(n * 3_600);
        for (field, value, max, says) in [
            ("log.retention", log.retention, days(3_650), "10 years"),
            ("log.truncate_every", log.truncate_every, days(1), "1 day"),
            ("live.stale_after", self.live.stale_after, hours(1), "1h"),
            ("live.reconnect_max", self.live.reconnect_max, hours(1), "1h"),
            ("backfill.lookback", self.backfill.lookback, days(50 * 365), "50 years"),
            ("backfill.chunk", self.backfill.chunk, days(3_650), "10 years"),
            ("gaps.lookback", self.gaps.lookback, days(50 * 365), "50 years"),
            ("gaps.interval", self.gaps.interval, days(1), "1 day"),
            ("gaps.recheck", self.gaps.recheck, days(30), "30 days"),
        ] {
            if value > max {
                return Err(ConfigError::field(file, field, format!("must be at most {says}")));
            }
        }
        for (field, value, max) in [
            ("log.channel_capacity", log.channel_capacity as u64, 1_000_000),
            ("log.max_group_records", log.max_group_records as u64, 4_194_304),
            ("log.backfill_high_water", log.backfill_high_water, 1_000_000_000_000),
            (
                "polygon.requests_per_minute",
                u64::from(self.polygon.requests_per_minute),
                1_000_000,
            ),
            ("backfill.max_attempts", u64::from(self.backfill.max_attempts), 100),
        ] {
            if value > max {
                return Err(ConfigError::field(file, field, format!("must be at most {max}")));
            }
        }
        for (field, url, schemes) in [
            ("polygon.ws_url", &self.polygon.ws_url, ["ws://", "wss://"]),
            ("polygon.rest_url", &self.polygon.rest_url, ["http://", "https://"]),
        ] {
            if !schemes.iter().any(|s| url.starts_with(s)) || url.len() <= schemes[0].len() + 1 {
                return Err(ConfigError::field(
                    file,
                    field,
                    format!("{url:?} must start with {} or {}", schemes[0], schemes[1]),
                ));
            }
        }
        let live = &self.live;
        if live.stale_after < Duration::from_secs(1) {
            return Err(ConfigError::field(file, "live.stale_after", "must be at least 1s"));
        }
        if live.reconnect_min.is_zero() || live.reconnect_max < live.reconnect_min {
            return Err(ConfigError::field(
                file,
                "live.reconnect_max",
                "reconnect_min must be above 0 and not above reconnect_max",
            ));
        }
        for (feed, market) in [
            (Feed::Forex, &live.forex),
            (Feed::Crypto, &live.crypto),
            (Feed::Stocks, &live.stocks),
        ] {
            let Some(market) = market else { continue };
            let name = feed.name();
            if market.symbols.is_empty() {
                return Err(ConfigError::field(
                    file,
                    &format!("live.{name}.symbols"),
                    "must list at least one symbol",
                ));
            }
            for (i, s) in market.symbols.iter().enumerate() {
                if crate::polygon::symbol::canonical(feed, s).is_none() {
                    return Err(ConfigError::field(
                        file,
                        &format!("live.{name}.symbols[{i}]"),
                        format!("{s:?} is not a {name} symbol"),
                    ));
                }
            }
            if market.channels.is_empty() {
                return Err(ConfigError::field(
                    file,
                    &format!("live.{name}.channels"),
                    "must list at least one channel",
                ));
            }
            for (i, c) in market.channels.iter().enumerate() {
                if !crate::polygon::channels(feed).contains(&c.as_str()) {
                    return Err(ConfigError::field(
                        file,
                        &format!("live.{name}.channels[{i}]"),
                        format!(
                            "{c:?} is not a {name} channel (one of {})",
                            crate::polygon::channels(feed).join(", ")
                        ),
                    ));
                }
            }
        }
        let backfill = &self.backfill;
        for (feed, symbols) in [
            (Feed::Forex, &backfill.forex),
            (Feed::Crypto, &backfill.crypto),
            (Feed::Stocks, &backfill.stocks),
        ] {
            for (i, s) in symbols.iter().enumerate() {
                if crate::polygon::symbol::canonical(feed, s).is_none() {
                    let name = feed.name();
                    return Err(ConfigError::field(
                        file,
                        &format!("backfill.{name}[{i}]"),
                        format!("{s:?} is not a {name} symbol"),
                    ));
                }
            }
        }
        if backfill.chunk < Duration::from_secs(3600) {
            return Err(ConfigError::field(file, "backfill.chunk", "must be at least 1h"));
        }
        // One tracker entry per period, all planned at start.
        let periods = backfill.lookback.as_secs() / backfill.chunk.as_secs().max(1);
        if periods > MAX_BACKFILL_PERIODS {
            return Err(ConfigError::field(
                file,
                "backfill.chunk",
                format!("makes {periods} periods of backfill.lookback; at most {MAX_BACKFILL_PERIODS}: make it longer"),
            ));
        }
        if !(1..=50_000).contains(&backfill.page_limit) {
            return Err(ConfigError::field(
                file,
                "backfill.page_limit",
                "must be between 1 and 50000",
            ));
        }
        if backfill.max_attempts == 0 {
            return Err(ConfigError::field(file, "backfill.max_attempts", "must be at least 1"));
        }
        if !(1..=16).contains(&backfill.concurrency) {
            return Err(ConfigError::field(
                file,
                "backfill.concurrency",
                "must be between 1 and 16",
            ));
        }
        if !sinks::BACKFILL_DUTY.contains(&backfill.live_duty) {
            return Err(ConfigError::field(
                file,
                "backfill.live_duty",
                "must be between 0.05 and 1 (1: backfill never pauses)",
            ));
        }
        self.sinks.validate(file)?;
        if self.security.forbid_clear_text {
            if let Some((field, what)) = self.clear_text().into_iter().next() {
                return Err(ConfigError::field(
                    file,
                    field,
                    format!(
                        "{what} is clear text to a host that is not loopback, and security.forbid_clear_text is set"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// What `run` and `backfill` need beyond a valid file: the API key, when a live
    /// market or a backfill symbol is configured (the key is in the environment or a
    /// file, so a file can be valid on a machine that does not hold it). Checked before
    /// anything is created; `validate` reports it too.
    pub fn check_api_key(&self, file: &str) -> Result<(), ConfigError> {
        let live = self.live.enabled
            && [&self.live.forex, &self.live.crypto, &self.live.stocks]
                .iter()
                .any(|m| m.is_some());
        let b = &self.backfill;
        let backfill = b.enabled && !(b.forex.is_empty() && b.crypto.is_empty() && b.stocks.is_empty());
        if (live || backfill) && self.polygon.api_key.is_none() {
            return Err(ConfigError::field(file, "polygon.api_key_file", NO_API_KEY));
        }
        Ok(())
    }

    /// The connections that would go in clear text to a host that is not loopback: the
    /// field and what it names.
    pub fn clear_text(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let host_of = |url: &str| {
            url::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default()
        };
        let sinks = &self.sinks;
        for (field, url, clear, used) in [
            ("polygon.ws_url", &self.polygon.ws_url, "ws://", true),
            ("polygon.rest_url", &self.polygon.rest_url, "http://", true),
            (
                "sinks.clickhouse.url",
                &sinks.clickhouse.url,
                "http://",
                sinks.clickhouse.enabled,
            ),
            ("sinks.nats.url", &sinks.nats.url, "nats://", sinks.nats.enabled),
        ] {
            if used && url.starts_with(clear) && !is_loopback(&host_of(url)) {
                out.push((field, url.clone()));
            }
        }
        let pg = &sinks.postgres;
        if pg.enabled && !pg.tls && !is_loopback(&pg.host) {
            out.push(("sinks.postgres.tls", format!("{}:{}", pg.host, pg.port)));
        }
        out
    }

    /// Logs a warning for each connection [`Config::clear_text`] names (`validate` and
    /// `run` both say them).
    pub fn warn_of_clear_text(&self) {
        for (field, what) in self.clear_text() {
            tracing::warn!(field, %what, "clear text to a host that is not loopback (security.forbid_clear_text refuses it)");
        }
    }
}

/// The first line of a secret file, which must not be empty.
///
/// A path that does not exist is not repeated in the error: a secret pasted into the
/// field by mistake would be printed. A file that others can read is warned about, as
/// ssh does (the daemon runs as its own user; the file should be its alone).
fn read_secret_file(file: &str, field: &str, path: &Path) -> Result<String, ConfigError> {
    if !path.try_exists().unwrap_or(false) {
        return Err(ConfigError::field(
            file,
            field,
            "names no file (the value is not shown: it may be the secret itself)",
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::field(file, field, format!("cannot read {}: {e}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    field,
                    path = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "a secret file that others can read: chmod 600 it (owned by the user the daemon runs as)"
                );
            }
        }
    }
    let secret = text.lines().next().unwrap_or("").trim();
    if secret.is_empty() {
        return Err(ConfigError::field(file, field, format!("{} is empty", path.display())));
    }
    Ok(secret.to_owned())
}

fn syntax_error(file: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let location = match e.span() {
        Some(span) => format!("line {}", text[..span.start.min(text.len())].lines().count().max(1)),
        None => "syntax".into(),
    };
    ConfigError {
        file: file.to_owned(),
        location,
        message: e.message().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        assert_eq!(Config::parse("t", "").unwrap(), Config::default());
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        for file in ["config/tickvault.toml", "config/demo.toml", "config/local-sinks.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            let config = Config::parse(file, &text).unwrap();
            config.validate(file).unwrap();
        }
    }

    #[test]
    fn the_production_config_spells_out_every_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tickvault.toml");
        let config = Config::parse("p", &std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn a_calendar_entry_that_is_not_a_symbol_or_an_early_close_out_of_hours_is_named() {
        let config = Config::parse("t", "[calendar]\nsymbols = { \"C:EURUSD\" = \"always\" }\n").unwrap();
        let err = config.validate("t").unwrap_err();
        assert_eq!(err.location, "field `calendar.symbols.\"C:EURUSD\"`", "{err}");
        let err = Config::parse("t", "[calendar]\nearly_closes = [\"2025-11-28 18:00\"]\n").unwrap_err();
        assert_eq!(err.location, "field `calendar.early_closes[0]`", "{err}");
        let err = Config::parse("t", "[calendar]\nstocks = \"lse\"\n").unwrap_err();
        assert_eq!(err.location, "field `calendar.stocks`", "{err}");
    }

    #[test]
    fn an_unknown_field_is_refused_and_named() {
        let err = Config::parse("t", "[log]\nretension = \"1d\"\n").unwrap_err();
        assert_eq!(err.location, "field `log.retension`", "{err}");
        let err = Config::parse("t", "[logs]\n").unwrap_err();
        assert_eq!(err.location, "field `logs`", "{err}");
    }

    #[test]
    fn a_bad_value_names_its_field() {
        let err = Config::parse("t", "[log]\nretention = \"seven days\"\n").unwrap_err();
        assert_eq!(err.location, "field `log.retention`", "{err}");
        let err = Config::parse("t", "[log]\nchannel_capacity = -1\n").unwrap_err();
        assert_eq!(err.location, "field `log.channel_capacity`", "{err}");
    }

    #[test]
    fn a_value_out_of_range_names_its_field() {
        let config = Config::parse("t", "[log]\nmax_group_records = 0\n").unwrap();
        let err = config.validate("t").unwrap_err();
        assert_eq!(err.location, "field `log.max_group_records`");
        for duty in ["0", "1.5"] {
            let config = Config::parse("t", &format!("[backfill]\nlive_duty = {duty}\n")).unwrap();
            let err = config.validate("t").unwrap_err();
            assert_eq!(err.location, "field `backfill.live_duty`", "{duty}");
        }
    }

    #[test]
    fn a_postgres_name_that_is_a_reserved_word_names_its_field() {
        for (field, toml) in [
            ("sinks.postgres.table", "[sinks.postgres]\ntable = \"user\"\n"),
            ("sinks.postgres.database", "[sinks.postgres]\ndatabase = \"order\"\n"),
        ] {
            let err = Config::parse("t", toml).unwrap().validate("t").unwrap_err();
            assert_eq!(err.location, format!("field `{field}`"), "{err}");
            assert!(err.message.contains("reserved word"), "{err}");
        }
        let config = Config::parse("t", "[sinks.postgres]\ntable = \"users\"\n").unwrap();
        config.validate("t").unwrap();
    }

    #[test]
    fn a_syntax_error_names_the_line() {
        let err = Config::parse("t", "[log]\n\ndata_dir = \n").unwrap_err();
        assert_eq!(err.location, "line 3", "{err}");
    }

    #[test]
    fn the_environment_overrides_the_data_dir() {
        let mut config = Config::default();
        config
            .apply_env("t", |name| (name == "TICKVAULT_DATA_DIR").then(|| "/tmp/x".to_owned()))
            .unwrap();
        assert_eq!(config.log.data_dir, PathBuf::from("/tmp/x"));
        assert!(config.apply_env("t", |_| Some(String::new())).is_err());
    }

    #[test]
    fn polygon_addresses_and_key_come_from_the_environment_and_the_key_never_prints() {
        let mut config = Config::default();
        config
            .apply_env("t", |name| match name {
                "TICKVAULT_POLYGON_WS_URL" => Some("ws://127.0.0.1:9100".into()),
                "TICKVAULT_POLYGON_REST_URL" => Some("http://127.0.0.1:9100".into()),
                "TICKVAULT_POLYGON_API_KEY" => Some("s3cret".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.polygon.ws_url, "ws://127.0.0.1:9100");
        assert_eq!(config.polygon.rest_url, "http://127.0.0.1:9100");
        assert_eq!(config.polygon.api_key.as_ref().unwrap().expose(), "s3cret");
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn the_key_can_come_from_a_file_and_a_missing_file_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "from-file\n").unwrap();
        let mut config = Config::default();
        config.polygon.api_key_file = Some(path);
        config.apply_env("t", |_| None).unwrap();
        assert_eq!(config.polygon.api_key.unwrap().expose(), "from-file");
        let mut config = Config::default();
        config.polygon.api_key_file = Some(dir.path().join("missing"));
        let err = config.apply_env("t", |_| None).unwrap_err();
        assert_eq!(err.location, "field `polygon.api_key_file`");
    }

    #[test]
    fn a_sinks_ca_file_is_read_at_load_and_a_missing_or_bad_one_or_one_without_tls_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "not a certificate\n").unwrap();
        for (toml, field) in [
            (
                "[sinks.postgres]\ntls = true\nca_file = \"/nonexistent/ca.pem\"\n",
                "sinks.postgres.ca_file",
            ),
            (
                "[sinks.nats]\nca_file = \"/nonexistent/ca.pem\"\n",
                "sinks.nats.ca_file",
            ),
            (
                &format!(
                    "[sinks.clickhouse]\nurl = \"https://h:8443\"\nca_file = {:?}\n",
                    not_pem.display().to_string()
                ),
                "sinks.clickhouse.ca_file",
            ),
        ] {
            let mut config = Config::parse("t", toml).unwrap();
            let err = config.apply_env("t", |_| None).unwrap_err();
            assert_eq!(err.location, format!("field `{field}`"), "{err}");
        }
        // A certificate read, but no TLS asked for: named by the validation.
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["ca".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, ca.pem()).unwrap();
        let pem = pem.display().to_string();
        for (toml, field) in [
            (
                format!("[sinks.postgres]\nca_file = {pem:?}\n"),
                "sinks.postgres.ca_file",
            ),
            (
                format!("[sinks.clickhouse]\nca_file = {pem:?}\n"),
                "sinks.clickhouse.ca_file",
            ),
        ] {
            let mut config = Config::parse("t", &toml).unwrap();
            config.apply_env("t", |_| None).unwrap();
            assert!(config.sinks.postgres.ca.is_some() || config.sinks.clickhouse.ca.is_some());
            let err = config.validate("t").unwrap_err();
            assert_eq!(err.location, format!("field `{field}`"), "{err}");
        }
        let mut config = Config::parse("t", &format!("[sinks.postgres]\ntls = true\nca_file = {pem:?}\n")).unwrap();
        config.apply_env("t", |_| None).unwrap();
        config.validate("t").unwrap();
        assert_eq!(config.sinks.postgres.ca.unwrap().path.display().to_string(), pem);
    }

    #[test]
    fn a_sink_secret_set_but_empty_is_refused_and_named_and_otherwise_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let toml = format!("[sinks.postgres]\npassword_file = {:?}\n", file.display().to_string());
        let config = Config::parse("t", &toml).unwrap();
        for (value, expected) in [(None, "from-file"), (Some(" from-env "), "from-env")] {
            let mut c = config.clone();
            c.apply_env("t", |n| {
                value.filter(|_| n == "TICKVAULT_POSTGRES_PASSWORD").map(str::to_owned)
            })
            .unwrap();
            assert_eq!(c.sinks.postgres.password.as_ref().unwrap().expose(), expected);
        }
        for env in [
            "TICKVAULT_POSTGRES_PASSWORD",
            "TICKVAULT_CLICKHOUSE_PASSWORD",
            "TICKVAULT_NATS_TOKEN",
        ] {
            let mut c = config.clone();
            let err = c
                .apply_env("t", |n| (n == env).then(|| " ".to_owned()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(env) && err.contains("set but empty"), "{err}");
        }
    }

    #[test]
    fn a_bad_symbol_or_channel_names_its_place() {
        let config = Config::parse(
            "t",
            "[live.forex]\nsymbols = [\"EUR/USD\", \"E\"]\nchannels = [\"C\"]\n",
        )
        .unwrap();
        assert_eq!(
            config.validate("t").unwrap_err().location,
            "field `live.forex.symbols[1]`"
        );
        let config = Config::parse("t", "[live.crypto]\nsymbols = [\"BTC-USD\"]\nchannels = [\"C\"]\n").unwrap();
        assert_eq!(
            config.validate("t").unwrap_err().location,
            "field `live.crypto.channels[0]`"
        );
        let config = Config::parse("t", "[polygon]\nws_url = \"http://x\"\n").unwrap();
        assert_eq!(config.validate("t").unwrap_err().location, "field `polygon.ws_url`");
    }
}
