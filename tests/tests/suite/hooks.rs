//! Git hooks with the real git CLI: `sparkctl hooks install | uninstall | status`, the drafted
//! commit message over the daemon (and its guards), chaining and byte-for-byte restore of the
//! hooks that were there, `core.hooksPath`, and hooks that stay harmless when spark is absent.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use spark_tests::fake_provider::{Script, Turn};
use spark_tests::{
    Home, Provider, TestRepo, bin, hermetic, hermetic_git, snapshot, stderr, stdout,
};

const DRAFT: &str = "Greet the whole world\n\nThe greeting now names everyone it is meant for.";

/// A directory holding only a `sparkctl` link, to put first on PATH as an installed one would be.
struct PathDir {
    dir: tempfile::TempDir,
}

impl PathDir {
    fn with_sparkctl() -> PathDir {
        let dir = tempfile::Builder::new()
            .prefix("bin")
            .tempdir_in("/tmp")
            .expect("temp bin dir");
        std::os::unix::fs::symlink(bin("sparkctl"), dir.path().join("sparkctl"))
            .expect("link sparkctl");
        PathDir { dir }
    }

    fn path_var(&self) -> String {
        format!("{}:/usr/local/bin:/usr/bin:/bin", self.dir.path().display())
    }
}

/// `git` in `repo` as a user runs it: hermetic config, spark's home, the given PATH.
fn git(repo: &Path, home: &Path, path_var: &str) -> Command {
    let mut cmd = hermetic_git(repo);
    for var in [
        "SPARK_SOCKET",
        "SPARK_PROVIDER_URL",
        "SPARK_MODEL",
        "SPARK_API_KEY",
        "OPENAI_API_KEY",
        "GIT_EDITOR",
        "EDITOR",
        "VISUAL",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("SPARK_HOME", home)
        .env("HOME", home)
        .env("PATH", path_var);
    cmd
}

/// `sparkctl args…` run in `dir`.
fn sparkctl(dir: &Path, home: &Path, args: &[&str]) -> Output {
    let out = hermetic(&mut Command::new(bin("sparkctl")))
        .current_dir(dir)
        .env("SPARK_HOME", home)
        .args(args)
        .output()
        .expect("run sparkctl");
    assert!(out.status.success(), "sparkctl {args:?}: {}", stderr(&out));
    out
}

fn head_message(repo: &TestRepo) -> String {
    repo.git(&["log", "-1", "--format=%B"]).trim().to_owned()
}

fn stage_change_and_secret(repo: &TestRepo) {
    repo.write("hello.txt", b"hello, world\n");
    repo.write(".env", b"API_TOKEN=hunter2-very-secret\n");
    repo.git(&["add", "-f", "hello.txt", ".env"]);
}

fn hooks_dir(repo: &TestRepo) -> PathBuf {
    repo.path().join(".git/hooks")
}

#[test]
fn a_commit_written_from_scratch_gets_the_drafted_message_without_secrets() {
    let provider = Provider::start(Script::new().turn(Turn::text(DRAFT)));
    let daemon = provider.daemon(true);
    let bin_dir = PathDir::with_sparkctl();
    let repo = TestRepo::with_files(&[("hello.txt", b"hello\n")]);
    sparkctl(repo.path(), daemon.home.path(), &["hooks", "install"]);
    stage_change_and_secret(&repo);

    let out = git(repo.path(), daemon.home.path(), &bin_dir.path_var())
        .env("GIT_EDITOR", "true")
        .args(["commit", "-q"])
        .output()
        .expect("git commit");
    assert!(out.status.success(), "commit failed: {}", stderr(&out));
    assert_eq!(head_message(&repo), DRAFT);

    let requests = provider.wait_for_requests(1);
    let sent: String = requests.iter().map(|r| r.raw.as_str()).collect();
    assert!(
        sent.contains("+hello, world"),
        "the staged diff is sent: {sent}"
    );
    assert!(sent.contains("-hello"), "{sent}");
    assert!(
        !sent.contains("hunter2"),
        "a staged secret never leaves: {sent}"
    );
    assert!(!sent.contains("API_TOKEN"), "{sent}");
    // Its own conversation: no outline or apply_patch tool of the ask conversation.
    assert!(!sent.contains("apply_patch"), "{sent}");
}

#[test]
fn a_message_given_with_dash_m_is_left_alone_and_nothing_is_sent() {
    let provider = Provider::start(Script::new().default_turn(Turn::text(DRAFT)));
    let daemon = provider.daemon(true);
    let bin_dir = PathDir::with_sparkctl();
    let repo = TestRepo::with_files(&[("hello.txt", b"hello\n")]);
    sparkctl(repo.path(), daemon.home.path(), &["hooks", "install"]);
    stage_change_and_secret(&repo);

    let out = git(repo.path(), daemon.home.path(), &bin_dir.path_var())
        .args(["commit", "-q", "-m", "my own words"])
        .output()
        .expect("git commit");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(head_message(&repo), "my own words");
    assert_eq!(stderr(&out), "", "a hook with nothing to do says nothing");
    // The hook has returned: had it asked, the request would be recorded already.
    assert!(provider.fake.requests().is_empty());
}

#[test]
fn an_unreachable_provider_leaves_the_message_as_git_made_it_within_the_cap() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let home = Home::new();
    std::fs::write(home.path().join("config.toml"), "hook_timeout_ms = 1500\n").expect("config");
    let mut config = home.config();
    config.provider_url = format!("ws://127.0.0.1:{port}/v1/responses");
    config.fsync = false;
    assert_eq!(config.hook_timeout, Duration::from_millis(1500));
    let daemon = spark_tests::InProcess::start_with(home, config);
    let bin_dir = PathDir::with_sparkctl();
    let repo = TestRepo::with_files(&[("hello.txt", b"hello\n")]);
    sparkctl(repo.path(), daemon.home.path(), &["hooks", "install"]);
    stage_change_and_secret(&repo);

    let started = Instant::now();
    let out = git(repo.path(), daemon.home.path(), &bin_dir.path_var())
        .env("GIT_EDITOR", "echo typed by hand >>")
        .args(["commit", "-q"])
        .output()
        .expect("git commit");
    let took = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(head_message(&repo), "typed by hand");
    assert!(
        took < Duration::from_millis(1500 + 2000),
        "the cap holds: {took:?}"
    );
    let err = stderr(&out);
    assert_eq!(
        err.lines()
            .filter(|l| l.starts_with("spark: no drafted commit message"))
            .count(),
        1,
        "one line says why: {err}"
    );
}

