//! `stream_id` lanes: one WebSocket connection per provider (URL and key), shared by every
//! session that talks to it, each session on a lane of its own (docs/protocol.md, "Provider
//! lanes").
//!
//! A session still sees a [`Connection`]: [`LaneSpec::open`] hands it a [`LaneConn`] on the
//! provider's shared connection (connecting it first if needed), or, once the provider has
//! refused lanes, a WebSocket of its own, as before lanes. The session keeps everything else:
//! its queue (one response at a time per lane, which is what the provider's per-lane order
//! needs too), chaining, recovery, rotation and the reconnect policy (one per provider, so one
//! per shared connection).
//!
//! One task per shared connection owns the socket: it writes what lanes send, routes each event
//! to the lane its `stream_id` names, hands pongs to every lane (any frame proves the socket
//! alive), and when the socket ends tells every lane why. A lane that is dropped (a cancel, a
//! rotation) leaves the connection: later events of its abandoned response are dropped, and the
//! session reopens on a new `stream_id`, so no event of an abandoned response reaches a later
//! turn. The connection closes when its last lane leaves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::transport::{
    ConnectTimeouts, Connection, Endpoint, Incoming, LaneIncoming, TransportError, WsConnection,
};
use super::wire::ServerEvent;

/// What the guide allows in a `stream_id`: 1–64 of `[A-Za-z0-9_.:-]`.
const MAX_STREAM_ID: usize = 64;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the maps inconsistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct ProviderKey {
    url: String,
    api_key: Option<Arc<str>>,
}

/// Every provider's shared connection.
#[derive(Debug)]
pub(crate) struct LanePool {
    providers: Mutex<HashMap<ProviderKeyDebug, Arc<Mux>>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// `ProviderKey` with a `Debug` that never prints the key.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ProviderKeyDebug(ProviderKey);

impl std::fmt::Debug for ProviderKeyDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.url)
    }
}

/// One provider's shared connection, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProviderLanes {
    pub(crate) url: String,
    /// Shared connections open now (two for a moment while one rotates).
    pub(crate) connections: usize,
    /// Lanes open on them.
    pub(crate) lanes: usize,
    /// The provider refused `stream_id`: its sessions use a connection each.
    pub(crate) refused: bool,
}

impl LanePool {
    pub(crate) fn new(tracker: TaskTracker, shutdown: CancellationToken) -> LanePool {
        LanePool {
            providers: Mutex::new(HashMap::new()),
            tracker,
            shutdown,
        }
    }

    /// A lane named after `name` (a repository's, "draft", …) on the shared connection to
    /// `url` with `api_key`.
    pub(crate) fn lane(&self, url: &str, api_key: Option<Arc<str>>, name: &str) -> LaneSpec {
        let key = ProviderKeyDebug(ProviderKey {
            url: url.to_owned(),
            api_key,
        });
        let mux = lock(&self.providers)
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Mux {
                    url: url.to_owned(),
                    refused: AtomicBool::new(false),
                    connecting: tokio::sync::Mutex::new(()),
                    state: Mutex::new(MuxState::default()),
                    next_lane: AtomicU64::new(1),
                    tracker: self.tracker.clone(),
                    shutdown: self.shutdown.clone(),
                })
            })
            .clone();
        LaneSpec {
            mux,
            name: stream_name(name),
        }
    }

    pub(crate) fn status(&self) -> Vec<ProviderLanes> {
        let mut out: Vec<ProviderLanes> = lock(&self.providers)
            .values()
            .map(|mux| {
                let state = lock(&mux.state);
                let live: Vec<&Arc<Shared>> = state
                    .connections
                    .iter()
                    .filter(|c| c.alive.load(Ordering::SeqCst))
                    .collect();
                ProviderLanes {
                    url: mux.url.clone(),
                    connections: live.len(),
                    lanes: live.iter().map(|c| lock(&c.lanes).len()).sum(),
                    refused: mux.refused.load(Ordering::SeqCst),
                }
            })
            .collect();
        out.sort_by(|a, b| a.url.cmp(&b.url));
        out
    }
}

