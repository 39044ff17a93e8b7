//! The `fleetsql` command line: `run`, `replay`, `check`, `explain` and `bench`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::engine::EngineConfig;
use crate::mqtt::BrokerUrl;
use crate::sink::parquet::RollPolicy;

#[derive(Parser, Debug)]
#[command(name = "fleetsql", version, about = "Stream processing for fleets of IoT devices: MQTT telemetry in, SQL pipelines, commands out, Parquet at rest.", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run pipelines: subscribe to their sources, evaluate their queries, send commands and
    /// write Parquet. SIGINT/SIGTERM flush every open window and file, then exit 0.
    Run(RunArgs),
    /// Run pipelines over recorded files (CSV, Parquet) in event time, as fast as the
    /// machine allows: the same tables as `run`, and the commands it would have sent in
    /// a table per MQTT sink. Same input, same output.
    Replay(ReplayArgs),
    /// Check pipeline files without running them; errors name file, line and column.
    Check {
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
    },
    /// Print each query's logical and physical plan.
    Explain {
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
    },
    /// Benchmarks against a real broker: a load generator, the broker's own limits, and
    /// the engine under the same load (see docs/benchmarks.md).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (write e.g. 500ms, 10s, 5m)"))
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Pipeline files (SQL); several files form one pipeline.
    #[arg(required = true)]
    pub pipelines: Vec<PathBuf>,
    /// External MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT. Without it, the engine
    /// starts its embedded broker on --listen.
    #[arg(long, env = "FLEETSQL_BROKER")]
    pub broker: Option<String>,
    /// PEM file of the CA that signed an mqtts:// broker's certificate (default: system roots).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Address of the embedded broker (ignored with --broker).
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub listen: SocketAddr,
    /// Where Parquet tables are written: <data-dir>/<table>/date=YYYY-MM-DD/hour=HH/*.parquet.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Address of the Prometheus /metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    /// MQTT client id of the engine; keep it stable so the broker keeps the session (and
    /// the messages queued for it) across restarts.
    #[arg(long, default_value = "fleetsql")]
    pub client_id: String,
    /// Start N simulated devices publishing telemetry that fits the pipeline's sources.
    #[arg(long, default_value_t = 0)]
    pub simulate: usize,
    /// How often each simulated device publishes.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub simulate_interval: Duration,
    /// Retire a device's actor after this long without a message.
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub device_idle_timeout: Duration,
    /// Commit Parquet files, with a checkpoint of the engine's state, this often: recent
    /// rows become queryable, and a crash replays at most this much of the log.
    #[arg(long, alias = "parquet-roll-interval", default_value = "60s", value_parser = duration)]
    pub commit_interval: Duration,
    /// Finish a Parquet file once it reaches this many bytes (it is committed with the next
    /// checkpoint).
    #[arg(long, default_value_t = 128 << 20)]
    pub parquet_roll_bytes: usize,
    /// When the write-ahead log is forced to disk before messages are acknowledged:
    /// `always` (survives a power cut) or `off` (survives a crash of the engine only).
    #[arg(long, default_value = "always")]
    pub fsync: crate::durable::wal::Fsync,
    /// On stop, close every open window so its results are written now, instead of
    /// keeping the windows in the checkpoint for the next start.
    #[arg(long)]
    pub drain: bool,
    /// Number of device shards (actix arbiters, one thread each). `0`: one shard on the
    /// runtime's own thread, so ingest, the device actors, the SQL and the command sink hand
    /// readings on without waking another thread (Parquet and the log's fsync keep their
    /// threads). Default: `0` on two cores or fewer, where the broker shares the cores with
    /// the engine (it cost 20-40 % less CPU per reading there and kept up with the broker
    /// for 10,000 devices at QoS 1 where two shard threads did not); otherwise one per
    /// core (docs/benchmarks.md).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Worker threads of the async runtime that carries ingest, the log, topic routing,
    /// the pipeline runner and the command sink (ignored with `--shards 0`, which runs
    /// them all on one thread). One by default: these stages form one
    /// chain and the parallel work runs on the shard and Parquet writer threads, so a
    /// second worker mostly adds cross-thread wake-ups (see docs/benchmarks.md).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub runtime_threads: u16,
    /// Bytes of decoded rows that may wait for the pipeline before ingest pauses (and the
    /// broker holds the backlog instead).
    #[arg(long, default_value_t = 64 << 20)]
    pub max_backlog_bytes: usize,
    /// Above 20,000 readings/s, group readings for up to this long (e.g. `1ms`) before
    /// they go to the device shards, so each hop (shards, SQL, command sink, Parquet
    /// writers) runs once for many. It costs about 2 ms of latency (p50 0.9 → 3 ms at 25k
    /// readings/s, QoS 0) and saves a third of the CPU per reading at such rates (QoS 0 at
    /// 25k, QoS 1 at 60k: the broker delivers QoS 1 in smaller pieces). Flat out at QoS 1
    /// it cost a filter a fifth of its rate and did not cost an aggregation over 10,000
    /// devices (see docs/benchmarks.md). Below that rate every reading goes on at once.
    /// Off by default (`Linger::DEFAULT`).
    #[arg(long, value_parser = duration)]
    pub linger: Option<Duration>,
    /// Reload the pipeline when a pipeline file changes (SIGHUP always reloads). Queries
    /// that did not change keep their window state; a file with errors is refused and the
    /// running pipeline stays.
    #[arg(long)]
    pub watch: bool,
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// Pipeline files (SQL); several files form one pipeline.
    #[arg(required = true)]
    pub pipelines: Vec<PathBuf>,
    /// Recorded files, `.csv` (with a header row) or `.parquet`, replayed in this order,
    /// each in file order.
    #[arg(long = "input", required = true, num_args = 1.., value_name = "FILE")]
    pub inputs: Vec<PathBuf>,
    /// The source the files feed (default: the pipeline's only source).
    #[arg(long)]
    pub source: Option<String>,
    /// Where the tables are written, as `run` writes them (same default). Their folders
    /// must hold no Parquet files yet.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Fill a column of the source with one value on every row, e.g. --set device_id=pump-7.
    #[arg(long, value_name = "COLUMN=VALUE", value_parser = crate::replay::pair)]
    pub set: Vec<(String, String)>,
    /// Read a file column as a column of the source, e.g. --map value=vibration.
    #[arg(long, value_name = "FILE_COLUMN=COLUMN", value_parser = crate::replay::pair)]
    pub map: Vec<(String, String)>,
    /// Fill a column (typically device_id) with each input file's name without extension:
    /// one recorded file per device.
    #[arg(long, value_name = "COLUMN")]
    pub key_from_file: Option<String>,
    /// The files' time column when the source declares no event_time field (default:
    /// `timestamp`, else `event_time`): timestamp text, timestamps or epoch s/ms.
    #[arg(long, value_name = "COLUMN")]
    pub time_column: Option<String>,
    /// Rows handed to the pipeline at a time.
    #[arg(long, default_value_t = 8192, value_name = "N")]
    pub batch_rows: usize,
    /// Also write every sink table (Parquet sinks and command tables) as <data-dir>/<table>.csv.
    #[arg(long)]
    pub csv: bool,
    /// No progress bar (it is only drawn when stderr is a terminal anyway).
    #[arg(long)]
    pub quiet: bool,
}

