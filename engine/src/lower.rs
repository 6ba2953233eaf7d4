//! The lowering: a service's address rules (the snapshot's `NetRule`s) → the kernel's map
//! entries (`DF_RULES` exact keys and `DF_CIDRS` prefixes), laid out so that the kernel's lookup
//! (`depfence_bpf_common::lookup`, the code the eBPF program runs) names the same rule as
//! [`crate::snapshot::ServiceRuleset::matching_rule`], the order `explain` uses
//! ([`NetRule::precedence`]: the most specific rule decides).
//!
//! How the layout achieves that, given the lookup's fixed order (exact key, exact key on port 0,
//! longest prefix, first range in it):
//! * a host address with one port (the most specific rule there is) is an exact key; when two
//!   rules give one key, the one that comes first in the order is written;
//! * a host address on any port is an exact key on port 0, unless the host also has port-range
//!   rules, which must be tried first: then it joins them as a range of the host's prefix;
//! * a prefix's value lists its own ranges and those of every covering prefix of the same address
//!   family (an LPM lookup returns only the longest prefix), in the order;
//! * IPv4 lives inside `::ffff:0:0/96` of the kernel's address space, but an IPv6 block never
//!   holds an IPv4 address: IPv6 ranges are not pushed into IPv4 prefixes, and when an IPv6 block
//!   covers that space an IPv4 root (`0.0.0.0/0`, with the ranges of any IPv4 `/0` rule) stops
//!   the lookup from reaching it.
//!
//! The kernel rule id of an entry is the index of its rule in the service's `net_rules`, plus
//! one (the lookup reads 0 as "no rule").
//!
//! [`LoweredRules`] runs the kernel's lookup over a ruleset's entries in user space: the model
//! behind the agreement test of `explain` and the kernel, and the rule maps of the agent's fake
//! kernel. (Addresses the DNS proxy admitted are not modelled.)

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use depfence_bpf_common::{
    CidrKeyData, CidrValue, IPPROTO_TCP, IPPROTO_UDP, MAX_CIDR_PORT_RANGES, NameKey, PortRange, RuleKey, RuleValue,
    lookup::{Destination, Extra, RuleMaps, first_match},
    user::addr_words,
};

use crate::policy::Proto;
use crate::snapshot::{Connection, NetRule};

/// The protocol an IP protocol number names: TCP (6), UDP (17), or [`Proto::Any`] for any other
/// (which only rules and endpoints for any protocol cover).
pub fn proto_of(number: u8) -> Proto {
    match number {
        IPPROTO_TCP => Proto::Tcp,
        IPPROTO_UDP => Proto::Udp,
        _ => Proto::Any,
    }
}

/// The IP protocol numbers of a protocol (both for any).
pub fn protocol_numbers(proto: Proto) -> &'static [u8] {
    match proto {
        Proto::Tcp => &[IPPROTO_TCP],
        Proto::Udp => &[IPPROTO_UDP],
        Proto::Any => &[IPPROTO_TCP, IPPROTO_UDP],
    }
}

/// One allow rule of a ruleset, in the kernel's terms.
#[derive(Clone, Debug)]
pub enum Allow {
    /// Exact address; `port == 0` = any port; one protocol.
    Host {
        /// Destination address.
        addr: IpAddr,
        /// `IPPROTO_TCP` or `IPPROTO_UDP`.
        proto: u8,
        /// Destination port.
        port: u16,
        /// Rule id.
        rule_id: u32,
    },
    /// Prefix with a port range; `proto == 0` = any protocol.
    Cidr {
        /// Block address.
        addr: IpAddr,
        /// Prefix length.
        prefix: u8,
        /// Protocol number, 0 = any.
        proto: u8,
        /// First and last port, inclusive.
        ports: (u16, u16),
        /// Rule id.
        rule_id: u32,
    },
}

/// Kernel entries of one ruleset.
#[derive(Clone, Debug, Default)]
pub struct CompiledRuleset {
    /// `DF_RULES` entries.
    pub exact: Vec<(RuleKey, RuleValue)>,
    /// `DF_CIDRS` entries: prefix length, key, value.
    pub cidrs: Vec<(u32, CidrKeyData, CidrValue)>,
}

/// A ruleset does not fit the kernel layout.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompileError {
    /// A block accumulated more port ranges than a value holds.
    #[error("prefix `{0}/{1}` has more than {MAX_CIDR_PORT_RANGES} port ranges after merging covering prefixes")]
    TooManyRanges(IpAddr, u8),
}

