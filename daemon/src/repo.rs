//! Repositories: one actor thread per worktree owns its `git2::Repository` (Send, not Sync, and
//! its objects are !Send), and callers hold a cloneable [`RepoHandle`] that sends it jobs with a
//! oneshot reply. Everything git and filesystem heavy runs there, never on an async worker.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use git2::Repository;
use spark_proto::{ErrorCode, RpcError};
use tokio::sync::oneshot;

use crate::edit::{EditEnv, RepoCtx};

/// Jobs queued per repository before callers get a retryable "overloaded" error.
const REPO_QUEUE: usize = 64;

/// When an idle repository lets go of its parsed git index. libgit2 keeps the index of every
/// `Repository` that looked at it (path checks, attributes and records all do), about 230
/// bytes per tracked file: 70 MB for a 300,000-file repository, kept for as long as the daemon
/// runs. Re-reading it costs tens of milliseconds there, so it stays loaded while requests
/// keep coming and is dropped once the repository has been idle a while.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IndexRelease {
    /// Index files smaller than this (about 20,000 files) stay loaded: cheap to keep.
    pub(crate) min_bytes: u64,
    /// Released after this long without a request.
    pub(crate) idle: Duration,
}

impl Default for IndexRelease {
    fn default() -> Self {
        IndexRelease {
            min_bytes: 2 << 20,
            idle: Duration::from_secs(10),
        }
    }
}

impl IndexRelease {
    /// Whether `repo`'s index file is large enough to release.
    fn applies(&self, repo: &Repository) -> bool {
        std::fs::metadata(repo.path().join("index")).is_ok_and(|m| m.len() >= self.min_bytes)
    }
}

type Job = Box<dyn FnOnce(&RepoCtx<'_>) + Send>;

/// A handle to one repository's actor.
#[derive(Debug, Clone)]
pub(crate) struct RepoHandle {
    tx: mpsc::SyncSender<Job>,
    workdir: Arc<PathBuf>,
    edits: Arc<AtomicU64>,
    /// Times the actor released its git index while idle (read by tests).
    #[cfg_attr(not(test), allow(dead_code))]
    index_releases: Arc<tokio::sync::watch::Sender<u64>>,
}

impl RepoHandle {
    pub(crate) fn workdir(&self) -> &Path {
        &self.workdir
    }

    pub(crate) fn edits(&self) -> u64 {
        self.edits.load(Ordering::Relaxed)
    }

    pub(crate) fn count_edit(&self) {
        self.edits.fetch_add(1, Ordering::Relaxed);
    }

    #[cfg(test)]
    fn index_releases(&self) -> tokio::sync::watch::Receiver<u64> {
        self.index_releases.subscribe()
    }

    /// Run `f` on the repository's thread and wait for its result.
    pub(crate) async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&RepoCtx<'_>) -> R + Send + 'static,
    ) -> Result<R, RpcError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |ctx| {
            let _ = tx.send(f(ctx));
        });
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => RpcError::new(
                ErrorCode::Overloaded,
                "too many requests queued for this repository",
            )
            .with_hint("retry shortly"),
            TrySendError::Disconnected(_) => {
                RpcError::new(ErrorCode::Internal, "the repository actor stopped")
            }
        })?;
        rx.await.map_err(|_| {
            RpcError::new(
                ErrorCode::Internal,
                "the repository actor failed during the request; see the log",
            )
        })
    }
}

/// Every repository the daemon has touched, by canonical worktree path.
#[derive(Debug)]
pub(crate) struct Repos {
    env: EditEnv,
    map: Mutex<HashMap<PathBuf, RepoHandle>>,
    /// Client directory → where discovery found its repository: discovery walks the filesystem,
    /// and the same few directories ask again and again. A nested repository created later under
    /// a cached directory is still safe: the edit engine refuses paths inside nested repositories.
    discovered: Mutex<HashMap<PathBuf, Found>>,
}

