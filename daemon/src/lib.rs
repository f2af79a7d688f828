//! `sparkd`: spark's per-user daemon, as a library. `main` resolves a [`Config`] and calls
//! [`run`]; tests start the same code in-process on a temporary socket.
//!
//! - [`config`]: defaults < `config.toml` < environment < flags → a validated [`Config`].
//! - [`instance`]: the private socket directory, the single-instance lock, stale sockets.
//! - `server`: the accept loop, one task per connection, request dispatch, events, shutdown.
//! - `codec`: NDJSON line framing on tokio with a maximum line length.
//! - `outbound`: one connection's queue to its writer: responses wait for room, notifications
//!   never do (a client that stops reading them is disconnected).
//! - `edit`: the edit engine (parse, check, apply all-or-nothing, record, undo, stash).
//! - `repo`: one actor thread per repository owning its `git2::Repository`.
//! - `provider`: warm Responses-API sessions (WebSocket mode, HTTP + SSE fallback).
//! - `ask`: one model call per edit, streamed, applied through the edit engine; `ask::context`
//!   is what the model sees, and the guard on every byte that leaves the machine.
//! - `draft`: a commit message drafted from the staged diff, for the `prepare-commit-msg` hook.
//! - `trigger`: `spark!` comments in watched files run as asks, the comment removed in the edit.
//! - `watch`: one watcher per repository keeping its outline and file contents current, and
//!   `watch::cache`, the sled context cache (disposable: rebuilt whenever it is unreadable).
//! - `clock`: wall-clock milliseconds for the ledger, the watcher and `status`.
//! - `memory`: freed heap pages handed back to the kernel after large one-off work (the one
//!   module with `unsafe`).

pub mod config;
pub mod instance;
mod server;

mod ask;
mod clock;
mod codec;
mod draft;
mod edit;
mod history;
mod memory;
mod outbound;
mod provider;
mod repo;
mod trigger;
mod watch;

#[cfg(test)]
mod fuzz_tests;

use std::path::Path;

pub use config::{Config, ConfigError, Flags, ProviderTiming};
pub use instance::InstanceError;
use tokio_util::sync::CancellationToken;

/// The daemon's package version, compared by clients to their own.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        path: String,
        source: std::io::Error,
    },
}

/// A daemon that holds its socket but does not serve yet: binding and serving are split so a
/// caller knows the socket is ready (and can say so) before the first connection.
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    instance: instance::Instance,
}

/// Process-wide libgit2 settings for the daemon. Every object spark references it has just
/// written or read itself, so libgit2's re-checks are pure cost on the edit path: looking up each
/// object a new tree or commit names (a loose-object read per entry), and re-hashing every object
/// read with collision-detecting SHA-1 (git itself does neither outside `fsck`).
fn tune_libgit2() {
    git2::opts::strict_object_creation(false);
    git2::opts::strict_hash_verification(false);
}

impl Daemon {
    /// Claim the socket (single instance, stale-socket recovery) and prepare the state dir.
    pub fn bind(config: Config) -> Result<Daemon, RunError> {
        tune_libgit2();
        let instance =
            instance::Instance::claim(&config.layout.socket, &config.layout.instance_lock())?;
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.layout.state_dir)
            .map_err(|source| RunError::Prepare {
                path: config.layout.state_dir.display().to_string(),
                source,
            })?;
        // Interrupted edits are settled before any client can see the worktree through us.
        repo::recover_all(&edit::EditEnv::from_config(&config));
        Ok(Daemon { config, instance })
    }

    pub fn socket(&self) -> &Path {
        self.instance.socket()
    }

    /// Serve until `shutdown` is cancelled (signal, `shutdown` request or idle timeout), then
    /// drain in-flight work for at most the configured drain timeout and remove the socket.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), RunError> {
        server::serve(self.config, self.instance, shutdown).await;
        Ok(())
    }
}

/// Entry points for the benchmarks in `bench/`; not a stable API.
#[doc(hidden)]
pub mod bench {
    /// The real-history corpus of the fidelity benchmark, and the engine's apply for it.
    pub use crate::edit::corpus::{CorpusCase, Skipped, apply_text, cases as corpus_cases};

    /// Parse an apply_patch (or SEARCH/REPLACE) text; the number of file operations.
    pub fn parse_patch(text: &str) -> Result<usize, String> {
        crate::edit::patch::parse_any(text)
            .map(|p| p.ops.len())
            .map_err(|e| e.to_string())
    }

    /// What a cold index of a repository cost, for the indexing benchmark.
    #[derive(Debug, Clone)]
    pub struct IndexReport {
        pub files: usize,
        pub text_files: u64,
        pub watches: usize,
        pub elapsed: std::time::Duration,
        pub flush: std::time::Duration,
    }

    /// Index `dir` from cold as a watch would (with a sled cache in `cache` if given).
    pub fn index_repo(
        dir: &std::path::Path,
        cache: Option<&std::path::Path>,
    ) -> Result<IndexReport, String> {
        crate::watch::index_once(dir, cache).map(|s| IndexReport {
            files: s.files,
            text_files: s.text_files,
            watches: s.watches,
            elapsed: s.elapsed,
            flush: s.flush,
        })
    }

    /// Local history's settings for a benchmark: retention, and segment length.
    #[derive(Debug, Clone)]
    pub struct HistorySettings {
        pub max_bytes: u64,
        pub max_age: std::time::Duration,
        pub segment_snapshots: u32,
        /// Added to the real clock, to simulate a day in a minute.
        pub clock_offset_ms: i64,
    }

    /// One repository's local history, driven the way the watcher's settled batches drive it,
    /// on the caller's thread.
    pub struct HistoryRepo {
        repo: git2::Repository,
        dir: std::path::PathBuf,
        env: crate::history::HistoryEnv,
    }

    impl std::fmt::Debug for HistoryRepo {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("HistoryRepo")
                .field("dir", &self.dir)
                .finish()
        }
    }

    impl HistoryRepo {
        pub fn open(dir: &std::path::Path, s: &HistorySettings) -> Result<HistoryRepo, String> {
            let repo = git2::Repository::open(dir).map_err(|e| e.to_string())?;
            let env = crate::history::HistoryEnv {
                max_age_ms: u64::try_from(s.max_age.as_millis()).unwrap_or(u64::MAX),
                max_bytes: s.max_bytes,
                segment_snapshots: s.segment_snapshots.max(1),
                clock_offset_ms: s.clock_offset_ms,
            };
            Ok(HistoryRepo {
                repo,
                dir: dir.to_owned(),
                env,
            })
        }

        /// Move the simulated clock.
        pub fn set_clock_offset_ms(&mut self, ms: i64) {
            self.env.clock_offset_ms = ms;
        }

        /// Snapshot `paths` (repo-relative) as they are on disk; false when nothing changed.
        pub fn snapshot(&self, paths: &[String]) -> Result<bool, String> {
            crate::history::snapshot_now(&self.repo, &self.dir, paths, &self.env)
        }

        /// Closed segments, newest first: (newest snapshot's unix ms, bytes introduced).
        pub fn segments(&self) -> Result<Vec<(u64, u64)>, String> {
            crate::history::segments(&self.repo)
        }
    }
}

/// Bind and serve: the daemon's whole life.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    Daemon::bind(config)?.serve(shutdown).await
}
