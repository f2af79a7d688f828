//! `spark!` comment triggers end to end: a real daemon, the fake provider and real files saved
//! into a watched repository. Every wait is on an event (`files_changed`, `trigger_started`,
//! `trigger_finished`); "nothing happened" is proven by a later trigger that did run, since one
//! listener sees saves in order and one runner per repository runs them in order.

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use spark_proto::methods::{Subscribe, TriggersParams, TriggersSet, Watch, WatchParams};
use spark_tests::fake_provider::{Script, Turn};
use spark_tests::{Home, InProcess, Provider, TestRepo, bin, hermetic, stderr, stdout};
use sparkctl::Client;

const CALC: &str = "def first(xs):\n    # handle the empty list spark!\n    return xs[0]\n\n\ndef other():\n    return 2\n";
const CALC_DONE: &str =
    "def first(xs):\n    return xs[0] if xs else None\n\n\ndef other():\n    return 2\n";
/// What a model writes: the change only; spark removes the comment line itself.
const CALC_PATCH: &str = "*** Begin Patch\n*** Update File: src/calc.py\n@@ def first(xs):\n     # handle the empty list spark!\n-    return xs[0]\n+    return xs[0] if xs else None\n*** End Patch\n";

/// `sparkctl args…` in `dir` against the daemon of `home`.
fn sparkctl(dir: &Path, home: &Path, args: &[&str]) -> Output {
    let out = hermetic(&mut std::process::Command::new(bin("sparkctl")))
        .current_dir(dir)
        .env("SPARK_HOME", home)
        .env_remove("SPARK_SOCKET")
        .args(args)
        .output()
        .expect("run sparkctl");
    assert!(out.status.success(), "sparkctl {args:?}: {}", stderr(&out));
    out
}

fn subscribe(home: &Home) -> Client {
    let mut sub = home.client();
    sub.call::<Subscribe>(&Default::default())
        .expect("subscribe");
    sub
}

/// Events until one matches `done`; returns all of them, that one last.
fn events_until(sub: &mut Client, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let n = sub.next_notification().expect("event");
        let p = n.params.expect("params");
        let stop = done(&p);
        seen.push(p);
        if stop {
            return seen;
        }
    }
}

fn finished(path: &str) -> impl Fn(&Value) -> bool + '_ {
    move |e| e["type"] == "trigger_finished" && e["path"] == path
}

fn changed(path: &str) -> impl Fn(&Value) -> bool + '_ {
    move |e| {
        e["type"] == "files_changed"
            && e["paths"]
                .as_array()
                .is_some_and(|a| a.iter().any(|p| p == path))
    }
}

fn started_for<'a>(events: &'a [Value], path: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["type"] == "trigger_started" && e["path"] == path)
        .collect()
}

fn turns(p: &Provider) -> Vec<String> {
    p.fake
        .requests()
        .into_iter()
        .filter(|r| !r.is_prewarm())
        .map(|r| r.raw)
        .collect()
}

fn log_json(repo: &TestRepo, home: &Path) -> Value {
    serde_json::from_str(&stdout(&sparkctl(repo.path(), home, &["--json", "log"])))
        .expect("log json")
}

