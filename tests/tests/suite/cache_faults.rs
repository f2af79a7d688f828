//! The sled context cache deleted or overwritten under a running daemon, or corrupted while it
//! is stopped; and the kernel's inotify watch limit running out. Each time, through the real
//! binaries: the next ask still sends the file's true bytes, `status` says what happened, and
//! the cache (or the watcher, in its degraded mode) works again afterwards.
//!
//! The daemon checks its cache's files every `SPARK_TEST_CACHE_CHECK_MS` (5 s by default);
//! the kernel's watch limit is simulated with `SPARK_TEST_INOTIFY_WATCHES`, which makes the
//! watcher meet the same error notify reports for `ENOSPC` (debug builds only), so the tests
//! run in parallel without touching `/proc/sys/fs/inotify`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use spark_tests::fake_provider::{Script, Turn};
use spark_tests::{Ctl, Provider, TestRepo, stderr, stdout};

const MARKER: &str = "pub fn cache_fault_marker_5d1c() -> u32 { 41 }\n";
/// Reaching it is a failure, never a pass.
const PATIENCE: Duration = Duration::from_secs(30);

struct Rig {
    p: Provider,
    repo: TestRepo,
    ctl: Ctl,
    env: Vec<(&'static str, String)>,
}

impl Rig {
    fn new(env: &[(&'static str, &str)]) -> Rig {
        let p = Provider::start(Script::new().default_turn(Turn::text("ok")));
        let repo = TestRepo::with_files(&[
            ("src/lib.rs", MARKER.as_bytes()),
            ("src/other.rs", b"pub fn other() {}\n"),
        ]);
        let mut all = vec![
            ("SPARK_PROVIDER_URL", p.fake.ws_url()),
            ("SPARK_API_KEY", "sk-test-not-a-real-key".to_owned()),
            ("SPARK_TEST_CACHE_CHECK_MS", "50".to_owned()),
        ];
        all.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
        Rig {
            p,
            repo,
            ctl: Ctl::new(),
            env: all,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.ctl.command("sparkctl");
        cmd.current_dir(self.repo.path()).args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().expect("run sparkctl")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "sparkctl {args:?}: {}",
            stderr(&out)
        );
        stdout(&out)
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["--json", "status"])).expect("status json")
    }

