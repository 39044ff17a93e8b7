//! `fleetsql replay`: a pipeline run over recorded files (CSV, Parquet) instead of a
//! broker, as fast as the machine allows, in event time.
//!
//! It drives the same [`Runner`] as `fleetsql run` (and `engine::local`): the files' rows
//! become one source's rows (`input`), and the replay's clock is the newest event time
//! replayed so far, so windows close, rows are late and frames slide exactly as the
//! recorded times say, whatever the speed of the machine. It writes the tables
//! `fleetsql run` would (raw source table, Parquet sinks, `dead_letters`, `late_rows`);
//! an MQTT sink's commands go to a table named after the sink (`topic`, `payload`: the
//! exact message the engine would publish) instead of a broker. No broker, actors,
//! write-ahead log, checkpoints or metrics endpoint: a replay that fails is run again.

pub mod input;

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use datafusion::arrow::array::{ArrayRef, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;

use crate::engine::{DEAD_LETTERS, LATE_ROWS, Output, Outputs, Runner};
use crate::engine::{dead_letter_schema, late_rows_schema};
use crate::metrics::Metrics;
use crate::pipeline::CompiledPipeline;
use crate::pipeline::parse::SinkKind;
use crate::pipeline::topic::TopicPattern;
use crate::sink::parquet::{ParquetTable, RollPolicy};
use input::InputFile;

/// What a replay reads and how (the command line's options).
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Replayed in this order, each in file order.
    pub inputs: Vec<PathBuf>,
    /// The source the files feed; the pipeline's only source when `None`.
    pub source: Option<String>,
    pub data_dir: PathBuf,
    /// Columns filled with one value for every row.
    pub set: Vec<(String, String)>,
    /// File column -> source column renames.
    pub map: Vec<(String, String)>,
    /// A column filled with each file's name without its extension.
    pub key_from_file: Option<String>,
    /// The files' time column when the source declares no event-time field.
    pub time_column: Option<String>,
    /// Rows per chunk handed to the runner.
    pub batch_rows: usize,
    /// Also write every sink table as `<data-dir>/<table>.csv`.
    pub csv: bool,
    /// Draw a progress bar (on stderr, and only when it is a terminal).
    pub progress: bool,
}

/// What a replay did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Rows handed to the pipeline.
    pub rows: u64,
    pub dead_letters: u64,
    pub seconds: f64,
    pub data_dir: PathBuf,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = self.rows as f64 / self.seconds.max(1e-9);
        write!(
            f,
            "replayed {} rows ({} dead letters) in {:.2} s, {:.0} rows/s; tables in {}",
            self.rows,
            self.dead_letters,
            self.seconds,
            rate,
            self.data_dir.display()
        )
    }
}

/// Parses `NAME=VALUE` (`--set`, `--map`).
pub fn pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("`{s}`: write NAME=VALUE")),
    }
}

/// How the timestamps of `--csv` files print: `2014-04-01 00:00:00`, with the fraction of
/// a second only when there is one (chrono's `%.f` prints nothing for a whole second).
const CSV_TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.f";

/// A sink's table, fed from what the runner captured for it.
struct SinkTable {
    name: String,
    table: ParquetTable,
    schema: SchemaRef,
    rows: Arc<Mutex<Vec<RecordBatch>>>,
    /// For an MQTT sink: its topic template; its rows become (topic, payload, columns).
    commands: Option<TopicPattern>,
    csv: Option<arrow_csv::Writer<BufWriter<File>>>,
}

impl SinkTable {
    /// Writes what the runner handed the sink since the last call, in the order the
    /// queries produced it.
    fn drain(&mut self) -> anyhow::Result<()> {
        let batches = std::mem::take(&mut *self.rows.lock().unwrap_or_else(|p| p.into_inner()));
        for b in batches {
            let b = match &self.commands {
                Some(topic) => command_rows(topic, &self.schema, &b)?,
                // Queries feeding one sink share its columns, nullability aside.
                None => RecordBatch::try_new(self.schema.clone(), b.columns().to_vec())?,
            };
            if let Some(w) = self.csv.as_mut() {
                w.write(&b)
                    .with_context(|| format!("cannot write {}.csv", self.name))?;
            }
            self.table.write(b);
        }
        Ok(())
    }
}

