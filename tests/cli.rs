//! End-to-end tests of the `drclone` binary's store commands.

mod common;

use common::*;
use std::io::Write;

const MIB: usize = 1 << 20;

fn setup(env: &Env, extra_init: &[&str]) {
    let mut a = vec!["init"];
    a.extend_from_slice(extra_init);
    env.ok(&a);
    env.ok(&["group", "create", "app1"]);
}

#[test]
fn dedup_and_thin_provisioning_store_unique_bytes_once() {
    let env = Env::new();
    setup(&env, &[]);
    // 64 MiB random, the same 64 MiB again, then 128 MiB of (written) zeros.
    let img = env.path("disk.img");
    let rnd = random_bytes(1, 64 * MIB);
    let mut f = std::fs::File::create(&img).unwrap();
    f.write_all(&rnd).unwrap();
    f.write_all(&rnd).unwrap();
    f.write_all(&vec![0u8; 128 * MIB]).unwrap();
    drop(f);
    for d in ["app1/disk0", "app1/disk1"] {
        env.ok(&["volume", "create", d, "--size", "256M"]);
        env.ok(&["import", d, img.to_str().unwrap()]);
    }
    let du = du_bytes(&env.store);
    let limit = (64 * MIB) as f64 * 1.25;
    println!("store du -sb = {du} bytes; limit {limit}");
    assert!(
        (du as f64) <= limit,
        "store takes {du} bytes, more than 1.25 x 64 MiB"
    );
    let df = env.json(&["df"]);
    assert_eq!(df["logical_bytes"].as_u64().unwrap(), 2 * 128 * MIB as u64);
    assert_eq!(df["unique_bytes"].as_u64().unwrap(), 64 * MIB as u64);
    assert!(df["dedup_ratio"].as_f64().unwrap() >= 3.99);
    // The data comes back exactly, and zeros came back as holes.
    let out = env.path("out.img");
    env.ok(&["export", "app1/disk1", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap());
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&out).unwrap());
    assert!(
        blocks * 512 <= 130 * MIB as u64,
        "export keeps zeros sparse ({} bytes allocated)",
        blocks * 512
    );
}

#[test]
fn compressible_text_takes_under_40_percent() {
    let env = Env::new();
    setup(&env, &[]);
    let img = env.path("text.img");
    std::fs::write(&img, text_bytes(7, 64 * MIB)).unwrap();
    env.ok(&["volume", "create", "app1/docs", "--size", "64M"]);
    env.ok(&["import", "app1/docs", img.to_str().unwrap()]);
    let du = du_bytes(&env.store);
    println!(
        "64 MiB of text stores as {du} bytes ({:.1}%)",
        du as f64 * 100.0 / (64 * MIB) as f64
    );
    assert!((du as f64) < 0.40 * (64 * MIB) as f64);
    let df = env.json(&["df"]);
    assert!(df["compression_ratio"].as_f64().unwrap() > 2.5);
}

