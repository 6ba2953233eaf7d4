//! The hooks, maps and their shared core (compiled only for the bpf target).

use core::ptr::{addr_of, addr_of_mut, read_volatile};

use aya_ebpf::{
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
    AF_INET, AF_INET6, ALLOW, BPF_F_NO_PREALLOC, CgroupState, CidrKeyData, CidrValue, Config, DENY, DedupKey,
    EVENTS_BYTES, Event, FLAG_ACTIVE_HAS_CIDR, FLAG_CANDIDATE_HAS_CIDR, FLAG_EVENT_ALLOWED, FLAG_EVENT_NO_DEDUP,
    GLOBAL_BAD_SLOT, GLOBAL_COUNT, GLOBAL_EVENTS_DEDUPED, GLOBAL_EVENTS_DROPPED, GLOBAL_UNREGISTERED, MAX_CGROUP_DEPTH,
    MAX_CGROUPS, MAX_CIDR_PORT_RANGES, MAX_CIDRS, MAX_COUNTER_SLOTS, MAX_DEDUP, MAX_RULES, MODE_AUDIT, MODE_ENFORCE,
    MODE_OFF, Meta, RuleKey, RuleValue, VERDICT_ALLOWED, VERDICT_CANDIDATE_WOULD_REJECT, VERDICT_COUNT,
    VERDICT_REJECTED, VERDICT_WOULD_REJECT,
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

/// Rule id (≥ 1) of the first rule of `ruleset` that allows `d`, or 0.
#[inline(always)]
fn matches(ruleset: u32, d: &Dest, with_cidr: bool) -> u32 {
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
    if !with_cidr {
        return 0;
    }
    let lpm = Key::new(128 + 32, CidrKeyData { ruleset_be: ruleset.to_be(), addr: d.addr });
    let Some(v) = DF_CIDRS.get(&lpm) else {
        return 0;
    };
    let v: &CidrValue = v;
    // A fixed-size array walked at most MAX_CIDR_PORT_RANGES times: the verifier sees the bound.
    for r in v.ranges.iter().take((v.count as usize).min(MAX_CIDR_PORT_RANGES)) {
        if (r.proto == 0 || r.proto == d.proto) && r.port_lo <= d.port && d.port <= r.port_hi {
            return r.rule_id;
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

    let active = s.ruleset_id;
    let hit = matches(active, &d, flags & FLAG_ACTIVE_HAS_CIDR != 0);
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
    if cand != 0 && cand != active && matches(cand, &d, flags & FLAG_CANDIDATE_HAS_CIDR != 0) == 0 {
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
