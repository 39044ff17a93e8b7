//! The pipeline language: files are parsed by sqlparser into a spec ([`parse`]), checked
//! and planned by DataFusion ([`compile`]); errors carry file, line and column ([`diag`]).

pub mod compile;
pub mod diag;
pub mod parse;
pub mod topic;

use std::path::PathBuf;

pub use compile::{CompiledPipeline, compile};
pub use diag::{Diagnostic, Diagnostics, SourceFile};
pub use parse::PipelineSpec;

/// Reads, parses and compiles pipeline files: the one entry point for `run`, `check` and tests.
pub async fn load(paths: &[PathBuf]) -> Result<CompiledPipeline, Diagnostics> {
    let mut files = Vec::new();
    for p in paths {
        files.push(SourceFile::read(p)?);
    }
    let spec = parse::parse_files(&files)?;
    compile(spec).await
}
