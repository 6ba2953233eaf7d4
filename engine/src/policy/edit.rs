//! Rewriting a service's mode in the policy source (`policyctl promote` / `demote`), keeping
//! comments, ordering and layout.
//!
//! [`set_service_mode`] edits one text; [`rewrite_service_mode`] finds the file that defines the
//! service, edits it, re-validates the whole policy with the new text in place, checks that the
//! only change in the compiled snapshot is the intended mode, and replaces the file atomically.
//!
//! What an edit writes, for `environment = Some(env)`:
//! - no `mode`: `mode = { env = "…" }`, after the service's descriptive keys (`cgroup`, `layer`,
//!   `group`, `owner`, `description`, `tier`; the last of those present), else at the end. The
//!   other environments keep using their defaults, as before.
//! - `mode = "audit"` (one mode for every environment): a table that keeps `"audit"` for every
//!   other environment of the policy and sets `env`, so no other environment changes behaviour:
//!   `mode = { prod = "audit", qa = "enforce" }` (environments in declaration order).
//! - a table (`mode = { … }`, `[services.X.mode]` or dotted `mode.env = …`): the key `env` is set
//!   or added.
//!
//! For `environment = None` the service gets one mode for every environment: `mode = "…"`
//! (replacing a table).
//!
//! When the service already has the mode (in the effective sense: an inherited default counts),
//! nothing is written.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use toml_edit::{DocumentMut, InlineTable, Item, Key, Table, Value};

use super::{LoadError, Mode, Parsed, PolicySet, parse_sources, read_files};
use crate::compile::{CompileError, Compiled, DEFAULT_ENVIRONMENT, DEFAULT_MODE, analyze_parsed};
use crate::diag::{Diagnostics, Sources};
use crate::problem::closest;
use crate::snapshot::{EnvironmentEntry, SnapshotContent};

/// Service keys after which a new `mode` goes (the last of them present).
const ANCHOR_KEYS: &[&str] = &["cgroup", "layer", "group", "owner", "description", "tier"];

/// An edit could not be made; nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EditError {
    /// The text is not valid TOML.
    #[error("{file}: not valid TOML: {message}")]
    Syntax {
        /// The file's name.
        file: String,
        /// The parser's message.
        message: String,
    },
    /// No service of that name.
    #[error("no service `{service}` in the policy{}", did_you_mean(suggestion.as_deref()))]
    UnknownService {
        /// The name asked for.
        service: String,
        /// A close name, if any.
        suggestion: Option<String>,
    },
    /// No environment of that name.
    #[error(
        "unknown environment `{environment}`{}; the policy's environments are {}",
        did_you_mean(suggestion.as_deref()),
        quoted_list(declared)
    )]
    UnknownEnvironment {
        /// The name asked for.
        environment: String,
        /// The environments the policy has (`default` when it declares none).
        declared: Vec<String>,
        /// A close name, if any.
        suggestion: Option<String>,
    },
    /// The service is written in a form the editor does not rewrite.
    #[error("service `{service}` is written as {form}; write it as a `[services.{service}]` table to edit it")]
    UnsupportedForm {
        /// The service.
        service: String,
        /// What was found.
        form: String,
    },
    /// The service's current `mode` is not a mode or a table of modes.
    #[error("the `mode` of service `{service}` is not understood: {found}")]
    InvalidMode {
        /// The service.
        service: String,
        /// What was found.
        found: String,
    },
    /// Several files define the service (the policy is invalid).
    #[error("service `{service}` is defined in several files: {}", paths(files))]
    Ambiguous {
        /// The service.
        service: String,
        /// The files.
        files: Vec<PathBuf>,
    },
    /// The policy could not be read.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The new file could not be written.
    #[error("cannot write `{path}`: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The policy is invalid: already before the edit (`edited` false) or with the edit in place
    /// (`edited` true). `sources` hold the texts the diagnostics point into.
    #[error("{}", invalid_message(*edited, sources, diagnostics))]
    Invalid {
        /// True when the edit made the policy invalid.
        edited: bool,
        /// The policy's files as checked.
        sources: Sources,
        /// Its problems.
        diagnostics: Diagnostics,
    },
    /// The file changed on disk between reading and replacing it.
    #[error("`{path}` changed while it was being edited; nothing was written, try again")]
    Conflict {
        /// The file.
        path: PathBuf,
    },
    /// The edited policy compiles, but differs from the old one in more than the intended mode
    /// (a bug in the editor); nothing was written.
    #[error("refusing the edit of service `{service}`: {detail}")]
    Unexpected {
        /// The service.
        service: String,
        /// What differs.
        detail: String,
    },
}

fn did_you_mean(suggestion: Option<&str>) -> String {
    suggestion.map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default()
}

fn quoted_list(names: &[String]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

fn paths(files: &[PathBuf]) -> String {
    files.iter().map(|f| format!("`{}`", f.display())).collect::<Vec<_>>().join(", ")
}

fn invalid_message(edited: bool, sources: &Sources, diagnostics: &Diagnostics) -> String {
    let what = if edited { "the edit would make the policy invalid" } else { "the policy is invalid" };
    let errors: Vec<String> = diagnostics.errors().map(|d| d.to_plain(sources)).collect();
    match errors.as_slice() {
        [] => what.to_owned(),
        [one] => format!("{what}: {one}"),
        [first, rest @ ..] => format!("{what}: {first} (and {} more error(s))", rest.len()),
    }
}

/// One environment whose mode an edit changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModeChange {
    /// The environment.
    pub environment: String,
    /// The effective mode before.
    pub from: Mode,
    /// The effective mode after.
    pub to: Mode,
}

/// What [`rewrite_service_mode`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Edit {
    /// The file that defines the service (written when `changed`).
    pub file: PathBuf,
    /// The service.
    pub service: String,
    /// The environment asked for; `None` for every environment.
    pub environment: Option<String>,
    /// The mode asked for.
    pub mode: Mode,
    /// False when the service already had the mode; the file was not touched.
    pub changed: bool,
    /// The service's effective mode in every environment before the edit.
    pub before: BTreeMap<String, Mode>,
    /// The service's effective mode in every environment after the edit.
    pub after: BTreeMap<String, Mode>,
    /// The changed lines, as a unified diff (empty when nothing changed).
    pub diff: String,
}

impl Edit {
    /// The environments whose effective mode changed, by name.
    pub fn changes(&self) -> Vec<ModeChange> {
        self.before
            .iter()
            .filter_map(|(env, &from)| {
                let to = self.after.get(env).copied()?;
                (from != to).then(|| ModeChange { environment: env.clone(), from, to })
            })
            .collect()
    }