impl ReplayArgs {
    pub fn options(&self) -> crate::replay::ReplayOptions {
        crate::replay::ReplayOptions {
            inputs: self.inputs.clone(),
            source: self.source.clone(),
            data_dir: self.data_dir.clone(),
            set: self.set.clone(),
            map: self.map.clone(),
            key_from_file: self.key_from_file.clone(),
            time_column: self.time_column.clone(),
            batch_rows: self.batch_rows,
            csv: self.csv,
            progress: !self.quiet,
        }
    }
}

impl RunArgs {
    /// `--shards`, or the default for this machine.
    pub fn shards(&self) -> usize {
        self.shards.unwrap_or_else(crate::device::default_shards)
    }

    pub fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        let broker = match &self.broker {
            Some(b) => {
                let mut url = BrokerUrl::parse(b).map_err(|e| anyhow::anyhow!(e))?;
                url.ca_file = self.ca_file.clone();
                Some(url)
            }
            None => None,
        };
        Ok(EngineConfig {
            pipelines: self.pipelines.clone(),
            watch: self.watch,
            broker,
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            metrics_addr: self.metrics_addr,
            client_id: self.client_id.clone(),
            simulate: self.simulate,
            simulate_interval: self.simulate_interval,
            device_idle_timeout: self.device_idle_timeout,
            flush_interval: Duration::from_millis(20),
            roll: RollPolicy {
                max_bytes: self.parquet_roll_bytes,
                max_age: self.commit_interval,
            },
            max_backlog: self.max_backlog_bytes,
            linger: self.linger.unwrap_or(crate::ingest::Linger::DEFAULT),
            fsync: self.fsync,
            drain_on_stop: self.drain,
            shards: self.shards(),
        })
    }
}

