//! `sparkctl history`, `restore` and `diff`: the local history of a watched repository.

use clap::Args;
use spark_proto::methods::{
    HistoryDiff, HistoryDiffParams, HistoryList, HistoryListParams, HistoryRestore,
    HistoryRestoreParams, HistoryVersion,
};

use super::{
    Ctx, DIM, Failure, GREEN, RED, Style, YELLOW, call, cwd, human_age, now_ms, print_line,
    render_edit, write_long, write_stdout,
};

pub(crate) const HISTORY_AFTER_HELP: &str = "\
Every settled change to a text file of a watched repository is kept, whoever made it (your
editor, another agent, a script, `git checkout -- FILE`), and so is every file right before
spark edits it. Secret, ignored, binary and oversized files are not kept. Snapshots live in the
repository's object database under refs/spark/history (never pushed by a normal `git push`) and
are pruned after 14 days or beyond 500 MB per repository (history_max_age_days, history_max_mb
in config.toml).

Examples:
  sparkctl history src/main.rs
  sparkctl history --since 1h
  sparkctl restore src/main.rs --at 10m
  sparkctl diff --since 10m";

pub(crate) const RESTORE_AFTER_HELP: &str = "\
The restore is a recorded edit: `sparkctl undo` puts back what the file held before it, and a
deleted file comes back with its old content and mode.

WHEN is one of:
  a version id from `sparkctl history PATH` (6 or more hex digits), e.g. 3f2a1c9b0e
  a duration back from now: 30s, 10m, 2h, 3d, 1w, 1h30m
  a time with its zone: 2026-05-01T14:30:00Z, 2026-05-01 16:30+02:00
A duration or time picks the newest version at or before then.

Examples:
  sparkctl restore src/main.rs --at 10m --dry-run
  sparkctl restore notes.md --at 3f2a1c9b0e";

pub(crate) const DIFF_AFTER_HELP: &str = "\
Compares each file with the version local history held at that time, across every writer. A
file history first saw change after that time is compared with its committed version.

Examples:
  sparkctl diff --since 10m
  sparkctl diff --since 2h src/";

/// `sparkctl history [PATH] [--since DURATION]`.
#[derive(Debug, Args)]
pub(crate) struct HistoryArgs {
    /// A file: its versions. Without it, every snapshot of the repository and the files it
    /// changed.
    path: Option<String>,
    /// Only versions since then: a duration (10m, 2h, 3d) or a time (2026-05-01T14:30:00Z).
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// Show at most this many versions.
    #[arg(short = 'n', long, default_value_t = 100)]
    limit: u32,
}

/// `sparkctl restore PATH --at WHEN [--dry-run]`.
#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    /// The file to put back.
    path: String,
    /// Which version: an id, a duration back from now, or a time (see below).
    #[arg(long, value_name = "WHEN")]
    at: String,
    /// Show the diff the restore would make; write nothing.
    #[arg(long)]
    dry_run: bool,
}

/// `sparkctl diff --since WHEN [PATH]`.
#[derive(Debug, Args)]
pub(crate) struct DiffArgs {
    /// Since when: a duration (10m, 2h) or a time (2026-05-01T14:30:00Z).
    #[arg(long, value_name = "WHEN")]
    since: String,
    /// Only this file, or the files under this directory.
    path: Option<String>,
}

pub(crate) fn history(ctx: &Ctx, args: HistoryArgs) -> Result<(), Failure> {
    let params = HistoryListParams {
        cwd: cwd()?,
        path: args.path,
        since: args.since,
        limit: Some(args.limit),
    };
    ctx.print(&call::<HistoryList>(ctx, &params)?, |r| {
        if r.versions.is_empty() {
            return print_line(&match &r.path {
                Some(p) => format!("no versions of {p} in local history"),
                None => "no local history yet (is the repository watched? `sparkctl watch`)".into(),
            });
        }
        let text = match &r.path {
            Some(_) => render_versions(&r.versions, now_ms(), &ctx.style),
            None => render_snapshots(&r.versions, now_ms(), &ctx.style),
        };
        write_long(text.as_bytes())
    })
}

