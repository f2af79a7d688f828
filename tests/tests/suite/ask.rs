//! `ask` end to end against the fake provider: warm chained sessions, one model call per edit,
//! tool outputs answered on the next turn, recovery, fallback, rotation, cancel and steer, races
//! with the user's typing, and secrets that never leave the machine.

use serde_json::Value;
use spark_proto::ErrorCode;
use spark_proto::methods::{
    Ask, AskEvent, AskParams, AskProgress, AskResult, Cancel, CancelParams, Focus,
};
use spark_tests::fake_provider::{Gate, Item, Outcome, Script, Transport, Turn};
use spark_tests::{Provider, TestRepo, snapshot, worktree_snapshot};
use sparkctl::{Client, ClientError};

const LIB: &str = "fn one() {\n    1\n}\n\nfn two() {\n    2\n}\n\nfn three() {\n    3\n}\n";

const PATCH_ONE: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn one() {\n-    1\n+    100\n*** End Patch\n";
const PATCH_TWO: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn two() {\n-    2\n+    200\n*** End Patch\n";

fn params(repo: &TestRepo, prompt: &str, focus: &[&str]) -> AskParams {
    AskParams {
        cwd: repo.cwd(),
        prompt: prompt.into(),
        focus: focus
            .iter()
            .map(|p| Focus {
                path: (*p).into(),
                start_line: None,
                end_line: None,
            })
            .collect(),
        dry_run: false,
        new_conversation: false,
        provider: None,
        buffers: Vec::new(),
    }
}

fn ask(c: &mut Client, p: &AskParams) -> (Result<AskResult, ClientError>, Vec<AskProgress>) {
    let mut progress = Vec::new();
    let r = c.call_with::<Ask>(p, |n| {
        assert_eq!(n.method, "ask/progress");
        progress.push(serde_json::from_value(n.params.expect("params")).expect("progress shape"));
    });
    (r, progress)
}

fn code_of(e: ClientError) -> (ErrorCode, String) {
    match e {
        ClientError::Rpc(r) => (r.error_code().expect("known code"), r.message),
        other => panic!("expected an RPC error, got {other}"),
    }
}

fn input_bytes(r: &spark_tests::fake_provider::Recorded) -> usize {
    serde_json::to_string(r.input()).expect("json").len()
}

fn repo() -> TestRepo {
    TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes()), ("README.md", b"# demo\n")])
}

