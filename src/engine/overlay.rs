//! The write-back overlay: pages of partly written blocks of heads, in memory.
//!
//! A write that covers a whole block goes straight to the chunk store and the map.
//! A smaller one lands here as whole pages (`min(4 KiB, chunk size)`; the edges of
//! an unaligned write are filled from the current content first), is appended to
//! the [`crate::engine::journal::Journal`] and acknowledged.  Nothing is read, hashed or
//! compressed on that path.  Later the store *destages* a block: base content plus
//! its pages become one chunk and one map entry.  Entries are destaged oldest
//! first, which lets many writes to one block share one destage and lets the
//! journal's tail advance.
//!
//! This module only keeps the pages and their order; the store decides when to
//! destage and holds the per-block lock that orders writers of one block.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// (lineage, block)
pub type Key = (u64, u64);

struct Page {
    data: Box<[u8]>,
    /// Journal segment holding this page's latest record.
    segment: u64,
}

struct Entry {
    /// Creation order: the oldest entries destage first.
    seq: u64,
    pages: Vec<Option<Page>>,
    present: usize,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Key, Entry>,
    order: BTreeMap<u64, Key>,
    next_seq: u64,
}

/// Pages of one read range, copied out of the overlay: see [`Overlay::snapshot`].
#[derive(Default)]
pub struct Snapshot {
    /// (offset in the read buffer, bytes)
    pub pieces: Vec<(usize, Vec<u8>)>,
    /// Blocks the overlay covers completely: no need to read their base.
    pub full: Vec<u64>,
}

pub struct Overlay {
    page: usize,
    per_block: usize,
    inner: Mutex<Inner>,
    bytes: AtomicUsize,
}

/// What a removal releases in the journal: (segment, pages) pairs.
pub type Released = Vec<(u64, usize)>;

fn released(e: Entry) -> Released {
    let mut by_seg: BTreeMap<u64, usize> = BTreeMap::new();
    for p in e.pages.into_iter().flatten() {
        *by_seg.entry(p.segment).or_default() += 1;
    }
    by_seg.into_iter().collect()
}

impl Overlay {
    pub fn new(chunk_size: usize) -> Overlay {
        let page = chunk_size.min(4096);
        Overlay {
            page,
            per_block: chunk_size / page,
            inner: Mutex::new(Inner::default()),
            bytes: AtomicUsize::new(0),
        }
    }

    pub fn page_size(&self) -> usize {
        self.page
    }

