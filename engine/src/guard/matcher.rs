//! The pure decision: one compiled snapshot, one environment, and a call (caller service, RPC
//! name, backend authority) give a verdict and the reason for it. Built once per snapshot;
//! judging a call allocates nothing and does a handful of hash lookups, whatever the number of
//! rules.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use hashbrown::{Equivalent, HashMap};
use ipnet::IpNet;

use crate::policy::{Destination, HostPattern, Mode, PortRange, Proto, RpcPattern};
use crate::snapshot::{ServiceId, Snapshot, Verdict};

/// Why a call got its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// A rule of the caller allows the call: `rule` indexes the caller's
    /// [`rpc_rules`](crate::snapshot::ServiceRuleset::rpc_rules) (the most specific match).
    Rule {
        /// The calling service.
        caller: ServiceId,
        /// The backend service.
        backend: ServiceId,
        /// Index into the caller's RPC rules.
        rule: u32,
    },
    /// The caller's mode in this environment is `off`: nothing is judged.
    Off {
        /// The calling service.
        caller: ServiceId,
        /// The backend service, when the authority names one.
        backend: Option<ServiceId>,
    },
    /// The caller is not a service of the snapshot (for example, removed by a reload). The guard
    /// fails open for it, as the kernel does for a cgroup no service selects.
    UnknownCaller,
    /// The authority is neither an endpoint nor a name of any service.
    UnknownBackend {
        /// The calling service.
        caller: ServiceId,
    },
    /// The backend is known, but no `rpc_allow` pattern of the caller matches the call.
    NoRule {
        /// The calling service.
        caller: ServiceId,
        /// The backend service.
        backend: ServiceId,
    },
}

impl Reason {
    /// The calling service, if known.
    pub fn caller(self) -> Option<ServiceId> {
        match self {
            Reason::Rule { caller, .. }
            | Reason::Off { caller, .. }
            | Reason::UnknownBackend { caller }
            | Reason::NoRule { caller, .. } => Some(caller),
            Reason::UnknownCaller => None,
        }
    }

    /// The backend service, if the authority resolved to one.
    pub fn backend(self) -> Option<ServiceId> {
        match self {
            Reason::Rule { backend, .. } | Reason::NoRule { backend, .. } => Some(backend),
            Reason::Off { backend, .. } => backend,
            Reason::UnknownCaller | Reason::UnknownBackend { .. } => None,
        }
    }
}

const KIND_METHOD: u8 = 0;
const KIND_SERVICE: u8 = 1;
const KIND_ANY: u8 = 2;

/// A rule's key: caller, backend, pattern kind and the text to compare (the whole path
/// `/pkg.Service/Method` for a method, `/pkg.Service` for a service, empty for `/*`).
#[derive(Debug, PartialEq, Eq)]
struct RuleKey {
    caller: ServiceId,
    backend: ServiceId,
    kind: u8,
    name: Box<str>,
}

/// The borrowed form of [`RuleKey`], for lookups without allocation. It hashes exactly as the
/// key does (`Box<str>` hashes as `str`).
struct RuleQuery<'a> {
    caller: ServiceId,
    backend: ServiceId,
    kind: u8,
    name: &'a str,
}

impl Hash for RuleKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        pair(self.caller, self.backend, self.kind).hash(state);
        self.name.hash(state);
    }
}

impl Hash for RuleQuery<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        pair(self.caller, self.backend, self.kind).hash(state);
        self.name.hash(state);
    }
}

/// Caller, backend and kind in one word, hashed with one write.
fn pair(caller: ServiceId, backend: ServiceId, kind: u8) -> u64 {
    (u64::from(caller) << 34) ^ (u64::from(backend) << 2) ^ u64::from(kind)
}

impl Equivalent<RuleKey> for RuleQuery<'_> {
    fn equivalent(&self, key: &RuleKey) -> bool {
        self.caller == key.caller && self.backend == key.backend && self.kind == key.kind && self.name == &*key.name
    }
}

/// Endpoints that share an address or host name: (ports, service).
type Owners = Vec<(PortRange, ServiceId)>;

/// What a lowercase host name can name: services that declare it as a `host` endpoint, and the
/// service of that name. One map holds both, so a name costs one lookup.
#[derive(Debug, Default)]
struct NameEntry {
    hosts: Owners,
    service: Option<ServiceId>,
}

