//! The six indicators on every derived bar, computed one bar at a time exactly as
//! TA-Lib computes them over the whole series (its C code, default settings, no
//! unstable period): the same seeding, the same warm-up (no value before TA-Lib gives
//! one) and its floating-point operations in its order. The fixtures in
//! `tests/fixtures/talib/` (made by Python's `ta-lib` 0.8.2, C library 0.8.1, with the
//! script beside them) check every value to 1e-9 relative; most agree to the last bit
//! (ATR's smoothing differs from the C library's in the last bits on some bars).
//!
//! [`State`] is everything a series needs to go on from a bar: with the bars before
//! it, `State::step` gives the next bar's values, so a series can be recomputed from
//! any bar (late data) and gives the same bits as one computed in one go.

use serde::{Deserialize, Serialize};

/// SMA, EMA and Bollinger bands period; Bollinger's width in standard deviations.
const MA: usize = 20;
const BB_DEV: f64 = 2.0;
const RSI: usize = 14;
const ATR: usize = 14;
const MACD_FAST: usize = 12;
const MACD_SLOW: usize = 26;
const MACD_SIGNAL: usize = 9;
/// The bar index from which every indicator has its value (MACD's signal is last).
pub const WARM: u32 = (MACD_SLOW + MACD_SIGNAL - 2) as u32;

/// TA-Lib's `PER_TO_K`.
fn k(period: usize) -> f64 {
    2.0 / ((period + 1) as f64)
}

/// TA-Lib's `TA_IS_ZERO`, `TA_IS_ZERO_OR_NEG`.
fn is_zero(v: f64) -> bool {
    -0.00000000000001 < v && v < 0.00000000000001
}
fn is_zero_or_neg(v: f64) -> bool {
    v < 0.00000000000001
}

/// The prices of a bar the indicators read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hlc {
    pub high: f64,
    pub low: f64,
    pub close: f64,
}

/// The indicator values of one bar; `None` where TA-Lib gives no value yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Indicators {
    pub sma20: Option<f64>,
    pub ema20: Option<f64>,
    pub rsi14: Option<f64>,
    pub macd: Option<f64>,
    pub macd_signal: Option<f64>,
    pub macd_hist: Option<f64>,
    pub bb_upper: Option<f64>,
    pub bb_middle: Option<f64>,
    pub bb_lower: Option<f64>,
    pub atr14: Option<f64>,
}

impl Indicators {
    /// Names and values, in the order the sinks and exports show them.
    pub fn fields(&self) -> [(&'static str, Option<f64>); 10] {
        [
            ("sma20", self.sma20),
            ("ema20", self.ema20),
            ("rsi14", self.rsi14),
            ("macd", self.macd),
            ("macd_signal", self.macd_signal),
            ("macd_hist", self.macd_hist),
            ("bb_upper", self.bb_upper),
            ("bb_middle", self.bb_middle),
            ("bb_lower", self.bb_lower),
            ("atr14", self.atr14),
        ]
    }
}

/// A series' running values after a bar, as TA-Lib holds them in its loops. Before an
/// indicator's first value its field holds the seed's running sum.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    /// Bars so far, counted up to [`WARM`] + 1 (past it, the position no longer
    /// matters, and two states that agree then give the same values from there on).
    n: u32,
    /// The SMA's running total (the trailing close already taken off).
    sum: f64,
    /// Bollinger's running total of squares.
    sum_sq: f64,
    ema: f64,
    fast: f64,
    slow: f64,
    signal: f64,
    prev_close: f64,
    gain: f64,
    loss: f64,
    atr: f64,
}

