//! Test helpers: free ports, a mosquitto process, the engine process, condition waits,
//! /metrics scraping and Parquet reads. Every wait is bounded and everything is loopback.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_fleetsql");

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; panics with `what`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether tests needing `prog` can run. Without it they are skipped, loudly, unless
/// FLEETSQL_REQUIRE_MOSQUITTO=1 (set by CI), which turns the skip into a failure.
pub fn have(prog: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {prog}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("FLEETSQL_REQUIRE_MOSQUITTO").as_deref() == Ok("1") {
            panic!("{test}: `{prog}` is required (FLEETSQL_REQUIRE_MOSQUITTO=1) but not installed");
        }
        eprintln!(
            "SKIPPED {test}: `{prog}` is not installed (apt-get install mosquitto mosquitto-clients)"
        );
    }
    found
}

/// A child process killed when dropped.
pub struct Proc(pub Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A mosquitto broker on a free loopback port.
pub struct Mosquitto {
    pub port: u16,
    proc: Proc,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Mosquitto {
        Self::start_conf(port, |_| "persistence false\n".into())
    }

    /// A broker that keeps sessions and queued messages across its restarts
    /// ([`Mosquitto::restart`]), as a production broker is configured.
    pub fn start_persistent() -> Mosquitto {
        Self::start_conf(free_port(), |dir| {
            // Run as root, mosquitto drops to its own user, which must be able to save.
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777));
            format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\n",
                dir.display()
            )
        })
    }

    fn start_conf(port: u16, extra: impl Fn(&Path) -> String) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let extra = extra(dir.path());
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\nmax_queued_bytes 0\n{extra}"),
        )
        .unwrap();
        let proc = Self::spawn(&conf, port);
        Mosquitto { port, proc, dir }
    }

    fn spawn(conf: &Path, port: u16) -> Proc {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        let proc = Proc(Some(child));
        wait_until(Duration::from_secs(10), "mosquitto listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        proc
    }

    /// Stops the broker as an operator would (SIGTERM: it saves its state) and starts it
    /// again on the same port.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.proc.0.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
        self.proc = Self::spawn(&self.dir.path().join("mosquitto.conf"), self.port);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.proc.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The last line of [`Engine::log`] once the engine's stderr is closed: all it logged is
/// there.
pub const STDERR_CLOSED: &str = "[stderr closed]\n";

/// The engine, run as users run it.
pub struct Engine {
    pub proc: Proc,
    pub metrics_port: u16,
    pub data_dir: PathBuf,
    pub log: Arc<Mutex<String>>,
}

impl Engine {
    /// Starts `fleetsql run` with `args` and waits until it is subscribed to its broker.
    pub fn start(data_dir: &Path, args: &[&str]) -> Engine {
        Self::start_limited(data_dir, args, None)
    }

    /// [`Engine::start`], with every file the engine writes limited to `file_kib` KiB
    /// (`ulimit -f`): writes past it fail as on a full disk.
    pub fn start_limited(data_dir: &Path, args: &[&str], file_kib: Option<u64>) -> Engine {
        Self::start_with(data_dir, args, file_kib, Some("info,rumqttd=off"))
    }

    /// [`Engine::start`] logging as a user's run does: `RUST_LOG` unset.
    pub fn start_with_default_log(data_dir: &Path, args: &[&str]) -> Engine {
        Self::start_with(data_dir, args, None, None)
    }

    fn start_with(
        data_dir: &Path,
        args: &[&str],
        file_kib: Option<u64>,
        rust_log: Option<&str>,
    ) -> Engine {
        let metrics_port = free_port();
        let mut cmd = match file_kib {
            None => Command::new(BIN),
            Some(kib) => {
                let mut c = Command::new("sh");
                c.args(["-c", "ulimit -f $0 && exec \"$@\"", &kib.to_string(), BIN]);
                c
            }
        };
        cmd.arg("run")
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match rust_log {
            Some(filter) => cmd.env("RUST_LOG", filter),
            None => cmd.env_remove("RUST_LOG"),
        };
        let mut child = cmd.spawn().expect("start fleetsql");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
            l.lock().unwrap().push_str(STDERR_CLOSED);
        });
        let e = Engine {
            proc: Proc(Some(child)),
            metrics_port,
            data_dir: data_dir.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if e.metric("fleetsql_broker_connected{client=\"ingest\"}") == Some(1.0) {
                break;
            }
            if Instant::now() > deadline {
                panic!("engine did not connect; log:\n{}", e.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        e
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.proc.0.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL: a crash, with no chance to flush anything.
    pub fn kill(mut self) {
        if let Some(mut c) = self.proc.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the engine to exit on its own; its exit code.
    pub fn wait_exit(mut self, timeout: Duration) -> i32 {
        let mut child = self.proc.0.take().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("engine did not exit; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn metrics(&self) -> String {
        ureq::get(&format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .timeout(Duration::from_secs(5))
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .unwrap_or_default()
    }

    /// The value of one series, e.g. `fleetsql_rows_ingested_total{source="telemetry"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics(), series)
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(mut self) -> i32 {
        let mut child = self.proc.0.take().unwrap();
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("engine did not exit after SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `mosquitto_sub` collecting `topic payload` lines.
pub struct Subscriber {
    proc: Proc,
    pub lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Subscriber {
    pub fn start(port: u16, filter: &str, probe_topic: &str) -> Subscriber {
        Subscriber::start_with(port, filter, probe_topic, &[])
    }

    /// With more `mosquitto_sub` arguments, e.g. a client id and a last will.
    pub fn start_with(port: u16, filter: &str, probe_topic: &str, extra: &[&str]) -> Subscriber {
        let mut child = Command::new("mosquitto_sub")
            .args(extra)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-q",
                "1",
                "-v",
                "-t",
                filter,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (l, sn, probe) = (lines.clone(), seen.clone(), format!("{probe_topic} "));
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with(&probe) {
                    sn.store(true, std::sync::atomic::Ordering::SeqCst);
                } else {
                    l.lock().unwrap().push((Instant::now(), line));
                }
            }
        });
        // Subscribed once a probe published on `probe_topic` (which must match `filter`)
        // comes back; probes are bounded and filtered out of `lines`.
        let s = Subscriber {
            proc: Proc(Some(child)),
            lines,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let _ = mosquitto_pub(port)
                .args(["-t", probe_topic, "-m", "probe"])
                .status();
            std::thread::sleep(Duration::from_millis(50));
            if seen.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            assert!(Instant::now() < deadline, "mosquitto_sub did not subscribe");
        }
        s
    }

    pub fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// SIGKILL: the connection drops without a DISCONNECT, as when a device loses power or
    /// network, so the broker publishes the client's last will.
    pub fn kill(mut self) {
        if let Some(c) = self.proc.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `mosquitto_pub` to the broker on `port` at QoS 1; the caller adds topic and message.
pub fn mosquitto_pub(port: u16) -> Command {
    let mut c = Command::new("mosquitto_pub");
    c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"]);
    c
}

/// Publishes `(topic, payload)` pairs in order with `mosquitto_pub -l` (one process per topic).
pub fn publish(port: u16, messages: &[(String, String)]) {
    let mut topics: Vec<&String> = messages.iter().map(|(t, _)| t).collect();
    topics.sort();
    topics.dedup();
    let mut children = Vec::new();
    for t in topics {
        let mut child = mosquitto_pub(port)
            .args(["-t", t, "-l"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub");
        let mut stdin = child.stdin.take().unwrap();
        for (tt, p) in messages {
            if tt == t {
                writeln!(stdin, "{p}").unwrap();
            }
        }
        drop(stdin);
        children.push(child);
    }
    for mut c in children {
        let st = c.wait().unwrap();
        assert!(st.success(), "mosquitto_pub failed");
    }
}

/// Runs SQL with DataFusion as datafusion-cli does (paths in FROM allowed) and returns the
/// rows pretty-printed.
pub fn sql(statements: &[String]) -> Vec<Vec<datafusion::arrow::record_batch::RecordBatch>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ctx = datafusion::prelude::SessionContext::new().enable_url_table();
        let mut out = Vec::new();
        for s in statements {
            let df = ctx.sql(s).await.unwrap_or_else(|e| panic!("{s}: {e}"));
            out.push(df.collect().await.unwrap_or_else(|e| panic!("{s}: {e}")));
        }
        out
    })
}

/// A single integer from a one-row, one-column result.
pub fn scalar(batches: &[datafusion::arrow::record_batch::RecordBatch]) -> i64 {
    use datafusion::arrow::array::Int64Array;
    let b = batches.iter().find(|b| b.num_rows() > 0).expect("a row");
    b.column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("an integer")
        .value(0)
}

pub fn write_pipeline(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Rows as sorted JSON lines (nulls explicit, timestamps as RFC 3339): how golden files and
/// example tests compare table contents.
pub fn json_lines(batches: &[datafusion::arrow::record_batch::RecordBatch]) -> Vec<String> {
    let mut lines: Vec<String> = batches
        .iter()
        .flat_map(|b| fleetsql::sink::json_rows(b).unwrap())
        .collect();
    lines.sort();
    lines
}

/// The engine's pipeline in process (no broker), over a pipeline file.
pub async fn local(pipeline: &Path) -> fleetsql::engine::local::Local {
    let compiled = fleetsql::pipeline::load(&[pipeline.to_path_buf()])
        .await
        .unwrap();
    fleetsql::engine::local::Local::new(compiled).unwrap()
}

/// A fleet's publisher: QoS 1 with a persistent session, reconnecting through broker
/// restarts (rumqttc resends what the broker has not acknowledged); counts the broker's
/// acknowledgements.
pub struct Publisher {
    pub acked: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Publisher {
    /// Publishes `messages` in order, at most `per_second` of them a second (0: as fast as
    /// the broker takes them).
    pub fn start(
        port: u16,
        id: &str,
        messages: Vec<(String, String)>,
        per_second: u32,
    ) -> Publisher {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_inflight(100);
        let (client, mut connection) = rumqttc::Client::new(opts, 1000);
        let acked = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acked.clone(), stop.clone());
        let poll = std::thread::spawn(move || {
            for ev in connection.iter() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    // The broker is down: retry until it is back (the test bounds the wait).
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        let s = stop.clone();
        let publish = std::thread::spawn(move || {
            let started = Instant::now();
            for (i, (topic, payload)) in messages.into_iter().enumerate() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                if per_second > 0 {
                    let due = started + Duration::from_secs_f64(i as f64 / per_second as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                if client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                    .is_err()
                {
                    return;
                }
            }
        });
        Publisher {
            acked,
            stop,
            threads: vec![poll, publish],
        }
    }

    pub fn acked(&self) -> usize {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // The poll thread ends at its next event (keep-alive at the latest).
        for t in self.threads.drain(..) {
            drop(t);
        }
    }
}

/// Resident memory of a process, in bytes (Linux).
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}
