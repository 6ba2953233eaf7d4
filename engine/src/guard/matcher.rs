//! The pure decision: one compiled snapshot, one environment, and a call (caller service, RPC
//! name, backend authority) give a verdict and the reason for it. Built once per snapshot;
//! judging a call allocates nothing and does a fixed number of hash lookups, whatever the number
//! of rules.
//!
//! The rules are keyed by names, not ids: (backend, caller, RPC path) for an exact method and
//! (backend, caller) for everything else the caller may call on the backend. The backend's
//! name in a key is its *key name*, its lowercase name. So the common call, whose authority is
//! `name` or `name:port`, is judged from the strings it comes with: one lookup when a method
//! pattern allows it, two otherwise. A call's strings are hashed once for both lookups (the
//! pair's hash is the first half of the method's). Any other authority (an IP address, a
//! cluster name, a `host` endpoint, capitals) is first resolved to its backend, and then judged
//! the same way with the backend's key name.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use hashbrown::{HashMap, HashTable};

use crate::policy::{Destination, HostPattern, Mode, PortRange, Proto, RpcPattern};
use crate::snapshot::{Owners, ServiceId, Snapshot};
use crate::verdict::Verdict;

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

/// A caller as a rule knows it: its id and its mode in the environment.
#[derive(Debug, Clone, Copy)]
struct Caller {
    id: ServiceId,
    mode: Mode,
}

/// A rule's key: the backend's key name, the caller's name as written and, for an exact
/// method, the whole path `/pkg.Service/Method`, in one string.
#[derive(Debug)]
struct RuleKey {
    text: Box<str>,
    backend_len: usize,
    caller_len: usize,
}

impl RuleKey {
    fn new(backend: &str, caller: &str, rpc: &str) -> RuleKey {
        RuleKey { text: [backend, caller, rpc].concat().into(), backend_len: backend.len(), caller_len: caller.len() }
    }

    /// Whether this is the key of `(backend, caller, rpc)`.
    #[inline(always)]
    fn is(&self, backend: &str, caller: &str, rpc: &str) -> bool {
        // Bytes, not `str` ranges: no char-boundary checks.
        let text = self.text.as_bytes();
        self.backend_len == backend.len()
            && self.caller_len == caller.len()
            && text.len() == backend.len() + caller.len() + rpc.len()
            && text.split_at_checked(backend.len()).is_some_and(|(b, rest)| {
                rest.split_at_checked(caller.len())
                    .is_some_and(|(c, r)| r == rpc.as_bytes() && b == backend.as_bytes() && c == caller.as_bytes())
            })
    }
}

/// The hashes of a call's rule keys, from one pass over its strings.
#[derive(Clone, Copy)]
struct KeyHashes {
    /// Of (backend, caller).
    pair: u64,
    /// Of (backend, caller, RPC path).
    method: u64,
}

/// An exact-method rule.
#[derive(Debug)]
struct MethodRule {
    /// The key's hash, kept for the table's growth while it is built.
    hash: u64,
    key: RuleKey,
    caller: Caller,
    backend: ServiceId,
    rule: u32,
}

/// What a caller may call on a backend besides exact methods, consulted when the method misses.
#[derive(Debug)]
struct PairRules {
    /// As [`MethodRule::hash`].
    hash: u64,
    /// The key, with an empty RPC path.
    key: RuleKey,
    caller: Caller,
    backend: ServiceId,
    /// `/pkg.Service/*` rules as (`/pkg.Service`, rule), sorted by [`by_length`]: a search
    /// compares the bytes of names of the same length only.
    services: Vec<(Box<str>, u32)>,
    /// The `/*` rule.
    any: Option<u32>,
}

impl PairRules {
    /// The `/pkg.Service/*` rule of `service` (`/pkg.Service`). A backend has a few gRPC
    /// services: up to [`LINEAR_SEARCH_MAX`] rules are scanned, comparing bytes only when the
    /// lengths are equal; longer lists are searched by halves.
    #[inline(always)]
    fn service_rule(&self, service: &[u8]) -> Option<u32> {
        if self.services.len() <= LINEAR_SEARCH_MAX {
            // A plain loop: `Iterator::find` here was a call, not inlined.
            for (name, rule) in &self.services {
                if name.len() == service.len() && name.as_bytes() == service {
                    return Some(*rule);
                }
            }
            return None;
        }
        let index = self.services.binary_search_by(|(name, _)| by_length(name.as_bytes(), service)).ok()?;
        self.services.get(index).map(|&(_, rule)| rule)
    }

