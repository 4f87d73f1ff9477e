//! The FUSE mount with the real kernel: ext4 inside a volume file via a loop
//! device, e2fsck, read-only points, hole punching, qemu-img on mounted files,
//! `fallocate` past the end, and `volume resize` under an open file and a loop
//! device (issue 9, "Found by trying public bug reports").

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

const MIB: usize = 1 << 20;

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

/// `fallocate(2)` from Python through ctypes: returns 0 or the errno.
const PY_FALLOCATE: &str = r#"
import ctypes, os, json
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
def falloc(fd, mode, off, ln):
    return 0 if libc.fallocate(fd, mode, off, ln) == 0 else ctypes.get_errno()
FALLOC_FL_KEEP_SIZE = 1
"#;

/// `fallocate` past the end of a volume file grows the volume, as it grows a
/// plain file (mode 0), or fails with a clear errno (KEEP_SIZE: nothing to
/// reserve); it never returns 0 and leaves the size as it was.  Within the size it
/// keeps the data.
#[test]
fn fallocate_past_the_end_grows_the_volume_or_fails_clearly() {
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&["group", "create", "app1"]);
    env.ok(&["volume", "create", "app1/disk0", "--size", "4M"]);
    let img = env.path("a.img");
    let data = random_bytes(21, 4 * MIB);
    std::fs::write(&img, &data).unwrap();
    env.ok(&["import", "app1/disk0", img.to_str().unwrap()]);
    let srv = Server::start(&env);
    let m = Mount::start(&env);
    let file = m.dir.join("app1/disk0");
    let out = run(
        "/usr/bin/python3",
        &[
            "-c",
            &format!(
                r#"{PY_FALLOCATE}
fd = os.open("{}", os.O_RDWR)
res = {{}}
res["inside"] = falloc(fd, 0, 0, {mib})
res["inside_size"] = os.fstat(fd).st_size
res["mode0"] = falloc(fd, 0, 4 * {mib}, {mib})
res["mode0_size"] = os.fstat(fd).st_size
if res["mode0"] == 0:
    try:
        res["tail_zeros"] = os.pread(fd, {mib}, 4 * {mib}) == bytes({mib})
        os.pwrite(fd, b"tail" * 1024, 4 * {mib} + 8192)
        res["tail_write"] = os.pread(fd, 4096, 4 * {mib} + 8192) == b"tail" * 1024
    except OSError as e:
        res["tail_write"] = str(e)
before = os.fstat(fd).st_size
res["keep"] = falloc(fd, FALLOC_FL_KEEP_SIZE, before, {mib})
res["keep_grew"] = os.fstat(fd).st_size - before
print(json.dumps(res))
"#,
                file.display(),
                mib = MIB
            ),
        ],
    );
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let clear = [libc::EOPNOTSUPP, libc::EFBIG, libc::ENOSPC];
    // Within the size: nothing to do, data kept.
    assert_eq!(r["inside"], 0, "{r}");
    assert_eq!(r["inside_size"], 4 * MIB as u64, "{r}");
    // Mode 0 past the end: grows (new bytes read as zeros and take writes) or fails clearly.
    match r["mode0"].as_i64().unwrap() {
        0 => {
            assert_eq!(r["mode0_size"], 5 * MIB as u64, "fallocate returned 0: {r}");
            assert_eq!(r["tail_zeros"], true, "{r}");
            assert_eq!(r["tail_write"], true, "{r}");
            let vols = env.json(&["volume", "list"]);
            assert!(vols.to_string().contains(&(5 * MIB).to_string()), "{vols}");
        }
        e => {
            assert!(
                clear.contains(&(e as i32)),
                "fallocate failed with errno {e}: {r}"
            );
            assert_eq!(r["mode0_size"], 4 * MIB as u64, "{r}");
        }
    }
    // KEEP_SIZE past the end: the size cannot stay and the call succeed.
    let keep = r["keep"].as_i64().unwrap();
    assert!(
        (keep == 0 && r["keep_grew"].as_u64().unwrap() > 0)
            || (clear.contains(&(keep as i32)) && r["keep_grew"] == 0),
        "fallocate(KEEP_SIZE) past the end returned {keep} and changed the size by {}: {r}",
        r["keep_grew"]
    );
    // The data inside was never touched.
    let all = std::fs::read(&file).unwrap();
    assert!(all[..4 * MIB] == data[..], "preallocation changed data");
    m.stop();
    srv.stop();
    env.ok(&["verify"]);
}

