//! Records as `git stash` itself would make them, and reverts that stay where they belong: an
//! edit belongs to the worktree that made it, an undo or stash that would change nothing is
//! refused, edits to untracked files go where `git stash -u` puts them, and files under
//! line-ending conversion are recorded as git stores them. Asserted with the real git CLI on
//! bytes on disk, refs, `git stash list`, `git stash pop` and `git fsck --strict`.

use std::path::Path;
use std::process::Output;

use spark_tests::{Ctl, TestRepo, hermetic_git, output_with_stdin, snapshot, stderr, stdout};

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

/// Run `sparkctl args…` in `cwd` with `stdin` as its input.
fn sparkctl(ctl: &Ctl, cwd: &Path, args: &[&str], stdin: &str) -> Output {
    let mut cmd = ctl.command("sparkctl");
    cmd.current_dir(cwd).args(args);
    output_with_stdin(&mut cmd, stdin.as_bytes())
}

/// `sparkctl --json apply -` in `cwd`; returns the edit id.
fn apply(ctl: &Ctl, cwd: &Path, patch: &str) -> String {
    let out = sparkctl(ctl, cwd, &["--json", "apply", "-"], patch);
    assert!(out.status.success(), "apply: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    v["edit"].as_str().expect("edit id").to_owned()
}

fn update(path: &str, old: &str, new: &str) -> String {
    format!("*** Begin Patch\n*** Update File: {path}\n-{old}\n+{new}\n*** End Patch\n")
}

/// `sparkctl --json args…` in `cwd` that must be refused (exit 1) with nothing changed under
/// `repo` (`.git` included); returns the error's `kind` and the stderr text.
fn refused(ctl: &Ctl, repo: &Path, cwd: &Path, args: &[&str], stdin: &str) -> (String, String) {
    let before = snapshot(repo);
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = sparkctl(ctl, cwd, &all, stdin);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(snapshot(repo), before, "{args:?}: nothing changed");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "one line and a hint: {err}");
    assert!(lines[0].starts_with("sparkctl: error: "), "{err}");
    assert!(lines[1].starts_with("hint: "), "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json error");
    (v["error"]["kind"].as_str().unwrap_or("").to_owned(), err)
}

