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
pub(crate) mod pack;
pub(crate) mod patch;
pub(crate) mod paths;
pub(crate) mod record;
pub(crate) mod tracked;

#[cfg(test)]
mod proptests;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use git2::{Oid, Repository};
use spark_proto::ErrorCode;
use spark_proto::RpcError;
use spark_proto::methods::{self as wire, FileChangeSummary};

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
    #[error("edit {id} belongs to the worktree {worktree}, not this one; nothing was written")]
    OtherWorktree {
        id: String,
        what: &'static str,
        worktree: String,
    },
    #[error(
        "{what} of edit {id} would change nothing: its files already hold their pre-edit content; nothing was written"
    )]
    NothingChanges { id: String, what: &'static str },
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
    #[error(
        "{lock} exists: a git command is updating that ref, or one was killed while it did; nothing was written"
    )]
    Locked {
        lock: String,
        /// How to remove it, naming the file.
        hint: String,
    },
    #[error(
        "refusing to edit {path}: it is a Git LFS pointer (.gitattributes says filter=lfs), not the file's content"
    )]
    LfsPointer { path: String },
    #[error(
        "refusing to edit {path}: .gitattributes routes it through the filter {filter:?}, a program spark does not run, so it cannot record what git would store"
    )]
    ExternalFilter { path: String, filter: String },
    #[error("recording failed, so the change was taken back and nothing changed: {source}")]
    NotRecorded { source: Box<EditError> },
    #[error("refusing to {op} {path}: it has unsaved changes in the editor; nothing was written")]
    UnsavedBuffer { path: String, op: &'static str },
    #[error(
        "recording failed ({source}), and putting the files back failed ({restore}); the daemon's next start puts them back"
    )]
    NotRestored {
        source: Box<EditError>,
        restore: Box<EditError>,
    },
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
        let other_worktree_hint = match self {
            EditError::OtherWorktree { id, what, worktree } => Some(format!(
                "run `sparkctl {what} {id}` in {worktree}, where the edit was made"
            )),
            _ => None,
        };
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
                Some(e.hint()),
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
            EditError::OtherWorktree { .. } => (
                ErrorCode::EditRejected,
                "other_worktree".into(),
                None,
                other_worktree_hint.as_deref(),
            ),
            EditError::NothingChanges { .. } => (
                ErrorCode::EditRejected,
                "nothing_changes".into(),
                None,
                Some(
                    "the edit was already reverted (`sparkctl log` shows it); `git stash show -p <id>` shows what it changed",
                ),
            ),
            EditError::RevertConflict { path, .. } => (
                ErrorCode::Conflict,
                "revert_conflict".into(),
                Some(path.clone()),
                Some(
                    "undo the conflicting lines by hand, or use `git stash show -p <id>` to see the edit",
                ),
            ),
            EditError::Io { source, .. } => {
                let (kind, hint) = io_kind(source);
                (ErrorCode::Internal, kind.into(), None, Some(hint))
            }
            EditError::Git { .. } => (ErrorCode::Internal, "git".into(), None, None),
            EditError::Internal(_) => (ErrorCode::Internal, "internal".into(), None, None),
            EditError::Locked { hint, .. } => (
                ErrorCode::Conflict,
                "ref_locked".into(),
                None,
                Some(hint.as_str()),
            ),
            EditError::LfsPointer { path } => (
                ErrorCode::EditRejected,
                "lfs_pointer".into(),
                Some(path.clone()),
                Some("fetch the real content first (`git lfs pull`), or edit the file yourself"),
            ),
            EditError::ExternalFilter { path, .. } => (
                ErrorCode::EditRejected,
                "external_filter".into(),
                Some(path.clone()),
                Some("edit the file yourself, or remove the filter attribute for it"),
            ),
            EditError::UnsavedBuffer { path, .. } => (
                ErrorCode::EditRejected,
                "unsaved_buffer".into(),
                Some(path.clone()),
                Some("save the buffer, then ask again"),
            ),
            EditError::NotRecorded { .. } => (
                ErrorCode::Internal,
                "not_recorded".into(),
                None,
                Some("nothing changed; see the daemon log, then retry"),
            ),
            EditError::NotRestored { .. } => (
                ErrorCode::Internal,
                "not_restored".into(),
                None,
                Some(
                    "restart the daemon (`sparkctl stop`, then any command) to put the files back",
                ),
            ),
        };
        // Every operation is all-or-nothing: a filesystem error reaching the client left the
        // worktree as it was (a failed take-back is `NotRestored`, not this).
        let message = match self {
            EditError::Io { .. } => format!("{self}; nothing was changed"),
            _ => self.to_string(),
        };
        let mut e = RpcError::new(code, message).with_kind(kind);
        if let Some(p) = path {
            e = e.with_path(p);
        }
        if let Some(h) = hint {
            e = e.with_hint(h);
        }
        e
    }
}

/// The wire `kind` and hint of a filesystem error: the faults a user can fix get their own.
fn io_kind(e: &std::io::Error) -> (&'static str, &'static str) {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => (
            "disk_full",
            "the filesystem is full (or a quota is reached): free some space, then retry",
        ),
        ErrorKind::ReadOnlyFilesystem => (
            "read_only_filesystem",
            "the filesystem is mounted read-only: remount it read-write, then retry",
        ),
        ErrorKind::PermissionDenied => (
            "permission_denied",
            "the daemon runs as you: check the permissions of the file and its directory",
        ),
        _ => (
            "io",
            "see the daemon log (`sparkctl status` shows where), then retry",
        ),
    }
}

