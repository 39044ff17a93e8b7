//! Where rows go: Parquet tables (raw telemetry, sink tables, dead letters, late rows) and
//! MQTT commands to devices.

pub mod commands;
pub mod parquet;

use datafusion::arrow::error::ArrowError;
use datafusion::arrow::json::WriterBuilder;
use datafusion::arrow::json::writer::LineDelimited;
use datafusion::arrow::record_batch::RecordBatch;

/// Each row as a JSON object, nulls written out (a reader should see every column it was
/// promised): command payloads and the `row` column of `late_rows`.
pub fn json_rows(batch: &RecordBatch) -> Result<Vec<String>, ArrowError> {
    let mut buf = Vec::with_capacity(batch.num_rows() * 32);
    let mut w = WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, LineDelimited>(&mut buf);
    w.write(batch)?;
    w.finish()?;
    drop(w);
    let text = String::from_utf8(buf).map_err(|e| ArrowError::JsonError(e.to_string()))?;
    Ok(text.lines().map(str::to_string).collect())
}
