//! All-or-nothing writes to the worktree, across `kill -9`.
//!
//! Before the first file changes, a journal holding every file's before and after content
//! (inline, so it needs nothing else to be durable) is written and synced. Files are then
//! written atomically (temp files in the same directories, synced, renamed into place, the
//! directories synced) after re-checking that each still holds its expected bytes. At daemon
//! start, recovery reads the files themselves: if every one holds its after state, the operation
//! rolls forward (recorded now, unless the ledger already names the journal); otherwise each
//! file still in its after state is put back (all-before). Deciding from content, not from a
//! phase marker, saves a second synced journal write on every edit.
//!
//! Each repository has one journal slot file (its actor runs one operation at a time), written
//! in place: a finished operation only zeroes the slot's magic, so an edit creates and deletes
//! no journal file, and the synced overwrite of an already-allocated slot costs a data flush.
//! A torn slot (bad checksum) can only come from a crash before its sync returned, when no
//! worktree file had been touched yet, so it is set aside.
//!
//! The user (an editor saving, a shell appending) may write to a file while it is replaced.
//! Bytes written to the old inode after the compare-and-swap read would vanish with it, so
//! before that read every replaced file gets a second link (`.<name>.spark-<id>.old.tmp`) to
//! its inode, kept until the operation is settled. After the renames, an old inode whose bytes
//! are no longer the before state means the user wrote during the edit: the operation is
//! taken back (the old inode renamed back into place, bytes and all) and refused as "changed
//! while being written". The links also tell recovery exactly which files were replaced (the
//! path's inode differs from the link's) where content alone cannot: a file holding its after
//! state plus the user's appended bytes is replaced; one holding its before state plus them is
//! not.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use git2::{ObjectType, Oid};
use serde::{Deserialize, Serialize};

use super::EditError;
use super::record::FileState;

/// Bumped on any incompatible change of the journal format.
const JOURNAL_VERSION: u32 = 2;
/// First bytes of a pending journal; a finished slot has them zeroed.
const MAGIC: &[u8; 8] = b"SPARKJ2\n";
/// Length of the trailing checksum (a SHA-1 over everything before it).
const CHECKSUM_LEN: usize = 20;
/// A slot larger than this is cut back to the journal being written when that is much smaller.
const SLOT_KEEP_BYTES: u64 = 1 << 20;
/// Temp files synced together (and so open at once) at most.
const SYNC_BATCH: usize = 16;
/// File name extension of journal slots.
const SLOT_EXT: &str = "journal";

/// What the journalled operation was, so recovery can finish its bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Operation {
    /// A new edit; recorded once written.
    Apply {
        source: String,
        message: String,
        time_ms: i64,
    },
    /// Reverting edit `edit` (full hex id); `stash` also puts it on `refs/stash`.
    Revert { edit: String, stash: bool },
}

/// A journal: the operation, and every file's before and after content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Journal {
    pub(crate) version: u32,
    /// Unique per operation; names temp files and ties ledger lines to the operation.
    pub(crate) id: String,
    pub(crate) workdir: PathBuf,
    pub(crate) operation: Operation,
    pub(crate) files: Vec<Write1>,
    /// Directories created for new files, outermost first; removed again on rollback if empty.
    pub(crate) created_dirs: Vec<String>,
}

/// A file to write: its repository-relative path with before and after contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Write1 {
    pub(crate) path: String,
    pub(crate) before: Option<FileState>,
    pub(crate) after: Option<FileState>,
}

