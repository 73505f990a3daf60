//! Go-style durations (`300ms`, `1.5h`, `2h45m`), accepted exactly as Go's
//! `time.ParseDuration` accepts them.
//!
//! Kubernetes users write durations the way every other Kubernetes setting spells them,
//! which is Go's format. No crate matches it exactly: `humantime` accepts spaces, `days`,
//! `min` and friends and refuses fractions such as `1.5h`; the small Go ports on crates.io
//! are unmaintained. So this is a short parser of our own that follows Go's grammar and
//! arithmetic step by step:
//!
//! ```text
//! [-+]?([0-9]*(\.[0-9]*)?[a-z]+)+      units: ns us µs (U+00B5) μs (U+03BC) ms s m h
//! ```
//!
//! - `0` alone (optionally signed) needs no unit; any other number needs one;
//! - each component is `integer[.fraction]unit`, with at least one digit on either side of
//!   the point (`5.s` and `.5s` are fine, `.s` is not);
//! - a fraction is scaled with `f64` arithmetic exactly as Go does it (Go needs that for
//!   nanosecond accuracy in fractions of hours, and the rounding must be the same to give
//!   the same value), digits beyond what a `u64` holds are ignored;
//! - the total must fit Go's `int64` nanoseconds (`-9223372036854775808ns` is the most
//!   negative value accepted, `9223372036854775807ns` the largest).
//!
//! [`parse`] returns Go's signed value; [`parse_non_negative`] is what settings use: it
//! refuses a negative duration and returns a [`Duration`].

use std::time::Duration;

/// Why a duration was refused; shown after the value (`invalid duration "2x": unknown
/// unit "x"`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty")]
    Empty,
    /// Go's generic refusal: a sign alone, a unit without a number, a stray character.
    #[error("expected a number followed by a unit (ns, us, ms, s, m, h)")]
    Malformed,
    #[error("missing unit (ns, us, ms, s, m, h)")]
    MissingUnit,
    #[error("unknown unit {0:?}")]
    UnknownUnit(String),
    #[error("out of range (at most 2562047h47m16.854775807s)")]
    Overflow,
    #[error("negative")]
    Negative,
}

const NANOSECOND: u64 = 1;
const MICROSECOND: u64 = 1_000 * NANOSECOND;
const MILLISECOND: u64 = 1_000 * MICROSECOND;
const SECOND: u64 = 1_000 * MILLISECOND;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;

/// `1 << 63`: the magnitude of Go's most negative duration; every bound below is relative
/// to it, as in Go.
const LIMIT: u64 = 1 << 63;

fn unit(name: &str) -> Option<u64> {
    Some(match name {
        "ns" => NANOSECOND,
        // U+00B5 MICRO SIGN and U+03BC GREEK SMALL LETTER MU, both accepted by Go.
        "us" | "\u{b5}s" | "\u{3bc}s" => MICROSECOND,
        "ms" => MILLISECOND,
        "s" => SECOND,
        "m" => MINUTE,
        "h" => HOUR,
        _ => return None,
    })
}

/// Parses `s` as Go's `time.ParseDuration` does, into signed nanoseconds.
pub fn parse(s: &str) -> Result<i64, DurationError> {
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut rest = s.as_bytes();
    let mut negative = false;
    if let [sign @ (b'-' | b'+'), tail @ ..] = rest {
        negative = *sign == b'-';
        rest = tail;
    }
    if rest == b"0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(DurationError::Malformed);
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        if !(rest[0] == b'.' || rest[0].is_ascii_digit()) {
            return Err(DurationError::Malformed);
        }
        let (whole, tail) = leading_int(rest)?;
        let had_whole = tail.len() != rest.len();
        rest = tail;
        let (mut fraction, mut scale, mut had_fraction) = (0u64, 1f64, false);
        if let [b'.', tail @ ..] = rest {
            let (f, sc, after) = leading_fraction(tail);
            had_fraction = after.len() != tail.len();
            (fraction, scale, rest) = (f, sc, after);
        }
        if !had_whole && !had_fraction {
            return Err(DurationError::Malformed);
        }
        let unit_len = rest
            .iter()
            .position(|&c| c == b'.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        if unit_len == 0 {
            return Err(DurationError::MissingUnit);
        }
        let (name, tail) = rest.split_at(unit_len);
        rest = tail;
        // The unit ends at an ASCII byte or at the end of the string, and the input is a
        // `str`, so `name` is whole UTF-8.
        let name = String::from_utf8_lossy(name);
        let per_unit = unit(&name).ok_or_else(|| DurationError::UnknownUnit(name.to_string()))?;
        if whole > LIMIT / per_unit {
            return Err(DurationError::Overflow);
        }
        let mut value = whole * per_unit;
        if fraction > 0 {
            // Go: `v += uint64(float64(f) * (float64(unit) / scale))`; the product is at most
            // one hour in nanoseconds, so the conversion back is exact truncation.
            value += (fraction as f64 * (per_unit as f64 / scale)) as u64;
            if value > LIMIT {
                return Err(DurationError::Overflow);
            }
        }
        total = total.checked_add(value).ok_or(DurationError::Overflow)?;
        if total > LIMIT {
            return Err(DurationError::Overflow);
        }
    }
    if negative {
        // `total <= 1 << 63`, so this is exact (1 << 63 becomes i64::MIN).
        return Ok((total as i64).wrapping_neg());
    }
    i64::try_from(total).map_err(|_| DurationError::Overflow)
}