/// The index of one snapshot for one environment.
#[derive(Debug)]
pub(crate) struct Matcher {
    /// Service names as written → id (callers).
    callers: HashMap<Box<str>, ServiceId>,
    /// Lowercase host names of `host` endpoints, and lowercase service names (authorities).
    names: HashMap<Box<str>, NameEntry>,
    /// Service names, shared for metric labels.
    pub(crate) labels: Vec<Arc<str>>,
    /// Mode of each service in the environment.
    modes: Vec<Mode>,
    rules: HashMap<RuleKey, u32>,
    /// Wildcard host endpoints, longest domain first.
    host_wildcards: Vec<(HostPattern, PortRange, ServiceId)>,
    /// Single-address endpoints.
    addrs: HashMap<IpAddr, Owners>,
    /// Block endpoints, longest prefix first.
    blocks: Vec<(IpNet, PortRange, ServiceId)>,
}

impl Matcher {
    /// Indexes `snapshot` for the environment at index `env`.
    pub(crate) fn new(snapshot: &Snapshot, env: usize) -> Matcher {
        let services = snapshot.services();
        let mut m = Matcher {
            callers: HashMap::with_capacity(services.len()),
            names: HashMap::with_capacity(services.len()),
            labels: Vec::with_capacity(services.len()),
            modes: Vec::with_capacity(services.len()),
            rules: HashMap::with_capacity(snapshot.rpc_rule_count()),
            host_wildcards: Vec::new(),
            addrs: HashMap::new(),
            blocks: Vec::new(),
        };
        for (id, service) in (0..).zip(services) {
            m.callers.insert(service.name.as_str().into(), id);
            let entry = m.names.entry(service.name.to_ascii_lowercase().into_boxed_str()).or_default();
            entry.service = entry.service.or(Some(id));
            m.labels.push(Arc::from(service.name.as_str()));
            m.modes.push(service.modes.get(env).copied().unwrap_or(Mode::Off));
            for (index, rule) in (0..).zip(&service.rpc_rules) {
                let (kind, name) = match &rule.pattern {
                    RpcPattern::Method { service, method } => (KIND_METHOD, format!("/{service}/{method}")),
                    RpcPattern::Service(service) => (KIND_SERVICE, format!("/{service}")),
                    RpcPattern::Any => (KIND_ANY, String::new()),
                };
                let key = RuleKey { caller: id, backend: rule.target, kind, name: name.into_boxed_str() };
                m.rules.entry(key).or_insert(index);
            }
            for endpoint in service.endpoints.iter().filter(|e| e.proto.covers(Proto::Tcp)) {
                match &endpoint.destination {
                    Destination::Host(host) if host.wildcard => {
                        m.host_wildcards.push((host.clone(), endpoint.ports, id));
                    }
                    Destination::Host(host) => {
                        m.names.entry(host.domain.as_str().into()).or_default().hosts.push((endpoint.ports, id));
                    }
                    Destination::Net(net) if net.prefix_len() == net.max_prefix_len() => {
                        m.addrs.entry(net.addr()).or_default().push((endpoint.ports, id));
                    }
                    Destination::Net(net) => m.blocks.push((*net, endpoint.ports, id)),
                }
            }
        }
        m.host_wildcards.sort_by_key(|(host, _, _)| std::cmp::Reverse(host.domain.len()));
        m.blocks.sort_by_key(|(net, _, _)| std::cmp::Reverse(net.prefix_len()));
        m
    }

    /// Judges a call from `caller` to RPC `rpc` on the backend named by `authority`
    /// (`host[:port]`).
    pub(crate) fn decide(&self, caller: &str, rpc: &str, authority: &str) -> (Verdict, Mode, Reason) {
        let Some(&caller) = self.callers.get(caller) else {
            return (Verdict::Allowed, Mode::Off, Reason::UnknownCaller);
        };
        let mode = self.modes.get(caller as usize).copied().unwrap_or(Mode::Off);
        let backend = self.resolve_backend(authority);
        if mode == Mode::Off {
            return (Verdict::Allowed, mode, Reason::Off { caller, backend });
        }
        let reason = match backend {
            None => Reason::UnknownBackend { caller },
            Some(backend) => match self.find_rule(caller, backend, rpc) {
                Some(rule) => return (Verdict::Allowed, mode, Reason::Rule { caller, backend, rule }),
                None => Reason::NoRule { caller, backend },
            },
        };
        let verdict = if mode == Mode::Enforce { Verdict::Rejected } else { Verdict::WouldReject };
        (verdict, mode, reason)
    }

