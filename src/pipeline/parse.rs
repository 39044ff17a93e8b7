//! Reads pipeline files into a [`PipelineSpec`]: sources, sinks, views and queries.
//!
//! Everything is parsed by sqlparser (the parser DataFusion uses); this module only gives
//! meaning to the statements. The language:
//!
//! ```sql
//! CREATE TABLE telemetry (light DOUBLE NOT NULL)
//!   WITH (connector = 'mqtt', type = 'source', topic = '{device_id}/telemetry');
//! CREATE TABLE commands WITH (connector = 'mqtt', type = 'sink', topic = '{device_id}/commands');
//! INSERT INTO commands SELECT device_id, light < 300 AS led_on FROM telemetry;
//! ```
//!
//! Windows are table functions in `FROM`, as in RisingWave and Flink:
//! `FROM TUMBLE(telemetry, event_time, INTERVAL '10 seconds')`, which adds `window_start`
//! and `window_end` columns; [`super::rewrite`] turns them (and frames that span windows)
//! into plain SQL.
//!
//! Besides MQTT sources and sinks, a pipeline declares reference tables read from CSV or
//! Parquet files (`connector = 'file'`), a presence stream (`connector = 'presence'`), and
//! views: a view over a stream is itself a stream, computed once per batch of rows and
//! shared by every query that reads it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use datafusion::sql::sqlparser::ast::{
    ColumnDef, CreateTableOptions, Expr, ObjectName, Query, SqlOption, Statement, TableObject,
    Value,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::Span;

use super::diag::{Diagnostic, Diagnostics, Loc, SourceFile};
pub use super::rewrite::{Frame, RollingFn, RollingSpec, WindowInput, WindowKind, WindowSpec};
use super::rewrite::{has_window, rewrite_rolling, rewrite_windows};
use super::topic::TopicPattern;
use crate::time::parse_duration;

/// Columns the engine adds to every source row, beside the payload and topic captures.
pub const EVENT_TIME: &str = "event_time";
pub const RECEIVED_AT: &str = "received_at";
pub const DEVICE_ID: &str = "device_id";
pub const WINDOW_START: &str = "window_start";
pub const WINDOW_END: &str = "window_end";
/// Columns of the presence stream.
pub const STATUS: &str = "status";
pub const SINCE: &str = "since";
pub const LAST_SEEN: &str = "last_seen";

#[derive(Debug, Clone, Default)]
pub struct PipelineSpec {
    pub sources: Vec<SourceSpec>,
    pub sinks: Vec<SinkSpec>,
    pub references: Vec<ReferenceSpec>,
    pub presence: Option<PresenceSpec>,
    pub views: Vec<ViewSpec>,
    pub queries: Vec<QuerySpec>,
}

