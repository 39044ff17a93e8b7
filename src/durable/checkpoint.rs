//! Checkpoints: the runner's state, the Parquet files written since the last checkpoint,
//! and the log position they account for, made durable together.
//!
//! Layout under `<data-dir>/.checkpoint/`:
//! - `<epoch>/state.json`: the [`Manifest`] (log position, files to publish, runner state);
//! - `<epoch>/<name>.arrows`: the rows held in open windows, as Arrow IPC streams;
//! - `CURRENT`: the epoch in force, replaced atomically (write, fsync, rename): this rename
//!   is the commit point;
//! - `commands.jsonl`: the windows whose commands went out since that checkpoint.
//!
//! Files of a table are written to staging during an epoch and renamed into the table only
//! after the manifest naming them is committed. A crash before the commit leaves them in
//! staging (deleted at start: the log replays their rows); a crash after it leaves renames
//! to do, which [`recover`] finishes. Readers never see a partial file, nor a row twice.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use super::wal::sync_dir;
use crate::engine::runner::RunnerState;

pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join(".checkpoint")
}

/// A Parquet file finished in staging, and where it goes once its checkpoint commits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Staged {
    pub staging: PathBuf,
    pub target: PathBuf,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub epoch: u64,
    /// Every logged message before this position is accounted for by this checkpoint.
    pub wal_next: u64,
    pub staged: Vec<Staged>,
    /// Per windowed query with an MQTT sink: the newest window end whose commands went out.
    pub published: BTreeMap<String, i64>,
    pub runner: Option<RunnerState>,
}

/// Rows a checkpoint keeps besides its JSON: named lists of batches (one schema each).
#[derive(Default)]
pub struct Batches(pub BTreeMap<String, Vec<RecordBatch>>);

impl Batches {
    /// Adds a batch to the list `name`; returns its index there.
    pub fn add(&mut self, name: &str, batch: RecordBatch) -> usize {
        let list = self.0.entry(name.to_string()).or_default();
        list.push(batch);
        list.len() - 1
    }

    pub fn get(&self, name: &str, i: usize) -> Option<&RecordBatch> {
        self.0.get(name).and_then(|l| l.get(i))
    }
}

