//! `sparkctl mcp`: a Model Context Protocol server on stdio, so that other agents (Codex CLI,
//! Claude Code, Zed, …) make their file edits through spark. Each tool forwards to one daemon
//! method over the local socket (starting the daemon as every command does), and renders the
//! answer as a few lines a model can act on. The protocol itself is the official SDK's (`rmcp`);
//! stdout carries only its frames, everything else goes to stderr.
//!
//! Adding a tool is an arguments struct (its doc comments are the schema a model reads) and one
//! `#[tool]` method calling [`SparkTools::forward`] with the method, its params and a renderer.

use std::path::{Path, PathBuf};

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{Peer, RoleServer, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use spark_proto::layout::Layout;
use spark_proto::methods::{
    ApplyParams, EditApply, EditLog, EditParams, EditResult, EditShow, EditState, EditUndo,
    FileChange, HistoryList, HistoryListParams, HistoryListResult, HistoryRestore,
    HistoryRestoreParams, LogEntry, LogParams, LogResult, Method, ShowResult,
};

use crate::{ClientError, autostart};

/// The name this server gives the daemon in its handshake.
const DAEMON_CLIENT_NAME: &str = "sparkctl mcp";
/// Longest client name kept in an edit's source; longer names are cut.
const MAX_CLIENT_NAME: usize = 40;
/// Most diff bytes a `show` or a dry run returns: a model's context is the scarce resource.
const MAX_DIFF_BYTES: usize = 48 * 1024;
/// How long, after the client closed the session, blocking work may still run before exit.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_millis(500);
/// Edits `log` lists when the caller does not say.
const DEFAULT_LOG_LIMIT: u32 = 10;

const INSTRUCTIONS: &str = "spark applies file edits all-or-nothing and records each one as an \
undoable checkpoint (a stash-shaped git commit; the user's HEAD, index and branches are never \
touched). Make every file change with `apply_patch`; a refused patch changes nothing and the \
result says why, with the closest lines of the file. `log` lists recent edits, `show` prints one \
as a diff, `undo` reverts one.";

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("MCP session did not start: {0}")]
    Initialize(String),
    #[error("MCP session ended abnormally: {0}")]
    Session(String),
}

impl McpError {
    /// One line telling the user what to do next.
    pub fn hint(&self) -> &'static str {
        match self {
            McpError::Runtime(_) => "the system is out of threads or file descriptors",
            McpError::Initialize(_) | McpError::Session(_) => {
                "an MCP host (Codex CLI, Claude Code, Zed, …) starts `sparkctl mcp` and speaks the protocol on its stdin; the README shows how to add it"
            }
        }
    }
}

/// Serve MCP on stdin/stdout until the client closes it. `dir` (absolute) is where tool calls
/// without a `cwd` argument run.
pub fn run(layout: Layout, dir: PathBuf) -> Result<(), McpError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(McpError::Runtime)?;
    let result = runtime.block_on(serve(SparkTools::new(layout, dir)));
    // A daemon start still in progress (bounded by autostart's own timeouts) must not hold the
    // exit once the client has gone.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

async fn serve(tools: SparkTools) -> Result<(), McpError> {
    eprintln!(
        "sparkctl mcp: serving MCP on stdio for {}",
        tools.dir.display()
    );
    let layout = tools.layout.clone();
    let running = tools
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| McpError::Initialize(e.to_string()))?;
    // A host is there: start the daemon while it lists the tools, so the first edit is warm. A
    // failure here is reported again, to the model, by the first tool call.
    tokio::task::spawn_blocking(move || {
        if let Err(e) = autostart::connect(&layout, DAEMON_CLIENT_NAME) {
            eprintln!("sparkctl mcp: sparkd is not reachable yet: {e}");
        }
    });
    running
        .waiting()
        .await
        .map_err(|e| McpError::Session(e.to_string()))?;
    Ok(())
}

/// The MCP service: the tool table and where its calls go.
#[derive(Debug, Clone)]
pub struct SparkTools {
    layout: Layout,
    dir: PathBuf,
    tool_router: ToolRouter<SparkTools>,
}

