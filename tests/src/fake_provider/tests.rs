use super::*;
use tokio::io::AsyncReadExt;
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
    let output =
        json!({"type": "custom_tool_call_output", "call_id": call["call_id"], "output": "Done!"});
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
