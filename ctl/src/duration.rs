//! Duration flags: humantime strings (`50ms`, `5s`, `2m`, `1h30m`), or a bare number in the
//! flag's old unit so command lines written before humantime keep working
//! (`--max-downtime 100` is 100 ms, `--deadline 60` is 60 s).

use std::time::Duration;

/// Longest duration any flag takes (far beyond every server maximum; keeps the
/// arithmetic in range).
const DURATION_MAX: Duration = Duration::from_secs(10 * 365 * 86_400);

/// `s` as a duration; a bare (possibly fractional) number counts in `unit`.
fn parse(s: &str, unit: Duration, unit_name: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = if let Ok(n) = t.parse::<f64>() {
        if !(n.is_finite() && n >= 0.0) {
            return Err(format!(
                "{t:?} is not a duration (negative or not a number)"
            ));
        }
        let secs = n * unit.as_secs_f64();
        if secs > DURATION_MAX.as_secs_f64() {
            return Err(format!("{t:?} {unit_name} is longer than ten years"));
        }
        Duration::from_secs_f64(secs)
    } else {
        humantime::parse_duration(t).map_err(|e| {
            format!(
                "{t:?} is not a duration such as 50ms, 5s, 2m or 1h30m ({e}); a bare number \
                 counts in {unit_name}"
            )
        })?
    };
    if d > DURATION_MAX {
        return Err(format!("{t:?} is longer than ten years"));
    }
    Ok(d)
}

/// A duration flag whose bare numbers are milliseconds (`--max-downtime`).
pub fn bare_ms(s: &str) -> Result<Duration, String> {
    parse(s, Duration::from_millis(1), "milliseconds")
}

/// A duration flag whose bare numbers are seconds (`--deadline`, `--interval`, `--ttl`).
pub fn bare_s(s: &str) -> Result<Duration, String> {
    parse(s, Duration::from_secs(1), "seconds")
}

/// Whole milliseconds of `d` (saturating).
pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `d` as the API's `google.protobuf.Duration` (flags are at most ten years: in range).
pub fn pb(d: Duration) -> cluster_proto::prost_types::Duration {
    cluster_proto::prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humantime_and_the_old_bare_units_both_parse() {
        assert_eq!(bare_ms("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(bare_ms("100"), Ok(Duration::from_millis(100)));
        assert_eq!(bare_ms("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(bare_s("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(bare_s("60"), Ok(Duration::from_secs(60)));
        assert_eq!(bare_s("0.01"), Ok(Duration::from_millis(10)));
        assert_eq!(bare_s("1h 30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(ms(Duration::from_secs(2)), 2_000);
        let d = pb(bare_ms("50ms").unwrap_or_default());
        assert_eq!((d.seconds, d.nanos), (0, 50_000_000));
        assert_eq!(cluster_proto::times::duration_string(&d), "0.050s");
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        let e = bare_s("soon").unwrap_err();
        assert!(e.contains("\"soon\" is not a duration such as 50ms"), "{e}");
        assert!(e.contains("a bare number counts in seconds"), "{e}");
        assert!(bare_ms("-5").unwrap_err().contains("negative"));
        assert!(bare_s("5 parsecs").is_err());
        assert!(bare_s("1e300").unwrap_err().contains("ten years"));
        assert!(bare_s("100000d").unwrap_err().contains("ten years"));
    }
}
