//! `GIT_DIR` and `GIT_WORK_TREE` in the user's shell. The daemon finds a repository from the
//! `cwd` a client sends, exactly as git does without those variables (docs/protocol.md,
//! "Repositories and paths"); the variables never reach it. So that a command never edits a
//! repository other than the one git would, `sparkctl` accepts them only when they name what
//! discovery from the current directory finds anyway (as in a git hook run at the worktree's
//! top), and refuses otherwise.

use std::path::{Path, PathBuf};

/// Why the variables were refused: one line, and a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitEnvRefusal {
    pub message: String,
    pub hint: String,
}

/// Check `GIT_DIR`/`GIT_WORK_TREE` (as `var` returns them) against discovery from `cwd`.
pub fn check(
    cwd: &Path,
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<(), GitEnvRefusal> {
    let git_dir = var("GIT_DIR").filter(|v| !v.is_empty());
    let work_tree = var("GIT_WORK_TREE").filter(|v| !v.is_empty());
    if git_dir.is_none() && work_tree.is_none() {
        return Ok(());
    }
    let shown = |name: &str, v: &Option<std::ffi::OsString>| {
        v.as_ref()
            .map(|v| format!("{name}={}", Path::new(v).display()))
    };
    let set = [
        shown("GIT_DIR", &git_dir),
        shown("GIT_WORK_TREE", &work_tree),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" and ");
    let refuse = |why: &str| GitEnvRefusal {
        message: format!(
            "{set} is set, but {why}; sparkctl finds the repository from the current directory only"
        ),
        hint: "unset GIT_DIR and GIT_WORK_TREE and run sparkctl inside the worktree you mean \
               (`cd` there first)"
            .to_owned(),
    };
    let canonical = |p: &Path| cwd.join(p).canonicalize().ok();
    let Some((top, found_dir)) = canonical(Path::new(".")).and_then(|c| discover(&c)) else {
        return Err(refuse(
            "the current directory is not inside a worktree with a .git",
        ));
    };
    if let Some(g) = &git_dir
        && canonical(Path::new(g)).as_ref() != Some(&found_dir)
    {
        return Err(refuse(&format!(
            "it is not the git directory of {}",
            top.display()
        )));
    }
    // With GIT_DIR and no GIT_WORK_TREE, git takes the current directory as the worktree's top.
    let effective = match (&work_tree, &git_dir) {
        (Some(w), _) => canonical(Path::new(w)),
        (None, Some(_)) => canonical(Path::new(".")),
        (None, None) => Some(top.clone()),
    };
    if effective.as_ref() != Some(&top) {
        return Err(refuse(&format!(
            "git would then use a worktree other than {}",
            top.display()
        )));
    }
    Ok(())
}

/// The first directory up from `dir` holding a `.git` entry, and the git directory it names.
fn discover(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    for top in dir.ancestors() {
        let dotgit = top.join(".git");
        let Ok(meta) = std::fs::metadata(&dotgit) else {
            continue;
        };
        let git_dir = if meta.is_file() {
            let text = std::fs::read_to_string(&dotgit).ok()?;
            top.join(text.strip_prefix("gitdir:")?.trim())
        } else {
            dotgit
        };
        return Some((top.to_path_buf(), git_dir.canonicalize().ok()?));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn env(pairs: &[(&str, &Path)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, OsString)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_os_str().to_owned()))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    /// A scratch directory removed on drop (this crate has no tempfile dependency).
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tree() -> (Scratch, PathBuf) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sparkctl-gitenv-{}-{n}", std::process::id()));
        std::fs::create_dir_all(dir.join("w/.git")).expect("mkdir");
        std::fs::create_dir_all(dir.join("w/sub")).expect("mkdir");
        std::fs::create_dir_all(dir.join("other/.git")).expect("mkdir");
        let root = dir.canonicalize().expect("canonical");
        (Scratch(dir), root)
    }

    #[test]
    fn unset_variables_are_fine_anywhere() {
        assert_eq!(check(Path::new("/"), |_| None), Ok(()));
    }

    #[test]
    fn variables_naming_what_discovery_finds_are_accepted() {
        let (_d, root) = tree();
        let w = root.join("w");
        assert_eq!(check(&w, env(&[("GIT_DIR", Path::new(".git"))])), Ok(()));
        assert_eq!(
            check(
                &w.join("sub"),
                env(&[("GIT_DIR", &w.join(".git")), ("GIT_WORK_TREE", &w)])
            ),
            Ok(())
        );
        assert_eq!(check(&w.join("sub"), env(&[("GIT_WORK_TREE", &w)])), Ok(()));
    }

    #[test]
    fn another_repository_or_worktree_is_refused_with_a_hint() {
        let (_d, root) = tree();
        let w = root.join("w");
        let e = check(&w, env(&[("GIT_DIR", &root.join("other/.git"))])).expect_err("refused");
        assert!(e.message.contains("GIT_DIR="), "{e:?}");
        assert!(e.message.contains("not the git directory"), "{e:?}");
        assert!(e.hint.contains("unset GIT_DIR"), "{e:?}");
        // GIT_DIR alone in a subdirectory: git would take the subdirectory as the worktree.
        let e = check(&w.join("sub"), env(&[("GIT_DIR", &w.join(".git"))])).expect_err("refused");
        assert!(e.message.contains("worktree other than"), "{e:?}");
        let e = check(&w, env(&[("GIT_WORK_TREE", &root.join("other"))])).expect_err("refused");
        assert!(e.message.contains("GIT_WORK_TREE="), "{e:?}");
        assert!(check(&root, env(&[("GIT_DIR", &w.join(".git"))])).is_err());
    }
}
