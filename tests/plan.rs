//! Recovery plans (issue 12) through the real binary: `drclone plan run` of a
//! two-tier plan (database group first, then the application group) runs its
//! steps in order with their scripts, which reach the exports over NBD; under
//! `--test` nothing is left behind (no clone, export, drill record or name
//! change), also when a post script fails or times out; a real run fails the
//! groups over; `plan check` reports a broken plan line by line.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

const MIB: usize = 1 << 20;

/// Point data of `db/vol` (A) and `app/vol` (C); each head then moves on
/// (B, D) so a clone or failover of the point is told apart from the head.
fn data() -> [Vec<u8>; 4] {
    [
        random_bytes(11, MIB),
        random_bytes(12, MIB),
        random_bytes(13, MIB),
        random_bytes(14, MIB),
    ]
}

/// A store with groups `db` and `app`, one 4 MiB volume each holding data, a
/// point of each, and heads that moved on after it.
fn setup() -> Env {
    let env = Env::new();
    let [a, b, c, d] = data();
    env.ok(&["init"]);
    for (g, point, head) in [("db", &a, &b), ("app", &c, &d)] {
        env.ok(&["group", "create", g]);
        env.ok(&["volume", "create", &format!("{g}/vol"), "--size", "4M"]);
        let f = env.path(&format!("{g}.bin"));
        std::fs::write(&f, point).unwrap();
        env.ok(&["import", &format!("{g}/vol"), f.to_str().unwrap()]);
        env.ok(&["point", "create", g]);
        std::fs::write(&f, head).unwrap();
        env.ok(&["import", &format!("{g}/vol"), f.to_str().unwrap()]);
    }
    // The hook every step runs: a line per phase in the log; after the groups
    // are up, the size of each export (nbdinfo) and its first MiB (nbdcopy).
    let hook = env.path("hook");
    std::fs::write(
        &hook,
        r#"#!/bin/sh
set -e
echo "$(date +%s.%N) step=$DRCLONE_STEP phase=$DRCLONE_PHASE plan=$DRCLONE_PLAN test=$DRCLONE_TEST groups=$DRCLONE_GROUPS" >> hooks.log
if [ "$DRCLONE_PHASE" = post ]; then
    echo "exports=$(printf '%s\n' "$DRCLONE_EXPORTS" | grep -c .)" >> hooks.log
    printf '%s\n' "$DRCLONE_EXPORTS" | while read -r u; do
        echo "uri=$u size=$(nbdinfo --size "$u")" >> hooks.log
        nbdcopy "$u" - | head -c 1048576 > "seen-$DRCLONE_STEP.bin"
    done
fi
"#,
    )
    .unwrap();
    chmod_x(&hook);
    env
}

fn chmod_x(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Write a plan next to the store; returns its path.
fn plan(env: &Env, name: &str, text: &str) -> String {
    let p = env.path(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

const TWO_TIER: &str = r#"name = "two-tier"

[[step]]
name = "database"
groups = ["db"]
pre = "./hook"
post = "./hook"
timeout = "1m"
wait = "1s"

[[step]]
name = "application"
groups = ["app"]
point = "latest"
pre = "./hook"
post = "./hook"
"#;

/// Run `drclone ARGS --json`: (exit code, the report, stderr).
fn run_plan(env: &Env, args: &[&str]) -> (i32, Value, String) {
    let out = env
        .cmd()
        .args(args)
        .arg("--json")
        .timeout(std::time::Duration::from_secs(300))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stderr}"));
    (out.status.code().unwrap_or(-1), v, stderr)
}

/// The log lines of the hooks: (step, phase) in the order they ran.
fn hook_calls(env: &Env) -> Vec<(String, String)> {
    let log = std::fs::read_to_string(env.path("hooks.log")).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains(" step="))
        .map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .unwrap()
                    .to_string()
            };
            (field("step="), field("phase="))
        })
        .collect()
}

