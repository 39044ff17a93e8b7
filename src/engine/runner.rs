//! The pipeline runner: the one task that sees every row. It archives raw rows and dead
//! letters, computes views and micro-batch queries as rows arrive, assigns rows to
//! windows, closes windows as watermarks pass, runs the compiled plans and hands results
//! to the outputs.
//!
//! Time comes from the caller (`now` arguments), so the same runner is driven by the wall
//! clock in the engine and by recorded times in golden tests and replays. It runs on a
//! multi-thread tokio runtime, as DataFusion expects, never on an actix arbiter.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::TaskContext;
use tokio::sync::mpsc::UnboundedReceiver;

use super::EngineEvent;
use super::dedupe::Dedupe;
use super::window::{Closed, RECEIVE_TIME_SLACK_MS, SourceClock, Windows};
use crate::decode::DeadLetter;
use crate::metrics::Metrics;
use crate::pipeline::compile::{CompiledPipeline, CompiledSink, EventTime, StreamKind, ts_type};
use crate::pipeline::parse::SinkKind;
use crate::pipeline::reference::Reload;
use crate::sink::commands::CommandPublisher;
use crate::sink::parquet::ParquetTable;

pub const DEAD_LETTERS: &str = "dead_letters";
pub const LATE_ROWS: &str = "late_rows";
/// `late_rows.reason` of a row whose window had closed.
pub const LATE: &str = "late";
/// `late_rows.reason` of a row stamped too far in the future.
pub const AHEAD: &str = "ahead";

/// Rows a window query did not count: one table for every source, the row itself as JSON,
/// beside the columns a user filters on. `reason` is [`LATE`] (the window had closed) or
/// [`AHEAD`] (the event time was further ahead of the engine's clock than `max_future`).
pub fn late_rows_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("query", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("device_id", DataType::Utf8, true),
        Field::new("event_time", ts_type(), false),
        Field::new("received_at", ts_type(), true),
        Field::new("row", DataType::Utf8, false),
    ]))
}

fn late_rows_batch(
    source: &str,
    query: &str,
    reason: &str,
    event_time: usize,
    rows: &RecordBatch,
) -> anyhow::Result<RecordBatch> {
    use datafusion::arrow::array::new_null_array;
    use datafusion::arrow::compute::cast;
    let n = rows.num_rows();
    let text = |v: &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(v, n)))
    };
    let device: ArrayRef = match rows.column_by_name(crate::pipeline::parse::DEVICE_ID) {
        Some(c) => cast(c, &DataType::Utf8)?,
        None => new_null_array(&DataType::Utf8, n),
    };
    let received: ArrayRef = match rows.column_by_name(crate::pipeline::parse::RECEIVED_AT) {
        Some(c) if c.data_type() == &ts_type() => c.clone(),
        _ => new_null_array(&ts_type(), n),
    };
    let lines = StringArray::from(crate::sink::json_rows(rows)?);
    Ok(RecordBatch::try_new(
        late_rows_schema(),
        vec![
            text(source),
            text(query),
            text(reason),
            device,
            rows.column(event_time).clone(),
            received,
            Arc::new(lines),
        ],
    )?)
}

pub fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, true),
        Field::new("topic", DataType::Utf8, false),
        Field::new("payload", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("received_at", ts_type(), false),
    ]))
}

/// Where a table's rows go.
pub enum Output {
    Parquet(ParquetTable),
    /// An MQTT command sink: one message per row.
    Commands(CommandPublisher),
    /// Kept in memory: golden tests and anything that inspects results in process.
    Capture(Arc<Mutex<Vec<RecordBatch>>>),
    Discard,
}

impl Output {
    pub fn capture() -> (Output, Arc<Mutex<Vec<RecordBatch>>>) {
        let rows = Arc::new(Mutex::new(Vec::new()));
        (Output::Capture(rows.clone()), rows)
    }

    fn write_table(&self, batch: RecordBatch) {
        match self {
            Output::Parquet(t) => t.write(batch),
            Output::Capture(c) => c.lock().unwrap_or_else(|p| p.into_inner()).push(batch),
            Output::Commands(_) | Output::Discard => {}
        }
    }

    fn close(self) {
        if let Output::Parquet(t) = self {
            t.close();
        }
    }
}

/// Every output the runner writes to.
pub struct Outputs {
    /// Raw telemetry, one per source (same index).
    pub raw: Vec<Output>,
    /// One per sink (same index).
    pub sinks: Vec<Output>,
    pub dead_letters: Output,
    /// Rows too late for a window they belong to (they are in the raw table as well).
    pub late_rows: Output,
}

impl Outputs {
    /// Every Parquet table.
    fn parquet(&self) -> impl Iterator<Item = &ParquetTable> {
        self.raw
            .iter()
            .chain(&self.sinks)
            .chain([&self.dead_letters, &self.late_rows])
            .filter_map(|o| match o {
                Output::Parquet(t) => Some(t),
                _ => None,
            })
    }

    /// Stops every table's writer; blocking.
    pub fn close(self) {
        for t in self.raw.into_iter().chain(self.sinks) {
            t.close();
        }
        self.dead_letters.close();
        self.late_rows.close();
    }
}

/// A windowed query's windows before its first row.
fn empty_windows(p: &CompiledPipeline, query: usize) -> Option<Windows> {
    let w = p.queries[query].window.as_ref()?;
    let schema = &p.streams[w.inputs[0].stream].schema;
    Some(Windows::new(
        &w.kind,
        w.inputs.len(),
        w.session_keys.clone(),
        schema,
    ))
}

