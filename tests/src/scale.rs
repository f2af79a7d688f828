//! Large and many watched repositories against one real `sparkd`: the shared driver of
//! `suite::scale` (the CI smoke) and `bench/scale.rs` (one 300,000-file repository beside nine
//! of 10,000). docs/RELIABILITY.md, "Scale".
//!
//! [`generate`] writes and commits a repository of source files, 30 to a directory.
//! [`run`] starts the `sparkd` binary (the caller's build profile) with the fake provider,
//! watches the big repository and then the small ones over one client while a second client
//! asks for `status` every few milliseconds, and records each `status` latency during the
//! initial index and when each repository first reports itself indexed. Once all are indexed
//! it reads the daemon's memory and the inotify watches the kernel counts for it (fdinfo),
//! then times context assembly of `ask` on the big repository (the daemon's own
//! request-in → `response.create`-out time), with a focus file and with the file picked from a
//! name in the prompt, and checks the provider was sent the right file.
//!
//! [`ScaleOptions::watch_limit`] sets the daemon's simulated kernel watch limit
//! (`SPARK_TEST_INOTIFY_WATCHES`, debug builds only); the small repositories are then watched
//! first, so the big one is the one that runs out and must say so in `status`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use spark_proto::methods::{Ask, AskParams, Focus, RepoStatus, Status, Watch, WatchParams};

use crate::fake_provider::{Script, Turn};
use crate::real_daemon::{RealDaemon, RssSampler, rss_kib};
use crate::{Provider, TestRepo};

/// Files per directory in generated repositories.
pub const FILES_PER_DIR: usize = 30;
/// Lines per generated file (each `pub fn f<seed>_<file>_<line>() -> u32 { <line> }`).
pub const LINES: usize = 8;

/// What one scale run does.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub big_files: usize,
    pub small_repos: usize,
    pub small_files: usize,
    /// `ask`s timed per context-assembly case (after one warm-up).
    pub asks: usize,
    /// Simulated kernel inotify watch limit for the daemon (debug builds).
    pub watch_limit: Option<usize>,
    /// How long a `status` client waits between requests during the index.
    pub status_every: Duration,
    /// The whole index must be done within this.
    pub deadline: Duration,
    /// After the asks, wait this long (past the daemon's idle release of a large repository's
    /// git index) and sample `VmRSS` again.
    pub idle_wait: Option<Duration>,
}

impl ScaleOptions {
    /// One repository of `big_files` beside `small_repos` of `small_files`.
    pub fn new(big_files: usize, small_repos: usize, small_files: usize) -> ScaleOptions {
        ScaleOptions {
            big_files,
            small_repos,
            small_files,
            asks: 100,
            watch_limit: None,
            status_every: Duration::from_millis(5),
            deadline: Duration::from_secs(600),
            idle_wait: None,
        }
    }
}

/// One repository's index, as `status` told it.
#[derive(Debug, Clone)]
pub struct Indexed {
    pub files_generated: usize,
    pub dirs_generated: usize,
    /// From the `watch` request to the first `status` that showed it indexed.
    pub after: Duration,
    pub status: RepoStatus,
}

/// What a scale run saw.
#[derive(Debug)]
pub struct ScaleReport {
    /// The big repository first, then the small ones.
    pub repos: Vec<Indexed>,
    /// From the first `watch` until every repository was indexed.
    pub all_indexed: Duration,
    /// `status` round trips while at least one repository was not indexed yet.
    pub status_during_index: Vec<Duration>,
    pub rss_start_kib: u64,
    pub rss_indexed_kib: u64,
    pub rss_peak_kib: u64,
    pub hwm_kib: u64,
    /// inotify watches the kernel counts for the daemon once everything is indexed.
    pub kernel_watches: usize,
    /// Context assembly (ms) on the big repository with a focus file.
    pub assembly_focus_ms: Vec<f64>,
    /// Context assembly (ms) on the big repository, the file picked from a name in the prompt.
    pub assembly_pick_ms: Vec<f64>,
    /// `VmRSS` after the asks with a focus file, and after all asks.
    pub rss_after_focus_kib: u64,
    pub rss_after_asks_kib: u64,
    /// `VmRSS` after [`ScaleOptions::idle_wait`] without requests (0 without the wait).
    pub rss_idle_kib: u64,
}

