//! A fake OpenAI chat-completions endpoint, for benchmarking tools that speak only that API
//! (aider) against the same canned edit the fake Responses provider serves.
//!
//! - [`FakeChat`]: `POST /v1/chat/completions` (and `/chat/completions`) on `127.0.0.1:<port>`,
//!   HTTP/1.1 keep-alive; streaming (`"stream": true`: SSE `chat.completion.chunk`s, then
//!   `data: [DONE]`) and non-streaming (one `chat.completion`). `GET /v1/models` lists the model
//!   asked for last. Every request gets the same [`ChatReply`], paced like a model.
//! - [`search_replace_from_patch`]: the aider SEARCH/REPLACE form of a one-file `apply_patch`
//!   edit, so both fakes answer with the same edit.
//!
//! Deliberately loose: no auth check, no body validation beyond "is JSON". It exists to time
//! other tools, not to test spark.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::http1;

/// Characters per streamed chunk, as in the Responses fake.
const DELTA_CHARS: usize = crate::fake_provider::DEFAULT_DELTA_CHARS;
/// Request bodies larger than this end the connection; far above what aider sends.
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// What a chat completion answers, and how fast.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatReply {
    pub content: String,
    /// Answer with this function call instead of text, as a chat model calling a tool does:
    /// streamed `tool_calls` deltas carrying the arguments a few characters at a time, then
    /// `finish_reason: "tool_calls"`.
    pub tool_call: Option<ChatToolCall>,
    /// Fail the request with this HTTP status (a server error) instead of answering.
    pub error_status: Option<u16>,
    /// Delay from the request to the first content chunk.
    pub ttft: Duration,
    /// Output pacing; `None` sends every chunk at once (a zero-latency model).
    pub tokens_per_sec: Option<f64>,
}

/// A function call a [`ChatReply`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatToolCall {
    pub name: String,
    /// The arguments, a JSON text (e.g. `{"input": "*** Begin Patch…"}`). Empty with
    /// [`ChatToolCall::text`]: then they are made from the request's tool schema.
    pub arguments: String,
    /// The call's one string argument, put under the name the request's schema for the function
    /// gives its first (required) parameter, as a model following the schema would.
    pub text: Option<String>,
}

impl ChatReply {
    /// Plain text at once.
    pub fn text(content: impl Into<String>) -> ChatReply {
        ChatReply {
            content: content.into(),
            tool_call: None,
            error_status: None,
            ttft: Duration::ZERO,
            tokens_per_sec: None,
        }
    }

    /// A call of function `name` with `arguments` (JSON text).
    pub fn tool_call(name: impl Into<String>, arguments: impl Into<String>) -> ChatReply {
        ChatReply {
            tool_call: Some(ChatToolCall {
                name: name.into(),
                arguments: arguments.into(),
                text: None,
            }),
            ..ChatReply::text("")
        }
    }

    /// A call of function `name` whose one string argument is `text`, named as the request's
    /// tool schema names it.
    pub fn tool_call_text(name: impl Into<String>, text: impl Into<String>) -> ChatReply {
        ChatReply {
            tool_call: Some(ChatToolCall {
                name: name.into(),
                arguments: String::new(),
                text: Some(text.into()),
            }),
            ..ChatReply::text("")
        }
    }
}

impl ChatReply {
    /// An HTTP error with `status`, as an overloaded or broken backend answers.
    pub fn error(status: u16) -> ChatReply {
        ChatReply {
            error_status: Some(status),
            ..ChatReply::text("")
        }
    }
}

/// A running fake chat-completions server. Dropping it stops accepting connections.
#[derive(Debug)]
pub struct FakeChat {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    bodies: Arc<std::sync::Mutex<Vec<Value>>>,
    accept: JoinHandle<()>,
}

impl FakeChat {
    /// Bind `127.0.0.1:0` and answer every completion with `reply`.
    pub async fn start(reply: ChatReply) -> std::io::Result<FakeChat> {
        FakeChat::start_queue(Vec::new(), reply).await
    }

