//! Parsers for sizes (`1GiB`, `64M`), rates (`128MiB/s`) and durations (`10ms`, `1.5s`).

use std::time::Duration;

/// Splits `s` (trimmed) into its leading decimal number and the rest (the unit).
fn number_and_unit(s: &str) -> Option<(f64, &str)> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    Some((num.parse().ok()?, unit))
}

/// Parses a byte size: a number with an optional unit (B, K/KiB/KB, M/MiB/MB, G/GiB/GB, T/TiB/TB;
/// all binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (v, unit) = number_and_unit(s)
        .ok_or_else(|| format!("'{s}' is not a size (examples: 4096, 64MiB, 1GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => {
            return Err(format!(
                "unknown size unit '{u}' in '{s}' (use B, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(bytes as u64)
}

/// Parses a rate in bytes per second: a size followed by `/s` (the `/s` may be omitted).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("ps"))
        .unwrap_or(t);
    parse_size(t).map_err(|e| format!("{e} (rates look like 128MiB/s or 0)"))
}

/// Parses a duration: a number with `us`, `ms`, `s` or `m` (a bare number is milliseconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (v, unit) = number_and_unit(s)
        .ok_or_else(|| format!("'{s}' is not a duration (examples: 10ms, 1.5s)"))?;
    let secs = match unit {
        "us" | "µs" => v / 1e6,
        "" | "ms" => v / 1e3,
        "s" => v,
        "m" | "min" => v * 60.0,
        u => {
            return Err(format!(
                "unknown duration unit '{u}' in '{s}' (use us, ms, s, m)"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}' is out of range"))
}

/// Formats bytes as MiB/GiB for humans.
pub fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_rates_durations() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_rate("128MiB/s").unwrap(), 128 << 20);
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert_eq!(parse_duration("10ms").unwrap(), Duration::from_millis(10));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("3 weeks").is_err());
    }
}
