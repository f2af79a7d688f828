//! One type per method: its wire name, params and result. Clients call through [`Method`] so a
//! method's name and types cannot drift apart.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{ErrorCode, RpcError};

/// A JSON-RPC method of the local socket.
pub trait Method {
    /// The wire name, e.g. `"status"`.
    const NAME: &'static str;
    type Params: Serialize + DeserializeOwned;
    type Result: Serialize + DeserializeOwned;
}

macro_rules! methods {
    ($($(#[$doc:meta])* $ty:ident, $name:literal, $params:ty, $result:ty;)*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy)]
            pub enum $ty {}
            impl Method for $ty {
                const NAME: &'static str = $name;
                type Params = $params;
                type Result = $result;
            }
        )*

        /// A request with its params parsed, one variant per method of the list above, so a
        /// server's `match` on it is exhaustive: a method added to the list does not compile
        /// until it has a handler.
        #[derive(Debug, Clone)]
        pub enum ClientRequest {
            $($ty($params),)*
        }

        impl ClientRequest {
            /// The names of every method, in the order of the list.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            /// Parses a request's params by its method name. Params must be an object (named
            /// params) or absent (read as `{}`).
            pub fn parse(method: &str, params: Option<serde_json::Value>) -> Result<Self, RpcError> {
                match method {
                    $($name => parse_params::<$ty>(params).map(ClientRequest::$ty),)*
                    other => Err(RpcError::new(
                        ErrorCode::MethodNotFound,
                        // Escaped: the name is the client's, and may hold a newline or a control character.
                        format!("unknown method `{}`", other.escape_debug()),
                    )
                    .with_hint("see docs/protocol.md for the methods of this protocol version")),
                }
            }

            /// The request's wire name.
            pub fn name(&self) -> &'static str {
                match self {
                    $(ClientRequest::$ty(_) => $ty::NAME,)*
                }
            }
        }
    };
}

fn parse_params<M: Method>(params: Option<serde_json::Value>) -> Result<M::Params, RpcError> {
    let params = params.unwrap_or_else(|| serde_json::Value::Object(Default::default()));
    if !params.is_object() {
        // serde would read a struct from an array; spark's methods take named params only.
        return Err(RpcError::new(
            ErrorCode::InvalidParams,
            format!("params of `{}` must be an object (named params)", M::NAME),
        ));
    }
    serde_json::from_value::<M::Params>(params).map_err(|e| {
        RpcError::new(
            ErrorCode::InvalidParams,
            format!("invalid params for `{}`: {e}", M::NAME),
        )
    })
}

