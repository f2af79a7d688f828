//! Records an applied edit as a git-stash-shaped commit, so that plain git can show and replay it:
//! `git stash show -p <id>` prints exactly the edit and `git stash apply <id>` re-applies it.
//! A record is three commits: B (HEAD's tree with the edited files in their pre-edit state),
//! I (the "index commit", same tree as B) and W (B's tree with the post-edit states, parents
//! [B, I]). When the edited files were unmodified against HEAD, B is HEAD itself, exactly as
//! `git stash` does it, and only I and W are written. Files the edit changed that were untracked (in
//! neither HEAD nor the index) stay out of B and W and go into a third parent U, as
//! `git stash -u` stores them, so `git stash pop` restores them; U's own parent holds their
//! pre-edit state. Recording only ever writes objects and refs under `refs/spark/` (plus `refs/stash`
//! when asked): HEAD, the branch, the user's index and the worktree are never touched, and no
//! hook or filter program runs, because the edit has already landed on disk and the user's own git state
//! belongs to the user. Blobs get git's built-in conversions (line endings, `ident`) so they are
//! what git itself would store. Every W is pinned under `refs/spark/pins/<hex>` so that neither gc nor
//! reflog expiry can ever drop a recorded edit.

use std::path::Path;
use std::thread;
use std::time::Duration;

use git2::build::TreeUpdateBuilder;
use git2::{
    Commit, DiffFormat, DiffOptions, ErrorCode, FileMode, ObjectType, Oid, Repository, Signature,
    Time, Tree,
};

/// The moving ref whose reflog is the ledger of edits (`git reflog show refs/spark/edits`).
pub(crate) const EDITS_REF: &str = "refs/spark/edits";
/// One ref per edit: reflogs expire, these do not.
pub(crate) const PINS_PREFIX: &str = "refs/spark/pins/";
const STASH_REF: &str = "refs/stash";
/// A compare-and-swap ref update loses only to another writer of the same ref; a handful of
/// retries rides out that race without spinning forever on a stuck lock file.
const REF_UPDATE_ATTEMPTS: u32 = 5;
/// git itself refuses abbreviations shorter than this.
const MIN_ID_LEN: usize = 4;
/// git's abbreviation for small repositories (`FALLBACK_DEFAULT_ABBREV`).
const DEFAULT_ABBREV: u16 = 7;
/// Length of a full SHA-1 object id in hex.
const FULL_ID_LEN: usize = 40;
/// Identity used when the repository has no usable `user.name`/`user.email`: recording must not
/// fail just because the user never configured git.
const FALLBACK_NAME: &str = "spark";
const FALLBACK_EMAIL: &str = "spark@localhost";
const MODE_FILE: u32 = 0o100644;
const MODE_EXECUTABLE: u32 = 0o100755;

/// A file's content and git mode at one side of an edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileState {
    pub(crate) bytes: Vec<u8>,
    /// `0o100644` or `0o100755`; nothing else is an editable file.
    pub(crate) mode: u32,
}

/// One file touched by an edit; `None` on a side means the file is absent there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileChange {
    /// Repo-relative, `/`-separated.
    pub(crate) path: String,
    pub(crate) before: Option<FileState>,
    pub(crate) after: Option<FileState>,
}

/// What the record says about where the edit came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EditMeta {
    /// The prompt or other source of the edit; its first line becomes the summary.
    pub(crate) message: String,
    /// Unix milliseconds; git stores whole seconds.
    pub(crate) time_ms: i64,
}

