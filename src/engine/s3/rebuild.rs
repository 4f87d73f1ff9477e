//! `drclone init --from-backend s3://BUCKET/PREFIX`: rebuild a store on a new
//! host from its bucket, after the DR host that held it is lost.
//!
//! The newest catalog that decodes is loaded into a fresh metadata database
//! (an older one is tried if the newest is damaged).  Then its pack records
//! are checked against the objects in the bucket: a pack the catalog knows
//! but the bucket lacks (it was still waiting on the lost host's disk) loses
//! its chunks: their index entries are dropped and recorded as lost (`Q`
//! keys), and the open that follows repairs the map entries that used them,
//! as after a crash (docs/DESIGN.md §8, I11).  Every pack the checkpoint
//! listed as sealed was confirmed in the bucket before the checkpoint was
//! uploaded, so no recovery point loses anything; only heads can, when their
//! newest data was still local.  The pack counter is moved past every object
//! in the bucket, so the new store never writes over one.

use std::collections::HashMap;
use std::path::Path;

use rocksdb::WriteBatch;
use serde::Serialize;

use super::catalog;
use super::config::{Credentials, S3Config};
use super::remote::Remote;
use crate::engine::keys::{self, ChunkId};
use crate::engine::meta::{ChunkLoc, Db, PackRec};
use crate::engine::store::Config;
use crate::error::{Error, IoContext, Result};

/// What a rebuild found and did.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    /// The catalog used: its sequence number, when its snapshot was taken
    /// (Unix seconds) and why.
    pub catalog_seq: u64,
    pub catalog_time: u64,
    pub catalog_reason: String,
    /// Catalogs skipped because they did not decode (newest first), with why.
    pub skipped: Vec<String>,
    /// Metadata records loaded.
    pub keys: u64,
    /// Packs the catalog names that the bucket lacks, and the chunks they took.
    pub packs_missing: Vec<u64>,
    pub chunks_lost: u64,
}