    /// For an edit of one environment: its effective mode before and after.
    pub fn old_and_new(&self) -> Option<(Mode, Mode)> {
        let env = self.environment.as_deref()?;
        Some((*self.before.get(env)?, *self.after.get(env)?))
    }
}

/// Sets a service's mode in one policy text; returns the new text (equal to `source` when the
/// service already has the mode). The environments and their defaults are taken from `source`
/// itself, so for a file of a policy directory whose `[environments]` live in another file use
/// [`set_service_mode_in`] (or [`rewrite_service_mode`]). See the module documentation for what
/// is written.
pub fn set_service_mode(
    source: &str,
    service: &str,
    environment: Option<&str>,
    mode: Mode,
) -> Result<String, EditError> {
    let parsed = super::parse_str("policy", source);
    set_service_mode_in(source, service, environment, mode, &environment_entries(&parsed.policy))
}

/// Like [`set_service_mode`], with the policy's environments (in declaration order, with their
/// default modes) given: a policy without `[environments]` has the one environment
/// [`DEFAULT_ENVIRONMENT`] in [`DEFAULT_MODE`].
pub fn set_service_mode_in(
    source: &str,
    service: &str,
    environment: Option<&str>,
    mode: Mode,
    environments: &[EnvironmentEntry],
) -> Result<String, EditError> {
    if let Some(env) = environment
        && !environments.iter().any(|e| e.name == env)
    {
        let declared: Vec<String> = environments.iter().map(|e| e.name.clone()).collect();
        return Err(EditError::UnknownEnvironment {
            environment: env.to_owned(),
            suggestion: closest(env, declared.iter().map(String::as_str)),
            declared,
        });
    }
    let mut doc: DocumentMut = source
        .parse()
        .map_err(|e: toml_edit::TomlError| EditError::Syntax { file: "policy".into(), message: e.message().into() })?;
    let mut container = service_container(&mut doc, service)?;
    let current = current_mode(&container, service)?;
    let effective = |env: &EnvironmentEntry| current.effective(&env.name).unwrap_or(env.mode);
    let already = match environment {
        Some(env) => environments.iter().filter(|e| e.name == env).all(|e| effective(e) == mode),
        None => environments.iter().all(|e| effective(e) == mode),
    };
    if already {
        return Ok(source.to_owned());
    }
    match (environment, current) {
        (None, Current::Absent) => container.insert_mode(mode_value(mode)),
        (None, Current::All(_) | Current::Table(_)) => container.replace_mode(mode_value(mode)),
        (Some(env), Current::Absent) => {
            let mut table = InlineTable::new();
            table.insert(env, mode_value(mode));
            container.insert_mode(Value::InlineTable(table));
        }
        (Some(env), Current::All(old)) => {
            // The string applied to every environment: keep it for the others.
            let mut table = InlineTable::new();
            for e in environments {
                table.insert(&e.name, mode_value(if e.name == env { mode } else { old }));
            }
            container.replace_mode(Value::InlineTable(table));
        }
        (Some(env), Current::Table(_)) => container.set_mode_key(env, mode),
    }
    Ok(doc.to_string())
}

/// The file of a policy (a file, or a directory read like [`super::load`] reads it) that defines
/// `service`.
pub fn find_service_file(policy_path: &Path, service: &str) -> Result<PathBuf, EditError> {
    let files = policy_files(policy_path)?;
    let parsed = parse_sources(read_files(&files)?);
    let index = service_file_index(&parsed, service, &files)?;
    files.get(index).cloned().ok_or_else(|| unknown_service(&parsed.policy, service))
}

/// Sets a service's mode in the policy at `policy_path` (a file or a directory): edits the file
/// that defines the service, checks that the whole policy is still valid and that its compiled
/// form differs only in this service's mode, and replaces the file atomically (a temporary file
/// in the same directory, synced, then renamed; permissions kept, ownership kept when allowed).
/// When the service already has the mode, nothing is written and `changed` is false.
pub fn rewrite_service_mode(
    policy_path: &Path,
    service: &str,
    environment: Option<&str>,
    mode: Mode,
) -> Result<Edit, EditError> {
    let files = policy_files(policy_path)?;
    let texts = read_files(&files)?;
    let parsed = parse_sources(texts.clone());
    let index = service_file_index(&parsed, service, &files)?;
    let (Some(file), Some((_, old_text))) = (files.get(index), texts.get(index)) else {
        return Err(unknown_service(&parsed.policy, service));
    };
    let environments = environment_entries(&parsed.policy);
    let old = compile_parsed(&parsed, false)?;
    let before = service_modes(&old.snapshot.content().environments, old.snapshot.content(), service);
    let new_text = set_service_mode_in(old_text, service, environment, mode, &environments)?;
    let mut edit = Edit {
        file: file.clone(),
        service: service.to_owned(),
        environment: environment.map(str::to_owned),
        mode,
        changed: false,
        after: before.clone(),
        before,
        diff: String::new(),
    };
    if new_text == *old_text {
        return Ok(edit);
    }
    let new = check_edit(&texts, index, &new_text)?;
    let expected = expected_content(old.snapshot.content(), service, environment, mode);
    if new.snapshot.content() != &expected {
        return Err(EditError::Unexpected {
            service: service.to_owned(),
            detail: "the compiled policy would differ in more than this service's mode".into(),
        });
    }
    edit.after = service_modes(&new.snapshot.content().environments, new.snapshot.content(), service);
    edit.changed = true;
    edit.diff = line_diff(&file.display().to_string(), old_text, &new_text);
    write_atomically(file, old_text, &new_text)?;
    Ok(edit)
}

/// The policy's files, as [`super::load`] lists them.
fn policy_files(path: &Path) -> Result<Vec<PathBuf>, EditError> {
    Ok(super::policy_files(path)?)
}

/// The policy's environments in declaration order (the first definition of each), as the
/// compiler resolves them.
fn environment_entries(policy: &PolicySet) -> Vec<EnvironmentEntry> {
    let mut entries: Vec<EnvironmentEntry> = Vec::new();
    for env in &policy.environments {
        if !entries.iter().any(|e| e.name == env.name.value) {
            entries.push(EnvironmentEntry { name: env.name.value.clone(), mode: env.mode.value });
        }
    }
    if entries.is_empty() {
        entries.push(EnvironmentEntry { name: DEFAULT_ENVIRONMENT.to_owned(), mode: DEFAULT_MODE });
    }
    entries
}

fn unknown_service(policy: &PolicySet, service: &str) -> EditError {
    EditError::UnknownService {
        service: service.to_owned(),
        suggestion: closest(service, policy.services.iter().map(|s| s.name.value.as_str())),
    }
}

