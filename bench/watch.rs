//! Watching and context cost on repositories of 10,000 files: cold index (with and without the
//! sled cache), warm restart (cache present), context assembly for an ask on a watched
//! repository (daemon-side request in -> `response.create` out), and the idle daemon's RSS and
//! CPU with ten such repositories watched.
//!
//! Run: `cargo bench -p spark-tests --bench watch` (optionally `-- <repos>`, default 10).
//! Writes `bench/out/watch.json`.

use std::time::{Duration, Instant};

use spark_proto::methods::{Ask, AskParams, Focus, Watch, WatchParams};
use spark_tests::fake_provider::{Script, Turn};
use spark_tests::{Ctl, Provider, TestRepo};

const FILES: usize = 10_000;

fn generate(seed: usize) -> TestRepo {
    let repo = TestRepo::empty();
    for i in 0..FILES {
        let body: String = (0..40)
            .map(|l| format!("pub fn f{seed}_{i}_{l}() -> u32 {{ {l} }}\n"))
            .collect();
        repo.write(
            &format!("src/m{}/d{}/f{i}.rs", i % 20, i % 97),
            body.as_bytes(),
        );
    }
    repo.write(".gitignore", b"target/\n");
    repo.git(&["add", "-A"]);
    repo.git(&["commit", "-q", "-m", "10k files"]);
    repo
}

