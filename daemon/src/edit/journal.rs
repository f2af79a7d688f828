//! All-or-nothing writes to the worktree, across `kill -9`.
//!
//! Before the first file changes, a journal naming every file's before and after state (as blob
//! ids already stored in the repository's object database) is written and synced. Files are then
//! written atomically (temp file in the same directory, fsync, rename) after re-checking that
//! each still holds its expected bytes. The journal is deleted once the edit is recorded. At
//! daemon start, recovery reads the files themselves: if every one holds its after state, the
//! operation rolls forward (recorded now); otherwise each file still in its after state is put
//! back (all-before). Deciding from content, not from a phase marker, saves a second synced
//! journal write on every edit.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use git2::{Oid, Repository};
use serde::{Deserialize, Serialize};

use super::EditError;
use super::record::FileState;

/// Bumped on any incompatible change of the journal format.
const JOURNAL_VERSION: u32 = 1;

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

/// One file's before and after state, by blob id (`None` = absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JournalFile {
    pub(crate) path: String,
    pub(crate) before: Option<BlobRef>,
    pub(crate) after: Option<BlobRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BlobRef {
    pub(crate) blob: HexOid,
    pub(crate) mode: u32,
}

/// An object id stored as hex in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub(crate) struct HexOid(pub(crate) Oid);

impl TryFrom<String> for HexOid {
    type Error = git2::Error;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Oid::from_str(&s).map(HexOid)
    }
}

impl From<HexOid> for String {
    fn from(o: HexOid) -> String {
        o.0.to_string()
    }
}

/// The journal file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Journal {
    pub(crate) version: u32,
    pub(crate) id: String,
    pub(crate) workdir: PathBuf,
    pub(crate) operation: Operation,
    pub(crate) files: Vec<JournalFile>,
    /// Directories created for new files, outermost first; removed again on rollback if empty.
    pub(crate) created_dirs: Vec<String>,
}

/// A file to write: its repository-relative path with before and after contents.
#[derive(Debug, Clone)]
pub(crate) struct Write1 {
    pub(crate) path: String,
    pub(crate) before: Option<FileState>,
    pub(crate) after: Option<FileState>,
}

/// Crash-test hooks: abort the process at a named point of [`commit`]. Off unless configured.
#[derive(Debug, Clone, Default)]
pub(crate) struct Failpoint(pub(crate) Option<String>);

impl Failpoint {
    pub(crate) fn hit(&self, name: &str) {
        if self.0.as_deref() == Some(name) {
            tracing::error!(failpoint = name, "failpoint hit: aborting");
            std::process::abort();
        }
    }
}

/// Whether to fsync files and directories. Off only in benchmarks that measure without it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Durability {
    pub(crate) fsync: bool,
}

/// Write `writes` to the worktree of `repo` all together, journalled in `journal_dir`.
/// Returns the journal's path; the caller records the operation, then calls [`finish`]. Nothing is left changed on error.
pub(crate) fn commit(
    repo: &Repository,
    workdir: &Path,
    journal_dir: &Path,
    operation: Operation,
    writes: &[Write1],
    durability: Durability,
    failpoint: &Failpoint,
) -> Result<PathBuf, EditError> {
    let store = |s: &Option<FileState>| -> Result<Option<BlobRef>, EditError> {
        s.as_ref()
            .map(|f| {
                repo.blob(&f.bytes)
                    .map(|oid| BlobRef {
                        blob: HexOid(oid),
                        mode: f.mode,
                    })
                    .map_err(|e| EditError::git("store blob", e))
            })
            .transpose()
    };
    let mut files = Vec::with_capacity(writes.len());
    let mut created_dirs = Vec::new();
    for w in writes {
        files.push(JournalFile {
            path: w.path.clone(),
            before: store(&w.before)?,
            after: store(&w.after)?,
        });
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
        files,
        created_dirs,
    };
    std::fs::create_dir_all(journal_dir)
        .map_err(|e| EditError::io("create journal directory", journal_dir, e))?;
    let path = journal_dir.join(format!("{id}.json"));
    save(&path, &journal, durability)?;
    failpoint.hit("after_journal");

    match write_all(workdir, &journal, writes, durability, failpoint) {
        Ok(()) => {}
        Err(e) => {
            // Put back whatever landed, then forget the journal: the worktree is as before.
            if let Err(re) = rollback(repo, &journal) {
                tracing::error!(error = %re, journal = %path.display(), "rollback failed; journal kept for recovery");
                return Err(e);
            }
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    }
    failpoint.hit("after_written");
    Ok(path)
}

/// The operation is recorded: drop its journal.
pub(crate) fn finish(path: &Path, failpoint: &Failpoint) {
    failpoint.hit("before_finish");
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(error = %e, journal = %path.display(), "cannot remove journal");
    }
}

