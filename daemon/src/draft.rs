//! `commit/draft`: a commit message drafted from the staged changes, for git's
//! `prepare-commit-msg` hook.
//!
//! The staged diff (index against HEAD) is read on the repository actor and passes the same
//! guards as every other byte sent: a deny-listed secret path, an ignored, binary or oversized
//! file is left out, and named as left out. The draft is a one-off text-only turn on a session
//! of its own, so it never touches the repository's ask conversation; the turn is capped by
//! `hook_timeout_ms`, the same cap the hook enforces on its side.

use std::path::Path;
use std::time::Duration;

use spark_proto::methods::{DraftParams, DraftResult};
use spark_proto::{ErrorCode, RpcError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::ask::Asks;
use crate::edit::RepoCtx;
use crate::edit::paths;
use crate::provider::{InputItem, SessionConfig, TurnEvent, TurnFailure, TurnRequest};
use crate::repo::Repos;
use crate::watch::MAX_FILE_BYTES;

/// What the model is told for a draft.
const DRAFT_INSTRUCTIONS: &str = "You write git commit messages. Given a staged diff, answer with only the commit message: \
a summary line of at most 72 characters in the imperative mood, then, if the change needs it, a blank line and a short body \
wrapped at 72 columns saying what changed and why. No code fences, no quotes, no preamble.";

/// The diff shown for one draft stays below this; files beyond it are left out whole.
const MAX_DIFF_BYTES: usize = 64 * 1024;

/// Why no draft was made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DraftError {
    #[error("nothing staged can be shown to the model")]
    NothingToDescribe,
    #[error("cannot read the staged changes: {0}")]
    Git(#[from] git2::Error),
    #[error("no draft within {0} ms")]
    TimedOut(u128),
    #[error("{0}")]
    Turn(TurnFailure),
    #[error("the provider session stopped before answering")]
    SessionStopped,
}

impl From<DraftError> for RpcError {
    fn from(e: DraftError) -> RpcError {
        let message = e.to_string();
        match e {
            DraftError::NothingToDescribe => RpcError::new(ErrorCode::InvalidParams, message)
                .with_kind("nothing_staged")
                .with_hint("stage changes with `git add` first"),
            DraftError::Git(_) => RpcError::new(ErrorCode::Internal, message),
            DraftError::TimedOut(_) => RpcError::new(ErrorCode::Provider, message)
                .with_kind("timeout")
                .with_hint("raise hook_timeout_ms in config.toml"),
            DraftError::Turn(TurnFailure::Cancelled) => {
                RpcError::new(ErrorCode::Cancelled, message).with_kind("cancelled")
            }
            DraftError::Turn(TurnFailure::Shutdown) => {
                RpcError::new(ErrorCode::ShuttingDown, message)
            }
            DraftError::Turn(TurnFailure::Provider { .. }) => {
                RpcError::new(ErrorCode::Provider, message)
            }
            DraftError::Turn(TurnFailure::Transport(_)) => {
                RpcError::new(ErrorCode::Provider, message)
                    .with_kind("transport")
                    .with_hint("check SPARK_PROVIDER_URL and the network")
            }
            DraftError::SessionStopped => RpcError::new(ErrorCode::Provider, message),
        }
    }
}

/// The staged diff as it may be sent.
#[derive(Debug, Default)]
struct Staged {
    diff: String,
    files: Vec<String>,
    omitted: Vec<String>,
}

/// What a draft needs of the daemon, lent by the server for one request.
#[derive(Clone, Copy)]
pub(crate) struct DraftEnv<'a> {
    /// Provider settings and the side lanes of their shared connections.
    pub(crate) asks: &'a Asks,
    pub(crate) repos: &'a Repos,
    /// The draft's session task is tracked and stops with the daemon.
    pub(crate) tracker: &'a TaskTracker,
    pub(crate) shutdown: &'a CancellationToken,
    /// The turn's cap (`hook_timeout_ms`).
    pub(crate) timeout: Duration,
}

/// Draft a message for what is staged in the repository of `params.cwd`.
pub(crate) async fn draft(env: DraftEnv<'_>, params: DraftParams) -> Result<DraftResult, RpcError> {
    let provider = env.asks.provider_for(params.provider.as_ref())?;
    let (repo, _) = env.repos.for_cwd(&params.cwd).await?;
    let staged = repo.run(staged_diff).await??;
    if staged.files.is_empty() {
        return Err(DraftError::NothingToDescribe.into());
    }
    info!(
        target: "audit",
        repo = %repo.workdir().display(),
        files = ?staged.files,
        omitted = ?staged.omitted,
        bytes = staged.diff.len(),
        "staged diff sent to the provider for a commit message"
    );
    let mut config = SessionConfig::new(
        provider.url.clone(),
        provider.api_key(),
        provider.model.clone(),
    );
    config.instructions = DRAFT_INSTRUCTIONS.to_owned();
    config.tools = Vec::new();
    // Its own lane on the provider's shared connection: a draft neither waits behind an ask
    // nor pays for a connection of its own.
    let (lane, backoff) = env.asks.side_lane(&provider, "draft", &config);
    config.lanes = lane;
    config.backoff = Some(backoff);
    let session =
        crate::provider::spawn(config, env.tracker, env.shutdown.clone()).map_err(|e| {
            RpcError::new(
                ErrorCode::Provider,
                format!("bad provider URL {}: {e}", provider.url),
            )
        })?;
    let user = InputItem::user_text(format!(
        "Write the commit message for this staged diff:\n```diff\n{}```\n",
        staged.diff
    ));
    let limit = env.timeout;
    let turn = async {
        let mut events = session
            .turn(TurnRequest {
                new_input: vec![user.clone()],
                full_context: vec![user],
                tool_choice: None,
            })
            .await
            .map_err(|_| DraftError::SessionStopped)?;
        loop {
            match events.recv().await {
                None => return Err(DraftError::SessionStopped),
                Some(TurnEvent::Done(done)) => return Ok(done.text()),
                Some(TurnEvent::Failed(f)) => return Err(DraftError::Turn(f)),
                Some(_) => {}
            }
        }
    };
    // Dropping the turn's events (on time-out) cancels it; dropping the handle ends the session.
    let text = tokio::time::timeout(limit, turn)
        .await
        .map_err(|_| DraftError::TimedOut(limit.as_millis()))??;
    Ok(DraftResult {
        message: text.trim().to_owned(),
        files: staged.files,
        omitted: staged.omitted,
    })
}

