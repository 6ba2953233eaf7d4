//! The order in which to roll out planned changes, one service at a time, so that every state
//! on the way (each step's rollout, old and new versions side by side, and its end) meets the
//! requirements.
//!
//! A requirement involves two services, so it only constrains the order of their two steps: for
//! each requirement between two changed services, both orders are tried on the states they
//! pass through; one that fails becomes an edge ("this step first"). The order is a
//! topological sort of those edges ([`crate::graph`]); a cycle, or a requirement that neither
//! order meets, is a conflict. A requirement on one changed service that fails in its own
//! rollout fails whatever the order.

use std::collections::{BTreeMap, BTreeSet};

use semver::Version;

use super::check::{StateKind, Violation, unmet, violation};
use super::{Plan, State};
use crate::compile::VersionRequirement;
use crate::diag::{Diagnostic, Loc};
use crate::graph;
use crate::problem::Problem;

/// One step of a deploy order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The service rolled out.
    pub service: String,
    /// What it runs before the step (empty: a first deploy).
    pub from: Vec<Version>,
    /// The version it runs after.
    pub to: Version,
}

/// A safe order for a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployOrder {
    /// The environment judged.
    pub environment: String,
    /// The steps, one service at a time, first to last.
    pub steps: Vec<Step>,
    /// Requirements already unmet now, which no order can make worse and which the plan may
    /// fix; the order ignores them (`check-deploy` reports them).
    pub already_unmet: Vec<Violation>,
}

impl DeployOrder {
    /// The stable JSON document of `deploy-order -o json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": true,
            "environment": self.environment,
            "steps": self.steps.iter().enumerate().map(|(i, s)| serde_json::json!({
                "step": i + 1,
                "service": s.service,
                "from": s.from.iter().map(Version::to_string).collect::<Vec<_>>(),
                "to": s.to.to_string(),
            })).collect::<Vec<_>>(),
            "already_unmet": self.already_unmet.len(),
        })
    }
}

/// A requirement on the path of a conflict: which step it needs first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// The step that must come first.
    pub first: String,
    /// The step that must wait.
    pub then: String,
    /// The `requires` entry behind it.
    pub loc: Loc,
}

/// No order works.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// A change breaks a requirement in its own rollout, whatever the order.
    #[error("{} requirement(s) fail whatever the order", .0.len())]
    Unsafe(Vec<Violation>),
    /// Requirements that need each other's steps first (or one that neither order meets).
    #[error("no deploy order keeps every step safe")]
    Conflict {
        /// The steps and the requirements behind each "first".
        needs: Vec<Need>,
    },
}

impl OrderError {
    /// Located errors: the violations, or the conflict at its first requirement with a note
    /// at each other.
    pub fn diagnostics(&self) -> crate::diag::Diagnostics {
        let mut diags = crate::diag::Diagnostics::default();
        match self {
            OrderError::Unsafe(violations) => violations.iter().for_each(|v| diags.push(v.diagnostic())),
            OrderError::Conflict { needs } => {
                let conflict =
                    needs.iter().map(|n| format!("`{}` before `{}`", n.first, n.then)).collect::<Vec<_>>().join(", ");
                let label = |n: &Need| format!("needs `{}` before `{}`", n.first, n.then);
                if let Some((first, rest)) = needs.split_first() {
                    let mut diag = Diagnostic::error(
                        Problem::NoDeployOrder { conflict: conflict.clone() },
                        first.loc,
                        label(first),
                    );
                    for need in rest {
                        diag = diag.with_note(need.loc, label(need));
                    }
                    diags.push(diag);
                }
            }
        }
        diags
    }
}

/// Where a service is in its rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Old,
    During,
    New,
}

/// Consumer first: the states the two services pass through.
const CONSUMER_FIRST: [(Phase, Phase); 4] =
    [(Phase::During, Phase::Old), (Phase::New, Phase::Old), (Phase::New, Phase::During), (Phase::New, Phase::New)];
/// Target first.
const TARGET_FIRST: [(Phase, Phase); 4] =
    [(Phase::Old, Phase::During), (Phase::Old, Phase::New), (Phase::During, Phase::New), (Phase::New, Phase::New)];