/// Why recording or reading back an edit failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error("cannot record {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("cannot record {path:?}: mode {mode:o} is not a regular file mode (100644 or 100755)")]
    InvalidMode { path: String, mode: u32 },
    #[error("cannot record {path:?}: it appears more than once in one edit")]
    DuplicatePath { path: String },
    #[error("{id:?} is not an edit id: {reason}")]
    InvalidId { id: String, reason: &'static str },
    #[error("no recorded edit matches {id:?}")]
    UnknownEdit { id: String },
    #[error("edit id {id:?} is ambiguous: {count} recorded edits match; give more digits")]
    AmbiguousEdit { id: String, count: usize },
    #[error("commit {oid} is not a spark edit: {reason}")]
    NotAnEdit { oid: Oid, reason: &'static str },
    #[error("{path:?} in commit {oid} is not a regular file or is not UTF-8 named")]
    UnsupportedEntry { oid: Oid, path: String },
    #[error("cannot update {name}: it is a symbolic ref")]
    SymbolicRef { name: &'static str },
    #[error("cannot update {name}: another writer kept changing it")]
    RefContention { name: &'static str },
    #[error("git failed to {op}: {source}")]
    Git {
        op: &'static str,
        #[source]
        source: git2::Error,
    },
}

/// Attaches the failed operation to a libgit2 error.
trait During<T> {
    fn during(self, op: &'static str) -> Result<T, RecordError>;
}

impl<T> During<T> for Result<T, git2::Error> {
    fn during(self, op: &'static str) -> Result<T, RecordError> {
        self.map_err(|source| RecordError::Git { op, source })
    }
}

/// Records `changes` (already applied to the worktree) as a stash-shaped commit and pins it.
/// Returns W, the commit whose id is the edit id. Identical content recorded within one second
/// yields the same W; [`record_new_edit`] keeps such re-applications apart.
#[cfg(test)]
pub(crate) fn record_edit(
    repo: &Repository,
    changes: &[FileChange],
    meta: &EditMeta,
) -> Result<Oid, RecordError> {
    record_new_edit(repo, changes, meta, |_| false)
}

/// W timestamps tried at most for an edit whose identical twins are all known.
const MAX_TWINS: i64 = 64;

/// [`record_edit`] for an application that must get an id of its own: `known(w)` says whether
/// a pinned W already stands for another application (the ledger names it). The same patch
/// applied, stashed and applied again within one second would otherwise get the stashed
/// edit's id, and the log would show one edit where `git stash list` holds another. W's
/// timestamp then moves on by whole seconds until the id is free, or pinned but unknown: a
/// record whose ledger line a crash lost, which recovery re-records as the same W.
pub(crate) fn record_new_edit(
    repo: &Repository,
    changes: &[FileChange],
    meta: &EditMeta,
    known: impl Fn(Oid) -> bool,
) -> Result<Oid, RecordError> {
    validate(changes)?;

    // HEAD is read once so B, and therefore the whole record, refers to one consistent base even
    // if the user commits while we work.
    let head = head_commit(repo)?;
    let head_tree = head
        .as_ref()
        .map(|h| h.tree().during("read HEAD's tree"))
        .transpose()?;
    // A file that existed before the edit but is in neither HEAD nor the index is untracked:
    // `git stash -u` keeps such files out of W and in a third parent U, and `git stash pop`
    // restores them from there; in W they would make pop fail ("untracked working tree files
    // would be overwritten").
    // On an unborn branch git has no stash at all (`git stash` needs the initial commit), so
    // there every file stays in W, where `git stash show -p` shows it.
    let mut index = repo.index().during("read the index")?;
    // The repository's index object is cached; the user may have staged files since.
    index.read(false).during("read the index")?;
    let kept;
    let changes = if file_mode_ignored(repo) {
        kept = with_git_modes(changes, &index, head_tree.as_ref())?;
        &kept[..]
    } else {
        changes
    };
    let mut tracked = Vec::with_capacity(changes.len());
    let mut untracked = Vec::new();
    for c in changes {
        let in_head = match &head_tree {
            Some(tree) => tree_has(tree, &c.path)?,
            None => true,
        };
        if c.before.is_some()
            && c.after.is_some()
            && c.before != c.after
            && !in_head
            && index.get_path(Path::new(&c.path), 0).is_none()
        {
            untracked.push(c.clone());
        } else {
            tracked.push(c.clone());
        }
    }
    // The two sets land in different trees, where a file that is also a directory would go
    // unnoticed.
    for u in &untracked {
        for t in &tracked {
            let (a, b) = (u.path.as_str(), t.path.as_str());
            if b.strip_prefix(a).is_some_and(|r| r.starts_with('/'))
                || a.strip_prefix(b).is_some_and(|r| r.starts_with('/'))
            {
                return Err(RecordError::InvalidPath {
                    path: u.path.clone(),
                    reason: "a file is also a directory",
                });
            }
        }
    }
    let changes = tracked.as_slice();
    let before = changes.iter().map(|c| (c.path.as_str(), c.before.as_ref()));
    let sig = signature(repo, meta.time_ms)?;
    let summary = summary_line(&meta.message);
    let b = match (&head, &head_tree) {
        (Some(head), Some(tree)) if tree_holds(repo, tree, changes)? => head.clone(),
        _ => {
            let b_tree = match &head_tree {
                Some(tree) => updated_tree(repo, tree, before)?,
                None => tree_from_scratch(repo, before)?,
            };
            let parents: Vec<&Commit<'_>> = head.iter().collect();
            let b_id = repo
                .commit(
                    None,
                    &sig,
                    &sig,
                    &format!("spark base: {summary}\n"),
                    &b_tree,
                    &parents,
                )
                .during("write the base commit")?;
            repo.find_commit(b_id).during("read the base commit")?
        }
    };
    let b_tree = b.tree().during("read the base tree")?;
    let after = changes.iter().map(|c| (c.path.as_str(), c.after.as_ref()));
    let w_tree = updated_tree(repo, &b_tree, after)?;

    // `git stash` insists on an index commit as W's second parent; the edit never staged
    // anything, so it carries B's tree and `git stash apply --index` stays a no-op for the index.
    let i_id = repo
        .commit(
            None,
            &sig,
            &sig,
            &format!("spark index: {summary}\n"),
            &b_tree,
            &[&b],
        )
        .during("write the index commit")?;
    let i = repo.find_commit(i_id).during("read the index commit")?;
    let mut parents = vec![b.clone(), i];
    if !untracked.is_empty() {
        parents.push(untracked_commit(repo, &untracked, &b, &sig, &summary)?);
    }
    let parents: Vec<&Commit<'_>> = parents.iter().collect();
    let mut twin = 0;
    let w_id = loop {
        let w_sig = if twin == 0 {
            sig.clone()
        } else {
            signature(repo, meta.time_ms + twin * 1000)?
        };
        let w_id = repo
            .commit(
                None,
                &w_sig,
                &w_sig,
                &commit_message(&meta.message),
                &w_tree,
                &parents,
            )
            .during("write the edit commit")?;
        let pinned = match repo.find_reference(&format!("{PINS_PREFIX}{w_id}")) {
            Ok(_) => true,
            Err(e) if e.code() == ErrorCode::NotFound => false,
            Err(e) => return Err(e).during("read a pin"),
        };
        twin += 1;
        if !pinned || twin >= MAX_TWINS || !known(w_id) {
            break w_id;
        }
    };

    let log_message = format!("spark: {summary}");
    // Pin before advancing the ledger: once the reflog names an edit, its pin already exists.
    // Forced, because the name already fixes the target (re-recording identical content and
    // time yields the same W).
    repo.reference(&format!("{PINS_PREFIX}{w_id}"), w_id, true, &log_message)
        .during("pin the edit")?;
    update_ref(repo, EDITS_REF, w_id, &log_message)?;
    Ok(w_id)
}

/// U, the untracked-files commit `git stash -u` makes: a tree of just the untracked files in
/// their after state, with the message git writes. git makes U a root commit and reads only its
/// tree; spark gives it one parent holding the same files in their before state, so the record
/// still knows what an undo puts back.
fn untracked_commit<'r>(
    repo: &'r Repository,
    untracked: &[FileChange],
    b: &Commit<'_>,
    sig: &Signature<'_>,
    summary: &str,
) -> Result<Commit<'r>, RecordError> {
    let before = untracked
        .iter()
        .map(|c| (c.path.as_str(), c.before.as_ref()));
    let before_tree = tree_from_scratch(repo, before)?;
    let p_id = repo
        .commit(
            None,
            sig,
            sig,
            &format!("spark untracked base: {summary}\n"),
            &before_tree,
            &[],
        )
        .during("write the untracked base commit")?;
    let p = repo
        .find_commit(p_id)
        .during("read the untracked base commit")?;
    let after = untracked
        .iter()
        .map(|c| (c.path.as_str(), c.after.as_ref()));
    let u_tree = tree_from_scratch(repo, after)?;
    let short = b
        .as_object()
        .short_id()
        .during("abbreviate the base id")?
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let subject = summary_line(b.summary().ok().flatten().unwrap_or_default());
    let message = format!(
        "untracked files on {}: {short} {subject}\n",
        head_branch(repo)?
    );
    let u_id = repo
        .commit(None, sig, sig, &message, &u_tree, &[&p])
        .during("write the untracked files commit")?;
    repo.find_commit(u_id)
        .during("read the untracked files commit")
}

/// The before and after trees of the files an edit keeps in its untracked-files parent (see
/// [`untracked_commit`]), if it has one. A U that git made (a root commit) has no before tree.
pub(crate) fn untracked_trees(
    repo: &Repository,
    edit: Oid,
) -> Result<Option<(Option<Tree<'_>>, Tree<'_>)>, RecordError> {
    edit_trees(repo, edit)?;
    let w = repo.find_commit(edit).during("read the edit commit")?;
    if w.parent_count() < 3 {
        return Ok(None);
    }
    let u = w.parent(2).during("read the untracked files commit")?;
    let before = match u.parent_count() {
        0 => None,
        _ => Some(
            u.parent(0)
                .during("read the untracked base commit")?
                .tree()
                .during("read the untracked base tree")?,
        ),
    };
    Ok(Some((before, u.tree().during("read the untracked tree")?)))
}

/// Paths an edit keeps in its untracked-files parent: `git stash pop` restores them from there,
/// so a stash takes them out of the worktree as `git stash -u` does.
pub(crate) fn untracked_paths(repo: &Repository, edit: Oid) -> Result<Vec<String>, RecordError> {
    Ok(untracked_changes(repo, edit)?
        .into_iter()
        .map(|c| c.path)
        .collect())
}

fn untracked_changes(repo: &Repository, edit: Oid) -> Result<Vec<FileChange>, RecordError> {
    let Some((before, after)) = untracked_trees(repo, edit)? else {
        return Ok(Vec::new());
    };
    let diff = repo
        .diff_tree_to_tree(before.as_ref(), Some(&after), None)
        .during("diff the untracked files")?;
    deltas_to_changes(repo, edit, &diff, before.as_ref(), &after)
}

fn deltas_to_changes(
    repo: &Repository,
    edit: Oid,
    diff: &git2::Diff<'_>,
    before: Option<&Tree<'_>>,
    after: &Tree<'_>,
) -> Result<Vec<FileChange>, RecordError> {
    let mut changes = Vec::with_capacity(diff.deltas().len());
    for delta in diff.deltas() {
        let path = delta
            .new_file()
            .path()
            .or_else(|| delta.old_file().path())
            .and_then(Path::to_str)
            .ok_or_else(|| RecordError::UnsupportedEntry {
                oid: edit,
                path: String::from_utf8_lossy(delta.new_file().path_bytes().unwrap_or_default())
                    .into_owned(),
            })?;
        changes.push(FileChange {
            path: path.to_owned(),
            before: match before {
                Some(tree) => file_state(repo, tree, path, edit)?,
                None => None,
            },
            after: file_state(repo, after, path, edit)?,
        });
    }
    Ok(changes)
}

/// Reads back each changed file's before (from B) and after (from W) state. Files the edit
/// left byte- and mode-identical do not appear.
pub(crate) fn edit_changes(repo: &Repository, edit: Oid) -> Result<Vec<FileChange>, RecordError> {
    let (b_tree, w_tree) = edit_trees(repo, edit)?;
    let diff = repo
        .diff_tree_to_tree(Some(&b_tree), Some(&w_tree), None)
        .during("diff the edit")?;
    let mut changes = deltas_to_changes(repo, edit, &diff, Some(&b_tree), &w_tree)?;
    let untracked = untracked_changes(repo, edit)?;
    if !untracked.is_empty() {
        changes.extend(untracked);
        changes.sort_by(|a, b| a.path.cmp(&b.path));
    }
    Ok(changes)
}

/// The edit as a unified diff, byte for byte what `git stash show -p <id>` prints with git's
/// default diff settings.
pub(crate) fn edit_patch_bytes(repo: &Repository, edit: Oid) -> Result<Vec<u8>, RecordError> {
    let (b_tree, w_tree) = edit_trees(repo, edit)?;
    let mut out = Vec::new();
    patch_between(repo, Some(&b_tree), &w_tree, &mut out)?;
    // Untracked files are not part of what `git stash show -p` prints; the edit to them follows,
    // so the patch still shows every change the edit made.
    if let Some((before, after)) = untracked_trees(repo, edit)? {
        patch_between(repo, before.as_ref(), &after, &mut out)?;
    }
    Ok(out)
}

fn patch_between(
    repo: &Repository,
    old: Option<&Tree<'_>>,
    new: &Tree<'_>,
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    let mut options = DiffOptions::new();
    // git has defaulted to the indent heuristic since 2.14; libgit2 has not.
    options.indent_heuristic(true);
    options.id_abbrev(git_abbrev_len(repo));
    let mut diff = repo
        .diff_tree_to_tree(old, Some(new), Some(&mut options))
        .during("diff the edit")?;
    // With no options libgit2 follows `diff.renames` (default: detect renames), as git does.
    diff.find_similar(None).during("detect renames")?;
    diff.print(DiffFormat::Patch, |delta, _, line| {
        if line.origin() == 'F' {
            file_header(&delta, line.content(), out);
            return true;
        }
        // libgit2 hands over the origin of content lines separately from their text.
        match line.origin() {
            '+' => out.push(b'+'),
            '-' => out.push(b'-'),
            ' ' => out.push(b' '),
            _ => {}
        }
        out.extend_from_slice(line.content());
        true
    })
    .during("format the edit as a patch")?;
    Ok(())
}

/// A file's header lines as git prints them: git ends the `---`/`+++` line of a path that holds
/// a space with a tab (so `patch` can tell where the name ends), libgit2 does not.
fn file_header(delta: &git2::DiffDelta<'_>, header: &[u8], out: &mut Vec<u8>) {
    let spaced = |file: git2::DiffFile<'_>| file.path_bytes().is_some_and(|p| p.contains(&b' '));
    let (old_spaced, new_spaced) = (spaced(delta.old_file()), spaced(delta.new_file()));
    for line in header.split_inclusive(|&b| b == b'\n') {
        let tab = match line {
            l if l.starts_with(b"--- /dev/null") || l.starts_with(b"+++ /dev/null") => false,
            l if l.starts_with(b"--- ") => old_spaced,
            l if l.starts_with(b"+++ ") => new_spaced,
            _ => false,
        };
        match line.strip_suffix(b"\n") {
            Some(text) if tab => {
                out.extend_from_slice(text);
                out.extend_from_slice(b"\t\n");
            }
            _ => out.extend_from_slice(line),
        }
    }
}

/// The length git abbreviates the `index` line's blob ids to: `core.abbrev`, or by default one
/// that grows with the number of packed objects (git's `find_unique_abbrev` heuristic), where
/// libgit2 would always print 7 digits.
pub(crate) fn git_abbrev_len(repo: &Repository) -> u16 {
    let configured = repo
        .config()
        .and_then(|config| config.get_string("core.abbrev"));
    if let Ok(value) = configured {
        let value = value.trim().to_ascii_lowercase();
        if matches!(value.as_str(), "false" | "no" | "off" | "") {
            return FULL_ID_LEN as u16;
        }
        if let Ok(len) = value.parse::<u16>()
            && (MIN_ID_LEN as u16..=FULL_ID_LEN as u16).contains(&len)
        {
            return len;
        }
        // "auto" and values git itself would reject fall through to the default.
    }
    let count = packed_object_count(repo);
    // git: one hex digit per 4 bits of the highest set bit of the count, plus one bit.
    let bits = count.checked_ilog2().unwrap_or(0) + 1;
    u16::try_from(bits.div_ceil(2)).map_or(DEFAULT_ABBREV, |len| len.max(DEFAULT_ABBREV))
}

/// The number of objects in the repository's packs, read from each pack index's fan-out table
/// as git's `approximate_object_count` does (loose objects are not counted, by git either).
fn packed_object_count(repo: &Repository) -> u64 {
    let Ok(dir) = std::fs::read_dir(repo.commondir().join("objects").join("pack")) else {
        return 0;
    };
    let mut count = 0;
    for entry in dir.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "idx") {
            count += pack_index_object_count(&path).unwrap_or(0);
        }
    }
    count
}