impl Repos {
    pub(crate) fn new(env: EditEnv) -> Repos {
        Repos {
            env,
            map: Mutex::new(HashMap::new()),
            discovered: Mutex::new(HashMap::new()),
        }
    }

    /// The repository containing `cwd`, and `cwd` relative to its worktree ("" at the root).
    pub(crate) async fn for_cwd(&self, cwd: &str) -> Result<(RepoHandle, String), RpcError> {
        let cwd = PathBuf::from(cwd);
        if !cwd.is_absolute() {
            return Err(RpcError::new(
                ErrorCode::InvalidParams,
                // Escaped: the client's string may hold a newline or a control character.
                format!(
                    "cwd {} is not an absolute path",
                    cwd.display().to_string().escape_debug()
                ),
            ));
        }
        let cached = self
            .discovered
            .lock()
            .ok()
            .and_then(|m| m.get(&cwd).cloned());
        let found = match cached {
            Some(found) => Ok(found),
            None => self.discover_and_remember(cwd).await,
        }?;
        let Found {
            workdir,
            git_dir,
            prefix,
        } = found;
        if let Some(h) = self.lock()?.get(&workdir) {
            return Ok((h.clone(), prefix));
        }
        let (w, g) = (workdir.clone(), git_dir);
        let repo = tokio::task::spawn_blocking(move || open_worktree(&g, &w))
            .await
            .map_err(|e| {
                RpcError::new(ErrorCode::Internal, format!("repository open failed: {e}"))
            })?
            .map_err(|e| {
                RpcError::new(
                    ErrorCode::NotARepository,
                    format!("cannot open {}: {e}", workdir.display()),
                )
            })?;
        let handle = spawn_actor(
            workdir.clone(),
            repo,
            self.env.clone(),
            IndexRelease::default(),
        )?;
        // Two first requests may race to open it: the first handle in wins, the other's actor exits.
        let handle = self.lock()?.entry(workdir).or_insert(handle).clone();
        Ok((handle, prefix))
    }