/// The table of an MQTT sink's commands: `topic` and `payload` (what would have been
/// published), then the sink's own columns but those two names.
fn command_schema(sink: &SchemaRef) -> SchemaRef {
    let mut fields = vec![
        Field::new("topic", DataType::Utf8, true),
        Field::new("payload", DataType::Utf8, false),
    ];
    fields.extend(
        sink.fields()
            .iter()
            .filter(|f| f.name() != "topic" && f.name() != "payload")
            .map(|f| f.as_ref().clone()),
    );
    Arc::new(Schema::new(fields))
}

fn command_rows(
    topic: &TopicPattern,
    schema: &SchemaRef,
    batch: &RecordBatch,
) -> anyhow::Result<RecordBatch> {
    // The very encoder the command publisher uses: the payload is byte for byte the message.
    let messages = crate::sink::commands::encode(topic, batch)?;
    let topics: StringArray = messages.iter().map(|(t, _)| t.as_deref()).collect();
    let payloads: StringArray = messages
        .iter()
        .map(|(_, p)| Some(String::from_utf8_lossy(p).into_owned()))
        .collect();
    let mut cols: Vec<ArrayRef> = vec![Arc::new(topics), Arc::new(payloads)];
    let own = batch.schema();
    for f in schema.fields().iter().skip(2) {
        cols.push(batch.column(own.index_of(f.name())?).clone());
    }
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

/// A replay checked and ready: the pipeline, its source and every input file, opened and
/// matched against the source.
pub struct Replay {
    pipeline: CompiledPipeline,
    source: usize,
    files: Vec<InputFile>,
    opts: ReplayOptions,
}

impl Replay {
    /// Checks everything that can be checked before a row is written: the source, every
    /// file's columns, the options, the data dir.
    pub fn prepare(pipeline: CompiledPipeline, opts: ReplayOptions) -> anyhow::Result<Replay> {
        let names: Vec<&str> = pipeline
            .sources
            .iter()
            .map(|s| s.spec.name.as_str())
            .collect();
        let source = match &opts.source {
            Some(n) => names.iter().position(|s| s == n).ok_or_else(|| {
                anyhow!(
                    "--source {n}: the pipeline has no source `{n}` (its sources: {})",
                    names.join(", ")
                )
            })?,
            None if names.len() == 1 => 0,
            None if names.is_empty() => bail!("the pipeline declares no source to replay into"),
            None => bail!(
                "the pipeline has several sources ({}); say which one the files feed with --source NAME",
                names.join(", ")
            ),
        };
        if opts.batch_rows == 0 {
            bail!("--batch-rows must be at least 1");
        }
        let src = &pipeline.sources[source];
        let fillable = input::fillable(src);
        let named = opts
            .set
            .iter()
            .map(|(c, _)| ("--set", c))
            .chain(opts.map.iter().map(|(_, c)| ("--map", c)))
            .chain(opts.key_from_file.iter().map(|c| ("--key-from-file", c)));
        for (opt, c) in named {
            if !fillable.contains(c) {
                bail!(
                    "{opt}: source `{}` has no column `{c}` to fill (its columns: {}; event_time and received_at come from the time column)",
                    src.spec.name,
                    fillable.join(", ")
                );
            }
        }
        if opts.inputs.is_empty() {
            bail!("no input: give files with --input FILE...");
        }
        let files = opts
            .inputs
            .iter()
            .map(|p| InputFile::open(p, src, &opts))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut tables: Vec<&str> = names.clone();
        tables.extend(pipeline.sinks.iter().map(|s| s.spec.name.as_str()));
        for reserved in [DEAD_LETTERS, LATE_ROWS] {
            if tables.contains(&reserved) {
                bail!("`{reserved}` is a table of the engine's own; name your table otherwise");
            }
        }
        tables.extend([DEAD_LETTERS, LATE_ROWS]);
        check_data_dir(&opts.data_dir, &tables)?;
        if let Some((p, _)) = &pipeline.presence {
            tracing::warn!(
                table = p.name,
                "a replay has no device connections: the presence table gets no rows"
            );
        }
        Ok(Replay {
            pipeline,
            source,
            files,
            opts,
        })
    }

    /// Replays every file, then closes every window and publishes every table's files.
    pub async fn run(self) -> anyhow::Result<Summary> {
        let Replay {
            pipeline,
            source,
            files,
            opts,
        } = self;
        let started = Instant::now();
        let metrics = Metrics::new();
        let data_dir = &opts.data_dir;
        // Files roll by size only: a replay commits once, at the end.
        let roll = RollPolicy {
            max_bytes: 128 << 20,
            max_age: Duration::from_secs(3600),
        };
        let open = |name: &str, schema: SchemaRef| {
            ParquetTable::open(data_dir, name, schema, roll, metrics.clone())
        };
        let raw = pipeline
            .sources
            .iter()
            .map(|s| open(&s.spec.name, s.row_schema.clone()).map(Output::Parquet))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut sinks = Vec::new();
        let mut captured = Vec::new();
        for s in &pipeline.sinks {
            let (out, rows) = Output::capture();
            captured.push(out);
            let (schema, commands) = match &s.spec.kind {
                SinkKind::Parquet => (s.schema.clone(), None),
                SinkKind::Mqtt { topic, .. } => (command_schema(&s.schema), Some(topic.clone())),
            };
            let csv = if opts.csv {
                let path = data_dir.join(format!("{}.csv", s.spec.name));
                let file = File::create(&path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                let mut w = arrow_csv::WriterBuilder::new()
                    .with_header(true)
                    .with_timestamp_format(CSV_TIME_FORMAT.into())
                    .with_timestamp_tz_format(CSV_TIME_FORMAT.into())
                    .build(BufWriter::new(file));
                // The header, even when the sink never gets a row.
                w.write(&RecordBatch::new_empty(schema.clone()))?;
                Some(w)
            } else {
                None
            };
            sinks.push(SinkTable {
                name: s.spec.name.clone(),
                table: open(&s.spec.name, schema.clone())?,
                schema,
                rows,
                commands,
                csv,
            });
        }
        let outputs = Outputs {
            raw,
            sinks: captured,
            dead_letters: Output::Parquet(open(DEAD_LETTERS, dead_letter_schema())?),
            late_rows: Output::Parquet(open(LATE_ROWS, late_rows_schema())?),
        };
        // The runner takes the pipeline; rows are built against a copy of the source.
        let src = {
            let s = &pipeline.sources[source];
            crate::pipeline::compile::CompiledSource {
                spec: s.spec.clone(),
                payload_schema: s.payload_schema.clone(),
                row_schema: s.row_schema.clone(),
                event_time: s.event_time.clone(),
            }
        };
        let mut runner = Runner::new(pipeline, outputs, metrics.clone());

        let read = Arc::new(AtomicU64::new(0));
        let total_bytes: u64 = files.iter().map(|f| f.bytes).sum();
        let bar = progress_bar(opts.progress, total_bytes);
        let (mut rows_done, mut dead_done) = (0u64, 0u64);
        // The replay's clock: the newest event time replayed so far.
        let mut now = i64::MIN;
        for f in &files {
            let mut chunks = f.chunks(opts.batch_rows, read.clone())?;
            while let Some((chunk, first)) = chunks.next_chunk()? {
                let (rows, dead, newest) = f.rows(&src, &chunk, first, now)?;
                if !dead.is_empty() {
                    dead_done += dead.len() as u64;
                    runner.dead_letters(dead);
                }
                if let (Some(rows), Some(t)) = (rows, newest) {
                    now = now.max(t);
                    rows_done += rows.num_rows() as u64;
                    runner.rows(source, rows, now);
                }
                if now > i64::MIN {
                    runner.tick(now).await;
                }
                for s in sinks.iter_mut() {
                    s.drain()?;
                }
                bar.set_position(read.load(Ordering::Relaxed).min(total_bytes));
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "{rows_done} rows, {:.0} rows/s, {dead_done} dead letters",
                    rows_done as f64 / secs
                ));
            }
            tracing::debug!(file = %f.path.display(), source = src.spec.name, "replayed");
        }
        // The end of the recording: every open window closes, as at a drained stop.
        runner.finish().await;
        for s in sinks.iter_mut() {
            s.drain()?;
        }
        bar.finish_and_clear();

        let outputs = runner.into_outputs();
        let mut tables: Vec<ParquetTable> = Vec::new();
        for o in outputs
            .raw
            .into_iter()
            .chain([outputs.dead_letters, outputs.late_rows])
        {
            if let Output::Parquet(t) = o {
                tables.push(t);
            }
        }
        for s in sinks {
            if let Some(mut w) = s.csv {
                w.write(&RecordBatch::new_empty(s.schema.clone()))?;
                let mut inner = w.into_inner();
                std::io::Write::flush(&mut inner)
                    .with_context(|| format!("cannot write {}.csv", s.name))?;
            }
            tables.push(s.table);
        }
        // As a checkpoint does: finish every file in staging, then move them into their
        // tables, so a reader sees whole files only. Nothing to commit with them: a
        // replay has no log or state to resume from.
        let mut staged = Vec::new();
        for t in &tables {
            staged.extend(t.seal().await.map_err(|e| anyhow!(e))?);
        }
        let published = tokio::task::spawn_blocking(move || {
            let r = crate::durable::checkpoint::publish(&staged);
            for t in tables {
                t.close();
            }
            r
        })
        .await?;
        published.with_context(|| {
            format!(
                "cannot move the finished files into their tables under {}",
                data_dir.display()
            )
        })?;
        // Staging is empty now; leave no trace of it for readers that list the data dir.
        let _ = remove_empty_dirs(&data_dir.join(".staging"));
        Ok(Summary {
            rows: rows_done,
            dead_letters: dead_done,
            seconds: started.elapsed().as_secs_f64(),
            data_dir: data_dir.clone(),
        })
    }
}

