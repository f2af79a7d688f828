//! A watched repository at work: the state readers share ([`Repo`]), notify's side of the
//! queue ([`Sink`]), and the task that turns events into batches and batches into an updated
//! view, cache and `FilesChanged` events ([`run_repo`]).

use crate::clock::unix_ms;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use spark_proto::events::Event;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::debounce::{Batch, Debounce, Poll, Rescan};
use super::index::{Entry, View};
use super::scan::{GitPaths, Read, Rules, read_file};
use super::tree::{Found, Tree, name_of, parent_of};
use super::{
    CachedFile, Hub, MEASURE_EVERY, OWN_WRITE_TTL, PARALLEL_READ_MIN, READ_THREADS,
    RepoWatchStatus, SNAPSHOT_EVERY, SYMBOLS_MAX_FILES,
};
use crate::watch::cache::{BlobId, Cache, FileMeta, Kind, Stat};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Progress {
    Indexing,
    Indexed(u64),
    Failed(String),
    Stopped,
}

#[derive(Debug, Default)]
pub(super) struct Health {
    pub(super) watches: usize,
    pub(super) degraded: Option<String>,
    pub(super) last_event_at: Option<u64>,
    pub(super) indexed_at: Option<u64>,
    pub(super) index_ms: Option<u64>,
    pub(super) rescans: u64,
    pub(super) last_rescan: Option<String>,
    /// The cache generation this repository's snapshot was last saved in: behind the cache's
    /// own after a rebuild, until the snapshot is written again.
    pub(super) snapshot_generation: Option<u64>,
    /// The view's counts as of the last batch, so `status` never waits for the view's lock
    /// (held for a while when a batch of 300k files is applied) nor walks every file.
    pub(super) files: u64,
    pub(super) text_files: u64,
    pub(super) text_bytes: u64,
    pub(super) seq: u64,
}

#[derive(Debug)]
pub(super) struct OwnWrite {
    pub(super) blob: Option<BlobId>,
    pub(super) at: std::time::Instant,
}

/// A watched repository: what readers see and what the API updates. Its directory tree and
/// notify watcher belong to its task ([`Tree`]).
#[derive(Debug)]
pub(super) struct Repo {
    pub(super) workdir: PathBuf,
    /// The `repo` of `FilesChanged` events: the same spelling as `EditApplied`'s.
    pub(super) label: String,
    pub(super) git: GitPaths,
    pub(super) cache: Option<Cache>,
    pub(super) view: RwLock<View>,
    pub(super) own: Mutex<HashMap<String, OwnWrite>>,
    pub(super) progress: watch::Sender<Progress>,
    pub(super) health: Mutex<Health>,
    pub(super) stop: CancellationToken,
    /// The daemon's own way into the event queue (explicit refresh requests).
    pub(super) inject: mpsc::Sender<Msg>,
}

/// notify's side of the queue. Its callback runs on notify's thread and must never block.
pub(super) struct Sink {
    pub(super) tx: mpsc::Sender<Msg>,
    pub(super) overflow: Arc<AtomicBool>,
    pub(super) wake: Arc<Notify>,
}

#[derive(Debug)]
pub(super) enum Msg {
    Paths(Vec<PathBuf>),
    Rescan(Rescan),
}

impl notify::EventHandler for Sink {
    fn handle_event(&mut self, event: notify::Result<notify::Event>) {
        let msg = match event {
            // Opens and reads are not changes; CLOSE_WRITE follows a MODIFY we already get.
            Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_)) => return,
            Ok(ev) if ev.need_rescan() => Msg::Rescan(Rescan::Overflow),
            Ok(ev) => Msg::Paths(ev.paths),
            Err(e) => Msg::Rescan(Rescan::Watcher(e.to_string())),
        };
        if self.tx.try_send(msg).is_err() {
            self.overflow.store(true, Ordering::Release);
            self.wake.notify_one();
        }
    }
}