/// The journal's header as stored; contents follow it in order (each file's before, then after).
#[derive(Serialize, Deserialize)]
struct Header {
    version: u32,
    id: String,
    workdir: PathBuf,
    operation: Operation,
    files: Vec<HeaderFile>,
    created_dirs: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct HeaderFile {
    path: String,
    before: Option<Stored>,
    after: Option<Stored>,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
struct Stored {
    mode: u32,
    len: u64,
}

/// Crash-test hooks: abort the process at a named point of [`commit`] (`<name>`), or make a
/// step after the first write fail with an error (`fail_<name>`). Off unless configured.
#[derive(Debug, Clone, Default)]
pub(crate) struct Failpoint(pub(crate) Option<String>);

impl Failpoint {
    pub(crate) fn hit(&self, name: &str) {
        if self.0.as_deref() == Some(name) {
            tracing::error!(failpoint = name, "failpoint hit: aborting");
            std::process::abort();
        }
    }

    /// An injected error at `name`, when configured as `fail_<name>`.
    pub(crate) fn fail(&self, name: &str) -> Result<(), EditError> {
        match self.0.as_deref().and_then(|f| f.strip_prefix("fail_")) {
            Some(point) if point == name => {
                tracing::error!(failpoint = name, "failpoint hit: failing");
                Err(EditError::Internal(format!("injected failure at {name}")))
            }
            _ => Ok(()),
        }
    }
}

impl Failpoint {
    /// A named step of [`commit`] for tests to act at (a writer racing the edit); nothing in
    /// the daemon itself.
    fn step(&self, _name: &str) {
        #[cfg(test)]
        STEP.with(|hook| {
            if let Some(f) = hook.borrow_mut().as_mut() {
                f(_name);
            }
        });
    }
}

/// What a test does at each [`Failpoint::step`] on its thread.
#[cfg(test)]
type StepHook = Box<dyn FnMut(&str)>;

#[cfg(test)]
thread_local! {
    static STEP: std::cell::RefCell<Option<StepHook>> = const { std::cell::RefCell::new(None) };
}

/// Whether to fsync files and directories. Off only in benchmarks that measure without it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Durability {
    pub(crate) fsync: bool,
}

/// A journal that is written and synced, and whose writes have landed.
pub(crate) struct Pending {
    pub(crate) slot: PathBuf,
    pub(crate) id: String,
    /// Kept so a failure after the writes can put every file back ([`abandon`]).
    journal: Journal,
}

/// Write `writes` to the worktree `workdir` all together, journalled in `journal_dir`.
/// The caller records the operation, then calls [`finish`]. Nothing is left changed on error.
pub(crate) fn commit(
    workdir: &Path,
    journal_dir: &Path,
    operation: Operation,
    writes: &[Write1],
    durability: Durability,
    failpoint: &Failpoint,
) -> Result<Pending, EditError> {
    let mut created_dirs = Vec::new();
    for w in writes {
        if w.after.is_some() {
            missing_dirs(workdir, &w.path, &mut created_dirs);
        }
    }
    let id = format!("{:020}-{}", unique(), std::process::id());
    let journal = Journal {
        version: JOURNAL_VERSION,
        id: id.clone(),
        workdir: workdir.to_owned(),
        operation,
        files: writes.to_vec(),
        created_dirs,
    };
    let slot = slot_path(journal_dir, workdir);
    save(journal_dir, &slot, &encode(&journal)?, durability)?;
    failpoint.hit("after_journal");

    if let Err(e) = write_all(&journal, durability, failpoint) {
        // Put back whatever landed, then forget the journal: the worktree is as before.
        if let Err(re) = rollback(&journal) {
            tracing::error!(error = %re, journal = %slot.display(), "rollback failed; journal kept for recovery");
            return Err(e);
        }
        clear(&slot);
        return Err(e);
    }
    failpoint.hit("after_written");
    Ok(Pending { slot, id, journal })
}

/// The operation failed after its files landed (recording it did not work): put every file
/// back and retire the journal, so the worktree is all-before. If that fails too, the journal
/// stays for recovery at the next start.
pub(crate) fn abandon(pending: &Pending) -> Result<(), EditError> {
    rollback(&pending.journal)?;
    clear(&pending.slot);
    Ok(())
}

/// The operation is recorded: drop the links to the replaced inodes (see [`settle`]) and
/// retire its journal.
pub(crate) fn finish(pending: &Pending, failpoint: &Failpoint) {
    failpoint.hit("before_finish");
    settle(&pending.journal);
    clear(&pending.slot);
}

/// A landed operation's last step: each link to a replaced inode goes. Bytes the user wrote to
/// such an inode through a file handle opened before the rename and written after the check
/// (a window of microseconds) are merged into the file first, so they are not lost with it.
pub(crate) fn settle(journal: &Journal) {
    for f in &journal.files {
        let abs = journal.workdir.join(&f.path);
        let _ = std::fs::remove_file(temp_path(&abs, &journal.id));
        let old = old_path(&abs, &journal.id);
        let Ok(Some(late)) = read_state(&old) else {
            continue;
        };
        if Some(&late.bytes) != f.before.as_ref().map(|b| &b.bytes) {
            if let Err(e) = rescue(
                &abs,
                &journal.id,
                content(&f.before),
                content(&f.after),
                &late,
            ) {
                // The link stays, holding the user's bytes, rather than losing them.
                tracing::error!(path = %f.path, error = %e, kept = %old.display(), "cannot merge bytes written during the edit");
                continue;
            }
            tracing::warn!(path = %f.path, "bytes written to the file during the edit were merged after it");
        }
        let _ = std::fs::remove_file(&old);
    }
}

/// Merge the bytes the user wrote to an old inode into the file at `abs`: `late`, the old
/// inode's content, grew from `before`; the file grew from `after`. Appends (the common case:
/// a shell or a log writer) go after the edit's content in the order they were written; other
/// changes merge 3-way keeping both sides where they overlap, so nothing the user wrote is
/// dropped.
fn rescue(
    abs: &Path,
    id: &str,
    before: &[u8],
    after: &[u8],
    late: &FileState,
) -> Result<(), EditError> {
    let current = read_state(abs).map_err(|e| EditError::io("read", abs, e))?;
    let merged = match &current {
        Some(cur) => FileState {
            bytes: match (
                late.bytes.strip_prefix(before),
                cur.bytes.strip_prefix(after),
            ) {
                (Some(early), Some(later)) => [after, early, later].concat(),
                _ => merge_keeping_both(before, &late.bytes, &cur.bytes)?,
            },
            mode: cur.mode,
        },
        None => late.clone(),
    };
    replace_with(abs, id, &merged)
}

/// Write `state` to `abs` by a synced temp file and a rename.
fn replace_with(abs: &Path, id: &str, state: &FileState) -> Result<(), EditError> {
    let (tmp, file) = write_temp(abs, id, state)?;
    file.sync_all()
        .map_err(|e| EditError::io("sync temp file", &tmp, e))?;
    std::fs::rename(&tmp, abs).map_err(|e| EditError::io("rename into place", abs, e))?;
    sync_parent(abs);
    Ok(())
}

/// 3-way merge where a conflict keeps both sides, `ours` first (git's union merge): used only
/// to put back bytes the user wrote, for which order in time is `ours` then `theirs`.
fn merge_keeping_both(base: &[u8], ours: &[u8], theirs: &[u8]) -> Result<Vec<u8>, EditError> {
    fn input(bytes: &[u8]) -> git2::MergeFileInput<'_> {
        let mut i = git2::MergeFileInput::new();
        i.content(bytes);
        i
    }
    let mut opts = git2::MergeFileOptions::new();
    opts.favor(git2::FileFavor::Union);
    let merged = git2::merge_file(&input(base), &input(ours), &input(theirs), Some(&mut opts))
        .map_err(|e| EditError::Internal(format!("merge file contents: {e}")))?;
    Ok(merged.content().to_vec())
}