/// A stream's event-time clock: a source's declared `watermark_delay`, else 1 s for a
/// payload event time and the batching slack for receive time.
fn new_clock(p: &CompiledPipeline, stream: usize) -> SourceClock {
    match p.streams[stream].kind {
        StreamKind::Source(i) => {
            let s = &p.sources[i];
            let declared = s.spec.watermark_delay.map(|d| d.as_millis() as i64);
            let delay = match s.event_time {
                EventTime::Received => declared.unwrap_or(RECEIVE_TIME_SLACK_MS),
                EventTime::Field { .. } => declared.unwrap_or(1000),
            };
            SourceClock::new(delay, s.spec.max_future.as_millis() as i64)
        }
        // Presence rows are stamped by the engine: never ahead of its clock.
        _ => SourceClock::new(RECEIVE_TIME_SLACK_MS, 0),
    }
}

fn plan_text(p: &crate::pipeline::compile::Plan) -> String {
    p.logical.display_indent_schema().to_string()
}

/// What a query's state depends on: a reload or a restart hands a query its old windows
/// only when this is unchanged.
fn fingerprint(q: &crate::pipeline::compile::CompiledQuery) -> String {
    format!(
        "{}\n{:?}\n{}",
        q.spec.sink,
        q.window.as_ref().map(|w| &w.kind),
        plan_text(&q.plan)
    )
}

/// The runner's state in a checkpoint, matched by name on restore: a restart with a
/// changed pipeline takes up what still fits.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RunnerState {
    pub now: i64,
    /// Per root stream.
    pub clocks: Vec<(String, super::window::ClockState)>,
    pub windows: Vec<SavedWindows>,
    /// Per source with a sequence field.
    pub dedupe: Vec<(String, super::dedupe::DedupeState)>,
    /// Per frame over past windows (by function name).
    pub rolling: Vec<(String, crate::functions::rolling::RollingState)>,
    /// Per anomaly detector (by function name).
    #[serde(default)]
    pub detectors: Vec<(String, crate::functions::detect::DetectState)>,
}

/// A windowed query's open windows in a checkpoint.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedWindows {
    pub query: String,
    /// The query's [`fingerprint`]: windows go back only to the same query.
    pub fingerprint: String,
    /// Where its rows are in the checkpoint's batches.
    pub rows: String,
    pub state: super::window::WindowsState,
}

/// Where a runner's checkpoints go, and what it knows of commands already sent.
struct Durable {
    data_dir: PathBuf,
    epoch: u64,
    journal: crate::durable::checkpoint::Journal,
}

/// What a hot reload needs besides the current pipeline: where to read the new one, and
/// how to open the output of a sink it adds.
pub struct ReloadContext {
    pub paths: Vec<PathBuf>,
    pub open_sink: OpenSink,
}

/// Opens the output of a sink (a Parquet writer, an MQTT publisher).
pub type OpenSink = Box<dyn Fn(&CompiledSink) -> anyhow::Result<Output> + Send>;

/// How often reference files are checked for changes.
const REFERENCE_CHECK_MS: i64 = 1000;

/// Rows a stream read only by queries into tables gathers before they run on it, and
/// rows a source gathers before they go to its raw table; the runner's tick (every
/// 50 ms), a checkpoint, a reload and a stop hand on whatever is queued. These rows wait
/// for the next file commit anyway, and each run of a query or hand-over has a fixed cost
/// (about 13 us for a filter: a plan execution, a batch handed to the Parquet writer's
/// thread, which wakes it), which a broker delivering QoS 1 a dozen readings at a time
/// would otherwise pay per dozen. Streams that feed views or command sinks never wait:
/// their commands go out as soon as the readings arrive.
pub const GATHER_ROWS: usize = 8192;

/// Rows gathering on their way to a table, with their count and size.
#[derive(Default)]
struct Gathered {
    batches: Vec<RecordBatch>,
    rows: usize,
    /// As the backlog counts them (`RecordBatch::get_array_memory_size`).
    bytes: usize,
}

pub struct Runner {
    pipeline: CompiledPipeline,
    task_ctx: Arc<TaskContext>,
    outputs: Outputs,
    metrics: Arc<Metrics>,
    /// Per query: its open windows, for windowed queries.
    windows: Vec<Option<Windows>>,
    /// Per stream; only root streams' (sources, presence) are used.
    clocks: Vec<SourceClock>,
    /// The latest time a caller gave (`rows`, `tick`): what "ahead of the clock" means.
    now: i64,
    /// Per stream: rows waiting for the views and micro-batch queries that read it.
    pending: Vec<Vec<RecordBatch>>,
    /// Per source: rows on their way to its raw table, handed over by [`GATHER_ROWS`].
    raw_pending: Vec<Gathered>,
    /// Bytes of rows taken off the channel and still held here (gathering), not yet
    /// released to the backlog (see [`Runner::release`]).
    held: usize,
    /// Per stream: the views computed from it.
    views: Vec<Vec<usize>>,
    /// Per stream: the micro-batch queries reading it.
    micro: Vec<Vec<usize>>,
    /// Per stream: whether its rows may gather (see [`GATHER_ROWS`]) before its readers
    /// run: when they are only queries into tables.
    gathers: Vec<bool>,
    /// Per stream: (query, window input) pairs windowing it.
    windowed: Vec<Vec<(usize, usize)>>,
    last_reference_check: i64,
    /// Per window query, the watermark at the previous tick, when windows close a tick
    /// late (see [`Runner::closing_a_tick_late`]); empty otherwise.
    previous_watermark: Option<Vec<i64>>,
    reload: Option<ReloadContext>,
    /// Per source: duplicate detection, when the source declares a sequence field.
    dedupe: Vec<Option<Dedupe>>,
    /// Told when rows from the channel have been taken (see [`Runner::run`]).
    backlog: Option<Arc<super::backlog::Backlog>>,
    durable: Option<Durable>,
    /// Outputs a reload removed, closed after the next checkpoint.
    retired: Vec<Output>,
}

