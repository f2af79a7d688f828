//! `spark!` triggers and git hooks: the daemon's time from a trigger's file settling (the
//! watcher's `files_changed` event, as a subscriber receives it) to the trigger's
//! `response.create` arriving at the fake provider; and the time the installed hooks add to
//! `git checkout` and `git commit -m` with the daemon up, down, and `sparkctl` missing from PATH.
//!
//! Run: `cargo bench -p spark-tests --bench triggers` (optionally `-- <iterations>`).
//! Writes `bench/out/triggers.json`.

use std::path::Path;
use std::time::Instant;

use serde_json::Value;
use spark_proto::methods::{Subscribe, TriggersParams, TriggersSet, Watch, WatchParams};
use spark_tests::fake_provider::{Script, Turn};
use spark_tests::{Ctl, Provider, TestRepo, bin, hermetic_git};

fn stats(name: &str, unit: &str, mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<58} n={:<4} p50={:>8.3}{unit} p90={:>8.3}{unit} p99={:>8.3}{unit} min={:>8.3}{unit} max={:>8.3}{unit}",
        v.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        v[0],
        v[v.len() - 1]
    );
    serde_json::json!({"case": name, "unit": unit, "n": v.len(), "p50": p(0.5), "p90": p(0.9), "p99": p(0.99), "min": v[0], "max": v[v.len() - 1]})
}

/// Settle → `response.create`: each round saves a new instruction (the model answers with text
/// only, so the file is the user's alone and every comment is a new place).
fn settle_to_request(n: usize, out: &mut Vec<Value>) {
    let p = Provider::start(Script::new().default_turn(Turn::text("ok")));
    let d = p.daemon(true);
    let repo = TestRepo::with_files(&[("src/job.py", b"def run():\n    return 1\n")]);
    let mut c = d.client();
    c.call::<Watch>(&WatchParams { dir: repo.cwd() })
        .expect("watch");
    c.call::<TriggersSet>(&TriggersParams {
        dir: repo.cwd(),
        enabled: true,
    })
    .expect("triggers/set");
    let mut sub = d.client();
    sub.call::<Subscribe>(&Default::default())
        .expect("subscribe");
    let mut ms = Vec::new();
    // Round 0 warms the session's first turn; it is not counted.
    for i in 0..=n {
        let text = format!("def run():\n    # return {i} instead spark!\n    return 1\n");
        repo.write("src/job.py", text.as_bytes());
        let mut settled = None;
        loop {
            let e = sub
                .next_notification()
                .expect("event")
                .params
                .expect("params");
            if e["type"] == "files_changed" && settled.is_none() {
                settled = Some(Instant::now());
            }
            if e["type"] == "trigger_finished" {
                break;
            }
        }
        let settled = settled.expect("files_changed before trigger_finished");
        let turn = p
            .fake
            .requests()
            .into_iter()
            .rfind(|r| !r.is_prewarm())
            .expect("the trigger's turn");
        assert!(turn.raw.contains(&format!("return {i} instead")));
        if i > 0 {
            let sent = turn.received_at.into_std();
            ms.push(sent.saturating_duration_since(settled).as_secs_f64() * 1e3);
        }
    }
    out.push(stats(
        "trigger: files_changed received -> response.create in",
        "ms",
        ms,
    ));
}

/// Milliseconds per run of `git args` in `repo`, with `path` as PATH and `home` as SPARK_HOME.
fn time_git(repo: &Path, home: &Path, path: &str, args: &[&[&str]], n: usize) -> Vec<f64> {
    let mut v = Vec::new();
    for i in 0..n {
        let step = args[i % args.len()];
        let t = Instant::now();
        let o = hermetic_git(repo)
            .env("SPARK_HOME", home)
            .env("HOME", home)
            .env("PATH", path)
            .env_remove("SPARK_SOCKET")
            .args(step)
            .output()
            .expect("git");
        v.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(
            o.status.success(),
            "git {step:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    v
}

/// The hooks' added time: the same git commands without hooks, then with them installed and
/// the daemon running, stopped, and `sparkctl` not on PATH.
fn hook_overhead(n: usize, out: &mut Vec<Value>) {
    let ctl = Ctl::new();
    let home = ctl.home.path().to_owned();
    let repo = TestRepo::with_files(&[("a.txt", b"a\n")]);
    repo.git(&["branch", "other"]);
    let bin_dir = tempfile::tempdir().expect("bin dir");
    std::os::unix::fs::symlink(bin("sparkctl"), bin_dir.path().join("sparkctl"))
        .expect("link sparkctl");
    let with = format!("{}:/usr/local/bin:/usr/bin:/bin", bin_dir.path().display());
    let without = "/usr/local/bin:/usr/bin:/bin".to_owned();
    let checkout: &[&[&str]] = &[&["checkout", "-q", "other"], &["checkout", "-q", "-"]];
    let commit: &[&[&str]] = &[&["commit", "-q", "--allow-empty", "-m", "bench"]];
    let mut case = |label: &str, path: &str| {
        let co = time_git(repo.path(), &home, path, checkout, n);
        out.push(stats(&format!("git checkout, {label}"), "ms", co));
        let cm = time_git(repo.path(), &home, path, commit, n);
        out.push(stats(&format!("git commit -m, {label}"), "ms", cm));
    };
    case("no hooks", &with);
    let run = |args: &[&str]| {
        let o = ctl
            .command("sparkctl")
            .current_dir(repo.path())
            .args(args)
            .output()
            .expect("sparkctl");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["hooks", "install"]);
    run(&["watch"]);
    case("hooks, daemon up (watched)", &with);
    run(&["stop"]);
    case("hooks, daemon down", &with);
    case("hooks, sparkctl missing", &without);
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30);
    let mut results = Vec::new();
    settle_to_request(n, &mut results);
    hook_overhead(n, &mut results);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/out");
    std::fs::create_dir_all(&dir).expect("mkdir bench/out");
    std::fs::write(
        dir.join("triggers.json"),
        serde_json::to_string_pretty(&results).expect("json"),
    )
    .expect("write");
}
