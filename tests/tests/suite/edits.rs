//! The user-visible edit flows over the socket: apply, log, show, undo, stash — asserted on bytes
//! on disk, git refs and objects, and what the git CLI makes of the records.

use std::os::unix::fs::PermissionsExt;

use spark_proto::ErrorCode;
use spark_proto::methods::{
    ApplyParams, EditApply, EditLog, EditParams, EditResult, EditShow, EditStash, EditUndo,
    FileChange, LogParams,
};
use spark_tests::{Ctl, InProcess, TestRepo, snapshot, stderr, stdout};
use sparkctl::{Client, ClientError};

fn apply(c: &mut Client, cwd: &str, patch: &str, message: &str) -> Result<EditResult, ClientError> {
    c.call::<EditApply>(&ApplyParams {
        cwd: cwd.to_owned(),
        patch: patch.to_owned(),
        dry_run: false,
        source: Some("test".into()),
        message: Some(message.to_owned()),
    })
}

fn rpc_code(e: ClientError) -> (ErrorCode, String) {
    match e {
        ClientError::Rpc(r) => (
            r.error_code().expect("known code"),
            r.kind().unwrap_or("").to_owned(),
        ),
        other => panic!("expected an RPC error, got {other}"),
    }
}

const LIB: &str = "fn one() {\n    1\n}\n\nfn two() {\n    2\n}\n\nfn three() {\n    3\n}\n";

const THREE_FILE_PATCH: &str = "*** Begin Patch
*** Update File: src/lib.rs
@@ fn one() {
-    1
+    100
*** Add File: src/new.rs
+pub fn added() {}
*** Delete File: old.txt
*** End Patch
";

#[test]
fn apply_lands_exactly_and_git_accepts_the_record() {
    let repo = TestRepo::with_files(&[
        ("src/lib.rs", LIB.as_bytes()),
        ("old.txt", b"bye\n"),
        ("keep.txt", b"k\n"),
    ]);
    // The user's own uncommitted and staged work must come through untouched.
    repo.write("keep.txt", b"user edit\n");
    repo.write("staged.txt", b"staged\n");
    repo.git(&["add", "staged.txt"]);
    let head = repo.git(&["rev-parse", "HEAD"]);
    let index = std::fs::read(repo.path().join(".git/index")).expect("index");

    let d = InProcess::start();
    let mut c = d.client();
    let r = apply(&mut c, &repo.cwd(), THREE_FILE_PATCH, "make one bigger").expect("apply");
    let id = r.edit.clone().expect("an edit id");

    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n").as_bytes()
    );
    assert_eq!(repo.read("src/new.rs"), b"pub fn added() {}\n");
    assert!(!repo.exists("old.txt"));
    assert_eq!(repo.read("keep.txt"), b"user edit\n");
    let mut files: Vec<(String, FileChange)> =
        r.files.iter().map(|f| (f.path.clone(), f.change)).collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        files,
        vec![
            ("old.txt".into(), FileChange::Deleted),
            ("src/lib.rs".into(), FileChange::Modified),
            ("src/new.rs".into(), FileChange::Added)
        ]
    );

    // HEAD, the branch, the index and the stash are the user's: untouched.
    assert_eq!(repo.git(&["rev-parse", "HEAD"]), head);
    assert_eq!(
        std::fs::read(repo.path().join(".git/index")).expect("index"),
        index
    );
    assert!(!repo.exists(".git/index.lock"));
    assert_eq!(repo.git(&["stash", "list"]), "");

    // git reads the record as a stash: `stash show -p` prints exactly the edit.
    let shown = c
        .call::<EditShow>(&EditParams {
            cwd: repo.cwd(),
            id: Some(id.clone()),
        })
        .expect("show");
    assert_eq!(shown.id, id);
    assert_eq!(repo.git(&["stash", "show", "-p", &id]), shown.diff);
    assert!(shown.diff.contains("-    1\n+    100\n"), "{}", shown.diff);
    assert!(
        shown.diff.contains("new file mode 100644")
            && shown.diff.contains("deleted file mode 100644")
    );
    assert!(
        !shown.diff.contains("keep.txt") && !shown.diff.contains("staged.txt"),
        "only the edit"
    );
    repo.git(&["fsck", "--strict"]);
    assert!(
        repo.git(&["reflog", "show", "refs/spark/edits"])
            .contains("spark: make one bigger")
    );

    let log = c
        .call::<EditLog>(&LogParams {
            cwd: repo.cwd(),
            limit: None,
        })
        .expect("log");
    assert_eq!(log.edits.len(), 1);
    assert_eq!(
        (log.edits[0].id.as_str(), log.edits[0].state.as_str()),
        (id.as_str(), "applied")
    );
    assert_eq!(log.edits[0].message, "make one bigger");
}

