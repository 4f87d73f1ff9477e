//! Engine throughput: unique, duplicate and zero writes, and sequential reads,
//! through the library on a store in $TMPDIR, using both cores.  Also the time of
//! a clone of a 16 MiB and of a 1 GiB volume.
//!
//! `cargo bench --bench engine` (env `DRCLONE_BENCH_MIB`, default 512: on this
//! machine larger runs exceed the page cache's dirty limit and measure the disk,
//! about 490 MB/s with fsync, instead of the engine).

use std::time::Instant;

use drclone::engine::store::{InitOptions, Store};

const STEP: usize = 8 << 20;

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// Write `data` into volumes `app/{prefix}{t}` from `threads` threads; returns MB/s
/// until every write is acknowledged, and MB/s including the final durable flush.
fn write_all(s: &Store, prefix: &str, data: &[u8], threads: usize) -> (f64, f64) {
    let t0 = Instant::now();
    let part = data.len() / threads;
    std::thread::scope(|sc| {
        for t in 0..threads {
            let v = s.view("app", &format!("{prefix}{t}"), None).unwrap();
            let slice = &data[t * part..(t + 1) * part];
            sc.spawn(move || {
                for (i, c) in slice.chunks(STEP).enumerate() {
                    s.write(&v, (i * STEP) as u64, c).unwrap();
                }
            });
        }
    });
    let acked = data.len() as f64 / t0.elapsed().as_secs_f64() / 1e6;
    s.flush().unwrap();
    (acked, data.len() as f64 / t0.elapsed().as_secs_f64() / 1e6)
}

fn read_all(s: &Store, prefix: &str, total: usize, threads: usize) -> f64 {
    let t0 = Instant::now();
    let part = total / threads;
    std::thread::scope(|sc| {
        for t in 0..threads {
            let v = s.view("app", &format!("{prefix}{t}"), None).unwrap();
            sc.spawn(move || {
                let mut buf = vec![0u8; STEP];
                let mut off = 0;
                while off < part {
                    s.read_into(&v, off as u64, &mut buf).unwrap();
                    std::hint::black_box(&buf);
                    off += STEP;
                }
            });
        }
    });
    total as f64 / t0.elapsed().as_secs_f64() / 1e6
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib: usize = std::env::var("DRCLONE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let threads = 2;
    let total = mib << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let compression = std::env::var("DRCLONE_BENCH_COMPRESSION").unwrap_or_else(|_| "zstd".into());
    let opts = InitOptions {
        compression: compression.parse().unwrap(),
        ..Default::default()
    };
    Store::init(&path, &opts).unwrap();
    let s = Store::open(&path, None).unwrap();
    s.create_group("app").unwrap();
    let size = (total / threads) as u64;
    for p in ["u", "d", "z"] {
        for t in 0..threads {
            s.create_volume("app", &format!("{p}{t}"), size).unwrap();
        }
    }
    let data = random(42, total);
    let zeros = vec![0u8; total];
    println!(
        "drclone engine bench: {mib} MiB per case, {threads} writer threads, 64 KiB chunks, zstd"
    );
    println!(
        "{:<18} {:>12} {:>18}",
        "case", "acked MB/s", "incl. flush MB/s"
    );
    for (name, prefix, buf) in [
        ("write unique", "u", &data),
        ("write duplicate", "d", &data),
        ("write zeros", "z", &zeros),
    ] {
        let (a, f) = write_all(&s, prefix, buf, threads);
        println!("{name:<18} {a:>12.0} {f:>18.0}");
    }
    let r = read_all(&s, "u", total, threads);
    println!("{:<18} {r:>12.0}", "read sequential");
    let rz = read_all(&s, "z", total, threads);
    println!("{:<18} {rz:>12.0}", "read holes");

    // Clone cost: a volume with 16 MiB written against one with the whole data set.
    s.create_volume("app", "small", 16 << 20).unwrap();
    let v = s.view("app", "small", None).unwrap();
    s.write(&v, 0, &data[..16 << 20]).unwrap();
    s.create_point("app", false, None).unwrap();
    s.create_group("drill").unwrap();
    for src in ["small", "u0"] {
        let t0 = Instant::now();
        s.clone_volume("app", src, "latest", "drill", src).unwrap();
        let written = if src == "small" { 16 } else { mib / threads };
        println!(
            "clone of a volume with {written:5} MiB written: {:.3} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    let df = drclone::engine::maint::df(&s).unwrap();
    println!(
        "df: unique {} MiB, stored {} MiB, dedup {:.2}x",
        df.unique_bytes >> 20,
        df.stored_bytes >> 20,
        df.dedup_ratio
    );
    s.close().unwrap();
}
