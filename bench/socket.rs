//! Local-socket latency: the `status` round trip through an already-connected `Client`
//! (in-process daemon), and a whole `sparkctl status` process against a warm real daemon.
//!
//! Run: `cargo bench -p spark-tests --bench socket` (optionally `-- <iterations>`).
//! Prints p50/p90/p99/min/max per case and writes `bench/out/socket.json`.

use std::time::{Duration, Instant};

use spark_proto::methods::{Empty, Status};
use spark_tests::{Ctl, InProcess};

fn summarize(name: &str, mut samples: Vec<Duration>) -> serde_json::Value {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{name:<44} n={:<6} p50={:>8.1}µs p90={:>8.1}µs p99={:>8.1}µs min={:>8.1}µs max={:>9.1}µs",
        samples.len(),
        us(pct(0.5)),
        us(pct(0.9)),
        us(pct(0.99)),
        us(samples[0]),
        us(samples[samples.len() - 1])
    );
    serde_json::json!({"case": name, "n": samples.len(), "p50_us": us(pct(0.5)), "p90_us": us(pct(0.9)),
        "p99_us": us(pct(0.99)), "min_us": us(samples[0]), "max_us": us(samples[samples.len() - 1])})
}

fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let mut results = Vec::new();

    // 1. Connected client, in-process daemon.
    let d = InProcess::start();
    let mut client = d.client();
    for _ in 0..1000 {
        client.call::<Status>(&Empty {}).expect("warm-up");
    }
    let samples = (0..iterations)
        .map(|_| {
            let t = Instant::now();
            client.call::<Status>(&Empty {}).expect("status");
            t.elapsed()
        })
        .collect();
    results.push(summarize("status via connected Client", samples));

    // Connect + initialize + status: what a hook or plugin pays per invocation.
    let samples = (0..iterations / 10)
        .map(|_| {
            let t = Instant::now();
            let mut c = d.client();
            c.call::<Status>(&Empty {}).expect("status");
            t.elapsed()
        })
        .collect();
    results.push(summarize("connect + initialize + status", samples));
    drop(client);
    d.stop();

    // 2. Whole `sparkctl status` processes against a warm real daemon.
    let ctl = Ctl::new();
    assert!(ctl.run(["status"]).status.success(), "daemon start");
    for _ in 0..20 {
        ctl.run(["status"]);
    }
    let runs = (iterations / 40).max(100);
    let samples = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let out = ctl.run(["status", "--json"]);
            let e = t.elapsed();
            assert!(out.status.success());
            e
        })
        .collect();
    results.push(summarize("`sparkctl status` process, warm daemon", samples));

    // 3. Cold: the process that finds no daemon and starts one.
    let cold_runs = 20;
    let samples = (0..cold_runs)
        .map(|_| {
            assert!(ctl.run(["stop"]).status.success());
            let t = Instant::now();
            let out = ctl.run(["status", "--json"]);
            let e = t.elapsed();
            assert!(out.status.success());
            e
        })
        .collect();
    results.push(summarize(
        "`sparkctl status` process, cold (auto-start)",
        samples,
    ));
    assert!(ctl.run(["stop"]).status.success());

    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/out");
    std::fs::create_dir_all(&out).expect("mkdir bench/out");
    let json = serde_json::to_string_pretty(&results).expect("json");
    std::fs::write(out.join("socket.json"), json).expect("write results");
}
