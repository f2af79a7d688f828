//! The `sparkctl` binary: parse the command line, reach the daemon (starting it when needed),
//! print the answer for people or as JSON, and exit 0/1/2 as SPEC §2 says.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;
use spark_proto::layout::Layout;
use spark_proto::methods::{Empty, Status, StatusResult};
use sparkctl::autostart::{self, Started};
use sparkctl::{Client, ClientError};

/// sparkctl talks to sparkd, spark's daemon for instant AI code edits. Any command starts the
/// daemon if it is not running.
#[derive(Debug, Parser)]
#[command(name = "sparkctl", version, about, long_about = None, propagate_version = true)]
#[command(
    after_help = "Exit status: 0 success, 1 request refused (bad input, conflict), 2 daemon or internal failure, 130 interrupted.\nFiles: SPARK_HOME (or XDG dirs) hold config.toml, state and the daemon log; SPARK_SOCKET overrides the socket path."
)]
struct Cli {
    /// Machine-readable output: one JSON object on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Socket path of the daemon (default: from SPARK_SOCKET, SPARK_HOME or XDG_RUNTIME_DIR).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the daemon: version, uptime, socket, repositories, sessions and cache.
    Status,
    /// Stop the daemon (waits until it has exited).
    Stop,
    /// Print a shell completion script, e.g. `sparkctl completions bash > ~/.local/share/bash-completion/completions/sparkctl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// A failure ready to be shown: the message, a hint, and the exit code.
struct Failure {
    message: String,
    hint: Option<String>,
    code: u8,
    kind: Option<String>,
}

impl Failure {
    fn from_client(e: ClientError, layout: &Layout) -> Failure {
        let kind = match &e {
            ClientError::Rpc(r) => r
                .kind()
                .map(str::to_owned)
                .or_else(|| r.error_code().map(|c| format!("{c:?}"))),
            _ => None,
        };
        Failure {
            hint: e.hint(&layout.log_file),
            code: e.exit_code(),
            message: e.to_string(),
            kind,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json {
                let v = serde_json::json!({"error": {"message": f.message, "kind": f.kind, "hint": f.hint}});
                let _ = print_line(&v.to_string());
            }
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "sparkctl: error: {}", f.message);
            if let Some(h) = f.hint {
                let _ = writeln!(err, "hint: {h}");
            }
            ExitCode::from(f.code)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let mut layout = Layout::from_env(|k| std::env::var_os(k), rustix::process::geteuid().as_raw())
        .map_err(|e| Failure {
            message: e.to_string(),
            hint: None,
            code: 2,
            kind: None,
        })?;
    if let Some(s) = cli.socket {
        layout.socket = std::path::absolute(&s).unwrap_or(s);
    }
    let fail = |e: ClientError| Failure::from_client(e, &layout);
    match cli.command {
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sparkctl", &mut out);
            write_stdout(&out)
        }
        Command::Status => {
            let mut conn = autostart::connect(&layout, "sparkctl").map_err(fail)?;
            note_started(&conn.started, cli.json);
            let status = conn.client.call::<Status>(&Empty {}).map_err(fail)?;
            if cli.json {
                print_json(&status)
            } else {
                print_line(&render_status(&status))
            }
        }
        Command::Stop => {
            let client = match Client::open(&layout.socket, "sparkctl") {
                Ok((c, init)) => Some((c, init.pid)),
                Err(e) if e.is_not_running() => None,
                Err(e) => return Err(fail(e)),
            };
            let Some((client, pid)) = client else {
                return if cli.json {
                    print_json(&serde_json::json!({"stopped": false, "running": false}))
                } else {
                    print_line("sparkd is not running")
                };
            };
            autostart::stop_and_wait(client, pid, &layout).map_err(fail)?;
            if cli.json {
                print_json(&serde_json::json!({"stopped": true, "pid": pid}))
            } else {
                print_line(&format!("sparkd (pid {pid}) stopped"))
            }
        }
    }
}

fn note_started(started: &Option<Started>, json: bool) {
    if json {
        return;
    }
    if let Some(Started::Replaced { old_version }) = started {
        eprintln!(
            "sparkctl: restarted sparkd: it was version {old_version}, this sparkctl is {}",
            sparkctl::VERSION
        );
    }
}

fn render_status(s: &StatusResult) -> String {
    let mut out = format!(
        "sparkd {} (pid {}), up {}\n",
        s.version,
        s.pid,
        human_duration(s.uptime_ms)
    );
    out += &format!(
        "socket    {}\nlog       {}\nclients   {}\n",
        s.socket, s.log_file, s.connections
    );
    if s.repos.is_empty() {
        out += "repos     none\n";
    }
    for r in &s.repos {
        out += &format!("repo      {} ({} edits)\n", r.path, r.edits);
    }
    if s.sessions.is_empty() {
        out += "sessions  none\n";
    }
    for x in &s.sessions {
        let state = if x.connected {
            "connected"
        } else {
            "disconnected"
        };
        out += &format!(
            "session   {} {state}, age {}\n",
            x.repo,
            human_duration(x.age_ms)
        );
    }
    match &s.cache {
        Some(c) => out += &format!("cache     {} entries, {} bytes", c.entries, c.bytes),
        None => out += "cache     empty",
    }
    out
}

fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<(), Failure> {
    let text = serde_json::to_string(v).map_err(|e| Failure {
        message: e.to_string(),
        hint: None,
        code: 2,
        kind: None,
    })?;
    print_line(&text)
}

fn print_line(text: &str) -> Result<(), Failure> {
    let mut buf = text.as_bytes().to_vec();
    buf.push(b'\n');
    write_stdout(&buf)
}

/// Write to stdout; a closed pipe (`sparkctl log | head`) is success, as for any Unix filter.
fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure {
            message: format!("cannot write output: {e}"),
            hint: None,
            code: 2,
            kind: None,
        }),
    }
}
