//! The watcher's debounce as a small pure state machine (no clock, no I/O): raw notify events go
//! in with the time they arrived, a batch comes out once the tree has been quiet for a moment, or
//! at the latest after a maximum delay so continuous churn still gets indexed. While git holds
//! `.git/index.lock` (a checkout, rebase or commit rewriting many files) the batch is held back,
//! so the index sees the tree after git is done, not halfway through.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

/// Timing of one repository's debounce.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Flush once no event arrived for this long: an editor's save is a burst of events.
    pub(crate) quiet: Duration,
    /// Flush at the latest this long after the first pending event, even if events keep coming.
    pub(crate) max_delay: Duration,
    /// While `index.lock` exists, look again this often.
    pub(crate) lock_poll: Duration,
    /// Give up holding after this long: a stale lock left by a crashed git must not freeze the
    /// index forever (git itself refuses to run until the user removes it).
    pub(crate) max_hold: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            quiet: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            lock_poll: Duration::from_millis(50),
            max_hold: Duration::from_secs(30),
        }
    }
}

/// Why everything must be looked at again instead of just the changed paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rescan {
    /// The kernel queue or our channel overflowed: events were lost.
    Overflow,
    /// notify reported an error or asked for a rescan.
    Watcher(String),
    /// An ignore file that governs the whole tree changed (`.git/info/exclude`).
    Excludes,
    /// Periodic, because some directories could not be watched.
    Degraded,
    /// Asked for (a git hook after checkout, merge or rewrite).
    Requested,
}

impl std::fmt::Display for Rescan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rescan::Overflow => f.write_str("events were lost (queue overflow)"),
            Rescan::Watcher(why) => write!(f, "the watcher asked for it: {why}"),
            Rescan::Excludes => f.write_str(".git/info/exclude changed"),
            Rescan::Degraded => f.write_str("periodic rescan of a degraded watch"),
            Rescan::Requested => f.write_str("a refresh was requested"),
        }
    }
}

/// What the debounce hands over.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Batch {
    /// Absolute paths named by events, deduplicated.
    pub(crate) paths: BTreeSet<PathBuf>,
    /// Set when the whole tree must be rescanned; the first reason wins.
    pub(crate) rescan: Option<Rescan>,
}

/// What to do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Poll {
    /// Nothing pending: wait for the next event.
    Idle,
    /// Call [`Debounce::poll`] again at this instant (or when an event arrives).
    Wait(Instant),
    /// Process this batch now.
    Ready(Batch),
}

#[derive(Debug)]
pub(crate) struct Debounce {
    timing: Timing,
    pending: Batch,
    first: Option<Instant>,
    last: Option<Instant>,
    held_since: Option<Instant>,
}

impl Debounce {
    pub(crate) fn new(timing: Timing) -> Debounce {
        Debounce {
            timing,
            pending: Batch::default(),
            first: None,
            last: None,
            held_since: None,
        }
    }

