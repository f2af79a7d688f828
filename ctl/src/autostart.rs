//! Find the daemon, or start it (sccache/emacsclient style).
//!
//! 1. Connect and handshake. A daemon of another version is asked to shut down and replaced.
//! 2. Nobody answers: take the startup lock (so concurrent clients start one daemon), connect
//!    once more (another client may have just started it), then spawn `sparkd --detached` — the
//!    one next to this executable first, then from `PATH` — in its own process group with its
//!    output appended to the log, and wait (bounded) for its `ready` line before connecting.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use spark_proto::layout::Layout;
use spark_proto::methods::{Empty, InitializeResult, Shutdown};

use crate::{Client, ClientError};

/// How long a started daemon may take to say it is ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for another client that holds the startup lock, or for an old daemon to exit.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(15);

/// A connected, initialized client, and whether this call started the daemon.
#[derive(Debug)]
pub struct Connected {
    pub client: Client,
    pub daemon: InitializeResult,
    /// Set when this call started (or restarted) the daemon.
    pub started: Option<Started>,
}

/// What [`connect`] did to get a daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    Fresh,
    /// A daemon of this version replaced one of `old_version`.
    Replaced {
        old_version: String,
    },
}

/// Connect to the daemon for `layout`, starting it if nobody answers.
pub fn connect(layout: &Layout, client_name: &str) -> Result<Connected, ClientError> {
    let mut replaced = None;
    match Client::open(&layout.socket, client_name) {
        Ok((client, daemon)) if daemon.daemon_version == crate::VERSION => {
            return Ok(Connected {
                client,
                daemon,
                started: None,
            });
        }
        Ok((client, daemon)) => {
            stop_and_wait(client, daemon.pid, layout)?;
            replaced = Some(daemon.daemon_version);
        }
        Err(e) if e.is_not_running() => {}
        Err(ClientError::Rpc(e))
            if e.error_code() == Some(spark_proto::ErrorCode::VersionMismatch) =>
        {
            // It speaks another protocol, so it cannot be asked to stop: signal it instead.
            terminate_by_pid(layout)?;
            replaced = Some(format!("of another protocol ({e})"));
        }
        Err(e) => return Err(e),
    }

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(layout.socket_dir())
        .map_err(|e| {
            start_err(
                format!("cannot create {}: {e}", layout.socket_dir().display()),
                layout,
            )
        })?;
    check_private_dir(layout.socket_dir()).map_err(|e| start_err(e, layout))?;
    let _guard = lock_with_timeout(&layout.startup_lock(), LOCK_TIMEOUT).map_err(|e| {
        start_err(
            format!("startup lock {}: {e}", layout.startup_lock().display()),
            layout,
        )
    })?;
    if replaced.is_none() {
        match Client::open(&layout.socket, client_name) {
            Ok((client, daemon)) => {
                return Ok(Connected {
                    client,
                    daemon,
                    started: None,
                });
            }
            Err(e) if e.is_not_running() => {}
            Err(e) => return Err(e),
        }
    }
    spawn_daemon(layout)?;
    let (client, daemon) = Client::open(&layout.socket, client_name)?;
    let started = Some(match replaced {
        Some(old_version) => Started::Replaced { old_version },
        None => Started::Fresh,
    });
    Ok(Connected {
        client,
        daemon,
        started,
    })
}

/// Ask the daemon (process `pid`) on `client` to shut down and wait until it has exited; it
/// removes its socket before that.
pub fn stop_and_wait(mut client: Client, pid: u32, layout: &Layout) -> Result<(), ClientError> {
    let pid = i32::try_from(pid).map_err(|_| start_err(format!("bad daemon pid {pid}"), layout))?;
    client.call::<Shutdown>(&Empty {})?;
    client.wait_closed()?;
    // The lock is released as the process exits; the pidfd then confirms the exit itself.
    lock_with_timeout(&layout.instance_lock(), LOCK_TIMEOUT)
        .map_err(|e| start_err(format!("sparkd did not exit: {e}"), layout))?;
    wait_exit(pid, LOCK_TIMEOUT);
    Ok(())
}

/// Wait at most `limit` for process `pid` to exit; true once it has (or it does not exist).
pub fn wait_exit(pid: i32, limit: Duration) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    use rustix::process::{Pid, PidfdFlags, pidfd_open};
    let Some(pid) = Pid::from_raw(pid) else {
        return true;
    };
    let Ok(fd) = pidfd_open(pid, PidfdFlags::empty()) else {
        return true;
    };
    let timeout = Timespec {
        tv_sec: limit.as_secs() as i64,
        tv_nsec: i64::from(limit.subsec_nanos()),
    };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    loop {
        match poll(&mut fds, Some(&timeout)) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
}

