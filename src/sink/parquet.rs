//! Rolling, atomic Parquet tables that datafusion-cli, DuckDB and pyarrow read as they are.
//!
//! Layout: `<data-dir>/<table>/date=YYYY-MM-DD/hour=HH/part-<ms>-<seq>-<pid>.parquet`
//! (Hive-style folders, which DataFusion's listing tables understand). A file is written
//! under `<data-dir>/.staging/`, outside every table, and finished there (footer, fsync)
//! when it reaches its size, when the hour changes, or when a checkpoint asks
//! ([`ParquetTable::seal`]). The checkpoint renames finished files into place once it has
//! committed (`durable::checkpoint`): a reader sees a whole file or none, and never rows
//! the engine would write again after a crash. Each table has a writer thread, since
//! Parquet encoding and zstd are CPU work that must not stall the engine's event loop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

use chrono::{DateTime, Datelike, Timelike, Utc};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use tokio::sync::oneshot;

use crate::durable::checkpoint::Staged;
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy)]
pub struct RollPolicy {
    /// Finish a file once it holds about this many bytes.
    pub max_bytes: usize,
    /// How often files are committed (with a checkpoint), so recent rows become queryable.
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

/// A row group is written out once it holds this many bytes in memory.
const ROW_GROUP_BYTES: usize = 16 << 20;

/// A handle on one table's writer thread.
pub struct ParquetTable {
    name: String,
    tx: Option<Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Request {
    Rows(RecordBatch),
    /// Finish the open file; answer with every file finished since the last seal, or with
    /// why rows could not be written.
    Seal(oneshot::Sender<Result<Vec<Staged>, String>>),
}

impl ParquetTable {
    /// Opens a table for appending; removes its staging leftovers from an earlier crash
    /// (files a committed checkpoint names are moved into place before, by
    /// `durable::recover`).
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
            sealed: Vec::new(),
            failed: None,
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
        if let Some(tx) = &self.tx
            && tx.send(Request::Rows(batch)).is_err()
        {
            tracing::error!(
                table = self.name,
                "parquet writer is gone; rows not written"
            );
        }
    }

    /// Finishes the open file; returns the files finished since the last seal, for a
    /// checkpoint to commit. An error means rows were lost on their way to disk: the
    /// checkpoint must not be taken.
    pub async fn seal(&self) -> Result<Vec<Staged>, String> {
        let (tx, rx) = oneshot::channel();
        let gone = || format!("the writer of table `{}` is gone", self.name);
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send(Request::Seal(tx))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Stops the writer thread. Rows not sealed and committed by a checkpoint are left in
    /// staging and deleted at the next start: the log has them.
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
    /// Finished since the last seal.
    sealed: Vec<Staged>,
    /// Why rows were lost since the last seal.
    failed: Option<String>,
}

fn hour_of(t: DateTime<Utc>) -> (i32, u32, u32, u32) {
    (t.year(), t.month(), t.day(), t.hour())
}

impl Writer {
    fn run(&mut self, rx: Receiver<Request>) {
        let mut next = rx.recv().ok();
        while let Some(req) = next.take() {
            match req {
                Request::Rows(b) => {
                    // Rows queued meanwhile go in one write: each write costs per column
                    // and per call, and under load the engine sends many small batches.
                    let mut batches = vec![b];
                    loop {
                        match rx.try_recv() {
                            Ok(Request::Rows(b)) => batches.push(b),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.write_all(batches);
                }
                Request::Seal(answer) => {
                    self.finish_open();
                    let result = match self.failed.take() {
                        Some(e) => Err(format!("table `{}`: {e}", self.table)),
                        None => Ok(std::mem::take(&mut self.sealed)),
                    };
                    let _ = answer.send(result);
                    next = rx.recv().ok();
                    continue;
                }
            }
            let due = match &self.open {
                Some(f) => {
                    f.writer.bytes_written() + f.writer.in_progress_size() >= self.roll.max_bytes
                        || f.hour != hour_of(Utc::now())
                }
                None => false,
            };
            if due {
                self.finish_open();
            }
            if next.is_none() {
                next = rx.recv().ok();
            }
        }
    }

    /// Writes batches as one when they concatenate (the usual case), else one by one.
    fn write_all(&mut self, batches: Vec<RecordBatch>) {
        if batches.len() > 1 {
            let aligned: Result<Vec<RecordBatch>, _> = batches
                .iter()
                .map(|b| RecordBatch::try_new(self.schema.clone(), b.columns().to_vec()))
                .collect();
            if let Ok(one) =
                aligned.and_then(|a| datafusion::arrow::compute::concat_batches(&self.schema, &a))
            {
                self.write(one);
                return;
            }
        }
        for b in batches {
            self.write(b);
        }
    }

    fn fail(&mut self, rows: usize, what: String) {
        self.metrics
            .parquet_errors
            .with_label_values(&[&self.table])
            .inc();
        tracing::error!(table = self.table, rows, "{what}");
        self.failed.get_or_insert(what);
    }

    fn write(&mut self, batch: RecordBatch) {
        let n = batch.num_rows();
        // Sinks fed by one query keep one schema; the table schema is the nullable superset.
        let batch = match RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec()) {
            Ok(b) => b,
            Err(e) => {
                // A bug, not a disk problem: the rows are reported, the table goes on.
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
                    self.fail(n, format!("cannot create a parquet file: {e}"));
                    return;
                }
            }
        }
        if let Some(f) = self.open.as_mut() {
            // Rows wait in memory until their row group is written: cap it in bytes, or a
            // table of large rows holds a commit interval's worth of them.
            let written = f.writer.write(&batch).and_then(|()| {
                if f.writer.in_progress_size() >= ROW_GROUP_BYTES {
                    f.writer.flush()
                } else {
                    Ok(())
                }
            });
            match written {
                Ok(()) => f.rows += n,
                Err(e) => {
                    self.fail(n, format!("parquet write failed: {e}"));
                    // The file may be broken past this point: drop it.
                    if let Some(f) = self.open.take() {
                        let _ = std::fs::remove_file(&f.staging_path);
                    }
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
            hour: hour_of(now),
            rows: 0,
        })
    }

    /// Finishes the open file in staging (footer, fsync), ready for a checkpoint.
    fn finish_open(&mut self) {
        let Some(f) = self.open.take() else { return };
        let rows = f.rows;
        let target = f.final_dir.join(&f.file_name);
        let staging = f.staging_path.clone();
        let finished = (|| -> anyhow::Result<u64> {
            let file = f.writer.into_inner()?;
            file.sync_all()?;
            Ok(file.metadata()?.len())
        })();
        match finished {
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
                self.sealed.push(Staged { staging, target });
            }
            Err(e) => {
                let _ = std::fs::remove_file(&staging);
                self.fail(rows, format!("cannot finish a parquet file: {e}"));
            }
        }
    }
}
