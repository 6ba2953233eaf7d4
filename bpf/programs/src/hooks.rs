//! The hooks, maps and their shared core (compiled only for the bpf target).

use core::intrinsics::{AtomicOrdering, atomic_xadd};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated as raw,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::SockAddrContext,
};
use depfence_bpf_common::{
    AF_INET, AF_INET6, ALLOW, BPF_F_NO_PREALLOC, CgroupState, CidrKeyData, CidrValue, Config, DENY, DNS_PORT,
    DNS_SLOT_NET, DNS_SLOTS, DedupKey, DnsSlot, EVENTS_BYTES, Event, FLAG_ACTIVE_HAS_CIDR, FLAG_CANDIDATE_HAS_CIDR,
    FLAG_DNS, FLAG_EVENT_ALLOWED, FLAG_EVENT_NO_DEDUP, GLOBAL_BAD_SLOT, GLOBAL_COUNT, GLOBAL_EVENTS_DEDUPED,
    GLOBAL_EVENTS_DROPPED, GLOBAL_UNREGISTERED, IPPROTO_TCP, IPPROTO_UDP, MAX_CGROUP_DEPTH, MAX_CGROUPS,
    MAX_CIDR_PORT_RANGES, MAX_CIDRS, MAX_COUNTER_SLOTS, MAX_DEDUP, MAX_DNS_SOCKS, MAX_NAMES, MAX_RULES, MODE_AUDIT,
    MODE_ENFORCE, MODE_OFF, Meta, NameKey, RuleKey, RuleValue, VERDICT_ALLOWED, VERDICT_CANDIDATE_WOULD_REJECT,
    VERDICT_COUNT, VERDICT_REJECTED, VERDICT_WOULD_REJECT,
};

#[map]
static DF_CGROUPS: HashMap<u64, CgroupState> = HashMap::with_max_entries(MAX_CGROUPS, 0);
#[map]
static DF_RULES: HashMap<RuleKey, RuleValue> = HashMap::with_max_entries(MAX_RULES, BPF_F_NO_PREALLOC);
// LpmTrie::with_max_entries adds BPF_F_NO_PREALLOC itself (the kernel requires it).
#[map]
static DF_CIDRS: LpmTrie<CidrKeyData, CidrValue> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static DF_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_COUNTER_SLOTS * VERDICT_COUNT, 0);
#[map]
static DF_GLOBALS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GLOBAL_COUNT, 0);
#[map]
static DF_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
/// Written by the loader (ABI version); never read here.
#[map]
static DF_META: Array<Meta> = Array::with_max_entries(1, 0);
#[map]
static DF_CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static DF_DEDUP: LruHashMap<DedupKey, u64> = LruHashMap::with_max_entries(MAX_DEDUP, 0);
#[map]
static DF_NAMES: HashMap<NameKey, CidrValue> = HashMap::with_max_entries(MAX_NAMES, BPF_F_NO_PREALLOC);
#[map]
static DF_DNS_SLOTS: Array<DnsSlot> = Array::with_max_entries(DNS_SLOTS, 0);
#[map]
static DF_DNS_NEXT: Array<u64> = Array::with_max_entries(1, 0);
#[map]
static DF_DNS_SOCKS: LruHashMap<u64, DnsSlot> = LruHashMap::with_max_entries(MAX_DNS_SOCKS, 0);
/// Baseline for benchmarks: DESIGN.md §5's "one exact hash lookup + one per-CPU counter".
#[map]
static DF_BASE_CNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Destination as read from the context.
struct Dest {
    addr: [u32; 4],
    /// Host order.
    port: u16,
    proto: u8,
    family: u8,
}

/// Read a context field with exactly one 4-byte load. The verifier rejects narrow loads of
/// `family`/`type`/`protocol` ("invalid bpf_context access off=36 size=1" for a u8 load of
/// `protocol`); a plain read truncated later is *usually* kept 4 bytes wide by LLVM, but
/// nothing guarantees it, so every context read goes through here.
#[inline(always)]
unsafe fn ctx_u32(p: *const u32) -> u32 {
    unsafe { read_volatile(p) }
}

