//! The simulator's REST aggregates endpoint, as ../shared/polygon-protocol.md describes:
//! `GET /v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{from}/{to}`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Serialize;

use super::server::Sim;
use crate::event::{now_ms, Feed, MINUTE_MS};
use crate::polygon::symbol;

/// The largest `limit` Polygon accepts.
pub const MAX_LIMIT: usize = 50_000;
const DEFAULT_LIMIT: usize = 5_000;

#[derive(Serialize)]
struct BarJson {
    v: u64,
    vw: f64,
    o: f64,
    c: f64,
    h: f64,
    l: f64,
    t: i64,
    n: u64,
}

/// The whole response of a request, fields in the order Polygon sends them.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AggsResponse {
    ticker: String,
    query_count: usize,
    results_count: usize,
    adjusted: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    results: Vec<BarJson>,
    status: &'static str,
    #[serde(rename = "request_id")]
    request_id: String,
    count: usize,
    #[serde(rename = "next_url", skip_serializing_if = "Option::is_none")]
    next_url: Option<String>,
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// An error body in Polygon's key order: `status`, `request_id`, then `error` (or
/// `message`, as Polygon's 403s have it).
fn error(status: StatusCode, key: &str, text: &str, request_id: &str) -> Response {
    let status_text = if status == StatusCode::FORBIDDEN {
        "NOT_AUTHORIZED"
    } else {
        "ERROR"
    };
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let body = format!(
        "{{\"status\":{},\"request_id\":{},{}:{}}}",
        quote(status_text),
        quote(request_id),
        quote(key),
        quote(text)
    );
    json_response(status, body)
}

fn parse_time(s: &str, end_of_day: bool) -> Option<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    let date: jiff::civil::Date = s.parse().ok()?;
    let start = date
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .ok()?
        .timestamp()
        .as_millisecond();
    Some(if end_of_day { start + 86_400_000 - 1 } else { start })
}

fn bucket_ms(multiplier: u32, timespan: &str) -> Option<i64> {
    let unit = match timespan {
        "minute" => MINUTE_MS,
        "hour" => 60 * MINUTE_MS,
        "day" => 1440 * MINUTE_MS,
        _ => return None,
    };
    (multiplier >= 1).then(|| unit * i64::from(multiplier))
}

