//! The `sparkctl` binary: parse the command line, reach the daemon (starting it when needed),
//! print the answer for people or as JSON, and exit 0/1/2/130 as the README says.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;
use spark_proto::layout::Layout;
use spark_proto::methods::{
    ASK_PROGRESS, ApplyParams, Ask, AskEvent, AskParams, AskProgress, AskResult, EditApply,
    EditLog, EditParams, EditResult, EditShow, EditStash, EditUndo, Empty, FileChange, Focus,
    LogParams, Method, Refresh, Status, StatusResult, Unwatch, Watch, WatchParams,
};
use spark_proto::methods::{TriggersParams, TriggersSet, WatchResult};
use sparkctl::autostart::{self, Started};
use sparkctl::interrupt::CancelOnCtrlC;
use sparkctl::output::ColorChoice;
use sparkctl::{Client, ClientError};

mod history;

/// sparkctl talks to sparkd, spark's daemon for instant AI code edits. Any command starts the
/// daemon if it is not running.
#[derive(Debug, Parser)]
#[command(name = "sparkctl", version, about, long_about = None, propagate_version = true)]
#[command(
    after_help = "Exit status: 0 success, 1 request refused (bad input, conflict), 2 daemon or internal failure, 130 interrupted.\nFiles: SPARK_HOME (or XDG dirs) hold config.toml, state and the daemon log; SPARK_SOCKET overrides the socket path."
)]
struct Cli {
    /// Machine-readable output on stdout: one JSON object (an error is {"error": {...}}). For
    /// `ask`, NDJSON: one progress object per line while it streams (the `ask/progress`
    /// params: {"request", "event": {"type": "text"|"patch"|…}}), then the result object last.
    #[arg(long, global = true)]
    json: bool,
    /// Socket path of the daemon (default: from SPARK_SOCKET, SPARK_HOME or XDG_RUNTIME_DIR).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Colour the output: auto (on a terminal, unless NO_COLOR is set), always or never.
    #[arg(
        long,
        global = true,
        value_name = "WHEN",
        value_enum,
        default_value_t = ColorChoice::Auto,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "always"
    )]
    color: ColorChoice,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask the model for an edit in the repository of the current directory. The answer and
    /// the patch stream as they arrive; the edit is applied all-or-nothing and recorded.
    #[command(
        after_help = "Examples:\n  sparkctl ask \"rename parse_args to parse_cli\"\n  sparkctl ask -f src/main.rs:40-60 \"handle the empty case\"\n  sparkctl ask --dry-run \"add a doc comment to run()\""
    )]
    Ask {
        /// What to do, in plain words.
        #[arg(required = true, num_args = 1.., value_name = "PROMPT")]
        prompt: Vec<String>,
        /// Show the model this file, or these lines of it (repeatable): PATH or PATH:START-END.
        #[arg(short = 'f', long = "focus", value_name = "PATH[:START-END]")]
        focus: Vec<String>,
        /// Show the proposed diff; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Start a fresh conversation instead of continuing this repository's.
        #[arg(long)]
        new: bool,
    },
    /// Apply a patch (Codex apply_patch format or aider SEARCH/REPLACE blocks) to the repository
    /// of the current directory, all files or none, and record it as an edit.
    Apply {
        /// Patch file; `-` or nothing reads standard input. Relative paths in the patch start
        /// at the current directory.
        file: Option<PathBuf>,
        /// Check the patch and print the diff; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Message recorded with the edit (shown by `log` and `git stash list`).
        #[arg(short, long)]
        message: Option<String>,
    },
    /// List this repository's edits, newest first.
    Log {
        /// Show at most this many edits.
        #[arg(short = 'n', long, default_value_t = 20)]
        limit: u32,
    },
    /// Show an edit's diff (default: the latest), exactly as `git stash show -p <edit>` does.
    Show {
        /// Edit id (a unique prefix is enough).
        edit: Option<String>,
    },
    /// Revert an edit (default: the latest applied one). Changes you made since are kept; if
    /// you changed the same lines, nothing is written.
    Undo {
        /// Edit id (a unique prefix is enough).
        edit: Option<String>,
    },
    /// Move an edit onto `git stash` and revert it in the worktree; `git stash pop` brings it back.
    Stash {
        /// Edit id (a unique prefix is enough).
        edit: Option<String>,
    },
    /// List the local history of a file (its versions, newest first), or of the repository
    /// (which files changed when).
    #[command(after_help = history::HISTORY_AFTER_HELP)]
    History(history::HistoryArgs),
    /// Put a file back as it was at an earlier version of the local history (a recorded edit:
    /// `sparkctl undo` reverts it).
    #[command(after_help = history::RESTORE_AFTER_HELP)]
    Restore(history::RestoreArgs),
    /// Show what changed in the worktree since a time, all writers together, as a diff.
    #[command(after_help = history::DIFF_AFTER_HELP)]
    Diff(history::DiffArgs),
    /// Show the daemon: version, uptime, socket, repositories, sessions and cache.
    Status,
    /// Watch a repository (default: the one of the current directory): its context stays
    /// current in memory and its model session warm. Survives daemon restarts.
    Watch {
        /// A directory inside the repository.
        dir: Option<PathBuf>,
        /// Also run `spark!` comment triggers there: a saved own-line comment ending in
        /// `spark!` becomes an edit (remembered across restarts).
        #[arg(long, conflicts_with = "no_triggers")]
        triggers: bool,
        /// Stop running `spark!` comment triggers there (the watch stays).
        #[arg(long)]
        no_triggers: bool,
    },
    /// Stop watching a repository.
    Unwatch {
        /// A directory inside the repository.
        dir: Option<PathBuf>,
    },
    /// Rescan a watched repository now (git hooks run this after checkout, merge or rebase).
    Refresh {
        /// A directory inside the repository.
        dir: Option<PathBuf>,
    },
    /// Stop the daemon (waits until it has exited).
    Stop,
    /// Run sparkd as a service of your session: a systemd user unit (Linux) or a launchd agent
    /// (macOS), restarted on failure, on the socket every client finds. Optional: any command
    /// still starts the daemon when none runs.
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Install, remove or list spark's git hooks in the repository of DIR (default: the current
    /// directory): a drafted commit message, and a rescan after checkout, merge or rebase.
    /// Hooks already there are kept and run first.
    Hooks {
        #[command(subcommand)]
        action: HooksAction,
    },
    /// What the installed git hooks run; never fails the git command.
    #[command(hide = true)]
    Hook {
        /// The hook's name, e.g. `prepare-commit-msg`.
        name: String,
        /// The arguments git gave the hook.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Serve the Model Context Protocol on stdio, so that another agent (Codex CLI, Claude Code,
    /// Zed, …) makes its edits through spark: tools apply_patch, undo, log and show. Every edit
    /// is recorded with the source `mcp:<client>`. Logs go to stderr; stdout is the protocol.
    Mcp {
        /// A directory inside the repository that tool calls without a `cwd` use (default: the
        /// current directory).
        #[arg(long, value_name = "DIR")]
        repo: Option<PathBuf>,
    },
    /// Print a shell completion script, e.g. `sparkctl completions bash > ~/.local/share/bash-completion/completions/sparkctl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceAction {
    /// Write the unit (or agent) and, where the service manager is present, enable and start it
    /// (a daemon already running is stopped first so that the service can take its socket).
    Install,
    /// Stop and disable the service, and remove its file.
    Uninstall,
    /// Show whether the service is installed, current and running.
    Status,
}

