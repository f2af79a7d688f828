//! Repository shapes as users really have them: a `.git` that is a `gitdir:` file or a symlink,
//! git directories inside other repositories, linked worktrees, submodules, `GIT_DIR` in the
//! shell, symlinked directories in the tree, stale lock files, sparse checkouts and LFS
//! pointers. Each edit must land in the repository git itself would use, or be refused with
//! nothing changed; and every failure after the first write (a crash or an error) must settle
//! all-before or all-after, recorded exactly once. Asserted on bytes on disk, refs, the stash
//! list and `git fsck --strict`.

use std::path::{Path, PathBuf};
use std::process::Output;

use spark_proto::methods::{ApplyParams, EditApply, EditResult};
use spark_tests::{
    Ctl, InProcess, TestRepo, hermetic_git, output_with_stdin, snapshot, stderr, stdout,
};
use sparkctl::{Client, ClientError};

fn apply(c: &mut Client, cwd: &Path, patch: &str) -> Result<EditResult, ClientError> {
    c.call::<EditApply>(&ApplyParams {
        cwd: cwd.display().to_string(),
        patch: patch.to_owned(),
        dry_run: false,
        source: Some("test".into()),
        message: Some("shape".into()),
    })
}

/// Run git in `dir` (hermetic), panicking with its stderr on failure.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = hermetic_git(dir).args(args).output().expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}",
        dir.display(),
        stderr(&out)
    );
    stdout(&out)
}

fn identity(dir: &Path) {
    git(dir, &["config", "user.name", "Spark Test"]);
    git(dir, &["config", "user.email", "test@spark.invalid"]);
}

/// A scratch directory for repositories that `TestRepo` cannot lay out.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("shape")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

/// Commit `files` in the worktree `dir`.
fn commit_files(dir: &Path, files: &[(&str, &[u8])]) {
    for (rel, bytes) in files {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, bytes).expect("write");
        git(dir, &["add", rel]);
    }
    git(dir, &["commit", "-q", "-m", "files"]);
}

fn update(path: &str, old: &str, new: &str) -> String {
    format!("*** Begin Patch\n*** Update File: {path}\n-{old}\n+{new}\n*** End Patch\n")
}

/// Every ref of the repository at `dir` with its target.
fn refs(dir: &Path) -> String {
    git(dir, &["for-each-ref", "--format=%(refname) %(objectname)"])
}

/// The edit `id` is what `git stash show -p` prints in `dir`, and the repository is sound.
fn assert_recorded_in(dir: &Path, id: &str, minus: &str, plus: &str) {
    let shown = git(dir, &["stash", "show", "-p", id]);
    assert!(
        shown.contains(&format!("-{minus}\n+{plus}\n")),
        "{}: {shown}",
        dir.display()
    );
    assert!(
        refs(dir).contains("refs/spark/edits"),
        "{}: recorded here",
        dir.display()
    );
    git(dir, &["fsck", "--strict"]);
}

#[test]
fn separate_git_dir_inside_another_repository_edits_the_inner_worktree() {
    let outer = TestRepo::with_files(&[("a.txt", b"outer\n")]);
    let place = scratch();
    let inner = place.path().join("inner");
    // `git init --separate-git-dir` leaves `inner/.git` a `gitdir:` file pointing into `outer`.
    let git_dir = outer.path().join("gitdirs/inner.git");
    std::fs::create_dir(outer.path().join("gitdirs")).expect("mkdir");
    git(
        place.path(),
        &[
            "init",
            "-q",
            "-b",
            "main",
            "--separate-git-dir",
            git_dir.to_str().expect("utf-8"),
            inner.to_str().expect("utf-8"),
        ],
    );
    identity(&inner);
    commit_files(&inner, &[("a.txt", b"inner\n")]);
    assert!(
        std::fs::read_to_string(inner.join(".git"))
            .expect("gitfile")
            .starts_with("gitdir:")
    );
    let outer_refs = refs(outer.path());

    let d = InProcess::start();
    let mut c = d.client();
    let r = apply(&mut c, &inner, &update("a.txt", "inner", "INNER")).expect("apply");
    let id = r.edit.expect("edit id");

    assert_eq!(
        std::fs::read(inner.join("a.txt")).expect("read"),
        b"INNER\n"
    );
    assert_eq!(
        outer.read("a.txt"),
        b"outer\n",
        "the outer worktree is untouched"
    );
    assert_eq!(
        refs(outer.path()),
        outer_refs,
        "nothing recorded in the outer repository"
    );
    assert_recorded_in(&inner, &id, "inner", "INNER");
    assert_eq!(
        Path::new(&git(&inner, &["rev-parse", "--show-toplevel"]).trim_end()),
        inner.canonicalize().expect("canonical")
    );
    git(outer.path(), &["fsck", "--strict"]);
}