#[test]
fn point_stays_identical_after_head_is_overwritten_and_clone_is_writable() {
    let env = Env::new();
    setup(&env, &["--chunk-size", "16K"]);
    let a = env.path("a.img");
    std::fs::write(&a, random_bytes(2, 8 * MIB)).unwrap();
    env.ok(&["volume", "create", "app1/disk0", "--size", "8M"]);
    env.ok(&["volume", "create", "app1/disk1", "--size", "8M"]);
    env.ok(&["import", "app1/disk0", a.to_str().unwrap()]);
    let p = env.json(&["point", "create", "app1", "--label", "before"]);
    let id = p["id"].as_u64().unwrap().to_string();
    // Overwrite the head completely, and partly with unaligned writes.
    let b = env.path("b.img");
    std::fs::write(&b, random_bytes(3, 8 * MIB)).unwrap();
    env.ok(&["import", "app1/disk0", b.to_str().unwrap()]);
    let out = env.path("out.img");
    env.ok(&["export", &format!("app1/disk0@{id}"), out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&a).unwrap(),
        "point changed"
    );
    env.ok(&["export", "app1/disk0@latest", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&a).unwrap());
    env.ok(&["export", "app1/disk0", out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&b).unwrap(),
        "head wrong"
    );
    // Listing is oldest first with the contract's fields.
    env.ok(&["point", "create", "app1", "--app-consistent"]);
    let list = env.json(&["point", "list", "app1"]);
    let arr = list.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["label"], "before");
    assert_eq!(arr[0]["kind"], "crash");
    assert_eq!(arr[1]["kind"], "app");
    assert!(arr[0]["time"].as_u64().unwrap() > 0);
    assert_eq!(
        arr[0]["id"], p["id"],
        "point list gives the id point create gave"
    );
    // Clone the first point; the clone sees the point and diverges on its own.
    env.ok(&["group", "create", "drill"]);
    env.ok(&["clone", &format!("app1/disk0@{id}"), "drill/disk0"]);
    env.ok(&["export", "drill/disk0", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&a).unwrap());
    env.ok(&["import", "drill/disk0", b.to_str().unwrap()]);
    env.ok(&["export", &format!("app1/disk0@{id}"), out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&a).unwrap(),
        "clone writes leaked into the point"
    );
    // Removing the point keeps the clone readable (it pins its parent).
    env.ok(&["point", "rm", "app1", &id]);
    env.ok(&["gc"]);
    env.ok(&["export", "drill/disk0", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&b).unwrap());
    env.ok(&["verify"]);
}

#[test]
fn clone_cost_does_not_depend_on_volume_size() {
    let env = Env::new();
    setup(&env, &[]);
    env.ok(&["group", "create", "drill"]);
    // One volume with 16 MiB written, one with 1 GiB written.
    for (disk, mib) in [("small", 16usize), ("large", 1024)] {
        let img = env.path(&format!("{disk}.img"));
        let mut f = std::fs::File::create(&img).unwrap();
        for i in 0..mib {
            let mut block = text_bytes(i as u64, MIB);
            block[..8].copy_from_slice(&(i as u64).to_le_bytes());
            f.write_all(&block).unwrap();
        }
        drop(f);
        env.ok(&[
            "volume",
            "create",
            &format!("app1/{disk}"),
            "--size",
            &format!("{mib}M"),
        ]);
        env.ok(&["import", &format!("app1/{disk}"), img.to_str().unwrap()]);
        std::fs::remove_file(&img).unwrap();
    }
    env.ok(&["point", "create", "app1"]);
    let mut times = vec![];
    let mut key_deltas = vec![];
    for disk in ["small", "large"] {
        let before = drclone_keys(&env);
        let r = env.json(&[
            "clone",
            &format!("app1/{disk}@latest"),
            &format!("drill/{disk}"),
        ]);
        times.push(r["time_ms"].as_f64().unwrap());
        key_deltas.push(drclone_keys(&env) - before);
    }
    println!(
        "clone of 16 MiB: {:.2} ms, of 1 GiB: {:.2} ms; metadata keys added: {key_deltas:?}",
        times[0], times[1]
    );
    // The clone writes the same, constant number of metadata records whatever the size.
    assert_eq!(key_deltas[0], key_deltas[1]);
    assert!(key_deltas[0] <= 4, "clone wrote {} keys", key_deltas[0]);
}

/// Metadata key count, via the library (the binary is not running).
fn drclone_keys(env: &Env) -> u64 {
    let s = drclone::Store::open(&env.store, None).unwrap();
    let n = s.metadata_key_count().unwrap();
    s.close().unwrap();
    n
}

