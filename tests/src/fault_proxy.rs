//! A fault-injecting TCP proxy between `sparkd` and the fake provider.
//!
//! It passes the request (and a WebSocket upgrade) through untouched, then reads the provider's
//! side event by event: a WebSocket frame by frame, an HTTP + SSE response's chunked body
//! event by event (each event re-sent as one chunk). The daemon's side passes through as bytes.
//! So a test can cut, reset, silence, throttle, duplicate, reorder or inject events at a chosen
//! point of the stream, in either transport. A fault is armed with a [`Trigger`] (the nth
//! text frame or SSE event containing a string, counted over every connection) and fires once;
//! traffic before and after passes unchanged. The proxy can
//! also be taken down (every connection reset at accept), counting the attempts the daemon
//! makes, which is how the reconnect policy is measured.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::http1;

/// What happens at the frame (or SSE event) the trigger matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Send the frame's header and half its payload (half the event's chunk), then close the
    /// connection (FIN).
    Truncate,
    /// Reset the connection (RST) instead of sending the frame.
    Reset,
    /// From this frame on, forward nothing to the daemon (pongs included) and keep the
    /// connection open: a peer that stops answering.
    Blackhole,
    /// From this frame on, forward to the daemon at this many bytes a second.
    Trickle { bytes_per_sec: usize },
    /// Send the frame twice.
    Duplicate,
    /// Hold the frame back and send it after the next one.
    SwapWithNext,
    /// Send the frame, and a copy of it again after the next text frame: a duplicate that
    /// arrives late, e.g. a response's terminal event inside the next response.
    DuplicateLate,
    /// Send this text frame (an SSE event with this `data`) just before the matched one.
    InjectBefore(String),
}

/// Which provider frame a fault fires at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// A substring of the text frame (e.g. `"response.output_item.done"`).
    pub contains: String,
    /// 1-based: the nth matching frame since the fault was armed.
    pub nth: usize,
}

impl Trigger {
    pub fn first(contains: impl Into<String>) -> Trigger {
        Trigger {
            contains: contains.into(),
            nth: 1,
        }
    }

    pub fn nth(contains: impl Into<String>, nth: usize) -> Trigger {
        Trigger {
            contains: contains.into(),
            nth: nth.max(1),
        }
    }
}

#[derive(Debug, Default)]
struct Armed {
    fault: Option<(Fault, Trigger)>,
    seen: usize,
    fired: usize,
}

#[derive(Debug, Default)]
struct Shared {
    upstream: Mutex<Option<SocketAddr>>,
    armed: Mutex<Armed>,
    down: AtomicBool,
    accepted: AtomicUsize,
    refused: AtomicUsize,
    upgrades: AtomicUsize,
    sse_responses: AtomicUsize,
    fired: tokio::sync::Notify,
}

