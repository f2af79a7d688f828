//! Hostile patches: each is refused with its stable code and changes nothing anywhere.
//!
//! One table, one loop: every case gets a fresh repository (plus whatever its setup plants in
//! it) and a fresh canary directory next to it, outside the worktree, that symlinks in the
//! repository point at. The patch goes over the real socket, first as a dry run and then for
//! real; both must be refused with the expected code and `kind`, the message must name the
//! offending path, and the worktree (`.git` included) and the canary must be byte-identical
//! afterwards. Failures are collected so one run reports every case that misbehaves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use spark_proto::ErrorCode;
use spark_proto::methods::{ApplyParams, EditApply};
use spark_tests::{InProcess, TestRepo, hermetic_git, snapshot};
use sparkctl::{Client, ClientError};

/// An absolute path outside any temp directory; the absolute-path cases aim at it, and it must
/// never appear (the suite may run as root, so only the daemon stands between it and `/etc`).
const ETC_PROBE: &str = "/etc/spark-hostile-probe";

/// What a case's setup gets: the repository and the canary outside it.
struct Env<'a> {
    repo: &'a TestRepo,
    canary: &'a Path,
}

impl Env<'_> {
    /// `rel` in the repository becomes a symlink to `target` (`{canary}` expands).
    fn symlink(&self, target: &str, rel: &str) {
        let target = target.replace("{canary}", &self.canary.display().to_string());
        let link = self.repo.path().join(rel);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).expect("mkdir for symlink");
        }
        std::os::unix::fs::symlink(target, link).expect("create symlink");
    }

    /// Write and commit `rel`.
    fn commit(&self, rel: &str, bytes: &[u8]) {
        self.repo.write(rel, bytes);
        self.repo.git(&["add", "-f", "--", rel]);
        self.repo.git(&["commit", "-q", "-m", "fixture"]);
    }

    /// A nested repository (its own `.git` directory) at `rel`, never added to the parent.
    fn nested_repo(&self, rel: &str) {
        let dir = self.repo.path().join(rel);
        std::fs::create_dir_all(&dir).expect("mkdir nested repo");
        std::fs::write(dir.join("lib.rs"), "canary\n").expect("write nested file");
        let out = hermetic_git(&dir)
            .args(["init", "-q"])
            .output()
            .expect("git init nested");
        assert!(out.status.success(), "git init nested repo failed");
    }
}

