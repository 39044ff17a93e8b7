//! Compiles a [`PipelineSpec`] with DataFusion: every source and window becomes a table
//! whose rows are supplied at execution time (a [`Slot`]), every view is registered, and
//! every query is planned once into a physical plan that the engine re-runs per window.
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

use super::diag::{Diagnostic, Diagnostics, Loc};
use super::parse::{
    EVENT_TIME, PipelineSpec, QuerySpec, RECEIVED_AT, SinkKind, SinkSpec, SourceSpec, WINDOW_END,
    WINDOW_START,
};

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
    /// Micro-batch input for queries that read the source without a window.
    pub slot: Arc<Slot>,
}

#[derive(Debug)]
pub struct CompiledWindow {
    pub source: usize,
    pub size_ms: i64,
    pub slot: Arc<Slot>,
    /// Source row schema plus window_start and window_end.
    pub schema: SchemaRef,
}

#[derive(Debug)]
pub struct CompiledQuery {
    pub spec: QuerySpec,
    pub logical: LogicalPlan,
    pub plan: Arc<dyn ExecutionPlan>,
    pub sink: usize,
    /// Sources read directly, as micro-batches (empty for windowed queries).
    pub inputs: Vec<usize>,
    pub window: Option<CompiledWindow>,
}

impl CompiledQuery {
    /// Runs the cached physical plan over whatever its slots hold now.
    pub async fn execute(
        &self,
        task_ctx: Arc<TaskContext>,
    ) -> datafusion::error::Result<Vec<RecordBatch>> {
        let plan = reset_plan_states(self.plan.clone())?;
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
    pub sinks: Vec<CompiledSink>,
    pub queries: Vec<CompiledQuery>,
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
    SessionContext::new_with_config(config)
}

pub async fn compile(spec: PipelineSpec) -> Result<CompiledPipeline, Diagnostics> {
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
    for c in &sources {
        let table = StreamingTable::try_new(
            c.row_schema.clone(),
            vec![c.slot.clone() as Arc<dyn PartitionStream>],
        )
        .map_err(|e| Diagnostics(vec![c.spec.loc.error(e.to_string())]))?;
        ctx.register_table(c.spec.name.as_str(), Arc::new(table))
            .map_err(|e| Diagnostics(vec![c.spec.loc.error(e.to_string())]))?;
    }

    for v in &spec.views {
        let r = async {
            let plan = ctx
                .state()
                .statement_to_plan(DfStatement::Statement(Box::new(v.statement.clone())))
                .await?;
            ctx.execute_logical_plan(plan).await?;
            Ok::<_, DataFusionError>(())
        }
        .await;
        if let Err(e) = r {
            errors.push(df_error(&v.loc, &e));
        }
    }

    let mut sink_schemas: Vec<Option<(SchemaRef, Loc)>> = vec![None; spec.sinks.len()];
    let mut queries = Vec::new();
    for q in &spec.queries {
        match compile_query(&ctx, &spec, &sources, q).await {
            Ok(cq) => {
                let sink = &spec.sinks[cq.sink];
                let out = nullable(cq.logical.schema().as_arrow());
                if let Err(e) = check_sink(sink, &out, q, &sink_schemas[cq.sink]) {
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
        slot: Slot::new(row_schema.clone()),
        row_schema,
        event_time,
    })
}

/// Turns declared columns into an Arrow schema with DataFusion's own SQL type mapping.
async fn declared_schema(
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

async fn compile_query(
    ctx: &SessionContext,
    spec: &PipelineSpec,
    sources: &[CompiledSource],
    q: &QuerySpec,
) -> Result<CompiledQuery, Diagnostic> {
    let sink = spec
        .sinks
        .iter()
        .position(|s| s.name == q.sink)
        .ok_or_else(|| q.loc.error(format!("unknown sink `{}`", q.sink)))?;
    let window = match &q.window {
        None => None,
        Some(w) => {
            let source = sources
                .iter()
                .position(|s| s.spec.name == w.source)
                .ok_or_else(|| w.loc.error(format!("`{}` is not a source", w.source)))?;
            let mut fields: Vec<Field> = sources[source]
                .row_schema
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
            .map_err(|e| w.loc.error(e.to_string()))?;
            ctx.register_table(w.table.as_str(), Arc::new(table))
                .map_err(|e| w.loc.error(e.to_string()))?;
            Some(CompiledWindow {
                source,
                size_ms: w.size.as_millis() as i64,
                slot,
                schema,
            })
        }
    };
    let stmt = DfStatement::Statement(Box::new(Statement::Query(q.query.clone())));
    let state = ctx.state();
    let located = |e: DataFusionError| {
        let mut d = df_error(&q.loc, &e);
        if d.line == q.loc.line && d.column == q.loc.column {
            if let Some(span) = unknown_column_span(&q.query, &d.message) {
                d.line = span.start.line;
                d.column = span.start.column;
            }
        }
        d
    };
    let logical = state.statement_to_plan(stmt).await.map_err(located)?;
    let logical = state.optimize(&logical).map_err(located)?;
    let plan = state
        .create_physical_plan(&logical)
        .await
        .map_err(located)?;

    let mut scanned = Vec::new();
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let _ = logical.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            scanned.push(scan.table_name.table().to_string());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    let inputs: Vec<usize> = sources
        .iter()
        .enumerate()
        .filter(|(_, s)| scanned.iter().any(|t| *t == s.spec.name))
        .map(|(i, _)| i)
        .collect();
    if window.is_some() && !inputs.is_empty() {
        return Err(q.loc.error(
            "a windowed query cannot also read a source directly; join windows of the same source through one TUMBLE",
        ));
    }
    if window.is_none() && inputs.is_empty() {
        return Err(q
            .loc
            .error("the query reads no source: nothing would ever run it"));
    }
    if inputs.len() > 1 {
        return Err(q.loc.error(
            "a query without a window reads one source; windows join streams (one TUMBLE per query for now)",
        ));
    }
    Ok(CompiledQuery {
        spec: q.clone(),
        logical,
        plan,
        sink,
        inputs,
        window,
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
    if let Some((schema, loc)) = earlier {
        if schema.fields() != out.fields() {
            return Err(q.loc.error(format!(
                "this query's columns differ from those of the query feeding `{}` at line {}: {} vs {}",
                sink.name,
                loc.line,
                describe(out),
                describe(schema)
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
    if let Some(d) = e.diagnostic() {
        if let Some(span) = d.span {
            if span.start.line > 0 {
                return Loc {
                    file: loc.file.clone(),
                    line: span.start.line,
                    column: span.start.column,
                }
                .error(message);
            }
        }
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
    // Internal window tables carry the query's index; users know them by their source.
    let mut s = m
        .replace("Error during planning: ", "")
        .replace("Schema error: ", "");
    while let Some(i) = s.find("__window_") {
        let end = s[i + 9..]
            .find(|c: char| !c.is_ascii_digit())
            .map(|e| i + 9 + e)
            .unwrap_or(s.len());
        s.replace_range(i..end, "window");
    }
    s
}
