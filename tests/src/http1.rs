//! HTTP/1.1 for the fake servers and proxies of this crate: heads parsed by `httparse`, request
//! targets by `http::Uri`, bodies framed by `Content-Length` or chunked. One reader, so every
//! fake is as strict as the others and none keeps a parser of its own.

use tokio::io::{AsyncRead, AsyncReadExt};

/// A head larger than this is refused, as any real front end would.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header lines in one head; spark sends about eight.
const MAX_HEADERS: usize = 64;
/// Socket read size.
const READ_BYTES: usize = 16 * 1024;

/// Why a message could not be read; each ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("body larger than {0} bytes")]
    BodyTooLarge(usize),
}

/// A request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    pub version_1_0: bool,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn has_token(&self, name: &str, token: &str) -> bool {
        has_token(&self.headers, name, token)
    }

    /// The target's path, without its query.
    pub fn path(&self) -> String {
        match self.target.parse::<http::Uri>() {
            Ok(uri) => uri.path().to_owned(),
            // Not a URI at all (`*`, garbage): no route matches it anyway.
            Err(_) => self.target.clone(),
        }
    }

    pub fn is_websocket_upgrade(&self) -> bool {
        self.has_token("upgrade", "websocket")
    }

    /// Whether the client asked for the connection to end after this request.
    pub fn wants_close(&self) -> bool {
        self.version_1_0 || self.has_token("connection", "close")
    }

    /// The head as bytes again, blank line included.
    pub fn encode(&self) -> Vec<u8> {
        let version = if self.version_1_0 { "1.0" } else { "1.1" };
        let mut out = format!("{} {} HTTP/{version}\r\n", self.method, self.target);
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// The first value of header `name` (names compare case-insensitively).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Whether any `name` header lists `token` among its comma-separated values.
pub fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The request head at the start of `buf`: `None` while it is incomplete, else the head and its
/// length in bytes.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(HttpError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    if len > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    let mut fields = Vec::with_capacity(request.headers.len());
    for h in request.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HttpError::Malformed(format!("non-UTF-8 value of {}", h.name)))?;
        fields.push((h.name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    // A complete parse always has these three; httparse only leaves them out on `Partial`.
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(HttpError::Malformed("incomplete request line".to_owned()));
    };
    let head = Head {
        method: method.to_owned(),
        target: target.to_owned(),
        version_1_0: version == 0,
        headers: fields,
    };
    Ok(Some((head, len)))
}

/// The status of the response head at the start of `buf` and the head's length; `None` while
/// it is incomplete.
pub fn parse_response(buf: &[u8]) -> Result<Option<(u16, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let status = response
                .code
                .ok_or_else(|| HttpError::Malformed("no status".to_owned()))?;
            Ok(Some((status, len)))
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => Err(HttpError::HeadTooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HttpError::HeadTooLarge),
        Err(e) => Err(HttpError::Malformed(e.to_string())),
    }
}

/// Read more bytes into `buf`; a closed connection is an error.
async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<(), HttpError> {
    let mut chunk = [0u8; READ_BYTES];
    let n = r.read(&mut chunk).await?;
    if n == 0 {
        return Err(HttpError::Closed);
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    at_least: usize,
) -> Result<(), HttpError> {
    while buf.len() < at_least {
        read_more(r, buf).await?;
    }
    Ok(())
}

/// Read one request head; the bytes after it stay in `buf`.
pub async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Head, HttpError> {
    loop {
        if let Some((head, len)) = parse_request(buf)? {
            buf.drain(..len);
            return Ok(head);
        }
        read_more(r, buf).await?;
    }
}

/// Read the body `head` announces (chunked, `Content-Length`, or none) up to `max` bytes; the
/// bytes after it stay in `buf`.
pub async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    head: &Head,
    max: usize,
) -> Result<Vec<u8>, HttpError> {
    if head.has_token("transfer-encoding", "chunked") {
        return read_chunked(r, buf, max).await;
    }
    let length = match head.header("content-length") {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| HttpError::Malformed(format!("Content-Length {v:?}")))?,
        None => 0,
    };
    if length > max {
        return Err(HttpError::BodyTooLarge(max));
    }
    fill(r, buf, length).await?;
    Ok(buf.drain(..length).collect())
}