#[test]
fn asks_reuse_one_warm_chained_connection_with_one_model_call_per_edit() {
    let p = Provider::start(Script::new().turns([
        Turn::apply_patch(PATCH_ONE),
        Turn::apply_patch(PATCH_TWO),
        Turn::text("Both are done."),
    ]));
    let d = p.daemon(true);
    let repo = repo();
    let mut c = d.client();

    let (r1, progress) = ask(&mut c, &params(&repo, "make one bigger", &["src/lib.rs"]));
    let r1 = r1.expect("first ask");
    let id1 = r1.edit.clone().expect("edit recorded");
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n").as_bytes()
    );
    assert!(
        progress
            .iter()
            .any(|p| matches!(&p.event, AskEvent::PatchFile { path, .. } if path == "src/lib.rs"))
    );
    let streamed: String = progress
        .iter()
        .filter_map(|p| match &p.event {
            AskEvent::Patch { delta } => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        streamed, PATCH_ONE,
        "the patch streamed to the client as it arrived"
    );
    assert!(
        repo.git(&["stash", "show", "-p", &id1])
            .contains("+    100")
    );

    let (r2, _) = ask(&mut c, &params(&repo, "and two", &["src/lib.rs"]));
    let r2 = r2.expect("second ask");
    assert!(
        r2.timings.chained,
        "the second turn continues the conversation"
    );
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n")
            .replace("    2\n", "    200\n")
            .as_bytes()
    );

    let (r3, progress) = ask(&mut c, &params(&repo, "thanks", &[]));
    let r3 = r3.expect("text-only ask");
    assert_eq!(
        (r3.edit.as_deref(), r3.answer.as_str()),
        (None, "Both are done.")
    );
    let text: String = progress
        .iter()
        .filter_map(|p| match &p.event {
            AskEvent::Text { delta } => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(text, "Both are done.");

    let reqs = p.fake.requests();
    assert_eq!(
        reqs.len(),
        4,
        "a prewarm and exactly one model call per ask: {reqs:#?}"
    );
    assert!(reqs[0].is_prewarm(), "prewarm before the first ask");
    assert!(
        reqs.iter()
            .all(|r| r.connection == reqs[0].connection && r.transport == Transport::WebSocket),
        "one connection"
    );
    for (prev, next) in reqs.iter().zip(&reqs[1..]) {
        assert_eq!(next.previous_response_id(), prev.response_id(), "chained");
    }
    for r in &reqs {
        assert_eq!(r.json["store"], false);
        assert!(
            r.json["tools"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["name"] == "apply_patch"))
        );
    }
    // The tool call of each edit is answered at the head of the next turn, never by a new call.
    for n in [2, 3] {
        let first = &reqs[n].input()[0];
        assert_eq!(
            first["type"], "custom_tool_call_output",
            "turn {n}: {first}"
        );
        assert!(
            first["output"]
                .as_str()
                .is_some_and(|o| o.starts_with("Applied as edit")),
            "{first}"
        );
    }
    // Later turns carry only the new items: the file the model saw is not resent.
    assert!(
        reqs[1].raw.contains("fn three()"),
        "the first turn shows the focus file"
    );
    for n in [2, 3] {
        assert!(
            !reqs[n].raw.contains("fn three()"),
            "turn {n} resent the file"
        );
        assert!(
            input_bytes(&reqs[n]) < 1024,
            "continued turn {n} input: {} bytes",
            input_bytes(&reqs[n])
        );
    }
}

#[test]
fn incomplete_failed_and_refused_responses_apply_nothing_and_the_next_ask_works() {
    let patch_item = Item::CustomToolCall {
        name: "apply_patch".into(),
        input: PATCH_ONE.into(),
    };
    let p = Provider::start(Script::new().turns([
        Turn::new(Outcome::Incomplete {
            items: vec![patch_item.clone()],
            reason: "max_output_tokens".into(),
        }),
        Turn::new(Outcome::Failed {
            items: vec![patch_item],
            code: "server_error".into(),
            message: "boom".into(),
        }),
        Turn::error("rate_limit_exceeded", "slow down"),
        Turn::apply_patch(PATCH_ONE),
    ]));
    let d = p.daemon(true);
    let repo = repo();
    let before = snapshot(repo.path());
    let mut c = d.client();
    for what in ["incomplete", "failed", "error event"] {
        let (r, _) = ask(&mut c, &params(&repo, "make one bigger", &["src/lib.rs"]));
        let (code, message) = code_of(r.expect_err(what));
        assert_eq!(code, ErrorCode::Provider, "{what}: {message}");
        assert!(message.contains("nothing was applied"), "{what}: {message}");
        assert_eq!(
            snapshot(repo.path()),
            before,
            "{what}: nothing on disk or in .git changed"
        );
    }
    let (r, _) = ask(&mut c, &params(&repo, "make one bigger", &["src/lib.rs"]));
    r.expect("the next ask works");
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n").as_bytes()
    );
}

#[test]
fn a_refused_websocket_upgrade_falls_back_to_http_sse() {
    let p = Provider::start(
        Script::new()
            .refuse_websocket()
            .turns([Turn::apply_patch(PATCH_ONE), Turn::text("ok")]),
    );
    let d = p.daemon(true);
    let repo = repo();
    let mut c = d.client();
    ask(&mut c, &params(&repo, "make one bigger", &["src/lib.rs"]))
        .0
        .expect("ask over SSE");
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n").as_bytes()
    );
    ask(&mut c, &params(&repo, "thanks", &[]))
        .0
        .expect("second ask over SSE");
    let heads = p.fake.heads();
    assert!(
        heads
            .iter()
            .any(|h| h.is_websocket_upgrade() && h.status == 426),
        "the upgrade was tried and refused"
    );
    let reqs = p.fake.requests();
    let generating: Vec<_> = reqs.iter().filter(|r| !r.is_prewarm()).collect();
    assert!(
        generating.iter().all(|r| r.transport == Transport::Http),
        "{reqs:#?}"
    );
    // The tool output is still answered on the next turn.
    let last = generating.last().expect("turns");
    assert!(
        last.input()
            .iter()
            .any(|i| i["type"] == "custom_tool_call_output"),
        "{:?}",
        last.input()
    );
}

