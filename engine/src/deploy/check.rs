//! The states a planned change goes through, and the requirements each one breaks.

use std::fmt;

use semver::{Op, Version};
use serde::Serialize;

use super::{Plan, State, version_list};
use crate::compile::VersionRequirement;
use crate::diag::{Diagnostic, Diagnostics, Loc, Sources};
use crate::policy::VersionConstraint;
use crate::problem::Problem;

/// A state that was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StateKind {
    /// What runs now (no change planned).
    Now,
    /// During the rollout: each changed service runs its old versions and the new one.
    During,
    /// After the rollout: each changed service runs only the new version.
    After,
}

impl StateKind {
    /// `now`, `during`, `after`: the JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::Now => "now",
            StateKind::During => "during",
            StateKind::After => "after",
        }
    }
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StateKind::Now => "now",
            StateKind::During => "during the rollout",
            StateKind::After => "after the rollout",
        })
    }
}

/// How a requirement is not met in one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unmet {
    /// The consumer's running versions that `when` selects.
    pub selected: Vec<Version>,
    /// Every running version of the target; empty when the target does not run.
    pub target_versions: Vec<Version>,
    /// The target's running versions that do not satisfy `version`.
    pub unsatisfying: Vec<Version>,
}

/// The rule: a requirement whose `when` selects any running version of the consumer must be
/// met by every running version of the target, and a target that does not run meets nothing.
/// None when the requirement is met in `state`.
pub(crate) fn unmet(requirement: &VersionRequirement, state: &State) -> Option<Unmet> {
    let entry = &requirement.requirement;
    let selected: Vec<Version> =
        state.get(&requirement.consumer).into_iter().flatten().filter(|v| entry.applies_to(v)).cloned().collect();
    if selected.is_empty() {
        return None;
    }
    let target_versions: Vec<Version> = state.get(&entry.service.value).into_iter().flatten().cloned().collect();
    let unsatisfying: Vec<Version> =
        target_versions.iter().filter(|v| !entry.version.value.admits(v)).cloned().collect();
    (target_versions.is_empty() || !unsatisfying.is_empty()).then_some(Unmet {
        selected,
        target_versions,
        unsatisfying,
    })
}

/// One requirement a planned deploy breaks, in one or more states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The states it breaks in.
    pub states: Vec<StateKind>,
    /// The service that needs the versions.
    pub consumer: String,
    /// Its running versions that the requirement's `when` selects.
    pub consumer_versions: Vec<Version>,
    /// The service it needs.
    pub target: String,
    /// Every running version of the target; empty when the target does not run.
    pub target_versions: Vec<Version>,
    /// The target's running versions that do not satisfy the requirement.
    pub unsatisfying_versions: Vec<Version>,
    /// The requirement (`version`) as written.
    pub requirement: String,
    /// Its `when`, as written.
    pub when: Option<String>,
    /// Its `reason`.
    pub reason: Option<String>,
    /// The `requires` entry.
    pub loc: Loc,
    /// What to do first.
    pub help: String,
}

impl Violation {
    /// The states, as a phrase: `during and after the rollout`.
    fn states_text(&self) -> String {
        match self.states.as_slice() {
            [StateKind::During, StateKind::After] => "during and after the rollout".to_owned(),
            [one] => one.to_string(),
            more => more.iter().map(ToString::to_string).collect::<Vec<_>>().join(" and "),
        }
    }

    /// The violation as a located error at the `requires` entry, with the advice as help.
    pub fn diagnostic(&self) -> Diagnostic {
        let found = match self.unsatisfying_versions.as_slice() {
            [] => format!("`{}` is not deployed", self.target),
            [one] => format!("`{}` {one} runs", self.target),
            many => format!("`{}` {} run", self.target, version_list(many)),
        };
        let problem = Problem::UnmetRequirement {
            state: self.states_text(),
            consumer: self.consumer.clone(),
            consumer_versions: version_list(&self.consumer_versions),
            target: self.target.clone(),
            requirement: self.requirement.clone(),
            found,
            advice: self.help.clone(),
        };
        Diagnostic::error(problem, self.loc, self.reason.clone().unwrap_or_else(|| "required here".to_owned()))
    }

