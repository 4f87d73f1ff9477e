//! Recovery plans (`drclone plan run|check`): bring whole applications up in
//! order.  A plan is a TOML file with an ordered list of steps; each step fails
//! over (or, under `--test`, drills) its groups in parallel at a point, with
//! `pre` and `post` scripts around them, a timeout for each script and a wait
//! after the step.  docs/DESIGN.md §19b and the README describe the format.
//!
//! ```toml
//! name = "shop"
//!
//! [[step]]
//! name = "database"
//! groups = ["db"]
//! point = "latest-app"
//! post = "./probe-db"
//! timeout = "5m"
//! wait = "10s"
//!
//! [[step]]
//! name = "application"
//! groups = ["app"]
//! post = "tools/boot-check --timeout 300"
//! ```
//!
//! [`check`] validates a plan without running it and reports every problem at
//! once, each with its file and line (the plan is walked on toml's spanned
//! document tree, so even a key of the wrong type names its line).  [`run`]
//! runs the steps strictly in order through a [`Site`] (the CLI's talks to the
//! daemon); the first failing step stops the plan.  Under `--test` every drill
//! the plan started is removed at the end, whatever the outcome (a failed
//! step, a script timeout, an interruption, a panic while unwinding).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::engine::types::{parse_duration, Role};
use crate::error::{Error, Result};
use crate::util::now_secs;

/// Timeout of a script when its step does not say (seconds): ten minutes.
pub const DEFAULT_TIMEOUT: u64 = 600;

/// Lines of a script's output (stdout and stderr together) kept in the report.
pub const TAIL_LINES: usize = 20;

/// At most this many bytes of those lines are kept (the end of them).
pub const TAIL_BYTES: usize = 4096;

/// Bytes of output buffered while a script runs (the tail is cut from them).
const BUFFER_BYTES: usize = 64 * 1024;

/// How long a script that timed out gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// How long the output of a script that exited is still collected (a process
/// it left in the background may hold its pipes open).
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// A validated plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub name: String,
    pub description: Option<String>,
    /// The plan file, as given.
    pub file: PathBuf,
    /// The directory scripts run in (the plan file's).
    pub dir: PathBuf,
    pub steps: Vec<Step>,
}

/// One step of a plan.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    /// Line of the step's `[[step]]` table in the plan file.
    pub line: usize,
    /// Line of its `name`.
    #[serde(skip)]
    name_line: usize,
    /// Groups failed over (or drilled) in parallel.
    pub groups: Vec<String>,
    /// The line of each group.
    #[serde(skip)]
    group_lines: Vec<usize>,
    /// `latest` (default), `latest-app` or a point id.
    pub point: String,
    /// Line of `point`, if the step gives one.
    #[serde(skip)]
    point_line: Option<usize>,
    pub pre: Option<Script>,
    pub post: Option<Script>,
    /// Timeout of each script, seconds.
    pub timeout_secs: u64,
    /// Pause after the step before the next one, seconds.
    pub wait_secs: u64,
}

/// A step's script: run through `sh -c` in the plan file's directory.
#[derive(Debug, Clone, Serialize)]
pub struct Script {
    pub command: String,
    pub line: usize,
}

/// A problem found in a plan: where, and what.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The plan file, as given.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// Collects problems, turning byte offsets into lines.
struct Problems<'a> {
    file: String,
    text: &'a str,
    list: Vec<Problem>,
}

impl Problems<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn at(&mut self, offset: usize, message: impl Into<String>) {
        let line = self.line(offset);
        self.at_line(line, message);
    }

    fn at_line(&mut self, line: usize, message: impl Into<String>) {
        self.list.push(Problem {
            file: self.file.clone(),
            line,
            message: message.into(),
        });
    }
}

const STEP_KEYS: &str = "name, groups, point, pre, post, timeout, wait";

/// Parse and validate a plan's text (`file` names it in problems and locates
/// its scripts): TOML syntax, unknown keys, types, missing or empty groups,
/// duplicate step names, a group in two places, durations, point specs.  The
/// store and the scripts are not looked at ([`check`] does).  Returns the plan
/// when there is no problem, and every problem found, in line order.
pub fn parse(file: &Path, text: &str) -> (Option<Plan>, Vec<Problem>) {
    let (plan, problems) = parse_partial(file, text);
    (plan.filter(|_| problems.is_empty()), problems)
}

