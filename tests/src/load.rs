//! Concurrent clients against one real `sparkd`: the shared driver of `suite::load` (the CI
//! smoke) and `bench/load.rs` (the full run). docs/RELIABILITY.md, "Concurrent clients".
//!
//! [`run`] starts the `sparkd` binary (the build profile of the caller) with the fake provider
//! and `fsync = false`, makes [`LoadOptions::repos`] repositories, and has
//! [`LoadOptions::clients`] clients each send [`LoadOptions::requests`] requests over their own
//! socket, up to [`LoadOptions::window`] at a time: `status`, `edit/log`, `edit/show` of one of
//! its own edits, `edit/apply` and `edit/undo` on a file of its own (`c<i>.txt`, one line
//! `c<i> = <n>` that only this client changes), and, for one client per repository (a newer
//! `ask` in a repository cancels the one in flight, by design), `ask`, which the fake answers
//! with the patch the prompt names. Some clients subscribe to events.
//!
//! Every reply is checked: it answers a request this connection sent and has not had answered,
//! parses as the method's result type, and names this client's repository, file, edit and line
//! (`+c<i> = <n>`); every notification parses, and `ask/progress` names an `ask` in flight on
//! the same connection. Afterwards each repository's `edit/log` holds exactly the edits the
//! clients were told about (each once, with the state they left it in), each is a commit pinned
//! under `refs/spark/pins/`, and each file holds exactly its client's last value. The daemon's
//! `VmRSS`/`VmHWM` are sampled throughout and must stay under [`LoadOptions::rss_limit_kib`];
//! all clients must finish within [`LoadOptions::deadline`], or the panic names the clients
//! still waiting and for what.
//!
//! With [`LoadOptions::slow_readers`], two clients stop reading first:
//! - **notifications**: subscribes, asks (a response of thousands of deltas) in repository 0
//!   and never reads. The daemon must disconnect it (seen as a hang-up on its socket, nothing
//!   read), cancelling its ask: nothing applied, repository 0's conversation free again.
//! - **replies**: pipelines `status` requests without reading until its socket no longer takes
//!   any, and stays so for the whole run (the daemon must keep its own memory bounded and stop
//!   reading it). After the others finish it reads again and must get every answer, in order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spark_proto::events::Event;
use spark_proto::methods::{
    AskProgress, AskResult, EditLog, EditResult, EditState, LogParams, LogResult, ShowResult,
    StatusResult,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::fake_provider::{Script, Turn};
use crate::real_daemon::{RealDaemon, RssSampler};
use crate::{Provider, TestRepo, stderr};

/// What one load run does.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub clients: usize,
    /// Requests per client (besides `initialize` and `subscribe`).
    pub requests: usize,
    pub repos: usize,
    /// Every n-th client subscribes to events (0: none does).
    pub subscribe_every: usize,
    /// Requests in flight per client at most (mutations one at a time).
    pub window: usize,
    pub slow_readers: bool,
    /// All clients done by then, or the run fails naming the stuck ones.
    pub deadline: Duration,
    /// The daemon's peak `VmRSS` (and `VmHWM`) must stay under this.
    pub rss_limit_kib: u64,
    pub seed: u64,
}

impl LoadOptions {
    /// `clients` × `requests` with the defaults for the rest.
    pub fn new(clients: usize, requests: usize) -> LoadOptions {
        LoadOptions {
            clients,
            requests,
            repos: clients.div_ceil(8).max(2),
            subscribe_every: 4,
            window: 4,
            slow_readers: true,
            deadline: Duration::from_secs(120),
            rss_limit_kib: 512 * 1024,
            seed: 0x5eed_10ad,
        }
    }
}

/// The kinds of request a client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Status,
    Log,
    Show,
    Apply,
    Undo,
    Ask,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Status,
        Kind::Log,
        Kind::Show,
        Kind::Apply,
        Kind::Undo,
        Kind::Ask,
    ];

    pub fn method(self) -> &'static str {
        match self {
            Kind::Status => "status",
            Kind::Log => "edit/log",
            Kind::Show => "edit/show",
            Kind::Apply => "edit/apply",
            Kind::Undo => "edit/undo",
            Kind::Ask => "ask",
        }
    }

    fn mutates(self) -> bool {
        matches!(self, Kind::Apply | Kind::Undo | Kind::Ask)
    }
}

/// What a run measured (it panics instead when a check fails).
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// From the first client's first request to the last client's last answer.
    pub elapsed: Duration,
    pub requests: usize,
    pub latencies: BTreeMap<Kind, Vec<Duration>>,
    pub events: usize,
    pub progress: usize,
    pub edits: usize,
    pub rss_start_kib: u64,
    pub rss_peak_kib: u64,
    pub hwm_kib: u64,
    pub slow: Option<SlowReport>,
}

