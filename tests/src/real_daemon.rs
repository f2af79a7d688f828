//! The real `sparkd` binary against the fake provider, for runs that measure the daemon process
//! itself (its memory, its inotify watches): `load` and `scale`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Home, Provider, bin, stderr};

/// The real `sparkd` binary, detached-style: it prints `ready <pid>` once it serves.
#[derive(Debug)]
pub struct RealDaemon {
    pub home: Home,
    child: Child,
    pub pid: i32,
}

impl RealDaemon {
    /// Started with `fsync = false` (runs measure the daemon, not the disk), speaking WebSocket
    /// to `provider`.
    pub fn start(provider: &Provider) -> RealDaemon {
        RealDaemon::start_with(provider, &[])
    }

    /// As [`RealDaemon::start`], with extra environment variables (the daemon's `SPARK_TEST_*`
    /// hooks, say).
    pub fn start_with(provider: &Provider, env: &[(&str, &str)]) -> RealDaemon {
        let home = Home::new();
        let layout = home.layout();
        std::fs::create_dir_all(layout.config_file.parent().expect("config dir"))
            .expect("mkdir config dir");
        std::fs::write(&layout.config_file, "fsync = false\n").expect("write config.toml");
        let mut child = Command::new(bin("sparkd"))
            .arg("--detached")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", home.path())
            .env("SPARK_HOME", home.path())
            .env("SPARK_PROVIDER_URL", provider.fake.ws_url())
            .env("SPARK_API_KEY", "sk-test-not-a-real-key")
            .env("SPARK_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sparkd");
        let mut ready = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut ready)
            .expect("read sparkd's ready line");
        let pid = ready
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("sparkd did not say ready: {ready:?}"));
        RealDaemon { home, child, pid }
    }

    /// The last 40 lines of the daemon's log, for a failure message.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.home.layout().log_file).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// inotify watches the process holds, as the kernel counts them: the `inotify wd:` lines
    /// of its inotify descriptors' `fdinfo`.
    pub fn inotify_watches(&self) -> usize {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fdinfo", self.pid)) else {
            return 0;
        };
        fds.filter_map(Result::ok)
            .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
            .map(|info| {
                info.lines()
                    .filter(|l| l.starts_with("inotify wd:"))
                    .count()
            })
            .sum()
    }

    /// `shutdown`, then wait for the process.
    pub fn stop(mut self) {
        let out = Command::new(bin("sparkctl"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .env("SPARK_HOME", self.home.path())
            .arg("stop")
            .output()
            .expect("run sparkctl stop");
        assert!(out.status.success(), "sparkctl stop: {}", stderr(&out));
        let status = self.child.wait().expect("wait for sparkd");
        assert!(status.success(), "sparkd exited with {status}");
    }
}

impl Drop for RealDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `VmRSS` and `VmHWM` of `pid` now, in KiB.
pub fn rss_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Samples the daemon's `VmRSS` and `VmHWM` every 20 ms until stopped.
#[derive(Debug)]
pub struct RssSampler {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<(u64, u64, u64)>,
}

impl RssSampler {
    pub fn start(pid: i32) -> RssSampler {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let (start, mut hwm) = rss_kib(pid);
            let mut peak = start;
            // The interval paces the sampling; the channel ends it.
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_millis(20))
            {
                let (rss, h) = rss_kib(pid);
                peak = peak.max(rss);
                hwm = hwm.max(h);
            }
            (start, peak, hwm)
        });
        RssSampler { stop, thread }
    }

    /// (start, peak `VmRSS`, `VmHWM`) in KiB.
    pub fn stop(self) -> (u64, u64, u64) {
        let _ = self.stop.send(());
        self.thread.join().expect("rss sampler")
    }
}
