//! `spark!` comment triggers (ARCHITECTURE.md, "`spark!` comment triggers"): in a repository
//! with triggers on, a saved own-line comment ending in `spark!` is run as an ask with the code
//! around it as focus, and its line is removed in the same edit, recorded with source `trigger`.
//!
//! - `comment`: which comment syntax a file uses, and the lexer that finds the instructions.
//! - `focus`: the enclosing block (by indentation) or the surrounding lines.
//! - `shape`: the model's patch rewritten so it also removes the comment line.
//!
//! Triggers listen to the watcher's `FilesChanged` events, so they run only after a file
//! settled (the watcher's debounce), never for ignored files (the watcher does not see them)
//! and never for the daemon's own writes (those raise no event). One task per repository runs
//! them one at a time, in file order. Every trigger that ran is remembered by its place (file,
//! comment line, which copy of that line) in `<git-dir>/spark/triggers.jsonl`, so the same
//! instruction at the same place never runs twice, across restarts too; a failed one stays in
//! the file, and `edit/log` lists it as `failed` with its reason.

mod comment;
mod focus;
mod shape;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use spark_proto::events::Event;
use spark_proto::methods::{AskParams, EditState, Focus, LogEntry};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::ask::{AskAs, Asks, Shape};
use crate::edit::paths::{self, Intent};
use crate::edit::{EditError, RepoCtx};
use crate::repo::{RepoHandle, Repos};
use crate::watch::MAX_FILE_BYTES;

/// The list of repositories with triggers on, in the state directory next to `watched.json`.
const ENABLED_FILE: &str = "triggers.json";
const ENABLED_VERSION: u32 = 1;
/// Every trigger that ran in a worktree, in its git directory next to the edit ledger.
const LOG_FILE: &str = "triggers.jsonl";
/// Batches of changed files queued for one repository's runner; a full queue drops a batch
/// with a warning (the next save of those files brings them back).
const QUEUE: usize = 64;

/// What the trigger runners need of the daemon, handed over by the server at start (so
/// `trigger` does not depend on `server`).
#[derive(Debug)]
pub(crate) struct TriggerEnv {
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) repos: Arc<Repos>,
    pub(crate) asks: Arc<Asks>,
    pub(crate) triggers: Triggers,
    /// The trigger log is fsynced like the ledger.
    pub(crate) fsync: bool,
}

/// Which repositories run triggers, and one runner task per repository that does.
#[derive(Debug, Clone)]
pub(crate) struct Triggers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state_dir: PathBuf,
    /// `triggers = true` in `config.toml`: every watched repository.
    everywhere: bool,
    /// Turned on with `triggers/set` (`sparkctl watch --triggers`), by worktree path.
    enabled: Mutex<BTreeSet<PathBuf>>,
    runners: Mutex<HashMap<PathBuf, mpsc::Sender<Vec<String>>>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct EnabledFile {
    version: u32,
    repos: Vec<PathBuf>,
}

/// One line of `triggers.jsonl`: a trigger that ran, and how it ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ran {
    id: String,
    /// Unix ms when it ended.
    at: u64,
    path: String,
    /// 1-based.
    line: u32,
    /// The comment's whole line, and which copy of that line in the file it was (0 = first):
    /// with `path`, the place that never runs twice.
    text: String,
    rank: usize,
    instruction: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    edit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Ran {
    fn place(&self) -> (String, String, usize) {
        (self.path.clone(), self.text.clone(), self.rank)
    }
}

