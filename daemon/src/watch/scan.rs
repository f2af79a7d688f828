//! Listing directories the way git sees them, and reading files the way the model may see them.
//!
//! The walk is our own, one directory at a time, with the `ignore` crate's gitignore matchers:
//! that lets the watcher add a directory's watch *before* listing it (so a file created right
//! after `mkdir -p` is either listed or reported), keep each directory's matcher in memory so a
//! later change costs one `readdir`, and never enter an ignored tree at all. Precedence follows
//! git: the nearest `.gitignore` wins, then its parents', then `.git/info/exclude`, then the
//! global excludes file.
//!
//! What is never listed: anything git ignores (tracked-but-ignored files are left out too, which
//! only errs on the safe side), `.git` and nested repositories, symlinks, special files, paths
//! `validate_rel_path` refuses and the secret deny-list. What is never read: all of that, plus
//! files over the size limit, binaries and non-UTF-8 text (listed by name only).

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

use super::MAX_FILE_BYTES;
use crate::edit::paths;
use crate::watch::cache::{BlobId, FileMeta, Kind, NAMES, Names, Stat};

/// At most this many symbols per file in the outline: enough to recognise a file.
const MAX_SYMBOLS: usize = 8;
/// At most this many bytes of symbols per file: they live in memory for every indexed file.
const MAX_SYMBOLS_BYTES: usize = 160;
/// Longest symbol name kept; longer lines are rarely definitions worth listing.
const MAX_SYMBOL_CHARS: usize = 40;

/// Where git keeps the files the watcher cares about.
#[derive(Debug, Clone)]
pub(crate) struct GitPaths {
    /// The repository's git directory (`.git`, or where a linked worktree's `.git` file points).
    pub(crate) git_dir: PathBuf,
    /// `index.lock`: while it exists, git is rewriting the tree and the index.
    pub(crate) lock: PathBuf,
    /// `info/exclude` in the common git directory.
    pub(crate) exclude: PathBuf,
}

impl GitPaths {
    pub(crate) fn of(workdir: &Path) -> GitPaths {
        let dot_git = workdir.join(".git");
        // A linked worktree or submodule has a `.git` file: `gitdir: <path>`.
        let git_dir = fs::read_to_string(&dot_git)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("gitdir:"))
                    .map(|p| workdir.join(p.trim()))
            })
            .unwrap_or(dot_git);
        let common = fs::read_to_string(git_dir.join("commondir"))
            .ok()
            .map(|p| git_dir.join(p.trim()))
            .unwrap_or_else(|| git_dir.clone());
        GitPaths {
            lock: git_dir.join("index.lock"),
            exclude: common.join("info").join("exclude"),
            git_dir,
        }
    }
}

/// The repository-wide ignore rules (lowest precedence).
#[derive(Debug)]
pub(crate) struct Rules {
    exclude: Gitignore,
    global: Gitignore,
}

impl Rules {
    pub(crate) fn load(workdir: &Path, git: &GitPaths) -> Rules {
        let mut b = GitignoreBuilder::new(workdir);
        // A missing or partly invalid file still yields the globs that parsed.
        let _ = b.add(&git.exclude);
        let exclude = b.build().unwrap_or_else(|_| Gitignore::empty());
        let (global, _) = GitignoreBuilder::new(workdir).build_global();
        Rules { exclude, global }
    }
}

/// A directory's own `.gitignore`, compiled; `None` when it has none.
pub(crate) type DirRules = Option<Arc<Gitignore>>;

/// What one directory holds, as the index may see it.
#[derive(Debug, Default)]
pub(crate) struct Listing {
    /// False when the directory is gone (or is no longer a directory).
    pub(crate) exists: bool,
    pub(crate) ino: u64,
    pub(crate) rules: DirRules,
    /// Names of eligible regular files with their `lstat`.
    pub(crate) files: Vec<(String, Stat)>,
    /// Names of subdirectories to descend into, with their inode.
    pub(crate) dirs: Vec<(String, u64)>,
}

