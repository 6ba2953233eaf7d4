//! The hooks: connect4/6 and sendmsg4/6 judge a destination; recvmsg4/6 and getpeername4/6
//! finish the DNS redirect; sock_create, setsockopt and egress judge what no destination hook
//! can see (sockets of other protocols, IPv6 routing headers).

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock, bpf_sockopt},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockoptContext},
};
use depfence_bpf_common::{
    AF_INET6, ALLOW, CgroupState, DNS_PORT, EVENT_DESTINATION, EVENT_ROUTING_HEADER, EVENT_SOCKET, FLAG_DNS,
    FLAG_EVENT_ALLOWED, GLOBAL_BAD_SLOT, GLOBAL_UNREGISTERED, IPPROTO_ROUTING, IPPROTO_TCP, IPPROTO_UDP,
    MAX_CGROUP_DEPTH, MAX_COUNTER_SLOTS, MODE_OFF, VERDICT_ALLOWED, VERDICT_CANDIDATE_WOULD_REJECT, VERDICT_COUNT,
    action_of,
    lookup::{Destination, Extra, first_match},
    sets_routing_header, socket_admitted, verdict_of,
};

use crate::context::{connected_dest, ctx_u32, is_unaddressed, read_dest};
use crate::dns::{is_proxy, redirect_dns, restore_dns_peer};
use crate::maps::{DF_CGROUPS, DF_CONFIG, DF_COUNTERS, DF_GLOBALS, KernelRules, bump, count_rule_hit};
use crate::report::emit;

/// Whose cgroup a hook judges: the calling task's (connect, sendmsg, socket creation, socket
/// options), or a packet's socket's (egress, which may run outside the sender's context).
trait CgroupOf {
    /// The cgroup's own id.
    fn own(&self) -> u64;
    /// Its ancestor at `level` (0 = the root), 0 if deeper than the cgroup itself.
    fn ancestor(&self, level: i32) -> u64;
}

/// The current task's cgroup.
struct CurrentTask;

impl CgroupOf for CurrentTask {
    #[inline(always)]
    fn own(&self) -> u64 {
        // SAFETY: helper without arguments.
        unsafe { bpf_get_current_cgroup_id() }
    }

    #[inline(always)]
    fn ancestor(&self, level: i32) -> u64 {
        // SAFETY: helper with a scalar argument.
        unsafe { bpf_get_current_ancestor_cgroup_id(level) }
    }
}

/// The cgroup of the socket that sends a packet.
struct PacketSocket(*mut __sk_buff);

impl CgroupOf for PacketSocket {
    #[inline(always)]
    fn own(&self) -> u64 {
        // SAFETY: the hook's own packet.
        unsafe { bpf_skb_cgroup_id(self.0) }
    }

    #[inline(always)]
    fn ancestor(&self, level: i32) -> u64 {
        // SAFETY: the hook's own packet, a scalar level.
        unsafe { bpf_skb_ancestor_cgroup_id(self.0, level) }
    }
}

/// Nearest registered cgroup: (own cgroup id, registered id, state).
#[inline(always)]
fn find_state(cgroup: &impl CgroupOf) -> (u64, u64, Option<&'static CgroupState>) {
    let own = cgroup.own();
    // SAFETY: values are plain data, replaced whole by the loader (no partial writes).
    if let Some(s) = unsafe { DF_CGROUPS.get(own) } {
        return (own, own, Some(s));
    }
    // Deepest level first, starting at the deepest registered level (agent-maintained);
    // levels below the process's own depth return 0 and cost no lookup.
    let max_level = DF_CONFIG.get(0).map_or(0, |c| c.max_level);
    let mut level = if max_level == 0 || max_level >= MAX_CGROUP_DEPTH { MAX_CGROUP_DEPTH - 1 } else { max_level };
    let mut i: u32 = 1;
    while i < MAX_CGROUP_DEPTH {
        if level == 0 {
            break;
        }
        let id = cgroup.ancestor(level as i32);
        if id != 0
            && id != own
            && let Some(s) = unsafe { DF_CGROUPS.get(id) }
        {
            return (own, id, Some(s));
        }
        level -= 1;
        i += 1;
    }
    (own, 0, None)
}

/// The shared core of connect4/6 and sendmsg4/6.
#[inline(always)]
fn decide(ctx: &SockAddrContext, v6: bool, sendmsg: bool) -> i32 {
    let (own, policy, state) = find_state(&CurrentTask);
    let Some(s) = state else {
        bump(&DF_GLOBALS, GLOBAL_UNREGISTERED);
        return ALLOW;
    };
    let mode = s.mode;
    if mode == MODE_OFF {
        return ALLOW;
    }
    let slot = s.counter_slot;
    if slot >= MAX_COUNTER_SLOTS {
        bump(&DF_GLOBALS, GLOBAL_BAD_SLOT);
        return ALLOW;
    }
    let base = slot * VERDICT_COUNT;
    let mut d = read_dest(ctx, v6);
    let flags = s.flags;
    let dns = flags & FLAG_DNS != 0;
    if sendmsg && is_unaddressed(&d) {
        // A connected socket's send: judged by where it is connected (a DNS socket the connect
        // hook sent to the proxy was judged then).
        d = connected_dest(ctx, v6, d.proto);
        if dns && is_proxy(&d) {
            return ALLOW;
        }
    }
    if dns
        && d.port == DNS_PORT
        && (d.proto == IPPROTO_UDP || d.proto == IPPROTO_TCP)
        && redirect_dns(ctx, v6, own, s, &d)
    {
        return ALLOW;
    }
    let active = s.ruleset_id;
    let hit = first_match(&KernelRules, active, &d, Extra::active(s));
    let verdict = verdict_of(mode, hit != 0);
    bump(&DF_COUNTERS, base + verdict);
    if hit != 0 {
        count_rule_hit(active, hit);
    }
    if verdict != VERDICT_ALLOWED || flags & FLAG_EVENT_ALLOWED != 0 {
        emit(own, policy, s, &d, verdict, active, EVENT_DESTINATION);
    }

    let cand = s.candidate_ruleset;
    if cand != 0 && cand != active && first_match(&KernelRules, cand, &d, Extra::candidate(s)) == 0 {
        bump(&DF_COUNTERS, base + VERDICT_CANDIDATE_WOULD_REJECT);
        emit(own, policy, s, &d, VERDICT_CANDIDATE_WOULD_REJECT, cand, EVENT_DESTINATION);
    }
    action_of(verdict)
}