impl Repo {
    pub(super) fn new(
        workdir: &Path,
        cache: Option<Cache>,
        stop: CancellationToken,
        inject: mpsc::Sender<Msg>,
    ) -> Repo {
        Repo {
            workdir: workdir.to_owned(),
            label: workdir.display().to_string(),
            git: GitPaths::of(workdir),
            cache,
            view: RwLock::new(View::default()),
            own: Mutex::new(HashMap::new()),
            progress: watch::Sender::new(Progress::Indexing),
            health: Mutex::new(Health::default()),
            stop,
            inject,
        }
    }

    pub(super) fn is_indexed(&self) -> bool {
        matches!(*self.progress.borrow(), Progress::Indexed(_))
    }

    pub(super) fn status(&self) -> RepoWatchStatus {
        let h = self.health.lock().ok();
        let h = h.as_deref();
        RepoWatchStatus {
            workdir: self.workdir.clone(),
            indexed: self.is_indexed(),
            files: h.map(|h| h.files).unwrap_or(0),
            text_files: h.map(|h| h.text_files).unwrap_or(0),
            text_bytes: h.map(|h| h.text_bytes).unwrap_or(0),
            watches: h.map(|h| h.watches as u64).unwrap_or(0),
            last_event_at: h.and_then(|h| h.last_event_at),
            indexed_at: h.and_then(|h| h.indexed_at),
            index_ms: h.and_then(|h| h.index_ms),
            degraded: h.and_then(|h| h.degraded.clone()),
            rescans: h.map(|h| h.rescans).unwrap_or(0),
            last_rescan: h.and_then(|h| h.last_rescan.clone()),
            seq: h.map(|h| h.seq).unwrap_or(0),
        }
    }

    /// Whether the repository's snapshot is not (yet) in the cache's current generation.
    pub(super) fn snapshot_behind(&self, generation: u64) -> bool {
        self.health
            .lock()
            .map(|h| h.snapshot_generation != Some(generation))
            .unwrap_or(false)
    }

    pub(super) fn file(&self, rel: &str) -> Option<CachedFile> {
        let meta = self.view.read().ok()?.files.get(rel)?.meta.clone();
        let Kind::Text(blob) = meta.kind else {
            return None;
        };
        let abs = self.workdir.join(rel);
        let now = std::fs::symlink_metadata(&abs).ok()?;
        if !now.is_file() {
            return None;
        }
        if Stat::of(&now) == meta.stat
            && let Some(cache) = &self.cache
            && let Some(bytes) = cache.content(&self.workdir, rel, blob)
        {
            // What goes to the model must be the file's bytes: a cache overwritten under sled
            // can hand back anything, so the stored bytes are checked against their own id.
            if bytes.len() as u64 == meta.stat.size && BlobId::of(&bytes) == blob {
                return Some(CachedFile { bytes, blob });
            }
            cache.discard("a stored file did not match its blob id");
        }
        // Changed since indexed, or not in sled (no cache, or rebuilt): read it, with the same
        // checks as the index applies. The watcher will index the new version itself.
        let mut bytes = Vec::new();
        match read_file(&abs, rel, &mut bytes, false) {
            Read::File(fresh) => {
                let fresh_blob = fresh.blob()?;
                if fresh_blob == blob
                    && let Some(c) = &self.cache
                {
                    c.put_content(&self.workdir, rel, blob, &bytes);
                }
                Some(CachedFile {
                    bytes,
                    blob: fresh_blob,
                })
            }
            Read::Skip => None,
        }
    }

    pub(super) fn set_health(&self, f: impl FnOnce(&mut Health)) {
        if let Ok(mut h) = self.health.lock() {
            f(&mut h);
        }
    }
}

