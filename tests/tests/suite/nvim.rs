//! The Neovim plugin (`editors/nvim`) in a real headless Neovim against a real daemon and the
//! fake provider: what the user sees in the buffer (text, extmarks, cursor, undo, messages) and
//! on disk. Neovim is driven over msgpack-RPC (`--embed`), each request bounded by a timeout;
//! every wait is a `vim.wait` on a condition inside Neovim, bounded by a deadline.
//!
//! Neovim ≥ 0.10 comes from `SPARK_TEST_NVIM` (`.ci/run` installs one) or `PATH`; without one,
//! these tests say so loudly on stderr and pass without running.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spark_proto::methods::{ApplyParams, EditApply};
use spark_tests::fake_provider::{Gate, Script, Turn};
use spark_tests::{Ctl, InProcess, Provider, TestRepo, bin, pid_alive};

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

/// A headless Neovim with the plugin loaded, killed on drop. Driven over msgpack-RPC on its
/// stdin/stdout with a read timeout, so a Neovim stuck at a prompt fails the test instead of hanging.
struct Nvim {
    child: Child,
    rpc: std::cell::RefCell<Rpc>,
    _dir: tempfile::TempDir,
}

/// The client end of Neovim's msgpack-RPC socket: one request at a time.
struct Rpc {
    stream: std::os::unix::net::UnixStream,
    next_id: u32,
    buf: Vec<u8>,
}

/// Longest Neovim may take to answer one request (it answers in microseconds unless blocked).
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

impl Rpc {
    fn new(stream: std::os::unix::net::UnixStream) -> Rpc {
        stream
            .set_read_timeout(Some(RPC_TIMEOUT))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(RPC_TIMEOUT))
            .expect("write timeout");
        Rpc {
            stream,
            next_id: 0,
            buf: Vec::new(),
        }
    }

    /// `nvim_exec_lua(code, args)`; the result, or Neovim's error message.
    fn exec_lua(&mut self, code: &str, args: &[&str]) -> Result<Value, String> {
        use std::io::{Read, Write};
        self.next_id += 1;
        let id = self.next_id;
        let mut req = vec![0x94, 0x00, 0xce];
        req.extend_from_slice(&id.to_be_bytes());
        mp_str(&mut req, "nvim_exec_lua");
        req.push(0x92);
        mp_str(&mut req, code);
        req.push(0xdd);
        req.extend_from_slice(&(args.len() as u32).to_be_bytes());
        for a in args {
            mp_str(&mut req, a);
        }
        self.stream
            .write_all(&req)
            .map_err(|e| format!("write to nvim: {e}"))?;
        loop {
            let mut at = 0;
            if let Some(msg) = mp_decode(&self.buf, &mut at) {
                self.buf.drain(..at);
                // [1, id, error, result]; notifications ([2, …]) are not ours.
                if msg[0] == json!(1) && msg[1] == json!(id) {
                    return match &msg[2] {
                        Value::Null => Ok(msg[3].clone()),
                        e => Err(e.to_string()),
                    };
                }
                continue;
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("nvim closed its socket".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => {
                    return Err(format!(
                        "no answer from nvim within {RPC_TIMEOUT:?} (blocked at a prompt?): {e}"
                    ));
                }
            }
        }
    }
}

