//! Which service owns an address: the index of every declared endpoint, built once per policy
//! (the compiler builds it to infer dependencies, and the snapshot keeps it). Everything that asks
//! "whose is this destination" asks here: the compiler (does an allowed block or host reach a
//! service's endpoints?), `explain`, the agent's events and metrics, and the in-process guard
//! (which service an RPC's authority names).
//!
//! A point (an address, a port, a protocol) belongs to the services with an endpoint that holds
//! it; the most specific endpoint names *the* owner: the longest prefix, then the narrowest port
//! range, then one protocol rather than any, then the service that sorts first
//! ([`super::specificity`], the order address rules decide in too).
//!
//! Address blocks either nest or are disjoint, so a query block overlaps an endpoint block
//! exactly when the endpoint lies inside the query (its first address falls in the query's
//! interval: a range search over endpoints sorted by first address) or covers it (the query,
//! masked to the endpoint's prefix length, equals the endpoint: one hash lookup per prefix length
//! in use). Single addresses are also indexed by their canonical text, so a caller holding text
//! (an RPC authority) finds them without parsing.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use foldhash::HashMap;
use ipnet::IpNet;

use super::{EndpointRule, ServiceId, specificity};
use crate::policy::{Destination, HostPattern, PortRange, Proto};

/// Address family and interval of a block: (is IPv6, first, last, prefix length).
fn interval(net: IpNet) -> (bool, u128, u128, u8) {
    match net {
        IpNet::V4(n) => (false, u32::from(n.network()).into(), u32::from(n.broadcast()).into(), n.prefix_len()),
        IpNet::V6(n) => (true, u128::from(n.network()), u128::from(n.broadcast()), n.prefix_len()),
    }
}

fn mask(addr: u128, v6: bool, prefix: u8) -> u128 {
    let bits: u8 = if v6 { 128 } else { 32 };
    let host_bits = u32::from(bits.saturating_sub(prefix));
    addr.checked_shr(host_bits).and_then(|a| a.checked_shl(host_bits)).unwrap_or(0)
}

/// (is IPv6, address) of an address, IPv4-mapped IPv6 as IPv4.
fn point(addr: IpAddr) -> (bool, u128) {
    match addr.to_canonical() {
        IpAddr::V4(a) => (false, u32::from(a).into()),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

/// One endpoint of one service, for one port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    service: ServiceId,
    ports: PortRange,
    proto: Proto,
    prefix: u8,
}

impl Entry {
    /// Whether a destination with these ports (`None`: any) and protocol (`None`: any) can
    /// reach this endpoint.
    fn reached_by(&self, ports: Option<&[PortRange]>, proto: Option<Proto>) -> bool {
        proto.unwrap_or(Proto::Any).intersect(self.proto).is_some()
            && ports.is_none_or(|ports| ports.iter().any(|p| p.intersect(self.ports).is_some()))
    }

    /// Whether the endpoint holds `port` (`None`: any port) over `proto`.
    #[inline]
    fn holds(&self, port: Option<u16>, proto: Proto) -> bool {
        port.is_none_or(|p| self.ports.contains(p)) && self.proto.covers(proto)
    }

    fn order(&self) -> (impl Ord + use<>, ServiceId) {
        (specificity(self.prefix, self.ports, self.proto), self.service)
    }
}

/// The first of `entries` (which share a block, most specific first) that holds `port` over
/// `proto`.
#[inline]
fn best<'e>(mut entries: impl Iterator<Item = &'e Entry>, port: Option<u16>, proto: Proto) -> Option<&'e Entry> {
    entries.find(|e| e.holds(port, proto))
}

