//! The context cache: a sled database under `Config.layout.cache_dir` holding, per watched
//! repository, the metadata of every indexed file (stat, blob id, top-level symbols) and the
//! content of its text files, so a daemon restart does not re-read a whole tree and building a
//! request never walks the disk.
//!
//! The cache holds only what can be rebuilt. A format version is stored in the database; a
//! foreign version, an open error or any later read or write error discards the directory and
//! starts afresh (sled 0.34 has reported corruption after abrupt stops). The one exception is
//! another process holding sled's lock: that cache belongs to someone else and is left alone, and
//! the daemon runs without one. Only this module opens sled, and only the daemon does, after
//! the single-instance lock. Every method blocks: call them from blocking threads or the
//! repository actor, never from an async worker.
//!
//! Layout: the default tree maps `format` to [`FORMAT`]; the tree `blob\0<workdir>` maps
//! `<path>\0<blob id>` to a text file's bytes; beside sled's files, `spark-snapshots/` holds per
//! repository a file with the encoded [`FileMeta`] of each of its files (see [`SNAPSHOT_DIR`]).

use std::fmt;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tracing::{info, warn};

/// Bump whenever the encoding of a key or value changes: an old cache is then rebuilt.
pub(crate) const FORMAT: &[u8] = b"spark-context-cache/4";
const FORMAT_KEY: &[u8] = b"format";
/// The subdirectory of the cache directory holding one snapshot file per repository (the
/// encoded [`FileMeta`] of each of its files), named by the SHA-1 of its worktree path. Not a
/// sled value: a snapshot is megabytes (about 100 bytes a file), and sled keeps a value it
/// was given resident in its page cache whatever the cache's capacity (10 MB for a
/// 100,000-file repository, measured). The name avoids sled's own `snap.*` files.
const SNAPSHOT_DIR: &str = "spark-snapshots";
/// The first bytes of a snapshot file, then the worktree path it belongs to.
const SNAPSHOT_MAGIC: &[u8] = b"spark-snapshot/1\0";
/// sled's page cache; it is the bulk of the cache's memory, and the daemon's RSS budget is
/// 100 MB with ten large repositories watched.
const PAGE_CACHE_BYTES: u64 = 4 * 1024 * 1024;
/// sled flushes (and fsyncs) in the background this often. The cache is disposable, so a lost
/// few seconds of writes only cost a re-read after a crash, while each flush competes for the
/// disk with the edit engine's own fsyncs on the ask path: keep them rare.
const FLUSH_EVERY_MS: u64 = 10_000;

/// A git blob id (SHA-1 of `blob <len>\0<bytes>`): the same name git gives the content, so a
/// session can say which version of a file the model saw and match it against git objects.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct BlobId(pub(crate) [u8; 20]);

impl BlobId {
    pub(crate) fn of(bytes: &[u8]) -> BlobId {
        // A pure function of the bytes: no repository is opened (only the repo actor does that).
        match git2::Oid::hash_object(git2::ObjectType::Blob, bytes) {
            Ok(oid) => {
                let mut id = [0u8; 20];
                id.copy_from_slice(&oid.as_bytes()[..20]);
                BlobId(id)
            }
            // libgit2 fails here only if it cannot initialise; a zero id then never matches a
            // real one, so the file is merely treated as changed.
            Err(_) => BlobId([0; 20]),
        }
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({self})")
    }
}

/// What `lstat` said about a file when it was indexed: a change in any field means re-read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Stat {
    pub(crate) size: u64,
    pub(crate) mtime: i64,
    pub(crate) mtime_nsec: i64,
    pub(crate) ino: u64,
}

impl Stat {
    pub(crate) fn of(meta: &std::fs::Metadata) -> Stat {
        use std::os::unix::fs::MetadataExt;
        Stat {
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ino: meta.ino(),
        }
    }
}

/// Whether a file's content may be cached and shown to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// UTF-8 text without NUL bytes, at most the size limit; its content is cached.
    Text(BlobId),
    /// Listed in the outline by name only.
    Binary,
    /// Listed in the outline by name only.
    TooLarge,
}

/// One indexed file, as persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileMeta {
    pub(crate) stat: Stat,
    pub(crate) kind: Kind,
    /// Top-level definitions as the outline shows them (`fn parse, class Foo`); one string, not
    /// a list, because ten repositories of 10k files each must fit the daemon's memory budget.
    pub(crate) symbols: Box<str>,
    /// In repositories too large for `symbols` to be kept: hashes of the first top-level
    /// names, so a prompt can still point at them.
    pub(crate) names: Names,
}

/// How many top-level names a file keeps as hashes.
pub(crate) const NAMES: usize = 4;

/// Up to [`NAMES`] name hashes, inline (16 bytes, no allocation: there is one per file of
/// every watched repository). 0 marks an empty slot; a hash of 0 is stored as 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Names([u32; NAMES]);

impl Names {
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied().filter(|&h| h != 0)
    }
}