fn pack_index_object_count(path: &Path) -> Option<u64> {
    use std::io::Read;
    // v2 indexes start with a magic and version, v1 indexes with the fan-out table itself; the
    // fan-out's last (256th) entry is the object count.
    const V2_MAGIC: [u8; 4] = [0xff, b't', b'O', b'c'];
    const FANOUT_LEN: usize = 256 * 4;
    let mut header = vec![0u8; 8 + FANOUT_LEN];
    let mut file = std::fs::File::open(path).ok()?;
    file.read_exact(&mut header).ok()?;
    let fanout_start = if header[..4] == V2_MAGIC { 8 } else { 0 };
    let last = fanout_start + FANOUT_LEN - 4;
    let bytes: [u8; 4] = header.get(last..last + 4)?.try_into().ok()?;
    Some(u64::from(u32::from_be_bytes(bytes)))
}

/// [`edit_patch_bytes`] for display; bytes that are not UTF-8 (text in a legacy encoding) are
/// replaced, which is why anything that re-applies the patch must use the bytes instead.
pub(crate) fn edit_patch(repo: &Repository, edit: Oid) -> Result<String, RecordError> {
    let bytes = edit_patch_bytes(repo, edit)?;
    Ok(match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
    })
}

/// The id to show users for an edit: git's unique abbreviation, lengthened until it contains a
/// hex letter, because `git stash show/apply` read an all-digit argument as `stash@{<n>}`
/// (about 1 in 27 seven-digit abbreviations).
pub(crate) fn edit_short_id(repo: &Repository, edit: Oid) -> Result<String, RecordError> {
    let object = repo
        .find_object(edit, None)
        .during("read the edit commit")?;
    let short = object.short_id().during("abbreviate the edit id")?;
    let full = edit.to_string();
    let mut len = short.len().clamp(MIN_ID_LEN, full.len());
    while len < full.len() && full[..len].bytes().all(|b| b.is_ascii_digit()) {
        len += 1;
    }
    Ok(full[..len].to_owned())
}

/// Resolves an (abbreviated) hex id to a pinned edit. Only pins are searched, so an id can never
/// name some unrelated commit that happens to share the prefix.
pub(crate) fn resolve_edit(repo: &Repository, id: &str) -> Result<Oid, RecordError> {
    let invalid = |reason| RecordError::InvalidId {
        id: id.to_owned(),
        reason,
    };
    let prefix = id.trim().to_ascii_lowercase();
    if prefix.len() < MIN_ID_LEN {
        return Err(invalid("give at least 4 hex digits"));
    }
    if prefix.len() > FULL_ID_LEN {
        return Err(invalid("longer than a full object id"));
    }
    if !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid("not hexadecimal"));
    }

    // The prefix is pure hex, so it cannot smuggle glob syntax into the pattern.
    let refs = repo
        .references_glob(&format!("{PINS_PREFIX}{prefix}*"))
        .during("list pinned edits")?;
    let mut found: Vec<Oid> = Vec::new();
    for reference in refs {
        let reference = reference.during("read a pinned edit")?;
        if let Some(target) = reference.target()
            && !found.contains(&target)
        {
            found.push(target);
        }
    }
    match found.as_slice() {
        [] => Err(RecordError::UnknownEdit { id: id.to_owned() }),
        [oid] => {
            edit_trees(repo, *oid)?;
            Ok(*oid)
        }
        many => Err(RecordError::AmbiguousEdit {
            id: id.to_owned(),
            count: many.len(),
        }),
    }
}

/// Puts edit W on top of `refs/stash`, so `git stash list` shows it and `git stash pop` replays
/// it; the user's index and worktree stay as they are.
pub(crate) fn push_stash(repo: &Repository, edit: Oid, message: &str) -> Result<(), RecordError> {
    edit_trees(repo, edit)?;
    let branch = head_branch(repo)?;
    // The "On <branch>: " prefix is what `git stash push -m` writes; tools parse it.
    let log_message = format!("On {branch}: spark: {}", summary_line(message));
    update_ref(repo, STASH_REF, edit, &log_message)
}

/// Rejects what would make a broken or surprising tree, before any object is written.
fn validate(changes: &[FileChange]) -> Result<(), RecordError> {
    let mut seen = std::collections::HashSet::with_capacity(changes.len());
    for change in changes {
        let path = &change.path;
        let invalid = |reason| RecordError::InvalidPath {
            path: path.clone(),
            reason,
        };
        if path.is_empty() {
            return Err(invalid("empty path"));
        }
        if path.contains('\0') {
            return Err(invalid("path contains NUL"));
        }
        for component in path.split('/') {
            match component {
                "" => return Err(invalid("path has an empty component or a leading '/'")),
                "." | ".." => return Err(invalid("path has a '.' or '..' component")),
                c if c.eq_ignore_ascii_case(".git") => {
                    return Err(invalid("path is inside .git"));
                }
                _ => {}
            }
        }
        for state in [&change.before, &change.after].into_iter().flatten() {
            file_mode(path, state.mode)?;
        }
        if !seen.insert(path.as_str()) {
            return Err(RecordError::DuplicatePath { path: path.clone() });
        }
    }
    Ok(())
}

/// `core.fileMode=false`: git ignores the worktree's executable bit (filesystems that do not
/// keep it, or a team's choice).
fn file_mode_ignored(repo: &Repository) -> bool {
    repo.config()
        .and_then(|c| c.get_bool("core.filemode"))
        .is_ok_and(|on| !on)
}

/// The changes with the modes git would record when it ignores the executable bit: the mode the
/// index has for the path, else HEAD's, else 100644 for a new file.
fn with_git_modes(
    changes: &[FileChange],
    index: &git2::Index,
    head_tree: Option<&Tree<'_>>,
) -> Result<Vec<FileChange>, RecordError> {
    changes
        .iter()
        .map(|c| {
            let known = match index.get_path(Path::new(&c.path), 0) {
                Some(entry) => Some(entry.mode),
                None => match head_tree.map(|t| t.get_path(Path::new(&c.path))) {
                    Some(Ok(entry)) => u32::try_from(entry.filemode()).ok(),
                    Some(Err(e)) if e.code() != ErrorCode::NotFound => {
                        return Err(RecordError::Git {
                            op: "look up a path in HEAD",
                            source: e,
                        });
                    }
                    _ => None,
                },
            };
            let mode = known
                .filter(|m| matches!(*m, MODE_FILE | MODE_EXECUTABLE))
                .unwrap_or(MODE_FILE);
            let keep = |s: &Option<FileState>| {
                s.as_ref().map(|s| FileState {
                    bytes: s.bytes.clone(),
                    mode,
                })
            };
            Ok(FileChange {
                path: c.path.clone(),
                before: keep(&c.before),
                after: keep(&c.after),
            })
        })
        .collect()
}

fn file_mode(path: &str, mode: u32) -> Result<FileMode, RecordError> {
    match mode {
        MODE_FILE => Ok(FileMode::Blob),
        MODE_EXECUTABLE => Ok(FileMode::BlobExecutable),
        _ => Err(RecordError::InvalidMode {
            path: path.to_owned(),
            mode,
        }),
    }
}

