//! Shared harness for spark's end-to-end suites and benchmarks.
//!
//! - [`Home`]: a private, short temporary `SPARK_HOME` (socket paths must stay under 107 bytes).
//! - [`InProcess`]: `sparkd` running inside the test process on its own runtime thread.
//! - [`bin`]: the real `sparkd` / `sparkctl` binaries, built on demand when missing.
//! - [`Ctl`]: runs `sparkctl` in a hermetic environment and stops any daemon it started.
//! - [`TestRepo`], [`hermetic_git`], [`snapshot`]: from the shared test kit (`spark-testkit`).
//! - [`fake_provider`]: a Responses-API provider on loopback (WebSocket mode and HTTP + SSE).
//! - [`fake_chat`]: an OpenAI chat-completions endpoint for peers that speak only that (aider).
//! - [`load`]: concurrent clients (and slow readers) against a real `sparkd`, checked reply by reply.
//! - [`real_daemon`]: the `sparkd` binary against the fake provider, its RSS and inotify watches.
//! - [`scale`]: large and many watched repositories: index time, memory, watches, responsiveness.
//! - [`http1`]: the HTTP/1.1 head and body reader the fakes and proxies share (`httparse`).

pub mod fake_chat;
pub mod fake_provider;
pub mod fault_proxy;
pub mod http1;
pub mod kill_rounds;
pub mod load;
pub mod real_daemon;
pub mod scale;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use spark_proto::layout::Layout;
pub use spark_testkit::{
    TestRepo, git_ok, hermetic, hermetic_git, output_with_stdin, snapshot, stderr, stdout,
};
use sparkctl::Client;
use tokio_util::sync::CancellationToken;

/// A temporary `SPARK_HOME`, mode 0700, removed on drop.
#[derive(Debug)]
pub struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Home {
        let dir = tempfile::Builder::new()
            .prefix("sp")
            .tempdir_in("/tmp")
            .expect("create temp SPARK_HOME");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod SPARK_HOME");
        Home { dir }
    }

    /// A `SPARK_HOME` inside `parent` (a test's own filesystem, say).
    pub fn in_dir(parent: &Path) -> Home {
        let dir = tempfile::Builder::new()
            .prefix("sp")
            .tempdir_in(parent)
            .expect("create temp SPARK_HOME");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod SPARK_HOME");
        Home { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn layout(&self) -> Layout {
        let home = self.path().as_os_str().to_owned();
        Layout::from_env(|k| (k == "SPARK_HOME").then(|| home.clone()), 0).expect("layout")
    }

    pub fn config(&self) -> sparkd::Config {
        sparkd::Config::for_home(self.path())
    }

    /// Connect and handshake as a test client.
    pub fn client(&self) -> Client {
        Client::open(&self.layout().socket, "spark-tests")
            .expect("connect to sparkd")
            .0
    }
}

impl Default for Home {
    fn default() -> Self {
        Home::new()
    }
}

/// `sparkd` served by the library inside this process; stopped and joined on drop.
#[derive(Debug)]
pub struct InProcess {
    pub home: Home,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    exited: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl InProcess {
    pub fn start() -> InProcess {
        let home = Home::new();
        let config = home.config();
        InProcess::start_with(home, config)
    }

    /// Start with a custom configuration; returns once the socket accepts connections.
    pub fn start_with(home: Home, config: sparkd::Config) -> InProcess {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (exit_tx, exited) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let daemon = sparkd::Daemon::bind(config).expect("bind sparkd");
                ready_tx.send(()).expect("signal ready");
                daemon.serve(token).await.expect("serve");
            });
            let _ = exit_tx.send(());
        });
        ready_rx.recv().expect("sparkd failed to bind");
        InProcess {
            home,
            shutdown,
            thread: Some(thread),
            exited: std::sync::Mutex::new(exited),
        }
    }

    pub fn client(&self) -> Client {
        self.home.client()
    }

    /// Wait (at most `limit`) for the daemon to stop by itself (idle timeout, `shutdown`
    /// request); false if it is still running.
    pub fn join_within(mut self, limit: Duration) -> bool {
        let exited = self
            .exited
            .lock()
            .expect("exit channel")
            .recv_timeout(limit);
        if exited.is_err() {
            return false;
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("sparkd thread panicked");
        }
        true
    }

    /// Stop the daemon and wait for `serve` to return.
    pub fn stop(mut self) {
        self.shutdown_and_join();
    }

    fn shutdown_and_join(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            t.join().expect("sparkd thread panicked");
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Path of a workspace binary (`sparkd`, `sparkctl`), brought up to date once per test run.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // target/<profile>/deps/<test-binary> → target/<profile>
        let exe = std::env::current_exe().expect("current_exe");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        // `cargo test` builds no binaries of packages without integration tests, so a binary
        // in the target dir may be stale: always bring it up to date (a no-op when fresh).
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.args([
            "build", "--quiet", "-p", "sparkd", "-p", "sparkctl", "--bins",
        ]);
        // Cargo gives this test binary the variables of its own package (`CARGO_PKG_NAME`,
        // `CARGO_MANIFEST_DIR`, …). Build scripts that watch them (ring's does) would see them
        // changed and rerun, rebuilding ring, rustls and the daemon on every run.
        for (key, _) in std::env::vars_os() {
            let set_by_cargo = key.to_str().is_some_and(|k| {
                k.starts_with("CARGO_PKG_")
                    || k.starts_with("CARGO_MANIFEST_")
                    || k.starts_with("CARGO_BIN_")
                    || matches!(
                        k,
                        "CARGO_CRATE_NAME"
                            | "CARGO_PRIMARY_PACKAGE"
                            | "CARGO_TARGET_TMPDIR"
                            | "OUT_DIR"
                    )
            });
            if set_by_cargo {
                build.env_remove(&key);
            }
        }
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        dir
    });
    dir.join(name)
}

