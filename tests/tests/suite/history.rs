//! Local history: every writer's settled changes are snapshotted under `refs/spark/history`,
//! listed, diffed and restored as recorded edits; secrets and ignored files never enter it;
//! retention prunes whole segments and `git fsck --strict` stays clean; `git push` never sends
//! it. Checked with the real git CLI against a real daemon.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use spark_proto::methods::{
    ApplyParams, EditApply, EditParams, EditUndo, HistoryDiff, HistoryDiffParams, HistoryList,
    HistoryListParams, HistoryRestore, HistoryRestoreParams, HistoryVersion, Watch, WatchParams,
};
use spark_tests::{Ctl, Home, InProcess, TestRepo, hermetic_git, stderr, stdout};
use sparkctl::Client;

/// Snapshots follow a write by the watcher's debounce plus one actor job: wait for the
/// condition the test needs, with a generous bound for a loaded machine.
const SETTLE_LIMIT: Duration = Duration::from_secs(20);

fn watch(c: &mut Client, repo: &TestRepo) {
    let r = c
        .call::<Watch>(&WatchParams { dir: repo.cwd() })
        .expect("watch")
        .repo;
    assert!(r.watched && r.indexed, "{r:?}");
}

fn versions(c: &mut Client, repo: &TestRepo, path: Option<&str>) -> Vec<HistoryVersion> {
    c.call::<HistoryList>(&HistoryListParams {
        cwd: repo.cwd(),
        path: path.map(str::to_owned),
        since: None,
        limit: None,
    })
    .expect("history/list")
    .versions
}