#[test]
fn separate_git_dir_elsewhere_and_a_dotgit_symlink_are_edited_like_git_does() {
    let place = scratch();
    let store = place.path().join("store");
    std::fs::create_dir(&store).expect("mkdir");

    let separate = place.path().join("separate");
    let sep_git = store.join("separate.git");
    git(
        place.path(),
        &[
            "init",
            "-q",
            "-b",
            "main",
            "--separate-git-dir",
            sep_git.to_str().expect("utf-8"),
            separate.to_str().expect("utf-8"),
        ],
    );
    identity(&separate);
    commit_files(&separate, &[("a.txt", b"a\n")]);

    // `.git` a symlink to a git directory kept elsewhere (dotfile managers do this).
    let linked = place.path().join("linked");
    let link_git = store.join("linked.git");
    git(
        place.path(),
        &[
            "init",
            "-q",
            "-b",
            "main",
            "--separate-git-dir",
            link_git.to_str().expect("utf-8"),
            linked.to_str().expect("utf-8"),
        ],
    );
    std::fs::remove_file(linked.join(".git")).expect("rm gitfile");
    std::os::unix::fs::symlink(&link_git, linked.join(".git")).expect("symlink");
    identity(&linked);
    commit_files(&linked, &[("sub/b.txt", b"b\n")]);

    let d = InProcess::start();
    let mut c = d.client();
    let r = apply(&mut c, &separate, &update("a.txt", "a", "A")).expect("separate git dir");
    assert_eq!(std::fs::read(separate.join("a.txt")).expect("read"), b"A\n");
    assert_recorded_in(&separate, &r.edit.expect("id"), "a", "A");

    // From a subdirectory: patch paths start there.
    let r = apply(&mut c, &linked.join("sub"), &update("b.txt", "b", "B")).expect("symlinked .git");
    assert_eq!(r.files[0].path, "sub/b.txt");
    assert_eq!(
        std::fs::read(linked.join("sub/b.txt")).expect("read"),
        b"B\n"
    );
    assert_recorded_in(&linked, &r.edit.expect("id"), "b", "B");
    assert_eq!(git(&linked, &["status", "--porcelain"]), " M sub/b.txt\n");
    // The store holds only git directories: nothing was written next to them.
    let mut names: Vec<String> = std::fs::read_dir(&store)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["linked.git", "separate.git"]);
}