#[test]
fn a_saved_spark_comment_becomes_one_edit_without_it_and_undo_brings_it_back() {
    // The model's patch also writes a new `spark!` comment: the daemon's own write never runs.
    let patch = CALC_PATCH.replace(
        "+    return xs[0] if xs else None\n",
        "+    return xs[0] if xs else None\n+    # and log it spark!\n",
    );
    let p = Provider::start(Script::new().turns([Turn::apply_patch(patch)]));
    let d = p.daemon(true);
    let repo = TestRepo::with_files(&[("src/calc.py", b"x = 1\n")]);
    let out = sparkctl(repo.path(), d.home.path(), &["watch", "--triggers"]);
    assert!(
        stdout(&out).contains("spark! triggers on"),
        "{}",
        stdout(&out)
    );
    let mut sub = subscribe(&d.home);

    repo.write("src/calc.py", CALC.as_bytes());
    let events = events_until(&mut sub, finished("src/calc.py"));
    let start = started_for(&events, "src/calc.py");
    assert_eq!(start.len(), 1, "{events:?}");
    assert_eq!(start[0]["instruction"], "handle the empty list");
    assert_eq!(start[0]["line"], 2);
    let end = events.last().expect("finished");
    assert!(end["error"].is_null(), "{end}");
    let edit = end["edit"].as_str().expect("edit id").to_owned();
    assert_eq!(end["trigger"], start[0]["trigger"]);
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "edit_applied" && e["edit"] == edit.as_str()),
        "editors hear of the edit as of any other: {events:?}"
    );

    // One edit: the change and the comment line gone together.
    let done = CALC_DONE.replace("else None\n", "else None\n    # and log it spark!\n");
    assert_eq!(
        String::from_utf8(repo.read("src/calc.py")).expect("utf8"),
        done
    );
    let sent = turns(&p);
    assert_eq!(sent.len(), 1, "one model call");
    assert!(sent[0].contains("handle the empty list"), "{}", sent[0]);
    assert!(
        sent[0].contains("lines 1-3 of src/calc.py"),
        "the enclosing function is the focus: {}",
        sent[0]
    );

    let log = log_json(&repo, d.home.path());
    let latest = &log["edits"][0];
    assert_eq!(latest["source"], "trigger", "{log}");
    assert_eq!(latest["message"], "handle the empty list");
    assert_eq!(latest["state"], "applied");
    assert_eq!(latest["id"], edit.as_str());
    let human = stdout(&sparkctl(repo.path(), d.home.path(), &["log"]));
    assert!(human.contains("spark! handle the empty list"), "{human}");
    // The record is an ordinary edit: `show` gives the comment's removal with the change.
    let show: Value = serde_json::from_str(&stdout(&sparkctl(
        repo.path(),
        d.home.path(),
        &["--json", "show"],
    )))
    .expect("show json");
    let diff = show["diff"].as_str().expect("diff");
    assert!(
        diff.contains("-    # handle the empty list spark!\n"),
        "{diff}"
    );
    assert!(
        diff.contains("+    return xs[0] if xs else None\n"),
        "{diff}"
    );

    // The new comment the model wrote did not run; a later save of another file did.
    repo.write("src/other.py", b"# say hi spark!\n");
    p.fake.push_turn(Turn::text("Not now."));
    let events = events_until(&mut sub, finished("src/other.py"));
    assert!(started_for(&events, "src/calc.py").is_empty(), "{events:?}");
    assert_eq!(turns(&p).len(), 2);

    // Undo reverts the edit and brings the comment back, without running it again.
    sparkctl(repo.path(), d.home.path(), &["undo", &edit]);
    assert_eq!(
        String::from_utf8(repo.read("src/calc.py")).expect("utf8"),
        CALC
    );
    repo.write("src/other.py", b"# say hi spark!\n# again spark!\n");
    p.fake.push_turn(Turn::text("Not now either."));
    let events = events_until(&mut sub, finished("src/other.py"));
    assert!(started_for(&events, "src/calc.py").is_empty(), "{events:?}");
    assert_eq!(
        started_for(&events, "src/other.py").len(),
        1,
        "only the new comment ran"
    );
    assert_eq!(
        String::from_utf8(repo.read("src/calc.py")).expect("utf8"),
        CALC
    );
}

#[test]
fn with_triggers_off_a_saved_comment_does_nothing() {
    let p = Provider::start(Script::new().default_turn(Turn::apply_patch(CALC_PATCH)));
    let d = p.daemon(true);
    let off = TestRepo::with_files(&[("src/calc.py", b"x = 1\n")]);
    let on = TestRepo::with_files(&[("src/calc.py", b"x = 1\n")]);
    sparkctl(off.path(), d.home.path(), &["watch"]);
    sparkctl(on.path(), d.home.path(), &["watch", "--triggers"]);
    let mut sub = subscribe(&d.home);

    off.write("src/calc.py", CALC.as_bytes());
    let off_label = off
        .path()
        .canonicalize()
        .expect("canonical")
        .display()
        .to_string();
    events_until(&mut sub, |e| {
        changed("src/calc.py")(e) && e["repo"] == off_label.as_str()
    });
    // Saved later in a repository with triggers on: once it ran, the first save was passed over.
    on.write("src/calc.py", CALC.as_bytes());
    let events = events_until(&mut sub, finished("src/calc.py"));
    let started: Vec<&Value> = started_for(&events, "src/calc.py");
    assert_eq!(started.len(), 1, "{events:?}");
    assert_ne!(started[0]["repo"], off_label.as_str());
    assert_eq!(off.read("src/calc.py"), CALC.as_bytes());
    assert_eq!(on.read("src/calc.py"), CALC_DONE.as_bytes());
    assert_eq!(turns(&p).len(), 1);
}