impl Runner {
    pub fn new(pipeline: CompiledPipeline, outputs: Outputs, metrics: Arc<Metrics>) -> Runner {
        let n = pipeline.streams.len();
        let sources = pipeline.sources.len();
        let windows = (0..pipeline.queries.len())
            .map(|qi| empty_windows(&pipeline, qi))
            .collect();
        let clocks = (0..n).map(|si| new_clock(&pipeline, si)).collect();
        let dedupe = pipeline
            .sources
            .iter()
            .map(|s| {
                let seq = s.spec.sequence.as_deref()?;
                let from_payload = matches!(s.event_time, EventTime::Field { .. });
                Dedupe::new(&s.row_schema, seq, from_payload)
            })
            .collect();
        let mut r = Runner {
            dedupe,
            task_ctx: pipeline.ctx.task_ctx(),
            pipeline,
            outputs,
            metrics,
            windows,
            clocks,
            now: i64::MIN,
            pending: vec![Vec::new(); n],
            raw_pending: (0..sources).map(|_| Gathered::default()).collect(),
            held: 0,
            views: vec![],
            micro: vec![],
            gathers: vec![],
            windowed: vec![],
            last_reference_check: i64::MIN,
            previous_watermark: None,
            reload: None,
            backlog: None,
            durable: None,
            retired: Vec::new(),
        };
        r.index_readers();
        r
    }

    /// Closes each window one tick (50 ms) after its watermark passed it, not at once.
    /// The shards hand rows on independently: after a burst (a restart's replay, the
    /// broker's backlog after an outage), one shard's rows can reach the runner and move
    /// the watermark a few milliseconds before another shard's rows of the same moment,
    /// which would then find their window closed. A tick's grace lets them land.
    pub fn closing_a_tick_late(mut self) -> Runner {
        self.previous_watermark = Some(Vec::new());
        self
    }

    /// Reports the rows it takes from the channel to the backlog that bounds them.
    pub fn with_backlog(mut self, backlog: Arc<super::backlog::Backlog>) -> Runner {
        self.backlog = Some(backlog);
        self
    }

    /// Checkpoints to `data_dir` (`EngineEvent::Checkpoint`), starting from the state of
    /// `recovered`, the checkpoint in force, if any.
    pub fn with_checkpoints(
        mut self,
        data_dir: PathBuf,
        recovered: Option<(
            crate::durable::checkpoint::Manifest,
            crate::durable::checkpoint::Batches,
        )>,
    ) -> Runner {
        let (epoch, published) = match recovered {
            Some((m, batches)) => {
                if let Some(state) = m.runner {
                    self.restore(state, &batches);
                }
                (m.epoch, m.published)
            }
            None => (0, Default::default()),
        };
        self.durable = Some(Durable {
            journal: crate::durable::checkpoint::Journal::new(&data_dir, published),
            data_dir,
            epoch,
        });
        self
    }

    /// The state a checkpoint keeps, and the rows of open windows beside it.
    fn snapshot(&self) -> (RunnerState, crate::durable::checkpoint::Batches) {
        let mut batches = crate::durable::checkpoint::Batches::default();
        let p = &self.pipeline;
        let roots = p.streams.iter().enumerate().filter(|(i, s)| s.root == *i);
        let windows = self
            .windows
            .iter()
            .enumerate()
            .filter_map(|(qi, w)| {
                let w = w.as_ref()?;
                let q = &p.queries[qi];
                let rows = format!("w{qi}");
                Some(SavedWindows {
                    query: q.spec.name.clone(),
                    fingerprint: fingerprint(q),
                    state: w.save(&rows, &mut batches),
                    rows,
                })
            })
            .collect();
        let state = RunnerState {
            now: self.now,
            clocks: roots
                .map(|(i, s)| (s.name.clone(), self.clocks[i].state()))
                .collect(),
            windows,
            dedupe: p
                .sources
                .iter()
                .zip(&self.dedupe)
                .filter_map(|(s, d)| Some((s.spec.name.clone(), d.as_ref()?.state())))
                .collect(),
            rolling: self
                .rolling_functions()
                .into_iter()
                .filter_map(|(name, udf)| {
                    let r = udf
                        .inner()
                        .downcast_ref::<crate::functions::rolling::Rolling>()?;
                    Some((name, r.save()))
                })
                .collect(),
            detectors: self
                .rolling_functions()
                .into_iter()
                .filter_map(|(name, udf)| {
                    let d = udf
                        .inner()
                        .downcast_ref::<crate::functions::detect::Detect>()?;
                    Some((name, d.save()))
                })
                .collect(),
        };
        (state, batches)
    }