/// Wait until `path`'s newest version in history has exactly `bytes` (as `git cat-file`
/// reads it from the snapshot): the watcher saw the write and history kept it.
fn wait_for_version(c: &mut Client, repo: &TestRepo, path: &str, bytes: &[u8]) -> HistoryVersion {
    let started = Instant::now();
    loop {
        if let Some(v) = versions(c, repo, Some(path)).into_iter().next() {
            let out = repo.git_output(&["cat-file", "blob", &format!("{}:{path}", v.id)]);
            if out.status.success() && out.stdout == bytes {
                return v;
            }
        }
        assert!(
            started.elapsed() < SETTLE_LIMIT,
            "history never kept {path} = {:?}; it has {:?}",
            String::from_utf8_lossy(bytes),
            versions(c, repo, Some(path))
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn restore(c: &mut Client, repo: &TestRepo, path: &str, at: &str) -> Option<String> {
    c.call::<HistoryRestore>(&HistoryRestoreParams {
        cwd: repo.cwd(),
        path: path.into(),
        at: at.into(),
        dry_run: false,
    })
    .expect("history/restore")
    .edit
}

fn kind(e: &sparkctl::ClientError) -> Option<String> {
    match e {
        sparkctl::ClientError::Rpc(r) => r.kind().map(str::to_owned),
        other => panic!("not a refusal: {other}"),
    }
}

fn mode(repo: &TestRepo, rel: &str) -> u32 {
    std::fs::metadata(repo.path().join(rel))
        .expect("stat")
        .permissions()
        .mode()
        & 0o777
}

fn chmod(repo: &TestRepo, rel: &str, mode: u32) {
    std::fs::set_permissions(repo.path().join(rel), std::fs::Permissions::from_mode(mode))
        .expect("chmod");
}

fn fsck_clean(repo: &TestRepo) {
    let out = repo.git_output(&["fsck", "--strict", "--no-dangling"]);
    assert!(
        out.status.success() && stderr(&out).trim().is_empty(),
        "git fsck --strict: {}{}",
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn every_writer_s_versions_are_listed_and_each_restores_exactly() {
    let d = InProcess::start();
    let repo = TestRepo::with_files(&[("f.sh", b"echo v0\n")]);
    let head = repo.git(&["rev-parse", "HEAD"]);
    let staged = repo.git(&["ls-files", "--stage"]);
    let mut c = d.client();
    watch(&mut c, &repo);

    // v1 by "an editor", executable; v2 by "an agent", not; then git puts v0 back.
    // The mode first: a chmod alone changes no content and makes no version.
    chmod(&repo, "f.sh", 0o755);
    repo.write("f.sh", b"echo v1\r\nline two\n");
    let v1 = wait_for_version(&mut c, &repo, "f.sh", b"echo v1\r\nline two\n");
    chmod(&repo, "f.sh", 0o644);
    repo.write("f.sh", b"echo v2\n");
    let v2 = wait_for_version(&mut c, &repo, "f.sh", b"echo v2\n");
    repo.git(&["checkout", "--", "f.sh"]);
    let v0 = wait_for_version(&mut c, &repo, "f.sh", b"echo v0\n");

    let listed: Vec<String> = versions(&mut c, &repo, Some("f.sh"))
        .into_iter()
        .map(|v| v.id)
        .collect();
    let pos = |id: &str| listed.iter().position(|x| x == id).expect("listed");
    assert!(
        pos(&v0.id) < pos(&v2.id) && pos(&v2.id) < pos(&v1.id),
        "newest first: {listed:?}"
    );
    assert_eq!(v2.files[0].size, Some(8));
    assert_eq!(v2.files[0].change, "modified");
    assert_eq!((v2.files[0].added, v2.files[0].removed), (1, 2));

    // Each version comes back byte for byte, with its mode.
    let e1 = restore(&mut c, &repo, "f.sh", &v1.id).expect("an edit");
    assert_eq!(repo.read("f.sh"), b"echo v1\r\nline two\n");
    assert_eq!(mode(&repo, "f.sh"), 0o755);
    restore(&mut c, &repo, "f.sh", &v2.id[..6]).expect("a 6-digit prefix is enough");
    assert_eq!(repo.read("f.sh"), b"echo v2\n");
    assert_eq!(mode(&repo, "f.sh"), 0o644);

    // Undo of the last restore brings v1 back (the restore was a recorded edit), then the
    // first undo's target is the v1 restore itself.
    c.call::<EditUndo>(&EditParams {
        cwd: repo.cwd(),
        id: None,
    })
    .expect("undo the restore");
    assert_eq!(repo.read("f.sh"), b"echo v1\r\nline two\n");
    assert_eq!(mode(&repo, "f.sh"), 0o755);
    c.call::<EditUndo>(&EditParams {
        cwd: repo.cwd(),
        id: Some(e1),
    })
    .expect("undo the first restore");
    assert_eq!(repo.read("f.sh"), b"echo v0\n");

    // HEAD, the branch and the index were never touched; the snapshots are sound objects.
    assert_eq!(repo.git(&["rev-parse", "HEAD"]), head);
    assert_eq!(repo.git(&["ls-files", "--stage"]), staged);
    assert!(repo.git(&["branch", "--list"]).trim() == "* main");
    assert_eq!(
        repo.git(&["rev-parse", "refs/spark/history^{tree}"]).len(),
        41
    );
    fsck_clean(&repo);
}

#[test]
fn a_deleted_file_comes_back_and_undo_deletes_it_again() {
    let d = InProcess::start();
    let repo = TestRepo::with_files(&[("keep.txt", b"k\n")]);
    let mut c = d.client();
    watch(&mut c, &repo);
    repo.write("notes/todo.md", b"- buy milk\n- call home\n");
    let v = wait_for_version(&mut c, &repo, "notes/todo.md", b"- buy milk\n- call home\n");
    std::fs::remove_dir_all(repo.path().join("notes")).expect("rm -r notes");
    let started = Instant::now();
    while versions(&mut c, &repo, Some("notes/todo.md"))
        .first()
        .is_none_or(|v| v.files[0].change != "deleted")
    {
        assert!(
            started.elapsed() < SETTLE_LIMIT,
            "the deletion was not kept"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let deleted = versions(&mut c, &repo, Some("notes/todo.md"))[0].clone();
    assert_eq!(deleted.files[0].size, None);

    // The deletion itself is no version to restore; the one before is.
    let refused = c
        .call::<HistoryRestore>(&HistoryRestoreParams {
            cwd: repo.cwd(),
            path: "notes/todo.md".into(),
            at: deleted.id.clone(),
            dry_run: false,
        })
        .expect_err("nothing to restore at the deletion");
    assert_eq!(kind(&refused).as_deref(), Some("no_version"), "{refused}");
    assert!(!repo.exists("notes/todo.md"));

    // A dry run shows the file coming back and writes nothing.
    let dry = c
        .call::<HistoryRestore>(&HistoryRestoreParams {
            cwd: repo.cwd(),
            path: "notes/todo.md".into(),
            at: v.id.clone(),
            dry_run: true,
        })
        .expect("dry run");
    assert!(
        dry.edit.is_none() && dry.diff.contains("+- call home"),
        "{dry:?}"
    );
    assert!(!repo.exists("notes/todo.md"));

    let edit = restore(&mut c, &repo, "notes/todo.md", &v.id).expect("an edit");
    assert_eq!(repo.read("notes/todo.md"), b"- buy milk\n- call home\n");
    c.call::<EditUndo>(&EditParams {
        cwd: repo.cwd(),
        id: Some(edit),
    })
    .expect("undo");
    assert!(!repo.exists("notes/todo.md"));
    fsck_clean(&repo);
}

#[test]
fn ignored_secret_and_binary_files_never_enter_history() {
    let d = InProcess::start();
    let repo = TestRepo::with_files(&[(".gitignore", b"*.log\nbuild/\n")]);
    let mut c = d.client();
    watch(&mut c, &repo);
    repo.write("app.log", b"CANARY-LOG\n");
    repo.write("build/out.txt", b"CANARY-BUILD\n");
    repo.write(".env", b"API_KEY=CANARY-ENV\n");
    repo.write("id_rsa", b"CANARY-KEY\n");
    repo.write("blob.bin", b"CANARY\0binary\n");
    // Written last: once it is in history, the batch holding the others has been handled.
    repo.write("seen.txt", b"visible\n");
    wait_for_version(&mut c, &repo, "seen.txt", b"visible\n");
    let all: Vec<String> = versions(&mut c, &repo, None)
        .into_iter()
        .flat_map(|v| v.files.into_iter().map(|f| f.path))
        .collect();
    assert_eq!(all, vec!["seen.txt".to_owned()]);
    let tree = repo.git(&["ls-tree", "-r", "--name-only", "refs/spark/history"]);
    assert_eq!(tree.trim(), "seen.txt");
    let objects = repo.git(&["cat-file", "--batch-all-objects", "--batch"]);
    assert!(
        !objects.contains("CANARY"),
        "a canary reached the object database"
    );
    // Asking about a secret says nothing either way, and it cannot be restored.
    assert!(versions(&mut c, &repo, Some(".env")).is_empty());
    let e = c
        .call::<HistoryRestore>(&HistoryRestoreParams {
            cwd: repo.cwd(),
            path: ".env".into(),
            at: "1s".into(),
            dry_run: false,
        })
        .expect_err("a secret is never restored");
    assert_eq!(kind(&e).as_deref(), Some("no_version"), "{e}");
}

#[test]
fn spark_s_own_edits_snapshot_the_file_first_even_unwatched() {
    let d = InProcess::start();
    let repo = TestRepo::with_files(&[("a.txt", b"one\n")]);
    // Typed but never committed, in a repository nobody watches: only the pre-edit snapshot
    // can keep it.
    repo.write("a.txt", b"one\ntyped by hand\n");
    let mut c = d.client();
    c.call::<EditApply>(&ApplyParams {
        cwd: repo.cwd(),
        patch: "*** Begin Patch\n*** Update File: a.txt\n@@\n one\n-typed by hand\n+written by spark\n*** End Patch\n".into(),
        dry_run: false,
        source: None,
        message: None,
    })
    .expect("apply");
    let v = versions(&mut c, &repo, Some("a.txt"));
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].source, "edit");
    assert_eq!(
        repo.git(&["cat-file", "blob", &format!("{}:a.txt", v[0].id)]),
        "one\ntyped by hand\n"
    );
}

#[test]
fn history_outlives_the_daemon() {
    let repo = TestRepo::with_files(&[("f.txt", b"zero\n")]);
    let first = InProcess::start();
    let mut c = first.client();
    watch(&mut c, &repo);
    repo.write("f.txt", b"one\n");
    let v1 = wait_for_version(&mut c, &repo, "f.txt", b"one\n");
    repo.write("f.txt", b"two\n");
    let v2 = wait_for_version(&mut c, &repo, "f.txt", b"two\n");
    drop(c);
    first.stop();

    let second = InProcess::start();
    let mut c = second.client();
    let ids: Vec<String> = versions(&mut c, &repo, Some("f.txt"))
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(ids, vec![v2.id, v1.id.clone()]);
    restore(&mut c, &repo, "f.txt", &v1.id).expect("an edit");
    assert_eq!(repo.read("f.txt"), b"one\n");
}

#[test]
fn retention_drops_segments_past_the_age_limit_and_fsck_stays_clean() {
    let repo = TestRepo::with_files(&[("f.txt", b"zero\n")]);
    // Three weeks ago, as far as history can tell.
    let home = Home::new();
    let mut config = home.config();
    config.history_clock_offset_ms = -21 * 24 * 3600 * 1000;
    let old = InProcess::start_with(home, config);
    let mut c = old.client();
    watch(&mut c, &repo);
    repo.write("f.txt", b"old one\n");
    let ancient = wait_for_version(&mut c, &repo, "f.txt", b"old one\n");
    drop(c);
    old.stop();

    let now = InProcess::start();
    let mut c = now.client();
    watch(&mut c, &repo);
    repo.write("f.txt", b"new one\n");
    let fresh = wait_for_version(&mut c, &repo, "f.txt", b"new one\n");
    let listed = versions(&mut c, &repo, Some("f.txt"));
    assert_eq!(
        listed.len(),
        1,
        "the three-week-old segment was pruned: {listed:?}"
    );
    assert_eq!(listed[0].id, fresh.id);
    let e = c
        .call::<HistoryRestore>(&HistoryRestoreParams {
            cwd: repo.cwd(),
            path: "f.txt".into(),
            at: ancient.id.clone(),
            dry_run: false,
        })
        .expect_err("pruned");
    assert_eq!(kind(&e).as_deref(), Some("unknown_version"), "{e}");
    assert_eq!(
        repo.git(&["for-each-ref", "refs/spark/history-segments/"]),
        ""
    );
    fsck_clean(&repo);
    // What pruning left unreachable is git gc's to collect, and gc keeps history sound.
    repo.git(&["gc", "-q", "--prune=now"]);
    fsck_clean(&repo);
    let after_gc = versions(&mut c, &repo, Some("f.txt"));
    assert_eq!(after_gc.len(), 1, "{after_gc:?}");
    assert_eq!(
        after_gc[0].files[0].change, "kept",
        "its predecessor is gone now"
    );
}

#[test]
fn retention_keeps_the_newest_segments_within_the_size_budget() {
    let repo = TestRepo::with_files(&[("big.txt", b"0\n")]);
    let home = Home::new();
    let mut config = home.config();
    config.history_max_bytes = 10_000;
    config.history_segment_snapshots = 1;
    let d = InProcess::start_with(home, config);
    let mut c = d.client();
    watch(&mut c, &repo);
    let mut ids = Vec::new();
    for i in 0..6u8 {
        let content = vec![b'a' + i; 4000]
            .into_iter()
            .chain(*b"\n")
            .collect::<Vec<u8>>();
        repo.write("big.txt", &content);
        ids.push(wait_for_version(&mut c, &repo, "big.txt", &content).id);
    }
    let listed: Vec<String> = versions(&mut c, &repo, Some("big.txt"))
        .into_iter()
        .map(|v| v.id)
        .collect();
    // 4 KB a segment, 10 KB kept: the newest segments only, the oldest pruned.
    assert!(listed.len() >= 2 && listed.len() <= 4, "{listed:?}");
    assert_eq!(listed[0], ids[5]);
    assert!(
        !listed.contains(&ids[0]) && !listed.contains(&ids[1]),
        "{listed:?}"
    );
    let segments = repo.git(&["for-each-ref", "--format=%(refname)", "refs/spark/"]);
    assert!(segments.lines().count() <= 4, "{segments}");
    fsck_clean(&repo);
}

#[test]
fn git_push_never_sends_history() {
    let d = InProcess::start();
    let repo = TestRepo::with_files(&[("f.txt", b"zero\n")]);
    let mut c = d.client();
    watch(&mut c, &repo);
    repo.write("f.txt", b"private draft\n");
    let v = wait_for_version(&mut c, &repo, "f.txt", b"private draft\n");
    let remote = tempfile::Builder::new()
        .prefix("remote")
        .tempdir_in("/tmp")
        .expect("temp remote");
    let init = hermetic_git(remote.path())
        .args(["init", "-q", "--bare"])
        .output()
        .expect("git init --bare");
    assert!(init.status.success());
    repo.git(&[
        "remote",
        "add",
        "origin",
        &remote.path().display().to_string(),
    ]);
    repo.git(&["push", "-q", "origin", "main"]);
    repo.git(&["push", "-q", "--all", "origin"]);
    repo.git(&["push", "-q", "--tags", "origin"]);
    let refs = hermetic_git(remote.path())
        .args(["for-each-ref", "--format=%(refname)"])
        .output()
        .expect("for-each-ref");
    assert_eq!(stdout(&refs).trim(), "refs/heads/main");
    let full = repo.git(&["rev-parse", &v.id]);
    let has = hermetic_git(remote.path())
        .args(["cat-file", "-e", full.trim()])
        .output()
        .expect("cat-file");
    assert!(
        !has.status.success(),
        "the snapshot commit reached the remote"
    );
}

#[test]
fn diff_since_shows_every_writer_s_changes_together() {
    let d = InProcess::start();
    let repo = TestRepo::with_files(&[("a.txt", b"a1\n"), ("src/b.txt", b"b1\n")]);
    let mut c = d.client();
    watch(&mut c, &repo);
    repo.write("a.txt", b"a2\n");
    wait_for_version(&mut c, &repo, "a.txt", b"a2\n");
    let r = c
        .call::<HistoryDiff>(&HistoryDiffParams {
            cwd: repo.cwd(),
            since: "1h".into(),
            path: None,
        })
        .expect("diff");
    assert_eq!(r.files, vec!["a.txt".to_owned()]);
    assert_eq!(
        r.diff,
        "diff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-a1\n+a2\n"
    );
    repo.write("src/new.txt", b"fresh\n");
    wait_for_version(&mut c, &repo, "src/new.txt", b"fresh\n");
    let r = c
        .call::<HistoryDiff>(&HistoryDiffParams {
            cwd: repo.path().join("src").display().to_string(),
            since: "1h".into(),
            path: None,
        })
        .expect("diff from a subdirectory");
    assert_eq!(r.files, vec!["src/new.txt".to_owned()]);
    assert!(
        r.diff.contains(
            "new file mode 100644\n--- /dev/null\n+++ b/src/new.txt\n@@ -0,0 +1 @@\n+fresh\n"
        ),
        "{}",
        r.diff
    );
}

#[test]
fn the_cli_lists_restores_and_explains_its_errors() {
    let ctl = Ctl::new();
    let repo = TestRepo::with_files(&[("f.txt", b"zero\n")]);
    let run = |args: &[&str]| {
        let mut cmd = ctl.command("sparkctl");
        cmd.current_dir(repo.path()).args(args);
        cmd.output().expect("run sparkctl")
    };
    let out = run(&["watch"]);
    assert!(out.status.success(), "{}", stderr(&out));
    repo.write("f.txt", b"one\n");
    let started = Instant::now();
    let id = loop {
        let out = run(&["history", "f.txt", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        if let Some(id) = v["versions"][0]["id"].as_str() {
            break id.to_owned();
        }
        assert!(started.elapsed() < SETTLE_LIMIT, "never listed");
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = run(&["history", "f.txt"]);
    let text = stdout(&out);
    assert!(
        text.starts_with(&id) && text.contains(" ago  watch  4 B  +1 -1  modified"),
        "{text}"
    );
    let out = run(&["history"]);
    assert!(stdout(&out).contains("f.txt"), "{}", stdout(&out));

    repo.write("f.txt", b"two\n");
    let out = run(&["restore", "f.txt", "--at", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("restored as edit"),
        "{}",
        stdout(&out)
    );
    assert_eq!(repo.read("f.txt"), b"one\n");
    let out = run(&["undo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(repo.read("f.txt"), b"two\n");

    let before = spark_tests::worktree_snapshot(repo.path());
    for (args, needle, hint) in [
        (
            vec!["restore", "f.txt", "--at", "abcdef0123"],
            "no version abcdef0123",
            "sparkctl history PATH",
        ),
        (
            vec!["restore", "f.txt", "--at", "yesterday"],
            "is not a version id, a duration or a time",
            "10m",
        ),
        (
            vec!["restore", "f.txt", "--at", "2000-01-01T00:00:00Z"],
            "no version of f.txt at 2000-01-01T00:00:00Z",
            "sparkctl history PATH",
        ),
        (
            vec!["restore", "../outside.txt", "--at", "1s"],
            "outside.txt",
            "",
        ),
    ] {
        let out = run(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            err.contains("hint: ") && err.contains(hint),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        spark_tests::worktree_snapshot(repo.path()),
        before,
        "errors change nothing"
    );

    let out = run(&["diff", "--since", "1h"]);
    assert!(stdout(&out).contains("-zero\n+two\n"), "{}", stdout(&out));
    let out = run(&["restore", "--help"]);
    assert!(
        stdout(&out).contains("a duration back from now"),
        "{}",
        stdout(&out)
    );
}