#[derive(Debug, Subcommand)]
enum HooksAction {
    /// Install the hooks (installing twice changes nothing).
    Install {
        /// A directory inside the repository.
        dir: Option<PathBuf>,
    },
    /// Remove them, restoring the hooks that were there before.
    Uninstall {
        /// A directory inside the repository.
        dir: Option<PathBuf>,
    },
    /// Show which hooks are installed, and where.
    Status {
        /// A directory inside the repository.
        dir: Option<PathBuf>,
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
            // The fine-grained kind, else the code's snake_case name, as on the wire.
            ClientError::Rpc(r) => r.kind().map(str::to_owned).or_else(|| {
                r.error_code()
                    .and_then(|c| serde_json::to_value(c).ok())
                    .and_then(|v| v.as_str().map(str::to_owned))
            }),
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

/// What every subcommand shares: where the daemon is, and how to print.
struct Ctx {
    layout: Layout,
    json: bool,
    style: Style,
}

impl Ctx {
    /// A client of the daemon, started if nobody answers (and said so on stderr).
    fn connect(&self) -> Result<Client, Failure> {
        let conn = autostart::connect(&self.layout, "sparkctl").map_err(|e| self.fail(e))?;
        note_started(&conn.started, self.json);
        Ok(conn.client)
    }

    fn fail(&self, e: ClientError) -> Failure {
        Failure::from_client(e, &self.layout)
    }

    /// Prints `result` as JSON with `--json`, else as `human` renders it.
    fn print<T: Serialize>(
        &self,
        result: &T,
        human: impl FnOnce(&T) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        if self.json {
            print_json(result)
        } else {
            human(result)
        }
    }
}

/// One function per subcommand, as the dispatch below shows.
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
    let ctx = Ctx {
        layout,
        json: cli.json,
        style: Style::detect(cli.color),
    };
    match cli.command {
        Command::Ask {
            prompt,
            focus,
            dry_run,
            new,
        } => ask(&ctx, prompt, &focus, dry_run, new),
        Command::Apply {
            file,
            dry_run,
            message,
        } => apply(&ctx, file.as_deref(), dry_run, message),
        Command::Log { limit } => log(&ctx, limit),
        Command::Show { edit } => show(&ctx, edit),
        Command::Undo { edit } => undo(&ctx, edit),
        Command::Stash { edit } => stash(&ctx, edit),
        Command::Service { action } => run_service(action, &ctx.layout, ctx.json),
        Command::Hooks { action } => run_hooks(action, ctx.json),
        Command::History(args) => history::history(&ctx, args),
        Command::Restore(args) => history::restore(&ctx, args),
        Command::Diff(args) => history::diff(&ctx, args),
        Command::Hook { name, args } => {
            sparkctl::hooks::run_hook(&name, &args, &ctx.layout);
            Ok(())
        }
        Command::Mcp { repo } => mcp(ctx, repo),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sparkctl", &mut out);
            write_stdout(&out)
        }
        Command::Watch {
            dir,
            triggers,
            no_triggers,
        } => watch(&ctx, dir, (triggers || no_triggers).then_some(triggers)),
        Command::Unwatch { dir } => {
            let r = call::<Unwatch>(
                &ctx,
                &WatchParams {
                    dir: dir_param(dir)?,
                },
            )?;
            print_watch_change(&r, ctx.json, "stopped watching", "was not watched")
        }
        Command::Refresh { dir } => {
            let r = call::<Refresh>(
                &ctx,
                &WatchParams {
                    dir: dir_param(dir)?,
                },
            )?;
            print_watch_change(&r, ctx.json, "rescanning", "is not watched")
        }
        Command::Status => ctx.print(&call::<Status>(&ctx, &Empty {})?, |s| {
            print_line(&render_status(s))
        }),
        Command::Stop => stop(&ctx),
    }
}

