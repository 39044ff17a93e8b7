//! The processes a benchmark runs and watches: a mosquitto broker on a free loopback port,
//! the system under test (`fleetsql run`, the echo server, Node-RED) as a child process,
//! and what Linux says about a process: CPU time and peak resident memory from `/proc`, so
//! each figure is that process's own and not the load generator's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// A free TCP port on loopback (bound, then released for the caller to use).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits for `cond` every 10 ms, at most `timeout`; says what did not happen otherwise.
pub fn wait_for(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A child process, stopped (SIGTERM, then SIGKILL after a grace period) when dropped.
pub struct Proc {
    child: Option<Child>,
    name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Proc> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        Ok(Proc {
            child: Some(child),
            name: name.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The child's standard output, when it was spawned with `Stdio::piped()`.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// SIGTERM, and wait up to `grace` for the exit (SIGKILL after). Returns the process's
    /// total CPU time and peak memory if it exited successfully on its own.
    pub fn stop(&mut self, grace: Duration) -> Option<Exit> {
        let c = self.child.take()?;
        let pid = c.id() as i32;
        // SAFETY: kill(2) on our own child's pid, not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        loop {
            let mut status = 0;
            // SAFETY: wait4 writes into the status and rusage we own. It reaps the child
            // (so `c` is dropped without a wait: std's Child does not wait on drop).
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if r == pid {
                let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
                let tv = |t: libc::timeval| {
                    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
                };
                return ok.then(|| Exit {
                    cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
                    max_rss: usage.ru_maxrss as u64 * 1024,
                });
            }
            if r < 0 {
                return None;
            }
            if Instant::now() >= deadline {
                tracing::warn!("{} did not stop within {grace:?}; killing it", self.name);
                // SAFETY: as above; the child is still not reaped.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// How a process ended: its CPU time (user + system) and peak resident memory.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub cpu: Duration,
    pub max_rss: u64,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(5));
    }
}

/// CPU time a running process has used so far, all its threads (those that have
/// exited too), to the nanosecond: the process's CPU-time clock
/// (`clock_getcpuclockid`). `/proc/<pid>/stat` counts in scheduler ticks (10 ms), too
/// coarse for a short run: a helper that spends 0.35 us on each of 2,000 messages
/// would read as 0 or 10 ms.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock_getcpuclockid writes one clockid_t into `clock`, which we own.
    if unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which we own. It fails (and
    // we return None) if the process has exited since.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Peak resident memory of a process (`VmHWM`), in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A mosquitto broker on a free loopback port, configured as the benchmarks document:
/// nothing dropped for queue limits (`max_queued_messages`), 1000 QoS 1 messages in
/// flight per client, no persistence.
pub struct Mosquitto {
    pub port: u16,
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

/// The broker configuration every benchmark runs with (see docs/benchmarks.md).
pub const MOSQUITTO_CONF: &str = "allow_anonymous true\n\
max_queued_messages 10000000\n\
max_queued_bytes 0\n\
max_inflight_messages 1000\n\
persistence false\n";

impl Mosquitto {
    /// `nodelay`: Nagle's algorithm off on the broker's sockets (`set_tcp_nodelay`), as
    /// for latency: else a lone QoS 0 message can wait tens of milliseconds for a delayed
    /// TCP ACK. Off by default in mosquitto, where it coalesces QoS 1 traffic (cheaper).
    pub fn start(nodelay: bool) -> anyhow::Result<Mosquitto> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\n{MOSQUITTO_CONF}set_tcp_nodelay {nodelay}\n"),
        )?;
        let proc = Proc::spawn(
            "mosquitto",
            Command::new("mosquitto")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .context("mosquitto is needed for this benchmark (apt-get install mosquitto)")?;
        wait_for(Duration::from_secs(10), "mosquitto to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(Mosquitto {
            port,
            proc,
            _dir: dir,
        })
    }
}

/// The engine's `/metrics` as text.
pub fn scrape(addr: &str) -> anyhow::Result<String> {
    Ok(ureq::get(&format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(5))
        .call()?
        .into_string()?)
}

/// The value of the sample `name{labels}` (written exactly as exported) in a scrape.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The `fleetsql` binary to start as the system under test: this one.
pub fn fleetsql_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("FLEETSQL_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // Under `cargo test` or `cargo bench` the current executable is the test or bench
    // binary; the fleetsql binary sits next to it, one folder up.
    if exe.file_stem().is_some_and(|s| s == "fleetsql") {
        return Ok(exe);
    }
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("no parent folder")?;
    let bin = dir.join("fleetsql");
    anyhow::ensure!(
        bin.exists(),
        "cannot find the fleetsql binary next to {}",
        exe.display()
    );
    Ok(bin)
}