/// Daemon-wide settings of the engine.
#[derive(Debug, Clone)]
pub(crate) struct EditEnv {
    pub(crate) journal_dir: PathBuf,
    pub(crate) durability: Durability,
    pub(crate) failpoint: Failpoint,
    /// Local history's settings: the engine snapshots files right before it writes them.
    pub(crate) history: crate::history::HistoryEnv,
}

impl EditEnv {
    /// The engine's settings from the daemon's configuration.
    pub(crate) fn from_config(config: &crate::Config) -> Self {
        Self {
            journal_dir: config.layout.state_dir.join("journal"),
            durability: Durability {
                fsync: config.fsync,
            },
            failpoint: Failpoint(config.failpoint.clone()),
            history: crate::history::HistoryEnv::from_config(config),
        }
    }
}

/// One repository as the engine sees it.
pub(crate) struct RepoCtx<'a> {
    pub(crate) repo: &'a Repository,
    pub(crate) workdir: &'a Path,
    pub(crate) env: &'a EditEnv,
    /// The index's tracked paths as the path checks last read them (see `tracked`).
    pub(crate) tracked: &'a tracked::TrackedCache,
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
    /// Unsaved editor buffers (repo-relative path → text): the patch applies to this text in
    /// place of the file's, and the result goes to [`Outcome::buffer_edits`], not to disk.
    pub(crate) buffers: HashMap<String, Vec<u8>>,
}

/// What an apply, undo or stash did.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    /// Short id of the edit (None for a dry run or a no-op).
    pub(crate) edit: Option<String>,
    pub(crate) files: Vec<FileChangeSummary>,
    pub(crate) diff: String,
    /// Each written file's new content (`None` = deleted).
    pub(crate) after: Vec<(String, Option<Vec<u8>>)>,
    /// New text of each unsaved buffer the apply changed (not written, not recorded).
    pub(crate) buffer_edits: Vec<(String, Vec<u8>)>,
}

