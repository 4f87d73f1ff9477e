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

#[derive(Clone, Copy)]
enum Scheme {
    Fixed(usize),
    Cdc,
}

const SCHEMES: [(Scheme, &str); 3] = [
    (Scheme::Fixed(AVG), "fixed 64K"),
    (Scheme::Fixed(4096), "fixed 4K"),
    (Scheme::Cdc, "fastcdc 16K/64K/256K"),
];

/// Chunk boundaries of `data`.
fn chunks(data: &[u8], scheme: Scheme) -> Vec<(usize, usize)> {
    match scheme {
        Scheme::Cdc => {
            fastcdc::v2020::FastCDC::new(data, (AVG / 4) as u32, AVG as u32, (AVG * 4) as u32)
                .map(|c| (c.offset, c.length))
                .collect()
        }
        Scheme::Fixed(n) => (0..data.len())
            .step_by(n)
            .map(|o| (o, n.min(data.len() - o)))
            .collect(),
    }
}

/// Add an image's chunks to `seen`; returns (new stored bytes, non-zero bytes).
fn ingest(data: &[u8], cdc: Scheme, seen: &mut HashSet<[u8; 32]>) -> (u64, u64) {
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
    print!("{:<40}", "case: MiB stored / % saved");
    for (_, n) in SCHEMES {
        print!(" {n:>20}");
    }
    println!();
    for (sch, n) in SCHEMES {
        let t = Instant::now();
        let c = chunks(&a, sch).len();
        let mbs = a.len() as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1e6;
        println!("# {n}: {c} chunks on treeA, boundaries at {mbs:.0} MB/s");
    }
    for (name, second) in pairs {
        let b = load(second);
        print!("{name:<40}");
        for (sch, _) in SCHEMES {
            let mut seen = HashSet::new();
            let (na, za) = ingest(&a, sch, &mut seen);
            let (nb, zb) = ingest(&b, sch, &mut seen);
            let stored = na + nb;
            let saved = 1.0 - stored as f64 / (za + zb) as f64;
            print!(
                " {:>11.1} / {:>5.1}%",
                stored as f64 / 1048576.0,
                saved * 100.0
            );
        }
        println!();
    }
}
