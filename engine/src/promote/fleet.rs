//! The fleet gate: may a service be promoted to enforce in an environment, on the evidence of
//! every host that runs it, as the agents exported it to Prometheus?
//!
//! Every query is an instant query at one pinned time, so the answers agree with each other.
//! Counters are read as their raw samples over the window (a range selector), and their increase
//! is computed exactly here, counter resets included: nothing is extrapolated. The gate has three
//! outcomes, and only one of them promotes:
//! - **promoted**: every host that ran the service in the environment reports the policy being
//!   promoted, was in audit for the whole window, saw no would-reject, and the fleet saw enough
//!   connections (in total and on each host);
//! - **refused**: a host saw a would-reject, or there was too little traffic;
//! - **inconclusive**: Prometheus did not answer (or answered with errors or warnings), its
//!   retention is shorter than the window, a target does not report, a host runs another policy,
//!   or a host's samples do not cover the window. Never a success.
//!
//! [`decide`] is pure over a [`Metrics`] source (the Prometheus HTTP API in
//! [`super::prometheus`], a table in the tests), and its [`FleetDecision`] records every query
//! and answer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::timefmt::{Human, rfc3339, unix_seconds};

/// One series of an answer: its labels and its samples as (unix seconds, value).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    /// The labels.
    pub labels: BTreeMap<String, String>,
    /// Samples, oldest first (one for an instant vector).
    pub samples: Vec<(f64, f64)>,
}

impl Series {
    /// A label's value (empty when absent).
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }

    fn last(&self) -> Option<f64> {
        self.samples.last().map(|&(_, v)| v)
    }

    /// [`Series::increase`] of a counter that is created at its first increment (its series
    /// starts at 1, not 0): when the series starts after `born_after`, its first value counts too.
    pub fn increase_since_birth(&self, born_after: f64) -> f64 {
        let first = match self.samples.first() {
            Some(&(t, v)) if t > born_after => v,
            _ => 0.0,
        };
        first + self.increase()
    }

    /// The exact increase of a counter over its samples: the sum of its rises, a drop (a
    /// counter reset) counting from zero.
    pub fn increase(&self) -> f64 {
        self.samples
            .windows(2)
            .map(|w| match w {
                [(_, a), (_, b)] if b >= a => b - a,
                [_, (_, b)] => *b,
                _ => 0.0,
            })
            .sum()
    }
}

/// What Prometheus answered to one query.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Answer {
    /// The series.
    pub series: Vec<Series>,
    /// Warnings the server attached (a partial answer, for instance).
    pub warnings: Vec<String>,
}

/// How a counter rose over a window, summed over the hosts that report it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rise {
    /// The increase over the window (a series born in the window counts its first value).
    pub count: u64,
    /// The agents (`instance`s) whose counter rose.
    pub hosts: BTreeSet<String>,
    /// The first sample that showed a rise (or the series' birth in the window).
    pub first: Option<SystemTime>,
    /// The last such sample.
    pub last: Option<SystemTime>,
}

