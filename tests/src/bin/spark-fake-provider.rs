//! `spark-fake-provider`: the fake model as a standalone process, for benchmarks that drive
//! other tools (`bench/peers/`).
//!
//! Serves, on loopback, the fake Responses API (WebSocket mode and HTTP + SSE on one port,
//! [`spark_tests::fake_provider`]) and a fake chat-completions API on a second port
//! ([`spark_tests::fake_chat`]). Both answer with the same edit: the `apply_patch` text read from
//! `--patch`, and its aider SEARCH/REPLACE form for chat completions.
//!
//! Prints one JSON line with the URLs, then reads commands from stdin, one per line, answering
//! each with one JSON line:
//! - `arm`: queue one patch turn unless one is already queued (with `--armed`, see below);
//! - `call [NAMESPACE/]NAME {JSON}`: queue one turn calling the function tool NAME (of the
//!   `namespace` tool NAMESPACE, as Codex offers an MCP server's tools) with those arguments;
//! - `stats`: request counts per transport, WebSocket connections, refusals;
//! - `last`: the body of the last Responses request (for debugging a peer's requests).
//!
//! Exits when stdin closes or on SIGTERM/SIGINT.
//!
//! A second Responses port, the *compat front*, relays to the same fake after dropping the request
//! fields that codex 0.169 sends but the strict fake refuses as `unknown_parameter` (`stream` in
//! a WebSocket `response.create`, `client_metadata` in an HTTP body); the real service accepts
//! both. It counts what it dropped (`stats`). spark never needs it.
//!
//! By default every generating Responses request gets the patch: right for spark, which makes one
//! model call per edit. Agents that send the tool's output back for a second model call (codex)
//! would then get the patch again, forever; with `--armed` the default answer is a short message
//! and the harness queues one patch turn (`arm`) before each run.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use spark_tests::fake_chat::{ChatReply, FakeChat, search_replace_from_patch};
use spark_tests::fake_provider::{FakeProvider, RequestOutcome, Script, Transport, Turn};
use spark_tests::http1;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

const USAGE: &str =
    "usage: spark-fake-provider --patch FILE [--ttft-ms N] [--tokens-per-sec F] [--armed]";

#[derive(Debug)]
struct Args {
    patch: String,
    ttft: Duration,
    tokens_per_sec: f64,
    armed: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut patch = None;
    let mut ttft = Duration::ZERO;
    let mut tokens_per_sec = 0.0;
    let mut armed = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--patch" => {
                let path = value("--patch")?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("reading the patch {path}: {e}"))?;
                patch = Some(text);
            }
            "--ttft-ms" => {
                let ms: f64 = value("--ttft-ms")?
                    .parse()
                    .map_err(|e| format!("--ttft-ms: {e}"))?;
                ttft =
                    Duration::try_from_secs_f64(ms / 1e3).map_err(|e| format!("--ttft-ms: {e}"))?;
            }
            "--tokens-per-sec" => {
                tokens_per_sec = value("--tokens-per-sec")?
                    .parse()
                    .map_err(|e| format!("--tokens-per-sec: {e}"))?;
            }
            "--armed" => armed = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let patch = patch.ok_or_else(|| format!("--patch is required\n{USAGE}"))?;
    Ok(Args {
        patch,
        ttft,
        tokens_per_sec,
        armed,
    })
}

// ---------------------------------------------------------------------------------------------
// Compat front
// ---------------------------------------------------------------------------------------------

/// Request fields the compat front drops, per transport, and how often it did.
#[derive(Debug, Default)]
struct Dropped {
    ws_stream: AtomicUsize,
    http_client_metadata: AtomicUsize,
}

/// Remove `field` from a JSON object body; `None` when there was nothing to remove.
fn without(body: &[u8], field: &str) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    value.as_object_mut()?.remove(field)?;
    serde_json::to_vec(&value).ok()
}

async fn compat_front(upstream: SocketAddr, dropped: Arc<Dropped>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(relay(stream, upstream, Arc::clone(&dropped)));
        }
    });
    Ok(addr)
}

