//! A remote development box: the daemon runs next to the repository on the "remote" side, and
//! `sparkctl` on the "laptop" reaches it through OpenSSH's Unix-socket forwarding
//! (`ssh -L laptop.sock:remote.sock`), as the README describes. A real `sshd` on 127.0.0.1 with
//! its own host key, config and authorized key, run as the current user; both sides are this
//! machine, with separate spark homes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use spark_tests::{Ctl, Home, TestRepo, stderr, stdout};

const LIB: &str = "fn one() {\n    1\n}\n";
const PATCH_ONE: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn one() {\n-    1\n+    100\n*** End Patch\n";
/// Tries at a free port: another process may take the port between our probe and sshd's bind.
const PORT_ATTEMPTS: usize = 3;

/// `sshd`: `SPARK_TEST_SSHD` (exported by `.ci/run`), else Debian's path, else `PATH`.
fn find_sshd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = std::env::var_os("SPARK_TEST_SSHD")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(PathBuf::from("/usr/sbin/sshd"));
    candidates.extend(std::env::split_paths(&path).map(|d| d.join("sshd")));
    candidates.into_iter().find(|p| p.is_file())
}

fn on_path(name: &str) -> bool {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join(name).is_file())
}

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
    stdout(&out)
}

/// Read `lines` until one contains `needle`; all lines read so far on failure.
fn wait_for_line(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    needle: &str,
) -> Result<(), Vec<String>> {
    let mut seen = Vec::new();
    for line in lines {
        let Ok(line) = line else { break };
        if line.contains(needle) {
            return Ok(());
        }
        seen.push(line);
    }
    Err(seen)
}

/// An sshd of our own on 127.0.0.1: host key, config and authorized key under `dir`.
struct Sshd {
    _child: Killed,
    port: u16,
    host_pub: String,
}

fn start_sshd(sshd: &Path, dir: &Path, user_pub: &Path) -> Sshd {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(dir.join("host_key")));
    std::fs::copy(user_pub, dir.join("authorized_keys")).expect("authorized_keys");
    // Run as root, sshd insists on its privilege-separation directory (the Debian service
    // creates it at boot); as any other user it needs none.
    if rustix::process::geteuid().is_root() {
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
    }
    let mut failures = Vec::new();
    for _ in 0..PORT_ATTEMPTS {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("probe a free port")
            .port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPidFile none\n\
                 # The temp dir sits in world-writable /tmp, which StrictModes refuses.\n\
                 StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nPermitRootLogin prohibit-password\n\
                 # Unix-socket forwards are denied unless local TCP forwarding is allowed too.\n\
                 AllowTcpForwarding local\nAllowStreamLocalForwarding local\nLogLevel INFO\n",
                d = dir.display()
            ),
        )
        .expect("sshd_config");
        let mut child = Command::new(sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sshd");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        match wait_for_line(&mut lines, "Server listening on 127.0.0.1") {
            Ok(()) => {
                // Keep draining its log so that sshd never blocks on a full pipe.
                std::thread::spawn(move || lines.for_each(drop));
                let host_pub = std::fs::read_to_string(dir.join("host_key.pub")).expect("host key");
                return Sshd {
                    _child: Killed(child),
                    port,
                    host_pub: host_pub.trim().to_owned(),
                };
            }
            Err(seen) => {
                let _ = child.wait();
                failures.push(seen);
            }
        }
    }
    panic!("sshd did not start: {failures:?}");
}

