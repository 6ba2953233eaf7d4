//! The policy language: reading TOML files (one file, or a directory of them merged into one
//! policy) into a [`PolicySet`], with located diagnostics.

pub mod ast;
pub mod edit;
mod parse;

use std::path::{Path, PathBuf};

pub use ast::*;
pub(crate) use parse::TomlReport;
pub use parse::{POLICY_VERSION, parse_port_range};

use foldhash::HashMap;
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
    /// When it was read from a file that had not changed for a while: what that file looked
    /// like, so the next [`ParseCache::load`] need not read it again while it still looks so.
    stamp: Option<FileStamp>,
}

impl CachedFile {
    fn new(part: parse::FilePart) -> (Self, Vec<Service>) {
        let parse::FilePart { source, mut policy, diags, model_at, syntax_ok } = part;
        let services = std::mem::take(&mut policy.services);
        let file =
            CachedFile { source, globals: policy, diags, model_at, syntax_ok, services: services.len(), stamp: None };
        (file, services)
    }
}

/// What a file looked like when it was read: device, inode, size, and modification and change
/// times (nanoseconds). Any write changes the change time, which no program can set, and a
/// rename puts another inode in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How long a file must have been unchanged, when it is read, for its stamp to be trusted: file
/// times are coarse (a clock tick), so a file written again within a tick of being read could
/// keep its stamp with other bytes. Older than this, any later write changes the stamp.
const STAMP_SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

impl FileStamp {
    fn of(metadata: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt as _;
        FileStamp {
            dev: metadata.dev(),
            ino: metadata.ino(),
            len: metadata.len(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }

    /// True when neither time is within [`STAMP_SETTLED`] of `now` (or after it).
    fn settled(&self, now: std::time::SystemTime) -> bool {
        let Ok(now) = now.duration_since(std::time::UNIX_EPOCH) else { return false };
        let limit = now.saturating_sub(STAMP_SETTLED);
        let before = |(secs, nanos): (i64, i64)| {
            let (Ok(secs), Ok(nanos)) = (u64::try_from(secs), u32::try_from(nanos)) else { return false };
            std::time::Duration::new(secs, nanos) < limit
        };
        before(self.mtime) && before(self.ctime)
    }
}

/// One file of a policy as [`ParseCache::load`] found it: its text, or, when its stamp is the one
/// recorded for the cached file at the same place, nothing (it was not read).
enum FileInput {
    /// The text just read, and the file's stamp when that text can be trusted to stay its own.
    Read(String, Option<FileStamp>),
    /// Unchanged since the cached parse: not read.
    Unchanged,
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
/// compared, not hashed: no collision can keep a stale parse). Which files are read at all:
/// [`ParseCache::load`], by each file's stamp.
#[derive(Debug, Default)]
pub struct ParseCache {
    files: Vec<CachedFile>,
    parsed: Option<Parsed>,
    reparsed: usize,
    unread: usize,
}

impl ParseCache {
    /// An empty cache: the first parse reads every file.
    pub fn new() -> Self {
        ParseCache::default()
    }

    /// [`load`], re-parsing only what changed since the last call. A file whose stamp (device,
    /// inode, size, modification and change times) is the one recorded when its cached text was
    /// read, and that had then been unchanged for [`STAMP_SETTLED`], is not read again; every
    /// other file is read and compared with the cached text.
    pub fn load(&mut self, path: &Path) -> Result<&Parsed, LoadError> {
        let paths = policy_files(path)?;
        let mut files = Vec::with_capacity(paths.len());
        self.unread = 0;
        for (index, file) in paths.iter().enumerate() {
            let name = file.display().to_string();
            let io = |source| LoadError::Io { path: file.clone(), source };
            let now = std::time::SystemTime::now();
            let before = FileStamp::of(&std::fs::metadata(file).map_err(io)?);
            let cached = self.files.get(index).filter(|c| *c.source.name() == *name);
            if cached.is_some_and(|c| c.stamp == Some(before)) {
                self.unread += 1;
                files.push((name, FileInput::Unchanged));
                continue;
            }
            let text = std::fs::read_to_string(file).map_err(io)?;
            // Trusted only when the file did not change while it was read, nor shortly before.
            let after = FileStamp::of(&std::fs::metadata(file).map_err(io)?);
            let stamp = (after == before && before.settled(now)).then_some(before);
            files.push((name, FileInput::Read(text, stamp)));
        }
        Ok(self.parse_inputs(files))
    }

    /// Makes the next [`ParseCache::load`] read every file (and compare its text), as asked for
    /// by someone who knows better than the file times: an explicit reload, a file system whose
    /// times cannot be trusted (a network mount's cached attributes).
    pub fn forget_stamps(&mut self) {
        for file in &mut self.files {
            file.stamp = None;
        }
    }

    /// How many files the last [`ParseCache::load`] did not read (their stamps were unchanged).
    pub fn unread(&self) -> usize {
        self.unread
    }

    /// [`parse_sources`], re-parsing only the files that changed since the last call.
    pub fn parse_sources(&mut self, files: impl IntoIterator<Item = (String, String)>) -> &Parsed {
        self.unread = 0;
        self.parse_inputs(files.into_iter().map(|(name, text)| (name, FileInput::Read(text, None))).collect())
    }

    /// Parses the files that are new or changed, keeps the others' parse, merges.
    fn parse_inputs(&mut self, files: Vec<(String, FileInput)>) -> &Parsed {
        let mut old_files: Vec<Option<CachedFile>> = std::mem::take(&mut self.files).into_iter().map(Some).collect();
        // The old policy's services, cut into each old file's run.
        let mut old_services = self.parsed.take().map(|p| p.policy.services).unwrap_or_default().into_iter();
        let mut old_runs: Vec<Vec<Service>> =
            old_files.iter().flatten().map(|f| old_services.by_ref().take(f.services).collect()).collect();
        let keep: Vec<bool> = files
            .iter()
            .zip(old_files.iter().map(Some).chain(std::iter::repeat(None)))
            .map(|((name, input), old)| {
                old.and_then(Option::as_ref).is_some_and(|old| {
                    *old.source.name() == **name
                        && match input {
                            FileInput::Unchanged => true,
                            FileInput::Read(text, _) => *old.source.text() == **text,
                        }
                })
            })
            .collect();
        // A file not read keeps its stamp (None here); one read gets the stamp it was read with.
        let stamps: Vec<Option<Option<FileStamp>>> = files
            .iter()
            .map(|(_, input)| match input {
                FileInput::Read(_, stamp) => Some(*stamp),
                FileInput::Unchanged => None,
            })
            .collect();
        let fresh: Vec<Option<parse::FilePart>> = files
            .into_par_iter()
            .zip(keep.par_iter())
            .enumerate()
            .map(|(file, ((name, input), &keep))| match input {
                FileInput::Read(text, _) if !keep => {
                    Some(parse::parse_file(file as FileId, SourceFile::new(name, text)))
                }
                _ => None,
            })
            .collect();
        self.reparsed = fresh.iter().flatten().count();
        let mut kept_files = Vec::with_capacity(fresh.len());
        let mut runs = Vec::with_capacity(fresh.len());
        for ((index, part), read_stamp) in fresh.into_iter().enumerate().zip(stamps) {
            let (mut file, services) = match part {
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
            if let Some(stamp) = read_stamp {
                file.stamp = stamp;
            }
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
    let mut first: HashMap<&str, &Located<String>> = HashMap::default();
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
