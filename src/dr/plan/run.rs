//! Running a recovery plan: the steps strictly in order, each step's groups in
//! parallel, the drills a `--test` run started removed at the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::script::{run_script, script_failure, signal_group, KILL_GRACE};
use super::{Plan, Step};
use crate::error::{Error, Result};
use crate::util::now_secs;

/// A group brought up by a step.
#[derive(Debug, Clone, Serialize)]
pub struct Up {
    /// The point it is at.
    pub point: u64,
    /// Its exports' NBD URIs, in disk order.
    pub exports: Vec<String>,
    /// The drill holding its clones, under `--test`.
    pub drill: Option<u64>,
}

/// Where a plan's actions go (the CLI's forwards them to the daemon).
pub trait Site: Sync {
    /// Fail `group` over to `point` (`latest`, `latest-app`, an id).
    fn failover(&self, group: &str, point: &str) -> Result<Up>;
    /// Drill `group` at `point`: its clones exported, kept until
    /// [`Site::remove_drill`]; `label` says which plan and step.
    fn drill(&self, group: &str, point: &str, label: &str) -> Result<Up>;
    /// End drill `id` with the plan's outcome (`ok`, after `duration_ms`):
    /// its record stays as evidence, as `drclone test` leaves it (so `status`
    /// shows the last drill); its clones (their NBD clients disconnected) and
    /// exports go.
    fn remove_drill(&self, id: u64, ok: bool, duration_ms: u64) -> Result<()>;
}

/// How [`run`] runs.
pub struct RunOptions<'a> {
    /// Drill the groups instead of failing them over, and remove every drill
    /// at the end.
    pub test: bool,
    /// Copy the scripts' output to this process's stderr as it comes.
    pub echo: bool,
    /// Set (e.g. by SIGINT) to stop: the running script is killed, the plan
    /// stops, and a test cleans up.
    pub stop: Option<&'a AtomicBool>,
    /// Told of progress, one line at a time.
    pub progress: &'a (dyn Fn(&str) + Sync),
}

impl RunOptions<'_> {
    pub(super) fn stopped(&self) -> bool {
        self.stop.is_some_and(|s| s.load(Ordering::SeqCst))
    }
}

/// The outcome of a step.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StepOutcome {
    Ok,
    Failed,
    /// The plan stopped before it.
    NotRun,
}

/// A script's run.
#[derive(Debug, Clone, Serialize)]
pub struct ScriptReport {
    pub command: String,
    /// Exit code 0, in time.
    pub ok: bool,
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Killed because the plan was stopped.
    pub interrupted: bool,
    /// Seconds since the Unix epoch.
    pub started: u64,
    pub duration_ms: u64,
    /// The last [`TAIL_LINES`] lines of its stdout and stderr.
    pub output_tail: String,
    /// Why it could not be started, if it could not.
    pub error: Option<String>,
}

/// A group of a step.
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    pub group: String,
    pub ok: bool,
    pub point: Option<u64>,
    pub exports: Vec<String>,
    pub drill: Option<u64>,
    /// Milliseconds the failover (or drill start) took.
    pub time_ms: u64,
    pub error: Option<String>,
}

/// A step's run.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub name: String,
    pub outcome: StepOutcome,
    /// Seconds since the Unix epoch (None: not run).
    pub started: Option<u64>,
    pub finished: Option<u64>,
    pub duration_ms: Option<u64>,
    pub groups: Vec<GroupReport>,
    /// Every export of the step (its `DRCLONE_EXPORTS`).
    pub exports: Vec<String>,
    pub pre: Option<ScriptReport>,
    pub post: Option<ScriptReport>,
    /// Why it failed.
    pub error: Option<String>,
}

impl StepReport {
    fn not_run(name: &str) -> StepReport {
        StepReport {
            name: name.to_string(),
            outcome: StepOutcome::NotRun,
            started: None,
            finished: None,
            duration_ms: None,
            groups: Vec::new(),
            exports: Vec::new(),
            pre: None,
            post: None,
            error: None,
        }
    }
}

/// What a test run removed at its end.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CleanupReport {
    pub ok: bool,
    /// Drills removed (clones, exports, records).
    pub drills_removed: Vec<u64>,
    /// Scripts whose processes were still running (left in the background)
    /// and were stopped: SIGTERM to their process group, then SIGKILL.
    pub scripts_stopped: usize,
    pub errors: Vec<String>,
}

/// A plan's run.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub plan: String,
    pub file: PathBuf,
    pub test: bool,
    /// Every step ran and passed (and, under test, everything was removed).
    pub ok: bool,
    /// Seconds since the Unix epoch.
    pub started: u64,
    pub finished: u64,
    pub duration_ms: u64,
    /// The step that stopped the plan.
    pub failed_step: Option<String>,
    pub error: Option<String>,
    pub steps: Vec<StepReport>,
    /// A real run: the groups it failed over.  They stay failed over whatever
    /// the outcome (`drclone failover GROUP --undo` rolls one back).
    pub failed_over: Vec<String>,
    /// Under test: what was removed at the end.
    pub cleanup: Option<CleanupReport>,
}

