//! The body of Polygon's aggregates endpoint (`/v2/aggs/ticker/.../range/1/minute/...`),
//! as the backfill downloader reads it.

use serde::Deserialize;

use crate::event::{Bar, Timeframe};

/// One page of minute bars.
#[derive(Debug, Deserialize)]
pub struct AggsPage {
    #[serde(default)]
    pub results: Vec<AggBar>,
    pub next_url: Option<String>,
    #[serde(default)]
    pub status: String,
    /// An error answer's reason (`error` or `message`).
    #[serde(default, alias = "message")]
    pub error: Option<String>,
}

impl AggsPage {
    pub fn parse(body: &[u8]) -> Result<AggsPage, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// Whether the page carries data: a 200 whose body is an error (`"status":"ERROR"`,
    /// or `{}`) is no answer, and claiming it would mark a period done with no bars.
    pub fn has_data(&self) -> bool {
        self.status == "OK" || self.status == "DELAYED"
    }
}

/// One minute bar as Polygon sends it.
#[derive(Debug, Deserialize)]
pub struct AggBar {
    pub t: i64,
    pub o: f64,
    pub h: f64,
    pub l: f64,
    pub c: f64,
    #[serde(default)]
    pub v: f64,
    pub vw: Option<f64>,
    pub n: Option<u64>,
}

impl AggBar {
    /// The captured bar (a caller checks it with `Event::problem` before appending it).
    pub fn to_bar(&self, symbol: &str) -> Bar {
        Bar {
            symbol: symbol.to_owned(),
            timeframe: Timeframe::MINUTE,
            start_ms: self.t,
            open: self.o,
            high: self.h,
            low: self.l,
            close: self.c,
            volume: self.v,
            vwap: self.vw,
            trades: self.n,
        }
    }
}
