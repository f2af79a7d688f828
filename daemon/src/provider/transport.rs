//! The two transports to a Responses-API provider, picked by the URL's scheme:
//! `ws`/`wss` → one persistent WebSocket ("WebSocket mode"), `http`/`https` → one
//! `POST …/responses` with `stream:true` per request, read as Server-Sent Events.
//!
//! [`Connection::recv`] is cancel-safe on both, so the session can `select!` on it next to its
//! command channel: the WebSocket is polled as a stream, and the HTTP request runs in its own
//! task that forwards parsed events over a channel.
//!
//! A WebSocket upgrade answered with anything but `101` is [`TransportError::UpgradeRefused`],
//! distinct from network failures, so the session can fall back to HTTP + SSE at the same host.

use std::fmt;
use std::sync::{Arc, Once, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tracing::{debug, warn};

use super::http;
use super::wire::{LaneEvent, ServerEvent, parse_event, parse_lane_event};

/// A frame of a shared connection.
#[derive(Debug)]
pub(crate) enum LaneIncoming {
    Event(LaneEvent),
    Other(Incoming),
}

/// Most of an upgrade-refusal body kept for the error message.
const REFUSAL_BODY_BYTES: usize = 512;
/// Time a polite WebSocket close may take before the socket is simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Which protocol a session speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TransportKind {
    WebSocket,
    HttpSse,
}

impl TransportKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TransportKind::WebSocket => "websocket",
            TransportKind::HttpSse => "http+sse",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    Ws,
    Wss,
    Http,
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Ws | Scheme::Http => 80,
            Scheme::Wss | Scheme::Https => 443,
        }
    }

    pub(crate) fn is_tls(self) -> bool {
        matches!(self, Scheme::Wss | Scheme::Https)
    }
}

/// A parsed provider URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    url: String,
    scheme: Scheme,
    /// Host as written, without IPv6 brackets.
    host: String,
    port: u16,
    /// Path and query, starting with `/`.
    path: String,
}

