//! WebSocket frames: Polygon sends every frame as a JSON array of objects, each with an
//! `ev` field. Parsing is lenient where Polygon is inconsistent (`x` as a number or a
//! string, omitted zero fields) and never panics: a bad item is reported, not fatal.

use serde_json::Value;

use super::symbol;
use crate::event::{Bar, Body, Feed, Quote, Timeframe, Trade};

/// One item of a frame.
#[derive(Clone, Debug, PartialEq)]
pub enum WireItem {
    Status {
        status: String,
        message: String,
    },
    /// A market event; its `uid` is 0 and is assigned by the collector.
    Event(Body),
    /// An `ev` this client does not capture (e.g. `XL2`, `LULD`).
    Ignored(String),
}

/// Why an item or frame could not be used. Carries the raw text, cut short.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {reason}: {raw}")]
pub struct Malformed {
    pub what: &'static str,
    pub reason: String,
    pub raw: String,
}

const RAW_LIMIT: usize = 200;

/// The first `RAW_LIMIT` bytes of a text, on a char boundary.
pub fn cut(raw: &str) -> String {
    if raw.len() <= RAW_LIMIT {
        return raw.to_owned();
    }
    let mut end = RAW_LIMIT;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &raw[..end])
}

fn malformed(what: &'static str, reason: impl Into<String>, raw: &str) -> Malformed {
    Malformed {
        what,
        reason: reason.into(),
        raw: cut(raw),
    }
}

/// Parses one text frame into its items; a frame that is not a JSON array is one error,
/// an item that is not usable is an error in its place.
pub fn parse_frame(feed: Feed, text: &str) -> Result<Vec<Result<WireItem, Malformed>>, Malformed> {
    let value: Value = serde_json::from_str(text).map_err(|e| malformed("frame", e.to_string(), text))?;
    let Value::Array(items) = value else {
        return Err(malformed("frame", "not a JSON array", text));
    };
    Ok(items.iter().map(|item| parse_item(feed, item)).collect())
}

