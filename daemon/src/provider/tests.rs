//! Session tests against tiny in-test providers on `127.0.0.1:0`: a tokio-tungstenite server
//! replaying canned, real-shaped Responses events (scripted per connection and request), and
//! a raw HTTP server that refuses the upgrade with 426 and streams SSE for `POST`s. Every
//! received request frame is recorded so the tests assert on what went over the wire.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::backoff::Backoff;
use super::session::{
    SessionConfig, SessionHandle, TurnDone, TurnEvent, TurnEvents, TurnFailure, TurnRequest, spawn,
};
use super::transport::TransportKind;
use super::wire::{InputItem, Tool};

const WAIT: Duration = Duration::from_secs(10);

/// A request the fake provider received.
#[derive(Debug, Clone)]
struct Frame {
    conn: usize,
    auth: Option<String>,
    body: Value,
}

/// What the fake provider does in answer to one request.
enum Action {
    Send(Value),
    /// Keep sending this event every few ms until the client is gone (an abandoned response
    /// that keeps streaming).
    SpamUntilClosed(Value),
    Close,
}

/// `(connection index, request index on that connection, request) -> actions`.
type Script = Arc<dyn Fn(usize, usize, &Value) -> Vec<Action> + Send + Sync>;

struct FakeWs {
    url: String,
    frames: mpsc::UnboundedReceiver<Frame>,
}

impl FakeWs {
    async fn start(script: Script) -> FakeWs {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/responses", listener.local_addr().unwrap());
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut conn = 0;
            while let Ok((stream, _)) = listener.accept().await {
                stream.set_nodelay(true).unwrap();
                tokio::spawn(serve_ws(stream, conn, script.clone(), tx.clone()));
                conn += 1;
            }
        });
        FakeWs { url, frames }
    }

    async fn frame(&mut self) -> Frame {
        tokio::time::timeout(WAIT, self.frames.recv())
            .await
            .expect("a request frame in time")
            .expect("server alive")
    }
}

