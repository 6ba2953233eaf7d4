//! Which services' declared endpoints an allowed address block or host name reaches, so a
//! dependency cannot hide behind a raw address.
//!
//! Address blocks either nest or are disjoint, so a query block overlaps an endpoint block
//! exactly when the endpoint lies inside the query (its first address falls in the query's
//! interval: a range search over endpoints sorted by first address) or covers it (the query,
//! masked to the endpoint's prefix length, equals the endpoint: one hash lookup per prefix length
//! in use).

use std::collections::{BTreeSet, HashMap};

use ipnet::IpNet;

use crate::policy::{Destination, HostPattern, PortRange, Proto, Service};

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

/// True when some port is in both lists (`None` or empty = any port).
fn ports_overlap(a: Option<&[PortRange]>, b: &[PortRange]) -> bool {
    let any = [PortRange::ANY];
    let a = a.unwrap_or(&any);
    let b = if b.is_empty() { &any[..] } else { b };
    a.iter().any(|x| b.iter().any(|y| x.intersect(*y).is_some()))
}

struct Endpoint {
    service: usize,
    ports: Vec<PortRange>,
    proto: Proto,
}

impl Endpoint {
    fn reached_by(&self, ports: Option<&[PortRange]>, proto: Option<Proto>) -> bool {
        proto.unwrap_or(Proto::Any).intersect(self.proto).is_some() && ports_overlap(ports, &self.ports)
    }
}

/// Every declared endpoint, indexed for overlap queries.
pub(super) struct EndpointIndex {
    /// Address endpoints sorted by (family, first address), with their endpoint.
    nets: Vec<((bool, u128), Endpoint)>,
    /// The first addresses of the IPv4 endpoints (the start of `nets`), then of the IPv6 ones:
    /// compact copies of the sort keys, so the binary search stays in cache.
    v4_starts: Vec<u32>,
    v6_starts: Vec<u128>,
    /// (family, prefix length, network) → indices into `nets`.
    by_prefix: HashMap<(bool, u8, u128), Vec<usize>>,
    /// Prefix lengths in use, per family.
    prefix_lens: BTreeSet<(bool, u8)>,
    hosts: Vec<(HostPattern, Endpoint)>,
}

impl EndpointIndex {
    /// Indexes the endpoints of `services` (node ids are their positions).
    pub(super) fn new(services: &[&Service]) -> Self {
        let mut nets = Vec::new();
        let mut hosts = Vec::new();
        for (service, s) in services.iter().enumerate() {
            for e in &s.endpoints {
                let endpoint = Endpoint { service, ports: e.ports.clone(), proto: e.proto };
                match &e.destination.value {
                    Destination::Net(net) => nets.push((interval(*net), endpoint)),
                    Destination::Host(host) => hosts.push((host.clone(), endpoint)),
                }
            }
        }
        nets.sort_by_key(|((v6, first, _, _), _)| (*v6, *first));
        let mut by_prefix: HashMap<(bool, u8, u128), Vec<usize>> = HashMap::new();
        let mut prefix_lens = BTreeSet::new();
        for (i, ((v6, first, _, prefix), _)) in nets.iter().enumerate() {
            by_prefix.entry((*v6, *prefix, *first)).or_default().push(i);
            prefix_lens.insert((*v6, *prefix));
        }
        let nets: Vec<_> = nets.into_iter().map(|((v6, first, _, _), e)| ((v6, first), e)).collect();
        let v4_starts = nets.iter().filter(|((v6, _), _)| !v6).map(|((_, first), _)| *first as u32).collect();
        let v6_starts = nets.iter().filter(|((v6, _), _)| *v6).map(|((_, first), _)| *first).collect();
        EndpointIndex { nets, v4_starts, v6_starts, by_prefix, prefix_lens, hosts }
    }

    /// Appends to `out` every service with an endpoint that `destination` (with these ports and
    /// protocol) can reach. `out` may receive duplicates.
    pub(super) fn reached_by(
        &self,
        destination: &Destination,
        ports: Option<&[PortRange]>,
        proto: Option<Proto>,
        out: &mut Vec<usize>,
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

    fn reached_by_net(&self, net: IpNet, ports: Option<&[PortRange]>, proto: Option<Proto>, out: &mut Vec<usize>) {
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
            let Some(indices) = self.by_prefix.get(&(v6, len, mask(first, v6, len))) else { continue };
            for e in indices.iter().filter_map(|&i| self.nets.get(i)).map(|(_, e)| e) {
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
    use crate::policy::parse_str;

    fn index(text: &str) -> (EndpointIndex, Vec<String>) {
        let parsed = parse_str("t.toml", text);
        assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
        let services: Vec<&Service> = parsed.policy.services.iter().collect();
        let names = services.iter().map(|s| s.name.value.clone()).collect();
        (EndpointIndex::new(&services), names)
    }

    fn reached(
        index: &(EndpointIndex, Vec<String>),
        cidr: &str,
        ports: Option<&[PortRange]>,
        proto: Option<Proto>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        index.0.reached_by(&Destination::Net(cidr.parse().unwrap()), ports, proto, &mut out);
        let mut names: Vec<String> = out.into_iter().map(|i| index.1[i].clone()).collect();
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
        let idx = index(POLICY);
        assert_eq!(reached(&idx, "10.0.0.0/16", None, None), ["cache", "db"]);
        assert_eq!(reached(&idx, "10.0.5.10/32", None, None), ["db"]);
        assert_eq!(reached(&idx, "10.0.6.7/32", None, None), ["cache"]);
        assert_eq!(reached(&idx, "10.0.7.0/24", None, None), Vec::<String>::new());
        assert_eq!(reached(&idx, "2001:db8::/32", None, None), ["v6"]);
        assert_eq!(reached(&idx, "0.0.0.0/0", None, None), ["cache", "db"]);
    }

    #[test]
    fn ports_and_protocol_must_overlap_too() {
        let idx = index(POLICY);
        assert_eq!(reached(&idx, "10.0.0.0/16", Some(&[PortRange::single(443)]), None), Vec::<String>::new());
        assert_eq!(reached(&idx, "10.0.0.0/16", Some(&[PortRange::single(6380)]), None), ["cache"]);
        assert_eq!(reached(&idx, "10.0.5.10/32", None, Some(Proto::Udp)), Vec::<String>::new());
    }
}
