//! The deployed-versions manifest: what runs now in one environment, as the CD system writes it.
//!
//! ```toml
//! [services.payments]
//! versions = ["2.14.0", "2.13.1"]        # several versions during a rollout
//! components = { sidecar = "0.3.0" }     # optional: versions of what the service runs
//!
//! [services.checkout]
//! versions = "3.0.2"                     # a string is one version
//! ```
//!
//! Read like a policy file: every problem is a located [`Diagnostic`] (unknown keys, wrong
//! types and invalid versions are errors), and one run reports them all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use semver::Version;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diag::{Diagnostic, Diagnostics, FileId, Located, Sources};
use crate::policy::TomlReport;
use crate::problem::{Problem, closest};

const TOP_KEYS: &[&str] = &["services"];
const SERVICE_KEYS: &[&str] = &["versions", "components"];

type Value<'i> = Spanned<DeValue<'i>>;

/// What runs in one environment: per service, its versions and its components' versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deployed {
    /// The services, by name.
    pub services: BTreeMap<String, DeployedService>,
}

/// One `[services.NAME]` table of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployedService {
    /// The service's name, where the manifest names it.
    pub name: Located<String>,
    /// The versions running (more than one during a rollout), in the order written, without
    /// repeats.
    pub versions: Vec<Located<Version>>,
    /// The versions of the components the service runs (sidecars, libraries), by component.
    pub components: BTreeMap<String, Vec<Located<Version>>>,
}

impl Deployed {
    /// The versions a service runs; empty when the manifest does not list it.
    pub fn versions(&self, service: &str) -> Vec<Version> {
        self.services.get(service).map(|s| s.versions.iter().map(|v| v.value.clone()).collect()).unwrap_or_default()
    }

    /// A warning for each service the policy does not know (`known` are its services).
    pub fn unknown_services<'a>(&self, known: impl IntoIterator<Item = &'a str> + Clone) -> Diagnostics {
        let mut diags = Diagnostics::default();
        for (name, service) in &self.services {
            if !known.clone().into_iter().any(|k| k == name) {
                let suggestion = closest(name, known.clone());
                diags.push(Diagnostic::warning(
                    Problem::Unknown { kind: "service", name: name.clone(), suggestion },
                    service.name.loc,
                    "not in the policy",
                ));
            }
        }
        diags
    }
}

/// A manifest as read: what could be parsed, its file (which the diagnostics point into) and
/// every problem found.
#[derive(Debug, Clone)]
pub struct ParsedDeployed {
    /// The manifest, as far as it could be read.
    pub deployed: Deployed,
    /// Its file.
    pub sources: Sources,
    /// Every problem found.
    pub diagnostics: Diagnostics,
}

/// A manifest could not be read at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Reads the manifest at `path`.
pub fn parse_deployed(path: &Path) -> Result<ParsedDeployed, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io { path: path.to_owned(), source })?;
    Ok(parse_deployed_str(&path.display().to_string(), &text))
}

/// Parses a manifest from its text; `name` is shown in diagnostics.
pub fn parse_deployed_str(name: &str, text: &str) -> ParsedDeployed {
    let mut sources = Sources::default();
    let file = sources.add(name, text);
    let mut reader = Reader { file, diags: Diagnostics::default() };
    let mut deployed = Deployed::default();
    let (root, errors) = DeTable::parse_recoverable(text);
    if errors.is_empty() {
        reader.document(root.get_ref(), &mut deployed);
    } else {
        for error in errors {
            let span = error.span().unwrap_or(0..0);
            let message = error.message().trim_end_matches('\n').replace('\n', "; ");
            reader.error(Problem::Syntax { message }, span, "here");
        }
    }
    ParsedDeployed { deployed, sources, diagnostics: reader.diags }
}

struct Reader {
    file: FileId,
    diags: Diagnostics,
}

impl TomlReport for Reader {
    fn file(&self) -> FileId {
        self.file
    }

    fn diagnostics(&mut self) -> &mut Diagnostics {
        &mut self.diags
    }
}

impl Reader {
    fn document(&mut self, root: &DeTable<'_>, deployed: &mut Deployed) {
        for (key, value) in root.iter() {
            if key.get_ref() != "services" {
                self.unknown_key(key, "a deployed-versions manifest", TOP_KEYS);
                continue;
            }
            let Some(table) = value.get_ref().as_table() else {
                self.wrong_type("services", "a table", value);
                continue;
            };
            for (name, body) in table.iter() {
                if let Some(service) = self.service(name, body) {
                    deployed.services.insert(name.get_ref().to_string(), service);
                }
            }
        }
    }