/// `sparkctl mcp`: an MCP server on stdio until the host closes it.
fn mcp(ctx: Ctx, repo: Option<PathBuf>) -> Result<(), Failure> {
    let dir = PathBuf::from(dir_param(repo)?);
    sparkctl::mcp::run(ctx.layout, dir).map_err(|e| Failure {
        hint: Some(e.hint().to_owned()),
        message: e.to_string(),
        code: 2,
        kind: None,
    })
}

/// One request to the daemon (started if needed).
fn call<M: Method>(ctx: &Ctx, params: &M::Params) -> Result<M::Result, Failure> {
    ctx.connect()?.call::<M>(params).map_err(|e| ctx.fail(e))
}

/// `sparkctl ask`: streams progress, Ctrl-C cancels in the daemon and reports what it did.
fn ask(
    ctx: &Ctx,
    prompt: Vec<String>,
    focus: &[String],
    dry_run: bool,
    new: bool,
) -> Result<(), Failure> {
    let focus = focus
        .iter()
        .map(|f| parse_focus(f))
        .collect::<Result<Vec<_>, _>>()?;
    let params = AskParams {
        cwd: cwd()?,
        prompt: prompt.join(" "),
        focus,
        dry_run,
        new_conversation: new,
        provider: sparkctl::settings::from_env(|k| std::env::var(k).ok()),
        buffers: Vec::new(),
    };
    let mut client = ctx.connect()?;
    let mut view = AskView::new(ctx.json, ctx.style);
    // Ctrl-C now cancels in the daemon, and we report what it did.
    let mut ctrl_c = CancelOnCtrlC::install(ctx.layout.socket.clone(), params.cwd.clone());
    let result = client
        .call_with_sent::<Ask>(
            &params,
            || ctrl_c.as_mut().map_or((), CancelOnCtrlC::listen),
            |n| view.on_notification(n),
        )
        .map_err(|e| ctx.fail(e));
    view.finish_stream();
    let interrupted = ctrl_c.as_ref().is_some_and(CancelOnCtrlC::interrupted);
    drop(ctrl_c);
    let result = result?;
    ctx.print(&result, |r| view.print_result(r, dry_run))?;
    if interrupted {
        // The edit landed before the cancel reached it: say so, and how to take it back.
        if let Some(id) = &result.edit {
            eprintln!(
                "sparkctl: interrupted, but the edit had already landed as {id}; `sparkctl undo {id}` reverts it"
            );
        }
        let _ = std::io::stdout().flush();
        std::process::exit(sparkctl::interrupt::INTERRUPTED);
    }
    Ok(())
}

/// `sparkctl apply [FILE|-]`.
fn apply(
    ctx: &Ctx,
    file: Option<&std::path::Path>,
    dry_run: bool,
    message: Option<String>,
) -> Result<(), Failure> {
    let params = ApplyParams {
        cwd: cwd()?,
        patch: read_patch(file)?,
        dry_run,
        source: Some("sparkctl apply".into()),
        message,
    };
    let result = call::<EditApply>(ctx, &params)?;
    ctx.print(&result, |r| {
        if dry_run {
            write_stdout(ctx.style.diff(&r.diff).as_bytes())
        } else {
            print_line(&render_edit(r, "applied", &ctx.style))
        }
    })
}

/// `sparkctl log`: the newest edits, through the pager on a terminal.
fn log(ctx: &Ctx, limit: u32) -> Result<(), Failure> {
    let params = LogParams {
        cwd: cwd()?,
        limit: Some(limit),
    };
    ctx.print(&call::<EditLog>(ctx, &params)?, |r| {
        if r.edits.is_empty() {
            return print_line("no edits yet in this repository");
        }
        write_long(render_log(&r.edits, now_ms(), &ctx.style).as_bytes())
    })
}

/// `sparkctl show [ID]`: the diff, as `git stash show -p` prints it.
fn show(ctx: &Ctx, edit: Option<String>) -> Result<(), Failure> {
    let params = EditParams {
        cwd: cwd()?,
        id: edit,
    };
    ctx.print(&call::<EditShow>(ctx, &params)?, |r| {
        write_long(ctx.style.diff(&r.diff).as_bytes())
    })
}

/// `sparkctl undo [ID]`.
fn undo(ctx: &Ctx, edit: Option<String>) -> Result<(), Failure> {
    let params = EditParams {
        cwd: cwd()?,
        id: edit,
    };
    ctx.print(&call::<EditUndo>(ctx, &params)?, |r| {
        print_line(&render_edit(r, "undid", &ctx.style))
    })
}

/// `sparkctl stash [ID]`.
fn stash(ctx: &Ctx, edit: Option<String>) -> Result<(), Failure> {
    let params = EditParams {
        cwd: cwd()?,
        id: edit,
    };
    ctx.print(&call::<EditStash>(ctx, &params)?, |r| {
        print_line(&format!(
            "{}\n`git stash pop` brings it back",
            render_edit(r, "stashed", &ctx.style)
        ))
    })
}

