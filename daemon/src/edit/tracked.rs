//! The git index as the path checks need it: which paths are tracked, their mode, and the
//! skip-worktree bit, in 16 bytes a path. libgit2's parsed index costs about 230 bytes a file,
//! and a `Repository` keeps it for good once anything has asked for it: in a 300,000-file
//! repository, 70 MB held so that `ask` can check a focus file. [`TrackedCache`] keeps one
//! [`Tracked`] per repository actor and reads the index file again only when it changes.
//!
//! Paths are kept as 64-bit hashes. Two tracked paths sharing one (about one chance in 10^8
//! for a 300,000-file repository) would merge their bits; the worst outcome is a refused path
//! or an ignored file treated as tracked, never a write elsewhere: the checks that guard the
//! disk (symlinks, nested repositories, secrets) do not use this.

use std::cell::RefCell;
use std::hash::{DefaultHasher, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::rc::Rc;

/// Index mode of a gitlink, the entry a submodule leaves in its superproject's index.
pub(crate) const GITLINK_MODE: u32 = 0o160_000;
/// The skip-worktree bit of an index entry's extended flags (`GIT_INDEX_ENTRY_SKIP_WORKTREE`).
pub(crate) const SKIP_WORKTREE: u16 = 1 << 14;
/// The stage bits of an index entry's flags (`GIT_INDEX_ENTRY_STAGEMASK`).
const STAGE_MASK: u16 = 0x3000;

// The bits of one entry: the stage-0 mode in the low 16 bits, then flags.
const MODE_BITS: u32 = 0xffff;
const AT_STAGE_0: u32 = 1 << 16;
const SKIPPED: u32 = 1 << 17;
/// A gitlink at any stage: stages 1–3 hold an unresolved merge of a submodule, which is still
/// a submodule.
const GITLINK: u32 = 1 << 18;

/// A stage-0 index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TrackedEntry {
    pub(crate) mode: u32,
    pub(crate) skip_worktree: bool,
}

/// Every path in one reading of the index.
#[derive(Debug, Default)]
pub(crate) struct Tracked {
    /// (hash of the path, bits), sorted by hash, one per path.
    entries: Vec<(u64, u32)>,
}