/// The index of the one file that defines `service`.
fn service_file_index(parsed: &Parsed, service: &str, files: &[PathBuf]) -> Result<usize, EditError> {
    let mut defining: Vec<usize> =
        parsed.policy.services.iter().filter(|s| s.name.value == service).map(|s| s.name.loc.file as usize).collect();
    defining.dedup();
    match defining.as_slice() {
        [] if !parsed.syntax_ok => Err(EditError::Invalid {
            edited: false,
            sources: parsed.policy.sources.clone(),
            diagnostics: parsed.diagnostics.clone(),
        }),
        [] => Err(unknown_service(&parsed.policy, service)),
        [one] => Ok(*one),
        many => Err(EditError::Ambiguous {
            service: service.to_owned(),
            files: many.iter().filter_map(|&i| files.get(i).cloned()).collect(),
        }),
    }
}

fn compile_parsed(parsed: &Parsed, edited: bool) -> Result<Compiled, EditError> {
    let invalid = |diagnostics| EditError::Invalid { edited, sources: parsed.policy.sources.clone(), diagnostics };
    let Some(analysis) = analyze_parsed(parsed) else { return Err(invalid(parsed.diagnostics.clone())) };
    analysis.freeze().map_err(|e| match e {
        CompileError::Invalid(diagnostics) => invalid(diagnostics),
        other => EditError::Unexpected { service: String::new(), detail: other.to_string() },
    })
}

/// Compiles the policy with file `index` replaced by `new_text`.
fn check_edit(texts: &[(String, String)], index: usize, new_text: &str) -> Result<Compiled, EditError> {
    let edited = texts
        .iter()
        .enumerate()
        .map(|(i, (name, text))| (name.clone(), if i == index { new_text.to_owned() } else { text.clone() }));
    compile_parsed(&parse_sources(edited), true)
}

fn service_modes(
    environments: &[EnvironmentEntry],
    content: &SnapshotContent,
    service: &str,
) -> BTreeMap<String, Mode> {
    content
        .services
        .iter()
        .find(|s| s.name == service)
        .map(|s| environments.iter().zip(&s.modes).map(|(e, &m)| (e.name.clone(), m)).collect())
        .unwrap_or_default()
}

/// `old` with the service's mode set as asked: the only difference an edit may make.
fn expected_content(old: &SnapshotContent, service: &str, environment: Option<&str>, mode: Mode) -> SnapshotContent {
    let mut expected = old.clone();
    let envs: Vec<bool> = old.environments.iter().map(|e| environment.is_none_or(|env| e.name == env)).collect();
    if let Some(s) = expected.services.iter_mut().find(|s| s.name == service) {
        for (slot, &target) in s.modes.iter_mut().zip(&envs) {
            if target {
                *slot = mode;
            }
        }
    }
    expected
}

/// A small unified diff: one hunk around the changed lines, two lines of context.
fn line_diff(label: &str, old: &str, new: &str) -> String {
    const CONTEXT: usize = 2;
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let room = a.len().min(b.len()) - prefix;
    let suffix = a.iter().rev().zip(b.iter().rev()).take(room).take_while(|(x, y)| x == y).count();
    if prefix == a.len() && prefix == b.len() {
        return String::new();
    }
    let start = prefix.saturating_sub(CONTEXT);
    let (a_changed, b_changed) = (a.len() - suffix, b.len() - suffix);
    let (a_end, b_end) = ((a_changed + CONTEXT).min(a.len()), (b_changed + CONTEXT).min(b.len()));
    let range = |from: usize, to: usize| {
        let count = to - from;
        // A hunk with no line starts after the line before it.
        if count == 0 { format!("{from},0") } else { format!("{},{count}", from + 1) }
    };
    let mut out = format!("--- {label}\n+++ {label}\n@@ -{} +{} @@\n", range(start, a_end), range(start, b_end));
    let mut lines = |sign: char, slice: Option<&[&str]>| {
        for line in slice.unwrap_or_default() {
            let _ = writeln!(out, "{sign}{line}");
        }
    };
    lines(' ', a.get(start..prefix));
    lines('-', a.get(prefix..a_changed));
    lines('+', b.get(prefix..b_changed));
    lines(' ', a.get(a_changed..a_end));
    out
}

/// Replaces `path` (following a symlink) with `new`, atomically, if it still holds `old`.
fn write_atomically(path: &Path, old: &str, new: &str) -> Result<(), EditError> {
    let io = |source| EditError::Io { path: path.to_owned(), source };
    let target = fs::canonicalize(path).map_err(io)?;
    let metadata = fs::metadata(&target).map_err(io)?;
    let dir = target.parent().unwrap_or(Path::new("/"));
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or_default();
    // A dotfile, so a policy reader never takes it for a policy file.
    let temp = dir.join(format!(".{name}.{}.{nanos}.depfence-edit", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
        file.write_all(new.as_bytes())?;
        file.set_permissions(metadata.permissions())?;
        if metadata.uid() != file.metadata()?.uid() || metadata.gid() != file.metadata()?.gid() {
            // Only root may give the file away; others keep their own ownership.
            let _ = std::os::unix::fs::fchown(&file, Some(metadata.uid()), Some(metadata.gid()));
        }
        file.sync_all()?;
        if fs::read_to_string(&target)? != old {
            return Ok(false);
        }
        fs::rename(&temp, &target)?;
        File::open(dir)?.sync_all()?;
        Ok(true)
    })();
    match result {
        Ok(true) => Ok(()),
        Ok(false) => {
            let _ = fs::remove_file(&temp);
            Err(EditError::Conflict { path: path.to_owned() })
        }
        Err(source) => {
            let _ = fs::remove_file(&temp);
            Err(io(source))
        }
    }
}

fn mode_value(mode: Mode) -> Value {
    Value::from(mode.as_str())
}

/// A service's `mode` as written.
enum Current {
    /// No `mode` key.
    Absent,
    /// `mode = "…"`.
    All(Mode),
    /// A table of environment = mode.
    Table(Vec<(String, Mode)>),
}

impl Current {
    /// The mode written for `env`, if any.
    fn effective(&self, env: &str) -> Option<Mode> {
        match self {
            Current::Absent => None,
            Current::All(mode) => Some(*mode),
            Current::Table(entries) => entries.iter().find(|(e, _)| e == env).map(|(_, m)| *m),
        }
    }
}

