//! Symbol forms. Polygon writes one pair several ways (`EUR/USD`, `C:EUR-USD`,
//! `C:EURUSD`); tickvault keeps one canonical form per market: `EUR/USD` for forex,
//! `BTC-USD` for crypto, `AAPL` for stocks.

use crate::event::Feed;

fn split_pair(s: &str) -> Option<(&str, &str)> {
    if let Some(pair) = s.split_once(['/', '-']) {
        return Some(pair);
    }
    // `EURUSD` / `BTCUSD`: the quote currency is the last three letters.
    (s.len() >= 6 && s.is_ascii()).then(|| s.split_at(s.len() - 3))
}

/// The canonical form of a symbol of `feed`, from any of Polygon's spellings.
pub fn canonical(feed: Feed, symbol: &str) -> Option<String> {
    let s = symbol.trim();
    let valid = |part: &str| !part.is_empty() && part.len() <= 12 && part.bytes().all(|b| b.is_ascii_alphanumeric());
    match feed {
        Feed::Forex => {
            let s = s.strip_prefix("C:").unwrap_or(s);
            let (base, quote) = split_pair(s)?;
            (valid(base) && valid(quote))
                .then(|| format!("{}/{}", base.to_ascii_uppercase(), quote.to_ascii_uppercase()))
        }
        Feed::Crypto => {
            let s = s.strip_prefix("X:").unwrap_or(s);
            let (base, quote) = split_pair(s)?;
            (valid(base) && valid(quote))
                .then(|| format!("{}-{}", base.to_ascii_uppercase(), quote.to_ascii_uppercase()))
        }
        Feed::Stocks => (!s.is_empty() && s.len() <= 12 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'))
            .then(|| s.to_ascii_uppercase()),
    }
}

/// The ticker the REST aggregates endpoint takes: `C:EURUSD`, `X:BTCUSD`, `AAPL`.
pub fn rest_ticker(feed: Feed, canonical: &str) -> String {
    match feed {
        Feed::Forex => format!("C:{}", canonical.replace('/', "")),
        Feed::Crypto => format!("X:{}", canonical.replace('-', "")),
        Feed::Stocks => canonical.to_owned(),
    }
}

/// Market and canonical symbol of a REST ticker.
pub fn parse_rest_ticker(ticker: &str) -> Option<(Feed, String)> {
    if let Some(rest) = ticker.strip_prefix("C:") {
        return Some((Feed::Forex, canonical(Feed::Forex, rest)?));
    }
    if let Some(rest) = ticker.strip_prefix("X:") {
        return Some((Feed::Crypto, canonical(Feed::Crypto, rest)?));
    }
    Some((Feed::Stocks, canonical(Feed::Stocks, ticker)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_pair_has_one_canonical_form() {
        for s in ["EUR/USD", "C:EUR-USD", "C:EURUSD", "eur/usd", " EUR/USD "] {
            assert_eq!(canonical(Feed::Forex, s).as_deref(), Some("EUR/USD"), "{s}");
        }
        for s in ["BTC-USD", "X:BTC-USD", "X:BTCUSD"] {
            assert_eq!(canonical(Feed::Crypto, s).as_deref(), Some("BTC-USD"), "{s}");
        }
        assert_eq!(canonical(Feed::Stocks, "aapl").as_deref(), Some("AAPL"));
        assert_eq!(canonical(Feed::Forex, "EU"), None);
        assert_eq!(canonical(Feed::Forex, "EUR/U$D"), None);
    }

    #[test]
    fn rest_tickers_round_trip() {
        for (feed, s) in [
            (Feed::Forex, "EUR/USD"),
            (Feed::Crypto, "BTC-USD"),
            (Feed::Stocks, "AAPL"),
        ] {
            let ticker = rest_ticker(feed, s);
            assert_eq!(parse_rest_ticker(&ticker), Some((feed, s.to_owned())));
        }
        assert_eq!(rest_ticker(Feed::Forex, "EUR/USD"), "C:EURUSD");
    }
}
