//! Boot verification with a real VM: a Debian guest built by `tools/make-guest`
//! is imported into a group, served by the real `drclone serve`, and booted by
//! `tools/boot-check` (qemu-system-x86_64, TCG here) straight from the NBD
//! export. The guest appends one line to `/var/log/drclone-boot` on its root
//! file system when it boots (see `tools/make-guest`); reading that file back
//! with `debugfs` proves where the guest's writes landed.
//!
//! The guest image is built once per machine (about 2 minutes) and cached in
//! `$DRCLONE_GUEST_CACHE` (default `~/.cache/drclone-guest`). The tools these
//! tests need are installed by `scripts/setup.sh`; a missing one fails the test.

mod common;

use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// One VM at a time: two TCG guests on 2 cores would only slow each other down.
static VM: Mutex<()> = Mutex::new(());

/// Seconds `tools/boot-check` waits for the guest. A TCG boot takes 14-25 s on
/// an idle 2-core machine; this leaves room for a loaded CI machine.
const BOOT_TIMEOUT_S: &str = "600";

fn tool(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools")
        .join(name)
}

/// The cached guest image and the facts `tools/make-guest` recorded about it.
struct Guest {
    img: PathBuf,
    size_bytes: u64,
    build_id: String,
    /// Byte offset of the ext4 root partition inside the disk.
    root_offset: u64,
}

/// Build the guest, or reuse the cached one (make-guest takes a lock, so
/// parallel tests build it once).
fn guest() -> Guest {
    for t in [
        "qemu-system-x86_64",
        "debootstrap",
        "debugfs",
        "mkfs.fat",
        "mcopy",
        "syslinux",
        "sfdisk",
    ] {
        need(t);
    }
    let out = Command::new("timeout")
        .args(["--kill-after=10", "1800"])
        .arg(tool("make-guest"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tools/make-guest failed ({}); its messages are above",
        out.status
    );
    let img = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let meta_path = PathBuf::from(format!("{}.meta", img.display()));
    let meta: HashMap<String, String> = std::fs::read_to_string(&meta_path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let size_bytes: u64 = meta["size_bytes"].parse().unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), size_bytes);
    println!(
        "guest {}: {} bytes, build {}, built in {} s",
        img.display(),
        size_bytes,
        meta["build_id"],
        meta["build_seconds"]
    );
    Guest {
        img,
        size_bytes,
        build_id: meta["build_id"].clone(),
        root_offset: meta["root_offset"].parse().unwrap(),
    }
}

/// A store with group `vm`, volume `vm/root` holding the guest, and point 1 of it.
fn protect_guest(env: &Env, g: &Guest) {
    env.ok(&["init"]);
    env.ok(&["group", "create", "vm"]);
    env.ok(&[
        "volume",
        "create",
        "vm/root",
        "--size",
        &g.size_bytes.to_string(),
    ]);
    env.ok(&["import", "vm/root", g.img.to_str().unwrap()]);
    env.ok(&["point", "create", "vm"]);
}

/// The guest (built or cached), the VM lock, and a store protecting the guest.
fn protected_guest() -> (Guest, std::sync::MutexGuard<'static, ()>, Env) {
    let g = guest();
    let vm = VM.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new();
    protect_guest(&env, &g);
    (g, vm, env)
}

