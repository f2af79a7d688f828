//! Provider faults through a fault-injecting proxy (`spark_tests::fault_proxy`): truncated
//! frames, resets, a silent peer, a trickle, duplicate and reordered events, an injected
//! `error` event, the connection limit and a refused upgrade on reconnect, in WebSocket mode
//! and (but the last two) over HTTP + SSE. Each: nothing
//! half-applied (bytes on disk, the edit log, `git fsck --strict`), the user told once and
//! clearly (sparkctl's stderr and exit code), and the next ask works. Then a provider down
//! while ten watched repositories want sessions: the reconnect attempts stay bounded and the
//! daemon stays near idle. docs/RELIABILITY.md has the figures.

use std::process::Output;
use std::time::{Duration, Instant};

use spark_proto::methods::{EditLog, LogParams, Status, Watch, WatchParams};
use spark_tests::fake_provider::{Script, Turn};
use spark_tests::fault_proxy::{Fault, FaultProxy, Trigger};
use spark_tests::{Home, InProcess, Provider, TestRepo, bin, stderr, stdout, worktree_snapshot};

const LIB: &str = "fn one() {\n    1\n}\n\nfn two() {\n    2\n}\n\nfn three() {\n    3\n}\n";
const PATCH_ONE: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn one() {\n-    1\n+    100\n*** End Patch\n";
const PATCH_TWO: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn two() {\n-    2\n+    200\n*** End Patch\n";

/// Longer than any ask here takes, even the 1 KB/s trickle on a loaded machine.
const ASK_DEADLINE: Duration = Duration::from_secs(120);

/// Liveness and backoff compressed ~100×, so a silent peer is noticed in well under a second.
fn fast_timing() -> sparkd::ProviderTiming {
    sparkd::ProviderTiming {
        ping_interval: Duration::from_millis(300),
        pong_timeout: Duration::from_millis(400),
        backoff_base: Duration::from_millis(25),
        backoff_cap: Duration::from_millis(300),
        stream_idle_timeout: Duration::from_millis(700),
    }
}

struct Rig {
    provider: Provider,
    proxy: FaultProxy,
    daemon: InProcess,
    repo: TestRepo,
}

/// The provider's transport the daemon is configured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    WebSocket,
    Sse,
}

fn rig(script: Script) -> Rig {
    rig_over(Mode::WebSocket, script)
}

fn rig_over(mode: Mode, script: Script) -> Rig {
    let provider = Provider::start(script);
    let proxy = FaultProxy::start(provider.fake.addr());
    let home = Home::new();
    let mut config = home.config();
    config.provider_url = match mode {
        Mode::WebSocket => proxy.ws_url(),
        Mode::Sse => proxy.http_url(),
    };
    config.api_key = Some("sk-test-not-a-real-key".into());
    config.fsync = false;
    config.provider_timing = fast_timing();
    let daemon = InProcess::start_with(home, config);
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes()), ("README.md", b"# demo\n")]);
    Rig {
        provider,
        proxy,
        daemon,
        repo,
    }
}

impl Rig {
    /// The real `sparkctl ask`, talking to the in-process daemon. An ask that hangs fails the
    /// test (its process killed) instead of holding the suite.
    fn ask(&self, prompt: &str) -> Output {
        let child = std::process::Command::new(bin("sparkctl"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.daemon.home.path())
            .env("SPARK_HOME", self.daemon.home.path())
            .current_dir(self.repo.path())
            .args(["ask", "-f", "src/lib.rs", prompt])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run sparkctl");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(ASK_DEADLINE) {
            Ok(out) => out.expect("wait for sparkctl"),
            Err(_) => {
                let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                panic!("`sparkctl ask` did not finish within {ASK_DEADLINE:?}: the ask hangs");
            }
        }
    }

    fn edits(&self) -> usize {
        self.daemon
            .client()
            .call::<EditLog>(&LogParams {
                cwd: self.repo.cwd(),
                limit: Some(100),
            })
            .expect("edit/log")
            .edits
            .len()
    }

    fn fsck(&self) {
        let out = self.repo.git_output(&["fsck", "--strict", "--no-progress"]);
        assert!(out.status.success(), "git fsck --strict: {}", stderr(&out));
    }
}

/// What one faulted ask did, as the user and the disk saw it.
#[derive(Debug)]
struct Seen {
    code: Option<i32>,
    stderr: String,
    applied: bool,
}

