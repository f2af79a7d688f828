//! Snapshots as git objects: chained commits under `refs/spark/history`, cut into segments so
//! retention deletes whole old segments instead of rewriting the chain (ARCHITECTURE.md,
//! "Local history").

use std::collections::HashSet;
use std::path::Path;

use git2::build::TreeUpdateBuilder;
use git2::{Commit, FileMode, ObjectType, Oid, Repository, Signature, Time, Tree};

use super::{HistoryEnv, HistoryError, git};
use crate::edit::paths;
use crate::watch::MAX_FILE_BYTES;

/// The newest segment's head.
pub(crate) const HISTORY_REF: &str = "refs/spark/history";
/// Closed segments, one ref each: `<newest snapshot's unix ms, 16 digits>-<bytes>`, where bytes
/// counts the file contents the segment introduced. Retention reads both from the name alone.
pub(crate) const SEGMENTS_PREFIX: &str = "refs/spark/history-segments/";
/// A segment spans at most this long…
const SEGMENT_SPAN_MS: u64 = 3600 * 1000;
/// Snapshots carry this identity: they are the daemon's, not the user's commits.
const NAME: &str = "spark history";
const EMAIL: &str = "spark@localhost";

/// One snapshot, as the chain lists it.
#[derive(Debug, Clone)]
pub(crate) struct Snap {
    pub(crate) oid: Oid,
    pub(crate) tree: Oid,
    pub(crate) at: u64,
    pub(crate) source: String,
    /// A segment's first snapshot continues an older one (named, not linked, so retention can
    /// drop it): when that one is gone, this snapshot is where the kept history starts.
    pub(crate) continues: Option<Oid>,
}

/// What a snapshot commit's message records.
struct Meta {
    at: u64,
    source: String,
    /// Unix ms of its segment's first snapshot, and its position in the segment (1-based).
    segment: u64,
    count: u32,
    continues: Option<Oid>,
}

fn meta(c: &Commit<'_>) -> Meta {
    let mut m = Meta {
        at: u64::try_from(c.time().seconds()).unwrap_or(0) * 1000,
        source: String::new(),
        segment: 0,
        count: 1,
        continues: None,
    };
    let mut segment = None;
    for line in c.message_bytes().split(|b| *b == b'\n') {
        let line = String::from_utf8_lossy(line);
        let Some((k, v)) = line.split_once(": ") else {
            continue;
        };
        match k {
            "at" => m.at = v.parse().unwrap_or(m.at),
            "source" => m.source = v.to_owned(),
            "segment" => segment = v.parse().ok(),
            "count" => m.count = v.parse().unwrap_or(1),
            "continues" => m.continues = Oid::from_str(v).ok(),
            _ => {}
        }
    }
    m.segment = segment.unwrap_or(m.at);
    m
}

/// A file as history reads it from the worktree.
pub(crate) enum OnDisk {
    File {
        bytes: Vec<u8>,
        exec: bool,
    },
    Gone,
    /// Binary, oversized, a symlink or a directory: not history's to keep.
    Skip,
}

pub(crate) fn read_on_disk(abs: &Path) -> Result<OnDisk, std::io::Error> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::symlink_metadata(abs) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OnDisk::Gone),
        Err(e) => return Err(e),
    };
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES as u64 {
        return Ok(OnDisk::Skip);
    }
    let bytes = match std::fs::read(abs) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OnDisk::Gone),
        Err(e) => return Err(e),
    };
    // Grown past the limit since the stat, or binary by the edit engine's own rule.
    let text = bytes.len() <= MAX_FILE_BYTES
        && !bytes.contains(&0)
        && std::str::from_utf8(bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes)).is_ok();
    if !text {
        return Ok(OnDisk::Skip);
    }
    Ok(OnDisk::File {
        bytes,
        exec: meta.permissions().mode() & 0o111 != 0,
    })
}