    fn restore(&mut self, state: RunnerState, batches: &crate::durable::checkpoint::Batches) {
        let now = crate::time::now_ms();
        self.now = state.now;
        for (name, clock) in &state.clocks {
            if let Some(i) = self.pipeline.stream(name) {
                self.clocks[i].restore(clock, now);
            }
        }
        for saved in state.windows {
            let name = saved.query;
            let Some(i) = self
                .pipeline
                .queries
                .iter()
                .position(|q| q.spec.name == name)
            else {
                tracing::warn!(
                    query = name,
                    "not in the pipeline any more: its open windows are dropped"
                );
                continue;
            };
            if fingerprint(&self.pipeline.queries[i]) != saved.fingerprint {
                tracing::warn!(
                    query = name,
                    "changed since the checkpoint: it starts with no open windows"
                );
                continue;
            }
            if let Some(w) = self.windows[i].as_mut()
                && let Err(e) = w.restore(saved.state, &saved.rows, batches)
            {
                tracing::error!(query = name, "open windows not restored: {e}");
            }
        }
        for (name, saved) in state.dedupe {
            let i = self
                .pipeline
                .sources
                .iter()
                .position(|s| s.spec.name == name);
            if let Some(d) = i.and_then(|i| self.dedupe[i].as_mut()) {
                d.restore(saved);
            }
        }
        let functions: HashMap<_, _> = self.rolling_functions().into_iter().collect();
        for (name, saved) in state.rolling {
            let r = functions.get(&name).and_then(|u| {
                u.inner()
                    .downcast_ref::<crate::functions::rolling::Rolling>()
            });
            if let Some(r) = r {
                r.restore(saved);
            }
        }
        for (name, saved) in state.detectors {
            let d = functions
                .get(&name)
                .and_then(|u| u.inner().downcast_ref::<crate::functions::detect::Detect>());
            if let Some(d) = d {
                d.restore(saved);
            }
        }
    }

