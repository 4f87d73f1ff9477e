//! The DR commands: `test`, `drill`, `failover`, `status`, `audit`,
//! `retention`, `point rm`.  The workflows are the library's (`drclone::dr`);
//! this file parses, calls and prints.
//!
//! `drclone test` is the one command that runs in the client: its `--exec`
//! command must run in the operator's environment, not the daemon's.  It asks
//! the daemon to start the drill (`drill start`, internal), runs the command
//! with the clones' URIs, and reports the outcome (`drill finish`, internal).
//! With no daemon running it starts one for the drill, on a private unix
//! socket, and stops it after.

use anyhow::{bail, Context, Result};
use drclone::daemon::{self, ControlRequest};
use drclone::dr::drill::{self, DrillOptions, DrillRec, Outcome};
use drclone::dr::failover::{self, Request};
use drclone::dr::{audit, retention, status, Actor};
use drclone::engine::types::{parse_duration, RetentionPolicy};
use drclone::Store;
use serde_json::json;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::args::*;
use super::commands::{fmt_time, print};

/// The URI of an export on this process's NBD server, or its bare name when
/// this process serves none.
fn uri(name: &str) -> String {
    daemon::export_uri(name).unwrap_or_else(|| name.to_string())
}

fn drill_json(d: &DrillRec) -> serde_json::Value {
    let mut v = serde_json::to_value(d).expect("drill record serializes");
    v["uris"] = json!(d.exports.iter().map(|e| uri(e)).collect::<Vec<_>>());
    v
}

