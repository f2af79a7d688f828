//! The JSON-RPC layer fuzzed end to end: request lines mutated from every method's shape (and
//! broken JSON, and random bytes) go to a real in-process daemon over its socket, each followed
//! by a `status` probe. Every line gets at most one answer, well formed, with the right id and
//! never an internal error; the probe is always answered; the daemon serves a new connection
//! afterwards. Smoke case count by default; `SPARK_FUZZ_CASES` and `SPARK_FUZZ_SECS` scale it
//! (docs/RELIABILITY.md, "Fuzzing").

use std::cell::{Cell, RefCell};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};
use spark_proto::methods::ClientRequest;
use spark_proto::{ErrorCode, Id};
use spark_testkit::fuzz;
use spark_tests::{Home, InProcess, TestRepo};

/// How long one answer may take before the daemon counts as hung.
const ANSWER: Duration = Duration::from_secs(10);

struct Conn {
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn open(d: &InProcess) -> Conn {
        let stream = UnixStream::connect(d.home.layout().socket).expect("connect");
        stream.set_read_timeout(Some(ANSWER)).expect("timeout");
        let mut conn = Conn {
            reader: BufReader::new(stream),
        };
        conn.send(&json!({"jsonrpc":"2.0","id":"init","method":"initialize",
            "params":{"protocol_version": spark_proto::PROTOCOL_VERSION,
                      "client":{"name":"fuzz","version":"0"}}}));
        let answer = conn.answer().expect("initialize answered");
        assert!(answer["result"].is_object(), "{answer}");
        conn
    }

    fn send_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        let stream = self.reader.get_mut();
        stream.write_all(line)?;
        stream.write_all(b"\n")
    }

    fn send(&mut self, value: &Value) {
        self.send_line(&serde_json::to_vec(value).expect("json"))
            .expect("write");
    }

    /// The next answer (notifications skipped), or why there is none.
    fn answer(&mut self) -> Result<Value, String> {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err("the daemon closed the connection".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(format!("no answer within {ANSWER:?}: {e}")),
            }
            let value: Value =
                serde_json::from_str(&line).map_err(|e| format!("not JSON ({e}): {line:?}"))?;
            if value.get("method").is_none() {
                return Ok(value);
            }
        }
    }
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        Just(json!("")),
        Just(json!("/")),
        Just(json!("relative/dir")),
        Just(json!("/nonexistent/spark-fuzz")),
        Just(json!(
            "*** Begin Patch\n*** Add File: a.txt\n+x\n*** End Patch\n"
        )),
        Just(json!("1h")),
        "[a-z0-9/._\\- \n\u{0}é]{0,12}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid request of every method but the two that end the connection's use (`initialize`,
/// `shutdown`). Only the methods that never reach the provider get the real repository: `ask`,
/// `commit/draft` and the watch methods (which prewarm a session) get other directories.
fn valid_request(repo: String) -> impl Strategy<Value = (&'static str, Value)> {
    let any_dir = prop_oneof![
        Just(json!("/")),
        Just(json!("relative/dir")),
        Just(json!("/nonexistent/spark-fuzz")),
        Just(json!("")),
    ];
    let dir = prop_oneof![3 => Just(json!(repo)), 1 => any_dir.clone()];
    let patch = prop_oneof![
        Just("*** Begin Patch\n*** Add File: new.txt\n+x\n*** End Patch\n".to_owned()),
        Just("*** Begin Patch\n*** Update File: a.txt\n@@\n-one\n+uno\n*** End Patch\n".to_owned()),
        Just("*** Begin Patch\n*** Delete File: ../escape\n*** End Patch\n".to_owned()),
        Just("a.txt\n<<<<<<< SEARCH\none\n=======\nuno\n>>>>>>> REPLACE\n".to_owned()),
        any::<String>(),
    ];
    let when = prop_oneof![
        Just(json!("1h")),
        Just(json!("0")),
        Just(json!("yesterday")),
        Just(json!("")),
    ];
    let path = prop_oneof![
        Just(json!("a.txt")),
        Just(json!("../etc/passwd")),
        Just(json!("/abs")),
        Just(json!(""))
    ];
    let id = prop_oneof![
        Just(json!("0000000")),
        Just(json!("HEAD")),
        Just(json!("")),
        "[0-9a-f]{0,12}".prop_map(Value::from)
    ];
    prop_oneof![
        Just(("status", json!({}))),
        Just(("subscribe", json!({}))),
        (dir.clone(), patch, any::<bool>()).prop_map(|(cwd, patch, dry_run)| (
            "edit/apply",
            json!({"cwd": cwd, "patch": patch, "dry_run": dry_run})
        )),
        (dir.clone(), any::<u32>())
            .prop_map(|(cwd, limit)| ("edit/log", json!({"cwd": cwd, "limit": limit}))),
        (
            prop::sample::select(vec!["edit/show", "edit/undo", "edit/stash"]),
            dir.clone(),
            id
        )
            .prop_map(|(method, cwd, id)| (method, json!({"cwd": cwd, "id": id}))),
        (
            prop::sample::select(vec!["watch", "unwatch", "refresh"]),
            any_dir.clone()
        )
            .prop_map(|(method, dir)| (method, json!({"dir": dir}))),
        (any_dir.clone(), any::<String>(), any::<bool>()).prop_map(|(cwd, prompt, dry_run)| (
            "ask",
            json!({"cwd": cwd, "prompt": prompt, "dry_run": dry_run})
        )),
        dir.clone().prop_map(|cwd| ("cancel", json!({"cwd": cwd}))),
        any_dir
            .clone()
            .prop_map(|cwd| ("commit/draft", json!({"cwd": cwd}))),
        (any_dir, any::<bool>())
            .prop_map(|(dir, enabled)| ("triggers/set", json!({"dir": dir, "enabled": enabled}))),
        (dir.clone(), path.clone(), when.clone(), any::<u32>()).prop_map(
            |(cwd, path, since, limit)| (
                "history/list",
                json!({"cwd": cwd, "path": path, "since": since, "limit": limit})
            )
        ),
        (dir.clone(), path.clone(), when.clone(), any::<bool>()).prop_map(
            |(cwd, path, at, dry_run)| (
                "history/restore",
                json!({"cwd": cwd, "path": path, "at": at, "dry_run": dry_run})
            )
        ),
        (dir, path, when).prop_map(|(cwd, path, since)| (
            "history/diff",
            json!({"cwd": cwd, "path": path, "since": since})
        )),
    ]
}

