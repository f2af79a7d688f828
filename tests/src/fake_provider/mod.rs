//! A fake Responses-API provider for spark's tests and benchmarks.
//!
//! It speaks the real wire protocol, on one loopback port, as strictly as the real service:
//! - **WebSocket mode** (`GET /v1/responses` + `Upgrade: websocket`): the client sends
//!   `{"type":"response.create", …}` text frames and receives the Responses streaming events.
//! - **HTTP + SSE** (`POST /v1/responses` with `"stream": true`): the same events as
//!   `event: <type>\ndata: <json>\n\n`, chunked, on a keep-alive connection.
//!
//! Sources: OpenAI's "WebSocket mode" guide (connection-local cache of the most recent response,
//! `store=false` has no persisted fallback, a failed turn evicts the referenced
//! `previous_response_id`, one response at a time per connection, 60-minute lifetime, and the two
//! error bodies it documents) and the "Responses streaming events" reference (event names and
//! fields). What the docs leave open is marked "not documented" where it is decided here.
//!
//! Map of this module:
//! - here: [`Script`], [`Settings`], [`Turn`], [`Item`], [`Outcome`] (what the fake answers);
//!   [`FakeProvider`]: start, URLs, runtime control, recording ([`Recorded`], [`RequestHead`]).
//! - `errors`: [`ApiError`], the real service's error bodies and status codes.
//! - `conversation`: request validation (`check_body`, `check_tool_outputs`) and the
//!   conversation a request continues, shared by both transports.
//! - `plan`: event planning (`plan_turn`), shared by both transports.
//! - `http`: HTTP/1.1 heads, upgrade routing and the HTTP + SSE front end (`serve_post`).
//! - `ws`: the WebSocket front end (`serve_ws`) and its connection-local response cache.
//! - `lanes`: `stream_id` multiplexing on one WebSocket connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

mod conversation;
mod errors;
mod http;
mod lanes;
mod plan;
mod ws;

use self::conversation::*;
use self::http::*;
use self::lanes::*;
use self::plan::*;
use self::ws::*;
use crate::http1::Head;
pub use errors::ApiError;
pub use lanes::{DEFAULT_MAX_QUEUED_PER_STREAM, DEFAULT_MAX_STREAMS, LaneSettings, SentEvent};

/// The path both transports serve.
pub const RESPONSES_PATH: &str = "/v1/responses";
/// The real service's connection lifetime (WebSocket mode guide).
pub const DEFAULT_CONNECTION_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// Characters per streamed "token" (one delta event each), roughly a BPE token of code.
pub const DEFAULT_DELTA_CHARS: usize = 4;
/// Request bodies larger than this are refused (413); far above anything spark sends.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Top-level fields of the Responses create body the real API accepts. Anything else is refused
/// with `unknown_parameter`, as the real API does, so a typo in spark fails a test.
const CREATE_FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "store",
    "previous_response_id",
    "reasoning",
    "text",
    "include",
    "max_output_tokens",
    "max_tool_calls",
    "metadata",
    "prompt",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "service_tier",
    "temperature",
    "top_p",
    "top_logprobs",
    "truncation",
    "user",
    "conversation",
    "context_management",
];
/// Fields only a `response.create` WebSocket event may carry (`client_metadata` is what Codex
/// sends; `stream_id` names a lane in the newer guide).
const WS_ONLY_FIELDS: &[&str] = &["type", "generate", "client_metadata", "stream_id"];
/// Fields only the HTTP body may carry (the guide: `stream`/`background` are not used over WS).
const HTTP_ONLY_FIELDS: &[&str] = &["stream", "stream_options", "background"];

// ---------------------------------------------------------------------------------------------
// Script: what the fake answers
// ---------------------------------------------------------------------------------------------

/// One output item of a scripted response.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// An assistant `message` with one `output_text` part.
    Message(String),
    /// A `custom_tool_call` (freeform input, e.g. Codex's `apply_patch` grammar).
    CustomToolCall { name: String, input: String },
    /// A JSON `function_call`; `arguments` is the JSON text streamed as deltas. `namespace`
    /// names the `namespace` tool it belongs to (Codex groups each MCP server's tools in one).
    FunctionCall {
        name: String,
        arguments: String,
        namespace: Option<String>,
    },
}

