//! Durations written the way operators write them: `500ms`, `30s`, `5m`,
//! `1h`, `1d`. Parsed once at config load into [`std::time::Duration`].

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// A duration parsed from `<number><unit>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// Parses `text`; the error says what is accepted.
    pub fn parse(text: &str) -> Result<HumanDuration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let bad = || {
            format!("{text:?} is not a duration like \"500ms\", \"30s\", \"5m\", \"1h\" or \"1d\"")
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        let millis = match unit.trim() {
            "ms" => Some(n),
            "s" => n.checked_mul(1000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            "d" => n.checked_mul(86_400_000),
            _ => return Err(bad()),
        }
        .ok_or_else(bad)?;
        Ok(HumanDuration(Duration::from_millis(millis)))
    }
}

impl fmt::Display for HumanDuration {
    /// The largest unit that divides the duration exactly, so that what is
    /// printed parses back to the same value: 1500 ms is `1500ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let (n, unit) = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1000, "s"),
        ]
        .into_iter()
        .find(|(size, _)| ms > 0 && ms.is_multiple_of(*size))
        .map_or((ms, "ms"), |(size, unit)| (ms / size, unit));
        write!(f, "{n}{unit}")
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        HumanDuration::parse(&text).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        for (text, ms) in [
            ("500ms", 500),
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("2d", 172_800_000),
            ("0s", 0),
        ] {
            assert_eq!(
                HumanDuration::parse(text),
                Ok(HumanDuration(Duration::from_millis(ms))),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_garbage() {
        for text in [
            "",
            "s",
            "10",
            "10x",
            "-1s",
            "1.5s",
            "99999999999999999999d",
            "18446744073709551615d",
        ] {
            assert!(HumanDuration::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn displays_what_it_parses() {
        for (ms, text) in [
            (1500, "1500ms"),
            (0, "0ms"),
            (30_000, "30s"),
            (90_000, "90s"),
            (300_000, "5m"),
            (3_600_000, "1h"),
            (172_800_000, "2d"),
        ] {
            let d = HumanDuration(Duration::from_millis(ms));
            assert_eq!(d.to_string(), text);
            assert_eq!(HumanDuration::parse(text), Ok(d));
        }
    }
}