methods! {
    /// `initialize` → [`InitializeResult`]. Must be the first request on a connection.
    Initialize, "initialize", InitializeParams, InitializeResult;
    /// `status` → [`StatusResult`]: the daemon, its repositories, sessions and cache.
    Status, "status", Empty, StatusResult;
    /// `shutdown` → [`Empty`]: answered, then the daemon drains and exits.
    Shutdown, "shutdown", Empty, Empty;
    /// `subscribe` → [`Empty`]: the connection then receives `event` notifications.
    Subscribe, "subscribe", Empty, Empty;
    /// `edit/apply` → [`EditResult`]: apply a patch (apply_patch or SEARCH/REPLACE) and record it.
    EditApply, "edit/apply", ApplyParams, EditResult;
    /// `edit/log` → [`LogResult`]: the repository's edits, newest first.
    EditLog, "edit/log", LogParams, LogResult;
    /// `edit/show` → [`ShowResult`]: one edit's diff.
    EditShow, "edit/show", EditParams, ShowResult;
    /// `edit/undo` → [`EditResult`]: revert an edit in the worktree, keeping later changes.
    EditUndo, "edit/undo", EditParams, EditResult;
    /// `edit/stash` → [`EditResult`]: move an edit onto `git stash` (worktree reverted).
    EditStash, "edit/stash", EditParams, EditResult;
    /// `watch` → [`WatchResult`]: keep a repository's context current (and its session warm).
    Watch, "watch", WatchParams, WatchResult;
    /// `unwatch` → [`WatchChange`]: stop watching a repository.
    Unwatch, "unwatch", WatchParams, WatchChange;
    /// `refresh` → [`WatchChange`]: rescan a watched repository now (git hooks call it after
    /// a checkout, merge or rebase); `was_watched` tells whether it was watched.
    Refresh, "refresh", WatchParams, WatchChange;
    /// `ask` → [`AskResult`]: ask the model for an edit; streams `ask/progress` notifications.
    Ask, "ask", AskParams, AskResult;
    /// `cancel` → [`CancelResult`]: stop the `ask` in flight in a repository, whichever
    /// connection sent it. That `ask` then answers `cancelled` if it stopped before applying
    /// anything, or with its edit if the edit had already landed.
    Cancel, "cancel", CancelParams, CancelResult;
    /// `commit/draft` → [`DraftResult`]: a commit message drafted from the staged diff (the
    /// `prepare-commit-msg` hook asks for it), in a one-off conversation of its own.
    CommitDraft, "commit/draft", DraftParams, DraftResult;
    /// `history/list` → [`HistoryListResult`]: the local history of a file, or of the whole
    /// repository (which files changed when), newest first.
    HistoryList, "history/list", HistoryListParams, HistoryListResult;
    /// `history/restore` → [`EditResult`]: put a file back as it was at a version of the
    /// local history, as a recorded edit (`edit/undo` reverts it).
    HistoryRestore, "history/restore", HistoryRestoreParams, EditResult;
    /// `history/diff` → [`HistoryDiffResult`]: what changed in the worktree since a time, all
    /// writers together, as a unified diff.
    HistoryDiff, "history/diff", HistoryDiffParams, HistoryDiffResult;
    /// `triggers/set` → [`TriggersResult`]: turn `spark!` comment triggers on or off for a
    /// repository (remembered across restarts; `unwatch` turns them off).
    TriggersSet, "triggers/set", TriggersParams, TriggersResult;
}

/// Params of [`TriggersSet`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggersParams {
    /// An absolute directory inside the repository.
    pub dir: String,
    pub enabled: bool,
}

/// Result of [`TriggersSet`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggersResult {
    pub repo: String,
    /// Whether triggers now run there (also true when `config.toml` turns them on everywhere).
    pub enabled: bool,
}

/// Params of [`CommitDraft`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DraftParams {
    /// Absolute directory inside the repository whose staged changes are described.
    pub cwd: String,
    /// The committing shell's provider settings, as with `ask`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderSettings>,
}

/// Result of [`CommitDraft`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DraftResult {
    /// The drafted message, without git's comment lines.
    pub message: String,
    /// Staged paths whose diff was shown to the model.
    pub files: Vec<String>,
    /// Staged paths left out (deny-listed, ignored, binary or oversized).
    #[serde(default)]
    pub omitted: Vec<String>,
}

/// Params of [`Cancel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelParams {
    /// Absolute directory inside the repository (as for `ask`).
    pub cwd: String,
}

/// Result of [`Cancel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelResult {
    pub repo: String,
    /// Whether an `ask` was in flight in the repository and was told to stop.
    pub cancelled: bool,
}

/// Params or result with no fields: `{}` (a missing `params` is accepted too).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// Who is calling, for the daemon's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub name: String,
    pub version: String,
}

/// Params of [`Initialize`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitializeParams {
    /// The [`crate::PROTOCOL_VERSION`] the client speaks.
    pub protocol_version: u32,
    pub client: ClientInfo,
}

/// Result of [`Initialize`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitializeResult {
    pub protocol_version: u32,
    /// The daemon's package version; clients restart a daemon whose version differs from theirs.
    pub daemon_version: String,
    pub pid: u32,
}

/// Result of [`Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResult {
    pub pid: u32,
    pub version: String,
    pub protocol_version: u32,
    /// Unix ms.
    pub started_at: u64,
    pub uptime_ms: u64,
    pub socket: String,
    pub log_file: String,
    /// Open client connections, this one included.
    pub connections: u64,
    pub repos: Vec<RepoStatus>,
    pub sessions: Vec<SessionStatus>,
    pub cache: Option<CacheStatus>,
    /// Each provider's shared WebSocket connection (`stream_id` lanes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provider_connections: Vec<ProviderConnectionStatus>,
}

