//! Fuzz harnesses for what the provider sends: single events (`parse_event`), the SSE and
//! chunked-transfer decoders of the HTTP fallback, and whole event sequences played by a
//! loopback WebSocket provider into a real session. Smoke case counts by default;
//! `SPARK_FUZZ_CASES` and `SPARK_FUZZ_SECS` scale them (see `crate::fuzz_tests`).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::session::{SessionConfig, TurnEvent, TurnRequest, spawn};
use super::sse::{ChunkedDecoder, DecodeError, SseEvent, SseParser};
use super::wire::{InputItem, OutputItem, ServerEvent, parse_event};
use crate::fuzz_tests::{fail, fuzz};

const WAIT: Duration = Duration::from_secs(10);

fn response_obj(id: &str, status: &str, output: Value) -> Value {
    json!({"id": id, "object": "response", "status": status, "model": "m", "output": output,
           "usage": {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12}})
}

fn message(item: &str, text: &str) -> Value {
    json!({"type": "message", "id": item, "status": "completed", "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn terminal(kind: &str, id: &str, text: &str) -> Value {
    let status = kind.trim_start_matches("response.");
    let mut response = response_obj(id, status, json!([message(&format!("msg_{id}"), text)]));
    if kind == "response.incomplete" {
        response["incomplete_details"] = json!({"reason": "max_output_tokens"});
    }
    if kind == "response.failed" {
        response["error"] = json!({"code": "server_error", "message": "boom"});
    }
    json!({"type": kind, "sequence_number": 9, "response": response})
}

fn created(id: &str) -> Value {
    json!({"type": "response.created", "sequence_number": 0,
           "response": response_obj(id, "in_progress", json!([]))})
}

/// Real-shaped events, and the same events with fields dropped, retyped or mangled.
fn event_json() -> impl Strategy<Value = Value> {
    let id = prop_oneof![Just("resp_a".to_owned()), "[a-z_0-9]{0,8}"];
    let base = prop_oneof![
        id.clone().prop_map(|id| created(&id)),
        (
            prop::sample::select(vec![
                "response.completed",
                "response.failed",
                "response.incomplete"
            ]),
            id.clone(),
            any::<String>()
        )
            .prop_map(|(kind, id, text)| terminal(kind, &id, &text)),
        any::<String>().prop_map(|d| json!({"type": "response.output_text.delta",
            "item_id": "msg_a", "output_index": 0, "delta": d})),
        any::<String>().prop_map(|d| json!({"type": "response.custom_tool_call_input.delta",
            "item_id": "ctc_a", "delta": d})),
        any::<String>().prop_map(|d| json!({"type": "response.function_call_arguments.delta",
            "item_id": "fc_a", "delta": d})),
        any::<String>().prop_map(|t| json!({"type": "response.output_item.done",
            "output_index": 0, "item": message("msg_a", &t)})),
        any::<String>().prop_map(|i| json!({"type": "response.output_item.added",
            "output_index": 0, "item": {"type": "custom_tool_call", "id": "ctc_a",
            "call_id": "call_1", "name": "apply_patch", "input": i}})),
        Just(json!({"type": "error", "status": 400, "error": {"code":
            "previous_response_not_found", "message": "gone"}})),
        Just(json!({"type": "error", "code": "rate_limit_exceeded"})),
        "[a-z._]{0,24}".prop_map(|t| json!({"type": t})),
    ];
    let junk = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        Just(json!([])),
        Just(json!({})),
        Just(json!(-1)),
        Just(json!(4_294_967_296u64)),
    ];
    (
        base,
        prop::collection::vec(
            (
                prop::sample::select(vec![
                    "type",
                    "response",
                    "id",
                    "output",
                    "item",
                    "delta",
                    "item_id",
                    "output_index",
                    "error",
                    "status",
                    "code",
                    "message",
                    "usage",
                ]),
                prop::option::of(junk),
            ),
            0..3,
        ),
    )
        .prop_map(|(mut event, changes)| {
            for (field, value) in changes {
                // Mangle the field at the top level or inside `response`, whichever has it.
                let target = if event.get(field).is_none() && event.get("response").is_some() {
                    &mut event["response"]
                } else {
                    &mut event
                };
                if let Some(object) = target.as_object_mut() {
                    match value {
                        Some(v) => object.insert(field.to_owned(), v),
                        None => object.remove(field),
                    };
                }
            }
            event
        })
}

#[test]
fn fuzz_parse_event_takes_any_text_without_panicking() {
    fuzz(
        "provider parse_event",
        512,
        prop_oneof![
            3 => event_json().prop_map(|v| v.to_string()),
            1 => any::<String>(),
            1 => event_json().prop_flat_map(|v| {
                let text = v.to_string();
                let len = text.len();
                (Just(text), 0..=len)
            })
            .prop_map(|(text, cut)| text.get(..cut).unwrap_or("").to_owned()),
        ],
        |text| {
            if let Ok(event) = parse_event(&text) {
                // A terminal event always names its kind and, with an id, that id.
                let _ = event.kind();
                if let Some(id) = event.response_id() {
                    prop_assert!(!id.is_empty());
                }
                if let ServerEvent::Error { message, .. } = &event {
                    prop_assert!(!message.is_empty());
                }
            }
            Ok(())
        },
    );
}

fn sse_all(parts: &[&[u8]]) -> (Vec<SseEvent>, bool) {
    let mut parser = SseParser::default();
    let mut out = Vec::new();
    for part in parts {
        if parser.feed(part, &mut out).is_err() {
            return (out, false);
        }
    }
    (out, true)
}

#[test]
fn fuzz_sse_events_do_not_depend_on_how_reads_split_the_stream() {
    let line = prop_oneof![
        Just(b"data: x".to_vec()),
        Just(b"data:".to_vec()),
        Just(b"event: response.created".to_vec()),
        Just(b": comment".to_vec()),
        Just(b"id: 7".to_vec()),
        Just(Vec::new()),
        Just("data: é✓".as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..12),
    ];
    let eol = prop::sample::select(vec![&b"\n"[..], b"\r\n", b"\r"]);
    fuzz(
        "provider sse",
        512,
        (
            prop::collection::vec((line, eol), 0..16),
            prop::collection::vec(any::<usize>(), 0..8),
        ),
        |(lines, cuts)| {
            let stream: Vec<u8> = lines
                .iter()
                .flat_map(|(l, e)| l.iter().chain(e.iter()).copied())
                .collect();
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
            points.sort_unstable();
            let mut parts = Vec::new();
            let mut from = 0;
            for p in points.into_iter().chain([stream.len()]) {
                parts.push(&stream[from..p]);
                from = p;
            }
            prop_assert_eq!(sse_all(&parts), sse_all(&[&stream]));
            Ok(())
        },
    );
}

#[test]
fn fuzz_chunked_transfer_round_trips_and_rejects_garbage_cleanly() {
    fuzz(
        "provider chunked",
        512,
        (
            prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..6),
            prop::collection::vec(any::<usize>(), 0..8),
            prop::collection::vec(any::<u8>(), 0..64),
        ),
        |(chunks, cuts, garbage)| {
            let mut body = Vec::new();
            for c in &chunks {
                body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\n");
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
            points.sort_unstable();
            let mut decoder = ChunkedDecoder::default();
            let mut out = Vec::new();
            let mut done = false;
            let mut from = 0;
            for p in points.into_iter().chain([body.len()]) {
                done = decoder
                    .feed(&body[from..p], &mut out)
                    .map_err(|e| fail(e.to_string()))?;
                from = p;
            }
            prop_assert!(done);
            prop_assert_eq!(out, chunks.concat());
            // Garbage: an error or more waiting, and never more output than input.
            let mut decoder = ChunkedDecoder::default();
            let mut out = Vec::new();
            let _ = decoder.feed(&garbage, &mut out);
            prop_assert!(out.len() <= garbage.len());
            Ok(())
        },
    );
}

/// One step of a scripted response, after its own `response.created`.
#[derive(Debug, Clone)]
enum Step {
    /// An event of another response (a late duplicate, a stray of an abandoned one).
    Stray(Value),
    Delta(String),
    ItemDone,
    DuplicateCreated,
    Unknown(String),
    /// A text frame that is not an event.
    Malformed(String),
}

#[derive(Debug, Clone)]
enum Ending {
    Terminal(&'static str),
    Error,
    Close,
}

#[derive(Debug, Clone)]
struct Script {
    announce: bool,
    steps: Vec<Step>,
    ending: Ending,
}

const CURRENT: &str = "resp_cur";
const STRAY_TEXT: &str = "OTHER RESPONSE";

fn step() -> impl Strategy<Value = Step> {
    let other = prop::sample::select(vec!["resp_old", "resp_x"]);
    prop_oneof![
        3 => (
            prop::sample::select(vec![
                "response.created",
                "response.completed",
                "response.failed",
                "response.incomplete"
            ]),
            other
        )
            .prop_map(|(kind, id)| Step::Stray(if kind == "response.created" {
                created(id)
            } else {
                terminal(kind, id, STRAY_TEXT)
            })),
        2 => "[a-z ]{0,6}".prop_map(Step::Delta),
        1 => Just(Step::ItemDone),
        1 => Just(Step::DuplicateCreated),
        1 => "[a-z._]{0,20}".prop_map(Step::Unknown),
        1 => prop_oneof![
            any::<String>(),
            Just("{\"type\":\"response.completed\",\"response\":5}".to_owned()),
            Just("{\"type\":\"response.completed\"}".to_owned()),
            Just("{\"response\":{\"id\":\"resp_old\"}}".to_owned()),
        ]
        .prop_map(Step::Malformed),
    ]
}

fn script() -> impl Strategy<Value = Script> {
    (
        prop::bool::weighted(0.85),
        prop::collection::vec(step(), 0..10),
        prop_oneof![
            6 => prop::sample::select(vec![
                "response.completed",
                "response.incomplete",
                "response.failed"
            ])
            .prop_map(Ending::Terminal),
            1 => Just(Ending::Error),
            1 => Just(Ending::Close),
        ],
    )
        .prop_map(|(announce, mut steps, ending)| {
            if !announce {
                // Without its own `response.created` first, a session cannot tell another
                // response's terminal event from this one's: the protocol sends it first.
                steps.retain(|s| !matches!(s, Step::Stray(_) | Step::DuplicateCreated));
            }
            Script {
                announce,
                steps,
                ending,
            }
        })
}

fn frames(script: &Script) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    if script.announce {
        out.push(created(CURRENT).to_string());
    }
    for step in &script.steps {
        out.push(match step {
            Step::Stray(v) => v.to_string(),
            Step::Delta(d) => json!({"type": "response.output_text.delta", "item_id": "msg_cur",
                "output_index": 0, "delta": d})
            .to_string(),
            Step::ItemDone => json!({"type": "response.output_item.done", "output_index": 0,
                "item": message("msg_cur", "CURRENT")})
            .to_string(),
            Step::DuplicateCreated => created(CURRENT).to_string(),
            Step::Unknown(t) => json!({"type": t}).to_string(),
            Step::Malformed(text) => text.clone(),
        });
    }
    let close = match script.ending {
        Ending::Terminal(kind) => {
            out.push(terminal(kind, CURRENT, "CURRENT").to_string());
            false
        }
        Ending::Error => {
            out.push(
                json!({"type": "error", "status": 500, "error": {"code": "server_error",
                "message": "the provider broke"}})
                .to_string(),
            );
            false
        }
        Ending::Close => true,
    };
    (out, close)
}

/// A WebSocket provider on loopback: the first request gets `script`, later ones (resends after
/// a lost connection) a clean answer of their own.
async fn provider(script: Script) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/v1/responses", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut served = 0usize;
        while let Ok((stream, _)) = listener.accept().await {
            let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                continue;
            };
            let (mut sink, mut source) = ws.split();
            while let Some(Ok(message)) = source.next().await {
                if !matches!(message, Message::Text(_)) {
                    continue;
                }
                let (events, close) = if served == 0 {
                    frames(&script)
                } else {
                    let id = format!("resp_retry{served}");
                    (
                        vec![
                            created(&id).to_string(),
                            terminal("response.completed", &id, "RETRY").to_string(),
                        ],
                        false,
                    )
                };
                served += 1;
                for event in events {
                    if sink.send(Message::text(event)).await.is_err() {
                        break;
                    }
                }
                if close {
                    let _ = sink.close().await;
                    break;
                }
            }
        }
    });
    url
}

