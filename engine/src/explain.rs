//! Why a connection from a service is allowed or not: the [`Explanation`] that `policyctl
//! explain` prints, built the same way offline (against a policy file) and live (against the
//! agent's policy in force), and sent as JSON by both.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::compile::{Analysis, Graph};
use crate::problem::closest;
use crate::snapshot::{Connection, NetRule, ServiceId, ServiceRuleset, Snapshot};
use crate::verdict::{Mode, Verdict};

/// How many near misses an explanation lists.
pub const NEAR_MISSES: usize = 5;

/// The answer to "may `from` connect to `to`, and why".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// The service that connects.
    pub from: String,
    /// The destination, `addr:port/proto` (`[v6]:port/proto`).
    pub to: String,
    /// The judgement in the environments asked about: one for all of them when their rules
    /// and endpoints judge the connection alike (always, in a policy without
    /// environment-scoped entries), else one per group of environments that agree.
    pub judgements: Vec<Judgement>,
    /// The `rpc_allow` patterns of `from`, per backend (empty when it has none: it does not use
    /// the in-process guard).
    pub rpc_allow: Vec<RpcGroup>,
    /// For a live explanation: the agent's policy generation that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<Live>,
}

/// How some environments judge the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Judgement {
    /// The services whose endpoints hold the destination there, the owner first.
    pub destination_services: Vec<String>,
    /// The rule that decides: the most specific rule of `from` that allows the connection.
    pub rule: Option<RuleRef>,
    /// Without a deciding rule: rules that hold the address but not the port or protocol.
    pub near_misses: Vec<RuleRef>,
    /// Without a deciding rule: for each destination service, why depending on it would be
    /// wrong, or how to allow it.
    #[serde(default)]
    pub advice: Vec<Advice>,
    /// The verdict in each of these environments.
    pub verdicts: Vec<EnvironmentVerdict>,
}

impl Explanation {
    /// The verdict in every environment asked about, in the policy's order.
    pub fn verdicts(&self) -> Vec<&EnvironmentVerdict> {
        let mut all: Vec<&EnvironmentVerdict> = self.judgements.iter().flat_map(|j| &j.verdicts).collect();
        all.sort_by(|a, b| a.environment.cmp(&b.environment));
        all
    }

    /// The judgement in environment `env`.
    pub fn judgement(&self, env: &str) -> Option<&Judgement> {
        self.judgements.iter().find(|j| j.verdicts.iter().any(|v| v.environment == env))
    }
}

/// A rule, in words and where it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    /// `10.0.0.0/8 port 443, tcp (service `db`)`.
    pub rule: String,
    /// `file:line:col` of its allow entry.
    pub position: String,
}

/// What to do about a destination service that no rule allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advice {
    /// The destination service.
    pub service: String,
    /// Why depending on it would be wrong (a layer violation, a cycle); None when an allow entry
    /// naming it would do.
    pub objection: Option<String>,
}

/// The verdict in one environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentVerdict {
    /// The environment.
    pub environment: String,
    /// The mode of `from` there.
    pub mode: Mode,
    /// The verdict.
    pub verdict: Verdict,
}

/// The `rpc_allow` patterns of the explained service for one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcGroup {
    /// The backend service.
    pub backend: String,
    /// The destination is an endpoint of this backend.
    pub destination: bool,
    /// Its patterns, in the order written.
    pub patterns: Vec<RpcPatternRef>,
}

/// One `rpc_allow` pattern and where it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcPatternRef {
    /// The pattern.
    pub rpc: String,
    /// `file:line:col`.
    pub position: String,
}

/// Where a live explanation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live {
    /// The agent's policy generation.
    pub generation: u32,
}

/// A question `explain` cannot answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExplainError {
    /// No such service.
    #[error("unknown service `{service}`{}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default())]
    UnknownService {
        /// The name asked for.
        service: String,
        /// A close name, if any.
        suggestion: Option<String>,
    },
    /// No such environment.
    #[error("unknown environment `{environment}` (the policy has: {known})")]
    UnknownEnvironment {
        /// The name asked for.
        environment: String,
        /// The policy's environments.
        known: String,
    },
}

/// Which environments to judge in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environments<'a> {
    /// Every environment of the policy.
    All,
    /// One, by name.
    Named(&'a str),
}

