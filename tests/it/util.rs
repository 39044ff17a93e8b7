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
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        wait_until(Duration::from_secs(10), "mosquitto listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Mosquitto {
            port,
            proc: Proc(Some(child)),
            dir,
        }
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
        let metrics_port = free_port();
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .env("RUST_LOG", "info,rumqttd=off")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
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