/// The proxy, on its own runtime; stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Listen on a loopback port and forward every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let shared = Arc::new(Shared {
            upstream: Mutex::new(Some(upstream)),
            ..Shared::default()
        });
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let s = shared.clone();
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                s.accepted.fetch_add(1, Ordering::SeqCst);
                if s.down.load(Ordering::SeqCst) {
                    s.refused.fetch_add(1, Ordering::SeqCst);
                    reset(client);
                    continue;
                }
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(client, s).await;
                });
            }
        });
        FaultProxy {
            addr,
            shared,
            rt: Some(rt),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The provider's WebSocket endpoint, through the proxy.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/responses", self.addr)
    }

    /// The provider's HTTP + SSE endpoint, through the proxy.
    pub fn http_url(&self) -> String {
        format!("http://{}/v1/responses", self.addr)
    }

    /// Fire `fault` once, at the frame `trigger` matches.
    pub fn arm(&self, fault: Fault, trigger: Trigger) {
        let mut a = self.shared.armed.lock().expect("armed");
        a.fault = Some((fault, trigger));
        a.seen = 0;
    }

    /// How many armed faults have fired so far.
    pub fn fired(&self) -> usize {
        self.shared.armed.lock().expect("armed").fired
    }

    /// Wait (at most `limit`) until `n` faults have fired.
    pub fn wait_fired(&self, n: usize, limit: Duration) -> bool {
        let rt = self.rt.as_ref().expect("runtime");
        rt.block_on(async {
            tokio::time::timeout(limit, async {
                loop {
                    let notified = self.shared.fired.notified();
                    if self.fired() >= n {
                        return;
                    }
                    notified.await;
                }
            })
            .await
            .is_ok()
        })
    }

    /// While down, every connection is reset as soon as it is accepted.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Connections accepted, including those reset while down.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections reset at accept while down: the daemon's connection attempts in that time.
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// WebSocket upgrades the provider accepted through the proxy.
    pub fn upgrades(&self) -> usize {
        self.shared.upgrades.load(Ordering::SeqCst)
    }

    /// HTTP + SSE responses the provider started through the proxy.
    pub fn sse_responses(&self) -> usize {
        self.shared.sse_responses.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Close with RST rather than FIN.
fn reset(stream: TcpStream) {
    let _ = reset_on_close(&stream);
    drop(stream);
}

/// SO_LINGER 0: closing the socket sends RST. tokio deprecates `set_linger` because a non-zero
/// linger blocks the thread on drop; a zero linger never blocks.
#[allow(deprecated)]
fn reset_on_close(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_linger(Some(Duration::ZERO))
}

async fn serve(client: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let upstream = shared
        .upstream
        .lock()
        .map_err(|_| std::io::Error::other("poisoned"))?
        .ok_or_else(|| std::io::Error::other("no upstream"))?;
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_rd, client_wr) = client.into_split();
    let (server_rd, mut server_wr) = server.into_split();
    // The daemon's side passes through untouched; it ends when either side closes.
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_rd, &mut server_wr).await;
        let _ = server_wr.shutdown().await;
    });
    let r = downstream(server_rd, client_wr, &shared).await;
    up.abort();
    r
}

/// Reads the provider's side: the HTTP head, then WebSocket frames or SSE events, applying
/// the armed fault.
async fn downstream(
    mut server: tokio::net::tcp::OwnedReadHalf,
    mut client: tokio::net::tcp::OwnedWriteHalf,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(16 * 1024);
    // The response head; one the proxy cannot read is passed on as it is.
    let (status, head_end) = loop {
        match http1::parse_response(&buf) {
            Ok(Some(found)) => break found,
            Ok(None) => {}
            Err(_) => {
                client.write_all(&buf).await?;
                tokio::io::copy(&mut server, &mut client).await?;
                return Ok(());
            }
        }
        if read_more(&mut server, &mut buf).await? == 0 {
            client.write_all(&buf).await?;
            return Ok(());
        }
    };
    let head: Vec<u8> = buf.drain(..head_end).collect();
    client.write_all(&head).await?;
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if status == 101 {
        shared.upgrades.fetch_add(1, Ordering::SeqCst);
        return websocket(server, Out::new(client, Stream::WebSocket), shared, buf).await;
    }
    if status == 200
        && head.contains("text/event-stream")
        && head.contains("transfer-encoding: chunked")
    {
        shared.sse_responses.fetch_add(1, Ordering::SeqCst);
        return sse(server, Out::new(client, Stream::Sse), shared, buf).await;
    }
    // Anything else (a refusal, a JSON body): the rest passes through as bytes.
    client.write_all(&buf).await?;
    tokio::io::copy(&mut server, &mut client).await?;
    Ok(())
}

/// WebSocket mode: the provider's frames, one by one.
async fn websocket(
    mut server: tokio::net::tcp::OwnedReadHalf,
    mut out: Out,
    shared: &Shared,
    mut buf: Vec<u8>,
) -> std::io::Result<()> {
    loop {
        let frame = loop {
            if let Some(len) = frame_len(&buf) {
                break buf.drain(..len).collect::<Vec<u8>>();
            }
            if read_more(&mut server, &mut buf).await? == 0 {
                out.flush_held().await?;
                return Ok(());
            }
        };
        let text =
            (frame.first().map(|b| b & 0x0f) == Some(0x1)).then(|| &frame[header_len(&frame)..]);
        let fault = text.and_then(|payload| match_fault(shared, payload));
        match deliver(&mut out, &mut server, fault, frame).await? {
            Flow::Going => {}
            Flow::Ended => return Ok(()),
            Flow::Reset => {
                out.client.forget();
                return Ok(());
            }
        }
    }
}

