//! Line framing on tokio for the server side, with the same rules as
//! [`spark_proto::frame::read_frame`]: lines of at most `max` bytes; a longer line is skipped up
//! to its newline and reported as [`Frame::TooLong`] so the connection survives it.

use bytes::{Buf, BytesMut};
use spark_proto::frame::Frame;
use tokio_util::codec::Decoder;

#[derive(Debug)]
pub(crate) struct LineDecoder {
    max: usize,
    /// Bytes of the current oversized line thrown away so far.
    discarding: Option<usize>,
    /// Bytes of `buf` already searched for a newline, so each byte is scanned once.
    scanned: usize,
}

impl LineDecoder {
    pub(crate) fn new(max: usize) -> Self {
        LineDecoder {
            max,
            discarding: None,
            scanned: 0,
        }
    }
}

impl Decoder for LineDecoder {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        let newline = buf[self.scanned..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| self.scanned + i);
        let Some(end) = newline else {
            match self.discarding.as_mut() {
                Some(n) => {
                    *n += buf.len();
                    buf.clear();
                }
                None if buf.len() > self.max => {
                    self.discarding = Some(buf.len());
                    buf.clear();
                }
                None => {}
            }
            self.scanned = buf.len();
            return Ok(None);
        };
        self.scanned = 0;
        if let Some(n) = self.discarding.take() {
            buf.advance(end + 1);
            return Ok(Some(Frame::TooLong { len: n + end }));
        }
        let mut line = buf.split_to(end + 1);
        line.truncate(end);
        // Measured before a `\r` is dropped, as `read_frame` does: otherwise whether a line of
        // `max` bytes plus `\r` is accepted would depend on how the reads happened to split it.
        if line.len() > self.max {
            return Ok(Some(Frame::TooLong { len: line.len() }));
        }
        if line.last() == Some(&b'\r') {
            line.truncate(end - 1);
        }
        Ok(Some(Frame::Line(line.to_vec())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(d: &mut LineDecoder, buf: &mut BytesMut, bytes: &[u8]) -> Vec<Frame> {
        buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(f) = d.decode(buf).expect("decode") {
            out.push(f);
        }
        out
    }

    #[test]
    fn splits_lines_across_reads() {
        let mut d = LineDecoder::new(100);
        let mut buf = BytesMut::new();
        assert!(feed(&mut d, &mut buf, b"{\"a\"").is_empty());
        assert_eq!(
            feed(&mut d, &mut buf, b":1}\r\n{}\n"),
            vec![
                Frame::Line(b"{\"a\":1}".to_vec()),
                Frame::Line(b"{}".to_vec())
            ]
        );
    }

    #[test]
    fn oversized_lines_are_skipped_whole() {
        let mut d = LineDecoder::new(4);
        let mut buf = BytesMut::new();
        assert!(feed(&mut d, &mut buf, b"0123456").is_empty());
        assert!(buf.is_empty(), "discarded bytes are not kept");
        assert_eq!(
            feed(&mut d, &mut buf, b"789\nok\n"),
            vec![Frame::TooLong { len: 10 }, Frame::Line(b"ok".to_vec())]
        );
        assert_eq!(
            feed(&mut d, &mut buf, b"toolong\nx\n"),
            vec![Frame::TooLong { len: 7 }, Frame::Line(b"x".to_vec())]
        );
    }
}
