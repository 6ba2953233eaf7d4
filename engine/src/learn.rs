//! `policyctl learn`: the policy change that audit evidence asks for, checked against the
//! dependency model before it is proposed.
//!
//! Each would-rejected destination of a service becomes an allow entry: a service reference when
//! a declared service owns the address (narrowed to the ports seen when that service has several),
//! a `host` entry for a denied DNS name, and a literal address otherwise (marked as outside every
//! declared service). Destinations the policy already allows are never proposed. The entries are
//! added to a draft of the policy one at a time, in a fixed order, and compiled: an entry that
//! makes the draft's problems grow (a layer violation, an isolation path, an undeclared cycle, a
//! criticality warning) is not added but listed as needing a decision, with what the compiler
//! said. The same evidence gives the same draft, byte for byte.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::compile::{Checked, check_sources};
use crate::policy::Proto;
use crate::policy::edit::{EditError, add_allow_entry};
use crate::snapshot::{Connection, Snapshot};
use crate::timefmt::rfc3339_option;

/// Where would-rejected traffic went.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Destination {
    /// A connection or datagram to an address.
    Address {
        /// The address.
        addr: IpAddr,
        /// The port.
        port: u16,
        /// `tcp` or `udp`.
        proto: Proto,
    },
    /// A DNS question the proxy denied.
    Name {
        /// The name asked.
        name: String,
    },
    /// A declared service, as the agents' destination metric names an address a service owns.
    Service {
        /// The service.
        name: String,
    },
}

/// A service's would-rejects to one destination: the evidence behind a proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// The service.
    pub service: String,
    /// Where it went.
    pub destination: Destination,
    /// How many times.
    pub count: u64,
    /// The hosts that saw it.
    pub hosts: BTreeSet<String>,
    /// First seen.
    #[serde(default, with = "rfc3339_option")]
    pub first_seen: Option<SystemTime>,
    /// Last seen.
    #[serde(default, with = "rfc3339_option")]
    pub last_seen: Option<SystemTime>,
    /// The processes (comm) that made it.
    pub processes: BTreeSet<String>,
}

/// An allow entry to add.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// `{ service = "x" }`, narrowed to `ports` when not empty.
    Service {
        /// The target service.
        target: String,
        /// The ports seen, when the target has endpoints on several.
        ports: Vec<u16>,
    },
    /// `{ host = "name" }`.
    Host {
        /// The name.
        name: String,
    },
    /// `{ ip = "…", ports = […], proto = "…" }`: an address no declared service owns.
    Address {
        /// The address.
        addr: IpAddr,
        /// The ports seen.
        ports: Vec<u16>,
        /// The protocol.
        proto: Proto,
    },
}

impl Entry {
    /// The inline table to add, with `reason`.
    pub fn toml(&self, reason: &str) -> String {
        let ports = |ports: &[u16]| ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        let reason = toml_string(reason);
        match self {
            Entry::Service { target, ports: p } if p.is_empty() => {
                format!("{{ service = \"{target}\", reason = {reason} }}")
            }
            Entry::Service { target, ports: p } => {
                format!("{{ service = \"{target}\", ports = [{}], reason = {reason} }}", ports(p))
            }
            Entry::Host { name } => format!("{{ host = \"{name}\", reason = {reason} }}"),
            Entry::Address { addr, ports: p, proto } => {
                format!("{{ ip = \"{addr}\", ports = [{}], proto = \"{proto}\", reason = {reason} }}", ports(p))
            }
        }
    }
}

/// A proposed entry and its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Proposal {
    /// The service whose allow list gets it.
    pub service: String,
    /// The entry.
    pub entry: Entry,
    /// True for an address no declared service owns: declare its owner instead, if it is one.
    pub outside_every_service: bool,
    /// The would-rejects behind it.
    pub evidence: Vec<Observed>,
}

