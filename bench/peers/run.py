#!/usr/bin/env python3
"""spark against its peers: per-edit wall time of `sparkctl ask`, `codex exec`, a warm
`codex app-server` turn and `aider --message`, each making the same one-file edit from the same
canned model output, against one fake model, on this machine, in one run.

    python3 bench/peers/run.py                 # everything, default counts
    python3 bench/peers/run.py --help          # counts, versions, what to skip

What it does:
1. builds the release binaries (sparkd, sparkctl, spark-fake-provider);
2. installs the peers into the cache dir (default bench/out/cache/, git-ignored): codex from
   npm, aider from PyPI into a virtualenv; a peer that cannot be installed is reported and
   skipped;
3. per case: starts `spark-fake-provider` (zero-latency, or paced), a fresh git repository with
   bench/peers/fixture.py's file, a private home for the tool; warm-up runs, then timed runs;
   before each run the file is reset, after it the file must read exactly the expected result
   or the run does not count; the warm `codex app-server` case keeps one app-server process and
   one thread for all its runs and times each turn (`turn/start` written -> `turn/completed` in);
4. prints tables, writes bench/out/peers.json and bench/out/peers.md, and the plots
   docs/bench-peers-latency.svg and docs/bench-spark-breakdown.svg (--plots-dir).

Standard library only. Python 3.10+.
"""

import argparse
import json
import os
import platform
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The helpers next to this script are imported from the source tree: leave no __pycache__ there.
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture  # noqa: E402
import install  # noqa: E402
import plots  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RELEASE = ROOT / "target" / "release"
# codex refuses to set up its helper binaries under a temporary directory, so the work tree for
# the runs lives in the (git-ignored) output directory.
WORK = ROOT / "bench" / "out" / "peers-work"
SIMULATED = {"ttft_ms": 200.0, "tokens_per_sec": 1000.0}
# Stop measuring a case after this many failed runs in a row.
MAX_FAILURES_IN_A_ROW = 3
# Untimed pause after each reset, before the timed run (--settle-ms).
SETTLE = {"s": 0.1}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def pct(values, q):
    s = sorted(values)
    return s[round((len(s) - 1) * q)]


def summarize(values):
    if not values:
        return None
    return {"n": len(values), "p50": pct(values, 0.5), "p90": pct(values, 0.9), "p99": pct(values, 0.99),
            "min": min(values), "max": max(values), "mean": sum(values) / len(values)}


def fmt(ms):
    if ms is None:
        return "-"
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{ms / 1000:.2f} s"


def tail(text, lines=8):
    return "\n".join((text or "").strip().splitlines()[-lines:])


# -------------------------------------------------------------------------------------------
# The fake model
# -------------------------------------------------------------------------------------------

class Fake:
    """One `spark-fake-provider` process; commands go over its stdin, answers come on stdout."""

    def __init__(self, patch_file, ttft_ms=0.0, tokens_per_sec=0.0, armed=False):
        cmd = [str(RELEASE / "spark-fake-provider"), "--patch", str(patch_file),
               "--ttft-ms", str(ttft_ms), "--tokens-per-sec", str(tokens_per_sec)]
        if armed:
            cmd.append("--armed")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("spark-fake-provider did not start")
        self.urls = json.loads(line)

    def cmd(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.terminate()
            self.proc.wait(timeout=5)


# -------------------------------------------------------------------------------------------
# Repositories, environments, timing
# -------------------------------------------------------------------------------------------

def git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, env=hermetic_env(repo), check=True, capture_output=True)


def hermetic_env(home, **extra):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def fresh_case_dir(name):
    """<work>/<name>/{repo,home}: a git repository holding the fixture, and a private home."""
    base = WORK / name
    shutil.rmtree(base, ignore_errors=True)
    repo, home = base / "repo", base / "home"
    repo.mkdir(parents=True)
    home.mkdir(mode=0o700)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "Bench User")
    git(repo, "config", "user.email", "bench@spark.invalid")
    (repo / fixture.FILE).write_text(fixture.BEFORE)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "fixture")
    return repo, home


def timed(args, cwd, env, timeout):
    t0 = time.perf_counter_ns()
    proc = subprocess.run(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)
    return (time.perf_counter_ns() - t0) / 1e6, proc