#[test]
fn encrypted_store_hides_plaintext_and_refuses_wrong_key() {
    let env = Env::new();
    let key = env.path("key");
    let k = key.to_str().unwrap();
    // No compression, so only encryption can hide the plaintext.
    env.ok(&[
        "init",
        "--encrypt",
        "--key-file",
        k,
        "--compression",
        "none",
    ]);
    assert!(key.exists(), "init writes a new key");
    env.ok(&["group", "create", "app1"]);
    env.ok(&["volume", "create", "app1/disk0", "--size", "4M"]);
    let marker = b"TOP-SECRET-PLAINTEXT-MARKER-0123456789";
    let mut data = Vec::new();
    while data.len() < 4 * MIB {
        data.extend_from_slice(marker);
    }
    data.truncate(4 * MIB);
    let img = env.path("secret.img");
    std::fs::write(&img, &data).unwrap();
    env.ok(&["import", "app1/disk0", img.to_str().unwrap()]);
    env.ok(&["point", "create", "app1"]);
    // Nothing under the store contains the plaintext.
    let mut stack = vec![env.store.clone()];
    let mut files = 0;
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap().path();
            if e.is_dir() {
                stack.push(e);
            } else {
                files += 1;
                let bytes = std::fs::read(&e).unwrap();
                assert!(
                    !bytes.windows(16).any(|w| w == &marker[..16]),
                    "plaintext in {}",
                    e.display()
                );
            }
        }
    }
    assert!(files > 3);
    // The remembered key path works without --key-file; the data round-trips.
    let out = env.path("out.img");
    env.ok(&["export", "app1/disk0", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == data);
    // A wrong key is refused with a clear error, and writes nothing.
    let wrong = env.path("wrong");
    std::fs::write(&wrong, "ab".repeat(32)).unwrap();
    let before = du_bytes(&env.store);
    let err = env.fails(&[
        "--key-file",
        wrong.to_str().unwrap(),
        "volume",
        "create",
        "app1/x",
        "--size",
        "1M",
    ]);
    assert!(err.contains("wrong key"), "{err}");
    assert_eq!(du_bytes(&env.store), before);
    let err = env.fails(&[
        "--key-file",
        env.path("nokey").to_str().unwrap(),
        "volume",
        "list",
    ]);
    assert!(err.contains("cannot read key file"), "{err}");
    env.ok(&["verify"]);
}

#[test]
fn verify_names_corrupt_chunks_and_their_users() {
    let env = Env::new();
    setup(&env, &[]);
    let img = env.path("a.img");
    std::fs::write(&img, random_bytes(9, 2 * MIB)).unwrap();
    env.ok(&["volume", "create", "app1/disk0", "--size", "2M"]);
    env.ok(&["import", "app1/disk0", img.to_str().unwrap()]);
    env.ok(&["point", "create", "app1"]);
    let ok = env.json(&["verify"]);
    assert_eq!(ok["ok"], true);
    assert_eq!(ok["chunks_checked"], 32);
    // Flip one byte in the middle of the first pack.
    let pack = find_packs(&env.store)[0].clone();
    let mut bytes = std::fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&pack, bytes).unwrap();
    let out = env.cmd().args(["verify", "--json"]).output().unwrap();
    assert!(!out.status.success());
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad = rep["bad"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{rep}");
    assert_eq!(bad[0]["chunk"].as_str().unwrap().len(), 64);
    let users: Vec<&str> = bad[0]["used_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    assert!(
        users.iter().any(|u| u.starts_with("app1/disk0 (offset")),
        "{users:?}"
    );
    assert!(
        users.iter().any(|u| u.starts_with("app1/disk0@1 (offset")),
        "{users:?}"
    );
    let text = env.fails(&["verify"]);
    assert!(text.contains("bad chunk"), "{text}");
    // Reading the bad chunk is an error, not wrong data.
    let err = env.fails(&["export", "app1/disk0", env.path("o").to_str().unwrap()]);
    assert!(err.contains("chunk") && err.contains("pack"), "{err}");
}

