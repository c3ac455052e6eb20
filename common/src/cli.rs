//! Value parsers for the daemons' command lines and environment. Each error
//! names what was expected, because clap prints it next to the bad value.

use std::time::Duration;

use crate::proto::Limits;

/// `250ms`, `5s`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let expected = || format!("expected a duration such as 500ms, 5s, 2m or 1h, got {s:?}");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| expected())?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(expected()),
    };
    ms.map(Duration::from_millis).ok_or_else(expected)
}

/// `65536`, `64K`, `64KiB`, `1M`, `1MiB` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let expected = || format!("expected a size in bytes such as 65536, 64K or 1M, got {s:?}");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| expected())?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(expected()),
    };
    n.checked_mul(1 << shift).ok_or_else(expected)
}

/// A size that must fit a `u32` and lie in `lo..=hi`.
pub fn parse_size_in(s: &str, lo: u64, hi: u64) -> Result<u32, String> {
    let n = parse_size(s)?;
    if !(lo..=hi).contains(&n) {
        return Err(format!("{n} bytes is outside the allowed range {lo}..={hi}"));
    }
    Ok(n as u32)
}

/// A per-stream initial window: 1 KiB to `2^31-1` bytes.
pub fn parse_window(s: &str) -> Result<u32, String> {
    parse_size_in(s, 1024, u64::from(Limits::MAX_WINDOW))
}

/// A max frame payload: 1 KiB to 16 MiB.
pub fn parse_frame(s: &str) -> Result<u32, String> {
    parse_size_in(
        s,
        u64::from(Limits::MIN_FRAME_PAYLOAD),
        u64::from(Limits::MAX_FRAME_PAYLOAD),
    )
}

/// A channel in-flight limit (PROTOCOL.md §6.1): 64 KiB to 64 MiB.
pub fn parse_inflight(s: &str) -> Result<usize, String> {
    parse_size_in(s, crate::proto::session::MIN_INFLIGHT as u64, 64 << 20).map(|n| n as usize)
}

/// A session idle timeout: 1 s to 1 h.
pub fn parse_idle(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    let ms = d.as_millis();
    if ms < u128::from(Limits::MIN_IDLE_TIMEOUT_MS) || ms > u128::from(Limits::MAX_IDLE_TIMEOUT_MS) {
        return Err(format!("{ms} ms is outside the allowed range 1s..1h"));
    }
    Ok(d)
}

/// A boolean as operators write it in `/etc/default` files: `1`, `yes`,
/// `true`, `on` or `0`, `no`, `false`, `off` (any case).
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" | "on" => Ok(true),
        "0" | "no" | "false" | "off" => Ok(false),
        _ => Err(format!("expected 1/0, yes/no, true/false or on/off, got {s:?}")),
    }
}

/// Splits `NAME=VALUE`, checking NAME as a service or guest name.
pub fn split_named<'a>(s: &'a str, what: &str, form: &str) -> Result<(&'a str, &'a str), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected {form}, got {s:?} (no '=')"))?;
    if crate::proto::frame::check_service_name(name.as_bytes()).is_err() {
        return Err(format!(
            "{what} name {name:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ -"
        ));
    }
    if value.is_empty() {
        return Err(format!("expected {form}, got {s:?} (nothing after '=')"));
    }
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "s", "5x", "-1s", "1.5s", "99999999999999999999h"] {
            assert!(
                parse_duration(bad).unwrap_err().contains("expected a duration"),
                "{bad}"
            );
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("1T").is_err());
        assert!(parse_size_in("1", 1024, 2048).unwrap_err().contains("outside"));
        assert_eq!(parse_size_in("2K", 1024, 2048), Ok(2048));
    }

    #[test]
    fn booleans_as_operators_write_them() {
        for t in ["1", "yes", "YES", "true", "True", "on"] {
            assert_eq!(parse_bool(t), Ok(true), "{t}");
        }
        for f in ["0", "no", "false", "OFF"] {
            assert_eq!(parse_bool(f), Ok(false), "{f}");
        }
        assert!(parse_bool("maybe").unwrap_err().contains("yes/no"));
    }

    #[test]
    fn named() {
        assert_eq!(
            split_named("amqp=127.0.0.1:5672", "service", "NAME=ADDR"),
            Ok(("amqp", "127.0.0.1:5672"))
        );
        assert!(split_named("amqp", "service", "NAME=ADDR")
            .unwrap_err()
            .contains("no '='"));
        assert!(split_named("a b=x", "service", "NAME=ADDR")
            .unwrap_err()
            .contains("must be"));
        assert!(split_named("a=", "service", "NAME=ADDR")
            .unwrap_err()
            .contains("nothing after"));
    }
}
