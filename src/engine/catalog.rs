//! The catalog: groups, volumes, recovery points, clones and the views that
//! name them (`GROUP/DISK`, `GROUP/DISK@POINT`).  Every change here is one synced
//! RocksDB batch (docs/DESIGN.md §5, §8).

use std::collections::HashMap;

use rocksdb::WriteBatch;

use crate::engine::keys;
use crate::engine::meta::{
    encode_rec, GroupRec, LineageRec, MapVal, Origin, PointRec, PointVolume, VolumeRec,
};
use crate::engine::store::*;
use crate::engine::types::{PointKind, RetentionPolicy, Role};
use crate::engine::write::Access;
use crate::error::{Error, Result};
use crate::util::{check_name, now_secs};

impl Store {
    // ---- groups and volumes -----------------------------------------------------

    pub fn create_group(&self, name: &str) -> Result<GroupRec> {
        check_name("group", name)?;
        let _m = self.meta.lock().unwrap();
        if self.db.get(&keys::group(name))?.is_some() {
            return Err(Error::Exists(format!("group {name}")));
        }
        let rec = GroupRec {
            name: name.into(),
            created: now_secs(),
            retention: None,
            app_retention: None,
            role: Role::Protected,
            epoch: 0,
            retired: Vec::new(),
            checkpoint_interval: None,
            replication: None,
            peers: Default::default(),
        };
        let mut b = WriteBatch::default();
        b.put(keys::group(name), encode_rec(&rec));
        self.db.write(b, true)?;
        Ok(rec)
    }

    pub fn group(&self, name: &str) -> Result<GroupRec> {
        self.db
            .get_rec(&keys::group(name))?
            .ok_or_else(|| Error::NotFound(format!("group {name}")))
    }

    pub fn groups(&self) -> Result<Vec<GroupRec>> {
        self.db
            .scan_prefix(&[keys::GROUP])?
            .iter()
            .map(|(k, v)| self.db.decode_rec(k, v))
            .collect()
    }

    /// Mark `group` as drained for a planned failover (`on`), or no longer:
    /// new replication sessions into it are refused meanwhile (a session
    /// already open finishes, and the failover waits for it).
    pub fn set_draining(&self, group: &str, on: bool) {
        let _m = self.meta.lock().unwrap();
        let mut d = self.draining.lock().unwrap();
        if on {
            d.insert(group.to_string());
        } else {
            d.remove(group);
        }
    }

    /// The state of a head, for replication agents deciding whether their
    /// manifest still describes it: (lineage, epoch, clean).  Clean means no
    /// write since the lineage last moved to a new epoch (nothing unflushed,
    /// nothing in the write-back overlay).  Errors: NotFound.
    pub fn head_state(&self, group: &str, disk: &str) -> Result<(u64, u64, bool)> {
        let v = self.volume(group, disk)?;
        let lin = self
            .lineage(v.lineage)
            .ok_or_else(|| Error::NotFound(format!("lineage {} of {group}/{disk}", v.lineage)))?;
        let set: std::collections::HashSet<u64> = [lin.id].into();
        let clean = !self.unflushed.lock().unwrap().contains(&lin.id)
            && self.overlay.keys_of(&set).is_empty();
        Ok((lin.id, lin.epoch, clean))
    }

    /// Whether a planned failover drains `group`.
    pub fn is_draining(&self, group: &str) -> bool {
        self.draining.lock().unwrap().contains(group)
    }

    /// Record the group's last replication cycle (the receiver's status).
    /// Errors: NotFound.
    pub fn set_replication_status(&self, group: &str, status: serde_json::Value) -> Result<()> {
        let _m = self.meta.lock().unwrap();
        let mut g = self.group(group)?;
        g.replication = Some(status);
        let mut b = WriteBatch::default();
        b.put(keys::group(group), encode_rec(&g));
        self.db.write(b, true)
    }

    /// Record that peer store `peer` (its UUID) now holds point `point` of
    /// `group` (after a push landed it there).  Errors: NotFound.
    pub fn set_peer_point(&self, group: &str, peer: &str, point: u64) -> Result<()> {
        let _m = self.meta.lock().unwrap();
        let mut g = self.group(group)?;
        g.peers.insert(peer.to_string(), point);
        let mut b = WriteBatch::default();
        b.put(keys::group(group), encode_rec(&g));
        self.db.write(b, true)
    }

