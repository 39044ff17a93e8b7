//! Micro-benchmarks of the engine's hot path, one stage at a time, in the order a reading
//! meets them:
//!
//! - [`Decode`]: JSON payloads -> one Arrow batch per source (`decode::SourceDecoder`);
//! - [`ActorHop`]: readings handed to the shard routers (`device::Ingest`), through one
//!   actix actor per device into the shard's buffer, decoded, and on the engine's channel;
//! - [`WindowClose`]: a TUMBLE window's rows added to its panes and the window closed
//!   (`engine::window::Windows`);
//! - [`Query`]: a compiled per-device `avg/min/max` GROUP BY run over one closed window,
//!   as the runner does (window bounds added, the input slot filled, the cached plan run);
//! - [`ParquetWrite`]: a batch of raw rows written by the Parquet sink
//!   (`sink::parquet::ParquetTable`), the file finished and synced.
//!
//! Each is a [`Body`]: built for a size (setup, not timed), it makes one iteration's input
//! ([`Body::input`], not timed) and runs one iteration ([`Body::run`], timed), returning
//! what it produced so a caller can check it. `benches/micro.rs` times them with criterion
//! (`cargo bench --bench micro`); the test suite runs each once at a tiny size and checks
//! that rows out equal rows in (tests/it/bench.rs).
//!
//! Every body works on the same pipeline ([`PIPELINE`]): readings like `{"light": 412}`
//! and `{"temperature": 37, "humidity": 55}` from devices `dev-00000`, `dev-00001`, ...,
//! ten readings per device (a 10-second TUMBLE window at one reading a second).

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use datafusion::arrow::array::{Array, AsArray, TimestampMillisecondArray};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{Int64Type, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::TaskContext;
use tokio::sync::mpsc;

use crate::decode::{MAX_BUFFERED_ROWS, Message, SourceDecoder, SourceShape};
use crate::device::{Ingest, Kind, Reading, Shards, flush_shards, start_shards};
use crate::engine::EngineEvent;
use crate::engine::backlog::Backlog;
use crate::engine::window::Windows;
use crate::metrics::Metrics;
use crate::pipeline::CompiledPipeline;
use crate::pipeline::compile::WindowTable;

/// One benchmark: setup in its constructor, then any number of iterations.
pub trait Body {
    type Input;
    type Output;
    /// A fresh input for one iteration (not timed).
    fn input(&self) -> Self::Input;
    /// One iteration (timed).
    fn run(&mut self, input: Self::Input) -> impl Future<Output = anyhow::Result<Self::Output>>;
}

/// Runs one iteration: the smoke tests' entry.
pub async fn once<B: Body>(body: &mut B) -> anyhow::Result<B::Output> {
    let input = body.input();
    body.run(input).await
}

/// The pipeline every body works on: two sources, and a per-device summary of one of them
/// every 10 seconds.
pub const PIPELINE: &str = "\
CREATE TABLE light (light DOUBLE NOT NULL)
  WITH (connector = 'mqtt', type = 'source', topic = 'fleet/{device_id}/light');
CREATE TABLE climate (temperature DOUBLE NOT NULL, humidity DOUBLE NOT NULL)
  WITH (connector = 'mqtt', type = 'source', topic = 'fleet/{device_id}/climate');
CREATE TABLE climate_10s WITH (connector = 'parquet');
INSERT INTO climate_10s
SELECT window_start, window_end, device_id, count(*) AS n,
       avg(temperature) AS avg_temperature, min(temperature) AS min_temperature,
       max(temperature) AS max_temperature,
       avg(humidity) AS avg_humidity, min(humidity) AS min_humidity,
       max(humidity) AS max_humidity
FROM TUMBLE(climate, event_time, INTERVAL '10 seconds')
GROUP BY window_start, window_end, device_id;
";

/// The window every reading falls in: 2026-01-01T00:00:00Z and 10 seconds on.
pub const WINDOW_START: i64 = 1_767_225_600_000;
pub const WINDOW_MS: i64 = 10_000;

/// Readings per device: a 10-second window at one reading a second.
pub const READINGS_PER_DEVICE: usize = 10;

/// Rows per batch reaching the runner in [`WindowClose`] and [`Query`]: what a shard
/// flushes every 20 ms at about 50k readings a second per shard.
pub const BATCH_ROWS: usize = 1024;

/// [`PIPELINE`], compiled.
pub async fn pipeline() -> anyhow::Result<CompiledPipeline> {
    let file = Arc::new(crate::pipeline::SourceFile {
        path: "micro.sql".into(),
        text: PIPELINE.to_string(),
    });
    let spec = crate::pipeline::parse::parse_files(&[file]).map_err(|d| anyhow::anyhow!("{d}"))?;
    crate::pipeline::compile(spec)
        .await
        .map_err(|d| anyhow::anyhow!("{d}"))
}

pub use super::load::Payload;

/// The source table a payload's readings go to in this module's pipeline.
pub fn source(payload: Payload) -> &'static str {
    match payload {
        Payload::Light => "light",
        Payload::Climate => "climate",
    }
}