/// What the plan may not change: groups, volumes, roles, drills, the heads'
/// data, and (with a daemon) the exports listed.
fn state(env: &Env, srv: Option<&Server>) -> Value {
    let roles: Vec<(String, String)> = env
        .json(&["status"])
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["group"].as_str().unwrap().to_string(),
                g["role"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let heads: Vec<bool> = {
        let [_, b, _, d] = data();
        [("db", b), ("app", d)]
            .iter()
            .map(|(g, head)| {
                let f = env.path(&format!("head-{g}.bin"));
                let _ = std::fs::remove_file(&f);
                env.ok(&["export", &format!("{g}/vol"), f.to_str().unwrap()]);
                std::fs::read(&f).unwrap()[..MIB] == head[..]
            })
            .collect()
    };
    let names = |v: Value, k: &str| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x[k].to_string())
            .collect()
    };
    let mut exports = String::new();
    if let Some(s) = srv {
        exports = run(
            "nbdinfo",
            &["--list", "--json", &format!("nbd://127.0.0.1:{}", s.port)],
        );
        assert!(
            !exports.contains("drill"),
            "a drill export is left: {exports}"
        );
    }
    let mut export_names: Vec<String> = serde_json::from_str::<Value>(&exports)
        .ok()
        .map(|v| names(v["exports"].clone(), "export-name"))
        .unwrap_or_default();
    export_names.sort();
    serde_json::json!({
        "groups": names(env.json(&["group", "list"]), "name"),
        "volumes": env.ok(&["volume", "list"]),
        "roles": roles,
        // Drills whose clones still exist (a finished drill's record stays as
        // evidence, as `drclone test` leaves it).
        "drills": env
            .json(&["drill", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["clones_removed"].is_null())
            .cloned()
            .collect::<Vec<_>>(),
        "heads_unchanged": heads,
        "exports": export_names,
    })
}

fn assert_nothing_left(env: &Env, srv: Option<&Server>, before: &Value) {
    let after = state(env, srv);
    assert_eq!(&after, before, "the plan left something behind");
    assert_eq!(
        after["drills"],
        serde_json::json!([]),
        "a drill's clones are left"
    );
    assert!(!after["volumes"].as_str().unwrap().contains("drill"));
    assert_eq!(after["heads_unchanged"], serde_json::json!([true, true]));
}

