//! Watching over the socket: new files reach the model's view without resending it, ignored
//! trees cost no watches, watched repositories survive restarts, and a broken cache is rebuilt
//! while the daemon keeps serving.

use serde_json::Value;
use spark_proto::methods::{Ask, AskParams, Status, Subscribe, Watch, WatchParams};
use spark_tests::fake_provider::{Script, Turn};
use spark_tests::{Ctl, Provider, TestRepo, stderr, stdout};

fn watch(c: &mut sparkctl::Client, repo: &TestRepo) -> spark_proto::methods::RepoStatus {
    c.call::<Watch>(&WatchParams { dir: repo.cwd() })
        .expect("watch")
        .repo
}

#[test]
fn a_file_in_a_fresh_nested_directory_reaches_the_next_request_as_news() {
    let p = Provider::start(Script::new().default_turn(Turn::text("ok")));
    let d = p.daemon(true);
    let repo = TestRepo::with_files(&[("src/lib.rs", b"pub fn a() {}\n")]);
    let mut c = d.client();
    let r = watch(&mut c, &repo);
    assert!(r.watched && r.indexed && r.files >= 1, "{r:?}");
    // Watching prewarms the repository's session before any ask.
    let reqs = p.wait_for_requests(1);
    assert!(reqs[0].is_prewarm(), "{:?}", reqs[0].json);
    assert!(
        reqs[0].raw.contains("src/") && reqs[0].raw.contains("lib.rs"),
        "the outline was sent: {}",
        reqs[0].raw
    );

    let mut sub = d.client();
    sub.call::<Subscribe>(&Default::default())
        .expect("subscribe");
    std::fs::create_dir_all(repo.path().join("a/b/c")).expect("mkdir -p");
    std::fs::write(
        repo.path().join("a/b/c/fresh_module.rs"),
        b"pub fn fresh() {}\n",
    )
    .expect("write");
    loop {
        let n = sub.next_notification().expect("event");
        let p = n.params.expect("params");
        if p["type"] == "files_changed"
            && p["paths"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "a/b/c/fresh_module.rs"))
        {
            break;
        }
    }
    c.call::<Ask>(&AskParams {
        cwd: repo.cwd(),
        prompt: "what is new?".into(),
        focus: vec![],
        dry_run: false,
        new_conversation: false,
        provider: None,
        buffers: Vec::new(),
    })
    .expect("ask");
    let reqs = p.fake.requests();
    let turn = reqs.iter().rev().find(|r| !r.is_prewarm()).expect("turn");
    assert!(
        turn.raw
            .contains("New files since the outline: a/b/c/fresh_module.rs"),
        "{}",
        turn.raw
    );
    assert!(
        turn.previous_response_id().is_some(),
        "chained on the prewarm: the outline was not resent"
    );
    assert!(
        !turn.raw.contains("pub fn a()"),
        "unfocused file contents are not sent"
    );
}

#[test]
fn ignored_trees_cost_no_watches_and_status_reports_the_repository() {
    let repo = TestRepo::with_files(&[
        ("src/lib.rs", b"pub fn a() {}\n"),
        (".gitignore", b"node_modules/\n"),
    ]);
    for i in 0..150 {
        repo.write(
            &format!("node_modules/pkg{i}/lib/index.js"),
            b"module.exports = 1;\n",
        );
    }
    let d = spark_tests::InProcess::start();
    let mut c = d.client();
    let r = watch(&mut c, &repo);
    assert!(
        r.watches <= 6,
        "ignored directories must not be watched: {} watches",
        r.watches
    );
    let status = c.call::<Status>(&Default::default()).expect("status");
    let mine = status
        .repos
        .iter()
        .find(|x| x.watched)
        .expect("watched repo listed");
    assert_eq!(
        mine.path,
        repo.path()
            .canonicalize()
            .expect("canon")
            .display()
            .to_string()
    );
    assert!(
        mine.files >= 2 && mine.files < 10,
        "node_modules is not indexed: {} files",
        mine.files
    );
    assert!(
        status
            .cache
            .as_ref()
            .is_some_and(|c| c.unavailable.is_none()),
        "{:?}",
        status.cache
    );
}

