//! Fixed-size versus content-defined (FastCDC) chunking on real disk images.
//!
//! `scripts/bench-cdc.sh` builds the images (ext4 file systems of two debootstrap
//! trees, the first tree re-imaged, and the first image shifted by 63 sectors) and
//! runs this with `DRCLONE_CDC_DIR` pointing at them.  For each pair it prints the
//! bytes each scheme would store (distinct non-zero chunks) and the chunking speed.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

const AVG: usize = 64 << 10;

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Chunk boundaries of `data`: fixed 64 KiB or FastCDC (16K/64K/256K).
fn chunks(data: &[u8], cdc: bool) -> Vec<(usize, usize)> {
    if cdc {
        fastcdc::v2020::FastCDC::new(data, (AVG / 4) as u32, AVG as u32, (AVG * 4) as u32)
            .map(|c| (c.offset, c.length))
            .collect()
    } else {
        (0..data.len())
            .step_by(AVG)
            .map(|o| (o, AVG.min(data.len() - o)))
            .collect()
    }
}

/// Add an image's chunks to `seen`; returns (new stored bytes, non-zero bytes).
fn ingest(data: &[u8], cdc: bool, seen: &mut HashSet<[u8; 32]>) -> (u64, u64) {
    let mut new = 0;
    let mut nonzero = 0;
    for (o, l) in chunks(data, cdc) {
        let c = &data[o..o + l];
        if is_zero(c) {
            continue;
        }
        nonzero += l as u64;
        if seen.insert(*blake3::hash(c).as_bytes()) {
            new += l as u64;
        }
    }
    (new, nonzero)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(dir) = std::env::var_os("DRCLONE_CDC_DIR") else {
        println!("cdc bench: set DRCLONE_CDC_DIR (scripts/bench-cdc.sh builds the images)");
        return;
    };
    let dir = Path::new(&dir);
    let load = |n: &str| std::fs::read(dir.join(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
    let a = load("treeA.img");
    let pairs = [
        ("treeA + treeB (different trees)", "treeB.img"),
        ("treeA + treeA re-imaged (new layout)", "treeA2.img"),
        ("treeA + treeA shifted 32256 bytes", "treeA-shift.img"),
    ];
    println!(
        "{:<40} {:>14} {:>14} {:>14} {:>14}",
        "case", "fixed MiB", "fastcdc MiB", "fixed saved", "cdc saved"
    );
    for cdc in [false, true] {
        let t = Instant::now();
        let n = chunks(&a, cdc).len();
        let mbs = a.len() as f64 / t.elapsed().as_secs_f64() / 1e6;
        println!(
            "# {} chunking: {n} chunks, {mbs:.0} MB/s (boundaries only)",
            if cdc { "fastcdc" } else { "fixed" }
        );
    }
    for (name, second) in pairs {
        let b = load(second);
        let mut res = vec![];
        for cdc in [false, true] {
            let mut seen = HashSet::new();
            let (na, za) = ingest(&a, cdc, &mut seen);
            let (nb, zb) = ingest(&b, cdc, &mut seen);
            let stored = na + nb;
            let nonzero = za + zb;
            res.push((stored, 1.0 - stored as f64 / nonzero as f64));
        }
        println!(
            "{name:<40} {:>14.1} {:>14.1} {:>13.1}% {:>13.1}%",
            res[0].0 as f64 / 1048576.0,
            res[1].0 as f64 / 1048576.0,
            res[0].1 * 100.0,
            res[1].1 * 100.0
        );
    }
}
