//! The comment line leaves in the same edit as the model's change: the model's patch is
//! rewritten, before it reaches the edit engine, so that it also removes the `spark!` line.
//!
//! The trigger's file is applied in memory to the content the model saw (the same base
//! `edit::apply` uses), the comment line is taken out of the result, and the file's section of
//! the patch becomes one chunk from that base to that result. Matching the whole base is
//! unambiguous by construction, and the engine keeps every untouched line's bytes, so the
//! landed edit, its record and its undo are exactly those of an `ask`, compare-and-swap and
//! 3-way merge with the user's typing included. Other files' sections are re-serialized as
//! they were parsed.

use crate::edit::matcher;
use crate::edit::patch::{self, Chunk, FileOp, Patch};

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The comment a trigger removes.
#[derive(Debug, Clone)]
pub(crate) struct Removal {
    /// Repository-relative path.
    pub(crate) path: String,
    /// The comment's whole line, without its terminator.
    pub(crate) text: String,
    /// 0-based, where it stood when the file settled (the nearest copy of `text` wins).
    pub(crate) line: usize,
}

/// `patch` rewritten to remove `removal`'s line from `base` (the trigger file's content as the
/// model saw it). `None` leaves the patch as it is: it does not parse or match (the engine
/// then refuses it with the precise reason, and the ask's repair turn may follow), the model
/// removed the comment itself or deleted the file, or the comment is no longer in `base`.
pub(crate) fn remove_comment(patch_text: &str, removal: &Removal, base: &[u8]) -> Option<String> {
    let mut parsed = patch::parse_any(patch_text).ok()?;
    let at = nearest(&lines_of(base)?, &removal.text, removal.line)?;
    let op = parsed.ops.iter().position(|op| op_path(op) == removal.path);
    let edited = match op.map(|i| &parsed.ops[i]) {
        Some(FileOp::Update { chunks, .. }) => matcher::apply_update(base, chunks).ok()?,
        Some(FileOp::Add { .. } | FileOp::Delete { .. }) => return None,
        None => base.to_vec(),
    };
    let before = lines_of(base)?;
    let after = lines_of(&edited)?;
    let count = |ls: &[&str]| ls.iter().filter(|l| **l == removal.text).count();
    // Fewer copies than before: the model's patch took the comment out already.
    if count(&after) < count(&before) {
        return None;
    }
    // The same copy of the line, counted from the top (the patch left it alone).
    let rank = before[..at].iter().filter(|l| **l == removal.text).count();
    let target = after
        .iter()
        .enumerate()
        .filter(|(_, l)| **l == removal.text)
        .nth(rank)
        .map(|(i, _)| i)?;
    let mut new_lines: Vec<String> = after.iter().map(|l| (*l).to_owned()).collect();
    new_lines.remove(target);
    let chunk = Chunk {
        context: None,
        old_lines: before.iter().map(|l| (*l).to_owned()).collect(),
        new_lines,
        end_of_file: false,
    };
    match op {
        Some(i) => {
            if let FileOp::Update { chunks, .. } = &mut parsed.ops[i] {
                *chunks = vec![chunk];
            }
        }
        None => parsed.ops.push(FileOp::Update {
            path: removal.path.clone(),
            move_to: None,
            chunks: vec![chunk],
        }),
    }
    Some(render(&parsed))
}

/// The 0-based index of the copy of `text` in `lines` nearest to `line`.
fn nearest(lines: &[&str], text: &str, line: usize) -> Option<usize> {
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| **l == text)
        .map(|(i, _)| i)
        .min_by_key(|i| i.abs_diff(line))
}

/// A text file's lines as the matcher reads them: after a BOM, split at LF, a CR before the LF
/// belonging to the terminator. `None` for content that is not UTF-8.
fn lines_of(bytes: &[u8]) -> Option<Vec<&str>> {
    let body = bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
    let text = std::str::from_utf8(body).ok()?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.is_empty() && body.is_empty() {
        return Some(Vec::new());
    }
    Some(
        text.split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .collect(),
    )
}

fn op_path(op: &FileOp) -> &str {
    match op {
        FileOp::Add { path, .. } | FileOp::Delete { path } | FileOp::Update { path, .. } => path,
    }
}