/// A provider's shared connection: the sessions of every repository (and drafts) talk to it
/// over lanes of one WebSocket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProviderConnectionStatus {
    /// The provider URL (never the key).
    pub url: String,
    /// Shared connections open now (two for a moment while one is replaced).
    pub connections: u64,
    /// Lanes open on them.
    pub lanes: u64,
    /// The provider refused `stream_id` lanes: its sessions have a connection each.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lanes_refused: bool,
}

/// A repository the daemon knows about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RepoStatus {
    pub path: String,
    /// Edits recorded by this daemon since it started.
    pub edits: u64,
    /// Watched: its context is kept current in memory (and survives daemon restarts).
    #[serde(default)]
    pub watched: bool,
    /// The first index is complete.
    #[serde(default)]
    pub indexed: bool,
    /// Files in the outline.
    #[serde(default)]
    pub files: u64,
    /// Directory watches in use.
    #[serde(default)]
    pub watches: u64,
    /// Unix ms of the last filesystem event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_at: Option<u64>,
    /// Why changes may be noticed late (watch limit reached, …); absent when all is well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

/// Params of [`Watch`] and [`Unwatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchParams {
    /// An absolute directory inside the repository.
    pub dir: String,
}

/// Result of [`Watch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchResult {
    pub repo: RepoStatus,
}

/// Result of [`Unwatch`] and [`Refresh`]: the repository, and whether it was watched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchChange {
    pub repo: String,
    /// False if it was not watched.
    pub was_watched: bool,
}

/// A provider session (one per repository and conversation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub repo: String,
    pub connected: bool,
    pub age_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// The provider URL this session talks to (never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The model it asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// WebSocket mode failed with this provider (a refused upgrade, or a socket closed before
    /// its first event): the session uses HTTP + SSE, and tries WebSocket mode again later.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fell_back_to_http: bool,
    /// Failed connection attempts to this provider in a row (shared by its sessions); 0 when
    /// it works.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failures: u32,
    /// Background reconnects have stopped after failures in a row; the next `ask` or `watch`
    /// tries again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Why the last attempt or connection failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When this session tries to connect again, in milliseconds from now; absent when it
    /// waits for a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_in_ms: Option<u64>,
    /// Its lane (`stream_id`) on the provider's shared connection, while it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<String>,
    /// The provider refused lanes: this session has a connection of its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lanes_refused: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The context cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheStatus {
    pub dir: String,
    /// Text files indexed across watched repositories.
    pub entries: u64,
    /// Size on disk.
    pub bytes: u64,
    /// Times it was found corrupt (or of another format) and rebuilt since the daemon started.
    pub rebuilds: u64,
    /// Why the daemon runs without it, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    /// Why it was last discarded and rebuilt, if it ever was since the daemon started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rebuild: Option<String>,
    /// Present while a rebuilt cache is being filled again in the background (requests are
    /// served meanwhile): why it was rebuilt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuilding: Option<String>,
}

/// Params of [`EditApply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyParams {
    /// Absolute directory the client runs in; selects the repository, and relative patch paths
    /// start there.
    pub cwd: String,
    /// The patch text.
    pub patch: String,
    /// Check and show the diff; write nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Who produced the patch (recorded in the ledger), e.g. `apply` or a plugin name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A message for the record (shown by `log`, and in `git stash list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A file an edit touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChangeSummary {
    /// Repository-relative, `/`-separated.
    pub path: String,
    pub change: FileChange,
    pub added: u32,
    pub removed: u32,
}

/// How an edit changed a file (`"added"`, `"modified"` or `"deleted"` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileChange {
    Added,
    Modified,
    Deleted,
}

/// What a streaming patch does to a file (`"add"`, `"update"` or `"delete"` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchOp {
    Add,
    Update,
    Delete,
}

/// Result of [`EditApply`], [`EditUndo`] and [`EditStash`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditResult {
    /// Short id of the edit (`git stash show -p <edit>` shows it); null for a dry run or a
    /// patch that changes nothing.
    pub edit: Option<String>,
    /// The repository's worktree.
    pub repo: String,
    pub files: Vec<FileChangeSummary>,
    /// Unified diff of what was (or, for a dry run, would be) written.
    pub diff: String,
    /// Daemon-side time for the whole request.
    pub total_ms: f64,
}

