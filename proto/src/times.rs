//! Times and durations of the API: `google.protobuf.Timestamp` and `Duration`
//! (`prost_types`), and how the JSON of every message spells them (the protobuf JSON
//! mapping: a Timestamp is RFC 3339 in UTC, `"2026-12-07T04:27:22.120Z"`; a Duration is
//! seconds with an `s`, `"1.500s"`). prost_types has no serde, so `build.rs` sets
//! [`serialize_timestamp`] / [`serialize_duration`] on each such field.
//!
//! The conversions never panic on values from the network: a Timestamp before 1970 or
//! a negative Duration is refused or read as zero, a huge one saturates.

pub use prost_types::{Duration, Timestamp};

/// Seconds of the largest Duration the protobuf spec allows (10 000 years).
const DURATION_SECONDS_MAX: i64 = 315_576_000_000;
/// Seconds of 9999-12-31T23:59:59Z, the last instant RFC 3339 can spell.
const TIMESTAMP_SECONDS_MAX: i64 = 253_402_300_799;
/// Seconds of 0001-01-01T00:00:00Z.
const TIMESTAMP_SECONDS_MIN: i64 = -62_135_596_800;

/// The Timestamp `ms` milliseconds after the Unix epoch; `None` for 0, which the
/// crate's records use for "not set".
pub fn timestamp_from_unix_ms(ms: u64) -> Option<Timestamp> {
    (ms != 0).then(|| Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

/// The Timestamp `us` microseconds after the Unix epoch; `None` for 0.
pub fn timestamp_from_unix_us(us: u64) -> Option<Timestamp> {
    (us != 0).then(|| Timestamp {
        seconds: i64::try_from(us / 1_000_000).unwrap_or(i64::MAX),
        nanos: ((us % 1_000_000) * 1000) as i32,
    })
}

/// Milliseconds since the Unix epoch of `t`: 0 when absent or before the epoch,
/// saturating.
pub fn unix_ms(t: Option<&Timestamp>) -> u64 {
    let Some(t) = t else { return 0 };
    let t = t.normalized();
    if t.seconds < 0 {
        return 0;
    }
    (t.seconds as u64)
        .saturating_mul(1000)
        .saturating_add((t.nanos / 1_000_000) as u64)
}

/// Microseconds since the Unix epoch of `t`, as [`unix_ms`].
pub fn unix_us(t: Option<&Timestamp>) -> u64 {
    let Some(t) = t else { return 0 };
    let t = t.normalized();
    if t.seconds < 0 {
        return 0;
    }
    (t.seconds as u64)
        .saturating_mul(1_000_000)
        .saturating_add((t.nanos / 1000) as u64)
}

/// The Duration of `ms` milliseconds.
pub fn duration_from_ms(ms: u64) -> Duration {
    Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// The Duration of `us` microseconds.
pub fn duration_from_us(us: u64) -> Duration {
    Duration {
        seconds: i64::try_from(us / 1_000_000).unwrap_or(i64::MAX),
        nanos: ((us % 1_000_000) * 1000) as i32,
    }
}

/// Why a Duration from a request cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0} is negative")]
    Negative(String),
    #[error("{0} is out of range")]
    OutOfRange(String),
}

/// The whole milliseconds of `d` (sub-millisecond parts are dropped): an error for a
/// negative Duration or one beyond the protobuf range.
pub fn duration_ms(d: &Duration) -> Result<u64, DurationError> {
    let n = d.normalized();
    if n.seconds.unsigned_abs() > DURATION_SECONDS_MAX as u64 {
        return Err(DurationError::OutOfRange(duration_string(d)));
    }
    if n.seconds < 0 || n.nanos < 0 {
        return Err(DurationError::Negative(duration_string(d)));
    }
    Ok((n.seconds as u64) * 1000 + (n.nanos / 1_000_000) as u64)
}

/// The whole microseconds of `d`, as [`duration_ms`].
pub fn duration_us(d: &Duration) -> Result<u64, DurationError> {
    let n = d.normalized();
    if n.seconds.unsigned_abs() > DURATION_SECONDS_MAX as u64 {
        return Err(DurationError::OutOfRange(duration_string(d)));
    }
    if n.seconds < 0 || n.nanos < 0 {
        return Err(DurationError::Negative(duration_string(d)));
    }
    Ok((n.seconds as u64) * 1_000_000 + (n.nanos / 1000) as u64)
}

/// `t` in RFC 3339 (UTC, `Z`, with milli-, micro- or nanoseconds only when it has
/// them); a Timestamp outside years 1..=9999 is spelled as its seconds, never a panic.
pub fn rfc3339(t: &Timestamp) -> String {
    let n = t.normalized();
    if (TIMESTAMP_SECONDS_MIN..=TIMESTAMP_SECONDS_MAX).contains(&n.seconds) {
        n.to_string()
    } else {
        format!("{}s", n.seconds)
    }
}

/// `d` as the protobuf JSON mapping spells it: `"1.500s"`, `"0s"`, `"-2s"`.
pub fn duration_string(d: &Duration) -> String {
    let n = d.normalized();
    if n.seconds.unsigned_abs() > DURATION_SECONDS_MAX as u64 {
        return format!("{}s", n.seconds);
    }
    n.to_string()
}

/// serde `serialize_with` for a Timestamp field: RFC 3339, or null when absent.
pub fn serialize_timestamp<S: serde::Serializer>(
    v: &Option<Timestamp>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(t) => s.serialize_str(&rfc3339(t)),
        None => s.serialize_none(),
    }
}

/// serde `serialize_with` for a repeated Timestamp field: a list of RFC 3339 strings.
pub fn serialize_timestamps<S: serde::Serializer>(
    v: &[Timestamp],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(rfc3339))
}

