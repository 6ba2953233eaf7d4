//! The in-process guard's hot path: [`depfence::guard::Guard::check`] with 10 and 10,000
//! `rpc_allow` patterns, against a baseline measured in the same run: one `HashMap<String, _>`
//! lookup (std, SipHash) of the exact RPC name, the least a name check can cost.
//!
//! ```text
//! cargo bench -p depfence --features guard --bench guard
//! ```
//!
//! Each `check` does what a client layer does per call: finds the caller, resolves the
//! authority (`backend-N:50051`) to a service, and looks the RPC name up (an allowed method, a
//! rejected one, and a service wildcard). The medians are in
//! `target/criterion/guard/*/new/estimates.json`.

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
        let authority = format!("backend-{b}:50051");
        let allowed = format!("/pkg{b}.Service{}/Method{}", (per_backend - 1) / 10, per_backend - 1);
        let rejected = format!("/pkg{b}.Service0/Nope");
        assert_eq!(guard.check("client", &allowed, &authority).verdict, Verdict::Allowed);
        assert_eq!(guard.check("client", &rejected, &authority).verdict, Verdict::Rejected);
        assert_eq!(guard.check("client", "/admin.Admin/Reset", "backend-0").verdict, Verdict::Allowed);

        // Baseline: one exact-name lookup in a map of every pattern text.
        let names: HashMap<String, u32> = (0..backends)
            .flat_map(|b| (0..per_backend).map(move |m| format!("/pkg{b}.Service{}/Method{m}", m / 10)))
            .zip(0..)
            .collect();
        assert!(names.contains_key(&allowed));
        group.bench_function(format!("hashmap_exact_{label}"), |bench| {
            bench.iter(|| black_box(names.get(black_box(allowed.as_str()))))
        });
        group.bench_function(format!("check_allowed_{label}"), |bench| {
            bench.iter(|| {
                black_box(guard.check(black_box("client"), black_box(&allowed), black_box(&authority)).verdict)
            })
        });
        group.bench_function(format!("check_rejected_{label}"), |bench| {
            bench.iter(|| {
                black_box(guard.check(black_box("client"), black_box(&rejected), black_box(&authority)).verdict)
            })
        });
        group.bench_function(format!("check_wildcard_{label}"), |bench| {
            bench.iter(|| {
                black_box(
                    guard.check(black_box("client"), black_box("/admin.Admin/Reset"), black_box("backend-0")).verdict,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
