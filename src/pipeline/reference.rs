//! Reference tables: static data read from a CSV or Parquet file (device -> site,
//! per-home setpoints), joinable in every query and reloaded when the file changes.
//!
//! The table is a [`Slot`] that is never cleared, so the cached plans that join it see new
//! contents on their next run without being re-planned. A reload that fails (file missing,
//! half written, wrong columns) keeps the previous contents and says why.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};

use super::compile::{Slot, declared_schema, session};
use super::diag::Diagnostic;
use super::parse::{FileFormat, ReferenceSpec};

/// What identifies one version of the file: a change in either means "reload".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
    })
}

#[derive(Debug)]
pub struct Reference {
    pub spec: ReferenceSpec,
    pub schema: SchemaRef,
    pub slot: Arc<Slot>,
    seen: Mutex<Option<Stamp>>,
}

/// The outcome of a check for a new version of the file.
#[derive(Debug)]
pub enum Reload {
    Unchanged,
    Loaded { rows: usize },
    Failed(String),
}

impl Reference {
    /// Loads the file and registers the table; any problem is an error at the table's place.
    /// `previous`: the table this one replaces in a hot reload; its slot is kept when the
    /// schema is the same, so plans kept across the reload see the new contents.
    pub async fn open(
        ctx: &SessionContext,
        spec: &ReferenceSpec,
        previous: Option<&Reference>,
    ) -> Result<Reference, Diagnostic> {
        let declared = if spec.columns.is_empty() {
            None
        } else {
            Some(declared_schema(ctx, &spec.name, &spec.columns, &spec.loc).await?)
        };
        let before = stamp(&spec.path).map_err(|e| {
            spec.loc
                .error(format!("cannot read `{}`: {e}", spec.path.display()))
        })?;
        let batches = read(spec, declared.as_ref())
            .await
            .map_err(|e| spec.loc.error(e))?;
        let schema = match (&declared, batches.first()) {
            (Some(d), _) => d.clone(),
            (None, Some(b)) => b.schema(),
            (None, None) => {
                return Err(spec.loc.error(format!(
                    "`{}` holds no rows to learn its columns from; declare them",
                    spec.path.display()
                )));
            }
        };
        let slot = match previous {
            Some(p) if p.schema == schema => p.slot.clone(),
            _ => Slot::new(schema.clone()),
        };
        slot.set(batches);
        let table = StreamingTable::try_new(
            schema.clone(),
            vec![slot.clone() as Arc<dyn PartitionStream>],
        )
        .map_err(|e| spec.loc.error(e.to_string()))?;
        ctx.register_table(spec.name.as_str(), Arc::new(table))
            .map_err(|e| spec.loc.error(e.to_string()))?;
        Ok(Reference {
            spec: spec.clone(),
            schema,
            slot,
            seen: Mutex::new(Some(before)),
        })
    }

    /// Reloads the file if it changed since it was last read.
    pub async fn reload_if_changed(&self) -> Reload {
        let now = match stamp(&self.spec.path) {
            Ok(s) => s,
            Err(e) => {
                // Editors replace files by rename: a moment without the file is normal, and
                // the old contents stay until a readable file is back. Say it once.
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                if seen.take().is_some() {
                    return Reload::Failed(format!(
                        "cannot read `{}`: {e}",
                        self.spec.path.display()
                    ));
                }
                return Reload::Unchanged;
            }
        };
        {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == Some(now) {
                return Reload::Unchanged;
            }
        }
        let result = read(&self.spec, Some(&self.schema)).await;
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        match result {
            Ok(batches) => {
                let rows = batches.iter().map(|b| b.num_rows()).sum();
                self.slot.set(batches);
                Reload::Loaded { rows }
            }
            Err(e) => Reload::Failed(e),
        }
    }
}

/// Reads the whole file with DataFusion's own readers, in the declared (or first-seen)
/// schema.
async fn read(
    spec: &ReferenceSpec,
    schema: Option<&SchemaRef>,
) -> Result<Vec<RecordBatch>, String> {
    let ctx = session();
    let path = spec.path.to_string_lossy().to_string();
    let ext = spec
        .path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let what = |e: datafusion::error::DataFusionError| {
        format!(
            "cannot read `{}`: {}",
            spec.path.display(),
            e.strip_backtrace()
        )
    };
    let batches = match &spec.format {
        FileFormat::Csv { header, delimiter } => {
            let mut opts = CsvReadOptions::new()
                .has_header(*header)
                .delimiter(*delimiter)
                .file_extension(&ext);
            if let Some(s) = schema {
                opts = opts.schema(s.as_ref());
            }
            ctx.read_csv(path, opts)
                .await
                .map_err(what)?
                .collect()
                .await
                .map_err(what)?
        }
        FileFormat::Parquet => {
            let opts = ParquetReadOptions::default().file_extension(&ext);
            ctx.read_parquet(path, opts)
                .await
                .map_err(what)?
                .collect()
                .await
                .map_err(what)?
        }
    };
    let Some(schema) = schema else {
        return Ok(batches);
    };
    // Parquet brings its own types: take the declared columns by name, in the declared
    // types, so a reload cannot change what the plans were built for.
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let mut cols = Vec::with_capacity(schema.fields().len());
        for f in schema.fields() {
            let c = b.column_by_name(f.name()).ok_or_else(|| {
                format!(
                    "`{}` has no column `{}` (it has: {})",
                    spec.path.display(),
                    f.name(),
                    b.schema()
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            let c = cast(c, f.data_type())
                .map_err(|e| format!("`{}`: column `{}`: {e}", spec.path.display(), f.name()))?;
            if !f.is_nullable() && c.null_count() > 0 {
                return Err(format!(
                    "`{}`: column `{}` is declared NOT NULL but has empty values",
                    spec.path.display(),
                    f.name()
                ));
            }
            cols.push(c);
        }
        out.push(RecordBatch::try_new(schema.clone(), cols).map_err(|e| e.to_string())?);
    }
    Ok(out)
}
