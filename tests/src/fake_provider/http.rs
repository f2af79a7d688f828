//! HTTP/1.1: request heads, upgrade routing, and the HTTP + SSE transport.

use super::*;

#[derive(Debug, Clone)]
pub(super) struct Head {
    pub(super) method: String,
    pub(super) path: String,
    version_1_0: bool,
    pub(super) headers: Vec<(String, String)>,
}

pub(super) fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
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

pub(super) fn is_upgrade(headers: &[(String, String)]) -> bool {
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

pub(super) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
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
pub(super) async fn serve_connection(shared: Arc<Shared>, mut stream: TcpStream, connection: u64) {
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