impl LoadReport {
    /// The `p`-quantile (0..=1) of one kind's latencies.
    pub fn quantile(&self, kind: Kind, p: f64) -> Option<Duration> {
        let mut v = self.latencies.get(&kind)?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort();
        Some(v[((v.len() - 1) as f64 * p).round() as usize])
    }
}

/// What the two slow readers saw.
#[derive(Debug, Clone)]
pub struct SlowReport {
    /// Requests the replies reader had written when the others finished (the daemon stopped
    /// reading it there).
    pub pipelined: usize,
    /// Bytes waiting unread in its socket when the others finished.
    pub unread_bytes: u64,
    /// Time from the notifications reader's ask to its disconnection.
    pub disconnected_after: Duration,
}

/// One run: see the module documentation. Panics with a description of the first failed check.
pub fn run(opts: &LoadOptions) -> LoadReport {
    assert!(opts.clients >= 1 && opts.repos >= 1 && opts.window >= 1);
    let gate = crate::fake_provider::Gate::new();
    let provider = Provider::start(Script::new().respond_with(respond_to_load_ask(gate.clone())));
    let repos = make_repos(opts);
    let daemon = RealDaemon::start(&provider);
    let rss = RssSampler::start(daemon.pid);
    let world = Arc::new(World {
        socket: daemon.home.layout().socket,
        pid: daemon.pid,
        repos: repos
            .iter()
            .map(|r| {
                std::fs::canonicalize(r.path())
                    .expect("canonical repo path")
                    .display()
                    .to_string()
            })
            .collect(),
        clients: opts.clients,
    });

    // The notifications reader goes first and must be cut off before the others start, so
    // that repository 0's conversation, which its ask holds, is seen free again by them.
    let mut slow = None;
    let mut replies_reader = None;
    // Kept open (unread) until the others are done.
    let mut _notifications_reader = None;
    if opts.slow_readers {
        let started = Instant::now();
        _notifications_reader = Some(NotificationsReader::start(
            &world,
            &provider,
            &gate,
            opts.deadline,
        ));
        let disconnected_after = started.elapsed();
        let r = RepliesReader::start(&world);
        slow = Some(SlowReport {
            pipelined: 0,
            unread_bytes: 0,
            disconnected_after,
        });
        replies_reader = Some(r);
    }

    let started = Instant::now();
    let progress: Arc<Vec<Mutex<Progress>>> = Arc::new(
        (0..opts.clients)
            .map(|_| Mutex::new(Progress::default()))
            .collect(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    let outcome = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..opts.clients {
            let client = ClientSpec::new(i, opts);
            let (world, progress) = (world.clone(), progress.clone());
            tasks.spawn(async move { (i, run_client(client, &world, &progress[i]).await) });
        }
        let all = async {
            let mut results = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                results.push(joined.expect("client task panicked"));
            }
            results
        };
        tokio::time::timeout(opts.deadline, all).await
    });
    let elapsed = started.elapsed();
    let results = match outcome {
        Ok(results) => results,
        Err(_) => panic!(
            "deadlock or stall: not all {} clients finished within {:?}; still waiting:\n{}\ndaemon log tail:\n{}",
            opts.clients,
            opts.deadline,
            stuck_clients(&progress),
            daemon.log_tail()
        ),
    };
    let mut stats = Vec::new();
    for (i, r) in results {
        match r {
            Ok(s) => stats.push(s),
            Err(e) => panic!("client {i}: {e}\ndaemon log tail:\n{}", daemon.log_tail()),
        }
    }

    if let (Some(r), Some(s)) = (replies_reader, slow.as_mut()) {
        (s.pipelined, s.unread_bytes) = r.finish();
    }
    let edits = verify_repos(&world, &repos, &stats);
    let (rss_start_kib, rss_peak_kib, hwm_kib) = rss.stop();
    daemon.stop();
    assert!(
        rss_peak_kib < opts.rss_limit_kib && hwm_kib < opts.rss_limit_kib,
        "the daemon's memory went past {} KiB: VmRSS peak {rss_peak_kib} KiB, VmHWM {hwm_kib} KiB",
        opts.rss_limit_kib
    );

    let mut latencies: BTreeMap<Kind, Vec<Duration>> = BTreeMap::new();
    let (mut events, mut progress_seen, mut requests) = (0, 0, 0);
    for s in stats {
        for (k, v) in s.latencies {
            requests += v.len();
            latencies.entry(k).or_default().extend(v);
        }
        events += s.events;
        progress_seen += s.progress;
    }
    LoadReport {
        elapsed,
        requests,
        latencies,
        events,
        progress: progress_seen,
        edits,
        rss_start_kib,
        rss_peak_kib,
        hwm_kib,
        slow,
    }
}

// ---------------------------------------------------------------------------------------------
// The world: repositories, the fake's answers, the daemon
// ---------------------------------------------------------------------------------------------

