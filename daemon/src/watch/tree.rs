//! One repository's directory tree as its watcher keeps it: which directories are indexed and
//! watched, their `.gitignore` rules, and the rescans that keep both in step with the disk.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use notify::Watcher as _;
use tokio::time::Instant;
use tracing::warn;

use super::Budget;
use super::scan::{DirRules, GitPaths, Rules, join_rel, list_dir};
use crate::watch::cache::Stat;

pub(super) fn parent_of(rel: &str) -> &str {
    rel.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

pub(super) fn name_of(rel: &str) -> &str {
    rel.rsplit_once('/').map(|(_, n)| n).unwrap_or(rel)
}

/// What the user can do about a refused watch, as a `hint:` sentence (empty when nothing
/// applies). The limits are per user and shared with editors and other tools.
fn watch_hint(why: &str) -> &'static str {
    if why.contains("max_user_watches") {
        "\nhint: raise the limit, e.g. `sudo sysctl fs.inotify.max_user_watches=524288` (add it to /etc/sysctl.d/ to keep it); missing watches are retried at each rescan"
    } else if why.contains("Too many open files") || why.contains("os error 24") {
        "\nhint: the inotify instance limit is reached; raise it, e.g. `sudo sysctl fs.inotify.max_user_instances=1024`, or close other watching tools, then restart sparkd"
    } else if why.contains("watch budget") {
        "\nhint: unwatch repositories you do not need (`sparkctl unwatch`)"
    } else {
        ""
    }
}

/// A directory the index descends into.
#[derive(Debug)]
pub(super) struct DirState {
    pub(super) ino: u64,
    pub(super) rules: DirRules,
    pub(super) files: BTreeSet<String>,
    pub(super) dirs: BTreeSet<String>,
}

/// Why a watch could not be added.
pub(super) enum WatchFail {
    /// The directory vanished meanwhile: not a problem, its parent's rescan will see it.
    Gone,
    Failed(String),
}

/// What a rescan found for one path, before the file is read.
#[derive(Debug, Clone, Copy)]
pub(super) enum Found {
    Present(Stat),
    Absent,
}

/// The task-owned half of a repository: its directories, their ignore rules and the watcher.
pub(super) struct Tree {
    pub(super) workdir: PathBuf,
    pub(super) dirs: BTreeMap<String, DirState>,
    pub(super) rules: Rules,
    pub(super) watcher: Option<notify::RecommendedWatcher>,
    /// Why there is no watcher at all.
    pub(super) watcher_error: Option<String>,
    /// Directory watches held (directories of the tree plus git's).
    pub(super) watched: usize,
    /// Directories that could not be watched, and the last reason.
    pub(super) unwatched: BTreeSet<String>,
    pub(super) unwatched_why: Option<String>,
    pub(super) budget: Arc<Budget>,
    pub(super) root_gone: bool,
    /// The cache generation the saved snapshot belongs to (`None`: none saved yet).
    pub(super) cache_generation: Option<u64>,
    /// The view changed since the snapshot was saved, and when that was.
    pub(super) snapshot_dirty: bool,
    pub(super) last_snapshot: Option<Instant>,
    pub(super) last_measure: Option<Instant>,
}

impl Drop for Tree {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.watched, Ordering::AcqRel);
    }
}

impl Tree {
    pub(super) fn new(workdir: &Path, git: &GitPaths, budget: Arc<Budget>) -> Tree {
        Tree {
            workdir: workdir.to_owned(),
            dirs: BTreeMap::new(),
            rules: Rules::load(workdir, git),
            watcher: None,
            watcher_error: None,
            watched: 0,
            unwatched: BTreeSet::new(),
            unwatched_why: None,
            budget,
            root_gone: false,
            cache_generation: None,
            snapshot_dirty: false,
            last_snapshot: None,
            last_measure: None,
        }
    }

    pub(super) fn watches(&self) -> usize {
        self.watched
    }

    pub(super) fn degraded(&self) -> Option<String> {
        if self.root_gone {
            return Some("the worktree no longer exists".to_owned());
        }
        if let Some(e) = &self.watcher_error {
            return Some(format!(
                "cannot start the file watcher ({e}); changes are seen only by periodic rescans{}",
                watch_hint(e)
            ));
        }
        if !self.unwatched.is_empty() {
            let why = self.unwatched_why.as_deref().unwrap_or("unknown reason");
            let n = self.unwatched.len();
            return Some(format!(
                "{n} director{} could not be watched ({why}); changes there are seen only by periodic rescans{}",
                if n == 1 { "y" } else { "ies" },
                watch_hint(why)
            ));
        }
        None
    }

