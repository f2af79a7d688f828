//! Another local user against the real binaries: `sparkctl`, `sparkd` and plain tools run as
//! `nobody` (through `setpriv`) try to reach a daemon run by this user, and plant symlinks,
//! open directories and a daemon of their own where ours would put its socket. Every case needs
//! root to switch users, and skips loudly otherwise.
//!
//! The attacker's shared directory stands for `/tmp` (where the socket goes when
//! `XDG_RUNTIME_DIR` is unset): a fresh world-writable sticky directory per test, so no test
//! touches the real `/tmp/spark-<uid>`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use spark_tests::{Ctl, bin, pid_alive, stderr, stdout, wait_dead};

const NOBODY: u32 = 65534;

/// Root is needed to run anything as another user; elsewhere the suite says so and passes.
fn root_or_skip(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED {test}: needs root to run a client as `nobody` (setpriv)");
    false
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
}

/// Names in `dir`, sorted.
fn ls(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A temp directory under `/tmp` with `mode`.
fn temp_dir(prefix: &str, mode: u32) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("tempdir");
    chmod(dir.path(), mode);
    dir
}

/// What `nobody` works with: the binaries where it can run them (the build directory may not be
/// traversable by it), and a home of its own.
struct Attacker {
    bins: tempfile::TempDir,
    home: tempfile::TempDir,
}

impl Attacker {
    fn new() -> Attacker {
        let bins = temp_dir("spbin", 0o755);
        for name in ["sparkctl", "sparkd"] {
            let to = bins.path().join(name);
            // A hard link shares the 0755 inode; a copy where links cannot cross filesystems.
            if std::fs::hard_link(bin(name), &to).is_err() {
                std::fs::copy(bin(name), &to).expect("copy binary");
            }
            chmod(&to, 0o755);
        }
        let home = temp_dir("spnb", 0o700);
        rustix::fs::chown(
            home.path(),
            Some(rustix::process::Uid::from_raw(NOBODY)),
            Some(rustix::process::Gid::from_raw(NOBODY)),
        )
        .expect("chown nobody's home");
        Attacker { bins, home }
    }

    /// `program` (a path, or a name on `PATH`) run as `nobody` with a clean environment.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
        ])
        .arg(program)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", self.home.path())
        .env("SPARK_HOME", self.home.path())
        .env("SPARK_IDLE_TIMEOUT", "60");
        cmd
    }

    /// `sparkctl args…` as `nobody`, aimed at `socket`.
    fn sparkctl(&self, socket: &Path, args: &[&str]) -> Output {
        self.command(self.bins.path().join("sparkctl"))
            .env("SPARK_SOCKET", socket)
            .args(args)
            .output()
            .expect("run sparkctl as nobody")
    }

    /// A tool such as `ls` or `ln` as `nobody`.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .expect("run a tool as nobody")
    }
}

/// A daemon (ours, started by `sparkctl status`) in a `SPARK_HOME` that others may traverse, so
/// that the socket directory's own mode is the only thing keeping them out.
fn traversable_daemon() -> Ctl {
    let ctl = Ctl::new();
    chmod(ctl.home.path(), 0o755);
    let out = ctl.run(["status"]);
    assert!(out.status.success(), "status failed: {}", stderr(&out));
    ctl
}

/// Our `sparkctl` with its socket at `socket` (which the attacker prepared).
fn our_sparkctl(ctl: &Ctl, socket: &Path, args: &[&str]) -> Output {
    ctl.command("sparkctl")
        .env("SPARK_SOCKET", socket)
        .args(args)
        .output()
        .expect("run sparkctl")
}

/// Our `sparkd` in the foreground, bound to `socket`.
fn our_sparkd(ctl: &Ctl, socket: &Path) -> Output {
    ctl.command("sparkd")
        .arg("--socket")
        .arg(socket)
        .output()
        .expect("run sparkd")
}