#[test]
fn the_session_recovers_after_the_provider_restarts() {
    let p = Provider::start(
        Script::new().turns([Turn::apply_patch(PATCH_ONE), Turn::apply_patch(PATCH_TWO)]),
    );
    let d = p.daemon(true);
    let repo = repo();
    let mut c = d.client();
    ask(&mut c, &params(&repo, "one", &["src/lib.rs"]))
        .0
        .expect("first");
    p.fake.restart();
    let (r, _) = ask(&mut c, &params(&repo, "two", &["src/lib.rs"]));
    r.expect("ask after the provider restarted");
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n")
            .replace("    2\n", "    200\n")
            .as_bytes()
    );
    assert!(p.fake.connections_opened() >= 2, "reconnected");
    // The new connection knows no earlier response: the turn went out unchained, whole.
    let reqs = p.fake.requests();
    let last = reqs.iter().rev().find(|r| !r.is_prewarm()).expect("turn");
    assert!(
        last.input()
            .iter()
            .any(|i| i["type"] == "custom_tool_call_output"),
        "tool output carried over"
    );
}

/// `session_state` events a subscriber hears until the `n`th `edit_applied` event.
fn session_states_until_edit(sub: &mut Client, n: usize) -> Vec<String> {
    let (mut states, mut edits) = (Vec::new(), 0);
    while edits < n {
        let note = sub.next_notification().expect("event");
        let p = note.params.expect("params");
        match p["type"].as_str() {
            Some("session_state") => states.push(p["state"].as_str().expect("state").to_owned()),
            Some("edit_applied") => edits += 1,
            _ => {}
        }
    }
    states
}

#[test]
fn subscribers_hear_sessions_connect_drop_and_fall_back() {
    let p = Provider::start(
        Script::new().turns([Turn::apply_patch(PATCH_ONE), Turn::apply_patch(PATCH_TWO)]),
    );
    let d = p.daemon(true);
    let repo = repo();
    let mut sub = d.client();
    sub.call::<spark_proto::methods::Subscribe>(&Default::default())
        .expect("subscribe");
    let mut c = d.client();
    ask(&mut c, &params(&repo, "one", &["src/lib.rs"]))
        .0
        .expect("first");
    assert_eq!(
        session_states_until_edit(&mut sub, 1),
        ["connected_websocket"]
    );
    p.fake.restart();
    ask(&mut c, &params(&repo, "two", &["src/lib.rs"]))
        .0
        .expect("after the restart");
    let states = session_states_until_edit(&mut sub, 1);
    assert_eq!(
        (
            states.first().map(String::as_str),
            states.last().map(String::as_str)
        ),
        (Some("lost"), Some("connected_websocket")),
        "{states:?}"
    );

    let p = Provider::start(
        Script::new()
            .refuse_websocket()
            .turns([Turn::apply_patch(PATCH_ONE)]),
    );
    let d = p.daemon(true);
    let repo = self::repo();
    let mut sub = d.client();
    sub.call::<spark_proto::methods::Subscribe>(&Default::default())
        .expect("subscribe");
    let mut c = d.client();
    ask(&mut c, &params(&repo, "one", &["src/lib.rs"]))
        .0
        .expect("over SSE");
    assert_eq!(
        session_states_until_edit(&mut sub, 1),
        ["fell_back_to_http", "connected_http"]
    );
}

