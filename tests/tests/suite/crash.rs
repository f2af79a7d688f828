//! Crash consistency: the daemon is killed (a failpoint aborts it) at each step of a multi-file
//! apply; the next daemon's recovery must leave the worktree all-before or all-after, with the
//! record and ledger matching, and no temp files or journals behind.

use spark_tests::{
    Ctl, TestRepo, output_with_stdin, pid_alive, snapshot, stderr, stdout, wait_dead,
};

const PATCH: &str = "*** Begin Patch
*** Update File: a.txt
-a
+A
*** Update File: b.txt
-b
+B
*** Add File: new/c.txt
+C
*** End Patch
";

fn worktree(repo: &TestRepo) -> (Vec<u8>, Vec<u8>, Option<Vec<u8>>, bool) {
    (
        repo.read("a.txt"),
        repo.read("b.txt"),
        repo.exists("new/c.txt").then(|| repo.read("new/c.txt")),
        repo.exists("new"),
    )
}

#[test]
fn recovery_after_a_crash_at_every_step_is_all_before_or_all_after() {
    // (failpoint, whether the edit must survive)
    let points = [
        ("after_journal", false),
        ("after_file_1", false),
        ("after_file_2", false),
        // Every file landed: recovery rolls forward and records the edit.
        ("after_file_3", true),
        ("after_written", true),
        ("after_record", true),
        ("before_finish", true),
    ];
    for (point, survives) in points {
        let repo = TestRepo::with_files(&[("a.txt", b"a\n"), ("b.txt", b"b\n")]);
        let ctl = Ctl::new();
        let before = snapshot(repo.path());

        let mut cmd = ctl.command("sparkctl");
        cmd.current_dir(repo.path())
            .env("SPARK_FAILPOINT", point)
            .args(["apply", "-"]);
        let out = output_with_stdin(&mut cmd, PATCH.as_bytes());
        assert_eq!(
            out.status.code(),
            Some(2),
            "{point}: the daemon died mid-apply: {}",
            stderr(&out)
        );
        let pid = ctl.daemon_pid().expect("pid");
        assert!(
            wait_dead(pid, std::time::Duration::from_secs(10)),
            "{point}: daemon aborted"
        );

        // The next command starts a daemon, which recovers before serving.
        let out = ctl
            .command("sparkctl")
            .current_dir(repo.path())
            .args(["--json", "log"])
            .output()
            .expect("log");
        assert!(out.status.success(), "{point}: {}", stderr(&out));
        let log: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
        let edits = log["edits"].as_array().expect("edits");

        if survives {
            assert_eq!(
                worktree(&repo),
                (
                    b"A\n".to_vec(),
                    b"B\n".to_vec(),
                    Some(b"C\n".to_vec()),
                    true
                ),
                "{point}: all after"
            );
            assert_eq!(edits.len(), 1, "{point}: recorded exactly once: {log}");
            let id = edits[0]["id"].as_str().expect("id");
            let diff = repo.git(&["stash", "show", "-p", id]);
            assert!(
                diff.contains("-a\n+A\n") && diff.contains("-b\n+B\n") && diff.contains("+C\n"),
                "{point}: {diff}"
            );
        } else {
            assert_eq!(
                snapshot(repo.path())
                    .into_iter()
                    .filter(|(k, _)| !k.starts_with(".git"))
                    .collect::<Vec<_>>(),
                before
                    .iter()
                    .filter(|(k, _)| !k.starts_with(".git"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Vec<_>>(),
                "{point}: all before, byte for byte, no temp files, no new directory"
            );
            assert!(edits.is_empty(), "{point}: nothing recorded: {log}");
        }
        repo.git(&["fsck", "--strict"]);
        let journals = std::fs::read_dir(ctl.home.layout().state_dir.join("journal"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(journals, 0, "{point}: journal settled");
        assert!(ctl.run(["stop"]).status.success());
        assert!(!pid_alive(pid));
    }
}
