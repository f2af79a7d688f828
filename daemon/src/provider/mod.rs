//! The model-provider client: warm sessions to a Responses-API provider over WebSocket mode
//! (`wss://…/v1/responses`), falling back to HTTP + SSE (`POST …/v1/responses`).
//!
//! - [`wire`]: the `response.create` request, input items, the `apply_patch` tool, server events.
//! - [`transport`]: WebSocket and HTTP + SSE connections, chosen by the URL's scheme.
//! - `http`: the small HTTP/1.1 client behind the SSE fallback.
//! - `sse`: incremental SSE and chunked-transfer decoders.
//! - [`lanes`]: one WebSocket connection per provider shared by sessions on `stream_id` lanes.
//! - [`session`]: one task per session owning one connection: prewarm, chained turns, cancel,
//!   recovery, rotation, timings, status.
//!
//! The rest of the daemon talks only to [`SessionHandle`]; only `session` touches a connection.

// The API is wider than today's callers (status fields, per-item events, the timing
// breakdown); narrow this once `sparkctl status` and the benchmarks read them.

pub(crate) mod arguments;
pub(crate) mod backoff;
pub(crate) mod lanes;
pub(crate) mod session;
pub(crate) mod transport;
pub(crate) mod wire;

mod http;
mod sse;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz_tests;

pub(crate) use session::{
    SessionConfig, SessionError, SessionHandle, TurnEvent, TurnFailure, TurnRequest, spawn,
};
pub(crate) use wire::{InputItem, OutputItem, Tool};
