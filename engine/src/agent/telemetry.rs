//! What the kernel saw, turned into Prometheus metrics, a log of recent events, and a stream
//! for `policyctl events --follow`.
//!
//! Metric names follow Prometheus conventions (`_total` for counters, seconds for time). The
//! kernel's per-CPU counters are exact; they are exported as absolute values, so a restarted
//! agent (which adopts the pinned counters) carries on from where the last one stopped.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::SystemTime,
};

use metrics::{counter, describe_counter, describe_gauge, gauge};
use serde::{Deserialize, Serialize};

use crate::datapath::abi::{self, Event};
use crate::datapath::sweep::ClosedSocket;
use crate::dns::{DnsEvent, QueryEvent};
use crate::policy::Proto;
use crate::snapshot::Connection;
use crate::timefmt::{rfc3339_millis, unix_seconds};
use crate::verdict::{Counts, Mode, Verdict};

/// Destinations kept as their own label value per service; the rest go to [`OVERFLOW`].
pub const MAX_DESTINATIONS_PER_SERVICE: usize = 100;
/// The destination label value for destinations past the limit.
pub const OVERFLOW: &str = "_other";
/// Events kept for `policyctl events` without `--follow`.
pub const RECENT_EVENTS: usize = 1024;

/// Adds `hits` to a service's declared backend (`depfence_backend_hits_total`); 0 exports it.
/// Backends past [`MAX_DESTINATIONS_PER_SERVICE`] of a service count under [`OVERFLOW`].
pub fn backend_hits(seen: &mut BTreeMap<String, BTreeSet<String>>, service: &str, backend: &str, hits: u64) {
    let known = seen.entry(service.to_owned()).or_default();
    let label = if known.contains(backend) || known.len() < MAX_DESTINATIONS_PER_SERVICE {
        known.insert(backend.to_owned());
        backend
    } else {
        OVERFLOW
    };
    counter!("depfence_backend_hits_total", "service" => service.to_owned(), "backend" => label.to_owned())
        .increment(hits);
}

/// Registers the help text of every metric (once, at start-up).
pub fn describe() {
    describe_counter!("depfence_connections_total", "Connections judged by the kernel, by service and verdict.");
    describe_counter!(
        "depfence_candidate_would_reject_total",
        "Connections the candidate policy (evaluated in shadow) would reject, by service."
    );
    describe_counter!(
        "depfence_destination_events_total",
        "Refused or would-be-refused connection events by service, destination and verdict \
         (at most one per destination per cgroup per second)."
    );
    describe_counter!(
        "depfence_backend_hits_total",
        "Allowed connections (and UDP datagrams) by service and declared backend (a service, an address block, \
         or the host names of the DNS proxy), counted in the kernel per rule; every declared backend is exported, \
         at most 100 per service."
    );
    describe_counter!(
        "depfence_rule_hits_dropped_total",
        "Allowed connections whose rule hit could not be counted (the kernel's hit map was full)."
    );
    describe_gauge!("depfence_policy_generation", "Generation of the policy in force.");
    describe_gauge!("depfence_policy_info", "The policy in force: its content hash and the environment (value 1).");
    describe_counter!("depfence_policy_reloads_total", "Policy reloads by result (success, failure).");
    describe_gauge!("depfence_policy_last_reload_successful", "1 if the last reload succeeded, else 0.");
    describe_gauge!(
        "depfence_policy_last_reload_success_timestamp_seconds",
        "Unix time of the last successful reload."
    );
    describe_gauge!(
        "depfence_policy_last_reload_duration_seconds",
        "How long the last successful reload took, by stage: compile (read, parse, check; after a file change it starts at the change, while the writes settle), apply (until the kernel enforces it)."
    );
    describe_counter!("depfence_events_dropped_total", "Kernel events lost because the ring buffer was full.");
    describe_counter!(
        "depfence_connections_closed_total",
        "Open connections the policy in force no longer allows, by service and verdict: closed \
         (rejected, in enforce) or left open and counted as evidence (would_reject, in audit)."
    );
    describe_counter!(
        "depfence_socket_sweep_failures_total",
        "Sweeps for connections the policy no longer allows that failed (the policy stays in force)."
    );
    describe_counter!(
        "depfence_state_file_errors_total",
        "Problems with a file of the state directory, by file and kind: corrupt, read, missing (the kernel state \
         while the pins hold cgroups), write. Enforcement and metrics go on; promotions are refused while evidence \
         is lost or cannot be recorded."
    );
    describe_counter!(
        "depfence_evidence_lost_total",
        "Evidence found lost or inconsistent, by service (`_all`: every service); promotions are refused until a \
         whole window of new evidence exists."
    );
    describe_gauge!("depfence_map_entries", "Entries in use in a kernel map.");
    describe_gauge!("depfence_map_capacity", "Capacity of a kernel map.");
    describe_gauge!("depfence_service_mode", "1 for the service's current mode, 0 for the other modes.");
    describe_gauge!(
        "depfence_service_mode_changed_timestamp_seconds",
        "Unix time of the service's last mode change (or of its first apply)."
    );
    describe_gauge!("depfence_service_cgroups", "Cgroups currently matched to the service on this machine.");
    describe_counter!(
        "depfence_dns_queries_total",
        "DNS questions from services under the DNS proxy, by service and verdict (allowed, would_reject, rejected)."
    );
    describe_counter!("depfence_dns_upstream_failures_total", "DNS questions answered SERVFAIL: the upstream failed.");
    describe_counter!("depfence_dns_unattributed_total", "DNS questions the proxy could not attribute (refused).");
    describe_counter!(
        "depfence_dns_shared_addresses_total",
        "Answers where a name the service may resolve shares an address with one it may not."
    );
    describe_counter!("depfence_dns_allow_set_full_total", "Answered addresses not admitted: the allow set was full.");
    describe_counter!("depfence_dns_bad_queries_total", "Malformed DNS messages and queries refused under overload.");
}