impl State {
    /// The values of the bar after `before` (the series' bars so far, oldest first; only
    /// the last 20 are read) and the state after it.
    pub fn step(&self, before: &[Hlc], bar: Hlc) -> (State, Indicators) {
        let j = self.n as usize;
        let x = bar.close;
        let mut s = self.clone();
        let mut out = Indicators::default();
        // The close leaving the 20-bar window, once there is one.
        let trailing = (j >= MA - 1).then(|| before[before.len() + 1 - MA].close);

        // SMA (TA_INT_SMA) and Bollinger bands (TA_INT_stddev_using_precalc_ma).
        match trailing {
            None => {
                s.sum += x;
                s.sum_sq += x * x;
            }
            Some(old) => {
                let total = s.sum + x;
                s.sum = total - old;
                let sma = total / MA as f64;
                s.sum_sq += x * x;
                let mut mean2 = s.sum_sq / MA as f64;
                s.sum_sq -= old * old;
                mean2 -= sma * sma;
                let dev = if is_zero_or_neg(mean2) { 0.0 } else { mean2.sqrt() };
                let width = dev * BB_DEV;
                out.sma20 = Some(sma);
                out.bb_middle = Some(sma);
                out.bb_upper = Some(sma + width);
                out.bb_lower = Some(sma - width);
            }
        }

        // EMA (TA_INT_EMA: seeded with the SMA of the first 20).
        s.ema = ema_step(s.ema, x, j, 0, MA);
        if j >= MA - 1 {
            out.ema20 = Some(s.ema);
        }

        // MACD (TA_INT_MACD): both EMAs are seeded at the slow one's first value, the
        // fast one with the SMA of the 12 closes ending there; the signal is the EMA(9)
        // of the MACD line from there, and TA-Lib gives all three from the signal's first.
        let first = MACD_SLOW - 1;
        s.slow = ema_step(s.slow, x, j, 0, MACD_SLOW);
        s.fast = ema_step(s.fast, x, j, first + 1 - MACD_FAST, MACD_FAST);
        if j >= first {
            let line = s.fast - s.slow;
            s.signal = ema_step(s.signal, line, j, first, MACD_SIGNAL);
            if j >= first + MACD_SIGNAL - 1 {
                out.macd = Some(line);
                out.macd_signal = Some(s.signal);
                out.macd_hist = Some(line - s.signal);
            }
        }

        // RSI (TA_RSI, Wilder's smoothing, seeded with the mean gain and loss of the
        // first 14 changes). TA-Lib 0.6 on multiplies by the period's inverse where
        // older versions divided: the last bits differ, and these are today's.
        if j > 0 {
            let change = x - s.prev_close;
            let gain = if change > 0.0 { change } else { 0.0 };
            let loss = gain - change;
            let inv = 1.0 / RSI as f64;
            if j <= RSI {
                s.gain += gain;
                s.loss += loss;
                if j == RSI {
                    s.gain *= inv;
                    s.loss *= inv;
                }
            } else {
                s.gain = (s.gain * (RSI - 1) as f64 + gain) * inv;
                s.loss = (s.loss * (RSI - 1) as f64 + loss) * inv;
            }
            if j >= RSI {
                let total = s.gain + s.loss;
                out.rsi14 = Some(if is_zero(total) { 0.0 } else { 100.0 * (s.gain / total) });
            }
        }

        // ATR (TA_ATR on TA_TRANGE from the second bar; seeded with their SMA).
        if j > 0 {
            let prev = s.prev_close;
            let mut range = bar.high - bar.low;
            let up = (prev - bar.high).abs();
            if up > range {
                range = up;
            }
            let down = (prev - bar.low).abs();
            if down > range {
                range = down;
            }
            if j <= ATR {
                s.atr += range;
                if j == ATR {
                    s.atr /= ATR as f64;
                }
            } else {
                s.atr *= (ATR - 1) as f64;
                s.atr += range;
                s.atr /= ATR as f64;
            }
            if j >= ATR {
                out.atr14 = Some(s.atr);
            }
        }

        s.prev_close = x;
        s.n = (self.n + 1).min(WARM + 1);
        (s, out)
    }
}

/// One step of TA_INT_EMA over values from index `from` on: a running sum for the
/// seed, divided at the seed's last index, then `((x - prev) * k) + prev`.
fn ema_step(prev: f64, x: f64, j: usize, from: usize, period: usize) -> f64 {
    let seed_end = from + period - 1;
    if j < from {
        prev
    } else if j < seed_end {
        prev + x
    } else if j == seed_end {
        (prev + x) / period as f64
    } else {
        ((x - prev) * k(period)) + prev
    }
}

/// The indicators of a whole series, bar after bar (what the fixtures compare).
pub fn series(bars: &[Hlc]) -> Vec<Indicators> {
    let mut state = State::default();
    let mut out = Vec::with_capacity(bars.len());
    for (i, bar) in bars.iter().enumerate() {
        let (next, values) = state.step(&bars[..i], *bar);
        state = next;
        out.push(values);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(n: usize, close: f64) -> Vec<Hlc> {
        vec![
            Hlc {
                high: close,
                low: close,
                close
            };
            n
        ]
    }

    #[test]
    fn no_value_before_talib_gives_one() {
        let out = series(&flat(40, 1.5));
        assert!(out[18].sma20.is_none() && out[19].sma20.is_some());
        assert!(out[13].rsi14.is_none() && out[14].rsi14.is_some());
        assert!(out[13].atr14.is_none() && out[14].atr14.is_some());
        assert!(out[32].macd.is_none() && out[33].macd.is_some());
        // A flat series: no change, so RSI is TA-Lib's 0 and the bands collapse.
        assert_eq!(out[39].rsi14, Some(0.0));
        assert_eq!(out[39].bb_upper, out[39].bb_lower);
    }

    #[test]
    fn the_state_past_warm_up_forgets_the_position() {
        let bars: Vec<Hlc> = (0..80)
            .map(|i| {
                let c = 1.0 + (i as f64 * 0.37).sin() * 0.01;
                Hlc {
                    high: c + 0.001,
                    low: c - 0.001,
                    close: c,
                }
            })
            .collect();
        let mut state = State::default();
        for (i, bar) in bars.iter().enumerate() {
            state = state.step(&bars[..i], *bar).0;
        }
        assert_eq!(state.n, WARM + 1);
    }
}