/// Zero a slot's magic so it no longer names a pending operation. Not synced: if the zeroing is
/// lost in a power cut, recovery finds the operation's id in the ledger and does nothing.
fn clear(slot: &Path) {
    let result = OpenOptions::new()
        .write(true)
        .open(slot)
        .and_then(|f| f.write_all_at(&[0; MAGIC.len()], 0));
    if let Err(e) = result {
        tracing::warn!(error = %e, journal = %slot.display(), "cannot retire journal");
    }
}

/// The journal slot of the repository at `workdir`.
fn slot_path(journal_dir: &Path, workdir: &Path) -> PathBuf {
    let key = Oid::hash_object(ObjectType::Blob, workdir.as_os_str().as_bytes())
        .map(|o| o.to_string())
        .unwrap_or_default();
    journal_dir.join(format!("{}.{SLOT_EXT}", &key[..key.len().min(16)]))
}

fn encode(journal: &Journal) -> Result<Vec<u8>, EditError> {
    let stored = |s: &Option<FileState>| {
        s.as_ref().map(|s| Stored {
            mode: s.mode,
            len: s.bytes.len() as u64,
        })
    };
    let header = Header {
        version: journal.version,
        id: journal.id.clone(),
        workdir: journal.workdir.clone(),
        operation: journal.operation.clone(),
        files: journal
            .files
            .iter()
            .map(|f| HeaderFile {
                path: f.path.clone(),
                before: stored(&f.before),
                after: stored(&f.after),
            })
            .collect(),
        created_dirs: journal.created_dirs.clone(),
    };
    let header = serde_json::to_vec(&header)
        .map_err(|e| EditError::Internal(format!("encode journal: {e}")))?;
    let header_len = u32::try_from(header.len())
        .map_err(|_| EditError::Internal("journal header too large".into()))?;
    let contents: usize = journal
        .files
        .iter()
        .flat_map(|f| [&f.before, &f.after])
        .map(|s| s.as_ref().map_or(0, |s| s.bytes.len()))
        .sum();
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + contents + CHECKSUM_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&header);
    for f in &journal.files {
        for s in [&f.before, &f.after].into_iter().flatten() {
            out.extend_from_slice(&s.bytes);
        }
    }
    let sum = checksum(&out)?;
    out.extend_from_slice(sum.as_bytes());
    Ok(out)
}

/// Decode a slot's bytes: `Ok(None)` for a retired (or never used) slot.
fn decode(bytes: &[u8]) -> Result<Option<Journal>, String> {
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] == [0; MAGIC.len()] {
        return Ok(None);
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a journal of this spark version".into());
    }
    let rest = &bytes[MAGIC.len()..];
    let torn = || "torn journal (interrupted before it was synced)".to_owned();
    let len_bytes: [u8; 4] = rest
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(torn)?;
    let header_len = u32::from_le_bytes(len_bytes) as usize;
    let header_bytes = rest.get(4..4 + header_len).ok_or_else(torn)?;
    let header: Header = serde_json::from_slice(header_bytes).map_err(|_| torn())?;
    if header.version != JOURNAL_VERSION {
        return Err(format!("unsupported journal version {}", header.version));
    }
    let mut at = MAGIC.len() + 4 + header_len;
    let mut take = |s: Option<Stored>| -> Result<Option<FileState>, String> {
        s.map(|s| {
            let end = usize::try_from(s.len)
                .ok()
                .and_then(|l| at.checked_add(l))
                .ok_or_else(torn)?;
            let bytes = bytes.get(at..end).ok_or_else(torn)?.to_vec();
            at = end;
            Ok(FileState {
                bytes,
                mode: s.mode,
            })
        })
        .transpose()
    };
    let mut files = Vec::with_capacity(header.files.len());
    for f in header.files {
        let before = take(f.before)?;
        let after = take(f.after)?;
        files.push(Write1 {
            path: f.path,
            before,
            after,
        });
    }
    let stored_sum = bytes.get(at..at + CHECKSUM_LEN).ok_or_else(torn)?;
    let sum = checksum(&bytes[..at]).map_err(|e| e.to_string())?;
    if stored_sum != sum.as_bytes() {
        return Err(torn());
    }
    Ok(Some(Journal {
        version: header.version,
        id: header.id,
        workdir: header.workdir,
        operation: header.operation,
        files,
        created_dirs: header.created_dirs,
    }))
}

fn checksum(bytes: &[u8]) -> Result<Oid, EditError> {
    Oid::hash_object(ObjectType::Blob, bytes).map_err(|e| EditError::git("checksum journal", e))
}

/// Overwrite the slot in place with `bytes` and sync it. Older, longer content past the end is
/// ignored (the header gives every length); the slot only grows.
fn save(
    journal_dir: &Path,
    slot: &Path,
    bytes: &[u8],
    durability: Durability,
) -> Result<(), EditError> {
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .open(slot)
    };
    let (f, created) = match open() {
        Ok(f) => (f, false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(journal_dir)
                .map_err(|e| EditError::io("create journal directory", journal_dir, e))?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(slot)
                .map_err(|e| EditError::io("create journal", slot, e))?;
            (f, true)
        }
        Err(e) => return Err(EditError::io("open journal", slot, e)),
    };
    // The slot only grows, so an edit of a huge file would otherwise pin that size forever.
    let shrink = f
        .metadata()
        .map(|m| m.len() > SLOT_KEEP_BYTES && m.len() > 2 * bytes.len() as u64)
        .unwrap_or(false);
    f.write_all_at(bytes, 0)
        .and_then(|()| {
            if shrink {
                f.set_len(bytes.len() as u64)
            } else {
                Ok(())
            }
        })
        .and_then(|()| {
            if durability.fsync {
                f.sync_data()
            } else {
                Ok(())
            }
        })
        .map_err(|e| EditError::io("write journal", slot, e))?;
    if created && durability.fsync {
        sync_dir(journal_dir);
    }
    Ok(())
}