/// A static table read from a file, joinable in queries and reloaded when the file changes.
#[derive(Debug, Clone)]
pub struct ReferenceSpec {
    pub name: String,
    /// Resolved against the pipeline file's folder when relative.
    pub path: PathBuf,
    pub format: FileFormat,
    pub columns: Vec<ColumnDef>,
    pub loc: Loc,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileFormat {
    Csv { header: bool, delimiter: u8 },
    Parquet,
}

/// The stream of devices' status changes: online when a device's first reading arrives,
/// offline when it has been silent for `timeout`; and, with a status topic, whatever the
/// device (or the broker, by its last will) announces there.
#[derive(Debug, Clone)]
pub struct PresenceSpec {
    pub name: String,
    pub timeout: Duration,
    pub status: Option<StatusTopicSpec>,
    pub loc: Loc,
}

/// A topic where devices announce themselves (`online`) and where their last will says
/// `offline` when the broker loses them.
#[derive(Debug, Clone)]
pub struct StatusTopicSpec {
    pub topic: TopicPattern,
    /// Payloads meaning online / offline, lower case; compared case-insensitively.
    pub online: Vec<String>,
    pub offline: Vec<String>,
}

/// Status payloads understood unless the pipeline says otherwise: the words of the common
/// conventions (plain, Tasmota's `Online`/`Offline`, Homie's `ready`/`lost`, Shelly's
/// `true`/`false`).
pub const DEFAULT_ONLINE: &[&str] = &["online", "ready", "connected", "true", "1"];
pub const DEFAULT_OFFLINE: &[&str] = &["offline", "lost", "disconnected", "false", "0"];

#[derive(Debug, Clone)]
pub struct SourceSpec {
    pub name: String,
    pub topic: TopicPattern,
    /// The declared JSON payload columns.
    pub columns: Vec<ColumnDef>,
    /// Payload field holding the event time; the receive time when absent.
    pub event_time: Option<String>,
    /// Payload field numbering each device's readings; duplicates are dropped.
    pub sequence: Option<String>,
    /// How far event time may run behind the newest reading before a window closes;
    /// `None`: 1 s for an event-time field, the engine's batching slack for receive time.
    pub watermark_delay: Option<Duration>,
    /// How far a reading's event time may run ahead of the engine's clock and still be
    /// windowed (a device clock set wrong must not hold rows, or the watermark, hostage).
    pub max_future: Duration,
    pub qos: u8,
    pub loc: Loc,
}

#[derive(Debug, Clone)]
pub enum SinkKind {
    Mqtt {
        topic: TopicPattern,
        qos: u8,
        retain: bool,
    },
    Parquet,
}

#[derive(Debug, Clone)]
pub struct SinkSpec {
    pub name: String,
    pub kind: SinkKind,
    /// Declared columns, checked against each query that inserts into the sink.
    pub columns: Vec<ColumnDef>,
    pub loc: Loc,
}

#[derive(Debug, Clone)]
pub struct ViewSpec {
    pub name: String,
    /// The view's SELECT, with frames over past rows already rewritten.
    pub query: Box<Query>,
    pub rolling: Vec<RollingSpec>,
    pub loc: Loc,
}

#[derive(Debug, Clone)]
pub struct QuerySpec {
    /// `<sink>` or `<sink>#<n>` when several queries feed one sink; used in metrics.
    pub name: String,
    pub sink: String,
    /// The SELECT, with window functions and frames over past windows already rewritten.
    pub query: Box<Query>,
    pub window: Option<WindowSpec>,
    pub rolling: Vec<RollingSpec>,
    pub loc: Loc,
}

/// A source's `max_future` unless declared: generous for clocks a little fast, short
/// enough that a device set to the wrong day is noticed at once.
pub const DEFAULT_MAX_FUTURE: Duration = Duration::from_secs(60);

const SOURCE_OPTIONS: &[&str] = &[
    "connector",
    "type",
    "topic",
    "format",
    "event_time",
    "watermark_delay",
    "max_future",
    "qos",
    "sequence",
];
const MQTT_SINK_OPTIONS: &[&str] = &["connector", "type", "topic", "qos", "retain"];
const PARQUET_SINK_OPTIONS: &[&str] = &["connector", "type"];
const FILE_OPTIONS: &[&str] = &["connector", "type", "path", "format", "header", "delimiter"];
const PRESENCE_OPTIONS: &[&str] = &[
    "connector",
    "type",
    "timeout",
    "status_topic",
    "online_values",
    "offline_values",
];
const CONNECTORS: &[&str] = &["mqtt", "parquet", "file", "presence"];

/// Parses one or more pipeline files into one pipeline; names are global across files.
pub fn parse_files(files: &[Arc<SourceFile>]) -> Result<PipelineSpec, Diagnostics> {
    let mut p = Parsed::default();
    for file in files {
        p.file(file);
    }
    p.finish()
}

#[derive(Default)]
struct Parsed {
    spec: PipelineSpec,
    errors: Vec<Diagnostic>,
    names: HashMap<String, Loc>,
    query_count: HashMap<String, usize>,
}

impl Parsed {
    fn file(&mut self, file: &Arc<SourceFile>) {
        let statements = match Parser::new(&GenericDialect {})
            .try_with_sql(&file.text)
            .and_then(|mut p| p.parse_statements())
        {
            Ok(s) => s,
            Err(e) => {
                self.errors.push(parser_error(file, &e.to_string()));
                return;
            }
        };
        if statements.is_empty() {
            self.errors.push(
                Loc {
                    file: file.clone(),
                    line: 0,
                    column: 0,
                }
                .error("the pipeline file holds no statements"),
            );
        }
        for stmt in statements {
            let loc = Loc::at(file, statement_span(&stmt));
            if let Err(e) = self.statement(file, stmt, loc) {
                self.errors.push(e);
            }
        }
    }

