//! Import and export of raw images, sparse-aware both ways.
//!
//! Import asks the file system for data and hole extents (`SEEK_DATA`/`SEEK_HOLE`),
//! reads only the data, and zeroes holes in the volume (free when they are already
//! holes).  Export writes only blocks that hold data into a file sized to the
//! volume, so holes stay holes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use indicatif::ProgressBar;
use serde::Serialize;

use crate::engine::store::{Block, Store, View};
use crate::error::{Error, IoContext, Result};

/// Bytes read and written per step.
const STEP: u64 = 8 << 20;

#[derive(Debug, Serialize)]
pub struct TransferReport {
    pub bytes: u64,
    pub data_bytes: u64,
    pub hole_bytes: u64,
}

/// Data extents of a file as (offset, len), by SEEK_DATA/SEEK_HOLE.
pub fn data_extents(f: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        // SAFETY: lseek on a valid fd has no memory effects.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no more data
            }
            // SEEK_DATA unsupported: treat everything as data.
            return vec![(0, len)];
        }
        let data = data as u64;
        if data >= len {
            break;
        }
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            len
        } else {
            (hole as u64).min(len)
        };
        out.push((data, hole - data));
        pos = hole;
    }
    out
}

pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Import a raw image into a head.
pub fn import(store: &Store, view: &View, path: &Path, pb: &ProgressBar) -> Result<TransferReport> {
    if !view.writable {
        return Err(Error::ReadOnly(format!("recovery point {}", view.name)));
    }
    let f = File::open(path).at(path)?;
    let meta = f.metadata().at(path)?;
    let kind = meta.file_type();
    if !kind.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&kind) {
        return Err(Error::invalid(format!(
            "image {} is not a regular file or block device",
            path.display()
        )));
    }
    let len = if kind.is_file() {
        meta.len()
    } else {
        // Block devices report their size by seeking to the end.
        use std::io::Seek;
        let mut g = &f;
        g.seek(std::io::SeekFrom::End(0)).at(path)?
    };
    if len > view.size {
        return Err(Error::invalid(format!(
            "image {} is {len} bytes but volume {} is only {} bytes; grow the volume first",
            path.display(),
            view.name,
            view.size
        )));
    }
    let cs = store.chunk_size();
    let extents = if meta.file_type().is_file() {
        data_extents(&f, len)
    } else {
        vec![(0, len)]
    };
    pb.set_length(len);
    let mut rep = TransferReport {
        bytes: len,
        data_bytes: 0,
        hole_bytes: 0,
    };
    let mut buf = vec![0u8; STEP as usize];
    let mut pos = 0u64; // everything below pos is done
    for (doff, dlen) in extents {
        // Align data extents outward to chunk boundaries so whole chunks are written.
        let start = (doff / cs * cs).max(pos);
        let end = ((doff + dlen).div_ceil(cs) * cs).min(len);
        if start > pos {
            store.zero(view, pos, start - pos)?;
            rep.hole_bytes += start - pos;
        }
        let mut off = start;
        while off < end {
            let n = (end - off).min(STEP) as usize;
            f.read_exact_at(&mut buf[..n], off).at(path)?;
            store.write(view, off, &buf[..n])?;
            off += n as u64;
            rep.data_bytes += n as u64;
            pb.set_position(off);
        }
        pos = pos.max(end);
    }
    if pos < view.size {
        // The image ends (or has a trailing hole) before the volume does.
        let mut off = pos;
        while off < view.size {
            let n = (view.size - off).min(1 << 30);
            store.zero(view, off, n)?;
            off += n;
        }
        rep.hole_bytes += len.saturating_sub(pos);
    }
    pb.finish_and_clear();
    Ok(rep)
}

/// Export a head or point to a sparse raw file (created or truncated).
pub fn export(store: &Store, view: &View, path: &Path, pb: &ProgressBar) -> Result<TransferReport> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .at(path)?;
    f.set_len(view.size).at(path)?;
    // Partially written blocks still in the write-back overlay go to the map first.
    store.destage(None)?;
    let cs = store.chunk_size();
    let blocks = view.size.div_ceil(cs);
    pb.set_length(view.size);
    let mut rep = TransferReport {
        bytes: view.size,
        data_bytes: 0,
        hole_bytes: 0,
    };
    let mut b = 0u64;
    while b < blocks {
        let n = (blocks - b).min(STEP / cs);
        let res = store.resolve(view.lineage, view.epoch, b, n)?;
        for (i, blk) in res.iter().enumerate() {
            let off = (b + i as u64) * cs;
            let len = cs.min(view.size - off) as usize;
            match blk {
                Block::Data(id) => {
                    let data = store.chunks.get_with(id, false)?;
                    f.write_all_at(&data[..len], off).at(path)?;
                    rep.data_bytes += len as u64;
                }
                _ => rep.hole_bytes += len as u64,
            }
        }
        b += n;
        pb.set_position((b * cs).min(view.size));
    }
    f.sync_all().at(path)?;
    pb.finish_and_clear();
    Ok(rep)
}
