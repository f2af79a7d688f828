//! Configuration in two phases: a raw [`ConfigFile`] (all optional) read from `config.toml`,
//! then environment and flags layered on top and validated into a [`Config`] with absolute
//! paths. `sparkd::run` reads no environment itself; `main` resolves everything here.

use std::ffi::OsString;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use spark_proto::layout::{Layout, LayoutError};

/// Default provider endpoint: OpenAI's Responses API in WebSocket mode.
pub const DEFAULT_PROVIDER_URL: &str = "wss://api.openai.com/v1/responses";
/// Default model: the fast Codex model the product is tuned for.
pub const DEFAULT_MODEL: &str = "gpt-5.3-codex-spark";
/// How long in-flight work may take to finish once shutdown starts.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// A drafted commit message is worth waiting for only this long: a commit must not feel slow.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Open connections beyond this are refused: protects the daemon from a runaway client loop.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// One more model call when an `ask`'s patch does not apply: most wrong patches are a
/// misremembered line, which one round with the real lines fixes.
pub const DEFAULT_REPAIR_ATTEMPTS: u32 = 1;
/// Read-only tool calls (read a file, search, list a directory) one `ask` answers: each costs
/// a round trip, and a model that needs more than this should be given focus files.
pub const DEFAULT_TOOL_CALLS_PER_ASK: u32 = 8;
/// Bytes of tool output one `ask` sends at most: a few whole files.
pub const DEFAULT_TOOL_BYTES_PER_ASK: usize = 128 * 1024;
/// Local history keeps snapshots this long (`history_max_age_days`): two weeks covers
/// "what did this look like before the holidays" without growing for ever.
pub const DEFAULT_HISTORY_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);
/// …and at most this many bytes of file contents per repository (`history_max_mb`).
pub const DEFAULT_HISTORY_MAX_BYTES: u64 = 500 * 1024 * 1024;

/// `config.toml` as written by the user. Unknown keys are an error so typos are not silent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub provider_url: Option<String>,
    pub model: Option<String>,
    /// Seconds without any client connection after which the daemon exits; 0 = never.
    pub idle_timeout_secs: Option<u64>,
    pub drain_timeout_ms: Option<u64>,
    pub max_connections: Option<usize>,
    /// A tracing filter, e.g. `info` or `sparkd=debug`.
    pub log: Option<String>,
    /// fsync edited files, journals and the ledger (default true). Off trades crash safety
    /// for speed; only benchmarks should turn it off.
    pub fsync: Option<bool>,
    /// Corrected patches an `ask` may request when the model's patch does not apply (default
    /// 1; 0 turns repair off).
    pub repair_attempts: Option<u32>,
    /// Read-only tool calls one `ask` answers (default 8; 0 answers none).
    pub tool_calls_per_ask: Option<u32>,
    /// Bytes of read-only tool output one `ask` sends at most (default 131072).
    pub tool_bytes_per_ask: Option<usize>,
    /// Hard cap on the `prepare-commit-msg` hook's draft (default 5000); `sparkctl` reads the
    /// same key and gives up at this wall-clock deadline, so a commit is never held longer.
    pub hook_timeout_ms: Option<u64>,
    /// Days local history keeps snapshots (default 14).
    pub history_max_age_days: Option<u64>,
    /// Megabytes of file contents local history keeps per repository (default 500).
    pub history_max_mb: Option<u64>,
    /// Share one WebSocket per provider between repositories on `stream_id` lanes (default
    /// true); false gives each repository (and each draft) a connection of its own.
    pub lanes: Option<bool>,
    /// Run `spark!` comment triggers in every watched repository (default false; `sparkctl
    /// watch --triggers` turns them on for one repository).
    pub triggers: Option<bool>,
}

/// Settings given on the `sparkd` command line; they win over everything else.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub provider_url: Option<String>,
    pub model: Option<String>,
    pub idle_timeout_secs: Option<u64>,
    pub log: Option<String>,
    pub socket: Option<std::path::PathBuf>,
}