#[test]
fn another_user_cannot_connect_to_list_or_read_the_socket_directory() {
    if !root_or_skip("another_user_cannot_connect_to_list_or_read_the_socket_directory") {
        return;
    }
    let ctl = traversable_daemon();
    let layout = ctl.home.layout();
    let run_dir = layout.socket_dir().to_path_buf();
    assert_eq!(mode(&run_dir), 0o700);
    let attacker = Attacker::new();

    let out = attacker.run("ls", &[&run_dir.display().to_string()]);
    assert!(!out.status.success(), "nobody listed {}", run_dir.display());
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    let lock = layout.instance_lock().display().to_string();
    let out = attacker.run("cat", &[&lock]);
    assert!(!out.status.success(), "nobody read the lock file");
    assert!(stdout(&out).is_empty());

    let out = attacker.sparkctl(&layout.socket, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("cannot connect to sparkd") && err.contains("Permission denied"),
        "{err}"
    );
    assert!(stdout(&out).is_empty());
    // It did not start a daemon of its own either.
    assert_eq!(ls(attacker.home.path()), Vec::<String>::new());

    let out = ctl.run(["status"]);
    assert!(out.status.success(), "ours still serves: {}", stderr(&out));
}

/// A client with no checks of its own (unlike `sparkctl`, which refuses a daemon of another
/// user): it connects, sends `initialize` and `status`, and prints every byte it gets until
/// the daemon closes, or fails after 10 s.
const RAW_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
got = b""
try:
    s.sendall(sys.argv[2].encode())
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
except (BrokenPipeError, ConnectionResetError):
    # Closed with our request unread: a refusal, as long as nothing came back first.
    pass
sys.stdout.write(repr(got))
"#;

const PYTHON: &str = "/usr/bin/python3";

#[test]
fn the_daemon_closes_a_connection_from_another_uid_even_through_a_loose_socket() {
    if !root_or_skip("the_daemon_closes_a_connection_from_another_uid_even_through_a_loose_socket")
    {
        return;
    }
    if !Path::new(PYTHON).exists() {
        eprintln!("SKIPPED the_daemon_closes_a_connection_from_another_uid…: no {PYTHON}");
        return;
    }
    let ctl = traversable_daemon();
    let layout = ctl.home.layout();
    // As if the user had opened everything up after the daemon started.
    chmod(layout.socket_dir(), 0o777);
    chmod(&layout.socket, 0o777);
    let attacker = Attacker::new();

    let requests = [
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocol_version": spark_proto::PROTOCOL_VERSION,
            "client": {"name": "intruder", "version": "1"}}}),
        serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "status", "params": {}}),
    ]
    .map(|r| format!("{r}\n"))
    .concat();
    let socket = layout.socket.display().to_string();
    for round in 0..2 {
        let out = attacker.run(PYTHON, &["-c", RAW_CLIENT, &socket, &requests]);
        assert!(out.status.success(), "round {round}: {}", stderr(&out));
        assert_eq!(
            stdout(&out),
            "b''",
            "round {round}: the daemon answered another user"
        );
    }
    // sparkctl as that user stops before sending anything.
    let out = attacker.sparkctl(&layout.socket, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the socket is served by uid 0, not by you (uid 65534)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ls(attacker.home.path()), Vec::<String>::new());
    // Two raw clients and sparkctl: the daemon refused all three. sparkctl hangs up as soon as
    // it sees the daemon's uid, so the daemon's line for it may land a moment after it exits.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let refused = |log: &str| log.matches("refusing connection from another user").count();
    let mut log = std::fs::read_to_string(&layout.log_file).expect("daemon log");
    while refused(&log) < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        log = std::fs::read_to_string(&layout.log_file).expect("daemon log");
    }
    assert_eq!(refused(&log), 3, "{log}");

    chmod(layout.socket_dir(), 0o700);
    let out = ctl.run(["status"]);
    assert!(out.status.success(), "ours still serves: {}", stderr(&out));
}

