//! Rolling, atomic Parquet tables that datafusion-cli, DuckDB and pyarrow read as they are.
//!
//! Layout: `<data-dir>/<table>/date=YYYY-MM-DD/hour=HH/part-<ms>-<seq>-<pid>.parquet`
//! (Hive-style folders, which DataFusion's listing tables understand). A file is written
//! under `<data-dir>/.staging/`, outside every table, fsynced, then renamed into place: a
//! reader sees a whole file or none. Files roll on size, on age and when the hour changes.
//! Each table has a writer thread, since Parquet encoding and zstd are CPU work that must
//! not stall the engine's event loop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, Timelike, Utc};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy)]
pub struct RollPolicy {
    /// Commit a file once it holds about this many bytes.
    pub max_bytes: usize,
    /// Commit a file this long after its first row, so recent rows become queryable.
    pub max_age: Duration,
}

impl Default for RollPolicy {
    fn default() -> Self {
        RollPolicy {
            max_bytes: 128 << 20,
            max_age: Duration::from_secs(60),
        }
    }
}

/// A handle on one table's writer thread.
pub struct ParquetTable {
    name: String,
    tx: Option<Sender<RecordBatch>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ParquetTable {
    /// Opens a table for appending; removes its staging leftovers from an earlier crash.
    pub fn open(
        data_dir: &Path,
        name: &str,
        schema: SchemaRef,
        roll: RollPolicy,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<ParquetTable> {
        let staging = data_dir.join(".staging").join(name);
        let dir = data_dir.join(name);
        std::fs::create_dir_all(&staging)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", staging.display()))?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let mut removed = 0;
        for entry in std::fs::read_dir(&staging)?.flatten() {
            if std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::warn!(
                table = name,
                removed,
                "removed partial files left by an earlier run"
            );
        }
        let (tx, rx) = channel();
        let mut w = Writer {
            table: name.to_string(),
            dir,
            staging,
            schema,
            roll,
            metrics,
            open: None,
            seq: 0,
        };
        let thread = std::thread::Builder::new()
            .name(format!("parquet-{name}"))
            .spawn(move || w.run(rx))?;
        Ok(ParquetTable {
            name: name.to_string(),
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn write(&self, batch: RecordBatch) {
        if batch.num_rows() == 0 {
            return;
        }
        if let Some(tx) = &self.tx {
            if tx.send(batch).is_err() {
                tracing::error!(
                    table = self.name,
                    "parquet writer is gone; rows not written"
                );
            }
        }
    }

    /// Commits and stops the writer thread.
    pub fn close(mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct OpenFile {
    writer: ArrowWriter<File>,
    staging_path: PathBuf,
    final_dir: PathBuf,
    file_name: String,
    opened: Instant,
    hour: (i32, u32, u32, u32),
    rows: usize,
}

struct Writer {
    table: String,
    dir: PathBuf,
    staging: PathBuf,
    schema: SchemaRef,
    roll: RollPolicy,
    metrics: Arc<Metrics>,
    open: Option<OpenFile>,
    seq: u64,
}

fn hour_of(t: DateTime<Utc>) -> (i32, u32, u32, u32) {
    (t.year(), t.month(), t.day(), t.hour())
}

impl Writer {
    fn run(&mut self, rx: Receiver<RecordBatch>) {
        loop {
            let wait = match &self.open {
                Some(f) => self
                    .roll
                    .max_age
                    .saturating_sub(f.opened.elapsed())
                    .max(Duration::from_millis(10)),
                None => Duration::from_secs(3600),
            };
            match rx.recv_timeout(wait) {
                Ok(b) => self.write(b),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.commit();
                    return;
                }
            }
            let due = match &self.open {
                Some(f) => {
                    f.opened.elapsed() >= self.roll.max_age
                        || f.writer.bytes_written() + f.writer.in_progress_size()
                            >= self.roll.max_bytes
                        || f.hour != hour_of(Utc::now())
                }
                None => false,
            };
            if due {
                self.commit();
            }
        }
    }

    fn write(&mut self, batch: RecordBatch) {
        let n = batch.num_rows();
        // Sinks fed by one query keep one schema; the table schema is the nullable superset.
        let batch = match RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec()) {
            Ok(b) => b,
            Err(e) => {
                self.metrics
                    .parquet_errors
                    .with_label_values(&[&self.table])
                    .inc();
                tracing::error!(
                    table = self.table,
                    rows = n,
                    "rows do not fit the table's schema: {e}"
                );
                return;
            }
        };
        if self.open.is_none() {
            match self.create() {
                Ok(f) => self.open = Some(f),
                Err(e) => {
                    self.metrics
                        .parquet_errors
                        .with_label_values(&[&self.table])
                        .inc();
                    tracing::error!(
                        table = self.table,
                        rows = n,
                        "cannot create a parquet file: {e}"
                    );
                    return;
                }
            }
        }
        if let Some(f) = self.open.as_mut() {
            match f.writer.write(&batch) {
                Ok(()) => f.rows += n,
                Err(e) => {
                    self.metrics
                        .parquet_errors
                        .with_label_values(&[&self.table])
                        .inc();
                    tracing::error!(table = self.table, rows = n, "parquet write failed: {e}");
                }
            }
        }
    }

    fn create(&mut self) -> anyhow::Result<OpenFile> {
        let now = Utc::now();
        self.seq += 1;
        let file_name = format!(
            "part-{}-{:06}-{}.parquet",
            now.timestamp_millis(),
            self.seq,
            std::process::id()
        );
        let staging_path = self.staging.join(&file_name);
        let final_dir = self
            .dir
            .join(format!("date={}", now.format("%Y-%m-%d")))
            .join(format!("hour={:02}", now.hour()));
        let file = File::create(&staging_path)?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
            .build();
        let writer = ArrowWriter::try_new(file, self.schema.clone(), Some(props))?;
        Ok(OpenFile {
            writer,
            staging_path,
            final_dir,
            file_name,
            opened: Instant::now(),
            hour: hour_of(now),
            rows: 0,
        })
    }

    fn commit(&mut self) {
        let Some(f) = self.open.take() else { return };
        let rows = f.rows;
        match finish(f) {
            Ok(bytes) => {
                self.metrics
                    .parquet_rows
                    .with_label_values(&[&self.table])
                    .inc_by(rows as u64);
                self.metrics
                    .parquet_files
                    .with_label_values(&[&self.table])
                    .inc();
                self.metrics
                    .parquet_bytes
                    .with_label_values(&[&self.table])
                    .inc_by(bytes);
            }
            Err(e) => {
                self.metrics
                    .parquet_errors
                    .with_label_values(&[&self.table])
                    .inc();
                tracing::error!(table = self.table, rows, "cannot commit parquet file: {e}");
            }
        }
    }
}

/// Footer, fsync, rename into the table, fsync the folder: the file is whole and durable
/// before it is visible.
fn finish(f: OpenFile) -> anyhow::Result<u64> {
    let file = f.writer.into_inner()?;
    file.sync_all()?;
    let bytes = file.metadata()?.len();
    drop(file);
    std::fs::create_dir_all(&f.final_dir)?;
    let target = f.final_dir.join(&f.file_name);
    std::fs::rename(&f.staging_path, &target)?;
    File::open(&f.final_dir)?.sync_all()?;
    Ok(bytes)
}