#[test]
fn an_existing_hook_is_chained_and_restored_byte_for_byte_with_its_mode() {
    let home = Home::new();
    let bin_dir = PathDir::with_sparkctl();
    let repo = TestRepo::with_files(&[("hello.txt", b"hello\n")]);
    let hook = hooks_dir(&repo).join("prepare-commit-msg");
    std::fs::write(
        &hook,
        b"#!/bin/sh\necho \"team hook ran for $2\" >&2\nexit 3\n",
    )
    .expect("write hook");
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let before = snapshot(&hooks_dir(&repo));

    sparkctl(repo.path(), home.path(), &["hooks", "install"]);
    let installed = snapshot(&hooks_dir(&repo));
    assert_ne!(installed, before);
    sparkctl(repo.path(), home.path(), &["hooks", "install"]);
    assert_eq!(
        snapshot(&hooks_dir(&repo)),
        installed,
        "installing twice changes nothing"
    );
    let status = stdout(&sparkctl(repo.path(), home.path(), &["hooks", "status"]));
    assert!(status.contains("prepare-commit-msg"), "{status}");
    assert!(status.contains("after the hook that was there"), "{status}");
    assert!(
        status.contains(&hooks_dir(&repo).display().to_string()),
        "{status}"
    );

    // The old hook still runs first, with its output, and its failure still fails the commit.
    repo.write("hello.txt", b"hello again\n");
    repo.git(&["add", "hello.txt"]);
    let out = git(repo.path(), home.path(), &bin_dir.path_var())
        .args(["commit", "-q", "-m", "blocked"])
        .output()
        .expect("git commit");
    assert!(
        !out.status.success(),
        "the chained hook's failure fails the commit"
    );
    assert!(
        stderr(&out).contains("team hook ran for message"),
        "{}",
        stderr(&out)
    );
    assert_eq!(head_message(&repo), "initial");

    sparkctl(repo.path(), home.path(), &["hooks", "uninstall"]);
    assert_eq!(
        snapshot(&hooks_dir(&repo)),
        before,
        "restored byte for byte, with its mode"
    );
}