#[test]
fn undo_keeps_later_user_changes_and_git_stash_apply_reapplies() {
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes()), ("old.txt", b"bye\n")]);
    let d = InProcess::start();
    let mut c = d.client();
    let id = apply(&mut c, &repo.cwd(), THREE_FILE_PATCH, "m")
        .expect("apply")
        .edit
        .expect("id");

    // The user keeps typing, elsewhere in the same file.
    let typed = String::from_utf8(repo.read("src/lib.rs"))
        .expect("utf8")
        .replace("    3\n", "    3 + user\n");
    repo.write("src/lib.rs", typed.as_bytes());

    let r = c
        .call::<EditUndo>(&EditParams {
            cwd: repo.cwd(),
            id: None,
        })
        .expect("undo");
    assert_eq!(r.edit.as_deref(), Some(id.as_str()));
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    3\n", "    3 + user\n").as_bytes(),
        "edit reverted, user line kept"
    );
    assert!(!repo.exists("src/new.rs"));
    assert_eq!(repo.read("old.txt"), b"bye\n");
    let log = c
        .call::<EditLog>(&LogParams {
            cwd: repo.cwd(),
            limit: None,
        })
        .expect("log");
    assert_eq!(log.edits[0].state, "undone");

    // A second undo of the same edit is refused; nothing is left to undo by default.
    let (code, kind) = rpc_code(
        c.call::<EditUndo>(&EditParams {
            cwd: repo.cwd(),
            id: Some(id.clone()),
        })
        .expect_err("twice"),
    );
    assert_eq!(
        (code, kind.as_str()),
        (ErrorCode::EditRejected, "not_applied")
    );
    let (code, _) = rpc_code(
        c.call::<EditUndo>(&EditParams {
            cwd: repo.cwd(),
            id: None,
        })
        .expect_err("none left"),
    );
    assert_eq!(code, ErrorCode::UnknownEdit);

    // Plain git re-applies the record (git itself wants a clean file to merge into, so the
    // user commits their line first).
    repo.git(&["commit", "-q", "-am", "user work"]);
    repo.git(&["stash", "apply", &id]);
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n")
            .replace("    3\n", "    3 + user\n")
            .as_bytes()
    );
    assert_eq!(repo.read("src/new.rs"), b"pub fn added() {}\n");
    assert!(!repo.exists("old.txt"));
}

#[test]
fn undo_refuses_when_the_user_changed_the_same_lines_and_writes_nothing() {
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes()), ("old.txt", b"bye\n")]);
    let d = InProcess::start();
    let mut c = d.client();
    apply(&mut c, &repo.cwd(), THREE_FILE_PATCH, "m").expect("apply");
    let typed = String::from_utf8(repo.read("src/lib.rs"))
        .expect("utf8")
        .replace("    100\n", "    100 // mine\n");
    repo.write("src/lib.rs", typed.as_bytes());
    let before = snapshot(repo.path());

    let err = c
        .call::<EditUndo>(&EditParams {
            cwd: repo.cwd(),
            id: None,
        })
        .expect_err("conflict");
    let ClientError::Rpc(e) = err else {
        panic!("rpc error expected")
    };
    assert_eq!(e.error_code(), Some(ErrorCode::Conflict));
    assert_eq!(e.kind(), Some("revert_conflict"));
    assert!(e.message.contains("src/lib.rs"), "{}", e.message);
    assert_eq!(
        snapshot(repo.path()),
        before,
        "nothing written, not even in .git"
    );
}

#[test]
fn stash_moves_the_edit_onto_git_stash_and_pop_brings_it_back() {
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes()), ("old.txt", b"bye\n")]);
    let d = InProcess::start();
    let mut c = d.client();
    let id = apply(&mut c, &repo.cwd(), THREE_FILE_PATCH, "bigger one")
        .expect("apply")
        .edit
        .expect("id");
    let after = (repo.read("src/lib.rs"), repo.read("src/new.rs"));

    let r = c
        .call::<EditStash>(&EditParams {
            cwd: repo.cwd(),
            id: Some(id.clone()),
        })
        .expect("stash");
    assert_eq!(r.edit.as_deref(), Some(id.as_str()));
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());
    assert!(!repo.exists("src/new.rs"));
    let list = repo.git(&["stash", "list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    assert!(
        list.starts_with("stash@{0}: On main: spark: bigger one"),
        "{list}"
    );
    let log = c
        .call::<EditLog>(&LogParams {
            cwd: repo.cwd(),
            limit: None,
        })
        .expect("log");
    assert_eq!(log.edits[0].state, "stashed");

    repo.git(&["stash", "pop"]);
    assert_eq!((repo.read("src/lib.rs"), repo.read("src/new.rs")), after);
    assert!(!repo.exists("old.txt"));
    repo.git(&["fsck", "--strict"]);
}

