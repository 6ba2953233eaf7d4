//! The policy language: reading TOML files (one file, or a directory of them merged into one
//! policy) into a [`PolicySet`], with located diagnostics.

pub mod ast;
pub mod edit;
mod parse;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use ast::*;
pub(crate) use parse::TomlReport;
pub use parse::{POLICY_VERSION, parse_port_range};

use rayon::prelude::*;

use crate::diag::{Diagnostic, Diagnostics, FileId, Loc, Located, SourceFile};
use crate::problem::Problem;

/// A policy could not be read at all (as opposed to read and found invalid).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A file or directory could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A directory without any `*.toml` file.
    #[error("no `*.toml` policy files in `{path}`")]
    EmptyDirectory {
        /// The directory.
        path: PathBuf,
    },
}

/// The outcome of reading a policy: what could be parsed, and every problem found on the way.
#[derive(Debug)]
pub struct Parsed {
    /// The policy as far as it could be read.
    pub policy: PolicySet,
    /// Problems found while parsing and merging.
    pub diagnostics: Diagnostics,
    /// False when some file was not valid TOML; later stages should then not run.
    pub syntax_ok: bool,
}

/// Reads a policy from a file, or from every `*.toml` file in a directory tree (in path order,
/// merged into one policy).
pub fn load(path: &Path) -> Result<Parsed, LoadError> {
    Ok(parse_sources(read_files(&policy_files(path)?)?))
}

/// The files of a policy: the file itself, or every `*.toml` file of a directory tree in path
/// order (dotfiles skipped).
pub(crate) fn policy_files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let io = |source| LoadError::Io { path: path.to_owned(), source };
    if !std::fs::metadata(path).map_err(io)?.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    collect_toml_files(path, &mut files)?;
    if files.is_empty() {
        return Err(LoadError::EmptyDirectory { path: path.to_owned() });
    }
    Ok(files)
}

/// Reads files, returning names and texts in order, or the error of the first that cannot be
/// read.
pub(crate) fn read_files(files: &[PathBuf]) -> Result<Vec<(String, String)>, LoadError> {
    files
        .iter()
        .map(|file| match std::fs::read_to_string(file) {
            Ok(text) => Ok((file.display().to_string(), text)),
            Err(source) => Err(LoadError::Io { path: file.clone(), source }),
        })
        .collect()
}

fn collect_toml_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let io = |source| LoadError::Io { path: dir.to_owned(), source };
    let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(io)?.collect::<Result<_, _>>().map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_toml_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
    Ok(())
}

/// Parses named texts as the files of one policy.
pub fn parse_sources(files: impl IntoIterator<Item = (String, String)>) -> Parsed {
    let mut cache = ParseCache::default();
    cache.parse_sources(files);
    cache.parsed.take().unwrap_or_else(|| merge(&[], Vec::new()))
}

/// What [`ParseCache`] keeps of one file: everything its parse gave but its services, which
/// live in the merged policy (moved, never copied).
#[derive(Debug)]
struct CachedFile {
    /// Its name and text (the key: a file is reused when both are the same).
    source: SourceFile,
    /// Its environments, layers, isolation sets and intrinsic cycles (services left out).
    globals: PolicySet,
    /// What parsing it found.
    diags: Diagnostics,
    /// Where it defines `[model]`.
    model_at: Option<Loc>,
    /// False when it is not valid TOML.
    syntax_ok: bool,
    /// How many services it defines: its run of `services` in the merged policy.
    services: usize,
}

impl CachedFile {
    fn new(part: parse::FilePart) -> (Self, Vec<Service>) {
        let parse::FilePart { source, mut policy, diags, model_at, syntax_ok } = part;
        let services = std::mem::take(&mut policy.services);
        (CachedFile { source, globals: policy, diags, model_at, syntax_ok, services: services.len() }, services)
    }
}

/// The incremental front end: the files of the last parse, so the next parse of the same
/// policy re-parses only the files whose name or text changed (or that moved to another place
/// in the file order, since locations carry the file's index), and keeps the others' parse (the
/// AST with its locations, and its diagnostics). The merged result is the same, to the byte, as
/// [`parse_sources`] of the same files: a file's parse depends only on its index and its text,
/// and the merge (the one-`[model]` rule, duplicate names) runs again over all files every time.
///
/// Where is it decided which files are re-parsed: [`ParseCache::parse_sources`]. A file is
/// kept when its name, its index and its whole text are equal to the cached one's (the text is
/// compared, not hashed: no collision can keep a stale parse).
#[derive(Debug, Default)]
pub struct ParseCache {
    files: Vec<CachedFile>,
    parsed: Option<Parsed>,
    reparsed: usize,
}

impl ParseCache {
    /// An empty cache: the first parse reads every file.
    pub fn new() -> Self {
        ParseCache::default()
    }

    /// [`load`], re-parsing only what changed since the last call. Every file is still read
    /// (and compared with the cached text).
    pub fn load(&mut self, path: &Path) -> Result<&Parsed, LoadError> {
        let files = read_files(&policy_files(path)?)?;
        Ok(self.parse_sources(files))
    }

