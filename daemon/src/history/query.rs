//! Reading the history back: versions of a file or of the repository, the version at a time,
//! and what changed since a time.

use std::path::Path;

use git2::{DiffOptions, Patch, Repository};
use spark_proto::methods::{HistoryFile, HistoryVersion};

use super::store::{self, OnDisk, Snap};
use super::when::{When, format_utc};
use super::{HistoryError, git};

/// Versions newest first: every snapshot that changed `path` (or, without it, changed
/// anything), back to `since`, at most `limit`.
pub(crate) fn list(
    repo: &Repository,
    path: Option<&str>,
    since: Option<u64>,
    limit: usize,
) -> Result<Vec<HistoryVersion>, HistoryError> {
    let chain = store::chain(repo)?;
    let mut out = Vec::new();
    let mut complete = true;
    for (i, s) in chain.iter().enumerate() {
        if since.is_some_and(|t| s.at < t) || out.len() >= limit {
            complete = false;
            break;
        }
        let prev = chain.get(i + 1);
        // The predecessor a pruned root names may be gone (`git gc`): then it has none.
        let files = match changed_files(repo, prev, s, path, true) {
            Ok(f) => f,
            Err(_) if prev.is_none() => changed_files(repo, prev, s, path, false)?,
            Err(e) => return Err(e),
        };
        if !files.is_empty() {
            out.push(HistoryVersion {
                id: s.oid.to_string()[..10].to_owned(),
                at: s.at,
                source: s.source.clone(),
                files,
            });
        }
    }
    if complete {
        // Oldest first: a file's first version is the first "added" seen.
        let mut seen = std::collections::HashSet::new();
        for v in out.iter_mut().rev() {
            let id = v.id.clone();
            for f in &mut v.files {
                if seen.insert(f.path.clone()) && f.change == "added" {
                    against_head(repo, &id, f)?;
                }
            }
        }
    }
    Ok(out)
}

/// A file's first version in history, when the file is committed, is a change to the committed
/// version (history starts watching files as they change): count its lines against that.
fn against_head(repo: &Repository, id: &str, f: &mut HistoryFile) -> Result<(), HistoryError> {
    let path = f.path.as_str();
    let Some(committed) = repo
        .head()
        .ok()
        .and_then(|h| h.peel_to_tree().ok())
        .and_then(|t| t.get_path(Path::new(path)).ok())
        .and_then(|e| repo.find_blob(e.id()).ok())
    else {
        return Ok(());
    };
    let snap = repo
        .revparse_single(&format!("{id}:{path}"))
        .and_then(|o| o.peel_to_blob())
        .map_err(git("read a snapshot blob"))?;
    let patch =
        Patch::from_blobs(&committed, None, &snap, None, None).map_err(git("count lines"))?;
    let (_, added, removed) = patch.line_stats().map_err(git("count lines"))?;
    f.change = "modified".to_owned();
    f.added = added as u32;
    f.removed = removed as u32;
    Ok(())
}

