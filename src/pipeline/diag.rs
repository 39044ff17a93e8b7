//! Diagnostics for pipeline files: an error with its file, line and column, rendered the
//! way rustc renders them, with the offending line and a caret under the place.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::sql::sqlparser::tokenizer::Span;

/// A pipeline file as read from disk; diagnostics borrow its text to show the line.
#[derive(Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

impl SourceFile {
    pub fn read(path: &Path) -> Result<Arc<SourceFile>, Diagnostics> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Arc::new(SourceFile {
                path: path.to_path_buf(),
                text,
            })),
            Err(e) => Err(Diagnostics(vec![Diagnostic {
                file: Some(Arc::new(SourceFile {
                    path: path.to_path_buf(),
                    text: String::new(),
                })),
                line: 0,
                column: 0,
                message: format!("cannot read pipeline file: {e}"),
                help: None,
            }])),
        }
    }
}

/// A place in a pipeline file (1-based line and column, as sqlparser counts them).
#[derive(Debug, Clone)]
pub struct Loc {
    pub file: Arc<SourceFile>,
    pub line: u64,
    pub column: u64,
}

impl Loc {
    pub fn at(file: &Arc<SourceFile>, span: Span) -> Loc {
        Loc {
            file: file.clone(),
            line: span.start.line,
            column: span.start.column,
        }
    }

    pub fn error(&self, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: Some(self.file.clone()),
            line: self.line,
            column: self.column,
            message: message.into(),
            help: None,
        }
    }
}

/// One error found in a pipeline.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub file: Option<Arc<SourceFile>>,
    /// 1-based; 0 when the error has no better place than the file.
    pub line: u64,
    pub column: u64,
    pub message: String,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// An error about the pipeline as a whole, with no place in a file.
    pub fn global(message: impl Into<String>) -> Self {
        Diagnostic {
            file: None,
            line: 0,
            column: 0,
            message: message.into(),
            help: None,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        if let Some(file) = &self.file {
            let path = file.path.display();
            if self.line == 0 {
                writeln!(f, "  --> {path}")?;
            } else {
                writeln!(f, "  --> {path}:{}:{}", self.line, self.column)?;
                if let Some(text) = file.text.lines().nth(self.line as usize - 1) {
                    let gutter = self.line.to_string().len();
                    let caret_pad: String = text
                        .chars()
                        .take(self.column.saturating_sub(1) as usize)
                        .map(|c| if c == '\t' { '\t' } else { ' ' })
                        .collect();
                    writeln!(f, "{:gutter$} |", "")?;
                    writeln!(f, "{} | {text}", self.line)?;
                    writeln!(f, "{:gutter$} | {caret_pad}^", "")?;
                }
            }
        }
        if let Some(help) = &self.help {
            writeln!(f, "  = help: {help}")?;
        }
        Ok(())
    }
}

/// Every error found in a pipeline, in file order.
#[derive(Debug, Clone)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            write!(f, "{d}")?;
        }
        let n = self.0.len();
        write!(f, "{n} error{} in pipeline", if n == 1 { "" } else { "s" })
    }
}

impl std::error::Error for Diagnostics {}

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Self {
        Diagnostics(vec![d])
    }
}
