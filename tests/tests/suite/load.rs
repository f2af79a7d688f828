//! Concurrent clients and slow readers against a real `sparkd` (`spark_tests::load`): 16
//! clients × 50 mixed requests (status, edit/log, edit/show, edit/apply, edit/undo, ask against
//! the fake provider) over their own sockets, some subscribed to events, while one client that
//! stopped reading its answers stays stuck for the whole run, after one that stopped reading its
//! notifications was cut off. Every reply must be the sender's own and arrive exactly once,
//! every edit be recorded once, the daemon's memory stay bounded, and everyone finish within
//! the deadline. The full 64 × 500 run is `bench/load.rs`; figures in docs/RELIABILITY.md.

use std::time::Duration;

use spark_tests::load::{self, Kind, LoadOptions};

#[test]
fn concurrent_clients_get_their_own_replies_exactly_once_while_slow_readers_stall_nobody() {
    let opts = LoadOptions {
        repos: 4,
        // A stall shows as this deadline passing, with the stuck clients named.
        deadline: Duration::from_secs(60),
        rss_limit_kib: 256 * 1024,
        ..LoadOptions::new(16, 50)
    };
    let report = load::run(&opts);
    eprintln!(
        "{} requests in {:.2?}; {} edits, {} events, {} ask/progress; daemon VmRSS {} → {} KiB (VmHWM {}); {:?}",
        report.requests,
        report.elapsed,
        report.edits,
        report.events,
        report.progress,
        report.rss_start_kib,
        report.rss_peak_kib,
        report.hwm_kib,
        report.slow
    );
    assert_eq!(report.requests, 16 * 50, "every request answered");
    for kind in Kind::ALL {
        assert!(
            report.latencies.get(&kind).is_some_and(|v| !v.is_empty()),
            "the mix exercised {}",
            kind.method()
        );
    }
    assert!(report.events > 0, "subscribers saw events");
    let slow = report.slow.expect("slow readers ran");
    assert!(slow.pipelined > 0 && slow.unread_bytes > 0, "{slow:?}");
}
