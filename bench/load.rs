//! Concurrent clients, long form: 64 clients × 500 mixed requests against a real `sparkd` with
//! the fake provider, once without and once with the two slow readers (the CI smoke,
//! `suite::load`, runs 16 × 50). Every check of `spark_tests::load` holds in both runs; this
//! prints throughput, latency p50/p99 per request kind and the daemon's peak memory, and writes
//! `bench/out/load.json`. `SPARK_LOAD_CLIENTS` and `SPARK_LOAD_REQUESTS` change the size.
//!
//! Run: `cargo bench -p spark-tests --bench load`.

use std::time::Duration;

use spark_tests::load::{self, Kind, LoadOptions, LoadReport};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Option<Duration>) -> f64 {
    d.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN)
}

fn print(name: &str, r: &LoadReport) -> serde_json::Value {
    let secs = r.elapsed.as_secs_f64();
    println!(
        "{name}: {} requests in {secs:.2} s = {:.0} req/s; {} edits, {} events, {} ask/progress; \
         daemon VmRSS {} KiB at start, peak {} KiB, VmHWM {} KiB",
        r.requests,
        r.requests as f64 / secs,
        r.edits,
        r.events,
        r.progress,
        r.rss_start_kib,
        r.rss_peak_kib,
        r.hwm_kib
    );
    if let Some(s) = &r.slow {
        println!(
            "  slow readers: notifications reader disconnected {:.0} ms after its ask; replies \
             reader blocked after {} requests, {} bytes unread in its socket",
            s.disconnected_after.as_secs_f64() * 1000.0,
            s.pipelined,
            s.unread_bytes
        );
    }
    let mut kinds = Vec::new();
    for kind in Kind::ALL {
        let n = r.latencies.get(&kind).map_or(0, Vec::len);
        let (p50, p99) = (ms(r.quantile(kind, 0.5)), ms(r.quantile(kind, 0.99)));
        println!(
            "  {:<11} n={n:<6} p50={p50:>8.2} ms  p99={p99:>8.2} ms",
            kind.method()
        );
        kinds
            .push(serde_json::json!({"kind": kind.method(), "n": n, "p50_ms": p50, "p99_ms": p99}));
    }
    serde_json::json!({
        "case": name, "requests": r.requests, "secs": secs,
        "per_sec": r.requests as f64 / secs, "edits": r.edits, "events": r.events,
        "rss_start_kib": r.rss_start_kib, "rss_peak_kib": r.rss_peak_kib, "hwm_kib": r.hwm_kib,
        "slow": r.slow.as_ref().map(|s| serde_json::json!({
            "disconnected_after_ms": s.disconnected_after.as_secs_f64() * 1000.0,
            "pipelined": s.pipelined, "unread_bytes": s.unread_bytes})),
        "kinds": kinds,
    })
}

fn main() {
    let clients = env_or("SPARK_LOAD_CLIENTS", 64);
    let requests = env_or("SPARK_LOAD_REQUESTS", 500);
    let base = LoadOptions {
        deadline: Duration::from_secs(900),
        ..LoadOptions::new(clients, requests)
    };
    println!(
        "{clients} clients × {requests} requests, {} repositories, window {}, every {}th client subscribed",
        base.repos, base.window, base.subscribe_every
    );
    let mut results = Vec::new();
    let plain = load::run(&LoadOptions {
        slow_readers: false,
        ..base.clone()
    });
    results.push(print("without slow readers", &plain));
    let slow = load::run(&base);
    results.push(print("with slow readers", &slow));

    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/out");
    std::fs::create_dir_all(&out).expect("mkdir bench/out");
    let json = serde_json::to_string_pretty(&results).expect("json");
    std::fs::write(out.join("load.json"), json).expect("write results");
}
