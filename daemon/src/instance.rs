//! One daemon per socket: the private socket directory, the instance lock, stale-socket
//! recovery and the listener itself.
//!
//! Order matters. The lock is taken before the socket is looked at, so two starting daemons
//! cannot both decide a socket is stale. A socket that still answers belongs to a live daemon
//! and is never replaced; one that refuses connections is left over from a crash and is removed.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use interprocess::local_socket::tokio::Listener;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use interprocess::os::unix::local_socket::ListenerOptionsExt;

/// Linux's `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Why the daemon could not take its socket.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("sparkd is already running (pid {pid}) on {socket}")]
    AlreadyRunning { pid: String, socket: String },
    #[error(
        "socket path {0} is longer than {MAX_SOCKET_PATH} bytes; set SPARK_SOCKET to a shorter path"
    )]
    PathTooLong(String),
    #[error("socket directory {path} is not private: {reason}")]
    UnsafeDirectory { path: String, reason: String },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: String },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstanceError {
    let path = path.display().to_string();
    move |source| InstanceError::Io { op, path, source }
}

/// The daemon's claim on its socket: the held lock, the listener, and the path to clean up.
#[derive(Debug)]
pub struct Instance {
    pub(crate) listener: Listener,
    pub(crate) socket: PathBuf,
    // Held for the daemon's life; the kernel releases it even on `kill -9`.
    _lock: File,
}

impl Instance {
    /// Take the instance lock for `socket` and bind it, replacing a stale socket.
    pub fn claim(socket: &Path, lock_path: &Path) -> Result<Instance, InstanceError> {
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(InstanceError::PathTooLong(socket.display().to_string()));
        }
        let dir = socket.parent().unwrap_or(Path::new("/"));
        ensure_private_dir(dir)?;

        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(lock_path)
            .map_err(io_err("open lock file", lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                // Best effort: the holder writes its pid right after binding.
                let _ = lock.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(InstanceError::AlreadyRunning {
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.to_owned()
                    },
                    socket: socket.display().to_string(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_err("lock", lock_path)(e)),
        }

        remove_if_stale(socket)?;
        let name = socket
            .to_fs_name::<GenericFilePath>()
            .map_err(io_err("name socket", socket))?;
        let listener = ListenerOptions::new()
            .name(name)
            .mode(0o600)
            .reclaim_name(false)
            .create_tokio()
            .map_err(io_err("bind socket", socket))?;
        // interprocess applies the mode at bind time; make it explicit regardless of umask.
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("set permissions of", socket))?;

        lock.set_len(0).map_err(io_err("write", lock_path))?;
        lock.rewind().map_err(io_err("write", lock_path))?;
        write!(lock, "{}", std::process::id()).map_err(io_err("write", lock_path))?;
        Ok(Instance {
            listener,
            socket: socket.to_owned(),
            _lock: lock,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

/// Create `dir` (0700) if missing; refuse one that others can enter or that we do not own.
///
/// The directory itself is never followed if it is a symbolic link: in a shared parent such as
/// `/tmp`, another user can plant `spark-<uid>` as a link to a directory of their choosing (or
/// of ours, like `~/.ssh`, where a "stale socket" would then be removed). A directory we own
/// with loose permissions is refused rather than repaired, since whatever was planted in it
/// while it was open would stay; the message says how to fix it.
pub fn ensure_private_dir(dir: &Path) -> Result<(), InstanceError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_err("create directory", parent))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        // mkdir(2) never follows a final symlink, so an existing one lands here too.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("create directory", dir)(e)),
    }
    let unsafe_dir = |reason: String| InstanceError::UnsafeDirectory {
        path: dir.display().to_string(),
        reason,
    };
    let link = std::fs::symlink_metadata(dir).map_err(io_err("inspect", dir))?;
    if link.file_type().is_symlink() {
        return Err(unsafe_dir(
            "it is a symbolic link, which is never followed; remove it (or point SPARK_SOCKET at another directory)".into(),
        ));
    }
    // Checked on the opened directory, not the path, so a swap after the look above is seen.
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| io_err("open directory", dir)(e.into()))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| io_err("inspect", dir)(e.into()))?;
    let me = rustix::process::geteuid().as_raw();
    if st.st_uid != me {
        return Err(unsafe_dir(format!(
            "owned by uid {}, not {me}; remove it or point SPARK_SOCKET at a directory of yours",
            st.st_uid
        )));
    }
    let mode = st.st_mode & 0o777;
    if mode & 0o077 != 0 {
        return Err(unsafe_dir(format!(
            "mode {mode:o} lets other users in; run `chmod 700 {}`",
            dir.display()
        )));
    }
    Ok(())
}

