//! Unsaved editor buffers sent with `ask`: the model sees the buffer, the patch applies to it,
//! and its result comes back as text for the editor, while the file on disk, the ledger and the
//! edit records stay as they were (docs/protocol.md, "Unsaved editor buffers").

use spark_proto::ErrorCode;
use spark_proto::methods::{
    Ask, AskParams, AskResult, Buffer, BufferEdit, EditLog, Focus, LogParams, Subscribe,
};
use spark_tests::fake_provider::{Script, Turn};
use spark_tests::{Provider, TestRepo, snapshot};
use sparkctl::{Client, ClientError};

const LIB: &str = "fn one() {\n    1\n}\n\nfn two() {\n    2\n}\n";
/// What the user typed in the editor and has not saved.
const TYPED: &str = "// typed-canary-5e1f\nfn one() {\n    1\n}\n\nfn two() {\n    2\n}\n";
const PATCH_ONE: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn one() {\n-    1\n+    100\n*** End Patch\n";

fn params(repo: &TestRepo, focus: &[&str], buffers: Vec<Buffer>) -> AskParams {
    AskParams {
        cwd: repo.cwd(),
        prompt: "make one bigger".into(),
        focus: focus
            .iter()
            .map(|p| Focus {
                path: (*p).into(),
                start_line: None,
                end_line: None,
            })
            .collect(),
        buffers,
        ..AskParams::default()
    }
}

fn buffer(path: impl Into<String>, text: &str) -> Buffer {
    Buffer {
        path: path.into(),
        text: text.into(),
    }
}

fn repo() -> TestRepo {
    TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes()), ("README.md", b"# demo\n")])
}

fn ask(c: &mut Client, p: &AskParams) -> Result<AskResult, ClientError> {
    c.call_with::<Ask>(p, |_| {})
}

fn log_len(c: &mut Client, repo: &TestRepo) -> usize {
    c.call::<EditLog>(&LogParams {
        cwd: repo.cwd(),
        limit: None,
    })
    .expect("log")
    .edits
    .len()
}

/// The user messages the provider received for asks (not prewarms).
fn asked(p: &Provider) -> Vec<String> {
    p.fake
        .requests()
        .into_iter()
        .filter(|r| !r.is_prewarm() && r.raw.contains("Request: "))
        .map(|r| r.raw)
        .collect()
}

#[test]
fn an_edit_to_an_unsaved_buffer_comes_back_as_text_and_leaves_disk_and_log_alone() {
    let p = Provider::start(Script::new().turns([Turn::apply_patch(PATCH_ONE), Turn::text("ok")]));
    let d = p.daemon(true);
    let repo = repo();
    let mut c = d.client();
    let before = snapshot(repo.path());
    // The editor names the buffer by its absolute path.
    let abs = repo.path().join("src/lib.rs").display().to_string();

    let r = ask(
        &mut c,
        &params(&repo, &[], vec![buffer(abs.clone(), TYPED)]),
    )
    .expect("the ask lands in the buffer");
    assert_eq!(r.edit, None, "nothing was written, so nothing is recorded");
    assert_eq!(
        r.buffer_edits,
        vec![BufferEdit {
            path: "src/lib.rs".into(),
            text: TYPED.replace("    1\n", "    100\n"),
        }]
    );
    assert!(r.diff.contains("-    1\n+    100\n"), "{}", r.diff);
    assert_eq!(
        snapshot(repo.path()),
        before,
        "the user's file is not written behind their back"
    );
    assert_eq!(log_len(&mut c, &repo), 0, "`sparkctl log` shows no edit");
    assert!(repo.git(&["stash", "list"]).is_empty());

    let sent = asked(&p);
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0].contains("typed-canary-5e1f"),
        "the model saw the buffer: {}",
        sent[0]
    );

    // The next ask with the buffer as the edit left it shows the model no change.
    let edited = TYPED.replace("    1\n", "    100\n");
    ask(&mut c, &params(&repo, &[], vec![buffer(abs, &edited)])).expect("second ask");
    let sent = asked(&p);
    assert!(
        sent[1].contains("`src/lib.rs` is unchanged since you last saw it"),
        "{}",
        sent[1]
    );
}