impl FromIterator<u32> for Names {
    /// The first [`NAMES`] hashes; the rest are dropped.
    fn from_iter<I: IntoIterator<Item = u32>>(hashes: I) -> Self {
        let mut out = [0; NAMES];
        for (slot, h) in out.iter_mut().zip(hashes) {
            *slot = h.max(1);
        }
        Names(out)
    }
}

impl FileMeta {
    pub(crate) fn blob(&self) -> Option<BlobId> {
        match self.kind {
            Kind::Text(b) => Some(b),
            Kind::Binary | Kind::TooLarge => None,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        let (tag, blob) = match self.kind {
            Kind::Text(b) => (0u8, b.0),
            Kind::Binary => (1, [0; 20]),
            Kind::TooLarge => (2, [0; 20]),
        };
        v.push(tag);
        v.extend_from_slice(&self.stat.size.to_le_bytes());
        v.extend_from_slice(&self.stat.mtime.to_le_bytes());
        v.extend_from_slice(&self.stat.mtime_nsec.to_le_bytes());
        v.extend_from_slice(&self.stat.ino.to_le_bytes());
        v.extend_from_slice(&blob);
        // Symbols are short (the scanner caps them); a longer string is simply not stored.
        let symbols = u16::try_from(self.symbols.len())
            .map(|n| (n, self.symbols.as_bytes()))
            .unwrap_or((0, b""));
        v.extend_from_slice(&symbols.0.to_le_bytes());
        v.extend_from_slice(symbols.1);
        let names: Vec<u32> = self.names.iter().collect();
        v.push(names.len() as u8);
        for h in names {
            v.extend_from_slice(&h.to_le_bytes());
        }
        v
    }

    fn decode(mut b: &[u8]) -> Option<FileMeta> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, tail) = b.split_at_checked(n)?;
            *b = tail;
            Some(head)
        }
        fn u64le(b: &mut &[u8]) -> Option<u64> {
            Some(u64::from_le_bytes(take(b, 8)?.try_into().ok()?))
        }
        fn u16le(b: &mut &[u8]) -> Option<u16> {
            Some(u16::from_le_bytes(take(b, 2)?.try_into().ok()?))
        }
        let tag = take(&mut b, 1)?[0];
        let stat = Stat {
            size: u64le(&mut b)?,
            mtime: u64le(&mut b)? as i64,
            mtime_nsec: u64le(&mut b)? as i64,
            ino: u64le(&mut b)?,
        };
        let blob = BlobId(take(&mut b, 20)?.try_into().ok()?);
        let kind = match tag {
            0 => Kind::Text(blob),
            1 => Kind::Binary,
            2 => Kind::TooLarge,
            _ => return None,
        };
        let n = u16le(&mut b)?;
        let symbols = std::str::from_utf8(take(&mut b, usize::from(n))?)
            .ok()?
            .into();
        let n = usize::from(take(&mut b, 1)?[0]);
        if n > NAMES {
            return None;
        }
        let names = take(&mut b, n * 4)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        b.is_empty().then_some(FileMeta {
            stat,
            kind,
            symbols,
            names,
        })
    }
}

/// Why the cache could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CacheError {
    #[error("cannot open the context cache {path}: another process holds it ({source})")]
    Locked { path: String, source: sled::Error },
    #[error("cannot open the context cache {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("cannot open the context cache {path}: sled panicked while reading it")]
    Panicked { path: String },
    #[error("cannot open the context cache {path}: it has format {found:?}, this daemon uses {FORMAT:?}", FORMAT = String::from_utf8_lossy(FORMAT))]
    Format { path: String, found: String },
    #[error("cannot discard the broken context cache {path}: {source}")]
    Remove { path: String, source: io::Error },
    #[error("cannot create the context cache directory {path}: {source}")]
    Create { path: String, source: io::Error },
}

/// The cache's health, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CacheReport {
    /// `None` when serving; otherwise why the daemon runs without a cache.
    pub(crate) unavailable: Option<String>,
    /// Bytes sled uses on disk, as last measured.
    pub(crate) bytes_on_disk: u64,
    /// How often the cache was discarded and rebuilt since the daemon started.
    pub(crate) rebuilds: u64,
    /// Why it was last discarded, if it ever was.
    pub(crate) last_rebuild: Option<String>,
}