/// The validated configuration the daemon runs with.
#[derive(Clone)]
pub struct Config {
    pub layout: Layout,
    pub provider_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    pub max_connections: usize,
    pub log: String,
    pub fsync: bool,
    pub repair_attempts: u32,
    pub tool_calls_per_ask: u32,
    pub tool_bytes_per_ask: usize,
    /// The draft turn's cap (`hook_timeout_ms`).
    pub hook_timeout: Duration,
    /// Local history's retention: snapshots older than this are pruned…
    pub history_max_age: Duration,
    /// …and the oldest ones beyond this many bytes of contents per repository.
    pub history_max_bytes: u64,
    /// Snapshots per history segment, the unit retention drops (not a file key: tests shrink
    /// it to see pruning after a few saves).
    pub history_segment_snapshots: u32,
    /// Test hook: local history dates its snapshots this many ms away from the real clock
    /// (`SPARK_TEST_CLOCK_OFFSET_MS`, debug builds only), so retention is tested without
    /// waiting two weeks.
    pub history_clock_offset_ms: i64,
    /// Sessions share one WebSocket per provider on `stream_id` lanes (`lanes`).
    pub lanes: bool,
    /// `spark!` comment triggers in every watched repository (`triggers`).
    pub triggers: bool,
    /// Test hook: abort at this named point of an edit, or fail there with an error when named
    /// `fail_<point>` (`SPARK_FAILPOINT`, debug builds only).
    pub failpoint: Option<String>,
    /// The version this daemon reports to clients: its own, except that debug builds honour
    /// `SPARK_TEST_DAEMON_VERSION` so tests can exercise the client's version restart.
    pub reported_version: String,
    /// Liveness and reconnect timing of provider sessions (embedders and tests compress it).
    pub provider_timing: ProviderTiming,
}

/// How provider sessions detect a dead peer and space their reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderTiming {
    /// Silence after which a ping checks the connection.
    pub ping_interval: Duration,
    /// No frame at all this long after a ping: the connection is dead.
    pub pong_timeout: Duration,
    /// First reconnect delay after a failure (doubled per failure, full jitter).
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_cap: Duration,
    /// No byte of an HTTP + SSE response this long: the provider stopped sending.
    pub stream_idle_timeout: Duration,
}

impl Default for ProviderTiming {
    fn default() -> Self {
        use crate::provider::session as s;
        ProviderTiming {
            ping_interval: s::DEFAULT_PING_INTERVAL,
            pong_timeout: s::DEFAULT_PONG_TIMEOUT,
            backoff_base: s::DEFAULT_BACKOFF_BASE,
            backoff_cap: s::DEFAULT_BACKOFF_CAP,
            stream_idle_timeout: s::DEFAULT_STREAM_IDLE_TIMEOUT,
        }
    }
}