/// What every client may look at.
#[derive(Debug)]
struct World {
    socket: PathBuf,
    pid: i32,
    /// Canonical worktree paths, as the daemon reports them.
    repos: Vec<String>,
    clients: usize,
}

impl World {
    /// The files an edit in repository `r` may touch: its clients' files, and the slow reader's.
    fn file_allowed(&self, r: usize, path: &str) -> bool {
        if r == 0 && path == SLOW_FILE {
            return true;
        }
        path.strip_prefix('c')
            .and_then(|p| p.strip_suffix(".txt"))
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|i| i < self.clients && i % self.repos.len() == r)
    }

    fn repo_index(&self, path: &str) -> Option<usize> {
        self.repos.iter().position(|r| r == path)
    }
}

/// The file the notifications reader asks about (repository 0).
const SLOW_FILE: &str = "s.txt";
const SLOW_TEXT: &str = "slow = 0\n";
/// Deltas in the answer to the notifications reader's ask: far more lines than its socket
/// buffer and the daemon's notification budget hold together.
const SLOW_DELTAS: usize = 8000;

fn file_name(i: usize) -> String {
    format!("c{i}.txt")
}

fn file_text(i: usize, value: u64) -> String {
    format!("client {i}\nc{i} = {value}\n")
}

/// The patch that moves client `i`'s line from `from` to `to`.
fn patch(i: usize, from: u64, to: u64) -> String {
    format!(
        "*** Begin Patch\n*** Update File: c{i}.txt\n@@ client {i}\n-c{i} = {from}\n+c{i} = {to}\n*** End Patch\n"
    )
}

fn make_repos(opts: &LoadOptions) -> Vec<TestRepo> {
    (0..opts.repos)
        .map(|r| {
            let mut files: Vec<(String, Vec<u8>)> = (r..opts.clients)
                .step_by(opts.repos)
                .map(|i| (file_name(i), file_text(i, 0).into_bytes()))
                .collect();
            files.push((
                "README.md".into(),
                format!("# load repo {r}\n").into_bytes(),
            ));
            if r == 0 {
                files.push((SLOW_FILE.into(), SLOW_TEXT.as_bytes().to_vec()));
            }
            let refs: Vec<(&str, &[u8])> = files
                .iter()
                .map(|(p, b)| (p.as_str(), b.as_slice()))
                .collect();
            TestRepo::with_files(&refs)
        })
        .collect()
}