/// The rises of the counter `selector` names (a PromQL series selector) over the window that ends
/// at `time`, on the agents whose `depfence_policy_info` says they run in `environment`, summed
/// by `key` of each series. Raw samples (a range selector), so nothing is extrapolated; series
/// that did not rise are left out.
pub fn rises_by<K: Ord>(
    metrics: &dyn Metrics,
    selector: &str,
    environment: &str,
    window: Duration,
    time: SystemTime,
    key: impl Fn(&Series) -> K,
) -> Result<BTreeMap<K, Rise>, FetchError> {
    let range = format!("{}s", window.as_secs().max(1));
    let info = metrics.query("depfence_policy_info == 1", time)?;
    let hosts_in_env: BTreeSet<&str> =
        info.series.iter().filter(|s| s.label("environment") == environment).map(|s| s.label("instance")).collect();
    let answer = metrics.query(&format!("{selector}[{range}]"), time)?;
    let start = unix_seconds(time) - window.as_secs_f64();
    // A series born in the first tenth of the window may be one the scrapes met late.
    let born_after = start + window.as_secs_f64() / 10.0;
    let at = |t: f64| UNIX_EPOCH + Duration::from_secs_f64(t.max(0.0));
    let mut found: BTreeMap<K, Rise> = BTreeMap::new();
    for series in &answer.series {
        let instance = series.label("instance");
        if !hosts_in_env.contains(instance) {
            continue;
        }
        let count = series.increase_since_birth(born_after).round() as u64;
        if count == 0 {
            continue;
        }
        // When it rose: its birth in the window, and every sample above the one before.
        let born = series.samples.first().filter(|&&(t, v)| t > born_after && v > 0.0).map(|&(t, _)| t);
        let rises = series.samples.windows(2).filter_map(|w| match w {
            [(_, a), (t, b)] if b != a => Some(*t),
            _ => None,
        });
        let rise = found.entry(key(series)).or_default();
        rise.count += count;
        rise.hosts.insert(instance.to_owned());
        for t in born.into_iter().chain(rises).map(at) {
            rise.first = Some(rise.first.map_or(t, |f| f.min(t)));
            rise.last = Some(rise.last.map_or(t, |l| l.max(t)));
        }
    }
    Ok(found)
}

/// Asking Prometheus failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

/// Where the evidence comes from: Prometheus's HTTP API (or anything answering like it).
pub trait Metrics {
    /// Evaluates `promql` as an instant query at `time`.
    fn query(&self, promql: &str, time: SystemTime) -> Result<Answer, FetchError>;
    /// How far back the server keeps samples (None when it keeps them by size only).
    fn retention(&self) -> Result<Option<Duration>, FetchError>;
}

/// What is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetRequest {
    /// The service to promote.
    pub service: String,
    /// The environment it is promoted in.
    pub environment: String,
    /// The hash of the policy being promoted (every host must run it).
    pub hash: String,
    /// The window the evidence must cover.
    pub window: Duration,
    /// The pinned evaluation time.
    pub time: SystemTime,
    /// The fewest connections the fleet must have seen.
    pub min_connections: u64,
    /// The fewest connections each host must have seen.
    pub min_per_host: u64,
    /// The Prometheus job the agents are scraped as (`up{job=…}` lists the targets).
    pub job: String,
}

/// The three outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetOutcome {
    /// Every rule held: the service may enforce.
    Promoted,
    /// The evidence says no.
    Refused,
    /// The evidence cannot say: never a success.
    Inconclusive,
}

/// One host's evidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostEvidence {
    /// The Prometheus `instance` of its agent.
    pub instance: String,
    /// Connections allowed in the window.
    pub allowed: u64,
    /// Connections would-rejected in the window.
    pub would_reject: u64,
}

/// A would-rejected destination, fleet-wide.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DestinationEvidence {
    /// `addr:port/proto`.
    pub destination: String,
    /// Would-reject events in the window, summed over hosts.
    pub events: u64,
    /// The hosts that saw it.
    pub hosts: Vec<String>,
}

/// One query the gate asked, and what it got.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueryRecord {
    /// What it checks.
    pub purpose: &'static str,
    /// The PromQL.
    pub promql: String,
    /// The answer, when there was one.
    pub answer: Option<Answer>,
    /// Why there was none.
    pub error: Option<String>,
}

/// The gate's decision, with everything it saw: the record a promotion log keeps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetDecision {
    /// The pinned evaluation time.
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    /// The service.
    pub service: String,
    /// The environment.
    pub environment: String,
    /// The hash of the policy promoted.
    pub hash: String,
    /// The window, in seconds.
    pub window_secs: u64,
    /// The outcome.
    pub outcome: FleetOutcome,
    /// Why (for a promotion: what held).
    pub reasons: Vec<String>,
    /// The hosts that ran the service in the environment, with their evidence.
    pub hosts: Vec<HostEvidence>,
    /// The most would-rejected destinations, fleet-wide.
    pub top_destinations: Vec<DestinationEvidence>,
    /// Every query and its answer.
    pub queries: Vec<QueryRecord>,
}

