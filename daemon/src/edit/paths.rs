//! Path safety for edits: every path named by a patch comes from the model (or another tool) and
//! is untrusted, so it is checked here before spark reads or writes anything. The checks come in
//! two steps. [`validate_rel_path`] is pure: it turns a raw string into a normalised [`RelPath`]
//! or refuses it for its spelling alone (absolute, `..`, control characters, `.git` in any
//! spelling git itself guards against). [`check_in`] then looks at the disk and the index
//! without following symlinks: no symlink leaving the worktree, no symlink leaf, no submodule or
//! nested repository, nothing git-ignored or deny-listed, and the target's existence must match
//! the edit's [`Intent`]. Every refusal is a [`PathError`] that names the path, the reason, and a
//! stable [`PathError::code`] for the wire.

use std::error::Error as StdError;
use std::fmt::{self, Write as _};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::tracked::{Tracked, TrackedCache};

/// Files spark never reads, sends or writes (ARCHITECTURE.md, "Invariants"), matched case-insensitively. A pattern is
/// a basename (`.npmrc`), a basename with one leading or trailing `*` (`*.pem`, `id_rsa*`), or a
/// directory name ending in `/` that matches any component of the path (`.ssh/`).
pub(crate) const SECRET_PATTERNS: &[&str] = &[
    // dotenv files and direnv's `.envrc` hold exported credentials.
    ".env",
    ".env.*",
    ".envrc",
    // Private keys and certificate bundles.
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    // SSH keys; the `*` also takes `.pub` halves, which cost nothing to leave alone.
    "id_rsa*",
    "id_ed25519*",
    "id_ecdsa*",
    "id_dsa*",
    // Registry and HTTP credentials.
    ".npmrc",
    ".pypirc",
    ".netrc",
    ".git-credentials",
    ".htpasswd",
    // Whole credential directories.
    ".aws/",
    ".ssh/",
    ".gnupg/",
];

/// Longest stretch of a refused path quoted in an error: the model can send megabytes, and the
/// message is one line on a terminal.
const MAX_SHOWN_CHARS: usize = 200;

/// A repository-relative path that passed [`validate_rel_path`]: non-empty, `/`-separated,
/// without `.`, `..` or empty components, and with nothing git or spark refuses to touch by name.
/// Only validation constructs one, so holding a `RelPath` is proof the spelling was checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RelPath(String);

impl RelPath {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The path for joining onto a worktree; `/` is a separator on every platform spark runs on.
    pub(crate) fn to_path(&self) -> PathBuf {
        PathBuf::from(&self.0)
    }

    fn components(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }

    fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an edit means to do with its target; it decides whether the target must exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Intent {
    Create,
    Modify,
    Delete,
}

/// Why a path was refused. Each kind has a stable [`code`](PathErrorKind::code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathErrorKind {
    /// `empty`: nothing left once `.` components and doubled slashes are dropped.
    Empty,
    /// `absolute`: a leading `/`, a Windows drive (`C:`) or a UNC prefix (`\\server`).
    Absolute,
    /// `backslash`: a `\` anywhere, which Windows would read as a separator.
    Backslash,
    /// `control_character`: NUL, C0/C1 controls, DEL, or Unicode bidi/line-separator characters.
    ControlCharacter,
    /// `parent_dir`: a `..` component.
    ParentDir,
    /// `trailing_slash`: the path names a directory, not a file.
    TrailingSlash,
    /// `git_dir`: a component is `.git` in some spelling (case, NTFS, HFS+, 8.3 short name).
    GitDir,
    /// `colon`: a component holds `:` (an NTFS alternate data stream or drive-relative name).
    Colon,
    /// `secret`: the path is on [`SECRET_PATTERNS`].
    Secret,
    /// `symlink_escape`: a symlinked directory on the way leads outside the worktree, into the
    /// git directory, or nowhere.
    SymlinkEscape,
    /// `symlink_target`: the target itself is a symlink.
    SymlinkTarget,
    /// `not_a_directory`: a component that must be a directory is something else.
    NotADirectory,
    /// `submodule`: the path is in (or is) a submodule or a nested git repository.
    Submodule,
    /// `ignored`: git ignores the path and does not track it.
    Ignored,
    /// `sparse_checkout`: the path is outside the worktree's sparse checkout (skip-worktree in
    /// the index, or a new path the sparse-checkout patterns leave out).
    SparseCheckout,
    /// `already_exists`: a create would overwrite an existing path.
    AlreadyExists,
    /// `not_found`: a modify or delete names a path that does not exist.
    NotFound,
    /// `is_directory`: the target is a directory.
    IsDirectory,
    /// `special_file`: the target is a fifo, socket or device, never a regular file.
    SpecialFile,
    /// `io`: the filesystem could not answer; the error's source says why.
    Io,
    /// `git`: libgit2 could not answer (index, ignore rules); the error's source says why.
    Git,
}