fn changed_files(
    repo: &Repository,
    prev: Option<&Snap>,
    s: &Snap,
    path: Option<&str>,
    use_continued: bool,
) -> Result<Vec<HistoryFile>, HistoryError> {
    // The oldest kept snapshot compares with the one it continued while git still has it
    // (retention deleted its ref; `git gc` has not collected it yet).
    let exists = |id| repo.odb().is_ok_and(|o| o.exists(id));
    let continued = match (prev, s.continues) {
        (None, Some(c)) if use_continued && exists(c) => {
            repo.find_commit(c).ok().map(|c| c.tree_id())
        }
        _ => None,
    };
    let old_id = prev.map(|p| p.tree).or(continued);
    let old = match old_id {
        Some(t) => Some(repo.find_tree(t).map_err(git("read a snapshot"))?),
        None => None,
    };
    let new = repo.find_tree(s.tree).map_err(git("read a snapshot"))?;
    let mut opts = DiffOptions::new();
    if let Some(p) = path {
        opts.pathspec(p).disable_pathspec_match(true);
    }
    let diff = repo
        .diff_tree_to_tree(old.as_ref(), Some(&new), Some(&mut opts))
        .map_err(git("compare snapshots"))?;
    let mut files = Vec::new();
    for (idx, d) in diff.deltas().enumerate() {
        let file_path = d
            .new_file()
            .path()
            .or(d.old_file().path())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let change = match (d.status(), prev) {
            (git2::Delta::Added, _) if old_id.is_none() && s.continues.is_some() => "kept",
            (git2::Delta::Added, _) => "added",
            (git2::Delta::Deleted, _) => "deleted",
            _ => "modified",
        };
        let (added, removed) = match Patch::from_diff(&diff, idx).map_err(git("count lines"))? {
            Some(p) => {
                let (_, a, r) = p.line_stats().map_err(git("count lines"))?;
                (a as u32, r as u32)
            }
            None => (0, 0),
        };
        let size = (!d.new_file().id().is_zero()).then(|| d.new_file().size());
        files.push(HistoryFile {
            path: file_path,
            change: change.to_owned(),
            size,
            added,
            removed,
        });
    }
    Ok(files)
}

/// A file as a snapshot holds it.
pub(crate) struct Version {
    pub(crate) snap: Snap,
    pub(crate) bytes: Vec<u8>,
    pub(crate) exec: bool,
}

/// The snapshot `when` names, and `path` in it.
pub(crate) fn version_at(
    repo: &Repository,
    path: &str,
    when: &When,
    text: &str,
) -> Result<Version, HistoryError> {
    let chain = store::chain(repo)?;
    let snap =
        match when {
            When::Id(prefix) => {
                let mut found = chain
                    .iter()
                    .filter(|s| s.oid.to_string().starts_with(prefix.as_str()));
                let first = found.next().ok_or_else(|| HistoryError::UnknownVersion {
                    id: text.to_owned(),
                })?;
                if found.next().is_some() {
                    return Err(HistoryError::AmbiguousVersion {
                        id: text.to_owned(),
                    });
                }
                first.clone()
            }
            When::At(t) => chain.iter().find(|s| s.at <= *t).cloned().ok_or_else(|| {
                HistoryError::NoVersion {
                    path: path.to_owned(),
                    when: format!(
                        "at {}: local history starts {}",
                        format_utc(*t),
                        chain
                            .last()
                            .map(|s| format!("at {}", format_utc(s.at)))
                            .unwrap_or_else(|| "with the first change it sees".to_owned())
                    ),
                }
            })?,
        };
    let tree = repo.find_tree(snap.tree).map_err(git("read a snapshot"))?;
    let entry = tree
        .get_path(Path::new(path))
        .map_err(|_| HistoryError::NoVersion {
            path: path.to_owned(),
            when: format!(
                "in snapshot {} ({}): it did not exist then, or history had not seen it yet",
                &snap.oid.to_string()[..10],
                format_utc(snap.at)
            ),
        })?;
    let blob = repo
        .find_blob(entry.id())
        .map_err(git("read a snapshot blob"))?;
    Ok(Version {
        bytes: blob.content().to_vec(),
        exec: entry.filemode() == i32::from(git2::FileMode::BlobExecutable),
        snap,
    })
}

/// What [`diff_since`] found.
pub(crate) struct Changes {
    pub(crate) from: Option<u64>,
    pub(crate) files: Vec<String>,
    pub(crate) diff: String,
}