pub(crate) fn join_rel(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// List `dir_rel`. `chain` holds the `.gitignore` matchers of its ancestors, nearest first.
pub(crate) fn list_dir(
    workdir: &Path,
    dir_rel: &str,
    chain: &[Arc<Gitignore>],
    rules: &Rules,
) -> Listing {
    let abs = workdir.join(dir_rel);
    let Ok(meta) = fs::symlink_metadata(&abs) else {
        return Listing::default();
    };
    let Ok(entries) = fs::read_dir(&abs) else {
        return Listing::default();
    };
    if !meta.is_dir() {
        return Listing::default();
    }
    let own = load_gitignore(&abs);
    let mut listing = Listing {
        exists: true,
        ino: Stat::of(&meta).ino,
        rules: own.clone(),
        ..Listing::default()
    };
    let ignored = |path: &Path, is_dir: bool| {
        for gi in own.iter().chain(chain.iter()) {
            let m = gi.matched(path, is_dir);
            if m.is_ignore() {
                return true;
            }
            if m.is_whitelist() {
                return false;
            }
        }
        let m = rules.exclude.matched(path, is_dir);
        if !m.is_none() {
            return m.is_ignore();
        }
        rules.global.matched(path, is_dir).is_ignore()
    };
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if is_edit_temp(&name) {
            continue;
        }
        let rel = join_rel(dir_rel, &name);
        // The same spelling checks as an edit target; a path that normalises to something else
        // (or is refused) is simply not indexed.
        match paths::validate_rel_path(&rel) {
            Ok(r) if r.as_str() == rel && !paths::is_secret(&r) => {}
            _ => continue,
        }
        let Ok(ft) = entry.file_type() else { continue };
        let path = entry.path();
        if ft.is_dir() {
            // A nested repository or submodule belongs to someone else.
            if fs::symlink_metadata(path.join(".git")).is_ok() || ignored(&path, true) {
                continue;
            }
            if let Ok(m) = entry.metadata() {
                listing.dirs.push((name, Stat::of(&m).ino));
            }
        } else if ft.is_file()
            && !ignored(&path, false)
            && let Ok(m) = entry.metadata()
        {
            listing.files.push((name, Stat::of(&m)));
        }
        // Symlinks, sockets, FIFOs and devices are never indexed.
    }
    listing
}

/// The edit engine's staging files (`.{name}.spark-{id}.tmp`, edit/journal.rs `temp_path`):
/// they exist for microseconds before being renamed over the target, and are never the user's.
fn is_edit_temp(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp") && name.contains(".spark-")
}

fn load_gitignore(dir: &Path) -> DirRules {
    let path = dir.join(".gitignore");
    // Only a regular file: a symlinked `.gitignore` is not worth following.
    if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let mut b = GitignoreBuilder::new(dir);
    let _ = b.add(&path);
    let gi = b.build().ok()?;
    (!gi.is_empty()).then(|| Arc::new(gi))
}

/// A file as read for the index.
#[derive(Debug)]
pub(crate) enum Read {
    /// Gone, or no longer a regular file we may open (replaced by a symlink, unreadable).
    Skip,
    /// Its metadata; for text, the bytes are in the caller's buffer.
    File(FileMeta),
}