/// Keep what the guide allows in a `stream_id`, leaving room for the lane number.
fn stream_name(name: &str) -> String {
    let mut clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_STREAM_ID - 21)
        .collect();
    if clean.is_empty() {
        clean.push_str("lane");
    }
    clean
}

/// Where a session opens its connections: a lane of its provider's shared connection.
#[derive(Clone, Debug)]
pub(crate) struct LaneSpec {
    mux: Arc<Mux>,
    name: String,
}

impl LaneSpec {
    /// The provider refused lanes: sessions connect on their own.
    pub(crate) fn refused(&self) -> bool {
        self.mux.refused.load(Ordering::SeqCst)
    }

    /// A lane on the shared connection (opened first, or replaced when it is older than
    /// `rotate_after`), or a connection of its own when the provider refuses lanes.
    pub(crate) async fn open(
        self,
        endpoint: Endpoint,
        api_key: Option<Arc<str>>,
        timeouts: ConnectTimeouts,
        rotate_after: Duration,
    ) -> Result<Connection, TransportError> {
        if self.refused() {
            return Connection::open(endpoint, api_key, timeouts).await;
        }
        let mux = &self.mux;
        let seen = lock(&mux.state).attempts;
        // One attempt at a time: sessions that ask while it runs share its outcome.
        let _connecting = mux.connecting.lock().await;
        if self.refused() {
            return Connection::open(endpoint, api_key, timeouts).await;
        }
        let stream_id = format!(
            "{}.{}",
            self.name,
            mux.next_lane.fetch_add(1, Ordering::Relaxed)
        );
        {
            let mut state = lock(&mux.state);
            state.connections.retain(|c| c.alive.load(Ordering::SeqCst));
            let current = state
                .connections
                .last()
                .filter(|c| c.opened_at.elapsed() < rotate_after)
                .cloned();
            if let Some(shared) = current
                && let Some(lane) = LaneConn::join(&shared, stream_id.clone())
            {
                return Ok(Connection::Lane(lane));
            }
            if let Some((attempt, error)) = &state.failure
                && *attempt > seen
            {
                return Err(error.duplicate());
            }
            state.attempts += 1;
        }
        let attempt = lock(&mux.state).attempts;
        match WsConnection::connect(&endpoint, api_key.as_deref(), timeouts).await {
            Ok(ws) => {
                let (commands, rx) = mpsc::unbounded_channel();
                let shared = Arc::new(Shared {
                    opened_at: Instant::now(),
                    commands,
                    lanes: Mutex::new(HashMap::new()),
                    alive: AtomicBool::new(true),
                    heard: AtomicBool::new(false),
                    answered: AtomicBool::new(false),
                });
                let lane = LaneConn::join(&shared, stream_id).ok_or_else(|| {
                    TransportError::WebSocket("the shared connection closed at once".to_owned())
                })?;
                {
                    let mut state = lock(&mux.state);
                    state.failure = None;
                    state.connections.push(shared.clone());
                }
                info!(url = mux.url, "shared provider connection opened");
                mux.tracker
                    .spawn(run(ws, rx, shared, mux.clone(), mux.shutdown.clone()));
                Ok(Connection::Lane(lane))
            }
            Err(e) => {
                lock(&mux.state).failure = Some((attempt, e.duplicate()));
                Err(e)
            }
        }
    }
}

/// One provider's connections and what decides between them.
#[derive(Debug)]
struct Mux {
    url: String,
    /// Remembered for the daemon's life: the provider refused `stream_id`.
    refused: AtomicBool,
    connecting: tokio::sync::Mutex<()>,
    state: Mutex<MuxState>,
    next_lane: AtomicU64,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

#[derive(Debug, Default)]
struct MuxState {
    /// Open shared connections, the newest (the one new lanes join) last.
    connections: Vec<Arc<Shared>>,
    /// Connection attempts started so far.
    attempts: u64,
    /// The last attempt's failure, for the sessions that waited on it.
    failure: Option<(u64, TransportError)>,
}

enum Command {
    Send(String, oneshot::Sender<Result<(), TransportError>>),
    Ping(Bytes),
    /// A lane left: close the connection if it was the last.
    LaneLeft,
}

/// What the lanes and the connection's task share.
struct Shared {
    opened_at: Instant,
    commands: mpsc::UnboundedSender<Command>,
    lanes: Mutex<HashMap<String, mpsc::UnboundedSender<Incoming>>>,
    alive: AtomicBool,
    heard: AtomicBool,
    answered: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("opened_at", &self.opened_at)
            .field("alive", &self.alive)
            .finish_non_exhaustive()
    }
}

