//! HTTP/1.1: request heads, upgrade routing, and the HTTP + SSE transport.

use super::*;
use crate::http1::{self, HttpError};

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

pub(super) async fn write_error(
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
fn check_auth(head: &Head) -> Result<(), ApiError> {
    let token = head
        .header("authorization")
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
pub(super) async fn serve_connection(shared: Arc<Shared>, mut stream: TcpStream, connection: u64) {
    let mut buf = Vec::new();
    loop {
        let head = match http1::read_request(&mut stream, &mut buf).await {
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
        let route = head.path();
        if route != RESPONSES_PATH {
            shared.record_head(connection, &head, 404);
            let error = ApiError {
                status: 404,
                ..ApiError::invalid(
                    None,
                    format!("Invalid URL ({} {}).", head.method, head.target),
                    None,
                )
            };
            let _ = write_error(&mut stream, &error, "", true).await;
            return;
        }
        if let Err(error) = check_auth(&head)
            && !shared.settings().keyless
        {
            shared.record_head(connection, &head, 401);
            let _ = write_error(&mut stream, &error, "", true).await;
            return;
        }
        if head.method == "GET" && head.is_websocket_upgrade() {
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
        if head
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
            && stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return;
        }
        let body = match http1::read_body(&mut stream, &mut buf, &head, MAX_BODY_BYTES).await {
            Ok(body) => body,
            Err(HttpError::BodyTooLarge(_)) => {
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
        let close = head.wants_close();
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
