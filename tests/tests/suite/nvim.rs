//! The Neovim plugin (`editors/nvim`) in a real headless Neovim against a real daemon and the
//! fake provider: what the user sees in the buffer (text, extmarks, cursor, undo, messages) and
//! on disk. Neovim is driven over its RPC socket (`--listen`) with `nvim --server … --remote-expr`;
//! every wait polls Neovim's state against a deadline.
//!
//! Neovim ≥ 0.10 comes from `SPARK_TEST_NVIM` (`.ci/run` installs one) or `PATH`; without one,
//! these tests say so loudly on stderr and pass without running.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spark_tests::fake_provider::{Gate, Script, Turn};
use spark_tests::{Ctl, Provider, TestRepo, bin, pid_alive};

const LIB: &str = "fn one() {\n    1\n}\n\nfn two() {\n    2\n}\n\nfn three() {\n    3\n}\n";
const PATCH_TWO: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn two() {\n-    2\n+    200\n+    // doubled\n*** End Patch\n";
const EDITED: &str =
    "fn one() {\n    1\n}\n\nfn two() {\n    200\n    // doubled\n}\n\nfn three() {\n    3\n}\n";
const DEADLINE: Duration = Duration::from_secs(20);

/// Neovim to test with, or `None` (and a loud note) when there is none new enough.
fn nvim_program() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("SPARK_TEST_NVIM") {
        Some(p) if !p.is_empty() => vec![PathBuf::from(p)],
        _ => vec![PathBuf::from("nvim")],
    };
    for c in candidates {
        let Ok(out) = Command::new(&c).arg("--version").output() else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let minor = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("NVIM v0."))
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse::<u32>().ok());
        if text.starts_with("NVIM v") && minor.is_none_or(|m| m >= 10) {
            return Some(c);
        }
    }
    eprintln!(
        "\n!!! SKIPPED: no Neovim >= 0.10 found (set SPARK_TEST_NVIM or put nvim on PATH; \
         .ci/run installs one); the editors/nvim tests did not run !!!\n"
    );
    None
}

fn plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("editors/nvim")
}

/// A headless Neovim with the plugin loaded, killed on drop.
struct Nvim {
    program: PathBuf,
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Nvim {
    /// Start in `cwd`, with `SPARK_HOME` = `home` and `sparkctl` on `PATH`.
    fn start(program: PathBuf, home: &Path, cwd: &Path) -> Nvim {
        let dir = tempfile::Builder::new()
            .prefix("nv")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let socket = dir.path().join("nvim.sock");
        let init = dir.path().join("init.lua");
        std::fs::write(
            &init,
            format!(
                r#"vim.opt.rtp:prepend({plugin:?})
vim.cmd("runtime plugin/spark.lua")
require("spark").setup({{}})
vim.o.swapfile = false
_G.T = function(hex)
  local code = hex:gsub("..", function(h) return string.char(tonumber(h, 16)) end)
  local ok, v = pcall(assert(loadstring(code)))
  return vim.json.encode({{ ok = ok, v = v }})
end
"#,
                plugin = plugin_dir().display().to_string()
            ),
        )
        .expect("write init.lua");
        let ctl_dir = bin("sparkctl").parent().expect("bin dir").to_path_buf();
        let mut path = OsString::from(ctl_dir);
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        let child = Command::new(&program)
            .args(["--headless", "--clean", "-u"])
            .arg(&init)
            .arg("--listen")
            .arg(&socket)
            .current_dir(cwd)
            .env_clear()
            .env("PATH", path)
            .env("HOME", dir.path())
            .env("SPARK_HOME", home)
            .env("SPARK_IDLE_TIMEOUT", "120")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nvim");
        let nvim = Nvim {
            program,
            child,
            socket,
            _dir: dir,
        };
        let start = Instant::now();
        while nvim.try_lua("return 1").is_none() {
            assert!(start.elapsed() < DEADLINE, "nvim did not come up");
            std::thread::yield_now();
        }
        nvim
    }

    fn try_lua(&self, code: &str) -> Option<Value> {
        if !self.socket.exists() {
            return None;
        }
        let hex: String = code.bytes().map(|b| format!("{b:02x}")).collect();
        let out = Command::new(&self.program)
            .args(["--headless", "--clean", "--server"])
            .arg(&self.socket)
            .arg("--remote-expr")
            .arg(format!("luaeval('T(_A)', '{hex}')"))
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(text.trim()).ok()?;
        assert_eq!(v["ok"], json!(true), "lua failed: {code}\n{}", v["v"]);
        Some(v["v"].clone())
    }

    /// Run Lua in the editor and return its (JSON-encoded) result.
    fn lua(&self, code: &str) -> Value {
        self.try_lua(code)
            .unwrap_or_else(|| panic!("no answer from nvim for: {code}"))
    }

    /// Poll `code` until it returns something other than false/nil.
    fn wait_for(&self, what: &str, code: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.lua(code);
            if !(v.is_null() || v == json!(false)) {
                return v;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; messages:\n{}",
                self.messages()
            );
            std::thread::yield_now();
        }
    }