    /// [`parse_sources`], re-parsing only the files that changed since the last call.
    pub fn parse_sources(&mut self, files: impl IntoIterator<Item = (String, String)>) -> &Parsed {
        let files: Vec<(String, String)> = files.into_iter().collect();
        let mut old_files: Vec<Option<CachedFile>> = std::mem::take(&mut self.files).into_iter().map(Some).collect();
        // The old policy's services, cut into each old file's run.
        let mut old_services = self.parsed.take().map(|p| p.policy.services).unwrap_or_default().into_iter();
        let mut old_runs: Vec<Vec<Service>> =
            old_files.iter().flatten().map(|f| old_services.by_ref().take(f.services).collect()).collect();
        let keep: Vec<bool> = files
            .iter()
            .zip(old_files.iter().map(Some).chain(std::iter::repeat(None)))
            .map(|((name, text), old)| {
                old.and_then(Option::as_ref).is_some_and(|old| old.source.name() == name && old.source.text() == text)
            })
            .collect();
        let fresh: Vec<Option<parse::FilePart>> = files
            .into_par_iter()
            .zip(keep.par_iter())
            .enumerate()
            .map(|(file, ((name, text), &keep))| {
                (!keep).then(|| parse::parse_file(file as FileId, SourceFile::new(name, text)))
            })
            .collect();
        self.reparsed = fresh.iter().flatten().count();
        let mut kept_files = Vec::with_capacity(fresh.len());
        let mut runs = Vec::with_capacity(fresh.len());
        for (index, part) in fresh.into_iter().enumerate() {
            let (file, services) = match part {
                Some(part) => CachedFile::new(part),
                None => {
                    let old = old_files.get_mut(index).and_then(Option::take);
                    let run = old_runs.get_mut(index).map(std::mem::take).unwrap_or_default();
                    match old {
                        Some(old) => (old, run),
                        // Not reached: a kept file has an old one at its index.
                        None => continue,
                    }
                }
            };
            kept_files.push(file);
            runs.push(services);
        }
        self.files = kept_files;
        self.parsed.insert(merge(&self.files, runs))
    }

    /// The result of the last parse, if any.
    pub fn parsed(&self) -> Option<&Parsed> {
        self.parsed.as_ref()
    }

    /// How many files the last parse read anew (the others came from the cache).
    pub fn reparsed(&self) -> usize {
        self.reparsed
    }
}

/// Merges files parsed on their own, in order, into one policy: each file's globals and its
/// run of services (`services`, one per file), the parse diagnostics, then the checks across
/// files (one `[model]`, names defined twice).
fn merge(files: &[CachedFile], services: Vec<Vec<Service>>) -> Parsed {
    let mut policy = PolicySet::default();
    let mut diagnostics = Diagnostics::default();
    let mut model_at: Option<Loc> = None;
    let mut syntax_ok = true;
    policy.services.reserve_exact(services.iter().map(Vec::len).sum());
    for (file, mut run) in files.iter().zip(services) {
        policy.sources.push(file.source.clone());
        diagnostics.extend(file.diags.clone());
        let globals = &file.globals;
        let mut model_used = true;
        if let Some(here) = file.model_at {
            match model_at {
                Some(first) => {
                    // A second `[model]` is reported, and not used.
                    diagnostics.push(
                        Diagnostic::error(
                            Problem::Duplicate { kind: "table", name: "model".into() },
                            here,
                            "defined again here",
                        )
                        .with_note(first, "first defined here"),
                    );
                    model_used = false;
                }
                None => model_at = Some(here),
            }
        }
        policy.environments.extend(globals.environments.iter().cloned());
        if model_used {
            policy.layers.extend(globals.layers.iter().cloned());
            policy.isolated.extend(globals.isolated.iter().cloned());
        }
        policy.services.append(&mut run);
        policy.intrinsic_cycles.extend(globals.intrinsic_cycles.iter().cloned());
        syntax_ok &= file.syntax_ok;
    }
    check_duplicates(&policy, &mut diagnostics);
    Parsed { policy, diagnostics, syntax_ok }
}

/// Parses one text as a whole policy (tests, fuzzing, embedding).
pub fn parse_str(name: &str, text: &str) -> Parsed {
    parse_sources([(name.to_owned(), text.to_owned())])
}

fn check_duplicates(policy: &PolicySet, diags: &mut Diagnostics) {
    duplicates("service", policy.services.iter().map(|s| &s.name), diags);
    duplicates("environment", policy.environments.iter().map(|e| &e.name), diags);
    duplicates("layer", policy.layers.iter(), diags);
}

/// Reports every name defined more than once, pointing at the first definition.
fn duplicates<'a>(kind: &'static str, names: impl Iterator<Item = &'a Located<String>>, diags: &mut Diagnostics) {
    let mut first: BTreeMap<&str, &Located<String>> = BTreeMap::new();
    for name in names {
        if let Some(earlier) = first.get(name.value.as_str()) {
            diags.push(
                Diagnostic::error(
                    Problem::Duplicate { kind, name: name.value.clone() },
                    name.loc,
                    "defined again here",
                )
                .with_note(earlier.loc, "first defined here"),
            );
        } else {
            first.insert(&name.value, name);
        }
    }
}