/// HTTP + SSE: the chunked body decoded and split into events, each re-sent as one chunk, so
/// a fault acts on a whole event as on a WebSocket frame.
async fn sse(
    mut server: tokio::net::tcp::OwnedReadHalf,
    mut out: Out,
    shared: &Shared,
    mut buf: Vec<u8>,
) -> std::io::Result<()> {
    let mut body = Vec::new();
    loop {
        let data = match take_chunk(&mut buf)? {
            Some(data) => data,
            None => {
                if read_more(&mut server, &mut buf).await? == 0 {
                    out.flush_held().await?;
                    return Ok(());
                }
                continue;
            }
        };
        if data.is_empty() {
            // The last chunk: what is left, the end of the body, then the bytes after it.
            out.flush_held().await?;
            if !body.is_empty() {
                out.write(&chunk(&body)).await?;
            }
            out.write(b"0\r\n\r\n").await?;
            out.write(&buf).await?;
            tokio::io::copy(&mut server, &mut out.client).await?;
            return Ok(());
        }
        body.extend_from_slice(&data);
        while let Some(end) = find(&body, b"\n\n") {
            let event: Vec<u8> = body.drain(..end + 2).collect();
            let fault = match_fault(shared, &event);
            match deliver(&mut out, &mut server, fault, chunk(&event)).await? {
                Flow::Going => {}
                Flow::Ended => return Ok(()),
                Flow::Reset => {
                    out.client.forget();
                    return Ok(());
                }
            }
        }
    }
}

/// The data of the chunk at the start of `buf`, its framing consumed: empty for the last
/// chunk (trailers are not expected), `None` while it is incomplete.
fn take_chunk(buf: &mut Vec<u8>) -> std::io::Result<Option<Vec<u8>>> {
    let (consumed, size) = match httparse::parse_chunk_size(buf) {
        Ok(httparse::Status::Complete(found)) => found,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::InvalidChunkSize) => return Err(std::io::Error::other("bad chunk size")),
    };
    let size = usize::try_from(size).map_err(std::io::Error::other)?;
    let end = consumed + size + 2;
    if buf.len() < end {
        return Ok(None);
    }
    let data = buf[consumed..consumed + size].to_vec();
    buf.drain(..end);
    Ok(Some(data))
}

/// `data` as one chunk of a chunked body.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// Whether the stream goes on after a unit was delivered.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Going,
    Ended,
    /// The connection is to be reset: the caller drops the write half without a FIN.
    Reset,
}

/// Send one unit (a frame, an SSE event's chunk) to the daemon, as `fault` says.
async fn deliver(
    out: &mut Out,
    server: &mut tokio::net::tcp::OwnedReadHalf,
    fault: Option<Fault>,
    unit: Vec<u8>,
) -> std::io::Result<Flow> {
    match fault {
        None => out.send(&unit).await?,
        Some(Fault::Truncate) => {
            let cut = match out.stream {
                Stream::WebSocket => {
                    let header = header_len(&unit);
                    header + (unit.len() - header) / 2
                }
                Stream::Sse => unit.len() / 2,
            };
            out.flush_held().await?;
            out.client.write_all(&unit[..cut]).await?;
            out.client.shutdown().await?;
            return Ok(Flow::Ended);
        }
        Some(Fault::Reset) => {
            out.flush_held().await?;
            // No FIN from the write half: the socket closes with the read half (when
            // `serve` ends), and linger 0 turns that close into a reset.
            reset_on_close(out.client.as_ref())?;
            return Ok(Flow::Reset);
        }
        Some(Fault::Blackhole) => {
            out.flush_held().await?;
            // Keep the daemon's connection open; whatever else the provider says is dropped.
            // A provider that ends its response (HTTP + SSE) or closes still looks silent: the
            // connection is held until the proxy stops.
            let mut sink = [0u8; 4096];
            while server.read(&mut sink).await? > 0 {}
            std::future::pending::<()>().await;
            return Ok(Flow::Ended);
        }
        Some(Fault::Trickle { bytes_per_sec }) => {
            out.rate = Some(bytes_per_sec.max(1));
            out.send(&unit).await?;
        }
        Some(Fault::Duplicate) => {
            out.send(&unit).await?;
            out.send(&unit).await?;
        }
        Some(Fault::SwapWithNext) => out.held = Some(unit),
        Some(Fault::DuplicateLate) => {
            out.send(&unit).await?;
            out.late = Some(unit);
        }
        Some(Fault::InjectBefore(text)) => {
            let injected = match out.stream {
                Stream::WebSocket => text_frame(text.as_bytes()),
                Stream::Sse => chunk(format!("data: {text}\n\n").as_bytes()),
            };
            out.send(&injected).await?;
            out.send(&unit).await?;
        }
    }
    Ok(Flow::Going)
}

