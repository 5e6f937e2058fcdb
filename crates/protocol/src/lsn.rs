//! Write-ahead log positions.
//!
//! Our own type rather than the transport's, so that nothing outside
//! `source/` depends on the replication client crate.

use std::fmt;
use std::str::FromStr;

/// A position in PostgreSQL's write-ahead log (`pg_lsn`), printed as `X/Y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid / "from the slot's position" LSN `0/0`.
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// A string that is not `X/Y` with hexadecimal halves.
#[derive(Debug, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers like 0/16B3748")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let lsn: Lsn = "1A/16B3748".parse().expect("valid");
        assert_eq!(lsn.0, (0x1A << 32) | 0x16B3748);
        assert_eq!(lsn.to_string(), "1A/16B3748");
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in ["", "0", "0/", "/1", "G/1", "0/1/2", "100000000/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad} should not parse");
        }
    }
}