    fn declare(&mut self, name: &str, loc: &Loc) -> Result<(), Diagnostic> {
        if let Some(prev) = self.names.get(name) {
            return Err(loc.error(format!(
                "`{name}` is already defined at {}:{}:{}",
                prev.file.path.display(),
                prev.line,
                prev.column
            )));
        }
        self.names.insert(name.to_string(), loc.clone());
        Ok(())
    }

    fn statement(
        &mut self,
        file: &Arc<SourceFile>,
        stmt: Statement,
        loc: Loc,
    ) -> Result<(), Diagnostic> {
        match stmt {
            Statement::CreateTable(ct) => {
                let name = object_name(&ct.name);
                if ct.query.is_some() {
                    return Err(loc
                        .error("CREATE TABLE ... AS SELECT is not how a pipeline writes a table")
                        .with_help(format!("declare the sink, then write INSERT INTO {name} SELECT ...")));
                }
                let loc = Loc::at(file, ident_span(&ct.name).unwrap_or(Span::empty())).or(&loc);
                let options = match &ct.table_options {
                    CreateTableOptions::With(o) | CreateTableOptions::Options(o) => o.clone(),
                    CreateTableOptions::None => vec![],
                    _ => return Err(loc.error("write the table's options as WITH (key = 'value', ...)")),
                };
                let mut opts = Options::new(file, &options, &loc)?;
                let (connector, cloc) = opts.require("connector", CONNECTORS)?;
                let mut fixed_type = |t: &str, what: &str| -> Result<String, Diagnostic> {
                    if let Some((v, vloc)) = opts.take("type")
                        && !v.eq_ignore_ascii_case(t) {
                            return Err(vloc.error(format!("{what}: type = '{t}'")));
                        }
                    Ok(t.to_string())
                };
                let kind = match connector.as_str() {
                    "mqtt" => opts.require("type", &["source", "sink"])?.0,
                    "parquet" => fixed_type("sink", "a parquet table is a sink")?,
                    "file" => fixed_type("reference", "a file table is reference data")?,
                    "presence" => fixed_type("source", "the presence table is a source")?,
                    other => {
                        return Err(cloc
                            .error(format!("unknown connector `{other}`"))
                            .with_help(format!("valid connectors: {}", CONNECTORS.join(", "))));
                    }
                };
                self.declare(&name, &loc)?;
                if connector == "file" {
                    let r = reference(file, name, ct.columns, opts, loc)?;
                    self.spec.references.push(r);
                } else if connector == "presence" {
                    if let Some(p) = &self.spec.presence {
                        return Err(loc.error(format!(
                            "the pipeline already has a presence table, `{}`",
                            p.name
                        )));
                    }
                    if !ct.columns.is_empty() {
                        return Err(loc.error(format!(
                            "the presence table's columns are fixed ({DEVICE_ID}, {STATUS}, {SINCE}, {LAST_SEEN}, {EVENT_TIME}); declare none"
                        )));
                    }
                    let timeout = match opts.take("timeout") {
                        Some((t, l)) => parse_duration(&t).map_err(|e| l.error(e))?,
                        None => Duration::from_secs(60),
                    };
                    let status = status_topic(&mut opts)?;
                    opts.finish(PRESENCE_OPTIONS, "a presence table")?;
                    self.spec.presence = Some(PresenceSpec {
                        name,
                        timeout,
                        status,
                        loc,
                    });
                } else if kind == "source" {
                    let source = self.source(name, ct.columns, opts, loc)?;
                    self.spec.sources.push(source);
                } else {
                    let sink = sink(name, &connector, ct.columns, opts, loc)?;
                    self.spec.sinks.push(sink);
                }
                Ok(())
            }
            Statement::CreateView(cv) => {
                let name = object_name(&cv.name);
                self.declare(&name, &loc)?;
                if has_window(&cv.query) {
                    return Err(loc.error("windows belong in the query that reads the view (INSERT INTO ... SELECT ... FROM TUMBLE(view, ...)), not in a view"));
                }
                let mut query = cv.query;
                let owner = format!("v_{}", internal_tag(&name));
                let rolling = rewrite_rolling(file, &mut query, &owner, false)?;
                self.spec.views.push(ViewSpec { name, query, rolling, loc });
                Ok(())
            }
            Statement::Insert(ins) => {
                let TableObject::TableName(target) = &ins.table else {
                    return Err(loc.error("INSERT INTO needs a sink name"));
                };
                let sink = object_name(target);
                let Some(mut query) = ins.source else {
                    return Err(loc.error("INSERT INTO a sink takes a SELECT"));
                };
                let n = self.query_count.entry(sink.clone()).or_insert(0);
                *n += 1;
                let name = if *n == 1 { sink.clone() } else { format!("{sink}#{n}") };
                // Internal names derive from the query's name, not its position, so an edit
                // elsewhere in the file leaves them (and a hot reload's matching) alone.
                let tag = internal_tag(&name);
                let window = rewrite_windows(file, &mut query, &tag)?;
                let rolling =
                    rewrite_rolling(file, &mut query, &format!("q_{tag}"), window.is_some())?;
                self.spec.queries.push(QuerySpec { name, sink, query, window, rolling, loc });
                Ok(())
            }
            other => Err(loc.error(format!(
                "unsupported statement `{}`: a pipeline holds CREATE TABLE (sources and sinks), CREATE VIEW and INSERT INTO",
                first_words(&other.to_string())
            ))),
        }
    }