    fn lines(&self) -> String {
        let v = self.lua("return vim.api.nvim_buf_get_lines(0, 0, -1, false)");
        let mut s: String = v
            .as_array()
            .expect("lines")
            .iter()
            .map(|l| format!("{}\n", l.as_str().expect("line")))
            .collect();
        if s.is_empty() {
            s.push('\n');
        }
        s
    }

    fn messages(&self) -> String {
        self.lua("return vim.api.nvim_exec2('messages', { output = true }).output")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// No prompt was ever shown: no error, not waiting at a hit-enter or confirm prompt, and
    /// nothing about a file changed on disk.
    fn assert_no_prompt(&self) {
        let v = self.lua(
            "return { err = vim.v.errmsg, mode = vim.api.nvim_get_mode().mode, \
             blocking = vim.api.nvim_get_mode().blocking, warn = vim.v.warningmsg }",
        );
        assert_eq!(v["err"], json!(""), "v:errmsg: {v}");
        assert_eq!(v["mode"], json!("n"), "mode: {v}");
        assert_eq!(v["blocking"], json!(false), "blocking: {v}");
        let m = self.messages();
        assert!(!m.contains("W12") && !m.contains("W11"), "messages: {m}");
        assert!(!m.contains("changed since"), "messages: {m}");
    }

    fn edit(&self, path: &Path, line: u32) {
        self.lua(&format!(
            "vim.cmd.edit({:?}); vim.api.nvim_win_set_cursor(0, {{ {line}, 4 }})",
            path.display().to_string()
        ));
    }

    fn cursor(&self) -> Value {
        self.lua("return vim.api.nvim_win_get_cursor(0)")
    }
}

impl Drop for Nvim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait until the provider has received `n` generating requests (prewarms not counted).
fn wait_for_asks(p: &Provider, n: usize) -> Vec<spark_tests::fake_provider::Recorded> {
    let start = Instant::now();
    loop {
        let asks: Vec<_> = p
            .fake
            .requests()
            .into_iter()
            .filter(|r| !r.is_prewarm())
            .collect();
        if asks.len() >= n {
            return asks;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the provider got {} asks, not {n}",
            asks.len()
        );
        std::thread::yield_now();
    }
}

fn lib_repo() -> TestRepo {
    TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())])
}

/// Extmarks of the preview namespace in the current buffer, with details.
const PREVIEW_MARKS: &str = "local ns = vim.api.nvim_get_namespaces().spark_preview \
    local out = {} \
    for _, m in ipairs(vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })) do \
      local d = m[4] \
      local virt = {} \
      for _, vl in ipairs(d.virt_lines or {}) do table.insert(virt, vl[1][1]) end \
      table.insert(out, { row = m[2], hl = d.line_hl_group or vim.NIL, virt = virt }) \
    end \
    if #out == 0 then return false end \
    return out";

