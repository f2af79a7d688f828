//! A real-history corpus for the fidelity benchmark (`bench/fidelity.rs`): each modified text
//! file of each non-merge commit, with its parent and new content and the commit's diff hunks
//! (3 lines of context), read with libgit2 from any repository, bare mirrors included.

use std::path::Path;

use git2::{DiffOptions, Repository, Sort};

/// Files larger than this are left out, as the engine refuses to show them to a model.
const MAX_FILE_BYTES: usize = 256 * 1024;

/// One file of one commit: `old` (in the parent) became `new` through `hunks`.
#[derive(Debug, Clone)]
pub struct CorpusCase {
    pub commit: String,
    pub path: String,
    pub old: Vec<u8>,
    pub new: Vec<u8>,
    /// Each hunk's lines: ' ' context, '-' removed, '+' added; text without its terminator.
    pub hunks: Vec<Vec<(char, String)>>,
}

/// What was left out, and why, so the report can say so.
#[derive(Debug, Clone, Default)]
pub struct Skipped {
    /// Binary, non-UTF-8 or oversized files.
    pub not_text: usize,
    /// A side without a final newline: a patch cannot express that change.
    pub no_final_newline: usize,
}

/// The cases of the newest `max_commits` non-merge commits reachable from HEAD that modify at
/// least one text file.
pub fn cases(dir: &Path, max_commits: usize) -> Result<(Vec<CorpusCase>, Skipped), git2::Error> {
    let repo = Repository::open(dir)?;
    let mut walk = repo.revwalk()?;
    walk.push_head()?;
    walk.set_sorting(Sort::TIME)?;
    let (mut out, mut skipped, mut commits) = (Vec::new(), Skipped::default(), 0);
    for oid in walk {
        if commits == max_commits {
            break;
        }
        let commit = repo.find_commit(oid?)?;
        if commit.parent_count() != 1 {
            continue;
        }
        let parent = commit.parent(0)?;
        let mut options = DiffOptions::new();
        options.context_lines(3);
        let diff = repo.diff_tree_to_tree(
            Some(&parent.tree()?),
            Some(&commit.tree()?),
            Some(&mut options),
        )?;
        let before = out.len();
        for index in 0..diff.deltas().len() {
            let Some(delta) = diff.get_delta(index) else {
                continue;
            };
            if delta.status() != git2::Delta::Modified {
                continue;
            }
            let (Some(path), old_id, new_id) = (
                delta.new_file().path().and_then(Path::to_str),
                delta.old_file().id(),
                delta.new_file().id(),
            ) else {
                continue;
            };
            let (Ok(old), Ok(new)) = (repo.find_blob(old_id), repo.find_blob(new_id)) else {
                skipped.not_text += 1;
                continue;
            };
            let text = |b: &[u8]| {
                b.len() <= MAX_FILE_BYTES && !b.contains(&0) && std::str::from_utf8(b).is_ok()
            };
            if !text(old.content()) || !text(new.content()) {
                skipped.not_text += 1;
                continue;
            }
            let ends = |b: &[u8]| b.is_empty() || b.ends_with(b"\n");
            if !ends(old.content()) || !ends(new.content()) {
                skipped.no_final_newline += 1;
                continue;
            }
            let Some(patch) = git2::Patch::from_diff(&diff, index)? else {
                continue;
            };
            let mut hunks = Vec::new();
            for h in 0..patch.num_hunks() {
                let mut lines = Vec::new();
                for l in 0..patch.num_lines_in_hunk(h)? {
                    let line = patch.line_in_hunk(h, l)?;
                    let sign = line.origin();
                    if !matches!(sign, ' ' | '+' | '-') {
                        continue;
                    }
                    let content = String::from_utf8_lossy(line.content());
                    let content = content.strip_suffix('\n').unwrap_or(&content);
                    let content = content.strip_suffix('\r').unwrap_or(content);
                    lines.push((sign, content.to_owned()));
                }
                hunks.push(lines);
            }
            out.push(CorpusCase {
                commit: commit.id().to_string(),
                path: path.to_owned(),
                old: old.content().to_vec(),
                new: new.content().to_vec(),
                hunks,
            });
        }
        if out.len() > before {
            commits += 1;
        }
    }
    Ok((out, skipped))
}

/// Parse `patch` (either format; one update expected) and apply it to `old` as the engine does.
pub fn apply_text(old: &[u8], patch: &str) -> Result<Vec<u8>, String> {
    let parsed = super::patch::parse_any(patch).map_err(|e| e.to_string())?;
    match parsed.ops.as_slice() {
        [super::patch::FileOp::Update { chunks, .. }] => {
            super::matcher::apply_update(old, chunks).map_err(|e| e.to_string())
        }
        other => Err(format!(
            "expected one update, found {} operations",
            other.len()
        )),
    }
}
