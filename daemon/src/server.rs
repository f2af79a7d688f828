//! The local-socket server: accept loop, one task per connection, request dispatch, pushed
//! events and the single shutdown path.
//!
//! Every connection must `initialize` first. Responses and notifications for a connection go
//! through its `Outbound` queue drained by a writer task: a client that does not read its answers
//! is no longer read from, and one that does not read its notifications is disconnected, so a
//! slow reader slows only itself and costs bounded memory. Shutdown (signal, `shutdown` request or idle timeout) cancels one root token: the
//! accept loop stops, connections flush what they owe and close, tracked tasks get the drain
//! timeout to finish, and the socket file is removed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::StreamCommon as _;
use interprocess::local_socket::traits::tokio::Listener as _;
use serde::Serialize;
use serde_json::Value;
use spark_proto::events::{EVENT_METHOD, Event};
use spark_proto::frame::{Frame, encode};
use spark_proto::methods::{self, ClientRequest, Empty, InitializeResult, Method, StatusResult};
use spark_proto::{
    ErrorCode, Id, MAX_LINE_BYTES, Notification, PROTOCOL_VERSION, Request, Response, RpcError,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::ask::Landed;
use crate::codec::LineDecoder;
use crate::config::Config;
use crate::edit::{self, EditEnv};
use crate::instance::Instance;
use crate::outbound::{Outbound, Queued};
use crate::repo::Repos;

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
    pub(crate) repos: Arc<Repos>,
    pub(crate) asks: Arc<crate::ask::Asks>,
    pub(crate) watchers: crate::watch::Watchers,
    pub(crate) triggers: crate::trigger::Triggers,
}

impl Shared {
    /// What `commit/draft` needs, lent for one request (so `draft` does not depend on `server`).
    fn draft_env(&self) -> crate::draft::DraftEnv<'_> {
        crate::draft::DraftEnv {
            asks: &self.asks,
            repos: &self.repos,
            tracker: &self.tracker,
            shutdown: &self.shutdown,
            timeout: self.config.hook_timeout,
        }
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
        crate::watch::WatchOptions::from_env(),
    );
    // Settled changes become local-history snapshots (started below, once `Shared` exists).
    let (settled_tx, settled_rx) = mpsc::channel(crate::history::SETTLED_QUEUE);
    watchers.on_settled(settled_tx);
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
        started_at_ms: crate::clock::unix_ms(),
        events,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        connections: watch::Sender::new(0),
        next_conn: AtomicU64::new(1),
        repos: Arc::new(Repos::new(EditEnv::from_config(&config))),
        asks,
        watchers,
        triggers: crate::trigger::Triggers::new(&config.layout.state_dir, config.triggers),
        config,
    });
    crate::trigger::Triggers::start(&Arc::new(crate::trigger::TriggerEnv {
        events: shared.events.clone(),
        shutdown: shared.shutdown.clone(),
        tracker: shared.tracker.clone(),
        repos: shared.repos.clone(),
        asks: shared.asks.clone(),
        triggers: shared.triggers.clone(),
        fsync: shared.config.fsync,
    }));
    info!(socket = %instance.socket.display(), pid = std::process::id(), version = crate::VERSION, "sparkd serving");
    let settled = shared.clone();
    shared.tracker.spawn(async move {
        crate::history::run_settled(&settled.repos, &settled.shutdown, settled_rx).await;
    });
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
    out: Outbound,
    initialized: bool,
    subscribed: bool,
    /// Cancelled when this connection ends (or the daemon stops): ends its event forwarder.
    closed: CancellationToken,
}

