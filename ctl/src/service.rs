//! `sparkctl service`: run `sparkd` under the user's service manager instead of on demand — a
//! systemd user unit on Linux, a launchd agent on macOS. The daemon runs in the foreground
//! (logging to stderr as well, which journald collects), is restarted when it fails, and binds
//! the socket path the installing shell resolves, passed explicitly so that every client finds
//! it. Auto-start stays as it is: a client that finds no daemon still starts one.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use spark_proto::layout::Layout;

/// The systemd unit's file name.
pub const SYSTEMD_UNIT: &str = "sparkd.service";
/// The launchd agent's label (and plist file name without `.plist`).
pub const LAUNCHD_LABEL: &str = "dev.spark.sparkd";
/// Environment variables the daemon's paths derive from (besides the socket, passed as a flag):
/// the service gets those set in the installing shell so that it uses the same files.
const LAYOUT_VARS: [&str; 3] = ["SPARK_HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME"];
/// A service has no shell to go idle in: it must not exit when no client is connected, or
/// `Restart=on-failure` would leave it stopped.
const NO_IDLE_EXIT: &str = "0";

/// The service manager of this platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    Systemd,
    Launchd,
}

impl Manager {
    pub const fn current() -> Manager {
        if cfg!(target_os = "macos") {
            Manager::Launchd
        } else {
            Manager::Systemd
        }
    }
}

/// What the service runs: resolved once from the installing shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Absolute path of `sparkd`.
    pub sparkd: PathBuf,
    pub socket: PathBuf,
    /// Where the daemon's own log lives (launchd's stderr file goes beside it).
    pub state_dir: PathBuf,
    /// The layout variables set in the installing shell, in [`LAYOUT_VARS`] order.
    pub env: Vec<(String, String)>,
}