impl Proposal {
    /// The `reason` written with the entry: its evidence, deterministic.
    pub fn reason(&self) -> String {
        let count: u64 = self.evidence.iter().map(|o| o.count).sum();
        let hosts: BTreeSet<&str> = self.evidence.iter().flat_map(|o| o.hosts.iter().map(String::as_str)).collect();
        let processes: BTreeSet<&str> =
            self.evidence.iter().flat_map(|o| o.processes.iter().map(String::as_str)).collect();
        let mut text = format!("learned: {count} would-reject(s)");
        if !hosts.is_empty() {
            text.push_str(&format!(" on {}", hosts.into_iter().collect::<Vec<_>>().join(", ")));
        }
        if !processes.is_empty() {
            text.push_str(&format!(" by {}", processes.into_iter().collect::<Vec<_>>().join(", ")));
        }
        text
    }
}

/// A proposal the model refuses to make on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NeedsDecision {
    /// The proposal.
    pub proposal: Proposal,
    /// What the compiler said of the draft with it (`code: message`, with the help).
    pub problems: Vec<String>,
}

/// What learning proposes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Learned {
    /// The environment judged.
    pub environment: String,
    /// Entries added to the draft.
    pub proposals: Vec<Proposal>,
    /// Entries that would add a problem.
    pub needs_decision: Vec<NeedsDecision>,
    /// Evidence the policy already allows (nothing to propose).
    pub covered: Vec<Observed>,
    /// The files the draft changes: (name, before, after).
    #[serde(skip)]
    pub changes: Vec<(String, String, String)>,
}

/// Why learning could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LearnError {
    /// The current policy is invalid: fix it first.
    #[error("the policy is invalid ({0} error(s)); run `policyctl check`")]
    Invalid(usize),
    /// No such environment.
    #[error("the policy has no environment `{0}`")]
    UnknownEnvironment(String),
    /// An edit of the draft failed.
    #[error(transparent)]
    Edit(#[from] EditError),
}

/// Proposes the change `observed` asks for, to the policy made of `files` (name, text), in
/// `environment`.
pub fn learn(files: Vec<(String, String)>, environment: &str, observed: Vec<Observed>) -> Result<Learned, LearnError> {
    let checked = check_sources(files.clone());
    let errors = checked.diagnostics().errors().count();
    let mut problems = problem_set(&checked);
    let compiled = checked.freeze().map_err(|_| LearnError::Invalid(errors.max(1)))?;
    let snapshot = &compiled.snapshot;
    let env =
        snapshot.environment_index(environment).ok_or_else(|| LearnError::UnknownEnvironment(environment.into()))?;

    let mut covered = Vec::new();
    let mut grouped: BTreeMap<(String, Entry), Vec<Observed>> = BTreeMap::new();
    let mut observed = observed;
    observed.sort_by(|a, b| (&a.service, &a.destination).cmp(&(&b.service, &b.destination)));
    for o in observed {
        let Some((_, ruleset)) = snapshot.service(&o.service) else { continue };
        // What the entry targets; entries to one target (or address) merge, their ports together.
        let key = match &o.destination {
            Destination::Address { addr, port, proto } => {
                let conn = Connection { addr: *addr, port: *port, proto: *proto };
                if ruleset.decide(env, &conn).rule.is_some() {
                    covered.push(o);
                    continue;
                }
                match snapshot.owners(env).owner_of(*addr, Some(*port), *proto) {
                    Some(owner) => Entry::Service {
                        target: snapshot.services().get(owner as usize).map_or_else(String::new, |s| s.name.clone()),
                        ports: Vec::new(),
                    },
                    None => Entry::Address { addr: *addr, ports: Vec::new(), proto: *proto },
                }
            }
            Destination::Name { name } => {
                if ruleset.rules(env).host_rules.iter().any(|r| r.host.matches(name)) {
                    covered.push(o);
                    continue;
                }
                Entry::Host { name: name.to_ascii_lowercase() }
            }
            Destination::Service { name } => {
                let target = snapshot.service(name).map(|(id, _)| id);
                let rules = &ruleset.rules(env);
                let reached = rules.net_rules.iter().map(|r| r.target).chain(rules.host_rules.iter().map(|r| r.target));
                if target.is_none() || reached.flatten().any(|t| Some(t) == target) {
                    covered.push(o);
                    continue;
                }
                Entry::Service { target: name.clone(), ports: Vec::new() }
            }
        };
        grouped.entry((o.service.clone(), key)).or_default().push(o);
    }
    let mut proposals: Vec<Proposal> = grouped
        .into_iter()
        .map(|((service, key), evidence)| {
            let ports: BTreeSet<u16> = evidence
                .iter()
                .filter_map(|o| match &o.destination {
                    Destination::Address { port, .. } => Some(*port),
                    Destination::Name { .. } | Destination::Service { .. } => None,
                })
                .collect();
            let entry = match key {
                Entry::Service { target, .. } => {
                    let owner = snapshot.service(&target).map(|(id, _)| id as usize);
                    let narrow = owner.is_some_and(|id| several_ports(snapshot, id, env));
                    Entry::Service { target, ports: if narrow { ports.into_iter().collect() } else { Vec::new() } }
                }
                Entry::Address { addr, proto, .. } => {
                    Entry::Address { addr, ports: ports.into_iter().collect(), proto }
                }
                host => host,
            };
            let outside_every_service = matches!(entry, Entry::Address { .. });
            Proposal { service, entry, outside_every_service, evidence }
        })
        .collect();
    proposals.sort_by(|a, b| (&a.service, &a.entry).cmp(&(&b.service, &b.entry)));

    // The model check: one entry at a time, kept only when the draft's problems do not grow.
    let file_of = service_files(&crate::policy::parse_sources(files.clone()));
    let mut draft = files.clone();
    let mut accepted = Vec::new();
    let mut needs_decision = Vec::new();
    for proposal in proposals {
        let Some(&index) = file_of.get(&proposal.service) else { continue };
        let Some((_, text)) = draft.get(index) else { continue };
        let new_text = add_allow_entry(text, &proposal.service, &proposal.entry.toml(&proposal.reason()))?;
        let mut candidate = draft.clone();
        if let Some(slot) = candidate.get_mut(index) {
            slot.1 = new_text;
        }
        let checked = check_sources(candidate.clone());
        let found = problem_set(&checked);
        let new: Vec<String> = checked
            .diagnostics()
            .iter()
            .filter(|d| !problems.contains(&(d.problem().code(), d.problem().to_string())))
            .map(|d| {
                let help = d.problem().help().map(|h| format!(" (help: {h})")).unwrap_or_default();
                format!("{}: {}{help}", d.problem().code(), d.message())
            })
            .collect();
        if new.is_empty() {
            draft = candidate;
            problems = found;
            accepted.push(proposal);
        } else {
            needs_decision.push(NeedsDecision { proposal, problems: new });
        }
    }
    let changes = files
        .iter()
        .zip(&draft)
        .filter(|((_, old), (_, new))| old != new)
        .map(|((name, old), (_, new))| (name.clone(), old.clone(), new.clone()))
        .collect();
    Ok(Learned { environment: environment.to_owned(), proposals: accepted, needs_decision, covered, changes })
}