/// `/var/log/drclone-boot` of a disk (head or point) read back through
/// `drclone export` and debugfs: Some(contents), or None when the file does not exist.
fn boot_log(env: &Env, g: &Guest, what: &str) -> Option<String> {
    let raw = env.path(&format!("{}.raw", what.replace(['/', '@'], "_")));
    env.ok(&["export", what, raw.to_str().unwrap()]);
    let dev = format!("{}?offset={}", raw.display(), g.root_offset);
    let out = Command::new("debugfs")
        .args(["-R", "cat /var/log/drclone-boot", &dev])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    std::fs::remove_file(&raw).unwrap();
    assert!(out.status.success(), "debugfs on {what} failed: {stderr}");
    if stderr.contains("File not found") {
        assert!(out.stdout.is_empty());
        return None;
    }
    assert!(
        !stderr.contains("Bad magic") && !stderr.contains("while trying to open"),
        "debugfs cannot read the root file system of {what}: {stderr}"
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// Run `tools/boot-check` with `DRCLONE_EXPORTS`, its console log kept in the
/// test's folder; returns (success, stdout, stderr).
fn boot_check(env: &Env, exports: &str) -> (bool, String, String) {
    let out = Command::new(tool("boot-check"))
        .args(["--timeout", BOOT_TIMEOUT_S, "--log"])
        .arg(env.path("console.log"))
        .env("DRCLONE_EXPORTS", exports)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn guest_boots_from_the_head_over_nbd_and_its_boot_write_lands_in_the_head() {
    let (g, _vm, env) = protected_guest();
    assert_eq!(
        boot_log(&env, &g, "vm/root"),
        None,
        "a fresh guest has no boot record"
    );

    // A data disk: the guest reports the sha256 of its first MiB.
    let data = env.path("data.img");
    std::fs::write(&data, random_bytes(11, 8 << 20)).unwrap();
    env.ok(&["volume", "create", "vm/data", "--size", "8M"]);
    env.ok(&["import", "vm/data", data.to_str().unwrap()]);
    let first_mib = env.path("data-1m.img");
    std::fs::write(&first_mib, &random_bytes(11, 8 << 20)[..1 << 20]).unwrap();
    let sha = run("sha256sum", &[first_mib.to_str().unwrap()]);
    let sha = sha.split_whitespace().next().unwrap();

    let server = Server::start(&env);
    // The boot disk over the unix socket, the data disk over TCP.
    let exports = format!("{}\n{}\n", server.unix("vm/root"), server.tcp("vm/data"));
    let (ok, stdout, stderr) = boot_check(&env, &exports);
    assert!(ok, "boot-check failed on {exports}:\n{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("BOOT-OK "))
        .unwrap_or_else(|| panic!("no BOOT-OK line: {stdout}"));
    println!("{line}");
    assert!(
        line.contains(&format!("boots=1 build={}", g.build_id)),
        "the guest booted read-write from our disk: {line}"
    );
    assert!(
        stdout.contains(&format!(
            "DRCLONE-DATA-DISK dev=/dev/vdb bytes={} sha256-1m={sha}",
            8 << 20
        )),
        "the guest sees the data disk's bytes: {stdout}"
    );

    // The guest's write is in the head it booted from, and nowhere else.
    let head = boot_log(&env, &g, "vm/root").expect("the boot record is in the head");
    let lines: Vec<&str> = head.lines().collect();
    assert_eq!(lines.len(), 1, "one boot, one line: {head:?}");
    assert!(
        lines[0].starts_with(&format!("DRCLONE-BOOT boot=1 build={} uptime=", g.build_id)),
        "{head:?}"
    );
    assert_eq!(
        boot_log(&env, &g, "vm/root@1"),
        None,
        "the point taken before the boot does not hold the boot's write"
    );
    server.stop();
}

/// Is a qemu-system process still running with `needle` on its command line?
fn qemu_running_with(needle: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| {
                let c = String::from_utf8_lossy(&c);
                c.starts_with("qemu-system") && c.contains(needle)
            })
            .unwrap_or(false)
    })
}

#[test]
fn boot_check_fails_clearly_and_leaves_no_qemu_running() {
    need("qemu-system-x86_64");
    let _vm = VM.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&["group", "create", "vm"]);
    env.ok(&["volume", "create", "vm/blank", "--size", "64M"]);
    let server = Server::start(&env);
    let sock = server.sock.display().to_string();

    // No such export: qemu cannot open the disk and exits at once.
    let (ok, stdout, stderr) = boot_check(&env, &server.unix("vm/nope"));
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("BOOT-FAIL reason=qemu-exited"), "{stdout}");
    assert!(
        stderr.contains("qemu: "),
        "qemu's own message is shown: {stderr}"
    );

    // A disk that does not boot: the firmware finds nothing, boot-check times
    // out, says so and shows the end of the console.
    let out = Command::new(tool("boot-check"))
        .args(["--timeout", "10", "--log"])
        .arg(env.path("blank.log"))
        .arg(server.unix("vm/blank"))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("BOOT-FAIL reason=timeout"), "{stdout}");
    assert!(stderr.contains("did not come up"), "{stderr}");
    assert!(
        stderr.contains("last 30 lines of the serial console"),
        "{stderr}"
    );
    assert!(!qemu_running_with(&sock), "boot-check left a qemu running");

    // Usage errors are clear too.
    let out = Command::new(tool("boot-check"))
        .env_remove("DRCLONE_EXPORTS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DRCLONE_EXPORTS"));
    server.stop();
}

#[test]
fn drill_boots_the_guest_from_its_clone_and_the_boot_write_stays_in_the_drill() {
    let (g, _vm, env) = protected_guest();
    let server = Server::start(&env);

    // Exactly the command, run from the repository root.
    let out = env
        .cmd()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["test", "vm", "--json", "--exec"])
        .arg(format!("tools/boot-check --timeout {BOOT_TIMEOUT_S}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the drill failed:\n{stdout}\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["exit_code"], 0, "{report}");
    assert_eq!(report["point"], 1, "{report}");
    let exports = report["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 1, "one disk, one clone: {report}");
    assert!(
        !exports[0].as_str().unwrap().contains("vm/root"),
        "the drill boots a clone, not the head: {report}"
    );
    // In --json mode the command's output goes to stderr.
    let line = stderr
        .lines()
        .find(|l| l.starts_with("BOOT-OK "))
        .unwrap_or_else(|| panic!("no BOOT-OK line: {stderr}"));
    println!(
        "{line}; drill time to ready {} ms, duration {} ms",
        report["time_to_ready_ms"], report["duration_ms"]
    );
    assert!(
        line.contains(&format!("boots=1 build={}", g.build_id)),
        "the guest wrote its boot record into the writable clone: {line}"
    );

    // The guest's write stayed in the drill: neither the head nor the point has it.
    assert_eq!(boot_log(&env, &g, "vm/root"), None, "the head is untouched");
    assert_eq!(
        boot_log(&env, &g, "vm/root@1"),
        None,
        "the point is untouched"
    );
    server.stop();
}