fn find_packs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap().path();
            if e.is_dir() {
                stack.push(e);
            } else if e.extension().is_some_and(|x| x == "pack") {
                out.push(e);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn gc_reclaims_overwritten_trimmed_and_removed_data() {
    let env = Env::new();
    setup(&env, &[]);
    let img = env.path("a.img");
    std::fs::write(&img, random_bytes(5, 16 * MIB)).unwrap();
    env.ok(&["volume", "create", "app1/disk0", "--size", "16M"]);
    env.ok(&["import", "app1/disk0", img.to_str().unwrap()]);
    env.ok(&["point", "create", "app1"]);
    let b = env.path("b.img");
    std::fs::write(&b, random_bytes(6, 16 * MIB)).unwrap();
    env.ok(&["import", "app1/disk0", b.to_str().unwrap()]);
    let full = env.json(&["df"])["pack_bytes"].as_u64().unwrap();
    assert!(full >= 32 * MIB as u64);
    // The point still pins the old data.
    env.ok(&["gc"]);
    assert!(env.json(&["df"])["pack_bytes"].as_u64().unwrap() >= 32 * MIB as u64);
    env.ok(&["point", "rm", "app1", "latest"]);
    env.ok(&["gc"]);
    let after = env.json(&["df"])["pack_bytes"].as_u64().unwrap();
    assert!(
        after < 17 * MIB as u64 && after >= 16 * MIB as u64,
        "{after}"
    );
    env.ok(&["volume", "rm", "app1/disk0"]);
    env.ok(&["gc"]);
    assert_eq!(env.json(&["df"])["pack_bytes"].as_u64().unwrap(), 0);
}

#[test]
fn bad_input_gets_clear_errors_and_harms_nothing() {
    let env = Env::new();
    let err = env.fails(&["volume", "list"]);
    assert!(
        err.contains("no store.json") && err.contains("drclone init"),
        "{err}"
    );
    setup(&env, &[]);
    assert!(env.fails(&["init"]).contains("already exists"));
    assert!(env
        .fails(&["group", "create", "app1"])
        .contains("already exists"));
    assert!(env
        .fails(&["group", "create", "bad/name"])
        .contains("invalid group name"));
    assert!(env
        .fails(&["volume", "create", "app1/d", "--size", "12x"])
        .contains("invalid size"));
    assert!(env
        .fails(&["volume", "create", "app1/d", "--size", "1000"])
        .contains("multiple of 512"));
    assert!(env
        .fails(&["volume", "create", "nope/d", "--size", "1M"])
        .contains("group nope not found"));
    env.ok(&["volume", "create", "app1/d", "--size", "1M"]);
    let big = env.path("big.img");
    std::fs::write(&big, vec![1u8; 2 * MIB]).unwrap();
    assert!(env
        .fails(&["import", "app1/d", big.to_str().unwrap()])
        .contains("grow the volume"));
    assert!(env
        .fails(&["import", "app1/d", "/nonexistent"])
        .contains("/nonexistent"));
    assert!(env
        .fails(&["export", "app1/d@latest", "/tmp/x"])
        .contains("point latest of group app1 not found"));
    env.ok(&["point", "create", "app1"]);
    assert!(env
        .fails(&["import", "app1/d@1", big.to_str().unwrap()])
        .contains("read-only"));
    assert!(env
        .fails(&["clone", "app1/d", "app1/e"])
        .contains("must name a point"));
    assert!(env
        .fails(&["clone", "app1/d@9", "app1/e"])
        .contains("not found"));
    assert!(env
        .fails(&["volume", "resize", "app1/d", "--size", "512K"])
        .contains("shrinking"));
    assert!(env
        .fails(&["retention", "set", "app1", "5x"])
        .contains("EVERY:KEEP"));
    env.ok(&["retention", "set", "app1", "5m:24h,1h:7d"]);
    let other = Env::new();
    assert!(other
        .fails(&["init", "--chunk-size", "3000"])
        .contains("power of two"));
    assert!(other
        .fails(&["init", "--compression", "brotli"])
        .contains("unknown compression"));
    assert!(other.fails(&["init", "--encrypt"]).contains("--key-file"));
    // Everything stored before is intact.
    env.ok(&["verify"]);
    assert_eq!(env.json(&["volume", "list"]).as_array().unwrap().len(), 1);
}

/// Unmounts a test file system when the test ends, however it ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_fails_writes_clearly_and_harms_nothing_stored() {
    let mut env = Env::new();
    let mnt = env.path("small");
    std::fs::create_dir(&mnt).unwrap();
    common::run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=40m",
            "tmpfs",
            mnt.to_str().unwrap(),
        ],
    );
    let _m = Mounted(mnt.clone());
    env.store = mnt.join("store");
    setup(&env, &[]);
    let a = env.path("a.img");
    std::fs::write(&a, random_bytes(1, 8 << 20)).unwrap();
    env.ok(&["volume", "create", "app1/disk0", "--size", "8M"]);
    env.ok(&["import", "app1/disk0", a.to_str().unwrap()]);
    // 64 MiB of unique data does not fit in what is left of 40 MiB.
    env.ok(&["volume", "create", "app1/big", "--size", "64M"]);
    let b = env.path("b.img");
    std::fs::write(&b, random_bytes(2, 64 << 20)).unwrap();
    let reserve = env.store.join("reserve");
    assert!(reserve.exists(), "the store keeps an emergency reserve");
    let err = env.fails(&["import", "app1/big", b.to_str().unwrap()]);
    assert!(err.contains("No space left on device"), "{err}");
    // The disk is full: the next open releases the reserve and says so.
    let out = env.cmd().arg("verify").output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("released the emergency reserve"), "{log}");
    assert!(!reserve.exists());
    // What was stored before is intact and verifies.
    let out = env.path("a.out");
    env.ok(&["export", "app1/disk0", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&a).unwrap());
    // Removing the half-imported volume and collecting garbage frees the space.
    env.ok(&["volume", "rm", "app1/big"]);
    env.ok(&["gc"]);
    let c = env.path("c.img");
    std::fs::write(&c, random_bytes(3, 16 << 20)).unwrap();
    env.ok(&["volume", "create", "app1/c", "--size", "16M"]);
    env.ok(&["import", "app1/c", c.to_str().unwrap()]);
    env.ok(&["verify"]);
    assert!(reserve.exists(), "the reserve is back once there is room");
}