/// Every declared endpoint, indexed for ownership and overlap queries.
#[derive(Debug, Clone, Default)]
pub struct Owners {
    /// Address endpoints sorted by (family, first address).
    nets: Vec<((bool, u128), Entry)>,
    /// The first addresses of the IPv4 endpoints (the start of `nets`), then of the IPv6 ones:
    /// compact copies of the sort keys, so the binary search stays in cache.
    v4_starts: Vec<u32>,
    v6_starts: Vec<u128>,
    /// (family, prefix length, network) → its endpoints, most specific first.
    by_prefix: HashMap<(bool, u8, u128), Vec<Entry>>,
    /// Prefix lengths in use, per family.
    prefix_lens: BTreeSet<(bool, u8)>,
    /// Single-address endpoints by the address's canonical text (`10.0.0.5`, `fd00::5`), most
    /// specific first.
    by_text: HashMap<Box<str>, Vec<Entry>>,
    hosts: Vec<(HostPattern, Entry)>,
}

impl Owners {
    /// Indexes the endpoints of every service (`endpoints[id]` are service `id`'s).
    pub fn new<'a>(endpoints: impl IntoIterator<Item = &'a [EndpointRule]>) -> Self {
        let mut nets = Vec::new();
        let mut hosts = Vec::new();
        for (service, rules) in (0..).zip(endpoints) {
            for rule in rules {
                match &rule.destination {
                    Destination::Net(net) => {
                        let entry = Entry { service, ports: rule.ports, proto: rule.proto, prefix: net.prefix_len() };
                        nets.push((interval(*net), entry));
                    }
                    Destination::Host(host) => {
                        let entry = Entry { service, ports: rule.ports, proto: rule.proto, prefix: 0 };
                        hosts.push((host.clone(), entry));
                    }
                }
            }
        }
        nets.sort_by_key(|((v6, first, _, _), e)| (*v6, *first, e.order()));
        let mut by_prefix: HashMap<(bool, u8, u128), Vec<Entry>> = HashMap::default();
        let mut by_text: HashMap<Box<str>, Vec<Entry>> = HashMap::default();
        let mut prefix_lens = BTreeSet::new();
        for ((v6, first, _, prefix), entry) in &nets {
            by_prefix.entry((*v6, *prefix, *first)).or_default().push(*entry);
            prefix_lens.insert((*v6, *prefix));
            if *prefix == if *v6 { 128 } else { 32 } {
                let addr: IpAddr =
                    if *v6 { Ipv6Addr::from(*first).into() } else { Ipv4Addr::from(*first as u32).into() };
                by_text.entry(addr.to_string().into_boxed_str()).or_default().push(*entry);
            }
        }
        let nets: Vec<_> = nets.into_iter().map(|((v6, first, _, _), e)| ((v6, first), e)).collect();
        let v4_starts = nets.iter().filter(|((v6, _), _)| !v6).map(|((_, first), _)| *first as u32).collect();
        let v6_starts = nets.iter().filter(|((v6, _), _)| *v6).map(|((_, first), _)| *first).collect();
        Owners { nets, v4_starts, v6_starts, by_prefix, prefix_lens, by_text, hosts }
    }

    /// The service that owns `addr` on `port` (`None`: any port) over `proto`: the one with the
    /// most specific endpoint that holds it.
    pub fn owner_of(&self, addr: IpAddr, port: Option<u16>, proto: Proto) -> Option<ServiceId> {
        let (v6, addr) = point(addr);
        // Longest prefix first: the first length with an endpoint that holds the point decides.
        for &(_, len) in self.prefix_lens.range((v6, 0)..=(v6, u8::MAX)).rev() {
            let Some(entries) = self.by_prefix.get(&(v6, len, mask(addr, v6, len))) else { continue };
            if let Some(entry) = best(entries.iter(), port, proto) {
                return Some(entry.service);
            }
        }
        None
    }

    /// [`Owners::owner_of`] for an address written as text: found without parsing when the text
    /// is the address's canonical form, as endpoints write it; parsed otherwise.
    #[inline]
    pub fn owner_of_text(&self, text: &str, port: Option<u16>, proto: Proto) -> Option<ServiceId> {
        if let Some(entries) = self.by_text.get(text)
            && let Some(entry) = best(entries.iter(), port, proto)
        {
            return Some(entry.service);
        }
        self.owner_of(text.parse().ok()?, port, proto)
    }

    /// Every service with an endpoint that holds `addr` on `port` over `proto`, the owner
    /// first, then by specificity.
    pub fn owners_of(&self, addr: IpAddr, port: u16, proto: Proto) -> Vec<ServiceId> {
        let (v6, addr) = point(addr);
        let mut found: Vec<&Entry> = Vec::new();
        for &(_, len) in self.prefix_lens.range((v6, 0)..=(v6, u8::MAX)) {
            let Some(entries) = self.by_prefix.get(&(v6, len, mask(addr, v6, len))) else { continue };
            found.extend(entries.iter());
        }
        found.retain(|e| e.holds(Some(port), proto));
        found.sort_by_key(|e| e.order());
        let mut services: Vec<ServiceId> = Vec::new();
        for e in found {
            if !services.contains(&e.service) {
                services.push(e.service);
            }
        }
        services
    }

    /// Appends to `out` every service with an endpoint that `destination` (with these ports,
    /// `None` for any, and protocol, `None` for any) can reach: for a block, the endpoints inside
    /// it or around it. `out` may receive duplicates.
    pub fn reached_by(
        &self,
        destination: &Destination,
        ports: Option<&[PortRange]>,
        proto: Option<Proto>,
        out: &mut Vec<ServiceId>,
    ) {
        match destination {
            Destination::Net(net) => self.reached_by_net(*net, ports, proto, out),
            Destination::Host(host) => out.extend(
                self.hosts
                    .iter()
                    .filter(|(h, e)| h.overlaps(host) && e.reached_by(ports, proto))
                    .map(|(_, e)| e.service),
            ),
        }
    }

    fn reached_by_net(&self, net: IpNet, ports: Option<&[PortRange]>, proto: Option<Proto>, out: &mut Vec<ServiceId>) {
        let (v6, first, last, prefix) = interval(net);
        // Endpoints inside the query block.
        // `nets.partition_point(|(key, _)| *key < (v6, first))`, searched in the compact keys.
        let start = if v6 {
            self.v4_starts.len() + self.v6_starts.partition_point(|&s| s < first)
        } else {
            self.v4_starts.partition_point(|&s| u128::from(s) < first)
        };
        for (_, e) in self.nets.get(start..).unwrap_or_default().iter().take_while(|(key, _)| *key <= (v6, last)) {
            if e.reached_by(ports, proto) {
                out.push(e.service);
            }
        }
        // Endpoints covering it (strictly shorter prefixes; equal ones were found above).
        for &(_, len) in self.prefix_lens.range((v6, 0)..(v6, prefix)) {
            let Some(entries) = self.by_prefix.get(&(v6, len, mask(first, v6, len))) else { continue };
            for e in entries {
                if e.reached_by(ports, proto) {
                    out.push(e.service);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile_str;

    fn owners(text: &str) -> (Owners, Vec<String>) {
        let compiled = compile_str("t.toml", text).unwrap_or_else(|(_, d)| panic!("{d:?}"));
        let services = compiled.snapshot.services();
        let names = services.iter().map(|s| s.name.clone()).collect();
        (Owners::new(services.iter().map(|s| s.rules(0).endpoints.as_slice())), names)
    }

    fn reached(
        index: &(Owners, Vec<String>),
        cidr: &str,
        ports: Option<&[PortRange]>,
        proto: Option<Proto>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        index.0.reached_by(&Destination::Net(cidr.parse().unwrap()), ports, proto, &mut out);
        let mut names: Vec<String> = out.into_iter().map(|i| index.1[i as usize].clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    const POLICY: &str = r#"
version = 1
[services.db]
endpoints = [{ ip = "10.0.5.10", ports = [3306], proto = "tcp" }]
[services.cache]
endpoints = [{ cidr = "10.0.6.0/24", ports = ["6379-6380"] }]
[services.v6]
endpoints = [{ ip = "2001:db8::1" }]
"#;

    #[test]
    fn inside_and_covering_blocks_overlap() {
        let idx = owners(POLICY);
        assert_eq!(reached(&idx, "10.0.0.0/16", None, None), ["cache", "db"]);
        assert_eq!(reached(&idx, "10.0.5.10/32", None, None), ["db"]);
        assert_eq!(reached(&idx, "10.0.6.7/32", None, None), ["cache"]);
        assert_eq!(reached(&idx, "10.0.7.0/24", None, None), Vec::<String>::new());
        assert_eq!(reached(&idx, "2001:db8::/32", None, None), ["v6"]);
        assert_eq!(reached(&idx, "0.0.0.0/0", None, None), ["cache", "db"]);
    }

    #[test]
    fn ports_and_protocol_must_overlap_too() {
        let idx = owners(POLICY);
        assert_eq!(reached(&idx, "10.0.0.0/16", Some(&[PortRange::single(443)]), None), Vec::<String>::new());
        assert_eq!(reached(&idx, "10.0.0.0/16", Some(&[PortRange::single(6380)]), None), ["cache"]);
        assert_eq!(reached(&idx, "10.0.5.10/32", None, Some(Proto::Udp)), Vec::<String>::new());
    }

    #[test]
    fn the_most_specific_endpoint_owns_a_point() {
        let (idx, names) = owners(
            r#"
version = 1
[services.wide]
endpoints = [{ cidr = "10.0.0.0/8" }]
[services.any-port]
endpoints = [{ ip = "10.9.9.9" }]
[services.one-port]
endpoints = [{ ip = "10.9.9.9", ports = [80], proto = "tcp" }]
"#,
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let owner = |addr: &str, port, proto| idx.owner_of(ip(addr), port, proto).map(|i| names[i as usize].as_str());
        // The longest prefix, then the narrower port range, then one protocol.
        assert_eq!(owner("10.9.9.9", Some(80), Proto::Tcp), Some("one-port"));
        assert_eq!(owner("10.9.9.9", Some(80), Proto::Udp), Some("any-port"));
        assert_eq!(owner("10.9.9.9", Some(81), Proto::Tcp), Some("any-port"));
        assert_eq!(owner("10.1.2.3", Some(81), Proto::Tcp), Some("wide"));
        assert_eq!(owner("10.9.9.9", None, Proto::Tcp), Some("one-port"), "any port: every endpoint may hold it");
        let all: Vec<&str> =
            idx.owners_of(ip("10.9.9.9"), 80, Proto::Tcp).iter().map(|&i| names[i as usize].as_str()).collect();
        assert_eq!(all, ["one-port", "any-port", "wide"]);
        // By text: the canonical form without parsing, any other spelling parsed.
        let by_text = |t: &str| idx.owner_of_text(t, Some(81), Proto::Tcp).map(|i| names[i as usize].as_str());
        assert_eq!(by_text("10.9.9.9"), Some("any-port"));
        assert_eq!(by_text("::ffff:10.9.9.9"), Some("any-port"));
        assert_eq!(by_text("10.9.9.8"), Some("wide"));
        assert_eq!(by_text("not-an-address"), None);
    }

    /// The events' destination service (the agent's question, answered by the owner index).
    #[test]
    fn destination_owners_come_from_endpoints() {
        let (idx, names) = owners(
            r#"
version = 1
[services.db]
endpoints = [{ ip = "10.0.0.5", ports = [5432], proto = "tcp" }]
[services.pool]
endpoints = [{ cidr = "10.1.0.0/24", ports = [443] }]
[services.app]
allow = [{ service = "db" }, { service = "pool" }, { cidr = "192.0.2.0/24" }]
"#,
        );
        let owner = |addr: &str, port, proto| {
            idx.owner_of(addr.parse().unwrap(), Some(port), proto).map(|i| names[i as usize].as_str())
        };
        assert_eq!(owner("10.0.0.5", 5432, Proto::Tcp), Some("db"));
        assert_eq!(owner("::ffff:10.0.0.5", 5432, Proto::Tcp), Some("db"));
        assert_eq!(owner("10.0.0.5", 5433, Proto::Tcp), None, "another port");
        assert_eq!(owner("10.0.0.5", 5432, Proto::Udp), None, "another protocol");
        assert_eq!(owner("10.1.0.77", 443, Proto::Udp), Some("pool"));
        assert_eq!(owner("192.0.2.1", 80, Proto::Tcp), None, "a block without a service");
    }
}