    /// The most specific rule of `caller` for `backend` that matches `rpc`: the exact method,
    /// then the service's `*`, then `/*`.
    fn find_rule(&self, caller: ServiceId, backend: ServiceId, rpc: &str) -> Option<u32> {
        if !rpc.starts_with('/') {
            return None;
        }
        let query = |kind, name| RuleQuery { caller, backend, kind, name };
        if let Some(&rule) = self.rules.get(&query(KIND_METHOD, rpc)) {
            return Some(rule);
        }
        if let Some(slash) = rpc.rfind('/')
            && slash > 0
            && slash + 1 < rpc.len()
            && let Some(service) = rpc.get(..slash)
            && let Some(&rule) = self.rules.get(&query(KIND_SERVICE, service))
        {
            return Some(rule);
        }
        self.rules.get(&query(KIND_ANY, "")).copied()
    }

    /// The backend service an authority names; see the module documentation of
    /// [`crate::guard`] for the rules.
    pub(crate) fn resolve_backend(&self, authority: &str) -> Option<ServiceId> {
        let (host, port) = split_authority(authority);
        if host.is_empty() {
            return None;
        }
        // Only an address starts with a digit or holds a `:` (IPv6); a name that starts with a
        // digit fails the parse and is looked up as a name.
        let first = host.as_bytes().first().copied().unwrap_or_default();
        if (first.is_ascii_digit() || first == b':' || host.contains(':'))
            && let Ok(ip) = host.parse::<IpAddr>()
        {
            return self.resolve_ip(ip.to_canonical(), port);
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            let mut buffer = [0u8; 256];
            let lower = lowercase(host, &mut buffer)?;
            return self.resolve_name(lower, port);
        }
        self.resolve_name(host, port)
    }

    /// As [`Matcher::resolve_backend`], for a lowercase host name.
    fn resolve_name(&self, host: &str, port: Option<u16>) -> Option<ServiceId> {
        let entry = self.names.get(host);
        if let Some(id) = entry.and_then(|e| pick(&e.hosts, port)) {
            return Some(id);
        }
        for (pattern, ports, id) in &self.host_wildcards {
            if pattern.matches(host) && port.is_none_or(|p| ports.contains(p)) {
                return Some(*id);
            }
        }
        // A service name, or a service name followed by a domain: the longest such prefix.
        if let Some(id) = entry.and_then(|e| e.service) {
            return Some(id);
        }
        let mut candidate = host;
        loop {
            let dot = candidate.bytes().rposition(|b| b == b'.')?;
            candidate = candidate.get(..dot)?;
            if let Some(id) = self.names.get(candidate).and_then(|e| e.service) {
                return Some(id);
            }
        }
    }

    fn resolve_ip(&self, ip: IpAddr, port: Option<u16>) -> Option<ServiceId> {
        if let Some(owners) = self.addrs.get(&ip)
            && let Some(id) = pick(owners, port)
        {
            return Some(id);
        }
        self.blocks
            .iter()
            .find(|(net, ports, _)| net.contains(&ip) && port.is_none_or(|p| ports.contains(p)))
            .map(|&(_, _, id)| id)
    }
}

/// The owner whose ports hold `port` (any owner when the authority has no port).
fn pick(owners: &Owners, port: Option<u16>) -> Option<ServiceId> {
    owners.iter().find(|(ports, _)| port.is_none_or(|p| ports.contains(p))).map(|&(_, id)| id)
}

/// `host` in lowercase, copied into `buffer`. None when it is longer than any host name can be.
fn lowercase<'a>(host: &str, buffer: &'a mut [u8; 256]) -> Option<&'a str> {
    let copy = buffer.get_mut(..host.len())?;
    copy.copy_from_slice(host.as_bytes());
    copy.make_ascii_lowercase();
    std::str::from_utf8(copy).ok()
}

