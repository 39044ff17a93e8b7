//! `fleetsql bench <scenario>`: one end-to-end benchmark, side by side with the limits the
//! broker sets, measured in the same run on the same broker:
//!
//! 1. the broker's delivery limit: the fleet flat out, a subscriber that only counts
//!    ([`super::load::count`] in its own process);
//! 2. for round-trip scenarios, the echo server's limit ([`super::load::echo`] in its own
//!    process, answering each reading with a fixed command, parsing nothing);
//! 3. the system under test (`fleetsql run` on the scenario's pipeline, or any command,
//!    e.g. Node-RED) under the same load.
//!
//! Each system's CPU time and peak memory are its own process's (from `/proc` and
//! `wait4`), the broker's CPU is reported beside it, and zero loss is checked afterwards
//! by counting the rows of the engine's Parquet tables with DataFusion.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::load::{self, Expect, LoadOptions, LoadReport, Payload};
use super::procs::{self, Mosquitto, Pinning, Proc, Role};

/// The scenarios of docs/benchmarks.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// a. eKuiper's test: `SELECT * FROM demo WHERE temperature > 50` into Parquet, flat out.
    Filter,
    /// b. 10,000 devices, 1-second tumbling avg/min/max per device into Parquet, flat out.
    Aggregate,
    /// The nightlight rule (a command per reading), flat out, against the echo's limit.
    Nightlight,
    /// c. The nightlight round trip's latency at a fixed rate (10,000 msg/s).
    Latency,
}

impl Scenario {
    fn payload(self) -> Payload {
        match self {
            Scenario::Filter | Scenario::Aggregate => Payload::Climate,
            Scenario::Nightlight | Scenario::Latency => Payload::Light,
        }
    }

    fn round_trip(self) -> bool {
        matches!(self, Scenario::Nightlight | Scenario::Latency)
    }

    /// The pipeline's text, its source subscribed (and its commands sent) at `qos`, so
    /// the whole path runs at the QoS the load uses.
    fn pipeline(self, qos: u8) -> anyhow::Result<String> {
        let text = match self {
            Scenario::Filter => include_str!("../../benches/pipelines/filter.sql"),
            Scenario::Aggregate => include_str!("../../benches/pipelines/aggregate.sql"),
            Scenario::Nightlight | Scenario::Latency => {
                include_str!("../../pipelines/nightlight.sql")
            }
        };
        let source = ["type = 'source',", "type      = 'source',"]
            .into_iter()
            .find(|s| text.contains(s))
            .ok_or_else(|| anyhow::anyhow!("the pipeline declares no MQTT source"))?;
        let text = text.replace(source, &format!("{source} qos = '{qos}',"));
        Ok(text.replace("qos       = '1'", &format!("qos = '{qos}'")))
    }

    /// The source table (its raw Parquet table has the same name).
    fn source(self) -> &'static str {
        match self {
            Scenario::Filter => "demo",
            Scenario::Aggregate => "climate",
            Scenario::Nightlight | Scenario::Latency => "telemetry",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub scenario: Scenario,
    pub load: LoadOptions,
    /// Start this instead of `fleetsql run` (`{host}` and `{port}` are filled in); its
    /// results are checked by the commands received only.
    pub sut_cmd: Option<String>,
    /// More arguments for `fleetsql run` (e.g. `--fsync off`).
    pub engine_args: Vec<String>,
    /// Skip measuring the broker's limits.
    pub no_limits: bool,
    /// Broker and system under test on CPUs of their own (`--pin`).
    pub pin: Option<procs::Pinning>,
}

/// One system's figures in one scenario.
#[derive(Debug, Clone)]
pub struct Measured {
    pub system: String,
    pub load: LoadReport,
    /// CPU of the system's process during the load, per message (`None`: unknown, e.g.
    /// the process was gone before it could be read).
    pub cpu_per_msg: Option<Duration>,
    pub broker_cpu_per_msg: Option<Duration>,
    pub peak_rss: Option<u64>,
    /// What was checked for zero loss, e.g. "commands 100000/100000, raw rows 100000".
    pub check: String,
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub scenario: Scenario,
    pub options: LoadOptions,
    pub delivery_limit: Option<Measured>,
    pub echo_limit: Option<Measured>,
    pub sut: Measured,
    /// Broker and systems ran on CPUs of their own (`--pin`).
    pub pinned: bool,
}

impl BenchReport {
    /// The limit this scenario is compared against: the echo round trip for the
    /// nightlight scenarios, the broker's delivery otherwise.
    pub fn limit(&self) -> Option<&Measured> {
        if self.scenario.round_trip() {
            self.echo_limit.as_ref()
        } else {
            self.delivery_limit.as_ref()
        }
    }