impl Connection {
    async fn run(shared: Arc<Shared>, stream: Stream, id: u64) {
        let stream = Arc::new(stream);
        let closed = shared.shutdown.child_token();
        let (out, out_rx) = Outbound::new(id, closed.clone());
        let writer = shared
            .tracker
            .spawn(write_loop(stream.clone(), out_rx, out.dropped_token()));
        let mut frames = FramedRead::new(SharedStream(stream), LineDecoder::new(MAX_LINE_BYTES));
        let mut conn = Connection {
            shared: shared.clone(),
            id,
            out,
            initialized: false,
            subscribed: false,
            closed,
        };
        debug!(conn = id, "connected");
        loop {
            let frame = tokio::select! {
                // Biased: once shutdown starts, nothing more is read, even if lines are queued.
                biased;
                () = shared.shutdown.cancelled() => break,
                () = conn.out.dropped() => break,
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

    /// Queue a response for the writer, waiting for room; false once the connection is gone.
    async fn send<T: Serialize>(&self, msg: &T) -> bool {
        self.out.respond(encode(msg)).await
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
        let answer = match self.gate(&req.method) {
            Ok(()) => match ClientRequest::parse(&req.method, req.params) {
                Ok(request) => self.dispatch(&req.id, request).await,
                Err(err) => Some(Err(err)),
            },
            Err(err) => Some(Err(err)),
        };
        match answer {
            Some(Ok(result)) => self.send(&Response::ok(req.id, result)).await,
            Some(Err(err)) => self.send(&Response::err(req.id, err)).await,
            // Answered later by its own task.
            None => true,
        }
    }

    /// Every request but `initialize` waits for the handshake.
    fn gate(&self, method: &str) -> Result<(), RpcError> {
        if self.initialized || method == methods::Initialize::NAME {
            return Ok(());
        }
        Err(RpcError::new(
            ErrorCode::NotInitialized,
            format!("`{method}` before `initialize`: the first request must be `initialize`"),
        )
        .with_hint("see docs/protocol.md, \"Handshake\""))
    }

    /// Answers a request, or returns `None` for an `ask`, which its own task answers.
    async fn dispatch(
        &mut self,
        id: &Id,
        request: ClientRequest,
    ) -> Option<Result<Value, RpcError>> {
        let answer = match request {
            ClientRequest::Initialize(p) => self.initialize(p),
            ClientRequest::Ask(p) => {
                self.spawn_ask(id.clone(), p);
                return None;
            }
            ClientRequest::Status(Empty {}) => to_value(self.status().await),
            ClientRequest::Shutdown(Empty {}) => {
                info!(conn = self.id, "shutdown requested");
                self.shared.shutdown.cancel();
                to_value(Empty {})
            }
            ClientRequest::Subscribe(Empty {}) => {
                self.subscribe();
                to_value(Empty {})
            }
            ClientRequest::Watch(p) => self.watch(p).await.and_then(to_value),
            ClientRequest::Unwatch(p) => self.unwatch(p).await.and_then(to_value),
            ClientRequest::Refresh(p) => self.refresh(p).await.and_then(to_value),
            ClientRequest::Cancel(p) => self.cancel(p).await.and_then(to_value),
            ClientRequest::EditApply(p) => self.edit_apply(p).await.and_then(to_value),
            ClientRequest::EditUndo(p) => self.edit_revert(p, false).await.and_then(to_value),
            ClientRequest::EditStash(p) => self.edit_revert(p, true).await.and_then(to_value),
            ClientRequest::EditLog(p) => self.edit_log(p).await.and_then(to_value),
            ClientRequest::EditShow(p) => self.edit_show(p).await.and_then(to_value),
            ClientRequest::CommitDraft(p) => crate::draft::draft(self.shared.draft_env(), p)
                .await
                .and_then(to_value),
            ClientRequest::HistoryList(p) => self.history_list(p).await.and_then(to_value),
            ClientRequest::HistoryRestore(p) => self.history_restore(p).await.and_then(to_value),
            ClientRequest::HistoryDiff(p) => self.history_diff(p).await.and_then(to_value),
            ClientRequest::TriggersSet(p) => self.triggers_set(p).await.and_then(to_value),
        };
        Some(answer)
    }

    fn initialize(&mut self, p: methods::InitializeParams) -> Result<Value, RpcError> {
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
        to_value(InitializeResult {
            protocol_version: PROTOCOL_VERSION,
            daemon_version: self.shared.config.reported_version.clone(),
            pid: std::process::id(),
        })
    }

    /// From now on this connection also receives `event` notifications.
    fn subscribe(&mut self) {
        if self.subscribed {
            return;
        }
        self.subscribed = true;
        let rx = self.shared.events.subscribe();
        self.shared.tracker.spawn(forward_events(
            rx,
            self.out.clone(),
            self.closed.clone(),
            self.shared.shutdown.clone(),
        ));
    }

    async fn unwatch(&self, p: methods::WatchParams) -> Result<methods::WatchChange, RpcError> {
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
        Ok(methods::WatchChange {
            repo: repo.workdir().display().to_string(),
            was_watched,
        })
    }

    async fn triggers_set(
        &self,
        p: methods::TriggersParams,
    ) -> Result<methods::TriggersResult, RpcError> {
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
        Ok(methods::TriggersResult {
            repo: repo.workdir().display().to_string(),
            enabled,
        })
    }

    async fn refresh(&self, p: methods::WatchParams) -> Result<methods::WatchChange, RpcError> {
        let (repo, _) = self.shared.repos.for_cwd(&p.dir).await?;
        let was_watched = self.shared.watchers.refresh(repo.workdir());
        Ok(methods::WatchChange {
            repo: repo.workdir().display().to_string(),
            was_watched,
        })
    }

    async fn cancel(&self, p: methods::CancelParams) -> Result<methods::CancelResult, RpcError> {
        let (repo, _) = self.shared.repos.for_cwd(&p.cwd).await?;
        let cancelled = self.shared.asks.cancel(repo.workdir());
        if cancelled {
            info!(conn = self.id, repo = %repo.workdir().display(), "ask cancelled by request");
        }
        Ok(methods::CancelResult {
            repo: repo.workdir().display().to_string(),
            cancelled,
        })
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
            buffers: Default::default(),
        };
        let outcome = match repo.run(move |ctx| edit::apply(ctx, &req)).await? {
            Ok(outcome) => outcome,
            Err(e) => return Err(with_closest_lines(repo.workdir(), &e).await),
        };
        self.shared
            .asks
            .after_edit(&repo, &outcome, Landed::Applied)
            .await;
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
            .asks
            .after_edit(&repo, &outcome, Landed::Reverted)
            .await;
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

    async fn history_list(
        &self,
        p: methods::HistoryListParams,
    ) -> Result<methods::HistoryListResult, RpcError> {
        let (repo, prefix) = self.shared.repos.for_cwd(&p.cwd).await?;
        let (path, versions) = repo
            .run(move |ctx| {
                crate::history::list(ctx, &prefix, p.path.as_deref(), p.since.as_deref(), p.limit)
            })
            .await?
            .map_err(|e| e.to_rpc())?;
        Ok(methods::HistoryListResult {
            repo: repo.workdir().display().to_string(),
            path,
            versions,
        })
    }

    /// A restore is an edit: the same after-edit path as `edit/apply`.
    async fn history_restore(
        &self,
        p: methods::HistoryRestoreParams,
    ) -> Result<methods::EditResult, RpcError> {
        let started = Instant::now();
        let (repo, prefix) = self.shared.repos.for_cwd(&p.cwd).await?;
        let outcome = repo
            .run(move |ctx| crate::history::restore(ctx, &prefix, &p.path, &p.at, p.dry_run))
            .await?
            .map_err(|e| e.to_rpc())?;
        self.shared
            .asks
            .after_edit(&repo, &outcome, Landed::Applied)
            .await;
        Ok(edit_result(&repo, outcome, started))
    }

    async fn history_diff(
        &self,
        p: methods::HistoryDiffParams,
    ) -> Result<methods::HistoryDiffResult, RpcError> {
        let (repo, prefix) = self.shared.repos.for_cwd(&p.cwd).await?;
        let changes = repo
            .run(move |ctx| crate::history::diff(ctx, &prefix, &p.since, p.path.as_deref()))
            .await?
            .map_err(|e| e.to_rpc())?;
        Ok(methods::HistoryDiffResult {
            repo: repo.workdir().display().to_string(),
            from: changes.from,
            files: changes.files,
            diff: changes.diff,
        })
    }

    /// `ask` runs as its own task so this connection keeps reading: a closed connection (Ctrl-C
    /// in the client) cancels it, and its progress streams as `ask/progress` notifications.
    fn spawn_ask(&self, id: Id, p: methods::AskParams) {
        let shared = self.shared.clone();
        let out = self.out.clone();
        let cancel = self.closed.child_token();
        self.shared.tracker.spawn(async move {
            let result = async {
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
                    // Never waits: this ask holds its repository's conversation, which every
                    // edit there and the next ask need (a client that stopped reading is
                    // disconnected instead, which cancels this ask).
                    out.notify(line);
                    std::future::ready(())
                };
                let result = shared.asks.ask(repo, prefix, p, cancel, emit).await?;
                to_value(result)
            }
            .await;
            let response = match result {
                Ok(v) => Response::ok(id, v),
                Err(e) => Response::err(id, e),
            };
            let _ = out.respond(encode(&response)).await;
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
                    lane: c.lane,
                    lanes_refused: c.lanes_refused,
                })
                .collect(),
            cache: Some(cache_status(self.shared.watchers.cache_status())),
            provider_connections: self
                .shared
                .asks
                .lanes_status()
                .into_iter()
                .map(|p| methods::ProviderConnectionStatus {
                    url: p.url,
                    connections: p.connections as u64,
                    lanes: p.lanes as u64,
                    lanes_refused: p.refused,
                })
                .collect(),
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
        last_rebuild: c.last_rebuild,
        rebuilding: c.rebuilding,
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
        files: o.files,
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

/// Write what is queued, in order, until every sender is gone; a client disconnected for not
/// reading gets nothing more (a write to its full socket would never finish).
async fn write_loop(
    stream: Arc<Stream>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    dropped: CancellationToken,
) {
    let mut tx = &*stream;
    loop {
        let queued = tokio::select! {
            biased;
            () = dropped.cancelled() => return,
            q = rx.recv() => q,
        };
        let Some(queued) = queued else { break };
        let written = tokio::select! {
            biased;
            () = dropped.cancelled() => return,
            w = tx.write_all(&queued.line) => w,
        };
        if written.is_err() {
            return;
        }
    }
    let _ = tx.flush().await;
}

/// Push every event to one subscribed connection; never block the publisher. A subscriber that
/// stopped reading is disconnected by its queue (`Outbound::notify`), which ends this task.
async fn forward_events(
    mut rx: broadcast::Receiver<Event>,
    out: Outbound,
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
                    out.notify(notify(&Event::Stopping));
                }
                return;
            }
            e = rx.recv() => e,
        };
        match event {
            Ok(e) => {
                if !out.notify(notify(&e)) {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(missed = n, "subscriber too slow; events dropped")
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn to_value<T: Serialize>(v: T) -> Result<Value, RpcError> {
    serde_json::to_value(v)
        .map_err(|e| RpcError::new(ErrorCode::Internal, format!("cannot encode result: {e}")))
}

/// The wire error of a refused `edit/apply`; a patch that did not match also carries the lines of
/// the file as it is now closest to what it looked for, so a client (or a model) can correct it.
async fn with_closest_lines(workdir: &std::path::Path, error: &edit::EditError) -> RpcError {
    let rpc = error.to_rpc();
    let edit::EditError::Match { path, source } = error else {
        return rpc;
    };
    let Ok(bytes) = tokio::fs::read(workdir.join(path)).await else {
        return rpc;
    };
    match edit::matcher::repair_hint(&bytes, source) {
        Some(lines) => rpc.with_closest(lines),
        None => rpc,
    }
}