fn done_text(output: &[OutputItem]) -> String {
    output.iter().filter_map(OutputItem::text).collect()
}

async fn play(script: Script) -> Result<(), TestCaseError> {
    let url = provider(script.clone()).await;
    let mut config = SessionConfig::new(url, Some(Arc::from("sk-test")), "m");
    config.backoff_base = Duration::from_millis(1);
    config.backoff_cap = Duration::from_millis(5);
    config.connect_timeout = Duration::from_secs(5);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let handle = spawn(config, &tracker, shutdown.clone()).map_err(|e| fail(e.to_string()))?;
    let ask = InputItem::user_text("go");
    let mut events = handle
        .turn(TurnRequest {
            new_input: vec![ask.clone()],
            full_context: vec![ask],
            tool_choice: None,
        })
        .await
        .map_err(|e| fail(e.to_string()))?;
    let result = loop {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .map_err(|_| fail("the turn never ended (hang)"))?
            .ok_or_else(|| fail("the turn's channel closed without a terminal event"))?;
        match event {
            TurnEvent::Started { response_id } => {
                prop_assert!(
                    response_id == CURRENT || response_id.starts_with("resp_retry"),
                    "started as {}",
                    response_id
                );
            }
            TurnEvent::Done(done) => {
                let text = done_text(&done.output);
                prop_assert!(
                    done.response_id == CURRENT || done.response_id.starts_with("resp_retry"),
                    "ended as {}",
                    done.response_id
                );
                prop_assert!(!text.contains(STRAY_TEXT), "ended with {text:?}");
                if let Ending::Terminal(kind) = script.ending
                    && kind != "response.failed"
                {
                    prop_assert_eq!(&done.response_id, CURRENT);
                    prop_assert_eq!(text, "CURRENT");
                }
                break Ok(());
            }
            TurnEvent::Failed(_) => {
                let expected_failure = matches!(
                    script.ending,
                    Ending::Error | Ending::Close | Ending::Terminal("response.failed")
                );
                prop_assert!(expected_failure, "failed on a {:?} ending", script.ending);
                break Ok(());
            }
            TurnEvent::TextDelta { .. }
            | TurnEvent::ToolInputDelta { .. }
            | TurnEvent::FunctionArgumentsDelta { .. }
            | TurnEvent::ItemAdded(_) => {}
        }
    };
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

#[test]
fn fuzz_session_event_sequences_end_each_turn_with_its_own_response() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    fuzz("provider session events", 48, script(), |script| {
        rt.block_on(play(script))
    });
}

