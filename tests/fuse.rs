//! The FUSE mount with the real kernel: ext4 inside a volume file via a loop
//! device, e2fsck, read-only points, hole punching, qemu-img on mounted files.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

const MIB: usize = 1 << 20;

struct Mount {
    child: Child,
    dir: PathBuf,
}

impl Mount {
    fn start(env: &Env) -> Mount {
        let dir = env.path("mnt");
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(assert_cmd::cargo::cargo_bin("drclone"))
            .env("DRCLONE_STORE", &env.store)
            .arg("mount")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if std::fs::read_to_string("/proc/self/mounts")
                .unwrap()
                .contains(&format!(" {} fuse", dir.display()))
            {
                return Mount { child, dir };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("drclone mount did not come up");
    }

    fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        assert!(st.success(), "drclone mount exited with {st}");
        assert!(!std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains(&format!(" {} fuse", self.dir.display())));
        std::mem::forget(self);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.dir)
            .status();
    }
}

fn sh(cmd: &str) -> String {
    run("sh", &["-c", cmd])
}

#[test]
fn ext4_in_a_volume_file_loop_mounts_and_checks_clean() {
    need("mkfs.ext4");
    need("e2fsck");
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&["group", "create", "app1"]);
    env.ok(&["volume", "create", "app1/disk0", "--size", "128M"]);
    let srv = Server::start(&env);
    let m = Mount::start(&env);
    let file = m.dir.join("app1/disk0");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 128 * MIB as u64);
    sh(&format!("mkfs.ext4 -q -F {}", file.display()));
    let lo = env.path("lo");
    std::fs::create_dir_all(&lo).unwrap();
    sh(&format!(
        "mount -o loop {} {}",
        file.display(),
        lo.display()
    ));
    let payload = random_bytes(11, 8 * MIB);
    std::fs::write(lo.join("payload.bin"), &payload).unwrap();
    std::fs::create_dir_all(lo.join("etc")).unwrap();
    std::fs::write(lo.join("etc/hostname"), "dr-host\n").unwrap();
    sh(&format!("umount {}", lo.display()));
    sh(&format!("e2fsck -fn {}", file.display()));
    // The file in the mount is byte for byte what `drclone export` gives.
    let out = env.path("export.img");
    env.ok(&["export", "app1/disk0", out.to_str().unwrap()]);
    assert!(std::fs::read(&file).unwrap() == std::fs::read(&out).unwrap());
    // A point appears as a read-only directory; its file is identical and e2fsck-clean.
    env.ok(&["point", "create", "app1"]);
    let pfile = m.dir.join("app1/@1/disk0");
    for _ in 0..100 {
        if pfile.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(std::fs::read(&pfile).unwrap() == std::fs::read(&out).unwrap());
    sh(&format!("e2fsck -fn {}", pfile.display()));
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&pfile)
        .unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
        "{err}"
    );
    // Loop-mount the point read-only and read the file back.
    sh(&format!(
        "mount -o loop,ro,noload {} {}",
        pfile.display(),
        lo.display()
    ));
    assert!(std::fs::read(lo.join("payload.bin")).unwrap() == payload);
    sh(&format!("umount {}", lo.display()));
    m.stop();
    drop(srv);
}

