//! The commands: each parses nothing and prints little; the library does the work.

use anyhow::{bail, Context, Result};
use clap::Parser;
use drclone::daemon::{self, ControlRequest, ControlResponse};
use drclone::dr::Actor;
use drclone::engine::codec::Compression;
use drclone::engine::imex;
use drclone::engine::store::{InitOptions, Store};
use drclone::util::{human, parse_size, parse_volume_ref};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::args::*;

pub(crate) fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("drclone: error: {}", error_text(&e));
            std::process::exit(1);
        }
    }
}

/// An error and its causes, each cause only if its text is not already in what
/// is shown (anyhow's `{:#}` repeats a `#[source]` the message already holds, as
/// in "PATH: No such file or directory (os error 2): No such file ...").
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

/// Append a result to `out`: JSON with --json, else the text.
pub(crate) fn print(
    out: &mut String,
    json: bool,
    value: serde_json::Value,
    text: impl FnOnce() -> String,
) {
    if json {
        out.push_str(&serde_json::to_string_pretty(&value).expect("json"));
        out.push('\n');
    } else {
        let t = text();
        if !t.is_empty() {
            out.push_str(&t);
            out.push('\n');
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    let json = cli.json;
    match &cli.cmd {
        Cmd::Init {
            chunk_size,
            compression,
            encrypt,
            pack_size,
            backend,
            from_backend,
            s3_endpoint,
            s3_region,
            s3_credentials,
            cache_size,
            s3_pending_max,
        } => {
            let cs = parse_size(chunk_size)?;
            let s3 = match backend.as_ref().or(from_backend.as_ref()) {
                None => None,
                Some(url) => {
                    let (bucket, prefix) = drclone::engine::s3::S3Config::parse_url(url)?;
                    Some(drclone::engine::s3::S3Config {
                        bucket,
                        prefix,
                        endpoint: s3_endpoint.clone(),
                        region: s3_region.clone(),
                        cache_size: parse_size(cache_size)?,
                        pending_max: s3_pending_max.as_deref().map(parse_size).transpose()?,
                        credentials_file: s3_credentials
                            .as_deref()
                            .map(std::path::absolute)
                            .transpose()?,
                    })
                }
            };
            if let (Some(_), Some(s3)) = (from_backend, &s3) {
                return rebuild_from_backend(&cli.store, cli.key_file.as_deref(), s3, json);
            }
            let opts = InitOptions {
                chunk_size: u32::try_from(cs).context("chunk size too large")?,
                compression: compression.parse::<Compression>()?,
                encrypt: *encrypt,
                key_file: cli.key_file.clone(),
                pack_size: parse_size(pack_size)?,
                s3,
            };
            Store::init(&cli.store, &opts)?;
            let cfg = Store::read_config(&cli.store)?;
            let mut out = String::new();
            print(&mut out, json, serde_json::to_value(&cfg)?, || {
                format!(
                    "initialised store {} (chunk size {}, {:?}{})",
                    cli.store.display(),
                    human(cfg.chunk_size as u64),
                    cfg.compression,
                    if cfg.encrypted { ", encrypted" } else { "" }
                ) + &cfg
                    .s3
                    .as_ref()
                    .map_or(String::new(), |c| format!("; packs on {}", c.url()))
            });
            print!("{out}");
            return Ok(0);
        }
        Cmd::Serve {
            listen,
            no_tcp,
            socket,
            stdio,
            default_export,
            max_connections,
            handshake_timeout,
            idle_timeout,
            metrics,
            replication_listen,
            replication_token_file,
            tls_cert,
            tls_key,
        } => {
            if daemon::connect(&cli.store).is_some() {
                bail!(
                    "drclone serve is already running on store {}",
                    cli.store.display()
                );
            }
            let store = Arc::new(Store::open(&cli.store, cli.key_file.as_deref())?);
            store.start_destager();
            if *stdio {
                daemon::serve_stdio(store, default_export.as_deref())?;
                return Ok(0);
            }
            let limits = drclone::nbd::limits::Limits {
                max_connections: *max_connections,
                handshake_timeout: std::time::Duration::from_secs(*handshake_timeout),
                idle_timeout: idle_timeout.map(std::time::Duration::from_secs),
                ..Default::default()
            };
            if let Some(l) = daemon::activation_listener() {
                daemon::serve_activated(store, l, default_export.clone(), limits)?;
                return Ok(0);
            }
            let opts = daemon::Options {
                listen: (!no_tcp).then(|| listen.clone()),
                socket: socket.clone(),
                default_export: default_export.clone(),
                limits,
                metrics: metrics.clone(),
                replication: match replication_listen.as_deref() {
                    Some("off") => None,
                    Some(a) => Some((a.to_string(), true)),
                    None => Some(("127.0.0.1:10810".to_string(), false)),
                },
                replication_cfg: drclone::repl::receiver::Config {
                    token: super::repl::read_token(replication_token_file.as_deref())?,
                    tls: match (tls_cert, tls_key) {
                        (Some(c), Some(k)) => Some(drclone::repl::link::ServerTls::load(c, k)?),
                        _ => None,
                    },
                },
            };
            let handler: Arc<daemon::Handler> = Arc::new(handle_forwarded);
            daemon::run(store, opts, handler, |eps| {
                println!("drclone: serving {}", eps.join(" "));
            })?;
            return Ok(0);
        }
        _ => {}
    }
    if let Cmd::Replicate { .. } = &cli.cmd {
        // The agent, on the protected host: the store is the target's.
        return super::repl::run(&cli);
    }
    if let Cmd::Restore { .. } = &cli.cmd {
        // On a plain host: the store is the remote one.
        return super::repl::restore(&cli);
    }
    if let Cmd::Test { .. } = &cli.cmd {
        // The drill's command runs here, in the operator's environment; the store
        // side goes through a daemon (started for the drill if none runs).
        return super::dr::run_test(&cli);
    }
    if let Cmd::Plan(_) = &cli.cmd {
        // Like a drill: the scripts run here, the store side in a daemon.
        return super::plan::run(&cli);
    }
    // A running daemon owns the store: send it the command.
    if let Some(conn) = daemon::connect(&cli.store) {
        if let Cmd::Mount { dir } = &cli.cmd {
            // The daemon hosts the mount; this process holds the foreground.
            let resp = daemon::forward(
                conn,
                &ControlRequest {
                    argv: std::env::args().collect(),
                    cwd: std::env::current_dir()?,
                    uid: None,
                },
            )?;
            print!("{}", resp.stdout);
            eprint!("{}", resp.stderr);
            if resp.code != 0 {
                return Ok(resp.code);
            }
            drclone::fuse::wait_until_unmounted(dir)?;
            if let Some(conn) = daemon::connect(&cli.store) {
                let argv = vec![
                    "drclone".to_string(),
                    "unmount".to_string(),
                    std::path::absolute(dir)?.display().to_string(),
                ];
                let _ = daemon::forward(
                    conn,
                    &ControlRequest {
                        argv,
                        cwd: std::env::current_dir()?,
                        uid: None,
                    },
                );
            }
            return Ok(0);
        }
        let req = ControlRequest {
            argv: std::env::args().collect(),
            cwd: std::env::current_dir()?,
            uid: None,
        };
        let resp = daemon::forward(conn, &req)?;
        print!("{}", resp.stdout);
        eprint!("{}", resp.stderr);
        return Ok(resp.code);
    }
    if let Cmd::Unmount { dir } = &cli.cmd {
        drclone::fuse::fusermount_unmount(dir)?;
        return Ok(0);
    }
    if let Cmd::Mount { dir } = &cli.cmd {
        // A standalone mount owns the store, so it runs the control socket too (a
        // daemon without NBD listeners): every other command keeps working while
        // it runs.  It ends when the mount goes (fusermount3 -u) or on a signal.
        let store = Arc::new(Store::open(&cli.store, cli.key_file.as_deref())?);
        store.start_destager();
        drclone::fuse::mount_hosted(store.clone(), dir)?;
        let watched = dir.clone();
        std::thread::spawn(move || {
            let _ = drclone::fuse::wait_until_unmounted(&watched);
            // SAFETY: raising a signal this process handles (daemon::run's flag).
            unsafe { libc::raise(libc::SIGTERM) };
        });
        let opts = daemon::Options {
            listen: None,
            socket: None,
            default_export: None,
            limits: Default::default(),
            metrics: None,
            replication: None,
            replication_cfg: Default::default(),
        };
        let handler: Arc<daemon::Handler> = Arc::new(handle_forwarded);
        let shown = (cli.store.clone(), dir.clone());
        daemon::run(store, opts, handler, move |_| {
            println!(
                "drclone: mounted {} on {}",
                shown.0.display(),
                shown.1.display()
            );
        })?;
        return Ok(0);
    }
    let store = Arc::new(Store::open(&cli.store, cli.key_file.as_deref())?);
    let mut out = String::new();
    let res = dispatch(&store, cli.cmd, json, &mut out, None, Actor::current());
    print!("{out}");
    store.close()?;
    res.map(|()| 0)
}

/// Run a command forwarded over the control socket against the daemon's store.
/// `drclone init --from-backend`: rebuild the store from its bucket, then open
/// it once (the open repairs what the bucket lacked and checkpoints the catalog
/// as this store's) and report what it holds.
fn rebuild_from_backend(
    dir: &Path,
    key_file: Option<&Path>,
    s3: &drclone::engine::s3::S3Config,
    json: bool,
) -> Result<i32> {
    let rep = drclone::engine::s3::rebuild::rebuild(dir, s3, key_file)?;
    let store = Store::open(dir, key_file)?;
    let groups = store.groups()?;
    let mut points = 0;
    for g in &groups {
        points += store.points(&g.name)?.len();
    }
    let volumes = store.volumes(None)?.len();
    store.close()?;
    let mut v = serde_json::to_value(&rep)?;
    v["groups"] = groups.len().into();
    v["volumes"] = volumes.into();
    v["points"] = points.into();
    let mut out = String::new();
    print(&mut out, json, v, || {
        let mut t = format!(
            "rebuilt store {} from {} (catalog {}, taken {} at {}): {} group(s), {} volume(s), {} point(s)",
            dir.display(),
            s3.url(),
            rep.catalog_seq,
            rep.catalog_reason,
            fmt_time(rep.catalog_time),
            groups.len(),
            volumes,
            points
        );
        if !rep.packs_missing.is_empty() {
            t += &format!(
                "\nwarning: {} pack(s) had not reached the bucket ({} chunk(s) lost): heads that used them read older data",
                rep.packs_missing.len(),
                rep.chunks_lost
            );
        }
        t
    });
    print!("{out}");
    Ok(0)
}

fn handle_forwarded(store: &Arc<Store>, req: ControlRequest) -> ControlResponse {
    let cli = match Cli::try_parse_from(&req.argv) {
        Ok(c) => c,
        Err(e) => {
            return ControlResponse {
                code: 2,
                stdout: String::new(),
                stderr: e.to_string(),
            }
        }
    };
    if matches!(cli.cmd, Cmd::Init { .. } | Cmd::Serve { .. }) {
        return ControlResponse {
            code: 1,
            stdout: String::new(),
            stderr: format!(
                "drclone: error: drclone serve is already running on store {}\n",
                store.dir().display()
            ),
        };
    }
    let mut out = String::new();
    let who = Actor {
        uid: req.uid.unwrap_or(u32::MAX),
    };
    match dispatch(store, cli.cmd, cli.json, &mut out, Some(&req.cwd), who) {
        Ok(()) => ControlResponse {
            code: 0,
            stdout: out,
            stderr: String::new(),
        },
        Err(e) => ControlResponse {
            code: 1,
            stdout: out,
            stderr: format!("drclone: error: {}\n", error_text(&e)),
        },
    }
}

/// A path given by the user, relative to the client's working directory.
fn user_path(p: &Path, cwd: Option<&Path>) -> PathBuf {
    match cwd {
        Some(c) if p.is_relative() => c.join(p),
        _ => p.to_path_buf(),
    }
}

/// Progress bars only for a local command on a terminal.
fn bar(len: u64, what: &str, forwarded: bool) -> indicatif::ProgressBar {
    if forwarded {
        indicatif::ProgressBar::hidden()
    } else {
        imex::progress_bar(len, what)
    }
}

fn dispatch(
    store: &Arc<Store>,
    cmd: Cmd,
    json: bool,
    out: &mut String,
    cwd: Option<&Path>,
    who: Actor,
) -> Result<()> {
    let fwd = cwd.is_some();
    match cmd {
        cmd @ (Cmd::Drill(_)
        | Cmd::Failover { .. }
        | Cmd::Status
        | Cmd::Audit
        | Cmd::Retention(_)
        | Cmd::Point(PointCmd::Rm { .. })) => super::dr::dispatch(store, cmd, json, out, who)?,
        Cmd::Test { .. } => unreachable!("drclone test runs in the client (cli::dr::run_test)"),
        Cmd::Plan(_) => unreachable!("drclone plan runs in the client (cli::plan::run)"),
        Cmd::Replicate { .. } => unreachable!("drclone replicate opens no store (cli::repl::run)"),
        Cmd::Restore { .. } => unreachable!("drclone restore opens no store (cli::repl::restore)"),
        cmd @ Cmd::Push { .. } => super::repl::push(store, cmd, json, out, cwd)?,
        cmd @ Cmd::Failback { .. } => {
            super::repl::failback(store, cmd, json, out, cwd, who, &daemon::disconnect)?
        }
        Cmd::Mount { dir } => {
            let dir = user_path(&dir, cwd);
            drclone::fuse::mount_hosted(store.clone(), &dir)?;
            print(out, json, json!({"mounted": dir}), || {
                format!(
                    "drclone: mounted on {} (hosted by the daemon)",
                    dir.display()
                )
            });
        }
        Cmd::Unmount { dir } => {
            let dir = user_path(&dir, cwd);
            if !drclone::fuse::unmount_hosted(&dir) {
                drclone::fuse::fusermount_unmount(&dir)?;
            }
            print(out, json, json!({"unmounted": dir}), || {
                format!("unmounted {}", dir.display())
            });
        }
        Cmd::Init { .. } | Cmd::Serve { .. } => unreachable!("handled before opening"),
        Cmd::Group(GroupCmd::Create { group }) => {
            let g = store.create_group(&group)?;
            print(out, json, serde_json::to_value(&g)?, || {
                format!("created group {group}")
            });
        }
        Cmd::Group(GroupCmd::Set {
            group,
            checkpoint_interval,
        }) => {
            let secs = match checkpoint_interval.as_str() {
                "off" => None,
                d => Some(drclone::engine::types::parse_duration(d)?),
            };
            let g = store.set_checkpoint_interval(&group, secs)?;
            print(out, json, serde_json::to_value(&g)?, || match secs {
                Some(s) => format!("group {group}: a checkpoint every {s} s"),
                None => format!("group {group}: no checkpoints"),
            });
        }
        Cmd::Group(GroupCmd::List) => {
            let gs = store.groups()?;
            print(out, json, serde_json::to_value(&gs)?, || {
                gs.iter()
                    .map(|g| g.name.clone())
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Cmd::Volume(VolumeCmd::Create { volume, size }) => {
            let (g, d, p) = parse_volume_ref(&volume)?;
            if p.is_some() {
                bail!("volume create takes GROUP/DISK, not a point");
            }
            let v = store.create_volume(&g, &d, parse_size(&size)?)?;
            print(out, json, serde_json::to_value(&v)?, || {
                format!("created volume {volume} ({})", human(v.size))
            });
        }
        Cmd::Volume(VolumeCmd::List) => {
            let vs = store.volumes(None)?;
            print(out, json, serde_json::to_value(&vs)?, || {
                let mut s = format!("{:<32} {:>12}", "VOLUME", "SIZE");
                for v in &vs {
                    s += &format!(
                        "\n{:<32} {:>12}",
                        format!("{}/{}", v.group, v.disk),
                        human(v.size)
                    );
                }
                s
            });
        }
        Cmd::Volume(VolumeCmd::Resize { volume, size }) => {
            let (g, d, _) = parse_volume_ref(&volume)?;
            let v = store.resize_volume(&g, &d, parse_size(&size)?)?;
            print(out, json, serde_json::to_value(&v)?, || {
                format!("{volume} is now {}", human(v.size))
            });
        }
        Cmd::Volume(VolumeCmd::Rm { volume }) => {
            let (g, d, _) = parse_volume_ref(&volume)?;
            store.remove_volume(&g, &d)?;
            print(out, json, json!({"removed": volume}), || {
                format!("removed volume {volume}")
            });
        }
        Cmd::Import { volume, file } => {
            let view = store.view_ref(&volume)?;
            let pb = bar(view.size, &format!("import {volume}"), fwd);
            let file = user_path(&file, cwd);
            let t = std::time::Instant::now();
            let rep = imex::import(store, &view, &file, &pb)?;
            store.flush()?;
            let secs = t.elapsed().as_secs_f64();
            print(
                out,
                json,
                json!({"volume": volume, "bytes": rep.bytes, "data_bytes": rep.data_bytes,
                               "hole_bytes": rep.hole_bytes, "seconds": secs}),
                || {
                    format!(
                        "imported {} into {volume} ({} data, {} holes) in {secs:.2}s",
                        file.display(),
                        human(rep.data_bytes),
                        human(rep.hole_bytes)
                    )
                },
            );
        }
        Cmd::Export { volume, file } => {
            let view = store.view_ref(&volume)?;
            let pb = bar(view.size, &format!("export {volume}"), fwd);
            let file = user_path(&file, cwd);
            let rep = imex::export(store, &view, &file, &pb)?;
            print(
                out,
                json,
                json!({"volume": view.name, "bytes": rep.bytes, "data_bytes": rep.data_bytes}),
                || {
                    format!(
                        "exported {} to {} ({} data)",
                        view.name,
                        file.display(),
                        human(rep.data_bytes)
                    )
                },
            );
        }
        Cmd::Point(PointCmd::Create {
            group,
            label,
            app_consistent,
        }) => {
            let p = store.create_point(&group, app_consistent, label)?;
            print(out, json, serde_json::to_value(&p)?, || {
                format!("created point {} of {group}", p.id)
            });
        }
        Cmd::Point(PointCmd::List { group }) => {
            let ps = store.points(&group)?;
            let arr: Vec<_> = ps
                .iter()
                .map(|p| {
                    json!({"id": p.id, "time": p.time, "kind": p.kind, "label": p.label,
                                "volumes": p.volumes.iter().map(|v| &v.disk).collect::<Vec<_>>(),
                                "origin": p.origin})
                })
                .collect();
            print(out, json, json!(arr), || {
                let mut s = format!("{:>6}  {:<20}  {:<5}  LABEL", "ID", "TIME (UTC)", "KIND");
                for p in &ps {
                    s += &format!(
                        "\n{:>6}  {:<20}  {:<5}  {}",
                        p.id,
                        fmt_time(p.time),
                        p.kind,
                        p.label.as_deref().unwrap_or("")
                    );
                }
                s
            });
        }
        Cmd::Clone { source, target } => {
            let (sg, sd, sp) = parse_volume_ref(&source)?;
            let sp = sp.context("clone source must name a point: GROUP/DISK@POINT")?;
            let (tg, td, tp) = parse_volume_ref(&target)?;
            if tp.is_some() {
                bail!("clone target must be GROUP/DISK");
            }
            let t = std::time::Instant::now();
            let v = store.clone_volume(&sg, &sd, &sp, &tg, &td)?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            print(
                out,
                json,
                json!({"volume": target, "size": v.size, "time_ms": ms}),
                || format!("cloned {source} to {target} in {ms:.1} ms"),
            );
        }
        Cmd::Sessions => {
            let l = daemon::sessions().map(|s| s.list()).unwrap_or_default();
            print(out, json, serde_json::to_value(&l)?, || {
                l.iter()
                    .map(|s| {
                        format!(
                            "{:>4} {:<22} {:<24} {} since {} ({} in flight)",
                            s.id,
                            s.peer,
                            s.export.as_deref().unwrap_or("(negotiating)"),
                            if s.writable { "rw" } else { "ro" },
                            s.started,
                            s.in_flight
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Cmd::Df => {
            let r = drclone::engine::maint::df(store)?;
            print(out, json, serde_json::to_value(&r)?, || {
                format!(
                    "logical    {}\nreferenced {}\nunique     {}\nstored     {}\npacks      {}\ndedup      {:.2}x\ncompress   {:.2}x",
                    human(r.logical_bytes), human(r.referenced_bytes), human(r.unique_bytes),
                    human(r.stored_bytes), human(r.pack_bytes), r.dedup_ratio, r.compression_ratio
                )
            });
        }
        Cmd::Gc => {
            let r = drclone::engine::gc::gc(store)?;
            print(out, json, serde_json::to_value(&r)?, || {
                format!(
                    "gc: freed {} chunks, deleted {} packs, compacted {}; packs {} -> {}",
                    r.chunks_freed,
                    r.packs_deleted,
                    r.packs_compacted,
                    human(r.pack_bytes_before),
                    human(r.pack_bytes_after)
                )
            });
        }
        Cmd::Verify => {
            let pb = bar(0, "verify", fwd);
            pb.set_style(indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} chunks",
            )?);
            let r = drclone::engine::maint::verify(store, &pb)?;
            print(out, json, serde_json::to_value(&r)?, || {
                let mut s = format!(
                    "checked {} chunks ({})",
                    r.chunks_checked,
                    human(r.bytes_checked)
                );
                for b in &r.bad_packs {
                    s += &format!("\nBAD pack {}: {}", b.pack, b.error);
                }
                for b in &r.bad {
                    s += &format!(
                        "\nBAD chunk {} (pack {} offset {}, in {}): {}\n    used by: {}",
                        b.chunk,
                        b.pack,
                        b.offset,
                        b.object,
                        b.error,
                        if b.used_by.is_empty() {
                            "nothing (garbage)".into()
                        } else {
                            b.used_by.join(", ")
                        }
                    );
                }
                s
            });
            if !r.ok {
                bail!(
                    "verify found {} bad chunk(s) and {} bad pack(s) in store {}",
                    r.bad.len(),
                    r.bad_packs.len(),
                    store.dir().display()
                );
            }
        }
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS` in UTC without a time-zone crate.
pub(crate) fn fmt_time(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