// ---------------------------------------------------------------------------------------------
// Bounded memory.

/// Found while bounding the SSE parser's memory: `data:` lines without the blank line that ends
/// an event were gathered without limit, so a broken or hostile peer could grow the daemon's
/// memory for as long as it kept sending. Now the event's data is capped like a line.
#[test]
fn sse_data_lines_without_an_end_are_refused_past_the_limit() {
    let line = format!("data: {}\n", "x".repeat(1 << 20));
    let mut parser = SseParser::default();
    let mut out = Vec::new();
    let mut fed = 0usize;
    let result = loop {
        if let Err(e) = parser.feed(line.as_bytes(), &mut out) {
            break e;
        }
        fed += line.len();
        assert!(fed < 40 << 20, "still gathering after {fed} bytes");
    };
    assert_eq!(result, DecodeError::EventTooLong);
    assert!(out.is_empty());
    assert!(
        (15 << 20..=17 << 20).contains(&fed),
        "refused after {fed} bytes"
    );
}

#[test]
fn a_chunk_size_of_u64_max_streams_without_allocating_ahead() {
    let mut decoder = ChunkedDecoder::default();
    let mut out = Vec::new();
    let done = decoder
        .feed(b"ffffffffffffffff\r\nabc", &mut out)
        .expect("a valid size line");
    assert!(!done);
    assert_eq!(out, b"abc");
    assert!(out.capacity() < 1024, "capacity {}", out.capacity());
    // And a size line that never ends is refused, not gathered.
    let mut decoder = ChunkedDecoder::default();
    let endless = vec![b'f'; 8192];
    assert_eq!(
        decoder.feed(&endless, &mut out),
        Err(DecodeError::LineTooLong)
    );
}

