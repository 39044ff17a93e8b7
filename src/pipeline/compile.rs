//! Compiles a [`PipelineSpec`] with DataFusion: every stream (source, presence, view over a
//! stream) and every window input becomes a table whose rows are supplied at execution
//! time (a [`Slot`]), reference tables are loaded, and every query is planned once into a
//! physical plan that the engine re-runs per micro-batch or window.
//!
//! Planning here is also the type checker: unknown columns, bad casts and mismatched sink
//! columns are reported with the place in the file before the engine starts.

use std::sync::{Arc, Mutex};

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream, collect};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    CreateTable, CreateTableOptions, HiveDistributionStyle, ObjectName, Statement,
};

use datafusion::logical_expr::ScalarUDF;

use super::diag::{Diagnostic, Diagnostics, Loc};
use super::parse::{
    DEVICE_ID, EVENT_TIME, LAST_SEEN, PipelineSpec, PresenceSpec, QuerySpec, RECEIVED_AT,
    RollingSpec, SINCE, STATUS, SinkKind, SinkSpec, SourceSpec, ViewSpec, WINDOW_END, WINDOW_START,
    WindowKind, WindowSpec,
};
pub use super::reference::Reference;
use crate::functions::detect::Detect;
use crate::functions::rolling::Rolling;
use crate::pipeline::rewrite::StateSpec;

/// The timestamp type of every engine-made time column: epoch milliseconds, UTC.
pub fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some(crate::time::TZ.into()))
}

/// Rows handed to a plan at execution time: the engine fills it, the plan's scan reads it.
///
/// A cached physical plan over a `MemTable` would keep the first window's data forever;
/// a `StreamingTable` asks its `PartitionStream` for data each time the plan executes.
#[derive(Debug)]
pub struct Slot {
    schema: SchemaRef,
    batches: Mutex<Vec<RecordBatch>>,
}

impl Slot {
    pub fn new(schema: SchemaRef) -> Arc<Slot> {
        Arc::new(Slot {
            schema,
            batches: Mutex::new(vec![]),
        })
    }
    pub fn set(&self, batches: Vec<RecordBatch>) {
        *self.batches.lock().unwrap_or_else(|p| p.into_inner()) = batches;
    }
    pub fn clear(&self) {
        self.set(vec![]);
    }
}

impl PartitionStream for Slot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }
    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        // Cloning batches clones Arcs, not data; a table read twice (self-join) sees the same rows.
        let batches = self
            .batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(batches.into_iter().map(Ok)),
        ))
    }
}

/// How a source finds each reading's event time.
#[derive(Debug, Clone)]
pub enum EventTime {
    /// No declared field: the time the engine received the message.
    Received,
    /// A payload column: TIMESTAMP (RFC 3339 text in JSON), or a number of epoch seconds or
    /// milliseconds (told apart by size: below 10^11 is seconds).
    Field { name: String },
}

#[derive(Debug)]
pub struct CompiledSource {
    pub spec: SourceSpec,
    /// What the JSON decoder produces: the declared payload columns.
    pub payload_schema: SchemaRef,
    /// What queries and the raw table see: topic captures, payload, event_time, received_at.
    pub row_schema: SchemaRef,
    pub event_time: EventTime,
}

/// A stream of rows that queries read: a source, the presence stream, or a view over a
/// stream. Rows reach a stream's [`Slot`] one micro-batch at a time.
#[derive(Debug)]
pub struct Stream {
    pub name: String,
    pub schema: SchemaRef,
    pub slot: Arc<Slot>,
    /// Index of the `event_time` column, when the stream has one (windows need it).
    pub event_time: Option<usize>,
    /// The source (or presence) stream whose watermark this stream follows.
    pub root: usize,
    pub kind: StreamKind,
}

#[derive(Debug)]
pub enum StreamKind {
    Source(usize),
    Presence,
    /// Computed from `input`'s micro-batches by `plan`, once for all its readers.
    View {
        plan: Plan,
        input: usize,
    },
}