/// The index against HEAD (or against nothing before the first commit), file by file through
/// the guards; runs on the repository actor.
fn staged_diff(ctx: &RepoCtx<'_>) -> Result<Staged, DraftError> {
    let repo = ctx.repo;
    let mut index = repo.index()?;
    // The cached index would miss what `git add` did since the actor opened the repository.
    index.read(false)?;
    let head = repo.head().ok().and_then(|h| h.peel_to_tree().ok());
    let diff = repo.diff_tree_to_index(head.as_ref(), Some(&index), None)?;
    let mut out = Staged::default();
    for i in 0..diff.deltas().len() {
        let Some(delta) = diff.get_delta(i) else {
            continue;
        };
        let names: Vec<&Path> = [delta.old_file().path(), delta.new_file().path()]
            .into_iter()
            .flatten()
            .collect();
        let Some(shown) = names.last().map(|p| p.to_string_lossy().into_owned()) else {
            continue;
        };
        let guarded = names.iter().all(|p| {
            p.to_str()
                .and_then(|s| paths::validate_rel_path(s).ok())
                .is_some_and(|rel| !paths::is_secret(&rel))
                && !repo.is_path_ignored(p).unwrap_or(true)
        });
        let small = delta.old_file().size() <= MAX_FILE_BYTES as u64
            && delta.new_file().size() <= MAX_FILE_BYTES as u64;
        if !guarded || !small {
            out.omitted.push(shown);
            continue;
        }
        let Some(mut patch) = git2::Patch::from_diff(&diff, i)? else {
            out.omitted.push(shown);
            continue;
        };
        let text = patch
            .to_buf()
            .ok()
            .and_then(|b| b.as_str().map(str::to_owned).ok());
        match text {
            Some(t)
                if !patch.delta().flags().is_binary()
                    && !t.contains('\0')
                    && out.diff.len() + t.len() <= MAX_DIFF_BYTES =>
            {
                out.diff += &t;
                out.files.push(shown);
            }
            _ => out.omitted.push(shown),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::EditEnv;
    use crate::edit::journal::{Durability, Failpoint};

    fn staged(dir: &Path) -> Staged {
        let repo = git2::Repository::open(dir).expect("open");
        let env = EditEnv {
            journal_dir: dir.join(".git/spark-journal"),
            durability: Durability { fsync: false },
            failpoint: Failpoint(None),
            history: Default::default(),
        };
        let ctx = RepoCtx {
            repo: &repo,
            workdir: dir,
            env: &env,
            tracked: &Default::default(),
        };
        staged_diff(&ctx).expect("staged diff")
    }

    fn add(repo: &git2::Repository, path: &str, bytes: &[u8]) {
        let dir = repo.workdir().expect("workdir");
        std::fs::write(dir.join(path), bytes).expect("write");
        let mut index = repo.index().expect("index");
        index.add_path(Path::new(path)).expect("add");
        index.write().expect("write index");
    }

    #[test]
    fn only_staged_text_that_may_leave_is_in_the_diff() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let repo = git2::Repository::init(dir).expect("init");
        std::fs::write(dir.join(".gitignore"), "build/\n*.log\n").expect("write");
        add(&repo, "kept.txt", b"kept line\n");
        add(&repo, ".env", b"TOKEN=hunter2\n");
        add(&repo, "id_rsa", b"-----BEGIN KEY-----\n");
        add(&repo, "image.bin", b"\x00\x01\x02binary");
        add(&repo, "forced.log", b"ignored but added with -f\n");
        add(&repo, "big.txt", &vec![b'x'; MAX_FILE_BYTES + 1]);
        std::fs::write(dir.join("unstaged.txt"), "not staged\n").expect("write");

        let s = staged(dir);
        assert_eq!(s.files, vec!["kept.txt".to_owned()]);
        let mut omitted = s.omitted.clone();
        omitted.sort();
        assert_eq!(
            omitted,
            [".env", "big.txt", "forced.log", "id_rsa", "image.bin"]
        );
        assert!(s.diff.contains("+kept line"), "{}", s.diff);
        for secret in ["hunter2", "BEGIN KEY", "unstaged", "ignored but"] {
            assert!(!s.diff.contains(secret), "{secret} leaked: {}", s.diff);
        }
    }

    #[test]
    fn nothing_staged_is_an_empty_diff() {
        let tmp = tempfile::tempdir().expect("tempdir");
        git2::Repository::init(tmp.path()).expect("init");
        std::fs::write(tmp.path().join("a.txt"), "a\n").expect("write");
        let s = staged(tmp.path());
        assert!(s.files.is_empty() && s.omitted.is_empty() && s.diff.is_empty());
    }
}
