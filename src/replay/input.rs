//! Recorded files as a source's rows: which file column (or fixed value) fills each of the
//! source's columns, where event time comes from, and the conversion of one chunk of a
//! file into rows plus dead letters.
//!
//! Every file is opened and checked against the source before anything is replayed, so a
//! missing column in the tenth file is an error before the first file wrote a row.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, StringArray, TimestampMillisecondArray, UInt32Array,
    new_null_array,
};
use datafusion::arrow::compute::{CastOptions, can_cast_types, cast_with_options, filter, take};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::ReplayOptions;
use crate::decode::{DeadLetter, reason};
use crate::pipeline::compile::{CompiledSource, EventTime};
use crate::pipeline::parse::{EVENT_TIME, RECEIVED_AT};

/// Time columns looked for, in this order, when the source declares no event-time field and
/// no `--time-column` is given.
const TIME_COLUMNS: [&str; 2] = ["timestamp", EVENT_TIME];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Csv,
    Parquet,
}

/// How one of the source's columns is filled.
#[derive(Debug)]
enum Fill {
    /// From the file's column at this index.
    File(usize),
    /// The same value on every row (`--set`, `--key-from-file`): the text, cast to the
    /// column's type once when the file is opened.
    Fixed(String),
    /// A nullable column the file does not have.
    Null,
}

/// Where a row's event time comes from.
#[derive(Debug)]
enum TimeFrom {
    /// The source's declared event-time field: a column of the row (after its cast).
    Row(usize),
    /// A column of the file (`--time-column`, `timestamp`, `event_time`), as it is.
    File(usize),
}

/// One input file, checked against the source.
pub struct InputFile {
    pub path: PathBuf,
    kind: Kind,
    /// The file's column names after `--map`.
    columns: Vec<String>,
    /// Per column of the source's rows but `event_time` and `received_at`.
    fills: Vec<Fill>,
    time: TimeFrom,
    /// Name of the time column, for messages.
    time_name: String,
    pub bytes: u64,
    /// Rows in the file when cheap to know (Parquet metadata).
    pub rows: Option<u64>,
}

fn kind_of(path: &Path) -> anyhow::Result<Kind> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("csv") => Ok(Kind::Csv),
        Some("parquet") => Ok(Kind::Parquet),
        _ => bail!(
            "{}: cannot tell the format; replay reads `.csv` (with a header row) and `.parquet` files",
            path.display()
        ),
    }
}

/// Reads every column of a CSV file as text: a cell that does not parse as its declared
/// type must cost only its own row (a dead letter), which a typed CSV reader cannot do.
fn csv_schema(path: &Path) -> anyhow::Result<SchemaRef> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let (schema, _) = arrow_csv::reader::Format::default()
        .with_header(true)
        .infer_schema(BufReader::new(file), Some(0))
        .with_context(|| format!("{}: cannot read the header row", path.display()))?;
    Ok(Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    )))
}