pub(crate) async fn aggregates(
    State(sim): State<Arc<Sim>>,
    Path((ticker, multiplier, timespan, from, to)): Path<(String, u32, String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let n = sim.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let request_id = format!("sim-{:x}-{n}", sim.options.seed);
    if let Some(delay) = sim.options.faults.slow {
        tokio::time::sleep(delay).await;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let key = query.get("apiKey").map(String::as_str).or(bearer).unwrap_or("");
    if key.is_empty() {
        return error(
            StatusCode::UNAUTHORIZED,
            "error",
            "API Key was not provided",
            &request_id,
        );
    }
    if !sim.accepts_key(key) {
        return error(StatusCode::UNAUTHORIZED, "error", "Unknown API Key", &request_id);
    }
    if let Some(retry_after) = sim.rate_limited(key) {
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            "error",
            "You've exceeded the maximum requests per minute, please wait or upgrade your subscription to continue. https://polygon.io/pricing",
            &request_id,
        );
        let value = if sim.options.faults.retry_after_date {
            let at = jiff::Timestamp::from_millisecond(now_ms() + retry_after as i64 * 1000)
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
            jiff::fmt::rfc2822::DateTimePrinter::new()
                .timestamp_to_rfc9110_string(&at)
                .unwrap_or_default()
        } else {
            retry_after.to_string()
        };
        if let Ok(value) = value.parse() {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    let every = sim.options.faults.error_5xx_every;
    if every > 0 && n.is_multiple_of(u64::from(every)) {
        return error(
            StatusCode::BAD_GATEWAY,
            "error",
            "simulated upstream failure",
            &request_id,
        );
    }

    // The simulated plan covers forex, crypto and stocks; options and indices are not in it.
    let every = sim.options.faults.error_200_every;
    if every > 0 && n.is_multiple_of(u64::from(every)) {
        let body = serde_json::json!({
            "status": "ERROR",
            "request_id": request_id,
            "error": "simulated error in an HTTP 200 answer",
        });
        return json_response(StatusCode::OK, body.to_string());
    }

    if ticker.starts_with("O:") || ticker.starts_with("I:") {
        return error(
            StatusCode::FORBIDDEN,
            "message",
            "You are not entitled to this data. Please upgrade your plan at https://polygon.io/pricing",
            &request_id,
        );
    }
    let Some((feed, symbol)) = symbol::parse_rest_ticker(&ticker) else {
        return error(
            StatusCode::BAD_REQUEST,
            "error",
            "Could not parse the ticker.",
            &request_id,
        );
    };
    let Some(bucket) = bucket_ms(multiplier, &timespan) else {
        return error(StatusCode::BAD_REQUEST, "error", "Unsupported timespan.", &request_id);
    };
    let (Some(from_ms), Some(to_ms)) = (parse_time(&from, false), parse_time(&to, true)) else {
        return error(
            StatusCode::BAD_REQUEST,
            "error",
            "Could not parse the from/to dates.",
            &request_id,
        );
    };
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => DEFAULT_LIMIT,
        Some(Ok(l)) if (1..=MAX_LIMIT).contains(&l) => l,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "error",
                "limit must be between 1 and 50000",
                &request_id,
            )
        }
    };
    let descending = query.get("sort").map(String::as_str) == Some("desc");
    let adjusted = query.get("adjusted").map(String::as_str) != Some("false");

    // Widen outward to whole buckets (both ends inclusive).
    let first = from_ms.div_euclid(bucket) * bucket;
    // No bar for a bucket that is not over (nor, on a delayed plan, for the last ones).
    let delay = sim
        .options
        .faults
        .delayed
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let available = now_ms().saturating_sub(delay).div_euclid(bucket) * bucket - bucket;
    let last = (to_ms.div_euclid(bucket) * bucket).min(available);
    let (results, next) = collect(&sim, feed, &symbol, bucket, first, last, limit, descending);

    let bad_next = sim.options.faults.bad_next_every;
    let bad_next = bad_next > 0 && n.is_multiple_of(u64::from(bad_next));
    let next_url = next.map(|next_from| {
        if bad_next {
            return "http://[not a url/v2/aggs".to_owned();
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1");
        let order = if descending { "desc" } else { "asc" };
        let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("limit={limit}&sort={order}"));
        // The key is deliberately not in next_url: clients re-attach it.
        let (path_from, path_to) = if descending {
            (from.clone(), next_from.to_string())
        } else {
            (next_from.to_string(), to.clone())
        };
        format!(
            "http://{host}/v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{path_from}/{path_to}?cursor={cursor}&adjusted={adjusted}&sort={order}&limit={limit}"
        )
    });
    let response = AggsResponse {
        ticker,
        query_count: results.len(),
        results_count: results.len(),
        adjusted,
        count: results.len(),
        results,
        status: if sim.options.faults.delayed.is_some() {
            "DELAYED"
        } else {
            "OK"
        },
        request_id,
        next_url,
    };
    match serde_json::to_string(&response) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Bars of `bucket` width between `first` and `last` bucket starts, reading at most
/// `limit` base (minute) bars; returns the bars and, when the limit cut the range, the
/// start of the next bucket to read.
#[allow(clippy::too_many_arguments)]
fn collect(
    sim: &Sim,
    feed: Feed,
    symbol: &str,
    bucket: i64,
    first: i64,
    last: i64,
    limit: usize,
    descending: bool,
) -> (Vec<BarJson>, Option<i64>) {
    let mut results = Vec::new();
    let mut base_read = 0usize;
    let mut start = if descending { last } else { first };
    while (first..=last).contains(&start) {
        let minutes = (bucket / MINUTE_MS).max(1);
        let mut bar: Option<BarJson> = None;
        let mut weighted = 0.0;
        for i in 0..minutes {
            let Some(b) = sim.market.bar(feed, symbol, start + i * MINUTE_MS) else {
                continue;
            };
            base_read += 1;
            weighted += b.vwap * b.count as f64;
            bar = Some(match bar {
                None => BarJson {
                    v: b.count,
                    vw: 0.0,
                    o: b.open,
                    c: b.close,
                    h: b.high,
                    l: b.low,
                    t: start,
                    n: b.count,
                },
                Some(acc) => BarJson {
                    v: acc.v + b.count,
                    c: b.close,
                    h: acc.h.max(b.high),
                    l: acc.l.min(b.low),
                    n: acc.n + b.count,
                    ..acc
                },
            });
        }
        if let Some(mut bar) = bar {
            bar.vw = (weighted / bar.v as f64 * 1e5).round() / 1e5;
            results.push(bar);
        }
        start = if descending { start - bucket } else { start + bucket };
        if base_read >= limit && (first..=last).contains(&start) {
            return (results, Some(start));
        }
    }
    (results, None)
}
