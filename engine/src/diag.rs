//! Source files, locations and diagnostics.
//!
//! Every problem the policy front end or the compiler finds is a [`Diagnostic`]: a typed
//! [`Problem`] (the message), a severity, a primary location with a label, optional secondary
//! locations (for example the other definition of a duplicate, or each edge of a cycle) and a
//! help line. Diagnostics implement [`miette::Diagnostic`] through [`Diagnostic::report`], so the
//! CLI can render them with the source line and a caret, as plain `file:line:col` lines, or as
//! JSON ([`Diagnostic::to_json`]).

use std::fmt;
use std::sync::Arc;

use miette::{LabeledSpan, NamedSource, SourceSpan};
use serde::Serialize;

use crate::problem::Problem;

/// Index of a file in [`Sources`].
pub type FileId = u32;

/// One policy file: its display name and its text.
#[derive(Debug, Clone)]
pub struct SourceFile {
    name: Arc<str>,
    text: Arc<str>,
    /// Shared, so cloning a file (the incremental parse cache keeps its files) copies no lines.
    line_starts: Arc<[u32]>,
}

impl SourceFile {
    /// A file and the index of its lines.
    pub(crate) fn new(name: impl Into<Arc<str>>, text: impl Into<Arc<str>>) -> Self {
        let text: Arc<str> = text.into();
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i as u32 + 1)).collect();
        SourceFile { name: name.into(), text, line_starts }
    }

    /// The name shown in diagnostics (the path as given).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file's text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether `other` is this very text (the same allocation, not merely equal bytes): a
    /// file kept by the incremental parse keeps its text.
    pub(crate) fn is_text(&self, other: &Arc<str>) -> bool {
        Arc::ptr_eq(&self.text, other)
    }

    /// The text, shared.
    pub(crate) fn shared_text(&self) -> Arc<str> {
        Arc::clone(&self.text)
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: u32) -> (u32, u32) {
        let line_index = self.line_starts.partition_point(|&start| start <= offset).saturating_sub(1);
        let line_start = self.line_starts.get(line_index).copied().unwrap_or(0);
        let column = self.text.get(line_start as usize..offset as usize).map_or(0, |prefix| prefix.chars().count());
        (line_index as u32 + 1, column as u32 + 1)
    }
}

/// All files of one policy, in the order they were read.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    files: Vec<SourceFile>,
}

impl Sources {
    /// Adds a file and returns its id.
    pub fn add(&mut self, name: impl Into<Arc<str>>, text: impl Into<Arc<str>>) -> FileId {
        self.push(SourceFile::new(name, text))
    }

    /// Adds a file built with [`SourceFile::new`] (possibly on another thread).
    pub(crate) fn push(&mut self, file: SourceFile) -> FileId {
        self.files.push(file);
        (self.files.len() - 1) as FileId
    }

    /// The file with this id.
    pub fn file(&self, id: FileId) -> Option<&SourceFile> {
        self.files.get(id as usize)
    }

    /// All files.
    pub fn files(&self) -> &[SourceFile] {
        &self.files
    }

    /// File name, line and column of a location.
    pub fn position(&self, loc: Loc) -> Position {
        match self.file(loc.file) {
            Some(file) => {
                let (line, column) = file.line_col(loc.start);
                Position { file: file.name().to_owned(), line, column }
            }
            None => Position { file: String::from("<unknown>"), line: 0, column: 0 },
        }
    }

    /// The source text a location covers.
    pub fn snippet(&self, loc: Loc) -> &str {
        self.file(loc.file).and_then(|f| f.text().get(loc.start as usize..loc.end as usize)).unwrap_or("")
    }
}

/// A byte range in one source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Loc {
    /// The file.
    pub file: FileId,
    /// Byte offset of the first character.
    pub start: u32,
    /// Byte offset one past the last character.
    pub end: u32,
}

impl Loc {
    /// A location in `file` covering `range`.
    pub fn new(file: FileId, range: std::ops::Range<usize>) -> Self {
        Loc { file, start: range.start as u32, end: range.end as u32 }
    }

    fn span(self) -> SourceSpan {
        SourceSpan::new((self.start as usize).into(), (self.end - self.start) as usize)
    }
}

/// A value together with where it was written. The location is not part of equality, so
/// reformatting a policy never changes what it means.
#[derive(Debug, Clone, Copy)]
pub struct Located<T> {
    /// The value.
    pub value: T,
    /// Where it was written.
    pub loc: Loc,
}

impl<T> Located<T> {
    /// Wraps a value with its location.
    pub fn new(value: T, loc: Loc) -> Self {
        Located { value, loc }
    }
}

impl<T: PartialEq> PartialEq for Located<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T: Eq> Eq for Located<T> {}

/// A resolved `file:line:column` position (1-based).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Position {
    /// File name as given on the command line.
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The policy is invalid and will not be applied.
    Error,
    /// The policy is valid but probably not what was meant.
    Warning,
}

/// A location with a short label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// Where.
    pub loc: Loc,
    /// What is there (may be empty).
    pub text: String,
}

/// One problem found in a policy.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    problem: Problem,
    severity: Severity,
    primary: Label,
    secondary: Vec<Label>,
    /// The environments a graph check found it in; empty when it holds in every environment.
    environments: Vec<String>,
}

impl Diagnostic {
    /// An error at `loc`.
    pub fn error(problem: Problem, loc: Loc, label: impl Into<String>) -> Self {
        Diagnostic {
            problem,
            severity: Severity::Error,
            primary: Label { loc, text: label.into() },
            secondary: Vec::new(),
            environments: Vec::new(),
        }
    }

