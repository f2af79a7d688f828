//! The edit engine: an edit lands exactly, or not at all, and is recorded so it can be shown,
//! undone, re-applied or stashed. Everything here is blocking and runs on the repository actor's
//! thread, the only place that holds a `git2::Repository`.
//!
//! - [`patch`]: the Codex `apply_patch` grammar (also streaming) and aider SEARCH/REPLACE blocks.
//! - [`matcher`]: applies chunks to file bytes with Codex's passes, byte-faithfully.
//! - [`paths`]: path validation and target checks before any I/O.
//! - [`journal`]: all-or-nothing atomic writes with crash recovery.
//! - [`record`]: stash-shaped commits under `refs/spark/`.
//! - [`ledger`]: the append-only history of edits and their states.

pub(crate) mod corpus;
pub(crate) mod journal;
pub(crate) mod ledger;
pub(crate) mod matcher;
pub(crate) mod patch;
pub(crate) mod paths;
pub(crate) mod record;

#[cfg(test)]
mod proptests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use git2::{Oid, Repository};
use spark_proto::ErrorCode;
use spark_proto::RpcError;

use journal::{Durability, Failpoint, Operation, Write1};
use ledger::EventKind;
use paths::{Intent, PathError, PathErrorKind, RelPath};
use record::{EditMeta, FileChange, FileState, RecordError};

