//! Which cgroups belong to which service: the cgroups found in the cgroup2 tree
//! ([`crate::cgroup::walk`]) matched against the services' selectors (an exact path relative to
//! the mount, or a regex over such paths).
use std::collections::BTreeMap;

use regex::Regex;

use crate::cgroup::FoundCgroup;
use crate::policy::Selector;
use crate::snapshot::Snapshot;

/// The services' selectors, compiled: exact paths first, then regexes in service-name order.
#[derive(Debug, Default)]
pub struct Selectors {
    exact: BTreeMap<String, String>,
    regexes: Vec<(Regex, String)>,
}

/// Two services select the same cgroup; the first in the order exact-then-name wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorConflict {
    /// The cgroup path.
    pub cgroup: String,
    /// The service that got it.
    pub chosen: String,
    /// The other service whose selector also matched.
    pub also: String,
}

impl Selectors {
    /// The selectors of every service of `snapshot` that has one. A regex that does not compile
    /// (the compiler has already checked them) is skipped.
    pub fn new(snapshot: &Snapshot) -> Self {
        Self::reusing(snapshot, None)
    }

    /// [`Selectors::new`], taking the compiled regexes of `previous` (the last policy's) that
    /// are the same: a policy edit compiles only its new ones.
    pub fn reusing(snapshot: &Snapshot, previous: Option<&Selectors>) -> Self {
        let known: std::collections::HashMap<&str, &Regex> =
            previous.map(|p| p.regexes.iter().map(|(re, _)| (re.as_str(), re)).collect()).unwrap_or_default();
        let mut selectors = Selectors::default();
        for service in snapshot.services() {
            match &service.selector {
                Some(Selector::Path(path)) => {
                    selectors.exact.entry(path.trim_matches('/').to_owned()).or_insert_with(|| service.name.clone());
                }
                Some(Selector::Regex(re)) => {
                    let anchored = format!("^(?:{re})$");
                    let compiled = known.get(anchored.as_str()).map(|re| Ok((*re).clone()));
                    if let Ok(re) = compiled.unwrap_or_else(|| Regex::new(&anchored)) {
                        selectors.regexes.push((re, service.name.clone()));
                    }
                }
                None => {}
            }
        }
        selectors
    }

    /// The service whose selector matches `relative`, if any.
    pub fn service_of(&self, relative: &str) -> Option<&str> {
        if let Some(service) = self.exact.get(relative) {
            return Some(service);
        }
        self.regexes.iter().find(|(re, _)| re.is_match(relative)).map(|(_, s)| s.as_str())
    }

    /// Every selector that matches `relative`, in precedence order.
    fn all_of<'a>(&'a self, relative: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let exact = self.exact.get(relative).map(String::as_str);
        exact
            .into_iter()
            .chain(self.regexes.iter().filter(move |(re, _)| re.is_match(relative)).map(|(_, s)| s.as_str()))
    }

    /// Matches every found cgroup: (cgroup, service) pairs, and the conflicts where more than
    /// one service's selector matched.
    pub fn assign<'c>(&self, cgroups: &'c [FoundCgroup]) -> (Vec<(&'c FoundCgroup, String)>, Vec<SelectorConflict>) {
        let mut matched = Vec::new();
        let mut conflicts = Vec::new();
        for cgroup in cgroups {
            let mut all = self.all_of(&cgroup.relative);
            let Some(chosen) = all.next() else { continue };
            for also in all.filter(|s| *s != chosen) {
                conflicts.push(SelectorConflict {
                    cgroup: cgroup.relative.clone(),
                    chosen: chosen.to_owned(),
                    also: also.to_owned(),
                });
            }
            matched.push((cgroup, chosen.to_owned()));
        }
        (matched, conflicts)
    }
}

