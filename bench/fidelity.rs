//! Edit fidelity on real history: every modified text file of the newest non-merge commits of
//! the given repositories, turned into an `apply_patch` patch and into SEARCH/REPLACE blocks
//! (the commit's own hunks, 3 lines of context, no `@@` text), applied by the engine to the
//! parent's content. Each result is exact (the commit's bytes), misapplied (anything else) or
//! refused; then again under each sloppiness transform models apply to what they write.
//!
//! Run: `SPARK_BENCH_REPOS=<repo>:<repo>:… cargo bench -p spark-tests --bench fidelity`
//! (or the repositories as arguments after `--`; bare mirrors work). `SPARK_BENCH_COMMITS`
//! sets the commits per repository (default 120). Writes `bench/out/fidelity.json`.

use std::path::PathBuf;
use std::time::Instant;

use sparkd::bench::{CorpusCase, apply_text, corpus_cases};

type Hunk = Vec<(char, String)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transform {
    Clean,
    PaddedMarkers,
    DroppedIndentation,
    StrayBlankLines,
    TrailingWhitespace,
    CurlyQuotes,
}

const TRANSFORMS: [Transform; 6] = [
    Transform::Clean,
    Transform::PaddedMarkers,
    Transform::DroppedIndentation,
    Transform::StrayBlankLines,
    Transform::TrailingWhitespace,
    Transform::CurlyQuotes,
];

impl Transform {
    fn name(self) -> &'static str {
        match self {
            Transform::Clean => "clean",
            Transform::PaddedMarkers => "padded markers",
            Transform::DroppedIndentation => "dropped indentation",
            Transform::StrayBlankLines => "stray blank lines",
            Transform::TrailingWhitespace => "trailing whitespace",
            Transform::CurlyQuotes => "curly quotes",
        }
    }

    /// Whether this transform erases part of the change itself: a line that only gains or
    /// loses trailing whitespace, or a whitespace-only line, is no change at all once the
    /// transform adds trailing whitespace to the removed lines or strips the shared
    /// indentation. Then the sloppy patch says something other than the commit (its two sides
    /// have more lines in common than the clean patch's), and reading it as written is right;
    /// such cases are counted apart, not in the rates.
    fn erases_the_change(self, hunks: &[Hunk]) -> bool {
        if !matches!(
            self,
            Transform::TrailingWhitespace | Transform::DroppedIndentation
        ) {
            return false;
        }
        let sides = |hunk: &Hunk| -> (Vec<String>, Vec<String>) {
            let old = hunk
                .iter()
                .filter(|(s, _)| *s != '+')
                .map(|(_, l)| l.clone())
                .collect();
            let new = hunk
                .iter()
                .filter(|(s, _)| *s != '-')
                .map(|(_, l)| l.clone())
                .collect();
            (old, new)
        };
        hunks
            .iter()
            .zip(self.apply(hunks).iter())
            .any(|(clean, sloppy)| {
                let (a, b) = sides(clean);
                let (c, d) = sides(sloppy);
                common_lines(&c, &d) > common_lines(&a, &b)
            })
    }

    /// The hunks as a sloppy model would write them. Added lines are never touched: a model
    /// that writes other added lines writes another edit, not a sloppy one.
    fn apply(self, hunks: &[Hunk]) -> Vec<Hunk> {
        hunks
            .iter()
            .map(|hunk| match self {
                Transform::Clean | Transform::PaddedMarkers => hunk.clone(),
                Transform::DroppedIndentation => {
                    // The leading whitespace every non-blank line starts with (tabs and spaces
                    // are not interchangeable: "\t\t" and "    " share nothing).
                    let common = hunk
                        .iter()
                        .filter(|(_, l)| !l.trim().is_empty())
                        .map(|(_, l)| &l[..l.len() - l.trim_start().len()])
                        .reduce(|a, b| {
                            let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
                            &a[..n]
                        })
                        .unwrap_or("")
                        .to_owned();
                    hunk.iter()
                        .map(|(s, l)| (*s, l.strip_prefix(common.as_str()).unwrap_or(l).to_owned()))
                        .collect()
                }
                Transform::StrayBlankLines => {
                    let mut out = vec![(' ', String::new())];
                    out.extend(hunk.iter().cloned());
                    out.push((' ', String::new()));
                    out
                }
                Transform::TrailingWhitespace => hunk
                    .iter()
                    .map(|(s, l)| match s {
                        '+' => (*s, l.clone()),
                        _ => (*s, format!("{l} ")),
                    })
                    .collect(),
                Transform::CurlyQuotes => hunk
                    .iter()
                    .map(|(s, l)| match s {
                        '+' => (*s, l.clone()),
                        _ => (*s, curl(l)),
                    })
                    .collect(),
            })
            .collect()
    }
}