#[test]
fn ignored_files_and_markers_in_strings_never_run() {
    let p = Provider::start(Script::new().turns([Turn::apply_patch(
        "*** Begin Patch\n*** Update File: src/ok.py\n@@\n-x = 1\n+x = 2\n*** End Patch\n",
    )]));
    let d = p.daemon(true);
    let repo = TestRepo::with_files(&[(".gitignore", b"build/\n"), ("src/ok.py", b"x = 1\n")]);
    sparkctl(repo.path(), d.home.path(), &["watch", "--triggers"]);
    let mut sub = subscribe(&d.home);

    std::fs::create_dir_all(repo.path().join("build")).expect("mkdir");
    let ignored = b"# generated; rewrite it spark!\n";
    repo.write("build/gen.py", ignored);
    let ok = concat!(
        "s = \"# not me spark!\"\n",
        "doc = '''\n",
        "# nor me spark!\n",
        "'''\n",
        "x = 1  # trailing, not me spark!\n",
        "# make x two spark!\n",
        "x = 1\n",
    );
    repo.write("src/ok.py", ok.as_bytes());
    let events = events_until(&mut sub, finished("src/ok.py"));
    assert!(
        started_for(&events, "build/gen.py").is_empty(),
        "{events:?}"
    );
    let started = started_for(&events, "src/ok.py");
    assert_eq!(started.len(), 1, "only the real comment: {events:?}");
    assert_eq!(started[0]["instruction"], "make x two");
    assert_eq!(
        repo.read("build/gen.py"),
        ignored,
        "an ignored file is never touched"
    );
    let expected = ok
        .replace("# make x two spark!\n", "")
        .replace("\nx = 1\n", "\nx = 2\n");
    assert_eq!(
        String::from_utf8(repo.read("src/ok.py")).expect("utf8"),
        expected
    );
    let sent = turns(&p);
    assert_eq!(sent.len(), 1);
    assert!(
        !sent[0].contains("rewrite it"),
        "the ignored file is not sent"
    );
}

#[test]
fn a_failing_instruction_leaves_the_comment_reports_why_and_does_not_run_again() {
    let p = Provider::start(
        Script::new().turns([Turn::text("I cannot tell what empty should return.")]),
    );
    let d = p.daemon(true);
    let repo = TestRepo::with_files(&[("src/calc.py", b"x = 1\n")]);
    sparkctl(repo.path(), d.home.path(), &["watch", "--triggers"]);
    let mut sub = subscribe(&d.home);

    repo.write("src/calc.py", CALC.as_bytes());
    let events = events_until(&mut sub, finished("src/calc.py"));
    let end = events.last().expect("finished");
    assert!(end["edit"].is_null(), "{end}");
    let error = end["error"].as_str().expect("a reason");
    assert!(error.contains("changed nothing"), "{error}");
    assert!(error.contains("I cannot tell"), "{error}");
    assert_eq!(
        repo.read("src/calc.py"),
        CALC.as_bytes(),
        "the comment stays"
    );

    let log = log_json(&repo, d.home.path());
    let failed = &log["edits"][0];
    assert_eq!(failed["state"], "failed", "{log}");
    assert_eq!(failed["source"], "trigger");
    assert_eq!(failed["message"], "handle the empty list");
    assert_eq!(failed["files"][0], "src/calc.py");
    assert!(
        failed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("changed nothing"))
    );
    assert_eq!(failed["id"], end["trigger"]);
    let human = stdout(&sparkctl(repo.path(), d.home.path(), &["log"]));
    assert!(
        human.contains("failed") && human.contains("spark! handle the empty list"),
        "{human}"
    );
    assert!(human.contains("changed nothing"), "{human}");

    // Saved again with other changes: the same instruction at the same place does not rerun.
    repo.write("src/calc.py", format!("import os\n{CALC}").as_bytes());
    events_until(&mut sub, changed("src/calc.py"));
    repo.write("src/next.py", b"# next spark!\n");
    p.fake.push_turn(Turn::text("No."));
    let events = events_until(&mut sub, finished("src/next.py"));
    assert!(started_for(&events, "src/calc.py").is_empty(), "{events:?}");
    assert_eq!(turns(&p).len(), 2);
}

#[test]
fn triggers_turned_on_with_watch_survive_a_daemon_restart() {
    let p = Provider::start(Script::new().turns([Turn::apply_patch(CALC_PATCH)]));
    let home = Home::new();
    let mut config = home.config();
    config.provider_url = p.fake.ws_url();
    config.api_key = Some("sk-test-not-a-real-key".into());
    config.fsync = false;
    let repo = TestRepo::with_files(&[("src/calc.py", b"x = 1\n")]);

    // The daemon gets a throwaway home of its own: the configuration points at `home`, which
    // must outlive the first daemon.
    let first = InProcess::start_with(Home::new(), config.clone());
    let set = home
        .client()
        .call::<TriggersSet>(&TriggersParams {
            dir: repo.cwd(),
            enabled: true,
        })
        .expect("triggers/set");
    assert!(set.enabled);
    first.stop();

    let _second = InProcess::start_with(Home::new(), config);
    let mut c = home.client();
    // Wait until the restored watch has its first index, so the save is a change it sees.
    let w = c
        .call::<Watch>(&WatchParams { dir: repo.cwd() })
        .expect("watch");
    assert!(w.repo.indexed);
    let mut sub = subscribe(&home);
    repo.write("src/calc.py", CALC.as_bytes());
    let events = events_until(&mut sub, finished("src/calc.py"));
    assert!(
        events.last().expect("finished")["edit"].is_string(),
        "{events:?}"
    );
    assert_eq!(repo.read("src/calc.py"), CALC_DONE.as_bytes());
}
