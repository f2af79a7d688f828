//! `stream_id` lanes end to end: the asks of several repositories (and a commit-message draft)
//! share one WebSocket connection to the provider, each on a lane of its own, running at once;
//! chaining stays per lane; a provider that refuses lanes gets a connection per repository; a
//! dropped connection fails every lane's ask cleanly and the next asks work.

use std::sync::mpsc;

use spark_proto::ErrorCode;
use spark_proto::methods::{
    Ask, AskEvent, AskParams, AskProgress, AskResult, CommitDraft, DraftParams, Focus, Status,
    StatusResult,
};
use spark_tests::fake_provider::{Gate, Recorded, Script, Turn};
use spark_tests::{Home, InProcess, Provider, TestRepo};
use sparkctl::{Client, ClientError};

const LIB: &str = "fn one() {\n    1\n}\n";
const PATCH: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn one() {\n-    1\n+    100\n*** End Patch\n";

fn repo() -> TestRepo {
    TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())])
}

fn params(repo: &TestRepo, prompt: &str) -> AskParams {
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
        provider: None,
        buffers: Vec::new(),
    }
}

fn ask(c: &mut Client, p: &AskParams) -> Result<AskResult, ClientError> {
    c.call_with::<Ask>(p, |_| {})
}

/// An ask on its own thread; its progress goes to `progress`, labelled.
fn ask_in_background(
    mut c: Client,
    p: AskParams,
    label: &'static str,
    progress: mpsc::Sender<(&'static str, AskEvent)>,
) -> std::thread::JoinHandle<Result<AskResult, ClientError>> {
    std::thread::spawn(move || {
        c.call_with::<Ask>(&p, |n| {
            if let Some(params) = n.params
                && let Ok(p) = serde_json::from_value::<AskProgress>(params)
            {
                let _ = progress.send((label, p.event));
            }
        })
    })
}

fn status(c: &mut Client) -> StatusResult {
    c.call::<Status>(&Default::default()).expect("status")
}

/// The requests of one lane family (`repo-…` or `draft`), by the lane name's prefix.
fn lane_of(r: &Recorded) -> String {
    r.stream_id()
        .expect("every request names a lane")
        .to_owned()
}

#[test]
fn two_repositories_asks_run_at_once_on_one_connection_on_two_lanes() {
    let gate = Gate::new();
    let p = Provider::start(Script::new().turns([
        Turn::apply_patch(PATCH).with_gate(gate.clone()),
        Turn::apply_patch(PATCH),
    ]));
    let d = p.daemon(true);
    let (a, b) = (repo(), repo());
    let (tx, _progress) = mpsc::channel();
    let held = ask_in_background(d.client(), params(&a, "one, slowly"), "a", tx);
    // A's prewarm and turn are on the wire; the model holds A's answer.
    let requests = p.wait_for_requests(2);
    let lane_a = lane_of(&requests[1]);

    // B is answered while A is still in flight: it does not wait behind A.
    let r = ask(&mut d.client(), &params(&b, "one, quickly")).expect("B's ask");
    assert!(r.edit.is_some());
    assert_eq!(
        b.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n").as_bytes()
    );
    assert_eq!(a.read("src/lib.rs"), LIB.as_bytes(), "A is still held");
    let s = status(&mut d.client());
    assert_eq!(s.provider_connections.len(), 1, "{s:?}");
    assert_eq!(
        (
            s.provider_connections[0].connections,
            s.provider_connections[0].lanes
        ),
        (1, 2)
    );
    assert!(s.sessions.iter().all(|x| x.lane.is_some()), "{s:?}");

    gate.open();
    held.join().expect("thread").expect("A's ask");
    assert_eq!(
        a.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n").as_bytes()
    );

    let requests = p.fake.requests();
    assert_eq!(requests.len(), 4, "two prewarms and two turns");
    assert_eq!(p.fake.connections_opened(), 1, "one connection for both");
    assert!(
        requests
            .iter()
            .all(|r| r.connection == requests[0].connection)
    );
    let lane_b = lane_of(&requests[3]);
    assert_ne!(lane_a, lane_b);
    assert_eq!(lane_of(&requests[0]), lane_a, "A's prewarm on A's lane");
    assert_eq!(lane_of(&requests[2]), lane_b, "B's prewarm on B's lane");
    // On the wire: B's whole answer went out between A's request and A's answer.
    let sent = p.fake.sent_events();
    let on = |lane: &str| {
        sent.iter()
            .enumerate()
            .filter(|(_, e)| e.stream_id.as_deref() == Some(lane))
            .map(|(i, e)| (i, e.kind.as_str()))
            .collect::<Vec<_>>()
    };
    let (a_events, b_events) = (on(&lane_a), on(&lane_b));
    let a_output = a_events
        .iter()
        .find(|(_, k)| *k == "response.output_item.added")
        .expect("A's output")
        .0;
    let b_done = b_events
        .iter()
        .rev()
        .find(|(_, k)| *k == "response.completed")
        .expect("B completed")
        .0;
    let a_prewarm_done = a_events[1].0;
    assert!(
        a_prewarm_done < b_done && b_done < a_output,
        "interleaved: {a_events:?} {b_events:?}"
    );
    assert!(sent.iter().all(|e| e.connection == requests[0].connection));
}

#[test]
fn a_commit_draft_does_not_wait_behind_a_held_ask() {
    let gate = Gate::new();
    let p = Provider::start(Script::new().turns([
        Turn::apply_patch(PATCH).with_gate(gate.clone()),
        Turn::text("Make one a hundred"),
    ]));
    let d = p.daemon(true);
    let a = repo();
    a.write("NOTES.md", b"notes\n");
    a.git(&["add", "NOTES.md"]);
    let (tx, _progress) = mpsc::channel();
    let held = ask_in_background(d.client(), params(&a, "one"), "a", tx);
    p.wait_for_requests(2);

    let draft = d
        .client()
        .call::<CommitDraft>(&DraftParams {
            cwd: a.cwd(),
            provider: None,
        })
        .expect("the draft is answered while the ask is held");
    assert_eq!(draft.message, "Make one a hundred");
    assert_eq!(draft.files, ["NOTES.md"]);
    let requests = p.fake.requests();
    let drafted = requests.last().expect("the draft request");
    assert!(lane_of(drafted).starts_with("draft."), "{}", drafted.raw);
    assert_eq!(
        drafted.connection, requests[1].connection,
        "no new connection"
    );
    assert_eq!(p.fake.connections_opened(), 1);

    gate.open();
    held.join().expect("thread").expect("the held ask");
    assert_eq!(
        a.read("src/lib.rs"),
        LIB.replace("    1\n", "    100\n").as_bytes()
    );
}

#[test]
fn chaining_stays_per_lane_on_a_shared_connection() {
    let p = Provider::start(Script::new().default_turn(Turn::text("ok")));
    let d = p.daemon(true);
    let (a, b) = (repo(), repo());
    let mut c = d.client();
    for round in 0..2 {
        for r in [&a, &b] {
            let result = ask(&mut c, &params(r, &format!("round {round}"))).expect("ask");
            assert!(result.timings.chained, "round {round} chains");
        }
    }
    let requests = p.fake.requests();
    assert_eq!(requests.len(), 6, "two prewarms, four turns");
    assert_eq!(p.fake.connections_opened(), 1);
    // Each turn continues the previous response of its own lane, never the other lane's.
    for (i, r) in requests.iter().enumerate().skip(1) {
        let Some(previous) = r.previous_response_id() else {
            continue;
        };
        let before = requests[..i]
            .iter()
            .rev()
            .find(|o| o.stream_id() == r.stream_id())
            .expect("an earlier request on this lane");
        assert_eq!(Some(previous), before.response_id(), "request {i}");
    }
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.previous_response_id().is_some())
            .count(),
        4
    );
}