/// `point create --json` and `point list --json` give a point's id the same way:
/// as an integer.
#[test]
fn point_ids_are_integers_in_create_and_list() {
    let env = Env::new();
    setup(&env, &[]);
    env.ok(&["volume", "create", "app1/d", "--size", "1M"]);
    let p1 = env.json(&["point", "create", "app1"]);
    let p2 = env.json(&["point", "create", "app1", "--label", "two"]);
    assert!(p1["id"].is_u64() && p2["id"].is_u64(), "{p1} {p2}");
    let list = env.json(&["point", "list", "app1"]);
    let ids: Vec<_> = list.as_array().unwrap().iter().map(|p| &p["id"]).collect();
    assert_eq!(ids, vec![&p1["id"], &p2["id"]], "{list}");
}

/// What a new user runs into first: a missing store, a directory given as an
/// image, a file that does not exist.  Each message names the problem, says
/// how to fix it where it can, and gives an OS error's cause once.
#[test]
fn first_errors_a_new_user_meets_read_well() {
    let env = Env::new();
    let err = env.fails(&["volume", "list"]);
    let want = format!("no drclone store at {}", env.store.display());
    assert!(
        err.contains(&want)
            && err.contains("--store")
            && err.contains("DRCLONE_STORE")
            && err.contains("drclone init")
            && !err.contains("not found"),
        "{err}"
    );
    setup(&env, &[]);
    env.ok(&["volume", "create", "app1/d", "--size", "1M"]);
    let dir = env.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let err = env.fails(&["import", "app1/d", dir.to_str().unwrap()]);
    assert!(
        err.contains(dir.to_str().unwrap())
            && err.contains("not a regular file or block device")
            && !err.contains("bytes"),
        "{err}"
    );
    let err = env.fails(&["import", "app1/d", "/nonexistent.raw"]);
    assert!(err.contains("/nonexistent.raw"), "{err}");
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the cause once: {err}"
    );
    // Nothing was written by the failed imports.
    env.ok(&["verify"]);
}