fn mp_str(out: &mut Vec<u8>, s: &str) {
    out.push(0xdb);
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One msgpack value from `b` at `at` (advanced past it), or `None` if `b` ends first.
/// Binary and extension values (buffer, window handles) decode to their payload's length only.
fn mp_decode(b: &[u8], at: &mut usize) -> Option<Value> {
    fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> Option<&'a [u8]> {
        let s = b.get(*at..*at + n)?;
        *at += n;
        Some(s)
    }
    fn uint(b: &[u8], at: &mut usize, n: usize) -> Option<u64> {
        Some(
            take(b, at, n)?
                .iter()
                .fold(0u64, |acc, x| (acc << 8) | u64::from(*x)),
        )
    }
    fn int(b: &[u8], at: &mut usize, n: usize) -> Option<i64> {
        let v = uint(b, at, n)?;
        let shift = 64 - 8 * n as u32;
        Some(((v << shift) as i64) >> shift)
    }
    fn text(b: &[u8], at: &mut usize, n: usize) -> Option<Value> {
        Some(Value::String(
            String::from_utf8_lossy(take(b, at, n)?).into_owned(),
        ))
    }
    fn array(b: &[u8], at: &mut usize, n: usize) -> Option<Value> {
        (0..n)
            .map(|_| mp_decode(b, at))
            .collect::<Option<Vec<_>>>()
            .map(Value::Array)
    }
    fn map(b: &[u8], at: &mut usize, n: usize) -> Option<Value> {
        let mut m = serde_json::Map::new();
        for _ in 0..n {
            let k = mp_decode(b, at)?;
            let v = mp_decode(b, at)?;
            m.insert(k.as_str().map_or_else(|| k.to_string(), str::to_owned), v);
        }
        Some(Value::Object(m))
    }
    let tag = *take(b, at, 1)?.first()?;
    Some(match tag {
        0x00..=0x7f => json!(tag),
        0x80..=0x8f => map(b, at, usize::from(tag & 0x0f))?,
        0x90..=0x9f => array(b, at, usize::from(tag & 0x0f))?,
        0xa0..=0xbf => text(b, at, usize::from(tag & 0x1f))?,
        0xc0 => Value::Null,
        0xc2 => json!(false),
        0xc3 => json!(true),
        0xc4..=0xc6 => {
            let n = uint(b, at, 1 << (tag - 0xc4))? as usize;
            take(b, at, n)?;
            json!(n)
        }
        0xc7..=0xc9 => {
            let n = uint(b, at, 1 << (tag - 0xc7))? as usize;
            take(b, at, n + 1)?;
            json!(n)
        }
        0xca => json!(f32::from_bits(uint(b, at, 4)? as u32)),
        0xcb => json!(f64::from_bits(uint(b, at, 8)?)),
        0xcc..=0xcf => json!(uint(b, at, 1 << (tag - 0xcc))?),
        0xd0..=0xd3 => json!(int(b, at, 1 << (tag - 0xd0))?),
        0xd4..=0xd8 => {
            let n = 1usize << (tag - 0xd4);
            take(b, at, n + 1)?;
            json!(n)
        }
        0xd9..=0xdb => {
            let n = uint(b, at, 1 << (tag - 0xd9))? as usize;
            text(b, at, n)?
        }
        0xdc | 0xdd => {
            let n = uint(b, at, if tag == 0xdc { 2 } else { 4 })? as usize;
            array(b, at, n)?
        }
        0xde | 0xdf => {
            let n = uint(b, at, if tag == 0xde { 2 } else { 4 })? as usize;
            map(b, at, n)?
        }
        0xe0..=0xff => json!(i64::from(tag as i8)),
        0xc1 => Value::Null,
    })
}