/// The would-rejected destinations of the whole fleet in `environment`, from the agents' bounded
/// destination counters in Prometheus (`depfence_destination_events_total`, whose destination is
/// a service's name when the agent knows it, else `ip:port/proto` or a DNS name), over the
/// window ending at `time`: counts are events (rate-limited per destination and second, so a
/// lower bound), hosts are the agents' `instance`s. `services` names the policy's services.
#[cfg(feature = "fleet")]
pub fn observed_in_fleet(
    metrics: &dyn crate::promote::fleet::Metrics,
    environment: &str,
    window: std::time::Duration,
    time: SystemTime,
    services: &BTreeSet<String>,
) -> Result<Vec<Observed>, crate::promote::fleet::FetchError> {
    let found = crate::promote::fleet::rises_by(
        metrics,
        "depfence_destination_events_total{verdict=\"would_reject\"}",
        environment,
        window,
        time,
        |series| (series.label("service").to_owned(), series.label("destination").to_owned()),
    )?;
    Ok(found
        .into_iter()
        .map(|((service, destination), rise)| {
            let destination = match destination.parse::<Connection>() {
                Ok(c) => Destination::Address { addr: c.addr, port: c.port, proto: c.proto },
                Err(_) if services.contains(&destination) => Destination::Service { name: destination },
                Err(_) => Destination::Name { name: destination },
            };
            Observed {
                service,
                destination,
                count: rise.count,
                hosts: rise.hosts,
                first_seen: rise.first,
                last_seen: rise.last,
                processes: BTreeSet::new(),
            }
        })
        .collect())
}