/// `ssh -N -L laptop:remote` to our sshd; returns once the local socket listens.
fn forward(sshd: &Sshd, dir: &Path, laptop: &Path, remote: &Path) -> Killed {
    let user = run(Command::new("id").arg("-un")).trim().to_owned();
    let mut child = Command::new("ssh")
        .args(["-v", "-N", "-F", "/dev/null", "-p", &sshd.port.to_string()])
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
        .arg("-i")
        .arg(dir.join("user_key"))
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            dir.join("known_hosts").display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ExitOnForwardFailure=yes",
        ])
        .args(["-o", "StreamLocalBindUnlink=yes"])
        .arg("-L")
        .arg(format!("{}:{}", laptop.display(), remote.display()))
        .arg(format!("{user}@127.0.0.1"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    if let Err(seen) = wait_for_line(&mut lines, "Local forwarding listening on path") {
        let _ = child.wait();
        panic!("ssh did not forward: {seen:?}");
    }
    std::thread::spawn(move || lines.for_each(drop));
    Killed(child)
}

#[test]
fn sparkctl_on_the_laptop_reaches_the_remote_daemon_through_an_ssh_forwarded_socket() {
    let Some(sshd_bin) = find_sshd() else {
        eprintln!(
            "\n*** SKIPPED: the SSH forwarding test needs OpenSSH's sshd (Debian: apt-get install \
             openssh-server; .ci/run installs it), and it was not found ***\n"
        );
        return;
    };
    assert!(
        on_path("ssh") && on_path("ssh-keygen"),
        "sshd is installed but ssh or ssh-keygen is not on PATH"
    );
    let dir = tempfile::Builder::new()
        .prefix("ssh")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let d = dir.path();
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(d.join("user_key")));
    let sshd = start_sshd(&sshd_bin, d, &d.join("user_key.pub"));
    std::fs::write(
        d.join("known_hosts"),
        format!("[127.0.0.1]:{} {}\n", sshd.port, sshd.host_pub),
    )
    .expect("known_hosts");

    // The remote box: its daemon, started as usual, next to the repository.
    let remote = Ctl::new();
    let repo = TestRepo::with_files(&[("src/lib.rs", LIB.as_bytes())]);
    let out = remote.run(["--json", "status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let remote_status: Value = serde_json::from_str(stdout(&out).trim()).expect("status");
    let remote_socket = remote.home.layout().socket;

    // The laptop: its own spark home, and SPARK_SOCKET at the forwarded socket in a private dir.
    let laptop_home = Home::new();
    let laptop_dir = d.join("laptop");
    std::fs::create_dir(&laptop_dir).expect("laptop dir");
    std::fs::set_permissions(&laptop_dir, std::fs::Permissions::from_mode(0o700)).expect("0700");
    let laptop_socket = laptop_dir.join("sparkd.sock");
    // A socket file left by an earlier ssh: StreamLocalBindUnlink replaces it.
    std::os::unix::net::UnixListener::bind(&laptop_socket).expect("stale socket");
    let _tunnel = forward(&sshd, d, &laptop_socket, &remote_socket);
    let mode = std::fs::metadata(&laptop_socket)
        .expect("forwarded socket")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "ssh binds the laptop socket for its owner only"
    );
    let owner = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(&laptop_socket).expect("forwarded socket"),
    );
    assert_eq!(
        owner,
        rustix::process::geteuid().as_raw(),
        "and owned by this user"
    );

    let laptop = |args: &[&str], stdin: Option<&str>| {
        let mut cmd = remote.command("sparkctl");
        cmd.env("HOME", laptop_home.path())
            .env("SPARK_HOME", laptop_home.path())
            .env("SPARK_SOCKET", &laptop_socket)
            .current_dir(repo.path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn sparkctl");
        let mut input = child.stdin.take().expect("stdin");
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).expect("stdin");
        }
        drop(input);
        child.wait_with_output().expect("sparkctl")
    };

    let out = laptop(&["--json", "status"], None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\nremote log:\n{}",
        stderr(&out),
        std::fs::read_to_string(remote.home.layout().log_file).unwrap_or_default()
    );
    let status: Value = serde_json::from_str(stdout(&out).trim()).expect("status");
    assert_eq!(
        status["pid"], remote_status["pid"],
        "the remote daemon answered"
    );
    assert_eq!(status["socket"], remote_socket.display().to_string());

    let out = laptop(&["apply", "-m", "one bigger"], Some(PATCH_ONE));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("applied edit "), "{}", stdout(&out));
    assert_eq!(repo.read("src/lib.rs"), b"fn one() {\n    100\n}\n");
    let out = laptop(&["log"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("applied  one bigger"),
        "{}",
        stdout(&out)
    );
    // git on the remote sees the edit the laptop made.
    assert!(repo.git(&["stash", "list"]).is_empty());
    let out = laptop(&["--json", "log"], None);
    let log: Value = serde_json::from_str(stdout(&out).trim()).expect("log");
    let id = log["edits"][0]["id"].as_str().expect("id").to_owned();
    assert!(repo.git(&["stash", "show", "-p", &id]).contains("+    100"));

    // The daemon's peer check held: every connection came from this user, through sshd, and
    // none was refused; the laptop started no daemon of its own.
    assert!(
        !laptop_home.layout().instance_lock().exists(),
        "no laptop daemon"
    );
    assert!(remote.run(["stop"]).status.success());
    let log = std::fs::read_to_string(remote.home.layout().log_file).expect("remote log");
    assert!(!log.contains("refusing connection"), "{log}");
    assert!(log.matches("initialized").count() >= 5, "{log}");
}