/// One repository's whole life: index, then turn events into batches until stopped.
pub(super) async fn run_repo(
    hub: Arc<Hub>,
    repo: Arc<Repo>,
    sink: Sink,
    mut rx: mpsc::Receiver<Msg>,
) {
    let overflow = sink.overflow.clone();
    let wake = sink.wake.clone();
    let started = Instant::now();
    let r = repo.clone();
    let budget = hub.budget.clone();
    let indexed = tokio::task::spawn_blocking(move || {
        let mut tree = Tree::new(&r.workdir, &r.git, budget);
        r.initial_index(&mut tree, sink).map(|()| tree)
    })
    .await;
    let mut tree = match indexed {
        Ok(Ok(tree)) => tree,
        Ok(Err(why)) => {
            repo.progress.send_replace(Progress::Failed(why));
            return;
        }
        Err(e) => {
            repo.progress
                .send_replace(Progress::Failed(format!("the indexer failed: {e}")));
            return;
        }
    };
    let took = started.elapsed();
    repo.set_health(|h| {
        h.indexed_at = Some(unix_ms());
        h.index_ms = Some(u64::try_from(took.as_millis()).unwrap_or(u64::MAX));
    });
    let seq = repo.view.read().map(|v| v.seq).unwrap_or(0);
    repo.progress.send_replace(Progress::Indexed(seq));
    info!(repo = %repo.label, files = repo.status().files, watches = tree.watches(), ms = took.as_millis() as u64, "indexed");

    let mut debounce = Debounce::new(hub.options.timing);
    let mut degraded_tick = tokio::time::interval(hub.options.degraded_rescan);
    degraded_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    degraded_tick.reset();
    // A rebuilt cache is empty: write this repository's snapshot into it at once rather than
    // at the next change, so a restart after the rebuild is warm again.
    let mut generations = repo.cache.as_ref().map(|c| c.subscribe());
    if let Some(g) = generations.as_mut() {
        g.mark_unchanged();
    }
    loop {
        let due = match debounce.poll(Instant::now(), || repo.git.lock.exists()) {
            Poll::Ready(batch) => {
                let r = repo.clone();
                let events = hub.events.clone();
                let done = tokio::task::spawn_blocking(move || {
                    let settled = r.process(&mut tree, batch, &events);
                    (tree, settled)
                })
                .await;
                match done {
                    Ok((t, settled)) => {
                        tree = t;
                        if let (false, Some(tx)) = (settled.is_empty(), hub.settled.get()) {
                            let batch = crate::history::Settled {
                                workdir: repo.workdir.clone(),
                                paths: settled,
                            };
                            // Waits when history is behind, rather than losing a batch.
                            let _ = tx.send(batch).await;
                        }
                    }
                    Err(e) => {
                        warn!(repo = %repo.label, error = %e, "the watcher failed; no longer watching");
                        repo.progress
                            .send_replace(Progress::Failed(format!("the watcher failed: {e}")));
                        return;
                    }
                }
                continue;
            }
            Poll::Wait(at) => Some(at),
            Poll::Idle => None,
        };
        let degraded = tree.degraded().is_some();
        tokio::select! {
            biased;
            () = repo.stop.cancelled() => break,
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let now = Instant::now();
                repo.set_health(|h| h.last_event_at = Some(unix_ms()));
                let mut next = Some(msg);
                // Drain what is queued so one wake-up handles a whole burst.
                while let Some(m) = next {
                    match m {
                        Msg::Paths(p) => debounce.push_paths(now, p),
                        Msg::Rescan(why) => debounce.push_rescan(now, why),
                    }
                    next = rx.try_recv().ok();
                }
                if overflow.swap(false, Ordering::AcqRel) {
                    debounce.push_rescan(now, Rescan::Overflow);
                }
            }
            () = wake.notified() => {
                if overflow.swap(false, Ordering::AcqRel) {
                    debounce.push_rescan(Instant::now(), Rescan::Overflow);
                }
            }
            () = sleep_until(due), if due.is_some() => {}
            _ = degraded_tick.tick(), if degraded => {
                debounce.push_rescan(Instant::now(), Rescan::Degraded);
            }
            changed = generation_changed(generations.as_mut()), if generations.is_some() => {
                if changed.is_err() {
                    generations = None;
                    continue;
                }
                let r = repo.clone();
                match tokio::task::spawn_blocking(move || {
                    r.save_snapshot(&mut tree, true);
                    tree
                })
                .await
                {
                    Ok(t) => tree = t,
                    Err(e) => {
                        warn!(repo = %repo.label, error = %e, "the watcher failed; no longer watching");
                        repo.progress
                            .send_replace(Progress::Failed(format!("the watcher failed: {e}")));
                        return;
                    }
                }
                info!(repo = %repo.label, "snapshot written to the rebuilt context cache");
            }
        }
    }
    // Save what the last batches changed; dropping the tree drops the notify watcher and
    // returns its watches to the budget.
    let r = repo.clone();
    let _ = tokio::task::spawn_blocking(move || {
        r.save_snapshot(&mut tree, true);
        drop(tree);
    })
    .await;
    repo.progress.send_replace(Progress::Stopped);
}