/// Why an edit operation was refused or failed. Nothing on disk changed in any case.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EditError {
    #[error("{0}")]
    Parse(#[from] patch::ParseError),
    #[error("{0}")]
    Path(#[from] PathError),
    #[error("patch does not apply to {path}: {source}")]
    Match {
        path: String,
        source: matcher::MatchError,
    },
    #[error(
        "{path} changed since the edit was computed and the changes overlap; nothing was written"
    )]
    Conflict { path: String },
    #[error("{path} changed while the edit was being written; nothing was written")]
    Changed { path: String },
    #[error("refusing to edit {path}: it is a binary file")]
    Binary { path: String },
    #[error("refusing to add {path}: it already exists and is not committed")]
    AddOverUntracked { path: String },
    #[error("refusing to add {path}: it already exists and has changes since HEAD")]
    AddOverModified { path: String },
    #[error("{path} appears twice in one edit")]
    Duplicate { path: String },
    #[error("{0}")]
    Record(#[from] RecordError),
    #[error("no edit to {what} in this repository")]
    NothingToRevert { what: &'static str },
    #[error("edit {id} is already {state}")]
    NotApplied { id: String, state: &'static str },
    #[error(
        "cannot undo {path}: it changed since edit {id} in the same lines, or was removed; nothing was written"
    )]
    RevertConflict { id: String, path: String },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("git: cannot {op}: {source}")]
    Git {
        op: &'static str,
        source: git2::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl EditError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        EditError::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn git(op: &'static str, source: git2::Error) -> Self {
        EditError::Git { op, source }
    }

    /// The wire error: a stable code, a fine-grained `kind`, the path and a hint.
    pub(crate) fn to_rpc(&self) -> RpcError {
        let (code, kind, path, hint): (ErrorCode, String, Option<String>, Option<&str>) = match self
        {
            EditError::Parse(e) => (
                ErrorCode::EditRejected,
                e.code().to_owned(),
                None,
                Some("the patch must follow the apply_patch grammar (docs/protocol.md)"),
            ),
            EditError::Path(e) => (
                // The filesystem or git failing to answer is not the request's fault.
                if matches!(e.code(), "io" | "git") {
                    ErrorCode::Internal
                } else {
                    ErrorCode::EditRejected
                },
                format!("path_{}", e.code()),
                Some(e.path().to_owned()),
                None,
            ),
            EditError::Match { path, source } => (
                ErrorCode::PatchMismatch,
                source.code().to_owned(),
                Some(path.clone()),
                Some(if source.code() == "ambiguous_match" {
                    "the lines match loosely in more than one place; add context lines so they match one place"
                } else if source.code() == "ambiguous_indentation" {
                    "write the patch's lines with the file's own indentation"
                } else {
                    "the file does not contain the patch's context lines; regenerate the patch against the current file"
                }),
            ),
            EditError::Conflict { path } => (
                ErrorCode::Conflict,
                "conflict".into(),
                Some(path.clone()),
                Some("your changes to this file overlap the edit; your bytes are untouched"),
            ),
            EditError::Changed { path } => (
                ErrorCode::Conflict,
                "changed_during_apply".into(),
                Some(path.clone()),
                Some("retry the edit"),
            ),
            EditError::Binary { path } => (
                ErrorCode::EditRejected,
                "binary_target".into(),
                Some(path.clone()),
                None,
            ),
            EditError::AddOverUntracked { path } => (
                ErrorCode::EditRejected,
                "path_already_exists".into(),
                Some(path.clone()),
                Some(
                    "'*** Add File' replaces a file only when it is committed and unmodified (so the edit can be undone); use '*** Update File', or commit the file first",
                ),
            ),
            EditError::AddOverModified { path } => (
                ErrorCode::EditRejected,
                "path_already_exists".into(),
                Some(path.clone()),
                Some(
                    "replacing it would discard your uncommitted changes; use '*** Update File', or commit or stash them first",
                ),
            ),
            EditError::Duplicate { path } => (
                ErrorCode::EditRejected,
                "duplicate_path".into(),
                Some(path.clone()),
                None,
            ),
            EditError::Record(e) => match e {
                RecordError::UnknownEdit { .. }
                | RecordError::AmbiguousEdit { .. }
                | RecordError::InvalidId { .. }
                | RecordError::NotAnEdit { .. } => (
                    ErrorCode::UnknownEdit,
                    "unknown_edit".into(),
                    None,
                    Some("`sparkctl log` lists this repository's edits"),
                ),
                RecordError::InvalidPath { .. }
                | RecordError::InvalidMode { .. }
                | RecordError::DuplicatePath { .. }
                | RecordError::UnsupportedEntry { .. }
                | RecordError::SymbolicRef { .. }
                | RecordError::RefContention { .. }
                | RecordError::Git { .. } => (ErrorCode::Internal, "record".into(), None, None),
            },
            EditError::NothingToRevert { .. } => (
                ErrorCode::UnknownEdit,
                "nothing_to_revert".into(),
                None,
                Some("`sparkctl log` lists this repository's edits"),
            ),
            EditError::NotApplied { .. } => (
                ErrorCode::EditRejected,
                "not_applied".into(),
                None,
                Some("`git stash apply <id>` re-applies an undone edit"),
            ),
            EditError::RevertConflict { path, .. } => (
                ErrorCode::Conflict,
                "revert_conflict".into(),
                Some(path.clone()),
                Some(
                    "undo the conflicting lines by hand, or use `git stash show -p <id>` to see the edit",
                ),
            ),
            EditError::Io { .. } => (ErrorCode::Internal, "io".into(), None, None),
            EditError::Git { .. } => (ErrorCode::Internal, "git".into(), None, None),
            EditError::Internal(_) => (ErrorCode::Internal, "internal".into(), None, None),
        };
        let mut e = RpcError::new(code, self.to_string()).with_kind(kind);
        if let Some(p) = path {
            e = e.with_path(p);
        }
        if let Some(h) = hint {
            e = e.with_hint(h);
        }
        e
    }
}

/// Daemon-wide settings of the engine.
#[derive(Debug, Clone)]
pub(crate) struct EditEnv {
    pub(crate) journal_dir: PathBuf,
    pub(crate) durability: Durability,
    pub(crate) failpoint: Failpoint,
}

/// One repository as the engine sees it.
pub(crate) struct RepoCtx<'a> {
    pub(crate) repo: &'a Repository,
    pub(crate) workdir: &'a Path,
    pub(crate) env: &'a EditEnv,
}

/// An apply request.
#[derive(Debug, Clone, Default)]
pub(crate) struct ApplyRequest {
    pub(crate) patch: String,
    /// Where relative patch paths start: the client's cwd relative to the worktree ("" = root).
    pub(crate) cwd_prefix: String,
    pub(crate) dry_run: bool,
    pub(crate) source: String,
    pub(crate) message: String,
    /// The content the patch was computed against, per repo-relative path (what the model saw);
    /// files not listed use their content at apply time.
    pub(crate) bases: HashMap<String, Vec<u8>>,
}

/// A file touched by an edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileSummary {
    pub(crate) path: String,
    pub(crate) change: &'static str,
    pub(crate) added: u32,
    pub(crate) removed: u32,
}

