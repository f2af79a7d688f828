//! Repository watching: keeps an in-memory index (and the sled [`Cache`]) of every watched
//! repository current, so building a request is memory work (ARCHITECTURE.md, `watch/`).
//!
//! - `debounce`: the pure state machine between raw events and batches (quiet period, maximum
//!   delay, held while `.git/index.lock` exists).
//! - `scan`: listing directories the way git sees them; reading files the way the model may.
//! - `index`: a repository's view — file metadata, the outline, what changed when.
//! - `persist`: the list of watched repositories in `watched.json`.
//! - `tree`: a repository's directories, their rules and watches, and rescans.
//! - `worker`: a repository's shared state and the task that keeps it current.
//!
//! One task per repository owns its notify watcher and its directory tree. Watches are
//! non-recursive, one per directory git does not ignore, so an ignored `node_modules` costs
//! nothing; each is added *before* its directory is listed, so nothing created right after a
//! `mkdir -p` slips between the two. notify's callback only `try_send`s into a bounded queue; a
//! full queue or a kernel overflow becomes a full rescan, logged and counted. A directory that
//! cannot be watched (inotify limit) marks the repository degraded in `status` and switches on
//! a periodic rescan instead of silently missing changes. Writes the edit engine announces
//! through [`Watchers::expect_own_write`] update the index without a `FilesChanged` event.
//!
//! Correctness never depends on this module: the edit engine re-hashes every file before it
//! applies anything, and [`Watchers::file`] re-checks `lstat` before serving cached bytes.

mod cache;
mod debounce;
mod index;
mod persist;
mod scan;
#[cfg(test)]
mod tests;
mod tree;
mod worker;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spark_proto::events::Event;
use spark_proto::{ErrorCode, RpcError};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::edit::paths;
use crate::watch::cache::{BlobId, Cache};
use debounce::Rescan;
pub(crate) use debounce::Timing;
pub(crate) use index::Changes;
use tree::Tree;
use worker::{Msg, OwnWrite, Progress, Repo, Sink, run_repo};

/// Raw notify messages queued per repository. Beyond it the callback drops them and flags an
/// overflow, which becomes one full rescan: memory stays bounded during a huge checkout.
const EVENT_QUEUE: usize = 4096;
/// An announced own write that the watcher has not seen within this long is forgotten, so a
/// later user edit producing the same bytes is not swallowed.
const OWN_WRITE_TTL: Duration = Duration::from_secs(10);
/// How long `unwatch` waits for a repository's last batch before dropping its cache entries.
const UNWATCH_WAIT: Duration = Duration::from_secs(5);
/// sled's size on disk is re-measured at most this often (it stats files).
const MEASURE_EVERY: Duration = Duration::from_secs(10);
/// A previous daemon may still be closing the cache when we start: retry its lock this often…
const CACHE_LOCK_RETRY: Duration = Duration::from_millis(200);
/// …this many times before running without a cache.
const CACHE_LOCK_ATTEMPTS: u32 = 10;
/// Files read by this many threads during a large (re)index; reading is mostly syscalls and
/// SHA-1, and the daemon should not take every core from the user's editor and compiler.
const READ_THREADS: usize = 4;
/// Below this many files to read, one thread is faster than starting more.
const PARALLEL_READ_MIN: usize = 256;
/// Top-level symbols are kept for repositories up to this many files: past it the outline
/// budget (`index::OUTLINE_MAX_BYTES`) has room for file names only, and symbols for 10k files
/// would cost several MB per repository for nothing.
const SYMBOLS_MAX_FILES: usize = 1500;

/// Largest file kept in the index and sent to the model whole; bigger files are listed by name
/// only, and a bigger focus file is refused with a clear error.
pub(crate) const MAX_FILE_BYTES: usize = 256 * 1024;
/// A repository's metadata snapshot is written to sled at most this often while it changes
/// (and at once after the first index, and when watching stops).
const SNAPSHOT_EVERY: Duration = Duration::from_secs(30);

