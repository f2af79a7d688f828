//! `ask` latency against the fake provider: `sparkctl ask` end to end with a warm daemon
//! (WebSocket and HTTP + SSE, asks back to back; and WebSocket with the machine idle for 1 s
//! before each ask) at zero model latency, the daemon's own time from request in to
//! `response.create` on the wire, bytes per continued turn, and — with the model streaming at
//! 1000 tokens/s — how long after the first delta the client shows the first token.
//!
//! Run: `cargo bench -p spark-tests --bench ask` (optionally `-- <iterations>`).
//! Writes `bench/out/ask.json`.

use std::time::{Duration, Instant};

use spark_proto::methods::{Ask, AskEvent, AskParams, AskProgress, Focus};
use spark_tests::fake_provider::{Script, Turn};
use spark_tests::{Ctl, Provider, TestRepo};

const FILE: &str = "src/toggle.rs";
const UP: &str = "*** Begin Patch\n*** Update File: src/toggle.rs\n-const X: u32 = 1;\n+const X: u32 = 2;\n*** End Patch\n";
const DOWN: &str = "*** Begin Patch\n*** Update File: src/toggle.rs\n-const X: u32 = 2;\n+const X: u32 = 1;\n*** End Patch\n";

fn stats(name: &str, unit: &str, mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<58} n={:<4} p50={:>8.3}{unit} p90={:>8.3}{unit} p99={:>8.3}{unit} min={:>8.3}{unit} max={:>8.3}{unit}",
        v.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        v[0],
        v[v.len() - 1]
    );
    serde_json::json!({"case": name, "unit": unit, "n": v.len(), "p50": p(0.5), "p90": p(0.9), "p99": p(0.99), "min": v[0], "max": v[v.len() - 1]})
}

fn toggling_script(n: usize) -> Script {
    Script::new().turns((0..n).map(|i| Turn::apply_patch(if i % 2 == 0 { UP } else { DOWN })))
}

/// `sparkctl --json ask` processes against a warm daemon using `url`.
fn cli_runs(
    url_of: impl Fn(&Provider) -> String,
    label: &str,
    n: usize,
    pause: Duration,
    out: &mut Vec<serde_json::Value>,
) {
    let p = Provider::start(toggling_script(n + 1));
    let repo = TestRepo::with_files(&[(FILE, b"const X: u32 = 1;\n")]);
    let ctl = Ctl::new();
    let url = url_of(&p);
    let run = || {
        let t = Instant::now();
        let o = ctl
            .command("sparkctl")
            .current_dir(repo.path())
            .env("SPARK_PROVIDER_URL", &url)
            .env("SPARK_API_KEY", "sk-bench")
            .env("SPARK_LOG", "warn")
            .args(["--json", "ask", "-f", FILE, "toggle X"])
            .output()
            .expect("sparkctl");
        let wall = t.elapsed();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let last: serde_json::Value = serde_json::from_str(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .last()
                .expect("result line"),
        )
        .expect("json");
        assert!(last["edit"].is_string(), "{last}");
        (wall, last["timings"].clone())
    };
    run(); // starts the daemon, prewarms, first (unchained) turn
    let (mut wall, mut request, mut total, mut bytes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ttft, mut apply) = (Vec::new(), Vec::new());
    for _ in 0..n {
        // An idle machine between asks, as between a person's edits (not timed).
        std::thread::sleep(pause);
        let (w, t) = run();
        wall.push(w.as_secs_f64() * 1e3);
        request.push(t["request_ms"].as_f64().unwrap_or(0.0));
        total.push(t["total_ms"].as_f64().unwrap_or(0.0));
        bytes.push(t["bytes_sent"].as_f64().unwrap_or(0.0));
        ttft.push(t["ttft_ms"].as_f64().unwrap_or(0.0));
        apply.push(t["apply_ms"].as_f64().unwrap_or(0.0));
        assert_eq!(t["chained"], label.contains("WebSocket"), "chaining: {t}");
    }
    out.push(stats(
        &format!("sparkctl ask end to end, warm, {label}"),
        "ms",
        wall,
    ));
    out.push(stats(
        &format!("daemon: request in -> response.create out, {label}"),
        "ms",
        request,
    ));
    out.push(stats(
        &format!("daemon: response.create out -> first delta in, {label}"),
        "ms",
        ttft,
    ));
    out.push(stats(
        &format!("daemon: apply + record (with fsync), {label}"),
        "ms",
        apply,
    ));
    out.push(stats(&format!("daemon: total, {label}"), "ms", total));
    out.push(stats(
        &format!("bytes sent per continued turn, {label}"),
        "B",
        bytes,
    ));
    assert!(ctl.run(["stop"]).status.success());
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    let mut out = Vec::new();
    cli_runs(
        |p| p.fake.ws_url(),
        "WebSocket",
        n,
        Duration::ZERO,
        &mut out,
    );
    cli_runs(
        |p| p.fake.http_url(),
        "HTTP+SSE",
        n,
        Duration::ZERO,
        &mut out,
    );
    cli_runs(
        |p| p.fake.ws_url(),
        "WebSocket, 1 s idle before each ask",
        (n / 4).max(30),
        Duration::from_secs(1),
        &mut out,
    );

    // First visible token: model at 1000 tokens/s; daemon and client in this process so their
    // clocks compare. Overhead = client's first text − (request_ms + ttft_ms), where ttft_ms is
    // measured in the daemon from response.create out to the first delta in.
    let text: String = "word ".repeat(200);
    let p = Provider::start(
        Script::new().default_turn(
            Turn::text(text)
                .with_ttft(Duration::from_millis(20))
                .with_tokens_per_sec(1000.0),
        ),
    );
    let d = p.daemon(true);
    let repo = TestRepo::with_files(&[(FILE, b"const X: u32 = 1;\n")]);
    let mut c = d.client();
    let params = AskParams {
        cwd: repo.cwd(),
        prompt: "say words".into(),
        focus: vec![Focus {
            path: FILE.into(),
            start_line: None,
            end_line: None,
        }],
        dry_run: false,
        new_conversation: false,
        provider: None,
        buffers: Vec::new(),
    };
    let mut overhead = Vec::new();
    for i in 0..(n / 4).max(20) + 1 {
        let t0 = Instant::now();
        let mut first: Option<Duration> = None;
        let r = c
            .call_with::<Ask>(&params, |note| {
                if first.is_none()
                    && let Some(v) = note.params
                    && let Ok(AskProgress {
                        event: AskEvent::Text { .. },
                        ..
                    }) = serde_json::from_value::<AskProgress>(v)
                {
                    first = Some(t0.elapsed());
                }
            })
            .expect("ask");
        if i == 0 {
            continue; // the first ask also prewarms
        }
        let first = first.expect("streamed text").as_secs_f64() * 1e3;
        overhead.push(first - (r.timings.request_ms + r.timings.ttft_ms.expect("ttft")));
    }
    out.push(stats(
        "first token: client shows it this long after the daemon got it",
        "ms",
        overhead,
    ));

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/out");
    std::fs::create_dir_all(&dir).expect("mkdir bench/out");
    std::fs::write(
        dir.join("ask.json"),
        serde_json::to_string_pretty(&out).expect("json"),
    )
    .expect("write");
}