    fn service(&mut self, name: &Spanned<std::borrow::Cow<'_, str>>, body: &Value<'_>) -> Option<DeployedService> {
        let Some(table) = body.get_ref().as_table() else {
            self.wrong_type(name.get_ref(), "a table", body);
            return None;
        };
        let mut versions = None;
        let mut components = BTreeMap::new();
        let mut ok = true;
        for (k, v) in table.iter() {
            match k.get_ref().as_ref() {
                "versions" => {
                    versions = self.versions("versions", v);
                    ok &= versions.is_some();
                }
                "components" => {
                    let Some(list) = v.get_ref().as_table() else {
                        self.wrong_type("components", "a table of component versions", v);
                        ok = false;
                        continue;
                    };
                    for (component, value) in list.iter() {
                        let key = format!("components.{}", component.get_ref());
                        match self.versions(&key, value) {
                            Some(found) => {
                                components.insert(component.get_ref().to_string(), found);
                            }
                            None => ok = false,
                        }
                    }
                }
                _ => self.unknown_key(k, "a deployed service", SERVICE_KEYS),
            }
        }
        if !table.contains_key("versions") {
            self.error(
                Problem::MissingKey { key: "versions", context: "a deployed service" },
                name.span(),
                "which versions run?",
            );
            ok = false;
        }
        let name = Located::new(name.get_ref().to_string(), self.loc(name.span()));
        match versions {
            Some(versions) if ok => Some(DeployedService { name, versions, components }),
            _ => None,
        }
    }

    /// `"2.14.0"` or `["2.14.0", "2.13.1"]`: at least one version, repeats dropped.
    fn versions(&mut self, key: &str, value: &Value<'_>) -> Option<Vec<Located<Version>>> {
        let items: Vec<&Value<'_>> = match value.get_ref() {
            DeValue::String(_) => vec![value],
            DeValue::Array(items) if !items.is_empty() => items.iter().collect(),
            _ => {
                self.wrong_type(key, "a version or a non-empty list of versions", value);
                return None;
            }
        };
        let mut found: Vec<Located<Version>> = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            let Some(text) = item.get_ref().as_str() else {
                self.wrong_type(key, "a version string", item);
                ok = false;
                continue;
            };
            match Version::parse(text.trim()) {
                Ok(version) => {
                    if !found.iter().any(|f| f.value == version) {
                        found.push(Located::new(version, self.loc(item.span())));
                    }
                }
                Err(e) => {
                    self.error(
                        Problem::InvalidVersion { value: text.to_owned(), reason: e.to_string() },
                        item.span(),
                        "not a version",
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    #[test]
    fn reads_versions_and_components() {
        let parsed = parse_deployed_str(
            "prod.toml",
            r#"
[services.payments]
versions = ["2.14.0", "2.13.1", "2.14.0"]
components = { sidecar = "0.3.0", tls = ["1.1.0", "1.2.0"] }

[services.checkout]
versions = "3.0.2"
"#,
        );
        assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
        let deployed = &parsed.deployed;
        assert_eq!(deployed.versions("payments"), vec![v("2.14.0"), v("2.13.1")]);
        assert_eq!(deployed.versions("checkout"), vec![v("3.0.2")]);
        assert!(deployed.versions("ledger").is_empty());
        let payments = &deployed.services["payments"];
        assert_eq!(payments.components["sidecar"][0].value, v("0.3.0"));
        assert_eq!(payments.components["tls"].len(), 2);
        // Located: the first version of payments is on line 3.
        let position = parsed.sources.position(payments.versions[0].loc);
        assert_eq!((position.line, position.column), (3, 13));
    }

    #[test]
    fn reports_every_problem_at_its_position() {
        let parsed = parse_deployed_str(
            "prod.toml",
            r#"[services.payments]
versions = ["2.14", "2.13.1"]
verions = "1.0.0"
components = { sidecar = 3 }

[services.checkout]
components = { sidecar = "0.3.0" }

[servics]
"#,
        );
        let seen: Vec<(String, u32, u32)> = parsed
            .diagnostics
            .iter()
            .map(|d| {
                let p = parsed.sources.position(d.primary().loc);
                (d.problem().code().to_owned(), p.line, p.column)
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("depfence::invalid_version".to_owned(), 2, 13),
                ("depfence::unknown_key".to_owned(), 3, 1),
                ("depfence::wrong_type".to_owned(), 4, 26),
                ("depfence::missing_key".to_owned(), 6, 11),
                ("depfence::unknown_key".to_owned(), 9, 2),
            ]
        );
        let unknown = parsed.diagnostics.iter().nth(1).unwrap();
        assert_eq!(unknown.problem().help().as_deref(), Some("did you mean `versions`?"));
    }

    #[test]
    fn a_service_the_policy_does_not_know_is_a_warning() {
        let parsed = parse_deployed_str("prod.toml", "[services.paymets]\nversions = \"1.0.0\"\n");
        let warnings = parsed.deployed.unknown_services(["payments", "checkout"]);
        let warning = warnings.iter().next().unwrap();
        assert_eq!(warning.severity(), crate::diag::Severity::Warning);
        assert_eq!(warning.problem().to_string(), "unknown service `paymets`");
        assert_eq!(warning.problem().help().as_deref(), Some("did you mean `payments`?"));
    }
}