/// Tunables; tests shorten the timings and shrink the watch budget.
#[derive(Debug, Clone)]
pub(crate) struct WatchOptions {
    pub(crate) timing: Timing,
    /// Watches all repositories together may use. The kernel's own limit
    /// (`fs.inotify.max_user_watches`) is shared with editors and other tools and also applies.
    pub(crate) max_watches: usize,
    /// How often a degraded repository is rescanned in full.
    pub(crate) degraded_rescan: Duration,
}

impl Default for WatchOptions {
    fn default() -> WatchOptions {
        WatchOptions {
            timing: Timing::default(),
            max_watches: usize::MAX,
            degraded_rescan: Duration::from_secs(30),
        }
    }
}

/// Why watching a repository failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WatchError {
    #[error("cannot watch {path}: {source}")]
    Resolve {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot watch {path}: it is not a directory")]
    NotADirectory { path: String },
    #[error("cannot index {path}: {why}")]
    Index { path: String, why: String },
    #[error("cannot save the list of watched repositories to {path}: {source}")]
    Persist {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot watch {path}: the daemon is shutting down")]
    Stopped { path: String },
}

impl WatchError {
    /// The wire error; exhaustive so a new variant needs a decision.
    pub(crate) fn to_rpc(&self) -> RpcError {
        let code = match self {
            WatchError::Resolve { .. } | WatchError::NotADirectory { .. } => {
                ErrorCode::NotARepository
            }
            WatchError::Index { .. } | WatchError::Persist { .. } => ErrorCode::Internal,
            WatchError::Stopped { .. } => ErrorCode::ShuttingDown,
        };
        RpcError::new(code, self.to_string())
    }
}

/// One watched repository, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RepoWatchStatus {
    pub(crate) workdir: PathBuf,
    /// False while the first index is still being built.
    pub(crate) indexed: bool,
    /// Files in the outline (text, binary and oversized).
    pub(crate) files: u64,
    /// Text files among them (content servable through [`Watchers::file`]), and their bytes.
    pub(crate) text_files: u64,
    pub(crate) text_bytes: u64,
    /// Directory watches in use (the git directory's included).
    pub(crate) watches: u64,
    /// Unix ms of the last raw event.
    pub(crate) last_event_at: Option<u64>,
    /// Unix ms when the first index was done, and how long it took.
    pub(crate) indexed_at: Option<u64>,
    pub(crate) index_ms: Option<u64>,
    /// Why changes may be noticed late (only by a periodic rescan); `None` when all is well.
    pub(crate) degraded: Option<String>,
    /// Full rescans since watching started, and the reason for the last one.
    pub(crate) rescans: u64,
    pub(crate) last_rescan: Option<String>,
    /// Current change number (see [`Watchers::changed_since`]).
    pub(crate) seq: u64,
}

impl RepoWatchStatus {
    /// A persisted repository whose watch has not started yet.
    fn pending(workdir: PathBuf) -> RepoWatchStatus {
        RepoWatchStatus {
            workdir,
            indexed: false,
            files: 0,
            text_files: 0,
            text_bytes: 0,
            watches: 0,
            last_event_at: None,
            indexed_at: None,
            index_ms: None,
            degraded: None,
            rescans: 0,
            last_rescan: None,
            seq: 0,
        }
    }
}

/// The context cache, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CacheSummary {
    pub(crate) dir: PathBuf,
    /// `None` when serving; otherwise why the daemon runs without it (or "opening").
    pub(crate) unavailable: Option<String>,
    /// Text files indexed across watched repositories (their content is stored on first use).
    pub(crate) entries: u64,
    /// sled's size on disk, as last measured.
    pub(crate) bytes: u64,
    /// Times the cache was discarded and rebuilt since the daemon started.
    pub(crate) rebuilds: u64,
}

/// A file's content as the cache serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CachedFile {
    pub(crate) bytes: Vec<u8>,
    pub(crate) blob: BlobId,
}

#[derive(Debug, Clone)]
enum CacheSlot {
    Opening,
    Open(Cache),
    Unavailable(String),
}

/// Every watched repository. Cheap to clone; owned by the server's `Shared`.
#[derive(Debug, Clone)]
pub(crate) struct Watchers {
    hub: Arc<Hub>,
}