/// [`parse`], returning what could be read of the plan even with problems
/// (None only for TOML syntax errors), so [`check`] can look at its scripts
/// and groups too.
fn parse_partial(file: &Path, text: &str) -> (Option<Plan>, Vec<Problem>) {
    let mut p = Problems {
        file: file.display().to_string(),
        text,
        list: Vec::new(),
    };
    let (doc, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        // The tree of a document with syntax errors is partial: report those only.
        for e in errors {
            let off = e.span().map_or(0, |s| s.start);
            p.at(off, format!("TOML syntax: {}", e.message().trim()));
        }
        p.list.sort();
        return (None, p.list);
    }
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut name = None;
    let mut description = None;
    let mut steps = Vec::new();
    let mut saw_steps = false;
    for (k, v) in doc.get_ref().iter() {
        match k.get_ref().as_ref() {
            "name" => name = string(&mut p, "name", v),
            "description" => description = string(&mut p, "description", v),
            "step" => {
                saw_steps = true;
                match v.get_ref() {
                    DeValue::Array(a) => {
                        for s in a.iter() {
                            match s.get_ref() {
                                DeValue::Table(t) => {
                                    if let Some(step) = parse_step(&mut p, s.span(), t) {
                                        steps.push(step);
                                    }
                                }
                                _ => p.at(s.span().start, "a step must be a [[step]] table"),
                            }
                        }
                    }
                    _ => p.at(
                        k.span().start,
                        "steps are [[step]] tables (an array of tables), not a single [step]",
                    ),
                }
            }
            other => p.at(
                k.span().start,
                format!("unknown key `{other}` (a plan has name, description and [[step]] tables)"),
            ),
        }
    }
    if !saw_steps {
        p.at_line(1, "the plan has no [[step]]: it needs at least one step");
    }
    // Across steps: names are unique, and a group is brought up once.
    let mut names: Vec<(&str, usize)> = Vec::new();
    let mut groups: Vec<(&str, usize, &str)> = Vec::new();
    let mut dups = Vec::new();
    for s in &steps {
        if let Some((_, first)) = names.iter().find(|(n, _)| *n == s.name) {
            dups.push((
                s.name_line,
                format!("duplicate step name `{}` (first at line {first})", s.name),
            ));
        }
        names.push((&s.name, s.name_line));
        for (g, &line) in s.groups.iter().zip(&s.group_lines) {
            if let Some((_, first, in_step)) = groups.iter().find(|(n, _, _)| *n == g) {
                dups.push((
                    line,
                    format!(
                        "group `{g}` is already brought up by step `{in_step}` (line {first}); \
                         a group is failed over once"
                    ),
                ));
            }
            groups.push((g, line, &s.name));
        }
    }
    for (line, m) in dups {
        p.at_line(line, m);
    }
    p.list.sort();
    let name = name.unwrap_or_else(|| {
        file.file_stem()
            .map_or("plan".into(), |s| s.to_string_lossy().into_owned())
    });
    (
        Some(Plan {
            name,
            description,
            file: file.to_path_buf(),
            dir,
            steps,
        }),
        p.list,
    )
}

/// A non-empty string value, or a problem.
fn string(p: &mut Problems, key: &str, v: &Spanned<DeValue>) -> Option<String> {
    match v.get_ref() {
        DeValue::String(s) if !s.trim().is_empty() => Some(s.to_string()),
        DeValue::String(_) => {
            p.at(v.span().start, format!("`{key}` is empty"));
            None
        }
        other => {
            p.at(
                v.span().start,
                format!("`{key}` must be a string, not {}", other.type_str()),
            );
            None
        }
    }
}

/// A duration value ("30s", "5m", ...), seconds, or a problem.
fn duration(p: &mut Problems, key: &str, v: &Spanned<DeValue>) -> Option<u64> {
    match v.get_ref() {
        DeValue::String(s) => match parse_duration(s.trim()) {
            Ok(secs) => Some(secs),
            Err(e) => {
                p.at(v.span().start, format!("`{key}`: {e}"));
                None
            }
        },
        other => {
            p.at(
                v.span().start,
                format!(
                    "`{key}` must be a duration string such as \"30s\" or \"5m\", not {}",
                    other.type_str()
                ),
            );
            None
        }
    }
}

/// Whether `spec` names a point: `latest`, `latest-app` or a point id.
fn valid_point(spec: &str) -> bool {
    matches!(spec, "latest" | "latest-app") || spec.parse::<u64>().is_ok()
}