fn write_all(
    workdir: &Path,
    journal: &Journal,
    writes: &[Write1],
    durability: Durability,
    failpoint: &Failpoint,
) -> Result<(), EditError> {
    for dir in &journal.created_dirs {
        let abs = workdir.join(dir);
        match std::fs::create_dir(&abs) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(EditError::io("create directory", &abs, e)),
        }
    }
    // Stage every new content first, so the renames below are the only visible step.
    let mut staged = Vec::with_capacity(writes.len());
    for w in writes {
        let abs = workdir.join(&w.path);
        let tmp = match &w.after {
            Some(after) => Some(write_temp(&abs, &journal.id, after, durability)?),
            None => None,
        };
        staged.push((abs, tmp));
    }
    // Compare-and-swap: the bytes on disk must still be exactly what the edit was computed from.
    let mut result = Ok(());
    for (w, (abs, _)) in writes.iter().zip(&staged) {
        if read_state(abs)
            .map_err(|e| EditError::io("read", abs, e))?
            .map(|s| s.bytes)
            != w.before.as_ref().map(|s| s.bytes.clone())
        {
            result = Err(EditError::Changed {
                path: w.path.clone(),
            });
            break;
        }
    }
    if result.is_ok() {
        for (n, (w, (abs, tmp))) in writes.iter().zip(&staged).enumerate() {
            let step = match tmp {
                Some(tmp) => std::fs::rename(tmp, abs)
                    .map_err(|e| EditError::io("rename into place", abs, e)),
                None => std::fs::remove_file(abs).map_err(|e| EditError::io("delete", abs, e)),
            };
            if let Err(e) = step {
                result = Err(e);
                break;
            }
            if durability.fsync {
                sync_parent(abs);
            }
            let _ = w;
            failpoint.hit(&format!("after_file_{}", n + 1));
        }
    }
    for (_, tmp) in &staged {
        if let Some(tmp) = tmp {
            let _ = std::fs::remove_file(tmp);
        }
    }
    result
}

/// Restore every file of `journal` whose content is its after state (or a half-done temp) to
/// its before state. Files the user changed since are left alone.
pub(crate) fn rollback(repo: &Repository, journal: &Journal) -> Result<(), EditError> {
    let workdir = &journal.workdir;
    for f in &journal.files {
        let abs = workdir.join(&f.path);
        let _ = std::fs::remove_file(temp_path(&abs, &journal.id));
        let current = read_state(&abs).map_err(|e| EditError::io("read", &abs, e))?;
        let before = load(repo, f.before)?;
        let after = load(repo, f.after)?;
        let bytes = |s: &Option<FileState>| s.as_ref().map(|s| s.bytes.clone());
        if bytes(&current) == bytes(&before) {
            continue;
        }
        if bytes(&current) != bytes(&after) {
            tracing::warn!(path = %f.path, "file changed since the interrupted edit; leaving it as it is");
            continue;
        }
        match &before {
            Some(state) => {
                let tmp = write_temp(&abs, &journal.id, state, Durability { fsync: true })?;
                std::fs::rename(&tmp, &abs).map_err(|e| EditError::io("restore", &abs, e))?;
            }
            None => std::fs::remove_file(&abs).map_err(|e| EditError::io("remove", &abs, e))?,
        }
        sync_parent(&abs);
    }
    for dir in journal.created_dirs.iter().rev() {
        // Only empty directories go: anything the user put there since stays.
        let _ = std::fs::remove_dir(workdir.join(dir));
    }
    Ok(())
}

/// Whether every file of `journal` holds its after state: the writes all landed.
pub(crate) fn landed(repo: &Repository, journal: &Journal) -> Result<bool, EditError> {
    for f in &journal.files {
        let abs = journal.workdir.join(&f.path);
        let current = read_state(&abs).map_err(|e| EditError::io("read", &abs, e))?;
        let after = load(repo, f.after)?;
        if current.map(|s| s.bytes) != after.map(|s| s.bytes) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Read the before/after states of a journal back from the object database.
pub(crate) fn load(repo: &Repository, r: Option<BlobRef>) -> Result<Option<FileState>, EditError> {
    r.map(|r| {
        repo.find_blob(r.blob.0)
            .map(|b| FileState {
                bytes: b.content().to_vec(),
                mode: r.mode,
            })
            .map_err(|e| EditError::git("read journalled blob", e))
    })
    .transpose()
}

/// Journals left by a previous daemon, oldest first.
pub(crate) fn pending(journal_dir: &Path) -> Vec<(PathBuf, Result<Journal, String>)> {
    let Ok(entries) = std::fs::read_dir(journal_dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let j = std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Journal>(&b).map_err(|e| e.to_string()));
            (p, j)
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

fn write_temp(
    abs: &Path,
    id: &str,
    state: &FileState,
    durability: Durability,
) -> Result<PathBuf, EditError> {
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
        .map_err(|e| EditError::io("create temp file", &tmp, e))?;
    let done = f
        .write_all(&state.bytes)
        .and_then(|()| f.set_permissions(std::fs::Permissions::from_mode(perms)))
        .and_then(|()| {
            if durability.fsync {
                f.sync_all()
            } else {
                Ok(())
            }
        });
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(EditError::io("write temp file", &tmp, e));
    }
    Ok(tmp)
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

fn save(path: &Path, journal: &Journal, durability: Durability) -> Result<(), EditError> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(journal)
        .map_err(|e| EditError::Internal(format!("encode journal: {e}")))?;
    let mut f = File::create(&tmp).map_err(|e| EditError::io("create journal", &tmp, e))?;
    f.write_all(&bytes)
        .and_then(|()| {
            if durability.fsync {
                f.sync_all()
            } else {
                Ok(())
            }
        })
        .map_err(|e| EditError::io("write journal", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| EditError::io("commit journal", path, e))?;
    if durability.fsync {
        sync_parent(path);
    }
    Ok(())
}

fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
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