/// Devices for `n` readings: [`READINGS_PER_DEVICE`] each, at least one.
pub fn devices_for(n: usize) -> usize {
    (n / READINGS_PER_DEVICE).max(1)
}

/// `n` readings from [`devices_for`]`(n)` devices taking turns, received evenly over the
/// window (receive time is the sources' event time).
pub fn messages(payload: Payload, n: usize) -> Vec<Message> {
    let devices = devices_for(n);
    let topics: Vec<String> = (0..devices)
        .map(|d| format!("fleet/dev-{d:05}/{}", source(payload)))
        .collect();
    let mut buf = Vec::new();
    (0..n)
        .map(|i| {
            payload.reading(i % devices, i / devices, &mut buf);
            Message {
                topic: topics[i % devices].clone(),
                payload: Bytes::copy_from_slice(&buf),
                received_at: WINDOW_START + (i as i64 * WINDOW_MS) / n as i64,
            }
        })
        .collect()
}

fn shape(p: &CompiledPipeline, source: &str) -> anyhow::Result<Arc<SourceShape>> {
    let s = p
        .sources
        .iter()
        .find(|s| s.spec.name == source)
        .with_context(|| format!("no source {source}"))?;
    Ok(Arc::new(SourceShape::new(s)))
}

/// Feeds `msgs` through `decoder`, flushing every `batch_rows` (at most
/// [`MAX_BUFFERED_ROWS`], as a shard buffer does); fails on any dead letter.
fn decode_into(
    decoder: &mut SourceDecoder,
    msgs: Vec<Message>,
    batch_rows: usize,
    out: &mut Vec<RecordBatch>,
) -> anyhow::Result<()> {
    let batch_rows = batch_rows.clamp(1, MAX_BUFFERED_ROWS);
    let mut flush = |decoder: &mut SourceDecoder| -> anyhow::Result<()> {
        let (batch, dead) = decoder.flush();
        if let Some(d) = dead.first() {
            bail!("{} dead letters, the first: {}", dead.len(), d.error);
        }
        out.extend(batch);
        Ok(())
    };
    for m in msgs {
        decoder.push(m);
        if decoder.len() >= batch_rows {
            flush(decoder)?;
        }
    }
    flush(decoder)
}

/// `n` decoded rows of `payload`'s source in batches of `batch_rows`, with the source's
/// row schema.
async fn rows(payload: Payload, n: usize, batch_rows: usize) -> anyhow::Result<Vec<RecordBatch>> {
    let p = pipeline().await?;
    let mut decoder = SourceDecoder::new(shape(&p, source(payload))?)?;
    let mut out = Vec::new();
    decode_into(&mut decoder, messages(payload, n), batch_rows, &mut out)?;
    Ok(out)
}

fn total_rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(|b| b.num_rows()).sum()
}

