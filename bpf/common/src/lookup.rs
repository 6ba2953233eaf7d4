//! How a ruleset's rules are looked up: the order in which the kernel tries its maps for a
//! destination, written once. The eBPF program runs it over its maps; user space runs the same
//! code over the entries a loader writes ([`RuleMaps`] implemented on plain collections), so
//! `explain` and the tests can be checked against exactly what the kernel does.
//!
//! The order, and why it names the most specific rule (the loader lays the entries out for it):
//! 1. the exact key `(address, protocol, port)`: a host address with one port;
//! 2. the exact key with port 0: a host address on any port, written there only when the host
//!    has no port-range rule (which must win over it);
//! 3. the longest address block holding the destination (`DF_CIDRS`), whose value lists the
//!    ranges of every block that covers it, most specific first: the first range that holds the
//!    protocol and port decides;
//! 4. for a service under the DNS proxy, the addresses its allowed names resolved to.

use crate::{
    CgroupState, CidrKeyData, CidrValue, FLAG_ACTIVE_HAS_CIDR, FLAG_CANDIDATE_HAS_CIDR, FLAG_DNS, MAX_CIDR_PORT_RANGES,
    NameKey, RuleKey,
};

/// A destination as a hook reads it from its context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    /// IPv6 or IPv4-mapped address, network-order bytes in memory.
    pub addr: [u32; 4],
    /// Host order.
    pub port: u16,
    /// `IPPROTO_*`.
    pub proto: u8,
    /// `AF_INET` / `AF_INET6`, as the caller used it.
    pub family: u8,
}

/// Where a ruleset's allows live besides its exact rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extra {
    /// The ruleset has address blocks (`DF_CIDRS`).
    pub cidr: bool,
    /// The service is under the DNS proxy: the addresses admitted for this counter slot
    /// (`DF_NAMES`) are allowed too.
    pub names_slot: Option<u32>,
}

impl Extra {
    /// What a cgroup's active ruleset reads besides its exact rules, from its state's flags.
    #[inline(always)]
    pub fn active(state: &CgroupState) -> Self {
        Self { cidr: state.flags & FLAG_ACTIVE_HAS_CIDR != 0, names_slot: names_slot(state) }
    }

    /// The same for its candidate ruleset.
    #[inline(always)]
    pub fn candidate(state: &CgroupState) -> Self {
        Self { cidr: state.flags & FLAG_CANDIDATE_HAS_CIDR != 0, names_slot: names_slot(state) }
    }
}

/// The counter slot whose DNS-admitted addresses a cgroup may reach, if it is under the proxy.
#[inline(always)]
fn names_slot(state: &CgroupState) -> Option<u32> {
    if state.flags & FLAG_DNS != 0 { Some(state.counter_slot) } else { None }
}

/// The three rule maps, as the lookup reads them.
pub trait RuleMaps {
    /// A value of `DF_CIDRS` or `DF_NAMES` as the maps hand it out: a reference in the eBPF
    /// program and in memory, a copy when user space reads the kernel's maps.
    type Ranges<'a>: core::ops::Deref<Target = CidrValue>
    where
        Self: 'a;
    /// `DF_RULES`: the rule id of an exact key.
    fn exact(&self, key: &RuleKey) -> Option<u32>;
    /// `DF_CIDRS`: the value of the longest prefix that holds `key` (all 160 bits asked).
    fn longest_prefix(&self, key: &CidrKeyData) -> Option<Self::Ranges<'_>>;
    /// `DF_NAMES`: the ranges admitted for an address of a service.
    fn names(&self, key: &NameKey) -> Option<Self::Ranges<'_>>;
}

/// Rule id of the first range of `v` that holds `d`'s protocol and port, or 0.
#[inline(always)]
pub fn range_hit(v: &CidrValue, d: &Destination) -> u32 {
    // A fixed-size array walked at most MAX_CIDR_PORT_RANGES times: the verifier sees the bound.
    for r in v.ranges.iter().take((v.count as usize).min(MAX_CIDR_PORT_RANGES)) {
        if (r.proto == 0 || r.proto == d.proto) && r.port_lo <= d.port && d.port <= r.port_hi {
            return r.rule_id;
        }
    }
    0
}

/// Rule id (≥ 1) of the rule of `ruleset` that allows `d`, or 0 when none does; see the module
/// documentation for the order.
#[inline(always)]
pub fn first_match<M: RuleMaps>(maps: &M, ruleset: u32, d: &Destination, extra: Extra) -> u32 {
    if ruleset == 0 {
        return 0;
    }
    let mut key = RuleKey { ruleset, proto: d.proto, _pad: 0, port: d.port, addr: d.addr };
    if let Some(rule_id) = maps.exact(&key) {
        return rule_id;
    }
    key.port = 0;
    if let Some(rule_id) = maps.exact(&key) {
        return rule_id;
    }
    if extra.cidr
        && let Some(v) = maps.longest_prefix(&CidrKeyData { ruleset_be: ruleset.to_be(), addr: d.addr })
    {
        let hit = range_hit(&v, d);
        if hit != 0 {
            return hit;
        }
    }
    if let Some(counter_slot) = extra.names_slot {
        let key = NameKey { counter_slot, proto: d.proto, _pad: [0; 3], addr: d.addr };
        if let Some(v) = maps.names(&key) {
            return range_hit(&v, d);
        }
    }
    0
}

/// The full LPM key length of a `DF_CIDRS` lookup: the ruleset word and the 128-bit address.
pub const LOOKUP_PREFIX_LEN: u32 = 32 + 128;