impl ScaleReport {
    /// The `q` quantile of `v` (sorted here).
    pub fn quantile(v: &[f64], q: f64) -> f64 {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    }

    /// `status` round-trip quantile during the index, in ms.
    pub fn status_ms(&self, q: f64) -> f64 {
        let v: Vec<f64> = self
            .status_during_index
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        ScaleReport::quantile(&v, q)
    }
}

/// The generated file `i`'s path.
pub fn file_path(i: usize) -> String {
    let dir = i / FILES_PER_DIR;
    format!("src/m{}/d{}/f{i}.rs", dir % 100, dir / 100)
}

/// Directories of a generated repository of `files` files, its root and `src` included.
pub fn dir_count(files: usize) -> usize {
    let leaves = files.div_ceil(FILES_PER_DIR);
    2 + leaves.min(100) + leaves
}

/// inotify watches the daemon needs for a generated repository of `files` files: one per
/// directory, and git's own directory and its `info/` (the index lock, `info/exclude`).
pub fn watches_needed(files: usize) -> usize {
    dir_count(files) + 2
}

/// A committed repository of `files` generated source files (`seed` keeps names apart).
pub fn generate(files: usize, seed: usize) -> TestRepo {
    let repo = TestRepo::empty();
    let root = repo.path();
    for i in 0..files {
        let rel = file_path(i);
        let path = root.join(&rel);
        if i % FILES_PER_DIR == 0 {
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        }
        let body: String = (0..LINES)
            .map(|l| format!("pub fn f{seed}_{i}_{l}() -> u32 {{ {l} }}\n"))
            .collect();
        std::fs::write(&path, body).expect("write file");
    }
    repo.write(".gitignore", b"target/\n");
    repo.git(&["add", "-A"]);
    repo.git(&["commit", "-q", "-m", "generated"]);
    repo
}

fn status(client: &mut sparkctl::Client) -> spark_proto::methods::StatusResult {
    client.call::<Status>(&Default::default()).expect("status")
}

fn find<'a>(s: &'a spark_proto::methods::StatusResult, repo: &TestRepo) -> Option<&'a RepoStatus> {
    let want = std::fs::canonicalize(repo.path()).expect("canonical repo path");
    s.repos.iter().find(|r| Path::new(&r.path) == want)
}