impl PathErrorKind {
    /// The stable snake_case code for the wire. No `_` arm: a new kind must choose its code.
    pub(crate) fn code(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Absolute => "absolute",
            Self::Backslash => "backslash",
            Self::ControlCharacter => "control_character",
            Self::ParentDir => "parent_dir",
            Self::TrailingSlash => "trailing_slash",
            Self::GitDir => "git_dir",
            Self::Colon => "colon",
            Self::Secret => "secret",
            Self::SymlinkEscape => "symlink_escape",
            Self::SymlinkTarget => "symlink_target",
            Self::NotADirectory => "not_a_directory",
            Self::Submodule => "submodule",
            Self::Ignored => "ignored",
            Self::SparseCheckout => "sparse_checkout",
            Self::AlreadyExists => "already_exists",
            Self::NotFound => "not_found",
            Self::IsDirectory => "is_directory",
            Self::SpecialFile => "special_file",
            Self::Io => "io",
            Self::Git => "git",
        }
    }

    /// The reason as it reads after "refusing path `…`: ".
    fn reason(self) -> &'static str {
        match self {
            Self::Empty => "it is empty",
            Self::Absolute => "it is absolute (a root, drive or UNC prefix), not worktree-relative",
            Self::Backslash => "it contains a backslash (paths use '/')",
            Self::ControlCharacter => {
                "it contains a control, bidirectional or line-separator character"
            }
            // Also from a subdirectory, where `../x` would stay inside the tree: say what is true.
            Self::ParentDir => "it contains a `..` component, which spark never follows",
            Self::TrailingSlash => "it ends with '/' and so names a directory, not a file",
            Self::GitDir => "it names a .git directory (in a spelling git guards against)",
            Self::Colon => "it contains ':' (an NTFS alternate data stream)",
            Self::Secret => "it is on spark's deny-list of secret files",
            Self::SymlinkEscape => {
                "it goes through a symlinked directory that leads outside the worktree"
            }
            Self::SymlinkTarget => "it is a symlink (writing would replace it or write through it)",
            Self::NotADirectory => "a component of it is not a directory",
            Self::Submodule => "it is inside a submodule or nested git repository",
            Self::Ignored => "git ignores it",
            Self::SparseCheckout => "it is outside this worktree's sparse checkout",
            Self::AlreadyExists => "it already exists",
            Self::NotFound => "it does not exist",
            Self::IsDirectory => "it is a directory",
            Self::SpecialFile => "it is not a regular file (a fifo, socket or device)",
            Self::Io => "the filesystem could not be inspected",
            Self::Git => "git could not answer about it",
        }
    }

    /// What the user can do about it: one line, printed by `sparkctl` as `hint: …`.
    pub(crate) fn hint(self) -> &'static str {
        match self {
            Self::Empty | Self::TrailingSlash => "name a file, relative to the current directory",
            Self::Absolute | Self::ParentDir => {
                "name the file relative to the current directory without `..`, or run from a directory above it"
            }
            Self::Backslash => "separate path components with '/'",
            Self::ControlCharacter | Self::Colon => "rename the file, or edit it yourself",
            Self::GitDir => "spark never edits git's own files",
            Self::Secret => "spark never reads or writes secret files; edit it yourself",
            Self::SymlinkEscape => {
                "edit the file where the symlink leads, from inside that repository"
            }
            Self::SymlinkTarget => "name the file the symlink points to",
            Self::NotADirectory | Self::IsDirectory | Self::SpecialFile => {
                "name a regular file; `git status` shows what is there"
            }
            Self::Submodule => "run spark inside the submodule or nested repository instead",
            Self::Ignored => {
                "spark only edits files git would track; check `git check-ignore -v <path>`"
            }
            Self::SparseCheckout => {
                "`git sparse-checkout add <dir>` brings it into the checkout first"
            }
            Self::AlreadyExists => "update the existing file instead of adding it",
            Self::NotFound => "add the file instead, or check the path from the current directory",
            Self::Io | Self::Git => "see the daemon log for details",
        }
    }
}

/// A refused path: which one, why, and for `io`/`git` the underlying error.
#[derive(Debug)]
pub(crate) struct PathError {
    kind: PathErrorKind,
    path: String,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl PathError {
    fn new(kind: PathErrorKind, path: &str) -> Self {
        Self {
            kind,
            path: path.to_owned(),
            source: None,
        }
    }

    fn io(path: &str, error: io::Error) -> Self {
        Self {
            source: Some(Box::new(error)),
            ..Self::new(PathErrorKind::Io, path)
        }
    }

    fn git(path: &str, error: git2::Error) -> Self {
        Self {
            source: Some(Box::new(error)),
            ..Self::new(PathErrorKind::Git, path)
        }
    }

    #[allow(dead_code)] // for callers that branch on the reason; the wire uses `code()`
    pub(crate) fn kind(&self) -> PathErrorKind {
        self.kind
    }

    /// The path exactly as it was given (unescaped); `Display` shows an escaped, capped copy.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    pub(crate) fn code(&self) -> &'static str {
        self.kind.code()
    }

    pub(crate) fn hint(&self) -> &'static str {
        self.kind.hint()
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refusing path `{}`: {}",
            Shown(&self.path),
            self.kind.reason()
        )?;
        // The house style puts the cause on the same line, so one line on stderr is enough.
        match &self.source {
            Some(source) => write!(f, ": {source}"),
            None => Ok(()),
        }
    }
}

impl StdError for PathError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}