/// The matched cgroups that get the programs attached: those without a matched ancestor (a
/// program attached to an ancestor already runs for every descendant, and attaching it twice
/// would count every connection twice).
pub fn attach_points<'c>(matched: &[(&'c FoundCgroup, String)]) -> Vec<&'c FoundCgroup> {
    let mut points: Vec<&FoundCgroup> = Vec::new();
    // Path order puts an ancestor right before its descendants.
    for (cgroup, _) in matched {
        let covered = points.last().is_some_and(|p| is_ancestor(&p.relative, &cgroup.relative));
        if !covered {
            points.push(cgroup);
        }
    }
    points
}

fn is_ancestor(ancestor: &str, path: &str) -> bool {
    path.strip_prefix(ancestor).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
    use super::*;

    fn found(paths: &[&str]) -> Vec<FoundCgroup> {
        let mut v: Vec<FoundCgroup> =
            paths.iter().zip(1..).map(|(p, id)| FoundCgroup { relative: (*p).to_owned(), id }).collect();
        v.sort();
        v
    }

    fn snapshot(text: &str) -> Snapshot {
        crate::compile::compile_str("t.toml", text).map_err(|(_, d)| format!("{d:?}")).unwrap().snapshot
    }

    const POLICY: &str = r#"
version = 1
[services.db]
cgroup = "system.slice/db.service"
[services.web]
cgroup = { regex = "kubepods/.*/web-[0-9]+" }
[services.all-system]
cgroup = { regex = "system\\.slice/.*" }
"#;

    #[test]
    fn exact_paths_win_over_regexes_and_conflicts_are_reported() {
        let selectors = Selectors::new(&snapshot(POLICY));
        let cgroups =
            found(&["system.slice", "system.slice/db.service", "system.slice/cron.service", "kubepods/a/web-1"]);
        let (matched, conflicts) = selectors.assign(&cgroups);
        let got: Vec<(&str, &str)> = matched.iter().map(|(c, s)| (c.relative.as_str(), s.as_str())).collect();
        assert_eq!(
            got,
            [
                ("kubepods/a/web-1", "web"),
                ("system.slice/cron.service", "all-system"),
                ("system.slice/db.service", "db"),
            ]
        );
        assert_eq!(
            conflicts,
            [SelectorConflict {
                cgroup: "system.slice/db.service".into(),
                chosen: "db".into(),
                also: "all-system".into()
            }]
        );
    }

    #[test]
    fn regexes_match_whole_paths() {
        let selectors = Selectors::new(&snapshot(POLICY));
        assert_eq!(selectors.service_of("kubepods/x/web-12"), Some("web"));
        assert_eq!(selectors.service_of("kubepods/x/web-12/child"), None);
        assert_eq!(selectors.service_of("x/kubepods/x/web-1"), None);
    }

    #[test]
    fn an_edited_policy_reuses_the_regexes_it_keeps() {
        let first = Selectors::new(&snapshot(POLICY));
        let edited = POLICY.replace("web-[0-9]+", "web-[a-z]+");
        let second = Selectors::reusing(&snapshot(&edited), Some(&first));
        // The changed regex is the new one; the kept one matches as before.
        assert_eq!(second.service_of("kubepods/x/web-12"), None);
        assert_eq!(second.service_of("kubepods/x/web-ab"), Some("web"));
        assert_eq!(second.service_of("system.slice/cron.service"), Some("all-system"));
        let fresh = Selectors::new(&snapshot(&edited));
        for path in ["kubepods/x/web-ab", "kubepods/x/web-1", "system.slice/a.service", "other"] {
            assert_eq!(second.service_of(path), fresh.service_of(path), "{path}");
        }
    }

    #[test]
    fn attach_points_skip_descendants_of_matched_cgroups() {
        let cgroups = found(&["a", "a/b", "a/b/c", "ab", "d/e"]);
        let matched: Vec<(&FoundCgroup, String)> = cgroups.iter().map(|c| (c, "s".to_owned())).collect();
        let points: Vec<&str> = attach_points(&matched).iter().map(|c| c.relative.as_str()).collect();
        assert_eq!(points, ["a", "ab", "d/e"]);
    }
}
