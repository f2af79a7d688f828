//! One connection's outbound queue: everything the daemon owes a client goes through it to the
//! connection's single writer task, with two budgets so that a client that stops reading costs
//! a bounded amount of memory and never holds up anyone else.
//!
//! - **Responses** wait for room ([`Outbound::respond`]): at most [`REPLY_BYTES`] of them are
//!   queued (a single larger line goes alone). A client that does not read its answers stops
//!   being read from: backpressure, nothing lost.
//! - **Notifications** (`event`, `ask/progress`) never wait ([`Outbound::notify`]): they come
//!   from tasks that must not stall on one client (the event forwarder, an `ask` holding its
//!   repository's conversation). More than [`NOTIFICATIONS`] of them unwritten means the client
//!   is not reading at all: it is disconnected, once, with a logged reason, and its asks are
//!   cancelled (docs/protocol.md, "Connection lifecycle").

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Bytes of responses queued for one connection: enough for thousands of ordinary answers,
/// small enough that a thousand stuck clients stay within a few GiB at worst.
pub(crate) const REPLY_BYTES: usize = 4 * 1024 * 1024;
/// Notifications queued for one connection before it counts as not reading: the size of the
/// event broadcast buffer, so a subscriber that keeps up with events is never cut off.
pub(crate) const NOTIFICATIONS: usize = 1024;

/// One line for the writer; its permit returns the room it took once it is written.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) line: Vec<u8>,
    _room: OwnedSemaphorePermit,
}

/// The sending side, cloned into every task that answers or notifies this connection.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    conn: u64,
    tx: mpsc::UnboundedSender<Queued>,
    replies: Arc<Semaphore>,
    notifications: Arc<Semaphore>,
    /// Cancelled when the client is disconnected for not reading: the writer abandons what is
    /// queued instead of flushing it.
    dropped: CancellationToken,
    /// The connection's own token (ends its reader, event forwarder and asks).
    closed: CancellationToken,
}

impl Outbound {
    /// A queue for connection `conn`, whose reader, forwarder and asks stop on `closed`; the
    /// receiver goes to the writer task.
    pub(crate) fn new(
        conn: u64,
        closed: CancellationToken,
    ) -> (Outbound, mpsc::UnboundedReceiver<Queued>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let out = Outbound {
            conn,
            tx,
            replies: Arc::new(Semaphore::new(REPLY_BYTES)),
            notifications: Arc::new(Semaphore::new(NOTIFICATIONS)),
            dropped: CancellationToken::new(),
            closed,
        };
        (out, rx)
    }

    /// Queue a response, waiting for room; false once the connection is gone.
    pub(crate) async fn respond(&self, line: Vec<u8>) -> bool {
        let room = u32::try_from(line.len().clamp(1, REPLY_BYTES))
            .expect("REPLY_BYTES fits a semaphore's u32 permits");
        let permit = tokio::select! {
            p = self.replies.clone().acquire_many_owned(room) => p,
            () = self.dropped.cancelled() => return false,
        };
        match permit {
            Ok(room) => self.tx.send(Queued { line, _room: room }).is_ok(),
            Err(_) => false,
        }
    }

    /// Queue a notification without waiting; a client this far behind is disconnected. False
    /// when the line was not queued.
    pub(crate) fn notify(&self, line: Vec<u8>) -> bool {
        match self.notifications.clone().try_acquire_owned() {
            Ok(room) => self.tx.send(Queued { line, _room: room }).is_ok(),
            Err(TryAcquireError::NoPermits) => {
                if !self.dropped.is_cancelled() {
                    warn!(
                        conn = self.conn,
                        unwritten = NOTIFICATIONS,
                        "client is not reading its socket: disconnecting it (its asks are cancelled)"
                    );
                    self.dropped.cancel();
                    self.closed.cancel();
                }
                false
            }
            Err(TryAcquireError::Closed) => false,
        }
    }

    /// Resolves once the client was disconnected for not reading.
    pub(crate) async fn dropped(&self) {
        self.dropped.cancelled().await;
    }

    /// The token the writer watches (it must not hold a sender, or the queue never closes).
    pub(crate) fn dropped_token(&self) -> CancellationToken {
        self.dropped.clone()
    }

    #[cfg(test)]
    pub(crate) fn is_dropped(&self) -> bool {
        self.dropped.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn responses_wait_for_room_and_notifications_past_the_budget_disconnect_once() {
        let closed = CancellationToken::new();
        let (out, mut rx) = Outbound::new(7, closed.clone());
        // Responses fill the byte budget; the next one waits until the writer takes one.
        assert!(out.respond(vec![b'a'; REPLY_BYTES - 10]).await);
        assert!(out.respond(vec![b'b'; 10]).await);
        let waiting = tokio::spawn({
            let out = out.clone();
            async move { out.respond(vec![b'c'; 5]).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no room: the response waits");
        let first = rx.recv().await.expect("queued");
        assert_eq!(first.line.len(), REPLY_BYTES - 10);
        drop(first);
        assert!(waiting.await.expect("joins"), "room came back");

        // Notifications have their own budget: full responses never refuse one.
        for _ in 0..NOTIFICATIONS {
            assert!(out.notify(b"n\n".to_vec()));
        }
        assert!(!out.is_dropped());
        assert!(!out.notify(b"n\n".to_vec()), "one too many");
        assert!(out.is_dropped() && closed.is_cancelled());
        // Once dropped, waiting responses give up instead of waiting forever.
        assert!(!out.respond(vec![b'd'; REPLY_BYTES]).await);
    }

    #[tokio::test]
    async fn a_line_larger_than_the_budget_goes_alone() {
        let (out, mut rx) = Outbound::new(1, CancellationToken::new());
        assert!(out.respond(vec![b'x'; 3 * REPLY_BYTES]).await);
        let big = rx.recv().await.expect("queued");
        assert_eq!(big.line.len(), 3 * REPLY_BYTES);
        let next = tokio::spawn({
            let out = out.clone();
            async move { out.respond(b"y\n".to_vec()).await }
        });
        tokio::task::yield_now().await;
        assert!(!next.is_finished(), "the big line holds the whole budget");
        drop(big);
        assert!(next.await.expect("joins"));
    }
}
