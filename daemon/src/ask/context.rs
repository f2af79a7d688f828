//! What the model sees, and the guard on every byte that leaves the machine.
//!
//! The first turn of a conversation carries a compact outline of the repository and the focus
//! files; later turns carry only what changed since the model last saw it (a small diff for a
//! focused file the user edited). Without focus files, spark picks them from memory: the files
//! the prompt names or whose top-level names it mentions, and the ones the user changed last.
//! Every file read for the model goes through the same checks as an edit target — never `.git`,
//! a git-ignored file, a deny-listed secret, a binary or an oversized file — even when the user
//! names it. Runs on the repository actor.

use std::collections::HashMap;
use std::path::Path;

use spark_proto::methods::{Buffer, Focus};
use spark_proto::{ErrorCode, RpcError};

use crate::edit::paths::{self, Intent};
use crate::edit::{RepoCtx, journal};
use crate::watch::{MAX_FILE_BYTES, Watchers};

/// The outline lists at most this many paths (the model can ask for more through tools).
const OUTLINE_MAX_PATHS: usize = 2000;
/// Recently changed files named when the user focuses none.
const RECENT_FILES: usize = 5;
/// Of those, how many are sent whole (if they fit).
const RECENT_WHOLE: usize = 2;
/// Files the prompt points at that are sent whole when the user focuses none.
const AUTO_FILES: usize = 3;
/// Files chosen by spark (not named by the user) are sent whole only up to this size each…
const AUTO_MAX_FILE_BYTES: usize = 32 * 1024;
/// …and until this much has been added for them in one request.
const AUTO_MAX_BYTES: usize = 48 * 1024;
/// The hint of a refused binary file.
const TEXT_ONLY: &str = "spark shows the model UTF-8 text without NUL bytes only";
/// Lines of context shown around a focused line range.
const RANGE_MARGIN: u32 = 3;

/// What one request sends, and what the model will have seen once it is sent.
#[derive(Debug, Default)]
pub(crate) struct Assembled {
    /// The user message text (prompt plus context).
    pub(crate) text: String,
    /// Files whose content the model now knows (repo-relative path → bytes).
    pub(crate) seen: HashMap<String, Vec<u8>>,
    /// Paths and byte counts sent, for the audit log line.
    pub(crate) audit: Vec<(String, usize)>,
}

/// Unsaved editor buffers of one ask, by repository-relative path: their text stands in for
/// the files' bytes, both in what the model sees and as what its patch applies to.
#[derive(Debug, Default, Clone)]
pub(crate) struct Buffers {
    /// Repository-relative path → the buffer's text.
    pub(crate) text: HashMap<String, Vec<u8>>,
    /// How the client named each (for error messages), in the order sent.
    shown: Vec<(String, String)>,
}

impl Buffers {
    /// Map each buffer's path (absolute, or relative to the ask's cwd) into the repository.
    /// The guards on the bytes run when they are added to the context ([`assemble`]).
    pub(crate) fn resolve(
        ctx: &RepoCtx<'_>,
        cwd_prefix: &str,
        buffers: &[Buffer],
    ) -> Result<Buffers, RpcError> {
        let mut out = Buffers::default();
        for b in buffers {
            let joined = repo_relative(ctx.workdir, cwd_prefix, &b.path)?;
            let rel = paths::validate_rel_path(&joined).map_err(|e| {
                RpcError::new(
                    ErrorCode::EditRejected,
                    format!("cannot show the buffer {} to the model: {e}", b.path),
                )
                .with_kind(format!("path_{}", e.code()))
                .with_path(b.path.clone())
                .with_hint(e.hint())
            })?;
            let key = rel.as_str().to_owned();
            if out
                .text
                .insert(key.clone(), b.text.clone().into_bytes())
                .is_some()
            {
                return Err(RpcError::new(
                    ErrorCode::InvalidParams,
                    format!("the buffer {} is sent twice", b.path),
                )
                .with_kind("duplicate_buffer")
                .with_path(b.path.clone())
                .with_hint("send each file's buffer once"));
            }
            out.shown.push((key, b.path.clone()));
        }
        Ok(out)
    }
}