/// The order in which to roll out `plan` in `environment`, or why none works.
pub fn deploy_order(
    requirements: &[VersionRequirement],
    environment: &str,
    current: &State,
    plan: &Plan,
) -> Result<DeployOrder, OrderError> {
    let changed: Vec<&String> = plan.changes.keys().collect();
    let index = |name: &str| changed.iter().position(|c| c.as_str() == name);
    let versions = |service: &str, phase: Phase| -> BTreeSet<Version> {
        let now = current.get(service).cloned().unwrap_or_default();
        match (plan.changes.get(service), phase) {
            (None, _) | (Some(_), Phase::Old) => now,
            (Some(new), Phase::During) => now.into_iter().chain([new.clone()]).collect(),
            (Some(new), Phase::New) => BTreeSet::from([new.clone()]),
        }
    };
    let state_at = |consumer: &str, cp: Phase, target: &str, tp: Phase| -> State {
        let mut state = State::new();
        state.insert(target.to_owned(), versions(target, tp));
        // A requirement of a service on itself: the consumer's phase is the target's.
        if consumer != target {
            state.insert(consumer.to_owned(), versions(consumer, cp));
        }
        state
    };

    let mut adj: Vec<Vec<usize>> = vec![Vec::new(); changed.len()];
    // (waits, first) → the requirement behind the edge.
    let mut behind: BTreeMap<(usize, usize), Loc> = BTreeMap::new();
    let mut unsafe_steps: Vec<Violation> = Vec::new();
    let mut already_unmet = Vec::new();
    for requirement in requirements.iter().filter(|r| r.requirement.env.includes(environment)) {
        if let Some(found) = unmet(requirement, current) {
            already_unmet.push(violation(requirement, found, StateKind::Now, plan));
            continue;
        }
        let (consumer, target) = (requirement.consumer.as_str(), requirement.requirement.service.value.as_str());
        let fails = |steps: &[(Phase, Phase)]| {
            steps.iter().find_map(|&(cp, tp)| {
                let kind =
                    if cp == Phase::During || tp == Phase::During { StateKind::During } else { StateKind::After };
                unmet(requirement, &state_at(consumer, cp, target, tp)).map(|found| (kind, found))
            })
        };
        match (index(consumer), index(target)) {
            (None, None) => {}
            (Some(c), Some(t)) if c != t => {
                let consumer_first = fails(&CONSUMER_FIRST);
                let target_first = fails(&TARGET_FIRST);
                let loc = requirement.requirement.loc;
                match (consumer_first, target_first) {
                    (None, None) => {}
                    (Some(_), None) => push_edge(&mut adj, &mut behind, c, t, loc),
                    (None, Some(_)) => push_edge(&mut adj, &mut behind, t, c, loc),
                    (Some(_), Some(_)) => {
                        return Err(OrderError::Conflict {
                            needs: vec![
                                Need { first: target.to_owned(), then: consumer.to_owned(), loc },
                                Need { first: consumer.to_owned(), then: target.to_owned(), loc },
                            ],
                        });
                    }
                }
            }
            _ => {
                // One changed service (or one on itself): its own rollout, in any order.
                let steps = [(Phase::During, Phase::During), (Phase::New, Phase::New)];
                let own: Vec<(Phase, Phase)> = match (index(consumer), index(target)) {
                    (Some(_), None) => steps.iter().map(|&(c, _)| (c, Phase::Old)).collect(),
                    (None, Some(_)) => steps.iter().map(|&(_, t)| (Phase::Old, t)).collect(),
                    _ => steps.to_vec(),
                };
                if let Some((kind, found)) = fails(&own) {
                    unsafe_steps.push(violation(requirement, found, kind, plan));
                }
            }
        }
    }
    if !unsafe_steps.is_empty() {
        return Err(OrderError::Unsafe(unsafe_steps));
    }
    for edges in &mut adj {
        edges.sort_unstable();
        edges.dedup();
    }
    let components = graph::strongly_connected_components(&adj);
    if let Some(cycle) = components
        .iter()
        .find(|c| c.len() > 1)
        .and_then(|members| members.first().and_then(|&start| graph::cycle_through(&adj, members, start)))
    {
        let name = |i: usize| changed.get(i).map_or_else(String::new, |s| (*s).clone());
        let needs = cycle
            .windows(2)
            .filter_map(|pair| match pair {
                [waits, first] => {
                    behind.get(&(*waits, *first)).map(|&loc| Need { first: name(*first), then: name(*waits), loc })
                }
                _ => None,
            })
            .collect();
        return Err(OrderError::Conflict { needs });
    }
    let levels = graph::condensation_levels(&adj, &components);
    let changed = &changed;
    let mut order: Vec<(usize, &String, usize)> = components
        .iter()
        .zip(&levels)
        .flat_map(|(members, &level)| members.iter().filter_map(move |&m| Some((level, *changed.get(m)?, m))))
        .collect();
    order.sort();
    let steps = order
        .into_iter()
        .filter_map(|(_, service, _)| {
            Some(Step {
                service: service.clone(),
                from: current.get(service).into_iter().flatten().cloned().collect(),
                to: plan.changes.get(service)?.clone(),
            })
        })
        .collect();
    Ok(DeployOrder { environment: environment.to_owned(), steps, already_unmet })
}

