//! What the simulator serves and which faults it injects (`--faults`).

use std::time::Duration;

/// Faults to inject, parsed from `--faults` (a comma-separated list):
/// `disconnect=30s` (drop every WebSocket connection after that long),
/// `kick=30s` (end every connection after that long as Polygon does: a last frame with
/// a `force_disconnect` status between events, then a close frame),
/// `429=N` (answer the first N REST requests of every minute with 429),
/// `slow=200ms` (delay every REST response), `holes=N` (one minute in N has no data at
/// the source), `5xx=N` (answer one REST request in N with a 502), `malformed=N` (send a
/// malformed frame before one live frame in N), `interleave=N` (after each live tick whose
/// millisecond is a multiple of N, one from another exchange stamped with the time of
/// the symbol's tick before: timestamps go back and repeat, as a crypto pair's trades
/// from several exchanges do),
/// `delayed=15m` (a delayed plan: REST answers say `"status":"DELAYED"` and end that long
/// before the present), `error200=N` (answer one REST request in N with an HTTP 200
/// whose body is an error), `badnext=N` (one `next_url` in N does not parse), `retrydate=1` (a 429's `Retry-After`
/// is an HTTP date, not seconds). REST
/// never serves a bar whose minute is not over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    pub disconnect_every: Option<Duration>,
    pub kick_every: Option<Duration>,
    pub burst_429: u32,
    pub slow: Option<Duration>,
    pub hole_every: u32,
    pub error_5xx_every: u32,
    pub malformed_every: u32,
    pub interleave_every: u32,
    pub delayed: Option<Duration>,
    pub error_200_every: u32,
    pub bad_next_every: u32,
    pub retry_after_date: bool,
}

impl std::str::FromStr for Faults {
    type Err = String;
    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let mut faults = Faults::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| format!("fault {item:?}: expected NAME=VALUE"))?;
            let count = || {
                value
                    .parse::<u32>()
                    .map_err(|_| format!("fault {name}: {value:?} is not a count"))
            };
            let duration = || humantime::parse_duration(value).map_err(|e| format!("fault {name}: {e}"));
            match name {
                "disconnect" => faults.disconnect_every = Some(duration()?),
                "kick" => faults.kick_every = Some(duration()?),
                "429" => faults.burst_429 = count()?,
                "slow" => faults.slow = Some(duration()?),
                "holes" => faults.hole_every = count()?,
                "5xx" => faults.error_5xx_every = count()?,
                "malformed" => faults.malformed_every = count()?,
                "interleave" => faults.interleave_every = count()?,
                "delayed" => faults.delayed = Some(duration()?),
                "error200" => faults.error_200_every = count()?,
                "badnext" => faults.bad_next_every = count()?,
                "retrydate" => faults.retry_after_date = count()? > 0,
                other => {
                    return Err(format!(
                        "unknown fault {other:?} (disconnect, kick, 429, slow, holes, 5xx, malformed, interleave, delayed, error200, badnext, retrydate)"
                    ))
                }
            }
        }
        Ok(faults)
    }
}

/// The simulator's settings.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    /// Only this key is accepted; `None` accepts any non-empty key.
    pub api_key: Option<String>,
    pub faults: Faults,
    /// Average quotes per minute per symbol on the live feed (and in REST bar counts).
    pub quotes_per_minute: u32,
    /// REST requests per minute per key before 429s; 0 for no quota.
    pub requests_per_minute: u32,
    /// How often the live feed flushes a batch of events to each connection.
    pub batch_interval: Duration,
    /// Frames a connection may have waiting before it is cut off as a slow consumer.
    pub max_queued_frames: usize,
    /// Serve every market around the clock (no forex weekends, no stock sessions).
    pub always_open: bool,
    /// Keep every live frame sent, for a drill's ground truth ([`super::SimHandle::sent`]).
    pub record_sent: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 1,
            api_key: None,
            faults: Faults::default(),
            quotes_per_minute: 120,
            requests_per_minute: 0,
            batch_interval: Duration::from_millis(20),
            max_queued_frames: 1024,
            always_open: false,
            record_sent: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_list_parses_and_a_bad_one_is_named() {
        let f: Faults = "disconnect=5s, 429=3,slow=150ms,holes=20,5xx=7".parse().unwrap();
        assert_eq!(f.disconnect_every, Some(Duration::from_secs(5)));
        assert_eq!((f.burst_429, f.hole_every, f.error_5xx_every), (3, 20, 7));
        assert_eq!(f.slow, Some(Duration::from_millis(150)));
        assert!("explode=1".parse::<Faults>().unwrap_err().contains("explode"));
        assert!("429=many".parse::<Faults>().is_err());
    }
}