    fn source(
        &mut self,
        name: String,
        columns: Vec<ColumnDef>,
        mut opts: Options,
        loc: Loc,
    ) -> Result<SourceSpec, Diagnostic> {
        let (topic_text, tloc) = opts.require_any("topic")?;
        let topic = TopicPattern::parse(&topic_text).map_err(|e| tloc.error(e))?;
        if !topic.captures().any(|c| c == DEVICE_ID) {
            return Err(tloc
                .error("a source topic must capture the device id")
                .with_help("write e.g. topic = '{device_id}/telemetry'"));
        }
        if let Some((f, floc)) = opts.take("format")
            && f != "json"
        {
            return Err(floc
                .error(format!("unknown format `{f}`"))
                .with_help("valid formats: json"));
        }
        let event_time = opts.take("event_time");
        let watermark_delay = match opts.take("watermark_delay") {
            // Zero is a legitimate choice: readings arrive in order.
            Some((t, _)) if is_zero_duration(&t) => Some(Duration::ZERO),
            Some((t, l)) => Some(parse_duration(&t).map_err(|e| l.error(e))?),
            None => None,
        };
        let max_future = match opts.take("max_future") {
            Some((t, _)) if is_zero_duration(&t) => Duration::ZERO,
            Some((t, l)) => parse_duration(&t).map_err(|e| l.error(e))?,
            None => DEFAULT_MAX_FUTURE,
        };
        let qos = qos(opts.take("qos"))?;
        let sequence = opts.take("sequence");
        opts.finish(SOURCE_OPTIONS, "an mqtt source")?;

        // Column names must not collide with what the engine adds.
        let reserved: Vec<&str> = topic.captures().chain([EVENT_TIME, RECEIVED_AT]).collect();
        for c in &columns {
            if reserved.contains(&c.name.value.as_str()) {
                return Err(Loc::at(&loc.file, c.name.span).or(&loc).error(format!(
                    "column `{}` is added by the engine (from the topic or the clock); rename the payload field",
                    c.name.value
                )));
            }
        }
        if columns.is_empty() {
            return Err(loc.error(format!("source `{name}` declares no payload columns"))
                .with_help("declare the JSON fields, e.g. CREATE TABLE telemetry (light DOUBLE) WITH (...)"));
        }
        let event_time = match event_time {
            None => None,
            Some((field, floc)) => {
                if !columns.iter().any(|c| c.name.value == field) {
                    return Err(floc.error(format!(
                        "event_time field `{field}` is not a declared column"
                    )));
                }
                Some(field)
            }
        };
        let sequence = match sequence {
            None => None,
            Some((field, floc)) => {
                if !columns.iter().any(|c| c.name.value == field) {
                    return Err(
                        floc.error(format!("sequence field `{field}` is not a declared column"))
                    );
                }
                Some(field)
            }
        };
        Ok(SourceSpec {
            name,
            topic,
            columns,
            event_time,
            sequence,
            watermark_delay,
            max_future,
            qos,
            loc,
        })
    }

