//! A blocking JSON-RPC client over the local socket. Blocking is deliberate: a CLI process makes
//! one or a few calls, and a plain read is the lowest-latency way to wait for the answer.

use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use interprocess::local_socket::traits::Stream as _;
use interprocess::local_socket::{GenericFilePath, Stream, ToFsName};
use serde_json::Value;
use spark_proto::frame::{Frame, encode, read_frame};
use spark_proto::methods::{ClientInfo, Initialize, InitializeParams, InitializeResult, Method};
use spark_proto::{
    ErrorCode, Id, MAX_LINE_BYTES, Message, Notification, PROTOCOL_VERSION, Request, RpcError,
};

/// A connection to sparkd.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<Stream>,
    next_id: i64,
    socket: PathBuf,
}

/// Everything that can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to sparkd at {socket}: {source}")]
    Connect {
        socket: String,
        source: std::io::Error,
    },
    #[error("connection to sparkd lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("sparkd closed the connection")]
    Closed,
    #[error("unexpected message from sparkd: {0}")]
    Protocol(String),
    #[error("{0}")]
    Rpc(RpcError),
    #[error("could not start sparkd: {message}")]
    Start {
        message: String,
        log: Option<PathBuf>,
    },
}

impl ClientError {
    /// Exit code (README, "Configuration"): 1 when the request was refused, 2 for daemon or internal failures,
    /// 130 when it was cancelled.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Rpc(e) => match e.error_code() {
                // Cancelled by a newer request (steering) or by the user: interrupted.
                Some(spark_proto::ErrorCode::Cancelled) => 130,
                Some(c) if c.is_refusal() => 1,
                _ => 2,
            },
            ClientError::Connect { .. }
            | ClientError::Io(_)
            | ClientError::Closed
            | ClientError::Protocol(_)
            | ClientError::Start { .. } => 2,
        }
    }

    /// One line telling the user what to do next.
    pub fn hint(&self, log: &Path) -> Option<String> {
        match self {
            ClientError::Rpc(e) => e.hint().map(str::to_owned),
            ClientError::Start { log: Some(l), .. } => {
                Some(format!("the daemon log is {}", l.display()))
            }
            ClientError::Connect { .. }
            | ClientError::Io(_)
            | ClientError::Closed
            | ClientError::Protocol(_) => Some(format!("see the daemon log: {}", log.display())),
            ClientError::Start { log: None, .. } => None,
        }
    }

    /// The daemon is simply not there (as opposed to failing).
    pub fn is_not_running(&self) -> bool {
        matches!(self, ClientError::Connect { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused))
    }
}

/// The daemon at the other end must run as this user: in a shared directory (the `/tmp`
/// fallback) another user can create the socket directory first and serve a daemon of their
/// own there, which would then see every prompt and patch.
fn check_served_by_us(stream: &Stream) -> std::io::Result<()> {
    use interprocess::local_socket::traits::StreamCommon as _;
    let me = rustix::process::geteuid().as_raw();
    match stream.peer_creds()?.euid() {
        Some(uid) if uid == me => Ok(()),
        other => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "the socket is served by uid {}, not by you (uid {me}); another user may have planted it",
                other.map_or_else(|| "unknown".to_owned(), |u| u.to_string())
            ),
        )),
    }
}

impl Client {
    /// Connect without handshaking; see [`Client::initialize`].
    pub fn connect(socket: &Path) -> Result<Client, ClientError> {
        let connect_err = |source| ClientError::Connect {
            socket: socket.display().to_string(),
            source,
        };
        let name = socket
            .to_fs_name::<GenericFilePath>()
            .map_err(connect_err)?;
        let stream = Stream::connect(name).map_err(connect_err)?;
        check_served_by_us(&stream).map_err(connect_err)?;
        Ok(Client {
            reader: BufReader::new(stream),
            next_id: 1,
            socket: socket.to_owned(),
        })
    }