/// A buffer path as the repository names it: absolute paths must lie in the worktree (also
/// through a symlink to it); relative ones start at the ask's cwd.
fn repo_relative(workdir: &Path, cwd_prefix: &str, raw: &str) -> Result<String, RpcError> {
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Ok(if cwd_prefix.is_empty() {
            raw.to_owned()
        } else {
            format!("{cwd_prefix}/{raw}")
        });
    }
    let inside = |p: &Path| {
        p.strip_prefix(workdir)
            .ok()
            .and_then(|r| r.to_str())
            .map(str::to_owned)
    };
    inside(path)
        .or_else(|| std::fs::canonicalize(path).ok().and_then(|c| inside(&c)))
        .ok_or_else(|| {
            RpcError::new(
                ErrorCode::EditRejected,
                format!(
                    "cannot show the buffer {raw} to the model: it is outside the repository {}",
                    workdir.display()
                ),
            )
            .with_kind("path_outside_repo")
            .with_path(raw.to_owned())
            .with_hint("send only buffers of files inside the repository the ask runs in")
        })
}

/// Build the user message for `prompt` with `focus` (paths relative to `cwd_prefix`), given
/// what the model has already `seen` in this conversation and whether to include the outline.
/// Unsaved editor `buffers` stand in for their files: every buffer is shown (after the focus
/// files), through the same checks as a focus file.
#[allow(clippy::too_many_arguments)]
pub(crate) fn assemble(
    ctx: &RepoCtx<'_>,
    watchers: &Watchers,
    cwd_prefix: &str,
    prompt: &str,
    focus: &[Focus],
    buffers: &Buffers,
    seen: &HashMap<String, Vec<u8>>,
    news: Option<String>,
) -> Result<Assembled, RpcError> {
    let mut out = Assembled::default();
    let view = View {
        ctx,
        watchers,
        seen,
        buffers: &buffers.text,
    };
    if let Some(news) = news {
        out.audit.push(("<outline changes>".into(), news.len()));
        out.text += &news;
    }
    for f in focus {
        let joined = if cwd_prefix.is_empty() {
            f.path.clone()
        } else {
            format!("{cwd_prefix}/{}", f.path)
        };
        let range = f.start_line.zip(f.end_line);
        add_file(&mut out, &view, &joined, &f.path, range, MAX_FILE_BYTES)?;
    }
    for (path, shown) in &buffers.shown {
        if !out.seen.contains_key(path) {
            add_file(&mut out, &view, path, shown, None, MAX_FILE_BYTES)?;
        }
    }
    if focus.is_empty() {
        // No file named: the files the prompt points at, then the ones the user changed most
        // recently, whole while they fit; the names of a few more recent ones.
        let related = watchers.related(ctx.workdir, prompt, AUTO_FILES);
        let recent = watchers.recently_changed(ctx.workdir, RECENT_FILES);
        let mut sent = 0usize;
        for path in related.iter().chain(recent.iter().take(RECENT_WHOLE)) {
            if out.seen.contains_key(path.as_str()) || sent >= AUTO_MAX_BYTES {
                continue;
            }
            let before = out.text.len();
            match add_file(&mut out, &view, path, path, None, AUTO_MAX_FILE_BYTES) {
                Ok(()) => sent += out.text.len() - before,
                // Chosen by spark, not the user: a file that cannot be shown is just left out.
                Err(e) => tracing::debug!(path, error = %e.message, "not adding a related file"),
            }
        }
        let named: Vec<&str> = recent
            .iter()
            .map(String::as_str)
            .filter(|p| !out.seen.contains_key(*p))
            .collect();
        if !named.is_empty() {
            out.text += &format!(
                "\nFiles the user changed most recently: {}\n",
                named.join(", ")
            );
        }
    }
    out.text += &format!("\nRequest: {prompt}\n");
    Ok(out)
}

