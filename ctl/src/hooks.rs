//! `sparkctl hooks install | uninstall | status`: git hooks that reach the daemon.
//!
//! Hooks go into the directory git really runs them from (`git rev-parse --git-path hooks`, so
//! `core.hooksPath` as set by husky or a team config counts, and linked worktrees share them).
//! A hook that is already there is never replaced: it is moved aside, unchanged, to
//! `<name>.spark-chained` and spark's small POSIX sh wrapper runs it first, keeping its output
//! and failing with its exit status. `uninstall` moves it back: a rename keeps its bytes and its
//! mode. The wrapper calls `sparkctl hook <name> "$@"` and does nothing when sparkctl is missing.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use spark_proto::layout::Layout;
use spark_proto::methods::{CommitDraft, DraftParams, DraftResult, Refresh, WatchParams};

use crate::{Client, ClientError};

/// The hooks spark installs: a drafted commit message, and a rescan after HEAD moves.
pub const HOOKS: [&str; 4] = [
    "prepare-commit-msg",
    "post-checkout",
    "post-merge",
    "post-rewrite",
];

/// Suffix of a user's hook moved aside for spark's wrapper to run first.
pub const CHAINED_SUFFIX: &str = ".spark-chained";

/// The line that marks a hook file as spark's own wrapper.
const MARKER: &str = "# spark-hook: installed by `sparkctl hooks install`";

/// Why the hooks could not be installed, removed or listed.
#[derive(Debug, thiserror::Error)]
pub enum HooksError {
    #[error("{dir} is not in a git repository: {message}")]
    NotARepository { dir: String, message: String },
    #[error("cannot run git: {0}")]
    Git(io::Error),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: io::Error,
    },
}

impl HooksError {
    pub fn hint(&self) -> &'static str {
        match self {
            HooksError::NotARepository { .. } => {
                "run it inside a git worktree, or name one: `sparkctl hooks install <dir>`"
            }
            HooksError::Git(_) => "install git and make sure it is on PATH",
            HooksError::Io { .. } => "check the permissions of the hooks directory",
        }
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> HooksError + use<> {
    let path = path.display().to_string();
    move |source| HooksError::Io {
        action,
        path,
        source,
    }
}

/// What one hook slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookState {
    /// No hook.
    Absent,
    /// Spark's wrapper, alone.
    Installed,
    /// Spark's wrapper, running the user's earlier hook first.
    Chained,
    /// Someone else's hook; spark is not installed there.
    Foreign,
}

/// One hook and its state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HookStatus {
    pub name: &'static str,
    pub path: String,
    pub state: HookState,
}