/// Parses a Go duration that must not be negative (`-0` is zero, as in Go).
pub fn parse_non_negative(s: &str) -> Result<Duration, DurationError> {
    let nanos = parse(s)?;
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| DurationError::Negative)
}

/// Consumes the leading `[0-9]*`; overflow beyond `1 << 63` is an error.
fn leading_int(s: &[u8]) -> Result<(u64, &[u8]), DurationError> {
    let mut x: u64 = 0;
    let mut i = 0;
    while let Some(&c) = s.get(i) {
        if !c.is_ascii_digit() {
            break;
        }
        if x > LIMIT / 10 {
            return Err(DurationError::Overflow);
        }
        x = x * 10 + u64::from(c - b'0');
        if x > LIMIT {
            return Err(DurationError::Overflow);
        }
        i += 1;
    }
    Ok((x, &s[i..]))
}

/// Consumes the leading `[0-9]*` of a fraction: value and scale (10^digits kept); digits
/// past what fits are consumed but no longer add precision.
fn leading_fraction(s: &[u8]) -> (u64, f64, &[u8]) {
    let (mut x, mut scale, mut overflow) = (0u64, 1f64, false);
    let mut i = 0;
    while let Some(&c) = s.get(i) {
        if !c.is_ascii_digit() {
            break;
        }
        i += 1;
        if overflow {
            continue;
        }
        if x > (LIMIT - 1) / 10 {
            overflow = true;
            continue;
        }
        let y = x * 10 + u64::from(c - b'0');
        if y > LIMIT {
            overflow = true;
            continue;
        }
        x = y;
        scale *= 10.0;
    }
    (x, scale, &s[i..])
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: i64 = 1;
    const US: i64 = 1_000;
    const MS: i64 = 1_000_000;
    const S: i64 = 1_000_000_000;
    const M: i64 = 60 * S;
    const H: i64 = 60 * M;

    #[test]
    fn accepts_what_go_accepts_with_go_values() {
        let cases: &[(&str, i64)] = &[
            ("0", 0),
            ("-0", 0),
            ("+0", 0),
            ("0s", 0),
            ("0.0s", 0),
            ("5s", 5 * S),
            ("30s", 30 * S),
            ("1478s", 1478 * S),
            ("-5s", -5 * S),
            ("+5s", 5 * S),
            ("5.0s", 5 * S),
            ("5.6s", 5 * S + 600 * MS),
            ("5.s", 5 * S),
            (".5s", 500 * MS),
            ("1.004s", S + 4 * MS),
            ("1.0040s", S + 4 * MS),
            ("100.00100s", 100 * S + MS),
            ("10ns", 10 * NS),
            ("11us", 11 * US),
            ("12\u{b5}s", 12 * US),
            ("12\u{3bc}s", 12 * US),
            ("13ms", 13 * MS),
            ("300ms", 300 * MS),
            ("15m", 15 * M),
            ("16h", 16 * H),
            ("1.5h", H + 30 * M),
            ("2h45m", 2 * H + 45 * M),
            ("1m30s", 90 * S),
            ("3h30m", 3 * H + 30 * M),
            // Components in any order, repeated units, all summed.
            ("10.5s4m", 4 * M + 10 * S + 500 * MS),
            ("1s1s", 2 * S),
            ("1h65m", 2 * H + 5 * M),
            ("-2m3.4s", -(2 * M + 3 * S + 400 * MS)),
            (
                "1h2m3s4ms5us6ns",
                H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS,
            ),
            ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
            ("52763797000ns", 52_763_797_000),
            // More than 9 fraction digits; float scaling as Go does it.
            ("0.3333333333333333333h", 20 * M),
            ("0.100000000000000000000h", 6 * M),
            ("0.830103483285477580700h", 49 * M + 48 * S + 372_539_827),
            // 2^53 + 1 is not representable in f64: integers never go through floats.
            ("9007199254740993ns", (1 << 53) + 1),
            // The extremes of int64 nanoseconds.
            ("9223372036854775807ns", i64::MAX),
            ("9223372036854775.807us", i64::MAX),
            ("9223372036s854ms775us807ns", i64::MAX),
            ("2562047h47m16.854775807s", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
            ("-9223372036854775.808us", i64::MIN),
            ("-9223372036s854ms775us808ns", i64::MIN),
            ("00001s", S),
        ];
        for &(input, want) in cases {
            assert_eq!(parse(input), Ok(want), "parse({input:?})");
        }
    }

    #[test]
    fn refuses_what_go_refuses() {
        use DurationError::*;
        let cases: &[(&str, DurationError)] = &[
            ("", Empty),
            ("3", MissingUnit),
            ("300", MissingUnit),
            ("1.5", MissingUnit),
            ("1h30", MissingUnit),
            ("-", Malformed),
            ("+", Malformed),
            ("s", Malformed),
            (".", Malformed),
            ("-.", Malformed),
            (".s", Malformed),
            ("+.s", Malformed),
            ("1..5s", MissingUnit),
            ("--1s", Malformed),
            ("+-1s", Malformed),
            (" 1s", Malformed),
            ("1 s", UnknownUnit(" s".into())),
            ("1s ", UnknownUnit("s ".into())),
            ("2x", UnknownUnit("x".into())),
            ("1d", UnknownUnit("d".into())),
            ("1S", UnknownUnit("S".into())),
            ("1sec", UnknownUnit("sec".into())),
            ("1min", UnknownUnit("min".into())),
            ("1e3s", UnknownUnit("e".into())),
            ("\u{fffd}", Malformed),
            ("1\u{fffd}", UnknownUnit("\u{fffd}".into())),
            ("9223372036854775810ns", Overflow),
            ("9223372036854775808ns", Overflow),
            ("-9223372036854775809ns", Overflow),
            ("9223372036854776us", Overflow),
            ("3000000h", Overflow),
            ("9223372036854775.808us", Overflow),
            ("9223372036854ms775us808ns", Overflow),
            ("99999999999999999999999s", Overflow),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input).as_ref(), Err(want), "parse({input:?})");
        }
    }

    #[test]
    fn non_negative_refuses_negative_values_only() {
        assert_eq!(parse_non_negative("0"), Ok(Duration::ZERO));
        assert_eq!(parse_non_negative("-0"), Ok(Duration::ZERO));
        assert_eq!(parse_non_negative("-0s"), Ok(Duration::ZERO));
        assert_eq!(parse_non_negative("+2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_non_negative("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_non_negative("-1ns"), Err(DurationError::Negative));
        assert_eq!(parse_non_negative("-2s"), Err(DurationError::Negative));
        assert_eq!(
            parse_non_negative("9223372036854775807ns"),
            Ok(Duration::from_nanos(i64::MAX as u64))
        );
        assert_eq!(parse_non_negative(""), Err(DurationError::Empty));
    }

    #[test]
    fn messages_name_the_problem() {
        assert_eq!(parse("2x").unwrap_err().to_string(), "unknown unit \"x\"");
        assert_eq!(
            parse("5").unwrap_err().to_string(),
            "missing unit (ns, us, ms, s, m, h)"
        );
    }

    proptest::proptest! {
        /// Every value Go prints (`Duration.String`) parses back to itself; the printer
        /// below is Go's format (`1h2m3.000000004s`, `1.5µs`, `0s`).
        #[test]
        fn go_formatted_values_round_trip(n in proptest::num::i64::ANY) {
            let text = go_format(n);
            proptest::prop_assert_eq!(parse(&text), Ok(n), "{}", text);
        }

        /// Whatever the input, the parser answers (no panic) and a value it accepts is
        /// within int64 nanoseconds.
        #[test]
        fn never_panics(s in "[-+.0-9a-zµμ ]{0,24}") {
            let _ = parse(&s);
        }
    }

    /// Go's `time.Duration.String`, enough to produce inputs for the round trip.
    fn go_format(n: i64) -> String {
        let neg = n < 0;
        let u = n.unsigned_abs();
        let sign = if neg { "-" } else { "" };
        if u == 0 {
            return "0s".into();
        }
        let frac = |v: u64, digits: u32| -> String {
            let p = 10u64.pow(digits);
            let (w, f) = (v / p, v % p);
            if f == 0 {
                format!("{w}")
            } else {
                let s = format!("{f:0width$}", width = digits as usize);
                format!("{w}.{}", s.trim_end_matches('0'))
            }
        };
        if u < 1_000 {
            return format!("{sign}{u}ns");
        }
        if u < 1_000_000 {
            return format!("{sign}{}\u{b5}s", frac(u, 3));
        }
        if u < 1_000_000_000 {
            return format!("{sign}{}ms", frac(u, 6));
        }
        let secs_part = u % 60_000_000_000;
        let mins = u / 60_000_000_000;
        let (h, m) = (mins / 60, mins % 60);
        let mut out = sign.to_string();
        if h > 0 {
            out += &format!("{h}h");
        }
        if h > 0 || m > 0 {
            out += &format!("{m}m");
        }
        out += &format!("{}s", frac(secs_part, 9));
        out
    }
}
