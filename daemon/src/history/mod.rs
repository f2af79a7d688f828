//! Local history: every settled change to a watched repository's text files, whoever made it,
//! snapshotted as git objects, so any earlier version can be listed, compared and restored
//! (ARCHITECTURE.md, "Local history").
//!
//! - `store`: snapshots as commits on `refs/spark/history`, segments and retention.
//! - `query`: versions of a file or the repository, the version at a time, diffs since a time.
//! - `when`: the `at`/`since` arguments (version id, duration, time).
//!
//! Snapshots are written on the repository's actor thread, like every other git write: the
//! watcher hands settled paths to [`run_settled`], which queues them there, and the edit
//! engine calls [`before_edit`] right before it writes. Only objects and refs under
//! `refs/spark/history*` are written; HEAD, the index and branches are never touched.

mod query;
mod store;
mod when;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use spark_proto::methods::HistoryVersion;
use spark_proto::{ErrorCode, RpcError};
use tokio::sync::mpsc;
use tracing::warn;

use crate::edit::paths::{self, PathError, RelPath};
use crate::edit::{EditError, Outcome, RepoCtx};
use when::When;

/// Settled batches queued between the watchers and the actors; a full queue holds the watcher
/// back (it coalesces meanwhile), it never drops a batch.
pub(crate) const SETTLED_QUEUE: usize = 64;
/// A new segment after this many snapshots (or an hour): retention drops whole segments.
pub(crate) const SEGMENT_SNAPSHOTS: u32 = 256;
/// Versions `history/list` returns unless asked for another limit.
const DEFAULT_LIMIT: usize = 100;

/// Retention and the clock; part of the engine's `EditEnv`, from the daemon's `Config`.
#[derive(Debug, Clone)]
pub(crate) struct HistoryEnv {
    pub(crate) max_age_ms: u64,
    pub(crate) max_bytes: u64,
    pub(crate) segment_snapshots: u32,
    /// Added to the real clock (tests date snapshots in the past).
    pub(crate) clock_offset_ms: i64,
}

impl Default for HistoryEnv {
    fn default() -> HistoryEnv {
        HistoryEnv {
            max_age_ms: crate::config::DEFAULT_HISTORY_MAX_AGE.as_millis() as u64,
            max_bytes: crate::config::DEFAULT_HISTORY_MAX_BYTES,
            segment_snapshots: SEGMENT_SNAPSHOTS,
            clock_offset_ms: 0,
        }
    }
}