    fn touch(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    pub(crate) fn push_paths(&mut self, now: Instant, paths: impl IntoIterator<Item = PathBuf>) {
        self.pending.paths.extend(paths);
        self.touch(now);
    }

    pub(crate) fn push_rescan(&mut self, now: Instant, why: Rescan) {
        self.pending.rescan.get_or_insert(why);
        self.touch(now);
    }

    /// Whether a batch is being held back for `index.lock`.
    #[cfg(test)]
    pub(crate) fn is_held(&self) -> bool {
        self.held_since.is_some()
    }

    /// Advance to `now`. `locked` is asked only once a batch would otherwise be ready, so the
    /// caller's `stat` of `index.lock` runs at most once per flush attempt.
    pub(crate) fn poll(&mut self, now: Instant, locked: impl FnOnce() -> bool) -> Poll {
        let (Some(first), Some(last)) = (self.first, self.last) else {
            return Poll::Idle;
        };
        let due = (last + self.timing.quiet).min(first + self.timing.max_delay);
        if now < due {
            return Poll::Wait(due);
        }
        if locked() {
            let since = *self.held_since.get_or_insert(now);
            if now < since + self.timing.max_hold {
                let next = (now + self.timing.lock_poll).min(since + self.timing.max_hold);
                return Poll::Wait(next);
            }
            tracing::warn!(
                held = ?self.timing.max_hold,
                "index.lock still exists; indexing the tree anyway"
            );
        }
        self.first = None;
        self.last = None;
        self.held_since = None;
        Poll::Ready(std::mem::take(&mut self.pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            quiet: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            lock_poll: Duration::from_millis(20),
            max_hold: Duration::from_secs(2),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ready(p: Poll) -> Batch {
        match p {
            Poll::Ready(b) => b,
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[test]
    fn nothing_pending_is_idle() {
        let mut d = Debounce::new(timing());
        assert_eq!(d.poll(Instant::now(), || false), Poll::Idle);
    }

    #[test]
    fn a_burst_flushes_once_after_the_quiet_period() {
        let t0 = Instant::now();
        let mut d = Debounce::new(timing());
        d.push_paths(t0, [PathBuf::from("/r/a")]);
        d.push_paths(t0 + ms(10), [PathBuf::from("/r/b"), PathBuf::from("/r/a")]);
        assert_eq!(d.poll(t0 + ms(20), || false), Poll::Wait(t0 + ms(60)));
        let b = ready(d.poll(t0 + ms(60), || false));
        assert_eq!(b.paths.len(), 2, "deduplicated");
        assert_eq!(b.rescan, None);
        assert_eq!(d.poll(t0 + ms(61), || false), Poll::Idle);
    }

    #[test]
    fn continuous_churn_flushes_at_the_maximum_delay() {
        let t0 = Instant::now();
        let mut d = Debounce::new(timing());
        // An event every 30 ms: never 50 ms of quiet.
        for i in 0..=16 {
            let now = t0 + ms(30 * i);
            d.push_paths(now, [PathBuf::from("/r/a")]);
            assert!(matches!(d.poll(now, || false), Poll::Wait(_)));
        }
        assert_eq!(d.poll(t0 + ms(480), || false), Poll::Wait(t0 + ms(500)));
        ready(d.poll(t0 + ms(500), || false));
    }

    #[test]
    fn a_rescan_keeps_its_first_reason() {
        let t0 = Instant::now();
        let mut d = Debounce::new(timing());
        d.push_rescan(t0, Rescan::Overflow);
        d.push_rescan(t0, Rescan::Excludes);
        let b = ready(d.poll(t0 + ms(50), || false));
        assert_eq!(b.rescan, Some(Rescan::Overflow));
    }

    #[test]
    fn index_lock_holds_the_batch_until_it_is_gone() {
        let t0 = Instant::now();
        let mut d = Debounce::new(timing());
        d.push_paths(t0, [PathBuf::from("/r/a")]);
        assert_eq!(d.poll(t0 + ms(50), || true), Poll::Wait(t0 + ms(70)));
        assert!(d.is_held());
        // More events while held join the same batch.
        d.push_paths(t0 + ms(60), [PathBuf::from("/r/b")]);
        assert_eq!(d.poll(t0 + ms(70), || true), Poll::Wait(t0 + ms(110)));
        assert_eq!(d.poll(t0 + ms(110), || true), Poll::Wait(t0 + ms(130)));
        let b = ready(d.poll(t0 + ms(130), || false));
        assert_eq!(b.paths.len(), 2);
        assert!(!d.is_held());
    }

    #[test]
    fn a_stale_lock_is_held_at_most_max_hold() {
        let t0 = Instant::now();
        let mut d = Debounce::new(timing());
        d.push_paths(t0, [PathBuf::from("/r/a")]);
        let mut now = t0 + ms(50);
        let mut polls = 0;
        loop {
            match d.poll(now, || true) {
                Poll::Wait(next) => now = next,
                Poll::Ready(_) => break,
                Poll::Idle => panic!("lost the batch"),
            }
            polls += 1;
        }
        assert_eq!(now, t0 + ms(50) + Duration::from_secs(2));
        assert!(polls >= 100, "{polls}");
    }

    #[test]
    fn the_lock_is_not_asked_before_the_batch_is_due() {
        let t0 = Instant::now();
        let mut d = Debounce::new(timing());
        d.push_paths(t0, [PathBuf::from("/r/a")]);
        let _ = d.poll(t0 + ms(10), || panic!("stat before due"));
    }
}
