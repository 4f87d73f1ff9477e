//! `drclone plan run|check`: recovery plans (the library's `drclone::dr::plan`).
//!
//! Like `drclone test`, a plan runs in the client: its scripts must run in
//! the operator's environment.  The store side (failovers, drills, their
//! removal) goes through the daemon, started for the plan on a private unix
//! socket if none runs, and stopped after.  `plan check` asks a running
//! daemon about the groups, or opens the store itself when none runs.

use anyhow::{Context, Result};
use drclone::daemon;
use drclone::dr::plan::{self, GroupFacts, PlanReport, Problem, RunOptions, Site, Up};
use drclone::engine::types::Role;
use drclone::error::Error;
use drclone::Store;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::args::*;
use super::commands::fmt_time;
use super::dr::{ask, start_daemon};

/// `drclone plan run|check`.  Exit code 0 when the plan passed (or checked
/// clean), 1 otherwise.
pub(crate) fn run(cli: &Cli) -> Result<i32> {
    match &cli.cmd {
        Cmd::Plan(PlanCmd::Check { file }) => check(cli, file),
        Cmd::Plan(PlanCmd::Run { file, test }) => run_plan(cli, file, *test),
        _ => unreachable!("not a plan command"),
    }
}

/// Where the groups are looked up.
enum Inventory {
    Daemon(PathBuf),
    Local(Store),
}

impl Inventory {
    fn facts(&self, group: &str) -> drclone::error::Result<Option<GroupFacts>> {
        match self {
            Inventory::Local(store) => {
                let g = match store.group(group) {
                    Ok(g) => g,
                    Err(Error::NotFound(_)) => return Ok(None),
                    Err(e) => return Err(e),
                };
                let points = store
                    .points(group)?
                    .iter()
                    .map(|p| (p.id, p.kind == drclone::engine::types::PointKind::App))
                    .collect();
                Ok(Some(GroupFacts {
                    role: g.role,
                    points,
                }))
            }
            Inventory::Daemon(store) => {
                let groups = ask(store, &["group".into(), "list".into()]).map_err(remote)?;
                let Some(g) = groups
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|g| g["name"] == group)
                else {
                    return Ok(None);
                };
                let role: Role = serde_json::from_value(g["role"].clone()).unwrap_or_default();
                let pts =
                    ask(store, &["point".into(), "list".into(), group.into()]).map_err(remote)?;
                let points = pts
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| Some((p["id"].as_u64()?, p["kind"] == "app")))
                    .collect();
                Ok(Some(GroupFacts { role, points }))
            }
        }
    }
}

/// A daemon's refusal, as a library error for the plan's report.
fn remote(e: anyhow::Error) -> Error {
    let m = format!("{e:#}");
    if m.contains("in use") {
        Error::Busy(m)
    } else {
        Error::Invalid(m)
    }
}

fn print_problems(file: &Path, problems: &[Problem], json: bool) {
    if json {
        let v = json!({"file": file, "ok": false, "problems": problems});
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
    } else {
        for p in problems {
            println!("{p}");
        }
        println!("{}: {} problem(s)", file.display(), problems.len());
    }
}

fn check(cli: &Cli, file: &Path) -> Result<i32> {
    let inv = if daemon::connect(&cli.store).is_some() {
        Inventory::Daemon(cli.store.clone())
    } else {
        Inventory::Local(Store::open(&cli.store, cli.key_file.as_deref())?)
    };
    let (p, problems) = plan::check(file, &|g| inv.facts(g), false)?;
    let Some(p) = p else {
        print_problems(file, &problems, cli.json);
        return Ok(1);
    };
    if cli.json {
        let v = json!({"file": file, "ok": true, "problems": [], "plan": p});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: plan {}: {} step(s), no problems",
            file.display(),
            p.name,
            p.steps.len()
        );
        for s in &p.steps {
            println!("  {:<16} {} at {}", s.name, s.groups.join(", "), s.point);
        }
    }
    Ok(0)
}

/// The daemon, reached over its control socket.
struct DaemonSite<'a> {
    cli: &'a Cli,
    store: PathBuf,
    /// A daemon this plan started because the one it used went away.
    own: std::sync::Mutex<Option<super::dr::OwnDaemon>>,
}

impl DaemonSite<'_> {
    /// Forward `args` to the daemon.  If none answers (the one the plan used
    /// went away: another plan's, stopped when that plan ended), start one
    /// first, so the plan can go on and, under test, still clean up (found
    /// by tests/breakit_dr2.rs: the second of two test plans left its drill
    /// behind).  A request the daemon may have seen is never sent twice.
    fn ask(&self, args: &[String]) -> drclone::error::Result<serde_json::Value> {
        if daemon::connect(&self.store).is_none() {
            let mut own = self.own.lock().unwrap();
            if daemon::connect(&self.store).is_none() {
                log::warn!("plan: the daemon went away; starting one");
                // The one it replaces (if this plan started it) is gone.
                drop(own.take());
                *own = Some(start_daemon(self.cli, true).map_err(remote)?);
            }
        }
        ask(&self.store, args).map_err(remote)
    }

    fn up(v: &serde_json::Value, drill: Option<u64>) -> drclone::error::Result<Up> {
        Ok(Up {
            point: v["point"]
                .as_u64()
                .ok_or_else(|| Error::invalid(format!("the daemon's answer has no point: {v}")))?,
            exports: serde_json::from_value(
                v[if drill.is_some() { "uris" } else { "exports" }].clone(),
            )
            .map_err(|e| Error::invalid(format!("the daemon's answer: {e}")))?,
            drill,
        })
    }
}