fn num(item: &Value, field: &str) -> Option<f64> {
    match &item[field] {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn int(item: &Value, field: &str) -> Option<i64> {
    match &item[field] {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn parse_item(feed: Feed, item: &Value) -> Result<WireItem, Malformed> {
    let raw = || item.to_string();
    let bad = |reason: &str| malformed("event", reason, &raw());
    // The spec's `max_connections` example is a status without `ev`: a `status`
    // field alone makes a status.
    let ev = match item["ev"].as_str() {
        Some(ev) => ev,
        None if item["status"].is_string() => "status",
        None => return Err(bad("no `ev` field")),
    };
    if ev == "status" {
        return Ok(WireItem::Status {
            status: item["status"].as_str().unwrap_or("").to_owned(),
            message: item["message"].as_str().unwrap_or("").to_owned(),
        });
    }
    let symbol_field = match (feed, ev) {
        (Feed::Forex, "C") => "p",
        (Feed::Forex, _) | (Feed::Crypto, _) => "pair",
        (Feed::Stocks, _) => "sym",
    };
    let need_num = |field: &str| num(item, field).ok_or_else(|| bad(&format!("`{field}` missing or not a number")));
    let need_int = |field: &str| int(item, field).ok_or_else(|| bad(&format!("`{field}` missing or not an integer")));
    let known = matches!(
        (feed, ev),
        (Feed::Forex, "C" | "CA" | "CAS")
            | (Feed::Crypto, "XQ" | "XT" | "XA" | "XAS")
            | (Feed::Stocks, "Q" | "T" | "AM" | "A")
    );
    if !known {
        return Ok(WireItem::Ignored(ev.to_owned()));
    }
    let symbol = item[symbol_field]
        .as_str()
        .and_then(|s| symbol::canonical(feed, s))
        .ok_or_else(|| bad(&format!("`{symbol_field}` missing or not a {feed} symbol")))?;
    let exchange = int(item, "x").and_then(|x| i32::try_from(x).ok());
    let body = match ev {
        "C" | "XQ" | "Q" => {
            let (bid, ask) = if ev == "C" { ("b", "a") } else { ("bp", "ap") };
            Body::Quote(Quote {
                symbol,
                ts_ms: need_int("t")?,
                uid: 0,
                bid: need_num(bid)?,
                ask: need_num(ask)?,
                bid_size: num(item, "bs"),
                ask_size: num(item, "as"),
                exchange: if ev == "Q" {
                    int(item, "bx").and_then(|x| i32::try_from(x).ok())
                } else {
                    exchange
                },
            })
        }
        "XT" | "T" => Body::Trade(Trade {
            symbol,
            ts_ms: need_int("t")?,
            uid: 0,
            price: need_num("p")?,
            size: num(item, "s").unwrap_or(0.0),
            exchange,
            trade_id: match &item["i"] {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            },
            conditions: match &item["c"] {
                Value::Array(cs) => cs
                    .iter()
                    .filter_map(|c| c.as_i64())
                    .filter_map(|c| i32::try_from(c).ok())
                    .collect(),
                Value::Number(n) => n
                    .as_i64()
                    .and_then(|c| i32::try_from(c).ok())
                    .into_iter()
                    .filter(|c| *c != 0)
                    .collect(),
                _ => Vec::new(),
            },
        }),
        _ => {
            let timeframe = if matches!(ev, "CAS" | "XAS" | "A") {
                Timeframe::SECOND
            } else {
                Timeframe::MINUTE
            };
            let volume = num(item, "v").unwrap_or(0.0);
            Body::Bar(Bar {
                symbol,
                timeframe,
                start_ms: need_int("s")?,
                open: need_num("o")?,
                high: need_num("h")?,
                low: need_num("l")?,
                close: need_num("c")?,
                volume,
                vwap: num(item, "vw"),
                // Forex `v` is the count of quotes in the window.
                trades: (feed == Feed::Forex).then_some(volume as u64),
            })
        }
    };
    Ok(WireItem::Event(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_forex_frame_parses() {
        // Frames as ../shared/polygon-protocol.md records them.
        let frame = r#"[{"ev":"C","p":"EUR/USD","x":"44","a":1.0843,"b":1.0842,"t":1698116400123},
            {"ev":"CA","pair":"USD/SGD","v":72,"o":1.36503,"c":1.365,"h":1.36505,"l":1.3645,"s":1698116400000,"e":1698116460000}]"#;
        let items = parse_frame(Feed::Forex, frame).unwrap();
        let Ok(WireItem::Event(Body::Quote(q))) = &items[0] else {
            panic!("{items:?}")
        };
        assert_eq!(
            (q.symbol.as_str(), q.bid, q.ask, q.exchange, q.ts_ms),
            ("EUR/USD", 1.0842, 1.0843, Some(44), 1698116400123)
        );
        let Ok(WireItem::Event(Body::Bar(b))) = &items[1] else {
            panic!("{items:?}")
        };
        assert_eq!(
            (b.symbol.as_str(), b.timeframe, b.start_ms, b.trades),
            ("USD/SGD", Timeframe::MINUTE, 1698116400000, Some(72))
        );
    }

    #[test]
    fn status_frames_parse() {
        let items = parse_frame(
            Feed::Crypto,
            r#"[{"ev":"status","status":"auth_success","message":"authenticated"}]"#,
        )
        .unwrap();
        assert_eq!(
            items,
            vec![Ok(WireItem::Status {
                status: "auth_success".into(),
                message: "authenticated".into()
            })]
        );
    }

    #[test]
    fn a_status_without_ev_is_a_status_as_the_specs_max_connections_example_is() {
        let items = parse_frame(
            Feed::Crypto,
            r#"[{"status":"max_connections","message":"Maximum number of connections exceeded."}]"#,
        )
        .unwrap();
        assert_eq!(
            items,
            vec![Ok(WireItem::Status {
                status: "max_connections".into(),
                message: "Maximum number of connections exceeded.".into()
            })]
        );
        // Without `ev` or `status` it is still malformed.
        assert!(parse_frame(Feed::Crypto, r#"[{"message":"x"}]"#).unwrap()[0].is_err());
    }

    #[test]
    fn a_bad_item_is_reported_in_its_place_and_the_rest_still_parse() {
        let frame = r#"[{"ev":"XQ","pair":"BTC-USD","bp":"x"},{"ev":"XT","pair":"X:BTC-USD","p":64000.5,"s":0.01,"t":1,"c":[2],"i":12345},{"ev":"XL2"}]"#;
        let items = parse_frame(Feed::Crypto, frame).unwrap();
        assert!(items[0].as_ref().unwrap_err().reason.contains("`t`") || items[0].is_err());
        let Ok(WireItem::Event(Body::Trade(t))) = &items[1] else {
            panic!("{items:?}")
        };
        assert_eq!(
            (t.symbol.as_str(), t.trade_id.as_deref(), t.conditions.clone()),
            ("BTC-USD", Some("12345"), vec![2])
        );
        assert_eq!(items[2], Ok(WireItem::Ignored("XL2".into())));
    }

    #[test]
    fn frames_that_are_not_arrays_are_errors_with_the_raw_text_cut_short() {
        let long = format!("{{\"ev\":\"C\",\"junk\":\"{}\"}}", "z".repeat(1000));
        let err = parse_frame(Feed::Forex, &long).unwrap_err();
        assert!(err.raw.len() < 300, "{}", err.raw.len());
        assert!(parse_frame(Feed::Forex, "not json").is_err());
    }

    proptest::proptest! {
        #[test]
        fn parsing_any_text_never_panics(text in ".{0,300}") {
            let _ = parse_frame(Feed::Stocks, &text);
        }

        #[test]
        fn parsing_any_array_of_objects_never_panics(fields in proptest::collection::vec(("[a-z]{1,3}", proptest::prelude::any::<i64>()), 0..8), ev in "(C|CA|CAS|XQ|XT|XA|Q|T|AM|A|status)") {
            let mut obj = serde_json::Map::new();
            obj.insert("ev".into(), Value::String(ev));
            for (k, v) in fields { obj.insert(k, Value::from(v)); }
            let text = Value::Array(vec![Value::Object(obj)]).to_string();
            for feed in Feed::ALL { let _ = parse_frame(feed, &text); }
        }
    }
}