#[inline(always)]
fn read_dest(ctx: &SockAddrContext, v6: bool) -> Dest {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the kernel-provided context; each read is a full 4-byte field load.
    unsafe {
        let proto = ctx_u32(addr_of!((*sa).protocol)) as u8;
        // user_port: low 16 bits hold the port in network order.
        let port = u16::from_be(ctx_u32(addr_of!((*sa).user_port)) as u16);
        if v6 {
            let a = [
                ctx_u32(addr_of!((*sa).user_ip6[0])),
                ctx_u32(addr_of!((*sa).user_ip6[1])),
                ctx_u32(addr_of!((*sa).user_ip6[2])),
                ctx_u32(addr_of!((*sa).user_ip6[3])),
            ];
            Dest { addr: a, port, proto, family: AF_INET6 }
        } else {
            // ::ffff:a.b.c.d — memory bytes 00..00 ff ff a b c d.
            let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
            let a = [0, 0, mapped, ctx_u32(addr_of!((*sa).user_ip4))];
            Dest { addr: a, port, proto, family: AF_INET }
        }
    }
}

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

/// Where a ruleset's allows live besides its exact rules.
#[derive(Clone, Copy)]
struct Extra {
    /// The ruleset has address blocks (`DF_CIDRS`).
    cidr: bool,
    /// The service is under the DNS proxy: addresses admitted for its counter slot
    /// (`DF_NAMES`) are allowed too.
    names_slot: Option<u32>,
}

/// Rule id of the first range of `v` that covers `d`'s protocol and port, or 0.
#[inline(always)]
fn range_hit(v: &CidrValue, d: &Dest) -> u32 {
    // A fixed-size array walked at most MAX_CIDR_PORT_RANGES times: the verifier sees the bound.
    for r in v.ranges.iter().take((v.count as usize).min(MAX_CIDR_PORT_RANGES)) {
        if (r.proto == 0 || r.proto == d.proto) && r.port_lo <= d.port && d.port <= r.port_hi {
            return r.rule_id;
        }
    }
    0
}