/// A parsed patch back in Codex `apply_patch` text. A chunk's lines come out as its old lines
/// then its new lines: the engine diffs them itself, so context need not be marked as such.
pub(crate) fn render(patch: &Patch) -> String {
    let mut out = String::from("*** Begin Patch\n");
    for op in &patch.ops {
        match op {
            FileOp::Add { path, lines } => {
                out += &format!("*** Add File: {path}\n");
                for l in lines {
                    out += &format!("+{l}\n");
                }
            }
            FileOp::Delete { path } => out += &format!("*** Delete File: {path}\n"),
            FileOp::Update {
                path,
                move_to,
                chunks,
            } => {
                out += &format!("*** Update File: {path}\n");
                if let Some(dest) = move_to {
                    out += &format!("*** Move to: {dest}\n");
                }
                for c in chunks {
                    match &c.context {
                        Some(context) => out += &format!("@@ {context}\n"),
                        None => out += "@@\n",
                    }
                    for l in &c.old_lines {
                        out += &format!("-{l}\n");
                    }
                    for l in &c.new_lines {
                        out += &format!("+{l}\n");
                    }
                    if c.end_of_file {
                        out += "*** End of File\n";
                    }
                }
            }
        }
    }
    out += "*** End Patch\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn removal(path: &str, text: &str, line: usize) -> Removal {
        Removal {
            path: path.into(),
            text: text.into(),
            line,
        }
    }

    fn apply(base: &[u8], patch_text: &str, path: &str) -> Vec<u8> {
        let parsed = patch::parse_any(patch_text).expect("parses");
        let chunks = parsed
            .ops
            .iter()
            .find_map(|op| match op {
                FileOp::Update {
                    path: p, chunks, ..
                } if p == path => Some(chunks.clone()),
                _ => None,
            })
            .expect("an update of the file");
        matcher::apply_update(base, &chunks).expect("applies")
    }

    #[test]
    fn the_comment_goes_in_the_same_patch_as_the_model_s_change() {
        let base = b"def f(xs):\r\n    # handle the empty list spark!\r\n    return xs[0]\r\n";
        let model = "*** Begin Patch\n*** Update File: a.py\n@@ def f(xs):\n     # handle the empty list spark!\n-    return xs[0]\n+    return xs[0] if xs else None\n*** End Patch\n";
        let r = removal("a.py", "    # handle the empty list spark!", 1);
        let shaped = remove_comment(model, &r, base).expect("rewritten");
        assert_eq!(
            apply(base, &shaped, "a.py"),
            b"def f(xs):\r\n    return xs[0] if xs else None\r\n"
        );
    }

    #[test]
    fn a_patch_that_does_not_touch_the_file_gains_the_removal_and_others_survive() {
        let base = b"// do it spark!\nfn a() {}\n";
        let model = "*** Begin Patch\n*** Add File: b.rs\n+fn b() {}\n*** Update File: c.rs\n*** Move to: d.rs\n@@ fn c\n-x\n+y\n*** End of File\n*** Delete File: e.rs\n*** End Patch\n";
        let shaped =
            remove_comment(model, &removal("a.rs", "// do it spark!", 0), base).expect("rewritten");
        let parsed = patch::parse_any(&shaped).expect("parses");
        let original = patch::parse_any(model).expect("parses");
        assert_eq!(parsed.ops[..3], original.ops[..]);
        assert_eq!(apply(base, &shaped, "a.rs"), b"fn a() {}\n");
    }

    #[test]
    fn the_nearest_copy_is_removed_and_a_patch_that_removed_it_is_left_alone() {
        let base = b"# x spark!\na\n# x spark!\nb\n";
        let model = "*** Begin Patch\n*** Update File: a.py\n@@\n-b\n+B\n*** End Patch\n";
        let shaped =
            remove_comment(model, &removal("a.py", "# x spark!", 3), base).expect("rewritten");
        assert_eq!(apply(base, &shaped, "a.py"), b"# x spark!\na\nB\n");
        let removes =
            "*** Begin Patch\n*** Update File: a.py\n@@\n a\n-# x spark!\n-b\n*** End Patch\n";
        assert!(remove_comment(removes, &removal("a.py", "# x spark!", 2), base).is_none());
        // Gone from the base (the user deleted it meanwhile): nothing to remove.
        assert!(remove_comment(model, &removal("a.py", "# y spark!", 2), base).is_none());
        // A patch that does not match is left for the engine to refuse with its reason.
        let stale = "*** Begin Patch\n*** Update File: a.py\n@@\n-zzz\n+B\n*** End Patch\n";
        assert!(remove_comment(stale, &removal("a.py", "# x spark!", 2), base).is_none());
    }

    #[test]
    fn a_bom_and_a_missing_final_newline_survive() {
        let base = b"\xEF\xBB\xBFx = 1\n# go spark!\ny = 2";
        let model = "*** Begin Patch\n*** Update File: a.py\n@@\n-x = 1\n+x = 3\n*** End Patch\n";
        let shaped =
            remove_comment(model, &removal("a.py", "# go spark!", 1), base).expect("rewritten");
        assert_eq!(apply(base, &shaped, "a.py"), b"\xEF\xBB\xBFx = 3\ny = 2");
    }
}