    /// Connect and `initialize`.
    pub fn open(
        socket: &Path,
        client_name: &str,
    ) -> Result<(Client, InitializeResult), ClientError> {
        let mut c = Client::connect(socket)?;
        let init = c.initialize(client_name)?;
        Ok((c, init))
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The handshake every connection starts with.
    pub fn initialize(&mut self, client_name: &str) -> Result<InitializeResult, ClientError> {
        self.call::<Initialize>(&InitializeParams {
            protocol_version: PROTOCOL_VERSION,
            client: ClientInfo {
                name: client_name.to_owned(),
                version: crate::VERSION.to_owned(),
            },
        })
    }

    /// Call `M` and wait for its result; notifications arriving meanwhile are dropped.
    pub fn call<M: Method>(&mut self, params: &M::Params) -> Result<M::Result, ClientError> {
        self.call_with::<M>(params, |_| {})
    }

    /// Call `M`, handing every notification that arrives before the result to `on_notification`.
    pub fn call_with<M: Method>(
        &mut self,
        params: &M::Params,
        on_notification: impl FnMut(Notification),
    ) -> Result<M::Result, ClientError> {
        self.call_with_sent::<M>(params, || {}, on_notification)
    }

    /// [`Client::call_with`], running `sent` once the request is written, before waiting.
    pub fn call_with_sent<M: Method>(
        &mut self,
        params: &M::Params,
        sent: impl FnOnce(),
        mut on_notification: impl FnMut(Notification),
    ) -> Result<M::Result, ClientError> {
        let params =
            serde_json::to_value(params).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let value = self.call_raw_sent(M::NAME, params, sent, &mut on_notification)?;
        serde_json::from_value(value)
            .map_err(|e| ClientError::Protocol(format!("bad result for `{}`: {e}", M::NAME)))
    }

    /// Call a method by name with untyped params.
    pub fn call_raw(
        &mut self,
        method: &str,
        params: Value,
        on_notification: &mut dyn FnMut(Notification),
    ) -> Result<Value, ClientError> {
        self.call_raw_sent(method, params, || {}, on_notification)
    }

    fn call_raw_sent(
        &mut self,
        method: &str,
        params: Value,
        sent: impl FnOnce(),
        on_notification: &mut dyn FnMut(Notification),
    ) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            jsonrpc: Default::default(),
            id: Id::Number(id),
            method: method.to_owned(),
            params: Some(params),
        };
        self.reader.get_mut().write_all(&encode(&req))?;
        sent();
        loop {
            match self.read_message()? {
                Message::Response(r) if r.id == Id::Number(id) => {
                    return r.into_result().map_err(ClientError::Rpc);
                }
                Message::Response(r) => match r.into_result() {
                    // An error not tied to our request (e.g. the daemon refusing the connection).
                    Err(e) if e.error_code() == Some(ErrorCode::Overloaded) => {
                        return Err(ClientError::Rpc(e));
                    }
                    other => {
                        return Err(ClientError::Protocol(format!(
                            "response to an unknown request: {other:?}"
                        )));
                    }
                },
                Message::Notification(n) => on_notification(n),
            }
        }
    }

    /// Write one raw JSON-RPC line (for clients that manage ids themselves).
    pub fn send_raw(&mut self, message: &Value) -> Result<(), ClientError> {
        self.reader.get_mut().write_all(&encode(message))?;
        Ok(())
    }

    /// Wait for the next notification (after `subscribe`).
    pub fn next_notification(&mut self) -> Result<Notification, ClientError> {
        match self.read_message()? {
            Message::Notification(n) => Ok(n),
            Message::Response(r) => {
                Err(ClientError::Protocol(format!("unexpected response {r:?}")))
            }
        }
    }

    /// Block until the daemon closes this connection (used after `shutdown`).
    pub fn wait_closed(&mut self) -> Result<(), ClientError> {
        loop {
            match read_frame(&mut self.reader, MAX_LINE_BYTES) {
                Ok(Frame::Eof) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn read_message(&mut self) -> Result<Message, ClientError> {
        match read_frame(&mut self.reader, MAX_LINE_BYTES)? {
            Frame::Line(line) => serde_json::from_slice(&line).map_err(|e| {
                ClientError::Protocol(format!(
                    "{e}: {}",
                    String::from_utf8_lossy(&line[..line.len().min(200)])
                ))
            }),
            Frame::TooLong { len } => Err(ClientError::Protocol(format!(
                "a {len}-byte line exceeds the limit"
            ))),
            Frame::Eof => Err(ClientError::Closed),
        }
    }
}