/// The hooks directory of the repository of `dir`, as git resolves it.
pub fn hooks_dir(dir: &Path) -> Result<PathBuf, HooksError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--git-path", "hooks"])
        .output()
        .map_err(HooksError::Git)?;
    if !out.status.success() {
        return Err(HooksError::NotARepository {
            dir: dir.display().to_string(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let raw = String::from_utf8_lossy(&out.stdout)
        .trim_end_matches('\n')
        .to_owned();
    // git prints it relative to the directory it ran in, unless it is absolute.
    Ok(dir.join(raw))
}

/// The wrapper script for `name`. POSIX sh; exits 0 whatever spark does, so only the chained
/// hook can fail the git command. Refresh hooks run spark's part in the background, detached
/// from git's output, so `git checkout` pays only for a shell start. `prepare-commit-msg` starts
/// `sparkctl` only when the message is written from scratch (git's second argument absent or
/// `template`), so `git commit -m`, merges, squashes and amends pay only for the shell too.
pub fn wrapper(name: &str) -> String {
    let call = if name == "prepare-commit-msg" {
        format!(
            "case \"${{2:-}}\" in\n\
             \t\"\"|template) sparkctl hook {name} \"$@\" </dev/null || true ;;\n\
             esac"
        )
    } else {
        format!("sparkctl hook {name} \"$@\" </dev/null >/dev/null 2>&1 &")
    };
    format!(
        "#!/bin/sh\n\
         {MARKER}; `sparkctl hooks uninstall` restores what was here.\n\
         chained=\"${{0%/*}}/{name}{CHAINED_SUFFIX}\"\n\
         if [ -x \"$chained\" ]; then\n\
         \t\"$chained\" \"$@\" || exit $?\n\
         fi\n\
         command -v sparkctl >/dev/null 2>&1 || exit 0\n\
         {call}\n\
         exit 0\n"
    )
}

fn is_ours(path: &Path) -> bool {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).contains(MARKER))
        .unwrap_or(false)
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn state_of(dir: &Path, name: &str) -> HookState {
    let path = dir.join(name);
    if !exists(&path) {
        HookState::Absent
    } else if !is_ours(&path) {
        HookState::Foreign
    } else if exists(&dir.join(format!("{name}{CHAINED_SUFFIX}"))) {
        HookState::Chained
    } else {
        HookState::Installed
    }
}

/// Every hook slot of `hooks` and what it holds.
pub fn status(hooks: &Path) -> Vec<HookStatus> {
    HOOKS
        .iter()
        .map(|name| HookStatus {
            name,
            path: hooks.join(name).display().to_string(),
            state: state_of(hooks, name),
        })
        .collect()
}

/// Install spark's wrappers into `hooks`, chaining any hook already there. Idempotent.
pub fn install(hooks: &Path) -> Result<Vec<HookStatus>, HooksError> {
    fs::create_dir_all(hooks).map_err(io_err("create", hooks))?;
    for name in HOOKS {
        let path = hooks.join(name);
        match state_of(hooks, name) {
            HookState::Installed | HookState::Chained => continue,
            HookState::Foreign => {
                let aside = hooks.join(format!("{name}{CHAINED_SUFFIX}"));
                if exists(&aside) {
                    // A chained hook from an earlier install whose wrapper was replaced since:
                    // moving over it would lose it.
                    return Err(HooksError::Io {
                        action: "chain the hook at",
                        path: path.display().to_string(),
                        source: io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{} already exists", aside.display()),
                        ),
                    });
                }
                fs::rename(&path, &aside).map_err(io_err("move aside", &path))?;
            }
            HookState::Absent => {}
        }
        write_wrapper(&path, name)?;
    }
    Ok(status(hooks))
}

fn write_wrapper(path: &Path, name: &str) -> Result<(), HooksError> {
    // Written beside and renamed in, so git never runs a half-written hook.
    let tmp = path.with_file_name(format!(".{name}.spark-tmp"));
    fs::write(&tmp, wrapper(name)).map_err(io_err("write", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("install", path))
}

/// Remove spark's wrappers from `hooks` and put chained hooks back where they were.
pub fn uninstall(hooks: &Path) -> Result<Vec<HookStatus>, HooksError> {
    for name in HOOKS {
        let path = hooks.join(name);
        if !matches!(
            state_of(hooks, name),
            HookState::Installed | HookState::Chained
        ) {
            continue;
        }
        let aside = hooks.join(format!("{name}{CHAINED_SUFFIX}"));
        if exists(&aside) {
            fs::rename(&aside, &path).map_err(io_err("restore", &aside))?;
        } else {
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
        }
    }
    Ok(status(hooks))
}

/// Default cap on the commit-message draft (config key `hook_timeout_ms`).
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// A refresh is one small request to a daemon that answers at once; past this it is not up.
const REFRESH_TIMEOUT: Duration = Duration::from_millis(500);

/// `sparkctl hook <name> <args>`: what an installed hook runs. Never fails and never starts a
/// daemon: a hook must not fail or slow the git command. Problems get one line on stderr.
pub fn run_hook(name: &str, args: &[String], layout: &Layout) {
    match name {
        "post-checkout" | "post-merge" | "post-rewrite" => {
            // Nothing to say when no daemon answers: nothing is watched, so nothing is stale.
            if let Ok(dir) = std::env::current_dir() {
                let _ = within(REFRESH_TIMEOUT, refresh_call(layout.socket.clone(), dir));
            }
        }
        "prepare-commit-msg" => {
            if let Err(why) = prepare_commit_msg(args, layout) {
                eprintln!("spark: no drafted commit message: {why}");
            }
        }
        // A hook spark does not know (from a newer install): do nothing, successfully.
        _ => {}
    }
}

/// Run `f` on its own thread and give up on it at `limit`: the process then exits without it.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

fn refresh_call(socket: PathBuf, dir: PathBuf) -> impl FnOnce() -> Result<(), ClientError> {
    move || {
        let (mut client, _) = Client::open(&socket, "sparkctl-hook")?;
        client.call::<Refresh>(&WatchParams {
            dir: dir.display().to_string(),
        })?;
        Ok(())
    }
}

/// The cap on a draft: `hook_timeout_ms` from config.toml, else [`DEFAULT_HOOK_TIMEOUT`].
pub fn hook_timeout(layout: &Layout) -> Duration {
    #[derive(serde::Deserialize)]
    struct Keys {
        hook_timeout_ms: Option<u64>,
    }
    fs::read_to_string(&layout.config_file)
        .ok()
        .and_then(|t| toml::from_str::<Keys>(&t).ok())
        .and_then(|k| k.hook_timeout_ms)
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_HOOK_TIMEOUT)
}

/// Draft a message into git's message file when the user is about to write one from scratch.
fn prepare_commit_msg(args: &[String], layout: &Layout) -> Result<(), String> {
    let Some(file) = args.first() else {
        return Ok(());
    };
    // git's second argument says where the message comes from: `-m`/`-F` (message), a merge,
    // a squash or an amend/`-c` (commit) already have one; none or a template means scratch.
    match args.get(1).map(String::as_str) {
        None | Some("template") => {}
        Some(_) => return Ok(()),
    }
    let limit = hook_timeout(layout);
    let cwd =
        std::env::current_dir().map_err(|e| format!("cannot read the current directory: {e}"))?;
    let socket = layout.socket.clone();
    let provider = crate::settings::from_env(|k| std::env::var(k).ok());
    let draft = within(limit, move || -> Result<DraftResult, ClientError> {
        let (mut client, _) = Client::open(&socket, "sparkctl-hook")?;
        client.call::<CommitDraft>(&DraftParams {
            cwd: cwd.display().to_string(),
            provider,
        })
    })
    .ok_or_else(|| format!("no answer within {} ms", limit.as_millis()))?
    .map_err(|e| e.to_string())?;
    let message = draft.message.trim();
    if message.is_empty() {
        return Err("the model answered with an empty message".into());
    }
    let path = Path::new(file);
    let before = fs::read(path).map_err(|e| format!("cannot read {file}: {e}"))?;
    let mut after = format!("{message}\n").into_bytes();
    after.extend_from_slice(&before);
    // Written beside and renamed over, so an interrupted hook leaves git's file whole.
    let tmp = path.with_extension("spark-draft");
    fs::write(&tmp, &after).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("cannot write {file}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrapper_names_its_hook_and_always_exits_zero_itself() {
        let w = wrapper("post-merge");
        assert!(w.starts_with("#!/bin/sh\n"));
        assert!(w.contains("sparkctl hook post-merge \"$@\" </dev/null >/dev/null 2>&1 &"));
        assert!(w.contains("post-merge.spark-chained"));
        assert!(w.ends_with("exit 0\n"));
        assert!(w.contains(MARKER));
        // The draft is written before git opens the editor: it cannot run in the background.
        let w = wrapper("prepare-commit-msg");
        assert!(w.contains("sparkctl hook prepare-commit-msg \"$@\" </dev/null || true ;;\n"));
        // Only a message written from scratch starts sparkctl at all.
        assert!(w.contains("case \"${2:-}\" in\n\t\"\"|template) "));
    }
}