    fn finish(self) -> Result<PipelineSpec, Diagnostics> {
        let mut errors = self.errors;
        let spec = self.spec;
        let names = self.names;
        // Cross-statement checks.
        for q in &spec.queries {
            if !spec.sinks.iter().any(|s| s.name == q.sink) {
                let what = if spec.sources.iter().any(|s| s.name == q.sink) {
                    format!("`{}` is a source; INSERT INTO a sink", q.sink)
                } else {
                    format!("unknown sink `{}`", q.sink)
                };
                errors.push(q.loc.error(what).with_help("declare it with CREATE TABLE ... WITH (connector = 'mqtt', type = 'sink', ...) or (connector = 'parquet')"));
            }
            for w in q.window.iter().flat_map(|w| &w.inputs) {
                let is_stream = spec.sources.iter().any(|s| s.name == w.stream)
                    || spec.views.iter().any(|v| v.name == w.stream)
                    || spec.presence.as_ref().is_some_and(|p| p.name == w.stream);
                // A name declared by a statement that failed already has its error.
                let failed = names.contains_key(&w.stream)
                    && !spec.sinks.iter().any(|s| s.name == w.stream)
                    && !spec.references.iter().any(|r| r.name == w.stream);
                if !is_stream && !failed {
                    errors.push(w.loc.error(format!(
                        "`{}` is not a source or view: windows run over streams",
                        w.stream
                    )));
                }
            }
        }
        if errors.is_empty() && spec.sources.is_empty() {
            errors.push(Diagnostic::global("the pipeline declares no source (CREATE TABLE ... WITH (connector = 'mqtt', type = 'source', ...))"));
        }
        if errors.is_empty() {
            Ok(spec)
        } else {
            Err(Diagnostics(errors))
        }
    }
}

/// The presence table's status topic options, if `status_topic` is given.
fn status_topic(opts: &mut Options) -> Result<Option<StatusTopicSpec>, Diagnostic> {
    let Some((text, tloc)) = opts.take("status_topic") else {
        for key in ["online_values", "offline_values"] {
            if let Some((_, l)) = opts.take(key) {
                return Err(l
                    .error(format!("`{key}` needs a `status_topic`"))
                    .with_help("add e.g. status_topic = '{device_id}/status'"));
            }
        }
        return Ok(None);
    };
    let topic = TopicPattern::parse(&text).map_err(|e| tloc.error(e))?;
    if !topic.captures().any(|c| c == DEVICE_ID) {
        return Err(tloc
            .error("a status topic must capture the device id")
            .with_help("write e.g. status_topic = '{device_id}/status'"));
    }
    let mut values = |key: &str, default: &[&str]| -> (Vec<String>, Loc) {
        match opts.take(key) {
            Some((v, l)) => (v.split(',').map(|w| w.trim().to_lowercase()).collect(), l),
            None => (
                default.iter().map(|w| w.to_string()).collect(),
                tloc.clone(),
            ),
        }
    };
    let (online, onloc) = values("online_values", DEFAULT_ONLINE);
    let (offline, offloc) = values("offline_values", DEFAULT_OFFLINE);
    for (words, l) in [(&online, &onloc), (&offline, &offloc)] {
        if words.iter().any(|w| w.is_empty()) {
            return Err(l
                .error("an empty status value")
                .with_help("list the payloads as comma-separated words, e.g. 'online,up'"));
        }
    }
    if let Some(w) = online.iter().find(|w| offline.contains(w)) {
        return Err(offloc.error(format!("`{w}` means both online and offline")));
    }
    Ok(Some(StatusTopicSpec {
        topic,
        online,
        offline,
    }))
}

fn sink(
    name: String,
    connector: &str,
    columns: Vec<ColumnDef>,
    mut opts: Options,
    loc: Loc,
) -> Result<SinkSpec, Diagnostic> {
    let kind = match connector {
        "mqtt" => {
            let (t, tloc) = opts.require_any("topic")?;
            let topic = TopicPattern::parse(&t).map_err(|e| tloc.error(e))?;
            if topic.has_wildcards() {
                return Err(tloc.error("a sink topic cannot hold `+` or `#`: fill its levels from columns with `{column}`"));
            }
            let qos = qos(opts.take("qos"))?;
            let retain = match opts.take("retain") {
                None => false,
                Some((v, l)) => parse_bool(&v)
                    .ok_or_else(|| l.error(format!("retain must be true or false, not `{v}`")))?,
            };
            opts.finish(MQTT_SINK_OPTIONS, "an mqtt sink")?;
            SinkKind::Mqtt { topic, qos, retain }
        }
        _ => {
            opts.finish(PARQUET_SINK_OPTIONS, "a parquet sink")?;
            SinkKind::Parquet
        }
    };
    Ok(SinkSpec {
        name,
        kind,
        columns,
        loc,
    })
}

fn reference(
    file: &Arc<SourceFile>,
    name: String,
    columns: Vec<ColumnDef>,
    mut opts: Options,
    loc: Loc,
) -> Result<ReferenceSpec, Diagnostic> {
    let (path_text, ploc) = opts.require_any("path")?;
    let mut path = PathBuf::from(&path_text);
    if path.is_relative()
        && let Some(dir) = file.path.parent()
    {
        path = dir.join(path);
    }
    let by_extension = match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("parquet") => Some("parquet"),
        Some(e) if e.eq_ignore_ascii_case("csv") => Some("csv"),
        _ => None,
    };
    let format = match opts.take("format") {
        Some((f, floc)) => match f.to_ascii_lowercase().as_str() {
            "csv" => "csv",
            "parquet" => "parquet",
            _ => {
                return Err(floc
                    .error(format!("unknown format `{f}`"))
                    .with_help("valid formats: csv, parquet"));
            }
        },
        None => by_extension.ok_or_else(|| {
            ploc.error(format!(
                "cannot tell the format of `{path_text}` from its name"
            ))
            .with_help("add format = 'csv' or format = 'parquet'")
        })?,
    };
    let format = if format == "csv" {
        let header = match opts.take("header") {
            None => true,
            Some((v, l)) => parse_bool(&v)
                .ok_or_else(|| l.error(format!("header must be true or false, not `{v}`")))?,
        };
        let delimiter = match opts.take("delimiter") {
            None => b',',
            Some((v, _)) if v.len() == 1 => v.as_bytes()[0],
            Some((v, l)) => {
                return Err(l.error(format!("delimiter must be one character, not `{v}`")));
            }
        };
        if columns.is_empty() {
            return Err(loc
                .error(format!("reference table `{name}` reads CSV: declare its columns and types"))
                .with_help(format!("e.g. CREATE TABLE {name} (device_id VARCHAR, site VARCHAR) WITH (connector = 'file', path = '{path_text}')")));
        }
        FileFormat::Csv { header, delimiter }
    } else {
        FileFormat::Parquet
    };
    opts.finish(FILE_OPTIONS, "a file table")?;
    Ok(ReferenceSpec {
        name,
        path,
        format,
        columns,
        loc,
    })
}

