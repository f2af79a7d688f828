//! One provider session: a task that owns one connection and runs one response at a time,
//! driven through a cloneable [`SessionHandle`] (commands over a bounded channel, answers over
//! oneshots, a turn's events over its own channel).
//!
//! What the task keeps so that a continued turn sends only the new items:
//! - the chain head: the last response id, valid only on the connection (epoch) that produced
//!   it, because with `store:false` the provider keeps previous responses only in that
//!   connection's memory;
//! - the prompt (instructions, tools) and the prewarm context, resent or re-prewarmed after a
//!   reconnect;
//! - the tool calls the last response ended with and the outputs the caller supplied for them,
//!   sent at the head of the next turn.
//!
//! Recovery: `previous_response_not_found` → the same turn once more, unchained, with the
//! caller's full context; `websocket_connection_limit_reached` or a connection lost before
//! anything reached the caller → reconnect and resend unchained; a refused upgrade → HTTP + SSE
//! at the same host for the rest of the session; proactive rotation before the provider's
//! 60-minute cap; reconnects with capped exponential backoff and full jitter. Cancel closes the
//! WebSocket (there is no cancel event) and reconnects + re-prewarms in the background, so no
//! event of the abandoned response can reach a later turn: they would arrive on a socket that
//! no longer exists.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher as _, Hasher as _};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use spark_proto::events::SessionState;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::backoff::{Backoff, BackoffStatus, Permit};
use super::lanes::LaneSpec;
use super::transport::{
    ConnectTimeouts, Connection, Endpoint, Incoming, TransportError, TransportKind,
};
use super::wire::{
    CONNECTION_LIMIT_REACHED, Framing, InputItem, OutputItem, PREVIOUS_RESPONSE_NOT_FOUND,
    RequestParts, ResponseBody, ServerEvent, Tool, ToolChoice, Usage,
};

/// The provider closes a WebSocket after 60 minutes; rotate while idle well before that.
pub(crate) const DEFAULT_ROTATE_AFTER: Duration = Duration::from_secs(55 * 60);
/// Silence after which a ping checks the connection (and refreshes the RTT).
pub(crate) const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(20);
/// No frame at all this long after a ping: the connection is dead.
pub(crate) const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP + TLS + upgrade.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// No byte of an HTTP + SSE response for this long: the provider stopped sending. Generous,
/// as a model may think for minutes before it writes (Codex CLI waits as long).
pub(crate) const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// First reconnect delay ceiling; doubles per failure up to the cap.
pub(crate) const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(250);
pub(crate) const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Background reconnects give up after this many failures in a row (until the next request),
/// so a wrong URL, a wrong key or a gateway that drops every connection is not retried forever.
pub(crate) const DEFAULT_MAX_BACKGROUND_ATTEMPTS: u32 = 3;
/// A request waits this long at most for its provider's next allowed attempt; past that it
/// fails at once, saying when the next attempt is due.
const MAX_REQUEST_WAIT: Duration = Duration::from_secs(2);
/// Commands queued per session before callers wait.
const COMMAND_CAPACITY: usize = 64;
/// Ended response ids remembered to recognise late duplicates of their events.
const ENDED_KEPT: usize = 16;

/// Sends of one turn at most: the first, an unchained resend, a resend after reconnecting.
const MAX_ATTEMPTS: u8 = 3;
/// Output sent for a tool call the caller never answered: the API refuses a continuation that
/// leaves a call unanswered.
const UNANSWERED_TOOL_OUTPUT: &str = "The tool call was not executed.";

/// Called on every connection state change (from the session task; must not block).
pub(crate) type StateHook = Arc<dyn Fn(SessionState) + Send + Sync>;

/// How a session connects and what it sends with every request.
#[derive(Clone)]
pub(crate) struct SessionConfig {
    /// `ws`/`wss` → WebSocket mode, `http`/`https` → HTTP + SSE.
    pub(crate) url: String,
    pub(crate) api_key: Option<Arc<str>>,
    pub(crate) model: String,
    /// Instructions and tools until a prewarm replaces them.
    pub(crate) instructions: String,
    pub(crate) tools: Vec<Tool>,
    /// Sent as `prompt_cache_key` (e.g. per repo) so unchained resends hit the prompt cache.
    pub(crate) prompt_cache_key: Option<String>,
    pub(crate) rotate_after: Duration,
    pub(crate) ping_interval: Duration,
    pub(crate) pong_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) stream_idle_timeout: Duration,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_cap: Duration,
    pub(crate) max_background_attempts: u32,
    /// The reconnect policy shared with every other session of the same provider; `None`: a
    /// policy of this session's own, from the three fields above.
    pub(crate) backoff: Option<Arc<Backoff>>,
    pub(crate) on_state: Option<StateHook>,
    /// Open WebSocket connections as a lane of the provider's shared connection; `None`: a
    /// connection of the session's own.
    pub(crate) lanes: Option<LaneSpec>,
}

impl SessionConfig {
    /// Defaults: the `apply_patch` tool, no instructions, the timing constants above.
    pub(crate) fn new(
        url: impl Into<String>,
        api_key: Option<Arc<str>>,
        model: impl Into<String>,
    ) -> Self {
        SessionConfig {
            url: url.into(),
            api_key,
            model: model.into(),
            instructions: String::new(),
            tools: vec![Tool::apply_patch()],
            prompt_cache_key: None,
            rotate_after: DEFAULT_ROTATE_AFTER,
            ping_interval: DEFAULT_PING_INTERVAL,
            pong_timeout: DEFAULT_PONG_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_cap: DEFAULT_BACKOFF_CAP,
            max_background_attempts: DEFAULT_MAX_BACKGROUND_ATTEMPTS,
            backoff: None,
            on_state: None,
            lanes: None,
        }
    }
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field(
                "tools",
                &self.tools.iter().map(Tool::name).collect::<Vec<_>>(),
            )
            .field("rotate_after", &self.rotate_after)
            .finish_non_exhaustive()
    }
}

/// One turn: what is new, and everything the model should see if the chain is lost.
#[derive(Clone, Debug, Default)]
pub(crate) struct TurnRequest {
    /// Sent after `previous_response_id` when the chain is intact (tool outputs for the last
    /// response's calls are put in front of these by the session).
    pub(crate) new_input: Vec<InputItem>,
    /// Sent unchained when there is no usable chain (first turn after a reconnect,
    /// `previous_response_not_found`, HTTP + SSE): repo context, earlier messages, the model's
    /// earlier outputs ([`OutputItem::to_input`]) and `new_input`. Outputs for tool calls in it
    /// are inserted by the session after their calls when the caller left them out.
    pub(crate) full_context: Vec<InputItem>,
    pub(crate) tool_choice: Option<ToolChoice>,
}

/// The events of one turn, ending with exactly one [`TurnEvent::Done`] or
/// [`TurnEvent::Failed`]. Unbounded on purpose: the session task must never wait for a slow
/// reader (it would stop reading the socket and answering cancel); a response is bounded by
/// the model's output limit.
pub(crate) type TurnEvents = mpsc::UnboundedReceiver<TurnEvent>;