    /// The pipeline's frames over past windows and detectors: the functions whose state
    /// spans windows.
    fn rolling_functions(&self) -> Vec<(String, Arc<datafusion::logical_expr::ScalarUDF>)> {
        let mut all: Vec<_> = self
            .pipeline
            .ctx
            .state()
            .scalar_functions()
            .iter()
            .filter(|(_, u)| {
                let inner = u.inner();
                inner
                    .downcast_ref::<crate::functions::rolling::Rolling>()
                    .is_some()
                    || inner
                        .downcast_ref::<crate::functions::detect::Detect>()
                        .is_some()
            })
            .map(|(n, u)| (n.clone(), u.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Makes everything up to log position `wal_next` durable: runs what is queued,
    /// finishes every table's file in staging, writes the state, commits, then moves the
    /// files into their tables and drops the log before the position.
    pub async fn checkpoint(&mut self, wal_next: u64) -> Result<(), String> {
        if self.durable.is_none() {
            for o in self.retired.drain(..) {
                o.close();
            }
            return Ok(());
        }
        self.run_micro_batches().await;
        let mut staged = Vec::new();
        let retired = self.retired.iter().filter_map(|o| match o {
            Output::Parquet(t) => Some(t),
            _ => None,
        });
        for out in self.outputs.parquet().chain(retired) {
            staged.extend(out.seal().await?);
        }
        let (state, batches) = self.snapshot();
        let Some(d) = self.durable.as_mut() else {
            return Ok(());
        };
        let manifest = crate::durable::checkpoint::Manifest {
            epoch: d.epoch + 1,
            wal_next,
            staged,
            published: d.journal.published(),
            runner: Some(state),
        };
        let data_dir = d.data_dir.clone();
        let written = tokio::task::spawn_blocking(
            move || -> std::io::Result<crate::durable::checkpoint::Manifest> {
                crate::durable::checkpoint::write(&data_dir, &manifest, &batches)?;
                Ok(manifest)
            },
        )
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot write a checkpoint in {}: {e}", d.data_dir.display()))?;
        d.epoch = written.epoch;
        self.metrics.checkpoints.inc();
        for o in self.retired.drain(..) {
            o.close();
        }
        // Committed: what follows can be redone after a crash, by `durable::recover`.
        let data_dir = d.data_dir.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::durable::checkpoint::publish(&written.staged) {
                tracing::error!(
                    "cannot move committed files into their tables (done at the next start): {e}"
                );
            }
            if let Err(e) =
                crate::durable::wal::truncate(&crate::durable::wal::dir(&data_dir), wal_next)
            {
                tracing::warn!("cannot delete old log segments: {e}");
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Lets the runner reload its pipeline (`EngineEvent::Reload`).
    pub fn with_reload(mut self, ctx: ReloadContext) -> Runner {
        self.reload = Some(ctx);
        self
    }

    /// Who reads each stream: views, micro-batch queries, windows.
    fn index_readers(&mut self) {
        let n = self.pipeline.streams.len();
        self.views = vec![Vec::new(); n];
        self.micro = vec![Vec::new(); n];
        self.windowed = vec![Vec::new(); n];
        for (si, s) in self.pipeline.streams.iter().enumerate() {
            if let StreamKind::View { input, .. } = s.kind {
                self.views[input].push(si);
            }
        }
        for (qi, q) in self.pipeline.queries.iter().enumerate() {
            if let Some(s) = q.input {
                self.micro[s].push(qi);
            }
            for (k, w) in q.window.iter().flat_map(|w| w.inputs.iter().enumerate()) {
                self.windowed[w.stream].push((qi, k));
            }
        }
        let p = &self.pipeline;
        let commands =
            |qi: usize| matches!(p.sinks[p.queries[qi].sink].spec.kind, SinkKind::Mqtt { .. });
        self.gathers = (0..n)
            .map(|s| self.views[s].is_empty() && !self.micro[s].iter().any(|&qi| commands(qi)))
            .collect();
    }

    /// Reads the pipeline files again and switches to them. Queries whose plan did not
    /// change keep their open windows and their state across windows; new and changed
    /// ones start empty. A file that does not compile, or that changes the sources (which
    /// the broker subscriptions and device shards are built from), is refused and the
    /// running pipeline stays as it was.
    pub async fn reload(&mut self) -> Result<String, String> {
        let Some(ctx) = &self.reload else {
            return Err("this runner cannot reload".into());
        };
        let new = crate::pipeline::load_reusing(&ctx.paths, &self.pipeline)
            .await
            .map_err(|d| d.to_string())?;
        self.run_micro_batches().await;
        self.swap(new)
    }

    fn swap(&mut self, mut new: CompiledPipeline) -> Result<String, String> {
        let old = &self.pipeline;
        let describe = |p: &CompiledPipeline| -> Vec<String> {
            p.sources
                .iter()
                .map(|s| {
                    format!(
                        "{:?} {:?} {:?} {:?} {:?} {}",
                        s.spec.name,
                        s.spec.topic.to_string(),
                        s.row_schema,
                        s.event_time,
                        s.spec.watermark_delay,
                        s.spec.qos
                    )
                })
                .chain(
                    p.presence
                        .iter()
                        .map(|(p, _)| format!("presence {} {:?}", p.name, p.timeout)),
                )
                .collect()
        };
        if describe(old) != describe(&new) {
            return Err("the new pipeline changes its sources or presence table; restart the engine for that (queries, views, sinks and reference tables reload live)".into());
        }
        let Some(ctx) = &self.reload else {
            return Err("this runner cannot reload".into());
        };

        // Outputs: a sink with the same name, kind and schema keeps its output.
        let same_sink = |a: &CompiledSink, b: &CompiledSink| {
            a.spec.name == b.spec.name
                && format!("{:?}", a.spec.kind) == format!("{:?}", b.spec.kind)
                && a.schema == b.schema
        };
        let mut opened: Vec<Option<Output>> = Vec::new();
        for s in &new.sinks {
            if old.sinks.iter().any(|o| same_sink(o, s)) {
                opened.push(None);
                continue;
            }
            match (ctx.open_sink)(s) {
                Ok(o) => opened.push(Some(o)),
                Err(e) => {
                    for o in opened.into_iter().flatten() {
                        o.close();
                    }
                    return Err(format!("cannot open sink `{}`: {e}", s.spec.name));
                }
            }
        }
        let mut old_outputs: Vec<Option<Output>> = std::mem::take(&mut self.outputs.sinks)
            .into_iter()
            .map(Some)
            .collect();
        let mut sinks = Vec::with_capacity(new.sinks.len());
        for (s, o) in new.sinks.iter().zip(opened) {
            let out = match o {
                Some(o) => o,
                None => old
                    .sinks
                    .iter()
                    .position(|x| same_sink(x, s))
                    .and_then(|i| old_outputs[i].take())
                    .unwrap_or(Output::Discard),
            };
            sinks.push(out);
        }
        // A removed table's rows since the last checkpoint are committed with the next one.
        self.retired.extend(old_outputs.into_iter().flatten());
        self.outputs.sinks = sinks;

        // Queries and views whose plans are unchanged keep their objects: plans, windows
        // and state across windows.
        let plan_text = plan_text;
        let mut old = std::mem::replace(&mut self.pipeline, CompiledPipeline::empty());
        let mut old_windows = std::mem::take(&mut self.windows);
        let mut kept = 0;
        let mut windows = Vec::with_capacity(new.queries.len());
        for q in new.queries.iter_mut() {
            let found = old
                .queries
                .iter()
                .position(|o| o.spec.name == q.spec.name && fingerprint(o) == fingerprint(q));
            match found {
                Some(i) => {
                    let sink = q.sink;
                    let input = q.input;
                    let streams: Vec<usize> = q
                        .window
                        .iter()
                        .flat_map(|w| w.inputs.iter().map(|i| i.stream))
                        .collect();
                    std::mem::swap(q, &mut old.queries[i]);
                    // Indices belong to the new pipeline.
                    q.sink = sink;
                    q.input = input;
                    if let Some(w) = q.window.as_mut() {
                        for (inp, s) in w.inputs.iter_mut().zip(streams) {
                            inp.stream = s;
                        }
                    }
                    windows.push(old_windows[i].take());
                    kept += 1;
                }
                None => windows.push(None),
            }
        }
        for (qi, w) in windows.iter_mut().enumerate() {
            if w.is_none() {
                *w = empty_windows(&new, qi);
            }
        }
        for s in new.streams.iter_mut() {
            let StreamKind::View { plan, .. } = &mut s.kind else {
                continue;
            };
            let same = old.streams.iter_mut().find(|o| {
                o.name == s.name
                    && o.schema == s.schema
                    && matches!(&o.kind, StreamKind::View { plan: p, .. } if plan_text(p) == plan_text(plan))
            });
            if let Some(StreamKind::View { plan: old_plan, .. }) = same.map(|o| &mut o.kind) {
                std::mem::swap(plan, old_plan);
            }
        }
        let changed = new.queries.len() - kept;
        let removed = old.queries.len() - kept;

        let clocks = std::mem::take(&mut self.clocks);
        self.clocks = (0..new.streams.len())
            .map(|si| {
                old.streams
                    .iter()
                    .position(|o| o.name == new.streams[si].name)
                    .map(|i| clocks[i].clone())
                    .unwrap_or_else(|| new_clock(&new, si))
            })
            .collect();
        self.pending = vec![Vec::new(); new.streams.len()];
        self.windows = windows;
        self.task_ctx = new.ctx.task_ctx();
        self.metrics.init_series(&new);
        self.pipeline = new;
        self.index_readers();
        Ok(format!(
            "{kept} queries kept their state, {changed} new or changed, {removed} removed"
        ))
    }

    /// Runs until the channel delivers `Finish` (or closes), then (as `Finish` says) closes
    /// every window and checkpoints, and returns the outputs for the caller to close.
    pub async fn run(mut self, mut rx: UnboundedReceiver<EngineEvent>) -> Outputs {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut finish = None;
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    let mut next = Some(ev);
                    let now = crate::time::now_ms();
                    // Take what is queued before running queries, so batches grow with
                    // load; but no more than the backlog's worth: rows count in the
                    // backlog until the queries have run over them (gathered ones until
                    // they are written, see `release`), and windows must still close
                    // under a steady stream.
                    let limit = self.backlog.as_ref().map_or(64 << 20, |b| b.limit());
                    let mut taken = 0;
                    while let Some(ev) = next {
                        match ev {
                            EngineEvent::Finish { drain, checkpoint, done } => {
                                finish = Some((drain, checkpoint, done));
                                break;
                            }
                            EngineEvent::Checkpoint { wal_next, done } => {
                                let _ = done.send(self.checkpoint(wal_next).await);
                            }
                            EngineEvent::Rows { stream, batch } => {
                                taken += batch.get_array_memory_size();
                                self.rows(stream, batch, now);
                            }
                            EngineEvent::DeadLetters(d) => self.dead_letters(d),
                            EngineEvent::Reload(answer) => {
                                self.run_micro_batches().await;
                                let _ = answer.send(self.reload().await);
                            }
                        }
                        next = if taken < limit { rx.try_recv().ok() } else { None };
                    }
                    self.run_due_micro_batches().await;
                    // Gathered rows count in the backlog: they may not take more than
                    // half of it, or a small backlog would pass one backlog's worth a tick.
                    let gathered: usize = self.raw_pending.iter().map(|g| g.bytes).sum();
                    if self.backlog.as_ref().is_some_and(|b| gathered * 2 >= b.limit()) {
                        self.run_micro_batches().await;
                    }
                    self.release(taken);
                    if finish.is_some() { break; }
                }
                _ = tick.tick() => {
                    self.tick(crate::time::now_ms()).await;
                    self.release(0);
                }
            }
        }
        match finish {
            Some((drain, checkpoint, done)) => {
                if drain {
                    self.finish().await;
                } else {
                    self.run_micro_batches().await;
                }
                let result = match checkpoint {
                    Some(wal_next) => self.checkpoint(wal_next).await,
                    None => Ok(()),
                };
                let _ = done.send(result);
            }
            None => self.finish().await,
        }
        self.release(0);
        self.outputs
    }

    /// Rows of a root stream (a source, or presence) arriving at `now`.
    pub fn rows(&mut self, stream: usize, batch: RecordBatch, now: i64) {
        self.now = self.now.max(now);
        let Some(s) = self.pipeline.streams.get(stream) else {
            return;
        };
        let event_time = s.event_time;
        let mut batch = batch;
        if let StreamKind::Source(i) = s.kind {
            if let Some(d) = self.dedupe.get_mut(i).and_then(|d| d.as_mut()) {
                let (kept, dropped) = d.filter(batch, now);
                if dropped > 0 {
                    self.metrics
                        .duplicates
                        .with_label_values(&[&s.name])
                        .inc_by(dropped as u64);
                }
                batch = kept;
                if batch.num_rows() == 0 {
                    return;
                }
            }
            self.metrics
                .rows_ingested
                .with_label_values(&[&s.name])
                .inc_by(batch.num_rows() as u64);
            // Gathered, as a table-only stream's rows are: one batch (and one wake-up of
            // the writer's thread) per GATHER_ROWS rather than per read of the socket.
            if let Some(raw) = self.raw_pending.get_mut(i) {
                raw.rows += batch.num_rows();
                raw.bytes += batch.get_array_memory_size();
                raw.batches.push(batch.clone());
                if raw.rows >= GATHER_ROWS {
                    self.write_raw(i);
                }
            }
        }
        if let Some(et) = event_time {
            self.clocks[stream].observe(&batch, et, now);
        }
        self.push(stream, batch);
    }

    /// Hands rows of a stream to the windows over it and queues them for its readers.
    fn push(&mut self, stream: usize, batch: RecordBatch) {
        let s = &self.pipeline.streams[stream];
        if let (Some(et), false) = (s.event_time, self.windowed[stream].is_empty()) {
            let root = s.root;
            // Rows from a clock set far ahead are kept out of windows: they would sit in
            // memory until the watermark reached them, which may be never.
            let limit = self.clocks[root].future_limit(self.now);
            let (timely, ahead) = match split_after(&batch, et, limit) {
                Ok(parts) => parts,
                Err(e) => {
                    tracing::error!("cannot check event times: {e}");
                    (batch.clone(), None)
                }
            };
            let mut missed: Vec<(usize, &'static str, RecordBatch)> = Vec::new();
            for &(qi, k) in &self.windowed[stream] {
                if let Some(ahead) = &ahead {
                    missed.push((qi, AHEAD, ahead.clone()));
                }
                if let Some(w) = self.windows[qi].as_mut() {
                    // A late row is counted, and kept, once per window query that missed it.
                    for rows in w.add(k, &timely, et).0 {
                        missed.push((qi, LATE, rows));
                    }
                }
            }
            let source = &self.pipeline.streams[root].name;
            for (qi, reason, rows) in missed {
                let query = &self.pipeline.queries[qi].spec.name;
                self.metrics
                    .late_rows
                    .with_label_values(&[source, reason])
                    .inc_by(rows.num_rows() as u64);
                match late_rows_batch(source, query, reason, et, &rows) {
                    Ok(b) => self.outputs.late_rows.write_table(b),
                    Err(e) => tracing::error!(query, "cannot keep late rows: {e}"),
                }
            }
        }
        if !self.views[stream].is_empty() || !self.micro[stream].is_empty() {
            self.pending[stream].push(batch);
        }
    }

    pub fn dead_letters(&mut self, dead: Vec<DeadLetter>) {
        for d in &dead {
            let source = d.source.as_deref().unwrap_or("");
            self.metrics
                .decode_errors
                .with_label_values(&[source, d.reason])
                .inc();
            tracing::debug!(
                topic = d.topic,
                reason = d.reason,
                "dead letter: {}",
                d.error
            );
        }
        let col = |f: &dyn Fn(&DeadLetter) -> Option<String>| -> ArrayRef {
            Arc::new(dead.iter().map(f).collect::<StringArray>())
        };
        let columns = vec![
            col(&|d| d.source.clone()),
            col(&|d| Some(d.topic.clone())),
            col(&|d| Some(String::from_utf8_lossy(&d.payload).into_owned())),
            col(&|d| Some(d.reason.to_string())),
            col(&|d| Some(d.error.clone())),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(dead.iter().map(|d| d.received_at))
                    .with_timezone(crate::time::TZ),
            ) as ArrayRef,
        ];
        match RecordBatch::try_new(dead_letter_schema(), columns) {
            Ok(b) => self.outputs.dead_letters.write_table(b),
            Err(e) => tracing::error!("cannot build dead letter rows: {e}"),
        }
    }

    /// Computes views and micro-batch queries over everything queued. Streams are in
    /// declaration order, so a view's rows are queued before its own turn comes.
    /// Raw rows that have gathered go to their tables first.
    pub async fn run_micro_batches(&mut self) {
        for i in 0..self.raw_pending.len() {
            self.write_raw(i);
        }
        self.run_micro_batches_of(|_, _| true).await
    }

    /// Tells the backlog that rows of `taken` bytes came off the channel, less what this
    /// runner still holds gathering (every row gathers in its source's raw rows, and a
    /// table-only query's rows are written at the same count or tick as those). So a slow
    /// query over gathered rows still holds ingest back. Never more than was taken.
    fn release(&mut self, taken: usize) {
        let held = self
            .raw_pending
            .iter()
            .map(|g| g.bytes)
            .sum::<usize>()
            .min(self.held + taken);
        if let Some(b) = &self.backlog {
            b.done(self.held + taken - held);
        }
        self.held = held;
    }

    /// Hands the raw rows gathered for source `i` to its raw table, as one batch.
    fn write_raw(&mut self, i: usize) {
        let mut batches = std::mem::take(&mut self.raw_pending[i]).batches;
        let out = &self.outputs.raw[i];
        if batches.len() <= 1 {
            batches.pop().into_iter().for_each(|b| out.write_table(b));
            return;
        }
        let first = &batches[0];
        match datafusion::arrow::compute::concat_batches(&first.schema(), &batches) {
            Ok(b) => out.write_table(b),
            Err(e) => {
                // Rows of one source share its schema; should they not, nothing is lost.
                tracing::warn!("cannot join raw rows into one batch: {e}");
                batches.into_iter().for_each(|b| out.write_table(b));
            }
        }
    }

    /// The same, as rows arrive: a stream whose rows only go to tables waits until it
    /// holds [`GATHER_ROWS`] (the next tick runs it in any case).
    pub async fn run_due_micro_batches(&mut self) {
        self.run_micro_batches_of(|gathers, pending| {
            !gathers || pending.iter().map(|b| b.num_rows()).sum::<usize>() >= GATHER_ROWS
        })
        .await
    }

    async fn run_micro_batches_of(&mut self, due: impl Fn(bool, &[RecordBatch]) -> bool) {
        for s in 0..self.pending.len() {
            if self.pending[s].is_empty() || !due(self.gathers[s], &self.pending[s]) {
                continue;
            }
            let batches = std::mem::take(&mut self.pending[s]);
            let slot = self.pipeline.streams[s].slot.clone();
            slot.set(batches);
            for v in self.views[s].clone() {
                let StreamKind::View { plan, .. } = &self.pipeline.streams[v].kind else {
                    continue;
                };
                match plan.execute(self.task_ctx.clone()).await {
                    Ok(out) => {
                        for b in out {
                            if b.num_rows() > 0 {
                                self.push(v, b);
                            }
                        }
                    }
                    Err(e) => {
                        let name = &self.pipeline.streams[v].name;
                        self.metrics.query_errors.with_label_values(&[name]).inc();
                        tracing::error!(view = name, "view failed: {e}");
                    }
                }
            }
            for qi in self.micro[s].clone() {
                self.execute(qi, None).await;
            }
            slot.clear();
        }
    }

    /// Closes the windows that watermarks passed by `now`, and reloads changed reference
    /// files.
    pub async fn tick(&mut self, now: i64) {
        self.now = self.now.max(now);
        self.run_micro_batches().await;
        for qi in 0..self.windows.len() {
            let Some(w) = &self.pipeline.queries[qi].window else {
                continue;
            };
            // A window join closes when every side has moved past it.
            let wm = w
                .inputs
                .iter()
                .map(|i| self.clocks[self.pipeline.streams[i.stream].root].watermark(now))
                .min()
                .unwrap_or(i64::MIN);
            let wm = match self.previous_watermark.as_mut() {
                Some(previous) => {
                    previous.resize(self.windows.len(), i64::MIN);
                    std::mem::replace(&mut previous[qi], wm).min(wm)
                }
                None => wm,
            };
            let closed = match self.windows[qi].as_mut() {
                Some(state) => state.close_until(wm),
                None => continue,
            };
            for c in closed {
                self.run_window(qi, c).await;
            }
        }
        if now >= self.last_reference_check.saturating_add(REFERENCE_CHECK_MS) {
            self.last_reference_check = now;
            self.reload_references().await;
        }
    }

    async fn reload_references(&mut self) {
        for r in &self.pipeline.references {
            match r.reload_if_changed().await {
                Reload::Unchanged => {}
                Reload::Loaded { rows } => {
                    self.metrics
                        .reference_reloads
                        .with_label_values(&[&r.spec.name, "ok"])
                        .inc();
                    tracing::info!(table = r.spec.name, rows, "reference table reloaded");
                }
                Reload::Failed(e) => {
                    self.metrics
                        .reference_reloads
                        .with_label_values(&[&r.spec.name, "error"])
                        .inc();
                    tracing::error!(
                        table = r.spec.name,
                        "reference table not reloaded, previous contents kept: {e}"
                    );
                }
            }
        }
    }

    /// Runs what is queued and closes every open window: at shutdown, and at the end of a
    /// replay.
    pub async fn finish(&mut self) {
        self.run_micro_batches().await;
        for qi in 0..self.windows.len() {
            let closed = match self.windows[qi].as_mut() {
                Some(w) => w.close_all(),
                None => continue,
            };
            for c in closed {
                self.run_window(qi, c).await;
            }
        }
    }

    pub fn into_outputs(self) -> Outputs {
        self.outputs
    }

    async fn run_window(&mut self, qi: usize, closed: Closed) {
        let closed_at = Instant::now();
        let q = &self.pipeline.queries[qi];
        let Some(w) = &q.window else { return };
        for (k, input) in w.inputs.iter().enumerate() {
            let mut with_bounds = Vec::new();
            for (start, end, b) in closed.inputs.get(k).into_iter().flatten() {
                let n = b.num_rows();
                let mut cols = b.columns().to_vec();
                cols.push(Arc::new(
                    TimestampMillisecondArray::from_value(*start, n).with_timezone(crate::time::TZ),
                ));
                cols.push(Arc::new(
                    TimestampMillisecondArray::from_value(*end, n).with_timezone(crate::time::TZ),
                ));
                match RecordBatch::try_new(input.schema.clone(), cols) {
                    Ok(b) => with_bounds.push(b),
                    Err(e) => tracing::error!(query = q.spec.name, "window rows: {e}"),
                }
            }
            input.slot.set(with_bounds);
        }
        self.metrics
            .windows_closed
            .with_label_values(&[&q.spec.name])
            .inc();
        let end = closed.inputs.iter().flatten().map(|(_, e, _)| *e).max();
        self.execute(qi, end).await;
        if let Some(w) = &self.pipeline.queries[qi].window {
            for input in &w.inputs {
                input.slot.clear();
            }
        }
        self.metrics
            .window_close_latency
            .observe(closed_at.elapsed().as_secs_f64());
    }

    /// Runs one query over whatever its slots hold and hands the rows to its sink.
    /// `window_end`: the end of the (newest) window it ran over, for a windowed query.
    async fn execute(&mut self, qi: usize, window_end: Option<i64>) {
        let q = &self.pipeline.queries[qi];
        let started = Instant::now();
        let result = q.execute(self.task_ctx.clone()).await;
        self.metrics
            .query_duration
            .with_label_values(&[&q.spec.name])
            .observe(started.elapsed().as_secs_f64());
        let batches = match result {
            Ok(b) => b,
            Err(e) => {
                self.metrics
                    .query_errors
                    .with_label_values(&[&q.spec.name])
                    .inc();
                tracing::error!(query = q.spec.name, "query failed: {e}");
                return;
            }
        };
        let sink = &self.pipeline.sinks[q.sink];
        let commands = matches!(self.outputs.sinks[q.sink], Output::Commands(_));
        let rows = batches.iter().any(|b| b.num_rows() > 0);
        if let (true, true, Some(end), Some(d)) = (commands, rows, window_end, &mut self.durable) {
            // A window computed again after a restart: its commands went out before.
            if d.journal.sent(&q.spec.name, end) {
                self.metrics
                    .commands_suppressed
                    .with_label_values(&[&sink.spec.name])
                    .inc();
                tracing::info!(
                    query = q.spec.name,
                    window_end = end,
                    "commands of this window were sent before a restart; not sent again"
                );
                return;
            }
            if let Err(e) = d.journal.record(&q.spec.name, end) {
                // Sending anyway: the command matters more than the rare resend after a
                // crash that not recording it allows.
                tracing::error!(query = q.spec.name, "cannot record the commands sent: {e}");
            }
        }
        for b in batches {
            if b.num_rows() == 0 {
                continue;
            }
            match (&self.outputs.sinks[q.sink], &sink.spec.kind) {
                (Output::Commands(c), SinkKind::Mqtt { topic, qos, retain }) => {
                    c.publish(&sink.spec.name, topic, *qos, *retain, &b).await;
                }
                (out, _) => out.write_table(b),
            }
        }
    }
}

/// Splits rows into those with an event time at or before `limit` and the rest (`None`
/// when there are none, the common case, which copies nothing).
fn split_after(
    batch: &RecordBatch,
    et: usize,
    limit: i64,
) -> Result<(RecordBatch, Option<RecordBatch>), datafusion::arrow::error::ArrowError> {
    use datafusion::arrow::compute::{filter_record_batch, not};
    let Some(ts) = batch
        .column(et)
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
    else {
        return Ok((batch.clone(), None));
    };
    if ts.values().iter().all(|&t| t <= limit) {
        return Ok((batch.clone(), None));
    }
    let ahead: datafusion::arrow::array::BooleanArray =
        ts.values().iter().map(|&t| Some(t > limit)).collect();
    Ok((
        filter_record_batch(batch, &not(&ahead)?)?,
        Some(filter_record_batch(batch, &ahead)?),
    ))
}