/// What a mutation does to a valid request's params.
#[derive(Debug, Clone)]
enum Change {
    Drop(prop::sample::Index),
    Retype(prop::sample::Index, Value),
    Add(String, Value),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Change::Drop),
        (any::<prop::sample::Index>(), json_value()).prop_map(|(i, v)| Change::Retype(i, v)),
        ("[a-z_]{1,8}", json_value()).prop_map(|(k, v)| Change::Add(k, v)),
    ]
}

/// A valid request, mostly as is, else with its envelope or params mutated; or an unknown
/// method.
fn request(repo: String) -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        4 => any::<i64>().prop_map(Value::from),
        2 => "[a-z0-9-]{0,8}".prop_map(Value::from),
        1 => leaf(),
    ];
    let version = prop_oneof![12 => Just(json!("2.0")), 1 => leaf()];
    let method = prop_oneof![
        8 => valid_request(repo).prop_map(|(m, p)| (Value::from(m), Some(p))),
        1 => ("[a-z/]{0,12}", prop::option::of(json_value()))
            .prop_filter("not a lifecycle method", |(m, _)| {
                !matches!(m.as_str(), "initialize" | "shutdown")
            })
            .prop_map(|(m, p)| (Value::from(m), p)),
    ];
    (
        prop::option::weighted(0.97, version),
        prop::option::weighted(0.95, id),
        method,
        prop::collection::vec(change(), 0..3),
        prop::option::weighted(0.03, json_value()),
    )
        .prop_map(|(version, id, (method, mut params), changes, replace)| {
            if let Some(Value::Object(object)) = params.as_mut() {
                for change in changes {
                    let keys: Vec<String> = object.keys().cloned().collect();
                    match change {
                        Change::Drop(i) if !keys.is_empty() => {
                            object.remove(&keys[i.index(keys.len())]);
                        }
                        Change::Retype(i, v) if !keys.is_empty() => {
                            object.insert(keys[i.index(keys.len())].clone(), v);
                        }
                        Change::Add(k, v) => {
                            object.insert(k, v);
                        }
                        _ => {}
                    }
                }
            }
            let params = replace.or(params);
            let mut object = serde_json::Map::new();
            for (key, value) in [
                ("jsonrpc", version),
                ("id", id),
                ("method", Some(method)),
                ("params", params),
            ] {
                if let Some(value) = value {
                    object.insert(key.to_owned(), value);
                }
            }
            Value::Object(object)
        })
}

/// A line's bytes (no newline): a request, the same cut short, another JSON value, or bytes.
fn line(repo: String) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => request(repo.clone()).prop_map(|v| serde_json::to_vec(&v).expect("json")),
        2 => (request(repo), any::<prop::sample::Index>()).prop_map(|(v, cut)| {
            let bytes = serde_json::to_vec(&v).expect("json");
            bytes[..cut.index(bytes.len() + 1)].to_vec()
        }),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).expect("json")),
        1 => prop::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..64),
    ]
}

/// What the daemon must answer to `line`: nothing (a notification) or an answer with this id.
fn expected_id(line: &[u8]) -> Option<Value> {
    let Ok(value) = serde_json::from_slice::<Value>(line) else {
        return Some(Value::Null);
    };
    if value.get("id").is_none() && value.get("method").is_some() {
        return None;
    }
    let id = value
        .get("id")
        .and_then(|v| serde_json::from_value::<Id>(v.clone()).ok())
        .map(|id| serde_json::to_value(id).expect("id"))
        .unwrap_or(Value::Null);
    Some(id)
}