impl HistoryEnv {
    pub(crate) fn from_config(config: &crate::Config) -> HistoryEnv {
        HistoryEnv {
            max_age_ms: u64::try_from(config.history_max_age.as_millis()).unwrap_or(u64::MAX),
            max_bytes: config.history_max_bytes,
            segment_snapshots: config.history_segment_snapshots.max(1),
            clock_offset_ms: config.history_clock_offset_ms,
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        let real = crate::clock::unix_ms();
        real.saturating_add_signed(self.clock_offset_ms)
    }
}

/// Why a history request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HistoryError {
    #[error("cannot {op}: {source}")]
    Git {
        op: &'static str,
        source: git2::Error,
    },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{text:?} is not {what}")]
    BadWhen { text: String, what: &'static str },
    #[error("no version {id} in this repository's local history")]
    UnknownVersion { id: String },
    #[error("version id {id} is ambiguous")]
    AmbiguousVersion { id: String },
    #[error("no version of {path} {when}")]
    NoVersion { path: String, when: String },
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Edit(#[from] EditError),
}

pub(super) fn git(op: &'static str) -> impl Fn(git2::Error) -> HistoryError {
    move |source| HistoryError::Git { op, source }
}

impl HistoryError {
    /// The wire error; exhaustive so a new variant needs a decision.
    pub(crate) fn to_rpc(&self) -> RpcError {
        let (code, kind, hint) = match self {
            HistoryError::Git { .. } | HistoryError::Io { .. } => {
                (ErrorCode::Internal, "history", None)
            }
            HistoryError::BadWhen { .. } => (
                ErrorCode::InvalidParams,
                "bad_time",
                Some(
                    "give a version id (6+ hex digits from `sparkctl history`), a duration such as 10m, 2h or 3d, or a time such as 2026-05-01T14:30:00Z",
                ),
            ),
            HistoryError::UnknownVersion { .. } => (
                ErrorCode::UnknownEdit,
                "unknown_version",
                Some("`sparkctl history PATH` lists the versions and their ids"),
            ),
            HistoryError::AmbiguousVersion { .. } => (
                ErrorCode::InvalidParams,
                "ambiguous_version",
                Some("give more digits of the id"),
            ),
            HistoryError::NoVersion { .. } => (
                ErrorCode::EditRejected,
                "no_version",
                Some("`sparkctl history PATH` lists the versions history has"),
            ),
            HistoryError::Path(e) => {
                let kind = format!("path_{}", e.code());
                return RpcError::new(ErrorCode::EditRejected, self.to_string())
                    .with_kind(kind)
                    .with_path(e.path().to_owned())
                    .with_hint(e.hint());
            }
            HistoryError::Edit(e) => return e.to_rpc(),
        };
        let mut e = RpcError::new(code, self.to_string()).with_kind(kind);
        if let Some(h) = hint {
            e = e.with_hint(h);
        }
        e
    }
}

/// Paths that settled in a watched repository (created, modified or deleted, own writes too).
#[derive(Debug)]
pub(crate) struct Settled {
    pub(crate) workdir: PathBuf,
    pub(crate) paths: Vec<String>,
}

/// Snapshot settled changes on their repository's actor, coalescing what queued meanwhile,
/// until the daemon stops.
pub(crate) async fn run_settled(
    repos: &crate::repo::Repos,
    shutdown: &tokio_util::sync::CancellationToken,
    mut rx: mpsc::Receiver<Settled>,
) {
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            s = rx.recv() => match s { Some(s) => s, None => return },
        };
        let mut batches: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
        let mut next = Some(first);
        while let Some(s) = next {
            batches.entry(s.workdir).or_default().extend(s.paths);
            next = rx.try_recv().ok();
        }
        for (workdir, paths) in batches {
            let Some(cwd) = workdir.to_str() else {
                continue;
            };
            let repo = match repos.for_cwd(cwd).await {
                Ok((repo, _)) => repo,
                Err(e) => {
                    warn!(repo = %workdir.display(), error = %e.message, "cannot snapshot local history");
                    continue;
                }
            };
            let paths: Vec<String> = paths.into_iter().collect();
            let done = repo
                .run(move |ctx| {
                    store::snapshot(ctx.repo, ctx.workdir, &paths, "watch", &ctx.env.history)
                })
                .await;
            match done {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    warn!(repo = %workdir.display(), error = %e, "cannot snapshot local history")
                }
                Err(e) => {
                    warn!(repo = %workdir.display(), error = %e.message, "cannot snapshot local history")
                }
            }
        }
    }
}

/// Right before the engine writes `paths`: snapshot what they hold, so an edit never removes
/// the only copy of anything. A failure is logged, not fatal: the edit's own record keeps the
/// before state too.
pub(crate) fn before_edit(ctx: &RepoCtx<'_>, paths: &[String]) {
    if let Err(e) = store::snapshot(ctx.repo, ctx.workdir, paths, "edit", &ctx.env.history) {
        warn!(repo = %ctx.workdir.display(), error = %e, "cannot snapshot local history before an edit");
    }
}

/// `path` as the client wrote it, relative to its directory, made repo-relative.
fn rel_path(prefix: &str, raw: &str) -> Result<RelPath, HistoryError> {
    paths::validate_rel_path(raw)?;
    let joined = if prefix.is_empty() {
        raw.to_owned()
    } else {
        format!("{prefix}/{raw}")
    };
    Ok(paths::validate_rel_path(&joined)?)
}