    async fn discover_and_remember(&self, cwd: PathBuf) -> Result<Found, RpcError> {
        let key = cwd.clone();
        let found = tokio::task::spawn_blocking(move || discover(&cwd))
            .await
            .map_err(|e| {
                RpcError::new(
                    ErrorCode::Internal,
                    format!("repository discovery failed: {e}"),
                )
            })??;
        if let Ok(mut m) = self.discovered.lock() {
            m.insert(key, found.clone());
        }
        Ok(found)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<PathBuf, RepoHandle>>, RpcError> {
        self.map
            .lock()
            .map_err(|_| RpcError::new(ErrorCode::Internal, "repository table poisoned"))
    }

    pub(crate) fn all(&self) -> Vec<RepoHandle> {
        self.map
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Where discovery found the repository of a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    /// The canonical worktree root: the directory holding the `.git` entry (or `core.worktree`).
    workdir: PathBuf,
    /// The git directory that `.git` names: itself, a `gitdir:` file's target, a symlink's target.
    git_dir: PathBuf,
    /// The directory relative to the worktree ("" at the root), `/`-separated.
    prefix: String,
}

/// Find the repository of `cwd` as git does (`setup_git_directory`): walk up from `cwd`; the
/// first directory holding a `.git` entry is the worktree's top, whatever that entry is (a git
/// directory, a `gitdir:` file as `git init --separate-git-dir`, submodules and linked
/// worktrees write, or a symlink to a git directory), and `.git` names the git directory, which
/// may live anywhere, even inside another repository's worktree. libgit2's own discovery takes
/// the worktree to be the git directory's parent when that is not named `.git`, which picks the
/// wrong tree for such layouts; so the walk is done here and libgit2 only opens what it names.
/// `GIT_DIR` and `GIT_WORK_TREE` are the client's business (docs/protocol.md).
fn discover(cwd: &Path) -> Result<Found, RpcError> {
    let not_repo = |why: String| {
        RpcError::new(ErrorCode::NotARepository, why)
            .with_hint("run it inside a git working tree (`git init` makes one)")
    };
    let canonical = cwd
        .canonicalize()
        .map_err(|e| not_repo(format!("cannot use {}: {e}", cwd.display())))?;
    let device = |dir: &Path| std::fs::metadata(dir).map(|m| m.dev()).ok();
    let start_device = device(&canonical);
    for top in canonical.ancestors() {
        // git stops at a filesystem boundary (without GIT_DISCOVERY_ACROSS_FILESYSTEM): a
        // repository on another mount above is not the one this directory belongs to.
        if device(top) != start_device {
            return Err(not_repo(format!(
                "{} is not inside a git repository (the search stopped at the filesystem boundary below {}, as git's does)",
                cwd.display(),
                top.display()
            )));
        }
        let dotgit = top.join(".git");
        match std::fs::metadata(&dotgit) {
            Ok(meta) if meta.is_file() => {
                // git dies on a broken `gitdir:` file rather than looking further up.
                let git_dir = read_gitfile(&dotgit).map_err(|why| {
                    not_repo(format!(
                        "{} is not a usable git link: {why}",
                        dotgit.display()
                    ))
                })?;
                return found(&canonical, top, &git_dir, &not_repo);
            }
            Ok(meta) if meta.is_dir() && is_git_dir(&dotgit) => {
                return found(&canonical, top, &dotgit, &not_repo);
            }
            // Not a repository (an empty or foreign `.git` directory): git keeps walking up.
            Ok(_) => {}
            Err(_) => {}
        }
        // Inside a worktree's own `.git` the walk goes on to the worktree, as libgit2 does, and
        // every path from there is refused by name (`.git/...`); a bare repository has no tree.
        if top.file_name() != Some(std::ffi::OsStr::new(".git")) && is_git_dir(top) {
            return Err(not_repo(format!(
                "{} is inside a bare repository ({}): it has no working tree to edit",
                cwd.display(),
                top.display()
            )));
        }
    }
    Err(not_repo(format!(
        "{} is not inside a git repository",
        cwd.display()
    )))
}

/// The worktree found at `top` with git directory `git_dir`, and `cwd`'s place in it.
fn found(
    cwd: &Path,
    top: &Path,
    git_dir: &Path,
    not_repo: &dyn Fn(String) -> RpcError,
) -> Result<Found, RpcError> {
    let git_dir = git_dir
        .canonicalize()
        .map_err(|e| not_repo(format!("cannot resolve {}: {e}", git_dir.display())))?;
    let repo = Repository::open_bare(&git_dir).map_err(|e| {
        not_repo(format!(
            "cannot open {}: {}",
            git_dir.display(),
            e.message()
        ))
    })?;
    let config = repo.config().map_err(|e| {
        not_repo(format!(
            "cannot read {}'s config: {}",
            git_dir.display(),
            e.message()
        ))
    })?;
    // A linked worktree shares its main repository's config, whose `core.worktree` (if any)
    // describes the main worktree, not this one.
    let linked = git_dir.join("commondir").is_file();
    let workdir = match config.get_path("core.worktree") {
        // Submodules absorbed into `.git/modules/` name their worktree this way; git honours it
        // for any repository and it is relative to the git directory.
        Ok(worktree) if !linked => git_dir.join(worktree).canonicalize().map_err(|e| {
            not_repo(format!(
                "cannot resolve core.worktree of {}: {e}",
                git_dir.display()
            ))
        })?,
        _ => {
            if !linked && config.get_bool("core.bare").unwrap_or(false) {
                return Err(not_repo(format!(
                    "{} is a bare repository (core.bare): it has no working tree to edit",
                    git_dir.display()
                )));
            }
            top.to_path_buf()
        }
    };
    let prefix = cwd
        .strip_prefix(&workdir)
        .map_err(|_| {
            not_repo(format!(
                "{} is outside the working tree {} of {}",
                cwd.display(),
                workdir.display(),
                git_dir.display()
            ))
        })?
        .to_string_lossy()
        .replace('\\', "/");
    Ok(Found {
        workdir,
        git_dir,
        prefix,
    })
}

/// The target of a `gitdir: <path>` file, relative to the file's directory.
fn read_gitfile(dotgit: &Path) -> Result<PathBuf, String> {
    let text = std::fs::read_to_string(dotgit).map_err(|e| e.to_string())?;
    let target = text
        .strip_prefix("gitdir:")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or("it does not start with `gitdir:`")?;
    let base = dotgit.parent().unwrap_or(Path::new("/"));
    Ok(base.join(target))
}

/// Whether `dir` is a git directory (git's `is_git_directory`: libgit2 opens it as one).
fn is_git_dir(dir: &Path) -> bool {
    Repository::open_bare(dir).is_ok()
}

/// Open the repository `git_dir` with `workdir` as its worktree, whatever libgit2 would infer.
fn open_worktree(git_dir: &Path, workdir: &Path) -> Result<Repository, git2::Error> {
    let repo = Repository::open_bare(git_dir)?;
    repo.set_workdir(workdir, false)?;
    Ok(repo)
}

/// Open the repository whose worktree is `workdir`, found from it as for a client there.
fn open_at(workdir: &Path) -> Result<Repository, String> {
    let found = discover(workdir).map_err(|e| e.message.clone())?;
    if found.workdir != workdir.canonicalize().map_err(|e| e.to_string())? {
        return Err(format!(
            "{} is no longer a worktree root (its repository is now {})",
            workdir.display(),
            found.workdir.display()
        ));
    }
    open_worktree(&found.git_dir, &found.workdir).map_err(|e| e.to_string())
}

fn spawn_actor(
    workdir: PathBuf,
    repo: Repository,
    env: EditEnv,
    release: IndexRelease,
) -> Result<RepoHandle, RpcError> {
    let (tx, rx) = mpsc::sync_channel::<Job>(REPO_QUEUE);
    let name = format!(
        "repo:{}",
        workdir
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    );
    let thread_workdir = workdir.clone();
    let edits = Arc::new(AtomicU64::new(0));
    let thread_edits = edits.clone();
    let index_releases = Arc::new(tokio::sync::watch::Sender::new(0));
    let thread_releases = index_releases.clone();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut repo = repo;
            let tracked = crate::edit::tracked::TrackedCache::default();
            let mut packed_at = 0;
            // A job ran since the index was last released (so libgit2 may hold it again).
            let mut used = false;
            let mut next = None;
            // Exits when every handle is gone (daemon shutdown).
            loop {
                let job = match next.take() {
                    Some(job) => job,
                    None if used && release.applies(&repo) => {
                        match rx.recv_timeout(release.idle) {
                            Ok(job) => job,
                            Err(RecvTimeoutError::Timeout) => {
                                repo = release_index(repo, &thread_workdir);
                                used = false;
                                thread_releases.send_modify(|n| *n += 1);
                                continue;
                            }
                            Err(RecvTimeoutError::Disconnected) => break,
                        }
                    }
                    None => match rx.recv() {
                        Ok(job) => job,
                        Err(_) => break,
                    },
                };
                let ctx = RepoCtx {
                    repo: &repo,
                    workdir: &thread_workdir,
                    env: &env,
                    tracked: &tracked,
                };
                job(&ctx);
                used = true;
                next = match rx.try_recv() {
                    Ok(job) => Some(job),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                };
                // Records are packed now and then, when no request waits behind it.
                let edits = thread_edits.load(Ordering::Relaxed);
                if edits - packed_at >= crate::edit::pack::PACK_EVERY_EDITS && next.is_none() {
                    packed_at = edits;
                    match crate::edit::pack::pack_records(&repo) {
                        Ok(p) => tracing::info!(repo = %thread_workdir.display(), objects = p.objects, "packed the edit records"),
                        Err(e) => tracing::warn!(repo = %thread_workdir.display(), error = %e, "packing the edit records failed"),
                    }
                }
            }
        })
        .map_err(|e| {
            RpcError::new(
                ErrorCode::Internal,
                format!("cannot start repository thread: {e}"),
            )
        })?;
    Ok(RepoHandle {
        tx,
        workdir: Arc::new(workdir),
        edits,
        index_releases,
    })
}