/// Read `abs` into `buf` for the index without following a symlink at the leaf or blocking on a
/// FIFO, and classify it: text (cacheable), binary or too large (named only). The caller's
/// buffer is reused from file to file, so indexing a large tree does not scatter thousands of
/// freed buffers between long-lived allocations (which kept RSS high afterwards).
pub(crate) fn read_file(abs: &Path, rel: &str, buf: &mut Vec<u8>, with_symbols: bool) -> Read {
    use rustix::fs::{Mode, OFlags};
    buf.clear();
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let Ok(fd) = rustix::fs::open(abs, flags, Mode::empty()) else {
        return Read::Skip;
    };
    let file = fs::File::from(fd);
    let Ok(meta) = file.metadata() else {
        return Read::Skip;
    };
    if !meta.is_file() {
        return Read::Skip;
    }
    let stat = Stat::of(&meta);
    let named = |kind| {
        Read::File(FileMeta {
            stat,
            kind,
            symbols: Box::default(),
            names: Names::default(),
        })
    };
    if stat.size > MAX_FILE_BYTES as u64 {
        return named(Kind::TooLarge);
    }
    if file
        .take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(buf)
        .is_err()
    {
        buf.clear();
        return Read::Skip;
    }
    if buf.len() > MAX_FILE_BYTES {
        buf.clear();
        return named(Kind::TooLarge);
    }
    let Some(text) = as_text(buf) else {
        buf.clear();
        return named(Kind::Binary);
    };
    Read::File(FileMeta {
        // The size actually read: the file may have grown since `fstat`.
        stat: Stat {
            size: buf.len() as u64,
            ..stat
        },
        symbols: if with_symbols {
            symbols(rel, text)
        } else {
            Box::default()
        },
        // Too many files to keep the names as text: keep a few 4-byte hashes of them instead.
        names: if with_symbols {
            Names::default()
        } else {
            symbol_hashes(rel, text)
        },
        kind: Kind::Text(BlobId::of(buf)),
    })
}

/// The same test context.rs applies to a focus file: UTF-8 without NUL bytes.
pub(crate) fn as_text(bytes: &[u8]) -> Option<&str> {
    if bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

/// Calls `found(keyword, name)` for each top-level definition: an unindented line that starts
/// with a definition keyword of the file's language (after modifiers such as `pub`).
fn each_symbol(rel: &str, text: &str, mut found: impl FnMut(&str, &str) -> Flow) {
    let ext = rel.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    let keywords: &[&str] = match ext {
        "rs" => &[
            "fn",
            "struct",
            "enum",
            "trait",
            "mod",
            "union",
            "macro_rules!",
        ],
        "py" | "pyi" => &["def", "class"],
        "js" | "jsx" | "mjs" | "cjs" | "ts" | "tsx" | "mts" | "cts" => {
            &["function", "function*", "class", "interface"]
        }
        "go" => &["func", "type"],
        "rb" => &["def", "class", "module"],
        "java" | "kt" | "kts" | "scala" | "cs" | "swift" | "php" | "dart" => &[
            "class",
            "interface",
            "fun",
            "func",
            "function",
            "object",
            "enum",
            "trait",
        ],
        "c" | "h" | "cc" | "cpp" | "hpp" | "cxx" | "hh" => &["struct", "class", "enum", "union"],
        "ex" | "exs" => &["defmodule", "def"],
        "lua" => &["function", "local function"],
        "sh" | "bash" | "zsh" => &["function"],
        _ => return,
    };
    // Modifiers that may precede a keyword on a top-level line.
    const PREFIXES: &[&str] = &[
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "export default ",
        "export ",
        "async ",
        "unsafe ",
        "const ",
        "extern \"C\" ",
        "public ",
        "private ",
        "protected ",
        "internal ",
        "abstract ",
        "final ",
        "static ",
        "data ",
        "sealed ",
        "open ",
    ];
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            continue;
        }
        let mut rest = line;
        while let Some(p) = PREFIXES.iter().find(|p| rest.starts_with(**p)) {
            rest = &rest[p.len()..];
        }
        for kw in keywords {
            let Some(after) = rest.strip_prefix(kw).and_then(|r| r.strip_prefix(' ')) else {
                continue;
            };
            let after = after.trim_start();
            let end = after
                .char_indices()
                .take_while(|&(_, c)| c.is_alphanumeric() || c == '_' || c == '$')
                .take(MAX_SYMBOL_CHARS)
                .last()
                .map_or(0, |(i, c)| i + c.len_utf8());
            if end > 0 && found(kw.trim_end_matches('!'), &after[..end]) == Flow::Stop {
                return;
            }
            break;
        }
    }
}

