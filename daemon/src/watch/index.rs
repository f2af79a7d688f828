//! One repository's in-memory view: every indexed file's metadata, the outline text ready to
//! send, and a short history of what changed (so a later turn can say "new, changed, deleted
//! since you last looked" without comparing whole trees). Readers (context assembly on the repo
//! actor) take a read lock for a map lookup or an `Arc` clone; only the repository's watcher
//! task writes, once per debounced batch.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;

use crate::watch::cache::{FileMeta, Kind};

/// The outline is sent at the start of every conversation: about 12k tokens at most, leaving
/// the rest of a 128k context for files and the conversation.
pub(crate) const OUTLINE_MAX_BYTES: usize = 48 * 1024;
/// Batches of changes remembered for `changed_since`; older questions get "incomplete".
const LOG_MAX_BATCHES: usize = 1024;
/// Paths remembered across those batches (a `git checkout` can change thousands at once).
const LOG_MAX_PATHS: usize = 50_000;

/// One indexed file.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) meta: FileMeta,
    /// The change number at which the file (re)appeared; 0 = present at the first index.
    pub(crate) since: u64,
}

/// What changed since a given change number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// The current change number: ask again with it next time.
    pub(crate) seq: u64,
    /// False when the history no longer reaches back that far: resend the outline.
    pub(crate) complete: bool,
    pub(crate) created: Vec<String>,
    pub(crate) modified: Vec<String>,
    pub(crate) deleted: Vec<String>,
}

/// Files between two entries of [`View::checkpoints`].
const ORDINAL_STRIDE: usize = 256;

#[derive(Debug, Default)]
pub(crate) struct View {
    pub(crate) files: BTreeMap<String, Entry>,
    pub(crate) outline: Arc<str>,
    /// (hash of a top-level symbol's name, ordinal of its file in `files`), sorted: which files
    /// define a name the prompt mentions, in a few bytes per symbol. Rebuilt with the outline.
    symbol_index: Vec<(u32, u32)>,
    /// The path of every [`ORDINAL_STRIDE`]-th file in `files`, rebuilt with the outline: a
    /// file's ordinal finds its path with one range lookup and a short walk.
    checkpoints: Vec<String>,
    /// Incremented once per batch that changed something the user did.
    pub(crate) seq: u64,
    log: VecDeque<(u64, Vec<String>)>,
    log_paths: usize,
    /// Changes at or before this number have been forgotten.
    floor: u64,
    /// Deleted paths still in the log: the number at which each had appeared, and at which it
    /// was deleted.
    tombstones: HashMap<String, (u64, u64)>,
}

impl View {
    /// Rebuild `files` with full nodes. Inserting paths in order (as every batch does) splits
    /// each B-tree leaf as it fills and leaves it a little over half full, which at 300,000
    /// files is tens of megabytes of empty slots; a bulk build from the sorted entries packs
    /// them. Called after large batches, whose own transient memory dwarfs the copy.
    pub(crate) fn compact(&mut self) {
        self.files = std::mem::take(&mut self.files).into_iter().collect();
    }

    pub(crate) fn text_bytes(&self) -> (u64, u64) {
        let mut n = 0;
        let mut bytes = 0;
        for e in self.files.values() {
            if let Kind::Text(_) = e.meta.kind {
                n += 1;
                bytes += e.meta.stat.size;
            }
        }
        (n, bytes)
    }

    /// Record one batch of user-visible changes under a new change number.
    pub(crate) fn log_batch(&mut self, paths: Vec<String>, deleted: &[(String, u64)]) -> u64 {
        self.seq += 1;
        for (p, since) in deleted {
            self.tombstones.insert(p.clone(), (*since, self.seq));
        }
        self.log_paths += paths.len();
        self.log.push_back((self.seq, paths));
        let floor = self.floor;
        while self.log.len() > LOG_MAX_BATCHES || self.log_paths > LOG_MAX_PATHS {
            let Some((seq, old)) = self.log.pop_front() else {
                break;
            };
            self.log_paths -= old.len();
            self.floor = seq;
        }
        if self.floor != floor {
            let floor = self.floor;
            self.tombstones.retain(|_, (_, deleted)| *deleted > floor);
        }
        self.seq
    }

