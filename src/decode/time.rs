//! PostgreSQL timestamps (microseconds since 2000-01-01 UTC) as RFC 3339.

/// Seconds from 1970-01-01 to 2000-01-01.
const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

/// A PostgreSQL timestamp as Unix seconds.
pub fn pg_micros_to_unix_seconds(micros: i64) -> f64 {
    micros as f64 / 1e6 + PG_EPOCH_UNIX_SECONDS as f64
}

/// Formats a PostgreSQL timestamp as `2026-11-26T07:00:00.123456Z`.
pub fn pg_micros_to_rfc3339(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000) + PG_EPOCH_UNIX_SECONDS;
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(pg_micros_to_rfc3339(0), "2000-01-01T00:00:00.000000Z");
        // 2026-11-26T07:00:00.123456Z
        let unix = 1_795_676_400_i64;
        let micros = (unix - PG_EPOCH_UNIX_SECONDS) * 1_000_000 + 123_456;
        assert_eq!(pg_micros_to_rfc3339(micros), "2026-11-26T07:00:00.123456Z");
        assert_eq!(pg_micros_to_rfc3339(-1), "1999-12-31T23:59:59.999999Z");
        // leap day
        let leap = (951_782_400 - PG_EPOCH_UNIX_SECONDS) * 1_000_000;
        assert_eq!(pg_micros_to_rfc3339(leap), "2000-02-29T00:00:00.000000Z");
    }
}
