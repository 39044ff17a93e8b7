//! Time helpers shared by the pipeline language and the engine: durations written as SQL
//! interval text (`'10 seconds'`, `'1 hour 30 minutes'`, parsed by arrow's interval parser)
//! and the engine's clock in epoch milliseconds (the unit of every timestamp column).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use datafusion::arrow::compute::kernels::cast_utils::parse_interval_month_day_nano;

/// Parses `'10 seconds'`, `'500 milliseconds'`, `'1 hour'`... Months and years are refused:
/// their length in time depends on the calendar.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.trim().chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "`{text}` needs a unit: write e.g. '{} seconds'",
            text.trim()
        ));
    }
    let iv = parse_interval_month_day_nano(text)
        .map_err(|e| format!("`{text}` is not an interval ({e}); write e.g. '10 seconds'"))?;
    if iv.months != 0 {
        return Err(format!(
            "`{text}`: months and years have no fixed length; use days, hours, minutes or seconds"
        ));
    }
    let nanos = iv.days as i128 * 86_400_000_000_000 + iv.nanoseconds as i128;
    if nanos <= 0 {
        return Err(format!("`{text}` must be longer than zero"));
    }
    Ok(Duration::from_nanos(nanos as u64))
}

/// Milliseconds since the Unix epoch, the engine's wall clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The UTC timezone name used on every timestamp column the engine writes.
pub const TZ: &str = "UTC";