/// How a scripted response ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All items streamed, then `response.completed`.
    Complete(Vec<Item>),
    /// Items streamed (the last one marked incomplete), then `response.incomplete`.
    Incomplete { items: Vec<Item>, reason: String },
    /// Items streamed, then `response.failed` with `response.error`.
    Failed {
        items: Vec<Item>,
        code: String,
        message: String,
    },
    /// No response at all: an `error` event (WebSocket) or an HTTP error status.
    Error {
        status: u16,
        code: String,
        message: String,
    },
}

/// One canned model turn, consumed by the next generating request.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub outcome: Outcome,
    /// Delay from `response.in_progress` to the first output event.
    pub ttft: Duration,
    /// Output pacing; `None` streams every delta at once (a zero-latency model).
    pub tokens_per_sec: Option<f64>,
    /// Close the connection abruptly (no close frame, no final chunk) after this many events.
    pub drop_after: Option<usize>,
    /// Characters per delta event.
    pub delta_chars: usize,
    /// Hold every event of the response until the test opens this gate.
    pub gate: Option<Gate>,
    /// WebSocket mode: send the events before the first one of this `type`, then hold the
    /// rest until the gate opens (a response stopped mid-stream at a known point).
    pub hold_before: Option<(String, Gate)>,
}

/// Holds a scripted response back until the test opens it: lets a test act (e.g. edit a file)
/// at a known point between the request's arrival and its answer, without timing assumptions.
#[derive(Debug, Clone)]
pub struct Gate(Arc<tokio::sync::Semaphore>);

impl Default for Gate {
    fn default() -> Gate {
        Gate::new()
    }
}

impl Gate {
    pub fn new() -> Gate {
        Gate(Arc::new(tokio::sync::Semaphore::new(0)))
    }

    /// Let the held response go.
    pub fn open(&self) {
        self.0.add_permits(1);
    }

    async fn wait(&self) {
        if let Ok(permit) = self.0.acquire().await {
            permit.forget();
        }
    }
}