impl InputFile {
    /// Opens `path` and maps its columns onto `source`'s, as `opts` say.
    pub fn open(
        path: &Path,
        source: &CompiledSource,
        opts: &ReplayOptions,
    ) -> anyhow::Result<InputFile> {
        let kind = kind_of(path)?;
        let bytes = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        let (schema, rows) = match kind {
            Kind::Csv => (csv_schema(path)?, None),
            Kind::Parquet => {
                let file =
                    File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
                let b = ParquetRecordBatchReaderBuilder::try_new(file)
                    .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
                let rows = b.metadata().file_metadata().num_rows().max(0) as u64;
                (b.schema().clone(), Some(rows))
            }
        };
        let shown = path.display();
        let mut columns: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let has = |columns: &[String]| columns.join(", ");
        for (from, to) in &opts.map {
            let Some(i) = columns.iter().position(|c| c == from) else {
                bail!(
                    "--map {from}={to}: {shown} has no column `{from}` (it has: {})",
                    has(&columns)
                );
            };
            columns[i] = to.clone();
        }
        for (i, c) in columns.iter().enumerate() {
            if columns[..i].contains(c) {
                bail!("{shown}: two columns are named `{c}` (after --map); rename one with --map");
            }
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let captures: Vec<&str> = source.spec.topic.captures().collect();
        let row_fields = &source.row_schema.fields()[..source.row_schema.fields().len() - 2];
        let mut fills = Vec::with_capacity(row_fields.len());
        for f in row_fields {
            let name = f.name();
            let fill = if let Some((_, v)) = opts.set.iter().find(|(c, _)| c == name) {
                Fill::Fixed(v.clone())
            } else if opts.key_from_file.as_deref() == Some(name.as_str()) {
                Fill::Fixed(stem.clone())
            } else if let Some(i) = columns.iter().position(|c| c == name) {
                let from = schema.field(i).data_type();
                // Arrow would cast a cell of text into a one-element list: not what a
                // recorded list means. Nested values come from Parquet.
                if kind == Kind::Csv && f.data_type().is_nested() {
                    bail!(
                        "{shown}: column `{name}` is {}, which a CSV cell cannot hold; replay it from Parquet",
                        f.data_type()
                    );
                }
                if !can_cast_types(from, f.data_type()) {
                    bail!(
                        "{shown}: column `{name}` is {from}, which cannot be read as the source's {}",
                        f.data_type()
                    );
                }
                Fill::File(i)
            } else if captures.contains(&name.as_str()) {
                bail!(
                    "{shown} has no column `{name}`, which the topic of source `{}` ({}) captures; give it with --set {name}=VALUE, --key-from-file {name} (the file's name), or --map FILE_COLUMN={name} (the file has: {})",
                    source.spec.name,
                    source.spec.topic,
                    has(&columns)
                );
            } else if f.is_nullable() {
                Fill::Null
            } else {
                bail!(
                    "{shown} has no column `{name}`, which source `{}` declares NOT NULL (the file has: {}); rename one with --map FILE_COLUMN={name}, or give a value with --set {name}=VALUE",
                    source.spec.name,
                    has(&columns)
                );
            };
            if let Fill::Fixed(v) = &fill {
                let one: ArrayRef = Arc::new(StringArray::from(vec![v.as_str()]));
                let ok = cast_with_options(&one, f.data_type(), &CastOptions::default())
                    .is_ok_and(|c| c.is_valid(0));
                if !ok {
                    bail!(
                        "`{v}` cannot be a value of column `{name}` ({})",
                        f.data_type()
                    );
                }
            }
            fills.push(fill);
        }
        let (time, time_name) = match &source.event_time {
            EventTime::Field { name } => {
                let i = row_fields
                    .iter()
                    .position(|f| f.name() == name)
                    .ok_or_else(|| {
                        anyhow!("source `{}` has no column `{name}`", source.spec.name)
                    })?;
                if matches!(fills[i], Fill::Null) {
                    bail!(
                        "{shown} has no column `{name}`, the event time of source `{}` (the file has: {}); rename one with --map FILE_COLUMN={name}",
                        source.spec.name,
                        has(&columns)
                    );
                }
                (TimeFrom::Row(i), name.clone())
            }
            EventTime::Received => {
                let name = match &opts.time_column {
                    Some(c) => c.clone(),
                    None => TIME_COLUMNS
                        .iter()
                        .find(|c| columns.iter().any(|x| x == *c))
                        .map(|c| c.to_string())
                        .ok_or_else(|| {
                            anyhow!(
                                "{shown}: no event time: source `{}` declares no event_time field and the file has no `timestamp` or `event_time` column (it has: {}); name the file's time column with --time-column COLUMN",
                                source.spec.name,
                                has(&columns)
                            )
                        })?,
                };
                let i = columns.iter().position(|c| *c == name).ok_or_else(|| {
                    anyhow!(
                        "--time-column {name}: {shown} has no column `{name}` (it has: {})",
                        has(&columns)
                    )
                })?;
                let t = schema.field(i).data_type();
                let ok = matches!(
                    t,
                    DataType::Timestamp(_, _)
                        | DataType::Utf8
                        | DataType::Utf8View
                        | DataType::LargeUtf8
                ) || t.is_numeric();
                if !ok {
                    bail!(
                        "{shown}: time column `{name}` is {t}; it must hold timestamps, timestamp text or epoch seconds/milliseconds"
                    );
                }
                (TimeFrom::File(i), name)
            }
        };
        Ok(InputFile {
            path: path.to_path_buf(),
            kind,
            columns,
            fills,
            time,
            time_name,
            bytes,
            rows,
        })
    }

    /// The file's rows in chunks of `batch_rows`, in file order. `read` counts the bytes
    /// consumed, for the progress bar.
    pub fn chunks(&self, batch_rows: usize, read: Arc<AtomicU64>) -> anyhow::Result<Chunks> {
        let file = File::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        let inner = match self.kind {
            Kind::Csv => {
                let schema = Arc::new(Schema::new(
                    self.columns
                        .iter()
                        .map(|c| Field::new(c, DataType::Utf8, true))
                        .collect::<Vec<_>>(),
                ));
                let counting = Counting { inner: file, read };
                ChunksInner::Csv(Box::new(
                    arrow_csv::ReaderBuilder::new(schema)
                        .with_header(true)
                        .with_batch_size(batch_rows)
                        .build(BufReader::with_capacity(1 << 20, counting))?,
                ))
            }
            Kind::Parquet => {
                let b = ParquetRecordBatchReaderBuilder::try_new(file)?;
                let per_row = self.bytes as f64 / self.rows.unwrap_or(1).max(1) as f64;
                ChunksInner::Parquet {
                    reader: b.with_batch_size(batch_rows).build()?,
                    read,
                    per_row,
                }
            }
        };
        Ok(Chunks {
            inner,
            path: self.path.clone(),
            // CSV: the header is line 1; Parquet: rows count from 1.
            next: if self.kind == Kind::Csv { 2 } else { 1 },
        })
    }

    /// Where row `n` (from [`Chunks`]) is, for a message.
    fn place(&self, n: u64) -> String {
        match self.kind {
            Kind::Csv => format!("{}:{n}", self.path.display()),
            Kind::Parquet => format!("{}: row {n}", self.path.display()),
        }
    }

    /// One chunk of the file as the source's rows. Rows with a cell that does not fit its
    /// column, or no usable event time, become dead letters; the rest are returned with
    /// the newest event time among them. `first`: the number (line or row) of the chunk's
    /// first row; `now`: the replay's clock, the receive time of a dead letter without a
    /// time of its own.
    pub fn rows(
        &self,
        source: &CompiledSource,
        chunk: &RecordBatch,
        first: u64,
        now: i64,
    ) -> anyhow::Result<(Option<RecordBatch>, Vec<DeadLetter>, Option<i64>)> {
        let n = chunk.num_rows();
        let fields = source.row_schema.fields();
        let safe = CastOptions {
            safe: true,
            ..Default::default()
        };
        // Why each row is refused, the first reason found.
        let mut bad: Vec<Option<(&'static str, String)>> = vec![None; n];
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(fields.len());
        for (f, fill) in fields.iter().zip(&self.fills) {
            let name = f.name();
            let col = match fill {
                Fill::File(i) => {
                    let raw = chunk.column(*i);
                    if raw.data_type() == f.data_type() {
                        raw.clone()
                    } else {
                        let c = cast_with_options(raw, f.data_type(), &safe)?;
                        if c.null_count() > raw.null_count() {
                            let text =
                                ArrayFormatter::try_new(raw.as_ref(), &FormatOptions::default())?;
                            for (r, slot) in bad.iter_mut().enumerate() {
                                if c.is_null(r) && raw.is_valid(r) && slot.is_none() {
                                    *slot = Some((
                                        reason::SCHEMA_MISMATCH,
                                        format!(
                                            "column `{name}`: `{}` is not a value of type {}",
                                            text.value(r),
                                            f.data_type()
                                        ),
                                    ));
                                }
                            }
                        }
                        c
                    }
                }
                Fill::Fixed(v) => {
                    let text: ArrayRef =
                        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(v, n)));
                    cast_with_options(&text, f.data_type(), &CastOptions::default())?
                }
                Fill::Null => new_null_array(f.data_type(), n),
            };
            if !f.is_nullable() && col.null_count() > 0 {
                for (r, slot) in bad.iter_mut().enumerate() {
                    if col.is_null(r) && slot.is_none() {
                        *slot = Some((
                            reason::SCHEMA_MISMATCH,
                            format!(
                                "column `{name}` is empty, and the source declares it NOT NULL"
                            ),
                        ));
                    }
                }
            }
            cols.push(col);
        }

        let time_col = match self.time {
            TimeFrom::Row(i) => cols[i].clone(),
            TimeFrom::File(i) => chunk.column(i).clone(),
        };
        let ms = time_ms(&time_col)?;
        let time_text = ArrayFormatter::try_new(time_col.as_ref(), &FormatOptions::default())?;
        for (r, slot) in bad.iter_mut().enumerate() {
            if ms.is_null(r) && slot.is_none() {
                let why = if time_col.is_null(r) {
                    format!("no event time: column `{}` is empty", self.time_name)
                } else {
                    format!(
                        "event time column `{}` holds `{}`, which is not a time",
                        self.time_name,
                        time_text.value(r)
                    )
                };
                *slot = Some((reason::BAD_EVENT_TIME, why));
            }
        }
        // Null times belong to refused rows only, which are filtered out below.
        let times = TimestampMillisecondArray::from_iter_values(
            (0..n).map(|r| if ms.is_valid(r) { ms.value(r) } else { 0 }),
        )
        .with_timezone(crate::time::TZ);
        let keep: BooleanArray = bad.iter().map(|b| Some(b.is_none())).collect();
        let newest = (0..n)
            .filter(|r| bad[*r].is_none())
            .map(|r| times.value(r))
            .max();
        let mut dead = Vec::new();
        if bad.iter().any(Option::is_some) {
            dead = self.dead_letters(source, chunk, &cols, &bad, &ms, first, now);
        }
        let rows = if newest.is_none() {
            None
        } else {
            let times: ArrayRef = Arc::new(times);
            // received_at is the event time: the replay has no other clock.
            cols.push(times.clone());
            cols.push(times);
            let cols = cols
                .iter()
                .map(|c| filter(c.as_ref(), &keep))
                .collect::<Result<Vec<_>, _>>()?;
            Some(RecordBatch::try_new(source.row_schema.clone(), cols)?)
        };
        Ok((rows, dead, newest))
    }