    /// Bytes of page data held.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.bytes() == 0
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().map.len()
    }

    pub fn contains(&self, key: Key) -> bool {
        !self.is_empty() && self.inner.lock().unwrap().map.contains_key(&key)
    }

    /// Copy page `index` of `key` into `dst` if the overlay has it.
    pub fn read_page(&self, key: Key, index: usize, dst: &mut [u8]) -> bool {
        if self.is_empty() {
            return false;
        }
        let g = self.inner.lock().unwrap();
        match g.map.get(&key).and_then(|e| e.pages[index].as_ref()) {
            Some(p) => {
                dst.copy_from_slice(&p.data);
                true
            }
            None => false,
        }
    }

    /// Store whole pages at byte `offset` (page-aligned) of a block; `data` is a
    /// multiple of the page size and was journaled to `segment`.  Returns what the
    /// pages it replaces release in the journal.
    pub fn put(&self, key: Key, offset: usize, data: &[u8], segment: u64) -> Released {
        debug_assert!(offset % self.page == 0 && data.len() % self.page == 0);
        let mut g = self.inner.lock().unwrap();
        let g = &mut *g;
        let per_block = self.per_block;
        let e = g.map.entry(key).or_insert_with(|| {
            let seq = g.next_seq;
            g.next_seq += 1;
            g.order.insert(seq, key);
            Entry {
                seq,
                pages: (0..per_block).map(|_| None).collect(),
                present: 0,
            }
        });
        let mut rel: BTreeMap<u64, usize> = BTreeMap::new();
        let mut added = 0usize;
        for (i, chunk) in data.chunks(self.page).enumerate() {
            let slot = &mut e.pages[offset / self.page + i];
            match slot {
                Some(p) => {
                    *rel.entry(p.segment).or_default() += 1;
                    p.data.copy_from_slice(chunk);
                    p.segment = segment;
                }
                None => {
                    *slot = Some(Page {
                        data: chunk.into(),
                        segment,
                    });
                    e.present += 1;
                    added += 1;
                }
            }
        }
        self.bytes.fetch_add(added * self.page, Ordering::Relaxed);
        rel.into_iter().collect()
    }

    /// Copy out the pages a read of `len` bytes at byte `offset` of the volume
    /// touches (blocks `first..first + count` of `lineage`).
    /// Blocks `first..=last` of `lineage` that hold pages (block status asks this
    /// before it resolves the map).
    pub fn blocks_in(&self, lineage: u64, first: u64, last: u64) -> std::collections::HashSet<u64> {
        let g = self.inner.lock().unwrap();
        if g.map.is_empty() {
            return Default::default();
        }
        if last - first >= g.map.len() as u64 {
            g.map
                .keys()
                .filter(|(l, b)| *l == lineage && (first..=last).contains(b))
                .map(|k| k.1)
                .collect()
        } else {
            (first..=last)
                .filter(|b| g.map.contains_key(&(lineage, *b)))
                .collect()
        }
    }

    /// Every block of the given lineages that holds pages, oldest first (a point
    /// destages exactly these under the gate).
    pub fn keys_of(&self, lineages: &std::collections::HashSet<u64>) -> Vec<Key> {
        let g = self.inner.lock().unwrap();
        g.order
            .values()
            .filter(|k| lineages.contains(&k.0))
            .copied()
            .collect()
    }

    pub fn snapshot(&self, lineage: u64, offset: u64, len: usize, cs: u64) -> Snapshot {
        let mut s = Snapshot::default();
        if self.is_empty() || len == 0 {
            return s;
        }
        let first = offset / cs;
        let last = (offset + len as u64 - 1) / cs;
        let g = self.inner.lock().unwrap();
        if g.map.is_empty() {
            return s;
        }
        let end = offset + len as u64;
        for b in first..=last {
            let Some(e) = g.map.get(&(lineage, b)) else {
                continue;
            };
            let bstart = b * cs;
            if e.present == self.per_block {
                s.full.push(b);
            }
            for (i, p) in e.pages.iter().enumerate() {
                let Some(p) = p else { continue };
                let ps = bstart + (i * self.page) as u64;
                let pe = ps + self.page as u64;
                let (lo, hi) = (ps.max(offset), pe.min(end));
                if lo >= hi {
                    continue;
                }
                s.pieces.push((
                    (lo - offset) as usize,
                    p.data[(lo - ps) as usize..(hi - ps) as usize].to_vec(),
                ));
            }
        }
        s
    }

    /// Pages present in `key`'s entry (`None`: no entry).
    pub fn coverage(&self, key: Key) -> Option<usize> {
        if self.is_empty() {
            return None;
        }
        self.inner.lock().unwrap().map.get(&key).map(|e| e.present)
    }

    /// Pages per block: `coverage` equal to this means the block is complete.
    pub fn pages_per_block(&self) -> usize {
        self.per_block
    }

    /// Copy `key`'s pages over `block` (the block's base content).
    pub fn merge_into(&self, key: Key, block: &mut [u8]) -> bool {
        let g = self.inner.lock().unwrap();
        let Some(e) = g.map.get(&key) else {
            return false;
        };
        for (i, p) in e.pages.iter().enumerate() {
            if let Some(p) = p {
                block[i * self.page..(i + 1) * self.page].copy_from_slice(&p.data);
            }
        }
        true
    }

    /// Drop `key`'s entry; returns what it releases in the journal.
    pub fn remove(&self, key: Key) -> Option<Released> {
        let mut g = self.inner.lock().unwrap();
        let e = g.map.remove(&key)?;
        g.order.remove(&e.seq);
        self.bytes
            .fetch_sub(e.present * self.page, Ordering::Relaxed);
        Some(released(e))
    }

    /// Drop every entry of a lineage (its volume was removed).
    pub fn remove_lineage(&self, lineage: u64) -> Released {
        let keys: Vec<Key> = {
            let g = self.inner.lock().unwrap();
            g.map.keys().filter(|k| k.0 == lineage).copied().collect()
        };
        keys.into_iter()
            .filter_map(|k| self.remove(k))
            .flatten()
            .collect()
    }

    /// Up to `n` keys, oldest first (`usize::MAX`: all).
    pub fn oldest(&self, n: usize) -> Vec<Key> {
        let g = self.inner.lock().unwrap();
        g.order.values().take(n).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_merge_snapshot_and_release() {
        let o = Overlay::new(16384); // 4 pages of 4 KiB
        assert!(o.is_empty());
        let rel = o.put((1, 2), 4096, &[7u8; 8192], 10);
        assert!(rel.is_empty());
        assert_eq!(o.bytes(), 8192);
        assert_eq!(o.coverage((1, 2)), Some(2));
        // Overwrite one page from a newer segment: it releases the older record.
        assert_eq!(o.put((1, 2), 4096, &[8u8; 4096], 11), vec![(10, 1)]);
        assert_eq!(o.bytes(), 8192);
        // A read across the block boundary sees the pages at the right offsets.
        let s = o.snapshot(1, 2 * 16384 + 4000, 8192, 16384);
        assert!(s.full.is_empty());
        assert_eq!(s.pieces.len(), 2);
        assert_eq!(s.pieces[0].0, 96);
        assert_eq!(s.pieces[0].1, vec![8u8; 4096]);
        assert_eq!(s.pieces[1], (4096 + 96, vec![7u8; 4000]));
        let mut base = vec![1u8; 16384];
        assert!(o.merge_into((1, 2), &mut base));
        assert_eq!(&base[..4096], &[1u8; 4096][..]);
        assert_eq!(&base[4096..8192], &[8u8; 4096][..]);
        assert_eq!(&base[12288..], &[1u8; 4096][..]);
        o.put((1, 3), 0, &[3u8; 16384], 12);
        assert_eq!(o.snapshot(1, 3 * 16384, 10, 16384).full, vec![3]);
        assert_eq!(o.oldest(usize::MAX), vec![(1, 2), (1, 3)]);
        let mut rel = o.remove((1, 2)).unwrap();
        rel.sort();
        assert_eq!(rel, vec![(10, 1), (11, 1)]);
        assert_eq!(o.remove_lineage(1), vec![(12, 4)]);
        assert!(o.is_empty());
        assert_eq!(o.len(), 0);
    }
}
