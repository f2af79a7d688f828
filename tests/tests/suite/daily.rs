//! Daily use through the real binaries: the asking shell's provider settings, a missing key
//! named before anything connects, and output shaped like git's.

use serde_json::Value;
use spark_tests::fake_provider::{Script, Turn};
use spark_tests::{Ctl, Provider, TestRepo, stderr, stdout, worktree_snapshot};

const LIB: &str = "fn one() {\n    1\n}\n";
const PATCH_ONE: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn one() {\n-    1\n+    100\n*** End Patch\n";

fn repo() -> TestRepo {
    TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())])
}

/// `sparkctl args…` in `dir` with these extra environment variables.
fn run_in(
    ctl: &Ctl,
    dir: &std::path::Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> std::process::Output {
    let mut cmd = ctl.command("sparkctl");
    cmd.current_dir(dir).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run sparkctl")
}

#[test]
fn an_ask_without_a_key_for_a_remote_provider_names_the_missing_key_and_connects_nowhere() {
    let ctl = Ctl::new();
    let repo = repo();
    let before = worktree_snapshot(repo.path());
    // A provider that is not on this machine; `.invalid` never resolves, so a connection
    // attempt would fail with a different error (and later).
    let env = [(
        "SPARK_PROVIDER_URL",
        "wss://api.spark-test.invalid/v1/responses",
    )];
    let out = run_in(&ctl, repo.path(), &env, &["ask", "make", "one", "bigger"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("sparkctl: error: no API key for wss://api.spark-test.invalid/v1/responses"),
        "{err}"
    );
    assert!(
        err.contains("\nhint: set SPARK_API_KEY (or OPENAI_API_KEY)"),
        "{err}"
    );
    assert_eq!(worktree_snapshot(repo.path()), before, "nothing written");

    let out = run_in(&ctl, repo.path(), &env, &["--json", "ask", "again"]);
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_str(stdout(&out).trim()).expect("json error");
    assert_eq!(v["error"]["kind"], "no_api_key", "{v}");

    // A URL no transport speaks is the request's fault: exit 1, with the same kind of hint.
    let bad = [("SPARK_PROVIDER_URL", "ftp://models.example/v1")];
    let out = run_in(&ctl, repo.path(), &bad, &["ask", "again"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("must start with ws://, wss://, http:// or https://"),
        "{err}"
    );
    assert!(
        err.contains("\nhint: set SPARK_PROVIDER_URL to a ws://"),
        "{err}"
    );

    // No session was ever opened for it.
    let out = run_in(&ctl, repo.path(), &[], &["--json", "status"]);
    let status: Value = serde_json::from_str(stdout(&out).trim()).expect("status");
    assert_eq!(status["sessions"], Value::Array(vec![]), "{status}");
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn a_provider_on_a_loopback_address_is_asked_without_a_key() {
    let p = Provider::start(
        Script::new()
            .keyless()
            .turns([Turn::apply_patch(PATCH_ONE)]),
    );
    let ctl = Ctl::new();
    let repo = repo();
    let url = p.fake.ws_url();
    let out = run_in(
        &ctl,
        repo.path(),
        &[("SPARK_PROVIDER_URL", &url)],
        &["ask", "make one bigger"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(repo.read("src/lib.rs"), b"fn one() {\n    100\n}\n");
    let heads = p.fake.heads();
    assert!(!heads.is_empty(), "the provider was asked");
    assert!(
        heads.iter().all(|h| h.header("authorization").is_none()),
        "no key was invented: {heads:?}"
    );
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn the_asking_shell_s_provider_settings_win_over_the_daemon_s() {
    let a = Provider::start(Script::new().default_turn(Turn::apply_patch(PATCH_ONE)));
    let b = Provider::start(Script::new().default_turn(Turn::apply_patch(PATCH_ONE)));
    let ctl = Ctl::new();
    let repo = repo();
    let (url_a, url_b) = (a.fake.ws_url(), b.fake.ws_url());
    // The daemon starts in a shell set up for provider A.
    let shell_a = [
        ("SPARK_PROVIDER_URL", url_a.as_str()),
        ("SPARK_API_KEY", "sk-daemon-a"),
    ];
    let out = run_in(&ctl, repo.path(), &shell_a, &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Another shell points at B with its own key and model, and asks.
    let shell_b = [
        ("SPARK_PROVIDER_URL", url_b.as_str()),
        ("SPARK_API_KEY", "sk-shell-b-secret"),
        ("SPARK_MODEL", "model-b"),
    ];
    let out = run_in(&ctl, repo.path(), &shell_b, &["ask", "make one bigger"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(repo.read("src/lib.rs"), b"fn one() {\n    100\n}\n");
    let turns: Vec<_> = b
        .fake
        .requests()
        .into_iter()
        .filter(|r| !r.is_prewarm())
        .collect();
    assert_eq!(turns.len(), 1, "B got the ask");
    assert_eq!(turns[0].json["model"], "model-b");
    assert!(
        b.fake
            .heads()
            .iter()
            .all(|h| h.header("authorization") == Some("Bearer sk-shell-b-secret")),
        "B got the shell's key"
    );
    assert!(a.fake.requests().is_empty(), "A was not asked");
    assert!(a.fake.heads().is_empty(), "A was not even connected to");

    // A shell that sets nothing gets the daemon's own provider.
    repo.git(&["checkout", "--", "src/lib.rs"]);
    let out = run_in(&ctl, repo.path(), &[], &["ask", "--new", "make one bigger"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        a.fake.requests().iter().any(|r| !r.is_prewarm()),
        "the daemon's settings apply where the shell sets none"
    );
    assert!(
        a.fake
            .heads()
            .iter()
            .all(|h| h.header("authorization") == Some("Bearer sk-daemon-a"))
    );

    // `status` names each session's provider, never a key.
    let out = run_in(&ctl, repo.path(), &[], &["status"]);
    let text = stdout(&out);
    assert!(text.contains(&format!("{url_b} (model-b)")), "{text}");
    assert!(text.contains(&url_a), "{text}");
    let out = run_in(&ctl, repo.path(), &[], &["--json", "status"]);
    let json = stdout(&out);
    let status: Value = serde_json::from_str(json.trim()).expect("status");
    let providers: Vec<&str> = status["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(|s| s["provider"].as_str())
        .collect();
    assert!(providers.contains(&url_b.as_str()), "{status}");
    assert!(providers.contains(&url_a.as_str()), "{status}");
    assert!(ctl.run(["stop"]).status.success());
    // The key went over the socket only: not in any output, and in no file the daemon wrote
    // (its debug log, state and cache) nor in the repository's records.
    for text in [&text, &json] {
        assert!(
            !text.contains("sk-shell-b-secret"),
            "the key leaked: {text}"
        );
    }
    let log = std::fs::read_to_string(ctl.home.layout().log_file).expect("daemon log");
    assert!(
        log.contains("context sent to the provider"),
        "the asks were logged: {log}"
    );
    for dir in [ctl.home.path(), repo.path()] {
        for (path, (_, bytes)) in spark_tests::snapshot(dir) {
            assert!(
                !bytes.windows(17).any(|w| w == b"sk-shell-b-secret"),
                "the key was written to {path}"
            );
        }
    }
}

const PATCH_TWO_FILES: &str = "*** Begin Patch\n*** Add File: notes.txt\n+a note\n*** End Patch\n";

/// Run `sparkctl args…` under a pseudo-terminal (util-linux `script`), so that its standard
/// output is a terminal as in an interactive shell.
fn run_on_terminal(
    ctl: &Ctl,
    dir: &std::path::Path,
    env: &[(&str, &str)],
    args: &str,
) -> std::process::Output {
    let sparkctl = spark_tests::bin("sparkctl");
    let mut cmd = ctl.command("sparkctl");
    let mut script = std::process::Command::new("script");
    script
        .env_clear()
        .envs(
            cmd.get_envs()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
        )
        .env("TERM", "xterm")
        .current_dir(dir)
        .args([
            "-qec",
            &format!("{} {args}", sparkctl.display()),
            "/dev/null",
        ]);
    for (k, v) in env {
        script.env(k, v);
    }
    // `cmd` only lent its hermetic environment.
    cmd.env_clear();
    script.output().expect("run script")
}

#[test]
fn log_lines_up_its_columns_and_names_edits_reverted_outside_spark() {
    let ctl = Ctl::new();
    let repo = repo();
    let apply = |patch: &str, msg: &str| {
        let mut cmd = ctl.command("sparkctl");
        cmd.current_dir(repo.path())
            .args(["apply", "-m", msg])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(patch.as_bytes())
            .expect("patch");
        let out = child.wait_with_output().expect("apply");
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    };
    apply(PATCH_ONE, "one bigger");
    apply(PATCH_TWO_FILES, "a note");
    // Age the first edit by 17m 55s in the ledger, so the ages differ in width.
    let ledger = repo.path().join(".git/spark/ledger.jsonl");
    let text = std::fs::read_to_string(&ledger).expect("ledger");
    let mut lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("ledger line"))
        .collect();
    let at = lines[0]["at"].as_u64().expect("at");
    lines[0]["at"] = Value::from(at - (17 * 60 + 55) * 1000);
    let aged: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&ledger, aged).expect("write ledger");

    // The user reverts the first edit with git.
    repo.git(&["checkout", "--", "src/lib.rs"]);
    let out = run_in(&ctl, repo.path(), &[], &["log"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("  applied  ") && lines[0].contains("a note"),
        "{text}"
    );
    assert!(
        lines[1].contains("17m 55s ago  reverted outside spark  one bigger"),
        "{text}"
    );
    // Every column starts at the same place on every line.
    for col in ["ago  ", "  a note", "  one bigger"] {
        let at: Vec<Option<usize>> = lines.iter().map(|l| l.find(col)).collect();
        let found: Vec<usize> = at.iter().flatten().copied().collect();
        assert!(
            found.windows(2).all(|w| w[0] == w[1]),
            "{col:?} not aligned:\n{text}"
        );
    }
    let ago = lines[0].find("ago").expect("age");
    assert_eq!(
        lines[1].find("ago"),
        Some(ago),
        "ages end together:\n{text}"
    );
    let msg0 = lines[0].find("a note").expect("message");
    assert_eq!(
        lines[1].find("one bigger"),
        Some(msg0),
        "messages line up:\n{text}"
    );

    let out = run_in(&ctl, repo.path(), &[], &["--json", "log"]);
    let v: Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    assert_eq!(v["edits"][0]["state"], "applied");
    assert_eq!(v["edits"][1]["state"], "reverted_outside");
    let id = v["edits"][1]["id"].as_str().expect("id").to_owned();
    let out = run_in(&ctl, repo.path(), &[], &["--json", "show", &id]);
    let shown: Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    assert_eq!(
        shown["entry"]["state"], "reverted_outside",
        "show agrees with log"
    );

    // Changed further since, it is applied again in part: no longer called reverted.
    repo.write("src/lib.rs", b"fn one() {\n    7\n}\n");
    let out = run_in(&ctl, repo.path(), &[], &["--json", "log"]);
    let v: Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    assert_eq!(v["edits"][1]["state"], "applied");
    // A deleted added file is a reverted addition.
    std::fs::remove_file(repo.path().join("notes.txt")).expect("rm");
    let out = run_in(&ctl, repo.path(), &[], &["--json", "log"]);
    let v: Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    assert_eq!(v["edits"][0]["state"], "reverted_outside");
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn color_follows_the_flag_and_no_color_and_long_output_pages_only_on_a_terminal() {
    let ctl = Ctl::new();
    let repo = repo();
    let mut cmd = ctl.command("sparkctl");
    cmd.current_dir(repo.path())
        .args(["apply", "-m", "one bigger", "-"])
        .stdin(std::process::Stdio::piped());
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(PATCH_ONE.as_bytes())
        .expect("patch");
    assert!(child.wait().expect("apply").success());

    // A pipe: plain text and no pager, unless asked for colour.
    let paged = tempfile::tempdir().expect("tempdir");
    let sink = paged.path().join("paged");
    let pager = format!("cat > {}", sink.display());
    let env = [("SPARK_PAGER", pager.as_str())];
    let out = run_in(&ctl, repo.path(), &env, &["show"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("+    100"), "{}", stdout(&out));
    assert!(!stdout(&out).contains('\x1b'), "no colour into a pipe");
    assert!(!sink.exists(), "no pager into a pipe");
    let out = run_in(&ctl, repo.path(), &env, &["--color=always", "show"]);
    assert!(
        stdout(&out).contains("\x1b[32m+    100\x1b[0m"),
        "{}",
        stdout(&out)
    );
    let out = run_in(&ctl, repo.path(), &[("NO_COLOR", "1")], &["--color", "log"]);
    assert!(
        stdout(&out).contains("\x1b[33m"),
        "a bare --color is always"
    );

    // A terminal: `show` goes through SPARK_PAGER, coloured.
    let out = run_on_terminal(&ctl, repo.path(), &env, "show");
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = std::fs::read_to_string(&sink).expect("the pager got the diff");
    assert!(shown.contains("\x1b[32m+    100\x1b[0m"), "{shown:?}");
    assert!(
        !stdout(&out).contains("+    100"),
        "it went to the pager only"
    );
    // NO_COLOR, and PAGER when SPARK_PAGER is unset.
    std::fs::remove_file(&sink).expect("rm");
    let env = [("PAGER", pager.as_str()), ("NO_COLOR", "1")];
    let out = run_on_terminal(&ctl, repo.path(), &env, "log");
    assert!(out.status.success(), "{}", stderr(&out));
    let logged = std::fs::read_to_string(&sink).expect("the pager got the log");
    assert!(logged.contains("applied  one bigger"), "{logged:?}");
    assert!(!logged.contains('\x1b'), "NO_COLOR: {logged:?}");
    // `--color=never` on a terminal, and `cat` as the pager means none.
    let env = [("SPARK_PAGER", "cat")];
    let out = run_on_terminal(&ctl, repo.path(), &env, "--color=never show");
    assert!(stdout(&out).contains("+    100"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("\x1b[32m"), "{}", stdout(&out));
    assert!(ctl.run(["stop"]).status.success());
}

/// The unit `sparkctl service install` writes for this harness's daemon, from a shell where
/// `XDG_CONFIG_HOME` is `config` (if set): the service gets the variables its paths derive from.
fn expected_unit(ctl: &Ctl, config: Option<&std::path::Path>) -> String {
    let sparkd = std::fs::canonicalize(spark_tests::bin("sparkd")).expect("sparkd");
    let config = config
        .map(|c| format!("Environment=XDG_CONFIG_HOME={}\n", c.display()))
        .unwrap_or_default();
    format!(
        "# Written by `sparkctl service install`; `sparkctl service uninstall` removes it.\n\
         [Unit]\n\
         Description=spark daemon: warm model sessions and journaled code edits\n\
         \n\
         [Service]\n\
         Type=simple\n\
         Environment=SPARK_HOME={home}\n\
         {config}\
         ExecStart={sparkd} --socket {socket} --idle-timeout 0\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         RestartPreventExitStatus=1\n\
         TimeoutStopSec=15\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n",
        home = ctl.home.path().display(),
        sparkd = sparkd.display(),
        socket = ctl.home.layout().socket.display(),
    )
}

#[test]
fn service_install_writes_the_systemd_unit_under_xdg_config_home_and_uninstall_removes_it() {
    let ctl = Ctl::new();
    let config = tempfile::tempdir().expect("config home");
    // A PATH without systemctl: the user is told what to run instead, nothing is called.
    let empty_path = tempfile::tempdir().expect("empty PATH dir");
    let service = |args: &[&str]| {
        ctl.command("sparkctl")
            .env("XDG_CONFIG_HOME", config.path())
            .env("PATH", empty_path.path())
            .arg("service")
            .args(args)
            .output()
            .expect("run sparkctl service")
    };
    let unit = config.path().join("systemd/user/sparkd.service");

    let out = service(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("sparkd.service is not installed"),
        "{}",
        stdout(&out)
    );

    let out = service(&["install"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "installed {}\nsystemctl not found; to start it now and at every login, run: \
             systemctl --user daemon-reload && systemctl --user enable sparkd.service && \
             systemctl --user restart sparkd.service\n",
            unit.display()
        )
    );
    assert_eq!(
        std::fs::read_to_string(&unit).expect("unit"),
        expected_unit(&ctl, Some(config.path()))
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&unit).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o644);
    let out = service(&["status"]);
    assert_eq!(
        stdout(&out),
        format!("installed {}\nsystemctl not found\n", unit.display())
    );

    let out = service(&["uninstall"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(&format!("removed {}\n", unit.display())),
        "{}",
        stdout(&out)
    );
    assert!(!unit.exists(), "the unit file is gone");
    assert_eq!(
        std::fs::read_dir(unit.parent().expect("dir"))
            .expect("dir")
            .count(),
        0,
        "no temp files left"
    );
    let out = service(&["uninstall"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("is not installed"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn sparkd_run_as_the_unit_says_serves_the_clients_socket_and_drains_on_sigterm() {
    use std::io::BufRead;
    let ctl = Ctl::new();
    let unit = expected_unit(&ctl, None);
    // Run exactly the unit's command line, with its environment.
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let argv: Vec<&str> = exec.split(' ').collect();
    let mut cmd = ctl.command("sparkd");
    let mut daemon = std::process::Command::new(argv[0]);
    daemon
        .env_clear()
        .envs(
            cmd.get_envs()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
        )
        .env_remove("SPARK_IDLE_TIMEOUT")
        .env_remove("SPARK_HOME")
        .args(&argv[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd.env_clear();
    for line in unit.lines() {
        if let Some((k, v)) = line
            .strip_prefix("Environment=")
            .and_then(|kv| kv.split_once('='))
        {
            daemon.env(k, v);
        }
    }
    let mut child = daemon.spawn().expect("spawn sparkd");
    let mut stderr_lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    // Its log goes to stderr, where journald collects it; serving is logged once bound.
    let mut seen = Vec::new();
    for line in stderr_lines.by_ref() {
        let line = line.expect("stderr line");
        seen.push(line.clone());
        if line.contains("sparkd serving") {
            break;
        }
    }
    assert!(
        seen.last().is_some_and(|l| l.contains("sparkd serving")),
        "{seen:?}"
    );
    // Every client finds it: sparkctl, resolving the socket from the environment alone.
    let out = ctl.run(["--json", "status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status: Value = serde_json::from_str(stdout(&out).trim()).expect("status");
    assert_eq!(
        status["pid"],
        child.id(),
        "the client reached the service's daemon"
    );
    // A client still connected while it stops: drained, not cut.
    let (mut client, _) =
        sparkctl::Client::open(&ctl.home.layout().socket, "test").expect("connect");
    client
        .call::<spark_proto::methods::Status>(&spark_proto::methods::Empty {})
        .expect("status");
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let mut rest = Vec::new();
    for line in stderr_lines.by_ref() {
        let line = line.expect("stderr line");
        rest.push(line.clone());
        if line.contains("SIGTERM received") {
            break;
        }
    }
    // The client leaves once the daemon is stopping; the drain then ends at once.
    drop(client);
    rest.extend(stderr_lines.map_while(Result::ok));
    let status = child.wait().expect("wait");
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM drains and exits 0: {rest:?}"
    );
    assert!(
        rest.iter().any(|l| l.contains("SIGTERM received")),
        "{rest:?}"
    );
    assert!(!ctl.home.layout().socket.exists(), "socket removed");
}

#[test]
fn service_install_with_systemctl_hands_the_socket_over_and_enables_the_unit() {
    let ctl = Ctl::new();
    let config = tempfile::tempdir().expect("config home");
    // A systemctl that records how it was called, in a PATH of its own: the real one would act
    // on this machine's user manager.
    let bin = tempfile::tempdir().expect("PATH dir");
    let calls = bin.path().join("calls");
    let systemctl = bin.path().join("systemctl");
    std::fs::write(
        &systemctl,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\n[ \"$2\" = is-active ] && echo active\nexit 0\n",
            calls.display()
        ),
    )
    .expect("fake systemctl");
    std::fs::set_permissions(
        &systemctl,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let service = |args: &[&str]| {
        ctl.command("sparkctl")
            .env("XDG_CONFIG_HOME", config.path())
            .env("PATH", bin.path())
            .arg("service")
            .args(args)
            .output()
            .expect("run sparkctl service")
    };
    // A daemon started on demand holds the socket.
    assert!(ctl.run(["status"]).status.success());
    let on_demand = ctl.daemon_pid().expect("daemon pid");

    let out = service(&["install"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "stopped sparkd (pid {on_demand}) so that the service takes over its socket"
        )),
        "{}",
        stdout(&out)
    );
    assert!(
        spark_tests::wait_dead(on_demand, std::time::Duration::from_secs(5)),
        "the on-demand daemon is gone"
    );
    assert_eq!(
        std::fs::read_to_string(&calls).expect("calls"),
        "--user daemon-reload\n--user enable sparkd.service\n--user restart sparkd.service\n"
    );
    let out = service(&["status"]);
    assert!(
        stdout(&out).ends_with("systemctl: active\n"),
        "{}",
        stdout(&out)
    );

    std::fs::remove_file(&calls).expect("rm");
    let out = service(&["uninstall"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(&calls).expect("calls"),
        "--user disable --now sparkd.service\n--user daemon-reload\n"
    );
    assert!(!config.path().join("systemd/user/sparkd.service").exists());
}

#[test]
fn a_newer_ask_steers_away_an_ask_in_flight_under_other_provider_settings() {
    use spark_proto::methods::{Ask, AskParams, ProviderSettings};
    let gate = spark_tests::fake_provider::Gate::new();
    let a = Provider::start(Script::new().default_turn(Turn::apply_patch(PATCH_ONE)));
    let b =
        Provider::start(Script::new().turn(Turn::apply_patch(PATCH_ONE).with_gate(gate.clone())));
    let d = a.daemon(true);
    let repo = repo();
    let params = |provider: Option<ProviderSettings>| AskParams {
        cwd: repo.cwd(),
        prompt: "make one bigger".into(),
        focus: Vec::new(),
        dry_run: false,
        new_conversation: false,
        provider,
        buffers: Vec::new(),
    };
    let from_b = params(Some(ProviderSettings {
        url: Some(b.fake.ws_url()),
        model: None,
        api_key: Some("sk-b".into()),
    }));
    let mut first = d.client();
    let waiter = std::thread::spawn(move || first.call::<Ask>(&from_b));
    // B holds the turn: the ask is in flight.
    let reqs = b.wait_for_requests(2); // prewarm + the turn
    assert!(
        reqs[0].is_prewarm() && !reqs[1].is_prewarm(),
        "B warmed its own conversation, then got the turn"
    );
    // The same repository, from a shell with the daemon's own settings: one ask at a time.
    let r = d
        .client()
        .call::<Ask>(&params(None))
        .expect("the newer ask, on A");
    assert!(r.edit.is_some());
    // Opened before joining: an ask that was not steered away finishes (and fails the test)
    // instead of waiting forever.
    gate.open();
    let Err(sparkctl::ClientError::Rpc(e)) = waiter.join().expect("thread") else {
        panic!("the ask on B was not steered away")
    };
    assert_eq!(
        e.error_code(),
        Some(spark_proto::ErrorCode::Cancelled),
        "{}",
        e.message
    );
    assert_eq!(
        repo.read("src/lib.rs"),
        b"fn one() {\n    100\n}\n",
        "applied once"
    );
}