    #[allow(clippy::too_many_arguments)]
    fn dead_letters(
        &self,
        source: &CompiledSource,
        chunk: &RecordBatch,
        cols: &[ArrayRef],
        bad: &[Option<(&'static str, String)>],
        ms: &TimestampMillisecondArray,
        first: u64,
        now: i64,
    ) -> Vec<DeadLetter> {
        let rows: Vec<u32> = (0..bad.len())
            .filter(|r| bad[*r].is_some())
            .map(|r| r as u32)
            .collect();
        // The payload: the file's row as a JSON object of its cells, as recorded.
        let picked = take_rows(chunk, &rows);
        let payloads = picked
            .as_ref()
            .ok()
            .and_then(|b| crate::sink::json_rows(b).ok())
            .unwrap_or_default();
        let captures: Vec<(&str, Option<ArrayRef>)> = source
            .spec
            .topic
            .captures()
            .map(|c| {
                let col = source
                    .row_schema
                    .index_of(c)
                    .ok()
                    .and_then(|i| cols.get(i).cloned());
                (c, col)
            })
            .collect();
        rows.iter()
            .enumerate()
            .map(|(k, &r)| {
                let r = r as usize;
                let (why, error) = bad[r]
                    .clone()
                    .unwrap_or((reason::SCHEMA_MISMATCH, String::new()));
                // The topic the row would have come on, when its captures are known.
                let topic = source
                    .spec
                    .topic
                    .render(|name| {
                        let (_, col) = captures.iter().find(|(c, _)| *c == name)?;
                        let col = col.as_ref()?.as_any().downcast_ref::<StringArray>()?;
                        col.is_valid(r).then(|| col.value(r))
                    })
                    .unwrap_or_default();
                DeadLetter {
                    source: Some(source.spec.name.clone()),
                    topic,
                    payload: Bytes::from(payloads.get(k).cloned().unwrap_or_default()),
                    reason: why,
                    error: format!("{}: {error}", self.place(first + r as u64)),
                    received_at: if ms.is_valid(r) {
                        ms.value(r)
                    } else {
                        now.max(0)
                    },
                }
            })
            .collect()
    }
}

fn take_rows(batch: &RecordBatch, rows: &[u32]) -> anyhow::Result<RecordBatch> {
    let idx = UInt32Array::from(rows.to_vec());
    let cols = batch
        .columns()
        .iter()
        .map(|c| take(c.as_ref(), &idx, None))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(batch.schema(), cols)?)
}

/// Event times by the decoder's rules ([`crate::decode::event_time_ms`]); text that is a
/// number (a CSV cell) is read as epoch seconds or milliseconds, as a JSON number would be.
fn time_ms(col: &ArrayRef) -> anyhow::Result<TimestampMillisecondArray> {
    let as_time = crate::decode::event_time_ms(col)?;
    if !matches!(
        col.data_type(),
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8
    ) {
        return Ok(as_time);
    }
    let safe = CastOptions {
        safe: true,
        ..Default::default()
    };
    let numbers = cast_with_options(col, &DataType::Float64, &safe)?;
    if numbers.null_count() == numbers.len() {
        return Ok(as_time);
    }
    let as_epoch = crate::decode::event_time_ms(&numbers)?;
    Ok((0..col.len())
        .map(|r| {
            if as_epoch.is_valid(r) {
                Some(as_epoch.value(r))
            } else if as_time.is_valid(r) {
                Some(as_time.value(r))
            } else {
                None
            }
        })
        .collect::<TimestampMillisecondArray>()
        .with_timezone(crate::time::TZ))
}

/// The columns a replay can fill: every column of the source's rows but the two the
/// engine computes.
pub fn fillable(source: &CompiledSource) -> Vec<String> {
    source
        .row_schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|n| n != EVENT_TIME && n != RECEIVED_AT)
        .collect()
}

