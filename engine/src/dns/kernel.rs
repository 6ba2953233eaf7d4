//! The kernel half of the DNS proxy, as the agent runs it.
//!
//! The connect and sendmsg hooks send a policed service's port-53 traffic (UDP and TCP) to the
//! proxy on loopback and record who asked which server:
//! - from an IPv4 socket, each query (a UDP datagram, a connected UDP socket or a TCP
//!   connection) takes the next slot of `DF_DNS_SLOTS` and goes to `127.53.x.y` (`x.y` = the
//!   slot): the address it arrives at names the asker;
//! - from an IPv6 socket, it goes to `[::1]` and the asker is recorded under the socket's
//!   cookie (`DF_DNS_SOCKS`); the proxy finds the client socket's cookie with one exact
//!   `sock_diag` lookup of the connection's addresses.
//!
//! The recvmsg and getpeername hooks turn the proxy's address back into the server the client
//! addressed, so stub resolvers accept the answer. [`KernelDns`] reads the records
//! ([`Attributor`]) and writes the addresses the proxy admits into `DF_NAMES`
//! ([`KernelDns::apply_change`]) before the answer leaves the proxy.
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError};

use super::allow::{AllowChange, AllowEntry};
use super::attrib::{Attribution, Attributor, Transport, slot_index};
use crate::datapath::abi::{CidrValue, DnsSlot, IPPROTO_TCP, IPPROTO_UDP, NameKey, PortRange, map_names};
use crate::datapath::pins::PinLayout;
use crate::datapath::sockets::SockDiag;
use crate::datapath::{DatapathError, map_err, open_pinned};
use crate::policy::Proto;

pub use crate::datapath::abi::NAME_RULE_ID;

/// `DF_NAMES` and our book of what each of its entries holds.
struct Names {
    map: BpfHashMap<MapData, NameKey, CidrValue>,
    /// Per key, the (proto, ports) ranges admitted: one kernel value holds them all.
    ranges: BTreeMap<NameKey, Vec<(u8, u16, u16)>>,
}

/// The agent's view of the DNS maps: attribution from `DF_DNS_SLOTS`, admitted addresses into
/// `DF_NAMES`. Shared by the proxy's tasks.
pub struct KernelDns {
    slots: Array<MapData, DnsSlot>,
    sockets: BpfHashMap<MapData, u64, DnsSlot>,
    names: Mutex<Names>,
    /// The services in force.
    services: RwLock<Services>,
    /// The `sock_diag` socket for IPv6 attribution, opened on first use and kept.
    diag: Mutex<Option<SockDiag>>,
}

/// Counter slot → service name, and back.
#[derive(Debug, Default)]
struct Services {
    by_slot: HashMap<u32, Arc<str>>,
    by_name: HashMap<Arc<str>, u32>,
}

impl std::fmt::Debug for KernelDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDns").finish_non_exhaustive()
    }
}

impl KernelDns {
    /// Opens the pinned DNS maps under `layout` (the agent has loaded the programs).
    pub fn open(layout: &PinLayout) -> Result<KernelDns, DatapathError> {
        Ok(KernelDns {
            slots: open_pinned(layout, map_names::DNS_SLOTS)?,
            sockets: open_pinned(layout, map_names::DNS_SOCKS)?,
            names: Mutex::new(Names { map: open_pinned(layout, map_names::NAMES)?, ranges: BTreeMap::new() }),
            services: RwLock::default(),
            diag: Mutex::new(None),
        })
    }

    /// The services in force and their counter slots (after each apply).
    pub fn set_services<'a>(&self, services: impl IntoIterator<Item = (&'a str, u32)>) {
        let mut next = Services::default();
        for (name, slot) in services {
            let name: Arc<str> = Arc::from(name);
            next.by_slot.insert(slot, Arc::clone(&name));
            next.by_name.insert(name, slot);
        }
        *self.services.write().unwrap_or_else(PoisonError::into_inner) = next;
    }

    /// The record of DNS slot `index`.
    pub fn slot(&self, index: u16) -> Option<DnsSlot> {
        self.slots.get(&u32::from(index), 0).ok()
    }

    /// The record of a query that reached the proxy at `local` from `client`.
    fn record(&self, client: SocketAddr, local: SocketAddr, transport: Transport) -> Option<DnsSlot> {
        if let Some(index) = slot_index(local.ip()) {
            return self.slot(index);
        }
        if !local.ip().is_loopback() || !local.is_ipv6() {
            return None;
        }
        let mut diag = self.diag.lock().unwrap_or_else(PoisonError::into_inner);
        let cookie = match client_socket_cookie(&mut diag, transport, client, local) {
            Ok(cookie) => cookie?,
            Err(e) => {
                *diag = None; // start afresh next time
                tracing::warn!("sock_diag lookup of dns client {client}: {e}");
                return None;
            }
        };
        drop(diag);
        let record = self.sockets.get(&cookie, 0).ok()?;
        (record.socket_cookie == cookie).then_some(record)
    }

    /// Entries in `DF_NAMES` (addresses admitted, per protocol).
    pub fn admitted(&self) -> usize {
        self.names.lock().unwrap_or_else(PoisonError::into_inner).ranges.len()
    }

    /// Puts an allow-set change into `DF_NAMES`. Addresses of a service that has no counter
    /// slot here are skipped (it has no cgroup on this machine).
    pub fn apply_change(&self, change: &AllowChange) -> Result<(), DatapathError> {
        let (entry, added) = match change {
            AllowChange::Added(e) => (e, true),
            AllowChange::Removed(e) => (e, false),
        };
        let Some(slot) =
            self.services.read().unwrap_or_else(PoisonError::into_inner).by_name.get(&entry.service).copied()
        else {
            return Ok(());
        };
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        for key in keys(slot, entry) {
            let range = (key.proto, entry.ports.first, entry.ports.last);
            let ranges = names.ranges.entry(key).or_default();
            if added {
                if !ranges.contains(&range) {
                    ranges.push(range);
                }
            } else {
                ranges.retain(|r| *r != range);
            }
            let value = value_of(ranges);
            if ranges.is_empty() {
                names.ranges.remove(&key);
            }
            match value {
                Some(value) => names.map.insert(key, value, 0).map_err(map_err(map_names::NAMES))?,
                None => match names.map.remove(&key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(map_names::NAMES)(e)),
                },
            }
        }
        Ok(())
    }
}

