//! spark through a real third-party implementation of the Responses API: the LiteLLM proxy
//! (PyPI `litellm[proxy]`, installed by `.ci/run`, found through `SPARK_TEST_LITELLM`) on
//! loopback, in front of the fake chat-completions endpoint, which answers as a chat model does
//! (streamed `tool_calls` carrying the patch in their arguments, or plain text). LiteLLM bridges
//! spark's freeform `apply_patch` tool to a function tool and turns the chat stream back into
//! Responses events. One proxy serves every case (it takes seconds to start).
//!
//! Without the proxy the suite says so loudly and passes: it cannot be installed everywhere.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spark_proto::methods::{Ask, AskParams, AskResult, Focus, Status};
use spark_tests::fake_chat::{ChatReply, FakeChat};
use spark_tests::{Home, InProcess, TestRepo};
use sparkctl::{Client, ClientError};

const MASTER_KEY: &str = "sk-spark-test-master";
const PATCH: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn one() {\n-    1\n+    100\n*** End Patch\n";
const LIB: &str = "fn one() {\n    1\n}\n";

fn litellm() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("SPARK_TEST_LITELLM")?);
    path.is_file().then_some(path)
}

/// The proxy process, killed on drop.
struct Proxy {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// GET `path`; the status code, or `None` while nothing answers.
fn http_get(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

fn start_proxy(exe: &PathBuf, good: &str, broken: &str) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = format!(
        "model_list:\n\
         \x20 - model_name: gpt-5.3-codex-spark\n\
         \x20   litellm_params:\n\
         \x20     model: openai/gpt-5.3-codex-spark\n\
         \x20     api_base: {good}\n\
         \x20     api_key: sk-backend\n\
         \x20     use_chat_completions_api: true\n\
         \x20 - model_name: broken-model\n\
         \x20   litellm_params:\n\
         \x20     model: openai/broken-model\n\
         \x20     api_base: {broken}\n\
         \x20     api_key: sk-backend\n\
         \x20     use_chat_completions_api: true\n\
         litellm_settings:\n\
         \x20 telemetry: false\n\
         \x20 num_retries: 0\n\
         general_settings:\n\
         \x20 master_key: {MASTER_KEY}\n"
    );
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, config).expect("write config");
    let log = std::fs::File::create(dir.path().join("litellm.log")).expect("log");
    let child = Command::new(exe)
        .arg("--config")
        .arg(&config_path)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .current_dir(dir.path())
        .env("HOME", dir.path())
        // Loopback only: the model cost map ships with the package; no telemetry.
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_TELEMETRY", "False")
        .env("NO_PROXY", "*")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start litellm");
    let mut proxy = Proxy {
        child,
        port,
        _dir: dir,
    };
    // Bounded wait for readiness (its start imports a lot).
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if http_get(port, "/health/liveliness") == Some(200) {
            return proxy;
        }
        if let Ok(Some(status)) = proxy.child.try_wait() {
            let log =
                std::fs::read_to_string(proxy._dir.path().join("litellm.log")).unwrap_or_default();
            panic!("litellm exited with {status} before it was ready:\n{log}");
        }
        assert!(Instant::now() < deadline, "litellm was not ready in time");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn params(repo: &TestRepo, prompt: &str, model: Option<&str>) -> AskParams {
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
        provider: model.map(|m| spark_proto::methods::ProviderSettings {
            url: None,
            model: Some(m.into()),
            api_key: None,
        }),
        buffers: Vec::new(),
    }
}

fn daemon(url: String) -> InProcess {
    let home = Home::new();
    let mut config = home.config();
    config.provider_url = url;
    config.api_key = Some(MASTER_KEY.into());
    config.fsync = false;
    InProcess::start_with(home, config)
}

fn ask(c: &mut Client, p: &AskParams) -> Result<AskResult, ClientError> {
    c.call::<Ask>(p)
}

#[test]
fn edits_answers_chains_fallback_and_failures_through_the_litellm_proxy() {
    let Some(exe) = litellm() else {
        eprintln!(
            "\n*** SKIPPED suite::gateway: no LiteLLM proxy (set SPARK_TEST_LITELLM to the \
             `litellm` executable; .ci/run installs it) ***\n"
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let chat = rt
        .block_on(FakeChat::start_queue(
            vec![
                ChatReply::tool_call_text("apply_patch", PATCH),
                ChatReply::text("It returns 100 now."),
                ChatReply::tool_call_text("apply_patch", PATCH),
            ],
            ChatReply::text("Done."),
        ))
        .expect("fake chat");
    let broken = rt
        .block_on(FakeChat::start(ChatReply::error(500)))
        .expect("broken chat");
    let proxy = start_proxy(&exe, &chat.base_url(), &broken.base_url());
    let http_url = format!("http://127.0.0.1:{}/v1/responses", proxy.port);

    // 1. An edit over HTTP + SSE: the patch comes back as a function call's arguments.
    let d = daemon(http_url.clone());
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    let mut c = d.client();
    let r = ask(&mut c, &params(&repo, "make one return 100", None)).expect("an edit");
    assert!(r.edit.is_some(), "{r:?}");
    assert_eq!(repo.read("src/lib.rs"), b"fn one() {\n    100\n}\n");
    let first = &chat.bodies()[0];
    let tools = first["tools"].to_string();
    assert!(
        tools.contains("apply_patch"),
        "the tool reached the backend: {tools}"
    );
    assert!(
        first["messages"]
            .to_string()
            .contains("make one return 100")
    );

    // 2. A text-only answer, on the same conversation: 3. chained, the history resent.
    let r = ask(&mut c, &params(&repo, "what does one return now", None)).expect("an answer");
    assert!(r.edit.is_none());
    assert_eq!(r.answer, "It returns 100 now.");
    let second = chat.bodies()[1]["messages"].to_string();
    assert!(
        second.contains("make one return 100") && second.contains("what does one return now"),
        "the second request carries the first turn: {second}"
    );
    drop(c);
    drop(d);

    // 4. WebSocket mode against the proxy: the socket fails before its first event, and the ask
    // lands over HTTP + SSE.
    let d = daemon(format!("ws://127.0.0.1:{}/v1/responses", proxy.port));
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    let mut c = d.client();
    let r = ask(&mut c, &params(&repo, "make one return 100", None)).expect("lands");
    assert!(r.edit.is_some());
    assert_eq!(repo.read("src/lib.rs"), b"fn one() {\n    100\n}\n");
    let s = c.call::<Status>(&Default::default()).expect("status");
    eprintln!("DEBUG {:?}", s.sessions);
    assert!(
        s.sessions
            .iter()
            .all(|x| x.fell_back_to_http || x.connected),
        "{:?}",
        s.sessions
    );
    drop(c);
    drop(d);

    // 5. A failing backend: the ask fails once, clearly, with a bounded number of requests.
    let d = daemon(http_url);
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    let mut c = d.client();
    let err = ask(&mut c, &params(&repo, "anything", Some("broken-model")))
        .expect_err("the backend fails");
    let ClientError::Rpc(e) = err else {
        panic!("an RPC error: {err:?}")
    };
    assert_eq!(
        e.error_code(),
        Some(spark_proto::ErrorCode::Provider),
        "{}",
        e.message
    );
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes(), "nothing written");
    let tries = broken.requests();
    assert!(
        (1..=4).contains(&tries),
        "{tries} requests reached the broken backend"
    );
    drop(proxy);
}
