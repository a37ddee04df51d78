//! Durations on the command line.
//!
//! One parser for every option that takes a time, so that a bare number means the same thing
//! everywhere (seconds, as in `sleep` and `timeout`), and every option refuses, with the reason,
//! a value that would make it run for nothing or forever.

use std::time::Duration;

/// The values an option accepts, inclusive. A `min` of zero allows zero.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// The shortest value accepted.
    pub min: Duration,
    /// The longest value accepted.
    pub max: Duration,
    /// Why a shorter value is refused (for the error message).
    pub too_short: &'static str,
    /// Why a longer value is refused.
    pub too_long: &'static str,
}

/// Parses `500ms`, `2s`, `1.5m`, `1h`, `20us`, `100ns`; a bare number is seconds. Negative,
/// non-finite and out-of-bounds values are refused with the reason.
pub fn parse_within(s: &str, bounds: Bounds) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| c.is_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let v: f64 = num.trim().parse().ok().filter(|v: &f64| v.is_finite()).ok_or_else(|| {
        format!("`{s}` is not a duration (try 20us, 500ms, 2s, 1m; a bare number is seconds)")
    })?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("unknown unit `{unit}` in `{s}` (use ns, us, ms, s, m or h)")),
    };
    let secs = v * scale;
    if secs < 0.0 {
        return Err(format!("`{s}` is negative"));
    }
    if secs < bounds.min.as_secs_f64() {
        return Err(if secs == 0.0 {
            format!("`{s}` is zero, under the {} minimum: {}", human(bounds.min), bounds.too_short)
        } else {
            format!("`{s}` is shorter than {}: {}", human(bounds.min), bounds.too_short)
        });
    }
    if secs > bounds.max.as_secs_f64() {
        return Err(format!("`{s}` is longer than {}: {}", human(bounds.max), bounds.too_long));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `1ms`, `10s`, `1h`: the bound as a user would write it.
fn human(d: Duration) -> String {
    let ns = d.as_nanos();
    for (unit, per) in [("h", 3_600_000_000_000u128), ("m", 60_000_000_000), ("s", 1_000_000_000)] {
        if ns >= per && ns % per == 0 {
            return format!("{}{unit}", ns / per);
        }
    }
    for (unit, per) in [("ms", 1_000_000u128), ("us", 1_000)] {
        if ns >= per && ns % per == 0 {
            return format!("{}{unit}", ns / per);
        }
    }
    format!("{ns}ns")
}

/// Latency the emulated device adds to every request: zero (none) up to a minute.
pub fn parse_device_latency(s: &str) -> Result<Duration, String> {
    parse_within(
        s,
        Bounds {
            min: Duration::ZERO,
            max: Duration::from_secs(60),
            too_short: "",
            too_long: "every request would wait that long",
        },
    )
}

/// How long a request may wait for the device before the device is declared failed.
pub fn parse_request_timeout(s: &str) -> Result<Duration, String> {
    parse_within(
        s,
        Bounds {
            min: Duration::from_millis(1),
            max: Duration::from_secs(3600),
            too_short: "every request would time out at once",
            too_long: "a dead device would hang its callers that long",
        },
    )
}

/// A delay before something happens: zero (at once) up to an hour.
pub fn parse_delay(s: &str) -> Result<Duration, String> {
    parse_within(
        s,
        Bounds {
            min: Duration::ZERO,
            max: Duration::from_secs(3600),
            too_short: "",
            too_long: "nothing would happen in any useful run",
        },
    )
}

/// A period between events (faults of the soak, say): at least a millisecond, at most an hour.
pub fn parse_period(s: &str) -> Result<Duration, String> {
    parse_within(
        s,
        Bounds {
            min: Duration::from_millis(1),
            max: Duration::from_secs(3600),
            too_short: "that is no period at all",
            too_long: "nothing would happen in any useful run",
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_number_is_seconds_and_units_scale() {
        assert_eq!(parse_request_timeout("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_request_timeout("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_device_latency("20us"), Ok(Duration::from_micros(20)));
        assert_eq!(parse_device_latency("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn values_that_run_for_nothing_or_forever_are_refused_with_the_reason() {
        let e = parse_request_timeout("0").unwrap_err();
        assert!(e.contains("zero") && e.contains("time out at once"), "{e}");
        let e = parse_request_timeout("10us").unwrap_err();
        assert!(e.contains("shorter than 1ms"), "{e}");
        let e = parse_device_latency("2m").unwrap_err();
        assert!(e.contains("longer than 1m"), "{e}");
        assert!(parse_period("-1s").unwrap_err().contains("negative"));
        assert!(parse_period("5parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_period("soon").unwrap_err().contains("is not a duration"));
        assert!(parse_period("inf").unwrap_err().contains("is not a duration"));
    }
}
