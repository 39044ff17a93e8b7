//! Load generators and measurements: `fleetsql bench` and `benches/`. They live in the
//! library so that the test suite can run each of them in a small smoke mode (that they
//! work, not how fast), while the documented commands run them at full size in release
//! mode.
//!
//! - [`load`]: the MQTT load generator (a fleet publishing, a subscriber measuring what
//!   comes back) and the echo server that sets the round trip's limit;
//! - [`scenario`]: the end-to-end scenarios, each beside the broker's limits;
//! - [`procs`]: the processes involved (mosquitto, the system under test) and their CPU
//!   and memory as Linux reports them;
//! - [`core`]: scenario d, the core path in process without a broker, flat out;
//! - [`fleet`]: the whole engine in process with a large fleet, no broker (`cargo bench
//!   --bench fleet`): memory per device, window close to results, every row stored;
//! - [`micro`]: the hot path one stage at a time, decoding, the device-actor hop, window
//!   close, the window query and the Parquet sink (`cargo bench --bench micro`, criterion).

pub mod core;
pub mod fleet;
pub mod load;
pub mod micro;
pub mod procs;
pub mod scenario;

use std::time::Duration;

/// `fleetsql bench ...`
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// a. eKuiper's filter rule (`SELECT * FROM demo WHERE temperature > 50`) into Parquet,
    /// flat out, beside the broker's delivery limit.
    Filter(BenchArgs),
    /// b. 1-second tumbling avg/min/max per device (10,000 devices) into Parquet, flat
    /// out, beside the broker's delivery limit.
    Aggregate(BenchArgs),
    /// The nightlight rule, a command per reading, flat out, beside the echo round trip.
    Nightlight(BenchArgs),
    /// c. The nightlight round trip's latency at a fixed rate (default 10,000 msg/s).
    Latency(BenchArgs),
    /// d. The core path in process, no broker: decoding, device actors, windows, SQL and
    /// Parquet (scenario b's pipeline), flat out.
    Core {
        #[arg(long, default_value_t = 2_000_000)]
        messages: u64,
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Shard routers (threads); `0` for one on the main thread. Default: one per core
        /// (no broker shares the cores here).
        #[arg(long)]
        shards: Option<usize>,
    },
    /// The counting subscriber: counts the messages on `+/telemetry`, parsing nothing (the
    /// broker's delivery limit); prints `ready` once subscribed, `done` after `messages`.
    Count {
        #[command(flatten)]
        broker: HelperBroker,
        #[arg(long)]
        messages: u64,
    },
    /// The echo server: answers each `+/telemetry` message with `{"led_on":true}` on
    /// `<device>/commands`, parsing nothing (the round trip's limit).
    Echo {
        #[command(flatten)]
        broker: HelperBroker,
    },
}

/// Where a limit's helper process (`count`, `echo`) connects, and at which QoS.
#[derive(clap::Args, Debug, Clone)]
pub struct HelperBroker {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long)]
    port: u16,
    #[arg(long, default_value_t = 1)]
    qos: u8,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Readings in all (default: 500,000; for `latency`, rate × seconds).
    #[arg(long)]
    pub messages: Option<u64>,
    /// Devices in the fleet (default: 10,000 for `aggregate`, 1,000 otherwise).
    #[arg(long)]
    pub devices: Option<usize>,
    /// Readings per second for the whole fleet (default: flat out; 10,000 for `latency`).
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long `latency` sends.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// QoS of the readings, of the subscriptions and of the commands awaited.
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// MQTT connections the fleet publishes over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Measure this command instead of `fleetsql run` (`{host}` and `{port}` are the
    /// broker's, `{qos}` the load's), e.g. `benches/nodered/run.sh {host} {port} {qos}`.
    #[arg(long)]
    pub sut_cmd: Option<String>,
    /// An argument for `fleetsql run` (repeatable), e.g. `--engine-arg=--fsync=off`.
    #[arg(long = "engine-arg", allow_hyphen_values = true)]
    pub engine_args: Vec<String>,
    /// Skip the broker's limits.
    #[arg(long)]
    pub no_limits: bool,
    /// Run the broker on the first CPU and the system under test (and each limit's
    /// helper) on the others; the load generator runs anywhere. Needs two CPUs. Without
    /// it, on two cores the scheduler's placement moved results by up to a quarter from
    /// run to run (docs/benchmarks.md).
    #[arg(long)]
    pub pin: bool,
    /// Give up waiting for the results after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Run the scenario this many times, each on a fresh broker with its own limits, and
    /// end with the least, median and greatest of each figure.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
}