/// A planned query: the logical plan, and the physical plan built once and re-run.
#[derive(Debug)]
pub struct Plan {
    pub logical: LogicalPlan,
    pub physical: Arc<dyn ExecutionPlan>,
}

impl Plan {
    /// Runs the cached physical plan over whatever its slots hold now.
    pub async fn execute(
        &self,
        task_ctx: Arc<TaskContext>,
    ) -> datafusion::error::Result<Vec<RecordBatch>> {
        let plan = reset_plan_states(self.physical.clone())?;
        collect(plan, task_ctx).await
    }

    /// Plans the physical side afresh; the cross-check for [`Self::execute`] in tests.
    pub async fn execute_replanned(
        &self,
        ctx: &SessionContext,
    ) -> datafusion::error::Result<Vec<RecordBatch>> {
        ctx.execute_logical_plan(self.logical.clone())
            .await?
            .collect()
            .await
    }
}

/// One input of a windowed query: a stream's closed windows, with `window_start` and
/// `window_end` added.
#[derive(Debug)]
pub struct WindowTable {
    pub stream: usize,
    pub slot: Arc<Slot>,
    pub schema: SchemaRef,
}

#[derive(Debug)]
pub struct CompiledWindow {
    pub kind: WindowKind,
    /// One per window function in the query: two for a window join.
    pub inputs: Vec<WindowTable>,
    /// SESSION: the key columns' indices in the (single) input stream.
    pub session_keys: Vec<usize>,
}

#[derive(Debug)]
pub struct CompiledQuery {
    pub spec: QuerySpec,
    pub plan: Plan,
    pub sink: usize,
    /// The stream read as micro-batches, for a query without a window.
    pub input: Option<usize>,
    pub window: Option<CompiledWindow>,
}

impl CompiledQuery {
    pub async fn execute(
        &self,
        task_ctx: Arc<TaskContext>,
    ) -> datafusion::error::Result<Vec<RecordBatch>> {
        self.plan.execute(task_ctx).await
    }

    pub async fn execute_replanned(
        &self,
        ctx: &SessionContext,
    ) -> datafusion::error::Result<Vec<RecordBatch>> {
        self.plan.execute_replanned(ctx).await
    }
}

#[derive(Debug)]
pub struct CompiledSink {
    pub spec: SinkSpec,
    /// The rows a sink receives: every field nullable, so queries that differ only in
    /// nullability feed one Parquet schema.
    pub schema: SchemaRef,
}

pub struct CompiledPipeline {
    pub ctx: SessionContext,
    pub sources: Vec<CompiledSource>,
    /// Sources first (same index), then presence, then views over streams.
    pub streams: Vec<Stream>,
    pub presence: Option<(PresenceSpec, usize)>,
    pub references: Vec<Reference>,
    pub sinks: Vec<CompiledSink>,
    pub queries: Vec<CompiledQuery>,
}

impl CompiledPipeline {
    /// A pipeline with nothing in it: a placeholder while a reload moves parts across.
    pub fn empty() -> CompiledPipeline {
        CompiledPipeline {
            ctx: session(),
            sources: vec![],
            streams: vec![],
            presence: None,
            references: vec![],
            sinks: vec![],
            queries: vec![],
        }
    }

    pub fn stream(&self, name: &str) -> Option<usize> {
        self.streams.iter().position(|s| s.name == name)
    }
}

/// The session every pipeline's plans run in.
pub fn session() -> SessionContext {
    let mut config = SessionConfig::new()
        // Windows of a small box's fleet fit one partition; repartitioning costs more than it gives.
        .with_target_partitions(1)
        .with_information_schema(false);
    // reset_plan_states does not reset dynamic filters, so cached plans must not use them.
    config
        .options_mut()
        .optimizer
        .enable_dynamic_filter_pushdown = false;
    let ctx = SessionContext::new_with_config(config);
    // The detector across sensors of one window; the detectors with state across windows
    // are registered per use (`register_rolling`).
    ctx.register_udwf(crate::functions::detect::peer::udwf());
    ctx
}