#[derive(Debug)]
struct Hub {
    cache_dir: PathBuf,
    state_dir: PathBuf,
    events: broadcast::Sender<Event>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    options: WatchOptions,
    cache: watch::Sender<CacheSlot>,
    repos: Mutex<HashMap<PathBuf, Arc<Repo>>>,
    /// The persisted list (`None` until first read). It is the user's choice, kept apart from
    /// what is currently running so a repository that failed to start is not forgotten.
    persisted: tokio::sync::Mutex<Option<BTreeSet<PathBuf>>>,
    /// Repositories whose watch is starting in the background (restored after a restart, or
    /// first asked about): `status` lists them as watched but not indexed yet.
    restoring: Mutex<BTreeSet<PathBuf>>,
    budget: Arc<Budget>,
    /// Where settled changes go for local history (set once at start; none in benchmarks).
    settled: std::sync::OnceLock<mpsc::Sender<crate::history::Settled>>,
}

#[derive(Debug)]
struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Watchers {
    /// Start with no repository watched, and open the cache in `cache_dir` in the background
    /// (sled replays its log on open; nothing waits for it but the first `watch`).
    pub(crate) fn new(
        cache_dir: &Path,
        state_dir: &Path,
        events: broadcast::Sender<Event>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        options: WatchOptions,
    ) -> Watchers {
        let hub = Arc::new(Hub {
            cache_dir: cache_dir.to_owned(),
            state_dir: state_dir.to_owned(),
            events,
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            budget: Arc::new(Budget {
                used: AtomicUsize::new(0),
                max: options.max_watches,
            }),
            options,
            cache: watch::Sender::new(CacheSlot::Opening),
            repos: Mutex::new(HashMap::new()),
            persisted: tokio::sync::Mutex::new(None),
            restoring: Mutex::new(BTreeSet::new()),
            settled: std::sync::OnceLock::new(),
        });
        tracker.spawn(open_cache(hub.clone()));
        Watchers { hub }
    }

    /// Send every settled batch's changed paths (created, modified, deleted; the daemon's own
    /// writes too) to `tx`, for local history. Call before the first `watch`.
    pub(crate) fn on_settled(&self, tx: mpsc::Sender<crate::history::Settled>) {
        let _ = self.hub.settled.set(tx);
    }

    /// Watch every repository of the persisted list again (at daemon start), one after the
    /// other in the background. A directory that no longer exists is dropped from the list.
    pub(crate) fn restore(&self) {
        // A few hundred bytes, read once at startup so `status` knows the list at once.
        if let Ok(list) = persist::load(&self.hub.state_dir)
            && let Ok(mut r) = self.hub.restoring.lock()
        {
            r.extend(list);
        }
        let this = self.clone();
        self.hub
            .tracker
            .spawn(async move { this.restore_all().await });
    }

    async fn restore_all(&self) {
        for workdir in self.persisted_snapshot().await {
            if self.hub.shutdown.is_cancelled() {
                return;
            }
            let result = self.watch(&workdir).await;
            if let Ok(mut r) = self.hub.restoring.lock() {
                r.remove(&workdir);
            }
            match result {
                Ok(s) => info!(repo = %workdir.display(), files = s.files, "watching again"),
                Err(e @ (WatchError::Resolve { .. } | WatchError::NotADirectory { .. })) => {
                    warn!(error = %e, "forgetting a watched repository that is gone");
                    let _ = self.update_persisted(|set| set.remove(&workdir)).await;
                }
                Err(e) => warn!(error = %e, "cannot watch a repository again"),
            }
        }
    }

    /// Watch `workdir` (a worktree root, e.g. `RepoHandle::workdir()`) and wait until its first
    /// index is built. Idempotent; the repository is added to the persisted list.
    pub(crate) async fn watch(&self, workdir: &Path) -> Result<RepoWatchStatus, WatchError> {
        let shown = || workdir.display().to_string();
        let w = workdir.to_owned();
        let canonical = tokio::task::spawn_blocking(move || {
            let c = w.canonicalize()?;
            Ok::<_, std::io::Error>((c.is_dir(), c))
        })
        .await
        .map_err(|e| WatchError::Index {
            path: shown(),
            why: e.to_string(),
        })?
        .map_err(|source| WatchError::Resolve {
            path: shown(),
            source,
        })?;
        let workdir = match canonical {
            (true, c) => c,
            (false, _) => return Err(WatchError::NotADirectory { path: shown() }),
        };
        let repo = self.start(&workdir).await?;
        let mut progress = repo.progress.subscribe();
        let state = progress
            .wait_for(|p| !matches!(p, Progress::Indexing))
            .await
            .map(|p| p.clone())
            .unwrap_or(Progress::Stopped);
        match state {
            Progress::Indexed(_) => {}
            Progress::Failed(why) => {
                self.forget(&workdir, &repo);
                return Err(WatchError::Index {
                    path: workdir.display().to_string(),
                    why,
                });
            }
            Progress::Indexing | Progress::Stopped => {
                return Err(WatchError::Stopped {
                    path: workdir.display().to_string(),
                });
            }
        }
        self.update_persisted(|set| set.insert(workdir.clone()))
            .await?;
        Ok(repo.status())
    }

    /// Watch `workdir` in the background if it is not watched yet (on a repository's first
    /// `ask`); never waits.
    pub(crate) fn ensure_watched(&self, workdir: &Path) {
        if self.repo(workdir).is_some() || self.hub.shutdown.is_cancelled() {
            return;
        }
        let this = self.clone();
        let workdir = workdir.to_owned();
        // Listed as watched (not yet indexed) at once, like a repository being restored.
        if let Ok(mut r) = self.hub.restoring.lock() {
            r.insert(workdir.clone());
        }
        self.hub.tracker.spawn(async move {
            let result = this.watch(&workdir).await;
            if let Ok(mut r) = this.hub.restoring.lock() {
                r.remove(&workdir);
            }
            if let Err(e) = result {
                warn!(error = %e, "cannot watch a repository");
            }
        });
    }

    /// Stop watching `workdir`, forget its cache entries and remove it from the persisted list.
    /// Returns whether it was watched (or persisted).
    pub(crate) async fn unwatch(&self, workdir: &Path) -> Result<bool, WatchError> {
        let w = workdir.to_owned();
        let workdir = tokio::task::spawn_blocking(move || w.canonicalize().unwrap_or(w))
            .await
            .unwrap_or_else(|_| workdir.to_owned());
        let running = self
            .hub
            .repos
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&workdir));
        if let Some(repo) = &running {
            repo.stop.cancel();
            // Let its last batch finish first, or it could write entries back after the drop.
            let mut progress = repo.progress.subscribe();
            let stopped =
                progress.wait_for(|p| matches!(p, Progress::Stopped | Progress::Failed(_)));
            let _ = tokio::time::timeout(UNWATCH_WAIT, stopped).await;
            if let Some(cache) = repo.cache.clone() {
                let w = workdir.clone();
                let _ = tokio::task::spawn_blocking(move || cache.drop_repo(&w)).await;
            }
            info!(repo = %workdir.display(), "no longer watching");
        }
        if let Ok(mut r) = self.hub.restoring.lock() {
            r.remove(&workdir);
        }
        let listed = self.update_persisted(|set| set.remove(&workdir)).await?;
        Ok(running.is_some() || listed)
    }

    /// Rescan `workdir` in full soon (git hooks after a checkout, merge or rewrite); false if
    /// it is not watched.
    pub(crate) fn refresh(&self, workdir: &Path) -> bool {
        self.repo(workdir)
            .is_some_and(|r| r.inject.try_send(Msg::Rescan(Rescan::Requested)).is_ok())
    }

    /// Per repository: files indexed, watches used, last event, degraded or not, cache size.
    /// Memory only; cheap enough for every `status` request.
    pub(crate) fn status(&self) -> Vec<RepoWatchStatus> {
        let repos: Vec<Arc<Repo>> = self
            .hub
            .repos
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let mut out: Vec<_> = repos.iter().map(|r| r.status()).collect();
        let restoring: Vec<PathBuf> = self
            .hub
            .restoring
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default();
        for workdir in restoring {
            if !out.iter().any(|s| s.workdir == workdir) {
                out.push(RepoWatchStatus::pending(workdir));
            }
        }
        out.sort_by(|a, b| a.workdir.cmp(&b.workdir));
        out
    }

    /// The context cache's state. Memory only.
    pub(crate) fn cache_status(&self) -> CacheSummary {
        let entries = self.status().iter().map(|s| s.text_files).sum();
        let slot = self.hub.cache.borrow().clone();
        let (unavailable, bytes, rebuilds) = match slot {
            CacheSlot::Opening => (Some("opening".to_owned()), 0, 0),
            CacheSlot::Unavailable(why) => (Some(why), 0, 0),
            CacheSlot::Open(c) => {
                let r = c.report();
                (r.unavailable, r.bytes_on_disk, r.rebuilds)
            }
        };
        CacheSummary {
            dir: self.hub.cache_dir.clone(),
            unavailable,
            entries,
            bytes,
            rebuilds,
        }
    }

    /// The edit engine is about to write `content` to `rel` (`None`: delete it). When the
    /// watcher sees exactly that, it updates the index without a `FilesChanged` event. Call it
    /// before the write lands (or right after: the debounce window covers that too).
    /// [`Watchers::expect_own_write`] for every file an edit wrote (`None` = deleted).
    pub(crate) fn note_own_writes(&self, workdir: &Path, files: &[(String, Option<Vec<u8>>)]) {
        for (rel, content) in files {
            self.expect_own_write(workdir, rel, content.as_deref());
        }
    }

    pub(crate) fn expect_own_write(&self, workdir: &Path, rel: &str, content: Option<&[u8]>) {
        let Some(repo) = self.repo(workdir) else {
            return;
        };
        let Ok(rel) = paths::validate_rel_path(rel) else {
            return;
        };
        if let Ok(mut own) = repo.own.lock() {
            own.insert(
                rel.as_str().to_owned(),
                OwnWrite {
                    blob: content.map(BlobId::of),
                    at: std::time::Instant::now(),
                },
            );
        }
    }

    /// The outline of `workdir` (the string sent to the model), or `None` if it is not watched
    /// or not indexed yet. An `Arc` clone under a read lock: no disk access.
    pub(crate) fn outline(&self, workdir: &Path) -> Option<Arc<str>> {
        let repo = self.repo(workdir)?;
        if !repo.is_indexed() {
            return None;
        }
        repo.view.read().ok().map(|v| v.outline.clone())
    }

    /// The content of `rel` if the index holds it as text: one `lstat` to confirm the indexed
    /// version is still on disk, then the cached bytes (or a fresh read if the file changed
    /// and the watcher has not caught up). `None` for anything not indexed as text: ignored,
    /// secret, binary, oversized, missing — the caller then applies its own checks to the disk.
    /// Blocks briefly (a syscall and a sled read): call it on the repo actor or a blocking thread.
    pub(crate) fn file(&self, workdir: &Path, rel: &str) -> Option<CachedFile> {
        let repo = self.repo(workdir)?;
        let rel = paths::validate_rel_path(rel).ok()?;
        if paths::is_secret(&rel) {
            return None;
        }
        repo.file(rel.as_str())
    }

    /// The current change number of `workdir` (0 until indexed).
    pub(crate) fn seq(&self, workdir: &Path) -> Option<u64> {
        let repo = self.repo(workdir)?;
        repo.view.read().ok().map(|v| v.seq)
    }

    /// Files created, modified and deleted by the user since change number `seq` (from an
    /// earlier [`Watchers::seq`] or `Changes::seq`); own writes are not listed.
    pub(crate) fn changed_since(&self, workdir: &Path, seq: u64) -> Option<Changes> {
        let repo = self.repo(workdir)?;
        repo.view.read().ok().map(|v| v.changed_since(seq))
    }

    /// The files the user changed most recently, newest first (context selection, ARCHITECTURE.md "Data flow: one `ask`").
    pub(crate) fn recently_changed(&self, workdir: &Path, limit: usize) -> Vec<String> {
        self.repo(workdir)
            .and_then(|r| r.view.read().ok().map(|v| v.recent(limit)))
            .unwrap_or_default()
    }

    /// Text files the prompt points at, best first (context selection, ARCHITECTURE.md "Data flow: one `ask`"); see
    /// `View::related`. Empty when `workdir` is not watched.
    pub(crate) fn related(&self, workdir: &Path, prompt: &str, limit: usize) -> Vec<String> {
        self.repo(workdir)
            .and_then(|r| r.view.read().ok().map(|v| v.related(prompt, limit)))
            .unwrap_or_default()
    }

    fn repo(&self, workdir: &Path) -> Option<Arc<Repo>> {
        self.hub.repos.lock().ok()?.get(workdir).cloned()
    }

    fn forget(&self, workdir: &Path, repo: &Arc<Repo>) {
        if let Ok(mut m) = self.hub.repos.lock()
            && m.get(workdir).is_some_and(|r| Arc::ptr_eq(r, repo))
        {
            m.remove(workdir);
        }
    }

    /// The running repository for `workdir`, started if needed.
    async fn start(&self, workdir: &Path) -> Result<Arc<Repo>, WatchError> {
        if let Some(r) = self.repo(workdir) {
            return Ok(r);
        }
        let stopped = || WatchError::Stopped {
            path: workdir.display().to_string(),
        };
        if self.hub.shutdown.is_cancelled() {
            return Err(stopped());
        }
        let mut slot = self.hub.cache.subscribe();
        let cache = match slot
            .wait_for(|s| !matches!(s, CacheSlot::Opening))
            .await
            .map_err(|_| stopped())?
            .clone()
        {
            CacheSlot::Open(c) => Some(c),
            CacheSlot::Opening | CacheSlot::Unavailable(_) => None,
        };
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let repo = Arc::new(Repo::new(
            workdir,
            cache,
            self.hub.shutdown.child_token(),
            tx.clone(),
        ));
        {
            let mut map = self.hub.repos.lock().map_err(|_| stopped())?;
            if let Some(r) = map.get(workdir) {
                return Ok(r.clone());
            }
            map.insert(workdir.to_owned(), repo.clone());
        }
        let sink = Sink {
            tx,
            overflow: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(Notify::new()),
        };
        self.hub
            .tracker
            .spawn(run_repo(self.hub.clone(), repo.clone(), sink, rx));
        Ok(repo)
    }

    async fn persisted_snapshot(&self) -> Vec<PathBuf> {
        let mut guard = self.hub.persisted.lock().await;
        self.load_persisted(&mut guard)
            .await
            .iter()
            .cloned()
            .collect()
    }

    async fn load_persisted<'a>(
        &self,
        guard: &'a mut Option<BTreeSet<PathBuf>>,
    ) -> &'a mut BTreeSet<PathBuf> {
        if guard.is_none() {
            let dir = self.hub.state_dir.clone();
            let loaded = tokio::task::spawn_blocking(move || persist::load(&dir))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let set = match loaded {
                Ok(list) => list.into_iter().collect(),
                Err(e) => {
                    warn!(error = %e, dir = %self.hub.state_dir.display(), "cannot read the list of watched repositories; starting a new one");
                    BTreeSet::new()
                }
            };
            *guard = Some(set);
        }
        guard.get_or_insert_with(BTreeSet::new)
    }

    /// Apply `change` to the persisted list and save it if it changed; returns what `change` did.
    async fn update_persisted(
        &self,
        change: impl FnOnce(&mut BTreeSet<PathBuf>) -> bool,
    ) -> Result<bool, WatchError> {
        let mut guard = self.hub.persisted.lock().await;
        let set = self.load_persisted(&mut guard).await;
        if !change(set) {
            return Ok(false);
        }
        let list: Vec<PathBuf> = set.iter().cloned().collect();
        let dir = self.hub.state_dir.clone();
        let path = || dir.join(persist::FILE_NAME).display().to_string();
        let d = dir.clone();
        tokio::task::spawn_blocking(move || persist::save(&d, &list))
            .await
            .map_err(|e| WatchError::Persist {
                path: path(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| WatchError::Persist {
                path: path(),
                source,
            })?;
        Ok(true)
    }
}

/// What [`index_once`] measured.
#[derive(Debug, Clone)]
pub(crate) struct IndexStats {
    pub(crate) files: usize,
    pub(crate) text_files: u64,
    pub(crate) watches: usize,
    /// Until the index was complete and served (the daemon's "indexed").
    pub(crate) elapsed: Duration,
    /// sled's flush to disk afterwards, which the daemon does in the background.
    pub(crate) flush: Duration,
}

/// Build one repository's first index exactly as `watch` does (walk, watches, reads, sled
/// writes), synchronously, and measure it: the cold-index benchmark's entry point (through
/// `sparkd::bench`). With `cache_dir`, a second call measures a warm start.
pub(crate) fn index_once(workdir: &Path, cache_dir: Option<&Path>) -> Result<IndexStats, String> {
    let workdir = workdir.canonicalize().map_err(|e| e.to_string())?;
    let cache = match cache_dir {
        None => None,
        Some(dir) => {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match Cache::open(dir) {
                    Ok(c) => break Some(c),
                    // A previous call's sled lets go of its lock a moment after the drop.
                    Err(crate::watch::cache::CacheError::Locked { .. })
                        if attempt < CACHE_LOCK_ATTEMPTS =>
                    {
                        std::thread::sleep(CACHE_LOCK_RETRY)
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
    };
    let (tx, _rx) = mpsc::channel(EVENT_QUEUE);
    let repo = Repo::new(
        &workdir,
        cache.clone(),
        CancellationToken::new(),
        tx.clone(),
    );
    let budget = Arc::new(Budget {
        used: AtomicUsize::new(0),
        max: usize::MAX,
    });
    let started = std::time::Instant::now();
    let mut tree = Tree::new(&repo.workdir, &repo.git, budget);
    let sink = Sink {
        tx,
        overflow: Arc::new(AtomicBool::new(false)),
        wake: Arc::new(Notify::new()),
    };
    repo.initial_index(&mut tree, sink)?;
    let elapsed = started.elapsed();
    // Made durable as the daemon's background flush would, but measured apart: the daemon
    // never waits for it.
    let flushed = std::time::Instant::now();
    if let Some(c) = &cache {
        c.flush();
    }
    let flush = flushed.elapsed();
    let status = repo.status();
    Ok(IndexStats {
        files: status.files as usize,
        text_files: status.text_files,
        watches: tree.watches(),
        elapsed,
        flush,
    })
}

/// Open the cache off the async threads; retry briefly if a previous daemon still holds it.
async fn open_cache(hub: Arc<Hub>) {
    let mut attempt = 0;
    let slot = loop {
        attempt += 1;
        let dir = hub.cache_dir.clone();
        let opened = tokio::task::spawn_blocking(move || Cache::open(&dir)).await;
        match opened {
            Ok(Ok(cache)) => break CacheSlot::Open(cache),
            Ok(Err(e @ crate::watch::cache::CacheError::Locked { .. }))
                if attempt < CACHE_LOCK_ATTEMPTS =>
            {
                debug!(error = %e, attempt, "context cache busy; retrying");
                tokio::select! {
                    () = hub.shutdown.cancelled() => break CacheSlot::Unavailable(e.to_string()),
                    () = tokio::time::sleep(CACHE_LOCK_RETRY) => {}
                }
            }
            Ok(Err(e)) => {
                warn!(error = %e, "running without a context cache");
                break CacheSlot::Unavailable(e.to_string());
            }
            Err(e) => {
                warn!(error = %e, "running without a context cache");
                break CacheSlot::Unavailable(format!("opening the cache failed: {e}"));
            }
        }
    };
    let cache = match &slot {
        CacheSlot::Open(c) => Some(c.clone()),
        _ => None,
    };
    hub.cache.send_replace(slot);
    // Flush once at shutdown, after the repositories' last batches.
    if let Some(cache) = cache {
        hub.shutdown.cancelled().await;
        let _ = tokio::task::spawn_blocking(move || cache.flush()).await;
    }
}
