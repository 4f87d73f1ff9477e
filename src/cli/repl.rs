//! `drclone replicate`: the agent side, run on the protected host.  It opens no
//! store (the store is the target's); the library does the work
//! (`drclone::repl::agent`).

use anyhow::{bail, Context, Result};
use drclone::dr::{failback, Actor, Disconnect};
use drclone::engine::types::parse_duration;
use drclone::repl::agent::{self, Options, VolumeSpec};
use drclone::repl::link::ClientTls;
use drclone::repl::push::{self, PushOptions};
use drclone::repl::restore::{self, RestoreOptions};
use drclone::util::parse_size;
use drclone::Store;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::args::*;

fn volume_spec(s: &str) -> Result<VolumeSpec> {
    let (name, src) = s
        .split_once('=')
        .with_context(|| format!("--volume {s:?} is not GROUP/DISK=SOURCE"))?;
    let (group, disk) = name
        .split_once('/')
        .with_context(|| format!("--volume {s:?}: {name:?} is not GROUP/DISK"))?;
    drclone::util::check_name("group", group)?;
    drclone::util::check_name("disk", disk)?;
    Ok(VolumeSpec {
        group: group.into(),
        disk: disk.into(),
        source: PathBuf::from(src),
    })
}

/// A token file's first line (whitespace trimmed).
pub(crate) fn read_token(f: Option<&Path>) -> Result<Option<String>> {
    let Some(f) = f else { return Ok(None) };
    let t = std::fs::read_to_string(f)
        .with_context(|| format!("reading the token file {}", f.display()))?
        .trim()
        .to_string();
    if t.is_empty() {
        bail!("the token file {} is empty", f.display());
    }
    Ok(Some(t))
}

/// `drclone restore`: no store here; the disk comes from `--from`.
pub(crate) fn restore(cli: &Cli) -> Result<i32> {
    let Cmd::Restore {
        volume,
        from,
        to,
        force,
        token_file,
        tls_ca,
    } = &cli.cmd
    else {
        unreachable!()
    };
    let (group, disk, point) = drclone::util::parse_volume_ref(volume)?;
    let opts = RestoreOptions {
        from: from.clone(),
        group,
        disk,
        point,
        to: to.clone(),
        token: read_token(token_file.as_deref())?,
        tls: tls_ca.as_deref().map(ClientTls::load).transpose()?,
        force: *force,
        progress: !cli.json && std::io::stderr().is_terminal(),
    };
    let r = restore::restore(&opts)?;
    let mut out = String::new();
    super::commands::print(&mut out, cli.json, serde_json::to_value(&r)?, || {
        format!(
            "restored {volume} (point {}) to {}: {} block(s) differed, {} fetched, {} bytes \
             received, verified, {} ms",
            r.point,
            to.display(),
            r.blocks_changed,
            drclone::util::human(r.bytes_fetched),
            r.bytes_received,
            r.duration_ms
        )
    });
    print!("{out}");
    Ok(0)
}

/// The options `push` and `failback` share; paths relative to the client's
/// `cwd` when forwarded.
fn push_options(
    group: String,
    target: String,
    token_file: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    bwlimit: Option<&str>,
    cwd: Option<&Path>,
    json: bool,
) -> Result<PushOptions> {
    let path = |p: PathBuf| match cwd {
        Some(c) if p.is_relative() => c.join(p),
        _ => p,
    };
    let opts = PushOptions {
        target,
        group,
        token: read_token(token_file.map(path).as_deref())?,
        tls: tls_ca
            .map(path)
            .as_deref()
            .map(ClientTls::load)
            .transpose()?,
        bwlimit: bwlimit.map(parse_size).transpose()?,
        progress: cwd.is_none() && !json && std::io::stderr().is_terminal(),
        keep_diverged: false,
    };
    if opts.bwlimit == Some(0) {
        bail!("--bwlimit must be more than 0");
    }
    Ok(opts)
}