/// Snapshot what `paths` (repo-relative) hold on disk now, if anything differs from the newest
/// snapshot: one commit on the chain. Deny-listed, binary and oversized files are left out; a
/// missing file leaves the snapshot. Returns the new snapshot, or `None` when nothing changed.
pub(crate) fn snapshot(
    repo: &Repository,
    workdir: &Path,
    paths: &[String],
    source: &str,
    env: &HistoryEnv,
) -> Result<Option<Oid>, HistoryError> {
    let now = env.now_ms();
    let head = head(repo)?;
    let parent = match head {
        Some(h) => Some(
            repo.find_commit(h)
                .map_err(git("read the newest snapshot"))?,
        ),
        None => None,
    };
    let base = match &parent {
        Some(p) => p.tree().map_err(git("read the newest snapshot's tree"))?,
        None => empty_tree(repo)?,
    };
    let mut update = TreeUpdateBuilder::new();
    let mut changed = 0usize;
    for raw in paths {
        let Ok(rel) = paths::validate_rel_path(raw) else {
            continue;
        };
        if paths::is_secret(&rel) {
            continue;
        }
        let existing = base.get_path(&rel.to_path()).ok();
        let abs = workdir.join(rel.to_path());
        match read_on_disk(&abs).map_err(|source| HistoryError::Io {
            op: "read a file to snapshot",
            path: rel.as_str().to_owned(),
            source,
        })? {
            OnDisk::File { bytes, exec } => {
                let mode = if exec {
                    FileMode::BlobExecutable
                } else {
                    FileMode::Blob
                };
                // Hash before writing: an unchanged file costs a read and a SHA-1, and no
                // write to the object database.
                let id = Oid::hash_object(ObjectType::Blob, &bytes)
                    .map_err(git("hash a file to snapshot"))?;
                let same = existing
                    .as_ref()
                    .is_some_and(|e| e.id() == id && e.filemode() == i32::from(mode));
                if !same {
                    let blob = repo.blob(&bytes).map_err(git("write a snapshot blob"))?;
                    update.upsert(rel.as_str(), blob, mode);
                    changed += 1;
                }
            }
            OnDisk::Gone => {
                if existing.is_some() {
                    update.remove(rel.as_str());
                    changed += 1;
                }
            }
            OnDisk::Skip => {}
        }
    }
    if changed == 0 {
        return Ok(None);
    }
    let tree_id = update
        .create_updated(repo, &base)
        .map_err(git("write a snapshot tree"))?;
    if tree_id == base.id() {
        return Ok(None);
    }
    let tree = repo
        .find_tree(tree_id)
        .map_err(git("read a snapshot tree"))?;
    let previous = parent.as_ref().map(meta);
    // A new segment when the current one is full or old enough; it starts with a root commit
    // whose tree, like every snapshot's, holds the whole state.
    let roll = previous.as_ref().is_some_and(|m| {
        m.count >= env.segment_snapshots
            || now.saturating_sub(m.segment) >= SEGMENT_SPAN_MS
            || now < m.segment
    });
    let (segment, count, parents): (u64, u32, Vec<&Commit<'_>>) = match (&previous, &parent) {
        (Some(m), Some(p)) if !roll => (m.segment, m.count + 1, vec![p]),
        _ => (now, 1, Vec::new()),
    };
    let mut message = format!(
        "spark history: {changed} file{} ({source})\n\nsource: {source}\nat: {now}\nsegment: {segment}\ncount: {count}\n",
        if changed == 1 { "" } else { "s" }
    );
    if let (true, Some(h)) = (parents.is_empty(), head) {
        message += &format!("continues: {h}\n");
    }
    let when = Time::new(i64::try_from(now / 1000).unwrap_or(0), 0);
    let sig = Signature::new(NAME, EMAIL, &when).map_err(git("build the snapshot identity"))?;
    let commit = repo
        .commit(None, &sig, &sig, &message, &tree, &parents)
        .map_err(git("write a snapshot commit"))?;
    if roll && let (Some(h), Some(m)) = (head, &previous) {
        // The closed segment keeps its own ref before the chain moves on, so a crash between
        // the two leaves it listed twice (skipped when read), never lost.
        let older = closed_segments(repo)?.first().map(|s| s.head);
        let older_tree = match older {
            Some(o) => Some(
                repo.find_commit(o)
                    .and_then(|c| c.tree())
                    .map_err(git("read a closed segment"))?
                    .id(),
            ),
            None => None,
        };
        let bytes = segment_bytes(repo, h, older_tree)?;
        let name = format!("{SEGMENTS_PREFIX}{:016}-{bytes}", m.at);
        repo.reference(&name, h, true, "spark history: segment closed")
            .map_err(git("close a history segment"))?;
    }
    move_head(repo, head, commit)?;
    if roll {
        prune(repo, env)?;
    }
    Ok(Some(commit))
}

fn move_head(repo: &Repository, from: Option<Oid>, to: Oid) -> Result<(), HistoryError> {
    let log = "spark history: snapshot";
    match from {
        Some(h) => repo.reference_matching(HISTORY_REF, to, true, h, log),
        None => repo.reference(HISTORY_REF, to, false, log),
    }
    .map_err(git("move refs/spark/history"))?;
    Ok(())
}

