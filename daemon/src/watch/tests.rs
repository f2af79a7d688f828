//! The watcher on real directories, real inotify and a real sled cache. Every wait is on an
//! event or a state change (a `FilesChanged` event, a change number); the timeouts only turn a
//! hang into a failure.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use spark_proto::events::Event;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Notify, mpsc};

use super::debounce::Rescan;
use super::worker::{Msg, Sink};
use super::*;

/// Long enough for a loaded CI machine; reaching it is a failure, never a pass.
const TIMEOUT: Duration = Duration::from_secs(20);

fn fast() -> WatchOptions {
    WatchOptions {
        timing: Timing {
            quiet: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
            lock_poll: Duration::from_millis(10),
            max_hold: Duration::from_secs(10),
        },
        ..WatchOptions::default()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    repo: PathBuf,
    cache_dir: PathBuf,
    state_dir: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path().join("repo");
        fs::create_dir_all(&repo).expect("mkdir");
        let repo = repo.canonicalize().expect("canonical");
        git2::Repository::init(&repo).expect("git init");
        Fixture {
            cache_dir: dir.path().join("cache"),
            state_dir: dir.path().join("state"),
            repo,
            _dir: dir,
        }
    }

    fn write(&self, rel: &str, content: impl AsRef<[u8]>) {
        let p = self.repo.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, content).expect("write");
    }

    fn start(&self, options: WatchOptions) -> Daemon {
        let (events, _) = broadcast::channel(1024);
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let watchers = Watchers::new(
            &self.cache_dir,
            &self.state_dir,
            events.clone(),
            &tracker,
            &shutdown,
            options,
        );
        Daemon {
            watchers,
            rx: events.subscribe(),
            tracker,
            shutdown,
        }
    }
}

