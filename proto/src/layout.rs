//! Where spark keeps its files, derived from the environment the same way by the daemon and by
//! every client, so that both find the same socket without reading any config file.
//!
//! With `SPARK_HOME` set, everything lives under it (tests use this). Otherwise XDG: config in
//! `$XDG_CONFIG_HOME/spark`, state in `$XDG_STATE_HOME/spark`, the socket in
//! `$XDG_RUNTIME_DIR/spark` or a private per-user directory in `/tmp`. `SPARK_SOCKET` overrides
//! the socket path in both cases.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

/// File name of the socket inside its directory.
pub const SOCKET_NAME: &str = "sparkd.sock";
/// File name of the daemon log inside the state directory.
pub const LOG_NAME: &str = "sparkd.log";

/// Every path spark uses, absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub config_file: PathBuf,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub socket: PathBuf,
    pub log_file: PathBuf,
}

/// The environment gives no usable base directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutError(pub String);

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LayoutError {}

impl Layout {
    /// Derive the layout from environment variables read through `var`, for user `uid`.
    pub fn from_env(
        var: impl Fn(&str) -> Option<OsString>,
        uid: u32,
    ) -> Result<Layout, LayoutError> {
        let abs = |name: &str| -> Result<Option<PathBuf>, LayoutError> {
            match var(name).filter(|v| !v.is_empty()).map(PathBuf::from) {
                Some(p) if p.is_absolute() => Ok(Some(p)),
                Some(p) => Err(LayoutError(format!(
                    "{name} must be an absolute path, got {}",
                    p.display()
                ))),
                None => Ok(None),
            }
        };
        let socket_override = abs("SPARK_SOCKET")?;
        let mut layout = if let Some(home) = abs("SPARK_HOME")? {
            Layout {
                config_file: home.join("config.toml"),
                state_dir: home.join("state"),
                cache_dir: home.join("cache"),
                socket: home.join("run").join(SOCKET_NAME),
                log_file: home.join("state").join(LOG_NAME),
            }
        } else {
            let home = abs("HOME")?;
            let xdg = |name: &str, rel: &str| -> Result<PathBuf, LayoutError> {
                match (abs(name)?, &home) {
                    (Some(p), _) => Ok(p.join("spark")),
                    (None, Some(h)) => Ok(h.join(rel).join("spark")),
                    (None, None) => Err(LayoutError(format!(
                        "neither {name} nor HOME is set; set SPARK_HOME to choose where spark keeps its files"
                    ))),
                }
            };
            let state_dir = xdg("XDG_STATE_HOME", ".local/state")?;
            let run_dir = match abs("XDG_RUNTIME_DIR")? {
                Some(p) => p.join("spark"),
                None => PathBuf::from(format!("/tmp/spark-{uid}")),
            };
            Layout {
                config_file: xdg("XDG_CONFIG_HOME", ".config")?.join("config.toml"),
                cache_dir: state_dir.join("cache"),
                log_file: state_dir.join(LOG_NAME),
                state_dir,
                socket: run_dir.join(SOCKET_NAME),
            }
        };
        if let Some(s) = socket_override {
            layout.socket = s;
        }
        Ok(layout)
    }

    /// The directory holding the socket; must be private (0700) to the user.
    pub fn socket_dir(&self) -> &Path {
        self.socket.parent().unwrap_or(Path::new("/"))
    }

    /// Lock held by the running daemon for its whole life: one daemon per socket.
    pub fn instance_lock(&self) -> PathBuf {
        with_suffix(&self.socket, ".lock")
    }

    /// Lock held by a client while it starts a daemon, so concurrent clients start only one.
    pub fn startup_lock(&self) -> PathBuf {
        with_suffix(&self.socket, ".startup.lock")
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn spark_home_holds_everything() {
        let l = Layout::from_env(env(&[("SPARK_HOME", "/h"), ("HOME", "/u")]), 5).expect("layout");
        assert_eq!(l.config_file, PathBuf::from("/h/config.toml"));
        assert_eq!(l.socket, PathBuf::from("/h/run/sparkd.sock"));
        assert_eq!(l.log_file, PathBuf::from("/h/state/sparkd.log"));
        assert_eq!(l.instance_lock(), PathBuf::from("/h/run/sparkd.sock.lock"));
    }

    #[test]
    fn xdg_and_fallbacks() {
        let l = Layout::from_env(
            env(&[("HOME", "/u"), ("XDG_RUNTIME_DIR", "/run/user/5")]),
            5,
        )
        .expect("layout");
        assert_eq!(l.config_file, PathBuf::from("/u/.config/spark/config.toml"));
        assert_eq!(l.state_dir, PathBuf::from("/u/.local/state/spark"));
        assert_eq!(l.socket, PathBuf::from("/run/user/5/spark/sparkd.sock"));

        let l =
            Layout::from_env(env(&[("HOME", "/u"), ("XDG_STATE_HOME", "/s")]), 7).expect("layout");
        assert_eq!(l.state_dir, PathBuf::from("/s/spark"));
        assert_eq!(l.socket, PathBuf::from("/tmp/spark-7/sparkd.sock"));
    }

    #[test]
    fn socket_override_and_relative_paths() {
        let l = Layout::from_env(
            env(&[("SPARK_HOME", "/h"), ("SPARK_SOCKET", "/x/s.sock")]),
            1,
        )
        .expect("layout");
        assert_eq!(l.socket, PathBuf::from("/x/s.sock"));
        let e = Layout::from_env(env(&[("SPARK_HOME", "rel")]), 1).expect_err("relative");
        assert!(e.0.contains("SPARK_HOME must be an absolute path"), "{e}");
        let e = Layout::from_env(env(&[]), 1).expect_err("no home");
        assert!(e.0.contains("SPARK_HOME"), "{e}");
    }
}
