//! What a policy change does, per environment: for enforcement (modes, rules, the verdicts of
//! the connections they name) and for the dependency graph (edges, problems found and fixed).
//! Built from two analyses, valid or not, so a reviewer sees the problems a change introduces;
//! `policyctl diff` prints it as text, Markdown for a pull-request comment, or JSON.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::compile::{Analysis, Checked};
use crate::diag::{Severity, Sources};
use crate::policy::Proto;
use crate::snapshot::{Connection, NetRule, Snapshot, SnapshotError};
use crate::verdict::{Mode, Verdict};

/// The changes between two policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyDiff {
    /// False when the new policy has errors (listed as new problems): it cannot be applied.
    pub new_policy_valid: bool,
    /// Environments only the new policy has.
    pub environments_added: Vec<String>,
    /// Environments only the old policy has.
    pub environments_removed: Vec<String>,
    /// Per environment both policies have, in name order.
    pub environments: Vec<EnvironmentDiff>,
}

/// The changes in one environment.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct EnvironmentDiff {
    /// The environment.
    pub environment: String,
    /// True when a change touches a service that enforces here, before or after: what the
    /// kernel refuses changes.
    pub enforcement_changes: bool,
    /// Services only the new policy has.
    pub services_added: Vec<String>,
    /// Services only the old policy has.
    pub services_removed: Vec<String>,
    /// Services whose mode changes.
    pub modes: Vec<ModeChange>,
    /// Dependencies only the new graph has.
    pub edges_added: Vec<EdgeChange>,
    /// Dependencies only the old graph has.
    pub edges_removed: Vec<EdgeChange>,
    /// Per service, the rules added and removed.
    pub rules: Vec<RuleChanges>,
    /// Connections named by a changed rule whose verdict changes.
    pub verdicts: Vec<VerdictChange>,
    /// Problems the new policy has and the old one did not.
    pub problems_new: Vec<ProblemRef>,
    /// Problems the old policy had and the new one does not.
    pub problems_fixed: Vec<ProblemRef>,
}

impl EnvironmentDiff {
    /// True when nothing changes here.
    pub fn is_empty(&self) -> bool {
        let EnvironmentDiff {
            environment: _,
            enforcement_changes: _,
            services_added,
            services_removed,
            modes,
            edges_added,
            edges_removed,
            rules,
            verdicts,
            problems_new,
            problems_fixed,
        } = self;
        services_added.is_empty()
            && services_removed.is_empty()
            && modes.is_empty()
            && edges_added.is_empty()
            && edges_removed.is_empty()
            && rules.is_empty()
            && verdicts.is_empty()
            && problems_new.is_empty()
            && problems_fixed.is_empty()
    }
}

/// A service's mode before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModeChange {
    /// The service.
    pub service: String,
    /// Before.
    pub from: Mode,
    /// After.
    pub to: Mode,
}

/// A dependency of the graph.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct EdgeChange {
    /// Dependent service.
    pub from: String,
    /// Dependency.
    pub to: String,
    /// Critical (the service does not start without it).
    pub critical: bool,
}

/// The rules of one service that a change adds and removes, in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleChanges {
    /// The service.
    pub service: String,
    /// Rules only the new policy has, with where they are written.
    pub added: Vec<String>,
    /// Rules only the old policy has, with where they were written.
    pub removed: Vec<String>,
}

/// A connection whose verdict changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerdictChange {
    /// The service that connects.
    pub service: String,
    /// The connection, `addr:port/proto` (a representative of a changed rule).
    pub connection: String,
    /// Before.
    pub from: Verdict,
    /// After.
    pub to: Verdict,
}

/// A problem of a policy, as a reviewer reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProblemRef {
    /// `error` or `warning`.
    pub severity: Severity,
    /// The stable code, `depfence::cycle`.
    pub code: &'static str,
    /// The message.
    pub message: String,
    /// `file:line:col` in the policy it belongs to.
    pub position: String,
}

/// Why two policies cannot be compared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiffError {
    /// A policy could not be analyzed (its syntax errors say why).
    #[error("the {0} policy cannot be analyzed (it is not valid TOML)")]
    Unreadable(&'static str),
    /// A policy's rules could not be frozen for comparison.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl PolicyDiff {
    /// True when a change touches a service that enforces in some environment.
    pub fn enforcement_changes(&self) -> bool {
        self.environments.iter().any(|e| e.enforcement_changes)
    }

    /// True when nothing changes.
    pub fn is_empty(&self) -> bool {
        self.environments_added.is_empty()
            && self.environments_removed.is_empty()
            && self.environments.iter().all(EnvironmentDiff::is_empty)
    }
}

/// One side: its analysis, the snapshot its rules make (errors or not), its sources.
struct Side<'a> {
    analysis: &'a Analysis,
    snapshot: Snapshot,
    sources: &'a Sources,
}

impl<'a> Side<'a> {
    fn new(checked: &'a Checked, which: &'static str) -> Result<Self, DiffError> {
        let analysis = checked.analysis.as_ref().ok_or(DiffError::Unreadable(which))?;
        Ok(Side { analysis, snapshot: analysis.snapshot()?, sources: checked.sources() })
    }

    /// The problems found in environment `env` (name), by identity (code and message).
    fn problems(&self, env: &str) -> BTreeMap<(&'static str, String), ProblemRef> {
        self.analysis
            .diagnostics
            .iter()
            .filter(|d| d.environments().is_empty() || d.environments().iter().any(|e| e == env))
            .map(|d| {
                let key = (d.problem().code(), d.problem().to_string());
                let problem = ProblemRef {
                    severity: d.severity(),
                    code: d.problem().code(),
                    message: d.message(),
                    position: self.sources.position(d.primary().loc).to_string(),
                };
                (key, problem)
            })
            .collect()
    }

