//! One reconnect policy per provider, shared by every session that talks to it.
//!
//! A provider that accepts connections and then drops them (a gateway that closes the
//! WebSocket with 1011 before answering) must not be hammered: each session reconnecting on
//! its own clock, with its delay reset by every successful upgrade, made ~4 connections a
//! second forever. So every connection attempt of every session of one provider (an ask, a
//! prewarm, a rotation, a reconnect after a loss) asks this policy first:
//! - a failure is a connection that could not be opened, or one that closed before any response
//!   on it completed; only a response that really completed resets the count;
//! - after a failure, the next attempt waits a capped exponential delay with full jitter, and
//!   while failing only one attempt (the probe) runs at a time, whichever session makes it;
//! - background work (re-prewarms after a loss) stops after a few failures in a row, until a
//!   request (an ask, a watch) asks again.

use std::sync::Mutex;
use std::time::Duration;

use std::time::Instant;

use super::session::backoff_delay;

/// Longer than any connection attempt takes (TCP, TLS and upgrade time out after 10 s).
const PROBE_LIMIT: Duration = Duration::from_secs(15);

/// After falling back to HTTP + SSE, WebSocket mode is tried again this much later.
pub(crate) const WEBSOCKET_RETRY: Duration = Duration::from_secs(10 * 60);

/// What the policy allows a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Connect now.
    Go,
    /// Not before this instant.
    At(Instant),
    /// Background attempts are paused after too many failures in a row; a request resumes them.
    Paused,
}

/// The policy's state, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct BackoffStatus {
    /// Failed attempts in a row (0: healthy).
    pub(crate) failures: u32,
    /// When the next attempt may start, if that is in the future.
    pub(crate) next_attempt_in: Option<Duration>,
    /// Background reconnects have stopped until the next request.
    pub(crate) paused: bool,
    pub(crate) last_error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    /// A response completed since the last failure (or ever): attempts need no probe.
    proven: bool,
    next_at: Option<Instant>,
    /// An attempt is under way while failing: others wait for its outcome (until then at
    /// most, should the session making it stop before it ends).
    probing_until: Option<Instant>,
    last_error: Option<String>,
    /// WebSocket mode failed here (a refused upgrade, or a socket dropped before its first
    /// event): sessions use HTTP + SSE until then, and try WebSocket mode again after.
    http_until: Option<Instant>,
}

