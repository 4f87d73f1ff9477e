//! A plan's script: run in its own process group with a timeout (SIGTERM, then
//! SIGKILL after a grace), its output's tail kept for the report.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::run::{Drills, RunOptions, ScriptReport};
use super::{Plan, Step, TAIL_BYTES, TAIL_LINES};
use crate::util::now_secs;

/// Bytes of output buffered while a script runs (the tail is cut from them).
const BUFFER_BYTES: usize = 64 * 1024;

/// How long a script that timed out gets between SIGTERM and SIGKILL.
pub(super) const KILL_GRACE: Duration = Duration::from_secs(5);

/// How long the output of a script that exited is still collected (a process
/// it left in the background may hold its pipes open).
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// Why a script failed, if it did.
pub(super) fn script_failure(what: &str, s: &ScriptReport) -> Option<String> {
    (!s.ok).then(|| format!("{what} script {}", s.how()))
}

impl ScriptReport {
    /// How it ended, in words: "exited with 0", "timed out after 2001 ms", ...
    pub fn how(&self) -> String {
        if let Some(e) = &self.error {
            format!("could not run: {e}")
        } else if self.timed_out {
            format!("timed out after {} ms", self.duration_ms)
        } else if self.interrupted {
            "interrupted".into()
        } else if let Some(sig) = self.signal {
            format!("killed by signal {sig}")
        } else {
            format!(
                "exited with {}",
                self.exit_code.map_or("?".into(), |c| c.to_string())
            )
        }
    }
}

/// Whether process `pid` (our child) has exited, without reaping it (so its
/// process group id cannot be reused while we still signal the group).
fn exited_unreaped(pid: u32) -> bool {
    // SAFETY: waitid on our own child with WNOWAIT only reads its state into
    // a zeroed siginfo_t we own.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        r == 0 && info.si_pid() != 0
    }
}

pub(super) fn signal_group(pgid: u32, sig: i32) {
    // SAFETY: signalling the process group our child leads.
    unsafe { libc::kill(-(pgid as i32), sig) };
}

/// Run one script through `sh -c` in the plan's directory, in a process group
/// of its own (so a timeout kills everything it started), with the plan's
/// environment.  Under test its group is recorded in `drills`, so what it
/// leaves running is stopped at the end.
pub(super) fn run_script(
    plan: &Plan,
    step: &Step,
    phase: &str,
    command: &str,
    exports: &[String],
    opts: &RunOptions,
    drills: &Drills,
) -> ScriptReport {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let t0 = Instant::now();
    let mut rep = ScriptReport {
        command: command.to_string(),
        ok: false,
        exit_code: None,
        signal: None,
        timed_out: false,
        interrupted: false,
        started: now_secs(),
        duration_ms: 0,
        output_tail: String::new(),
        error: None,
    };
    (opts.progress)(&format!("step {}: {phase} script: {command}", step.name));
    // One pipe for stdout and stderr, so the tail keeps the output's order.
    let pipe = output_pipe().and_then(|(r, w)| Ok((r, w.try_clone()?, w)));
    let (reader, out, err) = match pipe {
        Ok(p) => p,
        Err(e) => {
            rep.error = Some(format!("a pipe for the script's output: {e}"));
            return rep;
        }
    };
    let spawned = Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(&plan.dir)
        .env("DRCLONE_PLAN", &plan.name)
        .env("DRCLONE_STEP", &step.name)
        .env("DRCLONE_PHASE", phase)
        .env("DRCLONE_GROUPS", step.groups.join(" "))
        .env("DRCLONE_EXPORTS", exports.join("\n"))
        .env("DRCLONE_TEST", if opts.test { "1" } else { "0" })
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .spawn();
    // (The Command, with our copies of the pipe's write end, is gone here: the
    // reader sees EOF once the script and whatever it started close theirs.)
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            rep.error = Some(format!("sh -c {command:?}: {e}"));
            return rep;
        }
    };
    let pid = child.id();
    let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    {
        let (buf, echo, mut r) = (buf.clone(), opts.echo, reader);
        std::thread::spawn(move || {
            use std::io::Read;
            let mut b = [0u8; 8192];
            while let Ok(n) = r.read(&mut b) {
                if n == 0 {
                    break;
                }
                if echo {
                    use std::io::Write;
                    let _ = std::io::stderr().write_all(&b[..n]);
                }
                let mut t = buf.lock().unwrap();
                t.extend_from_slice(&b[..n]);
                if t.len() > 2 * BUFFER_BYTES {
                    let cut = t.len() - BUFFER_BYTES;
                    t.drain(..cut);
                }
            }
            let _ = tx.send(());
        });
    }
    // None: past what an Instant holds, so never (found by
    // tests/breakit_dr2.rs: `timeout = "18446744073709551615s"` panicked).
    let deadline = t0.checked_add(Duration::from_secs(step.timeout_secs));
    loop {
        if exited_unreaped(pid) {
            break;
        }
        let late = deadline.is_some_and(|d| Instant::now() >= d);
        if late || opts.stopped() {
            rep.timed_out = late;
            rep.interrupted = !late;
            log::warn!(
                "plan {} step {}: {phase} script {}; killing it",
                plan.name,
                step.name,
                if late { "timed out" } else { "interrupted" }
            );
            signal_group(pid, libc::SIGTERM);
            let grace = Instant::now() + KILL_GRACE;
            while !exited_unreaped(pid) && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Whatever of the group is left (the leader is not reaped yet, so
            // the group id is still ours).
            signal_group(pid, libc::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if opts.test {
        // Before the leader is reaped: the group id is ours until then.
        drills.scripts.lock().unwrap().push(pid);
    }
    match child.wait() {
        Ok(st) => {
            rep.exit_code = st.code();
            rep.signal = st.signal();
        }
        Err(e) => rep.error = Some(format!("waiting for {command:?}: {e}")),
    }
    // The output still in the pipes; a process left in the background may
    // hold them open, so not for long.
    let _ = rx.recv_timeout(DRAIN_WAIT);
    rep.duration_ms = t0.elapsed().as_millis() as u64;
    rep.output_tail = tail(&String::from_utf8_lossy(&buf.lock().unwrap()));
    rep.ok = rep.error.is_none() && !rep.timed_out && !rep.interrupted && rep.exit_code == Some(0);
    rep
}

/// A pipe (read end, write end), both close-on-exec (the child gets the
/// write end as its stdout and stderr, which clears the flag there).
fn output_pipe() -> std::io::Result<(std::fs::File, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// The last [`TAIL_LINES`] lines of `s`, at most [`TAIL_BYTES`] of them.
pub(super) fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.trim_end_matches('\n').lines().collect();
    let t = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    if t.len() <= TAIL_BYTES {
        return t;
    }
    let mut start = t.len() - TAIL_BYTES;
    while !t.is_char_boundary(start) {
        start += 1;
    }
    t[start..].to_string()
}