/// Arguments of `apply_patch`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ApplyPatchArgs {
    /// The patch text, in either format. (1) apply_patch: starts with the line `*** Begin Patch`,
    /// ends with `*** End Patch`; between them `*** Update File: PATH` (then hunks: an `@@` line,
    /// context lines starting with a space, removed lines with `-`, added lines with `+`),
    /// `*** Add File: PATH` (every line starting with `+`) or `*** Delete File: PATH`.
    /// (2) SEARCH/REPLACE: the file path on its own line, then `<<<<<<< SEARCH`, the exact
    /// current lines, `=======`, the new lines, `>>>>>>> REPLACE`. Paths are relative to `cwd`.
    /// All files change or none do.
    pub patch: String,
    /// One line saying what the edit does; shown by `log` and `git stash list`.
    #[serde(default)]
    pub message: Option<String>,
    /// true: check the patch and return the diff it would make, writing nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// A directory inside the repository (absolute, or relative to the server's directory).
    /// Default: the directory the server runs in.
    #[serde(default)]
    pub cwd: Option<String>,
}

/// Arguments of `undo` and `show`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct EditArgs {
    /// Edit id from `apply_patch` or `log` (a unique prefix of at least 4 hex digits is
    /// enough). Default: the latest applied edit.
    #[serde(default)]
    pub edit: Option<String>,
    /// A directory inside the repository (absolute, or relative to the server's directory).
    /// Default: the directory the server runs in.
    #[serde(default)]
    pub cwd: Option<String>,
}

/// Arguments of `log`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct LogArgs {
    /// List at most this many edits, newest first (default 10).
    #[serde(default)]
    pub limit: Option<u32>,
    /// A directory inside the repository (absolute, or relative to the server's directory).
    /// Default: the directory the server runs in.
    #[serde(default)]
    pub cwd: Option<String>,
}

/// Arguments of `history`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct HistoryArgs {
    /// A file (relative to `cwd`): its versions. Default: every snapshot of the repository
    /// (which files changed when).
    #[serde(default)]
    pub path: Option<String>,
    /// Only versions since then: a duration back from now (`10m`, `2h`, `3d`) or a time
    /// (`2026-05-01T14:30:00Z`).
    #[serde(default)]
    pub since: Option<String>,
    /// At most this many versions, newest first (default 20).
    #[serde(default)]
    pub limit: Option<u32>,
    /// A directory inside the repository (absolute, or relative to the server's directory).
    /// Default: the directory the server runs in.
    #[serde(default)]
    pub cwd: Option<String>,
}

/// Arguments of `restore`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct RestoreArgs {
    /// The file to put back (relative to `cwd`); a deleted file can be restored too.
    pub path: String,
    /// Which version: an id from `history` (6+ hex digits), a duration back from now (`10m`)
    /// or a time (`2026-05-01T14:30:00Z`), meaning the newest version at or before then.
    pub at: String,
    /// true: return the diff the restore would make, writing nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// A directory inside the repository (absolute, or relative to the server's directory).
    /// Default: the directory the server runs in.
    #[serde(default)]
    pub cwd: Option<String>,
}

#[tool_router]
impl SparkTools {
    pub fn new(layout: Layout, dir: PathBuf) -> SparkTools {
        SparkTools {
            layout,
            dir,
            tool_router: Self::tool_router(),
        }
    }

    // Not destructive: every edit can be undone, and a refused one writes nothing.
    #[tool(
        description = "Apply a patch to files in the repository, all files or none, and record it as an undoable edit. Accepts the apply_patch format (*** Begin Patch … *** End Patch) or SEARCH/REPLACE blocks. Returns the edit id and the files changed, or why nothing was written, with the file's closest lines.",
        annotations(
            title = "Apply a patch",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn apply_patch(
        &self,
        Parameters(args): Parameters<ApplyPatchArgs>,
        peer: Peer<RoleServer>,
    ) -> CallToolResult {
        let source = source_name(
            peer.peer_info()
                .map(|i| i.client_info.name.clone())
                .as_deref(),
        );
        let dry_run = args.dry_run;
        self.forward::<EditApply>(
            args.cwd.as_deref(),
            |cwd| ApplyParams {
                cwd,
                patch: args.patch,
                dry_run,
                source: Some(source),
                message: args.message,
            },
            move |r| render_edit(&r, if dry_run { "would apply" } else { "applied" }),
        )
        .await
    }

    #[tool(
        description = "Revert an edit made through spark (default: the latest applied one). Changes made since to other lines are kept; if the same lines changed since, nothing is written and the result says so.",
        annotations(
            title = "Undo an edit",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn undo(&self, Parameters(args): Parameters<EditArgs>) -> CallToolResult {
        self.forward::<EditUndo>(
            args.cwd.as_deref(),
            |cwd| EditParams { cwd, id: args.edit },
            |r| render_edit(&r, "undid"),
        )
        .await
    }

    #[tool(
        description = "List the repository's recent edits made through spark, newest first: id, state (applied, undone, stashed, reverted_outside), who made it, age, files and message.",
        annotations(title = "List edits", read_only_hint = true, open_world_hint = false)
    )]
    async fn log(&self, Parameters(args): Parameters<LogArgs>) -> CallToolResult {
        let now = now_ms();
        self.forward::<EditLog>(
            args.cwd.as_deref(),
            |cwd| LogParams {
                cwd,
                limit: Some(args.limit.unwrap_or(DEFAULT_LOG_LIMIT)),
            },
            move |r| render_log(&r, now),
        )
        .await
    }