#[test]
fn a_symlink_planted_at_the_socket_directory_or_socket_is_never_followed() {
    if !root_or_skip("a_symlink_planted_at_the_socket_directory_or_socket_is_never_followed") {
        return;
    }
    let ctl = Ctl::new();
    let attacker = Attacker::new();
    let shared = temp_dir("sptmp", 0o1777);
    // A private directory of ours, like `~/.ssh`: following the link would pass every check
    // made on the target.
    let victim = temp_dir("spvic", 0o700);
    std::fs::write(victim.path().join("keep"), b"keep\n").expect("write");
    let planted = shared.path().join("spark-0");
    let out = attacker.run(
        "ln",
        &[
            "-s",
            &victim.path().display().to_string(),
            &planted.display().to_string(),
        ],
    );
    assert!(out.status.success(), "ln as nobody: {}", stderr(&out));
    let socket = planted.join("sparkd.sock");

    let out = our_sparkctl(&ctl, &socket, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("is not private: it is a symbolic link"),
        "{err}"
    );
    let out = our_sparkd(&ctl, &socket);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("it is a symbolic link"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ls(victim.path()), ["keep"]);
    assert_eq!(mode(victim.path()), 0o700);

    // A link in place of the socket itself, in a private directory: not a socket, not replaced.
    let run = temp_dir("sprun", 0o700);
    std::os::unix::fs::symlink(victim.path().join("keep"), run.path().join("sparkd.sock"))
        .expect("symlink");
    let out = our_sparkd(&ctl, &run.path().join("sparkd.sock"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not a socket; refusing to replace it"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(victim.path().join("keep")).expect("read"),
        b"keep\n"
    );
    assert!(
        std::fs::symlink_metadata(run.path().join("sparkd.sock"))
            .expect("link still there")
            .file_type()
            .is_symlink()
    );
}

#[test]
fn a_socket_directory_another_user_created_or_left_open_is_refused_as_it_is() {
    if !root_or_skip("a_socket_directory_another_user_created_or_left_open_is_refused_as_it_is") {
        return;
    }
    let ctl = Ctl::new();
    let attacker = Attacker::new();
    let shared = temp_dir("sptmp", 0o1777);
    let victim = temp_dir("spvic", 0o700);
    let victim_file = victim.path().join("keep");
    std::fs::write(&victim_file, b"keep\n").expect("write");

    // nobody creates the directory first, open to all, with a link where the client's startup
    // lock would go.
    let planted = shared.path().join("spark-0");
    let p = planted.display().to_string();
    for (tool, args) in [
        ("mkdir", vec![p.clone()]),
        ("chmod", vec!["777".into(), p.clone()]),
        (
            "ln",
            vec![
                "-s".into(),
                victim_file.display().to_string(),
                format!("{p}/sparkd.sock.startup.lock"),
            ],
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = attacker.run(tool, &args);
        assert!(out.status.success(), "{tool} as nobody: {}", stderr(&out));
    }
    let socket = planted.join("sparkd.sock");
    let out = our_sparkctl(&ctl, &socket, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("is not private: owned by uid 65534"), "{err}");
    let out = our_sparkd(&ctl, &socket);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("owned by uid 65534"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ls(&planted), ["sparkd.sock.startup.lock"]);
    assert_eq!(std::fs::read(&victim_file).expect("read"), b"keep\n");
    assert_eq!(mode(&victim_file), 0o644);

    // One of ours, left open: refused, not repaired, nothing created in it.
    let open = temp_dir("spopen", 0o777);
    let out = our_sparkd(&ctl, &open.path().join("sparkd.sock"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("mode 777 lets other users in; run `chmod 700"),
        "{err}"
    );
    assert_eq!(mode(open.path()), 0o777);
    assert_eq!(ls(open.path()), Vec::<String>::new());
}

/// Kills `nobody`'s daemon however the test ends.
struct KillOnDrop(Option<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.filter(|p| pid_alive(*p)) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            wait_dead(pid, Duration::from_secs(10));
        }
    }
}

#[test]
fn a_daemon_another_user_serves_in_a_planted_directory_is_never_talked_to() {
    if !root_or_skip("a_daemon_another_user_serves_in_a_planted_directory_is_never_talked_to") {
        return;
    }
    let ctl = Ctl::new();
    let attacker = Attacker::new();
    let shared = temp_dir("sptmp", 0o1777);
    let planted: PathBuf = shared.path().join("spark-0");
    let socket = planted.join("sparkd.sock");

    // nobody gets there first with a real daemon of its own, in a private directory of its own.
    let out = attacker.sparkctl(&socket, &["status"]);
    assert!(out.status.success(), "nobody's daemon: {}", stderr(&out));
    let theirs: i32 = std::fs::read_to_string(planted.join("sparkd.sock.lock"))
        .expect("nobody's lock")
        .trim()
        .parse()
        .expect("pid");
    let _cleanup = KillOnDrop(Some(theirs));
    assert_eq!(
        std::fs::metadata(&planted).expect("stat").uid(),
        NOBODY,
        "the directory is nobody's"
    );

    let out = our_sparkctl(&ctl, &socket, &["status"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "talked to nobody's daemon: {}",
        stdout(&out)
    );
    assert!(stdout(&out).is_empty(), "stdout: {}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("the socket is served by uid 65534, not by you (uid 0)"),
        "{err}"
    );
    let out = our_sparkctl(&ctl, &socket, &["log"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(pid_alive(theirs));
}