/// A path quoted in a message: the model chose it, so invisible and control characters are
/// escaped (a raw ESC or bidi override would repaint the user's terminal) and length is capped.
struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (count, c) in self.0.chars().enumerate() {
            if count == MAX_SHOWN_CHARS {
                return f.write_char('…');
            }
            if is_forbidden_char(c) || is_hfs_ignorable(c) {
                write!(f, "\\u{{{:x}}}", u32::from(c))?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// Checks the spelling of a raw, untrusted path and normalises it (`.` components and doubled
/// slashes dropped). Pure: no I/O, so it is safe on any input and cheap enough to run on every
/// path of a streaming patch.
pub(crate) fn validate_rel_path(raw: &str) -> Result<RelPath, PathError> {
    use PathErrorKind as K;
    let refuse = |kind| Err(PathError::new(kind, raw));

    if raw.is_empty() {
        return refuse(K::Empty);
    }
    // Before anything else, so no later message has to quote such a character raw.
    if raw.chars().any(is_forbidden_char) {
        return refuse(K::ControlCharacter);
    }
    // `C:\x` and `\\server\share` hold backslashes too; name the more telling reason.
    if raw.starts_with('/') || raw.starts_with("\\\\") || has_drive_prefix(raw) {
        return refuse(K::Absolute);
    }
    if raw.contains('\\') {
        return refuse(K::Backslash);
    }
    if raw.ends_with('/') {
        return refuse(K::TrailingSlash);
    }

    let mut kept = Vec::new();
    for component in raw.split('/') {
        match component {
            "" | "." => {}
            // Refused, not resolved: `a/../b` is either a mistake or a probe, and resolving it
            // lexically would be wrong once `a` is a symlink.
            ".." => return refuse(K::ParentDir),
            _ if is_dotgit(component) => return refuse(K::GitDir),
            _ if component.contains(':') => return refuse(K::Colon),
            _ => kept.push(component),
        }
    }
    if kept.is_empty() {
        return refuse(K::Empty);
    }
    Ok(RelPath(kept.join("/")))
}

/// Whether `rel` is on spark's deny-list ([`SECRET_PATTERNS`]).
pub(crate) fn is_secret(rel: &RelPath) -> bool {
    let components: Vec<String> = rel.components().map(fold_name).collect();
    let name = fold_name(rel.file_name());
    SECRET_PATTERNS.iter().any(|pattern| {
        if let Some(dir) = pattern.strip_suffix('/') {
            components.iter().any(|component| component == dir)
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            name.ends_with(suffix)
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            name.starts_with(prefix)
        } else {
            name == *pattern
        }
    })
}

/// A name as a case-insensitive filesystem sees it: HFS+ drops ignorable code points, APFS and
/// NTFS fold case (Unicode folding, so `\u{212A}` matches `k`), NTFS drops trailing dots and
/// spaces. Matching the folded form keeps `.ENV` or `id_rsa\u{200C}` from slipping through.
fn fold_name(name: &str) -> String {
    let visible: String = name.chars().filter(|&c| !is_hfs_ignorable(c)).collect();
    visible.trim_end_matches(['.', ' ']).to_lowercase()
}

/// [`check_in`] without an actor's cache of the tracked paths: reads the index file each call.
#[cfg(test)]
pub(crate) fn check_target(
    workdir: &Path,
    repo: &git2::Repository,
    rel: &RelPath,
    intent: Intent,
) -> Result<PathBuf, PathError> {
    Targets::new(workdir, repo).check(rel, intent)
}

/// Checks `rel` (already validated) against the worktree and the index, and returns the absolute
/// path to read or write: `workdir.join(rel)`.
///
/// Symlinks are never followed blindly: each existing component is `lstat`ed; a symlinked
/// directory is allowed only if it resolves inside the worktree and outside the git directory,
/// and the name checks (secret, submodule, ignored) run on both the path as written and the path
/// it really reaches, so a link cannot launder `.aws/credentials` or an ignored directory.
/// This narrows but cannot close the race with a concurrent writer; the writer must still open
/// files without following a final symlink.
pub(crate) fn check_in(
    ctx: &super::RepoCtx<'_>,
    rel: &RelPath,
    intent: Intent,
) -> Result<PathBuf, PathError> {
    Targets::of(ctx).check(rel, intent)
}

/// [`check_in`] for the several paths of one request: the canonical worktree and git
/// directory and the index's tracked paths are looked up once, at the first check.
pub(crate) struct Targets<'r> {
    workdir: &'r Path,
    repo: &'r git2::Repository,
    /// Where the tracked paths are kept between requests; without it, each `Targets` reads
    /// the index file.
    cache: Option<&'r TrackedCache>,
    looked_up: Option<(PathBuf, PathBuf, Rc<Tracked>)>,
}

impl<'r> Targets<'r> {
    pub(crate) fn new(workdir: &'r Path, repo: &'r git2::Repository) -> Self {
        Targets {
            workdir,
            repo,
            cache: None,
            looked_up: None,
        }
    }

    /// Checks on `ctx`'s repository, reading the index only if it changed since the actor's
    /// last request.
    pub(crate) fn of(ctx: &'r super::RepoCtx<'r>) -> Self {
        Targets {
            cache: Some(ctx.tracked),
            ..Targets::new(ctx.workdir, ctx.repo)
        }
    }

    /// See [`check_in`].
    pub(crate) fn check(&mut self, rel: &RelPath, intent: Intent) -> Result<PathBuf, PathError> {
        self.check_real(rel, intent)
            .map(|_| self.workdir.join(rel.to_path()))
    }

    /// [`check_in`], returning the path the write really lands on: `rel` with every
    /// symlinked directory on the way resolved (`alias/f.txt` is `real/f.txt` when
    /// `alias -> real`). git tracks `alias` as a link and `real/f.txt` as the file, so an edit is
    /// written and recorded under the real path; recording it under the link's spelling would put
    /// a file beneath what the tree holds as a symlink.
    pub(crate) fn check_real(
        &mut self,
        rel: &RelPath,
        intent: Intent,
    ) -> Result<RelPath, PathError> {
        // First and without I/O: a deny-listed name is refused alike whether or not it exists,
        // so the answer reveals nothing about the user's secrets.
        if is_secret(rel) {
            return Err(PathError::new(PathErrorKind::Secret, rel.as_str()));
        }
        let (workdir, repo) = (self.workdir, self.repo);
        let (root, git_dir, tracked) = match &mut self.looked_up {
            Some(l) => l,
            slot => {
                let path = rel.as_str();
                let root = fs::canonicalize(workdir).map_err(|e| PathError::io(path, e))?;
                let git_dir = fs::canonicalize(repo.path()).map_err(|e| PathError::io(path, e))?;
                // The user's index as it is now (`git add` may have run since), read, never
                // written.
                let tracked = match self.cache {
                    Some(cache) => cache.get(repo),
                    None => TrackedCache::default().get(repo),
                }
                .map_err(|e| PathError::git(path, e))?;
                slot.insert((root, git_dir, tracked))
            }
        };
        check_one(workdir, repo, root, git_dir, tracked, rel, intent)
    }
}

fn check_one(
    workdir: &Path,
    repo: &git2::Repository,
    root: &Path,
    git_dir: &Path,
    index: &Tracked,
    rel: &RelPath,
    intent: Intent,
) -> Result<RelPath, PathError> {
    use PathErrorKind as K;
    let path = rel.as_str();
    let refuse = |kind| PathError::new(kind, path);

    let components: Vec<&str> = rel.components().collect();
    let leaf_at = components.len().saturating_sub(1);
    let mut on_disk = workdir.to_path_buf();
    let mut present = 0;
    let mut leaf: Option<fs::Metadata> = None;
    for (at, component) in components.iter().enumerate() {
        on_disk.push(component);
        let meta = match fs::symlink_metadata(&on_disk) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            // Only a race can get here (the parent was a directory a moment ago).
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                return Err(refuse(K::NotADirectory));
            }
            Err(e) => return Err(PathError::io(path, e)),
        };
        present = at + 1;
        let file_type = meta.file_type();
        if at == leaf_at {
            if file_type.is_symlink() {
                return Err(refuse(K::SymlinkTarget));
            }
            leaf = Some(meta);
        } else if file_type.is_symlink() {
            match fs::canonicalize(&on_disk) {
                Ok(target) if target.starts_with(root) && !target.starts_with(git_dir) => {
                    if !target.is_dir() {
                        return Err(refuse(K::NotADirectory));
                    }
                }
                // Outside, into `.git`, dangling or looping (ELOOP): a symlinked directory that
                // resolves nowhere inside the tree could land a write anywhere.
                Ok(_) | Err(_) => return Err(refuse(K::SymlinkEscape)),
            }
        } else if !file_type.is_dir() {
            return Err(refuse(K::NotADirectory));
        }
    }

    let resolved = resolve(workdir, root, path, &components, present.min(leaf_at))?;
    // The same path reached through symlinks: checked too, so that a link cannot launder a name.
    let real = (resolved.rel != *rel).then_some(&resolved.rel);
    if real.is_some_and(is_secret) {
        return Err(refuse(K::Secret));
    }

    for candidate in [Some(rel), real].into_iter().flatten() {
        if has_gitlink(index, candidate) {
            return Err(refuse(K::Submodule));
        }
    }
    // Nested repositories are found on disk along the real path, whose existing part is free of
    // symlinks, so `vendor/lib/x` and `link-to-lib/x` are both caught. A directory leaf counts.
    let leaf_is_dir = leaf.as_ref().is_some_and(fs::Metadata::is_dir);
    let real_components: Vec<&str> = resolved.rel.components().collect();
    let probes = resolved.existing_dirs + usize::from(leaf_is_dir);
    let mut probe = root.to_path_buf();
    for component in real_components.iter().take(probes) {
        probe.push(component);
        match fs::symlink_metadata(probe.join(".git")) {
            // A `.git` file counts too: that is how submodules and worktrees point at their git dir.
            Ok(_) => return Err(refuse(K::Submodule)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(PathError::io(path, e)),
        }
    }
    for candidate in [Some(rel), real].into_iter().flatten() {
        if is_ignored(repo, index, candidate).map_err(|e| PathError::git(path, e))? {
            return Err(refuse(K::Ignored));
        }
    }

    for candidate in [Some(rel), real].into_iter().flatten() {
        if outside_sparse_checkout(repo, index, candidate, leaf.is_some())
            .map_err(|e| PathError::git(path, e))?
        {
            return Err(refuse(K::SparseCheckout));
        }
    }

    match (leaf, intent) {
        (Some(meta), _) if meta.is_dir() => Err(refuse(K::IsDirectory)),
        (Some(meta), _) if !meta.is_file() => Err(refuse(K::SpecialFile)),
        (Some(_), Intent::Create) => Err(refuse(K::AlreadyExists)),
        (None, Intent::Modify | Intent::Delete) => Err(refuse(K::NotFound)),
        (Some(_), Intent::Modify | Intent::Delete) | (None, Intent::Create) => Ok(resolved.rel),
    }
}