/// Params of [`EditLog`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogParams {
    pub cwd: String,
    /// At most this many edits (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// Params of [`EditShow`], [`EditUndo`] and [`EditStash`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditParams {
    pub cwd: String,
    /// An edit id (any unique prefix of at least 4 hex digits); default: the latest applied edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// One edit in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub id: String,
    /// Unix ms when it was applied.
    pub at: u64,
    pub state: EditState,
    pub source: String,
    pub message: String,
    pub files: Vec<String>,
    /// Why it failed (`state` `failed`: a `spark!` trigger that left its comment in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where an edit stands, as `edit/log` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EditState {
    /// Its changes are in the worktree (or were changed further since).
    Applied,
    /// Reverted by `edit/undo`.
    Undone,
    /// Moved onto `git stash` by `edit/stash`.
    Stashed,
    /// Recorded as applied, but every file it touched is back to its content before the edit,
    /// undone outside spark (`git checkout -- file`, an editor's undo).
    RevertedOutside,
    /// A `spark!` trigger that changed nothing: its comment is still in place, `reason` says
    /// why, and `id` is the trigger's (`t-` and hex digits), not an edit's.
    Failed,
}

impl EditState {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            EditState::Applied => "applied",
            EditState::Undone => "undone",
            EditState::Stashed => "stashed",
            EditState::RevertedOutside => "reverted_outside",
            EditState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for EditState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl PartialEq<&str> for EditState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Result of [`EditLog`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogResult {
    pub repo: String,
    pub edits: Vec<LogEntry>,
}

/// Result of [`EditShow`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShowResult {
    pub id: String,
    /// Exactly what `git stash show -p <id>` prints.
    pub diff: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<LogEntry>,
}

/// The notification method that streams an `ask` while it runs.
pub const ASK_PROGRESS: &str = "ask/progress";

/// Params of [`Ask`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskParams {
    /// Absolute directory the client runs in: selects the repository; focus paths start there.
    pub cwd: String,
    pub prompt: String,
    /// Files (optionally line ranges) to show the model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub focus: Vec<Focus>,
    /// Show the diff the model proposes; write nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Start a fresh conversation instead of continuing this repository's.
    #[serde(default)]
    pub new_conversation: bool,
    /// The asking shell's provider settings; each one set wins over the daemon's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderSettings>,
    /// An editor's unsaved buffers: the model sees their text instead of the files' bytes, and
    /// an edit to one comes back in [`AskResult::buffer_edits`] instead of being written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buffers: Vec<Buffer>,
}

/// An editor buffer's unsaved text, sent with an `ask`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buffer {
    /// Absolute, or relative to the ask's `cwd`; inside the repository.
    pub path: String,
    /// The buffer's full text.
    pub text: String,
}

/// The text of an unsaved buffer after an `ask`'s edit, for the editor to apply (the file on
/// disk is untouched).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferEdit {
    /// Repository-relative.
    pub path: String,
    pub text: String,
}

/// Provider settings sent with an `ask` (from the client's `SPARK_PROVIDER_URL`, `SPARK_MODEL`,
/// `SPARK_API_KEY`/`OPENAI_API_KEY`). The key travels only over the owner-only socket; the
/// daemon keeps it in memory for the session and never logs or writes it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

impl ProviderSettings {
    /// Whether nothing is set (then the client sends no settings at all).
    pub fn is_empty(&self) -> bool {
        self.url.is_none() && self.model.is_none() && self.api_key.is_none()
    }
}

impl std::fmt::Debug for ProviderSettings {
    // Hand-written so the key never reaches a log line, whoever prints the params.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderSettings")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// A focused file, or a range of its lines (1-based, inclusive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Focus {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_line: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_line: Option<u32>,
}

/// One `ask/progress` notification: `{"request": <ask's id>, "type": …, …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AskProgress {
    /// The id of the `ask` request this belongs to.
    pub request: crate::Id,
    #[serde(flatten)]
    pub event: AskEvent,
}

