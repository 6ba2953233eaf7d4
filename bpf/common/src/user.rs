//! Host-side conversions (feature `std`): addresses from std types, key constructors, and the
//! readable parts of an event.
extern crate std;

use std::net::{IpAddr, Ipv6Addr};

use crate::{CidrKeyData, CidrValue, DnsSlot, Event, NameKey, PortRange, RuleKey};

/// 16-byte address (IPv4 → IPv4-mapped) as the kernel sees it: network-order bytes in memory.
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut words = [0u32; 4];
    for (word, chunk) in words.iter_mut().zip(v6.octets().chunks_exact(4)) {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(chunk);
        *word = u32::from_ne_bytes(bytes);
    }
    words
}

/// Inverse of [`addr_words`]; IPv4-mapped addresses come back as IPv4.
pub fn words_addr(words: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (chunk, w) in o.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

impl RuleKey {
    /// The key of an exact rule (`port` 0 = any port).
    pub fn new(ruleset: u32, proto: u8, port: u16, addr: IpAddr) -> Self {
        Self { ruleset, proto, _pad: 0, port, addr: addr_words(addr) }
    }
}

impl CidrKeyData {
    /// Returns (LPM prefix length, key data) for `addr/prefix` in `ruleset`; host bits are
    /// cleared.
    pub fn new(ruleset: u32, addr: IpAddr, prefix: u8) -> (u32, Self) {
        let (v6, bits) = match addr {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped(), 96 + u32::from(prefix.min(32))),
            IpAddr::V6(v6) => (v6, u32::from(prefix.min(128))),
        };
        let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
        let net = Ipv6Addr::from(u128::from(v6) & mask);
        (32 + bits, Self { ruleset_be: ruleset.to_be(), addr: addr_words(IpAddr::V6(net)) })
    }
}

impl PortRange {
    /// One allowed (protocol, port range) of a block (`proto` 0 = any).
    pub const fn new(proto: u8, port_lo: u16, port_hi: u16, rule_id: u32) -> Self {
        Self { proto, _pad: 0, port_lo, port_hi, _pad2: 0, rule_id }
    }
}

impl CidrValue {
    /// `None` if more than `MAX_CIDR_PORT_RANGES` ranges.
    pub fn from_ranges(ranges: &[PortRange]) -> Option<Self> {
        let mut v = Self::default();
        if ranges.len() > v.ranges.len() {
            return None;
        }
        for (dst, src) in v.ranges.iter_mut().zip(ranges) {
            *dst = *src;
        }
        v.count = u32::try_from(ranges.len()).ok()?;
        Some(v)
    }
}

/// A kernel command name, up to its NUL (lossy if not UTF-8).
fn comm_str(comm: &[u8; 16]) -> std::borrow::Cow<'_, str> {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    std::string::String::from_utf8_lossy(comm.get(..end).unwrap_or_default())
}

impl NameKey {
    /// The key of an address admitted for the service with `counter_slot`.
    pub fn new(counter_slot: u32, proto: u8, addr: IpAddr) -> Self {
        Self { counter_slot, proto, _pad: [0; 3], addr: addr_words(addr) }
    }
}

impl DnsSlot {
    /// The asking command's name.
    pub fn comm_name(&self) -> std::borrow::Cow<'_, str> {
        comm_str(&self.comm)
    }

    /// The asking process (thread group id).
    pub fn pid(&self) -> u32 {
        (self.pid_tgid >> 32) as u32
    }

    /// The server the client addressed.
    pub fn server(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(words_addr(self.server_addr), self.server_port)
    }
}

impl Event {
    /// The command name, up to its NUL (lossy if not UTF-8).
    pub fn comm_name(&self) -> std::borrow::Cow<'_, str> {
        comm_str(&self.comm)
    }

    /// The process id (thread group id) that made the call.
    pub fn pid(&self) -> u32 {
        (self.pid_tgid >> 32) as u32
    }

    /// What was judged, as one word-like string: a destination as `addr:port/proto`
    /// (`[v6]:port/proto`); a socket the policy cannot judge as `socket:family/type/protocol`
    /// (`socket:inet/dgram/icmp`); a routing header as `routing-header` (the socket option) or
    /// `routing-header:<first hop>` (a packet).
    pub fn destination(&self) -> std::string::String {
        match self.kind {
            crate::EVENT_SOCKET => {
                let family = if self.family == crate::AF_INET6 { "inet6" } else { "inet" };
                let sock_type = match u32::from(self.port) {
                    crate::SOCK_STREAM => std::borrow::Cow::Borrowed("stream"),
                    crate::SOCK_DGRAM => "dgram".into(),
                    3 => "raw".into(),
                    5 => "seqpacket".into(),
                    other => std::format!("type{other}").into(),
                };
                std::format!("socket:{family}/{sock_type}/{}", protocol_name(self.proto))
            }
            crate::EVENT_ROUTING_HEADER if self.addr == [0; 4] => "routing-header".into(),
            crate::EVENT_ROUTING_HEADER => std::format!("routing-header:{}", words_addr(self.addr)),
            _ => {
                let proto = match self.proto {
                    crate::IPPROTO_TCP => "tcp",
                    crate::IPPROTO_UDP => "udp",
                    _ => "ip",
                };
                match words_addr(self.addr) {
                    IpAddr::V4(a) => std::format!("{a}:{}/{proto}", self.port),
                    IpAddr::V6(a) => std::format!("[{a}]:{}/{proto}", self.port),
                }
            }
        }
    }
}

/// The name of an IP protocol number, as `/etc/protocols` spells the common ones.
fn protocol_name(proto: u8) -> std::borrow::Cow<'static, str> {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "ipv6-icmp".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        255 => "raw".into(),
        other => std::format!("{other}").into(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn v4_is_stored_mapped_and_round_trips() {
        let v4 = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
        let w = addr_words(v4);
        assert_eq!(w, addr_words(IpAddr::V6(Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped())));
        // memory bytes are the wire bytes: ::ffff:127.0.0.1
        assert_eq!(w[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(w[3].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(words_addr(w), v4);
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(words_addr(addr_words(v6)), v6);
    }

    #[test]
    fn cidr_prefix_includes_the_ruleset_word() {
        let (plen, _) = CidrKeyData::new(1, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8);
        assert_eq!(plen, 32 + 96 + 8);
        let (plen, _) = CidrKeyData::new(1, IpAddr::V6(Ipv6Addr::LOCALHOST), 64);
        assert_eq!(plen, 32 + 64);
    }
}
