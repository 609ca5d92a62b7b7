//! Event time: milliseconds since the Unix epoch, and how tally reads and
//! writes times and durations (RFC 3339, `10s`, `1m`, `7d`).

use std::time::Duration;

/// Event time in milliseconds since the Unix epoch.
pub type Millis = i64;

/// The wall clock in Unix milliseconds.
pub fn now_ms() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

/// Parses an RFC 3339 time into Unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Formats Unix milliseconds as RFC 3339 in UTC, with milliseconds only when
/// they are not zero: `2026-06-07T10:00:00Z`, `2026-06-07T11:26:00.102Z`.
pub fn format_rfc3339(ms: Millis) -> String {
    let Some(t) = chrono::DateTime::from_timestamp_millis(ms) else {
        return ms.to_string();
    };
    if ms % 1000 == 0 {
        t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
    }
}

/// Parses a positive duration such as `500ms`, `10s`, `1m`, `1h` or `7d` into
/// milliseconds.
pub fn parse_millis(text: &str) -> Result<Millis, String> {
    let d = parse_duration(text)?;
    if d.is_zero() || d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!(
            "'{text}' must be a positive whole number of milliseconds"
        ));
    }
    Ok(d.as_millis() as Millis)
}

/// Parses a duration such as `500ms`, `10s`, `1m`, `1h` or `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("'{text}' is not a duration ({e})"))
}

/// Formats milliseconds in the largest unit that divides them: `10s`, `1m`.
pub fn format_millis(ms: Millis) -> String {
    const UNITS: [(Millis, &str); 5] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
        (1, "ms"),
    ];
    UNITS
        .iter()
        .find(|(unit, _)| ms % unit == 0)
        .map(|(unit, suffix)| format!("{}{suffix}", ms / unit))
        .unwrap_or_else(|| format!("{ms}ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(format_rfc3339(1_780_826_760_000), "2026-06-07T10:06:00Z");
        assert_eq!(
            format_rfc3339(1_780_826_760_102),
            "2026-06-07T10:06:00.102Z"
        );
    }

    #[test]
    fn durations_read_and_print_in_their_largest_unit() {
        assert_eq!(parse_millis("10s"), Ok(10_000));
        assert_eq!(parse_millis("1m"), Ok(60_000));
        assert!(parse_millis("0s").is_err());
        assert!(parse_millis("1500us").is_err());
        assert_eq!(format_millis(60_000), "1m");
        assert_eq!(format_millis(1_500), "1500ms");
        assert_eq!(
            parse_duration(" 7d ").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
    }
}
