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
//! The medians are in `target/criterion/guard/*/new/estimates.json`.

#![allow(clippy::panic, clippy::expect_used, reason = "a benchmark with invalid inputs must stop")]

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use depfence::compile::compile_str;
use depfence::guard::Guard;
use depfence::snapshot::Verdict;

/// `backends` backends with `per_backend` method patterns each, and a service wildcard on
/// backend 0.
fn policy(backends: usize, per_backend: usize) -> String {
    let mut text = String::from("version = 1\n[environments]\nprod = \"enforce\"\n");
    for b in 0..backends {
        text.push_str(&format!("[services.backend-{b}]\nendpoints = [{{ ip = \"10.0.{b}.1\", ports = [50051] }}]\n"));
    }
    text.push_str("[services.client]\nallow = [");
    text.push_str(&(0..backends).map(|b| format!("{{ service = \"backend-{b}\" }}")).collect::<Vec<_>>().join(", "));
    text.push_str("]\nrpc_allow = [\n");
    for b in 0..backends {
        let rpcs: Vec<String> = (0..per_backend).map(|m| format!("\"/pkg{b}.Service{}/Method{m}\"", m / 10)).collect();
        text.push_str(&format!("  {{ service = \"backend-{b}\", rpcs = [{}] }},\n", rpcs.join(", ")));
    }
    text.push_str("  { service = \"backend-0\", rpcs = [\"/admin.Admin/*\"] },\n]\n");
    text
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("guard");
    for (label, backends, per_backend) in [("10", 1, 10), ("10k", 100, 100)] {
        let text = policy(backends, per_backend);
        let snapshot = compile_str("bench.toml", &text).unwrap_or_else(|_| panic!("compiles")).snapshot;
        assert_eq!(snapshot.rpc_rule_count(), backends * per_backend + 1);
        let guard = Guard::from_snapshot(snapshot, "prod").expect("environment");
        let b = backends / 2;
        let caller = "client".to_owned();
        let authority = format!("backend-{b}:50051");
        let allowed = format!("/pkg{b}.Service{}/Method{}", (per_backend - 1) / 10, per_backend - 1);
        let rejected = format!("/pkg{b}.Service0/Nope");
        let cases = [
            ("allowed", allowed.clone(), authority.clone(), Verdict::Allowed),
            ("rejected", rejected, authority, Verdict::Rejected),
            ("ip_address", allowed.clone(), format!("10.0.{b}.1:50051"), Verdict::Allowed),
            ("wildcard", "/admin.Admin/Reset".to_owned(), "backend-0".to_owned(), Verdict::Allowed),
        ];

        // Baseline: one exact-name lookup in a map of every pattern text.
        let names: HashMap<String, u32> = (0..backends)
            .flat_map(|b| (0..per_backend).map(move |m| format!("/pkg{b}.Service{}/Method{m}", m / 10)))
            .zip(0..)
            .collect();
        assert!(names.contains_key(&allowed));
        group.bench_function(format!("hashmap_exact_{label}"), |bench| {
            bench.iter(|| black_box(names.get(black_box(&allowed))))
        });
        // Every input goes through `black_box` the same way (a `&String`), in the baseline too:
        // `black_box` of a `&str` stores the fat pointer and reads it back, a store-forwarding
        // stall of a few ns that is the harness's, not the guard's.
        for (case, rpc, authority, verdict) in &cases {
            assert_eq!(guard.check(&caller, rpc, authority).verdict, *verdict, "{case}");
            group.bench_function(format!("check_{case}_{label}"), |bench| {
                bench.iter(|| black_box(guard.check(black_box(&caller), black_box(rpc), black_box(authority)).verdict))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