    pub fn ratio(&self) -> Option<f64> {
        Some(self.sut.load.rate() / self.limit()?.load.rate())
    }

    /// A Markdown table: one row per system measured, ratios against the limit.
    pub fn markdown(&self) -> String {
        let o = &self.options;
        let mut s = format!(
            "scenario `{:?}`: {} readings from {} devices over {} connection(s), QoS {}, {}{}\n\n\
             | system | msg/s | × limit | CPU/msg (process) | broker CPU/msg | peak RSS | p50 | p99 | zero loss |\n\
             |---|---|---|---|---|---|---|---|---|\n",
            self.scenario,
            o.total(),
            o.devices,
            o.connections,
            o.qos,
            match o.rate {
                Some(r) => format!("at {r:.0} msg/s"),
                None => "flat out".into(),
            },
            if self.pinned {
                ", broker and system under test pinned to CPUs of their own"
            } else {
                ""
            }
        );
        let limit = self.limit().map(|l| l.load.rate());
        for m in [&self.delivery_limit, &self.echo_limit]
            .into_iter()
            .flatten()
            .chain([&self.sut])
        {
            let us = |d: Option<Duration>| {
                d.map_or("–".into(), |d| format!("{:.2} us", d.as_secs_f64() * 1e6))
            };
            let ms = |d: Option<Duration>| {
                d.map_or("–".into(), |d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
            };
            s += &format!(
                "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |\n",
                m.system,
                m.load.rate(),
                limit.map_or("–".into(), |l| format!("{:.2}", m.load.rate() / l)),
                us(m.cpu_per_msg),
                us(m.broker_cpu_per_msg),
                m.peak_rss.map_or("–".into(), |b| format!(
                    "{:.0} MiB",
                    b as f64 / (1 << 20) as f64
                )),
                ms(m.load.latency(0.5)),
                ms(m.load.latency(0.99)),
                m.check,
            );
        }
        s
    }
}

/// The least, the median and the greatest of one figure over repeated runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// `None` when no run gave the figure.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Some(Spread {
            min: v[0],
            median,
            max: v[n - 1],
        })
    }
}

/// How a column of [`summary`] is printed.
#[derive(Clone, Copy)]
enum Unit {
    Rate,
    Ratio,
    Micros,
    Millis,
}

/// The columns of [`summary`], in the order of its rows' figures.
const SUMMARY_COLUMNS: [(&str, Unit); 8] = [
    ("limit msg/s", Unit::Rate),
    ("limit CPU/msg", Unit::Micros),
    ("msg/s", Unit::Rate),
    ("× limit", Unit::Ratio),
    ("CPU/msg", Unit::Micros),
    ("broker CPU/msg", Unit::Micros),
    ("p50", Unit::Millis),
    ("p99", Unit::Millis),
];

/// Several runs of one scenario (`fleetsql bench --runs N`), each against the limits
/// measured just before it: a Markdown table with a row per run, then the least, the
/// median and the greatest of each column. On two shared cores one run can land a
/// quarter off the next (docs/benchmarks.md), so a figure worth quoting is a spread.
pub fn summary(reports: &[BenchReport]) -> String {
    let us = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e6);
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    let rows: Vec<[Option<f64>; SUMMARY_COLUMNS.len()]> = reports
        .iter()
        .map(|r| {
            [
                r.limit().map(|l| l.load.rate()),
                r.limit().and_then(|l| us(l.cpu_per_msg)),
                Some(r.sut.load.rate()),
                r.ratio(),
                us(r.sut.cpu_per_msg),
                us(r.sut.broker_cpu_per_msg),
                ms(r.sut.load.latency(0.5)),
                ms(r.sut.load.latency(0.99)),
            ]
        })
        .collect();
    let cell = |v: Option<f64>, col: usize| match (v, SUMMARY_COLUMNS[col].1) {
        (None, _) => "–".to_string(),
        (Some(v), Unit::Rate) => format!("{v:.0}"),
        (Some(v), Unit::Ratio) => format!("{v:.2}"),
        (Some(v), Unit::Micros) => format!("{v:.2} us"),
        (Some(v), Unit::Millis) => format!("{v:.2} ms"),
    };
    let line = |first: &str, cells: &mut dyn Iterator<Item = String>| {
        let mut l = format!("| {first} |");
        for c in cells {
            l += &format!(" {c} |");
        }
        l + "\n"
    };
    let mut s = format!(
        "{} runs of `{}`:\n\n",
        reports.len(),
        reports.first().map_or("–".into(), |r| r.sut.system.clone()),
    );
    s += &line(
        "run",
        &mut SUMMARY_COLUMNS.iter().map(|(h, _)| h.to_string()),
    );
    s += &line(
        "---",
        &mut SUMMARY_COLUMNS.iter().map(|_| "---".to_string()),
    );
    for (i, row) in rows.iter().enumerate() {
        s += &line(
            &(i + 1).to_string(),
            &mut row.iter().enumerate().map(|(col, v)| cell(*v, col)),
        );
    }
    let spreads: Vec<Option<Spread>> = (0..SUMMARY_COLUMNS.len())
        .map(|col| Spread::of(rows.iter().filter_map(|r| r[col])))
        .collect();
    for (name, pick) in [
        ("min", (|s: Spread| s.min) as fn(Spread) -> f64),
        ("median", |s| s.median),
        ("max", |s| s.max),
    ] {
        s += &line(
            &format!("**{name}**"),
            &mut spreads
                .iter()
                .enumerate()
                .map(|(col, sp)| cell(sp.map(pick), col)),
        );
    }
    s
}