impl fmt::Debug for Config {
    // Hand-written so the API key never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("layout", &self.layout)
            .field("provider_url", &self.provider_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("idle_timeout", &self.idle_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("max_connections", &self.max_connections)
            .field("log", &self.log)
            .field("fsync", &self.fsync)
            .field("repair_attempts", &self.repair_attempts)
            .field("tool_calls_per_ask", &self.tool_calls_per_ask)
            .field("tool_bytes_per_ask", &self.tool_bytes_per_ask)
            .field("hook_timeout", &self.hook_timeout)
            .field("history_max_age", &self.history_max_age)
            .field("history_max_bytes", &self.history_max_bytes)
            .field("history_segment_snapshots", &self.history_segment_snapshots)
            .field("history_clock_offset_ms", &self.history_clock_offset_ms)
            .field("lanes", &self.lanes)
            .field("triggers", &self.triggers)
            .field("failpoint", &self.failpoint)
            .field("reported_version", &self.reported_version)
            .field("provider_timing", &self.provider_timing)
            .finish()
    }
}

/// Why the configuration could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Layout(#[from] LayoutError),
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid {name}: {message}")]
    Invalid { name: &'static str, message: String },
}

impl Config {
    /// Resolve defaults < `config.toml` < environment (read through `var`) < `flags`.
    pub fn resolve(
        var: impl Fn(&str) -> Option<OsString>,
        uid: u32,
        flags: &Flags,
    ) -> Result<Config, ConfigError> {
        let mut layout = Layout::from_env(&var, uid)?;
        if let Some(socket) = &flags.socket {
            if !socket.is_absolute() {
                return Err(ConfigError::Invalid {
                    name: "--socket",
                    message: format!("{} is not an absolute path", socket.display()),
                });
            }
            layout.socket = socket.clone();
        }
        let file = read_config_file(&layout.config_file)?;
        let env = |name: &str| {
            var(name)
                .and_then(|v| v.into_string().ok())
                .filter(|v| !v.is_empty())
        };

        let provider_url = flags
            .provider_url
            .clone()
            .or_else(|| env("SPARK_PROVIDER_URL"))
            .or(file.provider_url)
            .unwrap_or_else(|| DEFAULT_PROVIDER_URL.to_owned());
        validate_provider_url(&provider_url)?;
        let model = flags
            .model
            .clone()
            .or_else(|| env("SPARK_MODEL"))
            .or(file.model)
            .unwrap_or_else(|| DEFAULT_MODEL.to_owned());
        let idle_secs = match flags.idle_timeout_secs {
            Some(s) => Some(s),
            None => match env("SPARK_IDLE_TIMEOUT") {
                Some(v) => Some(v.parse::<u64>().map_err(|e| ConfigError::Invalid {
                    name: "SPARK_IDLE_TIMEOUT",
                    message: format!("{v:?} is not a number of seconds ({e})"),
                })?),
                None => file.idle_timeout_secs,
            },
        };
        Ok(Config {
            layout,
            provider_url,
            model,
            api_key: env("SPARK_API_KEY").or_else(|| env("OPENAI_API_KEY")),
            idle_timeout: idle_secs.filter(|s| *s > 0).map(Duration::from_secs),
            drain_timeout: file
                .drain_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            max_connections: file
                .max_connections
                .unwrap_or(DEFAULT_MAX_CONNECTIONS)
                .max(1),
            log: flags
                .log
                .clone()
                .or_else(|| env("SPARK_LOG"))
                .or(file.log)
                .unwrap_or_else(|| "info".to_owned()),
            fsync: file.fsync.unwrap_or(true),
            repair_attempts: file.repair_attempts.unwrap_or(DEFAULT_REPAIR_ATTEMPTS),
            tool_calls_per_ask: file
                .tool_calls_per_ask
                .unwrap_or(DEFAULT_TOOL_CALLS_PER_ASK),
            tool_bytes_per_ask: file
                .tool_bytes_per_ask
                .unwrap_or(DEFAULT_TOOL_BYTES_PER_ASK),
            hook_timeout: file
                .hook_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_HOOK_TIMEOUT),
            history_max_age: file
                .history_max_age_days
                .map(|d| Duration::from_secs(d.saturating_mul(24 * 3600)))
                .unwrap_or(DEFAULT_HISTORY_MAX_AGE),
            history_max_bytes: file
                .history_max_mb
                .map(|mb| mb.saturating_mul(1024 * 1024))
                .unwrap_or(DEFAULT_HISTORY_MAX_BYTES),
            history_segment_snapshots: crate::history::SEGMENT_SNAPSHOTS,
            history_clock_offset_ms: match env("SPARK_TEST_CLOCK_OFFSET_MS")
                .filter(|_| cfg!(debug_assertions))
            {
                Some(v) => v.parse::<i64>().map_err(|e| ConfigError::Invalid {
                    name: "SPARK_TEST_CLOCK_OFFSET_MS",
                    message: format!("{v:?} is not a number of milliseconds ({e})"),
                })?,
                None => 0,
            },
            lanes: file.lanes.unwrap_or(true),
            triggers: file.triggers.unwrap_or(false),
            failpoint: if cfg!(debug_assertions) {
                env("SPARK_FAILPOINT")
            } else {
                None
            },
            reported_version: env("SPARK_TEST_DAEMON_VERSION")
                .filter(|_| cfg!(debug_assertions))
                .unwrap_or_else(|| crate::VERSION.to_owned()),
            provider_timing: ProviderTiming::default(),
        })
    }

    /// A configuration for tests and embedders: everything under `home`, defaults elsewhere.
    pub fn for_home(home: &Path) -> Config {
        let home = home.as_os_str().to_owned();
        Config::resolve(
            |k| (k == "SPARK_HOME").then(|| home.clone()),
            0,
            &Flags::default(),
        )
        .expect("a SPARK_HOME-only environment with no config file always resolves")
    }
}

fn read_config_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.display().to_string(),
                source,
            });
        }
    };
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// Whether `url`'s host is this machine (`localhost`, `127.0.0.0/8`, `::1`): a local model
/// server, which needs no API key. Anything else does.
pub fn is_loopback_url(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        // `[::1]:8080`: the brackets delimit an IPv6 address.
        Some(v6) => v6.split_once(']').map_or(v6, |(h, _)| h),
        None => host_port.split_once(':').map_or(host_port, |(h, _)| h),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Check a provider URL's scheme (from any source: config, environment, an `ask`'s settings).
