//! Failback (issue 12) between two sites on loopback, each a `drclone serve`
//! with a replication port: the original site pushes a group to the DR site,
//! the DR site fails over and writes, and `drclone failback` sends home only
//! what changed (counted on the wire by a proxy), keeps writes the original
//! site made after the common point, and after a planned failback the next
//! push back to the DR site is incremental.

mod common;

use common::*;

const MIB: u64 = 1 << 20;

/// Write `n` regions of 1 MiB, spread over `size`, at `uri`; returns their
/// offsets.
fn scatter(uri: &str, n: u64, size: u64, seed: u64) -> Vec<u64> {
    let step = size / n;
    let offs: Vec<u64> = (0..n).map(|i| i * step + (i * 7 % 13) * 65536).collect();
    for (i, off) in offs.iter().enumerate() {
        nbd_write_random(uri, *off, MIB as usize, seed + i as u64);
    }
    offs
}

fn points(s: &Site, g: &str) -> Vec<serde_json::Value> {
    s.env
        .json(&["point", "list", g])
        .as_array()
        .unwrap()
        .clone()
}

/// Original site O holds group g (a 1 GiB disk, 48 MiB written), pushes it to
/// the DR site D; D fails over and writes 10 MiB (1%); failback sends at most
/// 1.5x that on the wire and O's new point equals D's head.  Then a planned
/// failback makes D a replica again, and O's next push to D is incremental.
#[test]
fn failback_sends_the_delta_and_reprotection_is_incremental() {
    let o = Site::new();
    let d = Site::new();
    let size = 1024 * MIB;
    o.env.ok(&["group", "create", "g"]);
    o.env.ok(&["volume", "create", "g/d0", "--size", "1G"]);
    for i in 0..3 {
        nbd_write_random(&o.uri("g/d0"), i * 300 * MIB, 16 * MIB as usize, 100 + i);
    }
    o.env
        .ok(&["point", "create", "g", "--label", "before the disaster"]);
    let to_d = format!("127.0.0.1:{}", d.repl);
    o.env.json(&["push", "g", "--target", &to_d]);
    assert_eq!(points(&d, "g").len(), 1);

    // Disaster: D fails over and the recovered VM writes 1% of the disk.
    d.env.json(&["failover", "g"]);
    scatter(&d.uri("g/d0"), 10, size, 500);
    let proxy = {
        let (port, count) = tcp_proxy(o.repl);
        (port, count)
    };
    let via = format!("127.0.0.1:{}", proxy.0);
    let r = d.env.json(&["failback", "g", "--target", &via]);
    let wire = proxy.1.take_up();
    println!("failback of 10 MiB changed: {wire} bytes on the wire ({r})");
    assert!(r["diverged"].is_null(), "{r}");
    assert!(
        wire as f64 <= 1.5 * (10 * MIB) as f64,
        "failback sent {wire} bytes for 10 MiB changed"
    );
    assert!(wire >= 10 * MIB, "failback sent only {wire} bytes");
    let latest = points(&o, "g").last().unwrap()["id"].as_u64().unwrap();
    assert!(
        o.export(&format!("g/d0@{latest}")) == d.export("g/d0"),
        "the original site's point differs from the DR site's head"
    );
    assert_eq!(d.env.json(&["status"])[0]["role"], "failed-over");

    // Planned: D's writers are stopped and D becomes the replica; O's heads
    // hold D's data.
    scatter(&d.uri("g/d0"), 2, size, 900);
    let r = d
        .env
        .json(&["failback", "g", "--target", &via, "--planned"]);
    proxy.1.take_up();
    assert_eq!(r["role"], "protected", "{r}");
    assert!(
        o.export("g/d0") == d.export("g/d0"),
        "heads differ after planned failback"
    );
    let e = d.env.fails(&["failback", "g", "--target", &via]);
    assert!(
        e.contains("failback runs on the site the group failed over to"),
        "{e}"
    );

    // Re-protection: O writes 2 MiB and pushes to D through a proxy: incremental.
    scatter(&o.uri("g/d0"), 2, size, 1300);
    o.env.ok(&["point", "create", "g"]);
    let (port, count) = tcp_proxy(d.repl);
    let r = o
        .env
        .json(&["push", "g", "--target", &format!("127.0.0.1:{port}")]);
    let back = count.take_up();
    println!("re-protection push of 2 MiB changed: {back} bytes ({r})");
    assert!(!r["base"].is_null(), "no common point: {r}");
    assert!(
        back as f64 <= 1.5 * (2 * MIB) as f64,
        "re-protection sent {back} bytes"
    );
    assert!(
        d.export("g/d0@latest") == o.export("g/d0@latest"),
        "re-protected point differs"
    );
}