type Setup = fn(&Env<'_>);

/// One hostile patch and how it must be refused. `patch` and `names` expand `{canary}` (the
/// canary's absolute path) and `{canary_name}` (its directory name, a sibling of the repo).
struct Case {
    name: &'static str,
    setup: Setup,
    patch: String,
    code: ErrorCode,
    kind: &'static str,
    /// Text the error message must contain: the offending path as the message quotes it
    /// (control and invisible characters escaped as `\u{…}`).
    names: Option<&'static str>,
    /// The client's cwd, relative to the worktree ("" = its root).
    cwd: &'static str,
}

impl Case {
    /// The same case sent from a subdirectory of the worktree.
    fn sent_from(self, cwd: &'static str) -> Case {
        Case { cwd, ..self }
    }
}

fn no_setup(_: &Env<'_>) {}

fn case(
    name: &'static str,
    setup: Setup,
    patch: String,
    code: ErrorCode,
    kind: &'static str,
    names: Option<&'static str>,
) -> Case {
    Case {
        name,
        setup,
        patch,
        code,
        kind,
        names,
        cwd: "",
    }
}

fn wrap(body: &str) -> String {
    format!("*** Begin Patch\n{body}*** End Patch\n")
}

fn add(path: &str) -> String {
    wrap(&add_op(path))
}

fn add_op(path: &str) -> String {
    format!("*** Add File: {path}\n+pwned\n")
}

/// An update whose chunk would match the canary's and the fixtures' `canary` line, so that
/// only the path can be the reason for a refusal.
fn update(path: &str) -> String {
    wrap(&update_op(path))
}

fn update_op(path: &str) -> String {
    format!("*** Update File: {path}\n@@\n-canary\n+pwned\n")
}

fn delete(path: &str) -> String {
    wrap(&format!("*** Delete File: {path}\n"))
}

/// Renames `src/lib.rs` (with a valid chunk) to `dest`.
fn move_to(dest: &str) -> String {
    wrap(&format!(
        "*** Update File: src/lib.rs\n*** Move to: {dest}\n@@\n-fn alpha() {{}}\n+fn alpha2() {{}}\n"
    ))
}

/// A valid change to the committed `src/lib.rs`.
fn valid_update_op() -> String {
    "*** Update File: src/lib.rs\n@@\n-fn alpha() {}\n+fn alpha_v2() {}\n".to_owned()
}

/// An aider SEARCH/REPLACE block for `path`.
fn search_replace(path: &str, search: &str, replace: &str) -> String {
    format!("{path}\n```\n<<<<<<< SEARCH\n{search}=======\n{replace}>>>>>>> REPLACE\n```\n")
}

const BASE_FILES: &[(&str, &[u8])] = &[
    ("README.md", b"# demo\ncanary\n"),
    ("src/lib.rs", b"fn alpha() {}\nfn beta() {}\n"),
    (".gitignore", b"build/\n*.log\n"),
];

// A table reads best one case per line.
#[rustfmt::skip]
fn cases() -> Vec<Case> {
    use ErrorCode::{EditRejected as Rejected, PatchMismatch as Mismatch};
    vec![
        // Traversal and absolute paths: aimed at the canary, the repository's sibling.
        case("parent_dir", no_setup, add("../{canary_name}/pwned.txt"), Rejected, "path_parent_dir", Some("../{canary_name}/pwned.txt")),
        case("parent_dir_nested", no_setup, add("a/../../{canary_name}/pwned.txt"), Rejected, "path_parent_dir", Some("a/../../{canary_name}/pwned.txt")),
        case("parent_dir_update", no_setup, update("../{canary_name}/victim.txt"), Rejected, "path_parent_dir", Some("../{canary_name}/victim.txt")),
        case("parent_dir_delete", no_setup, delete("./../{canary_name}/victim.txt"), Rejected, "path_parent_dir", Some("./../{canary_name}/victim.txt")),
        case("parent_dir_alone", no_setup, add(".."), Rejected, "path_parent_dir", Some("..")),
        case("absolute_etc", no_setup, add(ETC_PROBE), Rejected, "path_absolute", Some(ETC_PROBE)),
        case("absolute_canary", no_setup, update("{canary}/victim.txt"), Rejected, "path_absolute", Some("{canary}/victim.txt")),
        case("absolute_double_slash", no_setup, add("//server/share/x"), Rejected, "path_absolute", Some("//server/share/x")),
        case("windows_drive", no_setup, add("C:\\x"), Rejected, "path_absolute", Some("C:\\x")),
        case("windows_drive_relative", no_setup, add("C:x"), Rejected, "path_absolute", Some("C:x")),
        case("windows_unc", no_setup, add("\\\\server\\share\\x"), Rejected, "path_absolute", Some("\\\\server\\share\\x")),
        case("backslash", no_setup, add("src\\evil.rs"), Rejected, "path_backslash", Some("src\\evil.rs")),
        case("backslash_traversal", no_setup, add("..\\{canary_name}\\pwned.txt"), Rejected, "path_backslash", Some("..\\{canary_name}\\pwned.txt")),
        case("colon_stream", no_setup, update("README.md:Zone.Identifier"), Rejected, "path_colon", Some("README.md:Zone.Identifier")),
        case("trailing_slash", no_setup, add("src/"), Rejected, "path_trailing_slash", Some("src/")),
        case("empty_after_normalising", no_setup, add("./."), Rejected, "path_empty", Some("./.")),
        case("cwd_in_git_dir", |e| e.repo.write(".git/hooks/README.sample", b"x\n"), add("pre-commit"), Rejected, "path_git_dir", Some(".git/hooks/pre-commit")).sent_from(".git/hooks"),
        case("cwd_subdir_traversal", no_setup, add("../../{canary_name}/pwned.txt"), Rejected, "path_parent_dir", Some("../../{canary_name}/pwned.txt")).sent_from("src"),
        // Control, bidi and separator characters; the message shows them escaped.
        case("nul", no_setup, add("src/a\0.rs"), Rejected, "path_control_character", Some("src/a\\u{0}.rs")),
        case("escape_sequence", no_setup, add("src/\x1b[31mred.rs"), Rejected, "path_control_character", Some("src/\\u{1b}[31mred.rs")),
        case("carriage_return", no_setup, add("src/a\rb.rs"), Rejected, "path_control_character", Some("src/a\\u{d}b.rs")),
        case("tab", no_setup, add("src/a\tb.rs"), Rejected, "path_control_character", Some("src/a\\u{9}b.rs")),
        case("delete_char", no_setup, add("src/\x7f.rs"), Rejected, "path_control_character", Some("src/\\u{7f}.rs")),
        case("c1_control", no_setup, add("src/\u{85}.rs"), Rejected, "path_control_character", Some("src/\\u{85}.rs")),
        case("bidi_override", no_setup, add("src/\u{202e}sr.txt"), Rejected, "path_control_character", Some("src/\\u{202e}sr.txt")),
        case("bidi_isolate", no_setup, add("src/\u{2066}x.rs"), Rejected, "path_control_character", Some("src/\\u{2066}x.rs")),
        case("line_separator", no_setup, add("src/a\u{2028}b.rs"), Rejected, "path_control_character", Some("src/a\\u{2028}b.rs")),
        // `.git` in every spelling git itself guards against.
        case("git_config", no_setup, update(".git/config"), Rejected, "path_git_dir", Some(".git/config")),
        case("git_hook", no_setup, add(".git/hooks/pre-commit"), Rejected, "path_git_dir", Some(".git/hooks/pre-commit")),
        case("git_index_delete", no_setup, delete(".git/index"), Rejected, "path_git_dir", Some(".git/index")),
        case("git_upper", no_setup, update(".GIT/config"), Rejected, "path_git_dir", Some(".GIT/config")),
        case("git_trailing_dot", no_setup, add(".git./x"), Rejected, "path_git_dir", Some(".git./x")),
        case("git_trailing_space", no_setup, add(".git /x"), Rejected, "path_git_dir", Some(".git /x")),
        case("git_zero_width", no_setup, add(".g\u{200c}it/x"), Rejected, "path_git_dir", Some(".g\\u{200c}it/x")),
        case("git_bom", no_setup, add(".git\u{feff}/x"), Rejected, "path_git_dir", Some(".git\\u{feff}/x")),
        case("git_short_name", no_setup, update("git~1/config"), Rejected, "path_git_dir", Some("git~1/config")),
        case("git_short_name_upper", no_setup, update("GIT~2/config"), Rejected, "path_git_dir", Some("GIT~2/config")),
        case("git_ntfs_stream", no_setup, add(".git::$INDEX_ALLOCATION/config"), Rejected, "path_git_dir", Some(".git::$INDEX_ALLOCATION/config")),
        case("git_nested_dir", |e| e.nested_repo("vendor/lib"), update("vendor/lib/.git/config"), Rejected, "path_git_dir", Some("vendor/lib/.git/config")),
        // Symlinks: leaving the tree, as the leaf, into `.git`, dangling, chained.
        case("symlink_dir_out_add", |e| e.symlink("{canary}", "out"), add("out/pwned.txt"), Rejected, "path_symlink_escape", Some("out/pwned.txt")),
        case("symlink_dir_out_update", |e| e.symlink("{canary}", "out"), update("out/victim.txt"), Rejected, "path_symlink_escape", Some("out/victim.txt")),
        case("symlink_dir_out_delete", |e| e.symlink("{canary}", "out"), delete("out/victim.txt"), Rejected, "path_symlink_escape", Some("out/victim.txt")),
        case("symlink_dir_relative_up", |e| e.symlink("..", "up"), add("up/{canary_name}/pwned.txt"), Rejected, "path_symlink_escape", Some("up/{canary_name}/pwned.txt")),
        case("symlink_dir_chain", |e| { e.symlink("{canary}", "b"); e.symlink("b", "a"); }, add("a/pwned.txt"), Rejected, "path_symlink_escape", Some("a/pwned.txt")),
        case("symlink_dir_dangling", |e| e.symlink("{canary}/later", "later"), add("later/pwned.txt"), Rejected, "path_symlink_escape", Some("later/pwned.txt")),
        case("symlink_leaf_update", |e| e.symlink("{canary}/victim.txt", "leaf.txt"), update("leaf.txt"), Rejected, "path_symlink_target", Some("leaf.txt")),
        case("symlink_leaf_delete", |e| e.symlink("{canary}/victim.txt", "leaf.txt"), delete("leaf.txt"), Rejected, "path_symlink_target", Some("leaf.txt")),
        case("symlink_leaf_dangling_add", |e| e.symlink("{canary}/created.txt", "new.txt"), add("new.txt"), Rejected, "path_symlink_target", Some("new.txt")),
        case("symlink_leaf_inside", |e| e.symlink("README.md", "readme-link.md"), update("readme-link.md"), Rejected, "path_symlink_target", Some("readme-link.md")),
        case("symlink_loop", |e| e.symlink("loop", "loop"), add("loop/pwned.txt"), Rejected, "path_symlink_escape", Some("loop/pwned.txt")),
        case("symlink_into_git_dir", |e| e.symlink(".git", "gitdir"), add("gitdir/hooks/pre-commit"), Rejected, "path_symlink_escape", Some("gitdir/hooks/pre-commit")),
        case("symlink_into_git_hooks", |e| e.symlink(".git/hooks", "hooks"), add("hooks/post-checkout"), Rejected, "path_symlink_escape", Some("hooks/post-checkout")),
        case("symlink_into_nested_git", |e| { e.nested_repo("vendor/lib"); e.symlink("vendor/lib/.git", "ng"); }, update("ng/config"), Rejected, "path_symlink_escape", Some("ng/config")),
        // Submodules and nested repositories.
        case("nested_repo", |e| e.nested_repo("vendor/lib"), add("vendor/lib/pwned.rs"), Rejected, "path_submodule", Some("vendor/lib/pwned.rs")),
        case("nested_repo_update", |e| e.nested_repo("vendor/lib"), update("vendor/lib/lib.rs"), Rejected, "path_submodule", Some("vendor/lib/lib.rs")),
        case("nested_repo_via_symlink", |e| { e.nested_repo("vendor/lib"); e.symlink("vendor/lib", "lib"); }, update("lib/lib.rs"), Rejected, "path_submodule", Some("lib/lib.rs")),
        case("submodule_gitlink", gitlink, add("vendor/sub/pwned.rs"), Rejected, "path_submodule", Some("vendor/sub/pwned.rs")),
        case("submodule_gitdir_file", |e| e.repo.write("vendor/wt/.git", b"gitdir: ../../.git/modules/wt\n"), add("vendor/wt/pwned.rs"), Rejected, "path_submodule", Some("vendor/wt/pwned.rs")),
        // Ignored targets.
        case("gitignored_dir", no_setup, add("build/out.js"), Rejected, "path_ignored", Some("build/out.js")),
        case("gitignored_existing", |e| e.repo.write("debug.log", b"canary\n"), update("debug.log"), Rejected, "path_ignored", Some("debug.log")),
        case("gitignored_via_symlink", |e| { e.repo.write("build/keep.js", b"canary\n"); e.symlink("build", "dist"); }, add("dist/out.js"), Rejected, "path_ignored", Some("dist/out.js")),
        case("info_exclude", |e| e.repo.write(".git/info/exclude", b"private.txt\n"), add("private.txt"), Rejected, "path_ignored", Some("private.txt")),
        // The secrets deny-list, also through a symlink and invisible characters.
        case("secret_env", no_setup, add(".env"), Rejected, "path_secret", Some(".env")),
        case("secret_env_tracked", |e| e.commit(".env", b"canary\n"), update(".env"), Rejected, "path_secret", Some(".env")),
        case("secret_env_local", no_setup, add("config/.env.local"), Rejected, "path_secret", Some("config/.env.local")),
        case("secret_env_upper_dot", no_setup, add(".ENV."), Rejected, "path_secret", Some(".ENV.")),
        case("secret_id_rsa", no_setup, add("id_rsa"), Rejected, "path_secret", Some("id_rsa")),
        case("secret_id_rsa_zero_width", no_setup, add("id_rsa\u{200c}"), Rejected, "path_secret", Some("id_rsa\\u{200c}")),
        case("secret_key", no_setup, add("deploy/server.key"), Rejected, "path_secret", Some("deploy/server.key")),
        case("secret_ssh_config", no_setup, add(".ssh/config"), Rejected, "path_secret", Some(".ssh/config")),
        case("secret_aws_upper", no_setup, add(".AWS/credentials"), Rejected, "path_secret", Some(".AWS/credentials")),
        case("secret_via_symlink", |e| { e.repo.write(".ssh/authorized_keys", b"canary\n"); e.symlink(".ssh", "keys"); }, update("keys/authorized_keys"), Rejected, "path_secret", Some("keys/authorized_keys")),
        // Binary targets.
        case("binary_nul", |e| e.commit("assets/logo.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\ncanary\n"), update("assets/logo.png"), Rejected, "binary_target", Some("assets/logo.png")),
        case("binary_invalid_utf8", |e| e.commit("latin1.txt", b"caf\xe9\ncanary\n"), update("latin1.txt"), Rejected, "binary_target", Some("latin1.txt")),
        case("binary_delete", |e| e.commit("assets/logo.png", b"\x89PNG\0\0"), delete("assets/logo.png"), Rejected, "binary_target", Some("assets/logo.png")),
        // Existence does not match the operation.
        case("add_over_untracked", |e| e.repo.write("notes.txt", b"mine\n"), add("notes.txt"), Rejected, "path_already_exists", Some("notes.txt")),
        // Over a committed, unmodified file an Add is a whole-file rewrite (tests/suite/fidelity.rs).
        case("add_over_modified", |e| e.repo.write("src/lib.rs", b"// mine\n"), add("src/lib.rs"), Rejected, "path_already_exists", Some("src/lib.rs")),
        case("delete_missing", no_setup, delete("gone.txt"), Rejected, "path_not_found", Some("gone.txt")),
        case("update_missing", no_setup, update("gone.txt"), Rejected, "path_not_found", Some("gone.txt")),
        case("update_directory", no_setup, update("src"), Rejected, "path_is_directory", Some("src")),
        case("add_under_file", no_setup, add("README.md/x"), Rejected, "path_not_a_directory", Some("README.md/x")),
        // Context that matches nowhere, or loosely in two places.
        case("context_not_found", no_setup, wrap("*** Update File: src/lib.rs\n@@\n-fn gamma() {}\n+fn delta() {}\n"), Mismatch, "context_not_found", Some("src/lib.rs")),
        case("header_not_found", no_setup, wrap("*** Update File: src/lib.rs\n@@ impl Missing\n-fn alpha() {}\n+fn a() {}\n"), Mismatch, "context_not_found", Some("src/lib.rs")),
        case("chunks_out_of_order", no_setup, wrap("*** Update File: src/lib.rs\n@@\n-fn beta() {}\n+fn b() {}\n@@\n-fn alpha() {}\n+fn a() {}\n"), Mismatch, "context_not_found", Some("src/lib.rs")),
        case("ambiguous_loose", |e| e.commit("src/dup.rs", b"\tlet x = 1;\n  let x = 1;\n"), wrap("*** Update File: src/dup.rs\n@@\n-let x = 1;\n+let x = 2;\n"), Mismatch, "ambiguous_match", Some("src/dup.rs")),
        // Malformed patches.
        case("missing_end_patch", no_setup, "*** Begin Patch\n*** Add File: ok.txt\n+hello\n".to_owned(), Rejected, "patch_syntax", None),
        case("unknown_marker", no_setup, wrap("*** Frobnicate File: ok.txt\n+hello\n"), Rejected, "patch_syntax", None),
        case("update_without_chunk", no_setup, wrap("*** Update File: src/lib.rs\n"), Rejected, "patch_syntax", Some("src/lib.rs")),
        case("add_line_without_plus", no_setup, wrap("*** Add File: ok.txt\nhello\n"), Rejected, "patch_syntax", None),
        case("empty_path", no_setup, wrap("*** Add File: \n+hello\n"), Rejected, "patch_syntax", None),
        case("text_after_end", no_setup, format!("{}rm -rf /\n", add("ok.txt")), Rejected, "patch_syntax", None),
        case("heredoc_not_closed", no_setup, format!("apply_patch <<'EOF'\n{}", add("ok.txt")), Rejected, "patch_syntax", None),
        case("no_operations", no_setup, wrap(""), Rejected, "patch_empty", None),
        case("not_a_patch", no_setup, "rm -rf ~\n".to_owned(), Rejected, "patch_not_found", None),
        case("same_path_twice", no_setup, wrap(&format!("{}{}", add_op("ok.txt"), add_op("ok.txt"))), Rejected, "patch_duplicate_path", Some("ok.txt")),
        case("same_path_after_normalising", no_setup, wrap(&format!("{}{}", valid_update_op(), valid_update_op().replace("src/lib.rs", "./src//lib.rs"))), Rejected, "duplicate_path", Some("src/lib.rs")),
        // Moves.
        case("move_onto_existing", no_setup, move_to("README.md"), Rejected, "path_already_exists", Some("README.md")),
        case("move_out_of_tree", no_setup, move_to("../{canary_name}/moved.rs"), Rejected, "path_parent_dir", Some("../{canary_name}/moved.rs")),
        case("move_into_git_dir", no_setup, move_to(".git/hooks/post-checkout"), Rejected, "path_git_dir", Some(".git/hooks/post-checkout")),
        case("move_through_symlink", |e| e.symlink("{canary}", "out"), move_to("out/moved.rs"), Rejected, "path_symlink_escape", Some("out/moved.rs")),
        case("move_to_secret", no_setup, move_to(".env"), Rejected, "path_secret", Some(".env")),
        // Multi-file patches whose first file is valid: it must not be written either.
        case("second_file_traversal", no_setup, wrap(&format!("{}{}", add_op("ok.txt"), add_op("../{canary_name}/pwned.txt"))), Rejected, "path_parent_dir", Some("../{canary_name}/pwned.txt")),
        case("second_file_git_dir", no_setup, wrap(&format!("{}{}", valid_update_op(), update_op(".git/config"))), Rejected, "path_git_dir", Some(".git/config")),
        case("second_file_secret", no_setup, wrap(&format!("*** Delete File: README.md\n{}", add_op(".env"))), Rejected, "path_secret", Some(".env")),
        case("second_file_symlink", |e| e.symlink("{canary}", "out"), wrap(&format!("{}{}", add_op("ok.txt"), update_op("out/victim.txt"))), Rejected, "path_symlink_escape", Some("out/victim.txt")),
        case("second_file_mismatch", no_setup, wrap(&format!("{}*** Update File: README.md\n@@\n-no such line\n+x\n", add_op("ok.txt"))), Mismatch, "context_not_found", Some("README.md")),
        case("second_file_binary", |e| e.commit("assets/logo.png", b"\x89PNG\0\0canary\n"), wrap(&format!("{}{}", valid_update_op(), update_op("assets/logo.png"))), Rejected, "binary_target", Some("assets/logo.png")),
        case("second_file_syntax", no_setup, wrap(&format!("{}*** Update File: README.md\n", add_op("ok.txt"))), Rejected, "patch_syntax", Some("README.md")),
        // aider SEARCH/REPLACE blocks.
        case("aider_parent_dir", no_setup, search_replace("../{canary_name}/pwned.txt", "", "pwned\n"), Rejected, "path_parent_dir", Some("../{canary_name}/pwned.txt")),
        case("aider_git_dir", no_setup, search_replace(".git/config", "[core]\n", "[core]\n\thooksPath = /tmp\n"), Rejected, "path_git_dir", Some(".git/config")),
        case("aider_context_not_found", no_setup, search_replace("src/lib.rs", "fn gamma() {}\n", "fn delta() {}\n"), Mismatch, "context_not_found", Some("src/lib.rs")),
        case("aider_second_file_secret", no_setup, format!("{}\n{}", search_replace("src/lib.rs", "fn alpha() {}\n", "fn a() {}\n"), search_replace(".env", "", "TOKEN=x\n")), Rejected, "path_secret", Some(".env")),
        case("aider_symlink_escape", |e| e.symlink("{canary}", "out"), search_replace("out/victim.txt", "canary\n", "pwned\n"), Rejected, "path_symlink_escape", Some("out/victim.txt")),
        case("aider_missing_replace", no_setup, "src/lib.rs\n<<<<<<< SEARCH\nfn alpha() {}\n=======\nfn a() {}\n".to_owned(), Rejected, "patch_syntax", None),
    ]
}

/// A gitlink (what `git submodule add` leaves in the index) at `vendor/sub`, with no checkout.
fn gitlink(e: &Env<'_>) {
    let head = e.repo.git(&["rev-parse", "HEAD"]);
    let info = format!("160000,{},vendor/sub", head.trim());
    e.repo.git(&["update-index", "--add", "--cacheinfo", &info]);
    e.repo.git(&["commit", "-q", "-m", "add submodule"]);
}

fn expand(text: &str, canary: &Path) -> String {
    let name = canary
        .file_name()
        .expect("canary has a name")
        .to_string_lossy();
    text.replace("{canary_name}", &name)
        .replace("{canary}", &canary.display().to_string())
}

/// Keys whose entries differ between two snapshots, for a readable failure.
fn changed(
    before: &BTreeMap<String, (u32, Vec<u8>)>,
    after: &BTreeMap<String, (u32, Vec<u8>)>,
) -> Vec<String> {
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .cloned()
        .collect()
}

/// Characters that must never reach a terminal raw in an error message.
fn is_unsafe_in_message(c: char) -> bool {
    (c.is_control() && c != '\n')
        || matches!(c, '\u{061C}' | '\u{200E}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Check one refusal; `Err` explains what was wrong.
fn check_refusal(
    c: &Case,
    result: Result<spark_proto::methods::EditResult, ClientError>,
    names: Option<&str>,
) -> Result<(), String> {
    let e = match result {
        Ok(r) => return Err(format!("ACCEPTED (edit {:?}), diff:\n{}", r.edit, r.diff)),
        Err(ClientError::Rpc(e)) => e,
        Err(other) => return Err(format!("failed outside JSON-RPC: {other}")),
    };
    let mut problems = Vec::new();
    if e.error_code() != Some(c.code) {
        problems.push(format!(
            "code {} ({:?}), want {:?}",
            e.code,
            e.error_code(),
            c.code
        ));
    }
    if e.kind() != Some(c.kind) {
        problems.push(format!("kind {:?}, want {:?}", e.kind(), c.kind));
    }
    if let Some(names) = names
        && !e.message.contains(names)
    {
        problems.push(format!("message does not name {names:?}"));
    }
    if c.kind.starts_with("path_") && e.data.as_ref().and_then(|d| d.path.as_ref()).is_none() {
        problems.push("no `data.path`".to_owned());
    }
    if e.message.chars().any(is_unsafe_in_message) {
        problems.push("message holds a raw control or bidi character".to_owned());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}; error was {:?}: {}",
            problems.join("; "),
            e.kind(),
            e.message
        ))
    }
}

fn run_case(client: &mut Client, c: &Case) -> Result<(), String> {
    let repo = TestRepo::with_files(BASE_FILES);
    let canary_dir = tempfile::Builder::new()
        .prefix("canary")
        .tempdir_in(repo.path().parent().expect("repo has a parent"))
        .expect("canary dir");
    let canary = canary_dir.path();
    std::fs::write(canary.join("victim.txt"), "canary\n").expect("write canary victim");
    (c.setup)(&Env {
        repo: &repo,
        canary,
    });
    let patch = expand(&c.patch, canary);
    let names = c.names.map(|n| expand(n, canary));
    let worktree_before = snapshot(repo.path());
    let canary_before = snapshot(canary);

    let mut problems = Vec::new();
    for dry_run in [true, false] {
        let params = ApplyParams {
            cwd: repo.path().join(c.cwd).display().to_string(),
            patch: patch.clone(),
            dry_run,
            source: None,
            message: None,
        };
        let result = client.call::<EditApply>(&params);
        if let Err(why) = check_refusal(c, result, names.as_deref()) {
            problems.push(format!(
                "{}: {why}",
                if dry_run { "dry run" } else { "apply" }
            ));
        }
    }
    let worktree = changed(&worktree_before, &snapshot(repo.path()));
    if !worktree.is_empty() {
        problems.push(format!("worktree changed: {worktree:?}"));
    }
    let outside = changed(&canary_before, &snapshot(canary));
    if !outside.is_empty() {
        problems.push(format!(
            "canary outside the repository changed: {outside:?}"
        ));
    }
    if Path::new(ETC_PROBE).exists() {
        problems.push(format!("{ETC_PROBE} was created"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n    "))
    }
}

#[test]
fn hostile_patches_are_refused_with_their_code_and_change_nothing() {
    let cases = cases();
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        assert!(names.insert(c.name), "duplicate case name {}", c.name);
    }
    assert!(
        cases.len() >= 30,
        "the corpus shrank to {} cases",
        cases.len()
    );

    let d = InProcess::start();
    let mut client = d.client();
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            run_case(&mut client, c)
                .err()
                .map(|why| format!("case `{}`:\n    {why}", c.name))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} hostile cases misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The harness can see a write: a valid patch on the same fixture lands and shows up in the
/// snapshot, so the refusals above are refusals and not a blind spot.
#[test]
fn hostile_control_a_valid_patch_on_the_fixture_is_applied() {
    let d = InProcess::start();
    let mut client = d.client();
    let repo = TestRepo::with_files(BASE_FILES);
    let before = snapshot(repo.path());
    let params = ApplyParams {
        cwd: repo.cwd(),
        patch: wrap(&format!("{}{}", add_op("ok.txt"), valid_update_op())),
        dry_run: false,
        source: None,
        message: None,
    };
    let r = client
        .call::<EditApply>(&params)
        .expect("a valid patch applies");
    assert!(r.edit.is_some(), "{r:?}");
    assert_eq!(repo.read("ok.txt"), b"pwned\n");
    assert_eq!(repo.read("src/lib.rs"), b"fn alpha_v2() {}\nfn beta() {}\n");
    let after = snapshot(repo.path());
    let diff = changed(&before, &after);
    assert!(
        diff.contains(&"ok.txt".to_owned()) && diff.contains(&"src/lib.rs".to_owned()),
        "{diff:?}"
    );
}