/// Where [`add_file`] reads from: the repository, what the model saw, the editor's buffers.
struct View<'a, 'c> {
    ctx: &'a RepoCtx<'c>,
    watchers: &'a Watchers,
    seen: &'a HashMap<String, Vec<u8>>,
    buffers: &'a HashMap<String, Vec<u8>>,
}

/// Add the file at `joined` (repo-relative; `shown` is how the user wrote it) to `out`: whole
/// the first time, as a diff against what the model saw, or as "unchanged"; through the same
/// checks as an edit target. An unsaved buffer's text stands in for the file's bytes.
fn add_file(
    out: &mut Assembled,
    view: &View<'_, '_>,
    joined: &str,
    shown: &str,
    range: Option<(u32, u32)>,
    max_bytes: usize,
) -> Result<(), RpcError> {
    let (ctx, watchers, seen) = (view.ctx, view.watchers, view.seen);
    let refuse = |e: paths::PathError| {
        RpcError::new(
            ErrorCode::EditRejected,
            format!("cannot show {shown} to the model: {e}"),
        )
        .with_kind(format!("path_{}", e.code()))
        .with_path(shown.to_owned())
        .with_hint(e.hint())
    };
    let rel = paths::validate_rel_path(joined).map_err(refuse)?;
    let abs = paths::check_in(ctx, &rel, Intent::Modify).map_err(refuse)?;
    // Watched: the cache serves it from memory (it re-checks the file's metadata first).
    let cached = match view.buffers.get(rel.as_str()) {
        Some(text) => Some(text.clone()),
        None => watchers.file(ctx.workdir, rel.as_str()).map(|f| f.bytes),
    };
    let bytes = match cached {
        Some(b) => b,
        None => journal::read_state(&abs)
            .map_err(|e| RpcError::new(ErrorCode::Internal, format!("cannot read {}: {e}", rel)))?
            .map(|s| s.bytes)
            .unwrap_or_default(),
    };
    let reject = |why: &str, kind: &str| {
        RpcError::new(
            ErrorCode::EditRejected,
            format!("cannot show {shown} to the model: {why}"),
        )
        .with_kind(kind)
        .with_path(shown.to_owned())
    };
    if bytes.len() > max_bytes {
        return Err(reject(
            &format!(
                "it is {} bytes, over the {max_bytes}-byte limit",
                bytes.len()
            ),
            "too_large",
        )
        .with_hint("spark shows the model text files up to that size; ask about a smaller file"));
    }
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Err(reject("it is not text", "binary_target").with_hint(TEXT_ONLY));
    };
    if bytes.contains(&0) {
        return Err(reject("it is not text", "binary_target").with_hint(TEXT_ONLY));
    }
    let path = rel.as_str();
    let before = out.text.len();
    match seen.get(path) {
        Some(old) if *old == bytes => {
            out.text += &format!("\n`{path}` is unchanged since you last saw it.\n")
        }
        Some(old) => {
            out.text += &format!(
                "\n`{path}` changed since you last saw it:\n```diff\n{}```\n",
                diff(old, &bytes)
            )
        }
        None => {
            out.text += &format!(
                "\n`{path}`:\n```\n{text}{}```\n",
                if text.ends_with('\n') || text.is_empty() {
                    ""
                } else {
                    "\n"
                }
            )
        }
    }
    if let Some((start, end)) = range {
        out.text += &range_note(path, text, start, end);
    }
    out.audit.push((path.to_owned(), out.text.len() - before));
    out.seen.insert(path.to_owned(), bytes);
    Ok(())
}