/// Arm `fault`, ask for PATCH_ONE, then ask again (PATCH_TWO) with the proxy clean.
fn run_case(name: &str, script: Script, fault: Fault, trigger: Trigger) -> (Rig, Seen) {
    run_case_over(Mode::WebSocket, name, script, fault, trigger)
}

/// [`run_case`] with the daemon on `mode`.
fn run_case_over(
    mode: Mode,
    name: &str,
    script: Script,
    fault: Fault,
    trigger: Trigger,
) -> (Rig, Seen) {
    let r = rig_over(
        mode,
        script.default_turn(Turn::apply_patch(PATCH_ONE).with_delta_chars(8)),
    );
    let before = worktree_snapshot(r.repo.path());
    r.proxy.arm(fault, trigger);
    let out = r.ask("make one bigger");
    assert_eq!(r.proxy.fired(), 1, "{name}: the fault fired");
    match mode {
        Mode::WebSocket => assert!(r.proxy.upgrades() >= 1, "{name}: over a WebSocket"),
        Mode::Sse => {
            assert!(r.proxy.sse_responses() >= 1, "{name}: over HTTP + SSE");
            assert_eq!(r.proxy.upgrades(), 0, "{name}: no WebSocket");
        }
    }
    let seen = Seen {
        code: out.status.code(),
        stderr: stderr(&out),
        applied: r.repo.read("src/lib.rs") != LIB.as_bytes(),
    };
    let edits = r.edits();
    if seen.applied {
        // Whole and recorded exactly once.
        assert_eq!(seen.code, Some(0), "{name}: {}", seen.stderr);
        assert_eq!(
            r.repo.read("src/lib.rs"),
            LIB.replace("    1\n", "    100\n").as_bytes(),
            "{name}"
        );
        assert_eq!(edits, 1, "{name}: recorded exactly once");
        assert_eq!(stdout(&out).matches("Applied").count(), 0, "{name}");
    } else {
        // Nothing half-applied, and the user told once, with a hint.
        assert_eq!(
            worktree_snapshot(r.repo.path()),
            before,
            "{name}: nothing on disk changed"
        );
        assert_eq!(edits, 0, "{name}: nothing recorded");
        assert_eq!(seen.code, Some(2), "{name}: {}", seen.stderr);
        let lines: Vec<&str> = seen.stderr.lines().collect();
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("error:") || l.starts_with("sparkctl:"))
                .count(),
            1,
            "{name}: told once: {}",
            seen.stderr
        );
        assert!(
            seen.stderr.contains("nothing was applied"),
            "{name}: {}",
            seen.stderr
        );
    }
    r.fsck();
    // The next ask works.
    r.provider
        .fake
        .set_default_turn(Turn::apply_patch(PATCH_TWO).with_delta_chars(8));
    let out = r.ask("and two");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{name}: next ask: {}",
        stderr(&out)
    );
    let mut want = LIB.replace("    2\n", "    200\n");
    if seen.applied {
        want = want.replace("    1\n", "    100\n");
    }
    assert_eq!(r.repo.read("src/lib.rs"), want.as_bytes(), "{name}");
    assert_eq!(r.edits(), usize::from(seen.applied) + 1, "{name}");
    r.fsck();
    (r, seen)
}

const MID_PATCH: &str = "custom_tool_call_input.delta";

// ---- Cases both transports run the same way.

fn cut_mid_patch(mode: Mode) {
    let name = format!("{mode:?}: cut");
    let (_, seen) = run_case_over(
        mode,
        &name,
        Script::new(),
        Fault::Truncate,
        Trigger::nth(MID_PATCH, 2),
    );
    failed_clearly(&name, &seen, "cannot reach the provider");
    assert!(seen.stderr.contains("\nhint: "), "{}", seen.stderr);
}

fn reset_mid_patch(mode: Mode) {
    let name = format!("{mode:?}: reset");
    let (_, seen) = run_case_over(
        mode,
        &name,
        Script::new(),
        Fault::Reset,
        Trigger::nth(MID_PATCH, 2),
    );
    failed_clearly(&name, &seen, "cannot reach the provider");
    assert!(seen.stderr.contains("\nhint: "), "{}", seen.stderr);
}