/// The length of the longest common subsequence of lines (hunks are small).
fn common_lines(a: &[String], b: &[String]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diag = 0;
        for (j, y) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    row[b.len()]
}

fn curl(line: &str) -> String {
    let (mut double, mut single) = (false, false);
    line.chars()
        .map(|c| match c {
            '"' => {
                double = !double;
                if double { '“' } else { '”' }
            }
            '\'' => {
                single = !single;
                if single { '‘' } else { '’' }
            }
            other => other,
        })
        .collect()
}

fn apply_patch_text(path: &str, hunks: &[Hunk], padded: bool) -> String {
    let (begin, update, at, end) = if padded {
        (
            " *** Begin Patch",
            "  *** Update File: ",
            "@@  ",
            " *** End Patch  ",
        )
    } else {
        (
            "*** Begin Patch",
            "*** Update File: ",
            "@@",
            "*** End Patch",
        )
    };
    let mut text = format!("{begin}\n{update}{path}\n");
    for hunk in hunks {
        text.push_str(at);
        text.push('\n');
        for (sign, line) in hunk {
            text.push(*sign);
            text.push_str(line);
            text.push('\n');
        }
    }
    text + end + "\n"
}

fn search_replace_text(path: &str, hunks: &[Hunk], padded: bool) -> String {
    let pad = if padded { "  " } else { "" };
    let mut text = String::new();
    for hunk in hunks {
        let side = |keep: char| -> String {
            hunk.iter()
                .filter(|(s, _)| *s == ' ' || *s == keep)
                .map(|(_, l)| format!("{l}\n"))
                .collect()
        };
        text += &format!(
            "{path}\n```\n<<<<<<< SEARCH{pad}\n{}======={pad}\n{}>>>>>>> REPLACE{pad}\n```\n\n",
            side('-'),
            side('+')
        );
    }
    text
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    exact: usize,
    misapplied: usize,
    refused: usize,
    /// Cases whose change the transform erased (not counted in the rates).
    erased: usize,
}

impl Tally {
    fn total(&self) -> usize {
        self.exact + self.misapplied + self.refused
    }

    fn pct(&self, n: usize) -> f64 {
        100.0 * n as f64 / self.total().max(1) as f64
    }
}

/// A misapplied case in detail: the patch and where the result first differs from the commit.
fn show(patch: &str, got: &[u8], want: &[u8]) {
    let (got, want) = (String::from_utf8_lossy(got), String::from_utf8_lossy(want));
    let at = got
        .lines()
        .zip(want.lines())
        .position(|(a, b)| a != b)
        .unwrap_or(got.lines().count().min(want.lines().count()));
    println!("--- patch\n{patch}--- first difference at line {}", at + 1);
    for (label, text) in [("got", &got), ("want", &want)] {
        let near: Vec<&str> = text.lines().skip(at.saturating_sub(2)).take(5).collect();
        println!("{label}: {near:#?}");
    }
}