#[test]
fn punch_hole_then_gc_frees_space_and_seek_hole_works() {
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&["group", "create", "app1"]);
    env.ok(&["volume", "create", "app1/disk0", "--size", "64M"]);
    let img = env.path("a.img");
    std::fs::write(&img, random_bytes(3, 32 * MIB)).unwrap();
    env.ok(&["import", "app1/disk0", img.to_str().unwrap()]);
    env.ok(&["point", "create", "app1"]);
    let srv = Server::start(&env);
    let m = Mount::start(&env);
    let file = m.dir.join("app1/disk0");
    // SEEK_DATA/SEEK_HOLE come from the block map.
    let out = run("/usr/bin/python3", &["-c", &format!(
        "import os; f=os.open('{}', os.O_RDONLY); print(os.lseek(f, 0, os.SEEK_HOLE), os.lseek(f, 5, os.SEEK_DATA))",
        file.display())]);
    assert_eq!(out.trim(), format!("{} 5", 32 * MIB));
    let before = env.json(&["df"])["pack_bytes"].as_u64().unwrap();
    // Punch a 16 MiB hole with an unaligned start: the edge chunk is zero-filled.
    sh(&format!(
        "fallocate --punch-hole --keep-size --offset 1000 --length {} {}",
        16 * MIB,
        file.display()
    ));
    let data = std::fs::read(&file).unwrap();
    assert!(data[1000..1000 + 16 * MIB].iter().all(|&b| b == 0));
    assert!(data[..1000] == std::fs::read(&img).unwrap()[..1000]);
    assert!(data[1000 + 16 * MIB..32 * MIB] == std::fs::read(&img).unwrap()[1000 + 16 * MIB..]);
    // The point still holds the data; after removing it, gc frees the space.
    env.ok(&["gc"]);
    assert!(env.json(&["df"])["pack_bytes"].as_u64().unwrap() >= before);
    env.ok(&["point", "rm", "app1", "latest"]);
    env.ok(&["gc"]);
    let after = env.json(&["df"])["pack_bytes"].as_u64().unwrap();
    println!("pack bytes: {before} -> {after}");
    assert!(after + 15 * MIB as u64 <= before, "{before} -> {after}");
    // cp --sparse through the mount keeps the hole.
    let copy = env.path("copy.img");
    sh(&format!(
        "cp --sparse=always {} {}",
        file.display(),
        copy.display()
    ));
    let alloc = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&copy).unwrap()) * 512;
    assert!(alloc <= 17 * MIB as u64, "copy allocates {alloc}");
    m.stop();
    drop(srv);
}

#[test]
fn qemu_img_info_and_convert_on_mounted_files() {
    need("qemu-img");
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&["group", "create", "app1"]);
    env.ok(&["volume", "create", "app1/disk0", "--size", "16M"]);
    let img = env.path("a.img");
    let mut data = random_bytes(5, 4 * MIB);
    data.resize(16 * MIB, 0);
    std::fs::write(&img, &data).unwrap();
    env.ok(&["import", "app1/disk0", img.to_str().unwrap()]);
    // Without the daemon: the mount opens the store itself.
    let m = Mount::start(&env);
    let file = m.dir.join("app1/disk0");
    let info: serde_json::Value = serde_json::from_str(&run(
        "qemu-img",
        &["info", "--output=json", "-f", "raw", file.to_str().unwrap()],
    ))
    .unwrap();
    assert_eq!(info["virtual-size"], 16 * MIB as u64);
    let q = env.path("out.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            file.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            q.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    // convert into the mount too
    let back = env.path("back.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            q.to_str().unwrap(),
            back.to_str().unwrap(),
        ],
    );
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            back.to_str().unwrap(),
            file.to_str().unwrap(),
        ],
    );
    m.stop();
    let out = env.path("o.img");
    env.ok(&["export", "app1/disk0", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == data);
}

#[test]
fn fusermount_unmount_ends_the_mount_process_cleanly() {
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&["group", "create", "app1"]);
    let mut m = Mount::start(&env);
    run("fusermount3", &["-u", m.dir.to_str().unwrap()]);
    let st = m.child.wait().unwrap();
    assert!(
        st.success(),
        "drclone mount exited with {st} after fusermount3 -u"
    );
    std::mem::forget(m);
    // The store was closed cleanly: it opens and verifies.
    env.ok(&["verify"]);
}

#[test]
fn stale_mount_gets_a_clear_message_and_a_way_out() {
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&["group", "create", "app1"]);
    let mut m = Mount::start(&env);
    // Simulate a crash of the mounting process.
    m.child.kill().unwrap();
    m.child.wait().unwrap();
    let dir = m.dir.clone();
    std::mem::forget(m);
    let err = env.fails(&["mount", dir.to_str().unwrap()]);
    assert!(
        err.contains("drclone unmount") && err.contains("fusermount3 -u"),
        "{err}"
    );
    env.ok(&["unmount", dir.to_str().unwrap()]);
    let m = Mount::start(&env);
    assert!(Path::new(&m.dir).join("app1").is_dir());
    m.stop();
}
