//! The evidence files' shared parts: their error, and writing JSON lines durably.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::durable;

/// A file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading failed.
    #[error("cannot read `{path}`: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Writing failed.
    #[error("cannot write `{path}`: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not a record.
    #[error("`{path}` line {line} column {}: {}", source.column(), json_message(source))]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The JSON error.
        source: serde_json::Error,
    },
}

impl StoreError {
    /// The file.
    pub fn path(&self) -> &Path {
        match self {
            StoreError::Read { path, .. } | StoreError::Write { path, .. } | StoreError::Parse { path, .. } => path,
        }
    }

    /// The kind, as the agent's metric labels it: `read`, `write` or `corrupt`.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Read { .. } => "read",
            StoreError::Write { .. } => "write",
            StoreError::Parse { .. } => "corrupt",
        }
    }
}

/// A JSON error's message without its position (the caller gives the file's own).
fn json_message(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let position = format!(" at line {} column {}", error.line(), error.column());
    text.strip_suffix(&position).map_or(text.clone(), str::to_owned)
}

/// `lines` as JSON, one per line.
pub(super) fn lines_text<T: Serialize>(lines: &[T]) -> std::io::Result<String> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&serde_json::to_string(line).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    Ok(text)
}

/// Appends `text` to a private file durably.
pub(super) fn append_text(path: &Path, text: &str) -> Result<(), StoreError> {
    durable::append(path, text.as_bytes()).map_err(|source| StoreError::Write { path: path.to_owned(), source })
}
