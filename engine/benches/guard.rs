//! The in-process guard's hot path: [`depfence::guard::Guard::check`] with 10 and 10,000
//! `rpc_allow` patterns, against a baseline measured in the same run: one `HashMap<String, _>`
//! lookup (std, SipHash) of the exact RPC name, the least a name check can cost.
//!
//! ```text
//! cargo bench -p depfence --bench guard
//! ```
//!
//! Each `check` does what a client layer does per call: finds the caller, resolves the
//! authority to a service, and looks the RPC name up. The cases, as the caller `client`:
//! - `check_allowed`: an allowed method on `backend-N:50051` (the backend's name and a port);
//! - `check_rejected`: a method no pattern allows, on the same backend;
//! - `check_wildcard`: a `/admin.Admin/*` service wildcard, on `backend-0` (no port);
//! - `check_ip_address`: the allowed method on the backend's address `10.0.N.1:50051`, which
//!   takes the slower path that resolves the authority before the rule lookup.
//!
//! The medians are in `target/criterion/guard/*/new/estimates.json`. This VM's timings vary
//! by up to 1.5x between processes; `guard_instructions` counts instructions per check
//! instead, which callgrind repeats exactly.

#![allow(clippy::panic, clippy::expect_used, reason = "a benchmark with invalid inputs must stop")]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

#[path = "support/guard_cases.rs"]
mod guard_cases;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("guard");
    for (label, backends, per_backend) in guard_cases::SIZES {
        let (guard, calls) = guard_cases::guard_and_calls(backends, per_backend);
        let caller = "client".to_owned();

        // Baseline: one exact-name lookup in a map of every pattern text.
        let allowed = guard_cases::allowed_rpc(backends, per_backend);
        let names = guard_cases::exact_names(backends, per_backend);
        group.bench_function(format!("hashmap_exact_{label}"), |bench| {
            bench.iter(|| black_box(names.get(black_box(&allowed))))
        });
        // Every input goes through `black_box` the same way (a `&String`), in the baseline too:
        // `black_box` of a `&str` stores the fat pointer and reads it back, a store-forwarding
        // stall of a few ns that is the harness's, not the guard's.
        for call in &calls {
            group.bench_function(format!("check_{}_{label}", call.case), |bench| {
                bench.iter(|| {
                    black_box(guard.check(black_box(&caller), black_box(&call.rpc), black_box(&call.authority)).verdict)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
