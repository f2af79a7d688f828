//! Finding `spark!` comments: which comment syntax a file uses (by extension or name, from one
//! table), and a small lexer per syntax that knows where strings and block comments are, so a
//! marker inside a string literal or a block comment is never taken for an instruction.
//!
//! Only a line comment alone on its line counts (ARCHITECTURE.md, "`spark!` comment
//! triggers"): the daemon removes that whole line in the edit, which would take code with it
//! if the comment trailed a statement.

/// The marker that ends an instruction comment.
pub(crate) const MARKER: &str = "spark!";

/// A string literal form: its delimiters, whether it may span lines, whether `\` escapes.
#[derive(Debug, Clone, Copy)]
struct Str {
    open: &'static str,
    close: &'static str,
    multiline: bool,
    escapes: bool,
}

const fn s(open: &'static str, close: &'static str, multiline: bool, escapes: bool) -> Str {
    Str {
        open,
        close,
        multiline,
        escapes,
    }
}

/// One comment style: line comment tokens, block comment delimiters and string forms. Longer
/// openers are listed first where one is a prefix of another (`"""` before `"`).
#[derive(Debug)]
pub(crate) struct Syntax {
    pub(crate) name: &'static str,
    line: &'static [&'static str],
    block: &'static [(&'static str, &'static str)],
    strings: &'static [Str],
}

const DQ: Str = s("\"", "\"", false, true);
const SQ: Str = s("'", "'", false, true);
const DQ_ML: Str = s("\"", "\"", true, true);
const SQ_ML: Str = s("'", "'", true, true);
const TRIPLE_DQ: Str = s("\"\"\"", "\"\"\"", true, true);
const TRIPLE_SQ: Str = s("'''", "'''", true, true);
const BACKTICK_ML: Str = s("`", "`", true, true);
const C_BLOCK: (&str, &str) = ("/*", "*/");

const PYTHON: Syntax = Syntax {
    name: "python",
    line: &["#"],
    block: &[],
    strings: &[TRIPLE_DQ, TRIPLE_SQ, DQ, SQ],
};
const SHELL: Syntax = Syntax {
    name: "shell",
    line: &["#"],
    block: &[],
    strings: &[DQ_ML, s("'", "'", true, false)],
};
const RUBY: Syntax = Syntax {
    name: "ruby",
    line: &["#"],
    block: &[("=begin", "=end")],
    strings: &[DQ_ML, SQ_ML],
};
const HASH_CONFIG: Syntax = Syntax {
    name: "hash",
    line: &["#"],
    block: &[],
    strings: &[TRIPLE_DQ, TRIPLE_SQ, DQ, SQ],
};
const RUST: Syntax = Syntax {
    name: "rust",
    line: &["//"],
    block: &[C_BLOCK],
    // A lifetime (`'a`) opens a "char literal" that the end of its line closes again.
    strings: &[
        s("r#\"", "\"#", true, false),
        s("r\"", "\"", true, false),
        DQ_ML,
        SQ,
    ],
};
const C_LIKE: Syntax = Syntax {
    name: "c",
    line: &["//"],
    block: &[C_BLOCK],
    strings: &[DQ, SQ],
};
const JS_LIKE: Syntax = Syntax {
    name: "javascript",
    line: &["//"],
    block: &[C_BLOCK],
    strings: &[BACKTICK_ML, DQ, SQ],
};
const GO: Syntax = Syntax {
    name: "go",
    line: &["//"],
    block: &[C_BLOCK],
    strings: &[s("`", "`", true, false), DQ, SQ],
};
const TRIPLE_QUOTED_C: Syntax = Syntax {
    name: "kotlin",
    line: &["//"],
    block: &[C_BLOCK],
    strings: &[TRIPLE_DQ, DQ, SQ],
};
const CSHARP: Syntax = Syntax {
    name: "csharp",
    line: &["//"],
    block: &[C_BLOCK],
    strings: &[s("@\"", "\"", true, false), DQ, SQ],
};
const PHP: Syntax = Syntax {
    name: "php",
    line: &["//", "#"],
    block: &[C_BLOCK],
    strings: &[DQ_ML, SQ_ML],
};
const SQL: Syntax = Syntax {
    name: "sql",
    line: &["--"],
    block: &[C_BLOCK],
    strings: &[s("'", "'", true, false), s("\"", "\"", false, false)],
};
const LUA: Syntax = Syntax {
    name: "lua",
    line: &["--"],
    // `--[[` must win over `--`: it is looked for first.
    block: &[("--[[", "]]")],
    strings: &[s("[[", "]]", true, false), DQ, SQ],
};
const HASKELL: Syntax = Syntax {
    name: "haskell",
    line: &["--"],
    block: &[("{-", "-}")],
    strings: &[DQ],
};
const LISP: Syntax = Syntax {
    name: "lisp",
    line: &[";"],
    block: &[("#|", "|#")],
    strings: &[DQ_ML],
};
const ERLANG: Syntax = Syntax {
    name: "erlang",
    line: &["%"],
    block: &[],
    strings: &[DQ],
};