impl Nvim {
    /// Start in `cwd`, with `SPARK_HOME` = `home` and `sparkctl` on `PATH`.
    fn start(program: PathBuf, home: &Path, cwd: &Path) -> Nvim {
        let dir = tempfile::Builder::new()
            .prefix("nv")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let init = dir.path().join("init.lua");
        std::fs::write(
            &init,
            format!(
                r#"vim.opt.rtp:prepend({plugin:?})
vim.cmd("runtime plugin/spark.lua")
require("spark").setup({{}})
vim.o.swapfile = false
_G.T = function(code)
  local ok, v = pcall(assert(loadstring(code)))
  return vim.json.encode({{ ok = ok, v = v }})
end
_G.W = function(code, ms)
  local f = assert(loadstring(code))
  local got
  local ok, err = pcall(vim.wait, tonumber(ms), function()
    local v = f()
    if v ~= nil and v ~= false then
      got = v
      return true
    end
    return false
  end, 5)
  return vim.json.encode({{ ok = ok, done = got ~= nil, v = ok and got or err }})
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
        // Neovim speaks msgpack-RPC on its stdin and stdout (`--embed`): one end of a socket
        // pair, so there is no socket file to wait for and reads can time out.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let theirs_out = theirs.try_clone().expect("clone");
        let child = Command::new(&program)
            .args(["--headless", "--embed", "--clean", "-u"])
            .arg(&init)
            .current_dir(cwd)
            .env_clear()
            .env("PATH", path)
            .env("HOME", dir.path())
            .env("SPARK_HOME", home)
            .env("SPARK_IDLE_TIMEOUT", "120")
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs_out)))
            .stderr(Stdio::null())
            .spawn()
            .expect("start nvim");
        let mut rpc = Rpc::new(ours);
        // init.lua has run once Neovim answers a request.
        rpc.exec_lua("return 1", &[]).expect("nvim answers");
        Nvim {
            child,
            rpc: std::cell::RefCell::new(rpc),
            _dir: dir,
        }
    }

    /// Run Lua in the editor and return its (JSON-encoded) result.
    fn lua(&self, code: &str) -> Value {
        let raw = self
            .rpc
            .borrow_mut()
            .exec_lua("return T(...)", &[code])
            .unwrap_or_else(|e| panic!("{e}\nlua: {code}"));
        let v: Value = serde_json::from_str(raw.as_str().expect("T answers JSON text"))
            .expect("T answers JSON");
        assert_eq!(v["ok"], json!(true), "lua failed: {code}\n{}", v["v"]);
        v["v"].clone()
    }

    /// Wait until `code` returns something other than false/nil: Neovim evaluates it each time
    /// its event loop wakes (`vim.wait`), so the wait ends on the event that makes it true.
    fn wait_for(&self, what: &str, code: &str) -> Value {
        let ms = DEADLINE.as_millis().to_string();
        let raw = self
            .rpc
            .borrow_mut()
            .exec_lua("return W(...)", &[code, &ms])
            .unwrap_or_else(|e| panic!("{e}\nwaiting for {what}: {code}"));
        let v: Value = serde_json::from_str(raw.as_str().expect("W answers JSON text"))
            .expect("W answers JSON");
        assert_eq!(v["ok"], json!(true), "lua failed: {code}\n{}", v["v"]);
        assert!(
            v["done"] == json!(true),
            "timed out waiting for {what}; messages:\n{}",
            self.messages()
        );
        v["v"].clone()
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
    let mut total = 0;
    loop {
        let all = p
            .wait_for_requests_within(total + 1, DEADLINE.saturating_sub(start.elapsed()))
            .unwrap_or_else(|| panic!("the provider did not get {n} asks in time"));
        total = all.len();
        let asks: Vec<_> = all.into_iter().filter(|r| !r.is_prewarm()).collect();
        if asks.len() >= n {
            return asks;
        }
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
    // Deltas reach the buffer one by one: wait until the removed line and both added lines
    // show (two marks, the second with two virtual lines; it has one while the patch is
    // still arriving), then check them exactly.
    let marks = nv.wait_for(
        "the preview extmarks of the whole patch",
        &PREVIEW_MARKS.replace("if #out == 0 then", "if #out < 2 or #out[2].virt < 2 then"),
    );
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

    // `:SparkUndo` takes the recorded edit back on disk, and the buffer follows.
    nv.lua("vim.cmd('SparkUndo')");
    nv.wait_for(
        "the undone edit in the buffer",
        &format!("return table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\\n') .. '\\n' == {LIB:?}"),
    );
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());
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

    // :checkhealth reports the socket and the daemon the plugin talks to.
    nv.lua("vim.cmd('checkhealth spark')");
    let report = nv
        .lua("return table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\\n')")
        .as_str()
        .expect("text")
        .to_owned();
    let socket = ctl.home.path().join("run/sparkd.sock");
    assert!(
        report.contains(&format!("socket: {}", socket.display())),
        "{report}"
    );
    assert!(
        report.contains(&format!("(pid {second}), protocol 1")),
        "{report}"
    );
    assert!(!report.contains("ERROR"), "{report}");
}