/// What an apply, undo or stash did.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    /// Short id of the edit (None for a dry run or a no-op).
    pub(crate) edit: Option<String>,
    pub(crate) files: Vec<FileSummary>,
    pub(crate) diff: String,
    /// Each written file's new content (`None` = deleted).
    pub(crate) after: Vec<(String, Option<Vec<u8>>)>,
}

/// Parse, check and (unless dry-run) apply and record a patch.
pub(crate) fn apply(ctx: &RepoCtx<'_>, req: &ApplyRequest) -> Result<Outcome, EditError> {
    let parsed = patch::parse_any(&req.patch)?;
    let mut targets = paths::Targets::new(ctx.workdir, ctx.repo);
    let mut writes: Vec<Write1> = Vec::new();
    for op in &parsed.ops {
        match op {
            patch::FileOp::Add { path, lines } => {
                let bytes = matcher::render_new_file(lines);
                let (rel, before) =
                    match resolve(&mut targets, &req.cwd_prefix, path, Intent::Create) {
                        Ok(rel) => (rel, None),
                        Err(EditError::Path(e)) if e.kind() == PathErrorKind::AlreadyExists => {
                            let (rel, current) =
                                add_over_existing(ctx, &mut targets, &req.cwd_prefix, path)?;
                            (rel, Some(current))
                        }
                        Err(e) => return Err(e),
                    };
                let mode = before.as_ref().map_or(0o100644, |b: &FileState| b.mode);
                writes.push(Write1 {
                    path: rel.as_str().to_owned(),
                    before,
                    after: Some(FileState { bytes, mode }),
                });
            }
            patch::FileOp::Delete { path } => {
                let rel = resolve(&mut targets, &req.cwd_prefix, path, Intent::Delete)?;
                let current = read_text(ctx, &rel)?;
                writes.push(Write1 {
                    path: rel.as_str().to_owned(),
                    before: Some(current),
                    after: None,
                });
            }
            patch::FileOp::Update {
                path,
                move_to,
                chunks,
            } => {
                let rel = resolve(&mut targets, &req.cwd_prefix, path, Intent::Modify)?;
                let current = read_text(ctx, &rel)?;
                let base = req.bases.get(rel.as_str()).unwrap_or(&current.bytes);
                let edited =
                    matcher::apply_update(base, chunks).map_err(|source| EditError::Match {
                        path: rel.as_str().to_owned(),
                        source,
                    })?;
                let new = if *base == current.bytes {
                    edited
                } else {
                    merge3(base, &current.bytes, &edited, rel.as_str())?
                };
                let after = FileState {
                    bytes: new,
                    mode: current.mode,
                };
                match move_to {
                    Some(dest) => {
                        let dest = resolve(&mut targets, &req.cwd_prefix, dest, Intent::Create)?;
                        writes.push(Write1 {
                            path: rel.as_str().to_owned(),
                            before: Some(current),
                            after: None,
                        });
                        writes.push(Write1 {
                            path: dest.as_str().to_owned(),
                            before: None,
                            after: Some(after),
                        });
                    }
                    None => writes.push(Write1 {
                        path: rel.as_str().to_owned(),
                        before: Some(current),
                        after: Some(after),
                    }),
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for w in &writes {
        if !seen.insert(w.path.as_str()) {
            return Err(EditError::Duplicate {
                path: w.path.clone(),
            });
        }
    }
    writes.retain(|w| w.before != w.after);
    let (files, diff) = summarize(&writes)?;
    if req.dry_run || writes.is_empty() {
        return Ok(Outcome {
            edit: None,
            files,
            diff,
            after: Vec::new(),
        });
    }

    let time_ms = now_ms() as i64;
    let operation = Operation::Apply {
        source: req.source.clone(),
        message: req.message.clone(),
        time_ms,
    };
    let pending = commit_writes(ctx, operation, &writes)?;
    let changes: Vec<FileChange> = writes
        .iter()
        .map(|w| FileChange {
            path: w.path.clone(),
            before: w.before.clone(),
            after: w.after.clone(),
        })
        .collect();
    let edit = finish_apply(
        ctx,
        false,
        &pending.id,
        &changes,
        &req.source,
        &req.message,
        time_ms,
    )?;
    journal::finish(&pending, &ctx.env.failpoint);
    Ok(Outcome {
        edit: Some(record::edit_short_id(ctx.repo, edit)?),
        files,
        diff,
        after: changes
            .into_iter()
            .map(|c| (c.path, c.after.map(|a| a.bytes)))
            .collect(),
    })
}

/// Write `writes` to the worktree all-or-nothing, journalled (see [`journal::commit`]).
fn commit_writes(
    ctx: &RepoCtx<'_>,
    operation: Operation,
    writes: &[Write1],
) -> Result<journal::Pending, EditError> {
    journal::commit(
        ctx.workdir,
        &ctx.env.journal_dir,
        operation,
        writes,
        ctx.env.durability,
        &ctx.env.failpoint,
    )
}

/// Record a written apply and add it to the ledger (also used by recovery; idempotent).
fn finish_apply(
    ctx: &RepoCtx<'_>,
    recovering: bool,
    journal_id: &str,
    changes: &[FileChange],
    source: &str,
    message: &str,
    time_ms: i64,
) -> Result<Oid, EditError> {
    let meta = EditMeta {
        message: if message.is_empty() {
            source.to_owned()
        } else {
            message.to_owned()
        },
        time_ms,
    };
    let edit = record::record_edit(ctx.repo, changes, &meta)?;
    ctx.env.failpoint.hit("after_record");
    let hex = edit.to_string();
    // Recovery may run after the ledger line was written; a live apply always appends (the
    // same edit re-applied within one millisecond has the same commit id, and is applied again).
    let known = recovering
        && ledger::summaries(ctx.repo.path())?
            .iter()
            .any(|s| s.applied.edit == hex && s.state == EventKind::Applied);
    if !known {
        ledger::append(
            ctx.repo.path(),
            &ledger::Entry {
                edit: hex,
                event: EventKind::Applied,
                at: u64::try_from(time_ms).unwrap_or(0),
                source: source.to_owned(),
                message: message.to_owned(),
                files: changes.iter().map(|c| c.path.clone()).collect(),
                journal: journal_id.to_owned(),
            },
            ctx.env.durability.fsync,
        )?;
    }
    Ok(edit)
}

/// Revert an edit in the worktree (`undo`), optionally moving it onto `refs/stash` (`stash`).
pub(crate) fn revert(
    ctx: &RepoCtx<'_>,
    id: Option<&str>,
    stash: bool,
) -> Result<Outcome, EditError> {
    let what = if stash { "stash" } else { "undo" };
    let summaries = ledger::summaries(ctx.repo.path())?;
    let oid = match id {
        Some(id) => record::resolve_edit(ctx.repo, id)?,
        None => {
            let last = summaries
                .iter()
                .find(|s| s.state == EventKind::Applied)
                .ok_or(EditError::NothingToRevert { what })?;
            Oid::from_str(&last.applied.edit).map_err(|e| EditError::git("read ledger id", e))?
        }
    };
    let short = record::edit_short_id(ctx.repo, oid)?;
    let hex = oid.to_string();
    let summary = summaries.iter().find(|s| s.applied.edit == hex);
    let changes = record::edit_changes(ctx.repo, oid)?;
    // An undone or stashed edit may have been brought back with `git stash apply`/`pop`: then
    // the worktree, not the ledger, says it is applied.
    let state = match summary.map(|s| s.state) {
        Some(EventKind::Undone) => Some("undone"),
        Some(EventKind::Stashed) => Some("stashed"),
        Some(EventKind::Applied) | None => None,
    };
    if let Some(state) = state
        && !holds_after_state(ctx, &changes)?
    {
        return Err(EditError::NotApplied { id: short, state });
    }
    let mut writes = Vec::new();
    for change in changes {
        let rel = paths::validate_rel_path(&change.path)?;
        let abs = ctx.workdir.join(rel.to_path());
        let current = journal::read_state(&abs).map_err(|e| EditError::io("read", &abs, e))?;
        let conflict = || EditError::RevertConflict {
            id: short.clone(),
            path: change.path.clone(),
        };
        let target = match (&change.before, &change.after, &current) {
            (_, _, cur)
                if cur.as_ref().map(|c| &c.bytes) == change.after.as_ref().map(|a| &a.bytes) =>
            {
                change.before.clone()
            }
            (Some(before), Some(after), Some(cur)) => {
                let bytes = merge3(&after.bytes, &cur.bytes, &before.bytes, &change.path)
                    .map_err(|_| conflict())?;
                Some(FileState {
                    bytes,
                    mode: cur.mode,
                })
            }
            _ => return Err(conflict()),
        };
        writes.push(Write1 {
            path: change.path.clone(),
            before: current,
            after: target,
        });
    }
    writes.retain(|w| w.before != w.after);
    let (files, diff) = summarize(&writes)?;
    let operation = Operation::Revert {
        edit: hex.clone(),
        stash,
    };
    let pending = commit_writes(ctx, operation, &writes)?;
    let message = summary.map(|s| {
        if s.applied.message.is_empty() {
            &s.applied.source
        } else {
            &s.applied.message
        }
    });
    finish_revert(
        ctx,
        oid,
        stash,
        message.map(String::as_str).unwrap_or(""),
        &pending.id,
        false,
    )?;
    journal::finish(&pending, &ctx.env.failpoint);
    Ok(Outcome {
        edit: Some(short),
        files,
        diff,
        after: writes
            .into_iter()
            .map(|w| (w.path, w.after.map(|a| a.bytes)))
            .collect(),
    })
}

/// Whether every file of an edit holds its after state in the worktree.
fn holds_after_state(ctx: &RepoCtx<'_>, changes: &[FileChange]) -> Result<bool, EditError> {
    for c in changes {
        let abs = ctx
            .workdir
            .join(paths::validate_rel_path(&c.path)?.to_path());
        let current = journal::read_state(&abs).map_err(|e| EditError::io("read", &abs, e))?;
        if current.map(|s| s.bytes) != c.after.as_ref().map(|a| a.bytes.clone()) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn finish_revert(
    ctx: &RepoCtx<'_>,
    oid: Oid,
    stash: bool,
    message: &str,
    journal_id: &str,
    recovering: bool,
) -> Result<(), EditError> {
    let hex = oid.to_string();
    if stash {
        let on_stash = ctx.repo.refname_to_id("refs/stash").ok() == Some(oid);
        if !on_stash {
            record::push_stash(ctx.repo, oid, message)?;
        }
    }
    let state = ledger::summaries(ctx.repo.path())?
        .into_iter()
        .find(|s| s.applied.edit == hex)
        .map(|s| s.state);
    // Recovery may run after the event was written; a live revert always records itself.
    if !recovering || state == Some(EventKind::Applied) {
        ledger::append(
            ctx.repo.path(),
            &ledger::Entry {
                edit: hex,
                event: if stash {
                    EventKind::Stashed
                } else {
                    EventKind::Undone
                },
                at: now_ms(),
                source: String::new(),
                message: String::new(),
                files: Vec::new(),
                journal: journal_id.to_owned(),
            },
            ctx.env.durability.fsync,
        )?;
    }
    Ok(())
}

/// An edit's record, for `show`.
pub(crate) struct Shown {
    pub(crate) edit: String,
    pub(crate) diff: String,
    pub(crate) summary: Option<ledger::EditSummary>,
}

pub(crate) fn show(ctx: &RepoCtx<'_>, id: Option<&str>) -> Result<Shown, EditError> {
    let summaries = ledger::summaries(ctx.repo.path())?;
    let oid = match id {
        Some(id) => record::resolve_edit(ctx.repo, id)?,
        None => {
            let last = summaries
                .first()
                .ok_or(EditError::NothingToRevert { what: "show" })?;
            Oid::from_str(&last.applied.edit).map_err(|e| EditError::git("read ledger id", e))?
        }
    };
    let hex = oid.to_string();
    Ok(Shown {
        edit: record::edit_short_id(ctx.repo, oid)?,
        diff: record::edit_patch(ctx.repo, oid)?,
        summary: summaries.into_iter().find(|s| s.applied.edit == hex),
    })
}

/// Edits of this repository, newest first, with their short ids.
pub(crate) fn log(
    ctx: &RepoCtx<'_>,
    limit: usize,
) -> Result<Vec<(String, ledger::EditSummary)>, EditError> {
    ledger::summaries(ctx.repo.path())?
        .into_iter()
        .take(limit)
        .map(|s| {
            let oid =
                Oid::from_str(&s.applied.edit).map_err(|e| EditError::git("read ledger id", e))?;
            Ok((record::edit_short_id(ctx.repo, oid)?, s))
        })
        .collect()
}

/// Finish or undo what a previous daemon left half-done in `repo`. Returns what it did.
pub(crate) fn recover(
    ctx: &RepoCtx<'_>,
    journal: &journal::Journal,
) -> Result<&'static str, EditError> {
    if ledger::mentions_journal(ctx.repo.path(), &journal.id)? {
        // Finished and in the ledger; only the journal's retirement was lost.
        return Ok("already finished");
    }
    if !journal::landed(journal)? {
        journal::rollback(journal)?;
        return Ok("rolled back");
    }
    match &journal.operation {
        Operation::Apply {
            source,
            message,
            time_ms,
        } => {
            let changes: Vec<FileChange> = journal
                .files
                .iter()
                .map(|f| FileChange {
                    path: f.path.clone(),
                    before: f.before.clone(),
                    after: f.after.clone(),
                })
                .collect();
            finish_apply(ctx, true, &journal.id, &changes, source, message, *time_ms)?;
            Ok("completed")
        }
        Operation::Revert { edit, stash } => {
            let oid = Oid::from_str(edit).map_err(|e| EditError::git("read journal id", e))?;
            finish_revert(ctx, oid, *stash, "", &journal.id, true)?;
            Ok("completed")
        }
    }
}

/// Validate a patch path (relative to the client's cwd) and check its target.
fn resolve(
    targets: &mut paths::Targets<'_>,
    cwd_prefix: &str,
    raw: &str,
    intent: Intent,
) -> Result<RelPath, EditError> {
    // Validate as written first, so the error quotes the path the patch used.
    paths::validate_rel_path(raw)?;
    let joined = if cwd_prefix.is_empty() {
        raw.to_owned()
    } else {
        format!("{cwd_prefix}/{raw}")
    };
    let rel = paths::validate_rel_path(&joined)?;
    targets.check(&rel, intent)?;
    Ok(rel)
}

/// `*** Add File` naming a file that exists: models trained on apply_patch rewrite whole files
/// that way. Allowed only when the file is committed and unmodified since HEAD, so the edit
/// can be undone and no uncommitted work is lost; the file's own checks (symlink, binary, …)
/// apply as for an update.
fn add_over_existing(
    ctx: &RepoCtx<'_>,
    targets: &mut paths::Targets<'_>,
    cwd_prefix: &str,
    raw: &str,
) -> Result<(RelPath, FileState), EditError> {
    let rel = resolve(targets, cwd_prefix, raw, Intent::Modify)?;
    let current = read_text(ctx, &rel)?;
    let path = rel.as_str().to_owned();
    let committed = match ctx.repo.head() {
        Ok(head) => {
            let tree = head
                .peel_to_tree()
                .map_err(|e| EditError::git("read HEAD", e))?;
            match tree.get_path(&rel.to_path()) {
                Ok(entry) if entry.kind() == Some(git2::ObjectType::Blob) => {
                    let blob = ctx
                        .repo
                        .find_blob(entry.id())
                        .map_err(|e| EditError::git("read a blob of HEAD", e))?;
                    Some(blob.content() == current.bytes.as_slice())
                }
                Ok(_) => None,
                Err(e) if e.code() == git2::ErrorCode::NotFound => None,
                Err(e) => return Err(EditError::git("read HEAD", e)),
            }
        }
        Err(e) if e.code() == git2::ErrorCode::UnbornBranch => None,
        Err(e) => return Err(EditError::git("read HEAD", e)),
    };
    match committed {
        Some(true) => Ok((rel, current)),
        Some(false) => Err(EditError::AddOverModified { path }),
        None => Err(EditError::AddOverUntracked { path }),
    }
}

fn read_text(ctx: &RepoCtx<'_>, rel: &RelPath) -> Result<FileState, EditError> {
    let abs = ctx.workdir.join(rel.to_path());
    let state = journal::read_state(&abs)
        .map_err(|e| EditError::io("read", &abs, e))?
        .ok_or_else(|| EditError::Io {
            op: "read",
            path: rel.as_str().to_owned(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
    if state.bytes.contains(&0) || std::str::from_utf8(strip_bom(&state.bytes)).is_err() {
        return Err(EditError::Binary {
            path: rel.as_str().to_owned(),
        });
    }
    Ok(state)
}

fn strip_bom(b: &[u8]) -> &[u8] {
    b.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(b)
}

/// 3-way merge of file contents: `base` is what both sides started from.
fn merge3(base: &[u8], ours: &[u8], theirs: &[u8], path: &str) -> Result<Vec<u8>, EditError> {
    let mut a = git2::MergeFileInput::new();
    a.content(base);
    let mut o = git2::MergeFileInput::new();
    o.content(ours);
    let mut t = git2::MergeFileInput::new();
    t.content(theirs);
    let result =
        git2::merge_file(&a, &o, &t, None).map_err(|e| EditError::git("merge file contents", e))?;
    if !result.is_automergeable() {
        return Err(EditError::Conflict {
            path: path.to_owned(),
        });
    }
    Ok(result.content().to_vec())
}

/// Per-file summaries and the unified diff of the writes (as `git diff` shows them), from one
/// diff per file.
fn summarize(writes: &[Write1]) -> Result<(Vec<FileSummary>, String), EditError> {
    let mut files = Vec::with_capacity(writes.len());
    let mut diff = Vec::new();
    for w in writes {
        let old = w.before.as_ref().map(|_| Path::new(&w.path));
        let new = w.after.as_ref().map(|_| Path::new(&w.path));
        let mut p =
            git2::Patch::from_buffers(content(&w.before), old, content(&w.after), new, None)
                .map_err(|e| EditError::git("diff", e))?;
        let (_, added, removed) = p.line_stats().map_err(|e| EditError::git("diff", e))?;
        let text = p.to_buf().map_err(|e| EditError::git("diff", e))?;
        diff.extend_from_slice(&git_header(w)?);
        // libgit2 diffs two buffers as a modification; keep its hunks, not its header.
        if let Some(at) = find_hunks(&text) {
            diff.extend_from_slice(&text[at..]);
        }
        let change = match (&w.before, &w.after) {
            (None, _) => "added",
            (_, None) => "deleted",
            _ => "modified",
        };
        files.push(FileSummary {
            path: w.path.clone(),
            change,
            added: added as u32,
            removed: removed as u32,
        });
    }
    Ok((files, String::from_utf8_lossy(&diff).into_owned()))
}

/// The header `git diff` prints for one file of an edit: `new file mode`/`deleted file mode`,
/// `old mode`/`new mode`, abbreviated blob ids, and `/dev/null` sides.
fn git_header(w: &Write1) -> Result<Vec<u8>, EditError> {
    const NONE: &str = "0000000";
    let abbrev = |s: &FileState| -> Result<String, EditError> {
        let oid = git2::Oid::hash_object(git2::ObjectType::Blob, &s.bytes)
            .map_err(|e| EditError::git("hash", e))?;
        Ok(oid.to_string()[..7].to_owned())
    };
    let path = &w.path;
    let mut h = format!("diff --git a/{path} b/{path}\n");
    let has_text = |s: &FileState| !s.bytes.is_empty();
    match (&w.before, &w.after) {
        (None, Some(after)) => {
            h += &format!(
                "new file mode {:o}\nindex {NONE}..{}\n",
                after.mode,
                abbrev(after)?
            );
            if has_text(after) {
                h += &format!("--- /dev/null\n+++ b/{path}\n");
            }
        }
        (Some(before), None) => {
            h += &format!(
                "deleted file mode {:o}\nindex {}..{NONE}\n",
                before.mode,
                abbrev(before)?
            );
            if has_text(before) {
                h += &format!("--- a/{path}\n+++ /dev/null\n");
            }
        }
        (Some(before), Some(after)) => {
            if before.mode != after.mode {
                h += &format!("old mode {:o}\nnew mode {:o}\n", before.mode, after.mode);
            }
            if before.bytes != after.bytes {
                h += &format!("index {}..{}", abbrev(before)?, abbrev(after)?);
                if before.mode == after.mode {
                    h += &format!(" {:o}", after.mode);
                }
                h += &format!("\n--- a/{path}\n+++ b/{path}\n");
            }
        }
        (None, None) => {}
    }
    Ok(h.into_bytes())
}

/// Where the first hunk of a libgit2 patch text starts.
fn find_hunks(text: &[u8]) -> Option<usize> {
    if text.starts_with(b"@@") {
        return Some(0);
    }
    text.windows(3).position(|w| w == b"\n@@").map(|at| at + 1)
}

fn content(s: &Option<FileState>) -> &[u8] {
    s.as_ref().map(|s| s.bytes.as_slice()).unwrap_or(b"")
}

fn now_ms() -> u64 {
    crate::server::unix_ms()
}