#[test]
fn works_without_commits_in_detached_head_and_from_subdirectories() {
    // No commits yet.
    let repo = TestRepo::empty();
    repo.write("notes.txt", b"a\nb\n");
    let d = InProcess::start();
    let mut c = d.client();
    let patch = "*** Begin Patch\n*** Update File: notes.txt\n a\n-b\n+c\n*** End Patch\n";
    let id = apply(&mut c, &repo.cwd(), patch, "unborn")
        .expect("apply")
        .edit
        .expect("id");
    assert_eq!(repo.read("notes.txt"), b"a\nc\n");
    assert!(repo.git(&["stash", "show", "-p", &id]).contains("-b\n+c\n"));
    assert!(
        repo.git_output(&["rev-parse", "--verify", "HEAD"])
            .status
            .code()
            != Some(0),
        "still no commits"
    );

    // Detached HEAD, and a cwd in a subdirectory: patch paths start there.
    let repo = TestRepo::with_files(&[("a/b/f.txt", b"x\n"), ("top.txt", b"t\n")]);
    repo.git(&["checkout", "-q", "--detach"]);
    let head = repo.git(&["rev-parse", "HEAD"]);
    let sub = repo.path().join("a");
    let patch = "*** Begin Patch\n*** Update File: b/f.txt\n-x\n+y\n*** End Patch\n";
    let id = apply(&mut c, &sub.display().to_string(), patch, "sub")
        .expect("apply")
        .edit
        .expect("id");
    assert_eq!(repo.read("a/b/f.txt"), b"y\n");
    assert_eq!(repo.git(&["rev-parse", "HEAD"]), head);
    assert!(
        repo.git(&["stash", "show", "-p", &id])
            .contains("a/b/f.txt")
    );
    // `..` never escapes, even from a subdirectory.
    let patch = "*** Begin Patch\n*** Update File: ../top.txt\n-t\n+u\n*** End Patch\n";
    let (code, _) =
        rpc_code(apply(&mut c, &sub.display().to_string(), patch, "x").expect_err("refused"));
    assert_eq!(code, ErrorCode::EditRejected);
    assert_eq!(repo.read("top.txt"), b"t\n");
}

#[test]
fn line_endings_bom_final_newline_and_mode_bits_survive_byte_for_byte() {
    let crlf = b"\xEF\xBB\xBFline one\r\nline two\r\nline three";
    let repo = TestRepo::with_files(&[("w.txt", crlf), ("run.sh", b"#!/bin/sh\necho a\n")]);
    std::fs::set_permissions(
        repo.path().join("run.sh"),
        std::fs::Permissions::from_mode(0o750),
    )
    .expect("chmod");
    let d = InProcess::start();
    let mut c = d.client();
    let patch = "*** Begin Patch\n*** Update File: w.txt\n line one\n-line two\n+line 2\n+line 2b\n line three\n*** Update File: run.sh\n-echo a\n+echo b\n*** End Patch\n";
    apply(&mut c, &repo.cwd(), patch, "m").expect("apply");
    assert_eq!(
        repo.read("w.txt"),
        b"\xEF\xBB\xBFline one\r\nline 2\r\nline 2b\r\nline three"
    );
    assert_eq!(repo.read("run.sh"), b"#!/bin/sh\necho b\n");
    let mode = std::fs::metadata(repo.path().join("run.sh"))
        .expect("meta")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o750);
    c.call::<EditUndo>(&EditParams {
        cwd: repo.cwd(),
        id: None,
    })
    .expect("undo");
    assert_eq!(repo.read("w.txt"), crlf);
}

#[test]
fn dry_run_shows_the_diff_and_writes_nothing() {
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes()), ("old.txt", b"bye\n")]);
    let before = snapshot(repo.path());
    let d = InProcess::start();
    let mut c = d.client();
    let r = c
        .call::<EditApply>(&ApplyParams {
            cwd: repo.cwd(),
            patch: THREE_FILE_PATCH.into(),
            dry_run: true,
            source: None,
            message: None,
        })
        .expect("dry run");
    assert_eq!(r.edit, None);
    assert!(
        r.diff.contains("+    100") && r.diff.contains("+pub fn added() {}"),
        "{}",
        r.diff
    );
    assert_eq!(snapshot(repo.path()), before);

    // The preview is the diff git itself prints for the edit once applied (file by file: the
    // preview follows the patch's order, git sorts by path).
    let sections = |diff: &str| {
        let mut v: Vec<String> = diff
            .split("diff --git ")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    };
    let id = apply(&mut c, &repo.cwd(), THREE_FILE_PATCH, "m")
        .expect("apply")
        .edit
        .expect("id");
    let git = repo.git(&["stash", "show", "-p", &id]);
    assert!(git.contains("new file mode 100644") && git.contains("deleted file mode 100644"));
    assert_eq!(sections(&r.diff), sections(&git));
}

