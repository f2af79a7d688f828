//! Lanes: `stream_id` multiplexing (the current WebSocket-mode guide).

use super::*;

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
    pub(super) fn record_sent(&self, connection: u64, event: &Value) {
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
    pub(super) fn lane(status: u16, code: &str, message: String) -> ApiError {
        ApiError {
            status,
            ..ApiError::invalid(Some(code), message, Some("stream_id"))
        }
    }
}

/// The lane a request names ("" for none), or why it is refused.
pub(super) fn lane_of(body: &Value, settings: &LaneSettings) -> Result<String, ApiError> {
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

pub(super) fn with_stream_id(mut event: Value, lane: &str) -> Value {
    if !lane.is_empty()
        && let Some(object) = event.as_object_mut()
    {
        object.insert("stream_id".to_owned(), json!(lane));
    }
    event
}

/// A `response.create` on a named lane: run it now, queue it behind the lane's work, or
/// refuse it over a limit.
pub(super) async fn on_lane_frame(
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