impl Tracked {
    /// The paths of `index`, every stage.
    pub(crate) fn from_index(index: &git2::Index) -> Tracked {
        let mut entries: Vec<(u64, u32)> = index
            .iter()
            .map(|e| {
                let stage = (e.flags & STAGE_MASK) >> 12;
                let mut bits = 0;
                if stage == 0 {
                    bits |= (e.mode & MODE_BITS) | AT_STAGE_0;
                    if e.flags_extended & SKIP_WORKTREE != 0 {
                        bits |= SKIPPED;
                    }
                }
                if e.mode == GITLINK_MODE {
                    bits |= GITLINK;
                }
                (key(&e.path), bits)
            })
            .collect();
        entries.sort_unstable_by_key(|&(k, _)| k);
        // One row per path: a conflicted path has up to three stages.
        entries.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 |= later.1;
            }
            same
        });
        entries.shrink_to_fit();
        Tracked { entries }
    }

    fn bits(&self, path: &str) -> Option<u32> {
        let k = key(path.as_bytes());
        self.entries
            .binary_search_by_key(&k, |&(k, _)| k)
            .ok()
            .map(|at| self.entries[at].1)
    }

    /// The stage-0 entry of `path`, if the index has one.
    pub(crate) fn get(&self, path: &str) -> Option<TrackedEntry> {
        self.bits(path)
            .filter(|b| b & AT_STAGE_0 != 0)
            .map(|b| TrackedEntry {
                mode: b & MODE_BITS,
                skip_worktree: b & SKIPPED != 0,
            })
    }

    /// Whether the index holds a gitlink at `path`, at any stage.
    pub(crate) fn is_gitlink(&self, path: &str) -> bool {
        self.bits(path).is_some_and(|b| b & GITLINK != 0)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

fn key(path: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(path);
    h.finish()
}

/// What identifies one version of the index file: git replaces it by rename, so any change
/// gives it a new inode or times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// The last [`Tracked`] a repository actor read, and which index file it came from. Lives on
/// the actor's thread.
#[derive(Debug, Default)]
pub(crate) struct TrackedCache(RefCell<Option<(Option<Stamp>, Rc<Tracked>)>>);

impl TrackedCache {
    /// The tracked paths of `repo`'s index as it is now on disk (empty when there is no index
    /// yet). Read again only when the file changed since the last call.
    pub(crate) fn get(&self, repo: &git2::Repository) -> Result<Rc<Tracked>, git2::Error> {
        let file = repo.path().join("index");
        // Stat before reading: a change after this point shows at the next call.
        let stamp = stamp(&file)?;
        if let Some((seen, tracked)) = &*self.0.borrow()
            && *seen == stamp
        {
            return Ok(tracked.clone());
        }
        let tracked = Rc::new(match stamp {
            None => Tracked::default(),
            Some(_) => read(&file)?,
        });
        *self.0.borrow_mut() = Some((stamp, tracked.clone()));
        Ok(tracked)
    }
}

fn stamp(file: &Path) -> Result<Option<Stamp>, git2::Error> {
    match std::fs::metadata(file) {
        Ok(m) => Ok(Some(Stamp {
            len: m.len(),
            ino: m.ino(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(git2::Error::from_str(&format!(
            "cannot read {}: {e}",
            file.display()
        ))),
    }
}

/// Parse the index file with libgit2, standalone (not the `Repository`'s cached index, which
/// would stay), keep the compact form, and give the parse's memory back.
fn read(file: &Path) -> Result<Tracked, git2::Error> {
    let index = git2::Index::open(file)?;
    let tracked = Tracked::from_index(&index);
    drop(index);
    if tracked.len() >= crate::memory::TRIM_AFTER {
        crate::memory::release_free_memory();
    }
    Ok(tracked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        repo: &git2::Repository,
        path: &str,
        mode: u32,
        stage: u16,
        skip: bool,
    ) -> git2::IndexEntry {
        git2::IndexEntry {
            ctime: git2::IndexTime::new(0, 0),
            mtime: git2::IndexTime::new(0, 0),
            dev: 0,
            ino: 0,
            mode,
            uid: 0,
            gid: 0,
            file_size: 0,
            id: repo.blob(path.as_bytes()).expect("blob"),
            flags: (stage << 12) | path.len().min(0xfff) as u16,
            flags_extended: if skip { SKIP_WORKTREE } else { 0 },
            path: path.as_bytes().to_vec(),
        }
    }

    #[test]
    fn modes_stages_and_skip_worktree_read_as_git_wrote_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = git2::Repository::init(dir.path()).expect("init");
        let cache = TrackedCache::default();
        // No index file yet: nothing is tracked, and that is not an error.
        assert_eq!(cache.get(&repo).expect("no index").len(), 0);

        let mut index = repo.index().expect("index");
        for e in [
            entry(&repo, "src/main.rs", 0o100_644, 0, false),
            entry(&repo, "run.sh", 0o100_755, 0, false),
            entry(&repo, "sparse/out.txt", 0o100_644, 0, true),
            entry(&repo, "vendor/lib", GITLINK_MODE, 0, false),
            // A conflicted submodule: stages 1–3 only.
            entry(&repo, "deps/sub", GITLINK_MODE, 2, false),
            entry(&repo, "deps/sub", GITLINK_MODE, 3, false),
        ] {
            index.add(&e).expect("add");
        }
        index.write().expect("write index");

        let tracked = cache.get(&repo).expect("read");
        assert_eq!(tracked.len(), 5);
        let file = |mode| {
            Some(TrackedEntry {
                mode,
                skip_worktree: false,
            })
        };
        assert_eq!(tracked.get("src/main.rs"), file(0o100_644));
        assert_eq!(tracked.get("run.sh"), file(0o100_755));
        assert_eq!(
            tracked.get("sparse/out.txt"),
            Some(TrackedEntry {
                mode: 0o100_644,
                skip_worktree: true
            })
        );
        assert_eq!(tracked.get("src"), None);
        assert_eq!(tracked.get("deps/sub"), None, "no stage-0 entry");
        assert!(tracked.is_gitlink("deps/sub"));
        assert!(tracked.is_gitlink("vendor/lib"));
        assert!(!tracked.is_gitlink("src/main.rs"));
    }

    #[test]
    fn the_index_is_read_again_only_when_its_file_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = git2::Repository::init(dir.path()).expect("init");
        let cache = TrackedCache::default();
        let mut index = repo.index().expect("index");
        index
            .add(&entry(&repo, "a.txt", 0o100_644, 0, false))
            .expect("add");
        index.write().expect("write index");

        let first = cache.get(&repo).expect("read");
        let again = cache.get(&repo).expect("read");
        assert!(Rc::ptr_eq(&first, &again), "unchanged file, same reading");

        // Another writer (git itself, in real use) replaces the file.
        let other = git2::Repository::open(dir.path()).expect("open");
        let mut index = other.index().expect("index");
        index
            .add(&entry(&other, "b.txt", 0o100_644, 0, false))
            .expect("add");
        index.write().expect("write index");
        let fresh = cache.get(&repo).expect("read");
        assert_eq!(fresh.len(), 2);
        assert!(fresh.get("b.txt").is_some());

        std::fs::remove_file(repo.path().join("index")).expect("rm index");
        assert_eq!(cache.get(&repo).expect("gone").len(), 0);
    }

    #[test]
    fn a_corrupt_index_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = git2::Repository::init(dir.path()).expect("init");
        std::fs::write(repo.path().join("index"), b"not an index").expect("write");
        assert!(TrackedCache::default().get(&repo).is_err());
    }
}