    /// Set how often the daemon checkpoints the group (seconds; None: never).
    /// Errors: NotFound.
    pub fn set_checkpoint_interval(&self, group: &str, secs: Option<u64>) -> Result<GroupRec> {
        let _m = self.meta.lock().unwrap();
        let mut g = self.group(group)?;
        g.checkpoint_interval = secs;
        let mut b = WriteBatch::default();
        b.put(keys::group(group), encode_rec(&g));
        self.db.write(b, true)?;
        Ok(g)
    }

    /// Set the group's retention policy (`app`: the policy for app-consistent
    /// points).  Errors: NotFound.
    pub fn set_retention(
        &self,
        group: &str,
        policy: Option<RetentionPolicy>,
        app: bool,
    ) -> Result<()> {
        let _m = self.meta.lock().unwrap();
        let mut g = self.group(group)?;
        if app {
            g.app_retention = policy;
        } else {
            g.retention = policy;
        }
        let mut b = WriteBatch::default();
        b.put(keys::group(group), encode_rec(&g));
        self.db.write(b, true)
    }

    /// A volume size must be a positive multiple of 512 bytes, at most 2^60.
    pub fn check_size(&self, size: u64) -> Result<()> {
        if size == 0 || size % 512 != 0 {
            return Err(Error::invalid(format!(
                "volume size {size} must be a positive multiple of 512 bytes"
            )));
        }
        if size > (1u64 << 60) {
            return Err(Error::invalid(format!("volume size {size} is too large")));
        }
        Ok(())
    }

    pub(crate) fn new_lineage(
        &self,
        parent: Option<(u64, u64)>,
        batch: &mut WriteBatch,
    ) -> Result<LineageRec> {
        let id = self.db.next_counter("lineage", batch)?;
        let rec = LineageRec {
            id,
            epoch: 1,
            parent,
            has_head: true,
        };
        batch.put(keys::lineage(id), encode_rec(&rec));
        Ok(rec)
    }

    pub(crate) fn add_volume(
        &self,
        group: &str,
        disk: &str,
        size: u64,
        parent: Option<(u64, u64)>,
    ) -> Result<VolumeRec> {
        check_name("disk", disk)?;
        self.check_size(size)?;
        self.group(group)?;
        if self.db.get(&keys::volume(group, disk))?.is_some() {
            return Err(Error::Exists(format!("volume {group}/{disk}")));
        }
        let mut b = WriteBatch::default();
        let lin = self.new_lineage(parent, &mut b)?;
        let seq = self.db.next_counter("volume-seq", &mut b)?;
        let rec = VolumeRec {
            group: group.into(),
            disk: disk.into(),
            lineage: lin.id,
            size,
            seq,
            created: now_secs(),
            replica: None,
        };
        b.put(keys::volume(group, disk), encode_rec(&rec));
        self.db.write(b, true)?;
        self.lineages.write().unwrap().insert(lin.id, lin);
        Ok(rec)
    }

    pub fn create_volume(&self, group: &str, disk: &str, size: u64) -> Result<VolumeRec> {
        let _m = self.meta.lock().unwrap();
        self.add_volume(group, disk, size, None)
    }

    pub fn volume(&self, group: &str, disk: &str) -> Result<VolumeRec> {
        self.db
            .get_rec(&keys::volume(group, disk))?
            .ok_or_else(|| Error::NotFound(format!("volume {group}/{disk}")))
    }

    /// Volumes of one group in disk order, or of every group.
    pub fn volumes(&self, group: Option<&str>) -> Result<Vec<VolumeRec>> {
        let prefix = match group {
            Some(g) => keys::volume_prefix(g),
            None => vec![keys::VOLUME],
        };
        let mut v: Vec<VolumeRec> = self
            .db
            .scan_prefix(&prefix)?
            .iter()
            .map(|(k, v)| self.db.decode_rec(k, v))
            .collect::<Result<_>>()?;
        v.sort_by(|a, b| (&a.group, a.seq).cmp(&(&b.group, b.seq)));
        Ok(v)
    }

    /// Grow a volume.  Shrinking is refused: it would discard data.
    pub fn resize_volume(&self, group: &str, disk: &str, size: u64) -> Result<VolumeRec> {
        let _m = self.meta.lock().unwrap();
        self.check_size(size)?;
        let mut v = self.volume(group, disk)?;
        if size < v.size {
            return Err(Error::invalid(format!(
                "volume {group}/{disk} is {} bytes; shrinking to {size} would discard data",
                v.size
            )));
        }
        v.size = size;
        let mut b = WriteBatch::default();
        b.put(keys::volume(group, disk), encode_rec(&v));
        self.db.write(b, true)?;
        Ok(v)
    }

