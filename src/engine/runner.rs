//! The pipeline runner: the one task that sees every row. It archives raw rows and dead
//! letters, computes views and micro-batch queries as rows arrive, assigns rows to
//! windows, closes windows as watermarks pass, runs the compiled plans and hands results
//! to the outputs.
//!
//! Time comes from the caller (`now` arguments), so the same runner is driven by the wall
//! clock in the engine and by recorded times in golden tests and replays. It runs on a
//! multi-thread tokio runtime, as DataFusion expects, never on an actix arbiter.

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
    /// Commits every file; blocking.
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

/// What a hot reload needs besides the current pipeline: where to read the new one, and
/// how to open the output of a sink it adds.
pub struct ReloadContext {
    pub paths: Vec<PathBuf>,
    pub open_sink: Box<dyn Fn(&CompiledSink) -> anyhow::Result<Output> + Send>,
}

/// How often reference files are checked for changes.
const REFERENCE_CHECK_MS: i64 = 1000;

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
    /// Per stream: the views computed from it.
    views: Vec<Vec<usize>>,
    /// Per stream: the micro-batch queries reading it.
    micro: Vec<Vec<usize>>,
    /// Per stream: (query, window input) pairs windowing it.
    windowed: Vec<Vec<(usize, usize)>>,
    last_reference_check: i64,
    reload: Option<ReloadContext>,
    /// Per source: duplicate detection, when the source declares a sequence field.
    dedupe: Vec<Option<Dedupe>>,
    /// Told when rows from the channel have been taken (see [`Runner::run`]).
    backlog: Option<Arc<super::backlog::Backlog>>,
}

impl Runner {
    pub fn new(pipeline: CompiledPipeline, outputs: Outputs, metrics: Arc<Metrics>) -> Runner {
        let n = pipeline.streams.len();
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
            views: vec![],
            micro: vec![],
            windowed: vec![],
            last_reference_check: i64::MIN,
            reload: None,
            backlog: None,
        };
        r.index_readers();
        r
    }

    /// Reports the rows it takes from the channel to the backlog that bounds them.
    pub fn with_backlog(mut self, backlog: Arc<super::backlog::Backlog>) -> Runner {
        self.backlog = Some(backlog);
        self
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
        for o in old_outputs.into_iter().flatten() {
            o.close();
        }
        self.outputs.sinks = sinks;

        // Queries and views whose plans are unchanged keep their objects: plans, windows
        // and state across windows.
        let plan_text =
            |p: &crate::pipeline::compile::Plan| p.logical.display_indent_schema().to_string();
        let mut old = std::mem::replace(&mut self.pipeline, CompiledPipeline::empty());
        let mut old_windows = std::mem::take(&mut self.windows);
        let mut kept = 0;
        let mut windows = Vec::with_capacity(new.queries.len());
        for q in new.queries.iter_mut() {
            let found = old.queries.iter().position(|o| {
                o.spec.name == q.spec.name
                    && o.spec.sink == q.spec.sink
                    && plan_text(&o.plan) == plan_text(&q.plan)
                    && format!("{:?}", o.window.as_ref().map(|w| &w.kind))
                        == format!("{:?}", q.window.as_ref().map(|w| &w.kind))
            });
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

    /// Runs until the channel delivers `Finish` (or closes), then closes every window and
    /// returns the outputs for the caller to close.
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
                    // Take everything queued before running queries: batches grow with load.
                    while let Some(ev) = next {
                        match ev {
                            EngineEvent::Finish(done) => { finish = Some(done); break; }
                            EngineEvent::Rows { stream, batch } => {
                                let bytes = batch.get_array_memory_size();
                                self.rows(stream, batch, now);
                                if let Some(b) = &self.backlog {
                                    b.done(bytes);
                                }
                            }
                            EngineEvent::DeadLetters(d) => self.dead_letters(d),
                            EngineEvent::Reload(answer) => {
                                self.run_micro_batches().await;
                                let _ = answer.send(self.reload().await);
                            }
                        }
                        next = rx.try_recv().ok();
                    }
                    self.run_micro_batches().await;
                    if finish.is_some() { break; }
                }
                _ = tick.tick() => self.tick(crate::time::now_ms()).await,
            }
        }
        self.finish().await;
        if let Some(done) = finish {
            let _ = done.send(());
        }
        self.outputs
    }

    /// Rows of a root stream (a source, or presence) arriving at `now`.
    pub fn rows(&mut self, stream: usize, batch: RecordBatch, now: i64) {
        self.now = self.now.max(now);
        let Some(s) = self.pipeline.streams.get(stream) else {
            return;
        };
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
            self.outputs.raw[i].write_table(batch.clone());
        }
        if let Some(et) = s.event_time {
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
    pub async fn run_micro_batches(&mut self) {
        for s in 0..self.pending.len() {
            if self.pending[s].is_empty() {
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
                self.execute(qi).await;
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
        self.execute(qi).await;
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
    async fn execute(&mut self, qi: usize) {
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
