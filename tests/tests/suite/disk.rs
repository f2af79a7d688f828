//! Disk faults in the middle of an operation, on real filesystems: a size-capped tmpfs that
//! fills up (ENOSPC) and the same remounted read-only (EROFS), under the worktree or under the
//! daemon's state directory (its journals). Mounting needs CAP_SYS_ADMIN, which CI (root) has;
//! without it each test says so on stderr and returns.
//!
//! Every case: a clear error naming the fault, nothing changed on disk (the worktree and `.git`
//! byte for byte), the daemon still serving, and the same operation working once the fault is
//! gone.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use spark_tests::{Ctl, Home, hermetic_git, output_with_stdin, snapshot, stderr};

/// A tmpfs of `size_kb` mounted on a fresh directory; unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size_kb: u32) -> Option<SmallDisk> {
        let dir = tempfile::Builder::new()
            .prefix("spdisk")
            .tempdir_in("/tmp")
            .expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kb}k,mode=0700")])
            .arg("tmpfs")
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk { dir }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs (needs root): {}",
                    stderr(&o).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: no mount(8): {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, read_only: bool) {
        let opt = if read_only {
            "remount,ro"
        } else {
            "remount,rw"
        };
        let out = Command::new("mount")
            .args(["-o", opt])
            .arg(self.path())
            .output()
            .expect("mount");
        assert!(out.status.success(), "remount: {}", stderr(&out));
    }

    /// Fill the filesystem until at most `leave` bytes are free; returns the ballast's path.
    fn fill(&self, leave: u64) -> PathBuf {
        let ballast = self.path().join("ballast");
        let mut f = std::fs::File::create(&ballast).expect("ballast");
        let chunk = vec![0u8; 4096];
        loop {
            let free = self.free();
            if free <= leave {
                break;
            }
            let n = usize::try_from((free - leave).min(chunk.len() as u64)).unwrap_or(4096);
            if std::io::Write::write_all(&mut f, &chunk[..n]).is_err() {
                break;
            }
            let _ = f.sync_all();
        }
        ballast
    }

    fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df avail")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// A repository with `a.txt` and `b.txt` committed, at `dir`.
fn repo_at(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    std::fs::create_dir(&repo).expect("repo dir");
    let git = |args: &[&str]| {
        let out = hermetic_git(&repo).args(args).output().expect("git");
        assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["config", "user.name", "Spark Test"]);
    git(&["config", "user.email", "test@spark.invalid"]);
    std::fs::write(repo.join("a.txt"), "a\n").expect("a");
    std::fs::write(repo.join("b.txt"), "b\n").expect("b");
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "initial"]);
    repo
}

/// An edit of both files; `b.txt` grows by `grow` bytes so its new content needs room.
fn patch(grow: usize) -> String {
    let mut p = String::from(
        "*** Begin Patch\n*** Update File: a.txt\n-a\n+A\n*** Update File: b.txt\n-b\n+B\n",
    );
    for _ in 0..grow / 64 {
        p.push('+');
        p.push_str(&"x".repeat(63));
        p.push('\n');
    }
    p.push_str("*** End Patch\n");
    p
}

fn apply(ctl: &Ctl, repo: &Path, patch: &str) -> Output {
    let mut cmd = ctl.command("sparkctl");
    cmd.current_dir(repo).args(["apply", "-"]);
    output_with_stdin(&mut cmd, patch.as_bytes())
}

fn sparkctl(ctl: &Ctl, repo: &Path, args: &[&str]) -> Output {
    ctl.command("sparkctl")
        .current_dir(repo)
        .args(args)
        .output()
        .expect("sparkctl")
}

/// Exit 2 (not the caller's fault) with one error line naming `fault` and saying nothing
/// changed, a `hint:` line, and the repository byte for byte as `before`.
fn refused_cleanly(
    out: &Output,
    fault: &str,
    repo: &Path,
    before: &std::collections::BTreeMap<String, (u32, Vec<u8>)>,
) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines[0].starts_with("sparkctl: error: ") && lines[0].contains(fault),
        "{err}"
    );
    assert!(lines[0].contains("nothing was changed"), "{err}");
    assert!(lines.iter().any(|l| l.starts_with("hint: ")), "{err}");
    let after = snapshot(repo);
    // Local history snapshots the files as they are before any write (by design: it keeps what
    // an operation is about to replace), so its ref and objects may be new; nothing else.
    let history = |k: &str| {
        k.starts_with(".git/objects/")
            || k.starts_with(".git/refs/spark/")
            || k.starts_with(".git/logs/refs/spark/")
    };
    let changed: Vec<&String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .filter(|k| !history(k) || k.contains("edits") || k.contains("pins"))
        .collect();
    assert!(changed.is_empty(), "changed on disk: {changed:?}");
}