/// Writes a checkpoint and commits it. Blocking.
pub fn write(data_dir: &Path, m: &Manifest, batches: &Batches) -> std::io::Result<()> {
    let root = dir(data_dir);
    let epoch_dir = root.join(format!("{:020}", m.epoch));
    std::fs::create_dir_all(&epoch_dir)?;
    for (name, list) in &batches.0 {
        let Some(first) = list.first() else { continue };
        let file = File::create(epoch_dir.join(format!("{name}.arrows")))?;
        let mut w = StreamWriter::try_new(std::io::BufWriter::new(file), &first.schema())
            .map_err(std::io::Error::other)?;
        for b in list {
            w.write(b).map_err(std::io::Error::other)?;
        }
        w.finish().map_err(std::io::Error::other)?;
        let file = w
            .into_inner()
            .map_err(std::io::Error::other)?
            .into_inner()
            .map_err(|e| e.into_error())?;
        file.sync_all()?;
    }
    let mut state = File::create(epoch_dir.join("state.json"))?;
    serde_json::to_writer(&mut state, m)?;
    state.sync_all()?;
    sync_dir(&epoch_dir)?;

    let tmp = root.join("CURRENT.tmp");
    let mut f = File::create(&tmp)?;
    writeln!(f, "{}", m.epoch)?;
    f.sync_all()?;
    std::fs::rename(&tmp, root.join("CURRENT"))?;
    sync_dir(&root)?;

    // Committed: the journal of commands sent is in `published` now.
    File::create(root.join(JOURNAL))?.sync_all()?;
    for entry in std::fs::read_dir(&root)?.flatten() {
        let p = entry.path();
        if p.is_dir() && p != epoch_dir {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
    Ok(())
}

/// Moves committed files into their tables (those already moved are skipped).
pub fn publish(staged: &[Staged]) -> std::io::Result<usize> {
    let mut moved = 0;
    let mut dirs = Vec::new();
    for s in staged {
        if !s.staging.exists() {
            continue;
        }
        if let Some(parent) = s.target.parent() {
            std::fs::create_dir_all(parent)?;
            if !dirs.contains(&parent.to_path_buf()) {
                dirs.push(parent.to_path_buf());
            }
        }
        std::fs::rename(&s.staging, &s.target)?;
        moved += 1;
    }
    for d in dirs {
        sync_dir(&d)?;
    }
    Ok(moved)
}

/// The checkpoint in force, with its files published; `None` on a first start.
pub fn recover(data_dir: &Path) -> anyhow::Result<Option<(Manifest, Batches)>> {
    let root = dir(data_dir);
    let epoch = match std::fs::read_to_string(root.join("CURRENT")) {
        Ok(s) => s.trim().parse::<u64>().map_err(|e| {
            anyhow::anyhow!(
                "{}: not a checkpoint epoch: {e}",
                root.join("CURRENT").display()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("cannot read {}: {e}", root.join("CURRENT").display()),
    };
    let epoch_dir = root.join(format!("{epoch:020}"));
    let state = std::fs::read(epoch_dir.join("state.json"))
        .map_err(|e| anyhow::anyhow!("cannot read checkpoint {}: {e}", epoch_dir.display()))?;
    let m: Manifest = serde_json::from_slice(&state)
        .map_err(|e| anyhow::anyhow!("checkpoint {} is unreadable: {e}", epoch_dir.display()))?;
    let moved = publish(&m.staged)?;
    if moved > 0 {
        tracing::info!(files = moved, "published the files of the last checkpoint");
    }
    let mut batches = Batches::default();
    for entry in std::fs::read_dir(&epoch_dir)?.flatten() {
        let p = entry.path();
        let Some(name) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".arrows"))
        else {
            continue;
        };
        let reader = StreamReader::try_new(std::io::BufReader::new(File::open(&p)?), None)?;
        let list = reader.collect::<Result<Vec<_>, _>>()?;
        batches.0.insert(name.to_string(), list);
    }
    Ok(Some((m, batches)))
}

const JOURNAL: &str = "commands.jsonl";

#[derive(Serialize, Deserialize)]
struct Sent {
    query: String,
    end: i64,
}

fn read_journal(root: &Path) -> Vec<(String, i64)> {
    let Ok(f) = File::open(root.join(JOURNAL)) else {
        return vec![];
    };
    // A torn last line (a crash mid-write) is skipped: that window's commands never went out.
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<Sent>(&l).ok())
        .map(|s| (s.query, s.end))
        .collect()
}

/// Records, durably and before they go out, that a window's commands are sent: after a
/// crash the window may be computed again, and its commands must not be sent twice.
pub struct Journal {
    root: PathBuf,
    published: HashMap<String, i64>,
}

impl Journal {
    /// What the checkpoint in force says was sent, and what was recorded after it (also
    /// when no checkpoint was ever committed).
    pub fn new(data_dir: &Path, published: BTreeMap<String, i64>) -> Journal {
        let root = dir(data_dir);
        let mut published: HashMap<String, i64> = published.into_iter().collect();
        for (query, end) in read_journal(&root) {
            let e = published.entry(query).or_insert(i64::MIN);
            *e = (*e).max(end);
        }
        Journal { root, published }
    }

    /// Whether the commands of `query`'s window ending at `end` went out already.
    pub fn sent(&self, query: &str, end: i64) -> bool {
        self.published.get(query).is_some_and(|e| *e >= end)
    }

    pub fn record(&mut self, query: &str, end: i64) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(JOURNAL))?;
        let line = serde_json::to_string(&Sent {
            query: query.to_string(),
            end,
        })?;
        writeln!(f, "{line}")?;
        f.sync_data()?;
        let e = self.published.entry(query.to_string()).or_insert(i64::MIN);
        *e = (*e).max(end);
        Ok(())
    }

    pub fn published(&self) -> BTreeMap<String, i64> {
        self.published
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}