    /// The stable JSON form (see the README's `check-deploy`).
    pub fn to_json(&self, sources: &Sources) -> serde_json::Value {
        let position = sources.position(self.loc);
        let list = |versions: &[Version]| versions.iter().map(Version::to_string).collect::<Vec<_>>();
        serde_json::json!({
            "states": self.states.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "consumer": self.consumer,
            "consumer_versions": list(&self.consumer_versions),
            "target": self.target,
            "target_deployed": !self.target_versions.is_empty(),
            "target_versions": list(&self.target_versions),
            "unsatisfying_versions": list(&self.unsatisfying_versions),
            "requirement": self.requirement,
            "when": self.when,
            "reason": self.reason,
            "file": position.file,
            "line": position.line,
            "column": position.column,
            "message": self.diagnostic().message(),
            "help": self.help,
        })
    }
}

/// One planned change: a service, the versions it runs now and the one it moves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The service.
    pub service: String,
    /// What it runs now (empty: a first deploy).
    pub from: Vec<Version>,
    /// The new version.
    pub to: Version,
}

/// What `check-deploy` found: the states checked and every requirement broken in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployCheck {
    /// The environment judged.
    pub environment: String,
    /// The planned changes.
    pub changes: Vec<Change>,
    /// The states checked, each with whether it meets every requirement.
    pub states: Vec<(StateKind, bool)>,
    /// The requirements broken, in policy order.
    pub violations: Vec<Violation>,
}

impl DeployCheck {
    /// True when the deploy may proceed.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The violations as located errors.
    pub fn diagnostics(&self) -> Diagnostics {
        let mut diags = Diagnostics::default();
        for violation in &self.violations {
            diags.push(violation.diagnostic());
        }
        diags
    }

    /// The stable JSON document of `check-deploy -o json`.
    pub fn to_json(&self, sources: &Sources) -> serde_json::Value {
        serde_json::json!({
            "ok": self.ok(),
            "environment": self.environment,
            "changes": self.changes.iter().map(|c| serde_json::json!({
                "service": c.service,
                "from": c.from.iter().map(Version::to_string).collect::<Vec<_>>(),
                "to": c.to.to_string(),
            })).collect::<Vec<_>>(),
            "states": self.states.iter().map(|(kind, ok)| serde_json::json!({
                "state": kind.as_str(),
                "ok": ok,
            })).collect::<Vec<_>>(),
            "violations": self.violations.iter().map(|v| v.to_json(sources)).collect::<Vec<_>>(),
        })
    }
}

/// Checks a planned change against the requirements in `environment`: without changes, the
/// current state; otherwise the state during the rollout (old and new versions of every
/// changed service side by side) and after it.
pub fn check_deploy(
    requirements: &[VersionRequirement],
    environment: &str,
    current: &State,
    plan: &Plan,
) -> DeployCheck {
    let states: Vec<(StateKind, State)> = if plan.changes.is_empty() {
        vec![(StateKind::Now, current.clone())]
    } else {
        vec![(StateKind::During, plan.during(current)), (StateKind::After, plan.after(current))]
    };
    let mut violations: Vec<(usize, Violation)> = Vec::new();
    let mut checked = Vec::new();
    for (kind, state) in &states {
        let mut ok = true;
        for (index, requirement) in requirements.iter().enumerate() {
            if !requirement.requirement.env.includes(environment) {
                continue;
            }
            let Some(found) = unmet(requirement, state) else { continue };
            ok = false;
            let same = violations.iter_mut().find(|(i, v)| {
                *i == index
                    && v.consumer_versions == found.selected
                    && v.unsatisfying_versions == found.unsatisfying
                    && v.target_versions.is_empty() == found.target_versions.is_empty()
            });
            match same {
                Some((_, violation)) => violation.states.push(*kind),
                None => violations.push((index, violation(requirement, found, *kind, plan))),
            }
        }
        checked.push((*kind, ok));
    }
    violations.sort_by_key(|(index, v)| (*index, v.states.first().copied()));
    let changes = plan
        .changes
        .iter()
        .map(|(service, to)| Change {
            service: service.clone(),
            from: current.get(service).into_iter().flatten().cloned().collect(),
            to: to.clone(),
        })
        .collect();
    DeployCheck {
        environment: environment.to_owned(),
        changes,
        states: checked,
        violations: violations.into_iter().map(|(_, v)| v).collect(),
    }
}

