//! A minimal HTTP/1.1 client for the SSE fallback: one `POST` per request over a fresh
//! TCP (and, for `https`, rustls) connection with `Connection: close`, the response read
//! incrementally (chunked, `Content-Length` or until EOF) and parsed into [`ServerEvent`]s.
//!
//! Runs as its own task (spawned by the transport), so a slow or abandoned response never
//! blocks the session; aborting the task closes the connection. A non-2xx answer becomes the
//! same `error` event a WebSocket would deliver, so the session handles both alike.

use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::sse::{ChunkedDecoder, SseParser};
use super::transport::{ConnectTimeouts, Endpoint, Scheme, TransportError, tls_config};
use super::wire::{ServerEvent, error_from_http, parse_event};

/// Largest response head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest error body kept (enough for any JSON error object).
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// Socket read size.
const READ_BYTES: usize = 16 * 1024;

type EventTx = mpsc::UnboundedSender<Result<ServerEvent, TransportError>>;

/// Post `body` to `endpoint` and forward every event until a terminal one, the end of the
/// body, or the receiver going away. Errors are forwarded as the last item.
pub(crate) async fn stream_request(
    endpoint: Endpoint,
    api_key: Option<Arc<str>>,
    body: String,
    timeouts: ConnectTimeouts,
    tx: EventTx,
) {
    if let Err(e) = run(&endpoint, api_key.as_deref(), &body, timeouts, &tx).await {
        let _ = tx.send(Err(e));
    }
}

async fn run(
    endpoint: &Endpoint,
    api_key: Option<&str>,
    body: &str,
    timeouts: ConnectTimeouts,
    tx: &EventTx,
) -> Result<(), TransportError> {
    let addr = format!("{}:{}", endpoint.host(), endpoint.port());
    let tcp = tokio::time::timeout(
        timeouts.connect,
        TcpStream::connect((endpoint.host(), endpoint.port())),
    )
    .await
    .map_err(|_| TransportError::Timeout {
        what: "HTTP connect",
        after: timeouts.connect,
    })?
    .map_err(|source| TransportError::Connect {
        addr: addr.clone(),
        source,
    })?;
    tcp.set_nodelay(true)?;
    match endpoint.scheme() {
        Scheme::Https => {
            let name = ServerName::try_from(endpoint.host().to_owned())
                .map_err(|e| TransportError::Tls(format!("bad server name: {e}")))?;
            let connector = tokio_rustls::TlsConnector::from(tls_config()?);
            let tls = tokio::time::timeout(timeouts.connect, connector.connect(name, tcp))
                .await
                .map_err(|_| TransportError::Timeout {
                    what: "TLS handshake",
                    after: timeouts.connect,
                })?
                .map_err(|e| TransportError::Tls(e.to_string()))?;
            exchange(tls, endpoint, api_key, body, tx).await
        }
        Scheme::Http => exchange(tcp, endpoint, api_key, body, tx).await,
        Scheme::Ws | Scheme::Wss => Err(TransportError::Http(format!(
            "{} is not an HTTP URL",
            endpoint.url()
        ))),
    }
}

/// How the response body is delimited.
#[derive(Debug)]
enum Framing {
    Chunked(ChunkedDecoder),
    Length(u64),
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
struct Head {
    status: u16,
    framing: Framing,
}

fn parse_head(head: &[u8]) -> Result<Head, TransportError> {
    let text = std::str::from_utf8(head)
        .map_err(|_| TransportError::Http("response head is not UTF-8".to_owned()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(TransportError::Http(format!(
            "bad status line {status_line:?}"
        )));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| TransportError::Http(format!("bad status line {status_line:?}")))?;
    let mut framing = Framing::UntilClose;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            framing = Framing::Chunked(ChunkedDecoder::default());
        } else if name.eq_ignore_ascii_case("content-length")
            && !matches!(framing, Framing::Chunked(_))
        {
            let n = value
                .parse::<u64>()
                .map_err(|_| TransportError::Http(format!("bad Content-Length {value:?}")))?;
            framing = Framing::Length(n);
        }
    }
    Ok(Head { status, framing })
}

