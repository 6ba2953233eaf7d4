//! The maps the programs share with the loader; names, key and value types and sizes come from
//! `depfence-bpf-common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::Key},
};
use depfence_bpf_common::{
    BPF_F_NO_PREALLOC, CgroupState, CidrKeyData, CidrValue, Config, DNS_SLOTS, DedupKey, DnsSlot, EVENTS_BYTES,
    GLOBAL_COUNT, GLOBAL_RULE_HITS_DROPPED, MAX_CGROUPS, MAX_CIDRS, MAX_COUNTER_SLOTS, MAX_DEDUP, MAX_DNS_SOCKS,
    MAX_NAMES, MAX_RULE_HITS, MAX_RULES, Meta, NameKey, RuleHitKey, RuleKey, RuleValue, VERDICT_COUNT,
    lookup::{LOOKUP_PREFIX_LEN, RuleMaps},
};

#[map]
pub static DF_CGROUPS: HashMap<u64, CgroupState> = HashMap::with_max_entries(MAX_CGROUPS, 0);
#[map]
pub static DF_RULES: HashMap<RuleKey, RuleValue> = HashMap::with_max_entries(MAX_RULES, BPF_F_NO_PREALLOC);
// LpmTrie::with_max_entries adds BPF_F_NO_PREALLOC itself (the kernel requires it).
#[map]
pub static DF_CIDRS: LpmTrie<CidrKeyData, CidrValue> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
pub static DF_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_COUNTER_SLOTS * VERDICT_COUNT, 0);
#[map]
pub static DF_GLOBALS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GLOBAL_COUNT, 0);
#[map]
pub static DF_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
/// Written by the loader (ABI version); never read here.
#[map]
pub static DF_META: Array<Meta> = Array::with_max_entries(1, 0);
#[map]
pub static DF_CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
pub static DF_DEDUP: LruHashMap<DedupKey, u64> = LruHashMap::with_max_entries(MAX_DEDUP, 0);
#[map]
pub static DF_NAMES: HashMap<NameKey, CidrValue> = HashMap::with_max_entries(MAX_NAMES, BPF_F_NO_PREALLOC);
#[map]
pub static DF_DNS_SLOTS: Array<DnsSlot> = Array::with_max_entries(DNS_SLOTS, 0);
#[map]
pub static DF_DNS_NEXT: Array<u64> = Array::with_max_entries(1, 0);
/// Preallocated (flags 0): inserting a rule's first hit never allocates in a hook.
#[map]
pub static DF_RULE_HITS: PerCpuHashMap<RuleHitKey, u64> = PerCpuHashMap::with_max_entries(MAX_RULE_HITS, 0);
#[map]
pub static DF_DNS_SOCKS: LruHashMap<u64, DnsSlot> = LruHashMap::with_max_entries(MAX_DNS_SOCKS, 0);

/// The rule maps as the shared lookup (`depfence_bpf_common::lookup`) reads them.
pub struct KernelRules;

impl RuleMaps for KernelRules {
    type Ranges<'a> = &'a CidrValue;

    #[inline(always)]
    fn exact(&self, key: &RuleKey) -> Option<u32> {
        // SAFETY: map lookup of a plain-data value, replaced whole by the loader.
        unsafe { DF_RULES.get(*key) }.map(|v| v.rule_id)
    }

    #[inline(always)]
    fn longest_prefix(&self, key: &CidrKeyData) -> Option<&CidrValue> {
        DF_CIDRS.get(Key::new(LOOKUP_PREFIX_LEN, *key))
    }

    #[inline(always)]
    fn names(&self, key: &NameKey) -> Option<&CidrValue> {
        // SAFETY: map lookup of a plain-data value.
        unsafe { DF_NAMES.get(*key) }
    }
}

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn bump(map: &PerCpuArray<u64>, idx: u32) {
    if let Some(p) = map.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *p += 1 };
    }
}

/// Counts a hit of rule `rule_id` of `ruleset` on this CPU: in place when the rule has been hit
/// before, else its entry is created with this hit (another CPU creating it first is fine: the
/// increment is retried on the entry it made, each CPU has its own value). A full map is counted
/// in `GLOBAL_RULE_HITS_DROPPED`.
#[inline(always)]
pub fn count_rule_hit(ruleset: u32, rule_id: u32) {
    let key = RuleHitKey { ruleset, rule_id };
    if let Some(p) = DF_RULE_HITS.get_ptr_mut(key) {
        // SAFETY: this CPU's value; no other writer on this CPU while the hook runs.
        unsafe { *p += 1 };
        return;
    }
    // Create only: when another CPU created the entry in between, the insert fails and the
    // increment goes to this CPU's value of that entry.
    if DF_RULE_HITS.insert(key, 1, BPF_NOEXIST).is_ok() {
        return;
    }
    match DF_RULE_HITS.get_ptr_mut(key) {
        // SAFETY: as above.
        Some(p) => unsafe { *p += 1 },
        None => bump(&DF_GLOBALS, GLOBAL_RULE_HITS_DROPPED),
    }
}

/// `BPF_NOEXIST`: create only.
const BPF_NOEXIST: u64 = 1;
