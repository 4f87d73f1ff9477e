//! Small helpers shared by the library and the CLI: sizes, names, time.

use crate::error::{Error, Result};

/// Parse a size such as `4096`, `64K`, `10G` (binary multiples; `B`/`iB` accepted).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| {
        Error::invalid(format!(
            "invalid size {s:?}: use a number with an optional K, M, G or T suffix"
        ))
    })?;
    n.checked_mul(mult)
        .ok_or_else(|| Error::invalid(format!("size {s:?} is too large")))
}

/// Check a group or disk name: 1-128 of `[A-Za-z0-9._+-]`, not starting with `.` or `-`.
pub fn check_name(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid {what} name {s:?}: use 1-128 letters, digits, '.', '_', '-' or '+', \
             not starting with '.' or '-'"
        )))
    }
}

/// Split `GROUP/DISK[@POINT]` into its parts.
pub fn parse_volume_ref(s: &str) -> Result<(String, String, Option<String>)> {
    let (vol, point) = match s.split_once('@') {
        Some((v, p)) => (v, Some(p.to_string())),
        None => (s, None),
    };
    let (g, d) = vol
        .split_once('/')
        .ok_or_else(|| Error::invalid(format!("invalid volume {s:?}: expected GROUP/DISK")))?;
    check_name("group", g)?;
    check_name("disk", d)?;
    if let Some(p) = &point {
        if p.is_empty() {
            return Err(Error::invalid(format!(
                "invalid volume {s:?}: empty point after '@'"
            )));
        }
    }
    Ok((g.to_string(), d.to_string(), point))
}

/// A memory budget from the environment (`VAR` in MiB, else `default_mib`), counted
/// in units of `unit` bytes, at least `min`.
pub fn env_budget(var: &str, default_mib: u64, unit: u64, min: usize) -> usize {
    let mib: u64 = std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_mib);
    ((mib << 20) / unit.max(1)).max(min as u64) as usize
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Human-readable byte count.
pub fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_reject() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1TiB").unwrap(), 1 << 40);
        assert_eq!(parse_size("2MB").unwrap(), 2 << 20);
        assert!(parse_size("ten")
            .unwrap_err()
            .to_string()
            .contains("invalid size"));
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn names_and_refs() {
        assert!(check_name("group", "app1").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a@b", "a b", &"x".repeat(129)] {
            assert!(check_name("group", bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_volume_ref("app1/disk0@latest").unwrap(),
            ("app1".into(), "disk0".into(), Some("latest".into()))
        );
        assert!(parse_volume_ref("app1").is_err());
        assert!(parse_volume_ref("app1/d@").is_err());
        assert_eq!(human(1536), "1.5 KiB");
    }
}

/// Lower-case hex of `b` (chunk ids in messages).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