impl PartialEq for Gate {
    fn eq(&self, other: &Gate) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Turn {
    /// A turn with this outcome, no latency, default delta size.
    pub fn new(outcome: Outcome) -> Turn {
        Turn {
            outcome,
            ttft: Duration::ZERO,
            tokens_per_sec: None,
            drop_after: None,
            delta_chars: DEFAULT_DELTA_CHARS,
            gate: None,
            hold_before: None,
        }
    }

    /// Stream this response up to (not including) its first event of type `event_type`, then
    /// hold the rest until `gate` is opened. WebSocket mode only.
    pub fn hold_before(mut self, event_type: impl Into<String>, gate: Gate) -> Turn {
        self.hold_before = Some((event_type.into(), gate));
        self
    }

    /// Hold this response until `gate` is opened.
    pub fn with_gate(mut self, gate: Gate) -> Turn {
        self.gate = Some(gate);
        self
    }

    /// A completed response with these items.
    pub fn items(items: Vec<Item>) -> Turn {
        Turn::new(Outcome::Complete(items))
    }

    /// A completed response with one assistant message.
    pub fn text(text: impl Into<String>) -> Turn {
        Turn::items(vec![Item::Message(text.into())])
    }

    /// A completed response with one `apply_patch` custom (freeform) tool call.
    pub fn apply_patch(patch: impl Into<String>) -> Turn {
        Turn::custom_tool_call("apply_patch", patch)
    }

    /// A completed response with one `apply_patch` JSON function call: `{"input": patch}`.
    pub fn function_apply_patch(patch: impl Into<String>) -> Turn {
        let arguments = json!({ "input": patch.into() }).to_string();
        Turn::function_call("apply_patch", arguments)
    }

    /// A completed response with one custom tool call.
    pub fn custom_tool_call(name: impl Into<String>, input: impl Into<String>) -> Turn {
        Turn::items(vec![Item::CustomToolCall {
            name: name.into(),
            input: input.into(),
        }])
    }

    /// A completed response with one function call (`arguments` is JSON text).
    pub fn function_call(name: impl Into<String>, arguments: impl Into<String>) -> Turn {
        Turn::items(vec![Item::FunctionCall {
            name: name.into(),
            arguments: arguments.into(),
            namespace: None,
        }])
    }

    /// A completed response with one function call of a tool in a `namespace` tool.
    pub fn namespaced_function_call(
        namespace: impl Into<String>,
        name: impl Into<String>,
        arguments: impl Into<String>,
    ) -> Turn {
        Turn::items(vec![Item::FunctionCall {
            name: name.into(),
            arguments: arguments.into(),
            namespace: Some(namespace.into()),
        }])
    }

    /// An `error` event with status 400 (an HTTP 400 over SSE transport).
    pub fn error(code: impl Into<String>, message: impl Into<String>) -> Turn {
        Turn::error_with_status(400, code, message)
    }

    /// An `error` event with this status (e.g. 429 `rate_limit_exceeded`, 500 `server_error`).
    pub fn error_with_status(
        status: u16,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Turn {
        Turn::new(Outcome::Error {
            status,
            code: code.into(),
            message: message.into(),
        })
    }

    /// `response.failed` with the real service's generic server error.
    pub fn failed() -> Turn {
        Turn::failed_with(
            "server_error",
            "The server had an error processing your request. Sorry about that!",
        )
    }

    /// `response.failed` with this error.
    pub fn failed_with(code: impl Into<String>, message: impl Into<String>) -> Turn {
        Turn::new(Outcome::Failed {
            items: Vec::new(),
            code: code.into(),
            message: message.into(),
        })
    }

    /// `response.incomplete` (`max_output_tokens`) after a message cut off mid-sentence.
    pub fn incomplete() -> Turn {
        Turn::incomplete_with(vec![Item::Message(
            "The change needs two steps. First, rename the fun".to_owned(),
        )])
    }

    /// `response.incomplete` (`max_output_tokens`) after these (already truncated) items.
    pub fn incomplete_with(items: Vec<Item>) -> Turn {
        Turn::new(Outcome::Incomplete {
            items,
            reason: "max_output_tokens".to_owned(),
        })
    }

    /// A text turn whose connection is dropped after `n_events` events.
    pub fn drop_connection_after(n_events: usize) -> Turn {
        Turn::text("This response is cut off by a dropped connection.").drop_after(n_events)
    }

    /// Wait this long before the first output event.
    pub fn with_ttft(mut self, ttft: Duration) -> Turn {
        self.ttft = ttft;
        self
    }

    /// Stream output at this rate; non-positive or non-finite means "all at once".
    pub fn with_tokens_per_sec(mut self, tokens_per_sec: f64) -> Turn {
        self.tokens_per_sec =
            (tokens_per_sec.is_finite() && tokens_per_sec > 0.0).then_some(tokens_per_sec);
        self
    }

    /// Characters per delta event (at least 1).
    pub fn with_delta_chars(mut self, chars: usize) -> Turn {
        self.delta_chars = chars.max(1);
        self
    }

    /// Drop the connection abruptly after `n_events` events of this response.
    pub fn drop_after(mut self, n_events: usize) -> Turn {
        self.drop_after = Some(n_events);
        self
    }

    /// Append an output item (e.g. a message before an `apply_patch` call). Has no effect on
    /// an [`Outcome::Error`] turn.
    pub fn push_item(mut self, item: Item) -> Turn {
        match &mut self.outcome {
            Outcome::Complete(items)
            | Outcome::Incomplete { items, .. }
            | Outcome::Failed { items, .. } => items.push(item),
            Outcome::Error { .. } => {}
        }
        self
    }
}

/// What to do with a `response.create` that arrives while another response is in flight on the
/// same connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFlightPolicy {
    /// Answer with an `error` event (strict: spark keeps one response in flight per connection).
    Reject,
    /// Run it after the current one, as the guide describes ("executed sequentially").
    Queue,
}

/// Provider-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// A `response.create` on a connection at least this old gets
    /// `websocket_connection_limit_reached` and the connection is closed.
    pub connection_lifetime: Duration,
    /// Connections opened before this instant have reached their lifetime, whatever their age
    /// (see [`FakeProvider::expire_open_connections`]).
    pub expired_before: Option<Instant>,
    /// Answer WebSocket upgrades with 426 so the client falls back to HTTP + SSE.
    pub refuse_websocket: bool,
    /// At most this many WebSocket connections open at once; more upgrades get 429.
    pub max_connections: Option<usize>,
    pub in_flight: InFlightPolicy,
    /// Serve requests without an `Authorization` header, as a local model server does.
    pub keyless: bool,
    /// Accept WebSocket upgrades, then close each socket with 1011 at its first request,
    /// before any event (as some gateways do); HTTP + SSE keeps working.
    pub drop_websocket_after_upgrade: bool,
    /// `stream_id` lanes (see the lanes section below).
    pub lanes: LaneSettings,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            connection_lifetime: DEFAULT_CONNECTION_LIFETIME,
            expired_before: None,
            refuse_websocket: false,
            max_connections: None,
            in_flight: InFlightPolicy::Reject,
            keyless: false,
            drop_websocket_after_upgrade: false,
            lanes: LaneSettings::default(),
        }
    }
}

