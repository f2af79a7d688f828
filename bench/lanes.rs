//! One connection per repository (lanes off, as before lanes) against one shared connection
//! with a `stream_id` lane per repository (lanes on), side by side in one run, with 10 watched
//! repositories against the fake provider (20 ms to first token, 2000 tokens/s):
//! - warm-up: from watching the 10 repositories to all 10 prewarms answered;
//! - connections the provider holds open once warm;
//! - `ask` latency, 10 repositories asking at once (each ask in-process over the socket);
//! - a commit-message draft while every repository has an ask in flight.
//!
//! Run: `cargo bench -p spark-tests --bench lanes` (optionally `-- <rounds>`).
//! Writes `bench/out/lanes.json`.

use std::time::{Duration, Instant};

use spark_proto::methods::{
    Ask, AskParams, CommitDraft, DraftParams, Focus, Status, Watch, WatchParams,
};
use spark_tests::fake_provider::{Script, Turn};
use spark_tests::{Home, InProcess, Provider, TestRepo};

const REPOS: usize = 10;
const TTFT: Duration = Duration::from_millis(20);

fn stats(name: &str, unit: &str, mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<52} n={:<4} p50={:>8.2}{unit} p90={:>8.2}{unit} max={:>8.2}{unit}",
        v.len(),
        p(0.5),
        p(0.9),
        v[v.len() - 1]
    );
    serde_json::json!({"case": name, "unit": unit, "n": v.len(), "p50": p(0.5), "p90": p(0.9), "max": v[v.len() - 1]})
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ask_params(repo: &TestRepo, prompt: &str) -> AskParams {
    AskParams {
        cwd: repo.cwd(),
        prompt: prompt.into(),
        focus: vec![Focus {
            path: "src/lib.rs".into(),
            start_line: None,
            end_line: None,
        }],
        dry_run: false,
        new_conversation: false,
        provider: None,
        buffers: Vec::new(),
    }
}

fn run(lanes: bool, rounds: usize, out: &mut Vec<serde_json::Value>) {
    let mode = if lanes {
        "lanes on (one shared connection)"
    } else {
        "lanes off (a connection per repository)"
    };
    println!("-- {mode}");
    let p = Provider::start(
        Script::new().default_turn(
            Turn::text("All good: nothing to change here.")
                .with_ttft(TTFT)
                .with_tokens_per_sec(2000.0),
        ),
    );
    let home = Home::new();
    let mut config = home.config();
    config.provider_url = p.fake.ws_url();
    config.api_key = Some("sk-bench".into());
    config.fsync = false;
    config.lanes = lanes;
    config.log = "warn".into();
    let d = InProcess::start_with(home, config);
    let repos: Vec<TestRepo> = (0..REPOS)
        .map(|i| {
            TestRepo::with_files(&[
                (
                    "src/lib.rs",
                    format!("pub fn f{i}() -> u32 {{ {i} }}\n").as_bytes(),
                ),
                ("NOTES.md", b"notes\n"),
            ])
        })
        .collect();

    let started = Instant::now();
    let mut c = d.client();
    for r in &repos {
        c.call::<Watch>(&WatchParams { dir: r.cwd() })
            .expect("watch");
    }
    let prewarms = p.wait_for_requests(REPOS);
    // The last prewarm is answered TTFT-free; its request's arrival is what the daemon controls.
    let warm = started.elapsed();
    out.push(serde_json::json!({"mode": mode, "case": "warm-up, 10 repositories", "ms": ms(warm)}));
    println!(
        "{:<52} {:>8.2}ms",
        "warm-up: watch 10 repositories → 10 prewarms sent",
        ms(warm)
    );
    assert!(prewarms.iter().all(|r| r.is_prewarm()));
    let held = p.fake.connections_open();
    let s = c.call::<Status>(&Default::default()).expect("status");
    println!(
        "{:<52} {held} (daemon says: {} shared, {} sessions)",
        "provider connections held once warm",
        s.provider_connections
            .iter()
            .map(|x| x.connections)
            .sum::<u64>(),
        s.sessions.len()
    );
    out.push(serde_json::json!({"mode": mode, "case": "connections held", "count": held}));

    let mut latencies = Vec::new();
    let mut drafts = Vec::new();
    for round in 0..rounds {
        std::thread::scope(|scope| {
            let handles: Vec<_> = repos
                .iter()
                .map(|r| {
                    let mut c = d.client();
                    let params = ask_params(r, &format!("check f, round {round}"));
                    scope.spawn(move || {
                        let t = Instant::now();
                        c.call_with::<Ask>(&params, |_| {}).expect("ask");
                        t.elapsed()
                    })
                })
                .collect();
            // A draft while every repository has an ask in flight.
            let r = &repos[round % REPOS];
            r.write("NOTES.md", format!("notes, round {round}\n").as_bytes());
            r.git(&["add", "NOTES.md"]);
            let t = Instant::now();
            d.client()
                .call::<CommitDraft>(&DraftParams {
                    cwd: r.cwd(),
                    provider: None,
                })
                .expect("draft");
            drafts.push(ms(t.elapsed()));
            for h in handles {
                latencies.push(ms(h.join().expect("ask thread")));
            }
        });
    }
    out.push(serde_json::json!({"mode": mode, "stats": stats("ask, 10 repositories at once", "ms", latencies)}));
    out.push(serde_json::json!({"mode": mode, "stats": stats("commit draft beside 10 asks in flight", "ms", drafts)}));
    let opened = p.fake.connections_opened();
    println!("{:<52} {opened}", "provider connections opened in all");
    out.push(
        serde_json::json!({"mode": mode, "case": "connections opened in all", "count": opened}),
    );
    d.stop();
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20);
    let mut out = Vec::new();
    run(false, rounds, &mut out);
    run(true, rounds, &mut out);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/out");
    std::fs::create_dir_all(&dir).expect("bench/out");
    std::fs::write(
        dir.join("lanes.json"),
        serde_json::to_string_pretty(&out).expect("json"),
    )
    .expect("write lanes.json");
}