/// Unplanned failover after the original site wrote past the last point it
/// sent: failback keeps those writes in a `diverged-...` point there, says
/// so, and the original site then holds the DR site's data.
#[test]
fn failback_keeps_what_the_original_site_wrote_after_the_common_point() {
    let o = Site::new();
    let d = Site::new();
    o.env.ok(&["group", "create", "g"]);
    o.env.ok(&["volume", "create", "g/d0", "--size", "64M"]);
    nbd_write_random(&o.uri("g/d0"), 0, 8 * MIB as usize, 1);
    o.env.ok(&["point", "create", "g"]);
    o.env
        .json(&["push", "g", "--target", &format!("127.0.0.1:{}", d.repl)]);
    // Writes that never reach the DR site.
    nbd_write_random(&o.uri("g/d0"), 32 * MIB, 2 * MIB as usize, 2);
    let lost_here = o.export("g/d0");
    d.env.json(&["failover", "g"]);
    nbd_write_random(&d.uri("g/d0"), 4 * MIB, MIB as usize, 3);
    let r = d.env.json(&[
        "failback",
        "g",
        "--target",
        &format!("127.0.0.1:{}", o.repl),
    ]);
    let kept = r["diverged"]
        .as_u64()
        .unwrap_or_else(|| panic!("no diverged point: {r}"));
    let p = points(&o, "g");
    let kp = p.iter().find(|x| x["id"] == kept).unwrap();
    assert!(
        kp["label"].as_str().unwrap().starts_with("diverged-"),
        "{kp}"
    );
    assert!(
        o.export(&format!("g/d0@{kept}")) == lost_here,
        "the diverged point does not hold the original site's writes"
    );
    assert!(o.export("g/d0@latest") == d.export("g/d0"));
    assert!(
        o.export("g/d0") == d.export("g/d0"),
        "the original head was not rolled back"
    );
    let text = d.env.ok(&[
        "failback",
        "g",
        "--target",
        &format!("127.0.0.1:{}", o.repl),
    ]);
    assert!(!text.contains("diverged"), "{text}");
}

/// `restore` to a plain file: 1% differs, about 1% travels (counted on the
/// wire), the file ends byte-identical to the point; a missing file is
/// created; a target open for writing or mounted (fuse2fs) is refused unless
/// --force.
#[test]
fn restore_fetches_only_what_differs_and_refuses_a_target_in_use() {
    need("fuse2fs");
    let d = Site::new();
    d.env.ok(&["group", "create", "g"]);
    d.env.ok(&["volume", "create", "g/d0", "--size", "100M"]);
    nbd_write_random(&d.uri("g/d0"), 0, 60 * MIB as usize, 11);
    d.env.ok(&["point", "create", "g"]);
    let point = d.export("g/d0@latest");
    // The original host's disk: the point, with 1 MiB (1%) changed since.
    let disk = d.env.path("host-disk.raw");
    let mut local = point.clone();
    local[20 * MIB as usize..21 * MIB as usize].copy_from_slice(&random_bytes(12, MIB as usize));
    std::fs::write(&disk, &local).unwrap();
    let (port, count) = tcp_proxy(d.repl);
    let from = format!("127.0.0.1:{port}");
    let restore = |extra: &[&str]| {
        let mut a = vec!["--json", "restore", "g/d0", "--from", &from, "--to"];
        a.push(disk.to_str().unwrap());
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run_restore = |extra: &[&str]| {
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"))
            .env_remove("DRCLONE_STORE")
            .args(restore(extra))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = run_restore(&[]);
    assert!(ok, "{err}");
    let down = count.take_down();
    println!("restore of 1 MiB differing in 100 MiB: {down} bytes received ({out})");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["verified"], true);
    assert_eq!(r["blocks_changed"], 16, "{r}");
    assert!(
        down as f64 <= 1.5 * MIB as f64,
        "restore received {down} bytes"
    );
    assert!(down >= MIB, "restore received only {down} bytes");
    assert!(
        std::fs::read(&disk).unwrap() == point,
        "restored file differs"
    );

    // A file open for writing by another process: refused, then --force.
    std::fs::write(&disk, &local).unwrap();
    let mut holder = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3>>'{}'; echo held; sleep 60", disk.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let (ok, _, err) = run_restore(&[]);
    assert!(!ok, "a target open for writing was written");
    assert!(err.contains("is open for writing by process"), "{err}");
    assert!(
        std::fs::read(&disk).unwrap() == local,
        "a refused restore wrote"
    );
    let (ok, _, err) = run_restore(&["--force"]);
    assert!(ok, "{err}");
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(std::fs::read(&disk).unwrap() == point);

    // A mounted file system image (fuse2fs): refused.
    let img = d.env.path("fs.img");
    run("truncate", &["-s", "100M", img.to_str().unwrap()]);
    run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
    let mnt = d.env.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run("fuse2fs", &[img.to_str().unwrap(), mnt.to_str().unwrap()]);
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"))
        .args(["restore", "g/d0", "--from", &from, "--to"])
        .arg(&img)
        .output()
        .unwrap();
    let _ = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(&mnt)
        .status();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a mounted image was written");
    assert!(
        err.contains("is mounted on") || err.contains("is open for writing by process"),
        "{err}"
    );

    // A missing file is created whole; an unknown disk is an error by name.
    let fresh = d.env.path("fresh.raw");
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"))
        .args(["restore", "g/d0@latest", "--from", &from, "--to"])
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&fresh).unwrap() == point);
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"))
        .args(["restore", "g/nosuch", "--from", &from, "--to"])
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch"));
}