/// A handle to the cache; clones share one database.
#[derive(Clone)]
pub(crate) struct Cache {
    inner: Arc<Inner>,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("dir", &self.inner.dir)
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

struct Inner {
    dir: PathBuf,
    /// `None` after a rebuild failed: the daemon carries on without a cache.
    db: RwLock<Option<sled::Db>>,
    /// Bumped on every rebuild, so owners of in-memory state know to write it again.
    generation: AtomicU64,
    rebuilds: AtomicU64,
    bytes_on_disk: AtomicU64,
    unavailable: Mutex<Option<String>>,
    last_rebuild: Mutex<Option<String>>,
    /// What the files looked like when this process opened them (see [`Fingerprint`]).
    fingerprint: Mutex<Option<Fingerprint>>,
    /// The generation, for owners of in-memory state that rewrite it after a rebuild without
    /// waiting for their next change.
    generation_tx: tokio::sync::watch::Sender<u64>,
}

/// sled keeps serving from memory and from files it already has open, so neither a deleted
/// directory nor garbage written over its files shows up as an error until much later (or at
/// the next start). The `db` file's inode and the `conf` file's bytes (written once when the
/// database is created, never again) are what a cheap periodic check compares.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    db_ino: u64,
    conf: Vec<u8>,
}

impl Fingerprint {
    fn of(dir: &Path) -> io::Result<Fingerprint> {
        use std::os::unix::fs::MetadataExt;
        Ok(Fingerprint {
            db_ino: std::fs::metadata(dir.join("db"))?.ino(),
            conf: std::fs::read(dir.join("conf"))?,
        })
    }
}