/// `sparkctl watch [DIR]`.
/// `sparkctl watch`: with `--triggers`/`--no-triggers` (`triggers` set), also `triggers/set`.
fn watch(ctx: &Ctx, dir: Option<PathBuf>, triggers: Option<bool>) -> Result<(), Failure> {
    /// `--json`: the watch's result, with `triggers` when a flag set them.
    #[derive(Serialize)]
    struct Watched {
        #[serde(flatten)]
        watch: WatchResult,
        #[serde(skip_serializing_if = "Option::is_none")]
        triggers: Option<bool>,
    }
    let dir = dir_param(dir)?;
    let mut client = ctx.connect()?;
    let watch = client
        .call::<Watch>(&WatchParams { dir: dir.clone() })
        .map_err(|e| ctx.fail(e))?;
    let triggers = match triggers {
        Some(enabled) => Some(
            client
                .call::<TriggersSet>(&TriggersParams { dir, enabled })
                .map_err(|e| ctx.fail(e))?
                .enabled,
        ),
        None => None,
    };
    ctx.print(&Watched { watch, triggers }, |w| {
        let r = &w.watch;
        let mut line = format!(
            "watching {} ({} files, {} watches)",
            r.repo.path, r.repo.files, r.repo.watches
        );
        match w.triggers {
            Some(true) => line += "; spark! triggers on",
            Some(false) => line += "; spark! triggers off",
            None => {}
        }
        if let Some(why) = &r.repo.degraded {
            line += &format!("\nwarning: degraded: {why}");
        }
        print_line(&line)
    })
}

/// `sparkctl stop`: never starts a daemon to stop it.
fn stop(ctx: &Ctx) -> Result<(), Failure> {
    let client = match Client::open(&ctx.layout.socket, "sparkctl") {
        Ok((c, init)) => Some((c, init.pid)),
        Err(e) if e.is_not_running() => None,
        Err(e) => return Err(ctx.fail(e)),
    };
    let Some((client, pid)) = client else {
        return if ctx.json {
            print_json(&serde_json::json!({"stopped": false, "running": false}))
        } else {
            print_line("sparkd is not running")
        };
    };
    autostart::stop_and_wait(client, pid, &ctx.layout).map_err(|e| ctx.fail(e))?;
    if ctx.json {
        print_json(&serde_json::json!({"stopped": true, "pid": pid}))
    } else {
        print_line(&format!("sparkd (pid {pid}) stopped"))
    }
}

/// `sparkctl hooks install | uninstall | status [DIR]`.
fn run_hooks(action: HooksAction, json: bool) -> Result<(), Failure> {
    use sparkctl::hooks::{self, HookState};
    let fail = |e: hooks::HooksError| Failure {
        hint: Some(e.hint().to_owned()),
        message: e.to_string(),
        code: 1,
        kind: Some("hooks".into()),
    };
    let (dir, verb) = match &action {
        HooksAction::Install { dir } => (dir, "installed"),
        HooksAction::Uninstall { dir } => (dir, "uninstalled"),
        HooksAction::Status { dir } => (dir, "status"),
    };
    let hooks_dir =
        hooks::hooks_dir(std::path::Path::new(&dir_param(dir.clone())?)).map_err(fail)?;
    let list = match action {
        HooksAction::Install { .. } => hooks::install(&hooks_dir).map_err(fail)?,
        HooksAction::Uninstall { .. } => hooks::uninstall(&hooks_dir).map_err(fail)?,
        HooksAction::Status { .. } => hooks::status(&hooks_dir),
    };
    if json {
        return print_json(
            &serde_json::json!({"hooks_dir": hooks_dir.display().to_string(), "hooks": list}),
        );
    }
    let mut text = format!("{verb}: git hooks in {}", hooks_dir.display());
    for h in &list {
        let state = match h.state {
            HookState::Absent => "not installed",
            HookState::Installed => "spark",
            HookState::Chained => "spark, after the hook that was there",
            HookState::Foreign => "another hook (spark not installed)",
        };
        text += &format!("\n  {:<20} {state}", h.name);
    }
    print_line(&text)
}

/// `sparkctl service install | uninstall | status`.
fn run_service(action: ServiceAction, layout: &Layout, json: bool) -> Result<(), Failure> {
    use sparkctl::service::{Manager, Plan};
    let var = |k: &str| std::env::var_os(k);
    let uid = rustix::process::getuid().as_raw();
    let plan = Plan::new(Manager::current(), var, uid).map_err(service_failure)?;
    let control = sparkctl::service::find_program(plan.tool, std::env::var_os("PATH"));
    match action {
        ServiceAction::Install => service_install(&plan, control, layout, json),
        ServiceAction::Uninstall => service_uninstall(&plan, control, json),
        ServiceAction::Status => service_status(&plan, control, layout, json),
    }
}

fn service_failure(e: sparkctl::service::ServiceError) -> Failure {
    Failure {
        message: e.to_string(),
        hint: None,
        code: 2,
        kind: None,
    }
}

/// What the service runs: this `sparkd` (next to `sparkctl` or on `PATH`) and the layout.
fn service_spec(layout: &Layout) -> Result<sparkctl::service::ServiceSpec, Failure> {
    let sparkd = autostart::find_sparkd().ok_or_else(|| Failure {
        message: "sparkd not found next to sparkctl or on PATH".into(),
        hint: Some("install it: `cargo install --locked --path daemon`".into()),
        code: 2,
        kind: None,
    })?;
    let sparkd = std::fs::canonicalize(&sparkd).unwrap_or(sparkd);
    sparkctl::service::ServiceSpec::new(sparkd, layout, |k: &str| std::env::var_os(k))
        .map_err(service_failure)
}

