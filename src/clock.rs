//! The wall clock as the machine records it: milliseconds since the Unix epoch, for status
//! documents, Redis scores and job timestamps. Durations and deadlines use monotonic time
//! (`tokio::time::Instant`) instead; this module is only for instants other processes read.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> u64 {
    epoch_ms(SystemTime::now())
}

/// Now as milliseconds since the Unix epoch and as ISO-8601 UTC with milliseconds
/// (`2026-12-06T19:05:00.123Z`, the form the broker's library writes): one instant, both forms.
pub fn now_stamp() -> (u64, String) {
    let t = SystemTime::now();
    (epoch_ms(t), humantime::format_rfc3339_millis(t).to_string())
}

/// Milliseconds since the Unix epoch at `t`; 0 for an instant before it (a clock set wrong),
/// which no reader would take for a real time.
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn epoch_milliseconds() {
        assert_eq!(
            epoch_ms(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            1_700_000_000_123
        );
        assert_eq!(epoch_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert!(now_ms() > 1_700_000_000_000);
        let (ms, iso) = now_stamp();
        let parsed = humantime::parse_rfc3339(&iso).expect("RFC 3339");
        assert_eq!(epoch_ms(parsed), ms, "{iso}");
        assert!(iso.ends_with('Z') && iso.len() == 24, "{iso}");
    }
}
