//! The engine: wires broker, ingest, device shards, the pipeline runner and the sinks
//! together, and takes them down in order on shutdown so every open window and file is
//! flushed.

pub mod backlog;
pub mod dedupe;
pub mod local;
pub mod runner;
pub mod window;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, oneshot, watch};

use crate::decode::{DeadLetter, SourceShape};
use crate::metrics::Metrics;
use crate::mqtt::BrokerUrl;
use crate::pipeline::CompiledPipeline;
use crate::pipeline::parse::SinkKind;
use crate::sink::commands::CommandPublisher;
use crate::sink::parquet::{ParquetTable, RollPolicy};
pub use runner::{
    AHEAD, DEAD_LETTERS, LATE, LATE_ROWS, Output, Outputs, Runner, dead_letter_schema,
    late_rows_schema,
};

/// What flows from the shards (and the topic router) to the pipeline runner.
pub enum EngineEvent {
    /// Rows of a root stream: a source (same index) or the presence stream.
    Rows {
        stream: usize,
        batch: RecordBatch,
    },
    DeadLetters(Vec<DeadLetter>),
    /// Everything before log position `wal_next` has been delivered: commit it with the
    /// runner's state (`durable::checkpoint`), and answer.
    Checkpoint {
        wal_next: u64,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Everything sent before has been delivered: close every window (`drain`) or keep
    /// them for the next start, take a last checkpoint when `checkpoint` is the position,
    /// answer and stop.
    Finish {
        drain: bool,
        checkpoint: Option<u64>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Reload the pipeline files; answers with a summary or why the new files were refused.
    Reload(oneshot::Sender<Result<String, String>>),
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The pipeline files, read again on a reload.
    pub pipelines: Vec<PathBuf>,
    /// Reload when a pipeline file changes (SIGHUP reloads in any case).
    pub watch: bool,
    /// External broker; the embedded one on `listen` when absent.
    pub broker: Option<BrokerUrl>,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub metrics_addr: SocketAddr,
    pub client_id: String,
    pub simulate: usize,
    pub simulate_interval: Duration,
    pub device_idle_timeout: Duration,
    pub flush_interval: Duration,
    pub roll: RollPolicy,
    /// Device shards, one arbiter thread each; `0`: one shard on the caller's actix
    /// system (`run` must then be called inside one).
    pub shards: usize,
    /// Bytes of decoded rows that may wait for the pipeline runner before ingest pauses.
    pub max_backlog: usize,
    /// Under load, how long the topic router may hold a small batch of readings to send
    /// it on with the readings that follow (see `ingest::Linger`); zero: never.
    pub linger: Duration,
    /// When the write-ahead log is forced to disk.
    pub fsync: crate::durable::wal::Fsync,
    /// On stop, close every open window (their results are then final) rather than keep
    /// them for the next start.
    pub drain_on_stop: bool,
}

impl EngineConfig {
    /// The engine in process, for benchmarks and tests: the embedded broker (for command
    /// sinks) on a free loopback port, metrics on an ephemeral port, files committed every
    /// two seconds; the rest as `fleetsql run`'s defaults. Adjust fields as needed.
    pub fn in_process(pipelines: Vec<PathBuf>, data_dir: PathBuf) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Ok(EngineConfig {
            pipelines,
            watch: false,
            broker: None,
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            data_dir,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            client_id: format!("in-process-{port}"),
            simulate: 0,
            simulate_interval: Duration::from_secs(1),
            device_idle_timeout: Duration::from_secs(300),
            flush_interval: Duration::from_millis(20),
            roll: RollPolicy {
                max_bytes: 128 << 20,
                max_age: Duration::from_secs(2),
            },
            shards: 2,
            max_backlog: 64 << 20,
            linger: crate::ingest::Linger::DEFAULT,
            fsync: crate::durable::wal::Fsync::Always,
            drain_on_stop: false,
        })
    }
}

/// Where telemetry comes from.
pub enum Input {
    /// The broker: the engine subscribes to the pipeline's topics. The normal case.
    Mqtt,
    /// Messages handed in by the caller, already stamped with their receive time. The
    /// benchmarks drive the whole engine but the MQTT client this way; the engine stops
    /// when the sender is dropped (or `stop` resolves), closing every window. Nothing is
    /// logged: a crash loses what was handed in since the last checkpoint.
    Channel(mpsc::Receiver<crate::decode::Message>),
}

/// Runs the pipeline until `stop` resolves, then shuts down cleanly.
pub async fn run(
    cfg: EngineConfig,
    pipeline: CompiledPipeline,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with(cfg, pipeline, Input::Mqtt, Metrics::new(), stop).await
}

/// [`run`], with telemetry from `input` and the caller's metrics registry (which the
/// benchmarks read in process).
pub async fn run_with(
    cfg: EngineConfig,
    pipeline: CompiledPipeline,
    input: Input,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    metrics.init_series(&pipeline);
    let (metrics_addr, metrics_task) =
        crate::metrics::serve(cfg.metrics_addr, metrics.clone()).await?;
    tracing::info!("metrics on http://{metrics_addr}/metrics");

    let broker = match &cfg.broker {
        Some(b) => b.clone(),
        None => {
            crate::broker::start(cfg.listen)?;
            BrokerUrl::local(cfg.listen)
        }
    };

    // What an earlier run left: the checkpoint's files are published before the tables
    // open (which deletes any other staging file), and the log after it is replayed.
    let recovery = crate::durable::recover(&cfg.data_dir)?;

    // Tables first: a data dir we cannot write is an error before anything is consumed.
    let mut names: Vec<&str> = pipeline
        .sources
        .iter()
        .map(|s| s.spec.name.as_str())
        .collect();
    names.extend(pipeline.sinks.iter().map(|s| s.spec.name.as_str()));
    for reserved in [DEAD_LETTERS, LATE_ROWS] {
        if names.contains(&reserved) {
            anyhow::bail!("`{reserved}` is a table of the engine's own; name your table otherwise");
        }
    }
    let table = |name: &str, schema| {
        ParquetTable::open(&cfg.data_dir, name, schema, cfg.roll, metrics.clone())
    };
    let raw = pipeline
        .sources
        .iter()
        .map(|s| table(&s.spec.name, s.row_schema.clone()).map(Output::Parquet))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let dead_letters = table(DEAD_LETTERS, dead_letter_schema())?;
    let late_rows = table(LATE_ROWS, late_rows_schema())?;

    let (stop_tx, stop_rx) = watch::channel(false);
    // Always connected, so a reload that adds an MQTT sink has a publisher to use.
    let (commands, commands_task) = CommandPublisher::start(
        &broker,
        &format!("{}-commands", cfg.client_id),
        metrics.clone(),
        stop_rx.clone(),
    )?;
    // How a sink gets its output, at start and when a reload adds one.
    let open_sink = {
        let (data_dir, roll, metrics, commands) = (
            cfg.data_dir.clone(),
            cfg.roll,
            metrics.clone(),
            commands.clone(),
        );
        move |s: &crate::pipeline::compile::CompiledSink| -> anyhow::Result<Output> {
            Ok(match &s.spec.kind {
                SinkKind::Parquet => Output::Parquet(ParquetTable::open(
                    &data_dir,
                    &s.spec.name,
                    s.schema.clone(),
                    roll,
                    metrics.clone(),
                )?),
                SinkKind::Mqtt { .. } => Output::Commands(commands.clone()),
            })
        }
    };
    let sinks = pipeline
        .sinks
        .iter()
        .map(&open_sink)
        .collect::<anyhow::Result<Vec<_>>>()?;

    let shapes: Vec<Arc<SourceShape>> = pipeline
        .sources
        .iter()
        .map(|s| Arc::new(SourceShape::new(s)))
        .collect();
    let qos: Vec<u8> = pipeline.sources.iter().map(|s| s.spec.qos).collect();
    // The channel is unbounded in messages but bounded in bytes by the backlog.
    let (tx, rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(backlog::Backlog::new(cfg.max_backlog, metrics.clone()));
    let shards = crate::device::start_shards(
        cfg.shards,
        shapes.clone(),
        tx.clone(),
        metrics.clone(),
        cfg.device_idle_timeout,
        cfg.flush_interval,
        crate::device::PresenceConfig::of(&pipeline),
        backlog.clone(),
    )?;

    let outputs = Outputs {
        raw,
        sinks,
        dead_letters: Output::Parquet(dead_letters),
        late_rows: Output::Parquet(late_rows),
    };
    let sim_plan = crate::simulate::Plan::from_pipeline(&pipeline);
    let pipeline_status = pipeline
        .presence
        .as_ref()
        .and_then(|(p, _)| p.status.as_ref().map(|s| s.topic.clone()));
    let runner = Runner::new(pipeline, outputs, metrics.clone())
        .with_reload(runner::ReloadContext {
            paths: cfg.pipelines.clone(),
            open_sink: Box::new(open_sink),
        })
        .with_backlog(backlog.clone())
        .closing_a_tick_late()
        .with_checkpoints(cfg.data_dir.clone(), recovery.checkpoint);
    let runner = tokio::spawn(runner.run(rx));
    let reloads = tokio::spawn(reload_triggers(
        cfg.pipelines.clone(),
        cfg.watch,
        tx.clone(),
        metrics.clone(),
        stop_rx.clone(),
    ));
    let from_channel = matches!(input, Input::Channel(_));
    let wal = recovery.wal;
    let replay: Vec<_> = wal.replay.into_iter().map(|l| l.msg).collect();
    let router = crate::ingest::Router {
        sources: shapes.clone(),
        status: pipeline_status.clone(),
        shards: shards.routers.clone(),
        engine: tx.clone(),
        backlog: backlog.clone(),
        metrics: metrics.clone(),
        position: wal.next_seq - replay.len() as u64,
        checkpoint_interval: cfg.roll.max_age,
        // At any QoS: at QoS 1 the broker delivers in smaller pieces than at QoS 0, so
        // grouping saves more there (a third of the CPU at a paced 60k readings/s), though
        // flat out it cost the filter benchmark a fifth of its rate (docs/benchmarks.md,
        // eleventh round). Off unless asked for.
        linger: (!cfg.linger.is_zero()).then(|| crate::ingest::Linger::new(cfg.linger)),
        unflushed: 0,
        durable: None,
    };
    let ingest = match input {
        Input::Mqtt => tokio::spawn(crate::ingest::run(
            crate::ingest::IngestConfig {
                broker: broker.clone(),
                client_id: cfg.client_id.clone(),
                sources: shapes,
                qos,
                status: pipeline_status,
                wal: crate::durable::wal::Wal::new(
                    crate::durable::wal::dir(&cfg.data_dir),
                    cfg.fsync,
                    cfg.roll.max_age,
                    wal.next_seq,
                ),
                redeliveries: wal.redeliveries,
            },
            router,
            replay,
            stop_rx.clone(),
        )),
        Input::Channel(rx) => {
            tokio::spawn(async move { router.run(replay, rx).await.map_err(anyhow::Error::msg) })
        }
    };
    let sim = if cfg.simulate > 0 {
        Some(tokio::spawn(crate::simulate::run(
            sim_plan,
            broker.clone(),
            cfg.simulate,
            cfg.simulate_interval,
            stop_rx.clone(),
        )))
    } else {
        None
    };
    tracing::info!(broker = %broker, data_dir = %cfg.data_dir.display(), "fleetsql running; Ctrl-C to stop");

    let mut ingest = ingest;
    let mut drain = cfg.drain_on_stop;
    let position = tokio::select! {
        _ = stop => {
            tracing::info!("stopping: committing files and state");
            None
        }
        r = &mut ingest => {
            let r = r.map_err(anyhow::Error::from).and_then(|r| r);
            if !from_channel || r.is_err() {
                // MQTT ingest only ends on its own when it cannot go on (the log or a
                // checkpoint cannot be written): stop at once, without committing
                // anything more; the next start resumes from the last checkpoint.
                let _ = stop_tx.send(true);
                return r.and(Err(anyhow::anyhow!("ingest stopped unexpectedly")));
            }
            // The caller's input ended: shut down as if stopped, closing every window.
            tracing::info!("input ended: closing open windows, committing files");
            drain = true;
            r.ok()
        }
    };

    // Order matters: stop taking messages, push what the shards hold to the runner, let the
    // runner checkpoint (closing every window first when draining), then let the last
    // commands go out.
    let _ = stop_tx.send(true);
    if let Some(sim) = sim {
        let _ = sim.await;
    }
    let position = match position {
        Some(p) => p,
        None => match ingest.await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                reloads.abort();
                return Err(e);
            }
            Err(e) => return Err(e.into()),
        },
    };
    reloads.abort();
    shards.flush().await;
    let (done_tx, done_rx) = oneshot::channel();
    let _ = tx.send(EngineEvent::Finish {
        drain,
        checkpoint: Some(position),
        done: done_tx,
    });
    let finished = done_rx
        .await
        .unwrap_or_else(|_| Err("the pipeline runner is gone".into()));
    let outputs = runner.await?;
    tokio::task::spawn_blocking(move || outputs.close()).await?;
    commands.close().await;
    let _ = commands_task.await;
    shards.stop();
    metrics_task.abort();
    finished.map_err(|e| {
        anyhow::anyhow!(
            "the last checkpoint failed: {e}; the next start resumes from the one before"
        )
    })?;
    tracing::info!("stopped");
    Ok(())
}