    /// Remove a volume's head.  Points that include it keep their data until they
    /// are removed too; GC reclaims the rest.
    pub fn remove_volume(&self, group: &str, disk: &str) -> Result<()> {
        let _m = self.meta.lock().unwrap();
        let v = self.volume(group, disk)?;
        let leases = self.leases.inner.lock().unwrap();
        if let Some(users) = leases.get(&(v.lineage, HEAD_EPOCH)) {
            return Err(Error::Busy(format!(
                "volume {group}/{disk} is in use by {} user(s) ({}); disconnect them first",
                users.len(),
                users
                    .iter()
                    .map(|u| u.1.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let _g = self.gate.exclusive();
        let mut lins = self.lineages.write().unwrap();
        let mut lin = lins
            .get(&v.lineage)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("lineage {} of {group}/{disk}", v.lineage)))?;
        lin.has_head = false;
        let mut b = WriteBatch::default();
        b.delete(keys::volume(group, disk));
        b.put(keys::lineage(lin.id), encode_rec(&lin));
        self.db.write(b, true)?;
        // Its journal records stay void: replay drops blocks of removed volumes.
        self.release(self.overlay.remove_lineage(lin.id));
        lins.insert(lin.id, lin);
        Ok(())
    }

    // ---- points and clones ------------------------------------------------------

    /// Take a crash-consistent recovery point of every volume of `group` at once.
    pub fn create_point(&self, group: &str, app: bool, label: Option<String>) -> Result<PointRec> {
        self.create_point_staged(group, app, label, &[], None)
    }

    /// Apply a replication cycle and take its point, atomically: `staged` holds,
    /// per disk of `group`, the new map entries of its head (block index, value);
    /// they are written at the heads' current epochs in the same synced batch as
    /// the point, so readers see the cycle wholly or not at all, and a crash
    /// leaves neither.  Every chunk the entries name must be stored (and pinned
    /// by the caller until this returns).
    ///
    /// Errors: NotFound (group, a disk); Invalid (a block beyond its volume).
    pub fn create_point_staged(
        &self,
        group: &str,
        app: bool,
        label: Option<String>,
        staged: &[(String, Vec<(u64, MapVal)>)],
        origin: Option<Origin>,
    ) -> Result<PointRec> {
        let _m = self.meta.lock().unwrap();
        let g = self.group(group)?;
        if origin.is_some() && g.role != crate::engine::types::Role::Protected {
            // Checked under the catalog lock a failover takes too.
            return Err(Error::Refused(format!(
                "group {group} is {}: replication into it is refused",
                g.role
            )));
        }
        let vols = self.volumes(Some(group))?;
        let cs = self.chunk_size();
        for (disk, entries) in staged {
            let v = vols
                .iter()
                .find(|v| &v.disk == disk)
                .ok_or_else(|| Error::NotFound(format!("volume {group}/{disk}")))?;
            let blocks = v.size.div_ceil(cs);
            if let Some((b, _)) = entries.iter().find(|(b, _)| *b >= blocks) {
                return Err(Error::invalid(format!(
                    "block {b} is beyond the end of {group}/{disk} ({blocks} blocks)"
                )));
            }
        }
        let lineages: std::collections::HashSet<u64> = vols.iter().map(|v| v.lineage).collect();
        // Most of the group's overlay pages go to the map before the gate (so
        // writers wait only for what arrives meanwhile)...
        self.destage_keys(&self.overlay.keys_of(&lineages))?;
        crate::fail_point!("point-before-gate");
        // Quiesce writers: no write is half-way through while the epochs move.
        let g = self.gate.exclusive();
        // ...and the rest under it: every write acknowledged before the gate, small
        // or whole-block, is in the point; none acknowledged after it is.  (Issue 9
        // hypothesis 4: destaging only before the gate left small writes
        // acknowledged in between out of the point while later whole-block writes
        // were in it: not a prefix of what the writers had acknowledged.)
        for batch in self
            .overlay
            .keys_of(&lineages)
            .chunks(crate::engine::write::DESTAGE_BATCH)
        {
            self.destage_locked(batch, Access::Exclusive(&g))?;
        }
        // Everything acknowledged so far, in every group, becomes durable before
        // the point exists: a point is a FLUSH of the whole store too (the journal
        // as well as packs and WAL), which is what callers (and the power-loss
        // model) take it for.
        self.sync_journal()?;
        // ...and, being a FLUSH, moves every lineage with unflushed entries to a
        // new epoch (I11), not just the group's.
        self.make_durable_locked(&g)?;
        let mut lins = self.lineages.write().unwrap();
        let mut b = WriteBatch::default();
        let id = self.db.next_counter("point", &mut b)?;
        let mut pvs = Vec::with_capacity(vols.len());
        let mut updated = Vec::with_capacity(vols.len());
        for v in &vols {
            let mut lin = lins.get(&v.lineage).cloned().ok_or_else(|| {
                Error::NotFound(format!("lineage {} of {}/{}", v.lineage, v.group, v.disk))
            })?;
            if let Some((_, entries)) = staged.iter().find(|(d, _)| *d == v.disk) {
                for (block, val) in entries {
                    b.put(keys::map(lin.id, *block, lin.epoch), val.encode());
                }
            }
            pvs.push(PointVolume {
                disk: v.disk.clone(),
                lineage: lin.id,
                epoch: lin.epoch,
                size: v.size,
            });
            lin.epoch += 1;
            b.put(keys::lineage(lin.id), encode_rec(&lin));
            updated.push(lin);
        }
        let rec = PointRec {
            id,
            group: group.into(),
            // A replicated point keeps its source's time (never one in the future).
            time: origin
                .as_ref()
                .and_then(|o| o.time)
                .map_or_else(now_secs, |t| t.min(now_secs())),
            kind: if app {
                PointKind::App
            } else {
                PointKind::Crash
            },
            label,
            volumes: pvs,
            origin,
        };
        b.put(keys::point(group, id), encode_rec(&rec));
        self.db.write(b, true)?;
        for l in updated {
            lins.insert(l.id, l);
        }
        for (disk, entries) in staged {
            if let Some(v) = vols.iter().find(|v| &v.disk == disk) {
                for (block, _) in entries {
                    self.head_cache.invalidate((v.lineage, *block));
                }
            }
        }
        log::info!(
            "point {id} of group {group}: {} volume(s)",
            rec.volumes.len()
        );
        // An object store's catalog gets the point (still under the gate).
        drop(lins);
        self.checkpoint_after_point(g, &format!("point {id} of {group}"));
        Ok(rec)
    }

    /// Points of a group, oldest first.
    pub fn points(&self, group: &str) -> Result<Vec<PointRec>> {
        self.group(group)?;
        self.db
            .scan_prefix(&keys::point_prefix(group))?
            .iter()
            .map(|(k, v)| self.db.decode_rec(k, v))
            .collect()
    }

    /// Every point of every group.
    pub fn all_points(&self) -> Result<Vec<PointRec>> {
        self.db
            .scan_prefix(&[keys::POINT])?
            .iter()
            .map(|(k, v)| self.db.decode_rec(k, v))
            .collect()
    }

    /// Resolve `latest`, `latest-app` or a numeric id.
    pub fn point(&self, group: &str, spec: &str) -> Result<PointRec> {
        let pts = self.points(group)?;
        let found = match spec {
            "latest" => pts.last().cloned(),
            "latest-app" => pts.iter().rev().find(|p| p.kind == PointKind::App).cloned(),
            n => {
                let id: u64 = n.parse().map_err(|_| {
                    Error::invalid(format!(
                        "invalid point {n:?}: use a point id, latest or latest-app"
                    ))
                })?;
                pts.into_iter().find(|p| p.id == id)
            }
        };
        found.ok_or_else(|| Error::NotFound(format!("point {spec} of group {group}")))
    }

    /// Remove a recovery point.  Refused with [`Error::Busy`] while an NBD client
    /// or an open FUSE file reads it (its data would be collected under the reader).
    pub fn remove_point(&self, group: &str, spec: &str) -> Result<PointRec> {
        let _m = self.meta.lock().unwrap();
        let p = self.point(group, spec)?;
        let leases = self.leases.inner.lock().unwrap();
        for v in &p.volumes {
            if let Some(users) = leases.get(&(v.lineage, v.epoch)) {
                return Err(Error::Busy(format!(
                    "point {} of group {group} is in use by {} reader(s) ({}); disconnect them first",
                    p.id,
                    users.len(),
                    users.iter().map(|u| u.1.as_str()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let mut b = WriteBatch::default();
        b.delete(keys::point(group, p.id));
        self.db.write(b, true)?;
        Ok(p)
    }

    /// Mark `view` in use by `user` (an NBD connection, an open FUSE file) until
    /// the returned lease is dropped: removing the point or volume it shows is
    /// refused meanwhile.  Fails with NotFound if the view was removed since it
    /// was resolved.
    pub fn lease(&self, view: &View, user: &str) -> Result<Lease> {
        self.lease_if(view, user, |_| Ok(()))
    }

    /// [`Store::lease`], if `check` accepts the view's current users (given by
    /// name), atomically with taking it: two writers that each refuse the other
    /// (a replication session, an NBD client) cannot both get in.
    pub fn lease_if(
        &self,
        view: &View,
        user: &str,
        check: impl FnOnce(&[String]) -> Result<()>,
    ) -> Result<Lease> {
        let mut leases = self.leases.inner.lock().unwrap();
        let users: Vec<String> = leases
            .get(&(view.lineage, view.epoch))
            .map(|v| v.iter().map(|u| u.1.clone()).collect())
            .unwrap_or_default();
        check(&users)?;
        // Still there?  (Checked under the mutex removals hold.)
        let (g, d, p) = crate::util::parse_volume_ref(&view.name)?;
        let now = self.view(&g, &d, p.as_deref())?;
        if (now.lineage, now.epoch) != (view.lineage, view.epoch) {
            return Err(Error::NotFound(format!(
                "{} (removed while being opened)",
                view.name
            )));
        }
        let key = (view.lineage, view.epoch);
        let id = self
            .leases
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        leases.entry(key).or_default().push((id, user.to_string()));
        Ok(Lease {
            leases: self.leases.clone(),
            key,
            id,
        })
    }

    /// Users of a view's lease (for listings and tests).
    pub fn lease_users(&self, view: &View) -> Vec<String> {
        self.leases
            .inner
            .lock()
            .unwrap()
            .get(&(view.lineage, view.epoch))
            .map(|v| v.iter().map(|u| u.1.clone()).collect())
            .unwrap_or_default()
    }

    /// Make a writable volume from a point, in constant time.
    pub fn clone_volume(
        &self,
        src_group: &str,
        src_disk: &str,
        point: &str,
        dst_group: &str,
        dst_disk: &str,
    ) -> Result<VolumeRec> {
        let _m = self.meta.lock().unwrap();
        let p = self.point(src_group, point)?;
        let pv = p
            .volumes
            .iter()
            .find(|v| v.disk == src_disk)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "disk {src_disk} in point {} of group {src_group}",
                    p.id
                ))
            })?;
        let _g = self.gate.exclusive();
        self.add_volume(dst_group, dst_disk, pv.size, Some((pv.lineage, pv.epoch)))
    }

    // ---- views ------------------------------------------------------------------

    /// Resolve `GROUP/DISK` (head) or `GROUP/DISK@POINT` (read-only point).
    pub fn view(&self, group: &str, disk: &str, point: Option<&str>) -> Result<View> {
        match point {
            None => {
                let v = self.volume(group, disk)?;
                Ok(View {
                    name: format!("{group}/{disk}"),
                    lineage: v.lineage,
                    epoch: HEAD_EPOCH,
                    size: v.size,
                    writable: true,
                })
            }
            Some(spec) => {
                let p = self.point(group, spec)?;
                let pv = p.volumes.iter().find(|v| v.disk == disk).ok_or_else(|| {
                    Error::NotFound(format!("disk {disk} in point {} of group {group}", p.id))
                })?;
                Ok(View {
                    name: format!("{group}/{disk}@{}", p.id),
                    lineage: pv.lineage,
                    epoch: pv.epoch,
                    size: pv.size,
                    writable: false,
                })
            }
        }
    }

    /// Resolve `GROUP/DISK[@POINT]`.
    pub fn view_ref(&self, r: &str) -> Result<View> {
        let (g, d, p) = crate::util::parse_volume_ref(r)?;
        self.view(&g, &d, p.as_deref())
    }

    /// A head view's size may have grown since it was resolved.
    pub fn refresh(&self, view: &View) -> Result<View> {
        if view.epoch != HEAD_EPOCH {
            return Ok(view.clone());
        }
        let (g, d) = view.name.split_once('/').unwrap_or((&view.name, ""));
        self.view(g, d, None)
    }

    pub fn lineage(&self, id: u64) -> Option<LineageRec> {
        self.lineages.read().unwrap().get(&id).cloned()
    }

    pub(crate) fn lineage_map(&self) -> HashMap<u64, LineageRec> {
        self.lineages.read().unwrap().clone()
    }

    pub(crate) fn remove_lineage(&self, id: u64, batch: &mut WriteBatch) {
        batch.delete(keys::lineage(id));
        self.lineages.write().unwrap().remove(&id);
    }
}
