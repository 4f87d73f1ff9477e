//! 4 KiB random writes straight into the engine (no NBD) over a 512 MiB volume of
//! random data: isolates the engine's small-write cost (journal + overlay, and
//! destage once the overlay is full) from the protocol.
//! `cargo bench --bench randwrite`.

use std::time::Instant;

use drclone::engine::store::{InitOptions, Store};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    Store::init(&path, &InitOptions::default()).unwrap();
    let s = Store::open(&path, None).unwrap();
    s.create_group("g").unwrap();
    let size = 512u64 << 20;
    s.create_volume("g", "d", size).unwrap();
    let v = s.view("g", "d", None).unwrap();
    let mut x = 7u64;
    let mut data = vec![0u8; 8 << 20];
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    for off in (0..size).step_by(data.len()) {
        s.write(&v, off, &data).unwrap();
    }
    s.flush().unwrap();
    // (writes, threads, flush every N writes per thread (0 = never)).  The first
    // rows fit the overlay; the 120k-write row overflows the 256 MiB overlay, so
    // it includes oldest-first destaging; the last rows pay an fdatasync of the
    // journal every 16 writes, like a VM whose file system commits often.
    for (n, threads, flush_every) in [
        (8000usize, 1usize, 0usize),
        (8000, 2, 0),
        (8000, 8, 0),
        (120_000, 2, 0),
        (8000, 2, 16),
        (8000, 8, 16),
    ] {
        let t0 = Instant::now();
        std::thread::scope(|sc| {
            for t in 0..threads {
                let (s, v, data) = (&s, &v, &data);
                sc.spawn(move || {
                    let mut r = 0x9e37_79b9u64 + t as u64 + n as u64;
                    for i in 0..n / threads {
                        r ^= r << 13;
                        r ^= r >> 7;
                        r ^= r << 17;
                        let off = (r % (size / 4096)) * 4096;
                        s.write(v, off, &data[(i % 1000) * 4096..][..4096]).unwrap();
                        if flush_every > 0 && i % flush_every == flush_every - 1 {
                            s.flush().unwrap();
                        }
                    }
                });
            }
        });
        let e = t0.elapsed().as_secs_f64();
        let flush = if flush_every > 0 {
            format!(", flush every {flush_every}")
        } else {
            String::new()
        };
        println!(
            "4k random writes x {n}, {threads} threads{flush}: {:.0} IOPS ({:.0} us each)",
            n as f64 / e,
            e * 1e6 / n as f64 * threads as f64
        );
    }
    let t0 = Instant::now();
    s.close().unwrap();
    println!(
        "close (destage everything left): {:.2} s",
        t0.elapsed().as_secs_f64()
    );
}