/// True when a service's endpoints in `env` span more than one port range.
fn several_ports(snapshot: &Snapshot, service: usize, env: usize) -> bool {
    let Some(s) = snapshot.services().get(service) else { return false };
    let ranges: BTreeSet<_> = s.rules(env).endpoints.iter().map(|e| e.ports).collect();
    ranges.len() > 1
}

/// The problems of a checked policy, by identity (code and message, positions aside).
fn problem_set(checked: &Checked) -> BTreeSet<(&'static str, String)> {
    checked.diagnostics().iter().map(|d| (d.problem().code(), d.problem().to_string())).collect()
}

/// Which file (an index into the files) defines each service: the first definition.
fn service_files(parsed: &crate::policy::Parsed) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for service in &parsed.policy.services {
        out.entry(service.name.value.clone()).or_insert(service.name.loc.file as usize);
    }
    out
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    toml_edit::Value::from(text).to_string().trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"version = 1
[environments]
prod = "audit"
[model]
layers = ["data", "apps", "edge"]

[services.db]
layer = "data"
endpoints = [{ ip = "10.0.0.5", ports = [5432], proto = "tcp" }]

[services.cache]
layer = "apps"
endpoints = [{ ip = "10.0.0.6", ports = [6379, 6380], proto = "tcp" }]

[services.web]
layer = "edge"
endpoints = [{ ip = "10.0.0.7", ports = [443], proto = "tcp" }]