async fn generation_changed(
    rx: Option<&mut watch::Receiver<u64>>,
) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// A change to apply to the view and the cache.
/// The previous entries are boxed: a first index holds one change per file (300,000 at once
/// in a large repository), and most have none.
pub(super) enum Change {
    /// New or changed; its text (if any) is already in sled.
    Upsert {
        meta: FileMeta,
        old: Option<Box<Entry>>,
    },
    /// Same content, new stat (a `touch`, or a rewrite with identical bytes).
    Restat {
        meta: FileMeta,
        old: Box<Entry>,
    },
    Delete {
        old: Box<Entry>,
    },
}

impl Repo {
    /// Build the first index: load what the cache remembers, start the watcher, walk the tree
    /// (reading only files whose `lstat` differs from the cached one).
    pub(super) fn initial_index(&self, tree: &mut Tree, sink: Sink) -> Result<(), String> {
        if !self.workdir.is_dir() {
            return Err(format!("{} is not a directory", self.workdir.display()));
        }
        if let Some(cache) = &self.cache {
            cache.check();
            let generation = cache.generation();
            if let Some(rows) = cache.load_snapshot(&self.workdir)
                && let Ok(mut view) = self.view.write()
            {
                for (rel, meta) in rows {
                    view.files.insert(rel, Entry { meta, since: 0 });
                }
            }
            // Only if nothing was rebuilt meanwhile do the cached entries match sled.
            if cache.generation() == generation {
                tree.cache_generation = Some(generation);
                self.set_health(|h| h.snapshot_generation = Some(generation));
            }
        }
        match notify::recommended_watcher(sink) {
            Ok(w) => tree.watcher = Some(w),
            Err(e) => {
                warn!(repo = %self.label, error = %e, "cannot start a file watcher; rescanning periodically");
                tree.watcher_error = Some(e.to_string());
            }
        }
        // git's own directory: `index.lock` comes and goes there; `info/` holds `exclude`.
        for dir in [
            Some(self.git.git_dir.clone()),
            self.git.exclude.parent().map(Path::to_path_buf),
        ]
        .into_iter()
        .flatten()
        {
            if dir.is_dir() && tree.watcher.is_some() {
                let _ = tree.add_watch(&dir);
            }
        }
        let mut found = BTreeMap::new();
        tree.add_new(vec![String::new()], &mut found);
        if !tree.dirs.contains_key("") {
            return Err(format!("cannot list {}", self.workdir.display()));
        }
        // Whatever the cache remembered and the walk did not find is gone.
        if let Ok(view) = self.view.read() {
            for rel in view.files.keys() {
                found.entry(rel.clone()).or_insert(Found::Absent);
            }
        }
        let changes = self.resolve(found, false);
        self.commit(tree, changes, true);
        Ok(())
    }