/// Counts a problem with a file of the state directory (`kind`: `corrupt`, `read`, `missing`,
/// `write`), labelled by the file's name.
pub fn state_file_error(path: &std::path::Path, kind: &'static str) {
    let file = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    counter!("depfence_state_file_errors_total", "file" => file, "kind" => kind).increment(1);
}

/// The `service` label of evidence lost for every service.
pub const ALL_SERVICES: &str = "_all";

/// Counts evidence found lost, of one service or (None) of every service.
pub fn evidence_lost(service: Option<&str>) {
    counter!("depfence_evidence_lost_total", "service" => service.unwrap_or(ALL_SERVICES).to_owned()).increment(1);
}

/// Exports one service's counters and mode (the mode-change time when it is known).
pub fn export_service(service: &str, counts: Counts, mode: Mode, mode_since: Option<SystemTime>, cgroups: usize) {
    let s = service.to_owned();
    for (verdict, count) in counts.iter() {
        match verdict {
            Verdict::CandidateWouldReject => {
                counter!("depfence_candidate_would_reject_total", "service" => s.clone()).absolute(count);
            }
            _ => counter!("depfence_connections_total", "service" => s.clone(), "verdict" => verdict.as_str())
                .absolute(count),
        }
    }
    for m in Mode::ALL {
        let value = if m == mode { 1.0 } else { 0.0 };
        gauge!("depfence_service_mode", "service" => s.clone(), "mode" => m.as_str()).set(value);
    }
    if let Some(since) = mode_since {
        gauge!("depfence_service_mode_changed_timestamp_seconds", "service" => s.clone()).set(unix_seconds(since));
    }
    gauge!("depfence_service_cgroups", "service" => s).set(cgroups as f64);
}

/// What an event judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A connect or send, by its destination.
    #[default]
    Destination,
    /// A DNS question the proxy judged (`destination` is the name asked).
    DnsQuestion,
    /// A socket of a protocol the connect and sendmsg hooks cannot see (`socket:inet/dgram/icmp`).
    Socket,
    /// An IPv6 routing header (`routing-header`, or `routing-header:<first hop>` for a packet).
    RoutingHeader,
    /// A connection open before its service's policy changed that the policy in force no longer
    /// allows: closed in enforce (`rejected`); in audit left open and reported (`would_reject`,
    /// evidence against a promotion).
    ClosedSocket,
}

impl EventKind {
    /// The kind of a kernel event (`EVENT_*`); None for a kind this build does not know.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            abi::EVENT_DESTINATION => Some(Self::Destination),
            abi::EVENT_SOCKET => Some(Self::Socket),
            abi::EVENT_ROUTING_HEADER => Some(Self::RoutingHeader),
            _ => None,
        }
    }
}