/// CPU used by a process between two readings, per message.
fn per_msg(before: Option<Duration>, after: Option<Duration>, n: u64) -> Option<Duration> {
    Some(after?.saturating_sub(before?) / n.max(1) as u32)
}

/// Runs the scenario; see the module documentation.
pub async fn run(opts: BenchOptions) -> anyhow::Result<BenchReport> {
    let broker = Mosquitto::start(opts.scenario == Scenario::Latency, opts.pin.as_ref())?;
    let broker_pid = broker.proc.pid();
    let mut load = opts.load.clone();
    load.host = "127.0.0.1".into();
    load.port = broker.port;
    load.payload = opts.scenario.payload();

    // The limits, on the same broker, with the same fleet.
    let delivery_limit = if opts.no_limits || opts.scenario == Scenario::Latency {
        None
    } else {
        Some(delivery_limit(&load, broker_pid, opts.pin.as_ref()).await?)
    };
    let echo_limit = if opts.no_limits || !opts.scenario.round_trip() {
        None
    } else {
        let mut echo = Proc::spawn_pinned(
            "echo server",
            Command::new(procs::fleetsql_bin()?)
                .args(["bench", "echo", "--port", &broker.port.to_string()])
                .args(["--qos", &load.qos.to_string()])
                .stdout(Stdio::null()),
            opts.pin.as_ref(),
            Role::System,
        )?;
        load::probe(
            &load.host,
            load.port,
            "probe",
            br#"{"light": 1}"#,
            Duration::from_secs(20),
        )
        .await?;
        let measured = measure(
            &mut echo,
            broker_pid,
            &load,
            Expect::Commands,
            None,
            "echo round-trip limit",
        )
        .await?;
        echo.stop(Duration::from_secs(5));
        Some(measured?)
    };

    let sut = match &opts.sut_cmd {
        Some(cmd) => {
            let cmd = cmd
                .replace("{host}", &load.host)
                .replace("{port}", &load.port.to_string())
                .replace("{qos}", &load.qos.to_string());
            // Its output would interleave with the report: kept in a file, shown on failure.
            let log = tempfile::NamedTempFile::new()?;
            let mut p = Proc::spawn_pinned(
                "system under test",
                Command::new("sh")
                    .arg("-c")
                    .arg(format!("exec {cmd}"))
                    .stdout(log.reopen()?)
                    .stderr(log.reopen()?),
                opts.pin.as_ref(),
                Role::System,
            )?;
            let sut_log = || std::fs::read_to_string(log.path()).unwrap_or_default();
            let probe = load::probe(
                &load.host,
                load.port,
                "probe",
                br#"{"light": 1}"#,
                Duration::from_secs(60),
            )
            .await;
            if let Err(e) = probe {
                anyhow::bail!("{e}\n{cmd} said:\n{}", sut_log());
            }
            let expect = if opts.scenario.round_trip() {
                Expect::Commands
            } else {
                Expect::Nothing
            };
            let m = measure(&mut p, broker_pid, &load, expect, None, cmd.as_str()).await?;
            p.stop(Duration::from_secs(10));
            let mut m = m.map_err(|e| anyhow::anyhow!("{e:#}\n{cmd} said:\n{}", sut_log()))?;
            m.check = format!("{} (no Parquet)", m.check);
            m
        }
        None => run_engine(&opts, &load, broker_pid).await?,
    };
    drop(broker);
    Ok(BenchReport {
        scenario: opts.scenario,
        options: load,
        delivery_limit,
        echo_limit,
        sut,
        pinned: opts.pin.is_some(),
    })
}

