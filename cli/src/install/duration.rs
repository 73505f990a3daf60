//! The check of the Go-style durations that `--option FreezeAfter=…`, `ScaledownAfter` and
//! `InitialDelay` take, so that a value the shim would refuse at every container create is
//! refused at install instead.
//!
//! The shim parses these values with the runtime crate's parser
//! (`runc_architect_runtime::hibernate::policy::duration`, Go's `time.ParseDuration`
//! exactly, never negative). The CLI cannot depend on the runtime crate, which pulls in
//! libcontainer and libseccomp, so this module checks the same grammar and range on its
//! own, without computing the value the way Go rounds fractions (it only needs to know
//! whether the value is accepted):
//!
//! ```text
//! [-+]?([0-9]*(\.[0-9]*)?[a-z]+)+      units: ns us µs μs ms s m h
//! ```
//!
//! - `0` alone (optionally signed) needs no unit; any other number needs one;
//! - each component has at least one digit before or after its point (`.5s`, `5.s`);
//! - the total is at most `2562047h47m16.854775807s` (Go's int64 nanoseconds);
//! - a negative duration is refused; `-0` and `-0s` are zero, as in Go.
//!
//! The integration tests run both parsers over the same inputs, so the two cannot drift
//! apart unnoticed.

/// Why a duration was refused (shown after the option and its value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty")]
    Empty,
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

/// Nanoseconds per unit.
fn unit(name: &str) -> Option<u128> {
    Some(match name {
        "ns" => 1,
        // U+00B5 MICRO SIGN and U+03BC GREEK SMALL LETTER MU, both accepted by Go.
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// `1 << 63`: Go's bound on a duration's magnitude before its sign is applied (only
/// `-9223372036854775808ns` reaches it).
const LIMIT: u128 = 1 << 63;

/// Checks that `s` is a Go duration that is not negative. The steps, and so the reason
/// given for a refused value, follow Go's parser.
pub fn check_non_negative(s: &str) -> Result<(), DurationError> {
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let (negative, mut rest) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(());
    }
    if rest.is_empty() {
        return Err(DurationError::Malformed);
    }
    let digits_len = |t: &str| t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    // Whole nanoseconds plus, per component, its fraction truncated to whole nanoseconds:
    // at most a nanosecond per component short of what Go computes, which only matters
    // within a few nanoseconds of the limit.
    let mut total: u128 = 0;
    while !rest.is_empty() {
        if !rest.starts_with(|c: char| c == '.' || c.is_ascii_digit()) {
            return Err(DurationError::Malformed);
        }
        let (whole, tail) = rest.split_at(digits_len(rest));
        rest = tail;
        // Leading zeros parse; more significant digits than a u128 holds are out of range.
        let whole_value: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| DurationError::Overflow)?
        };
        if whole_value > LIMIT {
            return Err(DurationError::Overflow);
        }
        let mut fraction = "";
        if let Some(tail) = rest.strip_prefix('.') {
            (fraction, rest) = tail.split_at(digits_len(tail));
        }
        if whole.is_empty() && fraction.is_empty() {
            return Err(DurationError::Malformed);
        }
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        if unit_len == 0 {
            return Err(DurationError::MissingUnit);
        }
        let (name, tail) = rest.split_at(unit_len);
        rest = tail;
        let per_unit = unit(name).ok_or_else(|| DurationError::UnknownUnit(name.to_string()))?;
        if whole_value > LIMIT / per_unit {
            return Err(DurationError::Overflow);
        }
        let mut value = whole_value * per_unit;
        if !fraction.is_empty() {
            // 24 digits are beyond a nanosecond of an hour; the rest adds nothing.
            let kept = &fraction[..fraction.len().min(24)];
            let numerator: u128 = kept.parse().map_err(|_| DurationError::Overflow)?;
            value += numerator * per_unit / 10u128.pow(kept.len() as u32);
            if value > LIMIT {
                return Err(DurationError::Overflow);
            }
        }
        total += value;
        if total > LIMIT {
            return Err(DurationError::Overflow);
        }
    }
    match (negative, total) {
        (true, 0) => Ok(()),
        (true, _) => Err(DurationError::Negative),
        (false, t) if t >= LIMIT => Err(DurationError::Overflow),
        (false, _) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_go_durations() {
        for s in [
            "0",
            "-0",
            "+0",
            "0s",
            "-0s",
            "500ms",
            "2s",
            "60s",
            "1m30s",
            "1.5h",
            ".5s",
            "5.s",
            "2h45m",
            "10.5s4m",
            "1h2m3s4ms5us6ns",
            "12\u{b5}s",
            "12\u{3bc}s",
            "9223372036854775807ns",
            "2562047h47m16.854775807s",
            "0.3333333333333333333h",
        ] {
            assert_eq!(check_non_negative(s), Ok(()), "{s:?}");
        }
    }

    #[test]
    fn refuses_with_the_reason() {
        use DurationError::*;
        for (s, want) in [
            ("", Empty),
            ("3", MissingUnit),
            ("1.5", MissingUnit),
            ("1h30", MissingUnit),
            ("1..5s", MissingUnit),
            ("-", Malformed),
            ("s", Malformed),
            (".s", Malformed),
            ("--1s", Malformed),
            (" 1s", Malformed),
            ("1 s", UnknownUnit(" s".into())),
            ("2x", UnknownUnit("x".into())),
            ("1d", UnknownUnit("d".into())),
            ("1S", UnknownUnit("S".into())),
            ("1e3s", UnknownUnit("e".into())),
            ("-1ns", Negative),
            ("-2s", Negative),
            ("9223372036854775808ns", Overflow),
            ("3000000h", Overflow),
            ("99999999999999999999999999999999999999999s", Overflow),
        ] {
            assert_eq!(check_non_negative(s), Err(want), "{s:?}");
        }
    }
}