/// The buffer's text, compared in Neovim so a wait can end on it.
fn buffer_is(text: &str) -> String {
    format!(
        "return table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\\n') .. '\\n' == {text:?}"
    )
}

fn message_has(pattern: &str) -> String {
    format!(
        "return vim.api.nvim_exec2('messages', {{ output = true }}).output:find({pattern:?}, 1, true) ~= nil"
    )
}

/// An ask held mid-stream, with `src/lib.rs` open and typed into (unsaved) at its top.
struct Held {
    hold: Gate,
    p: Provider,
    _d: spark_tests::InProcess,
    repo: TestRepo,
    nv: Nvim,
}

fn held_ask_on_an_unsaved_buffer(program: PathBuf) -> Held {
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
    nv.edit(&repo.path().join("src/lib.rs"), 1);
    nv.lua("vim.cmd('normal! O// typed before asking')");
    nv.lua("vim.cmd('SparkAsk make two bigger')");
    nv.wait_for("the preview extmarks", PREVIEW_MARKS);
    let asked = wait_for_asks(&p, 1);
    let input = serde_json::to_string(asked.last().expect("ask").input()).expect("json");
    assert!(
        input.contains("typed before asking"),
        "the model sees the unsaved buffer: {input}"
    );
    Held {
        hold,
        p,
        _d: d,
        repo,
        nv,
    }
}

#[test]
fn typing_during_the_stream_merges_with_the_edit_of_an_unsaved_buffer_and_u_reverts_only_the_edit()
{
    let Some(program) = nvim_program() else {
        return;
    };
    let Held {
        hold,
        p: _p,
        _d,
        repo,
        nv,
    } = held_ask_on_an_unsaved_buffer(program);
    // Typing while the model writes, away from the lines it changes.
    nv.lua("vim.cmd('normal! Go// typed while it streams')");
    hold.open();
    let before = "// typed before asking\n";
    let during = "// typed while it streams\n";
    let merged = format!("{before}{EDITED}{during}");
    nv.wait_for("the merged edit", &buffer_is(&merged));
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.as_bytes(),
        "unsaved text is never written behind the user's back"
    );
    assert_eq!(nv.lua("return vim.bo.modified"), json!(true));
    assert!(
        repo.git(&["stash", "list"]).is_empty(),
        "nothing on disk changed, so nothing is recorded"
    );
    nv.wait_for(
        "the result message",
        &message_has("spark: edited 1 unsaved buffer"),
    );

    // `u` takes back the edit only: both lines the user typed stay.
    nv.lua("vim.cmd('normal! u')");
    assert_eq!(nv.lines(), format!("{before}{LIB}{during}"));
    nv.lua("vim.cmd('normal! \\18')"); // <C-r>
    assert_eq!(nv.lines(), merged);
    // So does `:SparkUndo`, in the buffer (the edit was never on disk).
    nv.lua("vim.cmd('SparkUndo')");
    assert_eq!(nv.lines(), format!("{before}{LIB}{during}"));
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());
    nv.assert_no_prompt();
}

#[test]
fn an_edit_overlapping_what_the_user_typed_meanwhile_applies_nothing_and_says_so_once() {
    let Some(program) = nvim_program() else {
        return;
    };
    let Held {
        hold,
        p: _p,
        _d,
        repo,
        nv,
    } = held_ask_on_an_unsaved_buffer(program);
    // The user rewrites the very line the model is changing.
    nv.lua("vim.api.nvim_win_set_cursor(0, { 7, 0 }); vim.cmd('normal! ccmine = 2')");
    let typed = nv.lines();
    assert!(typed.contains("mine = 2\n"), "{typed}");
    hold.open();
    nv.wait_for(
        "the refusal",
        &message_has("overlaps what you typed since asking in src/lib.rs"),
    );
    assert_eq!(nv.lines(), typed, "the user's text is untouched");
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());
    let m = nv.messages();
    assert_eq!(m.matches("overlaps").count(), 1, "said once: {m}");
    nv.lua("vim.cmd('normal! u')");
    assert!(
        !nv.lines().contains("mine = 2"),
        "the user's own change is the last undo step"
    );
    nv.assert_no_prompt();
}