/// Look at the request head without consuming it, then relay as WebSocket or HTTP.
async fn relay(client: TcpStream, upstream: SocketAddr, dropped: Arc<Dropped>) {
    let mut peeked = vec![0u8; http1::MAX_HEAD_BYTES + 1];
    let head = loop {
        let Ok(n) = client.peek(&mut peeked).await else {
            return;
        };
        if n == 0 {
            return;
        }
        match http1::parse_request(&peeked[..n]) {
            Ok(Some((head, _))) => break head,
            Ok(None) => {}
            Err(_) => return,
        }
        // Part of a head: wait for the rest (peek returns at once while data is pending).
        tokio::time::sleep(Duration::from_micros(100)).await;
    };
    if head.is_websocket_upgrade() {
        relay_ws(client, upstream, dropped).await;
    } else {
        relay_http(client, upstream, dropped).await;
    }
}

/// The upgrade request's path and `Authorization` header, captured during the handshake.
type Upgrade = Arc<std::sync::Mutex<Option<(String, Option<String>)>>>;

// tungstenite's handshake `Callback` fixes the closure's error type.
#[allow(clippy::result_large_err)]
async fn relay_ws(client: TcpStream, upstream: SocketAddr, dropped: Arc<Dropped>) {
    let seen: Upgrade = Arc::default();
    let record = Arc::clone(&seen);
    let callback = move |request: &Request, response: Response| {
        let auth = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Ok(mut slot) = record.lock() {
            *slot = Some((request.uri().to_string(), auth));
        }
        Ok(response)
    };
    let Ok(mut client) = tokio_tungstenite::accept_hdr_async(client, callback).await else {
        return;
    };
    let Some((path, auth)) = seen.lock().ok().and_then(|mut s| s.take()) else {
        return;
    };
    let Ok(mut request) = format!("ws://{upstream}{path}").into_client_request() else {
        return;
    };
    if let Some(auth) = auth.and_then(|a| a.parse().ok()) {
        request.headers_mut().insert("authorization", auth);
    }
    let Ok((server, _)) = tokio_tungstenite::connect_async_with_config(request, None, true).await
    else {
        let _ = client.close(None).await;
        return;
    };
    let (mut server_tx, mut server_rx) = server.split();
    let (mut client_tx, mut client_rx) = client.split();
    let up = async {
        while let Some(Ok(message)) = client_rx.next().await {
            let message = match message {
                Message::Text(text) => match without(text.as_bytes(), "stream") {
                    Some(body) => {
                        dropped.ws_stream.fetch_add(1, Ordering::Relaxed);
                        Message::text(String::from_utf8_lossy(&body).into_owned())
                    }
                    None => Message::Text(text),
                },
                other => other,
            };
            if server_tx.send(message).await.is_err() {
                break;
            }
        }
        let _ = server_tx.close().await;
    };
    let down = async {
        while let Some(Ok(message)) = server_rx.next().await {
            if client_tx.send(message).await.is_err() {
                break;
            }
        }
        let _ = client_tx.close().await;
    };
    // Either side ending ends the relay (an abrupt drop upstream becomes one downstream).
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// HTTP/1.1 requests with Content-Length bodies are rewritten; responses pass through as bytes.
async fn relay_http(client: TcpStream, upstream: SocketAddr, dropped: Arc<Dropped>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
    });
    let mut buf = Vec::new();
    loop {
        let Ok(mut head) = http1::read_request(&mut client_rx, &mut buf).await else {
            break;
        };
        if head.header("transfer-encoding").is_some() {
            // Not a body this front rewrites: pass the rest through untouched.
            let mut out = head.encode();
            out.append(&mut buf);
            if server_tx.write_all(&out).await.is_err() {
                break;
            }
            let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
            break;
        }
        let Ok(body) = http1::read_body(&mut client_rx, &mut buf, &head, usize::MAX).await else {
            break;
        };
        let body = match without(&body, "client_metadata") {
            Some(lean) => {
                dropped.http_client_metadata.fetch_add(1, Ordering::Relaxed);
                head.headers.retain(|(name, _)| name != "content-length");
                head.headers
                    .push(("content-length".to_owned(), lean.len().to_string()));
                lean
            }
            None => body,
        };
        let mut out = head.encode();
        out.extend_from_slice(&body);
        if server_tx.write_all(&out).await.is_err() {
            break;
        }
    }
    let _ = server_tx.shutdown().await;
    let _ = down.await;
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