    #[tool(
        description = "List the local history spark keeps of the repository's files (every settled change by any writer, and each file right before spark edits it), newest first: version id, age, who prompted it, and the files with +/- line counts. With a path, only that file's versions.",
        annotations(
            title = "Local history",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn history(&self, Parameters(args): Parameters<HistoryArgs>) -> CallToolResult {
        let now = now_ms();
        self.forward::<HistoryList>(
            args.cwd.as_deref(),
            |cwd| HistoryListParams {
                cwd,
                path: args.path,
                since: args.since,
                limit: Some(args.limit.unwrap_or(DEFAULT_LOG_LIMIT)),
            },
            move |r| render_history(&r, now),
        )
        .await
    }

    // Not destructive: the restore is a recorded edit that `undo` reverts, and the content it
    // replaces stays in the history.
    #[tool(
        description = "Put a file back as it was at a version of the local history (an id from `history`, or a time), as a recorded edit that the `undo` tool reverts. Works for deleted files too.",
        annotations(
            title = "Restore a file",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn restore(&self, Parameters(args): Parameters<RestoreArgs>) -> CallToolResult {
        let dry_run = args.dry_run;
        self.forward::<HistoryRestore>(
            args.cwd.as_deref(),
            |cwd| HistoryRestoreParams {
                cwd,
                path: args.path,
                at: args.at,
                dry_run,
            },
            move |r| render_edit(&r, if dry_run { "would restore" } else { "restored" }),
        )
        .await
    }

    #[tool(
        description = "Show one edit made through spark (default: the latest) as a unified diff, exactly as `git stash show -p` prints it.",
        annotations(title = "Show an edit", read_only_hint = true, open_world_hint = false)
    )]
    async fn show(&self, Parameters(args): Parameters<EditArgs>) -> CallToolResult {
        self.forward::<EditShow>(
            args.cwd.as_deref(),
            |cwd| EditParams { cwd, id: args.edit },
            |r| render_show(&r),
        )
        .await
    }
}

impl SparkTools {
    /// Call `M` on the daemon in the directory `cwd` names, and turn the answer into a tool
    /// result: `render`'s text, or the refusal (message, closest lines, hint) marked as an error.
    async fn forward<M: Method>(
        &self,
        cwd: Option<&str>,
        params: impl FnOnce(String) -> M::Params,
        render: impl FnOnce(M::Result) -> String + Send + 'static,
    ) -> CallToolResult
    where
        M::Params: Send + 'static,
        M::Result: Send + 'static,
    {
        let dir = resolve_dir(&self.dir, cwd);
        let params = params(dir.display().to_string());
        let layout = self.layout.clone();
        // The socket client blocks; one short call per tool call on a blocking thread.
        let answer = tokio::task::spawn_blocking(move || {
            let mut conn = autostart::connect(&layout, DAEMON_CLIENT_NAME)?;
            conn.client.call::<M>(&params)
        })
        .await;
        match answer {
            Ok(Ok(result)) => CallToolResult::success(vec![ContentBlock::text(render(result))]),
            Ok(Err(e)) => CallToolResult::error(vec![ContentBlock::text(render_error(
                &e,
                &self.layout.log_file,
            ))]),
            Err(e) => CallToolResult::error(vec![ContentBlock::text(format!(
                "failed: the call to sparkd did not finish: {e}"
            ))]),
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for SparkTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("spark", crate::VERSION))
            .with_instructions(INSTRUCTIONS)
    }
}