#[test]
fn the_cancel_key_stops_the_ask_mid_stream_and_nothing_lands() {
    let Some(program) = nvim_program() else {
        return;
    };
    let Held {
        hold,
        p: _p,
        _d,
        repo,
        nv,
    } = held_ask_on_an_unsaved_buffer(program);
    let typed = nv.lines();
    // Typed and run through the mappings at once ('x'): nvim_input() would queue it behind
    // the test's own requests and raise an interrupt that ends every wait.
    nv.lua("vim.api.nvim_feedkeys(vim.keycode('<C-c>'), 'mx', false)");
    nv.wait_for("the cancellation", &message_has("spark: cancelled"));
    hold.open();
    assert_eq!(nv.lines(), typed);
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());
    nv.wait_for(
        "the preview to clear",
        "return #vim.api.nvim_buf_get_extmarks(0, vim.api.nvim_get_namespaces().spark_preview, 0, -1, {}) == 0",
    );
    assert_eq!(
        nv.lua("return vim.fn.maparg('<C-c>', 'n')"),
        json!(""),
        "the key is mapped only while an ask runs"
    );
    nv.assert_no_prompt();
}

#[test]
fn typing_into_a_saved_buffer_during_the_stream_merges_with_the_edit_written_to_disk() {
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
    nv.edit(&repo.path().join("src/lib.rs"), 10);
    nv.lua("vim.cmd('SparkAsk make two bigger')");
    nv.wait_for("the preview extmarks", PREVIEW_MARKS);
    wait_for_asks(&p, 1);
    // The buffer was saved when asking; the user types while the model writes.
    nv.lua("vim.cmd('normal! Go// typed while it streams')");
    hold.open();
    let typed = "// typed while it streams\n";
    nv.wait_for(
        "the edit merged with the typing",
        &buffer_is(&format!("{EDITED}{typed}")),
    );
    assert_eq!(
        repo.read("src/lib.rs"),
        EDITED.as_bytes(),
        "the edit is on disk, the typing is not"
    );
    assert_eq!(nv.lua("return vim.bo.modified"), json!(true));
    nv.wait_for("the result message", &message_has("spark: edit "));
    nv.lua("vim.cmd('normal! u')");
    assert_eq!(
        nv.lines(),
        format!("{LIB}{typed}"),
        "`u` takes back the edit only"
    );
    nv.lua("vim.cmd('checktime')");
    nv.assert_no_prompt();
}

/// `fn main() {`, `let x_1 = 1;` … `let x_9998 = 9998;`, `}`: 10,000 lines.
fn big_file() -> Vec<String> {
    let mut lines = vec!["fn main() {".to_owned()];
    lines.extend((1..=9998).map(|k| format!("let x_{k} = {k};")));
    lines.push("}".to_owned());
    lines
}

