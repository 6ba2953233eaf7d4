//! Setting a service's mode in a policy text (`policyctl promote` / `demote`), keeping comments,
//! ordering and layout.
//!
//! [`set_service_mode`] edits one text. This is the text edit alone; `promote::rewrite` finds the
//! file that defines the service, edits it with this, validates the result with the compiler,
//! and replaces the file.
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

use std::fmt::Write as _;
use std::path::PathBuf;

use toml_edit::{DocumentMut, InlineTable, Item, Key, Table, Value};

use super::{EnvironmentEntry, LoadError, Mode};
use crate::diag::{Diagnostics, Sources};
use crate::problem::closest;

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

/// Sets a service's mode in one policy text; returns the new text (equal to `source` when the
/// service already has the mode). The environments and their defaults are taken from `source`
/// itself, so for a file of a policy directory whose `[environments]` live in another file use
/// [`set_service_mode_in`] (or `promote::rewrite::rewrite_service_mode`). See the module documentation for what
/// is written.
pub fn set_service_mode(
    source: &str,
    service: &str,
    environment: Option<&str>,
    mode: Mode,
) -> Result<String, EditError> {
    let parsed = super::parse_str("policy", source);
    set_service_mode_in(source, service, environment, mode, &parsed.policy.declared_environments())
}

/// Like [`set_service_mode`], with the policy's environments (in declaration order, with their
/// default modes) given: a policy without `[environments]` has the one environment
/// [`super::DEFAULT_ENVIRONMENT`] in [`super::DEFAULT_MODE`].
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

/// Appends an allow entry, given as an inline table's text (`{ service = "db", reason = "…" }`),
/// to a service's `allow` list in one policy text, keeping comments and layout: on a line of its
/// own in a list written one entry per line, else at the end of the line. Creates `allow` when
/// the service has none. Returns the new text.
pub fn add_allow_entry(source: &str, service: &str, entry: &str) -> Result<String, EditError> {
    let syntax = |message: String| EditError::Syntax { file: "policy".into(), message };
    let mut doc: DocumentMut = source.parse().map_err(|e: toml_edit::TomlError| syntax(e.message().into()))?;
    let entry = match entry.parse::<Value>() {
        Ok(Value::InlineTable(table)) => table,
        Ok(_) => return Err(syntax(format!("`{entry}` is not an inline table"))),
        Err(e) => return Err(syntax(e.message().into())),
    };
    let unsupported = |form: &str| EditError::UnsupportedForm { service: service.to_owned(), form: form.to_owned() };
    match service_container(&mut doc, service)? {
        Container::Table(table) => match table.get_mut("allow") {
            None => {
                table.insert("allow", Item::Value(Value::Array(toml_edit::Array::from_iter([entry]))));
            }
            Some(Item::Value(Value::Array(list))) => push_entry(list, entry),
            Some(Item::ArrayOfTables(list)) => list.push(entry.into_table()),
            Some(_) => return Err(unsupported("an `allow` that is not a list")),
        },
        Container::Inline(table) => match table.get_mut("allow") {
            None => {
                table.insert("allow", Value::Array(toml_edit::Array::from_iter([entry])));
            }
            Some(Value::Array(list)) => push_entry(list, entry),
            Some(_) => return Err(unsupported("an `allow` that is not a list")),
        },
    }
    Ok(doc.to_string())
}

/// Appends `entry` to a list, on a line of its own (indented like the last entry) when the list
/// is written one entry per line.
fn push_entry(list: &mut toml_edit::Array, entry: InlineTable) {
    let indent = list
        .iter()
        .last()
        .and_then(|last| last.decor().prefix().and_then(|p| p.as_str()))
        .and_then(|prefix| prefix.rfind('\n').map(|at| prefix.get(at..).unwrap_or("\n").to_owned()));
    let mut value = Value::InlineTable(entry);
    match indent {
        Some(indent) => {
            value.decor_mut().set_prefix(indent);
            value.decor_mut().set_suffix("");
            list.push_formatted(value);
            list.set_trailing_comma(true);
        }
        None => list.push(value),
    }
}

/// A small unified diff: one hunk around the changed lines, two lines of context.
pub fn line_diff(label: &str, old: &str, new: &str) -> String {
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
pub(crate) mod tests {
    use super::*;

    pub(crate) const TABLES: &str = r#"# The policy.
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

    pub(crate) const INLINE: &str = r#"version = 1

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

    pub(crate) const NO_ENVIRONMENTS: &str = r#"version = 1

[services.web]
cgroup = "web.service"

[services.db]
mode = "enforce"
"#;

    pub(crate) const DOTTED_AND_ROOT_INLINE: &str = r#"version = 1

[environments]
qa = "enforce"
prod = "audit"

[services]
web.cgroup = "web.service"
web.owner = "team-a"
db.mode = "off"
"#;

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

    #[test]
    fn allow_entries_are_appended_keeping_the_layout() {
        let text = "version = 1\n[services.db]\nendpoints = [{ ip = \"10.0.0.5\" }]\n\n[services.api]\nallow = [\n  # the database\n  { service = \"db\" },\n]\n\n[services.web]\nallow = [{ service = \"api\" }]\n\n[services.batch]\ncgroup = \"b\"\n";
        let entry = "{ ip = \"10.9.0.1\", ports = [443], reason = \"learned\" }";
        let one_per_line = add_allow_entry(text, "api", entry).unwrap();
        assert!(
            one_per_line.contains("allow = [\n  # the database\n  { service = \"db\" },\n  { ip = \"10.9.0.1\", ports = [443], reason = \"learned\" },\n]\n"),
            "{one_per_line}"
        );
        let inline = add_allow_entry(text, "web", entry).unwrap();
        assert!(
            inline.contains(
                "allow = [{ service = \"api\" }, { ip = \"10.9.0.1\", ports = [443], reason = \"learned\" }]\n"
            ),
            "{inline}"
        );
        let created = add_allow_entry(text, "batch", entry).unwrap();
        assert!(
            created.ends_with("cgroup = \"b\"\nallow = [{ ip = \"10.9.0.1\", ports = [443], reason = \"learned\" }]\n"),
            "{created}"
        );
        // Everything else is unchanged, and the result parses to the policy with the entry.
        assert_eq!(one_per_line.replace("  { ip = \"10.9.0.1\", ports = [443], reason = \"learned\" },\n", ""), text);
        assert!(crate::policy::parse_str("p.toml", &created).diagnostics.is_empty());
        assert!(matches!(add_allow_entry(text, "nope", entry), Err(EditError::UnknownService { .. })));
    }
}