#[test]
fn a_provider_refusing_lanes_gets_a_connection_per_repository() {
    let p = Provider::start(
        Script::new()
            .refuse_lanes()
            .default_turn(Turn::apply_patch(PATCH)),
    );
    let d = p.daemon(true);
    let (a, b) = (repo(), repo());
    let mut c = d.client();
    for r in [&a, &b] {
        let result = ask(&mut c, &params(r, "one")).expect("ask without lanes");
        assert!(result.edit.is_some());
        assert_eq!(
            r.read("src/lib.rs"),
            LIB.replace("    1\n", "    100\n").as_bytes()
        );
    }
    let requests = p.fake.requests();
    let refused: Vec<_> = requests
        .iter()
        .filter(|r| r.stream_id().is_some())
        .collect();
    assert_eq!(refused.len(), 1, "lanes were tried once");
    assert_eq!(refused[0].outcome_code(), Some("unknown_parameter"));
    let served: Vec<_> = requests
        .iter()
        .filter(|r| r.stream_id().is_none())
        .collect();
    assert_eq!(served.len(), 4, "two prewarms and two turns, without lanes");
    assert_ne!(
        served[0].connection, served[3].connection,
        "one connection per repository"
    );
    assert_eq!(p.fake.connections_open(), 2);

    let s = status(&mut c);
    assert!(s.provider_connections[0].lanes_refused, "{s:?}");
    assert_eq!(s.sessions.len(), 2);
    assert!(
        s.sessions
            .iter()
            .all(|x| x.lanes_refused && x.lane.is_none() && x.connected),
        "{s:?}"
    );
}