class Case:
    """One row of the results: a tool, a transport, a model speed, its samples and failures."""

    def __init__(self, key, label, tool, transport, model, runs, warmup, settle_s=None):
        self.key, self.label, self.tool, self.transport, self.model = key, label, tool, transport, model
        self.runs, self.warmup, self.settle_s = runs, warmup, settle_s
        self.samples, self.timings, self.failures = [], [], []
        self.status, self.reason, self.notes = "ok", None, []

    def measure(self, prepare, run_once, check):
        """prepare() before each run; run_once() -> (ms, proc); check(proc) -> (ok, why, extra)."""
        in_a_row = 0
        for i in range(self.warmup + self.runs):
            prepare()
            # A person does not ask within microseconds of saving: let file watchers settle.
            time.sleep(SETTLE["s"] if self.settle_s is None else self.settle_s)
            try:
                ms, proc = run_once()
            except subprocess.TimeoutExpired as e:
                ok, why, extra, ms = False, f"timed out after {e.timeout} s", None, None
            else:
                ok, why, extra = check(proc)
            if ok:
                in_a_row = 0
                if i >= self.warmup:
                    self.samples.append(ms)
                    if extra is not None:
                        self.timings.append(extra)
                continue
            in_a_row += 1
            self.failures.append({"run": i, "warmup": i < self.warmup, "why": why})
            log(f"  {self.label}: run {i} failed: {why.splitlines()[0] if why else '?'}")
            if in_a_row >= MAX_FAILURES_IN_A_ROW:
                self.status = "failed"
                self.reason = f"{in_a_row} runs in a row failed; last: {why}"
                return
        if not self.samples:
            self.status, self.reason = "failed", "no run succeeded"

    def to_json(self):
        return {"label": self.label, "tool": self.tool, "transport": self.transport, "model": self.model,
                "settle_ms": (SETTLE["s"] if self.settle_s is None else self.settle_s) * 1e3,
                "status": self.status, "reason": self.reason, "notes": self.notes,
                "stats_ms": summarize(self.samples), "samples_ms": self.samples,
                "timings": self.timings, "failures": self.failures}


def file_check(repo):
    text = (repo / fixture.FILE).read_text()
    if text == fixture.AFTER:
        return True, None
    if text == fixture.BEFORE:
        return False, "the file was not changed"
    return False, "the file changed, but not to the expected text"


def reset(repo):
    (repo / fixture.FILE).write_text(fixture.BEFORE)


# -------------------------------------------------------------------------------------------
# spark
# -------------------------------------------------------------------------------------------

def spark_case(case, fake, transport, cold=False, config=None):
    """`config`: text of a config.toml for the daemon (default: none, all defaults)."""
    repo, _ = fresh_case_dir(case.key)
    # The socket path must stay short: the daemon's home goes under /tmp, as in the tests.
    home = Path(tempfile.mkdtemp(prefix="spb", dir="/tmp"))
    os.chmod(home, 0o700)
    if config:
        (home / "config.toml").write_text(config)
    url = fake.urls["ws_url"] if transport == "WebSocket" else fake.urls["http_url"]
    env = hermetic_env(home, SPARK_HOME=home, SPARK_PROVIDER_URL=url, SPARK_API_KEY="sk-bench-not-a-key",
                       SPARK_IDLE_TIMEOUT=600)
    ctl = str(RELEASE / "sparkctl")

    def stop():
        subprocess.run([ctl, "--json", "stop"], env=env, cwd=repo, capture_output=True, timeout=30)

    def prepare():
        reset(repo)
        if cold:
            stop()

    def run_once():
        return timed([ctl, "--json", "ask", "-f", fixture.FILE, fixture.PROMPT], repo, env, 60)

    def check(proc):
        if proc.returncode != 0:
            return False, f"exit {proc.returncode}: {tail(proc.stderr)}", None
        ok, why = file_check(repo)
        if not ok:
            return False, why, None
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return False, f"no JSON result line: {tail(proc.stdout)}", None
        if not isinstance(result.get("edit"), str):
            return False, f"no edit recorded: {result}", None
        return True, None, result.get("timings", {})

    try:
        case.measure(prepare, run_once, check)
        if not cold and case.samples:
            last = fake.cmd("last").get("last") or {}
            case.notes.append({
                "last_request_input_bytes": len(json.dumps(last.get("input", []), separators=(",", ":"))),
                "last_request_chained": bool(last.get("previous_response_id")),
            })
    finally:
        stop()
        shutil.rmtree(home, ignore_errors=True)
    # wall - daemon total = sparkctl process start, connect, handshake, result out, exit.
    for ms, t in zip(case.samples, case.timings):
        t["wall_ms"] = ms
        t["client_ms"] = ms - t.get("total_ms", 0.0)
        t["stream_ms"] = t.get("total_ms", 0.0) - t.get("request_ms", 0.0) - (t.get("ttft_ms") or 0.0) - (t.get("apply_ms") or 0.0)


# -------------------------------------------------------------------------------------------
# codex
# -------------------------------------------------------------------------------------------

CODEX_MODEL = "gpt-5.5"


def codex_config(base_url, websockets):
    # `model`: a slug in codex's bundled catalog whose metadata declares the freeform apply_patch
    # tool; with an unknown slug codex falls back to metadata without it and refuses the patch.
    return f'''model = "{CODEX_MODEL}"
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
env_key = "SPARK_BENCH_KEY"
supports_websockets = {"true" if websockets else "false"}
request_max_retries = 0
stream_max_retries = 0
'''