#[cgroup_sock_addr(connect4)]
pub fn df_connect4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, false, false)
}

#[cgroup_sock_addr(connect6)]
pub fn df_connect6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, true, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn df_sendmsg4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, false, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn df_sendmsg6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, true, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn df_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_dns_peer(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn df_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_dns_peer(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn df_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_dns_peer(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn df_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_dns_peer(&ctx, true)
}

/// The shared core of the hooks for what no rule can allow (a socket the destination hooks
/// cannot see, a routing header): judged as a destination no rule matches, so refused in
/// enforce, counted and reported as a would-reject in audit, let through where the mode is off.
#[inline(always)]
fn judge_unseen(cgroup: &impl CgroupOf, d: &Destination, kind: u32) -> i32 {
    let (own, policy, state) = find_state(cgroup);
    let Some(s) = state else {
        bump(&DF_GLOBALS, GLOBAL_UNREGISTERED);
        return ALLOW;
    };
    if s.mode == MODE_OFF {
        return ALLOW;
    }
    let slot = s.counter_slot;
    if slot >= MAX_COUNTER_SLOTS {
        bump(&DF_GLOBALS, GLOBAL_BAD_SLOT);
        return ALLOW;
    }
    let verdict = verdict_of(s.mode, false);
    bump(&DF_COUNTERS, slot * VERDICT_COUNT + verdict);
    emit(own, policy, s, d, verdict, s.ruleset_id, kind);
    action_of(verdict)
}

#[cgroup_sock(sock_create)]
pub fn df_sock_create(ctx: SockContext) -> i32 {
    let sk: *const bpf_sock = ctx.sock;
    // SAFETY: the hook's socket; each read is one 4-byte field load.
    let (family, sock_type, protocol) = unsafe {
        (
            ctx_u32(core::ptr::addr_of!((*sk).family)),
            ctx_u32(core::ptr::addr_of!((*sk).type_)),
            ctx_u32(core::ptr::addr_of!((*sk).protocol)),
        )
    };
    if socket_admitted(family, sock_type, protocol) {
        return ALLOW;
    }
    let d = Destination { addr: [0; 4], port: sock_type as u16, proto: protocol as u8, family: family as u8 };
    judge_unseen(&CurrentTask, &d, EVENT_SOCKET)
}

#[cgroup_sockopt(setsockopt)]
pub fn df_setsockopt(ctx: SockoptContext) -> i32 {
    let so: *const bpf_sockopt = ctx.sockopt;
    // SAFETY: the hook's context; each read is one 4-byte field load.
    let (level, optname) = unsafe {
        (
            ctx_u32(core::ptr::addr_of!((*so).level).cast()) as i32,
            ctx_u32(core::ptr::addr_of!((*so).optname).cast()) as i32,
        )
    };
    if !sets_routing_header(level, optname) {
        return ALLOW;
    }
    let d = Destination { addr: [0; 4], port: 0, proto: IPPROTO_ROUTING, family: AF_INET6 };
    judge_unseen(&CurrentTask, &d, EVENT_ROUTING_HEADER)
}

/// `ETH_P_IPV6` as `__sk_buff::protocol` holds it (network order in the low 16 bits).
const ETH_P_IPV6_BE: u32 = 0x86dd_u16.to_be() as u32;
/// Offset of the next-header byte in the IPv6 header.
const IPV6_NEXTHDR: usize = 6;
/// Offset of the destination address in the IPv6 header.
const IPV6_DADDR: usize = 24;

/// A routing header set per message (`IPV6_RTHDR` as a control message, which no socket-option
/// hook sees) or on a socket before its service was enforced: the packet goes to its first hop,
/// so it is judged here, where the packet is complete.
#[cgroup_skb(egress)]
pub fn df_egress(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the hook's packet; one 4-byte field load.
    if unsafe { ctx_u32(core::ptr::addr_of!((*skb).protocol)) } != ETH_P_IPV6_BE {
        return ALLOW;
    }
    // Only the first extension header can be a routing header an unprivileged sender set: the
    // others before it (hop-by-hop, destination options) need CAP_NET_RAW.
    match ctx.load::<u8>(IPV6_NEXTHDR) {
        Ok(IPPROTO_ROUTING) => {}
        _ => return ALLOW,
    }
    let Ok(first_hop) = ctx.load::<[u32; 4]>(IPV6_DADDR) else { return ALLOW };
    let d = Destination { addr: first_hop, port: 0, proto: IPPROTO_ROUTING, family: AF_INET6 };
    judge_unseen(&PacketSocket(skb), &d, EVENT_ROUTING_HEADER)
}