/// `waits -> first`: the step of `first` goes before the step of `waits`.
fn push_edge(adj: &mut [Vec<usize>], behind: &mut BTreeMap<(usize, usize), Loc>, waits: usize, first: usize, loc: Loc) {
    if let Some(edges) = adj.get_mut(waits) {
        edges.push(first);
    }
    behind.entry((waits, first)).or_insert(loc);
}

#[cfg(test)]
mod tests {
    use super::super::check::tests::{POLICY, requirements, state};
    use super::*;

    fn order(policy: &str, current: &State, sets: &[&str]) -> Result<Vec<String>, OrderError> {
        let plan = Plan::parse(sets.iter().copied()).unwrap();
        deploy_order(&requirements(policy), "default", current, &plan)
            .map(|o| o.steps.into_iter().map(|s| format!("{}={}", s.service, s.to)).collect())
    }

    #[test]
    fn an_upgrade_deploys_the_target_first() {
        let current = state(&[("payments", &["2.13.1"]), ("checkout", &["3.0.2"])]);
        assert_eq!(
            order(POLICY, &current, &["checkout=3.1.0", "payments=2.14.0"]).unwrap(),
            vec!["payments=2.14.0", "checkout=3.1.0"]
        );
    }

    #[test]
    fn a_rollback_rolls_the_consumer_back_first() {
        let current = state(&[("payments", &["2.14.0"]), ("checkout", &["3.1.0"])]);
        assert_eq!(
            order(POLICY, &current, &["checkout=3.0.2", "payments=2.13.1"]).unwrap(),
            vec!["checkout=3.0.2", "payments=2.13.1"]
        );
    }

    #[test]
    fn independent_changes_keep_name_order() {
        let current = state(&[("payments", &["2.14.0"]), ("checkout", &["3.1.0"])]);
        assert_eq!(
            order(POLICY, &current, &["payments=2.15.0", "checkout=3.2.0"]).unwrap(),
            vec!["checkout=3.2.0", "payments=2.15.0"]
        );
    }

    #[test]
    fn mutual_requirements_have_no_order() {
        let policy = r#"
version = 1
[services.ledger]
endpoints = [{ ip = "10.0.0.3", ports = [443] }]
allow = [{ service = "payments" }]
requires = [{ service = "payments", version = ">=3", when = ">=2" }]

[services.payments]
endpoints = [{ ip = "10.0.0.1", ports = [443] }]
allow = [{ service = "ledger", critical = false }]
requires = [{ service = "ledger", version = ">=2", when = ">=3" }]
"#;
        let current = state(&[("payments", &["2.0.0"]), ("ledger", &["1.0.0"])]);
        let err = order(policy, &current, &["payments=3.0.0", "ledger=2.0.0"]).unwrap_err();
        let OrderError::Conflict { needs } = &err else { panic!("{err:?}") };
        assert_eq!(needs.len(), 2);
        let diag = err.diagnostics().into_iter().next().unwrap();
        assert_eq!(diag.problem().code(), "depfence::no_deploy_order");
        assert!(diag.message().contains("`payments` before `ledger`"), "{}", diag.message());
        assert!(diag.message().contains("`ledger` before `payments`"), "{}", diag.message());
    }

    #[test]
    fn a_change_unsafe_on_its_own_fails_whatever_the_order() {
        let current = state(&[("payments", &["2.13.1"]), ("checkout", &["3.0.2"])]);
        let err = order(POLICY, &current, &["checkout=3.1.0"]).unwrap_err();
        assert!(matches!(err, OrderError::Unsafe(ref v) if v.len() == 1), "{err:?}");
    }
}