/// Decode raw body bytes into `out`; `true` once the body is complete.
fn decode_body(
    framing: &mut Framing,
    raw: &[u8],
    out: &mut Vec<u8>,
) -> Result<bool, TransportError> {
    match framing {
        Framing::Chunked(d) => d
            .feed(raw, out)
            .map_err(|e| TransportError::Http(e.to_string())),
        Framing::Length(left) => {
            let n = usize::try_from(*left).unwrap_or(usize::MAX).min(raw.len());
            out.extend_from_slice(&raw[..n]);
            *left -= n as u64;
            Ok(*left == 0)
        }
        Framing::UntilClose => {
            out.extend_from_slice(raw);
            Ok(false)
        }
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    endpoint: &Endpoint,
    api_key: Option<&str>,
    body: &str,
    tx: &EventTx,
) -> Result<(), TransportError> {
    let mut request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Accept: text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n",
        endpoint.path(),
        endpoint.host_header(),
        body.len()
    );
    if let Some(key) = api_key.filter(|k| !k.is_empty()) {
        if key.contains(['\r', '\n']) {
            return Err(TransportError::BadApiKey);
        }
        request.push_str("Authorization: Bearer ");
        request.push_str(key);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    // Head and body in one write: one segment for small requests.
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    io.write_all(&bytes).await?;
    io.flush().await?;

    // Response head.
    let mut buf = Vec::with_capacity(READ_BYTES);
    let mut chunk = vec![0u8; READ_BYTES];
    let (head, rest) = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = parse_head(&buf[..end])?;
            break (head, buf.split_off(end + 4));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(TransportError::Http("response head too large".to_owned()));
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(TransportError::Http(
                "connection closed before the response head".to_owned(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let Head {
        status,
        mut framing,
    } = head;

    if !(200..300).contains(&status) {
        let mut body = Vec::new();
        let mut done = decode_body(&mut framing, &rest, &mut body)?;
        while !done && body.len() < MAX_ERROR_BODY_BYTES {
            let n = io.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            done = decode_body(&mut framing, &chunk[..n], &mut body)?;
        }
        let _ = tx.send(Ok(error_from_http(status, &body)));
        return Ok(());
    }

    let mut sse = SseParser::default();
    let mut decoded = Vec::with_capacity(READ_BYTES);
    let mut events = Vec::new();
    let mut raw = rest;
    loop {
        decoded.clear();
        let body_done = decode_body(&mut framing, &raw, &mut decoded)?;
        sse.feed(&decoded, &mut events)
            .map_err(|e| TransportError::Http(e.to_string()))?;
        for event in events.drain(..) {
            if event.data == "[DONE]" {
                return Ok(());
            }
            let parsed = match parse_event(&event.data) {
                Ok(parsed) => parsed,
                Err(e) => {
                    tracing::warn!(error = %e, "unparsable SSE event ignored");
                    continue;
                }
            };
            let terminal = parsed.is_terminal();
            if tx.send(Ok(parsed)).is_err() || terminal {
                return Ok(());
            }
        }
        if body_done {
            return Ok(());
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        raw.clear();
        raw.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_response_heads() {
        let h = parse_head(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked",
        )
        .unwrap();
        assert_eq!(h.status, 200);
        assert!(matches!(h.framing, Framing::Chunked(_)));
        let h = parse_head(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12").unwrap();
        assert!(matches!((h.status, h.framing), (400, Framing::Length(12))));
        let h = parse_head(b"HTTP/1.0 200 OK").unwrap();
        assert!(matches!(h.framing, Framing::UntilClose));
        assert!(parse_head(b"SSH-2.0-OpenSSH").is_err());
    }
}