#[test]
fn a_core_hooks_path_setup_is_chained_and_restored() {
    let home = Home::new();
    let bin_dir = PathDir::with_sparkctl();
    let repo = TestRepo::with_files(&[("hello.txt", b"hello\n")]);
    repo.git(&["config", "core.hooksPath", ".husky"]);
    let husky = repo.path().join(".husky");
    std::fs::create_dir(&husky).expect("mkdir .husky");
    std::fs::write(
        husky.join("post-checkout"),
        b"#!/bin/sh\necho \"$3\" > checkout-seen\n",
    )
    .expect("write hook");
    std::fs::set_permissions(
        husky.join("post-checkout"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let before = snapshot(&husky);

    sparkctl(repo.path(), home.path(), &["hooks", "install"]);
    assert!(
        !hooks_dir(&repo).join("post-checkout").exists(),
        "nothing goes where git does not look"
    );
    assert!(husky.join("prepare-commit-msg").exists());

    // No daemon runs: the chained hook works and spark's part stays silent.
    let out = git(repo.path(), home.path(), &bin_dir.path_var())
        .args(["checkout", "-q", "-b", "topic"])
        .output()
        .expect("git checkout");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(repo.read("checkout-seen"), b"1\n");
    assert_eq!(stderr(&out), "");

    sparkctl(repo.path(), home.path(), &["hooks", "uninstall"]);
    assert_eq!(snapshot(&husky), before);
}

#[test]
fn prepare_commit_msg_starts_sparkctl_only_for_a_message_written_from_scratch() {
    let home = Home::new();
    let repo = TestRepo::with_files(&[("hello.txt", b"hello\n")]);
    sparkctl(repo.path(), home.path(), &["hooks", "install"]);
    // A stand-in `sparkctl` on PATH that only records how it was called: the hook waits for
    // it, so once git returns every call it made is in the log.
    let bin_dir = tempfile::Builder::new()
        .prefix("bin")
        .tempdir_in("/tmp")
        .expect("temp bin dir");
    let calls = bin_dir.path().join("calls.log");
    let stand_in = bin_dir.path().join("sparkctl");
    std::fs::write(
        &stand_in,
        format!("#!/bin/sh\necho \"$1 $2\" >>'{}'\n", calls.display()),
    )
    .expect("write stand-in");
    std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path_var = format!("{}:/usr/local/bin:/usr/bin:/bin", bin_dir.path().display());
    // (`--amend` also runs `post-rewrite`, whose call is in the background: not counted.)
    let calls_so_far = || {
        std::fs::read_to_string(&calls)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("prepare-commit-msg"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };

    repo.write("hello.txt", b"hello, world\n");
    repo.git(&["add", "hello.txt"]);
    let commit = |args: &[&str]| {
        let out = git(repo.path(), home.path(), &path_var)
            .env("GIT_EDITOR", "echo typed by hand >>")
            .args(args)
            .output()
            .expect("git commit");
        assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
    };
    commit(&["commit", "-q", "-m", "my own words"]);
    commit(&["commit", "-q", "--amend", "--no-edit"]);
    commit(&["commit", "-q", "--allow-empty", "-F", "hello.txt"]);
    assert_eq!(calls_so_far(), "", "-m, --amend and -F start no sparkctl");

    commit(&["commit", "-q", "--allow-empty"]);
    assert_eq!(calls_so_far(), "hook prepare-commit-msg\n");
    assert_eq!(head_message(&repo), "typed by hand");
}

#[test]
fn hooks_are_harmless_when_sparkctl_is_missing() {
    let home = Home::new();
    let repo = TestRepo::with_files(&[("hello.txt", b"hello\n")]);
    sparkctl(repo.path(), home.path(), &["hooks", "install"]);
    stage_change_and_secret(&repo);
    let no_spark = "/usr/local/bin:/usr/bin:/bin";

    let out = git(repo.path(), home.path(), no_spark)
        .env("GIT_EDITOR", "echo typed by hand >>")
        .args(["commit", "-q"])
        .output()
        .expect("git commit");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    assert_eq!(head_message(&repo), "typed by hand");
    let out = git(repo.path(), home.path(), no_spark)
        .args(["checkout", "-q", "-b", "topic"])
        .output()
        .expect("git checkout");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    assert!(
        !home.layout().socket.exists(),
        "a hook never starts a daemon"
    );
}

/// A stand-in daemon on the socket: answers `initialize`, records every other request, answers
/// it with `result`.
fn fake_daemon(
    home: &Home,
    result: serde_json::Value,
) -> std::sync::mpsc::Receiver<serde_json::Value> {
    use std::io::{BufRead, BufReader, Write};
    let socket = home.layout().socket;
    let dir = socket.parent().expect("socket dir");
    std::fs::create_dir_all(dir).expect("socket dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut writer = conn.try_clone().expect("clone");
            for line in BufReader::new(conn).lines() {
                let Ok(line) = line else { break };
                let req: serde_json::Value = serde_json::from_str(&line).expect("json request");
                let answer = if req["method"] == "initialize" {
                    serde_json::json!({"protocol_version": spark_proto::PROTOCOL_VERSION,
                        "daemon_version": sparkctl::VERSION, "pid": std::process::id()})
                } else {
                    if tx.send(req.clone()).is_err() {
                        return;
                    }
                    result.clone()
                };
                let reply =
                    serde_json::json!({"jsonrpc": "2.0", "id": req["id"], "result": answer});
                if writeln!(writer, "{reply}").is_err() {
                    break;
                }
            }
        }
    });
    rx
}

#[test]
fn checkout_merge_and_rebase_tell_a_running_daemon_to_refresh() {
    let home = Home::new();
    let bin_dir = PathDir::with_sparkctl();
    let repo = TestRepo::with_files(&[("hello.txt", b"hello\n")]);
    sparkctl(repo.path(), home.path(), &["hooks", "install"]);
    let requests = fake_daemon(
        &home,
        serde_json::json!({"repo": repo.cwd(), "was_watched": true}),
    );
    let repo_dir = std::fs::canonicalize(repo.path()).expect("canonical");
    let expect_refresh = |what: &str| {
        let req = requests
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{what} sent no refresh"));
        assert_eq!(req["method"], "refresh", "{what}: {req}");
        let dir = PathBuf::from(req["params"]["dir"].as_str().expect("dir"));
        assert_eq!(std::fs::canonicalize(dir).expect("dir"), repo_dir, "{what}");
    };

    let run = |args: &[&str]| {
        let out = git(repo.path(), home.path(), &bin_dir.path_var())
            .args(args)
            .output()
            .expect("git");
        assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out), "", "git {args:?}");
    };
    run(&["checkout", "-q", "-b", "topic"]);
    expect_refresh("checkout");
    repo.write("hello.txt", b"hello, topic\n");
    run(&["commit", "-q", "-am", "topic"]);
    run(&["checkout", "-q", "main"]);
    expect_refresh("checkout back");
    run(&["merge", "-q", "--ff-only", "topic"]);
    expect_refresh("merge");
    run(&["commit", "-q", "--amend", "-m", "topic, amended"]);
    expect_refresh("amend (post-rewrite)");
    assert!(
        requests.try_recv().is_err(),
        "`-m` commits ask for no draft, and each hook refreshes once"
    );
}