/// The lines of `README.md` section `title` (from its heading to the next `## `).
fn readme_section(title: &str) -> String {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let start = readme
        .find(&format!("\n## {title}\n"))
        .unwrap_or_else(|| panic!("README.md has no section {title}"));
    let body = &readme[start + 1..];
    let end = body[3..].find("\n## ").map_or(body.len(), |i| i + 3);
    body[..end].to_string()
}

/// The README tour's first block, run as written (the encrypted `init` is the
/// alternative to the plain one, so only the first `init` runs): every command
/// works in order on a fresh store.
#[test]
fn readme_tour_runs_as_written() {
    let env = Env::new();
    let tour = readme_section("A short tour");
    let block = tour
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n\n").next())
        .expect("the tour's first code block");
    // The image the tour imports, in the working directory.
    std::fs::write(env.path("disk0.raw"), random_bytes(5, 2 * MIB)).unwrap();
    let mut inits = 0;
    let mut ran = 0;
    for line in block.lines() {
        let cmd = line.split(" #").next().unwrap().trim();
        if cmd.starts_with('#') {
            continue; // a comment line (the encrypted init, an alternative)
        }
        let Some(args) = cmd.strip_prefix("drclone ") else {
            assert!(cmd.starts_with("export DRCLONE_STORE="), "{line}");
            continue;
        };
        let args: Vec<&str> = args.split_whitespace().collect();
        if args[0] == "init" {
            inits += 1;
            if inits > 1 {
                continue;
            }
        }
        let out = env
            .cmd()
            .current_dir(env.dir.path())
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README tour: `{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
    }
    assert!(ran >= 10, "the tour ran {ran} commands:\n{block}");
    let restored = std::fs::read(env.path("restored.raw")).unwrap();
    assert!(restored[..2 * MIB] == random_bytes(5, 2 * MIB)[..]);
}

/// The build line of a script: `cargo build ...` to the end of its line.
fn cargo_build_line(script: &str) -> String {
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
            .unwrap();
    let lines: Vec<String> = text
        .lines()
        .filter_map(|l| l.find("cargo build").map(|i| l[i..].trim().to_string()))
        .collect();
    assert_eq!(lines.len(), 1, "{script} builds once: {lines:?}");
    lines[0].clone()
}

/// scripts/demo.sh builds exactly as scripts/test.sh does (one build shared by
/// both, no rebuild that replaces the binary when one runs after the other),
/// installs the binary on PATH and says so, and the README says where it is.
#[test]
fn demo_shares_the_test_build_and_puts_drclone_on_path() {
    assert_eq!(
        cargo_build_line("scripts/demo.sh"),
        cargo_build_line("scripts/test.sh")
    );
    let demo = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo.sh"),
    )
    .unwrap();
    assert!(
        demo.lines().any(|l| {
            let l = l.trim_start();
            (l.starts_with("install ") || l.starts_with("$SUDO install "))
                && l.contains("/usr/local/bin/drclone")
        }),
        "demo.sh installs drclone in /usr/local/bin"
    );
    assert!(
        demo.lines()
            .any(|l| l.contains("echo") && l.contains("/usr/local/bin/drclone")),
        "demo.sh says where drclone is"
    );
    let syntax = std::process::Command::new("bash")
        .args(["-n", "scripts/demo.sh"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(syntax.success(), "bash -n scripts/demo.sh");
    assert!(
        readme_section("Two commands").contains("/usr/local/bin/drclone"),
        "README's Two commands says where drclone is"
    );
}