/// Explains a connection from `from` to `conn` against `snapshot`. With the policy's
/// `analysis`, a destination that no rule allows gets advice (a layer or cycle objection, or
/// the allow entry to add).
pub fn explain(
    snapshot: &Snapshot,
    analysis: Option<&Analysis>,
    from: &str,
    conn: Connection,
    environments: Environments<'_>,
) -> Result<Explanation, ExplainError> {
    let Some((id, service)) = snapshot.service(from) else {
        let suggestion = closest(from, snapshot.services().iter().map(|s| s.name.as_str()));
        return Err(ExplainError::UnknownService { service: from.to_owned(), suggestion });
    };
    let indices: Vec<usize> = match environments {
        Environments::All => (0..snapshot.environments().len()).collect(),
        Environments::Named(name) => vec![snapshot.environment_index(name).ok_or_else(|| {
            let known = snapshot.environments().iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ");
            ExplainError::UnknownEnvironment { environment: name.to_owned(), known }
        })?],
    };
    let rule_ref = |r: &NetRule| RuleRef { rule: snapshot.describe_rule(r), position: snapshot.rule_position(id, r) };
    let mut judgements: Vec<Judgement> = Vec::new();
    for e in indices {
        let Some(env) = snapshot.environments().get(e) else { continue };
        let owners: Vec<String> = snapshot
            .owners(e)
            .owners_of(conn.addr, conn.port, conn.proto)
            .into_iter()
            .filter_map(|id| snapshot.services().get(id as usize).map(|s| s.name.clone()))
            .collect();
        let decision = service.decide(e, &conn);
        // Rules that hold the address but not the port or protocol: the usual near miss.
        let near_misses = match decision.rule {
            Some(_) => Vec::new(),
            None => {
                let addr = conn.addr.to_canonical();
                let rules = &service.rules(e).net_rules;
                rules.iter().filter(|r| r.net.contains(&addr)).take(NEAR_MISSES).map(rule_ref).collect()
            }
        };
        let advice = match (decision.rule, analysis.and_then(|a| Some((a, a.graph(e)?)))) {
            (None, Some((analysis, graph))) => owners
                .iter()
                .map(|owner| Advice {
                    service: owner.clone(),
                    objection: dependency_objection(analysis, graph, from, owner),
                })
                .collect(),
            _ => Vec::new(),
        };
        let verdict =
            EnvironmentVerdict { environment: env.name.clone(), mode: decision.mode, verdict: decision.verdict };
        let judgement = Judgement {
            destination_services: owners,
            rule: decision.rule.map(rule_ref),
            near_misses,
            advice,
            verdicts: Vec::new(),
        };
        let same = |j: &&mut Judgement| {
            (&j.destination_services, &j.rule, &j.near_misses, &j.advice)
                == (&judgement.destination_services, &judgement.rule, &judgement.near_misses, &judgement.advice)
        };
        match judgements.iter_mut().find(same) {
            Some(existing) => existing.verdicts.push(verdict),
            None => judgements.push(Judgement { verdicts: vec![verdict], ..judgement }),
        }
    }
    let all_owners: Vec<String> = judgements.iter().flat_map(|j| j.destination_services.iter().cloned()).collect();
    Ok(Explanation {
        from: from.to_owned(),
        to: conn.to_string(),
        rpc_allow: rpc_groups(snapshot, id, service, &all_owners),
        judgements,
        live: None,
    })
}

/// The `rpc_allow` patterns of `service`, per backend in the order written, and for each
/// service that owns the destination (`owners`) an entry even when it has none; the
/// destination's backends first. Empty when the service has no `rpc_allow`.
fn rpc_groups(snapshot: &Snapshot, id: ServiceId, service: &ServiceRuleset, owners: &[String]) -> Vec<RpcGroup> {
    if service.rpc_rules.is_empty() {
        return Vec::new();
    }
    let mut groups: Vec<RpcGroup> = Vec::new();
    for rule in &service.rpc_rules {
        let Some(backend) = snapshot.services().get(rule.target as usize).map(|s| s.name.as_str()) else { continue };
        let pattern =
            RpcPatternRef { rpc: rule.pattern.to_string(), position: snapshot.origin_position(id, rule.origin) };
        match groups.iter_mut().find(|g| g.backend == backend) {
            Some(group) => group.patterns.push(pattern),
            None => groups.push(RpcGroup {
                backend: backend.to_owned(),
                destination: owners.iter().any(|o| o == backend),
                patterns: vec![pattern],
            }),
        }
    }
    for owner in owners {
        if snapshot.service(owner).is_some() && !groups.iter().any(|g| &g.backend == owner) {
            groups.push(RpcGroup { backend: owner.clone(), destination: true, patterns: Vec::new() });
        }
    }
    groups.sort_by_key(|g| !g.destination);
    groups
}