def codex_case(case, fake, exe, transport, native=None):
    """`native`: (binary, env) to run the native binary directly instead of the npm launcher."""
    repo, home = fresh_case_dir(case.key)
    websockets = transport == "WebSocket"
    (home / "config.toml").write_text(codex_config(fake.urls["compat_base_url"], websockets))
    env = hermetic_env(home, CODEX_HOME=home, SPARK_BENCH_KEY="sk-bench-not-a-key")
    if native is not None:
        exe, extra = native
        env.update(extra)
    before = fake.cmd("stats")

    def prepare():
        reset(repo)
        fake.cmd("arm")

    def run_once():
        return timed([str(exe), "exec", "--color", "never", "-s", "workspace-write", fixture.PROMPT], repo, env, 120)

    def check(proc):
        if proc.returncode != 0:
            return False, f"exit {proc.returncode}: {tail(proc.stderr)}", None
        ok, why = file_check(repo)
        return ok, why, None

    case.measure(prepare, run_once, check)
    transport_notes(case, fake, before, websockets)


def transport_notes(case, fake, before, websockets):
    """What the fake saw of codex since `before` (its `stats`): requests per transport, refusals."""
    after = fake.cmd("stats")
    ws = after["ws_requests"] - before["ws_requests"]
    http = after["http_requests"] - before["http_requests"]
    case.notes.append({"responses_requests_ws": ws, "responses_requests_http": http,
                       "ws_connections": after["ws_connections"] - before["ws_connections"],
                       "prewarms": after["prewarms"] - before["prewarms"],
                       "refused": after["refused"][len(before["refused"]):],
                       "compat_dropped": after["compat_dropped"]})
    if websockets and http:
        case.notes.append(f"codex also sent {http} requests over HTTP")
    if not websockets and ws:
        case.notes.append(f"codex also sent {ws} requests over WebSocket")


# -------------------------------------------------------------------------------------------
# codex app-server, warm
# -------------------------------------------------------------------------------------------

# Waits, in seconds: starting the server and its thread; one turn; a turn interrupted after a
# timeout; the process exiting once its stdin is closed.
APP_SERVER_START_TIMEOUT = 60
APP_SERVER_TURN_TIMEOUT = 120
APP_SERVER_INTERRUPT_TIMEOUT = 10
APP_SERVER_EXIT_TIMEOUT = 5

# Answers to the server's requests (approvals), so that a turn never waits for a person. With
# approval_policy "never" none should come; any that does is counted in the case's notes.
APP_SERVER_ANSWERS = {
    "item/commandExecution/requestApproval": {"decision": "accept"},
    "item/fileChange/requestApproval": {"decision": "accept"},
    "applyPatchApproval": {"decision": "approved"},
    "execCommandApproval": {"decision": "approved"},
}


class AppServerError(Exception):
    """The app-server exited, wrote something that is not a message, or refused a request."""