/// JSON payloads to Arrow: `n` messages pushed into a source's decoder and flushed (every
/// [`MAX_BUFFERED_ROWS`], as a shard buffer does). Output: rows decoded.
pub struct Decode {
    decoder: SourceDecoder,
    msgs: Vec<Message>,
}

impl Decode {
    pub async fn new(payload: Payload, n: usize) -> anyhow::Result<Decode> {
        let p = pipeline().await?;
        Ok(Decode {
            decoder: SourceDecoder::new(shape(&p, source(payload))?)?,
            msgs: messages(payload, n),
        })
    }
}

impl Body for Decode {
    type Input = Vec<Message>;
    type Output = usize;

    fn input(&self) -> Vec<Message> {
        self.msgs.clone()
    }

    async fn run(&mut self, msgs: Vec<Message>) -> anyhow::Result<usize> {
        let mut out = Vec::with_capacity(1);
        decode_into(&mut self.decoder, msgs, MAX_BUFFERED_ROWS, &mut out)?;
        Ok(total_rows(&out))
    }
}

/// Shard routers in the benchmark, as on a two-core box (`fleetsql run`'s default is one
/// per core).
pub const SHARDS: usize = 2;

/// Messages the topic router takes at once (its `recv_many`), then hands on as one
/// `Ingest` per shard.
const ROUTER_CHUNK: usize = 4096;

/// The device-actor hop: `n` climate readings from [`devices_for`]`(n)` devices handed to
/// [`SHARDS`] shard routers as `Ingest` messages (chunked and hashed to shards as the
/// topic router does, outside the timing), each sent on to its device's actor, appended
/// to the shard's buffer, decoded, and put on the engine's channel; the iteration ends
/// when `flush_shards` has every row on the channel, and takes them off it.
///
/// Every device's actor exists before the first iteration (the steady state; an actor is
/// created on a device's first message and lives until it has been idle for the idle
/// timeout). `flush_shards` waits until each shard's actors have pushed every reading
/// routed to them (the shard's in-flight count reaches zero), as a checkpoint's flush
/// does; the routers' own timer flushes (set to an hour here) do not run.
/// Output: rows that reached the engine's channel.
pub struct ActorHop {
    shards: Option<Shards>,
    rx: mpsc::UnboundedReceiver<EngineEvent>,
    shapes: Vec<Arc<SourceShape>>,
    msgs: Vec<Message>,
    hasher: RandomState,
}

impl ActorHop {
    /// Starts the shards (an actix system on its own threads) and runs one iteration, so
    /// every device's actor exists.
    pub async fn new(n: usize) -> anyhow::Result<ActorHop> {
        let p = pipeline().await?;
        let shapes: Vec<Arc<SourceShape>> = p
            .sources
            .iter()
            .map(|s| Arc::new(SourceShape::new(s)))
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = Metrics::new();
        let shards = start_shards(
            SHARDS,
            shapes.clone(),
            tx,
            metrics.clone(),
            Duration::from_secs(3600),
            Duration::from_secs(3600),
            None,
            Arc::new(Backlog::new(usize::MAX, metrics)),
        )?;
        let mut hop = ActorHop {
            shards: Some(shards),
            rx,
            shapes,
            msgs: messages(Payload::Climate, n),
            hasher: RandomState::new(),
        };
        let rows = once(&mut hop).await?;
        if rows != n {
            bail!("{rows} rows reached the engine of {n} readings");
        }
        Ok(hop)
    }

    fn routers(&self) -> &[actix::Addr<crate::device::ShardRouter>] {
        self.shards.as_ref().map_or(&[], |s| &s.routers[..])
    }
}

impl Drop for ActorHop {
    fn drop(&mut self) {
        if let Some(s) = self.shards.take() {
            s.stop();
        }
    }
}

impl Body for ActorHop {
    /// Per topic-router chunk, the readings of each shard.
    type Input = Vec<Vec<Vec<Reading>>>;
    type Output = usize;