fn write_all(
    journal: &Journal,
    durability: Durability,
    failpoint: &Failpoint,
) -> Result<(), EditError> {
    let workdir = &journal.workdir;
    let writes = &journal.files;
    // Directories whose entries change, to sync once each after the renames.
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut touch_dir = |abs: &Path| {
        if let Some(dir) = abs.parent()
            && !dirs.iter().any(|d| d == dir)
        {
            dirs.push(dir.to_owned());
        }
    };
    for dir in &journal.created_dirs {
        let abs = workdir.join(dir);
        match std::fs::create_dir(&abs) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(EditError::io("create directory", &abs, e)),
        }
        touch_dir(&abs);
    }
    // Stage every new content first, so the renames below are the only visible step. With
    // fsync, the temp files are synced a batch at a time (bounding the open files).
    let mut staged: Vec<(PathBuf, Option<PathBuf>)> = Vec::with_capacity(writes.len());
    let mut unsynced: Vec<(PathBuf, File)> = Vec::new();
    let mut result = Ok(());
    for w in writes {
        let abs = workdir.join(&w.path);
        let tmp = match &w.after {
            Some(after) => match write_temp(&abs, &journal.id, after) {
                Ok((tmp, file)) => {
                    if durability.fsync {
                        unsynced.push((tmp.clone(), file));
                    }
                    Some(tmp)
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            },
            None => None,
        };
        staged.push((abs, tmp));
        if unsynced.len() == SYNC_BATCH {
            result = sync_temps(&std::mem::take(&mut unsynced));
            if result.is_err() {
                break;
            }
        }
    }
    if result.is_ok() {
        result = sync_temps(&unsynced);
    }
    drop(unsynced);
    // A second link to each inode about to be replaced, made before the compare-and-swap read:
    // whatever reaches the old inode after that read stays reachable (module docs).
    let mut linked = vec![false; writes.len()];
    if result.is_ok() {
        for (n, (w, (abs, _))) in writes.iter().zip(&staged).enumerate() {
            if w.before.is_none() {
                continue;
            }
            match std::fs::hard_link(abs, old_path(abs, &journal.id)) {
                Ok(()) => linked[n] = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    result = Err(EditError::Changed {
                        path: w.path.clone(),
                    });
                    break;
                }
                // A filesystem without hard links: the edit goes on without the safeguard.
                Err(e) => {
                    tracing::debug!(path = %w.path, error = %e, "no second link to the replaced file");
                }
            }
        }
    }
    // Compare-and-swap: the bytes on disk must still be exactly what the edit was computed from.
    if result.is_ok() {
        for (w, (abs, _)) in writes.iter().zip(&staged) {
            match read_state(abs) {
                Ok(state)
                    if state.as_ref().map(|s| &s.bytes) == w.before.as_ref().map(|s| &s.bytes) => {}
                Ok(_) => {
                    result = Err(EditError::Changed {
                        path: w.path.clone(),
                    });
                    break;
                }
                Err(e) => {
                    result = Err(EditError::io("read", abs, e));
                    break;
                }
            }
        }
    }
    failpoint.step("checked");
    if result.is_ok() {
        for (n, (abs, tmp)) in staged.iter().enumerate() {
            let step = match tmp {
                Some(tmp) => std::fs::rename(tmp, abs)
                    .map_err(|e| EditError::io("rename into place", abs, e)),
                None => std::fs::remove_file(abs).map_err(|e| EditError::io("delete", abs, e)),
            };
            if let Err(e) = step {
                result = Err(e);
                break;
            }
            touch_dir(abs);
            failpoint.hit(&format!("after_file_{}", n + 1));
        }
    }
    failpoint.step("renamed");
    // The user wrote to a file between the read above and its rename: those bytes are in the
    // old inode only. Refused as if the compare-and-swap had seen them; the caller's rollback
    // renames the old inode back.
    if result.is_ok() {
        for (w, (abs, _)) in writes
            .iter()
            .zip(&staged)
            .zip(&linked)
            .filter_map(|(x, l)| l.then_some(x))
        {
            let old = old_path(abs, &journal.id);
            let still = std::fs::read(&old).map_err(|e| EditError::io("read", &old, e));
            match still {
                Ok(bytes) if Some(&bytes) == w.before.as_ref().map(|b| &b.bytes) => {}
                Ok(_) => {
                    result = Err(EditError::Changed {
                        path: w.path.clone(),
                    });
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
    }
    for (_, tmp) in &staged {
        if let Some(tmp) = tmp {
            let _ = std::fs::remove_file(tmp);
        }
    }
    if result.is_ok() && durability.fsync {
        for dir in &dirs {
            sync_dir(dir);
        }
    }
    result
}

/// Sync temp files. With several, they are synced concurrently so the filesystem can commit
/// them together instead of one journal commit each.
fn sync_temps(files: &[(PathBuf, File)]) -> Result<(), EditError> {
    let sync = |(path, f): &(PathBuf, File)| {
        f.sync_all()
            .map_err(|e| EditError::io("sync temp file", path, e))
    };
    match files {
        [] => Ok(()),
        [one] => sync(one),
        [first, rest @ ..] => std::thread::scope(|s| {
            let handles: Vec<_> = rest.iter().map(|t| s.spawn(move || sync(t))).collect();
            let mut result = sync(first);
            for h in handles {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(EditError::Internal("sync thread panicked".into())));
                if result.is_ok() {
                    result = r;
                }
            }
            result
        }),
    }
}

/// What an interrupted operation did to one of its files.
enum Replaced {
    /// Not replaced: the file holds its before state, or that plus the user's bytes.
    No,
    /// Replaced; the link to the old inode, where one was made.
    Yes { old: Option<PathBuf> },
    /// Neither holds, from content alone (no link to tell): a file the user changed since.
    Unknown,
}

/// Whether `f` was replaced, from its link to the old inode where there is one (exact), else
/// from content. `had_temp` says whether its staged temp file was still there.
fn replaced(journal: &Journal, f: &Write1, had_temp: bool) -> Result<Replaced, EditError> {
    let abs = journal.workdir.join(&f.path);
    let old = old_path(&abs, &journal.id);
    if f.before.is_some()
        && let Ok(link) = std::fs::symlink_metadata(&old)
    {
        use std::os::unix::fs::MetadataExt;
        let same = match std::fs::symlink_metadata(&abs) {
            Ok(m) => m.dev() == link.dev() && m.ino() == link.ino(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(EditError::io("read", &abs, e)),
        };
        return Ok(if same {
            Replaced::No
        } else {
            Replaced::Yes { old: Some(old) }
        });
    }
    let current = read_state(&abs).map_err(|e| EditError::io("read", &abs, e))?;
    let bytes = |s: &Option<FileState>| s.as_ref().map(|s| s.bytes.clone());
    Ok(if bytes(&current) == bytes(&f.before) || had_temp {
        Replaced::No
    } else if bytes(&current) == bytes(&f.after) {
        Replaced::Yes { old: None }
    } else {
        Replaced::Unknown
    })
}

/// Put every replaced file of `journal` back to its before state. A replaced file with a link
/// to its old inode gets that inode back, with anything the user wrote to it; bytes the user
/// wrote to the new file since are merged in. Without a link (a filesystem without hard links),
/// a file holding its after state is rewritten; one the user changed since is left alone.
pub(crate) fn rollback(journal: &Journal) -> Result<(), EditError> {
    let workdir = &journal.workdir;
    for f in &journal.files {
        let abs = workdir.join(&f.path);
        let tmp = temp_path(&abs, &journal.id);
        let had_temp = std::fs::symlink_metadata(&tmp).is_ok();
        let _ = std::fs::remove_file(&tmp);
        let current = read_state(&abs).map_err(|e| EditError::io("read", &abs, e))?;
        let is_after = current.as_ref().map(|s| &s.bytes) == f.after.as_ref().map(|s| &s.bytes);
        match replaced(journal, f, had_temp)? {
            Replaced::No => {}
            Replaced::Unknown => {
                tracing::warn!(path = %f.path, "file changed since the interrupted edit; leaving it as it is");
            }
            Replaced::Yes { old: Some(old) } if is_after => {
                std::fs::rename(&old, &abs).map_err(|e| EditError::io("restore", &abs, e))?;
                sync_parent(&abs);
            }
            Replaced::Yes { old: Some(old) } => {
                // The user wrote to the new file (or removed it): the edit comes out of it, and
                // what they wrote to either inode stays.
                let kept = read_state(&old)
                    .map_err(|e| EditError::io("read", &old, e))?
                    .ok_or_else(|| {
                        EditError::io("read", &old, std::io::ErrorKind::NotFound.into())
                    })?;
                let after = content(&f.after);
                let bytes = match current.as_ref().map(|c| c.bytes.strip_prefix(after)) {
                    Some(Some(later)) => [kept.bytes.as_slice(), later].concat(),
                    Some(None) => merge_keeping_both(after, &kept.bytes, content(&current))?,
                    None => kept.bytes.clone(),
                };
                let mode = current.as_ref().map_or(kept.mode, |c| c.mode);
                replace_with(&abs, &journal.id, &FileState { bytes, mode })?;
                let _ = std::fs::remove_file(&old);
                tracing::warn!(path = %f.path, "file written during the interrupted edit; the edit was merged out of it");
            }
            Replaced::Yes { old: None } => {
                match &f.before {
                    Some(state) => {
                        let (tmp, file) = write_temp(&abs, &journal.id, state)?;
                        file.sync_all()
                            .map_err(|e| EditError::io("sync temp file", &tmp, e))?;
                        std::fs::rename(&tmp, &abs)
                            .map_err(|e| EditError::io("restore", &abs, e))?;
                    }
                    None => {
                        std::fs::remove_file(&abs).map_err(|e| EditError::io("remove", &abs, e))?
                    }
                }
                sync_parent(&abs);
            }
        }
        let _ = std::fs::remove_file(old_path(&abs, &journal.id));
    }
    for dir in journal.created_dirs.iter().rev() {
        // Only empty directories go: anything the user put there since stays.
        let _ = std::fs::remove_dir(workdir.join(dir));
    }
    Ok(())
}

/// Whether every file of `journal` was replaced and no old inode took bytes after the
/// compare-and-swap read: the writes all landed, as a live operation would have found.
pub(crate) fn landed(journal: &Journal) -> Result<bool, EditError> {
    for f in &journal.files {
        let abs = journal.workdir.join(&f.path);
        let had_temp = std::fs::symlink_metadata(temp_path(&abs, &journal.id)).is_ok();
        match replaced(journal, f, had_temp)? {
            Replaced::No | Replaced::Unknown => return Ok(false),
            Replaced::Yes { old: None } => {}
            Replaced::Yes { old: Some(old) } => {
                let bytes = std::fs::read(&old).map_err(|e| EditError::io("read", &old, e))?;
                if Some(&bytes) != f.before.as_ref().map(|b| &b.bytes) {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}

/// Journals left pending by a previous daemon.
pub(crate) fn pending(journal_dir: &Path) -> Vec<(PathBuf, Result<Journal, String>)> {
    let Ok(entries) = std::fs::read_dir(journal_dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == SLOT_EXT))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| {
            let j = std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| decode(&b));
            match j {
                Ok(None) => None,
                Ok(Some(j)) => Some((p, Ok(j))),
                Err(e) => Some((p, Err(e))),
            }
        })
        .collect()
}

/// The current state of a worktree file (`None` if absent).
pub(crate) fn read_state(abs: &Path) -> std::io::Result<Option<FileState>> {
    match std::fs::symlink_metadata(abs) {
        Ok(meta) => {
            let bytes = std::fs::read(abs)?;
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o100755
            } else {
                0o100644
            };
            Ok(Some(FileState { bytes, mode }))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn temp_path(abs: &Path, id: &str) -> PathBuf {
    let name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    abs.with_file_name(format!(".{name}.spark-{id}.tmp"))
}

fn content(state: &Option<FileState>) -> &[u8] {
    state
        .as_ref()
        .map(|s| s.bytes.as_slice())
        .unwrap_or_default()
}

/// The second link to a replaced file's old inode. Named like a temp file, so the watcher
/// ignores it.
fn old_path(abs: &Path, id: &str) -> PathBuf {
    let name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    abs.with_file_name(format!(".{name}.spark-{id}.old.tmp"))
}

fn write_temp(abs: &Path, id: &str, state: &FileState) -> Result<(PathBuf, File), EditError> {
    let tmp = temp_path(abs, id);
    let perms = file_perms(
        std::fs::metadata(abs)
            .ok()
            .map(|m| m.permissions().mode() & 0o7777),
        state.mode,
    );
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| EditError::io("create a temp file beside", abs, e))?;
    let done = f
        .write_all(&state.bytes)
        .and_then(|()| f.set_permissions(std::fs::Permissions::from_mode(perms)));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(EditError::io("write the new content of", abs, e));
    }
    Ok((tmp, f))
}

/// Permission bits for a file written in state `mode` over a file with bits `existing`: the
/// file's own bits are kept exactly (not just the executable bit git knows about) unless the
/// executable state itself changes, which then follows the read bits.
fn file_perms(existing: Option<u32>, mode: u32) -> u32 {
    let want_exec = mode == 0o100755;
    match existing {
        Some(p) if (p & 0o111 != 0) == want_exec => p,
        Some(p) if want_exec => p | ((p & 0o444) >> 2),
        Some(p) => p & !0o111,
        None if want_exec => 0o755,
        None => 0o644,
    }
}

fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Directories on the way to `rel` that do not exist yet, outermost first.
fn missing_dirs(workdir: &Path, rel: &str, out: &mut Vec<String>) {
    let mut prefix = String::new();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        if !workdir.join(&prefix).exists() && !out.contains(&prefix) {
            out.push(prefix.clone());
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    t.wrapping_mul(1000)
        .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(bytes: &[u8]) -> Option<FileState> {
        Some(FileState {
            bytes: bytes.to_vec(),
            mode: 0o100644,
        })
    }

    fn sample() -> Journal {
        Journal {
            version: JOURNAL_VERSION,
            id: "00000000000000000001-1".into(),
            workdir: PathBuf::from("/w"),
            operation: Operation::Apply {
                source: "apply".into(),
                message: "m".into(),
                time_ms: 5,
            },
            files: vec![
                Write1 {
                    path: "a.txt".into(),
                    before: state(b"one\r\n"),
                    after: state(b"two\r\n"),
                },
                Write1 {
                    path: "new/b.txt".into(),
                    before: None,
                    after: Some(FileState {
                        bytes: vec![0xef, 0xbb, 0xbf, b'x'],
                        mode: 0o100755,
                    }),
                },
                Write1 {
                    path: "gone.txt".into(),
                    before: state(b""),
                    after: None,
                },
            ],
            created_dirs: vec!["new".into()],
        }
    }

    #[test]
    fn journals_round_trip_and_torn_or_retired_slots_are_recognised() {
        let j = sample();
        let bytes = encode(&j).unwrap();
        assert_eq!(decode(&bytes), Ok(Some(j.clone())));
        // A slot keeps older, longer content past the end; it is ignored.
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"older journal tail");
        assert_eq!(decode(&longer), Ok(Some(j)));
        // Every prefix (a write cut short) is torn, never a different journal.
        for n in MAGIC.len()..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        // A flipped content byte fails the checksum.
        let mut flipped = bytes.clone();
        let at = bytes.len() - CHECKSUM_LEN - 2;
        flipped[at] ^= 1;
        assert!(decode(&flipped).is_err());
        // Retired (zeroed magic) and empty slots hold nothing.
        let mut retired = bytes;
        retired[..MAGIC.len()].fill(0);
        assert_eq!(decode(&retired), Ok(None));
        assert_eq!(decode(b""), Ok(None));
    }

    #[test]
    fn a_finished_operation_whose_journal_survived_is_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init(dir.path()).unwrap();
        let w = dir.path();
        std::fs::write(w.join("a.txt"), "a\n").unwrap();
        std::fs::write(w.join("b.txt"), "b\n").unwrap();
        let env = super::super::EditEnv {
            journal_dir: jdir.path().to_owned(),
            durability: Durability { fsync: true },
            failpoint: Failpoint(None),
            history: Default::default(),
        };
        let ctx = super::super::RepoCtx {
            repo: &repo,
            workdir: w,
            env: &env,
            tracked: &Default::default(),
        };
        let writes = vec![
            Write1 {
                path: "a.txt".into(),
                before: state(b"a\n"),
                after: state(b"A\n"),
            },
            Write1 {
                path: "b.txt".into(),
                before: state(b"b\n"),
                after: state(b"B\n"),
            },
        ];
        let op = Operation::Apply {
            source: "apply".into(),
            message: "loud".into(),
            time_ms: 1_700_000_000_000,
        };
        let pending = commit(w, jdir.path(), op, &writes, env.durability, &env.failpoint).unwrap();
        let slot_bytes = std::fs::read(&pending.slot).unwrap();
        let changes: Vec<_> = writes
            .iter()
            .map(|w| super::super::FileChange {
                path: w.path.clone(),
                before: w.before.clone(),
                after: w.after.clone(),
            })
            .collect();
        super::super::finish_apply(&ctx, false, &pending.id, &changes, "apply", "loud", 1).unwrap();
        finish(&pending, &env.failpoint);
        assert!(self::pending(jdir.path()).is_empty(), "retired");

        // The user goes on editing; then a power cut loses the slot's retirement.
        std::fs::write(w.join("b.txt"), "B\nuser\n").unwrap();
        std::fs::write(&pending.slot, &slot_bytes).unwrap();
        let found = self::pending(jdir.path());
        assert_eq!(found.len(), 1);
        let journal = found.into_iter().next().unwrap().1.unwrap();
        assert_eq!(
            super::super::recover(&ctx, &journal).unwrap(),
            "already finished"
        );
        assert_eq!(std::fs::read(w.join("a.txt")).unwrap(), b"A\n");
        assert_eq!(std::fs::read(w.join("b.txt")).unwrap(), b"B\nuser\n");
        assert_eq!(
            super::super::ledger::summaries(repo.path()).unwrap().len(),
            1
        );
    }

    /// Two committed-looking files and one the "typist" appends to, with the edit's writes.
    fn typist_tree() -> (tempfile::TempDir, tempfile::TempDir, Vec<Write1>) {
        let dir = tempfile::tempdir().unwrap();
        let jdir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "a\n").unwrap();
        std::fs::write(dir.path().join("b.txt"), "b\n").unwrap();
        std::fs::write(dir.path().join("typed.txt"), "h\n").unwrap();
        let writes = ["a", "b", "h"]
            .iter()
            .zip(["a.txt", "b.txt", "typed.txt"])
            .map(|(c, path)| Write1 {
                path: path.into(),
                before: state(format!("{c}\n").as_bytes()),
                after: state(format!("{}\n", c.to_uppercase()).as_bytes()),
            })
            .collect();
        (dir, jdir, writes)
    }

    fn append(path: &Path, text: &str) {
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn read(dir: &Path, rel: &str) -> String {
        std::fs::read_to_string(dir.join(rel)).unwrap()
    }

    /// Run `commit` with `at(step)` called at each step of it on this thread.
    fn commit_with(
        dir: &Path,
        jdir: &Path,
        writes: &[Write1],
        at: impl FnMut(&str) + 'static,
    ) -> Result<Pending, EditError> {
        STEP.with(|h| *h.borrow_mut() = Some(Box::new(at)));
        let op = Operation::Apply {
            source: "apply".into(),
            message: "m".into(),
            time_ms: 1,
        };
        let result = commit(
            dir,
            jdir,
            op,
            writes,
            Durability { fsync: false },
            &Failpoint(None),
        );
        STEP.with(|h| *h.borrow_mut() = None);
        result
    }

    #[test]
    fn bytes_appended_after_the_check_are_kept_and_the_edit_is_refused_whole() {
        let (dir, jdir, writes) = typist_tree();
        let typed = dir.path().join("typed.txt");
        let err = commit_with(dir.path(), jdir.path(), &writes, move |step| {
            if step == "checked" {
                append(&typed, "typist 1\n");
            }
        })
        .err()
        .expect("refused");
        assert!(
            matches!(&err, EditError::Changed { path } if path == "typed.txt"),
            "{err:?}"
        );
        assert_eq!(read(dir.path(), "a.txt"), "a\n");
        assert_eq!(read(dir.path(), "b.txt"), "b\n");
        assert_eq!(read(dir.path(), "typed.txt"), "h\ntypist 1\n");
        assert_eq!(names(dir.path()), ["a.txt", "b.txt", "typed.txt"]);
    }

    #[test]
    fn a_write_through_a_handle_opened_before_the_rename_is_not_lost() {
        let (dir, jdir, writes) = typist_tree();
        let typed = dir.path().join("typed.txt");
        let mut held: Option<File> = None;
        let err = commit_with(dir.path(), jdir.path(), &writes, move |step| match step {
            // The editor opened the file before the rename and writes after it: to the old
            // inode. A second writer appends to the new file by name.
            "checked" => held = Some(OpenOptions::new().append(true).open(&typed).unwrap()),
            "renamed" => {
                held.take().unwrap().write_all(b"typist 1\n").unwrap();
                append(&typed, "typist 2\n");
            }
            _ => {}
        })
        .err()
        .expect("refused");
        assert!(
            matches!(&err, EditError::Changed { path } if path == "typed.txt"),
            "{err:?}"
        );
        assert_eq!(read(dir.path(), "a.txt"), "a\n");
        assert_eq!(read(dir.path(), "typed.txt"), "h\ntypist 1\ntypist 2\n");
        assert_eq!(names(dir.path()), ["a.txt", "b.txt", "typed.txt"]);
    }

    #[test]
    fn recovery_tells_replaced_files_with_typed_bytes_from_untouched_ones() {
        // Every file replaced, then typed on: landed, and settling keeps the typing.
        let (dir, jdir, writes) = typist_tree();
        let pending = commit_with(dir.path(), jdir.path(), &writes, |_| {}).unwrap();
        append(&dir.path().join("typed.txt"), "typist 1\n");
        assert!(
            landed(&pending.journal).unwrap(),
            "after plus typing is landed"
        );
        settle(&pending.journal);
        assert_eq!(read(dir.path(), "typed.txt"), "H\ntypist 1\n");
        assert_eq!(names(dir.path()), ["a.txt", "b.txt", "typed.txt"]);

        // Killed after a.txt and typed.txt were replaced but not b.txt, with typing on typed.txt:
        // not landed, and the rollback takes the edit out of typed.txt, keeping the typing.
        let (dir, jdir, writes) = typist_tree();
        let pending = commit_with(dir.path(), jdir.path(), &writes, |_| {}).unwrap();
        let b = dir.path().join("b.txt");
        std::fs::rename(old_path(&b, &pending.id), &b).unwrap();
        append(&dir.path().join("typed.txt"), "typist 1\n");
        assert!(!landed(&pending.journal).unwrap());
        rollback(&pending.journal).unwrap();
        assert_eq!(read(dir.path(), "a.txt"), "a\n");
        assert_eq!(read(dir.path(), "b.txt"), "b\n");
        assert_eq!(read(dir.path(), "typed.txt"), "h\ntypist 1\n");
        assert_eq!(names(dir.path()), ["a.txt", "b.txt", "typed.txt"]);

        // Killed before any rename, with typing: nothing replaced, the typing is the user's.
        let (dir, jdir, writes) = typist_tree();
        let pending = commit_with(dir.path(), jdir.path(), &writes, |_| {}).unwrap();
        for f in ["a.txt", "b.txt", "typed.txt"] {
            let abs = dir.path().join(f);
            std::fs::rename(old_path(&abs, &pending.id), &abs).unwrap();
            std::fs::hard_link(&abs, old_path(&abs, &pending.id)).unwrap();
        }
        append(&dir.path().join("typed.txt"), "typist 1\n");
        assert!(!landed(&pending.journal).unwrap());
        rollback(&pending.journal).unwrap();
        assert_eq!(read(dir.path(), "typed.txt"), "h\ntypist 1\n");
        assert_eq!(read(dir.path(), "a.txt"), "a\n");
        assert_eq!(names(dir.path()), ["a.txt", "b.txt", "typed.txt"]);
    }

    #[test]
    fn a_slot_is_rewritten_in_place_and_cut_back_after_a_huge_journal() {
        let jdir = tempfile::tempdir().unwrap();
        let slot = slot_path(jdir.path(), Path::new("/some/repo"));
        let fsync = Durability { fsync: false };
        let small = encode(&sample()).unwrap();
        save(jdir.path(), &slot, &small, fsync).unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&slot).unwrap());
        let huge = vec![7u8; 3 << 20];
        save(jdir.path(), &slot, &huge, fsync).unwrap();
        assert_eq!(std::fs::metadata(&slot).unwrap().len(), huge.len() as u64);
        save(jdir.path(), &slot, &small, fsync).unwrap();
        let meta = std::fs::metadata(&slot).unwrap();
        assert_eq!(meta.len(), small.len() as u64, "cut back");
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&meta),
            ino,
            "same file throughout"
        );
        assert_eq!(decode(&std::fs::read(&slot).unwrap()), Ok(Some(sample())));
    }

    #[test]
    fn an_edit_of_more_files_than_the_open_file_limit_lands_with_fsync() {
        // Many sync batches: temps are synced (and held open) a batch at a time, so an edit is
        // never bounded by the open-file limit (often 1024); all land, none is left behind.
        let dir = tempfile::tempdir().unwrap();
        let jdir = tempfile::tempdir().unwrap();
        let w = dir.path();
        let writes: Vec<Write1> = (0..1100)
            .map(|i| Write1 {
                path: format!("d{}/f{i}.txt", i % 7),
                before: None,
                after: state(format!("{i}\n").as_bytes()),
            })
            .collect();
        let op = Operation::Apply {
            source: "apply".into(),
            message: "many".into(),
            time_ms: 1,
        };
        let durability = Durability { fsync: true };
        let pending = commit(w, jdir.path(), op, &writes, durability, &Failpoint(None)).unwrap();
        finish(&pending, &Failpoint(None));
        for (i, wr) in writes.iter().enumerate() {
            assert_eq!(
                std::fs::read(w.join(&wr.path)).unwrap(),
                format!("{i}\n").as_bytes()
            );
        }
        let leftovers: Vec<_> = (0..7)
            .flat_map(|d| std::fs::read_dir(w.join(format!("d{d}"))).unwrap())
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_torn_journal_is_reported_not_replayed() {
        let jdir = tempfile::tempdir().unwrap();
        let bytes = encode(&sample()).unwrap();
        std::fs::write(
            jdir.path().join("0123456789abcdef.journal"),
            &bytes[..bytes.len() / 2],
        )
        .unwrap();
        let found = pending(jdir.path());
        assert_eq!(found.len(), 1);
        assert!(found[0].1.as_ref().unwrap_err().contains("torn"));
    }

    #[test]
    fn permission_bits_are_kept_unless_the_exec_state_changes() {
        assert_eq!(file_perms(Some(0o750), 0o100755), 0o750);
        assert_eq!(file_perms(Some(0o600), 0o100644), 0o600);
        assert_eq!(file_perms(Some(0o640), 0o100755), 0o750);
        assert_eq!(file_perms(Some(0o755), 0o100644), 0o644);
        assert_eq!(file_perms(None, 0o100755), 0o755);
        assert_eq!(file_perms(None, 0o100644), 0o644);
    }
}