/// Splits `[userinfo@]host[:port]` (IPv6 in brackets). A port that is not a number counts as
/// absent.
pub(crate) fn split_authority(authority: &str) -> (&str, Option<u16>) {
    // One pass over the bytes (authorities are short): the last `@`, the last `:` and how many
    // `:` follow the `@`.
    let (mut at, mut colon, mut colons) = (None, None, 0u32);
    for (i, b) in authority.bytes().enumerate() {
        match b {
            b'@' => (at, colon, colons) = (Some(i), None, 0),
            b':' => (colon, colons) = (Some(i), colons + 1),
            _ => {}
        }
    }
    let start = at.map_or(0, |i| i + 1);
    let authority = authority.get(start..).unwrap_or_default();
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':').and_then(parse_port)),
            None => (authority, None),
        };
    }
    match colon {
        Some(i) if colons == 1 => {
            let i = i - start;
            (authority.get(..i).unwrap_or_default(), authority.get(i + 1..).and_then(parse_port))
        }
        _ => (authority, None),
    }
}

/// A decimal port, without the generic integer parser.
fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 5 {
        return None;
    }
    let mut port = 0u32;
    for b in text.bytes() {
        if !b.is_ascii_digit() {
            return None;
        }
        port = port * 10 + u32::from(b - b'0');
    }
    u16::try_from(port).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

    use super::*;
    use crate::compile::compile_str;

    const POLICY: &str = r#"