fn text_of(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

#[test]
fn a_daemon_edit_in_three_far_apart_places_of_a_saved_10000_line_buffer_is_one_undo_step_keeping_cursors_marks_and_extmarks()
 {
    let Some(program) = nvim_program() else {
        return;
    };
    let d = InProcess::start();
    let before = big_file();
    let repo = TestRepo::with_files(&[("big.rs", text_of(&before).as_bytes())]);
    let nv = Nvim::start(program, d.home.path(), repo.path());
    nv.edit(&repo.path().join("big.rs"), 5000);
    nv.lua("require('spark')._client.ensure(function() end)");
    nv.wait_for(
        "the connection",
        "return require('spark')._client.is_ready()",
    );
    // What the user has on untouched lines: a cursor, a second window scrolled elsewhere, a
    // local and a file mark, and another plugin's extmarks.
    nv.lua(
        "vim.api.nvim_buf_set_mark(0, 'a', 5000, 4, {}) \
         vim.api.nvim_buf_set_mark(0, 'B', 9995, 0, {}) \
         local ns = vim.api.nvim_create_namespace('other_plugin') \
         vim.api.nvim_buf_set_extmark(0, ns, 99, 2, {}) \
         vim.api.nvim_buf_set_extmark(0, ns, 8999, 3, {}) \
         _G.first_win = vim.api.nvim_get_current_win() \
         vim.cmd('split') \
         vim.api.nvim_win_set_cursor(0, { 7000, 2 }) \
         vim.fn.winrestview({ topline = 6995 })",
    );
    assert_eq!(
        nv.lua("return { vim.fn.line('w0'), vim.fn.line('.') }"),
        json!([6995, 7000])
    );

    // A line inserted near the top, one changed in the middle, one deleted near the end.
    let patch = "*** Begin Patch\n*** Update File: big.rs\n\
        @@ fn main() {\n let x_1 = 1;\n+// inserted near the top\n\
        @@\n let x_5998 = 5998;\n-let x_5999 = 5999;\n+let x_5999 = 59990;\n let x_6000 = 6000;\n\
        @@\n let x_9989 = 9989;\n-let x_9990 = 9990;\n let x_9991 = 9991;\n\
        *** End Patch\n";
    let mut after = before.clone();
    after.remove(9990); // line 9991
    after[5999] = "let x_5999 = 59990;".to_owned(); // line 6000
    after.insert(2, "// inserted near the top".to_owned()); // becomes line 3
    d.client()
        .call::<EditApply>(&ApplyParams {
            cwd: repo.cwd(),
            patch: patch.to_owned(),
            dry_run: false,
            source: Some("test".into()),
            message: Some("three places".into()),
        })
        .expect("edit/apply");
    assert_eq!(repo.read("big.rs"), text_of(&after).as_bytes());
    nv.wait_for(
        "the edit in the buffer",
        "return vim.api.nvim_buf_get_lines(0, 2, 3, false)[1] == '// inserted near the top'",
    );
    assert_eq!(nv.lines(), text_of(&after));
    assert_eq!(
        nv.lua("return vim.bo.modified"),
        json!(false),
        "the buffer matches the file"
    );
    // Everything stays on its text: one line was inserted above all of it, and one deleted
    // between the extmark at line 9000 and the mark at line 9995.
    assert_eq!(
        nv.lua(
            "local ns = vim.api.nvim_get_namespaces().other_plugin \
             local marks = {} \
             for _, m in ipairs(vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, {})) do \
               table.insert(marks, { m[2], m[3] }) \
             end \
             return { \
               first = vim.api.nvim_win_get_cursor(_G.first_win), \
               second = { vim.fn.line('w0'), vim.fn.line('.'), vim.fn.col('.') }, \
               a = vim.api.nvim_buf_get_mark(0, 'a'), \
               B = vim.api.nvim_buf_get_mark(0, 'B'), \
               extmarks = marks, \
             }"
        ),
        json!({
            "first": [5001, 4],
            "second": [6996, 7001, 3],
            "a": [5001, 4],
            "B": [9995, 0],
            "extmarks": [[100, 2], [9000, 3]],
        })
    );
    nv.lua("vim.cmd('checktime')");
    nv.assert_no_prompt();

    // One `u` takes back all three places, and the buffer no longer matches the file.
    nv.lua("vim.cmd('normal! u')");
    assert_eq!(nv.lines(), text_of(&before));
    assert_eq!(nv.lua("return vim.bo.modified"), json!(true));
    nv.lua("vim.cmd('normal! u')");
    assert_eq!(
        nv.lines(),
        text_of(&before),
        "the edit was one undo step; nothing older to undo"
    );
    nv.lua("vim.cmd('normal! \\18')"); // <C-r>
    assert_eq!(nv.lines(), text_of(&after));
    assert_eq!(nv.lua("return vim.bo.modified"), json!(false));
    nv.lua("vim.cmd('checktime')");
    nv.assert_no_prompt();
}

#[test]
fn every_ask_sends_the_unsaved_buffer_as_it_is_at_that_ask() {
    let Some(program) = nvim_program() else {
        return;
    };
    let p = Provider::start(Script::new().default_turn(Turn::text("nothing to change")));
    let d = p.daemon(true);
    let repo = lib_repo();
    let nv = Nvim::start(program, d.home.path(), repo.path());
    nv.edit(&repo.path().join("src/lib.rs"), 1);
    let ask = |n: usize| {
        nv.lua("vim.cmd('SparkAsk look')");
        nv.wait_for("the answer", "return require('spark')._current() == nil");
        let asked = wait_for_asks(&p, n);
        serde_json::to_string(asked.last().expect("ask").input()).expect("json")
    };
    nv.lua("vim.cmd('normal! Oconst FIRST: u8 = 1;')");
    let first = ask(1);
    assert!(first.contains("const FIRST: u8 = 1;"), "{first}");
    // Typed after the first ask: the second one sends the new text, which the daemon shows
    // the model as a change since the first ask.
    nv.lua("vim.cmd('normal! Goconst SECOND: u8 = 2;')");
    let second = ask(2);
    assert!(second.contains("+const SECOND: u8 = 2;"), "{second}");
    // Unchanged since: the same text again, and the daemon tells the model so.
    let third = ask(3);
    assert!(third.contains("is unchanged since"), "{third}");
    // A change that leaves the line count and the cursor where they were.
    nv.lua("vim.cmd('normal! gg0rX')");
    let fourth = ask(4);
    assert!(fourth.contains("-const FIRST: u8 = 1;"), "{fourth}");
    assert!(fourth.contains("+Xonst FIRST: u8 = 1;"), "{fourth}");
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());
    nv.assert_no_prompt();
}

