//! Head remapping for failover, and the record tables the DR layer keeps in the
//! metadata database (docs/DESIGN.md §17).
//!
//! A volume's name (`GROUP/DISK`) points at one lineage, its head.  Failover
//! gives the names of a whole group to new heads cloned from a recovery point, in
//! one synced batch, so the group is either wholly failed over or not at all; the
//! replica heads stay, under no name, until `--undo` gives the names back or
//! `--commit` retires them.  Nothing is copied: a clone is a new lineage whose
//! parent is (point lineage, point epoch), so the time is constant in disk size.
//!
//! A lineage that loses its name is *retired*: recorded in the group, then
//! dropped (its head removed, its data left to GC) once no NBD client or FUSE
//! file holds it.  The caller disconnects the clients between the swap and
//! [`Store::drop_retired`]; a crash in between leaves the lineage recorded, and
//! the next [`Store::drop_retired`] finishes the job.

use rocksdb::WriteBatch;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::engine::keys;
use crate::engine::meta::{encode_rec, GroupRec, LineageRec, PointRec, Replica, VolumeRec};
use crate::engine::store::{Store, HEAD_EPOCH};
use crate::engine::types::Role;
use crate::error::{Error, Result};

/// What a role change did.
#[derive(Debug, Clone)]
pub struct HeadSwap {
    /// The group after the change (new role and fencing epoch).
    pub group: GroupRec,
    /// The point the names now serve (failover and change of point).
    pub point: Option<PointRec>,
    /// The group's volumes after the change, in disk order.
    pub volumes: Vec<VolumeRec>,
    /// Lineages that lost their names and await [`Store::drop_retired`].
    pub retired: Vec<u64>,
}

impl Store {
    // ---- record tables (drills, audit) ------------------------------------------

