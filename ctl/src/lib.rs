//! `sparkctl` as a library: a blocking [`Client`] for spark's local socket, and
//! [`autostart`], which finds or starts the daemon the way every subcommand needs it.
//!
//! - [`Client`]: connect, `initialize`, typed calls through [`spark_proto::Method`],
//!   notifications delivered to a callback while a call is in flight.
//! - [`autostart`]: connect, or take the startup lock and spawn `sparkd` detached, wait for it to
//!   be ready, and restart a daemon whose version differs from this client's.
//! - [`gitenv`]: `GIT_DIR`/`GIT_WORK_TREE` accepted only when they name what discovery finds.
//! - [`hooks`]: git hooks that reach the daemon: install, chain, restore, and what they run.
//! - [`mcp`]: `sparkctl mcp`, a Model Context Protocol server on stdio forwarding to the daemon.
//! - [`output`]: colour and pager choices, as git makes them.
//! - [`service`]: the daemon as a systemd user unit or a launchd agent.
//! - [`settings`]: the asking shell's provider settings, sent with each `ask`.
//! - [`ClientError`]: every failure, with the exit code (0/1/2/130, as the README says) and a hint for the user.

pub mod autostart;
mod client;
pub mod gitenv;
pub mod hooks;
pub mod interrupt;
pub mod mcp;
pub mod output;
pub mod service;
pub mod settings;

pub use client::{Client, ClientError};

/// This client's package version; a daemon of another version is restarted.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