/// One fleet decision as the promotion log keeps it: the decision with its queries and answers,
/// who asked, and what was written.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetRecord {
    /// The decision.
    #[serde(flatten)]
    pub decision: FleetDecision,
    /// Who ran the promotion.
    pub who: super::Actor,
    /// True when only the decision was asked for (`--dry-run`).
    pub dry_run: bool,
    /// The policy file rewritten to enforce, when the service was promoted.
    pub rewritten: Option<std::path::PathBuf>,
}

/// Appends a record to a fleet promotion log (one JSON line, synced).
pub fn append_fleet_log(path: &std::path::Path, record: &FleetRecord) -> Result<(), super::StoreError> {
    let text = super::store::lines_text(std::slice::from_ref(record))
        .map_err(|source| super::StoreError::Write { path: path.to_owned(), source })?;
    super::store::append_text(path, &text)
}

/// How many destinations a refusal lists.
pub const FLEET_TOP_DESTINATIONS: usize = 10;

/// Asks, and records what was asked and answered.
struct Asker<'m> {
    metrics: &'m dyn Metrics,
    time: SystemTime,
    queries: Vec<QueryRecord>,
    /// Reasons the evidence is inconclusive.
    inconclusive: Vec<String>,
}

impl Asker<'_> {
    fn ask(&mut self, purpose: &'static str, promql: String) -> Option<Answer> {
        match self.metrics.query(&promql, self.time) {
            Ok(answer) => {
                if !answer.warnings.is_empty() {
                    self.inconclusive
                        .push(format!("Prometheus warned about `{promql}`: {}", answer.warnings.join("; ")));
                }
                self.queries.push(QueryRecord { purpose, promql, answer: Some(answer.clone()), error: None });
                Some(answer)
            }
            Err(e) => {
                self.inconclusive.push(format!("Prometheus did not answer `{promql}`: {e}"));
                self.queries.push(QueryRecord { purpose, promql, answer: None, error: Some(e.0) });
                None
            }
        }
    }
}

