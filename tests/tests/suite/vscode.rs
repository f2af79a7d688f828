//! The VS Code extension (`editors/vscode`) in a real VS Code: code-server on 127.0.0.1 with the
//! extension installed, its workbench driven in Chromium by `editors/vscode/test/ui.mjs`
//! (playwright-core), against a real daemon (started by the extension through `sparkctl`) and
//! the fake provider. Asserts what the user sees in the editor (text, decorations, dirty state,
//! dialogs, the status bar) and what is on disk.
//!
//! One code-server serves the whole test (its start costs seconds). The programs come from
//! `SPARK_TEST_CODE_SERVER` (the npm package's directory), `SPARK_TEST_NODE24` (node 24, which
//! code-server 4.139 needs), `SPARK_TEST_PLAYWRIGHT` (the playwright-core package's directory)
//! and `SPARK_TEST_CHROMIUM`, all set by `.ci/run`; without them the test says so loudly on
//! stderr and passes without running.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spark_tests::fake_provider::{Gate, Script, Turn};
use spark_tests::{Ctl, Provider, TestRepo, bin, pid_alive};

const LIB: &str = "fn one() {\n    1\n}\n\nfn two() {\n    2\n}\n\nfn three() {\n    3\n}\n";
const PATCH_TWO: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn two() {\n-    2\n+    200\n+    // doubled\n*** End Patch\n";
const EDITED: &str =
    "fn one() {\n    1\n}\n\nfn two() {\n    200\n    // doubled\n}\n\nfn three() {\n    3\n}\n";
const PATCH_THREE: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn three() {\n-    3\n+    300\n*** End Patch\n";
const PATCH_CANCELLED: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn three() {\n-    300\n+    3000\n*** End Patch\n";
const PATCH_ONE: &str =
    "*** Begin Patch\n*** Update File: src/lib.rs\n@@\n-    1\n+    100\n*** End Patch\n";
const TYPED: &str = " // mine";
const UNSAVED: &str = " // unsaved";
const DEADLINE: Duration = Duration::from_secs(30);
const HELD: &str = "response.custom_tool_call_input.done";

struct Tools {
    node: PathBuf,
    code_server: PathBuf,
    playwright: PathBuf,
    chromium: PathBuf,
}

fn tools() -> Option<Tools> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .filter(|p| p.exists())
    };
    match (
        var("SPARK_TEST_NODE24"),
        var("SPARK_TEST_CODE_SERVER"),
        var("SPARK_TEST_PLAYWRIGHT"),
        var("SPARK_TEST_CHROMIUM"),
    ) {
        (Some(node), Some(code_server), Some(playwright), Some(chromium)) => Some(Tools {
            node,
            code_server,
            playwright,
            chromium,
        }),
        _ => {
            eprintln!(
                "\n!!! SKIPPED: set SPARK_TEST_NODE24, SPARK_TEST_CODE_SERVER, SPARK_TEST_PLAYWRIGHT \
                 and SPARK_TEST_CHROMIUM (.ci/run installs them under target/ci-vscode); the \
                 editors/vscode UI test did not run !!!\n"
            );
            None
        }
    }
}

fn extension_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("editors/vscode")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

/// code-server with the extension installed, and the driver holding one workbench page.
struct Workbench {
    server: Child,
    driver: Child,
    to_driver: Option<ChildStdin>,
    from_driver: BufReader<ChildStdout>,
    dir: tempfile::TempDir,
}

impl Workbench {
    fn start(tools: &Tools, ctl: &Ctl, provider_url: &str, folder: &Path) -> Workbench {
        let dir = tempfile::Builder::new()
            .prefix("vsc")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let user = d.join("user-data/User");
        std::fs::create_dir_all(&user).expect("user dir");
        std::fs::write(
            user.join("settings.json"),
            json!({
                "chat.disableAIFeatures": true,
                "workbench.startupEditor": "none",
                "workbench.secondarySideBar.defaultVisibility": "hidden",
                "workbench.tips.enabled": false,
                "security.workspace.trust.enabled": false,
                "telemetry.telemetryLevel": "off",
                "extensions.autoCheckUpdates": false,
                "extensions.autoUpdate": false,
                "update.mode": "none",
                "git.enabled": false,
                "files.autoSave": "off",
                "window.restoreWindows": "none",
                // The extension host's PATH is code-server's resolved shell environment; the
                // setting is how a user points the extension at a sparkctl of their own, too.
                "spark.sparkctlPath": bin("sparkctl"),
            })
            .to_string(),
        )
        .expect("settings");
        // Installed as VS Code lays out an extension: `<publisher>.<name>-<version>`.
        let manifest: Value = serde_json::from_slice(
            &std::fs::read(extension_dir().join("package.json")).expect("package.json"),
        )
        .expect("manifest");
        let installed = d.join("extensions").join(format!(
            "{}.{}-{}",
            manifest["publisher"].as_str().expect("publisher"),
            manifest["name"].as_str().expect("name"),
            manifest["version"].as_str().expect("version")
        ));
        std::fs::create_dir_all(&installed).expect("extension dir");
        std::fs::copy(
            extension_dir().join("package.json"),
            installed.join("package.json"),
        )
        .expect("copy manifest");
        copy_dir(&extension_dir().join("src"), &installed.join("src"));
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        std::fs::write(
            d.join("config.yaml"),
            format!("bind-addr: 127.0.0.1:{port}\nauth: none\ncert: false\n"),
        )
        .expect("config");
        std::fs::create_dir_all(d.join("home")).expect("home");
        let ctl_dir = bin("sparkctl").parent().expect("bin dir").to_path_buf();
        let path = format!(
            "{}:{}",
            ctl_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut server = Command::new(&tools.node)
            .arg(tools.code_server.join("out/node/entry.js"))
            .arg("--config")
            .arg(d.join("config.yaml"))
            .arg("--user-data-dir")
            .arg(d.join("user-data"))
            .arg("--extensions-dir")
            .arg(d.join("extensions"))
            .args([
                "--disable-telemetry",
                "--disable-update-check",
                "--disable-workspace-trust",
                "--disable-getting-started-override",
            ])
            .arg(folder)
            .env_clear()
            .env("PATH", &path)
            .env("HOME", d.join("home"))
            .env(
                "EXTENSIONS_GALLERY",
                r#"{"serviceUrl":"http://127.0.0.1:9/gallery"}"#,
            )
            .env("SPARK_HOME", ctl.home.path())
            .env("SPARK_PROVIDER_URL", provider_url)
            .env("SPARK_API_KEY", "sk-test-not-a-real-key")
            .env("SPARK_IDLE_TIMEOUT", "120")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Its own process group: code-server runs its server and extension host as
            // children, which must go with it.
            .process_group(0)
            .spawn()
            .expect("start code-server");
        // Ready when it says so; its output is drained afterwards so it never blocks on it.
        let mut out = BufReader::new(server.stdout.take().expect("stdout"));
        let mut line = String::new();
        loop {
            line.clear();
            let n = out.read_line(&mut line).expect("code-server output");
            assert!(n > 0, "code-server exited before it listened");
            if line.contains("HTTP server listening on") {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let mut driver = Command::new(&tools.node)
            .arg(extension_dir().join("test/ui.mjs"))
            .arg(format!("http://127.0.0.1:{port}/"))
            .arg(&tools.chromium)
            .env("SPARK_TEST_PLAYWRIGHT", &tools.playwright)
            .env("HOME", d.join("home"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .expect("start the driver");
        let to_driver = driver.stdin.take().expect("stdin");
        let from_driver = BufReader::new(driver.stdout.take().expect("stdout"));
        Workbench {
            server,
            driver,
            to_driver: Some(to_driver),
            from_driver,
            dir,
        }
    }

    fn call(&mut self, cmd: Value) -> Value {
        let to = self.to_driver.as_mut().expect("the driver is running");
        writeln!(to, "{cmd}").expect("write to the driver");
        let mut line = String::new();
        self.from_driver
            .read_line(&mut line)
            .expect("read from the driver");
        let answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("driver answered {line:?} to {cmd}: {e}"));
        assert_eq!(
            answer["ok"],
            json!(true),
            "{cmd} failed: {}",
            answer["error"]
        );
        answer["v"].clone()
    }

    /// Poll `cmd` until `done` accepts its answer; the last answer in the panic otherwise.
    fn wait_for(&mut self, what: &str, cmd: Value, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let v = self.call(cmd.clone());
            if done(&v) {
                return v;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; last: {v}; prompts: {}\n{}",
                self.call(json!({"op": "prompts"})),
                self.logs()
            );
        }
    }

    /// What the extension logged (its "Spark" output channel) and the host's errors, for a
    /// failure's message.
    fn logs(&mut self) -> String {
        let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vscode-failure.png");
        self.call(json!({"op": "screenshot", "path": shot}));
        let mut out = format!("screenshot: {}\n", shot.display());
        let mut stack = vec![self.dir.path().join("user-data/logs")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                let name = p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                if p.is_dir() {
                    stack.push(p);
                } else if name.ends_with("Spark.log") || name == "remoteexthost.log" {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    out.push_str(&format!("---- {name}\n{text}"));
                }
            }
        }
        out
    }

    fn text(&mut self) -> String {
        let v = self.call(json!({"op": "lines"}));
        let lines: Vec<&str> = v
            .as_array()
            .expect("lines")
            .iter()
            .map(|l| l.as_str().expect("line"))
            .collect();
        lines.join("\n")
    }

    fn wait_text(&mut self, what: &str, want: &str) {
        let start = Instant::now();
        loop {
            let got = self.text();
            if got == want {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}:\n{got}\n---- wanted:\n{want}\n---- prompts: {}\n{}",
                self.call(json!({"op": "prompts"})),
                self.logs()
            );
        }
    }

    fn status(&mut self) -> Value {
        self.call(json!({"op": "statusText"}))
    }

    /// Nothing asked the user anything: no modal dialog, no notification (a "file changed on
    /// disk" conflict would be either).
    fn assert_no_prompt(&mut self) {
        let p = self.call(json!({"op": "prompts"}));
        assert_eq!(p["dialogs"], json!([]), "{p}");
        assert_eq!(p["notifications"], json!([]), "{p}");
        assert_eq!(p["bell"], json!("Notifications"), "{p}");
    }

    fn screenshot(&mut self, name: &str) {
        // Kept with the test's target dir; SPARK_VSCODE_SCREENSHOTS names a directory to copy
        // them to (editors/vscode/media holds the ones the README shows).
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vscode-{name}.png"));
        self.call(json!({"op": "screenshot", "path": out}));
        if let Some(dir) = std::env::var_os("SPARK_VSCODE_SCREENSHOTS") {
            std::fs::copy(&out, Path::new(&dir).join(format!("{name}.png"))).expect("copy");
        }
    }
}

impl Drop for Workbench {
    fn drop(&mut self) {
        // The end of its input makes the driver close the browser (Chromium's processes are
        // reaped by it) and exit; a driver that does not within seconds is killed below.
        self.to_driver = None;
        let start = Instant::now();
        while matches!(self.driver.try_wait(), Ok(None))
            && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        for child in [&mut self.driver, &mut self.server] {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
    }
}

fn sparkctl_apply(ctl: &Ctl, repo: &TestRepo, patch: &str) {
    let mut child = ctl
        .command("sparkctl")
        .args(["apply", "-m", "from the terminal", "-"])
        .current_dir(repo.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sparkctl apply");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(patch.as_bytes())
        .expect("patch");
    assert!(child.wait().expect("wait").success());
}

#[test]
fn ask_previews_lands_merges_typing_undoes_in_one_step_follows_the_terminal_and_reconnects() {
    let Some(tools) = tools() else {
        return;
    };
    let first = Gate::new();
    let second = Gate::new();
    // Never opened: that ask is cancelled.
    let never = Gate::new();
    let p = Provider::start(
        Script::new()
            .turn(Turn::apply_patch(PATCH_TWO).hold_before(HELD, first.clone()))
            .turn(Turn::apply_patch(PATCH_THREE).hold_before(HELD, second.clone()))
            .turn(Turn::apply_patch(PATCH_ONE))
            .turn(Turn::apply_patch(PATCH_CANCELLED).hold_before(HELD, never.clone())),
    );
    let ctl = Ctl::new();
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    let mut wb = Workbench::start(&tools, &ctl, &p.fake.ws_url(), repo.path());
    wb.call(json!({"op": "open"}));
    wb.call(json!({"op": "openFile", "name": "lib.rs"}));
    wb.wait_text("the file", LIB);
    // No daemon runs yet: the extension says so, and its first command starts one.
    wb.wait_for(
        "the extension's status item",
        json!({"op": "statusText"}),
        |v| v.to_string().contains("spark"),
    );
    assert!(ctl.daemon_pid().is_none());

    // 1. Ask about a selection: the preview shows mid-stream, the document is unchanged.
    wb.call(json!({"op": "select", "from": 5, "to": 7}));
    wb.call(json!({"op": "command", "title": "Spark: Ask"}));
    wb.call(json!({"op": "input", "title": "Spark: Ask", "text": "make two bigger"}));
    let decos = wb.wait_for(
        "the preview decorations",
        json!({"op": "decorations"}),
        |v| v.to_string().contains("doubled"),
    );
    let decos = decos.as_array().expect("decorations").clone();
    assert!(
        decos
            .iter()
            .any(|d| d["line"] == json!(6) && d["struck"] == json!(true)),
        "line 6 (`2`) is struck through: {decos:?}"
    );
    let added = serde_json::to_string(&decos).expect("json");
    assert!(
        added.contains("200") && added.contains("// doubled"),
        "{added}"
    );
    assert_eq!(wb.text(), LIB, "the preview changes no text");
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());
    let status = wb.status().to_string();
    assert!(status.contains("tok/s"), "streaming status: {status}");
    wb.screenshot("preview");
    let pid = ctl.daemon_pid().expect("the extension started a daemon");
    assert!(pid_alive(pid));
    let asked = p.wait_for_requests(1);
    let input = serde_json::to_string(
        asked
            .iter()
            .rev()
            .find(|r| !r.is_prewarm())
            .expect("an ask")
            .input(),
    )
    .expect("json");
    assert!(input.contains("make two bigger"), "{input}");
    assert!(input.contains("lines 5-7"), "{input}");

    // It lands: in the editor, on disk, not dirty, no dialog, the preview gone.
    first.open();
    wb.wait_text("the edit in the editor", EDITED);
    assert_eq!(repo.read("src/lib.rs"), EDITED.as_bytes());
    wb.wait_for("the preview to clear", json!({"op": "decorations"}), |v| {
        v == &json!([])
    });
    assert_eq!(wb.call(json!({"op": "dirty"})), json!(false));
    wb.assert_no_prompt();
    wb.screenshot("landed");

    // 2. Ctrl+Z takes back exactly the edit, in one step; Ctrl+Shift+Z brings it back.
    wb.call(json!({"op": "cursor", "line": 1}));
    wb.call(json!({"op": "key", "key": "Control+z"}));
    wb.wait_text("the undo", LIB);
    wb.call(json!({"op": "key", "key": "Control+z"}));
    assert_eq!(wb.text(), LIB, "nothing older to undo");
    wb.call(json!({"op": "key", "key": "Control+Shift+z"}));
    wb.wait_text("the redo", EDITED);
    assert_eq!(wb.call(json!({"op": "dirty"})), json!(false));

    // 3. Typing while the model writes: merged, and the typed text never reaches the disk.
    wb.call(json!({"op": "cursor", "line": 11}));
    wb.call(json!({"op": "command", "title": "Spark: Ask"}));
    wb.call(json!({"op": "input", "title": "Spark: Ask", "text": "make three bigger"}));
    wb.wait_for("the second preview", json!({"op": "decorations"}), |v| {
        v.to_string().contains("300")
    });
    wb.call(json!({"op": "cursor", "line": 1, "end": true}));
    wb.call(json!({"op": "type", "text": TYPED}));
    let typed_and_edited = EDITED
        .replacen("fn one() {", &format!("fn one() {{{TYPED}"), 1)
        .replacen("    3\n", "    300\n", 1);
    second.open();
    wb.wait_text("the merged edit", &typed_and_edited);
    let on_disk = EDITED.replacen("    3\n", "    300\n", 1);
    assert_eq!(
        String::from_utf8(repo.read("src/lib.rs")).expect("utf-8"),
        on_disk,
        "the edit is on disk, the typing is not"
    );
    assert_eq!(wb.call(json!({"op": "dirty"})), json!(true));
    wb.assert_no_prompt();
    // Ctrl+Z takes back exactly the edit, keeping the typing; Ctrl+Shift+Z brings it back.
    let typed = EDITED.replacen("fn one() {", &format!("fn one() {{{TYPED}"), 1);
    wb.call(json!({"op": "key", "key": "Control+z"}));
    wb.wait_text("the undo of the merged edit", &typed);
    wb.call(json!({"op": "key", "key": "Control+Shift+z"}));
    wb.wait_text("the redo of the merged edit", &typed_and_edited);
    // Saving writes exactly the merged text, with no "the content of the file is newer"
    // conflict: the edit landed on disk under the unsaved document.
    wb.call(json!({"op": "key", "key": "Control+s"}));
    wb.wait_for("the save", json!({"op": "dirty"}), |v| v == &json!(false));
    wb.assert_no_prompt();
    assert_eq!(
        String::from_utf8(repo.read("src/lib.rs")).expect("utf-8"),
        typed_and_edited,
        "the save wrote the typing and the edit"
    );
    let on_disk = typed_and_edited.clone();

    // 4. Asking with unsaved changes: the model sees them, the edit comes back as text and is
    // applied in the editor as one undo step; the file on disk is not touched.
    wb.call(json!({"op": "cursor", "line": 3, "end": true}));
    wb.call(json!({"op": "type", "text": UNSAVED}));
    let unsaved = typed_and_edited.replacen("}\n", &format!("}}{UNSAVED}\n"), 1);
    assert!(unsaved.contains(TYPED), "still holds the earlier typing");
    wb.wait_text("the unsaved typing", &unsaved);
    wb.call(json!({"op": "command", "title": "Spark: Ask"}));
    wb.call(json!({"op": "input", "title": "Spark: Ask", "text": "make one bigger"}));
    let in_buffer = unsaved.replacen("    1\n", "    100\n", 1);
    wb.wait_text("the edit in the unsaved document", &in_buffer);
    let asked = p.wait_for_requests(1);
    let input = serde_json::to_string(
        asked
            .iter()
            .rev()
            .find(|r| !r.is_prewarm())
            .expect("an ask")
            .input(),
    )
    .expect("json");
    assert!(
        input.contains(UNSAVED.trim()),
        "the model saw the unsaved text: {input}"
    );
    assert_eq!(
        String::from_utf8(repo.read("src/lib.rs")).expect("utf-8"),
        on_disk,
        "nothing was written"
    );
    assert_eq!(wb.call(json!({"op": "dirty"})), json!(true));
    wb.call(json!({"op": "key", "key": "Control+z"}));
    wb.wait_text("the undo of the buffer edit", &unsaved);
    wb.call(json!({"op": "key", "key": "Control+Shift+z"}));
    wb.wait_text("the redo of the buffer edit", &in_buffer);
    wb.assert_no_prompt();
    // Back to the file on disk for what follows.
    wb.call(json!({"op": "command", "title": "File: Revert File"}));
    wb.wait_for("the revert", json!({"op": "dirty"}), |v| v == &json!(false));
    wb.wait_text("the file as on disk", &on_disk);

    // 5. An edit from the terminal reaches the open editor, with no dialog: merged into
    // unsaved changes (Ctrl+Z takes back exactly it; saving asks nothing and writes both),
    // and reloaded into a document without any.
    wb.call(json!({"op": "cursor", "line": 12, "end": true}));
    wb.call(json!({"op": "type", "text": TYPED}));
    let typed = on_disk.replace("    300\n}\n", &format!("    300\n}}{TYPED}\n"));
    wb.wait_text("the typing", &typed);
    sparkctl_apply(
        &ctl,
        &repo,
        "*** Begin Patch\n*** Update File: src/lib.rs\n@@\n-    200\n+    201\n*** End Patch\n",
    );
    let merged = typed.replacen("    200\n", "    201\n", 1);
    wb.wait_text("the terminal's edit merged", &merged);
    assert_eq!(
        String::from_utf8(repo.read("src/lib.rs")).expect("utf-8"),
        on_disk.replacen("    200\n", "    201\n", 1),
        "the terminal's edit is on disk, the typing is not"
    );
    assert_eq!(wb.call(json!({"op": "dirty"})), json!(true));
    wb.assert_no_prompt();
    wb.call(json!({"op": "key", "key": "Control+z"}));
    wb.wait_text("the undo of the terminal's edit", &typed);
    wb.call(json!({"op": "key", "key": "Control+Shift+z"}));
    wb.wait_text("its redo", &merged);
    wb.call(json!({"op": "key", "key": "Control+s"}));
    wb.wait_for("the save", json!({"op": "dirty"}), |v| v == &json!(false));
    wb.assert_no_prompt();
    assert_eq!(
        String::from_utf8(repo.read("src/lib.rs")).expect("utf-8"),
        merged
    );
    let on_disk = merged;
    sparkctl_apply(
        &ctl,
        &repo,
        "*** Begin Patch\n*** Update File: src/lib.rs\n@@\n-    1\n+    11\n*** End Patch\n",
    );
    let from_terminal = on_disk.replacen("    1\n", "    11\n", 1);
    wb.wait_text("the terminal's edit", &from_terminal);
    assert_eq!(wb.call(json!({"op": "dirty"})), json!(false));
    wb.assert_no_prompt();

    // 6. The daemon restarts: the extension notices, reconnects, and follows edits again.
    assert!(ctl.run(["stop"]).status.success());
    wb.wait_for("the lost connection", json!({"op": "statusText"}), |v| {
        v.to_string().contains("reconnecting")
    });
    let out = ctl
        .command("sparkctl")
        .env("SPARK_PROVIDER_URL", p.fake.ws_url())
        .env("SPARK_API_KEY", "sk-test-not-a-real-key")
        .arg("status")
        .output()
        .expect("sparkctl status");
    assert!(out.status.success());
    assert_ne!(ctl.daemon_pid(), Some(pid));
    wb.wait_for("the reconnection", json!({"op": "statusText"}), |v| {
        v.to_string().contains("connected to sparkd")
    });
    sparkctl_apply(
        &ctl,
        &repo,
        "*** Begin Patch\n*** Update File: src/lib.rs\n@@\n-    11\n+    12\n*** End Patch\n",
    );
    let after_restart = from_terminal.replacen("    11\n", "    12\n", 1);
    wb.wait_text("the edit after the restart", &after_restart);
    wb.assert_no_prompt();

    // 7. Spark: Cancel stops the ask in flight: its preview goes, nothing is applied anywhere.
    wb.call(json!({"op": "cursor", "line": 1}));
    wb.call(json!({"op": "command", "title": "Spark: Ask"}));
    wb.call(json!({"op": "input", "title": "Spark: Ask", "text": "never mind"}));
    wb.wait_for(
        "the preview of the ask to cancel",
        json!({"op": "decorations"}),
        |v| v.to_string().contains("3000"),
    );
    wb.call(json!({"op": "command", "title": "Spark: Cancel"}));
    wb.wait_for("the preview to go", json!({"op": "decorations"}), |v| {
        v == &json!([])
    });
    wb.wait_for("the cancel's message", json!({"op": "statusText"}), |v| {
        v.to_string().contains("cancelled; nothing was applied")
    });
    assert_eq!(wb.text(), after_restart);
    assert_eq!(
        String::from_utf8(repo.read("src/lib.rs")).expect("utf-8"),
        after_restart
    );
    assert_eq!(wb.call(json!({"op": "dirty"})), json!(false));
    wb.assert_no_prompt();

    // 8. Spark: Undo reverts the newest edit (the terminal's second) on disk and in the editor.
    wb.call(json!({"op": "command", "title": "Spark: Undo"}));
    wb.wait_text("the undone edit in the editor", &from_terminal);
    assert_eq!(
        String::from_utf8(repo.read("src/lib.rs")).expect("utf-8"),
        from_terminal
    );
    wb.wait_for("the undo's message", json!({"op": "statusText"}), |v| {
        v.to_string().contains("undid edit")
    });
    assert_eq!(wb.call(json!({"op": "dirty"})), json!(false));
    wb.assert_no_prompt();

    // 9. Spark: Stash reverts the newest applied edit (the terminal's first) and puts it on
    // `git stash`.
    wb.call(json!({"op": "command", "title": "Spark: Stash"}));
    wb.wait_text("the stashed edit gone from the editor", &on_disk);
    assert_eq!(
        String::from_utf8(repo.read("src/lib.rs")).expect("utf-8"),
        on_disk
    );
    let stashes = repo.git(&["stash", "list"]);
    assert!(
        stashes.lines().count() == 1 && stashes.contains("spark: from the terminal"),
        "{stashes}"
    );
    assert_eq!(wb.call(json!({"op": "dirty"})), json!(false));
    wb.assert_no_prompt();

    // 10. Spark: Status tells which daemon runs (the restarted one).
    let restarted = ctl.daemon_pid().expect("the restarted daemon");
    wb.call(json!({"op": "command", "title": "Spark: Status"}));
    wb.wait_for("the status", json!({"op": "prompts"}), |v| {
        v["notifications"]
            .to_string()
            .contains(&format!("(pid {restarted}), up"))
    });

    // 11. Show Log: a quick pick of the edits; choosing one opens its diff.
    wb.call(json!({"op": "command", "title": "Spark: Show Log"}));
    wb.call(json!({"op": "pick", "hasText": "make two bigger"}));
    let diff = wb.wait_for("the diff editor", json!({"op": "diffEditors"}), |v| {
        v.to_string().contains("200")
    });
    let original = diff["original"].to_string();
    let modified = diff["modified"].to_string();
    assert!(
        original.contains("\"    2\"") && !original.contains("200"),
        "{diff}"
    );
    assert!(
        modified.contains("\"    200\"") && modified.contains("// doubled"),
        "{diff}"
    );

    assert_eq!(
        wb.call(json!({"op": "blocked"})),
        json!([]),
        "nothing left loopback"
    );
}