/// "Focus on lines 40-60" with those lines (plus a small margin) quoted.
fn range_note(path: &str, text: &str, start: u32, end: u32) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = start.saturating_sub(RANGE_MARGIN).max(1) as usize;
    let to = (end.saturating_add(RANGE_MARGIN) as usize).min(lines.len());
    let mut note = format!("Focus on `{path}` lines {start}-{end}:\n```\n");
    for line in lines.iter().take(to).skip(from - 1) {
        note += line;
        note.push('\n');
    }
    note + "```\n"
}

/// The outline as sent when a conversation starts: from the watcher's memory when the
/// repository is watched, else from the index.
pub(crate) fn outline_text(ctx: &RepoCtx<'_>, watchers: &Watchers) -> String {
    match watchers.outline(ctx.workdir) {
        Some(o) => o.to_string(),
        None => outline(ctx),
    }
}

/// What changed in the repository's file list since the model's outline (change number
/// `seq`), and the new change number.
#[derive(Debug, Default)]
pub(crate) struct News {
    pub(crate) text: Option<String>,
    pub(crate) seq: Option<u64>,
}

/// Files created or deleted since `seq` (the whole outline again if the watcher's history no
/// longer reaches back that far). Modified files are not listed: focused ones travel as diffs.
pub(crate) fn outline_news(ctx: &RepoCtx<'_>, watchers: &Watchers, seq: Option<u64>) -> News {
    let Some(seq) = seq else {
        return News {
            text: None,
            seq: watchers.seq(ctx.workdir),
        };
    };
    let Some(changes) = watchers.changed_since(ctx.workdir, seq) else {
        return News::default();
    };
    let keep = |paths: &[String]| -> Vec<String> {
        paths
            .iter()
            .filter(|p| {
                paths::validate_rel_path(p)
                    .map(|r| !paths::is_secret(&r))
                    .unwrap_or(false)
            })
            .cloned()
            .collect()
    };
    let text = if !changes.complete {
        Some(outline_text(ctx, watchers))
    } else {
        let (created, deleted) = (keep(&changes.created), keep(&changes.deleted));
        let mut t = String::new();
        if !created.is_empty() {
            t += &format!("New files since the outline: {}\n", created.join(", "));
        }
        if !deleted.is_empty() {
            t += &format!("Deleted files since the outline: {}\n", deleted.join(", "));
        }
        (!t.is_empty()).then_some(t)
    };
    News {
        text,
        seq: Some(changes.seq),
    }
}

/// The tracked files (minus secrets), one per line, capped.
fn outline(ctx: &RepoCtx<'_>) -> String {
    let mut paths: Vec<String> = Vec::new();
    if let Ok(mut index) = ctx.repo.index() {
        let _ = index.read(false);
        for e in index.iter() {
            if let Ok(p) = std::str::from_utf8(&e.path)
                && paths::validate_rel_path(p)
                    .map(|r| !paths::is_secret(&r))
                    .unwrap_or(false)
            {
                paths.push(p.to_owned());
            }
        }
    }
    let total = paths.len();
    let mut text = String::from("Repository files:\n");
    for p in paths.iter().take(OUTLINE_MAX_PATHS) {
        text += p;
        text.push('\n');
    }
    if total > OUTLINE_MAX_PATHS {
        text += &format!("… and {} more\n", total - OUTLINE_MAX_PATHS);
    }
    text
}

pub(crate) fn diff(old: &[u8], new: &[u8]) -> String {
    git2::Patch::from_buffers(old, None, new, None, None)
        .and_then(|mut p| p.to_buf())
        .map(|b| {
            // Drop the `--- a` / `+++ b` header lines: the path is already named.
            let s = String::from_utf8_lossy(&b).into_owned();
            s.lines()
                .filter(|l| !l.starts_with("--- ") && !l.starts_with("+++ "))
                .map(|l| format!("{l}\n"))
                .collect()
        })
        .unwrap_or_default()
}

// ---- Read-only tools: the model asks for what the context did not carry ----

