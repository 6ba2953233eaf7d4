//! The hooks: connect4/6 and sendmsg4/6 judge a destination; recvmsg4/6 and getpeername4/6
//! finish the DNS redirect.

use aya_ebpf::{
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use depfence_bpf_common::{
    ALLOW, CgroupState, DNS_PORT, FLAG_ACTIVE_HAS_CIDR, FLAG_CANDIDATE_HAS_CIDR, FLAG_DNS, FLAG_EVENT_ALLOWED,
    GLOBAL_BAD_SLOT, GLOBAL_UNREGISTERED, IPPROTO_TCP, IPPROTO_UDP, MAX_CGROUP_DEPTH, MAX_COUNTER_SLOTS, MODE_OFF,
    VERDICT_ALLOWED, VERDICT_CANDIDATE_WOULD_REJECT, VERDICT_COUNT, action_of,
    lookup::{Extra, first_match},
    verdict_of,
};

use crate::context::{connected_dest, is_unaddressed, read_dest};
use crate::dns::{is_proxy, redirect_dns, restore_dns_peer};
use crate::maps::{DF_CGROUPS, DF_CONFIG, DF_COUNTERS, DF_GLOBALS, KernelRules, bump};
use crate::report::emit;

/// Nearest registered cgroup: (own cgroup id, registered id, state).
#[inline(always)]
fn find_state() -> (u64, u64, Option<&'static CgroupState>) {
    // SAFETY: helper without arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
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
        // SAFETY: helper with a scalar argument.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
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
    let (own, policy, state) = find_state();
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
    let names_slot = if dns { Some(slot) } else { None };

    let active = s.ruleset_id;
    let hit = first_match(&KernelRules, active, &d, Extra { cidr: flags & FLAG_ACTIVE_HAS_CIDR != 0, names_slot });
    let verdict = verdict_of(mode, hit != 0);
    bump(&DF_COUNTERS, base + verdict);
    if verdict != VERDICT_ALLOWED || flags & FLAG_EVENT_ALLOWED != 0 {
        emit(own, policy, s, &d, verdict, active);
    }

    let cand = s.candidate_ruleset;
    if cand != 0
        && cand != active
        && first_match(&KernelRules, cand, &d, Extra { cidr: flags & FLAG_CANDIDATE_HAS_CIDR != 0, names_slot }) == 0
    {
        bump(&DF_COUNTERS, base + VERDICT_CANDIDATE_WOULD_REJECT);
        emit(own, policy, s, &d, VERDICT_CANDIDATE_WOULD_REJECT, cand);
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