fn trickle(mode: Mode) {
    let name = format!("{mode:?}: trickle");
    let fault = Fault::Trickle {
        bytes_per_sec: 1024,
    };
    let (_, seen) = run_case_over(
        mode,
        &name,
        Script::new(),
        fault,
        Trigger::first("response.created"),
    );
    assert!(seen.applied, "{name}: {seen:?}");
}

fn duplicates_and_reorders(mode: Mode) {
    // The turn's own `response.completed`: in WebSocket mode the prewarm's comes first.
    let turn = match mode {
        Mode::WebSocket => 2,
        Mode::Sse => 1,
    };
    let cases = [
        (
            "duplicate delta",
            Fault::Duplicate,
            Trigger::nth(MID_PATCH, 2),
        ),
        (
            "swapped deltas",
            Fault::SwapWithNext,
            Trigger::nth(MID_PATCH, 2),
        ),
        (
            "duplicate item done",
            Fault::Duplicate,
            Trigger::first("output_item.done"),
        ),
        (
            "item done after completed",
            Fault::SwapWithNext,
            Trigger::first("output_item.done"),
        ),
        (
            "duplicate completed",
            Fault::Duplicate,
            Trigger::nth("response.completed", turn),
        ),
    ];
    for (name, fault, trigger) in cases {
        let name = format!("{mode:?}: {name}");
        let (_, seen) = run_case_over(mode, &name, Script::new(), fault, trigger);
        // `run_case_over` checked the bytes, the single record and the next ask.
        assert!(seen.applied, "{name}: {seen:?}");
    }
}

fn error_event(mode: Mode) {
    let name = format!("{mode:?}: error event");
    let event = r#"{"type":"error","status":500,"error":{"type":"server_error","code":"server_error","message":"injected failure"}}"#;
    let (_, seen) = run_case_over(
        mode,
        &name,
        Script::new(),
        Fault::InjectBefore(event.into()),
        Trigger::first("output_item.done"),
    );
    failed_clearly(&name, &seen, "injected failure; nothing was applied");
}

fn failed_clearly(name: &str, seen: &Seen, says: &str) {
    assert!(!seen.applied, "{name}: {seen:?}");
    assert!(seen.stderr.contains(says), "{name}: {}", seen.stderr);
}

#[test]
fn a_frame_cut_mid_patch_applies_nothing_and_says_so_once() {
    cut_mid_patch(Mode::WebSocket);
}

#[test]
fn a_tcp_reset_mid_patch_applies_nothing_and_says_so_once() {
    reset_mid_patch(Mode::WebSocket);
}

#[test]
fn a_reset_before_anything_streamed_is_resent_and_lands_once() {
    // The second `response.created`: the turn's own (the first is the prewarm's).
    let (r, seen) = run_case(
        "early reset",
        Script::new(),
        Fault::Reset,
        Trigger::nth("response.created", 2),
    );
    assert!(seen.applied, "resent transparently: {seen:?}");
    assert!(r.proxy.upgrades() >= 2, "reconnected");
}

#[test]
fn a_peer_that_stops_answering_pings_is_given_up_on_within_the_pong_timeout() {
    let t = Instant::now();
    let (_, seen) = run_case(
        "silent peer",
        Script::new(),
        Fault::Blackhole,
        Trigger::nth(MID_PATCH, 2),
    );
    failed_clearly("silent peer", &seen, "no answer to a ping");
    // Ping interval + pong timeout (0.7 s here), with the slack of a loaded machine.
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
}

#[test]
fn a_one_kilobyte_per_second_trickle_still_lands_whole() {
    trickle(Mode::WebSocket);
}

#[test]
fn duplicate_and_reordered_events_land_exactly_once() {
    duplicates_and_reorders(Mode::WebSocket);
}

/// Regression: a late duplicate of the prewarm's `response.completed`, arriving after the
/// turn's `response.created`, ended the turn with the prewarm's empty output: `sparkctl ask`
/// exited 0 having applied nothing, and the model's patch was dropped.
#[test]
fn a_late_duplicate_of_an_earlier_responses_end_does_not_end_the_turn() {
    let (_, seen) = run_case(
        "late duplicate",
        Script::new(),
        Fault::DuplicateLate,
        Trigger::first("response.completed"),
    );
    assert!(seen.applied, "{seen:?}");
}