    /// Store `rec` as record `id` of `table` ([`keys::DRILL`], [`keys::AUDIT`]),
    /// synced.
    pub fn put_record<T: Serialize>(&self, table: u8, id: u64, rec: &T) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put(keys::record(table, id), encode_rec(rec));
        self.db.write(b, true)
    }

    /// Record `id` of `table`, if present.
    pub fn record<T: DeserializeOwned>(&self, table: u8, id: u64) -> Result<Option<T>> {
        self.db.get_rec(&keys::record(table, id))
    }

    /// Every record of `table`, in id order.
    pub fn records<T: DeserializeOwned>(&self, table: u8) -> Result<Vec<(u64, T)>> {
        self.db
            .scan_prefix(&[table])?
            .iter()
            .map(|(k, v)| {
                let id = u64::from_be_bytes(k[1..9].try_into().map_err(|_| {
                    Error::invalid(format!("malformed record key in table {}", table as char))
                })?);
                Ok((id, self.db.decode_rec(k, v)?))
            })
            .collect()
    }

    /// Delete record `id` of `table` (absent is fine).
    pub fn delete_record(&self, table: u8, id: u64) -> Result<()> {
        let mut b = WriteBatch::default();
        b.delete(keys::record(table, id));
        self.db.write(b, true)
    }

    /// A new id from the named counter (drill ids, audit sequence), durable.
    pub fn next_id(&self, counter: &str) -> Result<u64> {
        let _m = self.meta.lock().unwrap();
        let mut b = WriteBatch::default();
        let id = self.db.next_counter(counter, &mut b)?;
        self.db.write(b, true)?;
        Ok(id)
    }

    // ---- groups -------------------------------------------------------------------

    /// Remove an empty group (no volumes).  Its points go with it: a point of a
    /// group without volumes can only hold volumes that were removed.
    ///
    /// Errors: NotFound; [`Error::Busy`] if it still has volumes.
    pub fn remove_group(&self, group: &str) -> Result<()> {
        let _m = self.meta.lock().unwrap();
        self.group(group)?;
        let vols = self.volumes(Some(group))?;
        if !vols.is_empty() {
            return Err(Error::Busy(format!(
                "group {group} still has {} volume(s); remove them first",
                vols.len()
            )));
        }
        let mut b = WriteBatch::default();
        for p in self.points(group)? {
            b.delete(keys::point(group, p.id));
        }
        b.delete(keys::group(group));
        self.db.write(b, true)
    }

    // ---- failover -----------------------------------------------------------------

    /// Fail `group` over to `point` (`latest`, `latest-app` or an id): every
    /// volume's name moves to a new writable head cloned from the point, in one
    /// synced batch.  On a protected group the replica heads are kept for
    /// `--undo`; on a failed-over group this changes the point, and the previous
    /// failover heads are retired.  Raises the group's fencing epoch.
    ///
    /// Errors: NotFound (group, point); [`Error::Refused`] for a committed
    /// group, or when a volume of the group is missing from the point (added
    /// after it).
    pub fn failover_heads(&self, group: &str, point: &str) -> Result<HeadSwap> {
        self.heads_from_point(group, point, false)
    }

    /// Roll a protected group's heads back to `point` (failback, when this
    /// site wrote after the newest point the two sites share): every volume's
    /// name moves to a new head cloned from the point, in one synced batch; the
    /// old heads are retired (keep their data in a point first).  The role
    /// stays; the fencing epoch rises.
    ///
    /// Errors: NotFound (group, point); [`Error::Refused`] unless the group is
    /// protected, or when a volume is missing from the point.
    pub fn rollback_heads(&self, group: &str, point: &str) -> Result<HeadSwap> {
        self.heads_from_point(group, point, true)
    }

    /// Failback's end on the site that served the group while it was failed
    /// over: its current heads (failover heads) stay the heads, the replica
    /// heads are retired, and the group becomes protected again, a replica of
    /// the site it failed back to.  Raises the fencing epoch.
    ///
    /// Errors: NotFound; [`Error::Refused`] if the group is already protected.
    pub fn reprotect_heads(&self, group: &str) -> Result<HeadSwap> {
        if self.group(group)?.role == Role::FailedOver {
            self.commit_failover_heads(group)?;
        }
        let _m = self.meta.lock().unwrap();
        let mut g = self.group(group)?;
        if g.role != Role::Committed {
            return Err(Error::Refused(format!(
                "group {group} is {}: only a failed-over or committed group fails back",
                g.role
            )));
        }
        g.role = Role::Protected;
        g.epoch += 1;
        let mut b = WriteBatch::default();
        b.put(keys::group(group), encode_rec(&g));
        self.db.write(b, true)?;
        log::info!(
            "group {group}: protected again after failback (fencing epoch {})",
            g.epoch
        );
        Ok(HeadSwap {
            volumes: self.volumes(Some(group))?,
            group: g,
            point: None,
            retired: Vec::new(),
        })
    }

    /// Move every name of `group` to a new head cloned from `point`: a
    /// failover (keeps the replica heads, role failed-over) or, with
    /// `rollback`, a rollback of a protected group (retires the old heads,
    /// role unchanged).
    fn heads_from_point(&self, group: &str, point: &str, rollback: bool) -> Result<HeadSwap> {
        let _m = self.meta.lock().unwrap();
        let mut g = self.group(group)?;
        if rollback && g.role != Role::Protected {
            return Err(Error::Refused(format!(
                "group {group} is {}: only a protected group's heads roll back to a point",
                g.role
            )));
        }
        if g.role == Role::Committed {
            return Err(Error::Refused(format!(
                "group {group} is committed (its failover heads are its heads now); \
                 there is no failover to change"
            )));
        }
        let p = self.point(group, point)?;
        let vols = self.volumes(Some(group))?;
        for v in &vols {
            if !p.volumes.iter().any(|pv| pv.disk == v.disk) {
                return Err(Error::Refused(format!(
                    "volume {group}/{} is not in point {} (it was created after the point); \
                     choose a later point",
                    v.disk, p.id
                )));
            }
        }
        let _g = self.gate.exclusive();
        let mut b = WriteBatch::default();
        let mut lins = Vec::new();
        let mut out = Vec::new();
        let mut retired = Vec::new();
        // One counter read for all the new heads (see `Db::next_counters`).
        let first = self
            .db
            .next_counters("lineage", vols.len() as u64, &mut b)?;
        for (i, mut v) in vols.into_iter().enumerate() {
            let pv = p.volumes.iter().find(|pv| pv.disk == v.disk).unwrap();
            let lin = LineageRec {
                id: first + i as u64,
                epoch: 1,
                parent: Some((pv.lineage, pv.epoch)),
                has_head: true,
            };
            b.put(keys::lineage(lin.id), encode_rec(&lin));
            match v.replica {
                // Changing the point (or a rollback): the current head goes.
                _ if rollback => retired.push(v.lineage),
                Some(_) => retired.push(v.lineage),
                None => {
                    v.replica = Some(Replica {
                        lineage: v.lineage,
                        size: v.size,
                    })
                }
            }
            v.lineage = lin.id;
            // The point's size: the failover head is the disk as it was then.
            v.size = pv.size;
            b.put(keys::volume(group, &v.disk), encode_rec(&v));
            lins.push(lin);
            out.push(v);
        }
        if !rollback {
            g.role = Role::FailedOver;
        }
        g.epoch += 1;
        g.retired.extend(&retired);
        b.put(keys::group(group), encode_rec(&g));
        self.db.write(b, true)?;
        let mut map = self.lineages.write().unwrap();
        for l in lins {
            map.insert(l.id, l);
        }
        log::info!(
            "group {group}: {} point {} (fencing epoch {})",
            if rollback {
                "heads rolled back to"
            } else {
                "failed over to"
            },
            p.id,
            g.epoch
        );
        Ok(HeadSwap {
            group: g,
            point: Some(p),
            volumes: out,
            retired,
        })
    }

    /// Roll a failover back before it is committed: the names return to the
    /// replica heads, exactly as they were, and the failover heads are retired.
    ///
    /// Errors: NotFound; [`Error::Refused`] unless the group is failed over.
    pub fn undo_failover_heads(&self, group: &str) -> Result<HeadSwap> {
        self.end_failover(group, false)
    }

    /// Keep the failover heads as the group's heads; the replica heads are
    /// retired.
    ///
    /// Errors: NotFound; [`Error::Refused`] unless the group is failed over.
    pub fn commit_failover_heads(&self, group: &str) -> Result<HeadSwap> {
        self.end_failover(group, true)
    }

    fn end_failover(&self, group: &str, commit: bool) -> Result<HeadSwap> {
        let _m = self.meta.lock().unwrap();
        let mut g = self.group(group)?;
        if g.role != Role::FailedOver {
            return Err(Error::Refused(format!(
                "group {group} is {}, not failed over: nothing to {}",
                g.role,
                if commit { "commit" } else { "undo" }
            )));
        }
        let vols = self.volumes(Some(group))?;
        let _g = self.gate.exclusive();
        let mut b = WriteBatch::default();
        let mut out = Vec::new();
        let mut retired = Vec::new();
        for mut v in vols {
            let Some(replica) = v.replica.take() else {
                // Created while failed over: it has no replica to return to.
                out.push(v);
                continue;
            };
            if commit {
                retired.push(replica.lineage);
            } else {
                retired.push(v.lineage);
                v.lineage = replica.lineage;
                v.size = replica.size;
            }
            b.put(keys::volume(group, &v.disk), encode_rec(&v));
            out.push(v);
        }
        g.role = if commit {
            Role::Committed
        } else {
            Role::Protected
        };
        g.epoch += 1;
        g.retired.extend(&retired);
        b.put(keys::group(group), encode_rec(&g));
        self.db.write(b, true)?;
        log::info!(
            "group {group}: failover {} (fencing epoch {})",
            if commit { "committed" } else { "undone" },
            g.epoch
        );
        Ok(HeadSwap {
            group: g,
            point: None,
            volumes: out,
            retired,
        })
    }

    /// Drop the retired lineages of `group` that no NBD client or FUSE file
    /// holds any more: each loses its head (its data is GC's once no point or
    /// clone needs it).  Returns the lineages still held.
    pub fn drop_retired(&self, group: &str) -> Result<Vec<u64>> {
        let _m = self.meta.lock().unwrap();
        let mut g = self.group(group)?;
        if g.retired.is_empty() {
            return Ok(Vec::new());
        }
        let leases = self.leases.inner.lock().unwrap();
        let (held, free): (Vec<u64>, Vec<u64>) = g
            .retired
            .iter()
            .partition(|l| leases.contains_key(&(**l, HEAD_EPOCH)));
        drop(leases);
        let _g = self.gate.exclusive();
        let mut lins = self.lineages.write().unwrap();
        let mut b = WriteBatch::default();
        let mut updated = Vec::new();
        for id in &free {
            if let Some(l) = lins.get(id) {
                let mut l = l.clone();
                l.has_head = false;
                b.put(keys::lineage(l.id), encode_rec(&l));
                updated.push(l);
            }
        }
        g.retired = held.clone();
        b.put(keys::group(group), encode_rec(&g));
        self.db.write(b, true)?;
        for l in updated {
            self.release(self.overlay.remove_lineage(l.id));
            lins.insert(l.id, l);
        }
        if !held.is_empty() {
            log::warn!(
                "group {group}: {} retired head(s) still in use; dropped when released",
                held.len()
            );
        }
        Ok(held)
    }
}