/// The worktree now against the newest snapshot at or before `t`, for every file history saw
/// change since (under `prefix`). A file history first saw after `t` is compared with its
/// committed version (or as new when it has none).
pub(crate) fn diff_since(
    repo: &Repository,
    workdir: &Path,
    t: u64,
    prefix: Option<&str>,
) -> Result<Changes, HistoryError> {
    let chain = store::chain(repo)?;
    let base_at = chain.iter().position(|s| s.at <= t);
    let newer = &chain[..base_at.unwrap_or(chain.len())];
    let base = base_at.map(|i| &chain[i]);
    let under = |p: &str| {
        prefix.is_none_or(|pre| pre.is_empty() || p == pre || p.starts_with(&format!("{pre}/")))
    };
    let mut paths = std::collections::BTreeSet::new();
    for (i, s) in newer.iter().enumerate() {
        let prev = chain.get(i + 1).map(|p| p.tree);
        let old = match prev {
            Some(o) => Some(repo.find_tree(o).map_err(git("read a snapshot"))?),
            None => None,
        };
        let new = repo.find_tree(s.tree).map_err(git("read a snapshot"))?;
        let diff = repo
            .diff_tree_to_tree(old.as_ref(), Some(&new), None)
            .map_err(git("compare snapshots"))?;
        for d in diff.deltas() {
            if let Some(p) = d.new_file().path().or(d.old_file().path()) {
                let p = p.to_string_lossy().into_owned();
                if under(&p) {
                    paths.insert(p);
                }
            }
        }
    }
    let base_tree = match base {
        Some(b) => Some(repo.find_tree(b.tree).map_err(git("read a snapshot"))?),
        None => None,
    };
    let head_tree = repo.head().ok().and_then(|h| h.peel_to_tree().ok());
    let blob_at = |tree: &git2::Tree<'_>, p: &str| -> Option<Vec<u8>> {
        let e = tree.get_path(Path::new(p)).ok()?;
        repo.find_blob(e.id()).ok().map(|b| b.content().to_vec())
    };
    let mut out = String::new();
    let mut files = Vec::new();
    for p in paths {
        let old = match &base_tree {
            Some(bt) if bt.get_path(Path::new(&p)).is_ok() => blob_at(bt, &p),
            _ => head_tree.as_ref().and_then(|h| blob_at(h, &p)),
        };
        let new =
            match store::read_on_disk(&workdir.join(&p)).map_err(|source| HistoryError::Io {
                op: "read a file to compare",
                path: p.clone(),
                source,
            })? {
                OnDisk::File { bytes, .. } => Some(bytes),
                OnDisk::Gone => None,
                // Not text any more: history has nothing to compare it with.
                OnDisk::Skip => continue,
            };
        if old == new {
            continue;
        }
        out += &unified(&p, old.as_deref(), new.as_deref())?;
        files.push(p);
    }
    Ok(Changes {
        from: base.map(|b| b.at),
        files,
        diff: out,
    })
}

/// A `git diff`-style patch of one file.
fn unified(path: &str, old: Option<&[u8]>, new: Option<&[u8]>) -> Result<String, HistoryError> {
    let mut out = format!("diff --git a/{path} b/{path}\n");
    out += &match (old, new) {
        (None, _) => format!("new file mode 100644\n--- /dev/null\n+++ b/{path}\n"),
        (_, None) => format!("deleted file mode 100644\n--- a/{path}\n+++ /dev/null\n"),
        _ => format!("--- a/{path}\n+++ b/{path}\n"),
    };
    let mut opts = DiffOptions::new();
    opts.context_lines(3);
    let mut patch = Patch::from_buffers(
        old.unwrap_or_default(),
        Some(Path::new(path)),
        new.unwrap_or_default(),
        Some(Path::new(path)),
        Some(&mut opts),
    )
    .map_err(git("diff a file"))?;
    let mut body = Vec::new();
    patch
        .print(&mut |_, _, line| {
            match line.origin() {
                '+' | '-' | ' ' => {
                    body.push(line.origin() as u8);
                    body.extend_from_slice(line.content());
                }
                // File headers are ours; hunk headers and "\ No newline" markers as they come.
                'F' => {}
                _ => body.extend_from_slice(line.content()),
            }
            true
        })
        .map_err(git("print a diff"))?;
    out += &String::from_utf8_lossy(&body);
    Ok(out)
}