    /// `status` until `done` holds (what a user polling `sparkctl status` would see).
    fn status_until(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let s = self.status();
            if done(&s) {
                return s;
            }
            assert!(start.elapsed() < PATIENCE, "{what}: never happened; {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ask about `src/lib.rs` and return what reached the provider.
    fn ask_about_lib(&self) -> String {
        let before = self.p.fake.requests().len();
        self.ok(&["ask", "--new", "-f", "src/lib.rs", "what does it return?"]);
        let reqs = self.p.fake.requests();
        let turn = reqs[before..]
            .iter()
            .rev()
            .find(|r| !r.is_prewarm())
            .expect("the ask's request");
        turn.raw.clone()
    }

    fn cache_dir(&self) -> PathBuf {
        self.ctl.home.layout().cache_dir
    }

    fn workdir(&self) -> String {
        self.repo
            .path()
            .canonicalize()
            .expect("canonical")
            .display()
            .to_string()
    }
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("cache dir").flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn clobber(dir: &Path) {
    let files = cache_files(dir);
    assert!(!files.is_empty(), "the cache had files");
    for f in files {
        std::fs::write(&f, b"\x00garbage\xffnot sled\x13\x37").expect("clobber");
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Watch, ask once (the file's content reaches the cache), and check the cache is healthy.
fn warm(rig: &Rig) {
    let out = rig.ok(&["watch"]);
    assert!(out.starts_with("watching "), "{out}");
    assert!(rig.ask_about_lib().contains("cache_fault_marker_5d1c"));
    let s = rig.status();
    assert_eq!(s["cache"]["rebuilds"], 0, "{s}");
    assert!(s["cache"]["unavailable"].is_null(), "{s}");
}

/// After a rebuild: the next ask sends the true bytes, `status` (JSON and text) reports the
/// rebuild and stops saying "rebuilding", and the fresh cache holds the repository again:
/// after a stop its files carry the snapshot and the asked file's content, and the next start
/// opens them without another rebuild.
fn assert_recovered(rig: &Rig, why: &str) {
    assert!(
        rig.ask_about_lib().contains("cache_fault_marker_5d1c"),
        "the ask right after the fault still sent the file"
    );
    let s = rig.status_until("the rebuilt cache refilled", |s| {
        s["cache"]["rebuilds"].as_u64().unwrap_or(0) >= 1 && s["cache"]["rebuilding"].is_null()
    });
    assert_eq!(s["cache"]["last_rebuild"], why, "{s}");
    assert!(s["cache"]["unavailable"].is_null(), "{s}");
    let text = rig.ok(&["status"]);
    assert!(
        text.contains(&format!("rebuilt 1 time (last: {why})")),
        "{text}"
    );
    // Served from the rebuilt cache (a miss reads the disk and stores it again).
    assert!(rig.ask_about_lib().contains("cache_fault_marker_5d1c"));
    assert!(rig.run(&["stop"]).status.success());
    let dir = rig.cache_dir();
    let on_disk: Vec<u8> = cache_files(&dir)
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap_or_default())
        .collect();
    assert!(
        contains(&on_disk, b"src/other.rs"),
        "the repository's snapshot is in the rebuilt cache"
    );
    assert!(
        contains(&on_disk, MARKER.as_bytes()),
        "the asked file's content is in the rebuilt cache"
    );
    let s = rig.status();
    assert_eq!(s["cache"]["rebuilds"], 0, "opened cleanly: {s}");
    let repos = s["repos"].as_array().expect("repos");
    assert!(
        repos
            .iter()
            .any(|r| r["path"] == rig.workdir().as_str() && r["watched"] == true),
        "{s}"
    );
    assert!(rig.ask_about_lib().contains("cache_fault_marker_5d1c"));
    assert!(rig.run(&["stop"]).status.success());
}

#[test]
fn the_cache_deleted_under_a_running_daemon_is_rebuilt_while_asks_go_on() {
    let rig = Rig::new(&[]);
    warm(&rig);
    std::fs::remove_dir_all(rig.cache_dir()).expect("rm -r cache");
    assert_recovered(&rig, "its files were deleted");
}

#[test]
fn garbage_over_the_cache_files_of_a_running_daemon_is_rebuilt_while_asks_go_on() {
    let rig = Rig::new(&[]);
    warm(&rig);
    clobber(&rig.cache_dir());
    assert_recovered(&rig, "its files were overwritten");
}

#[test]
fn a_cache_corrupted_while_stopped_is_discarded_at_start_with_one_log_line() {
    let rig = Rig::new(&[]);
    warm(&rig);
    assert!(rig.run(&["stop"]).status.success());
    clobber(&rig.cache_dir());
    let s = rig.status_until("the repository watched again", |s| {
        s["repos"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["indexed"] == true))
    });
    assert_eq!(s["cache"]["rebuilds"], 1, "{s}");
    assert!(
        s["cache"]["last_rebuild"]
            .as_str()
            .is_some_and(|w| w.starts_with("found broken at start: ")),
        "{s}"
    );
    let log = std::fs::read_to_string(s["log_file"].as_str().expect("log file")).expect("log");
    assert_eq!(
        log.matches("discarding the context cache").count(),
        1,
        "one line says so: {log}"
    );
    assert!(rig.ask_about_lib().contains("cache_fault_marker_5d1c"));
    let s = rig.status_until("the rebuilt cache refilled", |s| {
        s["cache"]["rebuilding"].is_null()
    });
    assert!(s["cache"]["unavailable"].is_null(), "{s}");
    assert!(rig.run(&["stop"]).status.success());
    let s = rig.status();
    assert_eq!(s["cache"]["rebuilds"], 0, "opened cleanly: {s}");
    assert!(rig.run(&["stop"]).status.success());
}

#[test]
fn when_the_kernel_refuses_watches_the_repository_is_degraded_with_a_hint_and_still_served() {
    // `.git`, `.git/info` and the worktree root get watches; `src` and `late` do not.
    let rig = Rig::new(&[
        ("SPARK_TEST_INOTIFY_WATCHES", "3"),
        ("SPARK_TEST_DEGRADED_RESCAN_MS", "100"),
    ]);
    let out = rig.ok(&["watch"]);
    assert!(
        out.contains("\nwarning: degraded: 1 directory could not be watched (the inotify watch limit fs.inotify.max_user_watches is reached)"),
        "{out}"
    );
    assert!(
        out.contains("\nhint: raise the limit, e.g. `sudo sysctl fs.inotify.max_user_watches="),
        "{out}"
    );
    let text = rig.ok(&["status"]);
    assert!(
        text.contains("degraded: 1 directory could not be watched")
            && text.contains("hint: raise the limit"),
        "{text}"
    );
    // A file created where nothing is watched is found by the periodic rescan.
    rig.repo
        .write("src/late.rs", b"pub fn late_marker_9e2b() {}\n");
    let s = rig.status_until("the new file indexed", |s| {
        s["repos"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["files"] == 3))
    });
    let repo = &s["repos"][0];
    assert_eq!(repo["watches"], 3, "{s}");
    assert!(repo["degraded"].as_str().is_some(), "{s}");
    let before = rig.p.fake.requests().len();
    rig.ok(&["ask", "-f", "src/late.rs", "what is it?"]);
    assert!(
        rig.p.fake.requests()[before..]
            .iter()
            .any(|r| r.raw.contains("late_marker_9e2b")),
        "the late file reached the model"
    );
    assert!(rig.run(&["stop"]).status.success());
}