    /// The rule other than an exact method that allows `rpc`: its service's `*`, then `/*`.
    #[inline(always)]
    fn find(&self, rpc: &str) -> Option<u32> {
        if !rpc.starts_with('/') {
            return None;
        }
        // The service is what precedes the last `/` (method names are short: search backwards).
        if !self.services.is_empty()
            && let Some(slash) = rpc.bytes().rposition(|b| b == b'/')
            && slash > 0
            && slash + 1 < rpc.len()
            && let Some(service) = rpc.as_bytes().get(..slash)
            && let Some(rule) = self.service_rule(service)
        {
            return Some(rule);
        }
        self.any
    }
}

/// How many `/pkg.Service/*` rules of a pair are searched one by one.
const LINEAR_SEARCH_MAX: usize = 8;

/// Orders by length, then by bytes.
fn by_length(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// `host` endpoints that share a name: (ports, service).
type HostOwners = Vec<(PortRange, ServiceId)>;

/// What a lowercase host name can name: services that declare it as a `host` endpoint, and the
/// service of that name. One map holds both, so a name costs one lookup.
#[derive(Debug, Default)]
struct NameEntry {
    hosts: HostOwners,
    service: Option<ServiceId>,
}

/// The index of one snapshot for one environment.
#[derive(Debug)]
pub(crate) struct Matcher {
    /// Service names as written → id and mode (callers).
    callers: HashMap<Box<str>, Caller>,
    /// Lowercase host names of `host` endpoints, and lowercase service names (authorities).
    names: HashMap<Box<str>, NameEntry>,
    /// Service names, shared for metric labels.
    pub(crate) labels: Vec<Arc<str>>,
    /// Each backend's key name in the rule maps: its lowercase name, or `#id` when another
    /// service's name differs from it only in case.
    backend_keys: Vec<Box<str>>,
    /// Per backend: an authority whose host is the backend's key name names it, on any port (no
    /// `host` endpoint is that name). Only then may a call be judged from its host as written.
    by_name: Vec<bool>,
    /// Hashes the rule keys, written as their parts in turn (see [`Matcher::key_hashes`]).
    hasher: foldhash::fast::RandomState,
    methods: HashTable<MethodRule>,
    pairs: HashTable<PairRules>,
    /// Wildcard host endpoints, longest domain first.
    host_wildcards: Vec<(HostPattern, PortRange, ServiceId)>,
    /// Which service owns an address: the snapshot's index of its endpoints.
    owners: Owners,
    /// The authorities that name a single-address endpoint on one of its few ports, as a client
    /// writes them (`10.0.0.5:50051`, `[fd00::5]:50051`, or without the port), → the service
    /// [`Owners`] says owns them: its answer remembered, so such a call costs one lookup of its
    /// authority instead of a split, an address lookup and a port match.
    ip_authorities: HashMap<Box<str>, ServiceId>,
}

/// The widest port range of an endpoint whose authorities are remembered one by one.
const REMEMBERED_PORTS: u32 = 64;

impl Matcher {
    /// Indexes `snapshot` for the environment at index `env`.
    pub(crate) fn new(snapshot: &Snapshot, env: usize) -> Matcher {
        let services = snapshot.services();
        let mut m = Matcher {
            callers: HashMap::with_capacity(services.len()),
            names: HashMap::with_capacity(services.len()),
            labels: services.iter().map(|s| Arc::from(s.name.as_str())).collect(),
            backend_keys: Vec::with_capacity(services.len()),
            by_name: Vec::with_capacity(services.len()),
            hasher: foldhash::fast::RandomState::default(),
            methods: HashTable::with_capacity(snapshot.rpc_rule_count()),
            pairs: HashTable::new(),
            host_wildcards: Vec::new(),
            owners: snapshot.owners(env).clone(),
            ip_authorities: HashMap::default(),
        };
        // Names and endpoints first: which backend a name reaches decides the rules' keys.
        for (id, service) in (0..).zip(services) {
            let mode = service.mode(env);
            m.callers.insert(service.name.as_str().into(), Caller { id, mode });
            let entry = m.names.entry(service.name.to_ascii_lowercase().into_boxed_str()).or_default();
            entry.service = entry.service.or(Some(id));
            for endpoint in service.rules(env).endpoints.iter().filter(|e| e.proto.covers(Proto::Tcp)) {
                match &endpoint.destination {
                    Destination::Host(host) if host.wildcard => {
                        m.host_wildcards.push((host.clone(), endpoint.ports, id));
                    }
                    Destination::Host(host) => {
                        m.names.entry(host.domain.as_str().into()).or_default().hosts.push((endpoint.ports, id));
                    }
                    // Addresses are the snapshot's index's.
                    Destination::Net(_) => {}
                }
            }
        }
        m.host_wildcards.sort_by_key(|(host, _, _)| std::cmp::Reverse(host.domain.len()));
        m.remember_ip_authorities(snapshot, env);
        for (id, service) in (0..).zip(services) {
            let lower = service.name.to_ascii_lowercase();
            let entry = m.names.get(lower.as_str());
            let own = entry.is_some_and(|e| e.service == Some(id));
            let by_name = own
                && entry.is_some_and(|e| e.hosts.is_empty())
                && !m.host_wildcards.iter().any(|(pattern, _, _)| pattern.matches(&lower));
            m.by_name.push(by_name);
            m.backend_keys.push(if own { lower } else { format!("#{id}") }.into_boxed_str());
        }
        for (id, service) in (0..).zip(services) {
            let caller = Caller { id, mode: service.mode(env) };
            for (index, rule) in (0..).zip(&service.rpc_rules) {
                let Some(backend) = m.backend_keys.get(rule.target as usize).cloned() else { continue };
                let name = service.name.as_str();
                // Every rule's pair has an entry: a call no method rule allows is judged by it.
                let pair = m.pair_entry(&backend, name, caller, rule.target);
                // The first of equal patterns wins (the compiler merges duplicates anyway).
                match &rule.pattern {
                    RpcPattern::Method { service: rpc_service, method } => {
                        let rpc = format!("/{rpc_service}/{method}");
                        let hash = m.key_hashes(&backend, name, &rpc).method;
                        m.methods.entry(hash, |r| r.key.is(&backend, name, &rpc), |r| r.hash).or_insert_with(|| {
                            let key = RuleKey::new(&backend, name, &rpc);
                            MethodRule { hash, key, caller, backend: rule.target, rule: index }
                        });
                    }
                    RpcPattern::Service(rpc_service) => {
                        let name: Box<str> = format!("/{rpc_service}").into();
                        if let Err(at) =
                            pair.services.binary_search_by(|(s, _)| by_length(s.as_bytes(), name.as_bytes()))
                        {
                            pair.services.insert(at, (name, index));
                        }
                    }
                    RpcPattern::Any => pair.any = pair.any.or(Some(index)),
                }
            }
        }
        m
    }

    /// Fills [`Matcher::ip_authorities`] from the single-address endpoints with at most
    /// [`REMEMBERED_PORTS`] ports, each answer [`Owners::owner_of_text`]'s.
    fn remember_ip_authorities(&mut self, snapshot: &Snapshot, env: usize) {
        for service in snapshot.services() {
            for endpoint in service.rules(env).endpoints.iter().filter(|e| e.proto.covers(Proto::Tcp)) {
                let Destination::Net(net) = &endpoint.destination else { continue };
                let ports = endpoint.ports;
                if net.prefix_len() != net.max_prefix_len()
                    || ports.is_any()
                    // An inverted range (a decoded snapshot may hold one) holds no port.
                    || ports.last.checked_sub(ports.first).is_none_or(|width| u32::from(width) >= REMEMBERED_PORTS)
                {
                    continue;
                }
                let text = net.addr().to_string();
                let host = if net.addr().is_ipv6() { format!("[{text}]") } else { text.clone() };
                let authorities = (ports.first..=ports.last)
                    .map(|port| (format!("{host}:{port}"), Some(port)))
                    .chain([(host.clone(), None)]);
                for (authority, port) in authorities {
                    if let Some(owner) = self.owners.owner_of_text(&text, port, Proto::Tcp) {
                        self.ip_authorities.insert(authority.into_boxed_str(), owner);
                    }
                }
            }
        }
    }

    /// The hashes of the rule keys for (backend, caller, RPC path): the parts are written in
    /// turn, so the pair's hash is the hasher's state after the first two.
    #[inline(always)]
    fn key_hashes(&self, backend: &str, caller: &str, rpc: &str) -> KeyHashes {
        let mut hasher = self.hasher.build_hasher();
        hasher.write(backend.as_bytes());
        hasher.write(caller.as_bytes());
        let pair = hasher.finish();
        hasher.write(rpc.as_bytes());
        KeyHashes { pair, method: hasher.finish() }
    }

    /// The entry of (backend, caller), made empty if it is new.
    fn pair_entry(&mut self, backend: &str, caller_name: &str, caller: Caller, id: ServiceId) -> &mut PairRules {
        let hash = self.key_hashes(backend, caller_name, "").pair;
        self.pairs
            .entry(hash, |p| p.key.is(backend, caller_name, ""), |p| p.hash)
            .or_insert_with(|| PairRules {
                hash,
                key: RuleKey::new(backend, caller_name, ""),
                caller,
                backend: id,
                services: Vec::new(),
                any: None,
            })
            .into_mut()
    }

    /// Judges a call from `caller` to RPC `rpc` on the backend named by `authority`
    /// (`host[:port]`).
    ///
    /// Inlined, so that the verdict is built in place rather than passed back through memory.
    #[inline]
    pub(crate) fn decide(&self, caller: &str, rpc: &str, authority: &str) -> (Verdict, Mode, Reason) {
        // The common call: the host is the backend's key name.
        let host = host_as_written(authority);
        match host.and_then(|host| self.judge(host, caller, rpc, true)) {
            Some(judged) => judged,
            None => self.decide_resolved(caller, rpc, authority, host),
        }
    }

    /// [`Matcher::decide`] for a call the host as written does not decide: resolves the
    /// authority to its backend first.
    #[inline(never)]
    fn decide_resolved(&self, caller: &str, rpc: &str, authority: &str, host: Option<&str>) -> (Verdict, Mode, Reason) {
        let backend = self.backend_of(authority);
        if let Some(id) = backend
            && let Some(key) = self.backend_keys.get(id as usize)
            // Judged above already when the host is that key name and names the backend.
            && !(host == Some(&**key) && self.by_name(id))
            && let Some(judged) = self.judge(key, caller, rpc, false)
        {
            return judged;
        }
        // The caller has no rule for the backend: the verdict needs its mode.
        match self.callers.get(caller) {
            Some(&caller) => verdict(caller, backend, None),
            None => (Verdict::Allowed, Mode::Off, Reason::UnknownCaller),
        }
    }

    /// Judges a call by the rules of `caller` for the backend whose key name is `backend`; None
    /// when the caller has no rule for it. With `as_written`, `backend` is the authority's host
    /// as written, and the rules count only for a backend that name reaches on any port.
    #[inline(always)]
    fn judge(&self, backend: &str, caller: &str, rpc: &str, as_written: bool) -> Option<(Verdict, Mode, Reason)> {
        let hashes = self.key_hashes(backend, caller, rpc);
        if let Some(method) = self.methods.find(hashes.method, |r| r.key.is(backend, caller, rpc))
            && (!as_written || self.by_name(method.backend))
        {
            return Some(verdict(method.caller, Some(method.backend), Some(method.rule)));
        }
        let pair = self.pairs.find(hashes.pair, |p| p.key.is(backend, caller, ""))?;
        if as_written && !self.by_name(pair.backend) {
            return None;
        }
        Some(verdict(pair.caller, Some(pair.backend), pair.find(rpc)))
    }

    fn by_name(&self, backend: ServiceId) -> bool {
        self.by_name.get(backend as usize).copied().unwrap_or(false)
    }

    /// The rule of `caller` that allows `rpc` on `backend`, by the index (for tests).
    #[cfg(test)]
    fn find_rule(&self, caller: &str, backend: ServiceId, rpc: &str) -> Option<u32> {
        let key = self.backend_keys.get(backend as usize)?;
        match self.judge(key, caller, rpc, false)?.2 {
            Reason::Rule { rule, .. } => Some(rule),
            _ => None,
        }
    }

    /// The backend service an authority names: remembered for an endpoint's address, else
    /// [`Matcher::resolve_backend`].
    #[inline]
    fn backend_of(&self, authority: &str) -> Option<ServiceId> {
        let remembered = match authority.as_bytes().first() {
            Some(b'0'..=b'9' | b'[') => self.ip_authorities.get(authority).copied(),
            _ => None,
        };
        remembered.or_else(|| self.resolve_backend(authority))
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
        if first.is_ascii_digit() || host.contains(':') {
            // An address is owned by the service whose endpoint holds it (the snapshot's index
            // finds the canonical text without parsing).
            if let Some(id) = self.owners.owner_of_text(host, port, Proto::Tcp) {
                return Some(id);
            }
            if host.parse::<IpAddr>().is_ok() {
                return None;
            }
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            let mut buffer = [0u8; 256];
            let lower = lowercase(host, &mut buffer)?;
            return self.resolve_name(lower, port);
        }
        self.resolve_name(host, port)
    }

    /// As [`Matcher::resolve_backend`], for a lowercase host name without a final dot.
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
        if let Some(id) = entry.and_then(|e| e.service) {
            return Some(id);
        }
        let name = cluster_service_name(host)?;
        self.names.get(name).and_then(|e| e.service)
    }
}