/// The table that holds a service's keys.
enum Container<'d> {
    /// `[services.NAME]` (or a dotted `NAME.key = …` under `[services]`).
    Table(&'d mut Table),
    /// `NAME = { … }` under `[services]`.
    Inline(&'d mut InlineTable),
}

fn service_container<'d>(doc: &'d mut DocumentMut, service: &str) -> Result<Container<'d>, EditError> {
    let unsupported = |form: &str| EditError::UnsupportedForm { service: service.to_owned(), form: form.to_owned() };
    let root = doc.as_table_mut();
    let names: Vec<String> = match root.get("services") {
        Some(Item::Table(t)) => t.iter().map(|(k, _)| k.to_owned()).collect(),
        Some(Item::Value(Value::InlineTable(t))) => t.iter().map(|(k, _)| k.to_owned()).collect(),
        _ => Vec::new(),
    };
    let unknown = || EditError::UnknownService {
        service: service.to_owned(),
        suggestion: closest(service, names.iter().map(String::as_str)),
    };
    match root.get_mut("services") {
        None => Err(unknown()),
        Some(Item::Table(services)) => match services.get_mut(service) {
            None => Err(unknown()),
            Some(Item::Table(t)) => Ok(Container::Table(t)),
            Some(Item::Value(Value::InlineTable(t))) => Ok(Container::Inline(t)),
            Some(Item::ArrayOfTables(_)) => Err(unsupported("an array of tables (`[[services.NAME]]`)")),
            Some(_) => Err(unsupported("a value that is not a table")),
        },
        Some(Item::Value(Value::InlineTable(services))) => match services.get_mut(service) {
            None => Err(unknown()),
            Some(Value::InlineTable(t)) => Ok(Container::Inline(t)),
            Some(_) => Err(unsupported("a value that is not a table")),
        },
        Some(_) => Err(unsupported("part of a `services` key that is not a table")),
    }
}

fn current_mode(container: &Container<'_>, service: &str) -> Result<Current, EditError> {
    let invalid = |found: String| EditError::InvalidMode { service: service.to_owned(), found };
    let parse = |value: &Value| match value {
        Value::String(s) => Mode::parse(s.value()).ok_or_else(|| invalid(format!("`{}`", s.value()))),
        other => Err(invalid(format!("a {}", other.type_name()))),
    };
    let entry = |(env, item): (&str, &Item)| match item {
        Item::Value(value) => Ok((env.to_owned(), parse(value)?)),
        other => Err(invalid(format!("a {} for `{env}`", other.type_name()))),
    };
    match container.mode_item() {
        None => Ok(Current::Absent),
        Some(Item::Value(Value::InlineTable(table))) => {
            table.iter().map(|(k, v)| Ok((k.to_owned(), parse(v)?))).collect::<Result<_, _>>().map(Current::Table)
        }
        Some(Item::Value(value)) => parse(value).map(Current::All),
        Some(Item::Table(table)) => table.iter().map(entry).collect::<Result<_, _>>().map(Current::Table),
        Some(other) => Err(invalid(format!("a {}", other.type_name()))),
    }
}

impl Container<'_> {
    fn mode_item(&self) -> Option<&Item> {
        match self {
            Container::Table(t) => t.get("mode"),
            Container::Inline(t) => t.get_key_value("mode").map(|(_, item)| item),
        }
    }

    fn mode_item_mut(&mut self) -> Option<&mut Item> {
        match self {
            Container::Table(t) => t.get_mut("mode"),
            Container::Inline(t) => t.get_key_value_mut("mode").map(|(_, item)| item),
        }
    }

    /// Where a new `mode` goes: after the last descriptive key, else at the end.
    fn anchor_index(&self) -> usize {
        let keys: Vec<&str> = match self {
            Container::Table(t) => t.iter().map(|(k, _)| k).collect(),
            Container::Inline(t) => t.iter().map(|(k, _)| k).collect(),
        };
        keys.iter().rposition(|k| ANCHOR_KEYS.contains(k)).map_or(keys.len(), |i| i + 1)
    }

    /// Adds `mode` (there is none).
    fn insert_mode(&mut self, value: Value) {
        let index = self.anchor_index();
        match self {
            Container::Table(t) => table_insert_at(t, "mode", value, index),
            Container::Inline(t) => inline_insert_at(t, "mode", value, index),
        }
    }

    /// Replaces `mode` with a value, keeping the old value's surrounding whitespace and comment
    /// when it was a value; a `[….mode]` or dotted table is removed and the value inserted like a
    /// new key.
    fn replace_mode(&mut self, value: Value) {
        if let Some(Item::Value(old)) = self.mode_item_mut() {
            replace_value(old, value);
            return;
        }
        if let Container::Table(t) = self
            && let Some(Item::Table(old)) = t.remove("mode")
            && !old.is_dotted()
            && t.is_implicit()
        {
            // `[services.X.mode]` gives way to `[services.X]`, in its place, with its comments.
            t.set_implicit(false);
            t.set_position(old.position());
            *t.decor_mut() = old.decor().clone();
        }
        self.insert_mode(value);
    }

    /// Sets `mode.env` in a mode table.
    fn set_mode_key(&mut self, env: &str, mode: Mode) {
        match self.mode_item_mut() {
            Some(Item::Value(Value::InlineTable(table))) => match table.get_mut(env) {
                Some(old) => replace_value(old, mode_value(mode)),
                None => {
                    let end = table.len();
                    inline_insert_at(table, env, mode_value(mode), end);
                }
            },
            Some(Item::Table(table)) => match table.get_mut(env) {
                Some(Item::Value(old)) => replace_value(old, mode_value(mode)),
                _ => {
                    let end = table.len();
                    table_insert_at(table, env, mode_value(mode), end);
                }
            },
            _ => {}
        }
    }
}

/// Puts `new` in `slot`, keeping the whitespace and comment around the old value.
fn replace_value(slot: &mut Value, mut new: Value) {
    *new.decor_mut() = slot.decor().clone();
    *slot = new;
}

fn raw(text: Option<&toml_edit::RawString>) -> &str {
    text.and_then(toml_edit::RawString::as_str).unwrap_or_default()
}

/// The indentation a prefix ends with (what follows its last newline, when only whitespace).
fn indentation(prefix: &str) -> &str {
    let last = prefix.rsplit('\n').next().unwrap_or_default();
    if last.chars().all(|c| c == ' ' || c == '\t') { last } else { "" }
}

