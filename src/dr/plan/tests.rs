use std::path::Path;

use super::parse::resolve_command;
use super::script::tail;
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