/// File extensions (lower case) and exact file names, with their syntax.
const BY_EXTENSION: &[(&[&str], &Syntax)] = &[
    (&["py", "pyi", "pyw"], &PYTHON),
    (&["sh", "bash", "zsh", "ksh", "fish"], &SHELL),
    (&["rb", "rake", "gemspec"], &RUBY),
    (
        &[
            "yml", "yaml", "toml", "r", "pl", "pm", "ex", "exs", "nim", "cmake", "tf", "nix", "jl",
        ],
        &HASH_CONFIG,
    ),
    (&["rs"], &RUST),
    (
        &[
            "c", "h", "cc", "cpp", "cxx", "hpp", "hh", "hxx", "m", "mm", "java", "zig", "proto",
            "scss", "glsl",
        ],
        &C_LIKE,
    ),
    (
        &["js", "mjs", "cjs", "jsx", "ts", "mts", "cts", "tsx", "dart"],
        &JS_LIKE,
    ),
    (&["go"], &GO),
    (
        &["kt", "kts", "swift", "scala", "sc", "groovy"],
        &TRIPLE_QUOTED_C,
    ),
    (&["cs"], &CSHARP),
    (&["php"], &PHP),
    (&["sql"], &SQL),
    (&["lua"], &LUA),
    (&["hs", "elm"], &HASKELL),
    (&["el", "lisp", "clj", "cljs", "scm", "rkt"], &LISP),
    (&["erl", "hrl"], &ERLANG),
];
const BY_NAME: &[(&str, &Syntax)] = &[
    ("Dockerfile", &HASH_CONFIG),
    ("Makefile", &HASH_CONFIG),
    ("makefile", &HASH_CONFIG),
    ("GNUmakefile", &HASH_CONFIG),
    ("Gemfile", &RUBY),
    ("Rakefile", &RUBY),
    ("CMakeLists.txt", &HASH_CONFIG),
    (".bashrc", &SHELL),
    (".zshrc", &SHELL),
];

/// The comment syntax of the file at repository-relative `path`, if spark knows it.
pub(crate) fn syntax_for(path: &str) -> Option<&'static Syntax> {
    let name = path.rsplit('/').next().unwrap_or(path);
    if let Some((_, syntax)) = BY_NAME.iter().find(|(n, _)| *n == name) {
        return Some(syntax);
    }
    let (_, ext) = name.rsplit_once('.')?;
    let ext = ext.to_ascii_lowercase();
    BY_EXTENSION
        .iter()
        .find(|(exts, _)| exts.contains(&ext.as_str()))
        .map(|(_, syntax)| *syntax)
}

/// A `spark!` comment found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    /// 0-based line index.
    pub(crate) line: usize,
    /// The whole line as it is in the file, without its terminator (what the edit removes).
    pub(crate) text: String,
    /// What the comment asks, without the comment token and the marker.
    pub(crate) instruction: String,
}

