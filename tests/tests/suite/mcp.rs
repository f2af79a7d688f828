//! `sparkctl mcp` driven by MCP clients nobody on the team wrote.
//!
//! - The official Python SDK (PyPI `mcp`, installed by `.ci/run` into a venv, found through
//!   `SPARK_TEST_MCP_PYTHON`) runs `tests/mcp/client.py`, which starts the real `sparkctl mcp` as
//!   a host does, lists the tools and calls each one over stdio.
//! - Codex CLI (npm `@openai/codex`, found through `SPARK_TEST_CODEX`), configured with spark as
//!   an MCP server and the fake model, which asks for spark's `apply_patch` tool: the edit lands
//!   through spark and shows in `sparkctl log`.
//!
//! Without those programs the tests say so loudly and pass: they cannot be installed everywhere.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{Value, json};
use spark_proto::ErrorCode;
use spark_proto::methods::{ApplyParams, EditApply};
use spark_tests::{Ctl, InProcess, TestRepo, bin, stderr, stdout, worktree_snapshot};
use sparkctl::ClientError;

const LIB: &str = "pub fn one() -> u32 {\n    1\n}\n\npub fn two() -> u32 {\n    2\n}\n";
const LIB_AFTER: &str = "pub fn one() -> u32 {\n    100\n}\n\npub fn two() -> u32 {\n    2\n}\n";
const PATCH: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ pub fn one() -> u32 {\n-    1\n+    100\n*** End Patch\n";
/// Context the file does not have: refused, with the closest lines.
const STALE_PATCH: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@\n pub fn two() -> u32 {\n-    22\n+    200\n }\n*** End Patch\n";
/// A path that leaves the repository.
const ESCAPING_PATCH: &str =
    "*** Begin Patch\n*** Add File: ../outside.txt\n+not here\n*** End Patch\n";

fn python() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("SPARK_TEST_MCP_PYTHON")?);
    path.is_file().then_some(path)
}

fn codex() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("SPARK_TEST_CODEX")?);
    path.is_file().then_some(path)
}

fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/client.py")
}

/// One MCP session of the Python SDK client against `sparkctl mcp` started in `server_cwd`:
/// its transcript (server, tools, results).
fn python_session(
    python: &Path,
    ctl: &Ctl,
    server_cwd: &Path,
    client_name: &str,
    calls: Value,
) -> Value {
    let session = json!({
        "client_name": client_name,
        "cwd": server_cwd,
        "env": {
            "SPARK_HOME": ctl.home.path(),
            "HOME": ctl.home.path(),
            "SPARK_IDLE_TIMEOUT": "120",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_CONFIG_NOSYSTEM": "1",
        },
        "calls": calls,
    });
    let mut child = Command::new(python)
        .arg(client_script())
        .arg(bin("sparkctl"))
        .arg("mcp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the Python MCP client");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(session.to_string().as_bytes())
        .expect("write the session");
    let out = child
        .wait_with_output()
        .expect("wait for the Python client");
    assert!(
        out.status.success(),
        "the Python MCP client failed ({}): {}",
        out.status,
        stderr(&out)
    );
    // The server logs to stderr only; the client passes it through to its own.
    assert!(
        stderr(&out).contains("sparkctl mcp: serving MCP on stdio"),
        "{}",
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).expect("the client's transcript is JSON")
}

fn result(transcript: &Value, i: usize) -> (&str, bool) {
    let r = &transcript["results"][i];
    (
        r["text"].as_str().expect("text result"),
        r["is_error"].as_bool().expect("is_error"),
    )
}

fn log_json(ctl: &Ctl, repo: &TestRepo) -> Value {
    let out = ctl
        .command("sparkctl")
        .current_dir(repo.path())
        .args(["--json", "log"])
        .output()
        .expect("run sparkctl log");
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("log JSON")
}

