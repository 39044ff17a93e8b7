//! The pipeline language: files are parsed by sqlparser into a spec ([`parse`]), whose
//! streaming parts are rewritten into plain SQL ([`rewrite`]), then checked and planned by
//! DataFusion ([`compile`]), with reference data loaded from files ([`reference`]); errors
//! carry file, line and column ([`diag`]).

pub mod compile;
pub mod diag;
pub mod parse;
pub mod reference;
pub mod rewrite;
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

/// What `fleetsql explain` prints: every view and query, its window and its plans.
pub fn explain(p: &CompiledPipeline) -> String {
    use compile::StreamKind;
    use datafusion::physical_plan::displayable;
    use std::fmt::Write;
    let mut out = String::new();
    let plan = |out: &mut String, plan: &compile::Plan| {
        let _ = writeln!(out, "-- logical plan --\n{}", plan.logical.display_indent());
        let _ = writeln!(
            out,
            "-- physical plan --\n{}",
            displayable(plan.physical.as_ref()).indent(false)
        );
    };
    for s in &p.streams {
        if let StreamKind::View { plan: v, input } = &s.kind {
            let _ = writeln!(
                out,
                "== view {} (a stream computed from {}) ==",
                s.name, p.streams[*input].name
            );
            plan(&mut out, v);
        }
    }
    for q in &p.queries {
        let _ = writeln!(out, "== query {} (into {}) ==", q.spec.name, q.spec.sink);
        match (&q.window, q.input) {
            (Some(w), _) => {
                let over: Vec<&str> = w
                    .inputs
                    .iter()
                    .map(|i| p.streams[i.stream].name.as_str())
                    .collect();
                let _ = writeln!(
                    out,
                    "window: {} over {}",
                    w.kind.describe(),
                    over.join(" JOIN ")
                );
            }
            (None, Some(s)) => {
                let _ = writeln!(out, "runs on each micro-batch of {}", p.streams[s].name);
            }
            (None, None) => {}
        }
        for r in &q.spec.rolling {
            let _ = writeln!(out, "state across windows: {} ({})", r.udf, r.state);
        }
        plan(&mut out, &q.plan);
    }
    out
}

/// [`load`] for a hot reload: streams and reference tables that keep their name and schema
/// keep `previous`'s slots.
pub async fn load_reusing(
    paths: &[PathBuf],
    previous: &CompiledPipeline,
) -> Result<CompiledPipeline, Diagnostics> {
    let mut files = Vec::new();
    for p in paths {
        files.push(SourceFile::read(p)?);
    }
    let spec = parse::parse_files(&files)?;
    compile::compile_reusing(spec, Some(previous)).await
}
