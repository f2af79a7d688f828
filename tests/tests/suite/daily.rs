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