pub(crate) fn head(repo: &Repository) -> Result<Option<Oid>, HistoryError> {
    match repo.refname_to_id(HISTORY_REF) {
        Ok(id) => Ok(Some(id)),
        Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
        Err(e) => Err(HistoryError::Git {
            op: "read refs/spark/history",
            source: e,
        }),
    }
}

fn empty_tree(repo: &Repository) -> Result<Tree<'_>, HistoryError> {
    let id = repo
        .treebuilder(None)
        .and_then(|b| b.write())
        .map_err(git("write the empty tree"))?;
    repo.find_tree(id).map_err(git("read the empty tree"))
}

/// A closed segment, from its ref.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub(crate) name: String,
    pub(crate) head: Oid,
    pub(crate) newest: u64,
    pub(crate) bytes: u64,
}

/// Closed segments, newest first.
pub(crate) fn closed_segments(repo: &Repository) -> Result<Vec<Segment>, HistoryError> {
    let refs = repo
        .references_glob(&format!("{SEGMENTS_PREFIX}*"))
        .map_err(git("list history segments"))?;
    let mut out = Vec::new();
    for r in refs {
        let r = r.map_err(git("list history segments"))?;
        let (Ok(name), Some(head)) = (r.name(), r.target()) else {
            continue;
        };
        let Some((newest, bytes)) = name
            .strip_prefix(SEGMENTS_PREFIX)
            .and_then(|n| n.split_once('-'))
        else {
            continue;
        };
        let (Ok(newest), Ok(bytes)) = (newest.parse(), bytes.parse()) else {
            continue;
        };
        out.push(Segment {
            name: name.to_owned(),
            head,
            newest,
            bytes,
        });
    }
    out.sort_by(|a, b| b.name.cmp(&a.name));
    Ok(out)
}

/// Every snapshot, newest first, across segments; each one's predecessor is the next.
pub(crate) fn chain(repo: &Repository) -> Result<Vec<Snap>, HistoryError> {
    let mut heads: Vec<Oid> = head(repo)?.into_iter().collect();
    heads.extend(closed_segments(repo)?.into_iter().map(|s| s.head));
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for h in heads {
        let mut next = Some(h);
        while let Some(id) = next {
            if !seen.insert(id) {
                break;
            }
            let c = repo.find_commit(id).map_err(git("read a snapshot"))?;
            let m = meta(&c);
            out.push(Snap {
                oid: id,
                tree: c.tree_id(),
                at: m.at,
                source: m.source,
                continues: m.continues,
            });
            next = c.parent_ids().next();
        }
    }
    Ok(out)
}

/// Bytes of file contents the segment ending at `head` introduced: the blobs its snapshots
/// wrote, each once, against `before` (the previous segment's newest tree) for its first.
fn segment_bytes(repo: &Repository, head: Oid, before: Option<Oid>) -> Result<u64, HistoryError> {
    let mut trees = Vec::new();
    let mut next = Some(head);
    while let Some(id) = next {
        let c = repo.find_commit(id).map_err(git("read a snapshot"))?;
        trees.push(c.tree_id());
        next = c.parent_ids().next();
    }
    let odb = repo.odb().map_err(git("open the object database"))?;
    let mut counted = HashSet::new();
    let mut total = 0u64;
    for (i, new) in trees.iter().enumerate() {
        let old = trees.get(i + 1).copied().or(before);
        for (oid, _) in new_blobs(repo, old, *new)? {
            if counted.insert(oid)
                && let Ok((size, ObjectType::Blob)) = odb.read_header(oid)
            {
                total += size as u64;
            }
        }
    }
    Ok(total)
}

/// Blobs (with their paths) present in `new` and not at the same path in `old`.
pub(crate) fn new_blobs(
    repo: &Repository,
    old: Option<Oid>,
    new: Oid,
) -> Result<Vec<(Oid, String)>, HistoryError> {
    let old = match old {
        Some(o) => Some(repo.find_tree(o).map_err(git("read a snapshot tree"))?),
        None => None,
    };
    let new = repo.find_tree(new).map_err(git("read a snapshot tree"))?;
    let diff = repo
        .diff_tree_to_tree(old.as_ref(), Some(&new), None)
        .map_err(git("compare snapshots"))?;
    Ok(diff
        .deltas()
        .filter(|d| !d.new_file().id().is_zero())
        .map(|d| {
            let path = d
                .new_file()
                .path()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            (d.new_file().id(), path)
        })
        .collect())
}

