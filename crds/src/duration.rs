//! `Duration`: a span of time written the way Kubernetes and Flink users write one
//! (`500ms`, `10s`, `1m30s`, `2h`, `7d`), with a schema pattern so that the apiserver rejects
//! a malformed value and names the field.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern every duration must match: one or more `<integer><unit>` parts, units `ms`,
/// `s`, `m`, `h`, `d`.
pub const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h|d))+$";

/// A non-negative span of time, written as `<integer><unit>` parts (`ms`, `s`, `m`, `h`, `d`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }
    pub const fn as_std(&self) -> std::time::Duration {
        self.0
    }
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
    /// In milliseconds, as event times count them (saturating far beyond any real span).
    pub fn as_millis_i64(&self) -> i64 {
        self.0.as_millis().min(i64::MAX as u128) as i64
    }
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {reason}; write it as number-unit parts such as 500ms, 10s, 1m30s, 2h or 7d"
)]
pub struct ParseDurationError {
    pub input: String,
    pub reason: &'static str,
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseDurationError { input: s.to_string(), reason };
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        let mut total_ms: u64 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(err("a number must come before each unit"));
            }
            let value: u64 = rest[..digits].parse().map_err(|_| err("a number is too large"))?;
            rest = &rest[digits..];
            let (unit_ms, unit_len) = if rest.starts_with("ms") {
                (1, 2)
            } else if rest.starts_with('s') {
                (1_000, 1)
            } else if rest.starts_with('m') {
                (60_000, 1)
            } else if rest.starts_with('h') {
                (3_600_000, 1)
            } else if rest.starts_with('d') {
                (86_400_000, 1)
            } else {
                return Err(err("each number needs a unit: ms, s, m, h or d"));
            };
            rest = &rest[unit_len..];
            total_ms = value
                .checked_mul(unit_ms)
                .and_then(|v| total_ms.checked_add(v))
                .ok_or_else(|| err("it is too large"))?;
        }
        Ok(Self::from_millis(total_ms))
    }
}

impl fmt::Display for Duration {
    /// The shortest form that parses back to the same value: `0s`, `250ms`, `1m30s`, `2h`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        if ms > 0 {
            write!(f, "{ms}ms")?;
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": crate::rules::MAX_DURATION_LENGTH,
        })
    }
    fn inline_schema() -> bool {
        true
    }
}

/// A signed span of time, as an interval join's bounds are (`-5s`, `0s`, `2m`): a
/// [`Duration`], or one with `-` before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub i64);

impl Offset {
    /// In milliseconds.
    pub fn millis(self) -> i64 {
        self.0
    }
}

impl FromStr for Offset {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (negative, rest) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let d: Duration = rest.parse().map_err(|e: ParseDurationError| ParseDurationError {
            input: s.to_string(),
            reason: e.reason,
        })?;
        let ms = d.as_millis_i64();
        Ok(Offset(if negative { -ms } else { ms }))
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 0 {
            f.write_str("-")?;
        }
        write!(f, "{}", Duration::from_millis(self.0.unsigned_abs()))
    }
}

impl Serialize for Offset {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Offset {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Offset {
    fn schema_name() -> Cow<'static, str> {
        "Offset".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^-?([0-9]+(ms|s|m|h|d))+$",
            "maxLength": crate::rules::MAX_DURATION_LENGTH + 1,
        })
    }
    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_signed_durations() {
        assert_eq!("-5s".parse::<Offset>().unwrap(), Offset(-5000));
        assert_eq!("1m30s".parse::<Offset>().unwrap(), Offset(90_000));
        assert_eq!(Offset(-1500).to_string(), "-1s500ms");
        assert_eq!(Offset(0).to_string(), "0s");
        let e = "--5s".parse::<Offset>().unwrap_err();
        assert_eq!(e.input, "--5s");
        assert!("5".parse::<Offset>().is_err());
    }

    #[test]
    fn parses_and_prints_canonical_forms() {
        for (input, ms, canonical) in [
            ("0s", 0, "0s"),
            ("500ms", 500, "500ms"),
            ("10s", 10_000, "10s"),
            ("90s", 90_000, "1m30s"),
            ("1m30s", 90_000, "1m30s"),
            ("2h", 7_200_000, "2h"),
            ("1d2h3m4s5ms", 93_784_005, "1d2h3m4s5ms"),
        ] {
            let d: Duration = input.parse().unwrap();
            assert_eq!(d.0.as_millis(), ms, "{input}");
            assert_eq!(d.to_string(), canonical, "{input}");
            assert_eq!(canonical.parse::<Duration>().unwrap(), d);
        }
    }

    #[test]
    fn rejects_malformed_values_with_a_reason() {
        for bad in ["", "10", "s", "1.5s", "10 s", "-1s", "10sec", "1y", "99999999999999999999s"] {
            let err = bad.parse::<Duration>().unwrap_err();
            assert_eq!(err.input, bad);
            assert!(err.to_string().contains("write it as"), "{err}");
        }
    }
}