#[test]
fn an_error_event_mid_stream_applies_nothing_and_says_so_once() {
    error_event(Mode::WebSocket);
}

#[test]
fn the_connection_limit_mid_conversation_is_a_transparent_reconnect() {
    let event = r#"{"type":"error","status":400,"error":{"type":"invalid_request_error","code":"websocket_connection_limit_reached","message":"Responses websocket connection limit reached (60 minutes)."}}"#;
    let (r, seen) = run_case(
        "connection limit",
        Script::new(),
        Fault::InjectBefore(event.into()),
        Trigger::nth("response.created", 2),
    );
    assert!(seen.applied, "{seen:?}");
    assert!(r.proxy.upgrades() >= 2, "a new connection");
}

#[test]
fn a_426_on_reconnect_falls_back_to_http_and_the_turn_lands_once() {
    let r = rig(Script::new().default_turn(Turn::apply_patch(PATCH_ONE).with_delta_chars(8)));
    r.proxy
        .arm(Fault::Reset, Trigger::nth("response.created", 2));
    // The connection the daemon has stays; the next upgrade is refused with 426.
    r.provider.fake.set_refuse_websocket(true);
    let out = r.ask("make one bigger");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        r.repo.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n").as_bytes()
    );
    assert_eq!(r.edits(), 1, "recorded once");
    assert!(
        r.provider
            .fake
            .heads()
            .iter()
            .any(|h| h.is_websocket_upgrade() && h.status == 426),
        "the reconnect was refused"
    );
    r.fsck();
    r.provider
        .fake
        .set_default_turn(Turn::apply_patch(PATCH_TWO).with_delta_chars(8));
    let out = r.ask("and two");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(r.edits(), 2);
}

// ---- The same faults over HTTP + SSE: the proxy re-sends the chunked body event by event.

mod sse {
    use super::*;

    #[test]
    fn an_event_cut_mid_patch_applies_nothing_and_says_so_once() {
        cut_mid_patch(Mode::Sse);
    }

    #[test]
    fn a_tcp_reset_mid_patch_applies_nothing_and_says_so_once() {
        reset_mid_patch(Mode::Sse);
    }

    /// Regression: an HTTP response cannot be pinged, and a provider that stopped sending in
    /// the middle of one held the ask forever.
    #[test]
    fn a_provider_that_stops_sending_is_given_up_on_after_the_idle_timeout() {
        let t = Instant::now();
        let name = "sse silent";
        let fault = Fault::Blackhole;
        let (_, seen) = run_case_over(
            Mode::Sse,
            name,
            Script::new(),
            fault,
            Trigger::nth(MID_PATCH, 2),
        );
        failed_clearly(name, &seen, "sent nothing for 700ms");
        assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    }

    #[test]
    fn a_one_kilobyte_per_second_trickle_still_lands_whole() {
        trickle(Mode::Sse);
    }

    #[test]
    fn duplicate_and_reordered_events_land_exactly_once() {
        duplicates_and_reorders(Mode::Sse);
    }

    #[test]
    fn an_error_event_mid_stream_applies_nothing_and_says_so_once() {
        error_event(Mode::Sse);
    }
}

