//! What the model sees, and the guard on every byte that leaves the machine.
//!
//! The first turn of a conversation carries a compact outline of the repository and the focus
//! files; later turns carry only what changed since the model last saw it (a small diff for a
//! focused file the user edited). Every file read for the model goes through the same checks as
//! an edit target — never `.git`, a git-ignored file, a deny-listed secret, a binary or an
//! oversized file — even when the user names it. Runs on the repository actor.

use std::collections::HashMap;

use spark_proto::methods::Focus;
use spark_proto::{ErrorCode, RpcError};

use crate::edit::paths::{self, Intent};
use crate::edit::{RepoCtx, journal};

/// Largest file sent to the model whole; bigger focus files are refused with a clear error.
pub(crate) const MAX_FILE_BYTES: usize = 256 * 1024;
/// The outline lists at most this many paths (the model can ask for more through tools).
const OUTLINE_MAX_PATHS: usize = 2000;
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

/// Build the user message for `prompt` with `focus` (paths relative to `cwd_prefix`), given
/// what the model has already `seen` in this conversation and whether to include the outline.
pub(crate) fn assemble(
    ctx: &RepoCtx<'_>,
    cwd_prefix: &str,
    prompt: &str,
    focus: &[Focus],
    seen: &HashMap<String, Vec<u8>>,
    with_outline: bool,
) -> Result<Assembled, RpcError> {
    let mut out = Assembled::default();
    if with_outline {
        let outline = outline(ctx);
        out.audit.push(("<outline>".into(), outline.len()));
        out.text += &outline;
    }
    for f in focus {
        let joined = if cwd_prefix.is_empty() {
            f.path.clone()
        } else {
            format!("{cwd_prefix}/{}", f.path)
        };
        let refuse = |e: paths::PathError| {
            RpcError::new(
                ErrorCode::EditRejected,
                format!("cannot show {} to the model: {e}", f.path),
            )
            .with_kind(format!("path_{}", e.code()))
            .with_path(f.path.clone())
        };
        let rel = paths::validate_rel_path(&joined).map_err(refuse)?;
        let abs =
            paths::check_target(ctx.workdir, ctx.repo, &rel, Intent::Modify).map_err(refuse)?;
        let bytes = journal::read_state(&abs)
            .map_err(|e| RpcError::new(ErrorCode::Internal, format!("cannot read {}: {e}", rel)))?
            .map(|s| s.bytes)
            .unwrap_or_default();
        let reject = |why: &str, kind: &str| {
            RpcError::new(
                ErrorCode::EditRejected,
                format!("cannot show {} to the model: {why}", f.path),
            )
            .with_kind(kind)
            .with_path(f.path.clone())
        };
        if bytes.len() > MAX_FILE_BYTES {
            return Err(reject(
                &format!(
                    "it is {} bytes, over the {MAX_FILE_BYTES}-byte limit",
                    bytes.len()
                ),
                "too_large",
            ));
        }
        let Ok(text) = std::str::from_utf8(&bytes) else {
            return Err(reject("it is not text", "binary_target"));
        };
        if bytes.contains(&0) {
            return Err(reject("it is not text", "binary_target"));
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
        if let (Some(start), Some(end)) = (f.start_line, f.end_line) {
            out.text += &range_note(path, text, start, end);
        }
        out.audit.push((path.to_owned(), out.text.len() - before));
        out.seen.insert(path.to_owned(), bytes);
    }
    out.text += &format!("\nRequest: {prompt}\n");
    Ok(out)
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

/// The outline as sent when a conversation starts (for [`crate::repo::RepoHandle::run`]).
pub(crate) fn outline_text(ctx: &RepoCtx<'_>) -> String {
    outline(ctx)
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

fn diff(old: &[u8], new: &[u8]) -> String {
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
