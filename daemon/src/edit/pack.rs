//! Packing the records. Each edit writes a handful of loose objects (its blobs, trees and the
//! stash-shaped commits), and libgit2 never packs them: 2,000 edits left about 10,000 loose files
//! and 50 MB in `.git`. So, now and then, the repository's actor packs the loose objects only the
//! records reach into one pack, as `git repack` would, and then removes those loose copies, as
//! `git prune-packed` does. The walk stops at the commits the records are based on, so the
//! user's commits stay as they are; loose trees and blobs the records share with them move into
//! the pack too, which nothing git shows can tell. Refs, the index and history are not touched.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use git2::{ObjectType, Oid, Repository};

use super::record::PINS_PREFIX;

/// Edits between two packings: a pack of a few hundred edits costs tens of milliseconds on the
/// actor, once, instead of a loose file per object for ever.
pub(crate) const PACK_EVERY_EDITS: u64 = 256;

/// Fewer loose objects than this are not worth a pack file of their own.
const MIN_OBJECTS: usize = 64;

/// A packing that failed. Nothing is lost either way: loose copies are removed only once the
/// pack holding them is written and synced.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PackError {
    #[error("git failed to {op}: {source}")]
    Git {
        op: &'static str,
        #[source]
        source: git2::Error,
    },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn git(op: &'static str) -> impl FnOnce(git2::Error) -> PackError {
    move |source| PackError::Git { op, source }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PackError {
    let path = path.to_owned();
    move |source| PackError::Io { op, path, source }
}

/// What one packing did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Packed {
    /// Loose objects written into the new pack and then removed.
    pub(crate) objects: usize,
}

/// Pack the loose objects reachable only through the records (`refs/spark/pins/*`): each
/// record commit, its parents that spark wrote (the index and base commits, not the user's
/// commits below them), and the trees and blobs of those that are still loose.
pub(crate) fn pack_records(repo: &Repository) -> Result<Packed, PackError> {
    let objects_dir = repo.commondir().join("objects");
    let loose = |oid: Oid| loose_path(&objects_dir, oid).is_file();
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    let pins = repo
        .references_glob(&format!("{PINS_PREFIX}*"))
        .map_err(git("list the edit records"))?;
    for pin in pins {
        let Some(w) = pin.map_err(git("read an edit record"))?.target() else {
            continue;
        };
        let commit = repo.find_commit(w).map_err(git("read an edit record"))?;
        // W and the commits it was made of. Below them are the user's commits: not ours.
        let mut commits = vec![commit.id()];
        commits.extend(commit.parent_ids());
        for id in commits {
            if !seen.insert(id) || !loose(id) {
                continue;
            }
            found.push(id);
            let tree = repo
                .find_commit(id)
                .map_err(git("read a record commit"))?
                .tree_id();
            collect_tree(repo, tree, &loose, &mut seen, &mut found)?;
        }
    }
    if found.len() < MIN_OBJECTS {
        return Ok(Packed::default());
    }

    let mut builder = repo.packbuilder().map_err(git("start a pack"))?;
    for &oid in &found {
        builder
            .insert_object(oid, None)
            .map_err(git("add an object to the pack"))?;
    }
    let pack_dir = objects_dir.join("pack");
    std::fs::create_dir_all(&pack_dir).map_err(io_err("create", &pack_dir))?;
    builder
        .write(&pack_dir, 0o444)
        .map_err(git("write the pack"))?;
    let name = builder
        .name()
        .map_err(git("name the pack"))?
        .map(str::to_owned);
    // libgit2 does not sync what it writes: the pack must be on disk before the only other
    // copies of its objects go.
    if let Some(name) = name {
        for ext in ["pack", "idx"] {
            let path = pack_dir.join(format!("pack-{name}.{ext}"));
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err("sync", &path))?;
        }
    }
    File::open(&pack_dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", &pack_dir))?;

    // As `git prune-packed`: a loose copy goes only once the object reads from a pack.
    let odb = repo.odb().map_err(git("open the object database"))?;
    odb.refresh().map_err(git("see the new pack"))?;
    let mut removed = 0;
    for oid in found {
        let path = loose_path(&objects_dir, oid);
        std::fs::rename(&path, path.with_extension("packing"))
            .map_err(io_err("set aside", &path))?;
        let aside = path.with_extension("packing");
        if odb.exists(oid) {
            std::fs::remove_file(&aside).map_err(io_err("remove", &aside))?;
            removed += 1;
        } else {
            std::fs::rename(&aside, &path).map_err(io_err("put back", &path))?;
        }
    }
    Ok(Packed { objects: removed })
}

/// The loose objects of `tree`, descending only into trees that are loose themselves: a tree
/// already packed (the user's history) holds nothing the records wrote.
fn collect_tree(
    repo: &Repository,
    tree: Oid,
    loose: &impl Fn(Oid) -> bool,
    seen: &mut HashSet<Oid>,
    found: &mut Vec<Oid>,
) -> Result<(), PackError> {
    if !seen.insert(tree) || !loose(tree) {
        return Ok(());
    }
    found.push(tree);
    let tree = repo.find_tree(tree).map_err(git("read a record tree"))?;
    for entry in tree.iter() {
        match entry.kind() {
            Some(ObjectType::Tree) => collect_tree(repo, entry.id(), loose, seen, found)?,
            Some(ObjectType::Blob) if seen.insert(entry.id()) && loose(entry.id()) => {
                found.push(entry.id());
            }
            // Submodule commits are not objects of this repository.
            _ => {}
        }
    }
    Ok(())
}