#[allow(clippy::result_large_err, reason = "tungstenite's callback signature")]
async fn serve_ws(
    stream: TcpStream,
    conn: usize,
    script: Script,
    frames: mpsc::UnboundedSender<Frame>,
) {
    let mut auth = None;
    let callback = |req: &Request, resp: Response| {
        auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let mut n = 0;
    while let Some(Ok(message)) = source.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let body: Value = serde_json::from_str(text.as_str()).unwrap();
        let _ = frames.send(Frame {
            conn,
            auth: auth.clone(),
            body: body.clone(),
        });
        for action in script(conn, n, &body) {
            match action {
                Action::Send(event) => {
                    if sink.send(Message::text(event.to_string())).await.is_err() {
                        return;
                    }
                }
                Action::SpamUntilClosed(event) => {
                    for _ in 0..2000 {
                        if sink.send(Message::text(event.to_string())).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    return;
                }
                Action::Close => {
                    let _ = sink.close().await;
                    return;
                }
            }
        }
        n += 1;
    }
}

// Canned events, shaped like OpenAI's Responses streaming events.

fn response_obj(id: &str, status: &str, output: Value) -> Value {
    json!({"id": id, "object": "response", "created_at": 1_767_000_000, "status": status,
           "model": "gpt-5.3-codex-spark", "output": output, "previous_response_id": null,
           "store": false, "tools": [], "usage": if status == "completed" {
               json!({"input_tokens": 1200, "input_tokens_details": {"cached_tokens": 1024},
                      "output_tokens": 42, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 1242})
           } else { Value::Null }})
}

fn created(id: &str) -> Value {
    json!({"type": "response.created", "sequence_number": 0,
           "response": response_obj(id, "in_progress", json!([]))})
}

fn prewarm_events(id: &str) -> Vec<Action> {
    vec![
        Action::Send(created(id)),
        Action::Send(json!({"type": "response.completed", "sequence_number": 1,
            "response": response_obj(id, "completed", json!([]))})),
    ]
}

fn text_delta(item: &str, delta: &str) -> Value {
    json!({"type": "response.output_text.delta", "sequence_number": 3, "item_id": item,
           "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []})
}

fn text_turn(id: &str, text: &str) -> Vec<Action> {
    let item = format!("msg_{id}");
    let message = json!({"type": "message", "id": item, "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]});
    vec![
        Action::Send(created(id)),
        Action::Send(json!({"type": "response.in_progress", "sequence_number": 1,
            "response": response_obj(id, "in_progress", json!([]))})),
        Action::Send(
            json!({"type": "response.output_item.added", "sequence_number": 2,
            "output_index": 0, "item": {"type": "message", "id": item, "status": "in_progress",
            "role": "assistant", "content": []}}),
        ),
        Action::Send(text_delta(&item, text)),
        Action::Send(
            json!({"type": "response.output_item.done", "sequence_number": 4,
            "output_index": 0, "item": message}),
        ),
        Action::Send(json!({"type": "response.completed", "sequence_number": 5,
            "response": response_obj(id, "completed", json!([message]))})),
    ]
}

const PATCH: &str =
    "*** Begin Patch\n*** Update File: src/lib.rs\n@@\n-fn a() {}\n+fn b() {}\n*** End Patch\n";

fn patch_turn_events(id: &str, call_id: &str) -> Vec<Value> {
    let item = format!("ctc_{id}");
    let done = json!({"type": "custom_tool_call", "id": item, "status": "completed",
        "call_id": call_id, "name": "apply_patch", "input": PATCH});
    let mut events = vec![
        created(id),
        json!({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
            "item": {"type": "custom_tool_call", "id": item, "status": "in_progress",
            "call_id": call_id, "name": "apply_patch", "input": ""}}),
    ];
    for piece in PATCH.split_inclusive('\n') {
        events.push(json!({"type": "response.custom_tool_call_input.delta",
            "sequence_number": 2, "item_id": item, "output_index": 0, "delta": piece}));
    }
    events.push(
        json!({"type": "response.custom_tool_call_input.done", "sequence_number": 8,
        "item_id": item, "output_index": 0, "input": PATCH}),
    );
    events.push(
        json!({"type": "response.output_item.done", "sequence_number": 9,
        "output_index": 0, "item": done}),
    );
    events.push(json!({"type": "response.completed", "sequence_number": 10,
        "response": response_obj(id, "completed", json!([done]))}));
    events
}

fn error_event(code: &str, message: &str) -> Value {
    json!({"type": "error", "status": 400, "error": {"type": "invalid_request_error",
        "code": code, "message": message, "param": "previous_response_id"}})
}

// Client side helpers.

fn session(url: &str) -> (SessionHandle, CancellationToken, TaskTracker) {
    let mut config = SessionConfig::new(url, Some(Arc::from("sk-test")), "gpt-5.3-codex-spark");
    config.instructions = "You edit code.".to_owned();
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let handle = spawn(config, &tracker, shutdown.clone()).unwrap();
    (handle, shutdown, tracker)
}

/// Read a turn's events up to and including the terminal one.
async fn drain(events: &mut TurnEvents) -> Vec<TurnEvent> {
    let mut all = Vec::new();
    loop {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("turn events in time")
            .expect("a terminal event before the channel closes");
        let terminal = matches!(event, TurnEvent::Done(_) | TurnEvent::Failed(_));
        all.push(event);
        if terminal {
            return all;
        }
    }
}

fn done(events: &[TurnEvent]) -> &TurnDone {
    match events.last() {
        Some(TurnEvent::Done(done)) => done,
        other => panic!("expected Done, got {other:?}"),
    }
}

fn texts(events: &[TurnEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            TurnEvent::TextDelta { delta, .. } => Some(delta.clone()),
            _ => None,
        })
        .collect()
}

fn context() -> Vec<InputItem> {
    vec![InputItem::developer_text(
        "# repo outline\nsrc/lib.rs: fn a()",
    )]
}

fn turn(text: &str, history: &[InputItem]) -> TurnRequest {
    let ask = InputItem::user_text(text);
    let mut full_context = context();
    full_context.extend_from_slice(history);
    full_context.push(ask.clone());
    TurnRequest {
        new_input: vec![ask],
        full_context,
        tool_choice: None,
    }
}

fn input_types(frame: &Frame) -> Vec<String> {
    frame.body["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn prewarm_then_two_chained_turns_on_one_connection() {
    let script: Script = Arc::new(|_conn, n, _body| match n {
        0 => prewarm_events("resp_warm"),
        1 => patch_turn_events("resp_1", "call_1")
            .into_iter()
            .map(Action::Send)
            .collect(),
        _ => text_turn("resp_2", "Renamed."),
    });
    let mut server = FakeWs::start(script).await;
    let (handle, _shutdown, _tracker) = session(&server.url);

    let warm = handle
        .prewarm(
            "You edit code.".into(),
            vec![Tool::apply_patch()],
            context(),
        )
        .await
        .unwrap();
    assert_eq!(warm.as_deref(), Some("resp_warm"));
    let f = server.frame().await;
    assert_eq!(f.auth.as_deref(), Some("Bearer sk-test"));
    assert_eq!(f.body["type"], "response.create");
    assert_eq!(f.body["generate"], false);
    assert_eq!(f.body["store"], false);
    assert_eq!(f.body["input"], serde_json::to_value(context()).unwrap());
    assert_eq!(f.body["tools"][0]["format"]["syntax"], "lark");
    assert!(f.body.get("previous_response_id").is_none());

    // Turn 1 chains from the prewarm and sends only the new message.
    let mut events = handle.turn(turn("rename a to b", &[])).await.unwrap();
    let first = drain(&mut events).await;
    let f1 = server.frame().await;
    assert_eq!(f1.body["previous_response_id"], "resp_warm");
    assert_eq!(input_types(&f1), ["message"]);
    assert!(f1.body.get("generate").is_none());
    let streamed: String = first
        .iter()
        .filter_map(|e| match e {
            TurnEvent::ToolInputDelta { delta, .. } => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(streamed, PATCH);
    let d1 = done(&first);
    assert!(d1.chained);
    assert_eq!(d1.response_id, "resp_1");
    assert_eq!(d1.tool_calls().count(), 1);
    assert_eq!(
        d1.usage
            .as_ref()
            .unwrap()
            .input_tokens_details
            .cached_tokens,
        1024
    );
    assert_eq!(d1.timings.attempts, 1);
    assert!(d1.timings.first_event.is_some() && d1.timings.first_delta.is_some());
    assert!(d1.timings.first_delta <= Some(d1.timings.completed));
    assert_eq!(
        d1.timings.bytes_sent,
        serde_json::to_string(&f1.body).unwrap().len()
    );

    // The patch was applied; its output goes at the head of the next turn.
    handle
        .set_pending_tool_output("call_1", "Applied.")
        .await
        .unwrap();
    assert!(handle.set_pending_tool_output("call_x", "?").await.is_err());
    let mut events = handle.turn(turn("thanks", &[])).await.unwrap();
    let second = drain(&mut events).await;
    let f2 = server.frame().await;
    assert_eq!(f2.conn, 0, "same connection");
    assert_eq!(f2.body["previous_response_id"], "resp_1");
    assert_eq!(
        f2.body["input"],
        json!([{"type": "custom_tool_call_output", "call_id": "call_1", "output": "Applied."},
               {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "thanks"}]}])
    );
    // Instructions and tools are resent byte for byte.
    let prompt = |b: &Value| (b["instructions"].to_string(), b["tools"].to_string());
    assert_eq!(prompt(&f1.body), prompt(&f2.body));
    assert_eq!(texts(&second), ["Renamed."]);
    assert_eq!(done(&second).text(), "Renamed.");

    let status = handle.status().await.unwrap();
    assert!(status.connected && status.chained && !status.fell_back);
    assert_eq!(status.transport, TransportKind::WebSocket);
    assert_eq!(status.reconnects, 0);
    assert!(status.last_rtt.is_some(), "a ping measured the RTT");
}

#[tokio::test]
async fn previous_response_not_found_resends_unchained_once() {
    let script: Script = Arc::new(|_conn, n, _body| match n {
        0 => text_turn("resp_1", "one"),
        1 => vec![Action::Send(error_event(
            "previous_response_not_found",
            "Previous response with id 'resp_1' not found.",
        ))],
        _ => text_turn("resp_3", "three"),
    });
    let mut server = FakeWs::start(script).await;
    let (handle, _shutdown, _tracker) = session(&server.url);

    let mut events = handle.turn(turn("one", &[])).await.unwrap();
    let first = drain(&mut events).await;
    let f0 = server.frame().await;
    assert!(
        f0.body.get("previous_response_id").is_none(),
        "no chain yet"
    );
    assert!(!done(&first).chained);

    let history: Vec<InputItem> = std::iter::once(InputItem::user_text("one"))
        .chain(done(&first).output.iter().filter_map(|i| i.to_input()))
        .collect();
    let request = turn("two", &history);
    let full = serde_json::to_value(&request.full_context).unwrap();
    let mut events = handle.turn(request).await.unwrap();
    let second = drain(&mut events).await;
    let chained = server.frame().await;
    assert_eq!(chained.body["previous_response_id"], "resp_1");
    assert_eq!(input_types(&chained), ["message"]);
    let resent = server.frame().await;
    assert_eq!(resent.conn, 0);
    assert!(resent.body.get("previous_response_id").is_none());
    assert_eq!(resent.body["input"], full);
    assert_eq!(texts(&second), ["three"], "the caller saw only the answer");
    let d = done(&second);
    assert!(!d.chained);
    assert_eq!(d.timings.attempts, 2);
}

#[tokio::test]
async fn cancel_mid_stream_then_next_turn_gets_only_its_own_events() {
    let script: Script = Arc::new(|conn, n, _body| match (conn, n) {
        (0, 0) => prewarm_events("resp_warm"),
        (0, _) => vec![
            Action::Send(created("resp_a")),
            Action::Send(text_delta("msg_a", "A1")),
            Action::SpamUntilClosed(text_delta("msg_a", "A-late")),
        ],
        (_, 0) => prewarm_events("resp_warm2"),
        _ => text_turn("resp_b", "B"),
    });
    let mut server = FakeWs::start(script).await;
    let (handle, _shutdown, _tracker) = session(&server.url);
    handle
        .prewarm(
            "You edit code.".into(),
            vec![Tool::apply_patch()],
            context(),
        )
        .await
        .unwrap();
    let _ = server.frame().await;

    let mut a = handle.turn(turn("long answer", &[])).await.unwrap();
    loop {
        let event = tokio::time::timeout(WAIT, a.recv()).await.unwrap().unwrap();
        if matches!(&event, TurnEvent::TextDelta { delta, .. } if delta == "A1") {
            break;
        }
    }
    let outcome = handle.cancel().await.unwrap();
    assert!(outcome.in_flight);
    // The abandoned turn ends with Cancelled (possibly after a few deltas already queued).
    let rest = drain(&mut a).await;
    assert!(matches!(
        rest.last(),
        Some(TurnEvent::Failed(TurnFailure::Cancelled))
    ));

    let mut b = handle.turn(turn("short answer", &[])).await.unwrap();
    let events = drain(&mut b).await;
    assert_eq!(texts(&events), ["B"]);
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, TurnEvent::Started { response_id } if response_id != "resp_b"))
    );
    let d = done(&events);
    assert_eq!(d.response_id, "resp_b");

    // On the wire: turn A on connection 0, then a background re-prewarm and turn B on a new
    // connection, B chained from the new prewarm.
    let fa = server.frame().await;
    assert_eq!(fa.conn, 0);
    let rewarm = server.frame().await;
    assert_eq!((rewarm.conn, &rewarm.body["generate"]), (1, &json!(false)));
    let fb = server.frame().await;
    assert_eq!(fb.conn, 1);
    assert_eq!(fb.body["previous_response_id"], "resp_warm2");
    assert!(d.chained);
    let status = handle.status().await.unwrap();
    assert_eq!(status.reconnects, 1);
}

#[tokio::test]
async fn connection_limit_reached_reconnects_and_resends_unchained() {
    let script: Script = Arc::new(|conn, n, _body| match (conn, n) {
        (0, 0) => text_turn("resp_1", "one"),
        (0, _) => vec![
            Action::Send(error_event(
                "websocket_connection_limit_reached",
                "Responses websocket connection limit reached (60 minutes).",
            )),
            Action::Close,
        ],
        _ => text_turn("resp_2", "two"),
    });
    let mut server = FakeWs::start(script).await;
    let (handle, _shutdown, _tracker) = session(&server.url);
    let mut events = handle.turn(turn("one", &[])).await.unwrap();
    drain(&mut events).await;
    let mut events = handle.turn(turn("two", &[])).await.unwrap();
    let second = drain(&mut events).await;
    assert_eq!(texts(&second), ["two"]);
    let _ = server.frame().await;
    let limited = server.frame().await;
    assert_eq!(limited.body["previous_response_id"], "resp_1");
    let resent = server.frame().await;
    assert_eq!(resent.conn, 1);
    assert!(resent.body.get("previous_response_id").is_none());
}

/// A raw HTTP server: `GET` upgrade attempts get 426; `POST`s are recorded and answered with
/// a chunked SSE stream whose chunk boundaries cut through events.
async fn start_http_only(events: Vec<Value>) -> (String, mpsc::UnboundedReceiver<(String, Value)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/responses", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            let events = events.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = stream.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                if head.starts_with("GET") {
                    let _ = stream
                        .write_all(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                }
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap();
                while buf.len() < head_end + len {
                    let n = stream.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap();
                let _ = tx.send((head, body));
                let sse: String = events
                    .iter()
                    .map(|e| format!("event: {}\ndata: {}\n\n", e["type"].as_str().unwrap(), e))
                    .collect();
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await
                    .unwrap();
                for piece in sse.as_bytes().chunks(37) {
                    let framed =
                        [format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat();
                    stream.write_all(&framed).await.unwrap();
                    stream.flush().await.unwrap();
                }
                let _ = stream.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    (url, rx)
}

#[tokio::test]
async fn refused_upgrade_falls_back_to_http_sse() {
    let (url, mut posts) = start_http_only(patch_turn_events("resp_h", "call_h")).await;
    let (handle, _shutdown, _tracker) = session(&url);
    let warm = handle
        .prewarm(
            "You edit code.".into(),
            vec![Tool::apply_patch()],
            context(),
        )
        .await
        .unwrap();
    assert_eq!(warm, None, "nothing to prewarm over HTTP");

    let request = turn("rename a to b", &[]);
    let full = serde_json::to_value(&request.full_context).unwrap();
    let mut events = handle.turn(request).await.unwrap();
    let all = drain(&mut events).await;
    let d = done(&all);
    assert_eq!(d.transport, TransportKind::HttpSse);
    assert_eq!(d.response_id, "resp_h");
    assert!(!d.chained);
    let streamed: String = all
        .iter()
        .filter_map(|e| match e {
            TurnEvent::ToolInputDelta { delta, .. } => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(streamed, PATCH);

    let (head, body) = tokio::time::timeout(WAIT, posts.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        head.starts_with("POST /v1/responses HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains("Authorization: Bearer sk-test\r\n"));
    assert_eq!(body["stream"], true);
    assert_eq!(body["store"], false);
    assert!(body.get("type").is_none() && body.get("previous_response_id").is_none());
    assert_eq!(
        body["input"], full,
        "store:false over HTTP: always the full context"
    );

    // The next turn carries the tool output after its call in the full context.
    handle
        .set_pending_tool_output("call_h", "Applied.")
        .await
        .unwrap();
    let history: Vec<InputItem> = std::iter::once(InputItem::user_text("rename a to b"))
        .chain(d.output.iter().filter_map(|i| i.to_input()))
        .collect();
    let mut events = handle.turn(turn("thanks", &history)).await.unwrap();
    drain(&mut events).await;
    let (_, body) = tokio::time::timeout(WAIT, posts.recv())
        .await
        .unwrap()
        .unwrap();
    let types: Vec<&str> = body["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "message",
            "message",
            "custom_tool_call",
            "custom_tool_call_output",
            "message"
        ]
    );
    assert_eq!(body["input"][3]["call_id"], "call_h");

    let status = handle.status().await.unwrap();
    assert!(status.fell_back);
    assert_eq!(status.transport, TransportKind::HttpSse);
    assert!(status.url.starts_with("http://127.0.0.1:"));
}

#[tokio::test]
async fn dropping_the_receiver_cancels_the_turn() {
    let script: Script = Arc::new(|conn, _n, _body| match conn {
        0 => vec![
            Action::Send(created("resp_a")),
            Action::Send(text_delta("msg_a", "A1")),
            Action::SpamUntilClosed(text_delta("msg_a", "A-late")),
        ],
        _ => text_turn("resp_b", "B"),
    });
    let mut server = FakeWs::start(script).await;
    let (handle, _shutdown, _tracker) = session(&server.url);
    let mut a = handle.turn(turn("long answer", &[])).await.unwrap();
    let _started = tokio::time::timeout(WAIT, a.recv()).await.unwrap().unwrap();
    drop(a);
    let mut b = handle.turn(turn("short answer", &[])).await.unwrap();
    let events = drain(&mut b).await;
    assert_eq!(texts(&events), ["B"]);
    assert_eq!(server.frame().await.conn, 0);
    assert_eq!(server.frame().await.conn, 1);
}

#[tokio::test]
async fn unreachable_provider_fails_fast_and_shutdown_stops_the_task() {
    // Nothing listens on this port (bound, then released).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (handle, shutdown, tracker) = session(&format!("ws://127.0.0.1:{port}/v1/responses"));
    let mut events = handle.turn(turn("x", &[])).await.unwrap();
    let all = drain(&mut events).await;
    assert!(matches!(
        all.last(),
        Some(TurnEvent::Failed(TurnFailure::Transport(_)))
    ));
    assert!(handle.status().await.unwrap().last_error.is_some());
    shutdown.cancel();
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
    assert!(handle.status().await.is_err());
}

#[tokio::test]
async fn a_provider_that_drops_every_connection_unanswered_is_not_stormed() {
    // A gateway that accepts the upgrade, starts a response and drops the connection before
    // it completes. (One that closes before any event is a WebSocket failure: the session
    // falls back to HTTP + SSE; see the `storm` and `gateway` suites.)
    let script: Script =
        Arc::new(|_conn, _n, _body| vec![Action::Send(created("resp_x")), Action::Close]);
    let mut server = FakeWs::start(script).await;
    // One policy for the provider, shared by five sessions (five watched repositories); short
    // delays keep the test fast, the shape is the daemon's.
    let backoff = Arc::new(Backoff::new(
        Duration::from_millis(20),
        Duration::from_millis(200),
        3,
    ));
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let handles: Vec<SessionHandle> = (0..5)
        .map(|_| {
            let mut config = SessionConfig::new(
                &server.url,
                Some(Arc::from("sk-test")),
                "gpt-5.3-codex-spark",
            );
            config.backoff = Some(backoff.clone());
            spawn(config, &tracker, shutdown.clone()).unwrap()
        })
        .collect();
    for handle in &handles {
        let warm = handle
            .prewarm(
                "You edit code.".into(),
                vec![Tool::apply_patch()],
                context(),
            )
            .await;
        assert!(warm.is_err(), "the gateway never answers");
    }
    // Wait (bounded) until every session has given up in the background.
    let deadline = tokio::time::Instant::now() + WAIT;
    let last = loop {
        let mut statuses = Vec::new();
        for handle in &handles {
            statuses.push(handle.status().await.unwrap());
        }
        let settled = statuses
            .iter()
            .all(|s| !s.connected && !s.connecting && s.retry_in.is_none());
        if settled {
            break statuses;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still reconnecting: {statuses:?}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let status = &last[0].backoff;
    assert!(status.paused && status.failures >= 3, "{status:?}");
    assert!(last[0].last_error.is_some());
    // Five explicit prewarms, and no more than a few background attempts besides.
    let mut attempts = 0;
    while server.frames.try_recv().is_ok() {
        attempts += 1;
    }
    eprintln!("{attempts} connection attempts");
    assert!(
        (5..=8).contains(&attempts),
        "{attempts} connection attempts"
    );
    shutdown.cancel();
}