/// Decides whether `request.service` may enforce in `request.environment`.
pub fn decide(metrics: &dyn Metrics, request: &FleetRequest) -> FleetDecision {
    let FleetRequest { service, environment, hash, window, .. } = request;
    let mut asker = Asker { metrics, time: request.time, queries: Vec::new(), inconclusive: Vec::new() };
    let mut decision = FleetDecision {
        time: request.time,
        service: service.clone(),
        environment: environment.clone(),
        hash: hash.clone(),
        window_secs: window.as_secs(),
        outcome: FleetOutcome::Inconclusive,
        reasons: Vec::new(),
        hosts: Vec::new(),
        top_destinations: Vec::new(),
        queries: Vec::new(),
    };
    let range = format!("{}s", window.as_secs().max(1));

    // Prometheus answers, and keeps samples for the whole window.
    match metrics.retention() {
        Err(e) => {
            decision.reasons.push(format!("Prometheus does not answer: {e}"));
            return decision;
        }
        Ok(Some(retention)) if retention < *window => {
            decision.reasons.push(format!(
                "Prometheus keeps {} of samples, less than the window of {}",
                Human(retention),
                Human(*window)
            ));
            return decision;
        }
        Ok(_) => {}
    }

    // Every target reports.
    let up = asker.ask("every agent reports", format!("up{{job=\"{}\"}}", request.job));
    let down: Vec<String> = up
        .iter()
        .flat_map(|a| &a.series)
        .filter(|s| s.last() != Some(1.0))
        .map(|s| s.label("instance").to_owned())
        .collect();
    if !down.is_empty() {
        asker.inconclusive.push(format!("agents that do not report: {}", down.join(", ")));
    }
    if up.as_ref().is_some_and(|a| a.series.is_empty()) {
        asker.inconclusive.push(format!("no target of job `{}`", request.job));
    }

    // The hosts that ran the service in the window, and the policy each runs now.
    let ran = asker.ask(
        "hosts where the service has cgroups",
        format!("max_over_time(depfence_service_cgroups{{service=\"{service}\"}}[{range}]) > 0"),
    );
    // An agent reports the policy in force with 1 (and a replaced one with 0); an agent that
    // reports two at once is ambiguous, not "the last one wins".
    let info = asker.ask("the policy each agent runs", "depfence_policy_info == 1".to_owned());
    let mut policies: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    let mut ambiguous = Vec::new();
    for s in info.iter().flat_map(|a| &a.series) {
        if policies.insert(s.label("instance"), (s.label("environment"), s.label("hash"))).is_some() {
            ambiguous.push(s.label("instance").to_owned());
        }
    }
    if !ambiguous.is_empty() {
        asker.inconclusive.push(format!("agents that report more than one policy: {}", ambiguous.join(", ")));
    }
    let mut hosts: Vec<String> = Vec::new();
    let (mut silent, mut other_policy) = (Vec::new(), Vec::new());
    for series in ran.iter().flat_map(|a| &a.series) {
        let instance = series.label("instance");
        match policies.get(instance) {
            None => silent.push(instance.to_owned()),
            Some((env, _)) if env != environment => {}
            Some((_, h)) if h != hash => other_policy.push(format!("{instance} ({})", h.get(..12).unwrap_or(h))),
            Some(_) => hosts.push(instance.to_owned()),
        }
    }
    hosts.sort();
    if !silent.is_empty() {
        asker.inconclusive.push(format!("hosts that ran `{service}` but report no policy now: {}", silent.join(", ")));
    }
    if !other_policy.is_empty() {
        asker.inconclusive.push(format!(
            "hosts on another policy than {}: {}",
            hash.get(..12).unwrap_or(hash),
            other_policy.join(", ")
        ));
    }
    if hosts.is_empty() && ran.is_some() && info.is_some() {
        asker.inconclusive.push(format!("no host in environment `{environment}` ran `{service}` in the window"));
    }

    // In audit on every host for the whole window: its samples start at the window's start
    // (within a tenth of the window) and are all 1.
    let audit = asker.ask(
        "in audit for the whole window",
        format!("depfence_service_mode{{service=\"{service}\",mode=\"audit\"}}[{range}]"),
    );
    let start = unix_seconds(request.time) - window.as_secs_f64();
    let slack = window.as_secs_f64() / 10.0;
    for host in &hosts {
        let series = audit.iter().flat_map(|a| &a.series).find(|s| s.label("instance") == host);
        match series {
            None => asker.inconclusive.push(format!("{host} has no mode samples for `{service}` in the window")),
            Some(s) if s.samples.iter().any(|&(_, v)| v != 1.0) => {
                asker.inconclusive.push(format!("`{service}` was not in audit for the whole window on {host}"))
            }
            Some(s) if s.samples.first().is_none_or(|&(t, _)| t > start + slack) => {
                let from = s.samples.first().map_or(0.0, |&(t, _)| t);
                asker.inconclusive.push(format!(
                    "{host}'s samples cover only the last {} of the window",
                    Human(Duration::from_secs_f64((unix_seconds(request.time) - from).max(0.0)))
                ));
            }
            Some(_) => {}
        }
    }

    // The counters, read raw: exact increases. A host whose would-reject series is absent saw
    // none: the checks above proved that it reported.
    let counters = asker.ask(
        "connections in the window",
        format!("depfence_connections_total{{service=\"{service}\",verdict=~\"allowed|would_reject\"}}[{range}]"),
    );
    for host in &hosts {
        let count = |verdict: &str| -> u64 {
            counters
                .iter()
                .flat_map(|a| &a.series)
                .filter(|s| s.label("instance") == host && s.label("verdict") == verdict)
                .map(|s| s.increase().round() as u64)
                .sum()
        };
        decision.hosts.push(HostEvidence {
            instance: host.clone(),
            allowed: count("allowed"),
            would_reject: count("would_reject"),
        });
    }

    // The destinations the would-rejects went to (the agents' bounded destination counters,
    // created at their first event).
    let destinations = asker.ask(
        "would-rejected destinations",
        format!("depfence_destination_events_total{{service=\"{service}\",verdict=\"would_reject\"}}[{range}]"),
    );
    let mut by_destination: BTreeMap<String, (u64, Vec<String>)> = BTreeMap::new();
    for series in destinations.iter().flat_map(|a| &a.series) {
        let events = series.increase_since_birth(start + slack).round() as u64;
        if events == 0 || !hosts.iter().any(|h| h == series.label("instance")) {
            continue;
        }
        let entry = by_destination.entry(series.label("destination").to_owned()).or_default();
        entry.0 += events;
        entry.1.push(series.label("instance").to_owned());
    }
    let mut top: Vec<DestinationEvidence> = by_destination
        .into_iter()
        .map(|(destination, (events, hosts))| DestinationEvidence { destination, events, hosts })
        .collect();
    top.sort_by(|a, b| b.events.cmp(&a.events).then_with(|| a.destination.cmp(&b.destination)));
    top.truncate(FLEET_TOP_DESTINATIONS);
    decision.top_destinations = top;

    // Decide: a would-reject is a refusal whatever else is missing; missing evidence is
    // inconclusive; too little traffic is a refusal.
    let rejecting: Vec<String> = decision
        .hosts
        .iter()
        .filter(|h| h.would_reject > 0)
        .map(|h| format!("{} ({})", h.instance, h.would_reject))
        .collect();
    let total: u64 = decision.hosts.iter().map(|h| h.allowed + h.would_reject).sum();
    let quiet: Vec<String> = decision
        .hosts
        .iter()
        .filter(|h| h.allowed + h.would_reject < request.min_per_host)
        .map(|h| format!("{} ({})", h.instance, h.allowed + h.would_reject))
        .collect();
    decision.queries = std::mem::take(&mut asker.queries);
    if !rejecting.is_empty() {
        decision.outcome = FleetOutcome::Refused;
        decision.reasons.push(format!("would-rejects in the window on {}", rejecting.join(", ")));
        for d in &decision.top_destinations {
            decision.reasons.push(format!(
                "  {} would-rejected ({} events) on {}",
                d.destination,
                d.events,
                d.hosts.join(", ")
            ));
        }
        decision.reasons.extend(asker.inconclusive);
    } else if !asker.inconclusive.is_empty() {
        decision.outcome = FleetOutcome::Inconclusive;
        decision.reasons = asker.inconclusive;
    } else if total < request.min_connections || !quiet.is_empty() {
        decision.outcome = FleetOutcome::Refused;
        if total < request.min_connections {
            decision.reasons.push(format!(
                "{total} connections in the window on {} hosts; at least {} are needed",
                decision.hosts.len(),
                request.min_connections
            ));
        }
        if !quiet.is_empty() {
            decision.reasons.push(format!(
                "hosts with fewer than {} connections: {}",
                request.min_per_host,
                quiet.join(", ")
            ));
        }
    } else {
        decision.outcome = FleetOutcome::Promoted;
        decision.reasons.push(format!(
            "{} hosts on policy {}, in audit for the whole window, {total} connections, no would-reject",
            decision.hosts.len(),
            hash.get(..12).unwrap_or(hash)
        ));
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers from a table: PromQL → answer; anything else is an error.
    struct Table {
        answers: BTreeMap<String, Answer>,
        retention: Result<Option<Duration>, FetchError>,
    }

    impl Metrics for Table {
        fn query(&self, promql: &str, _: SystemTime) -> Result<Answer, FetchError> {
            self.answers.get(promql).cloned().ok_or_else(|| FetchError(format!("no answer for {promql}")))
        }
        fn retention(&self) -> Result<Option<Duration>, FetchError> {
            self.retention.clone()
        }
    }

    const T: f64 = 1_800_000_000.0;

    fn series(labels: &[(&str, &str)], samples: &[(f64, f64)]) -> Series {
        Series {
            labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            samples: samples.to_vec(),
        }
    }

    fn request() -> FleetRequest {
        FleetRequest {
            service: "app".into(),
            environment: "prod".into(),
            hash: "abc".into(),
            window: Duration::from_secs(600),
            time: UNIX_EPOCH + Duration::from_secs_f64(T),
            min_connections: 10,
            min_per_host: 2,
            job: "depfence".into(),
        }
    }

    /// Two clean hosts, each with `allowed` connections and `would_reject` would-rejects.
    fn fleet(counts: [(u64, u64); 2]) -> Table {
        let hosts = ["a:1", "b:1"];
        let mut answers = BTreeMap::new();
        let each =
            |f: &dyn Fn(&str) -> Series| Answer { series: hosts.iter().map(|h| f(h)).collect(), warnings: vec![] };
        answers.insert("up{job=\"depfence\"}".into(), each(&|h| series(&[("instance", h)], &[(T, 1.0)])));
        answers.insert(
            "max_over_time(depfence_service_cgroups{service=\"app\"}[600s]) > 0".into(),
            each(&|h| series(&[("instance", h)], &[(T, 1.0)])),
        );
        answers.insert(
            "depfence_policy_info == 1".into(),
            each(&|h| series(&[("instance", h), ("environment", "prod"), ("hash", "abc")], &[(T, 1.0)])),
        );
        answers.insert(
            "depfence_service_mode{service=\"app\",mode=\"audit\"}[600s]".into(),
            each(&|h| series(&[("instance", h)], &[(T - 599.0, 1.0), (T, 1.0)])),
        );
        let mut counters = Vec::new();
        for (h, (allowed, rejects)) in hosts.iter().zip(counts) {
            counters.push(series(&[("instance", h), ("verdict", "allowed")], &[(T - 599.0, 0.0), (T, allowed as f64)]));
            counters.push(series(
                &[("instance", h), ("verdict", "would_reject")],
                &[(T - 599.0, 3.0), (T, 3.0 + rejects as f64)],
            ));
        }
        answers.insert(
            "depfence_connections_total{service=\"app\",verdict=~\"allowed|would_reject\"}[600s]".into(),
            Answer { series: counters, warnings: vec![] },
        );
        answers.insert(
            "depfence_destination_events_total{service=\"app\",verdict=\"would_reject\"}[600s]".into(),
            Answer {
                series: vec![series(
                    &[("instance", "b:1"), ("destination", "10.0.0.9:443/tcp")],
                    &[(T - 300.0, 1.0), (T, 4.0)],
                )],
                warnings: vec![],
            },
        );
        Table { answers, retention: Ok(Some(Duration::from_secs(86_400))) }
    }

    #[test]
    fn clean_busy_hosts_promote() {
        let d = decide(&fleet([(10, 0), (12, 0)]), &request());
        assert_eq!(d.outcome, FleetOutcome::Promoted, "{:?}", d.reasons);
        assert_eq!(d.hosts.iter().map(|h| h.allowed).collect::<Vec<_>>(), [10, 12]);
        assert_eq!(d.queries.len(), 6, "every query is recorded");
    }

    #[test]
    fn one_would_reject_refuses_naming_host_and_destination() {
        let d = decide(&fleet([(10, 0), (12, 1)]), &request());
        assert_eq!(d.outcome, FleetOutcome::Refused);
        assert!(d.reasons[0].contains("b:1 (1)"), "{:?}", d.reasons);
        assert_eq!(d.top_destinations[0].destination, "10.0.0.9:443/tcp");
        assert_eq!(d.top_destinations[0].hosts, ["b:1"]);
        // Born in the window at its first event (1), then 3 more.
        assert_eq!(d.top_destinations[0].events, 4);
    }

    #[test]
    fn too_little_traffic_refuses_and_names_quiet_hosts() {
        let d = decide(&fleet([(1, 0), (3, 0)]), &request());
        assert_eq!(d.outcome, FleetOutcome::Refused);
        assert!(d.reasons.iter().any(|r| r.contains("4 connections")), "{:?}", d.reasons);
        assert!(d.reasons.iter().any(|r| r.contains("a:1 (1)")), "{:?}", d.reasons);
    }

    #[test]
    fn missing_evidence_is_inconclusive() {
        // Another policy on one host.
        let mut table = fleet([(10, 0), (12, 0)]);
        table.answers.get_mut("depfence_policy_info == 1").unwrap().series[1]
            .labels
            .insert("hash".into(), "zzz".into());
        let d = decide(&table, &request());
        assert_eq!(d.outcome, FleetOutcome::Inconclusive);
        assert!(d.reasons.iter().any(|r| r.contains("another policy") && r.contains("b:1 (zzz)")), "{:?}", d.reasons);

        // An agent that reports two policies at once: ambiguous, not "the last one wins".
        let mut table = fleet([(10, 0), (12, 0)]);
        let info = table.answers.get_mut("depfence_policy_info == 1").unwrap();
        let mut second = info.series[0].clone();
        second.labels.insert("hash".into(), "old".into());
        info.series.push(second);
        let d = decide(&table, &request());
        assert_eq!(d.outcome, FleetOutcome::Inconclusive);
        assert!(d.reasons.iter().any(|r| r.contains("more than one policy: a:1")), "{:?}", d.reasons);

        // A target that does not report.
        let mut table = fleet([(10, 0), (12, 0)]);
        table.answers.get_mut("up{job=\"depfence\"}").unwrap().series[0].samples = vec![(T, 0.0)];
        assert_eq!(decide(&table, &request()).outcome, FleetOutcome::Inconclusive);

        // Samples that start late in the window.
        let mut table = fleet([(10, 0), (12, 0)]);
        table.answers.get_mut("depfence_service_mode{service=\"app\",mode=\"audit\"}[600s]").unwrap().series[0]
            .samples = vec![(T - 100.0, 1.0), (T, 1.0)];
        let d = decide(&table, &request());
        assert_eq!(d.outcome, FleetOutcome::Inconclusive);
        assert!(d.reasons.iter().any(|r| r.contains("a:1's samples cover only the last")), "{:?}", d.reasons);

        // In enforce (or off) for part of the window on one host.
        let mut table = fleet([(10, 0), (12, 0)]);
        table.answers.get_mut("depfence_service_mode{service=\"app\",mode=\"audit\"}[600s]").unwrap().series[1]
            .samples = vec![(T - 599.0, 1.0), (T - 300.0, 0.0), (T, 1.0)];
        let d = decide(&table, &request());
        assert_eq!(d.outcome, FleetOutcome::Inconclusive);
        assert!(d.reasons.iter().any(|r| r.contains("not in audit for the whole window on b:1")), "{:?}", d.reasons);

        // Warnings, errors, retention, no answer at all.
        let mut table = fleet([(10, 0), (12, 0)]);
        table.answers.get_mut("depfence_policy_info == 1").unwrap().warnings = vec!["partial".into()];
        assert_eq!(decide(&table, &request()).outcome, FleetOutcome::Inconclusive);
        let mut table = fleet([(10, 0), (12, 0)]);
        table.answers.remove("depfence_policy_info == 1");
        assert_eq!(decide(&table, &request()).outcome, FleetOutcome::Inconclusive);
        let mut table = fleet([(10, 0), (12, 0)]);
        table.retention = Ok(Some(Duration::from_secs(300)));
        let d = decide(&table, &request());
        assert_eq!(d.outcome, FleetOutcome::Inconclusive);
        assert!(d.reasons[0].contains("less than the window"), "{:?}", d.reasons);
        table.retention = Err(FetchError("connection refused".into()));
        assert_eq!(decide(&table, &request()).outcome, FleetOutcome::Inconclusive);
    }

    #[test]
    fn counter_increase_is_exact_across_a_reset() {
        let s = series(&[], &[(0.0, 5.0), (1.0, 7.0), (2.0, 1.0), (3.0, 4.0)]);
        assert_eq!(s.increase(), 2.0 + 1.0 + 3.0);
    }
}