/// Where the lexer is at the start of a character.
#[derive(Debug, Clone, Copy)]
enum State {
    Code,
    Str(Str),
    Block(&'static str),
}

/// Every `spark!` line comment of `text`, in file order.
pub(crate) fn find(syntax: &Syntax, text: &str) -> Vec<Found> {
    let mut out = Vec::new();
    let mut state = State::Code;
    for (index, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        // Only a comment that starts the line (after indentation) is an instruction.
        if let State::Code = state {
            let body = line.trim_start();
            if let Some(token) = syntax.line.iter().find(|t| body.starts_with(**t))
                && !syntax.block.iter().any(|(open, _)| body.starts_with(open))
                && let Some(instruction) = instruction_of(&body[token.len()..])
            {
                out.push(Found {
                    line: index,
                    text: line.to_owned(),
                    instruction,
                });
                continue;
            }
        }
        state = scan_line(syntax, line, state);
    }
    out
}

/// The instruction in a comment's text, if it ends with the marker: `handle the empty list`
/// from ` handle the empty list spark!`.
fn instruction_of(comment: &str) -> Option<String> {
    let rest = comment.trim().strip_suffix(MARKER)?;
    // `myspark!` is a word, not the marker.
    if rest
        .chars()
        .last()
        .is_some_and(|c| c.is_alphanumeric() || c == '_')
    {
        return None;
    }
    let instruction = rest.trim().trim_end_matches([':', '-', '—']).trim();
    (!instruction.is_empty()).then(|| instruction.to_owned())
}

/// Advance the lexer over one line (without its terminator); returns the state at its end.
fn scan_line(syntax: &Syntax, line: &str, mut state: State) -> State {
    let mut i = 0;
    let bytes = line.as_bytes();
    while i < bytes.len() {
        let rest = &line[i..];
        match state {
            State::Code => {
                if let Some((open, close)) = syntax.block.iter().find(|(o, _)| rest.starts_with(o))
                {
                    state = State::Block(close);
                    i += open.len();
                } else if syntax.line.iter().any(|t| rest.starts_with(t)) {
                    // The rest of the line is a comment.
                    return State::Code;
                } else if let Some(form) = syntax.strings.iter().find(|f| rest.starts_with(f.open))
                {
                    state = State::Str(*form);
                    i += form.open.len();
                } else {
                    i += rest.chars().next().map_or(1, char::len_utf8);
                }
            }
            State::Str(form) => {
                if form.escapes && bytes[i] == b'\\' {
                    i += 1 + rest[1..].chars().next().map_or(0, char::len_utf8);
                } else if rest.starts_with(form.close) {
                    state = State::Code;
                    i += form.close.len();
                } else {
                    i += rest.chars().next().map_or(1, char::len_utf8);
                }
            }
            State::Block(close) => {
                if let Some(at) = rest.find(close) {
                    state = State::Code;
                    i += at + close.len();
                } else {
                    return state;
                }
            }
        }
    }
    match state {
        // An unterminated one-line literal (or a Rust lifetime) ends with its line.
        State::Str(form) if !form.multiline => State::Code,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(path: &str, text: &str) -> Vec<(usize, String)> {
        let syntax = syntax_for(path).expect("known syntax");
        find(syntax, text)
            .into_iter()
            .map(|f| (f.line, f.instruction))
            .collect()
    }

    #[test]
    fn at_least_fifteen_languages_have_a_comment_syntax() {
        let files = [
            "a.py",
            "a.rb",
            "a.sh",
            "a.yaml",
            "a.toml",
            "a.rs",
            "a.c",
            "a.cpp",
            "a.java",
            "a.js",
            "a.ts",
            "a.go",
            "a.kt",
            "a.swift",
            "a.cs",
            "a.php",
            "a.sql",
            "a.lua",
            "a.hs",
            "a.clj",
            "a.erl",
            "Dockerfile",
            "Makefile",
            "a.ex",
            "a.scala",
            "a.dart",
        ];
        for f in files {
            assert!(syntax_for(f).is_some(), "{f}");
        }
        assert!(syntax_for("README.md").is_none());
        assert!(syntax_for("LICENSE").is_none());
        assert_eq!(
            syntax_for("src/App.TSX").map(|s| s.name),
            Some("javascript")
        );
    }

    #[test]
    fn own_line_comments_ending_with_the_marker_are_instructions() {
        let py = "def f(xs):\n    # handle the empty list spark!\n    return xs[0]\n";
        assert_eq!(found("a.py", py), vec![(1, "handle the empty list".into())]);
        let js = "function f() {\r\n  // make this async spark!\r\n}\r\n";
        assert_eq!(found("a.js", js), vec![(1, "make this async".into())]);
        let sql = "select 1;\n-- add an index on email spark!\n";
        assert_eq!(
            found("q.sql", sql),
            vec![(1, "add an index on email".into())]
        );
        let lua = "--[[ not this spark! ]]\n-- but this spark!\n";
        assert_eq!(found("a.lua", lua), vec![(1, "but this".into())]);
        let hs = "-- type it: spark!\nf x = x\n";
        assert_eq!(found("a.hs", hs), vec![(0, "type it".into())]);
    }

    #[test]
    fn markers_in_strings_block_comments_and_trailing_comments_are_not_instructions() {
        let py = concat!(
            "s = \"# not me spark!\"\n",
            "doc = \"\"\"\n",
            "# inside a docstring spark!\n",
            "\"\"\"\n",
            "x = 1  # trailing spark!\n",
            "# a word myspark!\n",
            "# spark!\n",
            "# after all that spark!\n",
        );
        assert_eq!(found("a.py", py), vec![(7, "after all that".into())]);
        let rs = concat!(
            "/* block\n",
            "// in a block comment spark!\n",
            "*/\n",
            "let s = \"multi\n",
            "// in a string spark!\n",
            "\";\n",
            "let r = r#\"\n",
            "// in a raw string spark!\n",
            "\"#;\n",
            "fn f<'a>(x: &'a str) {}\n",
            "// real spark!\n",
        );
        assert_eq!(found("a.rs", rs), vec![(10, "real".into())]);
        let ts = "const t = `\n// template spark!\n`;\n// yes spark!\n";
        assert_eq!(found("a.ts", ts), vec![(3, "yes".into())]);
        let go = "var s = `\n// raw spark!\n`\n";
        assert!(found("a.go", go).is_empty());
        let c = "char *s = \"a\\\" // escaped quote spark!\";\n// ok spark!\n";
        assert_eq!(found("a.c", c), vec![(1, "ok".into())]);
    }

    #[test]
    fn several_comments_come_in_file_order_with_their_lines() {
        let text = "# one spark!\nx = 1\n    # two spark!\n";
        let all = find(syntax_for("a.py").expect("python"), text);
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].text, "    # two spark!");
        assert_eq!(all[0].line, 0);
        assert_eq!(all[1].line, 2);
    }
}
