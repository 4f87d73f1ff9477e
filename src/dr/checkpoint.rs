//! Continuous-protection checkpoints (`group set --checkpoint-interval`): the
//! daemon takes a crash-consistent point of each such group on its interval.
//! With qemu mirroring every guest write into the group's heads
//! (`blockdev-mirror copy-mode=write-blocking`, which acknowledges a guest
//! write only once drclone has it), a point that holds a write on one disk
//! holds every write acknowledged earlier on any disk of the group:
//! write-order fidelity.  Once READY qemu forwards neither FLUSH nor FUA, so the
//! point itself is the durability boundary (a point create is a FLUSH of the
//! whole store).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::Store;

/// When each group's last checkpoint was taken (the daemon's clock).
#[derive(Default)]
pub struct Checkpoints {
    last: HashMap<String, Instant>,
    /// When the group list was last read.
    read: Option<Instant>,
    due: Vec<(String, Duration)>,
}

impl Checkpoints {
    /// Take the points that are due at `now`.  Failures are logged (a point of
    /// a group being removed, a latched store) and retried next interval.
    pub fn tick(&mut self, store: &Store, now: Instant) {
        if self
            .read
            .is_none_or(|r| now.duration_since(r) >= Duration::from_secs(1))
        {
            self.read = Some(now);
            self.due = match store.groups() {
                Ok(gs) => gs
                    .into_iter()
                    .filter_map(|g| {
                        g.checkpoint_interval
                            .map(|s| (g.name, Duration::from_secs(s)))
                    })
                    .collect(),
                Err(e) => {
                    log::warn!("checkpoints: {e}");
                    return;
                }
            };
        }
        for (g, every) in &self.due {
            let last = *self.last.entry(g.clone()).or_insert(now);
            if now.duration_since(last) < *every {
                continue;
            }
            self.last.insert(g.clone(), now);
            match store.create_point(g, false, Some("checkpoint".into())) {
                Ok(p) => log::debug!("checkpoint: point {} of {g}", p.id),
                Err(e) => log::warn!("checkpoint of {g}: {e}"),
            }
        }
    }
}
