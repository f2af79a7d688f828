//! A minimal HTTP/1.1 client for the SSE fallback: one `POST` per request over a fresh TCP
//! (and, for `https`, rustls) connection with `Connection: close`, the response head parsed by
//! `httparse`, the body read incrementally (chunked, `Content-Length` or until EOF) and parsed
//! into [`ServerEvent`]s.
//!
//! Runs as its own task (spawned by the transport), so a slow or abandoned response never
//! blocks the session; aborting the task closes the connection. A non-2xx answer becomes the
//! same `error` event a WebSocket would deliver, so the session handles both alike.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::sse::{ChunkedDecoder, SseParser};
use super::transport::{ConnectTimeouts, Endpoint, Scheme, TransportError, tls_config};
use super::wire::{ServerEvent, error_from_http, parse_event};

/// Largest response head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header lines accepted in a response head (a provider sends about a dozen).
const MAX_HEADERS: usize = 64;
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
            exchange(tls, endpoint, api_key, body, timeouts.stream_idle, tx).await
        }
        Scheme::Http => exchange(tcp, endpoint, api_key, body, timeouts.stream_idle, tx).await,
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

/// Parse the response head at the start of `buf`: `None` while it is incomplete, else the head
/// and its length in bytes.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, TransportError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(TransportError::Http(format!("bad response head: {e}"))),
    };
    let status = response
        .code
        .ok_or_else(|| TransportError::Http("response head without a status".to_owned()))?;
    let mut framing = Framing::UntilClose;
    for header in response.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        let value = value.trim();
        if header.name.eq_ignore_ascii_case("transfer-encoding")
            && value
                .split(',')
                .any(|coding| coding.trim().eq_ignore_ascii_case("chunked"))
        {
            framing = Framing::Chunked(ChunkedDecoder::default());
        } else if header.name.eq_ignore_ascii_case("content-length")
            && !matches!(framing, Framing::Chunked(_))
        {
            let n = value
                .parse::<u64>()
                .map_err(|_| TransportError::Http(format!("bad Content-Length {value:?}")))?;
            framing = Framing::Length(n);
        }
    }
    Ok(Some((Head { status, framing }, len)))
}

/// One read of the response, given up on after `idle` without a byte: an HTTP response cannot
/// be pinged, so a provider that stops sending would otherwise hold the ask forever.
async fn read_some<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut [u8],
    idle: Duration,
) -> Result<usize, TransportError> {
    match tokio::time::timeout(idle, io.read(buf)).await {
        Ok(read) => Ok(read?),
        Err(_) => Err(TransportError::Stalled { after: idle }),
    }
}

/// Read the response head; returns it with the body bytes read along with it.
async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    idle: Duration,
) -> Result<(Head, Vec<u8>), TransportError> {
    let mut buf = Vec::with_capacity(READ_BYTES);
    let mut chunk = vec![0u8; READ_BYTES];
    loop {
        if let Some((head, len)) = parse_head(&buf)? {
            return Ok((head, buf.split_off(len)));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(TransportError::Http(format!(
                "response head larger than {MAX_HEAD_BYTES} bytes"
            )));
        }
        let n = read_some(io, &mut chunk, idle).await?;
        if n == 0 {
            return Err(TransportError::Http(
                "connection closed before the response head".to_owned(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
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
    idle: Duration,
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

    let (head, rest) = read_head(&mut io, idle).await?;
    let mut chunk = vec![0u8; READ_BYTES];
    let Head {
        status,
        mut framing,
    } = head;

    if !(200..300).contains(&status) {
        let mut body = Vec::new();
        let mut done = decode_body(&mut framing, &rest, &mut body)?;
        while !done && body.len() < MAX_ERROR_BODY_BYTES {
            let n = read_some(&mut io, &mut chunk, idle).await?;
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
        let n = read_some(&mut io, &mut chunk, idle).await?;
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

    fn head(bytes: &[u8]) -> Head {
        let (head, len) = parse_head(bytes).unwrap().expect("complete head");
        assert_eq!(len, bytes.len());
        head
    }

    #[test]
    fn parses_response_heads() {
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(h.status, 200);
        assert!(matches!(h.framing, Framing::Chunked(_)));
        let h = head(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n");
        assert!(matches!((h.status, h.framing), (400, Framing::Length(12))));
        let h = head(b"HTTP/1.0 200 OK\r\n\r\n");
        assert!(matches!(h.framing, Framing::UntilClose));
        // Chunked wins over a Content-Length in either order.
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        );
        assert!(matches!(h.framing, Framing::Chunked(_)));
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        // Incomplete: no blank line yet.
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n")
                .unwrap()
                .is_none()
        );
    }

    /// A reader that hands out the given pieces one read at a time.
    async fn read_in_pieces(pieces: &[&[u8]]) -> Result<(Head, Vec<u8>), TransportError> {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for piece in pieces {
                server.write_all(&piece).await.unwrap();
                server.flush().await.unwrap();
                // Let the reader take this piece before the next one arrives.
                tokio::task::yield_now().await;
            }
        });
        let result = read_head(&mut client, Duration::from_secs(30)).await;
        writer.abort();
        result
    }

    #[tokio::test]
    async fn a_response_that_stops_sending_is_given_up_on_after_the_idle_time() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        server
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-")
            .await
            .unwrap();
        let idle = Duration::from_millis(50);
        let err = read_head(&mut client, idle).await.unwrap_err();
        assert!(
            matches!(err, TransportError::Stalled { after } if after == idle),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "the provider sent nothing for 50ms in the middle of a response"
        );
        drop(server);
    }

    #[tokio::test]
    async fn a_head_split_across_reads_is_read_whole_and_keeps_the_body_bytes() {
        let whole = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        for cut in 1..whole.len() {
            let (head, rest) = read_in_pieces(&[&whole[..cut], &whole[cut..]])
                .await
                .unwrap();
            assert!(matches!(
                (head.status, head.framing),
                (200, Framing::Length(5))
            ));
            // Whatever of the body came with the head is handed on, never lost.
            assert!(b"hello".starts_with(&rest), "cut {cut}: {rest:?}");
        }
    }

    #[tokio::test]
    async fn an_oversized_or_unfinished_head_is_a_clear_error() {
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-Header-{i}: a\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let e = read_in_pieces(&[&many]).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad HTTP response: bad response head: too many headers"
        );

        let mut long = b"HTTP/1.1 200 OK\r\nX-Long: ".to_vec();
        long.resize(MAX_HEAD_BYTES + 2 * READ_BYTES, b'a');
        let e = read_in_pieces(&[&long]).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("bad HTTP response: response head larger than {MAX_HEAD_BYTES} bytes")
        );

        // The peer closes without the blank line that ends a head.
        let e = read_in_pieces(&[b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"])
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad HTTP response: connection closed before the response head"
        );
    }

    #[test]
    fn line_endings_follow_httparse() {
        // A bare LF ends lines as RFC 9112 allows a recipient to accept.
        let h = head(b"HTTP/1.1 204 No Content\ncontent-length: 0\n\n");
        assert!(matches!((h.status, h.framing), (204, Framing::Length(0))));
        // A CR not followed by LF is not a line ending.
        assert!(parse_head(b"HTTP/1.1 200 OK\rContent-Length: 0\r\n\r\n").is_err());
    }
}