/// The presence stream's columns.
pub fn presence_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(DEVICE_ID, DataType::Utf8, false),
        Field::new(STATUS, DataType::Utf8, false),
        Field::new(SINCE, ts_type(), false),
        Field::new(LAST_SEEN, ts_type(), false),
        Field::new(EVENT_TIME, ts_type(), false),
    ]))
}

fn register_stream(ctx: &SessionContext, s: &Stream, loc: &Loc) -> Result<(), Diagnostic> {
    let table = StreamingTable::try_new(
        s.schema.clone(),
        vec![s.slot.clone() as Arc<dyn PartitionStream>],
    )
    .map_err(|e| loc.error(e.to_string()))?;
    ctx.register_table(s.name.as_str(), Arc::new(table))
        .map_err(|e| loc.error(e.to_string()))?;
    Ok(())
}

fn event_time_index(schema: &Schema) -> Option<usize> {
    schema
        .index_of(EVENT_TIME)
        .ok()
        .filter(|i| schema.field(*i).data_type() == &ts_type())
}

pub async fn compile(spec: PipelineSpec) -> Result<CompiledPipeline, Diagnostics> {
    compile_reusing(spec, None).await
}

/// A stream's slot: the previous pipeline's when it has a stream of that name and schema,
/// so plans kept across a hot reload read the rows the new pipeline hands out.
fn slot_for(prev: Option<&CompiledPipeline>, name: &str, schema: &SchemaRef) -> Arc<Slot> {
    prev.and_then(|p| {
        p.streams
            .iter()
            .find(|s| s.name == name && s.schema == *schema)
    })
    .map(|s| s.slot.clone())
    .unwrap_or_else(|| Slot::new(schema.clone()))
}

