//! Reading and rewriting the `bpf_sock_addr` context, one full 4-byte field at a time.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    programs::SockAddrContext,
};
use depfence_bpf_common::{AF_INET, AF_INET6, lookup::Destination};

/// Read a context field with exactly one 4-byte load. The verifier rejects narrow loads of
/// `family`/`type`/`protocol` ("invalid bpf_context access off=36 size=1" for a u8 load of
/// `protocol`); a plain read truncated later is *usually* kept 4 bytes wide by LLVM, but
/// nothing guarantees it, so every context read goes through here.
///
/// # Safety
/// `p` points at a field of the hook's context.
#[inline(always)]
pub unsafe fn ctx_u32(p: *const u32) -> u32 {
    unsafe { read_volatile(p) }
}

/// Write one 4-byte context field.
///
/// # Safety
/// `p` points at a field of the hook's context that this hook may rewrite.
#[inline(always)]
pub unsafe fn ctx_set(p: *mut u32, value: u32) {
    unsafe { write_volatile(p, value) }
}

/// The IPv6 address of a context (`user_ip6`), one 4-byte load per word.
///
/// # Safety
/// `sa` is the hook's context.
#[inline(always)]
pub unsafe fn user_ip6(sa: *const bpf_sock_addr) -> [u32; 4] {
    unsafe {
        [
            ctx_u32(addr_of!((*sa).user_ip6[0])),
            ctx_u32(addr_of!((*sa).user_ip6[1])),
            ctx_u32(addr_of!((*sa).user_ip6[2])),
            ctx_u32(addr_of!((*sa).user_ip6[3])),
        ]
    }
}

/// Write the IPv6 address of a context, one 4-byte store per word.
///
/// # Safety
/// `sa` is the hook's context, of a hook that may rewrite `user_ip6`.
#[inline(always)]
pub unsafe fn set_user_ip6(sa: *mut bpf_sock_addr, [w0, w1, w2, w3]: [u32; 4]) {
    unsafe {
        ctx_set(addr_of_mut!((*sa).user_ip6[0]), w0);
        ctx_set(addr_of_mut!((*sa).user_ip6[1]), w1);
        ctx_set(addr_of_mut!((*sa).user_ip6[2]), w2);
        ctx_set(addr_of_mut!((*sa).user_ip6[3]), w3);
    }
}

/// The destination of a connect or sendmsg, as the caller gave it.
#[inline(always)]
pub fn read_dest(ctx: &SockAddrContext, v6: bool) -> Destination {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the kernel-provided context; each read is a full 4-byte field load.
    unsafe {
        let proto = ctx_u32(addr_of!((*sa).protocol)) as u8;
        // user_port: low 16 bits hold the port in network order.
        let port = u16::from_be(ctx_u32(addr_of!((*sa).user_port)) as u16);
        if v6 {
            Destination { addr: user_ip6(sa), port, proto, family: AF_INET6 }
        } else {
            // ::ffff:a.b.c.d — memory bytes 00..00 ff ff a b c d.
            let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
            let a = [0, 0, mapped, ctx_u32(addr_of!((*sa).user_ip4))];
            Destination { addr: a, port, proto, family: AF_INET }
        }
    }
}

/// Whether `d` holds no address: a send on a connected socket. The kernel runs the sendmsg hook
/// for a connected UDP socket that sends with control messages (`IP_TOS`, `IP_PKTINFO`, as QUIC
/// stacks do) and without an address, with a zeroed one; a send that names an address never has
/// port 0 (the kernel refuses it before the hook).
#[inline(always)]
pub fn is_unaddressed(d: &Destination) -> bool {
    d.port == 0 && d.addr[3] == 0 && (d.family == AF_INET || d.addr == [0; 4])
}

/// The destination the hook's socket is connected to, for a send with no address of its own.
#[inline(always)]
pub fn connected_dest(ctx: &SockAddrContext, v6: bool, proto: u8) -> Destination {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sk` of a sock_addr context is always a valid socket (PTR_TO_SOCKET); each read
    // is one load of a field the verifier allows: 4 bytes for addresses, 2 for the port.
    unsafe {
        let sk: *const bpf_sock = read_volatile(addr_of!((*sa).__bindgen_anon_1.sk)).cast_const();
        let port = u16::from_be(read_volatile(addr_of!((*sk).dst_port)));
        if v6 {
            let a = [
                ctx_u32(addr_of!((*sk).dst_ip6[0])),
                ctx_u32(addr_of!((*sk).dst_ip6[1])),
                ctx_u32(addr_of!((*sk).dst_ip6[2])),
                ctx_u32(addr_of!((*sk).dst_ip6[3])),
            ];
            Destination { addr: a, port, proto, family: AF_INET6 }
        } else {
            let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
            Destination { addr: [0, 0, mapped, ctx_u32(addr_of!((*sk).dst_ip4))], port, proto, family: AF_INET }
        }
    }
}