#[test]
fn subscribers_hear_about_applied_and_reverted_edits() {
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes()), ("old.txt", b"bye\n")]);
    let d = InProcess::start();
    let mut sub = d.client();
    sub.call::<spark_proto::methods::Subscribe>(&Default::default())
        .expect("subscribe");
    let mut c = d.client();
    let id = apply(&mut c, &repo.cwd(), THREE_FILE_PATCH, "m")
        .expect("apply")
        .edit
        .expect("id");
    let n = sub.next_notification().expect("event");
    assert_eq!(n.method, "event");
    let p = n.params.expect("params");
    assert_eq!(p["type"], "edit_applied");
    assert_eq!(p["edit"], id);
    assert_eq!(
        p["repo"],
        repo.path()
            .canonicalize()
            .expect("canon")
            .display()
            .to_string()
    );
    assert_eq!(p["files"].as_array().map(Vec::len), Some(3));
    c.call::<EditUndo>(&EditParams {
        cwd: repo.cwd(),
        id: None,
    })
    .expect("undo");
    let p = sub
        .next_notification()
        .expect("event")
        .params
        .expect("params");
    assert_eq!(
        (p["type"].as_str(), p["edit"].as_str()),
        (Some("edit_reverted"), Some(id.as_str()))
    );
}

#[test]
fn sparkctl_apply_log_show_undo_from_the_command_line() {
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes()), ("old.txt", b"bye\n")]);
    let ctl = Ctl::new();
    let run_in = |args: &[&str], stdin: Option<&str>| {
        let mut cmd = ctl.command("sparkctl");
        cmd.current_dir(repo.path()).args(args);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn sparkctl");
        let mut pipe = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            std::io::Write::write_all(&mut pipe, s.as_bytes()).expect("write stdin");
        }
        drop(pipe);
        child.wait_with_output().expect("wait")
    };

    let out = run_in(&["apply", "-m", "from the cli"], Some(THREE_FILE_PATCH));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let summary = text.lines().last().expect("summary line");
    assert!(
        summary.starts_with("applied edit ") && summary.contains("3 files, +2 -2"),
        "{text}"
    );
    let id = summary
        .trim_start_matches("applied edit ")
        .split(':')
        .next()
        .expect("id")
        .to_owned();
    assert_eq!(repo.read("src/new.rs"), b"pub fn added() {}\n");

    let out = run_in(&["log"], None);
    assert!(
        stdout(&out).starts_with(&id) && stdout(&out).contains("from the cli"),
        "{}",
        stdout(&out)
    );
    let out = run_in(&["show", &id], None);
    assert_eq!(stdout(&out), repo.git(&["stash", "show", "-p", &id]));

    // The same patch again no longer applies: refused, exit 1, one line plus a hint.
    let out = run_in(&["apply"], Some(THREE_FILE_PATCH));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("sparkctl: error: ") && err.contains("hint: "),
        "{err}"
    );

    let out = run_in(&["--json", "undo", &id], None);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["edit"], id.as_str());
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());

    let out = run_in(&["show", "ffffffff"], None);
    assert_eq!(
        out.status.code(),
        Some(1),
        "unknown edit is a refusal: {}",
        stderr(&out)
    );

    // Outside any repository: a clear refusal.
    let outside = tempfile::tempdir().expect("tempdir");
    let out = ctl
        .command("sparkctl")
        .current_dir(outside.path())
        .args(["log"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not inside a git repository"),
        "{}",
        stderr(&out)
    );
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn an_edit_brought_back_with_git_stash_apply_can_be_undone_again() {
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes()), ("old.txt", b"bye\n")]);
    let d = InProcess::start();
    let mut c = d.client();
    let id = apply(&mut c, &repo.cwd(), THREE_FILE_PATCH, "m")
        .expect("apply")
        .edit
        .expect("id");
    c.call::<EditUndo>(&EditParams {
        cwd: repo.cwd(),
        id: Some(id.clone()),
    })
    .expect("undo");
    repo.git(&["stash", "apply", &id]);
    // The ledger says "undone", but the worktree holds the edit again: undo follows the worktree.
    c.call::<EditUndo>(&EditParams {
        cwd: repo.cwd(),
        id: Some(id.clone()),
    })
    .expect("undo again");
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());
    assert!(!repo.exists("src/new.rs"));
    assert_eq!(repo.read("old.txt"), b"bye\n");
}