version = 1
[environments]
prod = "audit"
qa = "enforce"
[services.billing]
endpoints = [{ ip = "10.0.0.5", ports = [50051] }, { host = "pay.example.com", ports = [443] }]
[services.ledger]
endpoints = [{ cidr = "10.1.0.0/16", ports = [7000] }, { host = "*.ledger.internal" }]
[services."billing.v2"]
[services.checkout]
allow = [{ service = "billing" }, { service = "ledger" }, { service = "billing.v2" }]
rpc_allow = [
  { service = "billing", rpcs = ["/billing.Billing/Charge", "/billing.Admin/*"] },
  { service = "ledger", rpcs = ["/*"] },
  { service = "billing.v2", rpcs = ["/billing.Billing/Charge"] },
]
[services.reports]
mode = "off"
"#;

    fn matcher(env: &str) -> (Snapshot, Matcher) {
        let compiled = compile_str("p.toml", POLICY).unwrap_or_else(|(_, d)| panic!("{d:?}"));
        let snapshot = compiled.snapshot;
        let env = snapshot.environment_index(env).unwrap();
        let m = Matcher::new(&snapshot, env);
        (snapshot, m)
    }

    fn name(s: &Snapshot, id: Option<ServiceId>) -> Option<&str> {
        id.map(|id| s.services()[id as usize].name.as_str())
    }

    #[test]
    fn authorities_resolve_to_services() {
        let (s, m) = matcher("prod");
        let cases = [
            ("billing", Some("billing")),
            ("billing:50051", Some("billing")),
            ("BILLING.prod.svc.cluster.local:80", Some("billing")),
            ("billing.v2:80", Some("billing.v2")),
            ("billing.v2.prod.svc", Some("billing.v2")),
            ("billingx", None),
            ("10.0.0.5:50051", Some("billing")),
            ("10.0.0.5", Some("billing")),
            ("10.0.0.5:50052", None),
            ("[::ffff:10.0.0.5]:50051", Some("billing")),
            ("user@10.0.0.5:50051", Some("billing")),
            ("10.1.200.3:7000", Some("ledger")),
            ("10.1.200.3:7001", None),
            ("pay.example.com:443", Some("billing")),
            ("Pay.Example.COM.", Some("billing")),
            ("pay.example.com:444", None),
            ("a.ledger.internal:9", Some("ledger")),
            ("ledgerx.internal", None),
            // The name rule: a service name followed by any domain.
            ("ledger.internal.example", Some("ledger")),
            ("", None),
            (":80", None),
        ];
        for (authority, expected) in cases {
            assert_eq!(name(&s, m.resolve_backend(authority)), expected, "{authority}");
        }
        let long = "a".repeat(300);
        assert_eq!(m.resolve_backend(&long.to_uppercase()), None);
    }

    #[test]
    fn most_specific_rule_wins_and_modes_apply() {
        let (s, m) = matcher("qa");
        let rule_text = |reason: Reason| match reason {
            Reason::Rule { caller, rule, .. } => {
                s.services()[caller as usize].rpc_rules[rule as usize].pattern.to_string()
            }
            other => format!("{other:?}"),
        };
        let (v, mode, r) = m.decide("checkout", "/billing.Billing/Charge", "billing:50051");
        assert_eq!((v, mode, rule_text(r).as_str()), (Verdict::Allowed, Mode::Enforce, "/billing.Billing/Charge"));
        let (v, _, r) = m.decide("checkout", "/billing.Admin/Refund", "billing");
        assert_eq!((v, rule_text(r).as_str()), (Verdict::Allowed, "/billing.Admin/*"));
        let (v, _, r) = m.decide("checkout", "/billing.Billing/Refund", "billing");
        assert_eq!(v, Verdict::Rejected);
        assert!(matches!(r, Reason::NoRule { .. }), "{r:?}");
        // `/billing.Admin/*` needs a method; paths with more parts match only `/*`.
        assert_eq!(m.decide("checkout", "/billing.Admin/", "billing").0, Verdict::Rejected);
        assert_eq!(m.decide("checkout", "/billing.Admin/x/y", "billing").0, Verdict::Rejected);
        assert_eq!(m.decide("checkout", "/a/b/c", "ledger").0, Verdict::Allowed);
        assert_eq!(m.decide("checkout", "no-slash", "ledger").0, Verdict::Rejected);
        // Rules are per backend: Charge on billing.v2 is allowed, Admin on billing.v2 is not.
        assert_eq!(m.decide("checkout", "/billing.Billing/Charge", "billing.v2").0, Verdict::Allowed);
        assert_eq!(m.decide("checkout", "/billing.Admin/X", "billing.v2").0, Verdict::Rejected);
        // Case matters in rpc names.
        assert_eq!(m.decide("checkout", "/billing.billing/Charge", "billing").0, Verdict::Rejected);
        let (v, _, r) = m.decide("checkout", "/x.Y/Z", "unknown-host:80");
        assert_eq!((v, r), (Verdict::Rejected, Reason::UnknownBackend { caller: r.caller().unwrap() }));
        assert_eq!(m.decide("nobody", "/x.Y/Z", "billing").2, Reason::UnknownCaller);
        assert_eq!(m.decide("nobody", "/x.Y/Z", "billing").0, Verdict::Allowed);
        let (v, mode, r) = m.decide("reports", "/x.Y/Z", "billing");
        assert_eq!((v, mode), (Verdict::Allowed, Mode::Off));
        assert_eq!(name(&s, r.backend()), Some("billing"));

        let (_, audit) = matcher("prod");
        assert_eq!(audit.decide("checkout", "/billing.Billing/Refund", "billing").0, Verdict::WouldReject);
        assert_eq!(audit.decide("checkout", "/billing.Billing/Charge", "billing").0, Verdict::Allowed);
    }

    /// The index agrees with the plain definition (`RpcPattern::matches` over every rule).
    #[test]
    fn index_agrees_with_linear_matching() {
        let (s, m) = matcher("qa");
        let (caller, checkout) = s.service("checkout").unwrap();
        let paths = [
            "/billing.Billing/Charge",
            "/billing.Billing/Charg",
            "/billing.Billing/ChargeX",
            "/billing.Admin/Anything",
            "/billing.Admin/",
            "/billing.Admin",
            "/billing.AdminX/Y",
            "//",
            "/",
            "",
            "/x/y/z",
            "billing.Billing/Charge",
        ];
        for backend in ["billing", "ledger", "billing.v2"] {
            let (backend_id, _) = s.service(backend).unwrap();
            for path in paths {
                let linear = checkout.rpc_rules.iter().any(|r| r.target == backend_id && r.pattern.matches(path));
                let indexed = m.find_rule(caller, backend_id, path).is_some();
                assert_eq!(indexed, linear, "{backend} {path}");
            }
        }
    }

    #[test]
    fn authority_split() {
        assert_eq!(split_authority("a:1"), ("a", Some(1)));
        assert_eq!(split_authority("a"), ("a", None));
        assert_eq!(split_authority("[::1]:8080"), ("::1", Some(8080)));
        assert_eq!(split_authority("::1"), ("::1", None));
        assert_eq!(split_authority("a:http"), ("a", None));
        assert_eq!(split_authority("u:p@a:2"), ("a", Some(2)));
        assert_eq!(split_authority("u@[::1]"), ("::1", None));
        assert_eq!(split_authority("a:65536"), ("a", None));
        assert_eq!(split_authority("a:"), ("a", None));
        assert_eq!(split_authority("a:+1"), ("a", None));
        assert_eq!(split_authority(""), ("", None));
    }
}