/// Why adding a dependency `from -> to` would be wrong, if it would: a layer violation or a
/// new cycle.
fn dependency_objection(analysis: &Analysis, graph: &Graph, from: &str, to: &str) -> Option<String> {
    let (f, t) = (analysis.node(from)?, analysis.node(to)?);
    let (fnode, tnode) = (analysis.nodes.get(f)?, analysis.nodes.get(t)?);
    if let (Some(fl), Some(tl)) = (fnode.layer, tnode.layer)
        && tl > fl
    {
        let layer = |l: usize| analysis.layers.get(l).map_or("?", String::as_str);
        return Some(format!(
            "`{to}` is in the higher layer `{}` (`{from}` is in `{}`): depending on it would be a layer violation",
            layer(tl),
            layer(fl)
        ));
    }
    let mut adjacency = vec![Vec::new(); analysis.nodes.len()];
    for edge in graph.edges.iter().filter(|e| e.critical && e.from != e.to) {
        if let Some(list) = adjacency.get_mut(edge.from) {
            list.push(edge.to);
        }
    }
    let path = crate::graph::shortest_path(&adjacency, &[t], &[f])?;
    Some(format!(
        "`{to}` already depends on `{from}` ({}): depending on it would close a cycle",
        analysis.path_text(&path)
    ))
}

/// The explanation for people, as `policyctl explain` prints it: the judgement once when
/// every environment agrees, else one block per group of environments.
impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Explanation { from, to, judgements, rpc_allow, live } = self;
        write!(f, "{from} -> {to}")?;
        if let [only] = judgements.as_slice() {
            owners_text(f, &only.destination_services)?;
        }
        if let Some(live) = live {
            write!(f, " [live, generation {}]", live.generation)?;
        }
        writeln!(f)?;
        for judgement in judgements {
            let indent = if judgements.len() == 1 { "  " } else { "    " };
            if judgements.len() > 1 {
                let names: Vec<&str> = judgement.verdicts.iter().map(|v| v.environment.as_str()).collect();
                write!(f, "  in {}", names.join(", "))?;
                owners_text(f, &judgement.destination_services)?;
                writeln!(f, ":")?;
            }
            judgement.write(f, from, indent)?;
        }
        if !rpc_allow.is_empty() {
            writeln!(f, "  rpc_allow of `{from}` (the in-process guard judges each call by these):")?;
            for group in rpc_allow {
                let mark = if group.destination { " (this destination)" } else { "" };
                if group.patterns.is_empty() {
                    writeln!(f, "    `{}`{mark}: none (no rpc to it is allowed)", group.backend)?;
                    continue;
                }
                writeln!(f, "    `{}`{mark}:", group.backend)?;
                for p in &group.patterns {
                    writeln!(f, "      {} at {}", p.rpc, p.position)?;
                }
            }
        }
        Ok(())
    }
}

fn owners_text(f: &mut fmt::Formatter<'_>, owners: &[String]) -> fmt::Result {
    if owners.is_empty() {
        return Ok(());
    }
    let owners: Vec<String> = owners.iter().map(|o| format!("`{o}`")).collect();
    write!(f, " (an endpoint of {})", owners.join(", "))
}

