//! depfence kernel hooks: cgroup/connect4, connect6, sendmsg4, sendmsg6 (and recvmsg4/6,
//! getpeername4/6 for the DNS redirect).
//!
//! One `#[inline(always)]` core (`hooks::decide`) serves the four judging entry points. Flow:
//! 1. find the nearest registered cgroup (own id, else bounded ancestor walk);
//! 2. mode off → allow; else match the destination against the active ruleset with the shared
//!    lookup (`depfence_bpf_common::lookup`: exact key, port 0, address blocks, DNS names) and
//!    turn (mode, matched) into a verdict with the shared `verdict_of`;
//! 3. shadow-evaluate the candidate ruleset if any;
//! 4. count per cgroup slot × verdict (per-CPU, exact) and emit a best-effort event.
//!
//! Modules: `maps` (the maps), `context` (reading the hook context), `hooks` (entry points),
//! `report` (events), `dns` (the DNS redirect), `bench` (feature `bench`: cost-floor programs
//! for the hook benchmark, left out of the shipped object).
//!
//! Host builds (`cargo build --workspace`, clippy, rust-analyzer) compile only a stub `main`,
//! so the crate can stay a workspace member without breaking them.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// The DNS slot allocator needs an atomic fetch-and-add, which the bpf target only offers
// through the intrinsic (it has no compare-and-swap, so no `AtomicU64::fetch_add`).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features, reason = "atomic_xadd, see above"))]
#![allow(unsafe_code, reason = "eBPF helpers and context reads are raw pointer operations")]

#[cfg(all(target_arch = "bpf", feature = "bench"))]
mod bench;
#[cfg(target_arch = "bpf")]
mod context;
#[cfg(target_arch = "bpf")]
mod dns;
#[cfg(target_arch = "bpf")]
mod hooks;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod report;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("depfence-bpf is an eBPF object; engine/build.rs builds it for bpfel-unknown-none");
    std::process::exit(1);
}