/// The source recorded with an edit: `mcp:` and the MCP client's name from its `initialize`
/// (`clientInfo.name`), reduced to characters that read well in `log` and `git stash list`.
/// Clients that call themselves `<agent>-mcp-client` (Codex CLI does) are recorded as the agent.
pub fn source_name(client: Option<&str>) -> String {
    let raw = client.unwrap_or("").trim();
    let raw = raw.strip_suffix("-mcp-client").unwrap_or(raw);
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_CLIENT_NAME)
        .collect();
    let name = name.trim_matches('-');
    if name.is_empty() {
        "mcp".to_owned()
    } else {
        format!("mcp:{name}")
    }
}

/// A tool's `cwd` argument: absolute as given, relative to the server's directory otherwise.
fn resolve_dir(base: &Path, cwd: Option<&str>) -> PathBuf {
    match cwd.map(str::trim).filter(|c| !c.is_empty()) {
        None => base.to_owned(),
        Some(c) => base.join(c),
    }
}

fn render_edit(r: &EditResult, verb: &str) -> String {
    let (added, removed) = r
        .files
        .iter()
        .fold((0, 0), |(a, d), f| (a + f.added, d + f.removed));
    let mut out = match &r.edit {
        Some(id) => format!(
            "{verb} edit {id}: {} file{}, +{added} -{removed}\n",
            r.files.len(),
            plural(r.files.len())
        ),
        None if r.files.is_empty() => {
            return "nothing to change: the files already hold this content".to_owned();
        }
        None => format!(
            "{verb} (dry run, nothing written): {} file{}, +{added} -{removed}\n",
            r.files.len(),
            plural(r.files.len())
        ),
    };
    for f in &r.files {
        let mark = match f.change {
            FileChange::Added => "A",
            FileChange::Deleted => "D",
            FileChange::Modified => "M",
        };
        out += &format!("  {mark} {} (+{} -{})\n", f.path, f.added, f.removed);
    }
    match &r.edit {
        Some(id) if verb == "applied" => {
            out += &format!("to revert it: the `undo` tool with edit \"{id}\"");
        }
        Some(_) => {}
        None => out += &cut_diff(&r.diff, None),
    }
    out.trim_end().to_owned()
}

fn render_log(r: &LogResult, now: u64) -> String {
    if r.edits.is_empty() {
        return format!("no edits yet in {}", r.repo);
    }
    let mut out = format!("edits in {}, newest first:\n", r.repo);
    for e in &r.edits {
        out += &log_line(e, now);
        out.push('\n');
    }
    out.trim_end().to_owned()
}

fn render_history(r: &HistoryListResult, now: u64) -> String {
    if r.versions.is_empty() {
        return match &r.path {
            Some(p) => format!("no versions of {p} in the local history"),
            None => format!("no versions in the local history of {}", r.repo),
        };
    }
    let mut out = match &r.path {
        Some(p) => format!("versions of {p}, newest first:\n"),
        None => format!("local history of {}, newest first:\n", r.repo),
    };
    for v in &r.versions {
        let files: Vec<String> = v
            .files
            .iter()
            .map(|f| format!("{} {} (+{} -{})", f.change, f.path, f.added, f.removed))
            .collect();
        out += &format!(
            "{}  {} ago  {}  {}\n",
            v.id,
            age(now.saturating_sub(v.at)),
            v.source,
            files.join(", ")
        );
    }
    out += "to put a version back: the `restore` tool with the path and `at` set to its id";
    out
}

fn log_line(e: &LogEntry, now: u64) -> String {
    let mut line = format!(
        "{}  {}  {}  {} ago  {}",
        e.id,
        e.state.as_str(),
        e.source,
        age(now.saturating_sub(e.at)),
        e.files.join(", ")
    );
    let message = e.message.lines().next().unwrap_or("").trim();
    if !message.is_empty() {
        line += &format!("  \"{message}\"");
    }
    // A failed `spark!` trigger left its comment in place: say why.
    if let Some(reason) = &e.reason {
        line += &format!("  ({})", reason.lines().next().unwrap_or("").trim());
    }
    line
}