/// (network in the kernel's 128-bit space, its prefix length there, is IPv4).
fn norm_bits(addr: IpAddr, prefix: u8) -> (u128, u32, bool) {
    let (v6, bits, v4) = match addr {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped(), 96 + u32::from(prefix.min(32)), true),
        IpAddr::V6(v6) => (v6, u32::from(prefix.min(128)), false),
    };
    let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
    (u128::from(v6) & mask, bits, v4)
}

/// The kernel rule id of the rule at `index` of a service's `net_rules`.
pub fn rule_id_of(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX - 1).saturating_add(1)
}

/// The rule a kernel rule id names, in a service's `net_rules`.
pub fn rule_of(rules: &[NetRule], rule_id: u32) -> Option<&NetRule> {
    rules.get(usize::try_from(rule_id.checked_sub(1)?).ok()?)
}

/// True when two services' address rules (sorted, as a snapshot keeps them) lower to the same
/// kernel entries: the lowering reads only each rule's block, protocol and ports, and a rule's
/// position (its rule id). What a rule reaches and where it was written do not matter.
pub fn same_kernel_rules(a: &[NetRule], b: &[NetRule]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x.net, x.proto, x.ports) == (y.net, y.proto, y.ports))
}

/// The kernel form of a service's address rules (`rules` sorted, as a snapshot keeps them): a
/// host address with one port, or any port on a host without port-range rules, becomes exact
/// keys (one per protocol); everything else a prefix with a port range. Exact keys come first for
/// the rules of one protocol, then for those of any protocol, so that where both give one key
/// the rule of the one protocol is written ([`compile`] keeps the first).
pub fn allows_from_snapshot(rules: &[NetRule]) -> Vec<Allow> {
    let is_host = |r: &NetRule| r.net.prefix_len() == r.net.max_prefix_len();
    let is_range = |r: &NetRule| !r.ports.is_any() && r.ports.first != r.ports.last;
    // Hosts with a port-range rule: their any-port rules go with the ranges, which come first.
    let ranged_hosts: HashSet<IpAddr> =
        rules.iter().filter(|r| is_host(r) && is_range(r)).map(|r| r.net.addr()).collect();
    let exact = |r: &NetRule| is_host(r) && !is_range(r) && !(r.ports.is_any() && ranged_hosts.contains(&r.net.addr()));
    let rules = || (0..).zip(rules).map(|(index, rule)| (rule_id_of(index), rule));
    let one_protocol = rules().filter(|(_, r)| exact(r) && r.proto != Proto::Any);
    let any_protocol = rules().filter(|(_, r)| exact(r) && r.proto == Proto::Any);
    let mut allows: Vec<Allow> = one_protocol
        .chain(any_protocol)
        .flat_map(|(rule_id, rule)| {
            let (addr, port) = (rule.net.network(), if rule.ports.is_any() { 0 } else { rule.ports.first });
            protocol_numbers(rule.proto).iter().map(move |&proto| Allow::Host { addr, proto, port, rule_id })
        })
        .collect();
    allows.extend(rules().filter(|(_, r)| !exact(r)).map(|(rule_id, rule)| {
        let proto = match rule.proto {
            Proto::Any => 0,
            one => protocol_numbers(one).first().copied().unwrap_or(0),
        };
        let ports = (rule.ports.first, rule.ports.last);
        Allow::Cidr { addr: rule.net.network(), prefix: rule.net.prefix_len(), proto, ports, rule_id }
    }));
    allows
}

/// Compiles allows into the entries of `ruleset`, laid out in the order rules decide in: the
/// first of several allows with one exact key is written; a prefix's value lists its own ranges,
/// the fewest ports first, then one protocol before any, then the lower rule id, followed by
/// the ranges of its covering prefixes of the same family, the longest first ("push-down": an
/// LPM lookup returns only the longest matching prefix).
pub fn compile(ruleset: u32, allows: &[Allow]) -> Result<CompiledRuleset, CompileError> {
    let mut out = CompiledRuleset::default();
    let mut seen = HashSet::new();
    let mut cidrs: BTreeMap<(u32, u128), Prefix> = BTreeMap::new();
    for a in allows {
        match *a {
            Allow::Host { addr, proto, port, rule_id } => {
                let key = RuleKey::new(ruleset, proto, port, addr);
                if seen.insert(key) {
                    out.exact.push((key, RuleValue { rule_id }));
                }
            }
            Allow::Cidr { addr, prefix, proto, ports, rule_id } => {
                let (net, bits, v4) = norm_bits(addr, prefix);
                let entry = cidrs.entry((bits, net)).or_insert_with(|| Prefix { addr, prefix, v4, ranges: Vec::new() });
                entry.ranges.push(PortRange::new(proto, ports.0, ports.1, rule_id));
            }
        }
    }
    for prefix in cidrs.values_mut() {
        prefix
            .ranges
            .sort_by_key(|r| (u32::from(r.port_hi).saturating_sub(u32::from(r.port_lo)), r.proto == 0, r.rule_id));
    }
    // An IPv6 block that covers the IPv4 space must not answer for IPv4 addresses.
    let (v4_root, v4_root_bits) = (u128::from(std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped()), 96);
    let covers_v4 = cidrs.iter().any(|(&(bits, net), p)| !p.v4 && bits < v4_root_bits && v4_root & mask(bits) == net);
    if covers_v4 {
        let root = || Prefix { addr: std::net::Ipv4Addr::UNSPECIFIED.into(), prefix: 0, v4: true, ranges: Vec::new() };
        cidrs.entry((v4_root_bits, v4_root)).or_insert_with(root);
    }
    for (&(bits, net), p) in &cidrs {
        let mut ranges = p.ranges.clone();
        // Covering prefixes of the same family, the longest first.
        for (&(obits, onet), other) in cidrs.range(..(bits, 0)).rev() {
            if other.v4 == p.v4 && net & mask(obits) == onet {
                ranges.extend_from_slice(&other.ranges);
            }
        }
        let value = CidrValue::from_ranges(&ranges).ok_or(CompileError::TooManyRanges(p.addr, p.prefix))?;
        let (plen, data) = CidrKeyData::new(ruleset, p.addr, p.prefix);
        out.cidrs.push((plen, data, value));
    }
    Ok(out)
}

