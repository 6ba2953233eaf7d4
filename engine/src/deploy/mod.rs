//! May a deploy proceed under the policy's version constraints (`requires`)?
//!
//! - [`manifest`]: the deployed-versions manifest (what runs in one environment).
//! - [`check`]: the states a planned change goes through (during the rollout: old and new
//!   versions side by side; after: the new ones), and every requirement one of them breaks.
//! - [`order`]: the order in which to roll the changes out so that every intermediate state
//!   meets the requirements, or the requirements that make every order fail.
//!
//! The rule, everywhere: a requirement whose `when` selects any running version of the consumer
//! must be met by every running version of the target; a target that does not run at all does
//! not meet it. `policyctl check-deploy` and `policyctl deploy-order` print what these build.

pub mod check;
pub mod manifest;
pub mod order;

use std::collections::{BTreeMap, BTreeSet};

use semver::Version;

pub use check::{DeployCheck, StateKind, Violation, check_deploy};
pub use manifest::{Deployed, DeployedService, ManifestError, ParsedDeployed, parse_deployed, parse_deployed_str};
pub use order::{DeployOrder, OrderError, Step, deploy_order};

/// The versions each service runs in one state; a service absent does not run.
pub type State = BTreeMap<String, BTreeSet<Version>>;

/// The running versions of every service of a manifest.
pub fn current_state(deployed: &Deployed) -> State {
    deployed
        .services
        .iter()
        .map(|(name, service)| (name.clone(), service.versions.iter().map(|v| v.value.clone()).collect()))
        .collect()
}

/// A planned change: the version each changed service moves to (`--set SERVICE=VERSION`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The new version of each changed service.
    pub changes: BTreeMap<String, Version>,
}

/// A `--set` argument that is not `SERVICE=VERSION`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// No `=`.
    #[error("`{0}` is not `SERVICE=VERSION`")]
    Shape(String),
    /// The version is not a semantic version.
    #[error("invalid version `{value}` for `{service}`: {reason}")]
    Version {
        /// The service.
        service: String,
        /// The version as written.
        value: String,
        /// The `semver` crate's message.
        reason: String,
    },
    /// The same service set twice to different versions.
    #[error("`{0}` is set twice")]
    Twice(String),
}

impl Plan {
    /// Builds a plan from `SERVICE=VERSION` texts.
    pub fn parse<'a>(sets: impl IntoIterator<Item = &'a str>) -> Result<Plan, PlanError> {
        let mut changes = BTreeMap::new();
        for set in sets {
            let Some((service, version)) = set.split_once('=') else {
                return Err(PlanError::Shape(set.to_owned()));
            };
            let service = service.trim();
            if service.is_empty() {
                return Err(PlanError::Shape(set.to_owned()));
            }
            let parsed = Version::parse(version.trim()).map_err(|e| PlanError::Version {
                service: service.to_owned(),
                value: version.to_owned(),
                reason: e.to_string(),
            })?;
            if changes.get(service).is_some_and(|known| *known != parsed) {
                return Err(PlanError::Twice(service.to_owned()));
            }
            changes.insert(service.to_owned(), parsed);
        }
        Ok(Plan { changes })
    }

    /// The state during the rollout of every change at once: each changed service runs its
    /// old versions and the new one.
    pub fn during(&self, current: &State) -> State {
        let mut state = current.clone();
        for (service, version) in &self.changes {
            state.entry(service.clone()).or_default().insert(version.clone());
        }
        state
    }

    /// The state after the rollout: each changed service runs only its new version.
    pub fn after(&self, current: &State) -> State {
        let mut state = current.clone();
        for (service, version) in &self.changes {
            state.insert(service.clone(), BTreeSet::from([version.clone()]));
        }
        state
    }
}

/// `2.13.1, 2.14.0`.
pub(crate) fn version_list<'a>(versions: impl IntoIterator<Item = &'a Version>) -> String {
    versions.into_iter().map(Version::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_make_states() {
        let plan = Plan::parse(["checkout=3.1.0", " payments = 2.14.0 "]).unwrap();
        assert_eq!(plan.changes.len(), 2);
        assert_eq!(Plan::parse(["checkout"]), Err(PlanError::Shape("checkout".into())));
        assert!(matches!(Plan::parse(["checkout=3.1"]), Err(PlanError::Version { .. })));
        assert_eq!(Plan::parse(["a=1.0.0", "a=2.0.0"]), Err(PlanError::Twice("a".into())));
        let v = |t: &str| Version::parse(t).unwrap();
        let current: State = [("checkout".to_owned(), BTreeSet::from([v("3.0.2")]))].into();
        let during = plan.during(&current);
        assert_eq!(during["checkout"], BTreeSet::from([v("3.0.2"), v("3.1.0")]));
        assert_eq!(during["payments"], BTreeSet::from([v("2.14.0")]));
        assert_eq!(plan.after(&current)["checkout"], BTreeSet::from([v("3.1.0")]));
    }
}
