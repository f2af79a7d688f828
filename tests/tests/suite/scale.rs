//! Many watched repositories against a real `sparkd` (`spark_tests::scale`), CI size: one of
//! 20,000 files beside two of 2,000. Each must be indexed in full, `status` must answer
//! throughout, the watches `status` reports must be exactly the ones the kernel counts for the
//! daemon, and `ask` must find its context on the big repository. When the watch limit runs
//! out, the repository that could not be watched in full says so in `status` and is served
//! anyway. The full 300,000 + 9 × 10,000 run is `bench/scale.rs`; figures in
//! docs/RELIABILITY.md, "Scale".

use spark_tests::TestRepo;
use spark_tests::scale::{self, ScaleOptions, ScaleReport};

const BIG: usize = 20_000;
const SMALL: usize = 2_000;

fn repos() -> Vec<TestRepo> {
    vec![
        scale::generate(BIG, 0),
        scale::generate(SMALL, 1),
        scale::generate(SMALL, 2),
    ]
}

fn options() -> ScaleOptions {
    ScaleOptions {
        asks: 5,
        ..ScaleOptions::new(BIG, 2, SMALL)
    }
}

fn describe(r: &ScaleReport) {
    for repo in &r.repos {
        eprintln!(
            "{} files / {} dirs generated: indexed after {:.2?}; status: {} files, {} watches, degraded {:?}",
            repo.files_generated,
            repo.dirs_generated,
            repo.after,
            repo.status.files,
            repo.status.watches,
            repo.status.degraded
        );
    }
    eprintln!(
        "status during the index: n={} p50={:.2} ms max={:.2} ms; VmRSS {} → {} KiB indexed (peak {}); kernel watches {}",
        r.status_during_index.len(),
        r.status_ms(0.5),
        r.status_ms(1.0),
        r.rss_start_kib,
        r.rss_indexed_kib,
        r.rss_peak_kib,
        r.kernel_watches
    );
}

#[test]
fn every_repository_is_indexed_in_full_and_the_kernel_holds_exactly_the_watches_status_reports() {
    let repos = repos();
    let r = scale::run(&options(), &repos);
    describe(&r);
    for repo in &r.repos {
        assert_eq!(
            repo.status.files as usize,
            repo.files_generated + 1,
            "every generated file and the .gitignore indexed"
        );
        assert_eq!(
            repo.status.watches as usize,
            scale::watches_needed(repo.files_generated),
            "one watch per directory, and two in .git"
        );
        assert_eq!(repo.status.degraded, None);
    }
    let watches: u64 = r.repos.iter().map(|x| x.status.watches).sum();
    assert_eq!(
        r.kernel_watches as u64, watches,
        "status tells the kernel's count"
    );
    assert_eq!(r.assembly_focus_ms.len(), 5);
    assert!(
        r.rss_peak_kib < 512 * 1024,
        "the daemon's memory stays bounded: peak VmRSS {} KiB",
        r.rss_peak_kib
    );
}

#[test]
fn a_repository_past_the_watch_limit_says_so_in_status_and_is_still_indexed_and_served() {
    let repos = repos();
    let small_watches = 2 * scale::watches_needed(SMALL);
    let big_needed = scale::watches_needed(BIG);
    let limit = small_watches + big_needed / 2;
    let r = scale::run(
        &ScaleOptions {
            watch_limit: Some(limit),
            ..options()
        },
        &repos,
    );
    describe(&r);
    // The small repositories were watched first and have all they need.
    for small in &r.repos[1..] {
        assert_eq!(
            small.status.watches as usize,
            scale::watches_needed(small.files_generated)
        );
        assert_eq!(small.status.degraded, None);
    }
    let big = &r.repos[0];
    assert_eq!(big.status.files as usize, BIG + 1, "indexed in full anyway");
    assert_eq!(big.status.watches as usize, limit - small_watches);
    let unwatched = big_needed - (limit - small_watches);
    let why = big.status.degraded.as_deref().expect("degraded");
    assert!(
        why.starts_with(&format!(
            "{unwatched} directories could not be watched (the inotify watch limit fs.inotify.max_user_watches is reached); changes there are seen only by periodic rescans"
        )),
        "{why}"
    );
    assert!(
        why.contains("hint: raise the limit, e.g. `sudo sysctl fs.inotify.max_user_watches="),
        "{why}"
    );
    assert_eq!(
        r.kernel_watches, limit,
        "the kernel holds exactly the limit"
    );
    // `scale::run` also checked that asks on the degraded repository got their context.
}