/// `drclone volume resize` while the volume file is open in the mount: the fd
/// opened before sees the new size, reads past the old size return zeros (not 0
/// bytes) and writes there succeed (not ENOSPC).  A loop device on the file
/// refreshed with `losetup -c` sees the new size and reads and writes past the
/// old one.
#[test]
fn volume_resize_reaches_open_files_and_loop_devices() {
    need("losetup");
    need("blockdev");
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&["group", "create", "app1"]);
    env.ok(&["volume", "create", "app1/disk0", "--size", "4M"]);
    let img = env.path("a.img");
    let data = random_bytes(22, 4 * MIB);
    std::fs::write(&img, &data).unwrap();
    env.ok(&["import", "app1/disk0", img.to_str().unwrap()]);
    let srv = Server::start(&env);
    let m = Mount::start(&env);
    let file = m.dir.join("app1/disk0");
    let lo = LoopDev::attach(&file);
    assert_eq!(
        sh(&format!("blockdev --getsize64 {}", lo.0)).trim(),
        (4 * MIB).to_string()
    );
    let mut c = PyChild::spawn(
        &env,
        "resize",
        &format!(
            r#"
fd = os.open("{}", os.O_RDWR)
say(os.fstat(fd).st_size)
sys.stdin.readline()
res = {{"size": os.fstat(fd).st_size}}
got = os.pread(fd, 65536, 6 * {mib})
res["read_len"] = len(got)
res["read_zeros"] = got == bytes(65536)
try:
    res["write"] = os.pwrite(fd, b"grown!!!" * 512, 6 * {mib})
except OSError as e:
    res["write"] = str(e)
res["read_back"] = os.pread(fd, 4096, 6 * {mib}) == b"grown!!!" * 512
res["old_data"] = os.pread(fd, 4096, 0) == open("{}", "rb").read(4096)
say(json.dumps(res))
"#,
            file.display(),
            img.display(),
            mib = MIB
        ),
    );
    assert_eq!(c.line(), (4 * MIB).to_string());
    env.ok(&["volume", "resize", "app1/disk0", "--size", "8M"]);
    c.send("go");
    let r: serde_json::Value = serde_json::from_str(&c.line()).unwrap();
    c.finish();
    assert_eq!(
        r,
        serde_json::json!({"size": 8 * MIB, "read_len": 65536, "read_zeros": true,
            "write": 4096, "read_back": true, "old_data": true}),
        "an fd opened before the resize"
    );
    // The loop device, refreshed.
    sh(&format!("losetup -c {}", lo.0));
    assert_eq!(
        sh(&format!("blockdev --getsize64 {}", lo.0)).trim(),
        (8 * MIB).to_string()
    );
    // Past the old size: 64 KiB of zeros (cmp fails the command otherwise).
    sh(&format!(
        "dd if={} bs=64k skip=100 count=1 iflag=direct status=none | cmp -n 65536 - /dev/zero",
        lo.0
    ));
    sh(&format!(
        "printf 'through the loop' | dd of={} bs=4096 seek=1800 conv=sync,notrunc oflag=direct status=none",
        lo.0
    ));
    drop(lo);
    let all = std::fs::read(&file).unwrap();
    assert_eq!(all.len(), 8 * MIB);
    assert!(all[..4 * MIB] == data[..]);
    assert_eq!(&all[1800 * 4096..1800 * 4096 + 16], b"through the loop");
    assert_eq!(&all[6 * MIB..6 * MIB + 8], b"grown!!!");
    m.stop();
    srv.stop();
    env.ok(&["verify"]);
}

/// A loop device on a file, detached on drop.
struct LoopDev(String);

impl LoopDev {
    fn attach(file: &Path) -> LoopDev {
        LoopDev(
            sh(&format!("losetup --find --show {}", file.display()))
                .trim()
                .to_string(),
        )
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}