/// The fake's answer to a load `ask`: the prompt ends with `LOADASK:<i>:<from>:<to>;`, and the
/// answer is that client's patch; the notifications reader's `LOADSLOW` gets a long patch,
/// held until `gate` opens.
fn respond_to_load_ask(
    gate: crate::fake_provider::Gate,
) -> impl Fn(&Value) -> Option<Turn> + Send + Sync + 'static {
    move |body| {
        // The newest user text is the last one in the input.
        let input = body.get("input").map(Value::to_string).unwrap_or_default();
        let slow = input.rfind("LOADSLOW");
        let ask = input.rfind("LOADASK:");
        match (ask, slow) {
            (Some(a), s) if s.is_none_or(|s| a > s) => {
                let marker = &input[a + "LOADASK:".len()..];
                let marker = &marker[..marker.find(';')?];
                let mut words = marker.split(':');
                let mut num = || words.next().and_then(|w| w.parse::<u64>().ok());
                let (i, from, to) = (num()?, num()?, num()?);
                Some(Turn::apply_patch(patch(i as usize, from, to)))
            }
            (_, Some(_)) => {
                let filler: String = (0..SLOW_DELTAS / 16)
                    .map(|k| format!("+filler {k:07}\n"))
                    .collect();
                let p = format!(
                    "*** Begin Patch\n*** Update File: {SLOW_FILE}\n@@\n-slow = 0\n+slow = 1\n{filler}*** End Patch\n"
                );
                Some(
                    Turn::apply_patch(p)
                        .with_delta_chars(1)
                        .with_gate(gate.clone()),
                )
            }
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The slow readers
// ---------------------------------------------------------------------------------------------

fn connect_std(world: &World) -> StdUnixStream {
    StdUnixStream::connect(&world.socket).expect("connect to sparkd")
}

fn line(v: &Value) -> Vec<u8> {
    let mut l = serde_json::to_vec(v).expect("json");
    l.push(b'\n');
    l
}

fn initialize_line(name: &str) -> Vec<u8> {
    line(
        &json!({"jsonrpc":"2.0","id":format!("{name}-init"),"method":"initialize",
        "params":{"protocol_version": spark_proto::PROTOCOL_VERSION,
                  "client":{"name":name,"version":"0"}}}),
    )
}

/// Subscribes, asks about [`SLOW_FILE`] in repository 0, and never reads.
struct NotificationsReader {
    _stream: StdUnixStream,
}

impl NotificationsReader {
    /// Returns once the daemon has hung up on it (or panics at `deadline`).
    fn start(
        world: &World,
        provider: &Provider,
        gate: &crate::fake_provider::Gate,
        deadline: Duration,
    ) -> NotificationsReader {
        let mut s = connect_std(world);
        let mut out = initialize_line("slow-notifications");
        out.extend(line(
            &json!({"jsonrpc":"2.0","id":"n-sub","method":"subscribe"}),
        ));
        out.extend(line(
            &json!({"jsonrpc":"2.0","id":"n-ask","method":"ask","params":{
            "cwd": world.repos[0], "prompt": "LOADSLOW grow s.txt",
            "focus": [{"path": SLOW_FILE}]}}),
        ));
        s.write_all(&out).expect("write the slow ask");
        // Its turn reached the provider (held there): the ask now holds repository 0's
        // conversation. Then it streams thousands of deltas into a socket nobody reads.
        let mut seen = 0;
        loop {
            let reqs = provider
                .wait_for_requests_within(seen + 1, deadline)
                .expect("the slow ask never reached the provider");
            if reqs.iter().any(|r| r.raw.contains("LOADSLOW")) {
                break;
            }
            seen = reqs.len();
        }
        gate.open();
        let hung_up = wait_hang_up(&s, deadline);
        assert!(
            hung_up,
            "the daemon never disconnected a client that stopped reading its notifications \
             (within {deadline:?}): its ask keeps repository 0's conversation"
        );
        NotificationsReader { _stream: s }
    }
}

/// Wait (at most `limit`) until the peer has closed `s`, reading nothing from it.
fn wait_hang_up(s: &StdUnixStream, limit: Duration) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let until = Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let timeout = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        // Unread data keeps `IN` set; only the hang-up says the daemon closed its side.
        let mut fds = [PollFd::new(s, PollFlags::RDHUP)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) => return false,
            Ok(_) => {
                let r = fds[0].revents();
                if r.intersects(PollFlags::HUP | PollFlags::RDHUP) {
                    return true;
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("poll: {e}"),
        }
    }
}

/// `status` requests the replies reader pipelines: their answers (over 1 KiB each) are several
/// times what the daemon queues for one connection, so it must stop reading them.
const PIPELINED: usize = 8000;

/// Pipelines [`PIPELINED`] `status` requests from a thread of its own without reading any
/// answer; reads them all at the end.
struct RepliesReader {
    stream: StdUnixStream,
    writer: std::thread::JoinHandle<std::io::Result<()>>,
    /// Requests written so far.
    written: Arc<AtomicUsize>,
}

impl RepliesReader {
    fn start(world: &World) -> RepliesReader {
        let stream = connect_std(world);
        let mut w = stream.try_clone().expect("clone the socket");
        let written = Arc::new(AtomicUsize::new(0));
        let count = written.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&initialize_line("slow-replies"))?;
            for batch in (0..PIPELINED).collect::<Vec<_>>().chunks(256) {
                let lines: Vec<u8> = batch
                    .iter()
                    .flat_map(|k| {
                        line(&json!({"jsonrpc":"2.0","id":format!("r-{k}"),"method":"status"}))
                    })
                    .collect();
                // Blocks once the daemon stops reading this connection.
                w.write_all(&lines)?;
                count.fetch_add(batch.len(), Ordering::SeqCst);
            }
            Ok(())
        });
        RepliesReader {
            stream,
            writer,
            written,
        }
    }

    /// Checks that the daemon stopped reading it (it is still blocked writing), then reads every
    /// answer: each request answered once, in order. Returns (requests it had written, bytes
    /// waiting unread in its socket).
    fn finish(self) -> (usize, u64) {
        let RepliesReader {
            stream,
            writer,
            written,
        } = self;
        let was_written = written.load(Ordering::SeqCst);
        assert!(
            !writer.is_finished(),
            "the daemon read all {PIPELINED} requests of a client that reads no answer: it \
             buffered their answers instead of pushing back"
        );
        let unread = rustix::io::ioctl_fionread(&stream).expect("FIONREAD");
        let mut r = BufReader::new(stream);
        let mut l = String::new();
        r.read_line(&mut l).expect("read initialize's answer");
        let init: Value = serde_json::from_str(&l).expect("json");
        assert_eq!(init["id"], "slow-replies-init", "{init}");
        for k in 0..PIPELINED {
            l.clear();
            let n = r.read_line(&mut l).expect("read");
            assert!(
                n > 0,
                "the replies reader lost its connection at answer {k}"
            );
            let v: Value = serde_json::from_str(&l).expect("an answer is JSON");
            assert_eq!(
                v["id"],
                format!("r-{k}"),
                "answers out of order or lost: {l}"
            );
            serde_json::from_value::<StatusResult>(v["result"].clone())
                .unwrap_or_else(|e| panic!("a status answer: {e}: {l}"));
        }
        writer
            .join()
            .expect("the replies reader's writer")
            .expect("every request written");
        r.get_mut()
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let mut tail = Vec::new();
        r.read_to_end(&mut tail).expect("read to the end");
        assert!(tail.is_empty(), "more answers than requests: {tail:?}");
        (was_written, unread)
    }
}

