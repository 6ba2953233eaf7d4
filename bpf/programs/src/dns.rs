//! The DNS redirect: a policed process's port-53 traffic goes to the agent's proxy on loopback,
//! with the asker recorded, and the answer comes back from the server the client addressed.

use core::intrinsics::{AtomicOrdering, atomic_xadd};
use core::ptr::{addr_of, addr_of_mut};

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_pid_tgid, generated as raw},
    programs::SockAddrContext,
};
use depfence_bpf_common::{
    CgroupState, DNS_SLOT_NET, DNS_SLOTS, DnsSlot, IP6_LOOPBACK, is_dns_proxy, lookup::Destination,
};

use crate::context::{ctx_set, ctx_u32, set_user_ip6, user_ip6};
use crate::maps::{DF_CONFIG, DF_DNS_NEXT, DF_DNS_SLOTS, DF_DNS_SOCKS};

/// The IPv4 address (network-order bytes in memory) of DNS slot `index`: `127.53.x.y`.
#[inline(always)]
fn slot_ip4(index: u32) -> u32 {
    let [x, y] = (index as u16).to_be_bytes();
    u32::from_ne_bytes([DNS_SLOT_NET[0], DNS_SLOT_NET[1], x, y])
}

/// Records who asked which server.
///
/// # Safety
/// `slot` points at one whole `DnsSlot` (a map value or a stack variable).
#[inline(always)]
unsafe fn record_asker(slot: *mut DnsSlot, cookie: u64, own: u64, s: &CgroupState, d: &Destination) {
    unsafe {
        (*slot).socket_cookie = cookie;
        (*slot).cgroup_id = own;
        (*slot).pid_tgid = bpf_get_current_pid_tgid();
        raw::bpf_get_current_comm(addr_of_mut!((*slot).comm).cast(), 16);
        (*slot).server_addr = d.addr;
        (*slot).server_port = d.port;
        (*slot).proto = d.proto;
        (*slot).family = d.family;
        (*slot).counter_slot = s.counter_slot;
    }
}

/// Sends a policed process's DNS query to the proxy on loopback, and records who asked which
/// server. False when there is no proxy, or the asker is the proxy itself.
///
/// * IPv4 sockets: the query takes the next slot of `DF_DNS_SLOTS` and goes to `127.53.x.y`
///   (the slot's address): the proxy reads the asker from the address the query arrived at.
/// * IPv6 sockets go to `[::1]` (an IPv4-mapped address fails on `IPV6_V6ONLY` sockets, and
///   sendmsg6 may not rewrite to one); the asker is recorded under the socket's cookie in
///   `DF_DNS_SOCKS`, which the proxy finds with one `sock_diag` lookup.
#[inline(always)]
pub fn redirect_dns(ctx: &SockAddrContext, v6: bool, own: u64, s: &CgroupState, d: &Destination) -> bool {
    let Some(cfg) = DF_CONFIG.get(0) else {
        return false;
    };
    let proxy_port = cfg.dns_proxy_port;
    if proxy_port == 0 || proxy_port > 0xffff || own == cfg.dns_exempt_cgroup {
        return false;
    }
    // SAFETY: helper on the hook's own context.
    let cookie = unsafe { raw::bpf_get_socket_cookie(ctx.as_ptr()) };
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    if v6 {
        let mut record = DnsSlot::default();
        // SAFETY: a whole stack value.
        unsafe { record_asker(&mut record, cookie, own, s, d) };
        if DF_DNS_SOCKS.insert(cookie, record, 0).is_err() {
            return false;
        }
        // SAFETY: `sa` is the connect6/sendmsg6 context, which may be rewritten.
        unsafe { set_user_ip6(sa, IP6_LOOPBACK) };
    } else {
        let Some(next) = DF_DNS_NEXT.get_ptr_mut(0) else {
            return false;
        };
        // An atomic fetch-and-add (BPF_ATOMIC | BPF_FETCH): the bpf target has no
        // compare-and-swap, so `AtomicU64::fetch_add` does not exist there; the intrinsic lowers
        // to the one instruction, and every concurrent asker gets its own value. SeqCst, not
        // Relaxed: the LLVM 22 BPF back end emits a relaxed fetch-add without its FETCH flag
        // (a plain `lock +=`) yet reads the result register as if fetched, so every asker got
        // slot 2. cli/tests/dns.rs catches that with 24 concurrent askers.
        // SAFETY: an aligned u64 in a map value, shared by every CPU, only ever touched atomically.
        let sequence = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(next, 1) };
        // Slots 1 ..= DNS_SLOTS - 2: never 127.53.0.0 or 127.53.255.255.
        let index = (sequence % u64::from(DNS_SLOTS - 2)) as u32 + 1;
        let Some(slot) = DF_DNS_SLOTS.get_ptr_mut(index) else {
            return false;
        };
        // SAFETY: `slot` is one whole map value; the context write is a 4-byte store to a field
        // connect4/sendmsg4 hooks may rewrite.
        unsafe {
            record_asker(slot, cookie, own, s, d);
            ctx_set(addr_of_mut!((*sa).user_ip4), slot_ip4(index));
        }
    }
    // SAFETY: as above.
    unsafe { ctx_set(addr_of_mut!((*sa).user_port), u32::from((proxy_port as u16).to_be())) };
    true
}