    fn input(&self) -> Self::Input {
        let shards = self.routers().len().max(1);
        self.msgs
            .chunks(ROUTER_CHUNK)
            .map(|chunk| {
                let mut per_shard: Vec<Vec<Reading>> = (0..shards).map(|_| Vec::new()).collect();
                for m in chunk {
                    let (source, device) =
                        crate::decode::route(&self.shapes, &m.topic).expect("a source's topic");
                    let h = self.hasher.hash_one(&m.topic[device.clone()]);
                    per_shard[(h % shards as u64) as usize].push(Reading {
                        kind: Kind::Source(source),
                        device,
                        msg: m.clone(),
                    });
                }
                per_shard
            })
            .collect()
    }

    async fn run(&mut self, chunks: Self::Input) -> anyhow::Result<usize> {
        let routers = self
            .shards
            .as_ref()
            .context("shards stopped")?
            .routers
            .clone();
        for per_shard in chunks {
            let sends: Vec<_> = per_shard
                .into_iter()
                .enumerate()
                .filter(|(_, r)| !r.is_empty())
                .map(|(i, r)| routers[i].send(Ingest(r)))
                .collect();
            for r in futures::future::join_all(sends).await {
                r?;
            }
        }
        flush_shards(&routers).await;
        let mut rows = 0;
        while let Ok(event) = self.rx.try_recv() {
            match event {
                EngineEvent::Rows { batch, .. } => rows += batch.num_rows(),
                EngineEvent::DeadLetters(d) => bail!("{} dead letters", d.len()),
                _ => {}
            }
        }
        Ok(rows)
    }
}

/// A TUMBLE window closing: `n` climate rows (batches of [`BATCH_ROWS`], all in one
/// 10-second window) added to the query's panes, then the watermark passes the window's
/// end and it closes. The panes are fresh each iteration. Output: rows in the closed
/// window.
pub struct WindowClose {
    pipeline: CompiledPipeline,
    batches: Vec<RecordBatch>,
    event_time: usize,
}

impl WindowClose {
    pub async fn new(n: usize) -> anyhow::Result<WindowClose> {
        let pipeline = pipeline().await?;
        let w = pipeline.queries[0].window.as_ref().context("a window")?;
        let event_time = pipeline.streams[w.inputs[0].stream]
            .event_time
            .context("an event time")?;
        Ok(WindowClose {
            batches: rows(Payload::Climate, n, BATCH_ROWS).await?,
            pipeline,
            event_time,
        })
    }
}

impl Body for WindowClose {
    type Input = Windows;
    type Output = usize;

    /// The query's windows before its first row, as the runner makes them.
    fn input(&self) -> Windows {
        let w = self.pipeline.queries[0]
            .window
            .as_ref()
            .expect("a windowed query");
        Windows::new(
            &w.kind,
            w.inputs.len(),
            w.session_keys.clone(),
            &self.pipeline.streams[w.inputs[0].stream].schema,
        )
    }

    async fn run(&mut self, mut windows: Windows) -> anyhow::Result<usize> {
        for b in &self.batches {
            let late = windows.add(0, b, self.event_time);
            if late.rows() > 0 {
                bail!("{} rows late", late.rows());
            }
        }
        let closed = windows.close_until(WINDOW_START + WINDOW_MS);
        if closed.len() != 1 {
            bail!("{} windows closed, expected one", closed.len());
        }
        Ok(closed[0].rows())
    }
}

/// The per-device summary query ([`PIPELINE`]) over one closed window of `n` climate rows
/// from [`devices_for`]`(n)` devices, as the runner runs it: window bounds added to each
/// batch, the window table's slot filled, the cached physical plan executed, the slot
/// cleared. Output: the query's rows (one per device; [`summary_counts`] reads them).
pub struct Query {
    pipeline: CompiledPipeline,
    task_ctx: Arc<TaskContext>,
    batches: Vec<RecordBatch>,
}

impl Query {
    pub async fn new(n: usize) -> anyhow::Result<Query> {
        let pipeline = pipeline().await?;
        Ok(Query {
            task_ctx: pipeline.ctx.task_ctx(),
            batches: rows(Payload::Climate, n, BATCH_ROWS).await?,
            pipeline,
        })
    }