// ---------------------------------------------------------------------------------------------
// The clients
// ---------------------------------------------------------------------------------------------

/// One client's fixed part.
#[derive(Debug, Clone)]
struct ClientSpec {
    i: usize,
    repo: usize,
    subscribe: bool,
    window: usize,
    plan: Vec<Kind>,
}

impl ClientSpec {
    fn new(i: usize, opts: &LoadOptions) -> ClientSpec {
        let asker = i < opts.repos;
        let mut rng = opts.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let plan = (0..opts.requests)
            .map(|_| {
                // xorshift64*: a fixed mix per client, the same in every run.
                rng ^= rng >> 12;
                rng ^= rng << 25;
                rng ^= rng >> 27;
                let roll = rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33;
                match roll % 100 {
                    0..20 => Kind::Status,
                    20..35 => Kind::Log,
                    35..55 => Kind::Show,
                    55..63 => Kind::Undo,
                    63..75 if asker => Kind::Ask,
                    _ => Kind::Apply,
                }
            })
            .collect();
        ClientSpec {
            i,
            repo: i % opts.repos,
            subscribe: opts.subscribe_every > 0 && i % opts.subscribe_every == 1,
            window: opts.window,
            plan,
        }
    }
}

/// Where a client is, for the message naming stuck clients.
#[derive(Debug, Default)]
struct Progress {
    answered: usize,
    planned: usize,
    finished: bool,
    waiting: Vec<(String, &'static str)>,
}

fn stuck_clients(progress: &[Mutex<Progress>]) -> String {
    let mut out = String::new();
    for (i, p) in progress.iter().enumerate() {
        let p = p.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !p.finished {
            out.push_str(&format!(
                "  client {i}: {}/{} answered, waiting for {:?}\n",
                p.answered, p.planned, p.waiting
            ));
        }
    }
    out
}

/// One edit this client made.
#[derive(Debug, Clone)]
pub(crate) struct MyEdit {
    id: String,
    before: u64,
    after: u64,
    undone: bool,
}

/// What a client leaves for the final checks and the report.
#[derive(Debug)]
struct ClientStats {
    i: usize,
    repo: usize,
    value: u64,
    edits: Vec<MyEdit>,
    latencies: HashMap<Kind, Vec<Duration>>,
    events: usize,
    progress: usize,
}

/// A request sent and not yet answered.
#[derive(Debug)]
struct Pending {
    kind: Kind,
    sent: Instant,
    /// For `show`: the edit; for `apply`/`ask`: the values; for `undo`: the edit's index.
    edit: Option<usize>,
    values: (u64, u64),
    progress: usize,
}

struct Client<'a> {
    spec: ClientSpec,
    world: &'a World,
    value: u64,
    next_value: u64,
    edits: Vec<MyEdit>,
    /// Indexes of applied edits, newest last: `undo` takes back the newest.
    live: Vec<usize>,
    pending: HashMap<String, Pending>,
    mutating: bool,
    latencies: HashMap<Kind, Vec<Duration>>,
    events: usize,
    progress: usize,
    sent: usize,
}