    /// The `.gitignore` matchers of `d`'s ancestors, nearest first.
    pub(super) fn chain(&self, d: &str) -> Vec<Arc<ignore::gitignore::Gitignore>> {
        let mut out = Vec::new();
        let mut cur = d;
        while !cur.is_empty() {
            cur = parent_of(cur);
            if let Some(r) = self.dirs.get(cur).and_then(|s| s.rules.clone()) {
                out.push(r);
            }
        }
        out
    }

    pub(super) fn add_watch(&mut self, abs: &Path) -> Result<(), WatchFail> {
        let Some(watcher) = self.watcher.as_mut() else {
            return Err(WatchFail::Failed("no watcher".to_owned()));
        };
        let used = self.budget.used.fetch_add(1, Ordering::AcqRel);
        if used >= self.budget.max {
            self.budget.used.fetch_sub(1, Ordering::AcqRel);
            return Err(WatchFail::Failed(format!(
                "spark's watch budget of {} is used up",
                self.budget.max
            )));
        }
        let added = match self.budget.kernel_limit {
            // The test hook stands in for the kernel: the same error notify makes of ENOSPC.
            Some(limit) if used >= limit => {
                Err(notify::Error::new(notify::ErrorKind::MaxFilesWatch))
            }
            _ => watcher.watch(abs, notify::RecursiveMode::NonRecursive),
        };
        match added {
            Ok(()) => {
                self.watched += 1;
                Ok(())
            }
            Err(e) => {
                self.budget.used.fetch_sub(1, Ordering::AcqRel);
                match e.kind {
                    notify::ErrorKind::PathNotFound => Err(WatchFail::Gone),
                    notify::ErrorKind::Io(ref io) if io.kind() == std::io::ErrorKind::NotFound => {
                        Err(WatchFail::Gone)
                    }
                    notify::ErrorKind::MaxFilesWatch => Err(WatchFail::Failed(
                        "the inotify watch limit fs.inotify.max_user_watches is reached".to_owned(),
                    )),
                    _ => Err(WatchFail::Failed(e.to_string())),
                }
            }
        }
    }

    /// Watch directory `d` of the tree; remember a failure (degraded) instead of hiding it.
    /// Returns false only if the directory is gone.
    pub(super) fn watch_dir(&mut self, d: &str) -> bool {
        if self.watcher.is_none() {
            // Already degraded as a whole (`watcher_error`); nothing to track per directory.
            return true;
        }
        let abs = self.workdir.join(d);
        match self.add_watch(&abs) {
            Ok(()) => {
                self.unwatched.remove(d);
                true
            }
            Err(WatchFail::Gone) => false,
            Err(WatchFail::Failed(why)) => {
                if self.unwatched.insert(d.to_owned()) {
                    warn!(dir = %abs.display(), why, "cannot watch a directory; will rescan periodically");
                }
                self.unwatched_why = Some(why);
                true
            }
        }
    }

    pub(super) fn unwatch_dir(&mut self, d: &str) {
        if self.unwatched.remove(d) || self.watcher.is_none() {
            return;
        }
        if let Some(w) = self.watcher.as_mut() {
            // notify already forgot a deleted directory's watch: WatchNotFound is fine.
            let _ = w.unwatch(&self.workdir.join(d));
        }
        self.watched = self.watched.saturating_sub(1);
        self.budget.used.fetch_sub(1, Ordering::AcqRel);
    }

    /// Drop `r` and everything under it: unwatch, and mark its files absent.
    pub(super) fn remove_subtree(&mut self, r: &str, found: &mut BTreeMap<String, Found>) {
        let doomed: Vec<String> = if r.is_empty() {
            self.dirs.keys().cloned().collect()
        } else {
            let prefix = format!("{r}/");
            std::iter::once(r.to_owned())
                .filter(|d| self.dirs.contains_key(d))
                .chain(
                    self.dirs
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                        .map(|(k, _)| k.clone()),
                )
                .collect()
        };
        for d in doomed {
            if let Some(state) = self.dirs.remove(&d) {
                self.unwatch_dir(&d);
                for f in state.files {
                    found.insert(join_rel(&d, &f), Found::Absent);
                }
            }
        }
        if !r.is_empty()
            && let Some(p) = self.dirs.get_mut(parent_of(r))
        {
            p.dirs.remove(name_of(r));
        }
    }