/// Remove a socket file nobody answers on. Called with the instance lock held.
fn remove_if_stale(socket: &Path) -> Result<(), InstanceError> {
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect", socket)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(InstanceError::NotASocket {
            path: socket.display().to_string(),
        });
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => Err(InstanceError::AlreadyRunning {
            pid: "unknown".into(),
            socket: socket.display().to_string(),
        }),
        Err(_) => {
            tracing::info!(socket = %socket.display(), "removing stale socket");
            std::fs::remove_file(socket).map_err(io_err("remove stale socket", socket))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn second_claim_is_refused_and_stale_socket_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run/s.sock");
        let lock = dir.path().join("run/s.sock.lock");
        let first = Instance::claim(&socket, &lock).expect("first claim");
        let err = Instance::claim(&socket, &lock).expect_err("second claim");
        assert!(
            matches!(&err, InstanceError::AlreadyRunning { pid, .. } if *pid == std::process::id().to_string()),
            "{err}"
        );
        let mode = std::fs::metadata(dir.path().join("run"))
            .expect("dir")
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        let mode = std::fs::metadata(&socket).expect("socket").mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(first);

        // The file is left behind, as after a crash: the next claim replaces it.
        assert!(socket.exists());
        let _again = Instance::claim(&socket, &lock).expect("claim over stale socket");
    }

    #[tokio::test]
    async fn refuses_to_replace_a_regular_file_or_use_an_open_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let socket = dir.path().join("s.sock");
        std::fs::write(&socket, b"user data").expect("write");
        let err = Instance::claim(&socket, &dir.path().join("l")).expect_err("not a socket");
        assert!(matches!(err, InstanceError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&socket).expect("read"), b"user data");

        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let err = Instance::claim(&open.join("s.sock"), &open.join("l")).expect_err("open dir");
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }

    #[tokio::test]
    async fn a_symlink_at_the_socket_directory_or_lock_is_never_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        // A private directory of ours the link points at: checking the target would pass.
        let target = dir.path().join("target");
        std::fs::create_dir(&target).expect("mkdir");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let link = dir.path().join("run");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let err = Instance::claim(&link.join("s.sock"), &link.join("s.sock.lock"))
            .expect_err("symlinked directory");
        assert!(
            matches!(&err, InstanceError::UnsafeDirectory { reason, .. } if reason.contains("symbolic link")),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(&target).expect("ls").count(), 0);

        // A link planted at the lock path is not opened through either.
        let run = dir.path().join("real");
        std::fs::create_dir(&run).expect("mkdir");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").expect("write");
        std::os::unix::fs::symlink(&victim, run.join("s.sock.lock")).expect("symlink");
        let err = Instance::claim(&run.join("s.sock"), &run.join("s.sock.lock"))
            .expect_err("symlinked lock");
        assert!(
            matches!(
                err,
                InstanceError::Io {
                    op: "open lock file",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(std::fs::read(&victim).expect("read"), b"keep");
        assert!(!run.join("s.sock").exists());
    }

    #[tokio::test]
    async fn a_loose_directory_of_ours_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = ensure_private_dir(&open).expect_err("0777");
        assert!(err.to_string().contains("mode 777"), "{err}");
        let mode = std::fs::metadata(&open).expect("stat").mode() & 0o777;
        assert_eq!(
            mode, 0o777,
            "the daemon must not repair a directory it refuses"
        );
    }
}
