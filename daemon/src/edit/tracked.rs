//! The git index as the path checks need it: which paths are tracked, their mode, and the
//! skip-worktree bit, in 16 bytes a path. libgit2's parsed index costs about 230 bytes a file,
//! and a `Repository` keeps it for good once anything has asked for it: in a 300,000-file
//! repository, 70 MB held so that `ask` can check a focus file. [`TrackedCache`] keeps one
//! [`Tracked`] per repository actor and reads the index file again only when it changes,
//! streaming it (one entry in memory at a time) rather than having libgit2 parse it whole.
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
        Tracked::from_rows(
            index
                .iter()
                .map(|e| row(&e.path, e.mode, e.flags, e.flags_extended))
                .collect(),
        )
    }

    fn from_rows(mut entries: Vec<(u64, u32)>) -> Tracked {
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

/// One index entry as a row of [`Tracked`].
fn row(path: &[u8], mode: u32, flags: u16, flags_extended: u16) -> (u64, u32) {
    let stage = (flags & STAGE_MASK) >> 12;
    let mut bits = 0;
    if stage == 0 {
        bits |= (mode & MODE_BITS) | AT_STAGE_0;
        if flags_extended & SKIP_WORKTREE != 0 {
            bits |= SKIPPED;
        }
    }
    if mode == GITLINK_MODE {
        bits |= GITLINK;
    }
    (key(path), bits)
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

/// Read the index file: streamed through [`parse`] when it is in a form that reads
/// (versions 2 to 4 with SHA-1 ids, no split index), otherwise parsed with libgit2 standalone
/// (not the `Repository`'s cached index, which would stay), and the parse's memory given back.
/// libgit2 holds the whole file and about 100 bytes a parsed entry at once: 70 MB at
/// 300,000 files, on top of everything else, the first time a large repository is asked about.
fn read(file: &Path) -> Result<Tracked, git2::Error> {
    if let Ok(f) = std::fs::File::open(file)
        && let Ok(meta) = f.metadata()
        && let Some(tracked) = parse(std::io::BufReader::with_capacity(64 * 1024, f), meta.len())
    {
        return Ok(tracked);
    }
    let index = git2::Index::open(file)?;
    let tracked = Tracked::from_index(&index);
    drop(index);
    if tracked.len() >= crate::memory::TRIM_AFTER {
        crate::memory::release_free_memory();
    }
    Ok(tracked)
}

/// Bytes of an object id in the index (SHA-1 repositories; anything else fails the entry
/// layout checks and goes to libgit2).
const OID_LEN: usize = 20;
/// The fixed part of an entry: ten 32-bit stat and mode fields, the id, the 16-bit flags.
const ENTRY_FIXED: usize = 40 + OID_LEN + 2;
/// `flags`: the entry has a second flags word (version 3 and later).
const EXTENDED: u16 = 0x4000;
/// `flags`: the path's length, or this value for 4095 bytes or more.
const NAME_MASK: u16 = 0x0fff;
/// Index extension signature of a split index, whose entries live in another file.
const SPLIT_INDEX: &[u8; 4] = b"link";

/// The index file's entries, read in one pass holding one entry at a time, as git's
/// index-format documentation lays them out: the header (`DIRC`, version, count), the
/// entries (versions 2 and 3 NUL-padded to a multiple of 8 bytes, version 4 with each path
/// stored as a suffix of the previous one), then extensions and the checksum. `None` when the
/// file is anything else or does not add up exactly to `len` bytes (a version this code does
/// not know, SHA-256 ids, a split index, a truncated file): the caller asks libgit2. The
/// trailing checksum is not verified: git replaces the index by renaming a complete file.
pub(crate) fn parse(mut r: impl std::io::BufRead, len: u64) -> Option<Tracked> {
    use std::io::Read as _;
    fn exact<const N: usize>(r: &mut impl std::io::Read) -> Option<[u8; N]> {
        let mut b = [0; N];
        r.read_exact(&mut b).ok()?;
        Some(b)
    }
    let u32be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let header = exact::<12>(&mut r)?;
    if &header[..4] != b"DIRC" {
        return None;
    }
    let version = u32be(&header[4..8]);
    if !(2..=4).contains(&version) {
        return None;
    }
    let count = u32be(&header[8..12]) as usize;
    // The count comes from the file: reserve no more than its bytes could hold.
    let mut rows = Vec::with_capacity(count.min((len / ENTRY_FIXED as u64) as usize));
    let mut at = 12u64;
    let mut path: Vec<u8> = Vec::new();
    for _ in 0..count {
        let fixed = exact::<ENTRY_FIXED>(&mut r)?;
        let mode = u32be(&fixed[24..28]);
        let flags = u16::from_be_bytes([fixed[ENTRY_FIXED - 2], fixed[ENTRY_FIXED - 1]]);
        let mut entry_len = ENTRY_FIXED;
        let flags_extended = if flags & EXTENDED != 0 {
            if version < 3 {
                return None;
            }
            entry_len += 2;
            u16::from_be_bytes(exact::<2>(&mut r)?)
        } else {
            0
        };
        if version == 4 {
            let strip = varint(&mut r, &mut entry_len)?;
            path.truncate(path.len().checked_sub(strip)?);
            let before = path.len();
            r.read_until(0, &mut path).ok()?;
            if path.pop() != Some(0) {
                return None;
            }
            entry_len += path.len() - before + 1;
        } else {
            path.clear();
            r.read_until(0, &mut path).ok()?;
            if path.pop() != Some(0) {
                return None;
            }
            let named = usize::from(flags & NAME_MASK);
            if named != path.len().min(usize::from(NAME_MASK)) {
                return None;
            }
            // 1 to 8 NUL bytes end the entry at a multiple of 8; one is read already.
            let padded = (entry_len + path.len() + 8) & !7;
            let pad = padded - (entry_len + path.len() + 1);
            let mut zeros = [0u8; 8];
            r.read_exact(&mut zeros[..pad]).ok()?;
            if zeros[..pad].iter().any(|&b| b != 0) {
                return None;
            }
            entry_len = padded;
        }
        if path.is_empty() {
            return None;
        }
        at += entry_len as u64;
        rows.push(row(&path, mode, flags, flags_extended));
    }
    // Extensions (signature, 32-bit size, data) until only the checksum is left.
    while len.checked_sub(at)? > OID_LEN as u64 {
        let ext = exact::<8>(&mut r)?;
        if &ext[..4] == SPLIT_INDEX || !ext[..4].iter().all(u8::is_ascii_alphabetic) {
            return None;
        }
        let size = u64::from(u32be(&ext[4..8]));
        if std::io::copy(&mut (&mut r).take(size), &mut std::io::sink()).ok()? != size {
            return None;
        }
        at += 8 + size;
    }
    (len.checked_sub(at)? == OID_LEN as u64).then(|| Tracked::from_rows(rows))
}

/// git's offset varint (index version 4's path prefix lengths).
fn varint(r: &mut impl std::io::Read, consumed: &mut usize) -> Option<usize> {
    let mut byte = [0u8];
    r.read_exact(&mut byte).ok()?;
    *consumed += 1;
    let mut value = usize::from(byte[0] & 0x7f);
    while byte[0] & 0x80 != 0 {
        r.read_exact(&mut byte).ok()?;
        *consumed += 1;
        value = value.checked_add(1)?.checked_mul(128)? | usize::from(byte[0] & 0x7f);
    }
    Some(value)
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

    /// An index written by the git CLI with every kind of entry the checks care about, in
    /// `version`; returns the repository and the index file's bytes.
    fn git_index(version: &str) -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        spark_testkit::git_ok(dir.path(), &["init", "-q"]);
        let blob = spark_testkit::git_ok(dir.path(), &["hash-object", "-w", "--stdin"]);
        let blob = blob.trim();
        let long = vec!["d".repeat(250); 17].join("/");
        let mut info = String::new();
        for (mode, stage, path) in [
            ("100644", 0, "src/main.rs".to_owned()),
            ("100644", 0, "src/mod.rs".to_owned()),
            ("100755", 0, "src/run.sh".to_owned()),
            ("120000", 0, "link".to_owned()),
            ("160000", 0, "vendor/lib".to_owned()),
            ("160000", 2, "deps/sub".to_owned()),
            ("160000", 3, "deps/sub".to_owned()),
            ("100644", 1, "both.txt".to_owned()),
            ("100644", 2, "both.txt".to_owned()),
            ("100644", 0, "é/ü.txt".to_owned()),
            ("100644", 0, "sparse/out.txt".to_owned()),
            ("100644", 0, format!("{long}/f")),
            ("100644", 0, "x".repeat(7)),
            ("100644", 0, "y".repeat(8)),
        ] {
            info.push_str(&format!("{mode} {blob} {stage}\t{path}\n"));
        }
        let out = spark_testkit::output_with_stdin(
            spark_testkit::hermetic_git(dir.path()).args(["update-index", "--index-info"]),
            info.as_bytes(),
        );
        assert!(out.status.success(), "{}", spark_testkit::stderr(&out));
        if version != "2" {
            spark_testkit::git_ok(
                dir.path(),
                &["update-index", "--skip-worktree", "sparse/out.txt"],
            );
        }
        spark_testkit::git_ok(dir.path(), &["update-index", "--index-version", version]);
        let bytes = std::fs::read(dir.path().join(".git/index")).expect("read index");
        assert_eq!(bytes[7].to_string(), version, "the version git wrote");
        (dir, bytes)
    }

    #[test]
    fn the_streamed_index_reads_as_libgit2_reads_it_in_every_version() {
        let mut v3 = None;
        for version in ["2", "3", "4"] {
            let (dir, bytes) = git_index(version);
            let streamed = parse(&bytes[..], bytes.len() as u64)
                .unwrap_or_else(|| panic!("version {version} streams"));
            if version == "4" {
                // libgit2 refuses a version 4 entry whose path is 4,095 bytes or longer
                // ("invalid entry"); git writes and reads it. The same entries as version 3.
                assert_eq!(Some(&streamed.entries), v3.as_ref(), "version 4");
            } else {
                let index = git2::Index::open(&dir.path().join(".git/index"))
                    .unwrap_or_else(|e| panic!("libgit2 reads version {version}: {e}"));
                let libgit2 = Tracked::from_index(&index);
                assert_eq!(streamed.entries, libgit2.entries, "version {version}");
            }
            if version == "3" {
                v3 = Some(streamed.entries.clone());
            }
            assert_eq!(streamed.len(), 12, "one row a path");
            assert_eq!(
                streamed.get("sparse/out.txt").map(|e| e.skip_worktree),
                Some(version != "2"),
                "version {version}"
            );
            assert!(streamed.is_gitlink("deps/sub"));
            assert_eq!(streamed.get("both.txt"), None, "conflicted: no stage 0");
            assert_eq!(streamed.get("src/run.sh").map(|e| e.mode), Some(0o100_755));
            assert!(
                streamed
                    .get(&format!("{}/f", vec!["d".repeat(250); 17].join("/")))
                    .is_some()
            );

            // Every cut of the file is refused rather than read short, and so is any byte of
            // the header or an entry's layout changed.
            for cut in [
                0,
                11,
                12,
                70,
                bytes.len() / 2,
                bytes.len() - 21,
                bytes.len() - 1,
            ] {
                assert!(parse(&bytes[..cut], cut as u64).is_none(), "cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(
                parse(&longer[..], longer.len() as u64).is_none(),
                "trailing byte"
            );
            let mut v9 = bytes.clone();
            v9[7] = 9;
            assert!(parse(&v9[..], v9.len() as u64).is_none(), "unknown version");
        }
    }

    #[test]
    fn extensions_are_skipped_and_a_split_index_goes_to_libgit2() {
        let dir = tempfile::tempdir().expect("tempdir");
        spark_testkit::git_ok(dir.path(), &["init", "-q"]);
        std::fs::write(dir.path().join("a.txt"), "a").expect("write");
        std::fs::write(dir.path().join("b.txt"), "b").expect("write");
        spark_testkit::git_ok(dir.path(), &["add", "a.txt", "b.txt"]);
        spark_testkit::git_ok(dir.path(), &["write-tree"]);
        let file = dir.path().join(".git/index");
        let bytes = std::fs::read(&file).expect("read");
        assert!(
            bytes.windows(4).any(|w| w == b"TREE"),
            "a cached tree extension"
        );
        let tracked = parse(&bytes[..], bytes.len() as u64).expect("streams");
        assert_eq!(tracked.len(), 2);

        spark_testkit::git_ok(dir.path(), &["update-index", "--split-index"]);
        let bytes = std::fs::read(&file).expect("read");
        assert!(
            parse(&bytes[..], bytes.len() as u64).is_none(),
            "split index"
        );
    }

    #[test]
    fn a_corrupt_index_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = git2::Repository::init(dir.path()).expect("init");
        std::fs::write(repo.path().join("index"), b"not an index").expect("write");
        assert!(TrackedCache::default().get(&repo).is_err());
    }
}