/// A provider that answers with `response.created`, then a WebSocket frame header claiming
/// `claimed` bytes and nothing more: the header alone must fail the turn, with nothing of that
/// size allocated (a claimed 2^63 bytes would abort the process if it were). Returns the
/// failure as the caller sees it.
async fn claim_huge_frame(claimed: u64) -> Result<String, TestCaseError> {
    use tokio::io::AsyncWriteExt as _;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/v1/responses", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                continue;
            };
            tokio::spawn(async move {
                while let Some(Ok(message)) = ws.next().await {
                    if matches!(message, Message::Text(_)) {
                        // Heard from: a failure now is not taken for a refused upgrade.
                        let created = created("resp_big").to_string();
                        if ws.send(Message::text(created)).await.is_err() {
                            break;
                        }
                        // FIN + text, 64-bit length, unmasked (server to client).
                        let mut header = vec![0x81, 127];
                        header.extend_from_slice(&claimed.to_be_bytes());
                        let _ = ws.get_mut().write_all(&header).await;
                        let _ = ws.get_mut().flush().await;
                    }
                }
            });
        }
    });
    let mut config = SessionConfig::new(url, Some(Arc::from("sk-test")), "m");
    config.backoff_base = Duration::from_millis(1);
    config.backoff_cap = Duration::from_millis(5);
    config.connect_timeout = Duration::from_secs(5);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let handle = spawn(config, &tracker, shutdown.clone()).map_err(|e| fail(e.to_string()))?;
    let ask = InputItem::user_text("go");
    let mut events = handle
        .turn(TurnRequest {
            new_input: vec![ask.clone()],
            full_context: vec![ask],
            tool_choice: None,
        })
        .await
        .map_err(|e| fail(e.to_string()))?;
    let outcome = loop {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .map_err(|_| fail("the turn never ended (hang)"))?
            .ok_or_else(|| fail("the turn's channel closed without a terminal event"))?;
        match event {
            TurnEvent::Failed(failure) => break Ok(failure.to_string()),
            TurnEvent::Done(_) => break Err(fail("a turn of bare frame headers succeeded")),
            _ => {}
        }
    };
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    outcome
}