fn parse_step(p: &mut Problems, span: std::ops::Range<usize>, t: &DeTable) -> Option<Step> {
    let line = p.line(span.start);
    let mut name = None;
    let mut name_line = line;
    let mut groups = None;
    let mut group_lines = Vec::new();
    let mut point = ("latest".to_string(), None);
    let mut pre = None;
    let mut post = None;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut wait = 0;
    for (k, v) in t.iter() {
        let vline = p.line(v.span().start);
        match k.get_ref().as_ref() {
            "name" => {
                name = string(p, "name", v);
                name_line = vline;
            }
            "groups" => match v.get_ref() {
                DeValue::Array(a) if a.is_empty() => p.at(
                    v.span().start,
                    "`groups` is empty: a step brings up at least one group",
                ),
                DeValue::Array(a) => {
                    let mut gs = Vec::new();
                    for g in a.iter() {
                        if let Some(s) = string(p, "groups", g) {
                            let gl = p.line(g.span().start);
                            if gs.contains(&s) {
                                p.at(g.span().start, format!("group `{s}` is listed twice"));
                            }
                            gs.push(s);
                            group_lines.push(gl);
                        }
                    }
                    groups = Some(gs);
                }
                other => p.at(
                    v.span().start,
                    format!(
                        "`groups` must be an array of group names such as [\"db\"], not {}",
                        other.type_str()
                    ),
                ),
            },
            "point" => {
                let spec = match v.get_ref() {
                    DeValue::String(s) => Some(s.trim().to_string()),
                    DeValue::Integer(i) => Some(i.as_str().to_string()),
                    other => {
                        p.at(
                            v.span().start,
                            format!(
                                "`point` must be a string or a point id, not {}",
                                other.type_str()
                            ),
                        );
                        None
                    }
                };
                if let Some(s) = spec {
                    if valid_point(&s) {
                        point = (s, Some(vline));
                    } else {
                        p.at(
                            v.span().start,
                            format!("`point` {s:?} is not latest, latest-app or a point id"),
                        );
                    }
                }
            }
            "pre" => {
                pre = string(p, "pre", v).map(|c| Script {
                    command: c,
                    line: vline,
                })
            }
            "post" => {
                post = string(p, "post", v).map(|c| Script {
                    command: c,
                    line: vline,
                })
            }
            "timeout" => timeout = duration(p, "timeout", v).unwrap_or(timeout),
            "wait" => wait = duration(p, "wait", v).unwrap_or(wait),
            other => p.at(
                k.span().start,
                format!("unknown key `{other}` in a step (a step has {STEP_KEYS})"),
            ),
        }
    }
    let shown = name.clone().unwrap_or_else(|| format!("at line {line}"));
    if name.is_none() && !t.iter().any(|(k, _)| k.get_ref() == "name") {
        p.at_line(line, "the step has no `name`");
    }
    if groups.is_none() && !t.iter().any(|(k, _)| k.get_ref() == "groups") {
        p.at_line(
            line,
            format!("step {shown} has no `groups`: a step brings up at least one group"),
        );
    }
    // Kept even with problems, for the checks across steps.
    name.map(|n| Step {
        name: n,
        line,
        name_line,
        groups: groups.unwrap_or_default(),
        group_lines,
        point: point.0,
        point_line: point.1,
        pre,
        post,
        timeout_secs: timeout,
        wait_secs: wait,
    })
}

/// Shell words that are not files to look for.
const SHELL_WORDS: &[&str] = &[
    "!", ".", ":", "[", "alias", "break", "case", "cd", "command", "continue", "echo", "eval",
    "exec", "exit", "export", "false", "for", "getopts", "if", "kill", "printf", "pwd", "read",
    "readonly", "return", "set", "shift", "test", "times", "trap", "true", "type", "ulimit",
    "umask", "unset", "until", "wait", "while", "{", "(",
];

/// Where the first word of `command` is, run in `dir` with `path` (the PATH
/// value): Ok(None) when it cannot be told without running it (a builtin,
/// a variable), Err(why) when it is missing or not executable.
fn resolve_command(command: &str, dir: &Path, path: &str) -> std::result::Result<(), String> {
    let word = command
        .split_whitespace()
        .find(|w| {
            // Leading assignments (VAR=value cmd) are not the command.
            !w.split_once('=').is_some_and(|(n, _)| {
                !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        })
        .unwrap_or("");
    if word.is_empty()
        || SHELL_WORDS.contains(&word)
        || word.contains(|c: char| "$`'\"\\(){};|&<>*?[~".contains(c))
    {
        return Ok(());
    }
    let executable = |p: &Path| -> std::result::Result<(), &'static str> {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(p) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
            Ok(m) if m.is_file() => Err("is not executable"),
            Ok(_) => Err("is not a file"),
            Err(_) => Err("does not exist"),
        }
    };
    if word.contains('/') {
        return executable(&dir.join(word)).map_err(|why| {
            if word.starts_with('/') {
                format!("{word} {why}")
            } else {
                let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
                format!("{word} {why} (in the plan's directory {})", dir.display())
            }
        });
    }
    for d in path.split(':').filter(|d| !d.is_empty()) {
        if executable(&Path::new(d).join(word)).is_ok() {
            return Ok(());
        }
    }
    Err(format!(
        "`{word}` is not found in PATH (a script next to the plan is ./{word})"
    ))
}