/// A diverged original site, and a disk the DR site grew while failed over:
/// the rollback takes the base point's size, and the disk grows back to what
/// the DR site sends (found by review: the landed point had the old size).
#[test]
fn failback_onto_a_diverged_site_regrows_a_disk_the_dr_site_grew() {
    let o = Site::new();
    let d = Site::new();
    o.env.ok(&["group", "create", "g"]);
    o.env.ok(&["volume", "create", "g/d0", "--size", "8M"]);
    nbd_write_random(&o.uri("g/d0"), 0, 4 * MIB as usize, 21);
    o.env.ok(&["point", "create", "g"]);
    o.env
        .json(&["push", "g", "--target", &format!("127.0.0.1:{}", d.repl)]);
    nbd_write_random(&o.uri("g/d0"), 6 * MIB, MIB as usize, 22);
    d.env.json(&["failover", "g"]);
    d.env.ok(&["volume", "resize", "g/d0", "--size", "16M"]);
    nbd_write_random(&d.uri("g/d0"), 12 * MIB, MIB as usize, 23);
    let r = d.env.json(&[
        "failback",
        "g",
        "--target",
        &format!("127.0.0.1:{}", o.repl),
    ]);
    assert!(r["diverged"].is_u64(), "{r}");
    let head = d.export("g/d0");
    assert_eq!(head.len(), 16 * MIB as usize);
    assert!(o.export("g/d0@latest") == head, "the landed point differs");
    assert!(o.export("g/d0") == head, "the original head differs");
}

/// Retention keeps the bases of incremental replication: the newest point a
/// peer holds from this store, and the newest point that came from a peer,
/// however short the policy (found by review: a long failover with short
/// retention left only a full copy).
#[test]
fn retention_keeps_the_points_both_sites_share() {
    let o = Site::new();
    let d = Site::new();
    o.env.ok(&["group", "create", "g"]);
    o.env.ok(&["volume", "create", "g/d0", "--size", "8M"]);
    nbd_write_random(&o.uri("g/d0"), 0, 2 * MIB as usize, 31);
    let shared = o.env.json(&["point", "create", "g"])["id"]
        .as_u64()
        .unwrap();
    o.env
        .json(&["push", "g", "--target", &format!("127.0.0.1:{}", d.repl)]);
    let received = points(&d, "g")[0]["id"].as_u64().unwrap();
    for i in 0..2 {
        nbd_write_random(&o.uri("g/d0"), (4 + i) * MIB, 4096, 32 + i);
        o.env.ok(&["point", "create", "g"]);
        d.env.ok(&["point", "create", "g"]);
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    for s in [&o, &d] {
        s.env.ok(&["retention", "set", "g", "1s:1s"]);
        s.env.ok(&["retention", "apply", "g"]);
    }
    let left: Vec<u64> = points(&o, "g")
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert!(left.contains(&shared), "the pushed point went: {left:?}");
    assert_eq!(left.len(), 2, "retention kept {left:?}");
    let left: Vec<u64> = points(&d, "g")
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert!(
        left.contains(&received),
        "the received point went: {left:?}"
    );
    // The next push is incremental from the shared point.
    let r = o
        .env
        .json(&["push", "g", "--target", &format!("127.0.0.1:{}", d.repl)]);
    assert_eq!(r["base"], shared, "{r}");
}
