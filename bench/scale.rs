//! Scale, long form: one repository of 300,000 files watched beside nine of 10,000 by one real
//! `sparkd` (the CI smoke, `suite::scale`, runs 20,000 beside two of 2,000). Prints the time to
//! first index of each, `status` latency during the initial index, the daemon's memory, the
//! inotify watches the kernel counts for it against the machine's limit, and context assembly
//! of `ask` on the big repository; writes `bench/out/scale.json`. `SPARK_SCALE_BIG`,
//! `SPARK_SCALE_SMALL_REPOS` and `SPARK_SCALE_SMALL` change the sizes.
//!
//! Run: `cargo bench -p spark-tests --bench scale` (generating the repositories takes a few
//! minutes and about 2 GB of disk under `/tmp`).

use std::time::Instant;

use spark_tests::scale::{self, ScaleOptions, ScaleReport};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let mut opts = ScaleOptions::new(
        env_or("SPARK_SCALE_BIG", 300_000),
        env_or("SPARK_SCALE_SMALL_REPOS", 9),
        env_or("SPARK_SCALE_SMALL", 10_000),
    );
    // The daemon lets go of a large repository's git index after 10 s without requests.
    opts.idle_wait = Some(std::time::Duration::from_secs(12));
    let t = Instant::now();
    let mut repos = vec![scale::generate(opts.big_files, 0)];
    println!(
        "generated and committed a {}-file repository in {:.1} s",
        opts.big_files,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    for seed in 1..=opts.small_repos {
        repos.push(scale::generate(opts.small_files, seed));
    }
    println!(
        "generated {} repositories of {} files in {:.1} s",
        opts.small_repos,
        opts.small_files,
        t.elapsed().as_secs_f64()
    );

    let r = scale::run(&opts, &repos);
    let limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    for (i, repo) in r.repos.iter().enumerate() {
        if i < 2 || i + 1 == r.repos.len() {
            println!(
                "{}: {} files, {} directories: indexed {:.2} s after `watch`; status says {} files, {} watches, degraded {:?}",
                if i == 0 { "big" } else { "small" },
                repo.files_generated,
                repo.dirs_generated,
                repo.after.as_secs_f64(),
                repo.status.files,
                repo.status.watches,
                repo.status.degraded
            );
        }
    }
    let watches: u64 = r.repos.iter().map(|x| x.status.watches).sum();
    println!(
        "all {} repositories indexed {:.2} s after the first `watch`",
        r.repos.len(),
        r.all_indexed.as_secs_f64()
    );
    println!(
        "status during the index: n={} p50={:.3} ms p99={:.3} ms max={:.3} ms",
        r.status_during_index.len(),
        r.status_ms(0.5),
        r.status_ms(0.99),
        r.status_ms(1.0)
    );
    println!(
        "memory: VmRSS {} KiB at start, {} KiB once indexed, {} KiB after the asks with a focus file, {} KiB after all asks, {} KiB after 12 s idle, peak {} KiB (VmHWM {} KiB)",
        r.rss_start_kib,
        r.rss_indexed_kib,
        r.rss_after_focus_kib,
        r.rss_after_asks_kib,
        r.rss_idle_kib,
        r.rss_peak_kib,
        r.hwm_kib
    );
    println!(
        "inotify watches: {} held (kernel's count), {watches} by `status`; this machine's fs.inotify.max_user_watches = {}",
        r.kernel_watches,
        limit.map_or("unknown".to_owned(), |l| l.to_string())
    );
    let q = ScaleReport::quantile;
    println!(
        "context assembly on the big repository, focus file: n={} p50={:.3} ms p99={:.3} ms",
        r.assembly_focus_ms.len(),
        q(&r.assembly_focus_ms, 0.5),
        q(&r.assembly_focus_ms, 0.99)
    );
    println!(
        "context assembly on the big repository, file picked from a name: n={} p50={:.3} ms p99={:.3} ms",
        r.assembly_pick_ms.len(),
        q(&r.assembly_pick_ms, 0.5),
        q(&r.assembly_pick_ms, 0.99)
    );

    let json = serde_json::json!({
        "big_files": opts.big_files, "small_repos": opts.small_repos, "small_files": opts.small_files,
        "repos": r.repos.iter().map(|x| serde_json::json!({
            "files": x.files_generated, "dirs": x.dirs_generated,
            "indexed_after_s": x.after.as_secs_f64(), "status_files": x.status.files,
            "watches": x.status.watches, "degraded": x.status.degraded,
        })).collect::<Vec<_>>(),
        "all_indexed_s": r.all_indexed.as_secs_f64(),
        "status_during_index": {"n": r.status_during_index.len(), "p50_ms": r.status_ms(0.5),
            "p99_ms": r.status_ms(0.99), "max_ms": r.status_ms(1.0)},
        "rss_kib": {"start": r.rss_start_kib, "indexed": r.rss_indexed_kib,
            "after_focus_asks": r.rss_after_focus_kib, "after_asks": r.rss_after_asks_kib, "idle_12s": r.rss_idle_kib, "peak": r.rss_peak_kib, "hwm": r.hwm_kib},
        "kernel_watches": r.kernel_watches, "status_watches": watches, "max_user_watches": limit,
        "assembly_focus": {"p50_ms": q(&r.assembly_focus_ms, 0.5), "p99_ms": q(&r.assembly_focus_ms, 0.99)},
        "assembly_pick": {"p50_ms": q(&r.assembly_pick_ms, 0.5), "p99_ms": q(&r.assembly_pick_ms, 0.99)},
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/out");
    std::fs::create_dir_all(&dir).expect("mkdir bench/out");
    std::fs::write(
        dir.join("scale.json"),
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("write bench/out/scale.json");
}