#[test]
fn linked_worktree_and_submodule_edits_stay_in_their_own_tree() {
    let main = TestRepo::with_files(&[("a.txt", b"main\n")]);
    let place = scratch();
    let wt = place.path().join("wt");
    git(
        main.path(),
        &[
            "worktree",
            "add",
            "-q",
            "-b",
            "side",
            wt.to_str().expect("utf-8"),
        ],
    );

    let lib = TestRepo::with_files(&[("lib.txt", b"lib\n")]);
    git(
        main.path(),
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            lib.path().to_str().expect("utf-8"),
            "vendor/lib",
        ],
    );
    git(main.path(), &["commit", "-q", "-m", "submodule"]);
    let sub = main.path().join("vendor/lib");
    assert!(
        std::fs::read_to_string(sub.join(".git"))
            .expect("gitfile")
            .starts_with("gitdir:")
    );

    let d = InProcess::start();
    let mut c = d.client();
    let r = apply(&mut c, &wt, &update("a.txt", "main", "side")).expect("linked worktree");
    let wt_id = r.edit.expect("id");
    assert_eq!(std::fs::read(wt.join("a.txt")).expect("read"), b"side\n");
    assert_eq!(
        main.read("a.txt"),
        b"main\n",
        "the main worktree is untouched"
    );
    assert_eq!(git(&wt, &["status", "--porcelain"]), " M a.txt\n");

    let r = apply(&mut c, &sub, &update("lib.txt", "lib", "LIB")).expect("submodule");
    let sub_id = r.edit.expect("id");
    assert_eq!(std::fs::read(sub.join("lib.txt")).expect("read"), b"LIB\n");
    assert_eq!(
        lib.read("lib.txt"),
        b"lib\n",
        "the submodule's origin is untouched"
    );
    assert_recorded_in(&sub, &sub_id, "lib", "LIB");
    // The record lives in the submodule's git directory, not in the superproject.
    assert!(!refs(main.path()).contains(&format!("refs/spark/pins/{sub_id}")));
    assert!(
        git(&wt, &["stash", "show", "-p", &wt_id]).contains("-main\n+side\n"),
        "the linked worktree's edit is shown by git there"
    );
    assert_eq!(
        git(main.path(), &["status", "--porcelain"]),
        " M vendor/lib\n",
        "the superproject sees only a modified submodule"
    );
    git(main.path(), &["fsck", "--strict"]);
    git(&sub, &["fsck", "--strict"]);

    // A bare repository with a linked worktree (a common layout): core.bare describes the bare
    // repository, not the worktree, which is edited like any other.
    let bare = place.path().join("bare.git");
    git(
        place.path(),
        &[
            "clone",
            "-q",
            "--bare",
            main.path().to_str().expect("utf-8"),
            bare.to_str().expect("utf-8"),
        ],
    );
    let bw = place.path().join("bw");
    git(
        &bare,
        &["worktree", "add", "-q", bw.to_str().expect("utf-8")],
    );
    identity(&bw);
    let r = apply(&mut c, &bw, &update("a.txt", "main", "bare"))
        .expect("worktree of a bare repository");
    assert_eq!(std::fs::read(bw.join("a.txt")).expect("read"), b"bare\n");
    assert_recorded_in(&bw, &r.edit.expect("id"), "main", "bare");
    assert!(
        refused_here(&mut c, &bare),
        "the bare repository itself has no worktree"
    );
}

/// Whether `edit/apply` in `dir` is refused as not a repository.
fn refused_here(c: &mut Client, dir: &Path) -> bool {
    match apply(c, dir, &update("a.txt", "main", "x")) {
        Err(ClientError::Rpc(r)) => r.error_code() == Some(spark_proto::ErrorCode::NotARepository),
        _ => false,
    }
}