/// CPU time (user + system) of this process's threads whose name starts with `prefix`, and
/// how many there are.
fn cpu_of_threads(prefix: &str) -> (Duration, usize) {
    // USER_HZ: /proc reports CPU time in 1/100 s on every Linux architecture we run on.
    let ticks = 100u64;
    let mut total = 0u64;
    let mut threads = 0;
    for task in std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        // Fields after the name: state is the 3rd field of the line, utime the 14th, stime the 15th.
        let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
        let field = |n: usize| {
            rest.get(n - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        total += field(14) + field(15);
        threads += 1;
    }
    (
        Duration::from_secs_f64(total as f64 / ticks as f64),
        threads,
    )
}

/// The provider down while ten watched repositories hold sessions: reconnects are bounded by
/// the shared policy, the daemon idles, and the first ask afterwards works. Time is compressed:
/// backoff base and cap are 100× shorter than the defaults, so 3 s here stand for 5 minutes.
#[test]
fn ten_watched_repositories_and_the_provider_down_reconnect_boundedly_and_idle() {
    const THREAD: &str = "sprel-down";
    let provider = Provider::start(Script::new().default_turn(Turn::apply_patch(PATCH_ONE)));
    let proxy = FaultProxy::start(provider.fake.addr());
    let home = Home::new();
    let mut config = home.config();
    config.provider_url = proxy.ws_url();
    config.api_key = Some("sk-test-not-a-real-key".into());
    config.fsync = false;
    config.provider_timing = fast_timing();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let daemon = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(THREAD)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let d = sparkd::Daemon::bind(config).expect("bind");
            ready_tx.send(()).expect("ready");
            d.serve(token).await.expect("serve");
        });
    });
    ready_rx.recv().expect("daemon ready");
    let repos: Vec<TestRepo> = (0..10)
        .map(|_| TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]))
        .collect();
    let mut client = home.client();
    for r in &repos {
        client
            .call::<Watch>(&WatchParams { dir: r.cwd() })
            .expect("watch");
    }
    // Every watched repository prewarms a session of its own.
    provider.wait_for_requests(10);
    let connected = proxy.upgrades();

    proxy.set_down(true);
    provider.fake.kill_connections();
    let (cpu_before, threads) = cpu_of_threads(THREAD);
    assert!(
        threads >= 2,
        "the daemon's runtime threads are found by name"
    );
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let attempts = proxy.refused();
    let cpu = cpu_of_threads(THREAD).0.saturating_sub(cpu_before);
    let wall = down.elapsed();
    eprintln!(
        "provider down {wall:?}: {attempts} connection attempts from 10 sessions, daemon CPU {cpu:?} ({:.1}%)",
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    );
    // Each lost session may try once; then one probe at a time, paused after three failures.
    assert!(attempts <= 10 + 6, "{attempts} attempts in {wall:?}");
    assert!(
        cpu.as_secs_f64() < 0.05 * wall.as_secs_f64() + 0.1,
        "daemon CPU {cpu:?} in {wall:?}"
    );
    let paused_at = proxy.refused();

    // Back up: the first ask reconnects and lands.
    proxy.set_down(false);
    let status = client
        .call::<Status>(&Default::default())
        .expect("status while down");
    assert!(!status.repos.is_empty(), "still serving");
    let out = std::process::Command::new(bin("sparkctl"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("SPARK_HOME", home.path())
        .current_dir(repos[0].path())
        .args(["ask", "-f", "src/lib.rs", "make one bigger"])
        .output()
        .expect("run sparkctl");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        repos[0].read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n").as_bytes()
    );
    assert!(proxy.upgrades() > connected, "reconnected after the outage");
    eprintln!("attempts after the pause: {}", proxy.refused() - paused_at);
    shutdown.cancel();
    daemon.join().expect("daemon thread");
}

/// CI smoke of the kill rounds (`bench/reliability.rs` runs 100): the seed is printed.
#[test]
fn kill_9_at_random_moments_leaves_every_edit_whole_and_recorded_once() {
    let seed = spark_tests::kill_rounds::seed();
    let totals = spark_tests::kill_rounds::run(10, seed, false, false);
    eprintln!("kill rounds: {totals:?}");
    assert_eq!(totals.rounds, 10);
}

/// The same rounds, `stash` among the operations, with a typist appending to an edited file
/// (`echo >> typed.txt` every 5 ms): not one typed byte is lost, and every edit is still whole.
/// An append racing an edit's rename used to go to the replaced inode and be lost, and a kill
/// then could leave the edit half-applied (docs/RELIABILITY.md, "Crashes").
#[test]
fn kill_9_with_a_typist_loses_no_typed_byte() {
    let seed = spark_tests::kill_rounds::seed();
    let totals = spark_tests::kill_rounds::run(10, seed, true, true);
    eprintln!("kill rounds: {totals:?}");
    assert!(totals.typist_lines > 0, "the typist typed");
}

/// Kill rounds with `stash` among the operations: every stash entry is a stashed edit in the
/// log, and the edit in the worktree is recorded once. This found re-applications of a stashed
/// patch within one second taking the stashed edit's id (docs/RELIABILITY.md, "Crashes").
#[test]
fn kill_9_during_stash_records_the_edit_once() {
    let seed = spark_tests::kill_rounds::seed();
    let totals = spark_tests::kill_rounds::run(10, seed, false, true);
    eprintln!("kill rounds: {totals:?}");
    assert_eq!(totals.rounds, 10);
}
