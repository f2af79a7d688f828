//! Repositories: one actor thread per worktree owns its `git2::Repository` (Send, not Sync, and
//! its objects are !Send), and callers hold a cloneable [`RepoHandle`] that sends it jobs with a
//! oneshot reply. Everything git and filesystem heavy runs there, never on an async worker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use git2::Repository;
use spark_proto::{ErrorCode, RpcError};
use tokio::sync::{mpsc, oneshot};

use crate::edit::{EditEnv, RepoCtx};

/// Jobs queued per repository before callers get a retryable "overloaded" error.
const REPO_QUEUE: usize = 64;

type Job = Box<dyn FnOnce(&RepoCtx<'_>) + Send>;

/// A handle to one repository's actor.
#[derive(Debug, Clone)]
pub(crate) struct RepoHandle {
    tx: mpsc::Sender<Job>,
    workdir: Arc<PathBuf>,
    edits: Arc<AtomicU64>,
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
            mpsc::error::TrySendError::Full(_) => RpcError::new(
                ErrorCode::Overloaded,
                "too many requests queued for this repository",
            )
            .with_hint("retry shortly"),
            mpsc::error::TrySendError::Closed(_) => {
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
    /// Client directory → (worktree, prefix): discovery walks the filesystem, and the same few
    /// directories ask again and again. A nested repository created later under a cached
    /// directory is still safe: the edit engine refuses paths inside nested repositories.
    discovered: Mutex<HashMap<PathBuf, (PathBuf, String)>>,
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
                format!("cwd {} is not an absolute path", cwd.display()),
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
        let (workdir, prefix) = found;
        if let Some(h) = self.lock()?.get(&workdir) {
            return Ok((h.clone(), prefix));
        }
        let w = workdir.clone();
        let repo = tokio::task::spawn_blocking(move || Repository::open(&w))
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
        let handle = spawn_actor(workdir.clone(), repo, self.env.clone())?;
        // Two first requests may race to open it: the first handle in wins, the other's actor exits.
        let handle = self.lock()?.entry(workdir).or_insert(handle).clone();
        Ok((handle, prefix))
    }

    async fn discover_and_remember(&self, cwd: PathBuf) -> Result<(PathBuf, String), RpcError> {
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

/// Find the worktree containing `cwd`; return its canonical path and the cwd prefix in it.
fn discover(cwd: &Path) -> Result<(PathBuf, String), RpcError> {
    let not_repo = |why: String| {
        RpcError::new(ErrorCode::NotARepository, why)
            .with_hint("run it inside a git working tree (`git init` makes one)")
    };
    let canonical = cwd
        .canonicalize()
        .map_err(|e| not_repo(format!("cannot use {}: {e}", cwd.display())))?;
    let repo = Repository::discover(&canonical)
        .map_err(|_| not_repo(format!("{} is not inside a git repository", cwd.display())))?;
    let workdir = repo
        .workdir()
        .ok_or_else(|| {
            not_repo(format!(
                "{} is a bare repository: it has no working tree to edit",
                repo.path().display()
            ))
        })?
        .canonicalize()
        .map_err(|e| not_repo(format!("cannot resolve the worktree: {e}")))?;
    let prefix = canonical
        .strip_prefix(&workdir)
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .unwrap_or_default();
    Ok((workdir, prefix))
}

fn spawn_actor(workdir: PathBuf, repo: Repository, env: EditEnv) -> Result<RepoHandle, RpcError> {
    let (tx, mut rx) = mpsc::channel::<Job>(REPO_QUEUE);
    let name = format!(
        "repo:{}",
        workdir
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    );
    let thread_workdir = workdir.clone();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            // Exits when every handle is gone (daemon shutdown).
            while let Some(job) = rx.blocking_recv() {
                let ctx = RepoCtx {
                    repo: &repo,
                    workdir: &thread_workdir,
                    env: &env,
                };
                job(&ctx);
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
        edits: Arc::new(AtomicU64::new(0)),
    })
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
        let outcome = Repository::open(&journal.workdir)
            .map_err(|e| e.to_string())
            .and_then(|repo| {
                let ctx = RepoCtx {
                    repo: &repo,
                    workdir: &journal.workdir,
                    env,
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