/// `sparkctl service install`: write the file, hand the socket over from a daemon started on
/// demand, and start the service (or say how, without the tool).
fn service_install(
    plan: &sparkctl::service::Plan,
    control: Option<PathBuf>,
    layout: &Layout,
    json: bool,
) -> Result<(), Failure> {
    let spec = service_spec(layout)?;
    sparkctl::service::write_file(&plan.path, &plan.text(&spec)).map_err(service_failure)?;
    let mut lines = vec![format!("installed {}", plan.path.display())];
    let Some(control) = control else {
        lines.push(format!(
            "{} not found; to start it now and at every login, run: {}",
            plan.tool,
            plan.shown(&plan.start)
        ));
        return print_service(json, &plan.path, true, None, &lines);
    };
    // A daemon started on demand holds the socket: hand it over to the service.
    if let Ok((client, init)) = Client::open(&layout.socket, "sparkctl") {
        autostart::stop_and_wait(client, init.pid, layout)
            .map_err(|e| Failure::from_client(e, layout))?;
        lines.push(format!(
            "stopped sparkd (pid {}) so that the service takes over its socket",
            init.pid
        ));
    }
    for args in &plan.start {
        run_control(&control, args)?;
    }
    lines.push(format!("started: {}", plan.shown(&plan.start)));
    print_service(json, &plan.path, true, None, &lines)
}

/// `sparkctl service uninstall`: stop the service (while its manager still knows it), then
/// remove the file.
fn service_uninstall(
    plan: &sparkctl::service::Plan,
    control: Option<PathBuf>,
    json: bool,
) -> Result<(), Failure> {
    if !plan.path.exists() {
        let line = format!(
            "{} is not installed ({} does not exist)",
            plan.name,
            plan.path.display()
        );
        return print_service(json, &plan.path, false, None, &[line]);
    }
    let mut lines = Vec::new();
    match &control {
        Some(control) => {
            for args in &plan.stop {
                if let Err(f) = run_control(control, args) {
                    lines.push(format!("warning: {}", f.message));
                }
            }
        }
        None => lines.push(format!(
            "{} not found; if the service was started, stop it with: {}",
            plan.tool,
            plan.shown(&plan.stop)
        )),
    }
    sparkctl::service::remove_file(&plan.path).map_err(service_failure)?;
    lines.insert(0, format!("removed {}", plan.path.display()));
    print_service(json, &plan.path, false, None, &lines)
}

/// `sparkctl service status`: installed or not, current or stale, and what the manager says.
fn service_status(
    plan: &sparkctl::service::Plan,
    control: Option<PathBuf>,
    layout: &Layout,
    json: bool,
) -> Result<(), Failure> {
    use sparkctl::service::Manager;
    let installed = std::fs::read_to_string(&plan.path).ok();
    let mut lines = Vec::new();
    match &installed {
        None => lines.push(format!(
            "{} is not installed ({})",
            plan.name,
            plan.path.display()
        )),
        Some(current) => {
            lines.push(format!("installed {}", plan.path.display()));
            if service_spec(layout).is_ok_and(|s| plan.text(&s) != *current) {
                lines.push(
                    "it differs from what `sparkctl service install` writes now (sparkd moved, or SPARK_HOME/XDG paths changed); run it again".into(),
                );
            }
        }
    }
    let active = control.as_ref().and_then(|control| {
        let out = std::process::Command::new(control)
            .args(plan.status_args())
            .output()
            .ok()?;
        match plan.manager {
            Manager::Systemd => Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
                .filter(|s| !s.is_empty()),
            Manager::Launchd => Some(
                if out.status.success() {
                    "loaded"
                } else {
                    "not loaded"
                }
                .to_owned(),
            ),
        }
    });
    match &active {
        Some(state) => lines.push(format!("{}: {state}", plan.tool)),
        None if control.is_none() => lines.push(format!("{} not found", plan.tool)),
        None => {}
    }
    print_service(
        json,
        &plan.path,
        installed.is_some(),
        active.as_deref(),
        &lines,
    )
}

