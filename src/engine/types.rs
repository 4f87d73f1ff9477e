//! Small typed values the catalog keeps: point kinds, group roles, retention
//! policies.  Each serializes as the same text the records always held, so stores
//! written before these types existed read unchanged.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a recovery point was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PointKind {
    /// Crash-consistent: every disk of the group at one instant, nothing quiesced.
    #[default]
    Crash,
    /// Application-consistent: taken while the source was quiesced (its pre- and
    /// post-snapshot hooks succeeded); `latest-app` finds it.
    App,
}

impl fmt::Display for PointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PointKind::Crash => "crash",
            PointKind::App => "app",
        })
    }
}

/// A group's role in DR (set by failover and failback; every change raises the
/// group's epoch, which fences stale replication agents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Replication lands in the replica heads.
    #[default]
    Protected,
    /// Failed over, not yet committed: the production names serve failover heads,
    /// and `failover --undo` can still go back.
    FailedOver,
    /// A failover that was committed: the failover heads are the group's heads.
    Committed,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Protected => "protected",
            Role::FailedOver => "failed-over",
            Role::Committed => "committed",
        })
    }
}

/// One rule of a retention policy: keep one point per `every` seconds for
/// `keep` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionRule {
    pub every: u64,
    pub keep: u64,
}

/// A retention policy such as `5s:10m,1m:24h,1h:7d,1d:30d`: for each rule
/// `EVERY:KEEP`, one point per EVERY is kept for KEEP.  Durations are a number and
/// a unit: `s`, `m`, `h`, `d` or `w`.  Kept in records as its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RetentionPolicy {
    pub rules: Vec<RetentionRule>,
}

/// Parse a duration such as `5m` into seconds.
pub fn parse_duration(d: &str) -> Result<u64> {
    let (n, unit) = d.split_at(d.len().saturating_sub(1));
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => 0,
    };
    match n.parse::<u64>() {
        Ok(n) if mult > 0 && n > 0 => n
            .checked_mul(mult)
            .ok_or_else(|| Error::invalid(format!("duration {d:?} is too long"))),
        _ => Err(Error::invalid(format!(
            "duration {d:?} is not a positive number followed by s, m, h, d or w"
        ))),
    }
}

fn format_duration(secs: u64) -> String {
    for (unit, m) in [("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)] {
        if secs % m == 0 {
            return format!("{}{unit}", secs / m);
        }
    }
    format!("{secs}s")
}

impl std::str::FromStr for RetentionPolicy {
    type Err = Error;

    fn from_str(s: &str) -> Result<RetentionPolicy> {
        let mut rules = Vec::new();
        for part in s.split(',') {
            let (every, keep) = part.split_once(':').ok_or_else(|| {
                Error::invalid(format!(
                    "retention rule {part:?} is not EVERY:KEEP (e.g. 5m:24h)"
                ))
            })?;
            let rule = RetentionRule {
                every: parse_duration(every)?,
                keep: parse_duration(keep)?,
            };
            if rule.keep < rule.every {
                return Err(Error::invalid(format!(
                    "retention rule {part:?} keeps points for less than their interval"
                )));
            }
            rules.push(rule);
        }
        Ok(RetentionPolicy { rules })
    }
}

impl fmt::Display for RetentionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .rules
            .iter()
            .map(|r| format!("{}:{}", format_duration(r.every), format_duration(r.keep)))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl TryFrom<String> for RetentionPolicy {
    type Error = Error;
    fn try_from(s: String) -> Result<RetentionPolicy> {
        s.parse()
    }
}

impl From<RetentionPolicy> for String {
    fn from(p: RetentionPolicy) -> String {
        p.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_roles_and_policies_keep_their_text() {
        assert_eq!(serde_json::to_string(&PointKind::App).unwrap(), "\"app\"");
        assert_eq!(
            serde_json::from_str::<PointKind>("\"crash\"").unwrap(),
            PointKind::Crash
        );
        assert_eq!(
            serde_json::to_string(&Role::FailedOver).unwrap(),
            "\"failed-over\""
        );
        let p: RetentionPolicy = "5s:10m,1m:24h,1h:7d,1d:30d".parse().unwrap();
        assert_eq!(
            p.rules[1],
            RetentionRule {
                every: 60,
                keep: 86400
            }
        );
        assert_eq!(p.to_string(), "5s:10m,1m:1d,1h:1w,1d:30d");
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<RetentionPolicy>(&j).unwrap(), p);
        for bad in ["5m", "5x:1h", "0m:1h", "1h:5m", "m:1h", ""] {
            let e = bad.parse::<RetentionPolicy>().unwrap_err().to_string();
            assert!(
                e.contains("retention") || e.contains("duration"),
                "{bad}: {e}"
            );
        }
    }
}