#[test]
fn the_connection_is_replaced_at_the_lifetime_limit() {
    let p =
        Provider::start(Script::new().turns([Turn::text("warm"), Turn::apply_patch(PATCH_ONE)]));
    let d = p.daemon(true);
    let repo = repo();
    let mut c = d.client();
    ask(&mut c, &params(&repo, "hello", &[]))
        .0
        .expect("first ask");
    // The connection in use reaches the provider's lifetime limit.
    p.fake.expire_open_connections();
    ask(&mut c, &params(&repo, "one", &["src/lib.rs"]))
        .0
        .expect("ask at the limit");
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n").as_bytes()
    );
    let reqs = p.fake.requests();
    assert!(
        reqs.iter()
            .any(|r| r.outcome_code() == Some("websocket_connection_limit_reached")),
        "{reqs:#?}"
    );
    assert!(p.fake.connections_opened() >= 2);
}

#[test]
fn a_disconnecting_client_cancels_and_a_newer_ask_steers() {
    let gate = Gate::new();
    let p = Provider::start(Script::new().turns([
        Turn::apply_patch(PATCH_ONE).with_gate(gate.clone()),
        Turn::apply_patch(PATCH_TWO).with_gate(Gate::new()),
        Turn::apply_patch(PATCH_TWO),
    ]));
    let d = p.daemon(true);
    let repo = repo();
    let before = snapshot(repo.path());

    // 1. Ctrl-C: the client goes away while the model is generating.
    let mut c = d.client();
    let line = serde_json::json!({"jsonrpc":"2.0","id":1,"method":"ask","params": params(&repo, "one", &["src/lib.rs"])});
    c.send_raw(&line).expect("send");
    p.wait_for_requests(2); // prewarm + the turn
    drop(c);
    // The daemon saw the client go: it closed the provider connection and re-prewarms on a new
    // one. (Opening the gate before that would race the disconnect against the answer.)
    p.wait_for_requests(3);
    gate.open(); // the provider answers now, on the closed connection; nobody must apply it
    // 2. A newer ask in the same repo cancels the one in flight and starts at once.
    let mut first = d.client();
    let repo_cwd = params(&repo, "two", &["src/lib.rs"]);
    let waiter = std::thread::spawn(move || ask(&mut first, &repo_cwd).0);
    // The steered ask's request reached the provider (held by its gate)...
    let reqs = p.wait_for_requests(4);
    assert!(reqs.len() >= 4);
    let mut second = d.client();
    let (r, _) = ask(
        &mut second,
        &params(&repo, "two, differently", &["src/lib.rs"]),
    );
    r.expect("the steering ask");
    let (code, _) = code_of(waiter.join().expect("thread").expect_err("steered away"));
    assert_eq!(code, ErrorCode::Cancelled);
    // Only the last ask's edit landed; the cancelled patch never did.
    let mut expected = before.clone();
    expected.insert(
        "src/lib.rs".into(),
        (
            expected["src/lib.rs"].0,
            LIB.replace("    2\n", "    200\n").into_bytes(),
        ),
    );
    expected.retain(|k, _| !k.starts_with(".git"));
    let (now, want) = (worktree_snapshot(repo.path()), expected);
    assert_eq!(now, want);
}

#[test]
fn cancel_stops_the_ask_in_flight_from_another_connection() {
    let gate = Gate::new();
    let p = Provider::start(Script::new().turns([
        Turn::apply_patch(PATCH_ONE).with_gate(gate.clone()),
        Turn::apply_patch(PATCH_TWO),
    ]));
    let d = p.daemon(true);
    let repo = repo();
    let before = worktree_snapshot(repo.path());
    let mut other = d.client();
    let cancel = |c: &mut Client| {
        c.call::<Cancel>(&CancelParams { cwd: repo.cwd() })
            .expect("cancel")
    };
    assert!(!cancel(&mut other).cancelled, "nothing in flight yet");

    let mut c = d.client();
    let first = params(&repo, "one", &["src/lib.rs"]);
    let waiter = std::thread::spawn(move || ask(&mut c, &first).0);
    p.wait_for_requests(2); // prewarm + the turn: the model is "generating"
    let r = cancel(&mut other);
    assert!(r.cancelled, "{r:?}");
    let (code, _) = code_of(waiter.join().expect("thread").expect_err("cancelled"));
    assert_eq!(code, ErrorCode::Cancelled);
    // The daemon dropped that response's connection and re-prewarms; the answer now goes
    // nowhere and nothing of it lands.
    p.wait_for_requests(3);
    gate.open();
    let mut c = d.client();
    let r = ask(&mut c, &params(&repo, "two", &["src/lib.rs"]))
        .0
        .expect("the next ask works");
    assert!(r.edit.is_some());
    let mut expected = before;
    expected.insert(
        "src/lib.rs".into(),
        (
            expected["src/lib.rs"].0,
            LIB.replace("    2\n", "    200\n").into_bytes(),
        ),
    );
    assert_eq!(worktree_snapshot(repo.path()), expected);
    assert!(!cancel(&mut other).cancelled, "that ask is over");
}