/// A replay writes a table from scratch: rows already in one (an earlier replay, or a
/// running engine's data dir) would mix with this replay's, and the result would no longer
/// be a function of the input.
fn check_data_dir(data_dir: &Path, tables: &[&str]) -> anyhow::Result<()> {
    if data_dir.join(".checkpoint").exists() {
        bail!(
            "{} is the data dir of `fleetsql run` (it has a checkpoint); replay into a directory of its own with --data-dir",
            data_dir.display()
        );
    }
    for t in tables {
        let dir = data_dir.join(t);
        if has_parquet(&dir) {
            bail!(
                "{} already holds Parquet files; a replay writes its tables from scratch: remove them, or choose another --data-dir",
                dir.display()
            );
        }
    }
    Ok(())
}

fn has_parquet(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            has_parquet(&p)
        } else {
            p.extension().is_some_and(|x| x == "parquet")
        }
    })
}

fn remove_empty_dirs(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.path().is_dir() {
            let _ = remove_empty_dirs(&e.path());
        }
    }
    std::fs::remove_dir(dir)
}

/// Bytes of input read, with rows and rows/s; drawn on stderr, and only when it is a
/// terminal (indicatif's stderr target hides itself otherwise).
fn progress_bar(show: bool, total: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% (eta {eta}) {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}