/// A two-group plan under --test with a daemon running: steps in order (the
/// database's scripts before the application's), each post script reaches
/// its step's exports over NBD and reads the point's data (not the head's),
/// and at the end nothing is left: no clone, export, drill record, name or
/// role change.  `plan check` of the same plan (through the daemon) is clean.
#[test]
fn plan_test_runs_steps_in_order_and_leaves_nothing_behind() {
    need("nbdinfo");
    need("nbdcopy");
    let env = setup();
    let srv = Server::start(&env);
    let before = state(&env, Some(&srv));
    let file = plan(&env, "two-tier.toml", TWO_TIER);
    let out = env.ok(&["plan", "check", &file]);
    assert!(out.contains("2 step(s), no problems"), "{out}");

    let (code, r, stderr) = run_plan(&env, &["plan", "run", "--test", &file]);
    assert_eq!(code, 0, "{r:#}\n{stderr}");
    assert_eq!(r["ok"], true);
    assert_eq!(r["test"], true);
    assert_eq!(r["plan"], "two-tier");
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    // Point ids are store-wide: db's is 1, app's 2.
    for (s, name, group, point) in [
        (&steps[0], "database", "db", 1),
        (&steps[1], "application", "app", 2),
    ] {
        assert_eq!(s["name"], name);
        assert_eq!(s["outcome"], "ok", "{s:#}");
        assert_eq!(s["groups"][0]["group"], group);
        assert_eq!(s["groups"][0]["point"], point);
        assert!(s["groups"][0]["drill"].as_u64().is_some());
        assert_eq!(s["pre"]["exit_code"], 0);
        assert_eq!(s["post"]["exit_code"], 0);
        assert!(s["started"].as_u64().is_some() && s["finished"].as_u64().is_some());
        assert!(s["duration_ms"].as_u64().is_some());
        let ex = s["exports"].as_array().unwrap();
        assert_eq!(ex.len(), 1, "{s:#}");
        let uri = ex[0].as_str().unwrap();
        assert!(
            uri.starts_with("nbd://") && uri.contains(&format!("/{group}.drill-")),
            "{uri}"
        );
    }
    assert_eq!(r["cleanup"]["ok"], true);
    assert_eq!(r["cleanup"]["drills_removed"].as_array().unwrap().len(), 2);
    // In order: the database's scripts, then the application's.
    let calls = hook_calls(&env);
    let want: Vec<(String, String)> = [
        ("database", "pre"),
        ("database", "post"),
        ("application", "pre"),
        ("application", "post"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(calls, want);
    let log = std::fs::read_to_string(env.path("hooks.log")).unwrap();
    assert!(log.contains("test=1"), "{log}");
    assert!(log.contains("plan=two-tier"), "{log}");
    assert_eq!(log.matches("exports=1").count(), 2, "{log}");
    assert_eq!(log.matches(" size=4194304").count(), 2, "{log}");
    // The exports served the point (A, C), not the heads (B, D).
    let [a, _, c, _] = data();
    assert!(std::fs::read(env.path("seen-database.bin")).unwrap() == a);
    assert!(std::fs::read(env.path("seen-application.bin")).unwrap() == c);
    assert_nothing_left(&env, Some(&srv), &before);
}

/// Under --test with no daemon running (the plan starts one): a post script
/// that fails stops the plan there (the next step never runs), the report
/// names the step and shows the script's last 20 lines; a script that times
/// out is killed with what it started; either way nothing is left behind.
#[test]
fn plan_test_cleans_up_after_a_failed_step_and_a_timeout() {
    need("nbdinfo");
    need("nbdcopy");
    let env = setup();
    let before = state(&env, None);
    let failing = plan(
        &env,
        "failing.toml",
        r#"[[step]]
name = "database"
groups = ["db"]
pre = "./hook"
post = "./hook && for i in $(seq 1 25); do echo out-line-$i; done; echo oops >&2; exit 4"

[[step]]
name = "application"
groups = ["app"]
pre = "./hook"
"#,
    );
    let (code, r, stderr) = run_plan(&env, &["plan", "run", "--test", &failing]);
    assert_eq!(code, 1, "{r:#}\n{stderr}");
    assert_eq!(r["ok"], false);
    assert_eq!(r["failed_step"], "database");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("post script exited with 4"),
        "{r:#}"
    );
    let s0 = &r["steps"][0];
    assert_eq!(s0["outcome"], "failed");
    assert_eq!(s0["post"]["exit_code"], 4);
    let tail = s0["post"]["output_tail"].as_str().unwrap();
    let lines: Vec<&str> = tail.lines().collect();
    assert_eq!(lines.len(), 20, "the last 20 lines: {tail}");
    assert_eq!(lines[19], "oops", "{tail}");
    assert_eq!(lines[0], "out-line-7", "{tail}");
    assert_eq!(r["steps"][1]["outcome"], "not-run");
    assert!(r["steps"][1]["pre"].is_null());
    assert_eq!(r["cleanup"]["drills_removed"].as_array().unwrap().len(), 1);
    let calls = hook_calls(&env);
    assert_eq!(calls.len(), 2, "the application step never ran: {calls:?}");
    assert!(calls.iter().all(|(s, _)| s == "database"), "{calls:?}");
    assert!(daemon_gone(&env), "the plan's own daemon is still running");
    assert_nothing_left(&env, None, &before);

    // A post script that hangs (with a child in the background) past its
    // step's timeout: killed, group and all; the plan fails; nothing is left.
    let _ = std::fs::remove_file(env.path("hooks.log"));
    let hanging = plan(
        &env,
        "hanging.toml",
        r#"[[step]]
name = "database"
groups = ["db"]
post = "./hook"

[[step]]
name = "application"
groups = ["app"]
post = "sleep 600 & echo $! > bg.pid; echo $$ > sh.pid; echo waiting; wait"
timeout = "2s"
"#,
    );
    let (code, r, stderr) = run_plan(&env, &["plan", "run", "--test", &hanging]);
    assert_eq!(code, 1, "{r:#}\n{stderr}");
    assert_eq!(r["failed_step"], "application");
    let post = &r["steps"][1]["post"];
    assert_eq!(post["timed_out"], true, "{r:#}");
    assert_eq!(post["ok"], false);
    assert!(post["output_tail"].as_str().unwrap().contains("waiting"));
    assert!(r["error"].as_str().unwrap().contains("timed out"), "{r:#}");
    assert_eq!(r["steps"][0]["outcome"], "ok");
    assert_eq!(r["cleanup"]["drills_removed"].as_array().unwrap().len(), 2);
    for f in ["bg.pid", "sh.pid"] {
        let pid: i32 = std::fs::read_to_string(env.path(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!alive(pid), "{f}: process {pid} survived the timeout");
    }
    assert!(daemon_gone(&env));
    assert_nothing_left(&env, None, &before);
}

/// Ctrl-C (SIGINT) during a --test plan's script: the script is killed, the
/// plan stops and still removes its drills.
#[test]
fn plan_test_cleans_up_when_interrupted() {
    let env = setup();
    let before = state(&env, None);
    let file = plan(
        &env,
        "slow.toml",
        r#"[[step]]
name = "database"
groups = ["db"]
post = "touch started.flag; sleep 600"

[[step]]
name = "application"
groups = ["app"]
"#,
    );
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("drclone"))
        .env("DRCLONE_STORE", &env.store)
        .args(["plan", "run", "--test", "--json", &file])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let flag = env.path("started.flag");
    for _ in 0..3000 {
        if flag.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(flag.exists(), "the post script never started");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stderr));
    });
    assert_eq!(out.status.code(), Some(1), "{r:#}");
    assert_eq!(r["failed_step"], "database");
    assert_eq!(r["steps"][0]["post"]["interrupted"], true, "{r:#}");
    assert_eq!(r["steps"][1]["outcome"], "not-run");
    assert_eq!(r["cleanup"]["drills_removed"].as_array().unwrap().len(), 1);
    assert!(daemon_gone(&env));
    assert_nothing_left(&env, None, &before);
}

