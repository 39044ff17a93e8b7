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

/// Which CPUs a benchmark's processes may run on (`fleetsql bench --pin`): the broker on
/// the first CPU this process may use, the system under test (or a limit's helper) on the
/// others, the load generator anywhere. Unpinned, the scheduler places the single-threaded
/// broker and the system's busiest thread differently from run to run, and on two cores
/// the same build measured anywhere from 0.7 to 1.0 × its best (docs/benchmarks.md).
#[derive(Debug, Clone, Copy)]
pub struct Pinning {
    broker: libc::cpu_set_t,
    system: libc::cpu_set_t,
}

/// What a child process is, for [`Pinning`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Broker,
    System,
}

impl Pinning {
    /// Splits the CPUs this process may use; an error with fewer than two.
    pub fn new() -> anyhow::Result<Pinning> {
        // SAFETY: cpu_set_t is plain data, all zeroes is the empty set; sched_getaffinity
        // writes at most the size given.
        let allowed = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                anyhow::bail!(
                    "cannot read this process's CPUs: {}",
                    std::io::Error::last_os_error()
                );
            }
            set
        };
        let cpus = members(&allowed);
        let (first, rest) = match cpus.as_slice() {
            [first, rest @ ..] if !rest.is_empty() => (first, rest),
            _ => anyhow::bail!(
                "--pin needs at least two CPUs; this process may use {}",
                cpus.len()
            ),
        };
        // SAFETY: as above; CPU_SET writes within the set for ids below CPU_SETSIZE.
        unsafe {
            let mut broker: libc::cpu_set_t = std::mem::zeroed();
            let mut system: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(*first, &mut broker);
            for &c in rest {
                libc::CPU_SET(c, &mut system);
            }
            Ok(Pinning { broker, system })
        }
    }

    fn set(&self, role: Role) -> libc::cpu_set_t {
        match role {
            Role::Broker => self.broker,
            Role::System => self.system,
        }
    }

    /// The CPUs `role` runs on.
    pub fn cpus(&self, role: Role) -> Vec<usize> {
        members(&self.set(role))
    }

    /// Makes `cmd`'s process (every thread it starts) run on `role`'s CPUs.
    fn apply(pin: Option<&Pinning>, cmd: &mut Command, role: Role) {
        use std::os::unix::process::CommandExt as _;
        let Some(set) = pin.map(|p| p.set(role)) else {
            return;
        };
        // SAFETY: runs in the child between fork and exec, where only async-signal-safe
        // calls are allowed: sched_setaffinity is a plain system call, and `set` was
        // built before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// The CPU ids in `set`, ascending.
fn members(set: &libc::cpu_set_t) -> Vec<usize> {
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: a read of an initialised set, within its size.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, set) })
        .collect()
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

    /// [`Proc::spawn`] on `role`'s CPUs, if the benchmark pins its processes.
    pub fn spawn_pinned(
        name: &str,
        cmd: &mut Command,
        pin: Option<&Pinning>,
        role: Role,
    ) -> anyhow::Result<Proc> {
        Pinning::apply(pin, cmd, role);
        Proc::spawn(name, cmd)
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
    pub fn start(nodelay: bool, pin: Option<&Pinning>) -> anyhow::Result<Mosquitto> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\n{MOSQUITTO_CONF}set_tcp_nodelay {nodelay}\n"),
        )?;
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let proc = Proc::spawn_pinned("mosquitto", &mut cmd, pin, Role::Broker)
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