pub(crate) fn violation(requirement: &VersionRequirement, found: Unmet, state: StateKind, plan: &Plan) -> Violation {
    let entry = &requirement.requirement;
    Violation {
        states: vec![state],
        consumer: requirement.consumer.clone(),
        help: advice(requirement, &found, plan),
        consumer_versions: found.selected,
        target: entry.service.value.clone(),
        target_versions: found.target_versions,
        unsatisfying_versions: found.unsatisfying,
        requirement: entry.version.value.text.clone(),
        when: entry.when.as_ref().map(|w| w.value.text.clone()),
        reason: entry.reason.clone(),
        loc: entry.loc,
    }
}

/// What to deploy first.
fn advice(requirement: &VersionRequirement, found: &Unmet, plan: &Plan) -> String {
    let entry = &requirement.requirement;
    let (consumer, target) = (&requirement.consumer, &entry.service.value);
    let need = &entry.version.value.text;
    let selected = version_list(&found.selected);
    let planned_consumer = plan.changes.get(consumer);
    let text = if found.target_versions.is_empty() {
        format!("deploy `{target}` {need} before `{consumer}` {selected}")
    } else if let Some(new) = plan.changes.get(target).filter(|new| !entry.version.value.admits(new)) {
        // The plan moves the target to a version that does not satisfy the requirement.
        let consumer_moves_into_it = planned_consumer.is_some_and(|v| found.selected.contains(v));
        match entry.when.as_ref().and_then(|w| outside(&w.value)) {
            Some(outside) if !consumer_moves_into_it => {
                format!("roll back `{consumer}` {outside} first, then deploy `{target}` {new}")
            }
            _ => format!("deploy a version of `{target}` that satisfies `{need}` instead of {new}"),
        }
    } else if found.unsatisfying.len() < found.target_versions.len() {
        format!(
            "finish the rollout of `{target}` first: retire {} (not `{need}`) before `{consumer}` {selected} runs",
            version_list(&found.unsatisfying)
        )
    } else {
        format!("deploy `{target}` {need} before `{consumer}` {selected}")
    };
    if plan.changes.contains_key(consumer) && plan.changes.contains_key(target) {
        format!("{text}; `policyctl deploy-order` gives an order that keeps every step safe")
    } else {
        text
    }
}