/// Whether process `pid` runs (a zombie waiting for its reaper does not).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Whether no daemon answers on the store's control socket.
fn daemon_gone(env: &Env) -> bool {
    std::os::unix::net::UnixStream::connect(env.store.join("control.sock")).is_err()
}

/// A real run fails both groups over, in order: the production names serve
/// the points, status shows failed-over roles, the scripts see DRCLONE_TEST=0.
/// Running it again is refused before anything runs (the groups are not
/// protected).  Undo gives the names back.
#[test]
fn plan_run_fails_the_groups_over_in_order() {
    need("nbdinfo");
    need("nbdcopy");
    let env = setup();
    let srv = Server::start(&env);
    let file = plan(&env, "two-tier.toml", TWO_TIER);
    let (code, r, stderr) = run_plan(&env, &["plan", "run", &file]);
    assert_eq!(code, 0, "{r:#}\n{stderr}");
    assert_eq!(r["ok"], true);
    assert_eq!(r["test"], false);
    assert!(r["cleanup"].is_null());
    assert_eq!(
        r["steps"][0]["exports"][0],
        format!("nbd://127.0.0.1:{}/db/vol", srv.port)
    );
    assert_eq!(
        r["steps"][1]["exports"][0],
        format!("nbd://127.0.0.1:{}/app/vol", srv.port)
    );
    let calls: Vec<String> = hook_calls(&env)
        .into_iter()
        .map(|(s, p)| format!("{s}/{p}"))
        .collect();
    assert_eq!(
        calls,
        [
            "database/pre",
            "database/post",
            "application/pre",
            "application/post"
        ]
    );
    let log = std::fs::read_to_string(env.path("hooks.log")).unwrap();
    assert!(log.contains("test=0") && !log.contains("test=1"), "{log}");
    let [a, _, c, _] = data();
    assert!(std::fs::read(env.path("seen-database.bin")).unwrap() == a);
    assert!(std::fs::read(env.path("seen-application.bin")).unwrap() == c);
    for g in env.json(&["status"]).as_array().unwrap() {
        assert_eq!(g["role"], "failed-over", "{g}");
    }
    // A second run is refused by the check: nothing runs.
    let before_log = std::fs::read_to_string(env.path("hooks.log")).unwrap();
    let (code, r, _) = run_plan(&env, &["plan", "run", &file]);
    assert_eq!(code, 1);
    let msgs = r["problems"].to_string();
    assert!(
        msgs.contains("group `db` is failed-over, not protected"),
        "{msgs}"
    );
    assert!(
        msgs.contains("group `app` is failed-over, not protected"),
        "{msgs}"
    );
    assert_eq!(
        std::fs::read_to_string(env.path("hooks.log")).unwrap(),
        before_log
    );
    for g in ["db", "app"] {
        env.ok(&["failover", g, "--undo"]);
    }
    for g in env.json(&["status"]).as_array().unwrap() {
        assert_eq!(g["role"], "protected", "{g}");
    }
    let st = state(&env, Some(&srv));
    assert_eq!(st["heads_unchanged"], serde_json::json!([true, true]));
}

