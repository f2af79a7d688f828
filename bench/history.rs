//! Local history's cost on a repository of 10,000 files: the daemon work one settled save adds
//! (read, hash, blob, trees, commit, ref), the same for a save that changed nothing, and a
//! simulated working day (thousands of saves over a working set, the clock moving on) against
//! the retention budget, then two weeks later, when age pruning has dropped that day.
//!
//! Run: `cargo bench -p spark-tests --bench history` (optionally `-- <saves>`, default 3000).
//! Writes `bench/out/history.json`.

use std::time::{Duration, Instant};

use spark_tests::TestRepo;
use sparkd::bench::{HistoryRepo, HistorySettings};

const FILES: usize = 10_000;
/// Files a day's saves go to: a working set, as when editing a feature.
const WORKING_SET: usize = 40;
const DAY_MS: i64 = 8 * 3600 * 1000;

fn generate() -> TestRepo {
    let repo = TestRepo::empty();
    for i in 0..FILES {
        repo.write(&format!("src/m{}/d{}/f{i}.rs", i % 20, i % 97), &body(i, 0));
    }
    repo.git(&["add", "-A"]);
    repo.git(&["commit", "-q", "-m", "10k files"]);
    repo
}

/// A ~3 KB source file; `rev` changes one line in the middle, as a save does.
fn body(i: usize, rev: usize) -> Vec<u8> {
    (0..80)
        .map(|l| {
            if l == 40 {
                format!("pub fn edited_{i}() -> u32 {{ {rev} }}\n")
            } else {
                format!("pub fn f{i}_{l}() -> u32 {{ {l} }}\n")
            }
        })
        .collect::<String>()
        .into_bytes()
}

fn path(i: usize) -> String {
    format!("src/m{}/d{}/f{i}.rs", i % 20, i % 97)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// This thread's time on a CPU so far, in ms (the scheduler's own account): on a shared
/// machine it measures the work a save costs, where wall time also counts waiting for a core.
fn cpu_ms() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e6)
}

fn du(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                use std::os::unix::fs::MetadataExt;
                total += m.blocks() * 512;
            }
        }
    }
    total
}

fn main() {
    let saves: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3000);
    let t = Instant::now();
    let repo = generate();
    println!(
        "generated a {FILES}-file repository in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let objects_before = du(&repo.path().join(".git/objects"));
    let settings = HistorySettings {
        max_bytes: 500 * 1024 * 1024,
        max_age: Duration::from_secs(14 * 24 * 3600),
        segment_snapshots: 256,
        clock_offset_ms: 0,
    };
    let mut h = HistoryRepo::open(repo.path(), &settings).expect("open");

    // A simulated day: saves spread over eight hours, round-robin over the working set.
    let mut save_ms = Vec::with_capacity(saves);
    let mut save_cpu_ms = Vec::with_capacity(saves);
    let mut unchanged_ms = Vec::new();
    let day = Instant::now();
    for n in 0..saves {
        let i = (n * 7) % WORKING_SET * (FILES / WORKING_SET);
        repo.write(&path(i), &body(i, n + 1));
        h.set_clock_offset_ms(DAY_MS * n as i64 / saves as i64);
        let (t, cpu) = (Instant::now(), cpu_ms());
        let wrote = h.snapshot(&[path(i)]).expect("snapshot");
        save_ms.push(t.elapsed().as_secs_f64() * 1e3);
        save_cpu_ms.push(cpu_ms() - cpu);
        assert!(wrote, "a changed file makes a snapshot");
        if n % 10 == 0 {
            let t = Instant::now();
            let wrote = h.snapshot(&[path(i)]).expect("snapshot");
            unchanged_ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(!wrote, "an unchanged file makes none");
        }
    }
    let day_s = day.elapsed().as_secs_f64();
    let segments = h.segments().expect("segments");
    let kept_bytes: u64 = segments.iter().map(|s| s.1).sum();
    let objects_day = du(&repo.path().join(".git/objects"));
    let p50 = pct(&mut save_ms, 0.5);
    let p99 = pct(&mut save_ms, 0.99);
    let u50 = pct(&mut unchanged_ms, 0.5);
    let c50 = pct(&mut save_cpu_ms, 0.5);
    let c99 = pct(&mut save_cpu_ms, 0.99);
    println!(
        "one-file save: wall p50 {p50:.3} ms, p99 {p99:.3} ms; on-CPU p50 {c50:.3} ms, p99 {c99:.3} ms; unchanged file: p50 {u50:.3} ms ({saves} saves in {day_s:.1}s)"
    );
    println!(
        "after the day: {} closed segments, {:.1} KiB of contents counted against the budget of {} MiB; .git/objects grew {:.1} MiB (loose objects, until git gc packs them)",
        segments.len(),
        kept_bytes as f64 / 1024.0,
        settings.max_bytes / (1024 * 1024),
        (objects_day - objects_before) as f64 / 1_048_576.0
    );

    // Two weeks and a day later, one save: the day's segments are older than the limit.
    h.set_clock_offset_ms(15 * 24 * 3600 * 1000);
    repo.write(&path(0), &body(0, saves + 1));
    let t = Instant::now();
    h.snapshot(&[path(0)]).expect("snapshot");
    let prune_ms = t.elapsed().as_secs_f64() * 1e3;
    let left = h.segments().expect("segments");
    println!(
        "15 days later: one save with pruning took {prune_ms:.2} ms; {} closed segments left",
        left.len()
    );
    assert!(left.is_empty(), "the old day was pruned: {left:?}");

    // The same day with a 1 MiB budget: size pruning keeps the newest segments within it.
    let small = TestRepo::with_files(&[("a.txt", b"a\n")]);
    for i in 0..WORKING_SET {
        small.write(&path(i), &body(i, 0));
    }
    let tight = HistorySettings {
        max_bytes: 1024 * 1024,
        ..settings.clone()
    };
    let mut h = HistoryRepo::open(small.path(), &tight).expect("open");
    for n in 0..saves {
        let i = n % WORKING_SET;
        small.write(&path(i), &body(i, n + 1));
        h.set_clock_offset_ms(DAY_MS * n as i64 / saves as i64);
        h.snapshot(&[path(i)]).expect("snapshot");
    }
    let segs = h.segments().expect("segments");
    let counted: u64 = segs.iter().map(|s| s.1).sum();
    println!(
        "1 MiB budget: {} closed segments kept, {:.1} KiB counted",
        segs.len(),
        counted as f64 / 1024.0
    );
    assert!(counted <= tight.max_bytes, "{counted} bytes kept");

    let out = serde_json::json!({
        "files": FILES,
        "saves": saves,
        "save_p50_ms": p50,
        "save_p99_ms": p99,
        "save_cpu_p50_ms": c50,
        "save_cpu_p99_ms": c99,
        "unchanged_p50_ms": u50,
        "day_segments": segments.len(),
        "day_counted_bytes": kept_bytes,
        "day_objects_growth_bytes": objects_day - objects_before,
        "prune_save_ms": prune_ms,
        "tight_budget_segments": segs.len(),
        "tight_budget_counted_bytes": counted,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/out");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("history.json"), out.to_string());
}
