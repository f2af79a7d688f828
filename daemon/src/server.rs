//! The local-socket server: accept loop, one task per connection, request dispatch, pushed
//! events and the single shutdown path.
//!
//! Every connection must `initialize` first. Responses and notifications for a connection go
//! through one bounded outbound queue drained by a writer task, so a slow reader slows only
//! itself. Shutdown (signal, `shutdown` request or idle timeout) cancels one root token: the
//! accept loop stops, connections flush what they owe and close, tracked tasks get the drain
//! timeout to finish, and the socket file is removed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::StreamCommon as _;
use interprocess::local_socket::traits::tokio::Listener as _;
use serde::Serialize;
use serde_json::Value;
use spark_proto::events::{EVENT_METHOD, Event};
use spark_proto::frame::{Frame, encode};
use spark_proto::methods::{self, Empty, InitializeResult, Method, StatusResult};
use spark_proto::{
    ErrorCode, Id, MAX_LINE_BYTES, Notification, PROTOCOL_VERSION, Request, Response, RpcError,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::codec::LineDecoder;
use crate::config::Config;
use crate::edit::journal::{Durability, Failpoint};
use crate::edit::{self, EditEnv};
use crate::instance::Instance;
use crate::repo::Repos;

/// Lines queued for one connection's writer; beyond it, the handler waits (backpressure).
const OUTBOUND_CAPACITY: usize = 256;
/// Events buffered per subscriber before the slowest one starts missing them.
const EVENT_CAPACITY: usize = 1024;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// State shared by every connection task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    started: Instant,
    started_at_ms: u64,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    connections: watch::Sender<usize>,
    next_conn: AtomicU64,
    pub(crate) repos: Repos,
    pub(crate) asks: Arc<crate::ask::Asks>,
    pub(crate) watchers: crate::watch::Watchers,
    pub(crate) triggers: crate::trigger::Triggers,
}

/// The edit engine's settings, from the daemon's configuration.
pub(crate) fn edit_env(config: &Config) -> EditEnv {
    EditEnv {
        journal_dir: config.layout.state_dir.join("journal"),
        durability: Durability {
            fsync: config.fsync,
        },
        failpoint: Failpoint(config.failpoint.clone()),
    }
}

pub(crate) async fn serve(config: Config, instance: Instance, shutdown: CancellationToken) {
    let (events, _) = broadcast::channel(EVENT_CAPACITY);
    let tracker = TaskTracker::new();
    let watchers = crate::watch::Watchers::new(
        &config.layout.cache_dir,
        &config.layout.state_dir,
        events.clone(),
        &tracker,
        &shutdown,
        crate::watch::WatchOptions::default(),
    );
    // Repositories watched before the restart are watched again, in the background.
    watchers.restore();
    let asks = Arc::new(crate::ask::Asks::new(
        &config,
        tracker.clone(),
        shutdown.clone(),
        watchers.clone(),
        events.clone(),
    ));
    asks.spawn_idle_sweeper();
    let shared = Arc::new(Shared {
        started: Instant::now(),
        started_at_ms: unix_ms(),
        events,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        connections: watch::Sender::new(0),
        next_conn: AtomicU64::new(1),
        repos: Repos::new(edit_env(&config)),
        asks,
        watchers,
        triggers: crate::trigger::Triggers::new(&config.layout.state_dir, config.triggers),
        config,
    });
    crate::trigger::Triggers::start(&shared);
    info!(socket = %instance.socket.display(), pid = std::process::id(), version = crate::VERSION, "sparkd serving");
    if let Some(idle) = shared.config.idle_timeout {
        shared.tracker.spawn(idle_exit(shared.clone(), idle));
    }
    let my_uid = rustix::process::geteuid().as_raw();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = instance.listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        match stream.peer_creds().map(|c| c.euid()) {
            Ok(Some(uid)) if uid == my_uid => {}
            other => {
                warn!(peer = ?other, "refusing connection from another user");
                continue;
            }
        }
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let open = *shared.connections.borrow();
        if open >= shared.config.max_connections {
            warn!(open, "too many connections; refusing one");
            shared.tracker.spawn(refuse_overloaded(stream));
            continue;
        }
        shared.connections.send_modify(|n| *n += 1);
        let s = shared.clone();
        shared.tracker.spawn(async move {
            Connection::run(s.clone(), stream, id).await;
            s.connections.send_modify(|n| *n -= 1);
        });
    }

    info!("shutting down");
    drop(instance.listener);
    if let Err(e) = std::fs::remove_file(&instance.socket) {
        warn!(error = %e, "cannot remove socket file");
    }
    shared.tracker.close();
    if tokio::time::timeout(shared.config.drain_timeout, shared.tracker.wait())
        .await
        .is_err()
    {
        warn!(timeout = ?shared.config.drain_timeout, "drain timeout reached; abandoning in-flight work");
    }
    info!("stopped");
}