/// What an `ask` reports while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AskEvent {
    /// Model text as it streams.
    Text { delta: String },
    /// Patch text as it streams (the apply_patch tool's input).
    Patch { delta: String },
    /// A file the streaming patch is about to touch.
    PatchFile { path: String, op: PatchOp },
    /// Output tokens so far.
    Tokens {
        output_tokens: u64,
        tokens_per_s: f64,
    },
    /// The model's patch did not apply (`reason`); the daemon asked it for a corrected one,
    /// `attempt` of the configured limit.
    Repair { attempt: u32, reason: String },
}

/// Result of [`Ask`] (also the last line of `sparkctl ask --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AskResult {
    /// The recorded edit, or null (a text-only answer, or a dry run).
    pub edit: Option<String>,
    pub files: Vec<FileChangeSummary>,
    /// The model's text.
    pub answer: String,
    /// The diff applied (or proposed, for a dry run).
    pub diff: String,
    pub timings: AskTimings,
    /// New text of each buffer sent in [`AskParams::buffers`] that the edit changed; those
    /// files were not written (`edit` records only what was written to disk).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buffer_edits: Vec<BufferEdit>,
}

/// Where an `ask`'s time went, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AskTimings {
    /// Request received → `response.create` written to the provider.
    pub request_ms: f64,
    /// `response.create` written → first output delta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    /// Applying and recording the edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_ms: Option<f64>,
    /// Request received → result sent.
    pub total_ms: f64,
    pub output_tokens: u64,
    /// Bytes of the `response.create` sent for this turn.
    pub bytes_sent: u64,
    /// Whether the turn continued the conversation (`previous_response_id`).
    pub chained: bool,
}

/// Params of [`HistoryList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryListParams {
    /// Absolute directory inside the repository; `path` starts there.
    pub cwd: String,
    /// One file's versions; without it, every snapshot of the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Only versions since then: a duration back from now (`10m`, `2h`, `3d`) or a time
    /// (`2026-05-01T14:30:00Z`, an offset instead of `Z` is fine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// At most this many versions (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// Result of [`HistoryList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryListResult {
    pub repo: String,
    /// The file asked about, relative to the repository root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Newest first.
    pub versions: Vec<HistoryVersion>,
}

/// One snapshot of the local history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryVersion {
    /// The snapshot's id (hex; `history/restore` takes any unique prefix of 6 or more digits).
    pub id: String,
    /// Unix ms when it was taken.
    pub at: u64,
    /// Who prompted it: `watch` (a settled change on disk) or `edit` (right before spark wrote).
    pub source: String,
    /// The files that changed in it (only the asked-for file when a path was given).
    pub files: Vec<HistoryFile>,
}

/// A file as one snapshot changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryFile {
    pub path: String,
    /// `added`, `modified` or `deleted`; `kept` for a file as the oldest retained snapshot
    /// holds it (its earlier history was pruned).
    pub change: String,
    /// Its size in bytes at this version (`None` when deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Lines added and removed against the previous version.
    pub added: u32,
    pub removed: u32,
}