#[test]
fn a_full_worktree_disk_mid_apply_changes_nothing_and_the_daemon_keeps_serving() {
    let Some(disk) = SmallDisk::mount(2048) else {
        return;
    };
    let repo = repo_at(disk.path());
    let ctl = Ctl::new();
    assert!(sparkctl(&ctl, &repo, &["status"]).status.success());
    let before = snapshot(&repo);
    // Room for a.txt's new content, not for b.txt's 256 KiB: the apply fails half-way through
    // staging its files.
    let ballast = disk.fill(64 * 1024);
    let big = patch(256 * 1024);
    let out = apply(&ctl, &repo, &big);
    refused_cleanly(&out, "No space left on device", &repo, &before);
    assert!(
        sparkctl(&ctl, &repo, &["status"]).status.success(),
        "still serving"
    );

    std::fs::remove_file(ballast).expect("free the disk");
    let out = apply(&ctl, &repo, &big);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(std::fs::read(repo.join("a.txt")).unwrap(), b"A\n");
    assert!(std::fs::read(repo.join("b.txt")).unwrap().len() > 256 * 1024);
}

#[test]
fn a_read_only_worktree_refuses_apply_and_undo_cleanly_until_it_is_writable() {
    let Some(disk) = SmallDisk::mount(4096) else {
        return;
    };
    let repo = repo_at(disk.path());
    let ctl = Ctl::new();
    let out = apply(&ctl, &repo, &patch(0));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    disk.remount(true);
    let before = snapshot(&repo);
    let out = sparkctl(&ctl, &repo, &["undo"]);
    refused_cleanly(&out, "Read-only file system", &repo, &before);
    let second = "*** Begin Patch\n*** Update File: a.txt\n-A\n+AA\n*** End Patch\n";
    let out = apply(&ctl, &repo, second);
    refused_cleanly(&out, "Read-only file system", &repo, &before);
    assert!(
        sparkctl(&ctl, &repo, &["status"]).status.success(),
        "still serving"
    );

    disk.remount(false);
    let out = sparkctl(&ctl, &repo, &["undo"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(std::fs::read(repo.join("a.txt")).unwrap(), b"a\n");
    assert_eq!(std::fs::read(repo.join("b.txt")).unwrap(), b"b\n");
}

#[test]
fn a_full_state_disk_refuses_the_journal_and_changes_nothing() {
    let Some(disk) = SmallDisk::mount(2048) else {
        return;
    };
    // The daemon's home (journals, logs, socket) on the small disk; the repository elsewhere.
    let ctl = Ctl {
        home: Home::in_dir(disk.path()),
    };
    let elsewhere = tempfile::Builder::new()
        .prefix("repo")
        .tempdir_in("/tmp")
        .expect("repo dir");
    let repo = repo_at(elsewhere.path());
    assert!(sparkctl(&ctl, &repo, &["status"]).status.success());
    let before = snapshot(&repo);
    let ballast = disk.fill(0);
    // The journal holds both contents inline: it cannot be written, so no file is touched.
    let big = patch(64 * 1024);
    let out = apply(&ctl, &repo, &big);
    refused_cleanly(&out, "No space left on device", &repo, &before);
    assert!(
        sparkctl(&ctl, &repo, &["status"]).status.success(),
        "still serving"
    );

    std::fs::remove_file(ballast).expect("free the disk");
    let out = apply(&ctl, &repo, &big);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(std::fs::read(repo.join("a.txt")).unwrap(), b"A\n");
}

/// Runs the real binaries as `nobody` (with `setpriv`, environment kept), from a copy anyone
/// can execute; the home and the repository belong to `nobody`.
struct AsNobody {
    bin: tempfile::TempDir,
    ctl: Ctl,
}

impl AsNobody {
    fn new() -> Option<AsNobody> {
        let root =
            std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
        if !matches!(root, Ok(true)) || Command::new("setpriv").arg("--version").output().is_err() {
            eprintln!("SKIPPED: needs root and setpriv(1) to run the daemon as another user");
            return None;
        }
        let bin = tempfile::Builder::new()
            .prefix("spbin")
            .tempdir_in("/tmp")
            .expect("bin dir");
        for name in ["sparkctl", "sparkd"] {
            std::fs::copy(spark_tests::bin(name), bin.path().join(name)).expect("copy binary");
        }
        chmod(bin.path(), 0o755);
        let ctl = Ctl::new();
        chown_nobody(ctl.home.path());
        Some(AsNobody { bin, ctl })
    }

    fn run(&self, repo: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(self.bin.path().join("sparkctl"))
            .args(args)
            .current_dir(repo)
            .env_clear()
            .env(
                "PATH",
                format!("{}:/usr/bin:/bin", self.bin.path().display()),
            )
            .env("HOME", self.ctl.home.path())
            .env("SPARK_HOME", self.ctl.home.path())
            .env("SPARK_IDLE_TIMEOUT", "120");
        match stdin {
            Some(text) => output_with_stdin(&mut cmd, text.as_bytes()),
            None => cmd.output().expect("setpriv"),
        }
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .expect("chmod");
}

fn chown_nobody(path: &Path) {
    let out = Command::new("chown")
        .args(["-R", "nobody:nogroup"])
        .arg(path)
        .output()
        .expect("chown");
    assert!(out.status.success(), "chown: {}", stderr(&out));
}

#[test]
fn a_directory_the_daemon_may_not_write_refuses_apply_cleanly_until_it_may() {
    let Some(nobody) = AsNobody::new() else {
        return;
    };
    let parent = tempfile::Builder::new()
        .prefix("repo")
        .tempdir_in("/tmp")
        .expect("repo dir");
    chmod(parent.path(), 0o755);
    let repo = repo_at(parent.path());
    chown_nobody(&repo);
    let out = nobody.run(&repo, &["status"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    // The worktree's top directory read-only for its owner: no temp file can be made beside
    // a.txt, while .git stays writable.
    chmod(&repo, 0o555);
    let before = snapshot(&repo);
    let out = nobody.run(&repo, &["apply", "-"], Some(&patch(0)));
    refused_cleanly(&out, "Permission denied", &repo, &before);
    assert!(
        stderr(&out).contains("hint: the daemon runs as you: check the permissions"),
        "{}",
        stderr(&out)
    );
    assert!(
        nobody.run(&repo, &["status"], None).status.success(),
        "still serving"
    );

    chmod(&repo, 0o755);
    let out = nobody.run(&repo, &["apply", "-"], Some(&patch(0)));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(std::fs::read(repo.join("a.txt")).unwrap(), b"A\n");
}

#[test]
fn a_full_cache_disk_leaves_watching_and_asking_working() {
    use spark_proto::methods::{Ask, AskParams, Focus, Status, Watch, WatchParams};
    use spark_tests::fake_provider::{Script, Turn};
    use spark_tests::{InProcess, Provider, TestRepo};

    let Some(disk) = SmallDisk::mount(1024) else {
        return;
    };
    const LIB: &str = "fn one() {\n    1\n}\n";
    const PATCH: &str = "*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn one() {\n-    1\n+    100\n*** End Patch\n";
    let provider = Provider::start(Script::new().default_turn(Turn::apply_patch(PATCH)));
    let home = Home::new();
    let mut config = home.config();
    // Only the context cache on the small disk, full before the daemon starts.
    config.layout.cache_dir = disk.path().join("cache");
    config.provider_url = provider.fake.ws_url();
    config.api_key = Some("sk-test-not-a-real-key".into());
    config.fsync = false;
    let _ballast = disk.fill(0);
    let daemon = InProcess::start_with(home, config);
    let mut files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|n| {
            (
                format!("src/m{n}.rs"),
                format!("pub fn f{n}() {{}}\n").into_bytes(),
            )
        })
        .collect();
    files.push(("src/lib.rs".into(), LIB.as_bytes().to_vec()));
    let borrowed: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let repo = TestRepo::with_files(&borrowed);
    let mut client = daemon.client();
    client
        .call::<Watch>(&WatchParams { dir: repo.cwd() })
        .expect("watch with a full cache disk");
    let result = client
        .call::<Ask>(&AskParams {
            cwd: repo.cwd(),
            prompt: "make one bigger".into(),
            focus: vec![Focus {
                path: "src/lib.rs".into(),
                start_line: None,
                end_line: None,
            }],
            dry_run: false,
            new_conversation: false,
            provider: None,
            buffers: Vec::new(),
        })
        .expect("ask with a full cache disk");
    assert!(result.edit.is_some(), "{result:?}");
    assert_eq!(repo.read("src/lib.rs"), b"fn one() {\n    100\n}\n");
    // The model saw the focus file's text although nothing could be cached.
    let requests = provider.wait_for_requests(1);
    let sent = &requests.last().expect("a request").raw;
    assert!(sent.contains("fn one()"), "context sent: {sent}");
    let status = client.call::<Status>(&Default::default()).expect("status");
    assert!(!status.repos.is_empty(), "still serving");
}