#[test]
fn a_websocket_frame_claiming_a_huge_length_fails_the_turn_without_allocating_it() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for claimed in [1u64 << 30, u64::MAX >> 1] {
        let message = rt
            .block_on(claim_huge_frame(claimed))
            .unwrap_or_else(|e| panic!("claimed {claimed}: {e}"));
        assert!(
            message.contains("Message too long"),
            "claimed {claimed}: {message}"
        );
    }
}

#[test]
fn an_empty_message_or_code_falls_through_to_the_nested_error() {
    // Found by `fuzz_parse_event_takes_any_text_without_panicking`: an empty top-level
    // `message` hid the nested one, and the user was told an empty error.
    let event = parse_event(
        r#"{"error":{"code":"previous_response_not_found","message":"gone"},"message":"","code":" ","status":400,"type":"error"}"#,
    )
    .expect("parses");
    assert_eq!(
        event,
        ServerEvent::Error {
            code: Some("previous_response_not_found".to_owned()),
            message: "gone".to_owned(),
            status: Some(400),
        }
    );
    let ServerEvent::Error { message, .. } =
        parse_event(r#"{"type":"error","message":"  ","error":{"message":""}}"#).expect("parses")
    else {
        panic!("an error event");
    };
    assert_eq!(message, "error event without a message");
    let ServerEvent::Error { message, code, .. } = crate::provider::wire::error_from_http(
        429,
        br#"{"error":{"message":"","code":"","type":"rate_limited"}}"#,
    ) else {
        panic!("an error event");
    };
    assert_eq!(message, "HTTP 429 without a message");
    assert_eq!(code.as_deref(), Some("rate_limited"));
}