    /// Answer the first completions with `replies`, in order, and the rest with `default`.
    pub async fn start_queue(
        replies: Vec<ChatReply>,
        default: ChatReply,
    ) -> std::io::Result<FakeChat> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let replies = Arc::new(Replies {
            queue: std::sync::Mutex::new(replies.into()),
            default,
            bodies: Arc::clone(&bodies),
        });
        let accept = tokio::spawn(accept_loop(listener, replies, Arc::clone(&requests)));
        Ok(FakeChat {
            addr,
            requests,
            bodies,
            accept,
        })
    }

    /// The completion requests' bodies so far.
    pub fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT/v1`: what OpenAI clients take as their API base.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Chat completions answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// What the server answers: queued replies first.
#[derive(Debug)]
struct Replies {
    queue: std::sync::Mutex<std::collections::VecDeque<ChatReply>>,
    default: ChatReply,
    bodies: Arc<std::sync::Mutex<Vec<Value>>>,
}

impl Replies {
    fn next(&self, body: &Value) -> ChatReply {
        if let Ok(mut bodies) = self.bodies.lock() {
            bodies.push(body.clone());
        }
        self.queue
            .lock()
            .ok()
            .and_then(|mut q| q.pop_front())
            .unwrap_or_else(|| self.default.clone())
    }
}

impl Drop for FakeChat {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Why a patch has no SEARCH/REPLACE form here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchShapeError {
    #[error("the patch must update exactly one file with `*** Update File:`")]
    NotOneUpdatedFile,
    #[error("unexpected patch line {0:?}")]
    UnexpectedLine(String),
    #[error("the patch changes nothing")]
    Empty,
}

/// The aider "diff" edit format of a one-file `apply_patch` update: one SEARCH/REPLACE block per
/// hunk, SEARCH = context and removed lines, REPLACE = context and added lines.
pub fn search_replace_from_patch(patch: &str) -> Result<String, PatchShapeError> {
    let mut path = None;
    let mut hunks: Vec<(Vec<&str>, Vec<&str>)> = Vec::new();
    for line in patch.lines() {
        if line == "*** Begin Patch" || line == "*** End Patch" || line == "*** End of File" {
            continue;
        }
        if let Some(p) = line.strip_prefix("*** Update File: ") {
            if path.replace(p.trim()).is_some() {
                return Err(PatchShapeError::NotOneUpdatedFile);
            }
            hunks.push((Vec::new(), Vec::new()));
            continue;
        }
        if line.starts_with("***") || path.is_none() {
            return Err(PatchShapeError::UnexpectedLine(line.to_owned()));
        }
        if line.starts_with("@@") {
            // A new hunk unless the current one is still empty (the first `@@`).
            if hunks
                .last()
                .is_some_and(|(s, r)| !s.is_empty() || !r.is_empty())
            {
                hunks.push((Vec::new(), Vec::new()));
            }
            continue;
        }
        let Some((search, replace)) = hunks.last_mut() else {
            return Err(PatchShapeError::NotOneUpdatedFile);
        };
        if let Some(rest) = line.strip_prefix('-') {
            search.push(rest);
        } else if let Some(rest) = line.strip_prefix('+') {
            replace.push(rest);
        } else if let Some(rest) = line.strip_prefix(' ') {
            search.push(rest);
            replace.push(rest);
        } else if line.is_empty() {
            // An empty context line, as some writers emit it.
            search.push("");
            replace.push("");
        } else {
            return Err(PatchShapeError::UnexpectedLine(line.to_owned()));
        }
    }
    let Some(path) = path else {
        return Err(PatchShapeError::NotOneUpdatedFile);
    };
    if hunks.iter().all(|(s, r)| s == r) {
        return Err(PatchShapeError::Empty);
    }
    let mut out = String::new();
    for (search, replace) in hunks.iter().filter(|(s, r)| s != r) {
        out.push_str(path);
        out.push_str("\n```\n<<<<<<< SEARCH\n");
        for l in search {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str("=======\n");
        for l in replace {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str(">>>>>>> REPLACE\n```\n\n");
    }
    Ok(out)
}

async fn accept_loop(listener: TcpListener, reply: Arc<Replies>, requests: Arc<AtomicUsize>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(
            stream,
            Arc::clone(&reply),
            Arc::clone(&requests),
        ));
    }
}

struct Request {
    method: String,
    /// The request target as sent, for error messages.
    target: String,
    /// The target's path, for routing.
    route: String,
    close: bool,
    body: Vec<u8>,
}

/// Read one request (Content-Length or chunked body); `None` ends the connection.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let head = http1::read_request(stream, buf).await.ok()?;
    let body = http1::read_body(stream, buf, &head, MAX_REQUEST_BYTES)
        .await
        .ok()?;
    Some(Request {
        route: head.path(),
        close: head.wants_close(),
        method: head.method,
        target: head.target,
        body,
    })
}