/// recvmsg/getpeername: a peer that is the proxy, on a socket whose query was redirected,
/// becomes the server the client addressed, so stub resolvers accept the answer. Everything
/// else is left alone.
#[inline(always)]
pub fn restore_dns_peer(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some(cfg) = DF_CONFIG.get(0) else {
        return 1;
    };
    let proxy_port = cfg.dns_proxy_port;
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: 4-byte reads of the kernel context.
    let port = unsafe { u16::from_be(ctx_u32(addr_of!((*sa).user_port)) as u16) };
    if proxy_port == 0 || u32::from(port) != proxy_port {
        return 1;
    }
    let slot = if v6 {
        // SAFETY: 4-byte reads of the kernel context.
        let peer = unsafe { user_ip6(sa) };
        if peer != IP6_LOOPBACK {
            return 1;
        }
        // SAFETY: helper on the hook's own context; the value is plain data.
        let Some(slot) = (unsafe { DF_DNS_SOCKS.get(raw::bpf_get_socket_cookie(ctx.as_ptr())) }) else {
            return 1;
        };
        slot
    } else {
        // SAFETY: a 4-byte read of the kernel context.
        let [a, b, x, y] = unsafe { ctx_u32(addr_of!((*sa).user_ip4)) }.to_ne_bytes();
        if [a, b] != DNS_SLOT_NET {
            return 1;
        }
        let Some(slot) = DF_DNS_SLOTS.get(u32::from(u16::from_be_bytes([x, y]))) else {
            return 1;
        };
        // SAFETY: helper on the hook's own context.
        if slot.socket_cookie != unsafe { raw::bpf_get_socket_cookie(ctx.as_ptr()) } {
            return 1;
        }
        slot
    };
    let server = slot.server_addr;
    // SAFETY: 4-byte writes to fields recvmsg and getpeername hooks may rewrite.
    unsafe {
        if v6 {
            set_user_ip6(sa, server);
        } else {
            ctx_set(addr_of_mut!((*sa).user_ip4), server[3]);
        }
        ctx_set(addr_of_mut!((*sa).user_port), u32::from(slot.server_port.to_be()));
    }
    1
}

/// Whether `d` is the DNS proxy, where the connect hook sent a policed process's DNS socket: a
/// send on a socket connected there was judged when it connected.
#[inline(always)]
pub fn is_proxy(d: &Destination) -> bool {
    DF_CONFIG.get(0).is_some_and(|cfg| is_dns_proxy(d, cfg.dns_proxy_port))
}