#[test]
fn an_edit_racing_the_users_typing_is_merged_or_refused_with_their_bytes_intact() {
    // Non-overlapping: the user edits fn three while the model rewrites fn one.
    let gate = Gate::new();
    let p = Provider::start(
        Script::new().turns([Turn::apply_patch(PATCH_ONE).with_gate(gate.clone())]),
    );
    let d = p.daemon(true);
    let repo = repo();
    let mut c = d.client();
    let prm = params(&repo, "one", &["src/lib.rs"]);
    let t = std::thread::spawn(move || ask(&mut c, &prm).0);
    p.wait_for_requests(2);
    repo.write(
        "src/lib.rs",
        LIB.replace("    3\n", "    3 // typed\n").as_bytes(),
    );
    gate.open();
    t.join().expect("thread").expect("merged");
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n")
            .replace("    3\n", "    3 // typed\n")
            .as_bytes()
    );

    // Overlapping: the user rewrote the very line the model changes.
    let gate = Gate::new();
    let p = Provider::start(
        Script::new().turns([Turn::apply_patch(PATCH_ONE).with_gate(gate.clone())]),
    );
    let d = p.daemon(true);
    let repo = self::repo();
    let mut c = d.client();
    let prm = params(&repo, "one", &["src/lib.rs"]);
    let t = std::thread::spawn(move || ask(&mut c, &prm).0);
    p.wait_for_requests(2);
    let typed = LIB.replace("    1\n", "    1 + mine\n");
    repo.write("src/lib.rs", typed.as_bytes());
    let before = snapshot(repo.path());
    gate.open();
    let (code, message) = code_of(t.join().expect("thread").expect_err("conflict"));
    assert_eq!(code, ErrorCode::Conflict, "{message}");
    assert_eq!(
        repo.read("src/lib.rs"),
        typed.as_bytes(),
        "the user's bytes are intact"
    );
    assert_eq!(snapshot(repo.path()), before, "nothing written");
}

#[test]
fn secrets_ignored_files_and_git_internals_never_reach_the_provider() {
    let p = Provider::start(Script::new().default_turn(Turn::text("ok")));
    let d = p.daemon(true);
    let repo = TestRepo::with_files(&[
        ("src/lib.rs", LIB.as_bytes()),
        (".gitignore", b"build/\n"),
        (".env", b"API_TOKEN=canary-env-7f3a\n"),
        (
            "deploy/id_rsa",
            b"-----BEGIN OPENSSH PRIVATE KEY----- canary-key-91bc\n",
        ),
    ]);
    repo.write("build/out.txt", b"canary-ignored-55d1\n");
    repo.git(&["config", "spark.canary", "canary-git-c0de"]);
    let mut c = d.client();
    for (focus, kind) in [
        (".env", "path_secret"),
        ("deploy/id_rsa", "path_secret"),
        ("build/out.txt", "path_ignored"),
        (".git/config", "path_git_dir"),
    ] {
        let (r, _) = ask(&mut c, &params(&repo, "look", &[focus]));
        let ClientError::Rpc(e) = r.expect_err(focus) else {
            panic!("rpc error")
        };
        assert_eq!(
            (e.error_code(), e.kind()),
            (Some(ErrorCode::EditRejected), Some(kind)),
            "{focus}: {}",
            e.message
        );
        assert!(e.message.contains(focus), "{}", e.message);
    }
    ask(&mut c, &params(&repo, "and the lib", &["src/lib.rs"]))
        .0
        .expect("ordinary ask");
    for r in p.fake.requests() {
        for canary in [
            "canary-env-7f3a",
            "canary-key-91bc",
            "canary-ignored-55d1",
            "canary-git-c0de",
        ] {
            assert!(!r.raw.contains(canary), "{canary} reached the provider");
        }
        // Not even their names: the outline and the news never list them.
        assert!(
            !r.raw.contains(".env") && !r.raw.contains("id_rsa"),
            "secret names reached the provider: {}",
            r.raw
        );
    }
}

