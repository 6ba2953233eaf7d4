//! Which declared dependencies connections use: the declared graph against the observed one.
//!
//! The kernel counts the hits of each rule of each ruleset (`DF_RULE_HITS`, per CPU, keyed by
//! ruleset id and rule id); a hit is one allowed connect, or one allowed datagram of a UDP socket
//! (sendmsg). This module names those rules ([`RuleNames`]: a kernel rule id → the rule in words,
//! the backend it reaches and where its allow entry was written) and lays out a policy's declared
//! dependencies with their use ([`declared`], [`Usage`]), from which [`Usage::unused`] lists
//! what nothing used, like a firewall's "rules with no hits".
//!
//! A backend is what an allow entry reaches: a service (by name), an address or block, or the
//! host names of the service's host rules (one backend, [`HOST_RULES`]: the kernel sees the
//! addresses the DNS proxy admitted, not which name admitted them).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use depfence_bpf_common::NAME_RULE_ID;

use crate::lower::rule_id_of;
use crate::snapshot::Snapshot;

/// The backend (and rule) of the addresses a service's host rules admitted through the DNS proxy.
pub const HOST_RULES: &str = "host names (through the dns proxy)";

/// What one kernel rule id of a service's ruleset stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleName {
    /// The rule in words (`Snapshot::describe_rule`), its identity across policy generations.
    pub rule: String,
    /// The backend it reaches: a service's name, else its address block.
    pub backend: String,
    /// Where its allow entry was written (`file:line:col`, empty if unknown).
    pub position: String,
}

/// A service's rules in one environment, in the kernel's rule-id order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleNames {
    /// The service.
    pub service: String,
    /// Rule id `i + 1` names `rules[i]`.
    rules: Vec<RuleName>,
    /// The service has host rules.
    host_rules: bool,
}

impl RuleNames {
    /// The rules of `service` in environment `env` of `snapshot` (none for an unknown service).
    pub fn of(snapshot: &Snapshot, service: &str, env: usize) -> Self {
        let Some((id, s)) = snapshot.service(service) else {
            return RuleNames { service: service.to_owned(), ..RuleNames::default() };
        };
        let rules = s.rules(env);
        let names = rules
            .net_rules
            .iter()
            .map(|rule| RuleName {
                rule: snapshot.describe_rule(rule),
                backend: match rule.target.and_then(|t| snapshot.services().get(t as usize)) {
                    Some(target) => target.name.clone(),
                    None => rule.net.to_string(),
                },
                position: snapshot.rule_position(id, rule),
            })
            .collect();
        RuleNames { service: service.to_owned(), rules: names, host_rules: !rules.host_rules.is_empty() }
    }

    /// The rule a kernel rule id names.
    pub fn name(&self, rule_id: u32) -> Option<RuleName> {
        if rule_id == NAME_RULE_ID {
            return self.host_rules.then(host_rules_name);
        }
        let index = usize::try_from(rule_id.checked_sub(1)?).ok()?;
        self.rules.get(index).cloned()
    }

    /// Every rule, with its kernel rule id; the host rules last, as one.
    pub fn all(&self) -> impl Iterator<Item = (u32, RuleName)> + '_ {
        let host = self.host_rules.then(|| (NAME_RULE_ID, host_rules_name()));
        (0..).zip(&self.rules).map(|(i, r)| (rule_id_of(i), r.clone())).chain(host)
    }
}

fn host_rules_name() -> RuleName {
    RuleName { rule: HOST_RULES.to_owned(), backend: HOST_RULES.to_owned(), position: String::new() }
}

/// One rule's use in a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleUse {
    /// The rule in words.
    pub rule: String,
    /// Where its allow entry was written.
    pub position: String,
    /// Hits in the window.
    pub hits: u64,
    /// First hit in the window (to the minute).
    #[serde(with = "crate::timefmt::rfc3339_option", default)]
    pub first_seen: Option<SystemTime>,
    /// Last hit in the window (to the minute).
    #[serde(with = "crate::timefmt::rfc3339_option", default)]
    pub last_seen: Option<SystemTime>,
}

/// One declared dependency (a backend of a service) and its use in a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendUse {
    /// The backend.
    pub backend: String,
    /// Hits of all its rules in the window.
    pub hits: u64,
    /// First hit in the window.
    #[serde(with = "crate::timefmt::rfc3339_option", default)]
    pub first_seen: Option<SystemTime>,
    /// Last hit in the window.
    #[serde(with = "crate::timefmt::rfc3339_option", default)]
    pub last_seen: Option<SystemTime>,
    /// The hosts (agents) that saw the hits; empty from one agent.
    #[serde(default)]
    pub hosts: BTreeSet<String>,
    /// Its rules (from an agent; Prometheus knows backends only).
    #[serde(default)]
    pub rules: Vec<RuleUse>,
}

/// A service's declared dependencies and their use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceUse {
    /// The service.
    pub service: String,
    /// How many seconds of the window its use was observed (None: unknown, as from Prometheus).
    #[serde(default)]
    pub observed_for_secs: Option<u64>,
    /// Its backends, by name.
    pub backends: Vec<BackendUse>,
}

/// The declared dependencies of a policy in one environment and their use over a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// The environment.
    pub environment: String,
    /// The window.
    #[serde(with = "crate::timefmt::secs")]
    pub window: Duration,
    /// Every service with rules, by name.
    pub services: Vec<ServiceUse>,
    /// The hits are known per rule (from an agent), not only per backend (Prometheus).
    #[serde(default)]
    pub per_rule: bool,
}

