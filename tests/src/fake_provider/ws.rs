//! WebSocket mode: one connection's frames, its response cache and its scheduled events.

use super::*;

pub(super) async fn upgrade(
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
    let key = head.header("sec-websocket-key");
    let version_ok = head.header("sec-websocket-version") == Some("13");
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
pub(super) struct LaneState {
    /// The lane's most recent response (the connection-local cache, per lane).
    pub(super) cache: Option<Conversation>,
    pub(super) in_flight: bool,
    pub(super) queued: VecDeque<(usize, Value)>,
}

impl LaneState {
    pub(super) fn busy(&self) -> bool {
        self.in_flight || !self.queued.is_empty()
    }
}

/// A planned response waiting for its gate (named lanes only: the others keep running).
#[derive(Debug)]
struct Gated {
    pub(super) lane: String,
    pub(super) index: usize,
    pub(super) response_id: String,
    pub(super) plan: Plan,
    pub(super) generate: bool,
}

#[derive(Debug)]
pub(super) struct WsState {
    pub(super) connection: u64,
    pub(super) lanes: HashMap<String, LaneState>,
    /// Every lane's steps, in time order (FIFO among equal times).
    schedule: VecDeque<(Instant, Step)>,
    gated: tokio::sync::mpsc::UnboundedSender<Gated>,
}

impl WsState {
    pub(super) fn lane(&mut self, lane: &str) -> &mut LaneState {
        self.lanes.entry(lane.to_owned()).or_default()
    }

    fn schedule(&mut self, at: Instant, step: Step) {
        let position = self.schedule.partition_point(|(t, _)| *t <= at);
        self.schedule.insert(position, (at, step));
    }

    /// The cached response `previous_response_id` names, whichever lane holds it (naming
    /// another lane's response forks that conversation onto the requesting lane).
    pub(super) fn cached(&self, body: &Value) -> Option<Conversation> {
        let id = body.get("previous_response_id").and_then(Value::as_str)?;
        self.lanes
            .values()
            .filter_map(|l| l.cache.as_ref())
            .find(|c| c.response_id == id)
            .cloned()
    }
}

pub(super) type Ws = WebSocketStream<TcpStream>;

/// Whether the connection should go on after a step.
pub(super) enum Flow {
    Continue,
    Stop,
}

/// Wait for `at`, returning at once when it is already due. (`sleep_until` rounds up to the
/// timer's next millisecond tick, which would add up to a millisecond of fake latency to a
/// zero-latency script.)
pub(super) async fn until(at: Instant) {
    if at > Instant::now() {
        tokio::time::sleep_until(at).await;
    }
}

pub(super) async fn serve_ws(shared: &Shared, mut ws: Ws, connection: u64) {
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

pub(super) async fn send_now(ws: &mut Ws, event: &Value) -> Flow {
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
pub(super) async fn start_ws_request(
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