/// Matches one `search` answers with at most; enough to choose a file to read.
const SEARCH_MAX_MATCHES: usize = 100;
/// Entries one `list_dir` answers with at most.
const LIST_MAX_ENTRIES: usize = 500;
/// A matching line is quoted up to this many characters.
const SEARCH_LINE_CHARS: usize = 200;

/// The answer to one read-only tool call, and what it showed, for the audit log.
#[derive(Debug, Default)]
pub(crate) struct ReadAnswer {
    /// The tool output the model gets.
    pub(crate) output: String,
    /// A file shown whole: the model now knows its content (the base of a later patch).
    pub(crate) seen: Option<(String, Vec<u8>)>,
    /// Paths whose content (or matching lines) was sent, with byte counts.
    pub(crate) audit: Vec<(String, usize)>,
    /// A refusal: the path and why, never its content.
    pub(crate) refused: Option<(String, String)>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadFileArgs {
    path: String,
    start_line: Option<u32>,
    end_line: Option<u32>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchArgs {
    pattern: String,
    #[serde(default)]
    regex: bool,
    path: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListDirArgs {
    path: Option<String>,
}

/// Answers the read-only tool `name` called with JSON `arguments`, within `max_bytes` of
/// output. Every file goes through the guard of every byte that leaves: a secret, ignored,
/// binary or oversized file, or a path outside the worktree, gets a refusal instead.
pub(crate) fn answer_read(
    ctx: &RepoCtx<'_>,
    watchers: &Watchers,
    name: &str,
    arguments: &str,
    max_bytes: usize,
) -> ReadAnswer {
    use crate::provider::wire::{LIST_DIR_TOOL, READ_FILE_TOOL, SEARCH_TOOL};
    let parsed = match name {
        READ_FILE_TOOL => serde_json::from_str(arguments).map(|a| read_file(ctx, watchers, a)),
        SEARCH_TOOL => serde_json::from_str(arguments).map(|a| search(ctx, watchers, a)),
        LIST_DIR_TOOL => serde_json::from_str(arguments).map(|a| list_dir(ctx, a)),
        _ => {
            return ReadAnswer {
                output: format!("Unknown tool {name}."),
                ..ReadAnswer::default()
            };
        }
    };
    let mut answer = parsed.unwrap_or_else(|e| ReadAnswer {
        output: format!("Bad arguments for {name}: {e}."),
        ..ReadAnswer::default()
    });
    if answer.output.len() > max_bytes {
        let mut cut = max_bytes;
        while !answer.output.is_char_boundary(cut) {
            cut -= 1;
        }
        answer.output.truncate(cut);
        answer.output += "\n[cut: this request's budget for tool output is spent]\n";
        // Cut short: the model does not hold the whole file.
        answer.seen = None;
    }
    answer
}

fn refusal(path: &str, why: String) -> ReadAnswer {
    ReadAnswer {
        output: format!("Refused: {why}. Nothing of it was sent."),
        refused: Some((path.to_owned(), why)),
        ..ReadAnswer::default()
    }
}

/// A file's bytes through the edit target's checks, or why it cannot be shown.
fn guarded_bytes(
    ctx: &RepoCtx<'_>,
    watchers: &Watchers,
    raw: &str,
) -> Result<(String, Vec<u8>), String> {
    let rel = paths::validate_rel_path(raw).map_err(|e| e.to_string())?;
    let abs = paths::check_in(ctx, &rel, Intent::Modify).map_err(|e| e.to_string())?;
    let bytes = match watchers.file(ctx.workdir, rel.as_str()).map(|f| f.bytes) {
        Some(bytes) => bytes,
        None => journal::read_state(&abs)
            .map_err(|e| format!("cannot read {rel}: {e}"))?
            .map(|s| s.bytes)
            .unwrap_or_default(),
    };
    if bytes.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{rel} is {} bytes, over the {MAX_FILE_BYTES}-byte limit",
            bytes.len()
        ));
    }
    if bytes.contains(&0) || std::str::from_utf8(&bytes).is_err() {
        return Err(format!("{rel} is not text"));
    }
    Ok((rel.as_str().to_owned(), bytes))
}