impl Cache {
    /// Open (or create) the cache in `dir`. A broken or foreign cache is discarded and rebuilt
    /// here; an error means there is no cache at all (another process holds it, or the
    /// directory cannot be created or removed). Blocks: sled replays its log on open.
    pub(crate) fn open(dir: &Path) -> Result<Cache, CacheError> {
        let mut rebuilds = 0;
        let mut last_rebuild = None;
        let db = match open_db(dir) {
            Ok(db) => db,
            Err(e @ (CacheError::Locked { .. } | CacheError::Create { .. })) => return Err(e),
            Err(e) => {
                warn!(error = %e, "discarding the context cache and rebuilding it");
                rebuilds = 1;
                last_rebuild = Some(format!("found broken at start: {e}"));
                remove_dir(dir)?;
                open_db(dir)?
            }
        };
        let cache = Cache {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                db: RwLock::new(Some(db)),
                generation: AtomicU64::new(0),
                rebuilds: AtomicU64::new(rebuilds),
                bytes_on_disk: AtomicU64::new(0),
                unavailable: Mutex::new(None),
                last_rebuild: Mutex::new(last_rebuild),
                fingerprint: Mutex::new(Fingerprint::of(dir).ok()),
                generation_tx: tokio::sync::watch::Sender::new(0),
            }),
        };
        cache.measure();
        Ok(cache)
    }

    /// Changes whenever the database was discarded; whoever persisted state must write it again.
    pub(crate) fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    pub(crate) fn report(&self) -> CacheReport {
        CacheReport {
            unavailable: self.inner.unavailable.lock().ok().and_then(|u| u.clone()),
            bytes_on_disk: self.inner.bytes_on_disk.load(Ordering::Relaxed),
            rebuilds: self.inner.rebuilds.load(Ordering::Relaxed),
            last_rebuild: self.inner.last_rebuild.lock().ok().and_then(|u| u.clone()),
        }
    }

    /// Changes of [`Cache::generation`], as they happen.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.generation_tx.subscribe()
    }

    /// Record sled's size on disk for [`Cache::report`] (it stats files, so not on async threads).
    pub(crate) fn measure(&self) {
        if let Some(n) = self.with_db(|db| db.size_on_disk()) {
            self.inner.bytes_on_disk.store(n, Ordering::Relaxed);
        }
    }

    /// Make written entries durable (at shutdown).
    pub(crate) fn flush(&self) {
        let _ = self.with_db(|db| db.flush());
    }

    /// Notice a cache deleted or overwritten under the running daemon (see [`Fingerprint`]) and
    /// start a fresh one: sled would otherwise carry on writing to unlinked files, or serve
    /// garbage once it reads back a page. A few syscalls; the daemon runs it periodically and
    /// before each batch.
    pub(crate) fn check(&self) {
        let open = self.inner.db.read().map(|g| g.is_some()).unwrap_or(false);
        if !open {
            return;
        }
        let generation = self.generation();
        let known = self.inner.fingerprint.lock().ok().and_then(|f| f.clone());
        let why = match (Fingerprint::of(&self.inner.dir), known) {
            (Err(e), _) if e.kind() == io::ErrorKind::NotFound => "its files were deleted",
            (Err(_), _) => "its files cannot be read",
            (Ok(now), Some(known)) if now.db_ino != known.db_ino => "its files were replaced",
            (Ok(now), Some(known)) if now.conf != known.conf => "its files were overwritten",
            (Ok(_), Some(_)) => return,
            (Ok(now), None) => {
                if let Ok(mut f) = self.inner.fingerprint.lock() {
                    *f = Some(now);
                }
                return;
            }
        };
        self.rebuild(generation, why);
    }

    /// Discard the cache because something read from it is wrong (a content whose blob id does
    /// not match what was stored under that id).
    pub(crate) fn discard(&self, why: &str) {
        self.rebuild(self.generation(), why);
    }

    /// Every file of `workdir` as last saved by [`Cache::save_snapshot`], for a warm start.
    /// `None` if there is none, no cache, or it was unreadable (an undecodable snapshot is
    /// removed: the repository is then read from disk, and the cached contents stay, each
    /// checked against its blob id when read).
    pub(crate) fn load_snapshot(&self, workdir: &Path) -> Option<Vec<(String, FileMeta)>> {
        let path = self.with_dir(|dir| Ok(snapshot_path(dir, workdir)))?;
        let bytes = self.with_dir(|_| std::fs::read(&path))?;
        let decoded = strip_snapshot_header(&bytes, workdir).and_then(decode_snapshot);
        if decoded.is_none() {
            warn!(file = %path.display(), "removing an undecodable snapshot; the repository is read from disk");
            let _ = self.with_dir(|_| std::fs::remove_file(&path));
        }
        decoded
    }

    /// Replace `workdir`'s snapshot: the metadata of every indexed file, as one file beside
    /// sled's (see [`SNAPSHOT_DIR`]). Written to a temporary name and renamed over the old
    /// one, so a reader or a crash sees the old snapshot or the new one; not fsynced (the
    /// cache is disposable, and a torn one is removed when read).
    pub(crate) fn save_snapshot<'a>(
        &self,
        workdir: &Path,
        entries: impl ExactSizeIterator<Item = (&'a str, &'a FileMeta)>,
    ) {
        let mut value = snapshot_header(workdir);
        encode_snapshot(&mut value, entries);
        let _ = self.with_dir(|dir| {
            use std::io::Write as _;
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join(SNAPSHOT_DIR))?;
            let path = snapshot_path(dir, workdir);
            let tmp = path.with_extension("tmp");
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut f| f.write_all(&value))
                .and_then(|()| std::fs::rename(&tmp, &path));
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written
        });
    }

    /// Forget contents no indexed file refers to any more.
    pub(crate) fn drop_blobs(&self, workdir: &Path, stale: &[(&str, BlobId)]) {
        if stale.is_empty() {
            return;
        }
        let name = tree_name(b"blob", workdir);
        let mut batch = sled::Batch::default();
        for (rel, blob) in stale {
            batch.remove(blob_key(rel, *blob));
        }
        let _ = self.with_db(|db| db.open_tree(&name)?.apply_batch(batch));
    }

    /// The stored content of `rel` at `blob`, if any.
    pub(crate) fn content(&self, workdir: &Path, rel: &str, blob: BlobId) -> Option<Vec<u8>> {
        let name = tree_name(b"blob", workdir);
        self.with_db(|db| db.open_tree(&name)?.get(blob_key(rel, blob)))?
            .map(|v| v.to_vec())
    }

    /// Store content read on a cache miss.
    pub(crate) fn put_content(&self, workdir: &Path, rel: &str, blob: BlobId, bytes: &[u8]) {
        let name = tree_name(b"blob", workdir);
        let _ = self.with_db(|db| db.open_tree(&name)?.insert(blob_key(rel, blob), bytes));
    }

    /// Forget a repository that is no longer watched.
    pub(crate) fn drop_repo(&self, workdir: &Path) {
        let _ = self.with_dir(
            |dir| match std::fs::remove_file(snapshot_path(dir, workdir)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        );
        let _ = self.with_db(|db| db.drop_tree(tree_name(b"blob", workdir)).map(drop));
    }

    /// Run `f` on the cache directory while the database is open and cannot be rebuilt under
    /// it (a rebuild removes the directory). A file error is logged and is not a reason to
    /// discard sled's database: the snapshot files are checked when read.
    fn with_dir<R>(&self, f: impl FnOnce(&Path) -> io::Result<R>) -> Option<R> {
        let guard = self.inner.db.read().ok()?;
        guard.as_ref()?;
        match f(&self.inner.dir) {
            Ok(r) => Some(r),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                warn!(dir = %self.inner.dir.display(), error = %e, "context cache snapshot");
                None
            }
        }
    }

    /// Run `f` on the database; on any error (or a panic inside sled) discard and rebuild the
    /// cache and return `None`, so a broken cache costs a re-read, never a failed request.
    fn with_db<R>(&self, f: impl FnOnce(&sled::Db) -> sled::Result<R>) -> Option<R> {
        let generation = self.generation();
        let db = self.inner.db.read().ok()?.clone()?;
        // sled is a third-party store with reported corruption bugs; a panic in it must not
        // take a blocking thread (or the repo actor) down with it.
        match catch_unwind(AssertUnwindSafe(|| f(&db))) {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                self.rebuild(generation, &e.to_string());
                None
            }
            Err(_) => {
                self.rebuild(generation, "sled panicked");
                None
            }
        }
    }

    /// Discard the database and open an empty one, unless someone already did since
    /// `generation` (several threads may hit the same broken database at once).
    fn rebuild(&self, generation: u64, why: &str) {
        let Ok(mut guard) = self.inner.db.write() else {
            return;
        };
        if self.generation() != generation {
            return;
        }
        warn!(dir = %self.inner.dir.display(), why, "discarding the context cache and rebuilding it");
        // Other clones of the old handle may still be alive on other threads; on Unix the
        // unlinked files stay valid for them and the fresh database gets new files and a new lock.
        *guard = None;
        let fresh = remove_dir(&self.inner.dir).and_then(|()| open_db(&self.inner.dir));
        let unavailable = match fresh {
            Ok(db) => {
                *guard = Some(db);
                if let Ok(mut f) = self.inner.fingerprint.lock() {
                    *f = Fingerprint::of(&self.inner.dir).ok();
                }
                info!(dir = %self.inner.dir.display(), "context cache rebuilt");
                None
            }
            Err(e) => {
                warn!(error = %e, "running without a context cache");
                Some(e.to_string())
            }
        };
        if let Ok(mut u) = self.inner.unavailable.lock() {
            *u = unavailable;
        }
        if let Ok(mut l) = self.inner.last_rebuild.lock() {
            *l = Some(why.to_owned());
        }
        self.inner.rebuilds.fetch_add(1, Ordering::Relaxed);
        let generation = self.inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.inner.generation_tx.send_replace(generation);
    }
}