/// Why a file is not looked at for triggers (logged at debug level only: most saves hold none).
#[derive(Debug, thiserror::Error)]
enum Skip {
    #[error("no known comment syntax")]
    Syntax,
    #[error("refused: {0}")]
    Path(#[from] paths::PathError),
    #[error("cannot read it: {0}")]
    Read(#[from] io::Error),
    #[error("gone")]
    Gone,
    #[error("{0} bytes, over the {MAX_FILE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("not text")]
    Binary,
}

impl Triggers {
    /// Triggers as configured, with the repositories turned on before a restart.
    pub(crate) fn new(state_dir: &Path, everywhere: bool) -> Triggers {
        let enabled = load_enabled(state_dir).unwrap_or_else(|e| {
            warn!(error = %e, file = ENABLED_FILE, "cannot read the repositories with triggers on; none are");
            BTreeSet::new()
        });
        Triggers {
            inner: Arc::new(Inner {
                state_dir: state_dir.to_owned(),
                everywhere,
                enabled: Mutex::new(enabled),
                runners: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Whether triggers run in `workdir`.
    pub(crate) fn enabled(&self, workdir: &Path) -> bool {
        self.inner.everywhere
            || self
                .inner
                .enabled
                .lock()
                .is_ok_and(|set| set.contains(workdir))
    }

    /// Turn triggers on or off for `workdir`, persisted at once. Returns whether they now run.
    pub(crate) fn set(&self, workdir: &Path, on: bool) -> io::Result<bool> {
        let list: Vec<PathBuf> = {
            let mut set = self
                .inner
                .enabled
                .lock()
                .map_err(|_| io::Error::other("trigger list poisoned"))?;
            let changed = if on {
                set.insert(workdir.to_owned())
            } else {
                set.remove(workdir)
            };
            if !changed {
                // Not `self.enabled`: that locks the list this guard holds.
                return Ok(self.inner.everywhere || set.contains(workdir));
            }
            set.iter().cloned().collect()
        };
        save_enabled(&self.inner.state_dir, &list)?;
        Ok(self.enabled(workdir))
    }

    /// Listen for settled files and run the triggers they hold, until shutdown.
    pub(crate) fn start(env: &Arc<TriggerEnv>) {
        let mut events = env.events.subscribe();
        let env = env.clone();
        let tracker = env.tracker.clone();
        tracker.spawn(async move {
            loop {
                let event = tokio::select! {
                    () = env.shutdown.cancelled() => return,
                    e = events.recv() => e,
                };
                match event {
                    Ok(Event::FilesChanged { repo, paths }) => {
                        let workdir = PathBuf::from(&repo);
                        if env.triggers.enabled(&workdir) {
                            env.triggers.queue(&env, workdir, paths);
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(
                            missed = n,
                            "trigger listener fell behind; saves in between are not looked at"
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    /// Hand a batch to the repository's runner, starting it on first use.
    fn queue(&self, env: &Arc<TriggerEnv>, workdir: PathBuf, paths: Vec<String>) {
        let Ok(mut runners) = self.inner.runners.lock() else {
            return;
        };
        let tx = runners.entry(workdir.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            env.tracker
                .spawn(run_repo(env.clone(), workdir.clone(), rx));
            tx
        });
        if tx.try_send(paths).is_err() {
            warn!(repo = %workdir.display(), "trigger queue full; a save is not looked at");
        }
    }

    /// The failed triggers of a worktree, newest first, as `edit/log` lists them (on the actor).
    pub(crate) fn failed_entries(ctx: &RepoCtx<'_>, limit: usize) -> Vec<LogEntry> {
        let mut out: Vec<LogEntry> = read_log(ctx.repo.path())
            .unwrap_or_else(|e| {
                warn!(error = %e, "cannot read the trigger log");
                Vec::new()
            })
            .into_iter()
            .filter_map(|ran| {
                let reason = ran.error?;
                Some(LogEntry {
                    id: ran.id,
                    at: ran.at,
                    state: EditState::Failed,
                    source: "trigger".to_owned(),
                    message: ran.instruction,
                    files: vec![ran.path],
                    reason: Some(reason),
                })
            })
            .collect();
        out.reverse();
        out.truncate(limit);
        out
    }
}

/// `edit/log`'s list: the edits and the failed triggers, newest first, at most `limit`.
pub(crate) fn merge_log(
    mut edits: Vec<LogEntry>,
    failed: Vec<LogEntry>,
    limit: usize,
) -> Vec<LogEntry> {
    if failed.is_empty() {
        return edits;
    }
    edits.extend(failed);
    // Stable: entries of the same millisecond keep their order.
    edits.sort_by_key(|e| std::cmp::Reverse(e.at));
    edits.truncate(limit);
    edits
}

/// One repository's runner: batches in the order they settled, files in path order, each
/// file's triggers top to bottom, one at a time.
async fn run_repo(env: Arc<TriggerEnv>, workdir: PathBuf, mut rx: mpsc::Receiver<Vec<String>>) {
    let label = workdir.display().to_string();
    let repo = match env.repos.for_cwd(&label).await {
        Ok((repo, _)) => repo,
        Err(e) => {
            warn!(repo = %label, error = %e.message, "triggers cannot open the repository");
            return;
        }
    };
    let mut ran: HashSet<(String, String, usize)> = match repo
        .run(|ctx| read_log(ctx.repo.path()))
        .await
    {
        Ok(Ok(log)) => log.iter().map(Ran::place).collect(),
        Ok(Err(e)) => {
            warn!(repo = %label, error = %e, "cannot read the trigger log; earlier triggers may run again");
            HashSet::new()
        }
        Err(e) => {
            warn!(repo = %label, error = %e.message, "triggers cannot reach the repository");
            return;
        }
    };
    loop {
        let batch = tokio::select! {
            () = env.shutdown.cancelled() => return,
            b = rx.recv() => match b { Some(b) => b, None => return },
        };
        let files: BTreeSet<String> = batch.into_iter().collect();
        for path in files {
            // Only the comments the user saved: one the model writes never runs.
            let wanted: HashSet<_> = unrun(&repo, &path, &ran)
                .await
                .iter()
                .map(Pending::place)
                .collect();
            // Each trigger changes the file: look again after each, for the next one not run.
            while !wanted.is_empty() {
                if env.shutdown.is_cancelled() || !env.triggers.enabled(&workdir) {
                    return;
                }
                let Some(next) = unrun(&repo, &path, &ran)
                    .await
                    .into_iter()
                    .find(|p| wanted.contains(&p.place()))
                else {
                    break;
                };
                ran.insert(next.place());
                run_one(&env, &repo, next).await;
            }
        }
    }
}

/// A trigger about to run.
#[derive(Debug)]
struct Pending {
    id: String,
    path: String,
    found: comment::Found,
    rank: usize,
    /// 0-based inclusive focus.
    focus: (usize, usize),
}

impl Pending {
    fn place(&self) -> (String, String, usize) {
        (self.path.clone(), self.found.text.clone(), self.rank)
    }
}

/// The `spark!` comments of `path` that have not run, in file order, read through the same
/// guards as any file shown to the model.
async fn unrun(
    repo: &RepoHandle,
    path: &str,
    ran: &HashSet<(String, String, usize)>,
) -> Vec<Pending> {
    let rel = path.to_owned();
    let read = repo.run(move |ctx| guarded_text(ctx, &rel)).await;
    let (syntax, text) = match read {
        Ok(Ok(found)) => found,
        Ok(Err(skip)) => {
            debug!(path, why = %skip, "not looked at for triggers");
            return Vec::new();
        }
        Err(e) => {
            warn!(path, error = %e.message, "cannot read a file for triggers");
            return Vec::new();
        }
    };
    debug!(path, syntax = syntax.name, "looking for spark! comments");
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let mut out = Vec::new();
    for found in comment::find(syntax, &text) {
        let rank = lines[..found.line]
            .iter()
            .filter(|l| **l == found.text)
            .count();
        if ran.contains(&(path.to_owned(), found.text.clone(), rank)) {
            continue;
        }
        out.push(Pending {
            id: new_id(path, &found.text),
            path: path.to_owned(),
            focus: focus::around(&lines, found.line),
            rank,
            found,
        });
    }
    out
}

/// Run one trigger as an ask, and report it: events, the edit's record, the trigger log.
async fn run_one(env: &Arc<TriggerEnv>, repo: &RepoHandle, t: Pending) {
    let label = repo.workdir().display().to_string();
    let line = u32::try_from(t.found.line + 1).unwrap_or(u32::MAX);
    info!(repo = %label, path = %t.path, line, trigger = %t.id, "running a spark! trigger");
    let _ = env.events.send(Event::TriggerStarted {
        repo: label.clone(),
        trigger: t.id.clone(),
        path: t.path.clone(),
        line,
        instruction: t.found.instruction.clone(),
    });
    let removal = shape::Removal {
        path: t.path.clone(),
        text: t.found.text.clone(),
        line: t.found.line,
    };
    let shape: Shape = Arc::new(move |patch, bases, workdir| {
        let base = match bases.get(&removal.path) {
            Some(b) => b.clone(),
            None => std::fs::read(workdir.join(&removal.path)).ok()?,
        };
        shape::remove_comment(patch, &removal, &base)
    });
    let params = AskParams {
        cwd: label.clone(),
        prompt: prompt(&t),
        focus: vec![Focus {
            path: t.path.clone(),
            start_line: Some(u32::try_from(t.focus.0 + 1).unwrap_or(u32::MAX)),
            end_line: Some(u32::try_from(t.focus.1 + 1).unwrap_or(u32::MAX)),
        }],
        dry_run: false,
        new_conversation: false,
        provider: None,
        buffers: Vec::new(),
    };
    let how = AskAs {
        source: "trigger",
        message: Some(t.found.instruction.clone()),
        steers: false,
        shape: Some(shape),
    };
    let result = env
        .asks
        .ask_as(
            repo.clone(),
            String::new(),
            params,
            env.shutdown.child_token(),
            |_| std::future::ready(()),
            how,
        )
        .await;
    let (edit, error) = match result {
        Ok(r) => match r.edit {
            // The ask's after-edit step told subscribers (`edit_applied`).
            Some(edit) => (Some(edit), None),
            None => {
                let said = r.answer.lines().find(|l| !l.trim().is_empty());
                let why = match said {
                    Some(said) => format!("the model changed nothing: {said}"),
                    None => "the model changed nothing".to_owned(),
                };
                (None, Some(why))
            }
        },
        Err(e) => (None, Some(e.message)),
    };
    match &error {
        Some(why) => {
            warn!(repo = %label, path = %t.path, line, trigger = %t.id, error = %why, "spark! trigger failed; the comment stays")
        }
        None => {
            info!(repo = %label, path = %t.path, line, trigger = %t.id, "spark! trigger landed")
        }
    }
    let ran = Ran {
        id: t.id.clone(),
        at: crate::clock::unix_ms(),
        path: t.path.clone(),
        line,
        text: t.found.text.clone(),
        rank: t.rank,
        instruction: t.found.instruction.clone(),
        edit: edit.clone(),
        error: error.clone(),
    };
    let fsync = env.fsync;
    match repo
        .run(move |ctx| append_log(ctx.repo.path(), &ran, fsync))
        .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(repo = %label, error = %e, "cannot write the trigger log"),
        Err(e) => warn!(repo = %label, error = %e.message, "cannot write the trigger log"),
    }
    let _ = env.events.send(Event::TriggerFinished {
        repo: label,
        trigger: t.id,
        path: t.path,
        line,
        edit,
        error,
    });
}

/// What the model is asked: the instruction, where it is, and that the comment line is not
/// its to edit (the daemon removes it in the same edit).
fn prompt(t: &Pending) -> String {
    format!(
        "Do what this comment in {path} (line {line}) asks: {instruction}\n\
         The code it is about is lines {start}-{end} of {path}. The comment is an instruction, \
         not code: spark removes its line itself, so leave that line out of your patch.",
        path = t.path,
        line = t.found.line + 1,
        instruction = t.found.instruction,
        start = t.focus.0 + 1,
        end = t.focus.1 + 1,
    )
}

/// A short id for a trigger, unique enough to tell its two events and its log line apart.
fn new_id(path: &str, text: &str) -> String {
    use std::hash::{Hash as _, Hasher as _};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::hash::DefaultHasher::new();
    (path, text, NEXT.fetch_add(1, Ordering::Relaxed)).hash(&mut h);
    crate::clock::unix_ms().hash(&mut h);
    std::process::id().hash(&mut h);
    format!("t-{:08x}", h.finish() as u32)
}

/// The file's syntax and text, through the edit target checks (deny-listed, ignored,
/// submodule, symlink out of the worktree), the context size limit and the text check.
fn guarded_text(ctx: &RepoCtx<'_>, rel: &str) -> Result<(&'static comment::Syntax, String), Skip> {
    let syntax = comment::syntax_for(rel).ok_or(Skip::Syntax)?;
    let rel = paths::validate_rel_path(rel)?;
    let abs = paths::check_in(ctx, &rel, Intent::Modify)?;
    let meta = match std::fs::metadata(&abs) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Skip::Gone),
        Err(e) => return Err(e.into()),
    };
    let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    if len > MAX_FILE_BYTES {
        return Err(Skip::TooLarge(len));
    }
    let bytes = std::fs::read(&abs)?;
    if bytes.contains(&0) {
        return Err(Skip::Binary);
    }
    let text = String::from_utf8(bytes).map_err(|_| Skip::Binary)?;
    Ok((syntax, text))
}

fn log_path(git_dir: &Path) -> PathBuf {
    git_dir.join("spark").join(LOG_FILE)
}

/// Every trigger that ran in this worktree, oldest first. A torn last line (a crash while
/// appending) is skipped.
fn read_log(git_dir: &Path) -> io::Result<Vec<Ran>> {
    let text = match std::fs::read_to_string(log_path(git_dir)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

fn append_log(git_dir: &Path, ran: &Ran, fsync: bool) -> Result<(), EditError> {
    let path = log_path(git_dir);
    let io = |e| EditError::io("append to the trigger log", &path, e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut line = serde_json::to_vec(ran).map_err(|e| io(io::Error::other(e)))?;
    line.push(b'\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io)?;
    file.write_all(&line).map_err(io)?;
    if fsync {
        file.sync_data().map_err(io)?;
    }
    Ok(())
}

fn load_enabled(state_dir: &Path) -> io::Result<BTreeSet<PathBuf>> {
    let text = match std::fs::read(state_dir.join(ENABLED_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(e),
    };
    let file: EnabledFile =
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if file.version != ENABLED_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "version {} (this daemon writes {ENABLED_VERSION})",
                file.version
            ),
        ));
    }
    Ok(file.repos.into_iter().collect())
}

/// Replace the list atomically (temp file, then rename), as `watched.json` is.
fn save_enabled(state_dir: &Path, repos: &[PathBuf]) -> io::Result<()> {
    let file = EnabledFile {
        version: ENABLED_VERSION,
        repos: repos.to_vec(),
    };
    let mut text = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
    text.push(b'\n');
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(format!(".{ENABLED_FILE}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, &text)?;
    std::fs::rename(&tmp, state_dir.join(ENABLED_FILE)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_enabled_list_round_trips_and_survives_a_new_instance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Triggers::new(dir.path(), false);
        assert!(!t.enabled(Path::new("/r")));
        assert!(t.set(Path::new("/r"), true).expect("set"));
        assert!(Triggers::new(dir.path(), false).enabled(Path::new("/r")));
        assert!(!t.set(Path::new("/r"), false).expect("unset"));
        // Unchanged (what `unwatch` does for a repository without triggers): answered at once.
        assert!(!t.set(Path::new("/r"), false).expect("unset again"));
        assert!(!Triggers::new(dir.path(), false).enabled(Path::new("/r")));
        // Configured for every repository: on whatever the list says.
        assert!(Triggers::new(dir.path(), true).enabled(Path::new("/other")));
    }

    #[test]
    fn the_log_keeps_every_trigger_and_lists_the_failed_newest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ran = |id: &str, at, error: Option<&str>| Ran {
            id: id.into(),
            at,
            path: "a.py".into(),
            line: 2,
            text: "# x spark!".into(),
            rank: 0,
            instruction: "x".into(),
            edit: error.is_none().then(|| "abcd1234".into()),
            error: error.map(Into::into),
        };
        append_log(dir.path(), &ran("t-1", 10, Some("no key")), false).expect("append");
        append_log(dir.path(), &ran("t-2", 20, None), false).expect("append");
        // A torn line from a crash is skipped.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(log_path(dir.path()))
            .expect("open");
        f.write_all(b"{\"id\":\"t-").expect("write");
        let log = read_log(dir.path()).expect("read");
        assert_eq!(log.len(), 2);
        let edits = vec![LogEntry {
            id: "e1".into(),
            at: 15,
            state: EditState::Applied,
            source: "ask".into(),
            message: "m".into(),
            files: vec![],
            reason: None,
        }];
        let failed: Vec<LogEntry> = log
            .into_iter()
            .filter(|r| r.error.is_some())
            .map(|r| LogEntry {
                id: r.id,
                at: r.at,
                state: EditState::Failed,
                source: "trigger".into(),
                message: r.instruction,
                files: vec![r.path],
                reason: r.error,
            })
            .collect();
        let merged = merge_log(edits, failed, 10);
        let ids: Vec<&str> = merged.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["e1", "t-1"]);
        assert_eq!(
            merge_log(merged.clone(), vec![merged[1].clone()], 1).len(),
            1
        );
    }
}