#[test]
fn a_text_answer_and_the_http_transport_work_from_the_command_line() {
    let p = Provider::start(Script::new().turns([
        Turn::text("Nothing to change."),
        Turn::apply_patch(PATCH_ONE),
    ]));
    let repo = repo();
    let ctl = spark_tests::Ctl::new();
    let run = |args: &[&str]| {
        ctl.command("sparkctl")
            .current_dir(repo.path())
            .env("SPARK_PROVIDER_URL", p.fake.http_url())
            .env("SPARK_API_KEY", "sk-test")
            .args(args)
            .output()
            .expect("run sparkctl")
    };
    let out = run(&["ask", "is", "anything", "wrong?"]);
    assert_eq!(out.status.code(), Some(0), "{}", spark_tests::stderr(&out));
    assert_eq!(spark_tests::stdout(&out), "Nothing to change.\n");
    let out = run(&["--json", "ask", "-f", "src/lib.rs:1-3", "make one bigger"]);
    assert_eq!(out.status.code(), Some(0), "{}", spark_tests::stderr(&out));
    let lines: Vec<Value> = spark_tests::stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let last = lines.last().expect("result line");
    assert!(last["edit"].is_string(), "{last}");
    assert_eq!(last["files"][0]["path"], "src/lib.rs");
    assert!(last["timings"]["total_ms"].as_f64().is_some(), "{last}");
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .all(|l| l["type"].is_string()),
        "progress lines first"
    );
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n").as_bytes()
    );
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn a_malformed_patch_is_refused_and_the_model_is_told_why_on_the_next_turn() {
    let bad = "*** Begin Patch\n*** Frobnicate File: src/lib.rs\n*** End Patch\n";
    let p = Provider::start(Script::new().turns([Turn::apply_patch(bad), Turn::text("sorry")]));
    let d = p.daemon(true);
    let repo = repo();
    let before = snapshot(repo.path());
    let mut c = d.client();
    let (r, _) = ask(&mut c, &params(&repo, "one", &["src/lib.rs"]));
    let ClientError::Rpc(e) = r.expect_err("malformed") else {
        panic!("rpc error")
    };
    assert_eq!(
        (e.error_code(), e.kind()),
        (Some(ErrorCode::EditRejected), Some("patch_syntax")),
        "{}",
        e.message
    );
    assert!(e.message.contains("patch line 2"), "{}", e.message);
    assert_eq!(snapshot(repo.path()), before);
    ask(&mut c, &params(&repo, "try again", &[]))
        .0
        .expect("next ask");
    let reqs = p.fake.requests();
    let first = &reqs.last().expect("turn").input()[0];
    assert_eq!(first["type"], "custom_tool_call_output");
    assert!(
        first["output"]
            .as_str()
            .is_some_and(|o| o.starts_with("Patch rejected: patch line 2")),
        "{first}"
    );
}