#[cfg(test)]
impl Cache {
    /// Whether any key or value of any tree, or any snapshot file, contains `needle` (tests:
    /// canaries never cached).
    pub(crate) fn contains_bytes(&self, needle: &[u8]) -> bool {
        let has = |b: &[u8]| b.windows(needle.len()).any(|w| w == needle);
        let in_files = std::fs::read_dir(self.inner.dir.join(SNAPSHOT_DIR))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .any(|f| std::fs::read(f.path()).is_ok_and(|b| has(&b)));
        in_files || self.contains_bytes_in_db(needle)
    }

    /// Whether any key or value of any sled tree contains `needle`.
    pub(crate) fn contains_bytes_in_db(&self, needle: &[u8]) -> bool {
        let has = |b: &[u8]| b.windows(needle.len()).any(|w| w == needle);
        self.with_db(|db| {
            for name in db.tree_names() {
                for kv in db.open_tree(&name)?.iter() {
                    let (k, v) = kv?;
                    if has(&k) || has(&v) {
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        })
        .unwrap_or(false)
    }
}

fn workdir_key(workdir: &Path) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    workdir.as_os_str().as_bytes()
}

fn tree_name(kind: &[u8], workdir: &Path) -> Vec<u8> {
    let mut name = kind.to_vec();
    name.push(0);
    name.extend_from_slice(workdir_key(workdir));
    name
}

fn snapshot_path(dir: &Path, workdir: &Path) -> PathBuf {
    dir.join(SNAPSHOT_DIR)
        .join(BlobId::of(workdir_key(workdir)).to_string())
}

/// [`SNAPSHOT_MAGIC`], `<workdir len u32><workdir>`.
fn snapshot_header(workdir: &Path) -> Vec<u8> {
    let key = workdir_key(workdir);
    let mut v = SNAPSHOT_MAGIC.to_vec();
    v.extend_from_slice(&(key.len() as u32).to_le_bytes());
    v.extend_from_slice(key);
    v
}

/// The encoded snapshot after [`snapshot_header`], if the file is `workdir`'s.
fn strip_snapshot_header<'b>(bytes: &'b [u8], workdir: &Path) -> Option<&'b [u8]> {
    let header = snapshot_header(workdir);
    bytes.strip_prefix(header.as_slice())
}

/// Appends `<count u32>` then per file `<path len u16><path><meta len u16><meta>`.
fn encode_snapshot<'a>(
    v: &mut Vec<u8>,
    entries: impl ExactSizeIterator<Item = (&'a str, &'a FileMeta)>,
) {
    v.reserve(entries.len() * 96 + 4);
    let start = v.len();
    let mut count = 0u32;
    v.extend_from_slice(&count.to_le_bytes());
    for (rel, meta) in entries {
        let meta = meta.encode();
        // Paths and metadata are far below 64 KiB; anything else is left out, not truncated.
        let (Ok(rl), Ok(ml)) = (u16::try_from(rel.len()), u16::try_from(meta.len())) else {
            continue;
        };
        v.extend_from_slice(&rl.to_le_bytes());
        v.extend_from_slice(rel.as_bytes());
        v.extend_from_slice(&ml.to_le_bytes());
        v.extend_from_slice(&meta);
        count += 1;
    }
    v[start..start + 4].copy_from_slice(&count.to_le_bytes());
}