async fn read_chunked<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let (consumed, size) = loop {
            match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete(found)) => break found,
                Ok(httparse::Status::Partial) => read_more(r, buf).await?,
                Err(httparse::InvalidChunkSize) => {
                    return Err(HttpError::Malformed("chunk size".to_owned()));
                }
            }
        };
        buf.drain(..consumed);
        if size == 0 {
            // Trailers (usually none), then the empty line that ends the body.
            loop {
                let mut trailers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let end = match httparse::parse_headers(buf, &mut trailers) {
                    Ok(httparse::Status::Complete((len, _))) => Some(len),
                    Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                        return Err(HttpError::HeadTooLarge);
                    }
                    Ok(httparse::Status::Partial) => None,
                    Err(e) => return Err(HttpError::Malformed(format!("trailers: {e}"))),
                };
                match end {
                    Some(len) => {
                        buf.drain(..len);
                        return Ok(body);
                    }
                    None => read_more(r, buf).await?,
                }
            }
        }
        let size = usize::try_from(size)
            .ok()
            .filter(|size| body.len().saturating_add(*size) <= max)
            .ok_or(HttpError::BodyTooLarge(max))?;
        fill(r, buf, size + 2).await?;
        if &buf[size..size + 2] != b"\r\n" {
            return Err(HttpError::Malformed(
                "chunk data not followed by CRLF".to_owned(),
            ));
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Feed `pieces` to a reader one write at a time, then run `read` on it.
    async fn over_pieces<T>(
        pieces: Vec<Vec<u8>>,
        read: impl AsyncFnOnce(&mut tokio::io::DuplexStream) -> T,
    ) -> T {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            for piece in pieces {
                if server.write_all(&piece).await.is_err() {
                    return;
                }
                // Let the reader take this piece before the next one arrives.
                tokio::task::yield_now().await;
            }
        });
        let result = read(&mut client).await;
        writer.abort();
        result
    }

    const POST: &[u8] = b"POST /v1/responses?x=1 HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";

    #[tokio::test]
    async fn a_request_split_anywhere_reads_the_same() {
        for cut in 1..POST.len() {
            let pieces = vec![POST[..cut].to_vec(), POST[cut..].to_vec()];
            let (head, body) = over_pieces(pieces, async |r| {
                let mut buf = Vec::new();
                let head = read_request(r, &mut buf).await.unwrap();
                let body = read_body(r, &mut buf, &head, 1024).await.unwrap();
                assert!(buf.is_empty());
                (head, body)
            })
            .await;
            assert_eq!(
                (head.method.as_str(), head.target.as_str(), head.path()),
                ("POST", "/v1/responses?x=1", "/v1/responses".to_owned()),
                "cut {cut}"
            );
            assert_eq!(head.header("CONTENT-type"), Some("application/json"));
            assert!(!head.wants_close());
            assert_eq!(body, b"{}");
        }
    }

    #[tokio::test]
    async fn a_chunked_body_split_anywhere_reads_the_same_and_keeps_what_follows() {
        let message = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\nGET";
        for cut in 1..message.len() {
            let pieces = vec![message[..cut].to_vec(), message[cut..].to_vec()];
            let (body, rest) = over_pieces(pieces, async |r| {
                let mut buf = Vec::new();
                let head = read_request(r, &mut buf).await.unwrap();
                let body = read_body(r, &mut buf, &head, 1024).await.unwrap();
                (body, buf)
            })
            .await;
            assert_eq!(body, b"hello, world", "cut {cut}");
            // The next request's first bytes, if they came along, are still there.
            assert!(b"GET".starts_with(&rest), "cut {cut}: {rest:?}");
        }
    }

    #[tokio::test]
    async fn bad_chunks_and_oversized_bodies_are_refused() {
        let head = |te: &str| Head {
            method: "POST".to_owned(),
            target: "/".to_owned(),
            version_1_0: false,
            headers: vec![(te.to_owned(), "chunked".to_owned())],
        };
        for (bytes, want) in [
            (&b"zz\r\n"[..], "malformed message: chunk size"),
            (
                b"2\r\nabXY",
                "malformed message: chunk data not followed by CRLF",
            ),
            (b"10\r\n", "body larger than 8 bytes"),
        ] {
            let e = over_pieces(vec![bytes.to_vec()], async |r| {
                read_body(r, &mut Vec::new(), &head("transfer-encoding"), 8).await
            })
            .await
            .unwrap_err();
            assert_eq!(e.to_string(), want);
        }
        let sized = Head {
            headers: vec![("content-length".to_owned(), "9".to_owned())],
            ..head("x")
        };
        let e = read_body(&mut &b""[..], &mut Vec::new(), &sized, 8)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "body larger than 8 bytes");
    }

    #[tokio::test]
    async fn oversized_or_unfinished_heads_are_clear_errors() {
        let mut long = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        long.resize(MAX_HEAD_BYTES + 2 * READ_BYTES, b'a');
        let e = over_pieces(vec![long], async |r| read_request(r, &mut Vec::new()).await)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "head larger than 65536 bytes");

        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: a\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(parse_request(&many), Err(HttpError::HeadTooLarge)));

        // The peer closes before the blank line that ends a head.
        let e = over_pieces(vec![b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec()], async |r| {
            read_request(r, &mut Vec::new()).await
        })
        .await
        .unwrap_err();
        assert!(matches!(e, HttpError::Closed), "{e}");

        // A CR not followed by LF is not a line ending; a bare LF is (RFC 9112 allows it).
        assert!(parse_request(b"GET / HTTP/1.1\rHost: h\r\n\r\n").is_err());
        let (head, _) = parse_request(b"GET / HTTP/1.0\nHost: h\n\n")
            .unwrap()
            .unwrap();
        assert!(head.version_1_0 && head.wants_close());
        assert!(parse_request(b"GET / SPDY/3\r\n\r\n").is_err());
    }

    #[test]
    fn responses_and_round_trips() {
        let upgraded = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81";
        // The head ends before the first WebSocket frame byte.
        assert_eq!(
            parse_response(upgraded).unwrap(),
            Some((101, upgraded.len() - 1))
        );
        assert_eq!(parse_response(b"HTTP/1.1 426 Upgr").unwrap(), None);
        let (head, len) = parse_request(POST).unwrap().unwrap();
        assert_eq!(len, POST.len() - 2);
        let again = head.encode();
        assert_eq!(parse_request(&again).unwrap(), Some((head, again.len())));
    }
}