/// Parse, check and (unless dry-run) apply and record a patch.
pub(crate) fn apply(ctx: &RepoCtx<'_>, req: &ApplyRequest) -> Result<Outcome, EditError> {
    let parsed = patch::parse_any(&req.patch)?;
    let mut targets = paths::Targets::of(ctx);
    let mut writes: Vec<Write1> = Vec::new();
    for op in &parsed.ops {
        match op {
            patch::FileOp::Add { path, lines } => {
                let bytes = matcher::render_new_file(lines);
                let (rel, before) =
                    match resolve(&mut targets, &req.cwd_prefix, path, Intent::Create) {
                        Ok((_, rel)) => (rel, None),
                        Err(EditError::Path(e)) if e.kind() == PathErrorKind::AlreadyExists => {
                            let (rel, current) =
                                add_over_existing(ctx, &mut targets, &req.cwd_prefix, path)?;
                            (rel, Some(current))
                        }
                        Err(e) => return Err(e),
                    };
                if before.is_some() {
                    refuse_buffer(req, rel.as_str(), "replace")?;
                }
                let mode = before.as_ref().map_or(0o100644, |b: &FileState| b.mode);
                writes.push(Write1 {
                    path: rel.as_str().to_owned(),
                    before,
                    after: Some(FileState { bytes, mode }),
                });
            }
            patch::FileOp::Delete { path } => {
                let (_, rel) = resolve(&mut targets, &req.cwd_prefix, path, Intent::Delete)?;
                refuse_buffer(req, rel.as_str(), "delete")?;
                let current = read_text(ctx, &rel)?;
                refuse_lfs_pointer(ctx, &rel, &current)?;
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
                let (written, rel) = resolve(&mut targets, &req.cwd_prefix, path, Intent::Modify)?;
                let mut current = read_text(ctx, &rel)?;
                refuse_lfs_pointer(ctx, &rel, &current)?;
                if let Some(text) = req.buffers.get(rel.as_str()) {
                    if move_to.is_some() {
                        refuse_buffer(req, rel.as_str(), "move")?;
                    }
                    current.bytes = text.clone();
                }
                // The model saw the file under the name it was given, which may go through a
                // symlinked directory.
                let base = req
                    .bases
                    .get(written.as_str())
                    .or_else(|| req.bases.get(rel.as_str()))
                    .unwrap_or(&current.bytes);
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
                        let (_, dest) =
                            resolve(&mut targets, &req.cwd_prefix, dest, Intent::Create)?;
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
    land(
        ctx,
        writes,
        req.dry_run,
        &req.source,
        &req.message,
        &req.buffers,
    )
}

/// Put one file (repo-relative `rel`) in the given state, through the same checks, journal,
/// record and ledger as an apply: `history/restore`, so `edit/undo` reverts it.
pub(crate) fn write_file(
    ctx: &RepoCtx<'_>,
    rel: &RelPath,
    bytes: Vec<u8>,
    mode: u32,
    dry_run: bool,
    source: &str,
    message: &str,
) -> Result<Outcome, EditError> {
    let mut targets = paths::Targets::of(ctx);
    let exists = std::fs::symlink_metadata(ctx.workdir.join(rel.to_path())).is_ok();
    let intent = if exists {
        Intent::Modify
    } else {
        Intent::Create
    };
    let real = targets.check_real(rel, intent)?;
    let before = if exists {
        let current = read_text(ctx, &real)?;
        refuse_lfs_pointer(ctx, &real, &current)?;
        Some(current)
    } else {
        None
    };
    let writes = vec![Write1 {
        path: real.as_str().to_owned(),
        before,
        after: Some(FileState { bytes, mode }),
    }];
    land(ctx, writes, dry_run, source, message, &HashMap::new())
}

/// The common end of an apply: drop no-op writes, refuse filtered files, summarise, and
/// unless a dry run, journal, write, record and ledger. Writes to files in `buffers` (unsaved
/// editor buffers) go back to the editor instead.
fn land(
    ctx: &RepoCtx<'_>,
    mut writes: Vec<Write1>,
    dry_run: bool,
    source: &str,
    message: &str,
    buffers: &HashMap<String, Vec<u8>>,
) -> Result<Outcome, EditError> {
    writes.retain(|w| w.before != w.after);
    for w in &writes {
        if let Some(filter) = record::external_filter(ctx.repo, &w.path)? {
            return Err(EditError::ExternalFilter {
                path: w.path.clone(),
                filter,
            });
        }
    }
    let (files, diff) = summarize(&writes, record::git_abbrev_len(ctx.repo))?;
    if dry_run || writes.is_empty() {
        return Ok(Outcome {
            edit: None,
            files,
            diff,
            after: Vec::new(),
            buffer_edits: Vec::new(),
        });
    }
    // Unsaved buffers go back to the editor: their files on disk stay as the user left them.
    let (buffered, writes): (Vec<Write1>, Vec<Write1>) = writes
        .into_iter()
        .partition(|w| buffers.contains_key(&w.path));
    let buffer_edits: Vec<(String, Vec<u8>)> = buffered
        .into_iter()
        .filter_map(|w| w.after.map(|a| (w.path, a.bytes)))
        .collect();
    if writes.is_empty() {
        return Ok(Outcome {
            edit: None,
            files,
            diff,
            after: Vec::new(),
            buffer_edits,
        });
    }

    // Recording needs this ref; a stale lock would fail it after the files changed.
    refuse_stale_locks(ctx, &[record::EDITS_REF])?;
    let time_ms = now_ms() as i64;
    let operation = Operation::Apply {
        source: source.to_owned(),
        message: message.to_owned(),
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
    let edit = finish_apply(ctx, false, &pending.id, &changes, source, message, time_ms)
        .map_err(|e| take_back(&pending, e))?;
    journal::finish(&pending, &ctx.env.failpoint);
    // The edit has landed and is recorded: an error now would misreport it as failed, and the
    // full id is a valid id too.
    let id = record::edit_short_id(ctx.repo, edit).unwrap_or_else(|_| edit.to_string());
    Ok(Outcome {
        edit: Some(id),
        files,
        diff,
        after: changes
            .into_iter()
            .map(|c| (c.path, c.after.map(|a| a.bytes)))
            .collect(),
        buffer_edits,
    })
}

/// Refuse to `op` (delete, move, replace) a file the editor holds unsaved changes of: only an
/// update can go back to the buffer, and the others would act on bytes the user has not saved.
fn refuse_buffer(req: &ApplyRequest, path: &str, op: &'static str) -> Result<(), EditError> {
    if req.buffers.contains_key(path) {
        return Err(EditError::UnsavedBuffer {
            path: path.to_owned(),
            op,
        });
    }
    Ok(())
}

/// Write `writes` to the worktree all-or-nothing, journalled (see [`journal::commit`]).
fn commit_writes(
    ctx: &RepoCtx<'_>,
    operation: Operation,
    writes: &[Write1],
) -> Result<journal::Pending, EditError> {
    // Every write of every operation passes here: history keeps what is about to be replaced.
    let paths: Vec<String> = writes.iter().map(|w| w.path.clone()).collect();
    crate::history::before_edit(ctx, &paths);
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
    ctx.env.failpoint.fail("record")?;
    let edits_before = ctx.repo.refname_to_id(record::EDITS_REF).ok();
    // Read only when an identical record exists already; unreadable counts as known, which
    // costs nothing but a later timestamp.
    let ledger_ids = std::cell::OnceCell::new();
    let edit = record::record_new_edit(ctx.repo, changes, &meta, |w| {
        ledger_ids
            .get_or_init(|| {
                ledger::summaries(ctx.repo.path())
                    .map(|all| {
                        all.into_iter()
                            .map(|s| s.applied.edit)
                            .collect::<HashSet<String>>()
                    })
                    .ok()
            })
            .as_ref()
            .is_none_or(|ids| ids.contains(&w.to_string()))
    })?;
    ctx.env.failpoint.hit("after_record");
    // From here a failure leaves a record without its ledger line: take the record back too, so
    // the edit is recorded exactly once or not at all.
    let unrecord = |e: EditError| {
        if let Err(u) = unrecord(ctx.repo, edit, edits_before) {
            tracing::error!(error = %u, edit = %edit, "cannot take back the record of a failed edit");
        }
        e
    };
    ctx.env.failpoint.fail("after_record").map_err(unrecord)?;
    let hex = edit.to_string();
    // Recovery may run after the ledger line was written; a live apply always appends (its
    // record has an id no ledger line names yet).
    let known = recovering
        && ledger::summaries(ctx.repo.path())
            .map_err(unrecord)?
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
        )
        .map_err(unrecord)?;
    }
    Ok(edit)
}

/// A step after the files landed failed: put them back (see [`journal::abandon`]) and say so.
fn take_back(pending: &journal::Pending, error: EditError) -> EditError {
    tracing::error!(error = %error, "recording failed after the files were written; taking the edit back");
    match journal::abandon(pending) {
        Ok(()) => EditError::NotRecorded {
            source: Box::new(error),
        },
        Err(restore) => EditError::NotRestored {
            source: Box::new(error),
            restore: Box::new(restore),
        },
    }
}

/// Take back the record of edit `w` whose ledger line could not be written: its pin, and its
/// entry on `refs/spark/edits` (moved back to `before` by compare-and-swap, its reflog entry
/// removed). A ref that moved on since is left alone.
fn unrecord(repo: &Repository, w: Oid, before: Option<Oid>) -> Result<(), git2::Error> {
    take_back_ref(repo, record::EDITS_REF, w, before)?;
    match repo.find_reference(&format!("{}{w}", record::PINS_PREFIX)) {
        Ok(mut pin) => pin.delete(),
        Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Move `name` from `ours` back to `before` and drop the reflog entry that moved it to `ours`,
/// so the ref and its log read as if the update never happened.
fn take_back_ref(
    repo: &Repository,
    name: &str,
    ours: Oid,
    before: Option<Oid>,
) -> Result<(), git2::Error> {
    let mut reference = match repo.find_reference(name) {
        Ok(r) if r.target() == Some(ours) => r,
        Ok(_) => return Ok(()),
        Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let Some(before) = before else {
        // The update created the ref; deleting it deletes its reflog too.
        return reference.delete();
    };
    repo.reference_matching(name, before, true, ours, "spark: take back")?;
    let mut log = repo.reflog(name)?;
    // Newest first: the take-back entry, then the update it takes back.
    if log
        .get(0)
        .is_some_and(|e| e.id_old() == ours && e.id_new() == before)
    {
        log.remove(0, false)?;
        if log.get(0).is_some_and(|e| e.id_new() == ours) {
            log.remove(0, false)?;
        }
        log.write()?;
    }
    Ok(())
}

/// Refuse before anything is written when the lock file of a ref the operation will update
/// exists: libgit2 would fail to update the ref only after the worktree changed.
fn refuse_stale_locks(ctx: &RepoCtx<'_>, refs: &[&str]) -> Result<(), EditError> {
    for name in refs {
        // Shared refs live in the common git directory, also seen from a linked worktree.
        let lock = ctx.repo.commondir().join(format!("{name}.lock"));
        if std::fs::symlink_metadata(&lock).is_ok() {
            let shown = lock.display().to_string();
            return Err(EditError::Locked {
                hint: format!(
                    "if no git command is running in this repository, remove it: rm '{shown}'"
                ),
                lock: shown,
            });
        }
    }
    Ok(())
}

/// Refuse to edit a Git LFS pointer: a file `.gitattributes` routes through `filter=lfs` whose
/// worktree content is still the pointer (git-lfs never smudged it). Editing the pointer text
/// would corrupt the reference to the real content.
fn refuse_lfs_pointer(
    ctx: &RepoCtx<'_>,
    rel: &RelPath,
    state: &FileState,
) -> Result<(), EditError> {
    const LFS_POINTER: &[u8] = b"version https://git-lfs.github.com/spec/v1\n";
    if !state.bytes.starts_with(LFS_POINTER) {
        return Ok(());
    }
    let filter = ctx
        .repo
        .get_attr(
            Path::new(rel.as_str()),
            "filter",
            git2::AttrCheckFlags::default(),
        )
        .map_err(|e| EditError::git("read .gitattributes", e))?;
    if filter == Some("lfs") {
        return Err(EditError::LfsPointer {
            path: rel.as_str().to_owned(),
        });
    }
    Ok(())
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
    // Worktrees share `refs/spark/`, so an id resolves everywhere; reverting another worktree's
    // edit here would change this worktree's files and leave both ledgers wrong.
    if summary.is_none()
        && let Some(worktree) = ledger::other_owner(ctx.repo.commondir(), ctx.repo.path(), &hex)?
    {
        return Err(EditError::OtherWorktree {
            id: short,
            what,
            worktree: worktree.display().to_string(),
        });
    }
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
    let untracked = if stash {
        record::untracked_paths(ctx.repo, oid)?
    } else {
        Vec::new()
    };
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
            // `git stash pop` restores untracked files from the stash's third parent and
            // refuses to overwrite them, so a stash takes them out of the worktree as
            // `git stash -u` does; only the edit's own content can go there.
            (_, after, cur) if untracked.contains(&change.path) => {
                if cur.as_ref().map(|c| &c.bytes) != after.as_ref().map(|a| &a.bytes) {
                    return Err(conflict());
                }
                None
            }
            (_, _, cur)
                if cur.as_ref().map(|c| &c.bytes) == change.after.as_ref().map(|a| &a.bytes) =>
            {
                change.before.clone().map(|mut before| {
                    // The edit left the mode alone (always so under `core.fileMode=false`,
                    // where the record holds git's mode, not the file's): so does its undo.
                    if let (Some(after), Some(cur)) = (&change.after, cur)
                        && after.mode == before.mode
                    {
                        before.mode = cur.mode;
                    }
                    before
                })
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
    if writes.is_empty() {
        return Err(EditError::NothingChanges { id: short, what });
    }
    let (files, diff) = summarize(&writes, record::git_abbrev_len(ctx.repo))?;
    if stash {
        refuse_stale_locks(ctx, &["refs/stash"])?;
    }
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
    )
    .map_err(|e| take_back(&pending, e))?;
    journal::finish(&pending, &ctx.env.failpoint);
    remove_emptied_dirs(ctx, &writes);
    Ok(Outcome {
        edit: Some(short),
        files,
        diff,
        after: writes
            .into_iter()
            .map(|w| (w.path, w.after.map(|a| a.bytes)))
            .collect(),
        buffer_edits: Vec::new(),
    })
}

/// A revert that removed files leaves no empty directories behind them (git removes the
/// directories it empties too): each one, up to the worktree's top, goes if it is empty now.
/// Best effort: the files are already right, and a directory that is not empty stays.
fn remove_emptied_dirs(ctx: &RepoCtx<'_>, writes: &[Write1]) {
    for w in writes
        .iter()
        .filter(|w| w.before.is_some() && w.after.is_none())
    {
        let mut dir = Path::new(&w.path).parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            if std::fs::remove_dir(ctx.workdir.join(d)).is_err() {
                break;
            }
            dir = d.parent();
        }
    }
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
    ctx.env.failpoint.fail("record")?;
    // The stash entry this revert pushed, and what `refs/stash` was before, to take it back if
    // the ledger line cannot be written.
    let mut pushed: Option<Option<Oid>> = None;
    if stash {
        let stash_before = ctx.repo.refname_to_id("refs/stash").ok();
        if stash_before != Some(oid) {
            record::push_stash(ctx.repo, oid, message)?;
            pushed = Some(stash_before);
        }
    }
    let unstash = |e: EditError| {
        if let Some(before) = pushed
            && let Err(u) = take_back_ref(ctx.repo, "refs/stash", oid, before)
        {
            tracing::error!(error = %u, edit = %oid, "cannot take back the stash entry of a failed stash");
        }
        e
    };
    ctx.env.failpoint.fail("after_record").map_err(unstash)?;
    let state = ledger::summaries(ctx.repo.path())
        .map_err(unstash)?
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
        )
        .map_err(unstash)?;
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

/// Whether an edit the ledger calls applied was reverted outside spark (`git checkout -- file`,
/// an editor's undo): every file it touched holds its pre-edit content again, and none its
/// post-edit one. A file changed further since counts as applied, which it still is in part.
/// Cheap enough for every `log` line: the edit's blob ids come from its two trees, and each
/// worktree file is hashed once, never diffed.
pub(crate) fn reverted_outside(ctx: &RepoCtx<'_>, edit: &ledger::Entry) -> Result<bool, EditError> {
    let oid = Oid::from_str(&edit.edit).map_err(|e| EditError::git("read ledger id", e))?;
    let w = ctx
        .repo
        .find_commit(oid)
        .map_err(|e| EditError::git("read edit", e))?;
    let b = w
        .parent(0)
        .map_err(|e| EditError::git("read edit base", e))?;
    let (after, before) = (
        w.tree().map_err(|e| EditError::git("read edit tree", e))?,
        b.tree()
            .map_err(|e| EditError::git("read edit base tree", e))?,
    );
    let blob = |tree: &git2::Tree<'_>, path: &str| {
        tree.get_path(Path::new(path))
            .ok()
            .filter(|e| e.kind() == Some(git2::ObjectType::Blob))
            .map(|e| e.id())
    };
    if edit.files.is_empty() {
        return Ok(false);
    }
    let untracked = record::untracked_trees(ctx.repo, oid)?;
    for path in &edit.files {
        let abs = ctx.workdir.join(path);
        let now = match std::fs::symlink_metadata(&abs) {
            Ok(m) if m.is_file() => {
                let bytes = std::fs::read(&abs).map_err(|e| EditError::io("read", &abs, e))?;
                Some(
                    Oid::hash_object(git2::ObjectType::Blob, &bytes)
                        .map_err(|e| EditError::git("hash worktree file", e))?,
                )
            }
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(EditError::io("stat", &abs, e)),
        };
        let (was, became) = match (blob(&before, path), blob(&after, path), &untracked) {
            (None, None, Some((ub, ua))) => {
                (ub.as_ref().and_then(|t| blob(t, path)), blob(ua, path))
            }
            (was, became, _) => (was, became),
        };
        if now == became || now != was {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Finish or undo what a previous daemon left half-done in `repo`. Returns what it did.
pub(crate) fn recover(
    ctx: &RepoCtx<'_>,
    journal: &journal::Journal,
) -> Result<&'static str, EditError> {
    if ledger::mentions_journal(ctx.repo.path(), &journal.id)? {
        // Finished and in the ledger; only the journal's retirement was lost.
        journal::settle(journal);
        return Ok("already finished");
    }
    if !journal::landed(journal)? {
        journal::rollback(journal)?;
        return Ok("rolled back");
    }
    let finished = match &journal.operation {
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
            finish_apply(ctx, true, &journal.id, &changes, source, message, *time_ms)
        }
        .map(|_| ()),
        Operation::Revert { edit, stash } => Oid::from_str(edit)
            .map_err(|e| EditError::git("read journal id", e))
            .and_then(|oid| finish_revert(ctx, oid, *stash, "", &journal.id, true)),
    };
    match finished {
        Ok(()) => {
            journal::settle(journal);
            Ok("completed")
        }
        // Recording fails the same way at every start: all-before is the settled state.
        Err(e) => {
            tracing::error!(error = %e, "cannot record the interrupted edit; rolling it back");
            journal::rollback(journal)?;
            Ok("rolled back (recording failed)")
        }
    }
}

/// Validate a patch path (relative to the client's cwd) and check its target. Returns the path
/// as written (joined to the cwd) and the real path the write lands on (symlinked directories
/// resolved), under which the edit is written and recorded.
fn resolve(
    targets: &mut paths::Targets<'_>,
    cwd_prefix: &str,
    raw: &str,
    intent: Intent,
) -> Result<(RelPath, RelPath), EditError> {
    // Validate as written first, so the error quotes the path the patch used.
    paths::validate_rel_path(raw)?;
    let joined = if cwd_prefix.is_empty() {
        raw.to_owned()
    } else {
        format!("{cwd_prefix}/{raw}")
    };
    let rel = paths::validate_rel_path(&joined)?;
    let real = targets.check_real(&rel, intent)?;
    Ok((rel, real))
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
    let (_, rel) = resolve(targets, cwd_prefix, raw, Intent::Modify)?;
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
///
/// A UTF-8 byte order mark is merged as a flag, not as part of the first line: glued to it, a
/// change of the first line would look like a change touching the BOM's line too, and a disjoint
/// change next to it would conflict.
fn merge3(base: &[u8], ours: &[u8], theirs: &[u8], path: &str) -> Result<Vec<u8>, EditError> {
    let has_bom = |b: &[u8]| b.starts_with(b"\xEF\xBB\xBF");
    let bom = if has_bom(ours) == has_bom(base) {
        has_bom(theirs)
    } else {
        has_bom(ours)
    };
    let mut a = git2::MergeFileInput::new();
    a.content(strip_bom(base));
    let mut o = git2::MergeFileInput::new();
    o.content(strip_bom(ours));
    let mut t = git2::MergeFileInput::new();
    t.content(strip_bom(theirs));
    let result =
        git2::merge_file(&a, &o, &t, None).map_err(|e| EditError::git("merge file contents", e))?;
    if !result.is_automergeable() {
        return Err(EditError::Conflict {
            path: path.to_owned(),
        });
    }
    let mut merged = Vec::with_capacity(result.content().len() + 3);
    if bom {
        merged.extend_from_slice(b"\xEF\xBB\xBF");
    }
    merged.extend_from_slice(result.content());
    Ok(merged)
}

/// Per-file summaries and the unified diff of the writes (as `git diff` shows them, blob ids
/// abbreviated to `abbrev` digits like `show`'s), from one diff per file.
fn summarize(
    writes: &[Write1],
    abbrev: u16,
) -> Result<(Vec<FileChangeSummary>, String), EditError> {
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
        diff.extend_from_slice(&git_header(w, usize::from(abbrev))?);
        // libgit2 diffs two buffers as a modification; keep its hunks, not its header.
        if let Some(at) = find_hunks(&text) {
            diff.extend_from_slice(&text[at..]);
        }
        let change = match (&w.before, &w.after) {
            (None, _) => wire::FileChange::Added,
            (_, None) => wire::FileChange::Deleted,
            _ => wire::FileChange::Modified,
        };
        files.push(FileChangeSummary {
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
fn git_header(w: &Write1, abbrev_len: usize) -> Result<Vec<u8>, EditError> {
    let none = "0".repeat(abbrev_len);
    let abbrev = |s: &FileState| -> Result<String, EditError> {
        let oid = git2::Oid::hash_object(git2::ObjectType::Blob, &s.bytes)
            .map_err(|e| EditError::git("hash", e))?;
        let mut hex = oid.to_string();
        hex.truncate(abbrev_len);
        Ok(hex)
    };
    let path = &w.path;
    let mut h = format!("diff --git a/{path} b/{path}\n");
    let has_text = |s: &FileState| !s.bytes.is_empty();
    match (&w.before, &w.after) {
        (None, Some(after)) => {
            h += &format!(
                "new file mode {:o}\nindex {none}..{}\n",
                after.mode,
                abbrev(after)?
            );
            if has_text(after) {
                h += &format!("--- /dev/null\n+++ b/{path}\n");
            }
        }
        (Some(before), None) => {
            h += &format!(
                "deleted file mode {:o}\nindex {}..{none}\n",
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
    crate::clock::unix_ms()
}

#[cfg(test)]
mod take_back_tests {
    use super::*;

    fn commit(repo: &Repository, message: &str) -> Oid {
        let sig = git2::Signature::now("t", "t@example.invalid").expect("sig");
        let tree = repo
            .treebuilder(None)
            .and_then(|b| b.write())
            .and_then(|t| repo.find_tree(t))
            .expect("tree");
        repo.commit(None, &sig, &sig, message, &tree, &[])
            .expect("commit")
    }

    #[test]
    fn taking_back_an_update_restores_the_ref_and_its_reflog() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::init(dir.path()).expect("init");
        let name = record::EDITS_REF;
        repo.reference_ensure_log(name).expect("log");
        let (first, second) = (commit(&repo, "one"), commit(&repo, "two"));
        repo.reference(name, first, true, "spark: one")
            .expect("ref");
        repo.reference(name, second, true, "spark: two")
            .expect("ref");
        assert_eq!(repo.reflog(name).expect("reflog").len(), 2);

        take_back_ref(&repo, name, second, Some(first)).expect("take back");
        assert_eq!(repo.refname_to_id(name).expect("ref"), first);
        let log = repo.reflog(name).expect("reflog");
        assert_eq!(log.len(), 1);
        assert_eq!(log.get(0).expect("entry").id_new(), first);

        // A ref that moved on since is someone else's: left alone.
        take_back_ref(&repo, name, second, Some(first)).expect("no-op");
        assert_eq!(repo.refname_to_id(name).expect("ref"), first);

        // The update that created the ref: the ref goes.
        take_back_ref(&repo, name, first, None).expect("take back");
        assert!(repo.find_reference(name).is_err());
    }
}

#[cfg(test)]
mod merge_tests {

    const BOM: &str = "\u{feff}";

    /// `git2::merge_file` does not initialise libgit2 itself; in the daemon a repository was
    /// always opened first.
    fn merge3(
        base: &[u8],
        ours: &[u8],
        theirs: &[u8],
        path: &str,
    ) -> Result<Vec<u8>, super::EditError> {
        drop(git2::Config::new());
        super::merge3(base, ours, theirs, path)
    }

    #[test]
    fn a_first_line_change_next_to_a_disjoint_one_merges_in_a_file_with_a_bom() {
        let base = format!("{BOM}l0\nl1\nl2\n");
        let ours = format!("{BOM}l1\nl2\n");
        let theirs = format!("{BOM}l0\nl1\nX\nl2\n");
        let merged = merge3(base.as_bytes(), ours.as_bytes(), theirs.as_bytes(), "f")
            .expect("disjoint changes merge");
        assert_eq!(
            String::from_utf8_lossy(&merged),
            format!("{BOM}l1\nX\nl2\n")
        );
    }

    #[test]
    fn a_deleted_first_line_next_to_a_disjoint_insertion_merges_as_git_merge_file_does() {
        let merged = merge3(b"l0\nl1\nl2\n", b"l1\nl2\n", b"l0\nl1\nX\nl2\n", "f")
            .expect("git merge-file merges these");
        assert_eq!(merged, b"l1\nX\nl2\n");
    }

    #[test]
    fn the_bom_follows_the_side_that_changed_it() {
        let base = format!("{BOM}a\nb\n");
        let dropped = "a\nb\n";
        let edited = format!("{BOM}a\nB\n");
        let merged =
            merge3(base.as_bytes(), dropped.as_bytes(), edited.as_bytes(), "f").expect("merges");
        assert_eq!(merged, b"a\nB\n");
        let merged =
            merge3(base.as_bytes(), edited.as_bytes(), dropped.as_bytes(), "f").expect("merges");
        assert_eq!(merged, b"a\nB\n");
    }
}

#[cfg(test)]
mod buffer_tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
        journal: tempfile::TempDir,
        repo: Repository,
        env: EditEnv,
    }

    impl Fixture {
        /// A repository with `a.txt` and `b.txt` committed.
        fn new() -> Fixture {
            let dir = tempfile::tempdir().expect("tempdir");
            let journal = tempfile::tempdir().expect("journal dir");
            let repo = Repository::init(dir.path()).expect("init");
            std::fs::write(dir.path().join("a.txt"), "one\ntwo\nthree\n").expect("write a");
            std::fs::write(dir.path().join("b.txt"), "alpha\nbeta\n").expect("write b");
            {
                let mut index = repo.index().expect("index");
                index.add_path(Path::new("a.txt")).expect("add a");
                index.add_path(Path::new("b.txt")).expect("add b");
                index.write().expect("write index");
                let tree = repo
                    .find_tree(index.write_tree().expect("tree"))
                    .expect("find tree");
                let sig = git2::Signature::now("t", "t@example.invalid").expect("sig");
                repo.commit(Some("HEAD"), &sig, &sig, "initial", &tree, &[])
                    .expect("commit");
            }
            let env = EditEnv {
                journal_dir: journal.path().to_path_buf(),
                durability: Durability { fsync: false },
                failpoint: Failpoint(None),
                history: Default::default(),
            };
            Fixture {
                dir,
                journal,
                repo,
                env,
            }
        }

        fn apply(&self, patch: &str, buffers: &[(&str, &str)]) -> Result<Outcome, EditError> {
            let _ = &self.journal;
            let ctx = RepoCtx {
                repo: &self.repo,
                workdir: self.dir.path(),
                env: &self.env,
                tracked: &Default::default(),
            };
            let req = ApplyRequest {
                patch: patch.to_owned(),
                source: "ask".to_owned(),
                buffers: buffers
                    .iter()
                    .map(|(p, t)| ((*p).to_owned(), t.as_bytes().to_vec()))
                    .collect(),
                ..ApplyRequest::default()
            };
            apply(&ctx, &req)
        }

        fn read(&self, rel: &str) -> String {
            std::fs::read_to_string(self.dir.path().join(rel)).expect("read")
        }

        fn ledger_len(&self) -> usize {
            ledger::summaries(self.repo.path()).expect("ledger").len()
        }
    }

    const UPDATE_A: &str =
        "*** Begin Patch\n*** Update File: a.txt\n@@\n one\n-two\n+TWO\n three\n*** End Patch\n";

    /// The same patch applied, stashed and applied again (within one second, as a script or a
    /// retrying client does) is two edits: the log must not fold the stashed one into the new.
    #[test]
    fn reapplying_a_stashed_patch_at_once_records_a_second_edit() {
        let f = Fixture::new();
        let ctx = RepoCtx {
            repo: &f.repo,
            workdir: f.dir.path(),
            env: &f.env,
            tracked: &Default::default(),
        };
        let first = f
            .apply(UPDATE_A, &[])
            .expect("first apply")
            .edit
            .expect("id");
        revert(&ctx, Some(&first), true).expect("stash");
        assert_eq!(f.read("a.txt"), "one\ntwo\nthree\n");
        let second = f
            .apply(UPDATE_A, &[])
            .expect("second apply")
            .edit
            .expect("id");
        assert_ne!(first, second, "a second application has an id of its own");
        let summaries = ledger::summaries(f.repo.path()).expect("ledger");
        // Each id is abbreviated on its own (one whose first seven digits are all decimal is
        // lengthened), so each summary is matched by its own id's prefix.
        let states: Vec<(String, EventKind)> = summaries
            .iter()
            .map(|s| {
                let id = [&first, &second]
                    .into_iter()
                    .find(|id| s.applied.edit.starts_with(id.as_str()))
                    .map_or_else(|| s.applied.edit.clone(), |id| id.clone());
                (id, s.state)
            })
            .collect();
        assert_eq!(
            states,
            [
                (second.clone(), EventKind::Applied),
                (first.clone(), EventKind::Stashed)
            ]
        );
        let stash = f.repo.refname_to_id("refs/stash").expect("stash");
        assert!(
            stash.to_string().starts_with(&first),
            "the stash holds the first"
        );
        assert_eq!(f.repo.reflog("refs/stash").expect("reflog").len(), 1);
        // Undoing the second leaves the stashed first alone.
        revert(&ctx, None, false).expect("undo");
        assert_eq!(f.read("a.txt"), "one\ntwo\nthree\n");
        assert_eq!(f.repo.refname_to_id("refs/stash").expect("stash"), stash);
    }

    #[test]
    fn an_update_to_a_buffer_comes_back_as_text_and_touches_neither_disk_nor_ledger() {
        let f = Fixture::new();
        // The buffer holds typing the file on disk does not have; the patch applies to it.
        let out = f
            .apply(UPDATE_A, &[("a.txt", "zero\none\ntwo\nthree\n")])
            .expect("applies to the buffer");
        assert_eq!(out.edit, None, "nothing was recorded");
        assert_eq!(
            out.buffer_edits,
            vec![("a.txt".to_owned(), b"zero\none\nTWO\nthree\n".to_vec())]
        );
        assert!(out.after.is_empty());
        assert!(out.diff.contains("-two\n+TWO"), "{}", out.diff);
        assert_eq!(
            f.read("a.txt"),
            "one\ntwo\nthree\n",
            "the file is untouched"
        );
        assert_eq!(f.ledger_len(), 0);
        assert!(f.repo.find_reference(record::EDITS_REF).is_err());
    }

    #[test]
    fn a_mixed_edit_records_only_its_disk_part() {
        let f = Fixture::new();
        let patch = "*** Begin Patch\n*** Update File: a.txt\n@@\n one\n-two\n+TWO\n three\n\
                     *** Update File: b.txt\n@@\n alpha\n-beta\n+BETA\n*** End Patch\n";
        let out = f
            .apply(patch, &[("a.txt", "one\ntwo\nthree\nfour\n")])
            .expect("applies");
        let id = out.edit.expect("the disk part is recorded");
        assert_eq!(
            out.buffer_edits,
            vec![("a.txt".to_owned(), b"one\nTWO\nthree\nfour\n".to_vec())]
        );
        assert_eq!(f.read("a.txt"), "one\ntwo\nthree\n");
        assert_eq!(f.read("b.txt"), "alpha\nBETA\n");
        let entries = ledger::summaries(f.repo.path()).expect("ledger");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].applied.files, vec!["b.txt".to_owned()]);
        assert!(entries[0].applied.edit.starts_with(&id));
        let paths: Vec<&str> = out.after.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["b.txt"]);
    }

    #[test]
    fn deleting_moving_or_replacing_a_buffered_file_is_refused_and_nothing_changes() {
        let f = Fixture::new();
        let buffers = [("a.txt", "one\ntwo\nthree\n")];
        for (patch, op) in [
            (
                "*** Begin Patch\n*** Delete File: a.txt\n*** End Patch\n",
                "delete",
            ),
            (
                "*** Begin Patch\n*** Update File: a.txt\n*** Move to: c.txt\n@@\n-one\n+ONE\n*** End Patch\n",
                "move",
            ),
            (
                "*** Begin Patch\n*** Add File: a.txt\n+new\n*** End Patch\n",
                "replace",
            ),
        ] {
            let e = f.apply(patch, &buffers).expect_err(op);
            assert!(
                matches!(&e, EditError::UnsavedBuffer { path, op: o } if path == "a.txt" && *o == op),
                "{e}"
            );
            let rpc = e.to_rpc();
            assert_eq!(rpc.kind(), Some("unsaved_buffer"));
            assert!(rpc.hint().is_some());
        }
        assert_eq!(f.read("a.txt"), "one\ntwo\nthree\n");
        assert!(!f.dir.path().join("c.txt").exists());
        assert_eq!(f.ledger_len(), 0);
    }
}
