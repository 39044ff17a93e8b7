//! The pipeline runner: the one task that sees every row. It archives raw rows and dead
//! letters, feeds micro-batch queries as rows arrive, assigns rows to windows, closes
//! windows as watermarks pass, runs the compiled plans and hands results to the sinks.
//!
//! It runs on the engine's multi-thread tokio runtime, as DataFusion expects, never on an
//! actix arbiter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::TaskContext;
use tokio::sync::mpsc::UnboundedReceiver;

use super::EngineEvent;
use super::window::{RECEIVE_TIME_SLACK_MS, SourceClock, Tumbling};
use crate::decode::DeadLetter;
use crate::metrics::Metrics;
use crate::pipeline::compile::{CompiledPipeline, EventTime, ts_type};
use crate::pipeline::parse::{EVENT_TIME, SinkKind};
use crate::sink::commands::CommandPublisher;
use crate::sink::parquet::ParquetTable;

pub const DEAD_LETTERS: &str = "dead_letters";

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

/// Every table the runner writes to.
pub struct Tables {
    /// Raw telemetry, one per source (same index).
    pub raw: Vec<ParquetTable>,
    /// One per sink (same index); `None` for MQTT sinks.
    pub sinks: Vec<Option<ParquetTable>>,
    pub dead_letters: ParquetTable,
}

impl Tables {
    pub fn close(self) {
        for t in self.raw {
            t.close();
        }
        for t in self.sinks.into_iter().flatten() {
            t.close();
        }
        self.dead_letters.close();
    }
}

pub struct Runner {
    pipeline: CompiledPipeline,
    task_ctx: Arc<TaskContext>,
    tables: Tables,
    commands: Option<CommandPublisher>,
    metrics: Arc<Metrics>,
    /// Per query: its tumbling windows, for windowed queries.
    windows: Vec<Option<Tumbling>>,
    clocks: Vec<SourceClock>,
    /// Per source: rows waiting for the micro-batch queries that read the source.
    pending: Vec<Vec<RecordBatch>>,
    micro_queries: Vec<Vec<usize>>,
    event_time_col: Vec<usize>,
}

impl Runner {
    pub fn new(
        pipeline: CompiledPipeline,
        tables: Tables,
        commands: Option<CommandPublisher>,
        metrics: Arc<Metrics>,
    ) -> Runner {
        let n = pipeline.sources.len();
        let mut micro_queries = vec![Vec::new(); n];
        for (qi, q) in pipeline.queries.iter().enumerate() {
            for s in &q.inputs {
                micro_queries[*s].push(qi);
            }
        }
        let windows = pipeline
            .queries
            .iter()
            .map(|q| q.window.as_ref().map(|w| Tumbling::new(w.size_ms)))
            .collect();
        let clocks = pipeline
            .sources
            .iter()
            .map(|s| match s.event_time {
                EventTime::Received => SourceClock::new(RECEIVE_TIME_SLACK_MS),
                EventTime::Field { .. } => {
                    SourceClock::new(s.spec.watermark_delay.as_millis() as i64)
                }
            })
            .collect();
        let event_time_col = pipeline
            .sources
            .iter()
            .map(|s| s.row_schema.index_of(EVENT_TIME).unwrap_or(0))
            .collect();
        Runner {
            task_ctx: pipeline.ctx.task_ctx(),
            pipeline,
            tables,
            commands,
            metrics,
            windows,
            clocks,
            pending: vec![Vec::new(); n],
            micro_queries,
            event_time_col,
        }
    }