/// Runs the real `sparkctl` with a hermetic environment pointing at one [`Home`], and makes
/// sure no daemon it started outlives the test.
#[derive(Debug)]
pub struct Ctl {
    pub home: Home,
}

impl Ctl {
    pub fn new() -> Ctl {
        Ctl { home: Home::new() }
    }

    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(bin(program));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .env("SPARK_HOME", self.home.path())
            // A daemon a failed test leaves behind exits by itself.
            .env("SPARK_IDLE_TIMEOUT", "120")
            .env("SPARK_LOG", "debug");
        cmd
    }

    /// Run `sparkctl args…` to completion.
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command("sparkctl")
            .args(args)
            .output()
            .expect("run sparkctl")
    }

    /// The pid recorded by the daemon holding the instance lock, if any was ever written.
    pub fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.home.layout().instance_lock())
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Default for Ctl {
    fn default() -> Self {
        Ctl::new()
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        if let Some(pid) = self.daemon_pid()
            && pid_alive(pid)
        {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Whether `pid` is a live process (a zombie awaiting its reaper counts as dead).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                != Some('Z')
        }
        Err(_) => false,
    }
}

/// Wait until `pid` has exited, at most `limit`. A process we did not spawn cannot be waited
/// on, but its pidfd becomes readable when it exits.
pub fn wait_dead(pid: i32, limit: Duration) -> bool {
    sparkctl::autostart::wait_exit(pid, limit) || !pid_alive(pid)
}

/// The fake provider on its own runtime, for synchronous tests; plus a daemon pointed at it.
#[derive(Debug)]
pub struct Provider {
    rt: tokio::runtime::Runtime,
    pub fake: fake_provider::FakeProvider,
}

impl Provider {
    pub fn start(script: fake_provider::Script) -> Provider {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("provider runtime");
        let fake = rt.block_on(fake_provider::FakeProvider::start(script));
        Provider { rt, fake }
    }

    /// Block until the provider has received `n` requests in all; returns them.
    pub fn wait_for_requests(&self, n: usize) -> Vec<fake_provider::Recorded> {
        self.rt.block_on(self.fake.wait_for_requests(n))
    }

    /// As [`Provider::wait_for_requests`], giving up (`None`) after `limit`.
    pub fn wait_for_requests_within(
        &self,
        n: usize,
        limit: Duration,
    ) -> Option<Vec<fake_provider::Recorded>> {
        self.rt
            .block_on(async { tokio::time::timeout(limit, self.fake.wait_for_requests(n)).await })
            .ok()
    }

    /// A daemon configured to use this provider over WebSocket (`ws`) or HTTP + SSE.
    pub fn daemon(&self, ws: bool) -> InProcess {
        let home = Home::new();
        let mut config = home.config();
        config.provider_url = if ws {
            self.fake.ws_url()
        } else {
            self.fake.http_url()
        };
        config.api_key = Some("sk-test-not-a-real-key".into());
        config.fsync = false;
        InProcess::start_with(home, config)
    }
}

/// [`snapshot`] of the worktree only (`.git` left out): what the user sees in their files.
pub fn worktree_snapshot(dir: &Path) -> std::collections::BTreeMap<String, (u32, Vec<u8>)> {
    let mut s = snapshot(dir);
    s.retain(|k, _| !k.starts_with(".git"));
    s
}
