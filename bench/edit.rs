//! Edit engine cost: apply + record of a 3-file, 10-hunk edit on a repository of 10,000 files,
//! without and with fsync, side by side in one run; and patch parser throughput on a 1 MB patch.
//!
//! Run: `cargo bench -p spark-tests --bench edit` (optionally `-- <iterations>`).
//! Writes `bench/out/edit.json`.

use std::time::{Duration, Instant};

use spark_proto::methods::{ApplyParams, EditApply, EditParams, EditUndo};
use spark_tests::{Home, InProcess, TestRepo};

const FILES: usize = 10_000;
const LINES: usize = 60;

fn pct(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

fn report(name: &str, mut s: Vec<Duration>) -> serde_json::Value {
    let (p50, p90, p99) = (pct(&mut s, 0.5), pct(&mut s, 0.9), pct(&mut s, 0.99));
    println!(
        "{name:<52} n={:<5} p50={p50:>7.3}ms p90={p90:>7.3}ms p99={p99:>7.3}ms",
        s.len()
    );
    serde_json::json!({"case": name, "n": s.len(), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99})
}

fn file_text(i: usize) -> String {
    (0..LINES)
        .map(|l| format!("fn f{i}_{l}() -> u32 {{ {l} }}\n"))
        .collect()
}

/// 10 hunks over 3 files (4 + 3 + 3), each replacing one line.
fn patch() -> String {
    let mut p = String::from("*** Begin Patch\n");
    for (file, hunks) in [(11usize, 4usize), (222, 3), (3333, 3)] {
        p += &format!("*** Update File: src/d{}/f{file}.rs\n", file % 100);
        for h in 0..hunks {
            let l = 5 + h * 12;
            p += &format!(
                "@@\n fn f{file}_{}() -> u32 {{ {} }}\n-fn f{file}_{l}() -> u32 {{ {l} }}\n+fn f{file}_{l}() -> u32 {{ {l} + 1 }}\n",
                l - 1,
                l - 1
            );
        }
    }
    p + "*** End Patch\n"
}

fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let mut results = Vec::new();

    let t = Instant::now();
    let repo = TestRepo::empty();
    for i in 0..FILES {
        repo.write(
            &format!("src/d{}/f{i}.rs", i % 100),
            file_text(i).as_bytes(),
        );
    }
    repo.git(&["add", "-A"]);
    repo.git(&["commit", "-q", "-m", "10k files"]);
    println!(
        "generated a repository of {FILES} files in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    // Let the generator's writeback settle so it does not land in the first measured case.
    let _ = std::process::Command::new("sync").status();
    let patch = patch();

    for fsync in [false, true] {
        let home = Home::new();
        let mut config = home.config();
        config.fsync = fsync;
        let d = InProcess::start_with(home, config);
        let mut c = d.client();
        let (mut client_side, mut daemon_side) = (Vec::new(), Vec::new());
        for i in 0..iterations + 10 {
            let t = Instant::now();
            let r = c
                .call::<EditApply>(&ApplyParams {
                    cwd: repo.cwd(),
                    patch: patch.clone(),
                    dry_run: false,
                    source: None,
                    message: None,
                })
                .expect("apply");
            let e = t.elapsed();
            assert_eq!(r.files.len(), 3);
            c.call::<EditUndo>(&EditParams {
                cwd: repo.cwd(),
                id: None,
            })
            .expect("undo");
            if i >= 10 {
                client_side.push(e);
                daemon_side.push(Duration::from_secs_f64(r.total_ms / 1e3));
            }
        }
        let label = if fsync { "with fsync" } else { "without fsync" };
        results.push(report(
            &format!("apply+record 3 files/10 hunks, {label} (client)"),
            client_side,
        ));
        results.push(report(
            &format!("apply+record 3 files/10 hunks, {label} (daemon)"),
            daemon_side,
        ));
        d.stop();
    }

    // Parser throughput: a ~1 MB patch of many files and hunks.
    let mut big = String::from("*** Begin Patch\n");
    let mut n = 0;
    while big.len() < 1 << 20 {
        big += &format!(
            "*** Update File: src/m{n}.rs\n@@ fn ctx{n}()\n keep a\n-old line {n}\n+new line {n}\n keep b\n"
        );
        big += &format!("*** Add File: src/new{n}.rs\n+fn x() {{}}\n+fn y() {{}}\n");
        n += 1;
    }
    big += "*** End Patch\n";
    let mut samples = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let ops = sparkd::bench::parse_patch(&big).expect("parse");
        samples.push(t.elapsed());
        assert_eq!(ops, 2 * n);
    }
    samples.sort();
    let p50 = samples[samples.len() / 2];
    let mb_s = big.len() as f64 / p50.as_secs_f64() / 1e6;
    println!(
        "parse {:.2} MB patch ({} file ops): p50 {:.2} ms = {mb_s:.0} MB/s",
        big.len() as f64 / 1e6,
        2 * n,
        p50.as_secs_f64() * 1e3
    );
    results.push(serde_json::json!({"case": "parse 1 MB patch", "bytes": big.len(), "p50_ms": p50.as_secs_f64() * 1e3, "mb_per_s": mb_s}));

    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/out");
    std::fs::create_dir_all(&out).expect("mkdir bench/out");
    std::fs::write(
        out.join("edit.json"),
        serde_json::to_string_pretty(&results).expect("json"),
    )
    .expect("write");
}