#[test]
fn a_mixed_edit_writes_and_announces_only_the_files_without_a_buffer() {
    let patch = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn one() {\n-    1\n+    100\n\
                 *** Update File: README.md\n@@\n-# demo\n+# demo app\n*** End Patch\n";
    let p = Provider::start(Script::new().turns([Turn::apply_patch(patch)]));
    let d = p.daemon(true);
    let repo = repo();
    let mut sub = d.client();
    sub.call::<Subscribe>(&Default::default())
        .expect("subscribe");
    let mut c = d.client();

    // Relative to the cwd, like focus paths.
    let r = ask(
        &mut c,
        &params(&repo, &["README.md"], vec![buffer("src/lib.rs", TYPED)]),
    )
    .expect("ask");
    let id = r.edit.clone().expect("the disk part is recorded");
    assert_eq!(repo.read("README.md"), b"# demo app\n");
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.as_bytes(),
        "the buffered file is untouched"
    );
    assert_eq!(
        r.buffer_edits,
        vec![BufferEdit {
            path: "src/lib.rs".into(),
            text: TYPED.replace("    1\n", "    100\n"),
        }]
    );
    let shown = repo.git(&["stash", "show", "-p", &id]);
    assert!(shown.contains("+# demo app"), "{shown}");
    assert!(
        !shown.contains("src/lib.rs"),
        "the record is what happened on disk: {shown}"
    );
    assert_eq!(log_len(&mut c, &repo), 1);

    let event = loop {
        let p = sub
            .next_notification()
            .expect("event")
            .params
            .expect("params");
        if p["type"] == "edit_applied" {
            break p;
        }
    };
    assert_eq!(event["edit"], id.as_str());
    assert_eq!(
        event["files"],
        serde_json::json!(["README.md"]),
        "no client reloads the buffer from disk"
    );
}

#[test]
fn a_refused_buffer_fails_the_ask_before_anything_is_sent() {
    let p = Provider::start(Script::new().default_turn(Turn::text("ok")));
    let d = p.daemon(true);
    let repo = TestRepo::with_files(&[
        ("src/lib.rs", LIB.as_bytes()),
        (".env", b"API_TOKEN=x\n"),
        ("big.txt", b"small on disk\n"),
    ]);
    let mut c = d.client();
    let outside = std::env::temp_dir().join("not-in-the-repo.rs");
    let huge = "x".repeat(300 * 1024);
    for (b, kind) in [
        (buffer(".env", "API_TOKEN=canary-buf-71aa\n"), "path_secret"),
        (
            buffer("src/lib.rs", "fn a() {}\0canary-buf-71aa\n"),
            "binary_target",
        ),
        (buffer("big.txt", &huge), "too_large"),
        (buffer("../escape.rs", "canary-buf-71aa"), "path_parent_dir"),
        (
            buffer("never-saved.rs", "canary-buf-71aa"),
            "path_not_found",
        ),
        (
            buffer(outside.display().to_string(), "canary-buf-71aa"),
            "path_outside_repo",
        ),
    ] {
        let shown = b.path.clone();
        let ClientError::Rpc(e) = ask(&mut c, &params(&repo, &[], vec![b])).expect_err(&shown)
        else {
            panic!("an RPC error for {shown}")
        };
        assert_eq!(
            (e.error_code(), e.kind()),
            (Some(ErrorCode::EditRejected), Some(kind)),
            "{shown}: {}",
            e.message
        );
        assert!(e.message.contains(&shown), "{}", e.message);
        assert!(e.hint().is_some(), "{shown} has a hint");
    }
    let ClientError::Rpc(e) = ask(
        &mut c,
        &params(
            &repo,
            &[],
            vec![buffer("src/lib.rs", "a"), buffer("./src/lib.rs", "b")],
        ),
    )
    .expect_err("twice") else {
        panic!("rpc error")
    };
    assert_eq!(e.kind(), Some("duplicate_buffer"));
    assert!(asked(&p).is_empty(), "no request reached the provider");
    assert!(
        p.fake
            .requests()
            .iter()
            .all(|r| !r.raw.contains("canary-buf-71aa")),
        "no refused buffer's text left the machine"
    );
}