/// Whether `core.sparseCheckout` is on for this worktree. `git sparse-checkout` writes it to the
/// per-worktree `config.worktree` (with `extensions.worktreeConfig`), which is read first.
fn sparse_checkout_on(repo: &git2::Repository) -> Result<bool, git2::Error> {
    let per_worktree = repo.path().join("config.worktree");
    if per_worktree.is_file()
        && let Ok(on) = git2::Config::open(&per_worktree)?.get_bool("core.sparseCheckout")
    {
        return Ok(on);
    }
    Ok(repo
        .config()?
        .get_bool("core.sparseCheckout")
        .unwrap_or(false))
}

/// Whether `rel` lies outside the worktree's sparse checkout. A tracked path is outside when
/// its index entry has the skip-worktree bit (whatever the patterns say: that bit is what git
/// acts on). An untracked path that does not exist is outside when `core.sparseCheckout` is on
/// and the `info/sparse-checkout` patterns leave it out: git would not check it out, and a file
/// created there conflicts with the next `git sparse-checkout reapply` or checkout. Cone-mode
/// patterns are a subset of the full pattern syntax with the same meaning, so one matcher (the
/// gitignore rules, where a match means "included") serves both modes.
fn outside_sparse_checkout(
    repo: &git2::Repository,
    index: &Tracked,
    rel: &RelPath,
    exists: bool,
) -> Result<bool, git2::Error> {
    if let Some(entry) = index.get(rel.as_str()) {
        return Ok(entry.skip_worktree);
    }
    if exists {
        // An untracked file the user has on disk anyway: git leaves such files alone.
        return Ok(false);
    }
    if !sparse_checkout_on(repo)? {
        return Ok(false);
    }
    let patterns = match fs::read_to_string(repo.path().join("info/sparse-checkout")) {
        Ok(text) => text,
        // Sparse checkout on without a pattern file: git checks out nothing but the root.
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(git2::Error::from_str(&format!(
                "cannot read info/sparse-checkout: {e}"
            )));
        }
    };
    let mut builder = ignore::gitignore::GitignoreBuilder::new("");
    for line in patterns.lines() {
        builder
            .add_line(None, line)
            .map_err(|e| git2::Error::from_str(&format!("info/sparse-checkout: {e}")))?;
    }
    let matcher = builder
        .build()
        .map_err(|e| git2::Error::from_str(&format!("info/sparse-checkout: {e}")))?;
    Ok(!matcher
        .matched_path_or_any_parents(rel.as_str(), false)
        .is_ignore())
}

/// Where a path really lands: its deepest existing directory, canonicalised, plus the rest.
#[derive(Debug)]
struct Resolved {
    rel: RelPath,
    /// How many leading components of `rel` are existing directories (the canonical part).
    existing_dirs: usize,
}

/// Resolves `components` against the worktree, given that the first `dir_count` of them exist
/// and are directories or symlinks to directories inside it.
fn resolve(
    workdir: &Path,
    root: &Path,
    path: &str,
    components: &[&str],
    dir_count: usize,
) -> Result<Resolved, PathError> {
    let escape = || PathError::new(PathErrorKind::SymlinkEscape, path);
    let (dirs, rest) = components.split_at(dir_count.min(components.len()));
    let mut anchor = workdir.to_path_buf();
    anchor.extend(dirs);
    let anchor = fs::canonicalize(&anchor).map_err(|e| PathError::io(path, e))?;
    // Each symlink was checked on the way, but one may have changed since: check the sum.
    let inside = anchor.strip_prefix(root).map_err(|_| escape())?;
    let mut real: Vec<&str> = Vec::with_capacity(components.len());
    for component in inside.components() {
        // Not UTF-8, or not a plain name: nothing validation would have let through itself.
        match component {
            std::path::Component::Normal(name) => real.push(name.to_str().ok_or_else(escape)?),
            _ => return Err(escape()),
        }
    }
    let existing_dirs = real.len();
    real.extend(rest);
    // A link into a nested repository's `.git` resolves inside the worktree; validation of the
    // real spelling is what catches it.
    let rel = validate_rel_path(&real.join("/")).map_err(|_| escape())?;
    Ok(Resolved { rel, existing_dirs })
}

/// Whether the index holds a gitlink (a submodule) at `rel` or at any directory above it.
fn has_gitlink(index: &Tracked, rel: &RelPath) -> bool {
    let full = rel.as_str();
    full.match_indices('/')
        .map(|(at, _)| &full[..at])
        .chain([full])
        .any(|prefix| index.is_gitlink(prefix))
}

/// Whether git ignores `rel`. A tracked file is never ignored, whatever `.gitignore` says (that
/// is git's own rule), so only an untracked path can be refused for this.
fn is_ignored(
    repo: &git2::Repository,
    index: &Tracked,
    rel: &RelPath,
) -> Result<bool, git2::Error> {
    if index.get(rel.as_str()).is_some() {
        return Ok(false);
    }
    // libgit2 also walks the parent directories, so `build/` ignores `build/new.rs`.
    repo.is_path_ignored(rel.as_str())
}

