//! Delivery guarantees: what makes "every message the broker delivered is in Parquet
//! exactly once" hold across crashes (docs/delivery.md).
//!
//! - [`wal`]: every message is logged before the engine acknowledges it to the broker;
//! - [`checkpoint`]: every few seconds the runner's state, the Parquet files written since
//!   the last checkpoint and the log position they account for are committed together.
//!
//! A restart loads the checkpoint, finishes publishing its files, and processes the log
//! from its position again before taking new messages.

pub mod checkpoint;
pub mod wal;

use std::path::Path;

/// What a start finds on disk.
pub struct Recovery {
    pub checkpoint: Option<(checkpoint::Manifest, checkpoint::Batches)>,
    pub wal: wal::Recovered,
}

/// Reads the checkpoint in force (publishing its files) and the log after it. Must run
/// before the tables are opened, which delete whatever staging files are left.
pub fn recover(data_dir: &Path) -> anyhow::Result<Recovery> {
    let checkpoint = checkpoint::recover(data_dir)?;
    let from = checkpoint.as_ref().map_or(0, |(m, _)| m.wal_next);
    let wal = wal::recover(&wal::dir(data_dir), from).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the write-ahead log in {}: {e}",
            wal::dir(data_dir).display()
        )
    })?;
    if checkpoint.is_some() || !wal.replay.is_empty() {
        tracing::info!(
            checkpoint = checkpoint.as_ref().map(|(m, _)| m.epoch),
            replay = wal.replay.len(),
            torn = wal.torn,
            "recovering: the log after the last checkpoint is processed again"
        );
    }
    Ok(Recovery { checkpoint, wal })
}