async fn serve_connection(mut stream: TcpStream, reply: Arc<Replies>, requests: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    let mut last_model = String::from("fake-model");
    while let Some(request) = read_request(&mut stream, &mut buf).await {
        let ok = match (request.method.as_str(), request.route.as_str()) {
            ("POST", "/v1/chat/completions" | "/chat/completions") => {
                let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
                    let error = json!({"error": {"message": "We could not parse the JSON body of your request.", "type": "invalid_request_error", "code": null}});
                    let _ = write_json(&mut stream, 400, &error, true).await;
                    return;
                };
                if let Some(model) = body.get("model").and_then(Value::as_str) {
                    last_model = model.to_owned();
                }
                requests.fetch_add(1, Ordering::SeqCst);
                let reply = reply.next(&body);
                answer(&mut stream, &reply, &body, request.close).await
            }
            ("GET", "/v1/models" | "/models") => {
                let list = json!({"object": "list", "data": [
                    {"id": last_model, "object": "model", "created": 0, "owned_by": "spark-tests"}
                ]});
                write_json(&mut stream, 200, &list, request.close).await
            }
            _ => {
                let error = json!({"error": {"message": format!("Invalid URL ({} {}).", request.method, request.target), "type": "invalid_request_error", "code": null}});
                write_json(&mut stream, 404, &error, request.close).await
            }
        };
        if !ok || request.close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Error",
    }
}

async fn write_json(stream: &mut TcpStream, status: u16, body: &Value, close: bool) -> bool {
    let body = body.to_string();
    let connection = if close { "close" } else { "keep-alive" };
    let response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
        reason(status),
        body.len()
    );
    stream.write_all(response.as_bytes()).await.is_ok()
}

fn split_chars(text: &str, n: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for (count, (i, _)) in text.char_indices().enumerate() {
        if count > 0 && count % n == 0 {
            pieces.push(&text[start..i]);
            start = i;
        }
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

/// The name of the first required (else first) parameter of function `name` in the request's
/// `tools`, `input` when there is none.
fn argument_name(body: &Value, name: &str) -> String {
    let params = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name))
        .and_then(|t| t.pointer("/function/parameters"));
    params
        .and_then(|p| p.pointer("/required/0").and_then(Value::as_str))
        .or_else(|| {
            params
                .and_then(|p| p.get("properties"))
                .and_then(Value::as_object)
                .and_then(|o| o.keys().next().map(String::as_str))
        })
        .unwrap_or("input")
        .to_owned()
}