/// `sparkctl --json log` in `cwd`: each edit's (id, state).
fn log(ctl: &Ctl, cwd: &Path) -> Vec<(String, String)> {
    let out = sparkctl(ctl, cwd, &["--json", "log"], "");
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

fn stash_list(dir: &Path) -> Vec<String> {
    git(dir, &["stash", "list", "--format=%H"])
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn an_edit_is_undone_only_in_its_own_worktree_and_a_revert_that_changes_nothing_is_refused() {
    let main = TestRepo::with_files(&[("a.txt", b"same\n")]);
    let place = tempfile::Builder::new()
        .prefix("wt")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let wt = place.path().join("linked");
    let wt_arg = wt.to_str().expect("utf-8");
    git(
        main.path(),
        &["worktree", "add", "-q", "-b", "side", wt_arg],
    );
    let ctl = Ctl::new();

    let id = apply(&ctl, &wt, &update("a.txt", "same", "edited"));
    assert_eq!(std::fs::read(wt.join("a.txt")).expect("read"), b"edited\n");
    // The main worktree happens to hold the edit's after state too: an undo there would revert
    // a file the edit never touched.
    main.write("a.txt", b"edited\n");

    for what in ["undo", "stash"] {
        let (kind, err) = refused(&ctl, main.path(), main.path(), &[what, &id], "");
        assert_eq!(kind, "other_worktree", "{what}");
        assert!(
            err.contains(&format!("belongs to the worktree {}", wt.display())),
            "{err}"
        );
        assert!(
            err.contains(&format!("run `sparkctl {what} {id}` in {}", wt.display())),
            "{err}"
        );
    }
    assert_eq!(main.read("a.txt"), b"edited\n");
    assert!(stash_list(main.path()).is_empty());
    assert!(log(&ctl, main.path()).is_empty());
    assert_eq!(log(&ctl, &wt), [(id.clone(), "applied".to_owned())]);

    // In its own worktree the edit is undone as usual, and the main worktree stays as it was.
    let out = sparkctl(&ctl, &wt, &["undo", &id], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(wt.join("a.txt")).expect("read"), b"same\n");
    assert_eq!(main.read("a.txt"), b"edited\n");
    assert_eq!(log(&ctl, &wt), [(id.clone(), "undone".to_owned())]);

    // An edit reverted outside spark: undo and stash would change nothing, so they say so and
    // push nothing onto the stash.
    main.git(&["checkout", "--", "a.txt"]);
    let own = apply(&ctl, main.path(), &update("a.txt", "same", "mine"));
    main.git(&["checkout", "--", "a.txt"]);
    for args in [vec!["undo"], vec!["stash"], vec!["undo", own.as_str()]] {
        let (kind, err) = refused(&ctl, main.path(), main.path(), &args, "");
        assert_eq!(kind, "nothing_changes", "{args:?}");
        assert!(err.contains("would change nothing"), "{err}");
    }
    assert_eq!(main.read("a.txt"), b"same\n");
    assert!(stash_list(main.path()).is_empty());
    assert!(git(main.path(), &["stash", "show", "-p", &own]).contains("-same\n+mine\n"));
    git(main.path(), &["fsck", "--strict"]);
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn an_edit_to_an_untracked_file_is_stashed_as_git_stash_u_does_and_pops_back() {
    let repo = TestRepo::with_files(&[("a.txt", b"a\n")]);
    repo.write("notes.txt", b"one\n");
    // The same change made by hand and stashed by git itself, for comparison.
    let twin = TestRepo::with_files(&[("a.txt", b"a\n")]);
    twin.write("a.txt", b"A\n");
    twin.write("notes.txt", b"two\n");
    twin.git(&["stash", "push", "-q", "-u"]);
    let ctl = Ctl::new();

    let patch = "*** Begin Patch\n*** Update File: a.txt\n-a\n+A\n*** Update File: notes.txt\n-one\n+two\n*** End Patch\n";
    let id = apply(&ctl, repo.path(), patch);
    assert_eq!(repo.read("notes.txt"), b"two\n");
    let p = repo.path();
    // W holds the tracked change, its third parent the untracked file: the trees git makes.
    for rev in ["{}^{tree}", "{}^3^{tree}", "{}^1^{tree}", "{}^2^{tree}"] {
        let ours = git(p, &["rev-parse", &rev.replace("{}", &id)]);
        let theirs = git(twin.path(), &["rev-parse", &rev.replace("{}", "stash@{0}")]);
        assert_eq!(ours, theirs, "{rev}");
    }
    let shown = git(p, &["stash", "show", "-p", &id]);
    assert_eq!(
        shown,
        git(twin.path(), &["stash", "show", "-p", "stash@{0}"]),
        "git stash show -p prints the tracked change only, as for git's own stash"
    );

    let out = sparkctl(&ctl, p, &["stash"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(repo.read("a.txt"), b"a\n");
    assert!(
        !repo.exists("notes.txt"),
        "like `git stash -u`, the untracked file goes onto the stash"
    );
    assert_eq!(stash_list(p).len(), 1);
    assert_eq!(log(&ctl, p), [(id.clone(), "stashed".to_owned())]);

    git(p, &["stash", "pop", "-q"]);
    assert_eq!(repo.read("a.txt"), b"A\n");
    assert_eq!(repo.read("notes.txt"), b"two\n");
    assert_eq!(
        git(p, &["status", "--porcelain"]),
        " M a.txt\n?? notes.txt\n",
        "the file is untracked again, as after popping git's own stash"
    );
    assert!(stash_list(p).is_empty());

    // The record still knows the untracked file's content before the edit: undo puts it back.
    let out = sparkctl(&ctl, p, &["undo", &id], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(repo.read("a.txt"), b"a\n");
    assert_eq!(repo.read("notes.txt"), b"one\n");
    git(p, &["fsck", "--strict"]);
    assert!(ctl.run(["stop"]).status.success());
}

/// A repository with `a.txt` committed under line-ending conversion set up by `setup` (run
/// before the commit); the worktree holds `x\r\ny\r\n`, the blob `x\ny\n`.
type Setup<'a> = &'a dyn Fn(&TestRepo);

fn crlf_repo(setup: Setup<'_>) -> TestRepo {
    let repo = TestRepo::empty();
    setup(&repo);
    repo.write("a.txt", b"x\r\ny\r\n");
    repo.git(&["add", "-A"]);
    repo.git(&["commit", "-q", "-m", "initial"]);
    assert_eq!(repo.git(&["show", "HEAD:a.txt"]), "x\ny\n");
    assert_eq!(repo.git(&["status", "--porcelain"]), "");
    repo
}

#[test]
fn files_under_line_ending_conversion_are_recorded_as_git_stores_them_and_pop_cleanly() {
    let eol_attr = |r: &TestRepo| r.write(".gitattributes", b"*.txt text eol=crlf\n");
    let autocrlf = |r: &TestRepo| {
        r.git(&["config", "core.autocrlf", "true"]);
    };
    let setups: [(&str, Setup<'_>); 2] =
        [("eol=crlf", &eol_attr), ("core.autocrlf=true", &autocrlf)];
    let ctl = Ctl::new();
    for (what, setup) in setups {
        let repo = crlf_repo(setup);
        let p = repo.path();
        let twin = crlf_repo(setup);
        twin.write("a.txt", b"X\r\ny\r\n");
        twin.git(&["stash", "push", "-q"]);

        let id = apply(&ctl, p, &update("a.txt", "x", "X"));
        assert_eq!(repo.read("a.txt"), b"X\r\ny\r\n", "{what}");
        for rev in ["{}^{tree}", "{}^1^{tree}", "{}^2^{tree}"] {
            let ours = git(p, &["rev-parse", &rev.replace("{}", &id)]);
            let theirs = git(twin.path(), &["rev-parse", &rev.replace("{}", "stash@{0}")]);
            assert_eq!(ours, theirs, "{what}: {rev} is what git stash makes");
        }
        assert_eq!(
            git(p, &["rev-parse", &format!("{id}^1")]),
            git(p, &["rev-parse", "HEAD"]),
            "{what}: the record's base is HEAD itself"
        );
        assert_eq!(git(p, &["show", &format!("{id}:a.txt")]), "X\ny\n");

        let out = sparkctl(&ctl, p, &["stash"], "");
        assert!(out.status.success(), "{what}: {}", stderr(&out));
        assert_eq!(repo.read("a.txt"), b"x\r\ny\r\n", "{what}");
        assert_eq!(git(p, &["status", "--porcelain"]), "", "{what}");
        assert_eq!(stash_list(p).len(), 1);
        git(p, &["stash", "pop", "-q"]);
        assert_eq!(repo.read("a.txt"), b"X\r\ny\r\n", "{what}: popped cleanly");
        assert!(stash_list(p).is_empty());

        // The record reads back as worktree bytes: undo restores them exactly.
        let out = sparkctl(&ctl, p, &["undo", &id], "");
        assert!(out.status.success(), "{what}: {}", stderr(&out));
        assert_eq!(repo.read("a.txt"), b"x\r\ny\r\n", "{what}");
        assert_eq!(git(p, &["status", "--porcelain"]), "", "{what}");
        git(p, &["fsck", "--strict"]);
    }

    // A file routed through an external filter program is refused: spark never runs one.
    let repo = TestRepo::with_files(&[
        (".gitattributes", b"*.dat filter=rot\n"),
        ("f.dat", b"abc\n"),
    ]);
    repo.git(&["config", "filter.rot.clean", "tr a-z n-za-m"]);
    let (kind, err) = refused(
        &ctl,
        repo.path(),
        repo.path(),
        &["apply", "-"],
        &update("f.dat", "abc", "abd"),
    );
    assert_eq!(kind, "external_filter");
    assert!(err.contains("filter \"rot\""), "{err}");
    assert_eq!(repo.read("f.dat"), b"abc\n");
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn show_is_byte_identical_to_git_stash_show_for_paths_with_spaces() {
    let repo = TestRepo::with_files(&[("my file.txt", b"a\n"), ("gone x.txt", b"g\n")]);
    let ctl = Ctl::new();
    let patch = "*** Begin Patch\n*** Update File: my file.txt\n-a\n+b\n*** Delete File: gone x.txt\n*** Add File: new f.txt\n+n\n*** End Patch\n";
    let id = apply(&ctl, repo.path(), patch);
    let out = sparkctl(&ctl, repo.path(), &["show", &id], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let git_shown = git(repo.path(), &["stash", "show", "-p", &id]);
    assert!(git_shown.contains("--- a/my file.txt\t\n+++ b/my file.txt\t\n"));
    assert!(git_shown.contains("--- a/gone x.txt\t\n+++ /dev/null\n"));
    assert!(git_shown.contains("--- /dev/null\n+++ b/new f.txt\t\n"));
    assert_eq!(stdout(&out), git_shown);
    git(repo.path(), &["fsck", "--strict"]);
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn with_core_file_mode_off_records_keep_git_s_mode_and_undo_keeps_the_file_s() {
    use std::os::unix::fs::PermissionsExt as _;
    let repo = TestRepo::with_files(&[("tool.sh", b"echo hi\n")]);
    let dir = repo.path();
    // Executable in git, not on disk, and git told to ignore the executable bit.
    git(dir, &["update-index", "--chmod=+x", "tool.sh"]);
    git(dir, &["commit", "-qm", "make it executable"]);
    git(dir, &["config", "core.fileMode", "false"]);
    let mode = || {
        std::fs::metadata(dir.join("tool.sh"))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777
    };
    let before = mode();
    let ctl = Ctl::new();
    let id = apply(&ctl, dir, &update("tool.sh", "echo hi", "echo bye"));
    assert!(
        git(dir, &["ls-tree", &id, "tool.sh"]).starts_with("100755 blob "),
        "the record keeps the mode git has"
    );
    let shown = git(dir, &["stash", "show", "-p", &id]);
    assert!(!shown.contains("old mode"), "no mode change: {shown}");
    let out = sparkctl(&ctl, dir, &["undo"], "");
    assert!(out.status.success(), "undo: {}", stderr(&out));
    assert_eq!(repo.read("tool.sh"), b"echo hi\n");
    assert_eq!(mode(), before, "undo leaves the file's own mode");
    assert_eq!(git(dir, &["status", "--porcelain"]), "");
    git(dir, &["fsck", "--strict"]);
}

#[test]
fn undo_removes_the_directories_the_edit_created_once_they_are_empty() {
    let repo = TestRepo::with_files(&[("src/lib.rs", b"pub fn a() {}\n"), ("keep/x.txt", b"x\n")]);
    let dir = repo.path();
    let ctl = Ctl::new();
    apply(
        &ctl,
        dir,
        "*** Begin Patch\n*** Add File: src/deep/er/new.rs\n+pub fn b() {}\n*** Add File: keep/y.txt\n+y\n*** End Patch\n",
    );
    assert!(dir.join("src/deep/er/new.rs").is_file());
    let out = sparkctl(&ctl, dir, &["undo"], "");
    assert!(out.status.success(), "undo: {}", stderr(&out));
    assert!(
        !dir.join("src/deep").exists(),
        "the directories the edit made are gone"
    );
    assert!(
        dir.join("src/lib.rs").is_file(),
        "a directory that still holds files stays"
    );
    assert!(dir.join("keep/x.txt").is_file() && !dir.join("keep/y.txt").exists());
    assert_eq!(git(dir, &["status", "--porcelain"]), "");
}

#[test]
fn show_of_a_move_is_byte_identical_to_git_stash_show_with_its_similarity_index() {
    let repo = TestRepo::with_files(&[("old name.txt", b"a\nb\nc\nd\ne\nf\n")]);
    let dir = repo.path();
    let ctl = Ctl::new();
    let id = apply(
        &ctl,
        dir,
        "*** Begin Patch\n*** Update File: old name.txt\n*** Move to: new name.txt\n@@\n-c\n+C\n*** End Patch\n",
    );
    let out = sparkctl(&ctl, dir, &["show", &id], "");
    assert!(out.status.success(), "show: {}", stderr(&out));
    let git_shows = git(dir, &["stash", "show", "-p", &id]);
    assert!(git_shows.contains("similarity index 83%\n"), "{git_shows}");
    assert_eq!(stdout(&out), git_shows);
}

/// The `index` lines of a unified diff.
fn index_lines(diff: &str) -> Vec<&str> {
    diff.lines().filter(|l| l.starts_with("index ")).collect()
}

#[test]
fn the_diff_apply_prints_abbreviates_blob_ids_as_git_stash_show_does() {
    let repo = TestRepo::with_files(&[("a.txt", b"a\n"), ("gone.txt", b"g\n")]);
    git(repo.path(), &["config", "core.abbrev", "12"]);
    let ctl = Ctl::new();
    let patch = "*** Begin Patch\n*** Update File: a.txt\n-a\n+b\n*** Delete File: gone.txt\n*** Add File: new.txt\n+n\n*** End Patch\n";
    let out = sparkctl(&ctl, repo.path(), &["--json", "apply", "-"], patch);
    assert!(out.status.success(), "apply: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let printed = v["diff"].as_str().expect("diff").to_owned();
    let id = v["edit"].as_str().expect("edit id");
    let git_shown = git(repo.path(), &["stash", "show", "-p", id]);
    let mut expected = index_lines(&git_shown);
    let mut got = index_lines(&printed);
    expected.sort_unstable();
    got.sort_unstable();
    assert_eq!(got.len(), 3, "{printed}");
    assert_eq!(
        got, expected,
        "apply printed:\n{printed}\ngit shows:\n{git_shown}"
    );
    assert!(got.contains(&"index 000000000000..8ba3a16384aa"), "{got:?}");
    assert!(ctl.run(["stop"]).status.success());
}