/// What nothing used in the window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Unused {
    /// Declared dependencies none of whose rules was hit: (service, backend).
    pub dependencies: Vec<(String, String)>,
    /// Rules with no hit, of dependencies that were used otherwise: (service, rule, position).
    pub rules: Vec<(String, String, String)>,
    /// Services observed for less than the window (the answer covers less): (service, observed).
    #[serde(serialize_with = "serialize_partial")]
    pub partial: Vec<(String, Duration)>,
}

fn serialize_partial<S: serde::Serializer>(partial: &[(String, Duration)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq as _;
    let mut seq = s.serialize_seq(Some(partial.len()))?;
    for (service, observed) in partial {
        seq.serialize_element(&serde_json::json!({ "service": service, "observed_for_secs": observed.as_secs() }))?;
    }
    seq.end()
}

impl Usage {
    /// What nothing used: dependencies without a hit, then the unused rules of used ones.
    pub fn unused(&self) -> Unused {
        let mut out = Unused::default();
        for service in &self.services {
            if let Some(observed) = service.observed_for_secs.filter(|o| *o < self.window.as_secs()) {
                out.partial.push((service.service.clone(), Duration::from_secs(observed)));
            }
            for backend in &service.backends {
                if backend.hits == 0 {
                    out.dependencies.push((service.service.clone(), backend.backend.clone()));
                    continue;
                }
                for rule in backend.rules.iter().filter(|r| self.per_rule && r.hits == 0) {
                    out.rules.push((service.service.clone(), rule.rule.clone(), rule.position.clone()));
                }
            }
        }
        out
    }
}

impl Unused {
    /// True when everything declared was used.
    pub fn is_empty(&self) -> bool {
        self.dependencies.is_empty() && self.rules.is_empty()
    }
}

/// The declared dependencies of every service of `snapshot` in environment `env` (named
/// `environment`), none used yet: the frame a source of hits fills in.
pub fn declared(snapshot: &Snapshot, env: usize, environment: &str, window: Duration) -> Usage {
    let services = snapshot
        .services()
        .iter()
        .map(|s| RuleNames::of(snapshot, &s.name, env))
        .filter(|names| names.all().next().is_some())
        .map(|names| {
            let mut backends: BTreeMap<String, BackendUse> = BTreeMap::new();
            for (_, rule) in names.all() {
                let backend = backends.entry(rule.backend.clone()).or_insert_with(|| BackendUse {
                    backend: rule.backend.clone(),
                    hits: 0,
                    first_seen: None,
                    last_seen: None,
                    hosts: BTreeSet::new(),
                    rules: Vec::new(),
                });
                if !backend.rules.iter().any(|r| r.rule == rule.rule) {
                    backend.rules.push(RuleUse {
                        rule: rule.rule,
                        position: rule.position,
                        hits: 0,
                        first_seen: None,
                        last_seen: None,
                    });
                }
            }
            ServiceUse { service: names.service, observed_for_secs: None, backends: backends.into_values().collect() }
        })
        .collect();
    Usage { environment: environment.to_owned(), window, services, per_rule: false }
}

impl Usage {
    /// Adds `hits` of a rule (by its words) of a service, seen from `first` to `last`.
    pub fn add_rule_hits(&mut self, service: &str, rule: &str, hits: u64, first: SystemTime, last: SystemTime) {
        let Some(s) = self.services.iter_mut().find(|s| s.service == service) else { return };
        for backend in &mut s.backends {
            if let Some(r) = backend.rules.iter_mut().find(|r| r.rule == rule) {
                r.hits += hits;
                r.first_seen = Some(r.first_seen.map_or(first, |f| f.min(first)));
                r.last_seen = Some(r.last_seen.map_or(last, |l| l.max(last)));
                backend.hits += hits;
                backend.first_seen = Some(backend.first_seen.map_or(first, |f| f.min(first)));
                backend.last_seen = Some(backend.last_seen.map_or(last, |l| l.max(last)));
                return;
            }
        }
    }

    /// Adds hits of a whole backend of a service (from Prometheus), seen by `hosts`.
    pub fn add_backend_hits(&mut self, service: &str, backend: &str, rise: &crate::promote::fleet::Rise) {
        let Some(s) = self.services.iter_mut().find(|s| s.service == service) else { return };
        let Some(b) = s.backends.iter_mut().find(|b| b.backend == backend) else { return };
        b.hits += rise.count;
        b.hosts.extend(rise.hosts.iter().cloned());
        b.first_seen = match (b.first_seen, rise.first) {
            (Some(a), Some(c)) => Some(a.min(c)),
            (a, c) => a.or(c),
        };
        b.last_seen = match (b.last_seen, rise.last) {
            (Some(a), Some(c)) => Some(a.max(c)),
            (a, c) => a.or(c),
        };
    }
}

/// The use of the declared dependencies across the fleet in `environment`, from the agents'
/// `depfence_backend_hits_total` in Prometheus, over the window ending at `time`.
pub fn usage_in_fleet(
    metrics: &dyn crate::promote::fleet::Metrics,
    snapshot: &Snapshot,
    env: usize,
    environment: &str,
    window: Duration,
    time: SystemTime,
) -> Result<Usage, crate::promote::fleet::FetchError> {
    let mut usage = declared(snapshot, env, environment, window);
    let rises =
        crate::promote::fleet::rises_by(metrics, "depfence_backend_hits_total", environment, window, time, |series| {
            (series.label("service").to_owned(), series.label("backend").to_owned())
        })?;
    for ((service, backend), rise) in &rises {
        usage.add_backend_hits(service, backend, rise);
    }
    Ok(usage)
}