#[test]
fn a_drop_mid_stream_fails_both_asks_and_the_next_asks_work() {
    let long = "x".repeat(4000);
    let p = Provider::start(Script::new().turns([
        Turn::text(long.clone()).with_tokens_per_sec(100.0),
        Turn::text(long).with_tokens_per_sec(100.0),
        Turn::apply_patch(PATCH),
        Turn::apply_patch(PATCH),
    ]));
    let d = p.daemon(true);
    let (a, b) = (repo(), repo());
    let (tx, progress) = mpsc::channel();
    let first = ask_in_background(d.client(), params(&a, "talk"), "a", tx.clone());
    p.wait_for_requests(2);
    let second = ask_in_background(d.client(), params(&b, "talk"), "b", tx);
    p.wait_for_requests(4);
    // Both answers are streaming to their clients.
    let mut streaming = std::collections::HashSet::new();
    while streaming.len() < 2 {
        let (label, event) = progress.recv().expect("progress");
        if matches!(event, AskEvent::Text { .. }) {
            streaming.insert(label);
        }
    }
    assert_eq!(p.fake.connections_opened(), 1);
    p.fake.kill_connections();
    for waiter in [first, second] {
        match waiter.join().expect("thread") {
            Err(ClientError::Rpc(e)) => {
                assert_eq!(e.error_code(), Some(ErrorCode::Provider), "{e:?}");
                assert!(e.message.contains("nothing was applied"), "{}", e.message);
            }
            other => panic!("expected a provider error, got {other:?}"),
        }
    }
    assert_eq!(a.read("src/lib.rs"), LIB.as_bytes());
    assert_eq!(b.read("src/lib.rs"), LIB.as_bytes());

    let mut c = d.client();
    for r in [&a, &b] {
        ask(&mut c, &params(r, "one")).expect("the next ask works");
        assert_eq!(
            r.read("src/lib.rs"),
            LIB.replace("    1\n", "    100\n").as_bytes()
        );
    }
    assert_eq!(
        p.fake.connections_opened(),
        2,
        "one reconnect for both lanes"
    );
    let requests = p.fake.requests();
    let last = requests.last().expect("requests").connection;
    assert_eq!(
        requests.iter().filter(|r| r.connection == last).count(),
        requests.len() - 4,
        "everything after the drop on one connection"
    );
}

#[test]
fn lanes_off_in_the_config_gives_each_repository_its_own_connection() {
    let p = Provider::start(Script::new().default_turn(Turn::text("ok")));
    let home = Home::new();
    let mut config = home.config();
    config.provider_url = p.fake.ws_url();
    config.api_key = Some("sk-test-not-a-real-key".into());
    config.fsync = false;
    config.lanes = false;
    let d = InProcess::start_with(home, config);
    let (a, b) = (repo(), repo());
    let mut c = d.client();
    for r in [&a, &b] {
        ask(&mut c, &params(r, "hello")).expect("ask");
    }
    let requests = p.fake.requests();
    assert_eq!(requests.len(), 4);
    assert!(requests.iter().all(|r| r.stream_id().is_none()));
    assert_eq!(p.fake.connections_opened(), 2);
    let s = status(&mut c);
    assert!(s.provider_connections.is_empty(), "{s:?}");
    assert!(
        s.sessions
            .iter()
            .all(|x| x.lane.is_none() && !x.lanes_refused)
    );
}