/// The canned turns, the turn used when they run out, and the settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Script {
    pub turns: VecDeque<Turn>,
    pub default_turn: Turn,
    /// Consulted before the default turn when the queue is empty: a turn made from the request.
    pub responder: Option<Responder>,
    pub settings: Settings,
}

impl Default for Script {
    fn default() -> Script {
        Script {
            turns: VecDeque::new(),
            default_turn: Turn::text("Done."),
            responder: None,
            settings: Settings::default(),
        }
    }
}

/// Makes a turn from a generating request's body (`None`: the default turn), for tests whose
/// concurrent clients each need an answer of their own whatever order their requests arrive in.
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct Responder(Arc<dyn Fn(&Value) -> Option<Turn> + Send + Sync>);

impl Responder {
    pub fn new(f: impl Fn(&Value) -> Option<Turn> + Send + Sync + 'static) -> Responder {
        Responder(Arc::new(f))
    }
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Responder(..)")
    }
}

impl PartialEq for Responder {
    fn eq(&self, other: &Responder) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Script {
    pub fn new() -> Script {
        Script::default()
    }

    /// Queue one turn.
    pub fn turn(mut self, turn: Turn) -> Script {
        self.turns.push_back(turn);
        self
    }

    /// Queue several turns.
    pub fn turns(mut self, turns: impl IntoIterator<Item = Turn>) -> Script {
        self.turns.extend(turns);
        self
    }

    /// The turn answered whenever the queue is empty.
    pub fn default_turn(mut self, turn: Turn) -> Script {
        self.default_turn = turn;
        self
    }

    /// With the queue empty, answer each generating request with the turn `f` makes from its
    /// body, or the default turn when `f` gives none.
    pub fn respond_with(
        mut self,
        f: impl Fn(&Value) -> Option<Turn> + Send + Sync + 'static,
    ) -> Script {
        self.responder = Some(Responder::new(f));
        self
    }

    pub fn connection_lifetime(mut self, lifetime: Duration) -> Script {
        self.settings.connection_lifetime = lifetime;
        self
    }

    pub fn refuse_websocket(mut self) -> Script {
        self.settings.refuse_websocket = true;
        self
    }

    pub fn max_connections(mut self, max: usize) -> Script {
        self.settings.max_connections = Some(max);
        self
    }

    pub fn in_flight(mut self, policy: InFlightPolicy) -> Script {
        self.settings.in_flight = policy;
        self
    }

    /// Accept WebSocket upgrades and close each socket with 1011 before answering.
    pub fn drop_websocket_after_upgrade(mut self) -> Script {
        self.settings.drop_websocket_after_upgrade = true;
        self
    }

    /// Need no API key, like a local model server.
    pub fn keyless(mut self) -> Script {
        self.settings.keyless = true;
        self
    }

    /// Refuse `stream_id` as an older service does (`unknown_parameter`).
    pub fn refuse_lanes(mut self) -> Script {
        self.settings.lanes.refuse = true;
        self
    }

    /// At most `max` lanes with work (in flight or queued) per connection.
    pub fn max_streams(mut self, max: usize) -> Script {
        self.settings.lanes.max_streams = max;
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Recording
// ---------------------------------------------------------------------------------------------

/// The transport a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Http,
}

/// What the fake did with a recorded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    /// A generating response was started (it may still end failed or incomplete).
    Response { id: String },
    /// `generate: false`: a response id was created without output.
    Prewarm { id: String },
    /// Refused with an `error` event or HTTP error status; no response was created.
    Rejected { status: u16, code: Option<String> },
    /// Waiting behind the in-flight response ([`InFlightPolicy::Queue`]).
    Queued,
}

/// One WebSocket data frame or HTTP request body the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Position in [`FakeProvider::requests`].
    pub index: usize,
    /// TCP connection id (shared by every frame of one WebSocket connection).
    pub connection: u64,
    pub transport: Transport,
    /// The frame or body as received (lossy UTF-8 for binary frames).
    pub raw: String,
    /// Parsed JSON; `Value::Null` when it did not parse.
    pub json: Value,
    /// Length in bytes on the wire (payload only).
    pub bytes: usize,
    pub outcome: RequestOutcome,
    pub received_at: Instant,
}