impl BenchArgs {
    pub fn options(&self, scenario: scenario::Scenario) -> anyhow::Result<scenario::BenchOptions> {
        use scenario::Scenario;
        let rate = self
            .rate
            .or((scenario == Scenario::Latency).then_some(10_000.0));
        let messages = self.messages.unwrap_or(match scenario {
            Scenario::Latency => (rate.unwrap_or(10_000.0) * self.seconds as f64) as u64,
            _ => 500_000,
        });
        let devices = self.devices.unwrap_or(match scenario {
            Scenario::Aggregate => 10_000,
            _ => 1_000,
        });
        let pin = if self.pin {
            Some(procs::Pinning::new()?)
        } else {
            None
        };
        Ok(scenario::BenchOptions {
            scenario,
            load: load::LoadOptions {
                host: "127.0.0.1".into(),
                port: 0,
                devices,
                messages,
                rate,
                qos: self.qos,
                connections: self.connections,
                payload: load::Payload::Light,
                prefix: "dev-".into(),
                timeout: Duration::from_secs(self.timeout),
            },
            sut_cmd: self.sut_cmd.clone(),
            engine_args: self.engine_args.clone(),
            no_limits: self.no_limits,
            pin,
        })
    }
}

/// Runs `fleetsql bench ...`; the exit code.
/// Runs a limit's helper process (`echo`, `count`) until SIGINT/SIGTERM; its exit code.
async fn helper<F>(body: impl FnOnce(tokio::sync::watch::Receiver<bool>) -> F) -> i32
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::cli::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    match body(stop_rx).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

pub async fn main(cmd: BenchCommand) -> i32 {
    use scenario::Scenario;
    let (scenario, args) = match cmd {
        BenchCommand::Echo { broker: b } => {
            return helper(|stop| async move { load::echo(&b.host, b.port, b.qos, stop).await })
                .await;
        }
        BenchCommand::Count {
            broker: b,
            messages,
        } => {
            return helper(|stop| async move {
                load::count(&b.host, b.port, b.qos, messages, stop).await
            })
            .await;
        }
        BenchCommand::Core {
            messages,
            devices,
            shards,
        } => {
            let dir = match tempfile::tempdir() {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: {e}");
                    return 1;
                }
            };
            let opts = core::CoreOptions {
                devices,
                messages,
                // No broker shares the box here, so the core path gets a shard thread per
                // core (`fleetsql run`'s default on bigger machines), not `run`'s default
                // for two cores.
                shards: shards
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
                data_dir: dir.path().to_path_buf(),
            };
            return match core::run(opts).await {
                Ok(r) => {
                    println!("{}", r.markdown());
                    0
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    1
                }
            };
        }
        BenchCommand::Filter(a) => (Scenario::Filter, a),
        BenchCommand::Aggregate(a) => (Scenario::Aggregate, a),
        BenchCommand::Nightlight(a) => (Scenario::Nightlight, a),
        BenchCommand::Latency(a) => (Scenario::Latency, a),
    };
    let opts = match args.options(scenario) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 1;
        }
    };
    let mut reports = Vec::new();
    for _ in 0..args.runs {
        match scenario::run(opts.clone()).await {
            Ok(report) => {
                println!("{}", report.markdown());
                reports.push(report);
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                return 1;
            }
        }
    }
    if reports.len() > 1 {
        println!("{}", scenario::summary(&reports));
    }
    0
}

/// The whole engine in process, fed through a channel instead of an MQTT client
/// ([`crate::engine::Input::Channel`]): what the in-process benchmarks drive.
pub struct InProcess {
    pub tx: tokio::sync::mpsc::Sender<crate::decode::Message>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    stop: tokio::sync::oneshot::Sender<()>,
    engine: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    pub fn start(
        cfg: crate::engine::EngineConfig,
        pipeline: crate::pipeline::CompiledPipeline,
    ) -> InProcess {
        let metrics = crate::metrics::Metrics::new();
        let (tx, rx) = tokio::sync::mpsc::channel(16_384);
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let inline = cfg.shards == 0;
        let engine = crate::engine::run_with(
            cfg,
            pipeline,
            crate::engine::Input::Channel(rx),
            metrics.clone(),
            async {
                let _ = stop_rx.await;
            },
        );
        // With no shard threads the engine's actors live on this thread's actix system,
        // whose tasks are local ones.
        let engine = if inline {
            tokio::task::spawn_local(engine)
        } else {
            tokio::spawn(engine)
        };
        InProcess {
            tx,
            metrics,
            stop,
            engine,
        }
    }

    /// Stops the engine as its configuration says (windows drained or kept) and waits
    /// until it has.
    pub async fn stop(self) -> anyhow::Result<()> {
        drop(self.tx);
        let _ = self.stop.send(());
        self.engine.await?
    }
}

/// Rows in a Parquet table written by the engine (all its partitions), read back with
/// DataFusion as a user would.
pub async fn count_rows(
    data_dir: &std::path::Path,
    table: &str,
    expr: &str,
) -> anyhow::Result<i64> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::Int64Type;
    let ctx = datafusion::prelude::SessionContext::new().enable_url_table();
    let path = data_dir.join(table);
    let sql = format!("SELECT CAST({expr} AS BIGINT) FROM '{}/'", path.display());
    let batches = ctx.sql(&sql).await?.collect().await?;
    let b = batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .ok_or_else(|| anyhow::anyhow!("no result from {sql}"))?;
    let col = b.column(0).as_primitive::<Int64Type>();
    Ok(if col.is_null(0) { 0 } else { col.value(0) })
}