fn decode_snapshot(mut b: &[u8]) -> Option<Vec<(String, FileMeta)>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = b.split_at_checked(n)?;
        *b = tail;
        Some(head)
    }
    fn len16(b: &mut &[u8]) -> Option<usize> {
        Some(usize::from(u16::from_le_bytes(
            take(b, 2)?.try_into().ok()?,
        )))
    }
    let count = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?);
    // The count comes from disk: cap the preallocation by what the bytes could hold.
    let mut out = Vec::with_capacity((count as usize).min(b.len() / 8));
    for _ in 0..count {
        let n = len16(&mut b)?;
        let rel = std::str::from_utf8(take(&mut b, n)?).ok()?.to_owned();
        let n = len16(&mut b)?;
        out.push((rel, FileMeta::decode(take(&mut b, n)?)?));
    }
    b.is_empty().then_some(out)
}

fn blob_key(rel: &str, blob: BlobId) -> Vec<u8> {
    let mut key = Vec::with_capacity(rel.len() + 21);
    key.extend_from_slice(rel.as_bytes());
    key.push(0);
    key.extend_from_slice(&blob.0);
    key
}

fn remove_dir(dir: &Path) -> Result<(), CacheError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CacheError::Remove {
            path: dir.display().to_string(),
            source,
        }),
    }
}

/// One attempt at opening `dir` and checking its format.
fn open_db(dir: &Path) -> Result<sled::Db, CacheError> {
    let path = || dir.display().to_string();
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CacheError::Create {
            path: path(),
            source,
        })?;
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(PAGE_CACHE_BYTES)
        .flush_every_ms(Some(FLUSH_EVERY_MS));
    let db = match catch_unwind(AssertUnwindSafe(|| config.open())) {
        Ok(Ok(db)) => db,
        Ok(Err(source)) if is_lock_error(&source) => {
            return Err(CacheError::Locked {
                path: path(),
                source,
            });
        }
        Ok(Err(source)) => {
            return Err(CacheError::Open {
                path: path(),
                source,
            });
        }
        Err(_) => return Err(CacheError::Panicked { path: path() }),
    };
    let open = |source| CacheError::Open {
        path: path(),
        source,
    };
    let checked = catch_unwind(AssertUnwindSafe(|| -> Result<(), CacheError> {
        match db.get(FORMAT_KEY).map_err(open)? {
            Some(found) if found.as_ref() == FORMAT => Ok(()),
            Some(found) => Err(CacheError::Format {
                path: path(),
                found: String::from_utf8_lossy(&found).into_owned(),
            }),
            // A database without the key is either brand new or not ours.
            None if db.tree_names().len() <= 1 && db.is_empty() => {
                db.insert(FORMAT_KEY, FORMAT).map_err(open)?;
                db.flush().map_err(open)?;
                Ok(())
            }
            None => Err(CacheError::Format {
                path: path(),
                found: "none".to_owned(),
            }),
        }
    }));
    match checked {
        Ok(Ok(())) => Ok(db),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(CacheError::Panicked { path: path() }),
    }
}