/// `0`, `0s`, `0 seconds`, `0.0 ms`...: a number that is zero, then only a unit.
fn is_zero_duration(t: &str) -> bool {
    let t = t.trim();
    let number: String = t
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let unit = t[number.len()..].trim();
    !number.is_empty()
        && number.parse::<f64>() == Ok(0.0)
        && unit.chars().all(|c| c.is_ascii_alphabetic())
}

/// A name usable inside internal table and function names.
/// The readable part is followed by a hash of the exact name, so `out#2` and `out_2` stay
/// apart; stable within a process, which is all a hot reload needs.
fn internal_tag(name: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    let readable: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{readable}_{:08x}", h.finish() as u32)
}

fn qos(v: Option<(String, Loc)>) -> Result<u8, Diagnostic> {
    match v {
        None => Ok(1),
        Some((v, l)) => match v.as_str() {
            "0" => Ok(0),
            "1" => Ok(1),
            "2" => Ok(2),
            _ => Err(l.error(format!("qos must be 0, 1 or 2, not `{v}`"))),
        },
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// A table's `WITH (...)` options, consumed one by one so leftovers can be reported.
struct Options {
    items: Vec<(String, String, Loc)>,
    table: Loc,
}

impl Options {
    fn new(
        file: &Arc<SourceFile>,
        options: &[SqlOption],
        table: &Loc,
    ) -> Result<Options, Diagnostic> {
        let mut items = Vec::new();
        for o in options {
            let SqlOption::KeyValue { key, value } = o else {
                return Err(table.error(format!("option `{o}` is not of the form key = 'value'")));
            };
            let loc = Loc::at(file, key.span).or(table);
            let text = match value {
                Expr::Value(v) => match &v.value {
                    Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
                    Value::Number(n, _) => n.clone(),
                    Value::Boolean(b) => b.to_string(),
                    other => {
                        return Err(loc.error(format!(
                            "option `{}`: unsupported value `{other}`",
                            key.value
                        )));
                    }
                },
                Expr::Identifier(i) => i.value.clone(),
                other => {
                    return Err(loc.error(format!(
                        "option `{}`: write the value as a string, not `{other}`",
                        key.value
                    )));
                }
            };
            let k = key.value.to_ascii_lowercase();
            if items.iter().any(|(k2, _, _)| *k2 == k) {
                return Err(loc.error(format!("option `{k}` is given twice")));
            }
            items.push((k, text, loc));
        }
        Ok(Options {
            items,
            table: table.clone(),
        })
    }

    fn take(&mut self, key: &str) -> Option<(String, Loc)> {
        let i = self.items.iter().position(|(k, _, _)| k == key)?;
        let (_, v, l) = self.items.remove(i);
        Some((v, l))
    }

    fn require_any(&mut self, key: &str) -> Result<(String, Loc), Diagnostic> {
        self.take(key)
            .ok_or_else(|| self.table.error(format!("missing option `{key}`")))
    }

    fn require(&mut self, key: &str, valid: &[&str]) -> Result<(String, Loc), Diagnostic> {
        let Some((v, l)) = self.take(key) else {
            return Err(self
                .table
                .error(format!("missing option `{key}`"))
                .with_help(format!("{key} is one of: {}", valid.join(", "))));
        };
        let lower = v.to_ascii_lowercase();
        if !valid.contains(&lower.as_str()) {
            return Err(l
                .error(format!("unknown {key} `{v}`"))
                .with_help(format!("valid values: {}", valid.join(", "))));
        }
        Ok((lower, l))
    }

    fn finish(self, valid: &[&str], what: &str) -> Result<(), Diagnostic> {
        match self.items.into_iter().next() {
            None => Ok(()),
            Some((k, _, l)) => Err(l
                .error(format!("unknown option `{k}` for {what}"))
                .with_help(format!("valid options: {}", valid.join(", ")))),
        }
    }
}

impl Loc {
    /// This location, or `other` when this one is empty (sqlparser gave no span).
    fn or(self, other: &Loc) -> Loc {
        if self.line == 0 { other.clone() } else { self }
    }
}

fn object_name(n: &ObjectName) -> String {
    n.0.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

fn ident_span(n: &ObjectName) -> Option<Span> {
    n.0.first().and_then(|p| p.as_ident()).map(|i| i.span)
}

fn statement_span(stmt: &Statement) -> Span {
    use datafusion::sql::sqlparser::ast::Spanned;
    stmt.span()
}

fn first_words(s: &str) -> String {
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// sqlparser reports its position only inside the message ("... at Line: 3, Column: 7").
fn parser_error(file: &Arc<SourceFile>, message: &str) -> Diagnostic {
    let (msg, line, column) = match message.rsplit_once(" at Line: ") {
        Some((m, rest)) => {
            let mut it = rest.split(", Column: ");
            let line = it.next().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
            let col = it.next().and_then(|c| c.trim().parse().ok()).unwrap_or(0);
            (m.to_string(), line, col)
        }
        None => (message.to_string(), 0, 0),
    };
    let msg = msg.trim_start_matches("sql parser error: ").to_string();
    Loc {
        file: file.clone(),
        line,
        column,
    }
    .error(format!("syntax error: {msg}"))
}
