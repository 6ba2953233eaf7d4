//! Connections that outlive the policy that let them in: the hooks judge a connection once,
//! when it is made, so a connection opened while its service was in audit, or allowed by the
//! generation before a swap, would go on after the service is enforced or its rule is gone.
//! After each change the agent sweeps: every connected socket of a cgroup under a policy is
//! judged exactly as the connect hook would judge a new connection to its peer (the shared lookup
//! over the kernel's own maps). In enforce the ones it would refuse are closed; in audit they are
//! reported, as would-rejects that no counter of the hook saw (a connection made before the
//! policy, that a promotion to enforce would close).
//!
//! Only outbound connections are judged: a TCP connection whose local port has a listener, or a
//! connected UDP socket whose local port is also bound by an unconnected one (a server's
//! per-client socket), is taken for an inbound one and left open. So is a socket no process
//! holds any more (closed, the kernel finishing the close): nothing reads or writes it, and the
//! listener of an inbound one may be gone with its process. (A server that closes its listener
//! while its process still serves accepted connections would have them judged as outbound.)
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use aya::maps::{HashMap, MapData};

use super::abi::{
    CgroupState, CidrKeyData, CidrValue, FLAG_DNS, IPPROTO_TCP, MODE_ENFORCE, MODE_OFF, NameKey, RuleKey, is_dns_proxy,
    lookup::{Destination, Extra, LOOKUP_PREFIX_LEN, RuleMaps, first_match},
    map_names,
    user::addr_words,
};
use super::sockets::{InetSocket, SockDiag, TCP_ESTABLISHED, TCP_LISTEN};
use super::{Datapath, DatapathError, Maps, map_err, open_pinned};

/// A connection the policy in force would refuse if it were made now: closed in enforce,
/// reported in audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedSocket {
    /// It was closed (enforce); false: it stays open (audit).
    pub closed: bool,
    /// The kernel's socket cookie (one connection found by several sweeps is one).
    pub cookie: u64,
    /// The cgroup the socket was created in.
    pub cgroup_id: u64,
    /// The registered cgroup whose policy judged it.
    pub policy_cgroup_id: u64,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// Its local end.
    pub local: SocketAddr,
    /// Its peer: the destination the policy no longer allows.
    pub remote: SocketAddr,
    /// The policy generation that judged it.
    pub generation: u32,
}

/// The kernel's rule maps read from user space, for the shared lookup.
struct KernelMaps<'a> {
    maps: &'a Maps,
    names: HashMap<MapData, NameKey, CidrValue>,
}

impl RuleMaps for KernelMaps<'_> {
    type Ranges<'b>
        = Box<CidrValue>
    where
        Self: 'b;

    fn exact(&self, key: &RuleKey) -> Option<u32> {
        self.maps.rules.get(key, 0).ok().map(|v| v.rule_id)
    }

    fn longest_prefix(&self, key: &CidrKeyData) -> Option<Box<CidrValue>> {
        let key = aya::maps::lpm_trie::Key::new(LOOKUP_PREFIX_LEN, *key);
        self.maps.cidrs.get(&key, 0).ok().map(Box::new)
    }

    fn names(&self, key: &NameKey) -> Option<Box<CidrValue>> {
        self.names.get(key, 0).ok().map(Box::new)
    }
}

/// Where `socket` connects to, if it is an outbound connection (see the module documentation).
fn outbound_destination(socket: &InetSocket, servers: &BTreeSet<(u8, u16)>) -> Option<Destination> {
    let connected =
        if socket.protocol == IPPROTO_TCP { socket.state != TCP_LISTEN } else { socket.state == TCP_ESTABLISHED };
    if !connected
        || socket.orphan
        || socket.remote.port() == 0
        || servers.contains(&(socket.protocol, socket.local.port()))
    {
        return None;
    }
    Some(Destination {
        addr: addr_words(socket.remote.ip()),
        port: socket.remote.port(),
        proto: socket.protocol,
        family: socket.family,
    })
}

/// The (protocol, local port) pairs that serve: TCP listeners, unconnected bound UDP sockets.
fn server_ports(sockets: &[InetSocket]) -> BTreeSet<(u8, u16)> {
    sockets
        .iter()
        .filter(|s| if s.protocol == IPPROTO_TCP { s.state == TCP_LISTEN } else { s.state != TCP_ESTABLISHED })
        .filter(|s| s.local.port() != 0)
        .map(|s| (s.protocol, s.local.port()))
        .collect()
}

impl Datapath {
    /// Finds every connection of a cgroup in audit or enforce that the policy in force would
    /// refuse if it were made now, and closes it in enforce. `policy_of` maps each cgroup id to
    /// the registered cgroup whose policy applies to it (itself, or its nearest registered
    /// ancestor), as the hooks find it.
    pub fn close_disallowed(&self, policy_of: &BTreeMap<u64, u64>) -> Result<Vec<ClosedSocket>, DatapathError> {
        let states: BTreeMap<u64, CgroupState> = self.maps.cgroup_states().into_iter().collect();
        if states.values().all(|s| s.mode == MODE_OFF) {
            return Ok(Vec::new());
        }
        let config = self.maps.config.get(&0, 0).map_err(map_err(map_names::CONFIG))?;
        let lookup = KernelMaps { maps: &self.maps, names: open_pinned(self.layout(), map_names::NAMES)? };
        let mut diag = SockDiag::open()?;
        let sockets = diag.all()?;
        let servers = server_ports(&sockets);
        let mut closed = Vec::new();
        for socket in sockets {
            let Some((cgroup_id, policy_cgroup_id)) = socket.cgroup_id.and_then(|id| Some((id, *policy_of.get(&id)?)))
            else {
                continue;
            };
            let Some(&state) = states.get(&policy_cgroup_id) else { continue };
            if state.mode == MODE_OFF {
                continue;
            }
            let Some(d) = outbound_destination(&socket, &servers) else { continue };
            let dns = state.flags & FLAG_DNS != 0;
            if dns && is_dns_proxy(&d, config.dns_proxy_port) {
                continue;
            }
            if first_match(&lookup, state.ruleset_id, &d, Extra::active(&state)) != 0 {
                continue;
            }
            let enforce = state.mode == MODE_ENFORCE;
            if enforce {
                diag.destroy(&socket)?;
            }
            closed.push(ClosedSocket {
                closed: enforce,
                cookie: socket.cookie,
                cgroup_id,
                policy_cgroup_id,
                protocol: socket.protocol,
                local: socket.local,
                remote: socket.remote,
                generation: state.generation,
            });
        }
        Ok(closed)
    }
}