/// SIGTERM the daemon whose pid is in the instance lock, and wait for it to exit.
fn terminate_by_pid(layout: &Layout) -> Result<(), ClientError> {
    let lock = layout.instance_lock();
    let pid = std::fs::read_to_string(&lock)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| {
            start_err(
                format!("cannot read the old daemon's pid from {}", lock.display()),
                layout,
            )
        })?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).map_err(|e| {
        start_err(
            format!(
                "cannot stop the old daemon (pid {}): {e}",
                pid.as_raw_nonzero()
            ),
            layout,
        )
    })?;
    lock_with_timeout(&lock, LOCK_TIMEOUT)
        .map(drop)
        .map_err(|e| start_err(format!("the old daemon did not exit: {e}"), layout))
}

fn start_err(message: String, layout: &Layout) -> ClientError {
    ClientError::Start {
        message,
        log: Some(layout.log_file.clone()),
    }
}

/// The same rule sparkd applies before binding (docs/protocol.md, "Security"), checked
/// before the startup lock is created in the directory: never through a symbolic link, never
/// in a directory another user owns or can enter.
fn check_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let not_private =
        |why: String| format!("socket directory {} is not private: {why}", dir.display());
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    if meta.file_type().is_symlink() {
        return Err(not_private("it is a symbolic link, which is never followed; remove it (or point SPARK_SOCKET at another directory)".into()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(not_private(format!(
            "owned by uid {}, not {me}; remove it or point SPARK_SOCKET at a directory of yours",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(not_private(format!(
            "mode {:o} lets other users in; run `chmod 700 {}`",
            meta.mode() & 0o777,
            dir.display()
        )));
    }
    Ok(())
}

/// Take an exclusive lock on `path`, waiting at most `timeout`.
fn lock_with_timeout(path: &Path, timeout: Duration) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        // A link planted in place of the lock is refused, not followed.
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    if file.try_lock().is_ok() {
        return Ok(file);
    }
    // std's blocking lock has no timeout: wait on a helper thread and give up on it if needed.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = file.lock().map(|()| file);
        let _ = tx.send(r);
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("still held after {timeout:?}"),
        )),
    }
}

/// The `sparkd` binary: next to this executable first, then on `PATH`.
pub fn find_sparkd() -> Option<PathBuf> {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("sparkd")));
    if let Some(p) = sibling.filter(|p| p.is_file()) {
        return Some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("sparkd"))
        .find(|p| p.is_file())
}

fn spawn_daemon(layout: &Layout) -> Result<(), ClientError> {
    let sparkd = find_sparkd().ok_or_else(|| ClientError::Start {
        message: "sparkd not found next to sparkctl or on PATH".into(),
        log: None,
    })?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&layout.state_dir)
        .map_err(|e| {
            start_err(
                format!("cannot create {}: {e}", layout.state_dir.display()),
                layout,
            )
        })?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&layout.log_file)
        .map_err(|e| {
            start_err(
                format!("cannot open {}: {e}", layout.log_file.display()),
                layout,
            )
        })?;
    let mut child = Command::new(&sparkd)
        .arg("--detached")
        .arg("--socket")
        .arg(&layout.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Its own process group: a Ctrl-C meant for the client must not reach the daemon.
        .process_group(0)
        .spawn()
        .map_err(|e| start_err(format!("cannot run {}: {e}", sparkd.display()), layout))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| start_err("no stdout pipe".into(), layout))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(line)) if line.starts_with("ready ") => Ok(()),
        Ok(_) => {
            // The daemon exited without becoming ready. Exit 1 means another daemon took the
            // socket first (started by hand, say): connecting will reach that one.
            let status = child.wait().ok();
            if status.and_then(|s| s.code()) == Some(1) {
                return Ok(());
            }
            let status = status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "unknown status".into());
            Err(start_err(
                format!(
                    "sparkd exited ({status}) before it was ready{}",
                    last_log_line(&layout.log_file)
                ),
                layout,
            ))
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(start_err(
                format!("sparkd was not ready within {READY_TIMEOUT:?}"),
                layout,
            ))
        }
    }
}

fn last_log_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| format!(": {}", l.trim()))
        })
        .unwrap_or_default()
}