[services.api]
layer = "apps"
allow = [
  { service = "db" },
]
"#;

    fn seen(service: &str, destination: Destination, count: u64, host: &str) -> Observed {
        Observed {
            service: service.into(),
            destination,
            count,
            hosts: [host.to_owned()].into(),
            first_seen: None,
            last_seen: None,
            processes: ["curl".to_owned()].into(),
        }
    }

    fn addr(a: &str, port: u16) -> Destination {
        Destination::Address { addr: a.parse().unwrap(), port, proto: Proto::Tcp }
    }

    #[test]
    fn proposes_references_literals_and_hosts_and_refuses_a_layer_violation() {
        let observed = vec![
            seen("api", addr("10.0.0.6", 6379), 3, "h1"), // cache: a service reference, narrowed
            seen("api", addr("10.0.0.7", 443), 2, "h1"),  // web: a higher layer
            seen("api", addr("192.0.2.9", 8443), 1, "h2"), // nobody's: a literal
            seen("api", addr("10.0.0.5", 5432), 9, "h1"), // db: already allowed
            seen("api", Destination::Name { name: "Pay.Example.com".into() }, 4, "h2"),
        ];
        let learned = learn(vec![("p.toml".into(), POLICY.into())], "prod", observed.clone()).unwrap();
        let entries: Vec<String> = learned.proposals.iter().map(|p| p.entry.toml("r")).collect();
        assert_eq!(
            entries,
            [
                "{ service = \"cache\", ports = [6379], reason = \"r\" }",
                "{ host = \"pay.example.com\", reason = \"r\" }",
                "{ ip = \"192.0.2.9\", ports = [8443], proto = \"tcp\", reason = \"r\" }",
            ]
        );
        assert!(learned.proposals[2].outside_every_service);
        assert_eq!(learned.covered.len(), 1);
        assert_eq!(learned.needs_decision.len(), 1);
        let refused = &learned.needs_decision[0];
        assert_eq!(refused.proposal.entry, Entry::Service { target: "web".into(), ports: Vec::new() });
        assert!(
            refused.problems[0].starts_with("depfence::layer_violation: `api` (layer `apps`) depends on `web`"),
            "{:?}",
            refused.problems
        );

        // The draft compiles, allows what was proposed, and keeps the file's layout.
        let (_, _, new) = &learned.changes[0];
        assert!(new.contains("  { service = \"db\" },\n  { service = \"cache\", ports = [6379], reason = \"learned: 3 would-reject(s) on h1 by curl\" },\n"), "{new}");
        let compiled = crate::compile::compile_str("p.toml", new).unwrap();
        let (_, api) = compiled.snapshot.service("api").unwrap();
        let conn = Connection { addr: "192.0.2.9".parse().unwrap(), port: 8443, proto: Proto::Tcp };
        assert!(api.decide(0, &conn).rule.is_some());

        // Deterministic: the same evidence in another order gives the same bytes.
        let mut reversed = observed;
        reversed.reverse();
        let again = learn(vec![("p.toml".into(), POLICY.into())], "prod", reversed).unwrap();
        assert_eq!(again.changes, learned.changes);
    }

    #[test]
    fn an_entry_that_closes_a_cycle_needs_a_decision() {
        let text = POLICY
            .replace(
                "[services.api]\n",
                "[services.api]\nendpoints = [{ ip = \"10.0.0.8\", ports = [80], proto = \"tcp\" }]\n",
            )
            .replace(
                "[services.cache]\nlayer = \"apps\"\n",
                "[services.cache]\nlayer = \"apps\"\nallow = [{ service = \"api\" }]\n",
            );
        let learned =
            learn(vec![("p.toml".into(), text)], "prod", vec![seen("api", addr("10.0.0.6", 6379), 1, "h1")]).unwrap();
        assert!(learned.proposals.is_empty());
        assert!(learned.needs_decision[0].problems[0].starts_with("depfence::cycle"), "{:?}", learned.needs_decision);
        assert!(learned.changes.is_empty());
    }

    /// The fleet's evidence: events per destination summed over the hosts of the environment,
    /// a service-named destination as a service reference, another environment's host ignored.
    #[cfg(feature = "fleet")]
    #[test]
    fn fleet_evidence_from_the_destination_counters() {
        use crate::promote::fleet::{Answer, FetchError, Metrics, Series};
        use std::time::{Duration, UNIX_EPOCH};
        struct Fixed;
        const T: f64 = 1_800_000_000.0;
        fn series(labels: &[(&str, &str)], samples: &[(f64, f64)]) -> Series {
            Series {
                labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                samples: samples.to_vec(),
            }
        }
        impl Metrics for Fixed {
            fn query(&self, promql: &str, _: SystemTime) -> Result<Answer, FetchError> {
                let series = if promql == "depfence_policy_info == 1" {
                    vec![
                        series(&[("instance", "a:1"), ("environment", "prod")], &[(T, 1.0)]),
                        series(&[("instance", "b:1"), ("environment", "prod")], &[(T, 1.0)]),
                        series(&[("instance", "q:1"), ("environment", "qa")], &[(T, 1.0)]),
                    ]
                } else {
                    let d = |i: &str, dest: &str, samples: &[(f64, f64)]| {
                        series(&[("instance", i), ("service", "api"), ("destination", dest)], samples)
                    };
                    vec![
                        d("a:1", "cache", &[(T - 500.0, 1.0), (T, 3.0)]),
                        d("b:1", "cache", &[(T - 599.0, 2.0), (T, 4.0)]),
                        d("q:1", "cache", &[(T - 500.0, 1.0), (T, 9.0)]),
                        d("a:1", "192.0.2.9:8443/tcp", &[(T - 599.0, 5.0), (T, 5.0)]),
                        d("b:1", "pay.example.com", &[(T - 100.0, 1.0)]),
                    ]
                };
                Ok(Answer { series, warnings: Vec::new() })
            }
            fn retention(&self) -> Result<Option<Duration>, FetchError> {
                Ok(None)
            }
        }
        let services: BTreeSet<String> = ["api", "cache"].iter().map(|s| (*s).to_owned()).collect();
        let time = UNIX_EPOCH + Duration::from_secs_f64(T);
        let found = observed_in_fleet(&Fixed, "prod", Duration::from_secs(600), time, &services).unwrap();
        assert_eq!(found[0].first_seen, Some(UNIX_EPOCH + Duration::from_secs_f64(T - 500.0)), "born in the window");
        assert_eq!(found[0].last_seen, Some(time));
        let got: Vec<(Destination, u64, Vec<String>)> =
            found.into_iter().map(|o| (o.destination, o.count, o.hosts.into_iter().collect())).collect();
        assert_eq!(
            got,
            [
                (Destination::Service { name: "cache".into() }, 3 + 2, vec!["a:1".to_owned(), "b:1".to_owned()]),
                (Destination::Name { name: "pay.example.com".into() }, 1, vec!["b:1".to_owned()]),
            ],
            "the literal saw no new event in the window; qa's host is not prod's"
        );
    }
}
