//! 4 KiB random writes straight into the engine (no NBD), from 8 threads: isolates
//! the engine's small-write cost from the protocol.  `cargo bench --bench randwrite`.

use std::time::Instant;

use drclone::store::{InitOptions, Store};

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
    for threads in [1, 2, 8] {
        let n = 4000;
        let t0 = Instant::now();
        std::thread::scope(|sc| {
            for t in 0..threads {
                let (s, v, data) = (&s, &v, &data);
                sc.spawn(move || {
                    let mut r = 0x9e37_79b9u64 + t as u64;
                    for i in 0..n / threads {
                        r ^= r << 13;
                        r ^= r >> 7;
                        r ^= r << 17;
                        let off = (r % (size / 4096)) * 4096;
                        s.write(v, off, &data[(i % 1000) * 4096..][..4096]).unwrap();
                    }
                });
            }
        });
        let e = t0.elapsed().as_secs_f64();
        println!(
            "4k random writes, {threads} threads: {:.0} IOPS ({:.0} us each)",
            n as f64 / e,
            e * 1e6 / n as f64 * threads as f64
        );
    }
}