impl Recorded {
    /// The error code the request was refused with, if it was refused.
    pub fn outcome_code(&self) -> Option<&str> {
        match &self.outcome {
            RequestOutcome::Rejected { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// The `type` field (`response.create` for every valid WebSocket request).
    pub fn event_type(&self) -> Option<&str> {
        self.json.get("type").and_then(Value::as_str)
    }

    pub fn previous_response_id(&self) -> Option<&str> {
        self.json
            .get("previous_response_id")
            .and_then(Value::as_str)
    }

    /// The `input` items (empty when `input` is absent or a plain string).
    pub fn input(&self) -> &[Value] {
        self.json
            .get("input")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub fn is_prewarm(&self) -> bool {
        self.json.get("generate") == Some(&Value::Bool(false))
    }

    /// The id of the response this request created, if any.
    pub fn response_id(&self) -> Option<&str> {
        match &self.outcome {
            RequestOutcome::Response { id } | RequestOutcome::Prewarm { id } => Some(id),
            RequestOutcome::Rejected { .. } | RequestOutcome::Queued => None,
        }
    }
}

/// The head of every HTTP request the fake received (WebSocket upgrades included), with the
/// status it answered (101 for an accepted upgrade).
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub connection: u64,
    pub method: String,
    pub path: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub status: u16,
    pub received_at: Instant,
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::http1::header(&self.headers, name)
    }

    pub fn is_websocket_upgrade(&self) -> bool {
        crate::http1::has_token(&self.headers, "upgrade", "websocket")
    }
}

// ---------------------------------------------------------------------------------------------
// The provider
// ---------------------------------------------------------------------------------------------

/// A running fake provider on `127.0.0.1:<port>`. Dropping it closes every connection.
#[derive(Debug)]
pub struct FakeProvider {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    script: Mutex<Script>,
    requests: Mutex<Vec<Recorded>>,
    request_count: watch::Sender<usize>,
    heads: Mutex<Vec<RequestHead>>,
    ws_opened: watch::Sender<usize>,
    ws_open_now: AtomicUsize,
    /// Bumped to drop every open connection.
    kill: watch::Sender<u64>,
    /// Every WebSocket event sent (lanes section).
    sent: Mutex<Vec<SentEvent>>,
    /// Responses created with `store` true (the default): continuable from any connection.
    stored: Mutex<HashMap<String, Conversation>>,
    next_connection: AtomicU64,
    next_id: AtomicU64,
}

impl FakeProvider {
    /// Bind `127.0.0.1:0` and serve `script`.
    pub async fn start(script: Script) -> FakeProvider {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake provider on loopback");
        let addr = listener
            .local_addr()
            .expect("local address of a bound listener");
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            requests: Mutex::new(Vec::new()),
            request_count: watch::Sender::new(0),
            heads: Mutex::new(Vec::new()),
            ws_opened: watch::Sender::new(0),
            ws_open_now: AtomicUsize::new(0),
            kill: watch::Sender::new(0),
            sent: Mutex::new(Vec::new()),
            stored: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            next_id: AtomicU64::new(1),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        FakeProvider {
            shared,
            addr,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:PORT/v1/responses`
    pub fn ws_url(&self) -> String {
        format!("ws://{}{RESPONSES_PATH}", self.addr)
    }

    /// `http://127.0.0.1:PORT/v1/responses`
    pub fn http_url(&self) -> String {
        format!("http://{}{RESPONSES_PATH}", self.addr)
    }

    /// Every WebSocket data frame and HTTP body received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// Every HTTP request head received so far (upgrades included).
    pub fn heads(&self) -> Vec<RequestHead> {
        lock(&self.shared.heads).clone()
    }

    /// WebSocket connections accepted (upgrades answered 101) since start.
    pub fn connections_opened(&self) -> usize {
        *self.shared.ws_opened.borrow()
    }

    /// WebSocket connections open right now.
    pub fn connections_open(&self) -> usize {
        self.shared.ws_open_now.load(Ordering::SeqCst)
    }

    /// Wait until at least `n` requests were recorded; returns all recorded so far.
    pub async fn wait_for_requests(&self, n: usize) -> Vec<Recorded> {
        let mut rx = self.shared.request_count.subscribe();
        rx.wait_for(|count| *count >= n)
            .await
            .expect("the request counter lives as long as the provider");
        self.requests()
    }

    /// Wait until at least `n` WebSocket connections were accepted since start.
    pub async fn wait_for_connections(&self, n: usize) {
        let mut rx = self.shared.ws_opened.subscribe();
        rx.wait_for(|count| *count >= n)
            .await
            .expect("the connection counter lives as long as the provider");
    }

    /// Queue a turn behind those already scripted.
    pub fn push_turn(&self, turn: Turn) {
        lock(&self.shared.script).turns.push_back(turn);
    }

    /// Replace the turn answered when the queue is empty.
    pub fn set_default_turn(&self, turn: Turn) {
        lock(&self.shared.script).default_turn = turn;
    }

    /// Scripted turns not consumed yet.
    pub fn remaining_turns(&self) -> usize {
        lock(&self.shared.script).turns.len()
    }

    /// Change the settings for requests and connections from now on.
    pub fn update_settings(&self, update: impl FnOnce(&mut Settings)) {
        update(&mut lock(&self.shared.script).settings);
    }

    pub fn set_refuse_websocket(&self, refuse: bool) {
        self.update_settings(|s| s.refuse_websocket = refuse);
    }

    /// Every connection open now has reached its lifetime: its next `response.create` gets
    /// `websocket_connection_limit_reached`. Connections opened later are unaffected.
    pub fn expire_open_connections(&self) {
        let now = Instant::now();
        self.update_settings(|s| s.expired_before = Some(now));
    }

    pub fn set_connection_lifetime(&self, lifetime: Duration) {
        self.update_settings(|s| s.connection_lifetime = lifetime);
    }

    /// Drop every open connection (WebSocket and HTTP) abruptly: no close frame, no final chunk.
    /// Connection-local caches die with them; stored (`store: true`) responses survive.
    pub fn kill_connections(&self) {
        self.shared.kill.send_modify(|generation| *generation += 1);
    }

    /// Simulate a provider restart: every open connection is dropped, the port stays.
    pub fn restart(&self) {
        self.kill_connections();
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.kill_connections();
        self.accept.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not turn every later assertion into a poison panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn next_id(&self, prefix: &str) -> String {
        format!("{prefix}_{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn settings(&self) -> Settings {
        lock(&self.script).settings.clone()
    }

    fn take_turn(&self, body: &Value) -> Turn {
        let mut script = lock(&self.script);
        if let Some(turn) = script.turns.pop_front() {
            return turn;
        }
        let responder = script.responder.clone();
        let default = script.default_turn.clone();
        // The responder runs without the script's lock: it is the test's code.
        drop(script);
        responder.and_then(|r| (r.0)(body)).unwrap_or(default)
    }

    fn record(
        &self,
        connection: u64,
        transport: Transport,
        raw: String,
        bytes: usize,
        outcome: RequestOutcome,
    ) -> usize {
        let json = serde_json::from_str(&raw).unwrap_or(Value::Null);
        let index = {
            let mut requests = lock(&self.requests);
            let index = requests.len();
            requests.push(Recorded {
                index,
                connection,
                transport,
                raw,
                json,
                bytes,
                outcome,
                received_at: Instant::now(),
            });
            index
        };
        self.request_count.send_modify(|count| *count += 1);
        index
    }

    fn set_outcome(&self, index: usize, outcome: RequestOutcome) {
        if let Some(recorded) = lock(&self.requests).get_mut(index) {
            recorded.outcome = outcome;
        }
    }

    fn record_head(&self, connection: u64, head: &Head, status: u16) {
        lock(&self.heads).push(RequestHead {
            connection,
            method: head.method.clone(),
            path: head.target.clone(),
            headers: head.headers.clone(),
            status,
            received_at: Instant::now(),
        });
    }

    fn stored(&self, id: &str) -> Option<Conversation> {
        lock(&self.stored).get(id).cloned()
    }

    fn store(&self, conversation: &Conversation) {
        lock(&self.stored).insert(conversation.response_id.clone(), conversation.clone());
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            continue;
        };
        // Latency matters to the benchmarks: never let Nagle hold back a small event.
        let _ = stream.set_nodelay(true);
        let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        let mut kill = shared.kill.subscribe();
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            tokio::select! {
                _ = kill.changed() => {}
                _ = serve_connection(Arc::clone(&shared), stream, id) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests;