/// Logging when RUST_LOG is unset. The embedded broker logs every dropped client
/// connection as an error, and its router one more ("no-connection id N is already
/// gone") for each client still connected when the engine stops; its own failures are
/// reported by the engine.
const DEFAULT_LOG: &str = "info,rumqttd=warn,rumqttd::server::broker=off,\
                           rumqttd::router::routing=off,rumqttc=warn";

/// Entry point of the binary; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        .init();
    // A file-size limit (ulimit -f) must fail a write with an error the engine reports and
    // stops on cleanly, like a full disk, rather than kill the process with SIGXFSZ.
    // SAFETY: setting a signal's disposition to "ignore" runs no code in a handler.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    // `run` sizes its runtime itself (see `RunArgs::runtime_threads`); the other commands
    // take tokio's default, one worker per core.
    if let Command::Run(args) = &cli.command {
        rt.worker_threads(args.runtime_threads.into());
    }
    let rt = match rt.enable_all().thread_name("fleetsql").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    // With no shard threads (`run --shards 0`, the default on two cores, or `bench core
    // --shards 0`) the command runs on an actix system's current-thread runtime, where the
    // one shard's actors are started beside ingest and the runner (device::start_shards).
    let shards = match &cli.command {
        Command::Run(a) => a.shards(),
        Command::Bench(crate::bench::BenchCommand::Core {
            shards: Some(0), ..
        }) => 0,
        _ => 1,
    };
    let main = async move {
        match cli.command {
            Command::Check { pipelines } => match crate::pipeline::load(&pipelines).await {
                Ok(p) => {
                    println!(
                        "ok: {} source(s), {} sink(s), {} quer{}",
                        p.sources.len(),
                        p.sinks.len(),
                        p.queries.len(),
                        if p.queries.len() == 1 { "y" } else { "ies" }
                    );
                    0
                }
                Err(d) => {
                    eprintln!("{d}");
                    1
                }
            },
            Command::Explain { pipelines } => match crate::pipeline::load(&pipelines).await {
                Ok(p) => {
                    print!("{}", crate::pipeline::explain(&p));
                    0
                }
                Err(d) => {
                    eprintln!("{d}");
                    1
                }
            },
            Command::Bench(cmd) => crate::bench::main(cmd).await,
            Command::Replay(args) => {
                let pipeline = match crate::pipeline::load(&args.pipelines).await {
                    Ok(p) => p,
                    Err(d) => {
                        eprintln!("{d}");
                        return 2;
                    }
                };
                // Refused before a row is written (files, columns, options): exit 2, as
                // for a bad pipeline; a failure while replaying: exit 1.
                let replay = match crate::replay::Replay::prepare(pipeline, args.options()) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        return 2;
                    }
                };
                match replay.run().await {
                    Ok(summary) => {
                        eprintln!("{summary}");
                        0
                    }
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        1
                    }
                }
            }
            Command::Run(args) => {
                let pipeline = match crate::pipeline::load(&args.pipelines).await {
                    Ok(p) => p,
                    Err(d) => {
                        eprintln!("{d}");
                        return 2;
                    }
                };
                let cfg = match args.engine_config() {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return 2;
                    }
                };
                match crate::engine::run(cfg, pipeline, shutdown_signal()).await {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        1
                    }
                }
            }
        }
    };
    crate::device::block_on(shards, rt, main)
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}
