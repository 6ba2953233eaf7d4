//! Time formats, in one place: RFC 3339 text for people and logs (`2025-01-31T23:59:59.123Z`),
//! Unix milliseconds and whole seconds in state files, seconds as a float for metrics, and
//! short durations for people (`1h30m`). Each comes with the serde helpers the files use.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// RFC 3339 UTC text with milliseconds, `2025-01-31T23:59:59.123Z` (times before 1970 are shown
/// as the epoch).
pub fn rfc3339_millis(time: SystemTime) -> String {
    rfc3339::format(time)
}

/// RFC 3339 UTC text to the second, `2025-01-31T23:59:59Z`.
pub fn rfc3339_seconds(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time.max(UNIX_EPOCH)).to_string()
}

/// Seconds since the Unix epoch, as Prometheus timestamps are (0 before the epoch).
pub fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The time `secs` whole seconds after the Unix epoch.
pub fn from_unix_seconds(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Whole seconds since the Unix epoch (0 before it).
pub fn to_unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A duration for people: the two largest units, as in `24h`, `1h30m`, `10m`, `45s`, `3d2h`
/// (days from 48 hours on).
pub struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        let units: [(u64, &str); 4] = if secs >= 48 * 3600 {
            [(secs / 86_400, "d"), (secs % 86_400 / 3600, "h"), (0, ""), (0, "")]
        } else {
            [(secs / 3600, "h"), (secs % 3600 / 60, "m"), (secs % 60, "s"), (0, "")]
        };
        let Some(first) = units.iter().position(|&(n, _)| n > 0) else { return f.write_str("0s") };
        for &(n, unit) in units.iter().skip(first).take(2) {
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

/// Serde: durations as whole seconds.
pub mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    /// Deserializes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// Serde: times as milliseconds since the Unix epoch.
pub mod unix_ms {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes.
    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        s.serialize_u64(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// Deserializes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        u64::deserialize(d).map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }
}

/// Times as RFC 3339 UTC text with milliseconds, `2025-01-31T23:59:59.123Z` (and serde).
pub mod rfc3339 {
    use std::time::{SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    /// Formats a time, to the millisecond (times before 1970 are shown as the epoch).
    pub fn format(time: SystemTime) -> String {
        humantime::format_rfc3339_millis(time.max(UNIX_EPOCH)).to_string()
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.fraction]` in UTC (`Z` or `+00:00`).
    pub fn parse(text: &str) -> Option<SystemTime> {
        let utc = text.strip_suffix("+00:00").map(|t| format!("{t}Z"));
        humantime::parse_rfc3339_weak(utc.as_deref().unwrap_or(text)).ok()
    }

    /// Serializes.
    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t))
    }

    /// Deserializes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 UTC time: `{text}`")))
    }
}

/// Serde: optional times as RFC 3339 UTC text.
pub mod rfc3339_option {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes.
    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&super::rfc3339::format(*t)),
            None => s.serialize_none(),
        }
    }

    /// Deserializes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => super::rfc3339::parse(&text)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 UTC time: `{text}`"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        let h = |secs| Human(Duration::from_secs(secs)).to_string();
        assert_eq!(h(0), "0s");
        assert_eq!(h(45), "45s");
        assert_eq!(h(90), "1m30s");
        assert_eq!(h(600), "10m");
        assert_eq!(h(3600), "1h");
        assert_eq!(h(3600 + 30), "1h");
        assert_eq!(h(5400), "1h30m");
        assert_eq!(h(86_400), "24h");
        assert_eq!(h(7 * 86_400 + 3600), "7d1h");
        assert_eq!(Human(Duration::from_millis(999)).to_string(), "0s");
    }

    #[test]
    fn rfc3339_round_trips() {
        assert_eq!(rfc3339::format(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339::format(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339::format(UNIX_EPOCH + Duration::from_secs(4_107_542_399)), "2100-02-28T23:59:59.000Z");
        assert_eq!(rfc3339::parse("2000-02-29T00:00:00Z"), Some(UNIX_EPOCH + Duration::from_secs(951_782_400)));
        assert_eq!(rfc3339::parse("1970-01-01T00:00:00.5+00:00"), Some(UNIX_EPOCH + Duration::from_millis(500)));
        for secs in (0..5_000_000_000u64).step_by(123_456_789) {
            let t = UNIX_EPOCH + Duration::from_millis(secs * 1000 + secs % 1000);
            assert_eq!(rfc3339::parse(&rfc3339::format(t)), Some(t), "{secs}");
        }
        for bad in ["", "2020-01-01", "2020-13-01T00:00:00Z", "2020-01-01T24:00:00Z", "2020-01-01T00:00:00+02:00", "x"]
        {
            assert_eq!(rfc3339::parse(bad), None, "{bad}");
        }
    }
}