/// Rule id (≥ 1) of the first rule of `ruleset` that allows `d`, or 0.
#[inline(always)]
fn matches(ruleset: u32, d: &Dest, extra: Extra) -> u32 {
    if ruleset == 0 {
        return 0;
    }
    let mut key = RuleKey { ruleset, proto: d.proto, _pad: 0, port: d.port, addr: d.addr };
    if let Some(v) = unsafe { DF_RULES.get(key) } {
        return v.rule_id;
    }
    key.port = 0;
    if let Some(v) = unsafe { DF_RULES.get(key) } {
        return v.rule_id;
    }
    if extra.cidr {
        let lpm = Key::new(128 + 32, CidrKeyData { ruleset_be: ruleset.to_be(), addr: d.addr });
        if let Some(v) = DF_CIDRS.get(&lpm) {
            let hit = range_hit(v, d);
            if hit != 0 {
                return hit;
            }
        }
    }
    if let Some(counter_slot) = extra.names_slot {
        let key = NameKey { counter_slot, proto: d.proto, _pad: [0; 3], addr: d.addr };
        // SAFETY: map lookup of a plain-data value.
        if let Some(v) = unsafe { DF_NAMES.get(key) } {
            return range_hit(v, d);
        }
    }
    0
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, idx: u32) {
    if let Some(p) = map.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn emit(own: u64, policy: u64, s: &CgroupState, d: &Dest, verdict: u32, ruleset: u32) {
    let window = DF_CONFIG.get(0).map_or(0, |c| c.dedup_window_ns);
    if window != 0 && s.flags & FLAG_EVENT_NO_DEDUP == 0 {
        // SAFETY: helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        let key =
            DedupKey { cgroup_id: own, addr: d.addr, port: d.port, proto: d.proto, verdict: verdict as u8, _pad: 0 };
        if let Some(last) = DF_DEDUP.get_ptr_mut(key) {
            // SAFETY: map value pointer; racing writers only make the window approximate.
            unsafe {
                if now.wrapping_sub(*last) < window {
                    bump(&DF_GLOBALS, GLOBAL_EVENTS_DEDUPED);
                    return;
                }
                *last = now;
            }
        } else {
            let _ = DF_DEDUP.insert(key, now, 0);
        }
    }
    let Some(mut entry) = DF_EVENTS.reserve::<Event>(0) else {
        bump(&DF_GLOBALS, GLOBAL_EVENTS_DROPPED);
        return;
    };
    // Fill the reserved record in place (a stack Event + copy pulls in memset/memcpy
    // subprogram calls).
    let e: *mut Event = entry.as_mut_ptr();
    // SAFETY: `e` points to size_of::<Event>() reserved bytes; every field is written.
    unsafe {
        (*e).ts_ns = bpf_ktime_get_ns();
        (*e).cgroup_id = own;
        (*e).policy_cgroup_id = policy;
        (*e).pid_tgid = bpf_get_current_pid_tgid();
        // The kernel zero-fills on failure.
        raw::bpf_get_current_comm(addr_of_mut!((*e).comm).cast(), 16);
        (*e).addr = d.addr;
        (*e).port = d.port;
        (*e).proto = d.proto;
        (*e).family = d.family;
        (*e).verdict = verdict;
        (*e).ruleset_id = ruleset;
        (*e).generation = s.generation;
    }
    entry.submit(0);
}

/// Write one 4-byte context field.
#[inline(always)]
unsafe fn ctx_set(p: *mut u32, value: u32) {
    unsafe { write_volatile(p, value) }
}

/// Write the IPv6 address of a context, one 4-byte store per word.
///
/// # Safety
/// `sa` is the hook's context, of a hook that may rewrite `user_ip6`.
#[inline(always)]
unsafe fn set_user_ip6(sa: *mut bpf_sock_addr, [w0, w1, w2, w3]: [u32; 4]) {
    unsafe {
        ctx_set(addr_of_mut!((*sa).user_ip6[0]), w0);
        ctx_set(addr_of_mut!((*sa).user_ip6[1]), w1);
        ctx_set(addr_of_mut!((*sa).user_ip6[2]), w2);
        ctx_set(addr_of_mut!((*sa).user_ip6[3]), w3);
    }
}

/// The IPv4 address (network-order bytes in memory) of DNS slot `index`: `127.53.x.y`.
#[inline(always)]
fn slot_ip4(index: u32) -> u32 {
    let [x, y] = (index as u16).to_be_bytes();
    u32::from_ne_bytes([DNS_SLOT_NET[0], DNS_SLOT_NET[1], x, y])
}

/// `::1` as the context holds it.
const IP6_LOOPBACK: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// Records who asked which server.
///
/// # Safety
/// `slot` points at one whole `DnsSlot` (a map value or a stack variable).
#[inline(always)]
unsafe fn record_asker(slot: *mut DnsSlot, cookie: u64, own: u64, s: &CgroupState, d: &Dest) {
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
fn redirect_dns(ctx: &SockAddrContext, v6: bool, own: u64, s: &CgroupState, d: &Dest) -> bool {
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
fn restore_dns_peer(ctx: &SockAddrContext, v6: bool) -> i32 {
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
        let peer = unsafe {
            [
                ctx_u32(addr_of!((*sa).user_ip6[0])),
                ctx_u32(addr_of!((*sa).user_ip6[1])),
                ctx_u32(addr_of!((*sa).user_ip6[2])),
                ctx_u32(addr_of!((*sa).user_ip6[3])),
            ]
        };
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

#[inline(always)]
fn decide(ctx: &SockAddrContext, v6: bool) -> i32 {
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
    let d = read_dest(ctx, v6);
    let flags = s.flags;
    let dns = flags & FLAG_DNS != 0;
    if dns
        && d.port == DNS_PORT
        && (d.proto == IPPROTO_UDP || d.proto == IPPROTO_TCP)
        && redirect_dns(ctx, v6, own, s, &d)
    {
        return ALLOW;
    }
    let names_slot = if dns { Some(slot) } else { None };

    let active = s.ruleset_id;
    let hit = matches(active, &d, Extra { cidr: flags & FLAG_ACTIVE_HAS_CIDR != 0, names_slot });
    let (verdict, ret) = if hit != 0 {
        (VERDICT_ALLOWED, ALLOW)
    } else if mode == MODE_ENFORCE {
        (VERDICT_REJECTED, DENY)
    } else if mode == MODE_AUDIT {
        (VERDICT_WOULD_REJECT, ALLOW)
    } else {
        // Unknown mode: fail open but count it as would_reject so it shows up.
        (VERDICT_WOULD_REJECT, ALLOW)
    };
    bump(&DF_COUNTERS, base + verdict);
    if verdict != VERDICT_ALLOWED || flags & FLAG_EVENT_ALLOWED != 0 {
        emit(own, policy, s, &d, verdict, active);
    }

    let cand = s.candidate_ruleset;
    if cand != 0
        && cand != active
        && matches(cand, &d, Extra { cidr: flags & FLAG_CANDIDATE_HAS_CIDR != 0, names_slot }) == 0
    {
        bump(&DF_COUNTERS, base + VERDICT_CANDIDATE_WOULD_REJECT);
        emit(own, policy, s, &d, VERDICT_CANDIDATE_WOULD_REJECT, cand);
    }
    ret
}

#[cgroup_sock_addr(connect4)]
pub fn df_connect4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn df_connect6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn df_sendmsg4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn df_sendmsg6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, true)
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

/// The benchmark variants' shared tail: one exact `DF_RULES` lookup for the destination in
/// `ruleset`, one per-CPU counter bump (hit or miss); always allows.
#[inline(always)]
fn count_exact_hit(ctx: &SockAddrContext, ruleset: u32) -> i32 {
    let d = read_dest(ctx, false);
    let key = RuleKey { ruleset, proto: d.proto, _pad: 0, port: d.port, addr: d.addr };
    // SAFETY: map lookup; the value is only tested for presence.
    let hit = unsafe { DF_RULES.get(key) }.is_some();
    bump(&DF_BASE_CNT, u32::from(hit));
    ALLOW
}

/// Benchmark baseline (connect4): own cgroup id → one exact `DF_RULES` lookup → one per-CPU
/// counter. Attached only by the benchmark, on its own cgroup.
#[cgroup_sock_addr(connect4)]
pub fn df_baseline4(ctx: SockAddrContext) -> i32 {
    count_exact_hit(&ctx, 1)
}

// ---- benchmark-only variants (same object, attached only by the bench test) ----

/// cgroup id → DF_CGROUPS → DF_RULES → counter: the irreducible two lookups of the
/// "cgroup → ruleset indirection" design.
#[cgroup_sock_addr(connect4)]
pub fn df_bench_2lookups(ctx: SockAddrContext) -> i32 {
    // SAFETY: helper without arguments.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    let Some(s) = (unsafe { DF_CGROUPS.get(cg) }) else {
        return ALLOW;
    };
    count_exact_hit(&ctx, s.ruleset_id)
}

/// Helper cost: bpf_get_current_cgroup_id + counter only.
#[cgroup_sock_addr(connect4)]
pub fn df_bench_cgid(_ctx: SockAddrContext) -> i32 {
    // SAFETY: helper without arguments.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    bump(&DF_BASE_CNT, (cg & 1) as u32);
    ALLOW
}

/// Floor: an empty program.
#[cgroup_sock_addr(connect4)]
pub fn df_bench_empty(_ctx: SockAddrContext) -> i32 {
    ALLOW
}

/// helper → DF_CGROUPS lookup → counter.
#[cgroup_sock_addr(connect4)]
pub fn df_bench_cgstate(_ctx: SockAddrContext) -> i32 {
    // SAFETY: helper without arguments.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    let hit = unsafe { DF_CGROUPS.get(cg) }.is_some();
    bump(&DF_BASE_CNT, u32::from(hit));
    ALLOW
}

/// u64-key hash cost: DF_CGROUPS lookup with a key from the agent (no helper) + counter.
#[cgroup_sock_addr(connect4)]
pub fn df_bench_cghash(_ctx: SockAddrContext) -> i32 {
    let key = DF_CONFIG.get(0).map_or(0, |c| c.dedup_window_ns);
    let hit = unsafe { DF_CGROUPS.get(key) }.is_some();
    bump(&DF_BASE_CNT, u32::from(hit));
    ALLOW
}

#[expect(deprecated, reason = "legacy cgroup storage: the only storage reachable without a cgroup pointer")]
#[map]
static DF_BENCH_STORAGE: aya_ebpf::maps::cgroup_storage::CgroupStorage<u32> =
    aya_ebpf::maps::cgroup_storage::CgroupStorage::new();
#[map]
static DF_BENCH_POLICY: Array<CgroupState> = Array::with_max_entries(16, 0);

/// Attached-cgroup local storage (no hash) → policy slot → Array (inlined) → DF_RULES → counter.
#[cgroup_sock_addr(connect4)]
pub fn df_bench_storage(ctx: SockAddrContext) -> i32 {
    // SAFETY: always valid while the program runs (storage of the attach cgroup).
    let slot = unsafe { *DF_BENCH_STORAGE.get_ptr_mut() };
    let Some(s) = DF_BENCH_POLICY.get(slot) else {
        return ALLOW;
    };
    count_exact_hit(&ctx, s.ruleset_id)
}