/// The transport whose units [`Out`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    WebSocket,
    Sse,
}

struct Out {
    client: tokio::net::tcp::OwnedWriteHalf,
    stream: Stream,
    rate: Option<usize>,
    held: Option<Vec<u8>>,
    /// Sent after the next text frame (SSE event).
    late: Option<Vec<u8>>,
}

impl Out {
    fn new(client: tokio::net::tcp::OwnedWriteHalf, stream: Stream) -> Out {
        Out {
            client,
            stream,
            rate: None,
            held: None,
            late: None,
        }
    }

    async fn send(&mut self, unit: &[u8]) -> std::io::Result<()> {
        self.write(unit).await?;
        if let Some(held) = self.held.take() {
            self.write(&held).await?;
        }
        let text = match self.stream {
            Stream::WebSocket => unit.first().is_some_and(|b| b & 0x0f == 0x1),
            Stream::Sse => true,
        };
        if text && let Some(late) = self.late.take() {
            self.write(&late).await?;
        }
        Ok(())
    }

    async fn flush_held(&mut self) -> std::io::Result<()> {
        if let Some(held) = self.held.take() {
            self.write(&held).await?;
        }
        Ok(())
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self.rate {
            None => self.client.write_all(bytes).await,
            Some(rate) => {
                // 16 slices a second at the given rate.
                let slice = (rate / 16).max(1);
                for chunk in bytes.chunks(slice) {
                    self.client.write_all(chunk).await?;
                    tokio::time::sleep(Duration::from_secs_f64(chunk.len() as f64 / rate as f64))
                        .await;
                }
                Ok(())
            }
        }
    }
}

/// The armed fault, if `text` (a text frame's payload, an SSE event) is the one it waits for.
fn match_fault(shared: &Shared, text: &[u8]) -> Option<Fault> {
    let payload = text;
    let mut a = shared.armed.lock().ok()?;
    let (fault, trigger) = a.fault.clone()?;
    find(payload, trigger.contains.as_bytes())?;
    a.seen += 1;
    if a.seen < trigger.nth {
        return None;
    }
    a.fault = None;
    a.fired += 1;
    drop(a);
    shared.fired.notify_waiters();
    Some(fault)
}

async fn read_more(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut chunk = [0u8; 8192];
    let n = r.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Header length of the (complete or partial) frame at the start of `buf` (RFC 6455 §5.2).
fn header_len(buf: &[u8]) -> usize {
    let Some(&b1) = buf.get(1) else {
        return 2;
    };
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// Total length of the frame at the start of `buf`, once all of it is there.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 2 {
        return None;
    }
    let header = header_len(buf);
    if buf.len() < header {
        return None;
    }
    let payload = match buf[1] & 0x7f {
        126 => u16::from_be_bytes([buf[2], buf[3]]) as usize,
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            usize::try_from(u64::from_be_bytes(b)).ok()?
        }
        n => n as usize,
    };
    let total = header.checked_add(payload)?;
    (buf.len() >= total).then_some(total)
}

/// An unmasked, final text frame, as a server sends it.
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lengths_follow_the_three_size_forms() {
        for n in [0usize, 5, 125, 126, 1000, 65_535, 65_536, 200_000] {
            let f = text_frame(&vec![b'x'; n]);
            assert_eq!(frame_len(&f), Some(f.len()), "payload {n}");
            if n > 0 {
                assert_eq!(frame_len(&f[..f.len() - 1]), None, "payload {n}");
            }
        }
        // A masked client frame: 4 more header bytes.
        let masked = [0x81, 0x80 | 3, 1, 2, 3, 4, b'a', b'b', b'c'];
        assert_eq!(frame_len(&masked), Some(9));
    }
}