/// A kernel event, resolved for people and programs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// When the agent read it (RFC 3339).
    pub time: String,
    /// The service whose policy judged it (None if the cgroup is no longer known).
    pub service: Option<String>,
    /// The process's cgroup, relative to the cgroup2 mount, if known.
    pub cgroup: Option<String>,
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Command name.
    pub comm: String,
    /// `addr:port/proto`.
    pub destination: String,
    /// The service that owns the destination, when the policy says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<String>,
    /// The verdict.
    pub verdict: Verdict,
    /// What was judged.
    #[serde(default)]
    pub kind: EventKind,
    /// For a DNS question the proxy judged: its record type (`A`, `AAAA`, …); `destination`
    /// is then the name asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Policy generation that judged it.
    pub generation: u32,
}

impl EventRecord {
    /// Resolves a kernel event; `service`, `cgroup` and the service that owns the destination
    /// come from the agent's tables. None for an event with a verdict or kind this build does not
    /// know.
    pub fn new(
        event: &Event,
        service: Option<String>,
        cgroup: Option<String>,
        destination_service: Option<String>,
        now: SystemTime,
    ) -> Option<Self> {
        Some(Self {
            time: rfc3339_millis(now),
            service,
            cgroup,
            pid: event.pid(),
            tid: event.pid_tgid as u32,
            comm: event.comm_name().into_owned(),
            destination: event.destination(),
            destination_service,
            verdict: Verdict::from_code(event.verdict)?,
            kind: EventKind::from_code(event.kind)?,
            query: None,
            generation: event.generation,
        })
    }

    /// What was judged, for people: the destination, or `dns A name` for a DNS question.
    pub fn subject(&self) -> String {
        match &self.query {
            Some(qtype) => format!("dns {qtype} {}", self.destination),
            None => self.destination.clone(),
        }
    }

    /// A connection the agent's sweep found: closed (rejected, in enforce) or one enforce would
    /// close (would-reject, in audit); `service`, `cgroup` and the service that owns the
    /// destination come from the agent's tables.
    pub fn closed(
        closed: &ClosedSocket,
        service: Option<String>,
        cgroup: Option<String>,
        destination_service: Option<String>,
        now: SystemTime,
    ) -> Self {
        let proto = if closed.protocol == abi::IPPROTO_UDP { Proto::Udp } else { Proto::Tcp };
        let remote = Connection { addr: closed.remote.ip().to_canonical(), port: closed.remote.port(), proto };
        Self {
            time: rfc3339_millis(now),
            service,
            cgroup,
            pid: 0,
            tid: 0,
            comm: String::new(),
            destination: remote.to_string(),
            destination_service,
            verdict: if closed.closed { Verdict::Rejected } else { Verdict::WouldReject },
            kind: EventKind::ClosedSocket,
            query: None,
            generation: closed.generation,
        }
    }

    /// A DNS question the proxy judged; `cgroup` comes from the agent's tables.
    pub fn from_query(query: &QueryEvent, cgroup: Option<String>, generation: u32, now: SystemTime) -> Self {
        Self {
            time: rfc3339_millis(now),
            service: Some(query.who.service.to_string()),
            cgroup,
            pid: query.who.pid,
            tid: 0,
            comm: query.who.comm.clone(),
            destination: query.name.clone(),
            destination_service: None,
            verdict: query.verdict,
            kind: EventKind::DnsQuestion,
            query: Some(query.qtype.clone()),
            generation,
        }
    }
}

/// Counts what the DNS proxy reports (any thread).
pub fn export_dns_event(event: &DnsEvent) {
    match event {
        DnsEvent::Query(q) => {
            let service = q.who.service.to_string();
            counter!("depfence_dns_queries_total", "service" => service.clone(), "verdict" => q.verdict.as_str())
                .increment(1);
            if q.upstream_error.is_some() {
                counter!("depfence_dns_upstream_failures_total", "service" => service).increment(1);
            }
            if q.cache != crate::dns::CacheUse::NotAsked {
                counter!("depfence_dns_cache_total", "result" => q.cache.as_str()).increment(1);
            }
        }
        DnsEvent::Unattributed { .. } => counter!("depfence_dns_unattributed_total").increment(1),
        DnsEvent::SharedAddress(shared) => {
            counter!("depfence_dns_shared_addresses_total", "service" => shared.service.to_string()).increment(1);
        }
        DnsEvent::AllowSetFull { service, .. } => {
            counter!("depfence_dns_allow_set_full_total", "service" => service.to_string()).increment(1);
        }
        _ => counter!("depfence_dns_bad_queries_total").increment(1),
    }
}