    /// Turn one debounced batch into rescans, and publish what changed. Returns every path
    /// whose content changed or that was deleted (own writes included), for local history.
    pub(super) fn process(
        &self,
        tree: &mut Tree,
        batch: Batch,
        events: &broadcast::Sender<Event>,
    ) -> Vec<String> {
        let mut full = batch.rescan;
        let mut recursive: BTreeSet<String> = BTreeSet::new();
        let mut shallow: BTreeSet<String> = BTreeSet::new();
        for path in &batch.paths {
            if path == &self.git.exclude || Some(path.as_path()) == self.git.exclude.parent() {
                full.get_or_insert(Rescan::Excludes);
                continue;
            }
            // Other git-internal files: `index.lock` already held the batch back.
            if path.starts_with(&self.git.git_dir) {
                continue;
            }
            let Ok(rel) = path.strip_prefix(&self.workdir) else {
                continue;
            };
            let rel = rel.to_string_lossy();
            if rel.is_empty() {
                // The worktree directory itself (deleted, moved, chmod-ed).
                full.get_or_insert(Rescan::Watcher("the worktree itself changed".to_owned()));
                continue;
            }
            let (dir, name) = (parent_of(&rel), name_of(&rel));
            // Re-list the nearest directory the index knows.
            let mut d = dir;
            while !d.is_empty() && !tree.dirs.contains_key(d) {
                d = parent_of(d);
            }
            if name == ".gitignore" && d == dir {
                recursive.insert(d.to_owned());
            } else {
                shallow.insert(d.to_owned());
            }
        }
        let mut found = BTreeMap::new();
        if let Some(why) = full {
            match why {
                Rescan::Overflow | Rescan::Watcher(_) => {
                    warn!(repo = %self.label, %why, "events may have been lost; rescanning the whole tree")
                }
                Rescan::Excludes | Rescan::Degraded | Rescan::Requested => {
                    info!(repo = %self.label, %why, "rescanning the whole tree")
                }
            }
            tree.rules = Rules::load(&self.workdir, &self.git);
            tree.rescan(vec![(String::new(), true)], &mut found);
            self.set_health(|h| {
                h.rescans += 1;
                h.last_rescan = Some(why.to_string());
            });
        } else {
            let covered = |d: &str| {
                recursive
                    .iter()
                    .any(|r| r.is_empty() || d == r || d.starts_with(&format!("{r}/")))
            };
            let mut targets: Vec<(String, bool)> = Vec::new();
            for r in &recursive {
                let inside_another = recursive
                    .iter()
                    .any(|o| o != r && (o.is_empty() || r.starts_with(&format!("{o}/"))));
                if !inside_another {
                    targets.push((r.clone(), true));
                }
            }
            for s in &shallow {
                if !covered(s) {
                    targets.push((s.clone(), false));
                }
            }
            if targets.is_empty() {
                return Vec::new();
            }
            tree.rescan(targets, &mut found);
        }
        let changes = self.resolve(found, true);
        let settled: Vec<String> = changes
            .iter()
            .filter(|(_, c)| !matches!(c, Change::Restat { .. }))
            .map(|(rel, _)| rel.clone())
            .collect();
        let reported = self.commit(tree, changes, false);
        if !reported.is_empty() {
            debug!(repo = %self.label, files = reported.len(), "files changed");
            let _ = events.send(Event::FilesChanged {
                repo: self.label.clone(),
                paths: reported,
            });
        }
        settled
    }

    /// Compare what the scan found with the view; read the files whose stat changed. With
    /// `store_text`, a changed text file's content goes to sled as it is read.
    ///
    /// The first index stores metadata only: a file's content reaches sled when it changes
    /// while watched or when [`Repo::file`] first serves it. Storing all of it up front
    /// doubled a 10k-file cold index (sled wrote ~55 MB as ~160 MB on disk) for bytes the
    /// page cache serves as fast, most of which no request ever shows the model.
    pub(super) fn resolve(
        &self,
        found: BTreeMap<String, Found>,
        store_text: bool,
    ) -> Vec<(String, Change)> {
        let mut out = Vec::new();
        let mut to_read: Vec<(String, Option<Box<Entry>>)> = Vec::new();
        let with_symbols;
        {
            let Ok(view) = self.view.read() else {
                return out;
            };
            let present = found
                .values()
                .filter(|f| matches!(f, Found::Present(_)))
                .count();
            // Symbols only while the outline has room to show them: a large repository's
            // outline lists names only, and its symbols would cost megabytes for nothing.
            with_symbols = view.files.len().max(present) <= SYMBOLS_MAX_FILES;
            for (rel, f) in found {
                let old = view.files.get(&rel).cloned().map(Box::new);
                match (f, old) {
                    (Found::Absent, Some(old)) => out.push((rel, Change::Delete { old })),
                    (Found::Absent, None) => {}
                    (Found::Present(stat), Some(old)) if old.meta.stat == stat => {}
                    (Found::Present(_), old) => to_read.push((rel, old)),
                }
            }
        }
        out.extend(self.read_all(to_read, store_text, with_symbols));
        out
    }