/// Why a service file could not be placed, generated or removed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("neither XDG_CONFIG_HOME nor HOME is set, so there is no place for the unit file")]
    NoConfigHome,
    #[error("{0} is not an absolute path")]
    NotAbsolute(&'static str),
    #[error("{what} is not valid UTF-8, which a unit file cannot hold: {path}")]
    NotUtf8 { what: &'static str, path: String },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
}

impl ServiceSpec {
    /// The spec for `sparkd` at `sparkd`, serving `layout`, with the layout variables read
    /// through `var`.
    pub fn new(
        sparkd: PathBuf,
        layout: &Layout,
        var: impl Fn(&str) -> Option<OsString>,
    ) -> Result<ServiceSpec, ServiceError> {
        let env = LAYOUT_VARS
            .iter()
            .filter_map(|name| {
                var(name)
                    .filter(|v| !v.is_empty())
                    .map(|v| (*name, v.into_string()))
            })
            .map(|(name, v)| match v {
                Ok(v) => Ok((name.to_owned(), v)),
                Err(bad) => Err(ServiceError::NotUtf8 {
                    what: name,
                    path: bad.to_string_lossy().into_owned(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = ServiceSpec {
            sparkd,
            socket: layout.socket.clone(),
            state_dir: layout.state_dir.clone(),
            env,
        };
        for (what, p) in [("sparkd", &spec.sparkd), ("the socket path", &spec.socket)] {
            if p.to_str().is_none() {
                return Err(ServiceError::NotUtf8 {
                    what,
                    path: p.display().to_string(),
                });
            }
        }
        Ok(spec)
    }

    /// `sparkd --socket <socket> --idle-timeout 0`: the command line both managers run.
    pub fn argv(&self) -> Vec<String> {
        vec![
            self.sparkd.display().to_string(),
            "--socket".to_owned(),
            self.socket.display().to_string(),
            "--idle-timeout".to_owned(),
            NO_IDLE_EXIT.to_owned(),
        ]
    }
}

/// Where the systemd user unit goes: `$XDG_CONFIG_HOME/systemd/user/`, else
/// `~/.config/systemd/user/`, as systemd looks for it.
pub fn systemd_unit_path(var: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, ServiceError> {
    let abs = |name: &'static str| -> Result<Option<PathBuf>, ServiceError> {
        match var(name).filter(|v| !v.is_empty()).map(PathBuf::from) {
            Some(p) if p.is_absolute() => Ok(Some(p)),
            Some(_) => Err(ServiceError::NotAbsolute(name)),
            None => Ok(None),
        }
    };
    let base = match abs("XDG_CONFIG_HOME")? {
        Some(p) => p,
        None => abs("HOME")?
            .ok_or(ServiceError::NoConfigHome)?
            .join(".config"),
    };
    Ok(base.join("systemd").join("user").join(SYSTEMD_UNIT))
}

/// Where the launchd agent goes: `~/Library/LaunchAgents/<label>.plist`.
pub fn launchd_plist_path(var: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, ServiceError> {
    let home = var("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .ok_or(ServiceError::NoConfigHome)?;
    if !home.is_absolute() {
        return Err(ServiceError::NotAbsolute("HOME"));
    }
    Ok(home
        .join("Library")
        .join("LaunchAgents")
        .join(format!("{LAUNCHD_LABEL}.plist")))
}

/// The systemd user unit. `Type=simple`: the daemon is ready once its socket is bound, and a
/// client that comes earlier waits on the socket as it does today; SIGTERM (systemd's stop)
/// drains and exits 0, within `TimeoutStopSec`. Exit 1 means another daemon already serves the
/// socket: restarting would only fail again.
pub fn systemd_unit(spec: &ServiceSpec) -> String {
    let exec = spec
        .argv()
        .iter()
        .map(|a| systemd_quote(a, true))
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = String::from(
        "# Written by `sparkctl service install`; `sparkctl service uninstall` removes it.\n\
         [Unit]\n\
         Description=spark daemon: warm model sessions and journaled code edits\n\
         \n\
         [Service]\n\
         Type=simple\n",
    );
    for (k, v) in &spec.env {
        out += &format!(
            "Environment={}\n",
            systemd_quote(&format!("{k}={v}"), false)
        );
    }
    out += &format!(
        "ExecStart={exec}\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         RestartPreventExitStatus=1\n\
         TimeoutStopSec=15\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n"
    );
    out
}

/// One word of a unit file's command line (`exec`) or `Environment=`: `%` is a specifier, so
/// doubled; words with spaces, quotes or backslashes are double-quoted with C-style escapes;
/// on a command line `$` would expand a variable, so it is doubled too.
fn systemd_quote(word: &str, exec: bool) -> String {
    let word = word.replace('%', "%%");
    if !word.is_empty()
        && !word
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';' | '$'))
    {
        return word;
    }
    let mut out = String::from("\"");
    for c in word.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            // `$` would expand an environment variable.
            '$' if exec => out += "$$",
            '\n' => out += "\\n",
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The launchd agent: run at login, restarted when it exits unsuccessfully (`KeepAlive`
/// `SuccessfulExit` false), its stderr in a file beside the daemon log since launchd has no
/// journal.
pub fn launchd_plist(spec: &ServiceSpec) -> String {
    let mut out = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <!-- Written by `sparkctl service install`; `sparkctl service uninstall` removes it. -->\n\
         <plist version=\"1.0\">\n\
         <dict>\n",
    );
    out += &format!(
        "\t<key>Label</key>\n\t<string>{}</string>\n",
        xml(LAUNCHD_LABEL)
    );
    out += "\t<key>ProgramArguments</key>\n\t<array>\n";
    for a in spec.argv() {
        out += &format!("\t\t<string>{}</string>\n", xml(&a));
    }
    out += "\t</array>\n";
    if !spec.env.is_empty() {
        out += "\t<key>EnvironmentVariables</key>\n\t<dict>\n";
        for (k, v) in &spec.env {
            out += &format!(
                "\t\t<key>{}</key>\n\t\t<string>{}</string>\n",
                xml(k),
                xml(v)
            );
        }
        out += "\t</dict>\n";
    }
    let stderr = spec.state_dir.join("sparkd.launchd.log");
    out += &format!(
        "\t<key>RunAtLoad</key>\n\t<true/>\n\
         \t<key>KeepAlive</key>\n\t<dict>\n\t\t<key>SuccessfulExit</key>\n\t\t<false/>\n\t</dict>\n\
         \t<key>StandardErrorPath</key>\n\t<string>{}</string>\n\
         </dict>\n\
         </plist>\n",
        xml(&stderr.display().to_string())
    );
    out
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Write `text` to `path` whole or not at all (a temp file renamed over it), creating the
/// directories. Mode 0644, as service managers expect of a user's unit files.
pub fn write_file(path: &Path, text: &str) -> Result<(), ServiceError> {
    let io = |op, p: &Path| {
        let path = p.display().to_string();
        move |source| ServiceError::Io { op, path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io("write", &tmp))?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .map_err(io("set permissions of", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("rename", &tmp))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Remove `path`; false if it was not there.
pub fn remove_file(path: &Path) -> Result<bool, ServiceError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(ServiceError::Io {
            op: "remove",
            path: path.display().to_string(),
            source,
        }),
    }
}

/// How this platform's service manager is driven: where the file goes, the tool, and the
/// commands that put the file into effect and take it out.
#[derive(Debug, Clone)]
pub struct Plan {
    pub manager: Manager,
    /// The unit file or plist.
    pub path: PathBuf,
    /// `systemctl` or `launchctl`.
    pub tool: &'static str,
    /// The service's name for the manager (the unit file's name, the plist's).
    pub name: String,
    /// launchd's domain of this user (`gui/<uid>`).
    pub domain: String,
    /// The tool's argument lists that load and start the service, in order.
    pub start: Vec<Vec<String>>,
    /// Those that stop and unload it, in order.
    pub stop: Vec<Vec<String>>,
}

impl Plan {
    /// The plan for `manager`, with paths from `var` (the environment) and launchd's domain
    /// from `uid`.
    pub fn new(
        manager: Manager,
        var: impl Fn(&str) -> Option<OsString>,
        uid: u32,
    ) -> Result<Plan, ServiceError> {
        let words = |w: &[&str]| w.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
        let domain = format!("gui/{uid}");
        Ok(match manager {
            Manager::Systemd => Plan {
                manager,
                path: systemd_unit_path(var)?,
                tool: "systemctl",
                name: SYSTEMD_UNIT.to_owned(),
                domain,
                start: vec![
                    words(&["--user", "daemon-reload"]),
                    words(&["--user", "enable", SYSTEMD_UNIT]),
                    // Restart, not start: a reinstalled unit must run its new command line.
                    words(&["--user", "restart", SYSTEMD_UNIT]),
                ],
                stop: vec![
                    words(&["--user", "disable", "--now", SYSTEMD_UNIT]),
                    words(&["--user", "daemon-reload"]),
                ],
            },
            Manager::Launchd => {
                let path = launchd_plist_path(var)?;
                Plan {
                    manager,
                    tool: "launchctl",
                    name: format!("{LAUNCHD_LABEL}.plist"),
                    start: vec![vec![
                        "bootstrap".into(),
                        domain.clone(),
                        path.display().to_string(),
                    ]],
                    stop: vec![vec!["bootout".into(), format!("{domain}/{LAUNCHD_LABEL}")]],
                    path,
                    domain,
                }
            }
        })
    }

    /// `cmds` as a shell line the user can run (`systemctl --user … && …`).
    pub fn shown(&self, cmds: &[Vec<String>]) -> String {
        cmds.iter()
            .map(|c| format!("{} {}", self.tool, c.join(" ")))
            .collect::<Vec<_>>()
            .join(" && ")
    }

    /// The service file's text for `spec`.
    pub fn text(&self, spec: &ServiceSpec) -> String {
        match self.manager {
            Manager::Systemd => systemd_unit(spec),
            Manager::Launchd => launchd_plist(spec),
        }
    }

    /// The tool's arguments that ask whether the service runs.
    pub fn status_args(&self) -> Vec<String> {
        match self.manager {
            Manager::Systemd => vec!["--user".into(), "is-active".into(), self.name.clone()],
            Manager::Launchd => vec!["print".into(), format!("{}/{LAUNCHD_LABEL}", self.domain)],
        }
    }
}

/// A program on `PATH` (`systemctl`, `launchctl`), if there is one.
pub fn find_program(name: &str, path: Option<OsString>) -> Option<PathBuf> {
    std::env::split_paths(&path?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(env: &[(&str, &str)]) -> ServiceSpec {
        ServiceSpec {
            sparkd: PathBuf::from("/opt/spark/bin/sparkd"),
            socket: PathBuf::from("/run/user/1000/spark/sparkd.sock"),
            state_dir: PathBuf::from("/home/ana/.local/state/spark"),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_systemd_unit_runs_sparkd_in_the_foreground_on_the_explicit_socket() {
        assert_eq!(
            systemd_unit(&spec(&[("XDG_STATE_HOME", "/home/ana/my state")])),
            "# Written by `sparkctl service install`; `sparkctl service uninstall` removes it.\n\
             [Unit]\n\
             Description=spark daemon: warm model sessions and journaled code edits\n\
             \n\
             [Service]\n\
             Type=simple\n\
             Environment=\"XDG_STATE_HOME=/home/ana/my state\"\n\
             ExecStart=/opt/spark/bin/sparkd --socket /run/user/1000/spark/sparkd.sock --idle-timeout 0\n\
             Restart=on-failure\n\
             RestartSec=2\n\
             RestartPreventExitStatus=1\n\
             TimeoutStopSec=15\n\
             \n\
             [Install]\n\
             WantedBy=default.target\n"
        );
    }

    #[test]
    fn unit_words_escape_specifiers_spaces_quotes_and_dollars() {
        assert_eq!(systemd_quote("/a/b", true), "/a/b");
        assert_eq!(systemd_quote("/a/100%", true), "/a/100%%");
        assert_eq!(systemd_quote("/my dir/x", true), "\"/my dir/x\"");
        assert_eq!(systemd_quote("a\"b\\c", true), "\"a\\\"b\\\\c\"");
        assert_eq!(systemd_quote("/x$HOME", true), "\"/x$$HOME\"");
        assert_eq!(systemd_quote("K=/x$HOME", false), "\"K=/x$HOME\"");
    }

    #[test]
    fn the_launchd_agent_is_a_valid_plist_that_restarts_on_failure() {
        let text = launchd_plist(&spec(&[("SPARK_HOME", "/Users/ana/s&p")]));
        assert_eq!(
            text,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
             <!-- Written by `sparkctl service install`; `sparkctl service uninstall` removes it. -->\n\
             <plist version=\"1.0\">\n\
             <dict>\n\
             \t<key>Label</key>\n\t<string>dev.spark.sparkd</string>\n\
             \t<key>ProgramArguments</key>\n\t<array>\n\
             \t\t<string>/opt/spark/bin/sparkd</string>\n\
             \t\t<string>--socket</string>\n\
             \t\t<string>/run/user/1000/spark/sparkd.sock</string>\n\
             \t\t<string>--idle-timeout</string>\n\
             \t\t<string>0</string>\n\
             \t</array>\n\
             \t<key>EnvironmentVariables</key>\n\t<dict>\n\
             \t\t<key>SPARK_HOME</key>\n\t\t<string>/Users/ana/s&amp;p</string>\n\
             \t</dict>\n\
             \t<key>RunAtLoad</key>\n\t<true/>\n\
             \t<key>KeepAlive</key>\n\t<dict>\n\t\t<key>SuccessfulExit</key>\n\t\t<false/>\n\t</dict>\n\
             \t<key>StandardErrorPath</key>\n\t<string>/home/ana/.local/state/spark/sparkd.launchd.log</string>\n\
             </dict>\n\
             </plist>\n"
        );
        // Well-formed enough for launchd: every opened element is closed, in order.
        let mut stack = Vec::new();
        for tag in text
            .split('<')
            .skip(1)
            .filter_map(|t| t.split_once('>'))
            .map(|(t, _)| t)
        {
            if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
                continue;
            }
            match tag.strip_prefix('/') {
                Some(close) => assert_eq!(stack.pop(), Some(close.to_owned()), "{text}"),
                None => stack.push(tag.split(' ').next().unwrap_or(tag).to_owned()),
            }
        }
        assert!(stack.is_empty(), "{stack:?}");
    }

    #[test]
    fn the_unit_goes_under_xdg_config_home_else_home() {
        let var = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(
            systemd_unit_path(var(&[("XDG_CONFIG_HOME", "/c"), ("HOME", "/h")])).expect("path"),
            PathBuf::from("/c/systemd/user/sparkd.service")
        );
        assert_eq!(
            systemd_unit_path(var(&[("HOME", "/h")])).expect("path"),
            PathBuf::from("/h/.config/systemd/user/sparkd.service")
        );
        assert!(matches!(
            systemd_unit_path(var(&[])),
            Err(ServiceError::NoConfigHome)
        ));
        assert!(matches!(
            systemd_unit_path(var(&[("XDG_CONFIG_HOME", "rel")])),
            Err(ServiceError::NotAbsolute("XDG_CONFIG_HOME"))
        ));
        assert_eq!(
            launchd_plist_path(var(&[("HOME", "/Users/ana")])).expect("path"),
            PathBuf::from("/Users/ana/Library/LaunchAgents/dev.spark.sparkd.plist")
        );
    }

    #[test]
    fn the_systemd_plan_reloads_enables_and_restarts_and_shows_the_commands_to_type() {
        let var = |k: &str| (k == "HOME").then(|| OsString::from("/home/ana"));
        let plan = Plan::new(Manager::Systemd, var, 1000).unwrap();
        assert_eq!(
            plan.path,
            PathBuf::from("/home/ana/.config/systemd/user/sparkd.service")
        );
        assert_eq!(
            plan.shown(&plan.start),
            "systemctl --user daemon-reload && systemctl --user enable sparkd.service && \
             systemctl --user restart sparkd.service"
        );
        assert_eq!(
            plan.shown(&plan.stop),
            "systemctl --user disable --now sparkd.service && systemctl --user daemon-reload"
        );
        assert_eq!(
            plan.status_args(),
            ["--user", "is-active", "sparkd.service"]
        );
    }

    #[test]
    fn the_launchd_plan_bootstraps_the_plist_in_the_user_s_gui_domain() {
        let var = |k: &str| (k == "HOME").then(|| OsString::from("/Users/ana"));
        let plan = Plan::new(Manager::Launchd, var, 501).unwrap();
        assert_eq!(
            plan.shown(&plan.start),
            "launchctl bootstrap gui/501 /Users/ana/Library/LaunchAgents/dev.spark.sparkd.plist"
        );
        assert_eq!(
            plan.shown(&plan.stop),
            "launchctl bootout gui/501/dev.spark.sparkd"
        );
        assert_eq!(plan.status_args(), ["print", "gui/501/dev.spark.sparkd"]);
    }
}