fn stats(provider: &FakeProvider, chat: &FakeChat, dropped: &Dropped) -> serde_json::Value {
    let requests = provider.requests();
    let count = |t: Transport| requests.iter().filter(|r| r.transport == t).count();
    let refused: Vec<_> = requests
        .iter()
        .filter_map(|r| match &r.outcome {
            RequestOutcome::Rejected { status, code } => {
                Some(json!({"status": status, "code": code}))
            }
            _ => None,
        })
        .collect();
    json!({
        "responses_requests": requests.len(),
        "ws_requests": count(Transport::WebSocket),
        "http_requests": count(Transport::Http),
        "ws_connections": provider.connections_opened(),
        "prewarms": requests.iter().filter(|r| r.is_prewarm()).count(),
        "refused": refused,
        "queued_turns": provider.remaining_turns(),
        "chat_requests": chat.requests(),
        "compat_dropped": {
            "ws_stream": dropped.ws_stream.load(Ordering::Relaxed),
            "http_client_metadata": dropped.http_client_metadata.load(Ordering::Relaxed),
        },
    })
}

async fn say(out: &mut tokio::io::Stdout, line: &serde_json::Value) -> std::io::Result<()> {
    out.write_all(format!("{line}\n").as_bytes()).await?;
    out.flush().await
}

async fn serve(args: Args) -> Result<(), String> {
    let search_replace = search_replace_from_patch(&args.patch)
        .map_err(|e| format!("the patch has no SEARCH/REPLACE form: {e}"))?;
    let pace = |t: Turn| {
        t.with_ttft(args.ttft)
            .with_tokens_per_sec(args.tokens_per_sec)
    };
    let patch_turn = pace(Turn::apply_patch(args.patch.clone()));
    let script = if args.armed {
        Script::new().default_turn(pace(Turn::text("Done.")))
    } else {
        Script::new().default_turn(patch_turn.clone())
    };
    let provider = FakeProvider::start(script).await;
    let chat = FakeChat::start(ChatReply {
        tool_call: None,
        error_status: None,
        content: search_replace,
        ttft: args.ttft,
        tokens_per_sec: (args.tokens_per_sec > 0.0).then_some(args.tokens_per_sec),
    })
    .await
    .map_err(|e| format!("binding the chat endpoint: {e}"))?;

    let dropped = Arc::new(Dropped::default());
    let compat = compat_front(provider.addr(), Arc::clone(&dropped))
        .await
        .map_err(|e| format!("binding the compat front: {e}"))?;

    let mut out = tokio::io::stdout();
    let addr = provider.addr();
    let hello = json!({
        "ws_url": provider.ws_url(),
        "http_url": provider.http_url(),
        "responses_base_url": format!("http://{addr}/v1"),
        "compat_base_url": format!("http://{compat}/v1"),
        "chat_base_url": chat.base_url(),
        "armed": args.armed,
        "pid": std::process::id(),
    });
    say(&mut out, &hello).await.map_err(|e| e.to_string())?;

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            line = lines.next_line() => match line {
                Ok(Some(line)) => line,
                // stdin closed (or unreadable): the harness is gone.
                Ok(None) | Err(_) => return Ok(()),
            },
        };
        let answer = match line.trim() {
            "arm" => {
                if provider.remaining_turns() == 0 {
                    provider.push_turn(patch_turn.clone());
                }
                json!({"armed": provider.remaining_turns()})
            }
            "stats" => stats(&provider, &chat, &dropped),
            // `call [NAMESPACE/]NAME ARGUMENTS`: queue one turn calling the function tool NAME
            // (in a `namespace` tool, as Codex offers an MCP server's tools) with ARGUMENTS, a
            // JSON object on one line.
            call if call.starts_with("call ") => {
                let rest = call["call ".len()..].trim_start();
                let (name, arguments) = rest.split_once(' ').unwrap_or((rest, "{}"));
                match serde_json::from_str::<Value>(arguments) {
                    Ok(v) if v.is_object() && !name.is_empty() => {
                        let turn = match name.split_once('/') {
                            Some((ns, name)) => {
                                Turn::namespaced_function_call(ns, name, arguments.trim())
                            }
                            None => Turn::function_call(name, arguments.trim()),
                        };
                        provider.push_turn(pace(turn));
                        json!({"queued": provider.remaining_turns()})
                    }
                    _ => json!({"error": "usage: call [NAMESPACE/]NAME {JSON arguments}"}),
                }
            }
            "last" => json!({"last": provider.requests().last().map(|r| r.json.clone())}),
            "" => continue,
            other => json!({"error": format!("unknown command {other:?}: arm, call, stats, last")}),
        };
        say(&mut out, &answer).await.map_err(|e| e.to_string())?;
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("spark-fake-provider: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("spark-fake-provider: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("spark-fake-provider: {message}");
            ExitCode::from(2)
        }
    }
}