/// What [`check`] needs to know of a group in the store.
#[derive(Debug, Clone)]
pub struct GroupFacts {
    pub role: Role,
    /// Its points, oldest first: (id, app-consistent).
    pub points: Vec<(u64, bool)>,
}

/// Looks a group up in the store: None if there is no such group.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Result<Option<GroupFacts>>;

/// Validate the plan in `file` without running it: everything [`parse`]
/// checks, then that each script's first word is an executable file (relative
/// to the plan's directory if it has a `/`, else in `PATH`), that every group
/// is in the store with the step's point, and, for a real run (`real_run`),
/// that every group is protected (a failed-over or committed group cannot be
/// failed over again).  Returns the plan when there is no problem, and every
/// problem, in line order.  Errors: the file cannot be read; `lookup`'s.
pub fn check(file: &Path, lookup: Lookup, real_run: bool) -> Result<(Option<Plan>, Vec<Problem>)> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::Io {
        path: file.to_path_buf(),
        source: e,
    })?;
    let (plan, mut problems) = parse_partial(file, &text);
    let Some(plan) = plan else {
        return Ok((None, problems));
    };
    let mut p = Problems {
        file: file.display().to_string(),
        text: &text,
        list: Vec::new(),
    };
    let path = std::env::var("PATH").unwrap_or_default();
    for s in &plan.steps {
        for (what, script) in [("pre", &s.pre), ("post", &s.post)] {
            if let Some(sc) = script {
                if let Err(why) = resolve_command(&sc.command, &plan.dir, &path) {
                    p.at_line(sc.line, format!("step {}: {what} script: {why}", s.name));
                }
            }
        }
        for (g, &line) in s.groups.iter().zip(&s.group_lines) {
            let Some(facts) = lookup(g)? else {
                p.at_line(
                    line,
                    format!("step {}: no group `{g}` in the store", s.name),
                );
                continue;
            };
            let found = match s.point.as_str() {
                "latest" => !facts.points.is_empty(),
                "latest-app" => facts.points.iter().any(|&(_, app)| app),
                id => facts.points.iter().any(|&(p, _)| p.to_string() == id),
            };
            if !found {
                p.at_line(
                    s.point_line.unwrap_or(line),
                    format!("step {}: group `{g}` has no point {}", s.name, s.point),
                );
            }
            if real_run && facts.role != Role::Protected {
                p.at_line(
                    line,
                    format!(
                        "step {}: group `{g}` is {}, not protected: undo its failover \
                         (drclone failover {g} --undo) before a real run",
                        s.name, facts.role
                    ),
                );
            }
        }
    }
    problems.append(&mut p.list);
    problems.sort();
    Ok(((problems.is_empty()).then_some(plan), problems))
}

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
    fn stopped(&self) -> bool {
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
struct Drills<'a> {
    site: &'a dyn Site,
    /// When the plan began (each drill's duration in its evidence).
    started: Instant,
    ids: Mutex<Vec<u64>>,
    /// Process groups of the scripts run (their leaders reaped): what they
    /// left in the background (an application started against a drill's
    /// export) is stopped at the end of a test (found by
    /// tests/breakit_dr2.rs: it outlived the cleanup).
    scripts: Mutex<Vec<u32>>,
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

/// Why a script failed, if it did.
fn script_failure(what: &str, s: &ScriptReport) -> Option<String> {
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

fn signal_group(pgid: u32, sig: i32) {
    // SAFETY: signalling the process group our child leads.
    unsafe { libc::kill(-(pgid as i32), sig) };
}

/// Run one script through `sh -c` in the plan's directory, in a process group
/// of its own (so a timeout kills everything it started), with the plan's
/// environment.  Under test its group is recorded in `drills`, so what it
/// leaves running is stopped at the end.
fn run_script(
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
fn tail(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<(usize, String)> {
        let (plan, ps) = parse(Path::new("p.toml"), text);
        assert_eq!(plan.is_none(), !ps.is_empty());
        ps.into_iter().map(|p| (p.line, p.message)).collect()
    }

    #[test]
    fn a_good_plan_parses_with_defaults() {
        let (plan, ps) = parse(
            Path::new("/x/two-tier.toml"),
            "name = \"shop\"\n[[step]]\nname = \"db\"\ngroups = [\"db\"]\npoint = 7\n\
             post = \"./probe\"\nwait = \"5s\"\n[[step]]\nname = \"app\"\ngroups = [\"app\", \"web\"]\n",
        );
        assert!(ps.is_empty(), "{ps:?}");
        let plan = plan.unwrap();
        assert_eq!(plan.name, "shop");
        assert_eq!(plan.dir, Path::new("/x"));
        assert_eq!(plan.steps.len(), 2);
        assert_eq!(plan.steps[0].point, "7");
        assert_eq!(plan.steps[0].wait_secs, 5);
        assert_eq!(plan.steps[0].timeout_secs, DEFAULT_TIMEOUT);
        assert_eq!(plan.steps[0].post.as_ref().unwrap().line, 6);
        assert_eq!(plan.steps[1].line, 8);
        assert_eq!(plan.steps[1].groups, ["app", "web"]);
        assert_eq!(plan.steps[1].group_lines, [10, 10]);
        assert_eq!(plan.steps[1].point, "latest");
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let ps = problems(
            "name = \"p\"\nowner = \"me\"\n\
             [[step]]\nname = \"db\"\ngroups = [\"db\"]\ntimeout = \"5 minutes\"\n\
             [[step]]\nname = \"db\"\ngroups = []\nwait = 5\npoint = \"newest\"\nretries = 3\n\
             [[step]]\nname = \"app\"\n\
             [[step]]\nname = \"web\"\ngroups = [\"db\"]\n",
        );
        let lines: Vec<usize> = ps.iter().map(|p| p.0).collect();
        assert_eq!(lines, [2, 6, 8, 9, 10, 11, 12, 13, 17], "{ps:#?}");
        assert!(ps[0].1.contains("unknown key `owner`"), "{ps:?}");
        assert!(ps[1].1.contains("5 minutes"), "{ps:?}");
        assert!(ps[2]
            .1
            .contains("duplicate step name `db` (first at line 4)"));
        assert!(ps[3].1.contains("`groups` is empty"));
        assert!(ps[4].1.contains("`wait` must be a duration"));
        assert!(ps[5].1.contains("newest"));
        assert!(ps[6].1.contains("unknown key `retries`"));
        assert!(ps[7].1.contains("step app has no `groups`"));
        assert!(ps[8]
            .1
            .contains("group `db` is already brought up by step `db`"));
    }

    #[test]
    fn syntax_errors_and_missing_steps_name_lines() {
        let ps = problems("name = \"p\"\n\n[[step]\nname = 1\n");
        assert_eq!(ps[0].0, 3, "{ps:?}");
        assert!(ps[0].1.starts_with("TOML syntax"), "{ps:?}");
        let ps = problems("name = \"p\"\n");
        assert_eq!(
            ps,
            [(
                1,
                "the plan has no [[step]]: it needs at least one step".into()
            )]
        );
        let ps = problems("[step]\nname = \"a\"\ngroups = [\"g\"]\n");
        assert!(ps[0].1.contains("[[step]] tables"), "{ps:?}");
    }

    #[test]
    fn scripts_resolve_against_the_plan_dir_and_path() {
        let d = tempfile::tempdir().unwrap();
        let probe = d.path().join("probe");
        std::fs::write(&probe, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(d.path().join("notexec"), "x").unwrap();
        let path = "/usr/bin:/bin";
        assert!(resolve_command("./probe --x", d.path(), path).is_ok());
        assert!(resolve_command("A=1 ./probe", d.path(), path).is_ok());
        assert!(resolve_command("sh -c 'exit 0'", d.path(), path).is_ok());
        assert!(resolve_command("echo hi; exit 3", d.path(), path).is_ok());
        assert!(resolve_command("$HOME/x", d.path(), path).is_ok());
        let e = resolve_command("./missing", d.path(), path).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        let e = resolve_command("./notexec", d.path(), path).unwrap_err();
        assert!(e.contains("not executable"), "{e}");
        let e = resolve_command("probe", d.path(), path).unwrap_err();
        assert!(e.contains("not found in PATH"), "{e}");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let s: String = (0..30).map(|i| format!("line {i}\n")).collect();
        let t = tail(&s);
        assert!(t.starts_with("line 10\n") && t.ends_with("line 29"), "{t}");
        assert_eq!(tail(&"é".repeat(5000)).len() <= TAIL_BYTES, true);
    }
}