impl Judgement {
    fn write(&self, f: &mut fmt::Formatter<'_>, from: &str, indent: &str) -> fmt::Result {
        let Judgement { rule, near_misses, advice, verdicts, .. } = self;
        match rule {
            Some(rule) => {
                writeln!(f, "{indent}allowed by {}", rule.rule)?;
                writeln!(f, "{indent}written at {}", rule.position)?;
            }
            None => {
                writeln!(f, "{indent}no rule of `{from}` allows it")?;
                for r in near_misses {
                    writeln!(
                        f,
                        "{indent}near miss: {} at {} (address matches; port or protocol does not)",
                        r.rule, r.position
                    )?;
                }
                for a in advice {
                    match &a.objection {
                        Some(objection) => writeln!(f, "{indent}note: {objection}")?,
                        None => writeln!(
                            f,
                            "{indent}help: to allow it, add `{{ service = \"{}\" }}` to the allow list of `{from}`",
                            a.service
                        )?,
                    }
                }
            }
        }
        for v in verdicts {
            let word = match v.verdict {
                Verdict::Allowed if rule.is_some() => "allowed",
                Verdict::Allowed => "allowed (mode off: no evaluation)",
                Verdict::WouldReject => "would be rejected (audit: allowed, counted and reported)",
                Verdict::Rejected => "rejected (the caller gets EPERM)",
                Verdict::CandidateWouldReject => "would be rejected by the candidate policy",
            };
            writeln!(f, "{indent}{} ({}): {word}", v.environment, v.mode)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile_str;

    const POLICY: &str = r#"version = 1
[environments]
prod = "audit"
qa = "enforce"
[model]
layers = ["data", "apps"]
[services.db]
layer = "data"
endpoints = [{ ip = "10.0.5.10", ports = [5432], proto = "tcp" }]
[services.web]
layer = "apps"
endpoints = [{ ip = "10.0.6.10", ports = [443] }]
[services.api]
layer = "apps"
allow = [{ service = "db" }]
"#;

    #[test]
    fn an_allowed_connection_names_its_rule_and_owner() {
        let compiled = compile_str("p.toml", POLICY).unwrap();
        let conn = "10.0.5.10:5432".parse().unwrap();
        let e = explain(&compiled.snapshot, Some(&compiled.analysis), "api", conn, Environments::All).unwrap();
        assert_eq!(e.to, "10.0.5.10:5432/tcp");
        assert_eq!(e.judgements.len(), 1, "both environments judge alike: {e:?}");
        let j = &e.judgements[0];
        assert_eq!(j.destination_services, ["db"]);
        assert_eq!(j.rule.as_ref().map(|r| r.rule.as_str()), Some("10.0.5.10/32 port 5432, tcp (service `db`)"));
        assert!(j.rule.as_ref().is_some_and(|r| r.position == "p.toml:15:10"), "{e:?}");
        let verdicts: Vec<(&str, Verdict)> = e.verdicts().iter().map(|v| (v.environment.as_str(), v.verdict)).collect();
        assert_eq!(verdicts, [("prod", Verdict::Allowed), ("qa", Verdict::Allowed)]);
    }

    #[test]
    fn a_refused_connection_gets_near_misses_and_advice() {
        let compiled = compile_str("p.toml", POLICY).unwrap();
        let e = explain(
            &compiled.snapshot,
            Some(&compiled.analysis),
            "api",
            "10.0.5.10:22".parse().unwrap(),
            Environments::Named("qa"),
        )
        .unwrap();
        let j = &e.judgements[0];
        assert_eq!((j.rule.is_none(), j.near_misses.len()), (true, 1));
        assert_eq!(
            j.verdicts,
            [EnvironmentVerdict { environment: "qa".into(), mode: Mode::Enforce, verdict: Verdict::Rejected }]
        );
        let e = explain(
            &compiled.snapshot,
            Some(&compiled.analysis),
            "db",
            "10.0.6.10:443".parse().unwrap(),
            Environments::All,
        )
        .unwrap();
        let advice = &e.judgements[0].advice;
        assert_eq!(advice.len(), 1);
        assert!(advice[0].objection.as_deref().is_some_and(|o| o.contains("higher layer `apps`")), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("note: `web` is in the higher layer"), "{text}");
        // The same explanation travels as JSON and back.
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Explanation>(&json).unwrap(), e);
    }

    #[test]
    fn unknown_names_are_errors_with_a_suggestion() {
        let compiled = compile_str("p.toml", POLICY).unwrap();
        let conn = "10.0.5.10:5432".parse().unwrap();
        let err = explain(&compiled.snapshot, None, "apii", conn, Environments::All).unwrap_err();
        assert_eq!(err.to_string(), "unknown service `apii`; did you mean `api`?");
        let err = explain(&compiled.snapshot, None, "api", conn, Environments::Named("staging")).unwrap_err();
        assert_eq!(err.to_string(), "unknown environment `staging` (the policy has: prod, qa)");
    }
}