/// HEAD's commit, or `None` on an unborn branch. A detached HEAD is just a commit here.
fn head_commit(repo: &Repository) -> Result<Option<Commit<'_>>, RecordError> {
    match repo.head() {
        Ok(head) => head.peel_to_commit().map(Some).during("read HEAD's commit"),
        Err(err) if err.code() == ErrorCode::UnbornBranch => Ok(None),
        Err(err) => Err(RecordError::Git {
            op: "read HEAD",
            source: err,
        }),
    }
}

/// The branch name `git stash` would print: the short name HEAD points at (even if unborn), or
/// `(no branch)` when detached.
fn head_branch(repo: &Repository) -> Result<String, RecordError> {
    let head = repo.find_reference("HEAD").during("read HEAD")?;
    Ok(match head.symbolic_target_bytes() {
        Some(target) => {
            let target = String::from_utf8_lossy(target);
            target
                .strip_prefix("refs/heads/")
                .unwrap_or(&target)
                .to_owned()
        }
        None => "(no branch)".to_owned(),
    })
}

/// The tree of just the present files, for an unborn branch. Built level by level instead of
/// updating a written empty tree, which would otherwise be left dangling in the object store.
fn tree_from_scratch<'r, 'a>(
    repo: &'r Repository,
    states: impl Iterator<Item = (&'a str, Option<&'a FileState>)>,
) -> Result<Tree<'r>, RecordError> {
    let mut files = Vec::new();
    for (path, state) in states {
        if let Some(state) = state {
            let blob = store_clean_blob(repo, path, &state.bytes)?;
            files.push((path, path, blob, file_mode(path, state.mode)?));
        }
    }
    let id = write_tree_level(repo, &files)?;
    repo.find_tree(id).during("read a built tree")
}

/// Writes one directory level; each entry is (full path, path below this level, blob, mode).
fn write_tree_level(
    repo: &Repository,
    files: &[(&str, &str, Oid, FileMode)],
) -> Result<Oid, RecordError> {
    let mut builder = repo.treebuilder(None).during("start a tree")?;
    let mut subdirs: std::collections::BTreeMap<&str, Vec<_>> = std::collections::BTreeMap::new();
    for &(full, rest, blob, mode) in files {
        match rest.split_once('/') {
            None => {
                builder
                    .insert(rest, blob, i32::from(mode))
                    .during("add a tree entry")?;
            }
            Some((dir, below)) => subdirs
                .entry(dir)
                .or_default()
                .push((full, below, blob, mode)),
        }
    }
    for (dir, entries) in subdirs {
        // A tree builder silently replaces an entry of the same name; refuse instead of
        // dropping a file.
        if builder.get(dir).during("look up a tree entry")?.is_some() {
            let path = entries.first().map_or(dir, |entry| entry.0).to_owned();
            return Err(RecordError::InvalidPath {
                path,
                reason: "a file is also a directory",
            });
        }
        let id = write_tree_level(repo, &entries)?;
        builder
            .insert(dir, id, i32::from(FileMode::Tree))
            .during("add a tree entry")?;
    }
    builder.write().during("write a tree")
}

/// `base` with each path set to its state, or removed where the state is `None`. Built with
/// `TreeUpdateBuilder` rather than an `Index` so the user's index is never involved.
fn updated_tree<'r, 'a>(
    repo: &'r Repository,
    base: &Tree<'_>,
    states: impl Iterator<Item = (&'a str, Option<&'a FileState>)>,
) -> Result<Tree<'r>, RecordError> {
    let mut update = TreeUpdateBuilder::new();
    for (path, state) in states {
        match state {
            Some(state) => {
                let blob = store_clean_blob(repo, path, &state.bytes)?;
                update.upsert(path, blob, file_mode(path, state.mode)?);
            }
            None => {
                // libgit2 fails the whole update when removing a path that is not there, and an
                // absent-before file of an added path is exactly that.
                if tree_has(base, path)? {
                    update.remove(path);
                }
            }
        }
    }
    let id = update.create_updated(repo, base).during("build a tree")?;
    repo.find_tree(id).during("read a built tree")
}