/// What a turn streams to its caller.
#[derive(Debug)]
pub(crate) enum TurnEvent {
    /// `response.created`.
    Started {
        response_id: String,
    },
    /// Message text as it streams.
    TextDelta {
        delta: String,
    },
    /// Freeform tool input (the patch) as it streams.
    ToolInputDelta {
        delta: String,
    },
    /// JSON function-call arguments as they stream.
    FunctionArgumentsDelta {
        item_id: String,
        delta: String,
    },
    ItemAdded(OutputItem),
    /// Terminal: the response completed (or stopped early, see `incomplete_reason`).
    Done(Box<TurnDone>),
    /// Terminal: no (complete) response.
    Failed(TurnFailure),
}

/// A finished turn.
#[derive(Debug)]
pub(crate) struct TurnDone {
    pub(crate) response_id: String,
    /// `Some(reason)` for `response.incomplete` (e.g. `max_output_tokens`).
    pub(crate) incomplete_reason: Option<String>,
    pub(crate) usage: Option<Usage>,
    pub(crate) output: Vec<OutputItem>,
    /// Whether the answered request was chained with `previous_response_id`.
    pub(crate) chained: bool,
    pub(crate) transport: TransportKind,
    pub(crate) timings: TurnTimings,
}

impl TurnDone {
    /// Message text of the response.
    pub(crate) fn text(&self) -> String {
        self.output.iter().filter_map(OutputItem::text).collect()
    }

    /// Tool calls the response ended with; each must be answered with
    /// [`SessionHandle::set_pending_tool_output`] before (or it is answered "not executed").
    #[cfg(test)]
    pub(crate) fn tool_calls(&self) -> impl Iterator<Item = &OutputItem> {
        self.output.iter().filter(|i| {
            matches!(
                i,
                OutputItem::CustomToolCall { .. } | OutputItem::FunctionCall { .. }
            )
        })
    }
}

/// Where a turn's time went. Durations after `sent_at` are of the last attempt.
#[derive(Clone, Debug)]
pub(crate) struct TurnTimings {
    /// The request was written to the connection.
    pub(crate) sent_at: Instant,
    pub(crate) first_event: Option<Duration>,
    /// First text, tool-input or arguments delta.
    pub(crate) first_delta: Option<Duration>,
    pub(crate) completed: Duration,
    /// Request payload bytes over all attempts.
    pub(crate) bytes_sent: usize,
    pub(crate) attempts: u8,
}

/// Why a turn (or prewarm) produced no response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TurnFailure {
    #[error("the request was cancelled")]
    Cancelled,
    #[error("the provider refused the request{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Provider {
        code: Option<String>,
        message: String,
    },
    #[error("the provider connection failed: {0}")]
    Transport(String),
    #[error("the provider session is shutting down")]
    Shutdown,
}

/// Errors of the handle's calls.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("the provider session has stopped")]
    Stopped,
    #[error("no tool call {0:?} is waiting for an output")]
    UnknownToolCall(String),
    #[error(transparent)]
    Failed(#[from] TurnFailure),
}

/// What a cancel stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CancelOutcome {
    pub(crate) in_flight: bool,
    pub(crate) queued: usize,
}

/// A snapshot for `sparkctl status`. The `cfg(test)` fields are not on the wire; the unit
/// tests read them to see what the session did.
#[derive(Clone, Debug)]
pub(crate) struct SessionStatus {
    #[cfg(test)]
    pub(crate) transport: TransportKind,
    #[cfg(test)]
    pub(crate) url: String,
    /// A live WebSocket (always `true` over HTTP, which connects per request).
    pub(crate) connected: bool,
    #[cfg(test)]
    pub(crate) connecting: bool,
    /// Age of the current connection.
    pub(crate) age: Option<Duration>,
    /// Last WebSocket ping round trip.
    pub(crate) last_rtt: Option<Duration>,
    /// The next turn can chain with `previous_response_id`.
    #[cfg(test)]
    pub(crate) chained: bool,
    #[cfg(test)]
    pub(crate) reconnects: u32,
    /// The WebSocket upgrade was refused and the session uses HTTP + SSE.
    pub(crate) fell_back: bool,
    pub(crate) last_error: Option<String>,
    /// The provider's reconnect policy: failures in a row, when the next attempt is due.
    pub(crate) backoff: BackoffStatus,
    /// This session will look at connecting again in this long (a background reconnect, or
    /// a request waiting for the policy); `None`: it waits for a request.
    pub(crate) retry_in: Option<Duration>,
    /// The `stream_id` of its lane on the provider's shared connection, while it has one.
    pub(crate) lane: Option<String>,
    /// The provider refused lanes: this session has a connection of its own.
    pub(crate) lanes_refused: bool,
}

/// Reconnect delay: uniformly random in `[0, min(cap, base·2^attempt)]` ("full jitter"), so
/// many sessions reconnecting at once spread out. `unit` is a random number in `[0, 1]`.
pub(crate) fn backoff_delay(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let ceiling = base
        .saturating_mul(2u32.saturating_pow(attempt.min(31)))
        .min(cap);
    let unit = if unit.is_nan() {
        0.0
    } else {
        unit.clamp(0.0, 1.0)
    };
    ceiling.mul_f64(unit)
}

/// A random number in `[0, 1)` from std's randomly keyed hasher (no RNG dependency needed for
/// jitter).
fn random_unit() -> f64 {
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

enum Command {
    Prewarm {
        spec: WarmSpec,
        reply: oneshot::Sender<Result<Option<String>, SessionError>>,
        requested_at: Instant,
    },
    Turn(TurnJob),
    Cancel(oneshot::Sender<CancelOutcome>),
    SetToolOutput {
        call_id: String,
        output: String,
        reply: oneshot::Sender<Result<(), SessionError>>,
    },
    Status(oneshot::Sender<SessionStatus>),
}

/// The caller's side of a session. Cloneable; the session stops when every handle is gone
/// (after finishing what it has) or when the shutdown token is cancelled.
#[derive(Clone, Debug)]
pub(crate) struct SessionHandle {
    commands: mpsc::Sender<Command>,
}

impl SessionHandle {
    async fn send(&self, command: Command) -> Result<(), SessionError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| SessionError::Stopped)
    }

    /// Prewarm (`generate:false`) with this prompt and context; they also become the prompt of
    /// later turns and what is re-prewarmed after reconnects. Starts a new conversation:
    /// the next turn chains from this prewarm. Resolves when the provider has answered, with
    /// the chain head it created: `None` over HTTP + SSE, where nothing is prewarmed (there is
    /// no `generate:false` there) and the prompt is only stored for the next turn.
    pub(crate) async fn prewarm(
        &self,
        instructions: String,
        tools: Vec<Tool>,
        context_items: impl Into<Arc<Vec<InputItem>>>,
    ) -> Result<Option<String>, SessionError> {
        let (reply, answer) = oneshot::channel();
        let spec = WarmSpec {
            instructions,
            tools,
            context: context_items.into(),
        };
        self.send(Command::Prewarm {
            spec,
            reply,
            requested_at: Instant::now(),
        })
        .await?;
        answer.await.map_err(|_| SessionError::Stopped)?
    }

    /// Queue a turn; its events arrive on the returned channel. Turns run one at a time, in
    /// order. Dropping the receiver cancels the turn.
    pub(crate) async fn turn(&self, request: TurnRequest) -> Result<TurnEvents, SessionError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.send(Command::Turn(TurnJob {
            request,
            tx,
            force_unchained: false,
            tool_outputs: None,
            attempts: 0,
            bytes_sent: 0,
        }))
        .await?;
        Ok(rx)
    }

    /// Cancel the turn in flight and every queued turn (each ends with
    /// `Failed(Cancelled)`). Turns queued after this call are not affected.
    pub(crate) async fn cancel(&self) -> Result<CancelOutcome, SessionError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Cancel(reply)).await?;
        answer.await.map_err(|_| SessionError::Stopped)
    }

    /// The output of a tool call the last response ended with; it is sent at the head of the
    /// next turn's input.
    pub(crate) async fn set_pending_tool_output(
        &self,
        call_id: impl Into<String>,
        output: impl Into<String>,
    ) -> Result<(), SessionError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::SetToolOutput {
            call_id: call_id.into(),
            output: output.into(),
            reply,
        })
        .await?;
        answer.await.map_err(|_| SessionError::Stopped)?
    }

    pub(crate) async fn status(&self) -> Result<SessionStatus, SessionError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Status(reply)).await?;
        answer.await.map_err(|_| SessionError::Stopped)
    }
}