class AppServer:
    """One `codex app-server` process on stdio: JSON-RPC 2.0 messages without the "jsonrpc"
    field, one per line. Every wait has a deadline (subprocess.TimeoutExpired past it); requests
    from the server are answered on the way (APP_SERVER_ANSWERS, an error for the rest)."""

    def __init__(self, exe, cwd, env, stderr_path):
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            # Its own process group: close() can end the launcher and the native binary together.
            self.proc = subprocess.Popen([str(exe), "app-server"], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, bufsize=0, start_new_session=True)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""
        self.last_id = 0
        self.turns_started = 0
        self.server_requests = []
        # Set when a timed-out turn could not be interrupted: later turns fail at once.
        self.broken = None

    def exit_status(self):
        try:
            return f"exit {self.proc.wait(timeout=1)}"
        except subprocess.TimeoutExpired:
            return "still running"

    def stderr_tail(self):
        try:
            return tail(Path(self.stderr_path).read_text(errors="replace"), 4)
        except OSError:
            return ""

    def send(self, msg):
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        except OSError as e:
            raise AppServerError(f"writing to codex app-server: {e}; stderr: {self.stderr_tail()}")

    def request(self, method, params):
        self.last_id += 1
        self.send({"id": self.last_id, "method": method, "params": params})
        return self.last_id

    def call(self, method, params, timeout):
        """A request and its result, skipping the notifications that come before the answer."""
        rid = self.request(method, params)
        deadline = time.monotonic() + timeout
        while True:
            msg = self.read(deadline, timeout)
            if msg.get("id") == rid:
                if "error" in msg:
                    raise AppServerError(f"{method} refused: {msg['error']}")
                return msg.get("result") or {}

    def read(self, deadline, timeout):
        """The next response or notification; None at once when `deadline` is None and nothing waits."""
        while True:
            while b"\n" not in self.buf:
                left = 0 if deadline is None else deadline - time.monotonic()
                if deadline is not None and left <= 0:
                    raise subprocess.TimeoutExpired("codex app-server", timeout)
                if not self.selector.select(left):
                    if deadline is None:
                        return None
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise AppServerError(f"codex app-server closed its stdout ({self.exit_status()}); "
                                         f"stderr: {self.stderr_tail() or '-'}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                raise AppServerError(f"codex app-server wrote a line that is not JSON: {line[:200]!r}")
            if "method" in msg and "id" in msg:
                self.answer(msg)
                continue
            return msg

    def answer(self, msg):
        method = msg["method"]
        self.server_requests.append(method)
        if method in APP_SERVER_ANSWERS:
            self.send({"id": msg["id"], "result": APP_SERVER_ANSWERS[method]})
        else:
            self.send({"id": msg["id"], "error": {"code": -32601, "message": f"the benchmark does not handle {method}"}})

    def drain(self):
        """Read what is already waiting (notifications after the last turn/completed), untimed."""
        while self.read(None, 0) is not None:
            pass

    def start_thread(self, repo):
        """initialize, initialized, thread/start -> the thread id."""
        self.call("initialize", {"clientInfo": {"name": "spark-bench", "title": "spark peers benchmark",
                                                "version": "0.1.0"}}, APP_SERVER_START_TIMEOUT)
        self.send({"method": "initialized"})
        result = self.call("thread/start", {"cwd": str(repo), "model": CODEX_MODEL, "approvalPolicy": "never",
                                            "sandbox": "workspace-write"}, APP_SERVER_START_TIMEOUT)
        return result["thread"]["id"]

    def turn(self, thread_id, text, timeout):
        """One turn: (ms from writing turn/start to reading its turn/completed, the completed turn,
        the `error` notifications seen)."""
        if self.broken:
            raise AppServerError(self.broken)
        self.drain()
        errors = []
        self.turns_started += 1
        t0 = time.perf_counter_ns()
        rid = self.request("turn/start", {"threadId": thread_id, "input": [{"type": "text", "text": text}]})
        deadline = time.monotonic() + timeout
        turn_id, completed = None, {}
        try:
            while turn_id is None or turn_id not in completed:
                msg = self.read(deadline, timeout)
                method = msg.get("method")
                if msg.get("id") == rid:
                    if "error" in msg:
                        raise AppServerError(f"turn/start refused: {msg['error']}")
                    turn_id = msg["result"]["turn"]["id"]
                elif method == "turn/completed":
                    completed[msg["params"]["turn"]["id"]] = (time.perf_counter_ns(), msg["params"]["turn"])
                elif method == "error":
                    errors.append(msg["params"].get("error", {}).get("message"))
        except subprocess.TimeoutExpired:
            self.interrupt(thread_id, turn_id)
            raise
        t1, turn = completed[turn_id]
        return (t1 - t0) / 1e6, turn, errors

    def interrupt(self, thread_id, turn_id):
        """After a timeout: stop the turn, so that the next turn/start does not join it."""
        if turn_id is None:
            self.broken = "codex app-server did not answer a turn/start in time"
            return
        try:
            self.request("turn/interrupt", {"threadId": thread_id, "turnId": turn_id})
            deadline = time.monotonic() + APP_SERVER_INTERRUPT_TIMEOUT
            while True:
                msg = self.read(deadline, APP_SERVER_INTERRUPT_TIMEOUT)
                if msg.get("method") == "turn/completed" and msg["params"]["turn"]["id"] == turn_id:
                    return
        except (subprocess.TimeoutExpired, AppServerError) as e:
            self.broken = f"codex app-server did not end a timed-out turn when interrupted: {e}"

    def close(self):
        """Close stdin (the server exits), then end the process group if it did not."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=APP_SERVER_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=APP_SERVER_EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait(timeout=APP_SERVER_EXIT_TIMEOUT)
        # Whatever the launcher left behind in the group it was started in.
        self.signal_group(signal.SIGKILL)
        self.selector.close()
        self.proc.stdout.close()

    def signal_group(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def app_server_case(case, fake, exe):
    """A warm `codex app-server` (the npm launcher's `codex app-server`, stdio): one process and
    one thread for the whole case, started untimed; each run is one turn of that thread, so the
    thread's history grows by one edit per run, as a warm app-server user's does."""
    repo, home = fresh_case_dir(case.key)
    (home / "config.toml").write_text(codex_config(fake.urls["compat_base_url"], True))
    env = hermetic_env(home, CODEX_HOME=home, SPARK_BENCH_KEY="sk-bench-not-a-key")
    before = fake.cmd("stats")
    try:
        server = AppServer(exe, repo, env, home / "app-server.stderr")
    except OSError as e:
        case.status, case.reason = "failed", f"starting codex app-server: {e}"
        log(f"  {case.label}: {case.reason}")
        return
    try:
        try:
            thread_id = server.start_thread(repo)
        except (AppServerError, subprocess.TimeoutExpired, KeyError, TypeError) as e:
            case.status, case.reason = "failed", f"starting codex app-server and its thread: {e}"
            log(f"  {case.label}: {case.reason}")
            return

        def prepare():
            reset(repo)
            fake.cmd("arm")

        def run_once():
            try:
                ms, turn, errors = server.turn(thread_id, fixture.PROMPT, APP_SERVER_TURN_TIMEOUT)
            except AppServerError as e:
                return None, {"error": str(e)}
            except (KeyError, TypeError) as e:
                return None, {"error": f"a message of an unexpected shape: {e!r}"}
            return ms, {"turn": turn, "errors": errors}

        def check(outcome):
            if "error" in outcome:
                return False, outcome["error"], None
            turn = outcome["turn"]
            if turn.get("status") != "completed":
                why = (turn.get("error") or {}).get("message") or "; ".join(filter(None, outcome["errors"]))
                return False, f"turn {turn.get('status')}: {why or '?'}", None
            ok, why = file_check(repo)
            if not ok:
                return False, why, None
            last = fake.cmd("last").get("last") or {}
            return True, None, {"codex_turn_duration_ms": turn.get("durationMs"),
                                "last_request_input_bytes": len(json.dumps(last.get("input", []), separators=(",", ":"))),
                                "last_request_chained": bool(last.get("previous_response_id"))}

        case.measure(prepare, run_once, check)
    finally:
        server.close()
    transport_notes(case, fake, before, True)
    case.notes.append({"thread_turns": server.turns_started, "server_requests_answered": server.server_requests})


# -------------------------------------------------------------------------------------------
# aider
# -------------------------------------------------------------------------------------------

AIDER_MODEL = "openai/spark-fake"


def aider_case(case, fake, exe, stream):
    repo, home = fresh_case_dir(case.key)
    meta = home / "model-metadata.json"
    meta.write_text(json.dumps({AIDER_MODEL: {
        "max_input_tokens": 128000, "max_tokens": 8192, "max_output_tokens": 8192,
        "input_cost_per_token": 0.0, "output_cost_per_token": 0.0,
        "litellm_provider": "openai", "mode": "chat"}}))
    # LITELLM_LOCAL_MODEL_COST_MAP: litellm would otherwise fetch its price list at import.
    env = hermetic_env(home, OPENAI_API_KEY="sk-bench-not-a-key", LITELLM_LOCAL_MODEL_COST_MAP="True")
    args = [str(exe), "--model", AIDER_MODEL, "--openai-api-base", fake.urls["chat_base_url"],
            "--model-metadata-file", str(meta), "--edit-format", "diff",
            "--no-check-update", "--no-analytics", "--no-show-release-notes", "--yes-always",
            # Each of these would cost a second model call or write files besides the edit.
            "--no-auto-commits", "--no-auto-lint", "--no-gitignore",
            "--no-pretty", "--no-fancy-input"]
    if not stream:
        args.append("--no-stream")
    args += ["--message", fixture.PROMPT, fixture.FILE]
    before = fake.cmd("stats")["chat_requests"]

    def run_once():
        return timed(args, repo, env, 300)

    def check(proc):
        if proc.returncode != 0:
            return False, f"exit {proc.returncode}: {tail(proc.stderr or proc.stdout)}", None
        ok, why = file_check(repo)
        return ok, (why and f"{why}; aider said: {tail(proc.stdout, 4)}"), None

    case.measure(lambda: reset(repo), run_once, check)
    case.notes.append({"chat_requests": fake.cmd("stats")["chat_requests"] - before})


# -------------------------------------------------------------------------------------------
# Environment facts
# -------------------------------------------------------------------------------------------

def machine():
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass

    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    # Plumbing only: nothing here writes to the repository (no index refresh).
    dirty = subprocess.run(["git", "diff-index", "--quiet", "HEAD", "--"], cwd=ROOT).returncode != 0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "rustc": out(["rustc", "--version"]),
            "node": out(["node", "--version"]), "commit": out(["git", "rev-parse", "--short", "HEAD"]),
            "worktree_dirty": dirty, "loadavg_start": os.getloadavg()}


def spawn_floor(n=30):
    """What starting and reaping a do-nothing process costs this harness (counted in every row)."""
    true = shutil.which("true") or "/bin/true"
    samples = []
    for _ in range(n + 3):
        ms, _ = timed([true], ROOT, {"PATH": "/usr/bin:/bin"}, 10)
        samples.append(ms)
    return summarize(samples[3:])


# -------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------

def results_table(cases, base):
    lines = ["| case | n | p50 | p90 | min | max | p50 / spark warm WS p50 |",
             "|---|---|---|---|---|---|---|"]
    for c in cases:
        s = summarize(c.samples)
        if s is None:
            lines.append(f"| {c.label} | 0 | {c.status}: {c.reason or '-'} | | | | |".replace("\n", " "))
            continue
        ratio = f"{s['p50'] / base:.1f}x" if base else "-"
        lines.append(f"| {c.label} | {s['n']} | {fmt(s['p50'])} | {fmt(s['p90'])} | {fmt(s['min'])} | {fmt(s['max'])} | {ratio} |")
    return "\n".join(lines)


BREAKDOWN_PARTS = [
    ("client_ms", "sparkctl process + socket (wall - daemon total)"),
    ("request_ms", "daemon: request in -> `response.create` out"),
    ("ttft_ms", "`response.create` out -> first delta in"),
    ("stream_ms", "first delta -> patch complete (rest of total)"),
    ("apply_ms", "apply + record the edit"),
    ("total_ms", "daemon total: request in -> result out"),
    ("wall_ms", "wall: `sparkctl ask` process start -> exit"),
]


def part_stats(case, key):
    vals = [t.get(key) for t in case.timings if t.get(key) is not None]
    return summarize(vals)


def breakdown_table(cases):
    def name(c):
        return c.label.replace("sparkctl ask, ", "") + ("" if c.model == "zero-latency" else f" ({c.model})")
    head = "| part (p50 / p90) | " + " | ".join(name(c) for c in cases) + " |"
    lines = [head, "|---|" + "---|" * len(cases)]
    for key, name in BREAKDOWN_PARTS:
        cells = []
        for c in cases:
            s = part_stats(c, key)
            cells.append(f"{fmt(s['p50'])} / {fmt(s['p90'])}" if s else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budgets(by_key):
    rows = []
    ws = by_key.get("spark-warm-ws")
    s = summarize(ws.samples) if ws else None
    if s:
        rows.append(("`sparkctl ask` end to end, warm, zero-latency model: p50 <= 5 ms",
                     fmt(s["p50"]), s["p50"] <= 5.0))
        rows.append((f"same: p99 <= 20 ms (n = {s['n']})",
                     fmt(s["p99"]), s["p99"] <= 20.0))
        req = part_stats(ws, "request_ms")
        if req:
            rows.append(("daemon: request in -> `response.create` out: p50 <= 1 ms", fmt(req["p50"]), req["p50"] <= 1.0))
        note = next((n for n in ws.notes if isinstance(n, dict) and "last_request_input_bytes" in n), None)
        if note:
            rows.append(("a continued turn's `input`: only the new items, tens of bytes to ~1 KB",
                         f"{note['last_request_input_bytes']} B (chained: {note['last_request_chained']})",
                         note["last_request_input_bytes"] <= 1024 and note["last_request_chained"]))
    for key, what in (("codex-ws", "npm launcher"), ("codex-ws-native", "native binary")):
        cx = by_key.get(key)
        c = summarize(cx.samples) if cx else None
        if s and c:
            ratio = c["p50"] / s["p50"]
            rows.append((f"`codex exec` ({what}) p50 / spark p50, both WebSocket: >= 40x", f"{ratio:.0f}x", ratio >= 40))
    app = by_key.get("codex-app-server")
    a = summarize(app.samples) if app else None
    name = "warm `codex app-server` turn p50 / spark p50, both WebSocket: >= 11x"
    if s and a:
        ratio = a["p50"] / s["p50"]
        rows.append((name, f"{ratio:.1f}x", ratio >= 11))
    else:
        rows.append((name, "not measured" + (f" ({app.status}, see Problems)" if app and app.status != "ok" else ""), None))
    lines = ["| budget (docs/BENCHMARKS.md) | measured | met? |", "|---|---|---|"]
    for name, value, met in rows:
        lines.append(f"| {name} | {value} | {'yes' if met else ('**no**' if met is False else 'open')} |")
    return "\n".join(lines), [{"budget": n, "measured": v, "met": m} for n, v, m in rows]


# -------------------------------------------------------------------------------------------
# Main
# -------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spark-runs", type=int, default=50, help="timed runs per warm spark case (default 50)")
    ap.add_argument("--cold-runs", type=int, default=20, help="timed cold-start spark runs (default 20)")
    ap.add_argument("--codex-runs", type=int, default=20,
                    help="timed runs per codex case, turns for the warm app-server (default 20)")
    ap.add_argument("--aider-runs", type=int, default=5, help="timed aider runs (default 5)")
    ap.add_argument("--skip", default="", help="comma-separated: codex, aider, simulated")
    ap.add_argument("--codex-version", default="0.169.0", help="npm @openai/codex version, or 'latest'")
    ap.add_argument("--aider-version", default="0.86.2", help="PyPI aider-chat version, or 'latest'")
    ap.add_argument("--aider-no-stream", action="store_true", help="run aider with --no-stream")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "bench" / "out" / "cache",
                    help="where the peers are installed (default bench/out/cache, git-ignored)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "peers.json")
    ap.add_argument("--plots-dir", type=Path, default=ROOT / "docs", help="where the SVG plots go (default docs/)")
    ap.add_argument("--settle-ms", type=float, default=1000.0,
                    help="untimed pause between resetting the file and each run (default 1000)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="first wait up to this long for the 1-minute load average to drop below 0.5")
    ap.add_argument("--no-build", action="store_true", help="use the release binaries as they are")
    ap.add_argument("--keep-work", action="store_true", help="keep bench/out/peers-work/ for inspection")
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    SETTLE["s"] = args.settle_ms / 1e3

    if not args.no_build:
        log("building release binaries: cargo build --release -p sparkd -p sparkctl -p spark-tests --bins")
        subprocess.run(["cargo", "build", "--release", "-p", "sparkd", "-p", "sparkctl", "-p", "spark-tests", "--bins"],
                       cwd=ROOT, check=True)
    for b in ("sparkd", "sparkctl", "spark-fake-provider"):
        if not (RELEASE / b).exists():
            sys.exit(f"missing {RELEASE / b}: build first (or drop --no-build)")

    deadline = time.monotonic() + args.wait_quiet
    while os.getloadavg()[0] >= 0.5 and time.monotonic() < deadline:
        time.sleep(5)
    if os.getloadavg()[0] >= 1.0:
        log(f"warning: the machine is busy (load average {os.getloadavg()[0]:.2f}): expect noisy numbers")

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    patch_file = WORK / "edit.patch"
    patch_file.write_text(fixture.PATCH)
    facts = machine()
    facts["harness_spawn_floor_ms"] = spawn_floor()
    versions = {"sparkctl": subprocess.run([str(RELEASE / "sparkctl"), "--version"], capture_output=True, text=True).stdout.strip()}

    peers = {}
    for name, fn, ver, flag in (("codex", install.codex, args.codex_version, "codex"),
                                ("aider", install.aider, args.aider_version, "aider")):
        if flag in skip:
            peers[name] = (None, "skipped (--skip)")
            continue
        try:
            exe, have = fn(args.cache_dir, ver, log)
            peers[name] = (exe, None)
            versions[name] = have
        except install.Unavailable as e:
            log(f"{name}: NOT AVAILABLE: {e}")
            peers[name] = (None, str(e))

    cases = []

    def unavailable(case, why):
        case.status, case.reason = "unavailable", why
        cases.append(case)

    # Zero-latency model: what is not the model.
    log("zero-latency fake model")
    fake = Fake(patch_file)
    try:
        for key, label, transport, runs, warmup, cold, settle, config in (
                ("spark-warm-ws", "sparkctl ask, warm, WebSocket", "WebSocket", args.spark_runs, 3, False, None, None),
                ("spark-warm-http", "sparkctl ask, warm, HTTP+SSE", "HTTP", args.spark_runs, 3, False, None, None),
                # Diagnostics: the same without the pause between runs, and without fsync.
                ("spark-warm-ws-b2b", "sparkctl ask, warm, WebSocket, back to back", "WebSocket",
                 args.spark_runs, 3, False, 0.0, None),
                ("spark-warm-ws-nofsync", "sparkctl ask, warm, WebSocket, fsync = false", "WebSocket",
                 args.spark_runs, 3, False, None, "fsync = false\n"),
                ("spark-cold-ws", "sparkctl ask, cold (auto-start), WebSocket", "WebSocket", args.cold_runs, 1, True, None, None)):
            case = Case(key, label, "spark", transport, "zero-latency", runs, warmup, settle)
            log(f"- {label} ({runs} runs)")
            spark_case(case, fake, transport, cold=cold, config=config)
            cases.append(case)
        exe, why = peers["aider"]
        case = Case("aider", "aider --message" + (" --no-stream" if args.aider_no_stream else ""), "aider",
                    "chat completions" + ("" if args.aider_no_stream else ", streamed"), "zero-latency", args.aider_runs, 1)
        if exe is None:
            unavailable(case, why)
        else:
            log(f"- {case.label} ({args.aider_runs} runs)")
            aider_case(case, fake, exe, stream=not args.aider_no_stream)
            cases.append(case)
    finally:
        fake.close()

    exe, why = peers["codex"]
    native = install.codex_native(exe) if exe else None
    for key, label, transport, direct in (
            ("codex-ws", "codex exec, WebSocket", "WebSocket", False),
            ("codex-http", "codex exec, HTTP+SSE", "HTTP", False),
            ("codex-ws-native", "codex exec, WebSocket, native binary", "WebSocket", True)):
        case = Case(key, label, "codex", transport, "zero-latency", args.codex_runs, 1)
        if exe is None or (direct and native is None):
            unavailable(case, why or "the native codex binary was not found in the npm package")
            continue
        log(f"- {label} ({args.codex_runs} runs)")
        fake = Fake(patch_file, armed=True)
        try:
            codex_case(case, fake, exe, transport, native if direct else None)
        finally:
            fake.close()
        cases.append(case)
    case = Case("codex-app-server", "codex app-server, warm turn, WebSocket", "codex", "WebSocket", "zero-latency",
                args.codex_runs, 1)
    if exe is None:
        unavailable(case, why)
    else:
        log(f"- {case.label} ({args.codex_runs} turns)")
        fake = Fake(patch_file, armed=True)
        try:
            app_server_case(case, fake, exe)
        finally:
            fake.close()
        cases.append(case)

    # A model at Codex-Spark-like speed: what the user feels.
    sim = []
    if "simulated" not in skip:
        model = f"TTFT {SIMULATED['ttft_ms']:.0f} ms, {SIMULATED['tokens_per_sec']:.0f} tok/s"
        log(f"simulated model: {model}")
        fake = Fake(patch_file, **SIMULATED)
        try:
            case = Case("sim-spark-warm-ws", "sparkctl ask, warm, WebSocket", "spark", "WebSocket", model, args.spark_runs, 3)
            log(f"- {case.label} ({args.spark_runs} runs)")
            spark_case(case, fake, "WebSocket")
            sim.append(case)
        finally:
            fake.close()
        case = Case("sim-codex-ws", "codex exec, WebSocket", "codex", "WebSocket", model, args.codex_runs, 1)
        if exe is None:
            unavailable(case, why)
            sim.append(cases.pop())
        else:
            log(f"- {case.label} ({args.codex_runs} runs)")
            fake = Fake(patch_file, armed=True, **SIMULATED)
            try:
                codex_case(case, fake, exe, "WebSocket")
            finally:
                fake.close()
            sim.append(case)

    facts["loadavg_end"] = os.getloadavg()
    by_key = {c.key: c for c in cases + sim}
    base = summarize(by_key["spark-warm-ws"].samples)
    base_p50 = base["p50"] if base else None
    sim_base = summarize(by_key["sim-spark-warm-ws"].samples) if "sim-spark-warm-ws" in by_key else None

    budget_md, budget_json = budgets(by_key)
    spark_cases = [c for c in cases + sim if c.tool == "spark" and c.timings]
    floor = facts["harness_spawn_floor_ms"]
    report = [
        f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory']}, Linux {facts['kernel']}; "
        f"{facts['rustc']}; node {facts['node']}; Python {facts['python']}; commit {facts['commit']}"
        f"{' + uncommitted changes' if facts['worktree_dirty'] else ''}; load average at start "
        f"{facts['loadavg_start'][0]:.2f}, at end {facts['loadavg_end'][0]:.2f}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        f"Harness floor (spawn + reap `true` from Python, in every row): p50 {fmt(floor['p50'])}, p90 {fmt(floor['p90'])}. "
        f"Untimed pause after each file reset, before each run: {args.settle_ms:.0f} ms (except \"back to back\").",
        "",
        "### Zero-latency model",
        "",
        results_table(cases, base_p50),
        "",
    ]
    if sim:
        report += [f"### Simulated model ({sim[0].model})", "", results_table(sim, sim_base["p50"] if sim_base else None).replace(
            "spark warm WS p50", "spark warm WS p50 (simulated)"), ""]
    report += ["### spark's own time", "", breakdown_table(spark_cases), "", "### Budgets", "", budget_md, ""]
    problems = [c for c in cases + sim if c.status != "ok" or c.failures]
    if problems:
        report += ["### Problems", ""]
        for c in problems:
            if c.status != "ok":
                report.append(f"- {c.label} ({c.model}): {c.status}: {c.reason}")
            else:
                report.append(f"- {c.label} ({c.model}): {len(c.failures)} failed run(s) not counted; first: {c.failures[0]['why']}")
        report.append("")
    text = "\n".join(report)
    print(text)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": facts, "versions": versions, "fixture": {
        "file": fixture.FILE, "lines": len(fixture.BEFORE.splitlines()), "prompt": fixture.PROMPT, "patch": fixture.PATCH},
        "simulated_model": SIMULATED, "cases": {c.key: c.to_json() for c in cases + sim},
        "budgets": budget_json}, indent=1))
    args.out.with_suffix(".md").write_text(text + "\n")
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")

    groups = [("zero-latency fake model", [(c.label, c.tool, c.samples) for c in cases])]
    if sim:
        groups.append((f"simulated model: {sim[0].model}", [(c.label, c.tool, c.samples) for c in sim]))
    args.plots_dir.mkdir(parents=True, exist_ok=True)
    (args.plots_dir / "bench-peers-latency.svg").write_text(plots.latency(groups, "One edit, same model output: spark vs codex vs aider"))
    rows = []
    for c in spark_cases:
        parts = {k: part_stats(c, k)["p50"] for k, _ in BREAKDOWN_PARTS[:5] if part_stats(c, k)}
        label = c.label.replace("sparkctl ask, ", "") + ("" if c.model == "zero-latency" else ", simulated model")
        rows.append((label, parts, summarize(c.samples)["p50"]))
    if rows:
        (args.plots_dir / "bench-spark-breakdown.svg").write_text(plots.breakdown(rows, "Where a spark edit's time goes"))
    log(f"wrote {args.plots_dir / 'bench-peers-latency.svg'} and {args.plots_dir / 'bench-spark-breakdown.svg'}")
    if not args.keep_work:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
