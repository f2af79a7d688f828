//! The real binaries: auto-start, single instance, crash recovery, signals, permissions, exit
//! codes. Each test has its own SPARK_HOME and never leaves a daemon behind.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use spark_tests::{Ctl, pid_alive, stderr, stdout, wait_dead};

const EXIT_LIMIT: Duration = Duration::from_secs(10);

fn status_json(ctl: &Ctl) -> Value {
    let out = ctl.run(["status", "--json"]);
    assert!(out.status.success(), "status failed: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("status --json prints one JSON object")
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn status_from_cold_starts_the_daemon_with_a_private_socket_and_stop_removes_it() {
    let ctl = Ctl::new();
    let layout = ctl.home.layout();
    assert!(!layout.socket.exists());

    let status = status_json(&ctl);
    let pid = status["pid"].as_i64().expect("pid") as i32;
    assert!(pid_alive(pid));
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["socket"], layout.socket.display().to_string());
    assert!(
        std::fs::symlink_metadata(&layout.socket)
            .expect("socket")
            .file_type()
            .is_socket()
    );
    assert_eq!(mode(&layout.socket), 0o600, "socket mode");
    assert_eq!(mode(layout.socket_dir()), 0o700, "socket directory mode");
    assert_eq!(mode(&layout.state_dir), 0o700, "state directory mode");
    assert_eq!(mode(&layout.log_file), 0o600, "log file mode");
    let log = std::fs::read_to_string(&layout.log_file).expect("log");
    assert!(
        log.contains("sparkd serving"),
        "daemon logs to its file: {log}"
    );

    // Warm: the same daemon answers the next command.
    assert_eq!(status_json(&ctl)["pid"], status["pid"]);
    let human = ctl.run(["status"]);
    assert!(
        stdout(&human).starts_with(&format!("sparkd {} (pid {pid})", env!("CARGO_PKG_VERSION")))
    );

    let out = ctl.run(["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("sparkd (pid {pid}) stopped"));
    assert!(!pid_alive(pid), "no process after stop");
    assert!(!layout.socket.exists(), "no socket after stop");

    let out = ctl.run(["stop"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out).trim(), "sparkd is not running");
}

#[test]
fn a_second_daemon_is_refused_while_the_first_keeps_serving() {
    let ctl = Ctl::new();
    let first = status_json(&ctl)["pid"].clone();

    let out = ctl.command("sparkd").output().expect("run second sparkd");
    assert_eq!(out.status.code(), Some(1), "second daemon must fail");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("already running (pid {first})")),
        "{err}"
    );

    assert_eq!(
        status_json(&ctl)["pid"],
        first,
        "the first daemon still serves"
    );
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn after_kill_9_the_stale_socket_is_replaced_by_a_new_daemon() {
    let ctl = Ctl::new();
    let layout = ctl.home.layout();
    let old = status_json(&ctl)["pid"].as_i64().expect("pid") as i32;
    std::process::Command::new("kill")
        .args(["-KILL", &old.to_string()])
        .status()
        .expect("kill");
    assert!(wait_dead(old, EXIT_LIMIT));
    assert!(
        layout.socket.exists(),
        "a killed daemon leaves its socket behind"
    );

    let new = status_json(&ctl)["pid"].as_i64().expect("pid") as i32;
    assert_ne!(new, old);
    assert!(pid_alive(new));
    assert!(ctl.run(["stop"]).status.success());
}

#[test]
fn sigterm_stops_the_daemon_and_removes_its_socket() {
    let ctl = Ctl::new();
    let layout = ctl.home.layout();
    // Started by hand in the foreground, it logs to stderr as well as to its file.
    let mut child = ctl
        .command("sparkd")
        .arg("--detached")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sparkd");
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut ready,
    )
    .expect("ready line");
    assert_eq!(ready.trim(), format!("ready {}", child.id()));
    assert_eq!(status_json(&ctl)["pid"], child.id());

    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    assert!(status.success(), "graceful exit on SIGTERM: {status}");
    assert!(!layout.socket.exists(), "socket removed");
}

#[test]
fn a_failing_start_exits_2_with_one_line_and_a_hint() {
    let ctl = Ctl::new();
    let open = ctl.home.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = ctl
        .command("sparkctl")
        .env("SPARK_SOCKET", open.join("s.sock"))
        .arg("status")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with("sparkctl: error: could not start sparkd")
            && lines[0].contains("not private"),
        "{err}"
    );
    assert!(lines[1].starts_with("hint: the daemon log is "), "{err}");
    assert!(!open.join("s.sock").exists());
}

#[test]
fn usage_errors_exit_1_and_help_and_completions_exit_0() {
    let ctl = Ctl::new();
    let out = ctl.run(["frobnicate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unrecognized subcommand"),
        "{}",
        stderr(&out)
    );

    let out = ctl.run(["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("Exit status"), "{}", stdout(&out));

    let out = ctl.run(["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("_sparkctl()"),
        "bash completion script"
    );
    assert!(
        ctl.daemon_pid().is_none(),
        "completions never start the daemon"
    );
}

#[test]
fn a_daemon_of_another_version_is_replaced_and_the_user_is_told() {
    let ctl = Ctl::new();
    // An "old" daemon: started with a different reported version.
    let out = ctl
        .command("sparkctl")
        .env("SPARK_TEST_DAEMON_VERSION", "0.0.1-old")
        .args(["status", "--json"])
        .output()
        .expect("start old daemon");
    assert!(out.status.success(), "{}", stderr(&out));
    let old: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(old["version"], "0.0.1-old");
    let old_pid = old["pid"].as_i64().expect("pid") as i32;

    let out = ctl.run(["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("restarted sparkd: it was version 0.0.1-old")
            && err.contains(env!("CARGO_PKG_VERSION")),
        "{err}"
    );
    assert!(!pid_alive(old_pid), "the old daemon is gone");
    let new = status_json(&ctl);
    assert_eq!(new["version"], env!("CARGO_PKG_VERSION"));
    assert_ne!(new["pid"].as_i64(), Some(i64::from(old_pid)));
    assert!(ctl.run(["stop"]).status.success());
}