fn render_show(r: &ShowResult) -> String {
    let head = match &r.entry {
        Some(e) => {
            let state = match e.state {
                EditState::Applied => "applied",
                EditState::Undone => "undone",
                EditState::Stashed => "stashed",
                EditState::RevertedOutside => "reverted outside spark",
                EditState::Failed => "failed",
            };
            let message = e.message.lines().next().unwrap_or("").trim();
            format!("edit {} ({state}, by {}): {message}\n", r.id, e.source)
        }
        None => format!("edit {}\n", r.id),
    };
    head + &cut_diff(&r.diff, Some(&r.id))
}

/// The diff, cut at [`MAX_DIFF_BYTES`] on a line boundary with a note saying how to see all.
fn cut_diff(diff: &str, id: Option<&str>) -> String {
    if diff.len() <= MAX_DIFF_BYTES {
        return diff.to_owned();
    }
    // A line boundary is a char boundary, so slicing at one after '\n' is safe.
    let cut = diff.as_bytes()[..MAX_DIFF_BYTES]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let whole = match id {
        Some(id) => format!("`git stash show -p {id}` prints all of it"),
        None => "apply it, then `show` the edit".to_owned(),
    };
    format!(
        "{}[diff cut at {} of {} bytes; {whole}]\n",
        &diff[..cut],
        cut,
        diff.len()
    )
}

/// A failed call as the model should read it: what happened, the closest lines, what to do.
fn render_error(e: &ClientError, log: &Path) -> String {
    let verdict = match e.exit_code() {
        1 => "refused, nothing was written",
        _ => "failed",
    };
    let mut out = format!("{verdict}: {e}\n");
    if let ClientError::Rpc(rpc) = e
        && let Some(lines) = rpc.closest()
    {
        out += "closest lines in the file as it is now (line numbers on the left):\n";
        out += lines;
    }
    if let Some(hint) = e.hint(log) {
        out += &format!("hint: {hint}\n");
    }
    out.trim_end().to_owned()
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spark_proto::methods::FileChangeSummary;

    #[test]
    fn source_names_the_mcp_client() {
        assert_eq!(source_name(Some("codex-mcp-client")), "mcp:codex");
        assert_eq!(source_name(Some("claude-code")), "mcp:claude-code");
        assert_eq!(source_name(Some("Zed Editor")), "mcp:Zed-Editor");
        assert_eq!(source_name(Some("  ")), "mcp");
        assert_eq!(source_name(None), "mcp");
        assert_eq!(
            source_name(Some(&"x".repeat(100))).len(),
            4 + MAX_CLIENT_NAME
        );
    }

    #[test]
    fn cwd_argument_is_absolute_or_relative_to_the_server_dir() {
        let base = Path::new("/r/w");
        assert_eq!(resolve_dir(base, None), PathBuf::from("/r/w"));
        assert_eq!(resolve_dir(base, Some("")), PathBuf::from("/r/w"));
        assert_eq!(resolve_dir(base, Some("sub")), PathBuf::from("/r/w/sub"));
        assert_eq!(resolve_dir(base, Some("/o")), PathBuf::from("/o"));
    }

    #[test]
    fn applied_edit_names_id_files_and_how_to_undo() {
        let r = EditResult {
            edit: Some("1a2b3c4d".into()),
            repo: "/r".into(),
            files: vec![FileChangeSummary {
                path: "src/lib.rs".into(),
                change: FileChange::Modified,
                added: 2,
                removed: 1,
            }],
            diff: "--- a\n+++ b\n".into(),
            total_ms: 1.0,
        };
        assert_eq!(
            render_edit(&r, "applied"),
            "applied edit 1a2b3c4d: 1 file, +2 -1\n  M src/lib.rs (+2 -1)\nto revert it: the `undo` tool with edit \"1a2b3c4d\""
        );
        let dry = EditResult { edit: None, ..r };
        let text = render_edit(&dry, "would apply");
        assert!(text.starts_with("would apply (dry run, nothing written): 1 file"));
        assert!(text.ends_with("+++ b"), "{text}");
    }

    #[test]
    fn long_diffs_are_cut_on_a_line_boundary() {
        let diff = "+é line\n".repeat(MAX_DIFF_BYTES / 4);
        let cut = cut_diff(&diff, Some("abcd1234"));
        assert!(cut.len() < MAX_DIFF_BYTES + 200);
        let (kept, note) = cut.rsplit_once("[diff cut at ").expect("note");
        assert!(kept.ends_with("+é line\n"));
        assert!(note.contains("`git stash show -p abcd1234`"), "{note}");
        assert_eq!(cut_diff("small\n", None), "small\n");
    }
}
