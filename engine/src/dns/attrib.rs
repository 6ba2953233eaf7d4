//! Who asked: mapping a query's addresses to the process and service behind it.
//!
//! The kernel half (`dns::kernel`, feature `agent`) redirects a policed process's port-53
//! traffic to the proxy. From an IPv4 socket each query goes to its own loopback address
//! `127.53.x.y`, allocated atomically in the connect/sendmsg hook, which stores the asker (pid,
//! comm, cgroup) and the original server under that slot: the destination address of the packet
//! the proxy receives names the asker exactly, with no transaction-id races. (IPv6 sockets go to
//! `[::1]` and are found by socket cookie; see `dns::kernel`.) An [`Attributor`] turns
//! `(client, local)` addresses into an [`Attribution`]; [`StaticAttributor`] is an in-memory
//! one for tests and embedding.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

/// The transport a query came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP: one datagram, one query.
    Udp,
    /// TCP: length-prefixed messages, several per connection.
    Tcp,
}

impl Transport {
    /// `udp` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// The process behind a query.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attribution {
    /// The service whose policy applies (a name in the snapshot).
    pub service: Arc<str>,
    /// The cgroup id (inode of the cgroup2 directory) the asker ran in.
    pub cgroup_id: u64,
    /// The asking process (thread-group id).
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// The server it meant to ask (the kernel rewrites reply sources back to this one).
    pub original_server: SocketAddr,
}

/// Finds who asked a query.
pub trait Attributor: Send + Sync {
    /// The asker of a query from `client` that arrived at the proxy's `local` address (the
    /// address the client sent it to), or None when unknown. Called once per UDP datagram and
    /// once per TCP connection (every query on a connection has the same asker).
    fn attribute(&self, client: SocketAddr, local: SocketAddr, transport: Transport) -> Option<Attribution>;
}

/// Slot `index` of the per-query address range `127.53.0.0/16` (`127.53.x.y`, `x.y` = index in
/// network order). Index 0 is `127.53.0.0`.
pub fn slot_addr(index: u16) -> Ipv4Addr {
    let [x, y] = index.to_be_bytes();
    Ipv4Addr::new(127, 53, x, y)
}

/// The slot index of a `127.53.x.y` address, or None for any other address.
pub fn slot_index(addr: IpAddr) -> Option<u16> {
    match addr.to_canonical() {
        IpAddr::V4(v4) => match v4.octets() {
            [127, 53, x, y] => Some(u16::from_be_bytes([x, y])),
            _ => None,
        },
        IpAddr::V6(_) => None,
    }
}

/// An in-memory attributor keyed by the local (destination) address the query was sent to.
#[derive(Debug, Default)]
pub struct StaticAttributor {
    by_local: RwLock<HashMap<IpAddr, Attribution>>,
}

impl StaticAttributor {
    /// An empty one.
    pub fn new() -> StaticAttributor {
        StaticAttributor::default()
    }

    /// Queries sent to `local` come from `who`. Returns the previous attribution.
    pub fn insert(&self, local: IpAddr, who: Attribution) -> Option<Attribution> {
        self.by_local.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(local.to_canonical(), who)
    }

    /// Forgets `local`.
    pub fn remove(&self, local: IpAddr) -> Option<Attribution> {
        self.by_local.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&local.to_canonical())
    }
}

impl Attributor for StaticAttributor {
    fn attribute(&self, _client: SocketAddr, local: SocketAddr, _transport: Transport) -> Option<Attribution> {
        self.by_local.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&local.ip().to_canonical()).cloned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn slot_addresses_round_trip() {
        for index in [0u16, 1, 7, 255, 256, 0x1234, u16::MAX] {
            assert_eq!(slot_index(IpAddr::V4(slot_addr(index))), Some(index));
        }
        assert_eq!(slot_addr(7), Ipv4Addr::new(127, 53, 0, 7));
        assert_eq!(slot_addr(0x0102), Ipv4Addr::new(127, 53, 1, 2));
        assert_eq!(slot_index("127.54.0.7".parse().unwrap()), None);
        assert_eq!(slot_index("::ffff:127.53.0.9".parse().unwrap()), Some(9));
        assert_eq!(slot_index("::1".parse().unwrap()), None);
    }

    #[test]
    fn static_attributor_keys_on_the_local_address() {
        let a = StaticAttributor::new();
        let who = Attribution {
            service: Arc::from("web"),
            cgroup_id: 42,
            pid: 1000,
            comm: "curl".into(),
            original_server: "10.0.0.53:53".parse().unwrap(),
        };
        a.insert("127.53.0.7".parse().unwrap(), who.clone());
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(a.attribute(client, "127.53.0.7:5300".parse().unwrap(), Transport::Udp), Some(who.clone()));
        assert_eq!(a.attribute(client, "[::ffff:127.53.0.7]:5300".parse().unwrap(), Transport::Tcp), Some(who));
        assert_eq!(a.attribute(client, "127.53.0.8:5300".parse().unwrap(), Transport::Udp), None);
        assert!(a.remove("127.53.0.7".parse().unwrap()).is_some());
        assert_eq!(a.attribute(client, "127.53.0.7:5300".parse().unwrap(), Transport::Udp), None);
    }
}
