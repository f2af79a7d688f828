//! A provider that fails every connection is not stormed: a gateway that accepts the WebSocket
//! upgrade and closes with 1011 before answering (as LiteLLM's proxy does) sees a few attempts,
//! however many repositories are watched, and `status` says why and what happens next.

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
                .all(|x| !x.connected && x.paused && x.next_attempt_in_ms.is_none())
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
    // Four prewarms and one ask, each tried at most a few times, then nothing.
    assert!(attempts <= 12, "{attempts} connection attempts");
    let session = &status.sessions[0];
    assert!(session.failures >= 3, "{session:?}");
    assert!(
        session
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("1011") || e.contains("internal error")),
        "{session:?}"
    );
    // Paused means paused: a status round trip later, still no new attempt.
    c.call::<Status>(&Default::default()).expect("status");
    assert_eq!(gateway.attempts(), attempts);
}