    pub(crate) fn changed_since(&self, seq: u64) -> Changes {
        let mut out = Changes {
            seq: self.seq,
            complete: seq >= self.floor,
            ..Changes::default()
        };
        let touched: BTreeSet<&String> = self
            .log
            .iter()
            .filter(|(s, _)| *s > seq)
            .flat_map(|(_, ps)| ps)
            .collect();
        for p in touched {
            match self.files.get(p) {
                Some(e) if e.since > seq => out.created.push(p.clone()),
                Some(_) => out.modified.push(p.clone()),
                // A file that came and went since then was never seen: nothing to say.
                None if self.tombstones.get(p).is_some_and(|(s, _)| *s > seq) => {}
                None => out.deleted.push(p.clone()),
            }
        }
        out
    }

    /// Paths changed most recently first, at most `limit`.
    pub(crate) fn recent(&self, limit: usize) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (_, ps) in self.log.iter().rev() {
            for p in ps {
                if out.len() == limit {
                    return out;
                }
                if self.files.contains_key(p) && seen.insert(p) {
                    out.push(p.clone());
                }
            }
        }
        out
    }

    pub(crate) fn rebuild_outline(&mut self) {
        self.outline = outline(&self.files).into();
        let mut index = Vec::new();
        for (ordinal, e) in (0u32..).zip(self.files.values()) {
            for name in symbol_names(&e.meta.symbols) {
                index.push((name_hash(name), ordinal));
            }
            index.extend(e.meta.names.iter().map(|h| (h, ordinal)));
        }
        index.sort_unstable();
        index.dedup();
        index.shrink_to_fit();
        self.symbol_index = index;
        self.checkpoints = self.files.keys().step_by(ORDINAL_STRIDE).cloned().collect();
    }

    /// The file at `ordinal` in `files` order, as the symbol index numbers them.
    fn by_ordinal(&self, ordinal: u32) -> Option<(&String, &Entry)> {
        let ordinal = ordinal as usize;
        let from = self.checkpoints.get(ordinal / ORDINAL_STRIDE)?;
        self.files
            .range::<String, _>(from..)
            .nth(ordinal % ORDINAL_STRIDE)
    }

    /// Text files the prompt points at, best first, at most `limit`: files it names (by path,
    /// or by a file name with its extension), then files defining names it mentions. A name
    /// written like code (`mean()`, `` `parse` ``, `snake_case`, `camelCase`, `a::b`) counts on
    /// its own; two plain words must meet in one file. Names defined in many files say nothing
    /// and are skipped. No disk access: the symbol index and the file list are in memory.
    pub(crate) fn related(&self, prompt: &str, limit: usize) -> Vec<String> {
        /// A name defined in more files than this is too common to point anywhere.
        const MAX_DEFINITIONS: usize = 8;
        const NAMED: u32 = 100;
        const CODE_WORD: u32 = 3;
        const PLAIN_WORD: u32 = 1;
        const ENOUGH: u32 = 2 * PLAIN_WORD;
        let words = prompt_words(prompt);
        let mut score: HashMap<u32, u32> = HashMap::new();
        for w in &words {
            let h = name_hash(w.text);
            let from = self.symbol_index.partition_point(|&(x, _)| x < h);
            let hits: Vec<u32> = self.symbol_index[from..]
                .iter()
                .take_while(|&&(x, _)| x == h)
                .map(|&(_, o)| o)
                .collect();
            if hits.len() > MAX_DEFINITIONS {
                continue;
            }
            for o in hits {
                *score.entry(o).or_default() += if w.code { CODE_WORD } else { PLAIN_WORD };
            }
        }
        let named: Vec<&str> = words.iter().filter(|w| w.path).map(|w| w.text).collect();
        if named.is_empty() && !score.values().any(|&s| s >= ENOUGH) {
            return Vec::new();
        }
        // Files are ordinals in `files` order. Without a path-like word only the scored files
        // can qualify: look each up by its ordinal instead of visiting every file (a
        // repository of 300,000 files took 36 ms that way).
        let mut scored: Vec<(u32, u32)> = score.into_iter().collect();
        scored.sort_unstable();
        let mut picked: Vec<(u32, u32, &String)> = Vec::new();
        if named.is_empty() {
            for (ordinal, s) in scored {
                if s < ENOUGH {
                    continue;
                }
                if let Some((path, e)) = self.by_ordinal(ordinal)
                    && matches!(e.meta.kind, Kind::Text(_))
                {
                    picked.push((s, ordinal, path));
                }
            }
        } else {
            let mut scored = scored.into_iter().peekable();
            for (ordinal, (path, e)) in (0u32..).zip(&self.files) {
                let mut s = 0;
                if scored.peek().is_some_and(|&(o, _)| o == ordinal) {
                    s = scored.next().map_or(0, |(_, s)| s);
                }
                if !matches!(e.meta.kind, Kind::Text(_)) {
                    continue;
                }
                if named.iter().any(|n| names_file(path, n)) {
                    s += NAMED;
                }
                if s >= ENOUGH {
                    picked.push((s, ordinal, path));
                }
            }
        }
        // Best first; among equals, the order of `files` (by path).
        picked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        picked.truncate(limit);
        picked
            .into_iter()
            .map(|(_, _, path)| path.clone())
            .collect()
    }
}

