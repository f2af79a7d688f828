//! A provider that fails every connection is not stormed: a gateway that accepts the WebSocket
//! upgrade and closes with 1011 before answering (as LiteLLM's proxy does), and speaks no HTTP +
//! SSE either, sees a few attempts however many repositories are watched, and `status` says
//! why and what happens next.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use spark_proto::ErrorCode;
use spark_proto::methods::{Ask, AskParams, Status, Watch, WatchParams};
use spark_tests::{Home, InProcess, TestRepo};
use sparkctl::ClientError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Accepts the upgrade, reads one request and closes with 1011; counts connections.
struct DroppingGateway {
    _rt: tokio::runtime::Runtime,
    url: String,
    connections: Arc<AtomicUsize>,
}

impl DroppingGateway {
    fn start() -> DroppingGateway {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let url = format!("ws://{}/v1/responses", listener.local_addr().expect("addr"));
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    let _ = ws.next().await;
                    let _ = ws
                        .send(Message::Close(Some(CloseFrame {
                            code: CloseCode::Error,
                            reason: "internal error".into(),
                        })))
                        .await;
                });
            }
        });
        DroppingGateway {
            _rt: rt,
            url,
            connections,
        }
    }

    fn attempts(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

#[test]
fn a_gateway_that_drops_every_connection_sees_a_few_attempts_whatever_the_repositories() {
    let gateway = DroppingGateway::start();
    let home = Home::new();
    let mut config = home.config();
    config.provider_url = gateway.url.clone();
    config.api_key = Some("sk-test-not-a-real-key".into());
    config.fsync = false;
    let d = InProcess::start_with(home, config);
    let repos: Vec<TestRepo> = (0..4)
        .map(|i| {
            TestRepo::with_files(&[("src/lib.rs", format!("pub fn f{i}() {{}}\n").as_bytes())])
        })
        .collect();
    let mut c = d.client();
    // Four watched repositories: each prewarms its session, against the failing gateway.
    for repo in &repos {
        c.call::<Watch>(&WatchParams { dir: repo.cwd() })
            .expect("watch");
    }
    // An ask fails with a transport error and writes nothing.
    let err = c
        .call::<Ask>(&AskParams {
            cwd: repos[0].cwd(),
            prompt: "rename f0".into(),
            focus: Vec::new(),
            dry_run: false,
            new_conversation: false,
            provider: None,
            buffers: Vec::new(),
        })
        .expect_err("the gateway never answers");
    let ClientError::Rpc(e) = err else {
        panic!("an RPC error: {err:?}")
    };
    assert_eq!(e.error_code(), Some(ErrorCode::Provider), "{}", e.message);
    assert_eq!(repos[0].read("src/lib.rs"), b"pub fn f0() {}\n");

    // Wait (bounded) until the background reconnects have paused.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = c.call::<Status>(&Default::default()).expect("status");
        if !s.sessions.is_empty()
            && s.sessions
                .iter()
                .all(|x| x.paused && x.next_attempt_in_ms.is_none())
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "still reconnecting: {:?}",
            s.sessions
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let attempts = gateway.attempts();
    eprintln!("{attempts} connection attempts");
    // Four prewarms and one ask, each tried at most a few times (WebSocket mode once, then
    // HTTP + SSE, which this gateway does not speak either), then nothing.
    assert!(attempts <= 12, "{attempts} connection attempts");
    for session in &status.sessions {
        assert!(session.failures >= 3, "{session:?}");
        // The socket closed before its first event: WebSocket mode is set aside for a while.
        assert!(session.fell_back_to_http, "{session:?}");
    }
    assert!(
        status.sessions.iter().any(|s| s.last_error.is_some()),
        "{:?}",
        status.sessions
    );
    // Paused means paused: a status round trip later, still no new attempt.
    c.call::<Status>(&Default::default()).expect("status");
    assert_eq!(gateway.attempts(), attempts);
}

#[test]
fn a_websocket_closed_before_its_first_event_falls_back_to_http_and_the_ask_lands() {
    use spark_tests::Provider;
    use spark_tests::fake_provider::{Script, Transport, Turn};
    const PATCH: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn one() {\n-    1\n+    100\n*** End Patch\n";
    let p = Provider::start(
        Script::new()
            .drop_websocket_after_upgrade()
            .turns([Turn::apply_patch(PATCH), Turn::text("done")]),
    );
    let d = p.daemon(true);
    let repo = TestRepo::with_files(&[("src/lib.rs", b"fn one() {\n    1\n}\n")]);
    let mut c = d.client();
    let params = |prompt: &str| AskParams {
        cwd: repo.cwd(),
        prompt: prompt.into(),
        focus: vec![spark_proto::methods::Focus {
            path: "src/lib.rs".into(),
            start_line: None,
            end_line: None,
        }],
        dry_run: false,
        new_conversation: false,
        provider: None,
        buffers: Vec::new(),
    };
    let r = c
        .call::<Ask>(&params("make one bigger"))
        .expect("lands over HTTP + SSE");
    assert!(r.edit.is_some());
    assert_eq!(repo.read("src/lib.rs"), b"fn one() {\n    100\n}\n");
    let turns: Vec<_> = p
        .fake
        .requests()
        .into_iter()
        .filter(|r| !r.is_prewarm())
        .collect();
    assert_eq!(turns.last().map(|t| t.transport), Some(Transport::Http));
    let s = c.call::<Status>(&Default::default()).expect("status");
    assert!(s.sessions[0].fell_back_to_http, "{:?}", s.sessions);

    // The choice is remembered: the next ask goes straight over HTTP, no new upgrade.
    let upgrades = |p: &Provider| {
        p.fake
            .heads()
            .iter()
            .filter(|h| h.is_websocket_upgrade())
            .count()
    };
    let before = upgrades(&p);
    c.call::<Ask>(&params("thanks")).expect("answers");
    assert_eq!(upgrades(&p), before);
    let last = p.fake.requests().last().cloned().expect("a request");
    assert_eq!(last.transport, Transport::Http);
    // Over HTTP the history is resent, not left to `previous_response_id` (some gateways
    // silently resolve an unknown id to an empty history).
    assert_eq!(last.previous_response_id(), None);
    assert!(last.raw.contains("make one bigger"), "{}", last.raw);
}

#[test]
fn ask_help_says_json_prints_progress_lines_then_the_result_line() {
    let ctl = spark_tests::Ctl::new();
    let out = ctl.run(["ask", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = spark_tests::stdout(&out)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        help.contains("For `ask`, NDJSON: one progress object per line while it streams")
            && help.contains("then the result object last"),
        "{help}"
    );
}