/// What a test run leaves to remove: the drills it started and the process
/// groups of its scripts.  Removed by [`Drills::remove_all`], or on drop if
/// the run unwinds before it.
pub(super) struct Drills<'a> {
    site: &'a dyn Site,
    /// When the plan began (each drill's duration in its evidence).
    started: Instant,
    ids: Mutex<Vec<u64>>,
    /// Process groups of the scripts run (their leaders reaped): what they
    /// left in the background (an application started against a drill's
    /// export) is stopped at the end of a test (found by
    /// tests/breakit_dr2.rs: it outlived the cleanup).
    pub(super) scripts: Mutex<Vec<u32>>,
}

/// Whether process group `pgid` still has a process.
fn group_alive(pgid: u32) -> bool {
    // SAFETY: signal 0 only checks that the group exists.
    unsafe { libc::kill(-(pgid as i32), 0) == 0 }
}

impl Drills<'_> {
    fn add(&self, id: u64) {
        self.ids.lock().unwrap().push(id);
    }

    /// Stop what the scripts left running: SIGTERM to each process group
    /// still there, [`KILL_GRACE`], then SIGKILL.  Returns how many had
    /// processes.
    fn stop_scripts(&self) -> usize {
        let groups: Vec<u32> = std::mem::take(&mut *self.scripts.lock().unwrap())
            .into_iter()
            .filter(|&g| group_alive(g))
            .collect();
        for &g in &groups {
            log::info!("plan cleanup: stopping what script process group {g} left running");
            signal_group(g, libc::SIGTERM);
        }
        let grace = Instant::now() + KILL_GRACE;
        while groups.iter().any(|&g| group_alive(g)) && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(20));
        }
        for &g in &groups {
            if group_alive(g) {
                signal_group(g, libc::SIGKILL);
            }
        }
        groups.len()
    }

    /// Stop what the scripts left running, then remove every drill, newest
    /// first; a busy one is retried for a while (a client that was just
    /// disconnected may still hold its clone).
    /// `ok`: the plan's outcome, recorded in each drill's evidence.
    fn remove_all(&self, ok: bool) -> CleanupReport {
        let mut r = CleanupReport {
            scripts_stopped: self.stop_scripts(),
            ..CleanupReport::default()
        };
        let ids = std::mem::take(&mut *self.ids.lock().unwrap());
        for id in ids.into_iter().rev() {
            let mut tries = 0;
            loop {
                let ms = self.started.elapsed().as_millis() as u64;
                match self.site.remove_drill(id, ok, ms) {
                    Ok(()) => {
                        r.drills_removed.push(id);
                        break;
                    }
                    Err(Error::Busy(m)) if tries < 20 => {
                        log::info!("plan cleanup: drill {id}: {m}; retrying");
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    Err(e) => {
                        log::warn!("plan cleanup: drill {id}: {e}");
                        r.errors.push(format!("drill {id}: {e}"));
                        break;
                    }
                }
            }
        }
        r.ok = r.errors.is_empty();
        r
    }
}

impl Drop for Drills<'_> {
    fn drop(&mut self) {
        if !self.ids.lock().unwrap().is_empty() || !self.scripts.lock().unwrap().is_empty() {
            self.remove_all(false);
        }
    }
}