impl Endpoint {
    pub(crate) fn parse(url: &str) -> Result<Endpoint, TransportError> {
        let bad = |reason: &'static str| TransportError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let uri = url.parse::<::http::Uri>().map_err(|_| bad("not a URL"))?;
        let scheme = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("ws") => Scheme::Ws,
            Some("wss") => Scheme::Wss,
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            Some(_) => return Err(bad("scheme must be ws, wss, http or https")),
            None => return Err(bad("no scheme")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        // `Uri` keeps an IPv6 literal's brackets; the socket address wants it bare.
        let written_host = authority.host();
        let host = written_host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(written_host);
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        // `Authority::port` reads an out-of-range port as none at all; refuse it instead.
        let port = match authority.as_str().strip_prefix(written_host) {
            Some("") => scheme.default_port(),
            Some(after) => after
                .strip_prefix(':')
                .and_then(|p| p.parse::<u16>().ok())
                .ok_or_else(|| bad("bad port"))?,
            None => return Err(bad("bad port")),
        };
        let path = match uri.query() {
            Some(query) => format!("{}?{query}", uri.path()),
            None => uri.path().to_owned(),
        };
        Ok(Endpoint {
            url: url.to_owned(),
            scheme,
            host: host.to_owned(),
            port,
            path,
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn scheme(&self) -> Scheme {
        self.scheme
    }

    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    pub(crate) fn kind(&self) -> TransportKind {
        match self.scheme {
            Scheme::Ws | Scheme::Wss => TransportKind::WebSocket,
            Scheme::Http | Scheme::Https => TransportKind::HttpSse,
        }
    }

    /// The `Host` header value: the port only when it is not the scheme's default.
    pub(crate) fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == self.scheme.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The same host and path over HTTP + SSE (`ws` → `http`, `wss` → `https`); `None` when
    /// this already is HTTP.
    pub(crate) fn http_fallback(&self) -> Option<Endpoint> {
        let scheme = match self.scheme {
            Scheme::Ws => Scheme::Http,
            Scheme::Wss => Scheme::Https,
            Scheme::Http | Scheme::Https => return None,
        };
        let url = format!(
            "{}://{}{}",
            scheme.as_str(),
            self.host_header_for(scheme),
            self.path
        );
        Some(Endpoint {
            url,
            scheme,
            host: self.host.clone(),
            port: self.port,
            path: self.path.clone(),
        })
    }

    fn host_header_for(&self, scheme: Scheme) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == scheme.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// Why a connection or a request failed at the transport level.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    #[error("invalid provider URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("the API key cannot be sent in an HTTP header")]
    BadApiKey,
    #[error("WebSocket upgrade refused with HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    UpgradeRefused { status: u16, body: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("the provider sent nothing for {after:?} in the middle of a response")]
    Stalled { after: Duration },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("WebSocket error: {0}")]
    WebSocket(String),
    #[error("bad HTTP response: {0}")]
    Http(String),
    #[error("provider connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

impl TransportError {
    /// The same error again, for every session that waited on one shared connection attempt.
    pub(crate) fn duplicate(&self) -> TransportError {
        match self {
            TransportError::InvalidUrl { url, reason } => TransportError::InvalidUrl {
                url: url.clone(),
                reason,
            },
            TransportError::BadApiKey => TransportError::BadApiKey,
            TransportError::UpgradeRefused { status, body } => TransportError::UpgradeRefused {
                status: *status,
                body: body.clone(),
            },
            TransportError::Connect { addr, source } => TransportError::Connect {
                addr: addr.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            TransportError::Timeout { what, after } => TransportError::Timeout {
                what,
                after: *after,
            },
            TransportError::Stalled { after } => TransportError::Stalled { after: *after },
            TransportError::Tls(e) => TransportError::Tls(e.clone()),
            TransportError::WebSocket(e) => TransportError::WebSocket(e.clone()),
            TransportError::Http(e) => TransportError::Http(e.clone()),
            TransportError::Io(e) => {
                TransportError::Io(std::io::Error::new(e.kind(), e.to_string()))
            }
        }
    }

    /// Whether the provider answered the upgrade in a way that means "no WebSocket mode here"
    /// (426, 404, 405, 200, …) rather than a transient or credential problem, where HTTP would
    /// fail the same way (401/403/407: credentials, 429: rate limit, 5xx: overload).
    pub(crate) fn means_no_websocket(&self) -> bool {
        match self {
            TransportError::UpgradeRefused { status, .. } => {
                !matches!(status, 401 | 403 | 407 | 429) && *status < 500
            }
            _ => false,
        }
    }
}

/// What the connection delivered.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "events are the common case; boxing each costs an allocation"
)]
pub(crate) enum Incoming {
    Event(ServerEvent),
    /// A WebSocket pong with the payload of our ping.
    Pong(Bytes),
    /// Traffic that carries no event (ping, binary, unparsable text): proof of life only.
    Heartbeat,
    /// The WebSocket closed (with the reason, if any).
    Closed(String),
    /// The shared connection ended because the provider refuses `stream_id` lanes: reconnect
    /// on a connection of one's own (not a failure of the provider).
    LanesRefused,
    /// The HTTP response stream ended (normal after a terminal event, an error before one).
    StreamEnd,
}

static PROVIDER: Once = Once::new();

/// Install ring as rustls's process-wide provider, once, before any TLS use. Without it the
/// first `wss://` connect panics ("Could not automatically determine the process-level
/// CryptoProvider"); an already-installed provider is fine.
pub(crate) fn ensure_crypto_provider() {
    PROVIDER.call_once(|| {
        let _already_installed = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The client TLS configuration (webpki roots, ring), built once.
pub(crate) fn tls_config() -> Result<Arc<rustls::ClientConfig>, TransportError> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    ensure_crypto_provider();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(TransportError::Tls)
}

/// Timeouts for opening connections, and for an HTTP + SSE response that stops sending.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectTimeouts {
    /// TCP connect + TLS + upgrade (WebSocket) or TCP connect + TLS (HTTP).
    pub(crate) connect: Duration,
    /// No byte of an HTTP + SSE response for this long: the provider is given up on. (A
    /// WebSocket is checked by pings instead; an HTTP response cannot be pinged.)
    pub(crate) stream_idle: Duration,
}

/// A provider connection: a live WebSocket, or the HTTP endpoint with at most one request
/// in flight.
#[derive(Debug)]
pub(crate) enum Connection {
    WebSocket(WsConnection),
    Http(HttpConnection),
    /// A lane of a WebSocket connection shared by several sessions (see `lanes`).
    Lane(super::lanes::LaneConn),
}

impl Connection {
    /// Open a connection to `endpoint` (for HTTP nothing is dialled until the first request).
    pub(crate) async fn open(
        endpoint: Endpoint,
        api_key: Option<Arc<str>>,
        timeouts: ConnectTimeouts,
    ) -> Result<Connection, TransportError> {
        match endpoint.kind() {
            TransportKind::WebSocket => {
                WsConnection::connect(&endpoint, api_key.as_deref(), timeouts)
                    .await
                    .map(Connection::WebSocket)
            }
            TransportKind::HttpSse => Ok(Connection::Http(HttpConnection {
                endpoint,
                api_key,
                timeouts,
                active: None,
            })),
        }
    }

    pub(crate) fn kind(&self) -> TransportKind {
        match self {
            Connection::WebSocket(_) | Connection::Lane(_) => TransportKind::WebSocket,
            Connection::Http(_) => TransportKind::HttpSse,
        }
    }

    /// The peer stopped answering: for a lane, no session may join its shared connection
    /// again (the next one opens a new connection). A connection of its own just goes.
    pub(crate) fn give_up(&self) {
        match self {
            Connection::Lane(lane) => lane.give_up(),
            Connection::WebSocket(_) | Connection::Http(_) => {}
        }
    }

    /// Send one encoded request: a WebSocket text message, or a new HTTP POST.
    pub(crate) async fn send(&mut self, body: String) -> Result<(), TransportError> {
        match self {
            Connection::WebSocket(ws) => ws.send(Message::text(body)).await,
            Connection::Http(h) => {
                h.start(body);
                Ok(())
            }
            Connection::Lane(lane) => lane.send(body).await,
        }
    }

    /// The next thing the provider sent. Cancel-safe; pending forever on an idle HTTP
    /// connection.
    pub(crate) async fn recv(&mut self) -> Result<Incoming, TransportError> {
        match self {
            Connection::WebSocket(ws) => ws.recv().await,
            Connection::Http(h) => h.recv().await,
            Connection::Lane(lane) => Ok(lane.recv().await),
        }
    }

    /// Send a WebSocket ping (no-op over HTTP).
    pub(crate) async fn ping(&mut self, payload: Bytes) -> Result<(), TransportError> {
        match self {
            Connection::WebSocket(ws) => ws.send(Message::Ping(payload)).await,
            Connection::Http(_) => Ok(()),
            Connection::Lane(lane) => lane.ping(payload),
        }
    }

    /// Abandon whatever is in flight: the HTTP request is aborted; a WebSocket cannot abandon
    /// a response without closing, so callers drop it with [`Connection::close`].
    pub(crate) fn abandon(&mut self) {
        if let Connection::Http(h) = self {
            h.active = None;
        }
    }

    /// Close without waiting: a WebSocket gets a close frame from a short-lived task (bounded
    /// by [`CLOSE_GRACE`]); the caller is free at once.
    pub(crate) fn close(self) {
        match self {
            Connection::WebSocket(ws) => {
                tokio::spawn(async move {
                    let mut stream = *ws.stream;
                    let _ = tokio::time::timeout(CLOSE_GRACE, stream.close(None)).await;
                });
            }
            Connection::Http(_) => {}
            // Dropping the lane leaves the shared connection (its later events are dropped).
            Connection::Lane(_) => {}
        }
    }

    /// The lane's `stream_id`, on a shared connection.
    pub(crate) fn stream_id(&self) -> Option<&str> {
        match self {
            Connection::Lane(lane) => Some(lane.stream_id()),
            Connection::WebSocket(_) | Connection::Http(_) => None,
        }
    }

    /// When the underlying connection opened, if it is older than this handle (a lane of a
    /// shared connection): its age is what the provider's lifetime limit counts.
    pub(crate) fn opened_at(&self) -> Option<std::time::Instant> {
        match self {
            Connection::Lane(lane) => Some(lane.connection_opened_at()),
            Connection::WebSocket(_) | Connection::Http(_) => None,
        }
    }

    /// The underlying connection carried an event / completed a response, perhaps for
    /// another lane: it is a working connection, not an upgrade that goes nowhere.
    pub(crate) fn heard(&self) -> bool {
        match self {
            Connection::Lane(lane) => lane.connection_heard(),
            Connection::WebSocket(_) | Connection::Http(_) => false,
        }
    }

    pub(crate) fn answered(&self) -> bool {
        match self {
            Connection::Lane(lane) => lane.connection_answered(),
            Connection::WebSocket(_) | Connection::Http(_) => false,
        }
    }
}

/// An open WebSocket-mode connection.
pub(crate) struct WsConnection {
    /// Boxed: the stream with its buffers is large and connections move between states.
    stream: Box<WebSocketStream<MaybeTlsStream<TcpStream>>>,
}

impl fmt::Debug for WsConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsConnection").finish_non_exhaustive()
    }
}

impl WsConnection {
    pub(super) async fn connect(
        endpoint: &Endpoint,
        api_key: Option<&str>,
        timeouts: ConnectTimeouts,
    ) -> Result<WsConnection, TransportError> {
        let mut request = endpoint
            .url()
            .into_client_request()
            .map_err(|e| TransportError::WebSocket(e.to_string()))?;
        // The guide's handshake carries only `Authorization`; no `OpenAI-Beta` header is
        // required for WebSocket mode.
        if let Some(key) = api_key.filter(|k| !k.is_empty()) {
            let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| TransportError::BadApiKey)?;
            value.set_sensitive(true);
            request.headers_mut().insert(header::AUTHORIZATION, value);
        }
        let connector = if endpoint.scheme().is_tls() {
            Connector::Rustls(tls_config()?)
        } else {
            Connector::Plain
        };
        // `true`: TCP_NODELAY — every event is small and latency-bound.
        let connecting =
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, Some(connector));
        match tokio::time::timeout(timeouts.connect, connecting).await {
            Err(_) => Err(TransportError::Timeout {
                what: "WebSocket connect",
                after: timeouts.connect,
            }),
            Ok(Err(tungstenite::Error::Http(response))) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| {
                        String::from_utf8_lossy(&b[..b.len().min(REFUSAL_BODY_BYTES)])
                            .trim()
                            .to_owned()
                    })
                    .unwrap_or_default();
                Err(TransportError::UpgradeRefused {
                    status: response.status().as_u16(),
                    body,
                })
            }
            Ok(Err(tungstenite::Error::Io(source))) => Err(TransportError::Connect {
                addr: format!("{}:{}", endpoint.host(), endpoint.port()),
                source,
            }),
            Ok(Err(e)) => Err(TransportError::WebSocket(e.to_string())),
            Ok(Ok((stream, _response))) => {
                debug!(url = endpoint.url(), "provider WebSocket connected");
                Ok(WsConnection {
                    stream: Box::new(stream),
                })
            }
        }
    }

    pub(super) async fn send(&mut self, message: Message) -> Result<(), TransportError> {
        self.stream
            .send(message)
            .await
            .map_err(|e| TransportError::WebSocket(e.to_string()))
    }

    /// The next frame of a shared connection: a text frame with its lane, or anything else.
    pub(super) async fn recv_lane(&mut self) -> Result<LaneIncoming, TransportError> {
        let Some(message) = self.stream.next().await else {
            return Ok(LaneIncoming::Other(Incoming::Closed(
                "connection ended".to_owned(),
            )));
        };
        match message {
            Ok(Message::Text(text)) => match parse_lane_event(text.as_str()) {
                Ok(event) => Ok(LaneIncoming::Event(event)),
                Err(e) => {
                    warn!(error = %e, "unparsable provider event ignored");
                    Ok(LaneIncoming::Other(Incoming::Heartbeat))
                }
            },
            other => Self::non_text(other).map(LaneIncoming::Other),
        }
    }

    pub(super) fn close(self) {
        Connection::WebSocket(self).close();
    }

    async fn recv(&mut self) -> Result<Incoming, TransportError> {
        let Some(message) = self.stream.next().await else {
            return Ok(Incoming::Closed("connection ended".to_owned()));
        };
        match message {
            Ok(Message::Text(text)) => match parse_event(text.as_str()) {
                Ok(event) => Ok(Incoming::Event(event)),
                Err(e) => {
                    warn!(error = %e, "unparsable provider event ignored");
                    Ok(Incoming::Heartbeat)
                }
            },
            other => Self::non_text(other),
        }
    }

    fn non_text(message: Result<Message, tungstenite::Error>) -> Result<Incoming, TransportError> {
        match message {
            Ok(Message::Text(_)) => Ok(Incoming::Heartbeat),
            Ok(Message::Pong(payload)) => Ok(Incoming::Pong(payload)),
            Ok(Message::Close(frame)) => Ok(Incoming::Closed(
                frame
                    .map(|f| format!("closed by the provider ({}: {})", f.code, f.reason))
                    .unwrap_or_else(|| "closed by the provider".to_owned()),
            )),
            // Pings are answered by tungstenite itself on the next read or write.
            Ok(Message::Ping(_) | Message::Binary(_) | Message::Frame(_)) => {
                Ok(Incoming::Heartbeat)
            }
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Ok(Incoming::Closed("connection closed".to_owned()))
            }
            Err(e) => Err(TransportError::WebSocket(e.to_string())),
        }
    }
}