    fn edges(&self, env: usize) -> BTreeSet<EdgeChange> {
        let Some(graph) = self.analysis.graph(env) else { return BTreeSet::new() };
        graph
            .edges
            .iter()
            .map(|e| EdgeChange {
                from: self.analysis.name(e.from).to_owned(),
                to: self.analysis.name(e.to).to_owned(),
                critical: e.critical,
            })
            .collect()
    }

    /// A service's rules in words (position aside, so a moved entry is no change), each with
    /// where it is written.
    fn rules(&self, service: &str, env: usize) -> BTreeMap<String, String> {
        let Some((id, ruleset)) = self.snapshot.service(service) else { return BTreeMap::new() };
        let rules = ruleset.rules(env);
        let nets = rules.net_rules.iter().map(|r| (self.snapshot.describe_rule(r), self.snapshot.rule_position(id, r)));
        let hosts = rules
            .host_rules
            .iter()
            .map(|r| (self.snapshot.describe_host_rule(r), self.snapshot.origin_position(id, r.origin)));
        nets.chain(hosts).collect()
    }
}

/// Compares two analyzed policies.
pub fn diff(old: &Checked, new: &Checked) -> Result<PolicyDiff, DiffError> {
    let (old, new) = (Side::new(old, "old")?, Side::new(new, "new")?);
    let names = |side: &Side<'_>| -> BTreeSet<String> { side.analysis.environments.iter().cloned().collect() };
    let (old_envs, new_envs) = (names(&old), names(&new));
    let environments = old_envs
        .intersection(&new_envs)
        .filter_map(|env| {
            let (o, n) = (old.snapshot.environment_index(env)?, new.snapshot.environment_index(env)?);
            Some(environment_diff(&old, &new, env, o, n))
        })
        .collect();
    Ok(PolicyDiff {
        new_policy_valid: !new.analysis.diagnostics.has_errors(),
        environments_added: new_envs.difference(&old_envs).cloned().collect(),
        environments_removed: old_envs.difference(&new_envs).cloned().collect(),
        environments,
    })
}

fn environment_diff(old: &Side<'_>, new: &Side<'_>, env: &str, o: usize, n: usize) -> EnvironmentDiff {
    let mut diff = EnvironmentDiff { environment: env.to_owned(), ..EnvironmentDiff::default() };
    let services =
        |side: &Side<'_>| -> BTreeSet<String> { side.snapshot.services().iter().map(|s| s.name.clone()).collect() };
    let (old_services, new_services) = (services(old), services(new));
    diff.services_added = new_services.difference(&old_services).cloned().collect();
    diff.services_removed = old_services.difference(&new_services).cloned().collect();
    for service in old_services.union(&new_services) {
        let old_set = old.snapshot.service(service).map(|(_, s)| s);
        let new_set = new.snapshot.service(service).map(|(_, s)| s);
        let (old_mode, new_mode) = (old_set.map(|s| s.mode(o)), new_set.map(|s| s.mode(n)));
        if let (Some(from), Some(to)) = (old_mode, new_mode)
            && from != to
        {
            diff.modes.push(ModeChange { service: service.clone(), from, to });
        }
        let (old_rules, new_rules) = (old.rules(service, o), new.rules(service, n));
        let added: Vec<String> = new_rules
            .iter()
            .filter(|(r, _)| !old_rules.contains_key(*r))
            .map(|(r, at)| format!("{r} at {at}"))
            .collect();
        let removed: Vec<String> = old_rules
            .iter()
            .filter(|(r, _)| !new_rules.contains_key(*r))
            .map(|(r, at)| format!("{r} at {at}"))
            .collect();
        let rules_change = !added.is_empty() || !removed.is_empty();
        if rules_change {
            diff.rules.push(RuleChanges { service: service.clone(), added, removed });
        }
        // The connections the changed rules name, judged before and after.
        let probes: BTreeSet<Connection> = [old_set.map(|s| (s, o)), new_set.map(|s| (s, n))]
            .into_iter()
            .flatten()
            .flat_map(|(s, env)| s.rules(env).net_rules.iter().map(representative))
            .collect();
        for conn in probes {
            let before = old_set.map_or(Verdict::Allowed, |s| s.decide(o, &conn).verdict);
            let after = new_set.map_or(Verdict::Allowed, |s| s.decide(n, &conn).verdict);
            if before != after {
                let change =
                    VerdictChange { service: service.clone(), connection: conn.to_string(), from: before, to: after };
                diff.verdicts.push(change);
            }
        }
        let enforces = old_mode == Some(Mode::Enforce) || new_mode == Some(Mode::Enforce);
        let changes = rules_change || old_mode != new_mode;
        diff.enforcement_changes |= enforces && changes;
    }
    let (old_edges, new_edges) = (old.edges(o), new.edges(n));
    diff.edges_added = new_edges.difference(&old_edges).cloned().collect();
    diff.edges_removed = old_edges.difference(&new_edges).cloned().collect();
    let (old_problems, new_problems) = (old.problems(env), new.problems(env));
    diff.problems_new =
        new_problems.iter().filter(|(k, _)| !old_problems.contains_key(*k)).map(|(_, p)| p.clone()).collect();
    diff.problems_fixed =
        old_problems.iter().filter(|(k, _)| !new_problems.contains_key(*k)).map(|(_, p)| p.clone()).collect();
    diff
}

/// A connection a rule allows: its block's first address, its first port (443 for any port),
/// its protocol (TCP for any).
fn representative(rule: &NetRule) -> Connection {
    let port = if rule.ports.is_any() { 443 } else { rule.ports.first };
    let proto = if rule.proto == Proto::Udp { Proto::Udp } else { Proto::Tcp };
    Connection { addr: rule.net.network(), port, proto }
}
