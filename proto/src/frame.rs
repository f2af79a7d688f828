//! NDJSON framing: one JSON value per `\n`-terminated line, at most [`crate::MAX_LINE_BYTES`].
//!
//! A local socket gives no message boundaries and interprocess's `shutdown()` sends no EOF, so
//! every message is a line. An oversized line is skipped to its newline and reported, so one bad
//! client message never desynchronises or kills the connection.

use std::io::{self, BufRead};

use serde::Serialize;

/// Serialize `value` as one line, newline included. serde_json never emits raw newlines.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(value).expect("wire types always serialize to JSON");
    out.push(b'\n');
    out
}

/// What [`read_frame`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, without its terminator (a trailing `\r` is dropped too).
    Line(Vec<u8>),
    /// A line longer than the limit was read and discarded up to its newline.
    TooLong { len: usize },
    /// The peer closed the stream (a final unterminated fragment is ignored).
    Eof,
}

/// Read one frame, never buffering more than `max` bytes of a line.
pub fn read_frame<R: BufRead + ?Sized>(reader: &mut R, max: usize) -> io::Result<Frame> {
    let mut line = Vec::new();
    let mut discarded: Option<usize> = None;
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(Frame::Eof);
        }
        let (chunk, found) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        match discarded.as_mut() {
            Some(n) => *n += chunk.len(),
            None if line.len() + chunk.len() > max => discarded = Some(line.len() + chunk.len()),
            None => line.extend_from_slice(chunk),
        }
        if discarded.is_some() {
            line = Vec::new();
        }
        let used = found.unwrap_or(buf.len());
        reader.consume(used);
        if found.is_some() {
            return Ok(match discarded {
                Some(len) => Frame::TooLong { len },
                None => {
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    Frame::Line(line)
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    #[test]
    fn lines_are_split_and_crlf_tolerated() {
        let mut r = BufReader::with_capacity(3, &b"{\"a\":1}\r\n{}\npartial"[..]);
        assert_eq!(
            read_frame(&mut r, 100).expect("1"),
            Frame::Line(b"{\"a\":1}".to_vec())
        );
        assert_eq!(
            read_frame(&mut r, 100).expect("2"),
            Frame::Line(b"{}".to_vec())
        );
        assert_eq!(read_frame(&mut r, 100).expect("3"), Frame::Eof);
    }

    #[test]
    fn oversized_line_is_skipped_and_the_next_line_survives() {
        let mut input = vec![b'x'; 50];
        input.extend_from_slice(b"\nok\n");
        let mut r = BufReader::with_capacity(8, &input[..]);
        assert_eq!(
            read_frame(&mut r, 10).expect("1"),
            Frame::TooLong { len: 50 }
        );
        assert_eq!(
            read_frame(&mut r, 10).expect("2"),
            Frame::Line(b"ok".to_vec())
        );
    }

    #[test]
    fn a_line_of_exactly_max_is_accepted() {
        let mut r = BufReader::new(&b"0123456789\n"[..]);
        assert_eq!(
            read_frame(&mut r, 10).expect("1"),
            Frame::Line(b"0123456789".to_vec())
        );
    }

    #[test]
    fn encode_appends_exactly_one_newline() {
        let line = encode(&serde_json::json!({"s": "a\nb"}));
        assert_eq!(line, b"{\"s\":\"a\\nb\"}\n");
    }
}