async fn run_client(
    spec: ClientSpec,
    world: &World,
    progress: &Mutex<Progress>,
) -> Result<ClientStats, String> {
    let stream = tokio::net::UnixStream::connect(&world.socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (rd, mut wr) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(rd).lines();
    let name = format!("c{}", spec.i);
    let mut c = Client {
        world,
        value: 0,
        next_value: 1,
        edits: Vec::new(),
        live: Vec::new(),
        pending: HashMap::new(),
        mutating: false,
        latencies: HashMap::new(),
        events: 0,
        progress: 0,
        sent: 0,
        spec,
    };
    let mut hello = initialize_line(&name);
    if c.spec.subscribe {
        hello.extend(line(
            &json!({"jsonrpc":"2.0","id":format!("{name}-sub"),"method":"subscribe"}),
        ));
    }
    wr.write_all(&hello)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut handshake = if c.spec.subscribe { 2 } else { 1 };
    set_progress(progress, &c, false);
    loop {
        if handshake == 0 {
            let mut out = Vec::new();
            while let Some(req) = c.next_request() {
                out.extend(line(&req));
            }
            if !out.is_empty() {
                wr.write_all(&out)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                set_progress(progress, &c, false);
            }
            if c.sent == c.spec.plan.len() && c.pending.is_empty() {
                break;
            }
        }
        let l = lines
            .next_line()
            .await
            .map_err(|e| format!("read: {e}"))?
            .ok_or_else(|| {
                format!(
                    "the daemon closed the connection with {} requests unanswered",
                    c.pending.len()
                )
            })?;
        let v: Value =
            serde_json::from_str(&l).map_err(|e| format!("malformed line {l:?}: {e}"))?;
        if v.get("id").is_some_and(|id| {
            id.as_str()
                .is_some_and(|s| s == format!("{name}-init") || s == format!("{name}-sub"))
        }) {
            if v.get("result").is_none() {
                return Err(format!("handshake refused: {l}"));
            }
            handshake -= 1;
            continue;
        }
        c.handle(&v, &l)?;
        set_progress(progress, &c, false);
    }
    set_progress(progress, &c, true);
    Ok(ClientStats {
        i: c.spec.i,
        repo: c.spec.repo,
        value: c.value,
        edits: c.edits,
        latencies: c.latencies,
        events: c.events,
        progress: c.progress,
    })
}

fn set_progress(progress: &Mutex<Progress>, c: &Client<'_>, finished: bool) {
    let mut p = progress
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    p.answered = c.latencies.values().map(Vec::len).sum();
    p.planned = c.spec.plan.len();
    p.finished = finished;
    p.waiting = c
        .pending
        .iter()
        .map(|(id, r)| (id.clone(), r.kind.method()))
        .collect();
}

impl Client<'_> {
    fn file(&self) -> String {
        file_name(self.spec.i)
    }

    fn cwd(&self) -> &str {
        &self.world.repos[self.spec.repo]
    }

    /// The next request to send now, if the window and the order of mutations allow one.
    fn next_request(&mut self) -> Option<Value> {
        if self.sent == self.spec.plan.len() || self.pending.len() >= self.spec.window {
            return None;
        }
        let mut kind = self.spec.plan[self.sent];
        if kind.mutates() && self.mutating {
            return None;
        }
        // What the plan asks for may not be possible yet: nothing to show or undo.
        if kind == Kind::Show && self.edits.is_empty() {
            kind = Kind::Status;
        }
        if kind == Kind::Undo && self.live.is_empty() {
            kind = Kind::Apply;
        }
        let id = format!("c{}-{}", self.spec.i, self.sent);
        self.sent += 1;
        let mut pending = Pending {
            kind,
            sent: Instant::now(),
            edit: None,
            values: (0, 0),
            progress: 0,
        };
        let i = self.spec.i;
        let params = match kind {
            Kind::Status => Value::Null,
            Kind::Log => json!({"cwd": self.cwd(), "limit": 20}),
            Kind::Show => {
                // A spread of this client's edits, old and new.
                let e = self.sent * 7919 % self.edits.len();
                pending.edit = Some(e);
                json!({"cwd": self.cwd(), "id": self.edits[e].id})
            }
            Kind::Apply | Kind::Ask => {
                let (from, to) = (self.value, self.next_value);
                self.next_value += 1;
                pending.values = (from, to);
                if kind == Kind::Apply {
                    json!({"cwd": self.cwd(), "patch": patch(i, from, to),
                           "message": format!("c{i} {from} to {to}")})
                } else {
                    json!({"cwd": self.cwd(), "prompt": format!("set the line. LOADASK:{i}:{from}:{to};"),
                           "focus": [{"path": self.file()}]})
                }
            }
            Kind::Undo => {
                let e = *self.live.last().expect("checked above");
                pending.edit = Some(e);
                json!({"cwd": self.cwd(), "id": self.edits[e].id})
            }
        };
        if kind.mutates() {
            self.mutating = true;
        }
        let mut req = json!({"jsonrpc":"2.0","id":id,"method":kind.method()});
        if !params.is_null() {
            req["params"] = params;
        }
        self.pending.insert(id, pending);
        Some(req)
    }

    fn handle(&mut self, v: &Value, raw: &str) -> Result<(), String> {
        if let Some(method) = v.get("method").and_then(Value::as_str) {
            return self.notification(method, v, raw);
        }
        let id = v
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("a reply without a string id: {raw}"))?;
        let p = self.pending.remove(id).ok_or_else(|| {
            format!("reply crossed or duplicated: {id} is not in flight on this connection: {raw}")
        })?;
        let latency = p.sent.elapsed();
        if let Some(err) = v.get("error") {
            return Err(format!("{} {id} failed: {err}", p.kind.method()));
        }
        let result = v
            .get("result")
            .cloned()
            .ok_or_else(|| format!("neither result nor error: {raw}"))?;
        let parse = |what: &str| format!("{what} {id}: malformed result: {raw}");
        let me = self.file();
        let i = self.spec.i;
        match p.kind {
            Kind::Status => {
                let s: StatusResult = serde_json::from_value(result)
                    .map_err(|e| format!("{}: {e}", parse("status")))?;
                if s.pid != self.world.pid as u32 {
                    return Err(format!("status {id} names pid {}: {raw}", s.pid));
                }
            }
            Kind::Log => {
                let l: LogResult = serde_json::from_value(result)
                    .map_err(|e| format!("{}: {e}", parse("edit/log")))?;
                if l.repo != self.cwd() {
                    return Err(format!("edit/log {id} answered for {}: {raw}", l.repo));
                }
                if let Some(e) = l.edits.iter().find(|e| {
                    e.files.len() != 1 || !self.world.file_allowed(self.spec.repo, &e.files[0])
                }) {
                    return Err(format!("edit/log {id} lists a foreign edit {e:?}"));
                }
            }
            Kind::Show => {
                let s: ShowResult = serde_json::from_value(result)
                    .map_err(|e| format!("{}: {e}", parse("edit/show")))?;
                let e = &self.edits[p.edit.expect("show names an edit")];
                let files = s.entry.as_ref().map(|x| x.files.clone());
                if !same_edit(&s.id, &e.id)
                    || files != Some(vec![me.clone()])
                    || !s.diff.contains(&format!("\n+c{i} = {}\n", e.after))
                {
                    return Err(format!(
                        "edit/show {id} of {} is not this client's: {raw}",
                        e.id
                    ));
                }
            }
            Kind::Apply => {
                let r: EditResult = serde_json::from_value(result)
                    .map_err(|e| format!("{}: {e}", parse("edit/apply")))?;
                self.landed(id, raw, &r.repo, r.edit, &r.files, &r.diff, p.values)?;
            }
            Kind::Ask => {
                let r: AskResult =
                    serde_json::from_value(result).map_err(|e| format!("{}: {e}", parse("ask")))?;
                if p.progress == 0 {
                    return Err(format!("ask {id} answered without any progress"));
                }
                let repo = self.cwd().to_owned();
                self.landed(id, raw, &repo, r.edit, &r.files, &r.diff, p.values)?;
            }
            Kind::Undo => {
                let r: EditResult = serde_json::from_value(result)
                    .map_err(|e| format!("{}: {e}", parse("edit/undo")))?;
                let k = p.edit.expect("undo names an edit");
                let e = &self.edits[k];
                let files: Vec<&str> = r.files.iter().map(|f| f.path.as_str()).collect();
                if r.repo != self.cwd()
                    || files != [me.as_str()]
                    || !r.diff.contains(&format!("\n+c{i} = {}\n", e.before))
                {
                    return Err(format!(
                        "edit/undo {id} of {} is not this client's: {raw}",
                        e.id
                    ));
                }
                self.value = e.before;
                self.edits[k].undone = true;
                self.live.pop();
            }
        }
        if p.kind.mutates() {
            self.mutating = false;
        }
        self.latencies.entry(p.kind).or_default().push(latency);
        Ok(())
    }

    /// An `edit/apply` or `ask` that landed: its edit, file and line must be this client's.
    #[allow(clippy::too_many_arguments)]
    fn landed(
        &mut self,
        id: &str,
        raw: &str,
        repo: &str,
        edit: Option<String>,
        files: &[spark_proto::methods::FileChangeSummary],
        diff: &str,
        (from, to): (u64, u64),
    ) -> Result<(), String> {
        let i = self.spec.i;
        let files: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        let Some(edit) = edit else {
            return Err(format!("{id} recorded no edit: {raw}"));
        };
        if repo != self.cwd()
            || files != [self.file().as_str()]
            || !diff.contains(&format!("\n-c{i} = {from}\n+c{i} = {to}\n"))
        {
            return Err(format!("{id} landed something not this client's: {raw}"));
        }
        if self.edits.iter().any(|e| e.id == edit) {
            return Err(format!("{id} reused the edit id {edit}"));
        }
        self.value = to;
        self.live.push(self.edits.len());
        self.edits.push(MyEdit {
            id: edit,
            before: from,
            after: to,
            undone: false,
        });
        Ok(())
    }

    fn notification(&mut self, method: &str, v: &Value, raw: &str) -> Result<(), String> {
        let params = v.get("params").cloned().unwrap_or(Value::Null);
        match method {
            spark_proto::events::EVENT_METHOD => {
                if !self.spec.subscribe {
                    return Err(format!(
                        "an event on a connection that did not subscribe: {raw}"
                    ));
                }
                let e: Event = serde_json::from_value(params)
                    .map_err(|e| format!("malformed event {raw}: {e}"))?;
                if let Event::EditApplied { repo, files, .. }
                | Event::EditReverted { repo, files, .. } = &e
                {
                    let r = self
                        .world
                        .repo_index(repo)
                        .ok_or_else(|| format!("an event about an unknown repository: {raw}"))?;
                    if files.len() != 1 || !self.world.file_allowed(r, &files[0]) {
                        return Err(format!("an event naming a foreign file: {raw}"));
                    }
                }
                self.events += 1;
            }
            spark_proto::methods::ASK_PROGRESS => {
                let p: AskProgress = serde_json::from_value(params)
                    .map_err(|e| format!("malformed ask/progress {raw}: {e}"))?;
                let spark_proto::Id::String(id) = &p.request else {
                    return Err(format!("ask/progress for a request not sent here: {raw}"));
                };
                match self.pending.get_mut(id.as_str()) {
                    Some(ask) if ask.kind == Kind::Ask => ask.progress += 1,
                    _ => {
                        return Err(format!(
                            "ask/progress crossed: {id} is no ask in flight here: {raw}"
                        ));
                    }
                }
                self.progress += 1;
            }
            other => return Err(format!("unexpected notification {other}: {raw}")),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The final checks
// ---------------------------------------------------------------------------------------------

/// Whether two ids name the same edit: an id is git's shortest unique abbreviation when it is
/// given, so the same edit can come back longer once more objects share its prefix.
fn same_edit(a: &str, b: &str) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Each repository's edit log, refs and files against what the clients were told. Returns the
/// number of edits.
fn verify_repos(world: &World, repos: &[TestRepo], stats: &[ClientStats]) -> usize {
    let mut client = sparkctl::Client::open(&world.socket, "spark-tests-load")
        .expect("connect to sparkd")
        .0;
    let mut total = 0;
    for (r, repo) in repos.iter().enumerate() {
        // (id as answered, client, undone), by the id's first 7 digits (git's shortest).
        let mut expected: HashMap<&str, Vec<(&str, usize, bool)>> = HashMap::new();
        let mut count = 0;
        for s in stats.iter().filter(|s| s.repo == r) {
            for e in &s.edits {
                expected
                    .entry(&e.id[..7])
                    .or_default()
                    .push((e.id.as_str(), s.i, e.undone));
                count += 1;
            }
        }
        let lookup = |id: &str| -> Vec<(&str, usize, bool)> {
            expected
                .get(&id[..7.min(id.len())])
                .map(|v| {
                    v.iter()
                        .filter(|(x, ..)| same_edit(x, id))
                        .copied()
                        .collect()
                })
                .unwrap_or_default()
        };
        let log = client
            .call::<EditLog>(&LogParams {
                cwd: world.repos[r].clone(),
                limit: Some(u32::MAX),
            })
            .expect("edit/log");
        let mut seen = HashSet::new();
        for e in &log.edits {
            let [(answered, i, undone)] = lookup(&e.id)[..] else {
                panic!(
                    "repository {r}: logged edit {} is not exactly one edit a client was told about: {e:?}",
                    e.id
                )
            };
            assert!(
                seen.insert(answered),
                "repository {r}: {} logged twice",
                e.id
            );
            assert_eq!(e.files, vec![file_name(i)], "repository {r}: {e:?}");
            let state = if undone {
                EditState::Undone
            } else {
                EditState::Applied
            };
            assert_eq!(
                e.state, state,
                "repository {r}: edit {} of client {i}",
                e.id
            );
        }
        assert_eq!(
            log.edits.len(),
            count,
            "repository {r}: edits logged vs. answered"
        );
        // Every edit is a commit object, pinned exactly once.
        let pins = repo.git(&["for-each-ref", "--format=%(objectname)", "refs/spark/pins/"]);
        let pins: Vec<&str> = pins.lines().collect();
        assert_eq!(pins.len(), count, "repository {r}: pins vs. edits");
        let mut pinned = HashSet::new();
        for pin in &pins {
            let [(answered, ..)] = lookup(pin)[..] else {
                panic!("repository {r}: pin {pin} is not exactly one edit a client was told about")
            };
            assert!(
                pinned.insert(answered),
                "repository {r}: {answered} pinned twice"
            );
        }
        let mut check = crate::hermetic_git(repo.path());
        check.args(["cat-file", "--batch-check=%(objecttype)"]);
        let out = crate::output_with_stdin(&mut check, format!("{}\n", pins.join("\n")).as_bytes());
        assert!(out.status.success(), "git cat-file: {}", stderr(&out));
        let types = String::from_utf8_lossy(&out.stdout);
        assert!(
            pins.is_empty() || types.lines().all(|t| t == "commit"),
            "repository {r}: a pinned edit that is no commit: {types}"
        );
        for s in stats.iter().filter(|s| s.repo == r) {
            assert_eq!(
                String::from_utf8_lossy(&repo.read(&file_name(s.i))),
                file_text(s.i, s.value),
                "client {}'s file",
                s.i
            );
        }
        if r == 0 {
            assert_eq!(
                repo.read(SLOW_FILE),
                SLOW_TEXT.as_bytes(),
                "the disconnected reader's ask applied something"
            );
        }
        total += count;
    }
    total
}