/// The broker's delivery limit: the fleet flat out to `fleetsql bench count`, a process
/// of its own that counts what it receives and says `done` once all has arrived.
async fn delivery_limit(
    load: &LoadOptions,
    broker_pid: u32,
    pin: Option<&Pinning>,
) -> anyhow::Result<Measured> {
    use std::io::BufRead;
    use std::sync::atomic::{AtomicBool, Ordering};
    let n = load.total();
    let mut counter = Proc::spawn_pinned(
        "counting subscriber",
        Command::new(procs::fleetsql_bin()?)
            .args(["bench", "count", "--port", &load.port.to_string()])
            .args(["--qos", &load.qos.to_string()])
            .args(["--messages", &n.to_string()])
            .stdout(Stdio::piped()),
        pin,
        Role::System,
    )?;
    let stdout = counter
        .take_stdout()
        .ok_or_else(|| anyhow::anyhow!("the counting subscriber's output is not piped"))?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    std::thread::spawn(move || {
        let mut ready_tx = Some(ready_tx);
        for line in std::io::BufReader::new(stdout).lines() {
            match line.as_deref() {
                Ok("ready") => {
                    ready_tx.take().map(|tx| tx.send(()));
                }
                Ok("done") => done2.store(true, Ordering::Relaxed),
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), ready_rx)
        .await
        .map_err(|_| anyhow::anyhow!("the counting subscriber did not subscribe within 20 s"))?
        .map_err(|_| anyhow::anyhow!("the counting subscriber exited before subscribing"))?;
    let measured = measure(
        &mut counter,
        broker_pid,
        load,
        Expect::Nothing,
        Some(Box::new(move || done.load(Ordering::Relaxed))),
        "broker delivery limit (counting subscriber)",
    )
    .await?;
    counter.stop(Duration::from_secs(5));
    let mut m = measured?;
    // `done` came: the counter received all of them.
    m.load.received = n;
    m.check = format!("telemetry {n}/{n}");
    Ok(m)
}

/// Runs the load against a started process and measures it. The outer error is the
/// harness failing; the inner one the system failing (not all came back in time).
async fn measure(
    p: &mut Proc,
    broker_pid: u32,
    load: &LoadOptions,
    expect: Expect,
    done: Option<Box<dyn FnMut() -> bool + Send>>,
    system: &str,
) -> anyhow::Result<anyhow::Result<Measured>> {
    let n = load.total();
    let (c0, b0) = (procs::cpu_time(p.pid()), procs::cpu_time(broker_pid));
    let r = match load::run(load, expect, done).await {
        Ok(r) => r,
        Err(e) => return Ok(Err(e.context(format!("{system} under load")))),
    };
    let (c1, b1) = (procs::cpu_time(p.pid()), procs::cpu_time(broker_pid));
    Ok(Ok(Measured {
        system: system.to_string(),
        cpu_per_msg: per_msg(c0, c1, n),
        broker_cpu_per_msg: per_msg(b0, b1, n),
        peak_rss: procs::peak_rss(p.pid()),
        check: match expect {
            Expect::Commands => format!("commands {}/{}", r.received, n),
            _ => String::new(),
        },
        load: r,
    }))
}

/// `fleetsql run` on the scenario's pipeline: started, probed, loaded, stopped (windows
/// drained), and its Parquet tables counted.
async fn run_engine(
    opts: &BenchOptions,
    load: &LoadOptions,
    broker_pid: u32,
) -> anyhow::Result<Measured> {
    let dir = tempfile::tempdir()?;
    let pipeline = dir.path().join("pipeline.sql");
    std::fs::write(&pipeline, opts.scenario.pipeline(load.qos)?)?;
    let data = dir.path().join("data");
    let maddr = format!("127.0.0.1:{}", procs::free_port()?);
    let log = std::fs::File::create(dir.path().join("engine.log"))?;
    let mut engine = Proc::spawn_pinned(
        "fleetsql run",
        Command::new(procs::fleetsql_bin()?)
            .arg("run")
            .arg(&pipeline)
            .args(["--broker", &format!("mqtt://{}:{}", load.host, load.port)])
            .arg("--data-dir")
            .arg(&data)
            .args(["--metrics-addr", &maddr])
            .args([
                "--client-id",
                &format!("bench-engine-{}", std::process::id()),
            ])
            // Every open window is closed on stop, so its rows can be counted.
            .arg("--drain")
            .args(&opts.engine_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log.try_clone()?),
        opts.pin.as_ref(),
        Role::System,
    )?;
    let engine_log = || std::fs::read_to_string(dir.path().join("engine.log")).unwrap_or_default();
    let m = maddr.clone();
    let ready = tokio::task::spawn_blocking(move || {
        procs::wait_for(Duration::from_secs(60), "the engine to subscribe", || {
            procs::scrape(&m).is_ok_and(|t| {
                procs::metric(&t, r#"fleetsql_broker_connected{client="ingest"}"#) == Some(1.0)
            })
        })
    })
    .await?;
    if let Err(e) = ready {
        anyhow::bail!("{e}\nengine log:\n{}", engine_log());
    }
    let n = load.total();
    if opts.scenario.round_trip() {
        // The command publisher is connected too (the probe's rows are not counted).
        load::probe(
            &load.host,
            load.port,
            "probe",
            br#"{"light": 1}"#,
            Duration::from_secs(30),
        )
        .await?;
    }
    let source = opts.scenario.source();
    let done: Option<Box<dyn FnMut() -> bool + Send>> = if opts.scenario.round_trip() {
        None
    } else {
        let sample = format!(r#"fleetsql_rows_ingested_total{{source="{source}"}}"#);
        let m = maddr.clone();
        Some(Box::new(move || {
            procs::scrape(&m).is_ok_and(|t| procs::metric(&t, &sample).unwrap_or(0.0) >= n as f64)
        }))
    };
    let expect = if opts.scenario.round_trip() {
        Expect::Commands
    } else {
        Expect::Nothing
    };
    let c0 = procs::cpu_time(engine.pid());
    let b0 = procs::cpu_time(broker_pid);
    let r = load::run(load, expect, done).await;
    let b1 = procs::cpu_time(broker_pid);
    // CPU until the engine has exited: closing the windows and writing Parquet count too.
    let exit = engine.stop(Duration::from_secs(120));
    let r = r.map_err(|e| anyhow::anyhow!("{e}\nengine log:\n{}", engine_log()))?;
    let exit = exit.ok_or_else(|| {
        anyhow::anyhow!(
            "the engine did not exit cleanly\nengine log:\n{}",
            engine_log()
        )
    })?;
    let fleet = format!(
        "sum(CASE WHEN device_id LIKE '{}%' THEN 1 ELSE 0 END)",
        load.prefix
    );
    let raw = super::count_rows(&data, source, &fleet).await?;
    let mut check = format!("raw rows {raw}/{n}");
    let ok = match opts.scenario {
        Scenario::Filter => {
            let expected = expected_hot(load);
            let hot = super::count_rows(&data, "hot", &fleet).await?;
            check += &format!(", filtered rows {hot}/{expected}");
            raw == n as i64 && hot == expected as i64
        }
        Scenario::Aggregate => {
            let counted = super::count_rows(&data, "per_device_1s", "sum(n)").await?;
            check += &format!(", sum of window counts {counted}/{n}");
            raw == n as i64 && counted == n as i64
        }
        Scenario::Nightlight | Scenario::Latency => {
            check = format!("commands {}/{n}, {check}", r.received);
            raw == n as i64 && r.received == n
        }
    };
    anyhow::ensure!(ok, "rows lost: {check}\nengine log:\n{}", engine_log());
    Ok(Measured {
        system: format!(
            "fleetsql run{}",
            opts.engine_args
                .iter()
                .map(|a| format!(" {a}"))
                .collect::<String>()
        ),
        cpu_per_msg: per_msg(c0, Some(exit.cpu), n),
        broker_cpu_per_msg: per_msg(b0, b1, n),
        peak_rss: Some(exit.max_rss),
        check,
        load: r,
    })
}

/// Readings of the fleet with temperature > 50, as the generator makes them.
fn expected_hot(load: &LoadOptions) -> u64 {
    let mut hot = 0;
    for d in 0..load.devices {
        for k in 0..load.per_device() {
            if Payload::temperature(d, k) > 50 {
                hot += 1;
            }
        }
    }
    hot
}
