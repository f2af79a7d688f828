//! Edit fidelity through `edit/apply`: patches written the way models really write them
//! (lost indentation, padded markers, stray blank lines, an Add File that rewrites a file) land
//! the bytes the strict patch would land, or are refused with nothing written.

use spark_proto::ErrorCode;
use spark_proto::methods::{ApplyParams, EditApply, EditParams, EditResult, EditUndo, FileChange};
use spark_tests::{InProcess, TestRepo, snapshot};
use sparkctl::{Client, ClientError};

fn apply(c: &mut Client, repo: &TestRepo, patch: &str) -> Result<EditResult, ClientError> {
    c.call::<EditApply>(&ApplyParams {
        cwd: repo.cwd(),
        patch: patch.to_owned(),
        dry_run: false,
        source: Some("test".into()),
        message: Some("fidelity".into()),
    })
}

/// The refusal's code, kind and hint.
fn refusal(e: ClientError) -> (ErrorCode, String, String, String) {
    match e {
        ClientError::Rpc(r) => (
            r.error_code().expect("known code"),
            r.kind().unwrap_or("").to_owned(),
            r.message.clone(),
            r.hint().unwrap_or("").to_owned(),
        ),
        other => panic!("expected an RPC error, got {other}"),
    }
}

const PY: &str = "class Greeter:\n    def greet(self, name):\n        if not name:\n            return None\n        return f\"hi {name}\"\n\n    def bye(self):\n        return \"bye\"\n";

#[test]
fn search_replace_without_indentation_lands_at_the_file_indentation() {
    let repo = TestRepo::with_files(&[("app/greet.py", PY.as_bytes())]);
    let d = InProcess::start();
    let mut c = d.client();
    // The model dropped the 8 spaces of the method body, in SEARCH and REPLACE alike.
    let patch = "app/greet.py\n```python\n<<<<<<< SEARCH\nif not name:\n    return None\n=======\nif not name:\n    raise ValueError(\"name\")\n=======\n";
    let patch = patch.replace("=======\n", "").replace(
        "    return None\nif not name:",
        "    return None\n=======\nif not name:",
    ) + ">>>>>>> REPLACE\n```\n";
    let r = apply(&mut c, &repo, &patch).expect("lands");
    assert!(r.edit.is_some());
    assert_eq!(
        String::from_utf8(repo.read("app/greet.py")).expect("utf-8"),
        PY.replace(
            "            return None\n",
            "            raise ValueError(\"name\")\n"
        )
    );
    // The file still parses as the same structure: every body line kept its 8 or 12 spaces.
    assert!(
        repo.git(&["diff", "HEAD", "--", "app/greet.py"])
            .contains("-            return None\n+            raise ValueError(\"name\")\n")
    );
}

#[test]
fn an_inconsistent_indentation_offset_is_refused_and_nothing_is_written() {
    let repo = TestRepo::with_files(&[("app/greet.py", PY.as_bytes())]);
    let before = snapshot(repo.path());
    let d = InProcess::start();
    let mut c = d.client();
    // One line lost 8 spaces, the next 12: no single offset to give the replacement.
    let patch = "app/greet.py\n<<<<<<< SEARCH\nif not name:\nreturn None\n=======\nif not name:\nreturn 0\n>>>>>>> REPLACE\n";
    let (code, kind, message, hint) = refusal(apply(&mut c, &repo, patch).expect_err("refused"));
    assert_eq!(
        (code, kind.as_str()),
        (ErrorCode::PatchMismatch, "ambiguous_indentation")
    );
    assert!(message.contains("at line 3"), "{message}");
    assert!(hint.contains("indentation"), "{hint}");
    assert_eq!(snapshot(repo.path()), before);
}

const LIB: &str = "fn one() {\n    1\n}\n\nfn two() {\n    2\n}\n";