#[test]
fn git_dir_in_the_shell_is_honoured_when_it_is_the_same_repository_and_refused_otherwise() {
    let repo = TestRepo::with_files(&[("a.txt", b"a\n"), ("sub/b.txt", b"b\n")]);
    let other = TestRepo::with_files(&[("a.txt", b"other\n")]);
    let ctl = Ctl::new();
    let run = |cwd: &Path, env: &[(&str, &Path)], patch: &str| {
        let mut cmd = ctl.command("sparkctl");
        cmd.current_dir(cwd).args(["apply", "-"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        output_with_stdin(&mut cmd, patch.as_bytes())
    };
    let before = (snapshot(repo.path()), snapshot(other.path()));
    let other_git: PathBuf = other.path().join(".git");
    for env in [
        vec![("GIT_DIR", other_git.as_path())],
        vec![("GIT_WORK_TREE", other.path())],
        vec![
            ("GIT_DIR", other_git.as_path()),
            ("GIT_WORK_TREE", repo.path()),
        ],
    ] {
        let out = run(repo.path(), &env, &update("a.txt", "a", "A"));
        assert_eq!(out.status.code(), Some(1), "{env:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("sparkctl finds the repository from the current directory")
                && err.contains("\nhint: unset GIT_DIR and GIT_WORK_TREE"),
            "{env:?}: {err}"
        );
    }
    // GIT_DIR alone from a subdirectory: git would take `sub` as the worktree's top.
    let repo_git = repo.path().join(".git");
    let out = run(
        &repo.path().join("sub"),
        &[("GIT_DIR", &repo_git)],
        &update("b.txt", "b", "B"),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        (snapshot(repo.path()), snapshot(other.path())),
        before,
        "refused: nothing changed anywhere"
    );

    // As in a git hook: GIT_DIR names this repository, run at the top.
    let out = run(
        repo.path(),
        &[("GIT_DIR", Path::new(".git"))],
        &update("a.txt", "a", "A"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(repo.read("a.txt"), b"A\n");
    assert_eq!(other.read("a.txt"), b"other\n");
    git(repo.path(), &["fsck", "--strict"]);
    assert!(ctl.run(["stop"]).status.success());
}

/// Run `sparkctl args…` in `cwd` with `env`, `stdin` as its input.
fn sparkctl(ctl: &Ctl, cwd: &Path, env: &[(&str, &str)], args: &[&str], stdin: &str) -> Output {
    let mut cmd = ctl.command("sparkctl");
    cmd.current_dir(cwd).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    output_with_stdin(&mut cmd, stdin.as_bytes())
}

/// `sparkctl --json log` in `repo`: each edit's (id, state).
fn log(ctl: &Ctl, repo: &TestRepo) -> Vec<(String, String)> {
    let out = sparkctl(ctl, repo.path(), &[], &["--json", "log"], "");
    assert!(out.status.success(), "log: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    v["edits"]
        .as_array()
        .expect("edits")
        .iter()
        .map(|e| {
            (
                e["id"].as_str().expect("id").to_owned(),
                e["state"].as_str().expect("state").to_owned(),
            )
        })
        .collect()
}

/// How many times the repository records an edit: `refs/spark/edits` reflog entries and pins.
fn records(repo: &TestRepo) -> (usize, usize) {
    let reflog = repo.git_output(&["reflog", "show", "--format=%H", "refs/spark/edits"]);
    let entries = if reflog.status.success() {
        stdout(&reflog).lines().count()
    } else {
        0
    };
    let pins = repo
        .git(&["for-each-ref", "--format=%(refname)", "refs/spark/pins/"])
        .lines()
        .count();
    (entries, pins)
}

fn stash_list(repo: &TestRepo) -> Vec<String> {
    repo.git(&["stash", "list", "--format=%H"])
        .lines()
        .map(str::to_owned)
        .collect()
}

fn journals(ctl: &Ctl) -> usize {
    std::fs::read_dir(ctl.home.layout().state_dir.join("journal"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| std::fs::read(e.path()).is_ok_and(|b| b.first() != Some(&0)))
            })
            .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_path_through_a_symlinked_directory_is_written_and_recorded_under_the_real_path() {
    let repo = TestRepo::with_files(&[("real/f.txt", b"one\n")]);
    std::os::unix::fs::symlink("real", repo.path().join("alias")).expect("symlink");
    repo.git(&["add", "alias"]);
    repo.git(&["commit", "-q", "-m", "alias"]);
    let ctl = Ctl::new();

    let out = sparkctl(
        &ctl,
        repo.path(),
        &[],
        &["--json", "apply", "-"],
        &update("alias/f.txt", "one", "two"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(r["files"][0]["path"], "real/f.txt", "{r}");
    let id = r["edit"].as_str().expect("id").to_owned();
    assert_eq!(repo.read("real/f.txt"), b"two\n");
    assert_eq!(
        std::fs::read_link(repo.path().join("alias")).expect("still a link"),
        Path::new("real")
    );
    assert_eq!(repo.git(&["status", "--porcelain"]), " M real/f.txt\n");
    let shown = repo.git(&["stash", "show", "-p", &id]);
    assert!(
        shown.contains("+++ b/real/f.txt\n") && shown.contains("-one\n+two\n"),
        "{shown}"
    );
    assert_eq!(log(&ctl, &repo), [(id.clone(), "applied".to_owned())]);

    // Undoable, and `git stash apply` brings it back, as for any edit.
    let out = sparkctl(&ctl, repo.path(), &[], &["undo"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(repo.read("real/f.txt"), b"one\n");
    repo.git(&["stash", "apply", &id]);
    assert_eq!(repo.read("real/f.txt"), b"two\n");
    repo.git(&["fsck", "--strict"]);
    assert_eq!(journals(&ctl), 0);
    assert!(ctl.run(["stop"]).status.success());
}

const THREE_FILES: &str = "*** Begin Patch
*** Update File: a.txt
-a
+A
*** Update File: b.txt
-b
+B
*** Add File: new/c.txt
+C
*** End Patch
";

/// The worktree as the three-file edit sees it: all before, all after, or something else.
/// (Whether reverting removes the directory `new/` again is not this test's business.)
fn edit_state(repo: &TestRepo) -> &'static str {
    let now = (
        repo.read("a.txt"),
        repo.read("b.txt"),
        repo.exists("new/c.txt").then(|| repo.read("new/c.txt")),
    );
    if now == (b"a\n".to_vec(), b"b\n".to_vec(), None) {
        "before"
    } else if now == (b"A\n".to_vec(), b"B\n".to_vec(), Some(b"C\n".to_vec())) {
        "after"
    } else {
        "torn"
    }
}

#[test]
fn every_failure_after_the_first_write_settles_all_before_or_all_after_recorded_once() {
    // (operation, failpoint, whether the operation is done once settled). `fail_*` points make
    // a step fail with an error and the daemon lives on; the others kill it, and recovery at the
    // next start settles it.
    let mut cases = vec![
        ("apply", "after_file_1", false),
        ("apply", "after_file_2", false),
        ("apply", "after_file_3", true),
        ("apply", "after_written", true),
        ("apply", "after_record", true),
        ("apply", "before_finish", true),
        ("apply", "fail_record", false),
        ("apply", "fail_after_record", false),
    ];
    for op in ["undo", "stash"] {
        cases.extend([
            (op, "after_file_1", false),
            (op, "after_file_2", false),
            (op, "after_file_3", true),
            (op, "after_written", true),
            (op, "before_finish", true),
            (op, "fail_record", false),
            (op, "fail_after_record", false),
        ]);
    }
    for (op, point, done) in cases {
        let what = format!("{op} at {point}");
        let repo = TestRepo::with_files(&[("a.txt", b"a\n"), ("b.txt", b"b\n")]);
        let ctl = Ctl::new();
        let fp = [("SPARK_FAILPOINT", point)];
        if op != "apply" {
            let out = sparkctl(&ctl, repo.path(), &[], &["apply", "-"], THREE_FILES);
            assert!(out.status.success(), "{what}: {}", stderr(&out));
            assert!(ctl.run(["stop"]).status.success());
        }
        let (args, input): (&[&str], &str) = match op {
            "apply" => (&["apply", "-"], THREE_FILES),
            "undo" => (&["undo"], ""),
            _ => (&["stash"], ""),
        };
        let out = sparkctl(&ctl, repo.path(), &fp, args, input);
        assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
        if point.starts_with("fail_") {
            // Settled at once, and said so truthfully.
            assert!(
                stderr(&out).contains("taken back and nothing changed"),
                "{what}: {}",
                stderr(&out)
            );
            assert_eq!(journals(&ctl), 0, "{what}: no journal left to recover");
        }
        // Whatever happened, the next daemon (no failpoint) settles it before serving.
        if let Some(pid) = ctl.daemon_pid() {
            let _ = ctl.run(["stop"]);
            spark_tests::wait_dead(pid, std::time::Duration::from_secs(10));
        }
        let edits = log(&ctl, &repo);
        // The edit's files are in their after state when it is applied and not stashed.
        let applied = (op == "apply") == done;
        assert_eq!(
            edit_state(&repo),
            if applied { "after" } else { "before" },
            "{what}: worktree"
        );
        if op == "apply" && !done {
            assert!(!repo.exists("new"), "{what}: the created directory is gone");
        }
        let recorded = usize::from(op != "apply" || done);
        assert_eq!(edits.len(), recorded, "{what}: ledger {edits:?}");
        assert_eq!(
            records(&repo),
            (recorded, recorded),
            "{what}: recorded exactly once"
        );
        if op != "apply" {
            let state = match (op, done) {
                (_, false) => "applied",
                ("undo", true) => "undone",
                _ => "stashed",
            };
            assert_eq!(edits[0].1, state, "{what}: log");
            let full = repo.git(&["rev-parse", &edits[0].0]).trim().to_owned();
            assert_eq!(
                stash_list(&repo),
                if done && op == "stash" {
                    vec![full]
                } else {
                    Vec::new()
                },
                "{what}: stash list"
            );
        }
        assert_eq!(journals(&ctl), 0, "{what}: journal settled");
        repo.git(&["fsck", "--strict"]);
        assert!(ctl.run(["stop"]).status.success());
    }
}

/// `sparkctl --json args…` that must be refused (exit 1) with nothing changed in `repo` (`.git`
/// included); returns the error's `kind` and the stderr text.
fn refused(ctl: &Ctl, repo: &TestRepo, cwd: &Path, args: &[&str], stdin: &str) -> (String, String) {
    let before = snapshot(repo.path());
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = sparkctl(ctl, cwd, &[], &all, stdin);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(snapshot(repo.path()), before, "{args:?}: nothing changed");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "one line and a hint: {err}");
    assert!(lines[0].starts_with("sparkctl: error: "), "{err}");
    assert!(lines[1].starts_with("hint: "), "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json error");
    (v["error"]["kind"].as_str().unwrap_or("").to_owned(), err)
}

#[test]
fn stale_ref_locks_are_named_and_refused_before_anything_is_written() {
    let repo = TestRepo::with_files(&[("a.txt", b"a\n"), ("b.txt", b"b\n")]);
    let ctl = Ctl::new();
    let edits_lock = repo.path().join(".git/refs/spark/edits.lock");
    std::fs::create_dir_all(edits_lock.parent().expect("dir")).expect("mkdir");
    std::fs::write(&edits_lock, b"").expect("lock");

    let patch = update("a.txt", "a", "A");
    let (kind, err) = refused(&ctl, &repo, repo.path(), &["apply", "-"], &patch);
    assert_eq!(kind, "ref_locked");
    let shown = edits_lock.display().to_string();
    assert!(
        err.contains(&format!("{shown} exists")) && err.contains(&format!("rm '{shown}'")),
        "{err}"
    );
    assert!(log(&ctl, &repo).is_empty());

    std::fs::remove_file(&edits_lock).expect("unlock");
    let out = sparkctl(&ctl, repo.path(), &[], &["--json", "apply", "-"], &patch);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = serde_json::from_str::<serde_json::Value>(&stdout(&out)).expect("json")["edit"]
        .as_str()
        .expect("id")
        .to_owned();

    // `stash` needs refs/stash: refused with the edit still applied and nothing on the stash.
    let stash_lock = repo.path().join(".git/refs/stash.lock");
    std::fs::write(&stash_lock, b"").expect("lock");
    let (kind, err) = refused(&ctl, &repo, repo.path(), &["stash"], "");
    assert_eq!(kind, "ref_locked");
    assert!(err.contains(&stash_lock.display().to_string()), "{err}");
    assert_eq!(repo.read("a.txt"), b"A\n");
    assert!(stash_list(&repo).is_empty());
    assert_eq!(log(&ctl, &repo), [(id.clone(), "applied".to_owned())]);

    std::fs::remove_file(&stash_lock).expect("unlock");
    let out = sparkctl(&ctl, repo.path(), &[], &["stash"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(repo.read("a.txt"), b"a\n");
    assert_eq!(stash_list(&repo).len(), 1);
    assert_eq!(log(&ctl, &repo), [(id, "stashed".to_owned())]);
    repo.git(&["stash", "pop", "-q"]);
    assert_eq!(repo.read("a.txt"), b"A\n");
    repo.git(&["fsck", "--strict"]);
    assert_eq!(journals(&ctl), 0);
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn paths_outside_the_sparse_checkout_are_refused_in_cone_and_non_cone_mode() {
    let repo = TestRepo::with_files(&[
        ("top.txt", b"top\n"),
        ("src/a.rs", b"a\n"),
        ("docs/b.md", b"b\n"),
    ]);
    repo.git(&["sparse-checkout", "set", "src"]);
    assert!(!repo.exists("docs/b.md"), "git left docs out");
    let ctl = Ctl::new();
    let add = |path: &str| format!("*** Begin Patch\n*** Add File: {path}\n+new\n*** End Patch\n");

    for patch in [
        add("docs/new.md"),
        add("other/x.md"),
        update("docs/b.md", "b", "B"),
    ] {
        let (kind, err) = refused(&ctl, &repo, repo.path(), &["apply", "-"], &patch);
        assert_eq!(kind, "path_sparse_checkout", "{patch}");
        assert!(err.contains("sparse checkout"), "{err}");
        assert!(err.contains("hint: `git sparse-checkout add"), "{err}");
    }
    // Inside the cone, and files at the top, are fine.
    let out = sparkctl(
        &ctl,
        repo.path(),
        &[],
        &["apply", "-"],
        &add("src/deep/new.rs"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = sparkctl(&ctl, repo.path(), &[], &["apply", "-"], &add("notes.txt"));
    assert!(out.status.success(), "{}", stderr(&out));

    repo.git(&["sparse-checkout", "set", "--no-cone", "/*.txt", "/src/"]);
    let (kind, _) = refused(&ctl, &repo, repo.path(), &["apply", "-"], &add("docs/x.md"));
    assert_eq!(kind, "path_sparse_checkout");
    let out = sparkctl(&ctl, repo.path(), &[], &["apply", "-"], &add("more.txt"));
    assert!(out.status.success(), "{}", stderr(&out));
    // git agrees: the files spark added are in the checkout, nothing conflicts on reapply.
    repo.git(&["sparse-checkout", "reapply"]);
    assert_eq!(repo.read("src/deep/new.rs"), b"new\n");
    assert_eq!(repo.read("more.txt"), b"new\n");
    repo.git(&["fsck", "--strict"]);
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn lfs_pointers_and_parent_paths_are_refused_truthfully_with_a_hint() {
    let pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n";
    let repo = TestRepo::with_files(&[
        (
            ".gitattributes",
            b"*.dat filter=lfs diff=lfs merge=lfs -text\n",
        ),
        ("model.dat", pointer),
        ("plain.txt", b"version https://git-lfs.github.com/spec/v1\n"),
        ("src/lib.rs", b"x\n"),
    ]);
    let ctl = Ctl::new();
    let patch =
        "*** Begin Patch\n*** Update File: model.dat\n-size 12345\n+size 1\n*** End Patch\n";
    let (kind, err) = refused(&ctl, &repo, repo.path(), &["apply", "-"], patch);
    assert_eq!(kind, "lfs_pointer");
    assert!(
        err.contains("model.dat") && err.contains("Git LFS pointer"),
        "{err}"
    );
    assert!(
        err.contains("hint: fetch the real content first (`git lfs pull`)"),
        "{err}"
    );
    // The same text in a file without filter=lfs is just text.
    let out = sparkctl(
        &ctl,
        repo.path(),
        &[],
        &["apply", "-"],
        &update(
            "plain.txt",
            "version https://git-lfs.github.com/spec/v1",
            "v2",
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // `..` from a subdirectory stays inside the tree, and the message does not claim otherwise.
    let (kind, err) = refused(
        &ctl,
        &repo,
        &repo.path().join("src"),
        &["apply", "-"],
        &update("../plain.txt", "v2", "v3"),
    );
    assert_eq!(kind, "path_parent_dir");
    assert!(
        err.contains("refusing path `../plain.txt`: it contains a `..` component")
            && !err.contains("escapes"),
        "{err}"
    );
    assert!(
        err.contains("hint: name the file relative to the current directory without `..`"),
        "{err}"
    );
    repo.git(&["fsck", "--strict"]);
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn an_interrupted_edit_that_cannot_be_recorded_at_start_is_rolled_back_not_kept_forever() {
    let repo = TestRepo::with_files(&[("a.txt", b"a\n"), ("b.txt", b"b\n")]);
    let ctl = Ctl::new();
    // Killed with every file written and nothing recorded ...
    let out = sparkctl(
        &ctl,
        repo.path(),
        &[("SPARK_FAILPOINT", "after_written")],
        &["apply", "-"],
        THREE_FILES,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let pid = ctl.daemon_pid().expect("pid");
    assert!(spark_tests::wait_dead(
        pid,
        std::time::Duration::from_secs(10)
    ));
    assert_eq!(edit_state(&repo), "after");
    assert_eq!(journals(&ctl), 1);
    // ... and the next start cannot record it either: it settles all-before instead of keeping
    // a journal that every later start would fail on.
    let out = sparkctl(
        &ctl,
        repo.path(),
        &[("SPARK_FAILPOINT", "fail_record")],
        &["--json", "log"],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(edit_state(&repo), "before");
    assert!(!repo.exists("new"));
    assert_eq!(journals(&ctl), 0);
    assert!(log(&ctl, &repo).is_empty());
    assert_eq!(records(&repo), (0, 0));
    repo.git(&["fsck", "--strict"]);
    assert!(ctl.run(["stop"]).status.success());
}
