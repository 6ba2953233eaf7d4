//! The validating policy rewrite behind `policyctl promote` and `demote`: find the file that
//! defines the service, set its mode there with the text edit (`policy::edit`), check that the
//! whole policy still compiles and that the compiled form differs only in that mode, and
//! replace the file durably.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::compile::{CompileError, Compiled, check_sources, compile_sources};
use crate::durable::{self, Access, ReplaceError};
use crate::policy::edit::{EditError, line_diff, set_service_mode_in};
use crate::policy::{EnvironmentEntry, Mode, Parsed, PolicySet, parse_sources, policy_files, read_files};
use crate::problem::closest;
use crate::snapshot::SnapshotContent;

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

/// The file of a policy (a file, or a directory read like [`crate::policy::load`] reads it) that defines
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
    let checked = check_sources(texts.clone());
    let index = service_file_index(&checked.parsed, service, &files)?;
    let (Some(file), Some((_, old_text))) = (files.get(index), texts.get(index)) else {
        return Err(unknown_service(&checked.parsed.policy, service));
    };
    let environments = checked.parsed.policy.declared_environments();
    let old = checked.freeze().map_err(|e| refusal(e, false))?;
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

/// Why the policy was refused (`edited`: with the edit in place).
fn refusal(error: CompileError, edited: bool) -> EditError {
    match error {
        CompileError::Invalid { sources, diagnostics } => EditError::Invalid { edited, sources, diagnostics },
        CompileError::Load(e) => EditError::Load(e),
        other => EditError::Unexpected { service: String::new(), detail: other.to_string() },
    }
}

/// Compiles the policy with file `index` replaced by `new_text`.
fn check_edit(texts: &[(String, String)], index: usize, new_text: &str) -> Result<Compiled, EditError> {
    let edited = texts
        .iter()
        .enumerate()
        .map(|(i, (name, text))| (name.clone(), if i == index { new_text.to_owned() } else { text.clone() }));
    compile_sources(edited).map_err(|e| refusal(e, true))
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

/// Replaces `path` (following a symlink) with `new` durably, keeping its mode and owner, if it
/// still holds `old`.
fn write_atomically(path: &Path, old: &str, new: &str) -> Result<(), EditError> {
    match durable::replace_if_unchanged(path, new.as_bytes(), Access::KeepExisting, old.as_bytes()) {
        Ok(()) => Ok(()),
        Err(ReplaceError::Changed(_)) => Err(EditError::Conflict { path: path.to_owned() }),
        Err(ReplaceError::Io(source)) => Err(EditError::Io { path: path.to_owned(), source }),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;
    use crate::policy::edit::set_service_mode;
    use crate::policy::edit::tests::{DOTTED_AND_ROOT_INLINE, INLINE, NO_ENVIRONMENTS, TABLES};

    /// The effective mode of every (service, environment), through the compiler.
    fn effective(files: &[(&str, &str)]) -> BTreeMap<(String, String), Mode> {
        let compiled = match compile_sources(files.iter().map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))) {
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

    #[test]
    fn every_edit_changes_exactly_one_effective_mode() {
        check_all_edits(TABLES);
        check_all_edits(INLINE);
        check_all_edits(NO_ENVIRONMENTS);
        check_all_edits(DOTTED_AND_ROOT_INLINE);
        check_all_edits("version = 1\nservices = { web = { cgroup = \"a\" }, db = { mode = \"off\" } }\n");
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
        let compiled = compile_sources([("p".to_owned(), TABLES.to_owned())]).unwrap();
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
}