fn parse_when(text: &str, env: &HistoryEnv, ids: bool) -> Result<When, HistoryError> {
    when::parse(text, env.now_ms(), ids).ok_or_else(|| HistoryError::BadWhen {
        text: text.to_owned(),
        what: if ids {
            "a version id, a duration or a time"
        } else {
            "a duration or a time"
        },
    })
}

/// `history/list`: the repo-relative path asked about, and its versions newest first.
pub(crate) fn list(
    ctx: &RepoCtx<'_>,
    prefix: &str,
    path: Option<&str>,
    since: Option<&str>,
    limit: Option<u32>,
) -> Result<(Option<String>, Vec<HistoryVersion>), HistoryError> {
    let env = &ctx.env.history;
    let since = match since {
        Some(s) => match parse_when(s, env, false)? {
            When::At(t) => Some(t),
            When::Id(_) => None,
        },
        None => None,
    };
    let rel = match path {
        Some(p) => Some(rel_path(prefix, p)?),
        None => None,
    };
    // History never holds a deny-listed file; say nothing about whether one exists.
    if rel.as_ref().is_some_and(paths::is_secret) {
        return Ok((rel.map(|r| r.as_str().to_owned()), Vec::new()));
    }
    let limit = limit.map_or(DEFAULT_LIMIT, |l| l as usize);
    let versions = query::list(ctx.repo, rel.as_ref().map(RelPath::as_str), since, limit)?;
    Ok((rel.map(|r| r.as_str().to_owned()), versions))
}

/// `history/restore`: `path` as the version `at` names held it, written as a recorded edit.
pub(crate) fn restore(
    ctx: &RepoCtx<'_>,
    prefix: &str,
    path: &str,
    at: &str,
    dry_run: bool,
) -> Result<Outcome, HistoryError> {
    let rel = rel_path(prefix, path)?;
    let when = parse_when(at, &ctx.env.history, true)?;
    let version = query::version_at(ctx.repo, rel.as_str(), &when, at)?;
    let id = &version.snap.oid.to_string()[..10];
    let message = format!("restore {} to version {id}", rel.as_str());
    let mode = if version.exec { 0o100755 } else { 0o100644 };
    Ok(crate::edit::write_file(
        ctx,
        &rel,
        version.bytes,
        mode,
        dry_run,
        "restore",
        &message,
    )?)
}

/// `history/diff`: what changed in the worktree since `since` (under `path`).
pub(crate) fn diff(
    ctx: &RepoCtx<'_>,
    prefix: &str,
    since: &str,
    path: Option<&str>,
) -> Result<query::Changes, HistoryError> {
    let t = match parse_when(since, &ctx.env.history, false)? {
        When::At(t) => t,
        When::Id(_) => 0,
    };
    let rel = match path {
        Some(p) => Some(rel_path(prefix, p)?),
        // From a subdirectory, the diff covers it only, as `git diff .` would.
        None if !prefix.is_empty() => Some(paths::validate_rel_path(prefix)?),
        None => None,
    };
    query::diff_since(ctx.repo, ctx.workdir, t, rel.as_ref().map(RelPath::as_str))
}

/// Snapshot `paths` now, as the watcher would (benchmarks; through `sparkd::bench`).
pub(crate) fn snapshot_now(
    repo: &git2::Repository,
    workdir: &std::path::Path,
    paths: &[String],
    env: &HistoryEnv,
) -> Result<bool, String> {
    store::snapshot(repo, workdir, paths, "watch", env)
        .map(|o| o.is_some())
        .map_err(|e| e.to_string())
}

/// Closed segments and their bytes, newest first (benchmarks).
pub(crate) fn segments(repo: &git2::Repository) -> Result<Vec<(u64, u64)>, String> {
    store::closed_segments(repo)
        .map(|v| v.into_iter().map(|s| (s.newest, s.bytes)).collect())
        .map_err(|e| e.to_string())
}