/// Rebuild the store at `dir` (which must not exist, or be empty) from the
/// bucket `s3` names.  An encrypted store needs `key_file`, checked against
/// the catalog before anything is written (the bucket's marker included) and
/// recorded in the new `store.json`.  Errors: [`Error::Invalid`] if `dir` holds
/// anything; [`Error::Key`] if the key is missing or wrong, or given for a
/// store that is not encrypted;
/// [`Error::NotFound`] if the prefix holds no catalog; [`Error::Invalid`] if
/// no catalog decodes; [`Error::ObjectStore`] if the bucket cannot be read;
/// I/O and database errors creating the store.
pub fn rebuild(dir: &Path, s3: &S3Config, key_file: Option<&Path>) -> Result<RebuildReport> {
    if dir.exists() && std::fs::read_dir(dir).at(dir)?.next().is_some() {
        return Err(Error::invalid(format!(
            "{} is not empty: a store is rebuilt into a new or empty directory",
            dir.display()
        )));
    }
    let creds = Credentials::load(s3.credentials_file.as_deref())?;
    let remote = Remote::new(s3, &creds)?;
    let cats = catalog::list(&remote)?;
    if cats.is_empty() {
        return Err(Error::NotFound(format!(
            "no catalog under {}: nothing to rebuild from (a store checkpoints its catalog \
             at every recovery point, after a gc and on the daemon's interval)",
            remote.target()
        )));
    }
    let mut skipped = Vec::new();
    let mut found = None;
    for (seq, _) in cats.iter().rev() {
        let name = catalog::object_name(*seq);
        let url = remote.url(&name);
        let r = remote
            .get(&name)?
            .ok_or_else(|| Error::NotFound(format!("catalog {url} vanished while read")))
            .and_then(|b| catalog::decode(&url, &b));
        match r {
            Ok(c) => {
                found = Some((*seq, c));
                break;
            }
            Err(e) => {
                log::warn!("skipping catalog {url}: {e}");
                skipped.push(e.to_string());
            }
        }
    }
    let Some((seq, (header, recs))) = found else {
        return Err(Error::invalid(format!(
            "no catalog under {} decodes: {}",
            remote.target(),
            skipped.join("; ")
        )));
    };
    let mut cfg: Config = serde_json::from_value(header.config.clone())
        .map_err(|e| Error::invalid(format!("catalog {seq}: store config: {e}")))?;
    cfg.s3 = Some(s3.clone());
    // The key before anything is written: a rebuild that cannot open the
    // store must not take the prefix from the old host, nor fill `dir`.
    cfg.key_file = check_key(&cfg, key_file)?;
    // This store now owns the prefix: a new incarnation in its config and in
    // the bucket's marker, so the lost host, if it comes back, touches nothing.
    let inc = uuid::Uuid::new_v4();
    cfg.incarnation = Some(inc);

    std::fs::create_dir_all(dir).at(dir)?;
    let db = Db::open(&dir.join("meta"), true)?;
    let mut b = WriteBatch::default();
    for (k, v) in &recs {
        b.put(k, v);
        if b.len() >= 50_000 {
            db.write(std::mem::take(&mut b), false)?;
        }
    }
    db.write(b, false)?;

    // Packs against the bucket.
    let objects: HashMap<u64, u64> = remote.list_packs()?.into_iter().collect();
    let mut missing = Vec::new();
    let mut lost = 0u64;
    let mut b = WriteBatch::default();
    for (k, v) in db.scan_prefix(&[keys::PACK])? {
        let (Some(id), Some(rec)) = (keys::parse_pack(&k), PackRec::decode(&v)) else {
            continue;
        };
        match objects.get(&id) {
            Some(&len) if !rec.sealed || rec.len == Some(len) || rec.len.is_none() => {
                b.put(&k, PackRec::sealed(len).encode());
            }
            other => {
                if let Some(len) = other {
                    log::warn!(
                        "{}: pack {id} is {len} bytes in the bucket but the catalog sealed it at {:?}: \
                         its chunks are treated as lost",
                        remote.target(),
                        rec.len
                    );
                }
                missing.push(id);
                for (rk, rv) in db.scan_prefix(&keys::reverse_prefix(id))? {
                    b.delete(&rk);
                    let Ok(cid) = ChunkId::try_from(&rv[..]) else {
                        continue;
                    };
                    let at = keys::parse_reverse(&rk).map(|(_, off)| off);
                    let loc = db
                        .get(&keys::chunk(&cid))?
                        .and_then(|v| ChunkLoc::decode(&v));
                    if loc.is_some_and(|l| l.pack == id && Some(l.offset) == at) {
                        b.delete(keys::chunk(&cid));
                        b.put(keys::lost(&cid), [1u8]);
                        lost += 1;
                    }
                }
                b.delete(&k);
            }
        }
    }
    // New packs are numbered past every object in the bucket.
    let top = objects.keys().max().map_or(0, |m| m + 1);
    let ck = keys::counter("pack");
    let cur = db
        .get(&ck)?
        .filter(|v| v.len() == 8)
        .map_or(1, |v| u64::from_be_bytes(v[..].try_into().unwrap()));
    b.put(&ck, cur.max(top).to_be_bytes());
    db.write(b, true)?;
    drop(db);
    let marker = serde_json::json!({
        "uuid": cfg.uuid,
        "created": cfg.created,
        "incarnation": inc,
        "rebuilt": crate::util::now_secs(),
        "from_catalog": seq,
    });
    remote.put(
        super::remote::MARKER,
        bytes::Bytes::from(serde_json::to_vec_pretty(&marker).expect("json")),
    )?;
    std::fs::create_dir_all(dir.join("journal")).at(&dir.join("journal"))?;
    crate::engine::store::write_config(dir, &cfg)?;
    if !missing.is_empty() {
        log::warn!(
            "{}: {} pack(s) the catalog names are not in the bucket ({lost} chunk(s) lost): \
             they had not been uploaded when the old host stopped; heads that used them read \
             their older data",
            remote.target(),
            missing.len()
        );
    }
    Ok(RebuildReport {
        catalog_seq: seq,
        catalog_time: header.time,
        catalog_reason: header.reason,
        skipped,
        keys: header.keys,
        packs_missing: missing,
        chunks_lost: lost,
    })
}

/// The key file the rebuilt store records: `key_file` (made absolute), which
/// must hold the key of an encrypted store (`cfg.key_check`); None for a store
/// that is not encrypted.  Errors: [`Error::Key`] (missing, unreadable, wrong,
/// or given for a store that is not encrypted).
fn check_key(cfg: &Config, key_file: Option<&Path>) -> Result<Option<std::path::PathBuf>> {
    match (cfg.encrypted, key_file) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(Error::Key(
            "--key-file given, but the store in the bucket is not encrypted".into(),
        )),
        (true, None) => Err(Error::Key(
            "the store in the bucket is encrypted: give its key with --key-file \
             (nothing was written)"
                .into(),
        )),
        (true, Some(path)) => {
            let path = std::path::absolute(path).at(path)?;
            let key = crate::engine::codec::MasterKey::load(&path)?;
            if Some(key.check_value()) != cfg.key_check {
                return Err(Error::Key(format!(
                    "wrong key: key file {} does not match the key the store in the bucket \
                     was created with (nothing was written)",
                    path.display()
                )));
            }
            Ok(Some(path))
        }
    }
}
