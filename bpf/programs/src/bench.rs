//! Benchmark-only programs (feature `bench`): the cost floor of the connect hook's parts, for
//! the privileged `hook_cost` test. They are never attached by the agent, and the shipped object
//! leaves them out.

use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id,
    macros::{cgroup_sock_addr, map},
    maps::{Array, PerCpuArray},
    programs::SockAddrContext,
};
use depfence_bpf_common::{ALLOW, CgroupState, RuleKey};

use crate::context::read_dest;
use crate::maps::{DF_CGROUPS, DF_CONFIG, DF_RULES, bump};

/// Baseline for benchmarks: the minimum hook, "one exact hash lookup + one per-CPU counter".
#[map]
static DF_BASE_CNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

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