/// The shared policy of one provider.
#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    max_background: u32,
    state: Mutex<State>,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration, max_background: u32) -> Backoff {
        Backoff {
            base,
            cap,
            max_background,
            state: Mutex::new(State::default()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // A panic while holding this lock cannot leave the counters inconsistent.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut state)
    }

    /// May an attempt start at `now`? `background` is an attempt no caller waits for.
    pub(crate) fn permit(&self, now: Instant, background: bool) -> Permit {
        self.with(|s| {
            if s.failures == 0 && s.proven {
                return Permit::Go;
            }
            if background && s.failures >= self.max_background {
                return Permit::Paused;
            }
            if s.probing_until.is_some_and(|t| t > now) {
                // Another session's attempt decides; look again after a base delay.
                return Permit::At(s.next_at.map_or(now, |t| t.max(now)) + self.base);
            }
            match s.next_at {
                Some(at) if at > now => Permit::At(at),
                _ => {
                    s.probing_until = Some(now + PROBE_LIMIT);
                    Permit::Go
                }
            }
        })
    }

    /// The connection opened. Over HTTP that is as far as a connection goes; a WebSocket is not
    /// a success yet (a gateway may still drop it unanswered), so its probe goes on until a
    /// response completes or it fails.
    pub(crate) fn opened(&self, websocket: bool) {
        if !websocket {
            self.with(|s| s.probing_until = None);
        }
    }

    /// The attempt's connection was closed on purpose before it proved anything.
    pub(crate) fn released(&self) {
        self.with(|s| s.probing_until = None);
    }

    /// An attempt failed: the next one waits longer.
    pub(crate) fn failed(&self, now: Instant, error: &str, unit: f64) {
        self.with(|s| {
            let delay = backoff_delay(s.failures, self.base, self.cap, unit);
            s.failures = s.failures.saturating_add(1);
            s.next_at = Some(now + delay);
            s.probing_until = None;
            s.last_error = Some(error.to_owned());
        });
    }

    /// A response completed: the provider works.
    pub(crate) fn succeeded(&self) {
        self.with(|s| {
            *s = State {
                proven: true,
                http_until: s.http_until,
                ..State::default()
            }
        });
    }

    /// WebSocket mode does not work with this provider now: HTTP + SSE for a while.
    pub(crate) fn fall_back(&self, now: Instant) {
        self.with(|s| s.http_until = Some(now + WEBSOCKET_RETRY));
    }

    /// Whether sessions should use HTTP + SSE instead of WebSocket mode at `now`.
    pub(crate) fn prefers_http(&self, now: Instant) -> bool {
        self.with(|s| s.http_until.is_some_and(|t| t > now))
    }

    pub(crate) fn status(&self, now: Instant) -> BackoffStatus {
        self.with(|s| BackoffStatus {
            failures: s.failures,
            next_attempt_in: s
                .next_at
                .filter(|t| *t > now)
                .map(|t| t.saturating_duration_since(now)),
            paused: s.failures >= self.max_background,
            last_error: s.last_error.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Backoff {
        Backoff::new(Duration::from_millis(250), Duration::from_secs(30), 3)
    }

    #[test]
    fn a_healthy_provider_is_never_held_back() {
        let b = policy();
        let now = Instant::now();
        b.succeeded();
        for _ in 0..10 {
            assert_eq!(b.permit(now, true), Permit::Go);
            b.opened(true);
        }
    }

    #[test]
    fn until_a_first_response_completes_one_websocket_probes_for_all() {
        let b = policy();
        let now = Instant::now();
        assert_eq!(b.permit(now, false), Permit::Go);
        b.opened(true);
        // Ten sessions of one provider: the others wait for the first one's answer.
        for _ in 0..9 {
            assert!(matches!(b.permit(now, false), Permit::At(_)));
        }
        b.succeeded();
        assert_eq!(b.permit(now, false), Permit::Go);
    }

    #[test]
    fn failures_space_attempts_out_and_only_a_completed_response_resets() {
        let b = policy();
        let t0 = Instant::now();
        b.failed(t0, "closed 1011", 1.0);
        // Full jitter with the unit at 1: the ceiling, base × 2^0.
        assert_eq!(
            b.permit(t0, false),
            Permit::At(t0 + Duration::from_millis(250))
        );
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(b.permit(t1, false), Permit::Go);
        // While that probe runs, nobody else connects.
        assert!(matches!(b.permit(t1, false), Permit::At(_)));
        // An upgrade that then closes unanswered is still a failure, and waits longer.
        b.opened(true);
        b.failed(t1, "closed 1011", 1.0);
        assert_eq!(
            b.permit(t1, false),
            Permit::At(t1 + Duration::from_millis(500))
        );
        b.succeeded();
        assert_eq!(b.permit(t1, true), Permit::Go);
        assert_eq!(b.permit(t1, true), Permit::Go);
        assert_eq!(b.status(t1), BackoffStatus::default());
    }

    #[test]
    fn background_attempts_pause_after_a_few_failures_and_requests_still_get_through() {
        let b = policy();
        let mut now = Instant::now();
        for _ in 0..3 {
            b.failed(now, "refused", 1.0);
            now += Duration::from_secs(60);
        }
        assert_eq!(b.permit(now, true), Permit::Paused);
        assert_eq!(b.permit(now, false), Permit::Go);
        let status = b.status(now);
        assert!(status.paused && status.failures == 3);
        assert_eq!(status.last_error.as_deref(), Some("refused"));
    }

    #[test]
    fn a_fallback_to_http_lasts_a_while_and_then_websocket_mode_is_tried_again() {
        let b = policy();
        let now = Instant::now();
        assert!(!b.prefers_http(now));
        b.fall_back(now);
        b.succeeded();
        assert!(b.prefers_http(now + Duration::from_secs(60)));
        assert!(!b.prefers_http(now + WEBSOCKET_RETRY));
    }

    #[test]
    fn delays_are_capped() {
        let b = policy();
        let now = Instant::now();
        for _ in 0..40 {
            b.failed(now, "refused", 1.0);
        }
        assert_eq!(
            b.permit(now, false),
            Permit::At(now + Duration::from_secs(30))
        );
    }
}