#[test]
fn ask_with_a_selection_previews_mid_stream_lands_and_u_reverts_exactly_the_edit() {
    let Some(program) = nvim_program() else {
        return;
    };
    let hold = Gate::new();
    let p = Provider::start(
        Script::new().turn(
            Turn::apply_patch(PATCH_TWO)
                .hold_before("response.custom_tool_call_input.done", hold.clone()),
        ),
    );
    let d = p.daemon(true);
    let repo = lib_repo();
    let nv = Nvim::start(program, d.home.path(), repo.path());
    let file = repo.path().join("src/lib.rs");
    nv.edit(&file, 10);

    nv.lua("vim.cmd('5,7SparkAsk make two bigger')");

    // Mid-stream: the whole patch has streamed, the response is held before its end.
    let marks = nv.wait_for("the preview extmarks", PREVIEW_MARKS);
    assert_eq!(
        marks,
        json!([
            { "row": 5, "hl": "DiffDelete", "virt": [] },
            { "row": 5, "hl": null, "virt": ["    200", "    // doubled"] },
        ]),
        "removed line 6 highlighted, the added lines shown below it"
    );
    assert_eq!(nv.lines(), LIB, "the preview changes no buffer text");
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());
    // The selection went to the daemon as focus lines and reached the model.
    let asked = wait_for_asks(&p, 1);
    let input = serde_json::to_string(asked.last().expect("ask request").input()).expect("json");
    assert!(input.contains("make two bigger"), "{input}");
    assert!(input.contains("lines 5-7"), "{input}");

    hold.open();
    nv.wait_for(
        "the edit in the buffer",
        &format!(
            "return table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\\n') .. '\\n' == {EDITED:?}"
        ),
    );
    assert_eq!(repo.read("src/lib.rs"), EDITED.as_bytes());
    assert_eq!(nv.lua("return vim.bo.modified"), json!(false));
    nv.wait_for(
        "the preview to clear",
        "return #vim.api.nvim_buf_get_extmarks(0, vim.api.nvim_get_namespaces().spark_preview, 0, -1, {}) == 0",
    );
    // The cursor stays on its text ("fn three() {" moved from line 10 to 11).
    assert_eq!(nv.cursor(), json!([11, 4]));
    nv.wait_for(
        "the result message",
        "return vim.api.nvim_exec2('messages', { output = true }).output:find('spark: edit %x+ · 1 file %+2 %-1') ~= nil",
    );
    nv.lua("vim.cmd('checktime')");
    nv.assert_no_prompt();

    // `u` takes back exactly the edit, in one step, and nothing before it.
    nv.lua("vim.cmd('normal! u')");
    assert_eq!(nv.lines(), LIB);
    nv.lua("vim.cmd('normal! u')");
    assert_eq!(
        nv.lines(),
        LIB,
        "the edit was one undo step; nothing older to undo"
    );
    nv.lua("vim.cmd('normal! \\18')"); // <C-r>
    assert_eq!(nv.lines(), EDITED);
    nv.assert_no_prompt();
}

#[test]
fn the_plugin_starts_a_cold_daemon_and_reconnects_after_a_restart() {
    let Some(program) = nvim_program() else {
        return;
    };
    let ctl = Ctl::new();
    let repo = lib_repo();
    assert!(ctl.daemon_pid().is_none_or(|pid| !pid_alive(pid)));
    let nv = Nvim::start(program, ctl.home.path(), repo.path());
    nv.edit(&repo.path().join("src/lib.rs"), 3);

    nv.lua("vim.cmd('SparkStatus')");
    nv.wait_for(
        "the status line",
        "return vim.api.nvim_exec2('messages', { output = true }).output:find('spark: sparkd %S+ %(pid %d+%)') ~= nil",
    );
    let first = ctl.daemon_pid().expect("a daemon was started");
    assert!(pid_alive(first));

    // Restart the daemon; the plugin reconnects by itself and gets events again.
    assert!(ctl.run(["stop"]).status.success());
    nv.wait_for(
        "the lost-connection message",
        "return vim.api.nvim_exec2('messages', { output = true }).output:find('reconnecting') ~= nil",
    );
    assert!(ctl.run(["status"]).status.success());
    let second = ctl.daemon_pid().expect("restarted");
    assert_ne!(first, second);
    nv.wait_for(
        "the reconnection",
        "return require('spark')._client.is_ready()",
    );
    let out = ctl
        .command("sparkctl")
        .args(["apply", "-m", "after the restart", "-"])
        .current_dir(repo.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(
                b"*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn one() {\n-    1\n+    11\n*** End Patch\n",
            )?;
            c.wait()
        })
        .expect("sparkctl apply");
    assert!(out.success());
    nv.wait_for(
        "the edit after the restart",
        "return vim.api.nvim_buf_get_lines(0, 1, 2, false)[1] == '    11'",
    );
    nv.assert_no_prompt();
}