impl Site for DaemonSite<'_> {
    fn failover(&self, group: &str, point: &str) -> drclone::error::Result<Up> {
        let mut args = vec!["failover".to_string(), group.into()];
        // Without --point, a failed-over group is refused, not moved to
        // another point.
        if point != "latest" {
            args.extend(["--point".into(), point.into()]);
        }
        let v = self.ask(&args)?;
        Self::up(&v, None)
    }

    fn drill(&self, group: &str, point: &str, label: &str) -> drclone::error::Result<Up> {
        let args = [
            "drill",
            "start",
            group,
            "--point",
            point,
            "--command",
            label,
        ]
        .map(String::from);
        let v = self.ask(&args)?;
        let id = v["id"]
            .as_u64()
            .ok_or_else(|| Error::invalid(format!("drill start: no id in {v}")))?;
        Self::up(&v, Some(id))
    }

    fn remove_drill(&self, id: u64, ok: bool, duration_ms: u64) -> drclone::error::Result<()> {
        let args = [
            "drill".to_string(),
            "finish".into(),
            id.to_string(),
            "--exit-code".into(),
            if ok { "0" } else { "1" }.into(),
            "--duration-ms".into(),
            duration_ms.to_string(),
            "--output-tail".into(),
            format!("recovery plan {}", if ok { "passed" } else { "failed" }),
        ];
        self.ask(&args)?;
        Ok(())
    }
}

fn run_plan(cli: &Cli, file: &Path, test: bool) -> Result<i32> {
    let own = if daemon::connect(&cli.store).is_none() {
        // In a process group of its own: Ctrl-C stops the plan, which still
        // needs the daemon to clean up.
        Some(start_daemon(cli, true)?)
    } else {
        None
    };
    let inv = Inventory::Daemon(cli.store.clone());
    let (p, problems) = plan::check(file, &|g| inv.facts(g), !test)?;
    let Some(p) = p else {
        print_problems(file, &problems, cli.json);
        return Ok(1);
    };
    // Ctrl-C, SIGTERM, SIGHUP stop the plan (the script running is killed) and
    // a test still cleans up.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let json = cli.json;
    let progress = move |m: &str| {
        if !json {
            eprintln!("plan: {m}");
        }
    };
    let site = DaemonSite {
        cli,
        store: cli.store.clone(),
        own: Default::default(),
    };
    let report = plan::run(
        &p,
        &site,
        &RunOptions {
            test,
            echo: true,
            stop: Some(&stop),
            progress: &progress,
        },
    );
    let served_here = own.is_some() || site.own.lock().unwrap().is_some();
    drop(site);
    drop(own);
    if served_here && !test && report.steps.iter().any(|s| !s.groups.is_empty()) {
        eprintln!(
            "plan: no daemon was running, so the failed-over groups were served only \
             while the plan ran; run `drclone serve` to serve them"
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report));
    }
    Ok(if report.ok { 0 } else { 1 })
}

/// The report as text.
fn text(r: &PlanReport) -> String {
    let mut s = format!(
        "plan {} ({}){}: {} in {} ms, {} -> {}\n",
        r.plan,
        r.file.display(),
        if r.test { " --test" } else { "" },
        if r.ok { "PASSED" } else { "FAILED" },
        r.duration_ms,
        fmt_time(r.started),
        fmt_time(r.finished),
    );
    if let Some(e) = &r.error {
        s += &format!(
            "  stopped{}: {e}\n",
            r.failed_step
                .as_ref()
                .map_or(String::new(), |n| format!(" at step {n}"))
        );
    }
    for st in &r.steps {
        let outcome = match st.outcome {
            plan::StepOutcome::Ok => "ok",
            plan::StepOutcome::Failed => "FAILED",
            plan::StepOutcome::NotRun => "not run",
        };
        s += &format!("step {:<16} {outcome}", st.name);
        if let (Some(a), Some(b), Some(ms)) = (st.started, st.finished, st.duration_ms) {
            s += &format!("  {} -> {} ({ms} ms)", fmt_time(a), fmt_time(b));
        }
        s.push('\n');
        for g in &st.groups {
            match &g.error {
                None => {
                    s += &format!(
                        "  {} at point {}{} ({} ms)\n",
                        g.group,
                        g.point.map_or("?".into(), |p| p.to_string()),
                        g.drill.map_or(String::new(), |d| format!(", drill {d}")),
                        g.time_ms
                    );
                    for e in &g.exports {
                        s += &format!("    {e}\n");
                    }
                }
                Some(e) => s += &format!("  {}: FAILED: {e}\n", g.group),
            }
        }
        for (what, sc) in [("pre", &st.pre), ("post", &st.post)] {
            let Some(sc) = sc else { continue };
            s += &format!(
                "  {what} `{}`: {} ({} ms)\n",
                sc.command,
                sc.how(),
                sc.duration_ms
            );
            if !sc.ok {
                for l in sc.output_tail.lines() {
                    s += &format!("    | {l}\n");
                }
            }
        }
    }
    if !r.ok && !r.failed_over.is_empty() {
        // A step that failed part-way may have failed some groups over.
        s += &format!(
            "left failed over: {} (`drclone failover GROUP --undo` rolls one back, \
             `--commit` keeps it)\n",
            r.failed_over.join(", ")
        );
    }
    if let Some(c) = &r.cleanup {
        s += &format!(
            "cleanup: {} drill(s) removed (clones, exports, records){}{}\n",
            c.drills_removed.len(),
            if c.scripts_stopped > 0 {
                format!(
                    ", {} script(s) stopped that had left processes running",
                    c.scripts_stopped
                )
            } else {
                String::new()
            },
            if c.ok {
                String::new()
            } else {
                format!("; NOT removed: {}", c.errors.join("; "))
            }
        );
    }
    s
}