/// Inserts `key = value` as the `index`-th entry of a table, formatted like its neighbour:
/// same indentation, and `=` aligned with the neighbour's when the table aligns them.
fn table_insert_at(table: &mut Table, key: &str, mut value: Value, index: usize) {
    let keys: Vec<String> = table.iter().map(|(k, _)| k.to_owned()).collect();
    let neighbour = index.checked_sub(1).and_then(|i| keys.get(i)).or_else(|| keys.first());
    let mut new_key = Key::new(key);
    if let Some(neighbour) = neighbour.and_then(|n| table.key(n)) {
        let decor = neighbour.leaf_decor();
        let suffix = raw(decor.suffix());
        let width = new_key.display_repr().chars().count();
        let aligned = neighbour.display_repr().chars().count() + suffix.chars().count();
        let pad = if suffix.len() > 1 && suffix.chars().all(|c| c == ' ') { aligned.saturating_sub(width) } else { 1 };
        new_key.leaf_decor_mut().set_prefix(indentation(raw(decor.prefix())).to_owned());
        new_key.leaf_decor_mut().set_suffix(" ".repeat(pad.max(1)));
    }
    value.decor_mut().set_prefix(" ");
    value.decor_mut().set_suffix("");
    let tail: Vec<(Key, Item)> = keys.iter().skip(index).filter_map(|k| table.remove_entry(k)).collect();
    table.insert_formatted(&new_key, Item::Value(value));
    for (k, item) in tail {
        table.insert_formatted(&k, item);
    }
}

