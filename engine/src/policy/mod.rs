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

use crate::diag::{Diagnostic, Diagnostics, FileId, Located, SourceFile};
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
    // Files are parsed in parallel, each on its own, then merged in order.
    let files: Vec<(String, String)> = files.into_iter().collect();
    let parts: Vec<parse::FilePart> = files
        .into_par_iter()
        .enumerate()
        .map(|(file, (name, text))| parse::parse_file(file as FileId, SourceFile::new(name, text)))
        .collect();
    let mut policy = PolicySet::default();
    let mut diagnostics = Diagnostics::default();
    let mut model_at = None;
    let mut syntax_ok = true;
    for part in parts {
        syntax_ok &= part.merge_into(&mut policy, &mut model_at, &mut diagnostics);
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