#[test]
fn ctrl_c_on_sparkctl_ask_cancels_in_the_daemon_and_applies_nothing() {
    let gate = Gate::new();
    let p = Provider::start(Script::new().turns([
        Turn::apply_patch(PATCH_ONE).with_gate(gate.clone()),
        Turn::apply_patch(PATCH_TWO),
    ]));
    let repo = repo();
    let ctl = spark_tests::Ctl::new();
    let command = |args: &[&str]| {
        let mut cmd = ctl.command("sparkctl");
        cmd.current_dir(repo.path())
            .env("SPARK_PROVIDER_URL", p.fake.ws_url())
            .env("SPARK_API_KEY", "sk-test")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd
    };
    let before = snapshot(repo.path());
    let mut child = command(&["ask", "-f", "src/lib.rs", "one"])
        .spawn()
        .expect("spawn");
    p.wait_for_requests(2); // prewarm + the turn: the model is "generating"
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    // sparkctl caught Ctrl-C, had the daemon cancel, got `cancelled` back, and exited 130.
    assert_eq!(status.code(), Some(130), "interrupted: {status}");
    // The daemon saw the client go: it closed the provider connection and re-prewarms on a new
    // one. (Opening the gate before that would race the disconnect against the answer.)
    p.wait_for_requests(3);
    gate.open();
    // The daemon dropped the cancelled response: the next ask gets a fresh turn and applies only it.
    let out = command(&["ask", "-f", "src/lib.rs", "two"])
        .output()
        .expect("next ask");
    assert!(out.status.success());
    let mut expected = before;
    expected.insert(
        "src/lib.rs".into(),
        (
            expected["src/lib.rs"].0,
            LIB.replace("    2\n", "    200\n").into_bytes(),
        ),
    );
    expected.retain(|k, _| !k.starts_with(".git"));
    let (now, want) = (worktree_snapshot(repo.path()), expected);
    assert_eq!(now, want, "nothing of the interrupted ask landed");
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn after_an_undo_the_next_ask_shows_the_file_whole_again() {
    let p = Provider::start(
        Script::new().turns([Turn::apply_patch(PATCH_ONE), Turn::apply_patch(PATCH_TWO)]),
    );
    let d = p.daemon(true);
    let repo = repo();
    let mut c = d.client();
    ask(&mut c, &params(&repo, "one", &["src/lib.rs"]))
        .0
        .expect("ask");
    c.call::<spark_proto::methods::EditUndo>(&spark_proto::methods::EditParams {
        cwd: repo.cwd(),
        id: None,
    })
    .expect("undo");
    ask(&mut c, &params(&repo, "two", &["src/lib.rs"]))
        .0
        .expect("ask after undo");
    let reqs = p.fake.requests();
    let last = reqs.last().expect("turn");
    assert!(
        last.raw.contains("fn three()"),
        "the reverted file was shown whole, not as 'unchanged'"
    );
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    2\n", "    200\n").as_bytes()
    );
}

#[test]
fn dry_run_writes_nothing_and_new_starts_a_fresh_conversation() {
    let p =
        Provider::start(Script::new().turns([Turn::apply_patch(PATCH_ONE), Turn::text("fresh")]));
    let d = p.daemon(true);
    let repo = repo();
    let before = snapshot(repo.path());
    let mut c = d.client();
    let mut prm = params(&repo, "one", &["src/lib.rs"]);
    prm.dry_run = true;
    let r = ask(&mut c, &prm).0.expect("dry run");
    assert_eq!(r.edit, None);
    assert!(r.diff.contains("+    100"), "{}", r.diff);
    assert_eq!(snapshot(repo.path()), before, "a dry run writes nothing");

    let mut prm = params(&repo, "start over", &[]);
    prm.new_conversation = true;
    ask(&mut c, &prm).0.expect("new conversation");
    let reqs = p.fake.requests();
    let n = reqs.len();
    assert!(
        reqs[n - 2].is_prewarm(),
        "a fresh conversation is prewarmed again"
    );
    assert_eq!(
        reqs[n - 1].previous_response_id(),
        reqs[n - 2].response_id(),
        "and chained to that prewarm only"
    );
    // The dry run's tool call is still answered, as "not applied".
    assert!(
        reqs[n - 2]
            .input()
            .iter()
            .all(|i| i["type"] != "custom_tool_call_output")
    );
}