/// The verdict for a call of `caller` to `backend` (None: the authority names no service) that
/// `rule` allows (None: no rule does).
fn verdict(caller: Caller, backend: Option<ServiceId>, rule: Option<u32>) -> (Verdict, Mode, Reason) {
    let Caller { id: caller, mode } = caller;
    let reason = match (mode, backend, rule) {
        (Mode::Off, _, _) => Reason::Off { caller, backend },
        (_, None, _) => Reason::UnknownBackend { caller },
        (_, Some(backend), None) => Reason::NoRule { caller, backend },
        (_, Some(backend), Some(rule)) => Reason::Rule { caller, backend, rule },
    };
    (crate::verdict::decide(mode, backend.is_some() && rule.is_some()), mode, reason)
}

/// The host of `host[:digits]`, without a final dot, as written: the key the common call's
/// rules are found by. For an authority whose host is a key name (a lowercase name: letters,
/// digits, `-`, `_`, `.`; no `@`, `[` or `:`) this is the host [`split_authority`] finds.
/// Anything else finds no rule by it and is resolved in full. None when the authority does not
/// start with a letter, as a name does (IP addresses).
#[inline]
fn host_as_written(authority: &str) -> Option<&str> {
    if !authority.as_bytes().first()?.is_ascii_alphabetic() {
        return None;
    }
    let digits = authority.bytes().rev().take_while(u8::is_ascii_digit).count();
    let host = match authority.len().checked_sub(digits + 1).and_then(|colon| authority.split_at_checked(colon)) {
        Some((host, port)) if port.starts_with(':') => host,
        _ => authority,
    };
    Some(host.strip_suffix('.').unwrap_or(host))
}

