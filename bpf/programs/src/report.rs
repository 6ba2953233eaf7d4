//! Events: one ring-buffer record per judged connection worth reporting, de-duplicated per
//! (cgroup, destination, verdict) within the configured window.

use core::ptr::addr_of_mut;

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated as raw};
use depfence_bpf_common::{
    CgroupState, DedupKey, Event, FLAG_EVENT_NO_DEDUP, GLOBAL_EVENTS_DEDUPED, GLOBAL_EVENTS_DROPPED,
    lookup::Destination,
};

use crate::maps::{DF_CONFIG, DF_DEDUP, DF_EVENTS, DF_GLOBALS, bump};

/// Reports `verdict` for `d` (what it is: `kind`, an `EVENT_*`) (best effort: a full ring buffer is counted, not waited for).
#[inline(always)]
pub fn emit(own: u64, policy: u64, s: &CgroupState, d: &Destination, verdict: u32, ruleset: u32, kind: u32) {
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
        (*e).kind = kind;
        (*e)._reserved = 0;
    }
    entry.submit(0);
}