#[test]
fn padded_markers_land_exactly_what_the_clean_patch_lands() {
    let clean = "*** Begin Patch\n*** Add File: src/new.rs\n+pub fn new() {}\n*** Update File: src/lib.rs\n@@ fn two() {\n-    2\n+    22\n*** End Patch\n";
    let padded = "  *** Begin Patch\n  *** Add File: src/new.rs\n+pub fn new() {}\n\t*** Update File: src/lib.rs\n@@ fn two() {   \n-    2\n+    22\n *** End Patch  \n";
    let mut landed = Vec::new();
    for patch in [clean, padded] {
        let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
        let d = InProcess::start();
        let mut c = d.client();
        apply(&mut c, &repo, patch).expect("lands");
        landed.push((repo.read("src/lib.rs"), repo.read("src/new.rs")));
    }
    assert_eq!(landed[0], landed[1]);
    assert_eq!(landed[1].0, LIB.replace("    2\n", "    22\n").as_bytes());

    // Right after a chunk line, ` *** Add File:` reads as a context line (as in Codex): the
    // chunk then does not match and nothing is written, rather than a guess.
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    let before = snapshot(repo.path());
    let d = InProcess::start();
    let mut c = d.client();
    let ambiguous = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn two() {\n-    2\n+    22\n *** Add File: src/new.rs\n+pub fn new() {}\n*** End Patch\n";
    let (code, ..) = refusal(apply(&mut c, &repo, ambiguous).expect_err("refused"));
    assert_eq!(code, ErrorCode::PatchMismatch);
    assert_eq!(snapshot(repo.path()), before);
}

#[test]
fn a_pure_addition_before_other_chunks_lands_them_all() {
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    let d = InProcess::start();
    let mut c = d.client();
    let patch = "*** Begin Patch\n*** Update File: src/lib.rs\n@@\n+\n+fn three() {\n+    3\n+}\n@@ fn one() {\n-    1\n+    11\n@@ fn two() {\n-    2\n+    22\n*** End Patch\n";
    apply(&mut c, &repo, patch).expect("lands");
    assert_eq!(
        String::from_utf8(repo.read("src/lib.rs")).expect("utf-8"),
        "fn one() {\n    11\n}\n\nfn two() {\n    22\n}\n\nfn three() {\n    3\n}\n"
    );
}

#[test]
fn chunks_out_of_order_are_reported_as_such_not_as_missing() {
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    let before = snapshot(repo.path());
    let d = InProcess::start();
    let mut c = d.client();
    let patch = "*** Begin Patch\n*** Update File: src/lib.rs\n@@\n-    2\n+    22\n@@\n-    1\n+    11\n*** End Patch\n";
    let (_, kind, message, _) = refusal(apply(&mut c, &repo, patch).expect_err("refused"));
    assert_eq!(kind, "context_not_found");
    assert!(
        !message.contains("could not find") && message.contains("at line 2"),
        "{message}"
    );
    assert_eq!(snapshot(repo.path()), before);
}

#[test]
fn search_text_with_stray_blank_lines_lands_when_the_rest_is_unique() {
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    let d = InProcess::start();
    let mut c = d.client();
    let patch = "src/lib.rs\n<<<<<<< SEARCH\n\nfn two() {\n    2\n\n=======\n\nfn two() {\n    2 + 0\n\n>>>>>>> REPLACE\n";
    apply(&mut c, &repo, patch).expect("lands");
    assert_eq!(
        repo.read("src/lib.rs"),
        LIB.replace("    2\n", "    2 + 0\n").as_bytes()
    );

    // Without its blank lines the SEARCH matches twice: refused, with both line numbers.
    let before = snapshot(repo.path());
    let patch = "src/lib.rs\n<<<<<<< SEARCH\n\n}\n=======\n\n};\n>>>>>>> REPLACE\n";
    let (code, kind, message, _) = refusal(apply(&mut c, &repo, patch).expect_err("refused"));
    assert_eq!(
        (code, kind.as_str()),
        (ErrorCode::PatchMismatch, "ambiguous_match")
    );
    assert!(message.contains("line 3 and at line 7"), "{message}");
    assert_eq!(snapshot(repo.path()), before);
}

const REWRITE: &str =
    "*** Begin Patch\n*** Add File: src/lib.rs\n+fn one() {\n+    1\n+}\n*** End Patch\n";

#[test]
fn add_file_over_a_committed_unmodified_file_rewrites_it_and_undo_restores_it() {
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    let d = InProcess::start();
    let mut c = d.client();
    let r = apply(&mut c, &repo, REWRITE).expect("lands");
    let id = r.edit.expect("recorded");
    assert_eq!(repo.read("src/lib.rs"), b"fn one() {\n    1\n}\n");
    assert_eq!(
        r.files
            .iter()
            .map(|f| (f.path.as_str(), f.change))
            .collect::<Vec<_>>(),
        vec![("src/lib.rs", FileChange::Modified)]
    );
    // Recorded as a stash-shaped commit git can show; the diff is the rewrite.
    let shown = repo.git(&["stash", "show", "-p", &id]);
    assert!(shown.contains("-fn two() {\n-    2\n-}\n"), "{shown}");
    repo.git(&["fsck", "--strict"]);
    c.call::<EditUndo>(&EditParams {
        cwd: repo.cwd(),
        id: None,
    })
    .expect("undo");
    assert_eq!(repo.read("src/lib.rs"), LIB.as_bytes());
    assert_eq!(repo.git(&["status", "--porcelain"]), "");
}

#[test]
fn add_file_over_modified_or_untracked_files_is_refused_with_the_reason() {
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    repo.write("src/lib.rs", b"fn mine() {}\n");
    repo.write("notes.txt", b"my notes\n");
    let before = snapshot(repo.path());
    let d = InProcess::start();
    let mut c = d.client();

    let (code, kind, message, hint) = refusal(apply(&mut c, &repo, REWRITE).expect_err("refused"));
    assert_eq!(
        (code, kind.as_str()),
        (ErrorCode::EditRejected, "path_already_exists")
    );
    assert!(message.contains("has changes since HEAD"), "{message}");
    assert!(hint.contains("uncommitted changes"), "{hint}");

    let patch = "*** Begin Patch\n*** Add File: notes.txt\n+theirs\n*** End Patch\n";
    let (code, kind, message, hint) = refusal(apply(&mut c, &repo, patch).expect_err("refused"));
    assert_eq!(
        (code, kind.as_str()),
        (ErrorCode::EditRejected, "path_already_exists")
    );
    assert!(message.contains("is not committed"), "{message}");
    assert!(hint.contains("committed and unmodified"), "{hint}");

    // A move onto an existing file stays refused, committed or not.
    let patch = "*** Begin Patch\n*** Update File: src/lib.rs\n*** Move to: notes.txt\n@@\n-fn mine() {}\n+fn theirs() {}\n*** End Patch\n";
    let (_, kind, ..) = refusal(apply(&mut c, &repo, patch).expect_err("refused"));
    assert_eq!(kind, "path_already_exists");
    assert_eq!(snapshot(repo.path()), before);
}

// ---- Repair round trip: a patch that does not apply is corrected on the same session ----

mod repair {
    use serde_json::Value;
    use spark_proto::ErrorCode;
    use spark_proto::methods::{Ask, AskEvent, AskParams, AskProgress, AskResult, Focus};
    use spark_tests::fake_provider::{Script, Turn};
    use spark_tests::{Home, InProcess, Provider, TestRepo, snapshot};
    use sparkctl::{Client, ClientError};

    const LIB: &str = "fn one() {\n    1\n}\n\nfn two() {\n    let total = 2;\n    total\n}\n\nfn three() {\n    3\n}\n";
    /// Misremembers `let total = 2;` as `= 20`: not found.
    const WRONG: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn two() {\n-    let total = 20;\n+    let total = 22;\n*** End Patch\n";
    const WRONG_AGAIN: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn two() {\n-    let total = 21;\n+    let total = 22;\n*** End Patch\n";
    const RIGHT: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn two() {\n-    let total = 2;\n+    let total = 22;\n*** End Patch\n";

    fn repo() -> TestRepo {
        TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())])
    }

    fn params(repo: &TestRepo) -> AskParams {
        AskParams {
            cwd: repo.cwd(),
            prompt: "make two bigger".into(),
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

    fn ask(c: &mut Client, p: &AskParams) -> (Result<AskResult, ClientError>, Vec<AskProgress>) {
        let mut progress = Vec::new();
        let r = c.call_with::<Ask>(p, |n| {
            progress.push(serde_json::from_value(n.params.expect("params")).expect("shape"));
        });
        (r, progress)
    }

    fn repairs(progress: &[AskProgress]) -> Vec<(u32, String)> {
        progress
            .iter()
            .filter_map(|p| match &p.event {
                AskEvent::Repair { attempt, reason } => Some((*attempt, reason.clone())),
                _ => None,
            })
            .collect()
    }

    /// Requests that asked for a response (the prewarm left out).
    fn turns(p: &Provider) -> Vec<spark_tests::fake_provider::Recorded> {
        p.fake
            .requests()
            .into_iter()
            .filter(|r| !r.is_prewarm())
            .collect()
    }

    #[test]
    fn a_wrong_patch_is_repaired_on_the_same_session_and_lands() {
        let p = Provider::start(Script::new().turns([
            Turn::apply_patch(WRONG),
            Turn::apply_patch(RIGHT),
            Turn::text("unused"),
        ]));
        let d = p.daemon(true);
        let repo = repo();
        let mut c = d.client();
        let (r, progress) = ask(&mut c, &params(&repo));
        let r = r.expect("repaired");
        assert!(r.edit.is_some());
        assert_eq!(
            repo.read("src/lib.rs"),
            LIB.replace("= 2;", "= 22;").as_bytes()
        );
        // The user saw the repair, with the reason.
        let seen = repairs(&progress);
        assert_eq!(seen.len(), 1, "{progress:?}");
        assert_eq!(seen[0].0, 1);
        assert!(
            seen[0].1.contains("could not find these lines"),
            "{}",
            seen[0].1
        );
        // The corrected patch streams from its start after the repair event, as the first did:
        // a preview that starts over on `repair` shows exactly it.
        let at = progress
            .iter()
            .position(|p| matches!(p.event, AskEvent::Repair { .. }))
            .expect("repair event");
        let after = &progress[at + 1..];
        assert!(
            after.iter().any(|p| matches!(&p.event,
                AskEvent::PatchFile { path, .. } if path == "src/lib.rs")),
            "{after:?}"
        );
        let streamed: String = after
            .iter()
            .filter_map(|p| match &p.event {
                AskEvent::Patch { delta } => Some(delta.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(streamed, RIGHT);

        // Exactly one more model call, chained on the first response.
        let turns = turns(&p);
        assert_eq!(turns.len(), 2);
        assert_eq!(p.fake.remaining_turns(), 1);
        let repair = &turns[1];
        assert_eq!(repair.previous_response_id(), turns[0].response_id());
        let input = repair.input();
        assert_eq!(input.len(), 2, "{input:?}");
        assert_eq!(input[0]["type"], "custom_tool_call_output");
        assert!(
            input[0]["output"].as_str().is_some_and(
                |o| o.starts_with("Patch rejected: patch does not apply to src/lib.rs")
            ),
            "{}",
            input[0]
        );
        let request = message_text(&input[1]);
        // The closest lines, numbered as in the file.
        assert!(
            request.contains("    6 |     let total = 2;\n    7 |     total\n"),
            "{request}"
        );
        // Small: no file resent; the lines far from the failed chunk stay out.
        assert!(
            !request.contains("fn three()") && !request.contains("fn one()"),
            "{request}"
        );
        let input_bytes = |r: &spark_tests::fake_provider::Recorded| {
            serde_json::to_string(r.input()).expect("json").len()
        };
        assert!(
            turns[0].raw.contains("fn three()"),
            "the first turn showed the file"
        );
        assert!(input_bytes(repair) < 700, "{}", repair.raw);

        // The corrected call is answered on the next turn like any applied patch.
        ask(&mut c, &params(&repo)).0.expect("next ask");
        let next = turns_after(&p, 2);
        assert_eq!(next.input()[0]["type"], "custom_tool_call_output");
        assert!(
            next.input()[0]["output"]
                .as_str()
                .is_some_and(|o| o.starts_with("Applied as edit")),
            "{}",
            next.input()[0]
        );
    }

    #[test]
    fn a_patch_gone_stale_under_the_users_typing_is_repaired_on_top_of_it() {
        let gate = spark_tests::fake_provider::Gate::new();
        // Against the file as the user left it: their comment stays.
        const ON_TOP: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn two() {\n-    let total = 2; // mine\n+    let total = 22; // mine\n*** End Patch\n";
        let p = Provider::start(Script::new().turns([
            Turn::apply_patch(RIGHT).with_gate(gate.clone()),
            Turn::apply_patch(ON_TOP),
            Turn::text("unused"),
        ]));
        let d = p.daemon(true);
        let repo = repo();
        let mut c = d.client();
        let prm = params(&repo);
        let t = std::thread::spawn(move || ask(&mut c, &prm));
        // The prewarm and the turn have arrived; the user types on the very line meanwhile.
        p.wait_for_requests(2);
        let typed = LIB.replace("let total = 2;", "let total = 2; // mine");
        repo.write("src/lib.rs", typed.as_bytes());
        gate.open();
        let (r, progress) = t.join().expect("thread");
        r.expect("repaired on top of the user's typing");
        assert_eq!(
            repo.read("src/lib.rs"),
            LIB.replace("let total = 2;", "let total = 22; // mine")
                .as_bytes()
        );
        let seen = repairs(&progress);
        assert_eq!(seen.len(), 1, "{progress:?}");
        assert!(seen[0].1.contains("changes overlap"), "{}", seen[0].1);

        // The repair request shows what the user changed, as a diff, not the file again.
        let turns = turns(&p);
        assert_eq!(turns.len(), 2);
        let request = message_text(&turns[1].input()[1]);
        assert!(
            request.contains("-    let total = 2;\n+    let total = 2; // mine\n"),
            "{request}"
        );
        assert!(!request.contains("fn three()"), "{request}");
    }

    fn turns_after(p: &Provider, n: usize) -> spark_tests::fake_provider::Recorded {
        turns(p).into_iter().nth(n).expect("a later turn")
    }

    fn message_text(item: &Value) -> String {
        match &item["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .concat(),
            other => panic!("no message content: {other}"),
        }
    }

    #[test]
    fn two_wrong_patches_are_refused_with_both_reasons_and_nothing_written() {
        let p = Provider::start(Script::new().turns([
            Turn::apply_patch(WRONG),
            Turn::apply_patch(WRONG_AGAIN),
            Turn::text("unused"),
        ]));
        let d = p.daemon(true);
        let repo = repo();
        let before = snapshot(repo.path());
        let mut c = d.client();
        let (r, progress) = ask(&mut c, &params(&repo));
        let ClientError::Rpc(e) = r.expect_err("both wrong") else {
            panic!("an RPC error")
        };
        assert_eq!(
            (e.error_code(), e.kind()),
            (Some(ErrorCode::PatchMismatch), Some("context_not_found"))
        );
        assert!(
            e.message.contains("let total = 20;")
                && e.message
                    .contains("its corrected patch did not apply either")
                && e.message.contains("let total = 21;")
                && e.message.ends_with("nothing was written"),
            "{}",
            e.message
        );
        assert_eq!(repairs(&progress).len(), 1);
        assert_eq!(snapshot(repo.path()), before);
        // The limit holds: no third call.
        assert_eq!(turns(&p).len(), 2);
        assert_eq!(p.fake.remaining_turns(), 1);
    }

    #[test]
    fn repair_can_be_turned_off_in_the_configuration() {
        let p = Provider::start(
            Script::new().turns([Turn::apply_patch(WRONG), Turn::apply_patch(RIGHT)]),
        );
        let home = Home::new();
        std::fs::write(home.path().join("config.toml"), "repair_attempts = 0\n").expect("config");
        let mut config = home.config();
        assert_eq!(config.repair_attempts, 0);
        config.provider_url = p.fake.ws_url();
        config.api_key = Some("sk-test-not-a-real-key".into());
        let d = InProcess::start_with(home, config);
        let repo = repo();
        let mut c = d.client();
        let (r, progress) = ask(&mut c, &params(&repo));
        let ClientError::Rpc(e) = r.expect_err("not repaired") else {
            panic!("an RPC error")
        };
        assert_eq!(e.kind(), Some("context_not_found"));
        assert!(repairs(&progress).is_empty());
        assert_eq!(turns(&p).len(), 1);
    }

    #[test]
    fn sparkctl_shows_the_repair_and_both_reasons_when_it_fails() {
        let p = Provider::start(Script::new().turns([
            Turn::apply_patch(WRONG),
            Turn::apply_patch(RIGHT),
            Turn::apply_patch(WRONG),
            Turn::apply_patch(WRONG_AGAIN),
        ]));
        let repo = repo();
        let ctl = spark_tests::Ctl::new();
        let run = || {
            ctl.command("sparkctl")
                .current_dir(repo.path())
                .env("SPARK_PROVIDER_URL", p.fake.ws_url())
                .env("SPARK_API_KEY", "sk-test")
                .args(["ask", "-f", "src/lib.rs", "make two bigger"])
                .output()
                .expect("run sparkctl")
        };
        let out = run();
        let err = spark_tests::stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(
            err.contains("patch did not apply (patch does not apply to src/lib.rs: chunk 1: could not find these lines:); asking the model to correct it (repair 1)"),
            "{err}"
        );
        assert_eq!(
            repo.read("src/lib.rs"),
            LIB.replace("= 2;", "= 22;").as_bytes()
        );

        let before = snapshot(repo.path());
        let out = run();
        let err = spark_tests::stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("asking the model to correct it (repair 1)"),
            "{err}"
        );
        assert!(
            err.contains("its corrected patch did not apply either") && err.contains("hint:"),
            "{err}"
        );
        assert_eq!(snapshot(repo.path()), before);
        assert!(ctl.run(["stop"]).status.success());
    }
}

// ---- Read-only tools: the model reads what the context did not carry ----

mod reads {
    use serde_json::Value;
    use spark_proto::methods::{Ask, AskParams, AskResult, Focus};
    use spark_tests::fake_provider::{Script, Turn};
    use spark_tests::{Home, InProcess, Provider, TestRepo};
    use sparkctl::{Client, ClientError};

    const LIB: &str = "pub mod util;\n\nfn main() {\n    util::greet();\n}\n";
    const UTIL: &str = "pub fn greet() {\n    println!(\"hello\");\n}\n";
    const PATCH_UTIL: &str = "*** Begin Patch\n*** Update File: src/util.rs\n@@ pub fn greet() {\n-    println!(\"hello\");\n+    println!(\"hello, world\");\n*** End Patch\n";

    fn params(repo: &TestRepo, focus: &[&str]) -> AskParams {
        AskParams {
            cwd: repo.cwd(),
            prompt: "greet the world".into(),
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

    fn ask(c: &mut Client, p: &AskParams) -> Result<AskResult, ClientError> {
        c.call_with::<Ask>(p, |_| {})
    }

    fn turns(p: &Provider) -> Vec<spark_tests::fake_provider::Recorded> {
        p.fake
            .requests()
            .into_iter()
            .filter(|r| !r.is_prewarm())
            .collect()
    }

    fn read(name: &str, arguments: Value) -> Turn {
        Turn::function_call(name, arguments.to_string())
    }

    #[test]
    fn the_model_reads_a_file_it_was_not_shown_then_patches_it() {
        let p = Provider::start(Script::new().turns([
            read("read_file", serde_json::json!({"path": "src/util.rs"})),
            Turn::apply_patch(PATCH_UTIL),
        ]));
        let d = p.daemon(true);
        let repo = TestRepo::with_files(&[
            ("src/main.rs", LIB.as_bytes()),
            ("src/util.rs", UTIL.as_bytes()),
        ]);
        let mut c = d.client();
        let r = ask(&mut c, &params(&repo, &["src/main.rs"])).expect("lands");
        assert!(r.edit.is_some());
        assert_eq!(
            repo.read("src/util.rs"),
            UTIL.replace("hello", "hello, world").as_bytes()
        );

        let turns = turns(&p);
        assert_eq!(turns.len(), 2, "one round trip for the read");
        // The tools are offered on every request.
        for t in &turns {
            let names: Vec<&str> = t.json["tools"]
                .as_array()
                .expect("tools")
                .iter()
                .filter_map(|t| t["name"].as_str())
                .collect();
            assert_eq!(names, ["apply_patch", "read_file", "search", "list_dir"]);
        }
        assert!(
            !turns[0].raw.contains("println!"),
            "util.rs was not in the first turn"
        );
        // The second turn carries only the tool output, chained on the first response.
        assert_eq!(turns[1].previous_response_id(), turns[0].response_id());
        let input = turns[1].input();
        assert_eq!(input.len(), 1, "{input:?}");
        assert_eq!(input[0]["type"], "function_call_output");
        assert_eq!(
            input[0]["output"].as_str().expect("output"),
            format!("`src/util.rs`:\n```\n{UTIL}```\n")
        );
    }

    #[test]
    fn line_ranges_search_and_listing_answer_from_the_repository() {
        let p = Provider::start(Script::new().turns([
            read(
                "read_file",
                serde_json::json!({"path": "src/util.rs", "start_line": 2, "end_line": 2}),
            ),
            read("search", serde_json::json!({"pattern": "greet"})),
            read(
                "search",
                serde_json::json!({"pattern": "^pub (mod|fn)", "regex": true, "path": "src"}),
            ),
            read("list_dir", serde_json::json!({})),
            Turn::text("done"),
        ]));
        let d = p.daemon(true);
        let repo = TestRepo::with_files(&[
            ("src/main.rs", LIB.as_bytes()),
            ("src/util.rs", UTIL.as_bytes()),
            (".gitignore", b"target/\n"),
        ]);
        repo.write("target/greet.txt", b"greet from an ignored file\n");
        let mut c = d.client();
        let r = ask(&mut c, &params(&repo, &[])).expect("answers");
        assert_eq!(r.answer, "done");
        let outputs: Vec<String> = turns(&p)[1..]
            .iter()
            .map(|t| t.input()[0]["output"].as_str().expect("output").to_owned())
            .collect();
        assert_eq!(
            outputs[0],
            "`src/util.rs` lines 2-2 of 3:\n    2 |     println!(\"hello\");\n"
        );
        assert_eq!(
            outputs[1],
            "src/main.rs:4:     util::greet();\nsrc/util.rs:1: pub fn greet() {\n"
        );
        assert_eq!(
            outputs[2],
            "src/main.rs:1: pub mod util;\nsrc/util.rs:1: pub fn greet() {\n"
        );
        assert_eq!(outputs[3], ".gitignore\nsrc/\n");
    }

    #[test]
    fn reads_of_secret_ignored_or_outside_files_are_refused_and_audited() {
        let p = Provider::start(Script::new().turns([
            read("read_file", serde_json::json!({"path": ".env"})),
            read("read_file", serde_json::json!({"path": "build/out.txt"})),
            read("read_file", serde_json::json!({"path": "../outside.txt"})),
            read("read_file", serde_json::json!({"path": "assets/logo.bin"})),
            read("search", serde_json::json!({"pattern": "canary"})),
            read("list_dir", serde_json::json!({"path": "build"})),
            Turn::text("done"),
        ]));
        let repo = TestRepo::with_files(&[
            ("src/main.rs", b"// canary-public\n"),
            (".gitignore", b"build/\n"),
            (".env", b"API_TOKEN=canary-env-7f3a\n"),
            ("assets/logo.bin", b"\x89PNG\0canary-binary\n"),
        ]);
        repo.write("build/out.txt", b"canary-ignored-55d1\n");
        let ctl = spark_tests::Ctl::new();
        let out = ctl
            .command("sparkctl")
            .current_dir(repo.path())
            .env("SPARK_PROVIDER_URL", p.fake.ws_url())
            .env("SPARK_API_KEY", "sk-test")
            .args(["ask", "look around"])
            .output()
            .expect("run sparkctl");
        assert_eq!(out.status.code(), Some(0), "{}", spark_tests::stderr(&out));
        assert_eq!(spark_tests::stdout(&out), "done\n");
        assert!(ctl.run(["stop"]).status.success());

        let turns = turns(&p);
        let outputs: Vec<String> = turns[1..]
            .iter()
            .map(|t| t.input()[0]["output"].as_str().expect("output").to_owned())
            .collect();
        for (n, why) in [
            (0, "deny-list of secret files"),
            (1, "git ignores it"),
            (2, "contains a `..` component"),
            (3, "is not text"),
            (5, "git ignores build"),
        ] {
            assert!(
                outputs[n].starts_with("Refused: ") && outputs[n].contains(why),
                "call {n}: {}",
                outputs[n]
            );
        }
        // The search finds the public line only: no secret, ignored or binary file is quoted.
        assert_eq!(outputs[4], "src/main.rs:1: // canary-public\n");
        for t in p.fake.requests() {
            for canary in ["canary-env-7f3a", "canary-ignored-55d1", "canary-binary"] {
                assert!(!t.raw.contains(canary), "{canary} reached the provider");
            }
        }
        // Audited: each refusal is a line in the daemon's log, with the path and the reason.
        let log = std::fs::read_to_string(ctl.home.layout().log_file).expect("log");
        for path in [
            ".env",
            "build/out.txt",
            "../outside.txt",
            "assets/logo.bin",
            "build",
        ] {
            assert!(
                log.lines().any(
                    |l| l.contains("tool read refused") && l.contains(&format!("path={path} "))
                ),
                "{path} not audited:\n{log}"
            );
        }
        assert!(!log.contains("canary-env-7f3a") && !log.contains("canary-ignored-55d1"));
        assert!(log.contains("tool output sent to the provider"), "{log}");
    }

    #[test]
    fn the_tool_budget_per_ask_holds() {
        let p = Provider::start(Script::new().turns([
            read("read_file", serde_json::json!({"path": "src/util.rs"})),
            read("read_file", serde_json::json!({"path": "src/main.rs"})),
            Turn::text("with what I have"),
            Turn::text("unused"),
        ]));
        let home = Home::new();
        std::fs::write(home.path().join("config.toml"), "tool_calls_per_ask = 1\n")
            .expect("config");
        let mut config = home.config();
        config.provider_url = p.fake.ws_url();
        config.api_key = Some("sk-test-not-a-real-key".into());
        let d = InProcess::start_with(home, config);
        let repo = TestRepo::with_files(&[
            ("src/main.rs", LIB.as_bytes()),
            ("src/util.rs", UTIL.as_bytes()),
        ]);
        let mut c = d.client();
        let r = ask(&mut c, &params(&repo, &[])).expect("answers");
        assert_eq!(r.answer, "with what I have");
        let turns = turns(&p);
        assert_eq!(turns.len(), 3);
        let second = turns[2].input()[0]["output"]
            .as_str()
            .expect("output")
            .to_owned();
        assert!(
            second.starts_with("Refused: this request's budget of 1 tool calls"),
            "{second}"
        );
        assert!(
            !turns[2].raw.contains("util::greet"),
            "the refused file was not sent"
        );
        assert_eq!(p.fake.remaining_turns(), 1);
    }

    #[test]
    fn tool_output_is_cut_at_the_byte_budget_and_later_calls_are_refused() {
        let p = Provider::start(Script::new().turns([
            read("read_file", serde_json::json!({"path": "src/util.rs"})),
            read("read_file", serde_json::json!({"path": "src/main.rs"})),
            Turn::text("ok"),
        ]));
        let home = Home::new();
        std::fs::write(home.path().join("config.toml"), "tool_bytes_per_ask = 40\n")
            .expect("config");
        let mut config = home.config();
        config.provider_url = p.fake.ws_url();
        config.api_key = Some("sk-test-not-a-real-key".into());
        let d = InProcess::start_with(home, config);
        let repo = TestRepo::with_files(&[
            ("src/main.rs", LIB.as_bytes()),
            ("src/util.rs", UTIL.as_bytes()),
        ]);
        let mut c = d.client();
        ask(&mut c, &params(&repo, &[])).expect("answers");
        let turns = turns(&p);
        let first = turns[1].input()[0]["output"]
            .as_str()
            .expect("output")
            .to_owned();
        assert!(
            first.starts_with(&format!("`src/util.rs`:\n```\n{}", &UTIL[..20]))
                && first.ends_with("[cut: this request's budget for tool output is spent]\n")
                && !first.contains("println!(\"hello\");\n}"),
            "{first}"
        );
        let second = turns[2].input()[0]["output"]
            .as_str()
            .expect("output")
            .to_owned();
        assert!(
            second.starts_with("Refused: this request's budget"),
            "{second}"
        );
    }
}