/// NUL and every other C0/C1 control (`char::is_control` includes DEL), plus the Unicode
/// characters that reorder or break displayed text ("Trojan Source"): a path that renders as
/// something else in a diff or a terminal is refused rather than shown.
fn is_forbidden_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}' // ARABIC LETTER MARK
                | '\u{200E}'..='\u{200F}' // LEFT-TO-RIGHT / RIGHT-TO-LEFT MARK
                | '\u{2028}'..='\u{2029}' // LINE / PARAGRAPH SEPARATOR
                | '\u{202A}'..='\u{202E}' // embeddings and overrides
                | '\u{2066}'..='\u{2069}' // isolates
        )
}

/// Code points HFS+ drops when comparing names (git's `next_hfs_char` in utf8.c), so
/// `.g\u{200C}it` is `.git` on a Mac.
fn is_hfs_ignorable(c: char) -> bool {
    matches!(
        c,
        '\u{200C}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{206A}'..='\u{206F}' | '\u{FEFF}'
    )
}

/// `X:` at the start: a Windows drive, absolute (`C:\x`) or drive-relative (`C:x`).
fn has_drive_prefix(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':'
}

/// Whether one component would name the repository's `.git` on some filesystem, after git's
/// `is_hfs_dotgit` (utf8.c) and `is_ntfs_dotgit` (path.c): ASCII case folded; HFS+-ignorable
/// code points dropped anywhere; NTFS trailing dots and spaces dropped and an alternate stream
/// (`:…`) cut off; NTFS 8.3 short names `GIT~N` and the hashed `GI7EBx~N` form refused.
fn is_dotgit(component: &str) -> bool {
    let visible: String = component
        .chars()
        .filter(|&c| !is_hfs_ignorable(c))
        .collect();
    let stem = match visible.split_once(':') {
        Some((before, _stream)) => before,
        None => &visible,
    };
    let stem = stem.trim_end_matches(['.', ' ']).to_ascii_lowercase();
    if stem == ".git" {
        return true;
    }
    // Git only needs `git~1` (`.git` is the first dot-name created in a fresh clone); any
    // number costs nothing and covers a tree where other `git*` names came first.
    if let Some(number) = stem.strip_prefix("git~") {
        return is_number(number);
    }
    // When the four plain short names are taken NTFS falls back to a hashed name; git guards
    // `GI7EBA~N` (the hash for `.gitmodules`). Nothing legitimate is spelt like this.
    if let Some(rest) = stem.strip_prefix("gi7eb") {
        let mut chars = rest.chars();
        return chars.next().is_some_and(|c| c.is_ascii_hexdigit())
            && chars.next() == Some('~')
            && is_number(chars.as_str());
    }
    false
}