/// The reload splits a file reusing the buffer's unchanged first and last lines
/// (`buffers.split_like`): for any buffer and any file, the lines are those of a full split.
#[test]
fn the_reload_reads_a_file_into_the_lines_a_full_split_gives() {
    let Some(program) = nvim_program() else {
        return;
    };
    let repo = lib_repo();
    let home = tempfile::tempdir().expect("home");
    let nv = Nvim::start(program, home.path(), repo.path());
    let bad = nv.lua(
        "local b = require('spark.buffers') \
         local buf = vim.api.nvim_create_buf(false, true) \
         vim.bo[buf].fileformat = 'unix' \
         math.randomseed(12) \
         local alphabet = { '', 'a', 'b', 'ab', 'a\\r', 'ba', '\\t', 'x y' } \
         local function pick() return alphabet[math.random(#alphabet)] end \
         for _ = 1, 3000 do \
           local known = {} \
           for i = 1, math.random(0, 8) do known[i] = pick() end \
           local new = vim.deepcopy(known) \
           for _ = 1, math.random(0, 3) do \
             local op = math.random(3) \
             if op == 1 then table.insert(new, math.random(#new + 1), pick()) \
             elseif op == 2 and #new > 0 then table.remove(new, math.random(#new)) \
             elseif #new > 0 then new[math.random(#new)] = pick() end \
           end \
           local data = table.concat(new, '\\n') \
           if math.random(4) > 1 and #new > 0 then data = data .. '\\n' end \
           if math.random(10) == 1 then data = data .. '\\n\\n' end \
           if not vim.deep_equal(b.split(data, buf), b.split_like(data, buf, known)) then \
             return { known = known, data = data } \
           end \
         end \
         return vim.NIL",
    );
    assert_eq!(bad, Value::Null, "split_like differs from split");
}