    /// Read and classify `items`, on several threads when there are many. Each part is
    /// consumed by its reader and its result sized up front: a first index of a large
    /// repository holds all of them at once, and that is the daemon's peak memory.
    fn read_all(
        &self,
        mut items: Vec<(String, Option<Box<Entry>>)>,
        store_text: bool,
        with_symbols: bool,
    ) -> Vec<(String, Change)> {
        let read = |items: Vec<(String, Option<Box<Entry>>)>| -> Vec<(String, Change)> {
            let mut buf = Vec::new();
            let mut out = Vec::with_capacity(items.len());
            out.extend(items.into_iter().filter_map(|(rel, old)| {
                let abs = self.workdir.join(&rel);
                let change = match read_file(&abs, &rel, &mut buf, with_symbols) {
                    Read::Skip => Change::Delete { old: old? },
                    Read::File(meta) => match old {
                        Some(old)
                            if old.meta.kind == meta.kind && old.meta.symbols == meta.symbols =>
                        {
                            Change::Restat { meta, old }
                        }
                        old => {
                            if store_text
                                && let (Some(cache), Some(blob)) = (&self.cache, meta.blob())
                            {
                                cache.put_content(&self.workdir, &rel, blob, &buf);
                            }
                            Change::Upsert { meta, old }
                        }
                    },
                };
                Some((rel, change))
            }));
            out
        };
        if items.len() < PARALLEL_READ_MIN {
            return read(items);
        }
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, READ_THREADS);
        let per_thread = items.len().div_ceil(threads);
        let mut parts = Vec::with_capacity(threads);
        while items.len() > per_thread {
            parts.push(items.split_off(items.len() - per_thread));
        }
        parts.push(items);
        parts.reverse();
        let mut out: Vec<(String, Change)> = Vec::new();
        std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| s.spawn(move || read(part)))
                .collect();
            for h in handles {
                // A panicking reader loses only its share; the next rescan reads it again.
                if let Ok(v) = h.join() {
                    if out.is_empty() {
                        out = v;
                    } else {
                        out.extend(v);
                    }
                }
            }
        });
        out
    }

    /// Save the snapshot of every file's metadata to sled when it is due: at once after the
    /// first index or a cache rebuild (or with `now`), otherwise at most every
    /// `SNAPSHOT_EVERY`. A crash loses at most that much, which the next start's `lstat`
    /// comparison catches and re-reads.
    pub(super) fn save_snapshot(&self, tree: &mut Tree, now: bool) {
        let Some(cache) = &self.cache else {
            return;
        };
        let rebuilt = tree.cache_generation != Some(cache.generation());
        let due = tree
            .last_snapshot
            .is_none_or(|t| t.elapsed() >= SNAPSHOT_EVERY);
        if !(rebuilt || (tree.snapshot_dirty && (now || due))) {
            return;
        }
        let generation = cache.generation();
        if let Ok(view) = self.view.read() {
            cache.save_snapshot(
                &self.workdir,
                view.files.iter().map(|(k, e)| (k.as_str(), &e.meta)),
            );
        }
        tree.cache_generation = Some(generation);
        tree.snapshot_dirty = false;
        tree.last_snapshot = Some(Instant::now());
        self.set_health(|h| h.snapshot_generation = Some(generation));
    }

    /// Apply changes to the cache and the view; returns the paths to report (own writes and
    /// the first index are quiet).
    pub(super) fn commit(
        &self,
        tree: &mut Tree,
        changes: Vec<(String, Change)>,
        initial: bool,
    ) -> Vec<String> {
        let own: HashMap<String, OwnWrite> = match self.own.lock() {
            Ok(mut own) => {
                own.retain(|_, w| w.at.elapsed() < OWN_WRITE_TTL);
                std::mem::take(&mut *own)
            }
            Err(_) => HashMap::new(),
        };
        let mut unmatched = own;
        let mut reported = Vec::new();
        let mut deleted = Vec::new();
        let mut outline_dirty = initial;
        for (rel, change) in &changes {
            let new_blob = match change {
                Change::Upsert { meta, .. } => Some(meta.blob()),
                Change::Delete { .. } => Some(None),
                Change::Restat { .. } => None,
            };
            let Some(new_blob) = new_blob else { continue };
            outline_dirty |= match change {
                Change::Upsert { old, meta, .. } => {
                    old.as_ref().is_none_or(|o| o.meta.symbols != meta.symbols)
                }
                _ => true,
            };
            let own_write = unmatched.get(rel).is_some_and(|w| w.blob == new_blob);
            if own_write {
                unmatched.remove(rel);
            } else if !initial {
                reported.push(rel.clone());
                if let Change::Delete { old } = change {
                    deleted.push((rel.clone(), old.since));
                }
            }
        }
        // Expectations not met yet stay for a later batch (until their TTL).
        if let Ok(mut own) = self.own.lock() {
            for (k, v) in unmatched {
                own.entry(k).or_insert(v);
            }
        }
        tree.snapshot_dirty |= !changes.is_empty();
        if let Some(cache) = &self.cache {
            cache.check();
            // Contents no entry will refer to; new contents were stored while reading.
            let stale: Vec<(&str, BlobId)> = changes
                .iter()
                .filter_map(|(rel, change)| {
                    let (old, new) = match change {
                        Change::Upsert { meta, old } => (old.as_ref()?.meta.blob()?, meta.blob()),
                        Change::Delete { old } => (old.meta.blob()?, None),
                        Change::Restat { .. } => return None,
                    };
                    (Some(old) != new).then_some((rel.as_str(), old))
                })
                .collect();
            cache.drop_blobs(&self.workdir, &stale);
        }
        let large = changes.len() >= crate::memory::TRIM_AFTER;
        let seq = if let Ok(mut view) = self.view.write() {
            // Files that appear in this batch are new as of the batch's number.
            let since = if initial || reported.is_empty() {
                view.seq
            } else {
                view.seq + 1
            };
            for (rel, change) in changes {
                match change {
                    Change::Upsert { meta, old, .. } => {
                        let since = old.map(|o| o.since).unwrap_or(since);
                        view.files.insert(rel, Entry { meta, since });
                    }
                    Change::Restat { meta, old } => {
                        view.files.insert(
                            rel,
                            Entry {
                                meta,
                                since: old.since,
                            },
                        );
                    }
                    Change::Delete { .. } => {
                        view.files.remove(&rel);
                    }
                }
            }
            if large {
                view.compact();
            }
            if outline_dirty {
                view.rebuild_outline();
            }
            if !reported.is_empty() {
                view.log_batch(reported.clone(), &deleted);
            }
            let (text_files, text_bytes) = view.text_bytes();
            let (files, seq) = (view.files.len() as u64, view.seq);
            self.set_health(|h| {
                h.files = files;
                h.text_files = text_files;
                h.text_bytes = text_bytes;
                h.seq = seq;
            });
            view.seq
        } else {
            0
        };
        self.save_snapshot(tree, initial);
        if large {
            // The batch's transient paths and the map's old nodes are free now; without this
            // they stay resident (a first index of 300,000 files leaves tens of megabytes).
            crate::memory::release_free_memory();
        }
        if let Some(cache) = &self.cache
            && tree
                .last_measure
                .is_none_or(|t| t.elapsed() >= MEASURE_EVERY)
        {
            cache.measure();
            tree.last_measure = Some(Instant::now());
        }
        let degraded = tree.degraded();
        let watches = tree.watches();
        self.set_health(|h| {
            h.watches = watches;
            h.degraded = degraded;
        });
        if !initial {
            self.progress.send_if_modified(|p| {
                let changed = *p != Progress::Indexed(seq);
                *p = Progress::Indexed(seq);
                changed
            });
        }
        reported
    }
}
