//! The one test kit, shared by the daemon's unit tests and the end-to-end suites:
//!
//! - [`hermetic`] / [`hermetic_git`]: git with no user or system configuration and no
//!   `GIT_DIR`-style variables leaking in from the environment the tests run in.
//! - [`TestRepo`]: a hermetic git repository in a temporary directory.
//! - [`snapshot`]: every file under a directory with its bytes and mode, to prove that nothing
//!   changed on disk.

mod fuzz;
pub use fuzz::fuzz;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

/// Makes `cmd` (git, or a program that runs git) hermetic: no global or system git config,
/// no prompts, and none of the variables that would point git at another repository.
pub fn hermetic(cmd: &mut Command) -> &mut Command {
    cmd.env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
}

/// `git` in `dir`, hermetic.
pub fn hermetic_git(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir);
    hermetic(&mut cmd);
    cmd
}

/// Runs git in `dir` (hermetic) and returns its stdout; panics with its stderr on failure.
pub fn git_ok(dir: &Path, args: &[&str]) -> String {
    let out = hermetic_git(dir).args(args).output().expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}",
        dir.display(),
        stderr(&out)
    );
    stdout(&out)
}

/// Runs `cmd` with `input` on its stdin and waits for it, capturing stdout and stderr. A
/// program may answer (a refusal, say) before it reads its input: a broken pipe while writing
/// is not an error, what the program printed and its exit status tell what happened.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("piped stdin");
    if let Err(e) = std::io::Write::write_all(&mut stdin, input) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
    }
    drop(stdin);
    child.wait_with_output().expect("wait")
}

/// Text of a process's stderr.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Text of a process's stdout.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A hermetic git repository in a temporary directory (under `/tmp`, so paths stay short),
/// removed on drop.
#[derive(Debug)]
pub struct TestRepo {
    dir: tempfile::TempDir,
}

impl TestRepo {
    /// `git init` on branch `main` with a local identity; no commits yet. Automatic `git gc`
    /// and maintenance are off: a commit of thousands of files would otherwise start a
    /// detached repack that competes with the test (or benchmark) for the CPU.
    pub fn empty() -> TestRepo {
        let dir = tempfile::Builder::new()
            .prefix("repo")
            .tempdir_in("/tmp")
            .expect("temp repo");
        let r = TestRepo { dir };
        r.git(&["init", "-q", "-b", "main"]);
        let config = r.path().join(".git/config");
        let mut text = std::fs::read_to_string(&config).expect("read .git/config");
        text.push_str(
            "[user]\n\tname = Spark Test\n\temail = test@spark.invalid\n\
             [gc]\n\tauto = 0\n[maintenance]\n\tauto = false\n",
        );
        std::fs::write(&config, text).expect("write .git/config");
        r
    }

    /// A repository with one commit holding `files`.
    pub fn with_files(files: &[(&str, &[u8])]) -> TestRepo {
        let r = TestRepo::empty();
        for (path, bytes) in files {
            r.write(path, bytes);
        }
        r.commit_all("initial");
        r
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The worktree as a `cwd` parameter.
    pub fn cwd(&self) -> String {
        self.path().display().to_string()
    }

    /// Writes a file, creating its directories.
    pub fn write(&self, rel: &str, bytes: &[u8]) {
        let p = self.path().join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::fs::write(p, bytes).expect("write file");
    }

    /// Writes a file with permission bits `mode` (e.g. 0o755).
    pub fn write_mode(&self, rel: &str, bytes: &[u8], mode: u32) {
        self.write(rel, bytes);
        std::fs::set_permissions(self.path().join(rel), std::fs::Permissions::from_mode(mode))
            .expect("chmod");
    }

    pub fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.path().join(rel)).expect("read file")
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.path().join(rel).exists()
    }

    /// `git add -A` and a commit.
    pub fn commit_all(&self, message: &str) {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", message]);
    }

    /// Runs git in the repository; panics with its stderr on failure.
    pub fn git(&self, args: &[&str]) -> String {
        git_ok(self.path(), args)
    }

    /// Runs git in the repository, whatever its exit status.
    pub fn git_output(&self, args: &[&str]) -> Output {
        hermetic_git(self.path())
            .args(args)
            .output()
            .expect("run git")
    }
}

/// Every file under `dir` (`.git` included) with its bytes and mode, keyed by its path relative
/// to `dir` (directories end in `/`; a symlink's bytes are its target): compare two snapshots
/// to prove nothing changed.
pub fn snapshot(dir: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(dir)
                .expect("under dir")
                .display()
                .to_string();
            let meta = std::fs::symlink_metadata(&p).expect("metadata");
            let mode = meta.permissions().mode();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&p).expect("readlink");
                out.insert(rel, (mode, target.display().to_string().into_bytes()));
            } else if meta.is_dir() {
                out.insert(format!("{rel}/"), (mode, Vec::new()));
                stack.push(p);
            } else {
                out.insert(rel, (mode, std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_repo_is_hermetic_and_a_snapshot_sees_every_change() {
        let r = TestRepo::with_files(&[("a.txt", b"a\n")]);
        assert_eq!(
            r.git(&["config", "user.email"]).trim(),
            "test@spark.invalid"
        );
        assert_eq!(r.git(&["rev-parse", "--abbrev-ref", "HEAD"]).trim(), "main");
        let before = snapshot(r.path());
        assert!(before.contains_key("a.txt") && before.contains_key(".git/"));
        r.write_mode("a.txt", b"a\n", 0o755);
        let after = snapshot(r.path());
        assert_ne!(before, after, "a mode change is a change");
        assert_eq!(after["a.txt"].0 & 0o777, 0o755);
    }
}