/// Start a session task (tracked by `tracker`, stopped by `shutdown`). It connects lazily:
/// on the first prewarm or turn.
pub(crate) fn spawn(
    config: SessionConfig,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<SessionHandle, TransportError> {
    let endpoint = Endpoint::parse(&config.url)?;
    let (commands_tx, commands) = mpsc::channel(COMMAND_CAPACITY);
    let backoff = config.backoff.clone().unwrap_or_else(|| {
        Arc::new(Backoff::new(
            config.backoff_base,
            config.backoff_cap,
            config.max_background_attempts,
        ))
    });
    let session = Session {
        backoff,
        instructions: config.instructions.clone(),
        tools: config.tools.clone(),
        config,
        configured: endpoint.clone(),
        endpoint,
        fell_back: false,
        commands,
        handles_gone: false,
        shutdown,
        live: None,
        connecting: None,
        epoch: 0,
        ever_connected: false,
        reconnects: 0,
        rewarm_on_connect: false,
        retry_at: None,
        queue: VecDeque::new(),
        inflight: None,
        warm: None,
        chain: None,
        history_since_prewarm: false,
        awaiting: Vec::new(),
        pending_outputs: Vec::new(),
        last_rtt: None,
        last_error: None,
        ping_nonce: 0,
        ended: VecDeque::new(),
    };
    tracker.spawn(session.run());
    Ok(SessionHandle {
        commands: commands_tx,
    })
}

/// A prompt and context to prewarm with.
#[derive(Clone, Debug)]
struct WarmSpec {
    instructions: String,
    tools: Vec<Tool>,
    context: Arc<Vec<InputItem>>,
}

#[derive(Debug)]
struct TurnJob {
    request: TurnRequest,
    tx: mpsc::UnboundedSender<TurnEvent>,
    /// Send unchained even if a chain exists (after `previous_response_not_found` etc.).
    force_unchained: bool,
    /// Outputs for the previous response's tool calls, taken from the session when the turn
    /// is first sent and kept for resends.
    tool_outputs: Option<Vec<InputItem>>,
    attempts: u8,
    bytes_sent: usize,
}

#[derive(Debug)]
struct PrewarmJob {
    /// `Some`: an explicit prewarm (new prompt, new conversation); `None`: re-prewarm of the
    /// stored context after a reconnect.
    spec: Option<WarmSpec>,
    reply: Option<oneshot::Sender<Result<Option<String>, SessionError>>>,
    requested_at: Instant,
}

#[derive(Debug)]
enum Work {
    Turn(TurnJob),
    Prewarm(PrewarmJob),
}

impl Work {
    /// Someone waits for this work: a turn, or an explicit prewarm (not a background re-prewarm).
    fn has_caller(&self) -> bool {
        match self {
            Work::Turn(_) => true,
            Work::Prewarm(job) => job.reply.is_some(),
        }
    }
}

/// The request on the wire and what came back so far.
#[derive(Debug)]
struct InFlight {
    work: Work,
    chained: bool,
    sent_at: Instant,
    response_id: Option<String>,
    first_event: Option<Duration>,
    first_delta: Option<Duration>,
    /// Something of this response reached the caller, so it can no longer be resent quietly.
    forwarded: bool,
    items_done: Vec<OutputItem>,
}

impl InFlight {
    fn turn_tx(&self) -> Option<&mpsc::UnboundedSender<TurnEvent>> {
        match &self.work {
            Work::Turn(job) => Some(&job.tx),
            Work::Prewarm(_) => None,
        }
    }
}

#[derive(Debug)]
struct Live {
    conn: Connection,
    epoch: u64,
    connected_at: Instant,
    last_rx: Instant,
    /// Outstanding ping: nonce and send time (for the RTT).
    ping: Option<(u64, Instant)>,
    /// A ping is unanswered: no frame by then means the connection is dead.
    pong_deadline: Option<Instant>,
    /// A response completed on this connection: losing it later is not a failed attempt.
    answered: bool,
    /// An event arrived on this connection: it is more than an upgrade that goes nowhere.
    heard: bool,
}

#[derive(Debug)]
struct ChainHead {
    response_id: String,
    epoch: u64,
    from_prewarm: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallKind {
    Custom,
    Function,
}

#[derive(Debug)]
struct PendingCall {
    call_id: String,
    kind: CallKind,
}

impl PendingCall {
    fn output(&self, output: String) -> InputItem {
        let call_id = self.call_id.clone();
        match self.kind {
            CallKind::Custom => InputItem::CustomToolCallOutput { call_id, output },
            CallKind::Function => InputItem::FunctionCallOutput { call_id, output },
        }
    }

    fn of_input(item: &InputItem) -> Option<PendingCall> {
        match item {
            InputItem::CustomToolCallOutput { call_id, .. } => Some(PendingCall {
                call_id: call_id.clone(),
                kind: CallKind::Custom,
            }),
            InputItem::FunctionCallOutput { call_id, .. } => Some(PendingCall {
                call_id: call_id.clone(),
                kind: CallKind::Function,
            }),
            _ => None,
        }
    }
}

type ConnectFuture = Pin<Box<dyn Future<Output = Result<Connection, TransportError>> + Send>>;

/// What woke the session loop.
enum Wake {
    Shutdown,
    Command(Option<Command>),
    Incoming(Result<Incoming, TransportError>),
    Connected(Result<Connection, TransportError>),
    ConsumerGone,
    Timer,
}

struct Session {
    config: SessionConfig,
    /// Current endpoint: the configured one, or its HTTP fallback.
    endpoint: Endpoint,
    /// The endpoint the session was configured with.
    configured: Endpoint,
    fell_back: bool,
    commands: mpsc::Receiver<Command>,
    handles_gone: bool,
    shutdown: CancellationToken,

    live: Option<Live>,
    connecting: Option<ConnectFuture>,
    /// Incremented per connection; chain heads are valid only in their epoch.
    epoch: u64,
    ever_connected: bool,
    reconnects: u32,
    /// Re-prewarm once the next connection is up.
    rewarm_on_connect: bool,
    /// The provider's reconnect policy, shared with its other sessions.
    backoff: Arc<Backoff>,
    /// When to look at connecting again (a background reconnect, or a request waiting for
    /// the policy's next allowed attempt).
    retry_at: Option<Instant>,

    queue: VecDeque<Work>,
    inflight: Option<InFlight>,

    instructions: String,
    tools: Vec<Tool>,
    /// Context of the last explicit prewarm.
    warm: Option<Arc<Vec<InputItem>>>,
    chain: Option<ChainHead>,
    /// A turn completed since the last explicit prewarm: a re-prewarm no longer covers the
    /// conversation, so the next turn after a reconnect goes unchained.
    history_since_prewarm: bool,
    /// Tool calls of the last response, still to be answered.
    awaiting: Vec<PendingCall>,
    /// Outputs the caller supplied for `awaiting`.
    pending_outputs: Vec<InputItem>,

    last_rtt: Option<Duration>,
    last_error: Option<String>,
    ping_nonce: u64,
    /// Responses that already ended: a late duplicate of one of their events (a replayed
    /// `response.completed`) must not end the request in flight now.
    ended: VecDeque<String>,
}

async fn next_incoming(live: &mut Option<Live>) -> Result<Incoming, TransportError> {
    match live {
        Some(live) => live.conn.recv().await,
        None => std::future::pending().await,
    }
}

async fn connect_result(
    connecting: &mut Option<ConnectFuture>,
) -> Result<Connection, TransportError> {
    match connecting {
        Some(future) => future.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn consumer_gone(inflight: &Option<InFlight>) {
    match inflight.as_ref().and_then(InFlight::turn_tx) {
        Some(tx) => tx.closed().await,
        None => std::future::pending().await,
    }
}

impl Session {
    async fn run(mut self) {
        loop {
            self.pump().await;
            if self.handles_gone && self.inflight.is_none() && self.queue.is_empty() {
                break;
            }
            let deadline = self.next_deadline();
            let wake = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => Wake::Shutdown,
                command = self.commands.recv(), if !self.handles_gone => Wake::Command(command),
                incoming = next_incoming(&mut self.live), if self.live.is_some() => Wake::Incoming(incoming),
                result = connect_result(&mut self.connecting), if self.connecting.is_some() => Wake::Connected(result),
                () = consumer_gone(&self.inflight) => Wake::ConsumerGone,
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if deadline.is_some() => Wake::Timer,
            };
            match wake {
                Wake::Shutdown => break,
                Wake::Command(None) => self.handles_gone = true,
                Wake::Command(Some(command)) => self.on_command(command),
                Wake::Incoming(incoming) => self.on_incoming(incoming),
                Wake::Connected(result) => self.on_connected(result).await,
                Wake::ConsumerGone => {
                    debug!("turn receiver dropped: cancelling the response");
                    self.abandon_inflight_turn();
                }
                Wake::Timer => self.on_timer().await,
            }
        }
        self.stop();
    }

    /// Fail everything outstanding and close the connection.
    fn stop(&mut self) {
        if let Some(f) = self.inflight.take() {
            fail_work(f.work, TurnFailure::Shutdown);
        }
        for work in self.queue.drain(..) {
            fail_work(work, TurnFailure::Shutdown);
        }
        if let Some(live) = self.live.take() {
            live.conn.close();
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Prewarm {
                spec,
                reply,
                requested_at,
            } => self.queue.push_back(Work::Prewarm(PrewarmJob {
                spec: Some(spec),
                reply: Some(reply),
                requested_at,
            })),
            Command::Turn(job) => self.queue.push_back(Work::Turn(job)),
            Command::Cancel(reply) => {
                let outcome = self.cancel();
                let _ = reply.send(outcome);
            }
            Command::SetToolOutput {
                call_id,
                output,
                reply,
            } => {
                let _ = reply.send(self.set_tool_output(call_id, output));
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn set_tool_output(&mut self, call_id: String, output: String) -> Result<(), SessionError> {
        let Some(call) = self.awaiting.iter().find(|c| c.call_id == call_id) else {
            return Err(SessionError::UnknownToolCall(call_id));
        };
        let item = call.output(output);
        self.pending_outputs
            .retain(|o| o.call_id() != Some(call_id.as_str()));
        self.pending_outputs.push(item);
        Ok(())
    }

    fn status(&self) -> SessionStatus {
        SessionStatus {
            #[cfg(test)]
            transport: self.endpoint.kind(),
            #[cfg(test)]
            url: self.endpoint.url().to_owned(),
            connected: self.live.is_some(),
            #[cfg(test)]
            connecting: self.connecting.is_some(),
            age: self.live.as_ref().map(|l| l.connected_at.elapsed()),
            last_rtt: self.last_rtt,
            #[cfg(test)]
            chained: self.usable_chain().is_some(),
            #[cfg(test)]
            reconnects: self.reconnects,
            fell_back: self.fell_back,
            last_error: self.last_error.clone(),
            backoff: self.backoff.status(Instant::now()),
            retry_in: self
                .retry_at
                .map(|t| t.saturating_duration_since(Instant::now())),
            lane: self
                .live
                .as_ref()
                .and_then(|l| l.conn.stream_id())
                .map(str::to_owned),
            lanes_refused: self.config.lanes.as_ref().is_some_and(LaneSpec::refused),
        }
    }

    /// The response id the next turn may chain from.
    fn usable_chain(&self) -> Option<&str> {
        let live = self.live.as_ref()?;
        if live.conn.kind() != TransportKind::WebSocket {
            return None;
        }
        self.chain
            .as_ref()
            .filter(|c| c.epoch == live.epoch && !(c.from_prewarm && self.history_since_prewarm))
            .map(|c| c.response_id.as_str())
    }

    fn cancel(&mut self) -> CancelOutcome {
        let mut outcome = CancelOutcome::default();
        let queue = std::mem::take(&mut self.queue);
        for work in queue {
            match work {
                Work::Turn(job) => {
                    outcome.queued += 1;
                    self.restore_tool_outputs(&job);
                    let _ = job.tx.send(TurnEvent::Failed(TurnFailure::Cancelled));
                }
                other @ Work::Prewarm(_) => self.queue.push_back(other),
            }
        }
        outcome.in_flight = self.abandon_inflight_turn();
        outcome
    }

    /// Stop the turn in flight (if any): its caller gets `Failed(Cancelled)`, the WebSocket is
    /// closed and reopened (+ re-prewarmed) in the background, an HTTP request is aborted.
    fn abandon_inflight_turn(&mut self) -> bool {
        if !matches!(
            self.inflight,
            Some(InFlight {
                work: Work::Turn(_),
                ..
            })
        ) {
            return false;
        }
        let Some(InFlight {
            work: Work::Turn(job),
            ..
        }) = self.inflight.take()
        else {
            return false;
        };
        self.restore_tool_outputs(&job);
        let _ = job.tx.send(TurnEvent::Failed(TurnFailure::Cancelled));
        match self.live.as_mut() {
            Some(live) if live.conn.kind() == TransportKind::HttpSse => live.conn.abandon(),
            Some(_) => {
                // No cancel event exists in WebSocket mode: only closing the socket stops the
                // response, and a new socket guarantees none of its events reach a later turn.
                self.drop_live();
                self.rewarm_on_connect = true;
                self.start_connect();
            }
            None => {}
        }
        true
    }

    /// A turn that took the pending tool outputs did not get them to the provider: keep them
    /// for the next turn.
    fn restore_tool_outputs(&mut self, job: &TurnJob) {
        if let Some(outputs) = &job.tool_outputs
            && self.awaiting.is_empty()
        {
            self.awaiting = outputs.iter().filter_map(PendingCall::of_input).collect();
            self.pending_outputs = outputs.clone();
        }
    }

    /// Take the outputs for the last response's tool calls, in call order; calls the caller
    /// did not answer get [`UNANSWERED_TOOL_OUTPUT`].
    fn take_tool_outputs(&mut self) -> Vec<InputItem> {
        let mut outputs = Vec::with_capacity(self.awaiting.len());
        for call in self.awaiting.drain(..) {
            let supplied = self
                .pending_outputs
                .iter()
                .position(|o| o.call_id() == Some(call.call_id.as_str()))
                .map(|i| self.pending_outputs.swap_remove(i));
            outputs.push(supplied.unwrap_or_else(|| {
                warn!(call_id = %call.call_id, "tool call left unanswered; sending a placeholder");
                call.output(UNANSWERED_TOOL_OUTPUT.to_owned())
            }));
        }
        self.pending_outputs.clear();
        outputs
    }

    /// Close the connection on purpose (cancel, rotation): neither a success nor a failure of
    /// the provider, but it ends the attempt other sessions may be waiting on.
    fn drop_live(&mut self) {
        if let Some(live) = self.live.take() {
            if !live.answered {
                self.backoff.released();
            }
            live.conn.close();
        }
        self.chain = None;
    }

    /// Open a connection, when the provider's reconnect policy allows it now. Otherwise a
    /// request waits for the next allowed attempt if that is near, or fails at once saying when
    /// it is due; background work waits, or stops when the policy pauses it.
    fn start_connect(&mut self) {
        if self.connecting.is_some() || self.live.is_some() {
            return;
        }
        self.retry_at = None;
        let now = Instant::now();
        self.choose_transport(now);
        let background = !self.queue.iter().any(Work::has_caller);
        match self.backoff.permit(now, background) {
            Permit::Go => {}
            Permit::At(at)
                if background || at.saturating_duration_since(now) <= MAX_REQUEST_WAIT =>
            {
                self.retry_at = Some(at);
                return;
            }
            Permit::At(at) => {
                let status = self.backoff.status(now);
                let message = format!(
                    "the provider failed {} connection attempts in a row (last: {}); the next \
                     attempt is due in {:.1} s",
                    status.failures,
                    status.last_error.as_deref().unwrap_or("unknown error"),
                    at.saturating_duration_since(now).as_secs_f64()
                );
                for work in self.queue.drain(..) {
                    fail_work(work, TurnFailure::Transport(message.clone()));
                }
                if self.warm.is_some() {
                    self.rewarm_on_connect = true;
                    self.start_connect();
                }
                return;
            }
            Permit::Paused => {
                info!(
                    url = self.endpoint.url(),
                    "provider failing; background reconnects paused until the next request"
                );
                for work in self.queue.drain(..) {
                    fail_work(
                        work,
                        TurnFailure::Transport("background reconnects paused".into()),
                    );
                }
                return;
            }
        }
        let timeouts = ConnectTimeouts {
            connect: self.config.connect_timeout,
            stream_idle: self.config.stream_idle_timeout,
        };
        let (endpoint, api_key) = (self.endpoint.clone(), self.config.api_key.clone());
        self.connecting = Some(match &self.config.lanes {
            Some(lanes) if endpoint.kind() == TransportKind::WebSocket => Box::pin(
                lanes
                    .clone()
                    .open(endpoint, api_key, timeouts, self.config.rotate_after),
            ),
            _ => Box::pin(Connection::open(endpoint, api_key, timeouts)),
        });
    }

    /// WebSocket mode or HTTP + SSE for the next connection: HTTP while the provider's policy
    /// says WebSocket mode failed there lately, WebSocket mode again once that has expired.
    fn choose_transport(&mut self, now: Instant) {
        if self.configured.kind() != TransportKind::WebSocket {
            return;
        }
        match (self.backoff.prefers_http(now), self.fell_back) {
            (true, false) => {
                if let Some(fallback) = self.configured.http_fallback() {
                    info!(
                        url = fallback.url(),
                        "WebSocket mode failed with this provider lately; using HTTP + SSE"
                    );
                    self.endpoint = fallback;
                    self.fell_back = true;
                    self.report(SessionState::FellBackToHttp);
                }
            }
            (false, true) => {
                info!(url = self.configured.url(), "trying WebSocket mode again");
                self.endpoint = self.configured.clone();
                self.fell_back = false;
            }
            _ => {}
        }
    }

    /// Reconnect in the background, when the provider's policy allows (see [`Backoff`]).
    fn schedule_reconnect(&mut self) {
        self.start_connect();
    }

    async fn on_connected(&mut self, result: Result<Connection, TransportError>) {
        self.connecting = None;
        match result {
            Ok(conn) => {
                self.epoch += 1;
                if self.ever_connected {
                    self.reconnects += 1;
                }
                self.ever_connected = true;
                let ws = conn.kind() == TransportKind::WebSocket;
                debug!(
                    url = self.endpoint.url(),
                    transport = %conn.kind(),
                    reconnects = self.reconnects,
                    "provider connected"
                );
                // Not a success yet: only a completed response resets the policy.
                self.backoff.opened(ws);
                let now = Instant::now();
                self.live = Some(Live {
                    // A lane's age is its shared connection's: that is what the provider's
                    // lifetime limit counts.
                    connected_at: conn.opened_at().unwrap_or(now),
                    answered: conn.answered(),
                    heard: conn.heard(),
                    conn,
                    epoch: self.epoch,
                    last_rx: now,
                    ping: None,
                    pong_deadline: None,
                });
                self.report(if ws {
                    SessionState::ConnectedWebSocket
                } else {
                    SessionState::ConnectedHttp
                });
                if ws {
                    // A first RTT sample for `status`, at no cost to the first turn.
                    self.send_ping().await;
                }
                if std::mem::take(&mut self.rewarm_on_connect) && ws {
                    self.queue_rewarm();
                }
            }
            Err(e) if e.means_no_websocket() => match self.endpoint.http_fallback() {
                Some(fallback) => {
                    warn!(error = %e, url = fallback.url(), "WebSocket mode refused; falling back to HTTP + SSE");
                    self.endpoint = fallback;
                    self.fell_back = true;
                    self.report(SessionState::FellBackToHttp);
                    // The provider answered (it refused the upgrade): not a failed attempt.
                    self.backoff.released();
                    self.backoff.fall_back(Instant::now());
                    self.start_connect();
                }
                None => self.connect_failed(e),
            },
            Err(e) => self.connect_failed(e),
        }
    }

    /// Tell the state hook, if any.
    fn report(&self, state: SessionState) {
        if let Some(hook) = &self.config.on_state {
            hook(state);
        }
    }

    fn connect_failed(&mut self, e: TransportError) {
        warn!(error = %e, url = self.endpoint.url(), "provider connect failed");
        self.report(SessionState::ConnectFailed);
        let message = e.to_string();
        self.backoff.failed(Instant::now(), &message, random_unit());
        self.last_error = Some(message.clone());
        // Waiting callers learn it now instead of waiting through the backoff.
        for work in self.queue.drain(..) {
            fail_work(work, TurnFailure::Transport(message.clone()));
        }
        if self.warm.is_some() {
            self.rewarm_on_connect = true;
            self.schedule_reconnect();
        }
    }

    /// Queue a re-prewarm of the stored context, ahead of waiting work, when it can be a
    /// useful chain head.
    fn queue_rewarm(&mut self) {
        if self.warm.is_none() || self.history_since_prewarm {
            return;
        }
        let front_goes_unchained = match self.queue.front() {
            Some(Work::Turn(job)) => job.force_unchained,
            Some(Work::Prewarm(job)) => job.spec.is_some(),
            None => false,
        };
        if !front_goes_unchained {
            self.queue.push_front(Work::Prewarm(PrewarmJob {
                spec: None,
                reply: None,
                requested_at: Instant::now(),
            }));
        }
    }

    async fn send_ping(&mut self) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        self.ping_nonce = self.ping_nonce.wrapping_add(1);
        let nonce = self.ping_nonce;
        let now = Instant::now();
        match live
            .conn
            .ping(Bytes::copy_from_slice(&nonce.to_be_bytes()))
            .await
        {
            Ok(()) => {
                live.ping = Some((nonce, now));
                live.pong_deadline = Some(now + self.config.pong_timeout);
            }
            Err(e) => self.connection_lost(e.to_string()),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut deadline = self.retry_at;
        let mut earliest = |t: Instant| {
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        };
        if let Some(live) = &self.live
            && live.conn.kind() == TransportKind::WebSocket
        {
            earliest(
                live.pong_deadline
                    .unwrap_or(live.last_rx + self.config.ping_interval),
            );
            if self.inflight.is_none() && self.queue.is_empty() {
                earliest(live.connected_at + self.config.rotate_after);
            }
        }
        deadline
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            self.start_connect();
        }
        let Some(live) = &self.live else {
            return;
        };
        if live.conn.kind() != TransportKind::WebSocket {
            return;
        }
        if live.pong_deadline.is_some_and(|t| t <= now) {
            live.conn.give_up();
            self.connection_lost(format!(
                "no answer to a ping within {:?}",
                self.config.pong_timeout
            ));
            return;
        }
        let idle = self.inflight.is_none() && self.queue.is_empty();
        if idle && now.saturating_duration_since(live.connected_at) >= self.config.rotate_after {
            info!("rotating the provider connection before its age limit");
            self.report(SessionState::Rotating);
            self.drop_live();
            self.rewarm_on_connect = true;
            self.start_connect();
            return;
        }
        if live.pong_deadline.is_none()
            && now.saturating_duration_since(live.last_rx) >= self.config.ping_interval
        {
            self.send_ping().await;
        }
    }

    fn on_incoming(&mut self, incoming: Result<Incoming, TransportError>) {
        let incoming = match incoming {
            Ok(incoming) => incoming,
            Err(e) => return self.connection_lost(e.to_string()),
        };
        if let Some(live) = self.live.as_mut() {
            live.last_rx = Instant::now();
            live.pong_deadline = None;
            if matches!(incoming, Incoming::Event(_)) {
                live.heard = true;
            }
        }
        match incoming {
            Incoming::Event(event) => self.on_event(event),
            Incoming::Pong(payload) => {
                if let Some(live) = self.live.as_mut()
                    && let Some((nonce, sent)) = live.ping
                    && payload.as_ref() == nonce.to_be_bytes()
                {
                    self.last_rtt = Some(sent.elapsed());
                    live.ping = None;
                }
            }
            Incoming::Heartbeat => {}
            Incoming::Closed(reason) => self.connection_lost(reason),
            Incoming::LanesRefused => self.lanes_refused(),
            Incoming::StreamEnd => {
                if self.inflight.is_some() {
                    self.connection_lost("the response stream ended before completion".to_owned());
                }
            }
        }
    }

    /// The connection is gone: resend the turn in flight if nothing of it reached the caller,
    /// otherwise fail it; reconnect now if work waits, else in the background.
    fn connection_lost(&mut self, reason: String) {
        warn!(%reason, "provider connection lost");
        self.report(SessionState::Lost);
        self.last_error = Some(reason.clone());
        let mut falls_back = false;
        if let Some(mut live) = self.live.take() {
            let ws = live.conn.kind() == TransportKind::WebSocket;
            // On a shared connection, what happened on other lanes counts too.
            live.heard |= live.conn.heard();
            live.answered |= live.conn.answered();
            if ws && !live.heard && self.configured.http_fallback().is_some() {
                // A WebSocket that opened and closed before its first event: treated like a
                // refused upgrade. The request is retried over HTTP + SSE, and the provider's
                // sessions use it for a while.
                warn!(%reason, "WebSocket mode failed after the upgrade; falling back to HTTP + SSE");
                self.backoff.released();
                self.backoff.fall_back(Instant::now());
                falls_back = true;
            } else if !live.answered {
                // Dropped before any response on it completed: the attempt failed (a gateway
                // that accepts connections and drops them must not be reconnected to at once).
                self.backoff.failed(Instant::now(), &reason, random_unit());
            }
            live.conn.close();
        }
        self.chain = None;
        if let Some(f) = self.inflight.take() {
            match f.work {
                Work::Turn(mut job) if !f.forwarded && job.attempts < MAX_ATTEMPTS => {
                    job.force_unchained = true;
                    self.queue.push_front(Work::Turn(job));
                }
                // An explicit prewarm is answered over HTTP (which has none): not failed.
                work @ Work::Prewarm(_) if falls_back && work.has_caller() => {
                    self.queue.push_front(work);
                }
                work => fail_work(work, TurnFailure::Transport(reason)),
            }
        }
        self.rewarm_on_connect = true;
        if !self.queue.is_empty() {
            self.start_connect();
        } else if self.warm.is_some() && self.endpoint.kind() == TransportKind::WebSocket {
            self.schedule_reconnect();
        }
    }

    /// The provider refused `stream_id` lanes (the shared connection is gone): resend what was
    /// in flight on a connection of this session's own. Not a failure of the provider.
    fn lanes_refused(&mut self) {
        info!("the provider refuses stream_id lanes: reconnecting on a connection of its own");
        self.report(SessionState::Lost);
        self.drop_live();
        if let Some(f) = self.inflight.take() {
            match f.work {
                Work::Turn(mut job) if job.attempts < MAX_ATTEMPTS => {
                    job.force_unchained = true;
                    self.queue.push_front(Work::Turn(job));
                }
                work @ Work::Prewarm(_) if work.has_caller() => self.queue.push_front(work),
                work @ Work::Turn(_) => fail_work(
                    work,
                    TurnFailure::Transport("the provider refused stream_id lanes".to_owned()),
                ),
                // A background re-prewarm: `rewarm_on_connect` redoes it.
                _ => {}
            }
        }
        self.rewarm_on_connect = true;
        if !self.queue.is_empty() {
            self.start_connect();
        } else if self.warm.is_some() {
            self.schedule_reconnect();
        }
    }

    /// Start queued work while the connection is free.
    async fn pump(&mut self) {
        while self.inflight.is_none() && !self.queue.is_empty() {
            if self.live.as_ref().is_some_and(|l| {
                l.conn.kind() == TransportKind::WebSocket
                    && l.connected_at.elapsed() >= self.config.rotate_after
            }) {
                info!("rotating the provider connection before its age limit");
                self.report(SessionState::Rotating);
                self.drop_live();
                self.rewarm_on_connect = true;
            }
            if self.fell_back && self.live.is_some() && !self.backoff.prefers_http(Instant::now()) {
                // The fallback has run its time: the next connection tries WebSocket mode.
                self.drop_live();
            }
            if self.live.is_none() {
                self.start_connect();
                return;
            }
            let Some(work) = self.queue.pop_front() else {
                return;
            };
            match work {
                Work::Prewarm(job) => self.start_prewarm(job).await,
                Work::Turn(job) => self.start_turn(job).await,
            }
        }
    }

    async fn start_prewarm(&mut self, job: PrewarmJob) {
        if let Some(spec) = &job.spec {
            self.instructions.clone_from(&spec.instructions);
            self.tools.clone_from(&spec.tools);
            self.warm = Some(spec.context.clone());
            self.history_since_prewarm = false;
            self.awaiting.clear();
            self.pending_outputs.clear();
            self.chain = None;
        }
        let (Some(live), Some(context)) = (self.live.as_ref(), self.warm.clone()) else {
            return reply_prewarm(job, Ok(None));
        };
        if live.conn.kind() != TransportKind::WebSocket {
            // No `generate:false` over HTTP: the prompt is stored for the next turn.
            return reply_prewarm(job, Ok(None));
        }
        let body = RequestParts {
            model: &self.config.model,
            instructions: &self.instructions,
            input: context.iter().collect(),
            tools: &self.tools,
            tool_choice: None,
            previous_response_id: None,
            prompt_cache_key: self.config.prompt_cache_key.as_deref(),
            generate: false,
            stream_id: live.conn.stream_id(),
        }
        .encode(Framing::WebSocket);
        let body = match body {
            Ok(body) => body,
            Err(e) => {
                return reply_prewarm(job, Err(TurnFailure::Transport(e.to_string())));
            }
        };
        let Some(live) = self.live.as_mut() else {
            return reply_prewarm(job, Ok(None));
        };
        match live.conn.send(body).await {
            Ok(()) => {
                self.inflight = Some(InFlight::new(Work::Prewarm(job), false));
            }
            Err(e) => {
                let reason = e.to_string();
                // Only a background re-prewarm is retried (by the reconnect it triggers).
                if job.reply.is_some() {
                    reply_prewarm(job, Err(TurnFailure::Transport(reason.clone())));
                }
                self.connection_lost(reason);
            }
        }
    }

    async fn start_turn(&mut self, mut job: TurnJob) {
        if job.tx.is_closed() {
            self.restore_tool_outputs(&job);
            return;
        }
        if job.tool_outputs.is_none() {
            job.tool_outputs = Some(self.take_tool_outputs());
        }
        let Some(live) = self.live.as_ref() else {
            self.queue.push_front(Work::Turn(job));
            return;
        };
        let framing = match live.conn.kind() {
            TransportKind::WebSocket => Framing::WebSocket,
            TransportKind::HttpSse => Framing::Http,
        };
        let chain = if job.force_unchained {
            None
        } else {
            self.usable_chain().map(str::to_owned)
        };
        let outputs = job.tool_outputs.as_deref().unwrap_or_default();
        let input: Vec<&InputItem> = match chain {
            Some(_) => outputs.iter().chain(&job.request.new_input).collect(),
            None => unchained_input(&job.request.full_context, outputs),
        };
        let body = RequestParts {
            model: &self.config.model,
            instructions: &self.instructions,
            input,
            tools: &self.tools,
            tool_choice: job.request.tool_choice,
            previous_response_id: chain.as_deref(),
            prompt_cache_key: self.config.prompt_cache_key.as_deref(),
            generate: true,
            stream_id: live.conn.stream_id(),
        }
        .encode(framing);
        let body = match body {
            Ok(body) => body,
            Err(e) => {
                let _ = job
                    .tx
                    .send(TurnEvent::Failed(TurnFailure::Transport(e.to_string())));
                return;
            }
        };
        job.attempts += 1;
        job.bytes_sent += body.len();
        let Some(live) = self.live.as_mut() else {
            self.queue.push_front(Work::Turn(job));
            return;
        };
        match live.conn.send(body).await {
            Ok(()) => {
                self.inflight = Some(InFlight::new(Work::Turn(job), chain.is_some()));
            }
            Err(e) => {
                // Nothing reached the provider; `connection_lost` decides on a resend.
                self.inflight = Some(InFlight::new(Work::Turn(job), chain.is_some()));
                self.connection_lost(e.to_string());
            }
        }
    }

    fn on_event(&mut self, event: ServerEvent) {
        let Some(f) = self.inflight.as_mut() else {
            debug!(?event, "provider event outside any request ignored");
            return;
        };
        if let Some(id) = event.response_id() {
            // An event naming another response than the one in flight (a duplicate delivered
            // late, a stray of an abandoned response) would otherwise end this request with
            // that response's output: the caller would get an empty or an old answer.
            let other = f.response_id.as_deref().is_some_and(|cur| cur != id);
            if other || self.ended.iter().any(|e| e == id) {
                warn!(
                    response = id,
                    kind = event.kind(),
                    "event of another response ignored"
                );
                return;
            }
            if event.is_terminal() {
                if self.ended.len() >= ENDED_KEPT {
                    self.ended.pop_front();
                }
                self.ended.push_back(id.to_owned());
            }
        }
        let since = f.sent_at.elapsed();
        f.first_event.get_or_insert(since);
        match event {
            ServerEvent::Created { id } => {
                f.response_id = Some(id.clone());
                f.forward(TurnEvent::Started { response_id: id });
            }
            ServerEvent::OutputTextDelta { delta, .. } => {
                f.first_delta.get_or_insert(since);
                f.forwarded = true;
                f.forward(TurnEvent::TextDelta { delta });
            }
            ServerEvent::CustomToolCallInputDelta { delta, .. } => {
                f.first_delta.get_or_insert(since);
                f.forwarded = true;
                f.forward(TurnEvent::ToolInputDelta { delta });
            }
            ServerEvent::FunctionCallArgumentsDelta { item_id, delta } => {
                f.first_delta.get_or_insert(since);
                f.forwarded = true;
                f.forward(TurnEvent::FunctionArgumentsDelta { item_id, delta });
            }
            ServerEvent::OutputItemAdded { item, .. } => {
                f.forwarded = true;
                f.forward(TurnEvent::ItemAdded(item));
            }
            ServerEvent::OutputItemDone { item, .. } => {
                f.forwarded = true;
                f.items_done.push(item);
            }
            ServerEvent::Completed { response } => self.finish(response, None),
            ServerEvent::Incomplete { response } => {
                let reason = response
                    .incomplete_details
                    .as_ref()
                    .and_then(|d| d.reason.clone())
                    .unwrap_or_else(|| "unknown".to_owned());
                self.finish(response, Some(reason));
            }
            ServerEvent::Failed { response } => {
                let error = response.error.unwrap_or_default();
                self.chain = None;
                self.fail_inflight(TurnFailure::Provider {
                    code: error.code,
                    message: error
                        .message
                        .unwrap_or_else(|| "the response failed".to_owned()),
                });
            }
            ServerEvent::Error { code, message, .. } => self.on_error(code, message),
            ServerEvent::Other(kind) => debug!(%kind, "provider event ignored"),
        }
    }

    fn fail_inflight(&mut self, failure: TurnFailure) {
        if let Some(f) = self.inflight.take() {
            fail_work(f.work, failure);
        }
    }

    fn on_error(&mut self, code: Option<String>, message: String) {
        let Some(f) = self.inflight.take() else {
            return;
        };
        self.chain = None;
        let limit = code.as_deref() == Some(CONNECTION_LIMIT_REACHED);
        let not_found = code.as_deref() == Some(PREVIOUS_RESPONSE_NOT_FOUND);
        match f.work {
            Work::Turn(mut job)
                if !f.forwarded
                    && job.attempts < MAX_ATTEMPTS
                    && (limit || (not_found && f.chained)) =>
            {
                info!(
                    code = code.as_deref().unwrap_or_default(),
                    "resending the turn unchained"
                );
                job.force_unchained = true;
                self.queue.push_front(Work::Turn(job));
                if limit {
                    // The provider will not serve this connection any more.
                    self.drop_live();
                }
            }
            work => {
                fail_work(work, TurnFailure::Provider { code, message });
                if limit {
                    self.drop_live();
                    self.rewarm_on_connect = true;
                    self.start_connect();
                }
            }
        }
    }

    fn finish(&mut self, response: ResponseBody, incomplete_reason: Option<String>) {
        let Some(f) = self.inflight.take() else {
            return;
        };
        self.backoff.succeeded();
        self.last_error = None;
        if let Some(live) = self.live.as_mut() {
            live.answered = true;
        }
        let ResponseBody {
            id, usage, output, ..
        } = response;
        let id = if id.is_empty() {
            f.response_id.clone().unwrap_or_default()
        } else {
            id
        };
        let epoch = self.live.as_ref().map(|l| l.epoch);
        let ws = self
            .live
            .as_ref()
            .is_some_and(|l| l.conn.kind() == TransportKind::WebSocket);
        let head = |from_prewarm| {
            epoch
                .filter(|_| ws && !id.is_empty())
                .map(|epoch| ChainHead {
                    response_id: id.clone(),
                    epoch,
                    from_prewarm,
                })
        };
        match f.work {
            Work::Prewarm(job) => {
                self.chain = head(true);
                reply_prewarm(job, Ok(Some(id)));
            }
            Work::Turn(job) => {
                self.chain = head(false);
                self.history_since_prewarm = true;
                let output = if output.is_empty() {
                    f.items_done
                } else {
                    output
                };
                self.awaiting = output
                    .iter()
                    .filter_map(|item| match item {
                        OutputItem::CustomToolCall { call_id, .. } => Some(PendingCall {
                            call_id: call_id.clone(),
                            kind: CallKind::Custom,
                        }),
                        OutputItem::FunctionCall { call_id, .. } => Some(PendingCall {
                            call_id: call_id.clone(),
                            kind: CallKind::Function,
                        }),
                        _ => None,
                    })
                    .collect();
                self.pending_outputs.clear();
                let timings = TurnTimings {
                    sent_at: f.sent_at,
                    first_event: f.first_event,
                    first_delta: f.first_delta,
                    completed: f.sent_at.elapsed(),
                    bytes_sent: job.bytes_sent,
                    attempts: job.attempts,
                };
                let done = TurnDone {
                    response_id: id,
                    incomplete_reason,
                    usage,
                    output,
                    chained: f.chained,
                    transport: self.endpoint.kind(),
                    timings,
                };
                debug!(
                    response_id = %done.response_id,
                    transport = %done.transport,
                    chained = done.chained,
                    attempts = done.timings.attempts,
                    first_event = ?done.timings.first_event,
                    completed = ?done.timings.completed,
                    "turn done"
                );
                let _ = job.tx.send(TurnEvent::Done(Box::new(done)));
            }
        }
    }
}

impl InFlight {
    fn new(work: Work, chained: bool) -> InFlight {
        InFlight {
            work,
            chained,
            sent_at: Instant::now(),
            response_id: None,
            first_event: None,
            first_delta: None,
            forwarded: false,
            items_done: Vec::new(),
        }
    }

    fn forward(&self, event: TurnEvent) {
        if let Some(tx) = self.turn_tx() {
            let _ = tx.send(event);
        }
    }
}

fn reply_prewarm(job: PrewarmJob, result: Result<Option<String>, TurnFailure>) {
    let elapsed = job.requested_at.elapsed();
    match (&result, &job.reply) {
        (Err(e), None) => warn!(error = %e, "background prewarm failed"),
        (Ok(id), None) => debug!(?id, ?elapsed, "background prewarm done"),
        _ => {}
    }
    if let Some(reply) = job.reply {
        let _ = reply.send(result.map_err(SessionError::from));
    }
}

fn fail_work(work: Work, failure: TurnFailure) {
    match work {
        Work::Turn(job) => {
            let _ = job.tx.send(TurnEvent::Failed(failure));
        }
        Work::Prewarm(job) => reply_prewarm(job, Err(failure)),
    }
}

/// The unchained input: the caller's full context, with each supplied tool output placed
/// right after its call when the context does not answer that call itself. Outputs whose
/// call is not in the context are dropped: the provider refuses an output without its call.
fn unchained_input<'a>(context: &'a [InputItem], outputs: &'a [InputItem]) -> Vec<&'a InputItem> {
    let mut input = Vec::with_capacity(context.len() + outputs.len());
    for item in context {
        input.push(item);
        if !item.is_call() {
            continue;
        }
        let id = item.call_id();
        let answered = context
            .iter()
            .any(|other| other.is_call_output() && other.call_id() == id);
        if !answered && let Some(output) = outputs.iter().find(|o| o.call_id() == id) {
            input.push(output);
        }
    }
    input
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_full_jitter_bounds() {
        let base = Duration::from_millis(250);
        let cap = Duration::from_secs(30);
        for attempt in 0..40 {
            let ceiling = base
                .saturating_mul(2u32.saturating_pow(attempt.min(31)))
                .min(cap);
            assert_eq!(backoff_delay(attempt, base, cap, 0.0), Duration::ZERO);
            assert_eq!(backoff_delay(attempt, base, cap, 1.0), ceiling);
            let mid = backoff_delay(attempt, base, cap, 0.5);
            assert!(mid <= ceiling && mid >= ceiling / 2 - Duration::from_nanos(1));
        }
        assert_eq!(backoff_delay(0, base, cap, 1.0), base);
        assert_eq!(backoff_delay(3, base, cap, 1.0), base * 8);
        assert_eq!(backoff_delay(1000, base, cap, 1.0), cap);
        assert_eq!(backoff_delay(2, base, cap, f64::NAN), Duration::ZERO);
        assert_eq!(backoff_delay(2, base, cap, 7.0), base * 4);
        for _ in 0..1000 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn unchained_input_places_outputs_after_their_calls() {
        let call = InputItem::CustomToolCall {
            call_id: "c1".into(),
            name: "apply_patch".into(),
            input: "p".into(),
        };
        let out = InputItem::CustomToolCallOutput {
            call_id: "c1".into(),
            output: "ok".into(),
        };
        let stray = InputItem::CustomToolCallOutput {
            call_id: "c9".into(),
            output: "?".into(),
        };
        let ask = InputItem::user_text("next");
        let context = vec![InputItem::user_text("first"), call.clone(), ask.clone()];
        let outputs = vec![out.clone(), stray];
        let got = unchained_input(&context, &outputs);
        assert_eq!(got, vec![&context[0], &call, &out, &ask]);
        // Already answered in the context: not duplicated.
        let context = vec![call.clone(), out.clone(), ask.clone()];
        assert_eq!(unchained_input(&context, &outputs), vec![&call, &out, &ask]);
    }
}