/// Inserts `key = value` as the `index`-th entry of an inline table: on its own line in a
/// table written over several lines, else after `, `.
fn inline_insert_at(table: &mut InlineTable, key: &str, mut value: Value, index: usize) {
    let keys: Vec<String> = table.iter().map(|(k, _)| k.to_owned()).collect();
    let mut new_key = Key::new(key);
    new_key.leaf_decor_mut().set_suffix(" ");
    value.decor_mut().set_prefix(" ");
    value.decor_mut().set_suffix("");
    let prefix_of = |t: &InlineTable, k: &str| t.key(k).map(|k| raw(k.leaf_decor().prefix()).to_owned());
    let multiline = keys.iter().filter_map(|k| prefix_of(table, k)).any(|p| p.contains('\n'));
    let neighbour = index.checked_sub(1).and_then(|i| keys.get(i)).or_else(|| keys.first());
    let indent = neighbour.and_then(|k| prefix_of(table, k)).map(|p| indentation(&p).to_owned()).unwrap_or_default();
    // What separates the new entry from the one before: in a multi-line table, the rest of the
    // line before (say a comment), a newline and the indentation.
    let split = |text: &str| match text.split_once('\n') {
        Some((head, rest)) => (format!("{head}\n{indent}"), format!("\n{rest}")),
        None => (format!("{text}\n{indent}"), "\n".to_owned()),
    };
    if keys.is_empty() {
        new_key.leaf_decor_mut().set_prefix(" ");
        value.decor_mut().set_suffix(" ");
    } else if let Some(next) = keys.get(index) {
        let next_prefix = prefix_of(table, next).unwrap_or_default();
        if multiline && next_prefix.contains('\n') {
            let (mine, theirs) = split(&next_prefix);
            new_key.leaf_decor_mut().set_prefix(mine);
            if let Some(mut k) = table.key_mut(next) {
                k.leaf_decor_mut().set_prefix(theirs);
            }
        } else {
            new_key.leaf_decor_mut().set_prefix(" ");
        }
    } else {
        // At the end: the new value takes over the last value's suffix (the space before `}`).
        if let Some(last) = keys.last().and_then(|k| table.get_mut(k)) {
            let suffix = raw(last.decor().suffix()).to_owned();
            last.decor_mut().set_suffix("");
            value.decor_mut().set_suffix(suffix);
        }
        let trailing = raw(Some(table.trailing())).to_owned();
        if multiline && trailing.contains('\n') {
            let (mine, theirs) = split(&trailing);
            new_key.leaf_decor_mut().set_prefix(mine);
            table.set_trailing(theirs);
        } else if multiline {
            new_key.leaf_decor_mut().set_prefix(format!("\n{indent}"));
        } else {
            new_key.leaf_decor_mut().set_prefix(" ");
        }
    }
    let tail: Vec<(Key, Value)> = keys.iter().skip(index).filter_map(|k| table.remove_entry(k)).collect();
    table.insert_formatted(&new_key, value);
    for (k, v) in tail {
        table.insert_formatted(&k, v);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// The effective mode of every (service, environment), through the compiler.
    fn effective(files: &[(&str, &str)]) -> BTreeMap<(String, String), Mode> {
        let parsed = parse_sources(files.iter().map(|(n, t)| ((*n).to_owned(), (*t).to_owned())));
        let compiled = match compile_parsed(&parsed, false) {
            Ok(compiled) => compiled,
            Err(e) => panic!("{e}\n{}", files.iter().map(|(_, t)| *t).collect::<Vec<_>>().join("\n----\n")),
        };
        let content = compiled.snapshot.content();
        let mut modes = BTreeMap::new();
        for service in &content.services {
            for (env, mode) in content.environments.iter().zip(&service.modes) {
                modes.insert((service.name.clone(), env.name.clone()), *mode);
            }
        }
        modes
    }

    fn one(text: &str) -> BTreeMap<(String, String), Mode> {
        effective(&[("policy.toml", text)])
    }

    /// Every edit of every service, environment and mode changes exactly that effective mode,
    /// and repeating it changes nothing.
    fn check_all_edits(text: &str) {
        let before = one(text);
        let services: Vec<String> = before.keys().map(|(s, _)| s.clone()).collect();
        let envs: Vec<String> = before.keys().map(|(_, e)| e.clone()).collect();
        let mut targets: Vec<Option<&str>> = envs.iter().map(|e| Some(e.as_str())).collect();
        targets.dedup();
        targets.push(None);
        for service in &services {
            for &env in &targets {
                for mode in [Mode::Off, Mode::Audit, Mode::Enforce] {
                    let edited = set_service_mode(text, service, env, mode)
                        .unwrap_or_else(|e| panic!("{service} {env:?} {mode}: {e}"));
                    let mut expected = before.clone();
                    for ((s, e), m) in &mut expected {
                        if s == service && env.is_none_or(|env| env == e) {
                            *m = mode;
                        }
                    }
                    assert_eq!(one(&edited), expected, "{service} {env:?} {mode}:\n{edited}");
                    let again = set_service_mode(&edited, service, env, mode).unwrap();
                    assert_eq!(again, edited, "not idempotent: {service} {env:?} {mode}");
                    if before.get(&(service.clone(), env.unwrap_or("qa").to_owned())) == Some(&mode) && env.is_some() {
                        assert_eq!(edited, text, "a no-op edit changed the text");
                    }
                }
            }
        }
    }

    const TABLES: &str = r#"# The policy.
version = 1

[environments]
qa   = { mode = "enforce" }
prod = { mode = "audit" }
dev  = "off"

[model]
layers = ["data", "edge"]

# The web tier.
[services.web]
# where it runs
cgroup = "system.slice/web.service"   # the unit
layer  = "edge"

# what it reaches
allow = [
  { service = "db" },     # its database
]

[services.db]
mode      = "audit"   # until the migration is done
endpoints = [{ ip = "10.0.0.5", ports = 5432, proto = "tcp" }]

[services.cache]
owner = "team-a"
mode = { prod = "enforce" }
allow = [{ cidr = "10.1.0.0/16" }]

[services.api.mode]
qa = "audit"   # flaky in qa

[services."db-deploy"]
mode.prod = "enforce"
allow = [{ ip = "10.0.0.9" }]

[services.job]
description = "nightly job"

[[services.job.allow]]
ip = "10.0.0.7"
"#;

    const INLINE: &str = r#"version = 1

[environments]
qa = "enforce"
prod = "audit"

[services]
web = { cgroup = "web.service", allow = [{ service = "db" }] }
db = { mode = "audit", endpoints = [{ ip = "10.0.0.5" }] }
empty = {}
cache = { mode = { qa = "audit" } }
worker = {
  cgroup = "worker.service",  # the unit
  # no dependencies yet
  allow = [],
}
tail = {
  owner = "team-b",
}
"#;

    const NO_ENVIRONMENTS: &str = r#"version = 1

[services.web]
cgroup = "web.service"

[services.db]
mode = "enforce"
"#;

    const DOTTED_AND_ROOT_INLINE: &str = r#"version = 1

[environments]
qa = "enforce"
prod = "audit"

[services]
web.cgroup = "web.service"
web.owner = "team-a"
db.mode = "off"
"#;

    #[test]
    fn every_edit_changes_exactly_one_effective_mode() {
        check_all_edits(TABLES);
        check_all_edits(INLINE);
        check_all_edits(NO_ENVIRONMENTS);
        check_all_edits(DOTTED_AND_ROOT_INLINE);
        check_all_edits("version = 1\nservices = { web = { cgroup = \"a\" }, db = { mode = \"off\" } }\n");
    }

    #[test]
    fn insertion_keeps_comments_blank_lines_and_alignment() {
        let edited = set_service_mode(TABLES, "web", Some("prod"), Mode::Enforce).unwrap();
        let expected = TABLES.replace("layer  = \"edge\"\n", "layer  = \"edge\"\nmode   = { prod = \"enforce\" }\n");
        assert_eq!(edited, expected);
    }

    #[test]
    fn string_becomes_a_table_that_keeps_the_other_environments() {
        let edited = set_service_mode(TABLES, "db", Some("qa"), Mode::Enforce).unwrap();
        let expected = TABLES.replace(
            "mode      = \"audit\"   # until",
            "mode      = { qa = \"enforce\", prod = \"audit\", dev = \"audit\" }   # until",
        );
        assert_eq!(edited, expected);
    }

    #[test]
    fn tables_get_the_key_set_or_added() {
        let edited = set_service_mode(TABLES, "cache", Some("qa"), Mode::Audit).unwrap();
        assert_eq!(edited, TABLES.replace("{ prod = \"enforce\" }", "{ prod = \"enforce\", qa = \"audit\" }"));
        let edited = set_service_mode(TABLES, "cache", Some("prod"), Mode::Audit).unwrap();
        assert_eq!(edited, TABLES.replace("{ prod = \"enforce\" }", "{ prod = \"audit\" }"));
        let edited = set_service_mode(TABLES, "api", Some("qa"), Mode::Enforce).unwrap();
        assert_eq!(edited, TABLES.replace("qa = \"audit\"   # flaky", "qa = \"enforce\"   # flaky"));
        let edited = set_service_mode(TABLES, "api", Some("prod"), Mode::Enforce).unwrap();
        assert_eq!(edited, TABLES.replace("# flaky in qa\n", "# flaky in qa\nprod = \"enforce\"\n"));
        let edited = set_service_mode(TABLES, "db-deploy", Some("qa"), Mode::Audit).unwrap();
        assert_eq!(
            edited,
            TABLES.replace("mode.prod = \"enforce\"\n", "mode.prod = \"enforce\"\nmode.qa = \"audit\"\n")
        );
    }

    #[test]
    fn every_environment_gets_one_string() {
        let edited = set_service_mode(TABLES, "cache", None, Mode::Enforce).unwrap();
        assert_eq!(edited, TABLES.replace("mode = { prod = \"enforce\" }", "mode = \"enforce\""));
        let edited = set_service_mode(TABLES, "db", None, Mode::Enforce).unwrap();
        assert_eq!(edited, TABLES.replace("mode      = \"audit\"", "mode      = \"enforce\""));
        // A `[services.api.mode]` table gives way to a key of `[services.api]`.
        let edited = set_service_mode(TABLES, "api", None, Mode::Enforce).unwrap();
        assert_eq!(
            edited,
            TABLES.replace(
                "[services.api.mode]\nqa = \"audit\"   # flaky in qa\n",
                "[services.api]\nmode = \"enforce\"\n"
            )
        );
        let edited = set_service_mode(TABLES, "job", None, Mode::Enforce).unwrap();
        assert_eq!(
            edited,
            TABLES.replace("description = \"nightly job\"\n", "description = \"nightly job\"\nmode = \"enforce\"\n")
        );
    }

    #[test]
    fn inline_services_are_edited_in_place() {
        let edited = set_service_mode(INLINE, "web", Some("prod"), Mode::Enforce).unwrap();
        assert_eq!(
            edited,
            INLINE.replace(
                "web = { cgroup = \"web.service\", allow",
                "web = { cgroup = \"web.service\", mode = { prod = \"enforce\" }, allow"
            )
        );
        let edited = set_service_mode(INLINE, "empty", None, Mode::Enforce).unwrap();
        assert_eq!(edited, INLINE.replace("empty = {}", "empty = { mode = \"enforce\" }"));
        let edited = set_service_mode(INLINE, "db", Some("qa"), Mode::Off).unwrap();
        assert_eq!(
            edited,
            INLINE.replace("{ mode = \"audit\", end", "{ mode = { qa = \"off\", prod = \"audit\" }, end")
        );
        let edited = set_service_mode(INLINE, "cache", Some("prod"), Mode::Enforce).unwrap();
        assert_eq!(edited, INLINE.replace("{ qa = \"audit\" }", "{ qa = \"audit\", prod = \"enforce\" }"));
    }

    #[test]
    fn multiline_inline_services_get_a_line() {
        let edited = set_service_mode(INLINE, "worker", None, Mode::Enforce).unwrap();
        assert_eq!(
            edited,
            INLINE.replace(
                "  cgroup = \"worker.service\",  # the unit\n",
                "  cgroup = \"worker.service\",  # the unit\n  mode = \"enforce\",\n"
            )
        );
        let edited = set_service_mode(INLINE, "tail", None, Mode::Enforce).unwrap();
        assert_eq!(edited, INLINE.replace("  owner = \"team-b\",\n", "  owner = \"team-b\",\n  mode = \"enforce\",\n"));
    }

    #[test]
    fn already_in_the_mode_is_a_no_op() {
        // qa's default is enforce, so web (no mode) already enforces there.
        assert_eq!(set_service_mode(TABLES, "web", Some("qa"), Mode::Enforce).unwrap(), TABLES);
        assert_eq!(set_service_mode(TABLES, "db", Some("prod"), Mode::Audit).unwrap(), TABLES);
        assert_eq!(set_service_mode(NO_ENVIRONMENTS, "web", None, Mode::Audit).unwrap(), NO_ENVIRONMENTS);
    }

    #[test]
    fn without_environments_the_default_environment_is_edited() {
        let edited = set_service_mode(NO_ENVIRONMENTS, "web", Some("default"), Mode::Enforce).unwrap();
        assert!(edited.contains("cgroup = \"web.service\"\nmode = { default = \"enforce\" }\n"), "{edited}");
    }

    #[test]
    fn unknown_names_are_refused_with_help() {
        let err = set_service_mode(TABLES, "wbe", Some("qa"), Mode::Enforce).unwrap_err();
        assert!(matches!(&err, EditError::UnknownService { suggestion: Some(s), .. } if s == "web"), "{err:?}");
        assert_eq!(err.to_string(), "no service `wbe` in the policy (did you mean `web`?)");
        let err = set_service_mode(TABLES, "frontend", None, Mode::Enforce).unwrap_err();
        assert_eq!(err.to_string(), "no service `frontend` in the policy");
        let err = set_service_mode(TABLES, "web", Some("prd"), Mode::Enforce).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown environment `prd` (did you mean `prod`?); the policy's environments are `qa`, `prod`, `dev`"
        );
        let err = set_service_mode(NO_ENVIRONMENTS, "web", Some("prod"), Mode::Enforce).unwrap_err();
        assert_eq!(err.to_string(), "unknown environment `prod`; the policy's environments are `default`");
    }

    #[test]
    fn odd_forms_are_refused() {
        let err = set_service_mode("version = 1\n[services]\nweb = 3\n", "web", None, Mode::Enforce).unwrap_err();
        assert!(matches!(err, EditError::UnsupportedForm { .. }), "{err:?}");
        let err = set_service_mode("version = 1\n[services.web]\nmode = 3\n", "web", None, Mode::Enforce).unwrap_err();
        assert_eq!(err.to_string(), "the `mode` of service `web` is not understood: a integer");
        let err = set_service_mode("version = 1\n[services.web]\nmode = \"strict\"\n", "web", None, Mode::Enforce)
            .unwrap_err();
        assert_eq!(err.to_string(), "the `mode` of service `web` is not understood: `strict`");
        let err = set_service_mode("version = 1\n[services.web\n", "web", None, Mode::Enforce).unwrap_err();
        assert!(matches!(err, EditError::Syntax { .. }), "{err:?}");
    }

    #[test]
    fn diff_shows_the_changed_lines_with_context() {
        let old = "a\nb\nc\nd\ne\nf\n";
        let new = "a\nb\nc\nC\nd\ne\nf\n";
        assert_eq!(line_diff("p.toml", old, new), "--- p.toml\n+++ p.toml\n@@ -2,4 +2,5 @@\n b\n c\n+C\n d\n e\n");
        assert_eq!(
            line_diff("p.toml", "x = 1\n", "x = 2\n"),
            "--- p.toml\n+++ p.toml\n@@ -1,1 +1,1 @@\n-x = 1\n+x = 2\n"
        );
        assert_eq!(line_diff("p.toml", old, old), "");
    }

    fn write(path: &Path, text: &str) {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).unwrap();
        }
        fs::write(path, text).unwrap();
    }

    #[test]
    fn rewrite_edits_the_file_atomically_and_keeps_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        write(&path, TABLES);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let edit = rewrite_service_mode(&path, "db", Some("qa"), Mode::Enforce).unwrap();
        assert!(edit.changed);
        assert_eq!(edit.file, path);
        assert_eq!(edit.old_and_new(), Some((Mode::Audit, Mode::Enforce)));
        assert_eq!(edit.changes(), vec![ModeChange { environment: "qa".into(), from: Mode::Audit, to: Mode::Enforce }]);
        assert_eq!(edit.before.get("dev"), Some(&Mode::Audit));
        assert_eq!(edit.after.get("dev"), Some(&Mode::Audit));
        let written = fs::read_to_string(&path).unwrap();
        assert_eq!(written, set_service_mode(TABLES, "db", Some("qa"), Mode::Enforce).unwrap());
        assert!(edit.diff.contains("\n-mode      = \"audit\"   # until the migration is done\n"), "{}", edit.diff);
        assert!(edit.diff.contains("\n+mode      = { qa = \"enforce\", prod = \"audit\", dev = \"audit\" }   #"));
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o640);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("policy.toml")]);
    }

    #[test]
    fn rewrite_of_the_current_mode_leaves_the_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        write(&path, TABLES);
        let modified = fs::metadata(&path).unwrap().modified().unwrap();
        let inode = fs::metadata(&path).unwrap().ino();
        let edit = rewrite_service_mode(&path, "web", Some("qa"), Mode::Enforce).unwrap();
        assert!(!edit.changed);
        assert_eq!(edit.old_and_new(), Some((Mode::Enforce, Mode::Enforce)));
        assert!(edit.diff.is_empty() && edit.changes().is_empty());
        assert_eq!(fs::read_to_string(&path).unwrap(), TABLES);
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), modified);
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode);
    }

    #[test]
    fn rewrite_in_a_directory_uses_the_environments_of_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let envs = "version = 1\n\n[environments]\nqa = \"enforce\"\nprod = \"audit\"\n";
        let team = "version = 1\n\n# team A\n[services.web]\nmode = \"off\"\n";
        let other = "version = 1\n\n[services.db]\ncgroup = \"db.service\"\n";
        write(&dir.path().join("00-environments.toml"), envs);
        write(&dir.path().join("teams/a.toml"), team);
        write(&dir.path().join("teams/b.toml"), other);
        // Ignored by the policy reader, and so by the search.
        write(&dir.path().join(".hidden.toml"), "version = 1\n[services.web]\n");
        write(&dir.path().join("notes.txt"), "[services.web]\n");
        assert_eq!(find_service_file(dir.path(), "web").unwrap(), dir.path().join("teams/a.toml"));
        assert_eq!(find_service_file(dir.path(), "db").unwrap(), dir.path().join("teams/b.toml"));
        let err = find_service_file(dir.path(), "dbb").unwrap_err();
        assert_eq!(err.to_string(), "no service `dbb` in the policy (did you mean `db`?)");

        let edit = rewrite_service_mode(dir.path(), "web", Some("prod"), Mode::Audit).unwrap();
        assert_eq!(edit.file, dir.path().join("teams/a.toml"));
        assert_eq!(
            fs::read_to_string(&edit.file).unwrap(),
            "version = 1\n\n# team A\n[services.web]\nmode = { qa = \"off\", prod = \"audit\" }\n"
        );
        assert_eq!(fs::read_to_string(dir.path().join("00-environments.toml")).unwrap(), envs);
        let files = [("e", envs.to_owned()), ("a", fs::read_to_string(&edit.file).unwrap()), ("b", other.to_owned())];
        let modes = effective(&files.iter().map(|(n, t)| (*n, t.as_str())).collect::<Vec<_>>());
        assert_eq!(modes.get(&("web".into(), "qa".into())), Some(&Mode::Off));
        assert_eq!(modes.get(&("web".into(), "prod".into())), Some(&Mode::Audit));

        let err = rewrite_service_mode(dir.path(), "web", Some("staging"), Mode::Audit).unwrap_err();
        assert_eq!(err.to_string(), "unknown environment `staging`; the policy's environments are `qa`, `prod`");
    }

    #[test]
    fn a_service_in_two_files_is_ambiguous() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a.toml"), "version = 1\n[services.web]\n");
        write(&dir.path().join("b.toml"), "version = 1\n[services.web]\n");
        let err = find_service_file(dir.path(), "web").unwrap_err();
        assert!(matches!(&err, EditError::Ambiguous { files, .. } if files.len() == 2), "{err:?}");
    }

    #[test]
    fn an_invalid_policy_is_refused_before_and_after_the_edit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let broken = "version = 1\n[services.web]\nallow = [{ service = \"nope\" }]\n";
        write(&path, broken);
        let err = rewrite_service_mode(&path, "web", None, Mode::Enforce).unwrap_err();
        let EditError::Invalid { edited, diagnostics, .. } = &err else { panic!("{err:?}") };
        assert!(!edited && diagnostics.has_errors());
        assert!(err.to_string().starts_with("the policy is invalid: "), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), broken);

        // A text that breaks the policy (here by hand: an environment it does not declare) is
        // refused with the diagnostics pointing into the new text.
        let texts = vec![("policy.toml".to_owned(), TABLES.to_owned())];
        let bad = TABLES.replace("qa = \"audit\"   # flaky", "staging = \"audit\"   # flaky");
        let err = check_edit(&texts, 0, &bad).unwrap_err();
        let EditError::Invalid { edited, sources, diagnostics } = &err else { panic!("{err:?}") };
        assert!(edited);
        let plain: Vec<String> = diagnostics.errors().map(|d| d.to_plain(sources)).collect();
        assert!(plain.iter().any(|p| p.contains("staging")), "{plain:?}");
        assert!(err.to_string().starts_with("the edit would make the policy invalid: policy.toml:"), "{err}");
    }

    #[test]
    fn a_syntax_error_is_reported_with_diagnostics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        write(&path, "version = 1\n[services.web\n");
        let err = find_service_file(&path, "web").unwrap_err();
        assert!(matches!(err, EditError::Invalid { edited: false, .. }), "{err:?}");
    }

    #[test]
    fn a_symlinked_policy_stays_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real/policy.toml");
        write(&real, TABLES);
        let link = dir.path().join("policy.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let edit = rewrite_service_mode(&link, "web", None, Mode::Enforce).unwrap();
        assert!(edit.changed);
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(fs::read_to_string(&real).unwrap().contains("layer  = \"edge\"\nmode   = \"enforce\"\n"));
    }

    #[test]
    fn expected_content_only_touches_the_target() {
        let old = one(TABLES);
        let compiled = compile_parsed(&parse_sources([("p".to_owned(), TABLES.to_owned())]), false).unwrap();
        let expected = expected_content(compiled.snapshot.content(), "web", Some("prod"), Mode::Off);
        let changed: Vec<_> = expected
            .services
            .iter()
            .flat_map(|s| {
                expected.environments.iter().zip(&s.modes).map(move |(e, m)| ((s.name.clone(), e.name.clone()), *m))
            })
            .filter(|(k, m)| old.get(k) != Some(m))
            .collect();
        assert_eq!(changed, vec![(("web".to_owned(), "prod".to_owned()), Mode::Off)]);
    }

    #[test]
    fn dotted_services_and_header_tables_keep_their_comments() {
        let dotted = "version = 1\n\n[environments]\nqa = \"enforce\"\nprod = \"audit\"\n\n[services]\n\
                      web.cgroup = \"web.service\"  # c\nweb.owner = \"team-a\"\n# db\ndb.mode = \"off\"\n";
        assert_eq!(
            set_service_mode(dotted, "web", Some("prod"), Mode::Enforce).unwrap(),
            dotted.replace("web.owner = \"team-a\"\n", "web.owner = \"team-a\"\nweb.mode = { prod = \"enforce\" }\n")
        );
        assert_eq!(
            set_service_mode(dotted, "db", Some("qa"), Mode::Audit).unwrap(),
            dotted.replace("db.mode = \"off\"", "db.mode = { qa = \"audit\", prod = \"off\" }")
        );

        let headers = "version = 1\n\n# jobs\n[[services.job.allow]]\nip = \"10.0.0.1\"\n\n# api modes\n\
                       [services.api.mode]\nqa = \"off\"\n";
        assert_eq!(
            set_service_mode(headers, "api", None, Mode::Enforce).unwrap(),
            headers.replace("[services.api.mode]\nqa = \"off\"\n", "[services.api]\nmode = \"enforce\"\n")
        );
        assert_eq!(
            set_service_mode(headers, "job", None, Mode::Enforce).unwrap(),
            headers.replace("\n# jobs\n", "\n[services.job]\nmode = \"enforce\"\n\n# jobs\n")
        );
    }

    #[test]
    fn comments_in_multiline_inline_tables_stay_on_their_lines() {
        let text =
            "version = 1\n[services]\nw = {\n  cgroup = \"a\", # the unit\n  # about allow\n  allow = [] # none\n}\n";
        assert_eq!(
            set_service_mode(text, "w", None, Mode::Enforce).unwrap(),
            text.replace("# the unit\n", "# the unit\n  mode = \"enforce\",\n")
        );
    }
}