#[test]
fn a_linked_worktree_installs_into_the_shared_hooks() {
    let home = Home::new();
    let repo = TestRepo::with_files(&[("hello.txt", b"hello\n")]);
    let linked = tempfile::Builder::new()
        .prefix("wt")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let linked_path = linked.path().join("linked");
    repo.git(&[
        "worktree",
        "add",
        "-q",
        linked_path.to_str().expect("utf-8"),
        "-b",
        "side",
    ]);
    sparkctl(&linked_path, home.path(), &["hooks", "install"]);
    let wrapper = std::fs::read_to_string(hooks_dir(&repo).join("post-checkout")).expect("hook");
    assert!(wrapper.contains("sparkctl hook post-checkout"), "{wrapper}");
    let status = stdout(&sparkctl(repo.path(), home.path(), &["hooks", "status"]));
    assert!(status.contains("post-checkout"), "{status}");
    assert!(!status.contains("not installed"), "{status}");
}

#[test]
fn a_template_gets_the_draft_above_it_and_an_amend_is_left_alone() {
    let provider = Provider::start(Script::new().turn(Turn::text(DRAFT)));
    let daemon = provider.daemon(true);
    let bin_dir = PathDir::with_sparkctl();
    let repo = TestRepo::with_files(&[("hello.txt", b"hello\n")]);
    sparkctl(repo.path(), daemon.home.path(), &["hooks", "install"]);
    repo.write(".git/msg-template", b"\n# Ticket: \n");
    stage_change_and_secret(&repo);

    // The editor keeps the file as the hook left it.
    let out = git(repo.path(), daemon.home.path(), &bin_dir.path_var())
        .env(
            "GIT_EDITOR",
            "cp \"$PWD/.git/COMMIT_EDITMSG\" \"$PWD/.git/seen-by-editor\"; true",
        )
        .args(["commit", "-q", "-t", ".git/msg-template"])
        .output()
        .expect("git commit");
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = String::from_utf8(repo.read(".git/seen-by-editor")).expect("utf-8");
    assert!(
        seen.starts_with(&format!("{DRAFT}\n\n# Ticket: \n")),
        "{seen}"
    );
    assert_eq!(head_message(&repo), DRAFT);
    assert_eq!(provider.wait_for_requests(1).len(), 1);

    let out = git(repo.path(), daemon.home.path(), &bin_dir.path_var())
        .env("GIT_EDITOR", "true")
        .args(["commit", "-q", "--amend"])
        .output()
        .expect("git commit --amend");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(head_message(&repo), DRAFT, "the amended message is kept");
    assert_eq!(
        provider.fake.requests().len(),
        1,
        "an amend asks for no draft"
    );
}