#[test]
fn a_one_line_change_to_a_large_focused_file_is_sent_as_a_small_diff() {
    let p = Provider::start(Script::new().default_turn(Turn::text("ok")));
    let d = p.daemon(true);
    let big: String = (0..3000)
        .map(|i| format!("fn f{i}() -> u32 {{ {i} }}\n"))
        .collect();
    let repo = TestRepo::with_files(&[("src/big.rs", big.as_bytes())]);
    let mut c = d.client();
    ask(&mut c, &params(&repo, "look", &["src/big.rs"]))
        .0
        .expect("first ask");
    // The first ask watches the repository.
    let status = c
        .call::<spark_proto::methods::Status>(&Default::default())
        .expect("status");
    assert!(
        status.repos.iter().any(|r| r.watched),
        "watched from its first ask: {:?}",
        status.repos
    );

    repo.write(
        "src/big.rs",
        big.replace("fn f1500() -> u32 { 1500 }", "fn f1500() -> u32 { 15 }")
            .as_bytes(),
    );
    ask(&mut c, &params(&repo, "look again", &["src/big.rs"]))
        .0
        .expect("second ask");
    let reqs = p.fake.requests();
    let (first, second) = (&reqs[reqs.len() - 2], &reqs[reqs.len() - 1]);
    assert!(
        input_bytes(first) > big.len(),
        "the first turn carries the whole file"
    );
    assert!(
        second.raw.contains("-fn f1500() -> u32 { 1500 }")
            && second.raw.contains("+fn f1500() -> u32 { 15 }"),
        "{}",
        second.raw
    );
    assert!(
        input_bytes(second) < 1024,
        "a one-line change is a small diff: {} bytes",
        input_bytes(second)
    );
}

#[test]
fn the_prompt_cache_key_is_stable_per_repository_and_never_the_local_path() {
    let p = Provider::start(Script::new().default_turn(Turn::text("ok")));
    let d = p.daemon(true);
    let (one, two) = (repo(), repo());
    let mut c = d.client();
    for r in [&one, &one, &two] {
        ask(&mut c, &params(r, "hello", &["src/lib.rs"]))
            .0
            .expect("ask");
    }
    let keys: Vec<String> = p
        .fake
        .requests()
        .iter()
        .map(|r| {
            r.json["prompt_cache_key"]
                .as_str()
                .expect("a key")
                .to_owned()
        })
        .collect();
    let workdirs = [one.path().to_string_lossy(), two.path().to_string_lossy()];
    for (key, request) in keys.iter().zip(p.fake.requests()) {
        assert!(key.starts_with("spark-") && key.len() == 38, "{key}");
        for w in &workdirs {
            assert!(
                !request.raw.contains(w.as_ref()),
                "the local path left: {key}"
            );
        }
    }
    // One repository keeps its key (prewarm and both asks); another repository has its own.
    let first: Vec<&String> = keys.iter().filter(|k| **k == keys[0]).collect();
    assert!(first.len() >= 3, "{keys:?}");
    assert!(keys.iter().any(|k| *k != keys[0]), "{keys:?}");
}

#[test]
fn a_patch_bridged_to_a_function_tool_streams_into_the_preview_and_lands() {
    // A gateway without freeform tools sends the patch as JSON arguments, a few characters a
    // delta, escapes cut anywhere.
    let p = Provider::start(
        Script::new().turns([Turn::function_apply_patch(PATCH_ONE).with_delta_chars(3)]),
    );
    let d = p.daemon(true);
    let repo = repo();
    let mut c = d.client();
    let (r, progress) = ask(&mut c, &params(&repo, "one", &["src/lib.rs"]));
    assert!(r.expect("lands").edit.is_some());
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n").as_bytes()
    );
    let preview: String = progress
        .iter()
        .filter_map(|p| match &p.event {
            AskEvent::Patch { delta } => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        preview, PATCH_ONE,
        "the preview shows the patch text, not its JSON"
    );
    assert!(
        progress
            .iter()
            .any(|p| matches!(&p.event, AskEvent::PatchFile { path, .. } if path == "src/lib.rs"))
    );
}