    /// Runs until the channel delivers `Finish` (or closes), then closes every window and
    /// returns the tables for the caller to close.
    pub async fn run(mut self, mut rx: UnboundedReceiver<EngineEvent>) -> Tables {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut finish = None;
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    let mut next = Some(ev);
                    // Take everything queued before running queries: batches grow with load.
                    while let Some(ev) = next {
                        match ev {
                            EngineEvent::Finish(done) => { finish = Some(done); break; }
                            ev => self.handle(ev),
                        }
                        next = rx.try_recv().ok();
                    }
                    self.run_micro_batches().await;
                    if finish.is_some() { break; }
                }
                _ = tick.tick() => self.close_due_windows().await,
            }
        }
        self.run_micro_batches().await;
        for qi in 0..self.windows.len() {
            let closed = match self.windows[qi].as_mut() {
                Some(w) => w.close_all(),
                None => continue,
            };
            for (start, batches) in closed {
                self.run_window(qi, start, batches).await;
            }
        }
        if let Some(done) = finish {
            let _ = done.send(());
        }
        self.tables
    }

    fn handle(&mut self, ev: EngineEvent) {
        match ev {
            EngineEvent::Rows { source, batch } => self.rows(source, batch),
            EngineEvent::DeadLetters(d) => self.dead_letters(d),
            EngineEvent::Finish(_) => {}
        }
    }

    fn rows(&mut self, source: usize, batch: RecordBatch) {
        let name = &self.pipeline.sources[source].spec.name;
        self.metrics
            .rows_ingested
            .with_label_values(&[name])
            .inc_by(batch.num_rows() as u64);
        let et = self.event_time_col[source];
        self.clocks[source].observe(&batch, et, crate::time::now_ms());
        let mut late = 0;
        for (qi, q) in self.pipeline.queries.iter().enumerate() {
            if let (Some(w), Some(state)) = (&q.window, self.windows[qi].as_mut()) {
                if w.source == source {
                    // A late row is counted once per window query that missed it.
                    late += state.add(&batch, et);
                }
            }
        }
        if late > 0 {
            self.metrics
                .late_rows
                .with_label_values(&[name])
                .inc_by(late as u64);
        }
        if !self.micro_queries[source].is_empty() {
            self.pending[source].push(batch.clone());
        }
        self.tables.raw[source].write(batch);
    }

    fn dead_letters(&mut self, dead: Vec<DeadLetter>) {
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
            Ok(b) => self.tables.dead_letters.write(b),
            Err(e) => tracing::error!("cannot build dead letter rows: {e}"),
        }
    }

    async fn run_micro_batches(&mut self) {
        for s in 0..self.pending.len() {
            if self.pending[s].is_empty() {
                continue;
            }
            let batches = std::mem::take(&mut self.pending[s]);
            let slot = self.pipeline.sources[s].slot.clone();
            slot.set(batches);
            for qi in self.micro_queries[s].clone() {
                self.execute(qi).await;
            }
            slot.clear();
        }
    }

    async fn close_due_windows(&mut self) {
        let now = crate::time::now_ms();
        for qi in 0..self.windows.len() {
            let Some(w) = &self.pipeline.queries[qi].window else {
                continue;
            };
            let wm = self.clocks[w.source].watermark(now);
            let closed = match self.windows[qi].as_mut() {
                Some(state) => state.close_until(wm),
                None => continue,
            };
            for (start, batches) in closed {
                self.run_window(qi, start, batches).await;
            }
        }
    }

    async fn run_window(&mut self, qi: usize, start: i64, batches: Vec<RecordBatch>) {
        let closed_at = Instant::now();
        let q = &self.pipeline.queries[qi];
        let Some(w) = &q.window else { return };
        let end = start + w.size_ms;
        let mut with_bounds = Vec::with_capacity(batches.len());
        for b in batches {
            let n = b.num_rows();
            let mut cols = b.columns().to_vec();
            cols.push(Arc::new(
                TimestampMillisecondArray::from_value(start, n).with_timezone(crate::time::TZ),
            ));
            cols.push(Arc::new(
                TimestampMillisecondArray::from_value(end, n).with_timezone(crate::time::TZ),
            ));
            match RecordBatch::try_new(w.schema.clone(), cols) {
                Ok(b) => with_bounds.push(b),
                Err(e) => tracing::error!(query = q.spec.name, "window rows: {e}"),
            }
        }
        let slot = w.slot.clone();
        slot.set(with_bounds);
        self.metrics
            .windows_closed
            .with_label_values(&[&q.spec.name])
            .inc();
        self.execute(qi).await;
        slot.clear();
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
            match &sink.spec.kind {
                SinkKind::Parquet => {
                    if let Some(t) = &self.tables.sinks[q.sink] {
                        t.write(b);
                    }
                }
                SinkKind::Mqtt { topic, qos, retain } => {
                    if let Some(c) = &self.commands {
                        c.publish(&sink.spec.name, topic, *qos, *retain, &b).await;
                    }
                }
            }
        }
    }
}