/// sled reports a held lock as an `Other` I/O error with this text (sled 0.34.7 `config.rs`,
/// `try_lock`); nothing else distinguishes it.
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.kind() == io::ErrorKind::Other
        && io.to_string().contains("could not acquire lock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(blob: &[u8]) -> FileMeta {
        FileMeta {
            stat: Stat {
                size: blob.len() as u64,
                mtime: 1_700_000_000,
                mtime_nsec: 5,
                ino: 42,
            },
            kind: Kind::Text(BlobId::of(blob)),
            symbols: "fn main, struct Ünïcode".into(),
            names: [7, u32::MAX].into_iter().collect(),
        }
    }

    /// One file's content and a snapshot holding just it, stored the way the watcher does.
    fn put(cache: &Cache, repo: &Path, rel: &str, content: &[u8]) {
        cache.put_content(repo, rel, BlobId::of(content), content);
        let m = meta(content);
        cache.save_snapshot(repo, std::iter::once((rel, &m)));
    }

    /// Reopen right after a drop: sled's flusher thread lets go of the lock a moment after the
    /// last handle is dropped, as a previous daemon's would (the daemon retries the same way).
    fn reopen(path: &Path) -> Cache {
        for _ in 0..100 {
            match Cache::open(path) {
                Err(CacheError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                other => return other.expect("open"),
            }
        }
        panic!("the cache stayed locked");
    }

    #[test]
    fn blob_ids_are_git_blob_ids() {
        // `git hash-object` of "hello\n".
        assert_eq!(
            BlobId::of(b"hello\n").to_string(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }

    #[test]
    fn metadata_round_trips_and_garbage_is_refused() {
        for m in [
            meta(b"x"),
            FileMeta {
                stat: Stat::default(),
                kind: Kind::Binary,
                symbols: Box::default(),
                names: Names::default(),
            },
            FileMeta {
                stat: Stat {
                    mtime: -3,
                    ..Stat::default()
                },
                kind: Kind::TooLarge,
                symbols: Box::default(),
                names: Names::default(),
            },
        ] {
            assert_eq!(FileMeta::decode(&m.encode()), Some(m));
        }
        let mut bytes = meta(b"x").encode();
        bytes.push(0);
        assert_eq!(FileMeta::decode(&bytes), None, "trailing bytes");
        assert_eq!(FileMeta::decode(&bytes[..10]), None, "truncated");
        assert_eq!(FileMeta::decode(b""), None);
    }

    #[test]
    fn snapshots_round_trip_and_garbage_is_refused() {
        let (a, b) = (meta(b"a"), meta(b"b"));
        let rows = [("src/a.rs", &a), ("é/b.rs", &b)];
        let mut bytes = Vec::new();
        encode_snapshot(&mut bytes, rows.iter().copied());
        let back = decode_snapshot(&bytes).expect("decodes");
        assert_eq!(
            back,
            vec![("src/a.rs".to_owned(), a.clone()), ("é/b.rs".to_owned(), b)]
        );
        assert_eq!(
            decode_snapshot(&bytes[..bytes.len() - 1]),
            None,
            "truncated"
        );
        assert_eq!(
            decode_snapshot(b"\xff\xff\xff\xff"),
            None,
            "count beyond the bytes"
        );
        assert_eq!(
            decode_snapshot(&{
                let mut empty = Vec::new();
                encode_snapshot(&mut empty, std::iter::empty());
                empty
            }),
            Some(vec![])
        );
    }

    #[test]
    fn entries_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cache");
        let repo = Path::new("/repo");
        {
            let cache = Cache::open(&path).expect("open");
            put(&cache, repo, "src/b.rs", b"b");
            put(&cache, repo, "src/a.rs", b"a");
            cache.drop_blobs(repo, &[("src/b.rs", BlobId::of(b"b"))]);
            cache.flush();
        }
        let cache = reopen(&path);
        assert_eq!(cache.report().rebuilds, 0);
        let rows = cache.load_snapshot(repo).expect("readable");
        assert_eq!(
            rows,
            vec![("src/a.rs".to_owned(), meta(b"a"))],
            "replaced whole"
        );
        assert_eq!(
            cache.content(repo, "src/a.rs", BlobId::of(b"a")),
            Some(b"a".to_vec())
        );
        assert_eq!(cache.content(repo, "src/b.rs", BlobId::of(b"b")), None);
        // Another repository is separate, and dropping one forgets it.
        assert_eq!(cache.load_snapshot(Path::new("/other")), None);
        cache.drop_repo(repo);
        assert_eq!(cache.load_snapshot(repo), None);
        assert_eq!(cache.content(repo, "src/a.rs", BlobId::of(b"a")), None);
    }

    #[test]
    fn an_undecodable_snapshot_is_removed_and_the_rest_of_the_cache_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("open");
        let repo = Path::new("/repo");
        put(&cache, repo, "a", b"1");
        let file = snapshot_path(dir.path(), repo);
        let good = std::fs::read(&file).expect("the snapshot is a file");
        for junk in [&b"junk"[..], &good[..good.len() - 1], b""] {
            std::fs::write(&file, junk).expect("write junk");
            assert_eq!(cache.load_snapshot(repo), None);
            assert!(!file.exists(), "removed");
        }
        // A snapshot of another worktree under this one's name is not taken for it.
        put(&cache, Path::new("/other"), "a", b"1");
        std::fs::copy(snapshot_path(dir.path(), Path::new("/other")), &file).expect("copy");
        assert_eq!(cache.load_snapshot(repo), None);
        assert_eq!(cache.report().rebuilds, 0);
        assert_eq!(
            cache.content(repo, "a", BlobId::of(b"1")),
            Some(b"1".to_vec()),
            "the contents stay"
        );
    }

    #[test]
    fn sled_does_not_keep_a_snapshot_resident() {
        // The point of keeping snapshots out of sled: nothing of a saved snapshot is in the
        // database (whose page cache would hold it in memory).
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("open");
        let repo = Path::new("/repo");
        let m = meta(b"x");
        cache.save_snapshot(repo, std::iter::once(("canary-path-7f3a.rs", &m)));
        assert!(!cache.contains_bytes_in_db(b"canary-path-7f3a"));
        assert!(cache.contains_bytes(b"canary-path-7f3a"), "but it is saved");
        assert_eq!(
            cache.load_snapshot(repo),
            Some(vec![("canary-path-7f3a.rs".to_owned(), m)])
        );
    }

    #[test]
    fn garbage_in_the_sled_files_is_discarded_and_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cache");
        let repo = Path::new("/repo");
        {
            let cache = Cache::open(&path).expect("open");
            put(&cache, repo, "a", b"1");
            cache.flush();
        }
        // Overwrite every file sled wrote with garbage.
        let mut n = 0;
        for entry in walk_files(&path) {
            std::fs::write(&entry, b"\xde\xad\xbe\xef garbage, not a sled file").expect("write");
            n += 1;
        }
        assert!(n >= 2, "sled wrote {n} files");
        let cache = reopen(&path);
        assert_eq!(cache.report().rebuilds, 1);
        assert_eq!(cache.report().unavailable, None);
        assert_eq!(cache.load_snapshot(repo), None, "empty after the rebuild");
        put(&cache, repo, "a", b"1");
        assert_eq!(
            cache.content(repo, "a", BlobId::of(b"1")),
            Some(b"1".to_vec())
        );
    }

    #[test]
    fn a_truncated_database_is_discarded_and_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let cache = Cache::open(dir.path()).expect("open");
            put(&cache, Path::new("/r"), "a", b"1");
            cache.flush();
        }
        for entry in walk_files(dir.path()) {
            std::fs::File::options()
                .write(true)
                .open(&entry)
                .and_then(|f| f.set_len(7))
                .expect("truncate");
        }
        let cache = reopen(dir.path());
        assert_eq!(cache.load_snapshot(Path::new("/r")), None);
        assert_eq!(cache.report().unavailable, None);
    }

    #[test]
    fn a_foreign_format_is_discarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::open(dir.path()).expect("sled");
            db.insert(FORMAT_KEY, b"spark-context-cache/0".as_slice())
                .expect("insert");
            db.insert("stale", "x").expect("insert");
            db.flush().expect("flush");
        }
        let cache = reopen(dir.path());
        assert_eq!(cache.report().rebuilds, 1);
        let db = cache.inner.db.read().expect("lock").clone().expect("db");
        assert_eq!(db.get("stale").expect("get"), None);
        assert_eq!(
            db.get(FORMAT_KEY).expect("get").as_deref(),
            Some(FORMAT),
            "the new format is recorded"
        );
    }

    #[test]
    fn a_database_held_by_another_handle_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Cache::open(dir.path()).expect("open");
        put(&first, Path::new("/r"), "a", b"1");
        // The lock is per open file description, so a second open in this process conflicts
        // just as a second daemon would.
        let err = Cache::open(dir.path()).expect_err("locked");
        assert!(matches!(err, CacheError::Locked { .. }), "{err}");
        assert!(
            err.to_string().starts_with("cannot open the context cache"),
            "{err}"
        );
        assert_eq!(
            first.content(Path::new("/r"), "a", BlobId::of(b"1")),
            Some(b"1".to_vec()),
            "not discarded"
        );
    }

    #[test]
    fn a_deleted_directory_is_noticed_and_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cache");
        let cache = Cache::open(&path).expect("open");
        let g = cache.generation();
        std::fs::remove_dir_all(&path).expect("rm");
        cache.check();
        assert_eq!(cache.generation(), g + 1);
        assert!(path.join("db").exists());
        put(&cache, Path::new("/r"), "a", b"1");
        assert_eq!(
            cache.load_snapshot(Path::new("/r")).map(|r| r.len()),
            Some(1)
        );
    }

    #[test]
    fn files_overwritten_under_a_running_cache_are_noticed_and_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cache");
        let cache = Cache::open(&path).expect("open");
        put(&cache, Path::new("/r"), "a", b"1");
        cache.flush();
        let generations = cache.subscribe();
        cache.check();
        assert_eq!(cache.generation(), 0, "an intact cache is left alone");
        for f in walk_files(&path) {
            std::fs::write(&f, b"\x00garbage\xff").expect("clobber");
        }
        cache.check();
        assert_eq!(cache.generation(), 1);
        assert!(generations.has_changed().expect("sender alive"));
        let r = cache.report();
        assert_eq!(r.rebuilds, 1);
        assert_eq!(
            r.last_rebuild.as_deref(),
            Some("its files were overwritten")
        );
        assert_eq!(r.unavailable, None);
        assert_eq!(
            cache.load_snapshot(Path::new("/r")),
            None,
            "fresh and empty"
        );
        put(&cache, Path::new("/r"), "a", b"1");
        assert_eq!(
            cache.content(Path::new("/r"), "a", BlobId::of(b"1")),
            Some(b"1".to_vec()),
            "works again"
        );
        cache.check();
        assert_eq!(
            cache.generation(),
            1,
            "the fresh files are the new reference"
        );
        drop(cache);
        let again = reopen(&path);
        assert_eq!(again.report().rebuilds, 0, "what was rebuilt opens cleanly");
        assert_eq!(
            again.load_snapshot(Path::new("/r")).map(|r| r.len()),
            Some(1)
        );
    }

    #[test]
    fn a_replaced_directory_is_noticed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cache");
        let cache = Cache::open(&path).expect("open");
        let moved = dir.path().join("elsewhere");
        std::fs::rename(&path, &moved).expect("mv");
        std::fs::create_dir_all(&path).expect("mkdir");
        std::fs::copy(moved.join("conf"), path.join("conf")).expect("cp conf");
        std::fs::copy(moved.join("db"), path.join("db")).expect("cp db");
        cache.check();
        assert_eq!(
            cache.report().last_rebuild.as_deref(),
            Some("its files were replaced")
        );
    }

    fn walk_files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir") {
                let p = e.expect("entry").path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out
    }
}