/// `below 3.1` for `>=3.1`, `to 3.1 or below` for `>3.1`; None for other shapes.
fn outside(when: &VersionConstraint) -> Option<String> {
    let [only] = when.req.comparators.as_slice() else { return None };
    let mut version = only.major.to_string();
    for part in [only.minor, only.patch].into_iter().flatten() {
        version.push_str(&format!(".{part}"));
    }
    if !only.pre.is_empty() {
        version.push_str(&format!("-{}", only.pre));
    }
    match only.op {
        Op::GreaterEq => Some(format!("below {version}")),
        Op::Greater => Some(format!("to {version} or below")),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::compile::check_sources;

    pub(crate) const POLICY: &str = r#"
version = 1

[services.payments]
endpoints = [{ ip = "10.0.0.1", ports = [443] }]

[services.checkout]
endpoints = [{ ip = "10.0.0.2", ports = [443] }]
allow = [{ service = "payments" }]
requires = [
  { service = "payments", version = ">=2.14", when = ">=3.1", reason = "3.1 calls the refunds API" },
]
"#;

    pub(crate) fn requirements(policy: &str) -> Vec<VersionRequirement> {
        let checked = check_sources([("policy.toml".to_owned(), policy.to_owned())]);
        let analysis = checked.analysis.unwrap();
        assert!(!analysis.diagnostics.has_errors(), "{:?}", analysis.diagnostics);
        analysis.requirements
    }

    pub(crate) fn state(entries: &[(&str, &[&str])]) -> State {
        entries.iter().map(|(s, vs)| (s.to_string(), vs.iter().map(|v| Version::parse(v).unwrap()).collect())).collect()
    }

    fn check(current: &State, sets: &[&str]) -> DeployCheck {
        check_deploy(&requirements(POLICY), "default", current, &Plan::parse(sets.iter().copied()).unwrap())
    }

    #[test]
    fn a_safe_upgrade_passes() {
        let current = state(&[("payments", &["2.13.1"]), ("checkout", &["3.0.2"])]);
        let result = check(&current, &["payments=2.14.0"]);
        assert!(result.ok(), "{:?}", result.violations);
        assert_eq!(result.states, vec![(StateKind::During, true), (StateKind::After, true)]);
        // Once payments is at 2.14, checkout 3.1 may follow.
        let current = state(&[("payments", &["2.14.0"]), ("checkout", &["3.0.2"])]);
        assert!(check(&current, &["checkout=3.1.0"]).ok());
    }

    #[test]
    fn a_consumer_upgrade_before_its_target_fails() {
        let current = state(&[("payments", &["2.13.1"]), ("checkout", &["3.0.2"])]);
        let result = check(&current, &["checkout=3.1.0"]);
        assert_eq!(result.violations.len(), 1);
        let v = &result.violations[0];
        assert_eq!(v.states, vec![StateKind::During, StateKind::After]);
        assert_eq!(v.consumer_versions, vec![Version::new(3, 1, 0)]);
        assert_eq!(v.help, "deploy `payments` >=2.14 before `checkout` 3.1.0");
        assert_eq!(
            v.diagnostic().message(),
            "during and after the rollout, `checkout` 3.1.0 requires `payments` >=2.14, but `payments` 2.13.1 runs"
        );
    }

    #[test]
    fn a_target_downgrade_fails() {
        let current = state(&[("payments", &["2.14.0"]), ("checkout", &["3.1.0"])]);
        let result = check(&current, &["payments=2.13.1"]);
        let v = &result.violations[0];
        assert_eq!(v.unsatisfying_versions, vec![Version::new(2, 13, 1)]);
        assert_eq!(v.help, "roll back `checkout` below 3.1 first, then deploy `payments` 2.13.1");
    }

    #[test]
    fn a_target_that_does_not_run_fails() {
        let current = state(&[("checkout", &["3.0.2"])]);
        let result = check(&current, &["checkout=3.1.0"]);
        assert!(result.violations[0].target_versions.is_empty());
        assert!(result.violations[0].diagnostic().message().ends_with("but `payments` is not deployed"));
    }

    #[test]
    fn mid_rollout_every_target_version_counts() {
        // checkout runs 3.0.2 and 3.1.0 (which needs payments >=2.14); payments runs 2.14.0 and
        // the old 2.13.1.
        let current = state(&[("payments", &["2.14.0", "2.13.1"]), ("checkout", &["3.0.2", "3.1.0"])]);
        let result = check(&current, &[]);
        assert_eq!(result.states, vec![(StateKind::Now, false)]);
        assert_eq!(result.violations[0].unsatisfying_versions, vec![Version::new(2, 13, 1)]);
        assert!(result.violations[0].help.starts_with("finish the rollout of `payments` first: retire 2.13.1"));
        let current = state(&[("payments", &["2.14.0"]), ("checkout", &["3.0.2", "3.1.0"])]);
        assert!(check(&current, &[]).ok());
    }

    #[test]
    fn pre_releases_compare_conservatively() {
        // A canary of checkout 3.1 needs what 3.1 needs.
        let current = state(&[("payments", &["2.13.1"]), ("checkout", &["3.0.2"])]);
        assert!(!check(&current, &["checkout=3.1.0-canary.1"]).ok());
        // A release candidate of payments 2.14 does not satisfy `>=2.14`.
        let current = state(&[("payments", &["2.14.0-rc.1"]), ("checkout", &["3.0.2"])]);
        assert!(!check(&current, &["checkout=3.1.0"]).ok());
        let current = state(&[("payments", &["2.14.1"]), ("checkout", &["3.0.2"])]);
        assert!(check(&current, &["checkout=3.1.0-canary.1"]).ok());
    }

    #[test]
    fn requirements_scoped_to_an_environment_hold_only_there() {
        let policy = POLICY
            .replace("reason = \"3.1 calls", "env = \"prod\", reason = \"3.1 calls")
            .replace("version = 1\n", "version = 1\n[environments]\nprod = \"audit\"\nqa = \"audit\"\n");
        let requirements = requirements(&policy);
        let current = state(&[("payments", &["2.13.1"]), ("checkout", &["3.0.2"])]);
        let plan = Plan::parse(["checkout=3.1.0"]).unwrap();
        assert!(!check_deploy(&requirements, "prod", &current, &plan).ok());
        assert!(check_deploy(&requirements, "qa", &current, &plan).ok());
    }
}

#[cfg(test)]
mod policy_tests {
    use crate::compile::check_sources;

    /// (code, severity is error, line, column, help) of each diagnostic.
    fn found(policy: &str) -> Vec<(String, bool, u32, u32, Option<String>)> {
        let checked = check_sources([("policy.toml".to_owned(), policy.to_owned())]);
        checked
            .diagnostics()
            .iter()
            .map(|d| {
                let p = checked.sources().position(d.primary().loc);
                let error = d.severity() == crate::diag::Severity::Error;
                (d.problem().code().to_owned(), error, p.line, p.column, d.problem().help())
            })
            .collect()
    }

    const HEAD: &str =
        "version = 1\n[services.payments]\nendpoints = [{ ip = \"10.0.0.1\", ports = [443] }]\n[services.checkout]\n";

    #[test]
    fn requirement_problems_are_located() {
        let bare = found(&format!(
            "{HEAD}allow = [{{ service = \"payments\" }}]\nrequires = [{{ service = \"payments\", version = \"2.14\" }}]\n"
        ));
        assert_eq!(bare.len(), 1, "{bare:?}");
        assert_eq!(
            (bare[0].0.as_str(), bare[0].1, bare[0].2, bare[0].3),
            ("depfence::bare_version_requirement", true, 6, 47)
        );
        assert!(bare[0].4.as_deref().unwrap().contains("write `>=2.14` or `^2.14` explicitly"));

        let unknown = found(&format!(
            "{HEAD}allow = [{{ service = \"payments\" }}]\nrequires = [{{ service = \"paymnts\", version = \">=2.14\" }}]\n"
        ));
        assert_eq!(unknown.len(), 1, "{unknown:?}");
        assert_eq!(unknown[0].0, "depfence::unknown_reference");
        assert_eq!(unknown[0].4.as_deref(), Some("did you mean `payments`?"));

        let unreached = found(&format!("{HEAD}requires = [{{ service = \"payments\", version = \">=2.14\" }}]\n"));
        assert_eq!(unreached.len(), 1, "{unreached:?}");
        assert_eq!((unreached[0].0.as_str(), unreached[0].1), ("depfence::requirement_without_allow", false));

        // An inferred edge reaches it too.
        let inferred = found(&format!(
            "{HEAD}allow = [{{ cidr = \"10.0.0.0/24\" }}]\nrequires = [{{ service = \"payments\", version = \">=2.14\" }}]\n"
        ));
        assert!(inferred.is_empty(), "{inferred:?}");

        let invalid = found(&format!(
            "{HEAD}allow = [{{ service = \"payments\" }}]\nrequires = [{{ service = \"payments\", version = \">=2.14\", when = \">=three\", extra = 1 }}]\n"
        ));
        let codes: Vec<&str> = invalid.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(codes, ["depfence::invalid_version_requirement", "depfence::unknown_key"]);
    }
}
