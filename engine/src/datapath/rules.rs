//! Compiling a ruleset into `DF_RULES` / `DF_CIDRS` entries (prototype of the compiler's
//! datapath back end).
use std::net::IpAddr;

use depfence_bpf_common::{CidrKeyData, CidrValue, MAX_CIDR_PORT_RANGES, PortRange, RuleKey, RuleValue};

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