fn check_answer(answer: &Value, id: &Value) -> Result<(), TestCaseError> {
    prop_assert_eq!(&answer["jsonrpc"], "2.0", "{}", answer);
    prop_assert_eq!(&answer["id"], id, "{}", answer);
    let has_result = answer.get("result").is_some();
    let error = answer.get("error");
    prop_assert!(has_result != error.is_some(), "{}", answer);
    if let Some(error) = error {
        let code = error["code"].as_i64().unwrap_or_default();
        let known = ErrorCode::from_code(code);
        prop_assert!(known.is_some(), "unknown code in {}", answer);
        prop_assert!(known != Some(ErrorCode::Internal), "{}", answer);
        let message = error["message"].as_str().unwrap_or_default();
        prop_assert!(!message.trim().is_empty(), "{}", answer);
        // One line for people; only a patch error may quote the lines it looked for
        // (docs/protocol.md, "Errors").
        let first = message.lines().next().unwrap_or_default();
        prop_assert!(!first.trim().is_empty(), "{}", answer);
        if known != Some(ErrorCode::PatchMismatch) {
            prop_assert!(!message.contains('\n'), "{}", answer);
        }
    }
    Ok(())
}

#[test]
fn fuzzed_request_lines_each_get_one_well_formed_answer_and_the_daemon_keeps_serving() {
    let home = Home::new();
    let mut config = home.config();
    // Nothing may reach a real provider: a closed loopback port refuses at once.
    config.provider_url = "ws://127.0.0.1:1/v1/responses".to_owned();
    let d = InProcess::start_with(home, config);
    let repo = TestRepo::with_files(&[("a.txt", b"one\ntwo\n")]);
    let conn = RefCell::new(Conn::open(&d));
    let probes = Cell::new(0u64);
    // Answers by outcome (`result` or the error's code), to show how deep the lines got.
    let outcomes = RefCell::new(std::collections::BTreeMap::<String, u64>::new());
    let start = Instant::now();
    fuzz("daemon jsonrpc", 256, line(repo.cwd()), |line| {
        let mut conn = conn.borrow_mut();
        conn.send_line(&line)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let n = probes.get() + 1;
        probes.set(n);
        let probe = format!("probe-{n}");
        // Answers may come in any order (JSON-RPC matches them by id, and a slow edit is
        // answered after a quick status), so the probe goes out once the line is answered.
        if let Some(id) = expected_id(&line) {
            let answer = conn.answer().map_err(TestCaseError::fail)?;
            check_answer(&answer, &id)?;
            let outcome = match answer["error"]["code"].as_i64() {
                Some(code) => code.to_string(),
                None => "result".to_owned(),
            };
            *outcomes.borrow_mut().entry(outcome).or_default() += 1;
        }
        // A notification got no answer: the next one is the probe's.
        conn.send(&json!({"jsonrpc":"2.0","id":probe,"method":"status"}));
        let answer = conn.answer().map_err(TestCaseError::fail)?;
        prop_assert_eq!(&answer["id"], &json!(probe), "{}", answer);
        prop_assert!(answer["result"]["pid"].is_u64(), "{}", answer);
        Ok(())
    });
    eprintln!(
        "fuzz daemon jsonrpc: {} lines answered in {:.1}s; answers: {:?}",
        probes.get(),
        start.elapsed().as_secs_f64(),
        outcomes.borrow()
    );
    // A fresh connection is served as usual.
    let mut fresh = Conn::open(&d);
    fresh.send(&json!({"jsonrpc":"2.0","id":1,"method":"status"}));
    let answer = fresh.answer().expect("status");
    assert_eq!(answer["result"]["pid"], std::process::id(), "{answer}");
}

/// Found by the harness above: a relative `cwd` went into the error message raw, so a `cwd`
/// holding a newline made a two-line message for a params error.
#[test]
fn a_relative_cwd_with_a_newline_is_refused_in_one_line() {
    let d = InProcess::start();
    let mut conn = Conn::open(&d);
    conn.send(&json!({"jsonrpc":"2.0","id":1,"method":"edit/log",
        "params":{"cwd":"rel\nsecond line"}}));
    let answer = conn.answer().expect("answer");
    assert_eq!(answer["error"]["code"], -32602, "{answer}");
    assert_eq!(
        answer["error"]["message"], "cwd rel\\nsecond line is not an absolute path",
        "{answer}"
    );
}

/// The methods `valid_request` builds: a method added to the protocol fails this test until the
/// harness builds it too.
const FUZZED_METHODS: [&str; 17] = [
    "status",
    "subscribe",
    "edit/apply",
    "edit/log",
    "edit/show",
    "edit/undo",
    "edit/stash",
    "watch",
    "unwatch",
    "refresh",
    "ask",
    "cancel",
    "commit/draft",
    "history/list",
    "history/restore",
    "history/diff",
    "triggers/set",
];

#[test]
fn the_harness_builds_every_method_but_initialize_and_shutdown() {
    let mut expected: Vec<&str> = ClientRequest::NAMES
        .iter()
        .copied()
        .filter(|n| !matches!(*n, "initialize" | "shutdown"))
        .collect();
    expected.sort_unstable();
    let mut fuzzed = FUZZED_METHODS.to_vec();
    fuzzed.sort_unstable();
    assert_eq!(fuzzed, expected);
}