fn is_number(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::super::tracked::{GITLINK_MODE, SKIP_WORKTREE};
    use super::*;
    use std::collections::HashSet;
    use tempfile::TempDir;

    const ALL_KINDS: &[PathErrorKind] = &[
        PathErrorKind::Empty,
        PathErrorKind::Absolute,
        PathErrorKind::Backslash,
        PathErrorKind::ControlCharacter,
        PathErrorKind::ParentDir,
        PathErrorKind::TrailingSlash,
        PathErrorKind::GitDir,
        PathErrorKind::Colon,
        PathErrorKind::Secret,
        PathErrorKind::SymlinkEscape,
        PathErrorKind::SymlinkTarget,
        PathErrorKind::NotADirectory,
        PathErrorKind::Submodule,
        PathErrorKind::Ignored,
        PathErrorKind::SparseCheckout,
        PathErrorKind::AlreadyExists,
        PathErrorKind::NotFound,
        PathErrorKind::IsDirectory,
        PathErrorKind::SpecialFile,
        PathErrorKind::Io,
        PathErrorKind::Git,
    ];

    fn refused(raw: &str) -> &'static str {
        match validate_rel_path(raw) {
            Ok(rel) => panic!("{raw:?} was accepted as {rel:?}"),
            Err(e) => e.code(),
        }
    }

    fn assert_refused(code: &str, raws: &[&str]) {
        for raw in raws {
            assert_eq!(refused(raw), code, "{raw:?}");
        }
    }

    fn rel(raw: &str) -> RelPath {
        validate_rel_path(raw).expect("test path is valid")
    }

    /// A worktree with a fresh repository in it, and a README.md committed to the index.
    struct Tree {
        dir: TempDir,
        repo: git2::Repository,
    }

    impl Tree {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let repo = git2::Repository::init(dir.path()).expect("git init");
            let tree = Self { dir, repo };
            tree.write("README.md", "hello\n");
            tree.track("README.md");
            tree
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        fn write(&self, rel: &str, content: &str) {
            let path = self.root().join(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).expect("mkdir");
            }
            fs::write(path, content).expect("write");
        }

        fn mkdir(&self, rel: &str) {
            fs::create_dir_all(self.root().join(rel)).expect("mkdir");
        }

        fn track(&self, rel: &str) {
            let mut index = self.repo.index().expect("index");
            index.add_path(Path::new(rel)).expect("git add");
            index.write().expect("write index");
        }

        #[cfg(unix)]
        fn symlink(&self, target: impl AsRef<Path>, rel: &str) {
            std::os::unix::fs::symlink(target, self.root().join(rel)).expect("symlink");
        }

        fn check(&self, raw: &str, intent: Intent) -> Result<PathBuf, PathError> {
            check_target(self.root(), &self.repo, &rel(raw), intent)
        }

        fn code(&self, raw: &str, intent: Intent) -> &'static str {
            match self.check(raw, intent) {
                Ok(path) => panic!("{raw:?} ({intent:?}) was allowed: {}", path.display()),
                Err(e) => e.code(),
            }
        }
    }

    // ---- validate_rel_path ----

    #[test]
    fn every_kind_has_its_own_code() {
        let codes: HashSet<&str> = ALL_KINDS.iter().map(|kind| kind.code()).collect();
        assert_eq!(codes.len(), ALL_KINDS.len());
        for code in codes {
            assert!(
                code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code}"
            );
        }
    }

    #[test]
    fn message_names_path_and_reason() {
        let error = validate_rel_path("x/../y").expect_err("refused");
        assert_eq!(
            error.to_string(),
            // `x/../y` would stay inside the tree: the reason says what is true of it.
            "refusing path `x/../y`: it contains a `..` component, which spark never follows"
        );
        assert_eq!(error.path(), "x/../y");
        assert_eq!(error.kind(), PathErrorKind::ParentDir);
    }

    #[test]
    fn message_escapes_control_characters_and_caps_length() {
        let error = validate_rel_path("a\u{1b}[2Jb\u{202e}").expect_err("refused");
        let shown = error.to_string();
        assert!(shown.contains("a\\u{1b}[2Jb\\u{202e}"), "{shown}");
        assert!(!shown.contains('\u{1b}') && !shown.contains('\u{202e}'));

        let long = format!("{}\u{0}", "a/".repeat(5000));
        let shown = validate_rel_path(&long).expect_err("refused").to_string();
        assert!(shown.len() < 400, "{} bytes", shown.len());
        assert!(shown.contains('…'));
    }

    #[test]
    fn empty_paths_are_refused() {
        assert_refused("empty", &["", ".", "./.", ".//."]);
    }

    #[test]
    fn absolute_drive_and_unc_paths_are_refused() {
        assert_refused(
            "absolute",
            &[
                "/etc/passwd",
                "/",
                "//server/share/x",
                "C:x",
                "C:\\x",
                "c:/x",
                "\\\\server\\share\\x",
                "\\\\?\\C:\\x",
            ],
        );
    }

    #[test]
    fn backslashes_are_refused() {
        assert_refused(
            "backslash",
            &["src\\main.rs", "a\\..\\b", "trailing\\", "\\x"],
        );
    }

    #[test]
    fn control_and_bidi_characters_are_refused() {
        assert_refused(
            "control_character",
            &[
                "a\0b",
                "a\nb",
                "a\rb",
                "a\tb",
                "a\u{7f}b",
                "a\u{85}b",
                "\u{1b}[31mred",
                "a\u{202a}b",
                "a\u{202e}b",
                "a\u{2066}b",
                "a\u{2069}b",
                "a\u{200e}b",
                "a\u{2028}b",
            ],
        );
    }

    #[test]
    fn parent_components_are_refused_not_normalised() {
        assert_refused(
            "parent_dir",
            &["..", "../x", "x/../y", "x/..", "a/b/../../c", "./.."],
        );
    }

    #[test]
    fn trailing_slash_is_refused() {
        assert_refused("trailing_slash", &["src/", "src//", "./", "a/b/./"]);
    }

    #[test]
    fn dots_and_doubled_slashes_are_normalised() {
        assert_eq!(rel("./src//main.rs").as_str(), "src/main.rs");
        assert_eq!(rel("a/./b/.//c.rs").as_str(), "a/b/c.rs");
        assert_eq!(
            rel("src/main.rs").to_path(),
            PathBuf::from("src").join("main.rs")
        );
        assert_eq!(rel("é/ü ñ.rs").to_string(), "é/ü ñ.rs");
    }

    #[test]
    fn dotgit_in_any_case_or_position_is_refused() {
        assert_refused(
            "git_dir",
            &[
                ".git",
                ".git/config",
                "sub/.git/hooks/pre-commit",
                ".GIT",
                ".Git/HEAD",
                "a/.gIt",
            ],
        );
    }

    #[test]
    fn dotgit_with_ntfs_trailing_dots_and_spaces_is_refused() {
        assert_refused(
            "git_dir",
            &[".git.", ".git ", ".GIT..", ".git. . ", ".git./config"],
        );
    }

    #[test]
    fn dotgit_with_hfs_ignorable_code_points_is_refused() {
        assert_refused(
            "git_dir",
            &[
                "\u{200c}.git",
                ".g\u{200d}it",
                ".gi\u{feff}t",
                ".git\u{206a}",
                ".\u{206f}GIT/config",
                ".g\u{200c}i\u{200d}t\u{feff}",
            ],
        );
        // Ignorable and bidi at once: refused for the bidi character first.
        for raw in [
            ".g\u{202a}it",
            ".git\u{200e}",
            ".git\u{200f}",
            ".\u{202e}git",
        ] {
            assert!(validate_rel_path(raw).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn dotgit_ntfs_short_names_are_refused() {
        assert_refused(
            "git_dir",
            &[
                "git~1",
                "GIT~1",
                "Git~2/config",
                "git~12",
                "git~1.",
                "gi7eba~1",
                "GI7EBF~9",
                "gi7eb0~1",
            ],
        );
    }

    #[test]
    fn dotgit_ntfs_alternate_streams_are_refused() {
        assert_refused(
            "git_dir",
            &[
                ".git::$INDEX_ALLOCATION",
                ".git::$INDEX_ALLOCATION/config",
                ".GIT:x",
                "git~1:s",
            ],
        );
    }

    #[test]
    fn colons_are_refused() {
        assert_refused("colon", &["ab:c", "src/file.rs:stream", "x/::$DATA"]);
    }

    #[test]
    fn git_files_and_lookalikes_are_allowed() {
        for raw in [
            ".gitignore",
            ".gitattributes",
            ".gitmodules",
            "src/.gitkeep",
            ".github/workflows/ci.yml",
            "git",
            "gitx/y",
            ".git2",
            ".gitx",
            "git~",
            "git~x",
            "gi7ebg~1",
            "xgit~1",
            "..foo",
            "...",
            "a b/c.rs",
        ] {
            assert_eq!(rel(raw).as_str(), raw);
        }
    }

    // ---- is_secret ----

    #[test]
    fn secret_names_are_recognised() {
        for raw in [
            ".env",
            ".env.local",
            "config/.env.production",
            ".ENV",
            ".Env.Local",
            ".envrc",
            "certs/server.pem",
            "tls.KEY",
            "a.p12",
            "b.pfx",
            "id_rsa",
            "id_rsa.pub",
            "home/ID_ED25519",
            "id_ecdsa_sk",
            "id_dsa",
            ".npmrc",
            ".pypirc",
            ".netrc",
            ".git-credentials",
            ".htpasswd",
            ".aws/credentials",
            "x/.ssh/config",
            ".gnupg/pubring.kbx",
            ".AWS/config",
            // Spellings a case-insensitive or HFS+ filesystem would open as the secret.
            "server.\u{212a}ey",
            ".e\u{200c}nv",
            "id_rsa.",
        ] {
            assert!(is_secret(&rel(raw)), "{raw:?} should be secret");
        }
    }

    #[test]
    fn ordinary_names_are_not_secret() {
        for raw in [
            "src/environment.rs",
            "keys.rs",
            "mykey.rs",
            "env.rs",
            "src/env/mod.rs",
            ".environment",
            "pem.rs",
            "key",
            "docs/ssh.md",
            "aws/config.rs",
            "id.rs",
            "README.md",
            "monkey.keys",
        ] {
            assert!(!is_secret(&rel(raw)), "{raw:?} should not be secret");
        }
    }

    #[test]
    fn secret_patterns_are_lowercase_and_well_formed() {
        for pattern in SECRET_PATTERNS {
            assert_eq!(*pattern, pattern.to_lowercase());
            assert!(pattern.matches('*').count() <= 1, "{pattern}");
        }
    }

    // ---- check_target ----

    #[test]
    fn create_of_a_new_file_returns_the_joined_path() {
        let tree = Tree::new();
        tree.mkdir("src");
        let path = tree.check("src/new.rs", Intent::Create).expect("allowed");
        assert_eq!(path, tree.root().join("src/new.rs"));
        // Missing directories are fine: the writer creates them.
        tree.check("a/b/c.rs", Intent::Create).expect("allowed");
    }

    #[test]
    fn modify_and_delete_of_an_existing_file_are_allowed() {
        let tree = Tree::new();
        tree.write("src/lib.rs", "fn main() {}\n");
        for intent in [Intent::Modify, Intent::Delete] {
            assert_eq!(
                tree.check("src/lib.rs", intent).expect("allowed"),
                tree.root().join("src/lib.rs")
            );
            tree.check("README.md", intent).expect("allowed");
        }
    }

    #[test]
    fn a_fresh_repository_without_an_index_is_fine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = git2::Repository::init(dir.path()).expect("git init");
        assert!(!repo.path().join("index").exists());
        check_target(dir.path(), &repo, &rel("src/main.rs"), Intent::Create).expect("allowed");
    }

    #[test]
    fn create_over_an_existing_file_is_refused() {
        let tree = Tree::new();
        tree.write("untracked.rs", "x\n");
        assert_eq!(tree.code("untracked.rs", Intent::Create), "already_exists");
        assert_eq!(tree.code("README.md", Intent::Create), "already_exists");
    }

    #[test]
    fn modify_or_delete_of_a_missing_file_is_refused() {
        let tree = Tree::new();
        assert_eq!(tree.code("missing.rs", Intent::Modify), "not_found");
        assert_eq!(tree.code("no/such/dir.rs", Intent::Delete), "not_found");
    }

    #[test]
    fn a_directory_target_is_refused() {
        let tree = Tree::new();
        tree.mkdir("src");
        for intent in [Intent::Create, Intent::Modify, Intent::Delete] {
            assert_eq!(tree.code("src", intent), "is_directory");
        }
    }

    #[test]
    fn a_file_where_a_directory_is_needed_is_refused() {
        let tree = Tree::new();
        assert_eq!(
            tree.code("README.md/x.rs", Intent::Create),
            "not_a_directory"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_socket_target_is_refused() {
        let tree = Tree::new();
        let _listener =
            std::os::unix::net::UnixListener::bind(tree.root().join("sock")).expect("bind socket");
        assert_eq!(tree.code("sock", Intent::Modify), "special_file");
    }

    #[cfg(unix)]
    #[test]
    fn a_symlinked_directory_leaving_the_tree_is_refused() {
        let tree = Tree::new();
        let outside = tempfile::tempdir().expect("tempdir");
        fs::write(outside.path().join("victim.rs"), "x\n").expect("write");
        tree.symlink(outside.path(), "out");
        assert_eq!(tree.code("out/new.rs", Intent::Create), "symlink_escape");
        assert_eq!(tree.code("out/victim.rs", Intent::Modify), "symlink_escape");
        // Relative links count the same, also when nested.
        tree.mkdir("a");
        tree.symlink("../..", "a/up");
        assert_eq!(tree.code("a/up/x.rs", Intent::Create), "symlink_escape");
    }

    #[cfg(unix)]
    #[test]
    fn a_symlinked_directory_into_dotgit_is_refused() {
        let tree = Tree::new();
        tree.symlink(".git", "g");
        assert_eq!(tree.code("g/config", Intent::Modify), "symlink_escape");
        tree.symlink(".git/hooks", "h");
        assert_eq!(tree.code("h/pre-commit", Intent::Create), "symlink_escape");
    }

    #[cfg(unix)]
    #[test]
    fn a_dangling_symlinked_directory_is_refused() {
        let tree = Tree::new();
        tree.symlink("nowhere", "gone");
        assert_eq!(tree.code("gone/x.rs", Intent::Create), "symlink_escape");
    }

    #[cfg(unix)]
    #[test]
    fn a_symlinked_directory_inside_the_tree_is_allowed() {
        let tree = Tree::new();
        tree.write("src/lib.rs", "x\n");
        tree.symlink("src", "alias");
        assert_eq!(
            tree.check("alias/new.rs", Intent::Create).expect("allowed"),
            tree.root().join("alias/new.rs")
        );
        tree.check("alias/lib.rs", Intent::Modify).expect("allowed");
        // ... but a link to a file used as a directory is still not a directory.
        tree.symlink("README.md", "readme");
        assert_eq!(tree.code("readme/x", Intent::Create), "not_a_directory");
    }

    #[cfg(unix)]
    #[test]
    fn a_path_through_a_symlinked_directory_resolves_to_the_real_path() {
        let tree = Tree::new();
        tree.write("real/sub/f.txt", "x\n");
        tree.symlink("real", "alias");
        let mut targets = Targets::new(tree.root(), &tree.repo);
        let real = |t: &mut Targets<'_>, raw: &str, intent| {
            t.check_real(&rel(raw), intent)
                .expect("allowed")
                .as_str()
                .to_owned()
        };
        assert_eq!(
            real(&mut targets, "alias/sub/f.txt", Intent::Modify),
            "real/sub/f.txt"
        );
        assert_eq!(
            real(&mut targets, "alias/new/g.txt", Intent::Create),
            "real/new/g.txt"
        );
        assert_eq!(
            real(&mut targets, "real/sub/f.txt", Intent::Delete),
            "real/sub/f.txt"
        );
    }

    #[test]
    fn paths_outside_a_sparse_checkout_are_refused() {
        let tree = Tree::new();
        tree.write("src/a.rs", "a\n");
        tree.track("src/a.rs");
        tree.write("docs/b.md", "b\n");
        tree.track("docs/b.md");
        let mut config = tree.repo.config().expect("config");
        config.set_bool("core.sparseCheckout", true).expect("set");
        // What `git sparse-checkout set --cone src` writes.
        tree.mkdir(".git/info");
        tree.write(".git/info/sparse-checkout", "/*\n!/*/\n/src/\n");
        // The skip-worktree bit is what git acts on for tracked files.
        let mut index = tree.repo.index().expect("index");
        let mut entry = index.get_path(Path::new("docs/b.md"), 0).expect("entry");
        entry.flags |= 0x4000; // GIT_INDEX_ENTRY_EXTENDED
        entry.flags_extended |= SKIP_WORKTREE;
        index.add(&entry).expect("add");
        index.write().expect("write index");
        std::fs::remove_file(tree.root().join("docs/b.md")).expect("rm");

        assert_eq!(tree.code("docs/b.md", Intent::Modify), "sparse_checkout");
        assert_eq!(tree.code("docs/new.md", Intent::Create), "sparse_checkout");
        assert_eq!(
            tree.code("other/deep/new.md", Intent::Create),
            "sparse_checkout"
        );
        tree.check("src/a.rs", Intent::Modify)
            .expect("inside the cone");
        tree.check("src/deep/new.rs", Intent::Create)
            .expect("inside the cone");
        tree.check("top.txt", Intent::Create)
            .expect("files at the root are always in");

        // Non-cone patterns: gitignore syntax, a match includes.
        tree.write(
            ".git/info/sparse-checkout",
            "*.rs\n/src/gen/\n!/src/gen/old/\n",
        );
        tree.check("docs/x.rs", Intent::Create)
            .expect("matches *.rs");
        tree.check("src/gen/y.md", Intent::Create)
            .expect("under /src/gen/");
        assert_eq!(tree.code("docs/x.md", Intent::Create), "sparse_checkout");
        assert_eq!(
            tree.code("src/gen/old/y.md", Intent::Create),
            "sparse_checkout"
        );
    }

    #[test]
    fn every_refusal_has_a_hint() {
        for kind in ALL_KINDS {
            assert!(!kind.hint().is_empty(), "{kind:?}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_leaf_is_refused() {
        let tree = Tree::new();
        tree.symlink("README.md", "link.md");
        let outside = tempfile::tempdir().expect("tempdir");
        tree.symlink(outside.path().join("new.rs"), "dangling.rs");
        for intent in [Intent::Create, Intent::Modify, Intent::Delete] {
            assert_eq!(tree.code("link.md", intent), "symlink_target");
            assert_eq!(tree.code("dangling.rs", intent), "symlink_target");
        }
    }

    #[test]
    fn a_nested_repository_is_refused() {
        let tree = Tree::new();
        git2::Repository::init(tree.root().join("vendor/lib")).expect("nested init");
        assert_eq!(tree.code("vendor/lib/x.rs", Intent::Create), "submodule");
        assert_eq!(tree.code("vendor/lib", Intent::Delete), "submodule");
        // A `.git` file (how submodules and worktrees point at their git dir) counts too.
        tree.write("linked/.git", "gitdir: ../elsewhere\n");
        assert_eq!(tree.code("linked/src/x.rs", Intent::Create), "submodule");
        // Its neighbour is ordinary.
        tree.check("vendor/other.rs", Intent::Create)
            .expect("allowed");
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_into_a_nested_repository_is_refused() {
        let tree = Tree::new();
        git2::Repository::init(tree.root().join("vendor/lib")).expect("nested init");
        tree.symlink("vendor/lib", "lib");
        assert_eq!(tree.code("lib/x.rs", Intent::Create), "submodule");
        tree.symlink("vendor/lib/.git", "libgit");
        assert_eq!(tree.code("libgit/config", Intent::Modify), "symlink_escape");
    }

    #[test]
    fn a_gitlink_in_the_index_is_refused() {
        let tree = Tree::new();
        let mut index = tree.repo.index().expect("index");
        let mut entry = index
            .get_path(Path::new("README.md"), 0)
            .expect("README.md is tracked");
        entry.mode = GITLINK_MODE;
        entry.path = b"deps/sub".to_vec();
        index.add(&entry).expect("add gitlink");
        index.write().expect("write index");
        // Not checked out: nothing on disk, only the index knows.
        assert_eq!(tree.code("deps/sub/src/x.rs", Intent::Create), "submodule");
        assert_eq!(tree.code("deps/sub", Intent::Create), "submodule");
        tree.check("deps/subway.rs", Intent::Create)
            .expect("allowed");
    }

    #[test]
    fn a_path_ignored_by_gitignore_is_refused() {
        let tree = Tree::new();
        tree.write(".gitignore", "*.log\nbuild/\n");
        assert_eq!(tree.code("debug.log", Intent::Create), "ignored");
        tree.mkdir("build");
        assert_eq!(tree.code("build/out.rs", Intent::Create), "ignored");
        assert_eq!(
            tree.code("sub/build/deep/out.rs", Intent::Create),
            "ignored"
        );
        tree.check(".gitignore", Intent::Modify).expect("allowed");
        tree.check("src/build.rs", Intent::Create).expect("allowed");
    }

    #[test]
    fn a_path_ignored_by_info_exclude_is_refused() {
        let tree = Tree::new();
        let info = tree.repo.path().join("info");
        fs::create_dir_all(&info).expect("mkdir");
        fs::write(info.join("exclude"), "notes.txt\n").expect("write");
        tree.write("notes.txt", "mine\n");
        assert_eq!(tree.code("notes.txt", Intent::Modify), "ignored");
    }

    #[test]
    fn a_tracked_file_matching_an_ignore_rule_is_allowed() {
        let tree = Tree::new();
        tree.write("keep.log", "x\n");
        tree.track("keep.log");
        tree.write(".gitignore", "*.log\n");
        tree.check("keep.log", Intent::Modify)
            .expect("tracked files are never ignored");
    }

    #[cfg(unix)]
    #[test]
    fn an_ignored_directory_reached_through_a_symlink_is_refused() {
        let tree = Tree::new();
        tree.write(".gitignore", "/target/\n");
        tree.mkdir("target");
        tree.symlink("target", "out");
        assert_eq!(tree.code("out/x.rs", Intent::Create), "ignored");
    }

    #[test]
    fn a_secret_target_is_refused_before_any_io() {
        let tree = Tree::new();
        assert_eq!(tree.code(".env", Intent::Create), "secret");
        tree.write(".env", "TOKEN=x\n");
        assert_eq!(tree.code(".env", Intent::Modify), "secret");
        // The same answer from a worktree that does not exist: no I/O was needed.
        let gone = tree.root().join("gone");
        let error =
            check_target(&gone, &tree.repo, &rel("id_rsa"), Intent::Create).expect_err("refused");
        assert_eq!(error.code(), "secret");
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_reached_through_a_symlink_is_refused() {
        let tree = Tree::new();
        tree.write(".aws/credentials", "[default]\n");
        tree.symlink(".aws", "cfg");
        assert_eq!(tree.code("cfg/credentials", Intent::Modify), "secret");
    }

    #[test]
    fn an_unreadable_worktree_is_an_io_error() {
        let tree = Tree::new();
        let gone = tree.root().join("gone");
        let error =
            check_target(&gone, &tree.repo, &rel("x.rs"), Intent::Create).expect_err("refused");
        assert_eq!(error.code(), "io");
        assert!(StdError::source(&error).is_some());
        assert!(
            error.to_string().starts_with("refusing path `x.rs`: "),
            "{error}"
        );
    }

    #[test]
    fn a_corrupt_index_is_a_git_error() {
        let tree = Tree::new();
        fs::write(tree.repo.path().join("index"), b"not an index").expect("write");
        let error = tree.check("x.rs", Intent::Create).expect_err("refused");
        assert_eq!(error.code(), "git");
        assert!(StdError::source(&error).is_some());
    }
}
