//! Load generators and measurements behind `benches/`. They live in the library so that the
//! test suite can run each of them in a small smoke mode (that they work, not how fast),
//! while `cargo bench` runs them at full size in release mode.
//!
//! - [`fleet`]: the whole engine in process with a large fleet (`cargo bench --bench fleet`):
//!   memory per device, window close to results, every row stored;
//! - [`micro`]: the hot path one stage at a time, decoding, the device-actor hop, window
//!   close, the window query and the Parquet sink (`cargo bench --bench micro`, criterion).

pub mod fleet;
pub mod micro;

/// Rows in a Parquet table written by the engine (all its partitions), read back with
/// DataFusion as a user would.
pub async fn count_rows(
    data_dir: &std::path::Path,
    table: &str,
    expr: &str,
) -> anyhow::Result<i64> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::Int64Type;
    let ctx = datafusion::prelude::SessionContext::new().enable_url_table();
    let path = data_dir.join(table);
    let sql = format!("SELECT CAST({expr} AS BIGINT) FROM '{}/'", path.display());
    let batches = ctx.sql(&sql).await?.collect().await?;
    let b = batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .ok_or_else(|| anyhow::anyhow!("no result from {sql}"))?;
    let col = b.column(0).as_primitive::<Int64Type>();
    Ok(if col.is_null(0) { 0 } else { col.value(0) })
}