pub(crate) fn validate_provider_url(url: &str) -> Result<(), ConfigError> {
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some("ws" | "wss" | "http" | "https") => Ok(()),
        _ => Err(ConfigError::Invalid {
            name: "provider_url",
            message: format!("{url:?} must start with ws://, wss://, http:// or https://"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(pairs: &[(&str, &str)], flags: &Flags) -> Result<Config, ConfigError> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        Config::resolve(|k| map.get(k).cloned(), 1000, flags)
    }

    #[test]
    fn precedence_is_defaults_file_env_flags() {
        let home = tempfile::tempdir().expect("tempdir");
        let h = home.path().to_str().expect("utf8");
        let c = resolve(&[("SPARK_HOME", h)], &Flags::default()).expect("defaults");
        assert_eq!(c.model, DEFAULT_MODEL);
        assert_eq!(c.provider_url, DEFAULT_PROVIDER_URL);
        assert_eq!(c.idle_timeout, None);

        std::fs::write(
            home.path().join("config.toml"),
            "model = \"from-file\"\nidle_timeout_secs = 30\nprovider_url = \"http://127.0.0.1:1/v1/responses\"\n",
        )
        .expect("write");
        let c = resolve(&[("SPARK_HOME", h)], &Flags::default()).expect("file");
        assert_eq!(c.model, "from-file");
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.provider_url, "http://127.0.0.1:1/v1/responses");

        let c = resolve(
            &[("SPARK_HOME", h), ("SPARK_MODEL", "from-env")],
            &Flags::default(),
        )
        .expect("env");
        assert_eq!(c.model, "from-env");

        let flags = Flags {
            model: Some("from-flag".into()),
            ..Flags::default()
        };
        let c = resolve(&[("SPARK_HOME", h), ("SPARK_MODEL", "from-env")], &flags).expect("flag");
        assert_eq!(c.model, "from-flag");
    }

    #[test]
    fn api_key_falls_back_to_openai_and_is_never_printed() {
        let home = tempfile::tempdir().expect("tempdir");
        let h = home.path().to_str().expect("utf8");
        let c = resolve(
            &[("SPARK_HOME", h), ("OPENAI_API_KEY", "sk-secret")],
            &Flags::default(),
        )
        .expect("resolve");
        assert_eq!(c.api_key.as_deref(), Some("sk-secret"));
        assert!(!format!("{c:?}").contains("sk-secret"));
        let c = resolve(
            &[
                ("SPARK_HOME", h),
                ("OPENAI_API_KEY", "a"),
                ("SPARK_API_KEY", "b"),
            ],
            &Flags::default(),
        )
        .expect("resolve");
        assert_eq!(c.api_key.as_deref(), Some("b"));
    }

    #[test]
    fn loopback_hosts_are_recognised_and_nothing_else_is() {
        for url in [
            "ws://127.0.0.1:8080/v1/responses",
            "http://localhost/v1/responses",
            "ws://LOCALHOST.:1/x",
            "http://127.8.9.10/v1",
            "ws://[::1]:9000/v1/responses",
            "http://user:pw@127.0.0.1:1/v1",
            "ws://model.localhost/v1",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            DEFAULT_PROVIDER_URL,
            "wss://127.0.0.1.example.com/v1",
            "http://10.0.0.1/v1",
            "ws://[::2]:1/v1",
            "http://localhost@api.example.com/v1",
            "ws://localhostx/v1",
            "not a url",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }

    #[test]
    fn bad_values_name_their_source() {
        let home = tempfile::tempdir().expect("tempdir");
        let h = home.path().to_str().expect("utf8");
        std::fs::write(home.path().join("config.toml"), "modle = \"typo\"\n").expect("write");
        let e = resolve(&[("SPARK_HOME", h)], &Flags::default()).expect_err("unknown key");
        assert!(
            e.to_string().contains("config.toml") && e.to_string().contains("modle"),
            "{e}"
        );
        std::fs::remove_file(home.path().join("config.toml")).expect("rm");

        let e = resolve(
            &[("SPARK_HOME", h), ("SPARK_PROVIDER_URL", "ftp://x")],
            &Flags::default(),
        )
        .expect_err("scheme");
        assert!(e.to_string().contains("ws://"), "{e}");
        let e = resolve(
            &[("SPARK_HOME", h), ("SPARK_IDLE_TIMEOUT", "soon")],
            &Flags::default(),
        )
        .expect_err("idle");
        assert!(e.to_string().contains("SPARK_IDLE_TIMEOUT"), "{e}");
    }
}