    /// A warning at `loc`.
    pub fn warning(problem: Problem, loc: Loc, label: impl Into<String>) -> Self {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(problem, loc, label) }
    }

    /// Adds a secondary location.
    pub fn with_note(mut self, loc: Loc, text: impl Into<String>) -> Self {
        self.secondary.push(Label { loc, text: text.into() });
        self
    }

    /// Says which environments the problem was found in (a graph check of a policy whose
    /// environments have different graphs).
    pub fn in_environments(mut self, environments: Vec<String>) -> Self {
        self.environments = environments;
        self
    }

    /// The environments it was found in; empty for every environment.
    pub fn environments(&self) -> &[String] {
        &self.environments
    }

    /// The message: the problem, and the environments it was found in when not all.
    pub fn message(&self) -> String {
        let names = || self.environments.iter().map(|e| format!("`{e}`")).collect::<Vec<_>>().join(", ");
        match self.environments.len() {
            0 => self.problem.to_string(),
            1 => format!("{} (environment {})", self.problem, names()),
            _ => format!("{} (environments {})", self.problem, names()),
        }
    }

    /// What is wrong.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }

    /// Error or warning.
    pub fn severity(&self) -> Severity {
        self.severity
    }

    /// The main location.
    pub fn primary(&self) -> &Label {
        &self.primary
    }

    /// Further locations involved.
    pub fn secondary(&self) -> &[Label] {
        &self.secondary
    }

    /// A `miette` view of this diagnostic, for graphical rendering.
    pub fn report(&self, sources: &Sources) -> Report {
        let mut related = Vec::new();
        let mut labels =
            vec![LabeledSpan::new_primary_with_span(non_empty(&self.primary.text), self.primary.loc.span())];
        for note in &self.secondary {
            if note.loc.file == self.primary.loc.file {
                labels.push(LabeledSpan::new_with_span(non_empty(&note.text), note.loc.span()));
            } else {
                related.push(Report {
                    message: note.text.clone(),
                    code: None,
                    severity: miette::Severity::Advice,
                    help: None,
                    source: named_source(sources, note.loc.file),
                    labels: vec![LabeledSpan::new_primary_with_span(None, note.loc.span())],
                    related: Vec::new(),
                });
            }
        }
        Report {
            message: self.message(),
            code: Some(self.problem.code()),
            severity: match self.severity {
                Severity::Error => miette::Severity::Error,
                Severity::Warning => miette::Severity::Warning,
            },
            help: self.problem.help(),
            source: named_source(sources, self.primary.loc.file),
            labels,
            related,
        }
    }

    /// One line: `file:line:col: error[code]: message`.
    pub fn to_plain(&self, sources: &Sources) -> String {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut line =
            format!("{}: {severity}[{}]: {}", sources.position(self.primary.loc), self.problem.code(), self.message());
        for note in &self.secondary {
            line.push_str(&format!(" (see {}: {})", sources.position(note.loc), note.text));
        }
        line
    }

    /// A machine-readable form with resolved positions.
    pub fn to_json(&self, sources: &Sources) -> serde_json::Value {
        let label = |l: &Label| {
            serde_json::json!({
                "position": sources.position(l.loc),
                "text": l.text,
                "snippet": sources.snippet(l.loc),
            })
        };
        serde_json::json!({
            "severity": self.severity,
            "code": self.problem.code(),
            "message": self.message(),
            "environments": self.environments,
            "help": self.problem.help(),
            "position": sources.position(self.primary.loc),
            "labels": std::iter::once(&self.primary).chain(&self.secondary).map(label).collect::<Vec<_>>(),
        })
    }
}

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

fn named_source(sources: &Sources, file: FileId) -> Option<NamedSource<Arc<str>>> {
    sources.file(file).map(|f| NamedSource::new(f.name(), Arc::clone(&f.text)).with_language("toml"))
}

/// A list of diagnostics: errors and warnings together, in the order found.
#[derive(Debug, Clone, Default)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
}

impl Diagnostics {
    /// Appends one diagnostic.
    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.items.push(diagnostic);
    }

    /// Appends all of `other`.
    pub fn extend(&mut self, other: Diagnostics) {
        self.items.extend(other.items);
    }

    /// True when at least one diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }

    /// All diagnostics.
    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter()
    }

    /// The errors only.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Error)
    }

    /// The warnings only.
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Warning)
    }

    /// Number of diagnostics.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sorts by file, then position, errors before warnings at the same place.
    pub fn sort(&mut self) {
        self.items.sort_by_key(|d| (d.primary.loc.file, d.primary.loc.start, d.severity));
    }
}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

/// An owned `miette` rendering of a [`Diagnostic`].
#[derive(Debug)]
pub struct Report {
    message: String,
    code: Option<&'static str>,
    severity: miette::Severity,
    help: Option<String>,
    source: Option<NamedSource<Arc<str>>>,
    labels: Vec<LabeledSpan>,
    related: Vec<Report>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Report {}

impl miette::Diagnostic for Report {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.code.map(|c| Box::new(c) as Box<dyn fmt::Display>)
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(self.severity)
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help.as_ref().map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.source.as_ref().map(|s| s as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        Some(Box::new(self.labels.iter().cloned()))
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn miette::Diagnostic> + 'a>> {
        if self.related.is_empty() {
            None
        } else {
            Some(Box::new(self.related.iter().map(|r| r as &dyn miette::Diagnostic)))
        }
    }
}