/// The suffixes of a Kubernetes service's cluster names, longest first.
const CLUSTER_SUFFIXES: [&str; 2] = [".svc.cluster.local", ".svc"];

/// The service of a Kubernetes cluster name, `name.namespace.svc[.cluster.local]` with a
/// namespace of one label.
fn cluster_service_name(host: &str) -> Option<&str> {
    let rest = CLUSTER_SUFFIXES.iter().find_map(|suffix| host.strip_suffix(suffix))?;
    let (name, namespace) = rest.rsplit_once('.')?;
    (!name.is_empty() && !namespace.is_empty()).then_some(name)
}

/// The owner whose ports hold `port` (any owner when the authority has no port).
fn pick(owners: &HostOwners, port: Option<u16>) -> Option<ServiceId> {
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
endpoints = [{ ip = "fd00::5", ports = [8443] }, { ip = "::ffff:10.2.0.1", ports = [8443] }]
# `audit-log` on port 9 is this service's, on any other port the service `audit-log`.
[services.shadow]
endpoints = [{ host = "audit-log", ports = [9] }]
[services.audit-log]
# Two names that differ only in case.
[services.Vault]
[services.vault]
[services.checkout]
allow = [{ service = "billing" }, { service = "ledger" }, { service = "billing.v2" }, { service = "shadow" }, { service = "audit-log" }, { service = "Vault" }, { service = "vault" }]
rpc_allow = [
  { service = "billing", rpcs = ["/billing.Billing/Charge", "/billing.Admin/*"] },
  { service = "ledger", rpcs = ["/*", "/ledger.Ledger/Get"] },
  { service = "billing.v2", rpcs = ["/billing.Billing/Charge"] },
  { service = "shadow", rpcs = ["/shadow.S/*"] },
  { service = "audit-log", rpcs = ["/log.Log/Write"] },
  { service = "Vault", rpcs = ["/vault.Vault/Open"] },
  { service = "vault", rpcs = ["/vault.Vault/Seal"] },
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
            // Any spelling of an endpoint's address.
            ("[fd00::5]:8443", Some("billing.v2")),
            ("[fd00:0::5]:8443", Some("billing.v2")),
            ("[FD00::5]:8443", Some("billing.v2")),
            ("[fd00::5]:8444", None),
            ("10.2.0.1:8443", Some("billing.v2")),
            ("[::ffff:10.2.0.1]:8443", Some("billing.v2")),
            ("user@10.0.0.5:50051", Some("billing")),
            ("10.1.200.3:7000", Some("ledger")),
            ("10.1.200.3:7001", None),
            ("pay.example.com:443", Some("billing")),
            ("Pay.Example.COM.", Some("billing")),
            ("pay.example.com:444", None),
            ("a.ledger.internal:9", Some("ledger")),
            ("ledgerx.internal", None),
            // A service name followed by a domain names the service only as a cluster name.
            ("ledger.internal.example", None),
            ("billing.com", None),
            ("billing.prod", None),
            ("billing.prod.svc", Some("billing")),
            ("billing.prod.svc.cluster.local.:50051", Some("billing")),
            ("billing.a.b.svc", None),
            (".prod.svc", None),
            ("", None),
            (":80", None),
        ];
        for (authority, expected) in cases {
            assert_eq!(name(&s, m.resolve_backend(authority)), expected, "{authority}");
            assert_eq!(name(&s, m.backend_of(authority)), expected, "remembered: {authority}");
        }
        // What is remembered is what the resolution says.
        assert!(m.ip_authorities.len() >= 4, "{:?}", m.ip_authorities);
        for (authority, id) in &m.ip_authorities {
            assert_eq!(m.resolve_backend(authority), Some(*id), "{authority}");
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
        // A method of a service the caller has a method rule for: that rule, else `/*`.
        let (v, _, r) = m.decide("checkout", "/ledger.Ledger/Get", "ledger");
        assert_eq!((v, rule_text(r).as_str()), (Verdict::Allowed, "/ledger.Ledger/Get"));
        let (v, _, r) = m.decide("checkout", "/ledger.Ledger/Put", "ledger");
        assert_eq!((v, rule_text(r).as_str()), (Verdict::Allowed, "/*"));
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
        let (_, checkout) = s.service("checkout").unwrap();
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
                let indexed = m.find_rule("checkout", backend_id, path).is_some();
                assert_eq!(indexed, linear, "{backend} {path}");
            }
        }
    }

    /// Past `LINEAR_SEARCH_MAX` service wildcards for one backend the search is by halves;
    /// every listed service, of any length, is found, and only those.
    #[test]
    fn many_service_wildcards_are_searched_by_halves() {
        let services: Vec<String> =
            (0..3 * LINEAR_SEARCH_MAX).map(|i| format!("p{i}.{}", "S".repeat(i % 5 + 1))).collect();
        let rpcs: Vec<String> = services.iter().map(|s| format!("\"/{s}/*\"")).collect();
        let policy = format!(
            "version = 1\n[environments]\nqa = \"enforce\"\n[services.api]\n[services.web]\nallow = [{{ service = \"api\" }}]\nrpc_allow = [{{ service = \"api\", rpcs = [{}] }}]\n",
            rpcs.join(", ")
        );
        let snapshot = compile_str("p.toml", &policy).unwrap_or_else(|(_, d)| panic!("{d:?}")).snapshot;
        let m = Matcher::new(&snapshot, 0);
        for service in &services {
            assert_eq!(m.decide("web", &format!("/{service}/Get"), "api").0, Verdict::Allowed, "{service}");
            assert_eq!(m.decide("web", &format!("/{service}x/Get"), "api").0, Verdict::Rejected, "{service}x");
        }
        assert_eq!(m.decide("web", "/p0.SS/Get", "api").0, Verdict::Rejected);
    }

    /// Whatever the authority, `decide` (the host as written first, resolution after) agrees
    /// with the definition: resolve the authority, then any rule of the caller for that backend
    /// whose pattern matches the RPC.
    #[test]
    fn decisions_agree_with_the_definition() {
        use proptest::prelude::*;
        use proptest::sample::select;

        let (s, m) = matcher("qa");
        let env = s.environment_index("qa").unwrap();
        let reference = |caller: &str, rpc: &str, authority: &str| {
            let Some((id, service)) = s.service(caller) else { return (Verdict::Allowed, Mode::Off, None, None) };
            let mode = service.modes[env];
            let backend = m.resolve_backend(authority);
            let allowed = mode == Mode::Off
                || backend.is_some_and(|b| service.rpc_rules.iter().any(|r| r.target == b && r.pattern.matches(rpc)));
            let verdict = match (allowed, mode) {
                (true, _) => Verdict::Allowed,
                (false, Mode::Enforce) => Verdict::Rejected,
                (false, _) => Verdict::WouldReject,
            };
            (verdict, mode, Some(id), backend)
        };
        let hosts = [
            "billing",
            "Billing",
            "BILLING",
            "billing.v2",
            "billing.v2.ns.svc",
            "ledger",
            "Ledger",
            "shadow",
            "audit-log",
            "Audit-Log",
            "vault",
            "Vault",
            "VAULT",
            "checkout",
            "reports",
            "billing.prod.svc",
            "billing.prod.svc.cluster.local",
            "billing.evil.com",
            "pay.example.com",
            "x.ledger.internal",
            "10.0.0.5",
            "10.1.2.3",
            "[::ffff:10.0.0.5]",
            "[::1]",
            "[fd00::5]",
            "[fd00:0::5]",
            "10.2.0.1",
            "nowhere",
            "b",
            "",
        ];
        let strategy = (
            select(vec!["checkout", "reports", "billing", "nobody", "Checkout"]),
            select(vec![
                "/billing.Billing/Charge",
                "/billing.Admin/Refund",
                "/billing.Admin/",
                "/shadow.S/Get",
                "/vault.Vault/Open",
                "/ledger.Ledger/Get",
                "/ledger.Ledger/Put",
                "/vault.Vault/Seal",
                "/x.Y/Z",
                "/",
                "",
                "nope",
            ]),
            (select(vec!["", "user@", "u:p@"]), select(hosts.to_vec()), select(vec!["", "."])),
            select(vec!["", ":", ":9", ":443", ":7000", ":8443", ":50051", ":99999", ":x", ":9:9"]),
        );
        proptest!(ProptestConfig::with_cases(4000), |((caller, rpc, (user, host, dot), port) in strategy)| {
            let authority = format!("{user}{host}{dot}{port}");
            let (verdict, mode, reason) = m.decide(caller, rpc, &authority);
            let got = (verdict, mode, reason.caller(), reason.backend());
            prop_assert_eq!(got, reference(caller, rpc, &authority), "{} {} {}", caller, rpc, authority);
        });
        // The cases the fast path must leave to resolution.
        assert_eq!(name(&s, m.decide("checkout", "/shadow.S/Get", "audit-log:9").2.backend()), Some("shadow"));
        assert_eq!(m.decide("checkout", "/shadow.S/Get", "audit-log:9").0, Verdict::Allowed);
        assert_eq!(m.decide("checkout", "/log.Log/Write", "audit-log:9").0, Verdict::Rejected);
        assert_eq!(m.decide("checkout", "/log.Log/Write", "audit-log:80").0, Verdict::Allowed);
        assert_eq!(m.decide("checkout", "/shadow.S/Get", "audit-log:80").0, Verdict::Rejected);
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
