//! Golden tests: pipeline semantics as small text files, cheap to add.
//!
//! Each `tests/golden/*.test` file (and each example in docs/pipeline-sql.md) holds:
//!
//! ```text
//! # what the case shows
//! -- pipeline
//! CREATE TABLE ...;            (a whole pipeline file)
//! -- input
//! @1000 d1/telemetry {"light": 100}   (receive time in epoch ms, topic, payload)
//! @5000 tick                          (time moves on; silent devices, idle watermarks)
//! -- output commands
//! {"device_id":"d1","led_on":true}    (every row the table received, as JSON, any order)
//! -- error
//! text that must appear in the diagnostics (instead of input and output)
//! -- file homes.csv
//! a file written next to the pipeline (reference data), verbatim
//! ```
//!
//! The input runs through the engine's own runner ([`fleetsql::engine::local::Local`]);
//! at the end every open window closes, as at shutdown. `FLEETSQL_BLESS=1 cargo test
//! golden` rewrites the output sections from what the engine produced.

use std::path::Path;

use fleetsql::engine::local::Local;

use crate::util::json_lines;

#[derive(Debug, Default)]
struct Case {
    pipeline: String,
    input: Vec<String>,
    outputs: Vec<(String, Vec<String>)>,
    errors: Vec<String>,
    files: Vec<(String, String)>,
}

fn parse(text: &str) -> Result<Case, String> {
    let mut case = Case::default();
    let mut section = String::new();
    for line in text.lines() {
        if let Some(head) = line.strip_prefix("-- ") {
            let head = head.trim();
            if head == "pipeline" || head == "input" || head == "error" {
                section = head.to_string();
                continue;
            }
            if let Some(name) = head.strip_prefix("file ") {
                section = "file".into();
                case.files.push((name.trim().to_string(), String::new()));
                continue;
            }
            if let Some(table) = head.strip_prefix("output ") {
                section = "output".into();
                case.outputs.push((table.trim().to_string(), vec![]));
                continue;
            }
        }
        match section.as_str() {
            "pipeline" => {
                case.pipeline.push_str(line);
                case.pipeline.push('\n');
            }
            "file" => {
                if let Some((_, text)) = case.files.last_mut() {
                    text.push_str(line);
                    text.push('\n');
                }
            }
            _ if line.trim().is_empty() || line.starts_with('#') => {}
            "input" => case.input.push(line.trim().to_string()),
            "output" => {
                if let Some((_, rows)) = case.outputs.last_mut() {
                    rows.push(line.trim().to_string());
                }
            }
            "error" => case.errors.push(line.trim().to_string()),
            _ => return Err(format!("line outside any section: {line}")),
        }
    }
    if case.pipeline.trim().is_empty() {
        return Err("no `-- pipeline` section".into());
    }
    Ok(case)
}

/// Runs one case; returns the actual rows of each table it names.
async fn run(case: &Case, dir: &Path) -> Result<Vec<(String, Vec<String>)>, String> {
    for (name, text) in &case.files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let file = dir.join("pipeline.sql");
    std::fs::write(&file, &case.pipeline).unwrap();
    let compiled = fleetsql::pipeline::load(&[file]).await;
    if !case.errors.is_empty() {
        let d = match compiled {
            Ok(_) => return Err("the pipeline compiled, but errors were expected".into()),
            Err(d) => d.to_string(),
        };
        for e in &case.errors {
            if !d.contains(e.as_str()) {
                return Err(format!("diagnostics lack `{e}`:\n{d}"));
            }
        }
        return Ok(vec![]);
    }
    let compiled = compiled.map_err(|d| format!("the pipeline does not compile:\n{d}"))?;
    let mut local = Local::new(compiled).map_err(|e| e.to_string())?;
    for line in &case.input {
        let line = line
            .strip_prefix('@')
            .ok_or_else(|| format!("an input line starts with @<ms>: {line}"))?;
        let (at, rest) = line.split_once(' ').unwrap_or((line, ""));
        let at: i64 = at.parse().map_err(|_| format!("bad time in `@{line}`"))?;
        let rest = rest.trim();
        if rest == "tick" {
            local.advance(at).await;
            continue;
        }
        let (topic, payload) = rest.split_once(' ').unwrap_or((rest, ""));
        local.message(topic, payload.as_bytes(), at).await;
    }
    local.finish().await;
    let mut actual = Vec::new();
    for (table, _) in &case.outputs {
        let rows = local
            .table(table)
            .ok_or_else(|| format!("no table `{table}`"))?;
        actual.push((table.clone(), json_lines(&rows)));
    }
    Ok(actual)
}

/// Checks a case; with FLEETSQL_BLESS set, returns the text with outputs rewritten.
fn check(name: &str, text: &str) -> Result<Option<String>, String> {
    let case = parse(text).map_err(|e| format!("{name}: {e}"))?;
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let actual = rt
        .block_on(run(&case, dir.path()))
        .map_err(|e| format!("{name}: {e}"))?;
    if std::env::var_os("FLEETSQL_BLESS").is_some() && case.errors.is_empty() {
        // Outputs go last; anything after the first output section is rewritten.
        let cut = text.find("\n-- output ").map_or(text.len(), |i| i + 1);
        let mut out = text[..cut].to_string();
        if !out.ends_with('\n') {
            out.push('\n');
        }
        for (table, rows) in &actual {
            out.push_str(&format!("-- output {table}\n"));
            for r in rows {
                out.push_str(r);
                out.push('\n');
            }
        }
        return Ok(Some(out));
    }
    for ((table, want), (_, got)) in case.outputs.iter().zip(&actual) {
        let mut want = want.clone();
        want.sort();
        if &want != got {
            return Err(format!(
                "{name}: table `{table}`\n  expected:\n    {}\n  actual:\n    {}",
                want.join("\n    "),
                got.join("\n    ")
            ));
        }
    }
    Ok(None)
}

#[test]
fn golden_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "test"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "golden files in {}", dir.display());
    let mut failures = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        match check(&name, &text) {
            Ok(Some(blessed)) => std::fs::write(f, blessed).unwrap(),
            Ok(None) => {}
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Every ```sql block of docs/pipeline-sql.md is a whole pipeline, followed by a ```text
/// block with its input and expected rows; each runs like a golden file.
#[test]
fn every_example_in_the_sql_reference_runs() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/pipeline-sql.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let mut blocks = Vec::new();
    let mut lines = doc.lines().enumerate().peekable();
    while let Some((n, line)) = lines.next() {
        if let Some(lang) = line.strip_prefix("```") {
            let mut body = String::new();
            for (_, l) in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            blocks.push((n + 1, lang.trim().to_string(), body));
        }
    }
    let mut examples = 0;
    let mut failures = Vec::new();
    for (i, (line, lang, body)) in blocks.iter().enumerate() {
        if lang != "sql" {
            continue;
        }
        let follows = blocks
            .get(i + 1)
            .filter(|(_, l, b)| l == "text" && b.trim_start().starts_with("-- "));
        let Some((_, _, io)) = follows else {
            failures.push(format!(
                "docs/pipeline-sql.md:{line}: a sql example without its ```text block of input and output"
            ));
            continue;
        };
        examples += 1;
        let text = format!("-- pipeline\n{body}{io}");
        if let Err(e) = check(&format!("docs/pipeline-sql.md:{line}"), &text) {
            failures.push(e);
        }
    }
    assert!(examples >= 10, "examples found: {examples}");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
