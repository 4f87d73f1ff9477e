//! Blocking access to the bucket: `object_store`'s async S3 client driven by a
//! small tokio runtime this module owns.  Engine threads call these functions and
//! wait (`block_on`); nothing async leaks out of this file.
//!
//! Object keys (under the store's prefix `P`):
//! * `P/packs/{id:016x}.pack`: one sealed pack, byte for byte the local file;
//! * `P/drclone-store.json`: the owning store's uuid, written at init.

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};

use super::config::{Credentials, S3Config};
use crate::error::{Error, Result};

/// The bucket, seen through one store's prefix.
pub struct Remote {
    rt: tokio::runtime::Runtime,
    s3: AmazonS3,
    bucket: String,
    prefix: String,
    /// The store incarnation this process writes for (see
    /// [`Remote::check_owner`]).
    owner: std::sync::RwLock<Option<uuid::Uuid>>,
}

/// Name of the marker object that says which store owns a prefix.
pub const MARKER: &str = "drclone-store.json";

impl Remote {
    /// Build the client (no request is made).  Requests time out after 60 s
    /// (connect: 5 s) and are retried by the client twice within 15 s; callers
    /// that must not give up (the uploader) retry on top of that.
    pub fn new(cfg: &S3Config, creds: &Credentials) -> Result<Remote> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-io")
            .enable_all()
            .build()
            .map_err(|e| Error::io("tokio runtime for the S3 backend", e))?;
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&creds.key_id)
            .with_secret_access_key(&creds.secret)
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(15),
                ..Default::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs(60))
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_allow_http(true),
            );
        if let Some(ep) = &cfg.endpoint {
            // radosgw, MinIO: path-style addressing at the given endpoint.
            b = b.with_endpoint(ep).with_virtual_hosted_style_request(false);
        }
        let s3 = b.build().map_err(|e| Error::ObjectStore {
            op: "configure",
            object: cfg.url(),
            cause: e.to_string(),
        })?;
        Ok(Remote {
            rt,
            s3,
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            owner: std::sync::RwLock::new(None),
        })
    }

    fn path(&self, name: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(name)
        } else {
            ObjPath::from(format!("{}/{name}", self.prefix))
        }
    }

    fn pack_name(id: u64) -> String {
        format!("packs/{id:016x}.pack")
    }

    /// `s3://bucket/prefix/name`.
    pub fn url(&self, name: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.path(name))
    }

    /// The URL of pack `id`'s object.
    pub fn pack_url(&self, id: u64) -> String {
        self.url(&Self::pack_name(id))
    }

    /// `s3://bucket/prefix`.
    pub fn target(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn err(&self, op: &'static str, name: &str, e: object_store::Error) -> Error {
        Error::ObjectStore {
            op,
            object: self.url(name),
            cause: e.to_string(),
        }
    }

    /// PUT a whole object.
    pub fn put(&self, name: &str, data: Bytes) -> Result<()> {
        let p = self.path(name);
        self.rt
            .block_on(self.s3.put(&p, PutPayload::from_bytes(data)))
            .map(|_| ())
            .map_err(|e| self.err("PUT", name, e))
    }

    /// GET a whole object; None if it does not exist.
    pub fn get(&self, name: &str) -> Result<Option<Bytes>> {
        let p = self.path(name);
        match self
            .rt
            .block_on(async { self.s3.get(&p).await?.bytes().await })
        {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("GET", name, e)),
        }
    }

    /// HEAD: the object's size in bytes, or None if it does not exist.
    pub fn head(&self, name: &str) -> Result<Option<u64>> {
        let p = self.path(name);
        match self.rt.block_on(self.s3.head(&p)) {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("HEAD", name, e)),
        }
    }

    /// Ranged GET of `range` (bytes); None if the object does not exist.
    pub fn get_range(&self, name: &str, range: Range<u64>) -> Result<Option<Bytes>> {
        let p = self.path(name);
        match self.rt.block_on(self.s3.get_range(&p, range)) {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("GET (range)", name, e)),
        }
    }

    /// DELETE (a missing object is not an error).
    pub fn delete(&self, name: &str) -> Result<()> {
        let p = self.path(name);
        match self.rt.block_on(self.s3.delete(&p)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("DELETE", name, e)),
        }
    }

    /// Every pack object under this prefix: (id, size in bytes), by id.  Objects
    /// under the prefix that are not named like packs are ignored; nothing
    /// outside `PREFIX/packs/` is ever listed.
    pub fn list_packs(&self) -> Result<Vec<(u64, u64)>> {
        let dir = self.path("packs");
        let res = self
            .rt
            .block_on(self.s3.list_with_delimiter(Some(&dir)))
            .map_err(|e| self.err("LIST", "packs/", e))?;
        let mut out: Vec<(u64, u64)> = res
            .objects
            .iter()
            .filter_map(|m| {
                let name = m.location.filename()?;
                let hex = name.strip_suffix(".pack")?;
                Some((u64::from_str_radix(hex, 16).ok()?, m.size))
            })
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Write for store incarnation `inc` (None: the store `init` made).
    pub fn set_owner(&self, inc: Option<uuid::Uuid>) {
        *self.owner.write().unwrap() = inc;
    }

    /// Before an upload or a deletion: the prefix's marker must name this
    /// process's incarnation.  A store rebuilt elsewhere (`init --from-backend`)
    /// writes a new one, so the lost host, if it comes back, touches nothing.
    /// Errors: [`Error::Refused`] naming both; GET errors.
    pub fn check_owner(&self) -> Result<()> {
        let Some(body) = self.get(MARKER)? else {
            return Ok(()); // a prefix without a marker (made before markers)
        };
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let theirs = v
            .get("incarnation")
            .and_then(|u| u.as_str())
            .and_then(|u| uuid::Uuid::parse_str(u).ok());
        let ours = *self.owner.read().unwrap();
        if theirs != ours {
            return Err(Error::Refused(format!(
                "{} now belongs to a store rebuilt elsewhere (incarnation {}); this store \
                 (incarnation {}) uploads and deletes nothing there any more: it must not \
                 serve as that store",
                self.target(),
                theirs.map_or("-".into(), |u| u.to_string()),
                ours.map_or("-".into(), |u| u.to_string())
            )));
        }
        Ok(())
    }

    /// Objects directly under `PREFIX/dir/`: (file name, size in bytes).
    pub fn list_dir(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        let p = self.path(dir);
        let res = self
            .rt
            .block_on(self.s3.list_with_delimiter(Some(&p)))
            .map_err(|e| self.err("LIST", dir, e))?;
        Ok(res
            .objects
            .iter()
            .filter_map(|m| Some((m.location.filename()?.to_string(), m.size)))
            .collect())
    }

    pub fn put_pack(&self, id: u64, data: Bytes) -> Result<()> {
        self.put(&Self::pack_name(id), data)
    }
    pub fn head_pack(&self, id: u64) -> Result<Option<u64>> {
        self.head(&Self::pack_name(id))
    }
    pub fn get_pack_range(&self, id: u64, range: Range<u64>) -> Result<Option<Bytes>> {
        self.get_range(&Self::pack_name(id), range)
    }
    pub fn delete_pack(&self, id: u64) -> Result<()> {
        self.delete(&Self::pack_name(id))
    }
}