/// Run `control args…` (systemctl, launchctl); a failure names the command and what it said.
fn run_control(control: &std::path::Path, args: &[String]) -> Result<(), Failure> {
    let shown = format!("{} {}", control.display(), args.join(" "));
    let out = std::process::Command::new(control)
        .args(args)
        .output()
        .map_err(|e| Failure {
            message: format!("cannot run {shown}: {e}"),
            hint: None,
            code: 2,
            kind: None,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(Failure {
        message: format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        hint: Some("the service file is in place; fix the cause and run the command again".into()),
        code: 2,
        kind: None,
    })
}

fn print_service(
    json: bool,
    path: &std::path::Path,
    installed: bool,
    active: Option<&str>,
    lines: &[String],
) -> Result<(), Failure> {
    if json {
        return print_json(&serde_json::json!({
            "path": path.display().to_string(),
            "installed": installed,
            "active": active,
            "notes": lines,
        }));
    }
    print_line(&lines.join("\n"))
}

/// `PATH` or `PATH:START-END` (or `PATH:LINE`).
fn parse_focus(spec: &str) -> Result<Focus, Failure> {
    let bad = || Failure {
        message: format!(
            "bad focus {spec:?}: expected PATH or PATH:START-END with 1 <= START <= END"
        ),
        hint: Some("e.g. -f src/main.rs:40-60".into()),
        code: 1,
        kind: Some("bad_input".into()),
    };
    if let Some((path, range)) = spec.rsplit_once(':')
        && !range.is_empty()
        && range.chars().all(|c| c.is_ascii_digit() || c == '-')
    {
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        let (start, end) = (
            a.parse::<u32>().map_err(|_| bad())?,
            b.parse::<u32>().map_err(|_| bad())?,
        );
        if path.is_empty() || start == 0 || end < start {
            return Err(bad());
        }
        return Ok(Focus {
            path: path.to_owned(),
            start_line: Some(start),
            end_line: Some(end),
        });
    }
    if spec.is_empty() {
        return Err(bad());
    }
    Ok(Focus {
        path: spec.to_owned(),
        start_line: None,
        end_line: None,
    })
}

/// Renders a streaming `ask`: text and patch as they arrive, progress on a terminal.
struct AskView {
    json: bool,
    style: Style,
    /// Something was printed without a final newline.
    open_line: bool,
    progress_shown: bool,
    tty_err: bool,
}

impl AskView {
    fn new(json: bool, style: Style) -> AskView {
        use std::io::IsTerminal;
        AskView {
            json,
            style,
            open_line: false,
            progress_shown: false,
            tty_err: std::io::stderr().is_terminal(),
        }
    }

    fn on_notification(&mut self, n: spark_proto::Notification) {
        if n.method != ASK_PROGRESS {
            return;
        }
        let Some(params) = n.params else { return };
        if self.json {
            let _ = print_line(&params.to_string());
            return;
        }
        let Ok(p) = serde_json::from_value::<AskProgress>(params) else {
            return;
        };
        match p.event {
            AskEvent::Text { delta } => self.out(&delta),
            AskEvent::Patch { delta } => {
                let painted = self.style.paint(DIM, &delta);
                self.out(&painted)
            }
            AskEvent::Tokens {
                output_tokens,
                tokens_per_s,
            } if self.tty_err && !self.open_line => {
                eprint!("\r{} tokens · {tokens_per_s:.0} tok/s ", output_tokens);
                self.progress_shown = true;
            }
            AskEvent::Repair { attempt, reason } => {
                self.finish_stream();
                let first = reason.lines().next().unwrap_or_default();
                eprintln!(
                    "patch did not apply ({first}); asking the model to correct it (repair {attempt})"
                );
            }
            AskEvent::Tokens { .. } | AskEvent::PatchFile { .. } => {}
        }
    }

    fn out(&mut self, text: &str) {
        if self.progress_shown {
            eprint!("\r\x1b[K");
            self.progress_shown = false;
        }
        let _ = write_stdout(text.as_bytes());
        self.open_line = !text.ends_with('\n');
    }

    fn finish_stream(&mut self) {
        if self.progress_shown {
            eprint!("\r\x1b[K");
        }
        if self.open_line && !self.json {
            let _ = write_stdout(b"\n");
            self.open_line = false;
        }
    }

    fn print_result(&self, r: &AskResult, dry_run: bool) -> Result<(), Failure> {
        let t = &r.timings;
        let mut timing = format!("total {:.0} ms", t.total_ms);
        if let Some(ttft) = t.ttft_ms {
            timing = format!("ttft {ttft:.0} ms · {timing}");
        }
        if let Some(apply) = t.apply_ms {
            timing += &format!(" · apply {apply:.1} ms");
        }
        timing += &format!(" · {} tokens", t.output_tokens);
        if dry_run && !r.diff.is_empty() {
            write_stdout(self.style.diff(&r.diff).as_bytes())?;
        }
        if r.edit.is_some() {
            let summary = EditResult {
                edit: r.edit.clone(),
                repo: String::new(),
                files: r.files.clone(),
                diff: String::new(),
                total_ms: t.total_ms,
            };
            print_line(&render_edit(&summary, "applied", &self.style))?;
        }
        eprintln!("{}", self.style.paint(DIM, &timing));
        Ok(())
    }
}

/// The answer of `unwatch` or `refresh`: JSON, or one line saying what happened.
fn print_watch_change(
    r: &spark_proto::methods::WatchChange,
    json: bool,
    done: &str,
    not_watched: &str,
) -> Result<(), Failure> {
    if json {
        return print_json(r);
    }
    print_line(&if r.was_watched {
        format!("{done} {}", r.repo)
    } else {
        format!("{} {not_watched}", r.repo)
    })
}

/// An absolute directory for the daemon: `dir` resolved against the current one.
fn dir_param(dir: Option<PathBuf>) -> Result<String, Failure> {
    let base = cwd()?;
    Ok(match dir {
        None => base,
        Some(d) => std::path::Path::new(&base).join(d).display().to_string(),
    })
}

fn cwd() -> Result<String, Failure> {
    let dir = std::env::current_dir().map_err(|e| Failure {
        message: format!("cannot read the current directory: {e}"),
        hint: None,
        code: 1,
        kind: None,
    })?;
    // The daemon sees only the cwd: refuse variables that would make git pick another repository.
    sparkctl::gitenv::check(&dir, |k| std::env::var_os(k)).map_err(|r| Failure {
        message: r.message,
        hint: Some(r.hint),
        code: 1,
        kind: Some("git_environment".into()),
    })?;
    Ok(dir.display().to_string())
}

fn read_patch(file: Option<&std::path::Path>) -> Result<String, Failure> {
    let bad = |message: String| Failure {
        message,
        hint: None,
        code: 1,
        kind: Some("bad_input".into()),
    };
    let bytes = match file {
        None => read_stdin_patch()?,
        Some(p) if p.as_os_str() == "-" => read_stdin_patch()?,
        Some(p) => {
            std::fs::read(p).map_err(|e| bad(format!("cannot read {}: {e}", p.display())))?
        }
    };
    let text = String::from_utf8(bytes).map_err(|_| bad("the patch is not UTF-8 text".into()))?;
    if text.trim().is_empty() {
        return Err(bad("the patch is empty".into()));
    }
    // The request carries the patch inline, within the socket's line limit.
    if text.len() > spark_proto::MAX_LINE_BYTES / 2 {
        return Err(bad(format!(
            "the patch is {} bytes; the limit is {}",
            text.len(),
            spark_proto::MAX_LINE_BYTES / 2
        )));
    }
    Ok(text)
}

fn read_stdin_patch() -> Result<Vec<u8>, Failure> {
    use std::io::{IsTerminal, Read};
    if std::io::stdin().is_terminal() {
        return Err(Failure {
            message: "no patch given".into(),
            hint: Some("pass a patch file, or pipe one in: `sparkctl apply < fix.patch`".into()),
            code: 1,
            kind: Some("bad_input".into()),
        });
    }
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| Failure {
            message: format!("cannot read standard input: {e}"),
            hint: None,
            code: 1,
            kind: None,
        })?;
    Ok(buf)
}

const GREEN: &str = "32";
const RED: &str = "31";
const YELLOW: &str = "33";
const CYAN: &str = "36";
const DIM: &str = "2";
const BOLD: &str = "1";

/// Colour on a terminal, plain text elsewhere (and with NO_COLOR set).
#[derive(Debug, Clone, Copy)]
struct Style {
    color: bool,
}

impl Style {
    fn detect(choice: ColorChoice) -> Style {
        use std::io::IsTerminal;
        let no_color = std::env::var("NO_COLOR").ok();
        Style {
            color: sparkctl::output::use_color(
                choice,
                std::io::stdout().is_terminal(),
                no_color.as_deref(),
            ),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn diff(&self, diff: &str) -> String {
        if !self.color {
            return diff.to_owned();
        }
        let mut out = String::with_capacity(diff.len() + diff.len() / 4);
        for line in diff.split_inclusive('\n') {
            let body = line.strip_suffix('\n').unwrap_or(line);
            let code = if body.starts_with("+++")
                || body.starts_with("---")
                || body.starts_with("diff ")
                || body.starts_with("index ")
            {
                Some(BOLD)
            } else if body.starts_with('+') {
                Some(GREEN)
            } else if body.starts_with('-') {
                Some(RED)
            } else if body.starts_with("@@") {
                Some(CYAN)
            } else {
                None
            };
            match code {
                Some(c) => {
                    out += &self.paint(c, body);
                    if line.ends_with('\n') {
                        out.push('\n');
                    }
                }
                None => out += line,
            }
        }
        out
    }
}

/// A diffstat and a summary line: "applied edit 3f2a1c9: 2 files, +5 -1 (1.4 ms)".
fn render_edit(r: &EditResult, verb: &str, style: &Style) -> String {
    let mut out = String::new();
    let width = r.files.iter().map(|f| f.path.len()).max().unwrap_or(0);
    let (mut add, mut del) = (0, 0);
    for f in &r.files {
        add += f.added;
        del += f.removed;
        let mark = match f.change {
            FileChange::Added => style.paint(GREEN, "A"),
            FileChange::Deleted => style.paint(RED, "D"),
            FileChange::Modified => style.paint(YELLOW, "M"),
        };
        let plus = style.paint(GREEN, &"+".repeat(f.added.min(30) as usize));
        let minus = style.paint(RED, &"-".repeat(f.removed.min(30) as usize));
        out += &format!(
            " {mark} {:<width$} | {:>4} {plus}{minus}\n",
            f.path,
            f.added + f.removed
        );
    }
    match &r.edit {
        Some(id) => {
            out += &format!(
                "{verb} edit {}: {} file{}, +{add} -{del} ({:.1} ms)",
                style.paint(YELLOW, id),
                r.files.len(),
                if r.files.len() == 1 { "" } else { "s" },
                r.total_ms
            )
        }
        None => out += "nothing to change: the files already match",
    }
    out
}

/// `log`'s lines: id, age, state, message, files, with the age and state columns as wide as
/// their widest value so the messages line up whatever the ages.
fn render_log(edits: &[spark_proto::methods::LogEntry], now: u64, style: &Style) -> String {
    let ages: Vec<String> = edits
        .iter()
        .map(|e| human_age(now.saturating_sub(e.at)))
        .collect();
    let states: Vec<&str> = edits.iter().map(|e| state_label(e.state)).collect();
    let age_w = ages.iter().map(|a| a.chars().count()).max().unwrap_or(0);
    let state_w = states.iter().map(|s| s.len()).max().unwrap_or(0);
    let id_w = edits.iter().map(|e| e.id.len()).max().unwrap_or(0);
    let mut out = String::new();
    for ((e, age), state) in edits.iter().zip(&ages).zip(&states) {
        let mut what = if e.message.is_empty() {
            e.source.clone()
        } else {
            e.message.clone()
        };
        // A trigger's message is its comment's instruction: say where it came from, and why
        // one that failed left its comment in place.
        if e.source == "trigger" {
            what = format!("spark! {}", first_line(&what));
        }
        if let Some(reason) = &e.reason {
            what = format!("{} ({})", first_line(&what), first_line(reason));
        }
        let files = match e.files.len() {
            1 => e.files[0].clone(),
            n => format!("{n} files"),
        };
        // Padding goes outside the colour codes, which have no width on screen.
        let id_pad = " ".repeat(id_w - e.id.len());
        out += &format!(
            "{}{id_pad}  {age:>age_w$}  {state:<state_w$}  {}  {}\n",
            style.paint(YELLOW, &e.id),
            first_line(&what),
            style.paint(DIM, &format!("({files})"))
        );
    }
    out
}

/// An edit's state as `log` prints it.
fn state_label(state: spark_proto::methods::EditState) -> &'static str {
    use spark_proto::methods::EditState;
    match state {
        EditState::Applied => "applied",
        EditState::Undone => "undone",
        EditState::Stashed => "stashed",
        EditState::RevertedOutside => "reverted outside spark",
        EditState::Failed => "failed",
    }
}

/// Long output (`log`, `show`): through the pager when standard output is a terminal, as git
/// does; straight to standard output otherwise, or when the pager cannot run.
fn write_long(bytes: &[u8]) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let pager =
        sparkctl::output::pager_command(std::io::stdout().is_terminal(), |k| std::env::var(k).ok());
    if let Some(command) = pager {
        match sparkctl::output::page(&command, bytes) {
            Ok(()) => return Ok(()),
            Err(e) => eprintln!("sparkctl: warning: {e}; printing directly"),
        }
    }
    write_stdout(bytes)
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn human_age(ms: u64) -> String {
    format!("{} ago", human_duration(ms))
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
        out += &format!("repo      {} ({} edits", r.path, r.edits);
        if r.watched {
            let state = if r.indexed { "watched" } else { "indexing" };
            out += &format!(", {state}: {} files, {} watches", r.files, r.watches);
            if let Some(at) = r.last_event_at {
                out += &format!(", last change {}", human_age(now_ms().saturating_sub(at)));
            }
        }
        out += ")\n";
        if let Some(why) = &r.degraded {
            out += &format!("          degraded: {why}\n");
        }
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
            "session   {} {state}, age {}",
            x.repo,
            human_duration(x.age_ms)
        );
        if let Some(provider) = &x.provider {
            out += &format!(", {provider}");
        }
        if let Some(model) = &x.model {
            out += &format!(" ({model})");
        }
        if x.fell_back_to_http {
            out += ", HTTP + SSE (WebSocket mode failed here; retried later)";
        }
        if let Some(lane) = &x.lane {
            out += &format!(", lane {lane}");
        }
        if x.lanes_refused {
            out += ", own connection (the provider refuses stream_id lanes)";
        }
        out.push('\n');
        if x.failures > 0 {
            out += &format!(
                "          {} failed attempts in a row{}",
                x.failures,
                x.last_error
                    .as_deref()
                    .map(|e| format!(", last: {e}"))
                    .unwrap_or_default()
            );
            match (x.paused, x.next_attempt_in_ms) {
                (_, Some(ms)) => out += &format!("; next attempt in {}\n", human_duration(ms)),
                (true, None) => out += "; reconnects paused until the next ask or watch\n",
                (false, None) => out.push('\n'),
            }
        }
    }
    for p in &s.provider_connections {
        if p.lanes_refused {
            out += &format!(
                "provider  {} refuses stream_id lanes: one connection per session\n",
                p.url
            );
        } else {
            out += &format!(
                "provider  {} {} shared connection{}, {} lane{}\n",
                p.url,
                p.connections,
                if p.connections == 1 { "" } else { "s" },
                p.lanes,
                if p.lanes == 1 { "" } else { "s" }
            );
        }
    }
    match &s.cache {
        Some(c) => match &c.unavailable {
            Some(why) => out += &format!("cache     unavailable: {why}"),
            None => {
                out += &format!(
                    "cache     {} files, {} KiB on disk, {}",
                    c.entries,
                    c.bytes / 1024,
                    c.dir
                );
                if let Some(why) = &c.rebuilding {
                    out += &format!("\n          rebuilding in the background ({why})");
                } else if let Some(why) = &c.last_rebuild {
                    out += &format!(
                        "\n          rebuilt {} time{} (last: {why})",
                        c.rebuilds,
                        if c.rebuilds == 1 { "" } else { "s" }
                    );
                }
            }
        },
        None => out += "cache     none",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status(sessions: serde_json::Value) -> StatusResult {
        serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "protocol_version": 1, "pid": 7, "started_at": 0,
            "uptime_ms": 1000, "socket": "<socket>", "log_file": "<log>", "connections": 1,
            "repos": [], "sessions": sessions,
        }))
        .expect("a status")
    }

    #[test]
    fn status_says_why_a_provider_fails_and_what_happens_next() {
        let text = render_status(&status(serde_json::json!([
            {"repo": "<repo>", "connected": false, "age_ms": 5000,
             "provider": "wss://gateway.example/v1/responses", "model": "m",
             "fell_back_to_http": true, "failures": 4,
             "last_error": "closed by the provider (1011: internal error)",
             "next_attempt_in_ms": 12000},
            {"repo": "<other>", "connected": false, "age_ms": 5000, "failures": 3,
             "paused": true, "last_error": "connection refused"},
        ])));
        assert!(
            text.contains("HTTP + SSE (WebSocket mode failed here; retried later)"),
            "{text}"
        );
        assert!(
            text.contains("4 failed attempts in a row, last: closed by the provider (1011: internal error); next attempt in 12s"),
            "{text}"
        );
        assert!(
            text.contains("3 failed attempts in a row, last: connection refused; reconnects paused until the next ask or watch"),
            "{text}"
        );
    }

    #[test]
    fn status_shows_lanes_and_a_provider_that_refuses_them() {
        let mut s = status(serde_json::json!([
            {"repo": "<a>", "connected": true, "age_ms": 5000, "lane": "repo-0123.1"},
            {"repo": "<b>", "connected": true, "age_ms": 5000, "lanes_refused": true},
        ]));
        s.provider_connections = vec![
            spark_proto::methods::ProviderConnectionStatus {
                url: "ws://127.0.0.1:1/v1/responses".into(),
                connections: 1,
                lanes: 10,
                lanes_refused: false,
            },
            spark_proto::methods::ProviderConnectionStatus {
                url: "wss://old.example/v1/responses".into(),
                lanes_refused: true,
                ..Default::default()
            },
        ];
        let text = render_status(&s);
        assert!(
            text.contains("session   <a> connected, age 5s, lane repo-0123.1\n"),
            "{text}"
        );
        assert!(
            text.contains("own connection (the provider refuses stream_id lanes)"),
            "{text}"
        );
        assert!(
            text.contains(
                "provider  ws://127.0.0.1:1/v1/responses 1 shared connection, 10 lanes\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("provider  wss://old.example/v1/responses refuses stream_id lanes: one connection per session\n"),
            "{text}"
        );
    }
}
