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
//! Map of this file:
//! - [`Script`], [`Settings`], [`Turn`], [`Item`], [`Outcome`]: what the fake answers.
//! - [`FakeProvider`]: start, URLs, runtime control, recording ([`Recorded`], [`RequestHead`]).
//! - validation (`check_body`, `check_tool_outputs`) and event planning (`plan_turn`), shared by
//!   both transports; `serve_ws` and `serve_http` are the two front ends.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

/// The path both transports serve.
pub const RESPONSES_PATH: &str = "/v1/responses";
/// The real service's connection lifetime (WebSocket mode guide).
pub const DEFAULT_CONNECTION_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// Characters per streamed "token" (one delta event each), roughly a BPE token of code.
pub const DEFAULT_DELTA_CHARS: usize = 4;
/// An HTTP request head larger than this is refused (431), as any real front end would.
const MAX_HEAD_BYTES: usize = 64 * 1024;
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
    pub settings: Settings,
}

impl Default for Script {
    fn default() -> Script {
        Script {
            turns: VecDeque::new(),
            default_turn: Turn::text("Done."),
            settings: Settings::default(),
        }
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
        header(&self.headers, name)
    }

    pub fn is_websocket_upgrade(&self) -> bool {
        is_upgrade(&self.headers)
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

    fn take_turn(&self) -> Turn {
        let mut script = lock(&self.script);
        match script.turns.pop_front() {
            Some(turn) => turn,
            None => script.default_turn.clone(),
        }
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
            path: head.path.clone(),
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

// ---------------------------------------------------------------------------------------------
// Errors in the real service's shapes
// ---------------------------------------------------------------------------------------------

/// An API error, rendered as a WebSocket `error` event or an HTTP error body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status} {code:?}: {message}")]
pub struct ApiError {
    pub status: u16,
    /// `invalid_request_error`, `rate_limit_error`, `server_error`, …
    pub kind: String,
    pub code: Option<String>,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    fn invalid(code: Option<&str>, message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError {
            status: 400,
            kind: "invalid_request_error".to_owned(),
            code: code.map(str::to_owned),
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }

    fn scripted(status: u16, code: &str, message: &str) -> ApiError {
        let kind = match status {
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        ApiError {
            status,
            kind: kind.to_owned(),
            code: Some(code.to_owned()),
            message: message.to_owned(),
            param: None,
        }
    }

    fn previous_not_found(id: &str) -> ApiError {
        ApiError::invalid(
            Some("previous_response_not_found"),
            format!("Previous response with id '{id}' not found."),
            Some("previous_response_id"),
        )
    }

    fn lifetime_reached() -> ApiError {
        ApiError::invalid(
            Some("websocket_connection_limit_reached"),
            "Responses websocket connection limit reached (60 minutes). Create a new websocket connection to continue.",
            None,
        )
    }

    fn error_object(&self) -> Value {
        json!({
            "type": self.kind,
            "code": self.code,
            "message": self.message,
            "param": self.param,
        })
    }

    /// The WebSocket-mode `error` event (no `sequence_number`: it belongs to no response).
    pub fn ws_event(&self) -> Value {
        json!({ "type": "error", "status": self.status, "error": self.error_object() })
    }

    /// The HTTP error body.
    pub fn http_body(&self) -> Value {
        json!({ "error": self.error_object() })
    }
}

// ---------------------------------------------------------------------------------------------
// Conversation state and request validation (both transports)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum CallKind {
    Custom,
    Function,
}

impl CallKind {
    fn call_words(self) -> &'static str {
        match self {
            CallKind::Custom => "custom tool call",
            CallKind::Function => "function call",
        }
    }
}

/// What a response id stands for: enough to validate the next request chained to it.
#[derive(Debug, Clone)]
struct Conversation {
    response_id: String,
    /// Every tool call of the chain so far.
    calls: HashSet<(CallKind, String)>,
    /// Tool calls of this response that the next request must answer.
    pending: Vec<(CallKind, String)>,
    /// Tokens of the whole chain (what a cache hit saves).
    context_tokens: u64,
}

/// A refusal, with the `previous_response_id` the refused request referenced (for eviction).
type Refused = Box<(ApiError, Option<String>)>;

/// A request that passed validation.
#[derive(Debug)]
struct Accepted {
    body: Value,
    previous: Option<Conversation>,
    /// Whether the previous response came from this connection's cache.
    cache_hit: bool,
    calls: HashSet<(CallKind, String)>,
    generate: bool,
    store: bool,
}

fn check_body(body: &Value, transport: Transport) -> Result<(), ApiError> {
    let Some(object) = body.as_object() else {
        return Err(ApiError::invalid(
            Some("invalid_json"),
            "The request must be a JSON object.",
            None,
        ));
    };
    if transport == Transport::WebSocket {
        match object.get("type").and_then(Value::as_str) {
            Some("response.create") => {}
            Some(other) => {
                return Err(ApiError::invalid(
                    Some("invalid_value"),
                    format!("Invalid value: '{other}'. Supported values are: 'response.create'."),
                    Some("type"),
                ));
            }
            None => {
                return Err(ApiError::invalid(
                    Some("missing_required_parameter"),
                    "Missing required parameter: 'type'.",
                    Some("type"),
                ));
            }
        }
    }
    for key in object.keys() {
        let known = CREATE_FIELDS.contains(&key.as_str())
            || match transport {
                Transport::WebSocket => WS_ONLY_FIELDS.contains(&key.as_str()),
                Transport::Http => HTTP_ONLY_FIELDS.contains(&key.as_str()),
            };
        if !known {
            return Err(ApiError::invalid(
                Some("unknown_parameter"),
                format!("Unknown parameter: '{key}'."),
                Some(key),
            ));
        }
    }
    if !object.get("model").is_some_and(Value::is_string) {
        return Err(ApiError::invalid(
            Some("missing_required_parameter"),
            "Missing required parameter: 'model'.",
            Some("model"),
        ));
    }
    match object.get("input") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let typed = item.get("type").is_some_and(Value::is_string);
                let role = item.get("role").is_some_and(Value::is_string);
                if !typed && !role {
                    return Err(ApiError::invalid(
                        Some("invalid_value"),
                        format!(
                            "Invalid input item at index {i}: expected an object with 'type' or 'role'."
                        ),
                        Some(&format!("input[{i}]")),
                    ));
                }
            }
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("invalid_type"),
                "Invalid type for 'input': expected a string or an array of input items.",
                Some("input"),
            ));
        }
    }
    if let Some(id) = object.get("previous_response_id")
        && !(id.is_string() || id.is_null())
    {
        return Err(ApiError::invalid(
            Some("invalid_type"),
            "Invalid type for 'previous_response_id': expected a string.",
            Some("previous_response_id"),
        ));
    }
    Ok(())
}