fn loose_path(objects_dir: &Path, oid: Oid) -> PathBuf {
    let hex = oid.to_string();
    objects_dir.join(&hex[..2]).join(&hex[2..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git_cli(dir: &Path, args: &[&str]) -> String {
        spark_testkit::git_ok(dir, args)
    }

    fn loose_count(dir: &Path) -> usize {
        let objects = dir.join(".git/objects");
        std::fs::read_dir(&objects)
            .expect("objects")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().len() == 2)
            .map(|e| std::fs::read_dir(e.path()).expect("fan-out").count())
            .sum()
    }

    /// A repository with one commit and `n` records shaped like spark's: W with parents B (on
    /// HEAD) and I, each with a new blob in a new tree, pinned under `refs/spark/pins/`.
    fn repo_with_records(n: usize) -> (tempfile::TempDir, Repository, Vec<Oid>) {
        let dir = tempfile::tempdir().expect("tempdir");
        git_cli(dir.path(), &["init", "-q", "-b", "main"]);
        std::fs::create_dir_all(dir.path().join("src")).expect("mkdir");
        std::fs::write(dir.path().join("src/lib.rs"), "fn main() {}\n").expect("write");
        git_cli(dir.path(), &["add", "."]);
        git_cli(
            dir.path(),
            &[
                "-c",
                "user.name=T",
                "-c",
                "user.email=t@e",
                "commit",
                "-qm",
                "base",
            ],
        );
        let repo = Repository::open(dir.path()).expect("open");
        let mut pins = Vec::new();
        {
            let head = repo.head().expect("head").peel_to_commit().expect("commit");
            let sig = git2::Signature::now("spark", "spark@localhost").expect("sig");
            for i in 0..n {
                let blob = repo
                    .blob(format!("fn main() {{ {i} }}\n").as_bytes())
                    .expect("blob");
                let mut update = git2::build::TreeUpdateBuilder::new();
                update.upsert("src/lib.rs", blob, git2::FileMode::Blob);
                let tree_id = update
                    .create_updated(&repo, &head.tree().expect("tree"))
                    .expect("tree");
                let tree = repo.find_tree(tree_id).expect("tree");
                let base_tree = head.tree().expect("tree");
                let b = repo
                    .commit(None, &sig, &sig, "base", &base_tree, &[&head])
                    .expect("B");
                let b = repo.find_commit(b).expect("B");
                let index = repo
                    .commit(None, &sig, &sig, "index", &base_tree, &[&b])
                    .expect("I");
                let index = repo.find_commit(index).expect("I");
                let w = repo
                    .commit(None, &sig, &sig, "edit", &tree, &[&b, &index])
                    .expect("W");
                repo.reference(&format!("{PINS_PREFIX}{w}"), w, true, "pin")
                    .expect("pin");
                pins.push(w);
            }
        }
        (dir, repo, pins)
    }

    #[test]
    fn records_are_packed_and_stay_readable_to_git() {
        let (dir, repo, pins) = repo_with_records(40);
        let before = loose_count(dir.path());
        let packed = pack_records(&repo).expect("pack");
        // Per record: its blob, two trees (root and src) and W; once: B and I (alike in every
        // record here) and the base tree with its `src` tree and blob, still loose after the
        // user's `git commit`, which the records share.
        assert_eq!(packed.objects, 40 * 4 + 2 + 3);
        assert_eq!(loose_count(dir.path()), before - packed.objects);
        // The user's own commit and its objects stay as they were.
        let head = git_cli(dir.path(), &["rev-parse", "HEAD"]);
        let hex = head.trim();
        assert!(
            dir.path()
                .join(".git/objects")
                .join(&hex[..2])
                .join(&hex[2..])
                .is_file()
        );
        // Every record still reads through plain git, and the repository is sound.
        for w in &pins {
            let shown = git_cli(dir.path(), &["show", "--format=%s", &format!("{w}")]);
            assert!(shown.starts_with("edit\n"), "{shown}");
        }
        git_cli(dir.path(), &["fsck", "--strict", "--no-dangling"]);
        let counts = git_cli(dir.path(), &["count-objects", "-v"]);
        assert!(counts.contains("packs: 1\n"), "{counts}");
        // Nothing left to do: a second packing writes no pack.
        assert_eq!(pack_records(&repo).expect("again"), Packed::default());
    }

    #[test]
    fn a_few_loose_objects_are_left_loose() {
        let (dir, repo, _) = repo_with_records(3);
        let before = loose_count(dir.path());
        assert_eq!(pack_records(&repo).expect("pack"), Packed::default());
        assert_eq!(loose_count(dir.path()), before);
        assert!(
            !dir.path()
                .join(".git/objects/pack")
                .read_dir()
                .is_ok_and(|mut d| d.next().is_some())
        );
    }
}
