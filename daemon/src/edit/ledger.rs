//! The edit ledger of record: an append-only JSON-lines file in the repository's git directory
//! (`.git/spark/ledger.jsonl`). Each line is an event about one edit; an edit's state is its
//! latest event. It lives beside the repository (not in the daemon's state or cache) so that it
//! travels with the repository and survives a lost cache; the edits themselves are git commits.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::EditError;

/// What happened to an edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum EventKind {
    Applied,
    Undone,
    Stashed,
}

/// One ledger line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// Full hex id of the edit commit W.
    pub(crate) edit: String,
    pub(crate) event: EventKind,
    /// Unix ms.
    pub(crate) at: u64,
    /// Where the edit came from: `apply`, `ask`, a plugin name.
    #[serde(default)]
    pub(crate) source: String,
    /// The prompt or message.
    #[serde(default)]
    pub(crate) message: String,
    #[serde(default)]
    pub(crate) files: Vec<String>,
    /// The journal of the operation that wrote this event, so recovery can tell a finished
    /// operation whose journal outlived it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) journal: String,
}

/// An edit with its current state, for `log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EditSummary {
    pub(crate) applied: Entry,
    pub(crate) state: EventKind,
    pub(crate) updated_at: u64,
}

pub(crate) fn path(git_dir: &Path) -> PathBuf {
    git_dir.join("spark").join("ledger.jsonl")
}

/// Append one event, synced: the ledger is the record users rely on for `log` and `undo`.
pub(crate) fn append(git_dir: &Path, entry: &Entry, fsync: bool) -> Result<(), EditError> {
    let p = path(git_dir);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).map_err(|e| EditError::io("create", dir, e))?;
    }
    let mut line = serde_json::to_vec(entry)
        .map_err(|e| EditError::Internal(format!("encode ledger entry: {e}")))?;
    line.push(b'\n');
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(&p)
        .map_err(|e| EditError::io("open", &p, e))?;
    // A crash mid-append leaves a torn last line: start on a fresh line so only it is lost.
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut last = [0u8; 1];
    if len > 0
        && std::os::unix::fs::FileExt::read_at(&f, &mut last, len - 1).is_ok()
        && last[0] != b'\n'
    {
        line.insert(0, b'\n');
    }
    f.write_all(&line)
        .and_then(|()| if fsync { f.sync_data() } else { Ok(()) })
        .map_err(|e| EditError::io("append to", &p, e))
}

/// Every edit, newest first, with its current state. Unreadable lines (a torn last line after a
/// crash) are skipped.
pub(crate) fn summaries(git_dir: &Path) -> Result<Vec<EditSummary>, EditError> {
    let p = path(git_dir);
    let text = match std::fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(EditError::io("read", &p, e)),
    };
    let mut out: Vec<EditSummary> = Vec::new();
    let mut by_edit: HashMap<String, usize> = HashMap::new();
    for entry in entries(&p, &text) {
        match by_edit.get(&entry.edit) {
            Some(&i) => {
                out[i].state = entry.event;
                out[i].updated_at = entry.at;
            }
            None if entry.event == EventKind::Applied => {
                by_edit.insert(entry.edit.clone(), out.len());
                out.push(EditSummary {
                    state: EventKind::Applied,
                    updated_at: entry.at,
                    applied: entry,
                });
            }
            None => {}
        }
    }
    out.reverse();
    Ok(out)
}

/// Whether an event written by the operation journalled as `journal` is in the ledger.
pub(crate) fn mentions_journal(git_dir: &Path, journal: &str) -> Result<bool, EditError> {
    let p = path(git_dir);
    let text = match std::fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(EditError::io("read", &p, e)),
    };
    Ok(entries(&p, &text).any(|e| e.journal == journal))
}

/// The worktree whose ledger (under `common_dir`, git's common directory) records `edit`, other
/// than the one whose git directory is `own_git_dir`. Refs under `refs/spark/` are shared by all
/// worktrees of a repository, but each worktree keeps its own ledger in its own git directory:
/// an edit belongs to the worktree that made it.
pub(crate) fn other_owner(
    common_dir: &Path,
    own_git_dir: &Path,
    edit: &str,
) -> Result<Option<PathBuf>, EditError> {
    let own = std::fs::canonicalize(own_git_dir).unwrap_or_else(|_| own_git_dir.to_path_buf());
    let mut candidates = vec![common_dir.to_path_buf()];
    let linked = common_dir.join("worktrees");
    match std::fs::read_dir(&linked) {
        Ok(dir) => candidates.extend(dir.filter_map(|e| e.ok()).map(|e| e.path())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(EditError::io("list", &linked, e)),
    }
    for git_dir in candidates {
        if std::fs::canonicalize(&git_dir).is_ok_and(|c| c == own) {
            continue;
        }
        if !summaries(&git_dir)?.iter().any(|s| s.applied.edit == edit) {
            continue;
        }
        return Ok(Some(worktree_of(&git_dir)));
    }
    Ok(None)
}

/// The worktree of a git directory: a linked worktree's `gitdir` file names its `.git` file; the
/// main worktree is what the repository opened from its git directory calls its workdir.
fn worktree_of(git_dir: &Path) -> PathBuf {
    if let Ok(text) = std::fs::read_to_string(git_dir.join("gitdir"))
        && let Some(parent) = Path::new(text.trim_end()).parent()
    {
        return parent.to_path_buf();
    }
    git2::Repository::open(git_dir)
        .ok()
        .and_then(|r| r.workdir().map(Path::to_path_buf))
        .unwrap_or_else(|| git_dir.to_path_buf())
}

/// The readable lines of the ledger at `p` (a torn last line after a crash is skipped).
fn entries<'t>(p: &'t Path, text: &'t [u8]) -> impl Iterator<Item = Entry> + 't {
    text.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(move |line| match serde_json::from_slice::<Entry>(line) {
            Ok(entry) => Some(entry),
            Err(_) => {
                tracing::warn!(ledger = %p.display(), "skipping unreadable ledger line");
                None
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(edit: &str, event: EventKind, at: u64) -> Entry {
        Entry {
            edit: edit.into(),
            event,
            at,
            source: "apply".into(),
            message: "m".into(),
            files: vec!["a".into()],
            journal: String::new(),
        }
    }

    #[test]
    fn states_fold_to_the_latest_event_newest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        append(dir.path(), &entry("aa", EventKind::Applied, 1), false).expect("append");
        append(dir.path(), &entry("bb", EventKind::Applied, 2), false).expect("append");
        append(dir.path(), &entry("aa", EventKind::Undone, 3), false).expect("append");
        // A torn line from a crash mid-append is ignored.
        let p = path(dir.path());
        let mut f = OpenOptions::new().append(true).open(&p).expect("open");
        f.write_all(b"{\"edit\":\"cc\",\"ev").expect("write");
        append(dir.path(), &entry("dd", EventKind::Applied, 4), false)
            .expect("append after torn line");
        let s = summaries(dir.path()).expect("summaries");
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].applied.edit, "dd");
        let s = &s[1..];
        assert_eq!(
            (s[0].applied.edit.as_str(), s[0].state),
            ("bb", EventKind::Applied)
        );
        assert_eq!(
            (s[1].applied.edit.as_str(), s[1].state, s[1].updated_at),
            ("aa", EventKind::Undone, 3)
        );
    }
}
