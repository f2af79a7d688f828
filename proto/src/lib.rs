//! Wire types of spark's local socket: JSON-RPC 2.0, one JSON object per line (NDJSON).
//!
//! This crate is the contract between `sparkd` and every client (sparkctl, git hooks, editor
//! plugins); `docs/protocol.md` documents it for people. It holds types, framing and the socket
//! layout only: no tokio, no I/O beyond reading one frame from a `BufRead`, no daemon logic.
//!
//! - [`jsonrpc`]: request / response / notification envelopes and error objects.
//! - [`error`]: the stable [`ErrorCode`] enum every failure maps to.
//! - [`methods`]: one type per method with its params and result ([`Method`]).
//! - [`events`]: notifications pushed to subscribed connections.
//! - [`frame`]: line framing with a maximum line length.
//! - [`layout`]: where the socket, state and config live, derived from the environment.

pub mod error;
pub mod events;
pub mod frame;
pub mod jsonrpc;
pub mod layout;
pub mod methods;

pub use error::ErrorCode;
pub use jsonrpc::{Id, Message, Notification, Request, Response, RpcError};
pub use methods::Method;

/// Version of this wire protocol. A client whose `initialize` names another version is refused
/// with [`ErrorCode::VersionMismatch`]; bump it on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest accepted line, newline excluded. Patches travel inline in `apply` requests, so this is
/// generous; anything longer is answered with [`ErrorCode::LineTooLong`] and skipped.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;