/// Tool-call pairing as the real service checks it: every call of the previous response needs
/// an output in this input, every output needs a call of the same kind, and calls replayed in
/// the input need their outputs too.
fn check_tool_outputs(
    previous: Option<&Conversation>,
    input: &[Value],
) -> Result<HashSet<(CallKind, String)>, ApiError> {
    let call_id = |item: &Value| {
        item.get("call_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let mut calls = previous.map(|c| c.calls.clone()).unwrap_or_default();
    let mut required: Vec<(CallKind, String)> =
        previous.map(|c| c.pending.clone()).unwrap_or_default();
    for item in input {
        let kind = match item.get("type").and_then(Value::as_str) {
            Some("custom_tool_call") => CallKind::Custom,
            Some("function_call") => CallKind::Function,
            _ => continue,
        };
        if let Some(id) = call_id(item) {
            calls.insert((kind, id.clone()));
            required.push((kind, id));
        }
    }
    let mut answered = HashSet::new();
    for item in input {
        let kind = match item.get("type").and_then(Value::as_str) {
            Some("custom_tool_call_output") => CallKind::Custom,
            Some("function_call_output") => CallKind::Function,
            _ => continue,
        };
        let Some(id) = call_id(item) else {
            return Err(ApiError::invalid(
                Some("missing_required_parameter"),
                "Missing required parameter: 'input[].call_id'.",
                Some("input"),
            ));
        };
        if !calls.contains(&(kind, id.clone())) {
            return Err(ApiError::invalid(
                Some("tool_call_missing"),
                format!(
                    "No tool call found for {} output with call_id {id}.",
                    kind.call_words()
                ),
                Some("input"),
            ));
        }
        answered.insert((kind, id));
    }
    for pair in &required {
        if !answered.contains(pair) {
            return Err(ApiError::invalid(
                Some("tool_output_missing"),
                format!(
                    "No tool output found for {} {}.",
                    pair.0.call_words(),
                    pair.1
                ),
                Some("input"),
            ));
        }
    }
    Ok(calls)
}

/// Validate a parsed request body. `cache` is the connection-local cache (WebSocket only).
fn accept_request(
    shared: &Shared,
    transport: Transport,
    body: Value,
    cache: Option<&Conversation>,
) -> Result<Accepted, Refused> {
    check_body(&body, transport).map_err(|e| Box::new((e, None)))?;
    let previous_id = body
        .get("previous_response_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let (previous, cache_hit) = match &previous_id {
        None => (None, false),
        Some(id) => match cache.filter(|c| &c.response_id == id) {
            Some(hit) => (Some(hit.clone()), true),
            // Only `store: true` responses have a persisted fallback (the guide).
            None => match shared.stored(id) {
                Some(stored) => (Some(stored), false),
                None => return Err(Box::new((ApiError::previous_not_found(id), None))),
            },
        },
    };
    let input = body
        .get("input")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let calls = check_tool_outputs(previous.as_ref(), input)
        .map_err(|e| Box::new((e, previous_id.clone())))?;
    let generate = body.get("generate") != Some(&Value::Bool(false));
    // `store` defaults to true in the Responses API.
    let store = body.get("store").and_then(Value::as_bool).unwrap_or(true);
    Ok(Accepted {
        body,
        previous,
        cache_hit,
        calls,
        generate,
        store,
    })
}

// ---------------------------------------------------------------------------------------------
// Event planning (both transports)
// ---------------------------------------------------------------------------------------------

/// What happens to state once a response's last event is out.
#[derive(Debug, Clone)]
enum Commit {
    /// Completed or incomplete: becomes the connection's cached response (and stored if asked).
    Keep {
        conversation: Conversation,
        store: bool,
    },
    /// Failed turn: the referenced `previous_response_id` is evicted from the connection cache.
    Evict { previous_id: Option<String> },
}

#[derive(Debug)]
struct Plan {
    gate: Option<Gate>,
    hold_before: Option<(String, Gate)>,
    /// Events with their offsets from the request's arrival.
    events: Vec<(Duration, Value)>,
    /// Set for [`Outcome::Error`] turns: no events, just this error after `ttft`.
    error: Option<(Duration, ApiError)>,
    drop_after: Option<usize>,
    commit: Commit,
}

fn approx_tokens(chars: usize) -> u64 {
    chars.div_ceil(DEFAULT_DELTA_CHARS) as u64
}

/// Split `text` into pieces of `chars` characters (on char boundaries).
fn split_tokens(text: &str, chars: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for (count, (i, _)) in text.char_indices().enumerate() {
        if count > 0 && count % chars == 0 {
            pieces.push(&text[start..i]);
            start = i;
        }
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

struct PlanWriter {
    events: Vec<(Duration, Value)>,
    clock: Duration,
    sequence: u64,
}

impl PlanWriter {
    fn emit(&mut self, mut event: Value) {
        if let Some(object) = event.as_object_mut() {
            object.insert("sequence_number".to_owned(), json!(self.sequence));
        }
        self.sequence += 1;
        self.events.push((self.clock, event));
    }
}

/// The request fields a response object echoes.
struct Echo<'a> {
    id: &'a str,
    created_at: u64,
    body: &'a Value,
}

impl Echo<'_> {
    fn response(
        &self,
        status: &str,
        output: &[Value],
        usage: Value,
        extra: &[(&str, Value)],
    ) -> Value {
        let field = |name: &str, default: Value| self.body.get(name).cloned().unwrap_or(default);
        let mut object = Map::new();
        object.insert("id".into(), json!(self.id));
        object.insert("object".into(), json!("response"));
        object.insert("created_at".into(), json!(self.created_at));
        object.insert("status".into(), json!(status));
        object.insert("background".into(), json!(false));
        object.insert("error".into(), Value::Null);
        object.insert("incomplete_details".into(), Value::Null);
        object.insert("instructions".into(), field("instructions", Value::Null));
        object.insert(
            "max_output_tokens".into(),
            field("max_output_tokens", Value::Null),
        );
        object.insert("model".into(), field("model", Value::Null));
        object.insert("output".into(), Value::Array(output.to_vec()));
        object.insert(
            "parallel_tool_calls".into(),
            field("parallel_tool_calls", json!(true)),
        );
        object.insert(
            "previous_response_id".into(),
            field("previous_response_id", Value::Null),
        );
        object.insert(
            "reasoning".into(),
            field("reasoning", json!({"effort": null, "summary": null})),
        );
        object.insert("store".into(), field("store", json!(true)));
        object.insert("temperature".into(), field("temperature", json!(1.0)));
        object.insert(
            "text".into(),
            field("text", json!({"format": {"type": "text"}})),
        );
        object.insert("tool_choice".into(), field("tool_choice", json!("auto")));
        object.insert("tools".into(), field("tools", json!([])));
        object.insert("top_p".into(), field("top_p", json!(1.0)));
        object.insert("truncation".into(), field("truncation", json!("disabled")));
        object.insert("usage".into(), usage);
        object.insert("user".into(), Value::Null);
        object.insert("metadata".into(), field("metadata", json!({})));
        for (key, value) in extra {
            object.insert((*key).to_owned(), value.clone());
        }
        Value::Object(object)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Plan the whole event sequence of one accepted request.
fn plan_turn(shared: &Shared, accepted: &Accepted, turn: &Turn, response_id: &str) -> Plan {
    let previous_id = accepted.previous.as_ref().map(|p| p.response_id.clone());
    if let Outcome::Error {
        status,
        code,
        message,
    } = &turn.outcome
    {
        return Plan {
            gate: turn.gate.clone(),
            hold_before: None,
            events: Vec::new(),
            error: Some((turn.ttft, ApiError::scripted(*status, code, message))),
            drop_after: None,
            commit: Commit::Evict { previous_id },
        };
    }
    let echo = Echo {
        id: response_id,
        created_at: unix_now(),
        body: &accepted.body,
    };
    let previous_tokens = accepted.previous.as_ref().map_or(0, |p| p.context_tokens);
    let request_tokens = {
        let part = |name: &str| accepted.body.get(name).map_or(0, |v| v.to_string().len());
        approx_tokens(part("input") + part("instructions") + part("tools"))
    };
    let input_tokens = previous_tokens + request_tokens;
    let cached_tokens = if accepted.cache_hit {
        previous_tokens
    } else {
        0
    };
    let usage = |output_tokens: u64| {
        json!({
            "input_tokens": input_tokens,
            "input_tokens_details": { "cached_tokens": cached_tokens },
            "output_tokens": output_tokens,
            "output_tokens_details": { "reasoning_tokens": 0 },
            "total_tokens": input_tokens + output_tokens,
        })
    };

    let mut w = PlanWriter {
        events: Vec::new(),
        clock: Duration::ZERO,
        sequence: 0,
    };
    let in_progress = echo.response("in_progress", &[], Value::Null, &[]);
    w.emit(json!({ "type": "response.created", "response": in_progress }));

    if !accepted.generate {
        // Prewarm: a response id and no output (the guide: "generate: false … no model output").
        let completed = echo.response("completed", &[], usage(0), &[]);
        w.emit(json!({ "type": "response.completed", "response": completed }));
        return Plan {
            gate: None,
            hold_before: None,
            events: w.events,
            error: None,
            drop_after: None,
            commit: Commit::Keep {
                conversation: Conversation {
                    response_id: response_id.to_owned(),
                    calls: accepted.calls.clone(),
                    pending: Vec::new(),
                    context_tokens: input_tokens,
                },
                store: accepted.store,
            },
        };
    }
    w.emit(json!({ "type": "response.in_progress", "response": in_progress }));

    let (items, incomplete) = match &turn.outcome {
        Outcome::Complete(items) | Outcome::Failed { items, .. } => (items.as_slice(), false),
        Outcome::Incomplete { items, .. } => (items.as_slice(), true),
        Outcome::Error { .. } => (&[][..], false),
    };
    let token_time = |k: u64| match turn.tokens_per_sec {
        Some(rate) => turn.ttft + Duration::from_secs_f64(k as f64 / rate),
        None => turn.ttft,
    };
    let mut token = 0u64;
    let mut output = Vec::new();
    let mut calls = accepted.calls.clone();
    let mut pending = Vec::new();
    w.clock = turn.ttft;
    for (index, item) in items.iter().enumerate() {
        let last = index + 1 == items.len();
        let done_status = if incomplete && last {
            "incomplete"
        } else {
            "completed"
        };
        let done_item = match item {
            Item::Message(text) => {
                let id = shared.next_id("msg");
                w.emit(json!({
                    "type": "response.output_item.added", "output_index": index,
                    "item": { "id": id, "type": "message", "status": "in_progress", "content": [], "role": "assistant" },
                }));
                w.emit(json!({
                    "type": "response.content_part.added", "item_id": id, "output_index": index, "content_index": 0,
                    "part": { "type": "output_text", "annotations": [], "logprobs": [], "text": "" },
                }));
                for piece in split_tokens(text, turn.delta_chars) {
                    w.clock = token_time(token);
                    token += 1;
                    w.emit(json!({
                        "type": "response.output_text.delta", "item_id": id, "output_index": index,
                        "content_index": 0, "delta": piece, "logprobs": [],
                    }));
                }
                w.emit(json!({
                    "type": "response.output_text.done", "item_id": id, "output_index": index,
                    "content_index": 0, "text": text, "logprobs": [],
                }));
                let part = json!({ "type": "output_text", "annotations": [], "logprobs": [], "text": text });
                w.emit(json!({
                    "type": "response.content_part.done", "item_id": id, "output_index": index,
                    "content_index": 0, "part": part,
                }));
                json!({ "id": id, "type": "message", "status": done_status, "content": [part], "role": "assistant" })
            }
            Item::CustomToolCall { name, input } => {
                let id = shared.next_id("ctc");
                let call_id = shared.next_id("call");
                w.emit(json!({
                    "type": "response.output_item.added", "output_index": index,
                    "item": { "id": id, "type": "custom_tool_call", "call_id": call_id, "name": name, "input": "" },
                }));
                for piece in split_tokens(input, turn.delta_chars) {
                    w.clock = token_time(token);
                    token += 1;
                    w.emit(json!({
                        "type": "response.custom_tool_call_input.delta", "item_id": id,
                        "output_index": index, "delta": piece,
                    }));
                }
                w.emit(json!({
                    "type": "response.custom_tool_call_input.done", "item_id": id,
                    "output_index": index, "input": input,
                }));
                calls.insert((CallKind::Custom, call_id.clone()));
                pending.push((CallKind::Custom, call_id.clone()));
                json!({ "id": id, "type": "custom_tool_call", "call_id": call_id, "name": name, "input": input })
            }
            Item::FunctionCall {
                name,
                arguments,
                namespace,
            } => {
                let id = shared.next_id("fc");
                let call_id = shared.next_id("call");
                let mut added = json!({ "id": id, "type": "function_call", "status": "in_progress",
                                        "arguments": "", "call_id": call_id, "name": name });
                if let Some(ns) = namespace {
                    added["namespace"] = json!(ns);
                }
                w.emit(json!({
                    "type": "response.output_item.added", "output_index": index, "item": added,
                }));
                for piece in split_tokens(arguments, turn.delta_chars) {
                    w.clock = token_time(token);
                    token += 1;
                    w.emit(json!({
                        "type": "response.function_call_arguments.delta", "item_id": id,
                        "output_index": index, "delta": piece,
                    }));
                }
                w.emit(json!({
                    "type": "response.function_call_arguments.done", "item_id": id, "name": name,
                    "output_index": index, "arguments": arguments,
                }));
                calls.insert((CallKind::Function, call_id.clone()));
                pending.push((CallKind::Function, call_id.clone()));
                let mut done = json!({ "id": id, "type": "function_call", "status": done_status,
                                       "arguments": arguments, "call_id": call_id, "name": name });
                if let Some(ns) = namespace {
                    done["namespace"] = json!(ns);
                }
                done
            }
        };
        w.emit(json!({ "type": "response.output_item.done", "output_index": index, "item": done_item }));
        output.push(done_item);
    }

    let output_tokens = token;
    let commit_keep = |store: bool| Commit::Keep {
        conversation: Conversation {
            response_id: response_id.to_owned(),
            calls: calls.clone(),
            pending: pending.clone(),
            context_tokens: input_tokens + output_tokens,
        },
        store,
    };
    let commit = match &turn.outcome {
        Outcome::Complete(_) => {
            let response = echo.response("completed", &output, usage(output_tokens), &[]);
            w.emit(json!({ "type": "response.completed", "response": response }));
            commit_keep(accepted.store)
        }
        Outcome::Incomplete { reason, .. } => {
            let details = json!({ "reason": reason });
            let response = echo.response(
                "incomplete",
                &output,
                usage(output_tokens),
                &[("incomplete_details", details)],
            );
            w.emit(json!({ "type": "response.incomplete", "response": response }));
            commit_keep(accepted.store)
        }
        Outcome::Failed { code, message, .. } => {
            let error = json!({ "code": code, "message": message });
            let response = echo.response("failed", &output, Value::Null, &[("error", error)]);
            w.emit(json!({ "type": "response.failed", "response": response }));
            Commit::Evict { previous_id }
        }
        Outcome::Error { .. } => Commit::Evict { previous_id },
    };
    Plan {
        gate: turn.gate.clone(),
        hold_before: turn.hold_before.clone(),
        events: w.events,
        error: None,
        drop_after: turn.drop_after,
        commit,
    }
}

/// Validate, take a turn and plan it. `Err` is an immediate refusal (with the previous id the
/// refused request referenced, for eviction).
fn start_request(
    shared: &Shared,
    transport: Transport,
    body: Value,
    cache: Option<&Conversation>,
) -> Result<(String, Plan, bool), Refused> {
    let accepted = accept_request(shared, transport, body, cache)?;
    // Prewarm consumes no scripted turn.
    let turn = if accepted.generate {
        shared.take_turn()
    } else {
        Turn::text("")
    };
    let response_id = shared.next_id("resp");
    let plan = plan_turn(shared, &accepted, &turn, &response_id);
    Ok((response_id, plan, accepted.generate))
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1: request heads, upgrade routing, SSE
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Head {
    method: String,
    path: String,
    version_1_0: bool,
    headers: Vec<(String, String)>,
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn header_has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn is_upgrade(headers: &[(String, String)]) -> bool {
    header_has_token(headers, "upgrade", "websocket")
}

/// Errors reading an HTTP request; each just ends the connection.
#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("request head too large")]
    HeadTooLarge,
    #[error("request body too large")]
    BodyTooLarge,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Read one request head; bytes after it stay in `buf`.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Head, HttpError> {
    let end = loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(HttpError::HeadTooLarge);
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text =
        std::str::from_utf8(&buf[..end]).map_err(|_| HttpError::Malformed("non-UTF-8 head"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().ok_or(HttpError::Malformed("empty head"))?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed("request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("HTTP version"));
    }
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::Malformed("header line"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let head = Head {
        method: method.to_owned(),
        path: path.to_owned(),
        version_1_0: version == "HTTP/1.0",
        headers,
    };
    buf.drain(..end + 4);
    Ok(head)
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, at_least: usize) -> Result<(), HttpError> {
    while buf.len() < at_least {
        let mut chunk = [0u8; 16384];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

async fn fill_until(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    needle: &[u8],
) -> Result<usize, HttpError> {
    loop {
        if let Some(pos) = find(buf, needle) {
            return Ok(pos);
        }
        let want = buf.len() + 1;
        fill(stream, buf, want).await?;
    }
}

/// Read the body announced by `head` (Content-Length or chunked); leftover stays in `buf`.
async fn read_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    head: &Head,
) -> Result<Vec<u8>, HttpError> {
    if header_has_token(&head.headers, "transfer-encoding", "chunked") {
        let mut body = Vec::new();
        loop {
            let line_end = fill_until(stream, buf, b"\r\n").await?;
            let line = std::str::from_utf8(&buf[..line_end])
                .map_err(|_| HttpError::Malformed("chunk size"))?;
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| HttpError::Malformed("chunk size"))?;
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers (usually none) end with an empty line.
                let end = fill_until(stream, buf, b"\r\n").await?;
                if end == 0 {
                    buf.drain(..2);
                } else {
                    let end = fill_until(stream, buf, b"\r\n\r\n").await?;
                    buf.drain(..end + 4);
                }
                return Ok(body);
            }
            if body.len() + size > MAX_BODY_BYTES {
                return Err(HttpError::BodyTooLarge);
            }
            fill(stream, buf, size + 2).await?;
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    }
    let length = match header(&head.headers, "content-length") {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| HttpError::Malformed("content-length"))?,
        None => 0,
    };
    if length > MAX_BODY_BYTES {
        return Err(HttpError::BodyTooLarge);
    }
    fill(stream, buf, length).await?;
    Ok(buf.drain(..length).collect())
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

async fn write_json(
    stream: &mut TcpStream,
    status: u16,
    body: &Value,
    extra_headers: &str,
    close: bool,
) -> std::io::Result<()> {
    let body = body.to_string();
    let connection = if close { "close" } else { "keep-alive" };
    let response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {connection}\r\n{extra_headers}\r\n{body}",
        reason_phrase(status),
        body.len(),
    );
    stream.write_all(response.as_bytes()).await
}

async fn write_error(
    stream: &mut TcpStream,
    error: &ApiError,
    extra_headers: &str,
    close: bool,
) -> std::io::Result<()> {
    write_json(
        stream,
        error.status,
        &error.http_body(),
        extra_headers,
        close,
    )
    .await
}

/// The API key check: `Authorization: Bearer <non-empty>`.
fn check_auth(headers: &[(String, String)]) -> Result<(), ApiError> {
    let token = header(headers, "authorization")
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match token {
        Some(token) if !token.is_empty() => Ok(()),
        _ => Err(ApiError {
            status: 401,
            kind: "invalid_request_error".to_owned(),
            code: None,
            message: "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".to_owned(),
            param: None,
        }),
    }
}

/// One TCP connection: HTTP/1.1 requests until it closes or upgrades to WebSocket.
async fn serve_connection(shared: Arc<Shared>, mut stream: TcpStream, connection: u64) {
    let mut buf = Vec::new();
    loop {
        let head = match read_head(&mut stream, &mut buf).await {
            Ok(head) => head,
            Err(HttpError::HeadTooLarge) => {
                let error = ApiError::invalid(None, "Request header fields too large.", None);
                let error = ApiError {
                    status: 431,
                    ..error
                };
                let _ = write_error(&mut stream, &error, "", true).await;
                return;
            }
            Err(_) => return,
        };
        let route = head.path.split('?').next().unwrap_or_default();
        if route != RESPONSES_PATH {
            shared.record_head(connection, &head, 404);
            let error = ApiError {
                status: 404,
                ..ApiError::invalid(
                    None,
                    format!("Invalid URL ({} {}).", head.method, head.path),
                    None,
                )
            };
            let _ = write_error(&mut stream, &error, "", true).await;
            return;
        }
        if let Err(error) = check_auth(&head.headers)
            && !shared.settings().keyless
        {
            shared.record_head(connection, &head, 401);
            let _ = write_error(&mut stream, &error, "", true).await;
            return;
        }
        if head.method == "GET" && is_upgrade(&head.headers) {
            upgrade(shared, stream, connection, head, buf).await;
            return;
        }
        if head.method != "POST" {
            shared.record_head(connection, &head, 405);
            let error = ApiError {
                status: 405,
                ..ApiError::invalid(
                    None,
                    format!("Method {} is not allowed on {RESPONSES_PATH}.", head.method),
                    None,
                )
            };
            let _ = write_error(&mut stream, &error, "", true).await;
            return;
        }
        if header(&head.headers, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
            && stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return;
        }
        let body = match read_body(&mut stream, &mut buf, &head).await {
            Ok(body) => body,
            Err(HttpError::BodyTooLarge) => {
                shared.record_head(connection, &head, 413);
                let error = ApiError {
                    status: 413,
                    ..ApiError::invalid(None, "Request body too large.", None)
                };
                let _ = write_error(&mut stream, &error, "", true).await;
                return;
            }
            Err(_) => return,
        };
        let close = head.version_1_0 || header_has_token(&head.headers, "connection", "close");
        let keep_going = serve_post(&shared, &mut stream, connection, &head, body, close).await;
        if close || !keep_going {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Answer one POST. Returns whether the connection can carry another request.
async fn serve_post(
    shared: &Shared,
    stream: &mut TcpStream,
    connection: u64,
    head: &Head,
    body: Vec<u8>,
    close: bool,
) -> bool {
    let bytes = body.len();
    let raw = String::from_utf8_lossy(&body).into_owned();
    let parsed: Result<Value, _> = serde_json::from_slice(&body);
    let stream_mode = parsed
        .as_ref()
        .ok()
        .and_then(|v| v.get("stream"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let result = match parsed {
        Ok(value) => start_request(shared, Transport::Http, value, None),
        Err(_) => Err(Box::new((
            ApiError::invalid(
                Some("invalid_json"),
                "We could not parse the JSON body of your request.",
                None,
            ),
            None,
        ))),
    };
    let (response_id, plan, generate) = match result {
        Ok(started) => started,
        Err(refused) => {
            let (error, _) = *refused;
            shared.record_head(connection, head, error.status);
            let outcome = RequestOutcome::Rejected {
                status: error.status,
                code: error.code.clone(),
            };
            shared.record(connection, Transport::Http, raw, bytes, outcome);
            return write_error(stream, &error, "", close).await.is_ok();
        }
    };
    if let Some((delay, error)) = &plan.error {
        shared.record_head(connection, head, error.status);
        let outcome = RequestOutcome::Rejected {
            status: error.status,
            code: error.code.clone(),
        };
        shared.record(connection, Transport::Http, raw, bytes, outcome);
        tokio::time::sleep(*delay).await;
        return write_error(stream, error, "", close).await.is_ok();
    }
    shared.record_head(connection, head, 200);
    let outcome = if generate {
        RequestOutcome::Response { id: response_id }
    } else {
        RequestOutcome::Prewarm { id: response_id }
    };
    shared.record(connection, Transport::Http, raw, bytes, outcome);
    if let Some(gate) = &plan.gate {
        gate.wait().await;
    }
    let start = Instant::now();

    if !stream_mode {
        // Non-streaming: the final response object once the model is "done".
        let Some((at, last)) = plan.events.last() else {
            return false;
        };
        until(start + *at).await;
        if let Commit::Keep {
            conversation,
            store: true,
        } = &plan.commit
        {
            shared.store(conversation);
        }
        let response = last.get("response").cloned().unwrap_or(Value::Null);
        return write_json(stream, 200, &response, "", close).await.is_ok();
    }

    if plan.drop_after == Some(0) {
        // Dropped before the first byte of the response.
        let _ = stream.shutdown().await;
        return false;
    }
    let connection_header = if close { "close" } else { "keep-alive" };
    let head_text = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: {connection_header}\r\n\r\n"
    );
    if stream.write_all(head_text.as_bytes()).await.is_err() {
        return false;
    }
    let mut sent = 0usize;
    let mut events = plan.events.iter().peekable();
    while let Some((at, _)) = events.peek() {
        until(start + *at).await;
        // Everything due now goes out in one write.
        let now = Instant::now();
        let mut chunk = String::new();
        let mut dropped = false;
        while let Some((at, event)) = events.peek() {
            if start + *at > now {
                break;
            }
            let kind = event
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("message");
            let data = format!("event: {kind}\ndata: {event}\n\n");
            chunk.push_str(&format!("{:x}\r\n{data}\r\n", data.len()));
            events.next();
            sent += 1;
            if plan.drop_after.is_some_and(|n| sent >= n) {
                dropped = true;
                break;
            }
        }
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            return false;
        }
        if dropped {
            // Mid-stream drop: no terminating chunk, the connection just ends.
            let _ = stream.shutdown().await;
            return false;
        }
    }
    if let Commit::Keep {
        conversation,
        store: true,
    } = &plan.commit
    {
        shared.store(conversation);
    }
    stream.write_all(b"0\r\n\r\n").await.is_ok()
}

// ---------------------------------------------------------------------------------------------
// WebSocket mode
// ---------------------------------------------------------------------------------------------

async fn upgrade(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    connection: u64,
    head: Head,
    leftover: Vec<u8>,
) {
    let settings = shared.settings();
    if settings.refuse_websocket {
        shared.record_head(connection, &head, 426);
        let error = ApiError {
            status: 426,
            ..ApiError::invalid(
                Some("websocket_not_supported"),
                "WebSocket mode is not available on this endpoint; use HTTP streaming.",
                None,
            )
        };
        let _ = write_error(&mut stream, &error, "", true).await;
        return;
    }
    let key = header(&head.headers, "sec-websocket-key");
    let version_ok = header(&head.headers, "sec-websocket-version") == Some("13");
    let (Some(key), true) = (key, version_ok) else {
        shared.record_head(connection, &head, 400);
        let error = ApiError::invalid(None, "Invalid WebSocket upgrade request.", None);
        let _ = write_error(&mut stream, &error, "Sec-WebSocket-Version: 13\r\n", true).await;
        return;
    };
    // Reserve a slot before answering 101 so concurrent upgrades cannot overshoot the limit.
    let open = shared.ws_open_now.fetch_add(1, Ordering::SeqCst);
    if settings.max_connections.is_some_and(|max| open >= max) {
        shared.ws_open_now.fetch_sub(1, Ordering::SeqCst);
        shared.record_head(connection, &head, 429);
        // Not documented: the real over-limit answer is unknown; a retryable 429 is the safe guess.
        let error = ApiError {
            status: 429,
            kind: "rate_limit_error".to_owned(),
            code: Some("rate_limit_exceeded".to_owned()),
            message: "Too many concurrent WebSocket connections.".to_owned(),
            param: None,
        };
        let _ = write_error(&mut stream, &error, "Retry-After: 1\r\n", true).await;
        return;
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        shared.ws_open_now.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    shared.record_head(connection, &head, 101);
    shared.ws_opened.send_modify(|count| *count += 1);
    let mut ws = WebSocketStream::from_partially_read(stream, leftover, Role::Server, None).await;
    // Decrement on every exit, including a kill that drops this future mid-await.
    let _open = OpenGuard(Arc::clone(&shared));
    if settings.drop_websocket_after_upgrade {
        let _ = ws.next().await;
        let _ = ws
            .send(Message::Close(Some(
                tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Error,
                    reason: "internal error".into(),
                },
            )))
            .await;
        return;
    }
    serve_ws(&shared, ws, connection).await;
}

struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.ws_open_now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One scheduled action of a response in flight.
#[derive(Debug)]
enum Step {
    Send(Value),
    /// Close the TCP connection without a close frame (every lane dies with it).
    Drop,
    /// The response is over: update its lane's cache and start the lane's next queued request.
    Commit {
        lane: String,
        commit: Commit,
    },
    /// Flush what was sent and wait for the test to open the gate (holds the connection).
    Hold(Gate),
}

/// One lane of a connection; the default lane ("", requests without `stream_id`) is the
/// whole connection of the older guide.
#[derive(Debug, Default)]
struct LaneState {
    /// The lane's most recent response (the connection-local cache, per lane).
    cache: Option<Conversation>,
    in_flight: bool,
    queued: VecDeque<(usize, Value)>,
}

impl LaneState {
    fn busy(&self) -> bool {
        self.in_flight || !self.queued.is_empty()
    }
}

/// A planned response waiting for its gate (named lanes only: the others keep running).
#[derive(Debug)]
struct Gated {
    lane: String,
    index: usize,
    response_id: String,
    plan: Plan,
    generate: bool,
}

#[derive(Debug)]
struct WsState {
    connection: u64,
    lanes: HashMap<String, LaneState>,
    /// Every lane's steps, in time order (FIFO among equal times).
    schedule: VecDeque<(Instant, Step)>,
    gated: tokio::sync::mpsc::UnboundedSender<Gated>,
}

impl WsState {
    fn lane(&mut self, lane: &str) -> &mut LaneState {
        self.lanes.entry(lane.to_owned()).or_default()
    }

    fn schedule(&mut self, at: Instant, step: Step) {
        let position = self.schedule.partition_point(|(t, _)| *t <= at);
        self.schedule.insert(position, (at, step));
    }

    /// The cached response `previous_response_id` names, whichever lane holds it (naming
    /// another lane's response forks that conversation onto the requesting lane).
    fn cached(&self, body: &Value) -> Option<Conversation> {
        let id = body.get("previous_response_id").and_then(Value::as_str)?;
        self.lanes
            .values()
            .filter_map(|l| l.cache.as_ref())
            .find(|c| c.response_id == id)
            .cloned()
    }
}

type Ws = WebSocketStream<TcpStream>;

/// Whether the connection should go on after a step.
enum Flow {
    Continue,
    Stop,
}

/// Wait for `at`, returning at once when it is already due. (`sleep_until` rounds up to the
/// timer's next millisecond tick, which would add up to a millisecond of fake latency to a
/// zero-latency script.)
async fn until(at: Instant) {
    if at > Instant::now() {
        tokio::time::sleep_until(at).await;
    }
}

async fn serve_ws(shared: &Shared, mut ws: Ws, connection: u64) {
    let opened_at = Instant::now();
    let (gated_tx, mut gated_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut state = WsState {
        connection,
        lanes: HashMap::new(),
        schedule: VecDeque::new(),
        gated: gated_tx,
    };
    loop {
        let next_at = state.schedule.front().map(|(at, _)| *at);
        tokio::select! {
            biased;
            _ = until(next_at.unwrap_or(opened_at)), if next_at.is_some() => {
                if let Flow::Stop = run_due_steps(shared, &mut ws, &mut state).await {
                    return;
                }
            }
            Some(gated) = gated_rx.recv() => {
                schedule_plan(shared, &mut state, gated);
            }
            message = ws.next() => {
                let flow = match message {
                    Some(Ok(Message::Text(text))) => {
                        let text = text.as_str().to_owned();
                        on_frame(shared, &mut ws, &mut state, connection, opened_at, text).await
                    }
                    Some(Ok(Message::Binary(data))) => {
                        let error = ApiError::invalid(
                            Some("invalid_value"),
                            "Binary frames are not supported; send response.create as a text frame.",
                            None,
                        );
                        let outcome = RequestOutcome::Rejected { status: 400, code: error.code.clone() };
                        let raw = String::from_utf8_lossy(&data).into_owned();
                        shared.record(connection, Transport::WebSocket, raw, data.len(), outcome);
                        send_now(&mut ws, &error.ws_event()).await
                    }
                    // tungstenite queues the pong (or the close reply); flushing sends it.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                        if ws.flush().await.is_ok() { Flow::Continue } else { Flow::Stop }
                    }
                    Some(Ok(Message::Close(_))) => {
                        let _ = ws.flush().await;
                        Flow::Stop
                    }
                    Some(Err(_)) | None => Flow::Stop,
                };
                if let Flow::Stop = flow {
                    return;
                }
            }
        }
    }
}

async fn send_now(ws: &mut Ws, event: &Value) -> Flow {
    match ws.send(Message::text(event.to_string())).await {
        Ok(()) => Flow::Continue,
        Err(_) => Flow::Stop,
    }
}

async fn on_frame(
    shared: &Shared,
    ws: &mut Ws,
    state: &mut WsState,
    connection: u64,
    opened_at: Instant,
    text: String,
) -> Flow {
    let bytes = text.len();
    let settings = shared.settings();
    if opened_at.elapsed() >= settings.connection_lifetime
        || settings.expired_before.is_some_and(|t| opened_at < t)
    {
        let error = ApiError::lifetime_reached();
        let outcome = RequestOutcome::Rejected {
            status: error.status,
            code: error.code.clone(),
        };
        shared.record(connection, Transport::WebSocket, text, bytes, outcome);
        let _ = send_now(ws, &error.ws_event()).await;
        // The connection is spent: close it properly so the client reconnects.
        let frame = CloseFrame {
            code: CloseCode::Policy,
            reason: "connection limit reached".into(),
        };
        let _ = ws.close(Some(frame)).await;
        return Flow::Stop;
    }
    let parsed: Result<Value, _> = serde_json::from_str(&text);
    let Ok(body) = parsed else {
        let error = ApiError::invalid(
            Some("invalid_json"),
            "We could not parse the JSON of your event.",
            None,
        );
        let outcome = RequestOutcome::Rejected {
            status: 400,
            code: error.code.clone(),
        };
        shared.record(connection, Transport::WebSocket, text, bytes, outcome);
        return send_now(ws, &error.ws_event()).await;
    };
    let lane = match lane_of(&body, &settings.lanes) {
        Ok(lane) => lane,
        Err(error) => {
            let outcome = RequestOutcome::Rejected {
                status: error.status,
                code: error.code.clone(),
            };
            shared.record(connection, Transport::WebSocket, text, bytes, outcome);
            return send_now(ws, &error.ws_event()).await;
        }
    };
    if !lane.is_empty() {
        return on_lane_frame(shared, ws, state, lane, text, body).await;
    }
    if state.lane("").in_flight {
        match settings.in_flight {
            InFlightPolicy::Queue => {
                let index = shared.record(
                    connection,
                    Transport::WebSocket,
                    text,
                    bytes,
                    RequestOutcome::Queued,
                );
                state.lane("").queued.push_back((index, body));
                return Flow::Continue;
            }
            InFlightPolicy::Reject => {
                // Not documented: the guide only says responses run one at a time.
                let error = ApiError::invalid(
                    Some("response_already_in_progress"),
                    "A response is already in progress on this connection. Wait for it to finish or open another connection.",
                    None,
                );
                let outcome = RequestOutcome::Rejected {
                    status: 400,
                    code: error.code.clone(),
                };
                shared.record(connection, Transport::WebSocket, text, bytes, outcome);
                return send_now(ws, &error.ws_event()).await;
            }
        }
    }
    let index = shared.record(
        connection,
        Transport::WebSocket,
        text,
        bytes,
        RequestOutcome::Queued,
    );
    start_ws_request(shared, ws, state, String::new(), index, body).await
}

/// Start one request on `lane`: refuse it at once, or schedule its events.
async fn start_ws_request(
    shared: &Shared,
    ws: &mut Ws,
    state: &mut WsState,
    lane: String,
    index: usize,
    body: Value,
) -> Flow {
    let cache = state.cached(&body);
    match start_request(shared, Transport::WebSocket, body, cache.as_ref()) {
        Err(refused) => {
            let (error, previous_id) = *refused;
            shared.set_outcome(
                index,
                RequestOutcome::Rejected {
                    status: error.status,
                    code: error.code.clone(),
                },
            );
            evict(state, previous_id.as_deref());
            let event = with_stream_id(error.ws_event(), &lane);
            shared.record_sent(state.connection, &event);
            send_now(ws, &event).await
        }
        Ok((response_id, plan, generate)) => {
            state.lane(&lane).in_flight = true;
            let gated = Gated {
                lane,
                index,
                response_id,
                plan,
                generate,
            };
            match gated.plan.gate.clone() {
                // The default lane is the whole connection: holding it holds everything.
                Some(gate) if gated.lane.is_empty() => {
                    gate.wait().await;
                    schedule_plan(shared, state, gated);
                }
                Some(gate) => {
                    let tx = state.gated.clone();
                    tokio::spawn(async move {
                        gate.wait().await;
                        let _ = tx.send(gated);
                    });
                }
                None => schedule_plan(shared, state, gated),
            }
            Flow::Continue
        }
    }
}

/// Schedule a started response's events from now on.
fn schedule_plan(shared: &Shared, state: &mut WsState, gated: Gated) {
    let Gated {
        lane,
        index,
        response_id,
        plan,
        generate,
    } = gated;
    let now = Instant::now();
    if let Some((delay, error)) = plan.error {
        shared.set_outcome(
            index,
            RequestOutcome::Rejected {
                status: error.status,
                code: error.code.clone(),
            },
        );
        let event = with_stream_id(error.ws_event(), &lane);
        state.schedule(now + delay, Step::Send(event));
        state.schedule(
            now + delay,
            Step::Commit {
                lane,
                commit: plan.commit,
            },
        );
        return;
    }
    let outcome = if generate {
        RequestOutcome::Response { id: response_id }
    } else {
        RequestOutcome::Prewarm { id: response_id }
    };
    shared.set_outcome(index, outcome);
    if plan.drop_after == Some(0) {
        state.schedule(now, Step::Drop);
        return;
    }
    let mut last = now;
    let mut hold = plan.hold_before;
    for (n, (offset, event)) in plan.events.into_iter().enumerate() {
        last = now + offset;
        if hold
            .as_ref()
            .is_some_and(|(ty, _)| event.get("type").and_then(Value::as_str) == Some(ty))
            && let Some((_, gate)) = hold.take()
        {
            state.schedule(last, Step::Hold(gate));
        }
        state.schedule(last, Step::Send(with_stream_id(event, &lane)));
        if plan.drop_after.is_some_and(|limit| n + 1 >= limit) {
            state.schedule(last, Step::Drop);
            return;
        }
    }
    state.schedule(
        last,
        Step::Commit {
            lane,
            commit: plan.commit,
        },
    );
}

fn evict(state: &mut WsState, previous_id: Option<&str>) {
    // The guide: a failed turn evicts the referenced previous_response_id from the cache.
    let Some(id) = previous_id else {
        return;
    };
    for lane in state.lanes.values_mut() {
        if lane.cache.as_ref().is_some_and(|c| c.response_id == id) {
            lane.cache = None;
        }
    }
}

async fn run_due_steps(shared: &Shared, ws: &mut Ws, state: &mut WsState) -> Flow {
    let now = Instant::now();
    let mut wrote = false;
    while state.schedule.front().is_some_and(|(at, _)| *at <= now) {
        let Some((_, step)) = state.schedule.pop_front() else {
            break;
        };
        match step {
            Step::Send(event) => {
                shared.record_sent(state.connection, &event);
                // Batch everything due into one flush.
                if ws.feed(Message::text(event.to_string())).await.is_err() {
                    return Flow::Stop;
                }
                wrote = true;
            }
            Step::Drop => {
                let _ = ws.flush().await;
                return Flow::Stop;
            }
            Step::Hold(gate) => {
                if ws.flush().await.is_err() {
                    return Flow::Stop;
                }
                wrote = false;
                gate.wait().await;
            }
            Step::Commit { lane, commit } => {
                match commit {
                    Commit::Keep {
                        conversation,
                        store,
                    } => {
                        if store {
                            shared.store(&conversation);
                        }
                        state.lane(&lane).cache = Some(conversation);
                    }
                    Commit::Evict { previous_id } => evict(state, previous_id.as_deref()),
                }
                state.lane(&lane).in_flight = false;
                if wrote && ws.flush().await.is_err() {
                    return Flow::Stop;
                }
                wrote = false;
                // Run the lane's queued requests, in order; refusals answer at once, a started
                // one schedules events.
                while !state.lane(&lane).in_flight {
                    let Some((index, body)) = state.lane(&lane).queued.pop_front() else {
                        break;
                    };
                    if let Flow::Stop =
                        start_ws_request(shared, ws, state, lane.clone(), index, body).await
                    {
                        return Flow::Stop;
                    }
                }
                // Newly scheduled steps may be due already; the loop condition picks them up.
            }
        }
    }
    if wrote && ws.flush().await.is_err() {
        return Flow::Stop;
    }
    Flow::Continue
}

// ---------------------------------------------------------------------------------------------
// Lanes: `stream_id` multiplexing (the current WebSocket-mode guide)
// ---------------------------------------------------------------------------------------------
//
// Rules served here (docs/protocol.md, "Provider lanes", says which come from the guide and
// which are assumptions):
// - `stream_id` on `response.create` names a lane; lanes of one connection run in parallel,
//   requests of one lane strictly in order (a request on a busy lane is queued, FIFO);
// - every event of a lane's response, errors included, echoes its `stream_id`; errors about
//   the connection itself (its lifetime) carry none;
// - `previous_response_id` may name the most recent response of any lane of the connection:
//   naming another lane's forks that conversation onto the requesting lane;
// - limits: at most `max_streams` lanes with work at once (`stream_limit_reached`), at most
//   `max_queued_per_stream` requests waiting on one lane (`stream_queue_full`), and a
//   `stream_id` is 1–64 characters of `[A-Za-z0-9_.:-]` (`invalid_value`);
// - `refuse`: an older service, for which `stream_id` is an `unknown_parameter`.

/// The assumed per-connection lane limits (the stored guide names the errors, not numbers).
pub const DEFAULT_MAX_STREAMS: usize = 32;
pub const DEFAULT_MAX_QUEUED_PER_STREAM: usize = 16;
const MAX_STREAM_ID_CHARS: usize = 64;

/// How the fake treats `stream_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneSettings {
    /// Answer `stream_id` with `unknown_parameter`, as a service predating lanes does.
    pub refuse: bool,
    pub max_streams: usize,
    pub max_queued_per_stream: usize,
}

impl Default for LaneSettings {
    fn default() -> LaneSettings {
        LaneSettings {
            refuse: false,
            max_streams: DEFAULT_MAX_STREAMS,
            max_queued_per_stream: DEFAULT_MAX_QUEUED_PER_STREAM,
        }
    }
}

/// One event the fake sent over WebSocket mode.
#[derive(Debug, Clone)]
pub struct SentEvent {
    pub connection: u64,
    pub stream_id: Option<String>,
    pub kind: String,
}

impl FakeProvider {
    /// Every WebSocket event sent so far, in order.
    pub fn sent_events(&self) -> Vec<SentEvent> {
        lock(&self.shared.sent).clone()
    }

    /// Refuse (or accept again) `stream_id` from now on.
    pub fn set_refuse_lanes(&self, refuse: bool) {
        self.update_settings(|s| s.lanes.refuse = refuse);
    }
}

impl Recorded {
    /// The lane this request was sent on (`None`: the default lane).
    pub fn stream_id(&self) -> Option<&str> {
        self.json.get("stream_id").and_then(Value::as_str)
    }
}

impl Shared {
    fn record_sent(&self, connection: u64, event: &Value) {
        lock(&self.sent).push(SentEvent {
            connection,
            stream_id: event
                .get("stream_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
            kind: event
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        });
    }
}

impl ApiError {
    fn lane(status: u16, code: &str, message: String) -> ApiError {
        ApiError {
            status,
            ..ApiError::invalid(Some(code), message, Some("stream_id"))
        }
    }
}

/// The lane a request names ("" for none), or why it is refused.
fn lane_of(body: &Value, settings: &LaneSettings) -> Result<String, ApiError> {
    let Some(id) = body.get("stream_id") else {
        return Ok(String::new());
    };
    if settings.refuse {
        return Err(ApiError::invalid(
            Some("unknown_parameter"),
            "Unknown parameter: 'stream_id'.",
            Some("stream_id"),
        ));
    }
    let valid = id.as_str().filter(|s| {
        (1..=MAX_STREAM_ID_CHARS).contains(&s.chars().count())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
    });
    match valid {
        Some(s) => Ok(s.to_owned()),
        None => Err(ApiError::lane(
            400,
            "invalid_value",
            format!(
                "Invalid 'stream_id': expected 1 to {MAX_STREAM_ID_CHARS} characters of letters, digits, '_', '.', ':' or '-'."
            ),
        )),
    }
}

fn with_stream_id(mut event: Value, lane: &str) -> Value {
    if !lane.is_empty()
        && let Some(object) = event.as_object_mut()
    {
        object.insert("stream_id".to_owned(), json!(lane));
    }
    event
}

/// A `response.create` on a named lane: run it now, queue it behind the lane's work, or
/// refuse it over a limit.
async fn on_lane_frame(
    shared: &Shared,
    ws: &mut Ws,
    state: &mut WsState,
    lane: String,
    text: String,
    body: Value,
) -> Flow {
    let bytes = text.len();
    let limits = shared.settings().lanes;
    let busy_lanes = state.lanes.values().filter(|l| l.busy()).count();
    let this = state.lane(&lane);
    let refusal = if this.busy() && this.queued.len() >= limits.max_queued_per_stream {
        Some(ApiError::lane(
            429,
            "stream_queue_full",
            format!(
                "Stream '{lane}' already has {} requests waiting; wait for its responses to finish.",
                limits.max_queued_per_stream
            ),
        ))
    } else if !this.busy() && busy_lanes >= limits.max_streams {
        Some(ApiError::lane(
            429,
            "stream_limit_reached",
            format!(
                "This connection already has {} active streams; wait for one to finish or open another connection.",
                limits.max_streams
            ),
        ))
    } else {
        None
    };
    if let Some(error) = refusal {
        let outcome = RequestOutcome::Rejected {
            status: error.status,
            code: error.code.clone(),
        };
        shared.record(state.connection, Transport::WebSocket, text, bytes, outcome);
        let event = with_stream_id(error.ws_event(), &lane);
        shared.record_sent(state.connection, &event);
        return send_now(ws, &event).await;
    }
    let index = shared.record(
        state.connection,
        Transport::WebSocket,
        text,
        bytes,
        RequestOutcome::Queued,
    );
    if state.lane(&lane).busy() {
        state.lane(&lane).queued.push_back((index, body));
        return Flow::Continue;
    }
    start_ws_request(shared, ws, state, lane, index, body).await
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    type Client = WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

    /// Guards against a hang; never used to wait for something to happen.
    const GUARD: Duration = Duration::from_secs(10);

    const PATCH: &str = "*** Begin Patch\n*** Update File: src/main.rs\n@@\n-fn parse_args() {}\n+fn parse_cli() {}\n*** End Patch\n";

    async fn connect(provider: &FakeProvider) -> Client {
        let mut request = provider
            .ws_url()
            .into_client_request()
            .expect("client request");
        request.headers_mut().insert(
            "authorization",
            "Bearer sk-test".parse().expect("header value"),
        );
        let (ws, response) = tokio::time::timeout(GUARD, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect in time")
            .expect("websocket upgrade");
        assert_eq!(response.status().as_u16(), 101);
        ws
    }

    fn user(text: &str) -> Value {
        json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
    }

    fn create(previous: Option<&str>, input: Vec<Value>) -> Value {
        let mut body = json!({
            "type": "response.create",
            "model": "gpt-5.3-codex-spark",
            "instructions": "You edit code.",
            "store": false,
            "input": input,
            "tools": [{"type": "custom", "name": "apply_patch", "description": "Edit files"}],
        });
        if let Some(previous) = previous {
            body["previous_response_id"] = json!(previous);
        }
        body
    }

    async fn send(ws: &mut Client, body: &Value) {
        ws.send(Message::text(body.to_string()))
            .await
            .expect("send frame");
    }

    /// The next text frame as JSON; `None` when the connection ended (cleanly or not).
    async fn next_event(ws: &mut Client) -> Option<Value> {
        loop {
            let message = tokio::time::timeout(GUARD, ws.next())
                .await
                .expect("event in time");
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(text.as_str()).expect("events are JSON"));
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                Some(Ok(_)) => {}
            }
        }
    }

    /// Events up to and including a terminal one (`response.completed/failed/incomplete`, `error`).
    async fn until_terminal(ws: &mut Client) -> Vec<Value> {
        let mut events = Vec::new();
        while let Some(event) = next_event(ws).await {
            let kind = event["type"].as_str().unwrap_or_default().to_owned();
            events.push(event);
            if matches!(
                kind.as_str(),
                "response.completed" | "response.failed" | "response.incomplete" | "error"
            ) {
                return events;
            }
        }
        panic!("connection ended before a terminal event: {events:?}");
    }

    fn types(events: &[Value]) -> Vec<&str> {
        events
            .iter()
            .map(|e| e["type"].as_str().unwrap_or("?"))
            .collect()
    }

    fn response_id(events: &[Value]) -> String {
        events[0]["response"]["id"]
            .as_str()
            .expect("response id")
            .to_owned()
    }

    fn assert_sequence_numbers(events: &[Value]) {
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], json!(i), "event {i}: {event}");
        }
    }

    fn last_item(events: &[Value]) -> Value {
        let done = events.last().expect("events");
        done["response"]["output"]
            .as_array()
            .expect("output")
            .last()
            .cloned()
            .expect("an item")
    }

    #[tokio::test]
    async fn chained_conversation_over_one_connection() {
        let script = Script::new()
            .turn(Turn::text("Sure, renaming."))
            .turn(Turn::apply_patch(PATCH));
        let provider = FakeProvider::start(script).await;
        let mut ws = connect(&provider).await;

        send(&mut ws, &create(None, vec![user("rename parse_args")])).await;
        let first = until_terminal(&mut ws).await;
        assert_eq!(
            types(&first),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert_sequence_numbers(&first);
        let first_id = response_id(&first);
        assert!(first_id.starts_with("resp_"));
        let completed = first.last().expect("completed");
        assert_eq!(completed["response"]["status"], "completed");
        assert_eq!(
            completed["response"]["output"][0]["content"][0]["text"],
            "Sure, renaming."
        );
        assert!(completed["response"]["usage"]["output_tokens"].as_u64() > Some(0));

        send(&mut ws, &create(Some(&first_id), vec![user("go on")])).await;
        let second = until_terminal(&mut ws).await;
        let second_types = types(&second);
        assert_eq!(second_types[2], "response.output_item.added");
        assert!(second_types.contains(&"response.custom_tool_call_input.delta"));
        assert_eq!(
            second_types[second_types.len() - 3],
            "response.custom_tool_call_input.done"
        );
        assert_eq!(
            second_types[second_types.len() - 2],
            "response.output_item.done"
        );
        assert_sequence_numbers(&second);
        let deltas: String = second
            .iter()
            .filter(|e| e["type"] == "response.custom_tool_call_input.delta")
            .map(|e| e["delta"].as_str().expect("delta"))
            .collect();
        assert_eq!(deltas, PATCH);
        let call = last_item(&second);
        assert_eq!(call["type"], "custom_tool_call");
        assert_eq!(call["name"], "apply_patch");
        assert_eq!(call["input"], PATCH);
        let usage = &second.last().expect("completed")["response"]["usage"];
        assert!(
            usage["input_tokens_details"]["cached_tokens"].as_u64() > Some(0),
            "cache hit"
        );

        // Answering the call at the head of the next turn continues the chain.
        let output = json!({"type": "custom_tool_call_output", "call_id": call["call_id"], "output": "Done!"});
        send(
            &mut ws,
            &create(Some(&response_id(&second)), vec![output, user("thanks")]),
        )
        .await;
        let third = until_terminal(&mut ws).await;
        assert_eq!(
            third.last().expect("terminal")["type"],
            "response.completed"
        );

        let requests = provider.wait_for_requests(3).await;
        assert_eq!(requests.len(), 3);
        assert!(
            requests
                .iter()
                .all(|r| r.connection == requests[0].connection)
        );
        assert_eq!(requests[1].previous_response_id(), Some(first_id.as_str()));
        assert_eq!(requests[0].response_id(), Some(first_id.as_str()));
        assert_eq!(requests[2].input().len(), 2);
        assert_eq!(requests[0].bytes, requests[0].raw.len());
        assert_eq!(provider.connections_opened(), 1);
        let heads = provider.heads();
        assert_eq!(heads[0].status, 101);
        assert_eq!(heads[0].header("authorization"), Some("Bearer sk-test"));
    }

    #[tokio::test]
    async fn previous_response_not_found_on_a_new_connection() {
        let provider = FakeProvider::start(Script::new()).await;
        let mut first = connect(&provider).await;
        send(&mut first, &create(None, vec![user("hi")])).await;
        let id = response_id(&until_terminal(&mut first).await);

        let mut second = connect(&provider).await;
        send(&mut second, &create(Some(&id), vec![user("again")])).await;
        let events = until_terminal(&mut second).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["type"], "error");
        assert_eq!(events[0]["status"], 400);
        assert_eq!(events[0]["error"]["code"], "previous_response_not_found");
        assert_eq!(events[0]["error"]["param"], "previous_response_id");
        assert_eq!(
            events[0]["error"]["message"],
            format!("Previous response with id '{id}' not found.")
        );

        // The refused connection stays usable: a full-context, unchained request works.
        send(&mut second, &create(None, vec![user("hi"), user("again")])).await;
        assert_eq!(
            until_terminal(&mut second).await.last().expect("terminal")["type"],
            "response.completed"
        );
        // Only the most recent response is cached: chaining to an older one fails too.
        send(&mut first, &create(None, vec![user("newer")])).await;
        until_terminal(&mut first).await;
        send(&mut first, &create(Some(&id), vec![user("older")])).await;
        assert_eq!(
            until_terminal(&mut first).await[0]["error"]["code"],
            "previous_response_not_found"
        );
    }

    #[tokio::test]
    async fn stored_responses_continue_on_any_connection() {
        let provider = FakeProvider::start(Script::new()).await;
        let mut first = connect(&provider).await;
        let mut body = create(None, vec![user("hi")]);
        body["store"] = json!(true);
        send(&mut first, &body).await;
        let id = response_id(&until_terminal(&mut first).await);
        let mut second = connect(&provider).await;
        send(&mut second, &create(Some(&id), vec![user("again")])).await;
        let events = until_terminal(&mut second).await;
        assert_eq!(
            events.last().expect("terminal")["type"],
            "response.completed"
        );
        let usage = &events.last().expect("terminal")["response"]["usage"];
        assert_eq!(
            usage["input_tokens_details"]["cached_tokens"], 0,
            "no connection cache hit"
        );
    }

    #[tokio::test]
    async fn tool_output_is_required_and_a_failed_turn_evicts() {
        let script = Script::new().turn(Turn::apply_patch(PATCH));
        let provider = FakeProvider::start(script).await;
        let mut ws = connect(&provider).await;
        send(&mut ws, &create(None, vec![user("edit")])).await;
        let events = until_terminal(&mut ws).await;
        let id = response_id(&events);
        let call_id = last_item(&events)["call_id"]
            .as_str()
            .expect("call id")
            .to_owned();

        send(&mut ws, &create(Some(&id), vec![user("next")])).await;
        let refused = until_terminal(&mut ws).await;
        assert_eq!(refused[0]["type"], "error");
        assert_eq!(refused[0]["error"]["code"], "tool_output_missing");
        assert_eq!(
            refused[0]["error"]["message"],
            format!("No tool output found for custom tool call {call_id}.")
        );
        // The failed continuation evicted the cached response (the guide).
        let output = json!({"type": "custom_tool_call_output", "call_id": call_id, "output": "ok"});
        send(
            &mut ws,
            &create(Some(&id), vec![output.clone(), user("next")]),
        )
        .await;
        assert_eq!(
            until_terminal(&mut ws).await[0]["error"]["code"],
            "previous_response_not_found"
        );

        // An output answering no call is refused as well.
        let stray = json!({"type": "function_call_output", "call_id": "call_nope", "output": "?"});
        send(&mut ws, &create(None, vec![stray])).await;
        let refused = until_terminal(&mut ws).await;
        assert_eq!(
            refused[0]["error"]["message"],
            "No tool call found for function call output with call_id call_nope."
        );
        let outcomes: Vec<_> = provider.requests().into_iter().map(|r| r.outcome).collect();
        assert!(
            matches!(&outcomes[1], RequestOutcome::Rejected { status: 400, code: Some(c) } if c == "tool_output_missing")
        );
    }

    #[tokio::test]
    async fn function_call_variant_requires_function_call_output() {
        let script = Script::new().turn(Turn::function_apply_patch(PATCH));
        let provider = FakeProvider::start(script).await;
        let mut ws = connect(&provider).await;
        send(&mut ws, &create(None, vec![user("edit")])).await;
        let events = until_terminal(&mut ws).await;
        let kinds = types(&events);
        assert!(kinds.contains(&"response.function_call_arguments.delta"));
        assert!(kinds.contains(&"response.function_call_arguments.done"));
        let call = last_item(&events);
        assert_eq!(call["type"], "function_call");
        let arguments: Value =
            serde_json::from_str(call["arguments"].as_str().expect("arguments")).expect("JSON");
        assert_eq!(arguments["input"], PATCH);

        let id = response_id(&events);
        // A custom_tool_call_output does not answer a function call.
        let wrong =
            json!({"type": "custom_tool_call_output", "call_id": call["call_id"], "output": "ok"});
        send(&mut ws, &create(Some(&id), vec![wrong])).await;
        assert_eq!(until_terminal(&mut ws).await[0]["type"], "error");
        let _ = provider;
    }

    #[tokio::test]
    async fn one_response_in_flight_per_connection() {
        // A long time to first token keeps the first response in flight; nothing waits for it.
        let script = Script::new().turn(Turn::text("slow").with_ttft(Duration::from_secs(60)));
        let provider = FakeProvider::start(script).await;
        let mut ws = connect(&provider).await;
        send(&mut ws, &create(None, vec![user("one")])).await;
        let created = next_event(&mut ws).await.expect("created");
        assert_eq!(created["type"], "response.created");
        assert_eq!(
            next_event(&mut ws).await.expect("in progress")["type"],
            "response.in_progress"
        );
        send(&mut ws, &create(None, vec![user("two")])).await;
        let error = next_event(&mut ws).await.expect("error");
        assert_eq!(error["type"], "error");
        assert_eq!(error["error"]["code"], "response_already_in_progress");
        let requests = provider.wait_for_requests(2).await;
        assert!(matches!(
            requests[1].outcome,
            RequestOutcome::Rejected { .. }
        ));
    }

    #[tokio::test]
    async fn queue_policy_runs_creates_in_order() {
        let script = Script::new()
            .in_flight(InFlightPolicy::Queue)
            .turn(Turn::text("first").with_tokens_per_sec(2000.0))
            .turn(Turn::text("second"));
        let provider = FakeProvider::start(script).await;
        let mut ws = connect(&provider).await;
        send(&mut ws, &create(None, vec![user("one")])).await;
        send(&mut ws, &create(None, vec![user("two")])).await;
        let first = until_terminal(&mut ws).await;
        let second = until_terminal(&mut ws).await;
        assert_eq!(last_item(&first)["content"][0]["text"], "first");
        assert_eq!(last_item(&second)["content"][0]["text"], "second");
        let _ = provider;
    }

    #[tokio::test]
    async fn connection_lifetime_limit() {
        let provider = FakeProvider::start(Script::new().connection_lifetime(Duration::ZERO)).await;
        let mut ws = connect(&provider).await;
        send(&mut ws, &create(None, vec![user("hi")])).await;
        let error = next_event(&mut ws).await.expect("error event");
        assert_eq!(
            error,
            json!({
                "type": "error",
                "status": 400,
                "error": {
                    "type": "invalid_request_error",
                    "code": "websocket_connection_limit_reached",
                    "message": "Responses websocket connection limit reached (60 minutes). Create a new websocket connection to continue.",
                    "param": null,
                },
            })
        );
        assert_eq!(next_event(&mut ws).await, None, "the connection is closed");
    }

    #[tokio::test]
    async fn refused_upgrade_answers_426_and_http_still_works() {
        let provider = FakeProvider::start(Script::new().refuse_websocket()).await;
        let mut request = provider.ws_url().into_client_request().expect("request");
        request
            .headers_mut()
            .insert("authorization", "Bearer sk-test".parse().expect("header"));
        let result = tokio_tungstenite::connect_async(request).await;
        match result {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 426);
            }
            other => panic!("expected a 426 refusal, got {other:?}"),
        }
        assert_eq!(provider.connections_opened(), 0);
        assert_eq!(provider.heads()[0].status, 426);
        let (status, _, body) = http_post(&provider, &http_body(None), true).await;
        assert_eq!(status, 200);
        assert!(body.contains("event: response.completed"));
    }

    #[tokio::test]
    async fn missing_api_key_is_401() {
        let provider = FakeProvider::start(Script::new()).await;
        let (status, _, body) = http_post(&provider, &http_body(None), false).await;
        assert_eq!(status, 401);
        let body: Value = serde_json::from_str(&body).expect("JSON error body");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let result = tokio_tungstenite::connect_async(provider.ws_url()).await;
        assert!(
            matches!(result, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status().as_u16() == 401)
        );
    }

    fn http_body(previous: Option<&str>) -> Value {
        let mut body = json!({
            "model": "gpt-5.3-codex-spark",
            "instructions": "You edit code.",
            "input": [user("rename parse_args")],
            "stream": true,
            "store": false,
        });
        if let Some(previous) = previous {
            body["previous_response_id"] = json!(previous);
        }
        body
    }

    /// One POST over a raw TCP stream; returns status, head, and the de-chunked body.
    async fn http_post(provider: &FakeProvider, body: &Value, auth: bool) -> (u16, String, String) {
        let mut stream = TcpStream::connect(provider.addr()).await.expect("connect");
        let body = body.to_string();
        let auth = if auth {
            "Authorization: Bearer sk-test\r\n"
        } else {
            ""
        };
        let request = format!(
            "POST /v1/responses HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            provider.addr(),
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut raw = Vec::new();
        tokio::time::timeout(GUARD, stream.read_to_end(&mut raw))
            .await
            .expect("response in time")
            .expect("read response");
        let raw = String::from_utf8(raw).expect("UTF-8 response");
        let (head, rest) = raw.split_once("\r\n\r\n").expect("head");
        let status = head[9..12].parse().expect("status code");
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(rest)
        } else {
            rest.to_owned()
        };
        (status, head.to_owned(), body)
    }

    fn dechunk(mut rest: &str) -> String {
        let mut body = String::new();
        loop {
            let Some((size, tail)) = rest.split_once("\r\n") else {
                return body;
            };
            let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
            if size == 0 {
                return body;
            }
            body.push_str(&tail[..size]);
            rest = &tail[size + 2..];
        }
    }

    /// Parse SSE into (event name, data JSON) pairs.
    fn parse_sse(body: &str) -> Vec<(String, Value)> {
        body.split("\n\n")
            .filter(|block| !block.trim().is_empty())
            .map(|block| {
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                (name, serde_json::from_str(&data).expect("data is JSON"))
            })
            .collect()
    }

    #[tokio::test]
    async fn sse_stream_parses_and_chains_only_stored_responses() {
        let script = Script::new().turn(Turn::apply_patch(PATCH));
        let provider = FakeProvider::start(script).await;
        let (status, head, body) = http_post(&provider, &http_body(None), true).await;
        assert_eq!(status, 200);
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/event-stream")
        );
        let events = parse_sse(&body);
        for (i, (name, data)) in events.iter().enumerate() {
            assert_eq!(data["type"], json!(name), "event name matches data.type");
            assert_eq!(data["sequence_number"], json!(i));
        }
        let names: Vec<_> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names[..3],
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added"
            ]
        );
        assert_eq!(
            names[names.len() - 3..],
            [
                "response.custom_tool_call_input.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        let id = events[0].1["response"]["id"]
            .as_str()
            .expect("id")
            .to_owned();
        let recorded = provider.wait_for_requests(1).await;
        assert_eq!(recorded[0].transport, Transport::Http);

        // store:false over HTTP has no persisted fallback.
        let (status, _, body) = http_post(&provider, &http_body(Some(&id)), true).await;
        assert_eq!(status, 400);
        let body: Value = serde_json::from_str(&body).expect("error JSON");
        assert_eq!(body["error"]["code"], "previous_response_not_found");

        // A WebSocket-only field is an unknown parameter over HTTP.
        let mut bad = http_body(None);
        bad["type"] = json!("response.create");
        let (status, _, body) = http_post(&provider, &bad, true).await;
        assert_eq!(status, 400);
        assert!(body.contains("unknown_parameter"));
    }

    #[tokio::test]
    async fn http_keep_alive_serves_several_requests() {
        let provider = FakeProvider::start(Script::new()).await;
        let mut stream = TcpStream::connect(provider.addr()).await.expect("connect");
        for _ in 0..2 {
            let body = http_body(None).to_string();
            let request = format!(
                "POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut raw = Vec::new();
            while !raw.ends_with(b"0\r\n\r\n") {
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout(GUARD, stream.read(&mut chunk))
                    .await
                    .expect("in time")
                    .expect("read");
                assert!(n > 0, "connection closed early");
                raw.extend_from_slice(&chunk[..n]);
            }
        }
        let requests = provider.wait_for_requests(2).await;
        assert_eq!(requests[0].connection, requests[1].connection);
    }

    #[tokio::test]
    async fn pacing_keeps_order_and_content() {
        let text = "fn parse_cli() -> Args { Args::parse() } // ünïcödé ✓";
        let script = Script::new().turn(
            Turn::text(text)
                .with_ttft(Duration::from_millis(5))
                .with_tokens_per_sec(5000.0),
        );
        let provider = FakeProvider::start(script).await;
        let mut ws = connect(&provider).await;
        send(&mut ws, &create(None, vec![user("go")])).await;
        let events = until_terminal(&mut ws).await;
        assert_sequence_numbers(&events);
        let deltas: Vec<&str> = events
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .map(|e| e["delta"].as_str().expect("delta"))
            .collect();
        assert!(
            deltas
                .iter()
                .all(|d| d.chars().count() <= DEFAULT_DELTA_CHARS)
        );
        assert_eq!(
            deltas.len(),
            text.chars().count().div_ceil(DEFAULT_DELTA_CHARS)
        );
        assert_eq!(deltas.concat(), text);
        let usage = &events.last().expect("completed")["response"]["usage"];
        assert_eq!(usage["output_tokens"], json!(deltas.len()));
        let _ = provider;
    }

    #[tokio::test]
    async fn drop_after_n_events_then_reconnect() {
        let script = Script::new().turn(Turn::drop_connection_after(3));
        let provider = FakeProvider::start(script).await;
        let mut ws = connect(&provider).await;
        send(&mut ws, &create(None, vec![user("go")])).await;
        let mut received = Vec::new();
        while let Some(event) = next_event(&mut ws).await {
            received.push(event);
        }
        assert_eq!(
            types(&received),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added"
            ]
        );
        // The next connection gets the default turn.
        let mut again = connect(&provider).await;
        send(&mut again, &create(None, vec![user("go")])).await;
        assert_eq!(
            until_terminal(&mut again).await.last().expect("terminal")["type"],
            "response.completed"
        );
        assert_eq!(provider.connections_opened(), 2);
    }

    #[tokio::test]
    async fn drop_after_n_events_over_sse() {
        let provider =
            FakeProvider::start(Script::new().turn(Turn::text("abcdefgh").drop_after(4))).await;
        let mut stream = TcpStream::connect(provider.addr()).await.expect("connect");
        let body = http_body(None).to_string();
        let request = format!(
            "POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(GUARD, stream.read_to_end(&mut raw))
            .await
            .expect("in time")
            .expect("read");
        let raw = String::from_utf8(raw).expect("UTF-8");
        assert!(!raw.ends_with("0\r\n\r\n"), "no terminating chunk");
        let (_, rest) = raw.split_once("\r\n\r\n").expect("head");
        assert_eq!(parse_sse(&dechunk(rest)).len(), 4);
    }

    #[tokio::test]
    async fn prewarm_creates_a_chainable_response_without_consuming_turns() {
        let script = Script::new().turn(Turn::text("real answer"));
        let provider = FakeProvider::start(script).await;
        let mut ws = connect(&provider).await;
        let mut prewarm = create(None, vec![user("repo context")]);
        prewarm["generate"] = json!(false);
        send(&mut ws, &prewarm).await;
        let events = until_terminal(&mut ws).await;
        assert_eq!(types(&events), ["response.created", "response.completed"]);
        assert_eq!(events[1]["response"]["output"], json!([]));
        assert_eq!(provider.remaining_turns(), 1);
        let id = response_id(&events);
        send(&mut ws, &create(Some(&id), vec![user("now edit")])).await;
        let events = until_terminal(&mut ws).await;
        assert_eq!(last_item(&events)["content"][0]["text"], "real answer");
        let requests = provider.wait_for_requests(2).await;
        assert!(requests[0].is_prewarm());
        assert!(matches!(&requests[0].outcome, RequestOutcome::Prewarm { id: p } if *p == id));
    }

    #[tokio::test]
    async fn failed_incomplete_and_error_turns() {
        let script = Script::new()
            .turn(Turn::failed())
            .turn(Turn::incomplete())
            .turn(Turn::error_with_status(
                429,
                "rate_limit_exceeded",
                "Slow down.",
            ));
        let provider = FakeProvider::start(script).await;
        let mut ws = connect(&provider).await;

        send(&mut ws, &create(None, vec![user("a")])).await;
        let failed = until_terminal(&mut ws).await;
        assert_eq!(
            types(&failed),
            [
                "response.created",
                "response.in_progress",
                "response.failed"
            ]
        );
        assert_eq!(failed[2]["response"]["status"], "failed");
        assert_eq!(failed[2]["response"]["error"]["code"], "server_error");
        // A failed response is not continuable.
        let failed_id = response_id(&failed);
        send(&mut ws, &create(Some(&failed_id), vec![user("b")])).await;
        assert_eq!(
            until_terminal(&mut ws).await[0]["error"]["code"],
            "previous_response_not_found"
        );

        send(&mut ws, &create(None, vec![user("c")])).await;
        let incomplete = until_terminal(&mut ws).await;
        let last = incomplete.last().expect("terminal");
        assert_eq!(last["type"], "response.incomplete");
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        assert_eq!(last_item(&incomplete)["status"], "incomplete");

        send(&mut ws, &create(None, vec![user("d")])).await;
        let error = until_terminal(&mut ws).await;
        assert_eq!(error.len(), 1);
        assert_eq!(error[0]["status"], 429);
        assert_eq!(error[0]["error"]["type"], "rate_limit_error");
        assert_eq!(error[0]["error"]["code"], "rate_limit_exceeded");
        let _ = provider;
    }

    #[tokio::test]
    async fn strict_body_checks() {
        let provider = FakeProvider::start(Script::new()).await;
        let mut ws = connect(&provider).await;
        let mut body = create(None, vec![user("a")]);
        body["stream"] = json!(true);
        send(&mut ws, &body).await;
        let error = until_terminal(&mut ws).await;
        assert_eq!(error[0]["error"]["code"], "unknown_parameter");
        assert_eq!(error[0]["error"]["param"], "stream");

        send(&mut ws, &json!({"type": "response.cancel"})).await;
        assert_eq!(until_terminal(&mut ws).await[0]["error"]["param"], "type");

        let mut body = create(None, vec![user("a")]);
        body.as_object_mut().expect("object").remove("model");
        send(&mut ws, &body).await;
        assert_eq!(
            until_terminal(&mut ws).await[0]["error"]["code"],
            "missing_required_parameter"
        );
        assert_eq!(provider.remaining_turns(), 0);
    }

    #[tokio::test]
    async fn kill_connections_drops_open_sockets() {
        let script = Script::new().turn(Turn::text("slow").with_ttft(Duration::from_secs(60)));
        let provider = FakeProvider::start(script).await;
        let mut ws = connect(&provider).await;
        send(&mut ws, &create(None, vec![user("go")])).await;
        provider.wait_for_requests(1).await;
        assert_eq!(
            next_event(&mut ws).await.expect("created")["type"],
            "response.created"
        );
        assert_eq!(
            next_event(&mut ws).await.expect("in progress")["type"],
            "response.in_progress"
        );
        provider.restart();
        assert_eq!(next_event(&mut ws).await, None);
        // The port keeps serving.
        let mut again = connect(&provider).await;
        send(&mut again, &create(None, vec![user("go")])).await;
        assert_eq!(
            until_terminal(&mut again).await.last().expect("terminal")["type"],
            "response.completed"
        );
    }

    #[tokio::test]
    async fn max_connections_refuses_extra_upgrades() {
        let provider = FakeProvider::start(Script::new().max_connections(1)).await;
        let first = connect(&provider).await;
        let mut request = provider.ws_url().into_client_request().expect("request");
        request
            .headers_mut()
            .insert("authorization", "Bearer k".parse().expect("header"));
        let result = tokio_tungstenite::connect_async(request).await;
        assert!(
            matches!(result, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status().as_u16() == 429)
        );
        drop(first);
        let _ = provider.connections_open();
    }

    #[tokio::test]
    async fn wait_for_requests_wakes_on_the_nth_request() {
        let provider = Arc::new(FakeProvider::start(Script::new()).await);
        let waiter = {
            let provider = Arc::clone(&provider);
            tokio::spawn(async move { provider.wait_for_requests(2).await.len() })
        };
        let mut ws = connect(&provider).await;
        for text in ["a", "b"] {
            send(&mut ws, &create(None, vec![user(text)])).await;
            until_terminal(&mut ws).await;
        }
        assert_eq!(
            tokio::time::timeout(GUARD, waiter)
                .await
                .expect("in time")
                .expect("join"),
            2
        );
    }

    #[test]
    fn tokens_split_on_char_boundaries() {
        assert_eq!(split_tokens("abcdefghi", 4), ["abcd", "efgh", "i"]);
        assert_eq!(split_tokens("ééééé", 2), ["éé", "éé", "é"]);
        assert!(split_tokens("", 4).is_empty());
    }

    // --- lanes (`stream_id`) ---

    fn on_lane(lane: &str, previous: Option<&str>, input: Vec<Value>) -> Value {
        let mut body = create(previous, input);
        body["stream_id"] = json!(lane);
        body
    }

    /// Events of one connection up to the terminal event of every lane in `lanes`.
    async fn until_lanes_done(ws: &mut Client, lanes: &[&str]) -> Vec<Value> {
        let mut events = Vec::new();
        let mut open: Vec<&str> = lanes.to_vec();
        while !open.is_empty() {
            let event = next_event(ws).await.expect("connection ended early");
            let kind = event["type"].as_str().unwrap_or_default();
            if matches!(
                kind,
                "response.completed" | "response.failed" | "response.incomplete" | "error"
            ) {
                let lane = event["stream_id"].as_str().unwrap_or_default();
                open.retain(|l| *l != lane);
            }
            events.push(event);
        }
        events
    }

    #[tokio::test]
    async fn lanes_run_in_parallel_on_one_connection_and_echo_their_stream_id() {
        let gate = Gate::new();
        let script = Script::new()
            .turn(Turn::text("held answer").with_gate(gate.clone()))
            .turn(Turn::text("quick answer"));
        let provider = FakeProvider::start(script).await;
        let mut ws = connect(&provider).await;
        send(&mut ws, &on_lane("a", None, vec![user("slow one")])).await;
        provider.wait_for_requests(1).await;
        send(&mut ws, &on_lane("b", None, vec![user("quick one")])).await;
        // Lane b completes while lane a is held: lanes do not wait for each other.
        let b = until_lanes_done(&mut ws, &["b"]).await;
        assert!(b.iter().all(|e| e["stream_id"] == "b"), "{b:?}");
        assert_eq!(last_item(&b)["content"][0]["text"], "quick answer");
        gate.open();
        let a = until_lanes_done(&mut ws, &["a"]).await;
        assert!(a.iter().all(|e| e["stream_id"] == "a"), "{a:?}");
        assert_eq!(last_item(&a)["content"][0]["text"], "held answer");
        assert_eq!(provider.connections_opened(), 1);
        let sent = provider.sent_events();
        let first_a = sent
            .iter()
            .position(|e| e.stream_id.as_deref() == Some("a"));
        let last_b = sent
            .iter()
            .rposition(|e| e.stream_id.as_deref() == Some("b"));
        assert!(last_b < first_a, "b answered before a's first event");
    }

    #[tokio::test]
    async fn one_lane_runs_its_requests_in_order_and_forks_across_lanes() {
        let script = Script::new()
            .turn(Turn::text("first").with_tokens_per_sec(2000.0))
            .turn(Turn::text("second"))
            .turn(Turn::text("forked"));
        let provider = FakeProvider::start(script).await;
        let mut ws = connect(&provider).await;
        send(&mut ws, &on_lane("a", None, vec![user("one")])).await;
        send(&mut ws, &on_lane("a", None, vec![user("two")])).await;
        let first = until_terminal(&mut ws).await;
        let second = until_terminal(&mut ws).await;
        assert_eq!(last_item(&first)["content"][0]["text"], "first");
        assert_eq!(last_item(&second)["content"][0]["text"], "second");
        let requests = provider.wait_for_requests(2).await;
        assert!(matches!(
            requests[1].outcome,
            RequestOutcome::Response { .. }
        ));
        // Lane b continues lane a's conversation: a fork, served from the connection cache.
        let head = response_id(&second);
        send(&mut ws, &on_lane("b", Some(&head), vec![user("three")])).await;
        let forked = until_terminal(&mut ws).await;
        assert_eq!(forked.last().expect("terminal")["stream_id"], "b");
        let usage = &forked.last().expect("terminal")["response"]["usage"];
        assert!(usage["input_tokens_details"]["cached_tokens"].as_u64() > Some(0));
        // A new connection has no lane caches.
        let mut other = connect(&provider).await;
        send(&mut other, &on_lane("b", Some(&head), vec![user("four")])).await;
        let refused = until_terminal(&mut other).await;
        assert_eq!(refused[0]["error"]["code"], "previous_response_not_found");
        assert_eq!(refused[0]["stream_id"], "b");
    }

    #[tokio::test]
    async fn lane_limits_and_the_refusing_service() {
        let gate = Gate::new();
        let script = Script::new()
            .max_streams(1)
            .turn(Turn::text("held").with_gate(gate.clone()));
        let provider = FakeProvider::start(script).await;
        provider.update_settings(|s| s.lanes.max_queued_per_stream = 1);
        let mut ws = connect(&provider).await;
        send(&mut ws, &on_lane("a", None, vec![user("one")])).await;
        send(&mut ws, &on_lane("b", None, vec![user("two")])).await;
        let over = next_event(&mut ws).await.expect("error");
        assert_eq!(over["error"]["code"], "stream_limit_reached");
        assert_eq!(over["stream_id"], "b");
        send(&mut ws, &on_lane("a", None, vec![user("queued")])).await;
        send(&mut ws, &on_lane("a", None, vec![user("too many")])).await;
        let full = next_event(&mut ws).await.expect("error");
        assert_eq!(full["error"]["code"], "stream_queue_full");
        send(&mut ws, &on_lane("no spaces", None, vec![user("bad")])).await;
        let bad = next_event(&mut ws).await.expect("error");
        assert_eq!(
            (
                bad["error"]["code"].as_str(),
                bad["error"]["param"].as_str()
            ),
            (Some("invalid_value"), Some("stream_id"))
        );
        gate.open();
        until_lanes_done(&mut ws, &["a"]).await;
        until_lanes_done(&mut ws, &["a"]).await;

        provider.set_refuse_lanes(true);
        send(&mut ws, &on_lane("a", None, vec![user("old service")])).await;
        let refused = next_event(&mut ws).await.expect("error");
        assert_eq!(refused["error"]["code"], "unknown_parameter");
        assert_eq!(refused["error"]["param"], "stream_id");
        assert!(refused.get("stream_id").is_none(), "{refused}");
        // Without a lane the older service answers as before.
        send(&mut ws, &create(None, vec![user("plain")])).await;
        let plain = until_terminal(&mut ws).await;
        assert_eq!(
            plain.last().expect("terminal")["type"],
            "response.completed"
        );
    }
}
