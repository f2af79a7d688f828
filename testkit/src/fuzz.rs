//! The one fuzz runner every proptest harness shares (the proto wire layer, the daemon's
//! parsers, and the JSON-RPC layer end to end): stable Rust, no nightly `cargo fuzz`.

use std::cell::Cell;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Runs `test` on `smoke` cases (the CI smoke), or `SPARK_FUZZ_CASES` cases per round and rounds
/// for `SPARK_FUZZ_SECS` seconds (how `bench/fuzz.sh` runs the long campaign), then reports how
/// many cases ran. Each round is a fresh runner with a fresh random seed; a failure panics with
/// proptest's minimal failing input.
pub fn fuzz<S: Strategy>(
    name: &str,
    smoke: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u64 {
    let cases = std::env::var("SPARK_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(smoke);
    let budget = std::env::var("SPARK_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs);
    let start = Instant::now();
    let ran = Cell::new(0u64);
    loop {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&strategy, |value| {
            ran.set(ran.get() + 1);
            test(value)
        });
        if let Err(e) = result {
            panic!("fuzz {name}: {e}");
        }
        if budget.is_none_or(|b| start.elapsed() >= b) {
            break;
        }
    }
    eprintln!(
        "fuzz {name}: {} cases passed in {:.1}s",
        ran.get(),
        start.elapsed().as_secs_f64()
    );
    ran.get()
}