/// Answer one completion request; returns whether the connection can carry another.
async fn answer(stream: &mut TcpStream, reply: &ChatReply, body: &Value, close: bool) -> bool {
    let start = Instant::now();
    let mut reply = std::borrow::Cow::Borrowed(reply);
    if let Some(text) = reply.tool_call.as_ref().and_then(|c| c.text.clone()) {
        let name = reply
            .tool_call
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let key = argument_name(body, &name);
        if let Some(call) = reply.to_mut().tool_call.as_mut() {
            call.arguments = json!({ key: text }).to_string();
        }
    }
    let reply = reply.as_ref();
    if let Some(status) = reply.error_status {
        let error = json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "code": null}});
        return write_json(stream, status, &error, close).await;
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("fake-model");
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let id = format!("chatcmpl-{created}{}", start.elapsed().subsec_nanos());
    let call_id = format!("call_{created}{}", start.elapsed().subsec_nanos());
    let streamed = reply
        .tool_call
        .as_ref()
        .map_or(reply.content.as_str(), |c| c.arguments.as_str());
    let pieces = split_chars(streamed, DELTA_CHARS);
    let finish_reason = if reply.tool_call.is_some() {
        "tool_calls"
    } else {
        "stop"
    };
    let prompt_tokens = body
        .get("messages")
        .map_or(0, |m| m.to_string().len().div_ceil(DELTA_CHARS));
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": pieces.len(),
        "total_tokens": prompt_tokens + pieces.len(),
    });
    let at = |k: usize| match reply.tokens_per_sec {
        Some(rate) => reply.ttft + Duration::from_secs_f64(k as f64 / rate),
        None => reply.ttft,
    };

    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        tokio::time::sleep_until(start + at(pieces.len())).await;
        let message = match &reply.tool_call {
            Some(call) => json!({"role": "assistant", "content": null, "refusal": null,
                "tool_calls": [{"id": call_id, "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments}}]}),
            None => json!({"role": "assistant", "content": reply.content, "refusal": null}),
        };
        let completion = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "message": message,
                         "logprobs": null, "finish_reason": finish_reason}],
            "usage": usage,
        });
        return write_json(stream, 200, &completion, close).await;
    }

    let connection = if close { "close" } else { "keep-alive" };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: {connection}\r\n\r\n"
    );
    if stream.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    };
    let first = match &reply.tool_call {
        Some(call) => json!({"role": "assistant", "content": null, "tool_calls": [
            {"index": 0, "id": call_id, "type": "function",
             "function": {"name": call.name, "arguments": ""}}]}),
        None => json!({"role": "assistant", "content": ""}),
    };
    let mut events = vec![(Duration::ZERO, chunk(first, Value::Null))];
    for (k, piece) in pieces.iter().enumerate() {
        let delta = match &reply.tool_call {
            Some(_) => json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
            None => json!({"content": piece}),
        };
        events.push((at(k), chunk(delta, Value::Null)));
    }
    let done_at = at(pieces.len().saturating_sub(1));
    events.push((done_at, chunk(json!({}), json!(finish_reason))));
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    if include_usage {
        events.push((
            done_at,
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": null, "choices": [], "usage": usage}),
        ));
    }
    let mut i = 0;
    while i < events.len() {
        tokio::time::sleep_until(start + events[i].0).await;
        // Everything due now goes out in one write.
        let now = Instant::now();
        let mut out = String::new();
        while i < events.len() && start + events[i].0 <= now {
            let data = format!("data: {}\n\n", events[i].1);
            out.push_str(&format!("{:x}\r\n{data}\r\n", data.len()));
            i += 1;
        }
        if stream.write_all(out.as_bytes()).await.is_err() {
            return false;
        }
    }
    let done = "data: [DONE]\n\n";
    let tail = format!("{:x}\r\n{done}\r\n0\r\n\r\n", done.len());
    stream.write_all(tail.as_bytes()).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const PATCH: &str = "*** Begin Patch\n*** Update File: stats.py\n@@ def mean(values):\n     \"\"\"Average.\"\"\"\n-    return sum(values) / len(values)\n+    return sum(values) / len(values) if values else 0.0\n*** End Patch\n";

    #[test]
    fn search_replace_carries_context_and_both_sides() {
        let block = search_replace_from_patch(PATCH).expect("one-file patch");
        assert_eq!(
            block,
            "stats.py\n```\n<<<<<<< SEARCH\n    \"\"\"Average.\"\"\"\n    return sum(values) / len(values)\n=======\n    \"\"\"Average.\"\"\"\n    return sum(values) / len(values) if values else 0.0\n>>>>>>> REPLACE\n```\n\n"
        );
    }

    #[test]
    fn search_replace_refuses_other_shapes() {
        let two = "*** Begin Patch\n*** Update File: a\n-x\n+y\n*** Update File: b\n-x\n+y\n*** End Patch\n";
        assert_eq!(
            search_replace_from_patch(two),
            Err(PatchShapeError::NotOneUpdatedFile)
        );
        let add = "*** Begin Patch\n*** Add File: a\n+x\n*** End Patch\n";
        assert!(matches!(
            search_replace_from_patch(add),
            Err(PatchShapeError::UnexpectedLine(_))
        ));
    }

    async fn roundtrip(chat: &FakeChat, body: &Value) -> String {
        let mut stream = TcpStream::connect(chat.addr).await.expect("connect");
        let body = body.to_string();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .expect("in time")
            .expect("read");
        String::from_utf8(raw).expect("UTF-8")
    }

    #[tokio::test]
    async fn streams_chunks_that_add_up_to_the_reply() {
        let content = "path\n<<<<<<< SEARCH\nä\n=======\nb\n>>>>>>> REPLACE\n".to_owned();
        let chat = FakeChat::start(ChatReply {
            tool_call: None,
            error_status: None,
            content: content.clone(),
            ttft: Duration::from_millis(1),
            tokens_per_sec: Some(10_000.0),
        })
        .await
        .expect("start");
        let raw = roundtrip(
            &chat,
            &json!({"model": "m", "stream": true, "messages": [], "stream_options": {"include_usage": true}}),
        )
        .await;
        let mut text = String::new();
        let mut saw_done = false;
        let mut saw_usage = false;
        for line in raw.lines() {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                saw_done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).expect("chunk JSON");
            assert_eq!(v["object"], "chat.completion.chunk");
            saw_usage |= v.get("usage").is_some();
            if let Some(c) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
            {
                text.push_str(c);
            }
        }
        assert_eq!(text, content);
        assert!(saw_done && saw_usage);
        assert_eq!(chat.requests(), 1);
    }

    #[tokio::test]
    async fn non_streaming_answers_one_completion() {
        let chat = FakeChat::start(ChatReply {
            tool_call: None,
            error_status: None,
            content: "hello".into(),
            ttft: Duration::ZERO,
            tokens_per_sec: None,
        })
        .await
        .expect("start");
        let raw = roundtrip(&chat, &json!({"model": "m", "messages": []})).await;
        let (_, body) = raw.split_once("\r\n\r\n").expect("head");
        let v: Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(v["choices"][0]["message"]["content"], "hello");
        assert_eq!(v["model"], "m");
    }
}