/// A session's lane of a shared connection.
#[derive(Debug)]
pub(crate) struct LaneConn {
    stream_id: String,
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<Incoming>,
}

impl LaneConn {
    /// Join `shared` as `stream_id`, unless it has closed.
    fn join(shared: &Arc<Shared>, stream_id: String) -> Option<LaneConn> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut lanes = lock(&shared.lanes);
        // Checked under the lanes lock, which the task takes to close: no lane joins a
        // connection that is going away.
        if !shared.alive.load(Ordering::SeqCst) {
            return None;
        }
        lanes.insert(stream_id.clone(), tx);
        debug!(stream_id, "lane opened");
        Some(LaneConn {
            stream_id,
            shared: shared.clone(),
            events,
        })
    }

    pub(crate) fn stream_id(&self) -> &str {
        &self.stream_id
    }

    /// The shared connection did not answer a ping: no lane joins it again (checked under the
    /// lanes lock, as in `join`); it closes once its last lane has left.
    pub(crate) fn give_up(&self) {
        let _lanes = lock(&self.shared.lanes);
        self.shared.alive.store(false, Ordering::SeqCst);
    }

    pub(crate) fn connection_opened_at(&self) -> Instant {
        self.shared.opened_at
    }

    pub(crate) fn connection_heard(&self) -> bool {
        self.shared.heard.load(Ordering::SeqCst)
    }

    pub(crate) fn connection_answered(&self) -> bool {
        self.shared.answered.load(Ordering::SeqCst)
    }

    pub(crate) async fn send(&mut self, body: String) -> Result<(), TransportError> {
        let (reply, written) = oneshot::channel();
        if self
            .shared
            .commands
            .send(Command::Send(body, reply))
            .is_err()
        {
            // The connection ended before the write: the lane's events end with why (a close
            // by the provider, a refusal of lanes), and the session recovers from that as it
            // does from a socket the peer closed right after a write.
            return Ok(());
        }
        written.await.unwrap_or(Ok(()))
    }

    pub(crate) async fn recv(&mut self) -> Incoming {
        self.events
            .recv()
            .await
            .unwrap_or_else(|| Incoming::Closed("connection ended".to_owned()))
    }

    pub(crate) fn ping(&mut self, payload: Bytes) -> Result<(), TransportError> {
        self.shared
            .commands
            .send(Command::Ping(payload))
            .map_err(|_| TransportError::WebSocket("the shared connection is closed".to_owned()))
    }
}

impl Drop for LaneConn {
    fn drop(&mut self) {
        lock(&self.shared.lanes).remove(&self.stream_id);
        debug!(stream_id = self.stream_id, "lane closed");
        let _ = self.shared.commands.send(Command::LaneLeft);
    }
}

/// Why a shared connection ended.
enum End {
    Lost(String),
    Refused,
    Unused,
    Shutdown,
}