#[test]
fn python_sdk_lists_the_tools_and_calls_each() {
    let Some(python) = python() else {
        eprintln!(
            "\n*** SKIPPED suite::mcp::python_sdk_lists_the_tools_and_calls_each: no MCP Python \
             SDK (set SPARK_TEST_MCP_PYTHON to a python with `mcp` installed; .ci/run does)\n"
        );
        return;
    };
    let ctl = Ctl::new();
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes()), ("README", b"hi\n")]);
    let outside = repo.path().parent().expect("parent").join("outside.txt");
    let before = worktree_snapshot(repo.path());

    // Session 1, in the repository: a patch lands, a dry run and two refusals write nothing,
    // log and show answer.
    let t = python_session(
        &python,
        &ctl,
        repo.path(),
        "pytest-agent",
        json!([
            {"tool": "apply_patch", "arguments": {"patch": PATCH, "message": "one returns 100"}},
            {"tool": "apply_patch", "arguments": {"patch": STALE_PATCH}},
            {"tool": "apply_patch", "arguments": {"patch": ESCAPING_PATCH}},
            {"tool": "apply_patch", "arguments": {"patch": STALE_PATCH.replace("22", "2"), "dry_run": true}},
            {"tool": "log", "arguments": {}},
            {"tool": "show", "arguments": {}},
        ]),
    );

    assert_eq!(t["server"]["name"], "spark");
    assert!(
        t["instructions"]
            .as_str()
            .is_some_and(|s| s.contains("apply_patch")),
        "{t}"
    );
    let mut names: Vec<&str> = t["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|tool| tool["name"].as_str().expect("name"))
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["apply_patch", "history", "log", "restore", "show", "undo"]
    );
    for tool in t["tools"].as_array().expect("tools") {
        assert!(
            tool["description"].as_str().is_some_and(|d| d.len() > 40),
            "a tool a model can follow has a description: {tool}"
        );
        assert_eq!(tool["input_schema"]["type"], "object", "{tool}");
    }
    // Hosts decide what to ask the user about from these: log and show only read.
    for tool in t["tools"].as_array().expect("tools") {
        let read_only = matches!(tool["name"].as_str(), Some("log" | "show" | "history"));
        assert_eq!(tool["annotations"]["readOnlyHint"], read_only, "{tool}");
        assert_eq!(tool["annotations"]["openWorldHint"], false, "{tool}");
    }
    let apply = t["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .find(|tool| tool["name"] == "apply_patch")
        .expect("apply_patch");
    assert_eq!(apply["input_schema"]["required"], json!(["patch"]));
    let restore = t["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .find(|tool| tool["name"] == "restore")
        .expect("restore");
    assert_eq!(restore["input_schema"]["required"], json!(["path", "at"]));
    let patch_doc = apply["input_schema"]["properties"]["patch"]["description"]
        .as_str()
        .expect("the patch argument is described");
    assert!(
        patch_doc.contains("*** Begin Patch") && patch_doc.contains("<<<<<<< SEARCH"),
        "{patch_doc}"
    );

    // The patch landed: bytes on disk, recorded with the MCP client's name.
    let (text, is_error) = result(&t, 0);
    assert!(!is_error, "{text}");
    assert_eq!(repo.read("src/lib.rs"), LIB_AFTER.as_bytes());
    let log = log_json(&ctl, &repo);
    let entry = &log["edits"][0];
    let id = entry["id"].as_str().expect("edit id").to_owned();
    assert_eq!(log["edits"].as_array().map(Vec::len), Some(1), "{log}");
    assert_eq!(entry["source"], "mcp:pytest-agent");
    assert_eq!(entry["message"], "one returns 100");
    assert_eq!(entry["state"], "applied");
    assert_eq!(
        text,
        format!(
            "applied edit {id}: 1 file, +1 -1\n  M src/lib.rs (+1 -1)\nto revert it: the `undo` tool with edit \"{id}\""
        )
    );

    // Refused: why, the closest lines of the file as it is now, and a hint.
    let (text, is_error) = result(&t, 1);
    assert!(is_error, "{text}");
    assert!(
        text.starts_with(
            "refused, nothing was written: patch does not apply to src/lib.rs: chunk 1: could not find these lines:"
        ),
        "{text}"
    );
    assert!(
        text.contains("closest lines in the file as it is now"),
        "{text}"
    );
    assert!(text.contains("    6 |     2\n"), "{text}");
    assert!(text.contains("\nhint: "), "{text}");
    let (text, is_error) = result(&t, 2);
    assert!(is_error, "{text}");
    assert!(text.starts_with("refused, nothing was written: "), "{text}");
    assert!(text.contains("../outside.txt"), "{text}");
    assert!(!outside.exists(), "a refused patch wrote outside the repo");
    // A dry run shows the diff and writes nothing.
    let (text, is_error) = result(&t, 3);
    assert!(!is_error, "{text}");
    assert!(
        text.starts_with("would apply (dry run, nothing written): 1 file, +1 -1"),
        "{text}"
    );
    assert!(text.contains("-    2\n+    200"), "{text}");
    // Nothing but the first patch changed anything.
    let mut expected = before;
    expected
        .get_mut("src/lib.rs")
        .expect("src/lib.rs in the snapshot")
        .1 = LIB_AFTER.as_bytes().to_vec();
    assert_eq!(worktree_snapshot(repo.path()), expected);
    assert_eq!(
        log_json(&ctl, &repo)["edits"].as_array().map(Vec::len),
        Some(1)
    );

    // log and show answer, show exactly as `git stash show -p` prints it.
    let (text, is_error) = result(&t, 4);
    assert!(!is_error, "{text}");
    assert!(text.starts_with("edits in "), "{text}");
    let line = text.lines().nth(1).expect("one edit listed");
    assert!(
        line.starts_with(&format!("{id}  applied  mcp:pytest-agent  "))
            && line.ends_with("src/lib.rs  \"one returns 100\""),
        "{line}"
    );
    let (text, is_error) = result(&t, 5);
    assert!(!is_error, "{text}");
    let (head, diff) = text.split_once('\n').expect("a head line and the diff");
    assert_eq!(
        head,
        format!("edit {id} (applied, by mcp:pytest-agent): one returns 100")
    );
    assert_eq!(diff, repo.git(&["stash", "show", "-p", &id]));

    // Session 2, the server started outside the repository: the `cwd` argument picks it, and
    // undo reverts the edit byte for byte.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let t = python_session(
        &python,
        &ctl,
        elsewhere.path(),
        "pytest-agent",
        json!([
            {"tool": "undo", "arguments": {"edit": id, "cwd": repo.cwd()}},
            {"tool": "undo", "arguments": {"edit": id, "cwd": repo.cwd()}},
            {"tool": "log", "arguments": {"cwd": repo.path().join("src"), "limit": 5}},
            {"tool": "log", "arguments": {}},
        ]),
    );
    let (text, is_error) = result(&t, 0);
    assert!(!is_error, "{text}");
    assert!(
        text.starts_with(&format!("undid edit {id}: 1 file")),
        "{text}"
    );
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());
    let (text, is_error) = result(&t, 1);
    assert!(is_error, "undoing twice is refused: {text}");
    assert!(text.starts_with("refused, nothing was written: "), "{text}");
    let (text, is_error) = result(&t, 2);
    assert!(!is_error, "{text}");
    assert!(
        text.contains(&format!("{id}  undone  mcp:pytest-agent")),
        "{text}"
    );
    // Outside any repository: a clear refusal, not a crash of the server.
    let (text, is_error) = result(&t, 3);
    assert!(is_error, "{text}");
    assert!(text.contains("hint: "), "{text}");
    assert_eq!(log_json(&ctl, &repo)["edits"][0]["state"], "undone");
    repo.git(&["fsck", "--strict"]);
}