/// A word of the prompt that may point at a file.
#[derive(Debug, PartialEq, Eq)]
struct Word<'p> {
    text: &'p str,
    /// Written like code: a call, in backticks, with `_`, `::` or inner capitals.
    code: bool,
    /// Looks like a path or a file name (`src/lib.rs`, `stats.py`).
    path: bool,
}

fn prompt_words(prompt: &str) -> Vec<Word<'_>> {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut out: Vec<Word<'_>> = Vec::new();
    fn push<'p>(w: Word<'p>, out: &mut Vec<Word<'p>>) {
        match out.iter_mut().find(|o| o.text == w.text) {
            Some(o) => {
                o.code |= w.code;
                o.path |= w.path;
            }
            None => out.push(w),
        }
    }
    // Path-like tokens: runs of identifier characters, `.`, `/` and `-` with a dot or slash.
    for token in prompt.split(|c: char| !(is_ident(c) || matches!(c, '.' | '/' | '-'))) {
        let token = token.trim_matches(|c| matches!(c, '.' | '-' | '/'));
        let has_ext = token
            .rsplit_once('.')
            .is_some_and(|(stem, ext)| !stem.is_empty() && ext.chars().any(char::is_alphabetic));
        if has_ext || token.contains('/') {
            push(
                Word {
                    text: token,
                    code: false,
                    path: true,
                },
                &mut out,
            );
        }
    }
    // Identifiers, with what surrounds them.
    let bytes = prompt.as_bytes();
    let mut start = None;
    for (i, c) in prompt.char_indices().chain([(prompt.len(), ' ')]) {
        match (start, is_ident(c)) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                start = None;
                let text = &prompt[s..i];
                if text.chars().count() < 3 || text.chars().all(|c| c.is_ascii_digit()) {
                    continue;
                }
                let before = s.checked_sub(1).map(|b| bytes[b]);
                let after = bytes.get(i).copied();
                let inner_capital = text.chars().skip(1).any(char::is_uppercase)
                    && text.chars().any(char::is_lowercase);
                let code = text.contains('_')
                    || inner_capital
                    || after == Some(b'(')
                    || (before == Some(b'`') && after == Some(b'`'))
                    || after == Some(b':') && bytes.get(i + 1) == Some(&b':')
                    || before == Some(b':') && s >= 2 && bytes[s - 2] == b':';
                push(
                    Word {
                        text,
                        code,
                        path: false,
                    },
                    &mut out,
                );
            }
            _ => {}
        }
    }
    out
}

/// Whether `name` (from the prompt) names the file at `path`: the whole path, a tail of it at
/// a `/`, or its file name.
fn names_file(path: &str, name: &str) -> bool {
    path == name
        || path
            .strip_suffix(name)
            .is_some_and(|head| head.ends_with('/'))
}

/// The names in an outline symbol string (`fn run, struct Config` → `run`, `Config`).
pub(crate) fn symbol_names(symbols: &str) -> impl Iterator<Item = &str> {
    symbols
        .split(", ")
        .filter_map(|entry| entry.rsplit(' ').next())
        .filter(|name| !name.is_empty())
}

/// FNV-1a (32-bit): a small, fast hash for the symbol index; a collision only costs a wrong
/// guess of context, never correctness. Never 0 (the empty slot of `Names`).
pub(crate) fn name_hash(name: &str) -> u32 {
    name.bytes()
        .fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        })
        .max(1)
}