/// One prefix of a ruleset while it is compiled: as written, its family, and its own ranges.
struct Prefix {
    addr: IpAddr,
    prefix: u8,
    v4: bool,
    ranges: Vec<PortRange>,
}

fn mask(bits: u32) -> u128 {
    if bits == 0 { 0 } else { u128::MAX << (128 - bits.min(128)) }
}

/// A ruleset's entries as the kernel's rule maps: the kernel's own lookup
/// (`depfence_bpf_common::lookup::first_match`) runs over them in user space.
#[derive(Debug, Clone, Default)]
pub struct LoweredRules {
    exact: HashMap<RuleKey, u32>,
    /// (ruleset, kernel prefix bits, network) → value.
    cidrs: BTreeMap<(u32, u32, u128), CidrValue>,
}

impl LoweredRules {
    /// Maps holding nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes a ruleset's entries, as the loader does (a later exact key replaces an earlier).
    pub fn install(&mut self, ruleset: &CompiledRuleset) {
        for (key, value) in &ruleset.exact {
            self.exact.insert(*key, value.rule_id);
        }
        for (plen, data, value) in &ruleset.cidrs {
            self.cidrs.insert((u32::from_be(data.ruleset_be), plen.saturating_sub(32), words_u128(data.addr)), *value);
        }
    }

    /// Deletes a ruleset's entries.
    pub fn uninstall(&mut self, ruleset: &CompiledRuleset) {
        for (key, _) in &ruleset.exact {
            self.exact.remove(key);
        }
        for (plen, data, _) in &ruleset.cidrs {
            self.cidrs.remove(&(u32::from_be(data.ruleset_be), plen.saturating_sub(32), words_u128(data.addr)));
        }
    }

    /// Deletes every entry of a ruleset id; returns how many.
    pub fn remove_ruleset(&mut self, ruleset: u32) -> usize {
        let before = self.exact.len() + self.cidrs.len();
        self.exact.retain(|key, _| key.ruleset != ruleset);
        self.cidrs.retain(|(r, _, _), _| *r != ruleset);
        before - self.exact.len() - self.cidrs.len()
    }

    /// The ruleset ids with entries.
    pub fn ruleset_ids(&self) -> BTreeSet<u32> {
        self.exact.keys().map(|k| k.ruleset).chain(self.cidrs.keys().map(|(r, _, _)| *r)).collect()
    }

    /// The rule id the kernel finds for `conn` in `ruleset` (0: none).
    pub fn first_match(&self, ruleset: u32, conn: &Connection) -> u32 {
        let cidr = self.cidrs.keys().any(|(r, _, _)| *r == ruleset);
        self.first_match_with(ruleset, &destination(conn), Extra { cidr, names_slot: None })
    }

    /// [`LoweredRules::first_match`] with the hook's own inputs.
    pub fn first_match_with(&self, ruleset: u32, d: &Destination, extra: Extra) -> u32 {
        first_match(self, ruleset, d, extra)
    }
}

fn words_u128(words: [u32; 4]) -> u128 {
    let mut bytes = [0u8; 16];
    for (chunk, w) in bytes.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    u128::from_be_bytes(bytes)
}