/// Whether [`each_symbol`] goes on.
#[derive(PartialEq, Eq)]
enum Flow {
    More,
    Stop,
}

/// Top-level definitions, found cheaply: unindented lines that start with a definition keyword
/// of the file's language, as the outline shows them (`fn run, struct Config`). Good enough for
/// an outline; never used for correctness.
pub(crate) fn symbols(rel: &str, text: &str) -> Box<str> {
    let mut out = String::new();
    let mut n = 0;
    each_symbol(rel, text, |kw, name| {
        let sep = if n == 0 { "" } else { ", " };
        if out.len() + sep.len() + kw.len() + 1 + name.len() <= MAX_SYMBOLS_BYTES {
            out.push_str(sep);
            out.push_str(kw);
            out.push(' ');
            out.push_str(name);
            n += 1;
        }
        if n == MAX_SYMBOLS {
            Flow::Stop
        } else {
            Flow::More
        }
    });
    out.into()
}

/// The hashes of the first names [`symbols`] would list, without building it.
pub(crate) fn symbol_hashes(rel: &str, text: &str) -> Names {
    let mut out = Vec::with_capacity(NAMES);
    each_symbol(rel, text, |_, name| {
        out.push(super::index::name_hash(name));
        if out.len() == NAMES {
            Flow::Stop
        } else {
            Flow::More
        }
    });
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &str) -> Vec<&str> {
        s.split(", ").filter(|n| !n.is_empty()).collect()
    }

    #[test]
    fn symbols_are_top_level_definitions_by_language() {
        let rust = "use x;\npub fn run() {}\nfn helper(a: u8) {}\n    fn nested() {}\npub(crate) struct Config {\n}\nimpl Config {}\npub async fn serve() {}\nmacro_rules! m {}\n";
        assert_eq!(
            names(&symbols("src/lib.rs", rust)),
            [
                "fn run",
                "fn helper",
                "struct Config",
                "fn serve",
                "macro_rules m"
            ]
        );
        let py = "import os\ndef main():\n    def inner(): pass\nclass Foo(Base):\n";
        assert_eq!(names(&symbols("a.py", py)), ["def main", "class Foo"]);
        let js = "export default function App() {}\nexport class Store {}\nconst x = 1;\n";
        assert_eq!(
            names(&symbols("a.tsx", js)),
            ["function App", "class Store"]
        );
        assert!(symbols("README.md", "fn not code\n").is_empty());
        let many: String = (0..40).map(|i| format!("fn f{i}() {{}}\n")).collect();
        assert_eq!(names(&symbols("m.rs", &many)).len(), MAX_SYMBOLS);
        let long: String = (0..40)
            .map(|i| format!("fn a_rather_long_function_name_{i}() {{}}\n"))
            .collect();
        assert!(symbols("m.rs", &long).len() <= MAX_SYMBOLS_BYTES);
    }

    #[test]
    fn files_are_classified_without_following_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        fs::write(p.join("a.rs"), "fn a() {}\n").expect("write");
        fs::write(p.join("bin"), b"\x00\x01binary").expect("write");
        fs::write(p.join("latin1.txt"), b"caf\xe9\n").expect("write");
        fs::write(p.join("big.txt"), vec![b'x'; MAX_FILE_BYTES + 1]).expect("write");
        fs::write(p.join("limit.txt"), vec![b'x'; MAX_FILE_BYTES]).expect("write");
        std::os::unix::fs::symlink(p.join("a.rs"), p.join("link.rs")).expect("symlink");
        let mut buf = Vec::new();
        match read_file(&p.join("a.rs"), "a.rs", &mut buf, true) {
            Read::File(meta) => {
                assert_eq!(buf, b"fn a() {}\n");
                assert_eq!(meta.kind, Kind::Text(BlobId::of(b"fn a() {}\n")));
                assert_eq!(names(&meta.symbols), ["fn a"]);
                assert_eq!(meta.stat.size, 10);
            }
            other => panic!("{other:?}"),
        }
        for (name, kind) in [
            ("bin", Kind::Binary),
            ("latin1.txt", Kind::Binary),
            ("big.txt", Kind::TooLarge),
        ] {
            match read_file(&p.join(name), name, &mut buf, true) {
                Read::File(meta) => assert_eq!(meta.kind, kind, "{name}"),
                other => panic!("{name}: {other:?}"),
            }
            assert!(buf.is_empty(), "no bytes kept for {name}");
        }
        assert!(matches!(
            read_file(&p.join("limit.txt"), "limit.txt", &mut buf, true),
            Read::File(FileMeta {
                kind: Kind::Text(_),
                ..
            })
        ));
        assert!(matches!(
            read_file(&p.join("link.rs"), "link.rs", &mut buf, true),
            Read::Skip
        ));
        assert!(matches!(
            read_file(&p.join("gone"), "gone", &mut buf, true),
            Read::Skip
        ));
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        assert!(
            matches!(
                read_file(&p.join("fifo"), "fifo", &mut buf, true),
                Read::Skip
            ),
            "no hang on a FIFO"
        );
    }

    #[test]
    fn listing_follows_git_precedence_and_skips_what_is_never_indexed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = dir.path();
        git2::Repository::init(w).expect("init");
        let git = GitPaths::of(w);
        fs::create_dir_all(w.join(".git/info")).expect("mkdir");
        fs::write(&git.exclude, "excluded.txt\n").expect("write");
        fs::write(w.join(".gitignore"), "*.log\nbuild/\n!keep.log\n").expect("write");
        for f in [
            "a.rs",
            "x.log",
            "keep.log",
            "excluded.txt",
            ".env",
            "id_rsa",
            "ok:colon",
            "sub/inner.rs",
            "sub/y.log",
            "build/out.rs",
            "nested/.git/HEAD",
            "nested/code.rs",
            ".ssh/config",
            ".a.rs.spark-0123abcd.tmp",
        ] {
            let p = w.join(f);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(&p, "x\n").expect("write");
        }
        std::os::unix::fs::symlink("a.rs", w.join("link.rs")).expect("symlink");
        fs::write(w.join("sub/.gitignore"), "!y.log\ninner.rs\n").expect("write");
        let rules = Rules::load(w, &git);
        let root = list_dir(w, "", &[], &rules);
        assert!(root.exists);
        let mut files: Vec<_> = root.files.iter().map(|(n, _)| n.as_str()).collect();
        files.sort();
        assert_eq!(files, [".gitignore", "a.rs", "keep.log"]);
        let dirs: Vec<_> = root.dirs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(dirs, ["sub"]);
        let chain: Vec<_> = root.rules.iter().cloned().collect();
        let sub = list_dir(w, "sub", &chain, &rules);
        let mut files: Vec<_> = sub.files.iter().map(|(n, _)| n.as_str()).collect();
        files.sort();
        // The nearer `.gitignore` wins both ways.
        assert_eq!(files, [".gitignore", "y.log"]);
        assert!(!list_dir(w, "gone", &[], &rules).exists);
        assert!(!list_dir(w, "a.rs", &[], &rules).exists);
    }

    #[test]
    fn a_linked_worktree_finds_its_git_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = dir.path().join("wt");
        let gd = dir.path().join("main/.git/worktrees/wt");
        fs::create_dir_all(&gd).expect("mkdir");
        fs::create_dir_all(&w).expect("mkdir");
        fs::write(w.join(".git"), format!("gitdir: {}\n", gd.display())).expect("write");
        fs::write(gd.join("commondir"), "../..\n").expect("write");
        let g = GitPaths::of(&w);
        assert_eq!(g.lock, gd.join("index.lock"));
        assert_eq!(g.exclude, gd.join("../..").join("info/exclude"));
    }
}