struct Daemon {
    watchers: Watchers,
    rx: broadcast::Receiver<Event>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Daemon {
    /// Every path of every `FilesChanged` event until one names `path`.
    async fn until_changed(&mut self, path: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let wait = async {
            loop {
                match self.rx.recv().await {
                    Ok(Event::FilesChanged { paths, .. }) => {
                        let hit = paths.iter().any(|p| p == path);
                        seen.extend(paths);
                        if hit {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => panic!("event channel: {e}"),
                }
            }
        };
        tokio::time::timeout(TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| panic!("no FilesChanged for {path}; saw {seen:?}"));
        seen
    }

    fn status(&self, repo: &Path) -> RepoWatchStatus {
        self.watchers
            .status()
            .into_iter()
            .find(|s| s.workdir == repo)
            .expect("watched")
    }

    fn cache(&self) -> Option<Cache> {
        match &*self.watchers.hub.cache.borrow() {
            CacheSlot::Open(c) => Some(c.clone()),
            _ => None,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(TIMEOUT, self.tracker.wait())
            .await
            .expect("tasks drain");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_freshly_made_nested_directories_reach_the_outline() {
    let fx = Fixture::new();
    fx.write("src/lib.rs", "pub fn lib() {}\n");
    let mut d = fx.start(fast());
    let s = d.watchers.watch(&fx.repo).await.expect("watch");
    assert_eq!(s.files, 1);
    // notify alone misses some of these (CRATES.md: 5–40 of 50 trials); every one must arrive.
    for i in 0..30 {
        let rel = format!("t{i}/a/b/c/f.rs");
        fs::create_dir_all(fx.repo.join(format!("t{i}/a/b/c"))).expect("mkdir -p");
        fs::write(fx.repo.join(&rel), format!("fn f{i}() {{}}\n")).expect("write");
        d.until_changed(&rel).await;
        let outline = d.watchers.outline(&fx.repo).expect("outline");
        assert!(
            outline.contains(&format!("t{i}/a/b/c/\n  f.rs: fn f{i}\n")),
            "{outline}"
        );
        let cached = d.watchers.file(&fx.repo, &rel).expect("cached");
        assert_eq!(cached.bytes, format!("fn f{i}() {{}}\n").as_bytes());
    }
    // The new directories are watched too: a later file in one is seen.
    fx.write("t3/a/b/later.rs", "x\n");
    d.until_changed("t3/a/b/later.rs").await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_directories_consume_no_watches() {
    let fx = Fixture::new();
    fx.write(".gitignore", "node_modules/\n");
    fx.write("src/lib.rs", "x\n");
    for i in 0..200 {
        fx.write(
            &format!("node_modules/pkg{i}/lib/index.js"),
            "module.exports = 1;\n",
        );
    }
    fs::create_dir_all(fx.repo.join(".git/info")).expect("mkdir");
    fs::write(fx.repo.join(".git/info/exclude"), "scratch/\n").expect("write");
    fx.write("scratch/deep/notes.txt", "x\n");
    let mut d = fx.start(fast());
    let s = d.watchers.watch(&fx.repo).await.expect("watch");
    // The worktree root and src/, plus .git and .git/info for index.lock and exclude.
    assert_eq!(s.watches, 4, "{s:?}");
    assert_eq!(s.files, 2, "{s:?}");
    assert_eq!(s.degraded, None);
    let outline = d.watchers.outline(&fx.repo).expect("outline");
    assert!(
        !outline.contains("node_modules") && !outline.contains("scratch"),
        "{outline}"
    );
    // Writing inside the ignored tree changes nothing we report.
    fx.write("node_modules/pkg0/new.js", "x\n");
    fx.write("src/b.rs", "x\n");
    let seen = d.until_changed("src/b.rs").await;
    assert!(
        seen.iter().all(|p| !p.starts_with("node_modules")),
        "{seen:?}"
    );
    assert_eq!(d.status(&fx.repo).watches, 4);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_own_writes_produce_no_event() {
    let fx = Fixture::new();
    fx.write("src/own.rs", "old\n");
    fx.write("src/doomed.rs", "x\n");
    let mut d = fx.start(fast());
    d.watchers.watch(&fx.repo).await.expect("watch");
    d.watchers
        .expect_own_write(&fx.repo, "src/own.rs", Some(b"new\n"));
    d.watchers
        .expect_own_write(&fx.repo, "src/created.rs", Some(b"made\n"));
    d.watchers.expect_own_write(&fx.repo, "src/doomed.rs", None);
    fx.write("src/own.rs", "new\n");
    fx.write("src/created.rs", "made\n");
    fs::remove_file(fx.repo.join("src/doomed.rs")).expect("rm");
    // Then the user edits something: its event proves the earlier writes were processed.
    fx.write("src/user.rs", "mine\n");
    let seen = d.until_changed("src/user.rs").await;
    assert_eq!(seen, ["src/user.rs"]);
    // The index did take the own writes in.
    assert_eq!(
        d.watchers
            .file(&fx.repo, "src/own.rs")
            .expect("cached")
            .bytes,
        b"new\n"
    );
    assert!(d.watchers.file(&fx.repo, "src/created.rs").is_some());
    assert!(d.watchers.file(&fx.repo, "src/doomed.rs").is_none());
    // changed_since lists only the user's file.
    let c = d.watchers.changed_since(&fx.repo, 0).expect("watched");
    assert_eq!(c.created, ["src/user.rs"]);
    assert!(c.modified.is_empty() && c.deleted.is_empty(), "{c:?}");
    // An expectation is used once: the user writing different bytes later is reported.
    fx.write("src/own.rs", "user again\n");
    d.until_changed("src/own.rs").await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_repositories_survive_a_restart() {
    let fx = Fixture::new();
    fx.write("src/lib.rs", "pub fn lib() {}\n");
    let d = fx.start(fast());
    d.watchers.watch(&fx.repo).await.expect("watch");
    // Watching twice is fine and lists it once.
    d.watchers.watch(&fx.repo).await.expect("watch again");
    let outline = d.watchers.outline(&fx.repo).expect("outline");
    d.stop().await;
    assert!(fx.state_dir.join(persist::FILE_NAME).exists());

    let d = fx.start(fast());
    assert!(d.watchers.status().is_empty());
    d.watchers.restore_all().await;
    let s = d.status(&fx.repo);
    assert!(s.indexed && s.files == 1, "{s:?}");
    assert_eq!(d.watchers.outline(&fx.repo).expect("outline"), outline);
    assert_eq!(
        d.watchers
            .file(&fx.repo, "src/lib.rs")
            .expect("cached")
            .bytes,
        b"pub fn lib() {}\n"
    );
    // Unwatching forgets it for good.
    assert!(d.watchers.unwatch(&fx.repo).await.expect("unwatch"));
    assert!(d.watchers.outline(&fx.repo).is_none());
    d.stop().await;
    let d = fx.start(fast());
    d.watchers.restore_all().await;
    assert!(d.watchers.status().is_empty());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_that_is_gone_is_dropped_from_the_list_on_restore() {
    let fx = Fixture::new();
    let other = fx.repo.parent().expect("parent").join("other");
    fs::create_dir_all(&other).expect("mkdir");
    let d = fx.start(fast());
    d.watchers.watch(&fx.repo).await.expect("watch");
    d.watchers.watch(&other).await.expect("watch");
    d.stop().await;
    fs::remove_dir_all(&other).expect("rm");
    let d = fx.start(fast());
    d.watchers.restore_all().await;
    assert_eq!(d.watchers.status().len(), 1);
    assert_eq!(
        persist::load(&fx.state_dir).expect("load"),
        vec![fx.repo.clone()]
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_cache_directory_is_rebuilt_and_watching_goes_on() {
    let fx = Fixture::new();
    fx.write("src/lib.rs", "pub fn lib() {}\n");
    fs::create_dir_all(fx.cache_dir.join("blobs")).expect("mkdir");
    for f in ["db", "conf", "snap.0000000000000000", "blobs/1"] {
        fs::write(fx.cache_dir.join(f), b"\x00\xffnot sled at all\x13\x37").expect("write");
    }
    let mut d = fx.start(fast());
    let s = d.watchers.watch(&fx.repo).await.expect("watch");
    assert_eq!(s.files, 1);
    let c = d.watchers.cache_status();
    assert_eq!(c.unavailable, None, "{c:?}");
    assert_eq!(c.rebuilds, 1, "{c:?}");
    assert_eq!(c.entries, 1);
    assert_eq!(
        d.watchers
            .file(&fx.repo, "src/lib.rs")
            .expect("cached")
            .bytes,
        b"pub fn lib() {}\n"
    );
    // Deleting the whole directory under the running daemon: noticed at the next batch.
    fs::remove_dir_all(&fx.cache_dir).expect("rm");
    fx.write("src/new.rs", "fn new() {}\n");
    d.until_changed("src/new.rs").await;
    assert!(fx.cache_dir.join("db").exists(), "rebuilt");
    assert_eq!(d.watchers.cache_status().rebuilds, 2);
    // Served from the rebuilt cache (metadata rewritten, content read back on a miss).
    assert_eq!(
        d.watchers
            .file(&fx.repo, "src/lib.rs")
            .expect("cached")
            .bytes,
        b"pub fn lib() {}\n"
    );
    let cache = d.cache().expect("cache");
    assert_eq!(cache.load_snapshot(&fx.repo).map(|r| r.len()), Some(2));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cache_the_watcher_still_serves() {
    let fx = Fixture::new();
    fx.write("src/lib.rs", "pub fn lib() {}\n");
    // A file where the cache directory should be: sled cannot open it, nor can it be removed
    // as a directory — the daemon must carry on without a cache and say so.
    fs::write(&fx.cache_dir, "not a directory").expect("write");
    let d = fx.start(fast());
    d.watchers.watch(&fx.repo).await.expect("watch");
    let c = d.watchers.cache_status();
    assert!(c.unavailable.is_some(), "{c:?}");
    assert_eq!(
        d.watchers.file(&fx.repo, "src/lib.rs").expect("read").bytes,
        b"pub fn lib() {}\n"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_ignored_binary_and_large_files_never_reach_the_cache() {
    let fx = Fixture::new();
    let canary = "CANARY-7f3a9c";
    fx.write(".gitignore", "build/\n*.secret\n");
    fx.write("src/lib.rs", "fn ok() {}\n");
    for rel in [
        ".env",
        ".env.local",
        "config/.npmrc",
        "keys/server.pem",
        "id_rsa",
        ".aws/credentials",
        ".ssh/config",
        "build/out.rs",
        "notes.secret",
        "nested/.git/config",
    ] {
        fx.write(rel, format!("{canary} {rel}\n"));
    }
    fx.write("blob.bin", format!("\0{canary}"));
    fx.write(
        "huge.txt",
        format!("{canary}\n{}", "x".repeat(super::MAX_FILE_BYTES)),
    );
    let mut d = fx.start(fast());
    d.watchers.watch(&fx.repo).await.expect("watch");
    // Also files appearing later.
    fx.write(".env.production", format!("{canary}\n"));
    fx.write("build/late.rs", format!("{canary}\n"));
    fx.write("src/late.rs", "fn late() {}\n");
    let seen = d.until_changed("src/late.rs").await;
    assert_eq!(seen, ["src/late.rs"]);
    let outline = d.watchers.outline(&fx.repo).expect("outline");
    for hidden in [
        ".env", "npmrc", "pem", "id_rsa", ".aws", ".ssh", "build", "secret", "nested",
    ] {
        assert!(!outline.contains(hidden), "{hidden} in {outline}");
    }
    // Binary and oversized files are named, never cached.
    assert!(
        outline.contains("blob.bin") && outline.contains("huge.txt"),
        "{outline}"
    );
    for rel in [
        ".env",
        "id_rsa",
        "build/out.rs",
        "blob.bin",
        "huge.txt",
        ".git/config",
    ] {
        assert!(d.watchers.file(&fx.repo, rel).is_none(), "{rel}");
    }
    let cache = d.cache().expect("cache");
    cache.flush();
    assert!(
        !cache.contains_bytes(canary.as_bytes()),
        "a canary reached sled"
    );
    assert!(
        cache.contains_bytes(b"fn late() {}"),
        "the scan itself works"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_gitignore_adds_and_drops_directories() {
    let fx = Fixture::new();
    fx.write("gen/a.rs", "x\n");
    fx.write("gen/sub/b.rs", "x\n");
    fx.write("src/lib.rs", "x\n");
    let mut d = fx.start(fast());
    let before = d.watchers.watch(&fx.repo).await.expect("watch");
    fx.write(".gitignore", "gen/\n");
    let seen = d.until_changed(".gitignore").await;
    let mut seen_after = seen.clone();
    if !seen.iter().any(|p| p == "gen/a.rs") {
        seen_after = d.until_changed("gen/a.rs").await;
    }
    assert!(
        seen_after.iter().any(|p| p == "gen/sub/b.rs"),
        "{seen_after:?}"
    );
    let s = d.status(&fx.repo);
    assert_eq!(s.watches, before.watches - 2, "gen and gen/sub unwatched");
    assert!(
        !d.watchers
            .outline(&fx.repo)
            .expect("outline")
            .contains("gen/")
    );
    fs::remove_file(fx.repo.join(".gitignore")).expect("rm");
    let mut seen = d.until_changed(".gitignore").await;
    if !seen.iter().any(|p| p == "gen/sub/b.rs") {
        seen = d.until_changed("gen/sub/b.rs").await;
    }
    assert!(!seen.is_empty());
    assert_eq!(d.status(&fx.repo).watches, before.watches);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_directory_stays_watched() {
    let fx = Fixture::new();
    fx.write("a/x.rs", "x\n");
    let mut d = fx.start(fast());
    let before = d.watchers.watch(&fx.repo).await.expect("watch");
    fs::rename(fx.repo.join("a"), fx.repo.join("b")).expect("mv");
    d.until_changed("b/x.rs").await;
    // inotify gives the moved inode the same watch; the new name must still report.
    fx.write("b/y.rs", "y\n");
    d.until_changed("b/y.rs").await;
    let c = d
        .watchers
        .changed_since(&fx.repo, before.seq)
        .expect("watched");
    assert_eq!(c.deleted, ["a/x.rs"]);
    assert_eq!(c.created, ["b/x.rs", "b/y.rs"]);
    assert_eq!(d.status(&fx.repo).watches, before.watches);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_watch_budget_is_reported_and_rescanned() {
    let fx = Fixture::new();
    fx.write("a/x.rs", "x\n");
    fx.write("b/x.rs", "x\n");
    fx.write("c/x.rs", "x\n");
    let mut options = fast();
    // .git, .git/info, the root and one more.
    options.max_watches = 4;
    options.degraded_rescan = Duration::from_millis(100);
    let mut d = fx.start(options);
    let s = d.watchers.watch(&fx.repo).await.expect("watch");
    assert_eq!(s.watches, 4);
    let why = s.degraded.expect("degraded");
    assert!(why.contains("2 directories could not be watched"), "{why}");
    assert!(why.contains("budget"), "{why}");
    assert_eq!(s.files, 3, "still indexed");
    // A change in an unwatched directory is still found, by the periodic rescan.
    fx.write("c/new.rs", "n\n");
    d.until_changed("c/new.rs").await;
    assert!(d.status(&fx.repo).rescans >= 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_rescans_and_says_so() {
    let fx = Fixture::new();
    fx.write("src/lib.rs", "x\n");
    let mut d = fx.start(fast());
    d.watchers.watch(&fx.repo).await.expect("watch");
    fx.write("src/new.rs", "x\n");
    assert!(d.watchers.refresh(&fx.repo));
    d.until_changed("src/new.rs").await;
    let s = d.status(&fx.repo);
    let seq = s.seq;
    // The refresh may land in the same batch as the write's events or the next one.
    if s.rescans == 0 {
        assert!(d.watchers.refresh(&fx.repo));
        fx.write("src/third.rs", "x\n");
        d.until_changed("src/third.rs").await;
    }
    let s = d.status(&fx.repo);
    assert!(s.rescans >= 1 && s.seq >= seq, "{s:?}");
    assert_eq!(s.last_rescan.as_deref(), Some("a refresh was requested"));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_for_index_lock() {
    let fx = Fixture::new();
    fx.write("src/lib.rs", "x\n");
    let mut d = fx.start(fast());
    d.watchers.watch(&fx.repo).await.expect("watch");
    let lock = fx.repo.join(".git/index.lock");
    fs::write(&lock, "").expect("lock");
    fx.write("src/during.rs", "x\n");
    // Once git is done, the held batch goes through.
    fs::remove_file(&lock).expect("unlock");
    d.until_changed("src/during.rs").await;
    d.stop().await;
}

#[test]
fn a_full_queue_becomes_an_overflow_rescan() {
    use notify::EventHandler as _;
    let (tx, mut rx) = mpsc::channel(1);
    let mut sink = Sink {
        tx,
        overflow: Arc::new(AtomicBool::new(false)),
        wake: Arc::new(Notify::new()),
    };
    let ev = |kind| Ok(notify::Event::new(kind).add_path(PathBuf::from("/r/a")));
    sink.handle_event(ev(notify::EventKind::Access(
        notify::event::AccessKind::Any,
    )));
    assert!(rx.try_recv().is_err(), "access events are dropped");
    sink.handle_event(ev(notify::EventKind::Create(
        notify::event::CreateKind::File,
    )));
    sink.handle_event(ev(notify::EventKind::Create(
        notify::event::CreateKind::File,
    )));
    assert!(
        sink.overflow.load(Ordering::Acquire),
        "second one overflowed"
    );
    assert!(matches!(rx.try_recv(), Ok(Msg::Paths(_))));
    sink.handle_event(Ok(
        notify::Event::new(notify::EventKind::Other).set_flag(notify::event::Flag::Rescan)
    ));
    assert!(matches!(rx.try_recv(), Ok(Msg::Rescan(Rescan::Overflow))));
}

#[test]
fn index_once_builds_a_cold_then_warm_index() {
    let fx = Fixture::new();
    for i in 0..50 {
        fx.write(&format!("d{}/f{i}.rs", i % 5), format!("fn f{i}() {{}}\n"));
    }
    let cold = index_once(&fx.repo, Some(&fx.cache_dir)).expect("cold");
    assert_eq!((cold.files, cold.text_files), (50, 50));
    assert_eq!(cold.watches, 6 + 2);
    let warm = index_once(&fx.repo, Some(&fx.cache_dir)).expect("warm");
    assert_eq!(warm.files, 50);
}