/// Run `plan` (validated by [`check`]) through `site`: its steps strictly in
/// order, each one's `pre` script, then its groups in parallel (failed over,
/// or drilled under `opts.test`), then its `post` script with their exports,
/// then its wait.  The first failing step (a script exiting non-zero or timing
/// out, a failover or drill error) stops the plan.  Under test every drill it
/// started is removed at the end, whatever happened.  Errors are in the report.
pub fn run(plan: &Plan, site: &dyn Site, opts: &RunOptions) -> PlanReport {
    let t0 = Instant::now();
    let started = now_secs();
    let drills = Drills {
        site,
        started: Instant::now(),
        ids: Mutex::new(Vec::new()),
        scripts: Mutex::new(Vec::new()),
    };
    let mut steps: Vec<StepReport> = plan
        .steps
        .iter()
        .map(|s| StepReport::not_run(&s.name))
        .collect();
    let mut failed_step = None;
    let mut error = None;
    for (i, step) in plan.steps.iter().enumerate() {
        if opts.stopped() {
            error = Some(format!("interrupted before step {}", step.name));
            break;
        }
        (opts.progress)(&format!(
            "step {} ({}/{}): {} {}",
            step.name,
            i + 1,
            plan.steps.len(),
            if opts.test {
                "drilling"
            } else {
                "failing over"
            },
            step.groups.join(", ")
        ));
        steps[i] = run_step(plan, step, site, opts, &drills);
        if steps[i].outcome != StepOutcome::Ok {
            failed_step = Some(step.name.clone());
            error = steps[i].error.clone();
            (opts.progress)(&format!(
                "step {} FAILED: {}",
                step.name,
                error.as_deref().unwrap_or("?")
            ));
            break;
        }
        (opts.progress)(&format!("step {} ok", step.name));
        if step.wait_secs > 0 && i + 1 < plan.steps.len() {
            (opts.progress)(&format!("waiting {} s", step.wait_secs));
            let until = Instant::now().checked_add(Duration::from_secs(step.wait_secs));
            while until.is_none_or(|u| Instant::now() < u) && !opts.stopped() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let cleanup = opts.test.then(|| {
        let c = drills.remove_all(failed_step.is_none() && error.is_none());
        (opts.progress)(&format!(
            "cleanup: {} drill(s) removed{}",
            c.drills_removed.len(),
            if c.ok {
                String::new()
            } else {
                format!("; {}", c.errors.join("; "))
            }
        ));
        c
    });
    let failed_over = if opts.test {
        Vec::new()
    } else {
        steps
            .iter()
            .flat_map(|s| s.groups.iter().filter(|g| g.ok).map(|g| g.group.clone()))
            .collect()
    };
    let ok = failed_step.is_none() && error.is_none() && cleanup.as_ref().is_none_or(|c| c.ok);
    PlanReport {
        plan: plan.name.clone(),
        file: plan.file.clone(),
        test: opts.test,
        ok,
        started,
        finished: now_secs(),
        duration_ms: t0.elapsed().as_millis() as u64,
        failed_step,
        error,
        steps,
        failed_over,
        cleanup,
    }
}

fn run_step(
    plan: &Plan,
    step: &Step,
    site: &dyn Site,
    opts: &RunOptions,
    drills: &Drills,
) -> StepReport {
    let t0 = Instant::now();
    let mut r = StepReport {
        started: Some(now_secs()),
        ..StepReport::not_run(&step.name)
    };
    let done = |mut r: StepReport, error: Option<String>| {
        r.outcome = if error.is_none() {
            StepOutcome::Ok
        } else {
            StepOutcome::Failed
        };
        r.error = error;
        r.finished = Some(now_secs());
        r.duration_ms = Some(t0.elapsed().as_millis() as u64);
        r
    };
    if let Some(pre) = &step.pre {
        let s = run_script(plan, step, "pre", &pre.command, &[], opts, drills);
        let why = script_failure("pre", &s);
        r.pre = Some(s);
        if why.is_some() {
            return done(r, why);
        }
    }
    let label = format!("plan {} step {}", plan.name, step.name);
    r.groups = std::thread::scope(|sc| {
        let hs: Vec<_> = step
            .groups
            .iter()
            .map(|g| {
                let label = &label;
                sc.spawn(move || {
                    let t = Instant::now();
                    let up = if opts.test {
                        site.drill(g, &step.point, label)
                    } else {
                        site.failover(g, &step.point)
                    };
                    if let Ok(Up {
                        drill: Some(id), ..
                    }) = &up
                    {
                        drills.add(*id);
                    }
                    (up, t.elapsed().as_millis() as u64)
                })
            })
            .collect();
        hs.into_iter()
            .zip(&step.groups)
            .map(|(h, g)| {
                let (up, time_ms) = h
                    .join()
                    .unwrap_or_else(|_| (Err(Error::invalid("the failover thread panicked")), 0));
                match up {
                    Ok(u) => GroupReport {
                        group: g.clone(),
                        ok: true,
                        point: Some(u.point),
                        exports: u.exports,
                        drill: u.drill,
                        time_ms,
                        error: None,
                    },
                    Err(e) => GroupReport {
                        group: g.clone(),
                        ok: false,
                        point: None,
                        exports: Vec::new(),
                        drill: None,
                        time_ms,
                        error: Some(e.to_string()),
                    },
                }
            })
            .collect()
    });
    r.exports = r.groups.iter().flat_map(|g| g.exports.clone()).collect();
    let failed: Vec<String> = r
        .groups
        .iter()
        .filter_map(|g| g.error.as_ref().map(|e| format!("group {}: {e}", g.group)))
        .collect();
    if !failed.is_empty() {
        return done(r, Some(failed.join("; ")));
    }
    if let Some(post) = &step.post {
        let s = run_script(plan, step, "post", &post.command, &r.exports, opts, drills);
        let why = script_failure("post", &s);
        r.post = Some(s);
        if why.is_some() {
            return done(r, why);
        }
    }
    done(r, None)
}