    /// Watch, then list, each new directory and its new subdirectories, breadth first.
    pub(super) fn add_new(&mut self, new: Vec<String>, found: &mut BTreeMap<String, Found>) {
        let mut queue: VecDeque<String> = new.into();
        while let Some(d) = queue.pop_front() {
            if self.dirs.contains_key(&d)
                || (!d.is_empty() && !self.dirs.contains_key(parent_of(&d)))
            {
                continue;
            }
            // Watch before listing: whatever appears after this moment produces an event.
            if !self.watch_dir(&d) {
                continue;
            }
            let chain = self.chain(&d);
            let listing = list_dir(&self.workdir, &d, &chain, &self.rules);
            if !listing.exists {
                self.unwatch_dir(&d);
                continue;
            }
            for (name, stat) in &listing.files {
                found.insert(join_rel(&d, name), Found::Present(*stat));
            }
            for (name, _) in &listing.dirs {
                queue.push_back(join_rel(&d, name));
            }
            if !d.is_empty()
                && let Some(p) = self.dirs.get_mut(parent_of(&d))
            {
                p.dirs.insert(name_of(&d).to_owned());
            }
            self.dirs.insert(
                d,
                DirState {
                    ino: listing.ino,
                    rules: listing.rules,
                    files: listing.files.into_iter().map(|(n, _)| n).collect(),
                    dirs: BTreeSet::new(),
                },
            );
        }
    }

    /// Re-list known directories (`recursive`: with everything under them), then apply what
    /// changed: removed directories are unwatched before new ones are watched, because inotify
    /// hands a renamed directory's inode the same watch and removing the old name afterwards
    /// would silence the new one.
    pub(super) fn rescan(
        &mut self,
        targets: Vec<(String, bool)>,
        found: &mut BTreeMap<String, Found>,
    ) {
        let mut removed: Vec<String> = Vec::new();
        let mut new: Vec<String> = Vec::new();
        let mut queue: VecDeque<(String, bool)> = targets.into();
        while let Some((d, recursive)) = queue.pop_front() {
            let Some(ino) = self.dirs.get(&d).map(|s| s.ino) else {
                continue;
            };
            // A degraded repository retries its missing watches on every pass.
            if self.unwatched.contains(&d) {
                self.watch_dir(&d);
            }
            let chain = self.chain(&d);
            let listing = list_dir(&self.workdir, &d, &chain, &self.rules);
            if !listing.exists || listing.ino != ino {
                removed.push(d.clone());
                if listing.exists {
                    new.push(d);
                }
                continue;
            }
            let names: BTreeSet<String> = listing.files.iter().map(|(n, _)| n.clone()).collect();
            let child_dirs: BTreeSet<&str> = listing.dirs.iter().map(|(n, _)| n.as_str()).collect();
            let Some(state) = self.dirs.get_mut(&d) else {
                continue;
            };
            for gone in state.files.difference(&names) {
                found.insert(join_rel(&d, gone), Found::Absent);
            }
            for (name, stat) in &listing.files {
                found.insert(join_rel(&d, name), Found::Present(*stat));
            }
            state.files = names;
            state.rules = listing.rules;
            for gone in state
                .dirs
                .iter()
                .filter(|n| !child_dirs.contains(n.as_str()))
            {
                removed.push(join_rel(&d, gone));
            }
            for (name, ino) in &listing.dirs {
                let c = join_rel(&d, name);
                match self.dirs.get(&c).map(|s| s.ino) {
                    Some(known) if known == *ino => {
                        if recursive {
                            queue.push_back((c, true));
                        }
                    }
                    Some(_) => {
                        removed.push(c.clone());
                        new.push(c);
                    }
                    None => new.push(c),
                }
            }
        }
        for r in &removed {
            self.remove_subtree(r, found);
        }
        self.add_new(new, found);
        self.root_gone = !self.dirs.contains_key("");
    }
}
