//! Compiling a ruleset into `DF_RULES` / `DF_CIDRS` entries (prototype of the compiler's
//! datapath back end).
use std::net::IpAddr;

use crate::policy::Proto;
use crate::snapshot::{NetRule, OriginId};
use depfence_bpf_common::{
    CidrKeyData, CidrValue, IPPROTO_TCP, IPPROTO_UDP, MAX_CIDR_PORT_RANGES, PortRange, RuleKey, RuleValue,
};

/// One allow rule of a ruleset.
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

fn norm_bits(addr: IpAddr, prefix: u8) -> (u128, u32) {
    let (v6, bits) = match addr {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped(), 96 + u32::from(prefix.min(32))),
        IpAddr::V6(v6) => (v6, u32::from(prefix.min(128))),
    };
    let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
    (u128::from(v6) & mask, bits)
}

/// The kernel rule id of an allow entry: its origin id plus one, because the hook reads rule
/// id 0 as "no rule matched".
pub fn rule_id_of(origin: OriginId) -> u32 {
    origin.saturating_add(1)
}

/// The kernel form of a compiled service's address rules: a host address with one port (or
/// any port) and one protocol becomes exact keys, one per protocol; everything else (blocks,
/// port ranges) becomes a prefix with a port range. Each entry's rule id is
/// [`rule_id_of`] its origin (the allow entry), so events point back at the policy line.
pub fn allows_from_snapshot(rules: &[NetRule]) -> Vec<Allow> {
    let mut allows = Vec::with_capacity(rules.len());
    for rule in rules {
        let rule_id = rule_id_of(rule.origin);
        let addr = rule.net.network();
        let host = rule.net.prefix_len() == rule.net.max_prefix_len();
        let single_port = rule.ports.is_any() || rule.ports.first == rule.ports.last;
        let protocols: &[u8] = match rule.proto {
            Proto::Tcp => &[IPPROTO_TCP],
            Proto::Udp => &[IPPROTO_UDP],
            Proto::Any => &[IPPROTO_TCP, IPPROTO_UDP],
        };
        if host && single_port {
            let port = if rule.ports.is_any() { 0 } else { rule.ports.first };
            allows.extend(protocols.iter().map(|&proto| Allow::Host { addr, proto, port, rule_id }));
        } else {
            let proto = match rule.proto {
                Proto::Tcp => IPPROTO_TCP,
                Proto::Udp => IPPROTO_UDP,
                Proto::Any => 0,
            };
            allows.push(Allow::Cidr {
                addr,
                prefix: rule.net.prefix_len(),
                proto,
                ports: (rule.ports.first, rule.ports.last),
                rule_id,
            });
        }
    }
    allows
}

/// Compile a ruleset. CIDR values get the ranges of every covering prefix ("push-down"),
/// because an LPM lookup returns only the longest matching prefix.
pub fn compile(ruleset: u32, allows: &[Allow]) -> Result<CompiledRuleset, CompileError> {
    let mut out = CompiledRuleset::default();
    let mut cidrs: Vec<(IpAddr, u8, u128, u32, Vec<PortRange>)> = Vec::new();
    for a in allows {
        match *a {
            Allow::Host { addr, proto, port, rule_id } => {
                out.exact.push((RuleKey::new(ruleset, proto, port, addr), RuleValue { rule_id }));
            }
            Allow::Cidr { addr, prefix, proto, ports, rule_id } => {
                let (net, bits) = norm_bits(addr, prefix);
                let r = PortRange::new(proto, ports.0, ports.1, rule_id);
                if let Some(e) = cidrs.iter_mut().find(|e| e.2 == net && e.3 == bits) {
                    e.4.push(r);
                } else {
                    cidrs.push((addr, prefix, net, bits, vec![r]));
                }
            }
        }
    }
    for (addr, prefix, net, bits, own) in &cidrs {
        let mut ranges = own.clone();
        for (_, _, onet, obits, oranges) in &cidrs {
            let covers = obits < bits && {
                let mask = if *obits == 0 { 0 } else { u128::MAX << (128 - obits) };
                net & mask == *onet
            };
            if covers {
                ranges.extend_from_slice(oranges);
            }
        }
        let value = CidrValue::from_ranges(&ranges).ok_or(CompileError::TooManyRanges(*addr, *prefix))?;
        let (plen, data) = CidrKeyData::new(ruleset, *addr, *prefix);
        out.cidrs.push((plen, data, value));
    }
    Ok(out)
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
        let allows = allows_from_snapshot(&app.net_rules);
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