/// Compiles a pipeline that replaces `previous` (a hot reload): streams and reference
/// tables that keep their name and schema keep their slots.
pub async fn compile_reusing(
    spec: PipelineSpec,
    previous: Option<&CompiledPipeline>,
) -> Result<CompiledPipeline, Diagnostics> {
    let ctx = session();
    let mut errors = Vec::new();

    let mut sources = Vec::new();
    for s in &spec.sources {
        match compile_source(&ctx, s).await {
            Ok(c) => sources.push(c),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }
    let mut streams: Vec<Stream> = Vec::new();
    for (i, c) in sources.iter().enumerate() {
        streams.push(Stream {
            name: c.spec.name.clone(),
            schema: c.row_schema.clone(),
            slot: slot_for(previous, &c.spec.name, &c.row_schema),
            event_time: event_time_index(&c.row_schema),
            root: i,
            kind: StreamKind::Source(i),
        });
    }
    let presence = spec.presence.clone().map(|p| {
        let schema = presence_schema();
        let index = streams.len();
        streams.push(Stream {
            name: p.name.clone(),
            slot: slot_for(previous, &p.name, &schema),
            event_time: event_time_index(&schema),
            schema,
            root: index,
            kind: StreamKind::Presence,
        });
        (p, index)
    });
    for s in &streams {
        let loc = match &s.kind {
            StreamKind::Source(i) => &sources[*i].spec.loc,
            _ => match &presence {
                Some((p, _)) => &p.loc,
                None => continue,
            },
        };
        register_stream(&ctx, s, loc).map_err(Diagnostics::from)?;
    }

    let mut references = Vec::new();
    for r in &spec.references {
        let old = previous.and_then(|p| p.references.iter().find(|o| o.spec.name == r.name));
        match Reference::open(&ctx, r, old).await {
            Ok(reference) => references.push(reference),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }

    for v in &spec.views {
        if let Err(e) = compile_view(&ctx, v, &mut streams, previous).await {
            errors.push(e);
        }
    }

    let mut sink_schemas: Vec<Option<(SchemaRef, Loc)>> = vec![None; spec.sinks.len()];
    let mut declared: Vec<Option<SchemaRef>> = Vec::with_capacity(spec.sinks.len());
    for s in &spec.sinks {
        declared.push(if s.columns.is_empty() {
            None
        } else {
            match declared_schema(&ctx, &s.name, &s.columns, &s.loc).await {
                Ok(d) => Some(d),
                Err(e) => {
                    errors.push(e);
                    None
                }
            }
        });
    }
    let mut queries = Vec::new();
    for q in &spec.queries {
        match compile_query(&ctx, &spec, &streams, q).await {
            Ok(cq) => {
                let sink = &spec.sinks[cq.sink];
                let out = nullable(cq.plan.logical.schema().as_arrow());
                let checked = check_sink(sink, &out, q, &sink_schemas[cq.sink])
                    .and_then(|()| check_declared_types(sink, &out, q, &declared[cq.sink]));
                if let Err(e) = checked {
                    errors.push(e);
                } else if sink_schemas[cq.sink].is_none() {
                    sink_schemas[cq.sink] = Some((out, q.loc.clone()));
                }
                queries.push(cq);
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }

    let mut sinks = Vec::new();
    for (i, s) in spec.sinks.iter().enumerate() {
        let schema = match (&sink_schemas[i], s.columns.is_empty()) {
            (Some((schema, _)), _) => schema.clone(),
            (None, false) => nullable(
                declared_schema(&ctx, &s.name, &s.columns, &s.loc)
                    .await
                    .map_err(Diagnostics::from)?
                    .as_ref(),
            ),
            (None, true) => Arc::new(Schema::empty()),
        };
        sinks.push(CompiledSink {
            spec: s.clone(),
            schema,
        });
    }
    Ok(CompiledPipeline {
        ctx,
        sources,
        streams,
        presence,
        references,
        sinks,
        queries,
    })
}

async fn compile_source(
    ctx: &SessionContext,
    s: &SourceSpec,
) -> Result<CompiledSource, Diagnostic> {
    let payload = declared_schema(ctx, &s.name, &s.columns, &s.loc).await?;
    let event_time = match &s.event_time {
        None => EventTime::Received,
        Some(name) => {
            let f = payload
                .field_with_name(name)
                .map_err(|e| s.loc.error(e.to_string()))?;
            let ok = matches!(
                f.data_type(),
                DataType::Timestamp(_, _) | DataType::Utf8 | DataType::Utf8View
            ) || f.data_type().is_numeric();
            if !ok {
                return Err(s.loc.error(format!(
                    "event_time field `{name}` is {}; declare it TIMESTAMP (RFC 3339 text), VARCHAR, or a number of epoch seconds or milliseconds",
                    f.data_type()
                )));
            }
            EventTime::Field { name: name.clone() }
        }
    };
    let mut fields: Vec<Field> = s
        .topic
        .captures()
        .map(|c| Field::new(c, DataType::Utf8, false))
        .collect();
    fields.extend(payload.fields().iter().map(|f| f.as_ref().clone()));
    fields.push(Field::new(EVENT_TIME, ts_type(), false));
    fields.push(Field::new(RECEIVED_AT, ts_type(), false));
    let row_schema = Arc::new(Schema::new(fields));
    Ok(CompiledSource {
        spec: s.clone(),
        payload_schema: payload,
        row_schema,
        event_time,
    })
}

/// Turns declared columns into an Arrow schema with DataFusion's own SQL type mapping.
pub(crate) async fn declared_schema(
    ctx: &SessionContext,
    name: &str,
    columns: &[datafusion::sql::sqlparser::ast::ColumnDef],
    loc: &Loc,
) -> Result<SchemaRef, Diagnostic> {
    let stmt = Statement::CreateTable(CreateTable {
        name: ObjectName::from(vec![datafusion::sql::sqlparser::ast::Ident::new(format!(
            "__decl_{name}"
        ))]),
        columns: columns.to_vec(),
        table_options: CreateTableOptions::None,
        hive_distribution: HiveDistributionStyle::NONE,
        ..empty_create_table()
    });
    let plan = ctx
        .state()
        .statement_to_plan(DfStatement::Statement(Box::new(stmt)))
        .await
        .map_err(|e| df_error(loc, &e))?;
    Ok(Arc::new(plan.schema().as_arrow().clone()))
}

fn empty_create_table() -> CreateTable {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    // The struct has dozens of dialect-specific fields; let sqlparser fill them.
    match Parser::parse_sql(&GenericDialect {}, "CREATE TABLE t (a INT)")
        .ok()
        .and_then(|mut v| v.pop())
    {
        Some(Statement::CreateTable(ct)) => ct,
        _ => unreachable!("sqlparser parses a plain CREATE TABLE"),
    }
}

/// Registers the functions behind frames over past windows, one instance per use.
fn register_rolling(ctx: &SessionContext, rolling: &[RollingSpec]) {
    for r in rolling {
        let udf = match &r.state {
            StateSpec::Frame { func, frame } => {
                ScalarUDF::new_from_impl(Rolling::new(&r.udf, *func, *frame))
            }
            StateSpec::Detector { kind, dims } => {
                ScalarUDF::new_from_impl(Detect::new(&r.udf, kind.clone(), *dims))
            }
        };
        ctx.register_udf(udf);
    }
}

/// Plans a SELECT and reports errors at their place in the file.
async fn plan_query(
    ctx: &SessionContext,
    query: &datafusion::sql::sqlparser::ast::Query,
    loc: &Loc,
) -> Result<Plan, Diagnostic> {
    let stmt = DfStatement::Statement(Box::new(Statement::Query(Box::new(query.clone()))));
    let state = ctx.state();
    let located = |e: DataFusionError| {
        let mut d = df_error(loc, &e);
        if d.line == loc.line
            && d.column == loc.column
            && let Some(span) = unknown_column_span(query, &d.message)
        {
            d.line = span.start.line;
            d.column = span.start.column;
        }
        d
    };
    let logical = state.statement_to_plan(stmt).await.map_err(located)?;
    let logical = state.optimize(&logical).map_err(located)?;
    let physical = state
        .create_physical_plan(&logical)
        .await
        .map_err(located)?;
    Ok(Plan { logical, physical })
}

/// The streams a plan scans, by index.
fn scanned_streams(plan: &LogicalPlan, streams: &[Stream]) -> Vec<usize> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut scanned = Vec::new();
    let _ = plan.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            scanned.push(scan.table_name.table().to_string());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    streams
        .iter()
        .enumerate()
        .filter(|(_, s)| scanned.contains(&s.name))
        .map(|(i, _)| i)
        .collect()
}

/// A view over one stream becomes a stream of its own; a view over reference tables only
/// is an ordinary view.
async fn compile_view(
    ctx: &SessionContext,
    v: &ViewSpec,
    streams: &mut Vec<Stream>,
    previous: Option<&CompiledPipeline>,
) -> Result<(), Diagnostic> {
    register_rolling(ctx, &v.rolling);
    let plan = plan_query(ctx, &v.query, &v.loc).await?;
    let inputs = scanned_streams(&plan.logical, streams);
    match inputs.as_slice() {
        [] => {
            let view = datafusion::catalog::view::ViewTable::new(plan.logical, None);
            ctx.register_table(v.name.as_str(), Arc::new(view))
                .map_err(|e| v.loc.error(e.to_string()))?;
            Ok(())
        }
        [input] => {
            let schema = Arc::new(plan.logical.schema().as_arrow().clone());
            let stream = Stream {
                name: v.name.clone(),
                slot: slot_for(previous, &v.name, &schema),
                event_time: event_time_index(&schema),
                schema,
                root: streams[*input].root,
                kind: StreamKind::View {
                    plan,
                    input: *input,
                },
            };
            register_stream(ctx, &stream, &v.loc)?;
            streams.push(stream);
            Ok(())
        }
        _ => Err(v.loc.error(format!(
            "view `{}` reads {} streams; a view reads one stream (join streams inside a window: FROM TUMBLE(a, ...) JOIN TUMBLE(b, ...))",
            v.name,
            inputs
                .iter()
                .map(|i| format!("`{}`", streams[*i].name))
                .collect::<Vec<_>>()
                .join(" and ")
        ))),
    }
}

async fn compile_query(
    ctx: &SessionContext,
    spec: &PipelineSpec,
    streams: &[Stream],
    q: &QuerySpec,
) -> Result<CompiledQuery, Diagnostic> {
    let sink = spec
        .sinks
        .iter()
        .position(|s| s.name == q.sink)
        .ok_or_else(|| q.loc.error(format!("unknown sink `{}`", q.sink)))?;
    let window = match &q.window {
        None => None,
        Some(w) => Some(compile_window(ctx, streams, w)?),
    };
    register_rolling(ctx, &q.rolling);
    let plan = plan_query(ctx, &q.query, &q.loc).await?;
    let inputs = scanned_streams(&plan.logical, streams);
    if window.is_some() && !inputs.is_empty() {
        return Err(q.loc.error(format!(
            "a windowed query cannot also read `{}` row by row; read it through a window too",
            streams[inputs[0]].name
        )));
    }
    if window.is_none() && inputs.is_empty() {
        return Err(q
            .loc
            .error("the query reads no source or view: nothing would ever run it"));
    }
    if inputs.len() > 1 {
        return Err(q.loc.error(
            "a query without a window reads one stream; join streams inside a window: FROM TUMBLE(a, ...) JOIN TUMBLE(b, ...)",
        ));
    }
    Ok(CompiledQuery {
        spec: q.clone(),
        plan,
        sink,
        input: inputs.first().copied(),
        window,
    })
}

fn compile_window(
    ctx: &SessionContext,
    streams: &[Stream],
    w: &WindowSpec,
) -> Result<CompiledWindow, Diagnostic> {
    let mut inputs = Vec::new();
    let mut session_keys = Vec::new();
    for input in &w.inputs {
        let stream = streams
            .iter()
            .position(|s| s.name == input.stream)
            .ok_or_else(|| {
                input.loc.error(format!(
                    "`{}` is not a stream: windows run over sources and views of sources",
                    input.stream
                ))
            })?;
        let s = &streams[stream];
        if s.event_time.is_none() {
            return Err(input.loc.error(format!(
                "`{}` has no `{EVENT_TIME}` column (TIMESTAMP in UTC milliseconds): select it in the view to window it",
                s.name
            )));
        }
        if let WindowKind::Session { keys, .. } = &w.kind {
            for k in keys {
                let i = s.schema.index_of(k).map_err(|_| {
                    input
                        .loc
                        .error(format!("session key `{k}` is not a column of `{}`", s.name))
                })?;
                session_keys.push(i);
            }
        }
        let mut fields: Vec<Field> = s
            .schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(WINDOW_START, ts_type(), false));
        fields.push(Field::new(WINDOW_END, ts_type(), false));
        let schema = Arc::new(Schema::new(fields));
        let slot = Slot::new(schema.clone());
        let table = StreamingTable::try_new(
            schema.clone(),
            vec![slot.clone() as Arc<dyn PartitionStream>],
        )
        .map_err(|e| input.loc.error(e.to_string()))?;
        ctx.register_table(input.table.as_str(), Arc::new(table))
            .map_err(|e| input.loc.error(e.to_string()))?;
        inputs.push(WindowTable {
            stream,
            slot,
            schema,
        });
    }
    Ok(CompiledWindow {
        kind: w.kind.clone(),
        inputs,
        session_keys,
    })
}

fn check_sink(
    sink: &SinkSpec,
    out: &SchemaRef,
    q: &QuerySpec,
    earlier: &Option<(SchemaRef, Loc)>,
) -> Result<(), Diagnostic> {
    let names: Vec<&str> = out.fields().iter().map(|f| f.name().as_str()).collect();
    if let SinkKind::Mqtt { topic, .. } = &sink.kind {
        for c in topic.captures() {
            if !names.contains(&c) {
                return Err(q.loc.error(format!(
                    "sink `{}` builds its topic from `{{{c}}}`, but the query has no column `{c}` (it has: {})",
                    sink.name,
                    names.join(", ")
                )));
            }
        }
        if names.len() == topic.captures().count() {
            return Err(q.loc.error(format!(
                "every column of the query goes into the topic of `{}`; the command payload would be empty",
                sink.name
            )));
        }
    }
    if !sink.columns.is_empty() {
        let declared: Vec<&str> = sink.columns.iter().map(|c| c.name.value.as_str()).collect();
        if declared != names {
            return Err(q.loc.error(format!(
                "sink `{}` declares columns ({}) but the query produces ({})",
                sink.name,
                declared.join(", "),
                names.join(", ")
            )));
        }
    }
    if let Some((schema, loc)) = earlier
        && schema.fields() != out.fields()
    {
        return Err(q.loc.error(format!(
            "this query's columns differ from those of the query feeding `{}` at line {}: {} vs {}",
            sink.name,
            loc.line,
            describe(out),
            describe(schema)
        )));
    }
    Ok(())
}

/// A sink that declares its columns gets those types (strings of any Arrow flavour match).
fn check_declared_types(
    sink: &SinkSpec,
    out: &SchemaRef,
    q: &QuerySpec,
    declared: &Option<SchemaRef>,
) -> Result<(), Diagnostic> {
    let Some(declared) = declared else {
        return Ok(());
    };
    let stringy =
        |t: &DataType| matches!(t, DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8);
    for (d, o) in declared.fields().iter().zip(out.fields()) {
        let (dt, ot) = (d.data_type(), o.data_type());
        if dt != ot && !(stringy(dt) && stringy(ot)) {
            return Err(q.loc.error(format!(
                "sink `{}` declares `{}` as {dt}, but the query gives {ot}; CAST it",
                sink.name,
                d.name()
            )));
        }
    }
    Ok(())
}

fn describe(s: &Schema) -> String {
    s.fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn nullable(s: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        s.fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ))
}

/// A DataFusion planning error at its place in the file when DataFusion knows it.
fn df_error(loc: &Loc, e: &DataFusionError) -> Diagnostic {
    let message = clean_message(&e.strip_backtrace());
    if let Some(d) = e.diagnostic()
        && let Some(span) = d.span
        && span.start.line > 0
    {
        return Loc {
            file: loc.file.clone(),
            line: span.start.line,
            column: span.start.column,
        }
        .error(message);
    }
    loc.error(message)
}

/// DataFusion names an unknown column without its place on some planning paths; the
/// sqlparser AST knows where every identifier is.
fn unknown_column_span(
    query: &datafusion::sql::sqlparser::ast::Query,
    message: &str,
) -> Option<datafusion::sql::sqlparser::tokenizer::Span> {
    use datafusion::sql::sqlparser::ast::{Expr, visit_expressions};
    use std::ops::ControlFlow;
    let rest = message.split("No field named ").nth(1)?;
    let name = rest.split(['.', ' ']).next()?.trim_matches('"');
    let name = rest
        .strip_prefix('"')
        .and_then(|r| r.split('"').next())
        .map(|q| q.rsplit('.').next().unwrap_or(q))
        .unwrap_or(name);
    let mut found = None;
    let _ = visit_expressions(query, |e| {
        let ident = match e {
            Expr::Identifier(i) => Some(i),
            Expr::CompoundIdentifier(parts) => parts.last(),
            _ => None,
        };
        match ident {
            Some(i) if i.value.eq_ignore_ascii_case(name) => {
                found = Some(i.span);
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        }
    });
    found.filter(|s| s.start.line > 0)
}

fn clean_message(m: &str) -> String {
    // Internal window tables carry the query's name; users know them by their source.
    let mut s = m
        .replace("Error during planning: ", "")
        .replace("Schema error: ", "");
    while let Some(i) = s.find("__window_") {
        let end = s[i + 9..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map(|e| i + 9 + e)
            .unwrap_or(s.len());
        s.replace_range(i..end, "window");
    }
    s
}