/// Whether `tree` already holds every change's before state (content and mode; absent where the
/// file did not exist), so HEAD can serve as the base commit.
fn tree_holds(
    repo: &Repository,
    tree: &Tree<'_>,
    changes: &[FileChange],
) -> Result<bool, RecordError> {
    for c in changes {
        let entry = match tree.get_path(Path::new(&c.path)) {
            Ok(entry) => Some(entry),
            Err(err) if err.code() == ErrorCode::NotFound => None,
            Err(err) => {
                return Err(RecordError::Git {
                    op: "read a tree entry",
                    source: err,
                });
            }
        };
        let same = match (&c.before, entry) {
            (None, None) => true,
            (Some(state), Some(entry)) => {
                entry.filemode() == i32::from(file_mode(&c.path, state.mode)?)
                    && entry.id() == clean_blob_id(repo, &c.path, &state.bytes)?
            }
            _ => false,
        };
        if !same {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What git stores for worktree content `bytes` at `path`: the content after the repository's
/// built-in conversions (`text`/`eol`/`crlf` attributes, `core.autocrlf`, `ident`), which
/// libgit2 applies when the blob is written with the path as a hint. External filter programs
/// never run here (a file routed through one is refused before the edit, see
/// [`external_filter`]).
fn store_clean_blob(repo: &Repository, path: &str, bytes: &[u8]) -> Result<Oid, RecordError> {
    if line_endings(repo, path)? == LineEndings::AsIs && !has_ident(repo, path)? {
        return store_blob(repo, bytes);
    }
    let mut writer = repo
        .blob_writer(Some(Path::new(path)))
        .during("start a filtered blob")?;
    std::io::Write::write_all(&mut writer, bytes).map_err(|e| RecordError::Git {
        op: "write a filtered blob",
        source: git2::Error::from_str(&e.to_string()),
    })?;
    writer.commit().during("write a filtered blob")
}

/// The id of what [`store_clean_blob`] would store, writing only when a conversion applies.
fn clean_blob_id(repo: &Repository, path: &str, bytes: &[u8]) -> Result<Oid, RecordError> {
    if line_endings(repo, path)? == LineEndings::AsIs && !has_ident(repo, path)? {
        return Oid::hash_object(ObjectType::Blob, bytes).during("hash a blob");
    }
    store_clean_blob(repo, path, bytes)
}

fn has_ident(repo: &Repository, path: &str) -> Result<bool, RecordError> {
    let v = repo
        .get_attr(Path::new(path), "ident", git2::AttrCheckFlags::default())
        .during("read .gitattributes")?;
    Ok(git2::AttrValue::from_string(v) == git2::AttrValue::True)
}

/// How a file's line endings differ between its blob and the worktree, by git's rules
/// (`gitattributes(5)`, "End-of-line conversion").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineEndings {
    /// No conversion, or only CRLF to LF on the way in (`eol=lf`, `core.autocrlf=input`): the
    /// blob reads back as is.
    AsIs,
    /// `text` with CRLF in the worktree: every LF of the blob is CRLF in the worktree.
    Crlf,
    /// `text=auto` (or `core.autocrlf=true`) with CRLF in the worktree: as `Crlf`, unless the
    /// blob holds a CR or NUL already (git leaves such files alone).
    AutoCrlf,
}

pub(crate) fn line_endings(repo: &Repository, path: &str) -> Result<LineEndings, RecordError> {
    use git2::AttrValue;
    let attr = |name: &str| -> Result<AttrValue<'static>, RecordError> {
        let v = repo
            .get_attr(Path::new(path), name, git2::AttrCheckFlags::default())
            .during("read .gitattributes")?;
        Ok(match AttrValue::from_string(v) {
            AttrValue::True => AttrValue::True,
            AttrValue::False => AttrValue::False,
            AttrValue::String("auto") => AttrValue::String("auto"),
            AttrValue::String("crlf") => AttrValue::String("crlf"),
            AttrValue::String("lf") => AttrValue::String("lf"),
            AttrValue::String("input") => AttrValue::String("input"),
            _ => AttrValue::Unspecified,
        })
    };
    let config = repo.config().during("read the configuration")?;
    let autocrlf = config
        .get_string("core.autocrlf")
        .map(|v| v.to_ascii_lowercase())
        .unwrap_or_default();
    let autocrlf = match autocrlf.as_str() {
        "true" | "yes" | "on" | "1" => "true",
        "input" => "input",
        _ => "false",
    };
    let core_eol = config
        .get_string("core.eol")
        .map(|v| v.to_ascii_lowercase())
        .unwrap_or_default();
    // With `text` set and no `eol`, the worktree gets core.autocrlf's or core.eol's ending.
    let text_eol_crlf = match autocrlf {
        "true" => true,
        "input" => false,
        _ => core_eol == "crlf",
    };
    let mut text = attr("text")?;
    if text == AttrValue::Unspecified {
        // The legacy `crlf` attribute: `crlf` is `text`, `-crlf` is `-text`, `crlf=input` is
        // `eol=lf`.
        text = attr("crlf")?;
    }
    let eol = attr("eol")?;
    Ok(match (text, eol) {
        (AttrValue::False, _) => LineEndings::AsIs,
        (AttrValue::String("input"), _) => LineEndings::AsIs,
        (AttrValue::String("auto"), AttrValue::String("crlf")) => LineEndings::AutoCrlf,
        (AttrValue::String("auto"), AttrValue::String("lf")) => LineEndings::AsIs,
        (AttrValue::String("auto"), _) if text_eol_crlf => LineEndings::AutoCrlf,
        (AttrValue::String("auto"), _) => LineEndings::AsIs,
        (_, AttrValue::String("crlf")) => LineEndings::Crlf,
        (_, AttrValue::String("lf")) => LineEndings::AsIs,
        (AttrValue::True, _) if text_eol_crlf => LineEndings::Crlf,
        (AttrValue::True, _) => LineEndings::AsIs,
        _ if autocrlf == "true" => LineEndings::AutoCrlf,
        _ => LineEndings::AsIs,
    })
}

/// A blob's content as git checks it out, for the line-ending conversion `rule`.
fn smudge(rule: LineEndings, blob: &[u8]) -> Vec<u8> {
    let convert = match rule {
        LineEndings::AsIs => false,
        LineEndings::Crlf => true,
        LineEndings::AutoCrlf => !blob.iter().any(|&b| b == b'\r' || b == 0),
    };
    if !convert {
        return blob.to_vec();
    }
    let mut out = Vec::with_capacity(blob.len() + blob.len() / 16);
    let mut prev = 0u8;
    for &b in blob {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

/// The external filter driver (`filter=<name>` with `filter.<name>.clean` or `.process`
/// configured) that git would run on `path`, other than Git LFS (whose pointers are refused on
/// their own). spark never runs filter programs, so it cannot record what git would store.
pub(crate) fn external_filter(
    repo: &Repository,
    path: &str,
) -> Result<Option<String>, RecordError> {
    let name = repo
        .get_attr(Path::new(path), "filter", git2::AttrCheckFlags::default())
        .during("read .gitattributes")?;
    let Some(name) = name.filter(|n| *n != "lfs") else {
        return Ok(None);
    };
    let config = repo.config().during("read the configuration")?;
    let configured = ["clean", "process"]
        .iter()
        .any(|key| config.get_string(&format!("filter.{name}.{key}")).is_ok());
    Ok(configured.then(|| name.to_owned()))
}

/// Store `bytes` as a blob unless the object database has it already: an existing object is
/// found by a lookup instead of being written to a temp file that is then thrown away.
pub(crate) fn store_blob(repo: &Repository, bytes: &[u8]) -> Result<Oid, RecordError> {
    let oid = Oid::hash_object(ObjectType::Blob, bytes).during("hash a blob")?;
    let odb = repo.odb().during("open the object database")?;
    if odb.exists(oid) {
        return Ok(oid);
    }
    odb.write(ObjectType::Blob, bytes).during("write a blob")
}

fn tree_has(tree: &Tree<'_>, path: &str) -> Result<bool, RecordError> {
    match tree.get_path(Path::new(path)) {
        Ok(_) => Ok(true),
        Err(err) if err.code() == ErrorCode::NotFound => Ok(false),
        Err(err) => Err(RecordError::Git {
            op: "look up a path in a tree",
            source: err,
        }),
    }
}

/// B's and W's trees, after checking that `edit` has the stash shape.
fn edit_trees(repo: &Repository, edit: Oid) -> Result<(Tree<'_>, Tree<'_>), RecordError> {
    let w = match repo.find_commit(edit) {
        Ok(commit) => commit,
        Err(err) if err.code() == ErrorCode::NotFound => {
            return Err(RecordError::NotAnEdit {
                oid: edit,
                reason: "no such commit",
            });
        }
        Err(err) => {
            return Err(RecordError::Git {
                op: "read the edit commit",
                source: err,
            });
        }
    };
    // The third parent, when there is one, holds the untracked files (`git stash -u`).
    if !(2..=3).contains(&w.parent_count()) {
        return Err(RecordError::NotAnEdit {
            oid: edit,
            reason: "not shaped like a stash",
        });
    }
    let b = w.parent(0).during("read the edit's base commit")?;
    Ok((
        b.tree().during("read the base tree")?,
        w.tree().during("read the edit tree")?,
    ))
}

fn file_state(
    repo: &Repository,
    tree: &Tree<'_>,
    path: &str,
    edit: Oid,
) -> Result<Option<FileState>, RecordError> {
    let entry = match tree.get_path(Path::new(path)) {
        Ok(entry) => entry,
        Err(err) if err.code() == ErrorCode::NotFound => return Ok(None),
        Err(err) => {
            return Err(RecordError::Git {
                op: "look up a path in a tree",
                source: err,
            });
        }
    };
    let mode = u32::try_from(entry.filemode()).unwrap_or(0);
    if entry.kind() != Some(ObjectType::Blob) || !matches!(mode, MODE_FILE | MODE_EXECUTABLE) {
        return Err(RecordError::UnsupportedEntry {
            oid: edit,
            path: path.to_owned(),
        });
    }
    let blob = repo.find_blob(entry.id()).during("read a blob")?;
    Ok(Some(FileState {
        bytes: smudge(line_endings(repo, path)?, blob.content()),
        mode,
    }))
}

/// The configured identity at the edit's time, or spark's own when none is usable.
fn signature(repo: &Repository, time_ms: i64) -> Result<Signature<'static>, RecordError> {
    let seconds = time_ms.div_euclid(1000);
    if let Ok(configured) = repo.signature()
        && let (Ok(name), Ok(email)) = (configured.name(), configured.email())
    {
        // The configured signature is stamped "now" in the local zone; keep that zone so
        // `git log` shows the edit in the user's local time.
        let time = Time::new(seconds, configured.when().offset_minutes());
        if let Ok(signature) = Signature::new(name, email, &time) {
            return Ok(signature);
        }
    }
    Signature::new(FALLBACK_NAME, FALLBACK_EMAIL, &Time::new(seconds, 0))
        .during("build the fallback signature")
}

/// The first non-blank line, flattened to one printable line: reflogs hold a single line and a
/// stray control character would garble `git stash list`.
fn summary_line(message: &str) -> String {
    let first = message.lines().map(str::trim).find(|line| !line.is_empty());
    match first {
        Some(line) => line
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
        None => "(no message)".to_owned(),
    }
}

/// `spark: <summary>`, plus the whole prompt as the body when it has more than one line, so no
/// part of a long prompt is lost.
fn commit_message(message: &str) -> String {
    let summary = summary_line(message);
    let whole = message.trim();
    if whole.contains('\n') {
        format!("spark: {summary}\n\n{whole}\n")
    } else {
        format!("spark: {summary}\n")
    }
}

/// Points `name` at `new` with a reflog entry, by compare-and-swap so a concurrent writer (a
/// user's `git stash`, another daemon thread) is never silently overwritten.
fn update_ref(
    repo: &Repository,
    name: &'static str,
    new: Oid,
    log_message: &str,
) -> Result<(), RecordError> {
    // libgit2 only logs HEAD, branches and remotes by default; without an existing log file the
    // entry (and thus `git stash list` / the edit ledger) would silently be missing.
    repo.reference_ensure_log(name)
        .during("create the reflog")?;
    for attempt in 0..REF_UPDATE_ATTEMPTS {
        let current = match repo.find_reference(name) {
            Ok(reference) => match reference.target() {
                Some(oid) => Some(oid),
                None => return Err(RecordError::SymbolicRef { name }),
            },
            Err(err) if err.code() == ErrorCode::NotFound => None,
            Err(err) => {
                return Err(RecordError::Git {
                    op: "read a ref",
                    source: err,
                });
            }
        };
        let result = match current {
            Some(old) => repo.reference_matching(name, new, true, old, log_message),
            // Not forced: if someone creates the ref meanwhile, retry against their value.
            None => repo.reference(name, new, false, log_message),
        };
        match result {
            Ok(_) => return Ok(()),
            Err(err)
                if matches!(
                    err.code(),
                    ErrorCode::Locked | ErrorCode::Modified | ErrorCode::Exists
                ) =>
            {
                // Back off briefly so the other writer can release its lock file.
                thread::sleep(Duration::from_millis(5 << attempt));
            }
            Err(err) => {
                return Err(RecordError::Git {
                    op: "update a ref",
                    source: err,
                });
            }
        }
    }
    Err(RecordError::RefContention { name })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::process::Output;
    use std::time::SystemTime;

    use spark_testkit::{git_ok, stdout};

    const TIME_MS: i64 = 1_700_000_000_123;

    /// The test kit's hermetic repository, driven by the real git CLI, opened with git2 too.
    struct TestRepo {
        _kit: spark_testkit::TestRepo,
        path: PathBuf,
        repo: Repository,
    }

    impl TestRepo {
        fn new() -> Self {
            let kit = spark_testkit::TestRepo::empty();
            let path = kit.path().to_path_buf();
            let repo = Repository::open(&path).unwrap();
            TestRepo {
                _kit: kit,
                path,
                repo,
            }
        }

        fn git(&self, args: &[&str]) -> String {
            git_ok(&self.path, args)
        }

        fn write(&self, rel: &str, bytes: &[u8], mode: u32) {
            let file = self.path.join(rel);
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            fs::write(&file, bytes).unwrap();
            let perm = if mode == MODE_EXECUTABLE {
                0o755
            } else {
                0o644
            };
            fs::set_permissions(&file, fs::Permissions::from_mode(perm)).unwrap();
        }

        fn commit_all(&self, message: &str) {
            self.git(&["add", "-A"]);
            self.git(&["commit", "-q", "-m", message]);
        }

        /// Puts every changed file in its before (or after) state, as spark's apply/undo would.
        fn set_worktree(&self, changes: &[FileChange], after: bool) {
            for change in changes {
                let state = if after { &change.after } else { &change.before };
                match state {
                    Some(state) => self.write(&change.path, &state.bytes, state.mode),
                    None => {
                        let _ = fs::remove_file(self.path.join(&change.path));
                    }
                }
            }
        }

        fn assert_worktree(&self, changes: &[FileChange], after: bool) {
            for change in changes {
                let state = if after { &change.after } else { &change.before };
                let file = self.path.join(&change.path);
                match state {
                    Some(state) => {
                        assert_eq!(fs::read(&file).unwrap(), state.bytes, "{}", change.path);
                        let exec = fs::metadata(&file).unwrap().permissions().mode() & 0o111 != 0;
                        assert_eq!(exec, state.mode == MODE_EXECUTABLE, "{}", change.path);
                    }
                    None => assert!(!file.exists(), "{} should be absent", change.path),
                }
            }
        }

        fn short(&self, oid: Oid) -> String {
            edit_short_id(&self.repo, oid).unwrap()
        }

        fn assert_fsck_clean(&self) {
            let out = git(&self.path, &["fsck", "--strict", "--no-progress"]);
            let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "fsck failed: {text}");
            // Only the unborn-HEAD notice is expected; any dangling or broken object is not.
            let unexpected = text
                .lines()
                .any(|line| !line.starts_with("notice: HEAD points to"));
            assert!(!unexpected, "fsck reported: {text}");
        }
    }

    /// What the user owns and the recorder must leave alone.
    #[derive(Debug, PartialEq)]
    struct UserState {
        head_file: Vec<u8>,
        head: String,
        branch: String,
        index: Option<(Vec<u8>, SystemTime)>,
    }

    fn user_state(t: &TestRepo) -> UserState {
        let git_dir = t.path.join(".git");
        assert!(
            !git_dir.join("index.lock").exists(),
            "index.lock left behind"
        );
        let index = fs::read(git_dir.join("index")).ok().map(|bytes| {
            (
                bytes,
                fs::metadata(git_dir.join("index"))
                    .unwrap()
                    .modified()
                    .unwrap(),
            )
        });
        UserState {
            head_file: fs::read(git_dir.join("HEAD")).unwrap(),
            head: stdout(&git(&t.path, &["rev-parse", "--verify", "-q", "HEAD"])),
            branch: stdout(&git(
                &t.path,
                &["rev-parse", "--verify", "-q", "refs/heads/main"],
            )),
            index,
        }
    }

    fn git(dir: &Path, args: &[&str]) -> Output {
        spark_testkit::hermetic_git(dir)
            .args(args)
            .output()
            .unwrap()
    }

    fn file(bytes: &[u8]) -> Option<FileState> {
        Some(FileState {
            bytes: bytes.to_vec(),
            mode: MODE_FILE,
        })
    }

    fn exec(bytes: &[u8]) -> Option<FileState> {
        Some(FileState {
            bytes: bytes.to_vec(),
            mode: MODE_EXECUTABLE,
        })
    }

    fn change(path: &str, before: Option<FileState>, after: Option<FileState>) -> FileChange {
        FileChange {
            path: path.to_owned(),
            before,
            after,
        }
    }

    fn meta(message: &str) -> EditMeta {
        EditMeta {
            message: message.to_owned(),
            time_ms: TIME_MS,
        }
    }

    fn blob_abbrev(bytes: &[u8]) -> String {
        Oid::hash_object(ObjectType::Blob, bytes)
            .unwrap()
            .to_string()[..7]
            .to_owned()
    }

    /// Records `changes` the way the daemon does: files are already on disk when recording.
    fn record(t: &TestRepo, changes: &[FileChange], message: &str) -> Oid {
        t.set_worktree(changes, true);
        record_edit(&t.repo, changes, &meta(message)).unwrap()
    }

    /// Commits a.txt, gone.txt and user.txt, then leaves an uncommitted user change in user.txt.
    fn repo_with_history() -> TestRepo {
        let t = TestRepo::new();
        t.write("a.txt", b"one\ntwo\nthree\n", MODE_FILE);
        t.write("gone.txt", b"bye\n", MODE_FILE);
        t.write("user.txt", b"u\n", MODE_FILE);
        t.commit_all("first");
        t.write("a.txt", b"zero\none\ntwo\nthree\n", MODE_FILE);
        t.commit_all("second");
        t.write("user.txt", b"u changed by the user\n", MODE_FILE);
        t
    }

    fn three_file_edit() -> Vec<FileChange> {
        vec![
            change(
                "a.txt",
                file(b"zero\none\ntwo\nthree\n"),
                file(b"zero\none\nTWO\nthree\n"),
            ),
            change("gone.txt", file(b"bye\n"), None),
            change("new/b.txt", None, file(b"hello\nworld\n")),
        ]
    }

    #[test]
    fn stash_show_prints_exactly_the_edit_and_user_state_is_untouched() {
        let t = repo_with_history();
        let changes = three_file_edit();
        t.set_worktree(&changes, true);
        let user_before = user_state(&t);
        let edit = record_edit(&t.repo, &changes, &meta("make two loud")).unwrap();
        assert_eq!(user_state(&t), user_before);

        let expected = format!(
            "diff --git a/a.txt b/a.txt\n\
             index {a0}..{a1} 100644\n\
             --- a/a.txt\n\
             +++ b/a.txt\n\
             @@ -1,4 +1,4 @@\n \
             zero\n \
             one\n\
             -two\n\
             +TWO\n \
             three\n\
             diff --git a/gone.txt b/gone.txt\n\
             deleted file mode 100644\n\
             index {g0}..0000000\n\
             --- a/gone.txt\n\
             +++ /dev/null\n\
             @@ -1 +0,0 @@\n\
             -bye\n\
             diff --git a/new/b.txt b/new/b.txt\n\
             new file mode 100644\n\
             index 0000000..{b1}\n\
             --- /dev/null\n\
             +++ b/new/b.txt\n\
             @@ -0,0 +1,2 @@\n\
             +hello\n\
             +world\n",
            a0 = blob_abbrev(b"zero\none\ntwo\nthree\n"),
            a1 = blob_abbrev(b"zero\none\nTWO\nthree\n"),
            g0 = blob_abbrev(b"bye\n"),
            b1 = blob_abbrev(b"hello\nworld\n"),
        );
        let shown = t.git(&["stash", "show", "-p", &t.short(edit)]);
        assert_eq!(shown, expected);
        assert_eq!(edit_patch(&t.repo, edit).unwrap(), expected);
        assert_eq!(edit_changes(&t.repo, edit).unwrap(), changes);

        // Stash shape: the edited files were unmodified, so W^1 is HEAD itself (as with
        // `git stash`); W^2 is I with B's tree.
        let head = t.git(&["rev-parse", "HEAD"]);
        assert_eq!(t.git(&["rev-parse", &format!("{edit}^1")]), head);
        assert_eq!(
            t.git(&["rev-parse", &format!("{edit}^2^{{tree}}")]),
            t.git(&["rev-parse", &format!("{edit}^1^{{tree}}")])
        );
        assert_eq!(
            t.git(&["log", "-1", "--format=%s", &edit.to_string()]),
            "spark: make two loud\n"
        );
        t.assert_fsck_clean();
        assert_eq!(user_state(&t), user_before);
    }

    #[test]
    fn stash_apply_reapplies_the_edit_after_an_undo() {
        let t = repo_with_history();
        let changes = three_file_edit();
        let edit = record(&t, &changes, "make two loud");
        t.set_worktree(&changes, false);
        t.assert_worktree(&changes, false);

        t.git(&["stash", "apply", &t.short(edit)]);
        t.assert_worktree(&changes, true);
        // The user's unrelated uncommitted change survived the round trip.
        assert_eq!(
            fs::read(t.path.join("user.txt")).unwrap(),
            b"u changed by the user\n"
        );
    }

    #[test]
    fn push_stash_lists_the_edit_and_pop_brings_it_back() {
        let t = repo_with_history();
        let changes = three_file_edit();
        let edit = record(&t, &changes, "make two loud");
        push_stash(&t.repo, edit, "make two loud").unwrap();
        assert_eq!(
            t.git(&["stash", "list"]),
            "stash@{0}: On main: spark: make two loud\n"
        );

        t.set_worktree(&changes, false);
        t.git(&["stash", "pop"]);
        t.assert_worktree(&changes, true);
        assert_eq!(t.git(&["stash", "list"]), "");
        // Popping drops refs/stash only; the edit itself stays pinned.
        assert_eq!(resolve_edit(&t.repo, &t.short(edit)).unwrap(), edit);
        t.assert_fsck_clean();
    }

    #[test]
    fn unborn_branch_records_and_stashes() {
        let t = TestRepo::new();
        t.write("x.txt", b"untracked\n", MODE_FILE);
        let changes = vec![
            change("x.txt", file(b"untracked\n"), file(b"edited\n")),
            change("y.txt", None, file(b"new\n")),
        ];
        t.set_worktree(&changes, true);
        let user_before = user_state(&t);
        let edit = record_edit(&t.repo, &changes, &meta("first ever edit")).unwrap();
        assert_eq!(user_state(&t), user_before);
        assert!(
            user_before.index.is_none(),
            "a fresh repo has no index and must not gain one"
        );
        assert!(t.repo.head().is_err(), "HEAD must stay unborn");

        let b = t.repo.find_commit(edit).unwrap().parent(0).unwrap();
        assert_eq!(b.parent_count(), 0);
        let shown = t.git(&["stash", "show", "-p", &t.short(edit)]);
        assert_eq!(shown, edit_patch(&t.repo, edit).unwrap());
        assert!(shown.contains("-untracked\n+edited\n"), "{shown}");
        assert_eq!(edit_changes(&t.repo, edit).unwrap(), changes);

        push_stash(&t.repo, edit, "first ever edit").unwrap();
        assert_eq!(
            t.git(&["stash", "list"]),
            "stash@{0}: On main: spark: first ever edit\n"
        );
        t.assert_fsck_clean();
        assert_eq!(user_state(&t), user_before);
    }

    #[test]
    fn a_base_commit_is_written_only_when_an_edited_file_differs_from_head() {
        let t = repo_with_history();
        let head = t.git(&["rev-parse", "HEAD"]);
        // user.txt carries an uncommitted change: the base must hold it, on top of HEAD.
        let changes = vec![change(
            "user.txt",
            file(b"u changed by the user\n"),
            file(b"u changed by the user\nand by spark\n"),
        )];
        let edit = record(&t, &changes, "on top of the user's change");
        let base = t.git(&["rev-parse", &format!("{edit}^1")]);
        assert_ne!(base, head, "a separate base commit");
        assert_eq!(t.git(&["rev-parse", &format!("{edit}^1^")]), head);
        assert_eq!(
            t.git(&["show", &format!("{edit}^1:user.txt")]),
            "u changed by the user\n"
        );
        assert_eq!(
            t.git(&["stash", "show", "-p", &t.short(edit)]),
            edit_patch(&t.repo, edit).unwrap()
        );
        assert_eq!(edit_changes(&t.repo, edit).unwrap(), changes);

        // An unmodified file: HEAD is the base, and only I and W are new commits.
        let count = |t: &TestRepo| t.git(&["rev-list", "--all", "--count"]);
        t.write("user.txt", b"u\n", MODE_FILE);
        let before = count(&t);
        let changes = vec![change(
            "a.txt",
            file(b"zero\none\ntwo\nthree\n"),
            file(b"0\n"),
        )];
        let edit = record(&t, &changes, "on HEAD");
        assert_eq!(t.git(&["rev-parse", &format!("{edit}^1")]), head);
        assert_eq!(edit_changes(&t.repo, edit).unwrap(), changes);
        assert_eq!(
            count(&t).trim().parse::<u32>().unwrap(),
            before.trim().parse::<u32>().unwrap() + 2
        );
        t.assert_fsck_clean();
    }

    #[test]
    fn detached_head_records_and_stashes() {
        let t = repo_with_history();
        t.git(&["checkout", "-q", "--detach"]);
        let changes = three_file_edit();
        t.set_worktree(&changes, true);
        let user_before = user_state(&t);
        let edit = record_edit(&t.repo, &changes, &meta("while detached")).unwrap();
        assert_eq!(user_state(&t), user_before);
        assert!(t.repo.head_detached().unwrap());
        assert_eq!(
            t.git(&["rev-parse", &format!("{edit}^1")]),
            t.git(&["rev-parse", "HEAD"])
        );

        push_stash(&t.repo, edit, "while detached").unwrap();
        assert_eq!(
            t.git(&["stash", "list"]),
            "stash@{0}: On (no branch): spark: while detached\n"
        );
        t.set_worktree(&changes, false);
        t.git(&["stash", "apply", &t.short(edit)]);
        t.assert_worktree(&changes, true);
        t.assert_fsck_clean();
    }

    #[test]
    fn with_core_file_mode_off_the_record_keeps_the_mode_git_has() {
        let t = TestRepo::new();
        t.write("tool.sh", b"echo hi\n", MODE_FILE);
        t.commit_all("base");
        // Executable in git, not on this (say, FAT) filesystem, which git is told to ignore.
        t.git(&["update-index", "--chmod=+x", "tool.sh"]);
        t.git(&["commit", "-qm", "make it executable"]);
        t.git(&["config", "core.fileMode", "false"]);
        let changes = vec![
            change("tool.sh", file(b"echo hi\n"), file(b"echo bye\n")),
            change("new.sh", None, exec(b"echo new\n")),
        ];
        let edit = record(&t, &changes, "edit under fileMode=false");
        assert!(
            t.git(&["ls-tree", &edit.to_string(), "tool.sh"])
                .starts_with("100755 blob "),
            "the index's mode is kept"
        );
        assert!(
            t.git(&["ls-tree", &edit.to_string(), "new.sh"])
                .starts_with("100644 blob "),
            "a new file is recorded as git adds it"
        );
        let shown = t.git(&["stash", "show", "-p", &t.short(edit)]);
        assert!(!shown.contains("old mode"), "no mode change: {shown}");
        assert_eq!(shown, edit_patch(&t.repo, edit).unwrap());
        t.assert_fsck_clean();
    }

    #[test]
    fn modes_binary_and_crlf_bytes_round_trip() {
        let t = TestRepo::new();
        t.write("tool.sh", b"echo hi\n", MODE_FILE);
        t.write("crlf.txt", b"a\r\nb\r\n", MODE_FILE);
        t.write("bin.dat", b"\0\x01\x02\xff\0\r\n", MODE_FILE);
        t.commit_all("base");
        let changes = vec![
            change(
                "bin.dat",
                file(b"\0\x01\x02\xff\0\r\n"),
                file(b"\0\xff\xfe\r\n\0"),
            ),
            change("crlf.txt", file(b"a\r\nb\r\n"), file(b"a\r\nB\r\nc")),
            change("run.sh", None, exec(b"#!/bin/sh\r\nexit 0\n")),
            change("tool.sh", file(b"echo hi\n"), exec(b"echo hi\n")),
        ];
        let edit = record(&t, &changes, "modes and bytes");
        assert_eq!(edit_changes(&t.repo, edit).unwrap(), changes);
        assert!(
            t.git(&["ls-tree", &edit.to_string(), "run.sh"])
                .starts_with("100755 blob ")
        );

        let shown = t.git(&["stash", "show", "-p", &t.short(edit)]);
        assert_eq!(shown, edit_patch(&t.repo, edit).unwrap());
        assert!(
            shown.contains("old mode 100644\nnew mode 100755\n"),
            "{shown}"
        );
        assert!(
            shown.contains("Binary files a/bin.dat and b/bin.dat differ\n"),
            "{shown}"
        );

        t.set_worktree(&changes, false);
        t.git(&["stash", "apply", &t.short(edit)]);
        t.assert_worktree(&changes, true);
        t.assert_fsck_clean();
    }

    #[test]
    fn patch_matches_git_for_renames_function_context_and_missing_newline() {
        let t = TestRepo::new();
        let mut long = String::new();
        for i in 0..40 {
            if i % 10 == 0 {
                long.push_str(&format!("fn f{i}() {{\n"));
            } else {
                long.push_str(&format!("    line {i};\n"));
            }
        }
        let moved: String = (0..30).map(|i| format!("moved line {i}\n")).collect();
        t.write("long.rs", long.as_bytes(), MODE_FILE);
        t.write("old/name.txt", moved.as_bytes(), MODE_FILE);
        t.write("tail.txt", b"end\n", MODE_FILE);
        t.write("same.txt", b"kept exactly\n", MODE_FILE);
        t.commit_all("base");
        let changes = vec![
            change(
                "long.rs",
                file(long.as_bytes()),
                file(long.replace("line 25", "LINE").as_bytes()),
            ),
            change(
                "new/name.txt",
                None,
                file(moved.replace("line 3\n", "line three\n").as_bytes()),
            ),
            change("moved/same.txt", None, file(b"kept exactly\n")),
            change("old/name.txt", file(moved.as_bytes()), None),
            change("same.txt", file(b"kept exactly\n"), None),
            change("tail.txt", file(b"end\n"), file(b"end")),
        ];
        let edit = record(&t, &changes, "assorted");
        let shown = t.git(&["stash", "show", "-p", &t.short(edit)]);
        // libgit2 scores similarity differently from git (96% vs 95% here); the pairing and the
        // hunks agree, only the percentage is allowed to differ.
        let without_score = |patch: &str| -> String {
            patch
                .lines()
                .filter(|l| !l.starts_with("similarity index "))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        let patch = edit_patch(&t.repo, edit).unwrap();
        assert_eq!(without_score(&patch), without_score(&shown));
        assert!(
            shown.contains("rename from old/name.txt\nrename to new/name.txt\n"),
            "{shown}"
        );
        assert!(
            shown.contains(
                "similarity index 100%\nrename from same.txt\nrename to moved/same.txt\n"
            ),
            "{shown}"
        );
        assert!(
            patch.contains("similarity index 100%\nrename from same.txt\n"),
            "{patch}"
        );
        assert!(shown.contains("@@ fn f20() {\n"), "{shown}");
        assert!(shown.contains("\\ No newline at end of file\n"), "{shown}");
        // An emptied directory disappears from W instead of leaving an empty tree behind.
        assert_eq!(t.git(&["ls-tree", &edit.to_string(), "old"]), "");
        t.assert_fsck_clean();
    }

    #[test]
    fn reflog_lists_every_edit_and_each_stays_resolvable() {
        let t = repo_with_history();
        let first = vec![change(
            "a.txt",
            file(b"zero\none\ntwo\nthree\n"),
            file(b"1\n"),
        )];
        let second = vec![change("a.txt", file(b"1\n"), file(b"2\n"))];
        let e1 = record(&t, &first, "first prompt");
        let e2 = record(&t, &second, "second prompt\nwith more detail\n");

        assert_eq!(
            t.git(&["reflog", "show", "--format=%gs", EDITS_REF]),
            "spark: second prompt\nspark: first prompt\n"
        );
        assert_eq!(t.git(&["rev-parse", EDITS_REF]), format!("{e2}\n"));
        assert_eq!(
            t.git(&["log", "-1", "--format=%B", &e2.to_string()]),
            "spark: second prompt\n\nsecond prompt\nwith more detail\n\n"
        );
        assert_eq!(resolve_edit(&t.repo, &t.short(e1)).unwrap(), e1);
        assert_eq!(
            resolve_edit(&t.repo, &t.short(e2).to_uppercase()).unwrap(),
            e2
        );
        assert_eq!(resolve_edit(&t.repo, &e1.to_string()).unwrap(), e1);
        assert!(
            t.git(&["stash", "show", "-p", &t.short(e1)])
                .contains("+1\n")
        );

        // Neither expiring every reflog nor an aggressive gc loses the first edit.
        t.git(&["reflog", "expire", "--expire=now", "--all"]);
        t.git(&["gc", "-q", "--prune=now"]);
        assert_eq!(edit_changes(&t.repo, e1).unwrap(), first);
        t.assert_fsck_clean();
    }

    #[test]
    fn short_id_is_never_all_digits_so_git_stash_does_not_read_it_as_an_index() {
        let t = TestRepo::new();
        for i in 0..2000 {
            let changes = vec![change("f.txt", None, file(format!("{i}\n").as_bytes()))];
            let edit = record(&t, &changes, "digits");
            let seven = edit.to_string()[..7].to_owned();
            if !seven.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            // The trap itself: git reads the digits as refs/stash@{<n>}.
            assert!(
                !git(&t.path, &["stash", "show", "-p", &seven])
                    .status
                    .success()
            );
            let short = t.short(edit);
            assert!(short.bytes().any(|b| b.is_ascii_alphabetic()), "{short}");
            assert_eq!(
                t.git(&["stash", "show", "-p", &short]),
                edit_patch(&t.repo, edit).unwrap()
            );
            assert_eq!(resolve_edit(&t.repo, &seven).unwrap(), edit);
            return;
        }
        panic!("no all-digit abbreviation among 2000 edits");
    }

    #[test]
    fn patch_index_lines_follow_gits_abbreviation_in_big_repos() {
        let t = repo_with_history();
        // More than 2^14 packed objects make git abbreviate to 8 digits.
        let mut stream = Vec::new();
        for i in 0..17_000 {
            let data = format!("filler {i}\n");
            stream.extend_from_slice(format!("blob\ndata {}\n{data}\n", data.len()).as_bytes());
        }
        let mut import = spark_testkit::hermetic_git(&t.path)
            .args(["fast-import", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut import.stdin.take().unwrap(), &stream).unwrap();
        assert!(import.wait().unwrap().success());

        let edit = record(&t, &three_file_edit(), "big repo");
        let shown = t.git(&["stash", "show", "-p", &t.short(edit)]);
        assert_eq!(edit_patch(&t.repo, edit).unwrap(), shown);
        let a1 = Oid::hash_object(ObjectType::Blob, b"zero\none\nTWO\nthree\n").unwrap();
        assert!(
            shown.contains(&format!("..{} 100644\n", &a1.to_string()[..8])),
            "{shown}"
        );

        t.git(&["config", "core.abbrev", "12"]);
        let shown = t.git(&["stash", "show", "-p", &t.short(edit)]);
        assert_eq!(edit_patch(&t.repo, edit).unwrap(), shown);
        assert!(
            shown.contains(&format!("..{} 100644\n", &a1.to_string()[..12])),
            "{shown}"
        );
    }

    #[test]
    fn unborn_branch_refuses_a_file_that_is_also_a_directory() {
        let t = TestRepo::new();
        let changes = [
            change("d", file(b"1"), file(b"1")),
            change("d/x", file(b"2"), None),
        ];
        let err = record_edit(&t.repo, &changes, &meta("clash")).unwrap_err();
        assert!(matches!(err, RecordError::InvalidPath { .. }), "{err}");
    }

    #[test]
    fn concurrent_recorders_lose_no_ledger_entry() {
        let t = repo_with_history();
        let path = t.path.clone();
        let workers: Vec<_> = (0..2)
            .map(|worker| {
                let path = path.clone();
                thread::spawn(move || {
                    // Separate handles, as two daemon threads (or processes) would have.
                    let repo = Repository::open(&path).unwrap();
                    (0..15)
                        .map(|i| {
                            let body = format!("{worker}-{i}\n");
                            let changes = [change("c.txt", None, file(body.as_bytes()))];
                            record_edit(&repo, &changes, &meta(&format!("w{worker} e{i}"))).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let edits: Vec<Oid> = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        let ledger = t.git(&["reflog", "show", "--format=%H", EDITS_REF]);
        assert_eq!(ledger.lines().count(), edits.len());
        for edit in edits {
            assert!(ledger.contains(&edit.to_string()));
            assert_eq!(resolve_edit(&t.repo, &edit.to_string()).unwrap(), edit);
        }
    }

    #[test]
    fn resolve_edit_refuses_what_is_not_a_pinned_edit() {
        let t = repo_with_history();
        let head = t.git(&["rev-parse", "HEAD"]);
        let reject = |id: &str| resolve_edit(&t.repo, id).unwrap_err();
        assert!(matches!(
            reject(head.trim()),
            RecordError::UnknownEdit { .. }
        ));
        assert!(matches!(reject("abc"), RecordError::InvalidId { .. }));
        assert!(matches!(reject("abcg123"), RecordError::InvalidId { .. }));
        assert!(matches!(reject("*"), RecordError::InvalidId { .. }));
        assert!(matches!(
            reject(&"a".repeat(41)),
            RecordError::InvalidId { .. }
        ));
        let head_oid = Oid::from_str(head.trim()).unwrap();
        assert!(matches!(
            edit_changes(&t.repo, head_oid).unwrap_err(),
            RecordError::NotAnEdit { .. }
        ));
    }

    #[test]
    fn resolve_edit_reports_an_ambiguous_prefix() {
        let t = TestRepo::new();
        // Birthday search: distinct edits until two share a 4-digit prefix (~300 expected).
        let mut by_prefix: HashMap<String, Oid> = HashMap::new();
        for i in 0..5000 {
            let changes = vec![change("f.txt", None, file(format!("{i}\n").as_bytes()))];
            let edit = record_edit(&t.repo, &changes, &meta("many")).unwrap();
            let prefix = edit.to_string()[..4].to_owned();
            if let Some(other) = by_prefix.insert(prefix.clone(), edit) {
                let err = resolve_edit(&t.repo, &prefix).unwrap_err();
                assert!(
                    matches!(err, RecordError::AmbiguousEdit { count: 2, .. }),
                    "{err}"
                );
                assert_eq!(resolve_edit(&t.repo, &other.to_string()).unwrap(), other);
                return;
            }
        }
        panic!("no shared prefix among 5000 edits");
    }

    #[test]
    fn identity_falls_back_when_none_is_configured() {
        let t = repo_with_history();
        t.git(&["config", "user.name", ""]);
        let edit = record(&t, &three_file_edit(), "who am i");
        assert_eq!(
            t.git(&[
                "log",
                "-1",
                "--format=%an <%ae> %at|%cn <%ce> %ct",
                &edit.to_string()
            ]),
            format!(
                "spark <spark@localhost> {0}|spark <spark@localhost> {0}\n",
                TIME_MS / 1000
            )
        );
    }

    #[test]
    fn invalid_changes_are_refused_before_anything_is_written() {
        let t = repo_with_history();
        let refuse =
            |changes: &[FileChange]| record_edit(&t.repo, changes, &meta("bad")).unwrap_err();
        for path in [
            "",
            "/abs",
            "a//b",
            "a/../b",
            "./a",
            ".git/config",
            "x/.GIT/y",
            "a\0b",
        ] {
            let err = refuse(&[change(path, None, file(b"x"))]);
            assert!(
                matches!(err, RecordError::InvalidPath { .. }),
                "{path:?}: {err}"
            );
        }
        let link = Some(FileState {
            bytes: b"target".to_vec(),
            mode: 0o120000,
        });
        assert!(matches!(
            refuse(&[change("l", None, link)]),
            RecordError::InvalidMode { .. }
        ));
        let twice = [
            change("a.txt", None, file(b"1")),
            change("a.txt", None, file(b"2")),
        ];
        assert!(matches!(refuse(&twice), RecordError::DuplicatePath { .. }));
        assert!(
            t.repo.find_reference(EDITS_REF).is_err(),
            "nothing may be recorded"
        );
    }

    #[test]
    fn summary_is_one_printable_line() {
        assert_eq!(summary_line("\n  fix\tit  \nmore"), "fix it");
        assert_eq!(summary_line(" \n "), "(no message)");
        assert_eq!(commit_message("one line\n"), "spark: one line\n");
        assert_eq!(commit_message("a\r\nb"), "spark: a\n\na\r\nb\n");
    }
}