fn read_file(ctx: &RepoCtx<'_>, watchers: &Watchers, args: ReadFileArgs) -> ReadAnswer {
    let (path, bytes) = match guarded_bytes(ctx, watchers, &args.path) {
        Ok(found) => found,
        Err(why) => return refusal(&args.path, why),
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    match (args.start_line, args.end_line) {
        (None, None) => {
            let newline = if text.ends_with('\n') || text.is_empty() {
                ""
            } else {
                "\n"
            };
            let output = format!("`{path}`:\n```\n{text}{newline}```\n");
            ReadAnswer {
                audit: vec![(path.clone(), output.len())],
                seen: Some((path, bytes)),
                output,
                refused: None,
            }
        }
        (start, end) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = start.unwrap_or(1).max(1) as usize;
            let end = (end.map_or(lines.len(), |e| e as usize)).min(lines.len());
            let mut output = format!("`{path}` lines {start}-{end} of {}:\n", lines.len());
            for (n, line) in lines.iter().enumerate().take(end).skip(start - 1) {
                output += &format!("{:>5} | {line}\n", n + 1);
            }
            ReadAnswer {
                audit: vec![(path, output.len())],
                output,
                ..ReadAnswer::default()
            }
        }
    }
}

/// A directory of the worktree to walk: no `..`, no `.git`, not ignored, not a secret, and
/// (after symlinks) still inside the worktree.
fn guarded_dir(ctx: &RepoCtx<'_>, raw: Option<&str>) -> Result<std::path::PathBuf, String> {
    let raw = raw.unwrap_or("").trim_matches('/');
    if raw.is_empty() || raw == "." {
        return Ok(ctx.workdir.to_path_buf());
    }
    let rel = paths::validate_rel_path(raw).map_err(|e| e.to_string())?;
    if paths::is_secret(&rel) {
        return Err(format!("{rel} is on spark's deny-list of secret files"));
    }
    let root = std::fs::canonicalize(ctx.workdir).map_err(|e| e.to_string())?;
    let dir = std::fs::canonicalize(ctx.workdir.join(rel.to_path()))
        .map_err(|_| format!("{rel} does not exist"))?;
    if !dir.starts_with(&root) || !dir.is_dir() {
        return Err(format!("{rel} is not a directory inside the repository"));
    }
    if ctx.repo.is_path_ignored(rel.to_path()).unwrap_or(true) {
        return Err(format!("git ignores {rel}"));
    }
    Ok(dir)
}

/// A gitignore-aware walk of `dir` that never enters `.git`.
fn walk(dir: &std::path::Path, depth: Option<usize>) -> ignore::Walk {
    ignore::WalkBuilder::new(dir)
        .hidden(false)
        .git_ignore(true)
        .git_exclude(true)
        .require_git(false)
        .max_depth(depth)
        .sort_by_file_name(std::cmp::Ord::cmp)
        .filter_entry(|entry| entry.file_name() != ".git")
        .build()
}

/// The worktree-relative path of `abs`, if it passes the secret deny-list.
fn shown_path(root: &std::path::Path, abs: &std::path::Path) -> Option<String> {
    let rel = abs.strip_prefix(root).ok()?.to_str()?;
    let checked = paths::validate_rel_path(rel).ok()?;
    (!paths::is_secret(&checked)).then(|| checked.as_str().to_owned())
}