/// The HTTP + SSE endpoint; each request runs in its own task.
#[derive(Debug)]
pub(crate) struct HttpConnection {
    endpoint: Endpoint,
    api_key: Option<Arc<str>>,
    timeouts: ConnectTimeouts,
    active: Option<ActiveRequest>,
}

/// The request task and its event channel; dropping it aborts the task (and so the TCP
/// connection), which is how an HTTP response is abandoned.
#[derive(Debug)]
struct ActiveRequest {
    task: JoinHandle<()>,
    events: mpsc::UnboundedReceiver<Result<ServerEvent, TransportError>>,
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpConnection {
    fn start(&mut self, body: String) {
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(http::stream_request(
            self.endpoint.clone(),
            self.api_key.clone(),
            body,
            self.timeouts,
            tx,
        ));
        self.active = Some(ActiveRequest { task, events });
    }

    async fn recv(&mut self) -> Result<Incoming, TransportError> {
        let Some(active) = self.active.as_mut() else {
            return std::future::pending().await;
        };
        match active.events.recv().await {
            Some(Ok(event)) => Ok(Incoming::Event(event)),
            Some(Err(e)) => {
                self.active = None;
                Err(e)
            }
            None => {
                self.active = None;
                Ok(Incoming::StreamEnd)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_derives_the_http_fallback() {
        let e = Endpoint::parse("wss://api.openai.com/v1/responses").unwrap();
        assert_eq!(
            (e.kind(), e.host(), e.port(), e.path()),
            (
                TransportKind::WebSocket,
                "api.openai.com",
                443,
                "/v1/responses"
            )
        );
        let f = e.http_fallback().unwrap();
        assert_eq!(f.url(), "https://api.openai.com/v1/responses");
        assert_eq!(f.kind(), TransportKind::HttpSse);
        assert!(f.http_fallback().is_none());

        let e = Endpoint::parse("ws://127.0.0.1:8080/v1/responses").unwrap();
        assert_eq!(
            e.http_fallback().unwrap().url(),
            "http://127.0.0.1:8080/v1/responses"
        );
        assert_eq!(e.host_header(), "127.0.0.1:8080");

        let e = Endpoint::parse("http://[::1]:9/v1/responses?x=1").unwrap();
        assert_eq!(
            (e.host(), e.port(), e.path()),
            ("::1", 9, "/v1/responses?x=1")
        );
        assert_eq!(e.host_header(), "[::1]:9");

        assert_eq!(Endpoint::parse("http://h").unwrap().path(), "/");
        assert_eq!(Endpoint::parse("http://h?x=1").unwrap().path(), "/?x=1");
        let e = Endpoint::parse("WSS://[::1]/v1/responses").unwrap();
        assert_eq!((e.scheme(), e.host(), e.port()), (Scheme::Wss, "::1", 443));
        for bad in [
            "ftp://h/x",
            "h/x",
            "ws://:80/x",
            "ws://h:99999/x",
            "ws://u:p@h/x",
            "ws://h:/x",
            "ws://h:8a/x",
            "ws://[::1/x",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn which_upgrade_refusals_fall_back() {
        let refused = |status| TransportError::UpgradeRefused {
            status,
            body: String::new(),
        };
        for status in [200, 400, 404, 405, 426] {
            assert!(refused(status).means_no_websocket(), "{status}");
        }
        for status in [401, 403, 429, 500, 502, 503] {
            assert!(!refused(status).means_no_websocket(), "{status}");
        }
        assert!(
            !TransportError::Timeout {
                what: "x",
                after: Duration::ZERO
            }
            .means_no_websocket()
        );
    }
}
