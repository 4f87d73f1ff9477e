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
//!
//! The parts: [`parse`] (the TOML and `check`), [`run`] (the steps, drills and
//! reports) and [`script`] (a script's process group, timeout and output).

use std::path::PathBuf;

use serde::Serialize;

mod parse;
mod run;
mod script;

pub use parse::{check, parse, GroupFacts, Lookup};
pub use run::{
    run, CleanupReport, GroupReport, PlanReport, RunOptions, ScriptReport, Site, StepOutcome,
    StepReport, Up,
};

/// Timeout of a script when its step does not say (seconds): ten minutes.
pub const DEFAULT_TIMEOUT: u64 = 600;

/// Lines of a script's output (stdout and stderr together) kept in the report.
pub const TAIL_LINES: usize = 20;

/// At most this many bytes of those lines are kept (the end of them).
pub const TAIL_BYTES: usize = 4096;

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

#[cfg(test)]
mod tests;