/// DR commands against an open store (local, or in the daemon for a client).
pub(crate) fn dispatch(
    store: &Arc<Store>,
    cmd: Cmd,
    json: bool,
    out: &mut String,
    who: Actor,
) -> Result<()> {
    match cmd {
        Cmd::Drill(DrillCmd::List) => {
            let ds = drill::list(store)?;
            let text = || {
                ds.iter()
                    .map(|d| {
                        format!(
                            "drill {:>4}  {:<16} point {:<5} {}  {:<8} {}",
                            d.id,
                            d.group,
                            d.point,
                            fmt_time(d.started),
                            match d.ok {
                                None => "running",
                                Some(true) => "passed",
                                Some(false) => "FAILED",
                            },
                            if d.clones_removed.is_some() {
                                "clones removed".to_string()
                            } else {
                                d.exports.join(" ")
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let v: Vec<_> = ds.iter().map(drill_json).collect();
            print(out, json, json!(v), text);
        }
        Cmd::Drill(DrillCmd::Show { id }) => {
            let d = drill::get(store, id)?;
            print(out, json, drill_json(&d), || {
                serde_json::to_string_pretty(&drill_json(&d)).expect("json")
            });
        }
        Cmd::Drill(DrillCmd::Rm { id }) => {
            drill::remove(store, who, id, &daemon::disconnect)?;
            print(out, json, json!({"removed": id}), || {
                format!("removed drill {id}")
            });
        }
        Cmd::Drill(DrillCmd::Start {
            group,
            point,
            keep,
            ttl,
            command,
        }) => {
            let opts = DrillOptions {
                point: Some(point),
                keep,
                ttl: ttl.as_deref().map(parse_duration).transpose()?,
                command,
            };
            let d = drill::start(store, who, &group, &opts)?;
            print(out, true, drill_json(&d), String::new);
        }
        Cmd::Drill(DrillCmd::Finish {
            id,
            exit_code,
            duration_ms,
            ready_ms,
            output_tail,
        }) => {
            if let Some(ms) = ready_ms {
                let mut d = drill::get(store, id)?;
                d.time_to_ready_ms = ms;
                store.put_record(drclone::engine::keys::DRILL, id, &d)?;
            }
            let d = match drill::finish(
                store,
                who,
                id,
                Outcome {
                    exit_code,
                    duration_ms,
                    output_tail,
                },
                &daemon::disconnect,
            ) {
                // A retry after a client held a clone: the outcome is recorded;
                // only the clones remain to go.
                Err(drclone::Error::Refused(_))
                    if drill::get(store, id)?.state == drill::DrillState::Finished =>
                {
                    drill::remove_clones(store, id, &daemon::disconnect)?
                }
                r => r?,
            };
            print(out, true, drill_json(&d), String::new);
        }
        Cmd::Failover {
            group,
            point,
            planned,
            undo,
            commit,
        } => {
            let req = if undo {
                Request::Undo
            } else if commit {
                Request::Commit
            } else if planned {
                Request::Planned
            } else {
                Request::To(point)
            };
            let r = failover::run(store, who, &group, &req, &daemon::disconnect)?;
            let uris: Vec<String> = r.exports.iter().map(|e| uri(e)).collect();
            let v = json!({
                "group": r.group,
                "point": r.point,
                "exports": uris,
                "time_ms": r.time_ms,
                "role": r.role,
                "epoch": r.epoch,
                "disconnected": r.disconnected,
            });
            print(out, json, v, || {
                let what = match req {
                    Request::Undo => {
                        "failover undone: the names serve the replica heads again".into()
                    }
                    Request::Commit => {
                        "failover committed: the failover heads are the group's heads".into()
                    }
                    _ => format!(
                        "failed over to point {} in {} ms",
                        r.point.map_or("?".into(), |p| p.to_string()),
                        r.time_ms
                    ),
                };
                format!(
                    "group {group}: {what} (role {}, epoch {}; {} client(s) disconnected)\n{}",
                    r.role,
                    r.epoch,
                    r.disconnected,
                    uris.join("\n")
                )
            });
        }
        Cmd::Status => {
            let st = status::status(store, drclone::util::now_secs())?;
            print(out, json, serde_json::to_value(&st)?, || {
                st.iter()
                    .map(|g| {
                        format!(
                            "{:<16} {:<12} points {:<4} latest {:<6} RPO {:<10} last drill {}",
                            g.group,
                            g.role.to_string(),
                            g.points,
                            g.latest_point.map_or("-".into(), |p| p.to_string()),
                            g.rpo_seconds.map_or("-".into(), |s| format!("{s} s")),
                            match &g.last_drill {
                                None => "never".to_string(),
                                Some(d) => format!(
                                    "{} at {} ({})",
                                    d.drill,
                                    fmt_time(d.time),
                                    match d.ok {
                                        None => "running",
                                        Some(true) => "passed",
                                        Some(false) => "FAILED",
                                    }
                                ),
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
                    + &store.chunks.backend.backlog().map_or(String::new(), |b| {
                        format!(
                            "\nuploads to {}: {} pack(s) waiting, {} unsent (bound {}), \
                                 oldest unsent {}{}",
                            b.target,
                            b.packs,
                            drclone::util::human(b.bytes),
                            drclone::util::human(b.bound_bytes),
                            b.oldest_seconds.map_or("-".into(), |s| format!("{s} s")),
                            b.last_error
                                .map_or(String::new(), |e| format!("; failing: {e}"))
                        ) + &b.catalog.map_or(String::new(), |c| {
                            format!(
                                "\ncatalog in the bucket: {}{}{}",
                                c.uploaded_seq.map_or(
                                    "none uploaded by this process".into(),
                                    |s| {
                                        format!(
                                            "checkpoint {s}, taken {} s ago",
                                            c.uploaded_age_secs.unwrap_or(0)
                                        )
                                    }
                                ),
                                if c.waiting {
                                    "; a newer one waits for its packs"
                                } else {
                                    ""
                                },
                                c.error.map_or(String::new(), |e| format!("; failing: {e}"))
                            )
                        })
                    })
            });
        }
        Cmd::Audit => {
            let es = audit::list(store)?;
            print(out, json, serde_json::to_value(&es)?, || {
                es.iter()
                    .map(|e| {
                        format!(
                            "{:>5} {} uid {:<5} {:<16} {:<12} point {:<5} {}{}",
                            e.seq,
                            fmt_time(e.time),
                            e.uid,
                            e.action,
                            e.group,
                            e.point.map_or("-".into(), |p| p.to_string()),
                            e.outcome,
                            e.detail
                                .as_ref()
                                .map_or(String::new(), |d| format!(" ({d})"))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Cmd::Retention(RetentionCmd::Set { group, policy, app }) => {
            let r = policy.parse::<RetentionPolicy>().and_then(|p| {
                store.set_retention(&group, Some(p.clone()), app)?;
                Ok(p)
            });
            let p = audit::record(
                store,
                who,
                audit::Action {
                    action: "retention-set",
                    group: &group,
                    detail: Some(format!("{}{policy}", if app { "app " } else { "" })),
                    ..Default::default()
                },
                r,
            )?;
            let policy = p.to_string();
            print(
                out,
                json,
                json!({"group": group, "retention": policy, "app": app}),
                || {
                    format!(
                        "retention of {group}{}: {policy}",
                        if app { " (app points)" } else { "" }
                    )
                },
            );
        }
        Cmd::Retention(RetentionCmd::Apply { group }) => {
            let removed = retention::apply(store, who, &group, drclone::util::now_secs())?;
            print(
                out,
                json,
                json!({"group": group, "removed": removed}),
                || format!("{group}: {} point(s) removed {removed:?}", removed.len()),
            );
        }
        Cmd::Point(PointCmd::Rm { group, point }) => {
            let r = store.remove_point(&group, &point);
            let p = audit::record(
                store,
                who,
                audit::Action {
                    action: "point-rm",
                    group: &group,
                    point: point.parse().ok(),
                    ..Default::default()
                },
                r,
            )?;
            print(out, json, json!({"removed": p.id.to_string()}), || {
                format!("removed point {} of {group}", p.id)
            });
        }
        _ => unreachable!("not a DR command"),
    }
    Ok(())
}

/// A daemon this drill started (no daemon was running): stopped on drop.
pub(crate) struct OwnDaemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for OwnDaemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Start `drclone serve` on a private unix socket for the drill and wait until
/// its control socket answers.  `own_group`: in a process group of its own, so
/// the terminal's Ctrl-C reaches only the caller (which then stops it).
pub(crate) fn start_daemon(cli: &Cli, own_group: bool) -> Result<OwnDaemon> {
    let socket = std::env::temp_dir().join(format!("drclone-drill-{}.sock", std::process::id()));
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--store").arg(&cli.store);
    if let Some(k) = &cli.key_file {
        cmd.arg("--key-file").arg(k);
    }
    cmd.args(["serve", "--no-tcp", "--socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if own_group {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let child = cmd
        .spawn()
        .context("starting drclone serve for the drill")?;
    let mut d = OwnDaemon { child, socket };
    let t0 = Instant::now();
    while daemon::connect(&cli.store).is_none() {
        if let Some(st) = d.child.try_wait()? {
            bail!(
                "drclone serve (started for the drill) exited with {st}; \
                 run `drclone serve` to see why"
            );
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("drclone serve (started for the drill) did not come up in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(d)
}

/// Send `args` (after `drclone --store S --json`) to the daemon; the JSON it
/// prints.
pub(crate) fn ask(store: &Path, args: &[String]) -> Result<serde_json::Value> {
    let conn = daemon::connect(store).context("the daemon went away during the drill")?;
    let mut argv = vec![
        "drclone".to_string(),
        "--store".into(),
        store.display().to_string(),
        "--json".into(),
    ];
    argv.extend(args.iter().cloned());
    let resp = daemon::forward(
        conn,
        &ControlRequest {
            argv,
            cwd: std::env::current_dir()?,
            uid: None,
        },
    )?;
    if resp.code != 0 {
        bail!(
            "{}",
            resp.stderr.trim().trim_start_matches("drclone: error: ")
        );
    }
    Ok(serde_json::from_str(&resp.stdout).context("the daemon's answer is not JSON")?)
}

/// Run `sh -c cmd` with the exports in its environment; its output goes to
/// our stderr (stdout with `to_stdout`) and its tail is kept.
fn run_command(
    cmd: &str,
    uris: &[String],
    drill: u64,
    to_stdout: bool,
) -> Result<(Option<i32>, String)> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("DRCLONE_EXPORTS", uris.join("\n"))
        .env("DRCLONE_DRILL", drill.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let tail = Arc::new(Mutex::new(Vec::<u8>::new()));
    let pump = |mut r: Box<dyn Read + Send>, to_stdout: bool| {
        let tail = tail.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                use std::io::Write;
                if to_stdout {
                    let _ = std::io::stdout().write_all(&buf[..n]);
                } else {
                    let _ = std::io::stderr().write_all(&buf[..n]);
                }
                let mut t = tail.lock().unwrap();
                t.extend_from_slice(&buf[..n]);
                let cap = 2 * drill::OUTPUT_TAIL;
                if t.len() > cap {
                    let cut = t.len() - drill::OUTPUT_TAIL;
                    t.drain(..cut);
                }
            }
        })
    };
    let a = pump(Box::new(child.stdout.take().unwrap()), to_stdout);
    let b = pump(Box::new(child.stderr.take().unwrap()), false);
    let status = child.wait()?;
    let _ = (a.join(), b.join());
    let t = tail.lock().unwrap();
    let text = String::from_utf8_lossy(&t).into_owned();
    // A command killed by a signal has no code: it failed.
    Ok((Some(status.code().unwrap_or(-1)), text))
}

/// `drclone test`: the drill, driven from the client.  Exit code 0 when the
/// drill passed, 1 when its command failed.
pub(crate) fn run_test(cli: &Cli) -> Result<i32> {
    let Cmd::Test {
        group,
        point,
        exec,
        keep,
        ttl,
    } = &cli.cmd
    else {
        unreachable!()
    };
    if let Some(t) = ttl {
        parse_duration(t)?;
    }
    let t0 = Instant::now();
    let own = if daemon::connect(&cli.store).is_none() {
        Some(start_daemon(cli, false)?)
    } else {
        None
    };
    let mut args = vec![
        "drill".to_string(),
        "start".into(),
        group.clone(),
        "--point".into(),
        point.clone(),
    ];
    if *keep {
        args.push("--keep".into());
    }
    if let Some(t) = ttl {
        args.extend(["--ttl".into(), t.clone()]);
    }
    if let Some(c) = exec {
        args.extend(["--command".into(), c.clone()]);
    }
    let started = ask(&cli.store, &args)?;
    let ready_ms = t0.elapsed().as_millis() as u64;
    let id = started["id"].as_u64().context("drill start: no id")?;
    let uris: Vec<String> = serde_json::from_value(started["uris"].clone())?;
    if !cli.json {
        println!(
            "drill {id} of {group} at point {}: ready in {ready_ms} ms",
            started["point"]
        );
        for u in &uris {
            println!("  {u}");
        }
    }
    let (code, tail) = match exec {
        Some(c) => run_command(c, &uris, id, !cli.json)?,
        None => (None, String::new()),
    };
    let mut fin = vec![
        "drill".to_string(),
        "finish".into(),
        id.to_string(),
        "--duration-ms".into(),
        t0.elapsed().as_millis().to_string(),
        "--ready-ms".into(),
        ready_ms.to_string(),
        format!("--output-tail={tail}"),
    ];
    if let Some(c) = code {
        fin.push(format!("--exit-code={c}"));
    }
    let d: DrillRec = serde_json::from_value(ask(&cli.store, &fin)?)?;
    drop(own);
    let ok = d.ok == Some(true);
    let report = json!({
        "ok": ok,
        "drill": d.id,
        "group": d.group,
        "point": d.point,
        "exports": uris,
        "time_to_ready_ms": ready_ms,
        "exit_code": d.exit_code,
        "duration_ms": d.duration_ms,
        "kept": d.clones_removed.is_none(),
    });
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "drill {id}: {} ({}{} ms){}",
            if ok { "PASSED" } else { "FAILED" },
            d.exit_code
                .map_or(String::new(), |c| format!("exit code {c}, ")),
            d.duration_ms.unwrap_or(0),
            if d.clones_removed.is_none() {
                format!(
                    "; clones kept until {} (drclone drill rm {id})",
                    fmt_time(d.expires)
                )
            } else {
                "; clones removed".into()
            }
        );
    }
    Ok(if ok { 0 } else { 1 })
}
