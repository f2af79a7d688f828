//! Ctrl-C during `ask`. The first one asks the daemon to cancel the ask (over a second
//! connection: the first is busy with the ask's stream), so the ask ends with `cancelled`
//! and nothing applied, or with its edit if that had already landed; the second exits at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use signal_hook::consts::SIGINT;
use signal_hook::iterator::{Handle, Signals};
use spark_proto::methods::{Cancel, CancelParams};

use crate::client::Client;

/// Exit code of an interrupted command.
pub const INTERRUPTED: i32 = 130;

/// Cancels on Ctrl-C while it lives; afterwards Ctrl-C does nothing more.
pub struct CancelOnCtrlC {
    handle: Handle,
    hit: Arc<AtomicBool>,
    /// Until [`CancelOnCtrlC::listen`]: a Ctrl-C is caught and waits in the signal pipe.
    pending: Option<(Signals, PathBuf, String)>,
}

impl CancelOnCtrlC {
    /// Catch Ctrl-C from now on (cheap: no thread yet); once [`CancelOnCtrlC::listen`] runs, a
    /// Ctrl-C cancels the ask in flight in the repository of `cwd` through the daemon at
    /// `socket`. `None` if the handler cannot be installed (Ctrl-C then ends the process, and
    /// the daemon cancels when the connection closes).
    pub fn install(socket: PathBuf, cwd: String) -> Option<CancelOnCtrlC> {
        let signals = Signals::new([SIGINT]).ok()?;
        Some(CancelOnCtrlC {
            handle: signals.handle(),
            hit: Arc::new(AtomicBool::new(false)),
            pending: Some((signals, socket, cwd)),
        })
    }

    /// Start acting on Ctrl-C. Called once the request is written, so starting the thread
    /// overlaps with the daemon's work instead of delaying the request.
    pub fn listen(&mut self) {
        let Some((mut signals, socket, cwd)) = self.pending.take() else {
            return;
        };
        let seen = self.hit.clone();
        std::thread::spawn(move || {
            for _ in signals.forever() {
                if seen.swap(true, Ordering::SeqCst) {
                    std::process::exit(INTERRUPTED);
                }
                let sent = Client::open(&socket, "sparkctl")
                    .and_then(|(mut c, _)| c.call::<Cancel>(&CancelParams { cwd: cwd.clone() }));
                if sent.is_err() {
                    // No daemon to tell: closing our connection is the cancel.
                    std::process::exit(INTERRUPTED);
                }
            }
        });
    }

    /// Whether Ctrl-C was pressed.
    pub fn interrupted(&self) -> bool {
        self.hit.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for CancelOnCtrlC {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelOnCtrlC")
            .field("interrupted", &self.interrupted())
            .finish_non_exhaustive()
    }
}

impl Drop for CancelOnCtrlC {
    fn drop(&mut self) {
        self.handle.close();
    }
}