/// A connection as a connect hook reads it.
pub fn destination(conn: &Connection) -> Destination {
    let proto = match conn.proto {
        Proto::Udp => IPPROTO_UDP,
        _ => IPPROTO_TCP,
    };
    let family = if conn.addr.is_ipv4() { depfence_bpf_common::AF_INET } else { depfence_bpf_common::AF_INET6 };
    Destination { addr: addr_words(conn.addr), port: conn.port, proto, family }
}

impl RuleMaps for LoweredRules {
    type Ranges<'a> = &'a CidrValue;

    fn exact(&self, key: &RuleKey) -> Option<u32> {
        self.exact.get(key).copied()
    }

    fn longest_prefix(&self, key: &CidrKeyData) -> Option<&CidrValue> {
        let ruleset = u32::from_be(key.ruleset_be);
        let addr = words_u128(key.addr);
        (0..=128u32).rev().find_map(|bits| self.cidrs.get(&(ruleset, bits, addr & mask(bits))))
    }

    /// The DNS proxy's admitted addresses are not modelled: none.
    fn names(&self, _key: &NameKey) -> Option<&CidrValue> {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use depfence_bpf_common::{IPPROTO_TCP, user::addr_words};

    use super::*;

    #[test]
    fn snapshot_rules_become_exact_keys_or_prefixes() {
        let text = r#"
version = 1
[services.db]
endpoints = [{ ip = "10.0.0.5", ports = [5432], proto = "tcp" }]
[services.app]
allow = [
  { service = "db" },
  { ip = "10.0.0.9" },
  { cidr = "192.0.2.0/24", ports = "8000-8100", proto = "udp" },
  { ip = "2001:db8::1", ports = "80-81", proto = "tcp" },
]
"#;
        let compiled = crate::compile::compile_str("t.toml", text).unwrap();
        let (_, app) = compiled.snapshot.service("app").unwrap();
        let allows = allows_from_snapshot(&app.rules(0).net_rules);
        let mut exact: Vec<(String, u8, u16)> = allows
            .iter()
            .filter_map(|a| match a {
                Allow::Host { addr, proto, port, .. } => Some((addr.to_string(), *proto, *port)),
                Allow::Cidr { .. } => None,
            })
            .collect();
        exact.sort();
        // One port, one protocol: one key. Any port and any protocol: port 0, one key per protocol.
        assert_eq!(exact, [("10.0.0.5".into(), 6, 5432), ("10.0.0.9".into(), 6, 0), ("10.0.0.9".into(), 17, 0)]);
        let mut prefixes: Vec<(String, u8, u8, (u16, u16))> = allows
            .iter()
            .filter_map(|a| match a {
                Allow::Cidr { addr, prefix, proto, ports, .. } => Some((addr.to_string(), *prefix, *proto, *ports)),
                Allow::Host { .. } => None,
            })
            .collect();
        prefixes.sort();
        // Blocks, and host addresses with a port range, become prefixes with a range.
        assert_eq!(prefixes, [("192.0.2.0".into(), 24, 17, (8000, 8100)), ("2001:db8::1".into(), 128, 6, (80, 81))]);
        // Rule ids start at 1: the hook reads 0 as "no rule matched".
        assert!(allows.iter().all(|a| match a {
            Allow::Host { rule_id, .. } | Allow::Cidr { rule_id, .. } => *rule_id >= 1,
        }));
        assert!(compile(1, &allows).is_ok());
    }

    #[test]
    fn covering_prefix_ranges_are_pushed_down() {
        let ten = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0));
        let ten_one = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let c = compile(
            7,
            &[
                Allow::Cidr { addr: ten, prefix: 8, proto: IPPROTO_TCP, ports: (443, 443), rule_id: 1 },
                Allow::Cidr { addr: ten_one, prefix: 16, proto: 0, ports: (22, 22), rule_id: 2 },
            ],
        )
        .unwrap();
        assert_eq!(c.cidrs.len(), 2);
        let (plen, data, v) = c.cidrs[1];
        assert_eq!(plen, 32 + 96 + 16);
        assert_eq!(data.ruleset_be, 7u32.to_be());
        // host bits cleared
        assert_eq!(data.addr, addr_words(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 0))));
        // own range first, then the /8's
        assert_eq!(v.count, 2);
        assert_eq!((v.ranges[0].rule_id, v.ranges[1].rule_id), (2, 1));
        assert_eq!(c.cidrs[0].2.count, 1, "the /8 does not get the /16's ranges");
    }

    #[test]
    fn too_many_ranges_is_an_error() {
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0));
        let allows: Vec<Allow> =
            (0..9).map(|i| Allow::Cidr { addr: a, prefix: 8, proto: IPPROTO_TCP, ports: (i, i), rule_id: 1 }).collect();
        assert!(matches!(compile(1, &allows), Err(CompileError::TooManyRanges(..))));
    }
}