/// `spark-fake-provider --armed`: answers "Done." unless a turn was queued with a command.
struct FakeModel {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    urls: Value,
}

impl FakeModel {
    fn start(patch_file: &Path) -> FakeModel {
        let mut child = Command::new(env!("CARGO_BIN_EXE_spark-fake-provider"))
            .arg("--patch")
            .arg(patch_file)
            .arg("--armed")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start spark-fake-provider");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the URLs");
        let urls = serde_json::from_str(&line).expect("URLs JSON");
        FakeModel {
            child,
            stdin,
            stdout,
            urls,
        }
    }

    fn command(&mut self, command: &str) -> Value {
        writeln!(self.stdin, "{command}").expect("write a command");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read an answer");
        serde_json::from_str(&line).expect("answer JSON")
    }
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn codex_cli_edits_through_spark_and_it_shows_in_the_log() {
    let Some(codex) = codex() else {
        eprintln!(
            "\n*** SKIPPED suite::mcp::codex_cli_edits_through_spark_and_it_shows_in_the_log: no \
             Codex CLI (set SPARK_TEST_CODEX to the npm package's bin/codex.js; .ci/run does)\n"
        );
        return;
    };
    let ctl = Ctl::new();
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    // Codex will not set up its helper binaries under a temporary directory: its home lives in
    // the target directory.
    let codex_home = tempfile::Builder::new()
        .prefix("codex-home")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("codex home");
    let patch_file = codex_home.path().join("patch");
    std::fs::write(&patch_file, PATCH).expect("write the patch file");
    let mut model = FakeModel::start(&patch_file);

    // What the README tells users to write, plus the fake model as the provider. A model slug
    // outside codex's catalog makes it offer MCP tools directly rather than behind tool search.
    let config = format!(
        r#"model = "spark-test-model"
model_provider = "sparkfake"
approval_policy = "never"
sandbox_mode = "workspace-write"
check_for_update_on_startup = false

[analytics]
enabled = false

[model_providers.sparkfake]
name = "spark fake provider"
base_url = "{base_url}"
wire_api = "responses"
env_key = "SPARK_TEST_KEY"
supports_websockets = false
request_max_retries = 0
stream_max_retries = 0

[mcp_servers.spark]
command = "{sparkctl}"
args = ["mcp"]
env = {{ SPARK_HOME = "{spark_home}", SPARK_IDLE_TIMEOUT = "120" }}
default_tools_approval_mode = "approve"
"#,
        base_url = model.urls["compat_base_url"].as_str().expect("base url"),
        sparkctl = bin("sparkctl").display(),
        spark_home = ctl.home.path().display(),
    );
    std::fs::write(codex_home.path().join("config.toml"), config).expect("write config.toml");
    let arguments = json!({"patch": PATCH, "message": "one returns 100"});
    let queued = model.command(&format!("call mcp__spark/apply_patch {arguments}"));
    assert_eq!(queued["queued"], 1, "{queued}");

    let out = Command::new(&codex)
        .args([
            "exec",
            "--color",
            "never",
            "-s",
            "workspace-write",
            "make one() return 100",
        ])
        .current_dir(repo.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", codex_home.path())
        .env("CODEX_HOME", codex_home.path())
        .env("SPARK_TEST_KEY", "sk-test-not-a-real-key")
        .env("LANG", "C.UTF-8")
        .env("NO_COLOR", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run codex exec");
    let codex_said = format!("stdout:\n{}\nstderr:\n{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "codex exec failed: {codex_said}");

    // The edit went through spark: bytes on disk, and spark's record names codex.
    assert_eq!(
        String::from_utf8_lossy(&repo.read("src/lib.rs")),
        LIB_AFTER,
        "{codex_said}"
    );
    let log = log_json(&ctl, &repo);
    assert_eq!(log["edits"].as_array().map(Vec::len), Some(1), "{log}");
    let entry = &log["edits"][0];
    assert_eq!(entry["source"], "mcp:codex", "{log}");
    assert_eq!(entry["message"], "one returns 100");
    let id = entry["id"].as_str().expect("id");
    let text_log = ctl
        .command("sparkctl")
        .current_dir(repo.path())
        .args(["--color=never", "log"])
        .output()
        .expect("sparkctl log");
    assert!(stdout(&text_log).contains(id), "{}", stdout(&text_log));
    // The model was shown spark's answer as the tool's output.
    let last = model.command("last");
    let output = last["last"]["input"]
        .as_array()
        .expect("the last request's input")
        .iter()
        .find(|item| item["type"] == "function_call_output")
        .expect("codex sent the tool's output back")
        .to_string();
    assert!(
        output.contains(&format!("applied edit {id}: 1 file, +1 -1")),
        "{output}"
    );
    // The stash-shaped record is what git sees.
    assert_eq!(
        repo.git(&["stash", "show", "-p", id]),
        stdout(
            &ctl.command("sparkctl")
                .current_dir(repo.path())
                .args(["show", id])
                .output()
                .expect("sparkctl show")
        )
    );
}

/// The daemon's own answer, which the MCP tool passes on: a patch that does not match is refused
/// with the file's closest lines in `data.closest`, from the file as it is now.
#[test]
fn a_refused_patch_carries_the_closest_lines() {
    let daemon = InProcess::start();
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    let before = worktree_snapshot(repo.path());
    let err = daemon
        .client()
        .call::<EditApply>(&ApplyParams {
            cwd: repo.cwd(),
            patch: STALE_PATCH.to_owned(),
            dry_run: false,
            source: Some("mcp:test".into()),
            message: None,
        })
        .expect_err("the patch's context is not in the file");
    let ClientError::Rpc(rpc) = err else {
        panic!("not a refusal: {err}");
    };
    assert_eq!(rpc.error_code(), Some(ErrorCode::PatchMismatch));
    assert_eq!(rpc.kind(), Some("context_not_found"));
    assert_eq!(
        rpc.closest(),
        Some("    3 | }\n    4 | \n    5 | pub fn two() -> u32 {\n    6 |     2\n    7 | }\n")
    );
    assert_eq!(worktree_snapshot(repo.path()), before);

    // Nothing resembling the patch in the file: no closest lines, the refusal alone.
    let err = daemon
        .client()
        .call::<EditApply>(&ApplyParams {
            cwd: repo.cwd(),
            patch:
                "*** Begin Patch\n*** Update File: src/lib.rs\n@@\n-qqqq zzzz\n+x\n*** End Patch\n"
                    .to_owned(),
            dry_run: false,
            source: None,
            message: None,
        })
        .expect_err("refused");
    let ClientError::Rpc(rpc) = err else {
        panic!("not a refusal: {err}");
    };
    assert_eq!(rpc.kind(), Some("context_not_found"));
    assert_eq!(rpc.closest(), None);
    assert_eq!(worktree_snapshot(repo.path()), before);
}

/// Started by hand, with no host on its stdin: a clear error and hint on stderr, exit 2, and
/// nothing on stdout, which belongs to the protocol.
#[test]
fn without_a_host_it_says_what_starts_it() {
    let ctl = Ctl::new();
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    let out = ctl
        .command("sparkctl")
        .current_dir(repo.path())
        .arg("mcp")
        .stdin(Stdio::null())
        .output()
        .expect("run sparkctl mcp");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("sparkctl: error: MCP session did not start"),
        "{err}"
    );
    assert!(
        err.contains("\nhint: an MCP host (Codex CLI, Claude Code, Zed, …) starts `sparkctl mcp`"),
        "{err}"
    );
    // No session, so no daemon was started for one.
    assert_eq!(ctl.daemon_pid(), None);
}

#[test]
fn python_sdk_restores_a_version_from_the_local_history_and_undo_takes_it_back() {
    let Some(python) = python() else {
        eprintln!(
            "\n*** SKIPPED suite::mcp::python_sdk_restores_a_version_from_the_local_history_and_undo_takes_it_back: \
             no MCP Python SDK (set SPARK_TEST_MCP_PYTHON; .ci/run does)\n"
        );
        return;
    };
    let ctl = Ctl::new();
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    // The edit snapshots the file right before it writes: that version is what `0s` names.
    let t = python_session(
        &python,
        &ctl,
        repo.path(),
        "pytest-agent",
        json!([
            {"tool": "apply_patch", "arguments": {"patch": PATCH}},
            {"tool": "history", "arguments": {"path": "src/lib.rs"}},
            {"tool": "restore", "arguments": {"path": "src/lib.rs", "at": "0s", "dry_run": true}},
            {"tool": "restore", "arguments": {"path": "src/lib.rs", "at": "0s"}},
            {"tool": "restore", "arguments": {"path": "src/nope.rs", "at": "0s"}},
        ]),
    );
    // The calls ran in order before these checks: the file now holds what the restore put back.
    let (text, is_error) = result(&t, 0);
    assert!(!is_error, "{text}");
    assert!(text.starts_with("applied edit "), "{text}");
    let (text, is_error) = result(&t, 1);
    assert!(!is_error, "{text}");
    assert!(
        text.starts_with("versions of src/lib.rs, newest first:\n"),
        "{text}"
    );
    assert!(text.contains("  edit  "), "the pre-edit snapshot: {text}");
    let (text, is_error) = result(&t, 2);
    assert!(!is_error, "{text}");
    assert!(
        text.starts_with("would restore (dry run, nothing written): 1 file"),
        "{text}"
    );
    let (text, is_error) = result(&t, 3);
    assert!(!is_error, "{text}");
    assert!(text.starts_with("restored edit "), "{text}");
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());
    let log = log_json(&ctl, &repo);
    assert_eq!(log["edits"].as_array().map(Vec::len), Some(2), "{log}");
    assert_eq!(log["edits"][0]["state"], "applied", "{log}");
    let (text, is_error) = result(&t, 4);
    assert!(is_error, "no version of a file never seen: {text}");
    assert!(text.starts_with("refused, nothing was written: "), "{text}");
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());
    repo.git(&["fsck", "--strict"]);
}
