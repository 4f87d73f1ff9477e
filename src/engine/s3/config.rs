//! The S3 backend's configuration (kept in `store.json`) and its credentials
//! (never kept: read from the environment or a credentials file at open).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default size of the local cache of remote pack ranges, bytes.
pub const DEFAULT_CACHE_SIZE: u64 = 1 << 30;

/// Where a store's packs live in an object store, as `drclone init --backend
/// s3://BUCKET/PREFIX` recorded it.  Secrets are not part of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (may be empty); every object of
    /// the store is under `PREFIX/`.
    pub prefix: String,
    /// Endpoint URL (`http://127.0.0.1:7480` for radosgw); None: AWS.
    pub endpoint: Option<String>,
    pub region: String,
    /// Bytes of the local cache of remote pack ranges (0: no cache).
    pub cache_size: u64,
    /// Bound on bytes not yet uploaded (sealed packs waiting plus the open
    /// pack); None: half the free space of the store's file system at open.
    #[serde(default)]
    pub pending_max: Option<u64>,
    /// A credentials file (`aws_access_key_id = ...`, `aws_secret_access_key =
    /// ...`); None: the `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` environment.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

impl S3Config {
    /// Parse `s3://BUCKET/PREFIX` into (bucket, prefix).
    pub fn parse_url(url: &str) -> Result<(String, String)> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            Error::invalid(format!(
                "backend {url:?}: expected s3://BUCKET/PREFIX (the only backend besides the local disk)"
            ))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::invalid(format!("backend {url:?}: no bucket name")));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|s| s == "." || s == "..")
            || prefix.contains("//")
            || prefix.contains('\\')
        {
            return Err(Error::invalid(format!(
                "backend {url:?}: prefix {prefix:?} has an empty, '.' or '..' segment"
            )));
        }
        Ok((bucket.to_string(), prefix))
    }

    /// `s3://BUCKET/PREFIX`, for messages.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

/// An access key pair.
#[derive(Clone)]
pub struct Credentials {
    pub key_id: String,
    pub secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials {{ key_id: {:?}, secret: <hidden> }}",
            self.key_id
        )
    }
}

impl Credentials {
    /// From `file` if given, else from `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`.  Errors name what is missing.
    pub fn load(file: Option<&Path>) -> Result<Credentials> {
        if let Some(f) = file {
            return Self::from_file(f);
        }
        let id = std::env::var("AWS_ACCESS_KEY_ID").ok();
        let secret = std::env::var("AWS_SECRET_ACCESS_KEY").ok();
        match (id, secret) {
            (Some(key_id), Some(secret)) if !key_id.is_empty() && !secret.is_empty() => {
                Ok(Credentials { key_id, secret })
            }
            _ => Err(Error::Key(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give \
                 --s3-credentials FILE at init"
                    .into(),
            )),
        }
    }

    /// An AWS-style credentials file: `key = value` lines (section headers and
    /// `#` comments ignored), keys `aws_access_key_id` and `aws_secret_access_key`.
    pub fn from_file(path: &Path) -> Result<Credentials> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let (mut id, mut secret) = (None, None);
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') || line.starts_with(';') || line.starts_with('[') {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                let v = v.trim().to_string();
                match k.trim().to_ascii_lowercase().as_str() {
                    "aws_access_key_id" => id = Some(v),
                    "aws_secret_access_key" => secret = Some(v),
                    _ => {}
                }
            }
        }
        match (id, secret) {
            (Some(key_id), Some(secret)) => Ok(Credentials { key_id, secret }),
            _ => Err(Error::Key(format!(
                "S3 credentials file {} lacks aws_access_key_id or aws_secret_access_key",
                path.display()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_refused() {
        assert_eq!(
            S3Config::parse_url("s3://b/p/q/").unwrap(),
            ("b".into(), "p/q".into())
        );
        assert_eq!(
            S3Config::parse_url("s3://b").unwrap(),
            ("b".into(), "".into())
        );
        assert!(S3Config::parse_url("http://b/p").is_err());
        assert!(S3Config::parse_url("s3:///p").is_err());
        assert!(S3Config::parse_url("s3://b/a/../c").is_err());
    }

    #[test]
    fn credentials_file_is_read_and_secret_not_printed() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c");
        std::fs::write(
            &f,
            "[default]\n# c\naws_access_key_id = AK\naws_secret_access_key=SEC\n",
        )
        .unwrap();
        let c = Credentials::from_file(&f).unwrap();
        assert_eq!((c.key_id.as_str(), c.secret.as_str()), ("AK", "SEC"));
        assert!(!format!("{c:?}").contains("SEC"));
        std::fs::write(&f, "aws_access_key_id = AK\n").unwrap();
        assert!(Credentials::from_file(&f).is_err());
    }
}