/// Run one scale case over already generated repositories (`repos[0]` the big one).
pub fn run(opts: &ScaleOptions, repos: &[TestRepo]) -> ScaleReport {
    let provider = Provider::start(Script::new().default_turn(Turn::text("ok")));
    let limit = opts.watch_limit.map(|n| n.to_string());
    let env: Vec<(&str, &str)> = limit
        .iter()
        .map(|n| ("SPARK_TEST_INOTIFY_WATCHES", n.as_str()))
        .collect();
    let daemon = RealDaemon::start_with(&provider, &env);
    let rss = RssSampler::start(daemon.pid);

    let mut watcher = daemon.home.client();
    let mut poller = daemon.home.client();
    // Watch order: the big one first, unless it is the one meant to run out of watches.
    let mut order: Vec<usize> = (0..repos.len()).collect();
    if opts.watch_limit.is_some() {
        order.rotate_left(1);
    }

    let done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let watched_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; repos.len()]));
    let (report_tx, report_rx) = std::sync::mpsc::channel();
    let poll = std::thread::scope(|scope| {
        let poll = scope.spawn({
            let done = done.clone();
            let watched_at = watched_at.clone();
            let every = opts.status_every;
            move || {
                let mut during = Vec::new();
                let mut first_indexed: Vec<Option<(Instant, RepoStatus)>> = vec![None; repos.len()];
                let (pace_tx, pace_rx) = std::sync::mpsc::channel::<()>();
                loop {
                    let t = Instant::now();
                    let s = status(&mut poller);
                    let took = t.elapsed();
                    let at = Instant::now();
                    let watched = watched_at.lock().expect("watched_at").clone();
                    for (i, repo) in repos.iter().enumerate() {
                        if first_indexed[i].is_none()
                            && watched[i].is_some()
                            && let Some(r) = find(&s, repo)
                            && r.indexed
                        {
                            first_indexed[i] = Some((at, r.clone()));
                        }
                    }
                    let all = first_indexed.iter().all(Option::is_some);
                    if !all && watched.iter().any(Option::is_some) {
                        during.push(took);
                    }
                    if all || done.load(Ordering::Acquire) {
                        let _ = report_tx.send(());
                        drop(pace_tx);
                        return (during, first_indexed);
                    }
                    // Pacing only: a client polling as an editor would, not synchronisation.
                    let _ = pace_rx.recv_timeout(every);
                }
            }
        });
        for &i in &order {
            watched_at.lock().expect("watched_at")[i] = Some(Instant::now());
            watcher
                .call::<Watch>(&WatchParams {
                    dir: repos[i].cwd(),
                })
                .expect("watch");
        }
        if report_rx.recv_timeout(opts.deadline).is_err() {
            done.store(true, Ordering::Release);
            let s = status(&mut watcher);
            panic!(
                "not every repository was indexed within {:?}: {:#?}\ndaemon log tail:\n{}",
                opts.deadline,
                s.repos,
                daemon.log_tail()
            );
        }
        poll.join().expect("status poller")
    });
    let all_indexed = start.elapsed();
    let (status_during_index, first_indexed) = poll;
    let watched = watched_at.lock().expect("watched_at").clone();
    let (rss_indexed_kib, _) = rss_kib(daemon.pid);
    let kernel_watches = daemon.inotify_watches();
    let indexed: Vec<Indexed> = first_indexed
        .into_iter()
        .zip(&watched)
        .enumerate()
        .map(|(i, (first, watched))| {
            let (at, status) = first.expect("indexed");
            let files = if i == 0 {
                opts.big_files
            } else {
                opts.small_files
            };
            Indexed {
                files_generated: files,
                dirs_generated: dir_count(files),
                after: at.duration_since(watched.expect("watched")),
                status,
            }
        })
        .collect();

    // Context assembly on the big repository.
    let big = &repos[0];
    let focus = file_path(opts.big_files / 2);
    let params = AskParams {
        cwd: big.cwd(),
        prompt: "explain this file".into(),
        focus: vec![Focus {
            path: focus.clone(),
            start_line: None,
            end_line: None,
        }],
        dry_run: false,
        new_conversation: false,
        provider: None,
        buffers: Vec::new(),
    };
    let mut ask = |params: &AskParams| {
        let mut ms = Vec::new();
        for i in 0..=opts.asks {
            let r = watcher.call::<Ask>(params).expect("ask");
            if i > 0 {
                ms.push(r.timings.request_ms);
            }
        }
        ms
    };
    let assembly_focus_ms = ask(&params);
    let (rss_after_focus_kib, _) = rss_kib(daemon.pid);
    let last = provider.fake.requests();
    let last = last.last().expect("a request");
    assert!(
        last.raw.contains(&focus),
        "the focus file went with the prompt: {}",
        last.json["input"]
    );
    // Without a focus: the daemon picks the file that defines a name the prompt mentions.
    let picked = opts.big_files / 3;
    let params = AskParams {
        prompt: format!("make f0_{picked}_3() return 1"),
        focus: Vec::new(),
        ..params
    };
    let assembly_pick_ms = ask(&params);
    let last = provider.fake.requests();
    let last = last.last().expect("a request");
    assert!(
        last.raw.contains(&file_path(picked)),
        "the file defining f0_{picked}_3 went with the prompt: {}",
        last.json["input"]
    );
    let (rss_after_asks_kib, _) = rss_kib(daemon.pid);
    let rss_idle_kib = opts.idle_wait.map_or(0, |wait| {
        // A benchmark's pause, not a synchronisation: the release is a timer in the daemon.
        std::thread::sleep(wait);
        rss_kib(daemon.pid).0
    });
    let (rss_start_kib, rss_peak_kib, hwm_kib) = rss.stop();
    daemon.stop();
    ScaleReport {
        repos: indexed,
        all_indexed,
        status_during_index,
        rss_start_kib,
        rss_indexed_kib,
        rss_peak_kib,
        hwm_kib,
        kernel_watches,
        assembly_focus_ms,
        assembly_pick_ms,
        rss_after_focus_kib,
        rss_after_asks_kib,
        rss_idle_kib,
    }
}