fn p50(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn proc_field(pid: i32, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn main() {
    let repos_n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let mut results = Vec::new();

    let t = Instant::now();
    let repo = generate(0);
    println!(
        "generated a {FILES}-file repository in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // 1. Index cost, as `watch` does it.
    let cache = tempfile::tempdir().expect("cache dir");
    let (mut cold_nocache, mut cold_cache, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        let r = sparkd::bench::index_repo(repo.path(), None).expect("index");
        cold_nocache.push(r.elapsed.as_secs_f64() * 1e3);
        let dir = cache.path().join(format!("c{}", cold_cache.len()));
        let r = sparkd::bench::index_repo(repo.path(), Some(&dir)).expect("index");
        cold_cache.push(r.elapsed.as_secs_f64() * 1e3);
        let r = sparkd::bench::index_repo(repo.path(), Some(&dir)).expect("index again");
        warm.push(r.elapsed.as_secs_f64() * 1e3);
        assert!(r.files >= FILES);
    }
    let (a, b, c) = (p50(&mut cold_nocache), p50(&mut cold_cache), p50(&mut warm));
    println!(
        "index {FILES} files: cold without cache p50 {a:.0} ms, cold with sled p50 {b:.0} ms, warm restart (cache present) p50 {c:.0} ms"
    );
    results.push(serde_json::json!({"case": "index 10k files", "cold_no_cache_ms": a, "cold_sled_ms": b, "warm_restart_ms": c}));

    // 2. Context assembly for an ask on a watched 10k-file repository.
    let p = Provider::start(Script::new().default_turn(Turn::text("ok")));
    let d = p.daemon(true);
    let mut client = d.client();
    client
        .call::<Watch>(&WatchParams { dir: repo.cwd() })
        .expect("watch");
    let params = AskParams {
        cwd: repo.cwd(),
        prompt: "explain f7".into(),
        focus: vec![Focus {
            path: "src/m7/d7/f7.rs".into(),
            start_line: None,
            end_line: None,
        }],
        dry_run: false,
        new_conversation: false,
        provider: None,
        buffers: Vec::new(),
    };
    let mut assembly = Vec::new();
    for i in 0..201 {
        let r = client.call::<Ask>(&params).expect("ask");
        if i > 0 {
            assembly.push(r.timings.request_ms);
        }
    }
    let mut sorted = assembly.clone();
    let a50 = p50(&mut sorted);
    let a99 = sorted[(sorted.len() as f64 * 0.99) as usize - 1];
    println!(
        "context assembly on a watched {FILES}-file repo (request in -> response.create out): p50 {a50:.3} ms, p99 {a99:.3} ms"
    );
    results.push(serde_json::json!({"case": "context assembly, watched 10k repo", "p50_ms": a50, "p99_ms": a99}));
    // Without -f: the daemon picks the file defining the name the prompt mentions (in a
    // repository this large, from 4-byte hashes of the names).
    let params = AskParams {
        prompt: "make f0_7_3() return 1".into(),
        focus: vec![],
        ..params
    };
    let mut picked = Vec::new();
    for i in 0..201 {
        let r = client.call::<Ask>(&params).expect("ask");
        if i > 0 {
            picked.push(r.timings.request_ms);
        }
    }
    let sent = p.fake.requests();
    let last = sent.last().expect("a request");
    assert!(
        last.raw.contains("src/m7/d7/f7.rs"),
        "the file defining f0_7_3 went with the prompt: {}",
        last.json["input"]
    );
    picked.sort_by(f64::total_cmp);
    let (b50, b99) = (
        picked[picked.len() / 2],
        picked[picked.len() * 99 / 100 - 1],
    );
    println!(
        "context assembly without -f (the daemon picks the file defining a name in the prompt): p50 {b50:.3} ms, p99 {b99:.3} ms"
    );
    results.push(serde_json::json!({"case": "context assembly without focus, watched 10k repo", "p50_ms": b50, "p99_ms": b99}));
    drop(client);
    d.stop();

    // 3. Idle daemon with `repos_n` such repositories watched: RSS and CPU.
    let mut repos = vec![repo];
    let t = Instant::now();
    for seed in 1..repos_n {
        repos.push(generate(seed));
    }
    println!(
        "generated {} more repositories in {:.1}s",
        repos_n - 1,
        t.elapsed().as_secs_f64()
    );
    let ctl = Ctl::new();
    // Builds the binaries if needed and starts the daemon, outside the timed loop.
    assert!(ctl.run(["status"]).status.success());
    let t = Instant::now();
    let mut per_repo = Vec::new();
    for r in &repos {
        let one = Instant::now();
        let out = ctl
            .command("sparkctl")
            .current_dir(r.path())
            .args(["watch"])
            .env("SPARK_LOG", "warn")
            .output()
            .expect("watch");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        per_repo.push(one.elapsed().as_secs_f64() * 1e3);
    }
    let watch_all = t.elapsed();
    println!("sparkctl watch per repository (ms, in order): {per_repo:.0?}");
    let pid = ctl.daemon_pid().expect("daemon pid");
    let settle = Duration::from_secs(3);
    std::thread::sleep(settle); // let the cache flush finish: we measure idleness, not a race
    let before = cpu_ticks(pid);
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let ticks = cpu_ticks(pid) - before;
    let rss_kb = proc_field(pid, "status", "VmRSS:").unwrap_or(0);
    let hz = 100.0;
    let cpu_pct = ticks as f64 / hz / window.as_secs_f64() * 100.0;
    println!(
        "idle daemon, {repos_n} watched repos of {FILES} files: RSS {:.1} MB, CPU {cpu_pct:.2}% over {}s ({} ticks); watching all took {:.1}s",
        rss_kb as f64 / 1024.0,
        window.as_secs(),
        ticks,
        watch_all.as_secs_f64()
    );
    results.push(serde_json::json!({"case": "idle with watched repos", "repos": repos_n, "files_each": FILES,
        "rss_mb": rss_kb as f64 / 1024.0, "cpu_percent": cpu_pct, "window_s": window.as_secs(), "watch_all_s": watch_all.as_secs_f64()}));
    assert!(ctl.run(["stop"]).status.success());

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/out");
    std::fs::create_dir_all(&dir).expect("mkdir bench/out");
    std::fs::write(
        dir.join("watch.json"),
        serde_json::to_string_pretty(&results).expect("json"),
    )
    .expect("write");
}