#[test]
fn install_outside_a_repository_is_refused_with_a_hint_and_writes_nothing() {
    let home = Home::new();
    let dir = tempfile::Builder::new()
        .prefix("norepo")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let before = snapshot(dir.path());
    let out = hermetic(&mut Command::new(bin("sparkctl")))
        .current_dir(dir.path())
        .env("SPARK_HOME", home.path())
        .env("GIT_CEILING_DIRECTORIES", "/tmp")
        .args(["hooks", "install"])
        .output()
        .expect("run sparkctl");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("is not in a git repository"), "{err}");
    assert!(err.contains("\nhint: "), "{err}");
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn without_an_api_key_the_commit_goes_ahead_with_one_line_saying_why() {
    let home = Home::new();
    let mut config = home.config();
    config.provider_url = "wss://provider.invalid/v1/responses".into();
    config.api_key = None;
    config.fsync = false;
    let daemon = spark_tests::InProcess::start_with(home, config);
    let bin_dir = PathDir::with_sparkctl();
    let repo = TestRepo::with_files(&[("hello.txt", b"hello\n")]);
    sparkctl(repo.path(), daemon.home.path(), &["hooks", "install"]);
    stage_change_and_secret(&repo);

    let out = git(repo.path(), daemon.home.path(), &bin_dir.path_var())
        .env("GIT_EDITOR", "echo typed by hand >>")
        .args(["commit", "-q"])
        .output()
        .expect("git commit");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(head_message(&repo), "typed by hand");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("spark: no drafted commit message: no API key"),
        "{err}"
    );
}