/// Asks the runner to reload on SIGHUP and, with `watch`, when a pipeline file changes
/// (checked twice a second by size and modification time).
async fn reload_triggers(
    paths: Vec<PathBuf>,
    watch: bool,
    runner: mpsc::UnboundedSender<EngineEvent>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).ok();
    let stamp = |paths: &[PathBuf]| -> Vec<Option<(std::time::SystemTime, u64)>> {
        paths
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    };
    let mut seen = stamp(&paths);
    // A change is acted on once the files have stayed the same for a poll: an editor or a
    // copy may write a file in several steps, and a half-written file must not be loaded.
    let mut changing = None;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        let why = tokio::select! {
            _ = stop.changed() => return,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
            _ = poll.tick(), if watch => {
                let now = stamp(&paths);
                if now == seen {
                    changing = None;
                    continue;
                }
                if changing.as_ref() != Some(&now) {
                    changing = Some(now);
                    continue;
                }
                seen = now;
                changing = None;
                "a pipeline file changed"
            }
        };
        let (answer, result) = oneshot::channel();
        if runner.send(EngineEvent::Reload(answer)).is_err() {
            return;
        }
        match result.await {
            // Logged, then counted: whoever sees the count finds the line in the log.
            Ok(Ok(summary)) => {
                tracing::info!("pipeline reloaded ({why}): {summary}");
                metrics.pipeline_reloads.with_label_values(&["ok"]).inc();
            }
            Ok(Err(e)) => {
                tracing::error!(
                    "pipeline reload refused ({why}); the running pipeline stays:\n{e}"
                );
                metrics
                    .pipeline_reloads
                    .with_label_values(&["refused"])
                    .inc();
            }
            Err(_) => return,
        }
    }
}
