//! Incremental decoders for the HTTP + SSE fallback: HTTP/1.1 chunked transfer coding and
//! Server-Sent Events. Both are pure state machines fed whatever each socket read returned, so
//! a line, a chunk-size line or a UTF-8 sequence split across reads is handled.

/// Longest line either decoder buffers, and the most `data` one SSE event may gather over its
/// lines; more means a broken or hostile peer.
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// Decoding failed: the peer does not speak the protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum DecodeError {
    #[error("malformed chunk size line {0:?}")]
    ChunkSize(String),
    #[error("missing CRLF after a chunk")]
    ChunkTerminator,
    #[error("line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("event data longer than {MAX_LINE_BYTES} bytes")]
    EventTooLong,
}

/// One dispatched SSE event: the `event:` name (if any) and the `data:` lines joined by `\n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub(crate) event: Option<String>,
    pub(crate) data: String,
}

/// SSE parser (the WHATWG event-stream format): lines end in LF, CRLF or CR; a blank line
/// dispatches; `:` lines are comments; `id`/`retry` are irrelevant here and ignored.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    /// The previous byte was a CR, so an immediately following LF ends nothing.
    after_cr: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Feed bytes; complete events are appended to `out`.
    pub(crate) fn feed(
        &mut self,
        bytes: &[u8],
        out: &mut Vec<SseEvent>,
    ) -> Result<(), DecodeError> {
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    let done = self.line_done(&line, out);
                    self.line = line;
                    done?;
                    self.line.clear();
                }
                _ => {
                    self.after_cr = false;
                    if self.line.len() >= MAX_LINE_BYTES {
                        return Err(DecodeError::LineTooLong);
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), DecodeError> {
        if line.is_empty() {
            if self.has_data {
                out.push(SseEvent {
                    event: self.event.take(),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.event = None;
            self.has_data = false;
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match line.iter().position(|&c| c == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"event" => self.event = Some(value.into_owned()),
            b"data" => {
                // Many `data:` lines and never a blank one would otherwise grow without end.
                if self.data.len() + 1 + value.len() > MAX_LINE_BYTES {
                    return Err(DecodeError::EventTooLong);
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
            }
            _ => {}
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size line (extensions after `;` ignored).
    Size,
    /// Reading `n` more data bytes.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailer,
    Done,
}

/// HTTP/1.1 chunked transfer decoding.
#[derive(Debug)]
pub(crate) struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
            line: Vec::new(),
        }
    }
}

impl ChunkedDecoder {
    /// Feed raw body bytes; decoded payload is appended to `out`. Returns `true` once the
    /// terminating zero-size chunk and trailers have been read.
    pub(crate) fn feed(
        &mut self,
        mut bytes: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<bool, DecodeError> {
        while !bytes.is_empty() && self.state != ChunkState::Done {
            match self.state {
                ChunkState::Data(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                    out.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd => {
                    // Exactly CRLF (or a bare LF) must follow the data.
                    match bytes[0] {
                        b'\r' if self.line.is_empty() => self.line.push(b'\r'),
                        b'\n' => {
                            self.line.clear();
                            self.state = ChunkState::Size;
                        }
                        _ => return Err(DecodeError::ChunkTerminator),
                    }
                    bytes = &bytes[1..];
                }
                ChunkState::Size | ChunkState::Trailer => {
                    let Some(nl) = bytes.iter().position(|&b| b == b'\n') else {
                        if self.line.len() + bytes.len() > 4096 {
                            return Err(DecodeError::LineTooLong);
                        }
                        self.line.extend_from_slice(bytes);
                        return Ok(false);
                    };
                    self.line.extend_from_slice(&bytes[..nl]);
                    bytes = &bytes[nl + 1..];
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.state = match self.state {
                        ChunkState::Size => {
                            let mut sized = line.to_vec();
                            sized.extend_from_slice(b"\r\n");
                            match httparse::parse_chunk_size(&sized) {
                                Ok(httparse::Status::Complete((_, 0))) => ChunkState::Trailer,
                                Ok(httparse::Status::Complete((_, size))) => ChunkState::Data(size),
                                Ok(httparse::Status::Partial) | Err(_) => {
                                    return Err(DecodeError::ChunkSize(
                                        String::from_utf8_lossy(line).into_owned(),
                                    ));
                                }
                            }
                        }
                        ChunkState::Trailer if line.is_empty() => ChunkState::Done,
                        other => other,
                    };
                }
                ChunkState::Done => {}
            }
        }
        Ok(self.state == ChunkState::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "event: response.created\r\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\"}}\r\n\r\n: keep-alive comment\n\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\ndata: \"delta\":\"h\u{e9}\"}\n\nretry: 10\rdata:x\r\r";

    fn expected() -> Vec<SseEvent> {
        vec![
            SseEvent {
                event: Some("response.created".into()),
                data: r#"{"type":"response.created","response":{"id":"r"}}"#.into(),
            },
            SseEvent {
                event: Some("response.output_text.delta".into()),
                data: "{\"type\":\"response.output_text.delta\",\n\"delta\":\"h\u{e9}\"}".into(),
            },
            SseEvent {
                event: None,
                data: "x".into(),
            },
        ]
    }

    #[test]
    fn sse_whole_stream() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.feed(STREAM.as_bytes(), &mut out).unwrap();
        assert_eq!(out, expected());
    }

    #[test]
    fn sse_events_split_across_every_possible_read() {
        let bytes = STREAM.as_bytes();
        // One byte at a time splits every CRLF and the two-byte UTF-8 sequence.
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for b in bytes {
            p.feed(std::slice::from_ref(b), &mut out).unwrap();
        }
        assert_eq!(out, expected());
        // And every two-piece split.
        for cut in 0..bytes.len() {
            let mut p = SseParser::default();
            let mut out = Vec::new();
            p.feed(&bytes[..cut], &mut out).unwrap();
            p.feed(&bytes[cut..], &mut out).unwrap();
            assert_eq!(out, expected(), "cut at {cut}");
        }
    }

    #[test]
    fn sse_incomplete_event_is_not_dispatched() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.feed(b"data: {\"a\":1}\n", &mut out).unwrap();
        assert!(out.is_empty());
        p.feed(b"\n", &mut out).unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn chunked_split_anywhere() {
        let body = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n";
        for cut in 0..body.len() {
            let mut d = ChunkedDecoder::default();
            let mut out = Vec::new();
            let first = d.feed(&body[..cut], &mut out).unwrap();
            let done = d.feed(&body[cut..], &mut out).unwrap();
            assert!(!first || cut == body.len());
            assert!(done, "cut at {cut}");
            assert_eq!(out, b"hello, world");
        }
    }

    #[test]
    fn chunked_rejects_garbage() {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        assert!(matches!(
            d.feed(b"zz\r\n", &mut out),
            Err(DecodeError::ChunkSize(_))
        ));
        let mut d = ChunkedDecoder::default();
        assert_eq!(
            d.feed(b"2\r\nabXY", &mut out),
            Err(DecodeError::ChunkTerminator)
        );
    }
}