/// Counts the bytes a reader hands out.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

enum ChunksInner {
    // Boxed: the reader is large beside the Parquet variant.
    Csv(Box<arrow_csv::Reader<BufReader<Counting<File>>>>),
    Parquet {
        reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
        read: Arc<AtomicU64>,
        per_row: f64,
    },
}

/// A file's rows, chunk by chunk, each with the number of its first row.
pub struct Chunks {
    inner: ChunksInner,
    path: PathBuf,
    next: u64,
}

impl Chunks {
    /// The next chunk and the number (CSV line, Parquet row) of its first row.
    pub fn next_chunk(&mut self) -> anyhow::Result<Option<(RecordBatch, u64)>> {
        let batch = match &mut self.inner {
            ChunksInner::Csv(r) => r.next(),
            ChunksInner::Parquet {
                reader,
                read,
                per_row,
            } => {
                let b = reader.next();
                if let Some(Ok(b)) = &b {
                    read.fetch_add((b.num_rows() as f64 * *per_row) as u64, Ordering::Relaxed);
                }
                b
            }
        };
        match batch {
            None => Ok(None),
            Some(Err(e)) => Err(anyhow!(
                "{}: cannot read past row {}: {e}",
                self.path.display(),
                self.next
            )),
            Some(Ok(b)) => {
                let first = self.next;
                self.next += b.num_rows() as u64;
                Ok(Some((b, first)))
            }
        }
    }
}