/// The outline: files grouped by directory, with top-level symbols while they fit the budget.
///
/// ```text
/// Repository outline (3 files):
/// Cargo.toml
/// src/
///   lib.rs: fn run, struct Config
///   main.rs: fn main
/// ```
pub(crate) fn outline(files: &BTreeMap<String, Entry>) -> String {
    let mut by_dir: BTreeMap<&str, Vec<(&str, &Entry)>> = BTreeMap::new();
    for (path, e) in files {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        by_dir.entry(dir).or_default().push((name, e));
    }
    let render = |symbols: bool, limit: usize| {
        let mut text = format!("Repository outline ({} files):\n", files.len());
        let mut listed = 0usize;
        'dirs: for (dir, entries) in &by_dir {
            let indent = if dir.is_empty() { "" } else { "  " };
            if !dir.is_empty() {
                let _ = writeln!(text, "{dir}/");
            }
            for (name, e) in entries {
                let before = text.len();
                let _ = write!(text, "{indent}{name}");
                if symbols && !e.meta.symbols.is_empty() {
                    text.push_str(": ");
                    text.push_str(&e.meta.symbols);
                }
                text.push('\n');
                if text.len() > limit {
                    text.truncate(before);
                    break 'dirs;
                }
                listed += 1;
            }
        }
        (text, listed)
    };
    let (text, listed) = render(true, OUTLINE_MAX_BYTES);
    if listed == files.len() {
        return text;
    }
    // Names of every file matter more than symbols of some: drop symbols, then cut.
    let note_room = 64;
    let (mut text, listed) = render(false, OUTLINE_MAX_BYTES - note_room);
    if listed < files.len() {
        let _ = writeln!(text, "… and {} more files", files.len() - listed);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::cache::{BlobId, Stat};

    fn entry(symbols: &[&str], since: u64) -> Entry {
        Entry {
            meta: FileMeta {
                stat: Stat::default(),
                kind: Kind::Text(BlobId::of(b"x")),
                symbols: symbols.join(", ").into(),
                names: Default::default(),
            },
            since,
        }
    }

    fn view(files: &[(&str, &[&str])]) -> View {
        let mut v = View::default();
        for (path, symbols) in files {
            v.files.insert((*path).to_owned(), entry(symbols, 0));
        }
        v.rebuild_outline();
        v
    }

    #[test]
    fn the_prompt_points_at_files_by_name_and_by_the_names_they_define() {
        let v = view(&[
            ("stats.py", &["def mean", "def median"]),
            ("lists.py", &["def empty", "def list"]),
            ("src/lib.rs", &["fn parse_config", "struct Config"]),
            ("src/main.rs", &["fn main"]),
            ("docs/readme.md", &[]),
        ]);
        // A call names `mean`; plain words (`empty`, `list`) only count together.
        assert_eq!(
            v.related("make mean() return 0.0 for an empty list", 3),
            ["stats.py", "lists.py"]
        );
        assert_eq!(v.related("return the mean", 3), Vec::<String>::new());
        assert_eq!(v.related("return the `mean`", 3), ["stats.py"]);
        // snake_case and CamelCase are code on their own; a path or file name wins over both.
        assert_eq!(v.related("rename parse_config", 3), ["src/lib.rs"]);
        assert_eq!(
            v.related("Config should derive Debug", 3),
            Vec::<String>::new()
        );
        assert_eq!(
            v.related("a Config::new in main.rs", 3),
            ["src/main.rs", "src/lib.rs"]
        );
        assert_eq!(
            v.related("fix the typo in docs/readme.md.", 3),
            ["docs/readme.md"]
        );
        assert_eq!(
            v.related("fix the typo in readme.md", 3),
            ["docs/readme.md"]
        );
        assert_eq!(v.related("nothing relevant here", 3), Vec::<String>::new());
        assert_eq!(v.related("mean() and parse_config()", 1), ["src/lib.rs"]);
    }

    #[test]
    fn in_a_large_repository_the_hashed_names_point_the_same_way() {
        let mut v = View::default();
        let mut e = entry(&[], 0);
        e.meta.names = symbol_names("def mean, def median")
            .map(name_hash)
            .collect();
        v.files.insert("stats.py".into(), e);
        v.files.insert("other.py".into(), entry(&[], 0));
        v.rebuild_outline();
        assert!(!v.outline.contains("mean"), "the outline shows no symbols");
        assert_eq!(v.related("make mean() return 0.0", 3), ["stats.py"]);
        assert_eq!(v.related("make mode() faster", 3), Vec::<String>::new());
    }

    #[test]
    fn names_defined_everywhere_point_nowhere() {
        let files: Vec<(String, Vec<&str>)> = (0..20)
            .map(|i| (format!("m{i}.py"), vec!["def run"]))
            .collect();
        let refs: Vec<(&str, &[&str])> = files
            .iter()
            .map(|(p, s)| (p.as_str(), s.as_slice()))
            .collect();
        let v = view(&refs);
        assert_eq!(v.related("make run() faster", 3), Vec::<String>::new());
        assert_eq!(v.related("make run() in m7.py faster", 3), ["m7.py"]);
    }

    #[test]
    fn the_outline_groups_files_by_directory() {
        let mut files = BTreeMap::new();
        files.insert("Cargo.toml".to_owned(), entry(&[], 0));
        files.insert("src/main.rs".to_owned(), entry(&["fn main"], 0));
        files.insert(
            "src/lib.rs".to_owned(),
            entry(&["fn run", "struct Config"], 0),
        );
        files.insert("src/a/b.rs".to_owned(), entry(&[], 0));
        files.insert("src.rs".to_owned(), entry(&[], 0));
        assert_eq!(
            outline(&files),
            "Repository outline (5 files):\nCargo.toml\nsrc.rs\nsrc/\n  lib.rs: fn run, struct Config\n  main.rs: fn main\nsrc/a/\n  b.rs\n"
        );
    }

    #[test]
    fn a_huge_outline_drops_symbols_then_names() {
        let mut files = BTreeMap::new();
        for i in 0..1500 {
            files.insert(
                format!("d{}/file{i}.rs", i % 10),
                entry(&["fn a_long_function_name", "struct AnotherLongName"], 0),
            );
        }
        let text = outline(&files);
        assert!(text.len() <= OUTLINE_MAX_BYTES, "{}", text.len());
        assert!(!text.contains("fn a_long"), "symbols dropped first");
        assert!(
            text.contains("file1499.rs"),
            "all names fit without symbols"
        );
        for i in 1500..10_000 {
            files.insert(format!("d{}/file{i}.rs", i % 10), entry(&[], 0));
        }
        let text = outline(&files);
        assert!(text.len() <= OUTLINE_MAX_BYTES, "{}", text.len());
        assert!(
            text.trim_end().ends_with("more files"),
            "{}",
            &text[text.len() - 80..]
        );
    }

    #[test]
    fn changed_since_classifies_created_modified_deleted() {
        let mut v = View::default();
        v.files.insert("kept.rs".into(), entry(&[], 0));
        v.files.insert("gone.rs".into(), entry(&[], 0));
        v.files.insert("flash.rs".into(), entry(&[], 0));
        let s0 = v.seq;
        // Batch 1: kept.rs modified, new.rs created.
        v.files.insert("new.rs".into(), entry(&[], 1));
        let s1 = v.log_batch(vec!["kept.rs".into(), "new.rs".into()], &[]);
        // Batch 2: gone.rs deleted; temp.rs created and deleted in batch 3.
        v.files.remove("gone.rs");
        v.log_batch(vec!["gone.rs".into()], &[("gone.rs".into(), 0)]);
        v.log_batch(vec!["temp.rs".into()], &[("temp.rs".into(), 3)]);
        let c = v.changed_since(s0);
        assert!(c.complete);
        assert_eq!(c.seq, 3);
        assert_eq!(c.created, ["new.rs"]);
        assert_eq!(c.modified, ["kept.rs"]);
        assert_eq!(c.deleted, ["gone.rs"]);
        let c = v.changed_since(s1);
        assert_eq!((c.created.len(), c.modified.len()), (0, 0));
        assert_eq!(c.deleted, ["gone.rs"]);
        assert_eq!(
            v.changed_since(3),
            Changes {
                seq: 3,
                complete: true,
                ..Changes::default()
            }
        );
        assert_eq!(v.recent(5), ["kept.rs", "new.rs"]);
    }

    #[test]
    fn old_history_is_forgotten_and_says_so() {
        let mut v = View::default();
        for i in 0..(LOG_MAX_BATCHES + 10) {
            v.log_batch(vec![format!("f{i}")], &[]);
        }
        assert!(!v.changed_since(0).complete);
        assert!(v.changed_since(v.seq - 5).complete);
    }
}
