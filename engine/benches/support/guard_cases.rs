//! The guard benchmarks' policy and calls, shared by `guard` (criterion, time) and
//! `guard_instructions` (a plain loop, for instruction counts under callgrind).

use std::collections::HashMap;

use depfence::compile::compile_str;
use depfence::guard::Guard;
use depfence::verdict::Verdict;

/// The two policy sizes: (label, backends, method patterns per backend).
pub const SIZES: [(&str, usize, usize); 2] = [("10", 1, 10), ("10k", 100, 100)];

/// `backends` backends with `per_backend` method patterns each, and a service wildcard on
/// backend 0.
pub fn policy(backends: usize, per_backend: usize) -> String {
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

/// One benchmarked call, as the caller `client`.
pub struct Call {
    pub case: &'static str,
    pub rpc: String,
    pub authority: String,
    pub verdict: Verdict,
}

/// The guard for a policy size, and its calls: an allowed method on `backend-N:50051`, a
/// method no pattern allows there, the allowed method on the backend's address, and a
/// `/admin.Admin/*` wildcard on `backend-0`. Each call's verdict is checked here.
pub fn guard_and_calls(backends: usize, per_backend: usize) -> (Guard, Vec<Call>) {
    let text = policy(backends, per_backend);
    let snapshot = compile_str("bench.toml", &text).unwrap_or_else(|_| panic!("compiles")).snapshot;
    assert_eq!(snapshot.rpc_rule_count(), backends * per_backend + 1);
    let guard = Guard::from_snapshot(snapshot, "prod").expect("environment");
    let b = backends / 2;
    let allowed = allowed_rpc(backends, per_backend);
    let authority = format!("backend-{b}:50051");
    let call = |case, rpc: &str, authority: &str, verdict| Call {
        case,
        rpc: rpc.to_owned(),
        authority: authority.to_owned(),
        verdict,
    };
    let calls = vec![
        call("allowed", &allowed, &authority, Verdict::Allowed),
        call("rejected", &format!("/pkg{b}.Service0/Nope"), &authority, Verdict::Rejected),
        call("ip_address", &allowed, &format!("10.0.{b}.1:50051"), Verdict::Allowed),
        call("wildcard", "/admin.Admin/Reset", "backend-0", Verdict::Allowed),
    ];
    for call in &calls {
        assert_eq!(guard.check("client", &call.rpc, &call.authority).verdict, call.verdict, "{}", call.case);
    }
    (guard, calls)
}

/// The allowed method the calls use: the last pattern of the middle backend.
pub fn allowed_rpc(backends: usize, per_backend: usize) -> String {
    let b = backends / 2;
    format!("/pkg{b}.Service{}/Method{}", (per_backend - 1) / 10, per_backend - 1)
}

/// The baseline's map: every method pattern's text (std `HashMap`, SipHash).
pub fn exact_names(backends: usize, per_backend: usize) -> HashMap<String, u32> {
    let names: HashMap<String, u32> = (0..backends)
        .flat_map(|b| (0..per_backend).map(move |m| format!("/pkg{b}.Service{}/Method{m}", m / 10)))
        .zip(0..)
        .collect();
    assert!(names.contains_key(&allowed_rpc(backends, per_backend)));
    names
}