/// Cancel the daemon after `idle` with no open connection.
async fn idle_exit(shared: Arc<Shared>, idle: Duration) {
    let mut count = shared.connections.subscribe();
    loop {
        if count.wait_for(|n| *n == 0).await.is_err() {
            return;
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(idle) => {
                info!(?idle, "idle timeout: no connections; exiting");
                shared.shutdown.cancel();
                return;
            }
            _ = count.wait_for(|n| *n > 0) => {}
        }
    }
}

async fn refuse_overloaded(stream: Stream) {
    let mut tx = &stream;
    let err = RpcError::new(
        ErrorCode::Overloaded,
        "sparkd has too many open connections",
    )
    .with_hint("retry shortly");
    let _ = tx.write_all(&encode(&Response::err(Id::Null, err))).await;
}

/// One client connection.
struct Connection {
    shared: Arc<Shared>,
    id: u64,
    out: mpsc::Sender<Vec<u8>>,
    initialized: bool,
    subscribed: bool,
    /// Cancelled when this connection ends (or the daemon stops): ends its event forwarder.
    closed: CancellationToken,
}

impl Connection {
    async fn run(shared: Arc<Shared>, stream: Stream, id: u64) {
        let stream = Arc::new(stream);
        let (out, out_rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let writer = shared.tracker.spawn(write_loop(stream.clone(), out_rx));
        let mut frames = FramedRead::new(SharedStream(stream), LineDecoder::new(MAX_LINE_BYTES));
        let mut conn = Connection {
            shared: shared.clone(),
            id,
            out,
            initialized: false,
            subscribed: false,
            closed: shared.shutdown.child_token(),
        };
        debug!(conn = id, "connected");
        loop {
            let frame = tokio::select! {
                // Biased: once shutdown starts, nothing more is read, even if lines are queued.
                biased;
                () = shared.shutdown.cancelled() => break,
                f = frames.next() => f,
            };
            let alive = match frame {
                None => false,
                Some(Err(e)) => {
                    debug!(conn = id, error = %e, "read failed");
                    false
                }
                Some(Ok(Frame::Line(line))) => conn.handle_line(&line).await,
                Some(Ok(Frame::TooLong { len })) => {
                    let err = RpcError::new(
                        ErrorCode::LineTooLong,
                        format!(
                            "line of {len} bytes exceeds the limit of {MAX_LINE_BYTES} bytes; it was skipped"
                        ),
                    );
                    conn.send(&Response::err(Id::Null, err)).await
                }
                Some(Ok(Frame::Eof)) => false,
            };
            if !alive {
                break;
            }
        }
        // Stop this connection's event forwarder; dropping the last sender then lets the writer
        // flush what is queued and finish.
        conn.closed.cancel();
        drop(conn);
        let _ = writer.await;
        debug!(conn = id, "closed");
    }

    /// Queue a line for the writer; false once the connection is gone.
    async fn send<T: Serialize>(&self, msg: &T) -> bool {
        self.out.send(encode(msg)).await.is_ok()
    }

    async fn handle_line(&mut self, line: &[u8]) -> bool {
        let value: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                let err = RpcError::new(ErrorCode::ParseError, format!("invalid JSON: {e}"));
                return self.send(&Response::err(Id::Null, err)).await;
            }
        };
        if value.get("id").is_none() && value.get("method").is_some() {
            // A JSON-RPC notification: the spec forbids answering it, and none are defined.
            debug!(conn = self.id, "ignoring client notification");
            return true;
        }
        let id = value
            .get("id")
            .and_then(|v| serde_json::from_value::<Id>(v.clone()).ok())
            .unwrap_or(Id::Null);
        let req: Request = match serde_json::from_value(value) {
            Ok(r) => r,
            Err(e) => {
                let err = RpcError::new(
                    ErrorCode::InvalidRequest,
                    format!("not a JSON-RPC 2.0 request: {e}"),
                );
                return self.send(&Response::err(id, err)).await;
            }
        };
        if req.method == methods::Ask::NAME && self.initialized {
            self.spawn_ask(req.id, req.params);
            return true;
        }
        let response = match self.dispatch(&req.method, req.params).await {
            Ok(result) => Response::ok(req.id, result),
            Err(err) => Response::err(req.id, err),
        };
        self.send(&response).await
    }

    async fn dispatch(&mut self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        if method == methods::Initialize::NAME {
            let p = parse_params::<methods::Initialize>(params)?;
            if p.protocol_version != PROTOCOL_VERSION {
                return Err(RpcError::new(
                    ErrorCode::VersionMismatch,
                    format!(
                        "protocol version mismatch: client {} {} speaks {}, sparkd {} speaks {}",
                        p.client.name,
                        p.client.version,
                        p.protocol_version,
                        crate::VERSION,
                        PROTOCOL_VERSION
                    ),
                )
                .with_hint("restart the daemon with `sparkctl stop`, or upgrade the client"));
            }
            debug!(conn = self.id, client = %p.client.name, version = %p.client.version, "initialized");
            self.initialized = true;
            return to_value(InitializeResult {
                protocol_version: PROTOCOL_VERSION,
                daemon_version: self.shared.config.reported_version.clone(),
                pid: std::process::id(),
            });
        }
        if !self.initialized {
            return Err(RpcError::new(
                ErrorCode::NotInitialized,
                format!("`{method}` before `initialize`: the first request must be `initialize`"),
            )
            .with_hint("see docs/protocol.md, \"Handshake\""));
        }
        match method {
            methods::Status::NAME => {
                parse_params::<methods::Status>(params)?;
                to_value(self.status().await)
            }
            methods::Shutdown::NAME => {
                parse_params::<methods::Shutdown>(params)?;
                info!(conn = self.id, "shutdown requested");
                self.shared.shutdown.cancel();
                to_value(Empty {})
            }
            methods::Subscribe::NAME => {
                parse_params::<methods::Subscribe>(params)?;
                if !self.subscribed {
                    self.subscribed = true;
                    let rx = self.shared.events.subscribe();
                    self.shared.tracker.spawn(forward_events(
                        rx,
                        self.out.clone(),
                        self.closed.clone(),
                        self.shared.shutdown.clone(),
                    ));
                }
                to_value(Empty {})
            }
            methods::Watch::NAME => {
                let p = parse_params::<methods::Watch>(params)?;
                to_value(self.watch(p).await?)
            }
            methods::Unwatch::NAME => {
                let p = parse_params::<methods::Unwatch>(params)?;
                let (repo, _) = self.shared.repos.for_cwd(&p.dir).await?;
                let was_watched = self
                    .shared
                    .watchers
                    .unwatch(repo.workdir())
                    .await
                    .map_err(|e| e.to_rpc())?;
                // Triggers are part of the watch: a later watch starts without them.
                if let Err(e) = self.shared.triggers.set(repo.workdir(), false) {
                    warn!(error = %e, "cannot save the repositories with triggers on");
                }
                to_value(methods::UnwatchResult {
                    repo: repo.workdir().display().to_string(),
                    was_watched,
                })
            }
            methods::Refresh::NAME => {
                let p = parse_params::<methods::Refresh>(params)?;
                let (repo, _) = self.shared.repos.for_cwd(&p.dir).await?;
                let was_watched = self.shared.watchers.refresh(repo.workdir());
                to_value(methods::UnwatchResult {
                    repo: repo.workdir().display().to_string(),
                    was_watched,
                })
            }
            methods::Cancel::NAME => {
                let p = parse_params::<methods::Cancel>(params)?;
                let (repo, _) = self.shared.repos.for_cwd(&p.cwd).await?;
                let cancelled = self.shared.asks.cancel(repo.workdir());
                if cancelled {
                    info!(conn = self.id, repo = %repo.workdir().display(), "ask cancelled by request");
                }
                to_value(methods::CancelResult {
                    repo: repo.workdir().display().to_string(),
                    cancelled,
                })
            }
            methods::EditApply::NAME => {
                let p = parse_params::<methods::EditApply>(params)?;
                to_value(self.edit_apply(p).await?)
            }
            methods::EditUndo::NAME => {
                let p = parse_params::<methods::EditUndo>(params)?;
                to_value(self.edit_revert(p, false).await?)
            }
            methods::EditStash::NAME => {
                let p = parse_params::<methods::EditStash>(params)?;
                to_value(self.edit_revert(p, true).await?)
            }
            methods::EditLog::NAME => {
                let p = parse_params::<methods::EditLog>(params)?;
                to_value(self.edit_log(p).await?)
            }
            methods::EditShow::NAME => {
                let p = parse_params::<methods::EditShow>(params)?;
                to_value(self.edit_show(p).await?)
            }
            methods::TriggersSet::NAME => {
                let p = parse_params::<methods::TriggersSet>(params)?;
                let (repo, _) = self.shared.repos.for_cwd(&p.dir).await?;
                if p.enabled {
                    // Triggers see only what a watch sees.
                    self.shared.watchers.ensure_watched(repo.workdir());
                }
                let enabled = self
                    .shared
                    .triggers
                    .set(repo.workdir(), p.enabled)
                    .map_err(|e| {
                        RpcError::new(
                            ErrorCode::Internal,
                            format!("cannot save the repositories with triggers on: {e}"),
                        )
                        .with_hint("check that the daemon's state directory is writable")
                    })?;
                to_value(methods::TriggersResult {
                    repo: repo.workdir().display().to_string(),
                    enabled,
                })
            }
            methods::CommitDraft::NAME => {
                let p = parse_params::<methods::CommitDraft>(params)?;
                to_value(crate::draft::draft(&self.shared, p).await?)
            }
            other => Err(RpcError::new(
                ErrorCode::MethodNotFound,
                format!("unknown method `{other}`"),
            )
            .with_hint("see docs/protocol.md for the methods of this protocol version")),
        }
    }

    async fn watch(&self, p: methods::WatchParams) -> Result<methods::WatchResult, RpcError> {
        let (repo, _) = self.shared.repos.for_cwd(&p.dir).await?;
        let w = self
            .shared
            .watchers
            .watch(repo.workdir())
            .await
            .map_err(|e| e.to_rpc())?;
        // A watched repository's first ask should start warm.
        self.shared.asks.prewarm(repo.clone());
        Ok(methods::WatchResult {
            repo: repo_status(repo.workdir(), repo.edits(), Some(&w)),
        })
    }

    async fn edit_apply(&self, p: methods::ApplyParams) -> Result<methods::EditResult, RpcError> {
        let started = Instant::now();
        let (repo, prefix) = self.shared.repos.for_cwd(&p.cwd).await?;
        let req = edit::ApplyRequest {
            patch: p.patch,
            cwd_prefix: prefix,
            dry_run: p.dry_run,
            source: p.source.unwrap_or_else(|| "apply".to_owned()),
            message: p.message.unwrap_or_default(),
            bases: Default::default(),
        };
        let outcome = repo
            .run(move |ctx| edit::apply(ctx, &req))
            .await?
            .map_err(|e| e.to_rpc())?;
        self.shared
            .watchers
            .note_own_writes(repo.workdir(), &outcome.after);
        if let Some(id) = &outcome.edit {
            repo.count_edit();
            let paths: Vec<String> = outcome.files.iter().map(|f| f.path.clone()).collect();
            self.shared.asks.forget(repo.workdir(), &paths).await;
            let _ = self.shared.events.send(Event::EditApplied {
                repo: repo.workdir().display().to_string(),
                edit: id.clone(),
                files: outcome.files.iter().map(|f| f.path.clone()).collect(),
            });
        }
        Ok(edit_result(&repo, outcome, started))
    }

    async fn edit_revert(
        &self,
        p: methods::EditParams,
        stash: bool,
    ) -> Result<methods::EditResult, RpcError> {
        let started = Instant::now();
        let (repo, _) = self.shared.repos.for_cwd(&p.cwd).await?;
        let outcome = repo
            .run(move |ctx| edit::revert(ctx, p.id.as_deref(), stash))
            .await?
            .map_err(|e| e.to_rpc())?;
        self.shared
            .watchers
            .note_own_writes(repo.workdir(), &outcome.after);
        let paths: Vec<String> = outcome.files.iter().map(|f| f.path.clone()).collect();
        self.shared.asks.forget(repo.workdir(), &paths).await;
        let _ = self.shared.events.send(Event::EditReverted {
            repo: repo.workdir().display().to_string(),
            edit: outcome.edit.clone().unwrap_or_default(),
            files: outcome.files.iter().map(|f| f.path.clone()).collect(),
        });
        Ok(edit_result(&repo, outcome, started))
    }

    async fn edit_log(&self, p: methods::LogParams) -> Result<methods::LogResult, RpcError> {
        let (repo, _) = self.shared.repos.for_cwd(&p.cwd).await?;
        let limit = p.limit.unwrap_or(20) as usize;
        let (entries, failed) = repo
            .run(move |ctx| {
                edit::log(ctx, limit).map(|entries| {
                    let failed = crate::trigger::Triggers::failed_entries(ctx, limit);
                    (with_reverted(ctx, entries), failed)
                })
            })
            .await?
            .map_err(|e| e.to_rpc())?;
        let edits = entries
            .into_iter()
            .map(|(id, s, reverted)| {
                let mut entry = log_entry(id, s);
                if reverted {
                    entry.state = methods::EditState::RevertedOutside;
                }
                entry
            })
            .collect();
        Ok(methods::LogResult {
            repo: repo.workdir().display().to_string(),
            // Failed `spark!` triggers too: they left their comment and say why.
            edits: crate::trigger::merge_log(edits, failed, limit),
        })
    }

    async fn edit_show(&self, p: methods::EditParams) -> Result<methods::ShowResult, RpcError> {
        let (repo, _) = self.shared.repos.for_cwd(&p.cwd).await?;
        let (shown, reverted) = repo
            .run(move |ctx| {
                edit::show(ctx, p.id.as_deref()).map(|shown| {
                    // The same truth as `edit/log` about an edit reverted outside spark.
                    let reverted = shown.summary.clone().is_some_and(|s| {
                        with_reverted(ctx, vec![(shown.edit.clone(), s)])
                            .first()
                            .is_some_and(|(_, _, r)| *r)
                    });
                    (shown, reverted)
                })
            })
            .await?
            .map_err(|e| e.to_rpc())?;
        Ok(methods::ShowResult {
            entry: shown.summary.map(|s| {
                let mut entry = log_entry(shown.edit.clone(), s);
                if reverted {
                    entry.state = methods::EditState::RevertedOutside;
                }
                entry
            }),
            id: shown.edit,
            diff: shown.diff,
        })
    }

    /// `ask` runs as its own task so this connection keeps reading: a closed connection (Ctrl-C
    /// in the client) cancels it, and its progress streams as `ask/progress` notifications.
    fn spawn_ask(&self, id: Id, params: Option<Value>) {
        let shared = self.shared.clone();
        let out = self.out.clone();
        let cancel = self.closed.child_token();
        self.shared.tracker.spawn(async move {
            let result = async {
                let p = parse_params::<methods::Ask>(params)?;
                let (repo, prefix) = shared.repos.for_cwd(&p.cwd).await?;
                let emit = |event: methods::AskEvent| {
                    let progress = methods::AskProgress {
                        request: id.clone(),
                        event,
                    };
                    let line = encode(&Notification::new(
                        methods::ASK_PROGRESS,
                        serde_json::to_value(progress).expect("progress always serializes"),
                    ));
                    let out = out.clone();
                    async move {
                        let _ = out.send(line).await;
                    }
                };
                let result = shared
                    .asks
                    .ask(repo.clone(), prefix, p, cancel, emit)
                    .await?;
                if let Some(edit) = &result.edit {
                    let _ = shared.events.send(Event::EditApplied {
                        repo: repo.workdir().display().to_string(),
                        edit: edit.clone(),
                        files: result.files.iter().map(|f| f.path.clone()).collect(),
                    });
                }
                to_value(result)
            }
            .await;
            let response = match result {
                Ok(v) => Response::ok(id, v),
                Err(e) => Response::err(id, e),
            };
            let _ = out.send(encode(&response)).await;
        });
    }

    /// Every repository the daemon knows (asked about or watched), with its watch state.
    fn repo_statuses(&self) -> Vec<methods::RepoStatus> {
        let watched = self.shared.watchers.status();
        let handles = self.shared.repos.all();
        let mut out: Vec<methods::RepoStatus> = handles
            .iter()
            .map(|h| {
                let w = watched.iter().find(|w| w.workdir == h.workdir());
                repo_status(h.workdir(), h.edits(), w)
            })
            .collect();
        for w in &watched {
            if !handles.iter().any(|h| h.workdir() == w.workdir) {
                out.push(repo_status(&w.workdir, 0, Some(w)));
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    async fn status(&self) -> StatusResult {
        let layout = &self.shared.config.layout;
        let sessions = self.shared.asks.status().await;
        let connections = *self.shared.connections.borrow() as u64;
        StatusResult {
            pid: std::process::id(),
            version: self.shared.config.reported_version.clone(),
            protocol_version: PROTOCOL_VERSION,
            started_at: self.shared.started_at_ms,
            uptime_ms: u64::try_from(self.shared.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            socket: layout.socket.display().to_string(),
            log_file: layout.log_file.display().to_string(),
            connections,
            repos: self.repo_statuses(),
            sessions: sessions
                .into_iter()
                .map(|c| methods::SessionStatus {
                    repo: c.repo.display().to_string(),
                    connected: c.connected,
                    age_ms: c.age_ms,
                    rtt_ms: c.rtt_ms,
                    provider: Some(c.provider),
                    model: Some(c.model),
                    fell_back_to_http: c.fell_back,
                    failures: c.failures,
                    paused: c.paused,
                    last_error: c.last_error,
                    next_attempt_in_ms: c.next_attempt_in_ms,
                })
                .collect(),
            cache: Some(cache_status(self.shared.watchers.cache_status())),
        }
    }
}

/// The read side of a stream whose write side belongs to the writer task: `&Stream` is both
/// `AsyncRead` and `AsyncWrite`, so the two tasks share it instead of splitting it.
struct SharedStream(Arc<Stream>);

impl tokio::io::AsyncRead for SharedStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_read(cx, buf)
    }
}

fn repo_status(
    workdir: &std::path::Path,
    edits: u64,
    w: Option<&crate::watch::RepoWatchStatus>,
) -> methods::RepoStatus {
    methods::RepoStatus {
        path: workdir.display().to_string(),
        edits,
        watched: w.is_some(),
        indexed: w.is_some_and(|w| w.indexed),
        files: w.map(|w| w.files).unwrap_or(0),
        watches: w.map(|w| w.watches).unwrap_or(0),
        last_event_at: w.and_then(|w| w.last_event_at),
        degraded: w.and_then(|w| w.degraded.clone()),
    }
}

fn cache_status(c: crate::watch::CacheSummary) -> methods::CacheStatus {
    methods::CacheStatus {
        dir: c.dir.display().to_string(),
        entries: c.entries,
        bytes: c.bytes,
        rebuilds: c.rebuilds,
        unavailable: c.unavailable,
    }
}

fn edit_result(
    repo: &crate::repo::RepoHandle,
    o: edit::Outcome,
    started: Instant,
) -> methods::EditResult {
    methods::EditResult {
        edit: o.edit,
        repo: repo.workdir().display().to_string(),
        files: o
            .files
            .into_iter()
            .map(|f| methods::FileChangeSummary {
                path: f.path,
                change: f.change.to_owned(),
                added: f.added,
                removed: f.removed,
            })
            .collect(),
        diff: o.diff,
        total_ms: started.elapsed().as_secs_f64() * 1000.0,
    }
}

fn log_entry(id: String, s: edit::ledger::EditSummary) -> methods::LogEntry {
    let state = match s.state {
        edit::ledger::EventKind::Applied => methods::EditState::Applied,
        edit::ledger::EventKind::Undone => methods::EditState::Undone,
        edit::ledger::EventKind::Stashed => methods::EditState::Stashed,
    };
    methods::LogEntry {
        id,
        at: s.applied.at,
        state,
        source: s.applied.source,
        message: s.applied.message,
        files: s.applied.files,
        reason: None,
    }
}

/// Mark the applied edits whose files are all back to their pre-edit content: `log` must not
/// call an edit applied that the user reverted with git or their editor.
fn with_reverted(
    ctx: &edit::RepoCtx<'_>,
    entries: Vec<(String, edit::ledger::EditSummary)>,
) -> Vec<(String, edit::ledger::EditSummary, bool)> {
    entries
        .into_iter()
        .map(|(id, s)| {
            let reverted = s.state == edit::ledger::EventKind::Applied
                && edit::reverted_outside(ctx, &s.applied).unwrap_or_else(|e| {
                    tracing::warn!(edit = %id, error = %e, "cannot tell whether the edit was reverted");
                    false
                });
            (id, s, reverted)
        })
        .collect()
}

async fn write_loop(stream: Arc<Stream>, mut rx: mpsc::Receiver<Vec<u8>>) {
    let mut tx = &*stream;
    while let Some(line) = rx.recv().await {
        if tx.write_all(&line).await.is_err() {
            return;
        }
    }
    let _ = tx.flush().await;
}

/// Push every event to one subscribed connection; never block the publisher.
async fn forward_events(
    mut rx: broadcast::Receiver<Event>,
    out: mpsc::Sender<Vec<u8>>,
    closed: CancellationToken,
    shutdown: CancellationToken,
) {
    let notify = |e: &Event| {
        let params = serde_json::to_value(e).expect("events always serialize");
        encode(&Notification::new(EVENT_METHOD, params))
    };
    loop {
        let event = tokio::select! {
            () = closed.cancelled() => {
                if shutdown.is_cancelled() {
                    let _ = out.try_send(notify(&Event::Stopping));
                }
                return;
            }
            e = rx.recv() => e,
        };
        match event {
            Ok(e) => match out.try_send(notify(&e)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    warn!("subscriber not reading; event dropped")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            },
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(missed = n, "subscriber too slow; events dropped")
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn parse_params<M: Method>(params: Option<Value>) -> Result<M::Params, RpcError> {
    let params = params.unwrap_or_else(|| Value::Object(Default::default()));
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

fn to_value<T: Serialize>(v: T) -> Result<Value, RpcError> {
    serde_json::to_value(v)
        .map_err(|e| RpcError::new(ErrorCode::Internal, format!("cannot encode result: {e}")))
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