fn search(ctx: &RepoCtx<'_>, watchers: &Watchers, args: SearchArgs) -> ReadAnswer {
    let shown = args.path.clone().unwrap_or_default();
    let dir = match guarded_dir(ctx, args.path.as_deref()) {
        Ok(dir) => dir,
        Err(why) => return refusal(&shown, why),
    };
    let pattern = if args.regex {
        args.pattern.clone()
    } else {
        regex::escape(&args.pattern)
    };
    let matcher = match regex::RegexBuilder::new(&pattern)
        .size_limit(1 << 20)
        .build()
    {
        Ok(m) => m,
        Err(e) => {
            return ReadAnswer {
                output: format!("Bad pattern: {e}"),
                ..ReadAnswer::default()
            };
        }
    };
    let Ok(root) = std::fs::canonicalize(ctx.workdir) else {
        return refusal(&shown, "the worktree cannot be read".to_owned());
    };
    let mut output = String::new();
    let mut audit: Vec<(String, usize)> = Vec::new();
    let mut matches = 0;
    'files: for entry in walk(&dir, None).flatten() {
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let Some(rel) = shown_path(&root, entry.path()) else {
            continue;
        };
        // Binary, oversized or otherwise unshowable files are skipped, never quoted.
        let Ok((rel, bytes)) = guarded_bytes(ctx, watchers, &rel) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        let before = output.len();
        for (n, line) in text.lines().enumerate() {
            if !matcher.is_match(line) {
                continue;
            }
            if matches == SEARCH_MAX_MATCHES {
                output += "… more matches; narrow the search\n";
                break 'files;
            }
            let quoted: String = line.chars().take(SEARCH_LINE_CHARS).collect();
            output += &format!("{rel}:{}: {quoted}\n", n + 1);
            matches += 1;
        }
        if output.len() > before {
            audit.push((rel, output.len() - before));
        }
    }
    if matches == 0 {
        output = format!("No matches for {:?}.\n", args.pattern);
    }
    ReadAnswer {
        output,
        audit,
        ..ReadAnswer::default()
    }
}

fn list_dir(ctx: &RepoCtx<'_>, args: ListDirArgs) -> ReadAnswer {
    let shown = args.path.clone().unwrap_or_default();
    let dir = match guarded_dir(ctx, args.path.as_deref()) {
        Ok(dir) => dir,
        Err(why) => return refusal(&shown, why),
    };
    let Ok(root) = std::fs::canonicalize(ctx.workdir) else {
        return refusal(&shown, "the worktree cannot be read".to_owned());
    };
    let mut output = String::new();
    let mut count = 0;
    for entry in walk(&dir, Some(1)).flatten().filter(|e| e.depth() == 1) {
        let Some(rel) = shown_path(&root, entry.path()) else {
            continue;
        };
        if count == LIST_MAX_ENTRIES {
            output += "… more entries\n";
            break;
        }
        let slash = if entry.file_type().is_some_and(|t| t.is_dir()) {
            "/"
        } else {
            ""
        };
        output += &format!("{rel}{slash}\n");
        count += 1;
    }
    if output.is_empty() {
        output = "The directory is empty.\n".to_owned();
    }
    ReadAnswer {
        audit: vec![(format!("{shown}/"), output.len())],
        output,
        ..ReadAnswer::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_note_quotes_the_lines_with_a_margin() {
        let text: String = (1..=20).map(|i| format!("line {i}\n")).collect();
        let note = range_note("a.rs", &text, 10, 11);
        assert!(
            note.starts_with("Focus on `a.rs` lines 10-11:\n```\nline 7\n"),
            "{note}"
        );
        assert!(note.ends_with("line 14\n```\n"), "{note}");
        assert!(range_note("a.rs", &text, 19, 40).ends_with("line 20\n```\n"));
    }

    #[test]
    fn diff_is_compact() {
        let old: String = (1..=200).map(|i| format!("line {i}\n")).collect();
        let new = old.replace("line 100\n", "line one hundred\n");
        let d = diff(old.as_bytes(), new.as_bytes());
        assert!(d.contains("-line 100\n+line one hundred\n"), "{d}");
        assert!(
            d.len() < 200,
            "a one-line change is a small diff: {} bytes",
            d.len()
        );
    }
}