/// `repo` without its cached git index and the memory that held it: git2 has no call to drop
/// just the index, so the repository is opened afresh (a fraction of a millisecond). If that
/// fails (the repository just vanished, say), the old one is kept and the next request reports
/// whatever is wrong.
fn release_index(repo: Repository, workdir: &Path) -> Repository {
    match open_worktree(repo.path(), workdir) {
        Ok(fresh) => {
            drop(repo);
            crate::memory::release_free_memory();
            tracing::debug!(repo = %workdir.display(), "released the idle repository's git index");
            fresh
        }
        Err(e) => {
            tracing::debug!(repo = %workdir.display(), error = %e, "cannot reopen the repository to release its index");
            repo
        }
    }
}

/// Finish or roll back what a previous daemon left half-done. Runs before the socket serves.
pub(crate) fn recover_all(env: &EditEnv) {
    for (path, journal) in crate::edit::journal::pending(&env.journal_dir) {
        let journal = match journal {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(journal = %path.display(), error = %e, "unreadable journal; set aside");
                let _ = std::fs::rename(&path, path.with_extension("journal.bad"));
                continue;
            }
        };
        let outcome = open_at(&journal.workdir).and_then(|repo| {
            let ctx = RepoCtx {
                repo: &repo,
                workdir: &journal.workdir,
                env,
                tracked: &Default::default(),
            };
            crate::edit::recover(&ctx, &journal).map_err(|e| e.to_string())
        });
        match outcome {
            Ok(what) => {
                tracing::info!(journal = %path.display(), repo = %journal.workdir.display(), "interrupted edit {what}");
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => {
                tracing::error!(journal = %path.display(), error = %e, "cannot recover interrupted edit; journal kept")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        (dir, root)
    }

    fn refused(cwd: &Path) -> String {
        match discover(cwd) {
            Ok(found) => panic!("{} was found as {found:?}", cwd.display()),
            Err(e) => {
                assert_eq!(e.error_code(), Some(ErrorCode::NotARepository), "{e:?}");
                e.message
            }
        }
    }

    #[tokio::test]
    async fn an_idle_repository_lets_go_of_its_git_index_and_still_sees_new_staging() {
        let (_d, root) = scratch();
        let stage = |name: &str| {
            std::fs::write(root.join(name), "x\n").expect("write");
            // Another writer (git itself, in real use) updates the index file.
            let repo = Repository::open(&root).expect("open");
            let mut index = repo.index().expect("index");
            index.add_path(Path::new(name)).expect("add");
            index.write().expect("write index");
        };
        Repository::init(&root).expect("init");
        stage("a.txt");
        let env = EditEnv {
            journal_dir: root.join(".git/spark-journal"),
            durability: crate::edit::journal::Durability { fsync: false },
            failpoint: crate::edit::journal::Failpoint(None),
            history: Default::default(),
        };
        let release = IndexRelease {
            min_bytes: 0,
            idle: Duration::from_millis(20),
        };
        let repo = open_worktree(&root.join(".git"), &root).expect("open");
        let handle = spawn_actor(root.clone(), repo, env, release).expect("actor");
        let mut releases = handle.index_releases();
        let tracked = || handle.run(|ctx| ctx.repo.index().expect("index").len());
        let wait_for = |releases: &mut tokio::sync::watch::Receiver<u64>, n: u64| {
            let mut releases = releases.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(30), releases.wait_for(|r| *r >= n))
                    .await
                    .expect("the idle actor never released its index")
                    .map(|r| *r)
                    .expect("actor alive")
            }
        };

        assert_eq!(tracked().await.expect("run"), 1);
        assert_eq!(wait_for(&mut releases, 1).await, 1);
        stage("b.txt");
        // A request after the release reads the index afresh, and uses it again.
        assert_eq!(tracked().await.expect("run"), 2);
        assert_eq!(wait_for(&mut releases, 2).await, 2);
    }

    #[test]
    fn a_relative_gitdir_file_names_a_git_dir_whose_parent_is_not_the_worktree() {
        let (_d, root) = scratch();
        let git_dir = root.join("outer/store/inner.git");
        Repository::init_bare(&git_dir).expect("init");
        let inner = root.join("inner");
        std::fs::create_dir_all(inner.join("src")).expect("mkdir");
        std::fs::write(inner.join(".git"), "gitdir: ../outer/store/inner.git\n").expect("gitfile");
        // A bare init says core.bare; a separate git dir made by `git init` says otherwise.
        Repository::open_bare(&git_dir)
            .and_then(|r| r.config()?.set_bool("core.bare", false))
            .expect("not bare");
        let found = discover(&inner.join("src")).expect("found");
        assert_eq!(
            found,
            Found {
                workdir: inner.clone(),
                git_dir: git_dir.clone(),
                prefix: "src".into(),
            }
        );
        let repo = open_worktree(&found.git_dir, &found.workdir).expect("open");
        assert_eq!(repo.workdir(), Some(inner.join("").as_path()));
    }

    #[test]
    fn core_worktree_names_the_top_and_core_bare_refuses() {
        let (_d, root) = scratch();
        let git_dir = root.join("super/.git/modules/lib");
        let repo = Repository::init_bare(&git_dir).expect("init");
        let lib = root.join("super/lib");
        std::fs::create_dir_all(&lib).expect("mkdir");
        std::fs::write(lib.join(".git"), format!("gitdir: {}\n", git_dir.display()))
            .expect("gitfile");
        assert!(refused(&lib).contains("bare repository"));
        let mut config = repo.config().expect("config");
        config.set_bool("core.bare", false).expect("set");
        config
            .set_str("core.worktree", "../../../lib")
            .expect("set");
        let found = discover(&lib).expect("found");
        assert_eq!((found.workdir, found.prefix), (lib, String::new()));
    }

    #[test]
    fn broken_links_and_bare_repositories_are_refused() {
        let (_d, root) = scratch();
        let w = root.join("w");
        Repository::init(&w).expect("init");
        let found = discover(&w.join(".git/refs")).expect("found");
        assert_eq!(
            found.prefix, ".git/refs",
            "every path from there names .git"
        );
        let bare = root.join("bare.git");
        Repository::init_bare(&bare).expect("init");
        assert!(refused(&bare.join("refs")).contains("inside a bare repository"));

        let broken = root.join("broken");
        std::fs::create_dir_all(&broken).expect("mkdir");
        std::fs::write(broken.join(".git"), "gitdir: nowhere\n").expect("gitfile");
        assert!(refused(&broken).contains("nowhere"));
        std::fs::write(broken.join(".git"), "not a link\n").expect("gitfile");
        assert!(refused(&broken).contains("gitdir:"));

        assert!(refused(&root).contains("not inside a git repository"));
    }

    #[test]
    fn a_dotgit_directory_that_is_no_repository_is_passed_over_as_git_does() {
        let (_d, root) = scratch();
        Repository::init(&root).expect("init");
        std::fs::create_dir_all(root.join("sub/.git")).expect("mkdir");
        let found = discover(&root.join("sub")).expect("found");
        assert_eq!((found.workdir, found.prefix), (root, "sub".to_owned()));
    }
}