/// Params of [`HistoryRestore`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryRestoreParams {
    /// Absolute directory inside the repository; `path` starts there.
    pub cwd: String,
    pub path: String,
    /// A version id (6+ hex digits), a duration back from now (`10m`) or a time
    /// (`2026-05-01T14:30:00Z`): the file as the newest snapshot at or before then held it.
    pub at: String,
    /// Show the diff; write nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Params of [`HistoryDiff`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryDiffParams {
    /// Absolute directory inside the repository; `path` starts there.
    pub cwd: String,
    /// A duration back from now (`10m`) or a time, as for [`HistoryListParams::since`].
    pub since: String,
    /// Only this file, or the files under this directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Result of [`HistoryDiff`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryDiffResult {
    pub repo: String,
    /// Unix ms of the snapshot the diff starts from (`None`: history starts later, and files
    /// are compared with their committed version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    /// Paths that changed, in order.
    pub files: Vec<String>,
    /// A unified diff (`git diff` style) from then to the worktree now.
    pub diff: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_listed_method_parses_to_its_own_variant() {
        let mut seen = std::collections::HashSet::new();
        for name in ClientRequest::NAMES {
            assert!(seen.insert(name), "{name} listed twice");
            // Wrong params are refused by that method's own parser, naming it.
            let err = ClientRequest::parse(name, Some(json!([]))).expect_err("array params");
            assert_eq!(err.code, ErrorCode::InvalidParams.code(), "{name}");
            assert!(
                err.message.contains(&format!("`{name}`")),
                "{}",
                err.message
            );
        }
        let r = ClientRequest::parse("status", None).expect("absent params read as {}");
        assert!(matches!(r, ClientRequest::Status(Empty {})));
        assert_eq!(r.name(), Status::NAME);
        let r = ClientRequest::parse("edit/show", Some(json!({"cwd": "/r", "id": "abc"})))
            .expect("edit/show");
        assert_eq!(r.name(), "edit/show");
        let ClientRequest::EditShow(p) = r else {
            panic!("edit/show parsed as {}", r.name());
        };
        assert_eq!(p.id.as_deref(), Some("abc"));
    }

    #[test]
    fn change_kinds_and_patch_ops_keep_their_wire_names() {
        let names = |v: Vec<serde_json::Value>| -> Vec<String> {
            v.into_iter()
                .map(|v| v.as_str().expect("a string").to_owned())
                .collect()
        };
        let changes = [FileChange::Added, FileChange::Modified, FileChange::Deleted];
        let ops = [PatchOp::Add, PatchOp::Update, PatchOp::Delete];
        assert_eq!(
            names(changes.iter().map(|c| json!(c)).collect()),
            ["added", "modified", "deleted"]
        );
        assert_eq!(
            names(ops.iter().map(|o| json!(o)).collect()),
            ["add", "update", "delete"]
        );
        let event: AskEvent =
            serde_json::from_value(json!({"type": "patch_file", "path": "a.rs", "op": "update"}))
                .expect("patch_file");
        assert_eq!(
            event,
            AskEvent::PatchFile {
                path: "a.rs".into(),
                op: PatchOp::Update
            }
        );
    }

    #[test]
    fn an_unknown_method_or_field_is_refused_with_its_name() {
        let err = ClientRequest::parse("edit/frobnicate", None).expect_err("unknown");
        assert_eq!(err.code, ErrorCode::MethodNotFound.code());
        assert_eq!(err.message, "unknown method `edit/frobnicate`");
        let err =
            ClientRequest::parse("status", Some(json!({"verbose": true}))).expect_err("extra");
        assert_eq!(err.code, ErrorCode::InvalidParams.code());
        assert!(
            err.message.starts_with("invalid params for `status`: "),
            "{}",
            err.message
        );
    }

    #[test]
    fn empty_params_accept_object_and_refuse_extra_fields() {
        assert_eq!(
            serde_json::from_value::<Empty>(json!({})).expect("empty"),
            Empty {}
        );
        assert!(serde_json::from_value::<Empty>(json!({"x": 1})).is_err());
    }

    #[test]
    fn initialize_round_trips() {
        let p = InitializeParams {
            protocol_version: 1,
            client: ClientInfo {
                name: "sparkctl".into(),
                version: "0.1.0".into(),
            },
        };
        let v = serde_json::to_value(&p).expect("ser");
        assert_eq!(
            v,
            json!({"protocol_version":1,"client":{"name":"sparkctl","version":"0.1.0"}})
        );
        assert_eq!(
            serde_json::from_value::<InitializeParams>(v).expect("de"),
            p
        );
    }

    #[test]
    fn apply_params_default_optional_fields() {
        let p: ApplyParams = serde_json::from_value(json!({"cwd":"/r","patch":"x"})).expect("de");
        assert_eq!(
            p,
            ApplyParams {
                cwd: "/r".into(),
                patch: "x".into(),
                dry_run: false,
                source: None,
                message: None
            }
        );
        assert!(
            serde_json::from_value::<ApplyParams>(json!({"cwd":"/r"})).is_err(),
            "patch is required"
        );
    }

    #[test]
    fn ask_progress_is_flat_and_tagged() {
        let p = AskProgress {
            request: crate::Id::Number(3),
            event: AskEvent::Text { delta: "hi".into() },
        };
        let v = serde_json::to_value(&p).expect("ser");
        assert_eq!(v, json!({"request":3,"type":"text","delta":"hi"}));
        assert_eq!(serde_json::from_value::<AskProgress>(v).expect("de"), p);
    }

    #[test]
    fn provider_settings_are_optional_and_the_key_is_not_debug_printed() {
        let p: AskParams =
            serde_json::from_value(json!({"cwd":"/r","prompt":"x"})).expect("no settings");
        assert_eq!(p.provider, None);
        let p: AskParams = serde_json::from_value(json!({
            "cwd":"/r","prompt":"x",
            "provider":{"url":"ws://127.0.0.1:9/v1/responses","api_key":"sk-very-secret"}
        }))
        .expect("settings");
        let s = p.provider.as_ref().expect("provider");
        assert_eq!(s.model, None);
        assert_eq!(s.api_key.as_deref(), Some("sk-very-secret"));
        assert!(!format!("{p:?}").contains("sk-very-secret"), "{p:?}");
        assert!(
            serde_json::from_value::<AskParams>(
                json!({"cwd":"/r","prompt":"x","provider":{"key":"k"}})
            )
            .is_err(),
            "a misspelt setting is refused, not ignored"
        );
    }

    #[test]
    fn buffers_are_optional_on_the_wire_and_strict() {
        let p: AskParams = serde_json::from_value(json!({"cwd":"/r","prompt":"x"})).expect("de");
        assert!(p.buffers.is_empty());
        assert!(
            !serde_json::to_value(&p)
                .expect("ser")
                .to_string()
                .contains("buffers")
        );
        let p: AskParams = serde_json::from_value(json!({
            "cwd":"/r","prompt":"x","buffers":[{"path":"src/a.rs","text":"fn a() {}\n"}]
        }))
        .expect("buffers");
        assert_eq!(
            p.buffers,
            vec![Buffer {
                path: "src/a.rs".into(),
                text: "fn a() {}\n".into()
            }]
        );
        assert!(
            serde_json::from_value::<AskParams>(
                json!({"cwd":"/r","prompt":"x","buffers":[{"path":"a","text":"","dirty":true}]})
            )
            .is_err(),
            "an unknown buffer field is refused"
        );
        let r: AskResult = serde_json::from_value(json!({
            "edit":null,"files":[],"answer":"","diff":"",
            "timings":{"request_ms":0.0,"total_ms":0.0,"output_tokens":0,"bytes_sent":0,"chained":false}
        }))
        .expect("a result without buffer edits");
        assert!(r.buffer_edits.is_empty());
        assert!(
            !serde_json::to_value(&r)
                .expect("ser")
                .to_string()
                .contains("buffer_edits")
        );
    }

    #[test]
    fn draft_params_take_only_cwd_and_provider() {
        let p: DraftParams = serde_json::from_value(json!({"cwd":"/r"})).expect("de");
        assert_eq!(p.provider, None);
        assert!(serde_json::from_value::<DraftParams>(json!({"cwd":"/r","diff":"x"})).is_err());
        let r: DraftResult =
            serde_json::from_value(json!({"message":"m","files":["a"]})).expect("de");
        assert!(r.omitted.is_empty());
        assert_eq!(CommitDraft::NAME, "commit/draft");
    }

    #[test]
    fn edit_states_have_snake_case_wire_names() {
        for (s, name) in [
            (EditState::Applied, "applied"),
            (EditState::Undone, "undone"),
            (EditState::Stashed, "stashed"),
            (EditState::RevertedOutside, "reverted_outside"),
        ] {
            assert_eq!(serde_json::to_value(s).expect("ser"), json!(name));
            assert_eq!(s, name);
        }
    }

    #[test]
    fn status_round_trips() {
        let s = StatusResult {
            pid: 1,
            version: "0.1.0".into(),
            protocol_version: 1,
            started_at: 2,
            uptime_ms: 3,
            socket: "/s".into(),
            log_file: "/l".into(),
            connections: 1,
            repos: vec![RepoStatus {
                path: "/r".into(),
                edits: 2,
                ..RepoStatus::default()
            }],
            sessions: vec![],
            cache: None,
            provider_connections: vec![ProviderConnectionStatus {
                url: "ws://127.0.0.1:1/v1/responses".into(),
                connections: 1,
                lanes: 10,
                lanes_refused: false,
            }],
        };
        let text = serde_json::to_string(&s).expect("ser");
        assert_eq!(serde_json::from_str::<StatusResult>(&text).expect("de"), s);
    }
}
