//! Parsing and checking a recovery plan: the TOML walked on toml's spanned
//! document tree, every problem reported at once with its line.

use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::{Plan, Problem, Script, Step, DEFAULT_TIMEOUT};
use crate::engine::types::{parse_duration, Role};
use crate::error::{Error, Result};

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
pub(super) fn resolve_command(
    command: &str,
    dir: &Path,
    path: &str,
) -> std::result::Result<(), String> {
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