    fn input_table(&self) -> &WindowTable {
        &self.pipeline.queries[0]
            .window
            .as_ref()
            .expect("a windowed query")
            .inputs[0]
    }
}

/// A batch's columns with `window_start` and `window_end` added (what the runner's
/// `run_window` does before running a windowed query).
fn with_bounds(
    schema: &SchemaRef,
    b: &RecordBatch,
    start: i64,
    end: i64,
) -> anyhow::Result<RecordBatch> {
    let n = b.num_rows();
    let mut cols = b.columns().to_vec();
    cols.push(Arc::new(
        TimestampMillisecondArray::from_value(start, n).with_timezone(crate::time::TZ),
    ));
    cols.push(Arc::new(
        TimestampMillisecondArray::from_value(end, n).with_timezone(crate::time::TZ),
    ));
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

impl Body for Query {
    type Input = ();
    type Output = Vec<RecordBatch>;

    fn input(&self) {}

    async fn run(&mut self, (): ()) -> anyhow::Result<Vec<RecordBatch>> {
        let input = self.input_table();
        let with = self
            .batches
            .iter()
            .map(|b| with_bounds(&input.schema, b, WINDOW_START, WINDOW_START + WINDOW_MS))
            .collect::<anyhow::Result<Vec<_>>>()?;
        input.slot.set(with);
        let out = self.pipeline.queries[0]
            .execute(self.task_ctx.clone())
            .await;
        input.slot.clear();
        Ok(out?)
    }
}

/// Groups in the summary query's result, and the readings they count (its `n` summed).
pub fn summary_counts(batches: &[RecordBatch]) -> anyhow::Result<(usize, i64)> {
    let mut readings = 0;
    for b in batches {
        let n = b
            .column_by_name("n")
            .context("no column n")?
            .as_primitive_opt::<Int64Type>()
            .context("n is not BIGINT")?;
        readings += n.iter().flatten().sum::<i64>();
        if n.null_count() > 0 {
            bail!("null counts");
        }
    }
    Ok((total_rows(batches), readings))
}

/// The Parquet sink: one batch of `n` raw climate rows written to a table
/// (`ParquetTable`: its writer thread, zstd, the file finished and synced by `seal`).
/// Rows are counted from the finished files' footers, and the files removed, both inside
/// the timing (both are small next to the encoding). Output: rows in the files.
pub struct ParquetWrite {
    table: Option<crate::sink::parquet::ParquetTable>,
    batch: RecordBatch,
}

impl ParquetWrite {
    /// The table goes in `dir`, which the caller cleans up.
    pub async fn new(n: usize, dir: &Path) -> anyhow::Result<ParquetWrite> {
        let batches = rows(Payload::Climate, n, MAX_BUFFERED_ROWS).await?;
        let schema = batches.first().context("no rows")?.schema();
        let batch = concat_batches(&schema, &batches)?;
        let table = crate::sink::parquet::ParquetTable::open(
            dir,
            "climate",
            schema,
            crate::sink::parquet::RollPolicy::default(),
            Metrics::new(),
        )?;
        Ok(ParquetWrite {
            table: Some(table),
            batch,
        })
    }
}

impl Drop for ParquetWrite {
    fn drop(&mut self) {
        if let Some(t) = self.table.take() {
            t.close();
        }
    }
}

impl Body for ParquetWrite {
    type Input = RecordBatch;
    type Output = usize;

    fn input(&self) -> RecordBatch {
        self.batch.clone()
    }

    async fn run(&mut self, batch: RecordBatch) -> anyhow::Result<usize> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let table = self.table.as_ref().context("table closed")?;
        table.write(batch);
        let staged = table.seal().await.map_err(anyhow::Error::msg)?;
        let mut rows = 0;
        for s in staged {
            let reader = SerializedFileReader::new(std::fs::File::open(&s.staging)?)?;
            rows += reader.metadata().file_metadata().num_rows() as usize;
            std::fs::remove_file(&s.staging)?;
        }
        Ok(rows)
    }
}