pub(crate) fn restore(ctx: &Ctx, args: RestoreArgs) -> Result<(), Failure> {
    let dry_run = args.dry_run;
    let params = HistoryRestoreParams {
        cwd: cwd()?,
        path: args.path,
        at: args.at,
        dry_run,
    };
    ctx.print(&call::<HistoryRestore>(ctx, &params)?, |r| {
        if !dry_run {
            return print_line(&render_edit(r, "restored as", &ctx.style));
        }
        if r.diff.is_empty() {
            return print_line("nothing to change: the file already holds that version");
        }
        write_stdout(ctx.style.diff(&r.diff).as_bytes())
    })
}

pub(crate) fn diff(ctx: &Ctx, args: DiffArgs) -> Result<(), Failure> {
    let params = HistoryDiffParams {
        cwd: cwd()?,
        since: args.since.clone(),
        path: args.path,
    };
    ctx.print(&call::<HistoryDiff>(ctx, &params)?, |r| {
        if r.diff.is_empty() {
            return print_line(&format!("no changes since {}", args.since));
        }
        write_long(ctx.style.diff(&r.diff).as_bytes())
    })
}

fn render_versions(versions: &[HistoryVersion], now: u64, style: &Style) -> String {
    let rows: Vec<[String; 5]> = versions
        .iter()
        .map(|v| {
            let f = v.files.first();
            [
                human_age(now.saturating_sub(v.at)),
                v.source.clone(),
                f.and_then(|f| f.size)
                    .map_or_else(|| "-".to_owned(), human_size),
                f.map_or_else(String::new, |f| format!("+{} -{}", f.added, f.removed)),
                f.map_or_else(String::new, |f| f.change.clone()),
            ]
        })
        .collect();
    let w = |i: usize| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0);
    let (age_w, src_w, size_w, stat_w) = (w(0), w(1), w(2), w(3));
    let mut out = String::new();
    for (v, [age, source, size, stat, change]) in versions.iter().zip(&rows) {
        let change = match change.as_str() {
            "deleted" => style.paint(RED, change),
            "added" => style.paint(GREEN, change),
            _ => change.clone(),
        };
        out += &format!(
            "{}  {age:>age_w$}  {source:<src_w$}  {size:>size_w$}  {stat:<stat_w$}  {change}\n",
            style.paint(YELLOW, &v.id),
        );
    }
    out
}

/// The repository's snapshots: id, age, source, and the files each changed.
fn render_snapshots(versions: &[HistoryVersion], now: u64, style: &Style) -> String {
    let ages: Vec<String> = versions
        .iter()
        .map(|v| human_age(now.saturating_sub(v.at)))
        .collect();
    let age_w = ages.iter().map(|a| a.chars().count()).max().unwrap_or(0);
    let src_w = versions.iter().map(|v| v.source.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (v, age) in versions.iter().zip(&ages) {
        let mut files: Vec<String> = v
            .files
            .iter()
            .take(5)
            .map(|f| match f.change.as_str() {
                "deleted" => format!("{} (deleted)", f.path),
                "added" => format!("{} (new)", f.path),
                _ => f.path.clone(),
            })
            .collect();
        if v.files.len() > 5 {
            files.push(style.paint(DIM, &format!("and {} more", v.files.len() - 5)));
        }
        out += &format!(
            "{}  {age:>age_w$}  {:<src_w$}  {}\n",
            style.paint(YELLOW, &v.id),
            v.source,
            files.join(", ")
        );
    }
    out
}

fn human_size(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spark_proto::methods::HistoryFile;

    fn version(id: &str, at: u64, size: Option<u64>, change: &str) -> HistoryVersion {
        HistoryVersion {
            id: id.into(),
            at,
            source: "watch".into(),
            files: vec![HistoryFile {
                path: "f.txt".into(),
                change: change.into(),
                size,
                added: 12,
                removed: 3,
            }],
        }
    }

    #[test]
    fn versions_line_up_whatever_the_ages_and_sizes() {
        let style = Style { color: false };
        let text = render_versions(
            &[
                version("aaaaaaaaaa", 9_995_000, Some(12), "modified"),
                version("bbbbbbbbbb", 6_000_000, None, "deleted"),
                version("cccccccccc", 0, Some(4096), "added"),
            ],
            10_000_000,
            &style,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let col = |l: &str, what: &str| l.find(what).expect(what);
        assert_eq!(col(lines[0], "+12"), col(lines[1], "+12"), "{text}");
        assert_eq!(col(lines[1], "+12"), col(lines[2], "+12"), "{text}");
        assert!(lines[2].contains("4.0 KiB"), "{text}");
        assert!(
            lines[1].contains("  -  "),
            "a deleted version has no size: {text}"
        );
    }
}