#[test]
fn watched_repositories_survive_a_restart_and_a_broken_cache_is_rebuilt() {
    let repo = TestRepo::with_files(&[("src/lib.rs", b"pub fn a() {}\n")]);
    let ctl = Ctl::new();
    let run = |args: &[&str]| {
        ctl.command("sparkctl")
            .current_dir(repo.path())
            .args(args)
            .output()
            .expect("run")
    };
    let out = run(&["watch"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("watching "), "{}", stdout(&out));
    assert!(run(&["stop"]).status.success());

    // Garbage over every file of the cache, as after a crash mid-write or a foreign version.
    let cache = ctl.home.layout().cache_dir;
    let mut stack = vec![cache.clone()];
    let mut clobbered = 0;
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("cache dir").flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                std::fs::write(e.path(), b"\x00garbage\xffnot sled").expect("clobber");
                clobbered += 1;
            }
        }
    }
    assert!(clobbered > 0, "the cache had files");

    let out = run(&["--json", "status"]);
    assert!(
        out.status.success(),
        "the daemon serves despite the broken cache: {}",
        stderr(&out)
    );
    let status: Value = serde_json::from_str(&stdout(&out)).expect("json");
    let repos = status["repos"].as_array().expect("repos");
    let canon = repo
        .path()
        .canonicalize()
        .expect("canon")
        .display()
        .to_string();
    assert!(
        repos
            .iter()
            .any(|r| r["path"] == canon.as_str() && r["watched"] == true),
        "still watched after restart: {status}"
    );

    // And with the cache directory gone entirely.
    assert!(run(&["stop"]).status.success());
    std::fs::remove_dir_all(&cache).expect("rm cache");
    let out = run(&["--json", "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["unwatch"]);
    assert!(
        stdout(&out).starts_with("stopped watching"),
        "{}",
        stdout(&out)
    );
    assert!(run(&["stop"]).status.success());
}

#[test]
fn without_focus_the_files_the_prompt_points_at_are_sent_and_edited() {
    const STATS: &str = "def mean(xs):\n    return sum(xs) / len(xs)\n\n\ndef median(xs):\n    return sorted(xs)[len(xs) // 2]\n";
    const OTHER: &str = "def mode(xs):\n    return max(set(xs), key=xs.count)\n";
    let patch = "*** Begin Patch\n*** Update File: stats.py\n@@ def mean(xs):\n-    return sum(xs) / len(xs)\n+    return sum(xs) / len(xs) if xs else 0.0\n*** End Patch\n";
    let p = Provider::start(Script::new().turns([Turn::apply_patch(patch)]));
    let d = p.daemon(true);
    let repo = TestRepo::with_files(&[
        ("stats.py", STATS.as_bytes()),
        ("other.py", OTHER.as_bytes()),
        (".env", b"SECRET=hunter2\n"),
    ]);
    let mut c = d.client();
    let r = watch(&mut c, &repo);
    assert!(r.indexed, "{r:?}");
    let result = c
        .call::<Ask>(&AskParams {
            cwd: repo.cwd(),
            prompt: "make mean() return 0.0 for an empty list, see .env".into(),
            focus: vec![],
            dry_run: false,
            new_conversation: false,
            provider: None,
            buffers: Vec::new(),
        })
        .expect("ask");
    assert!(result.edit.is_some(), "{result:?}");
    let reqs = p.fake.requests();
    let turn = reqs.iter().rev().find(|r| !r.is_prewarm()).expect("turn");
    let input: Value = turn.json["input"].clone();
    let text = input.to_string();
    assert!(
        text.contains(&serde_json::to_string(STATS).expect("json")[1..40]),
        "stats.py, which defines mean(), went with the prompt: {text}"
    );
    assert!(!text.contains("def mode"), "an unrelated file stays home");
    assert!(!text.contains("hunter2"), "a named secret never leaves");
    assert_eq!(
        repo.read("stats.py"),
        STATS
            .replace("len(xs)\n\n", "len(xs) if xs else 0.0\n\n")
            .as_bytes()
    );
}