/// The `DF_NAMES` keys of an allow entry: one per protocol.
fn keys(slot: u32, entry: &AllowEntry) -> Vec<NameKey> {
    let protocols: &[u8] = match entry.proto {
        Proto::Tcp => &[IPPROTO_TCP],
        Proto::Udp => &[IPPROTO_UDP],
        Proto::Any => &[IPPROTO_TCP, IPPROTO_UDP],
    };
    protocols.iter().map(|&proto| NameKey::new(slot, proto, entry.addr)).collect()
}

/// The kernel value for a key's ranges (at most the first eight; None when there is none).
fn value_of(ranges: &[(u8, u16, u16)]) -> Option<CidrValue> {
    if ranges.is_empty() {
        return None;
    }
    let ranges: Vec<PortRange> =
        ranges.iter().take(8).map(|&(proto, lo, hi)| PortRange::new(proto, lo, hi, NAME_RULE_ID)).collect();
    CidrValue::from_ranges(&ranges)
}

/// The cookie of the client socket of a loopback exchange: the socket that sent from `client`
/// to the proxy at `local`, found with one exact `sock_diag` request on `diag` (opened if
/// None). None when no such socket exists (any more).
fn client_socket_cookie(
    diag: &mut Option<SockDiag>,
    transport: Transport,
    client: SocketAddr,
    local: SocketAddr,
) -> std::io::Result<Option<u64>> {
    // The kernel looks a TCP socket up by its own (local, remote) pair, and a UDP socket as
    // the receiver of a datagram from `source` to `destination` ("swapped for historical
    // reasons", udp_diag.c). The client socket's local end is `client`.
    let (protocol, source, destination) = match transport {
        Transport::Tcp => (IPPROTO_TCP, client, local),
        Transport::Udp => (IPPROTO_UDP, local, client),
    };
    let diag = match diag {
        Some(diag) => diag,
        None => diag.insert(SockDiag::open()?),
    };
    Ok(diag.find(protocol, source, destination)?.map(|socket| socket.cookie))
}

impl Attributor for KernelDns {
    fn attribute(&self, client: SocketAddr, local: SocketAddr, transport: Transport) -> Option<Attribution> {
        let slot = self.record(client, local, transport)?;
        if slot.cgroup_id == 0 {
            return None;
        }
        let service =
            self.services.read().unwrap_or_else(PoisonError::into_inner).by_slot.get(&slot.counter_slot).cloned()?;
        Some(Attribution {
            service,
            cgroup_id: slot.cgroup_id,
            pid: slot.pid(),
            comm: slot.comm_name().into_owned(),
            original_server: slot.server(),
        })
    }
}

/// The id of the cgroup this process runs in (the proxy's own, exempt from the redirect).
pub fn own_cgroup_id(cgroup2: &crate::cgroup::Cgroup2) -> Option<u64> {
    crate::cgroup::cgroup_id(&cgroup2.current().ok()?).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

    use super::*;
    use crate::policy::PortRange as Ports;

    #[test]
    fn an_entry_for_any_protocol_has_a_key_per_protocol() {
        let entry = AllowEntry {
            service: Arc::from("web"),
            addr: "10.0.0.1".parse().unwrap(),
            proto: Proto::Any,
            ports: Ports::ANY,
        };
        let k = keys(3, &entry);
        assert_eq!(k.len(), 2);
        assert_eq!((k[0].counter_slot, k[0].proto), (3, IPPROTO_TCP));
        assert_eq!(k[1].proto, IPPROTO_UDP);
        assert_eq!(k[0].addr, NameKey::new(3, IPPROTO_TCP, "::ffff:10.0.0.1".parse().unwrap()).addr);
    }

    #[test]
    fn a_value_holds_every_range_of_its_key() {
        assert_eq!(value_of(&[]), None);
        let v = value_of(&[(IPPROTO_TCP, 443, 443), (IPPROTO_TCP, 8000, 8080)]).unwrap();
        assert_eq!(v.count, 2);
        assert_eq!((v.ranges[1].port_lo, v.ranges[1].port_hi, v.ranges[1].rule_id), (8000, 8080, NAME_RULE_ID));
    }
}