/// What [`prune`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Pruned {
    pub(crate) segments: usize,
    pub(crate) bytes: u64,
}

/// Delete closed segments past the retention: older than the age limit, or beyond the size
/// budget counting from the newest. Only refs are deleted: the objects become unreachable and
/// are left for `git gc`, so nothing is rewritten and `git fsck` stays clean.
pub(crate) fn prune(repo: &Repository, env: &HistoryEnv) -> Result<Pruned, HistoryError> {
    let cutoff = env.now_ms().saturating_sub(env.max_age_ms);
    let mut kept = match head(repo)? {
        Some(h) => {
            let older = closed_segments(repo)?.first().map(|s| s.head);
            let older_tree = match older {
                Some(o) => Some(
                    repo.find_commit(o)
                        .map_err(git("read a closed segment"))?
                        .tree_id(),
                ),
                None => None,
            };
            segment_bytes(repo, h, older_tree)?
        }
        None => 0,
    };
    let mut pruned = Pruned::default();
    let mut over = false;
    for s in closed_segments(repo)? {
        kept += s.bytes;
        over |= kept > env.max_bytes || s.newest < cutoff;
        if !over {
            continue;
        }
        let mut r = repo
            .find_reference(&s.name)
            .map_err(git("find a history segment"))?;
        r.delete().map_err(git("delete a history segment"))?;
        pruned.segments += 1;
        pruned.bytes += s.bytes;
    }
    if pruned.segments > 0 {
        tracing::info!(
            segments = pruned.segments,
            bytes = pruned.bytes,
            "pruned local history"
        );
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::init(dir.path()).expect("init");
        (dir, repo)
    }

    fn env(segment_snapshots: u32, max_bytes: u64) -> HistoryEnv {
        HistoryEnv {
            max_bytes,
            segment_snapshots,
            ..HistoryEnv::default()
        }
    }

    fn save(dir: &Path, repo: &Repository, env: &HistoryEnv, rel: &str, bytes: &[u8]) -> bool {
        std::fs::write(dir.join(rel), bytes).expect("write");
        snapshot(repo, dir, &[rel.to_owned()], "watch", env)
            .expect("snapshot")
            .is_some()
    }

    #[test]
    fn unchanged_secret_and_binary_files_make_no_snapshot() {
        let (dir, repo) = repo();
        let env = env(256, u64::MAX);
        assert!(save(dir.path(), &repo, &env, "a.txt", b"one\n"));
        assert!(!save(dir.path(), &repo, &env, "a.txt", b"one\n"));
        assert!(!save(dir.path(), &repo, &env, ".env", b"KEY=1\n"));
        assert!(!save(dir.path(), &repo, &env, "b.bin", b"\0\x01"));
        assert_eq!(chain(&repo).expect("chain").len(), 1);
        std::fs::remove_file(dir.path().join("a.txt")).expect("rm");
        let gone = snapshot(&repo, dir.path(), &["a.txt".into()], "watch", &env).expect("snap");
        assert!(gone.is_some(), "a deletion is a snapshot");
    }

    #[test]
    fn full_segments_close_and_the_size_budget_drops_the_oldest_refs() {
        let (dir, repo) = repo();
        // Two snapshots a segment; 1000-byte versions; room for about three segments.
        let env = env(2, 3500);
        for i in 0..8u8 {
            assert!(save(dir.path(), &repo, &env, "f.txt", &[b'a' + i; 1000]));
        }
        let listed = chain(&repo).expect("chain");
        let segments = closed_segments(&repo).expect("segments");
        assert!(
            segments.iter().map(|s| s.bytes).sum::<u64>() <= env.max_bytes,
            "{segments:?}"
        );
        assert!(!segments.is_empty() && segments.len() < 4, "{segments:?}");
        // Newest first, one after the other, and none of the oldest.
        assert!(listed.windows(2).all(|w| w[0].at >= w[1].at));
        let newest = repo.find_commit(listed[0].oid).expect("commit");
        let blob = newest
            .tree()
            .expect("tree")
            .get_path(Path::new("f.txt"))
            .expect("f");
        assert_eq!(
            repo.find_blob(blob.id()).expect("blob").content(),
            &[b'h'; 1000]
        );
        assert!(listed.len() < 8, "{} snapshots kept", listed.len());
    }
}