/// serde `serialize_with` for a Duration field: `"1.500s"`, or null when absent.
pub fn serialize_duration<S: serde::Serializer>(
    v: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(d) => s.serialize_str(&duration_string(d)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_through_unix_ms_and_print_as_rfc3339() {
        let t = timestamp_from_unix_ms(1_765_081_642_120).expect("set");
        assert_eq!(rfc3339(&t), "2025-12-07T04:27:22.120Z");
        assert_eq!(unix_ms(Some(&t)), 1_765_081_642_120);
        assert_eq!(timestamp_from_unix_ms(0), None);
        assert_eq!(unix_ms(None), 0);
        let us = timestamp_from_unix_us(1_000_001).expect("set");
        assert_eq!(rfc3339(&us), "1970-01-01T00:00:01.000001Z");
        assert_eq!(unix_us(Some(&us)), 1_000_001);
        // Before the epoch, or absurd: no panic.
        let before = Timestamp {
            seconds: -5,
            nanos: 0,
        };
        assert_eq!(unix_ms(Some(&before)), 0);
        for t in [
            Timestamp {
                seconds: i64::MAX,
                nanos: i32::MAX,
            },
            Timestamp {
                seconds: i64::MIN,
                nanos: i32::MIN,
            },
        ] {
            let _ = rfc3339(&t);
            let _ = unix_ms(Some(&t));
        }
    }

    #[test]
    fn durations_print_as_protobuf_json_and_refuse_negative_or_huge_values() {
        assert_eq!(duration_string(&duration_from_ms(1500)), "1.500s");
        assert_eq!(duration_string(&duration_from_ms(0)), "0s");
        assert_eq!(duration_string(&duration_from_us(250)), "0.000250s");
        assert_eq!(duration_ms(&duration_from_ms(50)), Ok(50));
        assert_eq!(duration_us(&duration_from_us(1_234_567)), Ok(1_234_567));
        let neg = Duration {
            seconds: -1,
            nanos: 0,
        };
        assert!(matches!(duration_ms(&neg), Err(DurationError::Negative(_))));
        for d in [
            Duration {
                seconds: i64::MAX,
                nanos: i32::MAX,
            },
            Duration {
                seconds: i64::MIN,
                nanos: i32::MIN,
            },
        ] {
            assert!(duration_ms(&d).is_err());
            assert!(duration_us(&d).is_err());
            let _ = duration_string(&d);
        }
    }

    #[test]
    fn message_json_carries_rfc3339_times_and_duration_strings() {
        let info = crate::vms::VmInfo {
            created_at: timestamp_from_unix_ms(1_000),
            ..Default::default()
        };
        let json = serde_json::to_value(&info).unwrap_or_default();
        assert_eq!(json["created_at"], "1970-01-01T00:00:01Z", "{json}");
        assert!(json["updated_at"].is_null(), "{json}");
        let m = crate::migrations::MigrationInfo {
            max_downtime: Some(duration_from_ms(50)),
            ..Default::default()
        };
        let json = serde_json::to_value(&m).unwrap_or_default();
        assert_eq!(json["max_downtime"], "0.050s", "{json}");
    }

    /// The previous version's layout of a few fields (integers at the numbers now
    /// reserved).
    #[derive(Clone, PartialEq, prost::Message)]
    struct OldVmInfo {
        #[prost(uint64, tag = "1")]
        id: u64,
        #[prost(uint64, tag = "9")]
        created_unix_ms: u64,
    }

    #[test]
    fn the_previous_layout_and_this_one_decode_each_other_without_error() {
        use prost::Message;
        let old = OldVmInfo {
            id: 7,
            created_unix_ms: 1_000,
        };
        let new = crate::vms::VmInfo::decode(old.encode_to_vec().as_slice());
        assert!(
            matches!(&new, Ok(v) if v.id == 7 && v.created_at.is_none()),
            "{new:?}"
        );
        let new = crate::vms::VmInfo {
            id: 8,
            created_at: timestamp_from_unix_ms(2_000),
            ..Default::default()
        };
        let old = OldVmInfo::decode(new.encode_to_vec().as_slice());
        assert!(
            matches!(&old, Ok(o) if o.id == 8 && o.created_unix_ms == 0),
            "{old:?}"
        );
    }
}