/// The task that owns one shared connection.
async fn run(
    mut ws: WsConnection,
    mut commands: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Shared>,
    mux: Arc<Mux>,
    shutdown: CancellationToken,
) {
    let end = loop {
        tokio::select! {
            () = shutdown.cancelled() => break End::Shutdown,
            command = commands.recv() => match command {
                // `shared` holds a sender: the channel outlives this loop.
                None => break End::Unused,
                Some(Command::Send(body, reply)) => {
                    let result = ws.send(Message::text(body)).await;
                    let failed = result.as_ref().err().map(ToString::to_string);
                    let _ = reply.send(result);
                    if let Some(reason) = failed {
                        break End::Lost(reason);
                    }
                }
                Some(Command::Ping(payload)) => {
                    if let Err(e) = ws.send(Message::Ping(payload)).await {
                        break End::Lost(e.to_string());
                    }
                }
                Some(Command::LaneLeft) => {
                    let lanes = lock(&shared.lanes);
                    if lanes.is_empty() {
                        shared.alive.store(false, Ordering::SeqCst);
                        break End::Unused;
                    }
                }
            },
            incoming = ws.recv_lane() => match incoming {
                Err(e) => break End::Lost(e.to_string()),
                Ok(LaneIncoming::Event(event)) => {
                    if let Some(end) = route(&shared, event) {
                        break end;
                    }
                }
                Ok(LaneIncoming::Other(Incoming::Pong(payload))) => {
                    for lane in lock(&shared.lanes).values() {
                        let _ = lane.send(Incoming::Pong(payload.clone()));
                    }
                }
                Ok(LaneIncoming::Other(Incoming::Closed(reason))) => break End::Lost(reason),
                Ok(LaneIncoming::Other(
                    Incoming::Heartbeat
                    | Incoming::Event(_)
                    | Incoming::StreamEnd
                    | Incoming::LanesRefused,
                )) => {}
            },
        }
    };
    let message = match &end {
        End::Lost(reason) => {
            warn!(url = mux.url, %reason, "shared provider connection lost");
            Some(Incoming::Closed(reason.clone()))
        }
        End::Refused => {
            warn!(
                url = mux.url,
                "the provider refuses stream_id lanes; one connection per session from now on"
            );
            mux.refused.store(true, Ordering::SeqCst);
            Some(Incoming::LanesRefused)
        }
        End::Unused => {
            debug!(
                url = mux.url,
                "shared provider connection closed: no lanes left"
            );
            None
        }
        End::Shutdown => None,
    };
    let lanes: Vec<_> = {
        let mut lanes = lock(&shared.lanes);
        shared.alive.store(false, Ordering::SeqCst);
        lanes.drain().map(|(_, tx)| tx).collect()
    };
    if let Some(message) = message {
        for lane in lanes {
            let _ = lane.send(match &message {
                Incoming::Closed(reason) => Incoming::Closed(reason.clone()),
                _ => Incoming::LanesRefused,
            });
        }
    }
    ws.close();
}

/// Hand an event to its lane; `Some` ends the connection.
fn route(shared: &Shared, event: super::wire::LaneEvent) -> Option<End> {
    shared.heard.store(true, Ordering::SeqCst);
    if matches!(
        event.event,
        ServerEvent::Completed { .. } | ServerEvent::Incomplete { .. }
    ) {
        shared.answered.store(true, Ordering::SeqCst);
    }
    let lanes = lock(&shared.lanes);
    match event.stream_id {
        Some(id) => {
            match lanes.get(&id) {
                Some(lane) => {
                    let _ = lane.send(Incoming::Event(event.event));
                }
                // A lane that left (cancel, rotation): its abandoned response is dropped.
                None => debug!(stream_id = id, "event of a closed lane dropped"),
            }
            None
        }
        None if event.refuses_lanes => Some(End::Refused),
        // About the connection itself (e.g. its lifetime): every lane learns it.
        None if matches!(event.event, ServerEvent::Error { .. }) => {
            // The connection's lifetime is up: it ends here, so the lanes that reconnect
            // open a new one instead of joining this one again.
            let limit = matches!(
                &event.event,
                ServerEvent::Error { code: Some(code), .. } if code == super::wire::CONNECTION_LIMIT_REACHED
            );
            if limit {
                shared.alive.store(false, Ordering::SeqCst);
            }
            for lane in lanes.values() {
                let _ = lane.send(Incoming::Event(event.event.clone()));
            }
            limit.then(|| End::Lost("the provider's connection limit was reached".to_owned()))
        }
        // A response event without its lane: the provider ignores `stream_id`, so events of
        // different lanes could not be told apart.
        None => Some(End::Refused),
    }
}