/// `plan check` of a broken plan reports every problem at once, each with its
/// line, and exits 1, with or without a daemon; `plan run` of it does nothing.
#[test]
fn plan_check_reports_each_problem_by_line() {
    let env = setup();
    std::fs::write(env.path("not-executable"), "#!/bin/sh\n").unwrap();
    let file = plan(
        &env,
        "broken.toml",
        r#"name = "broken"
owner = "ops"

[[step]]
name = "database"
groups = ["db", "nosuch"]
pre = "./missing-script --now"
post = "./not-executable"
timeout = "ten minutes"

[[step]]
name = "database"
groups = ["app"]
point = 42
wait = "5x"

[[step]]
name = "web"
groups = ["app"]
point = "newest"
"#,
    );
    let want: &[(usize, &str)] = &[
        (2, "unknown key `owner`"),
        (6, "no group `nosuch` in the store"),
        (7, "./missing-script does not exist"),
        (8, "./not-executable is not executable"),
        (9, "duration \"ten minutes\""),
        (12, "duplicate step name `database` (first at line 5)"),
        (14, "group `app` has no point 42"),
        (15, "`wait`: duration \"5x\""),
        (19, "group `app` is already brought up by step `database`"),
        (
            20,
            "`point` \"newest\" is not latest, latest-app or a point id",
        ),
    ];
    let check = |env: &Env| {
        let out = env
            .cmd()
            .args(["plan", "check", &file, "--json"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["ok"], false);
        let got: Vec<(usize, String)> = v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                assert_eq!(p["file"], file.as_str());
                (
                    p["line"].as_u64().unwrap() as usize,
                    p["message"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{got:#?}");
        for ((line, msg), (wl, wm)) in got.iter().zip(want) {
            assert_eq!(line, wl, "{msg}");
            assert!(msg.contains(wm), "line {line}: {msg:?} lacks {wm:?}");
        }
        // The text form: FILE:LINE: message.
        let text = env.cmd().args(["plan", "check", &file]).output().unwrap();
        assert_eq!(text.status.code(), Some(1));
        let text = String::from_utf8(text.stdout).unwrap();
        for (wl, _) in want {
            assert!(text.contains(&format!("{file}:{wl}: ")), "{text}");
        }
        assert!(
            text.contains(&format!("{} problem(s)", want.len())),
            "{text}"
        );
    };
    check(&env);
    let srv = Server::start(&env);
    check(&env);
    // A broken plan does not run at all.
    let (code, r, _) = run_plan(&env, &["plan", "run", "--test", &file]);
    assert_eq!(code, 1);
    assert_eq!(r["problems"].as_array().unwrap().len(), want.len());
    assert_eq!(env.json(&["drill", "list"]), serde_json::json!([]));
    drop(srv);
    // A syntax error names its line too.
    let bad = plan(
        &env,
        "syntax.toml",
        "name = \"x\"\n\n[[step]\nname = \"a\"\n",
    );
    let err = env.cmd().args(["plan", "check", &bad]).output().unwrap();
    assert_eq!(err.status.code(), Some(1));
    let text = String::from_utf8(err.stdout).unwrap();
    assert!(text.contains(&format!("{bad}:3: TOML syntax")), "{text}");
}
