//! Instructions per [`depfence::guard::Guard::check`], counted by callgrind: unlike time on this
//! VM (which varies by up to 1.5x from one process to the next), the count repeats exactly, so
//! a change to the matcher can be judged by it. `scripts/guard-instructions` runs every case:
//!
//! ```text
//! scripts/guard-instructions
//! ```
//!
//! By hand: `guard_instructions CASE SIZE N` makes N calls of one case (`hashmap_exact`,
//! `allowed`, `rejected`, `ip_address`, `wildcard`; SIZE `10` or `10k`, as in the `guard`
//! bench), each through a `measured_*` function that callgrind's `--toggle-collect` counts.
//! A check is counted whole: the snapshot load, the decision, and the decision's drop. With
//! `--test` (as `cargo bench -- --test` passes) it checks every case once and exits.

#![allow(clippy::panic, clippy::expect_used, reason = "a benchmark with invalid inputs must stop")]

use std::collections::HashMap;
use std::hint::black_box;

use depfence::guard::Guard;
use depfence::verdict::Verdict;

#[path = "support/guard_cases.rs"]
mod guard_cases;

/// One check, counted whole: load, decision, drop.
#[inline(never)]
fn measured_check(guard: &Guard, caller: &str, rpc: &str, authority: &str) -> Verdict {
    guard.check(caller, rpc, authority).verdict
}

/// The baseline: one exact-name lookup (std `HashMap`, SipHash), as in the `guard` bench.
#[inline(never)]
fn measured_hashmap_exact(names: &HashMap<String, u32>, rpc: &str) -> Option<u32> {
    names.get(rpc).copied()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if args.iter().any(|a| a == "--test") {
        for (_, backends, per_backend) in guard_cases::SIZES {
            // Builds the guard and checks every call's verdict.
            guard_cases::guard_and_calls(backends, per_backend);
        }
        println!("guard_instructions: every case checked");
        return;
    }
    let [case, size, count] = args.as_slice() else {
        panic!("usage: guard_instructions CASE SIZE N (see the file's documentation)");
    };
    let (_, backends, per_backend) =
        guard_cases::SIZES.into_iter().find(|(label, _, _)| label == size).expect("SIZE is 10 or 10k");
    let count: u64 = count.parse().expect("N is a number");
    let (guard, calls) = guard_cases::guard_and_calls(backends, per_backend);
    let caller = "client".to_owned();
    if case == "hashmap_exact" {
        let allowed = guard_cases::allowed_rpc(backends, per_backend);
        let names = guard_cases::exact_names(backends, per_backend);
        for _ in 0..count {
            black_box(measured_hashmap_exact(black_box(&names), black_box(&allowed)));
        }
        return;
    }
    let call = calls.iter().find(|c| c.case == case).expect("a known CASE");
    for _ in 0..count {
        black_box(measured_check(
            black_box(&guard),
            black_box(&caller),
            black_box(&call.rpc),
            black_box(&call.authority),
        ));
    }
}