/// Recent events, the last would-reject per service, and the bounded destination labels.
#[derive(Debug, Default)]
pub struct EventLog {
    recent: VecDeque<EventRecord>,
    last_would_reject: BTreeMap<String, EventRecord>,
    destinations: BTreeMap<String, BTreeSet<String>>,
}

impl EventLog {
    /// Records an event: counts it under its (bounded) destination and keeps it.
    pub fn record(&mut self, event: EventRecord) {
        let service = event.service.clone().unwrap_or_else(|| "_unknown".to_owned());
        let seen = self.destinations.entry(service.clone()).or_default();
        // The destination service where the policy knows it, else the address.
        let name = event.destination_service.clone().unwrap_or_else(|| event.destination.clone());
        let label = if seen.contains(&name) || seen.len() < MAX_DESTINATIONS_PER_SERVICE {
            seen.insert(name.clone());
            name
        } else {
            OVERFLOW.to_owned()
        };
        if event.verdict.is_refusal() {
            counter!(
                "depfence_destination_events_total",
                "service" => service.clone(),
                "destination" => label,
                "verdict" => event.verdict.as_str()
            )
            .increment(1);
        }
        if event.verdict == Verdict::WouldReject {
            self.last_would_reject.insert(service, event.clone());
        }
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(event);
    }

    /// The most recent events, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<EventRecord> {
        let skip = self.recent.len().saturating_sub(limit);
        self.recent.iter().skip(skip).cloned().collect()
    }

    /// The last would-reject of a service.
    pub fn last_would_reject(&self, service: &str) -> Option<&EventRecord> {
        self.last_would_reject.get(service)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
    use super::*;

    fn record(service: &str, destination: &str, verdict: Verdict) -> EventRecord {
        EventRecord {
            time: String::new(),
            service: Some(service.to_owned()),
            cgroup: None,
            pid: 1,
            tid: 1,
            comm: "x".into(),
            destination: destination.to_owned(),
            destination_service: None,
            verdict,
            kind: EventKind::Destination,
            query: None,
            generation: 1,
        }
    }

    #[test]
    fn destinations_are_bounded_per_service() {
        let mut log = EventLog::default();
        for i in 0..(MAX_DESTINATIONS_PER_SERVICE + 5) {
            log.record(record("web", &format!("10.0.0.1:{i}/tcp"), Verdict::WouldReject));
        }
        assert_eq!(log.destinations["web"].len(), MAX_DESTINATIONS_PER_SERVICE);
        log.record(record("db", "10.0.0.1:1/tcp", Verdict::Rejected));
        assert_eq!(log.destinations["db"].len(), 1);
        assert_eq!(log.last_would_reject("web").unwrap().destination, "10.0.0.1:104/tcp");
        assert!(log.last_would_reject("db").is_none());
    }

    #[test]
    fn recent_keeps_the_newest() {
        let mut log = EventLog::default();
        for i in 0..(RECENT_EVENTS + 3) {
            log.record(record("web", &format!("10.0.0.1:{i}/tcp"), Verdict::Rejected));
        }
        let recent = log.recent(2);
        assert_eq!(recent.len(), 2);
        assert_eq!(recent[1].destination, format!("10.0.0.1:{}/tcp", RECENT_EVENTS + 2));
    }

    #[test]
    fn destinations_print_like_sockets() {
        let destination = |addr: &str, port, proto| {
            let addr = abi::user::addr_words(addr.parse().unwrap());
            Event { addr, port, proto, ..Event::default() }.destination()
        };
        assert_eq!(destination("127.0.0.1", 80, abi::IPPROTO_TCP), "127.0.0.1:80/tcp");
        assert_eq!(destination("::1", 53, abi::IPPROTO_UDP), "[::1]:53/udp");
    }
}