/// `drclone failback`, against the store (local, or the daemon's).
pub(crate) fn failback(
    store: &Store,
    cmd: Cmd,
    json: bool,
    out: &mut String,
    cwd: Option<&Path>,
    who: Actor,
    disconnect: Disconnect<'_>,
) -> Result<()> {
    let Cmd::Failback {
        group,
        target,
        planned,
        token_file,
        tls_ca,
        bwlimit,
    } = cmd
    else {
        unreachable!()
    };
    let opts = failback::Options {
        push: push_options(
            group,
            target,
            token_file,
            tls_ca,
            bwlimit.as_deref(),
            cwd,
            json,
        )?,
        planned,
        small: 64 << 20,
        max_passes: 5,
    };
    let r = failback::run(store, who, &opts, disconnect)?;
    super::commands::print(out, json, serde_json::to_value(&r)?, || {
        let mut s = String::new();
        for p in &r.passes {
            s += &format!(
                "pass: point(s) {} landed, {} changed, {} bytes on the wire, {} ms\n",
                p.points
                    .iter()
                    .map(|(a, b)| format!("{a}->{b}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                drclone::util::human(p.bytes_logical),
                p.bytes_sent,
                p.duration_ms
            );
        }
        if let Some(d) = r.diverged {
            s += &format!(
                "the original site had written after the common point: those writes are kept \
                 there in point {d} (label diverged-...), and its heads rolled back first\n"
            );
        }
        s += &if r.planned {
            format!(
                "failed back {} (planned): {} NBD session(s) stopped here; this site is now a \
                 replica ({}), the original site is the protected side",
                r.group, r.disconnected, r.role
            )
        } else {
            format!(
                "failed back {}: the original site holds this site's data; this site still \
                 serves the group ({})",
                r.group, r.role
            )
        };
        s
    });
    Ok(())
}

/// `drclone push`, against the store (local, or the daemon's).
pub(crate) fn push(
    store: &Store,
    cmd: Cmd,
    json: bool,
    out: &mut String,
    cwd: Option<&Path>,
) -> Result<()> {
    let Cmd::Push {
        group,
        target,
        token_file,
        tls_ca,
        bwlimit,
    } = cmd
    else {
        unreachable!()
    };
    let opts = push_options(
        group,
        target,
        token_file,
        tls_ca,
        bwlimit.as_deref(),
        cwd,
        json,
    )?;
    let r = push::push(store, &opts)?;
    super::commands::print(out, json, serde_json::to_value(&r)?, || {
        if r.points.is_empty() {
            format!("{}: the target already holds every point", r.group)
        } else {
            format!(
                "pushed {} point(s) of {} ({}): {} changed, {} chunk(s) sent, {} bytes on \
                 the wire, {} ms",
                r.points.len(),
                r.group,
                r.points
                    .iter()
                    .map(|(s, t)| format!("{s}->{t}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                drclone::util::human(r.bytes_logical),
                r.chunks_sent,
                r.bytes_sent,
                r.duration_ms
            )
        }
    });
    Ok(())
}

fn default_state_dir() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("drclone")
}

/// Run `replicate`: one cycle, or cycles every --interval until SIGTERM/SIGINT.
/// Exit code 0, or 1 when the (single) cycle failed.
pub(crate) fn run(cli: &Cli) -> Result<i32> {
    let Cmd::Replicate {
        target,
        volumes,
        interval,
        state_dir,
        token_file,
        bwlimit,
        pre_snapshot,
        post_snapshot,
        label,
        dirty_bitmap,
        reprotect,
        tls_ca,
    } = &cli.cmd
    else {
        unreachable!()
    };
    let token = read_token(token_file.as_deref())?;
    let opts = Options {
        target: target.clone(),
        volumes: volumes
            .iter()
            .map(|v| volume_spec(v))
            .collect::<Result<_>>()?,
        state_dir: state_dir.clone().unwrap_or_else(default_state_dir),
        token,
        label: label.clone(),
        bwlimit: bwlimit.as_deref().map(parse_size).transpose()?,
        pre_snapshot: pre_snapshot.clone(),
        post_snapshot: post_snapshot.clone(),
        progress: !cli.json && std::io::stderr().is_terminal(),
        dirty_bitmap: dirty_bitmap.clone(),
        reprotect: *reprotect,
        tls: tls_ca.as_deref().map(ClientTls::load).transpose()?,
    };
    if opts.bwlimit == Some(0) {
        bail!("--bwlimit must be more than 0");
    }
    let print = |r: &agent::CycleReport| {
        if cli.json {
            println!("{}", serde_json::to_string(r).expect("json"));
        } else {
            println!(
                "point {} of {}: {} changed, {} chunk(s) sent, {} bytes on the wire, {} ms{}",
                r.point,
                r.group,
                drclone::util::human(r.bytes_logical),
                r.chunks_sent,
                r.bytes_sent,
                r.duration_ms,
                if r.app { " (app-consistent)" } else { "" }
            );
        }
    };
    match interval {
        None => {
            let r = agent::cycle(&opts)?;
            print(&r);
            Ok(0)
        }
        Some(i) => {
            let every = std::time::Duration::from_secs(parse_duration(i)?);
            let stop = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
            signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
            agent::run_every(
                &opts,
                every,
                &|| stop.load(Ordering::Relaxed),
                &mut |r| match r {
                    Ok(r) => print(r),
                    Err(e) => eprintln!("drclone: cycle failed: {e}"),
                },
            );
            Ok(0)
        }
    }
}