fn main() {
    let mut repos: Vec<PathBuf> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .collect();
    if repos.is_empty() {
        repos = std::env::var("SPARK_BENCH_REPOS")
            .unwrap_or_default()
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect();
    }
    if repos.is_empty() {
        eprintln!("no repositories: set SPARK_BENCH_REPOS=<repo>:<repo> or pass them after --");
        std::process::exit(2);
    }
    let commits: usize = std::env::var("SPARK_BENCH_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);

    let started = Instant::now();
    let mut corpus: Vec<(String, CorpusCase)> = Vec::new();
    let mut per_repo = Vec::new();
    for repo in &repos {
        let name = repo
            .components()
            .rev()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .find(|c| c != "repo" && c != ".git")
            .unwrap_or_default();
        let (cases, skipped) = corpus_cases(repo, commits)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", repo.display()));
        let commit_count = {
            let mut ids: Vec<&str> = cases.iter().map(|c| c.commit.as_str()).collect();
            ids.dedup();
            ids.len()
        };
        println!(
            "{name}: {commit_count} commits, {} files (left out: {} not text, {} without a final newline)",
            cases.len(),
            skipped.not_text,
            skipped.no_final_newline
        );
        per_repo.push(serde_json::json!({
            "repo": name, "commits": commit_count, "files": cases.len(),
            "skipped_not_text": skipped.not_text, "skipped_no_final_newline": skipped.no_final_newline,
        }));
        corpus.extend(cases.into_iter().map(|c| (name.clone(), c)));
    }

    let mut rows = Vec::new();
    let mut examples: Vec<String> = Vec::new();
    println!(
        "\n{:<22} {:<16} {:>6} {:>8} {:>11} {:>9} {:>7}",
        "transform", "format", "files", "exact", "misapplied", "refused", "erased"
    );
    for how in TRANSFORMS {
        for (format, render) in [
            (
                "apply_patch",
                apply_patch_text as fn(&str, &[Hunk], bool) -> String,
            ),
            ("search/replace", search_replace_text),
        ] {
            let mut tally = Tally::default();
            for (repo, case) in &corpus {
                if how.erases_the_change(&case.hunks) {
                    tally.erased += 1;
                    continue;
                }
                let hunks = how.apply(&case.hunks);
                let text = render(&case.path, &hunks, how == Transform::PaddedMarkers);
                match apply_text(&case.old, &text) {
                    Ok(bytes) if bytes == case.new => tally.exact += 1,
                    Ok(bytes) => {
                        tally.misapplied += 1;
                        if std::env::var_os("SPARK_BENCH_SHOW").is_some() {
                            show(&text, &bytes, &case.new);
                        }
                        if examples.len() < 20 {
                            examples.push(format!(
                                "{} {format}: {repo} {} {}",
                                how.name(),
                                &case.commit[..10],
                                case.path
                            ));
                        }
                    }
                    Err(_) => tally.refused += 1,
                }
            }
            println!(
                "{:<22} {:<16} {:>6} {:>7.2}% {:>10.2}% {:>8.2}% {:>7}",
                how.name(),
                format,
                tally.total(),
                tally.pct(tally.exact),
                tally.pct(tally.misapplied),
                tally.pct(tally.refused),
                tally.erased
            );
            rows.push(serde_json::json!({
                "transform": how.name(), "format": format, "files": tally.total(),
                "exact": tally.exact, "misapplied": tally.misapplied, "refused": tally.refused,
                "erased": tally.erased,
            }));
        }
    }
    if !examples.is_empty() {
        println!("\nmisapplied (first {}):", examples.len());
        for e in &examples {
            println!("  {e}");
        }
    }
    println!("\n{:.1} s", started.elapsed().as_secs_f64());
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/out");
    let _ = std::fs::create_dir_all(&out);
    let report =
        serde_json::json!({"repos": per_repo, "rows": rows, "misapplied_examples": examples});
    let _ = std::fs::write(
        out.join("fidelity.json"),
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    );
}
